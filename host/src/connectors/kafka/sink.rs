//! A Kafka topic as a streaming sink.
//!
//! By default exactly-once: a transactional producer writes each epoch in one transaction, and
//! the same transaction records the epoch number in two markers: a record keyed by the
//! transactional id in the compacted marker topic (`riffle.epochs` unless set), which lasts as
//! long as the topic, and the committed offset of a marker consumer group
//! (`send_offsets_to_transaction`), which Kafka expires after `offsets.retention.minutes` (7 days
//! by default) and so only backs the topic up. The marker record also carries the plans (input
//! offsets) of the epoch and of earlier ones the checkpoint may not have made durable yet, so
//! the query need not wait for its checkpoint's disk before the transaction: a plan lost in a
//! crash is read back from the marker ([`Sink::carried_plans`]). After a crash,
//! `init_transactions` aborts whatever the dead process left open, and an epoch that a marker
//! already counts is not written again, so `read_committed` consumers see every row once,
//! however long the query was down. The at-least-once mode uses the idempotent producer without transactions, for the
//! lowest latency: an epoch's records are queued and the next epoch runs while the broker
//! acknowledges them, and the epoch commits only once it has (see [`Sink::acknowledgement`]).
//!
//! librdkafka's calls block (a transaction commit waits for the broker), so the sink makes them
//! on a blocking thread of the runtime rather than on an async worker.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::codec::RecordFormat;
use super::{
    CheckedProducer, KafkaConfig, TIMEOUT, UNTAGGED, bootstrap, flush_checked, kafka_error,
    producer, send, send_tagged,
};
use crate::connectors::ConfigContext;
use crate::connectors::sink::{Acknowledgement, Sink};
use crate::connectors::source::DeadLetter;
use crate::error::{Result, RiffleError};

/// A Kafka sink in a pipeline file (`kind = "kafka"`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Brokers (default: `$RIFFLE_KAFKA_BOOTSTRAP`).
    pub bootstrap: Option<String>,
    /// Topic.
    pub topic: String,
    /// `json` (default) or `csv`.
    #[serde(default)]
    pub format: RecordFormat,
    /// Column whose value is the record key.
    pub key: Option<String>,
    /// Columns copied into record headers.
    #[serde(default)]
    pub headers: Vec<String>,
    /// `exactly-once` (default) or `at-least-once`.
    #[serde(default)]
    pub delivery: Delivery,
    /// Exactly-once: the compacted topic holding each query's last committed epoch (default
    /// `riffle.epochs`; created if missing).
    pub marker_topic: Option<String>,
    /// librdkafka properties, passed through.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
}

impl KafkaSinkConfig {
    /// Builds the sink; `headers` go on every record (the UDF module hashes).
    ///
    /// # Errors
    /// Bad values, naming their key.
    pub fn build(&self, ctx: &ConfigContext, headers: Vec<(String, String)>) -> Result<KafkaSink> {
        if self.format == RecordFormat::Raw {
            return Err(ctx.error("format", "the Kafka sink writes json or csv"));
        }
        KafkaSink::new(KafkaSinkOptions {
            kafka: KafkaConfig {
                bootstrap: bootstrap(ctx, &self.bootstrap)?,
                properties: self.properties.clone(),
            },
            topic: self.topic.clone(),
            format: self.format,
            key: self.key.clone(),
            header_columns: self.headers.clone(),
            headers,
            delivery: self.delivery,
            marker_topic: self
                .marker_topic
                .clone()
                .unwrap_or_else(|| MARKER_TOPIC.to_string()),
        })
    }
}

/// The default marker topic.
pub const MARKER_TOPIC: &str = "riffle.epochs";

/// Delivery guarantee of the Kafka sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// One transaction per epoch; replays are skipped.
    #[default]
    ExactlyOnce,
    /// Idempotent producer; an epoch commits once the broker acknowledged its records, and a
    /// replayed epoch is written again.
    AtLeastOnce,
}

/// Kafka sink settings.
#[derive(Clone, Debug)]
pub struct KafkaSinkOptions {
    /// Brokers and properties.
    pub kafka: KafkaConfig,
    /// Topic to write.
    pub topic: String,
    /// Value encoding (JSON or CSV).
    pub format: RecordFormat,
    /// Column whose value is the record key.
    pub key: Option<String>,
    /// Columns copied into record headers (name = column name).
    pub header_columns: Vec<String>,
    /// Fixed headers on every record (the UDF content hashes go here).
    pub headers: Vec<(String, String)>,
    /// Guarantee.
    pub delivery: Delivery,
    /// Exactly-once: the compacted topic of last committed epochs.
    pub marker_topic: String,
}

