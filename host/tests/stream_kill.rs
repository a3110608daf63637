//! Real `riffle run --mode stream` processes crash and restart from their checkpoint; the output
//! must equal batch mode over the same rows, with every row exactly once.
//!
//! Crashes are placed by failpoints (`RIFFLE_CRASH=<point>:<epoch>`, an abort as abrupt as
//! `kill -9`) at each step of the epoch protocol in turn, so every step is hit on every run
//! whatever the machine's speed. Stateful queries (an interval join of two streams and per-card
//! OVER features) show that state, not only offsets, survives, also when the restart runs
//! the operators in another number of partitions. A last smoke test also kills a process at
//! random moments with SIGKILL.

mod common;

use common::riffle;

use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use riffle::common::FileFormat;
use riffle::connectors::files::{read_file, write_file};
use riffle::connectors::generate::{FraudConfig, FraudGenerator};

const TX_ROWS: usize = 12_000;
const LOGIN_ROWS: usize = 5_000;

fn tx_config() -> FraudConfig {
    FraudConfig {
        rows_per_second: 5.0,
        cards: 300,
        max_disorder_micros: 3_000_000,
        duplicate_rate: 0.01,
        ..FraudConfig::default()
    }
}

fn login_config() -> FraudConfig {
    FraudConfig {
        seed: 7,
        rows_per_second: 2.0,
        cards: 300,
        max_disorder_micros: 3_000_000,
        ..FraudConfig::default()
    }
}

/// Writes the rows both generators deliver to Parquet (the batch run's input): a generator
/// source produces exactly these rows, whatever the epochs it reads them in.
fn write_inputs(dir: &Path) {
    let tx = FraudGenerator::new(tx_config()).next_batch_of_ids(TX_ROWS);
    write_file(&dir.join("transactions.parquet"), tx.schema(), [tx]).unwrap();
    let logins = FraudGenerator::new(login_config()).next_batch_of_ids(LOGIN_ROWS);
    write_file(&dir.join("logins.parquet"), logins.schema(), [logins]).unwrap();
}

fn pipeline(dir: &Path, name: &str, query: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let udf = riffle_tests::udf("fraud");
    std::fs::write(
        &path,
        format!(
            r#"
query = """{query}"""
output_mode = "append"

[sources.transactions]
event_time = "ts"
watermark = "10 seconds"
batch = "transactions.parquet"
stream = {{ kind = "generator", rows = {TX_ROWS}, events_per_second = 5.0, cards = 300, disorder = "3 seconds", duplicates = 0.01 }}

[sources.logins]
event_time = "ts"
watermark = "10 seconds"
batch = "logins.parquet"
stream = {{ kind = "generator", seed = 7, rows = {LOGIN_ROWS}, events_per_second = 2.0, cards = 300, disorder = "3 seconds" }}

[[udfs]]
path = "{udf}"

[[udfs]]
path = "{sketch}"

[sink]
batch = "{name}-batch.parquet"
stream = "{name}-out"

[stream]
checkpoint = "{name}-ckpt"
trigger = "available-now"
max_rows_per_epoch = 500
"#,
            udf = udf.display(),
            sketch = riffle_tests::udf("sketch").display()
        ),
    )
    .unwrap();
    path
}

/// Every row of `batches` as text, sorted: the output compared as a multiset.
fn lines(batches: &[RecordBatch]) -> Vec<String> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for b in batches {
        let formatters: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for row in 0..b.num_rows() {
            out.push(
                formatters
                    .iter()
                    .map(|f| f.value(row).to_string())
                    .collect::<Vec<_>>()
                    .join("|"),
            );
        }
    }
    out.sort();
    out
}

fn read_dir(dir: &Path) -> Vec<RecordBatch> {
    common::parquet_files(dir)
        .iter()
        .flat_map(|p| read_file(p, FileFormat::Parquet, None).unwrap())
        .collect()
}

