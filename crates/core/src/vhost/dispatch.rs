//! Consumers and dispatch: which consumer gets the next message of a queue
//! (priorities, round-robin, single active consumer, prefetch), `basic.get`,
//! cancels and their notices.

use super::*;

/// The consumer the next message of `queue` goes to: round-robin among the
/// highest-priority consumers that can take it, lower priorities only when
/// all higher ones are full; with a single active consumer, only the first
/// registered one.
pub(super) fn pick_consumer(
    queue: &mut Queue,
    channels: &HashMap<ChannelKey, ChannelState>,
    size: usize,
) -> Option<usize> {
    let can_take = |consumer: &QueueConsumer| {
        channels.get(&consumer.channel).is_some_and(|channel| channel.can_deliver(&consumer.tag, size))
    };
    if queue.settings.single_active_consumer {
        return queue.consumers.first().filter(|c| can_take(c)).map(|_| 0);
    }
    let count = queue.consumers.len();
    let mut start = 0;
    while start < count {
        let priority = queue.consumers[start].priority;
        let group = queue.consumers[start..].iter().take_while(|c| c.priority == priority).count();
        for k in 0..group {
            let index = start + (queue.cursor + k) % group;
            if can_take(&queue.consumers[index]) {
                queue.cursor = index - start + 1;
                return Some(index);
            }
        }
        start += group;
    }
    None
}

