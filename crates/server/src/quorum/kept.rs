//! Where a quorum queue replica's live messages are, by key, in about 24
//! bytes each (a million queued messages must cost a replica tens of
//! megabytes, not the hundred a `BTreeMap` of the same records takes).
//!
//! Keys come in three ranges (the leaders' own, forwarded ones, forwarded
//! ones of the earlier layout), and within each a replica learns them in
//! rising order; settles take them out anywhere. Each range is a sorted
//! deque of keys beside a deque of packed records; a settled record is
//! marked and left until the front passes it or the marks outnumber the
//! live records.

use std::collections::{HashMap, VecDeque};

/// Where a message is and what the leader's queue needs to know of it
/// without reading it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Kept {
    /// The log entry holding it; 0 when its bytes are kept in memory.
    pub index: u64,
    /// Its place among the messages of that entry.
    pub at: u32,
    /// Body bytes.
    pub size: u32,
    pub returns: u32,
    pub priority: u8,
}

/// Log indexes stay below this (the priority shares their word).
const INDEX_BITS: u32 = 56;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
/// A settled record's word.
const SETTLED: u64 = u64::MAX;

#[derive(Clone, Copy)]
struct Slot {
    /// Entry index, and priority in the top byte.
    word: u64,
    at: u32,
    size: u32,
}

impl Slot {
    fn live(&self) -> bool {
        self.word != SETTLED
    }
}

#[derive(Default)]
struct Range {
    keys: VecDeque<u64>,
    slots: VecDeque<Slot>,
    settled: usize,
}

impl Range {
    fn find(&self, key: u64) -> Result<usize, usize> {
        self.keys.binary_search(&key)
    }

    /// Drops settled records at the front, and all of them once they
    /// outnumber the live ones.
    fn tidy(&mut self) {
        while self.slots.front().is_some_and(|slot| !slot.live()) {
            self.slots.pop_front();
            self.keys.pop_front();
            self.settled -= 1;
        }
        if self.settled > 64 && self.settled * 2 > self.keys.len() {
            let live = self.keys.len() - self.settled;
            let mut keys = VecDeque::with_capacity(live);
            let mut slots = VecDeque::with_capacity(live);
            for (key, slot) in self.keys.iter().zip(&self.slots).filter(|(_, slot)| slot.live()) {
                keys.push_back(*key);
                slots.push_back(*slot);
            }
            (self.keys, self.slots, self.settled) = (keys, slots, 0);
        } else if self.keys.capacity() > 4 * self.keys.len() + 1024 {
            // A drained queue gives its memory back.
            self.keys.shrink_to_fit();
            self.slots.shrink_to_fit();
        }
    }
}

/// The live messages of a replica, in key order.
#[derive(Default)]
pub struct KeptMap {
    ranges: [Range; 3],
    /// Returns of the messages that have any (few have).
    returns: HashMap<u64, u32>,
    len: usize,
}

fn range_of(key: u64) -> usize {
    if key < super::replica::FORWARDED_BIT {
        0
    } else if key < super::replica::OLD_FORWARDED_BIT {
        1
    } else {
        2
    }
}

impl KeptMap {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains_key(&self, key: u64) -> bool {
        let range = &self.ranges[range_of(key)];
        range.find(key).is_ok_and(|at| range.slots.get(at).is_some_and(Slot::live))
    }

    pub fn get(&self, key: u64) -> Option<Kept> {
        let range = &self.ranges[range_of(key)];
        let slot = range.find(key).ok().and_then(|at| range.slots.get(at)).filter(|slot| slot.live())?;
        Some(self.unpack(key, slot))
    }

    fn unpack(&self, key: u64, slot: &Slot) -> Kept {
        Kept {
            index: slot.word & INDEX_MASK,
            at: slot.at,
            size: slot.size,
            returns: self.returns.get(&key).copied().unwrap_or(0),
            priority: (slot.word >> INDEX_BITS) as u8,
        }
    }

