//! Static (dimension) tables for stream–static joins: an in-memory snapshot of a file that is
//! reloaded when the file changes.
//!
//! The rule for changing a table under a running query (also in the README): replace the file
//! by renaming a complete file over it, and it is loaded at the next epoch. A file rewritten in
//! place is loaded only once its size and modification time have stayed the same from one
//! epoch's check to the next, and a CSV or NDJSON file only when it ends with a line break, so a
//! writer caught half-way is never loaded. A file that cannot be loaded leaves the old rows in
//! use: the query goes on, and the failure is logged and written into the epoch's progress once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{MemTable, Session, TableProvider};
use datafusion::common::Result as DfResult;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use super::read_file;
use crate::common::FileFormat;
use crate::error::{Result, RiffleError};

/// What identifies one version of a file: the file (device and inode, which a rename over the
/// path changes and an in-place write keeps), its size and its modification time. Size and inode
/// catch the rewrites a coarse modification-time clock misses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    file: (u64, u64),
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Stamp {
            file: (m.dev(), m.ino()),
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// The outcome of one check for a changed file.
#[derive(Debug)]
pub enum Reload {
    /// The loaded version is current (or the failure of this version was already reported).
    Unchanged,
    /// The new version is loaded; plans must be rebuilt to see it.
    Reloaded,
    /// The file is being written in place; it is checked again at the next epoch.
    Settling,
    /// The new version cannot be loaded; the old rows stay in use.
    Failed(RiffleError),
}

#[derive(Debug)]
struct Versions {
    loaded: Stamp,
    /// An in-place change seen at the previous check, loaded if it is still the same now.
    settling: Option<Stamp>,
    /// A version that failed to load, not reported again.
    failed: Option<Stamp>,
}

/// A table whose rows are a snapshot of a file, swapped when the file changes (see the module
/// documentation for the rule). Queries planned against it see the new rows once re-planned.
#[derive(Debug)]
pub struct StaticTable {
    path: PathBuf,
    schema: SchemaRef,
    table: RwLock<Arc<MemTable>>,
    versions: Mutex<Versions>,
}

impl StaticTable {
    /// Loads `path` (Parquet, CSV with header, or NDJSON).
    ///
    /// # Errors
    /// Unreadable or incomplete files.
    pub fn load(path: &Path) -> Result<Self> {
        let stamp = Stamp::of(path).map_err(|e| RiffleError::io("reading", path, e))?;
        let (schema, table) = Self::read(path, None)?;
        Ok(StaticTable {
            path: path.to_path_buf(),
            schema,
            table: RwLock::new(table),
            versions: Mutex::new(Versions {
                loaded: stamp,
                settling: None,
                failed: None,
            }),
        })
    }

    fn read(path: &Path, schema: Option<SchemaRef>) -> Result<(SchemaRef, Arc<MemTable>)> {
        let format = FileFormat::of(path)?;
        if format != FileFormat::Parquet {
            ends_with_line_break(path)?;
        }
        let batches = read_file(path, format, schema.clone())?;
        let schema = match (schema, batches.first()) {
            (Some(s), _) => s,
            (None, Some(b)) => b.schema(),
            (None, None) => {
                return Err(RiffleError::Config(format!(
                    "{}: empty table",
                    path.display()
                )));
            }
        };
        Ok((
            schema.clone(),
            Arc::new(MemTable::try_new(schema, vec![batches])?),
        ))
    }

    /// Loads the file's new version if it changed since the last load and is complete. Never
    /// fails: a version that cannot be loaded is returned as [`Reload::Failed`] once, and the
    /// old rows stay in use until a later version loads.
    pub fn reload_if_changed(&self) -> Reload {
        let mut versions = self.versions.lock().expect("versions lock");
        let now = match Stamp::of(&self.path) {
            Ok(now) => now,
            Err(e) => {
                // Gone (not replaced): report once, keep the rows.
                let gone = Stamp {
                    file: (0, 0),
                    len: 0,
                    modified: None,
                };
                if versions.failed == Some(gone) {
                    return Reload::Unchanged;
                }
                versions.failed = Some(gone);
                return Reload::Failed(RiffleError::io("reading", &self.path, e));
            }
        };
        if now == versions.loaded || versions.failed == Some(now) {
            return Reload::Unchanged;
        }
        if now.file == versions.loaded.file && versions.settling != Some(now) {
            versions.settling = Some(now);
            return Reload::Settling;
        }
        let loaded = Self::read(&self.path, Some(self.schema.clone()));
        // A write that began during the read: what was read may be half of it.
        if Stamp::of(&self.path).ok() != Some(now) {
            versions.settling = None;
            return Reload::Settling;
        }
        match loaded {
            Ok((_, table)) => {
                *self.table.write().expect("table lock") = table;
                versions.loaded = now;
                versions.settling = None;
                versions.failed = None;
                Reload::Reloaded
            }
            Err(e) => {
                versions.failed = Some(now);
                Reload::Failed(e)
            }
        }
    }

    /// The file this table reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A text table must end with a line break: a file that does not may be a writer's half line.
fn ends_with_line_break(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| RiffleError::io("reading", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| RiffleError::io("reading", path, e))?
        .len();
    let mut last = [0u8; 1];
    if len > 0 {
        file.seek(SeekFrom::End(-1))
            .and_then(|_| file.read_exact(&mut last))
            .map_err(|e| RiffleError::io("reading", path, e))?;
    }
    if last[0] == b'\n' {
        Ok(())
    } else {
        Err(RiffleError::Config(format!(
            "{}: the file does not end with a line break, so it may be half-written; \
             write it elsewhere and rename it over the table's path",
            path.display()
        )))
    }
}

#[async_trait]
impl TableProvider for StaticTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let table = self.table.read().expect("table lock").clone();
        table.scan(state, projection, filters, limit).await
    }
}
