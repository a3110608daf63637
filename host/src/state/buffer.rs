//! [`RowBuffer`]: rows held until the watermark passes their event time.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{Int64Type, Schema, SchemaRef};

use super::{StateSize, StateTable};
use crate::common::{Watermark, to_micros};
use crate::error::{Result, RiffleError};

const RELEASED_BELOW: &str = "riffle.released_below";

/// Rows waiting for the watermark, in Arrow batches.
///
/// Rows are released strictly by event time (`release` hands out every row older than the
/// watermark), which makes the delta tiny: the rows added since the last checkpoint that are
/// still held, plus the watermark below which rows were released. Restoring applies the same
/// release to the older rows and appends the new ones. Rows must have an event time: the
/// operator routes rows without one elsewhere before pushing.
pub struct RowBuffer {
    name: String,
    schema: SchemaRef,
    ts: usize,
    batches: Vec<RecordBatch>,
    added: Vec<RecordBatch>,
    released_below: Option<Watermark>,
    rows: usize,
}

impl RowBuffer {
    /// An empty buffer of rows with `schema`, whose event time is column `ts` (a timestamp,
    /// date or `Int64` microseconds).
    pub fn new(name: impl Into<String>, schema: SchemaRef, ts: usize) -> Self {
        RowBuffer {
            name: name.into(),
            schema,
            ts,
            batches: Vec::new(),
            added: Vec::new(),
            released_below: None,
            rows: 0,
        }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no rows are held.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Holds `batch`'s rows.
    pub fn push(&mut self, batch: RecordBatch) {
        if batch.num_rows() == 0 {
            return;
        }
        self.rows += batch.num_rows();
        self.added.push(batch.clone());
        self.batches.push(batch);
    }

    fn split(
        &self,
        batch: &RecordBatch,
        watermark: Watermark,
    ) -> Result<(RecordBatch, RecordBatch)> {
        let ts = to_micros(batch.column(self.ts))?;
        let ts = ts.as_primitive::<Int64Type>();
        let early: BooleanArray = ts
            .iter()
            .map(|t| Some(t.is_some_and(|t| watermark.is_late(t))))
            .collect();
        if early.true_count() == 0 {
            return Ok((batch.slice(0, 0), batch.clone()));
        }
        if early.true_count() == batch.num_rows() {
            return Ok((batch.clone(), batch.slice(0, 0)));
        }
        let later = arrow::compute::not(&early)?;
        Ok((
            filter_record_batch(batch, &early)?,
            filter_record_batch(batch, &later)?,
        ))
    }

    /// Takes every held row whose event time is before `watermark`.
    ///
    /// # Errors
    /// Evaluation errors.
    pub fn release(&mut self, watermark: Watermark) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        let mut kept = Vec::with_capacity(self.batches.len());
        for batch in std::mem::take(&mut self.batches) {
            let (early, later) = self.split(&batch, watermark)?;
            if early.num_rows() > 0 {
                self.rows -= early.num_rows();
                out.push(early);
            }
            if later.num_rows() > 0 {
                kept.push(later);
            }
        }
        self.batches = kept;
        if !out.is_empty() {
            let mut added = Vec::with_capacity(self.added.len());
            for batch in std::mem::take(&mut self.added) {
                let (_, later) = self.split(&batch, watermark)?;
                if later.num_rows() > 0 {
                    added.push(later);
                }
            }
            self.added = added;
        }
        // Recorded even when nothing was released: the buffers of an operator's instances
        // (partitions) then all say how far they released, and a delta that is their union
        // says it whichever of them comes first.
        if watermark != Watermark::NONE {
            self.released_below = Some(watermark.max(self.released_below.unwrap_or(watermark)));
        }
        Ok(out)
    }

    /// The held rows (in no particular order).
    pub fn batches(&self) -> &[RecordBatch] {
        &self.batches
    }

    fn encode(
        &self,
        batches: &[RecordBatch],
        released_below: Option<Watermark>,
    ) -> Result<RecordBatch> {
        let mut metadata: HashMap<String, String> = self.schema.metadata().clone();
        metadata.insert("riffle.table".into(), self.name.clone());
        if let Some(w) = released_below {
            metadata.insert(RELEASED_BELOW.into(), w.0.to_string());
        }
        let schema = Arc::new(Schema::new(self.schema.fields().clone()).with_metadata(metadata));
        let batch = concat_batches(&self.schema, batches)?;
        Ok(batch.with_schema(schema)?)
    }

