//! Streaming de-duplication (`SELECT DISTINCT ...` and `SELECT DISTINCT ON (key) ...`).
//!
//! The first row seen for a key is emitted at once; later rows with that key are dropped. A key
//! is remembered until the watermark passes its event time: any row with that key arriving after
//! that is behind the watermark and dropped as late anyway, so state stays bounded (Spark's
//! `dropDuplicatesWithinWatermark`). Without an event-time column in the input, keys are kept
//! forever. (`DISTINCT ON` with an `ORDER BY` that picks a row per key is planned as an
//! aggregation instead: which row wins depends on rows that have not arrived yet.)

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Builder, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Fields, Int64Type, SchemaRef};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Distinct, Expr};
use datafusion::physical_plan::PhysicalExpr;

use super::aggregate::micros;
use super::keys::{KeyEncoder, KeyRoute};
use super::{Operator, Output, Partitioning};
use crate::common::Watermark;
use crate::error::{Result, RiffleError};
use crate::state::{KeyedTable, StateTable, ValueCodec, ValueEncoder};

/// Stores an event time per key.
struct EventTimeCodec;

impl ValueCodec<i64> for EventTimeCodec {
    fn fields(&self) -> Fields {
        Fields::from(vec![Field::new("ts", DataType::Int64, true)])
    }

    fn encoder(&self, capacity: usize) -> Box<dyn ValueEncoder<i64> + '_> {
        Box::new(EventTimeEncoder(Int64Builder::with_capacity(capacity)))
    }

    fn decode(&self, columns: &[ArrayRef], row: usize) -> Result<i64> {
        let column = columns[0].as_primitive::<Int64Type>();
        if column.is_null(row) {
            return Err(RiffleError::Checkpoint(
                "dedup: a key without event time".into(),
            ));
        }
        Ok(column.value(row))
    }

    fn size(&self, _: &i64) -> usize {
        8
    }
}

struct EventTimeEncoder(Int64Builder);

impl ValueEncoder<i64> for EventTimeEncoder {
    fn append(&mut self, value: &mut i64) -> Result<()> {
        self.0.append_value(*value);
        Ok(())
    }

    fn append_null(&mut self) {
        self.0.append_null();
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<ArrayRef>> {
        Ok(vec![Arc::new(self.0.finish())])
    }
}

/// Streaming `DISTINCT`.
pub struct Dedup {
    keys: KeyEncoder,
    /// The partition key: the whole de-duplication key.
    route: Option<Arc<KeyRoute>>,
    /// The input's event-time column, if it has one.
    ts: Option<Arc<dyn PhysicalExpr>>,
    /// Output expressions (`DISTINCT ON`'s select list); `None` passes rows through.
    select: Option<Vec<Arc<dyn PhysicalExpr>>>,
    output_schema: SchemaRef,
    seen: KeyedTable<i64>,
    watermark: Watermark,
}

impl Dedup {
    /// Plans the operator; `event_time` is the index of the input's event-time column, if any.
    ///
    /// # Errors
    /// Planning errors from DataFusion; [`RiffleError::Internal`] for a `DISTINCT ON` with an
    /// `ORDER BY` (the planner turns those into aggregations).
    pub fn new(
        distinct: &Distinct,
        state: &SessionState,
        event_time: Option<usize>,
    ) -> Result<Self> {
        let input = distinct.input();
        let schema = input.schema();
        let (key_exprs, select, output_schema): (Vec<Expr>, _, _) = match distinct {
            Distinct::All(_) => (
                schema.columns().into_iter().map(Expr::Column).collect(),
                None,
                Arc::new(schema.as_arrow().clone()),
            ),
            Distinct::On(on) => {
                if on.sort_expr.is_some() {
                    return Err(RiffleError::Internal(
                        "DISTINCT ON with ORDER BY reached the de-duplication operator".into(),
                    ));
                }
                (
                    on.on_expr.clone(),
                    Some(
                        on.select_expr
                            .iter()
                            .map(|e| state.create_physical_expr(e.clone(), schema))
                            .collect::<datafusion::common::Result<Vec<_>>>()?,
                    ),
                    Arc::new(on.schema.as_arrow().clone()),
                )
            }
        };
        let ts = match event_time {
            Some(i) => Some(
                state.create_physical_expr(Expr::Column(schema.columns()[i].clone()), schema)?,
            ),
            None => None,
        };
        let keys = KeyEncoder::plan(&key_exprs, schema, state)?;
        Ok(Dedup {
            route: keys.route()?,
            keys,
            ts,
            select,
            output_schema,
            seen: KeyedTable::new("seen", Box::new(EventTimeCodec)),
            watermark: Watermark::NONE,
        })
    }
}

#[async_trait::async_trait]
impl Operator for Dedup {
    fn kind(&self) -> &'static str {
        "dedup"
    }