/// A Kafka topic as a streaming sink.
pub struct KafkaSink {
    options: KafkaSinkOptions,
    /// Shared with the waits for at-least-once epochs' acknowledgements, which may outlive the
    /// sink (a dropped producer purges the records it still holds).
    producer: Option<Arc<CheckedProducer>>,
    /// Exactly-once: the consumer whose group holds the last committed epoch, that epoch, and
    /// the transactional id (the key of this query's records in the marker topic).
    marker: Option<(super::ClosingConsumer, u64, String)>,
    /// Dead letters of the sources, written in the next epoch's transaction.
    staged: Vec<DeadLetter>,
    /// Plans to record in the next epoch's marker.
    carry: Vec<serde_json::Value>,
    /// The plans the last marker holds, read at start.
    carried: Vec<serde_json::Value>,
}

/// The payload of a marker record. Before plans were carried it was the epoch as text alone.
#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    epoch: u64,
    #[serde(default)]
    plans: Vec<serde_json::Value>,
}

impl Marker {
    fn parse(payload: &[u8]) -> Option<Marker> {
        let text = std::str::from_utf8(payload).ok()?;
        match text.trim().parse::<u64>() {
            Ok(epoch) => Some(Marker {
                epoch,
                plans: Vec::new(),
            }),
            Err(_) => serde_json::from_str(text).ok(),
        }
    }
}

impl KafkaSink {
    /// A sink; nothing connects until the query starts.
    pub fn new(options: KafkaSinkOptions) -> Result<Self> {
        if options.format == RecordFormat::Raw {
            return Err(RiffleError::Config(
                "the Kafka sink writes json or csv".into(),
            ));
        }
        Ok(KafkaSink {
            options,
            producer: None,
            marker: None,
            staged: Vec::new(),
            carry: Vec::new(),
            carried: Vec::new(),
        })
    }

