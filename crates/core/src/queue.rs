//! A queue: ready messages in FIFO order by sequence number, the consumers
//! attached to it, and a round-robin cursor over them.
//!
//! Invariants:
//! - `ready` is sorted by `seq`; a requeued message goes back to the position
//!   its sequence number gives it, so it is redelivered before anything
//!   published after it;
//! - an entry is either loaded (the message in memory) or paged out (only
//!   the log index of its stored copy). Only stored messages are paged out,
//!   and only once their log entry is readable; the first `window` entries
//!   are never paged out by the queue itself, so a consumer mostly reads
//!   from memory while a deep queue costs 24 bytes per message.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::num::NonZeroU64;
use std::sync::Arc;

use warren_codec::types::FieldTable;

use crate::lane::{Body, Entry, Lane};
use crate::message::Message;
use crate::settings::QueueSettings;
use crate::{ChannelKey, ConnectionId, QueueId};

/// Reads stored messages back (implemented by the server over its log).
pub trait MessageLoader: Send + Sync {
    /// The message whose log entry (or spill reference, [`is_spilled`]) has
    /// this index, if it can be read.
    fn load(&self, stored: u64) -> Option<Message>;
    /// Entries up to this index can be loaded.
    fn readable_upto(&self) -> u64;
    /// Whether the message stored under `stored` can be read back now (so
    /// its body may leave memory).
    fn can_page(&self, stored: u64) -> bool {
        stored <= self.readable_upto()
    }
    /// Writes a message that is in no log entry (transient, or in a
    /// non-durable queue) to the spill; its reference, or `None` to keep it
    /// in memory.
    fn spill(&self, _message: &Message) -> Option<u64> {
        None
    }
    /// A spilled body is no longer needed (read back, or dropped unread).
    fn release_spilled(&self, _reference: u64) {}
}

/// A queue's own [`MessageLoader`].
#[derive(Clone)]
pub struct OwnLoader(pub Arc<dyn MessageLoader>);

impl std::fmt::Debug for OwnLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnLoader")
    }
}

/// Set in spill references, never in a log index: a paged entry holds
/// either.
pub const SPILL_FLAG: u64 = 1 << 62;

/// Whether a paged entry's index is a spill reference.
pub fn is_spilled(index: u64) -> bool {
    index & SPILL_FLAG != 0
}

/// Keys of messages seen recently (deduplication), oldest first.
#[derive(Debug, Default)]
pub struct DedupWindow {
    /// key -> when it is forgotten (ms)
    keys: HashMap<Arc<[u8]>, u64>,
    order: VecDeque<(u64, Arc<[u8]>)>,
    /// Changed since the last snapshot.
    pub(crate) changed: bool,
}

impl DedupWindow {
    /// True if `key` was seen and not yet forgotten.
    pub fn contains(&self, key: &[u8], now: u64) -> bool {
        self.keys.get(key).is_some_and(|until| *until > now)
    }

    /// True if `key` was seen and not yet forgotten; else remembers it
    /// until `now + window`.
    #[cfg(test)]
    pub fn seen(&mut self, key: &[u8], now: u64, window: u64, max_keys: usize) -> bool {
        if self.contains(key, now) {
            return true;
        }
        self.remember(Arc::from(key), now.saturating_add(window), max_keys);
        false
    }

    pub fn remember(&mut self, key: Arc<[u8]>, until: u64, max_keys: usize) {
        self.keys.insert(key.clone(), until);
        self.order.push_back((until, key));
        self.changed = true;
        while self.keys.len() > max_keys {
            let Some((until, key)) = self.order.pop_front() else { break };
            if self.keys.get(&key) == Some(&until) {
                self.keys.remove(&key);
            }
        }
    }

    /// Forgets keys whose window ended by `now`.
    pub fn expire(&mut self, now: u64) {
        while let Some((until, _)) = self.order.front() {
            if *until > now {
                break;
            }
            if let Some((until, key)) = self.order.pop_front() {
                if self.keys.get(&key) == Some(&until) {
                    self.keys.remove(&key);
                    self.changed = true;
                }
            }
        }
    }

