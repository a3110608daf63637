//! The streaming query driver: triggers, epochs, watermarks, recovery and progress.
//!
//! Per epoch (a micro-batch) the driver
//! 1. asks every source what is available and **writes the epoch's offsets ahead** to the
//!    checkpoint, with each source's watermark at the start of the epoch;
//! 2. reads exactly those rows; for stateful queries splits off each source's rows behind its
//!    watermark (late), counting them and sending them to the late sink if there is one;
//! 3. runs the operator graph ([`crate::exec::graph::Graph`]) on the rows and the sources' new
//!    watermarks (max event time seen − delay, for a Kafka source that of its slowest partition
//!    still giving rows, see [`event_time`]; the end of time once every source has ended);
//! 4. persists each operator's state changes, writes the output to the sink under the epoch
//!    number (replacing or skipping any earlier attempt), and **commits** the epoch with the
//!    manifest of its state.
//!
//! The plan and the commit are small files, but each is synced, and a sync waits on a busy
//! disk (see [`lane`]). So two writer threads make them, each in order, and the driver waits
//! only where the protocol needs them: the plan before the commit, and before the sink writes
//! if the sink keeps an epoch it holds ([`Sink::keeps_replayed_epochs`]) and does not carry the
//! plans itself ([`Sink::carries_plans`]: exactly-once Kafka records them in its transaction,
//! and a restart takes back from it a plan the crash lost); the commit before the sources hear
//! of it. The commit writer also waits for the output of a sink that returned before it was
//! acknowledged ([`Sink::acknowledgement`]: at-least-once Kafka, and a Parquet directory,
//! whose epoch file is synced and renamed into place there), and syncs and renames the
//! epoch's state files, written unsynced by the driver. The next epochs run
//! meanwhile, up to 64 with commits in flight (more while they hold one epoch's rows or
//! fewer). A failed commit fails every later one, so the commits made are always a prefix of
//! the epochs.
//!
//! A crash anywhere leaves committed epochs and then planned ones, which the restart re-runs
//! in order, each with its recorded offsets, on the state of the last commit: no lost and no
//! duplicated rows.
//!
//! The driver runs on the async runtime and never blocks it: sources (whose reads may wait on
//! a broker or a disk) run on the blocking pool, and triggers wait with the runtime's timers.

mod event_time;
mod hot_swap;
mod lane;
pub mod progress;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray, BooleanArray, Int64Array, RecordBatch, Scalar};
use arrow::compute::kernels::cmp::gt_eq;
use arrow::compute::{filter_record_batch, is_null, max as max_of, min as min_of, or_kleene};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;

use crate::checkpoint::{
    Checkpoint, EpochCommit, EpochPlan, SourceProgress, SourceRange, StateManifest,
};
use crate::common::{OutputMode, Watermark, to_micros};
use crate::connectors::files::{Reload, StaticTable};
use crate::connectors::sink::{Acknowledgement, Sink};
use crate::connectors::source::{DeadLetter, Input, StreamSource};
use crate::error::{Result, RiffleError};
use crate::exec::graph::Graph;
use crate::plan::fingerprint::UdfPrint;
use crate::plan::{Fingerprint, SourceSpec, compile, streaming_state};
use crate::session::RiffleSession;
use crate::udf::UdfModule;
use hot_swap::UdfWatch;
use lane::Lane;
use progress::{EpochProgress, Phases, ProgressWriter, SourceEpoch};

/// When epochs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Every interval, with whatever arrived since the last one.
    ProcessingTime(Duration),
    /// Process everything available now (in epochs of at most the epoch size), then stop.
    AvailableNow,
    /// Start the next epoch as soon as the previous one is done and any row has arrived.
    LowLatency,
}

/// Streaming settings.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Output mode.
    pub output_mode: OutputMode,
    /// Trigger.
    pub trigger: Trigger,
    /// Most rows per epoch, per source.
    pub max_rows_per_epoch: usize,
    /// Checkpoint directory.
    pub checkpoint: PathBuf,
    /// JSON-lines progress file (default: `progress.jsonl` in the checkpoint directory).
    pub progress_file: Option<PathBuf>,
    /// Show a live progress line on stderr.
    pub live: bool,
    /// Stop after this many epochs in this run (tests, and `riffle run --max-epochs`).
    pub max_epochs: Option<u64>,
    /// Take over a checkpoint written with other UDF code or configuration on purpose
    /// (`riffle run --upgrade-udfs`): the new modules serve from the next epoch.
    pub upgrade_udfs: bool,
    /// Swap in a UDF module whose file is replaced while the query runs, at the next epoch
    /// boundary, under the rules of `upgrade_udfs` (`riffle run --hot-swap-udfs`; see
    /// [`hot_swap`]).
    pub hot_swap_udfs: bool,
    /// Instances of each operator that can be partitioned (keyed aggregations, OVER windows,
    /// de-duplication and joins; stateless filters and projections), which share its rows on
    /// as many cores
    /// ([`crate::exec::partition`]). A restart may change it: state goes to the instance of
    /// its key.
    pub partitions: usize,
}

/// The default number of partitions: one per core the process may use.
pub fn default_partitions() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            output_mode: OutputMode::Append,
            trigger: Trigger::AvailableNow,
            max_rows_per_epoch: 100_000,
            checkpoint: PathBuf::from("checkpoint"),
            progress_file: None,
            live: false,
            max_epochs: None,
            upgrade_udfs: false,
            hot_swap_udfs: false,
            partitions: default_partitions(),
        }
    }
}

/// Told what a running query does, for monitoring (the HTTP server's
/// [`Monitor`](crate::server::Monitor) implements it). Called on the driver's task between
/// epochs, so an implementation must be quick and must not block.
pub trait QueryObserver: Send + Sync {
    /// A run of the query starts (also after a restart from the checkpoint): its ids, its
    /// operator graph, its sources (name, kind) and UDF modules.
    fn query_started(
        &self,
        query_id: &str,
        run_id: &str,
        graph: &Graph,
        sources: Vec<(String, String)>,
        modules: &[Arc<UdfModule>],
    );
    /// An epoch committed; `progress` is its record and `line` the JSON line the progress
    /// file gets for it.
    fn epoch_committed(&self, progress: &EpochProgress, line: &str);
    /// The query swapped UDF modules between epochs (a hot swap): `modules` serve from now on.
    fn udfs_swapped(&self, _modules: &[Arc<UdfModule>]) {}
    /// Source `source` rejected `rejected` records in the committed epoch `epoch` (they went
    /// to its dead-letter topic): `letters` are the first of them (see
    /// [`Input::rejected_sample`](crate::connectors::source::Input::rejected_sample)).
    fn records_rejected(
        &self,
        _epoch: u64,
        _source: &str,
        _rejected: u64,
        _letters: &[DeadLetter],
    ) {
    }
}

