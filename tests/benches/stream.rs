//! Streaming throughput and latency with the generator, the fraud UDFs and a Parquet sink.
//!
//! ```text
//! cargo bench -p riffle-tests --bench stream --profile dev [-- ROWS]
//! ```
//!
//! Real streaming queries with checkpoints (offsets, state and commits synced to disk every
//! epoch):
//! 1. stateless: filter + the `risk_score` Wasm UDF in the projection;
//! 2. a 1-minute tumbling window per country with `max(risk_score(...))` inside the aggregate;
//! 3. three OVER features per card (distance from the previous transaction with `lag`, a
//!    one-hour rolling count, a 30-minute rolling average; one window specification, so one
//!    operator) over 1,000,000 distinct cards;
//! 4. `over-wasm`: Wasm aggregates in OVER windows (a sliding quantile sketch that retracts, a
//!    running decayed average) against the built-in `avg` over the same frames, 10,000 cards;
//! 5. `session`: a 30-second session window per card with a Wasm aggregate, over 10,000 cards
//!    (short sessions) and 1,000 (sessions open all run);
//! 6. an interval join of two streams (transactions with logins of the same card within
//!    minutes);
//! 7. latency: the low-latency trigger at 100,000 events/s of arrival rate;
//! 8. `modes`: the 1-minute tumbling aggregation with a UDF, a 5-minute/1-minute hopping
//!    exact distinct count and a session window with a Wasm aggregate, each as a stream
//!    (generator, checkpoints, Parquet sink) on one core and on two (partitions and runtime
//!    workers), as a batch query over a Parquet file of the same
//!    rows (with no memory limit, and spilling beyond 128 MiB), and as that batch query with
//!    its windows as plain DataFusion plans (how batch mode ran them before), each run in a
//!    process of its own so that its peak RSS is its own; three rounds, in turn;
//! 9. monitoring: the stateless query with `riffle run --http`'s monitor and HTTP server
//!    attached and scraped (`/metrics` and the dashboard's `/api/progress`) once and ten times
//!    a second, against the same query without them, in turn, in 10,000-row epochs (the cost
//!    is per epoch), and the time the monitor's hooks take on the driver's thread.
//!
//! For the stateful runs it also prints the state each operator holds at the end, in bytes per
//! key (what a million keys cost).
//!
//! Throughput is quoted per core: outside `modes`' two-core streams, the engine runs one
//! partition of each operator, one epoch at a time on one thread, except
//! that state files are written on a second thread while the sink writes; "rows per
//! CPU-second" counts that thread's time too. "Engine" excludes the generator (the time to
//! invent rows, `read_ms` in the progress), "end to end" includes it. Latency is per row, from
//! when the generator makes the row available to when its epoch commits, interpolated within
//! each epoch between its first and last row. This is a
//! benchmark, not a test: it asserts nothing about speed.

/// The allocator the `riffle` binary runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use riffle::common::OutputMode;
use riffle::connectors::files::ParquetDirSink;
use riffle::connectors::generate::GeneratorSource;
use riffle::connectors::generate::{FraudConfig, FraudGenerator, GeneratorConfig};
use riffle::connectors::source::{DeadLetter, Input, StreamSource};
use riffle::exec::graph::Graph;
use riffle::server::{HttpServer, Monitor};
use riffle::session::{RiffleSession, SessionOptions};
use riffle::stream::progress::EpochProgress;
use riffle::stream::{QueryObserver, StreamInput, StreamOptions, StreamingQuery, Trigger};
use riffle::udf::UdfModule;
use riffle::udf::{EngineOptions, RowErrorPolicy};
use riffle_tests::udf;

/// A generator source of `rows` fraud transactions (seed, distinct cards, event rate).
struct Source {
    name: &'static str,
    seed: u64,
    cards: u64,
    events_per_second: f64,
    rows: i64,
}