    /// Every remembered key with the time it is forgotten.
    pub fn entries(&self) -> impl Iterator<Item = (&[u8], u64)> {
        self.keys.iter().map(|(key, until)| (&**key, *until))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A ready message handed out by [`Queue::pop`].
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub seq: u64,
    pub message: Arc<Message>,
    pub redelivered: bool,
}

/// A view of a ready entry.
pub struct EntryRef<'a> {
    pub seq: u64,
    pub redelivered: bool,
    /// None when the body is paged out.
    pub message: Option<&'a Arc<Message>>,
    /// Log index of the stored copy, 0 if not stored.
    pub stored: u64,
    /// Spill reference of a paged-out transient body, 0 if none.
    pub spilled: u64,
}

#[derive(Debug, Clone)]
pub struct QueueConsumer {
    pub channel: ChannelKey,
    pub tag: Arc<str>,
    pub exclusive: bool,
    /// `x-priority`: higher is served first.
    pub priority: i64,
    /// A stream consumer's own place in the stream.
    pub stream: Option<Box<crate::stream::StreamCursor>>,
}

/// Entries at the head of a queue that stay in memory, by default.
pub const LOADED_WINDOW: usize = 1024;

/// Entries at the head of a queue that stay in memory while memory use is
/// above the paging ratio of the high watermark.
pub const PRESSURE_WINDOW: usize = 16;

/// How much of a queue's head stays in memory; the rest of its bodies are
/// paged to disk (the log for stored messages, the spill for the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    /// Most messages kept in memory.
    pub messages: usize,
    /// Most body bytes kept in memory, judged by the queue's mean message
    /// size (at least one message stays).
    pub bytes: u64,
    /// Memory use passed the paging ratio: every queue keeps at most
    /// [`PRESSURE_WINDOW`] messages in memory.
    pub pressure: bool,
}

impl Default for Paging {
    fn default() -> Paging {
        Paging { messages: LOADED_WINDOW, bytes: 8 * 1024 * 1024, pressure: false }
    }
}

impl Paging {
    /// The in-memory window of a queue holding `len` messages of `bytes`.
    pub fn window(&self, len: usize, bytes: u64) -> usize {
        let mut window = self.messages.max(1);
        if len > 0 && bytes > 0 {
            let mean = (bytes / len as u64).max(1);
            window = window.min(usize::try_from(self.bytes / mean).unwrap_or(usize::MAX).max(1));
        }
        if self.pressure {
            window = window.min(PRESSURE_WINDOW);
        }
        window
    }
}

#[derive(Debug)]
pub struct Queue {
    pub id: QueueId,
    pub name: Arc<str>,
    pub durable: bool,
    pub exclusive_owner: Option<ConnectionId>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    pub(crate) settings: QueueSettings,
    /// One lane per priority (`x-max-priority` + 1), or one; higher lanes
    /// are served first.
    lanes: Vec<Lane>,
    ready_len: usize,
    /// Body bytes of the ready messages (`x-max-length-bytes`).
    ready_bytes: u64,
    /// Returns so far of messages that were delivered and came back, by
    /// sequence number (`x-delivery-limit`, `x-delivery-count`).
    pub(crate) returns: HashMap<u64, u64>,
    /// Deadlines of messages with their own `expiration`, soonest first, so
    /// they leave the queue wherever they are in it. Entries of messages
    /// already gone are skipped when they come up.
    expiring: BinaryHeap<Reverse<(u64, u64)>>,
    /// Last time the queue was used (`x-expires`), milliseconds.
    pub(crate) last_used: u64,
    /// Messages waiting for a retry (`x-retry-*`): (due, seq) soonest first,
    /// and the messages by seq. They are neither ready nor unacked.
    retry_due: BinaryHeap<Reverse<(u64, u64)>>,
    retrying: HashMap<u64, Arc<Message>>,
    /// Deduplication keys (`x-message-deduplication`).
    pub(crate) dedup: DedupWindow,
    next_seq: u64,
    /// Entries from this sequence number on have not been offered to a
    /// consumer yet: the dispatch their publish triggers delivers them even
    /// with a TTL of 0, as RabbitMQ hands a message to a waiting consumer
    /// before it can expire.
    pub(crate) offered_below: u64,
    /// Stored messages that could not be read back (dropped, to be settled).
    pub(crate) unreadable: Vec<u64>,
    pub consumers: Vec<QueueConsumer>,
    pub(crate) cursor: usize,
    pub(crate) had_consumer: bool,
    /// Messages delivered and not yet settled.
    pub unacked: u64,
    pub stats: crate::stats::MessageStats,
    pub(crate) paging: Paging,
    /// On its virtual host's list of queues with paging left to do.
    pub(crate) paging_due: bool,
    /// A quorum queue led from this node: its journal goes to its Raft
    /// group, keyed by each message's own stored index, and its bodies
    /// stay in memory (the log that holds them is the group's).
    pub replicated: bool,
    /// Where this queue's bodies are read back from, when not the virtual
    /// host's store (a quorum queue's come from its group's log).
    pub own_loader: Option<OwnLoader>,
    /// A quorum queue led from another node: publishes to it are handed
    /// to its leader through the cluster (journaled, never kept here), and
    /// it cannot be consumed from here.
    pub remote: bool,
    /// A stream (`x-queue-type: stream`): its messages are numbered into
    /// the store's log instead of entering the lanes.
    pub stream: Option<Box<crate::stream::StreamState>>,
}

