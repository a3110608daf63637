//! Streaming session windows.
//!
//! A session's bounds depend on rows that may still arrive, so until the watermark passes a
//! session's end its rows are kept as they are (the operator's state is those rows). When a
//! session closes, its rows go through fresh accumulators, the same ones batch mode uses, and the
//! finished row is emitted once: session windows run in append mode, as in Spark.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, take};
use arrow::datatypes::{Int64Type, SchemaRef};
use arrow::row::RowConverter;
use datafusion::common::ScalarValue;
use datafusion::execution::SessionState;
use datafusion::logical_expr::Aggregate;
use datafusion::physical_plan::PhysicalExpr;

use super::aggregate::{AggSpec, GroupKeys, append_aggregate_columns, micros, update};
use super::{StateRows, Watermarked};
use crate::error::{Result, RiffleError};
use crate::plan::window::{WindowKind, window_array};

/// Streaming `GROUP BY session_window(ts, gap), keys...`.
pub struct SessionAggregate {
    window_position: usize,
    gap: i64,
    ts: Arc<dyn PhysicalExpr>,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    converter: RowConverter,
    aggs: Vec<AggSpec>,
    input_schema: SchemaRef,
    output_schema: SchemaRef,
    pending: Vec<RecordBatch>,
    dirty: bool,
}

impl SessionAggregate {
    /// Plans the operator for an `Aggregate` grouped by `session_window`.
    ///
    /// # Errors
    /// [`RiffleError::Config`] for unsupported aggregates.
    pub fn new(agg: &Aggregate, state: &SessionState) -> Result<Self> {
        let keys = GroupKeys::plan(agg, state, false)?;
        let Some((window_position, WindowKind::Session(gap), ts)) = keys.window else {
            return Err(RiffleError::Internal(
                "SessionAggregate planned without a session_window".into(),
            ));
        };
        Ok(SessionAggregate {
            window_position,
            gap,
            ts,
            keys: keys.keys,
            converter: keys.converter,
            aggs: AggSpec::plan(agg, state)?,
            input_schema: Arc::new(agg.input.schema().as_arrow().clone()),
            output_schema: Arc::new(agg.schema.as_arrow().clone()),
            pending: Vec::new(),
            dirty: false,
        })
    }
}

impl Watermarked for SessionAggregate {
    fn process(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() > 0 {
            self.pending.push(batch.clone());
            self.dirty = true;
        }
        Ok(())
    }

    fn advance(&mut self, watermark: i64) -> Result<Vec<RecordBatch>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let all = concat_batches(&self.input_schema, &self.pending)?;
        let rows = all.num_rows();
        let ts = micros(&self.ts, &all)?;
        let ts = ts.as_primitive::<Int64Type>();
        let key_arrays = self
            .keys
            .iter()
            .map(|k| k.evaluate(&all)?.into_array(rows))
            .collect::<datafusion::common::Result<Vec<ArrayRef>>>()?;
        let encoded = self.converter.convert_columns(&key_arrays)?;
        let mut order: Vec<u32> = (0..rows as u32)
            .filter(|&i| ts.is_valid(i as usize))
            .collect();
        order.sort_by(|&a, &b| {
            encoded
                .row(a as usize)
                .cmp(&encoded.row(b as usize))
                .then(ts.value(a as usize).cmp(&ts.value(b as usize)))
        });

        // Walk each key's rows in time order, cutting sessions at gaps of `gap` or more.
        let mut closed: Vec<(i64, i64, Vec<u32>)> = Vec::new();
        let mut kept: Vec<u32> = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let mut j = i + 1;
            while j < order.len()
                && encoded.row(order[j] as usize) == encoded.row(order[i] as usize)
                && ts.value(order[j] as usize) - ts.value(order[j - 1] as usize) < self.gap
            {
                j += 1;
            }
            let start = ts.value(order[i] as usize);
            let end = ts.value(order[j - 1] as usize) + self.gap;
            if end <= watermark {
                closed.push((start, end, order[i..j].to_vec()));
            } else {
                kept.extend_from_slice(&order[i..j]);
            }
            i = j;
        }
        if closed.is_empty() {
            return Ok(Vec::new());
        }
        self.dirty = true;
        let evaluated = self
            .aggs
            .iter()
            .map(|a| a.evaluate(&all))
            .collect::<Result<Vec<_>>>()?;
        let mut values: Vec<Vec<ScalarValue>> = vec![Vec::new(); self.aggs.len()];
        let (mut starts, mut ends, mut firsts) = (Vec::new(), Vec::new(), Vec::new());
        for (start, end, members) in closed {
            starts.push(start);
            ends.push(end);
            firsts.push(members[0]);
            let ids = UInt32Array::from(members);
            for (k, (spec, (args, mask))) in self.aggs.iter().zip(&evaluated).enumerate() {
                let mut acc = spec.expr.create_accumulator()?;
                update(acc.as_mut(), args, mask.as_ref(), &ids)?;
                values[k].push(acc.evaluate()?);
            }
        }
        let firsts = UInt32Array::from(firsts);
        let mut columns = key_arrays
            .iter()
            .map(|a| take(a.as_ref(), &firsts, None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        columns.insert(self.window_position, window_array(starts, ends));
        append_aggregate_columns(&mut columns, values, &self.output_schema)?;
        kept.sort_unstable();
        let remaining = take_batch(&all, &kept)?;
        self.pending = if remaining.num_rows() > 0 {
            vec![remaining]
        } else {
            Vec::new()
        };
        Ok(vec![RecordBatch::try_new(
            self.output_schema.clone(),
            columns,
        )?])
    }

    fn checkpoint(&mut self, full: bool) -> Result<Option<RecordBatch>> {
        // The open sessions' rows are small (the watermark delay's worth) and their bounds
        // shift as rows arrive, so every checkpoint is a full snapshot of them.
        if !self.dirty && !full {
            return Ok(None);
        }
        self.dirty = false;
        Ok(Some(concat_batches(&self.input_schema, &self.pending)?))
    }

    fn checkpoint_is_snapshot(&self) -> bool {
        true
    }

    fn restore(&mut self, batch: &RecordBatch) -> Result<()> {
        self.pending = vec![batch.clone()];
        Ok(())
    }

    fn state_rows(&self) -> StateRows {
        StateRows {
            rows: self.pending.iter().map(|b| b.num_rows() as u64).sum(),
            bytes: self
                .pending
                .iter()
                .map(|b| b.get_array_memory_size() as u64)
                .sum(),
        }
    }

    fn output_schema(&self) -> SchemaRef {
        self.output_schema.clone()
    }
}

fn take_batch(batch: &RecordBatch, rows: &[u32]) -> Result<RecordBatch> {
    let ids = UInt32Array::from(rows.to_vec());
    Ok(arrow::compute::take_record_batch(batch, &ids)?)
}
