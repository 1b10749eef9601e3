//! Publisher confirms of one channel, in publish order: a publish is acked
//! at once unless the store holds it (then once its log entry is durable),
//! and nacked when a queue or the store refused it. Acks never overtake an
//! earlier publish that still waits.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use warren_codec::encode;

use super::Connection;
use crate::broker::Counters;

/// What a publish's confirm waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pending {
    /// An ack once the log is durable up to `index` and the quorum queues'
    /// commands of `ticket` are committed (0: nothing to wait for).
    Stored { index: u64, ticket: u64 },
    /// A nack: a queue at its limit (reject-publish) or the store refused it.
    Refused,
}

/// Where the work handed over stands (`store::tickets`): a ticket's
/// outcome once it is resolved (`Some(false)`: failed), `None` before.
pub(super) type Replicated<'a> = &'a dyn Fn(u64) -> Option<bool>;

/// A confirm to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Confirm {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64 },
}

#[derive(Default)]
pub(super) struct Confirms {
    /// `confirm.select` was received.
    pub(super) enabled: bool,
    published: u64,
    confirmed: u64,
    /// Publishes whose confirm is not a plain ack, by sequence number.
    waiting: VecDeque<(u64, Pending)>,
    /// The publish being timed for the confirm-latency histogram: one at a
    /// time per channel, so a clock read per confirm round, not per publish.
    sample: Option<(u64, Instant)>,
    /// The last sample's publish-to-confirm time, until taken.
    sampled: Option<Duration>,
}

impl Confirms {
    /// Counts a publish; its sequence number when confirms are on.
    pub(super) fn publish(&mut self) -> Option<u64> {
        self.enabled.then(|| {
            self.published += 1;
            if self.sample.is_none() {
                self.sample = Some((self.published, Instant::now()));
            }
            self.published
        })
    }

    /// The publish-to-confirm time of the last timed publish, once.
    pub(super) fn take_sample(&mut self) -> Option<Duration> {
        self.sampled.take()
    }

    /// The publish `seq` is confirmed only after `pending`.
    pub(super) fn wait(&mut self, seq: u64, pending: Pending) {
        debug_assert!(self.waiting.back().is_none_or(|&(last, _)| last < seq));
        self.waiting.push_back((seq, pending));
    }

    /// Publishes confirmed (acked or nacked) so far.
    pub(super) fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// Publishes not confirmed yet.
    pub(super) fn pending(&self) -> u64 {
        self.published - self.confirmed
    }

    pub(super) fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Emits what can be confirmed with the log durable up to `durable`
    /// (a poisoned store refuses everything still waiting): acks coalesced
    /// into `multiple` runs, a nack for each refused publish, in order.
    pub(super) fn release(
        &mut self,
        durable: u64,
        poisoned: bool,
        replicated: Replicated,
        mut emit: impl FnMut(Confirm),
    ) {
        if poisoned {
            for entry in self.waiting.iter_mut() {
                entry.1 = Pending::Refused;
            }
        }
        // Only the first publishes waiting are looked at: confirms go out
        // in order, so a later outcome matters once those before it are in.
        let outcome = |p: Pending| match p {
            Pending::Refused => Some(false),
            Pending::Stored { index, .. } if index > durable => None,
            Pending::Stored { ticket, .. } => replicated(ticket),
        };
        loop {
            while self.waiting.front().is_some_and(|&(_, p)| outcome(p) == Some(true)) {
                self.waiting.pop_front();
            }
            let confirmable = self.waiting.front().map_or(self.published, |&(seq, _)| seq - 1);
            if confirmable > self.confirmed {
                emit(Confirm::Ack { tag: confirmable, multiple: confirmable - self.confirmed > 1 });
                self.confirmed = confirmable;
            }
            match self.waiting.front() {
                Some(&(seq, p)) if seq == self.confirmed + 1 && outcome(p) == Some(false) => {
                    self.waiting.pop_front();
                    emit(Confirm::Nack { tag: seq });
                    self.confirmed = seq;
                }
                _ => break,
            }
        }
        if let Some((seq, at)) = self.sample {
            if seq <= self.confirmed {
                self.sample = None;
                self.sampled = Some(at.elapsed());
            }
        }
    }
}

impl Connection {
    pub(super) fn awaiting_store(&self) -> bool {
        self.channels.values().any(|ch| ch.confirms.is_waiting())
    }

