//! Quorum queues led from this node. The queue runs here as any other
//! (dispatch, TTL, limits, dead-lettering are the same code), but what it
//! journals goes to its Raft group rather than the local store: the
//! server sends a replicated queue's events to the group by queue name.
//! Where leadership moves, the queue leaves this virtual host without a
//! word to the journal, and the new leader's node rebuilds it from its
//! replica of the group's state.
//!
//! A stand-in's consumers are served by the leader: each is subscribed
//! there (`Relay::Consume`), the leader's deliveries are handed to it here
//! (`deliver_relayed`) under this channel's delivery tags, and what the
//! client settles goes back to the leader (`Relay::Settle`). The core only
//! records these; the server carries them between the nodes.

use super::*;

/// A classic queue other nodes of a cluster may reach, as they must
/// declare its stand-ins.
#[derive(Clone, Debug)]
pub struct SharedQueue {
    pub durable: bool,
    pub auto_delete: bool,
    /// Its stand-ins refuse every connection but take publishes.
    pub exclusive: bool,
    pub arguments: FieldTable,
}

/// The connection a stand-in of an exclusive queue is exclusive to: none
/// of this node's.
pub const ELSEWHERE: ConnectionId = u64::MAX;

/// The consumer id under which a `basic.get` through a stand-in holds
/// its delivery (consumers are numbered from 1).
pub const GOT: u64 = 0;

/// A classic queue of this node's (not a stream, a quorum queue or a
/// stand-in).
fn shareable(queue: &Queue) -> bool {
    !queue.replicated && queue.stream.is_none()
}

/// What a stand-in's consumer asks of the queue's leader.
#[derive(Clone, Debug)]
pub enum Relay {
    /// Deliver to this consumer from the leader's queue.
    Consume(RelayedConsumer),
    /// The consumer was cancelled (or its channel closed).
    Cancel { consumer: u64 },
    /// The client settled a delivery the leader made under its tag
    /// `upstream`.
    Settle { consumer: u64, upstream: u64, outcome: Outcome },
}

/// A consumer of a stand-in, as the leader's queue is to know it.
#[derive(Clone, Debug)]
pub struct RelayedConsumer {
    pub key: ChannelKey,
    pub tag: Arc<str>,
    /// Unique in this virtual host (a tag can be used again).
    pub id: u64,
    pub no_ack: bool,
    pub exclusive: bool,
    pub priority: i64,
    pub prefetch: u16,
    /// Its client has had `consume-ok` (the queue was led from here).
    pub established: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    Requeue,
    /// Rejected without requeue: the leader dead-letters it (or retries).
    Reject,
}

impl VirtualHostState {
    /// Declares a quorum queue (a durable queue whose declaration is not
    /// journaled: the cluster's metadata holds it), led from this node or,
    /// `remote`, from another one.
    pub fn declare_replicated(&mut self, name: &str, arguments: FieldTable, remote: bool) -> Result<(), AmqpError> {
        let queue = SharedQueue { durable: true, auto_delete: false, exclusive: false, arguments };
        self.declare_shared(name, queue, remote)
    }

    /// Declares a stand-in for a classic queue that lives on another node:
    /// it answers declarations as that queue does (`durable`,
    /// `auto_delete`; an exclusive one refuses every connection here, as
    /// the queue refuses connections but its own), holds no message, never
    /// deletes itself, and its publishes and consumers go to that node as
    /// a quorum queue's go to its leader.
    pub fn declare_stand_in(&mut self, name: &str, queue: SharedQueue) -> Result<(), AmqpError> {
        self.declare_shared(name, queue, true)
    }

