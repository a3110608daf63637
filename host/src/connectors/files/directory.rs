//! A directory as a streaming source: files that appear in it are read once, in name order.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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
        DirectorySource::new(
            &self.path,
            self.max_files_per_trigger.unwrap_or(16),
            self.stop_when_empty,
        )
    }
}

/// A directory that receives files: each new file is read once, in name order. Files whose
/// names start with `.` or `_` are in-progress writes and are skipped until renamed.
pub struct DirectorySource {
    dir: PathBuf,
    format: FileFormat,
    schema: SchemaRef,
    max_files: usize,
    /// Stop (and end the query) once the directory has nothing new.
    bounded: bool,
}

impl DirectorySource {
    /// Watches `dir`; the schema comes from the first file already there.
    ///
    /// # Errors
    /// [`RiffleError::Config`] when the directory has no file to take the schema from.
    pub fn new(dir: &Path, max_files: usize, bounded: bool) -> Result<Self> {
        let format = FileFormat::of(dir)?;
        let first = Self::list(dir)?.into_iter().next().ok_or_else(|| {
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
            format,
            schema,
            max_files: max_files.max(1),
            bounded,
        })
    }

    fn list(dir: &Path) -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| RiffleError::io("listing", dir, e))?
            .flatten()
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| !n.starts_with('.') && !n.starts_with('_') && !n.ends_with(".tmp"))
            .collect();
        names.sort();
        Ok(names)
    }

    fn files(offset: &Value) -> BTreeSet<String> {
        offset["files"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
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
        Ok(json!({ "files": [] }))
    }

    fn available(&mut self, from: &Value, _max_rows: usize) -> Result<Value> {
        let mut seen = Self::files(from);
        let new: Vec<String> = Self::list(&self.dir)?
            .into_iter()
            .filter(|n| !seen.contains(n))
            .take(self.max_files)
            .collect();
        seen.extend(new);
        Ok(json!({ "files": seen }))
    }

    fn read(&mut self, from: &Value, to: &Value) -> Result<Input> {
        let before = Self::files(from);
        let mut batches = Vec::new();
        for name in Self::files(to).difference(&before) {
            batches.extend(read_file(
                &self.dir.join(name),
                self.format,
                Some(self.schema.clone()),
            )?);
        }
        Ok(Input {
            batches,
            ..Input::default()
        })
    }

    fn finished(&self, at: &Value) -> bool {
        self.bounded
            && Self::list(&self.dir)
                .map(|all| all.len() <= Self::files(at).len())
                .unwrap_or(false)
    }
}
