//! A stream's own append-only log: numbered records in chunks, chunks in
//! segment files named by their first offset. Unlike the shared log, it is
//! read many times (every consumer reads from its own offset) and trimmed
//! by size or age a whole segment at a time, never by acknowledgement.
//!
//! A chunk is what one append wrote (a batch of records with one
//! timestamp), little-endian:
//! `magic:u32 crc:u32 first:u64 count:u32 payload_len:u32 timestamp:i64
//! filters_len:u32 reserved:u32`, then `payload_len` bytes: the chunk's
//! distinct filter values (`len:u8 value`, `filters_len` bytes in all), then
//! its records (`len:u32 bytes`). `crc` (CRC-32) covers everything after
//! itself, so a torn chunk is found at open and cut off. A reader with a
//! filter reads a chunk's header and filter values and skips the records of
//! a chunk that has none of its values.
//!
//! Appends write into the page cache at once (readers see them); making
//! them durable is separate ([`StreamLog::take_unsynced`]), so one fsync
//! covers many appends and the caller decides when to confirm.
//!
//! Memory: a sparse index of (offset, timestamp, position) per segment, one
//! entry per `index_every` bytes written, so a gigabyte retained costs a
//! few hundred kilobytes however small the records.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{Backend, StorageFile};
use crate::error::StorageError;

const MAGIC: u32 = 0x5753_4331;
pub const CHUNK_HEADER: usize = 40;
const RECORD_HEADER: usize = 4;

/// Limits of one stream's log.
#[derive(Clone, Copy, Debug)]
pub struct StreamOptions {
    /// A segment is closed once it holds this many bytes (a chunk larger
    /// than that gets a segment of its own).
    pub max_segment_bytes: u64,
    /// Bytes between two entries of the sparse index.
    pub index_every: u64,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions { max_segment_bytes: 500_000_000, index_every: 64 * 1024 }
    }
}

/// What opening a stream's log found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamRecovery {
    pub segments: usize,
    pub chunks: u64,
    pub records: u64,
    /// Bytes cut off the end (a torn or corrupt tail).
    pub truncated_bytes: u64,
}

#[derive(Clone, Copy, Debug)]
struct IndexEntry {
    offset: u64,
    timestamp: i64,
    position: u64,
}

struct Segment {
    first_offset: u64,
    path: PathBuf,
    file: Arc<dyn StorageFile>,
    len: u64,
    /// One entry per `index_every` bytes; the first is the segment's first
    /// chunk (a segment without chunks has none).
    index: Vec<IndexEntry>,
    /// Timestamp of the segment's last chunk.
    last_timestamp: i64,
    next_offset: u64,
}

/// A chunk's header, as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub first: u64,
    pub count: u32,
    pub payload_len: u32,
    pub timestamp: i64,
    pub filters_len: u32,
}

impl ChunkHeader {
    fn parse(bytes: &[u8]) -> Option<(ChunkHeader, u32)> {
        let h = bytes.get(..CHUNK_HEADER)?;
        let u32_at = |at: usize| h.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
        let u64_at = |at: usize| h.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        if u32_at(0)? != MAGIC {
            return None;
        }
        let header = ChunkHeader {
            first: u64_at(8)?,
            count: u32_at(16)?,
            payload_len: u32_at(20)?,
            timestamp: i64::from_le_bytes(h.get(24..32)?.try_into().ok()?),
            filters_len: u32_at(32)?,
        };
        (header.filters_len <= header.payload_len).then_some((header, u32_at(4)?))
    }

    fn size(&self) -> u64 {
        CHUNK_HEADER as u64 + u64::from(self.payload_len)
    }

    fn end_offset(&self) -> u64 {
        self.first + u64::from(self.count)
    }
}

/// Where a reader stands: the chunk holding `offset` starts at `position`
/// of the segment that begins at `segment`. Lets a reader carry on without
/// searching; stale once retention removed the segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCursor {
    segment: u64,
    position: u64,
    /// First offset of the chunk at `position`.
    chunk_first: u64,
}

impl StreamCursor {
    /// The cursor as plain numbers, for a caller that keeps it opaque.
    pub fn to_parts(&self) -> [u64; 3] {
        [self.segment, self.position, self.chunk_first]
    }

    pub fn from_parts(parts: [u64; 3]) -> StreamCursor {
        StreamCursor { segment: parts[0], position: parts[1], chunk_first: parts[2] }
    }
}