    fn declare_shared(&mut self, name: &str, queue: SharedQueue, remote: bool) -> Result<(), AmqpError> {
        let journaled = self.journal.len();
        let SharedQueue { durable, auto_delete, exclusive, arguments } = queue;
        let declare =
            QueueDeclare { durable, auto_delete, exclusive, ..QueueDeclare::named(name).with_arguments(arguments) };
        self.declaring_shared = true;
        let declared = self.declare_queue(if exclusive { ELSEWHERE } else { 0 }, declare);
        self.declaring_shared = false;
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

    /// Messages published through another node into classic queue `name`
    /// here (its home): enqueued as a publish routed to it alone would be,
    /// journaled if persistent and the queue durable. False if the queue
    /// refused it (`reject-publish`) or is not a classic queue here.
    pub fn accept_forwarded(&mut self, name: &str, message: Arc<Message>) -> bool {
        let Some(id) = self.queue_ids.get(name).copied() else { return false };
        if !self.queues.get(&id).is_some_and(shareable) {
            return false;
        }
        let rejected = self.enqueue_all(&[id], &message);
        self.process_dead_letters();
        !rejected
    }

    /// A classic queue here that other nodes of a cluster may reach (not a
    /// stream, not a quorum queue or a stand-in).
    pub fn shareable(&self, name: &str) -> Option<SharedQueue> {
        let queue = self.queue_ids.get(name).and_then(|id| self.queues.get(id))?;
        shareable(queue).then(|| SharedQueue {
            durable: queue.durable,
            auto_delete: queue.auto_delete,
            exclusive: queue.exclusive_owner.is_some(),
            arguments: queue.arguments.clone(),
        })
    }

    /// The names of the queues [`Self::shareable`] answers for.
    pub fn shareable_names(&self) -> Vec<Arc<str>> {
        self.queues.values().filter(|q| shareable(q)).map(|q| q.name.clone()).collect()
    }

    /// Refuses `basic.get` on a queue that lives on (or is led from)
    /// another node.
    pub(super) fn check_local(&self, id: QueueId) -> Result<(), AmqpError> {
        match self.queues.get(&id) {
            Some(queue) if queue.remote && queue.settings.queue_type == crate::settings::QueueType::Quorum => {
                Err(precondition(format!(
                    "quorum queue '{}' in vhost '{}' is led from another node: basic.get works there only (consume instead, which works through any node)",
                    queue.name, self.name
                )))
            }
            Some(queue) if queue.remote => Err(precondition(format!(
                "queue '{}' in vhost '{}' is on another node: basic.get works there only (consume instead, which works through any node)",
                queue.name, self.name
            ))),
            _ => Ok(()),
        }
    }

    /// A delivery the queue's leader made to `consumer` of a stand-in:
    /// sent to the client under this channel's next delivery tag, and
    /// unacknowledged here until the client settles it (then the leader
    /// hears of it under `upstream`, its own tag). False if the consumer
    /// is gone.
    pub fn deliver_relayed(
        &mut self,
        consumer: &RelayedConsumer,
        upstream: u64,
        redelivered: bool,
        message: Arc<Message>,
    ) -> bool {
        let Some(id) = self.relayed_queue(consumer) else { return false };
        let (key, tag) = (consumer.key, consumer.tag.clone());
        let Some(channel) = self.channels.get_mut(&key) else { return false };
        let delivery_tag = channel.next_tag();
        channel.outbox.deliver(key.channel, &tag, delivery_tag, redelivered, &message);
        let Some(state) = channel.consumers.get_mut(&tag) else { return false };
        let Some(queue) = self.queues.get_mut(&id) else { return false };
        queue.stats.delivered(state.no_ack, redelivered);
        self.stats.delivered(state.no_ack, redelivered);
        if !state.no_ack {
            state.unacked += 1;
            channel.unacked_bytes += message.body_len() as u64;
            queue.unacked += 1;
            channel.unacked.push_back(Unacked {
                delivery_tag,
                queue: id,
                seq: upstream,
                message,
                consumer: Some((tag, consumer.id)),
                delivered_at: self.coarse_now,
            });
        }
        true
    }

    /// A message the home node of classic queue `name` handed to a
    /// `basic.get` through its stand-in here: sent under this channel's
    /// next delivery tag and, unless `no_ack`, unacknowledged here until
    /// the client settles it (then the home node hears of it under
    /// `upstream`, its own tag). `None` if the channel or the stand-in is
    /// gone.
    pub fn deliver_got(
        &mut self,
        key: ChannelKey,
        name: &str,
        (upstream, redelivered, no_ack): (u64, bool, bool),
        message: Arc<Message>,
        message_count: u32,
    ) -> Option<GetResult> {
        let id = self.queue_ids.get(name).copied().filter(|id| self.is_remote_id(*id))?;
        let channel = self.channels.get_mut(&key)?;
        let queue = self.queues.get_mut(&id)?;
        let delivery_tag = channel.next_tag();
        queue.stats.got(no_ack, redelivered);
        self.stats.got(no_ack, redelivered);
        if !no_ack {
            queue.unacked += 1;
            channel.unacked_bytes += message.body_len() as u64;
            channel.unacked.push_back(Unacked {
                delivery_tag,
                queue: id,
                seq: upstream,
                message: message.clone(),
                consumer: Some((Arc::from(""), GOT)),
                delivered_at: self.coarse_now,
            });
        }
        Some(GetResult { delivery_tag, redelivered, message, message_count })
    }

    /// The stand-in `consumer` reads, while it is still there.
    fn relayed_queue(&self, consumer: &RelayedConsumer) -> Option<QueueId> {
        let state = self.channels.get(&consumer.key)?.consumers.get(&consumer.tag)?;
        (state.id == consumer.id && self.is_remote_id(state.queue)).then_some(state.queue)
    }

    /// Whether the client of `consumer` (of a stand-in) has more unsent
    /// bytes than it should: the leader's next deliveries wait.
    pub fn relayed_congested(&self, consumer: &RelayedConsumer) -> bool {
        self.relayed_queue(consumer).is_some()
            && self.channels.get(&consumer.key).is_some_and(|channel| channel.outbox.is_congested())
    }

    /// The leader closed `consumer`'s delivery channel (a delivery
    /// acknowledgement timed out): its channel here closes as well.
    pub fn fail_relayed(&mut self, consumer: &RelayedConsumer, text: &str) {
        if self.relayed_queue(consumer).is_none() {
            return;
        }
        if let Some(channel) = self.channels.get_mut(&consumer.key) {
            channel.outbox.fail_channel(consumer.key.channel, text);
            channel.failing = true;
        }
    }

    /// The client of the consumer `tag` (of a stand-in) has its
    /// `consume-ok`: deliveries from this node may go to it.
    pub fn consumer_answered(&mut self, key: ChannelKey, tag: &str) {
        let Some(consumer) = self.channels.get_mut(&key).and_then(|c| c.consumers.get_mut(tag)) else { return };
        consumer.answered = true;
        let queue = consumer.queue;
        self.mark_dirty(queue);
    }

    /// The leader refused `consumer` when it was subscribed again (a
    /// new leader): it is cancelled, and its client told so.
    pub fn cancel_relayed(&mut self, consumer: &RelayedConsumer) {
        let Some(queue) = self.relayed_queue(consumer) else { return };
        let Some(channel) = self.channels.get_mut(&consumer.key) else { return };
        channel.consumers.remove(&consumer.tag);
        self.cancel_notices.push((channel.outbox.clone(), consumer.key.channel, consumer.tag.clone()));
        self.detach_consumer(queue, consumer.key, &consumer.tag);
    }

    /// Takes back the deliveries of queue `name` not yet settled (those to
    /// consumer `consumer` only, if given): their queue's leader changed,
    /// and the new one delivers them again. The client may still settle
    /// their tags; that is accepted and does nothing.
    pub fn take_back(&mut self, name: &str, consumer: Option<u64>) {
        let Some(id) = self.queue_ids.get(name).copied() else { return };
        let mut taken = 0;
        for channel in self.channels.values_mut() {
            if !channel.unacked.iter().any(|u| u.queue == id) {
                continue;
            }
            let (gone, kept): (VecDeque<Unacked>, VecDeque<Unacked>) =
                std::mem::take(&mut channel.unacked).into_iter().partition(|u| {
                    u.queue == id && consumer.is_none_or(|c| u.consumer.as_ref().is_some_and(|(_, i)| *i == c))
                });
            channel.unacked = kept;
            for unacked in gone {
                channel.unacked_bytes = channel.unacked_bytes.saturating_sub(unacked.message.body_len() as u64);
                channel.timed_out.insert(unacked.delivery_tag);
                if let Some((tag, owner)) = &unacked.consumer {
                    if let Some(state) = channel.consumers.get_mut(tag).filter(|s| s.id == *owner) {
                        state.unacked = state.unacked.saturating_sub(1);
                    }
                }
                taken += 1;
            }
        }
        if let Some(queue) = self.queues.get_mut(&id) {
            queue.unacked = queue.unacked.saturating_sub(taken);
        }
        self.mark_dirty(id);
    }

    /// This node now leads the queue it stood in for: its consumers stay
    /// and are served from here once the queue is filled from the replica.
    pub fn promote_replicated(&mut self, name: &str) {
        self.take_back(name, None);
        if let Some(queue) = self.queue_ids.get(name).and_then(|id| self.queues.get_mut(id)) {
            queue.remote = false;
        }
    }

    /// This node no longer leads the queue: it becomes a stand-in, empty
    /// (the group keeps every message, and its next leader delivers again
    /// what was delivered from here and not settled), whose consumers and
    /// bindings stay; each consumer is subscribed at the next leader.
    /// `serving` are the channels that served other nodes' consumers from
    /// it: they close (those consumers subscribe at the next leader from
    /// their own nodes).
    pub fn demote_replicated(&mut self, name: &str, serving: &[ChannelKey]) {
        let Some(id) = self.queue_ids.get(name).copied() else { return };
        if !self.queues.get(&id).is_some_and(|q| q.replicated && !q.remote) {
            return;
        }
        let journaled = self.journal.len();
        self.take_back(name, None);
        let loader = self.loader.as_deref();
        let Some(queue) = self.queues.get_mut(&id) else { return };
        queue.purge(loader, |_| {});
        queue.clear_retrying();
        queue.returns.clear();
        queue.remote = true;
        queue.own_loader = None;
        self.timed.remove(&id);
        for key in serving {
            self.close_channel(*key);
        }
        self.journal.truncate(journaled);
        let Some(queue) = self.queues.get(&id) else { return };
        let consumers: Vec<(ChannelKey, Arc<str>, i64, bool)> =
            queue.consumers.iter().map(|c| (c.channel, c.tag.clone(), c.priority, c.exclusive)).collect();
        let queue_name = queue.name.clone();
        for (key, tag, priority, exclusive) in consumers {
            let Some(state) = self.channels.get(&key).and_then(|c| c.consumers.get(&tag)) else { continue };
            let relayed = RelayedConsumer {
                key,
                tag,
                id: state.id,
                no_ack: state.no_ack,
                exclusive,
                priority,
                prefetch: state.prefetch_count,
                established: true,
            };
            self.journal.push(JournalEvent::Relay { queue: queue_name.clone(), relay: Relay::Consume(relayed) });
        }
    }

    /// A consumer of stand-in `queue` settled a relayed delivery.
    pub(super) fn relay_settle(&mut self, unacked: &Unacked, outcome: Outcome) {
        let Some(queue) = self.queues.get(&unacked.queue) else { return };
        let Some((_, consumer)) = &unacked.consumer else { return };
        let relay = Relay::Settle { consumer: *consumer, upstream: unacked.seq, outcome };
        self.journal.push(JournalEvent::Relay { queue: queue.name.clone(), relay });
    }

    /// A consumer of a stand-in went: the leader's queue is to stop
    /// delivering to it.
    pub(super) fn relay_cancel(&mut self, id: QueueId, consumer: u64) {
        let Some(queue) = self.queues.get(&id).filter(|q| q.remote) else { return };
        self.journal.push(JournalEvent::Relay { queue: queue.name.clone(), relay: Relay::Cancel { consumer } });
    }

    pub(super) fn is_remote_id(&self, id: QueueId) -> bool {
        self.queues.get(&id).is_some_and(|q| q.remote)
    }

    /// Whether bindings to queue `name` from a durable exchange are
    /// journaled (it is durable and not exclusive).
    pub fn is_stored_queue(&self, name: &str) -> bool {
        let id = self.queue_ids.get(name).copied();
        id.is_some_and(|id| self.stored_destination(&Destination::Queue(id)).is_some())
    }

    /// Whether `name` stands in for an exclusive queue of another node
    /// (every connection here is refused it).
    pub fn is_exclusive_elsewhere(&self, name: &str) -> bool {
        let queue = self.queue_ids.get(name).and_then(|id| self.queues.get(id));
        queue.is_some_and(|q| q.remote && q.exclusive_owner == Some(ELSEWHERE))
    }

    /// Whether `name` is a stand-in for a quorum queue led from another node.
    pub fn is_remote(&self, name: &str) -> bool {
        self.queue_ids.get(name).and_then(|id| self.queues.get(id)).is_some_and(|q| q.remote)
    }

    /// Whether `name` is a quorum queue led from here.
    pub fn is_replicated(&self, name: &str) -> bool {
        self.queue_ids.get(name).and_then(|id| self.queues.get(id)).is_some_and(|q| q.replicated)
    }

    /// Fills a quorum queue taken up here from its replica with its
    /// messages paged out: (key, body size, priority, returns) each, in
    /// order; bodies are read back through `loader` (from the group's log)
    /// as consumers need them. Marked redelivered, as recovered messages
    /// are (a previous leader may have delivered them).
    pub fn restore_replicated_paged(
        &mut self,
        name: &str,
        loader: Arc<dyn crate::MessageLoader>,
        messages: impl IntoIterator<Item = (u64, u64, u8, u64)>,
    ) {
        let Some(id) = self.queue_ids.get(name).copied() else { return };
        let now = self.clock.now_ms();
        let Some(queue) = self.queues.get_mut(&id) else { return };
        queue.own_loader = Some(crate::queue::OwnLoader(loader));
        for (key, size, priority, returns) in messages {
            let seq = queue.push_stored(key, size, priority);
            if returns > 0 {
                queue.returns.insert(seq, returns);
            }
        }
        queue.last_used = now;
        // Their own expirations are not known unread: the head is watched.
        if !queue.is_empty() && !self.timed.contains(&id) {
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