    async fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Output,
    ) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let keys = self.keys.evaluate(&batch)?;
        let encoded = self.keys.encode(&keys)?;
        let ts = match &self.ts {
            Some(ts) => Some(micros(ts, &batch)?),
            None => None,
        };
        let ts = ts.as_ref().map(|t| t.as_primitive::<Int64Type>());
        let mut keep = Vec::with_capacity(rows);
        for i in 0..rows {
            let key = encoded.get(i);
            let fresh = self.seen.get(key).is_none();
            if fresh {
                // A key is forgotten once the watermark passes its event time; rows without
                // an event time (or inputs without one) are remembered for good.
                let t = ts.and_then(|t| t.is_valid(i).then(|| t.value(i)));
                self.seen.insert(key, t.unwrap_or(i64::MAX));
                if t.is_some() {
                    self.seen.set_deadline(key, t);
                }
            }
            keep.push(fresh);
        }
        let kept = filter_record_batch(&batch, &BooleanArray::from(keep))?;
        let emitted = match &self.select {
            None => RecordBatch::try_new(self.output_schema.clone(), kept.columns().to_vec())?,
            Some(select) => {
                let columns = select
                    .iter()
                    .map(|e| e.evaluate(&kept)?.into_array(kept.num_rows()))
                    .collect::<datafusion::common::Result<Vec<_>>>()?;
                RecordBatch::try_new(self.output_schema.clone(), columns)?
            }
        };
        out.push(emitted);
        Ok(())
    }

    async fn on_watermark(&mut self, watermark: Watermark, _out: &mut Output) -> Result<()> {
        self.watermark = watermark;
        for key in self.seen.take_due(watermark) {
            self.seen.remove(&key);
        }
        Ok(())
    }

    fn partitioning(&self) -> Partitioning {
        Partitioning::by_key(&self.route)
    }

    fn tables(&mut self) -> Vec<&mut dyn StateTable> {
        vec![&mut self.seen]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::testing::{epoch, find, optimized, transplant};
    use arrow::array::{Int64Array, TimestampMicrosecondArray};
    use arrow::datatypes::{Schema, TimeUnit};
    use datafusion::logical_expr::LogicalPlan;

    fn rows(ids: &[i64], ts: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(ids.to_vec())),
                Arc::new(TimestampMicrosecondArray::from(ts.to_vec())),
            ],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn first_rows_pass_at_once_and_keys_expire_with_the_watermark() {
        let (plan, state) =
            optimized("SELECT DISTINCT id, ts FROM t", &[("t", rows(&[], &[]))]).await;
        let LogicalPlan::Distinct(d) = find(&plan, &|p| matches!(p, LogicalPlan::Distinct(_)))
        else {
            unreachable!()
        };
        let mut op = Dedup::new(&d, &state, Some(1)).unwrap();
        let mut restarted = Dedup::new(&d, &state, Some(1)).unwrap();
        let out = epoch(
            &mut op,
            vec![(0, rows(&[1, 1, 2], &[10, 10, 20]))],
            Watermark(15),
        )
        .await;
        assert_eq!(out.rows(), 2);
        assert_eq!(
            op.state_size().rows,
            1,
            "key (1, 10) is behind the watermark: forgotten"
        );
        transplant(&mut op, &mut restarted);
        let out = epoch(
            &mut restarted,
            vec![(0, rows(&[2, 3], &[20, 30]))],
            Watermark(25),
        )
        .await;
        assert_eq!(out.rows(), 1, "(2, 20) was seen before the restart");
        assert_eq!(restarted.state_size().rows, 1);
    }
}
