//! Streaming operators and the dataflow graph that runs them.
//!
//! A streaming query is a graph ([`graph::Graph`]) of operators with stable ids, built by the
//! planner ([`crate::plan`]) from the same DataFusion logical plan that batch mode runs. Every
//! operator implements the one [`Operator`] trait; the driver ([`crate::stream`]) runs the graph
//! once per epoch and never looks inside an operator or an expression.
//!
//! | operator | what it does | state |
//! |---|---|---|
//! | [`stateless::StatelessStage`] | a DataFusion physical plan (scans, filters, projections with Wasm UDFs, joins with static tables, unions, and everything above the last stateful operator) run once per epoch over its inputs | none |
//! | [`aggregate::WindowAggregate`] | `GROUP BY` with or without a tumbling/hopping window | group -> DataFusion accumulators |
//! | [`session::SessionAggregate`] | `GROUP BY session_window(...)` | key -> open rows |
//! | [`dedup::Dedup`] | `DISTINCT`, `DISTINCT ON` | key -> event time |
//! | [`over::OverWindow`] | `... OVER (PARTITION BY .. ORDER BY event time ..)` | pending rows; partition -> frame |
//! | [`join::IntervalJoin`] | joins of two streams with an event-time range | key -> rows, per side |
//!
//! Batch mode runs [`aggregate::WindowAggregate`] and [`session::SessionAggregate`] too, for
//! hopping and session windows, over bounded input sorted by event time ([`bounded`]), or
//! over Parquet files in their own order when their statistics bound how far back a row can
//! reach ([`file_order`]).
//!
//! Per epoch an operator receives every batch of each input
//! ([`process_batch`](Operator::process_batch)), then the watermark of its inputs
//! ([`on_watermark`](Operator::on_watermark)). An operator's output within an epoch is a pure
//! function of its state before the epoch and the epoch's input, which is what makes replaying
//! an epoch after a crash give the same rows.
//!
//! An operator that says how its rows may be split ([`Operator::partitioning`]: stateless
//! filters and projections row by row, keyed aggregations by key) runs as several instances,
//! one per partition, on as many cores ([`partition`]); its state reaches the checkpoint as
//! one table whatever the number of partitions, and a restart may change that number.

pub mod aggregate;
pub mod bounded;
pub mod dedup;
pub mod file_order;
pub mod graph;
pub mod join;
pub mod keys;
pub mod over;
pub mod partition;
pub mod session;
pub mod stateless;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use datafusion::execution::SessionState;
use serde::Serialize;

use crate::common::Watermark;
use crate::error::{Result, RiffleError};
use crate::state::{StateSize, StateTable};

pub use partition::{Combiner, PartitionKey, Partitioning};

/// Where an operator puts what it emits.
#[derive(Debug, Default)]
pub struct Output {
    /// Rows emitted.
    pub batches: Vec<RecordBatch>,
    /// Input rows dropped because they were behind the operator's watermark.
    pub late_rows: u64,
}

impl Output {
    /// Emits `batch` (empty batches are dropped).
    pub fn push(&mut self, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.batches.push(batch);
        }
    }

    /// Rows emitted so far.
    pub fn rows(&self) -> u64 {
        self.batches.iter().map(|b| b.num_rows() as u64).sum()
    }
}

