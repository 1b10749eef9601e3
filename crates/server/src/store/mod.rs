//! The broker's durable state on top of `warren-storage`: persistent
//! messages of durable queues and durable definitions in one shared log.
//!
//! Log entries (one per journal event, in the order events happened under
//! their virtual-host lock), encoded in `record.rs`:
//! - `P` published: vhost, durable queues, exchange, routing key,
//!   properties, body: written once however many queues it reached; its log
//!   index is the message's store id;
//! - `S` settled: messages (by log index) that left queues for good, one
//!   entry per run of settlements (an ack with `multiple`, a purge);
//! - `R` returned: a stored message's return count in a queue;
//! - `M` moved: a live message rewritten at the head by compaction, with
//!   the index of the copy it replaces;
//! - `L` linked: like `P` for a dead-lettered or released delayed copy of
//!   a stored message, without the body: it names the `P`/`M` entry holding
//!   it, which stays live while the copy is (bodies of `LINK_BODY_MIN` and
//!   up; compaction rewrites a copy whole when the body's segment goes);
//! - definitions (`definitions.rs`): `Q` queue declared, `D` queue deleted,
//!   `X`/`x` exchange declared/deleted, `B`/`U` bound/unbound, `V` vhost
//!   deleted.
//!
//! Recovery (`recovery.rs`) replays the log: a message is restored into every
//! queue that has not settled it. A message is live while some queue holds
//! it; segments older than the oldest live message and the oldest definition
//! entry no snapshot covers are deleted by [`Store::reclaim`] (`compaction.rs`).
//! Beside the log: `definitions.json` (the definitions snapshot) and
//! `dedup.json` (`sidecar.rs`).
//!
//! What a confirm means: the `P` entry is fsynced (group commit), see
//! docs/durability.md.

mod compaction;
pub(crate) mod definitions;
mod liveness;
mod record;
mod recovery;
mod sidecar;
pub mod streams;
pub mod tickets;

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;
use tracing::warn;
use warren_core::vhost::JournalEvent;
use warren_core::{Message, MessageLoader, VirtualHostState};
use warren_storage::{GroupCommit, StorageError};

use definitions::{Change, DefinitionsLog};
use liveness::Liveness;
use record::{
    build_message, decode, decode_message, encode_definition, encode_deleted, encode_linked, encode_published,
    encode_returned, encode_settled, split_message, Record,
};
use sidecar::DedupKeys;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot read or write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error("definitions file {path} is invalid: {source}")]
    Definitions { path: PathBuf, source: serde_json::Error },
}

/// What recovery restored.
#[derive(Debug, Default, Clone)]
pub struct Recovered {
    pub messages: u64,
    pub queue_entries: u64,
    pub log: warren_storage::Recovery,
    pub millis: u128,
}

/// The log indices an append gave out that callers wait on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Appended {
    /// The last `P` entry: a publisher confirm waits until it is durable.
    pub published: Option<u64>,
    /// The last definition entry: the reply to the method that changed
    /// definitions waits until it is durable.
    pub definitions: Option<u64>,
    /// The ticket of the commands handed to quorum queues' groups: a
    /// publisher confirm waits until it is resolved (`store::tickets`).
    pub replicated: Option<u64>,
}

/// Takes the journal events of queues whose log is not this store's (the
/// quorum queues this node leads) out of a virtual host's journal, hands
/// them to their Raft groups, and returns the ticket to wait for.
pub trait Replicator: Send + Sync {
    fn take(&self, vhost: &str, events: &mut Vec<JournalEvent>) -> Option<u64>;
}

/// Bodies at least this long are not written again for a dead-lettered or
/// released delayed copy of a stored message: the copy's `L` entry refers
/// to them. Below it, a copy is cheaper to write whole than the ~32 bytes
/// of memory a live reference costs.
pub const LINK_BODY_MIN: usize = 1024;

/// Settlements per `S` entry at most (a purge of millions becomes several
/// entries of bounded size).
const SETTLED_RUN_MAX: usize = 65_536;

