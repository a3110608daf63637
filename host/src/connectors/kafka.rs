//! Kafka in and out (librdkafka through `rdkafka`).
//!
//! **Source.** Offsets live in Riffle's checkpoint, one per partition, so an epoch is replayed
//! from exactly the records it read before a crash; the consumer group's own commit is written
//! after each epoch only so that lag shows up in the usual Kafka tools. Records are decoded from
//! JSON, CSV or taken raw, against a declared schema. A record that does not decode, or that
//! breaks the schema (a missing non-null field, a string where a number belongs), never stops
//! the query: it goes to a dead-letter topic with its original bytes, source partition and
//! offset, and the reason, and is flushed there before the epoch runs.
//!
//! **Sink.** By default exactly-once: a transactional producer writes each epoch in one
//! transaction, and the same transaction records the epoch number as the committed offset of a
//! marker consumer group (`send_offsets_to_transaction`). After a crash, `init_transactions`
//! aborts whatever the dead process left open, and an epoch that the marker already counts is
//! not written again — so `read_committed` consumers see every row once. The at-least-once mode
//! uses the idempotent producer without transactions, for the lowest latency.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arrow::array::{
    ArrayRef, BinaryBuilder, Int32Builder, Int64Builder, RecordBatch, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde_json::{Map, Value, json};

use super::sink::Sink;
use super::source::{Input, StreamSource};
use crate::error::{Result, RiffleError};

/// How long a metadata or transaction call may take before the broker counts as unreachable.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Where the brokers are, plus librdkafka properties passed through unchanged.
#[derive(Clone, Debug, Default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap: String,
    /// Any librdkafka property (`security.protocol`, `fetch.max.bytes`, ...); these win over
    /// Riffle's defaults.
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    fn client(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }
}

fn kafka_error(what: &str, e: KafkaError) -> RiffleError {
    RiffleError::External(format!("kafka: {what}: {e}"))
}

/// How record values are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordFormat {
    /// One JSON object per record.
    Json,
    /// One CSV line per record, columns in schema order, no header.
    Csv,
    /// No decoding: the key and value bytes plus the record's metadata.
    Raw,
}

impl RecordFormat {
    /// Parses `json`, `csv` or `raw`.
    ///
    /// # Errors
    /// [`RiffleError::Config`] for other names.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "json" => Ok(RecordFormat::Json),
            "csv" => Ok(RecordFormat::Csv),
            "raw" => Ok(RecordFormat::Raw),
            other => Err(RiffleError::Config(format!(
                "format {other:?}: expected json, csv or raw"
            ))),
        }
    }
}

/// Where a query without a checkpoint starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record still in the topic.
    Earliest,
    /// Only records produced from now on.
    Latest,
    /// The first record whose timestamp is at or after this many ms since the epoch.
    Timestamp(i64),
}

/// Kafka source settings.
#[derive(Clone, Debug)]
pub struct KafkaSourceOptions {
    /// Brokers and properties.
    pub kafka: KafkaConfig,
    /// Topic to read (all its partitions, including ones added later).
    pub topic: String,
    /// How values are encoded.
    pub format: RecordFormat,
    /// Declared schema of decoded records (ignored for raw).
    pub schema: SchemaRef,
    /// Adds the record timestamp as a column of this name (for event time).
    pub timestamp_column: Option<String>,
    /// Start position for a new query.
    pub start: StartAt,
    /// Where undecodable records go (default `<topic>.dlq`).
    pub dead_letter_topic: String,
    /// Consumer group for monitoring commits.
    pub group_id: String,
}

struct Record {
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
}

/// Counts delivery failures, which the default context would drop silently: an at-least-once
/// epoch is only done when every record of it was acknowledged.
#[derive(Default)]
struct DeliveryCheck {
    failed: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for DeliveryCheck {}

impl ProducerContext for DeliveryCheck {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().expect("delivery lock") = Some(e.to_string());
        }
    }
}