impl VirtualHostState {
    pub fn consume(&mut self, key: ChannelKey, consume: Consume<'_>) -> Result<String, AmqpError> {
        let Consume { queue, consumer_tag, no_ack, exclusive, arguments } = consume;
        let tag: Arc<str> =
            if consumer_tag.is_empty() { crate::names::generate("amq.ctag-").into() } else { consumer_tag.into() };
        let channel = self.channels.get(&key).ok_or_else(|| soft(ReplyCode::ChannelError, "channel is not open"))?;
        if channel.consumers.contains_key(&tag) || channel.reply_consumer.as_ref().is_some_and(|(_, t)| *t == tag) {
            return Err(AmqpError::hard(ReplyCode::NotAllowed, format!("attempt to reuse consumer tag '{tag}'"), 0, 0));
        }
        if queue == REPLY_TO_QUEUE {
            if !no_ack {
                return Err(precondition("reply consumer cannot acknowledge"));
            }
            if channel.reply_consumer.is_some() {
                return Err(precondition("reply consumer already set"));
            }
            let token: Box<str> = crate::names::generate("").into();
            self.reply_tokens.insert(token.clone(), (key, tag.clone()));
            if let Some(channel) = self.channels.get_mut(&key) {
                channel.reply_consumer = Some((token, tag.clone()));
            }
            return Ok(tag.to_string());
        }
        let id = self.queue_id(key.connection, queue)?;
        let stream = match self.queues.get(&id).is_some_and(|q| q.stream.is_some()) {
            true => {
                let client_tag = (!consumer_tag.is_empty()).then_some(&*tag);
                Some(Box::new(self.stream_cursor(id, key, client_tag, no_ack, &arguments)?))
            }
            false => {
                if warren_codec::table::get(&arguments, crate::stream::OFFSET_HEADER).is_some() {
                    let queue_type = self.queues.get(&id).map(|q| q.settings.queue_type).unwrap_or_default();
                    return Err(self.type_refusal(queue, queue_type, TypeRefusal::Argument("x-stream-offset")));
                }
                None
            }
        };
        let global_qos = self.channels.get(&key).is_some_and(|c| c.prefetch_count > 0);
        if global_qos && self.queues.get(&id).is_some_and(|q| q.settings.queue_type == QueueType::Quorum) {
            return Err(AmqpError::hard(
                ReplyCode::NotImplemented,
                format!("queue '{queue}' in vhost '{}' does not support global qos", self.name),
                0,
                0,
            ));
        }
        let priority = match warren_codec::table::get(&arguments, "x-priority") {
            None => 0,
            Some(value) => warren_codec::table::as_i64(value).ok_or_else(|| {
                precondition(format!(
                    "invalid arg 'x-priority' for queue '{queue}' in vhost '{}': {{unacceptable_type,{}}}",
                    self.name,
                    value_type(value)
                ))
            })?,
        };
        let vhost = &self.name;
        let Some(q) = self.queues.get_mut(&id) else {
            return Err(self.not_found_queue(queue));
        };
        if q.consumers.iter().any(|c| c.exclusive) || (exclusive && !q.consumers.is_empty()) {
            return Err(soft(ReplyCode::AccessRefused, format!("queue '{queue}' in vhost '{vhost}' in exclusive use")));
        }
        // Sorted by priority, highest first; registration order within one.
        let position = q.consumers.partition_point(|c| c.priority >= priority);
        q.consumers.insert(position, QueueConsumer { channel: key, tag: tag.clone(), exclusive, priority, stream });
        q.had_consumer = true;
        q.last_used = self.clock.now_ms();
        let consumer_id = self.next_consumer_id;
        self.next_consumer_id += 1;
        let remote = q.remote.then(|| q.name.clone());
        if let Some(channel) = self.channels.get_mut(&key) {
            let prefetch_count = channel.consumer_prefetch;
            let answered = remote.is_none();
            channel.consumers.insert(
                tag.clone(),
                ConsumerState { id: consumer_id, queue: id, no_ack, prefetch_count, unacked: 0, answered },
            );
            if let Some(queue) = remote {
                let relayed = RelayedConsumer {
                    key,
                    tag: tag.clone(),
                    id: consumer_id,
                    no_ack,
                    exclusive,
                    priority,
                    prefetch: prefetch_count,
                    established: false,
                };
                self.journal.push(JournalEvent::Relay { queue, relay: Relay::Consume(relayed) });
            }
        }
        self.mark_dirty(id);
        Ok(tag.to_string())
    }
    /// Cancels a consumer; returns whether it existed.
    pub fn cancel(&mut self, key: ChannelKey, consumer_tag: &str) -> bool {
        let Some(channel) = self.channels.get_mut(&key) else {
            return false;
        };
        if channel.reply_consumer.as_ref().is_some_and(|(_, t)| &**t == consumer_tag) {
            if let Some((token, _)) = channel.reply_consumer.take() {
                self.reply_tokens.remove(&token);
            }
            return true;
        }
        let Some(consumer) = channel.consumers.remove(consumer_tag) else {
            return false;
        };
        self.relay_cancel(consumer.queue, consumer.id);
        self.detach_consumer(consumer.queue, key, consumer_tag);
        true
    }
    pub(super) fn detach_consumer(&mut self, queue: QueueId, key: ChannelKey, tag: &str) {
        let Some(q) = self.queues.get_mut(&queue) else {
            return;
        };
        q.consumers.retain(|c| !(c.channel == key && &*c.tag == tag));
        q.last_used = self.clock.now_ms();
        // A stand-in is deleted with its queue, on the queue's node.
        if q.auto_delete && q.had_consumer && q.consumers.is_empty() && !q.remote {
            self.remove_queue(queue);
        }
    }
    /// Sends the notifications (consumer cancels) that the last method
    /// caused; the caller has already written that method's reply.
    pub fn send_notices(&mut self) {
        for (outbox, channel, tag) in self.cancel_notices.drain(..) {
            outbox.consumer_cancelled(channel, &tag);
        }
    }
    /// Sends pending notices, then delivers what can be delivered from
    /// every queue marked dirty.
    pub fn run_dispatch(&mut self) {
        self.send_notices();
        while let Some(id) = self.dirty.pop() {
            self.dispatch_queue(id);
        }
    }
    pub(super) fn dispatch_queue(&mut self, id: QueueId) {
        let Some(queue) = self.queues.get_mut(&id) else {
            return;
        };
        if queue.stream.is_some() {
            self.dispatch_stream(id);
            return;
        }
        let mut expired = Vec::new();
        let mut now = None;
        while let Some(size) = queue.front_size() {
            let Some(index) = pick_consumer(queue, &self.channels, size) else {
                break;
            };
            let consumer_channel = queue.consumers[index].channel;
            let Some(channel) = self.channels.get_mut(&consumer_channel) else {
                break;
            };
            let tag = queue.consumers[index].tag.clone();
            let Some(entry) = queue.pop(self.loader.as_deref()) else {
                break;
            };
            if (queue.settings.has_ttl() || entry.message.expiration().is_some()) && !queue.is_fresh(&entry) {
                let now = *now.get_or_insert_with(|| self.clock.now_ms());
                if entry.message.deadline(queue.settings.message_ttl_ms).is_some_and(|deadline| deadline < now) {
                    // Never delivered after its deadline, unless offered by
                    // the dispatch its own publish triggered.
                    expired.push(entry);
                    continue;
                }
            }
            let size = entry.message.body_len();
            let delivery_tag = channel.next_tag();
            match queue.settings.delivery_limit {
                // As quorum queues: the count is sent from the first delivery.
                Some(_) => {
                    let returns = queue.returns.get(&entry.seq).copied().unwrap_or(0);
                    let copy = dead_letter::with_delivery_count(&entry.message, returns);
                    channel.outbox.deliver(consumer_channel.channel, &tag, delivery_tag, entry.redelivered, &copy);
                }
                None => channel.outbox.deliver(
                    consumer_channel.channel,
                    &tag,
                    delivery_tag,
                    entry.redelivered,
                    &entry.message,
                ),
            }
            let Some(state) = channel.consumers.get_mut(&tag) else {
                continue;
            };
            queue.stats.delivered(state.no_ack, entry.redelivered);
            self.stats.delivered(state.no_ack, entry.redelivered);
            if state.no_ack {
                if entry.message.stored_index() != 0 && queue.durable {
                    let stored = entry.message.stored_index();
                    self.journal.push(JournalEvent::Settled { queue: queue.name.clone(), stored });
                }
            } else {
                state.unacked += 1;
                channel.unacked_bytes += size as u64;
                queue.unacked += 1;
                channel.unacked.push_back(Unacked {
                    delivery_tag,
                    queue: id,
                    seq: entry.seq,
                    message: entry.message,
                    consumer: Some((tag, state.id)),
                    delivered_at: self.coarse_now,
                });
            }
        }
        queue.mark_offered();
        for entry in expired {
            self.dead_letter(id, entry, Reason::Expired);
        }
        self.settle_unreadable(id);
        self.process_dead_letters();
    }
    /// Stored messages a queue could not read back are gone: settle them so
    /// the store can reclaim their space.
    pub(super) fn settle_unreadable(&mut self, id: QueueId) {
        let Some(queue) = self.queues.get_mut(&id) else {
            return;
        };
        for stored in queue.unreadable.drain(..) {
            self.journal.push(JournalEvent::Settled { queue: queue.name.clone(), stored });
        }
    }
    pub fn get(&mut self, key: ChannelKey, queue: &str, no_ack: bool) -> Result<Option<GetResult>, AmqpError> {
        let id = self.queue_id(key.connection, queue)?;
        self.check_local(id)?;
        if self.queues.get(&id).is_some_and(|q| q.stream.is_some()) {
            return Err(AmqpError::hard(
                ReplyCode::NotImplemented,
                format!("basic.get not supported by stream queues queue '{queue}' in vhost '{}'", self.name),
                0,
                0,
            ));
        }
        let Some(q) = self.queues.get_mut(&id) else {
            return Err(self.not_found_queue(queue));
        };
        if !self.channels.contains_key(&key) {
            return Err(soft(ReplyCode::ChannelError, "channel is not open"));
        }
        let now = self.clock.now_ms();
        q.last_used = now;
        let mut expired = Vec::new();
        let popped = loop {
            let Some(entry) = q.pop(self.loader.as_deref()) else {
                break None;
            };
            if entry.message.deadline(q.settings.message_ttl_ms).is_some_and(|deadline| deadline < now) {
                expired.push(entry);
                continue;
            }
            break Some(entry);
        };
        for stored in q.unreadable.drain(..) {
            self.journal.push(JournalEvent::Settled { queue: q.name.clone(), stored });
        }
        let delivered = match (&popped, q.settings.delivery_limit) {
            (Some(entry), Some(_)) => {
                let returns = q.returns.get(&entry.seq).copied().unwrap_or(0);
                Some(Arc::new(dead_letter::with_delivery_count(&entry.message, returns)))
            }
            _ => None,
        };
        let message_count = super::count_u32(q.len());
        if !expired.is_empty() {
            for entry in expired {
                self.dead_letter(id, entry, Reason::Expired);
            }
            self.process_dead_letters();
        }
        let Some(entry) = popped else {
            if let Some(q) = self.queues.get_mut(&id) {
                q.stats.get_empty += 1;
            }
            self.stats.get_empty += 1;
            return Ok(None);
        };
        let (Some(q), Some(channel)) = (self.queues.get_mut(&id), self.channels.get_mut(&key)) else {
            return Ok(None);
        };
        let delivery_tag = channel.next_tag();
        q.stats.got(no_ack, entry.redelivered);
        self.stats.got(no_ack, entry.redelivered);
        if no_ack {
            if entry.message.stored_index() != 0 && q.durable {
                let stored = entry.message.stored_index();
                self.journal.push(JournalEvent::Settled { queue: q.name.clone(), stored });
            }
        } else {
            q.unacked += 1;
            channel.unacked_bytes += entry.message.body_len() as u64;
            channel.unacked.push_back(Unacked {
                delivery_tag,
                queue: id,
                seq: entry.seq,
                message: entry.message.clone(),
                consumer: None,
                delivered_at: self.coarse_now,
            });
        }
        Ok(Some(GetResult {
            delivery_tag,
            redelivered: entry.redelivered,
            message: delivered.unwrap_or(entry.message),
            message_count,
        }))
    }
}