    /// Applies one batch of a snapshot or delta.
    fn restore_one(&mut self, batch: &RecordBatch, snapshot: bool) -> Result<()> {
        if batch.schema().fields() != self.schema.fields() {
            return Err(RiffleError::Checkpoint(format!(
                "state table {}: the checkpoint's rows have other columns than this query's \
                 ({} vs {})",
                self.name,
                batch.schema(),
                self.schema
            )));
        }
        if let (false, Some(w)) = (snapshot, batch.schema().metadata().get(RELEASED_BELOW)) {
            let w = w.parse().map_err(|_| {
                RiffleError::Checkpoint(format!("state table {}: bad {RELEASED_BELOW}", self.name))
            })?;
            self.release(Watermark(w))?;
        }
        let rows = RecordBatch::try_new(self.schema.clone(), batch.columns().to_vec())?;
        self.push(rows);
        Ok(())
    }
}

impl StateTable for RowBuffer {
    fn name(&self) -> &str {
        &self.name
    }

    fn take_delta(&mut self) -> Result<Vec<RecordBatch>> {
        if self.added.is_empty() && self.released_below.is_none() {
            return Ok(Vec::new());
        }
        let added = std::mem::take(&mut self.added);
        let released = self.released_below.take();
        Ok(vec![self.encode(&added, released)?])
    }

    fn forget_changes(&mut self) {
        self.added.clear();
        self.released_below = None;
    }

    fn snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        self.added.clear();
        self.released_below = None;
        let batch = self.encode(&self.batches, None)?;
        // One compact batch from now on.
        self.batches = if batch.num_rows() > 0 {
            vec![RecordBatch::try_new(
                self.schema.clone(),
                batch.columns().to_vec(),
            )?]
        } else {
            Vec::new()
        };
        Ok(vec![batch])
    }

    fn restore(&mut self, batches: &[RecordBatch], snapshot: bool) -> Result<()> {
        if snapshot {
            self.batches.clear();
            self.rows = 0;
        }
        for batch in batches {
            self.restore_one(batch, snapshot)?;
        }
        self.added.clear();
        self.released_below = None;
        Ok(())
    }

    fn size(&self) -> StateSize {
        StateSize {
            rows: self.rows as u64,
            bytes: self
                .batches
                .iter()
                .map(|b| b.get_array_memory_size() as u64)
                .sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("ts", DataType::Int64, false),
            Field::new("v", DataType::Utf8, false),
        ]))
    }

    fn batch(ts: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(Int64Array::from(ts.to_vec())),
                Arc::new(StringArray::from(
                    ts.iter().map(|t| format!("row{t}")).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap()
    }

    fn times(batches: &[RecordBatch]) -> Vec<i64> {
        let mut v: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn deltas_restore_exactly_what_is_held() {
        let mut live = RowBuffer::new("pending", schema(), 0);
        let mut files: Vec<(Vec<RecordBatch>, bool)> = Vec::new();
        let mut released = Vec::new();
        for epoch in 0..20i64 {
            live.push(batch(&[epoch * 10 + 7, epoch * 10 - 5, epoch * 10 + 30]));
            released.extend(times(&live.release(Watermark(epoch * 10)).unwrap()));
            if epoch == 8 {
                files = vec![(live.snapshot().unwrap(), true)];
            } else {
                let d = live.take_delta().unwrap();
                if !d.is_empty() {
                    files.push((d, false));
                }
            }
            let mut restored = RowBuffer::new("pending", schema(), 0);
            for (b, snap) in &files {
                restored.restore(b, *snap).unwrap();
            }
            assert_eq!(
                times(restored.batches()),
                times(live.batches()),
                "epoch {epoch}"
            );
            assert_eq!(restored.len(), live.len());
        }
        // Every row released exactly once, in some epoch after the watermark passed it.
        let mut all = released.clone();
        all.extend(times(live.batches()));
        all.sort();
        let mut expected: Vec<i64> = (0..20)
            .flat_map(|e| [e * 10 + 7, e * 10 - 5, e * 10 + 30])
            .collect();
        expected.sort();
        assert_eq!(all, expected);
    }
}
