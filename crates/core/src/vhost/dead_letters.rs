//! Dead-lettering: copies queued and routed in a loop, not recursively (a
//! dead letter can overflow another queue); the copy is journaled before the
//! original is settled.

use super::*;

impl VirtualHostState {
    /// Queues a message that left queue `id` for good to be dead-lettered
    /// (or just settled when the queue has no dead-letter exchange).
    pub(super) fn dead_letter(&mut self, id: QueueId, entry: QueuedMessage, reason: Reason) {
        let Some(queue) = self.queues.get_mut(&id) else {
            return;
        };
        if !queue.returns.is_empty() {
            queue.returns.remove(&entry.seq);
        }
        let settle = queue.durable && entry.message.stored_index() != 0;
        self.dead_letters.push_back(DeadLetter::new(queue, entry.message, reason, settle));
    }
    /// Routes queued dead letters to their exchanges. The copy is journaled
    /// before the original is settled, so a crash in between duplicates a
    /// message rather than losing it. Dead letters caused by enqueueing a
    /// dead letter (a full target queue) are handled in the same loop, not
    /// recursively.
    pub(super) fn process_dead_letters(&mut self) {
        if self.dead_lettering {
            return;
        }
        self.dead_lettering = true;
        while let Some(dead) = self.dead_letters.pop_front() {
            if let Some(exchange) = dead.exchange.as_deref() {
                if exchange.is_empty() || self.exchanges.contains_key(exchange) {
                    let target =
                        dead_letter::Target { queue: &dead.source, exchange, routing_key: dead.routing_key.as_deref() };
                    let (copy, keys) =
                        dead_letter::copy(&dead.message, dead.reason, &target, self.clock.now_ms() / 1000);
                    // The original's entry stays live until it is settled
                    // below, after the copy is journaled: the copy may
                    // refer to its body instead of writing it again.
                    // (Not a replicated queue's: its body is in its group's
                    // log, which the local store cannot refer to.)
                    let replicated = self.queue_ids.get(&*dead.source).and_then(|id| self.queues.get(id));
                    if dead.settle && !replicated.is_some_and(|q| q.replicated) {
                        copy.share_stored_body(&dead.message);
                    }
                    let copy = Arc::new(copy);
                    let mut queues = Vec::new();
                    self.route_message(exchange, &copy, keys.get(1..).unwrap_or_default(), &mut queues);
                    if dead.reason != Reason::Rejected {
                        queues.retain(|id| match self.queues.get(id) {
                            Some(q) if dead_letter::cycles(&copy, &q.name) => {
                                tracing::warn!(queue = %q.name, "dead-letter cycle detected: message dropped");
                                false
                            }
                            _ => true,
                        });
                    }
                    self.enqueue_all(&queues, &copy);
                } else {
                    tracing::debug!(exchange, queue = %dead.source, "dead-letter exchange missing: message dropped");
                }
            }
            let stored = dead.message.stored_index();
            if dead.settle && stored != 0 {
                self.journal.push(JournalEvent::Settled { queue: dead.source, stored });
            }
        }
        self.dead_lettering = false;
    }
}