type CheckedProducer = ThreadedProducer<DeliveryCheck>;

fn producer(config: &ClientConfig) -> Result<CheckedProducer> {
    config
        .create_with_context(DeliveryCheck::default())
        .map_err(|e| kafka_error("creating a producer", e))
}

/// Sends one record, waiting while librdkafka's queue is full.
fn send(producer: &CheckedProducer, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                r,
            )) => {
                record = r;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(kafka_error("producing", e)),
        }
    }
}

/// Waits until everything sent was acknowledged; an error if anything failed.
fn flush_checked(producer: &CheckedProducer, what: &str) -> Result<()> {
    producer.flush(TIMEOUT).map_err(|e| kafka_error(what, e))?;
    let context = producer.context();
    if context.failed.swap(0, Ordering::Relaxed) > 0 {
        let reason = context.last_error.lock().expect("delivery lock").take();
        return Err(RiffleError::External(format!(
            "kafka: {what}: delivery failed: {}",
            reason.unwrap_or_default()
        )));
    }
    Ok(())
}

/// A Kafka topic as a replayable source.
pub struct KafkaSource {
    options: KafkaSourceOptions,
    schema: SchemaRef,
    consumer: BaseConsumer,
    /// Per partition, the first offset not yet handed to an epoch: where the consumer was
    /// assigned, moved on by every read.
    next: BTreeMap<i32, i64>,
    /// Per partition, the consumer's position: the offset after the last record polled (or
    /// after transaction markers it skipped).
    fetched: BTreeMap<i32, i64>,
    /// Records polled but not yet handed to an epoch (offsets from `next` on).
    pending: BTreeMap<i32, VecDeque<Record>>,
    /// The topic's partitions, refreshed every few seconds (topics can grow).
    partitions: Vec<i32>,
    partitions_checked: Option<Instant>,
    dead_letters: CheckedProducer,
}

/// The schema of raw records.
pub fn raw_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Binary, true),
        Field::new("value", DataType::Binary, true),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            true,
        ),
    ]))
}

