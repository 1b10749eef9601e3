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
}

/// `dir/name`, for error messages and file operations.
pub fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
