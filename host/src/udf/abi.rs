//! How Arrow columns cross the Wasm boundary.
//!
//! # Design, decided by measurement
//!
//! The contract (`wit/udf.wit`) passes each column as Arrow's own buffers expressed as typed WIT
//! lists: an optional validity bitmap, a values list (`list<f64>`, bit-packed booleans, or
//! offsets + bytes for strings). The team's measurements on these machines
//! (`../shared/notes/wasm-toolchain.md`, wasmtime 48, 8192-row batches) put typed lists about 4x
//! ahead of shipping Arrow IPC bytes, which the guest must then decode and re-encode; for cheap
//! functions the cost is copying, so this module copies each buffer exactly once per direction:
//!
//! - **In**: [`WitList`] wraps an Arrow buffer (a refcounted pointer, no copy) and implements
//!   wasmtime's `Lower` by delegating to `[T]`, so the canonical ABI copies the Arrow buffer
//!   *directly into guest memory* (a `memcpy`). Sliced arrays are passed as slices, without
//!   rebasing offsets (the guest handles a non-zero first offset); only validity bitmaps that
//!   start mid-byte are re-packed.
//! - **Out**: [`ArrowOut`] lifts a list with one `memcpy` out of guest memory into a 64-byte
//!   aligned Arrow buffer, which becomes the result array as is. wasmtime's own `Vec<T>` lifting
//!   goes element by element.
//!
//! Measured with `cargo bench -p riffle-tests --bench udf --profile dev -- calls` (2 cores,
//! time per batch, Wasm vs the same Rust function compiled natively in one process, medians
//! of 9 rounds taken in turn; three runs agreed within 3%):
//!
//! | function | rows | wasm | native | ratio |
//! |---|---|---|---|---|
//! | `risk_score` (fraud model: log1p, exp, country lookup on utf8) | 8192 | 533 µs | 457 µs | 1.16x |
//! | `risk_score` | 65536 | 4.30 ms | 3.67 ms | 1.17x |
//! | `x * 2 + 1` (f64) | 1 | 1.47 µs | 0.08 µs | 18x |
//! | `x * 2 + 1` | 1024 | 2.79 µs | 0.71 µs | 4.0x |
//! | `x * 2 + 1` | 8192 | 7.78 µs | 2.04 µs | 3.8x |
//! | `x * 2 + 1` | 65536 | 58 µs | 16 µs | 3.6x |
//!
//! Cold start (load, compile or fetch the cached artifact, describe, first instance): 0.6 ms
//! with the cache, 120-140 ms without.
//!
//! Where a call's time goes (`perf` with `RIFFLE_WASM_PERFMAP=1`, and the same runs with
//! epoch interruption switched off):
//!
//! - **CPU-deadline checks.** Cranelift checks the epoch at every function entry and loop
//!   back-edge of the guest (plus a stack-limit check per call). That was a third of
//!   `risk_score`'s Wasm time: with checks off it ran at 1.09x native, not 1.50x. Two changes
//!   took most of it back without giving up the deadline: the fraud model looks a country up by
//!   index instead of searching a list per row (1.50x -> 1.36x; its native build got 21% faster
//!   as well), and guests are built with a higher inlining threshold (`scripts/build-udfs.sh`),
//!   so `exp`/`log1p` no longer cost a checked call per row (-> 1.17x; 0.99x with checks off).
//!   UDF authors pay the same per iteration of a per-row loop, so a loop-free inner function is
//!   worth more in the sandbox than natively.
//! - **Copies, for cheap functions.** For `x * 2 + 1` at 8192 rows the time splits about evenly
//!   between the guest's loop (128-bit SIMD, 16 values per epoch check), the two `memcpy`s
//!   (argument in, result out) and the fixed cost of a call (~1.45 µs: lowering with guest
//!   `realloc` calls, trap handler setup, post-return, the instance pool, three clock reads).
//!   The bench's "2 copies" row runs the native loop between the same two copies: 2.2x native
//!   at 8192 rows before any sandbox cost, so a copying ABI cannot reach 2.5x there. Writing
//!   the result in place over the argument measured no faster natively (same bytes moved);
//!   sharing Arrow buffers with the guest without copying is the design that could.
//!
//! For `x * 2 + 1` the first design measured 17.8 µs at 8192 rows (11x). Profiling showed two
//! fixes: the guest's vectorised loop ran one 128-bit vector per iteration, paying Cranelift's
//! per-iteration epoch check every two values (fixed by `-force-vector-interleave=8` in
//! `scripts/build-udfs.sh`: 17.8 -> 9.2 µs), and wasmtime's element-wise list lifting (fixed by
//! [`ArrowOut`]).

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
use wasmtime::ValRaw;
use wasmtime::component::__internal::{
    CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext, LowerContext,
};
use wasmtime::component::{ComponentType, Lift, Lower};

