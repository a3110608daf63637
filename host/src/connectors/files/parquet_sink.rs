//! A directory of Parquet files as a streaming sink, one file per epoch.

use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;

use crate::connectors::sink::{Acknowledgement, Sink};
use crate::error::{Result, RiffleError};

/// A directory of Parquet files, one per epoch with output: `part-<epoch>-<query id>.parquet`.
///
/// Files are named by the query's id as well as the epoch, so a new query (a new checkpoint)
/// writing into the same directory adds its files beside the old ones instead of replacing
/// them, while a replayed epoch of the same query replaces its own file.
///
/// An epoch's file is written under a hidden temporary name by [`Sink::write_epoch`] and
/// published (synced, renamed, its directory synced) by the epoch's
/// [acknowledgement](Sink::acknowledgement), which the checkpoint's commit writer runs before
/// it commits the epoch: the two syncs, about a millisecond of waiting an epoch here, no
/// longer hold up the next epoch's reading and operators on the query's own thread.
pub struct ParquetDirSink {
    dir: PathBuf,
    query_id: String,
    /// Key-value metadata of every file: the UDF modules that produced it.
    metadata: Vec<(String, String)>,
    /// The last epoch's file, written and not yet published: (temporary path, final path).
    unpublished: Option<(PathBuf, PathBuf)>,
}

impl ParquetDirSink {
    /// A sink writing into `dir` (created if missing).
    ///
    /// # Errors
    /// I/O errors creating the directory.
    pub fn new(dir: &Path) -> Result<Self> {
        crate::common::fs::create_dir_durable(dir)?;
        Ok(ParquetDirSink {
            dir: dir.to_path_buf(),
            query_id: String::new(),
            metadata: Vec::new(),
            unpublished: None,
        })
    }

    /// Stamps every file's key-value metadata with `(riffle.udf.<module>, sha256)` pairs.
    pub fn with_udf_modules(mut self, modules: Vec<(String, String)>) -> Self {
        self.metadata = modules;
        self
    }
}

#[async_trait::async_trait]
impl Sink for ParquetDirSink {
    fn set_udf_modules(&mut self, modules: Vec<(String, String)>) {
        self.metadata = modules;
    }

    /// A replayed epoch replaces its file.
    fn keeps_replayed_epochs(&self) -> bool {
        false
    }

    async fn start(&mut self, query_id: &str) -> Result<()> {
        self.query_id = query_id.to_string();
        Ok(())
    }

    async fn write_epoch(
        &mut self,
        epoch: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        let path = self
            .dir
            .join(format!("part-{epoch:010}-{}.parquet", self.query_id));
        if batches.iter().all(|b| b.num_rows() == 0) {
            // A replayed epoch that now has no rows must not leave an older file behind.
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        // Hidden temporary name: readers of the directory skip it until the rename.
        let tmp = crate::common::fs::temp_path(&path);
        let file = std::fs::File::create(&tmp).map_err(|e| RiffleError::io("creating", &tmp, e))?;
        let mut metadata = vec![parquet::file::metadata::KeyValue::new(
            "riffle.epoch".to_string(),
            epoch.to_string(),
        )];
        metadata.extend(
            self.metadata
                .iter()
                .map(|(k, v)| parquet::file::metadata::KeyValue::new(k.clone(), v.clone())),
        );
        let props = parquet::file::properties::WriterProperties::builder()
            .set_key_value_metadata(Some(metadata))
            .build();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(props))
            .map_err(|e| RiffleError::Internal(format!("parquet writer: {e}")))?;
        for b in batches {
            writer
                .write(b)
                .map_err(|e| RiffleError::io("writing", &tmp, std::io::Error::other(e)))?;
        }
        writer
            .close()
            .map_err(|e| RiffleError::io("writing", &tmp, std::io::Error::other(e)))?;
        self.unpublished = Some((tmp, path));
        Ok(())
    }

    /// Publishes the epoch's file, on the commit writer's thread, before the epoch commits.
    fn acknowledgement(&mut self, _epoch: u64) -> Option<Acknowledgement> {
        let (tmp, path) = self.unpublished.take()?;
        Some(Box::new(move || crate::common::fs::publish(&tmp, &path)))
    }
}
