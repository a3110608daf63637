//! A directory as a streaming source: files that appear in it are read once each, in the order
//! they arrived.
//!
//! **Which files, and when.** Names starting with `.` or `_` or ending in `.tmp` are skipped:
//! write a file under such a name and rename it in when it is complete. A file written in
//! place under its final name is read once it did not change while it was read (its size,
//! modification time and change time the same before and after); one still changing is left
//! for a later epoch. A file is identified by its name and its change time (`ctime`, which
//! every write and every rename into the directory moves on and no user can set back), so a
//! file rewritten or appended to under the same name is a new file and is read again, whole.
//!
//! **Offsets** are compact: the change time of the newest file taken, and the names of the
//! files taken with exactly that change time (files that arrived within one tick of the file
//! system's clock). They do not grow with the number of files read.
//!
//! **Bad files** (not readable in the directory's format, or not fitting the schema) are
//! checked before an epoch is planned with them: such a file is moved to the quarantine
//! directory (`_quarantine/` inside the watched one unless set) next to a `.reason.txt`
//! saying why, the progress lists it under `warnings`, and the query goes on. A file that turns
//! bad between planning and reading (replaced, or deleted, before a crashed epoch is replayed)
//! is quarantined the same way and its epoch goes on without it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use serde::Deserialize;
use serde_json::{Value, json};

use super::read_file;
use crate::common::FileFormat;
use crate::connectors::ConfigContext;
use crate::connectors::source::{Input, StreamSource};
use crate::error::{Result, RiffleError};

/// A directory source in a pipeline file (`kind = "directory"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectorySourceConfig {
    /// The directory (relative to the pipeline file).
    pub path: PathBuf,
    /// Most new files per epoch (default 16).
    pub max_files_per_trigger: Option<usize>,
    /// End the query once the directory has nothing new.
    #[serde(default)]
    pub stop_when_empty: bool,
    /// Where bad files go (default `<path>/_quarantine`).
    pub quarantine: Option<PathBuf>,
}

impl DirectorySourceConfig {
    /// Builds the source.
    ///
    /// # Errors
    /// A bad value (naming its key) or a directory without a first file to take the schema
    /// from.
    pub fn build(&self, ctx: &ConfigContext) -> Result<DirectorySource> {
        if self.max_files_per_trigger == Some(0) {
            return Err(ctx.error("max_files_per_trigger", "must be at least 1"));
        }
        let source = DirectorySource::new(
            &self.path,
            self.max_files_per_trigger.unwrap_or(16),
            self.stop_when_empty,
        )?;
        Ok(match &self.quarantine {
            Some(q) => source.with_quarantine(q),
            None => source,
        })
    }
}

/// When a file last changed, as the offsets order files: seconds and nanoseconds of `ctime`.
type Stamp = (i64, i64);

/// One file as listed: its name, change time and what must not move while it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Listed {
    name: String,
    changed: Stamp,
    len: u64,
    modified: Stamp,
}

impl Listed {
    fn of(dir: &Path, name: &str) -> Option<Listed> {
        let m = std::fs::metadata(dir.join(name)).ok()?;
        m.is_file().then(|| Listed {
            name: name.to_string(),
            changed: (m.ctime(), m.ctime_nsec()),
            len: m.len(),
            modified: (m.mtime(), m.mtime_nsec()),
        })
    }

    fn key(&self) -> (Stamp, &str) {
        (self.changed, &self.name)
    }
}

/// A position in the directory's arrival order: everything changed before `changed`, and the
/// files changed exactly then whose names are in `names`, were taken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Position {
    changed: Stamp,
    names: BTreeSet<String>,
}

