//! What a publisher confirm waits for when its message is kept elsewhere
//! than the local log: a quorum queue's Raft groups, or a stream's log.
//! Each session flush that hands work over takes a ticket; the ticket is
//! resolved once all of that work is done (or some of it failed).
//!
//! Connections watch one number, the mark: every ticket up to it is
//! resolved, as the local log's durable index says of its entries. Waiting
//! for the mark gathers confirms into large multiple acks, and with them
//! the publishers' next messages into large batches (acking each ticket as
//! it resolved cost twice the CPU per message with a hundred queues). A
//! ticket unresolved for longer than [`STRAGGLER_AFTER`] (a group without
//! a quorum, waiting out its patience) stops holding the mark back: the
//! mark passes it, and the confirms waiting for it look at it on its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

/// Failed tickets are remembered this far below the oldest unresolved one
/// (a connection reads its outcome soon after it resolves).
const FAILED_KEPT: u64 = 1 << 20;

/// A ticket unresolved for this long no longer holds back the others.
pub const STRAGGLER_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    issued: u64,
    /// Unresolved tickets and when each was issued (oldest first).
    outstanding: BTreeMap<u64, Instant>,
    /// Unresolved for longer than [`STRAGGLER_AFTER`]: below the mark.
    stragglers: BTreeSet<u64>,
    failed: BTreeSet<u64>,
    /// A ticket that stands for two ([`Tickets::join`]): each part names
    /// it, and it counts the parts still unresolved.
    part_of: HashMap<u64, u64>,
    parts_left: HashMap<u64, usize>,
}

impl State {
    fn is_resolved(&self, ticket: u64) -> bool {
        ticket == 0
            || (ticket <= self.issued && !self.outstanding.contains_key(&ticket) && !self.stragglers.contains(&ticket))
    }

    fn mark(&self) -> u64 {
        self.outstanding.first_key_value().map_or(self.issued, |(&first, _)| first - 1)
    }
}

pub struct Tickets {
    state: Mutex<State>,
    /// The mark; also sent unchanged when a straggler resolves.
    mark: watch::Sender<u64>,
}

impl Default for Tickets {
    fn default() -> Self {
        Tickets { state: Mutex::default(), mark: watch::Sender::new(0) }
    }
}

impl Tickets {
    pub fn issue(&self) -> u64 {
        let mut state = self.state.lock();
        state.issued += 1;
        let ticket = state.issued;
        state.outstanding.insert(ticket, Instant::now());
        ticket
    }

    pub fn resolve(&self, ticket: u64, ok: bool) {
        self.resolve_all(&[ticket], ok);
    }

    pub fn resolve_all(&self, tickets: &[u64], ok: bool) {
        if tickets.is_empty() {
            return;
        }
        let (mark, straggler) = {
            let mut state = self.state.lock();
            let mut straggler = false;
            let mut work: Vec<(u64, bool)> = tickets.iter().map(|&ticket| (ticket, ok)).collect();
            while let Some((ticket, ok)) = work.pop() {
                if state.outstanding.remove(&ticket).is_none() {
                    if !state.stragglers.remove(&ticket) {
                        continue;
                    }
                    straggler = true;
                }
                if !ok {
                    state.failed.insert(ticket);
                }
                let Some(joint) = state.part_of.remove(&ticket) else { continue };
                if !ok {
                    state.failed.insert(joint);
                }
                if let Some(left) = state.parts_left.get_mut(&joint) {
                    *left -= 1;
                    if *left == 0 {
                        state.parts_left.remove(&joint);
                        let ok = !state.failed.contains(&joint);
                        work.push((joint, ok));
                    }
                }
            }
            let oldest = state.stragglers.first().map_or(state.mark(), |&first| first.min(state.mark()));
            let forget = oldest.saturating_sub(FAILED_KEPT);
            while state.failed.first().is_some_and(|&f| f < forget) {
                state.failed.pop_first();
            }
            (state.mark(), straggler)
        };
        self.announce(mark, straggler);
    }

    /// Sends the mark if it moved, or in any case (`always`: a ticket below
    /// it resolved).
    fn announce(&self, mark: u64, always: bool) {
        self.mark.send_if_modified(|current| {
            let moved = *current < mark;
            *current = (*current).max(mark);
            moved || always
        });
    }

    /// Moves the tickets unresolved since before `now - STRAGGLER_AFTER`
    /// below the mark (the broker calls it a few times a second).
    pub fn age(&self, now: Instant) {
        let mark = {
            let mut state = self.state.lock();
            let mut moved = false;
            while let Some(entry) = state.outstanding.first_entry() {
                if now.saturating_duration_since(*entry.get()) < STRAGGLER_AFTER {
                    break;
                }
                let ticket = entry.remove_entry().0;
                state.stragglers.insert(ticket);
                moved = true;
            }
            if !moved {
                return;
            }
            state.mark()
        };
        self.announce(mark, false);
    }

    /// Every ticket up to the mark is resolved, or a straggler.
    pub fn mark(&self) -> u64 {
        *self.mark.borrow()
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.mark.subscribe()
    }