    /// Sends what every channel can confirm now.
    pub(super) fn flush_confirms(&mut self) {
        let durable = self.store.durable_index();
        let poisoned = self.store.is_poisoned();
        let tickets = &self.broker.tickets;
        // Tickets above the mark wait for it, resolved or not (`store::tickets`).
        let mark = tickets.mark();
        // Ticket 0 (a classic queue's publish) waits for nothing: no lock.
        let replicated: Replicated = &|ticket| match ticket {
            0 => Some(true),
            _ if ticket > mark => None,
            _ => tickets.outcome(ticket),
        };
        let mut acked = 0;
        for (&number, ch) in self.channels.iter_mut().filter(|(_, ch)| ch.confirms.enabled && !ch.closing) {
            let before = ch.confirms.confirmed();
            let mut nacked = 0;
            ch.confirms.release(durable, poisoned, replicated, |confirm| match confirm {
                Confirm::Ack { tag, multiple } => {
                    self.outbox.write(|buf| encode::basic_ack(buf, number, tag, multiple))
                }
                Confirm::Nack { tag } => {
                    nacked += 1;
                    self.outbox.write(|buf| encode::basic_nack(buf, number, tag, false, false))
                }
            });
            let done = ch.confirms.confirmed() - before;
            self.outbox.sub_unconfirmed(done);
            acked += done - nacked;
            if let Some(elapsed) = ch.confirms.take_sample() {
                self.broker.counters.confirm_latency.observe(elapsed);
            }
        }
        if acked > 0 {
            Counters::add(&self.broker.counters.confirmed, acked);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirms() -> Confirms {
        Confirms { enabled: true, ..Confirms::default() }
    }

    fn release(confirms: &mut Confirms, durable: u64, poisoned: bool) -> Vec<Confirm> {
        let mut out = Vec::new();
        confirms.release(durable, poisoned, &|_| Some(true), |c| out.push(c));
        out
    }

    #[test]
    fn tickets_release_in_publish_order_whatever_order_they_resolve_in() {
        let mut c = confirms();
        for ticket in [1, 2, 3] {
            let seq = c.publish().unwrap_or_default();
            c.wait(seq, Pending::Stored { index: 0, ticket });
        }
        let mut out = Vec::new();
        // 2 and 3 resolved (3 failed), 1 not yet: nothing goes out.
        let outcome = |resolved: &'static [(u64, bool)]| {
            move |ticket: u64| resolved.iter().find(|(t, _)| *t == ticket).map(|&(_, ok)| ok)
        };
        c.release(0, false, &outcome(&[(2, true), (3, false)]), |confirm| out.push(confirm));
        assert_eq!(out, vec![]);
        c.release(0, false, &outcome(&[(1, true), (2, true), (3, false)]), |confirm| out.push(confirm));
        assert_eq!(out, vec![Confirm::Ack { tag: 2, multiple: true }, Confirm::Nack { tag: 3 }]);
        assert!(!c.is_waiting());
    }

    #[test]
    fn publishes_nothing_waits_for_are_acked_at_once_in_one_multiple_ack() {
        let mut c = confirms();
        for _ in 0..3 {
            c.publish();
        }
        assert_eq!(release(&mut c, 0, false), vec![Confirm::Ack { tag: 3, multiple: true }]);
        c.publish();
        assert_eq!(release(&mut c, 0, false), vec![Confirm::Ack { tag: 4, multiple: false }]);
        assert_eq!(release(&mut c, 0, false), vec![]);
    }

    #[test]
    fn a_stored_publish_holds_back_every_later_ack_until_durable() {
        let mut c = confirms();
        let first = c.publish().unwrap_or_default();
        c.wait(first, Pending::Stored { index: 10, ticket: 0 });
        c.publish();
        let third = c.publish().unwrap_or_default();
        c.wait(third, Pending::Stored { index: 5, ticket: 0 });
        assert_eq!(release(&mut c, 5, false), vec![], "publish 1 is not durable yet");
        assert!(c.is_waiting());
        assert_eq!(release(&mut c, 10, false), vec![Confirm::Ack { tag: 3, multiple: true }]);
        assert!(!c.is_waiting());
    }

    #[test]
    fn a_refused_publish_is_nacked_between_the_acks_around_it() {
        let mut c = confirms();
        c.publish();
        let refused = c.publish().unwrap_or_default();
        c.wait(refused, Pending::Refused);
        c.publish();
        c.publish();
        assert_eq!(
            release(&mut c, 0, false),
            vec![
                Confirm::Ack { tag: 1, multiple: false },
                Confirm::Nack { tag: 2 },
                Confirm::Ack { tag: 4, multiple: true }
            ]
        );
    }

    #[test]
    fn a_poisoned_store_nacks_everything_still_waiting() {
        let mut c = confirms();
        for _ in 0..2 {
            let seq = c.publish().unwrap_or_default();
            c.wait(seq, Pending::Stored { index: 7, ticket: 0 });
        }
        c.publish();
        assert_eq!(
            release(&mut c, 3, true),
            vec![Confirm::Nack { tag: 1 }, Confirm::Nack { tag: 2 }, Confirm::Ack { tag: 3, multiple: false }]
        );
    }

    #[test]
    fn one_publish_at_a_time_is_timed_until_its_confirm() {
        let mut c = confirms();
        let first = c.publish().unwrap_or_default();
        c.wait(first, Pending::Stored { index: 3, ticket: 0 });
        c.publish();
        assert_eq!(release(&mut c, 2, false), vec![]);
        assert_eq!(c.take_sample(), None, "not confirmed yet");
        release(&mut c, 3, false);
        assert!(c.take_sample().is_some());
        assert_eq!(c.take_sample(), None, "taken once");
        c.publish();
        release(&mut c, 3, false);
        assert!(c.take_sample().is_some(), "the next round is timed again");
    }

    #[test]
    fn without_confirm_select_publishes_are_not_counted() {
        let mut c = Confirms::default();
        assert_eq!(c.publish(), None);
        assert_eq!(release(&mut c, 0, false), vec![]);
    }
}
