//! Which log entries are still needed, counted per bucket of log indices.

use std::collections::{BTreeMap, HashMap};

/// Which log entries are still needed: queue entries holding stored
/// messages, counted per bucket of 64 log indices, so the cost is one
/// small entry per bucket, not one per message. An `L` entry (a copy
/// referring to an earlier entry's body) also holds that entry, once, for
/// as long as some queue holds the copy: those are counted one by one.
#[derive(Default)]
pub(super) struct Liveness {
    /// index bucket -> queue entries still holding its messages
    buckets: BTreeMap<u64, u64>,
    /// `L` entry -> (queue entries holding it, the entry with its body)
    links: HashMap<u64, (u64, u64)>,
}

pub(super) const BUCKET_INDICES: u64 = 64;

impl Liveness {
    pub(super) fn add(&mut self, index: u64, refs: usize) {
        self.add_to_bucket(index / BUCKET_INDICES, u64::try_from(refs).unwrap_or(u64::MAX));
    }

    pub(super) fn add_to_bucket(&mut self, bucket: u64, refs: u64) {
        if refs > 0 {
            *self.buckets.entry(bucket).or_insert(0) += refs;
        }
    }

    /// `index` (held by `refs` queue entries) refers to the body of entry
    /// `body_at`, which stays live as long as they do.
    pub(super) fn link(&mut self, index: u64, refs: usize, body_at: u64) {
        let refs = u64::try_from(refs).unwrap_or(u64::MAX);
        if refs > 0 {
            self.links.insert(index, (refs, body_at));
            self.add(body_at, 1);
        }
    }

    /// `L` entries whose bodies are in `range`.
    pub(super) fn linked_into(&self, range: std::ops::Range<u64>) -> Vec<u64> {
        self.links.iter().filter(|(_, (_, body_at))| range.contains(body_at)).map(|(index, _)| *index).collect()
    }

    /// Live `L` entries (for tests and operators).
    pub(super) fn links(&self) -> usize {
        self.links.len()
    }

    pub(super) fn settle(&mut self, index: u64) {
        if let Some((refs, body_at)) = self.links.get_mut(&index) {
            *refs -= 1;
            if *refs == 0 {
                let body_at = *body_at;
                self.links.remove(&index);
                self.settle_one(body_at);
            }
        }
        self.settle_one(index);
    }

    fn settle_one(&mut self, index: u64) {
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
    pub(super) fn count_in(&self, range: std::ops::Range<u64>) -> u64 {
        let first = range.start / BUCKET_INDICES;
        let last = range.end.saturating_sub(1) / BUCKET_INDICES;
        self.buckets.range(first..=last).map(|(_, count)| *count).sum()
    }

    /// Every entry below this index is dead.
    pub(super) fn oldest_index(&self) -> Option<u64> {
        self.buckets.keys().next().map(|bucket| bucket * BUCKET_INDICES)
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
    fn a_linked_copy_holds_the_body_it_refers_to_until_its_last_queue_settles_it() {
        let mut live = Liveness::default();
        live.add(5, 1);
        let copy = 3 * BUCKET_INDICES;
        live.add(copy, 2);
        live.link(copy, 2, 5);
        live.settle(5);
        assert_eq!(live.oldest_index(), Some(0), "the original settled, its body still referred to");
        assert_eq!(live.linked_into(0..BUCKET_INDICES), vec![copy]);
        live.settle(copy);
        assert_eq!(live.oldest_index(), Some(0));
        live.settle(copy);
        assert_eq!(live.oldest_index(), None);
        assert_eq!(live.links(), 0);
    }
}
