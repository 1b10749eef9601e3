//! Small files the broker replaces whole (access definitions, definition
//! snapshots, deduplication windows): written to a temporary file, fsynced,
//! renamed over the old one, and the directory fsynced, so a crash leaves
//! either the old or the new file, never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A failed file operation and the path it was on.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct FileError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(at(&tmp))?;
    file.write_all(bytes).map_err(at(&tmp))?;
    file.sync_all().map_err(at(&tmp))?;
    std::fs::rename(&tmp, path).map_err(at(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))?;
    }
    Ok(())
}
