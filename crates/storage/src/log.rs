//! A segmented, checksummed log with the shape of a Raft log.
//!
//! Layout: `dir/<first index, 20 digits>.wal`, each starting with a 16-byte
//! header (`WARRENL1` + first index), then records:
//! `len:u32 crc:u32 index:u64 term:u64 payload[len]`, where `crc` is CRC-32
//! over index, term and payload. Indices start at 1 and are contiguous
//! (corruption found at recovery can leave holes, which are reported).
//!
//! Invariants:
//! - records are only appended; a segment is sealed when the next starts;
//! - every record read back is checksummed before it is returned: a corrupt
//!   payload is never served;
//! - recovery cuts a torn tail of the last segment (bytes after the last
//!   valid record) and counts, logs and skips corrupt records elsewhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::backend::{Backend, StorageFile};
use crate::error::StorageError;

const MAGIC: &[u8; 8] = b"WARRENL1";
const SEGMENT_HEADER: u64 = 16;
const SEGMENT_HEADER_LEN: usize = 16;
/// The largest segment size honoured (`segment_bytes_max` is capped to it),
/// so that a segment's 32-bit entry offsets cannot overflow.
pub const SEGMENT_BYTES_CAP: u64 = 1 << 30;
pub const RECORD_HEADER: usize = 24;
const MISSING: u32 = u32::MAX;

#[derive(Clone, Debug)]
pub struct LogOptions {
    /// A new segment starts once the active one is at least this large.
    pub segment_bytes_max: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { segment_bytes_max: 16 * 1024 * 1024 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub index: u64,
    pub term: u64,
    pub payload: Vec<u8>,
}

/// What recovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    pub entries: u64,
    pub torn_bytes_cut: u64,
    pub corrupt_entries: u64,
    pub corrupt_bytes: u64,
}

struct Segment {
    first_index: u64,
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    len: u64,
    /// Offset of each entry, by `index - first_index`; `MISSING` for holes.
    offsets: Vec<u32>,
    dirty: bool,
}

impl Segment {
    fn last_index(&self) -> Option<u64> {
        (!self.offsets.is_empty()).then(|| self.first_index + self.offsets.len() as u64 - 1)
    }
}

/// The fsyncs one sync needs; see [`Log::prepare_sync`].
pub struct SyncPlan {
    files: Vec<(PathBuf, Arc<dyn StorageFile>)>,
    dir: Option<(Arc<dyn Backend>, PathBuf)>,
    first_index_after: u64,
}

impl SyncPlan {
    pub fn run(&self) -> Result<(), StorageError> {
        for (path, file) in &self.files {
            file.sync().map_err(|e| StorageError::io(path, e))?;
        }
        if let Some((backend, dir)) = &self.dir {
            backend.sync_dir(dir).map_err(|e| StorageError::io(dir, e))?;
        }
        Ok(())
    }
}

pub struct Log {
    backend: Arc<dyn Backend>,
    dir: PathBuf,
    options: LogOptions,
    segments: Vec<Segment>,
    next_index: u64,
    dir_dirty: bool,
    poisoned: bool,
}

pub fn checksum(index: u64, term: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&index.to_le_bytes());
    hasher.update(&term.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one encoded record to `out`.
pub fn encode_record(out: &mut Vec<u8>, index: u64, term: u64, payload: &[u8]) {
    // An entry is at most one message (`max_message_size`, capped at
    // 512 MiB by the server's configuration) plus its small header.
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&checksum(index, term, payload).to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&term.to_le_bytes());
    out.extend_from_slice(payload);
}

struct Header {
    len: usize,
    crc: u32,
    index: u64,
    term: u64,
}

fn header_at(bytes: &[u8], at: usize) -> Option<Header> {
    let h = bytes.get(at..at + RECORD_HEADER)?;
    Some(Header {
        len: u32::from_le_bytes(h[0..4].try_into().ok()?) as usize,
        crc: u32::from_le_bytes(h[4..8].try_into().ok()?),
        index: u64::from_le_bytes(h[8..16].try_into().ok()?),
        term: u64::from_le_bytes(h[16..24].try_into().ok()?),
    })
}

