//! Writing query results to files and to the terminal.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Result, RiffleError};
use crate::session::FileFormat;

/// Writes batches to `path` in the format its extension names, replacing the file atomically
/// (a crash never leaves a half-written file under the final name).
///
/// # Errors
/// [`RiffleError::Config`] for an unknown extension, [`RiffleError::Io`] for I/O failures.
pub fn write_file(
    path: &Path,
    schema: SchemaRef,
    batches: impl IntoIterator<Item = RecordBatch>,
) -> Result<u64> {
    let format = FileFormat::of(path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| RiffleError::io("creating", parent, e))?;
    }
    let tmp = path.with_extension(format!(
        "{}.tmp{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let file = File::create(&tmp).map_err(|e| RiffleError::io("creating", &tmp, e))?;
    let rows = write_batches(format, file, schema, batches)
        .map_err(|e| RiffleError::io("writing", path, std::io::Error::other(e)))?;
    std::fs::rename(&tmp, path).map_err(|e| RiffleError::io("renaming into place", path, e))?;
    Ok(rows)
}

/// Writes every batch; errors are the writer's own message (the caller names the file).
fn write_batches(
    format: FileFormat,
    file: File,
    schema: SchemaRef,
    batches: impl IntoIterator<Item = RecordBatch>,
) -> std::result::Result<u64, String> {
    let fail = |e: &dyn std::fmt::Display| e.to_string();
    let mut rows = 0u64;
    match format {
        FileFormat::Parquet => {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .build();
            let mut writer =
                ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| fail(&e))?;
            for batch in batches {
                rows += batch.num_rows() as u64;
                writer.write(&batch).map_err(|e| fail(&e))?;
            }
            writer.close().map_err(|e| fail(&e))?;
        }
        FileFormat::Csv => {
            let mut writer = arrow::csv::Writer::new(BufWriter::new(file));
            for batch in batches {
                rows += batch.num_rows() as u64;
                writer.write(&batch).map_err(|e| fail(&e))?;
            }
            writer.into_inner().flush().map_err(|e| fail(&e))?;
        }
        FileFormat::Json => {
            let mut writer = arrow::json::LineDelimitedWriter::new(BufWriter::new(file));
            for batch in batches {
                rows += batch.num_rows() as u64;
                writer.write(&batch).map_err(|e| fail(&e))?;
            }
            writer.finish().map_err(|e| fail(&e))?;
            writer.into_inner().flush().map_err(|e| fail(&e))?;
        }
    }
    Ok(rows)
}

/// Formats batches as a table for the terminal.
///
/// # Errors
/// Only for values Arrow cannot display.
pub fn pretty(batches: &[RecordBatch]) -> Result<String> {
    arrow::util::pretty::pretty_format_batches(batches)
        .map(|t| t.to_string())
        .map_err(|e| RiffleError::Internal(e.to_string()))
}