pub struct Store {
    commit: GroupCommit,
    durable: Arc<watch::Sender<u64>>,
    live: Mutex<Liveness>,
    /// Highest log index written by compaction; nothing is purged until it
    /// is durable.
    moved_until: Mutex<u64>,
    /// The oldest segment's start and live count when compaction last found
    /// live entries no queue could move (a delayed message, say), and when:
    /// not scanned again until either changes, or for `STUCK_RECHECK`.
    stuck: Mutex<Option<(u64, u64, std::time::Instant)>>,
    /// Times compaction walked the queues (for tests and operators).
    compaction_scans: std::sync::atomic::AtomicU64,
    definitions_path: PathBuf,
    definitions: Mutex<DefinitionsLog>,
    dedup_path: PathBuf,
    /// vhost -> queue -> deduplication keys (hex) and when each is forgotten.
    dedup: Mutex<DedupKeys>,
    /// The log index the saved `dedup.json` is complete up to.
    dedup_index: Mutex<u64>,
    /// Bodies of messages in no log entry, paged out of long queues (none
    /// if it could not be opened: they then stay in memory).
    spill: Option<warren_storage::spill::Spill>,
    spill_failing: std::sync::atomic::AtomicBool,
    /// Where `definitions.json` and `dedup.json` live: the log's backend.
    files: Arc<dyn warren_storage::Backend>,
    /// Set in a cluster: where replicated queues' events go.
    replicator: std::sync::OnceLock<Arc<dyn Replicator>>,
    /// Stream queues' own logs (`streams/`).
    streams: Arc<streams::Streams>,
    /// What confirms wait on besides the log: streams' fsyncs and quorum
    /// queues' commits.
    tickets: Arc<crate::store::tickets::Tickets>,
}

impl Store {
    /// Stream queues' logs.
    pub fn streams(&self) -> Arc<streams::Streams> {
        self.streams.clone()
    }

