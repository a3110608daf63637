//! Streaming sources. A source's position is a JSON offset that goes into the checkpoint, and
//! reading between two offsets always returns the same rows: that is what lets an epoch be
//! replayed exactly after a crash.

use std::collections::BTreeMap;
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use serde_json::Value;

use crate::error::{Result, RiffleError};

/// Rows of an epoch plus when the oldest of them became available (for latency).
#[derive(Default)]
pub struct Input {
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// The split (Kafka partition) each batch came from, in the order of `batches`; empty
    /// for a source whose rows form one sequence. Each split's event times advance on their
    /// own, and a source may read one split further ahead than another, so the source's
    /// watermark follows the slowest split (see `stream::event_time`).
    pub splits: Vec<String>,
    /// When the first and last row became available, if the source knows.
    pub arrival: Option<(Instant, Instant)>,
    /// Records the epoch should have had but that were gone when it read them (a source told
    /// to go on past data loss), and what happened, for the progress.
    pub lost_records: u64,
    /// What the source went on past, in words (a data-loss gap).
    pub warnings: Vec<String>,
    /// Records the source rejected, for a transactional sink to write with the epoch (only
    /// from a source told to [`hand over`](StreamSource::hand_over_dead_letters) its dead
    /// letters).
    pub dead_letters: Vec<DeadLetter>,
    /// How many records the source rejected as dead letters (sent, or in `dead_letters`).
    pub rejected: u64,
    /// The first [`REJECTED_SAMPLE`] of them, for monitoring (what an operator looks at to
    /// see why records are being rejected; the dead-letter topic has them all).
    pub rejected_sample: Vec<DeadLetter>,
    /// Records beyond the epoch's end, per split (Kafka partition): the consumer lag. A
    /// split with a backlog holds its source's watermark back even when it gave no rows.
    pub backlog: BTreeMap<String, i64>,
}

/// Dead letters per epoch and source that [`Input::rejected_sample`] keeps.
pub const REJECTED_SAMPLE: usize = 20;

/// A record a source could not decode, bound for a dead-letter topic: its original bytes and
/// headers that say where it came from and why it was rejected.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The dead-letter topic.
    pub topic: String,
    /// The record's key.
    pub key: Option<Vec<u8>>,
    /// The record's value.
    pub value: Option<Vec<u8>>,
    /// Source topic, partition, offset and the reason.
    pub headers: Vec<(String, String)>,
}

/// A replayable streaming source.
pub trait StreamSource: Send {
    /// What kind of source this is (`generator`, `directory`, `kafka`, ...): part of the
    /// checkpoint's fingerprint, so a restart cannot swap one kind for another under the same
    /// offsets.
    fn kind(&self) -> &'static str {
        "custom"
    }
    /// Schema of every batch.
    fn schema(&self) -> SchemaRef;
    /// The offset where a new query starts.
    ///
    /// # Errors
    /// Source errors (e.g. an unreachable broker).
    fn initial(&mut self) -> Result<Value>;
    /// The offset after what is available now from `from`, reading at most `max_rows`.
    ///
    /// # Errors
    /// Source errors (e.g. an unreadable directory).
    fn available(&mut self, from: &Value, max_rows: usize) -> Result<Value>;
    /// The rows between two offsets.
    ///
    /// # Errors
    /// Source errors (unreadable files, bad offsets).
    fn read(&mut self, from: &Value, to: &Value) -> Result<Input>;
    /// Whether the source has no more data after `at`, ever.
    fn finished(&self, at: &Value) -> bool;
    /// The query runs its operators in `partitions` partitions, a core each: a source that can
    /// make an epoch's rows in parts (the generator) may use as many threads for it. Others
    /// ignore it. [`StreamingQuery::new`](crate::stream::StreamingQuery::new) calls it once,
    /// before the first read; a source used without it keeps to one thread.
    fn set_partitions(&mut self, _partitions: usize) {}
    /// Told after the epoch ending at `at` committed (for sources that report progress
    /// elsewhere, such as a Kafka consumer group).
    fn committed(&mut self, _at: &Value) {}
    /// The Kafka cluster (bootstrap servers) this source sends dead letters to, if it has any.
    fn dead_letter_cluster(&self) -> Option<String> {
        None
    }
    /// From now on, return dead letters in [`Input::dead_letters`] instead of sending them:
    /// the sink writes them in the epoch's transaction, so a replayed epoch does not send them
    /// twice.
    fn hand_over_dead_letters(&mut self) {}
}

/// The integer `key` of a JSON offset.
///
/// # Errors
/// [`RiffleError::Checkpoint`] when the offset has no such key (it belongs to another kind
/// of source).
pub fn row_of(offset: &Value, key: &str) -> Result<i64> {
    offset[key]
        .as_i64()
        .ok_or_else(|| RiffleError::Checkpoint(format!("bad source offset {offset} (no {key:?})")))
}