struct Run {
    rows: u64,
    wall_s: f64,
    /// CPU seconds of the whole process (every thread) during the run.
    cpu_s: f64,
    read_s: f64,
    epochs: u64,
    latencies_ms: Vec<f64>,
    /// (operator id, state rows, state bytes) after the last epoch.
    state: Vec<(String, u64, u64)>,
    /// The same after the epoch at which each operator's state was largest.
    peak: Vec<(String, u64, u64)>,
    /// Seconds in each phase over all epochs: operators, state, sink, commit.
    phases: [f64; 4],
    /// Seconds in each operator over all epochs, by operator id in graph order.
    operators: Vec<(String, f64)>,
}

/// Partitions of the streams [`run`] starts: the runs of this benchmark measure one core (and
/// run on a runtime of one worker) unless a mode of `modes` says otherwise.
static PARTITIONS: AtomicUsize = AtomicUsize::new(1);

#[allow(clippy::too_many_arguments)]
async fn run(
    sql: &str,
    mode: OutputMode,
    trigger: Trigger,
    rate: Option<f64>,
    sources: &[Source],
    dir: &Path,
    epoch_rows: usize,
    monitor: Option<Arc<dyn QueryObserver>>,
) -> Run {
    let session = RiffleSession::new(SessionOptions {
        engine: EngineOptions::default(),
        row_error_policy: RowErrorPolicy::Null,
        batch_size: None,
        memory_limit: None,
    })
    .unwrap();
    for name in ["fraud", "sketch"] {
        session.load_udfs(&udf(name), Vec::new(), None).unwrap();
    }
    let inputs = sources
        .iter()
        .map(|s| {
            let config = GeneratorConfig::Fraud(fraud_config(s));
            StreamInput::register(
                &session,
                s.name,
                Box::new(OneThread(GeneratorSource::new(config, rate, Some(s.rows)))),
            )
            .unwrap()
            .with_event_time("ts", 5_000_000)
            .unwrap()
        })
        .collect();
    let plan = session
        .context()
        .state()
        .create_logical_plan(sql)
        .await
        .unwrap();
    let checkpoint = dir.join("checkpoint");
    let progress = dir.join("progress.jsonl");
    let options = StreamOptions {
        output_mode: mode,
        trigger,
        max_rows_per_epoch: epoch_rows,
        checkpoint,
        progress_file: Some(progress.clone()),
        partitions: PARTITIONS.load(Ordering::Relaxed),
        ..StreamOptions::default()
    };
    let sink = ParquetDirSink::new(&dir.join("out")).unwrap();
    let mut query = StreamingQuery::new(&session, inputs, plan, Box::new(sink), options)
        .await
        .unwrap();
    if let Some(monitor) = monitor {
        query = query.with_observer(monitor);
    }
    let started = Instant::now();
    let cpu_started = common::cpu_seconds();
    let summary = query.run(&AtomicBool::new(false)).await.unwrap();
    let wall_s = started.elapsed().as_secs_f64();
    let cpu_s = common::cpu_seconds() - cpu_started;

    let mut read_s = 0.0;
    let mut latencies_ms = Vec::new();
    let mut state: Vec<(String, u64, u64)> = Vec::new();
    let mut peak: Vec<(String, u64, u64)> = Vec::new();
    let mut phases = [0.0; 4];
    let mut operators: Vec<(String, f64)> = Vec::new();
    for line in std::fs::read_to_string(&progress).unwrap().lines() {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        read_s += p["durations"]["read_ms"].as_f64().unwrap() / 1e3;
        for (i, phase) in ["operators_ms", "state_ms", "sink_ms", "commit_ms"]
            .iter()
            .enumerate()
        {
            phases[i] += p["durations"][phase].as_f64().unwrap() / 1e3;
        }
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
        for o in p["operators"].as_array().unwrap() {
            let id = o["id"].as_str().unwrap();
            let s = o["time_ms"].as_f64().unwrap() / 1e3;
            match operators.iter_mut().find(|(i, _)| i == id) {
                Some((_, t)) => *t += s,
                None => operators.push((id.to_string(), s)),
            }
        }
        state = p["operators"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["id"].as_str().unwrap().to_string(),
                    o["state"]["rows"].as_u64().unwrap(),
                    o["state"]["bytes"].as_u64().unwrap(),
                )
            })
            .collect();
        for now in &state {
            match peak.iter_mut().find(|p| p.0 == now.0) {
                Some(p) if p.2 < now.2 => *p = now.clone(),
                Some(_) => {}
                None => peak.push(now.clone()),
            }
        }
    }
    Run {
        rows: summary.input_rows,
        wall_s,
        cpu_s,
        read_s,
        epochs: summary.epochs,
        latencies_ms,
        state,
        peak,
        phases,
        operators,
    }
}