    /// `ticket`'s outcome once it is resolved: whether it succeeded.
    pub fn outcome(&self, ticket: u64) -> Option<bool> {
        let state = self.state.lock();
        state.is_resolved(ticket).then(|| !state.failed.contains(&ticket))
    }

    pub fn failed(&self, ticket: u64) -> bool {
        self.state.lock().failed.contains(&ticket)
    }

    /// Waits until `ticket` is resolved; whether it succeeded.
    pub async fn wait(&self, ticket: u64) -> bool {
        let mut watch = self.watch();
        let _ = watch.wait_for(|_| self.outcome(ticket).is_some()).await;
        !self.failed(ticket)
    }

    /// A ticket resolved once both `a` and `b` are, failed if either
    /// failed (0: nothing to wait for). A part is joined once.
    pub fn join(&self, a: u64, b: u64) -> u64 {
        if a == 0 || a == b {
            return b;
        }
        if b == 0 {
            return a;
        }
        let mut state = self.state.lock();
        state.issued += 1;
        let joint = state.issued;
        let mut left = 0;
        for part in [a, b] {
            if !state.is_resolved(part) {
                state.part_of.insert(part, joint);
                left += 1;
            } else if state.failed.contains(&part) {
                state.failed.insert(joint);
            }
        }
        if left > 0 {
            state.outstanding.insert(joint, Instant::now());
            state.parts_left.insert(joint, left);
        }
        joint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ticket_resolves_on_its_own() {
        let tickets = Tickets::default();
        let (a, b, c) = (tickets.issue(), tickets.issue(), tickets.issue());
        tickets.resolve(b, false);
        assert!(tickets.outcome(b).is_some() && tickets.failed(b), "b does not wait for a");
        assert!(tickets.outcome(a).is_none() && tickets.outcome(c).is_none());
        tickets.resolve(a, true);
        assert!(tickets.outcome(a).is_some() && !tickets.failed(a));
        let (d, e) = (tickets.issue(), tickets.issue());
        tickets.resolve_all(&[e, c], true);
        assert!(tickets.outcome(c).is_some() && tickets.outcome(e).is_some() && tickets.outcome(d).is_none());
        tickets.resolve(d, false);
        assert!(tickets.failed(d) && !tickets.failed(e));
        assert!(tickets.outcome(0).is_some(), "nothing to wait for");
        assert!(tickets.outcome(99).is_none(), "a ticket not issued yet");
    }

    #[test]
    fn a_joint_ticket_waits_for_both_parts_and_fails_with_either() {
        let tickets = Tickets::default();
        let (a, b) = (tickets.issue(), tickets.issue());
        let joint = tickets.join(a, b);
        tickets.resolve(b, true);
        assert!(tickets.outcome(joint).is_none(), "a is still out");
        tickets.resolve(a, false);
        assert!(tickets.outcome(joint).is_some() && tickets.failed(joint), "the earlier part's failure is seen");
        let (c, d) = (tickets.issue(), tickets.issue());
        tickets.resolve(c, true);
        let joint = tickets.join(c, d);
        tickets.resolve(d, true);
        assert!(tickets.outcome(joint).is_some() && !tickets.failed(joint));
        let e = tickets.issue();
        tickets.resolve(e, false);
        let f = tickets.issue();
        tickets.resolve(f, true);
        let joint = tickets.join(e, f);
        assert!(tickets.outcome(joint).is_some() && tickets.failed(joint), "both parts resolved before the join");
        assert_eq!(tickets.join(0, f), f);
        assert_eq!(tickets.join(f, 0), f);
    }

    #[test]
    fn the_mark_waits_for_the_oldest_ticket_until_it_straggles() {
        let tickets = Tickets::default();
        let (a, b, c) = (tickets.issue(), tickets.issue(), tickets.issue());
        tickets.resolve_all(&[b, c], true);
        assert_eq!(tickets.mark(), 0, "a is still out");
        tickets.age(Instant::now());
        assert_eq!(tickets.mark(), 0, "a is not a straggler yet");
        let mut watch = tickets.watch();
        watch.mark_unchanged();
        tickets.age(Instant::now() + STRAGGLER_AFTER);
        assert_eq!(tickets.mark(), c, "a straggler no longer holds b and c back");
        assert!(watch.has_changed().unwrap_or(false));
        assert_eq!(tickets.outcome(a), None, "below the mark, and still unresolved");
        watch.mark_unchanged();
        tickets.resolve(a, false);
        assert!(watch.has_changed().unwrap_or(false), "its waiters hear it resolve");
        assert_eq!(tickets.outcome(a), Some(false));
        let d = tickets.issue();
        tickets.resolve(d, true);
        assert_eq!(tickets.mark(), d);
    }

    #[tokio::test]
    async fn waiting_for_a_ticket_ends_when_it_resolves() {
        let tickets = std::sync::Arc::new(Tickets::default());
        let (a, b) = (tickets.issue(), tickets.issue());
        tickets.resolve(a, true);
        assert!(tickets.wait(a).await, "a resolved ticket is not waited for");
        let waiting = {
            let tickets = tickets.clone();
            tokio::spawn(async move { tickets.wait(b).await })
        };
        tokio::task::yield_now().await;
        tickets.resolve(b, false);
        assert_eq!(waiting.await.ok(), Some(false));
    }
}
