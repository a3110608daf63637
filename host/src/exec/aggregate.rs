//! Incremental grouped aggregation: keyed, tumbling and hopping windows.
//!
//! Each group (window start + key values, encoded with Arrow's row format) owns one DataFusion
//! [`Accumulator`] per aggregate: the *same* accumulators DataFusion's batch `AggregateExec`
//! uses, created from the same logical expressions. That is why a streaming `count(DISTINCT x)`,
//! `approx_distinct(x)`, `first_value(x ORDER BY y)` or a Wasm aggregate equals the batch result:
//! there is no second implementation of any aggregate. Accumulator state
//! (`Accumulator::state`) is what goes into checkpoints, and `merge_batch` brings it back (a
//! Wasm aggregate's accumulator takes its state back as it is, with no guest call).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, UInt32Array, new_empty_array,
};
use arrow::compute::{cast, filter, take};
use arrow::datatypes::{DataType, Field, Fields, Int64Type, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::execution::SessionState;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{Accumulator, Aggregate, Expr, ExprSchemable};
use datafusion::physical_expr::aggregate::{AggregateFunctionExpr, LoweredAggregateBuilder};
use datafusion::physical_plan::PhysicalExpr;

use super::keys::{KeyEncoder, KeyRoute};
use super::{Combiner, Operator, Output, Partitioning};
use crate::common::{OutputMode, Watermark, to_micros};
use crate::error::{Result, RiffleError};
use crate::state::{KeyedTable, StateTable, ValueCodec, ValueEncoder, entry_keys};
use crate::udf::{AggregateStep, WasmAggregateUdf};
use crate::window::{TimeWindows, WindowKind, window_array, window_call};

/// One aggregate of a query, ready to feed accumulators from evaluated batches.
pub(crate) struct AggSpec {
    pub expr: Arc<AggregateFunctionExpr>,
    /// Arguments, then ordering expressions (ordered aggregates compare those themselves,
    /// exactly as DataFusion's `AggregateExec` feeds them).
    pub args: Vec<Arc<dyn PhysicalExpr>>,
    pub filter: Option<Arc<dyn PhysicalExpr>>,
}

impl AggSpec {
    pub fn plan(agg: &Aggregate, state: &SessionState) -> Result<Vec<AggSpec>> {
        let logical = agg.input.schema();
        let physical = logical.as_arrow();
        let ctx = PhysicalPlanningContext::default();
        agg.aggr_expr
            .iter()
            .map(|e| {
                let lowered = LoweredAggregateBuilder::new(
                    e,
                    logical,
                    physical,
                    state.execution_props(),
                    &ctx,
                )
                .build()?;
                let mut args = lowered.aggregate.expressions();
                args.extend(
                    lowered
                        .aggregate
                        .order_bys()
                        .iter()
                        .map(|s| Arc::clone(&s.expr)),
                );
                Ok(AggSpec {
                    expr: lowered.aggregate,
                    args,
                    filter: lowered.filter,
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

    pub fn state_fields(&self) -> Result<Vec<Arc<Field>>> {
        Ok(self.expr.state_fields()?)
    }
}

/// Fresh accumulators, one per aggregate.
pub(crate) fn accumulators<'a>(
    specs: impl IntoIterator<Item = &'a Arc<AggregateFunctionExpr>>,
) -> Result<Vec<Box<dyn Accumulator>>> {
    Ok(specs
        .into_iter()
        .map(|s| s.create_accumulator())
        .collect::<datafusion::common::Result<_>>()?)
}

/// Whether reading an accumulator's state may consume it, so that it must be rebuilt from the
/// state it gave (DataFusion's median and `string_agg` move their values out). A Wasm
/// aggregate's state is a copy; rebuilding it would cost a guest call per group.
pub(crate) fn state_consumes(spec: &AggregateFunctionExpr) -> bool {
    spec.fun()
        .inner()
        .downcast_ref::<WasmAggregateUdf>()
        .is_none()
}

/// An accumulator with the state `state` (its state columns, one row) read back from a
/// checkpoint: a Wasm aggregate's holds it as it is; others merge it into a fresh one.
pub(crate) fn restore_accumulator(
    spec: &AggregateFunctionExpr,
    state: &[ArrayRef],
) -> Result<Box<dyn Accumulator>> {
    if let Some(wasm) = spec.fun().inner().downcast_ref::<WasmAggregateUdf>() {
        return Ok(wasm.accumulator_with_state(state.to_vec()));
    }
    let mut acc = spec.create_accumulator()?;
    acc.merge_batch(state)?;
    Ok(acc)
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

/// Accumulators' states (`states[g]`: group `g`'s, one value per state field, as
/// [`Accumulator::state`] gives them) as columns, one row per group: how a Wasm aggregate's
/// guest takes many groups' states in one call.
fn state_columns(states: &[&[ScalarValue]]) -> Result<Vec<ArrayRef>> {
    let fields = states.first().map_or(0, |s| s.len());
    Ok((0..fields)
        .map(|f| ScalarValue::iter_to_array(states.iter().map(|s| s[f].clone())))
        .collect::<datafusion::common::Result<Vec<_>>>()?)
}

/// Rows a call of [`update_wasm_groups`] gives the guest at most (unless one group has more):
/// DataFusion's batch size, so that the guest holds the states of as many groups at once as
/// in a batch aggregation, within its memory limit.
const WASM_CALL_ROWS: usize = 8192;

/// Feeds rows of evaluated arguments into many groups of one Wasm aggregate, in one guest call
/// per [`WASM_CALL_ROWS`] rows: group `g`, whose state is `states[g]` (as
/// [`Accumulator::state`] gives it), takes rows `rows[g]`. Returns each group's accumulator
/// holding its new state, or `None` for a group the mask left without rows (it keeps the
/// accumulator it has).
///
/// An operator that keeps an accumulator per group (a session window: one per open session)
/// would otherwise call the guest once per group and batch, each call paying the guest's fixed
/// cost for a row or two: at 10,000 cards that was most of a session query's time.
pub(crate) fn update_wasm_groups(
    wasm: &WasmAggregateUdf,
    states: &[Vec<ScalarValue>],
    args: &[ArrayRef],
    mask: Option<&BooleanArray>,
    rows: &[&[u32]],
) -> Result<Vec<Option<Box<dyn Accumulator>>>> {
    // A NULL in the mask drops the row, as SQL's FILTER (WHERE ...) does.
    let keep = |row: u32| mask.is_none_or(|m| m.is_valid(row as usize) && m.value(row as usize));
    let mut out: Vec<Option<Box<dyn Accumulator>>> = (0..rows.len()).map(|_| None).collect();
    let mut g = 0;
    while g < rows.len() {
        // The next groups with rows, numbered densely, and every kept row's group.
        let mut touched: Vec<usize> = Vec::new();
        let mut kept: Vec<u32> = Vec::new();
        let mut group_of: Vec<u32> = Vec::new();
        while g < rows.len() && (kept.is_empty() || kept.len() + rows[g].len() <= WASM_CALL_ROWS) {
            let before = kept.len();
            kept.extend(rows[g].iter().copied().filter(|&r| keep(r)));
            if kept.len() > before {
                group_of.resize(kept.len(), touched.len() as u32);
                touched.push(g);
            }
            g += 1;
        }
        if touched.is_empty() {
            continue;
        }
        let columns = state_columns(&touched.iter().map(|&g| &states[g][..]).collect::<Vec<_>>())?;
        let kept = UInt32Array::from(kept);
        let args = args
            .iter()
            .map(|a| take(a.as_ref(), &kept, None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let next = wasm.calls().step(
            AggregateStep::Update,
            touched.len(),
            &columns,
            &group_of,
            &args,
        )?;
        for (t, &g) in touched.iter().enumerate() {
            // Each group's state is copied out of the call's columns: a slice would keep all
            // of them alive for as long as any group of this call stays open.
            let at = UInt32Array::from(vec![t as u32]);
            let state = next
                .iter()
                .map(|c| take(c.as_ref(), &at, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            out[g] = Some(wasm.accumulator_with_state(state));
        }
    }
    Ok(out)
}

/// Evaluates a timestamp expression as microseconds since the epoch.
pub(crate) fn micros(expr: &Arc<dyn PhysicalExpr>, batch: &RecordBatch) -> Result<ArrayRef> {
    to_micros(&expr.evaluate(batch)?.into_array(batch.num_rows())?)
}

/// The final values of one aggregate over the groups an operator emits (`accs`, one
/// accumulator per group, in order), as a column of the output schema's type. A Wasm
/// aggregate finishes them all in one guest call (its accumulators' states are copies, read
/// without one): evaluating each would cost a call per closed window or session. Others
/// evaluate one by one.
pub(crate) fn evaluate_all<'a>(
    spec: &AggregateFunctionExpr,
    accs: impl ExactSizeIterator<Item = &'a mut Box<dyn Accumulator>>,
    data_type: &DataType,
) -> Result<ArrayRef> {
    let groups = accs.len();
    let array = if groups == 0 {
        new_empty_array(data_type)
    } else if let Some(wasm) = spec.fun().inner().downcast_ref::<WasmAggregateUdf>() {
        let states = accs
            .map(|acc| acc.state())
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        let columns = state_columns(&states.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
        wasm.calls().finish(groups, &columns)?
    } else {
        let values = accs
            .map(|acc| acc.evaluate())
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        ScalarValue::iter_to_array(values)?
    };
    Ok(if array.data_type() == data_type {
        array
    } else {
        cast(&array, data_type)?
    })
}

/// Appends one column per aggregate of `aggs` (its values for `groups`, the emitted groups'
/// accumulators in order; see [`evaluate_all`]).
pub(crate) fn append_aggregate_columns(
    columns: &mut Vec<ArrayRef>,
    aggs: &[AggSpec],
    groups: &mut [&mut Vec<Box<dyn Accumulator>>],
    schema: &SchemaRef,
) -> Result<()> {
    for (i, agg) in aggs.iter().enumerate() {
        let field = schema.field(columns.len());
        let accs = groups.iter_mut().map(|g| &mut g[i]);
        columns.push(evaluate_all(&agg.expr, accs, field.data_type())?);
    }
    Ok(())
}

/// The group keys of an `Aggregate`: the window call (if any) and the other expressions.
pub(crate) struct GroupKeys {
    /// Position of the window column among the group expressions, its kind and timestamp.
    pub window: Option<(usize, WindowKind, Arc<dyn PhysicalExpr>)>,
    /// The other group expressions; with `start_in_key` the encoded key begins with the window
    /// start (fixed windows; sessions encode the other keys only, as their bounds move).
    pub keys: KeyEncoder,
}

impl GroupKeys {
    pub fn plan(agg: &Aggregate, state: &SessionState, start_in_key: bool) -> Result<GroupKeys> {
        let schema = agg.input.schema();
        let mut window = None;
        let mut exprs = Vec::new();
        let mut types = Vec::new();
        for (i, e) in agg.group_expr.iter().enumerate() {
            if let Expr::GroupingSet(_) = e {
                return Err(RiffleError::Unsupported(
                    "GROUPING SETS, ROLLUP and CUBE are not supported in streaming mode".into(),
                ));
            }
            if let Some(call) = window_call(e)? {
                if window.is_some() {
                    return Err(RiffleError::Unsupported(
                        "only one window()/session_window() per GROUP BY".into(),
                    ));
                }
                let ts = state.create_physical_expr(call.ts.clone(), schema)?;
                window = Some((i, call.kind, ts));
                if start_in_key {
                    types.insert(0, DataType::Int64);
                }
            } else {
                exprs.push(state.create_physical_expr(e.clone(), schema)?);
                types.push(e.get_type(schema)?);
            }
        }
        Ok(GroupKeys {
            window,
            keys: KeyEncoder::new(exprs, types)?,
        })
    }

    /// Builds the group columns of an output batch, in `GROUP BY` order, from encoded keys.
    pub fn output_columns(&self, keys: &[&[u8]], size: i64) -> Result<Vec<ArrayRef>> {
        let mut decoded = self.keys.decode(keys.iter().copied())?;
        if let Some((position, _, _)) = &self.window {
            let starts = decoded.remove(0);
            let starts: Vec<i64> = starts.as_primitive::<Int64Type>().values().to_vec();
            let ends = starts.iter().map(|s| s + size).collect();
            decoded.insert(*position, window_array(starts, ends));
        }
        Ok(decoded)
    }
}

/// A group's accumulators and the start of its window.
pub(crate) struct Group {
    window_start: i64,
    accs: Vec<Box<dyn Accumulator>>,
}

/// Encodes groups as their window start plus one column per accumulator state field.
#[derive(Clone)]
struct GroupCodec {
    specs: Vec<Arc<AggregateFunctionExpr>>,
    /// State columns per aggregate.
    widths: Vec<usize>,
    fields: Fields,
}

impl GroupCodec {
    fn new(aggs: &[AggSpec]) -> Result<Self> {
        let mut fields = vec![Field::new("window_start", DataType::Int64, true)];
        let mut widths = Vec::new();
        for (i, a) in aggs.iter().enumerate() {
            let state = a.state_fields()?;
            widths.push(state.len());
            for (j, f) in state.iter().enumerate() {
                fields.push(Field::new(format!("s{i}_{j}"), f.data_type().clone(), true));
            }
        }
        Ok(GroupCodec {
            specs: aggs.iter().map(|a| Arc::clone(&a.expr)).collect(),
            widths,
            fields: fields.into(),
        })
    }

    /// Each aggregate's state columns at row `row` of `columns` (laid out as
    /// [`fields`](ValueCodec::fields)), one row each.
    fn states<'a>(
        &'a self,
        columns: &'a [ArrayRef],
        row: usize,
    ) -> impl Iterator<Item = Vec<ArrayRef>> + 'a {
        let mut column = 1;
        self.widths.iter().map(move |n| {
            let state = columns[column..column + n]
                .iter()
                .map(|c| c.slice(row, 1))
                .collect();
            column += n;
            state
        })
    }

    /// Merges the group of row `row` of `columns` (as [`decode`](ValueCodec::decode) reads
    /// them) into `group`, of the same window.
    fn merge(&self, group: &mut Group, columns: &[ArrayRef], row: usize) -> Result<()> {
        for (acc, state) in group.accs.iter_mut().zip(self.states(columns, row)) {
            acc.merge_batch(&state)?;
        }
        Ok(())
    }
}

/// Collects window starts and accumulator states (as scalars) column by column.
struct GroupEncoder<'a> {
    codec: &'a GroupCodec,
    starts: Vec<Option<i64>>,
    states: Vec<Vec<ScalarValue>>,
}

impl ValueEncoder<Group> for GroupEncoder<'_> {
    fn append(&mut self, group: &mut Group) -> Result<()> {
        self.starts.push(Some(group.window_start));
        let mut column = 0;
        for (acc, spec) in group.accs.iter_mut().zip(&self.codec.specs) {
            let state = acc.state()?;
            if state_consumes(spec) {
                let arrays = state
                    .iter()
                    .map(|s| s.to_array())
                    .collect::<datafusion::common::Result<Vec<_>>>()?;
                *acc = restore_accumulator(spec, &arrays)?;
            }
            for s in state {
                self.states[column].push(s);
                column += 1;
            }
        }
        Ok(())
    }

    fn append_null(&mut self) {
        self.starts.push(None);
        for (column, field) in self.states.iter_mut().zip(self.codec.fields.iter().skip(1)) {
            column.push(ScalarValue::try_from(field.data_type()).unwrap_or(ScalarValue::Null));
        }
    }

    fn finish(self: Box<Self>) -> Result<Vec<ArrayRef>> {
        let mut columns: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(self.starts))];
        for (values, field) in self
            .states
            .into_iter()
            .zip(self.codec.fields.iter().skip(1))
        {
            let array = if values.is_empty() {
                new_empty_array(field.data_type())
            } else {
                ScalarValue::iter_to_array(values)?
            };
            columns.push(if array.data_type() == field.data_type() {
                array
            } else {
                cast(&array, field.data_type())?
            });
        }
        Ok(columns)
    }
}

impl ValueCodec<Group> for GroupCodec {
    fn fields(&self) -> Fields {
        self.fields.clone()
    }

    fn encoder(&self, capacity: usize) -> Box<dyn ValueEncoder<Group> + '_> {
        Box::new(GroupEncoder {
            codec: self,
            starts: Vec::with_capacity(capacity),
            states: vec![Vec::with_capacity(capacity); self.fields.len() - 1],
        })
    }

    fn decode(&self, columns: &[ArrayRef], row: usize) -> Result<Group> {
        let accs = self
            .specs
            .iter()
            .zip(self.states(columns, row))
            .map(|(spec, state)| restore_accumulator(spec, &state))
            .collect::<Result<_>>()?;
        Ok(Group {
            window_start: columns[0].as_primitive::<Int64Type>().value(row),
            accs,
        })
    }

    fn size(&self, group: &Group) -> usize {
        group.accs.iter().map(|a| a.size()).sum::<usize>() + 16
    }
}

/// How an aggregation emits and when it may forget a group.
#[derive(Clone, Copy, Debug)]
pub struct AggregateMode {
    /// The output mode of this aggregation (an aggregation that feeds another stateful
    /// operator always runs in append mode).
    pub output: OutputMode,
    /// The window is on an event-time column, so the watermark closes windows and their state
    /// can go. Without it (update mode over a window on another column), groups are kept.
    pub window_on_event_time: bool,
}

/// The name of an aggregation's state table.
const GROUPS: &str = "groups";

/// What an aggregation groups its rows by and folds into each group: shared by its instances
/// and by its [`Combiner`], which fold rows alike.
struct Folding {
    keys: GroupKeys,
    windows: Option<TimeWindows>,
    aggs: Vec<AggSpec>,
    /// How the `groups` table encodes a group (the combiner's entries too).
    codec: GroupCodec,
    /// The watermark closes groups ([`WindowAggregate::evicts`]): a new group gets its window's
    /// end as its deadline.
    evicts: bool,
}

impl Folding {
    /// Folds `batch`'s rows into `groups` (a new group for each new key), calling `touched`
    /// with the key of each group that rows of the batch reached.
    fn fold(
        &self,
        batch: &RecordBatch,
        groups: &mut KeyedTable<Group>,
        mut touched: impl FnMut(&[u8]),
    ) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let mut key_arrays = self.keys.keys.evaluate(batch)?;
        // Expand rows into (row, window start) pairs. Rows without an event time belong to no
        // window (batch mode filters them out of windowed aggregations the same way).
        let mut row_ids: Vec<u32> = Vec::with_capacity(rows);
        let mut starts: Vec<i64> = Vec::new();
        if let (Some(w), Some((_, _, ts))) = (self.windows, &self.keys.window) {
            let ts = micros(ts, batch)?;
            let ts = ts.as_primitive::<Int64Type>();
            starts.reserve(rows);
            for i in 0..rows {
                if ts.is_valid(i) {
                    w.for_each(ts.value(i), |s| {
                        row_ids.push(i as u32);
                        starts.push(s);
                    });
                }
            }
            if row_ids.len() != rows || row_ids.iter().enumerate().any(|(j, &r)| r as usize != j) {
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
        if row_ids.is_empty() {
            return Ok(());
        }
        let encoded = self.keys.keys.encode(&key_arrays)?;

        // Group the expanded rows of this batch, then feed each group's accumulators once.
        // foldhash, not SipHash: keys come from our own data, and this map sees every row.
        let mut batch_groups: hashbrown::HashMap<&[u8], usize> =
            hashbrown::HashMap::with_capacity(64);
        let mut members: Vec<Vec<u32>> = Vec::new();
        let mut first_of: Vec<usize> = Vec::new();
        for (j, &row) in row_ids.iter().enumerate() {
            let key = encoded.get(j);
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
        let size = self.windows.map(|w| w.size).unwrap_or(0);
        for (g, rows_of_group) in members.into_iter().enumerate() {
            let j = first_of[g];
            let key = encoded.get(j);
            let start = starts.get(j).copied().unwrap_or(0);
            if groups.get(key).is_none() {
                let accs = accumulators(self.aggs.iter().map(|a| &a.expr))?;
                groups.insert(
                    key,
                    Group {
                        window_start: start,
                        accs,
                    },
                );
                if self.evicts {
                    // The window [start, start + size) closes once the watermark reaches its end.
                    groups.set_deadline(key, Some(start + size - 1));
                }
            }
            let group = groups.get_mut(key).expect("inserted above");
            let ids = UInt32Array::from(rows_of_group);
            for (acc, (args, mask)) in group.accs.iter_mut().zip(&evaluated) {
                update(acc.as_mut(), args, mask.as_ref(), &ids)?;
            }
            touched(key);
        }
        Ok(())
    }
}

/// Whether partial states of `spec`, merged, give bit for bit what one accumulator fed every
/// row gives, whatever the rows' grouping and order: counts (`DISTINCT` too), `min` and `max`
/// (a total order, floats included), `approx_distinct` (its sketch's registers merge by
/// maximum), boolean and bitwise aggregates, and sums of integers and decimals (wrapping
/// additions, in any order). Not float sums and averages, whose rounding depends on the order
/// of additions, nor Wasm aggregates (their merge is the author's): folding shares of their
/// rows would make a result depend on how many partitions a query runs on.
fn merges_exactly(spec: &AggSpec) -> bool {
    let expr = &spec.expr;
    if !expr.order_bys().is_empty() {
        return false;
    }
    let exact_sum = |t: &DataType| {
        t.is_integer() || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..))
    };
    match expr.fun().name() {
        "count" | "min" | "max" => true,
        "approx_distinct" | "bool_and" | "bool_or" | "bit_and" | "bit_or" | "bit_xor" => {
            !expr.is_distinct()
        }
        "sum" => !expr.is_distinct() && exact_sum(expr.field().data_type()),
        _ => false,
    }
}

/// Whether a partial state of `spec`, an aggregate that [`merges_exactly`], stays a few
/// bytes whatever its rows: not a distinct count's set nor `approx_distinct`'s sketch.
fn partial_is_small(spec: &AggSpec) -> bool {
    !spec.expr.is_distinct() && spec.expr.fun().name() != "approx_distinct"
}

/// Folds a contiguous share of an aggregation's rows into partial groups: entries of its
/// `groups` table, which the instance that owns each key merges into its own ([`Combiner`]).
struct GroupCombiner {
    folding: Arc<Folding>,
    /// Calls left to pass up after one whose rows made too many groups to be worth folding.
    skip: AtomicU32,
}

impl GroupCombiner {
    /// Folding pays once rows average at least this many per group: each group costs its
    /// instance a merge, about what a few rows cost it.
    const ROWS_PER_GROUP: usize = 4;
    /// Rows folded before the first look at the groups they made.
    const PROBE_ROWS: usize = 16_384;
    /// Calls passed up after folding did not pay, before trying again (the keys may change).
    const SKIP_CALLS: u32 = 64;
    /// Shares per routing task when the partial states are small (each share at least
    /// 32,768 rows, so fewer in small epochs: three per task of 200,000 rows on two cores).
    /// Measured on two cores (1-minute tumbling `max` per country, 200,000-row epochs): the
    /// routing tasks were busy 90% of their wall time with one share each, 95-96% with four
    /// or eight of 25,000 and 12,500 rows (before shares had a minimum). A share folds only
    /// if its own rows average [`ROWS_PER_GROUP`](Self::ROWS_PER_GROUP) a group, so keys
    /// with fewer rows than that in a share go unfolded, and
    /// [`SKIP_CALLS`](Self::SKIP_CALLS) counts shares, not epochs.
    const SMALL_SHARES_PER_TASK: usize = 8;
}

impl Combiner for GroupCombiner {
    fn table(&self) -> &str {
        GROUPS
    }

    /// Several when each group's partial state is a few small accumulators. Not for distinct
    /// counts: a share rebuilds its groups' distinct sets from empty, so more shares
    /// rebuild and merge more (the 5-minute/1-minute hopping distinct count ran 4-8% slower
    /// with four or eight).
    fn shares_per_task(&self) -> usize {
        if self.folding.aggs.iter().all(partial_is_small) {
            Self::SMALL_SHARES_PER_TASK
        } else {
            1
        }
    }

    fn combine(&self, _input: usize, rows: &[RecordBatch]) -> Result<Option<Vec<RecordBatch>>> {
        let skipped = self
            .skip
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if skipped.is_ok() {
            return Ok(None);
        }
        let mut groups = KeyedTable::new(GROUPS, Box::new(self.folding.codec.clone()));
        let total: usize = rows.iter().map(RecordBatch::num_rows).sum();
        let mut seen = 0;
        for batch in rows {
            self.folding.fold(batch, &mut groups, |_| {})?;
            seen += batch.num_rows();
            if (seen >= Self::PROBE_ROWS || seen == total)
                && groups.len() * Self::ROWS_PER_GROUP > seen
            {
                self.skip.store(Self::SKIP_CALLS, Ordering::Relaxed);
                return Ok(None);
            }
        }
        Ok(Some(groups.snapshot()?))
    }
}

/// Streaming `GROUP BY` with optional tumbling/hopping window.
pub struct WindowAggregate {
    folding: Arc<Folding>,
    groups: KeyedTable<Group>,
    /// Groups changed in this epoch (update mode emits them).
    updated: Vec<Box<[u8]>>,
    mode: AggregateMode,
    output_schema: SchemaRef,
    /// The partition key: for a tumbling window its start and the other `GROUP BY`
    /// expressions; for a hopping window (a row is in several) the other expressions alone, so
    /// that every window of a key is in one partition. `None` when there is nothing to split
    /// by.
    route: Option<Arc<KeyRoute>>,
    /// Whether shares of the rows may be folded before they are routed: every aggregate
    /// [`merges_exactly`].
    combines: bool,
}

impl WindowAggregate {
    /// Plans the operator for a logical `Aggregate`.
    ///
    /// # Errors
    /// [`RiffleError::Unsupported`] for aggregates the streaming engine cannot run.
    pub fn new(agg: &Aggregate, state: &SessionState, mode: AggregateMode) -> Result<Self> {
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
        let aggs = AggSpec::plan(agg, state)?;
        let codec = GroupCodec::new(&aggs)?;
        let route = match (&keys.window, windows) {
            (Some((_, _, ts)), Some(w)) if w.size == w.slide => {
                keys.keys.route_tumbling(ts.clone(), w)?
            }
            _ => keys.keys.route()?,
        };
        Ok(WindowAggregate {
            route,
            groups: KeyedTable::new(GROUPS, Box::new(codec.clone())),
            combines: aggs.iter().all(merges_exactly),
            folding: Arc::new(Folding {
                codec,
                evicts: windows.is_some()
                    && mode.window_on_event_time
                    && mode.output != OutputMode::Complete,
                keys,
                windows,
                aggs,
            }),
            updated: Vec::new(),
            mode,
            output_schema: Arc::new(agg.schema.as_arrow().clone()),
        })
    }

    /// Builds an output batch of `groups` (key bytes and group, in order).
    fn emit<'a>(
        &self,
        groups: impl IntoIterator<Item = (&'a [u8], &'a mut Group)>,
        out: &mut Output,
    ) -> Result<()> {
        let mut chosen: Vec<&[u8]> = Vec::new();
        let mut accs: Vec<&mut Vec<Box<dyn Accumulator>>> = Vec::new();
        for (key, group) in groups {
            chosen.push(key);
            accs.push(&mut group.accs);
        }
        if chosen.is_empty() {
            return Ok(());
        }
        let f = &self.folding;
        let size = f.windows.map(|w| w.size).unwrap_or(0);
        let mut columns = f.keys.output_columns(&chosen, size)?;
        append_aggregate_columns(&mut columns, &f.aggs, &mut accs, &self.output_schema)?;
        out.push(RecordBatch::try_new(self.output_schema.clone(), columns)?);
        Ok(())
    }

    /// Whether the watermark ever closes this aggregation's groups.
    fn evicts(&self) -> bool {
        self.folding.evicts
    }
}

#[async_trait::async_trait]
impl Operator for WindowAggregate {
    fn kind(&self) -> &'static str {
        "aggregate"
    }

    async fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        _out: &mut Output,
    ) -> Result<()> {
        let updated = &mut self.updated;
        let update = self.mode.output == OutputMode::Update;
        self.folding.fold(&batch, &mut self.groups, |key| {
            if update {
                updated.push(key.into());
            }
        })
    }

    async fn process_combined(
        &mut self,
        _input: usize,
        entries: RecordBatch,
        _out: &mut Output,
    ) -> Result<()> {
        let codec = &self.folding.codec;
        self.groups.merge_entries(&entries, |group, columns, row| {
            codec.merge(group, columns, row)
        })?;
        if self.mode.output == OutputMode::Update {
            let keys = entry_keys(&entries)?;
            self.updated.extend(keys.iter().flatten().map(Box::from));
        }
        Ok(())
    }

    async fn on_watermark(&mut self, watermark: Watermark, out: &mut Output) -> Result<()> {
        match self.mode.output {
            OutputMode::Append => {
                if !self.evicts() {
                    return Ok(());
                }
                let due = self.groups.take_due(watermark);
                let mut closed: Vec<(Box<[u8]>, Group)> = due
                    .into_iter()
                    .filter_map(|k| self.groups.remove(&k).map(|g| (k, g)))
                    .collect();
                self.emit(
                    closed
                        .iter_mut()
                        .map(|&mut (ref k, ref mut g)| (k.as_ref(), g)),
                    out,
                )?;
            }
            OutputMode::Update => {
                let mut keys = std::mem::take(&mut self.updated);
                keys.sort_unstable();
                keys.dedup();
                let mut taken: Vec<(Box<[u8]>, Group)> = keys
                    .into_iter()
                    .filter_map(|k| self.groups.remove(&k).map(|g| (k, g)))
                    .collect();
                let emitted = self.emit(
                    taken
                        .iter_mut()
                        .map(|&mut (ref k, ref mut g)| (k.as_ref(), g)),
                    out,
                );
                let evicts = self.evicts();
                let size = self.folding.windows.map(|w| w.size).unwrap_or(0);
                for (k, g) in taken {
                    let deadline = evicts.then_some(g.window_start + size - 1);
                    self.groups.insert(&k, g);
                    self.groups.set_deadline(&k, deadline);
                }
                emitted?;
                if evicts {
                    // The final value of a closed window went out when it last changed.
                    for k in self.groups.take_due(watermark) {
                        self.groups.remove(&k);
                    }
                }
            }
            OutputMode::Complete => {
                let mut all: Vec<(Box<[u8]>, &mut Group)> = self
                    .groups
                    .values_mut_untracked()
                    .map(|(k, g)| (Box::<[u8]>::from(k), g))
                    .collect();
                all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                if all.is_empty() {
                    return Ok(());
                }
                let (chosen, groups): (Vec<Box<[u8]>>, Vec<&mut Group>) = all.into_iter().unzip();
                let mut accs: Vec<&mut Vec<Box<dyn Accumulator>>> =
                    groups.into_iter().map(|g| &mut g.accs).collect();
                let f = &self.folding;
                let size = f.windows.map(|w| w.size).unwrap_or(0);
                let keys: Vec<&[u8]> = chosen.iter().map(|k| k.as_ref()).collect();
                let mut columns = f.keys.output_columns(&keys, size)?;
                append_aggregate_columns(&mut columns, &f.aggs, &mut accs, &self.output_schema)?;
                out.push(RecordBatch::try_new(self.output_schema.clone(), columns)?);
            }
        }
        Ok(())
    }

    fn partitioning(&self) -> Partitioning {
        Partitioning::by_key(&self.route)
    }

    fn combiner(&self) -> Option<Arc<dyn Combiner>> {
        self.combines.then(|| {
            Arc::new(GroupCombiner {
                folding: Arc::clone(&self.folding),
                skip: AtomicU32::new(0),
            }) as Arc<dyn Combiner>
        })
    }

    fn tables(&mut self) -> Vec<&mut dyn StateTable> {
        vec![&mut self.groups]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::testing::{epoch, find, fit, optimized, transplant};
    use arrow::array::{Float64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{Schema, TimeUnit};
    use datafusion::logical_expr::LogicalPlan;

    const S: i64 = 1_000_000;

    fn rows(ts_s: &[i64], v: &[f64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new("v", DataType::Float64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampMicrosecondArray::from(
                    ts_s.iter().map(|t| t * S).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(v.to_vec())),
            ],
        )
        .unwrap()
    }

    /// Two operators for `sql`'s aggregation, and what turns rows into their input.
    async fn operator(
        sql: &str,
        mode: AggregateMode,
    ) -> (
        WindowAggregate,
        WindowAggregate,
        impl Fn(RecordBatch) -> RecordBatch,
    ) {
        let (plan, state) = optimized(sql, &[("t", rows(&[], &[]))]).await;
        let LogicalPlan::Aggregate(agg) = find(&plan, &|p| matches!(p, LogicalPlan::Aggregate(_)))
        else {
            unreachable!()
        };
        let input = agg.input.schema().as_arrow().clone();
        (
            WindowAggregate::new(&agg, &state, mode).unwrap(),
            WindowAggregate::new(&agg, &state, mode).unwrap(),
            move |b: RecordBatch| fit(&b, &input),
        )
    }

    fn column(out: &Output, c: usize) -> Vec<String> {
        let mut v = Vec::new();
        for b in &out.batches {
            let f = arrow::util::display::ArrayFormatter::try_new(
                b.column(c).as_ref(),
                &Default::default(),
            )
            .unwrap();
            v.extend((0..b.num_rows()).map(|r| f.value(r).to_string()));
        }
        v.sort();
        v
    }

    #[tokio::test]
    async fn an_aggregation_without_keys_has_one_group() {
        let mode = AggregateMode {
            output: OutputMode::Update,
            window_on_event_time: false,
        };
        let (mut op, mut restarted, input) =
            operator("SELECT count(*) AS n, sum(v) AS s FROM t", mode).await;
        let out = epoch(
            &mut op,
            vec![(0, input(rows(&[1, 2], &[1.5, 2.5])))],
            Watermark(0),
        )
        .await;
        assert_eq!(
            (column(&out, 0), column(&out, 1)),
            (vec!["2".to_string()], vec!["4.0".to_string()])
        );
        transplant(&mut op, &mut restarted);
        let out = epoch(
            &mut restarted,
            vec![(0, input(rows(&[3], &[4.0])))],
            Watermark(0),
        )
        .await;
        assert_eq!(
            (column(&out, 0), column(&out, 1)),
            (vec!["3".to_string()], vec!["8.0".to_string()])
        );
        let out = epoch(&mut restarted, vec![], Watermark(0)).await;
        assert!(
            out.batches.is_empty(),
            "update mode emits only changed groups"
        );
    }

    #[tokio::test]
    async fn windows_close_and_leave_state_when_the_watermark_passes_their_end() {
        let mode = AggregateMode {
            output: OutputMode::Append,
            window_on_event_time: true,
        };
        let sql = "SELECT window(ts, '1 minute') AS w, count(*) AS n FROM t GROUP BY window(ts, '1 minute')";
        let (mut op, mut restarted, input) = operator(sql, mode).await;
        let out = epoch(
            &mut op,
            vec![(0, input(rows(&[5, 59, 61, 130], &[0.0; 4])))],
            Watermark(60 * S),
        )
        .await;
        assert_eq!(column(&out, 1), ["2"], "[0, 60) closed at 60 s");
        assert_eq!(
            op.state_size().rows,
            2,
            "[60, 120) and [120, 180) stay open"
        );
        transplant(&mut op, &mut restarted);
        let out = epoch(
            &mut restarted,
            vec![(0, input(rows(&[119], &[0.0])))],
            Watermark(125 * S),
        )
        .await;
        assert_eq!(column(&out, 1), ["2"]);
        let out = epoch(&mut restarted, vec![], Watermark::END).await;
        assert_eq!(column(&out, 1), ["1"]);
        assert_eq!(restarted.state_size().rows, 0);
    }

    #[tokio::test]
    async fn update_mode_keeps_windows_the_watermark_does_not_cover() {
        let mode = AggregateMode {
            output: OutputMode::Update,
            window_on_event_time: false,
        };
        let sql = "SELECT window(ts, '1 minute') AS w, count(*) AS n FROM t GROUP BY window(ts, '1 minute')";
        let (mut op, _, input) = operator(sql, mode).await;
        epoch(
            &mut op,
            vec![(0, input(rows(&[5], &[0.0])))],
            Watermark(600 * S),
        )
        .await;
        let out = epoch(
            &mut op,
            vec![(0, input(rows(&[6], &[0.0])))],
            Watermark(700 * S),
        )
        .await;
        assert_eq!(
            column(&out, 1),
            ["2"],
            "the window was not evicted and restarted from 0"
        );
    }

    /// Instances of `sql`'s aggregation, and what turns rows into their input.
    async fn instances(
        sql: &str,
        mode: AggregateMode,
        n: usize,
    ) -> (Vec<Box<dyn Operator>>, impl Fn(RecordBatch) -> RecordBatch) {
        let (plan, state) = optimized(sql, &[("t", rows(&[], &[]))]).await;
        let LogicalPlan::Aggregate(agg) = find(&plan, &|p| matches!(p, LogicalPlan::Aggregate(_)))
        else {
            unreachable!()
        };
        let input = agg.input.schema().as_arrow().clone();
        let ops = (0..n)
            .map(|_| Box::new(WindowAggregate::new(&agg, &state, mode).unwrap()) as _)
            .collect();
        (ops, move |b: RecordBatch| fit(&b, &input))
    }

    /// Every row of `outputs`, every column printed, sorted.
    fn printed(outputs: &[Output]) -> Vec<String> {
        let mut all = Vec::new();
        for b in outputs.iter().flat_map(|o| &o.batches) {
            let formatters: Vec<_> = b
                .columns()
                .iter()
                .map(|c| {
                    arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &Default::default())
                        .unwrap()
                })
                .collect();
            for r in 0..b.num_rows() {
                let row: Vec<String> = formatters.iter().map(|f| f.value(r).to_string()).collect();
                all.push(row.join(" | "));
            }
        }
        all.sort();
        all
    }

    /// Shares of an epoch folded by the combiner, routed as entries and merged by the instance
    /// that owns each key give, bit for bit, what one instance fed every row gives: in append
    /// mode (windows closing over several epochs) and update mode, with distinct counts,
    /// extremes of floats and an integer sum; and without the distinct count, whose epochs
    /// are cut into more shares than routing tasks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn folded_shares_give_what_one_instance_gives() {
        use crate::exec::partition::{run_instances, split_by_key};
        // With a distinct count (one share per routing task), epochs of 600 rows; with small
        // accumulators only (several shares per task), epochs of 240,000.
        let with_distinct = "SELECT window(ts, '1 minute') AS w, v > 50 AS big, \
                             count(*) AS n, count(DISTINCT floor(v / 7)) AS d, max(v) AS hi, \
                             min(v) AS lo, sum(CAST(v AS BIGINT)) AS total \
                             FROM t GROUP BY window(ts, '1 minute'), v > 50";
        let small = "SELECT window(ts, '1 minute') AS w, v > 50 AS big, count(*) AS n, \
                     max(v) AS hi, min(v) AS lo, sum(CAST(v AS BIGINT)) AS total \
                     FROM t GROUP BY window(ts, '1 minute'), v > 50";
        for (sql, batch_rows, shares_per_task) in [(with_distinct, 50, 1), (small, 20_000, 8)] {
            for output in [OutputMode::Append, OutputMode::Update] {
                let mode = AggregateMode {
                    output,
                    window_on_event_time: true,
                };
                let (mut one, input) = instances(sql, mode, 1).await;
                let (mut three, _) = instances(sql, mode, 3).await;
                let Partitioning::ByKey(key) = three[0].partitioning() else {
                    panic!("keyed by window and v > 50")
                };
                let combiner = three[0].combiner().expect("every aggregate merges exactly");
                assert_eq!(combiner.shares_per_task(), shares_per_task, "{sql}");
                let mut combined = 0;
                // Four epochs of 12 batches, a row a second.
                let epoch_rows = 12 * batch_rows;
                for e in 0..4i64 {
                    let batches: Vec<RecordBatch> = (0..12)
                        .map(|b| {
                            let first = e * epoch_rows + b * batch_rows;
                            let ts: Vec<i64> = (first..first + batch_rows).collect();
                            let v: Vec<f64> = ts.iter().map(|t| ((t * 37) % 101) as f64).collect();
                            input(rows(&ts, &v))
                        })
                        .collect();
                    let watermark = Watermark((e + 1) * epoch_rows * S - 30 * S);
                    let expected = epoch(
                        one[0].as_mut(),
                        batches.iter().map(|b| (0, b.clone())).collect(),
                        watermark,
                    )
                    .await;
                    let (shares, _) = split_by_key(&key, Some(&combiner), vec![batches], 3)
                        .await
                        .unwrap();
                    combined += shares.iter().flatten().filter(|d| d.combined).count();
                    let (outputs, _) = run_instances(&mut three, shares, watermark).await.unwrap();
                    assert_eq!(
                        printed(&outputs),
                        printed(std::slice::from_ref(&expected)),
                        "{output}, epoch {e}: {sql}"
                    );
                    assert!(
                        !expected.batches.is_empty(),
                        "{output}, epoch {e}: windows closed"
                    );
                }
                assert!(combined > 0, "{output}: the shares were folded");
            }
        }
    }

    /// A float sum could round differently merged than added row by row: no combiner. Rows
    /// that make nearly a group each are routed as they are, and the next calls do not try.
    #[tokio::test]
    async fn folding_is_left_out_where_it_could_change_a_result_or_would_not_pay() {
        let append = AggregateMode {
            output: OutputMode::Append,
            window_on_event_time: true,
        };
        let (ops, _) = instances(
            "SELECT window(ts, '1 minute') AS w, sum(v) AS s FROM t GROUP BY window(ts, '1 minute')",
            append,
            1,
        )
        .await;
        assert!(ops[0].combiner().is_none());
        let (ops, input) = instances(
            "SELECT window(ts, '1 minute') AS w, v, count(*) AS n FROM t \
             GROUP BY window(ts, '1 minute'), v",
            append,
            1,
        )
        .await;
        let combiner = ops[0].combiner().unwrap();
        let distinct = input(rows(&[1, 2, 3, 4], &[1.0, 2.0, 3.0, 4.0]));
        assert!(combiner.combine(0, &[distinct]).unwrap().is_none());
        let repeated = input(rows(&[1; 40], &[1.0; 40]));
        assert!(
            combiner
                .combine(0, std::slice::from_ref(&repeated))
                .unwrap()
                .is_none(),
            "passed up after a call that did not pay"
        );
        for _ in 1..GroupCombiner::SKIP_CALLS {
            assert!(
                combiner
                    .combine(0, std::slice::from_ref(&repeated))
                    .unwrap()
                    .is_none()
            );
        }
        let entries = combiner
            .combine(0, &[repeated])
            .unwrap()
            .expect("tried again");
        assert_eq!(entries.iter().map(RecordBatch::num_rows).sum::<usize>(), 1);
    }
}
