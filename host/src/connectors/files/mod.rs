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

/// Reads a whole Parquet, CSV (with header) or NDJSON file. With `schema`, columns are
/// matched by name, not position: a CSV header may list them in any order, a column the file
/// lacks is NULL if the schema allows it, and columns the schema does not name are dropped.
///
/// # Errors
/// I/O and decoding errors naming the file; a file whose columns do not fit the schema (a
/// missing non-nullable column, a value of the wrong type) is the user's error.
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
            // The header's names, each typed as the schema types it (text if it does not).
            let mut f =
                std::fs::File::open(path).map_err(|e| RiffleError::io("opening", path, e))?;
            let (inferred, _) = arrow::csv::reader::Format::default()
                .with_header(true)
                .infer_schema(
                    &mut f,
                    if schema.is_some() {
                        Some(0)
                    } else {
                        Some(1000)
                    },
                )
                .map_err(bad)?;
            let file_schema = match &schema {
                None => Arc::new(inferred),
                Some(want) => Arc::new(arrow::datatypes::Schema::new(
                    inferred
                        .fields()
                        .iter()
                        .map(|f| match want.field_with_name(f.name()) {
                            Ok(w) => {
                                arrow::datatypes::Field::new(f.name(), w.data_type().clone(), true)
                            }
                            Err(_) => arrow::datatypes::Field::new(
                                f.name(),
                                arrow::datatypes::DataType::Utf8,
                                true,
                            ),
                        })
                        .collect::<Vec<_>>(),
                )),
            };
            arrow::csv::ReaderBuilder::new(file_schema)
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
    match schema {
        None => Ok(batches),
        Some(want) => batches
            .iter()
            .map(|b| conform(b, &want))
            .collect::<std::result::Result<_, String>>()
            .map_err(|e| {
                RiffleError::Config(format!(
                    "{}: does not fit the source's schema ({want}): {e}",
                    path.display()
                ))
            }),
    }
}

/// `batch` with the columns of `want`, matched by name: cast where the type differs (a
/// value that does not convert is an error, never a silent NULL), NULL where a nullable
/// column is missing.
fn conform(batch: &RecordBatch, want: &SchemaRef) -> std::result::Result<RecordBatch, String> {
    if batch.schema().fields() == want.fields() {
        return Ok(batch.clone());
    }
    let strict = arrow::compute::CastOptions {
        safe: false,
        ..Default::default()
    };
    let columns = want
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => arrow::compute::cast_with_options(c, f.data_type(), &strict)
                .map_err(|e| format!("column {}: {e}", f.name())),
            None if f.is_nullable() => Ok(arrow::array::new_null_array(
                f.data_type(),
                batch.num_rows(),
            )),
            None => Err(format!("the column {} is missing", f.name())),
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    RecordBatch::try_new(want.clone(), columns).map_err(|e| e.to_string())
}