fn partition_offsets(offset: &Value) -> BTreeMap<i32, i64> {
    offset["partitions"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(p, o)| Some((p.parse().ok()?, o.as_i64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn offsets_value(offsets: &BTreeMap<i32, i64>) -> Value {
    let map: Map<String, Value> = offsets
        .iter()
        .map(|(p, o)| (p.to_string(), json!(o)))
        .collect();
    json!({ "partitions": map })
}

impl KafkaSource {
    /// Connects to the brokers; the topic must exist.
    ///
    /// # Errors
    /// Unreachable brokers, a missing topic, or a timestamp column clashing with the schema.
    pub fn new(options: KafkaSourceOptions) -> Result<Self> {
        let consumer: BaseConsumer = options
            .kafka
            .client(&[
                ("group.id", options.group_id.as_str()),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("enable.partition.eof", "false"),
                ("isolation.level", "read_committed"),
                // The broker answers a fetch at once when it has data; when it has none it
                // holds the fetch up to this long. librdkafka's 500 ms default would put up to
                // half a second between a record's arrival and its epoch.
                ("fetch.wait.max.ms", "10"),
            ])
            .create()
            .map_err(|e| kafka_error("creating a consumer", e))?;
        // The dead-letter producer shares the connection settings (security, client id) of
        // the source's properties, not its consumer tuning, which a producer would warn about.
        let connection = KafkaConfig {
            bootstrap: options.kafka.bootstrap.clone(),
            properties: options
                .kafka
                .properties
                .iter()
                .filter(|(k, _)| {
                    ["security.", "sasl.", "ssl.", "client."]
                        .iter()
                        .any(|prefix| k.starts_with(prefix))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let dead_letters =
            producer(&connection.client(&[("enable.idempotence", "true"), ("linger.ms", "5")]))?;
        let mut fields: Vec<Field> = match options.format {
            RecordFormat::Raw => raw_schema()
                .fields()
                .iter()
                .map(|f| (**f).clone())
                .collect(),
            _ => options
                .schema
                .fields()
                .iter()
                .map(|f| (**f).clone())
                .collect(),
        };
        if let Some(name) = &options.timestamp_column {
            if fields.iter().any(|f| f.name() == name) {
                return Err(RiffleError::Config(format!(
                    "timestamp_column {name:?} is already a column of the schema"
                )));
            }
            fields.push(Field::new(
                name,
                DataType::Timestamp(TimeUnit::Microsecond, None),
                true,
            ));
        }
        let source = KafkaSource {
            schema: Arc::new(Schema::new(fields)),
            options,
            consumer,
            next: BTreeMap::new(),
            fetched: BTreeMap::new(),
            pending: BTreeMap::new(),
            partitions: Vec::new(),
            partitions_checked: None,
            dead_letters,
        };
        source.partitions()?;
        Ok(source)
    }

    fn partitions(&self) -> Result<Vec<i32>> {
        let topic = &self.options.topic;
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), TIMEOUT)
            .map_err(|e| kafka_error(&format!("reading metadata of {topic}"), e))?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .ok_or_else(|| RiffleError::Config(format!("kafka: topic {topic:?} does not exist")))?;
        Ok(t.partitions().iter().map(|p| p.id()).collect())
    }

    fn watermarks(&self, partition: i32) -> Result<(i64, i64)> {
        self.consumer
            .fetch_watermarks(&self.options.topic, partition, TIMEOUT)
            .map_err(|e| kafka_error("reading offsets", e))
    }

    fn start_offset(&self, partition: i32, start: StartAt) -> Result<i64> {
        let (low, high) = self.watermarks(partition)?;
        Ok(match start {
            StartAt::Earliest => low,
            StartAt::Latest => high,
            StartAt::Timestamp(ms) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&self.options.topic, partition, Offset::Offset(ms))
                    .map_err(|e| kafka_error("looking up a timestamp", e))?;
                let found = self
                    .consumer
                    .offsets_for_times(tpl, TIMEOUT)
                    .map_err(|e| kafka_error("looking up a timestamp", e))?;
                match found.elements().first().map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => high,
                }
            }
        })
    }

    /// The partitions, from metadata at most every few seconds: `available` runs on every
    /// poll of the low-latency trigger and must not wait for the broker each time.
    fn current_partitions(&mut self) -> Result<Vec<i32>> {
        if self
            .partitions_checked
            .is_none_or(|t| t.elapsed() > Duration::from_secs(5))
        {
            self.partitions = self.partitions()?;
            self.partitions_checked = Some(Instant::now());
        }
        Ok(self.partitions.clone())
    }

    /// Points the consumer at `from` unless it is already there (it is, epoch after epoch;
    /// it is not after a restart or a replay).
    fn seek_to(&mut self, from: &BTreeMap<i32, i64>) -> Result<()> {
        if &self.next == from {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in from {
            tpl.add_partition_offset(&self.options.topic, *p, Offset::Offset(*o))
                .map_err(|e| kafka_error("assigning partitions", e))?;
        }
        self.consumer
            .assign(&tpl)
            .map_err(|e| kafka_error("assigning partitions", e))?;
        self.next = from.clone();
        self.fetched = from.clone();
        self.pending.clear();
        Ok(())
    }

    /// Polls one message, waiting up to `timeout`, into `pending`. Returns whether one came.
    fn poll_one(&mut self, timeout: Duration) -> Result<bool> {
        match self.consumer.poll(timeout) {
            Some(Ok(m)) => {
                let p = m.partition();
                self.fetched.insert(p, m.offset() + 1);
                self.pending.entry(p).or_default().push_back(Record {
                    offset: m.offset(),
                    timestamp_ms: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                });
                Ok(true)
            }
            Some(Err(e)) => Err(kafka_error("fetching", e)),
            None => Ok(false),
        }
    }

    /// Learns the consumer's positions: transaction markers take offsets but are never
    /// returned as records, so only the position shows that the consumer passed them.
    fn sync_positions(&mut self) {
        if let Ok(position) = self.consumer.position() {
            for e in position.elements() {
                if let Offset::Offset(o) = e.offset() {
                    let known = self.fetched.entry(e.partition()).or_insert(o);
                    *known = (*known).max(o);
                }
            }
        }
    }

    /// Hands out the records below `to`, polling until the consumer has reached `to`.
    fn take(&mut self, to: &BTreeMap<i32, i64>) -> Result<BTreeMap<i32, Vec<Record>>> {
        let behind = |fetched: &BTreeMap<i32, i64>| {
            to.iter()
                .any(|(p, end)| fetched.get(p).copied().unwrap_or(0) < *end)
        };
        let started = Instant::now();
        while behind(&self.fetched) {
            if !self.poll_one(Duration::from_millis(100))? {
                self.sync_positions();
                if started.elapsed() > TIMEOUT {
                    return Err(RiffleError::External(format!(
                        "kafka: {}: records up to {to:?} did not arrive within {TIMEOUT:?}",
                        self.options.topic
                    )));
                }
            }
        }
        let mut out: BTreeMap<i32, Vec<Record>> = BTreeMap::new();
        for (p, end) in to {
            let queue = self.pending.entry(*p).or_default();
            while queue.front().is_some_and(|r| r.offset < *end) {
                out.entry(*p)
                    .or_default()
                    .push(queue.pop_front().expect("non-empty"));
            }
            self.next.insert(*p, *end);
        }
        Ok(out)
    }

    fn dead_letter(&self, partition: i32, record: &Record, reason: &str) -> Result<()> {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "riffle.topic",
                value: Some(self.options.topic.as_bytes()),
            })
            .insert(Header {
                key: "riffle.partition",
                value: Some(partition.to_string().as_bytes()),
            })
            .insert(Header {
                key: "riffle.offset",
                value: Some(record.offset.to_string().as_bytes()),
            })
            .insert(Header {
                key: "riffle.error",
                value: Some(reason.as_bytes()),
            });
        let mut r = BaseRecord::to(&self.options.dead_letter_topic).headers(headers);
        if let Some(k) = &record.key {
            r = r.key(k.as_slice());
        }
        if let Some(v) = &record.value {
            r = r.payload(v.as_slice());
        }
        send(&self.dead_letters, r)
    }

    /// Decodes records; the ones that fail go to the dead-letter topic.
    fn decode(&mut self, records: BTreeMap<i32, Vec<Record>>) -> Result<Vec<RecordBatch>> {
        let mut batches = Vec::new();
        let mut rejected = false;
        for (partition, records) in &records {
            let (good, bad) = match self.options.format {
                RecordFormat::Raw => (raw_batch(*partition, records)?, Vec::new()),
                format => decode_values(format, &self.options.schema, records)?,
            };
            for (i, reason) in bad {
                self.dead_letter(*partition, &records[i], &reason)?;
                rejected = true;
            }
            batches.push(self.with_timestamp(good.0, &good.1)?);
        }
        if rejected {
            // Never lost: the rejected records are on the broker before the epoch goes on.
            flush_checked(&self.dead_letters, "writing dead letters")?;
        }
        Ok(batches)
    }

    /// Adds the record-timestamp column when configured. `timestamps` are the kept records'.
    fn with_timestamp(
        &self,
        batch: RecordBatch,
        timestamps: &[Option<i64>],
    ) -> Result<RecordBatch> {
        if self.options.timestamp_column.is_none() {
            return Ok(batch);
        }
        let mut ts = TimestampMicrosecondBuilder::with_capacity(timestamps.len());
        for t in timestamps {
            ts.append_option(t.map(|ms| ms * 1000));
        }
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(ts.finish()));
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// A decoded batch plus the timestamps of its rows.
type Decoded = (RecordBatch, Vec<Option<i64>>);

fn raw_batch(partition: i32, records: &[Record]) -> Result<Decoded> {
    let n = records.len();
    let mut key = BinaryBuilder::with_capacity(n, 0);
    let mut value = BinaryBuilder::with_capacity(n, 0);
    let mut part = Int32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    let mut ts = TimestampMicrosecondBuilder::with_capacity(n);
    for r in records {
        key.append_option(r.key.as_deref());
        value.append_option(r.value.as_deref());
        part.append_value(partition);
        offset.append_value(r.offset);
        ts.append_option(r.timestamp_ms.map(|ms| ms * 1000));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(key.finish()),
        Arc::new(value.finish()),
        Arc::new(part.finish()),
        Arc::new(offset.finish()),
        Arc::new(ts.finish()),
    ];
    Ok((
        RecordBatch::try_new(raw_schema(), columns)?,
        records.iter().map(|r| r.timestamp_ms).collect(),
    ))
}

/// Decodes the values of `records` in one pass; if that fails, record by record, so that
/// only the bad ones are rejected (index, reason).
fn decode_values(
    format: RecordFormat,
    schema: &SchemaRef,
    records: &[Record],
) -> Result<(Decoded, Vec<(usize, String)>)> {
    let all: Vec<&[u8]> = records
        .iter()
        .map(|r| r.value.as_deref().unwrap_or_default())
        .collect();
    if let Ok(batch) = decode_many(format, schema, &all)
        && batch.num_rows() == records.len()
    {
        let ts = records.iter().map(|r| r.timestamp_ms).collect();
        return Ok(((batch, ts), Vec::new()));
    }
    let mut good = Vec::new();
    let mut ts = Vec::new();
    let mut bad = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let value = r.value.as_deref().unwrap_or_default();
        match decode_many(format, schema, &[value]) {
            Ok(b) if b.num_rows() == 1 => {
                good.push(b);
                ts.push(r.timestamp_ms);
            }
            Ok(b) => bad.push((
                i,
                format!("expected one row per record, decoded {}", b.num_rows()),
            )),
            Err(e) => bad.push((i, e.to_string())),
        }
    }
    let batch = arrow::compute::concat_batches(schema, &good)?;
    Ok(((batch, ts), bad))
}

fn decode_many(
    format: RecordFormat,
    schema: &SchemaRef,
    values: &[&[u8]],
) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
    let mut text = Vec::with_capacity(values.iter().map(|v| v.len() + 1).sum());
    for v in values {
        if v.contains(&b'\n') && format == RecordFormat::Csv {
            return Err(arrow::error::ArrowError::CsvError(
                "a CSV record must be one line".into(),
            ));
        }
        if v.iter().all(u8::is_ascii_whitespace) {
            return Err(arrow::error::ArrowError::ParseError("empty record".into()));
        }
        text.extend_from_slice(v);
        text.push(b'\n');
    }
    let batches: Vec<RecordBatch> = match format {
        RecordFormat::Json => arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(values.len().max(1))
            .build(std::io::Cursor::new(text))?
            .collect::<std::result::Result<_, _>>()?,
        RecordFormat::Csv => arrow::csv::ReaderBuilder::new(schema.clone())
            .with_header(false)
            .with_batch_size(values.len().max(1))
            .build(std::io::Cursor::new(text))?
            .collect::<std::result::Result<_, _>>()?,
        RecordFormat::Raw => unreachable!("raw records are not decoded"),
    };
    arrow::compute::concat_batches(schema, &batches)
}

