//! Pipeline files: one query, its tables' bindings in batch and in stream mode, and where the
//! results go. `riffle run PIPELINE --mode batch|stream` runs one.
//!
//! ```toml
//! query = """
//! SELECT window(ts, '1 minute') AS window, country, count(*) AS n, sum(amount) AS total
//! FROM transactions GROUP BY window(ts, '1 minute'), country
//! """                                   # or: query_file = "report.sql"
//! output_mode = "append"                # append | update | complete (stream mode)
//!
//! [source]                              # the table that streams
//! name = "transactions"
//! event_time = "ts"                     # timestamp column for windows and the watermark
//! watermark = "10 seconds"              # how late rows may arrive
//! batch = "data/transactions.parquet"   # --mode batch reads this file or directory
//!
//! [source.stream]                       # --mode stream reads this
//! kind = "generator"                    # generator | directory
//! rows = 200000                         # generator: stop after this many (omit: endless)
//! rows_per_second = 50000               # generator: arrival rate (omit: as fast as possible)
//! seed = 42
//! cards = 10000
//! disorder = "5 seconds"                # generator: bounded event-time disorder
//! duplicates = 0.01                     # generator: fraction delivered twice
//! # kind = "directory", path = "incoming/", max_files_per_trigger = 10
//!
//! [tables]                              # static tables, e.g. for stream-static joins
//! merchants = "data/merchants.csv"      # reloaded in stream mode when the file changes
//!
//! [[udfs]]
//! path = "udfs/riffle_udfs_fraud.wasm"
//!
//! [sink]
//! batch = "out/report.parquet"          # a .parquet/.csv/.json file; omit to print
//! stream = "out/stream"                 # a directory (one Parquet file per epoch) or "console"
//! late = "out/late"                     # optional: late rows, one Parquet file per epoch
//!
//! [stream]
//! checkpoint = "out/checkpoint"
//! trigger = "processing-time"           # processing-time | available-now | low-latency
//! interval = "1 second"
//! max_rows_per_epoch = 100000
//! ```
//!
//! Relative paths are relative to the pipeline file. Unknown keys are errors reported with
//! their line, and bad values name their key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arrow::array::RecordBatch;
use serde::Deserialize;

use crate::cli::config::{LimitsConfig, UdfConfig};
use crate::connectors::generator::FraudConfig;
use crate::connectors::sink::{ConsoleSink, ParquetDirSink, Sink};
use crate::connectors::source::{DirectorySource, GeneratorSource, StreamSource};
use crate::connectors::static_table::StaticTable;
use crate::error::{Result, RiffleError};
use crate::exec::OutputMode;
use crate::plan::window::parse_duration;
use crate::session::{RiffleSession, SessionOptions, read_udf_config};
use crate::stream::{RunSummary, StreamInput, StreamOptions, StreamingQuery, Trigger};
use crate::udf::EngineOptions;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    query: Option<String>,
    query_file: Option<PathBuf>,
    #[serde(default)]
    output_mode: Option<String>,
    source: SourceFile,
    #[serde(default)]
    tables: BTreeMap<String, PathBuf>,
    #[serde(default)]
    udfs: Vec<UdfConfig>,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default)]
    sink: SinkFile,
    #[serde(default)]
    stream: StreamFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    name: String,
    event_time: Option<String>,
    watermark: Option<String>,
    batch: Option<PathBuf>,
    stream: Option<StreamSourceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