/// One record handed to a reader.
pub struct StreamRecord<'a> {
    pub offset: u64,
    pub timestamp: i64,
    pub bytes: &'a [u8],
}

/// Files written since the last sync; sync them (outside any lock) to make
/// every append before [`StreamLog::take_unsynced`] durable.
#[derive(Default)]
pub struct Unsynced {
    files: Vec<(PathBuf, Arc<dyn StorageFile>)>,
    dir: Option<(Arc<dyn Backend>, PathBuf)>,
}

impl Unsynced {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dir.is_none()
    }

    pub fn sync(&self) -> Result<(), StorageError> {
        for (path, file) in &self.files {
            file.sync().map_err(|e| StorageError::io(path, e))?;
        }
        if let Some((backend, dir)) = &self.dir {
            backend.sync_dir(dir).map_err(|e| StorageError::io(dir, e))?;
        }
        Ok(())
    }
}

pub struct StreamLog {
    backend: Arc<dyn Backend>,
    dir: PathBuf,
    options: StreamOptions,
    segments: Vec<Segment>,
    next_offset: u64,
    last_chunk: Option<u64>,
    /// Bytes in every segment.
    bytes: u64,
    /// First offset of the oldest segment written since the last
    /// `take_unsynced` (several may have rolled in between).
    dirty_from: Option<u64>,
    /// A segment was created or removed since the last `take_unsynced`.
    dir_dirty: bool,
    /// A write failed: nothing more is appended.
    poisoned: bool,
    scratch: Vec<u8>,
}

fn segment_name(first_offset: u64) -> String {
    format!("{first_offset:020}.seg")
}

