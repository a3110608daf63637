//! Reading argument columns and building result columns.
//!
//! A UDF author never sees this module: the `#[scalar]` attribute generates the loop that reads
//! each argument with an [`Arg`] reader and collects results with [`Output`]. The types are
//! public so that generated code in the author's crate can name them, and so that tests can
//! drive a function's whole batch path natively.
//!
//! Performance matters here because the batch loop runs inside the sandbox: when no argument has
//! a NULL, the generated code takes a fast path that maps `0..rows` straight into a `Vec` (an
//! exact-size iterator, so one allocation and a loop LLVM can vectorise), with no per-row
//! validity checks.

use std::fmt::Display;

use crate::bindings::riffle::udf::types::{
    CallError, CallOutput, Column, DataType, RowError, Values, VarLen,
};

/// A point in time: microseconds since 1970-01-01T00:00:00 UTC (Arrow `Timestamp(Microsecond)`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Microseconds in one second.
    pub const MICROS_PER_SECOND: i64 = 1_000_000;

    /// Whole seconds since the epoch (rounded towards negative infinity).
    pub fn seconds(self) -> i64 {
        self.0.div_euclid(Self::MICROS_PER_SECOND)
    }

    /// Hour of the day (0..24) in UTC.
    pub fn hour_of_day(self) -> u32 {
        (self.seconds().rem_euclid(86_400) / 3_600) as u32
    }
}

/// A calendar day: days since 1970-01-01 (Arrow `Date32`).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date(pub i32);

fn bad(message: impl Into<String>) -> CallError {
    CallError::BadArguments(message.into())
}

#[inline(always)]
fn bit(bits: &[u8], i: usize) -> bool {
    (bits[i >> 3] >> (i & 7)) & 1 == 1
}

/// The validity bitmap of an input column, checked to cover every row.
#[derive(Clone, Copy)]
struct Validity<'a>(Option<&'a [u8]>);

impl<'a> Validity<'a> {
    fn of(col: &'a Column, rows: usize) -> Result<Self, CallError> {
        if col.len as usize != rows {
            return Err(bad(format!(
                "column has {} rows, batch has {rows}",
                col.len
            )));
        }
        match &col.validity {
            Some(bits) if bits.len() < rows.div_ceil(8) => Err(bad("validity bitmap too short")),
            Some(bits) => Ok(Validity(Some(bits))),
            None => Ok(Validity(None)),
        }
    }

    #[inline(always)]
    fn is_valid(&self, i: usize) -> bool {
        self.0.is_none_or(|bits| bit(bits, i))
    }
}

/// A type a `#[scalar]` function can take as an argument.
///
/// Implemented for `bool`, `i32`, `i64`, `f32`, `f64`, `&str`, `&[u8]`, [`Timestamp`], [`Date`],
/// and `Option<T>` of each (which receives NULLs instead of skipping the row).
pub trait Arg<'a>: Sized {
    /// The column type this argument declares.
    const DATA_TYPE: DataType;
    /// Whether the function receives NULLs itself (`Option<T>`).
    const NULLABLE: bool;
    /// Reads values of this type out of a column.
    type Reader: Reader<Item = Self>;
    /// Checks `col` against the declared type and `rows`, and returns a reader over it.
    ///
    /// # Errors
    /// [`CallError::BadArguments`] when the column's type or length does not match.
    fn reader(col: &'a Column, rows: usize) -> Result<Self::Reader, CallError>;
}

/// Row access to one checked argument column.
pub trait Reader {
    /// The argument type produced for each row.
    type Item;
    /// True when some row must be skipped because a non-nullable argument is NULL there.
    fn has_nulls(&self) -> bool;
    /// False when row `i` is NULL and this argument does not accept NULLs.
    fn is_valid(&self, i: usize) -> bool;
    /// The value at row `i`.
    ///
    /// # Safety
    /// `i` must be less than the `rows` the reader was built for (the reader has checked that
    /// its buffers cover that many rows).
    unsafe fn get_unchecked(&self, i: usize) -> Self::Item;
}

