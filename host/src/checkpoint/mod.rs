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
//! then the commit. The offsets and the commit are written on threads of their own while the
//! driver goes on (see [`crate::stream`]), so several epochs may be planned and not yet
//! committed; each commit still follows its plan and the commit before it. The commit's
//! *manifest* lists, per
//! operator and table, the snapshot and every delta since it that make up the state after the
//! epoch. Recovery reads exactly those files, checks that each is there and says what it claims
//! to be (operator, table, epoch), and refuses to start otherwise: a missing delta is never
//! skipped silently, and a file left by an attempt that crashed before its commit is never
//! applied (no manifest names it, and the replay overwrites it). Epochs planned but not
//! committed are re-run in order, each with exactly its recorded offsets, so they produce the
//! same rows, which the sinks overwrite or skip.
//!
//! Every file is written to a temporary name, synced and renamed ([`crate::common::fs`]), so a
//! crash or a power loss never leaves half a file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

pub mod status;

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
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceProgress {
    /// Watermark after the epoch.
    pub watermark: Watermark,
    /// Largest event time seen so far.
    pub max_event_time: i64,
    /// Largest event time seen so far per split (Kafka partition), for a source that reads
    /// several: its watermark follows the slowest split that still has rows to give.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub split_max_event_times: BTreeMap<String, i64>,
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
    /// The epoch's progress record as it stood just before the commit (so without the
    /// commit's time and the rows' latency): the progress file's line is written after the
    /// commit, and if a crash comes in between, the next run writes the line from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<serde_json::Value>,
}

/// Which UDF module (code and configuration) served a query from which epoch on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdfServed {
    /// Module file name.
    pub module: String,
    /// sha256 of the module.
    pub sha256: String,
    /// sha256 of its init configuration.
    pub config_sha256: String,
    /// The first epoch it served.
    pub from_epoch: u64,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Metadata {
    format: u32,
    pub(crate) id: String,
    pub(crate) fingerprint: Fingerprint,
    /// Every module version that served this query, oldest first: what `--upgrade-udfs`
    /// appends to. (Empty in checkpoints written before it was kept.)
    #[serde(default)]
    pub(crate) udf_history: Vec<UdfServed>,
}

impl Metadata {
    /// Takes `fingerprint`'s UDF modules as serving from `from_epoch` on: appends the ones
    /// that changed to the history (returned) and pins the new fingerprint.
    fn upgrade(&mut self, fingerprint: &Fingerprint, from_epoch: u64) -> Vec<UdfServed> {
        if self.udf_history.is_empty() {
            // Written before the history was kept: what it had served since epoch 1.
            self.udf_history = served(&self.fingerprint, 1).collect();
        }
        let changed: Vec<UdfServed> = served(fingerprint, from_epoch)
            .filter(|n| {
                !self.fingerprint.udfs.iter().any(|o| {
                    o.module == n.module
                        && o.sha256 == n.sha256
                        && o.config_sha256 == n.config_sha256
                })
            })
            .collect();
        self.udf_history.extend(changed.iter().cloned());
        self.fingerprint = fingerprint.clone();
        changed
    }
}

fn served(fingerprint: &Fingerprint, from_epoch: u64) -> impl Iterator<Item = UdfServed> + '_ {
    fingerprint.udfs.iter().map(move |u| UdfServed {
        module: u.module.clone(),
        sha256: u.sha256.clone(),
        config_sha256: u.config_sha256.clone(),
        from_epoch,
    })
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

/// The last commit in the checkpoint at `root` (also read, without the lock, by
/// [`status`]).
fn last_commit_in(root: &Path) -> Result<Option<EpochCommit>> {
    match epochs_in(&root.join("commits"), ".json")?.last() {
        Some((_, path)) => Ok(Some(read_json(path)?)),
        None => Ok(None),
    }
}

/// The plan of `epoch` in the checkpoint at `root`, if one was written.
fn plan_in(root: &Path, epoch: u64) -> Result<Option<EpochPlan>> {
    let path = root.join("offsets").join(name(epoch, ".json"));
    if path.exists() {
        Ok(Some(read_json(&path)?))
    } else {
        Ok(None)
    }
}

