//! A Kafka topic as a replayable source.
//!
//! Offsets live in Riffle's checkpoint, one per partition, so an epoch is replayed from exactly
//! the records it read before a crash; the consumer group's own commit is written after each
//! epoch only so that lag shows up in the usual Kafka tools.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arrow::array::{RecordBatch, TimestampMicrosecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value, json};

use super::codec::{Record, RecordFormat, decode_values, raw_batch, raw_schema};
use super::dlq::DeadLetters;
use super::{KafkaConfig, TIMEOUT, bootstrap, kafka_error};
use crate::connectors::ConfigContext;
use crate::connectors::source::{DeadLetter, Input, REJECTED_SAMPLE, StreamSource};
use crate::error::{Result, RiffleError};

/// A Kafka source in a pipeline file (`kind = "kafka"`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Brokers (default: `$RIFFLE_KAFKA_BOOTSTRAP`).
    pub bootstrap: Option<String>,
    /// Topic.
    pub topic: String,
    /// `json` (default), `csv` or `raw`.
    #[serde(default)]
    pub format: RecordFormat,
    /// Columns as SQL (`"id BIGINT NOT NULL, ts TIMESTAMP"`); default: the batch table's.
    pub schema: Option<String>,
    /// Adds the record timestamp as a column of this name.
    pub timestamp_column: Option<String>,
    /// `earliest` (default), `latest` or an RFC 3339 time.
    pub start: Option<String>,
    /// Where undecodable records go (default `<topic>.dlq`).
    pub dead_letter_topic: Option<String>,
    /// Consumer group for monitoring commits (default `riffle-<source name>`).
    pub group_id: Option<String>,
    /// What to do when records the query has not read yet are gone from the broker (deleted
    /// by retention, or the topic recreated): `true` (default) stops with an error naming the
    /// missing range; `false` logs the gap, counts it in the progress and goes on.
    pub fail_on_data_loss: Option<bool>,
    /// librdkafka properties, passed through.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl KafkaSourceConfig {
    /// Connects to the brokers and builds the source of table `name`; `batch_schema` is the
    /// schema of the source's batch table, used when no `schema` is declared.
    ///
    /// # Errors
    /// Bad values (naming their key), an unreachable broker or a missing topic.
    pub async fn build(
        &self,
        ctx: &ConfigContext<'_>,
        name: &str,
        batch_schema: Option<SchemaRef>,
    ) -> Result<KafkaSource> {
        let schema = match (self.format, &self.schema, batch_schema) {
            (RecordFormat::Raw, _, _) => raw_schema(),
            (_, Some(columns), _) => declared_schema(columns)
                .await
                .map_err(|e| ctx.error("schema", e))?,
            (_, None, Some(schema)) => schema,
            (_, None, None) => {
                return Err(ctx.error(
                    "schema",
                    "missing: declare the records' columns (or give the source a batch table \
                     to take its schema from)",
                ));
            }
        };
        let start = match self.start.as_deref() {
            None | Some("earliest") => StartAt::Earliest,
            Some("latest") => StartAt::Latest,
            Some(t) => {
                let parsed = chrono::DateTime::parse_from_rfc3339(t).map_err(|e| {
                    ctx.error(
                        "start",
                        format!("{t:?}: expected earliest, latest or an RFC 3339 time ({e})"),
                    )
                })?;
                StartAt::Timestamp(parsed.timestamp_millis())
            }
        };
        let options = KafkaSourceOptions {
            kafka: KafkaConfig {
                bootstrap: bootstrap(ctx, &self.bootstrap)?,
                properties: self.properties.clone(),
            },
            topic: self.topic.clone(),
            format: self.format,
            schema,
            timestamp_column: self.timestamp_column.clone(),
            start,
            dead_letter_topic: self
                .dead_letter_topic
                .clone()
                .unwrap_or_else(|| format!("{}.dlq", self.topic)),
            group_id: self
                .group_id
                .clone()
                .unwrap_or_else(|| format!("riffle-{name}")),
            fail_on_data_loss: self.fail_on_data_loss.unwrap_or(true),
        };
        tokio::task::spawn_blocking(move || KafkaSource::new(options))
            .await
            .map_err(|e| RiffleError::Internal(format!("kafka source task: {e}")))?
    }
}

