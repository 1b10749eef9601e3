//! A simulated disk for tests: files live in memory with a "written" and a
//! "durable" image. `sync` makes a file's written bytes durable, `sync_dir`
//! makes creations and removals durable, and [`SimBackend::power_cut`] throws
//! away everything not yet durable (optionally keeping a torn prefix of the
//! unsynced tail, as a real disk may). Faults: fail after N operations (a
//! crash point), fail every write or sync (EIO), or a capacity (ENOSPC).

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backend::{Backend, StorageFile};

#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Every write/sync/set_len/remove/sync_dir after this many succeeds fails.
    pub crash_after_ops: Option<u64>,
    pub fail_writes: bool,
    pub fail_syncs: bool,
    /// Total bytes all files may hold.
    pub capacity_bytes: Option<u64>,
}

#[derive(Default)]
struct FileState {
    data: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Default)]
struct Disk {
    files: HashMap<PathBuf, FileState>,
    /// Names whose existence survives a power cut.
    durable_names: HashSet<PathBuf>,
    /// Removed files whose removal is not durable yet: (path, durable image).
    pending_removals: Vec<(PathBuf, Vec<u8>)>,
    dirs: HashSet<PathBuf>,
    faults: Faults,
    ops: u64,
}

impl Disk {
    fn step(&mut self) -> io::Result<()> {
        if let Some(limit) = self.faults.crash_after_ops {
            if self.ops >= limit {
                return Err(io::Error::other("simulated crash: the process is gone"));
            }
        }
        self.ops += 1;
        Ok(())
    }

    fn used(&self) -> u64 {
        self.files.values().map(|f| f.data.len() as u64).sum()
    }
}

/// A shareable simulated disk; clones see the same files.
#[derive(Clone, Default)]
pub struct SimBackend {
    disk: Arc<Mutex<Disk>>,
}

impl SimBackend {
    pub fn new() -> SimBackend {
        SimBackend::default()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.disk.lock().faults = faults;
    }

    /// Write/sync operations performed so far (crash points for a sweep).
    pub fn ops(&self) -> u64 {
        self.disk.lock().ops
    }

    /// Power cut: everything not durable is lost, except that each file may
    /// keep `torn(unsynced_len)` bytes of its unsynced tail.
    pub fn power_cut_with(&self, torn: impl FnMut(usize) -> usize) {
        self.cut(torn, false);
    }

    /// A power cut that a process running on the disk (a broker started in
    /// the test's own process) outlives: as [`Self::power_cut`], and in the
    /// same step the disk refuses every operation until
    /// [`Self::set_faults`] clears it. After `power_cut` (which clears the
    /// faults) a write and fsync could land on the cut disk before the
    /// caller set them again, at the old length past a hole, and be
    /// confirmed: no real disk comes back on under the process that wrote.
    pub fn power_cut_and_stay_off(&self) {
        self.cut(|_| 0, true);
    }

    fn cut(&self, mut torn: impl FnMut(usize) -> usize, stay_off: bool) {
        let mut disk = self.disk.lock();
        let durable_names = disk.durable_names.clone();
        let mut files = std::mem::take(&mut disk.files);
        files.retain(|path, _| durable_names.contains(path));
        for state in files.values_mut() {
            let mut image = state.durable.clone();
            if state.data.len() > image.len() && state.data.starts_with(&image) {
                let keep = torn(state.data.len() - image.len()).min(state.data.len() - image.len());
                image.extend_from_slice(&state.data[state.durable.len()..state.durable.len() + keep]);
            }
            state.data = image.clone();
            state.durable = image;
        }
        for (path, image) in std::mem::take(&mut disk.pending_removals) {
            if durable_names.contains(&path) {
                files.insert(path, FileState { data: image.clone(), durable: image });
            }
        }
        disk.files = files;
        let off = Faults { crash_after_ops: Some(0), ..Faults::default() };
        disk.faults = if stay_off { off } else { Faults::default() };
    }

    pub fn power_cut(&self) {
        self.power_cut_with(|_| 0);
    }

    /// Flips one bit of a file (corruption at rest).
    pub fn flip_bit(&self, path: &Path, offset: usize, bit: u8) {
        let mut disk = self.disk.lock();
        if let Some(state) = disk.files.get_mut(path) {
            if let Some(byte) = state.data.get_mut(offset) {
                *byte ^= 1 << (bit % 8);
            }
            state.durable = state.data.clone();
        }
    }

