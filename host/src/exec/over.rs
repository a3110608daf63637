//! OVER windows on streams: per-entity features such as `lag(x) OVER (PARTITION BY card ORDER
//! BY ts)` or a one-hour rolling count.
//!
//! A row's value is final once every row of its frame is known. Frames here end at the current
//! row (with its peers) or before it, so that is when the watermark passes the row's event time:
//! rows wait in a [`RowBuffer`] until then, are released in event-time order, and each is
//! emitted once (Flink's row-time OVER aggregation; RisingWave's "emit on window close").
//!
//! Each partition keeps only what its frames still need: the last rows of a `ROWS n PRECEDING`
//! frame or of `lag`, the rows within a `RANGE` interval, a row count for `row_number`, and each
//! aggregate's running state. The values are computed exactly as DataFusion's batch window
//! operators compute them, so a stream and a batch run over the same rows agree bit for bit:
//! the same frame bounds (ROWS by position; RANGE by value, peers included for CURRENT ROW),
//! the same sequence of accumulator steps (add the rows that enter the frame, then subtract the
//! rows that leave it, never resetting a running float sum), and the same arithmetic (a slice of
//! several floats is summed with Arrow's own `sum` kernel, as DataFusion's accumulators do).
//!
//! Wasm aggregates (`riffle:udf@0.2.0`) take the same steps through the module: `update` with
//! the rows entering a frame, `retract` with the rows leaving it, `finish`. Their state per
//! partition is a row of the columns the module declares. A partition's rows depend on each
//! other but partitions do not, so the calls go round by round across partitions (see
//! [`Functions::wasm_column`]): one call per step for many partitions, as the contract wants.

use std::cmp::Ordering;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::new_null_array;
use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, BooleanBuilder, Float64Array, Float64Builder,
    Int64Builder, RecordBatch, StringBuilder, UInt32Array, UInt64Builder,
};
use arrow::buffer::NullBuffer;
use arrow::compute::{cast, concat_batches, interleave, take_record_batch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef, UInt64Type};
use arrow::row::{RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::execution::SessionState;
use datafusion::logical_expr::expr::NullTreatment;
use datafusion::logical_expr::{
    Expr, Window, WindowFrameBound, WindowFrameUnits, WindowFunctionDefinition,
};
use datafusion::physical_plan::PhysicalExpr;
use smallvec::SmallVec;

use super::keys::{KeyEncoder, KeyRoute};
use super::{Operator, Output, Partitioning};
use crate::common::{Watermark, to_micros};
use crate::error::{Result, RiffleError};
use crate::state::bytes::{BytesCodec, Decode, Encode, Zigzag, take};
use crate::state::{EntryId, KeyedTable, RowBuffer, StateTable};
use crate::udf::{AggregateCalls, AggregateStep, WasmAggregateUdf};

fn unsupported(message: impl Into<String>) -> RiffleError {
    RiffleError::Unsupported(message.into())
}

/// One value of a function argument or result, owned: a running MIN/MAX, a `lag` default.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Null,
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
    Str(Box<str>),
    Bytes(Box<[u8]>),
}

impl Value {
    fn cell(&self) -> Cell<'_> {
        match self {
            Value::Null => Cell::Null,
            Value::I64(v) => Cell::I64(*v),
            Value::U64(v) => Cell::U64(*v),
            Value::F64(v) => Cell::F64(*v),
            Value::Bool(v) => Cell::Bool(*v),
            Value::Str(v) => Cell::Str(v.as_bytes()),
            Value::Bytes(v) => Cell::Bytes(v),
        }
    }
}

/// A value read in place, from a kept row of a partition or a column of a batch. Strings are
/// their UTF-8 bytes (which order as the strings do); they are checked when written out.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cell<'a> {
    Null,
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
    Str(&'a [u8]),
    Bytes(&'a [u8]),
}

impl Cell<'_> {
    fn is_null(&self) -> bool {
        matches!(self, Cell::Null)
    }

    /// The order of DataFusion's `ScalarValue` comparisons (floats by `total_cmp`), for
    /// values of one type.
    fn cmp(&self, other: &Cell<'_>) -> Ordering {
        match (self, other) {
            (Cell::I64(a), Cell::I64(b)) => a.cmp(b),
            (Cell::U64(a), Cell::U64(b)) => a.cmp(b),
            (Cell::F64(a), Cell::F64(b)) => a.total_cmp(b),
            (Cell::Bool(a), Cell::Bool(b)) => a.cmp(b),
            (Cell::Str(a), Cell::Str(b)) | (Cell::Bytes(a), Cell::Bytes(b)) => a.cmp(b),
            _ => Ordering::Equal,
        }
    }

    /// A copy that owns its bytes.
    ///
    /// # Errors
    /// A string that is not UTF-8 (only a damaged checkpoint holds one).
    fn to_value(self) -> Result<Value> {
        Ok(match self {
            Cell::Null => Value::Null,
            Cell::I64(v) => Value::I64(v),
            Cell::U64(v) => Value::U64(v),
            Cell::F64(v) => Value::F64(v),
            Cell::Bool(v) => Value::Bool(v),
            Cell::Str(v) => Value::Str(utf8(v)?.into()),
            Cell::Bytes(v) => Value::Bytes(v.into()),
        })
    }
}

fn utf8(bytes: &[u8]) -> Result<&str> {
    std::str::from_utf8(bytes)
        .map_err(|_| RiffleError::Checkpoint("OVER state: a string is not UTF-8".into()))
}

impl Encode for Value {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::Null => out.push(0),
            Value::I64(v) => {
                out.push(1);
                v.encode(out);
            }
            Value::U64(v) => {
                out.push(2);
                v.encode(out);
            }
            Value::F64(v) => {
                out.push(3);
                v.encode(out);
            }
            Value::Bool(v) => {
                out.push(4);
                v.encode(out);
            }
            Value::Str(v) => {
                out.push(5);
                v.as_bytes().encode(out);
            }
            Value::Bytes(v) => {
                out.push(6);
                v.encode(out);
            }
        }
    }
}

impl Decode for Value {
    fn decode(input: &mut &[u8]) -> Result<Self> {
        Ok(match u8::decode(input)? {
            0 => Value::Null,
            1 => Value::I64(i64::decode(input)?),
            2 => Value::U64(u64::decode(input)?),
            3 => Value::F64(f64::decode(input)?),
            4 => Value::Bool(bool::decode(input)?),
            5 => Value::Str(utf8(&Box::<[u8]>::decode(input)?)?.into()),
            6 => Value::Bytes(Box::decode(input)?),
            _ => return Err(RiffleError::Checkpoint("OVER state: unknown value".into())),
        })
    }
}

/// The physical shape of an argument or result: how its Arrow type is read and written back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// Integers, dates, times, timestamps and durations: read as `Int64`, cast back.
    I64,
    U64,
    /// `Float32`/`Float64`: read as `Float64`, cast back.
    F64,
    Bool,
    Str,
    Bytes,
}

impl Shape {
    fn of(data_type: &DataType) -> Option<Shape> {
        use DataType::*;
        Some(match data_type {
            Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | Date32 | Date64
            | Timestamp(..) | Time32(_) | Time64(_) | Duration(_) => Shape::I64,
            UInt64 => Shape::U64,
            Float16 | Float32 | Float64 => Shape::F64,
            Boolean => Shape::Bool,
            Utf8 | LargeUtf8 | Utf8View => Shape::Str,
            Binary | LargeBinary | BinaryView => Shape::Bytes,
            _ => return None,
        })
    }

    /// Values of this shape live in a row's words; strings and bytes live in its blobs.
    fn fixed(self) -> bool {
        !matches!(self, Shape::Str | Shape::Bytes)
    }

    /// A fixed-width value from its word.
    fn cell_of(self, word: u64) -> Cell<'static> {
        match self {
            Shape::I64 => Cell::I64(word as i64),
            Shape::U64 => Cell::U64(word),
            Shape::F64 => Cell::F64(f64::from_bits(word)),
            Shape::Bool => Cell::Bool(word != 0),
            Shape::Str | Shape::Bytes => unreachable!("variable-width values have no word"),
        }
    }

    /// The column `array` in this shape.
    fn read(self, array: &ArrayRef) -> Result<Column> {
        let words = |values: Vec<u64>, nulls: Option<&NullBuffer>| Column {
            shape: self,
            words: values,
            nulls: nulls.cloned(),
            var: None,
        };
        Ok(match self {
            Shape::I64 => {
                let a = cast(array, &DataType::Int64)?;
                let a = a.as_primitive::<Int64Type>();
                words(a.values().iter().map(|&v| v as u64).collect(), a.nulls())
            }
            Shape::U64 => {
                let a = array.as_primitive::<UInt64Type>();
                words(a.values().to_vec(), a.nulls())
            }
            Shape::F64 => {
                let a = cast(array, &DataType::Float64)?;
                let a = a.as_primitive::<Float64Type>();
                words(a.values().iter().map(|v| v.to_bits()).collect(), a.nulls())
            }
            Shape::Bool => {
                let a = array.as_boolean();
                words(a.values().iter().map(u64::from).collect(), a.nulls())
            }
            Shape::Str | Shape::Bytes => {
                let target = if self == Shape::Str {
                    DataType::Utf8
                } else {
                    DataType::Binary
                };
                let a = cast(array, &target)?;
                Column {
                    shape: self,
                    words: Vec::new(),
                    nulls: a.nulls().cloned(),
                    var: Some(a),
                }
            }
        })
    }

    /// A builder of `capacity` results of this shape.
    fn builder(self, capacity: usize) -> Builder {
        match self {
            Shape::I64 => Builder::I64(Int64Builder::with_capacity(capacity)),
            Shape::U64 => Builder::U64(UInt64Builder::with_capacity(capacity)),
            Shape::F64 => Builder::F64(Float64Builder::with_capacity(capacity)),
            Shape::Bool => Builder::Bool(BooleanBuilder::with_capacity(capacity)),
            Shape::Str => Builder::Str(StringBuilder::with_capacity(capacity, capacity * 8)),
            Shape::Bytes => Builder::Bytes(BinaryBuilder::with_capacity(capacity, capacity * 8)),
        }
    }

    fn of_scalar(value: &ScalarValue) -> Result<Value> {
        let array = value.to_array()?;
        let shape = Shape::of(array.data_type())
            .ok_or_else(|| unsupported(format!("OVER: values of type {}", array.data_type())))?;
        shape.read(&array)?.cell(0).to_value()
    }
}

