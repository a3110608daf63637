//! The checkpoint directory: write-ahead offsets, commits and operator state.
//!
//! ```text
//! checkpoint/
//!   metadata.json              the query it belongs to (refuses a different query)
//!   offsets/0000000007.json    epoch 7's input range and watermark, written before processing
//!   commits/0000000007.json    epoch 7 done: state and sink output are durable
//!   state/0000000007.delta.arrow     state changes of epoch 7 (Arrow IPC)
//!   state/0000000010.snapshot.arrow  the whole state after epoch 10
//! ```
//!
//! Recovery restores the state of the last committed epoch (latest snapshot at or before it,
//! then the deltas after the snapshot) and re-runs an epoch that was planned but not committed
//! with exactly its recorded offsets, so it produces the same rows, which the sinks overwrite.
//! Files are written to a temporary name, synced and renamed, so a crash (or a power loss)
//! never leaves half a file.

use std::fs;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RiffleError};

/// Epoch plan, written ahead of processing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochPlan {
    /// Epoch number, from 1.
    pub epoch: u64,
    /// Source offset before the epoch.
    pub start: serde_json::Value,
    /// Source offset after the epoch.
    pub end: serde_json::Value,
    /// Watermark rows are judged late against (microseconds).
    pub watermark: i64,
    /// The source ended: close every window after this epoch.
    pub last: bool,
}

/// Epoch commit record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochCommit {
    /// Epoch number.
    pub epoch: u64,
    /// Watermark after the epoch.
    pub watermark: i64,
    /// Largest event time seen so far.
    pub max_event_time: i64,
    /// Whether this was the source's last epoch.
    pub last: bool,
}

/// A checkpoint directory.
pub struct Checkpoint {
    root: PathBuf,
    snapshot_every: u64,
    id: String,
}

const EPOCH_DIGITS: usize = 10;

fn name(epoch: u64, suffix: &str) -> String {
    format!("{epoch:0EPOCH_DIGITS$}{suffix}")
}

fn epoch_of(file: &Path) -> Option<u64> {
    file.file_name()?
        .to_str()?
        .get(..EPOCH_DIGITS)?
        .parse()
        .ok()
}

/// Writes `bytes` to `path` atomically and durably (temporary file, fsync, rename, fsync of
/// the directory).
///
/// # Errors
/// I/O errors, naming the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(|e| RiffleError::io("writing", &tmp, e))?;
    publish(&tmp, path)
}

/// Makes a finished temporary file `tmp` durable and renames it to `path`.
///
/// The rename alone is atomic, which is enough when only the process dies (kill -9); after a
/// power loss, the data and the rename are only on disk if the file and then its directory
/// were synced, and a committed epoch must never point at data that vanished.
///
/// # Errors
/// I/O errors, naming the path.
pub fn publish(tmp: &Path, path: &Path) -> Result<()> {
    fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| RiffleError::io("syncing", tmp, e))?;
    fs::rename(tmp, path).map_err(|e| RiffleError::io("renaming", path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| RiffleError::io("syncing", dir, e))?;
    }
    Ok(())
}

fn read_json<T: for<'a> Deserialize<'a>>(path: &Path) -> Result<T> {
    let text = fs::read(path).map_err(|e| RiffleError::io("reading", path, e))?;
    serde_json::from_slice(&text).map_err(|e| {
        RiffleError::Config(format!("{}: corrupt checkpoint file: {e}", path.display()))
    })
}

fn epochs_in(dir: &Path, suffix: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(RiffleError::io("listing", dir, e)),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let matches = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(suffix));
        if let (true, Some(epoch)) = (matches, epoch_of(&path)) {
            found.push((epoch, path));
        }
    }
    found.sort();
    Ok(found)
}

impl Checkpoint {
    /// Opens (creating) a checkpoint directory for the query identified by `query`.
    ///
    /// # Errors
    /// [`RiffleError::Config`] when the directory belongs to a different query.
    pub fn open(root: &Path, query: &str) -> Result<Self> {
        for sub in ["offsets", "commits", "state"] {
            fs::create_dir_all(root.join(sub))
                .map_err(|e| RiffleError::io("creating", root.join(sub), e))?;
        }
        let meta = root.join("metadata.json");
        let mut recorded: serde_json::Value = if meta.exists() {
            read_json(&meta)?
        } else {
            serde_json::json!({ "format": 1, "query": query })
        };
        if recorded["query"].as_str() != Some(query) {
            return Err(RiffleError::Config(format!(
                "checkpoint {} was written by a different query; restarting from it could \
                 give wrong results. Use a new checkpoint directory (or delete this one)",
                root.display()
            )));
        }
        // The query id names the query's transactions in external sinks (Kafka transactional
        // ids, Delta application ids). It is random, so a fresh checkpoint never inherits an
        // old run's "already committed" marks, and stored, so a restart keeps it.
        let id = match recorded["id"].as_str() {
            Some(id) => id.to_string(),
            None => {
                let id = format!("{:016x}", rand::random::<u64>());
                recorded["id"] = serde_json::Value::String(id.clone());
                write_atomic(&meta, recorded.to_string().as_bytes())?;
                id
            }
        };
        Ok(Checkpoint {
            root: root.to_path_buf(),
            snapshot_every: 10,
            id,
        })
    }

