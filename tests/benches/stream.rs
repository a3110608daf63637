//! Streaming throughput and latency with the generator, the fraud UDFs and a Parquet sink.
//!
//! ```text
//! cargo bench -p riffle-tests --bench stream --profile dev [-- ROWS]
//! ```
//!
//! Three runs, each a real streaming query with checkpoints (offsets, state and commits synced
//! to disk every epoch):
//! 1. stateless: filter + the `risk_score` Wasm UDF in the projection;
//! 2. a 1-minute tumbling window per country with `max(risk_score(...))` inside the aggregate;
//! 3. latency: the low-latency trigger at 100,000 events/s of arrival rate.
//!
//! Throughput is quoted per core: the engine runs one epoch at a time on one thread. "Engine"
//! excludes the generator (the time to invent rows, `read_ms` in the progress), "end to end"
//! includes it. Latency is per row, from when the generator makes the row available to when
//! its epoch commits, interpolated within each epoch between its first and last row. This is a
//! benchmark, not a test: it asserts nothing about speed.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use riffle::connectors::generator::{FraudConfig, GeneratorConfig};
use riffle::connectors::sink::ParquetDirSink;
use riffle::connectors::source::GeneratorSource;
use riffle::exec::OutputMode;
use riffle::session::{RiffleSession, SessionOptions};
use riffle::stream::{StreamInput, StreamOptions, StreamingQuery, Trigger};
use riffle::udf::{EngineOptions, RowErrorPolicy};
use riffle_tests::udf;

struct Run {
    rows: u64,
    wall_s: f64,
    read_s: f64,
    epochs: u64,
    latencies_ms: Vec<f64>,
}

async fn run(
    sql: &str,
    mode: OutputMode,
    trigger: Trigger,
    rate: Option<f64>,
    rows: i64,
    dir: &Path,
) -> Run {
    let session = RiffleSession::new(SessionOptions {
        engine: EngineOptions::default(),
        row_error_policy: RowErrorPolicy::Null,
        batch_size: None,
    })
    .unwrap();
    session.load_udfs(&udf("fraud"), Vec::new(), None).unwrap();
    let config = GeneratorConfig::Fraud(FraudConfig {
        // 1,000 transactions per second of event time: about 17 windows per country a
        // million rows.
        rows_per_second: 1_000.0,
        max_disorder_micros: 2_000_000,
        ..FraudConfig::default()
    });
    let input = StreamInput::register(
        &session,
        "transactions",
        Box::new(GeneratorSource::new(config, rate, Some(rows))),
    )
    .unwrap();
    let plan = session
        .context()
        .state()
        .create_logical_plan(sql)
        .await
        .unwrap();
    let checkpoint = dir.join("checkpoint");
    let progress = dir.join("progress.jsonl");
    let options = StreamOptions {
        event_time: Some("ts".into()),
        watermark_delay: 5_000_000,
        output_mode: mode,
        trigger,
        max_rows_per_epoch: 200_000,
        checkpoint,
        progress_file: Some(progress.clone()),
        ..StreamOptions::default()
    };
    let sink = ParquetDirSink::new(&dir.join("out")).unwrap();
    let mut query = StreamingQuery::new(&session, input, plan, Box::new(sink), options)
        .await
        .unwrap();
    let started = Instant::now();
    let summary = query.run(&AtomicBool::new(false)).await.unwrap();
    let wall_s = started.elapsed().as_secs_f64();

    let mut read_s = 0.0;
    let mut latencies_ms = Vec::new();
    for line in std::fs::read_to_string(&progress).unwrap().lines() {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        read_s += p["durations"]["read_ms"].as_f64().unwrap() / 1e3;
        let n = p["input_rows"].as_u64().unwrap();
        if let (Some(fast), Some(slow)) = (p["latency_ms"][0].as_f64(), p["latency_ms"][1].as_f64())
        {
            for i in 0..n {
                let f = if n > 1 {
                    i as f64 / (n - 1) as f64
                } else {
                    0.0
                };
                latencies_ms.push(slow + (fast - slow) * f);
            }
        }
    }
    Run {
        rows: summary.input_rows,
        wall_s,
        read_s,
        epochs: summary.epochs,
        latencies_ms,
    }
}

fn report(name: &str, r: &Run) {
    let engine = r.rows as f64 / (r.wall_s - r.read_s);
    let total = r.rows as f64 / r.wall_s;
    println!(
        "{name:<28} {rows:>9} rows {epochs:>5} epochs  engine {engine:>10.0} rows/s/core  \
         end to end {total:>10.0} rows/s",
        rows = r.rows,
        epochs = r.epochs
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let rows: i64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let stateless = run(
            "SELECT tx_id, ts, card_id, amount, risk_score(amount, country) AS risk \
             FROM transactions WHERE amount > 50 AND channel <> 'pos'",
            OutputMode::Append,
            Trigger::AvailableNow,
            None,
            rows,
            &dir.path().join("stateless"),
        )
        .await;
        report("stateless filter + UDF", &stateless);

        let windowed = run(
            "SELECT window(ts, '1 minute') AS w, country, count(*) AS n, \
             max(risk_score(amount, country)) AS worst \
             FROM transactions GROUP BY window(ts, '1 minute'), country",
            OutputMode::Append,
            Trigger::AvailableNow,
            None,
            rows,
            &dir.path().join("windowed"),
        )
        .await;
        report("1-min tumbling, UDF in agg", &windowed);

        let rate = 100_000.0;
        let latency_rows = (rate as i64 * 5).min(rows);
        let mut latency = run(
            "SELECT tx_id, ts, amount, risk_score(amount, country) AS risk \
             FROM transactions WHERE amount > 50",
            OutputMode::Append,
            Trigger::LowLatency,
            Some(rate),
            latency_rows,
            &dir.path().join("latency"),
        )
        .await;
        latency.latencies_ms.sort_by(f64::total_cmp);
        let l = &latency.latencies_ms;
        println!(
            "low-latency at {rate:.0} ev/s: {} rows in {} epochs ({:.0} rows/epoch): \
             p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            latency.rows,
            latency.epochs,
            latency.rows as f64 / latency.epochs.max(1) as f64,
            percentile(l, 0.50),
            percentile(l, 0.99),
            l.last().copied().unwrap_or(0.0)
        );
    });
}
