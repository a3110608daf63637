//! From a query's logical plan to a streaming dataflow graph.
//!
//! Batch mode hands the logical plan to DataFusion. Stream mode hands the *same* logical plan
//! (from SQL or a DataFrame) to [`compile`], which optimises it with DataFusion's optimizer
//! (minus the two rules that would hide streaming semantics, see [`streaming_state`]), checks
//! Spark's rules for what a stream can do, and cuts it into a graph of operators:
//!
//! - every scan of a streaming source, and every stateful node that reads a stream
//!   (`Aggregate`, `Distinct`, `Window`, a `Join` of two streams), becomes a cut;
//! - each stateful node becomes its operator ([`crate::exec`]), with stable ids
//!   (`<position>-<kind>`) that name its state in the checkpoint;
//! - everything between cuts stays a DataFusion plan, run by a
//!   [`StatelessStage`](crate::exec::stateless::StatelessStage) whose leaves are the cuts.
//!
//! Event time is tracked through the plan by lineage (which output columns carry a source's
//! event time, or a window of it), so operators receive the position of their event-time column
//! rather than looking for a name, and windows on other columns are never evicted by a watermark
//! that does not cover them.

mod compile;
pub mod fingerprint;

use arrow::datatypes::SchemaRef;

pub use compile::compile;
pub use fingerprint::Fingerprint;

use crate::common::OutputMode;
use crate::exec::graph::Graph;

/// A streaming source as the planner sees it.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    /// The table name queries use.
    pub name: String,
    /// What kind of source it is (`generator`, `directory`, `kafka`, ...), for the fingerprint.
    pub kind: String,
    /// Its rows' schema.
    pub schema: SchemaRef,
    /// Its event-time column, if it has one.
    pub event_time: Option<String>,
    /// Watermark delay (allowed disorder), microseconds.
    pub watermark_delay: i64,
}

/// A compiled streaming query.
pub struct StreamPlan {
    /// The operators.
    pub graph: Graph,
    /// Schema of the query's result rows.
    pub output_schema: SchemaRef,
    /// What identifies the query's state (see [`Fingerprint`]).
    pub fingerprint: Fingerprint,
    /// The output mode the query runs in.
    pub output_mode: OutputMode,
}

pub use crate::exec::stateless::streaming_state;
