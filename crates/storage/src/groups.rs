//! Many Raft groups' logs in one write-ahead log, so that one fsync makes
//! the appends of every group durable at once (thousands of replicated
//! queues on a node must not mean thousands of fsync streams).
//!
//! Each group sees its own contiguous log (index, term, payload) and its
//! vote; underneath, every change is one entry of a shared [`GroupCommit`]:
//!
//! - `E` group, index, term, payload: an entry (it replaces any entries of
//!   the group from that index on, as an append after a conflict does);
//! - `T` group, index: the group's entries from `index` on are gone;
//! - `U` group, index, term: the group's entries up to `index` are purged
//!   (a snapshot covers them);
//! - `V` group, term, node, committed: the group's vote;
//! - `C` group, index, term: an entry the group knows committed (so a
//!   restart applies the entries up to it in bounded steps, before it
//!   hears from a leader).
//!
//! Memory per group is its live entries' WAL positions (16 bytes each).
//! [`GroupLog::reclaim`] deletes the shared log's segments no group needs:
//! it first rewrites at the head the votes and purge marks that would go
//! with them.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::group::{FsyncPolicy, GroupCommit};
use crate::log::{Log, LogOptions};
use crate::{Backend, StorageError};

/// A Raft group, named by the caller.
pub type GroupId = u64;

/// A group's vote as the log keeps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vote {
    pub term: u64,
    pub node: u64,
    pub committed: bool,
}

/// (index, term) of an entry.
pub type LogPosition = (u64, u64);

#[derive(Debug, Default)]
struct Group {
    /// Group index of `entries[0]`.
    first: u64,
    /// (WAL index, term) of each live entry, in group-index order.
    entries: VecDeque<(u64, u64)>,
    /// The last purged entry, and the WAL index of its mark.
    purged: Option<(LogPosition, u64)>,
    /// The vote, and the WAL index of its record.
    vote: Option<(Vote, u64)>,
    /// The last committed entry written, and the WAL index of its record.
    committed: Option<(LogPosition, u64)>,
}

impl Group {
    fn last(&self) -> Option<LogPosition> {
        match self.entries.back() {
            Some((_, term)) => Some((self.first + self.entries.len() as u64 - 1, *term)),
            None => self.purged.map(|(position, _)| position),
        }
    }

    /// The index the next entry must have; any, for a group with nothing
    /// yet (a Raft log starts at 0, or after a snapshot it was given).
    fn next_index(&self) -> Option<u64> {
        self.last().map(|(index, _)| index + 1)
    }

    fn put(&mut self, index: u64, term: u64, wal: u64) {
        if self.entries.is_empty() {
            self.first = index;
        } else if index < self.first {
            self.entries.clear();
            self.first = index;
        } else {
            self.entries.truncate(crate::usize_of(index - self.first));
        }
        self.entries.push_back((wal, term));
    }

    fn truncate_from(&mut self, index: u64) {
        if index <= self.first {
            self.entries.clear();
        } else {
            self.entries.truncate(crate::usize_of(index - self.first));
        }
    }

    fn purge_upto(&mut self, position: LogPosition, wal: u64) {
        let (index, _) = position;
        while !self.entries.is_empty() && self.first <= index {
            self.entries.pop_front();
            self.first += 1;
        }
        if self.entries.is_empty() {
            self.first = index + 1;
        }
        self.purged = Some((position, wal));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GroupLogError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("group {group}: entry {index} does not follow its last entry (next is {next})")]
    NotContiguous { group: GroupId, index: u64, next: u64 },
}

/// Many groups' logs and votes on one group-committed log.
pub struct GroupLog {
    commit: GroupCommit,
    groups: Mutex<HashMap<GroupId, Group>>,
}

fn record(tag: u8, group: GroupId, fields: &[u64], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + fields.len() * 8 + payload.len());
    out.push(tag);
    out.extend_from_slice(&group.to_le_bytes());
    for field in fields {
        out.extend_from_slice(&field.to_le_bytes());
    }
    out.extend_from_slice(payload);
    out
}

