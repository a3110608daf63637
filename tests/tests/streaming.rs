//! Golden streaming queries: each runs (1) in batch mode over Parquet files of all rows, (2)
//! streaming over the same rows replayed in random batch sizes with random bounded disorder (a
//! property test), and (3) streaming with a crash and restart from the checkpoint at a random
//! epoch, sometimes losing the last commit. All three must give the same final rows.
//!
//! The oracle is DataFusion's own execution (aggregates, window functions, joins), with hopping
//! and session windows written as plain DataFusion plans (`RiffleSession::reference`):
//! streaming shares no code with it beyond DataFusion's accumulators. Batch mode itself runs
//! hopping and session windows with the streaming operators over sorted rows, so it is checked
//! against the oracle too. Every value
//! is compared exactly, except float sums and averages of *aggregations* (GROUP BY), which
//! DataFusion's batch plan adds up per partition and then merges while a stream adds them up
//! per micro-batch: those agree to 1e-12 relative. OVER window features are compared bit for
//! bit: the stream reproduces DataFusion's exact sequence of float operations.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use riffle::common::OutputMode;
use riffle::connectors::files::write_file;
use riffle::connectors::generate::{FraudConfig, FraudGenerator};
use riffle::connectors::memory::MemorySink;
use riffle::connectors::memory::ReplaySource;
use riffle::session::RiffleSession;
use riffle::stream::{StreamInput, StreamOptions, StreamingQuery, Trigger};
use riffle::udf::RowErrorPolicy;

