//! Wasm functions as DataFusion scalar UDFs.
//!
//! Each function a module exports becomes a `ScalarUDF` with its real signature, usable anywhere
//! in SQL and in the DataFrame API. DataFusion calls it once per batch; arguments are cast to the
//! declared types first (`coerce_types`), so a `Utf8View` or an `INT` column passed where
//! `VARCHAR` or `BIGINT` is declared just works, and impossible casts fail at planning time.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::compute::can_cast_types;
use arrow::datatypes::DataType;
use datafusion::common::{Result as DfResult, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use super::abi::UdfType;
use super::module::{ArgSpec, FunctionSpec};
use super::slot::ModuleSlot;
use crate::error::RiffleError;

/// What happens when a UDF returns an error for a row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RowErrorPolicy {
    /// Fail the query with the first row error (the default: nothing is silently lost).
    #[default]
    Fail,
    /// Keep the row with a NULL result; errors are counted and logged.
    Null,
}

impl std::str::FromStr for RowErrorPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fail" => Ok(RowErrorPolicy::Fail),
            "null" => Ok(RowErrorPolicy::Null),
            other => Err(format!(
                "unknown row-error policy {other:?}: expected fail or null"
            )),
        }
    }
}

impl RowErrorPolicy {
    /// Applies the policy to the row errors of one call of `function` (module `hash`):
    /// the first fails the query, or all are logged and their values stay NULL. `unit` names
    /// what a row error's index counts (rows of a batch, groups of an aggregation).
    pub(crate) fn apply(
        self,
        function: &str,
        hash: &str,
        row_errors: &[(usize, String)],
        unit: &str,
    ) -> DfResult<()> {
        let Some((row, message)) = row_errors.first() else {
            return Ok(());
        };
        match self {
            RowErrorPolicy::Fail => Err(RiffleError::RowError {
                function: function.to_string(),
                hash: hash.to_string(),
                row: *row,
                message: message.clone(),
            }
            .into_datafusion()),
            RowErrorPolicy::Null => {
                tracing::warn!(
                    udf = %function,
                    errors = row_errors.len(),
                    "{unit}s set to NULL by errors; first ({unit} {row}): {message}"
                );
                Ok(())
            }
        }
    }
}

/// The types DataFusion casts a Wasm function's arguments to before a call (`wanted` picks
/// each from the declared and the actual type), or a planning error naming the function, the
/// argument and the `signature` when the count is wrong or a cast is impossible. Shared by
/// scalar and aggregate functions.
pub(crate) fn coerce_arguments(
    name: &str,
    args: &[ArgSpec],
    arg_types: &[DataType],
    signature: &str,
    wanted: impl Fn(UdfType, &DataType) -> DataType,
) -> DfResult<Vec<DataType>> {
    if arg_types.len() != args.len() {
        return plan_err!(
            "{name} takes {} arguments, got {}: {signature}",
            args.len(),
            arg_types.len()
        );
    }
    let mut coerced = Vec::with_capacity(arg_types.len());
    for (actual, arg) in arg_types.iter().zip(args) {
        let wanted = wanted(arg.data_type, actual);
        if actual != &wanted && !can_cast_types(actual, &wanted) {
            return plan_err!(
                "{name}: argument {} is {actual}, which cannot be cast to {}: {signature}",
                arg.name,
                arg.data_type.sql_name()
            );
        }
        coerced.push(wanted);
    }
    Ok(coerced)
}

/// One exported Wasm function, as a DataFusion scalar UDF.
///
/// It reaches its module through a [`ModuleSlot`], so a hot swap takes effect in plans already
/// built; the signature is the one registered, which a swap keeps (see
/// [`swap_blockers`](super::swap_blockers)).
#[derive(Debug)]
pub struct WasmScalarUdf {
    slot: Arc<ModuleSlot>,
    spec: FunctionSpec,
    signature: Signature,
    policy: RowErrorPolicy,
}

impl PartialEq for WasmScalarUdf {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.slot, &other.slot)
            && self.spec.name == other.spec.name
            && self.policy == other.policy
    }
}

impl Eq for WasmScalarUdf {}

impl Hash for WasmScalarUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.slot).hash(state);
        self.spec.name.hash(state);
        self.policy.hash(state);
    }
}

impl WasmScalarUdf {
    /// Wraps function `index` of the module `slot` serves now.
    pub fn new(slot: Arc<ModuleSlot>, index: usize, policy: RowErrorPolicy) -> Self {
        let spec = slot.get().spec().functions[index].clone();
        let volatility = if spec.deterministic {
            Volatility::Immutable
        } else {
            Volatility::Volatile
        };
        let signature = if spec.args.is_empty() {
            Signature::nullary(volatility)
        } else {
            Signature::user_defined(volatility)
        };
        WasmScalarUdf {
            slot,
            spec,
            signature,
            policy,
        }
    }

    /// All functions of the module `slot` serves, ready to register.
    pub fn all(slot: &Arc<ModuleSlot>, policy: RowErrorPolicy) -> Vec<ScalarUDF> {
        (0..slot.get().spec().functions.len())
            .map(|i| ScalarUDF::new_from_impl(WasmScalarUdf::new(slot.clone(), i, policy)))
            .collect()
    }

    fn spec(&self) -> &FunctionSpec {
        &self.spec
    }
}

impl ScalarUDFImpl for WasmScalarUdf {
    fn name(&self) -> &str {
        &self.spec().name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(self.spec().returns.arrow())
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        let spec = self.spec();
        coerce_arguments(
            &spec.name,
            &spec.args,
            arg_types,
            &spec.signature(),
            |declared, actual| declared.arrow_for_arg(actual),
        )
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        // A batch of all-scalar arguments arrives as one-row arrays; widen them to the batch.
        let arrays = arrays
            .into_iter()
            .map(|a| {
                if a.len() == rows {
                    Ok(a)
                } else {
                    datafusion::common::ScalarValue::try_from_array(&a, 0)?.to_array_of_size(rows)
                }
            })
            .collect::<DfResult<Vec<_>>>()?;
        let module = self.slot.get();
        let index = module.function_index(&self.spec.name).ok_or_else(|| {
            RiffleError::Internal(format!(
                "module {} no longer exports {} (a swap should have been refused)",
                module.file_name(),
                self.spec.name
            ))
            .into_datafusion()
        })?;
        let output = module
            .call(index, rows, &arrays)
            .map_err(RiffleError::into_datafusion)?;
        self.policy
            .apply(&self.spec.name, module.hash(), &output.row_errors, "row")?;
        Ok(ColumnarValue::Array(output.array))
    }
}
