//! The spill: append-only files, never fsynced, for message bodies that
//! need not survive a restart (transient messages, non-durable queues) but
//! do not fit in memory. It is emptied when opened: whatever a previous run
//! left is gone, as its messages are.
//!
//! A body is written once, read back once (its queue then holds it in
//! memory until it is acknowledged) and released. A segment file is deleted
//! once every body in it was released. Appends are buffered, so a burst
//! costs one `write` per megabyte, not one per message.
//!
//! A reference packs the segment and the offset into a `u64` with
//! [`SPILL_FLAG`] set, so a queue keeps it where it keeps a log index for a
//! paged durable message (a few bytes per message), and tells them apart by
//! the flag.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backend::{Backend, StorageFile};
use crate::error::StorageError;

/// Set in every spill reference; never in a log index (which stays far
/// below 2^56).
pub const SPILL_FLAG: u64 = 1 << 62;
const SEGMENT_SHIFT: u32 = 32;
/// Appends are written out once this much is buffered.
const BUFFER_BYTES: usize = 1 << 20;

/// Whether `reference` points into the spill (not the log).
pub fn is_spilled(reference: u64) -> bool {
    reference & SPILL_FLAG != 0
}

struct Segment {
    file: Arc<dyn StorageFile>,
    /// Bodies in it not yet released.
    live: u64,
    /// Bytes written to the file (the buffer comes after).
    written: u64,
}

struct Inner {
    segments: BTreeMap<u32, Segment>,
    current: u32,
    /// Appended to the current segment, not yet written; starts at its
    /// `written` offset.
    buffer: Vec<u8>,
    /// Bytes of every segment file, written or buffered.
    bytes: u64,
    live: u64,
}

pub struct Spill {
    dir: PathBuf,
    backend: Arc<dyn Backend>,
    segment_bytes: u64,
    inner: Mutex<Inner>,
}

/// What the spill holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpillStats {
    pub bytes: u64,
    pub segments: usize,
    pub live: u64,
}

impl Spill {
    /// Opens the spill in `dir`, deleting what a previous run left there.
    /// Segments hold up to `segment_bytes` (at most 4 GiB: offsets are
    /// 32-bit).
    pub fn open(backend: Arc<dyn Backend>, dir: &Path, segment_bytes: u64) -> Result<Spill, StorageError> {
        let io = |source| StorageError::Io { path: dir.to_path_buf(), source };
        backend.create_dir_all(dir).map_err(io)?;
        for name in backend.list(dir).map_err(io)? {
            backend.remove(&dir.join(&name)).map_err(io)?;
        }
        let segment_bytes = segment_bytes.clamp(64 * 1024, u64::from(u32::MAX));
        let spill = Spill {
            dir: dir.to_path_buf(),
            backend,
            segment_bytes,
            inner: Mutex::new(Inner { segments: BTreeMap::new(), current: 0, buffer: Vec::new(), bytes: 0, live: 0 }),
        };
        spill.start_segment(&mut spill.inner.lock(), 1)?;
        Ok(spill)
    }

    fn path(&self, segment: u32) -> PathBuf {
        self.dir.join(format!("{segment:010}.spill"))
    }

    fn start_segment(&self, inner: &mut Inner, segment: u32) -> Result<(), StorageError> {
        let path = self.path(segment);
        let file = self.backend.open(&path, true).map_err(|source| StorageError::Io { path, source })?;
        inner.segments.insert(segment, Segment { file: Arc::from(file), live: 0, written: 0 });
        inner.current = segment;
        Ok(())
    }

    /// Writes out the buffer of the current segment.
    fn write_buffer(&self, inner: &mut Inner) -> Result<(), StorageError> {
        if inner.buffer.is_empty() {
            return Ok(());
        }
        let current = inner.current;
        let Some(segment) = inner.segments.get_mut(&current) else { return Ok(()) };
        segment.file.write_all_at(&inner.buffer, segment.written).map_err(|source| {
            let path = self.path(current);
            if source.raw_os_error() == Some(28) {
                StorageError::NoSpace { path }
            } else {
                StorageError::Io { path, source }
            }
        })?;
        segment.written += inner.buffer.len() as u64;
        inner.buffer.clear();
        Ok(())
    }

    /// Stores `body`; returns its reference. On a write error (disk full)
    /// nothing is kept and the caller keeps the body in memory.
    pub fn append(&self, body: &[u8]) -> Result<u64, StorageError> {
        let len = u32::try_from(body.len()).map_err(|_| StorageError::BatchTooLarge(body.len() as u64))?;
        let record = 4 + u64::from(len);
        let mut inner = self.inner.lock();
        let end =
            |inner: &Inner| inner.segments.get(&inner.current).map_or(0, |s| s.written) + inner.buffer.len() as u64;
        if end(&inner) > 0 && end(&inner) + record > self.segment_bytes {
            self.write_buffer(&mut inner)?;
            let next = inner.current + 1;
            self.start_segment(&mut inner, next)?;
            // The old one may already be empty.
            self.drop_if_empty(&mut inner, next - 1);
        }
        let offset = end(&inner);
        inner.buffer.extend_from_slice(&len.to_le_bytes());
        inner.buffer.extend_from_slice(body);
        if inner.buffer.len() >= BUFFER_BYTES {
            if let Err(error) = self.write_buffer(&mut inner) {
                // Forget this body's bytes; earlier ones stay buffered.
                let keep = inner.buffer.len() - crate::usize_of(record);
                inner.buffer.truncate(keep);
                return Err(error);
            }
        }
        let current = inner.current;
        if let Some(segment) = inner.segments.get_mut(&current) {
            segment.live += 1;
        }
        inner.bytes += record;
        inner.live += 1;
        Ok(SPILL_FLAG | u64::from(current) << SEGMENT_SHIFT | offset)
    }

