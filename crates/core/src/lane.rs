//! The ready messages of one queue priority, in sequence order, in three
//! parts: a loaded `front` (the head window, and requeued messages), a
//! compact paged `middle`, and the newest messages at the `back` waiting to
//! be paged out.
//!
//! The middle is what makes a deep durable queue cheap: runs of paged
//! entries with consecutive sequence numbers, each entry two varints (log
//! index and arrival second, as deltas from the previous entry), so about
//! 2 to 3 bytes per message instead of a 24-byte entry. Entries that cannot
//! be paged (transient messages) sit in the middle as single entries, so
//! they never hold up the paging of the ones behind them.
//!
//! Invariant: every sequence number in `front` < every one in `middle` <
//! every one in `back`; within each part they increase.

use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::sync::Arc;

use crate::message::Message;

const REDELIVERED: u64 = 1 << 63;

/// Most entries in one run, so that splitting or re-keying one is cheap.
const RUN_MAX: u32 = 4096;

#[derive(Debug)]
pub(crate) enum Body {
    Loaded(Arc<Message>),
    /// The log index, and the arrival second when known (0 if not): enough
    /// to tell that a message is past its queue TTL without reading it.
    Paged(NonZeroU64, u32),
}

/// 24 bytes: the sequence number with the redelivered flag in its top bit,
/// and the body.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) seq_flags: u64,
    pub(crate) body: Body,
}

impl Entry {
    pub(crate) fn new(seq: u64, redelivered: bool, body: Body) -> Entry {
        Entry { seq_flags: seq | if redelivered { REDELIVERED } else { 0 }, body }
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq_flags & !REDELIVERED
    }

    pub(crate) fn redelivered(&self) -> bool {
        self.seq_flags & REDELIVERED != 0
    }

    /// The log index of its stored copy (0 if none; a spilled body is not
    /// stored).
    pub(crate) fn stored_index(&self) -> u64 {
        match &self.body {
            Body::Loaded(message) => message.stored_index(),
            Body::Paged(index, _) if crate::queue::is_spilled(index.get()) => 0,
            Body::Paged(index, _) => index.get(),
        }
    }

    /// The spill reference of a paged-out transient body (0 if none).
    pub(crate) fn spilled(&self) -> u64 {
        match &self.body {
            Body::Paged(index, _) if crate::queue::is_spilled(index.get()) => index.get(),
            _ => 0,
        }
    }
}

#[expect(clippy::cast_possible_truncation, reason = "each byte takes the low 7 bits, by design")]
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    while let Some(&byte) = bytes.get(*at) {
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 || shift >= 63 {
            break;
        }
        shift += 7;
    }
    value
}

