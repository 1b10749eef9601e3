//! Messages held until a due time (the `x-delayed-message` exchange).
//!
//! A stored message waits as 16 bytes (due time, log index) and is read back
//! from the log when due, so millions of scheduled messages cost no body
//! memory. A message not (yet) in the log waits in memory: transient ones
//! for good, persistent ones until their log entry is readable.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use crate::message::Message;
use crate::queue::MessageLoader;

/// Keys with this bit are log indices; the others are in-memory slots.
const STORED: u64 = 1 << 63;

#[derive(Debug, Default)]
pub struct Scheduler {
    /// (due, key), soonest first.
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    in_memory: HashMap<u64, Arc<Message>>,
    next_slot: u64,
    /// Persistent messages whose log entry is not readable yet.
    staging: Vec<(u64, Arc<Message>)>,
    /// Recovered log indices whose due time is read once a loader is set.
    recovered: Vec<u64>,
}

impl Scheduler {
    pub fn len(&self) -> usize {
        self.heap.len() + self.staging.len() + self.recovered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Holds `message` until `due`; `stored_later` when its log entry is on
    /// its way (it then leaves memory once readable).
    pub fn schedule(&mut self, due: u64, message: Arc<Message>, stored_later: bool) {
        if stored_later {
            self.staging.push((due, message));
        } else {
            let slot = self.next_slot;
            self.next_slot = (self.next_slot + 1) & !STORED;
            self.in_memory.insert(slot, message);
            self.heap.push(Reverse((due, slot)));
        }
    }

    /// A stored message found by recovery; its due time is read later.
    pub fn recover(&mut self, stored: u64) {
        self.recovered.push(stored);
    }

    /// Pages out staged messages whose log entries are readable, and reads
    /// the due times of recovered ones.
    pub fn settle_staging(
        &mut self,
        readable: u64,
        loader: Option<&dyn MessageLoader>,
        due_of: impl Fn(&Message) -> u64,
    ) {
        let heap = &mut self.heap;
        self.staging.retain(|(due, message)| {
            let stored = message.stored_index();
            let readable = stored != 0 && stored <= readable;
            if readable {
                heap.push(Reverse((*due, stored | STORED)));
            }
            !readable
        });
        if let Some(loader) = loader {
            for stored in self.recovered.drain(..) {
                match loader.load(stored) {
                    Some(message) => self.heap.push(Reverse((due_of(&message), stored | STORED))),
                    None => tracing::error!(stored, "scheduled message cannot be read back; dropped"),
                }
            }
        }
    }

    /// Earliest due time.
    #[cfg(test)]
    pub fn next_due(&self) -> Option<u64> {
        let staged = self.staging.iter().map(|(due, _)| *due).min();
        let heaped = self.heap.peek().map(|Reverse((due, _))| *due);
        match (staged, heaped) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes up to `limit` messages due by `now` (inclusive), in due order
    /// within the heap. Stored ones that cannot be read are reported in
    /// `unreadable`.
    pub fn pop_due(
        &mut self,
        now: u64,
        limit: usize,
        loader: Option<&dyn MessageLoader>,
        out: &mut Vec<Arc<Message>>,
        unreadable: &mut Vec<u64>,
    ) {
        let mut index = 0;
        while index < self.staging.len() && out.len() < limit {
            if self.staging[index].0 <= now {
                out.push(self.staging.swap_remove(index).1);
            } else {
                index += 1;
            }
        }
        while out.len() < limit {
            let Some(&Reverse((due, key))) = self.heap.peek() else { break };
            if due > now {
                break;
            }
            self.heap.pop();
            if key & STORED == 0 {
                out.extend(self.in_memory.remove(&key));
                continue;
            }
            let stored = key & !STORED;
            match loader.and_then(|l| l.load(stored)) {
                Some(message) => {
                    message.set_stored_index(stored);
                    out.push(Arc::new(message));
                }
                None => unreadable.push(stored),
            }
        }
    }

    /// Log indices of every stored message held.
    pub fn stored(&self) -> impl Iterator<Item = u64> + '_ {
        let heaped =
            self.heap.iter().filter(|Reverse((_, key))| key & STORED != 0).map(|Reverse((_, key))| key & !STORED);
        let staged = self.staging.iter().map(|(_, m)| m.stored_index()).filter(|s| *s != 0);
        heaped.chain(staged).chain(self.recovered.iter().copied())
    }

    /// Follows messages moved by compaction.
    pub fn rekey(&mut self, moved: &HashMap<u64, u64>) {
        let touched =
            self.heap.iter().any(|Reverse((_, key))| key & STORED != 0 && moved.contains_key(&(key & !STORED)));
        if touched {
            let entries = std::mem::take(&mut self.heap).into_vec();
            self.heap = entries
                .into_iter()
                .map(|Reverse((due, key))| match moved.get(&(key & !STORED)) {
                    Some(new) if key & STORED != 0 => Reverse((due, new | STORED)),
                    _ => Reverse((due, key)),
                })
                .collect();
        }
        for stored in &mut self.recovered {
            if let Some(new) = moved.get(stored) {
                *stored = *new;
            }
        }
        for (_, message) in &self.staging {
            if let Some(new) = moved.get(&message.stored_index()) {
                message.moved_to(*new);
            }
        }
    }

    /// Drops everything, handing each stored message's log index to
    /// `dropped`.
    pub fn clear(&mut self, mut dropped: impl FnMut(u64)) {
        for stored in self.stored() {
            dropped(stored);
        }
        self.heap.clear();
        self.in_memory.clear();
        self.staging.clear();
        self.recovered.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_codec::properties::Properties;

    fn message(body: &[u8]) -> Arc<Message> {
        let mut builder = Message::builder(b"x", b"k", &Properties::empty(), body.len());
        builder.push_body(body);
        Arc::new(builder.finish())
    }

    struct Log;

    impl MessageLoader for Log {
        fn load(&self, stored: u64) -> Option<Message> {
            let m = message(&stored.to_be_bytes());
            Arc::try_unwrap(m).ok()
        }
        fn readable_upto(&self) -> u64 {
            u64::MAX
        }
    }

    #[test]
    fn releases_in_due_order_and_pages_stored_messages_out() {
        let mut scheduler = Scheduler::default();
        scheduler.schedule(30, message(b"c"), false);
        scheduler.schedule(10, message(b"a"), false);
        let stored = message(b"b");
        stored.set_stored_index(7);
        scheduler.schedule(20, stored, true);
        scheduler.settle_staging(u64::MAX, Some(&Log), |_| 0);
        assert!(scheduler.staging.is_empty(), "readable: only the log index is kept");
        assert_eq!(scheduler.stored().collect::<Vec<_>>(), vec![7]);
        let (mut out, mut unreadable) = (Vec::new(), Vec::new());
        scheduler.pop_due(25, 10, Some(&Log), &mut out, &mut unreadable);
        let bodies: Vec<Vec<u8>> = out.iter().map(|m| m.body().to_vec()).collect();
        assert_eq!(bodies, vec![b"a".to_vec(), 7u64.to_be_bytes().to_vec()]);
        assert_eq!(scheduler.next_due(), Some(30));
        out.clear();
        scheduler.pop_due(30, 10, Some(&Log), &mut out, &mut unreadable);
        assert_eq!(out.len(), 1);
        assert!(scheduler.is_empty());
    }
}
