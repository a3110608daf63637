//! The streaming query driver: triggers, epochs, watermarks, recovery and progress.
//!
//! Per epoch (a micro-batch) the driver
//! 1. asks the source what is available and **writes the epoch's offsets ahead** to the
//!    checkpoint;
//! 2. reads exactly those rows; splits off rows behind the watermark (late) when the query is
//!    stateful, counting them and sending them to the late sink if there is one;
//! 3. runs the stateless stage, feeds the stateful operator, advances the watermark
//!    (max event time seen − delay; the end of time when a bounded source is done) and
//!    collects output for the output mode;
//! 4. persists the operator's state changes, writes the output to the sink under the epoch
//!    number (replacing any earlier attempt), and **commits** the epoch.
//!
//! A crash anywhere leaves either a committed epoch or a planned one that is re-run with the
//! same offsets on restart, on the state of the last commit: no lost and no duplicated rows.

pub mod progress;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{AsArray, BooleanArray};
use arrow::compute::{filter_record_batch, max as max_of};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use datafusion::execution::SessionState;
use datafusion::logical_expr::LogicalPlan;

use crate::checkpoint::{Checkpoint, EpochCommit, EpochPlan};
use crate::connectors::sink::Sink;
use crate::connectors::source::StreamSource;
use crate::connectors::static_table::StaticTable;
use crate::error::{Result, RiffleError};
use crate::exec::aggregate::to_micros;
use crate::exec::stage::{Slot, Stage};
use crate::exec::{Dedup, OutputMode, PostStage, SessionAggregate, Watermarked, WindowAggregate};
use crate::plan::StatefulNode;
use crate::plan::stream::compile;
use crate::plan::window::{WindowKind, window_call};
use crate::session::RiffleSession;
use progress::{EpochProgress, Phases, ProgressWriter};

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
    /// The source's event-time column, if it has a watermark.
    pub event_time: Option<String>,
    /// Watermark delay, microseconds.
    pub watermark_delay: i64,
    /// Output mode.
    pub output_mode: OutputMode,
    /// Trigger.
    pub trigger: Trigger,
    /// Most rows per epoch.
    pub max_rows_per_epoch: usize,
    /// Checkpoint directory.
    pub checkpoint: PathBuf,
    /// JSON-lines progress file (default: `progress.jsonl` in the checkpoint directory).
    pub progress_file: Option<PathBuf>,
    /// Show a live progress line on stderr.
    pub live: bool,
    /// Stop after this many epochs in this run (tests, and `riffle run --max-epochs`).
    pub max_epochs: Option<u64>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            event_time: None,
            watermark_delay: 0,
            output_mode: OutputMode::Append,
            trigger: Trigger::AvailableNow,
            max_rows_per_epoch: 100_000,
            checkpoint: PathBuf::from("checkpoint"),
            progress_file: None,
            live: false,
            max_epochs: None,
        }
    }
}

/// A streaming source registered as a table, ready to plan queries against.
pub struct StreamInput {
    name: String,
    slot: Slot,
    source: Box<dyn StreamSource>,
}

