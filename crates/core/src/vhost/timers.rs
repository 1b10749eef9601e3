//! Work driven by the clock: message and queue expiry, delayed messages
//! coming due, consumer timeouts. Each call does a bounded amount of work.

use super::routing::{delay_of, due_of};
use super::*;

impl VirtualHostState {
    /// True while some queue has a TTL, an expiry or expiring messages:
    /// [`VirtualHostState::tick`] then has work.
    pub fn has_timers(&self) -> bool {
        !self.timed.is_empty() || !self.delaying.is_empty()
    }
    /// Expires messages whose deadline passed (wherever they are in their
    /// queue) and queues unused for longer than `x-expires`. Call it often
    /// (every 10 ms): it does a bounded amount of work each time.
    pub fn tick(&mut self) {
        let now = self.clock.now_ms();
        self.coarse_now = now;
        let ids: Vec<QueueId> = self.timed.iter().copied().collect();
        let mut expired = Vec::new();
        for id in ids {
            let Some(queue) = self.queues.get_mut(&id) else {
                self.timed.remove(&id);
                continue;
            };
            // A stand-in expires with its queue, on the queue's node.
            if let (Some(expires), false) = (queue.settings.expires_ms, queue.remote) {
                if queue.consumers.is_empty() && now.saturating_sub(queue.last_used) >= expires {
                    tracing::debug!(queue = %queue.name, "queue expired");
                    self.remove_queue(id);
                    continue;
                }
            }
            expired.clear();
            // A quorum queue taken over holds its messages paged, their own
            // expirations unknown until read: its head is looked at, as
            // RabbitMQ's quorum queues expire messages at the head.
            let paged_head = queue.own_loader.is_some() && !queue.is_empty();
            if queue.settings.has_ttl() || paged_head {
                let need_body =
                    queue.settings.dead_letter_exchange.is_some() || queue.settings.max_length_bytes.is_some();
                let mut taken = 0;
                while taken < EXPIRE_PER_TICK {
                    taken += 1;
                    match queue.pop_expired_head(now, self.loader.as_deref(), need_body) {
                        Some(Ok(message)) => expired.push(message),
                        Some(Err(stored)) if queue.durable => {
                            self.journal.push(JournalEvent::Settled { queue: queue.name.clone(), stored })
                        }
                        Some(Err(_)) => {}
                        None => break,
                    }
                }
            }
            queue.pop_expired_anywhere(now, self.loader.as_deref(), &mut expired);
            queue.dedup.expire(now);
            if queue.release_retries(now) > 0 && !queue.consumers.is_empty() && !self.dirty.contains(&id) {
                self.dirty.push(id);
            }
            if !queue.settings.is_timed()
                && !paged_head
                && queue.next_expiry().is_none()
                && queue.retrying().next().is_none()
            {
                self.timed.remove(&id);
            }
            for message in expired.drain(..) {
                self.dead_letter(id, message, Reason::Expired);
            }
            self.settle_unreadable(id);
        }
        self.process_dead_letters();
        self.release_delayed(now);
    }
    /// Takes back deliveries unacknowledged for longer than their queue's
    /// consumer timeout: they return to their queue (or wait for a retry)
    /// with their delivery count raised, and the channel stays open; a late
    /// ack of one is ignored. Call it periodically (every 100 ms).
    pub fn check_consumer_timeouts(&mut self) {
        let now = self.clock.now_ms();
        self.coarse_now = now;
        let shortest = match (self.default_consumer_timeout, self.shortest_consumer_timeout) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(timeout) => timeout,
                None => return,
            },
        };
        let mut expired: Vec<(ChannelKey, u64)> = Vec::new();
        for (key, channel) in self.channels.iter_mut().filter(|(_, c)| !c.failing) {
            // Oldest first: stop at the first delivery younger than the
            // shortest timeout.
            for unacked in channel.unacked.iter().take_while(|u| u.delivered_at.saturating_add(shortest) <= now) {
                let timeout = self
                    .queues
                    .get(&unacked.queue)
                    .and_then(|q| q.settings.consumer_timeout(self.default_consumer_timeout));
                if let Some(timeout) = timeout.filter(|t| unacked.delivered_at.saturating_add(*t) <= now) {
                    if self.timeout_closes_channel {
                        // RabbitMQ's wording; the connection closes the
                        // channel, which requeues its deliveries.
                        let text = format!(
                            "delivery acknowledgement on channel {} timed out. Timeout value used: {timeout} ms. This timeout value can be configured, see consumers doc guide to learn more",
                            key.channel
                        );
                        channel.outbox.fail_channel(key.channel, &text);
                        channel.failing = true;
                        break;
                    }
                    expired.push((*key, unacked.delivery_tag));
                }
            }
        }
        for (key, delivery_tag) in expired {
            let Ok(taken) = self.take_unacked(key, delivery_tag, false) else { continue };
            if let Some(channel) = self.channels.get_mut(&key) {
                channel.timed_out.insert(delivery_tag);
            }
            for unacked in taken {
                tracing::info!(
                    connection = key.connection,
                    channel = key.channel,
                    delivery_tag,
                    "delivery not acknowledged in time: taken back"
                );
                self.give_up(unacked, Reason::Expired);
            }
        }
        self.run_dispatch();
    }
    /// Routes scheduled messages that are due (at most `DELAYED_PER_TICK`
    /// per exchange per tick).
    pub(super) fn release_delayed(&mut self, now: u64) {
        const DELAYED_PER_TICK: usize = 10_000;
        let names: Vec<Box<str>> = self.delaying.iter().cloned().collect();
        let readable = self.loader.as_ref().map_or(0, |l| l.readable_upto());
        let (mut due, mut unreadable) = (Vec::new(), Vec::new());
        for name in names {
            let Some(exchange) = self.exchanges.get_mut(&name) else {
                self.delaying.remove(&name);
                continue;
            };
            let durable = exchange.durable;
            let Some(delayed) = exchange.delayed.as_mut() else {
                self.delaying.remove(&name);
                continue;
            };
            delayed.scheduler.settle_staging(readable, self.loader.as_deref(), due_of);
            due.clear();
            delayed.scheduler.pop_due(now, DELAYED_PER_TICK, self.loader.as_deref(), &mut due, &mut unreadable);
            if delayed.scheduler.is_empty() {
                self.delaying.remove(&name);
            }
            let store_name = delayed.store_name.clone();
            for stored in unreadable.drain(..) {
                self.journal.push(JournalEvent::Settled { queue: store_name.clone(), stored });
            }
            for message in due.drain(..) {
                // Routed as a new message; its scheduled copy is settled
                // after the routed one is journaled.
                let scheduled = message.stored_index();
                // It may refer to the scheduled copy's body: that copy is
                // settled only after it is journaled.
                let body_at = (durable && scheduled != 0).then(|| message.body_root());
                // As the plugin: the released message carries `x-delay`
                // negated, so publishing it to a delayed exchange again does
                // not delay it twice.
                let message = Arc::new(dead_letter::with_header(
                    &message,
                    "x-delay",
                    warren_codec::types::AMQPValue::LongInt(
                        -i32::try_from(delay_of(&message).unwrap_or(0)).unwrap_or(i32::MAX),
                    ),
                ));
                if let Some(body_at) = body_at {
                    message.set_body_at(body_at);
                }
                let mut queues = Vec::new();
                let cc = dead_letter::cc_keys(&message);
                self.route_message(&name, &message, &cc, &mut queues);
                self.enqueue_all(&queues, &message);
                if durable && scheduled != 0 {
                    self.journal.push(JournalEvent::Settled { queue: store_name.clone(), stored: scheduled });
                }
            }
        }
        self.process_dead_letters();
    }
}
