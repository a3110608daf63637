//! Kafka in, Kafka and Delta out, against a real Kafka-protocol broker (noida-db, started by
//! the test unless `RIFFLE_KAFKA_BOOTSTRAP` names one), with real `riffle` processes killed by
//! SIGKILL and restarted; the Delta tables are read back by the independent `deltalake` Python
//! package.

mod common;

use common::broker::Broker;
use common::{python_delta_columns, riffle, runtime};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type};
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use riffle::connectors::files::write_file;
use riffle::connectors::generate::{FraudConfig, FraudGenerator};
use riffle::connectors::kafka::{ensure_topic, produce_json};

fn transactions(skip: i64, rows: usize) -> RecordBatch {
    FraudGenerator::starting_at(
        FraudConfig {
            rows_per_second: 20.0,
            ..FraudConfig::default()
        },
        skip,
    )
    .next_batch(rows)
}

/// Produces generated transactions (JSON, keyed by card) to a new 6-partition topic.
fn produce(broker: &Broker, topic: &str, rows: &RecordBatch) {
    let rt = runtime();
    rt.block_on(ensure_topic(&broker.kafka(), topic, 6))
        .unwrap();
    let sent = produce_json(
        &broker.kafka(),
        topic,
        Some("card_id"),
        None,
        [rows.clone()],
        |_| {},
    )
    .unwrap();
    assert_eq!(sent as usize, rows.num_rows());
}

fn producer(broker: &Broker) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap()
}

/// A record read back: partition, offset, value, headers.
type Read = (i32, i64, Vec<u8>, Vec<(String, String)>);

/// Every committed record of `topic` (read_committed), from the start to the end as of now.
fn read_topic(broker: &Broker, topic: &str) -> Vec<Read> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", "riffle-test-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, Duration::from_secs(10))
            .unwrap();
        tpl.add_partition_offset(topic, *p, rdkafka::Offset::Offset(low))
            .unwrap();
        ends.insert(*p, high);
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut idle = Instant::now();
    loop {
        // Done when every partition's position reached its end (transaction markers take
        // offsets too, so positions, not record offsets, decide).
        let position = consumer.position().unwrap();
        let done = position.elements().iter().all(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => o >= ends[&e.partition()],
            _ => ends[&e.partition()] == 0,
        });
        if done || idle.elapsed() > Duration::from_secs(5) {
            break;
        }
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.unwrap();
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push((
                m.partition(),
                m.offset(),
                m.payload().unwrap_or_default().to_vec(),
                headers,
            ));
            idle = Instant::now();
        }
    }
    out
}

const QUERY: &str = "SELECT tx_id, card_id, amount, risk_score(amount, country) AS risk \
                     FROM transactions WHERE amount > 100";

const SCHEMA: &str = "tx_id BIGINT NOT NULL, ts TIMESTAMP NOT NULL, card_id BIGINT NOT NULL, \
                      merchant_id BIGINT NOT NULL, amount DOUBLE, country VARCHAR, \
                      channel VARCHAR NOT NULL, email VARCHAR, lat DOUBLE NOT NULL, \
                      lon DOUBLE NOT NULL, home_lat DOUBLE NOT NULL, home_lon DOUBLE NOT NULL, \
                      is_fraud BOOLEAN NOT NULL";

fn pipeline(dir: &Path, name: &str, broker: &Broker, topic: &str, sink: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let udf = riffle_tests::udf("fraud");
    std::fs::write(
        &path,
        format!(
            r#"
query = """{QUERY}"""
[source]
name = "transactions"
batch = "history.parquet"
[source.stream]
kind = "kafka"
bootstrap = "{bootstrap}"
topic = "{topic}"
format = "json"
schema = "{SCHEMA}"
[source.stream.properties]
"fetch.wait.max.ms" = "20"
[[udfs]]
path = "{udf}"
[sink]
{sink}
[stream]
checkpoint = "{name}-checkpoint"
trigger = "available-now"
max_rows_per_epoch = 500
"#,
            bootstrap = broker.bootstrap,
            udf = udf.display()
        ),
    )
    .unwrap();
    path
}