impl StreamInput {
    /// Registers `source` as table `name` in the session.
    ///
    /// # Errors
    /// A table with that name already exists.
    pub fn register(
        session: &RiffleSession,
        name: &str,
        source: Box<dyn StreamSource>,
    ) -> Result<Self> {
        let slot = Slot::new(source.schema());
        session
            .context()
            .register_table(name, Arc::new(slot.table()?))?;
        Ok(StreamInput {
            name: name.to_string(),
            slot,
            source,
        })
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
    /// The source ended and every window was closed.
    pub finished: bool,
}

/// A running streaming query.
pub struct StreamingQuery {
    state: SessionState,
    session_modules: Vec<Arc<crate::udf::UdfModule>>,
    source: Box<dyn StreamSource>,
    source_schema: SchemaRef,
    stage: Stage,
    operator: Option<Box<dyn Watermarked>>,
    post: Option<PostStage>,
    output_schema: SchemaRef,
    sink: Box<dyn Sink>,
    late_sink: Option<Box<dyn Sink>>,
    static_tables: Vec<Arc<StaticTable>>,
    checkpoint: Checkpoint,
    options: StreamOptions,
    progress: ProgressWriter,
    event_time_index: Option<usize>,
}

impl StreamingQuery {
    /// Compiles `plan` (from SQL or a DataFrame over the session, reading `input`) into a
    /// streaming query writing to `sink`.
    ///
    /// # Errors
    /// [`RiffleError::Config`] for queries or output modes that cannot stream, a checkpoint
    /// directory of another query, or a missing event-time column.
    pub async fn new(
        session: &RiffleSession,
        input: StreamInput,
        plan: LogicalPlan,
        sink: Box<dyn Sink>,
        options: StreamOptions,
    ) -> Result<Self> {
        // One partition: a micro-batch is small, the plan is executed once per epoch, and
        // DataFusion's repartition operators cannot be executed more than once.
        let mut config = session.context().copied_config();
        config.options_mut().execution.target_partitions = 1;
        let state = datafusion::execution::SessionStateBuilder::new_from_existing(
            session.context().state(),
        )
        .with_config(config)
        .build();
        let plan = state
            .analyzer()
            .execute_and_check(plan, state.config_options(), |_, _| {})?;
        let source_schema = input.source.schema();
        let event_time_index = match &options.event_time {
            Some(col) => Some(source_schema.index_of(col).map_err(|_| {
                RiffleError::Config(format!(
                    "event_time column `{col}` is not in source `{}` (columns: {})",
                    input.name,
                    source_schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?),
            None => None,
        };
        if let Some(i) = event_time_index
            && !matches!(
                source_schema.field(i).data_type(),
                DataType::Timestamp(..) | DataType::Date32 | DataType::Date64
            )
        {
            return Err(RiffleError::Config(format!(
                "event_time column `{}` must be a timestamp, not {}",
                source_schema.field(i).name(),
                source_schema.field(i).data_type()
            )));
        }
        let compiled = compile(
            &plan,
            &input.name,
            options.event_time.as_deref(),
            options.output_mode,
        )?;
        let stage = Stage::new(compiled.stateless.clone(), input.slot, &state).await?;
        let operator: Option<Box<dyn Watermarked>> = match &compiled.stateful {
            None => None,
            Some(StatefulNode::Aggregate(agg)) => {
                let session_window = agg.group_expr.iter().any(|e| {
                    matches!(window_call(e), Ok(Some(c)) if matches!(c.kind, WindowKind::Session(_)))
                });
                if session_window {
                    Some(Box::new(SessionAggregate::new(agg, &state)?))
                } else {
                    Some(Box::new(WindowAggregate::new(
                        agg,
                        &state,
                        options.output_mode,
                    )?))
                }
            }
            Some(StatefulNode::Distinct(d)) => Some(Box::new(Dedup::new(
                d,
                &state,
                options.event_time.as_deref(),
            )?)),
        };
        let post = match &operator {
            Some(_) => Some(PostStage::new(&compiled.post, &state)?),
            None => None,
        };
        let output_schema = Arc::new(plan.schema().as_arrow().clone());
        let checkpoint = Checkpoint::open(&options.checkpoint, &plan.display_indent().to_string())?;
        let progress_path = options
            .progress_file
            .clone()
            .unwrap_or_else(|| options.checkpoint.join("progress.jsonl"));
        Ok(StreamingQuery {
            progress: ProgressWriter::new(&progress_path, options.live)?,
            state,
            session_modules: session.modules(),
            source: input.source,
            source_schema,
            stage,
            operator,
            post,
            output_schema,
            sink,
            late_sink: None,
            static_tables: Vec::new(),
            checkpoint,
            options,
            event_time_index,
        })
    }

    /// Sends late rows (source rows behind the watermark) to `sink`.
    pub fn with_late_sink(mut self, sink: Box<dyn Sink>) -> Self {
        self.late_sink = Some(sink);
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

    /// Runs until the trigger says stop, the source ends, or `stop` is set (checked between
    /// epochs). Resumes from the checkpoint if there is one.
    ///
    /// # Errors
    /// Any epoch's failure; nothing of a failed epoch is committed, so a restart retries it.
    pub async fn run(&mut self, stop: &AtomicBool) -> Result<RunSummary> {
        let mut summary = RunSummary::default();
        let id = self.checkpoint.query_id().to_string();
        self.sink.start(&id).await?;
        if let Some(late) = &mut self.late_sink {
            late.start(&format!("{id}-late")).await?;
        }
        let (mut epoch, mut offset, mut watermark, mut max_event_time) =
            match self.checkpoint.last_commit()? {
                Some(commit) => {
                    if let Some(op) = &mut self.operator {
                        for batch in self.checkpoint.read_state(commit.epoch)? {
                            op.restore(&batch)?;
                        }
                    }
                    let plan = self.checkpoint.planned(commit.epoch)?.ok_or_else(|| {
                        RiffleError::Config(format!(
                            "checkpoint {}: epoch {} is committed but its offsets are missing",
                            self.checkpoint.root().display(),
                            commit.epoch
                        ))
                    })?;
                    if commit.last {
                        summary.finished = true;
                        return Ok(summary);
                    }
                    (
                        commit.epoch,
                        plan.end,
                        commit.watermark,
                        commit.max_event_time,
                    )
                }
                None => (0, self.source.initial()?, i64::MIN, i64::MIN),
            };
        // An epoch planned but not committed before a crash runs again, with its offsets.
        if let Some(plan) = self.checkpoint.planned(epoch + 1)? {
            let done = self
                .run_epoch(&plan, &mut max_event_time, &mut summary)
                .await?;
            epoch = plan.epoch;
            offset = plan.end;
            watermark = done;
            if plan.last {
                summary.finished = true;
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
            let end = self
                .source
                .available(&offset, self.options.max_rows_per_epoch)?;
            let last = self.source.finished(&end);
            if end == offset && !last {
                match self.options.trigger {
                    Trigger::AvailableNow => break,
                    Trigger::LowLatency => std::thread::sleep(Duration::from_micros(200)),
                    Trigger::ProcessingTime(interval) => tokio::time::sleep(interval).await,
                }
                continue;
            }
            let plan = EpochPlan {
                epoch: epoch + 1,
                start: offset.clone(),
                end: end.clone(),
                watermark,
                last,
            };
            self.checkpoint.write_plan(&plan)?;
            watermark = self
                .run_epoch(&plan, &mut max_event_time, &mut summary)
                .await?;
            epoch = plan.epoch;
            offset = end;
            if last {
                summary.finished = true;
                break;
            }
            if let Trigger::ProcessingTime(interval) = self.options.trigger
                && let Some(wait) = interval.checked_sub(tick.elapsed())
            {
                tokio::time::sleep(wait).await;
            }
        }
        self.progress.finish();
        Ok(summary)
    }

    async fn run_epoch(
        &mut self,
        plan: &EpochPlan,
        max_event_time: &mut i64,
        summary: &mut RunSummary,
    ) -> Result<i64> {
        let started = Instant::now();
        let mut phases = Phases::default();
        for table in &self.static_tables {
            if table.reload_if_changed()? {
                self.stage.replan(&self.state).await?;
            }
        }

        let t = Instant::now();
        let input = self.source.read(&plan.start, &plan.end)?;
        phases.read_ms = ms(t);
        let input_rows: u64 = input.batches.iter().map(|b| b.num_rows() as u64).sum();

        // Event time: the batch's max advances the watermark; rows behind the epoch's
        // watermark are late for stateful queries.
        let mut kept = Vec::with_capacity(input.batches.len());
        let mut late = Vec::new();
        let mut late_rows = 0;
        for batch in input.batches {
            let Some(index) = self.event_time_index else {
                kept.push(batch);
                continue;
            };
            let ts = to_micros(batch.column(index))?;
            let ts = ts.as_primitive::<Int64Type>();
            if let Some(m) = max_of(ts) {
                *max_event_time = (*max_event_time).max(m);
            }
            if self.operator.is_none() || plan.watermark == i64::MIN {
                kept.push(batch);
                continue;
            }
            let on_time: BooleanArray = ts
                .iter()
                .map(|t| Some(t.is_none_or(|t| t >= plan.watermark)))
                .collect();
            let n_late = on_time.false_count();
            if n_late == 0 {
                kept.push(batch);
                continue;
            }
            late_rows += n_late as u64;
            late.push(filter_record_batch(
                &batch,
                &arrow::compute::not(&on_time)?,
            )?);
            kept.push(filter_record_batch(&batch, &on_time)?);
        }

        let t = Instant::now();
        let staged = self.stage.run(kept, &self.state).await?;
        phases.stateless_ms = ms(t);

        let watermark = if plan.last {
            i64::MAX
        } else if self.event_time_index.is_some() && *max_event_time != i64::MIN {
            plan.watermark
                .max(max_event_time.saturating_sub(self.options.watermark_delay))
        } else {
            plan.watermark
        };
        let t = Instant::now();
        let output = match (&mut self.operator, &self.post) {
            (Some(op), Some(post)) => {
                for batch in &staged {
                    op.process(batch)?;
                }
                post.apply(op.advance(watermark)?)?
            }
            _ => staged,
        };
        phases.stateful_ms = ms(t);

        let t = Instant::now();
        let mut state_bytes_written = 0;
        if let Some(op) = &mut self.operator {
            let due = self.checkpoint.snapshot_due(plan.epoch);
            if let Some(batch) = op.checkpoint(due)? {
                let snapshot = due || op.checkpoint_is_snapshot();
                state_bytes_written = self.checkpoint.write_state(plan.epoch, snapshot, &batch)?;
            }
        }
        phases.state_ms = ms(t);

        let t = Instant::now();
        let output_rows: u64 = output.iter().map(|b| b.num_rows() as u64).sum();
        self.sink
            .write_epoch(plan.epoch, &self.output_schema, &output)
            .await?;
        if let Some(late_sink) = &mut self.late_sink {
            late_sink
                .write_epoch(plan.epoch, &self.source_schema, &late)
                .await?;
        }
        phases.sink_ms = ms(t);
        crash_point("after-sink", plan.epoch);

        let t = Instant::now();
        self.checkpoint.commit(&EpochCommit {
            epoch: plan.epoch,
            watermark,
            max_event_time: *max_event_time,
            last: plan.last,
        })?;
        self.source.committed(&plan.end);
        phases.commit_ms = ms(t);
        phases.total_ms = ms(started);

        summary.epochs += 1;
        summary.input_rows += input_rows;
        summary.output_rows += output_rows;
        summary.late_rows += late_rows;
        let latency_ms = input.arrival.map(|(first, last)| {
            let now = Instant::now();
            (
                now.saturating_duration_since(last).as_secs_f64() * 1000.0,
                now.saturating_duration_since(first).as_secs_f64() * 1000.0,
            )
        });
        self.progress.record(EpochProgress::new(
            plan,
            watermark,
            input_rows,
            output_rows,
            late_rows,
            phases,
            self.operator.as_ref().map(|o| o.state_rows()),
            state_bytes_written,
            latency_ms,
            &self.session_modules,
        ))?;
        Ok(watermark)
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// A stop flag set by Ctrl-C (the epoch in flight finishes and commits first).
pub fn ctrl_c_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            set.store(true, Ordering::Relaxed);
        }
    });
    flag
}

/// Fault injection for crash tests: `RIFFLE_CRASH=after-sink:N` aborts the process (as abruptly
/// as `kill -9`: no destructors, no flushing) right after epoch N's sink write and before its
/// commit — the narrowest window of the exactly-once protocol, which random kills rarely hit.
fn crash_point(point: &str, epoch: u64) {
    static PLAN: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    let plan = PLAN.get_or_init(|| {
        let value = std::env::var("RIFFLE_CRASH").ok()?;
        let (at, n) = value.rsplit_once(':')?;
        Some((at.to_string(), n.parse().ok()?))
    });
    if let Some((at, n)) = plan
        && at == point
        && *n == epoch
    {
        eprintln!("RIFFLE_CRASH: aborting {point} epoch {epoch}");
        std::process::abort();
    }
}