    /// Keeps (or replaces) the record of `key`.
    pub fn insert(&mut self, key: u64, kept: Kept) {
        let slot = Slot {
            word: (kept.index & INDEX_MASK) | u64::from(kept.priority) << INDEX_BITS,
            at: kept.at,
            size: kept.size,
        };
        if kept.returns > 0 {
            self.returns.insert(key, kept.returns);
        } else {
            self.returns.remove(&key);
        }
        let range = &mut self.ranges[range_of(key)];
        if range.keys.back().is_none_or(|&last| last < key) {
            range.keys.push_back(key);
            range.slots.push_back(slot);
            self.len += 1;
            return;
        }
        match range.find(key) {
            Ok(at) => {
                if let Some(old) = range.slots.get_mut(at) {
                    if !old.live() {
                        range.settled -= 1;
                        self.len += 1;
                    }
                    *old = slot;
                }
            }
            Err(at) => {
                range.keys.insert(at, key);
                range.slots.insert(at, slot);
                self.len += 1;
            }
        }
    }

    /// Takes the record of `key` out.
    pub fn remove(&mut self, key: u64) -> Option<Kept> {
        let range = &mut self.ranges[range_of(key)];
        let at = range.find(key).ok()?;
        let slot = range.slots.get_mut(at).filter(|slot| slot.live())?;
        let taken = *slot;
        slot.word = SETTLED;
        range.settled += 1;
        range.tidy();
        self.len -= 1;
        let kept = self.unpack(key, &taken);
        self.returns.remove(&key);
        Some(kept)
    }

    /// Sets the returns of `key`; false if it is not here.
    pub fn set_returns(&mut self, key: u64, returns: u32) -> bool {
        if !self.contains_key(key) {
            return false;
        }
        if returns > 0 {
            self.returns.insert(key, returns);
        } else {
            self.returns.remove(&key);
        }
        true
    }

