//! The broker's durable state on top of `warren-storage`: persistent
//! messages of durable queues in one shared log, and durable definitions in
//! an atomically replaced JSON file.
//!
//! Log entries (one per journal event, in the order events happened under
//! their virtual-host lock):
//! - `P` published: vhost, durable queues, exchange, routing key,
//!   properties, body: written once however many queues it reached; its log
//!   index is the message's store id;
//! - `S` settled: messages (by log index) that left queues for good, one
//!   entry per run of settlements (an ack with `multiple`, a purge);
//! - `D` queue deleted;
//! - `M` moved: a live message rewritten at the head by compaction, with
//!   the index of the copy it replaces.
//!
//! Recovery replays the log: a message is restored into every queue that has
//! not settled it. A message is live while some queue holds it; segments
//! older than the oldest live message are deleted by [`Store::reclaim`].
//!
//! What a confirm means: the `P` entry is fsynced (group commit), see
//! docs/durability.md.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::{info, warn};
use warren_codec::properties::Properties;
use warren_core::vhost::JournalEvent;
use warren_core::{Definitions, Message, MessageLoader, VirtualHost, VirtualHostState};
use warren_storage::{Backend, FsyncPolicy, GroupCommit, Log, LogOptions, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot read or write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("definitions file {path} is invalid: {source}")]
    Definitions { path: PathBuf, source: serde_json::Error },
    #[error(transparent)]
    Access(#[from] crate::access::AccessError),
}

/// What recovery restored.
#[derive(Debug, Default, Clone)]
pub struct Recovered {
    pub messages: u64,
    pub queue_entries: u64,
    pub log: warren_storage::Recovery,
    pub millis: u128,
}

/// Which log entries are still needed: queue entries holding stored
/// messages, counted per bucket of 64 log indices, so the cost is one
/// small entry per bucket, not one per message.
#[derive(Default)]
struct Liveness {
    /// index bucket -> queue entries still holding its messages
    buckets: BTreeMap<u64, u64>,
}

const BUCKET_INDICES: u64 = 64;

impl Liveness {
    fn add(&mut self, index: u64, refs: u32) {
        self.add_to_bucket(index / BUCKET_INDICES, u64::from(refs));
    }

    fn add_to_bucket(&mut self, bucket: u64, refs: u64) {
        if refs > 0 {
            *self.buckets.entry(bucket).or_insert(0) += refs;
        }
    }

    fn settle(&mut self, index: u64) {
        let bucket = index / BUCKET_INDICES;
        if let Some(count) = self.buckets.get_mut(&bucket) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.buckets.remove(&bucket);
            }
        }
    }

    /// Live queue entries in buckets overlapping `range` (an upper bound
    /// for the range itself).
    fn count_in(&self, range: std::ops::Range<u64>) -> u64 {
        let first = range.start / BUCKET_INDICES;
        let last = range.end.saturating_sub(1) / BUCKET_INDICES;
        self.buckets.range(first..=last).map(|(_, count)| *count).sum()
    }

    /// Every entry below this index is dead.
    fn oldest_index(&self) -> Option<u64> {
        self.buckets.keys().next().map(|bucket| bucket * BUCKET_INDICES)
    }
}

pub struct Store {
    commit: GroupCommit,
    durable: Arc<watch::Sender<u64>>,
    live: Mutex<Liveness>,
    /// Highest log index written by compaction; nothing is purged until it
    /// is durable.
    moved_until: Mutex<u64>,
    definitions_path: PathBuf,
    definitions: Mutex<BTreeMap<String, Definitions>>,
    dedup_path: PathBuf,
    /// vhost -> queue -> deduplication keys (hex) and when each is forgotten.
    dedup: Mutex<DedupKeys>,
}

type DedupKeys = BTreeMap<String, BTreeMap<String, Vec<(String, u64)>>>;

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn put_short(out: &mut Vec<u8>, value: &[u8]) {
    let len = value.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&value[..len]);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at + n)?;
        self.at += n;
        Some(slice)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).and_then(|b| b.try_into().ok()).map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }
    fn short(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()? as usize;
        self.take(len)
    }
    fn short_str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.short()?).ok()
    }
    fn rest(&mut self) -> &'a [u8] {
        let rest = self.bytes.get(self.at..).unwrap_or_default();
        self.at = self.bytes.len();
        rest
    }
}