/// A streaming source registered as a table, ready to plan queries against.
pub struct StreamInput {
    spec: SourceSpec,
    source: Box<dyn StreamSource>,
}

impl StreamInput {
    /// Registers `source` as table `name` in the session (for planning: a streaming query never
    /// scans the table, it reads the source).
    ///
    /// # Errors
    /// A table with that name already exists.
    pub fn register(
        session: &RiffleSession,
        name: &str,
        source: Box<dyn StreamSource>,
    ) -> Result<Self> {
        let schema = source.schema();
        session.context().register_table(
            name,
            Arc::new(StreamingTable::try_new(schema.clone(), vec![])?),
        )?;
        Ok(StreamInput {
            spec: SourceSpec {
                name: name.to_string(),
                kind: source.kind().to_string(),
                schema,
                event_time: None,
                watermark_delay: 0,
            },
            source,
        })
    }

    /// Declares the source's event-time column and how late (microseconds) its rows may arrive.
    ///
    /// # Errors
    /// [`RiffleError::Config`] for a column that is missing or not a timestamp.
    pub fn with_event_time(mut self, column: &str, watermark_delay: i64) -> Result<Self> {
        let schema = &self.spec.schema;
        let index = schema.index_of(column).map_err(|_| {
            RiffleError::Config(format!(
                "event_time column `{column}` is not in source `{}` (columns: {})",
                self.spec.name,
                schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let data_type = schema.field(index).data_type();
        if !matches!(
            data_type,
            DataType::Timestamp(..) | DataType::Date32 | DataType::Date64
        ) {
            return Err(RiffleError::Config(format!(
                "event_time column `{column}` of source `{}` must be a timestamp, not {data_type}",
                self.spec.name
            )));
        }
        self.spec.event_time = Some(column.to_string());
        self.spec.watermark_delay = watermark_delay;
        Ok(self)
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Epochs run (including a replayed one).
    pub epochs: u64,
    /// Input rows.
    pub input_rows: u64,
    /// Rows written to the sink.
    pub output_rows: u64,
    /// Rows dropped as late.
    pub late_rows: u64,
    /// Every source ended and every window was closed.
    pub finished: bool,
}

impl RunSummary {
    /// Adds a later run's counts (a run restarted from its checkpoint after a failure).
    pub fn absorb(&mut self, later: &RunSummary) {
        self.epochs += later.epochs;
        self.input_rows += later.input_rows;
        self.output_rows += later.output_rows;
        self.late_rows += later.late_rows;
        self.finished = later.finished;
    }
}

/// A source at run time: the source itself (absent while it runs on the blocking pool) and
/// its event-time progress.
struct SourceRuntime {
    spec: SourceSpec,
    source: Option<Box<dyn StreamSource>>,
    event_time: Option<usize>,
    watermark: Watermark,
    max_event_time: i64,
    /// The largest event time per split (Kafka partition), for sources that have them.
    split_max_event_times: BTreeMap<String, i64>,
    offset: serde_json::Value,
}

impl SourceRuntime {
    /// Runs `f` on the source on the blocking pool (a read may wait on a broker or a disk).
    async fn blocking<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut dyn StreamSource) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let mut source = self.source.take().ok_or_else(|| {
            RiffleError::Internal(format!(
                "source {} used after a failed call",
                self.spec.name
            ))
        })?;
        let (source, result) = tokio::task::spawn_blocking(move || {
            let result = f(source.as_mut());
            (source, result)
        })
        .await
        .map_err(|e| RiffleError::Internal(format!("source task: {e}")))?;
        self.source = Some(source);
        result
    }
}

/// A running streaming query.
pub struct StreamingQuery {
    state: SessionState,
    modules: Vec<Arc<UdfModule>>,
    sources: Vec<SourceRuntime>,
    graph: Graph,
    stateful: bool,
    output_schema: SchemaRef,
    sink: Box<dyn Sink>,
    late_sinks: BTreeMap<String, Box<dyn Sink>>,
    static_tables: Vec<Arc<StaticTable>>,
    checkpoint: Arc<Checkpoint>,
    /// Writes the epochs' plans, in order, off the driver's path.
    plans: Lane,
    /// The last epoch whose plan the plan writer made durable.
    plans_durable: Arc<AtomicU64>,
    /// Plans handed to the plan writer and not known to be durable yet, oldest first: what a
    /// sink that carries plans records with its next epoch ([`Sink::carries_plans`]).
    /// Kept as the JSON the sinks record, made once per plan.
    plans_in_flight: VecDeque<(u64, serde_json::Value)>,
    /// Writes the epochs' commits and progress lines, in order, off the driver's path.
    commits: Lane,
    /// Epochs whose commits are written or being written, oldest first, that the driver has
    /// not yet told the sources and the observer of.
    committing: VecDeque<Committing>,
    /// What the checkpoint pins; a hot swap updates its UDF part.
    fingerprint: Fingerprint,
    /// The module files, watched for a hot swap (`None` unless it is on).
    udf_watch: Option<UdfWatch>,
    /// Warnings for the next epoch's progress record (a module that could not be swapped).
    pending_warnings: Vec<String>,
    manifest: StateManifest,
    options: StreamOptions,
    progress: ProgressWriter,
    observer: Option<Arc<dyn QueryObserver>>,
}

impl StreamingQuery {
    /// Compiles `plan` (from SQL or a DataFrame over the session, reading `inputs`) into a
    /// streaming query writing to `sink`, and opens its checkpoint.
    ///
    /// # Errors
    /// [`RiffleError::Unsupported`] for queries or output modes that cannot stream;
    /// [`RiffleError::Checkpoint`] for a checkpoint directory of another query or in use.
    pub async fn new(
        session: &RiffleSession,
        inputs: Vec<StreamInput>,
        plan: LogicalPlan,
        sink: Box<dyn Sink>,
        options: StreamOptions,
    ) -> Result<Self> {
        let state = streaming_state(session.context());
        let specs: Vec<SourceSpec> = inputs.iter().map(|i| i.spec.clone()).collect();
        let modules = session.modules();
        let compiled = compile(
            &plan,
            &specs,
            options.output_mode,
            &state,
            &modules,
            options.partitions,
        )
        .await?;
        let mut graph = compiled.graph;
        let stateful = graph.is_stateful();
        let checkpoint = Arc::new(Checkpoint::open_upgrading(
            &options.checkpoint,
            &compiled.fingerprint,
            options.upgrade_udfs,
        )?);
        let progress_path = options
            .progress_file
            .clone()
            .unwrap_or_else(|| options.checkpoint.join("progress.jsonl"));
        let sources = inputs
            .into_iter()
            .map(|mut i| {
                let event_time = i
                    .spec
                    .event_time
                    .as_ref()
                    .and_then(|c| i.spec.schema.index_of(c).ok());
                i.source.set_partitions(options.partitions);
                SourceRuntime {
                    spec: i.spec,
                    source: Some(i.source),
                    event_time,
                    watermark: Watermark::NONE,
                    max_event_time: i64::MIN,
                    split_max_event_times: BTreeMap::new(),
                    offset: serde_json::Value::Null,
                }
            })
            .collect();
        Ok(StreamingQuery {
            progress: ProgressWriter::new(&progress_path, checkpoint.query_id(), options.live)?,
            state,
            modules,
            sources,
            graph,
            stateful,
            output_schema: compiled.output_schema,
            sink,
            late_sinks: BTreeMap::new(),
            static_tables: Vec::new(),
            checkpoint,
            plans: Lane::new("riffle-plans")?,
            plans_durable: Arc::new(AtomicU64::new(0)),
            plans_in_flight: VecDeque::new(),
            commits: Lane::new("riffle-commits")?,
            committing: VecDeque::new(),
            fingerprint: compiled.fingerprint,
            udf_watch: options
                .hot_swap_udfs
                .then(|| UdfWatch::new(session.slots())),
            pending_warnings: Vec::new(),
            manifest: StateManifest::new(),
            options,
            observer: None,
        })
    }

    /// Reports the run's start and every committed epoch to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn QueryObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Sends the first source's late rows (rows behind its watermark) to `sink`.
    pub fn with_late_sink(mut self, sink: Box<dyn Sink>) -> Self {
        if let Some(first) = self.sources.first() {
            self.late_sinks.insert(first.spec.name.clone(), sink);
        }
        self
    }

    /// Sends each named source's late rows to its sink.
    pub fn with_late_sinks(mut self, sinks: Vec<(String, Box<dyn Sink>)>) -> Self {
        self.late_sinks.extend(sinks);
        self
    }

    /// Static tables to reload when their files change.
    pub fn with_static_tables(mut self, tables: Vec<Arc<StaticTable>>) -> Self {
        self.static_tables = tables;
        self
    }

    /// Output schema of the query.
    pub fn schema(&self) -> SchemaRef {
        self.output_schema.clone()
    }

    /// The operator graph (ids, kinds, metrics).
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The checkpoint's query id.
    pub fn query_id(&self) -> &str {
        self.checkpoint.query_id()
    }

    /// Writes an epoch's output to the sink and each source's late rows to its late sink (not
    /// committed yet). Returns what the commit must wait for ([`Sink::acknowledgement`]).
    async fn write_output(
        &mut self,
        epoch: u64,
        output: &[RecordBatch],
        late: &[Vec<RecordBatch>],
    ) -> Result<Vec<Acknowledgement>> {
        self.sink
            .write_epoch(epoch, &self.output_schema, output)
            .await?;
        let mut acknowledgements: Vec<_> = self.sink.acknowledgement(epoch).into_iter().collect();
        for (s, rows) in self.sources.iter().zip(late) {
            if let Some(late_sink) = self.late_sinks.get_mut(&s.spec.name) {
                late_sink.write_epoch(epoch, &s.spec.schema, rows).await?;
                acknowledgements.extend(late_sink.acknowledgement(epoch));
            }
        }
        Ok(acknowledgements)
    }

    fn source_watermarks(&self) -> Vec<Watermark> {
        self.sources.iter().map(|s| s.watermark).collect()
    }

    /// Runs until the trigger says stop, the sources end, or `stop` is set (checked between
    /// epochs). Resumes from the checkpoint if there is one.
    ///
    /// # Errors
    /// Any epoch's failure; nothing of a failed epoch is committed, so a restart retries it.
    pub async fn run(&mut self, stop: &AtomicBool) -> Result<RunSummary> {
        let mut summary = RunSummary::default();
        let id = self.checkpoint.query_id().to_string();
        self.sink.start(&id).await?;
        // Dead letters bound for the cluster an exactly-once sink writes to go into the
        // sink's epoch transactions: a replayed epoch then never sends them twice.
        for s in &mut self.sources {
            if let Some(source) = s.source.as_mut()
                && let Some(cluster) = source.dead_letter_cluster()
                && self.sink.writes_dead_letters_for(&cluster)
            {
                source.hand_over_dead_letters();
            }
        }
        for (name, late) in &mut self.late_sinks {
            late.start(&format!("{id}-late-{name}")).await?;
        }
        if let Some(observer) = &self.observer {
            let sources = self
                .sources
                .iter()
                .map(|s| {
                    let kind = s.source.as_ref().map_or("unknown", |x| x.kind());
                    (s.spec.name.clone(), kind.to_string())
                })
                .collect();
            observer.query_started(
                &id,
                self.progress.run_id(),
                &self.graph,
                sources,
                &self.modules,
            );
        }
        let mut epoch = match self.checkpoint.last_commit()? {
            Some(commit) => {
                self.checkpoint
                    .restore_state(&commit.state, &mut self.graph)?;
                self.progress.recover(&commit)?;
                self.manifest = commit.state.clone();
                let plan = self.checkpoint.planned(commit.epoch)?.ok_or_else(|| {
                    RiffleError::Checkpoint(format!(
                        "checkpoint {}: epoch {} is committed but its offsets are missing",
                        self.checkpoint.root().display(),
                        commit.epoch
                    ))
                })?;
                for s in &mut self.sources {
                    let (progress, range) = match (
                        commit.sources.get(&s.spec.name),
                        plan.sources.get(&s.spec.name),
                    ) {
                        (Some(p), Some(r)) => (p, r),
                        _ => {
                            return Err(RiffleError::Checkpoint(format!(
                                "checkpoint {}: no progress recorded for source `{}`",
                                self.checkpoint.root().display(),
                                s.spec.name
                            )));
                        }
                    };
                    s.watermark = progress.watermark;
                    s.max_event_time = progress.max_event_time;
                    s.split_max_event_times = progress.split_max_event_times.clone();
                    s.offset = range.end.clone();
                }
                let watermarks = self.source_watermarks();
                self.graph.settle_watermarks(&watermarks);
                if commit.last {
                    // A bounded query that ended: new input since then reopens a stateless
                    // query; a stateful one closed its windows and flushed its state when its
                    // input ended, and cannot take more rows behind that end.
                    let mut arrived = Vec::new();
                    for s in &mut self.sources {
                        let from = s.offset.clone();
                        let end = s.blocking(move |src| src.available(&from, 1)).await?;
                        if end != s.offset {
                            arrived.push(s.spec.name.clone());
                        }
                    }
                    if arrived.is_empty() {
                        summary.finished = true;
                        return Ok(summary);
                    }
                    if self.stateful {
                        return Err(RiffleError::Checkpoint(format!(
                            "checkpoint {}: this query finished at epoch {} when its input \
                             ended, which closed its windows and flushed its state; new input \
                             has arrived since in {}. Use a new checkpoint directory to run it \
                             over everything, or run without stop_when_empty to keep it open",
                            self.checkpoint.root().display(),
                            commit.epoch,
                            arrived.join(", ")
                        )));
                    }
                }
                commit.epoch
            }
            None => {
                for s in &mut self.sources {
                    s.offset = s.blocking(|src| src.initial()).await?;
                }
                0
            }
        };
        self.recover_carried_plans(epoch)?;
        // The first epoch's input rate counts from here, after the sink, state and sources
        // are ready.
        self.progress.start_clock();
        // Epochs planned but not committed before a crash run again, in order, each with its
        // offsets: more than one when commits were still being written (see `lane`).
        while let Some(plan) = self.checkpoint.planned(epoch + 1)? {
            self.run_epoch(&plan, None, Duration::ZERO, &mut summary)
                .await?;
            epoch = plan.epoch;
            if plan.last {
                summary.finished = true;
                self.settle(Settle::All).await?;
                self.progress.finish();
                return Ok(summary);
            }
        }
        loop {
            if stop.load(Ordering::Relaxed)
                || self.options.max_epochs.is_some_and(|m| summary.epochs >= m)
            {
                break;
            }
            let tick = Instant::now();
            let max_rows = self.options.max_rows_per_epoch;
            let mut ranges = BTreeMap::new();
            let mut moved = false;
            let mut last = true;
            for s in &mut self.sources {
                let from = s.offset.clone();
                let (end, finished) = s
                    .blocking(move |src| {
                        let end = src.available(&from, max_rows)?;
                        let finished = src.finished(&end);
                        Ok((end, finished))
                    })
                    .await?;
                moved |= end != s.offset;
                last &= finished;
                ranges.insert(
                    s.spec.name.clone(),
                    SourceRange {
                        start: s.offset.clone(),
                        end,
                    },
                );
            }
            if !moved && !last {
                // Idle: the commits being written finish while the trigger waits, so that the
                // sources, the progress and the monitor catch up, but never delay the next
                // epoch.
                match self.options.trigger {
                    Trigger::AvailableNow => break,
                    Trigger::LowLatency => {
                        self.settle(Settle::Ready).await?;
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                    Trigger::ProcessingTime(interval) => {
                        let next = tokio::time::Instant::now() + interval;
                        self.settle(Settle::Until(next)).await?;
                        tokio::time::sleep_until(next).await;
                    }
                }
                continue;
            }
            self.swap_udfs(epoch + 1).await?;
            let plan = EpochPlan {
                epoch: epoch + 1,
                sources: ranges,
                watermarks: self
                    .sources
                    .iter()
                    .map(|s| (s.spec.name.clone(), s.watermark))
                    .collect(),
                last,
            };
            // The plan is synced while the epoch reads and computes; see `run_epoch`.
            let plan_written = {
                let (checkpoint, plan) = (self.checkpoint.clone(), plan.clone());
                let durable = self.plans_durable.clone();
                self.plans.submit(move || {
                    hold_point("plan", plan.epoch);
                    checkpoint.write_plan(&plan)?;
                    durable.fetch_max(plan.epoch, Ordering::Release);
                    Ok(())
                })
            };
            self.plans_in_flight.push_back((
                plan.epoch,
                serde_json::to_value(&plan).expect("serialisable"),
            ));
            self.run_epoch(&plan, Some(plan_written), tick.elapsed(), &mut summary)
                .await?;
            epoch = plan.epoch;
            if last {
                summary.finished = true;
                break;
            }
            if let Trigger::ProcessingTime(interval) = self.options.trigger {
                let next = tick + interval;
                self.settle(Settle::Until(next.into())).await?;
                tokio::time::sleep_until(next.into()).await;
            }
        }
        self.settle(Settle::All).await?;
        self.progress.finish();
        Ok(summary)
    }

    /// Writes back the plans that sinks carried (see [`Sink::carries_plans`]) and the
    /// checkpoint lacks: a sink may hold an epoch whose plan a crash took before it was
    /// durable. The epoch then runs again over the input it had, and the sink skips it.
    ///
    /// `committed` is the last committed epoch.
    ///
    /// # Errors
    /// A carried plan that does not read, differs from the checkpoint's, or leaves a gap.
    fn recover_carried_plans(&self, committed: u64) -> Result<()> {
        let root = self.checkpoint.root().display();
        for sink in std::iter::once(&self.sink).chain(self.late_sinks.values()) {
            for carried in sink.carried_plans() {
                let plan: EpochPlan = serde_json::from_value(carried).map_err(|e| {
                    RiffleError::Checkpoint(format!(
                        "checkpoint {root}: a plan the sink recorded does not read: {e}"
                    ))
                })?;
                if plan.epoch <= committed {
                    continue;
                }
                match self.checkpoint.planned(plan.epoch)? {
                    Some(known) if known == plan => {}
                    Some(_) => {
                        return Err(RiffleError::Checkpoint(format!(
                            "checkpoint {root}: epoch {}'s plan differs from its sink's record",
                            plan.epoch
                        )));
                    }
                    None => {
                        if plan.epoch > committed + 1
                            && self.checkpoint.planned(plan.epoch - 1)?.is_none()
                        {
                            return Err(RiffleError::Checkpoint(format!(
                                "checkpoint {root}: the sink holds epoch {}, epoch {}'s plan is lost",
                                plan.epoch,
                                plan.epoch - 1
                            )));
                        }
                        self.checkpoint.write_plan(&plan)?;
                        tracing::info!(
                            epoch = plan.epoch,
                            "the epoch's plan, lost from the checkpoint, came back from its sink"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Tells the sources and the observer of the epochs whose commits are now durable, oldest
    /// first, waiting for commits as `how` says. Never more epochs are left in flight than
    /// [`MAX_COMMITTING`] allows: each is one more to run again after a crash.
    ///
    /// # Errors
    /// A failed commit or progress line, or a source's failure.
    async fn settle(&mut self, how: Settle) -> Result<()> {
        loop {
            let in_flight = self.committing.len();
            let full = in_flight >= MOST_COMMITTING
                || (in_flight >= MAX_COMMITTING
                    && self.committing.iter().map(|c| c.rows).sum::<u64>()
                        > self.options.max_rows_per_epoch as u64);
            let Some(front) = self.committing.front_mut() else {
                break;
            };
            let outcome = if how == Settle::All || full {
                Some(lane::done(&mut front.written).await)
            } else if let Settle::Until(deadline) = how {
                tokio::time::timeout_at(deadline, lane::done(&mut front.written))
                    .await
                    .ok()
            } else {
                lane::poll(&mut front.written)
            };
            let Some(outcome) = outcome else {
                break;
            };
            let c = self.committing.pop_front().expect("the front epoch");
            outcome?;
            for (s, end) in self.sources.iter_mut().zip(c.ends) {
                s.blocking(move |src| {
                    src.committed(&end);
                    Ok(())
                })
                .await?;
            }
            failpoint("after-commit", c.epoch).await;
            self.progress.show(&c.progress);
            if let Some(observer) = &self.observer {
                observer.epoch_committed(&c.progress, &c.line);
                for (source, rejected, sample) in &c.rejected {
                    observer.records_rejected(c.epoch, source, *rejected, sample);
                }
            }
        }
        Ok(())
    }

    /// Swaps in the UDF modules whose files were replaced (see [`hot_swap`]), to serve from
    /// epoch `from_epoch` on. The checkpoint pins them first, so that a crash before the
    /// epoch commits restarts with the modules now on disk, as it expects.
    async fn swap_udfs(&mut self, from_epoch: u64) -> Result<()> {
        let Some(watch) = &mut self.udf_watch else {
            return Ok(());
        };
        let (ready, warnings) = watch.changed();
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        self.pending_warnings.extend(warnings);
        if ready.is_empty() {
            return Ok(());
        }
        // The epochs before `from_epoch` commit first: a crash would otherwise run them again
        // with the new modules, which the checkpoint says serve only from `from_epoch` on.
        self.settle(Settle::All).await?;
        for r in &ready {
            // The fingerprint lists the session's modules in load order, as the slots.
            if let Some(p) = self.fingerprint.udfs.get_mut(r.index) {
                *p = UdfPrint::of(&r.module);
            }
        }
        self.checkpoint
            .record_udf_swap(&self.fingerprint, from_epoch)?;
        for r in ready {
            let old = r.slot.get();
            tracing::warn!(
                module = %old.file_name(),
                old_sha256 = %old.hash(),
                sha256 = %r.module.hash(),
                from_epoch,
                "hot swap: the replaced UDF module serves from this epoch on"
            );
            r.slot.replace(r.module.clone());
            for m in &mut self.modules {
                if Arc::ptr_eq(m, &old) {
                    *m = r.module.clone();
                }
            }
        }
        self.sink
            .set_udf_modules(self.modules.iter().map(|m| m.stamp()).collect());
        if let Some(observer) = &self.observer {
            observer.udfs_swapped(&self.modules);
        }
        Ok(())
    }

    /// Runs the epoch `plan`, which took `planning` to make and is being written to the
    /// checkpoint (`plan_written`), or was before a crash (`None`), and hands its commit to
    /// the commit writer.
    ///
    /// The plan must be durable before the sink writes when the sink keeps an epoch it
    /// already holds ([`Sink::keeps_replayed_epochs`]) and does not carry the plans not yet
    /// durable itself ([`Sink::carries_plans`]): the driver waits for it there.
    /// Otherwise only before the commit (a restart reads the committed epoch's offsets from
    /// it): the commit writer waits for it. The commit must be durable only before the
    /// sources hear of it, and before a later commit (the commit writer keeps their order).
    /// Until then the epoch is planned and not committed, and a restart runs it again with
    /// its offsets, as it does any such epoch.
    async fn run_epoch(
        &mut self,
        plan: &EpochPlan,
        mut plan_written: Option<lane::Pending>,
        planning: Duration,
        summary: &mut RunSummary,
    ) -> Result<()> {
        let started = Instant::now();
        let mut phases = Phases {
            plan_ms: planning.as_secs_f64() * 1e3,
            ..Phases::default()
        };
        let mut reloaded = false;
        let mut warnings = std::mem::take(&mut self.pending_warnings);
        for table in &self.static_tables {
            match table.reload_if_changed() {
                Reload::Reloaded => reloaded = true,
                Reload::Unchanged | Reload::Settling => {}
                Reload::Failed(e) => {
                    let warning = format!(
                        "static table {} not reloaded, its previous rows stay in use: {e}",
                        table.path().display()
                    );
                    tracing::warn!("{warning}");
                    warnings.push(warning);
                }
            }
        }
        if reloaded {
            self.graph.static_tables_changed(&self.state).await?;
        }

        let t = Instant::now();
        let mut inputs: Vec<Input> = Vec::with_capacity(self.sources.len());
        for s in &mut self.sources {
            let range = plan.sources.get(&s.spec.name).cloned().ok_or_else(|| {
                RiffleError::Checkpoint(format!(
                    "checkpoint {}: epoch {} has no offsets for source `{}`",
                    self.checkpoint.root().display(),
                    plan.epoch,
                    s.spec.name
                ))
            })?;
            s.offset = range.end.clone();
            inputs.push(
                s.blocking(move |src| src.read(&range.start, &range.end))
                    .await?,
            );
        }
        phases.read_ms = ms(t);

        // Event time: each source's rows advance its watermark; rows behind the watermark the
        // epoch started with are late for stateful queries.
        let mut batches: Vec<Vec<RecordBatch>> = Vec::with_capacity(inputs.len());
        let mut late: Vec<Vec<RecordBatch>> = Vec::with_capacity(inputs.len());
        let mut per_source = Vec::with_capacity(inputs.len());
        for (s, input) in self.sources.iter_mut().zip(&mut inputs) {
            let start_watermark = plan
                .watermarks
                .get(&s.spec.name)
                .copied()
                .unwrap_or(Watermark::NONE);
            let mut kept = Vec::with_capacity(input.batches.len());
            let mut late_batches = Vec::new();
            let mut input_rows = 0u64;
            let mut late_rows = 0u64;
            let mut gave = BTreeSet::new();
            for (i, batch) in std::mem::take(&mut input.batches).into_iter().enumerate() {
                input_rows += batch.num_rows() as u64;
                let Some(index) = s.event_time else {
                    kept.push(batch);
                    continue;
                };
                let ts = to_micros(batch.column(index))?;
                let ts = ts.as_primitive::<Int64Type>();
                if let Some(m) = max_of(ts) {
                    s.max_event_time = s.max_event_time.max(m);
                    if let Some(split) = input.splits.get(i) {
                        let split_max = s.split_max_event_times.entry(split.clone()).or_insert(m);
                        *split_max = (*split_max).max(m);
                        gave.insert(split.clone());
                    }
                }
                if !self.stateful || start_watermark == Watermark::NONE {
                    kept.push(batch);
                    continue;
                }
                let Some(mask) = on_time(ts, start_watermark)? else {
                    kept.push(batch);
                    continue;
                };
                late_rows += mask.false_count() as u64;
                late_batches.push(filter_record_batch(&batch, &arrow::compute::not(&mask)?)?);
                kept.push(filter_record_batch(&batch, &mask)?);
            }
            s.watermark = if plan.last {
                Watermark::END
            } else if s.event_time.is_some() {
                match event_time::frontier(
                    s.max_event_time,
                    &s.split_max_event_times,
                    &gave,
                    &input.backlog,
                ) {
                    Some(t) => s
                        .watermark
                        .max(Watermark::from_max_event_time(t, s.spec.watermark_delay)),
                    None => s.watermark,
                }
            } else {
                Watermark::NONE
            };
            per_source.push(SourceEpoch {
                name: s.spec.name.clone(),
                start_offset: plan.sources[&s.spec.name].start.clone(),
                end_offset: plan.sources[&s.spec.name].end.clone(),
                input_rows,
                late_rows,
                lost_records: input.lost_records,
                dead_letters: input.rejected,
                lag: std::mem::take(&mut input.backlog),
                watermark: s.watermark.rfc3339(),
            });
            warnings.append(&mut input.warnings);
            batches.push(kept);
            late.push(late_batches);
        }

        let t = Instant::now();
        let watermarks = self.source_watermarks();
        let output = self.graph.run_epoch(&batches, &watermarks).await?;
        let output = output
            .into_iter()
            .map(|b| {
                if b.schema().fields() == self.output_schema.fields() {
                    Ok(b)
                } else {
                    RecordBatch::try_new(self.output_schema.clone(), b.columns().to_vec())
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        phases.operators_ms = ms(t);

        // State changes are encoded here and written on a blocking thread while the sink
        // writes the output; the commit below waits for both, and syncs the state files
        // (and a Parquet directory's epoch file) on its own thread before it commits.
        let t = Instant::now();
        let state = self
            .checkpoint
            .encode_state(plan.epoch, &mut self.graph, &self.manifest)?;
        let state = tokio::task::spawn_blocking(move || state.write_unpublished());
        phases.state_ms = ms(t);

        // A sink that keeps the epochs it holds needs the plan durable before it writes,
        // unless it carries the plans not yet durable itself.
        let sinks = || std::iter::once(&self.sink).chain(self.late_sinks.values());
        let needs_plan = sinks().any(|s| s.keeps_replayed_epochs() && !s.carries_plans());
        if needs_plan || armed("after-plan", plan.epoch) {
            plan_durable(&mut plan_written, plan.epoch, &mut phases).await?;
        }
        let durable = self.plans_durable.load(Ordering::Acquire);
        while self
            .plans_in_flight
            .front()
            .is_some_and(|(epoch, _)| *epoch <= durable)
        {
            self.plans_in_flight.pop_front();
        }
        if sinks().any(|s| s.carries_plans()) {
            let plans: Vec<_> = self
                .plans_in_flight
                .iter()
                .filter(|(epoch, _)| *epoch <= plan.epoch)
                .map(|(_, plan)| plan.clone())
                .collect();
            for sink in std::iter::once(&mut self.sink).chain(self.late_sinks.values_mut()) {
                if sink.carries_plans() {
                    sink.carry_plans(plans.clone());
                }
            }
        }

        let t = Instant::now();
        let output_rows: u64 = output.iter().map(|b| b.num_rows() as u64).sum();
        let letters: Vec<_> = inputs
            .iter_mut()
            .flat_map(|i| std::mem::take(&mut i.dead_letters))
            .collect();
        if !letters.is_empty() {
            self.sink.stage_dead_letters(letters);
        }
        let written = self.write_output(plan.epoch, &output, &late).await;
        phases.sink_ms = ms(t);
        // Even when the sink failed: no state file is left being written behind the caller.
        let t = Instant::now();
        let state = state
            .await
            .map_err(|e| RiffleError::Internal(format!("the state writer failed: {e}")))?;
        let acknowledgements = written?;
        let (manifest, state_bytes_written, state_files) = state?;
        phases.state_ms += ms(t);
        if holds("after-state", plan.epoch) || holds("after-sink", plan.epoch) {
            // Whoever looks at the checkpoint during the hold sees what the point names: this
            // epoch planned, and the ones before it committed.
            plan_durable(&mut plan_written, plan.epoch, &mut phases).await?;
            self.settle(Settle::All).await?;
        }
        failpoint("after-state", plan.epoch).await;
        failpoint("after-sink", plan.epoch).await;

        let input_rows: u64 = per_source.iter().map(|s| s.input_rows).sum();
        let late_rows: u64 =
            per_source.iter().map(|s| s.late_rows).sum::<u64>() + self.graph.late_rows();
        self.graph.measure_state();
        let watermark = watermarks.iter().copied().min().unwrap_or(Watermark::NONE);
        let mut progress = EpochProgress::new(
            plan,
            watermark,
            per_source,
            output_rows,
            late_rows,
            phases,
            &self.graph,
            state_bytes_written,
            None,
            &self.modules,
        );
        progress.warnings = warnings;
        self.progress.prepare(&mut progress);

        // The output is out: from here the epoch waits only for earlier epochs' commits (when
        // too many are in flight) before handing its own over.
        let arrival = inputs
            .iter()
            .filter_map(|i| i.arrival)
            .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)));
        progress.latency_ms = arrival.map(|(first, last)| {
            let now = Instant::now();
            (
                now.saturating_duration_since(last).as_secs_f64() * 1000.0,
                now.saturating_duration_since(first).as_secs_f64() * 1000.0,
            )
        });
        let t = Instant::now();
        self.settle(Settle::Ready).await?;
        progress.add_commit_time(ms(t), planning.as_secs_f64() * 1e3 + ms(started));
        let line = serde_json::to_string(&progress).expect("serialisable");
        let commit = EpochCommit {
            epoch: plan.epoch,
            sources: self
                .sources
                .iter()
                .map(|s| {
                    (
                        s.spec.name.clone(),
                        SourceProgress {
                            watermark: s.watermark,
                            max_event_time: s.max_event_time,
                            split_max_event_times: s.split_max_event_times.clone(),
                        },
                    )
                })
                .collect(),
            state: manifest.clone(),
            last: plan.last,
            progress: Some(serde_json::to_value(&progress).expect("serialisable")),
        };
        let written = {
            let (checkpoint, log, line) =
                (self.checkpoint.clone(), self.progress.log(), line.clone());
            let epoch = plan.epoch;
            self.commits.submit(move || {
                hold_point("commit", epoch);
                // Not waited for yet if the sink let the epoch go on: the commit follows it.
                if let Some(plan) = plan_written {
                    lane::wait_blocking(plan)?;
                }
                // The state files, written and not yet synced.
                state_files.publish()?;
                // The sinks that returned before their output was acknowledged.
                for acknowledged in acknowledgements {
                    acknowledged()?;
                }
                crash_point("before-commit", epoch);
                checkpoint.commit(&commit)?;
                crash_point("after-commit", epoch);
                // A crash before this line loses it; the next run writes it from the commit.
                log.lock().expect("progress log lock").append(&line)
            })
        };
        self.manifest = manifest;
        self.committing.push_back(Committing {
            epoch: plan.epoch,
            rows: input_rows,
            written,
            ends: self
                .sources
                .iter()
                .map(|s| plan.sources[&s.spec.name].end.clone())
                .collect(),
            progress,
            line,
            rejected: self
                .sources
                .iter()
                .zip(&mut inputs)
                .filter(|(_, i)| !i.rejected_sample.is_empty())
                .map(|(s, i)| {
                    let sample = std::mem::take(&mut i.rejected_sample);
                    (s.spec.name.clone(), i.rejected, sample)
                })
                .collect(),
        });

        summary.epochs += 1;
        summary.input_rows += input_rows;
        summary.output_rows += output_rows;
        summary.late_rows += late_rows;
        if armed("after-commit", plan.epoch) {
            // The failpoint holds or crashes the run once this commit is durable, before the
            // next epoch is planned, as it names.
            self.settle(Settle::All).await?;
        }
        Ok(())
    }
}

/// How long [`StreamingQuery::settle`] waits for commits being written.
#[derive(Clone, Copy, PartialEq)]
enum Settle {
    /// Not at all: only those already durable.
    Ready,
    /// Until then at most.
    Until(tokio::time::Instant),
    /// For all of them.
    All,
}

/// How many epochs may have commits in flight at once (a crash re-runs them): this many
/// always, and more, up to [`MOST_COMMITTING`], while their input rows together stay within
/// one full epoch (`max_rows_per_epoch`), so that a crash re-runs about one epoch's work at
/// most. Only a stalled disk fills it. In the Kafka benchmark at 20,000 records/s,
/// at-least-once epochs of 3.5 ms (70 rows) ran during syncs of 250 ms and more, and a bound
/// of 64 epochs made the driver wait (16 did at 160 ms).
const MAX_COMMITTING: usize = 64;

/// The most epochs with commits in flight however small they are (each keeps its progress
/// record until it is told of, a kilobyte or two).
const MOST_COMMITTING: usize = 4096;

/// An epoch whose commit was handed to the commit writer.
struct Committing {
    epoch: u64,
    /// Its input rows.
    rows: u64,
    written: lane::Pending,
    /// Each source's offset after the epoch, in the order of the query's sources.
    ends: Vec<serde_json::Value>,
    progress: EpochProgress,
    line: String,
    /// Per source with rejected records: its name, their number and the sample kept.
    rejected: Vec<(String, u64, Vec<DeadLetter>)>,
}

/// Waits for the epoch's plan to be durable, once (the first call takes it), counting the
/// wait as planning.
async fn plan_durable(
    written: &mut Option<lane::Pending>,
    epoch: u64,
    phases: &mut Phases,
) -> Result<()> {
    if let Some(mut pending) = written.take() {
        let t = Instant::now();
        lane::done(&mut pending).await?;
        phases.plan_ms += ms(t);
        failpoint("after-plan", epoch).await;
    }
    Ok(())
}

/// Which of the event times `ts` are on time for `watermark` (a NULL time is: it is in no
/// window, and the operators decide what to do with it), or `None` when all are, as nearly
/// always. This runs on the driver over every input row of every epoch, between reading and
/// the operators, so it must stay off the per-row path: a row-by-row mask cost a 200,000-row
/// epoch about 0.75 ms there, one core's time that the partitions wait for. Arrow's kernels
/// take the minimum, and compare only when a row is late.
fn on_time(ts: &Int64Array, watermark: Watermark) -> arrow::error::Result<Option<BooleanArray>> {
    match min_of(ts) {
        None => return Ok(None),
        Some(earliest) if !watermark.is_late(earliest) => return Ok(None),
        Some(_) => {}
    }
    // `is_late(t)` is `t < watermark`, so on time is `t >= watermark`.
    let threshold = Scalar::new(Int64Array::from(vec![watermark.micros()]));
    let on_time = gt_eq(ts, &threshold)?;
    if ts.null_count() == 0 {
        return Ok(Some(on_time));
    }
    // NULL >= w is NULL; NULL OR true is true.
    Ok(Some(or_kleene(&on_time, &is_null(ts)?)?))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// A stop flag for SIGINT (Ctrl-C) and SIGTERM (what service managers and `kill` send). The
/// first signal lets the epoch in flight finish and commit, then the run stops and says so;
/// a second one exits at once with the shell's code for the signal (130 or 143). Stopping at
/// once is safe for the same reason a crash is: the epoch in flight is not committed, and the
/// next run re-runs it with the offsets it recorded.
pub fn stop_on_signals() -> Arc<AtomicBool> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    // A signal that cannot be listened for keeps its default action (it stops the run at
    // once); one that can is handled here for good, so each is taken on its own.
    async fn next(signal: &mut Option<Signal>) {
        match signal {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let mut terminate = signal(SignalKind::terminate()).ok();
    if interrupt.is_none() || terminate.is_none() {
        eprintln!("riffle: cannot listen for SIGINT or SIGTERM; that signal stops the run at once");
    }
    tokio::spawn(async move {
        loop {
            let code = tokio::select! {
                () = next(&mut interrupt) => 130,
                () = next(&mut terminate) => 143,
            };
            if set.load(Ordering::Relaxed) {
                eprintln!(
                    "riffle: stopping now; the epoch in flight is not committed and the next run \
                     re-runs it"
                );
                // SAFETY: `_exit` ends the process without running exit handlers, which could
                // otherwise tear down C libraries (librdkafka) under threads still using them;
                // an abrupt end is what this second signal asks for, and what the checkpoint
                // protocol makes safe.
                unsafe { libc::_exit(code) };
            }
            eprintln!(
                "riffle: stopping after the epoch in flight commits (signal again to stop now)"
            );
            set.store(true, Ordering::Relaxed);
        }
    });
    flag
}

/// Failpoints for crash tests, at the steps of the epoch protocol:
/// - `after-plan`: the offsets are durable, and nothing of the epoch is written (the driver
///   waits for the plan there when the failpoint is set, even if its sink would let it go on);
/// - `after-state`: state written; the output is written at the same time, so the output is
///   written here too (state files and a Parquet directory's file under temporary names, which
///   the commit writer publishes);
/// - `after-sink`: output written, not committed: the narrowest window of exactly-once, which
///   random kills rarely hit. For a sink that replaces or repeats epochs, the plan may still
///   be in flight here, so a crash tests the replanning of an epoch whose output is out;
/// - `before-commit`: in the commit writer, the epoch's state files and output published
///   (acknowledged), the commit not written: a replay must replace that output;
/// - `after-commit`: the commit is durable. A crash comes from the commit writer, before the
///   progress line; a hold comes after the line and before the next epoch is planned.
///
/// A crash at `after-state` or `after-sink` may find earlier epochs' commits still in flight
/// too; a hold there waits for them first, so that the checkpoint looks as the point says. Two
/// more points are in the checkpoint's writers, before they write the epoch's file: `commit`
/// and `plan`. Held there (`RIFFLE_HANG=commit:<epoch>`, as on a slow disk), a writer falls
/// behind while the driver runs on, so a crash then finds several epochs planned and not
/// committed, or (`plan`, with a sink that carries plans) written to the sink and not even
/// planned in the checkpoint.
///
/// - `RIFFLE_CRASH=<point>:<epoch>` aborts the process there (as abruptly as `kill -9`: no
///   destructors, no flushing).
/// - `RIFFLE_HANG=<point>:<epoch>` holds the run there for good, as a stuck sink or a slow
///   disk would, so a test can signal a process whose epoch cannot finish. With
///   `RIFFLE_HANG_UNTIL=<file>` the hold ends once that file exists: a test can then change the
///   world around a run at a known epoch (stop a broker, say) before letting it go on, instead
///   of racing it.
async fn failpoint(point: &str, epoch: u64) {
    crash_point(point, epoch);
    if hit(&failpoints()[1], point, epoch) {
        eprintln!("RIFFLE_HANG: holding {point} epoch {epoch}");
        let Some(release) = std::env::var_os("RIFFLE_HANG_UNTIL") else {
            return std::future::pending::<()>().await;
        };
        let release = std::path::PathBuf::from(release);
        while !release.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        eprintln!("RIFFLE_HANG: released {point} epoch {epoch}");
    }
}

/// The `RIFFLE_HANG` half of [`failpoint`], for the checkpoint's writer threads: it blocks
/// (sleeps), so it must never run on an async worker, where [`failpoint`] is the one to use.
fn hold_point(point: &str, epoch: u64) {
    debug_assert!(
        tokio::runtime::Handle::try_current().is_err(),
        "hold_point blocks: call it on a writer thread, not inside the async runtime"
    );
    if hit(&failpoints()[1], point, epoch) {
        eprintln!("RIFFLE_HANG: holding {point} epoch {epoch}");
        let Some(release) = std::env::var_os("RIFFLE_HANG_UNTIL") else {
            loop {
                std::thread::park();
            }
        };
        let release = std::path::PathBuf::from(release);
        while !release.exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("RIFFLE_HANG: released {point} epoch {epoch}");
    }
}

/// `RIFFLE_CRASH` and `RIFFLE_HANG`, read once.
fn failpoints() -> &'static [Option<(String, u64)>; 2] {
    static PLANS: std::sync::OnceLock<[Option<(String, u64)>; 2]> = std::sync::OnceLock::new();
    PLANS.get_or_init(|| {
        ["RIFFLE_CRASH", "RIFFLE_HANG"].map(|var| {
            let value = std::env::var(var).ok()?;
            let (at, n) = value.rsplit_once(':')?;
            Some((at.to_string(), n.parse().ok()?))
        })
    })
}

fn hit(plan: &Option<(String, u64)>, point: &str, epoch: u64) -> bool {
    plan.as_ref()
        .is_some_and(|(at, n)| at == point && *n == epoch)
}

/// Whether a failpoint is set at `point` of `epoch`: the driver then waits there for the
/// write the point names, which it otherwise leaves in flight.
fn armed(point: &str, epoch: u64) -> bool {
    failpoints().iter().any(|p| hit(p, point, epoch))
}

/// Whether `RIFFLE_HANG` holds the run at `point` of `epoch`.
fn holds(point: &str, epoch: u64) -> bool {
    hit(&failpoints()[1], point, epoch)
}

/// The `RIFFLE_CRASH` half of [`failpoint`], for the checkpoint's writer threads.
fn crash_point(point: &str, epoch: u64) {
    if hit(&failpoints()[0], point, epoch) {
        eprintln!("RIFFLE_CRASH: aborting {point} epoch {epoch}");
        std::process::abort();
    }
}
