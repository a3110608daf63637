//! A compact little-endian byte encoding for structured state values, and the
//! [`BytesCodec`] that stores such values in one `Binary` column.
//!
//! Values whose shape is not a fixed set of columns (an OVER partition's frame rows, a join
//! key's buffered rows) are encoded as bytes. The format is private to the operator that writes
//! it, versioned by the checkpoint's fingerprint, and checked on read: a truncated or foreign
//! value is an error, never a silent misread.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, NullBufferBuilder};
use arrow::buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, Fields};

use super::{ValueCodec, ValueEncoder};
use crate::error::{Result, RiffleError};

/// Appends a value's bytes.
pub trait Encode {
    /// Appends `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Asks the CPU to bring what `encode` will read outside `self` into cache (see
    /// [`ValueCodec::prefetch`]); nothing by default.
    fn prefetch(&self) {}
}

/// Reads a value back, advancing the input.
pub trait Decode: Sized {
    /// Reads one value from the front of `input`.
    ///
    /// # Errors
    /// Truncated or malformed input.
    fn decode(input: &mut &[u8]) -> Result<Self>;
}

fn truncated() -> RiffleError {
    RiffleError::Checkpoint("a state value is truncated or malformed".into())
}

/// Takes `n` bytes from the front of `input`.
///
/// # Errors
/// Fewer than `n` bytes left.
pub fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if input.len() < n {
        return Err(truncated());
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Ok(head)
}

macro_rules! fixed {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
        impl Decode for $t {
            fn decode(input: &mut &[u8]) -> Result<Self> {
                let bytes = take(input, std::mem::size_of::<$t>())?;
                Ok(<$t>::from_le_bytes(bytes.try_into().expect("sized above")))
            }
        }
    )*};
}
fixed!(u8, i64, f64);

/// Unsigned integers (lengths, counters, row numbers) as LEB128 varints: mostly small, they
/// take one or two bytes instead of eight.
macro_rules! varint {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                let mut v = *self as u64;
                while v >= 0x80 {
                    out.push((v as u8) | 0x80);
                    v >>= 7;
                }
                out.push(v as u8);
            }
        }
        impl Decode for $t {
            fn decode(input: &mut &[u8]) -> Result<Self> {
                let mut v: u64 = 0;
                for shift in (0..64).step_by(7) {
                    let byte = u8::decode(input)?;
                    v |= u64::from(byte & 0x7f) << shift;
                    if byte & 0x80 == 0 {
                        return <$t>::try_from(v).map_err(|_| truncated());
                    }
                }
                Err(truncated())
            }
        }
    )*};
}
varint!(u32, u64);

/// A signed integer as a zigzag varint (0, -1, 1, -2, ... as 0, 1, 2, 3, ...): a small
/// difference of either sign, such as the gap between two event times, takes a few bytes
/// instead of eight. (`i64` itself stays fixed-width: sums and counters use all their bits.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Zigzag(pub i64);

impl Encode for Zigzag {
    fn encode(&self, out: &mut Vec<u8>) {
        (((self.0 << 1) ^ (self.0 >> 63)) as u64).encode(out);
    }
}

impl Decode for Zigzag {
    fn decode(input: &mut &[u8]) -> Result<Self> {
        let v = u64::decode(input)?;
        Ok(Zigzag((v >> 1) as i64 ^ -((v & 1) as i64)))
    }
}

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl Decode for bool {
    fn decode(input: &mut &[u8]) -> Result<Self> {
        match u8::decode(input)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(truncated()),
        }
    }
}

impl Encode for [u8] {
    fn encode(&self, out: &mut Vec<u8>) {
        (self.len() as u32).encode(out);
        out.extend_from_slice(self);
    }
}

impl Encode for Box<[u8]> {
    fn encode(&self, out: &mut Vec<u8>) {
        self.as_ref().encode(out);
    }
}

