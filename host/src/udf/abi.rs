//! How Arrow columns cross the Wasm boundary.
//!
//! # Design, decided by measurement
//!
//! The contract (`wit/udf.wit`) passes each column as Arrow's own buffers expressed as typed WIT
//! lists: an optional validity bitmap, a values list (`list<f64>`, bit-packed booleans, or
//! offsets + bytes for strings). Measured here on wasmtime 48 with 8192-row batches
//! (`../shared/notes/wasm-toolchain.md`), typed lists beat Arrow IPC bytes about 4x (utf8: 45 µs
//! vs 17.5 µs is the other way round only for IPC *without* decoding on the guest; with both
//! sides decoding IPC, copies and parsing dominate).
//!
//! The remaining cost for cheap functions is copying, so this module copies exactly twice per
//! buffer and never more:
//!
//! - **In**: [`WitList`] wraps an Arrow buffer (a refcounted pointer, no copy) and implements
//!   wasmtime's `Lower` by delegating to `[T]`, so the canonical ABI copies the Arrow buffer
//!   *directly into guest memory* (wasmtime's primitive-list lowering is a `memcpy`). Sliced
//!   arrays are passed as slices, without rebasing offsets (the guest handles a non-zero first
//!   offset); only validity bitmaps that start mid-byte are re-packed.
//! - **Out**: results are lifted into `Vec`s (one `memcpy`-like loop out of guest memory), and
//!   those `Vec`s become Arrow buffers without another copy.
//!
//! The benchmark `cargo bench -p riffle-tests --bench udf` reports what this costs against
//! native code.

use std::mem::MaybeUninit;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Date32Array, Float32Array, Float64Array,
    Int32Array, Int64Array, StringArray, TimestampMicrosecondArray,
};
use arrow::buffer::{BooleanBuffer, Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{
    ArrowNativeType, DataType, Date32Type, Float32Type, Float64Type, Int32Type, Int64Type,
    TimeUnit, TimestampMicrosecondType,
};
use serde::Serialize;
use wasmtime::component::__internal::{
    CanonicalAbiInfo, InstanceType, InterfaceType, LowerContext,
};
use wasmtime::component::{ComponentType, Lower};

use super::bindings::riffle::udf::types as wire;

/// The column types of the UDF contract, each mapped to one Arrow type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UdfType {
    /// Arrow Boolean.
    Boolean,
    /// Arrow Int32.
    Int32,
    /// Arrow Int64.
    Int64,
    /// Arrow Float32.
    Float32,
    /// Arrow Float64.
    Float64,
    /// Arrow Utf8.
    Utf8,
    /// Arrow Binary.
    Binary,
    /// Arrow Timestamp(Microsecond), UTC.
    Timestamp,
    /// Arrow Date32.
    Date,
}

impl UdfType {
    pub(crate) fn from_wire(t: wire::DataType) -> Self {
        match t {
            wire::DataType::Boolean => UdfType::Boolean,
            wire::DataType::Int32 => UdfType::Int32,
            wire::DataType::Int64 => UdfType::Int64,
            wire::DataType::Float32 => UdfType::Float32,
            wire::DataType::Float64 => UdfType::Float64,
            wire::DataType::Utf8 => UdfType::Utf8,
            wire::DataType::Binary => UdfType::Binary,
            wire::DataType::Timestamp => UdfType::Timestamp,
            wire::DataType::Date => UdfType::Date,
        }
    }

    /// The Arrow type values of this type have inside Riffle.
    pub fn arrow(self) -> DataType {
        match self {
            UdfType::Boolean => DataType::Boolean,
            UdfType::Int32 => DataType::Int32,
            UdfType::Int64 => DataType::Int64,
            UdfType::Float32 => DataType::Float32,
            UdfType::Float64 => DataType::Float64,
            UdfType::Utf8 => DataType::Utf8,
            UdfType::Binary => DataType::Binary,
            UdfType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            UdfType::Date => DataType::Date32,
        }
    }

    /// The Arrow type an argument of this type is cast to before a call. Timestamps keep their
    /// time zone (the instant is the same; the UDF sees UTC microseconds).
    pub(crate) fn arrow_for_arg(self, actual: &DataType) -> DataType {
        match (self, actual) {
            (UdfType::Timestamp, DataType::Timestamp(_, tz)) => {
                DataType::Timestamp(TimeUnit::Microsecond, tz.clone())
            }
            _ => self.arrow(),
        }
    }

    /// The SQL spelling, for signatures shown to users.
    pub fn sql_name(self) -> &'static str {
        match self {
            UdfType::Boolean => "BOOLEAN",
            UdfType::Int32 => "INT",
            UdfType::Int64 => "BIGINT",
            UdfType::Float32 => "REAL",
            UdfType::Float64 => "DOUBLE",
            UdfType::Utf8 => "VARCHAR",
            UdfType::Binary => "BYTEA",
            UdfType::Timestamp => "TIMESTAMP",
            UdfType::Date => "DATE",
        }
    }
}

