//! A topic's committed records read once, start to end, as rows: what `riffle verify` compares
//! with the batch result.
//!
//! Unlike the [`source`](super::source), nothing here is replayable or checkpointed, and a
//! record that does not decode is counted, not sent to a dead-letter topic: a check must not
//! write to the cluster it checks.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::codec::{Record, RecordFormat, decode_values};
use super::{KafkaConfig, TIMEOUT, kafka_error};
use crate::error::{Result, RiffleError};

/// What a topic held.
#[derive(Debug, Default)]
pub struct TopicSnapshot {
    /// The rows of the records that decoded, partition by partition in offset order.
    pub batches: Vec<RecordBatch>,
    /// Records read.
    pub records: u64,
    /// Records that did not decode against the schema.
    pub undecodable: u64,
    /// Why the first undecodable record did not decode.
    pub first_error: Option<String>,
}

/// How long the broker may go without sending anything before the read gives up.
const STALL: Duration = Duration::from_secs(60);

/// Reads every committed record of `topic` (`read_committed`: rows of aborted or open
/// transactions are not seen) from each partition's first offset to its end, decoding values
/// as `format` against `schema`.
///
/// # Errors
/// An unreachable broker, a missing topic, or a broker that stops answering mid-read.
pub fn read_topic(
    kafka: &KafkaConfig,
    topic: &str,
    format: RecordFormat,
    schema: &SchemaRef,
) -> Result<TopicSnapshot> {
    let consumer = super::ClosingConsumer::create(&kafka.client(&[
        ("group.id", "riffle-verify"),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("enable.partition.eof", "true"),
        ("isolation.level", "read_committed"),
        ("auto.offset.reset", "earliest"),
    ]))
    .map_err(|e| kafka_error("creating a consumer", e))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(|e| kafka_error(&format!("reading metadata of {topic}"), e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| RiffleError::Config(format!("kafka: topic {topic:?} does not exist")))?
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut assignment = TopicPartitionList::new();
    let mut open = BTreeSet::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, TIMEOUT)
            .map_err(|e| kafka_error("reading offsets", e))?;
        if low < high {
            assignment
                .add_partition_offset(topic, p, Offset::Offset(low))
                .map_err(|e| kafka_error("assigning partitions", e))?;
            open.insert(p);
        }
    }
    consumer
        .assign(&assignment)
        .map_err(|e| kafka_error("assigning partitions", e))?;

    // Read until every partition reports its end: for a `read_committed` consumer that is the
    // last stable offset, past any aborted transaction.
    let mut records: BTreeMap<i32, Vec<Record>> = BTreeMap::new();
    let mut last_news = Instant::now();
    while !open.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                records.entry(m.partition()).or_default().push(Record {
                    offset: m.offset(),
                    timestamp_ms: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                });
                last_news = Instant::now();
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
                last_news = Instant::now();
            }
            Some(Err(e)) => return Err(kafka_error(&format!("reading {topic}"), e)),
            None if last_news.elapsed() > STALL => {
                return Err(RiffleError::External(format!(
                    "kafka: reading {topic}: the broker sent nothing for {} s with partitions \
                     {open:?} not read to their end",
                    STALL.as_secs()
                )));
            }
            None => {}
        }
    }

    let mut snapshot = TopicSnapshot::default();
    for (partition, part) in &records {
        snapshot.records += part.len() as u64;
        let ((batch, _), bad) = decode_values(format, schema, part)?;
        if let Some((i, reason)) = bad.first()
            && snapshot.first_error.is_none()
        {
            snapshot.first_error = Some(format!(
                "partition {partition} offset {}: {reason}",
                part[*i].offset
            ));
        }
        snapshot.undecodable += bad.len() as u64;
        if batch.num_rows() > 0 {
            snapshot.batches.push(batch);
        }
    }
    Ok(snapshot)
}
