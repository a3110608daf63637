//! Streaming session windows.
//!
//! A session's bounds depend on rows that may still arrive, so until the watermark passes a
//! session's end its rows are kept as they are: per group key, the open rows (encoded with
//! Arrow's row format). When a session closes, its rows go through fresh accumulators, the same
//! ones batch mode uses, and the finished row is emitted once: session windows run in append
//! mode, as in Spark. Only keys that received rows or closed a session are in an epoch's
//! checkpoint delta.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use arrow::datatypes::{Int64Type, SchemaRef};
use arrow::row::{RowConverter, SortField};
use datafusion::common::ScalarValue;
use datafusion::execution::SessionState;
use datafusion::logical_expr::Aggregate;
use datafusion::physical_plan::PhysicalExpr;

use super::aggregate::{AggSpec, GroupKeys, append_aggregate_columns, micros, update};
use super::keys::KeyEncoder;
use super::{Operator, Output};
use crate::common::Watermark;
use crate::error::{Result, RiffleError};
use crate::state::bytes::{BytesCodec, Decode, Encode};
use crate::state::{KeyedTable, StateTable};
use crate::window::{WindowKind, window_array};

/// One buffered input row of a session.
#[derive(Clone, Debug)]
struct OpenRow {
    ts: i64,
    row: Box<[u8]>,
}

impl Encode for OpenRow {
    fn encode(&self, out: &mut Vec<u8>) {
        self.ts.encode(out);
        self.row.encode(out);
    }
}

impl Decode for OpenRow {
    fn decode(input: &mut &[u8]) -> Result<Self> {
        Ok(OpenRow {
            ts: i64::decode(input)?,
            row: Box::decode(input)?,
        })
    }
}

/// Streaming `GROUP BY session_window(ts, gap), keys...`.
pub struct SessionAggregate {
    window_position: usize,
    gap: i64,
    ts: Arc<dyn PhysicalExpr>,
    keys: KeyEncoder,
    rows: RowConverter,
    aggs: Vec<AggSpec>,
    input_schema: SchemaRef,
    output_schema: SchemaRef,
    open: KeyedTable<Vec<OpenRow>>,
}

/// When the first session of `rows` (sorted by time) closes.
fn first_close(gap: i64, rows: &[OpenRow]) -> Option<i64> {
    let mut end = rows.first()?.ts + gap;
    for r in &rows[1..] {
        if r.ts >= end {
            break;
        }
        end = r.ts + gap;
    }
    Some(end)
}

fn open_size(rows: &[OpenRow]) -> usize {
    rows.iter().map(|r| r.row.len() + 24).sum::<usize>() + 24
}

impl SessionAggregate {
    /// Plans the operator for an `Aggregate` grouped by `session_window`.
    ///
    /// # Errors
    /// [`RiffleError::Unsupported`] for unsupported aggregates or input types.
    pub fn new(agg: &Aggregate, state: &SessionState) -> Result<Self> {
        let keys = GroupKeys::plan(agg, state, false)?;
        let Some((window_position, WindowKind::Session(gap), ts)) = keys.window else {
            return Err(RiffleError::Internal(
                "SessionAggregate planned without a session_window".into(),
            ));
        };
        let input_schema = Arc::new(agg.input.schema().as_arrow().clone());
        let rows = RowConverter::new(
            input_schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )
        .map_err(|e| {
            RiffleError::Unsupported(format!(
                "session windows cannot buffer rows of these types ({e})"
            ))
        })?;
        Ok(SessionAggregate {
            window_position,
            gap,
            ts,
            keys: keys.keys,
            rows,
            aggs: AggSpec::plan(agg, state)?,
            input_schema,
            output_schema: Arc::new(agg.schema.as_arrow().clone()),
            open: KeyedTable::new(
                "open",
                Box::new(BytesCodec::with_size(|rows: &Vec<OpenRow>| open_size(rows))),
            ),
        })
    }
}

