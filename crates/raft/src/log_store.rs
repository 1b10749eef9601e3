//! openraft's log storage over the shared write-ahead log: one
//! [`SharedLog`] per node, one [`LogStore`] per group.
//!
//! An append is acknowledged to openraft (`LogFlushed`) once the shared
//! log's fsync covers it, from the group-commit thread; a vote is saved
//! before `save_vote` returns. Each entry is stored as its term and index
//! (the shared log's own fields) and a payload: a kind byte, then the
//! command's bytes or the encoded membership.

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, CommittedLeaderId, Entry, EntryPayload, LogState, RaftLogReader, StorageError, StorageIOError, Vote,
};
use parking_lot::Mutex;
use tokio::sync::watch;
use warren_storage::{
    Backend, FsyncPolicy, GroupId, GroupLog, GroupLogError, GroupVote, LogOptions, StorageError as WalError,
};

use crate::{Command, LogId, NodeId, TypeConfig};

const BLANK: u8 = 0;
const NORMAL: u8 = 1;
const MEMBERSHIP: u8 = 2;

/// "Voted for nobody" as the log stores it (no node has this id).
const NOBODY: u64 = u64::MAX;

/// Appends waiting for the fsync that makes them durable.
struct Flushes {
    durable: AtomicU64,
    /// The log failed (a write or fsync) or was stopped: nothing more
    /// becomes durable.
    failed: AtomicBool,
    changed: watch::Sender<u64>,
    waiting: Mutex<Vec<(u64, LogFlushed<TypeConfig>)>>,
}

impl Flushes {
    /// Called by the group-commit thread after each fsync, and with the
    /// unchanged durable index when the log is poisoned.
    fn durable(&self, wal: u64) {
        if wal <= self.durable.load(Ordering::Acquire) {
            self.fail();
            return;
        }
        self.durable.store(wal, Ordering::Release);
        self.changed.send_replace(wal);
        let done: Vec<LogFlushed<TypeConfig>> = {
            let mut waiting = self.waiting.lock();
            let (done, rest): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(at, _)| *at <= wal);
            *waiting = rest;
            done.into_iter().map(|(_, flushed)| flushed).collect()
        };
        for flushed in done {
            flushed.log_io_completed(Ok(()));
        }
    }

    fn fail(&self) {
        let waiting: Vec<_> = {
            let mut waiting = self.waiting.lock();
            self.failed.store(true, Ordering::Release);
            waiting.drain(..).collect()
        };
        self.changed.send_modify(|_| {});
        for (_, flushed) in waiting {
            flushed.log_io_completed(Err(std::io::Error::other("the shared log failed or was stopped")));
        }
    }

    fn when_durable(&self, wal: u64, flushed: LogFlushed<TypeConfig>) {
        let mut waiting = self.waiting.lock();
        if self.failed.load(Ordering::Acquire) {
            drop(waiting);
            flushed.log_io_completed(Err(std::io::Error::other("the shared log failed or was stopped")));
            return;
        }
        // Checked under the lock the commit thread drains under: an fsync
        // that lands now either is seen here or finds this entry.
        if self.durable.load(Ordering::Acquire) >= wal {
            drop(waiting);
            flushed.log_io_completed(Ok(()));
        } else {
            waiting.push((wal, flushed));
        }
    }
}

/// A group's entries not yet durable, with their WAL index.
type Tail = VecDeque<(u64, Entry<TypeConfig>)>;

/// A node's write-ahead log for all its groups.
pub struct SharedLog {
    log: GroupLog,
    flushes: Arc<Flushes>,
    /// Per group, the entries appended and not yet durable, with their WAL
    /// index: a leader reads them back at once to replicate them, and the
    /// commit thread may not have written them yet (reading would wait
    /// for it, on a runtime thread).
    tails: Mutex<HashMap<GroupId, Tail>>,
}

impl SharedLog {
    /// Opens (or creates) the shared log in `dir`.
    pub fn open(backend: Arc<dyn Backend>, dir: &Path, policy: FsyncPolicy) -> Result<Arc<SharedLog>, WalError> {
        let (changed, _) = watch::channel(0);
        let flushes = Arc::new(Flushes {
            durable: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            changed,
            waiting: Mutex::new(Vec::new()),
        });
        let listener = flushes.clone();
        let log = GroupLog::open(backend, dir, LogOptions::default(), policy, move |wal| listener.durable(wal))?;
        // What the log held when opened is durable; the listener hears of
        // later fsyncs only.
        flushes.durable.fetch_max(log.durable_index(), Ordering::AcqRel);
        Ok(Arc::new(SharedLog { log, flushes, tails: Mutex::new(HashMap::new()) }))
    }

