//! Joins of two streams with an event-time range (interval joins).
//!
//! `a JOIN b ON a.k = b.k AND a.ts BETWEEN b.ts - INTERVAL '5' MINUTE AND b.ts + INTERVAL '10'
//! MINUTE`: each side keeps its rows by join key for as long as a row of the other side could
//! still match, which the range and the watermark bound (Spark's and Flink's interval join). A
//! joined row is emitted as soon as its second row arrives; an outer join's unmatched row is
//! emitted with NULLs once the watermark has passed every event time a match could have.
//!
//! The join condition is evaluated as DataFusion evaluates it, on the candidate pairs, except
//! for the range's own conjuncts where the planner found that checking the range on integer
//! microseconds gives the same answer (a fixed offset on microsecond timestamps): those the
//! candidate search decides, without a second evaluation per pair.
//! Output rows may carry event times up to the range's width older than the watermark, so the
//! operator holds its output watermark back by that much (Flink does the same): windows after a
//! join still see every row they should.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, UInt32Array, new_null_array,
};
use arrow::compute::{filter_record_batch, take};
use arrow::datatypes::{Int64Type, SchemaRef};
use arrow::row::{RowConverter, SortField};
use datafusion::common::NullEquality;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, Join, JoinType};
use datafusion::physical_plan::PhysicalExpr;

use super::keys::{InputRoutes, KeyEncoder};
use super::{Operator, Output, Partitioning};
use crate::common::{Watermark, to_micros};
use crate::error::{Result, RiffleError};
use crate::state::bytes::{BytesCodec, Decode, Encode};
use crate::state::{EntryId, KeyedTable, StateTable};

/// The event-time range of an interval join: `right.ts - left.ts` lies in `[lower, upper]`
/// (microseconds) for every matching pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JoinBounds {
    /// The left input's event-time column.
    pub left_ts: usize,
    /// The right input's event-time column.
    pub right_ts: usize,
    /// Smallest `right.ts - left.ts` of a match.
    pub lower: i64,
    /// Largest `right.ts - left.ts` of a match.
    pub upper: i64,
}

impl JoinBounds {
    /// When a row of side `s` with event time `ts` can no longer match: the watermark has
    /// passed the latest event time of a possible partner.
    fn deadline(&self, s: usize, ts: i64) -> i64 {
        if s == 0 {
            ts.saturating_add(self.upper)
        } else {
            ts.saturating_sub(self.lower)
        }
    }

    /// Event times of the other side that can match a row of side `s` at `ts`.
    fn partner_range(&self, s: usize, ts: i64) -> (i64, i64) {
        if s == 0 {
            (ts.saturating_add(self.lower), ts.saturating_add(self.upper))
        } else {
            (ts.saturating_sub(self.upper), ts.saturating_sub(self.lower))
        }
    }
}

/// A buffered row of one side.
#[derive(Clone, Debug)]
struct JoinRow {
    ts: i64,
    matched: bool,
    row: Box<[u8]>,
}

impl Encode for JoinRow {
    fn encode(&self, out: &mut Vec<u8>) {
        self.ts.encode(out);
        self.matched.encode(out);
        self.row.encode(out);
    }
}

impl Decode for JoinRow {
    fn decode(input: &mut &[u8]) -> Result<Self> {
        Ok(JoinRow {
            ts: i64::decode(input)?,
            matched: bool::decode(input)?,
            row: Box::decode(input)?,
        })
    }
}

fn rows_size(rows: &[JoinRow]) -> usize {
    24 + rows.iter().map(|r| r.row.len() + 40).sum::<usize>()
}

struct Side {
    keys: KeyEncoder,
    ts: usize,
    rows: RowConverter,
    schema: SchemaRef,
    /// Unmatched rows of this side are emitted (with NULLs for the other side).
    outer: bool,
    table: KeyedTable<Vec<JoinRow>>,
}

/// Streaming interval join of two streams.
pub struct IntervalJoin {
    sides: [Side; 2],
    /// The partition key: each side's join keys (`None` without equality keys).
    route: Option<Arc<InputRoutes>>,
    bounds: JoinBounds,
    filter: Option<Arc<dyn PhysicalExpr>>,
    null_equals_null: bool,
    output_schema: SchemaRef,
    watermark: Watermark,
}

