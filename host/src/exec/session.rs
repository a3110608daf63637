//! Streaming session windows.
//!
//! A session's bounds depend on rows that may still arrive: per group key, rows closer than
//! the gap form one session `[first ts, last ts + gap)`, and a row that arrives late (but
//! before the watermark) can extend a session or bridge two. So each key keeps its open
//! sessions, each with one DataFusion accumulator per aggregate (the same ones batch mode
//! uses), as Flink's merging window set does: a row folds into the session it falls in, a new
//! session starts when it falls in none, and when it bridges sessions their accumulators are
//! **merged** (`Accumulator::merge_batch` of the others' states, which for a Wasm aggregate is
//! its `merge`). State is then one accumulator set per open session, not every row. A session
//! is emitted once, when the watermark passes its end: session windows run in append mode, as
//! in Spark.
//!
//! A Wasm aggregate's accumulators are fed a batch's rows for all the sessions they touch
//! together, in guest calls of up to 8,192 rows ([`update_wasm_groups`]), not one call per
//! session: with a row or two per session and batch, each call's fixed cost was most of the
//! time.
//!
//! Merging re-associates an aggregate's additions, as DataFusion's own partial and final
//! aggregation does in batch mode: sums of floats agree with batch to rounding, everything
//! else exactly.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryBuilder, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Fields, Int64Type, SchemaRef};
use arrow::row::{RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Accumulator, Aggregate};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_plan::PhysicalExpr;

use super::aggregate::{
    AggSpec, GroupKeys, accumulators, append_aggregate_columns, micros, restore_accumulator,
    state_consumes, update, update_wasm_groups,
};
use super::keys::{KeyEncoder, KeyRoute};
use super::{Operator, Output, Partitioning};
use crate::common::Watermark;
use crate::error::{Result, RiffleError};
use crate::state::bytes::{Decode, Encode, take};
use crate::state::{EntryId, KeyedTable, StateTable, ValueCodec, ValueEncoder};
use crate::udf::WasmAggregateUdf;
use crate::window::{WindowKind, window_array};

/// One open session of a key.
struct Session {
    start: i64,
    /// The last row's time plus the gap.
    end: i64,
    /// One per aggregate.
    accs: Vec<Box<dyn Accumulator>>,
}

/// A key's open sessions, by start; they never overlap (overlapping ones are merged).
type Sessions = Vec<Session>;

/// Streaming `GROUP BY session_window(ts, gap), keys...`.
pub struct SessionAggregate {
    window_position: usize,
    gap: i64,
    ts: Arc<dyn PhysicalExpr>,
    keys: KeyEncoder,
    /// The partition key: the `GROUP BY` expressions other than the session window.
    route: Option<Arc<KeyRoute>>,
    aggs: Vec<AggSpec>,
    output_schema: SchemaRef,
    open: KeyedTable<Sessions>,
}

/// Encodes a key's sessions as one binary value: per session its bounds and its aggregates'
/// states as one row of Arrow's row format (which handles any state type, lists included).
struct SessionCodec {
    specs: Vec<Arc<AggregateFunctionExpr>>,
    /// State columns per aggregate.
    widths: Vec<usize>,
    /// The state columns' types, all aggregates in turn.
    types: Vec<DataType>,
    rows: RowConverter,
}

impl SessionCodec {
    fn new(aggs: &[AggSpec]) -> Result<Self> {
        let mut types = Vec::new();
        let mut widths = Vec::new();
        for a in aggs {
            let state = a.state_fields()?;
            widths.push(state.len());
            types.extend(state.iter().map(|f| f.data_type().clone()));
        }
        let fields = types.iter().map(|t| SortField::new(t.clone())).collect();
        let rows = RowConverter::new(fields).map_err(|e| {
            RiffleError::Unsupported(format!(
                "session windows cannot keep the state of these aggregates ({e})"
            ))
        })?;
        Ok(SessionCodec {
            specs: aggs.iter().map(|a| Arc::clone(&a.expr)).collect(),
            widths,
            types,
            rows,
        })
    }

    /// Accumulators with the states in row `row` of `columns` (each aggregate's state columns
    /// in turn).
    fn restore(&self, columns: &[ArrayRef], row: usize) -> Result<Vec<Box<dyn Accumulator>>> {
        let mut accs = Vec::with_capacity(self.specs.len());
        let mut at = 0;
        for (spec, width) in self.specs.iter().zip(&self.widths) {
            let slice: Vec<ArrayRef> = columns[at..at + width]
                .iter()
                .map(|c| c.slice(row, 1))
                .collect();
            accs.push(restore_accumulator(spec, &slice)?);
            at += width;
        }
        Ok(accs)
    }
}

