//! Hot swap of UDF modules in a running streaming query (`riffle run --hot-swap-udfs`).
//!
//! Between two epochs the driver asks [`UdfWatch::changed`] which module files were replaced
//! since it last looked. A file whose size, modification time or inode moved is read and
//! hashed; if its content is new it is loaded (with the configuration the old one had) and
//! checked against the old version with [`swap_blockers`]: it must export every function the
//! old one did with the same signature, and every aggregate with the same state columns,
//! because the running plan and the checkpointed aggregate states were built for those. A
//! module that fails to load or check is not swapped, the old one keeps serving, and the
//! reason is reported once per version of the file, never as a query failure: replacing a
//! file must not be able to stop a production query.
//!
//! The same rules as a restart with `--upgrade-udfs` apply, and the same records are kept:
//! the driver pins the new module in the checkpoint (its fingerprint and UDF history) before
//! the epoch is planned, then swaps the module into the session's slots, so every operator
//! calls the new code from that epoch on, and tells the sinks which hashes to stamp.
//!
//! Limitation: a deterministic function called with literal arguments may have been folded
//! into a constant when the query was planned; such a call keeps the old module's value until
//! the query restarts.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::udf::{ModuleSlot, UdfModule, swap_blockers};

/// What identifies a version of a file without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode: meta.ino(),
        })
    }
}

struct Watched {
    slot: Arc<ModuleSlot>,
    /// The file as last looked at.
    seen: Option<FileStamp>,
}

/// A module version ready to take over a slot.
pub(super) struct Replacement {
    /// Position of the slot among the session's (and of its module in the fingerprint).
    pub index: usize,
    pub slot: Arc<ModuleSlot>,
    pub module: Arc<UdfModule>,
}

/// The module files of a running query, and what was last seen of each.
pub(super) struct UdfWatch {
    watched: Vec<Watched>,
}

impl UdfWatch {
    /// Watches the files of `slots`. The first look hashes every file, so a file replaced
    /// between loading the module and starting the query is noticed too.
    pub(super) fn new(slots: Vec<Arc<ModuleSlot>>) -> Self {
        UdfWatch {
            watched: slots
                .into_iter()
                .map(|slot| Watched { slot, seen: None })
                .collect(),
        }
    }

    /// Modules whose files changed and may replace the serving ones, and a warning for each
    /// changed file that may not (the old module keeps serving).
    pub(super) fn changed(&mut self) -> (Vec<Replacement>, Vec<String>) {
        let (mut ready, mut warnings) = (Vec::new(), Vec::new());
        for (index, w) in self.watched.iter_mut().enumerate() {
            let old = w.slot.get();
            let now = FileStamp::of(old.path());
            if now == w.seen {
                continue;
            }
            w.seen = now;
            let new = match old.reload_if_changed() {
                Ok(Some(new)) => new,
                Ok(None) => continue,
                Err(e) => {
                    warnings.push(format!(
                        "UDF module {} changed on disk but was not swapped in; {} keeps \
                         serving: {e}",
                        old.file_name(),
                        short(old.hash())
                    ));
                    continue;
                }
            };
            let blockers = swap_blockers(old.spec(), new.spec());
            if blockers.is_empty() {
                ready.push(Replacement {
                    index,
                    slot: w.slot.clone(),
                    module: new,
                });
            } else {
                warnings.push(format!(
                    "UDF module {} changed on disk (sha256 {} -> {}) but cannot replace the \
                     serving one in a running query: {}; {} keeps serving. Restore the old \
                     file before the query restarts: a restart loads the file on disk, which \
                     the checkpoint refuses",
                    old.file_name(),
                    short(old.hash()),
                    short(new.hash()),
                    blockers.join("; "),
                    short(old.hash())
                ));
            }
        }
        (ready, warnings)
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}
