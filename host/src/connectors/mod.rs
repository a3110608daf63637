//! Sources and sinks, one folder per system, each owning its configuration.
//!
//! - [`source`] and [`sink`]: the traits the driver uses.
//! - [`generate`]: deterministic generators (fraud transactions, clickstream) and a generator
//!   as a source.
//! - [`files`]: file formats, the directory source, the Parquet directory sink, static tables.
//! - [`kafka`]: Kafka source (with dead letters) and exactly-once sink.
//! - [`delta`]: Delta Lake sink, batch source and backfill.
//! - [`memory`]: in-memory source and sink, and the console sink.

pub mod delta;
pub mod files;
pub mod generate;
pub mod kafka;
pub mod memory;
pub mod sink;
pub mod source;

use std::path::{Path, PathBuf};

use crate::error::RiffleError;

/// Where a connector's configuration came from, so its errors name the file and the key.
#[derive(Clone, Debug)]
pub struct ConfigContext<'a> {
    /// The configuration file.
    pub file: &'a Path,
    /// The table holding the connector's keys (`sources.transactions.stream`).
    pub key: String,
}

impl ConfigContext<'_> {
    /// A configuration error about `key` of this table.
    pub fn error(&self, key: &str, message: impl std::fmt::Display) -> RiffleError {
        RiffleError::Config(format!(
            "{}: {}.{key}: {message}",
            self.file.display(),
            self.key
        ))
    }
}

/// Makes a relative path in a configuration file relative to the file's directory.
pub fn resolve(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}
