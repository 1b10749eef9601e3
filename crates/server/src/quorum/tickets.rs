//! What a publisher confirm of a replicated queue waits for. Each session
//! flush that hands commands to Raft groups takes a ticket; the ticket is
//! resolved once every one of its commands is committed (or one failed).
//! Connections watch one number, the ticket below which all are resolved,
//! as they watch the local log's durable index.

use std::collections::BTreeSet;

use parking_lot::Mutex;
use tokio::sync::watch;

/// Failed tickets are remembered this far below the resolved mark (a
/// connection reads its outcome soon after the mark passes it).
const FAILED_KEPT: u64 = 1 << 20;

#[derive(Default)]
struct State {
    issued: u64,
    outstanding: BTreeSet<u64>,
    failed: BTreeSet<u64>,
}

pub struct Tickets {
    state: Mutex<State>,
    resolved: watch::Sender<u64>,
}

impl Default for Tickets {
    fn default() -> Self {
        Tickets { state: Mutex::default(), resolved: watch::Sender::new(0) }
    }
}

impl Tickets {
    pub fn issue(&self) -> u64 {
        let mut state = self.state.lock();
        state.issued += 1;
        let ticket = state.issued;
        state.outstanding.insert(ticket);
        ticket
    }

    pub fn resolve(&self, ticket: u64, ok: bool) {
        self.resolve_all(&[ticket], ok);
    }

    /// Resolves several tickets under one lock, with one wake-up of the
    /// connections watching.
    pub fn resolve_all(&self, tickets: &[u64], ok: bool) {
        if tickets.is_empty() {
            return;
        }
        let mark = {
            let mut state = self.state.lock();
            for ticket in tickets {
                state.outstanding.remove(ticket);
                if !ok {
                    state.failed.insert(*ticket);
                }
            }
            let mark = state.outstanding.first().map_or(state.issued, |first| first - 1);
            let forget = mark.saturating_sub(FAILED_KEPT);
            while state.failed.first().is_some_and(|&f| f < forget) {
                state.failed.pop_first();
            }
            mark
        };
        self.resolved.send_if_modified(|current| {
            let moved = *current < mark;
            *current = (*current).max(mark);
            moved
        });
    }

    /// Every ticket up to this one is resolved.
    pub fn resolved(&self) -> u64 {
        *self.resolved.borrow()
    }

    pub fn failed(&self, ticket: u64) -> bool {
        self.state.lock().failed.contains(&ticket)
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.resolved.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_passes_a_ticket_only_when_all_before_it_are_resolved() {
        let tickets = Tickets::default();
        let (a, b, c) = (tickets.issue(), tickets.issue(), tickets.issue());
        tickets.resolve(b, false);
        assert_eq!(tickets.resolved(), 0, "a is still out");
        tickets.resolve(a, true);
        assert_eq!(tickets.resolved(), b);
        assert!(tickets.failed(b) && !tickets.failed(a));
        tickets.resolve(c, true);
        assert_eq!(tickets.resolved(), c);
        let (d, e, f) = (tickets.issue(), tickets.issue(), tickets.issue());
        tickets.resolve_all(&[f, d], true);
        assert_eq!(tickets.resolved(), d, "e is still out");
        tickets.resolve_all(&[e], false);
        assert_eq!(tickets.resolved(), f);
        assert!(tickets.failed(e) && !tickets.failed(f));
    }
}
