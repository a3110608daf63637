//! Streaming sinks. Each epoch's output is written under the epoch's number, so writing it
//! again after a crash replaces it instead of adding to it: exactly-once output from an
//! at-least-once write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::error::{Result, RiffleError};

/// Where a streaming query's output goes. Async because transactional sinks (Delta, Kafka)
/// talk to storage and brokers inside the query's runtime.
#[async_trait::async_trait]
pub trait Sink: Send {
    /// Called once before the first epoch with the query's id (stable across restarts from
    /// the same checkpoint, new for a new checkpoint): transactional sinks derive their
    /// transaction ids from it.
    ///
    /// # Errors
    /// Connection errors.
    async fn start(&mut self, _query_id: &str) -> Result<()> {
        Ok(())
    }

    /// Writes epoch `epoch`'s rows, replacing anything written for that epoch before.
    ///
    /// # Errors
    /// I/O errors.
    async fn write_epoch(
        &mut self,
        epoch: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()>;
}

/// A directory of Parquet files, one per epoch with output: `part-<epoch>.parquet`.
pub struct ParquetDirSink {
    dir: PathBuf,
}

impl ParquetDirSink {
    /// A sink writing into `dir` (created if missing).
    ///
    /// # Errors
    /// I/O errors creating the directory.
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| RiffleError::io("creating", dir, e))?;
        Ok(ParquetDirSink {
            dir: dir.to_path_buf(),
        })
    }
}

#[async_trait::async_trait]
impl Sink for ParquetDirSink {
    async fn write_epoch(
        &mut self,
        epoch: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        let path = self.dir.join(format!("part-{epoch:010}.parquet"));
        if batches.iter().all(|b| b.num_rows() == 0) {
            // A replayed epoch that now has no rows must not leave an older file behind.
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        // Hidden temporary name: readers of the directory skip it until the rename.
        let tmp = self.dir.join(format!(".part-{epoch:010}.parquet.tmp"));
        let file = std::fs::File::create(&tmp).map_err(|e| RiffleError::io("creating", &tmp, e))?;
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None)
            .map_err(|e| RiffleError::Internal(format!("parquet writer: {e}")))?;
        for b in batches {
            writer
                .write(b)
                .map_err(|e| RiffleError::io("writing", &tmp, std::io::Error::other(e)))?;
        }
        writer
            .close()
            .map_err(|e| RiffleError::io("writing", &tmp, std::io::Error::other(e)))?;
        crate::checkpoint::publish(&tmp, &path)
    }
}

/// Prints each epoch's rows as a table.
pub struct ConsoleSink {
    /// Most rows shown per epoch.
    pub max_rows: usize,
}

#[async_trait::async_trait]
impl Sink for ConsoleSink {
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