struct Golden {
    name: &'static str,
    sql: &'static str,
    mode: OutputMode,
    /// Columns identifying a result row (update mode keeps the last version per key).
    key_columns: usize,
    /// Float columns that are sums of an aggregation (compared to 1e-12 relative).
    approximate: bool,
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
        approximate: true,
    },
    Golden {
        name: "hopping window with exact distinct count",
        sql: "SELECT window(ts, '2 minutes', '30 seconds') AS w, channel, count(*) AS n, \
              count(DISTINCT card_id) AS cards, approx_distinct(merchant_id) AS merchants \
              FROM transactions WHERE amount > 0 \
              GROUP BY window(ts, '2 minutes', '30 seconds'), channel",
        mode: OutputMode::Append,
        key_columns: 2,
        approximate: false,
    },
    Golden {
        name: "session windows per key",
        sql: "SELECT session_window(ts, '20 seconds') AS s, card_id % 40 AS k, count(*) AS n, \
              sum(amount) AS total, dd_quantile(amount, 0.5) AS median \
              FROM transactions GROUP BY session_window(ts, '20 seconds'), card_id % 40",
        mode: OutputMode::Append,
        key_columns: 2,
        approximate: true,
    },
    Golden {
        name: "keyed global aggregation in update mode",
        sql: "SELECT country, count(*) AS n, approx_distinct(card_id) AS cards, \
              sum(amount) AS total, max(haversine_km(lat, lon, home_lat, home_lon)) AS far \
              FROM transactions GROUP BY country HAVING count(*) > 10",
        mode: OutputMode::Update,
        key_columns: 1,
        approximate: true,
    },
    Golden {
        name: "Wasm aggregates in a tumbling window: decayed average and quantile sketch",
        sql: "SELECT window(ts, '1 minute') AS w, country, count(*) AS n, \
              decayed_avg(amount, ts) AS recent, dd_quantile(amount, 0.9) AS p90 \
              FROM transactions GROUP BY window(ts, '1 minute'), country",
        mode: OutputMode::Append,
        key_columns: 2,
        approximate: true,
    },
    Golden {
        name: "Wasm aggregates per key in update mode, in a hopping window",
        sql: "SELECT window(ts, '2 minutes', '1 minute') AS w, card_id % 25 AS k, \
              decayed_avg(amount, ts) AS recent, dd_quantile(amount, 0.5) AS median \
              FROM transactions GROUP BY window(ts, '2 minutes', '1 minute'), card_id % 25",
        mode: OutputMode::Update,
        key_columns: 2,
        approximate: true,
    },
    Golden {
        name: "de-duplication",
        sql: "SELECT DISTINCT tx_id, ts, card_id, amount FROM transactions",
        mode: OutputMode::Append,
        key_columns: 4,
        approximate: false,
    },
    Golden {
        name: "stream-static enrichment join with UDF projection",
        sql: "SELECT t.tx_id, t.amount, m.category, risk_score(t.amount, t.country) AS risk \
              FROM transactions t JOIN merchants m ON t.merchant_id = m.merchant_id \
              WHERE t.amount > 200",
        mode: OutputMode::Append,
        key_columns: 4,
        approximate: false,
    },
    Golden {
        name: "per-card features: distance from the previous transaction, row number, rolling \
               count and average",
        sql: "SELECT tx_id, card_id, ts, amount, \
              haversine_km(lat, lon, lag(lat) OVER (PARTITION BY card_id ORDER BY ts, tx_id), \
                           lag(lon) OVER (PARTITION BY card_id ORDER BY ts, tx_id)) AS km_from_prev, \
              row_number() OVER (PARTITION BY card_id ORDER BY ts, tx_id) AS nth, \
              count(*) OVER (PARTITION BY card_id ORDER BY ts \
                             RANGE BETWEEN INTERVAL '1' HOUR PRECEDING AND CURRENT ROW) AS tx_1h, \
              avg(amount) OVER (PARTITION BY card_id ORDER BY ts \
                                RANGE BETWEEN INTERVAL '30' MINUTE PRECEDING AND CURRENT ROW) AS avg_30m \
              FROM transactions",
        mode: OutputMode::Append,
        key_columns: 1,
        approximate: false,
    },
    Golden {
        name: "OVER frames: ROWS and RANGE ending before the row, first/last value, UDF inside",
        sql: "SELECT tx_id, \
              sum(amount) OVER (PARTITION BY card_id ORDER BY ts, tx_id \
                                ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) AS sum_4, \
              max(amount) OVER (PARTITION BY card_id ORDER BY ts, tx_id \
                                ROWS BETWEEN 5 PRECEDING AND 1 PRECEDING) AS max_prev_5, \
              first_value(country) OVER (PARTITION BY card_id ORDER BY ts, tx_id \
                                ROWS BETWEEN 2 PRECEDING AND CURRENT ROW) AS first_country, \
              sum(risk_score(amount, country)) OVER (PARTITION BY card_id ORDER BY ts, tx_id \
                                ROWS BETWEEN 1 PRECEDING AND 1 PRECEDING) AS prev_risk, \
              min(amount) OVER (PARTITION BY card_id ORDER BY ts \
                                RANGE BETWEEN INTERVAL '10' MINUTE PRECEDING AND INTERVAL '1' MINUTE PRECEDING) AS min_before, \
              sum(amount) OVER (PARTITION BY card_id ORDER BY ts \
                                RANGE BETWEEN INTERVAL '5' MINUTE PRECEDING AND CURRENT ROW) AS sum_5m, \
              last_value(amount) OVER (PARTITION BY card_id ORDER BY ts \
                                RANGE BETWEEN INTERVAL '5' MINUTE PRECEDING AND CURRENT ROW) AS last_5m, \
              count(country) OVER (PARTITION BY country ORDER BY ts) AS running_per_country \
              FROM transactions",
        mode: OutputMode::Append,
        key_columns: 1,
        approximate: false,
    },
    Golden {
        name: "Wasm aggregates in OVER windows: a sliding median (retract), a quantile of the \
               rows before, and a running decayed average",
        sql: "SELECT tx_id, \
              dd_quantile(amount, 0.5) OVER (PARTITION BY card_id ORDER BY ts, tx_id \
                                ROWS BETWEEN 4 PRECEDING AND CURRENT ROW) AS median_5, \
              dd_quantile(amount, 0.9) OVER (PARTITION BY card_id ORDER BY ts \
                                RANGE BETWEEN INTERVAL '10' MINUTE PRECEDING AND INTERVAL '1' MINUTE PRECEDING) AS p90_before, \
              decayed_avg(amount, ts) OVER (PARTITION BY card_id ORDER BY ts, tx_id) AS recent, \
              decayed_avg(amount, ts) OVER (PARTITION BY country ORDER BY ts \
                                RANGE BETWEEN INTERVAL '2' MINUTE PRECEDING AND CURRENT ROW) AS recent_country \
              FROM transactions",
        mode: OutputMode::Append,
        key_columns: 1,
        approximate: false,
    },
    Golden {
        name: "inner interval join of two streams",
        sql: "SELECT t.tx_id, t.amount, l.tx_id AS login, l.country AS login_country \
              FROM transactions t JOIN logins l ON t.card_id = l.card_id \
              AND l.ts BETWEEN t.ts - INTERVAL '2' MINUTE AND t.ts + INTERVAL '1' MINUTE",
        mode: OutputMode::Append,
        key_columns: 3,
        approximate: false,
    },
    Golden {
        name: "left outer interval join with a condition beyond the range",
        sql: "SELECT t.tx_id, t.country, l.tx_id AS login, l.country AS login_country \
              FROM transactions t LEFT JOIN logins l ON t.card_id = l.card_id \
              AND l.ts BETWEEN t.ts - INTERVAL '2' MINUTE AND t.ts \
              AND l.country <> t.country",
        mode: OutputMode::Append,
        key_columns: 3,
        approximate: false,
    },
    Golden {
        name: "interval join feeding a tumbling window",
        sql: "SELECT window(t.ts, '5 minutes') AS w, t.country, count(*) AS n, \
              count(l.tx_id) AS with_login \
              FROM transactions t LEFT JOIN logins l ON t.card_id = l.card_id \
              AND l.ts BETWEEN t.ts - INTERVAL '2' MINUTE AND t.ts + INTERVAL '1' MINUTE \
              GROUP BY window(t.ts, '5 minutes'), t.country",
        mode: OutputMode::Append,
        key_columns: 2,
        approximate: false,
    },
    Golden {
        name: "OVER features feeding a tumbling window",
        sql: "SELECT window(ts, '5 minutes') AS w, count(*) AS n, max(recent) AS busiest \
              FROM (SELECT ts, count(*) OVER (PARTITION BY card_id ORDER BY ts \
                    RANGE BETWEEN INTERVAL '10' MINUTE PRECEDING AND CURRENT ROW) AS recent \
                    FROM transactions) \
              GROUP BY window(ts, '5 minutes')",
        mode: OutputMode::Append,
        key_columns: 1,
        approximate: false,
    },
    Golden {
        name: "de-duplication feeding a tumbling window",
        sql: "SELECT window(ts, '1 minute') AS w, count(*) AS n, sum(amount) AS total \
              FROM (SELECT DISTINCT tx_id, ts, amount FROM transactions) \
              GROUP BY window(ts, '1 minute')",
        mode: OutputMode::Append,
        key_columns: 1,
        approximate: true,
    },
    Golden {
        name: "two chained windowed aggregations",
        sql: "SELECT window(w['end'], '5 minutes') AS w5, max(n) AS peak, sum(n) AS total \
              FROM (SELECT window(ts, '1 minute') AS w, country, count(*) AS n \
                    FROM transactions GROUP BY window(ts, '1 minute'), country) \
              GROUP BY window(w['end'], '5 minutes')",
        mode: OutputMode::Append,
        key_columns: 1,
        approximate: false,
    },
    Golden {
        name: "global aggregation without GROUP BY, update mode",
        sql: "SELECT count(*) AS n, sum(amount) AS total, max(amount) AS hi FROM transactions",
        mode: OutputMode::Update,
        key_columns: 0,
        approximate: true,
    },
    Golden {
        name: "keyed aggregation in complete mode, sorted and limited",
        sql: "SELECT channel, count(*) AS n FROM transactions GROUP BY channel \
              ORDER BY n DESC LIMIT 2",
        mode: OutputMode::Complete,
        key_columns: 1,
        approximate: false,
    },
    Golden {
        name: "session windows without another key",
        sql: "SELECT session_window(ts, '30 seconds') AS s, count(*) AS n \
              FROM transactions WHERE card_id % 40 = 7 GROUP BY session_window(ts, '30 seconds')",
        mode: OutputMode::Append,
        key_columns: 1,
        approximate: false,
    },
    Golden {
        name: "update mode with a window on a column without the watermark",
        sql: "SELECT window(ts - INTERVAL '1' HOUR, '1 minute') AS w, country, count(*) AS n \
              FROM transactions GROUP BY window(ts - INTERVAL '1' HOUR, '1 minute'), country",
        mode: OutputMode::Update,
        key_columns: 2,
        approximate: false,
    },
    Golden {
        name: "DISTINCT ON with ORDER BY keeps the row that sorts first (update mode)",
        sql: "SELECT DISTINCT ON (card_id) card_id, tx_id, amount FROM transactions \
              ORDER BY card_id, tx_id DESC",
        mode: OutputMode::Update,
        key_columns: 1,
        approximate: false,
    },
];