use super::bindings::riffle::udf::types as wire;

#[cfg(target_endian = "big")]
compile_error!(
    "the Riffle UDF ABI copies little-endian Wasm buffers verbatim: little-endian hosts only"
);

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

impl<T: ArrowNativeType> WitList<T> {
    pub(crate) fn new(values: ScalarBuffer<T>) -> Self {
        WitList(values)
    }
}

/// `ComponentType` for a newtype that crosses the boundary exactly as `list<T>` does.
macro_rules! list_component_type {
    ($($name:ident),*) => {$(
        // SAFETY: every item delegates to the implementation for `[T]`; the newtype is lowered
        // and lifted as the same pointer/length pair.
        unsafe impl<T> ComponentType for $name<T>
        where
            T: ComponentType + ArrowNativeType,
        {
            type Lower = <[T] as ComponentType>::Lower;
            const ABI: CanonicalAbiInfo = <[T] as ComponentType>::ABI;

            fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
                <[T] as ComponentType>::typecheck(ty, types)
            }
        }
    )*};
}

list_component_type!(WitList, ArrowOut);

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

/// A WIT `list<T>` returned by the guest, copied once out of guest memory into a 64-byte
/// aligned Arrow buffer (wasmtime's own `Vec<T>` lifting goes element by element, which
/// measured slower than the rest of a cheap call put together).
pub(crate) struct ArrowOut<T: ArrowNativeType> {
    buffer: Buffer,
    len: usize,
    _type: std::marker::PhantomData<T>,
}

impl<T: ArrowNativeType> ArrowOut<T> {
    /// Validates a (pointer, length) pair as wasmtime's `WasmList` does and copies the bytes.
    fn copy(cx: &LiftContext<'_>, ptr: u32, len: u32) -> wasmtime::Result<Self> {
        let (ptr, len) = (ptr as usize, len as usize);
        let size = std::mem::size_of::<T>();
        let bytes = len
            .checked_mul(size)
            .and_then(|n| Some((n, ptr.checked_add(n)?)))
            .filter(|(_, end)| *end <= cx.memory().len());
        let Some((n, end)) = bytes else {
            wasmtime::bail!("list pointer/length out of bounds of memory");
        };
        if ptr % size != 0 {
            wasmtime::bail!("list pointer is not aligned");
        }
        Ok(ArrowOut {
            buffer: Buffer::from_slice_ref(&cx.memory()[ptr..end][..n]),
            len,
            _type: std::marker::PhantomData,
        })
    }

