//! Stream queues' logs: one `warren-storage` stream log per stream under
//! `streams/<vhost>/<queue>/`, written and fsynced by one thread for all
//! streams (group commit: everything handed over since the last round is
//! one chunk per stream, one write, one fsync). A publish's confirm waits
//! for its ticket (`store::tickets`), resolved after the fsync; consumers
//! are told how far a stream is durable through `notify`, and are served
//! only that far.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use tracing::{error, warn};
use warren_core::stream::{
    ReadHint, StreamBounds, StreamCursor as ReaderState, StreamItem, StreamSettings, StreamStorage,
};
use warren_core::Message;
use warren_storage::stream::{StreamCursor, StreamLog, StreamOptions, Unsynced};
use warren_storage::Backend;

use super::record;
use crate::store::tickets::Tickets;

/// Tracking consumers' offsets, in a stream's directory.
const OFFSETS_FILE: &str = "offsets.json";

/// How often streams with `x-max-age` drop their expired segments, and
/// tracked offsets are saved.
const AGE_CHECK: Duration = Duration::from_secs(1);

thread_local! {
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// (virtual host, stream, durable offset): consumers may now read below it.
pub type DurableNotice = (String, String, u64);

struct Handle {
    vhost: String,
    queue: String,
    dir: PathBuf,
    log: Mutex<StreamLog>,
    /// Tracking consumers' last acked offsets, by consumer tag; saved to
    /// `offsets.json` in the stream's directory once a second when changed
    /// (a consumer resuming after a crash may get up to a second again).
    offsets: Mutex<std::collections::BTreeMap<String, u64>>,
    offsets_dirty: AtomicBool,
    settings: StreamSettings,
    /// Offsets below are fsynced.
    durable: AtomicU64,
    deleted: AtomicBool,
}

struct Batch {
    handle: Arc<Handle>,
    /// The first message's offset, as the virtual host numbered it.
    first: u64,
    timestamp: u64,
    messages: Vec<Arc<Message>>,
}

#[derive(Default)]
struct Work {
    batches: Vec<Batch>,
    tickets: Vec<u64>,
    stop: bool,
}

struct Shared {
    root: PathBuf,
    backend: Arc<dyn Backend>,
    /// Virtual host -> stream -> its log (looked up by `&str`, without
    /// allocating, on every publish).
    handles: RwLock<HashMap<String, HashMap<String, Arc<Handle>>>>,
    work: Mutex<Work>,
    wake: Condvar,
    tickets: Arc<Tickets>,
    notify: Mutex<Option<tokio::sync::mpsc::UnboundedSender<DurableNotice>>>,
    poisoned: AtomicBool,
    /// `fsync = always`: chunks are fsynced before they count as durable
    /// (with `never`, once written to the operating system).
    sync: bool,
}

pub struct Streams {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A name as a directory name: letters, digits, `-` and `_` kept, every
/// other byte as `%XX`.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    out
}

impl Streams {
    pub fn open(
        backend: Arc<dyn Backend>,
        root: &Path,
        tickets: Arc<Tickets>,
        sync: bool,
    ) -> Result<Streams, std::io::Error> {
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            backend,
            handles: RwLock::new(HashMap::new()),
            work: Mutex::new(Work::default()),
            wake: Condvar::new(),
            tickets,
            notify: Mutex::new(None),
            poisoned: AtomicBool::new(false),
            sync,
        });
        let thread_shared = shared.clone();
        let writer =
            std::thread::Builder::new().name("warren-streams".into()).spawn(move || write_loop(&thread_shared))?;
        Ok(Streams { shared, writer: Mutex::new(Some(writer)) })
    }

    /// Where durable offsets are announced from now on.
    pub fn set_notify(&self, notify: tokio::sync::mpsc::UnboundedSender<DurableNotice>) {
        *self.shared.notify.lock() = Some(notify);
    }

    fn handle(&self, vhost: &str, queue: &str) -> Option<Arc<Handle>> {
        self.shared.handles.read().get(vhost)?.get(queue).cloned()
    }

    /// Hands a batch of a stream's messages (numbered from the stream's
    /// next offset) to the writer.
    pub fn append(&self, vhost: &str, queue: &str, first: u64, timestamp: u64, messages: Vec<Arc<Message>>) -> bool {
        let Some(handle) = self.handle(vhost, queue) else {
            error!(vhost, queue, "a stream's messages arrived for a stream that is not open");
            return false;
        };
        self.shared.work.lock().batches.push(Batch { handle, first, timestamp, messages });
        true
    }

    /// Issues the ticket the appends handed over since the last one wait
    /// for, and wakes the writer.
    pub fn commit(&self) -> u64 {
        let ticket = self.shared.tickets.issue();
        if self.shared.poisoned.load(Ordering::Relaxed) {
            self.shared.tickets.resolve(ticket, false);
            return ticket;
        }
        self.shared.work.lock().tickets.push(ticket);
        self.shared.wake.notify_one();
        ticket
    }

    /// Removes a deleted stream's files.
    pub fn delete(&self, vhost: &str, queue: &str) {
        let Some(handle) = self.shared.handles.write().get_mut(vhost).and_then(|streams| streams.remove(queue)) else {
            return;
        };
        handle.deleted.store(true, Ordering::Relaxed);
        if let Err(error) = handle.log.lock().destroy() {
            warn!(vhost, queue, %error, "a deleted stream's files were not removed");
        }
        let _ = self.shared.backend.remove(&handle.dir.join(OFFSETS_FILE));
        let dir = self.shared.root.join(escape(vhost));
        let _ = std::fs::remove_dir(dir.join(escape(queue)));
        let _ = std::fs::remove_dir(&dir);
    }

    /// Removes every stream of a virtual host.
    pub fn delete_vhost(&self, vhost: &str) {
        let queues: Vec<String> =
            self.shared.handles.read().get(vhost).map(|streams| streams.keys().cloned().collect()).unwrap_or_default();
        for queue in queues {
            self.delete(vhost, &queue);
        }
    }

    /// Writes what is pending and stops the writer (shutdown).
    pub fn shutdown(&self) {
        self.shared.work.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
    }

    /// Bytes and segments of every stream (for operators).
    pub fn disk_usage(&self) -> (u64, usize) {
        let handles = self.shared.handles.read();
        handles.values().flat_map(HashMap::values).fold((0, 0), |(bytes, segments), h| {
            let log = h.log.lock();
            (bytes + log.bytes(), segments + log.segment_count())
        })
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl StreamStorage for Streams {
    fn open_stream(&self, vhost: &str, queue: &str, settings: &StreamSettings) -> Result<StreamBounds, String> {
        if let Some(handle) = self.handle(vhost, queue) {
            return Ok(bounds(&handle));
        }
        let dir = self.shared.root.join(escape(vhost)).join(escape(queue));
        let options = StreamOptions { max_segment_bytes: settings.max_segment_bytes, ..StreamOptions::default() };
        let (log, recovery) =
            StreamLog::open(self.shared.backend.clone(), &dir, options).map_err(|error| error.to_string())?;
        if recovery.truncated_bytes > 0 {
            warn!(vhost, queue, bytes = recovery.truncated_bytes, "a stream's torn or corrupt tail was cut off");
        }
        let durable = AtomicU64::new(log.next_offset());
        let offsets = match warren_storage::backend::read_whole(&*self.shared.backend, &dir.join(OFFSETS_FILE)) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                warn!(vhost, queue, %error, "a stream's tracked offsets are unreadable; consumers start afresh");
                Default::default()
            }),
            Ok(None) => Default::default(),
            Err(error) => {
                warn!(vhost, queue, %error, "a stream's tracked offsets cannot be read");
                Default::default()
            }
        };
        let handle = Arc::new(Handle {
            vhost: vhost.to_string(),
            queue: queue.to_string(),
            dir,
            offsets: Mutex::new(offsets),
            offsets_dirty: AtomicBool::new(false),
            log: Mutex::new(log),
            settings: *settings,
            durable,
            deleted: AtomicBool::new(false),
        });
        let result = bounds(&handle);
        self.shared.handles.write().entry(vhost.to_string()).or_default().insert(queue.to_string(), handle);
        Ok(result)
    }

    fn track(&self, vhost: &str, queue: &str, consumer_tag: &str, offset: u64) {
        let Some(handle) = self.handle(vhost, queue) else { return };
        let mut offsets = handle.offsets.lock();
        let stored = offsets.entry(consumer_tag.to_string()).or_insert(offset);
        *stored = (*stored).max(offset);
        handle.offsets_dirty.store(true, Ordering::Relaxed);
    }

    fn tracked(&self, vhost: &str, queue: &str, consumer_tag: &str) -> Option<u64> {
        self.handle(vhost, queue)?.offsets.lock().get(consumer_tag).copied()
    }

    fn bounds(&self, vhost: &str, queue: &str) -> Option<StreamBounds> {
        self.handle(vhost, queue).map(|h| bounds(&h))
    }

    fn offset_at(&self, vhost: &str, queue: &str, timestamp_ms: u64) -> u64 {
        let Some(handle) = self.handle(vhost, queue) else { return 0 };
        let durable = handle.durable.load(Ordering::Acquire);
        let at = handle.log.lock().offset_at_timestamp(i64::try_from(timestamp_ms).unwrap_or(i64::MAX));
        at.min(durable)
    }

    fn read(&self, vhost: &str, queue: &str, reader: &mut ReaderState, max_bytes: usize) -> Option<u64> {
        let ReaderState { next: from, ahead: out, hint, filter, .. } = reader;
        let (from, filter) = (*from, filter.as_ref());
        let handle = self.handle(vhost, queue)?;
        let durable = handle.durable.load(Ordering::Acquire);
        if from >= durable {
            return None;
        }
        let wanted = filter.map(|f| move |value: &[u8]| f.wants_value(value));
        let wanted_dyn: Option<&warren_storage::stream::Wanted<'_>> = wanted.as_ref().map(|w| w as _);
        let cursor = (*hint != ReadHint::default()).then(|| StreamCursor::from_parts(hint.0));
        let log = handle.log.lock();
        // One read buffer per thread, kept: readers call this all the time.
        let result = READ_BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            let read = log.read(from, cursor, max_bytes, wanted_dyn, &mut buffer, |record| {
                if record.offset < durable {
                    if let Some(message) = record::decode_message(record.bytes) {
                        out.push_back(StreamItem { offset: record.offset, message: Arc::new(message) });
                    }
                }
            });
            // A large chunk's buffer is not kept.
            if buffer.capacity() > 4 << 20 {
                *buffer = Vec::new();
            }
            read
        });
        match result {
            Ok(Some((cursor, next))) => {
                hint.0 = cursor.to_parts();
                Some(next.min(durable))
            }
            Ok(None) => None,
            Err(error) => {
                warn!(vhost, queue, %error, "a stream cannot be read");
                *hint = ReadHint::default();
                None
            }
        }
    }
}

