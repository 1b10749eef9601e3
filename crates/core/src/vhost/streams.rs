//! Stream queues in a virtual host: numbering published messages into the
//! stream, where each consumer starts, and delivering to each consumer from
//! its own offset (from the in-memory tail, or read ahead from the store).
//! A consumer is served only up to the offset the store made durable, so an
//! offset a consumer saw never names another message after a crash.

use super::*;
use crate::stream::{OffsetSpec, StreamCursor, StreamFilter, StreamState, StreamStorage};
use warren_codec::table;
use warren_codec::types::AMQPValue;

impl VirtualHostState {
    /// Where streams' logs are kept; opens those of the streams already
    /// declared (restored definitions).
    pub fn set_streams(&mut self, storage: Arc<dyn StreamStorage>) {
        self.streams = Some(storage);
        let ids: Vec<QueueId> = self.queues.values().filter(|q| q.stream.is_some()).map(|q| q.id).collect();
        for id in ids {
            if let Err(error) = self.open_stream(id) {
                tracing::error!(queue = ?self.queues.get(&id).map(|q| q.name.clone()), %error, "stream cannot be opened");
            }
        }
    }

    /// Makes queue `id` a stream over its log in the store.
    pub(super) fn open_stream(&mut self, id: QueueId) -> Result<(), String> {
        let vhost = self.name.clone();
        let Some(queue) = self.queues.get_mut(&id) else { return Ok(()) };
        let settings = crate::settings::check_stream_arguments(&queue.arguments)
            .map_err(|(key, problem)| format!("{key}: {problem}"))?;
        let bounds = match &self.streams {
            Some(storage) => storage.open_stream(&vhost, &queue.name, &settings)?,
            None => Default::default(),
        };
        let mut state = StreamState::new(settings, bounds.next);
        state.durable = bounds.next;
        queue.stream = Some(Box::new(state));
        Ok(())
    }

    /// The store made a stream durable up to `durable` (exclusive): its
    /// consumers may get what is below.
    pub fn stream_durable(&mut self, queue: &str, durable: u64) {
        let Some(&id) = self.queue_ids.get(queue) else { return };
        let Some(stream) = self.queues.get_mut(&id).and_then(|q| q.stream.as_mut()) else { return };
        if durable > stream.durable {
            stream.durable = durable;
            stream.trim(durable);
            self.mark_dirty(id);
        }
    }

    /// Numbers a message into stream `id` and journals it; consecutive
    /// messages of one stream share one journal event (one chunk).
    pub(super) fn append_to_stream(&mut self, id: QueueId, message: &Arc<Message>) -> Enqueued {
        let now = self.coarse_now.max(1);
        let Some(queue) = self.queues.get_mut(&id) else { return Enqueued::Dropped };
        let Some(stream) = queue.stream.as_mut() else { return Enqueued::Dropped };
        let offset = stream.append(message);
        if stream.over_tail() {
            let durable = stream.durable;
            stream.trim(durable);
        }
        queue.stats.publish += 1;
        match self.journal.last_mut() {
            Some(JournalEvent::StreamAppended { queue: name, first, messages, .. })
                if *name == queue.name && *first + messages.len() as u64 == offset =>
            {
                messages.push(message.clone());
            }
            _ => self.journal.push(JournalEvent::StreamAppended {
                queue: queue.name.clone(),
                first: offset,
                timestamp: now,
                messages: vec![message.clone()],
            }),
        }
        Enqueued::Streamed
    }