fn zigzag(delta: i64) -> u64 {
    ((delta << 1) ^ (delta >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// Paged entries with consecutive sequence numbers.
#[derive(Debug)]
struct Run {
    redelivered: bool,
    /// Sequence number, log index and arrival second of the next entry to
    /// be read, and where its encoding starts.
    seq: u64,
    index: u64,
    arrived_s: u32,
    at: usize,
    /// Entries left from `at`.
    len: u32,
    /// Encoded entries: the first holds its index and arrival second in
    /// the fields above; each later one (index delta, arrival delta) as
    /// zigzag varints.
    bytes: Vec<u8>,
    /// The last entry, for appending.
    last_index: u64,
    last_arrived_s: u32,
}

impl Run {
    fn new(seq: u64, redelivered: bool, index: u64, arrived_s: u32) -> Run {
        Run {
            redelivered,
            seq,
            index,
            arrived_s,
            at: 0,
            len: 1,
            bytes: Vec::new(),
            last_index: index,
            last_arrived_s: arrived_s,
        }
    }

    fn next_seq(&self) -> u64 {
        self.seq + u64::from(self.len)
    }

    /// Appends the entry after the last one, if it fits this run.
    fn try_push(&mut self, seq: u64, redelivered: bool, index: u64, arrived_s: u32) -> bool {
        if seq != self.next_seq() || redelivered != self.redelivered || self.len >= RUN_MAX {
            return false;
        }
        put_varint(&mut self.bytes, zigzag(index as i64 - self.last_index as i64));
        put_varint(&mut self.bytes, zigzag(i64::from(arrived_s) - i64::from(self.last_arrived_s)));
        self.last_index = index;
        self.last_arrived_s = arrived_s;
        self.len += 1;
        true
    }

    /// The first entry, as a paged entry.
    fn first(&self) -> Entry {
        let index = NonZeroU64::new(self.index).unwrap_or(NonZeroU64::MIN);
        Entry::new(self.seq, self.redelivered, Body::Paged(index, self.arrived_s))
    }

    /// Drops the first entry; false when the run is then empty.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "deltas this run encoded from u64 indices and u32 seconds: the sums are those values"
    )]
    fn advance(&mut self) -> bool {
        self.len -= 1;
        if self.len == 0 {
            return false;
        }
        self.index = (self.index as i64 + unzigzag(get_varint(&self.bytes, &mut self.at))) as u64;
        self.arrived_s = (i64::from(self.arrived_s) + unzigzag(get_varint(&self.bytes, &mut self.at))) as u32;
        self.seq += 1;
        if self.at > 4096 && self.at * 2 > self.bytes.len() {
            // Give back what was read.
            self.bytes.drain(..self.at);
            self.at = 0;
        }
        true
    }

    /// Every entry: (seq, log index, arrival second).
    #[expect(
        clippy::cast_possible_truncation,
        reason = "deltas this run encoded from u64 indices and u32 seconds: the sums are those values"
    )]
    fn decode(&self) -> Vec<(u64, u64, u32)> {
        let mut out = Vec::with_capacity(self.len as usize);
        let (mut index, mut arrived_s, mut at) = (self.index, self.arrived_s, self.at);
        for k in 0..u64::from(self.len) {
            if k > 0 {
                index = (index as i64 + unzigzag(get_varint(&self.bytes, &mut at))) as u64;
                arrived_s = (i64::from(arrived_s) + unzigzag(get_varint(&self.bytes, &mut at))) as u32;
            }
            out.push((self.seq + k, index, arrived_s));
        }
        out
    }

    /// Runs holding `entries` (consecutive or not) in order.
    fn encode(redelivered: bool, entries: &[(u64, u64, u32)]) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        for &(seq, index, arrived_s) in entries {
            let fits = runs.last_mut().is_some_and(|run| run.try_push(seq, redelivered, index, arrived_s));
            if !fits {
                runs.push(Run::new(seq, redelivered, index, arrived_s));
            }
        }
        runs
    }
}

#[derive(Debug)]
enum Item {
    Run(Run),
    /// An entry that is not paged (a transient message) amid paged ones.
    Single(Entry),
}

impl Item {
    fn first_seq(&self) -> u64 {
        match self {
            Item::Run(run) => run.seq,
            Item::Single(entry) => entry.seq(),
        }
    }

    fn last_seq(&self) -> u64 {
        match self {
            Item::Run(run) => run.next_seq() - 1,
            Item::Single(entry) => entry.seq(),
        }
    }
}

/// A view of an entry (paged entries have no message).
pub(crate) struct View<'a> {
    pub(crate) seq: u64,
    pub(crate) redelivered: bool,
    pub(crate) message: Option<&'a Arc<Message>>,
    pub(crate) stored: u64,
    pub(crate) spilled: u64,
}