impl Decode for Box<[u8]> {
    fn decode(input: &mut &[u8]) -> Result<Self> {
        let n = u32::decode(input)? as usize;
        Ok(take(input, n)?.into())
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.encode(out);
            }
        }
    }
}

impl<T: Decode> Decode for Option<T> {
    fn decode(input: &mut &[u8]) -> Result<Self> {
        match u8::decode(input)? {
            0 => Ok(None),
            1 => Ok(Some(T::decode(input)?)),
            _ => Err(truncated()),
        }
    }
}

impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        (self.len() as u32).encode(out);
        for v in self {
            v.encode(out);
        }
    }
}

impl<T: Decode> Decode for Vec<T> {
    fn decode(input: &mut &[u8]) -> Result<Self> {
        let n = u32::decode(input)? as usize;
        // Do not trust a corrupt length for the allocation.
        let mut out = Vec::with_capacity(n.min(input.len()));
        for _ in 0..n {
            out.push(T::decode(input)?);
        }
        Ok(out)
    }
}

impl<T: Encode> Encode for std::collections::VecDeque<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        (self.len() as u32).encode(out);
        for v in self {
            v.encode(out);
        }
    }
}

impl<T: Decode> Decode for std::collections::VecDeque<T> {
    fn decode(input: &mut &[u8]) -> Result<Self> {
        Ok(Vec::<T>::decode(input)?.into())
    }
}

/// Encodes values straight into the bytes of a `Binary` column (no copy through a scratch
/// buffer), sized by the average value of the previous batch so that a batch of large values
/// does not grow its buffer by doubling.
struct BytesEncoder<'a, V> {
    bytes: Vec<u8>,
    offsets: Vec<i32>,
    nulls: NullBufferBuilder,
    average: &'a AtomicUsize,
    encode: &'a EncodeFn<V>,
}

impl<V> ValueEncoder<V> for BytesEncoder<'_, V> {
    fn append(&mut self, value: &mut V) -> Result<()> {
        (self.encode)(value, &mut self.bytes);
        let end = i32::try_from(self.bytes.len())
            .map_err(|_| RiffleError::Internal("a batch of state values exceeds 2 GiB".into()))?;
        self.offsets.push(end);
        self.nulls.append_non_null();
        Ok(())
    }

    fn append_null(&mut self) {
        self.offsets
            .push(*self.offsets.last().expect("offsets start at 0"));
        self.nulls.append_null();
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<ArrayRef>> {
        let values = self.offsets.len() - 1;
        if let Some(average) = self.bytes.len().checked_div(values) {
            self.average.store(average + 1, AtomicOrdering::Relaxed);
        }
        let offsets = OffsetBuffer::new(ScalarBuffer::from(self.offsets));
        let array =
            BinaryArray::try_new(offsets, Buffer::from_vec(self.bytes), self.nulls.finish())?;
        Ok(vec![Arc::new(array)])
    }
}

/// How a [`BytesCodec`] writes a value.
type EncodeFn<V> = dyn Fn(&V, &mut Vec<u8>) + Send + Sync;

/// Stores values that implement [`Encode`]/[`Decode`] in one `Binary` column named `value`.
pub struct BytesCodec<V> {
    size: fn(&V) -> usize,
    /// Bytes per value in the last batch encoded.
    average: AtomicUsize,
    encode: Box<EncodeFn<V>>,
    _value: PhantomData<fn() -> V>,
}

impl<V: Encode> BytesCodec<V> {
    /// A codec that counts a value's size as its in-memory struct size.
    pub fn new() -> Self {
        Self::with_size(|_| std::mem::size_of::<V>())
    }

    /// A codec that counts a value's size with `size` (for values that own heap memory).
    pub fn with_size(size: fn(&V) -> usize) -> Self {
        BytesCodec {
            size,
            average: AtomicUsize::new(32),
            encode: Box::new(|value: &V, out: &mut Vec<u8>| value.encode(out)),
            _value: PhantomData,
        }
    }

