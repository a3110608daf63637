//! Pipeline files: one query, its tables' bindings in batch and in stream mode, and where the
//! results go. `riffle run PIPELINE --mode batch|stream` runs one.
//!
//! ```toml
//! query = """
//! SELECT t.tx_id, t.amount, l.country AS login_country
//! FROM transactions t JOIN logins l ON t.card_id = l.card_id
//!   AND l.ts BETWEEN t.ts - INTERVAL '5' MINUTE AND t.ts
//! """                                   # or: query_file = "report.sql"
//! output_mode = "append"                # append | update | complete (stream mode)
//!
//! [sources.transactions]                # a table that streams; one section per source
//! event_time = "ts"                     # timestamp column for windows and the watermark
//! watermark = "10 seconds"              # how late rows may arrive
//! batch = "data/transactions.parquet"   # --mode batch reads this file or directory, or a
//!                                       # Delta table (a directory with _delta_log)
//! # batch_version = 12                  # Delta: time travel to a version ...
//! # batch_as_of = "2026-11-01T00:00:00Z"  # ... or to a time
//!
//! [sources.transactions.stream]         # --mode stream reads this
//! kind = "generator"                    # generator | directory | kafka
//! data = "fraud"                        # generator: fraud | clickstream
//! rows = 200000                         # generator: stop after this many (omit: endless)
//! rows_per_second = 50000               # generator: arrival rate (omit: as fast as possible)
//! seed = 42
//! cards = 10000                         # generator (fraud): key cardinality
//! disorder = "5 seconds"                # generator: bounded event-time disorder
//! duplicates = 0.01                     # generator (fraud): fraction delivered twice
//! # users = 50000, items = 5000         # generator (clickstream): key cardinalities
//! # kind = "directory", path = "incoming/", max_files_per_trigger = 10, stop_when_empty = true
//! #   (quarantine = "bad/": where unreadable files go, default incoming/_quarantine)
//! # kind = "kafka"                      # a topic; offsets live in the checkpoint
//! # bootstrap = "127.0.0.1:29092"       # default: $RIFFLE_KAFKA_BOOTSTRAP
//! # topic = "transactions"
//! # format = "json"                     # json | csv | raw (key, value, partition, offset, timestamp)
//! # schema = "tx_id BIGINT NOT NULL, ts TIMESTAMP NOT NULL, amount DOUBLE"  # default: batch's
//! # timestamp_column = "kafka_ts"       # adds the record timestamp (use it as event_time)
//! # start = "earliest"                  # earliest | latest | an RFC 3339 time
//! # dead_letter_topic = "transactions.dlq"  # undecodable records (default: <topic>.dlq)
//! # fail_on_data_loss = true            # records deleted before they were read: stop (default)
//! #                                    # or, with false, log and count the gap and go on
//! # [sources.transactions.stream.properties]  # librdkafka properties, passed through
//! # "fetch.wait.max.ms" = "20"
//!
//! [sources.logins]                      # a second stream, joined above
//! event_time = "ts"
//! watermark = "10 seconds"
//! batch = "data/logins.parquet"
//! stream = { kind = "generator", seed = 7, rows = 50000, events_per_second = 0.5 }
//!
//! [views]                               # named queries the query reads like tables, e.g. the
//! # features = "features.sql"           # same scoring in two pipelines: each a SELECT over the
//! # scored = "scored.sql"               # sources, tables and the views above it (the query
//!                                       # gets them as CTEs)
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
//! #   (marker_topic = "riffle.epochs": the compacted topic of each query's last epoch)
//! late = "out/late"                     # optional: late rows, one Parquet file per epoch
//!                                       # (with several sources, one subdirectory each)
//!
//! [stream]
//! checkpoint = "out/checkpoint"
//! trigger = "processing-time"           # processing-time | available-now | low-latency
//! interval = "1 second"
//! max_rows_per_epoch = 100000           # per source
//! partitions = 2                        # instances of each keyed or row-wise operator, each
//!                                       # on a core (default: the machine's cores); a
//!                                       # restart may change it
//! ```
//!
//! A file with one streaming source may name it in a `[source]` section (`name =
//! "transactions"`) instead of `[sources.transactions]`. Relative paths are relative to the
//! pipeline file. Unknown keys are errors reported with their line, and bad values name their
//! key.
//!
//! This module only reads the file and dispatches: each connector owns its settings
//! ([`crate::connectors`]), the planner and the driver do the rest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use serde::Deserialize;

