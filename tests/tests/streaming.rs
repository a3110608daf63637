//! Golden streaming queries: each runs (1) in batch over all rows, (2) streaming over the same
//! rows replayed in random batch sizes with bounded disorder (a property test), and (3)
//! streaming with a crash and restart from the checkpoint at a random epoch. All three must give
//! the same final rows.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use proptest::prelude::*;
use riffle::connectors::generator::{FraudConfig, FraudGenerator};
use riffle::connectors::sink::MemorySink;
use riffle::connectors::source::ReplaySource;
use riffle::exec::OutputMode;
use riffle::session::RiffleSession;
use riffle::stream::{StreamInput, StreamOptions, StreamingQuery, Trigger};
use riffle::udf::RowErrorPolicy;

struct Golden {
    name: &'static str,
    sql: &'static str,
    mode: OutputMode,
    /// Columns identifying a result row (update mode keeps the last version per key).
    key_columns: usize,
}

const GOLDEN: &[Golden] = &[
    Golden {
        name: "tumbling window with UDF inside aggregates",
        sql: "SELECT window(ts, '1 minute') AS w, country, count(*) AS n, sum(amount) AS total, \
              min(amount) AS lo, max(amount) AS hi, avg(amount) AS mean, \
              max(risk_score(amount, country)) AS worst \
              FROM transactions GROUP BY window(ts, '1 minute'), country",
        mode: OutputMode::Append,
        key_columns: 2,
    },
    Golden {
        name: "hopping window with exact distinct count",
        sql: "SELECT window(ts, '2 minutes', '30 seconds') AS w, channel, count(*) AS n, \
              count(DISTINCT card_id) AS cards, approx_distinct(merchant_id) AS merchants \
              FROM transactions WHERE amount > 0 \
              GROUP BY window(ts, '2 minutes', '30 seconds'), channel",
        mode: OutputMode::Append,
        key_columns: 2,
    },
    Golden {
        name: "session windows per key",
        sql: "SELECT session_window(ts, '20 seconds') AS s, card_id % 40 AS k, count(*) AS n, \
              sum(amount) AS total \
              FROM transactions GROUP BY session_window(ts, '20 seconds'), card_id % 40",
        mode: OutputMode::Append,
        key_columns: 2,
    },
    Golden {
        name: "keyed global aggregation in update mode",
        sql: "SELECT country, count(*) AS n, approx_distinct(card_id) AS cards, \
              sum(amount) AS total, max(haversine_km(lat, lon, home_lat, home_lon)) AS far \
              FROM transactions GROUP BY country HAVING count(*) > 10",
        mode: OutputMode::Update,
        key_columns: 1,
    },
    Golden {
        name: "de-duplication",
        sql: "SELECT DISTINCT tx_id, ts, card_id, amount FROM transactions",
        mode: OutputMode::Append,
        key_columns: 4,
    },
    Golden {
        name: "stream-static enrichment join with UDF projection",
        sql: "SELECT t.tx_id, t.amount, m.category, risk_score(t.amount, t.country) AS risk \
              FROM transactions t JOIN merchants m ON t.merchant_id = m.merchant_id \
              WHERE t.amount > 200",
        mode: OutputMode::Append,
        key_columns: 4,
    },
];

fn rows() -> RecordBatch {
    FraudGenerator::new(FraudConfig {
        rows_per_second: 20.0,
        max_disorder_micros: 3_000_000,
        duplicate_rate: 0.02,
        merchants: 50,
        ..FraudConfig::default()
    })
    .next_batch_of_ids(6_000)
}

fn merchants() -> RecordBatch {
    let ids: Vec<i64> = (0..50).filter(|i| i % 5 != 0).collect();
    let categories: Vec<String> = ids.iter().map(|i| format!("cat-{}", i % 7)).collect();
    RecordBatch::try_from_iter(vec![
        (
            "merchant_id",
            Arc::new(arrow::array::Int64Array::from(ids)) as _,
        ),
        (
            "category",
            Arc::new(arrow::array::StringArray::from(categories)) as _,
        ),
    ])
    .unwrap()
}

fn session() -> RiffleSession {
    let session = common::session(RowErrorPolicy::Null);
    session
        .load_udfs(&common::udf("fraud"), Vec::new(), None)
        .unwrap();
    let m = merchants();
    common::register_batch(&session, "merchants", &m);
    session
}

/// A result cell: floats compare with a relative tolerance (sums differ in the last bits
/// with summation order); everything else by its display text.
#[derive(Clone, Debug, PartialEq, PartialOrd)]
enum Cell {
    Text(String),
    Float(f64),
}

type Rows = Vec<Vec<Cell>>;

