//! The stateless operator: a DataFusion physical plan run once per epoch.
//!
//! The planner cuts the query's logical plan at its stateful nodes and at the streaming scans.
//! Each cut becomes a [`SlotNode`], a leaf that carries the exact schema (with qualifiers) of
//! the subtree it replaces, so the expressions above it resolve their columns as they did in the
//! whole plan. Physical planning turns a `SlotNode` into a scan of its [`Slot`], which hands out
//! whatever the operator put there for the current epoch. The same optimised plan (filters,
//! projections with Wasm UDF calls, hash joins against static tables, sorts and limits in
//! complete mode) then runs every epoch without re-planning: there is no second executor for
//! anything DataFusion already does.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchemaRef, Result as DfResult, internal_err};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{
    SendableRecordBatchStream, SessionState, SessionStateBuilder, TaskContext,
};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Expr, Extension, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::optimizer::{AnalyzerRule, Optimizer, OptimizerRule};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use datafusion::prelude::SessionContext;

use super::{Operator, Output, Partitioning};
use crate::error::{Result, RiffleError};

/// Where an operator puts an epoch's rows for its plan's scan of one input.
#[derive(Debug, Clone)]
pub struct Slot {
    schema: SchemaRef,
    batches: Arc<Mutex<Vec<RecordBatch>>>,
}

impl Slot {
    /// An empty slot for batches of `schema`.
    pub fn new(schema: SchemaRef) -> Self {
        Slot {
            schema,
            batches: Arc::default(),
        }
    }

    /// Adds rows for the current epoch, relabelled with the slot's schema (operators emit the
    /// same types under the names their logical node gives them).
    ///
    /// # Errors
    /// [`RiffleError::Internal`] for rows of other types.
    pub fn push(&self, batch: RecordBatch) -> Result<()> {
        let batch = if batch.schema().fields() == self.schema.fields() {
            batch
        } else {
            RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec()).map_err(|e| {
                RiffleError::Internal(format!(
                    "rows of {} do not fit the plan's input {}: {e}",
                    batch.schema(),
                    self.schema
                ))
            })?
        };
        self.batches.lock().expect("slot lock").push(batch);
        Ok(())
    }

    fn take(&self) -> Vec<RecordBatch> {
        std::mem::take(&mut *self.batches.lock().expect("slot lock"))
    }

    fn is_empty(&self) -> bool {
        self.batches.lock().expect("slot lock").is_empty()
    }

    /// Whether `other` is this slot (a clone of it), not just alike.
    fn is(&self, other: &Slot) -> bool {
        Arc::ptr_eq(&self.batches, &other.batches)
    }
}

impl PartitionStream for Slot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        // Each slot is read by exactly one scan (the planner makes one slot per cut), once per
        // epoch; cloning rather than taking keeps a re-read harmless.
        let batches = self.batches.lock().expect("slot lock").clone();
        Box::pin(
            MemoryStream::try_new(batches, self.schema.clone(), None)
                .expect("slot batches carry the slot schema"),
        )
    }
}

/// A leaf of a stateless segment's logical plan: input `id` of the segment, with the exact
/// schema of the subtree it stands for.
#[derive(Debug, Clone)]
pub struct SlotNode {
    id: usize,
    schema: DFSchemaRef,
    slot: Slot,
}

impl SlotNode {
    /// A leaf standing for `schema`'s rows, fed through a new slot.
    pub fn new(id: usize, schema: DFSchemaRef) -> Self {
        let slot = Slot::new(Arc::new(schema.as_arrow().clone()));
        SlotNode { id, schema, slot }
    }

    /// The node as a logical plan.
    pub fn into_plan(self) -> LogicalPlan {
        LogicalPlan::Extension(Extension {
            node: Arc::new(self),
        })
    }

    /// The slot this leaf reads.
    pub fn slot(&self) -> &Slot {
        &self.slot
    }

