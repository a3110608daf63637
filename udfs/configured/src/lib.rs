//! A module that cannot run without configuration: its init hook requires a `scale = <number>`
//! line. Tests use it to show that init configuration reaches every instance, that a missing
//! one fails loading with the module's own message, and that `riffle udf inspect` still
//! describes the module without any.

use std::sync::OnceLock;

use riffle_udf::{export_udfs, scalar};

static SCALE: OnceLock<f64> = OnceLock::new();

/// Reads `scale = <number>`; anything else is rejected.
pub fn configure(config: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(config).map_err(|e| e.to_string())?;
    let value = text
        .trim()
        .strip_prefix("scale")
        .and_then(|rest| rest.trim_start().strip_prefix('='))
        .ok_or_else(|| "configuration required: `scale = <number>`".to_string())?;
    let scale: f64 = value.trim().parse().map_err(|e| format!("scale: {e}"))?;
    SCALE.set(scale).map_err(|_| "configured twice".to_string())
}

/// `x` times the configured scale.
#[scalar]
pub fn scaled(x: f64) -> f64 {
    x * SCALE.get().copied().unwrap_or(f64::NAN)
}

export_udfs!(scaled; init = configure);