    fn marker_partition(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.options.topic, 0);
        tpl
    }

    pub(crate) fn encode(&self, batch: &RecordBatch) -> Result<Vec<Vec<u8>>> {
        let mut buf = Vec::new();
        match self.options.format {
            RecordFormat::Json => {
                let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
                w.write(batch)?;
                w.finish()?;
            }
            _ => {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(false)
                    .build(&mut buf);
                w.write(batch)?;
            }
        }
        // One line per row, unless a CSV field holds a line break (the writer quotes it,
        // RFC 4180): then each row is encoded on its own.
        let rows: Vec<Vec<u8>> = match buf.strip_suffix(b"\n") {
            Some(body) => body.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect(),
            None => Vec::new(),
        };
        if rows.len() == batch.num_rows() {
            return Ok(rows);
        }
        if self.options.format != RecordFormat::Csv {
            return Err(RiffleError::Internal(format!(
                "kafka sink: {} rows encoded as {} lines",
                batch.num_rows(),
                rows.len()
            )));
        }
        (0..batch.num_rows())
            .map(|i| {
                let mut row = Vec::new();
                arrow::csv::WriterBuilder::new()
                    .with_header(false)
                    .build(&mut row)
                    .write(&batch.slice(i, 1))?;
                if row.last() == Some(&b'\n') {
                    row.pop();
                }
                Ok(row)
            })
            .collect()
    }

    /// Sends `batches`' rows with the delivery `tag` (see [`super::DeliveryCheck`]).
    pub(crate) fn produce(
        &self,
        producer: &CheckedProducer,
        batches: &[RecordBatch],
        tag: usize,
    ) -> Result<()> {
        let options = FormatOptions::default();
        for batch in batches {
            let values = self.encode(batch)?;
            let column = |name: &str| {
                batch.column_by_name(name).ok_or_else(|| {
                    RiffleError::Config(format!(
                        "kafka sink: no output column {name:?} (columns: {})",
                        batch
                            .schema()
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })
            };
            let key = match &self.options.key {
                Some(k) => Some(ArrayFormatter::try_new(column(k)?.as_ref(), &options)?),
                None => None,
            };
            let header_columns = self
                .options
                .header_columns
                .iter()
                .map(|h| Ok((h, ArrayFormatter::try_new(column(h)?.as_ref(), &options)?)))
                .collect::<Result<Vec<_>>>()?;
            for (row, value) in values.iter().enumerate() {
                let mut headers = OwnedHeaders::new();
                for (k, v) in &self.options.headers {
                    headers = headers.insert(Header {
                        key: k,
                        value: Some(v.as_bytes()),
                    });
                }
                for (name, f) in &header_columns {
                    let text = f.value(row).to_string();
                    headers = headers.insert(Header {
                        key: name,
                        value: Some(text.as_bytes()),
                    });
                }
                let key_text = key.as_ref().map(|f| f.value(row).to_string());
                let mut record = BaseRecord::to(&self.options.topic)
                    .payload(value.as_slice())
                    .headers(headers);
                if let Some(k) = &key_text {
                    record = record.key(k.as_bytes());
                }
                send_tagged(producer, record, tag)?;
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Sink for KafkaSink {
    fn set_udf_modules(&mut self, modules: Vec<(String, String)>) {
        self.options.headers = modules;
    }

    async fn start(&mut self, query_id: &str) -> Result<()> {
        tokio::task::block_in_place(|| self.connect(query_id))
    }

    async fn write_epoch(
        &mut self,
        epoch: u64,
        _schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        tokio::task::block_in_place(|| self.write(epoch, batches))
    }

    fn acknowledgement(&mut self, epoch: u64) -> Option<Acknowledgement> {
        if self.options.delivery != Delivery::AtLeastOnce {
            return None;
        }
        let producer = self.producer.clone()?;
        Some(Box::new(move || {
            producer
                .context()
                .wait(tag_of(epoch), &format!("writing epoch {epoch}"), TIMEOUT)
        }))
    }

    fn keeps_replayed_epochs(&self) -> bool {
        self.options.delivery == Delivery::ExactlyOnce
    }

    fn carries_plans(&self) -> bool {
        self.options.delivery == Delivery::ExactlyOnce
    }

    fn carry_plans(&mut self, plans: Vec<serde_json::Value>) {
        self.carry = plans;
    }

    fn carried_plans(&self) -> Vec<serde_json::Value> {
        self.carried.clone()
    }

    fn writes_dead_letters_for(&self, bootstrap: &str) -> bool {
        self.options.delivery == Delivery::ExactlyOnce && self.options.kafka.bootstrap == bootstrap
    }

    fn stage_dead_letters(&mut self, letters: Vec<DeadLetter>) {
        self.staged.extend(letters);
    }
}

impl KafkaSink {
    /// Creates the producer; exactly-once fences earlier producers of this query and reads
    /// the last epoch Kafka holds.
    fn connect(&mut self, query_id: &str) -> Result<()> {
        let kafka = &self.options.kafka;
        match self.options.delivery {
            Delivery::AtLeastOnce => {
                self.producer =
                    Some(Arc::new(producer(&kafka.client(&[
                        ("enable.idempotence", "true"),
                        ("linger.ms", "1"),
                    ]))?));
            }
            Delivery::ExactlyOnce => {
                let id = format!("riffle-{query_id}-{}", self.options.topic);
                let p = producer(&kafka.client(&[
                    ("transactional.id", id.as_str()),
                    ("enable.idempotence", "true"),
                    ("linger.ms", "1"),
                ]))?;
                // Fences any earlier producer with this id and aborts what it left open.
                p.init_transactions(TIMEOUT)
                    .map_err(|e| kafka_error("starting transactions", e))?;
                let group = format!("{id}-epochs");
                let consumer = super::ClosingConsumer::create(&kafka.client(&[
                    ("group.id", group.as_str()),
                    ("enable.auto.commit", "false"),
                    ("isolation.level", "read_committed"),
                ]))
                .map_err(|e| kafka_error("creating the epoch marker", e))?;
                let committed = consumer
                    .committed_offsets(self.marker_partition(), TIMEOUT)
                    .map_err(|e| kafka_error("reading the epoch marker", e))?;
                let in_group = match committed.elements().first().map(|e| e.offset()) {
                    Some(Offset::Offset(o)) if o > 0 => o as u64,
                    _ => 0,
                };
                let topic = &self.options.marker_topic;
                tokio::runtime::Handle::current().block_on(super::admin::ensure_topic_with(
                    kafka,
                    topic,
                    1,
                    &[("cleanup.policy", "compact")],
                ))?;
                let last = last_marker(kafka, topic, &id)?;
                let in_topic = last.as_ref().map_or(0, |m| m.epoch);
                // The group's offset is ahead only if the topic lost its newest marker (it was
                // deleted): the plans it carried are lost with it.
                self.carried = match last {
                    Some(m) if m.epoch >= in_group => m.plans,
                    _ => Vec::new(),
                };
                self.marker = Some((consumer, in_group.max(in_topic), id));
                self.producer = Some(Arc::new(p));
            }
        }
        Ok(())
    }

    /// Writes one epoch: exactly-once, in a transaction committed before returning (blocking
    /// on the broker); at-least-once, queued, to be acknowledged before the epoch commits.
    fn write(&mut self, epoch: u64, batches: &[RecordBatch]) -> Result<()> {
        let producer = self.producer.as_ref().ok_or_else(|| {
            RiffleError::Internal("kafka sink written before the query started".into())
        })?;
        match self.options.delivery {
            Delivery::AtLeastOnce => {
                let tag = tag_of(epoch);
                let records = batches.iter().map(|b| b.num_rows() as u64).sum();
                producer.context().expect(tag, records);
                let sent = self.produce(producer, batches, tag);
                if sent.is_err() {
                    producer.context().forget(tag);
                }
                sent
            }
            Delivery::ExactlyOnce => {
                let (consumer, done, id) = self.marker.as_ref().expect("started");
                let letters = std::mem::take(&mut self.staged);
                let plans = std::mem::take(&mut self.carry);
                if epoch <= *done {
                    // Committed to Kafka before the crash that made this epoch run again, with
                    // its dead letters.
                    return Ok(());
                }
                producer
                    .begin_transaction()
                    .map_err(|e| kafka_error("beginning a transaction", e))?;
                let result = (|| {
                    self.produce(producer, batches, UNTAGGED)?;
                    for letter in &letters {
                        send(producer, super::dlq::record_of(letter))?;
                    }
                    let marker = serde_json::to_vec(&Marker { epoch, plans }).expect("JSON");
                    send(
                        producer,
                        BaseRecord::to(&self.options.marker_topic)
                            .key(id.as_bytes())
                            .payload(marker.as_slice()),
                    )?;
                    let mut marker = self.marker_partition();
                    marker
                        .set_all_offsets(Offset::Offset(epoch as i64))
                        .map_err(|e| kafka_error("marking the epoch", e))?;
                    let group = consumer.group_metadata().ok_or_else(|| {
                        RiffleError::Internal("kafka: the marker consumer has no group".into())
                    })?;
                    producer
                        .send_offsets_to_transaction(&marker, &group, TIMEOUT)
                        .map_err(|e| kafka_error("marking the epoch", e))?;
                    // rdkafka's `commit_transaction` first calls its own flush, which waits in
                    // steps of 100 ms (see `flush_checked`): about 100 ms per epoch. Flushed
                    // here, it finds nothing left and goes straight to librdkafka's commit.
                    flush_checked(producer, "writing an epoch")?;
                    producer
                        .commit_transaction(TIMEOUT)
                        .map_err(|e| kafka_error("committing a transaction", e))
                })();
                if let Err(e) = result {
                    let _ = producer.abort_transaction(TIMEOUT);
                    return Err(e);
                }
                let (_, done, _) = self.marker.as_mut().expect("started");
                *done = epoch;
                Ok(())
            }
        }
    }
}

/// The delivery tag of an at-least-once epoch's records (never [`UNTAGGED`]: epochs are far
/// fewer).
fn tag_of(epoch: u64) -> usize {
    usize::try_from(epoch).unwrap_or(UNTAGGED - 1)
}

/// The marker of the last epoch the marker topic records for `id`: the newest committed record
/// with that key (`None` if there is none). Read backwards from the end in windows, since the topic holds every query's records
/// (compaction keeps the newest per key, and a broker that does not compact keeps them all).
fn last_marker(kafka: &KafkaConfig, topic: &str, id: &str) -> Result<Option<Marker>> {
    const WINDOW: i64 = 1_000;
    let consumer = super::ClosingConsumer::create(&kafka.client(&[
        ("group.id", "riffle-marker-reader"),
        ("enable.auto.commit", "false"),
        ("isolation.level", "read_committed"),
        // Reports the end of what read_committed may see (the last stable offset).
        ("enable.partition.eof", "true"),
    ]))
    .map_err(|e| kafka_error("creating the epoch marker reader", e))?;
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, TIMEOUT)
        .map_err(|e| kafka_error("reading the epoch marker topic", e))?;
    let mut end = high;
    while end > low {
        let start = (end - WINDOW).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(start))
            .map_err(|e| kafka_error("reading the epoch marker topic", e))?;
        consumer
            .assign(&tpl)
            .map_err(|e| kafka_error("reading the epoch marker topic", e))?;
        let mut found: Option<Marker> = None;
        let started = std::time::Instant::now();
        loop {
            let at_end = consumer.position().ok().is_some_and(|p| {
                p.elements()
                    .iter()
                    .any(|e| matches!(e.offset(), Offset::Offset(o) if o >= end))
            });
            if at_end {
                break;
            }
            match consumer.poll(std::time::Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    use rdkafka::Message;
                    if m.offset() < end
                        && m.key() == Some(id.as_bytes())
                        && let Some(marker) = m.payload().and_then(Marker::parse)
                        && found.as_ref().is_none_or(|f| f.epoch < marker.epoch)
                    {
                        found = Some(marker);
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(kafka_error("reading the epoch marker topic", e)),
                None if started.elapsed() > TIMEOUT => {
                    return Err(RiffleError::External(format!(
                        "kafka: reading the epoch marker topic {topic}: no end within {TIMEOUT:?}"
                    )));
                }
                None => {}
            }
        }
        if found.is_some() {
            return Ok(found);
        }
        end = start;
    }
    Ok(None)
}