/// The Arrow schema of a SQL column list, planned by DataFusion (`CREATE TABLE t (...)`).
async fn declared_schema(columns: &str) -> std::result::Result<SchemaRef, String> {
    let ctx = datafusion::prelude::SessionContext::new();
    let plan = ctx
        .state()
        .create_logical_plan(&format!("CREATE TABLE __riffle_schema ({columns})"))
        .await
        .map_err(|e| e.to_string())?;
    match plan {
        datafusion::logical_expr::LogicalPlan::Ddl(
            datafusion::logical_expr::DdlStatement::CreateMemoryTable(c),
        ) => Ok(Arc::new(c.input.schema().as_arrow().clone())),
        _ => Err("expected a column list such as \"id BIGINT NOT NULL, amount DOUBLE\"".into()),
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
    /// Stop on records gone from the broker before they were read (else skip and count them).
    pub fail_on_data_loss: bool,
}

/// Records of one partition that were gone when the source went to read them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Gap {
    partition: i32,
    /// The first offset the source wanted.
    wanted: i64,
    /// The partition's first and next offsets on the broker at the time.
    low: i64,
    high: i64,
}

impl Gap {
    /// Records known lost: those below the partition's first offset. An offset beyond the end
    /// means the topic was recreated or truncated, and how much was lost is unknown.
    fn lost(&self) -> u64 {
        (self.low - self.wanted).max(0) as u64
    }

    fn describe(&self, topic: &str) -> String {
        if self.wanted < self.low {
            format!(
                "kafka topic {topic} partition {}: records at offsets {}..{} ({} records) \
                 were deleted (by retention or DeleteRecords) before Riffle read them",
                self.partition,
                self.wanted,
                self.low,
                self.lost()
            )
        } else {
            format!(
                "kafka topic {topic} partition {}: offset {} is beyond the partition's end \
                 ({}): the topic was recreated or truncated, and the records after offset {} of \
                 the old topic are lost",
                self.partition, self.wanted, self.high, self.wanted
            )
        }
    }
}

