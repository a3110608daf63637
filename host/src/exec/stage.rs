//! The stateless stage: a DataFusion physical plan built once and run on every micro-batch.
//!
//! The streaming source is registered as a table whose single partition hands out whatever
//! batches were put in its [`Slot`] for the current epoch, so the same optimised plan (with its
//! Wasm UDF calls, filters and hash joins against static tables) runs per epoch without
//! re-planning. Static tables are in-memory snapshots; when one's file changes the stage is
//! re-planned against the new snapshot.

use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::{SendableRecordBatchStream, SessionState, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, collect};

use crate::error::Result;

/// Where the driver puts an epoch's input for the stage to read.
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

    /// A table that reads this slot, to register under the source's name.
    ///
    /// # Errors
    /// Never in practice (the schema is the slot's own).
    pub fn table(&self) -> Result<StreamingTable> {
        Ok(StreamingTable::try_new(
            self.schema.clone(),
            vec![Arc::new(self.clone())],
        )?)
    }

    fn put(&self, batches: Vec<RecordBatch>) {
        *self.batches.lock().expect("slot lock") = batches;
    }
}

impl PartitionStream for Slot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batches = std::mem::take(&mut *self.batches.lock().expect("slot lock"));
        Box::pin(
            MemoryStream::try_new(batches, self.schema.clone(), None)
                .expect("slot batches match the slot schema"),
        )
    }
}

/// A planned stateless stage.
pub struct Stage {
    logical: LogicalPlan,
    physical: Arc<dyn ExecutionPlan>,
    slot: Slot,
}

impl Stage {
    /// Plans `logical`, whose streaming scan reads `slot`.
    ///
    /// # Errors
    /// Planning errors.
    pub async fn new(logical: LogicalPlan, slot: Slot, state: &SessionState) -> Result<Self> {
        let physical = state.create_physical_plan(&logical).await?;
        Ok(Stage {
            logical,
            physical,
            slot,
        })
    }

    /// Re-plans (after a static table changed).
    ///
    /// # Errors
    /// Planning errors, e.g. a reloaded table whose schema no longer fits the query.
    pub async fn replan(&mut self, state: &SessionState) -> Result<()> {
        self.physical = state.create_physical_plan(&self.logical).await?;
        Ok(())
    }

    /// Runs the stage over one epoch's input.
    ///
    /// # Errors
    /// Execution errors, including UDF failures.
    pub async fn run(
        &self,
        input: Vec<RecordBatch>,
        state: &SessionState,
    ) -> Result<Vec<RecordBatch>> {
        self.slot.put(input);
        // Operators cache per-execution state (a hash join's collected build side), so each
        // epoch runs a reset copy of the plan.
        let plan =
            datafusion::physical_plan::execution_plan::reset_plan_states(self.physical.clone())?;
        let out = collect(plan, state.task_ctx()).await?;
        Ok(out.into_iter().filter(|b| b.num_rows() > 0).collect())
    }

    /// Output schema.
    pub fn schema(&self) -> SchemaRef {
        self.physical.schema()
    }
}