/// Wall-clock ms of a record timestamp as an `Instant` in this process (for latency).
fn instant_of(ms: i64) -> Option<Instant> {
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_millis() as i64;
    Instant::now().checked_sub(Duration::from_millis((now_ms - ms).max(0) as u64))
}

impl StreamSource for KafkaSource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn initial(&mut self) -> Result<Value> {
        let mut offsets = BTreeMap::new();
        for p in self.partitions()? {
            offsets.insert(p, self.start_offset(p, self.options.start)?);
        }
        Ok(offsets_value(&offsets))
    }

    fn available(&mut self, from: &Value, max_rows: usize) -> Result<Value> {
        let mut from = partition_offsets(from);
        let partitions = self.current_partitions()?;
        for p in &partitions {
            if !from.contains_key(p) {
                // A partition added after the query started is read from its beginning.
                from.insert(*p, self.watermarks(*p)?.0);
            }
        }
        self.seek_to(&from)?;
        // What the consumer has prefetched is available now: no broker round trip.
        let buffered = |s: &Self| s.pending.values().map(VecDeque::len).sum::<usize>();
        while buffered(self) < max_rows && self.poll_one(Duration::ZERO)? {}
        if buffered(self) == 0 {
            // Nothing prefetched: ask the broker whether anything exists beyond what the
            // consumer has seen (the available-now trigger stops on "no"), and if so wait
            // for the fetch to bring it.
            self.sync_positions();
            let mut behind = false;
            for p in &partitions {
                let fetched = self.fetched.get(p).copied().unwrap_or(0);
                behind |= self.watermarks(*p)?.1 > fetched;
            }
            let waited = Instant::now();
            while behind && buffered(self) == 0 && waited.elapsed() < TIMEOUT {
                if !self.poll_one(Duration::from_millis(10))? {
                    self.sync_positions();
                    behind = false;
                    for p in &partitions {
                        let fetched = self.fetched.get(p).copied().unwrap_or(0);
                        behind |= self.watermarks(*p)?.1 > fetched;
                    }
                }
            }
            while buffered(self) < max_rows && self.poll_one(Duration::ZERO)? {}
        }
        let share = max_rows.div_ceil(partitions.len().max(1)).max(1);
        let mut end = BTreeMap::new();
        for (p, start) in &from {
            let last = self
                .pending
                .get(p)
                .and_then(|q| q.get(share.min(q.len()).wrapping_sub(1)))
                .map(|r| r.offset + 1);
            let fetched = self.fetched.get(p).copied().unwrap_or(*start);
            end.insert(*p, last.unwrap_or(fetched).max(*start));
        }
        Ok(offsets_value(&end))
    }

    fn read(&mut self, from: &Value, to: &Value) -> Result<Input> {
        let (from, to) = (partition_offsets(from), partition_offsets(to));
        // Partitions new in `to` start at their beginning.
        let mut start = from.clone();
        for p in to.keys() {
            if !start.contains_key(p) {
                start.insert(*p, self.watermarks(*p)?.0);
            }
        }
        self.seek_to(&start)?;
        let records = self.take(&to)?;
        let times: Vec<i64> = records
            .values()
            .flatten()
            .filter_map(|r| r.timestamp_ms)
            .collect();
        let arrival = match (times.iter().min(), times.iter().max()) {
            (Some(a), Some(b)) => instant_of(*a).zip(instant_of(*b)),
            _ => None,
        };
        let batches = self.decode(records)?;
        Ok(Input { batches, arrival })
    }

    fn finished(&self, _at: &Value) -> bool {
        false
    }

    fn committed(&mut self, at: &Value) {
        // Only for monitoring (consumer lag in Kafka's tools); Riffle's checkpoint is the truth.
        let mut tpl = TopicPartitionList::new();
        for (p, o) in partition_offsets(at) {
            let _ = tpl.add_partition_offset(&self.options.topic, p, Offset::Offset(o));
        }
        if let Err(e) = self
            .consumer
            .commit(&tpl, rdkafka::consumer::CommitMode::Async)
        {
            tracing::debug!("kafka: monitoring commit failed: {e}");
        }
    }
}