pub fn encode_published(out: &mut Vec<u8>, vhost: &str, message: &Message, queues: &[Arc<str>]) {
    out.push(b'P');
    put_short(out, vhost.as_bytes());
    out.extend_from_slice(&(queues.len() as u16).to_le_bytes());
    for queue in queues {
        put_short(out, queue.as_bytes());
    }
    put_short(out, message.exchange());
    put_short(out, message.routing_key());
    out.extend_from_slice(&(message.properties().len() as u32).to_le_bytes());
    out.extend_from_slice(message.properties());
    out.extend_from_slice(&message.arrived().to_le_bytes());
    out.extend_from_slice(message.body());
}

/// Settlements in one vhost: (queue, log index of the message's `P` entry).
fn encode_settled(out: &mut Vec<u8>, vhost: &str, settled: &[(Arc<str>, u64)]) {
    out.push(b'S');
    put_short(out, vhost.as_bytes());
    out.extend_from_slice(&(settled.len() as u32).to_le_bytes());
    for (queue, stored) in settled {
        out.extend_from_slice(&stored.to_le_bytes());
        put_short(out, queue.as_bytes());
    }
}

/// A stored message's return count in one queue.
fn encode_returned(out: &mut Vec<u8>, vhost: &str, queue: &str, stored: u64, returns: u64) {
    out.push(b'R');
    put_short(out, vhost.as_bytes());
    put_short(out, queue.as_bytes());
    out.extend_from_slice(&stored.to_le_bytes());
    out.extend_from_slice(&returns.to_le_bytes());
}

fn encode_deleted(out: &mut Vec<u8>, vhost: &str, queue: &str) {
    out.push(b'D');
    put_short(out, vhost.as_bytes());
    put_short(out, queue.as_bytes());
}

enum Record<'a> {
    /// `message`: the encoded exchange, routing key, properties and body
    /// (see [`decode_message`]); recovery does not need to build it.
    Published {
        vhost: &'a str,
        queues: Vec<&'a str>,
        message: &'a [u8],
    },
    /// A live message rewritten at the log's head by compaction: its old
    /// entry counts as settled for these queues in the same record, so a
    /// crash can never leave both copies live.
    Moved {
        from: u64,
        vhost: &'a str,
        queues: Vec<&'a str>,
        message: &'a [u8],
    },
    Settled {
        vhost: &'a str,
        settled: Vec<(u64, &'a str)>,
    },
    Deleted {
        vhost: &'a str,
        queue: &'a str,
    },
    Returned {
        vhost: &'a str,
        queue: &'a str,
        stored: u64,
        returns: u64,
    },
}

fn decode(payload: &[u8]) -> Option<Record<'_>> {
    let mut r = Reader { bytes: payload, at: 0 };
    match r.u8()? {
        tag @ (b'P' | b'M') => {
            let from = if tag == b'M' { Some(r.u64()?) } else { None };
            let vhost = r.short_str()?;
            let count = r.u16()?;
            let mut queues = Vec::with_capacity(count as usize);
            for _ in 0..count {
                queues.push(r.short_str()?);
            }
            let message = r.rest();
            Some(match from {
                Some(from) => Record::Moved { from, vhost, queues, message },
                None => Record::Published { vhost, queues, message },
            })
        }
        b'S' => {
            let vhost = r.short_str()?;
            let count = r.u32()? as usize;
            let mut settled = Vec::with_capacity(count.min(65_536));
            for _ in 0..count {
                let stored = r.u64()?;
                settled.push((stored, r.short_str()?));
            }
            Some(Record::Settled { vhost, settled })
        }
        b'D' => Some(Record::Deleted { vhost: r.short_str()?, queue: r.short_str()? }),
        b'R' => {
            Some(Record::Returned { vhost: r.short_str()?, queue: r.short_str()?, stored: r.u64()?, returns: r.u64()? })
        }
        _ => None,
    }
}

