//! Publishing: exchanges route a message to queues (and exchanges), delayed
//! exchanges schedule it, queues take it or refuse it (length limits,
//! deduplication), Direct Reply-To delivers it.

use super::*;

/// One routing key's walk through the exchanges: what it routes, the
/// headers decoded once if some exchange needs them, the exchanges already
/// visited (cycles end there) and the queues reached.
pub(super) struct Walk<'a, 'w> {
    key: &'w [u8],
    message: &'w Message,
    headers: &'w mut Option<Option<FieldTable>>,
    visited: Vec<&'a str>,
    queues: &'w mut Vec<QueueId>,
}

/// A message's deduplication key: its `x-deduplication-header` header (a
/// string or bytes; other values by their text), else its `message_id`.
pub fn dedup_key(message: &Message) -> Option<Vec<u8>> {
    let properties = message.properties_view();
    if let Some(headers) = properties.headers() {
        if let Some(value) = warren_codec::table::get(&headers, "x-deduplication-header") {
            return Some(match value {
                warren_codec::types::AMQPValue::ByteArray(bytes) => bytes.as_slice().to_vec(),
                other => match warren_codec::table::as_str(other) {
                    Some(text) => text.as_bytes().to_vec(),
                    None => warren_codec::table::as_i64(other)
                        .map_or_else(|| format!("{other:?}"), |n| n.to_string())
                        .into_bytes(),
                },
            });
        }
    }
    properties.message_id().map(|id| id.as_bytes().to_vec())
}

/// The `x-delay` header of a message, in milliseconds.
pub(super) fn delay_of(message: &Message) -> Option<u64> {
    let headers = message.properties_view().headers()?;
    let value = warren_codec::table::get(&headers, "x-delay")?;
    let delay = warren_codec::table::as_i64(value)
        .or_else(|| warren_codec::table::as_str(value).and_then(|s| s.trim().parse().ok()))?;
    Some(delay.max(0) as u64)
}

/// When a scheduled message is due: its arrival plus its delay.
pub(super) fn due_of(message: &Message) -> u64 {
    message.arrived().saturating_add(delay_of(message).unwrap_or(0))
}