/// Runs the stream, crashing at each failpoint in turn, then to the end; returns its output.
/// The runs take turns at 1, 2 and 3 partitions, so every restart changes the number and
/// state has to find the instances of its keys.
fn crash_and_finish(pipeline: &Path, name: &str, crashes: &[Crash]) -> Vec<String> {
    for (run, crash) in crashes.iter().enumerate() {
        let (point, epoch) = (crash.point, crash.epoch);
        let mut command = riffle(pipeline, "stream");
        command
            .args(["--partitions", &(run % 3 + 1).to_string()])
            .env("RIFFLE_CRASH", format!("{point}:{epoch}"));
        if let Some(held) = crash.held_commit {
            command.env("RIFFLE_HANG", format!("commit:{held}"));
        }
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("RIFFLE_CRASH: aborting"),
            "{name}: the run was to crash {point} epoch {epoch}: {stderr}"
        );
        if let Some(held) = crash.held_commit {
            assert!(
                stderr.contains(&format!("RIFFLE_HANG: holding commit epoch {held}")),
                "{name}: {stderr}"
            );
            let checkpoint = pipeline.parent().unwrap().join(format!("{name}-ckpt"));
            let epochs = |sub: &str| -> Vec<u64> {
                let mut e: Vec<u64> = std::fs::read_dir(checkpoint.join(sub))
                    .unwrap()
                    .filter_map(|f| f.unwrap().file_name().to_str()?.get(..10)?.parse().ok())
                    .collect();
                e.sort();
                e
            };
            assert_eq!(
                epochs("commits").last(),
                Some(&(held - 1)),
                "{name}: the commits from epoch {held} on were held"
            );
            let planned = epochs("offsets");
            assert!(
                (held..epoch).all(|e| planned.contains(&e)),
                "{name}: epochs {held} to {} planned before the crash: {planned:?}",
                epoch - 1
            );
        }
    }
    let last = (crashes.len() % 3 + 1).to_string();
    let out = riffle(pipeline, "stream")
        .args(["--partitions", &last])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines(&read_dir(
        &pipeline.parent().unwrap().join(format!("{name}-out")),
    ))
}

fn batch(pipeline: &Path, name: &str) -> Vec<String> {
    let out = riffle(pipeline, "batch").output().unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines(
        &read_file(
            &pipeline
                .parent()
                .unwrap()
                .join(format!("{name}-batch.parquet")),
            FileFormat::Parquet,
            None,
        )
        .unwrap(),
    )
}

/// Each step of the epoch protocol, each hit at a different epoch (the crashed epoch is then
/// replayed by the next run).
const CRASHES: &[Crash] = &[
    Crash::at("after-plan", 2),
    Crash::at("after-state", 4),
    Crash::at("after-sink", 6),
    Crash::at("before-commit", 7),
    Crash::at("after-commit", 8),
    // Epochs 11 and 12 are planned and not committed too: the next run replays all three.
    Crash::at("after-sink", 13).with_commits_held_from(11),
    Crash::at("after-state", 21),
];

/// Where a run crashes.
struct Crash {
    point: &'static str,
    epoch: u64,
    /// The commit writer holds this epoch's commit, as a slow disk would, while the run goes
    /// on to the crash.
    held_commit: Option<u64>,
}

impl Crash {
    const fn at(point: &'static str, epoch: u64) -> Self {
        Crash {
            point,
            epoch,
            held_commit: None,
        }
    }

    const fn with_commits_held_from(mut self, epoch: u64) -> Self {
        self.held_commit = Some(epoch);
        self
    }
}

#[test]
fn an_interval_join_survives_a_crash_at_every_step_of_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let query = "SELECT t.tx_id, t.ts, t.amount, l.tx_id AS login, l.country AS login_country \
                 FROM transactions t LEFT JOIN logins l ON t.card_id = l.card_id \
                 AND l.ts BETWEEN t.ts - INTERVAL '2' MINUTE AND t.ts + INTERVAL '30' SECOND";
    let p = pipeline(dir.path(), "join", query);
    let expected = batch(&p, "join");
    assert!(expected.len() > TX_ROWS, "{} joined rows", expected.len());
    assert!(
        expected.iter().any(|l| l.ends_with("NULL|NULL")),
        "some transactions have no login"
    );
    let got = crash_and_finish(&p, "join", CRASHES);
    assert_eq!(got.len(), expected.len(), "rows after the crashes");
    assert!(got == expected, "the same rows as batch mode, each once");
}

#[test]
fn over_window_features_survive_a_crash_at_every_step_of_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let query = "SELECT tx_id, ts, \
                 haversine_km(lat, lon, lag(lat) OVER (PARTITION BY card_id ORDER BY ts, tx_id), \
                              lag(lon) OVER (PARTITION BY card_id ORDER BY ts, tx_id)) AS km, \
                 count(*) OVER (PARTITION BY card_id ORDER BY ts \
                                RANGE BETWEEN INTERVAL '1' HOUR PRECEDING AND CURRENT ROW) AS n_1h, \
                 avg(amount) OVER (PARTITION BY card_id ORDER BY ts \
                                   RANGE BETWEEN INTERVAL '30' MINUTE PRECEDING AND CURRENT ROW) AS avg_30m \
                 FROM transactions";
    let p = pipeline(dir.path(), "over", query);
    let expected = batch(&p, "over");
    assert!(expected.len() >= TX_ROWS, "{} rows", expected.len());
    let got = crash_and_finish(&p, "over", CRASHES);
    assert_eq!(got.len(), expected.len(), "rows after the crashes");
    assert!(
        got == expected,
        "the same features as batch mode, bit for bit"
    );
}