    /// The query's id, stable for the life of this checkpoint.
    pub fn query_id(&self) -> &str {
        &self.id
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The last committed epoch.
    ///
    /// # Errors
    /// Unreadable checkpoint files.
    pub fn last_commit(&self) -> Result<Option<EpochCommit>> {
        match epochs_in(&self.root.join("commits"), ".json")?.last() {
            Some((_, path)) => Ok(Some(read_json(path)?)),
            None => Ok(None),
        }
    }

    /// The plan of `epoch`, if one was written.
    ///
    /// # Errors
    /// Unreadable checkpoint files.
    pub fn planned(&self, epoch: u64) -> Result<Option<EpochPlan>> {
        let path = self.root.join("offsets").join(name(epoch, ".json"));
        if path.exists() {
            Ok(Some(read_json(&path)?))
        } else {
            Ok(None)
        }
    }

    /// Writes an epoch's plan ahead of processing it.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_plan(&self, plan: &EpochPlan) -> Result<()> {
        let path = self.root.join("offsets").join(name(plan.epoch, ".json"));
        write_atomic(&path, &serde_json::to_vec(plan).expect("serialisable"))
    }

    /// Marks an epoch committed and prunes files no restart can need.
    ///
    /// # Errors
    /// I/O errors.
    pub fn commit(&self, commit: &EpochCommit) -> Result<()> {
        let path = self.root.join("commits").join(name(commit.epoch, ".json"));
        write_atomic(&path, &serde_json::to_vec(commit).expect("serialisable"))?;
        self.prune(commit.epoch)
    }

    /// Whether the state of `epoch` should be written as a snapshot.
    pub fn snapshot_due(&self, epoch: u64) -> bool {
        epoch.is_multiple_of(self.snapshot_every)
    }

    /// Writes an operator's state batch for `epoch`. Returns the bytes written.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_state(&self, epoch: u64, snapshot: bool, batch: &RecordBatch) -> Result<u64> {
        let suffix = if snapshot {
            ".snapshot.arrow"
        } else {
            ".delta.arrow"
        };
        let path = self.root.join("state").join(name(epoch, suffix));
        let mut bytes = Vec::new();
        {
            let mut writer = FileWriter::try_new(&mut bytes, &batch.schema())?;
            writer.write(batch)?;
            writer.finish()?;
        }
        write_atomic(&path, &bytes)?;
        // A delta and a snapshot for one epoch must not both exist (a replay may choose
        // differently only if the snapshot interval changed, but be safe).
        let other = if snapshot {
            ".delta.arrow"
        } else {
            ".snapshot.arrow"
        };
        let _ = fs::remove_file(self.root.join("state").join(name(epoch, other)));
        Ok(bytes.len() as u64)
    }

    /// The state batches to replay, in order, to reach the state after `committed`.
    ///
    /// # Errors
    /// Unreadable or corrupt state files.
    pub fn read_state(&self, committed: u64) -> Result<Vec<RecordBatch>> {
        let dir = self.root.join("state");
        let snapshots = epochs_in(&dir, ".snapshot.arrow")?;
        let base = snapshots.iter().rfind(|(e, _)| *e <= committed).cloned();
        let mut files = Vec::new();
        let from = match &base {
            Some((e, path)) => {
                files.push(path.clone());
                *e
            }
            None => 0,
        };
        for (e, path) in epochs_in(&dir, ".delta.arrow")? {
            if e > from && e <= committed {
                files.push(path);
            }
        }
        let mut batches = Vec::new();
        for path in files {
            let file = fs::File::open(&path).map_err(|e| RiffleError::io("opening", &path, e))?;
            let reader = FileReader::try_new(file, None).map_err(|e| {
                RiffleError::Config(format!("{}: corrupt state file: {e}", path.display()))
            })?;
            for batch in reader {
                batches.push(batch?);
            }
        }
        Ok(batches)
    }

    fn prune(&self, committed: u64) -> Result<()> {
        // Keep everything from the newest snapshot at or before the previous commit (one
        // epoch of slack, so even a lost commit file can be recovered); older state and
        // offsets can never be needed again.
        let dir = self.root.join("state");
        let keep_from = committed.saturating_sub(1);
        let Some((base, _)) = epochs_in(&dir, ".snapshot.arrow")?
            .into_iter()
            .rfind(|(e, _)| *e <= keep_from)
        else {
            return Ok(());
        };
        for suffix in [".snapshot.arrow", ".delta.arrow"] {
            for (e, path) in epochs_in(&dir, suffix)? {
                if e < base {
                    let _ = fs::remove_file(path);
                }
            }
        }
        for sub in ["offsets", "commits"] {
            for (e, path) in epochs_in(&self.root.join(sub), ".json")? {
                if e + 1 < base {
                    let _ = fs::remove_file(path);
                }
            }
        }
        Ok(())
    }
}
