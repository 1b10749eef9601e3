//! Which log entries are still needed, counted per bucket of log indices.

use std::collections::BTreeMap;

/// Which log entries are still needed: queue entries holding stored
/// messages, counted per bucket of 64 log indices, so the cost is one
/// small entry per bucket, not one per message.
#[derive(Default)]
pub(super) struct Liveness {
    /// index bucket -> queue entries still holding its messages
    buckets: BTreeMap<u64, u64>,
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

    pub(super) fn settle(&mut self, index: u64) {
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
}
