//! Kafka in and out (librdkafka through `rdkafka`).
//!
//! - [`source`]: a topic as a replayable source; offsets in Riffle's checkpoint.
//! - [`codec`]: JSON, CSV and raw records to and from Arrow.
//! - [`dlq`]: the dead-letter topic for records that do not decode.
//! - [`sink`]: exactly-once (transactional) and at-least-once output.
//! - [`admin`]: topic creation and a rate-limited producer for demos and benchmarks.
//! - [`snapshot`]: a topic's committed records read once, for `riffle verify`.
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
//! transaction, and the same transaction records the epoch number in the compacted marker topic
//! (keyed by the transactional id; it lasts as long as the topic) and as the committed offset of
//! a marker consumer group. After a crash, `init_transactions` aborts whatever the dead process
//! left open, and an epoch that a marker already counts is not written again — so
//! `read_committed` consumers see every row once. Dead letters of sources on the same cluster
//! are written in the same transaction. The at-least-once mode uses the idempotent producer
//! without transactions, for the lowest latency.

pub mod admin;
pub mod codec;
pub mod dlq;
pub mod sink;
pub mod snapshot;
pub mod source;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

pub use admin::{ensure_topic, produce_json};
pub use codec::{RecordFormat, raw_schema};
pub use sink::{Delivery, KafkaSink, KafkaSinkConfig, KafkaSinkOptions};
pub use snapshot::{TopicSnapshot, read_topic};
pub use source::{KafkaSource, KafkaSourceConfig, KafkaSourceOptions, StartAt};

use crate::error::{Result, RiffleError};

/// How long a metadata or transaction call may take before the broker counts as unreachable.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The same brokers with only the connection settings (security, SASL, SSL, client id)
    /// of the properties: for a client of another kind than the one they were written for,
    /// which would warn about, or be changed by, the other's tuning.
    pub fn connection_only(&self) -> KafkaConfig {
        KafkaConfig {
            bootstrap: self.bootstrap.clone(),
            properties: self
                .properties
                .iter()
                .filter(|(k, _)| {
                    ["security.", "sasl.", "ssl.", "client."]
                        .iter()
                        .any(|prefix| k.starts_with(prefix))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    pub(crate) fn client(&self, defaults: &[(&str, &str)]) -> ClientConfig {
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

/// The brokers: `bootstrap` from the configuration, else the `RIFFLE_KAFKA_BOOTSTRAP`
/// environment variable, so a pipeline can leave the broker to the environment it runs in.
///
/// # Errors
/// [`RiffleError::Config`] naming the key when neither is set.
pub fn bootstrap(ctx: &crate::connectors::ConfigContext, given: &Option<String>) -> Result<String> {
    given
        .clone()
        .or_else(|| std::env::var("RIFFLE_KAFKA_BOOTSTRAP").ok())
        .ok_or_else(|| {
            ctx.error(
                "bootstrap",
                "missing: set it or the RIFFLE_KAFKA_BOOTSTRAP environment variable",
            )
        })
}

pub(crate) fn kafka_error(what: &str, e: KafkaError) -> RiffleError {
    RiffleError::External(format!("kafka: {what}: {e}"))
}

/// Counts delivery failures, which the default context would drop silently: an at-least-once
/// epoch is only done when every record of it was acknowledged.
#[derive(Default)]
pub(crate) struct DeliveryCheck {
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

pub(crate) type CheckedProducer = ThreadedProducer<DeliveryCheck>;

pub(crate) fn producer(config: &ClientConfig) -> Result<CheckedProducer> {
    config
        .create_with_context(DeliveryCheck::default())
        .map_err(|e| kafka_error("creating a producer", e))
}

/// Sends one record, waiting while librdkafka's queue is full.
pub(crate) fn send(
    producer: &CheckedProducer,
    mut record: BaseRecord<'_, [u8], [u8]>,
) -> Result<()> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                r,
            )) => {
                record = r;
                // The producer's own thread serves delivery reports and so frees the queue
                // (rdkafka's `poll` would wait out its whole timeout). Callers are on blocking
                // threads: sources run in `spawn_blocking`, sinks in `block_in_place`.
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(kafka_error("producing", e)),
        }
    }
}

/// Waits until everything sent was acknowledged; an error if anything failed.
///
/// Calls librdkafka's flush itself: rdkafka's `flush` asks librdkafka for a flush that does not
/// wait and then polls for up to 100 ms at a time, and its producer's `poll` always waits out
/// its whole timeout, so every flush (every at-least-once epoch's sink) took at least 100 ms.
/// With delivery reports as events (how rdkafka sets librdkafka up), librdkafka's flush waits
/// on a condition variable until the last report has been handled by the producer's polling
/// thread, treating `linger.ms` as zero meanwhile, and returns as soon as it has.
pub(crate) fn flush_checked(producer: &CheckedProducer, what: &str) -> Result<()> {
    let timeout_ms = i32::try_from(TIMEOUT.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the handle belongs to `producer`, which outlives the call; librdkafka's flush
    // may be called from any thread.
    let code =
        unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), timeout_ms) };
    if code != rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(kafka_error(what, KafkaError::Flush(code.into())));
    }
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

/// A consumer that closes on a thread of its own when dropped.
///
/// Closing a consumer that has a group (ours have one: the source for monitoring commits, the
/// sink's epoch markers) waits until the group coordinator has answered, with no time limit.
/// While the broker is unreachable, a drop on the query's thread would hang the very restart
/// that is meant to wait for the broker (seen with a frozen broker: a query stuck in the drop
/// for 17 minutes, never saying it was waiting). The closing thread ends when the broker
/// answers or the process exits.
pub(crate) struct ClosingConsumer(std::mem::ManuallyDrop<Consumer>);

/// Riffle's consumers: their client context does not log a partition's end as an error.
pub(crate) type Consumer = rdkafka::consumer::BaseConsumer<EndIsNews>;

/// The client context of Riffle's consumers. Readers that must know where a partition ends
/// (`riffle verify`, the epoch-marker reader) ask librdkafka to report it, and librdkafka also
/// passes it to the client's error callback, whose default logs it as an error. Every other
/// error is still logged.
pub(crate) struct EndIsNews;

impl rdkafka::ClientContext for EndIsNews {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(
            error,
            KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EndIsNews {}

impl ClosingConsumer {
    /// A consumer with these settings.
    pub(crate) fn create(config: &ClientConfig) -> KafkaResult<Self> {
        let consumer = config.create_with_context(EndIsNews)?;
        Ok(ClosingConsumer(std::mem::ManuallyDrop::new(consumer)))
    }
}

impl std::ops::Deref for ClosingConsumer {
    type Target = Consumer;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for ClosingConsumer {
    fn drop(&mut self) {
        // SAFETY: the consumer is not used again: this is its wrapper's drop.
        let consumer = unsafe { std::mem::ManuallyDrop::take(&mut self.0) };
        let closing = std::thread::Builder::new()
            .name("riffle-kafka-close".into())
            .spawn(move || drop(consumer));
        if let Err(e) = closing {
            tracing::warn!("cannot close a Kafka consumer on a thread of its own: {e}");
        }
    }
}