const TX_ROWS: usize = 6_000;
const LOGIN_ROWS: usize = 2_400;
/// Watermark delay of both streams, and the most disorder the tests add on top (less).
const WATERMARK: i64 = 10_000_000;
const MAX_DISORDER: i64 = 6_000_000;

fn transactions() -> RecordBatch {
    FraudGenerator::new(FraudConfig {
        rows_per_second: 5.0,
        cards: 400,
        max_disorder_micros: 3_000_000,
        duplicate_rate: 0.02,
        merchants: 50,
        ..FraudConfig::default()
    })
    .next_batch_of_ids(TX_ROWS)
}

fn logins() -> RecordBatch {
    FraudGenerator::new(FraudConfig {
        seed: 7,
        rows_per_second: 2.0,
        cards: 400,
        max_disorder_micros: 3_000_000,
        ..FraudConfig::default()
    })
    .next_batch(LOGIN_ROWS)
}

fn merchants() -> RecordBatch {
    let ids: Vec<i64> = (0..50).filter(|i| i % 5 != 0).collect();
    let categories: Vec<String> = ids.iter().map(|i| format!("cat-{}", i % 7)).collect();
    RecordBatch::try_from_iter(vec![
        (
            "merchant_id",
            std::sync::Arc::new(arrow::array::Int64Array::from(ids)) as _,
        ),
        (
            "category",
            std::sync::Arc::new(arrow::array::StringArray::from(categories)) as _,
        ),
    ])
    .unwrap()
}

fn session() -> RiffleSession {
    let session = common::session(RowErrorPolicy::Null);
    for name in ["fraud", "sketch"] {
        session
            .load_udfs(&common::udf(name), Vec::new(), None)
            .unwrap();
    }
    let m = merchants();
    common::register_batch(&session, "merchants", &m);
    session
}

