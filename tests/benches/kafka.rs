//! Kafka → Riffle → Kafka: throughput per core and end-to-end latency, in both sink modes.
//!
//! ```text
//! scripts/kafka-broker.sh start        # or any broker
//! RIFFLE_KAFKA_BOOTSTRAP=127.0.0.1:29092 cargo bench -p riffle-tests --bench kafka --profile dev [-- ROWS [RATE]]
//! ```
//!
//! ROWS (default 300,000) are read for throughput; RATE (records/s, default 20,000) is the
//! producer's rate in the latency runs.
//!
//! The query is a filter plus the `risk_score` Wasm UDF over JSON fraud transactions on a
//! 6-partition topic, writing JSON to another topic.
//! - Throughput: ROWS records already in the topic, read with the available-now trigger.
//!   "Per core" divides by the CPU time this process used (user + system, all threads,
//!   librdkafka's included; the broker is another process and not counted).
//! - Latency: records produced at a fixed rate while the query runs with the low-latency
//!   trigger (and, exactly-once, also in 100 ms epochs); a `read_committed` consumer of the
//!   output topic measures, per record, the time from its creation at the producer (the
//!   record timestamp, ms) to when it could read it.
//! - The broker's floor: the same producer and reader on one topic with no query between, so
//!   the query's share of the latency is the difference.
//!
//! This is a benchmark, not a test: it asserts nothing about speed.

/// The allocator the `riffle` binary runs with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use riffle::connectors::generate::{FraudConfig, FraudGenerator};
use riffle::connectors::kafka::{
    Delivery, KafkaConfig, KafkaSink, KafkaSinkOptions, KafkaSource, KafkaSourceOptions,
    RecordFormat, StartAt, ensure_topic, produce_json,
};
use riffle::session::{RiffleSession, SessionOptions};
use riffle::stream::{StreamInput, StreamOptions, StreamingQuery, Trigger};
use riffle::udf::{EngineOptions, RowErrorPolicy};
use riffle_tests::udf;

const QUERY: &str = "SELECT tx_id, card_id, amount, kafka_ts, risk_score(amount, country) AS risk \
                     FROM transactions WHERE amount > 20";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn query(
    kafka: &KafkaConfig,
    input: &str,
    output: &str,
    delivery: Delivery,
    trigger: Trigger,
    start: StartAt,
    checkpoint: &std::path::Path,
) -> StreamingQuery {
    let session = RiffleSession::new(SessionOptions {
        engine: EngineOptions::default(),
        row_error_policy: RowErrorPolicy::Null,
        batch_size: None,
        memory_limit: None,
    })
    .unwrap();
    session.load_udfs(&udf("fraud"), Vec::new(), None).unwrap();
    let source = KafkaSource::new(KafkaSourceOptions {
        kafka: kafka.clone(),
        topic: input.into(),
        format: RecordFormat::Json,
        schema: FraudGenerator::schema(),
        timestamp_column: Some("kafka_ts".into()),
        start,
        dead_letter_topic: format!("{input}.dlq"),
        group_id: format!("bench-{output}"),
        fail_on_data_loss: true,
    })
    .unwrap();
    let input = StreamInput::register(&session, "transactions", Box::new(source)).unwrap();
    let plan = session
        .context()
        .state()
        .create_logical_plan(QUERY)
        .await
        .unwrap();
    let sink = KafkaSink::new(KafkaSinkOptions {
        kafka: kafka.clone(),
        topic: output.into(),
        format: RecordFormat::Json,
        key: Some("card_id".into()),
        header_columns: Vec::new(),
        headers: Vec::new(),
        delivery,
        marker_topic: riffle::connectors::kafka::sink::MARKER_TOPIC.into(),
    })
    .unwrap();
    StreamingQuery::new(
        &session,
        vec![input],
        plan,
        Box::new(sink),
        StreamOptions {
            trigger,
            max_rows_per_epoch: 50_000,
            checkpoint: checkpoint.to_path_buf(),
            progress_file: Some(checkpoint.join("progress.jsonl")),
            ..StreamOptions::default()
        },
    )
    .await
    .unwrap()
}

