//! Streaming sources. A source's position is a JSON offset that goes into the checkpoint, and
//! reading between two offsets always returns the same rows: that is what lets an epoch be
//! replayed exactly after a crash.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use serde_json::{Value, json};

use super::generator::{GeneratorConfig, RowGenerator};
use crate::error::{Result, RiffleError};
use crate::session::FileFormat;

/// Rows of an epoch plus when the oldest of them became available (for latency).
pub struct Input {
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// When the first and last row became available, if the source knows.
    pub arrival: Option<(Instant, Instant)>,
}

/// A replayable streaming source.
pub trait StreamSource: Send {
    /// Schema of every batch.
    fn schema(&self) -> SchemaRef;
    /// The offset where a new query starts.
    ///
    /// # Errors
    /// Source errors (e.g. an unreachable broker).
    fn initial(&mut self) -> Result<Value>;
    /// The offset after what is available now from `from`, reading at most `max_rows`.
    ///
    /// # Errors
    /// Source errors (e.g. an unreadable directory).
    fn available(&mut self, from: &Value, max_rows: usize) -> Result<Value>;
    /// The rows between two offsets.
    ///
    /// # Errors
    /// Source errors (unreadable files, bad offsets).
    fn read(&mut self, from: &Value, to: &Value) -> Result<Input>;
    /// Whether the source has no more data after `at`, ever.
    fn finished(&self, at: &Value) -> bool;
    /// Told after the epoch ending at `at` committed (for sources that report progress
    /// elsewhere, such as a Kafka consumer group).
    fn committed(&mut self, _at: &Value) {}
}

fn row_of(offset: &Value, key: &str) -> Result<i64> {
    offset[key]
        .as_i64()
        .ok_or_else(|| RiffleError::Config(format!("bad source offset {offset} (no {key:?})")))
}

/// A generator (fraud or clickstream) as a source: offset = row ids generated so far.
pub struct GeneratorSource {
    config: GeneratorConfig,
    /// Rows per second of wall-clock time; `None` = as fast as the query takes them.
    rate: Option<f64>,
    /// Total ids, `None` = endless.
    limit: Option<i64>,
    clock: Option<(Instant, i64)>,
    generator: Option<Box<dyn RowGenerator>>,
}

impl GeneratorSource {
    /// A generator source.
    pub fn new(config: GeneratorConfig, rate: Option<f64>, limit: Option<i64>) -> Self {
        GeneratorSource {
            config,
            rate,
            limit,
            clock: None,
            generator: None,
        }
    }

    fn due(&self, row: i64) -> Option<Instant> {
        let (t0, row0) = self.clock?;
        let rate = self.rate?;
        Some(t0 + Duration::from_secs_f64((row - row0).max(0) as f64 / rate))
    }
}

impl StreamSource for GeneratorSource {
    fn schema(&self) -> SchemaRef {
        self.config.schema()
    }

    fn initial(&mut self) -> Result<Value> {
        Ok(json!({ "rows": 0 }))
    }

    fn available(&mut self, from: &Value, max_rows: usize) -> Result<Value> {
        let start = row_of(from, "rows")?;
        // The rate clock starts at the first poll (also after a restart): rows become
        // available at `rate` per second from then on.
        let (t0, row0) = *self.clock.get_or_insert((Instant::now(), start));
        let mut end = start + max_rows as i64;
        if let Some(rate) = self.rate {
            let due = row0 + (t0.elapsed().as_secs_f64() * rate) as i64;
            end = end.min(due.max(start));
        }
        if let Some(limit) = self.limit {
            end = end.min(limit);
        }
        Ok(json!({ "rows": end.max(start) }))
    }

    fn read(&mut self, from: &Value, to: &Value) -> Result<Input> {
        let (start, end) = (row_of(from, "rows")?, row_of(to, "rows")?);
        let generator = match &mut self.generator {
            Some(g) if g.rows_generated() == start => g,
            slot => slot.insert(self.config.starting_at(start)),
        };
        let batch = generator.next_batch_of_ids((end - start) as usize);
        let arrival = match (self.due(start), self.due(end - 1)) {
            (Some(a), Some(b)) if end > start => Some((a, b)),
            _ => None,
        };
        Ok(Input {
            batches: vec![batch],
            arrival,
        })
    }

    fn finished(&self, at: &Value) -> bool {
        matches!((self.limit, at["rows"].as_i64()), (Some(l), Some(r)) if r >= l)
    }
}

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
            arrival: None,
        })
    }

    fn finished(&self, at: &Value) -> bool {
        at["batch"].as_i64() == Some(self.batches.len() as i64)
    }
}

/// A directory that receives files: each new file is read once, in name order. Files whose
/// names start with `.` or `_` are in-progress writes and are skipped until renamed.
pub struct DirectorySource {
    dir: PathBuf,
    format: FileFormat,
    schema: SchemaRef,
    max_files: usize,
    /// Stop (and end the query) once the directory has nothing new.
    bounded: bool,
}

impl DirectorySource {
    /// Watches `dir`; the schema comes from the first file already there.
    ///
    /// # Errors
    /// [`RiffleError::Config`] when the directory has no file to take the schema from.
    pub fn new(dir: &Path, max_files: usize, bounded: bool) -> Result<Self> {
        let format = FileFormat::of(dir)?;
        let first = Self::list(dir)?.into_iter().next().ok_or_else(|| {
            RiffleError::Config(format!(
                "{}: the directory source takes its schema from the first file, and there is \
                 none yet",
                dir.display()
            ))
        })?;
        let schema = read_file(&dir.join(&first), format, None)?
            .first()
            .map(|b| b.schema())
            .ok_or_else(|| RiffleError::Config(format!("{first}: empty file")))?;
        Ok(DirectorySource {
            dir: dir.to_path_buf(),
            format,
            schema,
            max_files: max_files.max(1),
            bounded,
        })
    }

    fn list(dir: &Path) -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| RiffleError::io("listing", dir, e))?
            .flatten()
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| !n.starts_with('.') && !n.starts_with('_') && !n.ends_with(".tmp"))
            .collect();
        names.sort();
        Ok(names)
    }

    fn files(offset: &Value) -> BTreeSet<String> {
        offset["files"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl StreamSource for DirectorySource {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn initial(&mut self) -> Result<Value> {
        Ok(json!({ "files": [] }))
    }

    fn available(&mut self, from: &Value, _max_rows: usize) -> Result<Value> {
        let mut seen = Self::files(from);
        let new: Vec<String> = Self::list(&self.dir)?
            .into_iter()
            .filter(|n| !seen.contains(n))
            .take(self.max_files)
            .collect();
        seen.extend(new);
        Ok(json!({ "files": seen }))
    }

    fn read(&mut self, from: &Value, to: &Value) -> Result<Input> {
        let before = Self::files(from);
        let mut batches = Vec::new();
        for name in Self::files(to).difference(&before) {
            batches.extend(read_file(
                &self.dir.join(name),
                self.format,
                Some(self.schema.clone()),
            )?);
        }
        Ok(Input {
            batches,
            arrival: None,
        })
    }

    fn finished(&self, at: &Value) -> bool {
        self.bounded
            && Self::list(&self.dir)
                .map(|all| all.len() <= Self::files(at).len())
                .unwrap_or(false)
    }
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