fn crc_of(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

impl StreamLog {
    /// Opens (or creates) the stream's log in `dir`; a torn or corrupt
    /// tail is cut off, and so is everything after it.
    pub fn open(
        backend: Arc<dyn Backend>,
        dir: &Path,
        options: StreamOptions,
    ) -> Result<(StreamLog, StreamRecovery), StorageError> {
        backend.create_dir_all(dir).map_err(|e| StorageError::io(dir, e))?;
        let mut firsts: Vec<u64> = backend
            .list(dir)
            .map_err(|e| StorageError::io(dir, e))?
            .iter()
            .filter_map(|name| name.strip_suffix(".seg")?.parse().ok())
            .collect();
        firsts.sort_unstable();
        let mut log = StreamLog {
            backend: backend.clone(),
            dir: dir.to_path_buf(),
            options,
            segments: Vec::new(),
            next_offset: 0,
            last_chunk: None,
            bytes: 0,
            dirty_from: None,
            dir_dirty: false,
            poisoned: false,
            scratch: Vec::new(),
        };
        let mut recovery = StreamRecovery::default();
        let mut cut = false;
        for first in firsts {
            let path = dir.join(segment_name(first));
            if cut || (!log.segments.is_empty() && first != log.next_offset) {
                // After a cut, or not following on: not part of the stream.
                let size = backend.open(&path, false).and_then(|f| f.size()).unwrap_or(0);
                recovery.truncated_bytes += size;
                backend.remove(&path).map_err(|e| StorageError::io(&path, e))?;
                log.dir_dirty = true;
                cut = true;
                continue;
            }
            let file: Arc<dyn StorageFile> =
                Arc::from(backend.open(&path, false).map_err(|e| StorageError::io(&path, e))?);
            let size = file.size().map_err(|e| StorageError::io(&path, e))?;
            let mut segment = Segment {
                first_offset: first,
                path: path.clone(),
                file,
                len: 0,
                index: Vec::new(),
                last_timestamp: 0,
                next_offset: first,
            };
            let mut since_index = u64::MAX;
            let mut header = [0u8; CHUNK_HEADER];
            let mut payload = Vec::new();
            while segment.len + CHUNK_HEADER as u64 <= size {
                let at = segment.len;
                if segment.file.read_exact_at(&mut header, at).is_err() {
                    break;
                }
                let Some((h, crc)) = ChunkHeader::parse(&header) else { break };
                if h.first != segment.next_offset || at + h.size() > size {
                    break;
                }
                payload.resize(h.payload_len as usize, 0);
                if segment.file.read_exact_at(&mut payload, at + CHUNK_HEADER as u64).is_err() {
                    break;
                }
                let mut hasher = crc32fast::Hasher::new();
                hasher.update(&header[8..]);
                hasher.update(&payload);
                if hasher.finalize() != crc || !records_fit(&payload, &h) {
                    break;
                }
                if since_index >= options.index_every {
                    segment.index.push(IndexEntry { offset: h.first, timestamp: h.timestamp, position: at });
                    since_index = 0;
                }
                since_index += h.size();
                segment.len += h.size();
                segment.next_offset = h.end_offset();
                segment.last_timestamp = h.timestamp;
                log.last_chunk = Some(h.first);
                recovery.chunks += 1;
                recovery.records += u64::from(h.count);
            }
            if segment.len < size {
                recovery.truncated_bytes += size - segment.len;
                segment.file.set_len(segment.len).map_err(|e| StorageError::io(&path, e))?;
                segment.file.sync().map_err(|e| StorageError::io(&path, e))?;
                cut = true;
            }
            log.next_offset = segment.next_offset;
            log.bytes += segment.len;
            if segment.len == 0 && !log.segments.is_empty() {
                backend.remove(&path).map_err(|e| StorageError::io(&path, e))?;
                log.dir_dirty = true;
                continue;
            }
            log.segments.push(segment);
        }
        recovery.segments = log.segments.len();
        if log.dir_dirty {
            backend.sync_dir(dir).map_err(|e| StorageError::io(dir, e))?;
            log.dir_dirty = false;
        }
        Ok((log, recovery))
    }

    /// The oldest offset still retained (`next_offset` when empty).
    pub fn first_offset(&self) -> u64 {
        self.segments.iter().find(|s| s.len > 0).map_or(self.next_offset, |s| s.first_offset)
    }

    /// The offset the next record gets.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// First offset of the newest chunk.
    pub fn last_chunk(&self) -> Option<u64> {
        self.last_chunk
    }

    /// Records retained.
    pub fn len(&self) -> u64 {
        self.next_offset - self.first_offset()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Appends one chunk: `records` numbered from `next_offset`, stamped
    /// `timestamp`, carrying the distinct `filters` values (at most 255
    /// bytes each; longer ones are cut). Returns the first record's offset.
    pub fn append<'a>(
        &mut self,
        timestamp: i64,
        filters: &[&[u8]],
        records: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<u64, StorageError> {
        let mut records = records.into_iter();
        self.append_with(timestamp, filters, |out| match records.next() {
            Some(record) => {
                out.extend_from_slice(record);
                true
            }
            None => false,
        })
    }

    /// [`Self::append`] with each record encoded straight into the chunk:
    /// `next_record` appends one record's bytes and returns true, or
    /// returns false (appending nothing) when there are no more.
    pub fn append_with(
        &mut self,
        timestamp: i64,
        filters: &[&[u8]],
        mut next_record: impl FnMut(&mut Vec<u8>) -> bool,
    ) -> Result<u64, StorageError> {
        if self.poisoned {
            return Err(StorageError::Poisoned);
        }
        let first = self.next_offset;
        let mut chunk = std::mem::take(&mut self.scratch);
        chunk.clear();
        chunk.resize(CHUNK_HEADER, 0);
        for value in filters {
            let len = u8::try_from(value.len()).unwrap_or(u8::MAX);
            chunk.push(len);
            let value = &value[..usize::from(len)];
            chunk.extend_from_slice(value);
        }
        // At most 255 bytes per distinct value; a chunk has few.
        let filters_len = u32::try_from(chunk.len() - CHUNK_HEADER).unwrap_or(u32::MAX);
        let mut count = 0u32;
        loop {
            let at = chunk.len();
            chunk.extend_from_slice(&[0; RECORD_HEADER]);
            if !next_record(&mut chunk) {
                chunk.truncate(at);
                break;
            }
            let len = chunk.len() - at - RECORD_HEADER;
            let len = u32::try_from(len).map_err(|_| StorageError::BatchTooLarge(len as u64))?;
            chunk[at..at + RECORD_HEADER].copy_from_slice(&len.to_le_bytes());
            count += 1;
        }
        if count == 0 {
            self.scratch = chunk;
            return Ok(first);
        }
        let payload_len = u32::try_from(chunk.len() - CHUNK_HEADER)
            .map_err(|_| StorageError::BatchTooLarge((chunk.len() - CHUNK_HEADER) as u64))?;
        chunk[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        chunk[8..16].copy_from_slice(&first.to_le_bytes());
        chunk[16..20].copy_from_slice(&count.to_le_bytes());
        chunk[20..24].copy_from_slice(&payload_len.to_le_bytes());
        chunk[24..32].copy_from_slice(&timestamp.to_le_bytes());
        chunk[32..36].copy_from_slice(&filters_len.to_le_bytes());
        let crc = crc_of(&chunk[8..]);
        chunk[4..8].copy_from_slice(&crc.to_le_bytes());
        let result = self.write_chunk(&chunk, first, count, timestamp);
        self.scratch = chunk;
        if self.scratch.capacity() > 4 << 20 {
            self.scratch = Vec::new();
        }
        result.map(|()| first)
    }

    fn write_chunk(&mut self, chunk: &[u8], first: u64, count: u32, timestamp: i64) -> Result<(), StorageError> {
        let size = chunk.len() as u64;
        let roll = self.segments.last().is_none_or(|s| s.len > 0 && s.len + size > self.options.max_segment_bytes);
        if roll {
            let path = self.dir.join(segment_name(first));
            let file: Arc<dyn StorageFile> = Arc::from(self.backend.open(&path, true).map_err(|e| {
                self.poisoned = true;
                StorageError::io(&path, e)
            })?);
            self.segments.push(Segment {
                first_offset: first,
                path,
                file,
                len: 0,
                index: Vec::new(),
                last_timestamp: timestamp,
                next_offset: first,
            });
            self.dir_dirty = true;
        }
        let index_every = self.options.index_every;
        let Some(segment) = self.segments.last_mut() else { return Err(StorageError::Poisoned) };
        if let Err(e) = segment.file.write_all_at(chunk, segment.len) {
            self.poisoned = true;
            return Err(StorageError::io(&segment.path, e));
        }
        let since = segment.index.last().map_or(u64::MAX, |e| segment.len - e.position);
        if since >= index_every {
            segment.index.push(IndexEntry { offset: first, timestamp, position: segment.len });
        }
        segment.len += size;
        segment.next_offset = first + u64::from(count);
        segment.last_timestamp = timestamp;
        self.next_offset = segment.next_offset;
        self.last_chunk = Some(first);
        self.bytes += size;
        let written = segment.first_offset;
        self.dirty_from.get_or_insert(written);
        Ok(())
    }

    /// What must be synced to make every append so far durable.
    pub fn take_unsynced(&mut self) -> Unsynced {
        let mut unsynced = Unsynced::default();
        if let Some(from) = self.dirty_from.take() {
            for segment in self.segments.iter().filter(|s| s.first_offset >= from) {
                unsynced.files.push((segment.path.clone(), segment.file.clone()));
            }
        }
        if std::mem::take(&mut self.dir_dirty) {
            unsynced.dir = Some((self.backend.clone(), self.dir.clone()));
        }
        unsynced
    }

    /// Removes the oldest segments (never the newest) while the stream
    /// holds more than `max_bytes`, or while a segment's newest chunk is
    /// older than `min_timestamp`. Returns how many were removed.
    pub fn retain(&mut self, max_bytes: Option<u64>, min_timestamp: Option<i64>) -> Result<usize, StorageError> {
        let mut removed = 0;
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            let over_size = max_bytes.is_some_and(|max| self.bytes > max);
            let too_old = min_timestamp.is_some_and(|min| oldest.last_timestamp < min);
            if !over_size && !too_old {
                break;
            }
            let segment = self.segments.remove(0);
            self.bytes -= segment.len;
            self.backend.remove(&segment.path).map_err(|e| StorageError::io(&segment.path, e))?;
            self.dir_dirty = true;
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes every file of the stream (a deleted stream); nothing more
    /// can be appended.
    pub fn destroy(&mut self) -> Result<(), StorageError> {
        self.poisoned = true;
        self.bytes = 0;
        self.dirty_from = None;
        for segment in std::mem::take(&mut self.segments) {
            self.backend.remove(&segment.path).map_err(|e| StorageError::io(&segment.path, e))?;
        }
        Ok(())
    }

    /// The first offset of the first chunk stamped at or after `timestamp`
    /// (`next_offset` if none is).
    pub fn offset_at_timestamp(&self, timestamp: i64) -> u64 {
        let Some(si) = self.segments.iter().position(|s| s.len > 0 && s.last_timestamp >= timestamp) else {
            return self.next_offset;
        };
        let segment = &self.segments[si];
        let start = segment.index.partition_point(|e| e.timestamp < timestamp).saturating_sub(1);
        let Some(entry) = segment.index.get(start) else { return segment.first_offset };
        let mut position = entry.position;
        let mut header = [0u8; CHUNK_HEADER];
        while position < segment.len {
            if segment.file.read_exact_at(&mut header, position).is_err() {
                break;
            }
            let Some((h, _)) = ChunkHeader::parse(&header) else { break };
            if h.timestamp >= timestamp {
                return h.first;
            }
            position += h.size();
        }
        segment.next_offset
    }

    /// A cursor at the chunk holding `offset`, clamped into what is
    /// retained (`None` when `offset` is not written yet).
    pub fn seek(&self, offset: u64) -> Option<StreamCursor> {
        let offset = offset.max(self.first_offset());
        if offset >= self.next_offset {
            return None;
        }
        let si = self.segments.partition_point(|s| s.first_offset <= offset).checked_sub(1)?;
        let segment = &self.segments[si];
        let start = segment.index.partition_point(|e| e.offset <= offset).checked_sub(1)?;
        let entry = segment.index.get(start)?;
        let mut cursor =
            StreamCursor { segment: segment.first_offset, position: entry.position, chunk_first: entry.offset };
        let mut header = [0u8; CHUNK_HEADER];
        while cursor.position < segment.len {
            segment.file.read_exact_at(&mut header, cursor.position).ok()?;
            let (h, _) = ChunkHeader::parse(&header)?;
            if h.end_offset() > offset {
                cursor.chunk_first = h.first;
                return Some(cursor);
            }
            cursor.position += h.size();
        }
        None
    }

    /// Reads records from `offset` on, chunk by chunk, until about
    /// `max_bytes` were read or the end; records before `offset` in the
    /// first chunk are skipped. A chunk whose filter values all fail
    /// `wanted` is skipped unread (chunks without values are read). Returns
    /// the cursor to carry on from and the offset after the last record
    /// visited or skipped (`None`: nothing at `offset` yet). `cursor` is a
    /// hint from an earlier read; a stale one is ignored.
    pub fn read(
        &self,
        offset: u64,
        cursor: Option<StreamCursor>,
        max_bytes: usize,
        wanted: Option<&Wanted<'_>>,
        buffer: &mut Vec<u8>,
        mut visit: impl FnMut(StreamRecord<'_>),
    ) -> Result<Option<(StreamCursor, u64)>, StorageError> {
        let offset = offset.max(self.first_offset());
        let cursor = match cursor.filter(|c| {
            c.chunk_first <= offset && self.segments.iter().any(|s| s.first_offset == c.segment && c.position < s.len)
        }) {
            Some(cursor) => cursor,
            None => match self.seek(offset) {
                Some(cursor) => cursor,
                None => return Ok(None),
            },
        };
        let Some(mut si) = self.segments.iter().position(|s| s.first_offset == cursor.segment) else {
            return Ok(None);
        };
        let mut position = cursor.position;
        let mut next = offset;
        let mut read = 0usize;
        let mut header = [0u8; CHUNK_HEADER];
        loop {
            let segment = &self.segments[si];
            if position >= segment.len {
                if si + 1 >= self.segments.len() {
                    break;
                }
                si += 1;
                position = 0;
                continue;
            }
            if read >= max_bytes {
                break;
            }
            let io = |e| StorageError::io(&segment.path, e);
            segment.file.read_exact_at(&mut header, position).map_err(io)?;
            let Some((h, _)) = ChunkHeader::parse(&header) else {
                return Err(StorageError::Corrupted {
                    segment: segment.path.clone(),
                    offset: position,
                    what: "not a chunk header".into(),
                });
            };
            if h.end_offset() <= next {
                position += h.size();
                continue;
            }
            if let Some(wanted) = wanted.filter(|_| h.filters_len > 0) {
                buffer.resize(h.filters_len as usize, 0);
                segment.file.read_exact_at(buffer, position + CHUNK_HEADER as u64).map_err(io)?;
                if !filter_values(buffer).any(wanted) {
                    next = h.end_offset();
                    position += h.size();
                    read += CHUNK_HEADER + h.filters_len as usize;
                    continue;
                }
            }
            buffer.resize(h.payload_len as usize, 0);
            segment.file.read_exact_at(buffer, position + CHUNK_HEADER as u64).map_err(io)?;
            let mut at = h.filters_len as usize;
            for i in 0..u64::from(h.count) {
                let len = buffer
                    .get(at..at + RECORD_HEADER)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_le_bytes)
                    .unwrap_or(0) as usize;
                let bytes = buffer.get(at + RECORD_HEADER..at + RECORD_HEADER + len).unwrap_or(&[]);
                at += RECORD_HEADER + len;
                let record_offset = h.first + i;
                if record_offset >= next {
                    visit(StreamRecord { offset: record_offset, timestamp: h.timestamp, bytes });
                }
            }
            read += crate::usize_of(h.size());
            next = h.end_offset();
            position += h.size();
        }
        let segment = &self.segments[si];
        let cursor = StreamCursor { segment: segment.first_offset, position, chunk_first: next };
        Ok(Some((cursor, next)))
    }
}

/// Which filter values a reader wants.
pub type Wanted<'a> = dyn Fn(&[u8]) -> bool + 'a;

/// The filter values of a chunk's filter section.
fn filter_values(section: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = *section.get(at)? as usize;
        let value = section.get(at + 1..at + 1 + len)?;
        at += 1 + len;
        Some(value)
    })
}

/// Do the chunk's records exactly fill its payload?
fn records_fit(payload: &[u8], h: &ChunkHeader) -> bool {
    let mut at = h.filters_len as usize;
    for _ in 0..h.count {
        let Some(len) = payload.get(at..at + RECORD_HEADER).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
        else {
            return false;
        };
        at += RECORD_HEADER + len as usize;
    }
    at == payload.len()
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::backend::FsBackend;
    use crate::sim::SimBackend;
    use proptest::prelude::*;

    fn records(log: &StreamLog, from: u64) -> Vec<(u64, i64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut cursor = None;
        let mut offset = from;
        let mut buffer = Vec::new();
        while let Some((next_cursor, next)) = log
            .read(offset, cursor, 100, None, &mut buffer, |r| out.push((r.offset, r.timestamp, r.bytes.to_vec())))
            .unwrap()
        {
            if next == offset {
                break;
            }
            cursor = Some(next_cursor);
            offset = next;
        }
        out
    }

    fn small() -> StreamOptions {
        StreamOptions { max_segment_bytes: 300, index_every: 100 }
    }

    #[test]
    fn appends_read_back_across_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(FsBackend);
        let (mut log, recovery) = StreamLog::open(backend.clone(), dir.path(), small()).unwrap();
        assert_eq!(recovery, StreamRecovery::default());
        for i in 0..50u8 {
            let body = vec![i; usize::from(i % 7) * 10];
            assert_eq!(
                log.append(1000 + i64::from(i), &[], [body.as_slice(), b"x".as_slice()]).unwrap(),
                u64::from(i) * 2
            );
        }
        assert!(log.segment_count() > 5);
        log.take_unsynced().sync().unwrap();
        let all = records(&log, 0);
        assert_eq!(all.len(), 100);
        assert!(all.iter().enumerate().all(|(i, r)| r.0 == i as u64));
        assert_eq!(all[21].2, b"x");
        assert_eq!(all[20].2, vec![10u8; 30]);
        assert_eq!(records(&log, 33)[0].0, 33);
        assert_eq!(log.last_chunk(), Some(98));
        drop(log);
        let (log, recovery) = StreamLog::open(backend, dir.path(), small()).unwrap();
        assert_eq!(recovery.records, 100);
        assert_eq!(recovery.truncated_bytes, 0);
        assert_eq!(records(&log, 0), all);
        assert_eq!(log.next_offset(), 100);
        assert_eq!(log.offset_at_timestamp(1010), 20);
        assert_eq!(log.offset_at_timestamp(0), 0);
        assert_eq!(log.offset_at_timestamp(5000), 100);
    }

    #[test]
    fn retention_removes_whole_old_segments_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = StreamLog::open(Arc::new(FsBackend), dir.path(), small()).unwrap();
        for i in 0..40 {
            log.append(i, &[], [[0u8; 60].as_slice()]).unwrap();
        }
        let before = log.segment_count();
        assert_eq!(log.retain(Some(250), None).unwrap(), before - 1);
        assert_eq!(log.segment_count(), 1);
        let first = log.first_offset();
        assert!(first > 0 && first < 40);
        assert_eq!(records(&log, 0)[0].0, first, "a read before the start begins at the first retained");
        assert_eq!(log.retain(None, Some(i64::MAX)).unwrap(), 0, "the newest segment stays");
        for i in 40..60 {
            log.append(i, &[], [[0u8; 60].as_slice()]).unwrap();
        }
        let removed = log.retain(None, Some(45)).unwrap();
        assert!(removed >= 1);
        assert!(records(&log, 0).iter().all(|r| r.1 >= 40));
    }

    #[test]
    fn filtered_reads_skip_chunks_without_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = StreamLog::open(Arc::new(FsBackend), dir.path(), StreamOptions::default()).unwrap();
        log.append(1, &[b"red"], [b"r1".as_slice(), b"r2"]).unwrap();
        log.append(2, &[b"blue"], [b"b1".as_slice()]).unwrap();
        log.append(3, &[], [b"plain".as_slice()]).unwrap();
        log.append(4, &[b"red", b"blue"], [b"rb".as_slice()]).unwrap();
        let wanted = |v: &[u8]| v == b"red";
        let mut got = Vec::new();
        let (_, next) = log
            .read(0, None, usize::MAX, Some(&wanted), &mut Vec::new(), |r| got.push(r.bytes.to_vec()))
            .unwrap()
            .unwrap();
        assert_eq!(next, 5);
        assert_eq!(got, vec![b"r1".to_vec(), b"r2".to_vec(), b"plain".to_vec(), b"rb".to_vec()]);
    }

    #[test]
    fn a_power_cut_loses_only_unsynced_chunks_and_a_torn_tail_is_cut() {
        let sim = SimBackend::new();
        let dir = Path::new("/stream");
        let (mut log, _) = StreamLog::open(Arc::new(sim.clone()), dir, small()).unwrap();
        for i in 0..10 {
            log.append(i, &[], [[i as u8; 50].as_slice()]).unwrap();
        }
        log.take_unsynced().sync().unwrap();
        for i in 10..14 {
            log.append(i, &[], [[i as u8; 50].as_slice()]).unwrap();
        }
        // Unsynced writes survive partly: a torn tail.
        sim.power_cut_with(|len| len / 2 + 7);
        let (log, recovery) = StreamLog::open(Arc::new(sim.clone()), dir, small()).unwrap();
        let all = records(&log, 0);
        assert!(all.len() >= 10, "every synced record survives: {}", all.len());
        assert!(all.iter().enumerate().all(|(i, r)| r.0 == i as u64 && r.2 == vec![i as u8; 50]));
        assert_eq!(log.next_offset(), all.len() as u64);
        let _ = recovery;
    }

    #[test]
    fn a_flipped_bit_cuts_the_stream_there() {
        let sim = SimBackend::new();
        let dir = Path::new("/s");
        let (mut log, _) = StreamLog::open(Arc::new(sim.clone()), dir, StreamOptions::default()).unwrap();
        for i in 0..5 {
            log.append(i, &[], [[1u8; 100].as_slice()]).unwrap();
        }
        log.take_unsynced().sync().unwrap();
        drop(log);
        sim.flip_bit(&dir.join(segment_name(0)), CHUNK_HEADER * 3 + 200 + 50, 3);
        let (log, recovery) = StreamLog::open(Arc::new(sim), dir, StreamOptions::default()).unwrap();
        assert_eq!(log.next_offset(), 2);
        assert_eq!(recovery.truncated_bytes, 3 * (CHUNK_HEADER as u64 + 104));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any batches, any segment size, any starting offset: every read
        /// from any offset gives the records from there, in order.
        #[test]
        fn reads_from_any_offset_match_what_was_appended(
            batches in prop::collection::vec(prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6), 1..30),
            segment in 64u64..400,
            index_every in 1u64..200,
            from in 0u64..120,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let options = StreamOptions { max_segment_bytes: segment, index_every };
            let (mut log, _) = StreamLog::open(Arc::new(FsBackend), dir.path(), options).unwrap();
            let mut expected = Vec::new();
            for (t, batch) in batches.iter().enumerate() {
                log.append(t as i64, &[], batch.iter().map(|r| r.as_slice())).unwrap();
                expected.extend(batch.iter().map(|r| (t as i64, r.clone())));
            }
            let got = records(&log, from);
            let want: Vec<_> = expected.iter().enumerate().skip(from as usize)
                .map(|(i, (t, r))| (i as u64, *t, r.clone())).collect();
            prop_assert_eq!(got, want.clone());
            drop(log);
            let (log, _) = StreamLog::open(Arc::new(FsBackend), dir.path(), options).unwrap();
            prop_assert_eq!(records(&log, from), want);
        }
    }
}
