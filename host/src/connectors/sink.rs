//! Streaming sinks. Each epoch's output is written under the epoch's number, so writing it
//! again after a crash replaces it instead of adding to it: exactly-once output from an
//! at-least-once write.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::connectors::source::DeadLetter;
use crate::error::Result;

/// A wait for an epoch's output to be acknowledged ([`Sink::acknowledgement`]). It runs on the
/// checkpoint's commit writer thread, outside the async runtime, and may block.
pub type Acknowledgement = Box<dyn FnOnce() -> Result<()> + Send>;

/// Where a streaming query's output goes. Async because transactional sinks (Delta, Kafka)
/// talk to storage and brokers inside the query's runtime.
#[async_trait::async_trait]
pub trait Sink: Send {
    /// Called once before the first epoch with the query's id (stable across restarts from
    /// the same checkpoint, new for a new checkpoint): transactional sinks derive their
    /// transaction ids from it.
    ///
    /// # Errors
    /// Connection errors.
    async fn start(&mut self, _query_id: &str) -> Result<()> {
        Ok(())
    }

    /// Writes epoch `epoch`'s rows, replacing anything written for that epoch before.
    ///
    /// # Errors
    /// I/O errors.
    async fn write_epoch(
        &mut self,
        epoch: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()>;

    /// What must happen before epoch `epoch` commits, if [`Sink::write_epoch`] returned before
    /// the epoch's output was durable. Called right after every successful `write_epoch`. The
    /// at-least-once Kafka sink returns once its records are queued, so that the next epoch
    /// reads and computes while the broker acknowledges them; a Parquet directory leaves the
    /// syncing and renaming of its epoch's file to the acknowledgement. The checkpoint's
    /// commit writer runs the returned wait before it commits the epoch, and a failed wait
    /// (or one never run, in a crash) leaves the epoch uncommitted, to run again. `None`, the
    /// default: the output was durable on return.
    fn acknowledgement(&mut self, _epoch: u64) -> Option<Acknowledgement> {
        None
    }

    /// Whether this sink keeps an epoch it already holds when the epoch runs again after a
    /// crash (the exactly-once Kafka and Delta sinks skip it), rather than replacing it (files
    /// named by epoch) or writing it once more (at-least-once). A sink that keeps it must see
    /// the epoch's plan durable before it writes, unless it carries the plan itself
    /// ([`Sink::carries_plans`]): otherwise a crash could lose the plan, the
    /// next run would plan the epoch anew over more input, and the sink would keep the old,
    /// shorter epoch, losing the rest. A sink that replaces or repeats lets the driver sync
    /// the plan while the sink writes. Yes unless a sink says otherwise: the safe answer.
    fn keeps_replayed_epochs(&self) -> bool {
        true
    }

    /// Whether this sink records with each epoch it keeps, in the same atomic write, the plans
    /// the checkpoint may not have made durable yet ([`Sink::carry_plans`]), and gives them
    /// back after a crash ([`Sink::carried_plans`]). The driver then lets it write before the
    /// epoch's plan is durable: a plan lost in a crash comes back from the sink, and the
    /// epoch runs again over the same input. No unless a sink says so.
    fn carries_plans(&self) -> bool {
        false
    }

    /// The plans to record with the next epoch written, oldest first: that epoch's and those
    /// of earlier epochs still being made durable (JSON, as the checkpoint writes them). Only
    /// called on a sink that said yes to [`Sink::carries_plans`].
    fn carry_plans(&mut self, _plans: Vec<serde_json::Value>) {}

    /// After [`Sink::start`]: the plans recorded with the last epoch this sink holds, oldest
    /// first (none if it holds none, or recorded none).
    fn carried_plans(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }

    /// Whether this sink writes dead letters bound for the Kafka cluster `bootstrap` inside
    /// each epoch's transaction (see [`Sink::stage_dead_letters`]).
    fn writes_dead_letters_for(&self, _bootstrap: &str) -> bool {
        false
    }

    /// Dead letters to write with the next epoch, atomically with its rows. Only called on a
    /// sink that said yes to [`Sink::writes_dead_letters_for`].
    fn stage_dead_letters(&mut self, _letters: Vec<DeadLetter>) {}

    /// The `(riffle.udf.<module>, sha256)` pairs to stamp on output from the next epoch on:
    /// called when a running query swaps a UDF module, so each epoch's output names the
    /// module that produced it. Sinks that stamp nothing ignore it.
    fn set_udf_modules(&mut self, _modules: Vec<(String, String)>) {}
}