/// Reader over a fixed-width column.
pub struct FixedReader<'a, T> {
    values: &'a [T],
    validity: Validity<'a>,
}

impl<T: Copy> Reader for FixedReader<'_, T> {
    type Item = T;
    fn has_nulls(&self) -> bool {
        self.validity.0.is_some()
    }
    #[inline(always)]
    fn is_valid(&self, i: usize) -> bool {
        self.validity.is_valid(i)
    }
    #[inline(always)]
    unsafe fn get_unchecked(&self, i: usize) -> T {
        // SAFETY: `reader` checked `values.len() >= rows` and the caller promises `i < rows`.
        unsafe { *self.values.get_unchecked(i) }
    }
}

fn fixed<'a, T>(
    col: &'a Column,
    rows: usize,
    values: &'a [T],
) -> Result<FixedReader<'a, T>, CallError> {
    let validity = Validity::of(col, rows)?;
    if values.len() < rows {
        return Err(bad("values buffer shorter than the column"));
    }
    Ok(FixedReader { values, validity })
}

macro_rules! fixed_args {
    ($($t:ty => $case:ident, $dt:ident);* $(;)?) => {$(
        impl<'a> Arg<'a> for $t {
            const DATA_TYPE: DataType = DataType::$dt;
            const NULLABLE: bool = false;
            type Reader = FixedReader<'a, $t>;
            fn reader(col: &'a Column, rows: usize) -> Result<Self::Reader, CallError> {
                match &col.values {
                    Values::$case(v) => fixed(col, rows, v),
                    _ => Err(bad(concat!("expected a ", stringify!($dt), " column"))),
                }
            }
        }
    )*};
}

fixed_args! {
    i32 => Int32, Int32;
    i64 => Int64, Int64;
    f32 => Float32, Float32;
    f64 => Float64, Float64;
}

/// Arguments of the `repr(transparent)` wrappers over fixed-width wire types.
macro_rules! wrapper_args {
    ($($t:ident over $inner:ty);* $(;)?) => {$(
        impl<'a> Arg<'a> for $t {
            const DATA_TYPE: DataType = DataType::$t;
            const NULLABLE: bool = false;
            type Reader = FixedReader<'a, $t>;
            fn reader(col: &'a Column, rows: usize) -> Result<Self::Reader, CallError> {
                match &col.values {
                    Values::$t(v) => {
                        let v: &[$inner] = v;
                        // SAFETY: the wrapper is repr(transparent) over the wire type.
                        let v = unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) };
                        fixed(col, rows, v)
                    }
                    _ => Err(bad(concat!("expected a ", stringify!($t), " column"))),
                }
            }
        }
    )*};
}

wrapper_args! {
    Timestamp over i64;
    Date over i32;
}

/// Reader over a bit-packed boolean column.
pub struct BoolReader<'a> {
    bits: &'a [u8],
    validity: Validity<'a>,
}

impl Reader for BoolReader<'_> {
    type Item = bool;
    fn has_nulls(&self) -> bool {
        self.validity.0.is_some()
    }
    #[inline(always)]
    fn is_valid(&self, i: usize) -> bool {
        self.validity.is_valid(i)
    }
    #[inline(always)]
    unsafe fn get_unchecked(&self, i: usize) -> bool {
        bit(self.bits, i)
    }
}

impl<'a> Arg<'a> for bool {
    const DATA_TYPE: DataType = DataType::Boolean;
    const NULLABLE: bool = false;
    type Reader = BoolReader<'a>;
    fn reader(col: &'a Column, rows: usize) -> Result<Self::Reader, CallError> {
        let validity = Validity::of(col, rows)?;
        match &col.values {
            Values::Boolean(bits) if bits.len() >= rows.div_ceil(8) => {
                Ok(BoolReader { bits, validity })
            }
            Values::Boolean(_) => Err(bad("boolean buffer shorter than the column")),
            _ => Err(bad("expected a Boolean column")),
        }
    }
}

