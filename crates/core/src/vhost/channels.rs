//! The delivery side of channels: opening and closing them, prefetch
//! (`basic.qos`), flow, and settling deliveries (ack, nack, reject,
//! recover, requeue at the original position, return counting).

use super::*;

/// Deterministic noise in [-1, 1] for retry jitter (splitmix64 of the
/// message's sequence number and attempt).
pub(super) fn noise(seq: u64, attempt: u64) -> f64 {
    let mut z = seq ^ attempt.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

impl VirtualHostState {
    pub fn open_channel(&mut self, key: ChannelKey, outbox: Arc<dyn Outbox>) {
        self.channels.insert(
            key,
            ChannelState {
                outbox,
                next_delivery_tag: 0,
                unacked: VecDeque::new(),
                unacked_bytes: 0,
                consumers: HashMap::new(),
                prefetch_count: 0,
                prefetch_size: 0,
                consumer_prefetch: 0,
                flow_active: true,
                reply_consumer: None,
                timed_out: BTreeSet::new(),
                failing: false,
                confirm: false,
                transactional: false,
            },
        );
    }
    /// Closes a channel: its consumers go away and its unacked messages
    /// return to their queues, marked redelivered.
    pub fn close_channel(&mut self, key: ChannelKey) {
        let Some(channel) = self.channels.remove(&key) else {
            return;
        };
        if let Some((token, _)) = &channel.reply_consumer {
            self.reply_tokens.remove(token);
        }
        for unacked in channel.unacked.into_iter().rev() {
            if let Some(queue) = self.queues.get_mut(&unacked.queue) {
                queue.unacked = queue.unacked.saturating_sub(1);
            }
            self.requeue(unacked);
        }
        for (tag, consumer) in channel.consumers {
            self.relay_cancel(consumer.queue, consumer.id);
            self.detach_consumer(consumer.queue, key, &tag);
        }
        self.run_dispatch();
    }
    /// Closes every channel of a connection and deletes its exclusive queues.
    pub fn close_connection(&mut self, connection: ConnectionId) {
        let keys: Vec<ChannelKey> = self.channels.keys().filter(|k| k.connection == connection).copied().collect();
        for key in keys {
            self.close_channel(key);
        }
        let exclusive: Vec<QueueId> =
            self.queues.values().filter(|q| q.exclusive_owner == Some(connection)).map(|q| q.id).collect();
        for id in exclusive {
            self.remove_queue(id);
        }
        self.send_notices();
    }
    /// Delivers again to a connection that was congested.
    pub fn resume_connection(&mut self, connection: ConnectionId) {
        let queues: Vec<QueueId> = self
            .channels
            .iter()
            .filter(|(k, _)| k.connection == connection)
            .flat_map(|(_, c)| c.consumers.values().map(|c| c.queue))
            .collect();
        for queue in queues {
            self.mark_dirty(queue);
        }
        self.run_dispatch();
    }
    /// The queues a channel's consumers read from may deliver again.
    pub(super) fn channel_queues_dirty(&mut self, key: ChannelKey) {
        let queues: Vec<QueueId> =
            self.channels.get(&key).map(|c| c.consumers.values().map(|c| c.queue).collect()).unwrap_or_default();
        for queue in queues {
            self.mark_dirty(queue);
        }
    }
    /// Records that the channel is in confirm or transactional mode, for
    /// operators' listings.
    pub fn set_channel_mode(&mut self, key: ChannelKey, confirm: bool, transactional: bool) {
        if let Some(channel) = self.channels.get_mut(&key) {
            channel.confirm = confirm;
            channel.transactional = transactional;
        }
    }

    pub fn qos(&mut self, key: ChannelKey, prefetch_size: u32, prefetch_count: u16, global: bool) {
        if let Some(channel) = self.channels.get_mut(&key) {
            if global {
                channel.prefetch_count = prefetch_count;
            } else {
                channel.consumer_prefetch = prefetch_count;
            }
            channel.prefetch_size = prefetch_size;
        }
        self.channel_queues_dirty(key);
    }
    pub fn flow(&mut self, key: ChannelKey, active: bool) {
        if let Some(channel) = self.channels.get_mut(&key) {
            channel.flow_active = active;
        }
        self.channel_queues_dirty(key);
    }
    /// Takes the unacked entries an ack/nack/reject names (RabbitMQ's rules:
    /// `multiple` with tag 0 means all; otherwise the tag must be outstanding).
    pub(super) fn take_unacked(
        &mut self,
        key: ChannelKey,
        delivery_tag: u64,
        multiple: bool,
    ) -> Result<Vec<Unacked>, AmqpError> {
        let Some(channel) = self.channels.get_mut(&key) else {
            return Ok(Vec::new());
        };
        let taken: Vec<Unacked> = if multiple && delivery_tag == 0 {
            channel.unacked.drain(..).collect()
        } else {
            let position = channel.unacked.binary_search_by_key(&delivery_tag, |u| u.delivery_tag);
            let timed_out = !channel.timed_out.is_empty() && channel.timed_out.remove(&delivery_tag);
            if multiple && !channel.timed_out.is_empty() {
                channel.timed_out.retain(|tag| *tag > delivery_tag);
            }
            match position {
                Ok(index) if multiple => channel.unacked.drain(..=index).collect(),
                Ok(index) => channel.unacked.remove(index).into_iter().collect(),
                // Settling a delivery taken back by the consumer timeout.
                Err(end) if timed_out && multiple => channel.unacked.drain(..end).collect(),
                Err(_) if timed_out => Vec::new(),
                Err(_) => return Err(precondition(format!("unknown delivery tag {delivery_tag}"))),
            }
        };
        let mut freed_queues = Vec::new();
        for unacked in &taken {
            channel.unacked_bytes = channel.unacked_bytes.saturating_sub(unacked.message.body_len() as u64);
            let owner =
                unacked.consumer.as_ref().and_then(|(tag, id)| channel.consumers.get_mut(tag).filter(|c| c.id == *id));
            if let Some(consumer) = owner {
                consumer.unacked = consumer.unacked.saturating_sub(1);
            }
        }
        if !taken.is_empty() {
            freed_queues.extend(channel.consumers.values().map(|c| c.queue));
        }
        for unacked in &taken {
            if let Some(queue) = self.queues.get_mut(&unacked.queue) {
                queue.unacked = queue.unacked.saturating_sub(1);
            }
        }
        for queue in freed_queues {
            self.mark_dirty(queue);
        }
        Ok(taken)
    }
    pub fn ack(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool) -> Result<(), AmqpError> {
        for unacked in self.take_unacked(key, delivery_tag, multiple)? {
            if let Some(queue) = self.queues.get_mut(&unacked.queue) {
                queue.stats.ack += 1;
            }
            self.stats.ack += 1;
            self.settled(&unacked);
        }
        Ok(())
    }
    /// `basic.nack` / `basic.reject`: requeue, or dead-letter (dropped when
    /// the queue has no dead-letter exchange).
    pub fn nack(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<(), AmqpError> {
        if let Some(stream) = self.settles_stream(key, delivery_tag, multiple) {
            return Err(self.not_for_streams("basic.nack and basic.reject", &stream));
        }
        let taken = self.take_unacked(key, delivery_tag, multiple)?;
        if requeue {
            for unacked in taken.into_iter().rev() {
                self.requeue(unacked);
            }
        } else {
            for unacked in taken {
                self.give_up(unacked, Reason::Rejected);
            }
            self.process_dead_letters();
        }
        Ok(())
    }
    /// `basic.recover`: every unacked message of the channel is requeued.
    /// Refused while the channel holds stream deliveries (RabbitMQ 3.10
    /// fails with an internal error there).
    pub fn recover(&mut self, key: ChannelKey) -> Result<(), AmqpError> {
        if let Some(stream) = self.settles_stream(key, 0, true) {
            return Err(self.not_for_streams("basic.recover", &stream));
        }
        if let Ok(taken) = self.take_unacked(key, 0, true) {
            for unacked in taken.into_iter().rev() {
                self.requeue(unacked);
            }
        }
        Ok(())
    }
    /// A delivery its consumer gave up on: rejected without requeue
    /// (`Rejected`) or not acknowledged in time (`Expired`). With `x-retry-*`
    /// it comes back after a growing delay (up to the delivery limit); else
    /// a rejected message is dead-lettered and a timed-out one requeued.
    pub(super) fn give_up(&mut self, unacked: Unacked, reason: Reason) {
        if self.is_remote_id(unacked.queue) {
            let outcome = if reason == Reason::Rejected { Outcome::Reject } else { Outcome::Requeue };
            self.relay_settle(&unacked, outcome);
            return;
        }
        let Some(retry) = self.queues.get(&unacked.queue).and_then(|q| q.settings.retry) else {
            match reason {
                Reason::Rejected => {
                    let entry = QueuedMessage { seq: unacked.seq, message: unacked.message, redelivered: true };
                    self.dead_letter(unacked.queue, entry, Reason::Rejected);
                }
                _ => self.requeue(unacked),
            }
            return;
        };
        let Some(unacked) = self.count_return(unacked) else { return };
        let now = self.clock.now_ms();
        let Some(queue) = self.queues.get_mut(&unacked.queue) else { return };
        let attempt = queue.returns.get(&unacked.seq).copied().unwrap_or(1);
        let delay = retry.delay_for(attempt, noise(unacked.seq, attempt));
        let due = now.saturating_add(delay);
        // The return just journaled (stored messages only) carries the due
        // time, so a restart keeps the message waiting.
        let stored = unacked.message.stored_index();
        if let Some(JournalEvent::Returned { stored: s, retry_at_ms, .. }) = self.journal.last_mut() {
            if *s == stored && stored != 0 {
                *retry_at_ms = Some(due);
            }
        }
        queue.retry_later(unacked.seq, unacked.message, due);
        self.timed.insert(unacked.queue);
    }
    /// Returns a delivered message to its queue, or dead-letters it once it
    /// came back more often than the queue's delivery limit allows.
    pub(super) fn requeue(&mut self, unacked: Unacked) {
        if self.is_remote_id(unacked.queue) {
            self.relay_settle(&unacked, Outcome::Requeue);
            return;
        }
        if self.queues.get(&unacked.queue).is_some_and(|q| q.stream.is_some()) {
            // A stream keeps every message: nothing goes back.
            return;
        }
        let Some(unacked) = self.count_return(unacked) else { return };
        if let Some(queue) = self.queues.get_mut(&unacked.queue) {
            queue.requeue(unacked.seq, unacked.message);
            self.mark_dirty(unacked.queue);
        }
    }
    /// Counts one more return of a delivered message, in queues that count
    /// them (`x-delivery-limit`, `x-retry-*`; journaled when stored). Over
    /// the delivery limit the message is dead-lettered and `None` returned;
    /// otherwise it is handed back for the caller to put somewhere.
    pub(super) fn count_return(&mut self, unacked: Unacked) -> Option<Unacked> {
        let queue = self.queues.get_mut(&unacked.queue)?;
        if queue.settings.delivery_limit.is_none() && queue.settings.retry.is_none() {
            return Some(unacked);
        }
        let returns = queue.returns.entry(unacked.seq).or_insert(0);
        *returns += 1;
        let returns = *returns;
        let stored = unacked.message.stored_index();
        if queue.durable && stored != 0 {
            self.journal.push(JournalEvent::Returned { queue: queue.name.clone(), stored, returns, retry_at_ms: None });
        }
        if queue.settings.delivery_limit.is_some_and(|limit| returns > limit) {
            let entry = QueuedMessage { seq: unacked.seq, message: unacked.message, redelivered: true };
            self.dead_letter(unacked.queue, entry, Reason::DeliveryLimit);
            self.process_dead_letters();
            return None;
        }
        Some(unacked)
    }
    pub fn channel_unacked(&self, key: ChannelKey) -> usize {
        self.channels.get(&key).map_or(0, |c| c.unacked.len())
    }
}