impl Checkpoint {
    /// Opens (creating) a checkpoint directory for the query with `fingerprint`, and locks it.
    ///
    /// # Errors
    /// [`RiffleError::Checkpoint`] when another process holds the directory, or it belongs to
    /// a different query (the message lists what differs).
    pub fn open(root: &Path, fingerprint: &Fingerprint) -> Result<Self> {
        Self::open_upgrading(root, fingerprint, false)
    }

    /// As [`Checkpoint::open`]; with `upgrade_udfs`, a checkpoint whose query differs only in
    /// UDF code or configuration is taken over on purpose: the new modules serve from the next
    /// epoch on, and the checkpoint's UDF history records the switch. An aggregate whose state
    /// columns changed is still refused (its old state would not be readable).
    ///
    /// # Errors
    /// As [`Checkpoint::open`].
    pub fn open_upgrading(
        root: &Path,
        fingerprint: &Fingerprint,
        upgrade_udfs: bool,
    ) -> Result<Self> {
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
            let mut meta: Metadata = serde_json::from_value(value)
                .map_err(|e| corrupt(&meta_path, format!("corrupt checkpoint metadata: {e}")))?;
            let query = fingerprint.query_changes_since(&meta.fingerprint);
            let udfs = fingerprint.udf_changes_since(&meta.fingerprint);
            if !query.is_empty() {
                return Err(RiffleError::Checkpoint(format!(
                    "checkpoint {} was written by a different query; resuming from it could \
                     give wrong results. What changed: {}. Use a new checkpoint directory to \
                     start over (or restore the old query to resume)",
                    root.display(),
                    query
                        .iter()
                        .chain(&udfs)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                )));
            }
            if !udfs.is_empty() {
                let blockers = fingerprint.upgrade_blockers(&meta.fingerprint);
                if !upgrade_udfs || !blockers.is_empty() {
                    let how = if blockers.is_empty() {
                        "To run the new code from the next epoch on purpose, restart with \
                         --upgrade-udfs (the checkpoint then records which module served which \
                         epochs); to run the old code, restore the old module"
                            .to_string()
                    } else {
                        format!(
                            "It cannot be upgraded in place: {}. Use a new checkpoint directory \
                             to start over with the new module",
                            blockers.join("; ")
                        )
                    };
                    return Err(RiffleError::Checkpoint(format!(
                        "checkpoint {} was written with other UDF code: {}. {how}",
                        root.display(),
                        udfs.join("; ")
                    )));
                }
                let from_epoch = last_commit_in(root)?.map_or(1, |c| c.epoch + 1);
                for n in meta.upgrade(fingerprint, from_epoch) {
                    tracing::warn!(
                        module = %n.module,
                        sha256 = %n.sha256,
                        config_sha256 = %n.config_sha256,
                        from_epoch,
                        "upgrading a UDF module on purpose (--upgrade-udfs)"
                    );
                }
                write_atomic(
                    &meta_path,
                    &serde_json::to_vec_pretty(&meta).expect("serialisable"),
                )?;
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
                udf_history: served(fingerprint, 1).collect(),
            };
            write_atomic(
                &meta_path,
                &serde_json::to_vec_pretty(&meta).expect("serialisable"),
            )?;
            id
        };
        sweep_temporaries(root);
        Ok(Checkpoint {
            root: root.to_path_buf(),
            id,
            snapshot_every: 10,
            _lock: lock,
        })
    }

    /// Records that a running query swapped UDF modules (a hot swap): from epoch `from_epoch`
    /// on, the modules in `fingerprint` serve, so a restart with them is accepted as it is and
    /// the history says which module served which epochs. The caller has checked that the
    /// swap is safe, and calls this before the epoch is planned: a crash in between restarts
    /// with the new modules, which is what the checkpoint then expects.
    ///
    /// # Errors
    /// I/O errors reading or writing the metadata.
    pub fn record_udf_swap(&self, fingerprint: &Fingerprint, from_epoch: u64) -> Result<()> {
        let meta_path = self.root.join("metadata.json");
        let mut meta: Metadata = read_json(&meta_path)?;
        meta.upgrade(fingerprint, from_epoch);
        write_atomic(
            &meta_path,
            &serde_json::to_vec_pretty(&meta).expect("serialisable"),
        )
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
        last_commit_in(&self.root)
    }

    /// The plan of `epoch`, if one was written.
    ///
    /// # Errors
    /// Unreadable checkpoint files.
    pub fn planned(&self, epoch: u64) -> Result<Option<EpochPlan>> {
        plan_in(&self.root, epoch)
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
        table_dir(&self.root, operator, table)
    }

    /// Writes every state table's changes of `epoch` (a delta, or a snapshot when one is due)
    /// and returns the new manifest and the bytes written: [`encode_state`](Self::encode_state)
    /// then [`StateWrite::write`].
    ///
    /// # Errors
    /// Encoding and I/O errors.
    pub fn write_state(
        &self,
        epoch: u64,
        graph: &mut Graph,
        previous: &StateManifest,
    ) -> Result<(StateManifest, u64)> {
        self.encode_state(epoch, graph, previous)?.write()
    }

    /// Takes every state table's changes of `epoch` (a delta, or a snapshot when one is due)
    /// as Arrow batches, ready to be written.
    ///
    /// Encoding needs the operators; writing needs only the batches. The driver encodes on
    /// its own thread and writes on a blocking thread while the sink writes the epoch's
    /// output (state files are tens of megabytes an epoch for a million keys, and neither job
    /// waits for the other); the commit writer syncs and renames the files
    /// ([`StateWrite::write_unpublished`]).
    ///
    /// # Errors
    /// Encoding errors.
    pub fn encode_state(
        &self,
        epoch: u64,
        graph: &mut Graph,
        previous: &StateManifest,
    ) -> Result<StateWrite> {
        let mut manifest = StateManifest::new();
        let mut files = Vec::new();
        for node in graph.nodes_mut() {
            let id = node.id.clone();
            for (t, name) in node.table_names().into_iter().enumerate() {
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
                let entry = if snapshot_due {
                    files.push(TableFile {
                        operator: id.clone(),
                        table: name.clone(),
                        snapshot: true,
                        batches: node.take_state(t, true)?,
                    });
                    TableManifest {
                        snapshot: Some(epoch),
                        deltas: Vec::new(),
                        snapshot_bytes: 0,
                        delta_bytes: 0,
                    }
                } else {
                    let batches = node.take_state(t, false)?;
                    if batches.is_empty() {
                        before
                    } else {
                        files.push(TableFile {
                            operator: id.clone(),
                            table: name.clone(),
                            snapshot: false,
                            batches,
                        });
                        let mut entry = before;
                        entry.deltas.push(epoch);
                        entry
                    }
                };
                if entry.snapshot.is_some() || !entry.deltas.is_empty() {
                    manifest.entry(id.clone()).or_default().insert(name, entry);
                }
            }
        }
        Ok(StateWrite {
            root: self.root.clone(),
            epoch,
            files,
            manifest,
        })
    }

    fn read_table(
        &self,
        operator: &str,
        table: &str,
        epoch: u64,
        snapshot: bool,
    ) -> Result<Vec<RecordBatch>> {
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
        reader
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| corrupt(&path, format!("corrupt state file: {e}")))
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
            let names = node.table_names();
            for (name, entry) in tables {
                if !names.contains(name) {
                    return Err(RiffleError::Checkpoint(format!(
                        "checkpoint {} holds state table {operator}/{name}, which this query \
                         does not have",
                        self.root.display()
                    )));
                }
                // The node sends each entry to the instance its key belongs to, however many
                // instances wrote the files.
                if let Some(epoch) = entry.snapshot {
                    node.restore_state(name, &self.read_table(operator, name, epoch, true)?, true)?;
                }
                for &epoch in &entry.deltas {
                    let batches = self.read_table(operator, name, epoch, false)?;
                    node.restore_state(name, &batches, false)?;
                }
            }
            node.on_restored()?;
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
    /// file be lost), needs: their offsets, commits and state files, and everything of later
    /// epochs. Everything else goes, except files being written (temporary files of crashed
    /// writes go when the checkpoint is next opened).
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
                    // Files of epochs later than this commit stay too: the epoch being
                    // replayed, or those running while this commit was written.
                    let newer = epoch_of(&path).is_some_and(|e| e > commit.epoch);
                    if !keep.contains(&path) && !newer && !is_temporary(&path) {
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        for sub in ["offsets", "commits"] {
            let dir = self.root.join(sub);
            for file in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = file.path();
                if !is_temporary(&path) && epoch_of(&path).is_some_and(|e| e < keep_from) {
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

/// Whether `path` is a file being written ([`crate::common::fs::temp_path`]), or left half
/// written by a crash.
fn is_temporary(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Removes the temporary files of writes a crash cut short. Only at open, under the lock:
/// while a query runs, its plans, commits and state are written concurrently with each other
/// (see [`crate::stream`]), and a commit's [`prune`](Checkpoint::prune) must not take a
/// file being written from under its writer.
fn sweep_temporaries(root: &Path) {
    let state = root.join("state");
    let dirs = [root.join("offsets"), root.join("commits")]
        .into_iter()
        .chain(read_dirs(&state).into_iter().flat_map(|o| read_dirs(&o)));
    for dir in dirs {
        for file in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if is_temporary(&file.path()) {
                let _ = fs::remove_file(file.path());
            }
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

fn table_dir(root: &Path, operator: &str, table: &str) -> PathBuf {
    root.join("state").join(operator).join(table)
}

/// One epoch's state changes, encoded by [`Checkpoint::encode_state`] and not yet on disk.
#[must_use = "the state is not in the checkpoint until it is written"]
pub struct StateWrite {
    root: PathBuf,
    epoch: u64,
    files: Vec<TableFile>,
    /// The manifest after this epoch, short of the bytes of this epoch's files.
    manifest: StateManifest,
}

/// The batches of one table's delta or snapshot.
struct TableFile {
    operator: String,
    table: String,
    snapshot: bool,
    batches: Vec<RecordBatch>,
}

impl StateWrite {
    /// Writes and syncs each table's file (blocking I/O) and returns the new manifest and the
    /// bytes written. Nothing refers to the files until the epoch's commit names them, so an
    /// epoch that fails here leaves only files a restart ignores.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write(self) -> Result<(StateManifest, u64)> {
        let (manifest, written, files) = self.write_unpublished()?;
        files.publish()?;
        Ok((manifest, written))
    }

    /// Writes each table's file under a temporary name, without syncing it, and returns the
    /// new manifest, the bytes written and the files to publish before the epoch commits.
    /// The stream driver publishes them on the commit writer's thread: the syncs, a
    /// millisecond or more an epoch, then hold up only the commit, not the next epoch.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_unpublished(mut self) -> Result<(StateManifest, u64, UnpublishedState)> {
        let mut written = 0;
        let mut files = UnpublishedState(Vec::with_capacity(self.files.len()));
        for file in &self.files {
            let (bytes, tmp, path) = write_table(
                &self.root,
                &file.operator,
                &file.table,
                self.epoch,
                file.snapshot,
                &file.batches,
            )?;
            files.0.push((tmp, path));
            written += bytes;
            let entry = self
                .manifest
                .get_mut(&file.operator)
                .and_then(|t| t.get_mut(&file.table))
                .expect("every written table is in the manifest");
            if file.snapshot {
                entry.snapshot_bytes = bytes;
            } else {
                entry.delta_bytes += bytes;
            }
        }
        Ok((self.manifest, written, files))
    }
}

/// An epoch's state files, written under temporary names ([`StateWrite::write_unpublished`]).
/// Until [`publish`](Self::publish)ed they are temporaries, which pruning leaves alone and the
/// next open of the checkpoint sweeps away.
#[must_use = "the state files are not in the checkpoint until they are published"]
pub struct UnpublishedState(Vec<(PathBuf, PathBuf)>);

impl UnpublishedState {
    /// Syncs each file and renames it to its name in the checkpoint.
    ///
    /// # Errors
    /// I/O errors.
    pub fn publish(self) -> Result<()> {
        for (tmp, path) in self.0 {
            crate::common::fs::publish(&tmp, &path)?;
        }
        Ok(())
    }
}

fn write_table(
    root: &Path,
    operator: &str,
    table: &str,
    epoch: u64,
    snapshot: bool,
    batches: &[RecordBatch],
) -> Result<(u64, PathBuf, PathBuf)> {
    let dir = table_dir(root, operator, table);
    create_dir_durable(&dir)?;
    let kind = if snapshot { "snapshot" } else { "delta" };
    let path = dir.join(name(epoch, &format!(".{kind}.arrow")));
    let mut metadata = batches[0].schema().metadata().clone();
    metadata.insert("riffle.operator".into(), operator.into());
    metadata.insert("riffle.table".into(), table.into());
    metadata.insert("riffle.epoch".into(), epoch.to_string());
    metadata.insert("riffle.kind".into(), kind.into());
    let schema =
        Arc::new(Schema::new(batches[0].schema().fields().clone()).with_metadata(metadata));
    // Written straight to the file (state can be tens of megabytes an epoch), then synced
    // and renamed like every other checkpoint file ([`UnpublishedState::publish`]).
    let tmp = crate::common::fs::temp_path(&path);
    let file = fs::File::create(&tmp).map_err(|e| RiffleError::io("creating", &tmp, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let written = (|| -> std::result::Result<(), arrow::error::ArrowError> {
        let mut writer = FileWriter::try_new(&mut out, &schema)?;
        for batch in batches {
            writer.write(&RecordBatch::try_new(
                schema.clone(),
                batch.columns().to_vec(),
            )?)?;
        }
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
    Ok((bytes, tmp, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::graph::{Edge, Node};
    use crate::exec::partition::hash_columns;
    use crate::exec::{Operator, Output, PartitionKey, Partitioning};
    use crate::plan::fingerprint::{OperatorPrint, STATE_FORMAT};
    use crate::state::bytes::BytesCodec;
    use crate::state::{KeyedTable, StateTable, entry_keys};
    use arrow::array::{AsArray, Int64Array, UInt8Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use std::sync::Arc;

    /// Counts rows per value of its input's column (as one key byte); 255 removes key 0.
    struct Counter {
        table: KeyedTable<u64>,
    }

    #[async_trait::async_trait]
    impl Operator for Counter {
        fn kind(&self) -> &'static str {
            "counter"
        }
        async fn process_batch(
            &mut self,
            _: usize,
            batch: RecordBatch,
            _: &mut Output,
        ) -> Result<()> {
            let x = batch.column(0).as_primitive::<Int64Type>();
            for v in x.values() {
                if *v == 255 {
                    self.table.remove(&[0]);
                } else {
                    *self.table.get_or_insert_with(&[*v as u8], || 0) += 1;
                }
            }
            Ok(())
        }
        fn partitioning(&self) -> Partitioning {
            Partitioning::ByKey(Arc::new(CounterKey))
        }
        fn tables(&mut self) -> Vec<&mut dyn StateTable> {
            vec![&mut self.table]
        }
    }

    /// The counter's partition key: its key byte, from an input value or a state entry.
    struct CounterKey;

    impl PartitionKey for CounterKey {
        fn input_hashes(&self, _: usize, batch: &RecordBatch) -> Result<Vec<u64>> {
            let x = batch.column(0).as_primitive::<Int64Type>();
            // 255 removes key 0, so it goes where key 0 is.
            let keys: UInt8Array = x.values().iter().map(|&v| (v % 255) as u8).collect();
            hash_columns(&[Arc::new(keys)], batch.num_rows())
        }
        fn state_hashes(&self, _: &str, batch: &RecordBatch) -> Result<Vec<u64>> {
            let keys: UInt8Array = entry_keys(batch)?.iter().map(|k| k.unwrap()[0]).collect();
            hash_columns(&[Arc::new(keys)], batch.num_rows())
        }
    }

    fn table() -> KeyedTable<u64> {
        KeyedTable::new("counts", Box::new(BytesCodec::<u64>::new()))
    }

    fn graph() -> Graph {
        partitioned_graph(1)
    }

    /// The counter as `n` instances sharing its rows by key.
    fn partitioned_graph(n: usize) -> Graph {
        let mut g = Graph::new();
        let instances = (0..n)
            .map(|_| Box::new(Counter { table: table() }) as Box<dyn Operator>)
            .collect();
        g.add(
            Node::partitioned(
                instances,
                vec![Edge::Source {
                    index: 0,
                    projection: None,
                }],
                input(&[]).schema(),
            )
            .unwrap(),
        )
        .unwrap();
        g
    }

    fn input(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values.to_vec()))]).unwrap()
    }

    /// The counter's state, read through a snapshot.
    fn contents(g: &mut Graph) -> Vec<(Vec<u8>, u64)> {
        let snapshot = g.nodes_mut()[0].take_state(0, true).unwrap();
        let mut copy = table();
        copy.restore(&snapshot, true).unwrap();
        let mut v: Vec<_> = copy.iter().map(|(k, n)| (k.to_vec(), *n)).collect();
        v.sort();
        v
    }

    fn print() -> Fingerprint {
        Fingerprint {
            state_format: STATE_FORMAT,
            output_mode: "append".into(),
            sources: Vec::new(),
            operators: vec![OperatorPrint {
                id: "0-counter".into(),
                inputs: vec!["s".into()],
                schema: "x: Int64".into(),
            }],
            udfs: Vec::new(),
        }
    }

    /// Runs `epochs` epochs of changes, writing state and committing each; returns the live
    /// graph and the last commit.
    fn run(ckpt: &Checkpoint, epochs: u64) -> (Graph, EpochCommit) {
        run_partitioned(ckpt, epochs, 1)
    }

    /// [`run`] with the counter in `n` partitions.
    fn run_partitioned(ckpt: &Checkpoint, epochs: u64, n: usize) -> (Graph, EpochCommit) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut g = partitioned_graph(n);
        let mut manifest = StateManifest::new();
        let mut last = None;
        for epoch in 1..=epochs {
            let mut values: Vec<i64> = (0..(epoch % 5 + 1) as i64)
                .map(|k| k * 3 + epoch as i64 % 3)
                .collect();
            if epoch % 4 == 0 {
                values.push(255);
            }
            rt.block_on(g.run_epoch(&[vec![input(&values)]], &[Watermark::NONE]))
                .unwrap();
            let (m, _) = ckpt.write_state(epoch, &mut g, &manifest).unwrap();
            let commit = EpochCommit {
                progress: None,
                epoch,
                sources: BTreeMap::new(),
                state: m.clone(),
                last: false,
            };
            ckpt.commit(&commit).unwrap();
            manifest = m;
            last = Some(commit);
        }
        (g, last.unwrap())
    }

    #[test]
    fn the_manifest_restores_snapshot_and_deltas_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = Checkpoint::open(dir.path(), &print()).unwrap();
        let (mut live, commit) = run(&ckpt, 27);
        let entry = &commit.state["0-counter"]["counts"];
        assert!(
            entry.snapshot.is_some(),
            "a snapshot was due by epoch 27: {entry:?}"
        );
        let mut restored = graph();
        ckpt.restore_state(&commit.state, &mut restored).unwrap();
        assert_eq!(contents(&mut restored), contents(&mut live));
        // Pruning left exactly the files this commit and the one before name.
        let files = std::fs::read_dir(dir.path().join("state/0-counter/counts"))
            .unwrap()
            .count();
        assert!(
            files <= entry.deltas.len() + 1 + 2,
            "{files} files for {entry:?}"
        );
    }

    /// State written by a counter in 2 partitions restores into 1, 2 or 3, each key in the
    /// instance its later rows go to: the same rows on top count on from the restored counts,
    /// as they do in the graph that wrote them.
    #[test]
    fn state_restores_into_another_number_of_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = Checkpoint::open(dir.path(), &print()).unwrap();
        let (mut live, commit) = run_partitioned(&ckpt, 27, 2);
        assert!(commit.state["0-counter"]["counts"].snapshot.is_some());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let more = || vec![input(&(0..40).chain([255, 7, 7]).collect::<Vec<_>>())];
        rt.block_on(live.run_epoch(&[more()], &[Watermark::NONE]))
            .unwrap();
        let expected = contents(&mut live);
        for n in [1, 2, 3] {
            let mut restored = partitioned_graph(n);
            ckpt.restore_state(&commit.state, &mut restored).unwrap();
            let node = &mut restored.nodes_mut()[0];
            if n > 1 {
                // Every instance got a share of the keys.
                for instance in &mut node.instances_mut()[..] {
                    assert!(instance.state_size().rows > 0, "{n} partitions");
                }
            }
            rt.block_on(restored.run_epoch(&[more()], &[Watermark::NONE]))
                .unwrap();
            assert_eq!(contents(&mut restored), expected, "{n} partitions");
        }
    }

    #[test]
    fn a_missing_state_file_is_an_error_never_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = Checkpoint::open(dir.path(), &print()).unwrap();
        let (_, commit) = run(&ckpt, 6);
        let delta = commit.state["0-counter"]["counts"].deltas[2];
        std::fs::remove_file(
            dir.path()
                .join("state/0-counter/counts")
                .join(name(delta, ".delta.arrow")),
        )
        .unwrap();
        let error = ckpt.restore_state(&commit.state, &mut graph()).unwrap_err();
        assert!(error.to_string().contains("is incomplete"), "{error}");
    }

    #[test]
    fn a_file_of_another_epoch_under_a_listed_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = Checkpoint::open(dir.path(), &print()).unwrap();
        let (_, commit) = run(&ckpt, 5);
        let deltas = &commit.state["0-counter"]["counts"].deltas;
        let table = dir.path().join("state/0-counter/counts");
        std::fs::copy(
            table.join(name(deltas[0], ".delta.arrow")),
            table.join(name(deltas[1], ".delta.arrow")),
        )
        .unwrap();
        let error = ckpt.restore_state(&commit.state, &mut graph()).unwrap_err();
        assert!(error.to_string().contains("is not the delta"), "{error}");
    }

    /// State written for the commit writer to publish is only temporaries until it is
    /// published (pruning and a restore do not see it); published, it restores.
    #[test]
    fn unpublished_state_is_only_temporaries_until_published() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = Checkpoint::open(dir.path(), &print()).unwrap();
        let (mut live, commit) = run(&ckpt, 3);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(live.run_epoch(&[vec![input(&[42, 7])]], &[Watermark::NONE]))
            .unwrap();
        let (manifest, bytes, files) = ckpt
            .encode_state(4, &mut live, &commit.state)
            .unwrap()
            .write_unpublished()
            .unwrap();
        assert!(bytes > 0);
        let table = dir.path().join("state/0-counter/counts");
        let delta = table.join(name(4, ".delta.arrow"));
        let temporaries = || {
            fs::read_dir(&table)
                .unwrap()
                .flatten()
                .filter(|f| is_temporary(&f.path()))
                .count()
        };
        assert!(!delta.exists());
        assert_eq!(temporaries(), 1);
        files.publish().unwrap();
        assert!(delta.exists());
        assert_eq!(temporaries(), 0);
        ckpt.commit(&EpochCommit {
            progress: None,
            epoch: 4,
            sources: BTreeMap::new(),
            state: manifest.clone(),
            last: false,
        })
        .unwrap();
        let mut restored = graph();
        ckpt.restore_state(&manifest, &mut restored).unwrap();
        assert_eq!(contents(&mut restored), contents(&mut live));
    }

    #[test]
    fn a_stale_file_of_an_uncommitted_attempt_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = Checkpoint::open(dir.path(), &print()).unwrap();
        let (mut live, commit) = run(&ckpt, 3);
        // An attempt at epoch 4 wrote its delta, then crashed before committing.
        let mut attempt = graph();
        ckpt.restore_state(&commit.state, &mut attempt).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(attempt.run_epoch(&[vec![input(&[42])]], &[Watermark::NONE]))
            .unwrap();
        ckpt.write_state(4, &mut attempt, &commit.state).unwrap();
        assert!(
            dir.path()
                .join("state/0-counter/counts")
                .join(name(4, ".delta.arrow"))
                .exists()
        );
        // Restoring the last commit ignores it.
        let mut restored = graph();
        ckpt.restore_state(&commit.state, &mut restored).unwrap();
        assert_eq!(contents(&mut restored), contents(&mut live));
        // The replay of epoch 4 changes nothing this time: committing it removes the file.
        let (m, _) = ckpt.write_state(4, &mut restored, &commit.state).unwrap();
        ckpt.commit(&EpochCommit {
            progress: None,
            epoch: 4,
            sources: BTreeMap::new(),
            state: m,
            last: false,
        })
        .unwrap();
        assert!(
            !dir.path()
                .join("state/0-counter/counts")
                .join(name(4, ".delta.arrow"))
                .exists(),
            "the stale delta was pruned"
        );
    }

    #[test]
    fn another_query_or_a_second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = Checkpoint::open(dir.path(), &print()).unwrap();
        let error = Checkpoint::open(dir.path(), &print()).err().unwrap();
        assert!(
            error
                .to_string()
                .contains("in use by another running query"),
            "{error}"
        );
        drop(ckpt);
        let mut other = print();
        other.output_mode = "update".into();
        let error = Checkpoint::open(dir.path(), &other).err().unwrap();
        assert!(
            error
                .to_string()
                .contains("What changed: output mode append -> update"),
            "{error}"
        );
        assert!(
            Checkpoint::open(dir.path(), &print()).is_ok(),
            "the same query resumes"
        );
    }
}