    /// `group`'s view of the log.
    pub fn store(self: &Arc<Self>, group: GroupId) -> LogStore {
        LogStore { shared: self.clone(), group, keep: None }
    }

    /// Reads `group`'s committed entries back for its state machine.
    pub fn reader(self: &Arc<Self>, group: GroupId) -> LogReader {
        LogReader { shared: self.clone(), group }
    }

    /// The first live entry of `group` (the one after the last purged).
    pub fn first_index(&self, group: GroupId) -> Option<u64> {
        match self.log.state(group) {
            (Some((purged, _)), _) => Some(purged + 1),
            (None, Some(_)) => Some(0),
            (None, None) => None,
        }
    }

    /// Fsyncs, and entries made durable by them, since opening.
    pub fn stats(&self) -> warren_storage::Stats {
        self.log.stats()
    }

    /// Deletes segments no group needs any more. Blocking.
    pub fn reclaim(&self) -> Result<usize, GroupLogError> {
        self.log.reclaim()
    }

    /// Forgets a deleted group's log and vote.
    pub fn drop_group(&self, group: GroupId) -> Result<(), GroupLogError> {
        let mut tails = self.tails.lock();
        self.log.drop_group(group)?;
        tails.remove(&group);
        Ok(())
    }

    /// Groups whose oldest entry is older than the newest `keep` segments.
    pub fn pinning(&self, keep: usize) -> Vec<GroupId> {
        self.log.pinning(keep)
    }

    /// Commits what is pending and stops; later appends fail.
    pub fn shutdown(&self) {
        self.log.shutdown();
        self.flushes.fail();
    }

    async fn until_durable(&self, wal: u64) -> std::io::Result<()> {
        let mut changed = self.flushes.changed.subscribe();
        let failed = || self.flushes.failed.load(Ordering::Acquire);
        // The sender lives as long as `self`, so this ends.
        let _ = changed.wait_for(|durable| *durable >= wal || failed()).await;
        if self.flushes.durable.load(Ordering::Acquire) >= wal {
            Ok(())
        } else {
            Err(std::io::Error::other("the shared log failed or was stopped"))
        }
    }
}

/// One group's log, as openraft sees it.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<SharedLog>,
    group: GroupId,
    /// The first index the state machine still reads entries from: purges
    /// stop below it (a quorum queue's bodies stay in its log).
    keep: Option<KeepFrom>,
}

/// Says from which index a group's entries must be kept, if any.
pub type KeepFrom = Arc<dyn Fn() -> Option<u64> + Send + Sync>;

impl LogStore {
    /// Purges stop below what `keep` names.
    pub fn keeping(mut self, keep: KeepFrom) -> LogStore {
        self.keep = Some(keep);
        self
    }
}

/// A group's committed entries, read back by its state machine (a quorum
/// queue reads message bodies from them).
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<SharedLog>,
    group: GroupId,
}

impl LogReader {
    /// The commands of the entry at `index` (several writes may share an
    /// entry), or `None` if it is not in the log (purged, or not a
    /// command). Blocking: reads files.
    pub fn commands(&self, index: u64) -> Option<Vec<Vec<u8>>> {
        let cached = {
            let tails = self.shared.tails.lock();
            tails
                .get(&self.group)
                .and_then(|tail| tail.iter().find(|(_, e)| e.log_id.index == index).map(|(_, e)| e.clone()))
        };
        let entry = match cached {
            Some(entry) => entry,
            None => {
                let read = self.shared.log.read(self.group, index..index + 1).ok()?;
                let (index, term, payload) = read.into_iter().next()?;
                decode(index, term, &payload).ok()?
            }
        };
        match entry.payload {
            EntryPayload::Normal(command) => {
                crate::batch::decode(&command.0).map(|commands| commands.into_iter().map(<[u8]>::to_vec).collect())
            }
            _ => None,
        }
    }
}

fn log_id(index: u64, term: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 0), index)
}

fn write_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

fn read_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

fn encode(entry: &Entry<TypeConfig>) -> Result<Vec<u8>, StorageError<NodeId>> {
    Ok(match &entry.payload {
        EntryPayload::Blank => vec![BLANK],
        EntryPayload::Normal(command) => {
            let mut out = Vec::with_capacity(1 + command.0.len());
            out.push(NORMAL);
            out.extend_from_slice(&command.0);
            out
        }
        EntryPayload::Membership(membership) => {
            let mut out = vec![MEMBERSHIP];
            bincode::serialize_into(&mut out, membership).map_err(write_error)?;
            out
        }
    })
}