/// Delivery guarantee of the Kafka sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Delivery {
    /// One transaction per epoch; replays are skipped.
    #[default]
    ExactlyOnce,
    /// Idempotent producer, flushed every epoch; a replayed epoch is written again.
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
}

/// A Kafka topic as a streaming sink.
pub struct KafkaSink {
    options: KafkaSinkOptions,
    producer: Option<CheckedProducer>,
    /// Exactly-once: the consumer whose group holds the last committed epoch.
    marker: Option<(BaseConsumer, u64)>,
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
        })
    }

    fn marker_partition(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.options.topic, 0);
        tpl
    }

    fn encode(&self, batch: &RecordBatch) -> Result<Vec<Vec<u8>>> {
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
        let rows: Vec<Vec<u8>> = buf
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        if rows.len() != batch.num_rows() {
            return Err(RiffleError::Internal(format!(
                "kafka sink: {} rows encoded as {} lines",
                batch.num_rows(),
                rows.len()
            )));
        }
        Ok(rows)
    }

    fn produce(&self, producer: &CheckedProducer, batches: &[RecordBatch]) -> Result<()> {
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
                send(producer, record)?;
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Sink for KafkaSink {
    async fn start(&mut self, query_id: &str) -> Result<()> {
        let kafka = &self.options.kafka;
        match self.options.delivery {
            Delivery::AtLeastOnce => {
                self.producer =
                    Some(producer(&kafka.client(&[
                        ("enable.idempotence", "true"),
                        ("linger.ms", "1"),
                    ]))?);
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
                let consumer: BaseConsumer = kafka
                    .client(&[
                        ("group.id", group.as_str()),
                        ("enable.auto.commit", "false"),
                        ("isolation.level", "read_committed"),
                    ])
                    .create()
                    .map_err(|e| kafka_error("creating the epoch marker", e))?;
                let committed = consumer
                    .committed_offsets(self.marker_partition(), TIMEOUT)
                    .map_err(|e| kafka_error("reading the epoch marker", e))?;
                let epoch = match committed.elements().first().map(|e| e.offset()) {
                    Some(Offset::Offset(o)) if o > 0 => o as u64,
                    _ => 0,
                };
                self.marker = Some((consumer, epoch));
                self.producer = Some(p);
            }
        }
        Ok(())
    }

    async fn write_epoch(
        &mut self,
        epoch: u64,
        _schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        let producer = self.producer.as_ref().ok_or_else(|| {
            RiffleError::Internal("kafka sink written before the query started".into())
        })?;
        match self.options.delivery {
            Delivery::AtLeastOnce => {
                self.produce(producer, batches)?;
                flush_checked(producer, "writing an epoch")
            }
            Delivery::ExactlyOnce => {
                let (consumer, done) = self.marker.as_ref().expect("started");
                if epoch <= *done {
                    // Committed to Kafka before the crash that made this epoch run again.
                    return Ok(());
                }
                producer
                    .begin_transaction()
                    .map_err(|e| kafka_error("beginning a transaction", e))?;
                let result = (|| {
                    self.produce(producer, batches)?;
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
                    producer
                        .commit_transaction(TIMEOUT)
                        .map_err(|e| kafka_error("committing a transaction", e))
                })();
                if let Err(e) = result {
                    let _ = producer.abort_transaction(TIMEOUT);
                    return Err(e);
                }
                let (_, done) = self.marker.as_mut().expect("started");
                *done = epoch;
                Ok(())
            }
        }
    }
}

/// Creates `topic` with `partitions` partitions unless it exists.
///
/// # Errors
/// Unreachable brokers or a refused creation.
pub async fn ensure_topic(kafka: &KafkaConfig, topic: &str, partitions: i32) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = kafka
        .client(&[])
        .create()
        .map_err(|e| kafka_error("creating an admin client", e))?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(TIMEOUT)),
        )
        .await
        .map_err(|e| kafka_error(&format!("creating topic {topic}"), e))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(RiffleError::External(format!(
                    "kafka: creating topic {t}: {code}"
                )));
            }
        }
    }
    Ok(())
}

