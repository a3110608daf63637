//! What a checkpoint directory says about its query, read without running anything and
//! without taking its lock (`riffle status`).
//!
//! Everything here comes from files the driver already writes for recovery: the metadata (query
//! id and fingerprint, which names every UDF module by hash), the last commit (watermarks and
//! the state manifest), that epoch's offsets, an epoch planned after it (the next run re-runs
//! it), and the last line of the progress file. Whether a process is running the query is read
//! from the kernel's lock table rather than by trying the lock: trying it, even for a moment,
//! would make a query starting at that moment fail with "in use".

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{EpochCommit, EpochPlan, Metadata, UdfServed, last_commit_in, plan_in, read_json};
use crate::error::{Result, RiffleError};
use crate::plan::Fingerprint;

/// The state of a checkpoint directory.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The directory.
    pub checkpoint: PathBuf,
    /// The query's id (it names the query's output: files, Kafka transactions, Delta
    /// application ids).
    pub query_id: String,
    /// The process running the query now, if any.
    pub running_pid: Option<u32>,
    /// The last committed epoch.
    pub last_commit: Option<EpochCommit>,
    /// The last committed epoch's input ranges (its `end` offsets are where the next run
    /// starts).
    pub committed_offsets: Option<EpochPlan>,
    /// Epochs planned after the last commit and not committed, in order: the next run re-runs
    /// them with exactly these offsets. More than one when the query stopped while commits
    /// were being written.
    pub uncommitted: Vec<EpochPlan>,
    /// The query's identity: sources, operators, output mode, UDF modules and their hashes.
    pub fingerprint: Fingerprint,
    /// Which UDF module versions served which epochs, oldest first.
    pub udf_history: Vec<UdfServed>,
    /// The last line of the progress file.
    pub last_progress: Option<serde_json::Value>,
}

/// Reads the state of the checkpoint at `root`, with the last line of the progress file at
/// `progress` (default: `progress.jsonl` in the checkpoint).
///
/// # Errors
/// [`RiffleError::Config`] when `root` is not a checkpoint directory; unreadable or corrupt
/// checkpoint files.
pub fn read(root: &Path, progress: Option<&Path>) -> Result<Status> {
    let meta_path = root.join("metadata.json");
    if !meta_path.is_file() {
        return Err(RiffleError::Config(format!(
            "{}: not a checkpoint directory (no metadata.json); a streaming run's checkpoint is \
             the `checkpoint` of its pipeline's [stream] section",
            root.display()
        )));
    }
    let meta: Metadata = read_json(&meta_path)?;
    let last_commit = last_commit_in(root)?;
    let committed = last_commit.as_ref().map_or(0, |c| c.epoch);
    let committed_offsets = match committed {
        0 => None,
        epoch => plan_in(root, epoch)?,
    };
    let mut uncommitted = Vec::new();
    while let Some(plan) = plan_in(root, committed + 1 + uncommitted.len() as u64)? {
        uncommitted.push(plan);
    }
    Ok(Status {
        checkpoint: root.to_path_buf(),
        query_id: meta.id,
        running_pid: lock_holder(&root.join("lock")),
        last_commit,
        committed_offsets,
        uncommitted,
        fingerprint: meta.fingerprint,
        udf_history: meta.udf_history,
        last_progress: crate::common::fs::last_json_line(
            &progress.map_or_else(|| root.join("progress.jsonl"), Path::to_path_buf),
        ),
    })
}

