//! Durable, atomic file writes: the one implementation every writer in Riffle uses.
//!
//! A file is written under a temporary name in its final directory, synced, renamed over the
//! final name, and then the directory is synced. The rename alone is atomic, which is enough
//! when only the process dies (`kill -9`); after a power loss the data and the rename are on
//! disk only if the file and then its directory were synced, and a committed epoch must never
//! point at data that vanished.
//!
//! Also here: reading back the last record of an append-only JSON-lines file.

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

/// Feeds the file at `path` to `f` in 1 MiB chunks and gives its length: for hashing or
/// checking a large file (a 19 MB module, a 35 MB compiled artifact) without first copying it
/// whole into fresh memory.
///
/// # Errors
/// I/O errors, unwrapped so that callers can tell a missing file.
pub fn for_each_chunk(path: &Path, mut f: impl FnMut(&[u8])) -> std::io::Result<u64> {
    use std::io::Read;
    let mut file = fs::File::open(path)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(len);
        }
        f(&chunk[..n]);
        len += n as u64;
    }
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

/// Syncs the directory holding `path`, so that a change of its entries (a file created,
/// renamed or removed) survives a power loss.
///
/// # Errors
/// I/O errors, naming the directory.
pub fn sync_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| RiffleError::io("syncing", dir, e))?;
    }
    Ok(())
}

/// The last line of a JSON-lines file that parses, read from its end (a progress file grows by
/// a line per epoch for the life of a query): the last 64 KiB, or more when one line is longer.
/// A line cut short by a crash does not parse, so the one before it counts.
pub fn last_json_line(path: &Path) -> Option<serde_json::Value> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let mut window = 1u64 << 16;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start)).ok()?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail).ok()?;
        // The first line of a window that does not start the file may be cut: skip it.
        let text = String::from_utf8_lossy(&tail);
        let mut lines: Vec<&str> = text.lines().collect();
        if start > 0 && !lines.is_empty() {
            lines.remove(0);
        }
        if let Some(record) = lines
            .iter()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
        {
            return Some(record);
        }
        if start == 0 {
            return None;
        }
        window *= 4;
    }
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

    #[test]
    fn the_last_json_line_skips_a_cut_line_and_finds_one_longer_than_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.jsonl");
        let long = "x".repeat(200_000);
        std::fs::write(
            &path,
            format!("{{\"epoch\":1}}\n{{\"epoch\":2,\"pad\":\"{long}\"}}\n{{\"epoch\":3,\"cut"),
        )
        .unwrap();
        let last = last_json_line(&path).unwrap();
        assert_eq!(last["epoch"], 2);
        assert_eq!(last["pad"].as_str().unwrap().len(), 200_000);
        assert!(last_json_line(&dir.path().join("missing")).is_none());
    }
}