impl VirtualHostState {
    /// The Direct Reply-To address of a channel's reply consumer, for
    /// rewriting `reply_to`.
    pub fn reply_to_address(&self, key: ChannelKey) -> Option<String> {
        let channel = self.channels.get(&key)?;
        let (token, _) = channel.reply_consumer.as_ref()?;
        Some(format!("{REPLY_TO_PREFIX}{token}"))
    }
    /// Checks that a publish to `exchange` is allowed (exists, not internal).
    pub fn check_publish(&self, exchange: &str) -> Result<(), AmqpError> {
        if exchange.is_empty() {
            return Ok(());
        }
        match self.exchanges.get(exchange) {
            None => Err(self.not_found_exchange(exchange)),
            Some(x) if x.internal => Err(soft(
                ReplyCode::AccessRefused,
                format!("cannot publish to internal exchange '{exchange}' in vhost '{}'", self.name),
            )),
            Some(_) => Ok(()),
        }
    }
    /// Routes a message and enqueues it. `extra_keys` are CC/BCC routing
    /// keys.
    pub fn publish(
        &mut self,
        exchange: &str,
        message: Arc<Message>,
        extra_keys: &[Vec<u8>],
    ) -> Result<Routed, AmqpError> {
        self.check_publish(exchange)?;
        if let Some(routed) = self.schedule(exchange, &message) {
            return Ok(routed);
        }
        let mut queues = std::mem::take(&mut self.scratch_queues);
        queues.clear();
        let direct = self.route_message(exchange, &message, extra_keys, &mut queues);
        let rejected = self.enqueue_all(&queues, &message);
        let routed = Routed { queues: queues.len() + direct, rejected };
        self.stats.publish += 1;
        self.stats.unroutable += u64::from(routed.queues == 0);
        self.scratch_queues = queues;
        self.process_dead_letters();
        Ok(routed)
    }
    /// Holds a message published to a delayed-message exchange with a
    /// positive `x-delay` header until it is due; `None` to route it now.
    /// A held message counts as routed: it is not returned as unroutable
    /// (the plugin returns it, since no queue is known yet).
    pub(super) fn schedule(&mut self, exchange: &str, message: &Arc<Message>) -> Option<Routed> {
        if self.delayed_exchanges == 0 {
            return None;
        }
        let x = self.exchanges.get_mut(exchange)?;
        let delayed = x.delayed.as_mut()?;
        let delay = delay_of(message).filter(|delay| *delay > 0)?;
        message.set_arrived(self.clock.now_ms());
        let due = message.arrived().saturating_add(delay);
        let stored = x.durable && message.persistent;
        if stored {
            self.journal
                .push(JournalEvent::Published { message: message.clone(), queues: vec![delayed.store_name.clone()] });
        }
        delayed.scheduler.schedule(due, message.clone(), stored);
        if !self.delaying.contains(exchange) {
            self.delaying.insert(exchange.into());
        }
        Some(Routed { queues: 1, rejected: false })
    }
    /// The queues a message goes to (sorted, no duplicates); Direct Reply-To
    /// deliveries are made on the way and counted in the result.
    pub(super) fn route_message(
        &mut self,
        exchange: &str,
        message: &Arc<Message>,
        extra_keys: &[Vec<u8>],
        queues: &mut Vec<QueueId>,
    ) -> usize {
        let mut destinations = std::mem::take(&mut self.scratch_destinations);
        let mut delivered_direct = 0;
        let mut headers: Option<Option<FieldTable>> = None;
        for key in std::iter::once(message.routing_key()).chain(extra_keys.iter().map(Vec::as_slice)) {
            if exchange.is_empty() {
                if let Ok(key) = std::str::from_utf8(key) {
                    if let Some(token) = key.strip_prefix(REPLY_TO_PREFIX) {
                        delivered_direct += usize::from(self.deliver_reply(token, message));
                    } else if let Some(&id) = self.queue_ids.get(key) {
                        queues.push(id);
                    }
                }
                continue;
            }
            let mut walk = Walk { key, message, headers: &mut headers, visited: Vec::new(), queues: &mut *queues };
            self.route_exchange(exchange, &mut walk, &mut destinations);
        }
        queues.sort_unstable();
        queues.dedup();
        self.scratch_destinations = destinations;
        delivered_direct
    }
    /// Enqueues a routed message in each queue and journals it for the
    /// durable ones; true if a queue refused it.
    pub(super) fn enqueue_all(&mut self, queues: &[QueueId], message: &Arc<Message>) -> bool {
        let mut durable: Vec<Arc<str>> = Vec::new();
        let mut rejected = false;
        for &id in queues {
            // A replicated queue's message carries the key its group knows
            // it by: it gets a copy of its own when other queues share it,
            // and every message counts (a quorum queue keeps them all).
            let replicated = self.queues.get(&id).is_some_and(|q| q.replicated);
            let own;
            let message = if replicated && queues.len() > 1 {
                own = Arc::new(message.duplicate());
                &own
            } else {
                message
            };
            let enqueued = self.enqueue(id, message);
            if let (Enqueued::Accepted { .. }, Some(queue)) = (&enqueued, self.queues.get_mut(&id)) {
                queue.stats.publish += 1;
            }
            match enqueued {
                Enqueued::Accepted { .. } if replicated => {
                    if let Some(queue) = self.queues.get(&id) {
                        let queues = vec![queue.name.clone()];
                        self.journal.push(JournalEvent::Published { message: message.clone(), queues });
                    }
                }
                Enqueued::Accepted { durable: true } => {
                    if let Some(queue) = self.queues.get(&id) {
                        durable.push(queue.name.clone());
                    }
                }
                Enqueued::Accepted { durable: false }
                | Enqueued::Dropped
                | Enqueued::Duplicate
                | Enqueued::Streamed => {}
                Enqueued::Rejected => rejected = true,
            }
        }
        if !durable.is_empty() {
            self.journal.push(JournalEvent::Published { message: message.clone(), queues: durable });
        }
        rejected
    }
    /// Puts a message in one queue, applying its TTL and length limit.
    pub(super) fn enqueue(&mut self, id: QueueId, message: &Arc<Message>) -> Enqueued {
        let Some(queue) = self.queues.get_mut(&id) else {
            return Enqueued::Dropped;
        };
        if queue.stream.is_some() {
            return self.append_to_stream(id, message);
        }
        if queue.remote {
            // Journaled by `enqueue_all`; its leader's queue decides.
            queue.stats.publish += 1;
            return Enqueued::Accepted { durable: true };
        }
        // The key is remembered only once the message is accepted, so a
        // publish refused by a length limit can be retried.
        let mut dedup_key_now = None;
        if queue.settings.dedup.is_some() {
            if let Some(key) = dedup_key(message) {
                let now = self.clock.now_ms();
                if queue.dedup.contains(&key, now) {
                    return Enqueued::Duplicate;
                }
                dedup_key_now = Some((key, now));
            }
        }
        if queue.settings.has_ttl() || message.expiration().is_some() {
            message.set_arrived(self.clock.now_ms());
            if !self.timed.contains(&id) {
                self.timed.insert(id);
            }
        }
        let settings = &queue.settings;
        let limited = settings.max_length.is_some() || settings.max_length_bytes.is_some();
        if limited && settings.overflow != Overflow::DropHead {
            let full = settings.max_length.is_some_and(|max| queue.len() as u64 >= max)
                || settings.max_length_bytes.is_some_and(|max| queue.bytes() + message.body_len() as u64 > max);
            if full {
                if settings.overflow == Overflow::RejectPublishDlx {
                    // Never in the queue: nothing to settle.
                    self.dead_letters.push_back(DeadLetter::new(queue, message.clone(), Reason::Maxlen, false));
                }
                return Enqueued::Rejected;
            }
        }
        queue.push(message.clone());
        if let (Some((key, now)), Some(dedup)) = (dedup_key_now, queue.settings.dedup) {
            queue.dedup.remember(Arc::from(key.as_slice()), now.saturating_add(dedup.window_ms), dedup.max_keys);
        }
        let mut dropped_itself = false;
        if limited && queue.settings.overflow == Overflow::DropHead {
            let (max_length, max_bytes) = (queue.settings.max_length, queue.settings.max_length_bytes);
            let mut heads = Vec::new();
            while max_length.is_some_and(|max| queue.len() as u64 > max)
                || max_bytes.is_some_and(|max| queue.bytes() > max)
            {
                let Some(head) = queue.pop(self.loader.as_deref()) else { break };
                dropped_itself |= Arc::ptr_eq(&head.message, message);
                heads.push(head);
            }
            for head in heads {
                self.dead_letter(id, head, Reason::Maxlen);
            }
            self.settle_unreadable(id);
        }
        let Some(queue) = self.queues.get_mut(&id) else {
            return Enqueued::Dropped;
        };
        if dropped_itself {
            return Enqueued::Dropped;
        }
        // Past the head window, bodies go to disk: stored ones are already
        // in the log, the others to the spill. Two per publish keep pace;
        // what is left (log entries not yet written) is paged by `page_due`.
        if queue.len() > queue.window() {
            if let Some(loader) = &self.loader {
                queue.page_out(loader.as_ref(), 2);
                if !queue.paging_due && queue.needs_paging() {
                    queue.paging_due = true;
                    self.paging_due.push(id);
                }
            }
        }
        if queue.consumers.is_empty() {
            // No one was waiting: from now on its TTL counts.
            queue.mark_offered();
        } else if !self.dirty.contains(&id) {
            self.dirty.push(id);
        }
        Enqueued::Accepted { durable: message.persistent && queue.durable }
    }
    /// Routes through exchange `name` and on through the exchanges it is
    /// bound to (and its alternate exchange when nothing took the message),
    /// each exchange once.
    pub(super) fn route_exchange<'a>(
        &'a self,
        name: &'a str,
        walk: &mut Walk<'a, '_>,
        destinations: &mut Vec<Destination>,
    ) {
        if walk.visited.contains(&name) {
            return;
        }
        walk.visited.push(name);
        let Some(exchange) = self.exchanges.get(name) else {
            return;
        };
        let before = walk.queues.len();
        let start = destinations.len();
        let message = walk.message;
        let headers_ref = if exchange.needs_headers() {
            walk.headers.get_or_insert_with(|| message.properties_view().headers()).as_ref()
        } else {
            None
        };
        exchange.route(walk.key, headers_ref, destinations);
        let mut index = start;
        while index < destinations.len() {
            match &destinations[index] {
                Destination::Queue(id) => walk.queues.push(*id),
                Destination::Exchange(next) => {
                    let next = next.clone();
                    if let Some((next_name, _)) = self.exchanges.get_key_value(&*next) {
                        let mut nested = Vec::new();
                        self.route_exchange(next_name, walk, &mut nested);
                    }
                }
            }
            index += 1;
        }
        destinations.truncate(start);
        if walk.queues.len() == before {
            if let Some(alternate) = &exchange.alternate_exchange {
                if let Some((alternate_name, _)) = self.exchanges.get_key_value(&**alternate) {
                    self.route_exchange(alternate_name, walk, destinations);
                }
            }
        }
    }
    pub(super) fn deliver_reply(&mut self, token: &str, message: &Message) -> bool {
        let Some((key, tag)) = self.reply_tokens.get(token).cloned() else {
            return false;
        };
        let Some(channel) = self.channels.get_mut(&key) else {
            return false;
        };
        let delivery_tag = channel.next_tag();
        channel.outbox.deliver(key.channel, &tag, delivery_tag, false, message);
        true
    }
}
