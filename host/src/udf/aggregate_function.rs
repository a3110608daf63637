//! Wasm aggregates as DataFusion aggregate UDFs.
//!
//! Each aggregate a module exports becomes an `AggregateUDF` with its real signature, usable in
//! batch `GROUP BY` and in every streaming aggregation (windows, keyed aggregations). The
//! state of a group is a row of the columns the module declared; the guest keeps nothing
//! between calls, so the state lives here:
//!
//! - [`WasmGroupsAccumulator`] (batch plans: DataFusion's hash aggregation) keeps every group's
//!   state in a [`StateStore`], and per batch makes **one** call for all the groups the batch
//!   touches: it gathers their states into columns, passes the rows with the group of each,
//!   and stores the states that come back. Cost per batch is proportional to the rows and
//!   groups of that batch, never to all groups seen so far.
//! - [`WasmAccumulator`] (one group: aggregations without `GROUP BY`, and the streaming
//!   operators, which keep one accumulator per group and checkpoint its state) holds its state
//!   as one-row columns.
//!
//! Both hand DataFusion the state as the declared columns, which is what partial/final
//! aggregation exchanges and what streaming checkpoints store; `merge` brings states together.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, new_empty_array};
use arrow::compute::filter;
use arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::{Result as DfResult, ScalarValue, not_impl_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};

use super::module::{AggregateSpec, AggregateStep, UdfModule, UdfOutput};
use super::slot::ModuleSlot;
use super::sql_function::{RowErrorPolicy, coerce_arguments};
use super::state_store::StateStore;
use crate::error::RiffleError;

/// One exported Wasm aggregate, as a DataFusion aggregate UDF.
#[derive(Debug)]
pub struct WasmAggregateUdf {
    udf: Arc<AggregateCalls>,
    signature: Signature,
}

/// What the accumulators of one aggregate share: the calls into the module serving it. The
/// streaming OVER operator, which keeps its partitions' states itself, makes the same calls
/// for many partitions at once (see [`WasmAggregateUdf::calls`]).
#[derive(Debug)]
pub(crate) struct AggregateCalls {
    /// Where the module serving the aggregate is found: a hot swap replaces it between
    /// epochs, with the same signature and state columns (see [`super::swap_blockers`]).
    slot: Arc<ModuleSlot>,
    /// The aggregate as registered.
    spec: AggregateSpec,
    policy: RowErrorPolicy,
    /// The empty state, asked of the guest once per module (streaming operators ask every
    /// new or restored group's accumulator for its state), with the hash of the module that
    /// gave it.
    empty: std::sync::Mutex<Option<(String, Vec<ArrayRef>)>>,
}

impl AggregateCalls {
    /// The aggregate as registered (its signature and state columns survive hot swaps).
    pub(crate) fn spec(&self) -> &AggregateSpec {
        &self.spec
    }

    /// The module serving now and the aggregate's index in it.
    fn serving(&self) -> DfResult<(Arc<UdfModule>, usize)> {
        let module = self.slot.get();
        match module.aggregate_index(&self.spec.name) {
            Some(index) => Ok((module, index)),
            None => Err(RiffleError::Internal(format!(
                "module {} no longer exports aggregate {} (a swap should have been refused)",
                module.file_name(),
                self.spec.name
            ))
            .into_datafusion()),
        }
    }

    /// One step over `group_of.len()` rows for `groups` states (empty `states`: fresh ones),
    /// giving the states back.
    pub(crate) fn step(
        &self,
        step: AggregateStep,
        groups: usize,
        states: &[ArrayRef],
        group_of: &[u32],
        args: &[ArrayRef],
    ) -> DfResult<Vec<ArrayRef>> {
        let (module, index) = self.serving()?;
        module
            .aggregate(index, step, groups, states, group_of, args)
            .map_err(RiffleError::into_datafusion)
    }

