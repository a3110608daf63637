//! Per-epoch progress, like Spark's `StreamingQueryProgress`: a JSON line per epoch in a file,
//! and a compact live line on the terminal.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::checkpoint::{EpochCommit, EpochPlan};
use crate::common::Watermark;
use crate::error::{Result, RiffleError};
use crate::exec::OperatorMetrics;
use crate::exec::graph::Graph;
use crate::state::StateSize;
use crate::udf::UdfModule;

/// Milliseconds spent in each phase of an epoch.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phases {
    /// Asking the sources how far they can go, and waiting for the epoch's plan to be durable
    /// in the checkpoint where the epoch needs it (its writer syncs it while the epoch reads
    /// and computes); 0 for an epoch replayed after a restart, whose plan was written.
    pub plan_ms: f64,
    /// Reading the sources.
    pub read_ms: f64,
    /// The operator graph (stateless stages and stateful operators).
    pub operators_ms: f64,
    /// Encoding state changes, and waiting for their files after the sink is written (the
    /// files are written while the sink writes).
    pub state_ms: f64,
    /// Writing the sink.
    pub sink_ms: f64,
    /// Handing the commit over: the checkpoint's commit writer syncs it while the next
    /// epochs run, and an epoch waits here only for earlier commits (when too many are in
    /// flight) and to tell the sources of those done.
    pub commit_ms: f64,
    /// The whole epoch, its plan included.
    pub total_ms: f64,
}

/// One UDF's activity during an epoch.
#[derive(Clone, Debug, Serialize)]
pub struct UdfProgress {
    /// Function name.
    pub name: String,
    /// Module content hash (sha256, first 12 hex digits).
    pub module: String,
    /// Calls (one per batch).
    pub calls: u64,
    /// Rows passed.
    pub rows: u64,
    /// Time inside the UDF, milliseconds.
    pub time_ms: f64,
    /// Row errors plus failures.
    pub errors: u64,
}

