//! Streaming operators: Riffle's incremental physical plan.
//!
//! A streaming query is compiled (see [`crate::plan::stream`]) into three parts:
//!
//! 1. a **stateless stage**: the part of the query below its aggregation or `DISTINCT`
//!    (scans, filters, projections with Wasm UDFs, joins with static tables). It runs as a
//!    DataFusion physical plan, built once and executed on every micro-batch ([`stage`]);
//! 2. at most one **stateful operator** implementing [`Watermarked`]: [`WindowAggregate`]
//!    (keyed, tumbling and hopping windows), [`SessionAggregate`] or [`Dedup`];
//! 3. a **post stage**: projections, `HAVING` filters and (complete mode) sorting above the
//!    aggregation, evaluated on the operator's output ([`PostStage`]).

pub mod aggregate;
pub mod dedup;
pub mod session;
pub mod stage;

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::compute::{filter_record_batch, lexsort_to_indices, take_record_batch};
use arrow::datatypes::SchemaRef;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{LogicalPlan, SortExpr};
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_plan::PhysicalExpr;
use serde::Serialize;

pub use aggregate::WindowAggregate;
pub use dedup::Dedup;
pub use session::SessionAggregate;

use crate::error::{Result, RiffleError};

/// Spark's output modes: which result rows a trigger writes to the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// Only rows that are final and will never change (closed windows, new stateless rows).
    #[default]
    Append,
    /// The rows that changed in this trigger.
    Update,
    /// The whole result table on every trigger.
    Complete,
}

impl std::str::FromStr for OutputMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "append" => Ok(OutputMode::Append),
            "update" => Ok(OutputMode::Update),
            "complete" => Ok(OutputMode::Complete),
            other => Err(format!(
                "unknown output mode {other:?}: expected append, update or complete"
            )),
        }
    }
}

/// Size of an operator's state.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StateRows {
    /// Entries (groups, keys, buffered rows).
    pub rows: u64,
    /// Approximate bytes in memory.
    pub bytes: u64,
}

/// A stateful streaming operator driven by event time.
///
/// Per epoch the driver calls [`process`](Self::process) for each batch of rows that are not
/// late, then [`advance`](Self::advance) with the new watermark, then
/// [`checkpoint`](Self::checkpoint). Only `advance` produces output, so an epoch's output is a
/// pure function of the state before it and its input rows: replaying an epoch after a crash
/// yields the same rows.
pub trait Watermarked: Send {
    /// Folds rows into the state.
    ///
    /// # Errors
    /// Evaluation errors (including UDF failures inside aggregate arguments).
    fn process(&mut self, batch: &RecordBatch) -> Result<()>;

    /// Emits output for the output mode and evicts state the watermark has made final.
    ///
    /// # Errors
    /// Evaluation errors.
    fn advance(&mut self, watermark: i64) -> Result<Vec<RecordBatch>>;

    /// The state changes since the last checkpoint (all of the state when `full`), as one
    /// batch, or `None` when nothing changed.
    ///
    /// # Errors
    /// Serialisation errors.
    fn checkpoint(&mut self, full: bool) -> Result<Option<RecordBatch>>;

    /// Whether every [`checkpoint`](Self::checkpoint) batch replaces the state (rather than
    /// being a delta on top of the previous one).
    fn checkpoint_is_snapshot(&self) -> bool {
        false
    }

    /// Applies one checkpoint batch, in the order they were written.
    ///
    /// # Errors
    /// Corrupt or incompatible state.
    fn restore(&mut self, batch: &RecordBatch) -> Result<()>;

    /// Current size of the state.
    fn state_rows(&self) -> StateRows;

    /// Schema of the batches [`advance`](Self::advance) returns.
    fn output_schema(&self) -> SchemaRef;
}

enum PostStep {
    Project(Vec<Arc<dyn PhysicalExpr>>, SchemaRef),
    Filter(Arc<dyn PhysicalExpr>),
    Sort(LexOrdering),
    Limit(usize, Option<usize>),
}

/// The plan nodes above a stateful operator, evaluated on its output.
pub struct PostStage {
    steps: Vec<PostStep>,
}

