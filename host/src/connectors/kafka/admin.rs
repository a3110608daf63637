//! Topic administration and a rate-limited producer (demo input, benchmarks, tests).

use std::time::{Duration, Instant};

use arrow::array::RecordBatch;

use super::codec::RecordFormat;
use super::sink::{Delivery, KafkaSink, KafkaSinkOptions};
use super::{KafkaConfig, TIMEOUT, flush_checked, kafka_error, producer};
use crate::error::{Result, RiffleError};

/// Creates `topic` with `partitions` partitions unless it exists.
///
/// # Errors
/// Unreachable brokers or a refused creation.
pub async fn ensure_topic(kafka: &KafkaConfig, topic: &str, partitions: i32) -> Result<()> {
    ensure_topic_with(kafka, topic, partitions, &[]).await
}

/// Creates `topic` with `partitions` partitions and topic `config` unless it exists.
///
/// # Errors
/// Unreachable brokers or a refused creation.
pub async fn ensure_topic_with(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
    config: &[(&str, &str)],
) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = kafka
        .client(&[])
        .create()
        .map_err(|e| kafka_error("creating an admin client", e))?;
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (k, v) in config {
        new = new.set(k, v);
    }
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
/// Blocking (it sleeps to keep the rate and waits for deliveries): call it from a plain
/// thread or `spawn_blocking`, never on an async worker.
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
        marker_topic: super::sink::MARKER_TOPIC.into(),
    })?;
    let mut started = Instant::now();
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
            sink.produce(&producer, &[batch.slice(at, n)], super::UNTAGGED)?;
            at += n;
            sent += n as u64;
            if let Some(r) = rate
                && sent == n as u64
            {
                // The first slice goes alone, and the pace starts once the broker has it. An
                // idempotent producer sends nothing until the broker has given it an id, and
                // librdkafka asks for one only 500 ms after start-up when no connection was
                // up yet (it never is at first): without this, the first half second of
                // records would queue and reach the broker late, their timestamps (taken when
                // they were produced) half a second behind.
                flush_checked(&producer, "producing")?;
                let ahead = Duration::from_secs_f64(sent as f64 / r);
                started = Instant::now().checked_sub(ahead).unwrap_or(started);
            }
        }
        progress(sent);
    }
    flush_checked(&producer, "producing")?;
    Ok(sent)
}