fn report(name: &str, r: &Run) {
    let engine = r.rows as f64 / (r.wall_s - r.read_s);
    let total = r.rows as f64 / r.wall_s;
    // The engine's CPU time: the process's, less the generator's (its read time: it computes
    // rows without waiting). State files are written on a second thread while the sink
    // writes, so this is the honest per-core figure when they overlap.
    let cpu = r.rows as f64 / (r.cpu_s - r.read_s);
    println!(
        "{name:<28} {rows:>9} rows {epochs:>5} epochs  engine {engine:>10.0} rows/s/core  \
         end to end {total:>10.0} rows/s  engine {cpu:>10.0} rows per CPU-second",
        rows = r.rows,
        epochs = r.epochs
    );
}

fn report_state(r: &Run) {
    println!(
        "    phases: operators {:.2} s, state {:.2} s, sink {:.2} s, commit {:.2} s",
        r.phases[0], r.phases[1], r.phases[2], r.phases[3]
    );
    let operators: Vec<String> = r
        .operators
        .iter()
        .map(|(id, s)| format!("{id} {s:.2} s"))
        .collect();
    println!("    operators: {}", operators.join(", "));
    for (id, rows, bytes) in &r.state {
        if *rows > 0 {
            println!(
                "    state of {id:<20} {rows:>9} keys {bytes:>12} bytes  {:>7.0} bytes/key",
                *bytes as f64 / *rows as f64
            );
        }
    }
    for (id, rows, bytes) in &r.peak {
        let last = r.state.iter().find(|s| &s.0 == id).map_or(0, |s| s.2);
        if *rows > 0 && *bytes > last {
            println!(
                "    peak state of {id:<15} {rows:>9} keys {bytes:>12} bytes  {:>7.0} bytes/key",
                *bytes as f64 / *rows as f64
            );
        }
    }
}