/// Builds the message of a `P` entry from its encoded tail.
fn decode_message(encoded: &[u8]) -> Option<Message> {
    let mut r = Reader { bytes: encoded, at: 0 };
    let exchange = r.short()?;
    let routing_key = r.short()?;
    let props_len = r.u32()? as usize;
    let properties = Properties::parse(Bytes::copy_from_slice(r.take(props_len)?))?;
    let arrived = r.u64()?;
    let body = r.rest();
    let mut builder = Message::builder(exchange, routing_key, &properties, body.len());
    builder.push_body(body);
    let message = builder.finish();
    message.set_arrived(arrived);
    Some(message)
}

/// What recovery needs of an encoded message without building it: its
/// body size (saturated to `u32`) and priority.
fn encoded_summary(encoded: &[u8]) -> Option<(u32, u8)> {
    let mut r = Reader { bytes: encoded, at: 0 };
    r.short()?;
    r.short()?;
    let props_len = r.u32()? as usize;
    let properties = r.take(props_len)?;
    r.u64()?;
    let size = r.rest().len().min(u32::MAX as usize) as u32;
    Some((size, Properties::view(properties).priority().unwrap_or(0)))
}

/// Recovery keeps a message's priority in the top byte of its log index
/// (indices stay far below 2^56).
const PRIORITY_SHIFT: u32 = 56;
const INDEX_MASK: u64 = (1 << PRIORITY_SHIFT) - 1;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io_error(&tmp))?;
    file.write_all(bytes).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))?;
    }
    Ok(())
}