/// Where kept rows hold an argument.
#[derive(Clone, Debug)]
enum Place {
    /// Word `k` after the event time and the NULL mask.
    Word(usize),
    /// Blob `k` of the row.
    Blob(usize),
    /// Nowhere: a literal (such as the `1` of `count(*)`) is the same in every row.
    Constant(Value),
}

/// An argument column of released rows, in the shape kept rows store it.
struct Column {
    shape: Shape,
    /// Fixed-width values as words: integers as they are, floats as their bits, booleans as
    /// 0 or 1 (empty for strings and bytes).
    words: Vec<u64>,
    nulls: Option<NullBuffer>,
    /// Strings (`Utf8`) or bytes (`Binary`).
    var: Option<ArrayRef>,
}

impl Column {
    fn is_null(&self, i: usize) -> bool {
        self.nulls.as_ref().is_some_and(|n| n.is_null(i))
    }

    fn word(&self, i: usize) -> u64 {
        self.words.get(i).copied().unwrap_or(0)
    }

    fn bytes(&self, i: usize) -> &[u8] {
        match &self.var {
            Some(a) if self.shape == Shape::Str => a.as_string::<i32>().value(i).as_bytes(),
            Some(a) => a.as_binary::<i32>().value(i),
            None => &[],
        }
    }

    fn cell(&self, i: usize) -> Cell<'_> {
        if self.is_null(i) {
            Cell::Null
        } else if self.shape.fixed() {
            self.shape.cell_of(self.word(i))
        } else if self.shape == Shape::Str {
            Cell::Str(self.bytes(i))
        } else {
            Cell::Bytes(self.bytes(i))
        }
    }
}

/// Results of one function, built as they are computed.
enum Builder {
    I64(Int64Builder),
    U64(UInt64Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    Str(StringBuilder),
    Bytes(BinaryBuilder),
}

impl Builder {
    fn push(&mut self, cell: Cell<'_>) -> Result<()> {
        match (self, cell) {
            (Builder::I64(b), Cell::Null) => b.append_null(),
            (Builder::U64(b), Cell::Null) => b.append_null(),
            (Builder::F64(b), Cell::Null) => b.append_null(),
            (Builder::Bool(b), Cell::Null) => b.append_null(),
            (Builder::Str(b), Cell::Null) => b.append_null(),
            (Builder::Bytes(b), Cell::Null) => b.append_null(),
            (Builder::I64(b), Cell::I64(v)) => b.append_value(v),
            (Builder::U64(b), Cell::U64(v)) => b.append_value(v),
            (Builder::F64(b), Cell::F64(v)) => b.append_value(v),
            (Builder::Bool(b), Cell::Bool(v)) => b.append_value(v),
            (Builder::Str(b), Cell::Str(v)) => b.append_value(utf8(v)?),
            (Builder::Bytes(b), Cell::Bytes(v)) => b.append_value(v),
            _ => {
                return Err(RiffleError::Internal(
                    "OVER: a value of the wrong type".into(),
                ));
            }
        }
        Ok(())
    }

    fn finish(self, data_type: &DataType) -> Result<ArrayRef> {
        let array: ArrayRef = match self {
            Builder::I64(mut b) => Arc::new(b.finish()),
            Builder::U64(mut b) => Arc::new(b.finish()),
            Builder::F64(mut b) => Arc::new(b.finish()),
            Builder::Bool(mut b) => Arc::new(b.finish()),
            Builder::Str(mut b) => Arc::new(b.finish()),
            Builder::Bytes(mut b) => Arc::new(b.finish()),
        };
        Ok(if array.data_type() == data_type {
            array
        } else {
            cast(&array, data_type)?
        })
    }
}

/// A frame bound, in rows (ROWS) or microseconds of event time (RANGE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bound {
    Unbounded,
    Preceding(i64),
    Current,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Frame {
    rows: bool,
    start: Bound,
    end: Bound,
}

impl Frame {
    /// Frames whose start moves retract rows from a running state (DataFusion's sliding
    /// accumulators); frames from the partition's first row only add (its plain ones).
    fn sliding(&self) -> bool {
        self.start != Bound::Unbounded
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AggOp {
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

#[derive(Clone, Debug)]
enum Kind {
    RowNumber,
    Lag { offset: u64, default: Value },
    Aggregate(AggOp),
    First,
    Last,
    Wasm(Arc<WasmFn>),
}

/// A Wasm aggregate in an OVER window.
struct WasmFn {
    calls: Arc<AggregateCalls>,
    /// Its arguments: indexes into the operator's argument columns, with the Arrow type each
    /// is passed to the guest as.
    args: Vec<(usize, DataType)>,
    /// Encodes a partition's state (one row of the declared state columns) to the bytes the
    /// partition keeps, and back.
    states: RowConverter,
}

impl std::fmt::Debug for WasmFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmFn")
            .field("name", &self.calls.spec().name)
            .finish_non_exhaustive()
    }
}

struct Function {
    kind: Kind,
    /// Index into the operator's argument columns.
    arg: Option<usize>,
    /// Index of its running state in a partition's `states` (functions that read only the
    /// kept rows, `lag` and `row_number`, have none: a million partitions then do not carry
    /// empty states).
    state: usize,
    frame: Frame,
    /// Output type and shape.
    data_type: DataType,
    shape: Shape,
}

impl Function {
    fn has_state(&self) -> bool {
        !matches!(self.kind, Kind::RowNumber | Kind::Lag { .. })
    }
}

/// Running state of one function in one partition: the frame of the last row, and an
/// aggregate's accumulator (mirroring DataFusion's, field for field).
#[derive(Clone, Debug, PartialEq)]
struct FnState {
    start: u64,
    end: u64,
    acc: Acc,
}

#[derive(Clone, Debug, PartialEq)]
enum Acc {
    None,
    Count(i64),
    /// Integer sums wrap; the count tells an empty frame (NULL) from a zero sum.
    SumI {
        sum: i64,
        count: u64,
        set: bool,
    },
    /// A float sum that starts at +0.0 and is never reset (sliding), or starts unset (plain).
    SumF {
        sum: f64,
        count: u64,
        set: bool,
    },
    Avg {
        sum: Option<f64>,
        count: u64,
    },
    /// Plain MIN/MAX: the running extreme.
    Extreme(Value),
    /// A Wasm aggregate's state in Arrow's row format (see [`WasmFn::states`]); `None` until
    /// the partition's first step.
    Wasm(Option<Box<[u8]>>),
}

impl Encode for FnState {
    fn encode(&self, out: &mut Vec<u8>) {
        self.start.encode(out);
        self.end.encode(out);
        match &self.acc {
            Acc::None => out.push(0),
            Acc::Count(c) => {
                out.push(1);
                Zigzag(*c).encode(out);
            }
            Acc::SumI { sum, count, set } => {
                out.push(2);
                sum.encode(out);
                count.encode(out);
                set.encode(out);
            }
            Acc::SumF { sum, count, set } => {
                out.push(3);
                sum.encode(out);
                count.encode(out);
                set.encode(out);
            }
            Acc::Avg { sum, count } => {
                out.push(4);
                sum.encode(out);
                count.encode(out);
            }
            Acc::Extreme(v) => {
                out.push(5);
                v.encode(out);
            }
            Acc::Wasm(state) => {
                out.push(6);
                state.encode(out);
            }
        }
    }
}

impl Decode for FnState {
    fn decode(input: &mut &[u8]) -> Result<Self> {
        let start = u64::decode(input)?;
        let end = u64::decode(input)?;
        let acc = match u8::decode(input)? {
            0 => Acc::None,
            1 => Acc::Count(Zigzag::decode(input)?.0),
            2 => Acc::SumI {
                sum: i64::decode(input)?,
                count: u64::decode(input)?,
                set: bool::decode(input)?,
            },
            3 => Acc::SumF {
                sum: f64::decode(input)?,
                count: u64::decode(input)?,
                set: bool::decode(input)?,
            },
            4 => Acc::Avg {
                sum: Option::decode(input)?,
                count: u64::decode(input)?,
            },
            5 => Acc::Extreme(Value::decode(input)?),
            6 => Acc::Wasm(Option::decode(input)?),
            _ => {
                return Err(RiffleError::Checkpoint(
                    "OVER state: unknown accumulator".into(),
                ));
            }
        };
        Ok(FnState { start, end, acc })
    }
}

/// What a partition keeps: its row count, the rows its frames still reach (which start at row
/// `base` of the partition), and each function's running state.
///
/// Kept rows are fixed-width words in one vector, `words` per row: the event time, a mask of
/// the row's NULL arguments (bit k for argument k), then one word per fixed-width argument
/// (its value's bits; see [`Place`]). Strings, bytes and, when peers need them, the ORDER BY
/// columns after the event time are `blob_width` blobs per row in a second vector. The
/// checkpoint writes only the words functions still reach ([`Partition::encode_reached`]).
///
/// The first [`INLINE_WORDS`] words and [`INLINE_STATES`] states live inside the partition,
/// and so inside its state slot: a million partitions of a row or two each (the per-card
/// features) then cost no allocation each, and processing a row touches one slot rather
/// than a slot, a row vector and a state vector in three places of memory (each a cache
/// miss at a million keys).
#[derive(Clone, Debug, Default)]
struct Partition {
    seen: u64,
    base: u64,
    words: u32,
    blob_width: u32,
    rows: SmallVec<[u64; INLINE_WORDS]>,
    blobs: Vec<Box<[u8]>>,
    states: SmallVec<[FnState; INLINE_STATES]>,
}

/// Words of kept rows held inline: two rows of an event time, a NULL mask and three
/// fixed-width arguments.
const INLINE_WORDS: usize = 10;

/// Most words of a kept row: the event time, the NULL mask (one bit per argument) and 64
/// arguments.
const MAX_WORDS: u32 = 2 + 64;

/// Function states held inline.
const INLINE_STATES: usize = 2;

impl Partition {
    fn ts(&self, row: u64) -> i64 {
        self.rows[(row - self.base) as usize * self.words as usize] as i64
    }