impl Queue {
    pub fn new(
        id: QueueId,
        name: &str,
        durable: bool,
        exclusive_owner: Option<ConnectionId>,
        auto_delete: bool,
        arguments: FieldTable,
        settings: QueueSettings,
    ) -> Queue {
        let lanes = settings.max_priority.map_or(1, |max| usize::from(max) + 1);
        Queue {
            id,
            name: name.into(),
            durable,
            exclusive_owner,
            auto_delete,
            arguments,
            settings,
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            ready_len: 0,
            ready_bytes: 0,
            returns: HashMap::new(),
            expiring: BinaryHeap::new(),
            last_used: 0,
            retry_due: BinaryHeap::new(),
            retrying: HashMap::new(),
            dedup: DedupWindow::default(),
            next_seq: 0,
            offered_below: 0,
            unreadable: Vec::new(),
            consumers: Vec::new(),
            cursor: 0,
            had_consumer: false,
            unacked: 0,
            stats: crate::stats::MessageStats::default(),
            paging: Paging::default(),
            paging_due: false,
            replicated: false,
            own_loader: None,
            remote: false,
            stream: None,
        }
    }

    /// Its in-memory window now.
    pub fn window(&self) -> usize {
        // A replicated queue pages only with a loader of its own.
        if self.replicated && self.own_loader.is_none() {
            return usize::MAX;
        }
        self.paging.window(self.ready_len, self.ready_bytes)
    }

    /// Ready messages whose bodies are in memory.
    pub fn loaded_len(&self) -> usize {
        self.lanes.iter().map(Lane::loaded_len).sum()
    }

    /// True while bodies wait to be paged out.
    pub(crate) fn needs_paging(&self) -> bool {
        let window = self.window();
        self.ready_len > window && self.lanes.iter().any(|lane| lane.needs_paging(window))
    }

    /// New settings (a policy changed). The priority lanes stay as they
    /// were declared.
    pub(crate) fn update_settings(&mut self, mut settings: QueueSettings) {
        settings.max_priority = self.settings.max_priority;
        self.settings = settings;
    }

    pub fn len(&self) -> usize {
        self.ready_len
    }

    pub fn is_empty(&self) -> bool {
        self.ready_len == 0
    }

    /// True if this entry is being offered to consumers for the first time.
    pub(crate) fn is_fresh(&self, entry: &QueuedMessage) -> bool {
        !entry.redelivered && entry.seq >= self.offered_below
    }