/// One source of `rows` transactions over `cards` cards at 1,000 per second of event time
/// (about 17 one-minute windows per country per million rows).
fn transactions(rows: i64, cards: u64) -> [Source; 1] {
    [Source {
        name: "transactions",
        seed: 42,
        cards,
        events_per_second: 1_000.0,
        rows,
    }]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    // As the `riffle` binary does.
    riffle::common::memory::disable_transparent_huge_pages();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD) {
        return mode_child(&args[2..]);
    }
    let rows: i64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    // Other arguments pick runs by name (stateless, windowed, over, over-wasm, session, modes,
    // join, latency, monitoring; none: all) and, with `q0`..`q3`, the queries `modes` runs.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.parse::<i64>().is_err() && !a.starts_with('-'))
        .collect();
    let wanted =
        |name: &str| only.iter().all(|o| o.starts_with('q')) || only.iter().any(|o| o == name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        if wanted("stateless") {
            let stateless = run(
                "SELECT tx_id, ts, card_id, amount, risk_score(amount, country) AS risk \
                 FROM transactions WHERE amount > 50 AND channel <> 'pos'",
                OutputMode::Append,
                Trigger::AvailableNow,
                None,
                &transactions(rows, 10_000),
                &dir.path().join("stateless"),
                200_000,
                None,
            )
            .await;
            report("stateless filter + UDF", &stateless);
        }

        if wanted("windowed") {
            let windowed = run(
                "SELECT window(ts, '1 minute') AS w, country, count(*) AS n, \
                 max(risk_score(amount, country)) AS worst \
                 FROM transactions GROUP BY window(ts, '1 minute'), country",
                OutputMode::Append,
                Trigger::AvailableNow,
                None,
                &transactions(rows, 10_000),
                &dir.path().join("windowed"),
                200_000,
                None,
            )
            .await;
            report("1-min tumbling, UDF in agg", &windowed);
            report_state(&windowed);
        }

        if wanted("over") {
            let over = run(
                "SELECT tx_id, card_id, ts, \
                 haversine_km(lat, lon, lag(lat) OVER (PARTITION BY card_id ORDER BY ts), \
                              lag(lon) OVER (PARTITION BY card_id ORDER BY ts)) AS km, \
                 count(*) OVER (PARTITION BY card_id ORDER BY ts \
                                RANGE BETWEEN INTERVAL '1' HOUR PRECEDING AND CURRENT ROW) AS n_1h, \
                 avg(amount) OVER (PARTITION BY card_id ORDER BY ts \
                                   RANGE BETWEEN INTERVAL '30' MINUTE PRECEDING AND CURRENT ROW) AS avg_30m \
                 FROM transactions",
                OutputMode::Append,
                Trigger::AvailableNow,
                None,
                &transactions(rows, 1_000_000),
                &dir.path().join("over"),
                200_000,
                None,
            )
            .await;
            report("3 OVER features, 1M cards", &over);
            report_state(&over);
        }

        if wanted("over-wasm") {
            // The same frames with a built-in aggregate and with Wasm aggregates (a sliding
            // quantile sketch that retracts, a running decayed average): what stepping the
            // partitions' states through the guest costs.
            let frames = |sliding: &str, running: &str| {
                format!(
                    "SELECT tx_id, {sliding} OVER (PARTITION BY card_id ORDER BY ts \
                     ROWS BETWEEN 4 PRECEDING AND CURRENT ROW) AS last_5, \
                     {running} OVER (PARTITION BY card_id ORDER BY ts) AS running \
                     FROM transactions"
                )
            };
            for (name, sql) in [
                ("OVER built-in avg, 10k cards", frames("avg(amount)", "avg(amount)")),
                (
                    "OVER Wasm aggs, 10k cards",
                    frames("dd_quantile(amount, 0.5)", "decayed_avg(amount, ts)"),
                ),
            ] {
                let r = run(
                    &sql,
                    OutputMode::Append,
                    Trigger::AvailableNow,
                    None,
                    &transactions(rows, 10_000),
                    &dir.path().join(name.replace(' ', "-")),
                    200_000,
                    None,
                )
                .await;
                report(name, &r);
                report_state(&r);
            }
        }

        if wanted("session") {
            // 10,000 cards: a card's transactions are ~10 s apart, so sessions are a few rows
            // long; 1,000 cards: ~1 s apart, so each card's session stays open all run.
            for (name, cards) in [
                ("session, Wasm agg, 10k cards", 10_000),
                ("session, Wasm agg, 1k cards", 1_000),
            ] {
                let r = run(
                    "SELECT session_window(ts, '30 seconds') AS s, card_id, count(*) AS n, \
                     sum(amount) AS total, dd_quantile(amount, 0.5) AS median \
                     FROM transactions GROUP BY session_window(ts, '30 seconds'), card_id",
                    OutputMode::Append,
                    Trigger::AvailableNow,
                    None,
                    &transactions(rows, cards),
                    &dir.path().join(format!("session-{cards}")),
                    100_000,
                    None,
                )
                .await;
                report(name, &r);
                report_state(&r);
            }
        }

        if wanted("modes") {
            // `q0`..`q3` pick queries of MODE_QUERIES (default: all).
            let queries: Vec<usize> = only
                .iter()
                .filter_map(|a| a.strip_prefix('q')?.parse().ok())
                .collect();
            modes(rows, dir.path(), &queries);
        }

        if wanted("join") {
            let joined = run(
                "SELECT t.tx_id, t.amount, l.tx_id AS login, l.country \
                 FROM transactions t JOIN logins l ON t.card_id = l.card_id \
                 AND l.ts BETWEEN t.ts - INTERVAL '2' MINUTE AND t.ts + INTERVAL '1' MINUTE",
                OutputMode::Append,
                Trigger::AvailableNow,
                None,
                &[
                    Source { name: "transactions", seed: 42, cards: 100_000, events_per_second: 1_000.0, rows },
                    Source { name: "logins", seed: 7, cards: 100_000, events_per_second: 1_000.0, rows },
                ],
                &dir.path().join("join"),
                200_000,
                None,
            )
            .await;
            report("interval join of 2 streams", &joined);
            report_state(&joined);
        }

        if wanted("latency") {
            let rate = 100_000.0;
            let latency_rows = (rate as i64 * 5).min(rows);
            let mut latency = run(
                "SELECT tx_id, ts, amount, risk_score(amount, country) AS risk \
                 FROM transactions WHERE amount > 50",
                OutputMode::Append,
                Trigger::LowLatency,
                Some(rate),
                &transactions(latency_rows, 10_000),
                &dir.path().join("latency"),
                200_000,
                None,
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
        }

        if wanted("monitoring") {
            monitoring(rows, dir.path()).await;
        }
    });
}