    fn blob(&self, row: u64, k: usize) -> &[u8] {
        &self.blobs[(row - self.base) as usize * self.blob_width as usize + k]
    }

    /// Writes the partition for a checkpoint, leaving out each argument word of the rows that
    /// no function reading it (`readers[k]` for word `k`) can reach any more: the rows an
    /// hour-long `count(*)` keeps need only their event times, not the coordinates `lag`
    /// read from them once.
    ///
    /// Rows are written word by word, and not as they are: the event time as its difference
    /// from the row before (a zigzag varint: a few bytes, as a partition's rows are close in
    /// time), the NULL mask as a varint (one byte), then the argument words each row still
    /// has. Ahead of the rows, one varint per argument word says how many leading rows lack
    /// it (they read back as zero, and nothing reads them). The rows are most of what a
    /// checkpoint writes for an OVER window, every epoch, for every partition that changed.
    fn encode_reached(&self, readers: &[Vec<Reach>], out: &mut Vec<u8>) {
        self.seen.encode(out);
        self.base.encode(out);
        self.words.encode(out);
        self.blob_width.encode(out);
        let words = self.words as usize;
        let kept = self.seen - self.base;
        let mut skips: SmallVec<[u64; 8]> = SmallVec::with_capacity(words - 2);
        for k in 0..words - 2 {
            let skip = readers
                .get(k)
                .and_then(|r| r.iter().map(|r| r.first_row(self)).min())
                .map_or(0, |first| first.saturating_sub(self.base).min(kept));
            skip.encode(out);
            skips.push(skip);
        }
        out.reserve(self.rows.len() * 8);
        let mut previous = 0i64;
        for (r, row) in self.rows.chunks_exact(words).enumerate() {
            let ts = row[0] as i64;
            Zigzag(ts.wrapping_sub(previous)).encode(out);
            previous = ts;
            row[1].encode(out);
            for (w, &skip) in row[2..].iter().zip(&skips) {
                if r as u64 >= skip {
                    out.extend_from_slice(&w.to_le_bytes());
                }
            }
        }
        self.blobs.encode(out);
        (self.states.len() as u32).encode(out);
        for state in &self.states {
            state.encode(out);
        }
    }
}

impl Encode for Partition {
    /// Every word of every row (see [`Partition::encode_reached`], which the operator's
    /// checkpoint uses).
    fn encode(&self, out: &mut Vec<u8>) {
        self.encode_reached(&[], out);
    }