    /// Every entry so far has been offered to consumers.
    pub(crate) fn mark_offered(&mut self) {
        self.offered_below = self.next_seq;
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Body bytes of the ready messages.
    pub fn bytes(&self) -> u64 {
        self.ready_bytes
    }

    /// The lane of a message priority: above the queue's maximum counts as
    /// the maximum, as in RabbitMQ.
    fn lane_of(&self, priority: u8) -> usize {
        usize::from(priority).min(self.lanes.len() - 1)
    }

    /// The highest lane holding something.
    fn top_lane(&self) -> Option<usize> {
        self.lanes.iter().rposition(|lane| !lane.is_empty())
    }

    fn track_expiry(&mut self, message: &Message, seq: u64) {
        if message.expiration().is_some() {
            if let Some(deadline) = message.deadline(self.settings.message_ttl_ms) {
                self.expiring.push(Reverse((deadline, seq)));
            }
        }
    }

    pub fn push(&mut self, message: Arc<Message>) {
        self.push_loaded(message, false);
    }

    /// Adds a message taken over from another node's leadership: it may
    /// have been delivered there, so it is marked redelivered. Returns its
    /// sequence number.
    pub fn push_recovered(&mut self, message: Arc<Message>) -> u64 {
        self.push_loaded(message, true)
    }

    fn push_loaded(&mut self, message: Arc<Message>, redelivered: bool) -> u64 {
        let seq = self.next_seq();
        self.ready_bytes += message.body_len() as u64;
        self.ready_len += 1;
        self.track_expiry(&message, seq);
        let lane = self.lane_of(message.priority);
        let window = self.window();
        self.lanes[lane].push(Entry::new(seq, redelivered, Body::Loaded(message)), window);
        seq
    }

    /// Adds a message recovered from the store (`size` body bytes), paged
    /// out. It may have been delivered before the restart, so it is marked
    /// redelivered.
    /// Returns its sequence number.
    pub fn push_stored(&mut self, stored: u64, size: u64, priority: u8) -> u64 {
        let Some(index) = NonZeroU64::new(stored) else {
            return u64::MAX;
        };
        self.ready_bytes += size;
        self.ready_len += 1;
        let seq = self.next_seq();
        let lane = self.lane_of(priority);
        self.lanes[lane].push_paged(seq, true, index, 0);
        seq
    }

    /// Body size of the next message, when known without reading it.
    pub fn front_size(&mut self) -> Option<usize> {
        let lane = self.top_lane()?;
        self.lanes[lane].front_mut().map(|entry| match &entry.body {
            Body::Loaded(message) => message.body_len(),
            Body::Paged(..) => 0,
        })
    }

    /// Every ready entry, highest priority first, in delivery order.
    pub fn entries(&self) -> Vec<EntryRef<'_>> {
        let mut all = Vec::with_capacity(self.ready_len);
        self.for_each_entry(|entry| all.push(entry));
        all
    }

    /// Every ready entry, highest priority first, in delivery order.
    pub fn for_each_entry<'a>(&'a self, mut visit: impl FnMut(EntryRef<'a>)) {
        for lane in self.lanes.iter().rev() {
            lane.for_each(|view| {
                visit(EntryRef {
                    seq: view.seq,
                    redelivered: view.redelivered,
                    message: view.message,
                    stored: view.stored,
                    spilled: view.spilled,
                })
            });
        }
    }

    /// Turns a taken entry into a message, reading it back if it was paged
    /// out; unreadable stored messages are dropped into `unreadable`.
    fn materialize(&mut self, entry: Entry, loader: Option<&dyn MessageLoader>) -> Option<QueuedMessage> {
        self.ready_len -= 1;
        let (seq, redelivered) = (entry.seq(), entry.redelivered());
        let message = match entry.body {
            Body::Loaded(message) => message,
            Body::Paged(index, _) => match loader.and_then(|l| l.load(index.get())) {
                Some(message) => {
                    Self::loaded(&message, index.get(), loader);
                    Arc::new(message)
                }
                None if is_spilled(index.get()) => {
                    tracing::error!(queue = %self.name, "a spilled message cannot be read back; dropped");
                    if let Some(loader) = loader {
                        loader.release_spilled(index.get());
                    }
                    return None;
                }
                None => {
                    tracing::error!(queue = %self.name, stored = index.get(), "stored message cannot be read back; dropped");
                    self.unreadable.push(index.get());
                    return None;
                }
            },
        };
        self.ready_bytes = self.ready_bytes.saturating_sub(message.body_len() as u64);
        Some(QueuedMessage { seq, message, redelivered })
    }

    /// A paged body was read back: a stored one keeps its log index, a
    /// spilled one gives its spill space back (it is in memory from now on).
    fn loaded(message: &Message, index: u64, loader: Option<&dyn MessageLoader>) {
        if is_spilled(index) {
            if let Some(loader) = loader {
                loader.release_spilled(index);
            }
        } else {
            message.set_stored_index(index);
        }
    }