/// Is there a valid record with `index` at `at`?
fn valid_at(bytes: &[u8], at: usize, index: u64) -> bool {
    match header_at(bytes, at) {
        Some(h) if h.index == index => bytes
            .get(at + RECORD_HEADER..at + RECORD_HEADER + h.len)
            .is_some_and(|payload| checksum(h.index, h.term, payload) == h.crc),
        _ => false,
    }
}

fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}.wal")
}

impl Log {
    /// Opens (or creates) the log in `dir`, recovering what is there.
    pub fn open(backend: Arc<dyn Backend>, dir: &Path, options: LogOptions) -> Result<(Log, Recovery), StorageError> {
        Self::open_visiting(backend, dir, options, |_, _, _| {})
    }

    /// Opens the log and hands every valid entry (index, term, payload) to
    /// `visit` in order while recovering, so a replay reads and checksums
    /// each segment once.
    pub fn open_visiting(
        backend: Arc<dyn Backend>,
        dir: &Path,
        options: LogOptions,
        mut visit: impl FnMut(u64, u64, &[u8]),
    ) -> Result<(Log, Recovery), StorageError> {
        backend.create_dir_all(dir).map_err(|e| StorageError::io(dir, e))?;
        let mut firsts: Vec<u64> = backend
            .list(dir)
            .map_err(|e| StorageError::io(dir, e))?
            .iter()
            .filter_map(|name| name.strip_suffix(".wal").and_then(|n| n.parse().ok()))
            .collect();
        firsts.sort_unstable();
        let mut log = Log {
            backend,
            dir: dir.to_path_buf(),
            options,
            segments: Vec::new(),
            next_index: 1,
            dir_dirty: false,
            poisoned: false,
        };
        let mut recovery = Recovery::default();
        let count = firsts.len();
        // One buffer for every segment: no 16 MiB allocation (and zeroing)
        // per segment.
        let mut bytes = Vec::new();
        for (position, first_index) in firsts.into_iter().enumerate() {
            let last = position + 1 == count;
            log.recover_segment(first_index, last, &mut recovery, &mut visit, &mut bytes)?;
        }
        recovery.segments = log.segments.len();
        if let Some(segment) = log.segments.last() {
            log.next_index = segment.first_index + segment.offsets.len() as u64;
        }
        if recovery.torn_bytes_cut > 0 || recovery.corrupt_entries > 0 || recovery.corrupt_bytes > 0 {
            warn!(?recovery, dir = %dir.display(), "log recovery found damage");
        } else {
            info!(entries = recovery.entries, segments = recovery.segments, dir = %dir.display(), "log recovered");
        }
        Ok((log, recovery))
    }