impl PostStage {
    /// Plans `nodes` (listed bottom-up, each the parent of the previous one).
    ///
    /// # Errors
    /// [`RiffleError::Config`] for node kinds that cannot follow a streaming aggregation.
    pub fn new(nodes: &[LogicalPlan], state: &SessionState) -> Result<Self> {
        let mut steps = Vec::new();
        for node in nodes {
            let input = node.inputs()[0].schema().clone();
            match node {
                LogicalPlan::Projection(p) => {
                    let exprs = p
                        .expr
                        .iter()
                        .map(|e| state.create_physical_expr(e.clone(), &input))
                        .collect::<datafusion::common::Result<Vec<_>>>()?;
                    steps.push(PostStep::Project(
                        exprs,
                        Arc::new(p.schema.as_arrow().clone()),
                    ));
                }
                LogicalPlan::Filter(f) => {
                    steps.push(PostStep::Filter(
                        state.create_physical_expr(f.predicate.clone(), &input)?,
                    ));
                }
                LogicalPlan::Sort(s) => {
                    let ordering = s
                        .expr
                        .iter()
                        .map(
                            |SortExpr {
                                 expr,
                                 asc,
                                 nulls_first,
                             }| {
                                Ok(PhysicalSortExpr {
                                    expr: state.create_physical_expr(expr.clone(), &input)?,
                                    options: arrow::compute::SortOptions {
                                        descending: !asc,
                                        nulls_first: *nulls_first,
                                    },
                                })
                            },
                        )
                        .collect::<Result<Vec<_>>>()?;
                    if let Some(ordering) = LexOrdering::new(ordering) {
                        steps.push(PostStep::Sort(ordering));
                    }
                    if let Some(fetch) = s.fetch {
                        steps.push(PostStep::Limit(0, Some(fetch)));
                    }
                }
                LogicalPlan::Limit(l) => {
                    let skip = match l.get_skip_type()? {
                        datafusion::logical_expr::SkipType::Literal(n) => n,
                        _ => return Err(RiffleError::Config("OFFSET must be a literal".into())),
                    };
                    let fetch = match l.get_fetch_type()? {
                        datafusion::logical_expr::FetchType::Literal(n) => n,
                        _ => return Err(RiffleError::Config("LIMIT must be a literal".into())),
                    };
                    steps.push(PostStep::Limit(skip, fetch));
                }
                LogicalPlan::SubqueryAlias(_) => {}
                other => {
                    return Err(RiffleError::Internal(format!(
                        "unexpected {} above a streaming operator",
                        other.display()
                    )));
                }
            }
        }
        Ok(PostStage { steps })
    }

    /// Applies the steps to one epoch's output (all of it at once, so sorts are total).
    ///
    /// # Errors
    /// Evaluation errors.
    pub fn apply(&self, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        if self.steps.is_empty() || batches.is_empty() {
            return Ok(batches);
        }
        let mut batch = arrow::compute::concat_batches(&batches[0].schema(), &batches)?;
        for step in &self.steps {
            batch = match step {
                PostStep::Project(exprs, schema) => {
                    let columns = exprs
                        .iter()
                        .map(|e| e.evaluate(&batch)?.into_array(batch.num_rows()))
                        .collect::<datafusion::common::Result<Vec<_>>>()?;
                    RecordBatch::try_new(schema.clone(), columns)?
                }
                PostStep::Filter(predicate) => {
                    let mask = predicate.evaluate(&batch)?.into_array(batch.num_rows())?;
                    let mask = arrow::array::AsArray::as_boolean(&mask).clone();
                    filter_record_batch(&batch, &mask)?
                }
                PostStep::Sort(ordering) => {
                    let columns = ordering
                        .iter()
                        .map(|s| s.evaluate_to_sort_column(&batch))
                        .collect::<datafusion::common::Result<Vec<_>>>()?;
                    let indices = lexsort_to_indices(&columns, None)?;
                    take_record_batch(&batch, &indices)?
                }
                PostStep::Limit(skip, fetch) => {
                    let start = (*skip).min(batch.num_rows());
                    let len = fetch.unwrap_or(usize::MAX).min(batch.num_rows() - start);
                    batch.slice(start, len)
                }
            };
        }
        Ok(vec![batch])
    }
}