impl IntervalJoin {
    /// Plans the operator for a logical `Join` of two streams with `bounds`.
    ///
    /// `residual` is the part of the join condition (after the equality keys) the range does
    /// not already decide; `None` when the range and the keys are the whole condition.
    ///
    /// # Errors
    /// [`RiffleError::Unsupported`] for join types other than inner and outer, or columns the
    /// state cannot hold.
    pub fn new(
        join: &Join,
        state: &SessionState,
        bounds: JoinBounds,
        residual: Option<&Expr>,
    ) -> Result<Self> {
        let (left_outer, right_outer) = match join.join_type {
            JoinType::Inner => (false, false),
            JoinType::Left => (true, false),
            JoinType::Right => (false, true),
            JoinType::Full => (true, true),
            other => {
                return Err(RiffleError::Unsupported(format!(
                    "{other} joins of two streams"
                )));
            }
        };
        let side = |plan: &datafusion::logical_expr::LogicalPlan,
                    exprs: Vec<datafusion::logical_expr::Expr>,
                    ts: usize,
                    outer: bool,
                    name: &str|
         -> Result<Side> {
            let schema = Arc::new(plan.schema().as_arrow().clone());
            let rows = RowConverter::new(
                schema
                    .fields()
                    .iter()
                    .map(|f| SortField::new(f.data_type().clone()))
                    .collect(),
            )
            .map_err(|e| {
                RiffleError::Unsupported(format!("a join cannot buffer rows of these types ({e})"))
            })?;
            Ok(Side {
                keys: KeyEncoder::plan(&exprs, plan.schema(), state)?,
                ts,
                rows,
                schema,
                outer,
                table: KeyedTable::new(
                    name,
                    Box::new(BytesCodec::with_size(|rows: &Vec<JoinRow>| rows_size(rows))),
                ),
            })
        };
        let (left_keys, right_keys): (Vec<_>, Vec<_>) = join.on.iter().cloned().unzip();
        let left = side(&join.left, left_keys, bounds.left_ts, left_outer, "left")?;
        let right = side(
            &join.right,
            right_keys,
            bounds.right_ts,
            right_outer,
            "right",
        )?;
        let filter = match residual {
            Some(f) => Some(state.create_physical_expr(f.clone(), &join.schema)?),
            None => None,
        };
        // Rows of both sides with equal keys must meet: with keys of one type on both sides,
        // each side's rows and table route by their own key expressions to the same
        // partition.
        let route = match (left.keys.route()?, right.keys.route()?) {
            (Some(l), Some(r)) if left.keys.types() == right.keys.types() => {
                Some(Arc::new(InputRoutes::new(vec![
                    ("left".to_string(), l),
                    ("right".to_string(), r),
                ])))
            }
            _ => None,
        };
        Ok(IntervalJoin {
            route,
            sides: [left, right],
            bounds,
            filter,
            null_equals_null: join.null_equality == NullEquality::NullEqualsNull,
            output_schema: Arc::new(join.schema.as_arrow().clone()),
            watermark: Watermark::NONE,
        })
    }

    /// Rows of side `s` (given as its columns) with NULLs for the other side.
    fn unmatched(&self, s: usize, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
        let n = columns.first().map(|c| c.len()).unwrap_or(0);
        let other = &self.sides[1 - s].schema;
        let nulls: Vec<ArrayRef> = other
            .fields()
            .iter()
            .map(|f| new_null_array(f.data_type(), n))
            .collect();
        let all = if s == 0 {
            columns.into_iter().chain(nulls).collect()
        } else {
            nulls.into_iter().chain(columns).collect()
        };
        Ok(RecordBatch::try_new(self.output_schema.clone(), all)?)
    }
}

