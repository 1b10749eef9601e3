//! Giving disk space back: purging log segments nothing needs any more, and
//! moving the few live messages out of the oldest segment so it can go.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tracing::info;
use warren_core::VirtualHost;
use warren_storage::StorageError;

use super::liveness::BUCKET_INDICES;
use super::record::{decode, encode_moved, Record};
use super::Store;

/// How long compaction trusts that the oldest segment's live entries
/// cannot be moved before it walks the queues again.
const STUCK_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

impl Store {
    /// Deletes log segments that hold no live message. Blocking (it may wait
    /// for an fsync): run it off the async runtime.
    pub fn reclaim(&self) -> Result<usize, StorageError> {
        let oldest_live = self.live.lock().oldest_index();
        let durable = self.commit.durable_index();
        if durable < *self.moved_until.lock() {
            // Moved copies are not durable yet: the originals must stay.
            return Ok(0);
        }
        // Only what is durable may be purged past; live messages and
        // definition entries no snapshot covers pin the rest.
        let pinned = self.definitions.lock().pinned_from().unwrap_or(u64::MAX);
        let before = oldest_live.unwrap_or(durable + 1).min(durable + 1).min(pinned);
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
        // Liveness is counted per bucket of log indices, and the segment
        // can go only once every bucket it touches is dead: move what is
        // live up to the end of its last bucket (later segments' entries
        // included), unless that reaches the head segment, where moved
        // entries would land in the same buckets again.
        let end = second.saturating_sub(1) / BUCKET_INDICES * BUCKET_INDICES + BUCKET_INDICES;
        if starts.last().is_some_and(|&head| end > head) {
            return Ok(0);
        }
        let live_in_first = self.live.lock().count_in(first..end);
        if live_in_first == 0 || live_in_first > MOVE_AT_MOST {
            return Ok(0);
        }
        // Walked again after a while even so: the count is taken after the
        // walk, outside the virtual hosts' locks, and a message settled or
        // moved in between must not leave the segment pinned for good.
        if self
            .stuck
            .lock()
            .is_some_and(|(at, live, when)| (at, live) == (first, live_in_first) && when.elapsed() < STUCK_RECHECK)
        {
            return Ok(0);
        }
        self.compaction_scans.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut moved_count = 0;
        let mut scratch = Vec::new();
        // Copies elsewhere whose bodies are in this segment move too,
        // rewritten whole: then nothing refers to the segment.
        let linked: HashSet<u64> = self.live.lock().linked_into(first..end).into_iter().collect();
        for vhost in vhosts {
            let mut state = vhost.lock();
            let name = state.name.clone();
            let mut moved = HashMap::new();
            let mut failure = None;
            for (old, queues) in state.stored_where(|stored| (first..end).contains(&stored) || linked.contains(&stored))
            {
                // An unreadable entry stays where it is (its queue will find
                // out when delivering it); the others still move.
                let Ok(entry) = self.commit.read(old) else { continue };
                let whole;
                let message = match decode(&entry.payload) {
                    Some(Record::Published { message, .. } | Record::Moved { message, .. }) => message,
                    Some(Record::Linked { body_at, head, body_len, .. }) => {
                        let Some(message) = self.linked_message(body_at, head, body_len) else { continue };
                        whole = message;
                        &whole
                    }
                    _ => continue,
                };
                scratch.clear();
                encode_moved(&mut scratch, old, &name, &queues, message);
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
                live.add(new, queues.len());
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
        // Live entries the queues do not hold (delayed messages wait in
        // their exchange) stay: remember, rather than walk every queue again
        // each round while nothing changed.
        let left = self.live.lock().count_in(first..end);
        *self.stuck.lock() = (left > 0).then_some((first, left, std::time::Instant::now()));
        if left > 0 {
            info!(segment = first, live = left, "compaction: live entries that cannot be moved pin the oldest segment");
        }
        Ok(moved_count)
    }

    /// How many times compaction walked the queues.
    pub fn compaction_scans(&self) -> u64 {
        self.compaction_scans.load(std::sync::atomic::Ordering::Relaxed)
    }
}