impl Position {
    fn parse(offset: &Value) -> Result<Position> {
        if offset.get("files").is_some() {
            return Err(RiffleError::Checkpoint(
                "this checkpoint's directory offsets list every file read (an earlier format); \
                 use a new checkpoint directory"
                    .into(),
            ));
        }
        let at = &offset["changed"];
        Ok(Position {
            changed: (
                at[0].as_i64().unwrap_or(i64::MIN),
                at[1].as_i64().unwrap_or(0),
            ),
            names: offset["names"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn value(&self) -> Value {
        json!({ "changed": [self.changed.0, self.changed.1], "names": self.names })
    }

    /// Whether `file` comes after this position (was not taken by it).
    fn before(&self, file: &Listed) -> bool {
        file.changed > self.changed
            || (file.changed == self.changed && !self.names.contains(&file.name))
    }

    /// This position moved past `file`.
    fn take(&mut self, file: &Listed) {
        if file.changed != self.changed {
            self.changed = file.changed;
            self.names.clear();
        }
        self.names.insert(file.name.clone());
    }
}

/// A directory that receives files (see the module documentation for the rules).
pub struct DirectorySource {
    dir: PathBuf,
    quarantine: PathBuf,
    format: FileFormat,
    schema: SchemaRef,
    max_files: usize,
    /// Stop (and end the query) once the directory has nothing new.
    bounded: bool,
    /// Files checked by `available` and not read yet, with their rows: an epoch reads each
    /// file once, not once to check it and again to use it.
    checked: BTreeMap<String, (Listed, Vec<RecordBatch>)>,
    /// Files quarantined and not yet reported in an epoch's progress.
    quarantined: Vec<String>,
}

impl DirectorySource {
    /// Watches `dir`; the schema comes from the first file already there (in name order).
    ///
    /// # Errors
    /// [`RiffleError::Config`] when the directory has no file to take the schema from.
    pub fn new(dir: &Path, max_files: usize, bounded: bool) -> Result<Self> {
        let format = FileFormat::of(dir)?;
        let mut names: Vec<String> = Self::list(dir)?.into_iter().map(|f| f.name).collect();
        names.sort();
        let first = names.into_iter().next().ok_or_else(|| {
            RiffleError::Config(format!(
                "{}: the directory source takes its schema from the first file, and there is \
                 none yet",
                dir.display()
            ))
        })?;
        let schema = read_file(&dir.join(&first), format, None)?
            .first()
            .map(|b| b.schema())
            .ok_or_else(|| RiffleError::Config(format!("{first}: empty file")))?;
        Ok(DirectorySource {
            dir: dir.to_path_buf(),
            quarantine: dir.join("_quarantine"),
            format,
            schema,
            max_files: max_files.max(1),
            bounded,
            checked: BTreeMap::new(),
            quarantined: Vec::new(),
        })
    }

    /// Moves bad files to `dir` instead of `<watched>/_quarantine`.
    pub fn with_quarantine(mut self, dir: &Path) -> Self {
        self.quarantine = dir.to_path_buf();
        self
    }

    /// The files that may be read, in arrival order.
    fn list(dir: &Path) -> Result<Vec<Listed>> {
        let mut files: Vec<Listed> = std::fs::read_dir(dir)
            .map_err(|e| RiffleError::io("listing", dir, e))?
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| !n.starts_with('.') && !n.starts_with('_') && !n.ends_with(".tmp"))
            .filter_map(|n| Listed::of(dir, &n))
            .collect();
        files.sort_by(|a, b| a.key().cmp(&b.key()));
        Ok(files)
    }

    /// Reads `file`. `Ok(None)`: it changed while being read (still being written).
    fn check(&self, file: &Listed) -> Result<Option<Vec<RecordBatch>>> {
        let read = read_file(
            &self.dir.join(&file.name),
            self.format,
            Some(self.schema.clone()),
        );
        if Listed::of(&self.dir, &file.name).as_ref() != Some(file) {
            return Ok(None);
        }
        read.map(Some)
    }

    /// Moves a bad file out of the way with the reason beside it.
    fn quarantine(&mut self, file: &Listed, reason: &RiffleError) -> Result<()> {
        crate::common::fs::create_dir_durable(&self.quarantine)?;
        // The same name may go bad twice: the change time keeps both.
        let mut target = self.quarantine.join(&file.name);
        if target.exists() {
            target = self.quarantine.join(format!(
                "{}.{}{:09}",
                file.name, file.changed.0, file.changed.1
            ));
        }
        let note = target.with_file_name(format!(
            "{}.reason.txt",
            target.file_name().unwrap_or_default().to_string_lossy()
        ));
        std::fs::write(&note, format!("{reason}\n"))
            .map_err(|e| RiffleError::io("writing", &note, e))?;
        let from = self.dir.join(&file.name);
        std::fs::rename(&from, &target).map_err(|e| RiffleError::io("quarantining", &from, e))?;
        let text = format!(
            "directory source: {} moved to {}: {reason}",
            from.display(),
            target.display()
        );
        tracing::warn!("{text}");
        self.quarantined.push(text);
        Ok(())
    }
}

impl StreamSource for DirectorySource {
    fn kind(&self) -> &'static str {
        "directory"
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn initial(&mut self) -> Result<Value> {
        Ok(Position {
            changed: (i64::MIN, 0),
            names: BTreeSet::new(),
        }
        .value())
    }

    fn available(&mut self, from: &Value, _max_rows: usize) -> Result<Value> {
        let mut at = Position::parse(from)?;
        let mut taken = 0;
        for file in Self::list(&self.dir)? {
            if taken == self.max_files {
                break;
            }
            if !at.before(&file) {
                continue;
            }
            if self
                .checked
                .get(&file.name)
                .is_some_and(|(c, _)| *c == file)
            {
                at.take(&file);
                taken += 1;
                continue;
            }
            match self.check(&file) {
                Ok(Some(batches)) => {
                    at.take(&file);
                    self.checked.insert(file.name.clone(), (file, batches));
                    taken += 1;
                }
                // Still being written: its next write moves its change time past `at`.
                Ok(None) => {}
                Err(e) if e.blame() == crate::error::Blame::User => self.quarantine(&file, &e)?,
                Err(e) => return Err(e),
            }
        }
        Ok(at.value())
    }

    fn read(&mut self, from: &Value, to: &Value) -> Result<Input> {
        let (from, to) = (Position::parse(from)?, Position::parse(to)?);
        let mut batches = Vec::new();
        for file in Self::list(&self.dir)? {
            let in_epoch = from.before(&file) && !to.before(&file);
            if !in_epoch {
                continue;
            }
            match self.checked.remove(&file.name) {
                Some((checked, rows)) if checked == file => batches.extend(rows),
                // Not checked by this process (a replay after a restart): read it now.
                _ => match self.check(&file) {
                    Ok(Some(rows)) => batches.extend(rows),
                    // Being written again: the write moves its change time past `to`, and a
                    // later epoch reads the new version.
                    Ok(None) => {}
                    Err(e) if e.blame() == crate::error::Blame::User => {
                        self.quarantine(&file, &e)?
                    }
                    Err(e) => return Err(e),
                },
            }
        }
        self.checked.retain(|_, (file, _)| to.before(file));
        Ok(Input {
            batches,
            warnings: std::mem::take(&mut self.quarantined),
            ..Input::default()
        })
    }

    fn finished(&self, at: &Value) -> bool {
        let Ok(at) = Position::parse(at) else {
            return false;
        };
        self.bounded
            && Self::list(&self.dir)
                .map(|all| !all.iter().any(|f| at.before(f)))
                .unwrap_or(false)
    }
}
