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
//! batch = "data/transactions.parquet"   # --mode batch reads this file or directory, or a
//!                                       # Delta table (a directory with _delta_log)
//! # batch_version = 12                  # Delta: time travel to a version ...
//! # batch_as_of = "2026-11-01T00:00:00Z"  # ... or to a time
//!
//! [source.stream]                       # --mode stream reads this
//! kind = "generator"                    # generator | directory
//! data = "fraud"                        # generator: fraud | clickstream
//! rows = 200000                         # generator: stop after this many (omit: endless)
//! rows_per_second = 50000               # generator: arrival rate (omit: as fast as possible)
//! seed = 42
//! cards = 10000                        # generator (fraud): key cardinality
//! disorder = "5 seconds"                # generator: bounded event-time disorder
//! duplicates = 0.01                     # generator (fraud): fraction delivered twice
//! # users = 50000, items = 5000         # generator (clickstream): key cardinalities
//! # kind = "directory", path = "incoming/", max_files_per_trigger = 10
//! # kind = "kafka"                      # a topic; offsets live in the checkpoint
//! # bootstrap = "127.0.0.1:29092"       # default: $RIFFLE_KAFKA_BOOTSTRAP
//! # topic = "transactions"
//! # format = "json"                     # json | csv | raw (key, value, partition, offset, timestamp)
//! # schema = "tx_id BIGINT NOT NULL, ts TIMESTAMP NOT NULL, amount DOUBLE"  # default: source.batch's
//! # timestamp_column = "kafka_ts"       # adds the record timestamp (use it as event_time)
//! # start = "earliest"                  # earliest | latest | an RFC 3339 time
//! # dead_letter_topic = "transactions.dlq"  # undecodable records (default: <topic>.dlq)
//! # [source.stream.properties]          # librdkafka properties, passed through
//! # "fetch.wait.max.ms" = "20"
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
//! # either may be a Delta table instead, appended to in one ACID commit per run or epoch:
//! # batch = { kind = "delta", path = "out/fraud_table" }
//! # stream = { kind = "delta", path = "out/fraud_table", keys = ["country"] }  # keys: update mode merges
//! # or (stream only) a Kafka topic, exactly-once by default:
//! # stream = { kind = "kafka", topic = "alerts", format = "json", key = "card_id",
//! #            headers = ["country"], delivery = "exactly-once" }  # or "at-least-once"
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
use crate::connectors::clickstream::ClickConfig;
use crate::connectors::delta::{self, DeltaSink};
use crate::connectors::generator::{FraudConfig, GeneratorConfig};
use crate::connectors::kafka::{
    Delivery, KafkaConfig, KafkaSink, KafkaSinkOptions, KafkaSource, KafkaSourceOptions,
    RecordFormat, StartAt,
};
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
    /// A Delta `batch` table: read this version.
    batch_version: Option<u64>,
    /// A Delta `batch` table: read the version current at this RFC 3339 time.
    batch_as_of: Option<String>,
    stream: Option<StreamSourceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
enum StreamSourceFile {
    Generator {
        #[serde(default)]
        data: GeneratedData,
        rows: Option<i64>,
        rows_per_second: Option<f64>,
        seed: Option<u64>,
        cards: Option<u64>,
        disorder: Option<String>,
        duplicates: Option<f64>,
        events_per_second: Option<f64>,
        users: Option<u64>,
        items: Option<u64>,
    },
    Directory {
        path: PathBuf,
        max_files_per_trigger: Option<usize>,
        #[serde(default)]
        stop_when_empty: bool,
    },
    Kafka {
        bootstrap: Option<String>,
        topic: String,
        format: Option<String>,
        schema: Option<String>,
        timestamp_column: Option<String>,
        start: Option<String>,
        dead_letter_topic: Option<String>,
        group_id: Option<String>,
        #[serde(default)]
        properties: BTreeMap<String, String>,
    },
}

/// A sink: a path (`console`, a Parquet directory or file) or a table naming its kind.
#[derive(Debug)]
enum SinkSpec {
    Path(PathBuf),
    Table(SinkTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "kebab-case")]
enum SinkTable {
    Delta {
        path: String,
        #[serde(default)]
        keys: Vec<String>,
    },
    Kafka {
        bootstrap: Option<String>,
        topic: String,
        format: Option<String>,
        key: Option<String>,
        #[serde(default)]
        headers: Vec<String>,
        delivery: Option<String>,
        #[serde(default)]
        properties: BTreeMap<String, String>,
    },
}

impl<'de> Deserialize<'de> for SinkSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(SinkSpec::Path(PathBuf::from(s))),
            other => SinkTable::deserialize(other)
                .map(SinkSpec::Table)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `bootstrap` from the file, else `RIFFLE_KAFKA_BOOTSTRAP`: a pipeline can leave the broker
/// to the environment it runs in.
fn bootstrap(file: &Path, key: &str, given: &Option<String>) -> Result<String> {
    given
        .clone()
        .or_else(|| std::env::var("RIFFLE_KAFKA_BOOTSTRAP").ok())
        .ok_or_else(|| {
            key_error(
                file,
                key,
                "missing: set it or the RIFFLE_KAFKA_BOOTSTRAP environment variable",
            )
        })
}