fn run_ok(mut command: Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `pipeline` in stream mode: first crashing it right after epoch 4's sink write and
/// before its commit (the window where a sink that does not de-duplicate would write twice),
/// with one of the checkpoint's writers held from epoch `held.1` on (as by a slow disk): the
/// commit writer (`held.0 = "commit"`: epochs `held.1` to 4 are planned, not committed), or
/// the plan writer (`"plan"`: their plans are lost, and only a sink that carries plans has
/// them); then SIGKILLing it `kills` times at staggered moments, then letting a last run
/// finish. Returns how many kills landed while it was still working.
///
/// The runs after the crash take smaller epochs. They must replay epochs up to 4 with the
/// offsets planned for them: an epoch planned anew would cover other records, and the sink,
/// which holds those epochs already, would skip it.
fn run_with_kills(pipeline: &Path, held: (&str, u32), kills: u32) -> u32 {
    let out = riffle(pipeline, "stream")
        .env("RIFFLE_CRASH", "after-sink:4")
        .env("RIFFLE_HANG", format!("{}:{}", held.0, held.1))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("RIFFLE_CRASH: aborting")
            && said.contains(&format!("RIFFLE_HANG: holding {} epoch {}", held.0, held.1))
            && !out.status.success(),
        "the injected crash did not happen: {said}"
    );
    // What the crash left: epoch `held.1` not committed, and with the plan writer held, not
    // even planned.
    let checkpoint = PathBuf::from(format!(
        "{}-checkpoint",
        pipeline.with_extension("").display()
    ));
    let file = |dir: &str| checkpoint.join(dir).join(format!("{:010}.json", held.1));
    assert!(file("offsets").exists() == (held.0 != "plan") && !file("commits").exists());
    let text = std::fs::read_to_string(pipeline).unwrap();
    let smaller = text.replace("max_rows_per_epoch = 500", "max_rows_per_epoch = 300");
    assert_ne!(text, smaller);
    std::fs::write(pipeline, smaller).unwrap();
    let mut landed = 0;
    for attempt in 0..kills {
        let mut child = riffle(pipeline, "stream").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(700 + 400 * attempt as u64));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            landed += 1;
        } else {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    run_ok(riffle(pipeline, "stream"));
    landed
}

/// (tx_id, risk bits) of the expected rows: the query in batch mode over the same rows.
fn expected(dir: &Path, rows: &RecordBatch, broker: &Broker) -> HashMap<(i64, Option<u64>), usize> {
    write_file(&dir.join("history.parquet"), rows.schema(), [rows.clone()]).unwrap();
    let p = pipeline(
        dir,
        "expected",
        broker,
        "unused",
        "batch = \"expected.parquet\"",
    );
    run_ok(riffle(&p, "batch"));
    let batches = riffle::connectors::files::read_file(
        &dir.join("expected.parquet"),
        riffle::common::FileFormat::Parquet,
        None,
    )
    .unwrap();
    count_batches(&batches)
}

/// Every batch of the Parquet files in `dir/out`.
fn parquet_out(dir: &Path) -> Vec<RecordBatch> {
    std::fs::read_dir(dir.join("out"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .flat_map(|p| {
            riffle::connectors::files::read_file(&p, riffle::common::FileFormat::Parquet, None)
                .unwrap()
        })
        .collect()
}

fn count_batches(batches: &[RecordBatch]) -> HashMap<(i64, Option<u64>), usize> {
    let mut m = HashMap::new();
    for b in batches {
        let ids = b
            .column_by_name("tx_id")
            .unwrap()
            .as_primitive::<Int64Type>();
        let risk = b
            .column_by_name("risk")
            .unwrap()
            .as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let r = (!risk.is_null(i)).then(|| risk.value(i).to_bits());
            *m.entry((ids.value(i), r)).or_default() += 1;
        }
    }
    m
}

/// How many times each (tx_id, risk bits) row occurs.
type RowCounts = HashMap<(i64, Option<u64>), usize>;

/// (tx_id, risk bits) of JSON records, decoded with arrow-json, whose float parsing is exact
/// (serde_json's default is not).
fn count_records(records: &[Read]) -> HashMap<(i64, Option<u64>), usize> {
    let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("tx_id", arrow::datatypes::DataType::Int64, false),
        arrow::datatypes::Field::new("risk", arrow::datatypes::DataType::Float64, true),
    ]));
    let mut text = Vec::new();
    for (_, _, payload, _) in records {
        text.extend_from_slice(payload);
        text.push(b'\n');
    }
    let batches: Vec<RecordBatch> = arrow::json::ReaderBuilder::new(schema)
        .build(std::io::Cursor::new(text))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    count_batches(&batches)
}

/// The `[sink.stream]` section of an exactly-once Kafka sink into `topic`.
fn kafka_sink(broker: &Broker, topic: &str) -> String {
    format!(
        "[sink.stream]\nkind = \"kafka\"\nbootstrap = \"{}\"\ntopic = \"{topic}\"\n",
        broker.bootstrap
    )
}

/// One test's setup: `rows` transactions produced to topic `name`, the batch run's result over
/// them (the oracle), and pipeline `name` streaming the topic into `sink`.
fn setup(
    broker: &Broker,
    dir: &Path,
    name: &str,
    rows: usize,
    sink: &str,
) -> (RecordBatch, RowCounts, PathBuf) {
    let batch = transactions(0, rows);
    produce(broker, name, &batch);
    let want = expected(dir, &batch, broker);
    let path = pipeline(dir, name, broker, name, sink);
    (batch, want, path)
}

/// Rewrites a pipeline file: `progress.jsonl` beside it, and each `(from, to)` replaced.
fn edit_pipeline(path: &Path, edits: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(path).unwrap().replace(
        "trigger = \"available-now\"",
        "trigger = \"available-now\"\nprogress = \"progress.jsonl\"",
    );
    for (from, to) in edits {
        text = text.replace(from, to);
    }
    std::fs::write(path, &text).unwrap();
    text
}