    /// Puts a file with these contents on the disk, already durable
    /// (fuzzing and corruption tests build segment files this way).
    pub fn put_file(&self, path: &Path, bytes: &[u8]) {
        let mut disk = self.disk.lock();
        disk.files.insert(path.to_path_buf(), FileState { data: bytes.to_vec(), durable: bytes.to_vec() });
        disk.durable_names.insert(path.to_path_buf());
    }

    pub fn file_len(&self, path: &Path) -> Option<usize> {
        self.disk.lock().files.get(path).map(|f| f.data.len())
    }

    pub fn total_bytes(&self) -> u64 {
        self.disk.lock().used()
    }
}

struct SimFile {
    disk: Arc<Mutex<Disk>>,
    path: PathBuf,
}

fn gone(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} was removed", path.display()))
}

impl StorageFile for SimFile {
    fn size(&self) -> io::Result<u64> {
        let disk = self.disk.lock();
        disk.files.get(&self.path).map(|f| f.data.len() as u64).ok_or_else(|| gone(&self.path))
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let disk = self.disk.lock();
        let state = disk.files.get(&self.path).ok_or_else(|| gone(&self.path))?;
        let start = crate::usize_of(offset);
        let bytes = state
            .data
            .get(start..start + buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut disk = self.disk.lock();
        disk.step()?;
        if disk.faults.fail_writes {
            return Err(io::Error::other("simulated EIO on write"));
        }
        let end = crate::usize_of(offset) + data.len();
        let current = disk.files.get(&self.path).map(|f| f.data.len()).ok_or_else(|| gone(&self.path))?;
        if let Some(capacity) = disk.faults.capacity_bytes {
            if disk.used() + end.saturating_sub(current) as u64 > capacity {
                return Err(io::Error::from_raw_os_error(28));
            }
        }
        let state = disk.files.get_mut(&self.path).ok_or_else(|| gone(&self.path))?;
        if state.data.len() < end {
            state.data.resize(end, 0);
        }
        state.data[crate::usize_of(offset)..end].copy_from_slice(data);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut disk = self.disk.lock();
        disk.step()?;
        let state = disk.files.get_mut(&self.path).ok_or_else(|| gone(&self.path))?;
        state.data.resize(crate::usize_of(len), 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut disk = self.disk.lock();
        disk.step()?;
        if disk.faults.fail_syncs {
            return Err(io::Error::other("simulated EIO on fsync"));
        }
        let state = disk.files.get_mut(&self.path).ok_or_else(|| gone(&self.path))?;
        state.durable = state.data.clone();
        Ok(())
    }
}

impl Backend for SimBackend {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.disk.lock().dirs.insert(dir.to_path_buf());
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let disk = self.disk.lock();
        Ok(disk
            .files
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn StorageFile>> {
        let mut disk = self.disk.lock();
        if !disk.files.contains_key(path) {
            if !create {
                return Err(gone(path));
            }
            disk.step()?;
            disk.files.insert(path.to_path_buf(), FileState::default());
        }
        Ok(Box::new(SimFile { disk: self.disk.clone(), path: path.to_path_buf() }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.disk.lock();
        disk.step()?;
        let state = disk.files.remove(path).ok_or_else(|| gone(path))?;
        disk.pending_removals.push((path.to_path_buf(), state.durable));
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = self.disk.lock();
        disk.step()?;
        if disk.faults.fail_writes {
            return Err(io::Error::other("simulated EIO on rename"));
        }
        let state = disk.files.remove(from).ok_or_else(|| gone(from))?;
        disk.pending_removals.push((from.to_path_buf(), state.durable.clone()));
        // Until the directory is synced, a power cut brings the old file
        // back (a real file system may keep either).
        if let Some(old) = disk.files.remove(to) {
            disk.pending_removals.push((to.to_path_buf(), old.durable));
        }
        disk.files.insert(to.to_path_buf(), state);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut disk = self.disk.lock();
        disk.step()?;
        if disk.faults.fail_syncs {
            return Err(io::Error::other("simulated EIO on directory fsync"));
        }
        let present: Vec<PathBuf> = disk.files.keys().filter(|p| p.parent() == Some(dir)).cloned().collect();
        disk.durable_names.retain(|p| p.parent() != Some(dir));
        disk.durable_names.extend(present);
        disk.pending_removals.retain(|(p, _)| p.parent() != Some(dir));
        Ok(())
    }
}
