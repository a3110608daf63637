//! `riffle verify`: a stream's output checked against the batch result, as a user runs it.
//! The stream output is then tampered with in known ways (a changed value, a lost row, a
//! duplicate, a stranger), and the report must count exactly those.

mod common;

use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, Float64Array, Int64Array, RecordBatch, UInt64Array};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMicrosecondType};
use common::{parquet_files, riffle, riffle_in, text};
use serde_json::Value;

fn run_ok(mut command: std::process::Command) {
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// `riffle generate fraud` with the settings of the pipelines' generator sources, so batch
/// mode reads the rows the stream gets.
fn generate(dir: &Path, rows: u64) {
    let out = riffle_in(
        &[
            "generate",
            "fraud",
            "--rows",
            &rows.to_string(),
            "--events-per-second",
            "2",
            "--cards",
            "500",
            "--out",
            "tx.parquet",
        ],
        dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn pipeline(dir: &Path, name: &str, query: &str, mode: &str, sink: &str, rows: u64) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
query = """{query}"""
output_mode = "{mode}"
[source]
name = "transactions"
event_time = "ts"
watermark = "30 seconds"
batch = "tx.parquet"
stream = {{ kind = "generator", rows = {rows}, events_per_second = 2.0, cards = 500 }}
[[udfs]]
path = "{udf}"
[sink]
{sink}
[stream]
checkpoint = "{name}-checkpoint"
trigger = "available-now"
max_rows_per_epoch = 3000
"#,
            udf = riffle_tests::udf("fraud").display()
        ),
    )
    .unwrap();
    path
}

/// Per-card features: OVER windows and a Wasm UDF, one row per transaction.
const FEATURES: &str = "
SELECT tx_id, card_id, ts, amount,
       round(haversine_km(lat, lon,
                          lag(lat) OVER (PARTITION BY card_id ORDER BY ts, tx_id),
                          lag(lon) OVER (PARTITION BY card_id ORDER BY ts, tx_id)), 3) AS km,
       count(*) OVER (PARTITION BY card_id ORDER BY ts
                      RANGE BETWEEN INTERVAL '1' HOUR PRECEDING AND CURRENT ROW) AS tx_last_hour
FROM transactions";