fn decode(index: u64, term: u64, payload: &[u8]) -> Result<Entry<TypeConfig>, StorageError<NodeId>> {
    let log_id = log_id(index, term);
    let payload = match payload.split_first() {
        Some((&BLANK, _)) => EntryPayload::Blank,
        Some((&NORMAL, command)) => EntryPayload::Normal(Command(::bytes::Bytes::copy_from_slice(command))),
        Some((&MEMBERSHIP, membership)) => {
            EntryPayload::Membership(bincode::deserialize(membership).map_err(read_error)?)
        }
        _ => {
            let e =
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("log entry {index} has no known kind"));
            return Err(StorageIOError::read_log_entry(log_id, AnyError::new(&e)).into());
        }
    };
    Ok(Entry { log_id, payload })
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        self.entries(range, usize::MAX).await
    }

    /// What a leader sends a follower in one request: openraft counts
    /// entries (300), and a quorum queue's entries hold its message bodies
    /// (up to 1 MiB each, more for one larger message), so the bytes are
    /// bounded here.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        self.entries(start..end, APPEND_BYTES).await
    }
}

/// A committed index is noted every this many entries: a restart applies
/// the entries up to the note in steps of 64 (openraft's), and at most
/// this many more at once once a leader tells it the rest.
const COMMITTED_EVERY: u64 = 32;

/// About the most payload bytes sent to a follower in one append request.
/// openraft gives an append `heartbeat_interval` (100 ms) to be answered,
/// and sends it again if not: an append that a loaded follower cannot
/// write and fsync within that is sent over and over, and the group stops
/// committing (seen with 4 MiB appends on two cores under load).
const APPEND_BYTES: usize = 1 << 20;

fn payload_len(entry: &Entry<TypeConfig>) -> usize {
    match &entry.payload {
        EntryPayload::Normal(command) => command.0.len(),
        _ => 64,
    }
}

