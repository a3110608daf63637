//! A quantile sketch as a Wasm aggregate: `dd_quantile(value, q)`.
//!
//! The sketch is DDSketch's (Masson, Rim and Lee, VLDB 2019): values fall into logarithmic
//! buckets whose bounds grow by a factor `GAMMA`, so any quantile is returned within 1 %
//! relative error, and a sketch holds one counter per occupied bucket (a few hundred for
//! amounts spanning cents to millions). Merging two sketches adds their counters, which is
//! exact: the answer depends only on the multiset of values, never on how rows were batched,
//! partitioned or merged. That is why batch (partial and final aggregation across partitions)
//! and stream (one row at a time, restored from checkpoints) give the *same* answer here, bit
//! for bit, where a sketch with randomised compaction (KLL) or order-dependent centroids
//! (t-digest) would not.
//!
//! The buckets are a custom state type, [`Buckets`], stored as one `BYTEA` state column: the
//! SDK's [`StateValue`] trait lets a state field be any type that encodes to a column.

use std::collections::BTreeMap;

use riffle_udf::{
    AggregateState, CallError, Column, DataType, StateValue, aggregate, export_udfs, math,
};

/// Relative accuracy of every quantile.
pub const RELATIVE_ACCURACY: f64 = 0.01;
/// Ratio between consecutive bucket bounds: `(1 + a) / (1 - a)`.
const GAMMA: f64 = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);

/// Bucket counters, by bucket index: values in `(GAMMA^(i-1), GAMMA^i]` count in bucket `i`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets(pub BTreeMap<i32, u64>);

impl Buckets {
    fn add(&mut self, index: i32, n: i64) {
        let count = self.0.entry(index).or_insert(0);
        *count = count.saturating_add_signed(n);
        if *count == 0 {
            self.0.remove(&index);
        }
    }

    /// `(index delta, count)` pairs as LEB128 varints, indices ascending.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 3);
        let mut previous = 0i64;
        for (&index, &count) in &self.0 {
            let delta = i64::from(index) - previous;
            previous = i64::from(index);
            put_varint(&mut out, ((delta << 1) ^ (delta >> 63)) as u64);
            put_varint(&mut out, count);
        }
        out
    }

    fn decode(mut bytes: &[u8]) -> Result<Self, CallError> {
        let mut buckets = BTreeMap::new();
        let mut index = 0i64;
        while !bytes.is_empty() {
            let zigzag = get_varint(&mut bytes)?;
            index += ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
            let count = get_varint(&mut bytes)?;
            let index = i32::try_from(index)
                .map_err(|_| CallError::BadArguments("sketch bucket out of range".into()))?;
            buckets.insert(index, count);
        }
        Ok(Buckets(buckets))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &mut &[u8]) -> Result<u64, CallError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes
            .split_first()
            .ok_or_else(|| CallError::BadArguments("truncated sketch".into()))?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CallError::BadArguments("sketch varint too long".into()))
}

impl StateValue for Buckets {
    const DATA_TYPE: DataType = DataType::Binary;
    const NULLABLE: bool = false;

    fn read_column(col: &Column, rows: usize) -> Result<Vec<Self>, CallError> {
        Vec::<u8>::read_column(col, rows)?
            .iter()
            .map(|b| Buckets::decode(b))
            .collect()
    }

    fn write_column(values: Vec<Self>) -> Column {
        Vec::<u8>::write_column(values.iter().map(Buckets::encode).collect())
    }
}

/// Bucket of a positive value: `ceil(log_GAMMA(v))`, through the SDK's bit-exact libm so the
/// native build and the sandbox put every value in the same bucket.
fn bucket(v: f64) -> i32 {
    math::ceil(math::log(v) / math::log(GAMMA)) as i32
}

/// The value a bucket stands for: the midpoint, in relative terms, of its bounds.
fn bucket_value(index: i32) -> f64 {
    2.0 * math::pow(GAMMA, f64::from(index)) / (GAMMA + 1.0)
}

/// State of `dd_quantile`: positive and negative values by bucket, and the zeros.
#[derive(Clone, Debug, Default, PartialEq, AggregateState)]
pub struct DdQuantile {
    /// The quantile asked for (NULL before the first row).
    q: Option<f64>,
    /// Values equal to zero (or too small to bucket).
    zeros: i64,
    /// Positive values.
    positive: Buckets,
    /// Negative values, by the bucket of their magnitude.
    negative: Buckets,
}

