//! Durable, atomic file writes: the one implementation every writer in Riffle uses.
//!
//! A file is written under a temporary name in its final directory, synced, renamed over the
//! final name, and then the directory is synced. The rename alone is atomic, which is enough
//! when only the process dies (`kill -9`); after a power loss the data and the rename are on
//! disk only if the file and then its directory were synced, and a committed epoch must never
//! point at data that vanished.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, RiffleError};

/// A temporary name beside `path`, unique within this machine: hidden (readers of a directory
/// skip names starting with `.`), and tagged with the process id and a counter so concurrent
/// writers never share one.
pub fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}-{n}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` atomically and durably.
///
/// # Errors
/// I/O errors, naming the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    fs::write(&tmp, bytes).map_err(|e| RiffleError::io("writing", &tmp, e))?;
    publish(&tmp, path)
}

/// Makes a finished temporary file `tmp` durable and renames it to `path` (see the module
/// docs for why each sync is needed).
///
/// # Errors
/// I/O errors, naming the path.
pub fn publish(tmp: &Path, path: &Path) -> Result<()> {
    fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| RiffleError::io("syncing", tmp, e))?;
    fs::rename(tmp, path).map_err(|e| RiffleError::io("renaming", path, e))?;
    sync_parent(path)
}

/// Creates `dir` and any missing parents, syncing each parent whose entry changed, so a fresh
/// directory survives a power loss as well as the files later published into it.
///
/// # Errors
/// I/O errors, naming the directory.
pub fn create_dir_durable(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => sync_parent(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(RiffleError::io("creating", dir, e)),
    }
}

fn sync_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| RiffleError::io("syncing", dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("b").join("file.json");
        create_dir_durable(path.parent().unwrap()).unwrap();
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("file.json")]);
        assert!(
            temp_path(&path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with('.')
        );
    }
}
