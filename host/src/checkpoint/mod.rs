//! The checkpoint directory: write-ahead offsets, commits with state manifests, and operator
//! state.
//!
//! ```text
//! checkpoint/
//!   lock                                   held (flock) by the process running the query
//!   metadata.json                          query id and fingerprint (refuses another query)
//!   offsets/0000000007.json                epoch 7's input range per source, written first
//!   commits/0000000007.json                epoch 7 done: watermarks and the state manifest
//!   state/<operator>/<table>/0000000007.delta.arrow      changes of epoch 7 (Arrow IPC)
//!   state/<operator>/<table>/0000000010.snapshot.arrow   the whole table after epoch 10
//! ```
//!
//! Per epoch the driver writes the offsets, runs the epoch, writes each state table's delta (or
//! a snapshot, once the deltas since the last one are as large as it), writes the sink, and
//! then the commit. The commit's *manifest* lists, per
//! operator and table, the snapshot and every delta since it that make up the state after the
//! epoch. Recovery reads exactly those files, checks that each is there and says what it claims
//! to be (operator, table, epoch), and refuses to start otherwise: a missing delta is never
//! skipped silently, and a file left by an attempt that crashed before its commit is never
//! applied (no manifest names it, and the replay overwrites it). An epoch planned but not
//! committed is re-run with exactly its recorded offsets, so it produces the same rows, which
//! the sinks overwrite or skip.
//!
//! Every file is written to a temporary name, synced and renamed ([`crate::common::fs`]), so a
//! crash or a power loss never leaves half a file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use serde::{Deserialize, Serialize};

use crate::common::Watermark;
use crate::common::fs::{create_dir_durable, write_atomic};
use crate::error::{Result, RiffleError};
use crate::exec::graph::Graph;
use crate::plan::Fingerprint;

/// Version of the checkpoint layout.
pub const FORMAT: u32 = 2;

/// One source's input range in an epoch.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceRange {
    /// Offset before the epoch.
    pub start: serde_json::Value,
    /// Offset after the epoch.
    pub end: serde_json::Value,
}

/// Epoch plan, written ahead of processing.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochPlan {
    /// Epoch number, from 1.
    pub epoch: u64,
    /// Input range per source.
    pub sources: BTreeMap<String, SourceRange>,
    /// Each source's watermark at the start of the epoch: its rows behind it are late.
    pub watermarks: BTreeMap<String, Watermark>,
    /// Every source has ended: close every window after this epoch.
    pub last: bool,
}

/// A source's event-time progress after an epoch.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceProgress {
    /// Watermark after the epoch.
    pub watermark: Watermark,
    /// Largest event time seen so far.
    pub max_event_time: i64,
}

/// Which files hold one state table after an epoch.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TableManifest {
    /// Epoch of the snapshot the deltas apply to, if any.
    pub snapshot: Option<u64>,
    /// Epochs whose deltas apply on top, in order.
    pub deltas: Vec<u64>,
    /// Bytes of the snapshot.
    pub snapshot_bytes: u64,
    /// Bytes of the deltas.
    pub delta_bytes: u64,
}

/// Operator id -> table name -> files.
pub type StateManifest = BTreeMap<String, BTreeMap<String, TableManifest>>;

/// Epoch commit record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochCommit {
    /// Epoch number.
    pub epoch: u64,
    /// Event-time progress per source.
    pub sources: BTreeMap<String, SourceProgress>,
    /// The state after the epoch.
    pub state: StateManifest,
    /// Whether every source had ended.
    pub last: bool,
}

#[derive(Serialize, Deserialize)]
struct Metadata {
    format: u32,
    id: String,
    fingerprint: Fingerprint,
}

/// A checkpoint directory, locked for the life of this value.
pub struct Checkpoint {
    root: PathBuf,
    id: String,
    snapshot_every: usize,
    _lock: fs::File,
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

fn corrupt(path: &Path, what: impl std::fmt::Display) -> RiffleError {
    RiffleError::Checkpoint(format!("{}: {what}", path.display()))
}

fn read_json<T: for<'a> Deserialize<'a>>(path: &Path) -> Result<T> {
    let text = fs::read(path).map_err(|e| RiffleError::io("reading", path, e))?;
    serde_json::from_slice(&text)
        .map_err(|e| corrupt(path, format!("corrupt checkpoint file: {e}")))
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
            .is_some_and(|n| n.ends_with(suffix) && !n.starts_with('.'));
        if let (true, Some(epoch)) = (matches, epoch_of(&path)) {
            found.push((epoch, path));
        }
    }
    found.sort();
    Ok(found)
}

