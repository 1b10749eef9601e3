//! The file interface of the storage engine (redb's `StorageBackend` idea):
//! every byte the log reads or writes goes through these two traits, so
//! tests can swap in [`crate::sim::SimBackend`] and inject faults.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub trait StorageFile: Send + Sync {
    fn size(&self) -> io::Result<u64>;
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes written bytes durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// The whole file mapped read-only, when the backend can: recovery then
    /// checksums the page cache in place instead of copying gigabytes out
    /// of it. `None`: read it instead.
    fn map(&self) -> Option<memmap2::Mmap> {
        None
    }
}

pub trait Backend: Send + Sync {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn StorageFile>>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes creations and removals in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Renames `from` over `to` (replacing it) in one step: until the
    /// directory is synced, a power cut leaves the old `to` or the new one.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
}

/// Replaces the file at `path` with `bytes` so that a crash or power cut
/// leaves either the old file or the new one, never a torn one: written to
/// `path.tmp`, synced, renamed over `path`, and the directory synced.
/// For small files written whole (definition snapshots, access
/// definitions, deduplication windows).
pub fn replace(backend: &dyn Backend, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let file = backend.open(&tmp, true)?;
    file.set_len(0)?;
    file.write_all_at(bytes, 0)?;
    file.sync()?;
    drop(file);
    backend.rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => backend.sync_dir(dir),
        None => Ok(()),
    }
}

/// The whole file at `path`, or `None` if there is none.
pub fn read_whole(backend: &dyn Backend, path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = match backend.open(path, false) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let len = usize::try_from(file.size()?).map_err(|_| io::Error::other("file too large to read whole"))?;
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(Some(bytes))
}

/// Real files.
#[derive(Clone, Copy, Debug, Default)]
pub struct FsBackend;

struct FsFile(File);

impl StorageFile for FsFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.0, buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.0, data, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    // The one unsafe block of the storage engine: mapping spares recovery
    // a copy of every segment.
    #[allow(unsafe_code)]
    fn map(&self) -> Option<memmap2::Mmap> {
        // SAFETY: a mapped segment is only read while the log is being
        // opened, before anything writes to it; no other process writes to
        // a data directory in use. The map is dropped before the file is
        // truncated.
        unsafe { memmap2::MmapOptions::new().populate().map(&self.0) }.ok()
    }
}

impl Backend for FsBackend {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        Ok(Box::new(FsFile(file)))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
}

/// `dir/name`, for error messages and file operations.
pub fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