/// Rows of a Delta table as read by the `deltalake` Python package (delta-rs's Python
/// binding, installed from PyPI: an independent reader of the table format).
fn python_delta_rows(table: &Path) -> HashMap<(i64, Option<u64>), usize> {
    let columns = python_delta_columns(table, &["tx_id", "risk"]);
    let (ids, risks): (Vec<i64>, Vec<Option<i64>>) = serde_json::from_value(columns).unwrap();
    let mut m = HashMap::new();
    for (id, r) in ids.into_iter().zip(risks) {
        *m.entry((id, r.map(|b| b as u64))).or_default() += 1;
    }
    m
}

#[test]
fn kafka_to_kafka_and_delta_exactly_once_across_kill_9() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let rows = transactions(0, 40_000);
    produce(&broker, "tx", &rows);
    let want = expected(dir.path(), &rows, &broker);
    assert!(want.len() > 5_000, "{}", want.len());

    let rt = runtime();
    rt.block_on(ensure_topic(&broker.kafka(), "scored", 3))
        .unwrap();
    let to_kafka = pipeline(
        dir.path(),
        "to-kafka",
        &broker,
        "tx",
        &format!(
            "[sink.stream]\nkind = \"kafka\"\nbootstrap = \"{}\"\ntopic = \"scored\"\nkey = \"card_id\"\n",
            broker.bootstrap
        ),
    );
    let to_delta = pipeline(
        dir.path(),
        "to-delta",
        &broker,
        "tx",
        "[sink.stream]\nkind = \"delta\"\npath = \"scored-table\"\n",
    );
    // Both run at once: each crashes at a failpoint between its sink write and its commit,
    // and is then SIGKILLed at random moments (a smoke test: only the result is checked).
    // The Kafka sink carries the plans of its epochs, so the Kafka run crashes with epochs 3
    // and 4 written to the topic and their plans never written to the checkpoint. The Delta
    // sink waits for each plan, so its run holds commits instead.
    let kafka_pipeline = to_kafka.clone();
    let kafka_run = std::thread::spawn(move || run_with_kills(&to_kafka, ("plan", 3), 3));
    let delta_kills = run_with_kills(&to_delta, ("commit", 2), 3);
    let kafka_kills = kafka_run.join().unwrap();
    eprintln!("SIGKILLs that landed: kafka {kafka_kills}, delta {delta_kills}");

    // The output topic, read_committed: every expected row exactly once, with the UDF's
    // content hash in the headers.
    let records = read_topic(&broker, "scored");
    for (_, _, _, headers) in &records {
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "riffle.udf.riffle_udfs_fraud" && v.len() == 64),
            "{headers:?}"
        );
    }
    let got = count_records(&records);
    assert_eq!(got.len(), want.len(), "distinct rows in the topic");
    assert_eq!(got, want, "each row exactly once in the topic");

    // The Delta table, read by an independent reader: the same.
    let table = python_delta_rows(&dir.path().join("scored-table"));
    assert_eq!(table, want, "each row exactly once in the Delta table");

    // `riffle verify` says the same from the pipeline files alone: it recomputes the query
    // over the batch input and reads back the topic (read_committed) and the table.
    for (pipeline, output) in [
        (&kafka_pipeline, "Kafka topic scored"),
        (&to_delta, "Delta"),
    ] {
        let out = common::riffle_in(
            &["verify", pipeline.to_str().unwrap(), "--key", "tx_id"],
            dir.path(),
        );
        let report = common::text(&out.stdout);
        assert!(
            out.status.success(),
            "{report}{}",
            common::text(&out.stderr)
        );
        assert!(report.contains(output), "{report}");
        assert!(
            report.contains(&format!(
                "matched {} · mismatched 0 · missing 0 · extra 0",
                want.values().sum::<usize>()
            )),
            "{report}"
        );
    }
}