/// Reader over a variable-length column; `get_unchecked` yields the raw bytes of a row.
pub struct BytesReader<'a> {
    offsets: &'a [i32],
    data: &'a [u8],
    validity: Validity<'a>,
}

impl<'a> BytesReader<'a> {
    /// Checks offsets once per batch so that per-row access needs no checks: they must be
    /// non-decreasing and stay inside `data` (relative to the first offset).
    fn new(col: &'a Column, rows: usize, v: &'a VarLen) -> Result<Self, CallError> {
        let validity = Validity::of(col, rows)?;
        let offsets = v
            .offsets
            .get(..rows + 1)
            .ok_or_else(|| bad("too few offsets"))?;
        let base = offsets[0];
        let mut prev = base;
        for &o in offsets {
            if o < prev {
                return Err(bad("offsets decrease"));
            }
            prev = o;
        }
        if (prev - base) as usize > v.data.len() {
            return Err(bad("offsets point past the data buffer"));
        }
        Ok(BytesReader {
            offsets,
            data: &v.data,
            validity,
        })
    }

    #[inline(always)]
    unsafe fn bytes(&self, i: usize) -> &'a [u8] {
        // SAFETY: `new` checked that offsets[..=rows] are non-decreasing and in bounds of
        // `data`; the caller promises `i < rows`.
        unsafe {
            let base = *self.offsets.get_unchecked(0);
            let start = (*self.offsets.get_unchecked(i) - base) as usize;
            let end = (*self.offsets.get_unchecked(i + 1) - base) as usize;
            self.data.get_unchecked(start..end)
        }
    }
}

impl<'a> Reader for BytesReader<'a> {
    type Item = &'a [u8];
    fn has_nulls(&self) -> bool {
        self.validity.0.is_some()
    }
    #[inline(always)]
    fn is_valid(&self, i: usize) -> bool {
        self.validity.is_valid(i)
    }
    #[inline(always)]
    unsafe fn get_unchecked(&self, i: usize) -> &'a [u8] {
        unsafe { self.bytes(i) }
    }
}

impl<'a> Arg<'a> for &'a [u8] {
    const DATA_TYPE: DataType = DataType::Binary;
    const NULLABLE: bool = false;
    type Reader = BytesReader<'a>;
    fn reader(col: &'a Column, rows: usize) -> Result<Self::Reader, CallError> {
        match &col.values {
            Values::Binary(v) => BytesReader::new(col, rows, v),
            _ => Err(bad("expected a Binary column")),
        }
    }
}

/// Reader over a UTF-8 column.
pub struct StrReader<'a>(BytesReader<'a>);

impl<'a> Reader for StrReader<'a> {
    type Item = &'a str;
    fn has_nulls(&self) -> bool {
        self.0.has_nulls()
    }
    #[inline(always)]
    fn is_valid(&self, i: usize) -> bool {
        self.0.is_valid(i)
    }
    #[inline(always)]
    unsafe fn get_unchecked(&self, i: usize) -> &'a str {
        // SAFETY: `reader` checked the data is UTF-8 and every offset is a char boundary.
        unsafe { std::str::from_utf8_unchecked(self.0.bytes(i)) }
    }
}

impl<'a> Arg<'a> for &'a str {
    const DATA_TYPE: DataType = DataType::Utf8;
    const NULLABLE: bool = false;
    type Reader = StrReader<'a>;
    fn reader(col: &'a Column, rows: usize) -> Result<Self::Reader, CallError> {
        let Values::Utf8(v) = &col.values else {
            return Err(bad("expected a Utf8 column"));
        };
        let inner = BytesReader::new(col, rows, v)?;
        let base = inner.offsets[0];
        let end = (inner.offsets[rows] - base) as usize;
        let text = std::str::from_utf8(&v.data[..end]).map_err(|e| bad(format!("{e}")))?;
        if !inner
            .offsets
            .iter()
            .all(|&o| text.is_char_boundary((o - base) as usize))
        {
            return Err(bad("an offset splits a UTF-8 character"));
        }
        Ok(StrReader(inner))
    }
}