fn canonical(batches: &[RecordBatch]) -> Rows {
    let mut out = Vec::new();
    for b in batches {
        let columns: Vec<Vec<Cell>> = b
            .columns()
            .iter()
            .map(|c| {
                if c.data_type() == &DataType::Float64 {
                    let f = c.as_primitive::<Float64Type>();
                    (0..f.len())
                        .map(|i| {
                            if f.is_null(i) {
                                Cell::Text("NULL".into())
                            } else {
                                Cell::Float(f.value(i))
                            }
                        })
                        .collect()
                } else {
                    let fmt =
                        ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default()).unwrap();
                    (0..c.len())
                        .map(|i| Cell::Text(fmt.value(i).to_string()))
                        .collect()
                }
            })
            .collect();
        for r in 0..b.num_rows() {
            out.push(columns.iter().map(|c| c[r].clone()).collect());
        }
    }
    out.sort_by(|a: &Vec<Cell>, b: &Vec<Cell>| a.partial_cmp(b).unwrap());
    out
}

fn same(a: &Rows, b: &Rows) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{} rows vs {} rows", a.len(), b.len()));
    }
    for (x, y) in a.iter().zip(b) {
        let close = x.len() == y.len()
            && x.iter().zip(y).all(|(p, q)| match (p, q) {
                (Cell::Float(p), Cell::Float(q)) => {
                    (p - q).abs() <= 1e-9 * p.abs().max(q.abs()).max(1.0)
                }
                _ => p == q,
            });
        if !close {
            return Err(format!("first difference: {x:?} vs {y:?}"));
        }
    }
    Ok(())
}

async fn batch_result(g: &Golden, all: &RecordBatch) -> Rows {
    let session = session();
    common::register_batch(&session, "transactions", all);
    let batches = session
        .dataframe(g.sql)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    canonical(&batches)
}

/// Final rows of a streaming run's output, epoch by epoch, for the output mode.
fn final_rows(g: &Golden, sink: &MemorySink) -> Rows {
    match g.mode {
        OutputMode::Append => canonical(&sink.batches()),
        OutputMode::Update => {
            let mut latest = BTreeMap::new();
            for (_, batches) in sink.epochs() {
                for row in canonical(&batches) {
                    latest.insert(format!("{:?}", &row[..g.key_columns]), row);
                }
            }
            let mut rows: Rows = latest.into_values().collect();
            rows.sort_by(|a, b| a.partial_cmp(b).unwrap());
            rows
        }
        OutputMode::Complete => sink
            .epochs()
            .into_values()
            .last()
            .map(|b| canonical(&b))
            .unwrap_or_default(),
    }
}

fn split(all: &RecordBatch, cuts: &[usize]) -> Vec<RecordBatch> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % all.num_rows()).collect();
    points.push(0);
    points.push(all.num_rows());
    points.sort();
    points.dedup();
    points
        .windows(2)
        .map(|w| all.slice(w[0], w[1] - w[0]))
        .collect()
}

/// Streams `batches`; with `crash_after`, stops after that many epochs, optionally forgets the
/// last commit (a crash between sink write and commit), and restarts from the checkpoint.
async fn stream_result(
    g: &Golden,
    batches: Vec<RecordBatch>,
    crash_after: Option<(u64, bool)>,
) -> Rows {
    let dir = tempfile::tempdir().unwrap();
    let sink = MemorySink::default();
    let schema = FraudGenerator::schema();
    let mut runs = vec![crash_after.map(|(n, _)| n), None];
    if crash_after.is_none() {
        runs.pop();
    }
    for max_epochs in runs {
        let session = session();
        let input = StreamInput::register(
            &session,
            "transactions",
            Box::new(ReplaySource::new(schema.clone(), batches.clone())),
        )
        .unwrap();
        let plan = session
            .context()
            .state()
            .create_logical_plan(g.sql)
            .await
            .unwrap();
        let options = StreamOptions {
            event_time: Some("ts".into()),
            watermark_delay: 10_000_000,
            output_mode: g.mode,
            trigger: Trigger::AvailableNow,
            checkpoint: dir.path().to_path_buf(),
            max_epochs,
            ..StreamOptions::default()
        };
        let mut query = StreamingQuery::new(&session, input, plan, Box::new(sink.clone()), options)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", g.name));
        let summary = query.run(&AtomicBool::new(false)).await.unwrap();
        assert_eq!(
            summary.late_rows, 0,
            "{}: disorder is within the watermark",
            g.name
        );
        if max_epochs.is_some() && crash_after.is_some_and(|(_, forget)| forget) {
            // Forget the last commit: the restart must replay that epoch from its offsets.
            let commits = dir.path().join("commits");
            let mut files: Vec<_> = std::fs::read_dir(&commits)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            if let Some(last) = files.last() {
                std::fs::remove_file(last).unwrap();
            }
        }
    }
    final_rows(g, &sink)
}

