//! Helpers shared by the host's process-level tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};

/// `riffle run PIPELINE --mode MODE --quiet` from the pipeline's directory, sharing the tests'
/// compiled-UDF cache; stderr is captured for failure messages.
pub fn riffle(pipeline: &Path, mode: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_riffle"));
    c.args(["run", pipeline.to_str().unwrap(), "--mode", mode, "--quiet"])
        .args([
            "--cache-dir",
            std::env::temp_dir()
                .join("riffle-test-wasm-cache")
                .to_str()
                .unwrap(),
        ])
        .current_dir(pipeline.parent().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// A two-thread runtime for tests that drive the engine from Rust.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
