//! `riffle.toml`: tables, UDF modules and limits for `riffle sql`; pipeline files share its
//! `[[udfs]]` and `[limits]` sections.
//!
//! ```toml
//! [tables]
//! transactions = "data/transactions.parquet"   # relative to this file
//!
//! [[udfs]]
//! path = "udfs/riffle_udfs_fraud.wasm"
//! config = "model.txt"                          # optional: bytes for the init hook
//! functions = ["risk_score"]                    # optional: register only these
//!
//! [limits]
//! udf_timeout_ms = 5000
//! udf_memory_mb = 256
//! query_memory_mb = 1024                        # batch sorts and aggregations spill beyond it
//! on_row_error = "fail"                         # or "null"
//! ```
//!
//! Unknown keys are errors (a typo must not be silently ignored), reported with the line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, RiffleError};
use crate::udf::{RowErrorPolicy, UdfLimits};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RiffleConfig {
    #[serde(default)]
    pub tables: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub udfs: Vec<UdfConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// One `[[udfs]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UdfConfig {
    pub path: PathBuf,
    pub config: Option<PathBuf>,
    pub functions: Option<Vec<String>>,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsConfig {
    pub udf_timeout_ms: Option<u64>,
    pub udf_memory_mb: Option<usize>,
    pub query_memory_mb: Option<usize>,
    #[serde(default, deserialize_with = "policy")]
    pub on_row_error: Option<RowErrorPolicy>,
}

pub(crate) fn policy<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<RowErrorPolicy>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

impl LimitsConfig {
    /// The UDF limits this section sets, with command-line values (when given) taking
    /// precedence.
    pub(crate) fn udf_limits(
        &self,
        timeout_ms: Option<u64>,
        memory_mb: Option<usize>,
    ) -> UdfLimits {
        let mut limits = UdfLimits::default();
        if let Some(ms) = timeout_ms.or(self.udf_timeout_ms) {
            limits.call_timeout = std::time::Duration::from_millis(ms);
        }
        if let Some(mb) = memory_mb.or(self.udf_memory_mb) {
            limits.memory_bytes = mb << 20;
        }
        limits
    }

    /// The memory limit of batch queries in bytes, the command line's (when given) first.
    pub(crate) fn query_memory(&self, mb: Option<usize>) -> Option<usize> {
        mb.or(self.query_memory_mb).map(|mb| mb << 20)
    }
}

impl RiffleConfig {
    /// Reads and validates `path`; relative paths inside are resolved against its directory.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| RiffleError::io("reading", path, e))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| RiffleError::Config(format!("{}: {e}", path.display())))
    }

    fn parse(text: &str, base: &Path) -> std::result::Result<Self, String> {
        let mut config: RiffleConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        config.tables.values_mut().for_each(resolve);
        for udf in &mut config.udfs {
            resolve(&mut udf.path);
            if let Some(c) = udf.config.as_mut() {
                resolve(c);
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves_relative_paths() {
        let c = RiffleConfig::parse(
            "[tables]\ntx = \"data/tx.parquet\"\n[[udfs]]\npath = \"/abs/f.wasm\"\nconfig = \"m.txt\"\n\
             [limits]\non_row_error = \"null\"\nudf_timeout_ms = 10\nquery_memory_mb = 64\n",
            Path::new("/base"),
        )
        .unwrap();
        assert_eq!(c.tables["tx"], PathBuf::from("/base/data/tx.parquet"));
        assert_eq!(c.udfs[0].path, PathBuf::from("/abs/f.wasm"));
        assert_eq!(c.udfs[0].config, Some(PathBuf::from("/base/m.txt")));
        assert_eq!(c.limits.on_row_error, Some(RowErrorPolicy::Null));
        assert_eq!(c.limits.query_memory(None), Some(64 << 20));
        assert_eq!(
            c.limits.query_memory(Some(8)),
            Some(8 << 20),
            "the flag wins"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_point_at_the_line() {
        let e = RiffleConfig::parse("[tables]\nx = \"a\"\n[limit]\n", Path::new(".")).unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        let e =
            RiffleConfig::parse("[limits]\non_row_error = \"skip\"\n", Path::new(".")).unwrap_err();
        assert!(e.contains("line 2") && e.contains("skip"), "{e}");
    }
}