#[test]
fn golden_queries_agree_in_batch_streaming_and_restarted_streaming() {
    let all = rows();
    let rt = common::runtime();
    for (i, g) in GOLDEN.iter().enumerate() {
        let expected = rt.block_on(batch_result(g, &all));
        assert!(
            expected.len() > 5,
            "{}: too few rows to mean anything",
            g.name
        );
        let cuts: Vec<usize> = (0..12)
            .map(|k| (k * 7919 + i * 131) % all.num_rows())
            .collect();
        let streamed = rt.block_on(stream_result(g, split(&all, &cuts), None));
        if let Err(e) = same(&streamed, &expected) {
            panic!("{}: streaming: {e}", g.name);
        }
        for (crash, forget) in [(1, false), (3, true), (7, true), (10, false)] {
            let restarted =
                rt.block_on(stream_result(g, split(&all, &cuts), Some((crash, forget))));
            if let Err(e) = same(&restarted, &expected) {
                panic!(
                    "{}: restart after epoch {crash} (forgot commit: {forget}): {e}",
                    g.name
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn any_batching_gives_the_batch_result(
        cuts in proptest::collection::vec(0usize..6_000, 1..40),
        crash in 1u64..20,
        forget in any::<bool>(),
    ) {
        let all = rows();
        let rt = common::runtime();
        for g in GOLDEN {
            let expected = rt.block_on(batch_result(g, &all));
            let streamed = rt.block_on(stream_result(g, split(&all, &cuts), None));
            prop_assert!(same(&streamed, &expected).is_ok(), "{}: {:?}", g.name, same(&streamed, &expected));
            let restarted = rt.block_on(stream_result(g, split(&all, &cuts), Some((crash, forget))));
            prop_assert!(same(&restarted, &expected).is_ok(), "{} (restart after {}): {:?}", g.name, crash, same(&restarted, &expected));
        }
    }
}

#[test]
fn invalid_output_modes_are_rejected_with_the_rule() {
    let rt = common::runtime();
    let cases = [
        (
            "SELECT country, count(*) FROM transactions GROUP BY country",
            OutputMode::Append,
            "append needs the aggregation grouped by window()",
        ),
        (
            "SELECT tx_id FROM transactions",
            OutputMode::Complete,
            "complete needs an aggregation",
        ),
        (
            "SELECT session_window(ts, '1 minute') AS s, count(*) FROM transactions \
             GROUP BY session_window(ts, '1 minute')",
            OutputMode::Update,
            "session_window() supports output mode append only",
        ),
        (
            "SELECT country, count(*) FROM transactions GROUP BY country ORDER BY 2",
            OutputMode::Update,
            "ORDER BY and LIMIT need output mode complete",
        ),
        (
            "SELECT a.tx_id FROM transactions a JOIN transactions b ON a.tx_id = b.tx_id",
            OutputMode::Append,
            "reading the streaming source twice",
        ),
    ];
    for (sql, mode, message) in cases {
        let session = session();
        let input = StreamInput::register(
            &session,
            "transactions",
            Box::new(ReplaySource::new(FraudGenerator::schema(), vec![])),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let error = rt
            .block_on(async {
                let plan = session.context().state().create_logical_plan(sql).await?;
                StreamingQuery::new(
                    &session,
                    input,
                    plan,
                    Box::new(MemorySink::default()),
                    StreamOptions {
                        event_time: Some("ts".into()),
                        output_mode: mode,
                        checkpoint: dir.path().to_path_buf(),
                        ..StreamOptions::default()
                    },
                )
                .await
            })
            .err()
            .unwrap_or_else(|| panic!("{sql} in {mode:?} should be rejected"));
        assert!(error.to_string().contains(message), "{sql}: {error}");
    }
}

#[test]
fn late_rows_are_counted_and_kept_out_of_state() {
    let rt = common::runtime();
    let all = rows();
    // Two batches: everything, then the first 100 rows again (now far behind the watermark).
    let batches = vec![all.clone(), all.slice(0, 100)];
    let session = session();
    let input = StreamInput::register(
        &session,
        "transactions",
        Box::new(ReplaySource::new(all.schema(), batches)),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = MemorySink::default();
    let late = MemorySink::default();
    let summary = rt.block_on(async {
        let plan = session
            .context()
            .state()
            .create_logical_plan(
                "SELECT window(ts, '1 minute') AS w, count(*) AS n FROM transactions \
                 GROUP BY window(ts, '1 minute')",
            )
            .await
            .unwrap();
        let mut q = StreamingQuery::new(
            &session,
            input,
            plan,
            Box::new(sink.clone()),
            StreamOptions {
                event_time: Some("ts".into()),
                watermark_delay: 10_000_000,
                checkpoint: dir.path().to_path_buf(),
                ..StreamOptions::default()
            },
        )
        .await
        .unwrap()
        .with_late_sink(Box::new(late.clone()));
        q.run(&AtomicBool::new(false)).await.unwrap()
    });
    assert_eq!(summary.late_rows, 100);
    assert_eq!(
        late.batches().iter().map(|b| b.num_rows()).sum::<usize>(),
        100
    );
    let counted: i64 = sink
        .batches()
        .iter()
        .map(|b| {
            arrow::compute::sum(b.column(1).as_primitive::<arrow::datatypes::Int64Type>())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(
        counted,
        all.num_rows() as i64,
        "late rows did not change any window"
    );
    // The progress file has one JSON line per epoch with the late count.
    let progress = std::fs::read_to_string(dir.path().join("progress.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(progress.lines().last().unwrap()).unwrap();
    assert_eq!(last["late_rows"], 100);
    assert!(last["durations"]["total_ms"].as_f64().unwrap() > 0.0);
}
