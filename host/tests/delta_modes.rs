//! Delta sinks in update mode (merge on keys) and complete mode (overwrite), with a crash whose
//! epoch is replayed, read back by the independent `deltalake` Python package; and the Delta
//! batch source with time travel.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type};
use datafusion::datasource::MemTable;
use riffle::common::OutputMode;
use riffle::connectors::delta::{AsOf, DeltaSink, register};
use riffle::connectors::generate::{FraudConfig, FraudGenerator};
use riffle::connectors::memory::ReplaySource;
use riffle::session::{RiffleSession, SessionOptions};
use riffle::stream::{StreamInput, StreamOptions, StreamingQuery, Trigger};

/// The generator leaves some countries NULL: that group must be merged in place like any other.
const QUERY: &str = "SELECT country, count(*) AS n, sum(amount) AS total \
                     FROM transactions GROUP BY country";

/// How a NULL country shows in the maps below.
const NULL: &str = "<null>";

/// country → (n, total) as `deltalake` (Python) reads the table.
fn python_rows(table: &Path) -> BTreeMap<String, (i64, f64)> {
    let columns = common::python_delta_columns(table, &["country", "n", "total"]);
    let (c, n, t): (Vec<Option<String>>, Vec<i64>, Vec<i64>) =
        serde_json::from_value(columns).unwrap();
    let mut rows = BTreeMap::new();
    for ((c, n), t) in c.into_iter().zip(n).zip(t) {
        let c = c.unwrap_or_else(|| NULL.to_string());
        let total = f64::from_bits(t as u64);
        assert!(rows.insert(c.clone(), (n, total)).is_none(), "{c} twice");
    }
    rows
}

fn rows_of(batches: &[RecordBatch]) -> BTreeMap<String, (i64, f64)> {
    let mut rows = BTreeMap::new();
    for b in batches {
        // Delta reads may give views: compare as plain strings.
        let c = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let c = c.as_string::<i32>();
        let n = b.column(1).as_primitive::<Int64Type>();
        let t = b.column(2).as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let total = if t.is_null(i) { 0.0 } else { t.value(i) };
            let country = if c.is_null(i) { NULL } else { c.value(i) };
            rows.insert(country.to_string(), (n.value(i), total));
        }
    }
    rows
}

/// Equal counts; sums equal up to summation order.
fn assert_same(got: &BTreeMap<String, (i64, f64)>, want: &BTreeMap<String, (i64, f64)>) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, (n, t)) in want {
        let (gn, gt) = got[k];
        assert_eq!(gn, *n, "{k}");
        assert!(
            (gt - t).abs() <= 1e-9 * t.abs().max(1.0),
            "{k}: {gt} vs {t}"
        );
    }
}

fn session() -> RiffleSession {
    RiffleSession::new(SessionOptions::default()).unwrap()
}

/// Streams `batches` into a Delta table, stopping after 2 epochs and forgetting that epoch's
/// commit (so it is replayed into a table that already holds it), then running to the end.
async fn stream_into(table: &Path, mode: OutputMode, batches: &[RecordBatch], checkpoint: &Path) {
    for (max_epochs, forget) in [(Some(2), true), (None, false)] {
        let session = session();
        let source = ReplaySource::new(batches[0].schema(), batches.to_vec());
        let input = StreamInput::register(&session, "transactions", Box::new(source)).unwrap();
        let plan = session
            .context()
            .state()
            .create_logical_plan(QUERY)
            .await
            .unwrap();
        let sink = DeltaSink::new(&table.to_string_lossy(), mode, vec!["country".into()]).unwrap();
        let mut query = StreamingQuery::new(
            &session,
            vec![input],
            plan,
            Box::new(sink),
            StreamOptions {
                output_mode: mode,
                trigger: Trigger::AvailableNow,
                checkpoint: checkpoint.to_path_buf(),
                max_epochs,
                ..StreamOptions::default()
            },
        )
        .await
        .unwrap();
        query.run(&AtomicBool::new(false)).await.unwrap();
        if forget {
            std::fs::remove_file(checkpoint.join("commits/0000000002.json")).unwrap();
        }
    }
}