/// A result cell: text, or a float compared exactly or (aggregation sums) to 1e-12.
#[derive(Clone, Debug, PartialEq, PartialOrd)]
enum Cell {
    Text(String),
    Float(f64),
}

type Rows = Vec<Vec<Cell>>;

fn canonical(batches: &[RecordBatch]) -> Rows {
    let options = FormatOptions::default().with_null("NULL");
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
                    let fmt = ArrayFormatter::try_new(c.as_ref(), &options).unwrap();
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

fn same(g: &Golden, a: &Rows, b: &Rows) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{} rows vs {} rows", a.len(), b.len()));
    }
    for (x, y) in a.iter().zip(b) {
        let close = x.len() == y.len()
            && x.iter().zip(y).all(|(p, q)| match (p, q) {
                (Cell::Float(p), Cell::Float(q)) if g.approximate => {
                    (p - q).abs() <= 1e-12 * p.abs().max(q.abs()).max(1.0)
                }
                (Cell::Float(p), Cell::Float(q)) => p.to_bits() == q.to_bits(),
                _ => p == q,
            });
        if !close {
            return Err(format!("first difference: {x:?} vs {y:?}"));
        }
    }
    Ok(())
}

/// A batch run over Parquet files holding every row of each source: the oracle (windows as
/// plain DataFusion plans) or, with `reference` false, batch mode as users run it.
async fn batch_result(
    g: &Golden,
    tx: &RecordBatch,
    logins: &RecordBatch,
    dir: &Path,
    reference: bool,
) -> Rows {
    let session = session();
    for (name, rows) in [("transactions", tx), ("logins", logins)] {
        let path = dir.join(format!("{name}.parquet"));
        write_file(&path, rows.schema(), [rows.clone()]).unwrap();
        session.register_table(name, &path).await.unwrap();
    }
    let mut df = session
        .dataframe(g.sql)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", g.name));
    if reference {
        df = session.reference(df).unwrap();
    }
    canonical(&df.collect().await.unwrap())
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
            .rfind(|b| !b.is_empty())
            .map(|b| canonical(&b))
            .unwrap_or_default(),
    }
}

/// `rows` delivered in a random bounded disorder (each row moved up to `MAX_DISORDER` of event
/// time later, less than the watermark delay, so none is late) and cut into random batches.
fn delivery(rows: &RecordBatch, seed: u64, batches: usize) -> Vec<RecordBatch> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let ts = rows
        .column(1)
        .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    let mut order: Vec<(i64, u32)> = (0..rows.num_rows())
        .map(|i| (ts.value(i) + rng.gen_range(0..MAX_DISORDER), i as u32))
        .collect();
    order.sort();
    let indices = arrow::array::UInt32Array::from_iter_values(order.into_iter().map(|(_, i)| i));
    let shuffled = arrow::compute::take_record_batch(rows, &indices).unwrap();
    let mut cuts: Vec<usize> = (0..batches.saturating_sub(1))
        .map(|_| rng.gen_range(0..shuffled.num_rows()))
        .collect();
    cuts.push(0);
    cuts.push(shuffled.num_rows());
    cuts.sort();
    cuts.dedup();
    cuts.windows(2)
        .map(|w| shuffled.slice(w[0], w[1] - w[0]))
        .collect()
}