impl Store {
    /// Opens the data directory with the message log on `backend`, restores
    /// durable definitions and messages into the virtual hosts (creating
    /// stored vhosts that are missing).
    pub fn open_with(
        backend: Arc<dyn Backend>,
        data_dir: &Path,
        policy: FsyncPolicy,
        segment_bytes_max: u64,
        vhosts: &mut BTreeMap<String, Arc<VirtualHost>>,
    ) -> Result<(Arc<Store>, Recovered), StoreError> {
        let started = Instant::now();
        std::fs::create_dir_all(data_dir).map_err(io_error(data_dir))?;
        let definitions_path = data_dir.join("definitions.json");
        let stored: BTreeMap<String, Definitions> = match std::fs::read(&definitions_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StoreError::Definitions { path: definitions_path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io_error(&definitions_path)(e)),
        };
        for (name, definitions) in &stored {
            let vhost = vhosts.entry(name.clone()).or_insert_with(|| Arc::new(VirtualHost::new(name)));
            vhost.lock().restore(definitions);
        }

        // Replay while the log recovers (each segment read and checksummed
        // once). Queues are interned; every (entry, queue) pair costs 16
        // bytes, in index order, so settling is a binary search.
        let mut queue_ids: HashMap<(String, String), u32> = HashMap::new();
        let mut queue_names: Vec<(String, String)> = Vec::new();
        // Consecutive records mostly name the same queue: that one is
        // checked first, without allocating.
        let mut last_interned: Option<u32> = None;
        let mut intern = |vhost: &str, queue: &str| -> u32 {
            if let Some(id) = last_interned {
                if let Some((v, q)) = queue_names.get(id as usize) {
                    if v == vhost && q == queue {
                        return id;
                    }
                }
            }
            let id = match queue_ids.get(&(vhost.to_string(), queue.to_string())) {
                Some(id) => *id,
                None => {
                    queue_names.push((vhost.to_string(), queue.to_string()));
                    let id = (queue_names.len() - 1) as u32;
                    queue_ids.insert((vhost.to_string(), queue.to_string()), id);
                    id
                }
            };
            last_interned = Some(id);
            id
        };
        const SETTLED: u32 = u32::MAX;
        // Return counts by (log index, queue); moved entries carry theirs.
        let mut returns: HashMap<(u64, u32), u64> = HashMap::new();
        // (priority << 56 | log index, queue, body size): 16 bytes per
        // queue entry, in index order.
        let mut live: Vec<(u64, u32, u32)> = Vec::new();
        let mut undecodable = 0u64;
        let (log, log_recovery) = Log::open_visiting(
            backend,
            &data_dir.join("wal"),
            LogOptions { segment_bytes_max },
            |index, _, payload| match decode(payload) {
                Some(Record::Published { vhost, queues, message }) => {
                    let (size, priority) = encoded_summary(message).unwrap_or((0, 0));
                    let key = index | u64::from(priority) << PRIORITY_SHIFT;
                    for queue in queues {
                        live.push((key, intern(vhost, queue), size));
                    }
                }
                Some(Record::Moved { from, vhost, queues, message }) => {
                    let (size, priority) = encoded_summary(message).unwrap_or((0, 0));
                    let key = index | u64::from(priority) << PRIORITY_SHIFT;
                    let ids: Vec<u32> = queues.iter().map(|q| intern(vhost, q)).collect();
                    let start = live.partition_point(|(i, _, _)| *i & INDEX_MASK < from);
                    for entry in live[start..].iter_mut().take_while(|(i, _, _)| *i & INDEX_MASK == from) {
                        if ids.contains(&entry.1) {
                            entry.1 = SETTLED;
                        }
                    }
                    for id in &ids {
                        if let Some(count) = returns.remove(&(from, *id)) {
                            returns.insert((index, *id), count);
                        }
                    }
                    live.extend(ids.into_iter().map(|id| (key, id, size)));
                }
                Some(Record::Returned { vhost, queue, stored, returns: count }) => {
                    returns.insert((stored, intern(vhost, queue)), count);
                }
                Some(Record::Settled { vhost, settled }) => {
                    for (stored, queue) in settled {
                        let id = intern(vhost, queue);
                        let start = live.partition_point(|(i, _, _)| *i & INDEX_MASK < stored);
                        for entry in live[start..].iter_mut().take_while(|(i, _, _)| *i & INDEX_MASK == stored) {
                            if entry.1 == id {
                                entry.1 = SETTLED;
                                break;
                            }
                        }
                    }
                }
                Some(Record::Deleted { vhost, queue }) => {
                    let id = intern(vhost, queue);
                    for entry in live.iter_mut().filter(|(_, q, _)| *q == id) {
                        entry.1 = SETTLED;
                    }
                }
                None => undecodable += 1,
            },
        )?;
        if undecodable > 0 {
            warn!(undecodable, "log entries that are not Warren records were skipped");
        }
        let mut liveness = Liveness::default();
        let mut recovered = Recovered { log: log_recovery, ..Recovered::default() };
        let mut previous = 0;
        let mut bucket_run: Option<(u64, u64)> = None;
        // One lock per run of entries in the same virtual host.
        let mut locked: Option<(&str, parking_lot::MutexGuard<'_, warren_core::VirtualHostState>)> = None;
        for (key, id, size) in live.into_iter().filter(|(_, q, _)| *q != SETTLED) {
            let (index, priority) = (key & INDEX_MASK, (key >> PRIORITY_SHIFT) as u8);
            let Some((vhost_name, queue)) = queue_names.get(id as usize) else { continue };
            if locked.as_ref().is_none_or(|(name, _)| *name != vhost_name.as_str()) {
                locked = None;
                let Some(vhost) = vhosts.get(vhost_name) else { continue };
                locked = Some((vhost_name.as_str(), vhost.lock()));
            }
            let Some((_, state)) = locked.as_mut() else { continue };
            let count = if returns.is_empty() { 0 } else { returns.get(&(index, id)).copied().unwrap_or(0) };
            if state.recover_stored(queue, index, u64::from(size), priority, count) {
                recovered.queue_entries += 1;
                if index != previous {
                    recovered.messages += 1;
                    previous = index;
                }
                // Entries come in index order: count a bucket's run at once.
                let bucket = index / BUCKET_INDICES;
                match &mut bucket_run {
                    Some((b, refs)) if *b == bucket => *refs += 1,
                    _ => {
                        if let Some((b, refs)) = bucket_run.replace((bucket, 1)) {
                            liveness.add_to_bucket(b, refs);
                        }
                    }
                }
            }
        }
        drop(locked);
        if let Some((bucket, refs)) = bucket_run {
            liveness.add_to_bucket(bucket, refs);
        }

        let (durable_tx, _) = watch::channel(log.next_index().saturating_sub(1));
        let durable = Arc::new(durable_tx);
        let notify = durable.clone();
        let commit = GroupCommit::start(log, policy, move |index| {
            notify.send_replace(index);
        })?;
        recovered.millis = started.elapsed().as_millis();
        info!(
            messages = recovered.messages,
            queue_entries = recovered.queue_entries,
            millis = recovered.millis,
            "durable state recovered"
        );
        // Deduplication windows, written every second by the janitor.
        let dedup_path = data_dir.join("dedup.json");
        let dedup: DedupKeys = match std::fs::read(&dedup_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                warn!(%error, "deduplication keys unreadable; starting with empty windows");
                DedupKeys::new()
            }),
            Err(_) => DedupKeys::new(),
        };
        for (vhost_name, queues) in &dedup {
            let Some(vhost) = vhosts.get(vhost_name) else { continue };
            let mut state = vhost.lock();
            for (queue, keys) in queues {
                let keys: Vec<(Vec<u8>, u64)> =
                    keys.iter().filter_map(|(key, until)| Some((from_hex(key)?, *until))).collect();
                state.restore_dedup(queue, &keys);
            }
        }
        let store = Store {
            commit,
            durable,
            live: Mutex::new(liveness),
            moved_until: Mutex::new(0),
            definitions_path,
            definitions: Mutex::new(stored),
            dedup_path,
            dedup: Mutex::new(dedup),
        };
        Ok((Arc::new(store), recovered))
    }

    /// Durable log index, as a watch for connections waiting on confirms.
    pub fn durable_watch(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    pub fn durable_index(&self) -> u64 {
        self.commit.durable_index()
    }

    pub fn is_poisoned(&self) -> bool {
        self.commit.is_poisoned()
    }

    pub fn commit_stats(&self) -> warren_storage::group::Stats {
        self.commit.stats()
    }

    /// Appends journal events of one virtual host, in order. Returns the log
    /// index of the last `P` entry, which a publisher confirm waits for.
    pub fn append(
        &self,
        vhost: &str,
        events: &mut Vec<JournalEvent>,
        scratch: &mut Vec<u8>,
    ) -> Result<Option<u64>, StorageError> {
        let mut last_published = None;
        let mut live = self.live.lock();
        let mut events = events.drain(..).peekable();
        while let Some(event) = events.next() {
            scratch.clear();
            match event {
                JournalEvent::Published { message, queues } => {
                    encode_published(scratch, vhost, &message, &queues);
                    let index = self.commit.append(scratch)?;
                    message.set_stored_index(index);
                    live.add(index, queues.len() as u32);
                    last_published = Some(index);
                }
                JournalEvent::Settled { queue, stored } => {
                    // A run of settlements (an ack with `multiple`, a purge)
                    // becomes one entry.
                    let mut settled = vec![(queue, stored)];
                    while let Some(JournalEvent::Settled { .. }) = events.peek() {
                        if let Some(JournalEvent::Settled { queue, stored }) = events.next() {
                            settled.push((queue, stored));
                        }
                    }
                    encode_settled(scratch, vhost, &settled);
                    self.commit.append(scratch)?;
                    for (_, stored) in settled {
                        live.settle(stored);
                    }
                }
                JournalEvent::QueueDeleted { queue } => {
                    encode_deleted(scratch, vhost, &queue);
                    self.commit.append(scratch)?;
                }
                JournalEvent::Returned { queue, stored, returns } => {
                    encode_returned(scratch, vhost, &queue, stored, returns);
                    self.commit.append(scratch)?;
                }
            }
        }
        Ok(last_published)
    }

    /// Writes what a virtual host's last operations changed, while its lock
    /// is held (so log order is lock order): durable definitions first,
    /// then its journal. Returns the log index of the last `P` entry, or
    /// the error (already logged) if the store refused (poisoned). `events`
    /// and `scratch` are the caller's reusable buffers.
    pub fn flush(
        &self,
        state: &mut VirtualHostState,
        events: &mut Vec<JournalEvent>,
        scratch: &mut Vec<u8>,
    ) -> Result<Option<u64>, StorageError> {
        if state.take_definitions_changed() {
            if let Err(error) = self.save_definitions(&state.name, state.durable_definitions()) {
                tracing::error!(%error, "saving durable definitions failed");
            }
        }
        if !state.has_journal() {
            return Ok(None);
        }
        state.drain_journal(events);
        self.append(&state.name, events, scratch).inspect_err(|error| {
            tracing::error!(%error, "the store refused journal entries");
        })
    }

    /// Stores a virtual host's durable definitions (atomically, fsynced).
    pub fn save_definitions(&self, vhost: &str, definitions: Definitions) -> Result<(), StoreError> {
        let mut all = self.definitions.lock();
        all.insert(vhost.to_string(), definitions);
        let bytes = serde_json::to_vec_pretty(&*all)
            .map_err(|source| StoreError::Definitions { path: self.definitions_path.clone(), source })?;
        replace_file(&self.definitions_path, &bytes)
    }

    /// Drops a deleted virtual host's durable definitions.
    pub fn forget_vhost(&self, vhost: &str) -> Result<(), StoreError> {
        let mut all = self.definitions.lock();
        if all.remove(vhost).is_none() {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&*all)
            .map_err(|source| StoreError::Definitions { path: self.definitions_path.clone(), source })?;
        replace_file(&self.definitions_path, &bytes)
    }

    /// Stores the deduplication windows that changed in each virtual host
    /// (atomically replaced file). Blocking: run it off the async runtime.
    pub fn save_dedup(&self, vhosts: &[Arc<VirtualHost>]) -> Result<(), StoreError> {
        let mut all = self.dedup.lock();
        let mut changed = false;
        for vhost in vhosts {
            let mut state = vhost.lock();
            let changes = state.take_dedup_changes();
            let queues = all.entry(state.name.clone()).or_default();
            for (queue, keys) in changes {
                changed = true;
                queues.insert(queue, keys.iter().map(|(key, until)| (to_hex(key), *until)).collect());
            }
            queues.retain(|queue, _| state.queue(queue).is_some());
        }
        if !changed {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&*all)
            .map_err(|source| StoreError::Definitions { path: self.dedup_path.clone(), source })?;
        replace_file(&self.dedup_path, &bytes)
    }

    /// Deletes log segments that hold no live message. Blocking (it may wait
    /// for an fsync): run it off the async runtime.
    pub fn reclaim(&self) -> Result<usize, StorageError> {
        let oldest_live = self.live.lock().oldest_index();
        let durable = self.commit.durable_index();
        if durable < *self.moved_until.lock() {
            // Moved copies are not durable yet: the originals must stay.
            return Ok(0);
        }
        // Only what is durable may be purged past; live messages pin the rest.
        let before = oldest_live.unwrap_or(durable + 1).min(durable + 1);
        self.commit.purge_prefix(before)
    }

    /// Compaction: when the oldest segment holds only a few live messages
    /// (say one old unacknowledged message in a mostly acknowledged file),
    /// rewrite them at the head of the log and re-key them in their queues,
    /// so the segment can be deleted. Blocking; takes each vhost's lock.
    /// Returns how many messages were moved.
    pub fn compact(&self, vhosts: &[Arc<VirtualHost>]) -> Result<usize, StorageError> {
        const MOVE_AT_MOST: u64 = 256;
        if self.commit.durable_index() < *self.moved_until.lock() {
            return Ok(0);
        }
        let starts = self.commit.with_log(|log| log.segment_starts());
        let (Some(&first), Some(&second)) = (starts.first(), starts.get(1)) else {
            return Ok(0);
        };
        if starts.len() < 3 {
            return Ok(0);
        }
        let live_in_first = self.live.lock().count_in(first..second);
        if live_in_first == 0 || live_in_first > MOVE_AT_MOST {
            return Ok(0);
        }
        let mut moved_count = 0;
        let mut scratch = Vec::new();
        for vhost in vhosts {
            let mut state = vhost.lock();
            let name = state.name.clone();
            let mut moved = HashMap::new();
            let mut failure = None;
            for (old, queues) in state.stored_in(first..second) {
                // An unreadable entry stays where it is (its queue will find
                // out when delivering it); the others still move.
                let Ok(entry) = self.commit.read(old) else { continue };
                let Some(Record::Published { message, .. } | Record::Moved { message, .. }) = decode(&entry.payload)
                else {
                    continue;
                };
                scratch.clear();
                scratch.push(b'M');
                scratch.extend_from_slice(&old.to_le_bytes());
                put_short(&mut scratch, name.as_bytes());
                scratch.extend_from_slice(&(queues.len() as u16).to_le_bytes());
                for queue in &queues {
                    put_short(&mut scratch, queue.as_bytes());
                }
                scratch.extend_from_slice(message);
                let new = match self.commit.append(&scratch) {
                    Ok(new) => new,
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                };
                let mut live = self.live.lock();
                for _ in &queues {
                    live.settle(old);
                }
                live.add(new, queues.len() as u32);
                drop(live);
                moved.insert(old, new);
                let mut until = self.moved_until.lock();
                *until = (*until).max(new);
            }
            moved_count += moved.len();
            // Queued messages may be read back as soon as they are re-keyed,
            // so their new entries must be readable first (the vhost stays
            // locked meanwhile: nothing can read in between).
            if let Some(&last) = moved.values().max() {
                if let Err(error) = self.commit.wait_written(last) {
                    failure.get_or_insert(error);
                    moved.retain(|_, new| *new <= self.commit.written_index());
                }
            }
            // Whatever was appended and written is re-keyed, even if a later
            // append failed.
            state.rekey_stored(&moved);
            if let Some(error) = failure {
                return Err(error);
            }
        }
        if moved_count > 0 {
            info!(moved = moved_count, segment = first, "compacted: live messages moved out of the oldest segment");
        }
        Ok(moved_count)
    }

    /// Commits what is pending and stops the commit thread (shutdown).
    pub fn shutdown(&self) {
        self.commit.shutdown();
    }

    /// Log size on disk and segment count.
    pub fn disk_usage(&self) -> (u64, usize) {
        self.commit.with_log(|log| (log.bytes(), log.segment_count()))
    }
}

