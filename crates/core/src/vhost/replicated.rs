//! Quorum queues led from this node. The queue runs here as any other
//! (dispatch, TTL, limits, dead-lettering are the same code), but what it
//! journals goes to its Raft group rather than the local store: the
//! server sends a replicated queue's events to the group by queue name.
//! Where leadership moves, the queue leaves this virtual host without a
//! word to the journal, and the new leader's node rebuilds it from its
//! replica of the group's state.

use super::*;

impl VirtualHostState {
    /// Declares a quorum queue (a durable queue whose declaration is not
    /// journaled: the cluster's metadata holds it), led from this node or,
    /// `remote`, from another one.
    pub fn declare_replicated(&mut self, name: &str, arguments: FieldTable, remote: bool) -> Result<(), AmqpError> {
        let journaled = self.journal.len();
        let declared = self.declare_queue(0, QueueDeclare::named(name).durable().with_arguments(arguments));
        self.journal.truncate(journaled);
        declared?;
        let Some(queue) = self.queue_ids.get(name).and_then(|id| self.queues.get_mut(id)) else {
            return Err(self.not_found_queue(name));
        };
        queue.replicated = true;
        queue.remote = remote;
        Ok(())
    }

    /// A message its group committed that this node's queue did not take
    /// in itself (published through another node): it joins the queue as a
    /// publish would, under the key the group gave it. If the queue will
    /// not have it (a length limit), it is settled at once.
    pub fn accept_replicated(&mut self, name: &str, message: Arc<Message>) {
        let Some(id) = self.queue_ids.get(name).copied() else { return };
        if !self.queues.get(&id).is_some_and(|q| q.replicated && !q.remote) {
            return;
        }
        let stored = message.stored_index();
        let enqueued = self.enqueue(id, &message);
        if matches!(enqueued, Enqueued::Rejected | Enqueued::Dropped | Enqueued::Duplicate) {
            self.journal.push(JournalEvent::Settled { queue: name.into(), stored });
        }
        self.process_dead_letters();
    }

    /// Refuses what only the queue's leader can do (consume, get) on a
    /// quorum queue led from another node.
    pub(super) fn check_local(&self, id: QueueId) -> Result<(), AmqpError> {
        match self.queues.get(&id) {
            Some(queue) if queue.remote => Err(precondition(format!(
                "quorum queue '{}' in vhost '{}' is led from another node: consume from it there (consuming through another node is not supported yet)",
                queue.name, self.name
            ))),
            _ => Ok(()),
        }
    }

    /// Whether `name` is a stand-in for a quorum queue led from another node.
    pub fn is_remote(&self, name: &str) -> bool {
        self.queue_ids.get(name).and_then(|id| self.queues.get(id)).is_some_and(|q| q.remote)
    }

    /// Whether `name` is a quorum queue led from here.
    pub fn is_replicated(&self, name: &str) -> bool {
        self.queue_ids.get(name).and_then(|id| self.queues.get(id)).is_some_and(|q| q.replicated)
    }

    /// Fills a quorum queue just taken over with its group's messages, in
    /// their order, each with the returns counted so far.
    pub fn restore_replicated(&mut self, name: &str, messages: impl IntoIterator<Item = (Arc<Message>, u64)>) {
        let Some(id) = self.queue_ids.get(name).copied() else { return };
        let now = self.clock.now_ms();
        let Some(queue) = self.queues.get_mut(&id) else { return };
        let mut timed = false;
        for (message, returns) in messages {
            timed |= message.expiration().is_some();
            let seq = queue.push_recovered(message);
            if returns > 0 {
                queue.returns.insert(seq, returns);
            }
        }
        queue.last_used = now;
        if (timed || queue.settings.has_ttl()) && !self.timed.contains(&id) {
            self.timed.insert(id);
        }
        if !queue.consumers.is_empty() && !self.dirty.contains(&id) {
            self.dirty.push(id);
        }
    }

    /// Removes a quorum queue whose leadership went elsewhere (or a remote
    /// one's stand-in): consumers here are cancelled (with a notice), and
    /// nothing is journaled, so its group keeps every message; what was
    /// delivered from here and not yet settled is delivered again by the
    /// new leader.
    pub fn drop_replicated(&mut self, name: &str) {
        let Some(id) = self.queue_ids.get(name).copied() else { return };
        if !self.queues.get(&id).is_some_and(|q| q.replicated) {
            return;
        }
        let journaled = self.journal.len();
        self.remove_queue(id);
        self.journal.truncate(journaled);
    }
}