/// GETs `path` from `addr` and reads the whole answer.
fn scrape(addr: std::net::SocketAddr, path: &str) {
    use std::io::{Read, Write};
    if let Ok(mut s) = std::net::TcpStream::connect(addr) {
        let _ = write!(s, "GET {path} HTTP/1.0\r\n\r\n");
        let _ = s.read_to_end(&mut Vec::new());
    }
}

/// The monitor, timed: what its hooks cost the driver's thread (the cost `--http` adds to each
/// epoch, measured directly rather than as a difference of two noisy runs).
struct Timed {
    monitor: Arc<Monitor>,
    nanos: std::sync::atomic::AtomicU64,
}

impl Timed {
    fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

impl QueryObserver for Timed {
    fn query_started(
        &self,
        query_id: &str,
        run_id: &str,
        graph: &Graph,
        sources: Vec<(String, String)>,
        modules: &[Arc<UdfModule>],
    ) {
        self.time(|| {
            self.monitor
                .query_started(query_id, run_id, graph, sources, modules)
        });
    }
    fn epoch_committed(&self, progress: &EpochProgress, line: &str) {
        self.time(|| self.monitor.epoch_committed(progress, line));
    }
    fn udfs_swapped(&self, modules: &[Arc<UdfModule>]) {
        self.time(|| self.monitor.udfs_swapped(modules));
    }
    fn records_rejected(&self, epoch: u64, source: &str, rejected: u64, letters: &[DeadLetter]) {
        self.time(|| {
            self.monitor
                .records_rejected(epoch, source, rejected, letters)
        });
    }
}

/// Rounds of the monitoring runs (run times vary by several per cent here between runs).
const ROUNDS: usize = 11;

/// The stateless query without the monitor, and with it and its HTTP server scraped once a
/// second (the dashboard's rate, and more often than Prometheus scrapes) and ten times a
/// second, in turn.
async fn monitoring(rows: i64, dir: &Path) {
    let sql = "SELECT tx_id, ts, card_id, amount, risk_score(amount, country) AS risk \
               FROM transactions WHERE amount > 50 AND channel <> 'pos'";
    // Scrapes per second; 0: no monitor at all.
    let variants = [0u64, 1, 10];
    let mut engine: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    // Per variant: the monitor hooks' time on the driver's thread as a share of engine time.
    let mut hooks: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for round in 0..ROUNDS {
        for (v, per_second) in variants.iter().enumerate() {
            let path = dir.join(format!("monitoring-{round}-{per_second}"));
            let mut server = None;
            let mut scraper = None;
            let stop = Arc::new(AtomicBool::new(false));
            let mut timed = None;
            let monitor = (*per_second > 0).then(|| {
                let monitor = Monitor::new("bench", "stream");
                let http = HttpServer::start("127.0.0.1:0", monitor.clone()).unwrap();
                let (addr, stop) = (http.addr(), stop.clone());
                let pause = Duration::from_millis(1000 / per_second);
                scraper = Some(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        scrape(addr, "/metrics");
                        scrape(addr, "/api/progress?limit=300");
                        std::thread::sleep(pause);
                    }
                }));
                server = Some(http);
                let t = Arc::new(Timed {
                    monitor,
                    nanos: Default::default(),
                });
                timed = Some(t.clone());
                t as Arc<dyn QueryObserver>
            });
            let r = run(
                sql,
                OutputMode::Append,
                Trigger::AvailableNow,
                None,
                &transactions(rows, 10_000),
                &path,
                10_000,
                monitor,
            )
            .await;
            stop.store(true, Ordering::Relaxed);
            if let Some(s) = scraper {
                s.join().unwrap();
            }
            drop(server);
            let engine_s = r.wall_s - r.read_s;
            engine[v].push(r.rows as f64 / engine_s);
            if let Some(t) = timed {
                hooks[v].push(t.nanos.load(Ordering::Relaxed) as f64 / 1e9 / engine_s * 100.0);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let medians: Vec<f64> = engine.iter_mut().map(median).collect();
    println!(
        "monitoring, 10,000-row epochs (medians of {ROUNDS} runs each, in turn): engine {:.0} \
         rows/s/core without --http",
        medians[0]
    );
    for (v, per_second) in variants.iter().enumerate().skip(1) {
        println!(
            "    with --http, /metrics and /api/progress scraped {per_second}/s: {:.0} rows/s/core, \
             cost {:+.1} %; the monitor's hooks take {:.2} % of engine time",
            medians[v],
            (medians[0] / medians[v] - 1.0) * 100.0,
            median(&mut hooks[v]),
        );
    }
}

/// The queries `modes` runs as a stream and as a batch, and the event rate of their input:
/// 1,000 transactions a second (about 17 one-minute windows per country per million rows), or
/// the generator's default of one a second (a million rows span 11 days, so windows are many
/// and small).
const MODE_QUERIES: &[(&str, &str, f64)] = &[
    (
        "1-min tumbling, UDF in agg",
        "SELECT window(ts, '1 minute') AS w, country, count(*) AS n, \
         max(risk_score(amount, country)) AS worst \
         FROM transactions GROUP BY window(ts, '1 minute'), country",
        1_000.0,
    ),
    (
        "5-min/1-min hopping distinct",
        "SELECT window(ts, '5 minutes', '1 minute') AS w, country, \
         count(DISTINCT card_id) AS cards, count(*) AS n \
         FROM transactions GROUP BY window(ts, '5 minutes', '1 minute'), country",
        1_000.0,
    ),
    (
        "5-min/1-min hopping distinct, 1/s",
        "SELECT window(ts, '5 minutes', '1 minute') AS w, country, \
         count(DISTINCT card_id) AS cards, count(*) AS n \
         FROM transactions GROUP BY window(ts, '5 minutes', '1 minute'), country",
        1.0,
    ),
    (
        "30-s session, Wasm agg",
        "SELECT session_window(ts, '30 seconds') AS s, card_id, count(*) AS n, \
         sum(amount) AS total, dd_quantile(amount, 0.5) AS median \
         FROM transactions GROUP BY session_window(ts, '30 seconds'), card_id",
        1_000.0,
    ),
];

/// The input of [`MODE_QUERIES`] entry `query`.
fn mode_input(query: usize, rows: i64) -> Source {
    Source {
        name: "transactions",
        seed: 42,
        cards: 10_000,
        events_per_second: MODE_QUERIES[query].2,
        rows,
    }
}

/// How `modes` runs each query: as a stream on one core (one partition, a runtime of one
/// worker) and on two (two partitions, two workers); as a batch; as a batch whose sorts and
/// aggregations spill beyond [`SPILL_LIMIT_MIB`]; as a batch with windows written as plain
/// DataFusion plans (`RiffleSession::reference`, how batch mode ran them before it used the
/// stream's operators).
const MODES: [&str; 5] = ["stream-1", "stream-2", "batch", "batch-128MiB", "reference"];

/// The memory limit of the `batch-128MiB` mode.
const SPILL_LIMIT_MIB: usize = 128;

/// The first argument of a child process of `modes`.
const CHILD: &str = "--mode-child";

/// Each of [`MODE_QUERIES`] as a stream and as a batch, in processes of their own, in turn.
fn modes(rows: i64, dir: &Path, queries: &[usize]) {
    // The batch input: the generator's rows, as the stream reads them, in one Parquet file
    // written here so that the children's peak RSS does not include making it.
    const ROUNDS: usize = 3;
    for (q, (name, _, _)) in MODE_QUERIES.iter().enumerate() {
        if !queries.is_empty() && !queries.contains(&q) {
            continue;
        }
        let path = dir.join(format!("transactions-{q}.parquet"));
        let mut generator = FraudGenerator::new(fraud_config(&mode_input(q, rows)));
        let mut left = rows;
        let chunks = std::iter::from_fn(|| {
            let n = left.min(200_000);
            left -= n;
            (n > 0).then(|| generator.next_batch_of_ids(n as usize))
        });
        riffle::connectors::files::write_file(&path, FraudGenerator::schema(), chunks).unwrap();
        let mut results: [Vec<[f64; 3]>; MODES.len()] = Default::default();
        let mut failures: [Vec<String>; MODES.len()] = Default::default();
        for _ in 0..ROUNDS {
            for (m, mode) in MODES.iter().enumerate() {
                let out_dir = dir.join(format!("modes-{q}-{mode}"));
                let _ = std::fs::remove_dir_all(&out_dir);
                match child(&[
                    CHILD.to_string(),
                    mode.to_string(),
                    q.to_string(),
                    rows.to_string(),
                    path.display().to_string(),
                    out_dir.display().to_string(),
                ]) {
                    Ok(v) => results[m].push([v[0], v[1], v[2] / 1024.0]),
                    Err(e) => failures[m].push(e),
                }
            }
        }
        for (m, mode) in MODES.iter().enumerate() {
            if results[m].is_empty() {
                let name = format!("{name}, {mode}");
                println!(
                    "{name:<36} {rows:>9} rows  failed: {}",
                    failures[m].join("; ")
                );
                continue;
            }
            let median = |i: usize| {
                let mut v: Vec<f64> = results[m].iter().map(|r| r[i]).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let all: Vec<String> = results[m].iter().map(|r| format!("{:.0}", r[0])).collect();
            println!(
                "{:<36} {rows:>9} rows  {:>10.0} rows/s  {:>10.0} rows per CPU-second  \
                 peak RSS {:>6.0} MiB  (rows/s of each round: {})",
                format!("{name}, {mode}"),
                median(0),
                median(1),
                median(2),
                all.join(", ")
            );
        }
    }
}

/// Runs this benchmark as a child process with `args`: its numbers (the last is its peak
/// RSS in KiB), or the last line of what it said when it failed.
fn child(args: &[String]) -> Result<Vec<f64>, String> {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr);
        let first = said.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let cut: String = first.chars().take(240).collect();
        return Err(format!("{}: {cut}", output.status));
    }
    Ok(String::from_utf8(output.stdout)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect())
}