    /// What confirms wait on besides the log's durable index.
    pub fn tickets(&self) -> Arc<crate::store::tickets::Tickets> {
        self.tickets.clone()
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

    /// What the spill holds (bytes on disk, segment files, bodies).
    pub fn spill_stats(&self) -> warren_storage::spill::SpillStats {
        self.spill.as_ref().map(|s| s.stats()).unwrap_or_default()
    }

    pub fn commit_stats(&self) -> warren_storage::group::Stats {
        self.commit.stats()
    }

    /// Appends journal events of one virtual host, in order, and applies
    /// the definition changes among them. Returns the log indices callers
    /// wait on.
    pub fn append(
        &self,
        vhost: &str,
        events: &mut Vec<JournalEvent>,
        scratch: &mut Vec<u8>,
    ) -> Result<Appended, StorageError> {
        let mut appended = Appended::default();
        let mut streamed = false;
        let mut live = self.live.lock();
        let mut events = events.drain(..).peekable();
        while let Some(event) = events.next() {
            scratch.clear();
            match event {
                JournalEvent::Published { message, queues } => {
                    // A copy of a stored message refers to its body rather
                    // than writing it again, when the body is worth it.
                    let body_at = message.body_at();
                    let linked = body_at != 0 && message.body_len() >= LINK_BODY_MIN;
                    if linked {
                        encode_linked(scratch, vhost, body_at, &message, &queues);
                    } else {
                        encode_published(scratch, vhost, &message, &queues);
                    }
                    let index = self.commit.append(scratch)?;
                    message.set_stored_index(index);
                    live.add(index, queues.len());
                    if linked {
                        live.link(index, queues.len(), body_at);
                    } else {
                        message.set_body_at(0);
                    }
                    appended.published = Some(index);
                }
                JournalEvent::Settled { queue, stored } => {
                    // A run of settlements (an ack with `multiple`, a purge)
                    // becomes one entry.
                    let mut settled = vec![(queue, stored)];
                    while settled.len() < SETTLED_RUN_MAX && matches!(events.peek(), Some(JournalEvent::Settled { .. }))
                    {
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
                JournalEvent::StreamAppended { queue, first, timestamp, messages } => {
                    streamed |= self.streams.append(vhost, &queue, first, timestamp, messages);
                }
                JournalEvent::QueueDeleted { queue } => {
                    self.streams.delete(vhost, &queue);
                    encode_deleted(scratch, vhost, &queue);
                    let index = self.commit.append(scratch)?;
                    self.definitions.lock().apply(index, vhost, Change::QueueDeleted(&queue));
                    appended.definitions = Some(index);
                }
                JournalEvent::Returned { queue, stored, returns, retry_at_ms } => {
                    encode_returned(scratch, vhost, &queue, stored, returns, retry_at_ms);
                    self.commit.append(scratch)?;
                }
                definition => {
                    let Some(change) = definitions::change_of(&definition) else { continue };
                    if !encode_definition(scratch, vhost, &definition) {
                        continue;
                    }
                    let index = self.commit.append(scratch)?;
                    self.definitions.lock().apply(index, vhost, change);
                    appended.definitions = Some(index);
                }
            }
        }
        if streamed {
            appended.replicated = Some(self.streams.commit());
        }
        Ok(appended)
    }

    /// Writes a virtual host's journal while its lock is held (so log order
    /// is lock order). Returns what was appended, or the error (already
    /// logged) if the store refused (poisoned). `events` and `scratch` are
    /// the caller's reusable buffers.
    pub fn flush(
        &self,
        state: &mut VirtualHostState,
        events: &mut Vec<JournalEvent>,
        scratch: &mut Vec<u8>,
    ) -> Result<Appended, StorageError> {
        if !state.has_journal() {
            return Ok(Appended::default());
        }
        state.drain_journal(events);
        let replicated = self.replicator.get().and_then(|r| r.take(&state.name, events));
        let mut appended = self.append(&state.name, events, scratch).inspect_err(|error| {
            tracing::error!(%error, "the store refused journal entries");
        })?;
        // A publish both to a stream and to a quorum queue waits for both.
        appended.replicated = match (appended.replicated, replicated) {
            (Some(a), Some(b)) => Some(self.tickets.join(a, b)),
            (a, b) => a.or(b),
        };
        Ok(appended)
    }

    /// Sends replicated queues' journal events to `replicator` from now on.
    pub fn set_replicator(&self, replicator: Arc<dyn Replicator>) {
        let _ = self.replicator.set(replicator);
    }

    /// Blocks until the log is durable up to `index`; fails if the store
    /// is poisoned first.
    fn wait_durable(&self, index: u64) -> Result<(), StorageError> {
        while self.commit.durable_index() < index {
            if self.commit.is_poisoned() {
                return Err(StorageError::Poisoned);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    /// Commits what is pending and stops the commit thread (shutdown).
    pub fn shutdown(&self) {
        self.streams.shutdown();
        self.commit.shutdown();
    }

    fn read_entry(&self, index: u64) -> Option<warren_storage::log::Entry> {
        match self.commit.read(index) {
            Ok(entry) => Some(entry),
            Err(error) => {
                warn!(index, %error, "stored message cannot be read");
                None
            }
        }
    }

    /// An `L` entry's message rebuilt whole, encoded as a `P` entry's tail
    /// (compaction rewrites it so).
    fn linked_message(&self, body_at: u64, head: &[u8], body_len: u64) -> Option<Vec<u8>> {
        let entry = self.read_entry(body_at)?;
        let body = body_of(&entry.payload, body_len)?;
        Some([head, body].concat())
    }

    /// `L` entries still referring to a body (for tests and operators).
    pub fn linked_entries(&self) -> usize {
        self.live.lock().links()
    }

    /// Log size on disk and segment count.
    pub fn disk_usage(&self) -> (u64, usize) {
        self.commit.with_log(|log| (log.bytes(), log.segment_count()))
    }
}

/// The body of a `P` or `M` entry's payload, if it is `len` bytes long (an
/// `L` entry only ever refers to such an entry).
fn body_of(payload: &[u8], len: u64) -> Option<&[u8]> {
    let (Record::Published { message, .. } | Record::Moved { message, .. }) = decode(payload)? else {
        return None;
    };
    let (_, body) = split_message(message)?;
    (body.len() as u64 == len).then_some(body)
}

// The queues' and the spill's idea of a spill reference are the same.
const _: () = assert!(warren_core::queue::SPILL_FLAG == warren_storage::spill::SPILL_FLAG);

impl MessageLoader for Store {
    fn load(&self, stored: u64) -> Option<Message> {
        if warren_core::queue::is_spilled(stored) {
            let spill = self.spill.as_ref()?;
            return match spill.read(stored) {
                Ok(bytes) => record::decode_message(&bytes),
                Err(error) => {
                    warn!(%error, "a spilled message cannot be read");
                    None
                }
            };
        }
        let entry = self.read_entry(stored)?;
        match decode(&entry.payload) {
            Some(Record::Published { message, .. } | Record::Moved { message, .. }) => decode_message(message),
            Some(Record::Linked { body_at, head, body_len, .. }) => {
                let body = self.read_entry(body_at)?;
                let message = build_message(head, body_of(&body.payload, body_len)?)?;
                message.set_body_at(body_at);
                Some(message)
            }
            _ => None,
        }
    }

    fn readable_upto(&self) -> u64 {
        self.commit.written_index()
    }

    fn spill(&self, message: &Message) -> Option<u64> {
        let spill = self.spill.as_ref()?;
        let mut page = Vec::with_capacity(message.body_len() + message.properties().len() + 64);
        record::encode_message(&mut page, message);
        match spill.append(&page) {
            Ok(reference) => {
                self.spill_failing.store(false, std::sync::atomic::Ordering::Relaxed);
                Some(reference)
            }
            Err(error) => {
                // Said once per failing spell, not per message.
                if !self.spill_failing.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    warn!(%error, "cannot page messages out to the spill; they stay in memory");
                }
                None
            }
        }
    }

    fn release_spilled(&self, reference: u64) {
        if let Some(spill) = &self.spill {
            spill.release(reference);
        }
    }
}