    /// Where a new consumer of stream `id` starts, and its filter; checks
    /// what RabbitMQ refuses of a stream consumer.
    pub(super) fn stream_cursor(
        &self,
        id: QueueId,
        key: ChannelKey,
        client_tag: Option<&str>,
        no_ack: bool,
        arguments: &FieldTable,
    ) -> Result<StreamCursor, AmqpError> {
        let queue = self.queues.get(&id).ok_or_else(|| self.not_found_queue(""))?;
        let stream = queue.stream.as_ref().ok_or_else(|| self.not_found_queue(&queue.name))?;
        let described = format!("queue '{}' in vhost '{}'", queue.name, self.name);
        if no_ack {
            return Err(AmqpError::hard(
                ReplyCode::NotImplemented,
                format!("automatic acknowledgement not supported by stream queues {described}"),
                0,
                0,
            ));
        }
        let channel = self.channels.get(&key).ok_or_else(|| soft(ReplyCode::ChannelError, "channel is not open"))?;
        // A global prefetch alone does not count (RabbitMQ's quoting).
        if channel.consumer_prefetch == 0 {
            return Err(precondition(format!("consumer prefetch count is not set for '{described}'")));
        }
        let now = self.clock.now_ms();
        // Tracking (LavinMQ's): asked for with `x-stream-offset` void (then
        // from the first message) or `x-stream-automatic-offset-tracking`,
        // under the consumer tag the client chose.
        let offset = table::get(arguments, crate::stream::OFFSET_HEADER);
        let void = matches!(offset, Some(AMQPValue::Void));
        let automatic = matches!(table::get(arguments, TRACKING_ARGUMENT), Some(AMQPValue::Boolean(true)));
        let tracking = client_tag.filter(|_| void || automatic);
        let spec = match void {
            true => OffsetSpec::First,
            false => OffsetSpec::parse(offset, now).ok_or_else(|| {
                let value = offset.map(erlang_term).unwrap_or_default();
                precondition(format!(
                    "invalid arg 'x-stream-offset' for {described}: {{invalid_stream_offset_arg,{value}}}"
                ))
            })?,
        };
        let vhost = &self.name;
        let bounds = self.streams.as_ref().and_then(|s| s.bounds(vhost, &queue.name)).unwrap_or_default();
        let resumed = tracking.and_then(|tag| self.streams.as_ref()?.tracked(vhost, &queue.name, tag));
        let next = match spec {
            _ if resumed.is_some() => resumed.map_or(0, |acked| (acked + 1).clamp(bounds.first, stream.next)),
            OffsetSpec::First => bounds.first,
            OffsetSpec::Last => bounds.last_chunk.unwrap_or(stream.next),
            OffsetSpec::Next => stream.next,
            OffsetSpec::Offset(offset) => offset.clamp(bounds.first, stream.next),
            OffsetSpec::Timestamp(millis) => match &self.streams {
                Some(storage) => storage.offset_at(vhost, &queue.name, millis),
                None => stream.next,
            },
        };
        Ok(StreamCursor {
            next,
            filter: stream_filter(arguments),
            tracking: tracking.is_some(),
            ..StreamCursor::default()
        })
    }

    /// Delivers to every consumer of stream `id` what it has credit for,
    /// each from its own offset.
    pub(super) fn dispatch_stream(&mut self, id: QueueId) {
        let vhost = self.name.clone();
        let Some(queue) = self.queues.get_mut(&id) else { return };
        let Some(stream) = queue.stream.as_mut() else { return };
        let durable = stream.durable;
        for consumer in &mut queue.consumers {
            let Some(cursor) = consumer.stream.as_mut() else { continue };
            let Some(channel) = self.channels.get_mut(&consumer.channel) else { continue };
            while cursor.next < durable && channel.can_deliver(&consumer.tag, 0) {
                // From the tail: the message as published, its offset header
                // added as it is sent; from the store: as stored, with it.
                let (item, from_tail) = if cursor.next >= stream.tail_start() {
                    cursor.ahead.clear();
                    let Some(message) = stream.tail_get(cursor.next) else { break };
                    (crate::stream::StreamItem { offset: cursor.next, message: message.clone() }, true)
                } else {
                    if cursor.ahead.is_empty() {
                        let Some(storage) = &self.streams else { break };
                        let read = storage.read(&vhost, &queue.name, cursor, crate::stream::READ_AHEAD_BYTES);
                        match read {
                            Some(after) if cursor.ahead.is_empty() => {
                                // Skipped by the chunk filter, or removed by
                                // retention meanwhile.
                                cursor.next = after.max(cursor.next + 1);
                                continue;
                            }
                            Some(_) => {}
                            None => break,
                        }
                    }
                    let Some(item) = cursor.ahead.pop_front() else { break };
                    (item, false)
                };
                cursor.next = item.offset + 1;
                if let Some(filter) = &cursor.filter {
                    if !filter.wants(&item.message) {
                        continue;
                    }
                }
                let delivery_tag = channel.next_tag();
                let (number, tag) = (consumer.channel.channel, &consumer.tag);
                if from_tail {
                    let properties = crate::stream::offset_properties(&item.message, item.offset);
                    channel.outbox.deliver_with_properties(
                        number,
                        tag,
                        delivery_tag,
                        &item.message,
                        properties.as_bytes(),
                    );
                } else {
                    channel.outbox.deliver(number, tag, delivery_tag, false, &item.message);
                }
                let Some(state) = channel.consumers.get_mut(&consumer.tag) else { break };
                queue.stats.delivered(false, false);
                self.stats.delivered(false, false);
                state.unacked += 1;
                channel.unacked_bytes += item.message.body_len() as u64;
                queue.unacked += 1;
                channel.unacked.push_back(Unacked {
                    delivery_tag,
                    queue: id,
                    seq: item.offset,
                    message: item.message,
                    consumer: Some((consumer.tag.clone(), state.id)),
                    delivered_at: self.coarse_now,
                });
            }
        }
    }

