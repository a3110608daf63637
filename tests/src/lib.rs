//! Shared helpers for Riffle's end-to-end tests and benchmarks.
//!
//! The build script compiles every UDF crate under `udfs/` to a Wasm component; [`udf`] finds
//! the result by crate name.

use std::path::PathBuf;

/// Directory holding the freshly built `.wasm` components.
pub fn udf_dir() -> PathBuf {
    PathBuf::from(env!("RIFFLE_UDF_DIR"))
}

/// Path of the component built from `udfs/<name>` (e.g. `udf("fraud")`).
pub fn udf(name: &str) -> PathBuf {
    let path = udf_dir().join(format!("riffle_udfs_{name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}
