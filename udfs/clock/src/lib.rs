//! A module that declares itself nondeterministic: it gets the real clock, which the host's
//! tests compare with the frozen clock deterministic modules see.

use std::time::{SystemTime, UNIX_EPOCH};

use riffle_udf::{Timestamp, export_udfs, scalar};

/// The current wall-clock time, once per row.
#[scalar(nondeterministic)]
pub fn now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(-1);
    Timestamp(micros)
}

export_udfs!(now);
