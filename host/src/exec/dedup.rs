//! Streaming de-duplication (`SELECT DISTINCT ...` and `SELECT DISTINCT ON (key) ...`).
//!
//! The first row seen for a key is emitted at once; later rows with that key are dropped. A key
//! is remembered until the watermark passes its event time: any row with that key arriving after
//! that is behind the watermark and dropped as late anyway, so state stays bounded (Spark's
//! `dropDuplicatesWithinWatermark`). Without an event-time column the keys are kept forever.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Distinct, Expr, ExprSchemable};
use datafusion::physical_plan::PhysicalExpr;

use super::aggregate::micros;
use super::{StateRows, Watermarked};
use crate::error::Result;

/// Streaming `DISTINCT`.
pub struct Dedup {
    keys: Vec<Arc<dyn PhysicalExpr>>,
    converter: RowConverter,
    /// The event-time column of the input, if it has one.
    ts: Option<Arc<dyn PhysicalExpr>>,
    /// Output expressions (`DISTINCT ON`'s select list); `None` passes rows through.
    select: Option<Vec<Arc<dyn PhysicalExpr>>>,
    output_schema: SchemaRef,
    seen: HashMap<Box<[u8]>, i64>,
    added: Vec<Box<[u8]>>,
    deleted: Vec<Box<[u8]>>,
    output: Vec<RecordBatch>,
}

impl Dedup {
    /// Plans the operator; `event_time` names the input's event-time column, if any.
    ///
    /// # Errors
    /// Planning errors from DataFusion.
    pub fn new(
        distinct: &Distinct,
        state: &SessionState,
        event_time: Option<&str>,
    ) -> Result<Self> {
        let input = distinct.input();
        let schema = input.schema();
        let (key_exprs, select, output_schema): (Vec<Expr>, _, _) = match distinct {
            Distinct::All(_) => (
                schema.columns().into_iter().map(Expr::Column).collect(),
                None,
                Arc::new(schema.as_arrow().clone()),
            ),
            Distinct::On(on) => (
                on.on_expr.clone(),
                Some(
                    on.select_expr
                        .iter()
                        .map(|e| state.create_physical_expr(e.clone(), schema))
                        .collect::<datafusion::common::Result<Vec<_>>>()?,
                ),
                Arc::new(on.schema.as_arrow().clone()),
            ),
        };
        let fields = key_exprs
            .iter()
            .map(|e| Ok(SortField::new(e.get_type(schema)?)))
            .collect::<Result<Vec<_>>>()?;
        let keys = key_exprs
            .into_iter()
            .map(|e| state.create_physical_expr(e, schema))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        let ts = match event_time {
            Some(name) => schema
                .columns()
                .into_iter()
                .find(|c| c.name == name)
                .map(|c| state.create_physical_expr(Expr::Column(c), schema))
                .transpose()?,
            None => None,
        };
        Ok(Dedup {
            keys,
            converter: RowConverter::new(fields)?,
            ts,
            select,
            output_schema,
            seen: HashMap::new(),
            added: Vec::new(),
            deleted: Vec::new(),
            output: Vec::new(),
        })
    }
}

impl Watermarked for Dedup {
    fn process(&mut self, batch: &RecordBatch) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let keys = self
            .keys
            .iter()
            .map(|k| k.evaluate(batch)?.into_array(rows))
            .collect::<datafusion::common::Result<Vec<ArrayRef>>>()?;
        let encoded = self.converter.convert_columns(&keys)?;
        let ts = match &self.ts {
            Some(ts) => Some(micros(ts, batch)?),
            None => None,
        };
        let ts = ts.as_ref().map(|t| t.as_primitive::<Int64Type>());
        let mut keep = Vec::with_capacity(rows);
        for i in 0..rows {
            let key = encoded.row(i).data();
            let fresh = !self.seen.contains_key(key);
            if fresh {
                let t = ts
                    .map(|t| if t.is_valid(i) { t.value(i) } else { i64::MAX })
                    .unwrap_or(i64::MAX);
                self.seen.insert(key.into(), t);
                self.added.push(key.into());
            }
            keep.push(fresh);
        }
        let kept = filter_record_batch(batch, &BooleanArray::from(keep))?;
        let out = match &self.select {
            None => kept,
            Some(select) => {
                let columns = select
                    .iter()
                    .map(|e| e.evaluate(&kept)?.into_array(kept.num_rows()))
                    .collect::<datafusion::common::Result<Vec<_>>>()?;
                RecordBatch::try_new(self.output_schema.clone(), columns)?
            }
        };
        if out.num_rows() > 0 {
            self.output.push(out);
        }
        Ok(())
    }

    fn advance(&mut self, watermark: i64) -> Result<Vec<RecordBatch>> {
        if self.ts.is_some() {
            let expired: Vec<Box<[u8]>> = self
                .seen
                .iter()
                .filter(|(_, t)| **t < watermark)
                .map(|(k, _)| k.clone())
                .collect();
            for k in expired {
                self.seen.remove(&k);
                self.deleted.push(k);
            }
        }
        Ok(std::mem::take(&mut self.output))
    }

    fn checkpoint(&mut self, full: bool) -> Result<Option<RecordBatch>> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("key", DataType::Binary, false),
            Field::new("deleted", DataType::Boolean, false),
            Field::new("ts", DataType::Int64, true),
        ]));
        let mut keys: Vec<Box<[u8]>> = Vec::new();
        let mut deleted = Vec::new();
        let mut times = Vec::new();
        if full {
            self.added.clear();
            for (k, t) in &self.seen {
                keys.push(k.clone());
                deleted.push(false);
                times.push(Some(*t));
            }
        } else {
            for k in self.added.drain(..) {
                if let Some(t) = self.seen.get(&k) {
                    times.push(Some(*t));
                    keys.push(k);
                    deleted.push(false);
                }
            }
        }
        for k in self.deleted.drain(..) {
            keys.push(k);
            deleted.push(true);
            times.push(None);
        }
        if keys.is_empty() && !full {
            return Ok(None);
        }
        Ok(Some(RecordBatch::try_new(
            schema,
            vec![
                Arc::new(BinaryArray::from_iter_values(keys.iter())),
                Arc::new(BooleanArray::from(deleted)),
                Arc::new(Int64Array::from(times)),
            ],
        )?))
    }

    fn restore(&mut self, batch: &RecordBatch) -> Result<()> {
        let keys = batch.column(0).as_binary::<i32>();
        let deleted = batch.column(1).as_boolean();
        let times = batch.column(2).as_primitive::<Int64Type>();
        for i in 0..batch.num_rows() {
            if deleted.value(i) {
                self.seen.remove(keys.value(i));
            } else {
                self.seen.insert(keys.value(i).into(), times.value(i));
            }
        }
        Ok(())
    }

    fn state_rows(&self) -> StateRows {
        StateRows {
            rows: self.seen.len() as u64,
            bytes: self.seen.keys().map(|k| k.len() as u64 + 8).sum(),
        }
    }

    fn output_schema(&self) -> SchemaRef {
        self.output_schema.clone()
    }
}