fn field(bytes: &[u8], n: usize) -> Option<u64> {
    bytes.get(1 + n * 8..9 + n * 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
}

impl GroupLog {
    /// Opens (or creates) the shared log in `dir` and replays every group.
    /// `listener` hears the durable WAL index after each fsync.
    pub fn open(
        backend: Arc<dyn Backend>,
        dir: &Path,
        options: LogOptions,
        policy: FsyncPolicy,
        listener: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<GroupLog, StorageError> {
        let mut groups: HashMap<GroupId, Group> = HashMap::new();
        let (mut log, _) = Log::open_visiting(backend, dir, options, |wal, _, payload| {
            let (Some(&tag), Some(group)) = (payload.first(), field(payload, 0)) else { return };
            if tag == b'X' {
                groups.remove(&group);
                return;
            }
            let state = groups.entry(group).or_default();
            match (tag, field(payload, 1), field(payload, 2)) {
                (b'E', Some(index), Some(term)) => state.put(index, term, wal),
                (b'T', Some(index), _) => state.truncate_from(index),
                (b'U', Some(index), Some(term)) => state.purge_upto((index, term), wal),
                (b'V', Some(term), Some(node)) => {
                    let committed = payload.get(25) == Some(&1);
                    state.vote = Some((Vote { term, node, committed }, wal));
                }
                (b'C', Some(index), Some(term)) => state.committed = Some(((index, term), wal)),
                _ => {}
            }
        })?;
        log.sync()?;
        let commit = GroupCommit::start(log, policy, listener)?;
        Ok(GroupLog { commit, groups: Mutex::new(groups) })
    }

    /// Appends entries of `group`, in order from its next index (or from an
    /// earlier index, replacing the entries there: a follower resolving a
    /// conflict; a group with no entries takes any index). Returns the WAL
    /// index the batch is durable with.
    pub fn append<'a>(
        &self,
        group: GroupId,
        entries: impl IntoIterator<Item = (u64, u64, &'a [u8])>,
    ) -> Result<u64, GroupLogError> {
        self.append_parts(group, entries.into_iter().map(|(index, term, payload)| (index, term, [payload, &[]])))
    }

    /// [`GroupLog::append`] of entries whose payload is two parts end to
    /// end (a kind and a command: a body is copied once, into the commit's
    /// buffer).
    pub fn append_parts<'a>(
        &self,
        group: GroupId,
        entries: impl IntoIterator<Item = (u64, u64, [&'a [u8]; 2])>,
    ) -> Result<u64, GroupLogError> {
        let mut groups = self.groups.lock();
        let state = groups.entry(group).or_default();
        let mut wal = 0;
        for (index, term, [first, second]) in entries {
            if let Some(next) = state.next_index().filter(|next| index > *next) {
                return Err(GroupLogError::NotContiguous { group, index, next });
            }
            let header = record(b'E', group, &[index, term], &[]);
            wal = self.commit.append_parts(&[&header, first, second])?;
            state.put(index, term, wal);
        }
        Ok(wal)
    }

    /// Deletes `group`'s entries from `index` on.
    pub fn truncate_from(&self, group: GroupId, index: u64) -> Result<u64, GroupLogError> {
        let mut groups = self.groups.lock();
        let wal = self.commit.append(&record(b'T', group, &[index], &[]))?;
        groups.entry(group).or_default().truncate_from(index);
        Ok(wal)
    }

    /// Forgets `group` entirely (entries, vote, purge mark): the group was
    /// deleted. Returns the WAL index the record is durable with.
    pub fn drop_group(&self, group: GroupId) -> Result<u64, GroupLogError> {
        let mut groups = self.groups.lock();
        let wal = self.commit.append(&record(b'X', group, &[], &[]))?;
        groups.remove(&group);
        Ok(wal)
    }

    /// Forgets `group`'s entries up to `position` (a snapshot holds them).
    pub fn purge_upto(&self, group: GroupId, position: LogPosition) -> Result<u64, GroupLogError> {
        let mut groups = self.groups.lock();
        let wal = self.commit.append(&record(b'U', group, &[position.0, position.1], &[]))?;
        groups.entry(group).or_default().purge_upto(position, wal);
        Ok(wal)
    }

    /// The term of `group`'s live entry at `index`, if it has one.
    pub fn term_of(&self, group: GroupId, index: u64) -> Option<u64> {
        let groups = self.groups.lock();
        let g = groups.get(&group)?;
        let at = usize::try_from(index.checked_sub(g.first)?).ok()?;
        g.entries.get(at).map(|(_, term)| *term)
    }

    /// Notes that `group`'s entry `position` is committed, if it is at
    /// least `every` entries past the one noted last. Not waited for: a
    /// lost note only means more to apply after a restart.
    pub fn save_committed(&self, group: GroupId, position: LogPosition, every: u64) -> Result<(), GroupLogError> {
        let mut groups = self.groups.lock();
        let g = groups.entry(group).or_default();
        if g.committed.is_some_and(|((index, _), _)| position.0 < index.saturating_add(every)) {
            return Ok(());
        }
        let wal = self.commit.append(&record(b'C', group, &[position.0, position.1], &[]))?;
        g.committed = Some((position, wal));
        Ok(())
    }

    /// The last committed entry noted for `group`, if that entry is still
    /// in its log.
    pub fn committed(&self, group: GroupId) -> Option<LogPosition> {
        let groups = self.groups.lock();
        let g = groups.get(&group)?;
        let ((index, term), _) = g.committed?;
        let at = crate::usize_of(index.checked_sub(g.first)?);
        g.entries.get(at).is_some_and(|(_, t)| *t == term).then_some((index, term))
    }

    pub fn save_vote(&self, group: GroupId, vote: Vote) -> Result<u64, GroupLogError> {
        let mut groups = self.groups.lock();
        let wal = self.commit.append(&record(b'V', group, &[vote.term, vote.node], &[u8::from(vote.committed)]))?;
        groups.entry(group).or_default().vote = Some((vote, wal));
        Ok(wal)
    }

    pub fn vote(&self, group: GroupId) -> Option<Vote> {
        self.groups.lock().get(&group).and_then(|g| g.vote.map(|(vote, _)| vote))
    }

    /// (last purged, last entry) of `group`.
    pub fn state(&self, group: GroupId) -> (Option<LogPosition>, Option<LogPosition>) {
        let groups = self.groups.lock();
        match groups.get(&group) {
            Some(g) => (g.purged.map(|(position, _)| position), g.last()),
            None => (None, None),
        }
    }

    /// `group`'s entries with indices in `range`: (index, term, payload).
    pub fn read(&self, group: GroupId, range: std::ops::Range<u64>) -> Result<Vec<(u64, u64, Vec<u8>)>, GroupLogError> {
        self.read_limited(group, range, usize::MAX)
    }

    /// Like [`GroupLog::read`], stopping once the payloads read reach
    /// `max_bytes` (at least one entry is read).
    pub fn read_limited(
        &self,
        group: GroupId,
        range: std::ops::Range<u64>,
        max_bytes: usize,
    ) -> Result<Vec<(u64, u64, Vec<u8>)>, GroupLogError> {
        let wanted: Vec<(u64, u64, u64)> = {
            let groups = self.groups.lock();
            let Some(g) = groups.get(&group) else { return Ok(Vec::new()) };
            let start = range.start.max(g.first);
            let end = range.end.min(g.first + g.entries.len() as u64);
            (start..end)
                .filter_map(|index| {
                    g.entries.get(crate::usize_of(index - g.first)).map(|(wal, term)| (index, *term, *wal))
                })
                .collect()
        };
        let mut out = Vec::with_capacity(wanted.len().min(1024));
        let mut bytes = 0usize;
        for (index, term, wal) in wanted {
            if bytes >= max_bytes && !out.is_empty() {
                break;
            }
            self.commit.wait_written(wal)?;
            let entry = self.commit.read(wal)?;
            let payload = entry.payload.get(25..).unwrap_or_default().to_vec();
            bytes = bytes.saturating_add(payload.len());
            out.push((index, term, payload));
        }
        Ok(out)
    }

    pub fn durable_index(&self) -> u64 {
        self.commit.durable_index()
    }

    /// Fsyncs and entries made durable so far.
    pub fn stats(&self) -> crate::group::Stats {
        self.commit.stats()
    }

    /// Deletes the shared log's segments that no group needs any more.
    /// Votes and purge marks older than every live entry are written again
    /// at the head first, so they outlive their segments. Blocking.
    pub fn reclaim(&self) -> Result<usize, GroupLogError> {
        let starts = self.commit.with_log(|log| log.segment_starts());
        let Some(&head) = starts.last() else { return Ok(0) };
        let mut groups = self.groups.lock();
        // Entries pin their segments; only marks are moved.
        let keep =
            groups.values().filter_map(|g| g.entries.front().map(|(wal, _)| *wal)).min().unwrap_or(head).min(head);
        let mut last = 0;
        for (id, g) in groups.iter_mut() {
            if let Some((vote, wal)) = g.vote {
                if wal < keep {
                    let new =
                        self.commit.append(&record(b'V', *id, &[vote.term, vote.node], &[u8::from(vote.committed)]))?;
                    g.vote = Some((vote, new));
                    last = new;
                }
            }
            if let Some((position, wal)) = g.committed {
                if wal < keep {
                    let new = self.commit.append(&record(b'C', *id, &[position.0, position.1], &[]))?;
                    g.committed = Some((position, new));
                    last = new;
                }
            }
            if let Some((position, wal)) = g.purged {
                if wal < keep {
                    let new = self.commit.append(&record(b'U', *id, &[position.0, position.1], &[]))?;
                    g.purged = Some((position, new));
                    last = new;
                }
            }
        }
        drop(groups);
        // The rewritten marks must be durable before the old ones go.
        while self.commit.durable_index() < last {
            if self.commit.is_poisoned() {
                return Err(StorageError::Poisoned.into());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(self.commit.purge_prefix(keep.min(self.commit.durable_index() + 1))?)
    }

    /// The groups whose oldest entry lies before the newest `keep`
    /// segments: they keep the log from being reclaimed (a snapshot of
    /// theirs lets it go).
    pub fn pinning(&self, keep: usize) -> Vec<GroupId> {
        let starts = self.commit.with_log(|log| log.segment_starts());
        let Some(&oldest_kept) = starts.len().checked_sub(keep.max(1)).and_then(|at| starts.get(at)) else {
            return Vec::new();
        };
        let groups = self.groups.lock();
        let mut pinning: Vec<GroupId> = groups
            .iter()
            .filter(|(_, g)| g.entries.front().is_some_and(|(wal, _)| *wal < oldest_kept))
            .map(|(id, _)| *id)
            .collect();
        pinning.sort_unstable();
        pinning
    }

    /// Commits what is pending and stops the commit thread.
    pub fn shutdown(&self) {
        self.commit.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimBackend;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn open(sim: &SimBackend, segment_bytes_max: u64) -> GroupLog {
        GroupLog::open(
            Arc::new(sim.clone()),
            Path::new("/groups"),
            LogOptions { segment_bytes_max },
            FsyncPolicy::Always,
            |_| {},
        )
        .unwrap()
    }

    fn wait(log: &GroupLog, wal: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while log.durable_index() < wal {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn groups_interleave_in_one_log_and_come_back_after_a_power_cut() {
        let sim = SimBackend::new();
        let log = open(&sim, 1 << 20);
        let mut last = 0;
        for index in 1..=50u64 {
            for group in [7u64, 9] {
                let payload = format!("{group}:{index}");
                last = log.append(group, [(index, 1, payload.as_bytes())]).unwrap();
            }
        }
        log.save_vote(7, Vote { term: 2, node: 3, committed: true }).unwrap();
        // A follower replaces a conflicting tail: entries from 41 on, term 2.
        log.append(9, [(41, 2, &b"new"[..])]).unwrap();
        let truncated = log.truncate_from(7, 46).unwrap();
        wait(&log, last.max(truncated));
        log.shutdown();
        sim.power_cut();

        let log = open(&sim, 1 << 20);
        assert_eq!(log.state(7), (None, Some((45, 1))));
        assert_eq!(log.state(9), (None, Some((41, 2))));
        assert_eq!(log.vote(7), Some(Vote { term: 2, node: 3, committed: true }));
        assert_eq!(log.vote(9), None);
        let read = log.read(9, 39..100).unwrap();
        assert_eq!(read, vec![(39, 1, b"9:39".to_vec()), (40, 1, b"9:40".to_vec()), (41, 2, b"new".to_vec())]);
        assert!(matches!(
            log.append(7, [(47, 1, &b"gap"[..])]),
            Err(GroupLogError::NotContiguous { group: 7, index: 47, next: 46 })
        ));
    }

    #[test]
    fn committed_notes_come_back_only_for_entries_still_there_and_reads_stop_at_a_byte_limit() {
        let sim = SimBackend::new();
        let log = open(&sim, 1 << 20);
        let mut last = 0;
        for index in 1..=100u64 {
            last = log.append(3, [(index, 1, &[0u8; 100][..])]).unwrap();
        }
        log.save_committed(3, (40, 1), 32).unwrap();
        log.save_committed(3, (60, 1), 32).unwrap();
        assert_eq!(log.committed(3), Some((40, 1)), "a note closer than `every` to the last is skipped");
        log.save_committed(3, (72, 1), 32).unwrap();
        log.save_committed(5, (9, 1), 32).unwrap();
        assert_eq!(log.committed(5), None, "no such entry");
        let read = log.read_limited(3, 1..101, 250).unwrap();
        assert_eq!(read.len(), 3, "stops once 250 bytes are read");
        assert_eq!(log.read_limited(3, 1..101, 0).unwrap().len(), 1, "one entry at least");
        // Written after the note: both durable once it is.
        let truncated = log.truncate_from(3, 90).unwrap();
        wait(&log, last.max(truncated));
        log.shutdown();
        sim.power_cut();

        let log = open(&sim, 1 << 20);
        assert_eq!(log.committed(3), Some((72, 1)));
        let truncated = log.truncate_from(3, 50).unwrap();
        wait(&log, truncated);
        assert_eq!(log.committed(3), None, "its entry is gone");
    }

    #[test]
    fn a_new_group_starts_anywhere() {
        let sim = SimBackend::new();
        let log = open(&sim, 1 << 20);
        log.append(1, [(0, 0, &b"zero"[..]), (1, 1, &b"one"[..])]).unwrap();
        // A follower given a snapshot up to 9 starts its log at 10.
        log.append(2, [(10, 3, &b"ten"[..])]).unwrap();
        assert_eq!(log.state(1), (None, Some((1, 1))));
        assert_eq!(log.state(2), (None, Some((10, 3))));
        log.purge_upto(1, (1, 1)).unwrap();
        let wal = log.truncate_from(2, 0).unwrap();
        wait(&log, wal);
        assert_eq!(log.read(2, 0..100).unwrap(), Vec::new());
        log.append(1, [(2, 2, &b"two"[..])]).unwrap();
        assert_eq!(log.read(1, 0..100).unwrap(), vec![(2, 2, b"two".to_vec())]);
    }

    #[test]
    fn reclaim_keeps_votes_and_purge_marks_and_frees_what_no_group_needs() {
        let sim = SimBackend::new();
        let log = open(&sim, 4096);
        log.save_vote(1, Vote { term: 5, node: 1, committed: false }).unwrap();
        let body = vec![0u8; 500];
        let mut last = 0;
        for index in 1..=100u64 {
            // One batch per entry: group commit writes a batch into one
            // segment, so this makes several.
            last = log.append(1, [(index, 5, &body[..])]).unwrap();
            wait(&log, last);
        }
        last = last.max(log.purge_upto(1, (90, 5)).unwrap());
        wait(&log, last);
        let before = log.commit.with_log(|l| l.segment_count());
        assert!(log.reclaim().unwrap() > 0);
        let after = log.commit.with_log(|l| l.segment_count());
        assert!(after < before, "{after} segments of {before}");
        wait(&log, log.commit.next_index() - 1);
        log.shutdown();
        sim.power_cut();

        let log = open(&sim, 4096);
        assert_eq!(log.vote(1), Some(Vote { term: 5, node: 1, committed: false }), "the vote outlived its segment");
        assert_eq!(log.state(1), (Some((90, 5)), Some((100, 5))));
        assert_eq!(log.read(1, 0..200).unwrap().len(), 10);
    }

    #[test]
    fn a_dropped_group_is_gone_after_a_restart_and_pins_nothing() {
        let sim = SimBackend::new();
        let log = open(&sim, 1 << 20);
        log.append(3, [(1, 1, &b"a"[..]), (2, 1, &b"b"[..])]).unwrap();
        log.save_vote(3, Vote { term: 1, node: 2, committed: true }).unwrap();
        log.append(4, [(1, 1, &b"kept"[..])]).unwrap();
        let wal = log.drop_group(3).unwrap();
        wait(&log, wal);
        assert_eq!(log.state(3), (None, None));
        assert!(!log.groups.lock().contains_key(&3), "nothing of it is kept (its marks are not carried on)");
        log.shutdown();
        sim.power_cut();

        let log = open(&sim, 1 << 20);
        assert!(!log.groups.lock().contains_key(&3));
        assert_eq!(log.vote(3), None);
        assert_eq!(log.read(4, 0..10).unwrap(), vec![(1, 1, b"kept".to_vec())]);
    }

    #[test]
    fn a_group_with_old_entries_is_named_as_pinning_the_log() {
        let sim = SimBackend::new();
        let log = open(&sim, 4096);
        let body = vec![0u8; 500];
        let mut last = log.append(1, [(1, 1, &b"old"[..])]).unwrap();
        for index in 1..=40u64 {
            last = log.append(2, [(index, 1, &body[..])]).unwrap();
            wait(&log, last);
        }
        assert!(log.commit.with_log(|l| l.segment_count()) > 3);
        assert_eq!(log.pinning(2), vec![1, 2], "both start in the first segment");
        last = last.max(log.purge_upto(2, (38, 1)).unwrap());
        wait(&log, last);
        assert_eq!(log.pinning(2), vec![1], "group 2's oldest entry is recent now");
        assert_eq!(log.pinning(1000), Vec::<GroupId>::new(), "nothing is old when every segment is kept");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8, u8),
        Conflict(u8, u8),
        Truncate(u8, u8),
        Purge(u8, u8),
        Vote(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..3, 1u8..4).prop_map(|(g, n)| Op::Append(g, n)),
            1 => (0u8..3, 0u8..10).prop_map(|(g, back)| Op::Conflict(g, back)),
            1 => (0u8..3, 0u8..10).prop_map(|(g, back)| Op::Truncate(g, back)),
            3 => (0u8..3, 0u8..4).prop_map(|(g, back)| Op::Purge(g, back)),
            1 => (0u8..3, 0u8..50).prop_map(|(g, t)| Op::Vote(g, t)),
        ]
    }

    /// A group as a plain map: index -> (term, payload).
    #[derive(Default, Clone, Debug)]
    struct Model {
        entries: BTreeMap<u64, (u64, Vec<u8>)>,
        purged: Option<LogPosition>,
        vote: Option<Vote>,
    }

    impl Model {
        fn next(&self) -> u64 {
            self.entries.keys().next_back().map(|i| i + 1).or(self.purged.map(|(i, _)| i + 1)).unwrap_or(1)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the mix of appends, conflicts, truncations, purges,
        /// votes and reclaims, a reopened log holds what a plain map does.
        #[test]
        fn the_log_agrees_with_a_map_after_reopening(ops in proptest::collection::vec(op(), 1..60)) {
            let sim = SimBackend::new();
            let log = open(&sim, 512);
            let mut models: Vec<Model> = vec![Model::default(); 3];
            let mut term = 1u64;
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Append(g, n) => {
                        let m = &mut models[usize::from(g)];
                        for _ in 0..n {
                            let index = m.next();
                            let payload = format!("{g}/{index}/{step}").into_bytes();
                            log.append(u64::from(g), [(index, term, &payload[..])]).unwrap();
                            m.entries.insert(index, (term, payload));
                        }
                    }
                    Op::Conflict(g, back) => {
                        let m = &mut models[usize::from(g)];
                        let floor = m.purged.map_or(1, |(i, _)| i + 1);
                        let index = m.next().saturating_sub(u64::from(back)).max(floor);
                        term += 1;
                        let payload = format!("c{step}").into_bytes();
                        log.append(u64::from(g), [(index, term, &payload[..])]).unwrap();
                        m.entries.split_off(&index);
                        m.entries.insert(index, (term, payload));
                    }
                    Op::Truncate(g, back) => {
                        let m = &mut models[usize::from(g)];
                        let floor = m.purged.map_or(0, |(i, _)| i);
                        let after = m.next().saturating_sub(1 + u64::from(back)).max(floor);
                        log.truncate_from(u64::from(g), after + 1).unwrap();
                        m.entries.split_off(&(after + 1));
                    }
                    Op::Purge(g, back) => {
                        let m = &mut models[usize::from(g)];
                        let Some((&last, _)) = m.entries.iter().next_back() else { continue };
                        let index = last.saturating_sub(u64::from(back)).max(*m.entries.keys().next().unwrap_or(&1));
                        let Some(&(t, _)) = m.entries.get(&index) else { continue };
                        log.purge_upto(u64::from(g), (index, t)).unwrap();
                        m.entries = m.entries.split_off(&(index + 1));
                        m.purged = Some((index, t));
                    }
                    Op::Vote(g, t) => {
                        let vote = Vote { term: u64::from(t), node: u64::from(g), committed: t % 2 == 0 };
                        log.save_vote(u64::from(g), vote).unwrap();
                        models[usize::from(g)].vote = Some(vote);
                    }
                }
                // Small batches and segments, so that reclaiming deletes
                // some (in about half the cases).
                wait(&log, log.commit.next_index() - 1);
                if step % 7 == 6 {
                    log.reclaim().unwrap();
                }
            }
            log.shutdown();
            let log = open(&sim, 512);
            for (g, m) in models.iter().enumerate() {
                let g = g as u64;
                let last = m.entries.iter().next_back().map(|(i, (t, _))| (*i, *t)).or(m.purged);
                prop_assert_eq!(log.state(g), (m.purged, last));
                prop_assert_eq!(log.vote(g), m.vote);
                let read = log.read(g, 0..1000).unwrap();
                let want: Vec<(u64, u64, Vec<u8>)> = m.entries.iter().map(|(i, (t, p))| (*i, *t, p.clone())).collect();
                prop_assert_eq!(read, want);
            }
        }
    }
}
