//! The dead-letter topic: records that do not decode, with their original bytes and why.
//!
//! A bad record never stops the query and is never lost: it goes to the dead-letter topic with
//! its key and value bytes and headers naming the source topic, partition and offset and the
//! reason, and is flushed there before its epoch runs.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;

use super::codec::Record;
use super::{CheckedProducer, KafkaConfig, flush_checked, producer, send};
use crate::error::Result;

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

    /// Sends `record` of `source_topic`/`partition` with `reason`.
    pub(crate) fn send(
        &self,
        source_topic: &str,
        partition: i32,
        record: &Record,
        reason: &str,
    ) -> Result<()> {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "riffle.topic",
                value: Some(source_topic.as_bytes()),
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
        let mut r = BaseRecord::to(&self.topic).headers(headers);
        if let Some(k) = &record.key {
            r = r.key(k.as_slice());
        }
        if let Some(v) = &record.value {
            r = r.payload(v.as_slice());
        }
        send(&self.producer, r)
    }

    /// Waits until every dead letter sent is on the broker.
    pub(crate) fn flush(&self) -> Result<()> {
        flush_checked(&self.producer, "writing dead letters")
    }
}