    /// The segment input this leaf stands for.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The `SlotNode` inside `plan`, if `plan` is one.
    pub fn of(plan: &LogicalPlan) -> Option<&SlotNode> {
        match plan {
            LogicalPlan::Extension(e) => e.node.as_any().downcast_ref::<SlotNode>(),
            _ => None,
        }
    }
}

impl PartialEq for SlotNode {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.schema == other.schema
    }
}

impl Eq for SlotNode {}

impl Hash for SlotNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
        self.schema.hash(state);
    }
}

impl PartialOrd for SlotNode {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        self.id
            .partial_cmp(&other.id)
            .filter(|c| *c != Ordering::Equal || self == other)
    }
}

impl UserDefinedLogicalNodeCore for SlotNode {
    fn name(&self) -> &str {
        "StreamInput"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        Vec::new()
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "StreamInput: input={}", self.id)
    }

    fn with_exprs_and_inputs(&self, exprs: Vec<Expr>, inputs: Vec<LogicalPlan>) -> DfResult<Self> {
        if !exprs.is_empty() || !inputs.is_empty() {
            return internal_err!("StreamInput is a leaf");
        }
        Ok(self.clone())
    }
}

#[derive(Debug)]
struct SlotPlanner;

#[async_trait::async_trait]
impl ExtensionPlanner for SlotPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        _physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _ctx: &PhysicalPlanningContext,
    ) -> DfResult<Option<Arc<dyn ExecutionPlan>>> {
        let Some(slot_node) = node.as_any().downcast_ref::<SlotNode>() else {
            return Ok(None);
        };
        let slot = slot_node.slot.clone();
        Ok(Some(Arc::new(StreamingTableExec::try_new(
            slot.schema.clone(),
            vec![Arc::new(slot)],
            None,
            Vec::new(),
            false,
            None,
        )?)))
    }
}

/// The query planner of streaming sessions: DataFusion's, plus [`SlotNode`] leaves.
#[derive(Debug)]
pub struct StreamQueryPlanner;

#[async_trait::async_trait]
impl QueryPlanner for StreamQueryPlanner {
    async fn create_physical_plan(
        &self,
        plan: &LogicalPlan,
        session: &dyn Session,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(SlotPlanner)])
            .create_physical_plan(plan, session)
            .await
    }
}

/// A stateless segment of the query, run once per epoch over everything its inputs delivered.
pub struct StatelessStage {
    logical: LogicalPlan,
    physical: Arc<dyn ExecutionPlan>,
    slots: Vec<Slot>,
    task: Arc<TaskContext>,
    row_wise: bool,
}

/// Whether every output row of `plan` comes from one input row alone, in input order:
/// filters and projections (Wasm UDF calls included) over one input. Such a stage may run as
/// several instances, each on a contiguous share of the rows ([`Partitioning::RowWise`]);
/// joins, sorts, limits and unions see all of their input at once.
fn row_wise(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {
            plan.inputs().into_iter().all(row_wise)
        }
        _ => SlotNode::of(plan).is_some(),
    }
}

impl StatelessStage {
    /// Plans `logical`, whose [`SlotNode`] leaves are its inputs in the order of `slots`.
    ///
    /// # Errors
    /// Planning errors.
    pub async fn new(logical: LogicalPlan, slots: Vec<Slot>, state: &SessionState) -> Result<Self> {
        let physical = state
            .query_planner()
            .create_physical_plan(&logical, state)
            .await?;
        Ok(StatelessStage {
            row_wise: row_wise(&logical),
            logical,
            physical,
            slots,
            task: state.task_ctx(),
        })
    }