/// A child of `modes`: `MODE QUERY ROWS PARQUET OUT_DIR`; prints rows per
/// second, rows per CPU-second and its peak RSS in KiB. A stream counts its engine time (without the generator's); a batch
/// counts everything, reading and decoding the Parquet file included.
fn mode_child(args: &[String]) {
    let [mode, query, rows, parquet, out] = args else {
        panic!("usage: {CHILD} MODE QUERY ROWS PARQUET OUT_DIR")
    };
    let query: usize = query.parse().unwrap();
    let sql = MODE_QUERIES[query].1;
    let rows: i64 = rows.parse().unwrap();
    let out = Path::new(out);
    if let Some(cores) = mode.strip_prefix("stream-") {
        let cores: usize = cores.parse().unwrap();
        PARTITIONS.store(cores, Ordering::Relaxed);
        // BENCH_WORKERS: other runtime workers than partitions (to tell concurrency's cost
        // from partitioning's).
        let workers = std::env::var("BENCH_WORKERS")
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or(cores);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(run(
            sql,
            OutputMode::Append,
            Trigger::AvailableNow,
            None,
            &[mode_input(query, rows)],
            out,
            200_000,
            None,
        ));
        let engine = r.rows as f64 / (r.wall_s - r.read_s);
        let cpu = r.rows as f64 / (r.cpu_s - r.read_s);
        // Where the time went, for whoever runs a child by hand.
        let operators: Vec<String> = r
            .operators
            .iter()
            .map(|(id, s)| format!("{id} {s:.2} s"))
            .collect();
        eprintln!(
            "wall {:.2} s, reading {:.2} s; phases: operators {:.2} s, state {:.2} s, sink {:.2} \
             s, commit {:.2} s; operators (instances' time added up): {}",
            r.wall_s,
            r.read_s,
            r.phases[0],
            r.phases[1],
            r.phases[2],
            r.phases[3],
            operators.join(", ")
        );
        println!("{engine} {cpu} {}", common::usage().ru_maxrss);
        return;
    }
    // Batch: DataFusion's default, a partition per core.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let session = RiffleSession::new(SessionOptions {
            engine: EngineOptions::default(),
            row_error_policy: RowErrorPolicy::Null,
            batch_size: None,
            memory_limit: (mode == "batch-128MiB").then_some(SPILL_LIMIT_MIB << 20),
        })
        .unwrap();
        for name in ["fraud", "sketch"] {
            session.load_udfs(&udf(name), Vec::new(), None).unwrap();
        }
        session
            .register_table("transactions", Path::new(parquet))
            .await
            .unwrap();
        let started = Instant::now();
        let cpu_started = common::cpu_seconds();
        let mut df = session.dataframe(sql).await.unwrap();
        if mode == "reference" {
            df = session.reference(df).unwrap();
        }
        let result = session.collect(df).await.unwrap();
        let wall_s = started.elapsed().as_secs_f64();
        let cpu_s = common::cpu_seconds() - cpu_started;
        assert!(result.iter().map(|b| b.num_rows()).sum::<usize>() > 0);
        println!(
            "{} {} {}",
            rows as f64 / wall_s,
            rows as f64 / cpu_s,
            common::usage().ru_maxrss
        );
    });
}

/// The generator on one thread, whatever the query's partitions. The benchmark reports the
/// engine's rows per second and per CPU-second without the generator's time (a source's read
/// is timed by the wall clock): generating on several threads would leave CPU time of its
/// own in what is counted as the engine's. It forwards what a generator source implements;
/// a method the generator comes to implement must be forwarded here too.
struct OneThread(GeneratorSource);

impl StreamSource for OneThread {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }
    fn initial(&mut self) -> riffle::Result<serde_json::Value> {
        self.0.initial()
    }
    fn available(
        &mut self,
        from: &serde_json::Value,
        max_rows: usize,
    ) -> riffle::Result<serde_json::Value> {
        self.0.available(from, max_rows)
    }
    fn read(&mut self, from: &serde_json::Value, to: &serde_json::Value) -> riffle::Result<Input> {
        self.0.read(from, to)
    }
    fn finished(&self, at: &serde_json::Value) -> bool {
        self.0.finished(at)
    }
}

fn fraud_config(s: &Source) -> FraudConfig {
    FraudConfig {
        seed: s.seed,
        cards: s.cards,
        rows_per_second: s.events_per_second,
        max_disorder_micros: 2_000_000,
        ..FraudConfig::default()
    }
}
