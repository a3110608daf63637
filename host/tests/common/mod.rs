//! Helpers shared by the host's process-level tests.
#![allow(dead_code)]

pub mod broker;
pub mod http;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use broker::Broker;

/// A file of the demos (`scripts/demo/NAME`): the pipelines, queries and reports the tests
/// run as the demos do.
pub fn demo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/demo")
        .join(name)
}

/// `riffle ARGS...` in `dir`, talking to `broker` (as `RIFFLE_KAFKA_BOOTSTRAP`).
pub fn riffle_with_broker(args: &[&str], dir: &Path, broker: &Broker) -> Output {
    Command::new(env!("CARGO_BIN_EXE_riffle"))
        .args(args)
        .env("RIFFLE_KAFKA_BOOTSTRAP", &broker.bootstrap)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// As [`riffle_with_broker`], which must succeed.
pub fn riffle_with_broker_ok(args: &[&str], dir: &Path, broker: &Broker) -> Output {
    let out = riffle_with_broker(args, dir, broker);
    assert!(
        out.status.success(),
        "riffle {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

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

/// `riffle ARGS...` run from `cwd` as a user would, sharing the tests' compiled-UDF cache.
pub fn riffle_in(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_riffle"))
        .args(args)
        .current_dir(cwd)
        .env(
            "RIFFLE_CACHE_DIR",
            std::env::temp_dir().join("riffle-test-wasm-cache"),
        )
        .output()
        .expect("riffle runs")
}

/// The Parquet files in `dir` (a stream's output directory), in name order: epoch order.
pub fn parquet_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    files
}

/// Text of captured output.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A two-thread runtime for tests that drive the engine from Rust.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The columns of a Delta table as read by the `deltalake` Python package (delta-rs's Python
/// binding from PyPI: an independent reader of the table format), as JSON lists, one per
/// column, with floats given as their bit patterns (`i64`) so that no JSON parser rounds them.
pub fn python_delta_columns(table: &Path, columns: &[&str]) -> serde_json::Value {
    let script = r#"
import json, os, struct, sys
from deltalake import DeltaTable
columns = sys.argv[2:]
t = DeltaTable(sys.argv[1]).to_pyarrow_table(columns=columns)
bits = lambda x: struct.unpack("<q", struct.pack("<d", x))[0] if isinstance(x, float) else x
print(json.dumps([[bits(v) for v in t.column(c).to_pylist()] for c in columns]), flush=True)
# deltalake 1.6 (PyPI) can abort in its thread teardown at interpreter exit after a
# multi-file read; the read itself is complete, so leave without the teardown.
os._exit(0)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(table)
        .args(columns)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "the deltalake Python package could not read {} (install it with `pip install deltalake pyarrow`): {}",
        table.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The records of a progress file (`progress.jsonl`), one per line; a last line still being
/// written by a running query (no newline yet) is left out.
pub fn progress_lines(file: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