/// Reader for `Option<T>` arguments: the function sees NULL as `None`.
pub struct OptionReader<R>(R);

impl<R: Reader> Reader for OptionReader<R> {
    type Item = Option<R::Item>;
    fn has_nulls(&self) -> bool {
        false
    }
    #[inline(always)]
    fn is_valid(&self, _i: usize) -> bool {
        true
    }
    #[inline(always)]
    unsafe fn get_unchecked(&self, i: usize) -> Option<R::Item> {
        if self.0.is_valid(i) {
            Some(unsafe { self.0.get_unchecked(i) })
        } else {
            None
        }
    }
}

impl<'a, T: Arg<'a>> Arg<'a> for Option<T> {
    const DATA_TYPE: DataType = T::DATA_TYPE;
    const NULLABLE: bool = true;
    type Reader = OptionReader<T::Reader>;
    fn reader(col: &'a Column, rows: usize) -> Result<Self::Reader, CallError> {
        T::reader(col, rows).map(OptionReader)
    }
}

// ---------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------

/// Validity bits for an output column, one per pushed row.
struct ValidityBuilder {
    bits: Vec<u8>,
    len: usize,
    nulls: usize,
}

impl ValidityBuilder {
    fn with_capacity(rows: usize) -> Self {
        ValidityBuilder {
            bits: Vec::with_capacity(rows.div_ceil(8)),
            len: 0,
            nulls: 0,
        }
    }

    #[inline]
    fn push(&mut self, valid: bool) {
        if self.len.is_multiple_of(8) {
            self.bits.push(0);
        }
        if valid {
            *self.bits.last_mut().expect("pushed above") |= 1 << (self.len % 8);
        } else {
            self.nulls += 1;
        }
        self.len += 1;
    }

    fn finish(self) -> Option<Vec<u8>> {
        (self.nulls > 0).then_some(self.bits)
    }
}

/// A type a `#[scalar]` function can return values of (before `Option`/`Result` wrapping).
pub trait Value: Sized {
    /// The declared column type.
    const DATA_TYPE: DataType;
    /// Accumulates values of this type.
    type Buffer: ValueBuffer<Self>;
    /// Collects a batch with no NULLs: the fast path.
    fn collect_all(values: impl Iterator<Item = Self>) -> Values;
}

/// Growable values buffer of one output column.
pub trait ValueBuffer<V> {
    /// An empty buffer sized for `rows` values.
    fn with_capacity(rows: usize) -> Self;
    /// Appends a value.
    fn push(&mut self, value: V);
    /// Appends a placeholder under a NULL.
    fn push_null(&mut self);
    /// The finished values buffer.
    fn finish(self) -> Values;
}

/// Fixed-width values.
pub struct FixedBuffer<T>(Vec<T>);

/// Bit-packed booleans.
pub struct BoolBuffer {
    bits: Vec<u8>,
    len: usize,
}

/// Variable-length values.
pub struct VarBuffer {
    offsets: Vec<i32>,
    data: Vec<u8>,
}

impl VarBuffer {
    fn push_bytes(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
        let end = i32::try_from(self.data.len())
            .expect("one batch of UDF output exceeds 2 GiB of variable-length data");
        self.offsets.push(end);
    }
}