struct SessionEncoder<'a> {
    codec: &'a SessionCodec,
    values: BinaryBuilder,
}

impl ValueEncoder<Sessions> for SessionEncoder<'_> {
    fn append(&mut self, sessions: &mut Sessions) -> Result<()> {
        let codec = self.codec;
        // Column `c` of the key's states: one value per session.
        let mut columns: Vec<Vec<ScalarValue>> = vec![Vec::new(); codec.widths.iter().sum()];
        for session in sessions.iter_mut() {
            let mut c = 0;
            for (k, acc) in session.accs.iter_mut().enumerate() {
                let state = acc.state()?;
                if state_consumes(&codec.specs[k]) {
                    let arrays = state
                        .iter()
                        .map(|s| s.to_array())
                        .collect::<datafusion::common::Result<Vec<_>>>()?;
                    *acc = restore_accumulator(&codec.specs[k], &arrays)?;
                }
                for value in state {
                    columns[c].push(value);
                    c += 1;
                }
            }
        }
        let mut bytes = Vec::new();
        (sessions.len() as u32).encode(&mut bytes);
        // A query without aggregates (`SELECT session_window(...), k ... GROUP BY ...`) has
        // no state columns: its sessions are bounds only.
        let rows = if sessions.is_empty() || columns.is_empty() {
            None
        } else {
            // The scalars' arrays as the declared state types (an accumulator's scalars may
            // come back as a different but castable type).
            let columns = columns
                .into_iter()
                .zip(&codec.types)
                .map(|(values, data_type)| {
                    let array = ScalarValue::iter_to_array(values)?;
                    Ok(if array.data_type() == data_type {
                        array
                    } else {
                        arrow::compute::cast(&array, data_type)?
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Some(codec.rows.convert_columns(&columns)?)
        };
        for (i, session) in sessions.iter().enumerate() {
            session.start.encode(&mut bytes);
            session.end.encode(&mut bytes);
            match &rows {
                Some(rows) => rows.row(i).as_ref().encode(&mut bytes),
                None => [].as_slice().encode(&mut bytes),
            }
        }
        self.values.append_value(&bytes);
        Ok(())
    }

    fn append_null(&mut self) {
        self.values.append_null();
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<ArrayRef>> {
        Ok(vec![Arc::new(self.values.finish())])
    }
}

impl ValueCodec<Sessions> for SessionCodec {
    fn fields(&self) -> Fields {
        Fields::from(vec![Field::new("sessions", DataType::Binary, true)])
    }

    fn encoder(&self, capacity: usize) -> Box<dyn ValueEncoder<Sessions> + '_> {
        Box::new(SessionEncoder {
            codec: self,
            values: BinaryBuilder::with_capacity(capacity, capacity * 64),
        })
    }

    fn decode(&self, columns: &[ArrayRef], row: usize) -> Result<Sessions> {
        let malformed = || RiffleError::Checkpoint("session window state is malformed".into());
        let column = columns
            .first()
            .and_then(|c| c.as_binary_opt::<i32>())
            .filter(|c| !c.is_null(row))
            .ok_or_else(malformed)?;
        let mut input = column.value(row);
        let n = u32::decode(&mut input)?;
        let parser = self.rows.parser();
        let mut sessions = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let start = i64::decode(&mut input)?;
            let end = i64::decode(&mut input)?;
            let len = u32::decode(&mut input)? as usize;
            let state = take(&mut input, len)?;
            let columns = if self.specs.is_empty() {
                Vec::new()
            } else {
                self.rows.convert_rows([parser.parse(state)])?
            };
            sessions.push(Session {
                start,
                end,
                accs: self.restore(&columns, 0)?,
            });
        }
        if !input.is_empty() {
            return Err(malformed());
        }
        Ok(sessions)
    }

    fn size(&self, sessions: &Sessions) -> usize {
        sessions
            .iter()
            .map(|s| 16 + s.accs.iter().map(|a| a.size()).sum::<usize>())
            .sum::<usize>()
            + 24
    }
}

impl SessionAggregate {
    /// Its [`Operator::kind`].
    pub const KIND: &'static str = "session";

    /// Plans the operator for an `Aggregate` grouped by `session_window`.
    ///
    /// # Errors
    /// [`RiffleError::Unsupported`] for aggregates whose state cannot be kept.
    pub fn new(agg: &Aggregate, state: &SessionState) -> Result<Self> {
        let keys = GroupKeys::plan(agg, state, false)?;
        let Some((window_position, WindowKind::Session(gap), ts)) = keys.window else {
            return Err(RiffleError::Internal(
                "SessionAggregate planned without a session_window".into(),
            ));
        };
        let aggs = AggSpec::plan(agg, state)?;
        let codec = SessionCodec::new(&aggs)?;
        Ok(SessionAggregate {
            window_position,
            gap,
            ts,
            route: keys.keys.route()?,
            keys: keys.keys,
            aggs,
            output_schema: Arc::new(agg.schema.as_arrow().clone()),
            open: KeyedTable::new("sessions", Box::new(codec)),
        })
    }
}

/// Merges `other` into `into` (their aggregates' states, and their bounds).
fn merge(into: &mut Session, mut other: Session) -> Result<()> {
    for (acc, o) in into.accs.iter_mut().zip(other.accs.iter_mut()) {
        let state = o
            .state()?
            .iter()
            .map(|s| s.to_array())
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        acc.merge_batch(&state)?;
    }
    into.start = into.start.min(other.start);
    into.end = into.end.max(other.end);
    Ok(())
}

#[async_trait::async_trait]
impl Operator for SessionAggregate {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    async fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        _out: &mut Output,
    ) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let ts = micros(&self.ts, &batch)?;
        let ts = ts.as_primitive::<Int64Type>();
        let keys = self.keys.evaluate(&batch)?;
        let encoded = self.keys.encode(&keys)?;
        let evaluated = self
            .aggs
            .iter()
            .map(|a| a.evaluate(&batch))
            .collect::<Result<Vec<_>>>()?;
        // Rows without an event time belong to no session (as in batch mode). The others by
        // key, then time (then arrival).
        let mut order: Vec<u32> = (0..batch.num_rows() as u32)
            .filter(|&i| ts.is_valid(i as usize))
            .collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            encoded
                .get(a)
                .cmp(encoded.get(b))
                .then(ts.value(a).cmp(&ts.value(b)))
        });
        // A Wasm aggregate takes the batch's rows of all sessions together, after the sessions
        // are settled (see `update_wasm_groups`); the others session by session.
        let wasm: Vec<Option<&WasmAggregateUdf>> = self
            .aggs
            .iter()
            .map(|a| a.expr.fun().inner().downcast_ref::<WasmAggregateUdf>())
            .collect();
        let has_wasm = wasm.iter().any(Option::is_some);
        // The sessions that take rows, with their rows (a range of `order`).
        let mut touched: Vec<(EntryId, usize, Range<usize>)> = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let key = encoded.get(order[i] as usize);
            let mut j = i + 1;
            while j < order.len() && encoded.get(order[j] as usize) == key {
                j += 1;
            }
            let entry = self.open.entry_of(key, Vec::new);
            let sessions = self.open.value_mut(entry);
            // The key's rows in clusters: rows closer than the gap are one session. First the
            // sessions the clusters make: the open sessions a cluster overlaps (a run, as they
            // are sorted and disjoint) become one, spanning the cluster too.
            let mut c = i;
            while c < j {
                let mut d = c + 1;
                while d < j
                    && ts.value(order[d] as usize) - ts.value(order[d - 1] as usize) < self.gap
                {
                    d += 1;
                }
                let start = ts.value(order[c] as usize);
                let end = ts.value(order[d - 1] as usize) + self.gap;
                let first = sessions.partition_point(|s| s.end <= start);
                let last = sessions.partition_point(|s| s.start < end);
                let mut merged = Session {
                    start,
                    end,
                    accs: Vec::new(),
                };
                let mut overlapped = sessions.drain(first..last.max(first));
                match overlapped.next() {
                    Some(base) => {
                        merged.start = merged.start.min(base.start);
                        merged.end = merged.end.max(base.end);
                        merged.accs = base.accs;
                        for other in overlapped {
                            merge(&mut merged, other)?;
                        }
                    }
                    None => {
                        drop(overlapped);
                        merged.accs = accumulators(self.aggs.iter().map(|a| &a.expr))?;
                    }
                }
                sessions.insert(first, merged);
                c = d;
            }
            // Then each session's rows: the key's rows are in time order, its sessions
            // disjoint and in order, and each row lies in the session its cluster became part
            // of.
            let mut c = i;
            while c < j {
                let at = ts.value(order[c] as usize);
                let s = sessions.partition_point(|s| s.end <= at);
                let Some(end) = sessions.get(s).map(|s| s.end) else {
                    return Err(RiffleError::Internal(format!(
                        "a row at {at} µs is in none of its key's sessions"
                    )));
                };
                let mut d = c + 1;
                while d < j && ts.value(order[d] as usize) < end {
                    d += 1;
                }
                let rows = UInt32Array::from(order[c..d].to_vec());
                for (k, (acc, (args, mask))) in
                    sessions[s].accs.iter_mut().zip(&evaluated).enumerate()
                {
                    if wasm[k].is_none() {
                        update(acc.as_mut(), args, mask.as_ref(), &rows)?;
                    }
                }
                if has_wasm {
                    touched.push((entry, s, c..d));
                }
                c = d;
            }
            // A session [start, end) closes once the watermark reaches its end.
            let close = sessions.iter().map(|s| s.end).min();
            self.open.set_deadline_of(entry, close.map(|c| c - 1));
            i = j;
        }
        for (k, wasm) in wasm.iter().enumerate() {
            let Some(wasm) = wasm else { continue };
            let states = touched
                .iter()
                .map(|(entry, s, _)| self.open.value_mut(*entry)[*s].accs[k].state())
                .collect::<datafusion::common::Result<Vec<_>>>()?;
            let rows: Vec<&[u32]> = touched.iter().map(|(_, _, r)| &order[r.clone()]).collect();
            let (args, mask) = &evaluated[k];
            let updated = update_wasm_groups(wasm, &states, args, mask.as_ref(), &rows)?;
            for ((entry, s, _), acc) in touched.iter().zip(updated) {
                if let Some(acc) = acc {
                    self.open.value_mut(*entry)[*s].accs[k] = acc;
                }
            }
        }
        Ok(())
    }

    async fn on_watermark(&mut self, watermark: Watermark, out: &mut Output) -> Result<()> {
        // Sessions closed by this watermark: their keys, bounds and values.
        let mut keys: Vec<Box<[u8]>> = Vec::new();
        let (mut starts, mut ends) = (Vec::new(), Vec::new());
        let mut closed: Vec<Vec<Box<dyn Accumulator>>> = Vec::new();
        for key in self.open.take_due(watermark) {
            let Some(sessions) = self.open.remove(&key) else {
                continue;
            };
            let mut kept = Vec::new();
            for session in sessions {
                if !watermark.is_late(session.end - 1) {
                    kept.push(session);
                    continue;
                }
                keys.push(key.clone());
                starts.push(session.start);
                ends.push(session.end);
                closed.push(session.accs);
            }
            if !kept.is_empty() {
                let close = kept.iter().map(|s| s.end).min();
                self.open.insert(&key, kept);
                self.open.set_deadline(&key, close.map(|c| c - 1));
            }
        }
        if keys.is_empty() {
            return Ok(());
        }
        let mut columns: Vec<ArrayRef> = self.keys.decode(keys.iter().map(|k| k.as_ref()))?;
        if self.keys.is_empty() {
            columns.clear();
        }
        columns.insert(self.window_position, window_array(starts, ends));
        let mut accs: Vec<&mut Vec<Box<dyn Accumulator>>> = closed.iter_mut().collect();
        append_aggregate_columns(&mut columns, &self.aggs, &mut accs, &self.output_schema)?;
        out.push(RecordBatch::try_new(self.output_schema.clone(), columns)?);
        Ok(())
    }

    fn partitioning(&self) -> Partitioning {
        Partitioning::by_key(&self.route)
    }

    fn tables(&mut self) -> Vec<&mut dyn StateTable> {
        vec![&mut self.open]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::testing::{epoch, find, optimized, transplant};
    use arrow::array::{StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::logical_expr::LogicalPlan;

    const S: i64 = 1_000_000;

    fn rows(keys: &[&str], ts_s: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(TimestampMicrosecondArray::from(
                    ts_s.iter().map(|t| t * S).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn counts(out: &Output) -> Vec<(String, i64)> {
        let mut v = Vec::new();
        for b in &out.batches {
            let k = b.column(1).as_string::<i32>();
            let n = b.column(2).as_primitive::<Int64Type>();
            v.extend((0..b.num_rows()).map(|i| (k.value(i).to_string(), n.value(i))));
        }
        v.sort();
        v
    }

    /// Two operators for `sql` over `t(k, ts)`: one to run, one to restart into.
    async fn operators(sql: &str) -> (SessionAggregate, SessionAggregate) {
        let (plan, state) = optimized(sql, &[("t", rows(&[], &[]))]).await;
        let LogicalPlan::Aggregate(agg) = find(&plan, &|p| matches!(p, LogicalPlan::Aggregate(_)))
        else {
            unreachable!()
        };
        (
            SessionAggregate::new(&agg, &state).unwrap(),
            SessionAggregate::new(&agg, &state).unwrap(),
        )
    }

    #[tokio::test]
    async fn sessions_close_when_the_watermark_passes_their_end() {
        let (mut op, mut restarted) = operators(
            "SELECT session_window(ts, '10 seconds') AS s, k, count(*) AS n FROM t \
             GROUP BY session_window(ts, '10 seconds'), k",
        )
        .await;
        let out = epoch(
            &mut op,
            vec![(0, rows(&["a", "a", "b", "a"], &[0, 5, 7, 30]))],
            Watermark(16 * S),
        )
        .await;
        assert_eq!(
            counts(&out),
            [("a".into(), 2)],
            "a's [0, 15) closed; b's [7, 17) not yet"
        );
        transplant(&mut op, &mut restarted);
        let out = epoch(
            &mut restarted,
            vec![(0, rows(&["b"], &[16]))],
            Watermark::END,
        )
        .await;
        assert_eq!(
            counts(&out),
            [("a".into(), 1), ("b".into(), 2)],
            "16 extended b's session"
        );
        assert_eq!(restarted.state_size().rows, 0);
    }

    #[tokio::test]
    async fn sessions_without_aggregates_are_bounds_only_and_survive_a_restart() {
        let (mut op, mut restarted) = operators(
            "SELECT session_window(ts, '10 seconds') AS s, k FROM t \
             GROUP BY session_window(ts, '10 seconds'), k",
        )
        .await;
        let out = epoch(&mut op, vec![(0, rows(&["a", "b"], &[0, 3]))], Watermark(S)).await;
        assert_eq!(out.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
        transplant(&mut op, &mut restarted);
        let out = epoch(
            &mut restarted,
            vec![(0, rows(&["a"], &[9]))],
            Watermark::END,
        )
        .await;
        let keys: Vec<&str> = out
            .batches
            .iter()
            .flat_map(|b| b.column(1).as_string::<i32>().iter().flatten())
            .collect();
        assert_eq!(keys.len(), 2, "{keys:?}");
    }

    #[tokio::test]
    async fn a_row_that_bridges_two_sessions_merges_them_across_a_restart() {
        let (mut op, mut restarted) = operators(
            "SELECT session_window(ts, '10 seconds') AS s, k, count(*) AS n, \
             min(ts) AS first, max(ts) AS last FROM t \
             GROUP BY session_window(ts, '10 seconds'), k",
        )
        .await;
        // a: [0, 11) and [15, 25); b: [3, 13).
        let out = epoch(
            &mut op,
            vec![(0, rows(&["a", "a", "b", "a"], &[15, 0, 3, 1]))],
            Watermark(5 * S),
        )
        .await;
        assert!(counts(&out).is_empty());
        transplant(&mut op, &mut restarted);
        // 8 is within 10 s of both of a's sessions: one session [0, 25) of four rows.
        let out = epoch(
            &mut restarted,
            vec![(0, rows(&["a"], &[8]))],
            Watermark(14 * S),
        )
        .await;
        assert_eq!(counts(&out), [("b".into(), 1)], "only b's [3, 13) closed");
        let out = epoch(&mut restarted, vec![], Watermark::END).await;
        assert_eq!(counts(&out), [("a".into(), 4)]);
        let b = &out.batches[0];
        let bounds = b.column(0).as_struct();
        let micros = |c: usize| {
            arrow::compute::cast(bounds.column(c), &DataType::Int64)
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(0)
        };
        assert_eq!((micros(0), micros(1)), (0, 25 * S), "the merged bounds");
        let ts = |c: usize| {
            arrow::compute::cast(b.column(c), &DataType::Int64)
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(0)
        };
        assert_eq!(
            (ts(3), ts(4)),
            (0, 15 * S),
            "min and max merged from both sessions"
        );
        assert_eq!(restarted.state_size().rows, 0);
    }
}
