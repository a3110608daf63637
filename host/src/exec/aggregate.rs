//! Incremental grouped aggregation: keyed, tumbling and hopping windows.
//!
//! Each group (window start + key values, encoded with Arrow's row format) owns one DataFusion
//! [`Accumulator`] per aggregate: the *same* accumulators DataFusion's batch `AggregateExec`
//! uses, created from the same logical expressions. That is why a streaming `count(DISTINCT x)`
//! or `approx_distinct(x)` equals the batch result: there is no second implementation of any
//! aggregate. Accumulator state (`Accumulator::state`) is what goes into checkpoints, and
//! `merge_batch` brings it back.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Int64Array, RecordBatch, UInt32Array,
};
use arrow::compute::{cast, filter, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::row::{RowConverter, SortField};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Accumulator, Aggregate, Expr, ExprSchemable};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_plan::PhysicalExpr;
// Deprecated in DataFusion 55 in favour of an internal builder; it is still the public way to
// lower one logical aggregate expression to its physical form.
#[allow(deprecated)]
use datafusion::physical_planner::create_aggregate_expr_and_maybe_filter;

use super::{OutputMode, StateRows, Watermarked};
use crate::error::{Result, RiffleError};
use crate::plan::window::{TimeWindows, WindowKind, window_array, window_call};

/// One aggregate of a query, ready to feed accumulators from evaluated batches.
pub(crate) struct AggSpec {
    pub expr: Arc<AggregateFunctionExpr>,
    pub args: Vec<Arc<dyn PhysicalExpr>>,
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

impl AggSpec {
    pub fn plan(agg: &Aggregate, state: &SessionState) -> Result<Vec<AggSpec>> {
        let physical_input = Arc::new(agg.input.schema().as_arrow().clone());
        agg.aggr_expr
            .iter()
            .map(|e| {
                #[allow(deprecated)]
                let (expr, filter, order) = create_aggregate_expr_and_maybe_filter(
                    e,
                    agg.input.schema(),
                    &physical_input,
                    state.execution_props(),
                )?;
                if !order.is_empty() {
                    return Err(RiffleError::Config(format!(
                        "{e}: ordered aggregates are not supported in streaming mode yet"
                    )));
                }
                Ok(AggSpec {
                    args: expr.expressions(),
                    expr,
                    filter,
                })
            })
            .collect()
    }

