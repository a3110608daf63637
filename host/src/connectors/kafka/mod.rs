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
use std::sync::{Condvar, Mutex};
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

/// Checks delivery reports, which the default context would drop silently: a record counts as
/// written only once the broker acknowledged it.
///
/// Records are sent with a tag (rdkafka's delivery opaque). [`UNTAGGED`] records are checked
/// all at once by [`flush_checked`]. An at-least-once epoch's records carry the epoch's number
/// and are waited for on their own ([`DeliveryCheck::wait`]), while later epochs' records are
/// still being sent: a flush would wait for those too.
#[derive(Default)]
pub(crate) struct DeliveryCheck {
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
    tagged: Mutex<BTreeMap<usize, Tally>>,
    acknowledged: Condvar,
}

/// The tag of records that [`flush_checked`] checks.
pub(crate) const UNTAGGED: usize = usize::MAX;

/// The delivery reports still due for one tag's records, and the first failure among them.
#[derive(Default)]
struct Tally {
    due: u64,
    failure: Option<String>,
}

impl ClientContext for DeliveryCheck {}

impl ProducerContext for DeliveryCheck {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        self.report(tag, result.as_ref().err().map(|(e, _)| e.to_string()));
    }
}

impl DeliveryCheck {
    /// Notes the delivery report of one record sent with `tag`: `failure` if it failed.
    fn report(&self, tag: usize, failure: Option<String>) {
        if tag == UNTAGGED {
            if let Some(e) = failure {
                self.failed.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock().expect("delivery lock") = Some(e);
            }
            return;
        }
        let mut tagged = self.tagged.lock().expect("delivery lock");
        // A tag forgotten after a failed send has no tally left.
        if let Some(tally) = tagged.get_mut(&tag) {
            tally.due = tally.due.saturating_sub(1);
            if let Some(e) = failure {
                tally.failure.get_or_insert(e);
            }
            if tally.due == 0 {
                self.acknowledged.notify_all();
            }
        }
    }

    /// Expects `records` delivery reports for `tag`: called before they are sent, so that no
    /// report arrives before its tally exists.
    pub(crate) fn expect(&self, tag: usize, records: u64) {
        let mut tagged = self.tagged.lock().expect("delivery lock");
        tagged.entry(tag).or_default().due += records;
    }

    /// Stops counting `tag`'s records (their sending failed, and so did their epoch).
    pub(crate) fn forget(&self, tag: usize) {
        self.tagged.lock().expect("delivery lock").remove(&tag);
    }

    /// Waits until the broker acknowledged every record sent with `tag`.
    ///
    /// # Errors
    /// [`RiffleError::External`] naming `what` if a record failed, or if reports were still due
    /// after `timeout` (librdkafka reports every record by its `message.timeout.ms`, 5 minutes
    /// by default; the flush this replaces waited 30 s).
    pub(crate) fn wait(&self, tag: usize, what: &str, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let mut tagged = self.tagged.lock().expect("delivery lock");
        loop {
            let due = tagged.get(&tag).map_or(0, |t| t.due);
            if due == 0 {
                return match tagged.remove(&tag).and_then(|t| t.failure) {
                    Some(reason) => Err(RiffleError::External(format!(
                        "kafka: {what}: delivery failed: {reason}"
                    ))),
                    None => Ok(()),
                };
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(RiffleError::External(format!(
                    "kafka: {what}: {due} records not acknowledged within {timeout:?}"
                )));
            }
            tagged = self
                .acknowledged
                .wait_timeout(tagged, left)
                .expect("delivery lock")
                .0;
        }
    }
}

pub(crate) type CheckedProducer = ThreadedProducer<DeliveryCheck>;

pub(crate) fn producer(config: &ClientConfig) -> Result<CheckedProducer> {
    config
        .create_with_context(DeliveryCheck::default())
        .map_err(|e| kafka_error("creating a producer", e))
}

/// Sends one record, untagged (see [`DeliveryCheck`]), waiting while librdkafka's queue is
/// full.
pub(crate) fn send(producer: &CheckedProducer, record: BaseRecord<'_, [u8], [u8]>) -> Result<()> {
    send_tagged(producer, record, UNTAGGED)
}

/// Sends one record with `tag` (see [`DeliveryCheck`]), waiting while librdkafka's queue is
/// full.
pub(crate) fn send_tagged(
    producer: &CheckedProducer,
    record: BaseRecord<'_, [u8], [u8]>,
    tag: usize,
) -> Result<()> {
    let mut record = BaseRecord {
        topic: record.topic,
        partition: record.partition,
        payload: record.payload,
        key: record.key,
        timestamp: record.timestamp,
        headers: record.headers,
        delivery_opaque: tag,
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn an_epoch_waits_for_its_own_records_only() {
        let check = Arc::new(DeliveryCheck::default());
        check.expect(1, 2);
        check.expect(2, 1);
        // Epoch 2's record is acknowledged first (another partition): epoch 1 still waits.
        check.report(2, None);
        check.wait(2, "epoch 2", Duration::ZERO).unwrap();
        let err = check.wait(1, "epoch 1", Duration::ZERO).unwrap_err();
        assert!(
            err.to_string().contains("2 records not acknowledged"),
            "{err}"
        );
        // A waiter on another thread wakes when the last report arrives.
        let waiter = {
            let check = check.clone();
            std::thread::spawn(move || check.wait(1, "epoch 1", Duration::from_secs(3600)))
        };
        check.report(1, None);
        check.report(1, None);
        waiter.join().unwrap().unwrap();
        // Nothing sent, nothing to wait for.
        check.wait(3, "epoch 3", Duration::ZERO).unwrap();
    }

    #[test]
    fn a_failed_record_fails_its_epoch_once_all_are_reported() {
        let check = DeliveryCheck::default();
        check.expect(4, 3);
        check.report(4, Some("Message size too large".into()));
        check.report(4, None);
        let err = check.wait(4, "epoch 4", Duration::ZERO).unwrap_err();
        assert!(
            err.to_string().contains("1 records not acknowledged"),
            "{err}"
        );
        check.report(4, None);
        let err = check
            .wait(4, "writing epoch 4", Duration::ZERO)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "kafka: writing epoch 4: delivery failed: Message size too large"
        );
        // Untagged failures are left to `flush_checked`; a forgotten tag has nothing due.
        check.report(UNTAGGED, Some("broker down".into()));
        assert_eq!(check.failed.load(Ordering::Relaxed), 1);
        check.expect(5, 10);
        check.forget(5);
        check.report(5, None);
        check.wait(5, "epoch 5", Duration::ZERO).unwrap();
    }
}