    /// The state of a group that has seen no rows, as one-row columns.
    pub(crate) fn empty_state(&self) -> DfResult<Vec<ArrayRef>> {
        let hash = self.slot.get().hash().to_string();
        if let Some((of, empty)) = &*self.empty.lock().expect("empty state lock")
            && *of == hash
        {
            return Ok(empty.clone());
        }
        let args: Vec<ArrayRef> = self
            .spec()
            .args
            .iter()
            .map(|a| new_empty_array(&a.data_type.arrow()))
            .collect();
        let empty = self.step(AggregateStep::Update, 1, &[], &[], &args)?;
        *self.empty.lock().expect("empty state lock") = Some((hash, empty.clone()));
        Ok(empty)
    }

    /// Final values of `groups` states, with the row-error policy applied.
    pub(crate) fn finish(&self, groups: usize, states: &[ArrayRef]) -> DfResult<ArrayRef> {
        let (module, index) = self.serving()?;
        let UdfOutput { array, row_errors } = module
            .finish(index, groups, states)
            .map_err(RiffleError::into_datafusion)?;
        self.policy
            .apply(&self.spec.name, module.hash(), &row_errors, "group")?;
        Ok(array)
    }
}

impl PartialEq for WasmAggregateUdf {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.udf.slot, &other.udf.slot)
            && self.udf.spec.name == other.udf.spec.name
            && self.udf.policy == other.udf.policy
    }
}

impl Eq for WasmAggregateUdf {}

impl Hash for WasmAggregateUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.udf.slot).hash(state);
        self.udf.spec.name.hash(state);
        self.udf.policy.hash(state);
    }
}

impl WasmAggregateUdf {
    /// Wraps aggregate `index` of the module `slot` serves now.
    pub fn new(slot: Arc<ModuleSlot>, index: usize, policy: RowErrorPolicy) -> Self {
        let spec = slot.get().spec().aggregates[index].clone();
        let volatility = if spec.deterministic {
            Volatility::Immutable
        } else {
            Volatility::Volatile
        };
        WasmAggregateUdf {
            udf: Arc::new(AggregateCalls {
                slot,
                spec,
                policy,
                empty: std::sync::Mutex::new(None),
            }),
            signature: Signature::user_defined(volatility),
        }
    }

    /// All aggregates of the module `slot` serves, ready to register.
    pub fn all(slot: &Arc<ModuleSlot>, policy: RowErrorPolicy) -> Vec<AggregateUDF> {
        (0..slot.get().spec().aggregates.len())
            .map(|i| AggregateUDF::new_from_impl(WasmAggregateUdf::new(slot.clone(), i, policy)))
            .collect()
    }

    /// An accumulator holding `state` (the state columns, one row) as it is. Restoring a
    /// checkpoint this way makes no guest call, where merging into an empty state would: a
    /// call per group, and a `merge` that fails or rounds would change what a restart sees.
    pub(crate) fn accumulator_with_state(&self, state: Vec<ArrayRef>) -> Box<dyn Accumulator> {
        Box::new(WasmAccumulator {
            udf: self.udf.clone(),
            state: Some(state),
        })
    }

    /// The calls behind this aggregate, for an operator that keeps many groups' states itself.
    pub(crate) fn calls(&self) -> &Arc<AggregateCalls> {
        &self.udf
    }

    fn check(&self, args: &AccumulatorArgs) -> DfResult<()> {
        if args.is_distinct {
            return not_impl_err!(
                "{}(DISTINCT ...): Wasm aggregates see every row; deduplicate in a subquery",
                self.udf.spec().name
            );
        }
        if !args.order_bys.is_empty() {
            return not_impl_err!(
                "{}(... ORDER BY ...): Wasm aggregates do not take an ordering",
                self.udf.spec().name
            );
        }
        Ok(())
    }
}

