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
/// longer hold up the next epoch's reading and operators on the query's own thread. Readers
/// of the directory skip hidden files; those a crash leaves (up to one per epoch in flight)
/// go when the query next starts.
pub struct ParquetDirSink {
    dir: PathBuf,
    query_id: String,
    /// Key-value metadata of every file: the UDF modules that produced it.
    metadata: Vec<(String, String)>,
    /// What the last epoch's acknowledgement is to do, not yet taken.
    unpublished: Option<Unpublished>,
}

/// An epoch's change to the directory, made durable by its acknowledgement.
enum Unpublished {
    /// A file written under a temporary name: (temporary path, final path).
    File(PathBuf, PathBuf),
    /// A replayed epoch without rows: its earlier file, if any, removed.
    Removed(PathBuf),
}

impl Unpublished {
    fn publish(self) -> Result<()> {
        match self {
            Unpublished::File(tmp, path) => crate::common::fs::publish(&tmp, &path),
            Unpublished::Removed(path) => match std::fs::remove_file(&path) {
                Ok(()) => crate::common::fs::sync_parent(&path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(RiffleError::io("removing", &path, e)),
            },
        }
    }
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

    /// Also removes this query's temporary files that a crash left (the checkpoint's lock
    /// says no other run of the query writes here).
    async fn start(&mut self, query_id: &str) -> Result<()> {
        self.query_id = query_id.to_string();
        let ours = format!("-{query_id}.parquet.");
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".part-") && name.contains(&ours) && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    async fn write_epoch(
        &mut self,
        epoch: u64,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<()> {
        if self.unpublished.is_some() {
            return Err(RiffleError::Internal(format!(
                "epoch {epoch} written to a Parquet directory before the last epoch's \
                 acknowledgement was taken"
            )));
        }
        let path = self
            .dir
            .join(format!("part-{epoch:010}-{}.parquet", self.query_id));
        if batches.iter().all(|b| b.num_rows() == 0) {
            // A replayed epoch that now has no rows must not leave an older file behind.
            self.unpublished = Some(Unpublished::Removed(path));
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
        self.unpublished = Some(Unpublished::File(tmp, path));
        Ok(())
    }

    /// Publishes the epoch's file (or removes a replayed empty epoch's), on the commit
    /// writer's thread, before the epoch commits.
    fn acknowledgement(&mut self, _epoch: u64) -> Option<Acknowledgement> {
        let unpublished = self.unpublished.take()?;
        Some(Box::new(move || unpublished.publish()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn visible(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    fn hidden(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .count()
    }

    /// An epoch's file appears under its name only when its acknowledgement runs; a
    /// replayed empty epoch's file goes then too; a restart removes the query's leftover
    /// temporaries and no one else's.
    #[tokio::test]
    async fn an_epochs_file_is_published_by_its_acknowledgement() {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let rows =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1, 2]))])
                .unwrap();
        let mut sink = ParquetDirSink::new(dir.path()).unwrap();
        sink.start("q").await.unwrap();
        sink.write_epoch(1, &schema, std::slice::from_ref(&rows))
            .await
            .unwrap();
        assert!(visible(dir.path()).is_empty());
        assert_eq!(hidden(dir.path()), 1);
        // The acknowledgement must be taken before the next epoch is written.
        let error = sink
            .write_epoch(2, &schema, std::slice::from_ref(&rows))
            .await;
        assert!(matches!(error, Err(RiffleError::Internal(_))), "{error:?}");
        sink.acknowledgement(1).unwrap()().unwrap();
        assert_eq!(visible(dir.path()), ["part-0000000001-q.parquet"]);
        assert_eq!(hidden(dir.path()), 0);

        // Epoch 1 again, now without rows: its file goes with the acknowledgement.
        sink.write_epoch(1, &schema, &[]).await.unwrap();
        assert_eq!(visible(dir.path()).len(), 1);
        sink.acknowledgement(1).unwrap()().unwrap();
        assert!(visible(dir.path()).is_empty());

        // A crash leaves epoch 2's temporary: the query's next start removes it, and keeps
        // another query's.
        sink.write_epoch(2, &schema, std::slice::from_ref(&rows))
            .await
            .unwrap();
        let mut other = ParquetDirSink::new(dir.path()).unwrap();
        other.start("other").await.unwrap();
        other
            .write_epoch(2, &schema, std::slice::from_ref(&rows))
            .await
            .unwrap();
        assert_eq!(hidden(dir.path()), 2);
        let mut restarted = ParquetDirSink::new(dir.path()).unwrap();
        restarted.start("q").await.unwrap();
        assert_eq!(hidden(dir.path()), 1);
        other.acknowledgement(2).unwrap()().unwrap();
        assert_eq!(visible(dir.path()), ["part-0000000002-other.parquet"]);
    }
}