impl LogStore {
    /// The entries in `range` (those there are), stopping once their
    /// payloads reach `max_bytes` (at least one is returned).
    async fn entries<RB: RangeBounds<u64>>(
        &mut self,
        range: RB,
        max_bytes: usize,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        // Recent entries from memory, older ones from the log.
        let (cached, from) = {
            let tails = self.shared.tails.lock();
            let tail = tails.get(&self.group);
            let from = tail.and_then(|t| t.front()).map_or(u64::MAX, |(_, e)| e.log_id.index).max(start);
            let cached: Vec<Entry<TypeConfig>> = tail
                .into_iter()
                .flatten()
                .map(|(_, entry)| entry)
                .filter(|e| e.log_id.index >= from && e.log_id.index < end)
                .cloned()
                .collect();
            (cached, from)
        };
        let mut out = Vec::new();
        if start < from.min(end) {
            // Reading may wait for the commit thread and reads files: not on
            // a runtime thread, which serves connections meanwhile (a
            // follower catching up is sent thousands of entries this way).
            let (shared, group, range) = (self.shared.clone(), self.group, start..from.min(end));
            let read = tokio::task::spawn_blocking(move || shared.log.read_limited(group, range, max_bytes))
                .await
                .map_err(read_error)?;
            for (index, term, payload) in read.map_err(read_error)? {
                out.push(decode(index, term, &payload)?);
            }
        }
        let mut bytes: usize = out.iter().map(payload_len).sum();
        for entry in cached {
            // The file part stops short only once it reached the limit.
            if bytes >= max_bytes {
                break;
            }
            bytes = bytes.saturating_add(payload_len(&entry));
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let (purged, last) = self.shared.log.state(self.group);
        Ok(LogState {
            last_purged_log_id: purged.map(|(index, term)| log_id(index, term)),
            last_log_id: last.map(|(index, term)| log_id(index, term)),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let saved = GroupVote {
            term: vote.leader_id.term,
            node: vote.leader_id.voted_for.unwrap_or(NOBODY),
            committed: vote.committed,
        };
        let wal = self
            .shared
            .log
            .save_vote(self.group, saved)
            .map_err(|e| StorageError::from(StorageIOError::write_vote(AnyError::new(&e))))?;
        // A vote counts only once it survives a crash.
        self.shared
            .until_durable(wal)
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_vote(AnyError::new(&e))))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError<NodeId>> {
        let Some(committed) = committed else { return Ok(()) };
        self.shared
            .log
            .save_committed(self.group, (committed.index, committed.leader_id.term), COMMITTED_EVERY)
            .map_err(write_error)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError<NodeId>> {
        Ok(self.shared.log.committed(self.group).map(|(index, term)| log_id(index, term)))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.shared.log.vote(self.group).map(|v| {
            let mut vote = Vote::new(v.term, v.node);
            vote.leader_id.voted_for = (v.node != NOBODY).then_some(v.node);
            vote.committed = v.committed;
            vote
        }))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let appended: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        // A command goes to the log as its kind and its bytes, without a
        // copy put together first; other entries are encoded.
        let mut encoded = Vec::with_capacity(appended.len());
        for entry in &appended {
            encoded.push(match &entry.payload {
                EntryPayload::Normal(_) => None,
                _ => Some(encode(entry)?),
            });
        }
        let wal = {
            // Under the tails' lock, so that a reader sees an entry either
            // in the tail or in the log.
            let mut tails = self.shared.tails.lock();
            let parts = appended.iter().zip(&encoded).map(|(entry, encoded)| {
                let parts: [&[u8]; 2] = match (&entry.payload, encoded) {
                    (EntryPayload::Normal(command), _) => [&[NORMAL], &command.0],
                    (_, Some(encoded)) => [encoded, &[]],
                    (_, None) => [&[], &[]],
                };
                (entry.log_id.index, entry.log_id.leader_id.term, parts)
            });
            let wal = self.shared.log.append_parts(self.group, parts).map_err(write_error)?;
            let durable = self.shared.flushes.durable.load(Ordering::Acquire);
            let tail = tails.entry(self.group).or_default();
            if let Some(first) = appended.first() {
                // An append at an earlier index replaces what follows it.
                while tail.back().is_some_and(|(_, e)| e.log_id.index >= first.log_id.index) {
                    tail.pop_back();
                }
            }
            while tail.front().is_some_and(|(at, _)| *at <= durable) {
                tail.pop_front();
            }
            tail.extend(appended.into_iter().map(|entry| (wal, entry)));
            wal
        };
        self.shared.flushes.when_durable(wal, callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        // Needs no fsync of its own: the entries that replace the removed
        // ones are acknowledged after it, by a later fsync.
        let mut tails = self.shared.tails.lock();
        self.shared.log.truncate_from(self.group, log_id.index).map_err(write_error)?;
        if let Some(tail) = tails.get_mut(&self.group) {
            tail.retain(|(_, e)| e.log_id.index < log_id.index);
        }
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<NodeId>> {
        let mut log_id = log_id;
        // Entries the machine still reads stay (openraft counts them purged:
        // it never asks for entries below its snapshot again). Not when the
        // log does not reach the purge point: a snapshot from the leader is
        // being installed, which replaces the machine's state, and the next
        // entry follows the snapshot.
        let (_, last) = self.shared.log.state(self.group);
        let reaches = last.is_some_and(|(index, _)| index >= log_id.index);
        if let Some(keep) = self.keep.as_ref().and_then(|keep| keep()).filter(|_| reaches) {
            if keep <= log_id.index {
                let Some(below) = keep.checked_sub(1) else { return Ok(()) };
                let (purged, _) = self.shared.log.state(self.group);
                if purged.is_some_and(|(index, _)| index >= below) {
                    return Ok(());
                }
                let Some(term) = self.shared.log.term_of(self.group, below) else { return Ok(()) };
                log_id = self::log_id(below, term);
            }
        }
        let mut tails = self.shared.tails.lock();
        self.shared.log.purge_upto(self.group, (log_id.index, log_id.leader_id.term)).map_err(write_error)?;
        if let Some(tail) = tails.get_mut(&self.group) {
            tail.retain(|(_, e)| e.log_id.index > log_id.index);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogReader;
    use warren_storage::{FsBackend, FsyncPolicy};

    use super::*;

    /// A follower far behind a quorum queue is sent its entries a few MiB
    /// at a time: 300 entries of bodies in one request were over the
    /// cluster's frame limit, and it never caught up.
    #[tokio::test]
    async fn appends_to_a_follower_are_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let shared =
            SharedLog::open(Arc::new(FsBackend), dir.path(), FsyncPolicy::Always).unwrap_or_else(|e| panic!("{e}"));
        let body = vec![7u8; 256 * 1024];
        let entries: Vec<Vec<u8>> = (1..=40u64)
            .map(|index| {
                encode(&Entry { log_id: log_id(index, 1), payload: EntryPayload::Normal(Command(body.clone().into())) })
            })
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{e}"));
        shared
            .log
            .append(3, entries.iter().enumerate().map(|(at, e)| (at as u64 + 1, 1, &e[..])))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut store = shared.store(3);
        let all = store.try_get_log_entries(1..41).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(all.len(), 40);
        let limited = store.limited_get_log_entries(1, 41).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(limited.len(), APPEND_BYTES / body.len(), "about 1 MiB, from the first entry on");
        assert_eq!(limited.first().map(|e| e.log_id.index), Some(1));
        let one = store.limited_get_log_entries(40, 41).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.len(), 1);
        shared.shutdown();
    }
}