/// The process holding the `flock` on `lock`, from `/proc/locks` (Linux): a line such as
/// `3: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF` names the holder's pid and the file's
/// device and inode. Only the inode is compared (device numbers there and in `stat` differ on
/// some file systems), so the holder must also be the process the lock file names.
fn lock_holder(lock: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(lock).ok()?.ino();
    let named: u32 = std::fs::read_to_string(lock).ok()?.trim().parse().ok()?;
    let table = std::fs::read_to_string("/proc/locks").ok()?;
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "->" marks a waiter, not a holder, and shifts the fields by one.
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let file_inode = fields.get(5)?.rsplit(':').next()?.parse::<u64>().ok()?;
        let pid: u32 = fields.get(4)?.parse().ok()?;
        (file_inode == inode && pid == named).then_some(pid)
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "checkpoint   {}", self.checkpoint.display())?;
        let running = match self.running_pid {
            Some(pid) => format!("running (process {pid})"),
            None => "not running".to_string(),
        };
        writeln!(f, "query        {} ({running})", self.query_id)?;
        writeln!(f, "output mode  {}", self.fingerprint.output_mode)?;
        match &self.last_commit {
            None => writeln!(f, "epoch        none committed yet")?,
            Some(c) => writeln!(
                f,
                "epoch        {} committed{}",
                c.epoch,
                if c.last {
                    " (the input had ended: the query finished)"
                } else {
                    ""
                }
            )?,
        }
        match self.uncommitted.as_slice() {
            [] => {}
            [plan] => writeln!(
                f,
                "             epoch {} was planned and not committed: the next run re-runs it \
                 with the same offsets",
                plan.epoch
            )?,
            [first, .., last] => writeln!(
                f,
                "             epochs {} to {} were planned and not committed: the next run \
                 re-runs them with the same offsets",
                first.epoch, last.epoch
            )?,
        }
        for source in &self.fingerprint.sources {
            let offset = self
                .committed_offsets
                .as_ref()
                .and_then(|p| p.sources.get(&source.name))
                .map_or_else(|| "start".to_string(), |r| r.end.to_string());
            let progress = self
                .last_commit
                .as_ref()
                .and_then(|c| c.sources.get(&source.name));
            let watermark =
                progress.map_or_else(|| "none".to_string(), |p| p.watermark.to_string());
            writeln!(
                f,
                "source       {} ({}): offset {offset}, watermark {watermark}",
                source.name, source.kind
            )?;
        }
        if let Some(commit) = &self.last_commit {
            for (operator, tables) in &commit.state {
                for (table, files) in tables {
                    let snapshot = match files.snapshot {
                        Some(epoch) => {
                            format!("snapshot of epoch {epoch} ({} bytes)", files.snapshot_bytes)
                        }
                        None => "no snapshot".to_string(),
                    };
                    writeln!(
                        f,
                        "state        {operator}/{table}: {snapshot} + {} delta{} ({} bytes)",
                        files.deltas.len(),
                        if files.deltas.len() == 1 { "" } else { "s" },
                        files.delta_bytes,
                    )?;
                }
            }
        }
        for udf in &self.fingerprint.udfs {
            writeln!(
                f,
                "udf module   {} sha256 {} (configuration sha256 {})",
                udf.module, udf.sha256, udf.config_sha256
            )?;
        }
        if self.udf_history.iter().any(|served| served.from_epoch > 1) {
            // Some module was upgraded on purpose: say which version served which epochs.
            for served in &self.udf_history {
                writeln!(
                    f,
                    "udf served   {} sha256 {} (configuration sha256 {}) from epoch {}",
                    served.module,
                    &served.sha256[..served.sha256.len().min(12)],
                    &served.config_sha256[..served.config_sha256.len().min(12)],
                    served.from_epoch
                )?;
            }
        }
        if let Some(p) = &self.last_progress {
            let field = |name: &str| p.get(name).cloned().unwrap_or(serde_json::Value::Null);
            writeln!(
                f,
                "last epoch   {} at {}: {} rows in, {} out, {} late, watermark {}, state {} rows, {} ms",
                field("epoch"),
                field("timestamp").as_str().unwrap_or("?"),
                field("input_rows"),
                field("output_rows"),
                field("late_rows"),
                field("watermark").as_str().unwrap_or("none"),
                p.pointer("/state/rows").cloned().unwrap_or_default(),
                p.pointer("/durations/total_ms")
                    .and_then(serde_json::Value::as_f64)
                    .map_or_else(|| "?".to_string(), |ms| format!("{ms:.1}")),
            )?;
        }
        Ok(())
    }
}