    pub(crate) fn into_scalar(self) -> ScalarBuffer<T> {
        ScalarBuffer::new(self.buffer, 0, self.len)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

// SAFETY: reads the same pointer/length pair wasmtime's list lifting reads, with the same checks.
unsafe impl<T> Lift for ArrowOut<T>
where
    T: Lift + ArrowNativeType,
{
    fn linear_lift_from_flat(
        cx: &mut LiftContext<'_>,
        _ty: InterfaceType,
        src: &Self::Lower,
    ) -> wasmtime::Result<Self> {
        let [ptr, len]: &[ValRaw; 2] = src;
        Self::copy(cx, ptr.get_u32(), len.get_u32())
    }

    fn linear_lift_from_memory(
        cx: &mut LiftContext<'_>,
        _ty: InterfaceType,
        bytes: &[u8],
    ) -> wasmtime::Result<Self> {
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        Self::copy(cx, word(0), word(4))
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

/// Declares a Rust mirror of `variant values`, whose cases must follow the WIT order; one
/// definition serves both directions so they cannot drift apart.
macro_rules! wit_values {
    ($(#[$meta:meta])* $name:ident, $derive:ident, $list:ident, $var_len:ident) => {
        $(#[$meta])*
        #[derive(ComponentType, $derive)]
        #[component(variant)]
        pub(crate) enum $name {
            #[component(name = "boolean")]
            Boolean($list<u8>),
            #[component(name = "int32")]
            Int32($list<i32>),
            #[component(name = "int64")]
            Int64($list<i64>),
            #[component(name = "float32")]
            Float32($list<f32>),
            #[component(name = "float64")]
            Float64($list<f64>),
            #[component(name = "utf8")]
            Utf8($var_len),
            #[component(name = "binary")]
            Binary($var_len),
            #[component(name = "timestamp")]
            Timestamp($list<i64>),
            #[component(name = "date")]
            Date($list<i32>),
        }
    };
}

wit_values!(
    /// `variant values` of the contract, lowered from Arrow.
    ValuesIn, Lower, WitList, VarLenIn
);
wit_values!(
    /// `variant values` of the contract, lifted into Arrow buffers.
    ValuesOut, Lift, ArrowOut, VarLenOut
);

/// `record column` of the contract, lifted into Arrow buffers.
#[derive(ComponentType, Lift)]
#[component(record)]
pub(crate) struct ColumnOut {
    len: u32,
    validity: Option<ArrowOut<u8>>,
    values: ValuesOut,
}

/// `record var-len`, lifted.
#[derive(ComponentType, Lift)]
#[component(record)]
pub(crate) struct VarLenOut {
    offsets: ArrowOut<i32>,
    data: ArrowOut<u8>,
}

/// `record row-error`, lifted.
#[derive(ComponentType, Lift)]
#[component(record)]
pub(crate) struct RowErrorOut {
    pub(crate) row: u32,
    pub(crate) message: String,
}

/// `record call-output`, lifted.
#[derive(ComponentType, Lift)]
#[component(record)]
pub(crate) struct CallOutputOut {
    pub(crate) column: ColumnOut,
    #[component(name = "row-errors")]
    pub(crate) row_errors: Vec<RowErrorOut>,
}

/// `variant call-error`, lifted.
#[derive(ComponentType, Lift)]
#[component(variant)]
pub(crate) enum CallErrorOut {
    #[component(name = "no-such-function")]
    NoSuchFunction(u32),
    #[component(name = "bad-arguments")]
    BadArguments(String),
    #[component(name = "failed")]
    Failed(String),
}

/// A bitmap starting at bit 0, as the contract wants: a zero-copy slice when the Arrow bitmap
/// starts on a byte boundary, a re-packed copy otherwise.
fn bitmap(bits: &BooleanBuffer) -> WitList<u8> {
    let bytes = bits.len().div_ceil(8);
    if bits.offset().is_multiple_of(8) {
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
        (UdfType::Float32, DataType::Float32) => ValuesIn::Float32(WitList(
            array.as_primitive::<Float32Type>().values().clone(),
        )),
        (UdfType::Float64, DataType::Float64) => ValuesIn::Float64(WitList(
            array.as_primitive::<Float64Type>().values().clone(),
        )),
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
/// could get wrong: the type, the length, the bitmap and offsets. Buffers were copied once, out
/// of guest memory, by [`ArrowOut`]; nothing is copied here.
pub(crate) fn lift_column(col: ColumnOut, ty: UdfType, rows: usize) -> Result<ArrayRef, String> {
    if col.len as usize != rows {
        return Err(format!("returned {} rows for a batch of {rows}", col.len));
    }
    let bitmap = |bits: ArrowOut<u8>, what: &str| {
        if bits.len() < rows.div_ceil(8) {
            return Err(format!("{what} shorter than the column"));
        }
        Ok(BooleanBuffer::new(bits.buffer, 0, rows))
    };
    let nulls = match col.validity {
        Some(bits) => Some(NullBuffer::new(bitmap(bits, "validity bitmap")?)),
        None => None,
    };
    fn fixed<T: ArrowNativeType>(v: ArrowOut<T>, rows: usize) -> Result<ScalarBuffer<T>, String> {
        if v.len() != rows {
            return Err(format!("returned {} values for {rows} rows", v.len()));
        }
        Ok(v.into_scalar())
    }
    fn var_len(v: VarLenOut, rows: usize) -> Result<(OffsetBuffer<i32>, Buffer), String> {
        let offsets = v.offsets.into_scalar();
        if offsets.len() != rows + 1 || offsets[0] != 0 {
            return Err("offsets must start at 0 and have one entry per row plus one".into());
        }
        if offsets.windows(2).any(|w| w[0] > w[1]) || offsets[rows] as usize > v.data.len() {
            return Err("offsets decrease or point past the data".into());
        }
        Ok((
            OffsetBuffer::new(offsets),
            v.data.into_scalar().into_inner(),
        ))
    }
    let array: ArrayRef = match (ty, col.values) {
        (UdfType::Boolean, ValuesOut::Boolean(bits)) => {
            Arc::new(BooleanArray::new(bitmap(bits, "boolean buffer")?, nulls))
        }
        (UdfType::Int32, ValuesOut::Int32(v)) => Arc::new(Int32Array::new(fixed(v, rows)?, nulls)),
        (UdfType::Int64, ValuesOut::Int64(v)) => Arc::new(Int64Array::new(fixed(v, rows)?, nulls)),
        (UdfType::Float32, ValuesOut::Float32(v)) => {
            Arc::new(Float32Array::new(fixed(v, rows)?, nulls))
        }
        (UdfType::Float64, ValuesOut::Float64(v)) => {
            Arc::new(Float64Array::new(fixed(v, rows)?, nulls))
        }
        (UdfType::Utf8, ValuesOut::Utf8(v)) => {
            let (offsets, data) = var_len(v, rows)?;
            Arc::new(StringArray::try_new(offsets, data, nulls).map_err(|e| e.to_string())?)
        }
        (UdfType::Binary, ValuesOut::Binary(v)) => {
            let (offsets, data) = var_len(v, rows)?;
            Arc::new(BinaryArray::try_new(offsets, data, nulls).map_err(|e| e.to_string())?)
        }
        (UdfType::Timestamp, ValuesOut::Timestamp(v)) => {
            Arc::new(TimestampMicrosecondArray::new(fixed(v, rows)?, nulls))
        }
        (UdfType::Date, ValuesOut::Date(v)) => Arc::new(Date32Array::new(fixed(v, rows)?, nulls)),
        (ty, _) => return Err(format!("returned a column that is not {}", ty.sql_name())),
    };
    Ok(array)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn out<T: ArrowNativeType>(values: Vec<T>) -> ArrowOut<T> {
        let len = values.len();
        ArrowOut {
            buffer: Buffer::from_vec(values),
            len,
            _type: std::marker::PhantomData,
        }
    }

    const TYPES: [UdfType; 9] = [
        UdfType::Boolean,
        UdfType::Int32,
        UdfType::Int64,
        UdfType::Float32,
        UdfType::Float64,
        UdfType::Utf8,
        UdfType::Binary,
        UdfType::Timestamp,
        UdfType::Date,
    ];

    /// Whatever a guest returns (any variant, lengths, bitmaps, offsets and bytes), lifting
    /// gives an error or a valid array of the batch's length, never a panic.
    fn values(kind: usize, bytes: Vec<u8>, offsets: Vec<i32>) -> ValuesOut {
        let ints = |size: usize| bytes.len() / size;
        match kind {
            0 => ValuesOut::Boolean(out(bytes)),
            1 => ValuesOut::Int32(out(vec![7i32; ints(4)])),
            2 => ValuesOut::Int64(out(vec![-1i64; ints(8)])),
            3 => ValuesOut::Float32(out(vec![f32::NAN; ints(4)])),
            4 => ValuesOut::Float64(out(vec![0.5f64; ints(8)])),
            5 => ValuesOut::Utf8(VarLenOut {
                offsets: out(offsets),
                data: out(bytes),
            }),
            6 => ValuesOut::Binary(VarLenOut {
                offsets: out(offsets),
                data: out(bytes),
            }),
            7 => ValuesOut::Timestamp(out(vec![i64::MIN; ints(8)])),
            _ => ValuesOut::Date(out(vec![i32::MAX; ints(4)])),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        #[test]
        fn lifting_any_guest_output_is_an_error_or_a_valid_column(
            ty in 0usize..9,
            kind in 0usize..9,
            rows in 0usize..20,
            claimed in prop_oneof![Just(None), (0u32..25).prop_map(Some)],
            validity in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4)),
            bytes in proptest::collection::vec(any::<u8>(), 0..80),
            offsets in proptest::collection::vec(-3i32..90, 0..24),
        ) {
            let column = ColumnOut {
                len: claimed.unwrap_or(rows as u32),
                validity: validity.map(out),
                values: values(kind, bytes, offsets),
            };
            if let Ok(array) = lift_column(column, TYPES[ty], rows) {
                prop_assert_eq!(array.len(), rows);
                prop_assert_eq!(array.data_type(), &TYPES[ty].arrow());
                prop_assert!(array.to_data().validate_full().is_ok());
            }
        }
    }
}