#[test]
fn update_and_complete_modes_merge_and_overwrite_exactly_once() {
    let rt = common::runtime();
    let all = FraudGenerator::new(FraudConfig::default()).next_batch(20_000);
    let batches: Vec<RecordBatch> = (0..5).map(|i| all.slice(i * 4_000, 4_000)).collect();
    rt.block_on(async {
        let s = session();
        s.context()
            .register_table(
                "transactions",
                Arc::new(MemTable::try_new(all.schema(), vec![vec![all.clone()]]).unwrap()),
            )
            .unwrap();
        let want = rows_of(&s.sql(QUERY).await.unwrap());
        assert!(want.len() >= 8);
        assert!(want.contains_key(NULL), "the data has a NULL key to merge");

        let dir = tempfile::tempdir().unwrap();
        for (mode, name) in [
            (OutputMode::Update, "update"),
            (OutputMode::Complete, "complete"),
        ] {
            let table = dir.path().join(format!("{name}-table"));
            stream_into(
                &table,
                mode,
                &batches,
                &dir.path().join(format!("{name}-ckpt")),
            )
            .await;
            assert_same(&python_rows(&table), &want);
        }

        // Time travel: version 0 of the update-mode table is the first epoch's groups only.
        let first = {
            let s = session();
            let b = batches[0].clone();
            s.context()
                .register_table(
                    "transactions",
                    Arc::new(MemTable::try_new(b.schema(), vec![vec![b]]).unwrap()),
                )
                .unwrap();
            rows_of(&s.sql(QUERY).await.unwrap())
        };
        let s = session();
        let table = dir.path().join("update-table");
        register(s.context(), "v0", &table, &AsOf::Version(0))
            .await
            .unwrap();
        register(s.context(), "latest", &table, &AsOf::Latest)
            .await
            .unwrap();
        let v0 = rows_of(&s.sql("SELECT country, n, total FROM v0").await.unwrap());
        assert_same(&v0, &first);
        let latest = rows_of(&s.sql("SELECT country, n, total FROM latest").await.unwrap());
        assert_same(&latest, &want);
    });
}

#[test]
fn update_mode_keeps_the_last_row_of_a_key_updated_twice_in_one_epoch() {
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use riffle::connectors::sink::Sink;
    let rt = common::runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("t");
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("country", arrow::datatypes::DataType::Utf8, true),
            arrow::datatypes::Field::new("n", arrow::datatypes::DataType::Int64, false),
            arrow::datatypes::Field::new("total", arrow::datatypes::DataType::Float64, true),
        ]));
        let batch = |c: Vec<Option<&str>>, n: Vec<i64>| {
            let totals: Vec<f64> = n.iter().map(|&n| n as f64).collect();
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(c)),
                    Arc::new(Int64Array::from(n)),
                    Arc::new(Float64Array::from(totals)),
                ],
            )
            .unwrap()
        };
        let mut sink = DeltaSink::new(
            &table.to_string_lossy(),
            OutputMode::Update,
            vec!["country".into()],
        )
        .unwrap();
        sink.start("q").await.unwrap();
        // The first epoch creates the table, with `a` twice.
        sink.write_epoch(
            1,
            &schema,
            &[batch(vec![Some("a"), Some("b"), Some("a")], vec![0, 2, 1])],
        )
        .await
        .unwrap();
        // Two updates of `a` and of NULL in one epoch, split over two batches.
        sink.write_epoch(
            2,
            &schema,
            &[
                batch(vec![Some("a"), None], vec![3, 4]),
                batch(vec![Some("a"), None], vec![5, 6]),
            ],
        )
        .await
        .unwrap();
        sink.write_epoch(3, &schema, &[batch(vec![None], vec![7])])
            .await
            .unwrap();
        let got = python_rows(&table);
        let want: BTreeMap<String, (i64, f64)> = [("a", 5), ("b", 2), (NULL, 7)]
            .into_iter()
            .map(|(c, n)| (c.to_string(), (n, n as f64)))
            .collect();
        assert_eq!(got, want);
    });
}