/// A Kafka topic as a replayable source.
pub struct KafkaSource {
    options: KafkaSourceOptions,
    schema: SchemaRef,
    consumer: super::ClosingConsumer,
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
    dead_letters: DeadLetters,
    /// Data-loss gaps skipped (with `fail_on_data_loss = false`) and not yet reported.
    gaps: Vec<Gap>,
    /// Dead letters go to the epoch (for the sink's transaction) instead of the producer.
    hand_over: bool,
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

/// An epoch's records, decoded.
struct Decoded {
    /// The rows of the records that decoded, a batch per partition.
    batches: Vec<RecordBatch>,
    /// Each batch's partition.
    splits: Vec<String>,
    /// Dead letters for the sink's transaction (when handed over; else already sent).
    letters: Vec<DeadLetter>,
    /// Records rejected.
    rejected: u64,
    /// The first of them (see [`Input::rejected_sample`]).
    sample: Vec<DeadLetter>,
}

impl KafkaSource {
    /// Connects to the brokers; the topic must exist.
    ///
    /// # Errors
    /// Unreachable brokers, a missing topic, or a timestamp column clashing with the schema.
    pub fn new(options: KafkaSourceOptions) -> Result<Self> {
        let consumer = super::ClosingConsumer::create(&options.kafka.client(&[
            ("group.id", options.group_id.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
            ("isolation.level", "read_committed"),
            // Never jump silently when an offset is gone: `check_offsets` decides.
            ("auto.offset.reset", "error"),
            // The broker answers a fetch at once when it has data; when it has none it
            // holds the fetch up to this long. librdkafka's 500 ms default would put up to
            // half a second between a record's arrival and its epoch.
            ("fetch.wait.max.ms", "10"),
        ]))
        .map_err(|e| kafka_error("creating a consumer", e))?;
        // The dead-letter producer shares the connection settings (security, client id) of
        // the source's properties, not its consumer tuning, which a producer would warn about.
        let connection = options.kafka.connection_only();
        let dead_letters = DeadLetters::new(&connection, &options.dead_letter_topic)?;
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
            gaps: Vec::new(),
            hand_over: false,
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

    /// The high watermark of `partition` as the consumer's last fetch reported it, without
    /// asking the broker (`None` before the first fetch). rdkafka's safe API only has the
    /// blocking round trip, so this calls librdkafka's cached lookup directly.
    fn cached_high_watermark(&self, partition: i32) -> Option<i64> {
        use rdkafka::bindings::{rd_kafka_get_watermark_offsets, rd_kafka_resp_err_t};
        let topic = std::ffi::CString::new(self.options.topic.as_str()).ok()?;
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client pointer is valid while `self.consumer` lives; the topic is a
        // NUL-terminated string that outlives the call; librdkafka writes only the two i64s.
        let err = unsafe {
            rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        (err == rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
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
    /// it is not after a restart or a replay). Offsets gone from the broker are data loss (see
    /// `check_offsets`); when the query goes on past them, the consumer starts at the first
    /// record that exists while `next` stays at `from`.
    fn seek_to(&mut self, from: &BTreeMap<i32, i64>) -> Result<()> {
        if &self.next == from {
            return Ok(());
        }
        let mut start = from.clone();
        self.check_offsets(&mut start)?;
        self.assign(&start)?;
        self.next = from.clone();
        self.fetched = start;
        self.pending.clear();
        Ok(())
    }

    fn assign(&self, offsets: &BTreeMap<i32, i64>) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets {
            tpl.add_partition_offset(&self.options.topic, *p, Offset::Offset(*o))
                .map_err(|e| kafka_error("assigning partitions", e))?;
        }
        self.consumer
            .assign(&tpl)
            .map_err(|e| kafka_error("assigning partitions", e))
    }

    /// Checks that each partition's offset still exists on the broker: between the first
    /// record kept and the end. One that does not means records were lost before Riffle read
    /// them (deleted by retention, or the topic recreated). By default that ends the query with
    /// an error naming the range; with `fail_on_data_loss = false` the gap is logged, kept for
    /// the progress, and the offset moves to the partition's first record.
    fn check_offsets(&mut self, offsets: &mut BTreeMap<i32, i64>) -> Result<()> {
        for (p, o) in offsets.iter_mut() {
            let (low, high) = self.watermarks(*p)?;
            if (low..=high).contains(o) {
                continue;
            }
            let gap = Gap {
                partition: *p,
                wanted: *o,
                low,
                high,
            };
            let text = gap.describe(&self.options.topic);
            if self.options.fail_on_data_loss {
                return Err(RiffleError::DataLoss(format!(
                    "{text}. To skip what is lost and go on, set fail_on_data_loss = false on \
                     the source (the gap is then logged and counted in the progress)"
                )));
            }
            tracing::warn!("{text}; going on from offset {low} (fail_on_data_loss = false)");
            if !self.gaps.contains(&gap) {
                self.gaps.push(gap);
            }
            *o = low;
        }
        Ok(())
    }

    /// Records fetched and not yet taken by an epoch.
    fn buffered(&self) -> usize {
        self.pending.values().map(VecDeque::len).sum()
    }

    /// Moves what the consumer holds into `pending`, until it holds `max_rows` records in all,
    /// without waiting. A poll that does not wait also comes back empty when it handled an
    /// event other than a record (the broker's reply to the last monitoring commit), so an
    /// empty poll is believed only when the next one is empty too; stopping at the first
    /// left the rest of what was fetched for the next epoch.
    fn drain(&mut self, max_rows: usize) -> Result<()> {
        let mut empty = 0;
        while empty < 2 && self.buffered() < max_rows {
            if self.poll_one(Duration::ZERO)? {
                empty = 0;
            } else {
                empty += 1;
            }
        }
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
            Some(Err(e)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) => {
                // Records the consumer was about to fetch were deleted under it: check where
                // every partition stands, then fetch on from there.
                self.sync_positions();
                let mut positions = self.fetched.clone();
                self.check_offsets(&mut positions)?;
                self.assign(&positions)?;
                self.fetched = positions;
                Ok(false)
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

    /// Decodes records; the ones that fail become dead letters, sent (and flushed) now or
    /// returned for the sink's transaction when handed over.
    fn decode(&mut self, records: BTreeMap<i32, Vec<Record>>) -> Result<Decoded> {
        let mut batches = Vec::new();
        let mut splits = Vec::new();
        let mut letters = Vec::new();
        for (partition, records) in &records {
            let (good, bad) = match self.options.format {
                RecordFormat::Raw => (raw_batch(*partition, records)?, Vec::new()),
                format => decode_values(format, &self.options.schema, records)?,
            };
            for (i, reason) in bad {
                letters.push(self.dead_letters.letter(
                    &self.options.topic,
                    *partition,
                    &records[i],
                    &reason,
                ));
            }
            batches.push(self.with_timestamp(good.0, &good.1)?);
            splits.push(partition.to_string());
        }
        let rejected = letters.len() as u64;
        let sample = letters.iter().take(REJECTED_SAMPLE).cloned().collect();
        if !self.hand_over && !letters.is_empty() {
            for letter in &letters {
                self.dead_letters.send(letter)?;
            }
            // Never lost: the rejected records are on the broker before the epoch goes on.
            self.dead_letters.flush()?;
            letters.clear();
        }
        Ok(Decoded {
            batches,
            splits,
            letters,
            rejected,
            sample,
        })
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

/// Wall-clock ms of a record timestamp as an `Instant` in this process (for latency).
fn instant_of(ms: i64) -> Option<Instant> {
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()?
        .as_millis() as i64;
    Instant::now().checked_sub(Duration::from_millis((now_ms - ms).max(0) as u64))
}

impl StreamSource for KafkaSource {
    fn kind(&self) -> &'static str {
        "kafka"
    }

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
        self.drain(max_rows)?;
        if self.buffered() == 0 {
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
            while behind && self.buffered() == 0 && waited.elapsed() < TIMEOUT {
                if !self.poll_one(Duration::from_millis(10))? {
                    self.sync_positions();
                    behind = false;
                    for p in &partitions {
                        let fetched = self.fetched.get(p).copied().unwrap_or(0);
                        behind |= self.watermarks(*p)?.1 > fetched;
                    }
                }
            }
            self.drain(max_rows)?;
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
        let decoded = self.decode(records)?;
        let gaps = std::mem::take(&mut self.gaps);
        // Consumer lag from the high watermarks the fetches brought back; only a partition
        // not fetched yet costs a broker round trip (its lag decides whether the watermark
        // waits for it).
        let mut backlog = BTreeMap::new();
        for (p, end) in &to {
            let high = match self.cached_high_watermark(*p) {
                Some(high) => high,
                None => self.watermarks(*p)?.1,
            };
            backlog.insert(p.to_string(), (high - end).max(0));
        }
        Ok(Input {
            batches: decoded.batches,
            splits: decoded.splits,
            arrival,
            lost_records: gaps.iter().map(Gap::lost).sum(),
            warnings: gaps
                .iter()
                .map(|g| g.describe(&self.options.topic))
                .collect(),
            dead_letters: decoded.letters,
            rejected: decoded.rejected,
            rejected_sample: decoded.sample,
            backlog,
        })
    }

    fn finished(&self, _at: &Value) -> bool {
        false
    }

    fn dead_letter_cluster(&self) -> Option<String> {
        Some(self.options.kafka.bootstrap.clone())
    }

    fn hand_over_dead_letters(&mut self) {
        self.hand_over = true;
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