    fn recover_segment(
        &mut self,
        first_index: u64,
        last: bool,
        recovery: &mut Recovery,
        visit: &mut dyn FnMut(u64, u64, &[u8]),
        buffer: &mut Vec<u8>,
    ) -> Result<(), StorageError> {
        let path = self.dir.join(segment_name(first_index));
        let file: Arc<dyn StorageFile> =
            self.backend.open(&path, false).map_err(|e| StorageError::io(&path, e))?.into();
        let file_len = file.size().map_err(|e| StorageError::io(&path, e))?;
        let mapped = if file_len > 0 { file.map().filter(|m| m.len() as u64 == file_len) } else { None };
        let bytes: &[u8] = match &mapped {
            Some(map) => map,
            None => {
                buffer.resize(crate::usize_of(file_len), 0);
                file.read_exact_at(buffer, 0).map_err(|e| StorageError::io(&path, e))?;
                buffer
            }
        };
        let header_ok =
            bytes.len() as u64 >= SEGMENT_HEADER && &bytes[..8] == MAGIC && bytes[8..16] == first_index.to_le_bytes();
        if !header_ok {
            if last && (bytes.len() as u64) < SEGMENT_HEADER {
                // Created, header not yet durable: an empty segment.
                recovery.torn_bytes_cut += bytes.len() as u64;
                self.backend.remove(&path).map_err(|e| StorageError::io(&path, e))?;
                self.backend.sync_dir(&self.dir).map_err(|e| StorageError::io(&self.dir, e))?;
                return Ok(());
            }
            warn!(segment = %path.display(), "segment header is damaged; skipping the segment");
            recovery.corrupt_bytes += bytes.len() as u64;
            return Ok(());
        }
        let mut offsets = Vec::new();
        let mut at = SEGMENT_HEADER_LEN;
        let mut expected = first_index;
        let mut valid_end = at;
        while at < bytes.len() {
            let Some(h) = header_at(bytes, at) else { break };
            let end = at + RECORD_HEADER + h.len;
            if h.index != expected || end > bytes.len() {
                break;
            }
            let payload = &bytes[at + RECORD_HEADER..end];
            if checksum(h.index, h.term, payload) == h.crc {
                // Never written past the cap (`append`); a larger file is
                // not ours, and its rest counts as damaged.
                let Ok(offset) = u32::try_from(at) else { break };
                offsets.push(offset);
                recovery.entries += 1;
                visit(h.index, h.term, payload);
            } else {
                // A damaged record. At the very end of the last segment it is
                // a torn write; elsewhere it is corruption: skip it, keep going.
                if last && !valid_at(bytes, end, expected + 1) {
                    break;
                }
                warn!(segment = %path.display(), offset = at, index = h.index, "corrupt record skipped");
                recovery.corrupt_entries += 1;
                offsets.push(MISSING);
            }
            expected += 1;
            at = end;
            valid_end = end;
        }
        let total = bytes.len();
        // Unmapped before the file may be truncated.
        drop(mapped);
        if valid_end < total {
            let rest = (total - valid_end) as u64;
            if last {
                recovery.torn_bytes_cut += rest;
                file.set_len(valid_end as u64).map_err(|e| StorageError::io(&path, e))?;
                file.sync().map_err(|e| StorageError::io(&path, e))?;
            } else {
                warn!(segment = %path.display(), offset = valid_end, bytes = rest, "unreadable bytes after the last valid record");
                recovery.corrupt_bytes += rest;
            }
        }
        self.segments.push(Segment { first_index, path, file, len: valid_end as u64, offsets, dirty: false });
        Ok(())
    }

    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    pub fn first_index(&self) -> u64 {
        self.segments.first().map_or(self.next_index, |s| s.first_index)
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub fn segment_bytes_max(&self) -> u64 {
        self.options.segment_bytes_max
    }

    fn poison<T>(&mut self, error: StorageError) -> Result<T, StorageError> {
        self.poisoned = true;
        tracing::error!(%error, "storage write failed: the log is poisoned, nothing more will be confirmed");
        Err(error)
    }

    fn start_segment(&mut self) -> Result<(), StorageError> {
        let path = self.dir.join(segment_name(self.next_index));
        let file: Arc<dyn StorageFile> = match self.backend.open(&path, true) {
            Ok(file) => file.into(),
            Err(e) => return self.poison(StorageError::io(&path, e)),
        };
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&self.next_index.to_le_bytes());
        if let Err(e) = file.write_all_at(&header, 0) {
            return self.poison(StorageError::io(&path, e));
        }
        self.segments.push(Segment {
            first_index: self.next_index,
            path,
            file,
            len: SEGMENT_HEADER,
            offsets: Vec::new(),
            dirty: true,
        });
        self.dir_dirty = true;
        Ok(())
    }