/// A Wasm aggregate's state (a quantile sketch per window and country) is checkpointed and
/// restored as the columns the module declared. The sketch's answer depends only on the
/// multiset of values, so the comparison with batch mode is exact.
#[test]
fn wasm_aggregate_state_survives_a_crash_at_every_step_of_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let query = "SELECT window(ts, '1 minute') AS w, country, count(*) AS n, \
                 dd_quantile(amount, 0.9) AS p90, dd_quantile(amount, 0.1) AS p10 \
                 FROM transactions GROUP BY window(ts, '1 minute'), country";
    let p = pipeline(dir.path(), "agg", query);
    let expected = batch(&p, "agg");
    assert!(expected.len() > 100, "{} windows", expected.len());
    let got = crash_and_finish(&p, "agg", CRASHES);
    assert_eq!(got.len(), expected.len(), "windows after the crashes");
    assert!(
        got == expected,
        "the same quantiles as batch mode, each window once"
    );
}

/// A smoke test of real SIGKILLs at whatever moment they land (possibly none, on a fast
/// machine: only the result is checked).
#[test]
fn sigkill_at_random_moments_keeps_every_row_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let query = "SELECT window(ts, '1 minute') AS w, country, count(*) AS n, \
                 max(risk_score(amount, country)) AS worst \
                 FROM transactions GROUP BY window(ts, '1 minute'), country";
    let p = pipeline(dir.path(), "kill", query);
    let expected = batch(&p, "kill");
    for k in 0..4u64 {
        let mut child = riffle(&p, "stream").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(150 + 90 * k));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let got = crash_and_finish(&p, "kill", &[]);
    assert!(got == expected, "the same windows as batch mode, each once");
}

/// A full disk under the checkpoint and the sink: the run says so, waits, and once space is
/// back resumes from its checkpoint; what was committed before is intact and the output equals
/// batch. The file system is a small tmpfs this test mounts (it needs root, as in CI).
#[test]
fn a_full_disk_stops_nothing_for_good_and_loses_nothing() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let full = dir.path().join("small-disk");
    std::fs::create_dir(&full).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&full)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "this test mounts a 4 MiB tmpfs at {} and needs root to do so",
        full.display()
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(full.clone());
    let query = "SELECT tx_id, ts, card_id, amount, \
                 count(*) OVER (PARTITION BY card_id ORDER BY ts \
                                RANGE BETWEEN INTERVAL '1' HOUR PRECEDING AND CURRENT ROW) AS n_1h \
                 FROM transactions";
    let p = pipeline(dir.path(), "disk", query);
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("stream = \"disk-out\"", "stream = \"small-disk/out\"")
        .replace(
            "checkpoint = \"disk-ckpt\"",
            "checkpoint = \"small-disk/ckpt\"",
        );
    std::fs::write(&p, text).unwrap();
    let expected = batch(&p, "disk");
    // All but 150 KiB taken: the run fills the rest within a few epochs.
    let filler = full.join("filler");
    std::fs::write(&filler, vec![7u8; 4 * 1024 * 1024 - 150 * 1024]).unwrap();

    let mut run = riffle(&p, "stream").spawn().unwrap();
    let stderr = BufReader::new(run.stderr.take().unwrap());
    let mut said = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.starts_with("riffle: waiting:") && filler.exists() {
            // Space comes back while the run waits.
            std::fs::remove_file(&filler).unwrap();
        }
        said.push(line);
    }
    let status = run.wait().unwrap();
    for line in said.iter().filter(|l| l.starts_with("riffle:")) {
        eprintln!("{line}");
    }
    let said = said.join("\n");
    assert!(status.success(), "{said}");
    assert!(
        said.contains("riffle: waiting:") && said.contains("No space left on device"),
        "a clear error while the disk is full: {said}"
    );
    assert!(!filler.exists(), "the disk did fill up");
    let got = lines(&read_dir(&full.join("out")));
    assert_eq!(got.len(), expected.len(), "rows after the disk filled up");
    assert!(got == expected, "the same rows as batch mode, each once");
}
