//! Small files the broker replaces whole (access definitions, definition
//! snapshots, deduplication windows), on the storage [`Backend`] like the
//! log, so a simulated disk's faults and power cuts reach them too:
//! replaced atomically (temporary file, sync, rename, directory sync), so a
//! crash leaves either the old or the new file, never a torn one.

use std::path::{Path, PathBuf};

use warren_storage::Backend;

/// A failed file operation and the path it was on.
#[derive(Debug, thiserror::Error)]
#[error("cannot read or write {path}: {source}")]
pub struct FileError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Writes `bytes` to `path` atomically.
pub fn replace(backend: &dyn Backend, path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    if let Some(dir) = path.parent() {
        backend.create_dir_all(dir).map_err(|source| FileError { path: dir.to_path_buf(), source })?;
    }
    warren_storage::backend::replace(backend, path, bytes)
        .map_err(|source| FileError { path: path.to_path_buf(), source })
}

/// The file's bytes, or `None` if it does not exist.
pub fn read(backend: &dyn Backend, path: &Path) -> Result<Option<Vec<u8>>, FileError> {
    warren_storage::backend::read_whole(backend, path).map_err(|source| FileError { path: path.to_path_buf(), source })
}