    /// Takes the next message, reading it back from the store if it was
    /// paged out. Stored messages that cannot be read are skipped and kept
    /// in `unreadable` for the caller to settle.
    pub fn pop(&mut self, loader: Option<&dyn MessageLoader>) -> Option<QueuedMessage> {
        let own = self.own_loader.clone();
        let loader = own.as_ref().map(|own| &*own.0).or(loader);
        loop {
            let lane = self.top_lane()?;
            let entry = self.lanes[lane].pop_front()?;
            if let Some(message) = self.materialize(entry, loader) {
                return Some(message);
            }
        }
    }

    /// Makes sure the head entry of `lane` is in memory; false if the lane
    /// is empty.
    fn load_front(&mut self, lane: usize, loader: Option<&dyn MessageLoader>) -> bool {
        loop {
            let Some(entry) = self.lanes[lane].front_mut() else {
                return false;
            };
            let Body::Paged(index, _) = entry.body else {
                return true;
            };
            match loader.and_then(|l| l.load(index.get())) {
                Some(message) => {
                    Self::loaded(&message, index.get(), loader);
                    entry.body = Body::Loaded(Arc::new(message));
                    return true;
                }
                None => {
                    if let Some(entry) = self.lanes[lane].pop_front() {
                        let _ = self.materialize(entry, None);
                    }
                }
            }
        }
    }

    /// Takes a lane's head if it has expired by `now` (deadlines are due
    /// when strictly in the past, so a TTL of 0 still reaches a waiting
    /// consumer). Under a queue TTL each lane is in deadline order.
    /// With `need_body` false (no dead-letter exchange), a paged message
    /// whose arrival second shows it is past the TTL is dropped unread and
    /// its log index returned as `Err`.
    pub fn pop_expired_head(
        &mut self,
        now: u64,
        loader: Option<&dyn MessageLoader>,
        need_body: bool,
    ) -> Option<Result<QueuedMessage, u64>> {
        let own = self.own_loader.clone();
        let loader = own.as_ref().map(|own| &*own.0).or(loader);
        for lane in (0..self.lanes.len()).rev() {
            if let (false, Some(ttl)) = (need_body, self.settings.message_ttl_ms) {
                if let Some(Entry { body: Body::Paged(index, arrived_s), .. }) = self.lanes[lane].front_mut() {
                    // The latest it could have arrived is the end of that second.
                    let latest = u64::from(*arrived_s) * 1000 + 999;
                    if *arrived_s != 0 && latest.saturating_add(ttl) < now {
                        let mut stored = index.get();
                        if is_spilled(stored) {
                            if let Some(loader) = loader {
                                loader.release_spilled(stored);
                            }
                            stored = 0;
                        }
                        let _ = self.lanes[lane].pop_front();
                        self.ready_len -= 1;
                        // Its size is unknown unread; the byte count is
                        // corrected when the queue empties.
                        if self.ready_len == 0 {
                            self.ready_bytes = 0;
                        }
                        return Some(Err(stored));
                    }
                }
            }
            if !self.load_front(lane, loader) {
                continue;
            }
            let Some(Body::Loaded(message)) = self.lanes[lane].front_mut().map(|e| &e.body) else {
                continue;
            };
            if message.deadline(self.settings.message_ttl_ms).is_some_and(|deadline| deadline < now) {
                let entry = self.lanes[lane].pop_front()?;
                return self.materialize(entry, loader).map(Ok);
            }
        }
        None
    }

    /// Takes messages whose own `expiration` passed by `now`, wherever they
    /// are in the queue.
    pub fn pop_expired_anywhere(&mut self, now: u64, loader: Option<&dyn MessageLoader>, out: &mut Vec<QueuedMessage>) {
        let own = self.own_loader.clone();
        let loader = own.as_ref().map(|own| &*own.0).or(loader);
        while let Some(&Reverse((deadline, seq))) = self.expiring.peek() {
            if deadline >= now {
                break;
            }
            self.expiring.pop();
            let found = (0..self.lanes.len()).find_map(|lane| self.lanes[lane].remove_seq(seq));
            if let Some(entry) = found {
                out.extend(self.materialize(entry, loader));
            }
        }
    }

    /// Holds a returned message until `due`, then it is ready again at its
    /// original position.
    pub fn retry_later(&mut self, seq: u64, message: Arc<Message>, due: u64) {
        self.retrying.insert(seq, message);
        self.retry_due.push(Reverse((due, seq)));
    }