    /// The argument arrays (and optional filter mask) of `batch`.
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<(Vec<ArrayRef>, Option<BooleanArray>)> {
        let args = self
            .args
            .iter()
            .map(|a| a.evaluate(batch)?.into_array(batch.num_rows()))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        let mask = match &self.filter {
            Some(f) => Some(
                f.evaluate(batch)?
                    .into_array(batch.num_rows())?
                    .as_boolean()
                    .clone(),
            ),
            None => None,
        };
        Ok((args, mask))
    }
}

/// Feeds rows `rows` of evaluated arguments into `acc`.
pub(crate) fn update(
    acc: &mut dyn Accumulator,
    args: &[ArrayRef],
    mask: Option<&BooleanArray>,
    rows: &UInt32Array,
) -> Result<()> {
    let mut taken = args
        .iter()
        .map(|a| take(a.as_ref(), rows, None))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if let Some(mask) = mask {
        let mask = take(mask, rows, None)?;
        let mask = mask.as_boolean();
        taken = taken
            .iter()
            .map(|a| filter(a.as_ref(), mask))
            .collect::<std::result::Result<Vec<_>, _>>()?;
    }
    acc.update_batch(&taken)?;
    Ok(())
}

/// Evaluates a timestamp expression as microseconds since the epoch.
pub(crate) fn micros(expr: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Result<ArrayRef> {
    to_micros(&expr.evaluate(batch)?.into_array(batch.num_rows())?)
}

/// A timestamp or date array as `Int64` microseconds since the epoch.
pub(crate) fn to_micros(array: &ArrayRef) -> Result<ArrayRef> {
    let as_ts = cast(array, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
    Ok(cast(&as_ts, &DataType::Int64)?)
}

/// Appends one column per aggregate (its values for the emitted groups, in order), cast to
/// the output schema's type where DataFusion's accumulator returns a different one.
pub(crate) fn append_aggregate_columns(
    columns: &mut Vec<ArrayRef>,
    values: Vec<Vec<ScalarValue>>,
    schema: &SchemaRef,
) -> Result<()> {
    for v in values {
        let field = schema.field(columns.len());
        let array = ScalarValue::iter_to_array(v)?;
        columns.push(if array.data_type() == field.data_type() {
            array
        } else {
            cast(&array, field.data_type())?
        });
    }
    Ok(())
}

/// The group keys of an `Aggregate`: the window call (if any) and the other expressions.
pub(crate) struct GroupKeys {
    /// Position of the window column among the group expressions, its kind and timestamp.
    pub window: Option<(usize, WindowKind, Arc<dyn PhysicalExpr>)>,
    /// The other group expressions, in order.
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Row format of `[window start (if `start_in_key`)] + keys`.
    pub converter: RowConverter,
}

impl GroupKeys {
    /// Plans the group expressions. With `start_in_key` the encoded key begins with the window
    /// start (fixed windows); sessions encode the other keys only, as their bounds move.
    pub fn plan(agg: &Aggregate, state: &SessionState, start_in_key: bool) -> Result<GroupKeys> {
        let schema: &DFSchema = agg.input.schema();
        let mut window = None;
        let mut keys = Vec::new();
        let mut fields = Vec::new();
        for (i, e) in agg.group_expr.iter().enumerate() {
            if let Expr::GroupingSet(_) = e {
                return Err(RiffleError::Config(
                    "GROUPING SETS, ROLLUP and CUBE are not supported in streaming mode".into(),
                ));
            }
            if let Some(call) = window_call(e)? {
                let ts = state.create_physical_expr(call.ts.clone(), schema)?;
                window = Some((i, call.kind, ts));
                if start_in_key {
                    fields.insert(0, SortField::new(DataType::Int64));
                }
            } else {
                let physical = state.create_physical_expr(e.clone(), schema)?;
                fields.push(SortField::new(e.get_type(schema)?));
                keys.push(physical);
            }
        }
        Ok(GroupKeys {
            window,
            keys,
            converter: RowConverter::new(fields)?,
        })
    }

    /// Builds the group columns of an output batch, in `GROUP BY` order, from encoded keys.
    pub fn output_columns(&self, keys: &[&[u8]], size: i64) -> Result<Vec<ArrayRef>> {
        let parser = self.converter.parser();
        let mut decoded = self
            .converter
            .convert_rows(keys.iter().map(|k| parser.parse(k)))?;
        let mut columns = Vec::with_capacity(decoded.len());
        if let Some((position, _, _)) = &self.window {
            let starts = decoded.remove(0);
            let starts: Vec<i64> = starts
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .to_vec();
            let ends = starts.iter().map(|s| s + size).collect();
            columns.extend(decoded);
            columns.insert(*position, window_array(starts, ends));
        } else {
            columns.extend(decoded);
        }
        Ok(columns)
    }
}

struct Group {
    window_start: i64,
    accs: Vec<Box<dyn Accumulator>>,
    /// Changed since the last emit (update mode).
    updated: bool,
    /// Changed since the last checkpoint.
    dirty: bool,
}

/// Streaming `GROUP BY` with optional tumbling/hopping window.
pub struct WindowAggregate {
    keys: GroupKeys,
    windows: Option<TimeWindows>,
    aggs: Vec<AggSpec>,
    groups: HashMap<Box<[u8]>, Group>,
    deleted: Vec<Box<[u8]>>,
    mode: OutputMode,
    output_schema: SchemaRef,
}

impl WindowAggregate {
    /// Plans the operator for a logical `Aggregate`.
    ///
    /// # Errors
    /// [`RiffleError::Config`] for aggregates the streaming engine cannot run.
    pub fn new(agg: &Aggregate, state: &SessionState, mode: OutputMode) -> Result<Self> {
        let keys = GroupKeys::plan(agg, state, true)?;
        let windows = match &keys.window {
            Some((_, WindowKind::Time(w), _)) => Some(*w),
            Some((_, WindowKind::Session(_), _)) => {
                return Err(RiffleError::Internal(
                    "session windows are planned by SessionAggregate".into(),
                ));
            }
            None => None,
        };
        Ok(WindowAggregate {
            aggs: AggSpec::plan(agg, state)?,
            keys,
            windows,
            groups: HashMap::new(),
            deleted: Vec::new(),
            mode,
            output_schema: Arc::new(agg.schema.as_arrow().clone()),
        })
    }

    fn new_accumulators(&self) -> Result<Vec<Box<dyn Accumulator>>> {
        Ok(self
            .aggs
            .iter()
            .map(|a| a.expr.create_accumulator())
            .collect::<datafusion::common::Result<_>>()?)
    }

    fn emit(&mut self, which: impl Fn(&Group) -> bool) -> Result<Option<RecordBatch>> {
        let mut chosen: Vec<&[u8]> = Vec::new();
        let mut values: Vec<Vec<ScalarValue>> = vec![Vec::new(); self.aggs.len()];
        for (key, group) in self.groups.iter_mut() {
            if !which(group) {
                continue;
            }
            chosen.push(key);
            for (i, acc) in group.accs.iter_mut().enumerate() {
                values[i].push(acc.evaluate()?);
            }
        }
        if chosen.is_empty() {
            return Ok(None);
        }
        let size = self.windows.map(|w| w.size).unwrap_or(0);
        let mut columns = self.keys.output_columns(&chosen, size)?;
        append_aggregate_columns(&mut columns, values, &self.output_schema)?;
        Ok(Some(RecordBatch::try_new(
            self.output_schema.clone(),
            columns,
        )?))
    }

    fn state_schema(&self) -> Result<SchemaRef> {
        let mut fields = vec![
            Field::new("key", DataType::Binary, false),
            Field::new("deleted", DataType::Boolean, false),
        ];
        for (i, a) in self.aggs.iter().enumerate() {
            for (j, f) in a.expr.state_fields()?.iter().enumerate() {
                fields.push(Field::new(format!("s{i}_{j}"), f.data_type().clone(), true));
            }
        }
        Ok(Arc::new(Schema::new(fields)))
    }
}

impl Watermarked for WindowAggregate {
    fn process(&mut self, batch: &RecordBatch) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let mut key_arrays = self
            .keys
            .keys
            .iter()
            .map(|k| k.evaluate(batch)?.into_array(rows))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        // Expand rows into (row, window start) pairs.
        let mut row_ids: Vec<u32> = Vec::with_capacity(rows);
        let mut starts: Vec<i64> = Vec::new();
        if let (Some(w), Some((_, _, ts))) = (self.windows, &self.keys.window) {
            let ts = micros(ts, batch)?;
            let ts = ts.as_primitive::<arrow::datatypes::Int64Type>();
            starts.reserve(rows);
            for i in 0..rows {
                if ts.is_valid(i) {
                    w.for_each(ts.value(i), |s| {
                        row_ids.push(i as u32);
                        starts.push(s);
                    });
                }
            }
            // Every row with a timestamp has at least one window, in row order, so the
            // expansion is the identity exactly when no row was dropped or repeated.
            if row_ids.len() != rows {
                let ids = UInt32Array::from(row_ids.clone());
                key_arrays = key_arrays
                    .iter()
                    .map(|a| take(a.as_ref(), &ids, None))
                    .collect::<std::result::Result<_, _>>()?;
            }
            key_arrays.insert(0, Arc::new(Int64Array::from(starts.clone())));
        } else {
            row_ids.extend(0..rows as u32);
        }
        let encoded = self.keys.converter.convert_columns(&key_arrays)?;

        // Group the expanded rows of this batch, then feed each group's accumulators once.
        let mut batch_groups: HashMap<&[u8], usize> = HashMap::new();
        let mut members: Vec<Vec<u32>> = Vec::new();
        let mut first_of: Vec<usize> = Vec::new();
        for (j, &row) in row_ids.iter().enumerate() {
            let key = encoded.row(j).data();
            let g = *batch_groups.entry(key).or_insert_with(|| {
                members.push(Vec::new());
                first_of.push(j);
                members.len() - 1
            });
            members[g].push(row);
        }
        let evaluated = self
            .aggs
            .iter()
            .map(|a| a.evaluate(batch))
            .collect::<Result<Vec<_>>>()?;
        for (g, rows_of_group) in members.into_iter().enumerate() {
            let j = first_of[g];
            let key: Box<[u8]> = encoded.row(j).data().into();
            if !self.groups.contains_key(&key) {
                let accs = self.new_accumulators()?;
                self.groups.insert(
                    key.clone(),
                    Group {
                        window_start: starts.get(j).copied().unwrap_or(0),
                        accs,
                        updated: false,
                        dirty: false,
                    },
                );
            }
            let group = self.groups.get_mut(&key).expect("inserted above");
            group.updated = true;
            group.dirty = true;
            let ids = UInt32Array::from(rows_of_group);
            for (acc, (args, mask)) in group.accs.iter_mut().zip(&evaluated) {
                update(acc.as_mut(), args, mask.as_ref(), &ids)?;
            }
        }
        Ok(())
    }

    fn advance(&mut self, watermark: i64) -> Result<Vec<RecordBatch>> {
        let size = self.windows.map(|w| w.size);
        let closed = |g: &Group| size.is_some_and(|s| g.window_start + s <= watermark);
        let out = match self.mode {
            OutputMode::Append => self.emit(closed)?,
            OutputMode::Update => self.emit(|g| g.updated)?,
            OutputMode::Complete => self.emit(|_| true)?,
        };
        for g in self.groups.values_mut() {
            g.updated = false;
        }
        // Complete mode keeps every group: the whole result is emitted each epoch.
        if self.mode != OutputMode::Complete && size.is_some() {
            let gone: Vec<Box<[u8]>> = self
                .groups
                .iter()
                .filter(|(_, g)| closed(g))
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                self.groups.remove(&k);
                self.deleted.push(k);
            }
        }
        Ok(out.into_iter().collect())
    }

    fn checkpoint(&mut self, full: bool) -> Result<Option<RecordBatch>> {
        let schema = self.state_schema()?;
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut deleted = Vec::new();
        let width = schema.fields().len() - 2;
        let mut states: Vec<Vec<ScalarValue>> = vec![Vec::new(); width];
        let aggs = &self.aggs;
        for (key, group) in self.groups.iter_mut() {
            if !(full || group.dirty) {
                continue;
            }
            group.dirty = false;
            keys.push(key.to_vec());
            deleted.push(false);
            let mut column = 0;
            for (acc, spec) in group.accs.iter_mut().zip(aggs) {
                // `state()` may consume the accumulator's state: rebuild it from the state.
                let state = acc.state()?;
                let arrays = state
                    .iter()
                    .map(|s| s.to_array())
                    .collect::<datafusion::common::Result<Vec<_>>>()?;
                let mut rebuilt = spec.expr.create_accumulator()?;
                rebuilt.merge_batch(&arrays)?;
                *acc = rebuilt;
                for s in state {
                    states[column].push(s);
                    column += 1;
                }
            }
        }
        for key in self.deleted.drain(..) {
            keys.push(key.to_vec());
            deleted.push(true);
            for (column, field) in states.iter_mut().zip(schema.fields().iter().skip(2)) {
                column.push(ScalarValue::try_from(field.data_type())?);
            }
        }
        if keys.is_empty() && !full {
            return Ok(None);
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(BinaryArray::from_iter_values(keys.iter())),
            Arc::new(BooleanArray::from(deleted)),
        ];
        for (values, field) in states.into_iter().zip(schema.fields().iter().skip(2)) {
            columns.push(if values.is_empty() {
                arrow::array::new_empty_array(field.data_type())
            } else {
                ScalarValue::iter_to_array(values)?
            });
        }
        Ok(Some(RecordBatch::try_new(schema, columns)?))
    }

    fn restore(&mut self, batch: &RecordBatch) -> Result<()> {
        let keys = batch.column(0).as_binary::<i32>();
        let deleted = batch.column(1).as_boolean();
        let parser = self.keys.converter.parser();
        for row in 0..batch.num_rows() {
            let key: Box<[u8]> = keys.value(row).into();
            if deleted.value(row) {
                self.groups.remove(&key);
                continue;
            }
            let mut accs = self.new_accumulators()?;
            let mut column = 2;
            for (acc, spec) in accs.iter_mut().zip(&self.aggs) {
                let n = spec.expr.state_fields()?.len();
                let arrays: Vec<ArrayRef> = (column..column + n)
                    .map(|c| batch.column(c).slice(row, 1))
                    .collect();
                acc.merge_batch(&arrays)?;
                column += n;
            }
            let window_start = if self.windows.is_some() {
                let decoded = self.keys.converter.convert_rows([parser.parse(&key)])?;
                decoded[0]
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .value(0)
            } else {
                0
            };
            self.groups.insert(
                key,
                Group {
                    window_start,
                    accs,
                    updated: false,
                    dirty: false,
                },
            );
        }
        Ok(())
    }

    fn state_rows(&self) -> StateRows {
        StateRows {
            rows: self.groups.len() as u64,
            bytes: self
                .groups
                .iter()
                .map(|(k, g)| k.len() + g.accs.iter().map(|a| a.size()).sum::<usize>())
                .sum::<usize>() as u64,
        }
    }

    fn output_schema(&self) -> SchemaRef {
        self.output_schema.clone()
    }
}