impl AggregateUDFImpl for WasmAggregateUdf {
    fn name(&self) -> &str {
        &self.udf.spec().name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(self.udf.spec().returns.arrow())
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        let spec = self.udf.spec();
        // Arguments are lowered as the declared Arrow type exactly (no view types).
        coerce_arguments(
            &spec.name,
            &spec.args,
            arg_types,
            &spec.signature(),
            |declared, _| declared.arrow(),
        )
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(self
            .udf
            .spec()
            .state
            .iter()
            .map(|f| {
                Arc::new(Field::new(
                    format_state_name(args.name, &f.name),
                    f.data_type.arrow(),
                    f.nullable,
                ))
            })
            .collect())
    }

    fn accumulator(&self, args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        self.check(&args)?;
        Ok(Box::new(WasmAccumulator {
            udf: self.udf.clone(),
            state: None,
        }))
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        !args.is_distinct && args.order_bys.is_empty()
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> DfResult<Box<dyn GroupsAccumulator>> {
        self.check(&args)?;
        let fields: Vec<DataType> = self
            .udf
            .spec()
            .state
            .iter()
            .map(|f| f.data_type.arrow())
            .collect();
        Ok(Box::new(WasmGroupsAccumulator {
            udf: self.udf.clone(),
            store: StateStore::new(&fields)?,
            empty: None,
            slot: Vec::new(),
        }))
    }
}

/// The state of one group (see the module docs).
#[derive(Debug)]
pub struct WasmAccumulator {
    udf: Arc<AggregateCalls>,
    /// One-row state columns; `None` until the first row.
    state: Option<Vec<ArrayRef>>,
}

impl WasmAccumulator {
    fn apply(&mut self, step: AggregateStep, args: &[ArrayRef]) -> DfResult<()> {
        let rows = args.first().map_or(0, |a| a.len());
        if rows == 0 {
            return Ok(());
        }
        let states = self.state.as_deref().unwrap_or(&[]);
        let next = self.udf.step(step, 1, states, &vec![0; rows], args)?;
        self.state = Some(next);
        Ok(())
    }

    fn state_or_empty(&mut self) -> DfResult<&[ArrayRef]> {
        if self.state.is_none() {
            self.state = Some(self.udf.empty_state()?);
        }
        Ok(self.state.as_deref().expect("set above"))
    }
}

impl Accumulator for WasmAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        self.apply(AggregateStep::Update, values)
    }

    fn retract_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        self.apply(AggregateStep::Retract, values)
    }

    fn supports_retract_batch(&self) -> bool {
        self.udf.spec().retractable
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        self.apply(AggregateStep::Merge, states)
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        let states = self.state.as_deref().unwrap_or(&[]);
        let array = self.udf.finish(1, states)?;
        ScalarValue::try_from_array(&array, 0)
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        self.state_or_empty()?
            .iter()
            .map(|a| ScalarValue::try_from_array(a, 0))
            .collect()
    }

    fn size(&self) -> usize {
        size_of::<Self>()
            + self
                .state
                .iter()
                .flatten()
                .map(|a| a.get_array_memory_size())
                .sum::<usize>()
    }
}

/// The states of all groups of a batch aggregation (see the module docs).
pub struct WasmGroupsAccumulator {
    udf: Arc<AggregateCalls>,
    store: StateStore,
    /// The empty state (one-row columns), once a call needs it.
    empty: Option<Vec<ArrayRef>>,
    /// Scratch: the dense index of each group in the current call, `u32::MAX` if untouched.
    slot: Vec<u32>,
}

impl WasmGroupsAccumulator {
    /// Gives the fresh groups among `groups` the empty state, so their state can be read.
    fn materialize(&mut self, groups: &[usize]) -> DfResult<()> {
        let fresh: Vec<usize> = groups
            .iter()
            .copied()
            .filter(|&g| self.store.is_fresh(g))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        if self.empty.is_none() {
            self.empty = Some(self.udf.empty_state()?);
        }
        let empty = self.empty.as_deref().expect("set above");
        self.store.write(&fresh, empty, |_| 0)
    }

