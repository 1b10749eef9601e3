//! Storage errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("no space left on device writing {path}")]
    NoSpace { path: PathBuf },
    #[error("store is poisoned after a failed write or fsync; nothing more will be confirmed")]
    Poisoned,
    #[error("corrupted segment {segment} at offset {offset}: {what}")]
    Corrupted { segment: PathBuf, offset: u64, what: String },
    #[error("a batch of {0} bytes does not fit in one segment (offsets are 32-bit)")]
    BatchTooLarge(u64),
    #[error("index {0} is not in the log")]
    Missing(u64),
    #[error("cannot start the commit thread: {0}")]
    Thread(std::io::Error),
}

impl StorageError {
    pub fn io(path: &std::path::Path, source: std::io::Error) -> StorageError {
        // ENOSPC, as the kernel and our simulated backend report it.
        if source.raw_os_error() == Some(28) || source.kind() == std::io::ErrorKind::StorageFull {
            StorageError::NoSpace { path: path.to_path_buf() }
        } else {
            StorageError::Io { path: path.to_path_buf(), source }
        }
    }
}