    fn locate(reference: u64) -> (u32, u64) {
        let segment = u32::try_from((reference & !SPILL_FLAG) >> SEGMENT_SHIFT).unwrap_or(u32::MAX);
        (segment, reference & u64::from(u32::MAX))
    }

    /// The body stored at `reference`.
    pub fn read(&self, reference: u64) -> Result<Vec<u8>, StorageError> {
        let (segment, offset) = Self::locate(reference);
        let inner = self.inner.lock();
        let path = || self.path(segment);
        let Some(found) = inner.segments.get(&segment) else {
            return Err(StorageError::Missing(reference));
        };
        if segment == inner.current && offset >= found.written {
            // Still in the buffer.
            let at = crate::usize_of(offset - found.written);
            let len_bytes: [u8; 4] =
                inner.buffer.get(at..at + 4).and_then(|b| b.try_into().ok()).ok_or(StorageError::Missing(reference))?;
            let len = u32::from_le_bytes(len_bytes) as usize;
            return inner.buffer.get(at + 4..at + 4 + len).map(<[u8]>::to_vec).ok_or(StorageError::Missing(reference));
        }
        let file = found.file.clone();
        drop(inner);
        let mut len_bytes = [0u8; 4];
        file.read_exact_at(&mut len_bytes, offset).map_err(|source| StorageError::Io { path: path(), source })?;
        let mut body = vec![0u8; u32::from_le_bytes(len_bytes) as usize];
        file.read_exact_at(&mut body, offset + 4).map_err(|source| StorageError::Io { path: path(), source })?;
        Ok(body)
    }

    /// The body at `reference` is no longer needed; its segment goes once
    /// none of its bodies is.
    pub fn release(&self, reference: u64) {
        let (segment, _) = Self::locate(reference);
        let mut inner = self.inner.lock();
        let Some(found) = inner.segments.get_mut(&segment) else { return };
        found.live = found.live.saturating_sub(1);
        inner.live = inner.live.saturating_sub(1);
        self.drop_if_empty(&mut inner, segment);
    }

    fn drop_if_empty(&self, inner: &mut Inner, segment: u32) {
        if segment == inner.current || inner.segments.get(&segment).is_none_or(|s| s.live > 0) {
            return;
        }
        if let Some(gone) = inner.segments.remove(&segment) {
            inner.bytes = inner.bytes.saturating_sub(gone.written);
            if let Err(error) = self.backend.remove(&self.path(segment)) {
                tracing::warn!(segment, %error, "an emptied spill segment could not be removed");
            }
        }
    }

    pub fn stats(&self) -> SpillStats {
        let inner = self.inner.lock();
        SpillStats { bytes: inner.bytes, segments: inner.segments.len(), live: inner.live }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Faults, SimBackend};

    fn spill(segment_bytes: u64) -> (Arc<SimBackend>, Spill) {
        let disk = Arc::new(SimBackend::new());
        let spill = Spill::open(disk.clone(), Path::new("/spill"), segment_bytes).unwrap();
        (disk, spill)
    }

    #[test]
    fn bodies_come_back_from_the_buffer_and_from_the_files_across_segments() {
        let (_, spill) = spill(64 * 1024);
        let bodies: Vec<Vec<u8>> = (0..400u32).map(|i| vec![(i % 251) as u8; 300 + i as usize]).collect();
        let refs: Vec<u64> = bodies.iter().map(|b| spill.append(b).unwrap()).collect();
        assert!(refs.iter().all(|r| is_spilled(*r)));
        assert!(spill.stats().segments > 2, "{:?}", spill.stats());
        for (r, body) in refs.iter().zip(&bodies) {
            assert_eq!(&spill.read(*r).unwrap(), body);
        }
    }

    #[test]
    fn a_segment_is_deleted_once_all_its_bodies_are_released() {
        let (disk, spill) = spill(64 * 1024);
        let refs: Vec<u64> = (0..300).map(|_| spill.append(&[7u8; 1000]).unwrap()).collect();
        let before = spill.stats();
        assert!(before.segments >= 4);
        for r in &refs {
            spill.release(*r);
        }
        let after = spill.stats();
        assert_eq!((after.segments, after.live), (1, 0), "only the current segment stays");
        assert_eq!(disk.list(Path::new("/spill")).unwrap().len(), 1);
    }

    #[test]
    fn opening_discards_a_previous_runs_pages() {
        let disk = Arc::new(SimBackend::new());
        let first = Spill::open(disk.clone(), Path::new("/spill"), 64 * 1024).unwrap();
        for _ in 0..200 {
            first.append(&[1u8; 1000]).unwrap();
        }
        drop(first);
        let second = Spill::open(disk.clone(), Path::new("/spill"), 64 * 1024).unwrap();
        assert_eq!(second.stats(), SpillStats { bytes: 0, segments: 1, live: 0 });
        assert_eq!(disk.list(Path::new("/spill")).unwrap().len(), 1);
    }

    #[test]
    fn a_full_disk_refuses_the_append_and_keeps_what_was_stored() {
        let (disk, spill) = spill(64 * 1024);
        let kept = spill.append(b"kept").unwrap();
        disk.set_faults(Faults { capacity_bytes: Some(2 * 1024 * 1024), ..Faults::default() });
        let mut refused = false;
        for _ in 0..5000 {
            if spill.append(&[9u8; 4096]).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "the disk filled up");
        assert_eq!(spill.read(kept).unwrap(), b"kept");
    }
}