impl<'a> View<'a> {
    fn of(entry: &'a Entry) -> View<'a> {
        View {
            seq: entry.seq(),
            redelivered: entry.redelivered(),
            message: match &entry.body {
                Body::Loaded(message) => Some(message),
                Body::Paged(..) => None,
            },
            stored: entry.stored_index(),
            spilled: entry.spilled(),
        }
    }
}

/// Where paging puts an entry.
enum Placement {
    /// Paged: its log index or spill reference, and arrival second.
    Paged(u64, u32),
    /// Nowhere on disk will take it: it stays in memory.
    Memory,
    /// Its log entry is on its way: try again later.
    Later,
}

impl Placement {
    /// Writes a body to `spill` when that is where it goes.
    fn of(entry: &Entry, readable: u64, spill: Option<&dyn crate::queue::MessageLoader>, durable: bool) -> Placement {
        match &entry.body {
            Body::Paged(index, arrived_s) => Placement::Paged(index.get(), *arrived_s),
            Body::Loaded(message) => {
                let stored = message.stored_index();
                let arrived_s = u32::try_from(message.arrived() / 1000).unwrap_or(0);
                let pageable = match spill {
                    Some(loader) => loader.can_page(stored),
                    None => stored <= readable,
                };
                if stored != 0 && pageable {
                    Placement::Paged(stored, arrived_s)
                } else if stored == 0 && (!message.persistent || !durable) {
                    match spill.and_then(|s| s.spill(message)) {
                        Some(reference) => Placement::Paged(reference, arrived_s),
                        None => Placement::Memory,
                    }
                } else {
                    Placement::Later
                }
            }
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Lane {
    front: VecDeque<Entry>,
    middle: VecDeque<Item>,
    middle_len: usize,
    /// Single entries in the middle (bodies that found no place on disk).
    middle_singles: usize,
    back: VecDeque<Entry>,
}

impl Lane {
    pub(crate) fn len(&self) -> usize {
        self.front.len() + self.middle_len + self.back.len()
    }

    /// Entries whose body is (or may be) in memory: the front, the back and
    /// the single entries of the middle.
    pub(crate) fn loaded_len(&self) -> usize {
        self.front.len() + self.middle_singles + self.back.len()
    }

    /// True while entries wait to be paged out: a front longer than
    /// `window`, or anything at the back.
    pub(crate) fn needs_paging(&self, window: usize) -> bool {
        !self.back.is_empty() || self.front.len() > window
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds the newest entry: to the loaded head window while there is
    /// room and nothing paged, else to the back.
    pub(crate) fn push(&mut self, entry: Entry, window: usize) {
        if self.middle.is_empty() && self.back.is_empty() && self.front.len() < window {
            self.front.push_back(entry);
        } else {
            self.back.push_back(entry);
        }
    }

    /// Adds the newest entry straight to the paged middle (recovery).
    pub(crate) fn push_paged(&mut self, seq: u64, redelivered: bool, index: NonZeroU64, arrived_s: u32) {
        if !self.back.is_empty() {
            self.back.push_back(Entry::new(seq, redelivered, Body::Paged(index, arrived_s)));
            return;
        }
        self.append_middle(seq, redelivered, index.get(), arrived_s);
    }

    fn append_middle(&mut self, seq: u64, redelivered: bool, index: u64, arrived_s: u32) {
        self.middle_len += 1;
        if let Some(Item::Run(run)) = self.middle.back_mut() {
            if run.try_push(seq, redelivered, index, arrived_s) {
                return;
            }
        }
        self.middle.push_back(Item::Run(Run::new(seq, redelivered, index, arrived_s)));
    }

    /// The first entry, brought to the front (unpacked from the middle if
    /// the front is empty).
    pub(crate) fn front_mut(&mut self) -> Option<&mut Entry> {
        if self.front.is_empty() {
            self.unpack_one();
        }
        self.front.front_mut()
    }

    fn unpack_one(&mut self) {
        match self.middle.front_mut() {
            Some(Item::Run(run)) => {
                self.front.push_back(run.first());
                self.middle_len -= 1;
                if !run.advance() {
                    self.middle.pop_front();
                }
            }
            Some(Item::Single(_)) => {
                if let Some(Item::Single(entry)) = self.middle.pop_front() {
                    self.middle_len -= 1;
                    self.middle_singles -= 1;
                    self.front.push_back(entry);
                }
            }
            None => {
                if let Some(entry) = self.back.pop_front() {
                    self.front.push_back(entry);
                }
            }
        }
    }

    pub(crate) fn pop_front(&mut self) -> Option<Entry> {
        if self.front.is_empty() {
            self.unpack_one();
        }
        self.front.pop_front()
    }

    /// Puts a delivered entry back at its position: it is older than
    /// anything never delivered, so it goes into the front.
    pub(crate) fn requeue(&mut self, entry: Entry) {
        let seq = entry.seq();
        let position = self.front.partition_point(|e| e.seq() < seq);
        self.front.insert(position, entry);
    }

    /// Takes the entry with this sequence number, wherever it is.
    #[expect(clippy::cast_possible_truncation, reason = "an offset inside a run, below its u32 length")]
    pub(crate) fn remove_seq(&mut self, seq: u64) -> Option<Entry> {
        if let Ok(position) = self.front.binary_search_by_key(&seq, Entry::seq) {
            return self.front.remove(position);
        }
        if let Ok(position) = self.back.binary_search_by_key(&seq, Entry::seq) {
            return self.back.remove(position);
        }
        let position = self.middle.partition_point(|item| item.last_seq() < seq);
        let item = self.middle.get(position)?;
        if item.first_seq() > seq {
            return None;
        }
        let found = match self.middle.remove(position)? {
            Item::Single(entry) => {
                self.middle_singles -= 1;
                entry
            }
            Item::Run(run) => {
                let entries = run.decode();
                let k = (seq - run.seq) as usize;
                let (seq, index, arrived_s) = entries[k];
                let before = Run::encode(run.redelivered, &entries[..k]);
                let after = Run::encode(run.redelivered, &entries[k + 1..]);
                for (offset, run) in before.into_iter().chain(after).enumerate() {
                    self.middle.insert(position + offset, Item::Run(run));
                }
                let index = NonZeroU64::new(index).unwrap_or(NonZeroU64::MIN);
                Entry::new(seq, run.redelivered, Body::Paged(index, arrived_s))
            }
        };
        self.middle_len -= 1;
        Some(found)
    }

    /// Moves up to `budget` entries into the paged middle, oldest first:
    /// first the newest of a front longer than `window` (the window
    /// shrank), then from the back once the front is a full window. Stored
    /// messages whose log entry is readable become paged; messages no log
    /// entry will hold (transient ones, or any in a non-`durable` queue) go
    /// to `spill` if there is one, else stay loaded; a persistent message of
    /// a durable queue not yet stored stops it. Returns how many moved.
    pub(crate) fn page_out(
        &mut self,
        readable: u64,
        budget: usize,
        window: usize,
        spill: Option<&dyn crate::queue::MessageLoader>,
        durable: bool,
    ) -> usize {
        let mut moved = self.shrink_front(readable, budget, window, spill, durable);
        while self.front.len() < window && self.middle.is_empty() {
            let Some(entry) = self.back.pop_front() else { break };
            self.front.push_back(entry);
        }
        while moved < budget {
            let Some(entry) = self.back.front() else { break };
            let (seq, redelivered) = (entry.seq(), entry.redelivered());
            match Placement::of(entry, readable, spill, durable) {
                Placement::Paged(index, arrived_s) => {
                    self.back.pop_front();
                    self.append_middle(seq, redelivered, index, arrived_s);
                }
                Placement::Memory => {
                    if let Some(entry) = self.back.pop_front() {
                        self.middle.push_back(Item::Single(entry));
                        self.middle_len += 1;
                        self.middle_singles += 1;
                    }
                }
                Placement::Later => break,
            }
            moved += 1;
        }
        moved
    }

    /// Moves up to `budget` of the newest front entries beyond `window` to
    /// the start of the middle; those that cannot be paged now stay loaded
    /// there as single entries.
    fn shrink_front(
        &mut self,
        readable: u64,
        budget: usize,
        window: usize,
        spill: Option<&dyn crate::queue::MessageLoader>,
        durable: bool,
    ) -> usize {
        let excess = self.front.len().saturating_sub(window).min(budget);
        if excess == 0 {
            return 0;
        }
        let start = self.front.len() - excess;
        let mut items: Vec<Item> = Vec::new();
        for entry in self.front.drain(start..) {
            let (seq, redelivered) = (entry.seq(), entry.redelivered());
            match Placement::of(&entry, readable, spill, durable) {
                Placement::Paged(index, arrived_s) => {
                    let fits = match items.last_mut() {
                        Some(Item::Run(run)) => run.try_push(seq, redelivered, index, arrived_s),
                        _ => false,
                    };
                    if !fits {
                        items.push(Item::Run(Run::new(seq, redelivered, index, arrived_s)));
                    }
                }
                Placement::Memory | Placement::Later => {
                    self.middle_singles += 1;
                    items.push(Item::Single(entry));
                }
            }
        }
        self.middle_len += excess;
        for item in items.into_iter().rev() {
            self.middle.push_front(item);
        }
        excess
    }

    /// Every entry in order (paged ones decoded), to `visit`.
    pub(crate) fn for_each<'a>(&'a self, mut visit: impl FnMut(View<'a>)) {
        for entry in &self.front {
            visit(View::of(entry));
        }
        for item in &self.middle {
            match item {
                Item::Single(entry) => visit(View::of(entry)),
                Item::Run(run) => {
                    for (seq, index, _) in run.decode() {
                        let (stored, spilled) = if crate::queue::is_spilled(index) { (0, index) } else { (index, 0) };
                        visit(View { seq, redelivered: run.redelivered, message: None, stored, spilled });
                    }
                }
            }
        }
        for entry in &self.back {
            visit(View::of(entry));
        }
    }

    /// Points paged entries at the log indices their messages moved to.
    pub(crate) fn rekey(&mut self, moved: &std::collections::HashMap<u64, u64>) {
        let mut rekey_entry = |entry: &mut Entry| {
            if let Body::Paged(index, _) = &mut entry.body {
                if let Some(new) = moved.get(&index.get()).and_then(|n| NonZeroU64::new(*n)) {
                    *index = new;
                }
            }
        };
        self.front.iter_mut().for_each(&mut rekey_entry);
        self.back.iter_mut().for_each(&mut rekey_entry);
        let mut rebuilt = VecDeque::with_capacity(self.middle.len());
        for item in self.middle.drain(..) {
            match item {
                Item::Single(mut entry) => {
                    rekey_entry(&mut entry);
                    rebuilt.push_back(Item::Single(entry));
                }
                Item::Run(run) => {
                    let mut entries = run.decode();
                    if !entries.iter().any(|(_, index, _)| moved.contains_key(index)) {
                        rebuilt.push_back(Item::Run(run));
                        continue;
                    }
                    for entry in &mut entries {
                        if let Some(new) = moved.get(&entry.1) {
                            entry.1 = *new;
                        }
                    }
                    rebuilt.extend(Run::encode(run.redelivered, &entries).into_iter().map(Item::Run));
                }
            }
        }
        self.middle = rebuilt;
    }

    /// Drops everything, handing each entry to `dropped`.
    pub(crate) fn drain(&mut self, mut dropped: impl FnMut(u64, u64, u64)) {
        self.for_each(|view| dropped(view.seq, view.stored, view.spilled));
        self.front.clear();
        self.middle.clear();
        self.middle_len = 0;
        self.middle_singles = 0;
        self.back.clear();
    }

    /// Bytes held for paged entries in the middle.
    #[cfg(test)]
    pub(crate) fn middle_bytes(&self) -> usize {
        self.middle
            .iter()
            .map(|item| match item {
                Item::Run(run) => std::mem::size_of::<Run>() + run.bytes.capacity(),
                Item::Single(_) => std::mem::size_of::<Item>(),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn paged(seq: u64, index: u64) -> Entry {
        Entry::new(seq, false, Body::Paged(NonZeroU64::new(index).unwrap(), u32::try_from(index / 7).unwrap()))
    }

    #[test]
    fn varints_and_zigzag_round_trip() {
        for value in [0i64, 1, -1, 63, -64, 1 << 40, -(1 << 40), i64::MAX, i64::MIN + 1] {
            let mut out = Vec::new();
            put_varint(&mut out, zigzag(value));
            let mut at = 0;
            assert_eq!(unzigzag(get_varint(&out, &mut at)), value);
            assert_eq!(at, out.len());
        }
    }

    #[test]
    fn a_deep_lane_costs_a_few_bytes_per_paged_message() {
        let mut lane = Lane::default();
        for seq in 0..100_000u64 {
            lane.push(paged(seq, 10 + seq * 2), 16);
            lane.page_out(u64::MAX, 2, 16, None, true);
        }
        lane.page_out(u64::MAX, usize::MAX, 16, None, true);
        assert_eq!(lane.len(), 100_000);
        let per_message = lane.middle_bytes() as f64 / (100_000 - 16) as f64;
        assert!(per_message < 3.0, "{per_message} bytes per paged message");
        let mut seqs = Vec::new();
        while let Some(entry) = lane.pop_front() {
            assert_eq!(entry.stored_index(), 10 + entry.seq() * 2);
            seqs.push(entry.seq());
        }
        assert_eq!(seqs, (0..100_000).collect::<Vec<_>>());
    }

    /// A transient message in memory: paging without a spill keeps it
    /// loaded, as a single entry.
    fn loaded(seq: u64) -> Entry {
        let properties = warren_codec::properties::Properties::empty();
        let mut builder = Message::builder(b"", b"q", &properties, 1);
        builder.push_body(b"x");
        Entry::new(seq, false, Body::Loaded(Arc::new(builder.finish())))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push,
        PushLoaded,
        /// Budget and window: a window smaller than the front shrinks it.
        PageOut(usize, usize),
        Pop,
        Requeue,
        Remove(u64),
        Rekey(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Push),
            1 => Just(Op::PushLoaded),
            2 => (0usize..5, 1usize..6).prop_map(|(budget, window)| Op::PageOut(budget, window)),
            2 => Just(Op::Pop),
            1 => Just(Op::Requeue),
            1 => (0u64..200).prop_map(Op::Remove),
            1 => (0u64..200).prop_map(Op::Rekey),
        ]
    }

    proptest! {
        /// The lane behaves as a sorted list of (seq, index) whatever the
        /// mix of pushes, paging (with windows growing and shrinking),
        /// pops, requeues, removals and re-keys; its count of loaded
        /// entries covers every body in memory.
        #[test]
        fn lane_agrees_with_a_sorted_list(ops in proptest::collection::vec(op(), 1..300)) {
            let mut lane = Lane::default();
            let mut model: Vec<(u64, u64)> = Vec::new();
            let mut popped: Vec<(u64, u64)> = Vec::new();
            let mut next_seq = 0u64;
            for op in ops {
                match op {
                    Op::Push => {
                        lane.push(paged(next_seq, 1000 + next_seq * 3), 4);
                        model.push((next_seq, 1000 + next_seq * 3));
                        next_seq += 1;
                    }
                    Op::PushLoaded => {
                        lane.push(loaded(next_seq), 4);
                        model.push((next_seq, 0));
                        next_seq += 1;
                    }
                    Op::PageOut(budget, window) => {
                        let (before, loaded_before) = (lane.len(), lane.loaded_len());
                        let moved = lane.page_out(u64::MAX, budget, window, None, true);
                        prop_assert!(moved <= budget);
                        prop_assert_eq!(lane.len(), before);
                        prop_assert!(lane.loaded_len() <= loaded_before);
                    }
                    Op::Pop => {
                        let got = lane.pop_front().map(|e| (e.seq(), e.stored_index()));
                        let want = if model.is_empty() { None } else { Some(model.remove(0)) };
                        prop_assert_eq!(got, want);
                        popped.extend(got);
                    }
                    Op::Requeue => {
                        if let Some((seq, index)) = popped.pop() {
                            lane.requeue(if index == 0 { loaded(seq) } else { paged(seq, index) });
                            let position = model.partition_point(|(s, _)| *s < seq);
                            model.insert(position, (seq, index));
                        }
                    }
                    Op::Remove(seq) => {
                        let got = lane.remove_seq(seq).map(|e| (e.seq(), e.stored_index()));
                        let want = model.iter().position(|(s, _)| *s == seq).map(|p| model.remove(p));
                        prop_assert_eq!(got, want);
                    }
                    Op::Rekey(seq) => {
                        if let Some(entry) = model.iter_mut().find(|(s, index)| *s == seq && *index != 0) {
                            let moved: std::collections::HashMap<u64, u64> = [(entry.1, entry.1 + 1_000_000)].into();
                            entry.1 += 1_000_000;
                            lane.rekey(&moved);
                        }
                    }
                }
                prop_assert_eq!(lane.len(), model.len());
                let mut seen = Vec::new();
                let mut in_memory = 0;
                lane.for_each(|view| {
                    seen.push((view.seq, view.stored));
                    in_memory += usize::from(view.message.is_some());
                });
                prop_assert_eq!(&seen, &model);
                prop_assert!(lane.loaded_len() >= in_memory && lane.loaded_len() <= lane.len());
            }
        }
    }
}