#[test]
fn malformed_records_go_to_the_dead_letter_topic_and_the_query_keeps_running() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let rows = transactions(0, 3_000);
    produce(&broker, "dirty", &rows);
    let bad: Vec<(&str, &[u8])> = vec![
        ("not json", b"this is not json"),
        (
            "wrong type",
            br#"{"tx_id": "seven", "ts": "2026-01-01T00:00:00", "card_id": 1}"#,
        ),
        ("missing non-null", br#"{"tx_id": 5, "card_id": 1}"#),
        ("empty", b""),
    ];
    let p = producer(&broker);
    for (_, payload) in &bad {
        p.send(
            BaseRecord::<[u8], [u8]>::to("dirty")
                .payload(*payload)
                .key(&b"k"[..]),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
    // More good rows after the bad ones: the query must get past them.
    produce(&broker, "dirty", &transactions(3_000, 1_000));
    let all =
        arrow::compute::concat_batches(&rows.schema(), &[rows.clone(), transactions(3_000, 1_000)])
            .unwrap();
    let want = expected(dir.path(), &all, &broker);

    let path = pipeline(dir.path(), "dirty", &broker, "dirty", "stream = \"out\"");
    run_ok(riffle(&path, "stream"));
    let batches = parquet_out(dir.path());
    assert_eq!(
        count_batches(&batches),
        want,
        "every good record was processed"
    );

    let letters = read_topic(&broker, "dirty.dlq");
    assert_eq!(letters.len(), bad.len(), "{letters:?}");
    for (_, _, payload, headers) in &letters {
        let header = |k: &str| {
            headers
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no {k} header in {headers:?}"))
        };
        assert!(
            bad.iter().any(|(_, b)| *b == payload.as_slice()),
            "original bytes kept"
        );
        assert_eq!(header("riffle.topic"), "dirty");
        header("riffle.partition").parse::<i32>().unwrap();
        header("riffle.offset").parse::<i64>().unwrap();
        assert!(!header("riffle.error").is_empty());
    }

    // The progress (and so `/metrics`) counts the dead letters, and reports the consumer lag
    // per partition: none left once the available-now run has read everything.
    let progress = common::progress_lines(&dir.path().join("dirty-checkpoint/progress.jsonl"));
    let counted: u64 = progress
        .iter()
        .map(|p| p["sources"][0]["dead_letters"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(counted, bad.len() as u64);
    let lag = progress
        .iter()
        .rev()
        .find_map(|p| p["sources"][0]["lag"].as_object())
        .expect("a lag per partition");
    assert!(!lag.is_empty());
    assert!(lag.values().all(|v| v == 0), "{lag:?}");
}

#[test]
fn a_running_query_shows_its_dead_letters_in_the_monitor() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let rows = transactions(0, 1_000);
    produce(&broker, "dirty-live", &rows);
    let want = expected(dir.path(), &rows, &broker);
    let bad: [&[u8]; 2] = [
        b"this is not json",
        br#"{"tx_id": "seven", "ts": "2026-01-01T00:00:00", "card_id": 1}"#,
    ];
    let p = producer(&broker);
    for payload in bad {
        p.send(
            BaseRecord::<[u8], [u8]>::to("dirty-live")
                .payload(payload)
                .key(&b"k"[..]),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
    let path = pipeline(
        dir.path(),
        "dirty-live",
        &broker,
        "dirty-live",
        "stream = \"out\"",
    );
    // Not available-now: the run goes on, serving, until it is stopped.
    edit_pipeline(
        &path,
        &[(
            "trigger = \"available-now\"",
            "interval = \"100 milliseconds\"",
        )],
    );
    let run = common::http::Run::start(&path);
    let deadline = Instant::now() + Duration::from_secs(120);
    let shown = loop {
        let errors = run.json("/api/errors");
        let shown: Vec<serde_json::Value> = errors
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["record"].is_object())
            .cloned()
            .collect();
        if shown.len() == bad.len() {
            break shown;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters not shown: {errors}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Each is a record of the dead-letter topic: where it came from, why, and its bytes.
    let letters = read_topic(&broker, "dirty-live.dlq");
    assert_eq!(letters.len(), bad.len(), "{letters:?}");
    for (_, _, payload, headers) in &letters {
        let header = |k: &str| {
            headers
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let partition: i64 = header("riffle.partition").parse().unwrap();
        let offset: i64 = header("riffle.offset").parse().unwrap();
        let entry = shown
            .iter()
            .find(|e| e["record"]["partition"] == partition && e["record"]["offset"] == offset)
            .unwrap_or_else(|| panic!("no entry for {partition}/{offset}: {shown:?}"));
        let record = &entry["record"];
        assert_eq!(entry["kind"], "dead-letter");
        assert_eq!(record["source"], "transactions");
        assert_eq!(record["topic"], "dirty-live");
        assert_eq!(record["dead_letter_topic"], "dirty-live.dlq");
        assert_eq!(record["error"], header("riffle.error").as_str());
        assert_eq!(record["value"], String::from_utf8_lossy(payload).as_ref());
        assert_eq!(record["key"], "k");
        let message = entry["message"].as_str().unwrap();
        assert!(message.contains(&format!("offset {offset}")), "{message}");
    }
    // The good records may sit in partitions the run reads later: wait for all of them.
    while run.json("/api/query")["totals"]["input_rows"].as_u64() < Some(rows.num_rows() as u64) {
        assert!(Instant::now() < deadline, "not every good record was read");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, _, metrics) = run.get("/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("riffle_source_dead_letters_total{")
                && l.contains("source=\"transactions\"")
                && l.ends_with(&format!(" {}", bad.len()))),
        "{metrics}"
    );
    assert!(run.stop().success());
    let batches = parquet_out(dir.path());
    assert_eq!(count_batches(&batches), want, "every good record, once");
}

#[test]
fn backfill_and_stream_into_one_delta_table_equal_the_batch_result() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    // History (a Parquet file) and the live part (a topic) of one sequence of transactions.
    let history = transactions(0, 8_000);
    let live = transactions(8_000, 8_000);
    let all = arrow::compute::concat_batches(&history.schema(), &[history.clone(), live.clone()])
        .unwrap();
    let want = expected(dir.path(), &all, &broker);
    write_file(
        &dir.path().join("history.parquet"),
        history.schema(),
        [history],
    )
    .unwrap();
    produce(&broker, "live", &live);

    let sink = "batch = { kind = \"delta\", path = \"fraud-table\" }\n\
                [sink.stream]\nkind = \"delta\"\npath = \"fraud-table\"\n";
    let path = pipeline(dir.path(), "both", &broker, "live", sink);
    // The backfill starts once the stream has committed into the table, and runs while the
    // stream goes on committing epoch after epoch.
    let stream = riffle(&path, "stream").spawn().unwrap();
    let first = dir
        .path()
        .join("fraud-table/_delta_log/00000000000000000000.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !first.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    run_ok(riffle(&path, "batch"));
    let out = stream.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let table = python_delta_rows(&dir.path().join("fraud-table"));
    assert_eq!(table, want, "backfill + stream = batch over all rows");

    // Every commit, the backfill's and each epoch's, names the UDF build that made its rows
    // (as delta-rs's Python binding reads the commit history).
    let script = "import json, os, sys\n\
                  from deltalake import DeltaTable\n\
                  print(json.dumps(DeltaTable(sys.argv[1]).history(), default=str), flush=True)\n\
                  os._exit(0)";
    let history = Command::new("python3")
        .args(["-c", script])
        .arg(dir.path().join("fraud-table"))
        .output()
        .unwrap();
    assert!(
        history.status.success(),
        "{}",
        String::from_utf8_lossy(&history.stderr)
    );
    let commits: Vec<serde_json::Value> = serde_json::from_slice(&history.stdout).unwrap();
    let module = riffle_tests::udf("fraud");
    let sha = Command::new("sha256sum").arg(&module).output().unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout)[..64].to_string();
    assert!(commits.len() > 2, "{commits:?}");
    for commit in &commits {
        assert_eq!(
            commit["riffle.udf.riffle_udfs_fraud"], sha,
            "commit {commit}"
        );
    }
}

/// Two topics as two sources of one query (an interval join), through crashes at failpoints:
/// the output equals batch mode over the same rows, each row once.
#[test]
fn two_topics_joined_as_two_sources_survive_crashes() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let config = |seed, rate| FraudConfig {
        seed,
        rows_per_second: rate,
        cards: 200,
        max_disorder_micros: 2_000_000,
        ..FraudConfig::default()
    };
    let tx = FraudGenerator::new(config(42, 5.0)).next_batch(6_000);
    let logins = FraudGenerator::new(config(7, 2.0)).next_batch(2_400);
    produce(&broker, "tx2", &tx);
    produce(&broker, "logins2", &logins);
    write_file(&dir.path().join("tx.parquet"), tx.schema(), [tx.clone()]).unwrap();
    write_file(
        &dir.path().join("logins.parquet"),
        logins.schema(),
        [logins.clone()],
    )
    .unwrap();
    let source = |name: &str, topic: &str, batch: &str| {
        format!(
            r#"
[sources.{name}]
event_time = "ts"
# Partitions are read side by side but not in event-time lockstep: allow for that.
watermark = "20 minutes"
batch = "{batch}"
[sources.{name}.stream]
kind = "kafka"
bootstrap = "{bootstrap}"
topic = "{topic}"
schema = "{SCHEMA}"
"#,
            bootstrap = broker.bootstrap
        )
    };
    let path = dir.path().join("join.toml");
    std::fs::write(
        &path,
        format!(
            r#"
query = """SELECT t.tx_id, t.ts, l.tx_id AS login, l.country AS login_country
FROM transactions t JOIN logins l ON t.card_id = l.card_id
AND l.ts BETWEEN t.ts - INTERVAL '2' MINUTE AND t.ts + INTERVAL '30' SECOND"""
{}
{}
[sink]
batch = "expected.parquet"
stream = "out"
[stream]
checkpoint = "checkpoint"
trigger = "available-now"
max_rows_per_epoch = 400
"#,
            source("transactions", "tx2", "tx.parquet"),
            source("logins", "logins2", "logins.parquet"),
        ),
    )
    .unwrap();
    run_ok(riffle(&path, "batch"));
    let text = |batches: &[RecordBatch]| {
        let options = arrow::util::display::FormatOptions::default().with_null("NULL");
        let mut out = Vec::new();
        for b in batches {
            let f: Vec<_> = b
                .columns()
                .iter()
                .map(|c| {
                    arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &options).unwrap()
                })
                .collect();
            for r in 0..b.num_rows() {
                out.push(
                    f.iter()
                        .map(|f| f.value(r).to_string())
                        .collect::<Vec<_>>()
                        .join("|"),
                );
            }
        }
        out.sort();
        out
    };
    let want = text(
        &riffle::connectors::files::read_file(
            &dir.path().join("expected.parquet"),
            riffle::common::FileFormat::Parquet,
            None,
        )
        .unwrap(),
    );
    assert!(want.len() > 500, "{} joined rows", want.len());
    for crash in ["after-state:2", "after-sink:5", "after-plan:9"] {
        let out = riffle(&path, "stream")
            .env("RIFFLE_CRASH", crash)
            .output()
            .unwrap();
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("RIFFLE_CRASH"),
            "{crash}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    run_ok(riffle(&path, "stream"));
    let mut files: Vec<_> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    let batches: Vec<RecordBatch> = files
        .iter()
        .flat_map(|p| {
            riffle::connectors::files::read_file(p, riffle::common::FileFormat::Parquet, None)
                .unwrap()
        })
        .collect();
    assert!(
        text(&batches) == want,
        "the joined rows of batch mode, each once"
    );
}

/// Deletes every partition's records below `before` (what retention does to old segments).
fn delete_records(broker: &Broker, topic: &str, before: &BTreeMap<i32, i64>) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (p, o) in before {
        tpl.add_partition_offset(topic, *p, rdkafka::Offset::Offset(*o))
            .unwrap();
    }
    let done = runtime()
        .block_on(admin.delete_records(&tpl, &AdminOptions::new()))
        .unwrap();
    for e in done.elements() {
        e.error().unwrap();
    }
}

fn tx_id(json: &[u8]) -> i64 {
    serde_json::from_slice::<serde_json::Value>(json).unwrap()["tx_id"]
        .as_i64()
        .unwrap()
}

#[test]
fn records_deleted_before_they_were_read_stop_the_query_unless_it_is_told_to_go_on() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let (first, want_first, path) =
        setup(&broker, dir.path(), "retained", 1_200, "stream = \"out\"");
    let text = edit_pipeline(&path, &[]);
    run_ok(riffle(&path, "stream"));
    let read: BTreeMap<i32, i64> =
        read_topic(&broker, "retained")
            .iter()
            .fold(BTreeMap::new(), |mut m, (p, o, _, _)| {
                let end = m.entry(*p).or_insert(0);
                *end = (*end).max(o + 1);
                m
            });
    assert_eq!(read.len(), 6, "every partition has records");

    // While the query is down, more records arrive and retention deletes the first five of
    // every partition after the ones the query read.
    let second = transactions(1_200, 1_200);
    produce(&broker, "retained", &second);
    let cut: BTreeMap<i32, i64> = read.iter().map(|(p, o)| (*p, o + 5)).collect();
    let lost: Vec<i64> = read_topic(&broker, "retained")
        .iter()
        .filter(|(p, o, _, _)| (read[p]..cut[p]).contains(o))
        .map(|(_, _, value, _)| tx_id(value))
        .collect();
    assert_eq!(lost.len(), 30);
    delete_records(&broker, "retained", &cut);

    let out = riffle(&path, "stream").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "data loss must stop the query");
    assert!(stderr.contains("data loss"), "{stderr}");
    let (p, o) = read.iter().next().unwrap();
    assert!(
        stderr.contains(&format!(
            "kafka topic retained partition {p}: records at offsets {o}..{} (5 records)",
            o + 5
        )),
        "{stderr}"
    );
    assert!(stderr.contains("fail_on_data_loss = false"), "{stderr}");
    let output_rows = |dir: &Path| -> Vec<RecordBatch> {
        std::fs::read_dir(dir.join("out"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .flat_map(|p| {
                riffle::connectors::files::read_file(&p, riffle::common::FileFormat::Parquet, None)
                    .unwrap()
            })
            .collect()
    };
    let before = count_batches(&output_rows(dir.path()));
    assert_eq!(before, want_first, "nothing more was written");

    // Told to go on: everything that still exists is processed, the gap is in the progress.
    std::fs::write(
        &path,
        text.replace(
            "format = \"json\"",
            "format = \"json\"\nfail_on_data_loss = false",
        ),
    )
    .unwrap();
    run_ok(riffle(&path, "stream"));
    let all = arrow::compute::concat_batches(&first.schema(), &[first.clone(), second]).unwrap();
    let ids = all
        .column_by_name("tx_id")
        .unwrap()
        .as_primitive::<Int64Type>();
    let kept = arrow::compute::filter_record_batch(
        &all,
        &ids.iter()
            .map(|id| Some(!lost.contains(&id.unwrap())))
            .collect(),
    )
    .unwrap();
    assert_eq!(
        count_batches(&output_rows(dir.path())),
        expected(dir.path(), &kept, &broker),
        "every record that still exists, once"
    );
    let progress = common::progress_lines(&dir.path().join("progress.jsonl"));
    let lost_counted: u64 = progress
        .iter()
        .flat_map(|p| p["sources"].as_array().unwrap())
        .map(|s| s["lost_records"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(lost_counted, 30);
    let warnings: Vec<&str> = progress
        .iter()
        .flat_map(|p| p["warnings"].as_array().into_iter().flatten())
        .map(|w| w.as_str().unwrap())
        .collect();
    assert_eq!(warnings.len(), 6, "one per partition: {warnings:?}");
    for (p, o) in &read {
        let range = format!(
            "partition {p}: records at offsets {o}..{} (5 records)",
            o + 5
        );
        assert!(
            warnings.iter().any(|w| w.contains(&range)),
            "{range} in {warnings:?}"
        );
    }
}

#[test]
fn an_epoch_replayed_after_kafka_expired_the_marker_group_is_not_written_twice() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let sink = kafka_sink(&broker, "long-out");
    let (_, want, path) = setup(&broker, dir.path(), "long-down", 3_000, &sink);
    // Epoch 2's transaction is committed to Kafka; the process dies before Riffle's commit.
    let out = riffle(&path, "stream")
        .env("RIFFLE_CRASH", "after-sink:2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("RIFFLE_CRASH: aborting"),
        "{stderr}"
    );
    // The query stays down longer than offsets.retention.minutes: Kafka drops the group
    // whose committed offset marks the epoch.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    let groups: Vec<String> = consumer
        .fetch_group_list(None, Duration::from_secs(10))
        .unwrap()
        .groups()
        .iter()
        .map(|g| g.name().to_string())
        .filter(|g| g.ends_with("-long-out-epochs"))
        .collect();
    assert_eq!(groups.len(), 1, "{groups:?}");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    let names: Vec<&str> = groups.iter().map(String::as_str).collect();
    for result in runtime()
        .block_on(admin.delete_groups(&names, &AdminOptions::new()))
        .unwrap()
    {
        result.unwrap();
    }
    // The restart replays epoch 2: the marker topic says Kafka has it.
    run_ok(riffle(&path, "stream"));
    let got = count_records(&read_topic(&broker, "long-out"));
    let twice = got.values().filter(|n| **n > 1).count();
    assert_eq!(twice, 0, "rows written twice");
    assert_eq!(got, want, "each row exactly once");
}

#[test]
fn dead_letters_go_out_once_in_the_epoch_transaction_of_an_exactly_once_sink() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    // One partition: the bad records come first, so the first epochs carry them.
    runtime()
        .block_on(ensure_topic(&broker.kafka(), "dirty-eos", 1))
        .unwrap();
    let p = producer(&broker);
    for payload in [&b"not json"[..], b"{\"tx_id\": \"x\"}", b"", b"[1, 2]"] {
        p.send(
            BaseRecord::<[u8], [u8]>::to("dirty-eos")
                .payload(payload)
                .key(&b"k"[..]),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
    let rows = transactions(0, 1_500);
    produce(&broker, "dirty-eos", &rows);
    let want = expected(dir.path(), &rows, &broker);
    let path = pipeline(
        dir.path(),
        "dirty-eos",
        &broker,
        "dirty-eos",
        &kafka_sink(&broker, "clean-eos"),
    );
    // Crashes after epochs 1 and 2 are in Kafka and before Riffle commits them: both epochs
    // run again, dead letters included.
    for epoch in [1, 2] {
        let out = riffle(&path, "stream")
            .env("RIFFLE_CRASH", format!("after-sink:{epoch}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("RIFFLE_CRASH: aborting"), "{stderr}");
    }
    run_ok(riffle(&path, "stream"));
    assert_eq!(
        read_topic(&broker, "dirty-eos.dlq").len(),
        4,
        "each dead letter once"
    );
    assert_eq!(count_records(&read_topic(&broker, "clean-eos")), want);
}

#[test]
fn the_query_waits_for_a_broker_that_stopped_answering_and_resumes_exactly_once() {
    let broker = Broker::start();
    if broker.child.is_none() {
        // An outside broker (RIFFLE_KAFKA_BOOTSTRAP) cannot be stopped by this test.
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sink = kafka_sink(&broker, "outage-out");
    let (rows, want, path) = setup(&broker, dir.path(), "outage", 6_000, &sink);
    edit_pipeline(
        &path,
        &[("max_rows_per_epoch = 500", "max_rows_per_epoch = 50")],
    );
    // The run holds after committing epoch 3 until the broker is frozen, so the outage always
    // falls inside the run (racing a running query once saw it finish first on a loaded
    // machine). The broker then stays away until the run says it is waiting for it: every
    // Kafka call in flight has timed out, however long that takes here.
    let release = dir.path().join("release");
    let mut run = riffle(&path, "stream")
        .env("RIFFLE_HANG", "after-commit:3")
        .env("RIFFLE_HANG_UNTIL", &release)
        .spawn()
        .unwrap();
    let (said, lines) = std::sync::mpsc::channel::<String>();
    let reader = {
        let stderr = run.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut all = String::new();
            for line in std::io::BufReader::new(stderr).lines() {
                let line = line.unwrap();
                all.push_str(&line);
                all.push('\n');
                let _ = said.send(line);
            }
            all
        })
    };
    let wait_for = |text: &str| loop {
        match lines.recv_timeout(Duration::from_secs(300)) {
            Ok(line) if line.contains(text) => return,
            Ok(_) => {}
            Err(e) => panic!("the run never said {text:?} ({e})"),
        }
    };
    let progress = dir.path().join("progress.jsonl");
    let epochs = || {
        std::fs::read_to_string(&progress)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    wait_for("RIFFLE_HANG: holding after-commit epoch 3");
    broker.freeze();
    let down_at = epochs();
    std::fs::write(&release, "").unwrap();
    wait_for("riffle: waiting:");
    broker.thaw();
    let status = run.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert!(status.success(), "{stderr}");
    for line in stderr.lines().filter(|l| l.starts_with("riffle:")) {
        eprintln!("{line}");
    }
    assert!(
        stderr.contains("restarting from the checkpoint"),
        "a clear status while the broker is away: {stderr}"
    );
    assert!(epochs() > down_at, "it went on after the broker came back");
    assert_eq!(
        read_topic(&broker, "outage").len(),
        rows.num_rows(),
        "the broker kept every input record"
    );
    assert_eq!(
        read_topic(&broker, "outage").len(),
        rows.num_rows(),
        "the broker kept every input record across its restart"
    );
    let got = count_records(&read_topic(&broker, "outage-out"));
    let twice = got.values().filter(|n| **n > 1).count();
    let missing = want.keys().filter(|k| !got.contains_key(k)).count();
    let extra = got.keys().filter(|k| !want.contains_key(k)).count();
    assert_eq!(
        (twice, missing, extra),
        (0, 0, 0),
        "rows written twice, missing, unexpected (of {}); stderr: {stderr}",
        want.len()
    );
}

/// A topic read unevenly: partition 0 holds 3,000 events a second apart, the other five 50
/// each a minute apart over the same 50 minutes, so the first epochs (300 rows: 50 per
/// partition) read the sparse partitions to their end while partition 0 is still in its first
/// minute. The watermark must follow partition 0, the slowest that still has rows to give: no
/// row is late, and the per-minute counts hold every event. Following the largest event time
/// read across partitions (the old rule) made nearly all of partition 0 late.
#[test]
fn a_topic_read_unevenly_across_partitions_leaves_no_row_late() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let topic = "uneven";
    runtime()
        .block_on(ensure_topic(&broker.kafka(), topic, 6))
        .unwrap();
    let producer = producer(&broker);
    // Seconds after 2026-01-01T10:00:00, per partition, in order within each.
    let mut events: Vec<(i32, i64)> = (0..3000).map(|s| (0, s)).collect();
    for p in 1..6 {
        events.extend((0..50).map(|m| (p, m * 60 + p as i64)));
    }
    for (p, s) in &events {
        let value = format!(
            r#"{{"ts":"2026-01-01T10:{:02}:{:02}","k":{p}}}"#,
            s / 60,
            s % 60
        );
        producer
            .send(
                BaseRecord::<(), str>::to(topic)
                    .partition(*p)
                    .payload(&value),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let mut expected: BTreeMap<i64, i64> = BTreeMap::new();
    for (_, s) in &events {
        *expected.entry(s / 60).or_default() += 1;
    }

    let path = dir.join("uneven.toml");
    std::fs::write(
        &path,
        format!(
            r#"
query = """
SELECT window(ts, '1 minute') AS window,
       CAST(date_part('minute', min(ts)) AS BIGINT) AS minute, count(*) AS n
FROM events
GROUP BY window(ts, '1 minute')
"""
output_mode = "append"
[source]
name = "events"
event_time = "ts"
watermark = "5 seconds"
[source.stream]
kind = "kafka"
bootstrap = "{bootstrap}"
topic = "{topic}"
format = "json"
schema = "ts TIMESTAMP NOT NULL, k BIGINT NOT NULL"
[sink]
stream = "out"
[stream]
checkpoint = "uneven-checkpoint"
trigger = "available-now"
max_rows_per_epoch = 300
"#,
            bootstrap = broker.bootstrap
        ),
    )
    .unwrap();
    run_ok(riffle(&path, "stream"));

    let progress = common::progress_lines(&dir.join("uneven-checkpoint/progress.jsonl"));
    assert!(progress.len() > 5, "{} epochs", progress.len());
    let late: u64 = progress
        .iter()
        .map(|p| p["late_rows"].as_u64().unwrap())
        .sum();
    assert_eq!(late, 0, "rows dropped as late");
    // Every minute but the last (the watermark has not passed it: the stream goes on).
    let mut counted: BTreeMap<i64, i64> = BTreeMap::new();
    for batch in parquet_out(dir) {
        let minutes = batch["minute"].as_primitive::<Int64Type>();
        let counts = batch["n"].as_primitive::<Int64Type>();
        for (minute, n) in minutes.iter().zip(counts.iter()) {
            counted.insert(minute.unwrap(), n.unwrap());
        }
    }
    expected.remove(&49);
    assert_eq!(counted, expected);
}