/// `riffle verify PIPELINE ARGS... --json`: the exit code and the report.
fn verify(pipeline: &Path, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["verify", pipeline.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    let out = riffle_in(&all, pipeline.parent().unwrap());
    let code = out.status.code().unwrap_or(-1);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "exit {code}, no JSON report ({e}): {}{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    (code, report)
}

fn counts(report: &Value) -> [u64; 4] {
    ["matched", "mismatched", "missing", "extra"].map(|k| report[k].as_u64().unwrap())
}

fn read(path: &Path) -> RecordBatch {
    let batches =
        riffle::connectors::files::read_file(path, riffle::common::FileFormat::Parquet, None)
            .unwrap();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn write(path: &Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// `batch` with row 3's amount raised by 0.5, row 10 gone, and two rows added at the end: an
/// exact copy of row 20 (an at-least-once replay) and row 0 under a transaction id nobody
/// has. Returns it and the tampered rows' ids (changed, gone, copied).
fn tamper(batch: &RecordBatch) -> (RecordBatch, [i64; 3]) {
    let n = batch.num_rows() as u64;
    let picks: Vec<u64> = (0..n).filter(|&i| i != 10).chain([20, 0]).collect();
    let taken = arrow::compute::take_record_batch(batch, &UInt64Array::from(picks)).unwrap();
    let schema = taken.schema();
    let ids = taken
        .column_by_name("tx_id")
        .unwrap()
        .as_primitive::<Int64Type>();
    let last = taken.num_rows() - 1;
    let ids: Int64Array = (0..taken.num_rows())
        .map(|i| Some(if i == last { 999_999_999 } else { ids.value(i) }))
        .collect();
    let amounts = taken
        .column_by_name("amount")
        .unwrap()
        .as_primitive::<Float64Type>();
    let amounts: Float64Array = (0..taken.num_rows())
        .map(|i| (!amounts.is_null(i)).then(|| amounts.value(i) + if i == 3 { 0.5 } else { 0.0 }))
        .collect();
    let columns = schema
        .fields()
        .iter()
        .zip(taken.columns())
        .map(|(f, c)| match f.name().as_str() {
            "tx_id" => std::sync::Arc::new(ids.clone()) as _,
            "amount" => std::sync::Arc::new(amounts.clone()) as _,
            _ => c.clone(),
        })
        .collect();
    let id = |i: usize| {
        batch
            .column_by_name("tx_id")
            .unwrap()
            .as_primitive::<Int64Type>()
            .value(i)
    };
    (
        RecordBatch::try_new(schema, columns).unwrap(),
        [id(3), id(10), id(20)],
    )
}

#[test]
fn verify_counts_exactly_the_rows_a_tampered_stream_output_changed() {
    let dir = tempfile::tempdir().unwrap();
    let rows = 20_000;
    generate(dir.path(), rows);
    let p = pipeline(
        dir.path(),
        "features",
        FEATURES,
        "append",
        "stream = \"out\"",
        rows,
    );
    run_ok(riffle(&p, "stream"));
    let files = parquet_files(&dir.path().join("out"));
    assert!(files.len() > 3, "{files:?}");

    // Untouched: every row matches, by key and whole.
    for args in [&["--key", "tx_id"][..], &[]] {
        let (code, report) = verify(&p, args);
        assert_eq!(code, 0, "{report:#}");
        assert_eq!(counts(&report), [rows, 0, 0, 0], "{report:#}");
        assert_eq!(report["stream_rows"], rows, "{report:#}");
    }

    // A range: both sides counted over it, which the test counts itself from the output.
    let (from, to) = (
        1_767_225_600_000_000 + 3_600_000_000,
        1_767_225_600_000_000 + 5_400_000_000,
    );
    let in_range: usize = files
        .iter()
        .map(|f| {
            let b = read(f);
            let ts = b
                .column_by_name("ts")
                .unwrap()
                .as_primitive::<TimestampMicrosecondType>();
            (0..b.num_rows())
                .filter(|&i| (from..to).contains(&ts.value(i)))
                .count()
        })
        .sum();
    assert!(in_range > 1_000, "{in_range}");
    let (code, report) = verify(
        &p,
        &[
            "--from",
            "2026-01-01T01:00:00Z",
            "--to",
            "2026-01-01 01:30:00",
            "--key",
            "tx_id",
        ],
    );
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(counts(&report), [in_range as u64, 0, 0, 0], "{report:#}");
    assert_eq!(report["time_column"], "ts");

    // Tampered: one value changed, one row lost, one duplicated, one added.
    let victim = &files[1];
    let (tampered, [changed, gone, copied]) = tamper(&read(victim));
    write(victim, &tampered);

    let (code, report) = verify(&p, &["--key", "tx_id", "--examples", "3"]);
    assert_eq!(code, 3, "{report:#}");
    assert_eq!(counts(&report), [rows - 2, 1, 1, 2], "{report:#}");
    assert_eq!(report["batch_rows"], rows);
    assert_eq!(report["stream_rows"], rows + 1);
    for column in report["columns"].as_array().unwrap() {
        let name = column["column"].as_str().unwrap();
        if name == "amount" {
            assert_eq!(column["rows"], 1, "{column}");
            let largest = column["largest"].as_f64().unwrap();
            assert!((largest - 0.5).abs() < 1e-9, "{column}");
        } else {
            assert_eq!(column["rows"], 0, "{column}");
        }
    }
    let examples: Vec<(String, String)> = report["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().into(),
                e["row"].as_str().unwrap().into(),
            )
        })
        .collect();
    let has = |kind: &str, needle: &str| {
        examples
            .iter()
            .any(|(k, r)| k == kind && r.contains(needle))
    };
    assert!(
        has("mismatched", &format!("tx_id={changed}; amount ")),
        "{examples:?}"
    );
    assert!(has("missing", &format!("tx_id={gone}")), "{examples:?}");
    assert!(has("extra", &format!("tx_id={copied}")), "{examples:?}");
    assert!(has("extra", "tx_id=999999999"), "{examples:?}");

    // Whole rows: the changed row is one missing and one extra.
    let (code, report) = verify(&p, &[]);
    assert_eq!(code, 3, "{report:#}");
    assert_eq!(counts(&report), [rows - 2, 0, 2, 3], "{report:#}");

    // The text report says the same.
    let out = riffle_in(
        &["verify", p.to_str().unwrap(), "--key", "tx_id"],
        dir.path(),
    );
    let report = text(&out.stdout);
    assert!(
        report.contains(&format!(
            "matched {} · mismatched 1 · missing 1 · extra 2",
            rows - 2
        )),
        "{report}"
    );
    assert!(report.contains("INCONSISTENT"), "{report}");
}

/// Per-country totals, updated every epoch.
const TOTALS: &str =
    "SELECT country, count(*) AS n, sum(amount) AS total FROM transactions GROUP BY country";

#[test]
fn verify_reads_an_update_mode_stream_as_its_last_row_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let rows = 12_000;
    generate(dir.path(), rows);
    let countries = {
        let b = read(&dir.path().join("tx.parquet"));
        let c = arrow::compute::cast(
            b.column_by_name("country").unwrap(),
            &arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let c = c.as_string::<i32>();
        (0..c.len())
            .map(|i| c.is_valid(i).then(|| c.value(i).to_string()))
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u64
    };

    // A Parquet directory: each epoch writes the countries it changed again.
    let p = pipeline(
        dir.path(),
        "totals",
        TOTALS,
        "update",
        "stream = \"out\"",
        rows,
    );
    run_ok(riffle(&p, "stream"));
    let written: usize = parquet_files(&dir.path().join("out"))
        .iter()
        .map(|f| read(f).num_rows())
        .sum();
    assert!(
        written as u64 > countries,
        "{written} rows for {countries} countries"
    );
    let out = riffle_in(&["verify", p.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("give --key"),
        "{}",
        text(&out.stderr)
    );
    // Sums of floats: batch mode adds them in another order.
    let (code, report) = verify(&p, &["--key", "country", "--tolerance", "1e-12"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(counts(&report), [countries, 0, 0, 0], "{report:#}");

    // A Delta table merges on its keys, which verify takes as its own.
    let p = pipeline(
        dir.path(),
        "totals-delta",
        TOTALS,
        "update",
        "stream = { kind = \"delta\", path = \"table\", keys = [\"country\"] }",
        rows,
    );
    run_ok(riffle(&p, "stream"));
    let (code, report) = verify(&p, &["--tolerance", "1e-12"]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(counts(&report), [countries, 0, 0, 0], "{report:#}");
    assert_eq!(report["keys"], serde_json::json!(["country"]));
    assert!(
        report["stream_output"].as_str().unwrap().contains("Delta"),
        "{report:#}"
    );
}

#[test]
fn verify_refuses_what_it_cannot_check_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), 2_000);
    let p = pipeline(
        dir.path(),
        "features",
        FEATURES,
        "append",
        "stream = \"out\"",
        2_000,
    );
    let fails = |args: &[&str], needle: &str| {
        let mut all = vec!["verify", p.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = riffle_in(&all, dir.path());
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stdout)
        );
        let err = text(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    fails(&[], "has the stream run?");
    run_ok(riffle(&p, "stream"));
    fails(
        &["--key", "nope"],
        "key column \"nope\" is not a column of the output",
    );
    fails(
        &["--from", "yesterday"],
        "--from: \"yesterday\" is not a time",
    );
    fails(
        &["--from", "2026-01-02", "--to", "2026-01-01"],
        "--from must be before --to",
    );
    fails(
        &["--from", "2026-01-01", "--time-column", "amount"],
        "--time-column amount: a Float64 column, not a timestamp",
    );
    let console = pipeline(
        dir.path(),
        "console",
        FEATURES,
        "append",
        "stream = \"console\"",
        10,
    );
    let out = riffle_in(&["verify", console.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("nothing to verify"),
        "{}",
        text(&out.stderr)
    );
}