/// One source's share of an epoch.
#[derive(Clone, Debug, Serialize)]
pub struct SourceEpoch {
    /// Source (table) name.
    pub name: String,
    /// Offset before the epoch.
    pub start_offset: serde_json::Value,
    /// Offset after the epoch.
    pub end_offset: serde_json::Value,
    /// Rows read.
    pub input_rows: u64,
    /// Rows behind the source's watermark, dropped.
    pub late_rows: u64,
    /// Records gone from the source before they were read, skipped because the source was
    /// told not to fail on data loss (the epoch's `warnings` say which).
    #[serde(skip_serializing_if = "is_zero")]
    pub lost_records: u64,
    /// Records the source could not decode, sent to its dead-letter topic.
    #[serde(skip_serializing_if = "is_zero")]
    pub dead_letters: u64,
    /// Records beyond the epoch's end offset, per partition, for sources that know (Kafka's
    /// consumer lag, from the high watermarks of the epoch's fetches).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub lag: BTreeMap<String, i64>,
    /// The source's watermark after the epoch (RFC 3339), if any.
    pub watermark: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One epoch's progress record.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EpochProgress {
    /// The query's id (stable across restarts: it is the checkpoint's).
    pub query_id: String,
    /// This run's id, new at every start of the query (a new process, or a restart from the
    /// checkpoint after a transient failure), so that lines from before and after a restart
    /// can be told apart.
    pub run_id: String,
    /// Epoch number.
    pub epoch: u64,
    /// Wall-clock time the epoch's work finished, just before its commit (RFC 3339).
    pub timestamp: String,
    /// Per source: offsets, rows, late rows, watermark.
    pub sources: Vec<SourceEpoch>,
    /// Input rows (all sources).
    pub input_rows: u64,
    /// Input rows per second of wall time since the previous epoch.
    pub input_rows_per_second: f64,
    /// Input rows per second of processing time.
    pub processed_rows_per_second: f64,
    /// Output rows.
    pub output_rows: u64,
    /// Rows dropped as late (at the sources and inside operators).
    pub late_rows: u64,
    /// The query's watermark after the epoch (the least of the sources'), RFC 3339.
    pub watermark: Option<String>,
    /// Phase durations.
    pub durations: Phases,
    /// Per operator: rows in and out, time, watermark, state.
    pub operators: Vec<OperatorMetrics>,
    /// State of all operators together.
    pub state: StateSize,
    /// Bytes of state written to the checkpoint this epoch.
    pub state_bytes_written: u64,
    /// Latency from a row's arrival to its commit, fastest and slowest row, milliseconds
    /// (for sources that know arrival times).
    pub latency_ms: Option<(f64, f64)>,
    /// UDF activity.
    pub udfs: Vec<UdfProgress>,
    /// Problems the query went on past (a static table that failed to reload), each reported
    /// in the epoch it was found.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Rows per second of `ms` milliseconds.
pub(crate) fn rate(rows: u64, ms: f64) -> f64 {
    rows as f64 / (ms / 1000.0).max(1e-9)
}

impl EpochProgress {
    /// Adds the commit's time, once the epoch has committed (the record stored in the commit
    /// is taken before it).
    pub(crate) fn add_commit_time(&mut self, commit_ms: f64, total_ms: f64) {
        self.durations.commit_ms = commit_ms;
        self.durations.total_ms = total_ms;
        self.processed_rows_per_second = rate(self.input_rows, total_ms);
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        plan: &EpochPlan,
        watermark: Watermark,
        sources: Vec<SourceEpoch>,
        output_rows: u64,
        late_rows: u64,
        durations: Phases,
        graph: &Graph,
        state_bytes_written: u64,
        latency_ms: Option<(f64, f64)>,
        modules: &[Arc<UdfModule>],
    ) -> Self {
        let mut udfs = Vec::new();
        for module in modules {
            for (i, name) in module.counted() {
                let s = module.stats(i);
                udfs.push(UdfProgress {
                    name: name.to_string(),
                    module: module.hash().chars().take(12).collect(),
                    calls: s.calls,
                    rows: s.rows,
                    time_ms: s.nanos as f64 / 1e6,
                    errors: s.row_errors + s.failures,
                });
            }
        }
        let now_micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let operators: Vec<OperatorMetrics> =
            graph.nodes().iter().map(|n| n.metrics.clone()).collect();
        let input_rows = sources.iter().map(|s| s.input_rows).sum::<u64>();
        EpochProgress {
            query_id: String::new(),
            run_id: String::new(),
            epoch: plan.epoch,
            timestamp: Watermark(now_micros).rfc3339().unwrap_or_default(),
            sources,
            input_rows,
            input_rows_per_second: 0.0,
            processed_rows_per_second: rate(input_rows, durations.total_ms),
            output_rows,
            late_rows,
            watermark: watermark.rfc3339(),
            durations,
            state: operators
                .iter()
                .map(|o| o.state)
                .fold(StateSize::default(), |a, b| a + b),
            operators,
            state_bytes_written,
            latency_ms,
            udfs,
            warnings: Vec::new(),
        }
    }
}

/// Writes progress records and the live line.
///
/// A committed epoch never loses its line: the driver [`prepare`](Self::prepare)s the record
/// before the commit and stores it in the commit file; the checkpoint's commit writer appends
/// the line ([`ProgressLog::append`], synced to disk) right after the commit, before the next
/// one; and on restart [`recover`](Self::recover) writes the line of the last commit if a
/// crash came between the two.
pub struct ProgressWriter {
    log: Arc<Mutex<ProgressLog>>,
    query_id: String,
    run_id: String,
    live: bool,
    terminal: bool,
    last_epoch_end: Instant,
    last_line: Option<Instant>,
    previous_udfs: Vec<UdfProgress>,
}

/// The progress file, appended to by whoever writes the commits.
pub(crate) struct ProgressLog {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl ProgressLog {
    /// Appends one line, synced, so that it outlives a power loss before the next commit.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn append(&mut self, line: &str) -> Result<()> {
        let fail = |e| RiffleError::io("writing", &self.path, e);
        writeln!(self.file, "{line}").map_err(fail)?;
        self.file.flush().map_err(fail)?;
        self.file.get_ref().sync_data().map_err(fail)
    }
}

impl ProgressWriter {
    /// Appends to `path` the progress of the query `query_id`.
    ///
    /// # Errors
    /// I/O errors opening the file.
    pub fn new(path: &Path, query_id: &str, live: bool) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| RiffleError::io("creating", dir, e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(|e| RiffleError::io("opening", path, e))?;
        // A line cut short by a power loss must not swallow the next one: end it first.
        if !ends_with_newline(&mut file).map_err(|e| RiffleError::io("reading", path, e))? {
            writeln!(file).map_err(|e| RiffleError::io("writing", path, e))?;
        }
        Ok(ProgressWriter {
            log: Arc::new(Mutex::new(ProgressLog {
                path: path.to_path_buf(),
                file: std::io::BufWriter::new(file),
            })),
            query_id: query_id.to_string(),
            run_id: format!("{:016x}", rand::random::<u64>()),
            live,
            terminal: std::io::stderr().is_terminal(),
            last_epoch_end: Instant::now(),
            last_line: None,
            previous_udfs: Vec::new(),
        })
    }

    /// The file, for the commit writer.
    pub(crate) fn log(&self) -> Arc<Mutex<ProgressLog>> {
        self.log.clone()
    }

    /// Starts the clock the first epoch's input rate counts from (the run's start-up, which
    /// may include a sink's transactions and a state restore, is not arrival time).
    pub(crate) fn start_clock(&mut self) {
        self.last_epoch_end = Instant::now();
    }

