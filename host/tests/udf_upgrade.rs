//! Pinned UDF versions. A streaming query's checkpoint records the sha256 of every UDF module
//! and of its configuration: a restart with a rebuilt module is refused with a message naming
//! the functions, both hashes and how to upgrade; `riffle run --upgrade-udfs` goes on with the
//! new module from the next epoch, and the outputs name the module that produced them: the
//! progress records, each Parquet file's key-value metadata (read back by pyarrow, a reader we
//! did not write) and the history `riffle status` prints.

mod common;

use common::riffle;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use riffle::common::FileFormat;
use riffle::connectors::files::read_file;

const ROWS: usize = 3000;

fn pipeline(dir: &Path, module: &Path) -> PathBuf {
    let path = dir.join("pipeline.toml");
    std::fs::write(
        &path,
        format!(
            r#"
query = "SELECT tx_id, risk_score(amount, country) AS risk FROM transactions"

[source]
name = "transactions"
stream = {{ kind = "generator", rows = {ROWS} }}

[[udfs]]
path = "{module}"

[sink]
stream = "out"

[stream]
checkpoint = "checkpoint"
trigger = "available-now"
max_rows_per_epoch = 500
"#,
            module = module.display(),
        ),
    )
    .unwrap();
    path
}

/// The same component with a custom section appended: identical code and behaviour, another
/// sha256, as a rebuild with another compiler would give.
fn rebuild(module: &Path) {
    let mut bytes = std::fs::read(module).unwrap();
    let name = b"riffle-test-rebuild";
    let payload = b"2";
    bytes.push(0); // custom section
    bytes.push((1 + name.len() + payload.len()) as u8); // size (< 128: one LEB128 byte)
    bytes.push(name.len() as u8);
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(payload);
    std::fs::write(module, bytes).unwrap();
}