/// What a generator source generates.
#[derive(Debug, Default, Deserialize, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
enum GeneratedData {
    #[default]
    Fraud,
    Clickstream,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkFile {
    batch: Option<SinkSpec>,
    stream: Option<SinkSpec>,
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
        for spec in [&mut file.sink.batch, &mut file.sink.stream]
            .into_iter()
            .flatten()
        {
            match spec {
                SinkSpec::Path(p) => resolve(p),
                SinkSpec::Table(SinkTable::Delta { path: p, .. }) if !p.contains("://") => {
                    let mut buf = PathBuf::from(&*p);
                    resolve(&mut buf);
                    *p = buf.to_string_lossy().into_owned();
                }
                SinkSpec::Table(_) => {}
            }
        }
        for p in [
            &mut file.source.batch,
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
        // A Delta table at its newest version is an ordinary table to `register_table`; only
        // time travel needs the Delta source's options.
        let as_of = match (source.batch_version, &source.batch_as_of) {
            (None, None) => None,
            (Some(v), None) => Some(delta::AsOf::Version(v)),
            (None, Some(t)) => Some(delta::AsOf::Timestamp(t.clone())),
            (Some(_), Some(_)) => {
                return Err(key_error(
                    &self.file,
                    "source.batch_version",
                    "give batch_version or batch_as_of, not both",
                ));
            }
        };
        match as_of {
            None => session.register_table(&source.name, input).await?,
            Some(_) if !delta::is_delta_table(input) => {
                return Err(key_error(
                    &self.file,
                    "source.batch_version",
                    "only applies when source.batch is a Delta table",
                ));
            }
            Some(as_of) => delta::register(session.context(), &source.name, input, &as_of).await?,
        }
        for (name, path) in &self.file_contents.tables {
            session.register_table(name, path).await?;
        }
        let df = session.dataframe(&self.query).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        match &self.file_contents.sink.batch {
            None => Ok(batches),
            Some(SinkSpec::Path(out)) => {
                crate::connectors::files::write_file(out, schema, batches)?;
                Ok(Vec::new())
            }
            Some(SinkSpec::Table(SinkTable::Delta { path, .. })) => {
                let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
                let version = delta::append(path, batches).await?;
                tracing::info!(rows, version, table = %path, "appended to the Delta table");
                Ok(Vec::new())
            }
            Some(SinkSpec::Table(SinkTable::Kafka { .. })) => Err(key_error(
                &self.file,
                "sink.batch",
                "batch mode writes files or Delta tables; Kafka is a stream sink",
            )),
        }
    }

    /// The schema declared for a Kafka source, or else the schema of the batch input.
    async fn declared_schema(
        &self,
        session: &RiffleSession,
        declared: &Option<String>,
    ) -> Result<arrow::datatypes::SchemaRef> {
        if let Some(columns) = declared {
            let plan = session
                .context()
                .state()
                .create_logical_plan(&format!("CREATE TABLE __riffle_schema ({columns})"))
                .await
                .map_err(|e| key_error(&self.file, "source.stream.schema", e))?;
            return match plan {
                datafusion::logical_expr::LogicalPlan::Ddl(
                    datafusion::logical_expr::DdlStatement::CreateMemoryTable(c),
                ) => Ok(Arc::new(c.input.schema().as_arrow().clone())),
                _ => Err(key_error(
                    &self.file,
                    "source.stream.schema",
                    "expected a column list such as \"id BIGINT NOT NULL, amount DOUBLE\"",
                )),
            };
        }
        let Some(batch) = &self.file_contents.source.batch else {
            return Err(key_error(
                &self.file,
                "source.stream.schema",
                "missing: declare the records' columns (or give source.batch to take its schema)",
            ));
        };
        const PROBE: &str = "__riffle_schema_probe";
        session.register_table(PROBE, batch).await?;
        let schema = session
            .context()
            .table(PROBE)
            .await?
            .schema()
            .as_arrow()
            .clone();
        session.context().deregister_table(PROBE)?;
        Ok(Arc::new(schema))
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
                data,
                rows,
                rows_per_second,
                seed,
                cards,
                disorder,
                duplicates,
                events_per_second,
                users,
                items,
            }) => {
                let disorder = match disorder {
                    Some(d) => parse_duration(d)
                        .map_err(|e| key_error(&self.file, "source.stream.disorder", e))?,
                    None => 0,
                };
                let only = |key: &str, set: bool, kind: &str| {
                    if set {
                        Err(key_error(
                            &self.file,
                            &format!("source.stream.{key}"),
                            format!("only applies to data = \"{kind}\""),
                        ))
                    } else {
                        Ok(())
                    }
                };
                let config = match data {
                    GeneratedData::Fraud => {
                        only("users", users.is_some(), "clickstream")?;
                        only("items", items.is_some(), "clickstream")?;
                        let mut config = FraudConfig {
                            max_disorder_micros: disorder,
                            ..FraudConfig::default()
                        };
                        config.seed = seed.unwrap_or(config.seed);
                        config.cards = cards.unwrap_or(config.cards);
                        config.duplicate_rate = duplicates.unwrap_or(config.duplicate_rate);
                        config.rows_per_second =
                            events_per_second.unwrap_or(config.rows_per_second);
                        GeneratorConfig::Fraud(config)
                    }
                    GeneratedData::Clickstream => {
                        only("cards", cards.is_some(), "fraud")?;
                        only("duplicates", duplicates.is_some(), "fraud")?;
                        let mut config = ClickConfig {
                            max_disorder_micros: disorder,
                            ..ClickConfig::default()
                        };
                        config.seed = seed.unwrap_or(config.seed);
                        config.users = users.unwrap_or(config.users).max(1);
                        config.items = items.unwrap_or(config.items).max(1);
                        config.rows_per_second =
                            events_per_second.unwrap_or(config.rows_per_second);
                        GeneratorConfig::Clickstream(config)
                    }
                };
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
            Some(StreamSourceFile::Kafka {
                bootstrap: servers,
                topic,
                format,
                schema,
                timestamp_column,
                start,
                dead_letter_topic,
                group_id,
                properties,
            }) => {
                let format = RecordFormat::parse(format.as_deref().unwrap_or("json"))
                    .map_err(|e| key_error(&self.file, "source.stream.format", e))?;
                let schema = match format {
                    RecordFormat::Raw => crate::connectors::kafka::raw_schema(),
                    _ => self.declared_schema(&session, schema).await?,
                };
                let start = match start.as_deref() {
                    None | Some("earliest") => StartAt::Earliest,
                    Some("latest") => StartAt::Latest,
                    Some(t) => {
                        let parsed = chrono::DateTime::parse_from_rfc3339(t).map_err(|e| {
                            key_error(
                                &self.file,
                                "source.stream.start",
                                format!(
                                    "{t:?}: expected earliest, latest or an RFC 3339 time ({e})"
                                ),
                            )
                        })?;
                        StartAt::Timestamp(parsed.timestamp_millis())
                    }
                };
                Box::new(KafkaSource::new(KafkaSourceOptions {
                    kafka: KafkaConfig {
                        bootstrap: bootstrap(&self.file, "source.stream.bootstrap", servers)?,
                        properties: properties.clone(),
                    },
                    topic: topic.clone(),
                    format,
                    schema,
                    timestamp_column: timestamp_column.clone(),
                    start,
                    dead_letter_topic: dead_letter_topic
                        .clone()
                        .unwrap_or_else(|| format!("{topic}.dlq")),
                    group_id: group_id
                        .clone()
                        .unwrap_or_else(|| format!("riffle-{}", file.source.name)),
                })?)
            }
        };
        let input = StreamInput::register(&session, &file.source.name, source)?;
        let plan = session
            .context()
            .state()
            .create_logical_plan(&self.query)
            .await?;
        let sink: Box<dyn Sink> = match &file.sink.stream {
            Some(SinkSpec::Path(p)) if p.as_os_str() == "console" => {
                Box::new(ConsoleSink { max_rows: 20 })
            }
            None => Box::new(ConsoleSink { max_rows: 20 }),
            Some(SinkSpec::Path(dir)) => Box::new(ParquetDirSink::new(dir)?),
            Some(SinkSpec::Table(SinkTable::Delta { path, keys })) => {
                Box::new(DeltaSink::new(path, self.output_mode, keys.clone())?)
            }
            Some(SinkSpec::Table(SinkTable::Kafka {
                bootstrap: servers,
                topic,
                format,
                key,
                headers,
                delivery,
                properties,
            })) => {
                let delivery = match delivery.as_deref() {
                    None | Some("exactly-once") => Delivery::ExactlyOnce,
                    Some("at-least-once") => Delivery::AtLeastOnce,
                    Some(other) => {
                        return Err(key_error(
                            &self.file,
                            "sink.stream.delivery",
                            format!("{other:?}: expected exactly-once or at-least-once"),
                        ));
                    }
                };
                // Every record says which UDF builds made it.
                let udf_headers = session
                    .modules()
                    .iter()
                    .map(|m| {
                        let stem = m
                            .path()
                            .file_stem()
                            .map(|s| s.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        (format!("riffle.udf.{stem}"), m.hash().to_string())
                    })
                    .collect();
                Box::new(KafkaSink::new(KafkaSinkOptions {
                    kafka: KafkaConfig {
                        bootstrap: bootstrap(&self.file, "sink.stream.bootstrap", servers)?,
                        properties: properties.clone(),
                    },
                    topic: topic.clone(),
                    format: RecordFormat::parse(format.as_deref().unwrap_or("json"))
                        .map_err(|e| key_error(&self.file, "sink.stream.format", e))?,
                    key: key.clone(),
                    header_columns: headers.clone(),
                    headers: udf_headers,
                    delivery,
                })?)
            }
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