/// A streaming operator.
///
/// One method is required: [`process_batch`](Self::process_batch). Everything else has a
/// default that suits a stateless operator: no reaction to the watermark, no state, nothing to
/// hold back. The graph measures rows in and out and the time spent in each call, so an
/// operator does not count those itself.
///
/// # Errors
/// Every method returns Riffle errors; a failed epoch is not committed and is replayed from the
/// last checkpoint on restart, so an operator may fail at any point without cleaning up.
///
/// # Examples
///
/// An operator that passes rows through and counts them in its state would keep a
/// [`KeyedTable`](crate::state::KeyedTable) and return it from [`tables`](Self::tables); the
/// checkpoint takes care of deltas, snapshots and restore.
///
/// ```
/// use arrow::array::RecordBatch;
/// use riffle::exec::{Operator, Output};
///
/// struct PassThrough;
///
/// #[async_trait::async_trait]
/// impl Operator for PassThrough {
///     fn kind(&self) -> &'static str {
///         "pass-through"
///     }
///     async fn process_batch(
///         &mut self,
///         _input: usize,
///         batch: RecordBatch,
///         out: &mut Output,
///     ) -> riffle::Result<()> {
///         out.push(batch);
///         Ok(())
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait Operator: Send {
    /// The operator's kind, a short lowercase name (part of its id and of the checkpoint's
    /// fingerprint).
    fn kind(&self) -> &'static str;

    /// Processes rows that arrived on input `input` (numbered from 0).
    async fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        out: &mut Output,
    ) -> Result<()>;

    /// Called once per epoch, after all of the epoch's input, with the watermark of the
    /// inputs (the minimum over them). Operators that wait for event time emit here.
    async fn on_watermark(&mut self, _watermark: Watermark, _out: &mut Output) -> Result<()> {
        Ok(())
    }

    /// How much older than the input watermark the event times of rows this operator emits
    /// may be. The operator's output watermark is its input watermark held back by this, so
    /// stateful operators after it never see their own input as late.
    fn watermark_hold_back(&self) -> i64 {
        0
    }

    /// How the graph may split the operator's rows among several instances of it, which
    /// then run on several cores ([`partition`]). An operator that returns anything but
    /// [`Partitioning::Single`] must give the same rows, as a multiset, whichever way the
    /// graph splits its input within those rules.
    fn partitioning(&self) -> Partitioning {
        Partitioning::Single
    }

    /// For an operator partitioned [`ByKey`](Partitioning::ByKey): what folds shares of its
    /// rows before they are routed to its instances ([`Combiner`]), or `None` to route the
    /// rows as they are. Its instances then also receive folded rows, through
    /// [`process_combined`](Self::process_combined).
    fn combiner(&self) -> Option<Arc<dyn Combiner>> {
        None
    }

    /// Takes entries the operator's [`combiner`](Self::combiner) folded from rows that
    /// arrived on input `input`, in place of those rows.
    async fn process_combined(
        &mut self,
        _input: usize,
        _entries: RecordBatch,
        _out: &mut Output,
    ) -> Result<()> {
        Err(RiffleError::Internal(format!(
            "a {} operator was given combined rows, but has no combiner",
            self.kind()
        )))
    }

    /// The operator's state, for the checkpoint.
    fn tables(&mut self) -> Vec<&mut dyn StateTable> {
        Vec::new()
    }

    /// Called after the checkpoint restored [`tables`](Self::tables), before the first epoch.
    fn on_restored(&mut self) -> Result<()> {
        Ok(())
    }

    /// Static tables the query reads changed; re-plan anything that depends on them.
    async fn on_static_tables_changed(&mut self, _state: &SessionState) -> Result<()> {
        Ok(())
    }

    /// Current size of the state.
    fn state_size(&mut self) -> StateSize {
        self.tables()
            .iter()
            .map(|t| t.size())
            .fold(StateSize::default(), |a, b| a + b)
    }
}

/// What an operator did, cumulatively and in the last epoch.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OperatorMetrics {
    /// Stable id of the operator.
    pub id: String,
    /// Its kind.
    pub kind: &'static str,
    /// Instances of it that share its rows, each on a core (see [`partition`]).
    pub partitions: usize,
    /// Rows in, this epoch.
    pub rows_in: u64,
    /// Rows out, this epoch.
    pub rows_out: u64,
    /// Rows dropped as late, this epoch.
    pub late_rows: u64,
    /// Time spent in the operator this epoch, milliseconds (its instances' times added up).
    pub time_ms: f64,
    /// Output watermark after the epoch (RFC 3339), if any.
    pub watermark: Option<String>,
    /// State after the epoch.
    pub state: StateSize,
    /// Rows in since the query started in this process.
    pub total_rows_in: u64,
    /// Rows out since the query started in this process.
    pub total_rows_out: u64,
}

impl OperatorMetrics {
    pub(crate) fn start_epoch(&mut self) {
        self.rows_in = 0;
        self.rows_out = 0;
        self.late_rows = 0;
        self.time_ms = 0.0;
    }

    pub(crate) fn add_time(&mut self, d: Duration) {
        self.time_ms += d.as_secs_f64() * 1000.0;
    }
}