/// Runs the backfill pipeline in `dir` (batch mode, with `extra` arguments); returns stderr.
fn backfill(dir: &Path, extra: &[&str]) -> String {
    let out = common::riffle(&dir.join("backfill.toml"), "batch")
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

fn python_tx_ids(table: &Path) -> Vec<i64> {
    let columns = common::python_delta_columns(table, &["tx_id"]);
    let (ids,): (Vec<i64>,) = serde_json::from_value(columns).unwrap();
    ids
}

#[test]
fn a_backfill_into_delta_is_written_once_per_query_inputs_and_run_name() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut generator = FraudGenerator::new(FraudConfig::default());
    let input = dir.path().join("history");
    let first = generator.next_batch(1_000);
    rt.block_on(riffle::connectors::delta::append(
        &input.to_string_lossy(),
        vec![first.clone()],
        "fixture-1",
        Vec::new(),
    ))
    .unwrap();
    std::fs::write(
        dir.path().join("backfill.toml"),
        r#"
query = "SELECT tx_id, amount FROM transactions WHERE amount > 50"
[source]
name = "transactions"
batch = "history"
[sink]
batch = { kind = "delta", path = "scores" }
"#,
    )
    .unwrap();
    let scores = dir.path().join("scores");
    let selected = |b: &RecordBatch| -> usize {
        let amount = b
            .column_by_name("amount")
            .unwrap()
            .as_primitive::<Float64Type>();
        amount
            .iter()
            .filter(|a| a.is_some_and(|a| a > 50.0))
            .count()
    };
    let n = selected(&first);
    assert!(n > 100);

    let said = backfill(dir.path(), &[]);
    assert!(said.contains(&format!("appended {n} rows")), "{said}");
    let run_id = said
        .split("batch run ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap()
        .to_string();
    assert_eq!(python_tx_ids(&scores).len(), n);

    // The same run again (a retry after a crash that followed the commit): nothing written.
    let said = backfill(dir.path(), &[]);
    assert!(said.contains("nothing written"), "{said}");
    assert!(said.contains(&run_id), "{said}");
    assert_eq!(python_tx_ids(&scores).len(), n, "a rerun adds no rows");

    // A new run name writes the rows again, on purpose.
    let said = backfill(dir.path(), &["--run-name", "again"]);
    assert!(said.contains(&format!("appended {n} rows")), "{said}");
    assert_eq!(python_tx_ids(&scores).len(), 2 * n);

    // New input data (a new version of the input table) is a new run.
    let second = generator.next_batch(500);
    rt.block_on(riffle::connectors::delta::append(
        &input.to_string_lossy(),
        vec![second.clone()],
        "fixture-2",
        Vec::new(),
    ))
    .unwrap();
    let m = n + selected(&second);
    let said = backfill(dir.path(), &[]);
    assert!(said.contains(&format!("appended {m} rows")), "{said}");
    assert!(!said.contains(&run_id), "a new id: {said}");
    let said = backfill(dir.path(), &[]);
    assert!(said.contains("nothing written"), "{said}");
    assert_eq!(python_tx_ids(&scores).len(), 2 * n + m);
}

#[test]
fn a_second_process_on_the_same_query_fences_the_first_one_off() {
    use riffle::connectors::sink::Sink;
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("fenced");
    let location = table.to_string_lossy().to_string();
    let rows = FraudGenerator::new(FraudConfig::default()).next_batch(300);
    let schema = rows.schema();
    let epoch = |i: usize| [rows.slice(i * 100, 100)];
    rt.block_on(async {
        let mut first = DeltaSink::new(&location, OutputMode::Append, Vec::new()).unwrap();
        first.start("query-1").await.unwrap();
        first.write_epoch(1, &schema, &epoch(0)).await.unwrap();
        // A successor takes over the query (the first process hung, it did not die).
        let mut second = DeltaSink::new(&location, OutputMode::Append, Vec::new()).unwrap();
        second.start("query-1").await.unwrap();
        second.write_epoch(2, &schema, &epoch(1)).await.unwrap();
        // The first wakes up and goes on: refused, nothing written.
        let e = first
            .write_epoch(2, &schema, &epoch(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("fenced"), "{e}");
        assert!(e.contains("another process committed epoch 2"), "{e}");
        second.write_epoch(3, &schema, &epoch(2)).await.unwrap();
    });
    let columns = common::python_delta_columns(&table, &["tx_id"]);
    let (mut ids,): (Vec<i64>,) = serde_json::from_value(columns).unwrap();
    ids.sort_unstable();
    let mut want: Vec<i64> = rows
        .column_by_name("tx_id")
        .unwrap()
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    want.sort_unstable();
    assert_eq!(ids, want, "each epoch once");
}