fn sha256(path: &Path) -> String {
    // Not the host's implementation: coreutils.
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `riffle.udf.fraud` of each output file's Parquet metadata, by epoch, as pyarrow reads it.
fn stamped_hashes(out: &Path) -> BTreeMap<u64, String> {
    let files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    let script = "import json, sys\n\
                  import pyarrow.parquet as pq\n\
                  print(json.dumps({f: {k.decode(): v.decode() for k, v in \
                  pq.read_metadata(f).metadata.items() if k.startswith(b'riffle.')} \
                  for f in sys.argv[1:]}))";
    let run = Command::new("python3")
        .args(["-c", script])
        .args(&files)
        .output()
        .unwrap();
    assert!(run.status.success(), "pyarrow: {}", stderr(&run));
    let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    json.as_object()
        .unwrap()
        .values()
        .map(|meta| {
            (
                meta["riffle.epoch"].as_str().unwrap().parse().unwrap(),
                meta["riffle.udf.fraud"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn output_ids(out: &Path) -> Vec<i64> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "parquet") {
            let batches: Vec<RecordBatch> = read_file(&path, FileFormat::Parquet, None).unwrap();
            for b in batches {
                ids.extend(b.column(0).as_primitive::<Int64Type>().values().iter());
            }
        }
    }
    ids.sort_unstable();
    ids
}

#[test]
fn a_rebuilt_module_is_refused_until_upgraded_on_purpose_and_outputs_name_each_version() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("fraud.wasm");
    std::fs::copy(riffle_tests::udf("fraud"), &module).unwrap();
    let p = pipeline(dir.path(), &module);
    let old = sha256(&module);

    let first = riffle(&p, "stream")
        .args(["--max-epochs", "2"])
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", stderr(&first));

    rebuild(&module);
    let new = sha256(&module);
    assert_ne!(old, new);
    let refused = riffle(&p, "stream").output().unwrap();
    let message = stderr(&refused);
    assert!(!refused.status.success(), "{message}");
    assert!(
        message.contains(&format!(
            "UDF module fraud.wasm (risk_score, haversine_km, amount_bucket, is_night, \
             decayed_avg) changed (sha256 {} -> {})",
            &old[..12],
            &new[..12]
        )) && message.contains("restart with --upgrade-udfs"),
        "{message}"
    );
    assert_eq!(
        output_ids(&dir.path().join("out")).len(),
        1000,
        "the refused run wrote nothing"
    );

    let upgraded = riffle(&p, "stream").arg("--upgrade-udfs").output().unwrap();
    assert!(upgraded.status.success(), "{}", stderr(&upgraded));
    assert!(
        stderr(&upgraded).contains("upgrading a UDF module on purpose"),
        "{}",
        stderr(&upgraded)
    );

    assert_epochs_name_their_module(dir.path(), &p, &old, &new);
}

/// Every row once, each epoch's output (Parquet metadata read by pyarrow, progress lines) names
/// the module that computed it, `old` for epochs 1-2 and `new` from epoch 3; the checkpoint's
/// history says so too; and a restart with the new module needs no `--upgrade-udfs`.
fn assert_epochs_name_their_module(dir: &Path, p: &Path, old: &str, new: &str) {
    // Every row once, and each epoch's output names the module that computed it.
    let ids = output_ids(&dir.join("out"));
    assert_eq!(ids, (0..ROWS as i64).collect::<Vec<_>>());
    let stamped = stamped_hashes(&dir.join("out"));
    assert_eq!(stamped.len(), ROWS / 500);
    for (epoch, hash) in &stamped {
        let want = if *epoch <= 2 { old } else { new };
        assert_eq!(hash, want, "epoch {epoch}");
    }
    let progress = common::progress_lines(&dir.join("checkpoint/progress.jsonl"));
    assert_eq!(progress.len(), ROWS / 500);
    for line in &progress {
        let epoch = line["epoch"].as_u64().unwrap();
        let want = if epoch <= 2 { old } else { new };
        assert_eq!(line["udfs"][0]["module"], want[..12], "{line}");
    }

    // The checkpoint keeps the history; a later restart with the new module needs nothing.
    let status = Command::new(env!("CARGO_BIN_EXE_riffle"))
        .args(["status", p.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    for (hash, from) in [(old, 1), (new, 3)] {
        assert!(
            text.contains(&format!("udf served   fraud.wasm sha256 {}", &hash[..12]))
                && text.contains(&format!("from epoch {from}")),
            "{text}"
        );
    }
    let again = riffle(p, "stream").output().unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
}

/// Replaces `module` atomically (a new file renamed over it, as deployment tools do) with
/// `bytes`.
fn replace(module: &Path, bytes: &[u8]) {
    let staged = module.with_extension("wasm.new");
    std::fs::write(&staged, bytes).unwrap();
    std::fs::rename(&staged, module).unwrap();
}

/// Runs the pipeline with `--hot-swap-udfs`, holding after epoch `hold` commits until `swap`
/// has replaced the module; returns the run's stderr.
fn run_with_swap(p: &Path, hold: u64, swap: impl FnOnce()) -> String {
    let dir = p.parent().unwrap();
    let (log, release) = (dir.join("stderr.log"), dir.join("release"));
    let _ = std::fs::remove_file(&release);
    let mut child = riffle(p, "stream")
        .arg("--hot-swap-udfs")
        .env("RIFFLE_HANG", format!("after-commit:{hold}"))
        .env("RIFFLE_HANG_UNTIL", &release)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let held = format!("RIFFLE_HANG: holding after-commit epoch {hold}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !std::fs::read_to_string(&log).unwrap().contains(&held) {
        assert!(
            std::time::Instant::now() < deadline,
            "the run never held: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    swap();
    std::fs::write(&release, "").unwrap();
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    text
}

#[test]
fn a_module_replaced_while_the_query_runs_serves_from_the_next_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("fraud.wasm");
    std::fs::copy(riffle_tests::udf("fraud"), &module).unwrap();
    let p = pipeline(dir.path(), &module);
    let old = sha256(&module);
    let rebuilt_path = dir.path().join("rebuilt.wasm");
    std::fs::copy(&module, &rebuilt_path).unwrap();
    rebuild(&rebuilt_path);
    let (rebuilt, new) = (std::fs::read(&rebuilt_path).unwrap(), sha256(&rebuilt_path));

    let said = run_with_swap(&p, 2, || replace(&module, &rebuilt));
    assert!(
        said.contains("hot swap: the replaced UDF module serves from this epoch on"),
        "{said}"
    );

    // One run, and the same records as an upgrade on purpose.
    assert_epochs_name_their_module(dir.path(), &p, &old, &new);
}

#[test]
fn a_replacement_that_drops_a_function_is_not_swapped_in_and_the_query_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("fraud.wasm");
    std::fs::copy(riffle_tests::udf("fraud"), &module).unwrap();
    let p = pipeline(dir.path(), &module);
    let old = sha256(&module);

    // The text module exports none of fraud's functions.
    let other = std::fs::read(riffle_tests::udf("text")).unwrap();
    let said = run_with_swap(&p, 1, || replace(&module, &other));
    assert!(
        said.contains("cannot replace the serving one in a running query")
            && said.contains("it no longer exports risk_score(amount DOUBLE, country VARCHAR)"),
        "{said}"
    );
    let ids = output_ids(&dir.path().join("out"));
    assert_eq!(ids, (0..ROWS as i64).collect::<Vec<_>>());
    for (epoch, hash) in stamped_hashes(&dir.path().join("out")) {
        assert_eq!(hash, old, "epoch {epoch}");
    }
    // The refusal is in the next epoch's progress record, once.
    let progress = common::progress_lines(&dir.path().join("checkpoint/progress.jsonl"));
    let warned: Vec<u64> = progress
        .iter()
        .filter(|l| l["warnings"].to_string().contains("cannot replace"))
        .map(|l| l["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(warned, [2], "{progress:?}");
}
