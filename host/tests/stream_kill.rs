//! A real `riffle run --mode stream` process is killed with SIGKILL mid-run, several times, and
//! restarted from its checkpoint; the Parquet output must hold every expected row exactly once.

mod common;

use common::riffle;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::Int64Type;
use riffle::connectors::source::read_file;
use riffle::session::FileFormat;

fn pipeline(dir: &Path, query: &str, mode: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{mode}.toml"));
    let udf = riffle_tests::udf("fraud");
    std::fs::write(
        &path,
        format!(
            r#"
query = """{query}"""
output_mode = "append"
[source]
name = "transactions"
event_time = "ts"
watermark = "30 seconds"
batch = "raw"
[source.stream]
kind = "generator"
rows = 60000
rows_per_second = 40000
events_per_second = 50
disorder = "5 seconds"
duplicates = 0.01
[[udfs]]
path = "{udf}"
[sink]
batch = "{mode}-batch.parquet"
stream = "{mode}-out"
[stream]
checkpoint = "{mode}-ckpt"
trigger = "processing-time"
interval = "50 milliseconds"
"#,
            udf = udf.display()
        ),
    )
    .unwrap();
    path
}

fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    read_file(path, FileFormat::Parquet, None).unwrap()
}

fn read_dir(dir: &Path) -> Vec<RecordBatch> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    files.iter().flat_map(|p| read_parquet(p)).collect()
}

#[test]
fn kill_9_and_restart_writes_every_row_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let query = "SELECT tx_id, ts, amount, risk_score(amount, country) AS risk \
                 FROM transactions WHERE amount > 0";
    let stream = pipeline(dir.path(), query, "stream");
    let mut kills = 0;
    let started = Instant::now();
    loop {
        let mut child = riffle(&stream, "stream").spawn().unwrap();
        // Let it run a random-ish while (varied by attempt), then SIGKILL it mid-epoch.
        std::thread::sleep(Duration::from_millis(300 + 170 * kills));
        match child.try_wait().unwrap() {
            Some(status) => {
                let out = child.wait_with_output().unwrap();
                assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                break;
            }
            None if kills < 4 => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
            }
            None => {
                let out = child.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "stream never finished"
        );
    }
    assert!(
        kills >= 2,
        "the run finished before it could be killed twice"
    );

    // The expected rows: the same pipeline's source dumped raw, then the query in batch mode.
    let raw = pipeline(dir.path(), "SELECT * FROM transactions", "raw");
    let out = riffle(&raw, "stream").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(dir.path().join("raw-out"), dir.path().join("raw")).unwrap();
    let out = riffle(&stream, "batch").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = read_parquet(&dir.path().join("stream-batch.parquet"));

    let count = |batches: &[RecordBatch]| {
        let mut m: HashMap<(i64, i64), usize> = HashMap::new();
        for b in batches {
            let ids = b.column(0).as_primitive::<Int64Type>();
            let ts = b
                .column(1)
                .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
            for i in 0..b.num_rows() {
                *m.entry((ids.value(i), ts.value(i))).or_default() += 1;
            }
        }
        m
    };
    let got = count(&read_dir(&dir.path().join("stream-out")));
    let want = count(&expected);
    assert!(want.len() > 50_000, "{}", want.len());
    assert_eq!(got.len(), want.len(), "distinct rows after {kills} kills");
    // Duplicated deliveries in the source appear twice in both; nothing else may.
    assert_eq!(got, want, "each row exactly as often as in batch mode");
}