/// An Arrow buffer lowered as a WIT `list<T>`, copied straight into guest memory.
///
/// wasmtime's derive macros cannot put borrowed slices inside a `variant`, and owned `Vec`s would
/// cost an extra copy; a newtype over Arrow's refcounted buffer that lowers exactly like `[T]`
/// avoids both. It delegates to wasmtime's hidden `ComponentType`/`Lower` methods, which is why
/// the wasmtime version is pinned exactly in Cargo.toml.
pub(crate) struct WitList<T: ArrowNativeType>(ScalarBuffer<T>);

// SAFETY: every item delegates to the implementation for `[T]`, whose lowered representation
// (a pointer and a length) is exactly what this type produces.
unsafe impl<T> ComponentType for WitList<T>
where
    T: ComponentType + ArrowNativeType,
{
    type Lower = <[T] as ComponentType>::Lower;
    const ABI: CanonicalAbiInfo = <[T] as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <[T] as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: as above; lowering writes the same pointer/length pair `[T]` would.
unsafe impl<T> Lower for WitList<T>
where
    T: Lower + ArrowNativeType,
{
    fn linear_lower_to_flat<U>(
        &self,
        cx: &mut LowerContext<'_, U>,
        ty: InterfaceType,
        dst: &mut MaybeUninit<Self::Lower>,
    ) -> wasmtime::Result<()> {
        <[T] as Lower>::linear_lower_to_flat(&self.0[..], cx, ty, dst)
    }

    fn linear_lower_to_memory<U>(
        &self,
        cx: &mut LowerContext<'_, U>,
        ty: InterfaceType,
        offset: usize,
    ) -> wasmtime::Result<()> {
        <[T] as Lower>::linear_lower_to_memory(&self.0[..], cx, ty, offset)
    }
}

/// `record column` of the contract, lowered from Arrow.
#[derive(ComponentType, Lower)]
#[component(record)]
pub(crate) struct ColumnIn {
    len: u32,
    validity: Option<WitList<u8>>,
    values: ValuesIn,
}

/// `record var-len` of the contract.
#[derive(ComponentType, Lower)]
#[component(record)]
pub(crate) struct VarLenIn {
    offsets: WitList<i32>,
    data: WitList<u8>,
}

/// `variant values` of the contract.
#[derive(ComponentType, Lower)]
#[component(variant)]
pub(crate) enum ValuesIn {
    #[component(name = "boolean")]
    Boolean(WitList<u8>),
    #[component(name = "int32")]
    Int32(WitList<i32>),
    #[component(name = "int64")]
    Int64(WitList<i64>),
    #[component(name = "float32")]
    Float32(WitList<f32>),
    #[component(name = "float64")]
    Float64(WitList<f64>),
    #[component(name = "utf8")]
    Utf8(VarLenIn),
    #[component(name = "binary")]
    Binary(VarLenIn),
    #[component(name = "timestamp")]
    Timestamp(WitList<i64>),
    #[component(name = "date")]
    Date(WitList<i32>),
}

/// A bitmap starting at bit 0, as the contract wants: a zero-copy slice when the Arrow bitmap
/// starts on a byte boundary, a re-packed copy otherwise.
fn bitmap(bits: &BooleanBuffer) -> WitList<u8> {
    let bytes = bits.len().div_ceil(8);
    if bits.offset() % 8 == 0 {
        WitList(ScalarBuffer::new(
            bits.inner().clone(),
            bits.offset() / 8,
            bytes,
        ))
    } else {
        let packed: Buffer = bits.sliced();
        WitList(ScalarBuffer::new(packed, 0, bytes))
    }
}

fn var_len(offsets: &OffsetBuffer<i32>, values: &Buffer) -> VarLenIn {
    let start = offsets[0] as usize;
    let end = offsets[offsets.len() - 1] as usize;
    VarLenIn {
        offsets: WitList(offsets.inner().clone()),
        data: WitList(ScalarBuffer::new(values.clone(), start, end - start)),
    }
}

/// Lowers one argument column. `array` must already have the Arrow type the argument declares
/// (the DataFusion adapter casts); anything else is a host bug.
pub(crate) fn lower_column(array: &ArrayRef, ty: UdfType) -> Result<ColumnIn, String> {
    let validity = array
        .nulls()
        .filter(|n| n.null_count() > 0)
        .map(|n| bitmap(n.inner()));
    let values = match (ty, array.data_type()) {
        (UdfType::Boolean, DataType::Boolean) => {
            ValuesIn::Boolean(bitmap(array.as_boolean().values()))
        }
        (UdfType::Int32, DataType::Int32) => {
            ValuesIn::Int32(WitList(array.as_primitive::<Int32Type>().values().clone()))
        }
        (UdfType::Int64, DataType::Int64) => {
            ValuesIn::Int64(WitList(array.as_primitive::<Int64Type>().values().clone()))
        }
        (UdfType::Float32, DataType::Float32) => {
            ValuesIn::Float32(WitList(array.as_primitive::<Float32Type>().values().clone()))
        }
        (UdfType::Float64, DataType::Float64) => {
            ValuesIn::Float64(WitList(array.as_primitive::<Float64Type>().values().clone()))
        }
        (UdfType::Utf8, DataType::Utf8) => {
            let a = array.as_string::<i32>();
            ValuesIn::Utf8(var_len(a.offsets(), a.values()))
        }
        (UdfType::Binary, DataType::Binary) => {
            let a = array.as_binary::<i32>();
            ValuesIn::Binary(var_len(a.offsets(), a.values()))
        }
        (UdfType::Timestamp, DataType::Timestamp(TimeUnit::Microsecond, _)) => {
            let a = array.as_primitive::<TimestampMicrosecondType>();
            ValuesIn::Timestamp(WitList(a.values().clone()))
        }
        (UdfType::Date, DataType::Date32) => {
            ValuesIn::Date(WitList(array.as_primitive::<Date32Type>().values().clone()))
        }
        (ty, actual) => {
            return Err(format!(
                "argument declared {} arrived as Arrow {actual}",
                ty.sql_name()
            ));
        }
    };
    Ok(ColumnIn {
        len: u32::try_from(array.len()).map_err(|_| "batch larger than 4G rows".to_string())?,
        validity,
        values,
    })
}

/// Turns a column returned by the guest into an Arrow array, checking everything the guest
/// could get wrong: the type, the length, the bitmap and offsets. No value is copied.
pub(crate) fn lift_column(col: wire::Column, ty: UdfType, rows: usize) -> Result<ArrayRef, String> {
    if col.len as usize != rows {
        return Err(format!("returned {} rows for a batch of {rows}", col.len));
    }
    let nulls = match col.validity {
        Some(bits) => {
            if bits.len() < rows.div_ceil(8) {
                return Err("validity bitmap shorter than the column".into());
            }
            Some(NullBuffer::new(BooleanBuffer::new(Buffer::from_vec(bits), 0, rows)))
        }
        None => None,
    };
    fn fixed<T: ArrowNativeType>(v: Vec<T>, rows: usize) -> Result<ScalarBuffer<T>, String> {
        if v.len() != rows {
            return Err(format!("returned {} values for {rows} rows", v.len()));
        }
        Ok(ScalarBuffer::from(v))
    }
    fn offsets(v: Vec<i32>, rows: usize, data_len: usize) -> Result<OffsetBuffer<i32>, String> {
        if v.len() != rows + 1 || v.first() != Some(&0) {
            return Err("offsets must start at 0 and have one entry per row plus one".into());
        }
        if v.windows(2).any(|w| w[0] > w[1]) || v[rows] as usize > data_len {
            return Err("offsets decrease or point past the data".into());
        }
        Ok(OffsetBuffer::new(ScalarBuffer::from(v)))
    }
    let array: ArrayRef = match (ty, col.values) {
        (UdfType::Boolean, wire::Values::Boolean(bits)) => {
            if bits.len() < rows.div_ceil(8) {
                return Err("boolean buffer shorter than the column".into());
            }
            let values = BooleanBuffer::new(Buffer::from_vec(bits), 0, rows);
            Arc::new(BooleanArray::new(values, nulls))
        }
        (UdfType::Int32, wire::Values::Int32(v)) => {
            Arc::new(Int32Array::new(fixed(v, rows)?, nulls))
        }
        (UdfType::Int64, wire::Values::Int64(v)) => {
            Arc::new(Int64Array::new(fixed(v, rows)?, nulls))
        }
        (UdfType::Float32, wire::Values::Float32(v)) => {
            Arc::new(Float32Array::new(fixed(v, rows)?, nulls))
        }
        (UdfType::Float64, wire::Values::Float64(v)) => {
            Arc::new(Float64Array::new(fixed(v, rows)?, nulls))
        }
        (UdfType::Utf8, wire::Values::Utf8(v)) => {
            let offsets = offsets(v.offsets, rows, v.data.len())?;
            Arc::new(
                StringArray::try_new(offsets, Buffer::from_vec(v.data), nulls)
                    .map_err(|e| e.to_string())?,
            )
        }
        (UdfType::Binary, wire::Values::Binary(v)) => {
            let offsets = offsets(v.offsets, rows, v.data.len())?;
            Arc::new(
                BinaryArray::try_new(offsets, Buffer::from_vec(v.data), nulls)
                    .map_err(|e| e.to_string())?,
            )
        }
        (UdfType::Timestamp, wire::Values::Timestamp(v)) => {
            Arc::new(TimestampMicrosecondArray::new(fixed(v, rows)?, nulls))
        }
        (UdfType::Date, wire::Values::Date(v)) => {
            Arc::new(Date32Array::new(fixed(v, rows)?, nulls))
        }
        (ty, _) => return Err(format!("returned a column that is not {}", ty.sql_name())),
    };
    Ok(array)
}
