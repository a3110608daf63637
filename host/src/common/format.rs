//! File formats a table can be read from or written to, chosen by extension.

use std::path::Path;

use crate::error::{Result, RiffleError};

/// File formats a table can be read from, chosen by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// Apache Parquet.
    Parquet,
    /// CSV with a header row.
    Csv,
    /// Newline-delimited JSON.
    Json,
}

impl FileFormat {
    /// The format of `path` by extension (for a directory: of the first file in it).
    ///
    /// # Errors
    /// [`RiffleError::Config`] for unknown extensions.
    pub fn of(path: &Path) -> Result<FileFormat> {
        let probe = if path.is_dir() {
            std::fs::read_dir(path)
                .map_err(|e| RiffleError::io("listing", path, e))?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.is_file() && Self::by_extension(p).is_some())
                .unwrap_or_else(|| path.to_path_buf())
        } else {
            path.to_path_buf()
        };
        Self::by_extension(&probe).ok_or_else(|| {
            RiffleError::Config(format!(
                "{}: unknown file format (expected .parquet, .csv, .json, .jsonl or .ndjson)",
                path.display()
            ))
        })
    }

    /// The format named by a file's extension, if it names one.
    pub fn by_extension(path: &Path) -> Option<FileFormat> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "parquet" | "pq" => Some(FileFormat::Parquet),
            "csv" => Some(FileFormat::Csv),
            "json" | "jsonl" | "ndjson" => Some(FileFormat::Json),
            _ => None,
        }
    }

    /// The canonical extension, with its dot.
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Parquet => ".parquet",
            FileFormat::Csv => ".csv",
            FileFormat::Json => ".json",
        }
    }
}