    /// Writes entries (not yet durable); returns the index of the first.
    pub fn append<'a>(&mut self, term: u64, payloads: impl IntoIterator<Item = &'a [u8]>) -> Result<u64, StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        let segment_max = self.options.segment_bytes_max.min(SEGMENT_BYTES_CAP);
        let needs_segment = self.segments.last().is_none_or(|s| s.len >= segment_max);
        if needs_segment {
            self.start_segment()?;
        }
        let first = self.next_index;
        let mut buf = Vec::new();
        let mut index = first;
        let Some(segment) = self.segments.last_mut() else {
            return Err(StorageError::Poisoned);
        };
        let base = segment.len;
        let mut offsets = Vec::new();
        for payload in payloads {
            // A segment's offsets are 32-bit (4 bytes per entry in memory):
            // segments are capped well below that, and a batch that would
            // still cross it is refused rather than truncated.
            let offset = base + buf.len() as u64;
            let Ok(offset) = u32::try_from(offset) else {
                return Err(StorageError::BatchTooLarge(offset - base));
            };
            offsets.push(offset);
            encode_record(&mut buf, index, term, payload);
            index += 1;
        }
        if buf.is_empty() {
            return Ok(first);
        }
        if let Err(e) = segment.file.write_all_at(&buf, base) {
            let path = segment.path.clone();
            return self.poison(StorageError::io(&path, e));
        }
        segment.len += buf.len() as u64;
        segment.offsets.extend(offsets);
        segment.dirty = true;
        self.next_index = index;
        Ok(first)
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        let plan = self.prepare_sync()?;
        let result = plan.run();
        self.finish_sync(plan, result)
    }

    /// What a sync must fsync, taken under the caller's lock so the fsyncs
    /// themselves can run without it (reads go on meanwhile).
    pub fn prepare_sync(&mut self) -> Result<SyncPlan, StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        let files = self.segments.iter().filter(|s| s.dirty).map(|s| (s.path.clone(), s.file.clone())).collect();
        let dir = self.dir_dirty.then(|| (self.backend.clone(), self.dir.clone()));
        Ok(SyncPlan { files, dir, first_index_after: self.next_index })
    }

    /// Records the outcome of a plan: segments clean on success, the log
    /// poisoned on failure.
    pub fn finish_sync(&mut self, plan: SyncPlan, result: Result<(), StorageError>) -> Result<(), StorageError> {
        match result {
            Ok(()) => {
                for segment in self.segments.iter_mut() {
                    if plan.files.iter().any(|(path, _)| *path == segment.path) {
                        // Only clean if nothing was appended since the plan.
                        let last = segment.last_index().unwrap_or(0);
                        if last < plan.first_index_after {
                            segment.dirty = false;
                        }
                    }
                }
                if plan.dir.is_some() {
                    self.dir_dirty = false;
                }
                Ok(())
            }
            Err(error) => self.poison(error),
        }
    }

    fn locate(&self, index: u64) -> Option<(&Segment, u32)> {
        let position = self.segments.partition_point(|s| s.first_index <= index).checked_sub(1)?;
        let segment = &self.segments[position];
        let offset = *segment.offsets.get(usize::try_from(index - segment.first_index).ok()?)?;
        (offset != MISSING).then_some((segment, offset))
    }

    /// Reads one entry, verifying its checksum.
    pub fn read(&self, index: u64) -> Result<Entry, StorageError> {
        let (segment, offset) = self.locate(index).ok_or(StorageError::Missing(index))?;
        let mut header = [0u8; RECORD_HEADER];
        segment.file.read_exact_at(&mut header, u64::from(offset)).map_err(|e| StorageError::io(&segment.path, e))?;
        let h = header_at(&header, 0).ok_or(StorageError::Missing(index))?;
        let mut payload = vec![0u8; h.len];
        segment
            .file
            .read_exact_at(&mut payload, u64::from(offset) + RECORD_HEADER as u64)
            .map_err(|e| StorageError::io(&segment.path, e))?;
        if h.index != index || checksum(h.index, h.term, &payload) != h.crc {
            return Err(StorageError::Corrupted {
                segment: segment.path.clone(),
                offset: u64::from(offset),
                what: format!("entry {index} fails its checksum"),
            });
        }
        Ok(Entry { index, term: h.term, payload })
    }

    /// Calls `visit` for every readable entry from `from` on, in order, one
    /// segment read at a time. Corrupt entries are skipped (and were counted
    /// at recovery).
    pub fn scan(&self, from: u64, mut visit: impl FnMut(Entry)) -> Result<(), StorageError> {
        for segment in &self.segments {
            if segment.last_index().is_none_or(|last| last < from) {
                continue;
            }
            let mut bytes = vec![0u8; crate::usize_of(segment.len)];
            segment.file.read_exact_at(&mut bytes, 0).map_err(|e| StorageError::io(&segment.path, e))?;
            for (i, &offset) in segment.offsets.iter().enumerate() {
                let index = segment.first_index + i as u64;
                if index < from || offset == MISSING {
                    continue;
                }
                let at = offset as usize;
                let Some(h) = header_at(&bytes, at) else { continue };
                let Some(payload) = bytes.get(at + RECORD_HEADER..at + RECORD_HEADER + h.len) else { continue };
                if h.index != index || checksum(h.index, h.term, payload) != h.crc {
                    warn!(segment = %segment.path.display(), index, "entry changed on disk since recovery; skipped");
                    continue;
                }
                visit(Entry { index, term: h.term, payload: payload.to_vec() });
            }
        }
        Ok(())
    }

    /// Removes every entry from `from` on (Raft's conflicting suffix).
    pub fn truncate_suffix(&mut self, from: u64) -> Result<(), StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        while let Some(segment) = self.segments.last() {
            if segment.first_index < from {
                break;
            }
            let path = segment.path.clone();
            self.segments.pop();
            if let Err(e) = self.backend.remove(&path) {
                return self.poison(StorageError::io(&path, e));
            }
            self.dir_dirty = true;
        }
        if let Some(segment) = self.segments.last_mut() {
            let keep = usize::try_from(from.saturating_sub(segment.first_index))
                .map_or(segment.offsets.len(), |k| k.min(segment.offsets.len()));
            if keep < segment.offsets.len() {
                let cut =
                    segment.offsets[keep..].iter().find(|o| **o != MISSING).copied().map_or(segment.len, u64::from);
                segment.offsets.truncate(keep);
                if let Err(e) = segment.file.set_len(cut) {
                    let path = segment.path.clone();
                    return self.poison(StorageError::io(&path, e));
                }
                segment.len = cut;
                segment.dirty = true;
            }
        }
        self.next_index = from.min(self.next_index).max(self.first_index());
        if self.segments.is_empty() {
            self.next_index = from;
        }
        self.sync()
    }

    /// Deletes whole segments holding only entries below `before`. The active
    /// segment is never deleted. Returns the number of segments removed.
    pub fn purge_prefix(&mut self, before: u64) -> Result<usize, StorageError> {
        let detached = self.detach_prefix(before);
        let count = detached.paths.len();
        match detached.remove() {
            Ok(()) => Ok(count),
            Err(error) => self.poison(error),
        }
    }

    /// The first half of [`Log::purge_prefix`]: forgets the segments that
    /// hold only entries below `before`, returning their files for
    /// [`Detached::remove`], which the caller runs without holding the log
    /// (deleting files and syncing the directory must not stall appends).
    pub fn detach_prefix(&mut self, before: u64) -> Detached {
        let mut paths = Vec::new();
        while self.segments.len() > 1 && self.segments[1].first_index <= before {
            paths.push(self.segments.remove(0).path);
        }
        Detached { backend: self.backend.clone(), dir: self.dir.clone(), paths }
    }

    /// Marks the log failed after a [`Detached::remove`] error.
    pub fn poison_with(&mut self, error: StorageError) -> StorageError {
        match self.poison::<()>(error) {
            Err(error) => error,
            Ok(()) => StorageError::Poisoned,
        }
    }

    /// The segment an index lives in, by its first index (for liveness
    /// accounting by the caller).
    pub fn segment_of(&self, index: u64) -> Option<u64> {
        let position = self.segments.partition_point(|s| s.first_index <= index).checked_sub(1)?;
        Some(self.segments[position].first_index)
    }

    /// First indices of all segments, oldest first.
    pub fn segment_starts(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.first_index).collect()
    }
}