enum StreamSourceFile {
    Generator {
        rows: Option<i64>,
        rows_per_second: Option<f64>,
        seed: Option<u64>,
        cards: Option<u64>,
        disorder: Option<String>,
        duplicates: Option<f64>,
        events_per_second: Option<f64>,
    },
    Directory {
        path: PathBuf,
        max_files_per_trigger: Option<usize>,
        #[serde(default)]
        stop_when_empty: bool,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkFile {
    batch: Option<PathBuf>,
    stream: Option<PathBuf>,
    late: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamFile {
    checkpoint: Option<PathBuf>,
    trigger: Option<String>,
    interval: Option<String>,
    max_rows_per_epoch: Option<usize>,
    progress: Option<PathBuf>,
}

/// A validated pipeline.
#[derive(Debug)]
pub struct Pipeline {
    file: PathBuf,
    query: String,
    file_contents: PipelineFile,
    output_mode: OutputMode,
    watermark_delay: i64,
    trigger: Trigger,
}

/// How to run a pipeline beyond what its file says.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// UDF compile cache directory (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Show the live progress line.
    pub live: bool,
    /// Stream mode: stop after this many epochs.
    pub max_epochs: Option<u64>,
}

fn key_error(file: &Path, key: &str, message: impl std::fmt::Display) -> RiffleError {
    RiffleError::Config(format!("{}: {key}: {message}", file.display()))
}

impl Pipeline {
    /// Reads and validates a pipeline file.
    ///
    /// # Errors
    /// [`RiffleError::Config`] pointing at the bad line or key.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| RiffleError::io("reading", path, e))?;
        let mut file: PipelineFile = toml::from_str(&text)
            .map_err(|e| RiffleError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && p.as_os_str() != "console" {
                *p = base.join(&*p);
            }
        };
        file.tables.values_mut().for_each(resolve);
        for udf in &mut file.udfs {
            resolve(&mut udf.path);
            if let Some(c) = udf.config.as_mut() {
                resolve(c);
            }
        }
        for p in [
            &mut file.source.batch,
            &mut file.sink.batch,
            &mut file.sink.stream,
            &mut file.sink.late,
            &mut file.stream.checkpoint,
            &mut file.stream.progress,
            &mut file.query_file,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        if let Some(StreamSourceFile::Directory { path: p, .. }) = &mut file.source.stream {
            resolve(p);
        }
        let query = match (&file.query, &file.query_file) {
            (Some(q), None) => q.clone(),
            (None, Some(f)) => {
                std::fs::read_to_string(f).map_err(|e| RiffleError::io("reading", f, e))?
            }
            _ => {
                return Err(key_error(
                    path,
                    "query",
                    "give exactly one of query and query_file",
                ));
            }
        };
        let output_mode = match &file.output_mode {
            Some(m) => m.parse().map_err(|e| key_error(path, "output_mode", e))?,
            None => OutputMode::Append,
        };
        let watermark_delay = match (&file.source.watermark, &file.source.event_time) {
            (Some(w), Some(_)) => {
                parse_duration(w).map_err(|e| key_error(path, "source.watermark", e))?
            }
            (Some(_), None) => {
                return Err(key_error(
                    path,
                    "source.watermark",
                    "needs source.event_time",
                ));
            }
            (None, _) => 0,
        };
        let interval = match &file.stream.interval {
            Some(i) => Some(parse_duration(i).map_err(|e| key_error(path, "stream.interval", e))?),
            None => None,
        };
        let trigger = match file.stream.trigger.as_deref() {
            None | Some("processing-time") => {
                Trigger::ProcessingTime(Duration::from_micros(interval.unwrap_or(1_000_000) as u64))
            }
            Some("available-now") => Trigger::AvailableNow,
            Some("low-latency") => Trigger::LowLatency,
            Some(other) => {
                return Err(key_error(
                    path,
                    "stream.trigger",
                    format!("{other:?}: expected processing-time, available-now or low-latency"),
                ));
            }
        };
        Ok(Pipeline {
            file: path.to_path_buf(),
            query,
            file_contents: file,
            output_mode,
            watermark_delay,
            trigger,
        })
    }

    async fn session(&self, options: &RunOptions) -> Result<RiffleSession> {
        let limits_file = &self.file_contents.limits;
        let limits = limits_file.udf_limits(None, None);
        let session = RiffleSession::new(SessionOptions {
            engine: EngineOptions {
                cache_dir: options.cache_dir.clone(),
                limits,
            },
            row_error_policy: limits_file.on_row_error.unwrap_or_default(),
            batch_size: None,
        })?;
        for udf in &self.file_contents.udfs {
            let config = read_udf_config(udf.config.as_deref())?;
            session.load_udfs(&udf.path, config, udf.functions.as_deref())?;
        }
        Ok(session)
    }

    /// Runs the query in batch mode over the source's `batch` files; writes `sink.batch` or
    /// returns the rows for printing.
    ///
    /// # Errors
    /// Configuration, planning and execution errors.
    pub async fn run_batch(&self, options: &RunOptions) -> Result<Vec<RecordBatch>> {
        let session = self.session(options).await?;
        let source = &self.file_contents.source;
        let input = source.batch.as_ref().ok_or_else(|| {
            key_error(
                &self.file,
                "source.batch",
                "missing: batch mode reads these files",
            )
        })?;
        session.register_table(&source.name, input).await?;
        for (name, path) in &self.file_contents.tables {
            session.register_table(name, path).await?;
        }
        let df = session.dataframe(&self.query).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        if let Some(out) = &self.file_contents.sink.batch {
            crate::connectors::files::write_file(out, schema, batches)?;
            return Ok(Vec::new());
        }
        Ok(batches)
    }

    /// Runs the query in stream mode until the trigger or source ends it, or `stop` is set.
    ///
    /// # Errors
    /// Configuration, planning and execution errors.
    pub async fn run_stream(&self, options: &RunOptions, stop: &AtomicBool) -> Result<RunSummary> {
        let session = self.session(options).await?;
        let file = &self.file_contents;
        let mut statics = Vec::new();
        for (name, path) in &file.tables {
            let table = Arc::new(StaticTable::load(path)?);
            session
                .context()
                .register_table(name.as_str(), table.clone())?;
            statics.push(table);
        }
        let source: Box<dyn StreamSource> = match &file.source.stream {
            None => {
                return Err(key_error(
                    &self.file,
                    "source.stream",
                    "missing: stream mode reads this source",
                ));
            }
            Some(StreamSourceFile::Generator {
                rows,
                rows_per_second,
                seed,
                cards,
                disorder,
                duplicates,
                events_per_second,
            }) => {
                let mut config = FraudConfig::default();
                if let Some(s) = seed {
                    config.seed = *s;
                }
                if let Some(c) = cards {
                    config.cards = *c;
                }
                if let Some(d) = disorder {
                    config.max_disorder_micros = parse_duration(d)
                        .map_err(|e| key_error(&self.file, "source.stream.disorder", e))?;
                }
                if let Some(d) = duplicates {
                    config.duplicate_rate = *d;
                }
                if let Some(r) = events_per_second {
                    config.rows_per_second = *r;
                }
                Box::new(GeneratorSource::new(config, *rows_per_second, *rows))
            }
            Some(StreamSourceFile::Directory {
                path,
                max_files_per_trigger,
                stop_when_empty,
            }) => Box::new(DirectorySource::new(
                path,
                max_files_per_trigger.unwrap_or(16),
                *stop_when_empty,
            )?),
        };
        let input = StreamInput::register(&session, &file.source.name, source)?;
        let plan = session
            .context()
            .state()
            .create_logical_plan(&self.query)
            .await?;
        let sink: Box<dyn Sink> = match &file.sink.stream {
            Some(p) if p.as_os_str() == "console" => Box::new(ConsoleSink { max_rows: 20 }),
            None => Box::new(ConsoleSink { max_rows: 20 }),
            Some(dir) => Box::new(ParquetDirSink::new(dir)?),
        };
        let checkpoint = file.stream.checkpoint.clone().ok_or_else(|| {
            key_error(
                &self.file,
                "stream.checkpoint",
                "missing: stream mode needs a checkpoint directory",
            )
        })?;
        let stream_options = StreamOptions {
            event_time: file.source.event_time.clone(),
            watermark_delay: self.watermark_delay,
            output_mode: self.output_mode,
            trigger: self.trigger,
            max_rows_per_epoch: file.stream.max_rows_per_epoch.unwrap_or(100_000),
            checkpoint,
            progress_file: file.stream.progress.clone(),
            live: options.live,
            max_epochs: options.max_epochs,
        };
        let mut query = StreamingQuery::new(&session, input, plan, sink, stream_options)
            .await?
            .with_static_tables(statics);
        if let Some(late) = &file.sink.late {
            query = query.with_late_sink(Box::new(ParquetDirSink::new(late)?));
        }
        query.run(stop).await
    }
}
