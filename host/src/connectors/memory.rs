//! In-memory sources and sinks and the console sink: for tests, the Rust API and `sink.stream
//! = "console"`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use serde_json::{Value, json};

use super::sink::Sink;
use super::source::{Input, StreamSource, row_of};
use crate::error::Result;

/// Fixed batches replayed one per poll; for tests and the Rust API.
pub struct ReplaySource {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

impl ReplaySource {
    /// A source that yields `batches` in order, then ends.
    pub fn new(schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        ReplaySource { schema, batches }
    }
}

impl StreamSource for ReplaySource {
    fn kind(&self) -> &'static str {
        "replay"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn initial(&mut self) -> Result<Value> {
        Ok(json!({ "batch": 0 }))
    }

    fn available(&mut self, from: &Value, _max_rows: usize) -> Result<Value> {
        let at = row_of(from, "batch")?;
        Ok(json!({ "batch": (at + 1).min(self.batches.len() as i64) }))
    }

    fn read(&mut self, from: &Value, to: &Value) -> Result<Input> {
        let (a, b) = (
            row_of(from, "batch")? as usize,
            row_of(to, "batch")? as usize,
        );
        Ok(Input {
            batches: self.batches[a..b].to_vec(),
            ..Input::default()
        })
    }

    fn finished(&self, at: &Value) -> bool {
        at["batch"].as_i64() == Some(self.batches.len() as i64)
    }
}

/// Prints each epoch's rows as a table.
pub struct ConsoleSink {
    /// Most rows shown per epoch.
    pub max_rows: usize,
}

#[async_trait::async_trait]
impl Sink for ConsoleSink {
    /// A replayed epoch is printed again.
    fn keeps_replayed_epochs(&self) -> bool {
        false
    }

    async fn write_epoch(
        &mut self,
        epoch: u64,
        _schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows == 0 {
            return Ok(());
        }
        let mut shown = Vec::new();
        let mut left = self.max_rows;
        for b in batches {
            if left == 0 {
                break;
            }
            let n = b.num_rows().min(left);
            shown.push(b.slice(0, n));
            left -= n;
        }
        let table = arrow::util::pretty::pretty_format_batches(&shown)?;
        let more = if rows > self.max_rows {
            format!("\n… {} more rows", rows - self.max_rows)
        } else {
            String::new()
        };
        println!("-- epoch {epoch}: {rows} rows\n{table}{more}");
        Ok(())
    }
}

/// Keeps each epoch's output in memory (the Rust API and tests read it back).
#[derive(Clone, Default)]
pub struct MemorySink {
    epochs: Arc<Mutex<BTreeMap<u64, Vec<RecordBatch>>>>,
}

impl MemorySink {
    /// Output so far, by epoch.
    pub fn epochs(&self) -> BTreeMap<u64, Vec<RecordBatch>> {
        self.epochs.lock().expect("sink lock").clone()
    }

    /// All rows written, in epoch order.
    pub fn batches(&self) -> Vec<RecordBatch> {
        self.epochs().into_values().flatten().collect()
    }
}

#[async_trait::async_trait]
impl Sink for MemorySink {
    /// A replayed epoch replaces its rows.
    fn keeps_replayed_epochs(&self) -> bool {
        false
    }

    async fn write_epoch(
        &mut self,
        epoch: u64,
        _schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        self.epochs
            .lock()
            .expect("sink lock")
            .insert(epoch, batches.to_vec());
        Ok(())
    }
}