    /// Every record, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Kept)> + '_ {
        self.ranges.iter().flat_map(move |range| {
            range
                .keys
                .iter()
                .zip(&range.slots)
                .filter(|(_, slot)| slot.live())
                .map(|(&key, slot)| (key, self.unpack(key, slot)))
        })
    }

    /// Every record in the order the log holds them (entry, then place):
    /// the order they were committed, whichever kind of key they have. A
    /// publisher whose messages were first forwarded, and then published
    /// on the leader's own node, gets them back in its order. Records kept
    /// in memory (from a snapshot, older than the log here) come first.
    pub fn in_log_order(&self) -> Vec<(u64, Kept)> {
        let mut out: Vec<(u64, Kept)> = Vec::with_capacity(self.len);
        out.extend(self.iter().filter(|(_, kept)| kept.index == 0));
        // Within a range, keys rise with the entries that hold them: a
        // merge of the ranges is the log's order.
        let mut ranges: Vec<_> = self
            .ranges
            .iter()
            .map(|range| {
                range
                    .keys
                    .iter()
                    .zip(&range.slots)
                    .filter(|(_, slot)| slot.live() && slot.word & INDEX_MASK != 0)
                    .map(|(&key, slot)| (key, self.unpack(key, slot)))
                    .peekable()
            })
            .collect();
        loop {
            let next = ranges
                .iter_mut()
                .enumerate()
                .filter_map(|(at, range)| range.peek().map(|(_, kept)| ((kept.index, kept.at), at)))
                .min();
            let Some((_, at)) = next else { break };
            if let Some(record) = ranges.get_mut(at).and_then(Iterator::next) {
                out.push(record);
            }
        }
        out
    }

    /// The oldest log entry a record refers to. Within a range, keys rise
    /// with the entries that hold them, so the first record of each range
    /// that is in the log is the oldest of its range.
    pub fn oldest_entry(&self) -> Option<u64> {
        self.ranges
            .iter()
            .filter_map(|range| {
                range
                    .slots
                    .iter()
                    .filter(|slot| slot.live())
                    .map(|slot| slot.word & INDEX_MASK)
                    .find(|&index| index != 0)
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::quorum::replica::{FORWARDED_BIT, OLD_FORWARDED_BIT};

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64, u32, u32, u8),
        Remove(u64),
        Return(u64, u32),
    }

    fn key() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..200, FORWARDED_BIT..FORWARDED_BIT + 200, OLD_FORWARDED_BIT..OLD_FORWARDED_BIT + 50]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (key(), 0u64..1000, any::<u32>(), any::<u32>(), any::<u8>()).prop_map(|(k, i, a, s, p)| Op::Insert(k, i, a, s, p)),
            3 => key().prop_map(Op::Remove),
            1 => (key(), 0u32..5).prop_map(|(k, r)| Op::Return(k, r)),
        ]
    }

    proptest! {
        /// The map answers as a `BTreeMap` of the same records does.
        #[test]
        fn answers_as_an_ordered_map(ops in proptest::collection::vec(op(), 0..600)) {
            let mut map = KeptMap::default();
            let mut model: BTreeMap<u64, Kept> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(key, index, at, size, priority) => {
                        let kept = Kept { index, at, size, returns: 0, priority };
                        map.insert(key, kept);
                        model.insert(key, kept);
                    }
                    Op::Remove(key) => prop_assert_eq!(map.remove(key), model.remove(&key)),
                    Op::Return(key, returns) => {
                        let known = model.get_mut(&key).map(|kept| kept.returns = returns).is_some();
                        prop_assert_eq!(map.set_returns(key, returns), known);
                    }
                }
                prop_assert_eq!(map.len(), model.len());
            }
            let all: Vec<(u64, Kept)> = map.iter().collect();
            let expected: Vec<(u64, Kept)> = model.iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(&all, &expected);
            for (key, kept) in &model {
                prop_assert_eq!(map.get(*key), Some(*kept));
                prop_assert!(map.contains_key(*key));
            }
            let mut oldest = None::<u64>;
            for lo in [0, FORWARDED_BIT, OLD_FORWARDED_BIT] {
                let hi = match lo { 0 => FORWARDED_BIT, l if l == FORWARDED_BIT => OLD_FORWARDED_BIT, _ => u64::MAX };
                if let Some(index) = model.range(lo..hi).map(|(_, k)| k.index).find(|&i| i != 0) {
                    oldest = Some(oldest.map_or(index, |o| o.min(index)));
                }
            }
            prop_assert_eq!(map.oldest_entry(), oldest);
            let mut ordered = map.in_log_order();
            prop_assert_eq!(ordered.len(), model.len());
            ordered.sort_by_key(|(key, _)| *key);
            prop_assert_eq!(ordered, expected);
        }
    }

    #[test]
    fn records_come_in_the_logs_order_across_kinds_of_key() {
        let mut map = KeptMap::default();
        let at = |index, at| Kept { index, at, size: 1, returns: 0, priority: 0 };
        // A message from a snapshot, forwarded ones in entries 5 and 9, the
        // leader's own in entries 7 and 9, and one the leader published
        // after its node took over in entry 12.
        map.insert(FORWARDED_BIT | (5 << 20), at(5, 0));
        map.insert(1, at(7, 0));
        map.insert(FORWARDED_BIT | (9 << 20), at(9, 1));
        map.insert(2, at(9, 0));
        map.insert(3, at(12, 0));
        map.insert(FORWARDED_BIT | 1, at(0, 0));
        let keys: Vec<u64> = map.in_log_order().into_iter().map(|(key, _)| key).collect();
        assert_eq!(keys, [FORWARDED_BIT | 1, FORWARDED_BIT | (5 << 20), 1, 2, FORWARDED_BIT | (9 << 20), 3]);
    }

    #[test]
    fn a_drained_map_keeps_few_records() {
        let mut map = KeptMap::default();
        let kept = Kept { index: 7, at: 0, size: 1024, returns: 0, priority: 0 };
        for key in 1..=100_000 {
            map.insert(key, kept);
        }
        // Settled out of order: two of every three, then the rest.
        for key in (1..=100_000).filter(|key| key % 3 != 0) {
            assert!(map.remove(key).is_some());
        }
        assert_eq!(map.len(), 33_333);
        assert!(map.ranges[0].keys.len() <= 2 * 33_333 + 65, "marks are dropped once they outnumber the live");
        for key in (3..=100_000).step_by(3) {
            assert!(map.remove(key).is_some());
        }
        assert!(map.is_empty());
        assert_eq!(map.ranges[0].keys.len(), 0);
        assert!(map.ranges[0].keys.capacity() < 10_000, "memory is given back");
    }
}