#[async_trait::async_trait]
impl Operator for IntervalJoin {
    fn kind(&self) -> &'static str {
        "interval-join"
    }

    async fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        out: &mut Output,
    ) -> Result<()> {
        let s = input;
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let bounds = self.bounds;
        let [left, right] = &mut self.sides;
        let (side, other) = if s == 0 { (left, right) } else { (right, left) };
        let key_columns = side.keys.evaluate(&batch)?;
        let keys = side.keys.encode(&key_columns)?;
        let ts = to_micros(batch.column(side.ts))?;
        let ts = ts.as_primitive::<Int64Type>();
        let rows = side.rows.convert_columns(batch.columns())?;
        let watermark = self.watermark;
        let nullable_keys =
            !self.null_equals_null && key_columns.iter().any(|c| c.null_count() > 0);

        // Candidate pairs: (row of this batch, stored row of the other side). Each row's key
        // is looked up once, and its entry is then used by handle.
        let mut this_rows: Vec<u32> = Vec::with_capacity(n);
        let mut other_rows: Vec<(EntryId, u32)> = Vec::with_capacity(n);
        let mut unmatched_now: Vec<u32> = Vec::new();
        let mut keep: Vec<u32> = Vec::with_capacity(n);
        for i in 0..n {
            let null_key = nullable_keys && key_columns.iter().any(|c| c.is_null(i));
            if ts.is_null(i) || null_key {
                // Can never match: an outer side's row is final at once.
                if side.outer {
                    unmatched_now.push(i as u32);
                }
                continue;
            }
            keep.push(i as u32);
            let (lo, hi) = bounds.partner_range(s, ts.value(i));
            if let Some(id) = other.table.lookup(keys.get(i)) {
                for (k, r) in other.table.value(id).iter().enumerate() {
                    if r.ts >= lo && r.ts <= hi {
                        this_rows.push(i as u32);
                        other_rows.push((id, k as u32));
                    }
                }
            }
        }

        let mut matched_here = vec![false; n];
        if !this_rows.is_empty() {
            let parser = other.rows.parser();
            let other_columns = other.rows.convert_rows(
                other_rows
                    .iter()
                    .map(|&(id, k)| parser.parse(&other.table.value(id)[k as usize].row)),
            )?;
            let ids = UInt32Array::from(std::mem::take(&mut this_rows));
            let this_columns = batch
                .columns()
                .iter()
                .map(|c| take(c.as_ref(), &ids, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let columns: Vec<ArrayRef> = if s == 0 {
                this_columns.into_iter().chain(other_columns).collect()
            } else {
                other_columns.into_iter().chain(this_columns).collect()
            };
            let joined = RecordBatch::try_new(self.output_schema.clone(), columns)?;
            let mask = match &self.filter {
                Some(f) => {
                    let m = f.evaluate(&joined)?.into_array(joined.num_rows())?;
                    let m = m.as_boolean();
                    // NULL is not a match.
                    Some(BooleanArray::from_iter(
                        m.iter().map(|v| Some(v == Some(true))),
                    ))
                }
                None => None,
            };
            for (p, &(id, k)) in other_rows.iter().enumerate() {
                if mask.as_ref().is_none_or(|m| m.value(p)) {
                    matched_here[ids.value(p) as usize] = true;
                    // Only a stored row's first match changes (and checkpoints) it.
                    if !other.table.value(id)[k as usize].matched {
                        other.table.value_mut(id)[k as usize].matched = true;
                    }
                }
            }
            out.push(match &mask {
                Some(mask) => filter_record_batch(&joined, mask)?,
                None => joined,
            });
        }
        // Keep this batch's rows for the other side's later rows, unless no later row can
        // match them any more (a range entirely behind the watermark): then an outer side's
        // unmatched row is final now.
        for i in keep {
            let t = ts.value(i as usize);
            let deadline = bounds.deadline(s, t);
            if watermark.is_late(deadline) {
                if side.outer && !matched_here[i as usize] {
                    unmatched_now.push(i);
                }
                continue;
            }
            let id = side.table.entry_of(keys.get(i as usize), Vec::new);
            side.table.value_mut(id).push(JoinRow {
                ts: t,
                matched: matched_here[i as usize],
                row: rows.row(i as usize).data().into(),
            });
            side.table.lower_deadline_of(id, deadline);
        }
        if !unmatched_now.is_empty() {
            unmatched_now.sort_unstable();
            let ids = UInt32Array::from(unmatched_now);
            let columns = batch
                .columns()
                .iter()
                .map(|c| take(c.as_ref(), &ids, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            out.push(self.unmatched(s, columns)?);
        }
        Ok(())
    }

    async fn on_watermark(&mut self, watermark: Watermark, out: &mut Output) -> Result<()> {
        self.watermark = watermark;
        let bounds = self.bounds;
        for s in 0..2 {
            let side = &mut self.sides[s];
            let mut expired_unmatched: Vec<Box<[u8]>> = Vec::new();
            for id in side.table.take_due_entries(watermark) {
                // The rows no partner can reach any more go; the entry stays, with the next
                // row's deadline, while rows remain.
                let rows = side.table.value_mut(id);
                for gone in rows.extract_if(.., |r| watermark.is_late(bounds.deadline(s, r.ts))) {
                    if side.outer && !gone.matched {
                        expired_unmatched.push(gone.row);
                    }
                }
                match rows.iter().map(|r| bounds.deadline(s, r.ts)).min() {
                    Some(next) => side.table.set_deadline_of(id, Some(next)),
                    None => {
                        side.table.remove_entry(id);
                    }
                }
            }
            if !expired_unmatched.is_empty() {
                let parser = side.rows.parser();
                let columns = side
                    .rows
                    .convert_rows(expired_unmatched.iter().map(|r| parser.parse(r)))?;
                out.push(self.unmatched(s, columns)?);
            }
        }
        Ok(())
    }

    fn watermark_hold_back(&self) -> i64 {
        self.bounds.upper.max(-self.bounds.lower).max(0)
    }

    fn partitioning(&self) -> Partitioning {
        Partitioning::by_key(&self.route)
    }

    fn tables(&mut self) -> Vec<&mut dyn StateTable> {
        let [left, right] = &mut self.sides;
        vec![&mut left.table, &mut right.table]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::testing::{epoch, find, optimized, transplant};
    use arrow::array::{Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::logical_expr::LogicalPlan;

    const S: i64 = 1_000_000;

    fn side(name: &str, keys: &[&str], ts_s: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new(name, DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(TimestampMicrosecondArray::from(
                    ts_s.iter().map(|t| t * S).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(ts_s.to_vec())),
            ],
        )
        .unwrap()
    }

    fn pairs(out: &Output) -> Vec<(Option<i64>, Option<i64>)> {
        let mut v = Vec::new();
        for b in &out.batches {
            let l = b.column(2).as_primitive::<Int64Type>();
            let r = b.column(5).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                v.push((
                    l.is_valid(i).then(|| l.value(i)),
                    r.is_valid(i).then(|| r.value(i)),
                ));
            }
        }
        v.sort();
        v
    }

    /// `l LEFT JOIN r` on `k` with `r.ts` from 10 s before to 5 s after `l.ts`.
    async fn left_join() -> IntervalJoin {
        let sql = "SELECT * FROM l LEFT JOIN r ON l.k = r.k \
                   AND r.ts BETWEEN l.ts - INTERVAL '10' SECOND AND l.ts + INTERVAL '5' SECOND";
        let (plan, state) = optimized(
            sql,
            &[("l", side("lv", &[], &[])), ("r", side("rv", &[], &[]))],
        )
        .await;
        let LogicalPlan::Join(join) = find(&plan, &|p| matches!(p, LogicalPlan::Join(_))) else {
            unreachable!()
        };
        let bounds = JoinBounds {
            left_ts: 1,
            right_ts: 1,
            lower: -10 * S,
            upper: 5 * S,
        };
        IntervalJoin::new(&join, &state, bounds, join.filter.as_ref()).unwrap()
    }

    #[tokio::test]
    async fn matches_come_at_once_and_unmatched_rows_when_the_watermark_passes_their_range() {
        let mut op = left_join().await;
        let mut restarted = left_join().await;
        assert_eq!(
            op.watermark_hold_back(),
            10 * S,
            "output may be 10 s older than the input watermark"
        );

        let out = epoch(
            &mut op,
            vec![
                (0, side("lv", &["a", "b"], &[100, 100])),
                (1, side("rv", &["b"], &[80])),
            ],
            Watermark(50 * S),
        )
        .await;
        assert!(pairs(&out).is_empty());
        let out = epoch(
            &mut op,
            vec![
                (1, side("rv", &["a"], &[95])),
                (0, side("lv", &["a", "x"], &[200, 90])),
                (0, side("lv", &[], &[])),
            ],
            Watermark(106 * S),
        )
        .await;
        // (100, 95) matched on arrival; b@100 can no longer match once the watermark is past
        // 105 s; the NULL-keyed... x@90 has no partner either and its range is also past.
        assert_eq!(
            pairs(&out),
            [(Some(90), None), (Some(100), None), (Some(100), Some(95))]
        );
        transplant(&mut op, &mut restarted);
        let out = epoch(
            &mut restarted,
            vec![(1, side("rv", &["a"], &[210]))],
            Watermark::END,
        )
        .await;
        assert_eq!(
            pairs(&out),
            [(Some(200), None)],
            "210 is outside 200's range"
        );
        assert_eq!(
            restarted.state_size().rows,
            0,
            "everything expired at the end"
        );
    }

    #[tokio::test]
    async fn rows_with_null_keys_never_match() {
        let mut op = left_join().await;
        let nulls = |name: &str| {
            let b = side(name, &["a"], &[100]);
            let k: ArrayRef = Arc::new(StringArray::from(vec![None::<&str>]));
            RecordBatch::try_new(
                b.schema(),
                vec![k, b.column(1).clone(), b.column(2).clone()],
            )
            .unwrap()
        };
        let out = epoch(
            &mut op,
            vec![(1, nulls("rv")), (0, nulls("lv"))],
            Watermark(0),
        )
        .await;
        assert_eq!(
            pairs(&out),
            [(Some(100), None)],
            "the left row is final at once, unmatched"
        );
        assert_eq!(op.state_size().rows, 0, "nothing to keep");
    }
}