#[async_trait::async_trait]
impl Operator for SessionAggregate {
    fn kind(&self) -> &'static str {
        "session"
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
        let rows = self.rows.convert_columns(batch.columns())?;
        let mut touched: Vec<Box<[u8]>> = Vec::new();
        for i in 0..batch.num_rows() {
            // Rows without an event time belong to no session (as in batch mode).
            if ts.is_null(i) {
                continue;
            }
            let key = encoded.get(i);
            let open = self.open.get_or_insert_with(key, Vec::new);
            open.push(OpenRow {
                ts: ts.value(i),
                row: rows.row(i).data().into(),
            });
            touched.push(key.into());
        }
        touched.sort_unstable();
        touched.dedup();
        for key in touched {
            let open = self.open.get_mut(&key).expect("inserted above");
            open.sort_by_key(|r| r.ts);
            let close = first_close(self.gap, open);
            // A session [start, end) closes once the watermark reaches its end.
            self.open.set_deadline(&key, close.map(|c| c - 1));
        }
        Ok(())
    }

    async fn on_watermark(&mut self, watermark: Watermark, out: &mut Output) -> Result<()> {
        // Sessions closed by this watermark: (key, start, end, rows).
        let mut closed: Vec<(Box<[u8]>, i64, i64, Vec<Box<[u8]>>)> = Vec::new();
        for key in self.open.take_due(watermark) {
            let Some(rows) = self.open.remove(&key) else {
                continue;
            };
            let mut i = 0;
            let mut kept = Vec::new();
            while i < rows.len() {
                let mut j = i + 1;
                while j < rows.len() && rows[j].ts - rows[j - 1].ts < self.gap {
                    j += 1;
                }
                let (start, end) = (rows[i].ts, rows[j - 1].ts + self.gap);
                if watermark.is_late(end - 1) {
                    let members = rows[i..j].iter().map(|r| r.row.clone()).collect();
                    closed.push((key.clone(), start, end, members));
                } else {
                    kept.extend_from_slice(&rows[i..j]);
                }
                i = j;
            }
            if !kept.is_empty() {
                let close = first_close(self.gap, &kept);
                self.open.insert(&key, kept);
                self.open.set_deadline(&key, close.map(|c| c - 1));
            }
        }
        if closed.is_empty() {
            return Ok(());
        }
        // Decode every closed session's rows at once and aggregate each session.
        let parser = self.rows.parser();
        let all = self.rows.convert_rows(
            closed
                .iter()
                .flat_map(|(_, _, _, rows)| rows.iter().map(|r| parser.parse(r))),
        )?;
        let all = RecordBatch::try_new(self.input_schema.clone(), all)?;
        let evaluated = self
            .aggs
            .iter()
            .map(|a| a.evaluate(&all))
            .collect::<Result<Vec<_>>>()?;
        let mut values: Vec<Vec<ScalarValue>> = vec![Vec::new(); self.aggs.len()];
        let (mut starts, mut ends) = (Vec::new(), Vec::new());
        let mut offset = 0u32;
        for (_, start, end, rows) in &closed {
            starts.push(*start);
            ends.push(*end);
            let ids = UInt32Array::from_iter_values(offset..offset + rows.len() as u32);
            offset += rows.len() as u32;
            for (k, (spec, (args, mask))) in self.aggs.iter().zip(&evaluated).enumerate() {
                let mut acc = spec.expr.create_accumulator()?;
                update(acc.as_mut(), args, mask.as_ref(), &ids)?;
                values[k].push(acc.evaluate()?);
            }
        }
        let mut columns: Vec<ArrayRef> = self.keys.decode(closed.iter().map(|c| c.0.as_ref()))?;
        if self.keys.is_empty() {
            columns.clear();
        }
        columns.insert(self.window_position, window_array(starts, ends));
        append_aggregate_columns(&mut columns, values, &self.output_schema)?;
        out.push(RecordBatch::try_new(self.output_schema.clone(), columns)?);
        Ok(())
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

    #[tokio::test]
    async fn sessions_close_when_the_watermark_passes_their_end() {
        let sql = "SELECT session_window(ts, '10 seconds') AS s, k, count(*) AS n FROM t \
                   GROUP BY session_window(ts, '10 seconds'), k";
        let (plan, state) = optimized(sql, &[("t", rows(&[], &[]))]).await;
        let LogicalPlan::Aggregate(agg) = find(&plan, &|p| matches!(p, LogicalPlan::Aggregate(_)))
        else {
            unreachable!()
        };
        let mut op = SessionAggregate::new(&agg, &state).unwrap();
        let mut restarted = SessionAggregate::new(&agg, &state).unwrap();
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
}