    /// Takes a ready message (recovered from the log) out of line until
    /// `due`, as if it had just been returned with a retry delay. False if
    /// it is not there or cannot be read back.
    pub fn hold_for_retry(&mut self, seq: u64, due: u64, loader: Option<&dyn MessageLoader>) -> bool {
        let own = self.own_loader.clone();
        let loader = own.as_ref().map(|own| &*own.0).or(loader);
        let Some(entry) = (0..self.lanes.len()).find_map(|lane| self.lanes[lane].remove_seq(seq)) else {
            return false;
        };
        match self.materialize(entry, loader) {
            Some(queued) => {
                self.retry_later(seq, queued.message, due);
                true
            }
            None => false,
        }
    }

    /// Forgets the messages waiting for a retry.
    pub fn clear_retrying(&mut self) {
        self.retrying.clear();
        self.retry_due.clear();
    }

    /// Messages waiting for a retry.
    pub fn retrying(&self) -> impl Iterator<Item = &Arc<Message>> {
        self.retrying.values()
    }

    /// Makes retries due by `now` ready again; returns how many.
    pub fn release_retries(&mut self, now: u64) -> usize {
        let mut released = 0;
        while let Some(&Reverse((due, seq))) = self.retry_due.peek() {
            if due > now {
                break;
            }
            self.retry_due.pop();
            if let Some(message) = self.retrying.remove(&seq) {
                self.requeue(seq, message);
                released += 1;
            }
        }
        released
    }

