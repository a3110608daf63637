//! Operating a running `riffle run --mode stream` process: SIGTERM (or Ctrl-C) lets the epoch
//! in flight commit and exits 0, a second signal stops at once and the next run re-runs the
//! epoch, and `riffle status` reports a checkpoint without running anything.
//!
//! Signals are sent with `kill(2)`; a failpoint (`RIFFLE_HANG`) holds an epoch open
//! so that the second signal surely arrives while one is in flight, whatever the machine's
//! speed. UDF hashes are checked against `sha256sum`, a tool that is not ours.

mod common;

use common::riffle;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use riffle::common::FileFormat;
use riffle::connectors::files::read_file;

fn pipeline(dir: &Path, stream: &str, trigger: &str) -> PathBuf {
    let path = dir.join("pipeline.toml");
    std::fs::write(
        &path,
        format!(
            r#"
query = "SELECT tx_id, card_id, risk_score(amount, country) AS risk FROM transactions"

[source]
name = "transactions"
stream = {stream}

[[udfs]]
path = "{udf}"

[sink]
stream = "out"

[stream]
checkpoint = "checkpoint"
{trigger}
max_rows_per_epoch = 500
"#,
            udf = riffle_tests::udf("fraud").display(),
        ),
    )
    .unwrap();
    path
}

/// Sends SIGTERM to `child`.
fn terminate(child: &Child) {
    signal(child, libc::SIGTERM);
}

fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: `kill` has no memory effects; the pid is our own child, not yet reaped.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
}

/// Waits until `checkpoint` has committed epoch `n` while `child` runs.
fn wait_for_commit(child: &mut Child, checkpoint: &Path, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    // (Commits before the previous one are pruned: wait for the number, not the files.)
    while epochs(checkpoint, "commits")
        .last()
        .is_none_or(|&epoch| epoch < n)
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended by itself"
        );
        assert!(
            Instant::now() < deadline,
            "epoch {n} not committed in 2 min"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Epoch numbers of the files in a checkpoint subdirectory (`offsets` or `commits`).
fn epochs(checkpoint: &Path, sub: &str) -> BTreeSet<u64> {
    std::fs::read_dir(checkpoint.join(sub))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.get(..10)?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn status(pipeline: &Path, json: bool) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_riffle"));
    command.args(["status", pipeline.to_str().unwrap()]);
    if json {
        command.arg("--json");
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "riffle status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The transaction ids in the sink's files (one Parquet file per epoch).
fn sink_ids(dir: &Path) -> Vec<i64> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir.join("out")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "parquet") {
            let batches: Vec<RecordBatch> = read_file(&path, FileFormat::Parquet, None).unwrap();
            for b in batches {
                ids.extend(b.column(0).as_primitive::<Int64Type>().values().iter());
            }
        }
    }
    ids
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_signal_lets_the_epoch_in_flight_commit_and_the_run_exit_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // Endless input arriving in real time: only a signal ends this run.
    let p = pipeline(
        dir.path(),
        "{ kind = \"generator\", rows_per_second = 5000 }",
        "interval = \"50 milliseconds\"",
    );
    let checkpoint = dir.path().join("checkpoint");
    let mut child = riffle(&p, "stream").spawn().unwrap();
    wait_for_commit(&mut child, &checkpoint, 3);
    terminate(&child);
    let out = child.wait_with_output().unwrap();
    let stderr = stderr_of(&out);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(
        stderr.contains("stopping after the epoch in flight commits"),
        "{stderr}"
    );
    assert!(stderr.contains("stream run stopped"), "{stderr}");

    // The last epoch planned was committed: nothing is left for the next run to redo.
    let committed = epochs(&checkpoint, "commits");
    let last = *committed.last().unwrap();
    assert_eq!(epochs(&checkpoint, "offsets").last(), Some(&last));
    // Every generated row up to the committed offset is in the output, once.
    let ids = sink_ids(dir.path());
    let distinct: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), ids.len(), "a row was written twice");

    let json: serde_json::Value = serde_json::from_str(&status(&p, true)).unwrap();
    assert_eq!(json["last_commit"]["epoch"], last);
    assert_eq!(json["uncommitted"], serde_json::json!([]), "{json}");
    assert!(json["running_pid"].is_null(), "{json}");
    let offset = &json["committed_offsets"]["sources"]["transactions"]["end"]["rows"];
    assert_eq!(offset.as_u64(), Some(ids.len() as u64), "{json}");
    assert_eq!(
        json["fingerprint"]["udfs"][0]["sha256"],
        sha256sum(&riffle_tests::udf("fraud"))
    );
    assert_eq!(json["last_progress"]["epoch"], last);
    let text = status(&p, false);
    assert!(
        text.contains(&format!("epoch        {last} committed")),
        "{text}"
    );
    assert!(text.contains("not running"), "{text}");
    assert!(
        text.contains(&format!("offset {{\"rows\":{}}}", ids.len())),
        "{text}"
    );

    // A restart resumes at the next epoch: it re-runs nothing, and the rows go on from the
    // committed offset. This time the stop is Ctrl-C's SIGINT.
    let mut child = riffle(&p, "stream").spawn().unwrap();
    wait_for_commit(&mut child, &checkpoint, last + 2);
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let stderr = stderr_of(&out);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(
        stderr.contains("stopping after the epoch in flight commits"),
        "{stderr}"
    );
    let lines = progress_lines(dir.path());
    let second_run = lines.last().unwrap()["run_id"].clone();
    let resumed: Vec<u64> = lines
        .iter()
        .filter(|l| l["run_id"] == second_run)
        .map(|l| l["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(resumed[0], last + 1, "{resumed:?}");
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "{resumed:?}");
    let json: serde_json::Value = serde_json::from_str(&status(&p, true)).unwrap();
    assert_eq!(json["last_commit"]["epoch"], *resumed.last().unwrap());
    let ids = sink_ids(dir.path());
    let distinct: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), ids.len(), "a row was written twice");
    let offset = &json["committed_offsets"]["sources"]["transactions"]["end"]["rows"];
    assert_eq!(offset.as_u64(), Some(ids.len() as u64), "{json}");
}