use crate::common::OutputMode;
use crate::common::time::SqlDuration;
use crate::config::{LimitsConfig, UdfConfig};
use crate::connectors::delta::{self, DeltaSink, DeltaSinkConfig};
use crate::connectors::files::directory::DirectorySourceConfig;
use crate::connectors::files::{ParquetDirSink, StaticTable};
use crate::connectors::generate::GeneratorSourceConfig;
use crate::connectors::kafka::{KafkaSinkConfig, KafkaSourceConfig};
use crate::connectors::memory::ConsoleSink;
use crate::connectors::sink::Sink;
use crate::connectors::source::StreamSource;
use crate::connectors::{ConfigContext, resolve};
use crate::error::{Result, RiffleError};
use crate::session::{RiffleSession, SessionOptions, read_udf_config};
use crate::stream::{
    RunSummary, StreamInput, StreamOptions, StreamingQuery, Trigger, default_partitions,
};
use crate::udf::EngineOptions;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    query: Option<String>,
    query_file: Option<PathBuf>,
    #[serde(default)]
    output_mode: OutputMode,
    /// One streaming source, named inside.
    source: Option<NamedSource>,
    /// Streaming sources by table name.
    #[serde(default)]
    sources: BTreeMap<String, SourceFile>,
    /// In file order: a view may read the views before it.
    #[serde(default, deserialize_with = "in_file_order")]
    views: Vec<(String, PathBuf)>,
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

/// A TOML table's entries in the order the file lists them.
fn in_file_order<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<(String, PathBuf)>, D::Error> {
    struct Entries;
    impl<'de> serde::de::Visitor<'de> for Entries {
        type Value = Vec<(String, PathBuf)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a table of names and file paths")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    d.deserialize_map(Entries)
}

/// The query with `[views]` in front of it as common table expressions: DataFusion inlines
/// them into the plan, so batch and stream mode plan a view like any subquery, and two
/// pipelines can share one scoring query without copying its text.
fn with_views(path: &Path, views: &[(String, PathBuf)], query: String) -> Result<String> {
    if views.is_empty() {
        return Ok(query);
    }
    let mut ctes = Vec::new();
    for (name, file) in views {
        let key = format!("views.{name}");
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(key_error(
                path,
                &key,
                "a view's name must be a plain SQL name",
            ));
        }
        let sql = std::fs::read_to_string(file).map_err(|e| RiffleError::io("reading", file, e))?;
        let sql = sql.trim().trim_end_matches(';').trim_end();
        if sql.is_empty() {
            return Err(key_error(path, &key, "the view's file has no query"));
        }
        // On its own lines: a `--` comment at the end of the file must not swallow the `)`.
        ctes.push(format!("{name} AS (\n{sql}\n)"));
    }
    let ctes = ctes.join(",\n");
    // A query with its own WITH gets the views as its first CTEs.
    let body = query.trim_start();
    let own_with = body
        .get(..4)
        .is_some_and(|w| w.eq_ignore_ascii_case("with"))
        && body[4..].starts_with(char::is_whitespace);
    Ok(if own_with {
        format!("WITH {ctes},\n{}", body[4..].trim_start())
    } else {
        format!("WITH {ctes}\n{query}")
    })
}

/// A streaming source's table: its event time, its batch input and its stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    event_time: Option<String>,
    watermark: Option<SqlDuration>,
    batch: Option<PathBuf>,
    /// A Delta `batch` table: read this version.
    batch_version: Option<u64>,
    /// A Delta `batch` table: read the version current at this RFC 3339 time.
    batch_as_of: Option<String>,
    stream: Option<StreamSourceConfig>,
}

/// `[source]`: the same keys plus the table's name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedSource {
    name: String,
    event_time: Option<String>,
    watermark: Option<SqlDuration>,
    batch: Option<PathBuf>,
    batch_version: Option<u64>,
    batch_as_of: Option<String>,
    stream: Option<StreamSourceConfig>,
}