/// Streams the deliveries with `partitions.0` partitions; with `crash_after`, stops after
/// that many epochs, optionally forgets the last commit (a crash between sink write and
/// commit), and restarts with `partitions.1`.
async fn stream_result(
    g: &Golden,
    tx: Vec<RecordBatch>,
    logins: Vec<RecordBatch>,
    crash_after: Option<(u64, bool)>,
    partitions: (usize, usize),
) -> Rows {
    let dir = tempfile::tempdir().unwrap();
    let sink = MemorySink::default();
    let mut runs = vec![crash_after.map(|(n, _)| n), None];
    if crash_after.is_none() {
        runs.pop();
    }
    for (run, max_epochs) in runs.into_iter().enumerate() {
        let session = session();
        let inputs = vec![
            StreamInput::register(
                &session,
                "transactions",
                Box::new(ReplaySource::new(FraudGenerator::schema(), tx.clone())),
            )
            .unwrap()
            .with_event_time("ts", WATERMARK)
            .unwrap(),
            StreamInput::register(
                &session,
                "logins",
                Box::new(ReplaySource::new(FraudGenerator::schema(), logins.clone())),
            )
            .unwrap()
            .with_event_time("ts", WATERMARK)
            .unwrap(),
        ];
        let plan = session
            .context()
            .state()
            .create_logical_plan(g.sql)
            .await
            .unwrap();
        let options = StreamOptions {
            output_mode: g.mode,
            trigger: Trigger::AvailableNow,
            checkpoint: dir.path().to_path_buf(),
            max_epochs,
            partitions: if run == 0 { partitions.0 } else { partitions.1 },
            ..StreamOptions::default()
        };
        let mut query =
            StreamingQuery::new(&session, inputs, plan, Box::new(sink.clone()), options)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", g.name));
        let summary = query
            .run(&AtomicBool::new(false))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", g.name));
        assert_eq!(
            summary.late_rows, 0,
            "{}: disorder is within the watermark",
            g.name
        );
        drop(query);
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

fn check(g: &Golden, expected: &Rows, got: &Rows, what: &str) {
    if let Err(e) = same(g, got, expected) {
        panic!("{}: {what}: {e}", g.name);
    }
}

#[test]
fn golden_queries_agree_in_batch_streaming_and_restarted_streaming() {
    let (tx, logins) = (transactions(), logins());
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    for (i, g) in GOLDEN.iter().enumerate() {
        let expected = rt.block_on(batch_result(g, &tx, &logins, dir.path(), true));
        assert!(
            expected.len() > 1 || g.key_columns == 0,
            "{}: too few rows to mean anything",
            g.name
        );
        let batch = rt.block_on(batch_result(g, &tx, &logins, dir.path(), false));
        check(g, &expected, &batch, "batch");
        let seed = i as u64;
        for n in [1, 3] {
            let streamed = rt.block_on(stream_result(
                g,
                delivery(&tx, seed, 12),
                delivery(&logins, seed + 100, 5),
                None,
                (n, n),
            ));
            check(
                g,
                &expected,
                &streamed,
                &format!("streaming, {n} partitions"),
            );
        }
        // Restarts that keep or change the number of partitions.
        for (crash, forget, partitions) in [
            (1, false, (1, 3)),
            (3, true, (3, 2)),
            (7, true, (2, 1)),
            (10, false, (2, 2)),
        ] {
            let restarted = rt.block_on(stream_result(
                g,
                delivery(&tx, seed, 12),
                delivery(&logins, seed + 100, 5),
                Some((crash, forget)),
                partitions,
            ));
            check(
                g,
                &expected,
                &restarted,
                &format!(
                    "restart after epoch {crash} (forgot commit: {forget}), partitions {} then {}",
                    partitions.0, partitions.1
                ),
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5, ..ProptestConfig::default() })]

    #[test]
    fn any_batching_and_bounded_disorder_gives_the_batch_result(
        seed in any::<u64>(),
        tx_batches in 1usize..40,
        login_batches in 1usize..15,
        crash in 1u64..25,
        forget in any::<bool>(),
        partitions in (1usize..5, 1usize..5),
    ) {
        let (tx, logins) = (transactions(), logins());
        let rt = common::runtime();
        let dir = tempfile::tempdir().unwrap();
        for g in GOLDEN {
            let expected = rt.block_on(batch_result(g, &tx, &logins, dir.path(), true));
            let deliveries = || (delivery(&tx, seed, tx_batches), delivery(&logins, seed ^ 1, login_batches));
            let (a, b) = deliveries();
            let streamed = rt.block_on(stream_result(g, a, b, None, (partitions.0, partitions.0)));
            prop_assert!(same(g, &streamed, &expected).is_ok(), "{}: {:?}", g.name, same(g, &streamed, &expected));
            let (a, b) = deliveries();
            let restarted = rt.block_on(stream_result(g, a, b, Some((crash, forget)), partitions));
            prop_assert!(same(g, &restarted, &expected).is_ok(), "{} (restart after {}, partitions {:?}): {:?}", g.name, crash, partitions, same(g, &restarted, &expected));
        }
    }
}

/// Runs `sql` in stream mode over nothing and returns the planning error.
fn rejection(sql: &str, mode: OutputMode, event_time: bool) -> String {
    rejection_in(&session(), sql, mode, event_time)
}

fn rejection_in(session: &RiffleSession, sql: &str, mode: OutputMode, event_time: bool) -> String {
    let rt = common::runtime();
    let mut input = StreamInput::register(
        session,
        "transactions",
        Box::new(ReplaySource::new(FraudGenerator::schema(), vec![])),
    )
    .unwrap();
    if event_time {
        input = input.with_event_time("ts", WATERMARK).unwrap();
    }
    let logins = StreamInput::register(
        session,
        "logins",
        Box::new(ReplaySource::new(FraudGenerator::schema(), vec![])),
    )
    .unwrap()
    .with_event_time("ts", WATERMARK)
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let plan = session.context().state().create_logical_plan(sql).await?;
        StreamingQuery::new(
            session,
            vec![input, logins],
            plan,
            Box::new(MemorySink::default()),
            StreamOptions {
                output_mode: mode,
                checkpoint: dir.path().to_path_buf(),
                ..StreamOptions::default()
            },
        )
        .await
    })
    .err()
    .unwrap_or_else(|| panic!("{sql} in {mode:?} should be rejected"))
    .to_string()
}