fn bounds(handle: &Handle) -> StreamBounds {
    let log = handle.log.lock();
    StreamBounds {
        first: log.first_offset(),
        next: handle.durable.load(Ordering::Acquire),
        last_chunk: log.last_chunk(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The writer thread: takes what was handed over, appends one chunk per
/// stream, fsyncs, then resolves the tickets and announces the durable
/// offsets. Also drops segments past `x-max-age`.
fn write_loop(shared: &Shared) {
    let mut last_age_check = std::time::Instant::now();
    loop {
        let work = {
            let mut work = shared.work.lock();
            while work.tickets.is_empty() && !work.stop && last_age_check.elapsed() < AGE_CHECK {
                shared.wake.wait_for(&mut work, AGE_CHECK);
            }
            std::mem::take(&mut *work)
        };
        let mut touched: Vec<(Arc<Handle>, u64)> = Vec::new();
        let mut unsynced: Vec<Unsynced> = Vec::new();
        let mut failed = shared.poisoned.load(Ordering::Relaxed);
        // One chunk per stream: consecutive batches of one stream together.
        let mut batches = work.batches.into_iter().peekable();
        while let Some(first) = batches.next() {
            let handle = first.handle.clone();
            let (timestamp, first_offset) = (first.timestamp, first.first);
            let mut group = vec![first];
            while batches.peek().is_some_and(|b| Arc::ptr_eq(&b.handle, &handle)) {
                group.extend(batches.next());
            }
            if handle.deleted.load(Ordering::Relaxed) || failed {
                continue;
            }
            let mut filters: Vec<Vec<u8>> = Vec::new();
            for message in group.iter().flat_map(|b| b.messages.iter()) {
                if let Some(value) = warren_core::stream::filter_value(message) {
                    if !filters.contains(&value) {
                        filters.push(value);
                    }
                }
            }
            let filter_refs: Vec<&[u8]> = filters.iter().map(Vec::as_slice).collect();
            let mut log = handle.log.lock();
            if log.next_offset() != first_offset {
                error!(vhost = %handle.vhost, queue = %handle.queue, expected = first_offset, next = log.next_offset(),
                    "a stream's log and its queue disagree on the next offset");
                failed = true;
                continue;
            }
            // Stored with the offset header, so a read is sent as it is.
            let mut messages = group.iter().flat_map(|b| b.messages.iter()).zip(first_offset..);
            let stamp = i64::try_from(timestamp).unwrap_or(i64::MAX);
            let appended = log.append_with(stamp, &filter_refs, |out| match messages.next() {
                Some((message, offset)) => {
                    let properties = warren_core::stream::offset_properties(message, offset);
                    record::encode_message_with(out, message, properties.as_bytes());
                    true
                }
                None => false,
            });
            if let Err(error) = appended {
                error!(vhost = %handle.vhost, queue = %handle.queue, %error, "a stream refused a write");
                failed = true;
                continue;
            }
            if let Some(max) = handle.settings.max_length_bytes {
                if let Err(error) = log.retain(Some(max), None) {
                    warn!(queue = %handle.queue, %error, "stream retention failed");
                }
            }
            unsynced.push(log.take_unsynced());
            touched.push((handle.clone(), log.next_offset()));
        }
        for files in unsynced.iter().filter(|_| shared.sync) {
            if failed {
                break;
            }
            if let Err(error) = files.sync() {
                error!(%error, "a stream's fsync failed; nothing more is confirmed");
                failed = true;
            }
        }
        if failed {
            shared.poisoned.store(true, Ordering::Relaxed);
        } else {
            let notify = shared.notify.lock().clone();
            for (handle, next) in touched {
                handle.durable.store(next, Ordering::Release);
                if let Some(notify) = &notify {
                    let _ = notify.send((handle.vhost.clone(), handle.queue.clone(), next));
                }
            }
        }
        shared.tickets.resolve_all(&work.tickets, !failed);
        if last_age_check.elapsed() >= AGE_CHECK || work.stop {
            last_age_check = std::time::Instant::now();
            drop_aged(shared);
            save_offsets(shared);
        }
        if work.stop {
            return;
        }
    }
}

/// Saves the tracked offsets of the streams whose changed.
fn save_offsets(shared: &Shared) {
    let changed: Vec<Arc<Handle>> = shared
        .handles
        .read()
        .values()
        .flat_map(HashMap::values)
        .filter(|h| h.offsets_dirty.swap(false, Ordering::Relaxed))
        .cloned()
        .collect();
    for handle in changed {
        if handle.deleted.load(Ordering::Relaxed) {
            continue;
        }
        let bytes = match serde_json::to_vec(&*handle.offsets.lock()) {
            Ok(bytes) => bytes,
            Err(error) => {
                warn!(queue = %handle.queue, %error, "a stream's tracked offsets cannot be encoded");
                continue;
            }
        };
        if let Err(error) = warren_storage::backend::replace(&*shared.backend, &handle.dir.join(OFFSETS_FILE), &bytes) {
            warn!(queue = %handle.queue, %error, "a stream's tracked offsets were not saved");
            handle.offsets_dirty.store(true, Ordering::Relaxed);
        }
    }
}

/// Drops segments whose newest message is older than the stream's
/// `x-max-age`.
fn drop_aged(shared: &Shared) {
    let now = now_ms();
    let aged: Vec<Arc<Handle>> = shared
        .handles
        .read()
        .values()
        .flat_map(HashMap::values)
        .filter(|h| h.settings.max_age_ms.is_some())
        .cloned()
        .collect();
    for handle in aged {
        let Some(age) = handle.settings.max_age_ms else { continue };
        let min = i64::try_from(now.saturating_sub(age)).unwrap_or(i64::MAX);
        let mut log = handle.log.lock();
        match log.retain(None, Some(min)) {
            Ok(0) => {}
            Ok(_) => {
                if let Err(error) = log.take_unsynced().sync() {
                    warn!(queue = %handle.queue, %error, "syncing a stream's directory failed");
                }
            }
            Err(error) => warn!(queue = %handle.queue, %error, "stream retention failed"),
        }
    }
}