/// What a source streams from; each connector owns its keys.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum StreamSourceConfig {
    Generator(GeneratorSourceConfig),
    Directory(DirectorySourceConfig),
    Kafka(KafkaSourceConfig),
}

/// A sink: a path (`console`, a Parquet directory or file) or a table naming its kind.
#[derive(Debug)]
enum SinkSpec {
    Path(PathBuf),
    Table(SinkTable),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum SinkTable {
    Delta(DeltaSinkConfig),
    Kafka(KafkaSinkConfig),
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkFile {
    batch: Option<SinkSpec>,
    stream: Option<SinkSpec>,
    late: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum TriggerKind {
    ProcessingTime,
    AvailableNow,
    LowLatency,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamFile {
    checkpoint: Option<PathBuf>,
    trigger: Option<TriggerKind>,
    interval: Option<SqlDuration>,
    max_rows_per_epoch: Option<usize>,
    partitions: Option<usize>,
    progress: Option<PathBuf>,
}

/// Where stream mode's rows go ([`Pipeline::stream_output`]).
pub(crate) enum StreamOutput<'a> {
    /// A directory of Parquet files, one per epoch.
    ParquetDir(&'a Path),
    /// A Delta table; `keys` are the update-mode merge keys.
    Delta { path: &'a str, keys: &'a [String] },
    /// A Kafka topic (its connection settings, without the producer's tuning).
    Kafka {
        kafka: crate::connectors::kafka::KafkaConfig,
        topic: &'a str,
        format: crate::connectors::kafka::RecordFormat,
    },
}

/// A validated pipeline.
#[derive(Debug)]
pub struct Pipeline {
    file: PathBuf,
    query: String,
    /// Streaming sources, by table name (in file order for `[source]`, sorted for `[sources]`).
    sources: Vec<(String, SourceFile)>,
    contents: PipelineFile,
    trigger: Trigger,
}

/// `riffle.udf.<module file stem>` = sha256 of each loaded module: what sinks stamp on their
/// output (Kafka headers, Parquet key-value metadata, Delta commit metadata) so every row or
/// commit names the UDF builds that produced it.
fn udf_modules(session: &RiffleSession) -> Vec<(String, String)> {
    session.modules().iter().map(|m| m.stamp()).collect()
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
    /// Stream mode: resume a checkpoint written with other UDF code or configuration, the
    /// new modules serving from the next epoch (`riffle run --upgrade-udfs`).
    pub upgrade_udfs: bool,
    /// Stream mode: swap in a UDF module whose file is replaced while the query runs
    /// (`riffle run --hot-swap-udfs`).
    pub hot_swap_udfs: bool,
    /// Batch mode: a name that makes this run distinct from an earlier one with the same
    /// query, UDFs and inputs (a batch run into Delta that already landed is not written
    /// again unless its run name differs).
    pub run_name: Option<String>,
    /// Where the run reports what it does (`riffle run --http`).
    pub monitor: Option<Arc<crate::server::Monitor>>,
    /// Stream mode: instances of each operator that can be partitioned, over the file's
    /// `stream.partitions` (`riffle run --partitions`).
    pub partitions: Option<usize>,
}

/// What a batch run produced.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Rows to print (no `sink.batch`).
    pub rows: Vec<RecordBatch>,
    /// What was written where, or why nothing was.
    pub message: Option<String>,
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

        let mut sources: Vec<(String, SourceFile)> =
            std::mem::take(&mut file.sources).into_iter().collect();
        if let Some(named) = file.source.take() {
            if !sources.is_empty() {
                return Err(key_error(
                    path,
                    "source",
                    "give either [source] (one source) or [sources.<name>] sections, not both",
                ));
            }
            sources.push((
                named.name,
                SourceFile {
                    event_time: named.event_time,
                    watermark: named.watermark,
                    batch: named.batch,
                    batch_version: named.batch_version,
                    batch_as_of: named.batch_as_of,
                    stream: named.stream,
                },
            ));
        }
        if sources.is_empty() {
            return Err(key_error(
                path,
                "sources",
                "missing: declare the streaming source(s) as [sources.<table name>]",
            ));
        }
        for (name, source) in &mut sources {
            if source.watermark.is_some() && source.event_time.is_none() {
                return Err(key_error(
                    path,
                    &format!("sources.{name}.watermark"),
                    "needs event_time",
                ));
            }
            for p in [&mut source.batch].into_iter().flatten() {
                resolve(&base, p);
            }
            if let Some(StreamSourceConfig::Directory(d)) = &mut source.stream {
                resolve(&base, &mut d.path);
            }
        }

        file.tables.values_mut().for_each(|p| resolve(&base, p));
        for udf in &mut file.udfs {
            resolve(&base, &mut udf.path);
            if let Some(c) = udf.config.as_mut() {
                resolve(&base, c);
            }
        }
        for spec in [&mut file.sink.batch, &mut file.sink.stream]
            .into_iter()
            .flatten()
        {
            match spec {
                SinkSpec::Path(p) if p.as_os_str() != "console" => resolve(&base, p),
                SinkSpec::Table(SinkTable::Delta(d)) => d.resolve(&base),
                _ => {}
            }
        }
        for p in [
            &mut file.sink.late,
            &mut file.stream.checkpoint,
            &mut file.stream.progress,
            &mut file.query_file,
        ]
        .into_iter()
        .flatten()
        .chain(file.views.iter_mut().map(|(_, p)| p))
        {
            resolve(&base, p);
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
        let query = with_views(path, &file.views, query)?;
        if file.stream.max_rows_per_epoch == Some(0) {
            return Err(key_error(
                path,
                "stream.max_rows_per_epoch",
                "must be at least 1",
            ));
        }
        if file.stream.partitions == Some(0) {
            return Err(key_error(path, "stream.partitions", "must be at least 1"));
        }
        let interval = file.stream.interval.map(SqlDuration::std);
        let trigger = match file.stream.trigger {
            None | Some(TriggerKind::ProcessingTime) => {
                Trigger::ProcessingTime(interval.unwrap_or(std::time::Duration::from_secs(1)))
            }
            Some(TriggerKind::AvailableNow) => Trigger::AvailableNow,
            Some(TriggerKind::LowLatency) => Trigger::LowLatency,
        };
        Ok(Pipeline {
            file: path.to_path_buf(),
            query,
            sources,
            contents: file,
            trigger,
        })
    }

    /// The checkpoint directory of stream mode, if the file names one.
    pub fn checkpoint_dir(&self) -> Option<&Path> {
        self.contents.stream.checkpoint.as_deref()
    }

    /// Where stream mode writes its progress, if the file moves it out of the checkpoint.
    pub fn progress_file(&self) -> Option<&Path> {
        self.contents.stream.progress.as_deref()
    }

    async fn session(&self, options: &RunOptions) -> Result<RiffleSession> {
        let limits_file = &self.contents.limits;
        let session = RiffleSession::new(SessionOptions {
            engine: EngineOptions {
                cache_dir: options.cache_dir.clone(),
                limits: limits_file.udf_limits(None, None),
            },
            row_error_policy: limits_file.on_row_error.unwrap_or_default(),
            batch_size: None,
            memory_limit: limits_file.query_memory(None),
        })?;
        for udf in &self.contents.udfs {
            let config = read_udf_config(udf.config.as_deref())?;
            session.load_udfs(&udf.path, config, udf.functions.as_deref())?;
        }
        Ok(session)
    }

    /// Registers source `name`'s batch input (a file, directory or Delta table, with time
    /// travel) as table `table` of `session`. Returns what identifies the input's version
    /// (see [`input_identity`]), or `None` when the source has no batch input.
    async fn register_batch(
        &self,
        session: &RiffleSession,
        name: &str,
        table: &str,
    ) -> Result<Option<String>> {
        let source = &self
            .sources
            .iter()
            .find(|(n, _)| n == name)
            .expect("a declared source")
            .1;
        let key = |k: &str| format!("sources.{name}.{k}");
        let Some(input) = &source.batch else {
            return Ok(None);
        };
        let as_of = match (source.batch_version, &source.batch_as_of) {
            (None, None) => None,
            (Some(v), None) => Some(delta::AsOf::Version(v)),
            (None, Some(t)) => Some(delta::AsOf::Timestamp(t.clone())),
            (Some(_), Some(_)) => {
                return Err(key_error(
                    &self.file,
                    &key("batch_version"),
                    "give batch_version or batch_as_of, not both",
                ));
            }
        };
        if as_of.is_some() && !delta::is_delta_table(input) {
            return Err(key_error(
                &self.file,
                &key("batch_version"),
                "only applies when batch is a Delta table",
            ));
        }
        register_input(session, table, input, as_of.unwrap_or_default())
            .await
            .map(Some)
    }

    /// The id of a batch run: a digest of what decides its output (the query, each UDF
    /// module and its configuration, each input's version) and the run name. Two runs with
    /// the same id write the same rows.
    fn batch_run_id(
        &self,
        session: &RiffleSession,
        inputs: &[(String, String)],
        run_name: Option<&str>,
    ) -> String {
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        let mut line = |s: &str| {
            digest.update(s.as_bytes());
            digest.update(b"\n");
        };
        line("riffle batch run 1");
        line(&self.query);
        for module in session.modules() {
            line(&format!("udf {} {}", module.hash(), module.config_hash()));
        }
        for (table, identity) in inputs {
            line(&format!("input {table}"));
            line(identity);
        }
        line(&format!("run name {}", run_name.unwrap_or("")));
        format!("riffle-batch-{}", &hex::encode(digest.finalize())[..20])
    }

    /// A session with the UDFs loaded and every table registered as batch mode reads it (the
    /// sources' `batch` inputs and the static tables), plus what identifies each input's
    /// version (see [`input_identity`]).
    ///
    /// # Errors
    /// A source without a batch input; unreadable inputs or UDF modules.
    pub(crate) async fn batch_session(
        &self,
        options: &RunOptions,
    ) -> Result<(RiffleSession, Vec<(String, String)>)> {
        let session = self.session(options).await?;
        let mut inputs = Vec::new();
        for (name, _) in &self.sources {
            let Some(identity) = self.register_batch(&session, name, name).await? else {
                return Err(key_error(
                    &self.file,
                    &format!("sources.{name}.batch"),
                    "missing: batch mode reads these files",
                ));
            };
            inputs.push((name.clone(), identity));
        }
        for (name, path) in &self.contents.tables {
            let identity = register_input(&session, name, path, delta::AsOf::Latest).await?;
            inputs.push((name.clone(), identity));
        }
        Ok((session, inputs))
    }

    /// Makes batch mode read `path` (a file, directory or Delta table, at its latest version)
    /// for source `name` instead of the file's `batch` input.
    ///
    /// # Errors
    /// No source of that name.
    pub fn set_batch_input(&mut self, name: &str, path: PathBuf) -> Result<()> {
        let names = || {
            self.sources
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(i) = self.sources.iter().position(|(n, _)| n == name) else {
            return Err(RiffleError::Config(format!(
                "{}: no source {name} (its sources: {})",
                self.file.display(),
                names()
            )));
        };
        let source = &mut self.sources[i].1;
        source.batch = Some(path);
        source.batch_version = None;
        source.batch_as_of = None;
        Ok(())
    }

    /// The query.
    pub fn query(&self) -> &str {
        &self.query
    }

    /// The pipeline file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Stream mode's output mode.
    pub fn output_mode(&self) -> OutputMode {
        self.contents.output_mode
    }

    /// The event-time column of each streaming source that declares one, in source order.
    pub fn event_time_columns(&self) -> Vec<&str> {
        self.sources
            .iter()
            .filter_map(|(_, s)| s.event_time.as_deref())
            .collect()
    }

    /// Each streaming source's table name and event-time column, in source order.
    pub(crate) fn sources_with_event_time(&self) -> Vec<(&str, &str)> {
        self.sources
            .iter()
            .filter_map(|(n, s)| Some((n.as_str(), s.event_time.as_deref()?)))
            .collect()
    }

    /// Where stream mode writes its rows, as [`crate::verify`] reads them back.
    ///
    /// # Errors
    /// A stream that prints its rows (nothing to read back); a Kafka sink without brokers.
    pub(crate) fn stream_output(&self) -> Result<StreamOutput<'_>> {
        let ctx = ConfigContext {
            file: &self.file,
            key: "sink.stream".into(),
        };
        Ok(match &self.contents.sink.stream {
            None => return Err(self.printed()),
            Some(SinkSpec::Path(p)) if p.as_os_str() == "console" => return Err(self.printed()),
            Some(SinkSpec::Path(dir)) => StreamOutput::ParquetDir(dir),
            Some(SinkSpec::Table(SinkTable::Delta(d))) => StreamOutput::Delta {
                path: &d.path,
                keys: &d.keys,
            },
            Some(SinkSpec::Table(SinkTable::Kafka(k))) => StreamOutput::Kafka {
                // The connection settings only: the producer's tuning means nothing to a
                // consumer.
                kafka: crate::connectors::kafka::KafkaConfig {
                    bootstrap: crate::connectors::kafka::bootstrap(&ctx, &k.bootstrap)?,
                    properties: k.properties.clone(),
                }
                .connection_only(),
                topic: &k.topic,
                format: k.format,
            },
        })
    }

    fn printed(&self) -> RiffleError {
        RiffleError::Config(format!(
            "{}: the stream prints its rows (no sink.stream), so there is nothing to verify",
            self.file.display()
        ))
    }

    /// Runs the query in batch mode over the sources' `batch` inputs; writes `sink.batch` or
    /// returns the rows for printing.
    ///
    /// # Errors
    /// Configuration, planning and execution errors.
    pub async fn run_batch(&self, options: &RunOptions) -> Result<BatchOutcome> {
        let (session, inputs) = self.batch_session(options).await?;
        let run_id = self.batch_run_id(&session, &inputs, options.run_name.as_deref());
        if let Some(SinkSpec::Table(SinkTable::Delta(d))) = &self.contents.sink.batch
            && delta::holds_run(&d.path, &run_id).await?
        {
            return Ok(BatchOutcome {
                rows: Vec::new(),
                message: Some(format!(
                    "nothing written: {} already holds batch run {run_id} (the same query, \
                     UDFs, inputs and run name); give another --run-name to write it again",
                    d.path
                )),
            });
        }
        if let Some(monitor) = &options.monitor {
            monitor.batch_started(&run_id, session.modules());
        }
        let df = session.dataframe(&self.query).await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        session.show_progress(options.live);
        let batches = session.collect(df).await?;
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        match &self.contents.sink.batch {
            None => Ok(BatchOutcome {
                rows: batches,
                message: None,
            }),
            Some(SinkSpec::Path(out)) => {
                crate::connectors::files::write_file(out, schema, batches)?;
                Ok(BatchOutcome {
                    rows: Vec::new(),
                    message: Some(format!("wrote {rows} rows to {}", out.display())),
                })
            }
            Some(SinkSpec::Table(SinkTable::Delta(d))) => {
                let version =
                    delta::append(&d.path, batches, &run_id, udf_modules(&session)).await?;
                Ok(BatchOutcome {
                    rows: Vec::new(),
                    message: Some(format!(
                        "appended {rows} rows to {} as version {version} (batch run {run_id})",
                        d.path
                    )),
                })
            }
            Some(SinkSpec::Table(SinkTable::Kafka(_))) => Err(key_error(
                &self.file,
                "sink.batch",
                "batch mode writes files or Delta tables; Kafka is a stream sink",
            )),
        }
    }

    /// The schema of source `name`'s batch input, if it has one (a Kafka source without a
    /// declared schema takes it).
    async fn batch_schema(&self, session: &RiffleSession, name: &str) -> Result<Option<SchemaRef>> {
        const PROBE: &str = "__riffle_schema_probe";
        if self.register_batch(session, name, PROBE).await?.is_none() {
            return Ok(None);
        }
        let schema = session
            .context()
            .table(PROBE)
            .await?
            .schema()
            .as_arrow()
            .clone();
        session.context().deregister_table(PROBE)?;
        Ok(Some(Arc::new(schema)))
    }

    async fn stream_source(
        &self,
        session: &RiffleSession,
        name: &str,
        config: &StreamSourceConfig,
    ) -> Result<Box<dyn StreamSource>> {
        let ctx = ConfigContext {
            file: &self.file,
            key: format!("sources.{name}.stream"),
        };
        Ok(match config {
            StreamSourceConfig::Generator(g) => Box::new(g.build(&ctx)?),
            StreamSourceConfig::Directory(d) => Box::new(d.build(&ctx)?),
            StreamSourceConfig::Kafka(k) => {
                let batch = self.batch_schema(session, name).await?;
                Box::new(k.build(&ctx, name, batch).await?)
            }
        })
    }

    fn stream_sink(&self, session: &RiffleSession) -> Result<Box<dyn Sink>> {
        let ctx = ConfigContext {
            file: &self.file,
            key: "sink.stream".into(),
        };
        Ok(match &self.contents.sink.stream {
            None => Box::new(ConsoleSink { max_rows: 20 }),
            Some(SinkSpec::Path(p)) if p.as_os_str() == "console" => {
                Box::new(ConsoleSink { max_rows: 20 })
            }
            Some(SinkSpec::Path(dir)) => {
                Box::new(ParquetDirSink::new(dir)?.with_udf_modules(udf_modules(session)))
            }
            Some(SinkSpec::Table(SinkTable::Delta(d))) => Box::new(
                DeltaSink::new(&d.path, self.contents.output_mode, d.keys.clone())?
                    .with_udf_modules(udf_modules(session)),
            ),
            Some(SinkSpec::Table(SinkTable::Kafka(k))) => {
                // Every record says which UDF builds made it.
                let headers = udf_modules(session);
                Box::new(k.build(&ctx, headers)?)
            }
        })
    }

    /// Runs the query in stream mode until the trigger or the sources end it, or `stop` is
    /// set.
    ///
    /// # Errors
    /// Configuration, planning and execution errors.
    pub async fn run_stream(&self, options: &RunOptions, stop: &AtomicBool) -> Result<RunSummary> {
        let session = self.session(options).await?;
        let file = &self.contents;
        let mut statics = Vec::new();
        for (name, path) in &file.tables {
            let table = Arc::new(StaticTable::load(path)?);
            session
                .context()
                .register_table(name.as_str(), table.clone())?;
            statics.push(table);
        }
        let mut inputs = Vec::new();
        for (name, source) in &self.sources {
            let config = source.stream.as_ref().ok_or_else(|| {
                key_error(
                    &self.file,
                    &format!("sources.{name}.stream"),
                    "missing: stream mode reads this source",
                )
            })?;
            let built = self.stream_source(&session, name, config).await?;
            let mut input = StreamInput::register(&session, name, built)?;
            if let Some(column) = &source.event_time {
                let delay = source.watermark.map(SqlDuration::micros).unwrap_or(0);
                input = input.with_event_time(column, delay)?;
            }
            inputs.push(input);
        }
        let plan = session
            .context()
            .state()
            .create_logical_plan(&self.query)
            .await?;
        let sink = self.stream_sink(&session)?;
        let checkpoint = file.stream.checkpoint.clone().ok_or_else(|| {
            key_error(
                &self.file,
                "stream.checkpoint",
                "missing: stream mode needs a checkpoint directory",
            )
        })?;
        let stream_options = StreamOptions {
            output_mode: file.output_mode,
            trigger: self.trigger,
            max_rows_per_epoch: file.stream.max_rows_per_epoch.unwrap_or(100_000),
            checkpoint,
            progress_file: file.stream.progress.clone(),
            live: options.live,
            max_epochs: options.max_epochs,
            upgrade_udfs: options.upgrade_udfs,
            hot_swap_udfs: options.hot_swap_udfs,
            partitions: options
                .partitions
                .or(file.stream.partitions)
                .unwrap_or_else(default_partitions),
        };
        let names: Vec<String> = inputs.iter().map(|i| i.name().to_string()).collect();
        let mut query = StreamingQuery::new(&session, inputs, plan, sink, stream_options)
            .await?
            .with_static_tables(statics);
        if let Some(late) = &file.sink.late {
            let sinks = if names.len() == 1 {
                vec![(
                    names[0].clone(),
                    Box::new(ParquetDirSink::new(late)?) as Box<dyn Sink>,
                )]
            } else {
                names
                    .iter()
                    .map(|n| {
                        Ok((
                            n.clone(),
                            Box::new(ParquetDirSink::new(&late.join(n))?) as Box<dyn Sink>,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            query = query.with_late_sinks(sinks);
        }
        if let Some(monitor) = &options.monitor {
            query = query.with_observer(monitor.clone());
        }
        query.run(stop).await
    }
}

/// Registers `path` (a file, a directory of files or a Delta table) as `table` and returns
/// what identifies the version read, for a batch run's id: a Delta table by its version
/// (`as_of` resolved, so the id names what was read), files by name, size and modification
/// time.
async fn register_input(
    session: &RiffleSession,
    table: &str,
    path: &Path,
    as_of: delta::AsOf,
) -> Result<String> {
    let absolute = std::fs::canonicalize(path).map_err(|_| {
        RiffleError::Config(format!("table {table}: {} does not exist", path.display()))
    })?;
    if delta::is_delta_table(path) {
        let version = delta::register(session.context(), table, path, &as_of).await?;
        return Ok(format!("delta {} version {version}", absolute.display()));
    }
    session.register_table(table, path).await?;
    input_identity(&absolute)
}

/// Every file under `path` (or `path` itself) as `name size modified-nanoseconds` lines.
fn input_identity(path: &Path) -> Result<String> {
    let mut files = Vec::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(p) = pending.pop() {
        let meta = std::fs::metadata(&p).map_err(|e| RiffleError::io("reading", &p, e))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&p).map_err(|e| RiffleError::io("listing", &p, e))? {
                pending.push(entry.map_err(|e| RiffleError::io("listing", &p, e))?.path());
            }
        } else {
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            files.push(format!("{} {} {modified}", p.display(), meta.len()));
        }
    }
    files.sort();
    Ok(files.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views(dir: &Path, files: &[(&str, &str)]) -> Vec<(String, PathBuf)> {
        files
            .iter()
            .map(|(name, sql)| {
                let file = dir.join(format!("{name}.sql"));
                std::fs::write(&file, sql).unwrap();
                (name.to_string(), file)
            })
            .collect()
    }

    #[test]
    fn views_become_common_table_expressions() {
        let dir = tempfile::tempdir().unwrap();
        let p = Path::new("p.toml");
        let v = views(
            dir.path(),
            &[("scored", "SELECT a FROM t -- trailing comment\n;\n")],
        );
        assert_eq!(
            with_views(p, &v, "SELECT * FROM scored".into()).unwrap(),
            "WITH scored AS (\nSELECT a FROM t -- trailing comment\n)\nSELECT * FROM scored"
        );
        // A query with its own WITH keeps it, after the views.
        assert_eq!(
            with_views(
                p,
                &v,
                "  with x AS (SELECT 1) SELECT * FROM scored, x".into()
            )
            .unwrap(),
            "WITH scored AS (\nSELECT a FROM t -- trailing comment\n),\nx AS (SELECT 1) SELECT * FROM scored, x"
        );
        assert_eq!(with_views(p, &[], "SELECT 1".into()).unwrap(), "SELECT 1");
        let bad = views(dir.path(), &[("a-b", "SELECT 1")]);
        let e = with_views(p, &bad, "SELECT 1".into())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("views.a-b") && e.contains("plain SQL name"),
            "{e}"
        );
        let empty = views(dir.path(), &[("e", " ;\n")]);
        let e = with_views(p, &empty, "SELECT 1".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no query"), "{e}");
    }

    #[test]
    fn views_keep_the_order_of_the_file() {
        #[derive(Deserialize)]
        struct F {
            #[serde(deserialize_with = "in_file_order")]
            views: Vec<(String, PathBuf)>,
        }
        let f: F =
            toml::from_str("[views]\nz = \"z.sql\"\na = \"a.sql\"\nm = \"m.sql\"\n").unwrap();
        let names: Vec<_> = f.views.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["z", "a", "m"]);
    }
}
