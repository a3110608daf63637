//! Aggregate functions: a plain Rust type is the state of one group.
//!
//! The author writes a struct (`#[derive(AggregateState)]`, so the host learns its columns) and
//! an `impl` block with `update`, `merge`, `finish` and optionally `retract`
//! (`#[aggregate]`). The generated batch entry point decodes the states of the groups a batch
//! touches from Arrow-layout columns, applies every row to its group, and encodes the states
//! back: one call per batch, many groups per call, and nothing kept in the guest between calls.
//! The host owns every state as Arrow columns of the declared types, which is what lets it put
//! them in checkpoints and in DataFusion's partial/final aggregation, and retry a call on a
//! fresh instance after a trap.

use crate::bindings::riffle::udf::types::{
    AggregateInfo, ArgInfo, CallError, Column, DataType, StateField,
};
use crate::{Arg, Date, Output, Reader, Timestamp};

/// A type a field of an aggregate's state may have.
///
/// Implemented for `bool`, `i32`, `i64`, `f32`, `f64`, `String`, `Vec<u8>`, [`Timestamp`],
/// [`Date`], and `Option<T>` of each (a nullable state column). A sketch or any other
/// structure is kept as `Vec<u8>` in whatever encoding the author picks.
pub trait StateValue: Sized {
    /// The state column's type.
    const DATA_TYPE: DataType;
    /// Whether the column may hold NULLs.
    const NULLABLE: bool;
    /// Decodes a state column of `rows` rows.
    ///
    /// # Errors
    /// [`CallError::BadArguments`] when the column does not have this type, is too short, or
    /// holds a NULL in a non-nullable field.
    fn read_column(col: &Column, rows: usize) -> Result<Vec<Self>, CallError>;
    /// Encodes values as a state column.
    fn write_column(values: Vec<Self>) -> Column;
}

fn null_in_state() -> CallError {
    CallError::BadArguments("a state column that is not nullable holds a NULL".into())
}

macro_rules! state_values {
    ($($t:ty => $arg:ty, $own:expr);* $(;)?) => {$(
        impl StateValue for $t {
            const DATA_TYPE: DataType = <$t as Output>::DATA_TYPE;
            const NULLABLE: bool = false;
            fn read_column(col: &Column, rows: usize) -> Result<Vec<Self>, CallError> {
                let reader = <$arg as Arg<'_>>::reader(col, rows)?;
                if reader.has_nulls() {
                    return Err(null_in_state());
                }
                let own: fn($arg) -> $t = $own;
                // SAFETY: the reader checked that its buffers cover `rows` rows.
                Ok((0..rows).map(|i| own(unsafe { reader.get_unchecked(i) })).collect())
            }
            fn write_column(values: Vec<Self>) -> Column {
                <$t as Output>::collect(values.len(), values.into_iter()).column
            }
        }

        impl StateValue for Option<$t> {
            const DATA_TYPE: DataType = <$t as Output>::DATA_TYPE;
            const NULLABLE: bool = true;
            fn read_column(col: &Column, rows: usize) -> Result<Vec<Self>, CallError> {
                let reader = <Option<$arg> as Arg<'_>>::reader(col, rows)?;
                let own: fn($arg) -> $t = $own;
                // SAFETY: as above.
                Ok((0..rows).map(|i| unsafe { reader.get_unchecked(i) }.map(own)).collect())
            }
            fn write_column(values: Vec<Self>) -> Column {
                <Option<$t> as Output>::collect(values.len(), values.into_iter()).column
            }
        }
    )*};
}

state_values! {
    bool => bool, |v| v;
    i32 => i32, |v| v;
    i64 => i64, |v| v;
    f32 => f32, |v| v;
    f64 => f64, |v| v;
    Timestamp => Timestamp, |v| v;
    Date => Date, |v| v;
    String => &str, str::to_string;
    Vec<u8> => &[u8], <[u8]>::to_vec;
}

/// The state of one group of an aggregate: a struct whose fields are [`StateValue`]s.
/// Derive it with `#[derive(AggregateState)]`; the fields, in order, are the state's columns.
pub trait AggregateState: Default + Sized {
    /// The state's columns, as `describe-aggregates` declares them.
    fn state_fields() -> Vec<StateField>;
    /// Decodes `groups` states from their columns.
    ///
    /// # Errors
    /// [`CallError::BadArguments`] when the columns do not match [`Self::state_fields`].
    fn read_states(columns: &[Column], groups: usize) -> Result<Vec<Self>, CallError>;
    /// Encodes states as columns.
    fn write_states(states: Vec<Self>) -> Vec<Column>;
}

/// Support for generated code; not a stable API.
#[doc(hidden)]
pub mod support {
    use super::*;

    /// One field of a state, for `#[derive(AggregateState)]`.
    pub fn field<T: StateValue>(name: &str) -> StateField {
        StateField {
            name: name.to_string(),
            data_type: T::DATA_TYPE,
            nullable: T::NULLABLE,
        }
    }

    /// Checks the number of state columns, for `#[derive(AggregateState)]`.
    pub fn check_state_arity(columns: &[Column], expected: usize) -> Result<(), CallError> {
        if columns.len() == expected {
            Ok(())
        } else {
            Err(CallError::BadArguments(format!(
                "expected {expected} state columns, got {}",
                columns.len()
            )))
        }
    }

    /// The states a call starts from: decoded, or empty ones when the host passed none.
    pub fn states<S: AggregateState>(
        columns: &[Column],
        groups: usize,
    ) -> Result<Vec<S>, CallError> {
        if columns.is_empty() {
            Ok((0..groups).map(|_| S::default()).collect())
        } else {
            S::read_states(columns, groups)
        }
    }

    /// Checks that every row names a group in range.
    pub fn check_groups(group_of: &[u32], groups: usize) -> Result<(), CallError> {
        match group_of.iter().find(|g| **g as usize >= groups) {
            Some(g) => Err(CallError::BadArguments(format!(
                "row assigned to group {g} of {groups}"
            ))),
            None => Ok(()),
        }
    }

    /// The self-description `#[aggregate]` generates.
    pub fn aggregate_info<S: AggregateState, R: Output>(
        name: &str,
        doc: &str,
        deterministic: bool,
        retractable: bool,
        args: Vec<ArgInfo>,
    ) -> AggregateInfo {
        AggregateInfo {
            name: name.to_string(),
            args,
            returns: R::DATA_TYPE,
            returns_null: R::RETURNS_NULL,
            fallible: R::FALLIBLE,
            state: S::state_fields(),
            retractable,
            deterministic,
            doc: doc.to_string(),
        }
    }
}
