//! Helpers for the operators' unit tests: plan a query over in-memory tables, pick the logical
//! node an operator is built from, and drive operators by hand.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::util::pretty::pretty_format_batches;
use datafusion::datasource::MemTable;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;

use super::{Operator, Output};
use crate::common::Watermark;
use crate::state::StateTable;

/// The optimised streaming plan of `sql` over `tables`, and the state to build operators with.
pub(crate) async fn optimized(
    sql: &str,
    tables: &[(&str, RecordBatch)],
) -> (LogicalPlan, SessionState) {
    let ctx = SessionContext::new();
    for f in crate::window::functions() {
        ctx.register_udf(f);
    }
    for (name, batch) in tables {
        let table = MemTable::try_new(batch.schema(), vec![vec![batch.clone()]]).unwrap();
        ctx.register_table(*name, Arc::new(table)).unwrap();
    }
    let state = super::stateless::streaming_state(&ctx);
    let plan = state.create_logical_plan(sql).await.unwrap();
    (state.optimize(&plan).unwrap(), state)
}

/// The first node of `plan` (top down) for which `pick` says yes.
pub(crate) fn find(plan: &LogicalPlan, pick: &dyn Fn(&LogicalPlan) -> bool) -> LogicalPlan {
    fn search(plan: &LogicalPlan, pick: &dyn Fn(&LogicalPlan) -> bool) -> Option<LogicalPlan> {
        if pick(plan) {
            return Some(plan.clone());
        }
        plan.inputs().into_iter().find_map(|c| search(c, pick))
    }
    search(plan, pick).unwrap_or_else(|| panic!("no such node in\n{}", plan.display_indent()))
}

/// Feeds one epoch (batches on input 0 unless given, then the watermark) and returns the output.
pub(crate) async fn epoch(
    op: &mut dyn Operator,
    inputs: Vec<(usize, RecordBatch)>,
    watermark: Watermark,
) -> Output {
    let mut out = Output::default();
    for (input, batch) in inputs {
        op.process_batch(input, batch, &mut out).await.unwrap();
    }
    op.on_watermark(watermark, &mut out).await.unwrap();
    out
}

/// Moves `from`'s state into `to` through a snapshot of every table, as a restart does.
pub(crate) fn transplant(from: &mut dyn Operator, to: &mut dyn Operator) {
    let snapshots: Vec<(String, Vec<RecordBatch>)> = from
        .tables()
        .into_iter()
        .map(|t: &mut dyn StateTable| (t.name().to_string(), t.snapshot().unwrap()))
        .collect();
    let mut tables = to.tables();
    for (name, batch) in snapshots {
        let table = tables.iter_mut().find(|t| t.name() == name).unwrap();
        table.restore(&batch, true).unwrap();
    }
    drop(tables);
    to.on_restored().unwrap();
}

/// `batch`'s columns that `schema` names, in its order: what an operator built from a node of
/// an optimised plan (whose input keeps only the columns it needs) receives.
pub(crate) fn fit(batch: &RecordBatch, schema: &arrow::datatypes::Schema) -> RecordBatch {
    let indices: Vec<usize> = schema
        .fields()
        .iter()
        .map(|f| batch.schema().index_of(f.name()).unwrap())
        .collect();
    batch.project(&indices).unwrap()
}

/// The printed rows of `batches`, sorted: results compared whatever the partitions' order.
pub(crate) fn sorted_lines(batches: &[RecordBatch]) -> Vec<String> {
    let text = pretty_format_batches(batches).unwrap().to_string();
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(1)
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}