    /// Writes values with `encode` instead of [`Encode::encode`]: for an operator that can
    /// leave out what it knows it will never read again (the arguments of OVER rows that no
    /// frame reaches any more). Whatever it writes must read back with [`Decode`].
    pub fn encoding_with(
        mut self,
        encode: impl Fn(&V, &mut Vec<u8>) + Send + Sync + 'static,
    ) -> Self {
        self.encode = Box::new(encode);
        self
    }
}

impl<V: Encode> Default for BytesCodec<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Encode + Decode + Send> ValueCodec<V> for BytesCodec<V> {
    fn fields(&self) -> Fields {
        Fields::from(vec![Field::new("value", DataType::Binary, true)])
    }

    fn encoder(&self, capacity: usize) -> Box<dyn ValueEncoder<V> + '_> {
        let mut offsets = Vec::with_capacity(capacity + 1);
        offsets.push(0);
        Box::new(BytesEncoder {
            bytes: Vec::with_capacity(capacity * self.average.load(AtomicOrdering::Relaxed)),
            offsets,
            nulls: NullBufferBuilder::new(capacity),
            average: &self.average,
            encode: &*self.encode,
        })
    }

    fn decode(&self, columns: &[ArrayRef], row: usize) -> Result<V> {
        let column = columns
            .first()
            .and_then(|c| c.as_binary_opt::<i32>())
            .ok_or_else(truncated)?;
        if column.is_null(row) {
            return Err(truncated());
        }
        let mut input = column.value(row);
        let value = V::decode(&mut input)?;
        if !input.is_empty() {
            return Err(truncated());
        }
        Ok(value)
    }

    fn size(&self, value: &V) -> usize {
        (self.size)(value)
    }

    fn prefetch(&self, value: &V) {
        value.prefetch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            v.encode(&mut out);
            assert!(out.len() <= 10);
            let mut input = &out[..];
            assert_eq!(u64::decode(&mut input).unwrap(), v);
            assert!(input.is_empty());
        }
        let mut out = Vec::new();
        (u32::MAX as u64 + 1).encode(&mut out);
        assert!(u32::decode(&mut &out[..]).is_err(), "too large for u32");
    }

    #[test]
    fn zigzag_round_trips_and_keeps_small_differences_short() {
        for (v, len) in [
            (0i64, 1),
            (-1, 1),
            (63, 1),
            (-64, 1),
            (64, 2),
            (1_000_000_000, 5),
            (i64::MAX, 10),
            (i64::MIN, 10),
        ] {
            let mut out = Vec::new();
            Zigzag(v).encode(&mut out);
            assert_eq!(out.len(), len, "{v}");
            let mut input = &out[..];
            assert_eq!(Zigzag::decode(&mut input).unwrap(), Zigzag(v));
            assert!(input.is_empty());
        }
    }

    #[test]
    fn values_round_trip_and_truncation_is_an_error() {
        let value: (Vec<Option<i64>>, Box<[u8]>, f64) = (
            vec![Some(-3), None, Some(i64::MAX)],
            Box::from(&b"key"[..]),
            -0.5,
        );
        let mut out = Vec::new();
        value.0.encode(&mut out);
        value.1.encode(&mut out);
        value.2.encode(&mut out);
        let mut input = &out[..];
        assert_eq!(Vec::<Option<i64>>::decode(&mut input).unwrap(), value.0);
        assert_eq!(Box::<[u8]>::decode(&mut input).unwrap(), value.1);
        assert_eq!(
            f64::decode(&mut input).unwrap().to_bits(),
            value.2.to_bits()
        );
        assert!(input.is_empty());
        for cut in 0..out.len() {
            let mut short = &out[..cut];
            let ok = Vec::<Option<i64>>::decode(&mut short)
                .and_then(|_| Box::<[u8]>::decode(&mut short))
                .and_then(|_| f64::decode(&mut short));
            assert!(ok.is_err(), "cut at {cut} must not decode");
        }
    }
}