#[test]
fn queries_a_stream_cannot_run_are_rejected_with_the_rule() {
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
            "needs an event-time range on both sides",
        ),
        (
            "SELECT t.tx_id FROM transactions t JOIN logins l ON t.card_id = l.card_id \
             AND l.ts >= t.ts",
            OutputMode::Append,
            "bounded in both directions",
        ),
        (
            "SELECT tx_id FROM transactions WHERE amount > (SELECT avg(amount) FROM transactions)",
            OutputMode::Append,
            "a subquery (IN, EXISTS or a scalar subquery) that reads a streaming source",
        ),
        (
            "SELECT tx_id FROM transactions WHERE card_id IN \
             (SELECT card_id FROM transactions WHERE amount > 1000)",
            OutputMode::Append,
            "a subquery",
        ),
        (
            "SELECT tx_id, lag(amount) OVER (PARTITION BY card_id ORDER BY amount) FROM transactions",
            OutputMode::Append,
            "must be ORDER BY a watermarked event-time column",
        ),
        (
            "SELECT tx_id, lead(amount) OVER (PARTITION BY card_id ORDER BY ts) FROM transactions",
            OutputMode::Append,
            "lead and other functions that look at later rows",
        ),
        (
            "SELECT tx_id, sum(amount) OVER (PARTITION BY card_id ORDER BY ts \
             ROWS BETWEEN 1 PRECEDING AND 1 FOLLOWING) FROM transactions",
            OutputMode::Append,
            "FOLLOWING",
        ),
        (
            "SELECT DISTINCT ON (card_id) card_id, tx_id FROM transactions ORDER BY card_id, tx_id DESC",
            OutputMode::Append,
            "DISTINCT ON with ORDER BY",
        ),
        (
            "SELECT count(*) FROM \
             (SELECT country, count(*) AS n FROM transactions GROUP BY country)",
            OutputMode::Update,
            "an aggregation that feeds another stateful operator must be grouped by window()",
        ),
    ];
    for (sql, mode, message) in cases {
        let error = rejection(sql, mode, true);
        assert!(error.contains(message), "{sql}: {error}");
    }
    let error = rejection(
        "SELECT window(ts, '1 minute') AS w, count(*) FROM transactions GROUP BY window(ts, '1 minute')",
        OutputMode::Append,
        false,
    );
    assert!(error.contains("watermarked event-time column"), "{error}");

    // A Wasm aggregate without `retract` cannot slide; from the first row it can.
    let session = session();
    session
        .load_udfs(&common::udf("hostile"), Vec::new(), None)
        .unwrap();
    let error = rejection_in(
        &session,
        "SELECT tx_id, merge_boom(card_id) OVER (PARTITION BY card_id ORDER BY ts \
         ROWS BETWEEN 2 PRECEDING AND CURRENT ROW) FROM transactions",
        OutputMode::Append,
        true,
    );
    assert!(
        error.contains("merge_boom cannot take rows back out of its state"),
        "{error}"
    );
}