impl MessageLoader for Store {
    fn load(&self, stored: u64) -> Option<Message> {
        let entry = match self.commit.read(stored) {
            Ok(entry) => entry,
            Err(error) => {
                warn!(stored, %error, "stored message cannot be read");
                return None;
            }
        };
        match decode(&entry.payload) {
            Some(Record::Published { message, .. } | Record::Moved { message, .. }) => decode_message(message),
            _ => None,
        }
    }

    fn readable_upto(&self) -> u64 {
        self.commit.written_index()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_tracks_the_oldest_needed_entry_per_bucket() {
        let mut live = Liveness::default();
        live.add(10, 2);
        live.add(11, 1);
        live.add(BUCKET_INDICES + 1, 1);
        assert_eq!(live.oldest_index(), Some(0));
        live.settle(10);
        live.settle(10);
        assert_eq!(live.oldest_index(), Some(0), "entry 11 still holds the first bucket");
        live.settle(11);
        assert_eq!(live.oldest_index(), Some(BUCKET_INDICES));
        live.settle(BUCKET_INDICES + 1);
        assert_eq!(live.oldest_index(), None);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(from_hex(&to_hex(b"\x00\xffid-1")), Some(b"\x00\xffid-1".to_vec()));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn records_round_trip() {
        let props = Properties::parse(Bytes::from_static(&[0x10, 0, 2])).unwrap();
        let mut builder = Message::builder(b"ex", b"rk", &props, 3);
        builder.push_body(b"abc");
        let message = builder.finish();
        let mut out = Vec::new();
        encode_published(&mut out, "/", &message, &["q1".into(), "q2".into()]);
        match decode(&out) {
            Some(Record::Published { vhost, queues, message: encoded }) => {
                assert_eq!((vhost, queues), ("/", vec!["q1", "q2"]));
                let m = decode_message(encoded).unwrap();
                assert_eq!(
                    (m.exchange(), m.routing_key(), m.properties(), m.body()),
                    (&b"ex"[..], &b"rk"[..], &[0x10, 0, 2][..], &b"abc"[..])
                );
                assert!(m.persistent);
            }
            _ => panic!("not decoded"),
        }
        out.clear();
        encode_settled(&mut out, "/", &[("q1".into(), 42), ("q2".into(), 43)]);
        match decode(&out) {
            Some(Record::Settled { vhost, settled }) => {
                assert_eq!((vhost, settled), ("/", vec![(42, "q1"), (43, "q2")]))
            }
            _ => panic!("not decoded"),
        }
        out.clear();
        encode_deleted(&mut out, "v", "q");
        assert!(matches!(decode(&out), Some(Record::Deleted { vhost: "v", queue: "q" })));
        out.clear();
        encode_returned(&mut out, "v", "q", 7, 3);
        assert!(matches!(decode(&out), Some(Record::Returned { vhost: "v", queue: "q", stored: 7, returns: 3 })));
        assert!(decode(b"Zjunk").is_none());
        assert!(decode(b"P\x01").is_none());
    }
}