    /// What a stream refuses (nack, reject, recover, purge), in RabbitMQ's
    /// words: it closes the connection.
    pub(super) fn not_for_streams(&self, what: &str, queue: &str) -> AmqpError {
        AmqpError::hard(
            ReplyCode::NotImplemented,
            format!("{what} not supported by stream queues queue '{queue}' in vhost '{}'", self.name),
            0,
            0,
        )
    }

    /// The stream a settlement of `delivery_tag` (or every delivery up to
    /// it, with `multiple`; all with tag 0) would touch, if any.
    pub(super) fn settles_stream(&self, key: ChannelKey, delivery_tag: u64, multiple: bool) -> Option<Arc<str>> {
        let channel = self.channels.get(&key)?;
        let stream_of = |u: &Unacked| self.queues.get(&u.queue).filter(|q| q.stream.is_some()).map(|q| q.name.clone());
        // Unacked entries are sorted by tag: one is found by a binary
        // search; `multiple` looks only at those it settles anyway.
        if !multiple {
            let at = channel.unacked.binary_search_by_key(&delivery_tag, |u| u.delivery_tag).ok()?;
            return channel.unacked.get(at).and_then(stream_of);
        }
        channel.unacked.iter().take_while(|u| delivery_tag == 0 || u.delivery_tag <= delivery_tag).find_map(stream_of)
    }

    /// An ack of a stream delivery: only a tracking consumer's is kept.
    pub(super) fn stream_acked(&self, queue: &Queue, unacked: &Unacked) {
        let (Some(storage), Some((tag, _))) = (&self.streams, &unacked.consumer) else { return };
        let tracking = queue.consumers.iter().any(|c| c.tag == *tag && c.stream.as_ref().is_some_and(|s| s.tracking));
        if tracking {
            storage.track(&self.name, &queue.name, tag, unacked.seq);
        }
    }

    /// A stream's retained messages, as `queue.declare` reports them.
    pub(super) fn stream_len(&self, queue: &Queue) -> u64 {
        let Some(stream) = &queue.stream else { return 0 };
        let bounds = self.streams.as_ref().and_then(|s| s.bounds(&self.name, &queue.name));
        bounds.map_or(stream.next, |b| stream.next.saturating_sub(b.first))
    }
}

/// A field value as RabbitMQ's error texts show it: `{longstr,<<"7d">>}`.
fn erlang_term(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => {
            format!("{{longstr,<<\"{}\">>}}", table::as_str(value).unwrap_or_default())
        }
        AMQPValue::Boolean(b) => format!("{{bool,{b}}}"),
        AMQPValue::DecimalValue(d) => format!("{{decimal,{{{},{}}}}}", d.scale, d.value),
        AMQPValue::Float(f) => format!("{{float,{f}}}"),
        AMQPValue::Double(d) => format!("{{double,{d}}}"),
        other => format!("{{{},{other:?}}}", crate::settings::value_type(other)),
    }
}

/// The consumer argument that turns on server-side offset tracking.
pub const TRACKING_ARGUMENT: &str = "x-stream-automatic-offset-tracking";

/// `x-stream-filter` (a string or an array of strings) and
/// `x-stream-match-unfiltered`.
fn stream_filter(arguments: &FieldTable) -> Option<StreamFilter> {
    let values: Vec<Box<[u8]>> = match table::get(arguments, "x-stream-filter")? {
        AMQPValue::FieldArray(items) => {
            items.as_slice().iter().filter_map(table::as_str).map(|s| s.as_bytes().into()).collect()
        }
        value => vec![table::as_str(value)?.as_bytes().into()],
    };
    let match_unfiltered = matches!(table::get(arguments, "x-stream-match-unfiltered"), Some(AMQPValue::Boolean(true)));
    Some(StreamFilter { values, match_unfiltered })
}