#[test]
fn late_rows_are_counted_and_kept_out_of_state() {
    let rt = common::runtime();
    let all = transactions();
    // Two batches: everything, then the first 100 rows again (now far behind the watermark).
    let batches = vec![all.clone(), all.slice(0, 100)];
    let session = session();
    let input = StreamInput::register(
        &session,
        "transactions",
        Box::new(ReplaySource::new(all.schema(), batches)),
    )
    .unwrap()
    .with_event_time("ts", WATERMARK)
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
            vec![input],
            plan,
            Box::new(sink.clone()),
            StreamOptions {
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
    // The progress file has one JSON line per epoch with the late count, per source and per
    // operator.
    let progress = std::fs::read_to_string(dir.path().join("progress.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(progress.lines().last().unwrap()).unwrap();
    assert_eq!(last["late_rows"], 100);
    assert_eq!(last["sources"][0]["late_rows"], 100);
    let operators = last["operators"].as_array().unwrap();
    assert!(
        operators.iter().any(|o| o["id"] == "0-aggregate"),
        "{operators:?}"
    );
    assert_eq!(
        last["operators"][0]["rows_in"], 0,
        "the late rows never reached the operator"
    );
}

/// Rows without an event time belong to no window, in batch mode as in streaming mode (and in
/// Spark); they are never late.
#[test]
fn rows_without_an_event_time_belong_to_no_window_in_either_mode() {
    let rt = common::runtime();
    let all = transactions();
    // The same rows with a NULL event time on every 37th.
    let ts = all
        .column(1)
        .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
    let nulled: arrow::array::TimestampMicrosecondArray = (0..ts.len())
        .map(|i| (i % 37 != 5).then(|| ts.value(i)))
        .collect();
    let mut fields: Vec<arrow::datatypes::Field> = all
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields[1] = fields[1].clone().with_nullable(true);
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(fields));
    let mut columns = all.columns().to_vec();
    columns[1] = std::sync::Arc::new(nulled);
    let rows = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (sql, key_columns) in [
        (
            "SELECT window(ts, '1 minute') AS w, country, count(*) AS n FROM transactions \
             GROUP BY window(ts, '1 minute'), country",
            2,
        ),
        (
            "SELECT session_window(ts, '20 seconds') AS s, card_id % 40 AS k, count(*) AS n \
             FROM transactions GROUP BY session_window(ts, '20 seconds'), card_id % 40",
            2,
        ),
    ] {
        let g = Golden {
            name: "NULL event times",
            sql,
            mode: OutputMode::Append,
            key_columns,
            approximate: false,
        };
        let expected = rt.block_on(batch_result(&g, &rows, &logins(), dir.path(), true));
        let batch = rt.block_on(batch_result(&g, &rows, &logins(), dir.path(), false));
        check(&g, &expected, &batch, "batch");
        let total: i64 = expected
            .iter()
            .map(|r| match r.last() {
                Some(Cell::Text(n)) => n.parse::<i64>().unwrap(),
                _ => 0,
            })
            .sum();
        assert_eq!(
            total as usize,
            rows.num_rows() - rows.column(1).null_count(),
            "{sql}: batch counts only rows with an event time"
        );
        let session = session();
        let input = StreamInput::register(
            &session,
            "transactions",
            Box::new(ReplaySource::new(schema.clone(), delivery(&rows, 3, 9))),
        )
        .unwrap()
        .with_event_time("ts", WATERMARK)
        .unwrap();
        let sink = MemorySink::default();
        let streamed = rt.block_on(async {
            let plan = session
                .context()
                .state()
                .create_logical_plan(sql)
                .await
                .unwrap();
            let mut q = StreamingQuery::new(
                &session,
                vec![input],
                plan,
                Box::new(sink.clone()),
                StreamOptions {
                    checkpoint: dir.path().join(format!("ckpt-{key_columns}-{}", sql.len())),
                    ..StreamOptions::default()
                },
            )
            .await
            .unwrap();
            let summary = q.run(&AtomicBool::new(false)).await.unwrap();
            assert_eq!(summary.late_rows, 0, "a row without event time is not late");
            final_rows(&g, &sink)
        });
        check(&g, &expected, &streamed, "streaming");
    }
}

/// `n` rows of card 1 at the given seconds of event time (the other columns from generated
/// transactions).
fn card_rows_at(seconds: &[i64]) -> RecordBatch {
    let base = transactions().slice(0, seconds.len());
    let schema = base.schema();
    let columns = schema
        .fields()
        .iter()
        .zip(base.columns())
        .map(|(f, c)| {
            let values: arrow::array::ArrayRef = match f.name().as_str() {
                "card_id" => {
                    std::sync::Arc::new(arrow::array::Int64Array::from(vec![1; seconds.len()]))
                }
                "ts" => std::sync::Arc::new(arrow::array::Int64Array::from_iter_values(
                    seconds.iter().map(|s| s * 1_000_000),
                )),
                _ => return c.clone(),
            };
            arrow::compute::cast(&values, f.data_type()).unwrap()
        })
        .collect();
    RecordBatch::try_new(schema, columns).unwrap()
}

/// Runs `sql` over `epochs` (one batch each) and gives the rows it emitted or its error.
fn run_epochs(
    session: &RiffleSession,
    sql: &str,
    epochs: Vec<RecordBatch>,
) -> Result<Vec<RecordBatch>, riffle::RiffleError> {
    let rt = common::runtime();
    let input = StreamInput::register(
        session,
        "transactions",
        Box::new(ReplaySource::new(FraudGenerator::schema(), epochs)),
    )
    .unwrap()
    .with_event_time("ts", WATERMARK)
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = MemorySink::default();
    rt.block_on(async {
        let plan = session.context().state().create_logical_plan(sql).await?;
        let mut q = StreamingQuery::new(
            session,
            vec![input],
            plan,
            Box::new(sink.clone()),
            StreamOptions {
                checkpoint: dir.path().to_path_buf(),
                ..StreamOptions::default()
            },
        )
        .await?;
        q.run(&AtomicBool::new(false)).await
    })?;
    Ok(sink.batches())
}

/// A row that arrives between two open sessions of its key joins them into one, whose
/// aggregates are the two sessions' states merged (a Wasm aggregate's own `merge`) plus the
/// row: the same session and values batch mode gives. A Wasm aggregate whose `merge` panics
/// fails the query cleanly, naming itself.
#[test]
fn a_row_bridging_two_sessions_merges_their_wasm_aggregate_states() {
    // Gap one minute, watermark 10 s behind: [0, 60) and [65, 125) are both open after the
    // first epoch (watermark 55 s); 58 s is on time and within a minute of both.
    let epochs = vec![card_rows_at(&[0, 65]), card_rows_at(&[58])];
    let amounts: Vec<f64> = epochs
        .iter()
        .flat_map(|b| {
            let a = b
                .column(b.schema().index_of("amount").unwrap())
                .as_primitive::<Float64Type>();
            a.iter().flatten().collect::<Vec<_>>()
        })
        .collect();
    let session = session();
    let out = run_epochs(
        &session,
        "SELECT session_window(ts, '1 minute') AS s, count(*) AS n, \
         dd_quantile(amount, 0.5) AS median FROM transactions \
         GROUP BY session_window(ts, '1 minute')",
        epochs.clone(),
    )
    .unwrap();
    let out = arrow::compute::concat_batches(&out[0].schema(), &out).unwrap();
    assert_eq!(out.num_rows(), 1, "one session");
    let bounds = out.column(0).as_struct();
    let micros = |c: usize| {
        bounds
            .column(c)
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
            .value(0)
    };
    assert_eq!((micros(0), micros(1)), (0, 125_000_000));
    assert_eq!(
        out.column(1)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0),
        3
    );
    let mut native = riffle_udfs_sketch::DdQuantile::default();
    for a in &amounts {
        native.update(*a, 0.5);
    }
    assert_eq!(
        out.column(2)
            .as_primitive::<Float64Type>()
            .value(0)
            .to_bits(),
        native.finish().unwrap().unwrap().to_bits(),
        "the merged sketch's median is the one of all three rows"
    );

    let session = self::session();
    session
        .load_udfs(&common::udf("hostile"), Vec::new(), None)
        .unwrap();
    let err = run_epochs(
        &session,
        "SELECT session_window(ts, '1 minute') AS s, merge_boom(tx_id) AS n FROM transactions \
         GROUP BY session_window(ts, '1 minute')",
        epochs,
    )
    .unwrap_err();
    match common::riffle_error(&err) {
        riffle::RiffleError::UdfFailure {
            function, detail, ..
        } => {
            assert_eq!(function, "merge_boom", "{err}");
            assert!(detail.contains("panicked on purpose"), "{detail}");
        }
        other => panic!("expected the merge to fail, got {other}"),
    }
}

/// An epoch that touches more partitions than one guest call carries (4,096) steps them in
/// several calls per round, with the values batch mode gives, bit for bit.
/// 24,000 transactions over 20,000 cards: one batch of them touches over 10,000 keys.
fn many_cards() -> RecordBatch {
    FraudGenerator::new(FraudConfig {
        cards: 20_000,
        rows_per_second: 200.0,
        ..FraudConfig::default()
    })
    .next_batch_of_ids(24_000)
}

#[test]
fn wasm_over_windows_over_many_partitions_split_calls_and_agree_with_batch() {
    let rt = common::runtime();
    let tx = many_cards();
    let g = Golden {
        name: "Wasm OVER over many partitions",
        sql: "SELECT tx_id, \
              dd_quantile(amount, 0.5) OVER (PARTITION BY card_id ORDER BY ts, tx_id \
                                ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS median_2, \
              decayed_avg(amount, ts) OVER (PARTITION BY card_id ORDER BY ts, tx_id) AS recent \
              FROM transactions",
        mode: OutputMode::Append,
        key_columns: 1,
        approximate: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let logins = logins();
    let expected = rt.block_on(batch_result(&g, &tx, &logins, dir.path(), true));
    assert_eq!(expected.len(), tx.num_rows());
    // One delivery: its epoch releases rows of over 10,000 cards at once.
    let got = rt.block_on(stream_result(
        &g,
        delivery(&tx, 11, 1),
        vec![logins],
        None,
        (2, 2),
    ));
    check(&g, &expected, &got, "one delivery over 20,000 cards");
}

/// One batch of 24,000 rows over 20,000 cards opens a session per card: the session window
/// feeds its Wasm aggregates those sessions' rows in several calls of at most 8,192 rows each
/// (less the rows a FILTER drops), and the sessions' values are those of plain DataFusion over
/// the same rows.
#[test]
fn wasm_aggregates_over_many_sessions_in_one_batch_agree_with_batch() {
    let rt = common::runtime();
    let tx = many_cards();
    let g = Golden {
        name: "Wasm aggregate over many sessions",
        sql: "SELECT session_window(ts, '20 seconds') AS s, card_id, count(*) AS n, \
              dd_quantile(amount, 0.5) AS median, decayed_avg(amount, ts) AS recent, \
              dd_quantile(amount, 0.9) FILTER (WHERE amount > 50) AS p90_over_50 \
              FROM transactions GROUP BY session_window(ts, '20 seconds'), card_id",
        mode: OutputMode::Append,
        key_columns: 2,
        approximate: true,
    };
    let dir = tempfile::tempdir().unwrap();
    let logins = logins();
    let expected = rt.block_on(batch_result(&g, &tx, &logins, dir.path(), true));
    assert!(expected.len() > 16_000, "{} sessions", expected.len());
    for partitions in [(1, 1), (2, 2)] {
        let got = rt.block_on(stream_result(
            &g,
            delivery(&tx, 11, 1),
            vec![logins.clone()],
            None,
            partitions,
        ));
        check(&g, &expected, &got, &format!("one batch, {partitions:?}"));
    }
}