    fn apply(
        &mut self,
        step: AggregateStep,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.store.resize(total_num_groups);
        self.slot.resize(total_num_groups, u32::MAX);
        let (values, group_indices): (Vec<ArrayRef>, Vec<usize>) = match opt_filter {
            Some(keep) => {
                // A NULL in the filter drops the row, as SQL's FILTER (WHERE ...) does.
                let keep = match keep.nulls() {
                    Some(nulls) => BooleanArray::new(keep.values() & nulls.inner(), None),
                    None => keep.clone(),
                };
                let values = values
                    .iter()
                    .map(|v| filter(v, &keep))
                    .collect::<Result<_, _>>()?;
                let groups = group_indices
                    .iter()
                    .zip(keep.values().iter())
                    .filter_map(|(g, k)| k.then_some(*g))
                    .collect();
                (values, groups)
            }
            None => (values.to_vec(), group_indices.to_vec()),
        };
        if group_indices.is_empty() {
            return Ok(());
        }
        // The groups this batch touches, numbered densely in order of first appearance.
        let mut touched: Vec<usize> = Vec::new();
        let group_of: Vec<u32> = group_indices
            .iter()
            .map(|&g| {
                if self.slot[g] == u32::MAX {
                    self.slot[g] = touched.len() as u32;
                    touched.push(g);
                }
                self.slot[g]
            })
            .collect();
        for &g in &touched {
            self.slot[g] = u32::MAX;
        }
        let states = if touched.iter().all(|&g| self.store.is_fresh(g)) {
            // The guest starts every group from its empty state.
            Vec::new()
        } else {
            self.materialize(&touched)?;
            self.store.read(&touched)?
        };
        let next = self
            .udf
            .step(step, touched.len(), &states, &group_of, &values)?;
        self.store.write(&touched, &next, |j| j)
    }

    /// The states of the groups `emit_to` names, removed from the store.
    fn take(&mut self, emit_to: EmitTo) -> DfResult<Vec<ArrayRef>> {
        let n = match emit_to {
            EmitTo::All => self.store.len(),
            EmitTo::First(n) => n,
        };
        if n == 0 {
            let fields = &self.udf.spec().state;
            return Ok(fields
                .iter()
                .map(|f| new_empty_array(&f.data_type.arrow()))
                .collect());
        }
        let groups: Vec<usize> = (0..n).collect();
        self.materialize(&groups)?;
        let columns = self.store.read(&groups)?;
        self.store.drain_first(n);
        Ok(columns)
    }
}

impl GroupsAccumulator for WasmGroupsAccumulator {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.apply(
            AggregateStep::Update,
            values,
            group_indices,
            opt_filter,
            total_num_groups,
        )
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.apply(
            AggregateStep::Merge,
            values,
            group_indices,
            None,
            total_num_groups,
        )
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> DfResult<ArrayRef> {
        let columns = self.take(emit_to)?;
        let groups = columns.first().map_or(0, |c| c.len());
        self.udf.finish(groups, &columns)
    }

    fn state(&mut self, emit_to: EmitTo) -> DfResult<Vec<ArrayRef>> {
        self.take(emit_to)
    }

    /// Each row as its own group's state (DataFusion skips partial aggregation when groups are
    /// nearly as many as rows): one call for the whole batch, rows the filter drops staying
    /// empty states.
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> DfResult<Vec<ArrayRef>> {
        let rows = values.first().map_or(0, |v| v.len());
        let keep = |i: usize| opt_filter.is_none_or(|f| f.is_valid(i) && f.value(i));
        let kept: Vec<u32> = (0..rows as u32).filter(|i| keep(*i as usize)).collect();
        let values = if kept.len() == rows {
            values.to_vec()
        } else {
            let indices = arrow::array::UInt32Array::from(kept.clone());
            values
                .iter()
                .map(|v| arrow::compute::take(v, &indices, None))
                .collect::<Result<_, _>>()?
        };
        let states = self
            .udf
            .step(AggregateStep::Update, rows, &[], &kept, &values)?;
        Ok(states)
    }

    fn size(&self) -> usize {
        size_of::<Self>() + self.store.size() + self.slot.capacity() * size_of::<u32>()
    }
}
