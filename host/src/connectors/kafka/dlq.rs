//! The dead-letter topic: records that do not decode, with their original bytes and why.
//!
//! A bad record never stops the query and is never lost: it goes to the dead-letter topic with
//! its key and value bytes and headers naming the source topic, partition and offset and the
//! reason. When the query's sink is an exactly-once Kafka sink on the same cluster, the letters
//! travel with the epoch and are written in its transaction, so a replayed epoch does not send
//! them again; otherwise they are flushed before their epoch runs (at least once).

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;

use super::codec::Record;
use super::{CheckedProducer, KafkaConfig, flush_checked, producer, send};
use crate::connectors::source::DeadLetter;
use crate::error::Result;

/// A dead letter as a record to produce.
pub(crate) fn record_of(letter: &DeadLetter) -> BaseRecord<'_, [u8], [u8]> {
    let mut headers = OwnedHeaders::new();
    for (k, v) in &letter.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let mut r = BaseRecord::to(&letter.topic).headers(headers);
    if let Some(k) = &letter.key {
        r = r.key(k.as_slice());
    }
    if let Some(v) = &letter.value {
        r = r.payload(v.as_slice());
    }
    r
}

/// A producer for one dead-letter topic.
pub(crate) struct DeadLetters {
    producer: CheckedProducer,
    topic: String,
}

impl DeadLetters {
    pub(crate) fn new(connection: &KafkaConfig, topic: &str) -> Result<Self> {
        Ok(DeadLetters {
            producer: producer(
                &connection.client(&[("enable.idempotence", "true"), ("linger.ms", "5")]),
            )?,
            topic: topic.to_string(),
        })
    }

    /// The dead letter for `record` of `source_topic`/`partition`, rejected for `reason`.
    pub(crate) fn letter(
        &self,
        source_topic: &str,
        partition: i32,
        record: &Record,
        reason: &str,
    ) -> DeadLetter {
        DeadLetter {
            topic: self.topic.clone(),
            key: record.key.clone(),
            value: record.value.clone(),
            headers: vec![
                ("riffle.topic".into(), source_topic.into()),
                ("riffle.partition".into(), partition.to_string()),
                ("riffle.offset".into(), record.offset.to_string()),
                ("riffle.error".into(), reason.into()),
            ],
        }
    }

    /// Sends a dead letter (at least once: flushed before its epoch runs).
    pub(crate) fn send(&self, letter: &DeadLetter) -> Result<()> {
        send(&self.producer, record_of(letter))
    }

    /// Waits until every dead letter sent is on the broker.
    pub(crate) fn flush(&self) -> Result<()> {
        flush_checked(&self.producer, "writing dead letters")
    }
}
