//! Files: reading and writing Parquet, CSV and NDJSON, a directory as a streaming source
//! ([`directory`]), a directory of Parquet files as a sink ([`parquet_sink`]), and static
//! tables for stream-static joins ([`static_table`]).

pub mod directory;
pub mod parquet_sink;
pub mod static_table;

pub use directory::DirectorySource;
pub use parquet_sink::ParquetDirSink;
pub use static_table::{Reload, StaticTable};

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::common::FileFormat;
use crate::error::{Result, RiffleError};

/// Writes batches to `path` in the format its extension names, replacing the file atomically
/// and durably (a crash or power loss never leaves a half-written file under the final name).
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
        crate::common::fs::create_dir_durable(parent)?;
    }
    let tmp = crate::common::fs::temp_path(path);
    let file = File::create(&tmp).map_err(|e| RiffleError::io("creating", &tmp, e))?;
    let rows = write_batches(format, file, schema, batches).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        RiffleError::io("writing", path, std::io::Error::other(e))
    })?;
    crate::common::fs::publish(&tmp, path)?;
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

/// Reads a whole Parquet, CSV (with header) or NDJSON file.
///
/// # Errors
/// I/O and decoding errors naming the file; a schema mismatch is the user's error.
pub fn read_file(
    path: &Path,
    format: FileFormat,
    schema: Option<SchemaRef>,
) -> Result<Vec<RecordBatch>> {
    let file = std::fs::File::open(path).map_err(|e| RiffleError::io("opening", path, e))?;
    let bad = |e: arrow::error::ArrowError| {
        RiffleError::Config(format!("{}: cannot read: {e}", path.display()))
    };
    let batches: Vec<RecordBatch> = match format {
        FileFormat::Parquet => {
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .map_err(|e| RiffleError::Config(format!("{}: {e}", path.display())))?
                    .build()
                    .map_err(|e| RiffleError::Config(format!("{}: {e}", path.display())))?;
            reader.collect::<std::result::Result<_, _>>().map_err(bad)?
        }
        FileFormat::Csv => {
            let schema = match &schema {
                Some(s) => s.clone(),
                None => {
                    let mut f = std::fs::File::open(path)
                        .map_err(|e| RiffleError::io("opening", path, e))?;
                    let (s, _) = arrow::csv::reader::Format::default()
                        .with_header(true)
                        .infer_schema(&mut f, Some(1000))
                        .map_err(bad)?;
                    Arc::new(s)
                }
            };
            arrow::csv::ReaderBuilder::new(schema)
                .with_header(true)
                .build(file)
                .map_err(bad)?
                .collect::<std::result::Result<_, _>>()
                .map_err(bad)?
        }
        FileFormat::Json => {
            let schema = match &schema {
                Some(s) => s.clone(),
                None => {
                    let f = std::fs::File::open(path)
                        .map_err(|e| RiffleError::io("opening", path, e))?;
                    let (s, _) = arrow::json::reader::infer_json_schema(
                        std::io::BufReader::new(f),
                        Some(1000),
                    )
                    .map_err(bad)?;
                    Arc::new(s)
                }
            };
            arrow::json::ReaderBuilder::new(schema)
                .build(std::io::BufReader::new(file))
                .map_err(bad)?
                .collect::<std::result::Result<_, _>>()
                .map_err(bad)?
        }
    };
    if let Some(expected) = schema {
        for b in &batches {
            if b.schema().fields() != expected.fields() {
                return Err(RiffleError::Config(format!(
                    "{}: schema differs from the source's ({} vs {})",
                    path.display(),
                    b.schema(),
                    expected
                )));
            }
        }
    }
    Ok(batches)
}