impl DdQuantile {
    fn count(&self) -> u64 {
        self.zeros as u64
            + self.positive.0.values().sum::<u64>()
            + self.negative.0.values().sum::<u64>()
    }

    fn add(&mut self, value: f64, n: i64) {
        // NaN and the infinities have no bucket: skipped, as NULLs are.
        if !value.is_finite() {
            return;
        }
        if value.abs() < f64::MIN_POSITIVE {
            self.zeros += n;
        } else if value > 0.0 {
            self.positive.add(bucket(value), n);
        } else {
            self.negative.add(bucket(-value), n);
        }
    }
}

/// The `q`-quantile (0 to 1) of `value`, within 1 % relative error (DDSketch). `q` must be the
/// same in every row. NULL, NaN and infinite values are skipped; NULL for a group with no
/// values.
#[aggregate]
impl DdQuantile {
    pub fn update(&mut self, value: f64, q: f64) {
        self.q = Some(q);
        self.add(value, 1);
    }

    pub fn retract(&mut self, value: f64, q: f64) {
        self.q = Some(q);
        self.add(value, -1);
    }

    pub fn merge(&mut self, other: Self) {
        self.q = self.q.or(other.q);
        self.zeros += other.zeros;
        for (&i, &n) in &other.positive.0 {
            self.positive.add(i, n as i64);
        }
        for (&i, &n) in &other.negative.0 {
            self.negative.add(i, n as i64);
        }
    }

    pub fn finish(&self) -> Result<Option<f64>, String> {
        let count = self.count();
        let Some(q) = self.q.filter(|_| count > 0) else {
            return Ok(None);
        };
        if !(0.0..=1.0).contains(&q) {
            return Err(format!("quantile {q} is not between 0 and 1"));
        }
        let rank = (q * (count - 1) as f64) as u64;
        let mut seen = 0u64;
        for (&i, &n) in self.negative.0.iter().rev() {
            seen += n;
            if seen > rank {
                return Ok(Some(-bucket_value(i)));
            }
        }
        seen += self.zeros as u64;
        if seen > rank {
            return Ok(Some(0.0));
        }
        for (&i, &n) in &self.positive.0 {
            seen += n;
            if seen > rank {
                return Ok(Some(bucket_value(i)));
            }
        }
        unreachable!("rank {rank} is below the count {count}")
    }
}

export_udfs!(dd_quantile);

#[cfg(test)]
mod tests {
    use super::*;

    fn sketch(values: &[f64]) -> DdQuantile {
        let mut s = DdQuantile::default();
        for v in values {
            s.update(*v, 0.5);
        }
        s
    }

    #[test]
    fn quantiles_are_within_the_relative_accuracy() {
        let values: Vec<f64> = (1..=10_000).map(|i| i as f64 * 0.37).collect();
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 1.0] {
            let mut s = sketch(&values);
            s.q = Some(q);
            let exact = values[(q * (values.len() - 1) as f64) as usize];
            let got = s.finish().unwrap().unwrap();
            assert!(
                (got - exact).abs() <= RELATIVE_ACCURACY * exact,
                "q {q}: {got} vs {exact}"
            );
        }
    }

    #[test]
    fn merging_in_any_split_gives_the_same_sketch() {
        let values: Vec<f64> = (0..500)
            .map(|i| ((i * 7919) % 1000) as f64 - 300.0)
            .collect();
        let whole = sketch(&values);
        for split in [1, 17, 250, 499] {
            let mut a = sketch(&values[split..]);
            a.merge(sketch(&values[..split]));
            assert_eq!(a, whole);
            assert_eq!(a.finish(), whole.finish());
        }
    }

    #[test]
    fn retract_undoes_update_and_state_round_trips() {
        let mut s = sketch(&[1.0, 2.0, 3.0, -4.0, 0.0]);
        let before = s.clone();
        s.update(1e6, 0.5);
        s.retract(1e6, 0.5);
        assert_eq!(s, before);
        let columns = DdQuantile::write_states(vec![s.clone(), DdQuantile::default()]);
        let back = DdQuantile::read_states(&columns, 2).unwrap();
        assert_eq!(back, vec![s, DdQuantile::default()]);
    }
}