#[test]
fn a_second_signal_stops_at_once_and_the_next_run_re_runs_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        "{ kind = \"generator\", rows = 3000 }",
        "trigger = \"available-now\"",
    );
    let mut child = riffle(&p, "stream")
        .env("RIFFLE_HANG", "after-sink:3")
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    let mut wait_for = |text: &str, said: &mut String| loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the run ended before saying {text:?}: {said}"
        );
        said.push_str(&line);
        if line.contains(text) {
            return;
        }
    };
    wait_for("RIFFLE_HANG: holding after-sink epoch 3", &mut said);
    // While it runs, status says which process holds the checkpoint.
    let json: serde_json::Value = serde_json::from_str(&status(&p, true)).unwrap();
    assert_eq!(json["running_pid"], child.id(), "{json}");
    assert_eq!(json["last_commit"]["epoch"], 2, "{json}");
    assert_eq!(json["uncommitted"][0]["epoch"], 3, "{json}");

    terminate(&child);
    wait_for("stopping after the epoch in flight commits", &mut said);
    terminate(&child);
    let status_code = child.wait().unwrap();
    assert_eq!(status_code.code(), Some(143), "{said}");

    let text = status(&p, false);
    assert!(text.contains("epoch        2 committed"), "{text}");
    assert!(
        text.contains("epoch 3 was planned and not committed"),
        "{text}"
    );
    assert!(text.contains("not running"), "{text}");

    // The next run re-runs epoch 3 with its recorded offsets and finishes: every row once.
    let out = riffle(&p, "stream").output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let mut ids = sink_ids(dir.path());
    ids.sort_unstable();
    assert_eq!(ids.len(), 3000);
    ids.dedup();
    assert_eq!(ids.len(), 3000, "a row was written twice");
    let json: serde_json::Value = serde_json::from_str(&status(&p, true)).unwrap();
    assert_eq!(json["last_commit"]["last"], true, "{json}");
}

fn progress_lines(dir: &Path) -> Vec<serde_json::Value> {
    common::progress_lines(&dir.join("checkpoint/progress.jsonl"))
}

#[test]
fn a_crash_between_a_commit_and_its_progress_line_loses_no_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        "{ kind = \"generator\", rows = 3000 }",
        "trigger = \"available-now\"",
    );
    let out = riffle(&p, "stream")
        .env("RIFFLE_CRASH", "after-commit:2")
        .output()
        .unwrap();
    assert!(
        !out.status.success() && stderr_of(&out).contains("RIFFLE_CRASH: aborting"),
        "{}",
        stderr_of(&out)
    );
    // Epoch 2 is committed, but the process died before writing its line.
    let epochs_of = |lines: &[serde_json::Value]| -> Vec<u64> {
        lines.iter().map(|l| l["epoch"].as_u64().unwrap()).collect()
    };
    assert_eq!(epochs_of(&progress_lines(dir.path())), [1]);

    let out = riffle(&p, "stream").output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let lines = progress_lines(dir.path());
    assert_eq!(epochs_of(&lines), [1, 2, 3, 4, 5, 6]);
    assert_eq!(lines[1]["recovered"], true, "{}", lines[1]);
    assert_eq!(lines[1]["input_rows"], 500, "{}", lines[1]);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line.get("recovered").is_some(), i == 1, "{line}");
    }
    // One query id throughout, the checkpoint's; the run id tells the two processes apart,
    // and the recovered line is the first run's.
    let json: serde_json::Value = serde_json::from_str(&status(&p, true)).unwrap();
    assert!(lines.iter().all(|l| l["query_id"] == json["query_id"]));
    let runs: Vec<&str> = lines
        .iter()
        .map(|l| l["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(runs[0], runs[1]);
    assert_ne!(runs[1], runs[2]);
    assert!(runs[2..].iter().all(|r| *r == runs[2]));
}