    /// This run's id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Completes a record before its epoch commits: the ids, the input rate since the
    /// previous epoch and this epoch's share of the (cumulative) UDF counters.
    pub(crate) fn prepare(&mut self, p: &mut EpochProgress) {
        p.query_id.clone_from(&self.query_id);
        p.run_id.clone_from(&self.run_id);
        let now = Instant::now();
        // Rows per second since the previous epoch ended, or since the run's clock started
        // (see `start_clock`).
        p.input_rows_per_second = p.input_rows as f64
            / now
                .duration_since(self.last_epoch_end)
                .as_secs_f64()
                .max(1e-9);
        self.last_epoch_end = now;
        let cumulative = p.udfs.clone();
        for i in 0..p.udfs.len() {
            // The same module may be loaded twice (another configuration): the n-th function
            // of a name and hash continues the n-th one of the previous epoch.
            let u = &p.udfs[i];
            let same = |q: &&UdfProgress| q.name == u.name && q.module == u.module;
            let nth = p.udfs[..i].iter().filter(same).count();
            let previous = self.previous_udfs.iter().filter(same).nth(nth);
            let u = &mut p.udfs[i];
            if let Some(prev) = previous {
                u.calls -= prev.calls.min(u.calls);
                u.rows -= prev.rows.min(u.rows);
                u.time_ms -= prev.time_ms.min(u.time_ms);
                u.errors -= prev.errors.min(u.errors);
            }
        }
        p.udfs.retain(|u| u.calls > 0 || u.errors > 0);
        self.previous_udfs = cumulative;
    }

    /// Shows the committed epoch `p` on the live line, at most ten times a second on a
    /// terminal and once a second otherwise.
    pub(crate) fn show(&mut self, p: &EpochProgress) {
        if !self.live {
            return;
        }
        let now = Instant::now();
        let throttle = if self.terminal { 0.1 } else { 1.0 };
        if self
            .last_line
            .is_some_and(|t| now.duration_since(t).as_secs_f64() < throttle)
        {
            return;
        }
        self.last_line = Some(now);
        let text = format!(
            "epoch {} | in {} rows ({:.0} rows/s) | out {} | late {} | watermark {} | state {} rows | {:.1} ms",
            p.epoch,
            p.input_rows,
            p.processed_rows_per_second,
            p.output_rows,
            p.late_rows,
            p.watermark.as_deref().unwrap_or("-"),
            p.state.rows,
            p.durations.total_ms,
        );
        if self.terminal {
            eprint!("\r\x1b[2K{text}");
        } else {
            eprintln!("{text}");
        }
    }

    /// Writes the line of the last committed epoch from its commit, marked `"recovered":
    /// true`, when a crash between the commit and the line lost it.
    ///
    /// # Errors
    /// I/O errors.
    pub(crate) fn recover(&mut self, commit: &EpochCommit) -> Result<()> {
        let Some(record) = &commit.progress else {
            return Ok(());
        };
        let mut log = self.log.lock().expect("progress log lock");
        let last_epoch = crate::common::fs::last_json_line(&log.path)
            .and_then(|r| r.get("epoch").and_then(serde_json::Value::as_u64));
        if last_epoch.is_some_and(|e| e >= commit.epoch) {
            return Ok(());
        }
        let mut record = record.clone();
        record["recovered"] = true.into();
        log.append(&record.to_string())
    }

    pub(crate) fn finish(&mut self) {
        if self.live && self.terminal {
            eprintln!();
        }
    }
}

/// Whether a file is empty or ends with a newline.
fn ends_with_newline(file: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udf(name: &str, calls: u64, rows: u64) -> UdfProgress {
        UdfProgress {
            name: name.into(),
            module: "abc".into(),
            calls,
            rows,
            time_ms: 0.0,
            errors: 0,
        }
    }

    #[test]
    fn each_copy_of_a_module_loaded_twice_counts_its_own_epoch_share() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = ProgressWriter::new(&dir.path().join("p.jsonl"), "q", false).unwrap();
        let mut first = EpochProgress {
            input_rows: 500,
            udfs: vec![udf("f", 10, 100), udf("f", 5, 50)],
            ..EpochProgress::default()
        };
        // Start-up time between the writer and the clock (so that a clock left at the writer's
        // creation would give a lower rate than the bound below).
        std::thread::sleep(std::time::Duration::from_millis(20));
        let before = Instant::now();
        writer.start_clock();
        writer.prepare(&mut first);
        // The run's first epoch has a rate since the clock started: not zero, and not diluted
        // by the start-up before it.
        let lowest = 500.0 / before.elapsed().as_secs_f64();
        assert!(
            first.input_rows_per_second >= lowest,
            "{}",
            first.input_rows_per_second
        );
        let mut second = EpochProgress {
            udfs: vec![udf("f", 12, 120), udf("f", 9, 90)],
            ..EpochProgress::default()
        };
        writer.prepare(&mut second);
        let share: Vec<(u64, u64)> = second.udfs.iter().map(|u| (u.calls, u.rows)).collect();
        assert_eq!(share, [(2, 20), (4, 40)]);
    }
}