impl ValueBuffer<bool> for BoolBuffer {
    fn with_capacity(rows: usize) -> Self {
        BoolBuffer {
            bits: Vec::with_capacity(rows.div_ceil(8)),
            len: 0,
        }
    }
    fn push(&mut self, value: bool) {
        if self.len.is_multiple_of(8) {
            self.bits.push(0);
        }
        if value {
            *self.bits.last_mut().expect("pushed above") |= 1 << (self.len % 8);
        }
        self.len += 1;
    }
    fn push_null(&mut self) {
        self.push(false);
    }
    fn finish(self) -> Values {
        Values::Boolean(self.bits)
    }
}

impl Value for bool {
    const DATA_TYPE: DataType = DataType::Boolean;
    type Buffer = BoolBuffer;
    fn collect_all(values: impl Iterator<Item = Self>) -> Values {
        let mut buffer = BoolBuffer::with_capacity(values.size_hint().0);
        values.for_each(|v| buffer.push(v));
        buffer.finish()
    }
}

macro_rules! fixed_values {
    ($($t:ty => $case:ident, $wrap:expr);* $(;)?) => {$(
        impl ValueBuffer<$t> for FixedBuffer<$t> {
            fn with_capacity(rows: usize) -> Self {
                FixedBuffer(Vec::with_capacity(rows))
            }
            #[inline]
            fn push(&mut self, value: $t) {
                self.0.push(value);
            }
            fn push_null(&mut self) {
                self.0.push(<$t>::default());
            }
            fn finish(self) -> Values {
                let wrap: fn(Vec<$t>) -> Values = $wrap;
                wrap(self.0)
            }
        }

        impl Value for $t {
            const DATA_TYPE: DataType = DataType::$case;
            type Buffer = FixedBuffer<$t>;
            #[inline]
            fn collect_all(values: impl Iterator<Item = Self>) -> Values {
                let wrap: fn(Vec<$t>) -> Values = $wrap;
                wrap(values.collect())
            }
        }
    )*};
}

fixed_values! {
    i32 => Int32, Values::Int32;
    i64 => Int64, Values::Int64;
    f32 => Float32, Values::Float32;
    f64 => Float64, Values::Float64;
    // SAFETY (both): repr(transparent) wrappers, so the Vec's layout is that of the inner type.
    Timestamp => Timestamp, |v| Values::Timestamp(transmute_vec(v));
    Date => Date, |v| Values::Date(transmute_vec(v));
}