/// Where an epoch's time goes, from the query's own progress records in `checkpoint`: the
/// mean of each phase over the epochs, and the largest, in ms (the largest show which phase
/// the latency's tail comes from).
fn phases(checkpoint: &std::path::Path) -> String {
    let progress = std::fs::read_to_string(checkpoint.join("progress.jsonl")).unwrap_or_default();
    let mut phases: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut epochs = 0.0_f64;
    for line in progress.lines() {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(d) = p["durations"].as_object() {
            for (k, v) in d {
                let v = v.as_f64().unwrap_or(0.0);
                let (sum, max) = phases.entry(k.clone()).or_default();
                *sum += v;
                *max = max.max(v);
            }
            epochs += 1.0;
        }
    }
    let show = |f: &dyn Fn(&(f64, f64)) -> f64| {
        phases
            .iter()
            .map(|(k, v)| format!("{k} {:.1}", f(v)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "per epoch, mean: {}\n  per epoch, largest: {}",
        show(&|(sum, _)| sum / epochs.max(1.0)),
        show(&|(_, max)| *max)
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let Ok(bootstrap) = std::env::var("RIFFLE_KAFKA_BOOTSTRAP") else {
        eprintln!(
            "set RIFFLE_KAFKA_BOOTSTRAP (scripts/kafka-broker.sh start gives 127.0.0.1:29092)"
        );
        return;
    };
    let numbers: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = numbers.first().map_or(300_000, |n| *n as usize);
    let rate = numbers.get(1).copied().unwrap_or(20_000.0);
    let kafka = KafkaConfig {
        bootstrap,
        properties: BTreeMap::new(),
    };
    let run = format!("{:x}", now_ms());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Every topic made here, deleted at the end: a test broker may keep all it holds in memory.
    let mut created: Vec<String> = Vec::new();

    // Input for the throughput runs.
    let input = format!("bench-in-{run}");
    rt.block_on(ensure_topic(&kafka, &input, 6)).unwrap();
    created.push(input.clone());
    let batch = FraudGenerator::new(FraudConfig {
        rows_per_second: 1_000.0,
        ..FraudConfig::default()
    })
    .next_batch(rows);
    let started = Instant::now();
    produce_json(&kafka, &input, Some("card_id"), None, [batch], |_| {}).unwrap();
    println!(
        "produced {rows} JSON records to {input} at {:.0} records/s",
        rows as f64 / started.elapsed().as_secs_f64()
    );

    for (name, delivery) in [
        ("exactly-once", Delivery::ExactlyOnce),
        ("at-least-once", Delivery::AtLeastOnce),
    ] {
        let output = format!("bench-out-{name}-{run}");
        rt.block_on(ensure_topic(&kafka, &output, 6)).unwrap();
        created.push(output.clone());
        let summary = rt.block_on(async {
            let mut q = query(
                &kafka,
                &input,
                &output,
                delivery,
                Trigger::AvailableNow,
                StartAt::Earliest,
                &dir.path().join(format!("tp-{name}")),
            )
            .await;
            let (cpu, wall) = (common::cpu_seconds(), Instant::now());
            let s = q.run(&AtomicBool::new(false)).await.unwrap();
            (s, common::cpu_seconds() - cpu, wall.elapsed().as_secs_f64())
        });
        let (s, cpu, wall) = summary;
        println!("  {}", phases(&dir.path().join(format!("tp-{name}"))));
        println!(
            "throughput {name:<13}: {} rows in {} epochs, {wall:.2} s wall, {cpu:.2} s CPU: \
             {:.0} rows/s, {:.0} rows per CPU-second",
            s.input_rows,
            s.epochs,
            s.input_rows as f64 / wall,
            s.input_rows as f64 / cpu.max(1e-9)
        );
    }

    // Latency at a fixed rate.
    let seconds = 8.0;

    // The broker's floor: the same producer at the same rate and the same read_committed
    // reader, on one topic with no Riffle in between.
    {
        let topic = format!("bench-floor-{run}");
        rt.block_on(ensure_topic(&kafka, &topic, 6)).unwrap();
        created.push(topic.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let reader = read_latencies(&kafka.bootstrap, &topic, &stop, |s| s.timestamp_ms);
        std::thread::sleep(Duration::from_secs(2)); // let the reader settle
        let n = (rate * seconds) as usize;
        let batch = FraudGenerator::new(FraudConfig::default()).next_batch(n);
        produce_json(&kafka, &topic, Some("card_id"), Some(rate), [batch], |_| {}).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let mut l = reader.join().unwrap();
        l.sort_by(f64::total_cmp);
        println!(
            "broker floor  at {rate:.0} records/s: {} records, creation → visible to \
             read_committed with no query between: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            l.len(),
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            l.last().copied().unwrap_or(f64::NAN)
        );
    }
    // Exactly-once as soon as rows arrive and in 100 ms epochs (issue 14's shape: its
    // transaction round trips are paid once per epoch), and at-least-once.
    for (name, delivery, trigger) in [
        ("exactly-once", Delivery::ExactlyOnce, Trigger::LowLatency),
        (
            "exactly-once-100ms",
            Delivery::ExactlyOnce,
            Trigger::ProcessingTime(Duration::from_millis(100)),
        ),
        ("at-least-once", Delivery::AtLeastOnce, Trigger::LowLatency),
    ] {
        let input = format!("bench-lat-in-{name}-{run}");
        let output = format!("bench-lat-out-{name}-{run}");
        rt.block_on(ensure_topic(&kafka, &input, 6)).unwrap();
        rt.block_on(ensure_topic(&kafka, &output, 6)).unwrap();
        created.extend([input.clone(), output.clone()]);
        let stop = Arc::new(AtomicBool::new(false));
        let query_thread = {
            let (kafka, input, output, stop) =
                (kafka.clone(), input.clone(), output.clone(), stop.clone());
            let checkpoint = dir.path().join(format!("lat-{name}"));
            std::thread::spawn(move || {
                // Multi-threaded (with one worker): the Kafka sink writes with `block_in_place`.
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut q = query(
                        &kafka,
                        &input,
                        &output,
                        delivery,
                        trigger,
                        StartAt::Earliest,
                        &checkpoint,
                    )
                    .await;
                    q.run(&stop).await.unwrap()
                })
            })
        };
        // The reader: every output record's visibility time minus its source creation time.
        let reader = read_latencies(&kafka.bootstrap, &output, &stop, |s| {
            let v: serde_json::Value = serde_json::from_slice(&s.payload).ok()?;
            Some(chrono_ms(v["kafka_ts"].as_str()?))
        });
        std::thread::sleep(Duration::from_secs(2)); // let the query and reader settle
        let n = (rate * seconds) as usize;
        let batch = FraudGenerator::new(FraudConfig::default()).next_batch(n);
        produce_json(&kafka, &input, Some("card_id"), Some(rate), [batch], |_| {}).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let summary = query_thread.join().unwrap();
        println!("  {}", phases(&dir.path().join(format!("lat-{name}"))));
        let mut l = reader.join().unwrap();
        l.sort_by(f64::total_cmp);
        println!(
            "latency {name:<18} at {rate:.0} records/s: {} records out in {} epochs; \
             creation → visible to read_committed: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            l.len(),
            summary.epochs,
            percentile(&l, 0.5),
            percentile(&l, 0.99),
            l.last().copied().unwrap_or(f64::NAN)
        );
    }
    delete_topics(&kafka, &rt, &created);
}

/// Deletes `topics` and their dead-letter topics (the sources create them when they need them).
fn delete_topics(kafka: &KafkaConfig, rt: &tokio::runtime::Runtime, topics: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .create()
        .unwrap();
    let names: Vec<String> = topics
        .iter()
        .flat_map(|t| [t.clone(), format!("{t}.dlq")])
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let results = match rt.block_on(admin.delete_topics(&names, &AdminOptions::new())) {
        Ok(results) => results,
        Err(e) => return eprintln!("warning: the benchmark's topics were not deleted: {e}"),
    };
    for result in results {
        match result {
            // A dead-letter topic that was never created: nothing to delete.
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => eprintln!("warning: topic {topic} was not deleted: {code}"),
        }
    }
}

/// A `read_committed` reader of `topic` until `stop`: for every record it reads, the time from
/// its creation (`created`, ms since the epoch) to when it was read. The reader only notes
/// the time and keeps the record; `created` runs after the stop, so that parsing never
/// delays reading (or takes a core from the query while it runs).
fn read_latencies(
    bootstrap: &str,
    topic: &str,
    stop: &Arc<AtomicBool>,
    created: fn(&Seen) -> Option<i64>,
) -> std::thread::JoinHandle<Vec<f64>> {
    let (bootstrap, topic, stop) = (bootstrap.to_string(), topic.to_string(), stop.clone());
    std::thread::spawn(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("lat-{topic}"))
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "5")
            .create()
            .unwrap();
        consumer.subscribe(&[&topic]).unwrap();
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                seen.push(Seen {
                    read_ms: now_ms(),
                    timestamp_ms: m.timestamp().to_millis(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                });
            }
        }
        seen.iter()
            .filter_map(|s| Some((s.read_ms - created(s)?) as f64))
            .collect()
    })
}

/// A record as the latency reader saw it.
struct Seen {
    /// When it was read, ms since the epoch.
    read_ms: i64,
    /// Its Kafka timestamp.
    timestamp_ms: Option<i64>,
    payload: Vec<u8>,
}

/// Parses arrow-json's timestamp text (`2026-01-01T00:00:00.123`, UTC) to ms.
fn chrono_ms(text: &str) -> i64 {
    let array = arrow::array::StringArray::from(vec![text]);
    let ts = arrow::compute::cast(
        &array,
        &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
    )
    .unwrap();
    ts.as_any()
        .downcast_ref::<arrow::array::TimestampMillisecondArray>()
        .unwrap()
        .value(0)
}