/// Produces `batches` to `topic` as JSON records keyed by `key` (if given), at most `rate`
/// records per second, and waits until the broker has them all. Returns records sent.
///
/// # Errors
/// Broker errors and failed deliveries.
pub fn produce_json(
    kafka: &KafkaConfig,
    topic: &str,
    key: Option<&str>,
    rate: Option<f64>,
    batches: impl IntoIterator<Item = RecordBatch>,
    mut progress: impl FnMut(u64),
) -> Result<u64> {
    let producer = producer(&kafka.client(&[("enable.idempotence", "true"), ("linger.ms", "5")]))?;
    let sink = KafkaSink::new(KafkaSinkOptions {
        kafka: kafka.clone(),
        topic: topic.to_string(),
        format: RecordFormat::Json,
        key: key.map(str::to_string),
        header_columns: Vec::new(),
        headers: Vec::new(),
        delivery: Delivery::AtLeastOnce,
    })?;
    let started = Instant::now();
    let mut sent = 0u64;
    for batch in batches {
        // Rate-limited producers send in slices of 1 ms worth of records.
        let step = rate.map_or(batch.num_rows(), |r| ((r / 1000.0) as usize).max(1));
        let mut at = 0;
        while at < batch.num_rows() {
            let n = step.min(batch.num_rows() - at);
            if let Some(r) = rate {
                let due = started + Duration::from_secs_f64(sent as f64 / r);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            sink.produce(&producer, &[batch.slice(at, n)])?;
            at += n;
            sent += n as u64;
        }
        progress(sent);
    }
    flush_checked(&producer, "producing")?;
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::generator::{FraudConfig, FraudGenerator};

    fn sink(format: RecordFormat) -> KafkaSink {
        KafkaSink::new(KafkaSinkOptions {
            kafka: KafkaConfig::default(),
            topic: "t".into(),
            format,
            key: None,
            header_columns: Vec::new(),
            headers: Vec::new(),
            delivery: Delivery::AtLeastOnce,
        })
        .unwrap()
    }

    fn records(values: Vec<Vec<u8>>) -> Vec<Record> {
        values
            .into_iter()
            .enumerate()
            .map(|(i, v)| Record {
                offset: i as i64,
                timestamp_ms: Some(1_000 + i as i64),
                key: None,
                value: Some(v),
            })
            .collect()
    }

    #[test]
    fn json_and_csv_round_trip_rows_bit_for_bit() {
        let batch = FraudGenerator::new(FraudConfig::default()).next_batch(2_000);
        for format in [RecordFormat::Json, RecordFormat::Csv] {
            let encoded = sink(format).encode(&batch).unwrap();
            let ((decoded, ts), bad) =
                decode_values(format, &batch.schema(), &records(encoded)).unwrap();
            assert!(bad.is_empty(), "{format:?}: {bad:?}");
            assert_eq!(ts.len(), 2_000);
            assert_eq!(decoded, batch, "{format:?}");
        }
    }

    #[test]
    fn bad_records_are_singled_out_with_a_reason() {
        let batch = FraudGenerator::new(FraudConfig::default()).next_batch(10);
        let mut values = sink(RecordFormat::Json).encode(&batch).unwrap();
        values.insert(3, b"{\"tx_id\": \"x\"}".to_vec());
        values.insert(7, b"not json".to_vec());
        values.push(Vec::new());
        let ((decoded, ts), bad) =
            decode_values(RecordFormat::Json, &batch.schema(), &records(values)).unwrap();
        assert_eq!(decoded, batch);
        assert_eq!(ts.len(), 10);
        let rejected: Vec<usize> = bad.iter().map(|(i, _)| *i).collect();
        assert_eq!(rejected, vec![3, 7, 12]);
        assert!(bad.iter().all(|(_, reason)| !reason.is_empty()));
    }
}