impl Checkpoint {
    /// Opens (creating) a checkpoint directory for the query with `fingerprint`, and locks it.
    ///
    /// # Errors
    /// [`RiffleError::Checkpoint`] when another process holds the directory, or it belongs to
    /// a different query (the message lists what differs).
    pub fn open(root: &Path, fingerprint: &Fingerprint) -> Result<Self> {
        for sub in ["offsets", "commits", "state"] {
            create_dir_durable(&root.join(sub))?;
        }
        let lock_path = root.join("lock");
        let mut lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| RiffleError::io("opening", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&lock_path).unwrap_or_default();
                return Err(RiffleError::Checkpoint(format!(
                    "checkpoint {} is in use by another running query{}: two processes on one \
                     checkpoint would overwrite each other's output. Stop the other one, or \
                     use another checkpoint directory",
                    root.display(),
                    match holder.trim() {
                        "" => String::new(),
                        pid => format!(" (process {pid})"),
                    }
                )));
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(RiffleError::io("locking", &lock_path, e));
            }
        }
        lock.set_len(0)
            .and_then(|_| write!(lock, "{}", std::process::id()))
            .and_then(|_| lock.flush())
            .map_err(|e| RiffleError::io("writing", &lock_path, e))?;

        let meta_path = root.join("metadata.json");
        let id = if meta_path.exists() {
            let value: serde_json::Value = read_json(&meta_path)?;
            if value["format"].as_u64() != Some(FORMAT as u64) {
                return Err(RiffleError::Checkpoint(format!(
                    "checkpoint {} was written by another version of Riffle (format {}, this \
                     one reads {FORMAT}); use a new checkpoint directory",
                    root.display(),
                    value["format"]
                )));
            }
            let meta: Metadata = serde_json::from_value(value)
                .map_err(|e| corrupt(&meta_path, format!("corrupt checkpoint metadata: {e}")))?;
            let changes = fingerprint.changes_since(&meta.fingerprint);
            if !changes.is_empty() {
                return Err(RiffleError::Checkpoint(format!(
                    "checkpoint {} was written by a different query; resuming from it could \
                     give wrong results. What changed: {}. Use a new checkpoint directory to \
                     start over (or restore the old query to resume)",
                    root.display(),
                    changes.join("; ")
                )));
            }
            meta.id
        } else {
            // The query id names the query's output (files, Kafka transactions, Delta
            // application ids). It is random, so a fresh checkpoint never inherits an old
            // run's "already committed" marks, and stored, so a restart keeps it.
            let id = format!("{:016x}", rand::random::<u64>());
            let meta = Metadata {
                format: FORMAT,
                id: id.clone(),
                fingerprint: fingerprint.clone(),
            };
            write_atomic(
                &meta_path,
                &serde_json::to_vec_pretty(&meta).expect("serialisable"),
            )?;
            id
        };
        Ok(Checkpoint {
            root: root.to_path_buf(),
            id,
            snapshot_every: 10,
            _lock: lock,
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

    fn table_dir(&self, operator: &str, table: &str) -> PathBuf {
        self.root.join("state").join(operator).join(table)
    }

    /// Writes every state table's changes of `epoch` (a delta, or a snapshot when one is due)
    /// and returns the new manifest and the bytes written.
    ///
    /// # Errors
    /// Encoding and I/O errors.
    pub fn write_state(
        &self,
        epoch: u64,
        graph: &mut Graph,
        previous: &StateManifest,
    ) -> Result<(StateManifest, u64)> {
        let mut manifest = StateManifest::new();
        let mut written = 0;
        for node in graph.nodes_mut() {
            let id = node.id.clone();
            for table in node.operator.tables() {
                let name = table.name().to_string();
                let before = previous
                    .get(&id)
                    .and_then(|t| t.get(&name))
                    .cloned()
                    .unwrap_or_default();
                // A snapshot once the deltas since the last one add up to as much as it did
                // (and at least every `snapshot_every` epochs): restoring then reads at most
                // about twice the state, and writing snapshots costs in proportion to the
                // changes rather than to the state.
                let snapshot_due = before.deltas.len() + 1 >= self.snapshot_every
                    && before.delta_bytes >= before.snapshot_bytes;
                let (batch, entry) = if snapshot_due {
                    let batch = table.snapshot()?;
                    (
                        Some((batch, true)),
                        TableManifest {
                            snapshot: Some(epoch),
                            deltas: Vec::new(),
                            snapshot_bytes: 0,
                            delta_bytes: 0,
                        },
                    )
                } else {
                    match table.take_delta()? {
                        Some(batch) => {
                            let mut entry = before.clone();
                            entry.deltas.push(epoch);
                            (Some((batch, false)), entry)
                        }
                        None => (None, before.clone()),
                    }
                };
                let mut entry = entry;
                if let Some((batch, snapshot)) = batch {
                    let bytes = self.write_table(&id, &name, epoch, snapshot, &batch)?;
                    written += bytes;
                    if snapshot {
                        entry.snapshot_bytes = bytes;
                    } else {
                        entry.delta_bytes += bytes;
                    }
                }
                if entry.snapshot.is_some() || !entry.deltas.is_empty() {
                    manifest.entry(id.clone()).or_default().insert(name, entry);
                }
            }
        }
        Ok((manifest, written))
    }

    fn write_table(
        &self,
        operator: &str,
        table: &str,
        epoch: u64,
        snapshot: bool,
        batch: &RecordBatch,
    ) -> Result<u64> {
        let dir = self.table_dir(operator, table);
        create_dir_durable(&dir)?;
        let kind = if snapshot { "snapshot" } else { "delta" };
        let path = dir.join(name(epoch, &format!(".{kind}.arrow")));
        let mut metadata = batch.schema().metadata().clone();
        metadata.insert("riffle.operator".into(), operator.into());
        metadata.insert("riffle.table".into(), table.into());
        metadata.insert("riffle.epoch".into(), epoch.to_string());
        metadata.insert("riffle.kind".into(), kind.into());
        let schema = Schema::new(batch.schema().fields().clone()).with_metadata(metadata);
        // Written straight to the file (state can be tens of megabytes an epoch), then synced
        // and renamed like every other checkpoint file.
        let tmp = crate::common::fs::temp_path(&path);
        let file = fs::File::create(&tmp).map_err(|e| RiffleError::io("creating", &tmp, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let written = (|| -> std::result::Result<(), arrow::error::ArrowError> {
            let mut writer = FileWriter::try_new(&mut out, &schema)?;
            writer.write(&RecordBatch::try_new(
                schema.clone().into(),
                batch.columns().to_vec(),
            )?)?;
            writer.finish()
        })();
        let flushed = written
            .map_err(|e| RiffleError::io("writing", &tmp, std::io::Error::other(e)))
            .and_then(|()| {
                out.into_inner()
                    .map_err(|e| RiffleError::io("writing", &tmp, e.into_error()))
            });
        let file = match flushed {
            Ok(file) => file,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let bytes = file
            .metadata()
            .map_err(|e| RiffleError::io("writing", &tmp, e))?
            .len();
        drop(file);
        crate::common::fs::publish(&tmp, &path)?;
        Ok(bytes)
    }

    fn read_table(
        &self,
        operator: &str,
        table: &str,
        epoch: u64,
        snapshot: bool,
    ) -> Result<RecordBatch> {
        let kind = if snapshot { "snapshot" } else { "delta" };
        let path = self
            .table_dir(operator, table)
            .join(name(epoch, &format!(".{kind}.arrow")));
        let file = fs::File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                RiffleError::Checkpoint(format!(
                    "checkpoint {} is incomplete: the state file {} named by the last commit is \
                     missing, so the state cannot be restored. Restore the file, or start over \
                     with a new checkpoint directory",
                    self.root.display(),
                    path.display()
                ))
            } else {
                RiffleError::io("opening", &path, e)
            }
        })?;
        let reader = FileReader::try_new(file, None)
            .map_err(|e| corrupt(&path, format!("corrupt state file: {e}")))?;
        let schema = reader.schema();
        let meta = schema.metadata();
        let says = |key: &str, expected: &str| meta.get(key).map(String::as_str) == Some(expected);
        if !(says("riffle.operator", operator)
            && says("riffle.table", table)
            && says("riffle.epoch", &epoch.to_string())
            && says("riffle.kind", kind))
        {
            return Err(corrupt(
                &path,
                format!("this file is not the {kind} of {operator}/{table} for epoch {epoch}"),
            ));
        }
        let batches = reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| corrupt(&path, format!("corrupt state file: {e}")))?;
        Ok(arrow::compute::concat_batches(&schema, &batches)?)
    }

    /// Restores every operator's state from `manifest`.
    ///
    /// # Errors
    /// [`RiffleError::Checkpoint`] for missing or mismatched files, or state the query's
    /// operators do not have.
    pub fn restore_state(&self, manifest: &StateManifest, graph: &mut Graph) -> Result<()> {
        for (operator, tables) in manifest {
            let node = graph
                .nodes_mut()
                .iter_mut()
                .find(|n| &n.id == operator)
                .ok_or_else(|| {
                    RiffleError::Checkpoint(format!(
                        "checkpoint {} holds state of operator {operator}, which this query does \
                         not have",
                        self.root.display()
                    ))
                })?;
            let mut live = node.operator.tables();
            for (name, entry) in tables {
                let table = live.iter_mut().find(|t| t.name() == name).ok_or_else(|| {
                    RiffleError::Checkpoint(format!(
                        "checkpoint {} holds state table {operator}/{name}, which this query \
                         does not have",
                        self.root.display()
                    ))
                })?;
                if let Some(epoch) = entry.snapshot {
                    table.restore(&self.read_table(operator, name, epoch, true)?, true)?;
                }
                for &epoch in &entry.deltas {
                    table.restore(&self.read_table(operator, name, epoch, false)?, false)?;
                }
            }
            drop(live);
            node.operator.on_restored()?;
        }
        Ok(())
    }

    /// Marks an epoch committed and removes files no restart can need.
    ///
    /// # Errors
    /// I/O errors.
    pub fn commit(&self, commit: &EpochCommit) -> Result<()> {
        let path = self.root.join("commits").join(name(commit.epoch, ".json"));
        write_atomic(&path, &serde_json::to_vec(commit).expect("serialisable"))?;
        self.prune(commit)
    }

    /// Keeps what a restart from this commit, or from the one before it (should this commit
    /// file be lost), needs: their offsets, commits and state files. Everything else goes,
    /// including temporary files of crashed writes.
    fn prune(&self, commit: &EpochCommit) -> Result<()> {
        let keep_from = commit.epoch.saturating_sub(1);
        let mut keep: BTreeSet<PathBuf> = BTreeSet::new();
        let mut manifests = vec![commit.state.clone()];
        if keep_from < commit.epoch
            && let Ok(Some(previous)) = self.commit_of(keep_from)
        {
            manifests.push(previous.state);
        }
        for manifest in &manifests {
            for (operator, tables) in manifest {
                for (table, entry) in tables {
                    let dir = self.table_dir(operator, table);
                    if let Some(s) = entry.snapshot {
                        keep.insert(dir.join(name(s, ".snapshot.arrow")));
                    }
                    for d in &entry.deltas {
                        keep.insert(dir.join(name(*d, ".delta.arrow")));
                    }
                }
            }
        }
        let state = self.root.join("state");
        for operator in read_dirs(&state) {
            for table in read_dirs(&operator) {
                for file in fs::read_dir(&table).into_iter().flatten().flatten() {
                    let path = file.path();
                    // Files of the epoch being replayed later than this commit stay too.
                    let newer = epoch_of(&path).is_some_and(|e| e > commit.epoch);
                    if !keep.contains(&path) && !newer {
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        for sub in ["offsets", "commits"] {
            let dir = self.root.join(sub);
            for file in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = file.path();
                let hidden = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'));
                if hidden || epoch_of(&path).is_some_and(|e| e < keep_from) {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(())
    }

    fn commit_of(&self, epoch: u64) -> Result<Option<EpochCommit>> {
        let path = self.root.join("commits").join(name(epoch, ".json"));
        if path.exists() {
            Ok(Some(read_json(&path)?))
        } else {
            Ok(None)
        }
    }
}

fn read_dirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}