    /// Earliest pending per-message deadline.
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiring.peek().map(|Reverse((deadline, _))| *deadline)
    }

    /// Puts a delivered message back where it was, marked redelivered.
    pub fn requeue(&mut self, seq: u64, message: Arc<Message>) {
        self.ready_bytes += message.body_len() as u64;
        self.ready_len += 1;
        self.track_expiry(&message, seq);
        let lane = self.lane_of(message.priority);
        self.lanes[lane].requeue(Entry::new(seq, true, Body::Loaded(message)));
    }

    /// Pages out up to `budget` bodies beyond each lane's in-memory window
    /// (stored messages once their log entries are readable, the others to
    /// the spill). Cheap enough to call on every publish.
    /// Returns how many moved.
    pub fn page_out(&mut self, loader: &dyn MessageLoader, budget: usize) -> usize {
        let own = self.own_loader.clone();
        let loader = own.as_ref().map_or(loader, |own| &*own.0);
        let mut left = budget;
        let readable = loader.readable_upto();
        let durable = self.durable;
        let window = self.window();
        for lane in self.lanes.iter_mut().rev() {
            left = left.saturating_sub(lane.page_out(readable, left, window, Some(loader), durable));
            if left == 0 {
                break;
            }
        }
        budget - left
    }

    /// Points entries stored at an old log index to the index their message
    /// was moved to (compaction). Loaded entries follow their message.
    pub fn rekey(&mut self, moved: &std::collections::HashMap<u64, u64>) {
        for lane in &mut self.lanes {
            lane.rekey(moved);
        }
    }

    /// Drops every ready message, handing each one's stored index (0 when
    /// not stored) to `dropped` first.
    pub fn purge(&mut self, loader: Option<&dyn MessageLoader>, mut dropped: impl FnMut(u64)) -> usize {
        let own = self.own_loader.clone();
        let loader = own.as_ref().map(|own| &*own.0).or(loader);
        let count = self.ready_len;
        let returns = &mut self.returns;
        for lane in &mut self.lanes {
            lane.drain(|seq, stored, spilled| {
                returns.remove(&seq);
                if spilled != 0 {
                    if let Some(loader) = loader {
                        loader.release_spilled(spilled);
                    }
                }
                dropped(stored);
            });
        }
        self.ready_len = 0;
        self.ready_bytes = 0;
        self.expiring.clear();
        count
    }

    pub fn is_exclusive_to_other(&self, connection: ConnectionId) -> bool {
        self.exclusive_owner.is_some_and(|owner| owner != connection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_codec::properties::Properties;

    fn msg(body: &[u8]) -> Arc<Message> {
        let mut builder = Message::builder(b"", b"q", &Properties::empty(), body.len());
        builder.push_body(body);
        Arc::new(builder.finish())
    }

    #[test]
    fn requeued_messages_return_to_their_original_position() {
        let mut queue = Queue::new(1, "q", false, None, false, FieldTable::default(), QueueSettings::default());
        for body in [b"a", b"b", b"c", b"d"] {
            queue.push(msg(body));
        }
        let a = queue.pop(None).unwrap();
        let b = queue.pop(None).unwrap();
        queue.requeue(b.seq, b.message);
        queue.requeue(a.seq, a.message);
        let order: Vec<u8> = std::iter::from_fn(|| queue.pop(None)).map(|m| m.message.body()[0]).collect();
        assert_eq!(order, b"abcd");
    }

    struct Disk;

    impl MessageLoader for Disk {
        fn load(&self, stored: u64) -> Option<Message> {
            (stored != 13).then(|| {
                let body = stored.to_be_bytes();
                let mut builder = Message::builder(b"", b"q", &Properties::empty(), body.len());
                builder.push_body(&body);
                builder.finish()
            })
        }
        fn readable_upto(&self) -> u64 {
            u64::MAX
        }
    }

    #[test]
    fn deep_queues_page_out_stored_messages_and_read_them_back_in_order() {
        let persistent = Properties::parse(bytes::Bytes::from_static(&[0x10, 0, 2])).unwrap();
        let mut queue = Queue::new(1, "q", true, None, false, FieldTable::default(), QueueSettings::default());
        let total = LOADED_WINDOW as u64 + 50;
        for i in 1..=total {
            let body = i.to_be_bytes();
            let mut builder = Message::builder(b"", b"q", &persistent, body.len());
            builder.push_body(&body);
            let message = Arc::new(builder.finish());
            message.set_stored_index(i);
            queue.push(message);
            queue.page_out(&Disk, 2);
        }
        let paged = queue.entries().iter().filter(|e| e.message.is_none()).count();
        assert_eq!(paged, 50, "everything beyond the window is paged out");
        let mut seen = Vec::new();
        while let Some(m) = queue.pop(Some(&Disk)) {
            assert_eq!(m.message.stored_index(), u64::from_be_bytes(m.message.body().try_into().unwrap()));
            seen.push(m.message.stored_index());
        }
        let expected: Vec<u64> =
            (1..=total).filter(|i| *i != 13 || usize::try_from(*i).unwrap() <= LOADED_WINDOW).collect();
        assert_eq!(seen, expected);
        assert!(queue.unreadable.is_empty() || queue.unreadable == vec![13]);
    }

    /// A spill in memory: bodies by reference, and what was released.
    #[derive(Default)]
    struct Spill {
        bodies: parking_lot::Mutex<HashMap<u64, Vec<u8>>>,
        next: std::sync::atomic::AtomicU64,
        released: parking_lot::Mutex<Vec<u64>>,
    }

    impl MessageLoader for Spill {
        fn load(&self, stored: u64) -> Option<Message> {
            assert!(is_spilled(stored), "only spilled bodies here");
            let body = self.bodies.lock().get(&stored)?.clone();
            let mut builder = Message::builder(b"", b"q", &Properties::empty(), body.len());
            builder.push_body(&body);
            Some(builder.finish())
        }
        fn readable_upto(&self) -> u64 {
            0
        }
        fn spill(&self, message: &Message) -> Option<u64> {
            let reference = SPILL_FLAG | self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.bodies.lock().insert(reference, message.body().to_vec());
            Some(reference)
        }
        fn release_spilled(&self, reference: u64) {
            self.released.lock().push(reference);
        }
    }

    #[test]
    fn transient_messages_past_the_window_spill_and_come_back_in_order() {
        let spill = Spill::default();
        let mut queue = Queue::new(1, "q", false, None, false, FieldTable::default(), QueueSettings::default());
        let total = LOADED_WINDOW as u64 + 100;
        for i in 1..=total {
            queue.push(msg(&i.to_be_bytes()));
            queue.page_out(&spill, 2);
        }
        let entries = queue.entries();
        let spilled: Vec<u64> = entries.iter().map(|e| e.spilled).filter(|s| *s != 0).collect();
        assert_eq!(spilled.len(), 100, "everything beyond the window is on disk");
        assert!(entries.iter().all(|e| e.stored == 0), "a spilled body is not a stored one");
        let order: Vec<u64> = std::iter::from_fn(|| queue.pop(Some(&spill)))
            .map(|m| {
                assert_eq!(m.message.stored_index(), 0);
                u64::from_be_bytes(m.message.body().try_into().unwrap())
            })
            .collect();
        assert_eq!(order, (1..=total).collect::<Vec<_>>());
        assert_eq!(spill.released.lock().len(), 100, "read back, each gave its space back");

        // Purged unread, they give it back too.
        for i in 1..=total {
            queue.push(msg(&i.to_be_bytes()));
            queue.page_out(&spill, 2);
        }
        queue.purge(Some(&spill), |stored| assert_eq!(stored, 0));
        assert_eq!(spill.released.lock().len(), 200);

        // Persistent messages of a non-durable queue are in no log entry
        // either: they spill too, rather than stopping the paging.
        let persistent = Properties::parse(bytes::Bytes::from_static(&[0x10, 0, 2])).unwrap();
        for i in 1..=total {
            let body = i.to_be_bytes();
            let mut builder = Message::builder(b"", b"q", &persistent, body.len());
            builder.push_body(&body);
            queue.push(Arc::new(builder.finish()));
            queue.page_out(&spill, 2);
        }
        assert_eq!(queue.entries().iter().filter(|e| e.spilled != 0).count(), 100);
    }

    #[test]
    fn the_window_is_the_tightest_of_messages_bytes_and_pressure() {
        let paging = Paging { messages: 1000, bytes: 1 << 20, pressure: false };
        assert_eq!(paging.window(0, 0), 1000);
        assert_eq!(paging.window(10, 10 * 100), 1000, "small messages: the count binds");
        assert_eq!(paging.window(10, 10 * 16384), 64, "16 KiB messages: 1 MiB holds 64");
        assert_eq!(paging.window(1, 100 << 20), 1, "a message larger than the bound still stays");
        assert_eq!(Paging { pressure: true, ..paging }.window(10, 1000), PRESSURE_WINDOW);
    }

    #[test]
    fn a_shrinking_window_pages_the_head_out_and_keeps_the_order() {
        let spill = Spill::default();
        let mut queue = Queue::new(1, "q", false, None, false, FieldTable::default(), QueueSettings::default());
        let total = LOADED_WINDOW as u64 + 10;
        for i in 1..=total {
            queue.push(msg(&i.to_be_bytes()));
            queue.page_out(&spill, 2);
        }
        assert_eq!(queue.loaded_len(), LOADED_WINDOW);
        assert!(!queue.needs_paging());
        queue.paging.pressure = true;
        assert!(queue.needs_paging());
        let moved = queue.page_out(&spill, usize::MAX);
        assert_eq!(moved, LOADED_WINDOW - PRESSURE_WINDOW);
        assert_eq!(queue.loaded_len(), PRESSURE_WINDOW);
        assert!(!queue.needs_paging());
        // A delivered message that comes back goes to the head.
        let first = queue.pop(Some(&spill)).unwrap();
        queue.requeue(first.seq, first.message);
        assert_eq!(queue.loaded_len(), PRESSURE_WINDOW);
        let order: Vec<u64> = std::iter::from_fn(|| queue.pop(Some(&spill)))
            .map(|m| u64::from_be_bytes(m.message.body().try_into().unwrap()))
            .collect();
        assert_eq!(order, (1..=total).collect::<Vec<_>>());
    }

    #[test]
    fn the_dedup_window_forgets_old_keys_and_keeps_within_its_size() {
        let mut window = DedupWindow::default();
        assert!(!window.seen(b"a", 0, 100, 2));
        assert!(window.seen(b"a", 50, 100, 2));
        assert!(!window.seen(b"b", 60, 100, 2));
        assert!(!window.seen(b"c", 70, 100, 2), "a third key pushes the oldest out");
        assert!(!window.seen(b"a", 80, 100, 2));
        window.expire(170);
        assert_eq!(window.len(), 1, "b and c are forgotten, a (seen again at 80) is not");
        assert!(window.seen(b"a", 170, 100, 2));
    }

    #[test]
    fn entries_stay_small() {
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }
}