/// Reinterprets a `Vec` of a `repr(transparent)` wrapper as a `Vec` of its inner type.
fn transmute_vec<T, U>(v: Vec<T>) -> Vec<U> {
    assert!(size_of::<T>() == size_of::<U>() && align_of::<T>() == align_of::<U>());
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same size and alignment (checked), and only used for repr(transparent) wrappers,
    // so every value of T is a valid U.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

macro_rules! var_values {
    ($($t:ty => $case:ident, $bytes:expr);* $(;)?) => {$(
        impl ValueBuffer<$t> for VarBuffer {
            fn with_capacity(rows: usize) -> Self {
                let mut offsets = Vec::with_capacity(rows + 1);
                offsets.push(0);
                VarBuffer { offsets, data: Vec::new() }
            }
            #[inline]
            fn push(&mut self, value: $t) {
                let bytes: fn(&$t) -> &[u8] = $bytes;
                self.push_bytes(bytes(&value));
            }
            fn push_null(&mut self) {
                self.push_bytes(&[]);
            }
            fn finish(self) -> Values {
                Values::$case(VarLen { offsets: self.offsets, data: self.data })
            }
        }

        impl Value for $t {
            const DATA_TYPE: DataType = DataType::$case;
            type Buffer = VarBuffer;
            fn collect_all(values: impl Iterator<Item = Self>) -> Values {
                let mut buffer = <VarBuffer as ValueBuffer<$t>>::with_capacity(values.size_hint().0);
                values.for_each(|v| buffer.push(v));
                ValueBuffer::<$t>::finish(buffer)
            }
        }
    )*};
}

var_values! {
    String => Utf8, |s| s.as_bytes();
    Vec<u8> => Binary, |b| b.as_slice();
}

/// What a `#[scalar]` function may return: a [`Value`] type `T`, `Option<T>` (NULL), or
/// `Result<T, E>` / `Result<Option<T>, E>` where `Err` is a per-row error.
pub trait Output: Sized {
    /// The declared column type.
    const DATA_TYPE: DataType;
    /// Whether the function itself may produce NULL.
    const RETURNS_NULL: bool;
    /// Whether the function may fail for a row.
    const FALLIBLE: bool;
    /// Collects one result per row when no row was skipped.
    fn collect(rows: usize, results: impl Iterator<Item = Self>) -> CallOutput {
        Self::collect_skipping(rows, results.map(Some))
    }
    /// Collects results where `None` marks a row skipped because a non-nullable argument was
    /// NULL (its output is NULL).
    fn collect_skipping(rows: usize, results: impl Iterator<Item = Option<Self>>) -> CallOutput;
}

/// Shared body of every `Output` impl: one pass that tracks validity and row errors.
fn build<V: Value, E: Display>(
    rows: usize,
    results: impl Iterator<Item = Option<Result<Option<V>, E>>>,
) -> CallOutput {
    let mut values = V::Buffer::with_capacity(rows);
    let mut validity = ValidityBuilder::with_capacity(rows);
    let mut row_errors = Vec::new();
    for (row, result) in results.enumerate() {
        match result {
            Some(Ok(Some(v))) => {
                values.push(v);
                validity.push(true);
            }
            Some(Ok(None)) | None => {
                values.push_null();
                validity.push(false);
            }
            Some(Err(e)) => {
                values.push_null();
                validity.push(false);
                row_errors.push(RowError {
                    row: row as u32,
                    message: e.to_string(),
                });
            }
        }
    }
    CallOutput {
        column: Column {
            len: validity.len as u32,
            validity: validity.finish(),
            values: values.finish(),
        },
        row_errors,
    }
}

impl<V: Value> Output for V {
    const DATA_TYPE: DataType = V::DATA_TYPE;
    const RETURNS_NULL: bool = false;
    const FALLIBLE: bool = false;
    #[inline]
    fn collect(rows: usize, results: impl Iterator<Item = Self>) -> CallOutput {
        CallOutput {
            column: Column {
                len: rows as u32,
                validity: None,
                values: V::collect_all(results),
            },
            row_errors: Vec::new(),
        }
    }
    fn collect_skipping(rows: usize, results: impl Iterator<Item = Option<Self>>) -> CallOutput {
        build::<V, std::convert::Infallible>(rows, results.map(|r| r.map(|v| Ok(Some(v)))))
    }
}

impl<V: Value> Output for Option<V> {
    const DATA_TYPE: DataType = V::DATA_TYPE;
    const RETURNS_NULL: bool = true;
    const FALLIBLE: bool = false;
    fn collect_skipping(rows: usize, results: impl Iterator<Item = Option<Self>>) -> CallOutput {
        build::<V, std::convert::Infallible>(rows, results.map(|r| r.map(Ok)))
    }
}

impl<V: Value, E: Display> Output for Result<V, E> {
    const DATA_TYPE: DataType = V::DATA_TYPE;
    const RETURNS_NULL: bool = false;
    const FALLIBLE: bool = true;
    fn collect_skipping(rows: usize, results: impl Iterator<Item = Option<Self>>) -> CallOutput {
        build::<V, E>(rows, results.map(|r| r.map(|r| r.map(Some))))
    }
}

impl<V: Value, E: Display> Output for Result<Option<V>, E> {
    const DATA_TYPE: DataType = V::DATA_TYPE;
    const RETURNS_NULL: bool = true;
    const FALLIBLE: bool = true;
    fn collect_skipping(rows: usize, results: impl Iterator<Item = Option<Self>>) -> CallOutput {
        build::<V, E>(rows, results)
    }
}