    /// Another instance of this stage: the same plan over slots of its own.
    ///
    /// # Errors
    /// Planning errors.
    pub async fn replicate(&self, state: &SessionState) -> Result<Self> {
        let mut slots: Vec<Option<Slot>> = vec![None; self.slots.len()];
        let logical = self
            .logical
            .clone()
            .transform_up(|plan| {
                let Some(leaf) = SlotNode::of(&plan) else {
                    return Ok(Transformed::no(plan));
                };
                let fresh = SlotNode::new(leaf.id, leaf.schema.clone());
                if let Some(i) = self.slots.iter().position(|s| s.is(&leaf.slot)) {
                    slots[i] = Some(fresh.slot.clone());
                }
                Ok(Transformed::yes(fresh.into_plan()))
            })?
            .data;
        let slots = slots
            .into_iter()
            .collect::<Option<Vec<Slot>>>()
            .ok_or_else(|| RiffleError::Internal("a stage input without its leaf".into()))?;
        StatelessStage::new(logical, slots, state).await
    }

    /// The logical plan it runs.
    pub fn logical(&self) -> &LogicalPlan {
        &self.logical
    }
}

#[async_trait::async_trait]
impl Operator for StatelessStage {
    fn kind(&self) -> &'static str {
        "stateless"
    }

    async fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        _out: &mut Output,
    ) -> Result<()> {
        self.slots[input].push(batch)
    }

    fn partitioning(&self) -> Partitioning {
        if self.row_wise {
            Partitioning::RowWise
        } else {
            Partitioning::Single
        }
    }

    async fn on_watermark(
        &mut self,
        _watermark: crate::common::Watermark,
        out: &mut Output,
    ) -> Result<()> {
        if self.slots.iter().all(Slot::is_empty) {
            return Ok(());
        }
        // Operators cache per-execution state (a hash join's collected build side), so each
        // epoch runs a reset copy of the plan.
        let plan =
            datafusion::physical_plan::execution_plan::reset_plan_states(self.physical.clone())?;
        let result = collect(plan, self.task.clone()).await;
        for slot in &self.slots {
            slot.take();
        }
        for batch in result? {
            out.push(batch);
        }
        Ok(())
    }

    async fn on_static_tables_changed(&mut self, state: &SessionState) -> Result<()> {
        self.physical = state
            .query_planner()
            .create_physical_plan(&self.logical, state)
            .await?;
        Ok(())
    }
}

/// Optimizer rules that would change a streaming query's meaning, not just its cost:
/// `DISTINCT` must stay a de-duplication (emitted at once, forgotten at the watermark) rather
/// than become a `GROUP BY` (final only at the end of input), and `count(DISTINCT x)` must stay
/// one aggregation rather than become two chained ones.
const STREAMING_EXCLUDED_RULES: &[&str] = &[
    "replace_distinct_aggregate",
    "single_distinct_aggregation_to_group_by",
];

/// The session state streaming queries are planned with: the session's functions and tables,
/// one partition (a micro-batch is small and each stage's plan runs once per epoch), the
/// analyzer without batch mode's window rule, the optimizer without
/// [`STREAMING_EXCLUDED_RULES`], and a query planner that knows the graph's
/// cut points.
pub fn streaming_state(ctx: &SessionContext) -> SessionState {
    // The context's catalog (its tables) carries over; a fresh default catalog would hide it.
    let mut config = ctx
        .copied_config()
        .with_create_default_catalog_and_schema(false);
    config.options_mut().execution.target_partitions = 1;
    let rules: Vec<Arc<dyn OptimizerRule + Send + Sync>> = Optimizer::new()
        .rules
        .into_iter()
        .filter(|r| !STREAMING_EXCLUDED_RULES.contains(&r.name()))
        .collect();
    let mut builder = SessionStateBuilder::new_from_existing(ctx.state())
        .with_config(config)
        .with_optimizer_rules(rules)
        .with_query_planner(Arc::new(StreamQueryPlanner));
    // A batch session hands window aggregations to operators over sorted input; a stream
    // plans its window operators itself.
    if let Some(analyzer) = builder.analyzer() {
        let batch_only = super::bounded::BoundedWindows.name().to_string();
        analyzer.rules.retain(|r| r.name() != batch_only);
    }
    builder.build()
}