    fn prefetch(&self) {
        if self.rows.spilled() {
            crate::common::memory::prefetch(&self.rows[..]);
        }
    }
}

impl Decode for Partition {
    fn decode(input: &mut &[u8]) -> Result<Self> {
        let malformed = || RiffleError::Checkpoint("OVER state: a partition is malformed".into());
        let seen = u64::decode(input)?;
        let base = u64::decode(input)?;
        let words = u32::decode(input)?;
        let blob_width = u32::decode(input)?;
        let kept = seen.checked_sub(base).ok_or_else(malformed)?;
        if !(2..=MAX_WORDS).contains(&words) || kept > input.len() as u64 {
            return Err(malformed());
        }
        let skips = (0..words - 2)
            .map(|_| match u64::decode(input)? {
                skip if skip <= kept => Ok(skip),
                _ => Err(malformed()),
            })
            .collect::<Result<SmallVec<[u64; 8]>>>()?;
        let mut rows = SmallVec::with_capacity(kept as usize * words as usize);
        let mut previous = 0i64;
        for r in 0..kept {
            let ts = previous.wrapping_add(Zigzag::decode(input)?.0);
            previous = ts;
            rows.push(ts as u64);
            rows.push(u64::decode(input)?);
            for &skip in &skips {
                rows.push(if r >= skip {
                    u64::from_le_bytes(take(input, 8)?.try_into().expect("eight bytes"))
                } else {
                    0
                });
            }
        }
        let p = Partition {
            seen,
            base,
            words,
            blob_width,
            rows,
            blobs: Decode::decode(input)?,
            states: SmallVec::from_vec(Vec::decode(input)?),
        };
        if p.blobs.len() as u64 != kept * u64::from(p.blob_width) {
            return Err(malformed());
        }
        Ok(p)
    }
}

/// Approximate bytes of a partition, in time independent of its rows (blobs count at their
/// slot size only).
fn partition_size(p: &Partition) -> usize {
    let wasm_states: usize = p
        .states
        .iter()
        .map(|s| match &s.acc {
            Acc::Wasm(Some(state)) => state.len(),
            _ => 0,
        })
        .sum();
    // What spilled out of the partition, besides the partition itself.
    let spilled = |spilled: bool, bytes: usize| if spilled { bytes } else { 0 };
    std::mem::size_of::<Partition>()
        + spilled(p.rows.spilled(), p.rows.capacity() * 8)
        + p.blobs.capacity() * 16
        + spilled(
            p.states.spilled(),
            p.states.capacity() * std::mem::size_of::<FnState>(),
        )
        + wasm_states
}

/// The sum Arrow's `sum` kernel gives for `values` (what DataFusion's float accumulators add
/// or subtract per slice), or `None` when every value is NULL.
fn slice_sum(values: impl Iterator<Item = Option<f64>> + Clone) -> Option<f64> {
    let mut it = values.clone();
    match (it.next(), it.next()) {
        (None, _) | (Some(None), None) => None,
        // One value: the kernel's lanes start at +0.0 and add it once.
        (Some(Some(v)), None) => Some(0.0 + v),
        _ => arrow::compute::sum(&values.collect::<Float64Array>()),
    }
}

/// Streaming `... OVER (PARTITION BY ... ORDER BY <event time> ...)`.
pub struct OverWindow {
    partitions_by: KeyEncoder,
    /// The partition key: the `PARTITION BY` expressions.
    route: Option<Arc<KeyRoute>>,
    ts: usize,
    ties: Option<(Vec<Arc<dyn PhysicalExpr>>, RowConverter)>,
    /// Argument expressions; `None` for a literal (see [`Place::Constant`]).
    args: Vec<Option<(Arc<dyn PhysicalExpr>, Shape)>>,
    functions: Functions,
    output_schema: SchemaRef,
    pending: RowBuffer,
    partitions: KeyedTable<Partition>,
    watermark: Watermark,
}

impl OverWindow {
    /// Plans the operator for a logical `Window` whose first ORDER BY is the input's
    /// event-time column `ts`.
    ///
    /// # Errors
    /// [`RiffleError::Unsupported`] for functions, frames or types the stream cannot compute.
    pub fn new(window: &Window, state: &SessionState, ts: usize) -> Result<Self> {
        let schema = window.input.schema();
        let input_width = schema.fields().len();
        let mut partition_by = None;
        let mut order_by = None;
        let mut args: Vec<(Arc<dyn PhysicalExpr>, Shape, Option<Value>)> = Vec::new();
        let mut arg_types: Vec<DataType> = Vec::new();
        let mut arg_exprs: Vec<Expr> = Vec::new();
        let mut functions = Vec::new();
        for (i, expr) in window.window_expr.iter().enumerate() {
            let inner = match expr {
                Expr::Alias(a) => a.expr.as_ref(),
                e => e,
            };
            let Expr::WindowFunction(f) = inner else {
                return Err(RiffleError::Internal(format!("{expr} in a Window node")));
            };
            let p = &f.params;
            if p.filter.is_some() || p.distinct {
                return Err(unsupported(format!(
                    "{expr}: FILTER and DISTINCT in OVER windows on streams"
                )));
            }
            if p.null_treatment == Some(NullTreatment::IgnoreNulls) {
                return Err(unsupported(format!("{expr}: IGNORE NULLS on streams")));
            }
            partition_by.get_or_insert_with(|| p.partition_by.clone());
            order_by.get_or_insert_with(|| p.order_by.clone());
            let name = match &f.fun {
                WindowFunctionDefinition::AggregateUDF(u) => u.name().to_string(),
                WindowFunctionDefinition::WindowUDF(u) => u.name().to_string(),
            };
            let field = window.schema.field(input_width + i);
            let data_type = field.data_type().clone();
            let shape = Shape::of(&data_type)
                .ok_or_else(|| unsupported(format!("{expr}: results of type {data_type}")))?;
            let mut arg = |e: &Expr| -> Result<usize> {
                if let Some(k) = arg_exprs.iter().position(|a| a == e) {
                    return Ok(k);
                }
                let physical = state.create_physical_expr(e.clone(), schema)?;
                let dt = physical.data_type(schema.as_arrow())?;
                let shape = Shape::of(&dt)
                    .ok_or_else(|| unsupported(format!("{expr}: arguments of type {dt}")))?;
                let constant = match e {
                    Expr::Literal(v, _) if !v.is_null() => Some(Shape::of_scalar(v)?),
                    _ => None,
                };
                arg_exprs.push(e.clone());
                args.push((physical, shape, constant));
                arg_types.push(dt);
                Ok(args.len() - 1)
            };
            let frame = frame_of(&p.window_frame, expr)?;
            let literal = |e: Option<&Expr>| -> Option<ScalarValue> {
                match e {
                    Some(Expr::Literal(v, _)) => Some(v.clone()),
                    Some(Expr::Cast(c)) => match c.expr.as_ref() {
                        Expr::Literal(v, _) => v.cast_to(c.field.data_type()).ok(),
                        _ => None,
                    },
                    _ => None,
                }
            };
            let wasm = match &f.fun {
                WindowFunctionDefinition::AggregateUDF(u) => u
                    .inner()
                    .downcast_ref::<WasmAggregateUdf>()
                    .map(|w| w.calls().clone()),
                WindowFunctionDefinition::WindowUDF(_) => None,
            };
            let (kind, arg) = match name.as_str() {
                _ if wasm.is_some() => {
                    let calls = wasm.expect("matched");
                    let spec = calls.spec();
                    if frame.sliding() && !spec.retractable {
                        return Err(unsupported(format!(
                            "{expr}: {} cannot take rows back out of its state (its module \
                             exports no `retract`), so on streams it runs only over frames \
                             that start at UNBOUNDED PRECEDING",
                            spec.name
                        )));
                    }
                    let ks = p.args.iter().map(&mut arg).collect::<Result<Vec<_>>>()?;
                    let states = RowConverter::new(
                        spec.state
                            .iter()
                            .map(|f| SortField::new(f.data_type.arrow()))
                            .collect(),
                    )?;
                    let wasm_args = ks.iter().map(|&k| (k, arg_types[k].clone())).collect();
                    let f = WasmFn {
                        calls,
                        args: wasm_args,
                        states,
                    };
                    (Kind::Wasm(Arc::new(f)), None)
                }
                "row_number" => (Kind::RowNumber, None),
                "lag" => {
                    let x = arg(&p.args[0])?;
                    let offset = match literal(p.args.get(1)) {
                        None if p.args.len() < 2 => 1,
                        Some(v) if !v.is_null() => match v.cast_to(&DataType::Int64)? {
                            ScalarValue::Int64(Some(n)) if n >= 0 => n as u64,
                            _ => {
                                return Err(unsupported(format!(
                                    "{expr}: the offset must be a non-negative integer literal"
                                )));
                            }
                        },
                        Some(_) => 0,
                        None => {
                            return Err(unsupported(format!(
                                "{expr}: the offset must be a literal"
                            )));
                        }
                    };
                    let default = match literal(p.args.get(2)) {
                        None if p.args.len() < 3 => Value::Null,
                        Some(v) if v.is_null() => Value::Null,
                        Some(v) => Shape::of_scalar(&v.cast_to(&data_type)?)?,
                        None => {
                            return Err(unsupported(format!(
                                "{expr}: the default must be a literal"
                            )));
                        }
                    };
                    (Kind::Lag { offset, default }, Some(x))
                }
                "first_value" => (Kind::First, Some(arg(&p.args[0])?)),
                "last_value" => (Kind::Last, Some(arg(&p.args[0])?)),
                "count" | "sum" | "avg" | "mean" | "min" | "max" => {
                    let op = match name.as_str() {
                        "count" => AggOp::Count,
                        "sum" => AggOp::Sum,
                        "avg" | "mean" => AggOp::Avg,
                        "min" => AggOp::Min,
                        _ => AggOp::Max,
                    };
                    if p.args.len() != 1 {
                        return Err(unsupported(format!("{expr}: one argument expected")));
                    }
                    let a = arg(&p.args[0])?;
                    if matches!(op, AggOp::Sum | AggOp::Avg)
                        && !matches!(args[a].1, Shape::I64 | Shape::U64 | Shape::F64)
                    {
                        return Err(unsupported(format!("{expr}: sums of non-numbers")));
                    }
                    (Kind::Aggregate(op), Some(a))
                }
                other => {
                    return Err(unsupported(format!(
                        "{other}() in an OVER window on a stream (supported: row_number, lag, \
                         first_value, last_value, count, sum, avg, min, max and Wasm \
                         aggregates); lead and other functions that look at later rows are not"
                    )));
                }
            };
            let state = functions
                .iter()
                .filter(|f: &&Function| f.has_state())
                .count();
            functions.push(Function {
                kind,
                arg,
                state,
                frame,
                data_type,
                shape,
            });
        }
        let partition_by = partition_by.unwrap_or_default();
        let order_by = order_by.unwrap_or_default();
        let ties = if order_by.len() > 1 {
            let exprs = order_by[1..]
                .iter()
                .map(|s| state.create_physical_expr(s.expr.clone(), schema))
                .collect::<datafusion::common::Result<Vec<_>>>()?;
            let fields = exprs
                .iter()
                .zip(&order_by[1..])
                .map(|(e, s)| {
                    Ok(SortField::new_with_options(
                        e.data_type(schema.as_arrow())?,
                        arrow::compute::SortOptions {
                            descending: !s.asc,
                            nulls_first: s.nulls_first,
                        },
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            Some((exprs, RowConverter::new(fields)?))
        } else {
            None
        };
        if args.len() > MAX_WORDS as usize - 2 {
            return Err(unsupported(
                "OVER windows on streams with more than 64 distinct argument expressions",
            ));
        }
        let input_schema = Arc::new(schema.as_arrow().clone());
        let peers_by_ties = ties.is_some()
            && functions.iter().any(|f| {
                !f.frame.rows && (f.frame.start == Bound::Current || f.frame.end == Bound::Current)
            });
        let functions = Functions::new(
            functions,
            args.iter()
                .map(|(_, shape, c)| (*shape, c.clone()))
                .collect(),
            peers_by_ties,
        );
        let readers = functions.word_readers();
        let partitions_by = KeyEncoder::plan(&partition_by, schema, state)?;
        Ok(OverWindow {
            // Pending rows are input rows: they go where rows of their partition go.
            route: partitions_by.route_with_rows(&["pending"])?,
            partitions_by,
            ts,
            ties,
            functions,
            args: args
                .into_iter()
                .map(|(e, shape, constant)| constant.is_none().then_some((e, shape)))
                .collect(),
            output_schema: Arc::new(window.schema.as_arrow().clone()),
            pending: RowBuffer::new("pending", input_schema, ts),
            partitions: KeyedTable::new(
                "partitions",
                Box::new(
                    BytesCodec::with_size(partition_size)
                        .encoding_with(move |p, out| p.encode_reached(&readers, out)),
                ),
            ),
            watermark: Watermark::NONE,
        })
    }
}

/// An OVER window's functions, with what each partition's state for them looks like.
struct Functions {
    list: Vec<Function>,
    /// Functions with a running state (see [`Function::state`]).
    states: usize,
    /// The shape of each argument and where kept rows hold it.
    args: Vec<(Shape, Place)>,
    /// Words per kept row: event time, NULL mask, one per fixed-width argument.
    words: usize,
    /// Blobs per kept row: one per string or bytes argument, then the ties.
    blob_width: usize,
    /// Some RANGE frame ends (or starts) at the current row's peers and the ORDER BY has
    /// columns after the event time: kept rows need those columns (the last blob) to tell
    /// peers apart.
    peers_by_ties: bool,
}

impl Functions {
    /// For each argument word of a kept row (after the event time and the NULL mask), how
    /// the functions that read it reach rows (see [`Partition::encode_reached`]).
    fn word_readers(&self) -> Vec<Vec<Reach>> {
        let mut readers = vec![Vec::new(); self.words - 2];
        for f in &self.list {
            if let Some(Place::Word(k)) = f.arg.map(|a| &self.args[a].1) {
                readers[*k].push(Reach::of(f));
            }
        }
        readers
    }

    /// Functions over arguments of the given shapes (with the value of each literal one).
    fn new(list: Vec<Function>, args: Vec<(Shape, Option<Value>)>, peers_by_ties: bool) -> Self {
        let (mut words, mut blobs) = (0, 0);
        let args = args
            .into_iter()
            .map(|(shape, constant)| {
                let place = match constant {
                    Some(v) => Place::Constant(v),
                    None if shape.fixed() => {
                        words += 1;
                        Place::Word(words - 1)
                    }
                    None => {
                        blobs += 1;
                        Place::Blob(blobs - 1)
                    }
                };
                (shape, place)
            })
            .collect();
        Functions {
            states: list.iter().filter(|f| f.has_state()).count(),
            list,
            words: 2 + words,
            blob_width: blobs + usize::from(peers_by_ties),
            args,
            peers_by_ties,
        }
    }

    /// Argument `arg` of kept row `row` of `p`.
    fn cell<'p>(&'p self, p: &'p Partition, arg: usize, row: u64) -> Cell<'p> {
        let (shape, place) = &self.args[arg];
        if let Place::Constant(v) = place {
            return v.cell();
        }
        let at = (row - p.base) as usize * self.words;
        if p.rows[at + 1] >> arg & 1 == 1 {
            return Cell::Null;
        }
        match place {
            Place::Word(k) => shape.cell_of(p.rows[at + 2 + k]),
            Place::Blob(k) if *shape == Shape::Str => Cell::Str(p.blob(row, *k)),
            Place::Blob(k) => Cell::Bytes(p.blob(row, *k)),
            Place::Constant(_) => unreachable!("returned above"),
        }
    }

    /// Appends row `i` of the released rows to `p` (`args` as [`OverWindow::args`]: no
    /// column for a literal).
    fn push_row(&self, p: &mut Partition, ts: i64, args: &[Option<Column>], i: usize, tie: &[u8]) {
        p.rows.push(ts as u64);
        let mask_at = p.rows.len();
        p.rows.push(0);
        let mut mask = 0u64;
        for (k, a) in args.iter().enumerate() {
            let Some(a) = a else { continue };
            if a.is_null(i) {
                mask |= 1 << k;
            }
            if a.shape.fixed() {
                p.rows.push(a.word(i));
            }
        }
        p.rows[mask_at] = mask;
        if self.blob_width > 0 {
            for a in args.iter().flatten().filter(|a| !a.shape.fixed()) {
                p.blobs.push(a.bytes(i).into());
            }
            if self.peers_by_ties {
                p.blobs.push(tie.into());
            }
        }
        p.seen += 1;
    }

    /// The full ORDER BY key of two kept rows, compared as (event time, the other ORDER BY
    /// columns).
    fn key_cmp(&self, p: &Partition, a: u64, b: u64) -> Ordering {
        p.ts(a).cmp(&p.ts(b)).then_with(|| {
            if self.peers_by_ties {
                let k = self.blob_width - 1;
                p.blob(a, k).cmp(p.blob(b, k))
            } else {
                Ordering::Equal
            }
        })
    }

    /// Frame `[start, end)` of row `idx` of partition `p`, searching from the previous row's
    /// frame as DataFusion does.
    fn frame(&self, f: &Function, p: &Partition, idx: u64, last: (u64, u64)) -> (u64, u64) {
        let len = p.seen;
        let frame = f.frame;
        if frame.rows {
            let start = match frame.start {
                Bound::Unbounded => 0,
                Bound::Preceding(n) => idx.saturating_sub(n as u64),
                Bound::Current => idx,
            };
            let end = match frame.end {
                Bound::Current => idx + 1,
                Bound::Preceding(m) => {
                    let m = m as u64;
                    if idx >= m { idx - m + 1 } else { 0 }
                }
                Bound::Unbounded => len,
            };
            return (start, end);
        }
        let ts = p.ts(idx);
        // First row at or after `from` for which `before(row)` is false.
        let scan = |from: u64, before: &dyn Fn(u64) -> bool| {
            let mut j = from;
            while j < len && before(j) {
                j += 1;
            }
            j
        };
        let start = match frame.start {
            Bound::Unbounded => 0,
            Bound::Preceding(x) => match ts.checked_sub(x) {
                Some(target) => scan(last.0, &|j| p.ts(j) < target),
                None => last.0,
            },
            Bound::Current => scan(last.0, &|j| self.key_cmp(p, j, idx) == Ordering::Less),
        };
        let end = match frame.end {
            Bound::Current => scan(last.1, &|j| self.key_cmp(p, j, idx) != Ordering::Greater),
            Bound::Preceding(y) => match ts.checked_sub(y) {
                Some(target) => scan(last.1, &|j| p.ts(j) <= target),
                None => last.1,
            },
            Bound::Unbounded => len,
        };
        (start, end)
    }

    /// Computes every function for rows `first..p.seen` of `p` (already appended), pushing
    /// one value per row into each of `out`.
    fn evaluate(&self, p: &mut Partition, first: u64, out: &mut [Builder]) -> Result<()> {
        for idx in first..p.seen {
            for (k, f) in self.list.iter().enumerate() {
                match &f.kind {
                    Kind::RowNumber => out[k].push(Cell::U64(idx + 1))?,
                    Kind::Lag { offset, default } => {
                        let value = if idx >= *offset {
                            self.cell(p, f.arg.expect("lag has an argument"), idx - offset)
                        } else {
                            default.cell()
                        };
                        out[k].push(value)?;
                    }
                    Kind::First | Kind::Last => {
                        let state = &p.states[f.state];
                        let (s, e) = self.frame(f, p, idx, (state.start, state.end));
                        p.states[f.state].start = s;
                        p.states[f.state].end = e;
                        let value = if s >= e {
                            Cell::Null
                        } else {
                            let row = if matches!(f.kind, Kind::First) {
                                s
                            } else {
                                e - 1
                            };
                            self.cell(p, f.arg.expect("an argument"), row)
                        };
                        out[k].push(value)?;
                    }
                    Kind::Aggregate(op) => {
                        let value = self.aggregate(*op, f, p, idx)?;
                        out[k].push(value.cell())?;
                    }
                    // Computed across partitions afterwards (see `wasm_column`).
                    Kind::Wasm(_) => {}
                }
            }
        }
        Ok(())
    }

    /// One step of an aggregate, in DataFusion's order: add the rows entering the frame, then
    /// (sliding frames) subtract the rows leaving it; an empty frame subtracts all of the
    /// previous frame and gives the default.
    fn aggregate(&self, op: AggOp, f: &Function, p: &mut Partition, idx: u64) -> Result<Value> {
        let k = f.state;
        let last = (p.states[k].start, p.states[k].end);
        let cur = self.frame(f, p, idx, last);
        let arg = f.arg.expect("aggregates have an argument");
        let sliding = f.frame.sliding();
        let mut acc = std::mem::replace(&mut p.states[k].acc, Acc::None);
        let kept: &Partition = p;
        let cell = |row: u64| self.cell(kept, arg, row);
        let value = if cur.0 >= cur.1 {
            if sliding && last.1 > last.0 {
                step(&mut acc, op, &cell, last.0, last.1, false)?;
            }
            match op {
                AggOp::Count => Value::I64(0),
                _ => Value::Null,
            }
        } else {
            if cur.1 > last.1 {
                step(&mut acc, op, &cell, last.1, cur.1, true)?;
            }
            if sliding && cur.0 > last.0 {
                step(&mut acc, op, &cell, last.0, cur.0, false)?;
            }
            match op {
                AggOp::Min | AggOp::Max if sliding => {
                    // A sliding MIN/MAX is the extreme of the frame's values (DataFusion's
                    // monotonic deque holds exactly those).
                    let mut best: Option<Cell<'_>> = None;
                    for row in cur.0..cur.1 {
                        let v = cell(row);
                        if v.is_null() {
                            continue;
                        }
                        let better = match &best {
                            None => true,
                            Some(b) => {
                                let o = v.cmp(b);
                                if op == AggOp::Min {
                                    o == Ordering::Less
                                } else {
                                    o == Ordering::Greater
                                }
                            }
                        };
                        if better {
                            best = Some(v);
                        }
                    }
                    best.unwrap_or(Cell::Null).to_value()?
                }
                _ => evaluate(&acc, &f.shape),
            }
        };
        p.states[k] = FnState {
            start: cur.0,
            end: cur.1,
            acc,
        };
        Ok(value)
    }

    /// The values of Wasm aggregate `f` for this epoch's released rows, in output order.
    ///
    /// Each row's state is the previous row's plus the rows entering its frame minus the rows
    /// leaving it, so a partition's rows go one after another; partitions are independent, so
    /// round `r` steps the `r`-th released row of every partition together: an `update` call
    /// with the entering rows of all of them, a `retract` call with the leaving rows, and a
    /// `finish` call for the states whose frame is not empty. An epoch then costs three calls
    /// per round (as many rounds as the most rows one partition released), not three per row.
    /// Every partition's state sees exactly the steps DataFusion's batch window operator
    /// makes for it, in the same order, so both modes agree bit for bit.
    fn wasm_column(
        &self,
        f: &Function,
        w: &WasmFn,
        partitions: &mut KeyedTable<Partition>,
        runs: &[Run],
        n: usize,
    ) -> Result<ArrayRef> {
        let calls = &w.calls;
        let sliding = f.frame.sliding();
        let empty = w.states.convert_columns(&calls.empty_state()?)?;
        let parser = w.states.parser();
        // Row `i` of the output is row `picks[i].1` of `sources[picks[i].0]`; source 0 is the
        // NULL of an empty frame.
        let mut sources: Vec<ArrayRef> = vec![new_null_array(&f.data_type, 1)];
        let mut picks = vec![(0, 0); n];
        let rounds = runs.iter().map(|r| r.len).max().unwrap_or(0);
        for r in 0..rounds {
            let stepping: Vec<&Run> = runs.iter().filter(|run| run.len > r).collect();
            // A bounded number of partitions per call keeps a call's states within the
            // sandbox's memory and time limits however many partitions an epoch touches.
            for active in stepping.chunks(WASM_GROUPS_PER_CALL) {
                let groups = active.len();
                let mut update = ArgRows::new(self, w);
                let mut retract = ArgRows::new(self, w);
                let mut frames = Vec::with_capacity(groups);
                let mut finishing: Vec<u32> = Vec::new();
                let mut states = Vec::with_capacity(groups);
                for (g, run) in active.iter().enumerate() {
                    let p = partitions.value(run.entry);
                    let state = &p.states[f.state];
                    let last = (state.start, state.end);
                    let cur = self.frame(f, p, run.first + r as u64, last);
                    if cur.0 >= cur.1 {
                        // DataFusion keeps a sliding state in step with the last frame.
                        if sliding && last.1 > last.0 {
                            retract.add(g as u32, p, last.0..last.1)?;
                        }
                    } else {
                        if cur.1 > last.1 {
                            update.add(g as u32, p, last.1..cur.1)?;
                        }
                        if sliding && cur.0 > last.0 {
                            retract.add(g as u32, p, last.0..cur.0)?;
                        }
                        finishing.push(g as u32);
                    }
                    frames.push(cur);
                    states.push(match &state.acc {
                        Acc::Wasm(Some(bytes)) => parser.parse(bytes),
                        _ => empty.row(0),
                    });
                }
                let mut columns = w.states.convert_rows(states)?;
                for (step, rows) in [
                    (AggregateStep::Update, update),
                    (AggregateStep::Retract, retract),
                ] {
                    if let Some((group_of, args)) = rows.finish()? {
                        columns = calls.step(step, groups, &columns, &group_of, &args)?;
                    }
                }
                if !finishing.is_empty() {
                    let finished = if finishing.len() == groups {
                        columns.clone()
                    } else {
                        let which = UInt32Array::from(finishing.clone());
                        columns
                            .iter()
                            .map(|c| arrow::compute::take(c, &which, None))
                            .collect::<std::result::Result<_, _>>()?
                    };
                    sources.push(calls.finish(finishing.len(), &finished)?);
                    for (k, &g) in finishing.iter().enumerate() {
                        picks[active[g as usize].at + r] = (sources.len() - 1, k);
                    }
                }
                let rows = w.states.convert_columns(&columns)?;
                for (g, run) in active.iter().enumerate() {
                    let state = &mut partitions.value_mut(run.entry).states[f.state];
                    (state.start, state.end) = frames[g];
                    state.acc = Acc::Wasm(Some(rows.row(g).as_ref().into()));
                }
            }
        }
        let sources: Vec<&dyn Array> = sources.iter().map(|a| a.as_ref()).collect();
        Ok(interleave(&sources, &picks)?)
    }

    fn new_partition(&self) -> Partition {
        Partition {
            words: self.words as u32,
            blob_width: self.blob_width as u32,
            states: {
                let mut states = SmallVec::with_capacity(self.states);
                states.extend(self.list.iter().filter(|f| f.has_state()).map(|f| FnState {
                    start: 0,
                    end: 0,
                    acc: match &f.kind {
                        Kind::Aggregate(AggOp::Count) => Acc::Count(0),
                        Kind::Aggregate(AggOp::Sum) => match f.shape {
                            Shape::F64 => Acc::SumF {
                                sum: 0.0,
                                count: 0,
                                set: false,
                            },
                            _ => Acc::SumI {
                                sum: 0,
                                count: 0,
                                set: false,
                            },
                        },
                        Kind::Aggregate(AggOp::Avg) => Acc::Avg {
                            sum: None,
                            count: 0,
                        },
                        Kind::Aggregate(AggOp::Min | AggOp::Max) => Acc::Extreme(Value::Null),
                        Kind::Wasm(_) => Acc::Wasm(None),
                        _ => Acc::None,
                    },
                }));
                states
            },
            ..Partition::default()
        }
    }

    /// Drops the rows no frame, `lag` or running state of `p` can reach again.
    fn prune(&self, p: &mut Partition) {
        let mut keep_from = p.seen;
        for f in &self.list {
            keep_from = keep_from.min(Reach::of(f).first_row(p));
        }
        if p.base < keep_from {
            let drop = (keep_from - p.base) as usize;
            p.rows.drain(..drop * self.words);
            p.blobs.drain(..drop * self.blob_width);
            p.base = keep_from;
        }
    }
}

/// The first row of a partition a function can still read: rows before it are out of its
/// frames for good (frames only move forward).
#[derive(Clone, Copy, Debug)]
enum Reach {
    /// No kept row (`row_number`).
    Seen,
    /// The row `offset` rows back (`lag`).
    Lag(u64),
    /// Its frame's first row (sliding frames, `first_value`, `last_value`).
    Start(usize),
    /// Its frame's end: a running state that only adds reads only rows not yet added.
    End(usize),
}

impl Reach {
    fn of(f: &Function) -> Reach {
        match &f.kind {
            Kind::RowNumber => Reach::Seen,
            Kind::Lag { offset, .. } => Reach::Lag(*offset),
            Kind::First | Kind::Last => Reach::Start(f.state),
            Kind::Aggregate(_) | Kind::Wasm(_) if f.frame.sliding() => Reach::Start(f.state),
            Kind::Aggregate(_) | Kind::Wasm(_) => Reach::End(f.state),
        }
    }

    fn first_row(self, p: &Partition) -> u64 {
        match self {
            Reach::Seen => p.seen,
            Reach::Lag(offset) => p.seen.saturating_sub(offset),
            Reach::Start(state) => p.states[state].start,
            Reach::End(state) => p.states[state].end,
        }
    }
}

/// How far ahead (in released rows, so about as many partitions) the OVER window prefetches
/// the partitions it will work on next.
const PREFETCH_ROWS: usize = 8;

/// Most partitions whose Wasm aggregate states go into one call.
const WASM_GROUPS_PER_CALL: usize = 4096;

/// The `len` rows partition `entry` released this epoch: its rows `first..`, at output rows
/// `at..`.
struct Run {
    entry: EntryId,
    first: u64,
    at: usize,
    len: usize,
}

/// The argument rows of one step of a Wasm aggregate, for many partitions: the group (index
/// among the step's partitions) of each row, and the argument columns being built.
struct ArgRows<'a> {
    fns: &'a Functions,
    w: &'a WasmFn,
    group_of: Vec<u32>,
    columns: Vec<Builder>,
}

impl<'a> ArgRows<'a> {
    fn new(fns: &'a Functions, w: &'a WasmFn) -> Self {
        ArgRows {
            fns,
            w,
            group_of: Vec::new(),
            columns: w
                .args
                .iter()
                .map(|(k, _)| fns.args[*k].0.builder(16))
                .collect(),
        }
    }

    /// Adds kept rows `rows` of partition `p` to group `g`.
    fn add(&mut self, g: u32, p: &Partition, rows: Range<u64>) -> Result<()> {
        for row in rows {
            self.group_of.push(g);
            for (column, (k, _)) in self.columns.iter_mut().zip(&self.w.args) {
                column.push(self.fns.cell(p, *k, row))?;
            }
        }
        Ok(())
    }

    /// The groups and argument columns, or `None` when no rows go to this step. (Modules
    /// cannot declare aggregates without arguments.)
    fn finish(self) -> Result<Option<(Vec<u32>, Vec<ArrayRef>)>> {
        if self.group_of.is_empty() {
            return Ok(None);
        }
        let args = self
            .columns
            .into_iter()
            .zip(&self.w.args)
            .map(|(c, (_, data_type))| c.finish(data_type))
            .collect::<Result<_>>()?;
        Ok(Some((self.group_of, args)))
    }
}

/// Adds (`add`) or subtracts the rows `from..to` of argument `arg` to an accumulator, as
/// DataFusion's accumulator does with one slice.
fn step<'p>(
    acc: &mut Acc,
    op: AggOp,
    cell: &dyn Fn(u64) -> Cell<'p>,
    from: u64,
    to: u64,
    add: bool,
) -> Result<()> {
    let values = || (from..to).map(cell);
    let non_null = values().filter(|v| !v.is_null()).count() as u64;
    match acc {
        // A Wasm aggregate's steps are calls (see `Functions::wasm_column`).
        Acc::None | Acc::Wasm(_) => {}
        Acc::Count(c) => {
            if add {
                *c += non_null as i64;
            } else {
                *c -= non_null as i64;
            }
        }
        Acc::SumI { sum, count, set } => {
            let mut s: i64 = 0;
            for v in values() {
                match v {
                    Cell::I64(x) => s = s.wrapping_add(x),
                    Cell::U64(x) => s = s.wrapping_add(x as i64),
                    _ => {}
                }
            }
            if non_null > 0 {
                *set = true;
                if add {
                    *sum = sum.wrapping_add(s);
                    *count += non_null;
                } else {
                    *sum = sum.wrapping_sub(s);
                    *count -= non_null;
                }
            }
        }
        Acc::SumF { sum, count, set } => {
            let s = slice_sum(values().map(|v| match v {
                Cell::F64(x) => Some(x),
                _ => None,
            }));
            if add {
                *count += non_null;
                if let Some(s) = s {
                    *sum = if *set { *sum + s } else { 0.0 + s };
                    *set = true;
                }
            } else {
                if let Some(s) = s {
                    *sum -= s;
                }
                *count -= non_null;
            }
        }
        Acc::Avg { sum, count } => {
            let s = slice_sum(values().map(|v| match v {
                Cell::F64(x) => Some(x),
                Cell::I64(x) => Some(x as f64),
                Cell::U64(x) => Some(x as f64),
                _ => None,
            }));
            if add {
                *count += non_null;
                if let Some(s) = s {
                    *sum = Some(sum.unwrap_or(0.0) + s);
                }
            } else {
                *count -= non_null;
                if let Some(s) = s {
                    *sum = Some(sum.unwrap_or(0.0) - s);
                }
            }
        }
        Acc::Extreme(best) => {
            // Plain MIN/MAX only add: keep the old extreme unless a new value is strictly
            // better, as DataFusion's accumulators do.
            if add {
                for v in values().filter(|v| !v.is_null()) {
                    let better = matches!(best, Value::Null) || {
                        let o = v.cmp(&best.cell());
                        if op == AggOp::Min {
                            o == Ordering::Less
                        } else {
                            o == Ordering::Greater
                        }
                    };
                    if better {
                        *best = v.to_value()?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn evaluate(acc: &Acc, shape: &Shape) -> Value {
    match acc {
        Acc::None | Acc::Wasm(_) => Value::Null,
        Acc::Count(c) => Value::I64(*c),
        Acc::SumI { sum, count, set } => {
            // A sliding sum is NULL for a frame without values; a plain one until the first.
            if *count == 0 || !*set {
                Value::Null
            } else if matches!(shape, Shape::U64) {
                Value::U64(*sum as u64)
            } else {
                Value::I64(*sum)
            }
        }
        Acc::SumF { sum, count, set } => {
            if *count == 0 || !*set {
                Value::Null
            } else {
                Value::F64(*sum)
            }
        }
        Acc::Avg { sum, count } => match (sum, *count) {
            (Some(s), c) if c > 0 => Value::F64(s / c as f64),
            _ => Value::Null,
        },
        Acc::Extreme(v) => v.clone(),
    }
}

fn frame_of(frame: &datafusion::logical_expr::WindowFrame, expr: &Expr) -> Result<Frame> {
    let rows = match frame.units {
        WindowFrameUnits::Rows => true,
        WindowFrameUnits::Range => false,
        WindowFrameUnits::Groups => {
            return Err(unsupported(format!("{expr}: GROUPS frames on streams")));
        }
    };
    let bound = |b: &WindowFrameBound, start: bool| -> Result<Bound> {
        Ok(match b {
            WindowFrameBound::CurrentRow => Bound::Current,
            WindowFrameBound::Preceding(v) if v.is_null() => Bound::Unbounded,
            WindowFrameBound::Preceding(v) => {
                let n = if rows {
                    match v {
                        ScalarValue::UInt64(Some(n)) => *n as i64,
                        other => match other.cast_to(&DataType::Int64)? {
                            ScalarValue::Int64(Some(n)) if n >= 0 => n,
                            _ => return Err(unsupported(format!("{expr}: frame offset {v}"))),
                        },
                    }
                } else {
                    range_micros(v).ok_or_else(|| {
                        unsupported(format!(
                            "{expr}: RANGE offset {v} (use an interval of days or less, e.g. \
                             INTERVAL '1' HOUR)"
                        ))
                    })?
                };
                Bound::Preceding(n)
            }
            WindowFrameBound::Following(_) => {
                return Err(unsupported(format!(
                    "{expr}: frames that reach {} rows (FOLLOWING) on streams: a row's value \
                     must be final once the watermark passes it",
                    if start { "later" } else { "following" }
                )));
            }
        })
    };
    let start = bound(&frame.start_bound, true)?;
    let end = bound(&frame.end_bound, false)?;
    if end == Bound::Unbounded {
        return Err(unsupported(format!(
            "{expr}: frames to UNBOUNDED FOLLOWING on streams"
        )));
    }
    Ok(Frame { rows, start, end })
}

fn range_micros(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::IntervalMonthDayNano(Some(i))
            if i.months == 0 && i.nanoseconds % 1000 == 0 =>
        {
            Some(i.days as i64 * 86_400_000_000 + i.nanoseconds / 1000)
        }
        ScalarValue::IntervalDayTime(Some(i)) => {
            Some(i.days as i64 * 86_400_000_000 + i.milliseconds as i64 * 1000)
        }
        _ => None,
    }
}

#[async_trait::async_trait]
impl Operator for OverWindow {
    fn kind(&self) -> &'static str {
        "over"
    }

    async fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Output,
    ) -> Result<()> {
        let ts = to_micros(batch.column(self.ts))?;
        let ts = ts.as_primitive::<Int64Type>();
        // Rows behind the watermark (or without an event time) can no longer be placed in
        // their partitions' order: they are late.
        let on_time: arrow::array::BooleanArray = ts
            .iter()
            .map(|t| Some(t.is_some_and(|t| !self.watermark.is_late(t))))
            .collect();
        let late = batch.num_rows() - on_time.true_count();
        out.late_rows += late as u64;
        let batch = if late > 0 {
            arrow::compute::filter_record_batch(&batch, &on_time)?
        } else {
            batch
        };
        self.pending.push(batch);
        Ok(())
    }

    async fn on_watermark(&mut self, watermark: Watermark, out: &mut Output) -> Result<()> {
        self.watermark = watermark;
        let released = self.pending.release(watermark)?;
        if released.is_empty() {
            return Ok(());
        }
        let batch = concat_batches(&released[0].schema(), &released)?;
        let n = batch.num_rows();
        let keys = self
            .partitions_by
            .encode(&self.partitions_by.evaluate(&batch)?)?;
        let ts = to_micros(batch.column(self.ts))?;
        let ts = ts.as_primitive::<Int64Type>().values().clone();
        let ties = match &self.ties {
            Some((exprs, converter)) => {
                let columns = exprs
                    .iter()
                    .map(|e| e.evaluate(&batch)?.into_array(n))
                    .collect::<datafusion::common::Result<Vec<_>>>()?;
                Some(converter.convert_columns(&columns)?)
            }
            None => None,
        };
        let args = self
            .args
            .iter()
            .map(|a| match a {
                Some((e, shape)) => Ok(Some(shape.read(&e.evaluate(&batch)?.into_array(n)?)?)),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let tie = |i: usize| ties.as_ref().map(|t| t.row(i).data()).unwrap_or(&[]);
        // Each row's partition, looked up once; then the rows grouped by partition in ORDER BY
        // order (the row index breaks remaining ties, as a stable sort would). Sorting entry
        // handles rather than keys keeps the sort to integer compares.
        let fns = &self.functions;
        let mut sorted: Vec<(EntryId, i64, u32)> = self
            .partitions
            .entries_of(n, |i| keys.get(i), || fns.new_partition())
            .into_iter()
            .zip(0..)
            .map(|(entry, i)| (entry, ts[i as usize], i))
            .collect();
        if ties.is_some() {
            sorted.sort_unstable_by(|a, b| {
                (a.0, a.1)
                    .cmp(&(b.0, b.1))
                    .then_with(|| tie(a.2 as usize).cmp(tie(b.2 as usize)))
                    .then(a.2.cmp(&b.2))
            });
        } else {
            sorted.sort_unstable();
        }
        let order: Vec<u32> = sorted.iter().map(|r| r.2).collect();
        let mut values: Vec<Builder> = fns.list.iter().map(|f| f.shape.builder(n)).collect();
        let mut runs = Vec::with_capacity(n);
        let wasm = fns.list.iter().any(|f| matches!(f.kind, Kind::Wasm(_)));
        let mut i = 0;
        while i < n {
            let entry = sorted[i].0;
            // The partitions a few rows on, fetched while this one is worked on: their slots
            // first, then (once those have arrived) the rows they keep on the heap.
            self.partitions
                .prefetch(sorted[(i + PREFETCH_ROWS).min(n - 1)].0);
            self.partitions
                .prefetch_value(sorted[(i + PREFETCH_ROWS / 2).min(n - 1)].0);
            let mut j = i + 1;
            while j < n && sorted[j].0 == entry {
                j += 1;
            }
            let p = self.partitions.value_mut(entry);
            let first = p.seen;
            if j - i > 1 {
                p.rows.reserve((j - i) * fns.words);
            }
            for &row in &order[i..j] {
                let row = row as usize;
                fns.push_row(p, ts[row], &args, row, tie(row));
            }
            fns.evaluate(p, first, &mut values)?;
            if !wasm {
                fns.prune(p);
            }
            runs.push(Run {
                entry,
                first,
                at: i,
                len: j - i,
            });
            i = j;
        }
        let rows = take_record_batch(&batch, &UInt32Array::from(order))?;
        let mut columns = rows.columns().to_vec();
        for (f, v) in fns.list.iter().zip(values) {
            columns.push(match &f.kind {
                Kind::Wasm(w) => fns.wasm_column(f, w, &mut self.partitions, &runs, n)?,
                _ => v.finish(&f.data_type)?,
            });
        }
        // Only now: the Wasm aggregates' steps read rows their frames left this epoch. (Without
        // them each partition was pruned above, while in cache.)
        if wasm {
            for run in &runs {
                fns.prune(self.partitions.value_mut(run.entry));
            }
        }
        out.push(RecordBatch::try_new(self.output_schema.clone(), columns)?);
        Ok(())
    }

    fn partitioning(&self) -> Partitioning {
        Partitioning::by_key(&self.route)
    }

    fn tables(&mut self) -> Vec<&mut dyn StateTable> {
        vec![&mut self.pending, &mut self.partitions]
    }

    fn on_restored(&mut self) -> Result<()> {
        // Partitions decode without knowing the functions; check they fit them (a checkpoint
        // written by an earlier Riffle kept a state for every function).
        let fns = &self.functions;
        if self.partitions.iter().any(|(_, p)| {
            p.states.len() != fns.states
                || p.words as usize != fns.words
                || p.blob_width as usize != fns.blob_width
        }) {
            return Err(RiffleError::Checkpoint(
                "the OVER window's state in this checkpoint does not fit its functions (it was \
                 written by an earlier version of Riffle); start over with a new checkpoint \
                 directory"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::testing::{epoch, find, optimized, transplant};
    use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::logical_expr::LogicalPlan;

    const S: i64 = 1_000_000;

    fn rows(card: &[&str], id: &[i64], ts_s: &[i64], amount: &[f64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("card", DataType::Utf8, false),
            Field::new("id", DataType::Int64, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new("amount", DataType::Float64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(card.to_vec())),
                Arc::new(Int64Array::from(id.to_vec())),
                Arc::new(TimestampMicrosecondArray::from(
                    ts_s.iter().map(|t| t * S).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(amount.to_vec())),
            ],
        )
        .unwrap()
    }

    async fn operator(sql: &str, sample: &RecordBatch) -> (OverWindow, OverWindow) {
        let (plan, state) = optimized(sql, &[("t", sample.clone())]).await;
        let node = find(&plan, &|p| matches!(p, LogicalPlan::Window(_)));
        let LogicalPlan::Window(w) = node else {
            unreachable!()
        };
        let ts = w
            .input
            .schema()
            .index_of_column_by_name(None, "ts")
            .unwrap();
        (
            OverWindow::new(&w, &state, ts).unwrap(),
            OverWindow::new(&w, &state, ts).unwrap(),
        )
    }

    /// (id, the window columns as text) of an output.
    fn results(out: &Output) -> Vec<String> {
        let mut v = Vec::new();
        for b in &out.batches {
            let id = b.column(1).as_primitive::<Int64Type>();
            for r in 0..b.num_rows() {
                let mut line = id.value(r).to_string();
                for c in 4..b.num_columns() {
                    let f = arrow::util::display::ArrayFormatter::try_new(
                        b.column(c).as_ref(),
                        &Default::default(),
                    )
                    .unwrap();
                    line.push_str(&format!(" {}", f.value(r)));
                }
                v.push(line);
            }
        }
        v.sort();
        v
    }

    #[tokio::test]
    async fn range_frames_include_peers_and_wait_for_the_watermark() {
        let all = rows(
            &["a"; 5],
            &[1, 2, 3, 4, 5],
            &[0, 10, 10, 70, 200],
            &[1.0, 2.0, 4.0, 8.0, 16.0],
        );
        let sql = "SELECT card, id, ts, amount, \
                   count(*) OVER (PARTITION BY card ORDER BY ts RANGE BETWEEN INTERVAL '1' MINUTE PRECEDING AND CURRENT ROW) AS c, \
                   sum(amount) OVER (PARTITION BY card ORDER BY ts RANGE BETWEEN INTERVAL '1' MINUTE PRECEDING AND CURRENT ROW) AS s \
                   FROM t";
        let (mut op, mut restarted) = operator(sql, &all).await;
        assert!(
            matches!(op.functions.args[0].1, Place::Constant(Value::I64(1))),
            "count(*) counts a literal, which kept rows do not store"
        );
        assert_eq!(op.functions.words, 3, "event time, NULL mask, amount");
        // Epoch 1, out of order: the watermark (65 s) releases the rows before it; the row at
        // 70 s waits.
        let first = rows(
            &["a"; 4],
            &[4, 1, 3, 2],
            &[70, 0, 10, 10],
            &[8.0, 1.0, 4.0, 2.0],
        );
        let out1 = epoch(&mut op, vec![(0, first)], Watermark(65 * S)).await;
        assert_eq!(results(&out1), ["1 1 1.0", "2 3 7.0", "3 3 7.0"]);
        // A restart from the checkpoint in between changes nothing.
        transplant(&mut op, &mut restarted);
        restarted.watermark = Watermark(65 * S);
        let second = rows(&["a"; 2], &[5, 9], &[200, 30], &[16.0, 99.0]);
        let out2 = epoch(&mut restarted, vec![(0, second)], Watermark::END).await;
        assert_eq!(
            out2.late_rows, 1,
            "the row at 30 s came after the watermark passed it"
        );
        assert_eq!(results(&out2), ["4 3 14.0", "5 1 16.0"]);
        let size = restarted.state_size();
        assert_eq!(size.rows, 1, "one partition, no pending rows");
    }

    #[tokio::test]
    async fn rows_frames_lag_and_row_number_match_datafusion_bit_for_bit() {
        // Amounts whose running sums round: the stream must round exactly as DataFusion does.
        let n = 400;
        let cards: Vec<&str> = (0..n).map(|i| ["a", "b", "c"][i % 3]).collect();
        let ids: Vec<i64> = (0..n as i64).collect();
        let ts: Vec<i64> = (0..n as i64).map(|i| (i * 7919) % 1000).collect();
        let amounts: Vec<f64> = (0..n).map(|i| (i as f64 * 0.1).sin() * 1e6 + 0.1).collect();
        let all = rows(&cards, &ids, &ts, &amounts);
        let w = "PARTITION BY card ORDER BY ts, id";
        let sql = format!(
            "SELECT card, id, ts, amount, \
             lag(amount, 2) OVER ({w}) AS prev2, row_number() OVER ({w}) AS n, \
             sum(amount) OVER ({w} ROWS BETWEEN 3 PRECEDING AND CURRENT ROW) AS s4, \
             avg(amount) OVER ({w} ROWS BETWEEN 5 PRECEDING AND 1 PRECEDING) AS a5, \
             min(amount) OVER ({w} ROWS BETWEEN 2 PRECEDING AND CURRENT ROW) AS lo, \
             last_value(id) OVER ({w} ROWS BETWEEN 2 PRECEDING AND 1 PRECEDING) AS last_id \
             FROM t"
        );
        let sql = sql.as_str();
        // Batch: DataFusion's own window operators.
        let ctx = SessionContext::new();
        ctx.register_batch("t", all.clone()).unwrap();
        let expected = results(&Output {
            batches: ctx.sql(sql).await.unwrap().collect().await.unwrap(),
            late_rows: 0,
        });
        // Stream: ten epochs of rows in event-time order (ties may span epochs), the watermark
        // at the latest event time delivered, a restart after epoch 5.
        let order = arrow::compute::sort_to_indices(all.column(2), None, None).unwrap();
        let sorted = arrow::compute::take_record_batch(&all, &order).unwrap();
        let (mut op, mut restarted) = operator(sql, &all).await;
        let mut got = Vec::new();
        let chunk = |e: usize| sorted.slice(e * 40, 40);
        let mark = |e: usize| {
            if e == 9 {
                Watermark::END
            } else {
                let ts = to_micros(chunk(e).column(2)).unwrap();
                Watermark(arrow::compute::max(ts.as_primitive::<Int64Type>()).unwrap())
            }
        };
        for e in 0..5 {
            got.extend(results(&epoch(&mut op, vec![(0, chunk(e))], mark(e)).await));
        }
        transplant(&mut op, &mut restarted);
        restarted.watermark = mark(4);
        for e in 5..10 {
            got.extend(results(
                &epoch(&mut restarted, vec![(0, chunk(e))], mark(e)).await,
            ));
        }
        got.sort();
        assert_eq!(got.len(), n);
        assert_eq!(got, expected);
    }

    /// A checkpoint leaves out the argument words no function reaches any more (they read
    /// back as zero) and keeps every other word, event time and mask as it was.
    #[test]
    fn checkpoints_leave_out_words_no_function_reaches() {
        let row = |ts: u64, a: u64, b: u64, c: u64| [ts, 0, a, b, c];
        let mut p = Partition {
            seen: 13,
            base: 10,
            words: 5,
            blob_width: 0,
            ..Partition::default()
        };
        for r in [row(100, 1, 2, 3), row(250, 4, 5, 6), row(90, 7, 8, 9)] {
            p.rows.extend(r);
        }
        p.states.push(FnState {
            start: 11,
            end: 13,
            acc: Acc::Count(2),
        });
        // Word a: `lag(a)` (only the last row); word b: a sliding frame from row 11; word c:
        // no reader given (kept whole).
        let readers = vec![vec![Reach::Lag(1)], vec![Reach::Start(0)], vec![]];
        let mut short = Vec::new();
        p.encode_reached(&readers, &mut short);
        let mut full = Vec::new();
        p.encode(&mut full);
        assert_eq!(
            full.len() - short.len(),
            3 * 8,
            "two a's and one b left out"
        );
        let back = Partition::decode(&mut &short[..]).unwrap();
        let expected: Vec<u64> = [row(100, 0, 0, 3), row(250, 0, 5, 6), row(90, 7, 8, 9)].concat();
        assert_eq!(back.rows.to_vec(), expected);
        assert_eq!(
            (back.seen, back.base, back.states),
            (13, 10, p.states.clone())
        );
        let whole = Partition::decode(&mut &full[..]).unwrap();
        assert_eq!(whole.rows, p.rows);
        // Cut anywhere, it is an error, never a misread.
        for cut in 0..short.len() {
            assert!(
                Partition::decode(&mut &short[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    use datafusion::prelude::SessionContext;
}