/// Segment files the log no longer uses, to delete.
pub struct Detached {
    backend: Arc<dyn Backend>,
    dir: PathBuf,
    paths: Vec<PathBuf>,
}

impl Detached {
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Deletes the files one at a time, oldest first, each made durable
    /// before the next, so a crash never leaves an older segment back
    /// without the newer ones.
    pub fn remove(&self) -> Result<(), StorageError> {
        for path in &self.paths {
            self.backend
                .remove(path)
                .and_then(|_| self.backend.sync_dir(&self.dir))
                .map_err(|e| StorageError::io(path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Faults, SimBackend};

    fn open(sim: &SimBackend, segment_bytes_max: u64) -> (Log, Recovery) {
        Log::open(Arc::new(sim.clone()), Path::new("/data/log"), LogOptions { segment_bytes_max }).unwrap()
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("entry-{i}-{}", "x".repeat((i % 37) as usize)).into_bytes()
    }

    fn all(log: &Log) -> Vec<Entry> {
        let mut out = Vec::new();
        log.scan(0, |e| out.push(e)).unwrap();
        out
    }

    #[test]
    fn append_sync_reopen_read_across_segments() {
        let sim = SimBackend::new();
        let (mut log, recovery) = open(&sim, 256);
        assert_eq!(recovery, Recovery::default());
        for batch in 0..20u64 {
            let payloads: Vec<Vec<u8>> = (0..5).map(|i| payload(batch * 5 + i + 1)).collect();
            let first = log.append(3, payloads.iter().map(Vec::as_slice)).unwrap();
            assert_eq!(first, batch * 5 + 1);
        }
        log.sync().unwrap();
        assert!(log.segment_count() > 3);
        assert_eq!(log.read(42).unwrap().payload, payload(42));
        sim.power_cut();
        let (log, recovery) = open(&sim, 256);
        assert_eq!(recovery.entries, 100);
        assert_eq!(log.next_index(), 101);
        let entries = all(&log);
        assert_eq!(entries.len(), 100);
        assert!(entries.iter().all(|e| e.term == 3 && e.payload == payload(e.index)));
    }

    /// What a log that outlives a power cut (the process running on) may
    /// do: with the disk back on at once, an append lands at its old
    /// length past a hole, and its sync succeeds although recovery cannot
    /// reach it. A cut that stays off refuses both.
    #[test]
    fn a_log_that_outlives_a_power_cut_cannot_make_anything_durable() {
        let sim = SimBackend::new();
        let (mut log, _) = open(&sim, 1 << 20);
        log.append(1, [b"durable".as_slice()]).unwrap();
        log.sync().unwrap();
        log.append(1, [b"lost".as_slice()]).unwrap();
        sim.power_cut();
        log.append(1, [b"past a hole".as_slice()]).unwrap();
        log.sync().unwrap();
        let (_, recovery) = open(&sim, 1 << 20);
        assert_eq!(recovery.entries, 1, "synced after the cut, yet not recovered");

        let sim = SimBackend::new();
        let (mut log, _) = open(&sim, 1 << 20);
        log.append(1, [b"durable".as_slice()]).unwrap();
        log.sync().unwrap();
        log.append(1, [b"lost".as_slice()]).unwrap();
        sim.power_cut_and_stay_off();
        assert!(log.append(1, [b"refused".as_slice()]).is_err() || log.sync().is_err());
        sim.set_faults(Faults::default());
        let (_, recovery) = open(&sim, 1 << 20);
        assert_eq!(recovery.entries, 1);
    }

    #[test]
    fn unsynced_entries_vanish_and_torn_tails_are_cut() {
        let sim = SimBackend::new();
        let (mut log, _) = open(&sim, 1 << 20);
        log.append(1, [b"durable".as_slice()]).unwrap();
        log.sync().unwrap();
        log.append(1, [b"lost-1".as_slice(), b"lost-2".as_slice()]).unwrap();
        // Keep 10 bytes of the unsynced tail: less than one record.
        sim.power_cut_with(|unsynced| unsynced.min(10));
        let (mut log, recovery) = open(&sim, 1 << 20);
        assert_eq!(recovery.entries, 1);
        assert!(recovery.torn_bytes_cut > 0);
        assert_eq!(log.next_index(), 2);
        log.append(1, [b"after".as_slice()]).unwrap();
        log.sync().unwrap();
        let (log, recovery) = open(&sim, 1 << 20);
        assert_eq!(recovery.torn_bytes_cut, 0);
        assert_eq!(
            all(&log).iter().map(|e| e.payload.clone()).collect::<Vec<_>>(),
            vec![b"durable".to_vec(), b"after".to_vec()]
        );
    }

    #[test]
    fn bit_flips_are_detected_and_never_served() {
        let sim = SimBackend::new();
        let (mut log, _) = open(&sim, 1 << 20);
        log.append(1, (1..=10u64).map(payload).collect::<Vec<_>>().iter().map(Vec::as_slice)).unwrap();
        log.sync().unwrap();
        let path = Path::new("/data/log").join(segment_name(1));
        // Flip a bit inside the payload of entry 4.
        let (_, offset) = log.locate(4).unwrap();
        sim.flip_bit(&path, offset as usize + RECORD_HEADER + 2, 3);
        let (log, recovery) = open(&sim, 1 << 20);
        assert_eq!(recovery.corrupt_entries, 1);
        assert_eq!(recovery.entries, 9);
        assert!(matches!(log.read(4), Err(StorageError::Missing(4))));
        let indices: Vec<u64> = all(&log).iter().map(|e| e.index).collect();
        assert_eq!(indices, vec![1, 2, 3, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn truncate_suffix_and_purge_prefix() {
        let sim = SimBackend::new();
        let (mut log, _) = open(&sim, 200);
        for i in 1..=60u64 {
            log.append(1, [payload(i).as_slice()]).unwrap();
        }
        log.sync().unwrap();
        let segments = log.segment_count();
        log.truncate_suffix(41).unwrap();
        assert_eq!(log.next_index(), 41);
        assert!(log.read(41).is_err());
        assert_eq!(log.read(40).unwrap().payload, payload(40));
        let removed = log.purge_prefix(30).unwrap();
        assert!(removed > 0 && log.segment_count() < segments);
        assert!(log.first_index() <= 30);
        sim.power_cut();
        let (log, _) = open(&sim, 200);
        assert_eq!(log.next_index(), 41);
        assert_eq!(log.read(35).unwrap().payload, payload(35));
    }

    #[test]
    fn a_failed_fsync_poisons_the_log() {
        let sim = SimBackend::new();
        let (mut log, _) = open(&sim, 1 << 20);
        log.append(1, [b"a".as_slice()]).unwrap();
        sim.set_faults(Faults { fail_syncs: true, ..Faults::default() });
        assert!(log.sync().is_err());
        sim.set_faults(Faults::default());
        assert!(matches!(log.sync(), Err(StorageError::Poisoned)), "never retry an fsync and then report success");
        assert!(matches!(log.append(1, [b"b".as_slice()]), Err(StorageError::Poisoned)));
    }

    /// Crash after every write/sync point of a workload: whatever was
    /// reported synced before the crash is there after it, nothing else is
    /// invented, and reopening always works.
    #[test]
    fn crash_point_sweep_loses_no_synced_entry() {
        // Learn how many operations the workload takes.
        let workload = |log: &mut Log, synced: &mut u64| -> Result<(), StorageError> {
            for batch in 0..12u64 {
                let payloads: Vec<Vec<u8>> = (0..3).map(|i| payload(batch * 3 + i + 1)).collect();
                log.append(1, payloads.iter().map(Vec::as_slice))?;
                if batch % 2 == 1 {
                    log.sync()?;
                    *synced = log.next_index() - 1;
                }
            }
            log.purge_prefix(10)?;
            Ok(())
        };
        let probe = SimBackend::new();
        let (mut log, _) = open(&probe, 300);
        let mut synced = 0;
        workload(&mut log, &mut synced).unwrap();
        let total_ops = probe.ops();
        assert!(total_ops > 20);
        for crash_at in 0..=total_ops {
            for torn in [0usize, 1, 7] {
                let sim = SimBackend::new();
                let (mut log, _) = open(&sim, 300);
                sim.set_faults(Faults { crash_after_ops: Some(sim.ops() + crash_at), ..Faults::default() });
                let mut synced = 0;
                let _ = workload(&mut log, &mut synced);
                drop(log);
                sim.power_cut_with(|unsynced| unsynced.min(torn * 13));
                let (log, _) = open(&sim, 300);
                let entries = all(&log);
                for e in &entries {
                    assert_eq!(e.payload, payload(e.index), "crash at {crash_at}: entry {} altered", e.index);
                }
                let present: std::collections::BTreeSet<u64> = entries.iter().map(|e| e.index).collect();
                let floor = log.first_index();
                for index in floor.max(1)..=synced {
                    assert!(present.contains(&index), "crash at {crash_at} torn {torn}: synced entry {index} lost");
                }
            }
        }
    }
}
