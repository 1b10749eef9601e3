//! A quorum queue as a deterministic state machine over its Raft log (the
//! role of RabbitMQ's `rabbit_fifo`). Every replica applies the same
//! commands in the same order and ends in the same state with the same
//! effects, so what a consumer is given never depends on which node leads.
//!
//! - The machine holds no bodies: a message is the log position of the
//!   command that enqueued it ([`BodyRef`]), where every replica has it.
//! - Consumers check out messages through the log: assigning messages to
//!   consumers happens while applying, so every replica knows which
//!   consumer holds which message, and a new leader goes on from there.
//!   Each assignment is an [`Effect::Deliver`] for the node hosting the
//!   consumer to send.
//! - Time comes in commands, stamped by the leader (`Enqueue`, `Tick`),
//!   never from a clock of the replica's own.
//! - Requeued messages keep their id and so their place in the queue.

use std::collections::{BTreeMap, BTreeSet};

/// A message's place in the queue: ids grow in the order of enqueueing.
pub type MessageId = u64;

/// A consumer, named by the node that hosts it (node, connection,
/// channel, consumer tag: opaque here, but its first bytes up to the
/// first 0 name the node, so that a node's consumers can go together).
pub type ConsumerKey = Vec<u8>;

/// Where a message's bytes are: the entry at `index` of the group's log,
/// command `position` of that entry's batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyRef {
    pub index: u64,
    pub position: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
}

/// The queue's arguments that the machine applies (the rest are the
/// broker's business).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuorumSettings {
    /// `x-delivery-limit`: returns allowed before the message is
    /// dead-lettered (or dropped).
    pub delivery_limit: Option<u32>,
    /// `x-max-length` and `x-max-length-bytes`, counting ready messages.
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    /// `x-message-ttl`, milliseconds.
    pub message_ttl: Option<u64>,
}

/// Why a message left the queue without being acknowledged (the `reason`
/// of `x-death`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Expired,
    Rejected,
    DeliveryLimit,
    MaxLength,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A message of `size` bytes published at `time` (ms since the epoch,
    /// the leader's clock), with its own TTL from `expiration` if any.
    Enqueue { time: u64, size: u32, expiration: Option<u64> },
    /// A consumer starts; `prefetch` 0 means no limit.
    Checkout { consumer: ConsumerKey, prefetch: u32 },
    /// A consumer stops; what it holds goes back to the queue.
    Cancel { consumer: ConsumerKey },
    /// Acknowledged.
    Settle { consumer: ConsumerKey, ids: Vec<MessageId> },
    /// Rejected or nacked with requeue.
    Return { consumer: ConsumerKey, ids: Vec<MessageId> },
    /// Rejected or nacked without requeue.
    Discard { consumer: ConsumerKey, ids: Vec<MessageId> },
    /// Every consumer whose key starts with `prefix` is gone (its channel,
    /// connection or node): as `Cancel` for each.
    Down { prefix: Vec<u8> },
    /// Ready messages go; those consumers hold stay.
    Purge,
    /// The leader's clock: ready messages whose TTL ran out expire.
    Tick { time: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send the message to the consumer.
    Deliver { consumer: ConsumerKey, id: MessageId, body: BodyRef, redelivered: bool, delivery_count: u32 },
    /// The message left the queue unacknowledged: dead-letter it (if the
    /// queue has a dead-letter exchange) from this body.
    DeadLetter { id: MessageId, body: BodyRef, reason: Reason, delivery_count: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Enqueued(MessageId),
    /// `reject-publish` overflow: the message was not taken.
    Rejected,
    /// How many messages the command removed or moved.
    Done(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Msg {
    body: BodyRef,
    size: u32,
    delivery_count: u32,
    /// ms since the epoch; `u64::MAX` if it never expires.
    expires_at: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Consumer {
    prefetch: u32,
    held: BTreeSet<MessageId>,
}

impl Consumer {
    fn has_credit(&self) -> bool {
        self.prefetch == 0 || self.held.len() < self.prefetch as usize
    }
}

/// The replicated state of one quorum queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuorumQueue {
    settings: QuorumSettings,
    /// Every message not yet settled, ready or held by a consumer.
    messages: BTreeMap<MessageId, Msg>,
    ready: BTreeSet<MessageId>,
    ready_bytes: u64,
    consumers: BTreeMap<ConsumerKey, Consumer>,
    /// The consumer served last (round-robin goes on after it).
    last_served: Option<ConsumerKey>,
    next_id: MessageId,
    /// The log position of the last command applied.
    last: Option<BodyRef>,
}

impl QuorumQueue {
    pub fn new(settings: QuorumSettings) -> QuorumQueue {
        QuorumQueue { settings, next_id: 1, ..QuorumQueue::default() }
    }

    pub fn ready(&self) -> usize {
        self.ready.len()
    }

    pub fn ready_bytes(&self) -> u64 {
        self.ready_bytes
    }

    /// Messages held by consumers, not yet settled.
    pub fn unacked(&self) -> usize {
        self.messages.len() - self.ready.len()
    }

    pub fn consumers(&self) -> usize {
        self.consumers.len()
    }

    /// The oldest log entry a message still needs: the log before it may
    /// be purged.
    pub fn oldest_body(&self) -> Option<u64> {
        self.messages.values().map(|m| m.body.index).min()
    }

    /// Applies the command at log `index` (several commands of one entry
    /// share it, in order).
    pub fn apply(&mut self, index: u64, command: &Command) -> (Outcome, Vec<Effect>) {
        let here = match self.last {
            Some(last) if last.index == index => BodyRef { index, position: last.position + 1 },
            _ => BodyRef { index, position: 0 },
        };
        self.last = Some(here);
        let mut effects = Vec::new();
        let outcome = match command {
            Command::Enqueue { time, size, expiration } => self.enqueue(here, *time, *size, *expiration, &mut effects),
            Command::Checkout { consumer, prefetch } => {
                let entry = self.consumers.entry(consumer.clone()).or_default();
                entry.prefetch = *prefetch;
                Outcome::Done(0)
            }
            Command::Cancel { consumer } => Outcome::Done(self.remove_consumer(consumer, &mut effects)),
            Command::Settle { consumer, ids } => {
                let held = self.take_held(consumer, ids);
                let settled = held.iter().filter(|id| self.messages.remove(id).is_some()).count();
                Outcome::Done(settled as u64)
            }
            Command::Return { consumer, ids } => {
                let mut returned = 0;
                for id in self.take_held(consumer, ids) {
                    returned += 1;
                    self.requeue(id, &mut effects);
                }
                Outcome::Done(returned)
            }
            Command::Discard { consumer, ids } => {
                let mut discarded = 0;
                for id in self.take_held(consumer, ids) {
                    if let Some(m) = self.messages.remove(&id) {
                        discarded += 1;
                        effects.push(Effect::DeadLetter {
                            id,
                            body: m.body,
                            reason: Reason::Rejected,
                            delivery_count: m.delivery_count,
                        });
                    }
                }
                Outcome::Done(discarded)
            }
            Command::Down { prefix } => {
                let gone: Vec<ConsumerKey> = self.consumers.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
                let mut returned = 0;
                for consumer in gone {
                    returned += self.remove_consumer(&consumer, &mut effects);
                }
                Outcome::Done(returned)
            }
            Command::Purge => {
                let purged = std::mem::take(&mut self.ready);
                for id in &purged {
                    self.messages.remove(id);
                }
                self.ready_bytes = 0;
                Outcome::Done(purged.len() as u64)
            }
            Command::Tick { time } => {
                let expired: Vec<MessageId> = self
                    .ready
                    .iter()
                    .copied()
                    .filter(|id| self.messages.get(id).is_some_and(|m| m.expires_at <= *time))
                    .collect();
                for id in &expired {
                    self.drop_ready(*id, Reason::Expired, &mut effects);
                }
                Outcome::Done(expired.len() as u64)
            }
        };
        self.dispatch(&mut effects);
        (outcome, effects)
    }

    fn enqueue(
        &mut self,
        body: BodyRef,
        time: u64,
        size: u32,
        expiration: Option<u64>,
        effects: &mut Vec<Effect>,
    ) -> Outcome {
        let s = &self.settings;
        let full = s.max_length.is_some_and(|max| self.ready.len() as u64 >= max)
            || s.max_length_bytes.is_some_and(|max| self.ready_bytes + u64::from(size) > max);
        if full && s.overflow == Overflow::RejectPublish {
            return Outcome::Rejected;
        }
        let ttl = match (s.message_ttl, expiration) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let id = self.next_id;
        self.next_id += 1;
        let expires_at = ttl.map_or(u64::MAX, |ttl| time.saturating_add(ttl));
        self.messages.insert(id, Msg { body, size, delivery_count: 0, expires_at });
        self.ready.insert(id);
        self.ready_bytes += u64::from(size);
        // drop-head: the oldest ready messages make room.
        loop {
            let s = &self.settings;
            let over = s.max_length.is_some_and(|max| self.ready.len() as u64 > max)
                || s.max_length_bytes.is_some_and(|max| self.ready_bytes > max);
            let Some(&oldest) = self.ready.first() else { break };
            if !over {
                break;
            }
            self.drop_ready(oldest, Reason::MaxLength, effects);
        }
        Outcome::Enqueued(id)
    }

    fn drop_ready(&mut self, id: MessageId, reason: Reason, effects: &mut Vec<Effect>) {
        if self.ready.remove(&id) {
            if let Some(m) = self.messages.remove(&id) {
                self.ready_bytes -= u64::from(m.size);
                effects.push(Effect::DeadLetter { id, body: m.body, reason, delivery_count: m.delivery_count });
            }
        }
    }

    /// The ids among `ids` that `consumer` holds, no longer held by it.
    fn take_held(&mut self, consumer: &[u8], ids: &[MessageId]) -> Vec<MessageId> {
        let Some(c) = self.consumers.get_mut(consumer) else { return Vec::new() };
        ids.iter().copied().filter(|id| c.held.remove(id)).collect()
    }

    /// A returned message: counted, then back in its place, or gone if it
    /// was returned once too often.
    fn requeue(&mut self, id: MessageId, effects: &mut Vec<Effect>) {
        let Some(m) = self.messages.get_mut(&id) else { return };
        m.delivery_count += 1;
        if self.settings.delivery_limit.is_some_and(|limit| m.delivery_count > limit) {
            let m = *m;
            self.messages.remove(&id);
            effects.push(Effect::DeadLetter {
                id,
                body: m.body,
                reason: Reason::DeliveryLimit,
                delivery_count: m.delivery_count,
            });
            return;
        }
        self.ready_bytes += u64::from(m.size);
        self.ready.insert(id);
    }

    /// A consumer goes; what it held is returned (and counted, as RabbitMQ
    /// counts a delivery to a consumer that went away).
    fn remove_consumer(&mut self, consumer: &[u8], effects: &mut Vec<Effect>) -> u64 {
        let Some(c) = self.consumers.remove(consumer) else { return 0 };
        if self.last_served.as_deref() == Some(consumer) {
            self.last_served = None;
        }
        let n = c.held.len() as u64;
        for id in c.held {
            self.requeue(id, effects);
        }
        n
    }

    /// Gives ready messages, oldest first, to consumers with credit, one
    /// at a time in turn.
    fn dispatch(&mut self, effects: &mut Vec<Effect>) {
        while let Some(&id) = self.ready.first() {
            let Some(consumer) = self.next_consumer() else { break };
            self.ready.remove(&id);
            let Some(m) = self.messages.get(&id).copied() else { continue };
            self.ready_bytes -= u64::from(m.size);
            if let Some(c) = self.consumers.get_mut(&consumer) {
                c.held.insert(id);
            }
            effects.push(Effect::Deliver {
                consumer: consumer.clone(),
                id,
                body: m.body,
                redelivered: m.delivery_count > 0,
                delivery_count: m.delivery_count,
            });
            self.last_served = Some(consumer);
        }
    }

    /// The first consumer with credit after the one served last.
    fn next_consumer(&self) -> Option<ConsumerKey> {
        use std::ops::Bound::{Excluded, Unbounded};
        let after = match &self.last_served {
            Some(last) => self.consumers.range::<[u8], _>((Excluded(last.as_slice()), Unbounded)),
            None => self.consumers.range::<[u8], _>((Unbounded, Unbounded)),
        };
        after.chain(self.consumers.iter()).find(|(_, c)| c.has_credit()).map(|(key, _)| key.clone())
    }
}

/// A command or snapshot that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed quorum queue {0}")]
pub struct Malformed(&'static str);

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        // Keys and prefixes are short (a node name, ids, a consumer tag).
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
        self
    }
    fn ids(&mut self, ids: &[MessageId]) -> &mut Self {
        self.u32(u32::try_from(ids.len()).unwrap_or(u32::MAX));
        for id in ids {
            self.u64(*id);
        }
        self
    }
    fn option(&mut self, v: Option<u64>) -> &mut Self {
        self.u64(v.unwrap_or(u64::MAX))
    }
}

struct Reader<'a>(&'a [u8], &'static str);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed(self.1));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, Malformed> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn ids(&mut self) -> Result<Vec<MessageId>, Malformed> {
        let n = self.u32()? as usize;
        // Each id is 8 bytes: a count beyond what is left is malformed.
        if n > self.0.len() / 8 {
            return Err(Malformed(self.1));
        }
        (0..n).map(|_| self.u64()).collect()
    }
    fn option(&mut self) -> Result<Option<u64>, Malformed> {
        Ok(Some(self.u64()?).filter(|v| *v != u64::MAX))
    }
}

impl Command {
    /// The command as the log stores it; an `Enqueue` is followed by the
    /// message's bytes (`message`, ignored for other commands).
    pub fn encode(&self, message: &[u8]) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(32 + message.len()));
        match self {
            Command::Enqueue { time, size, expiration } => {
                w.u8(b'E').u64(*time).u32(*size).option(*expiration);
                w.0.extend_from_slice(message);
            }
            Command::Checkout { consumer, prefetch } => {
                w.u8(b'C').bytes(consumer).u32(*prefetch);
            }
            Command::Cancel { consumer } => {
                w.u8(b'X').bytes(consumer);
            }
            Command::Settle { consumer, ids } => {
                w.u8(b'S').bytes(consumer).ids(ids);
            }
            Command::Return { consumer, ids } => {
                w.u8(b'R').bytes(consumer).ids(ids);
            }
            Command::Discard { consumer, ids } => {
                w.u8(b'D').bytes(consumer).ids(ids);
            }
            Command::Down { prefix } => {
                w.u8(b'W').bytes(prefix);
            }
            Command::Purge => {
                w.u8(b'P');
            }
            Command::Tick { time } => {
                w.u8(b'T').u64(*time);
            }
        }
        w.0
    }

    /// A command from the log, and the message bytes after an `Enqueue`.
    pub fn decode(bytes: &[u8]) -> Result<(Command, &[u8]), Malformed> {
        let mut r = Reader(bytes, "command");
        let command = match r.u8()? {
            b'E' => Command::Enqueue { time: r.u64()?, size: r.u32()?, expiration: r.option()? },
            b'C' => Command::Checkout { consumer: r.bytes()?, prefetch: r.u32()? },
            b'X' => Command::Cancel { consumer: r.bytes()? },
            b'S' => Command::Settle { consumer: r.bytes()?, ids: r.ids()? },
            b'R' => Command::Return { consumer: r.bytes()?, ids: r.ids()? },
            b'D' => Command::Discard { consumer: r.bytes()?, ids: r.ids()? },
            b'W' => Command::Down { prefix: r.bytes()? },
            b'P' => Command::Purge,
            b'T' => Command::Tick { time: r.u64()? },
            _ => return Err(Malformed("command")),
        };
        Ok((command, r.0))
    }
}

impl QuorumQueue {
    /// The whole state, for [`QuorumQueue::restore`].
    pub fn snapshot(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64 + self.messages.len() * 33));
        let s = &self.settings;
        w.option(s.delivery_limit.map(u64::from)).option(s.max_length).option(s.max_length_bytes);
        w.u8(u8::from(s.overflow == Overflow::RejectPublish)).option(s.message_ttl);
        w.u64(self.next_id);
        match self.last {
            Some(last) => w.u8(1).u64(last.index).u32(last.position),
            None => w.u8(0),
        };
        w.u64(self.messages.len() as u64);
        for (id, m) in &self.messages {
            w.u64(*id).u64(m.body.index).u32(m.body.position).u32(m.size).u32(m.delivery_count).u64(m.expires_at);
            w.u8(u8::from(self.ready.contains(id)));
        }
        w.u64(self.consumers.len() as u64);
        for (key, c) in &self.consumers {
            w.bytes(key).u32(c.prefetch).ids(&c.held.iter().copied().collect::<Vec<_>>());
        }
        match &self.last_served {
            Some(key) => w.u8(1).bytes(key),
            None => w.u8(0),
        };
        w.0
    }

    pub fn restore(bytes: &[u8]) -> Result<QuorumQueue, Malformed> {
        let mut r = Reader(bytes, "snapshot");
        let settings = QuorumSettings {
            delivery_limit: r.option()?.map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
            max_length: r.option()?,
            max_length_bytes: r.option()?,
            overflow: if r.u8()? == 1 { Overflow::RejectPublish } else { Overflow::DropHead },
            message_ttl: r.option()?,
        };
        let mut q = QuorumQueue::new(settings);
        q.next_id = r.u64()?;
        q.last = match r.u8()? {
            1 => Some(BodyRef { index: r.u64()?, position: r.u32()? }),
            _ => None,
        };
        for _ in 0..r.u64()? {
            let id = r.u64()?;
            let body = BodyRef { index: r.u64()?, position: r.u32()? };
            let m = Msg { body, size: r.u32()?, delivery_count: r.u32()?, expires_at: r.u64()? };
            if r.u8()? == 1 {
                q.ready.insert(id);
                q.ready_bytes += u64::from(m.size);
            }
            q.messages.insert(id, m);
        }
        for _ in 0..r.u64()? {
            let key = r.bytes()?;
            let prefetch = r.u32()?;
            let held = r.ids()?.into_iter().collect();
            q.consumers.insert(key, Consumer { prefetch, held });
        }
        q.last_served = match r.u8()? {
            1 => Some(r.bytes()?),
            _ => None,
        };
        if !r.0.is_empty() {
            return Err(Malformed("snapshot"));
        }
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(name: &str) -> ConsumerKey {
        name.as_bytes().to_vec()
    }

    fn enqueue(q: &mut QuorumQueue, index: u64) -> (Outcome, Vec<Effect>) {
        q.apply(index, &Command::Enqueue { time: 1_000, size: 10, expiration: None })
    }

    fn delivered(effects: &[Effect]) -> Vec<(String, MessageId, bool)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Deliver { consumer, id, redelivered, .. } => {
                    Some((String::from_utf8_lossy(consumer).into_owned(), *id, *redelivered))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn consumers_share_in_turn_within_their_prefetch_and_a_return_keeps_its_place() {
        let mut q = QuorumQueue::new(QuorumSettings::default());
        for i in 1..=5 {
            assert_eq!(enqueue(&mut q, i).0, Outcome::Enqueued(i));
        }
        let (_, e) = q.apply(6, &Command::Checkout { consumer: key("a"), prefetch: 2 });
        assert_eq!(delivered(&e), [("a".into(), 1, false), ("a".into(), 2, false)]);
        let (_, e) = q.apply(7, &Command::Checkout { consumer: key("b"), prefetch: 2 });
        assert_eq!(delivered(&e), [("b".into(), 3, false), ("b".into(), 4, false)]);
        assert_eq!((q.ready(), q.unacked()), (1, 4));

        // a acks 1: its credit goes to 5. a returns 2: it is the oldest
        // ready message, so the next with credit (b, after a) gets nothing
        // (b is full), and a gets it again, redelivered.
        let (_, e) = q.apply(8, &Command::Settle { consumer: key("a"), ids: vec![1] });
        assert_eq!(delivered(&e), [("a".into(), 5, false)]);
        let (_, e) = q.apply(9, &Command::Return { consumer: key("a"), ids: vec![2] });
        assert_eq!(delivered(&e), [("a".into(), 2, true)]);
        // Someone else's ids and unknown ids are ignored.
        assert_eq!(q.apply(10, &Command::Settle { consumer: key("b"), ids: vec![2, 99] }).0, Outcome::Done(0));

        // b's channel goes: 3 and 4 go back in order, to nobody (a is full).
        assert_eq!(q.apply(11, &Command::Down { prefix: key("b") }).0, Outcome::Done(2));
        assert_eq!((q.ready(), q.unacked(), q.consumers()), (2, 2, 1));
        let (_, e) = q.apply(12, &Command::Settle { consumer: key("a"), ids: vec![2, 5] });
        assert_eq!(delivered(&e), [("a".into(), 3, true), ("a".into(), 4, true)]);
    }

    #[test]
    fn the_delivery_limit_dead_letters_and_discard_and_expiry_do_too() {
        let settings = QuorumSettings { delivery_limit: Some(1), message_ttl: Some(500), ..Default::default() };
        let mut q = QuorumQueue::new(settings);
        enqueue(&mut q, 1);
        enqueue(&mut q, 1);
        enqueue(&mut q, 2);
        q.apply(3, &Command::Checkout { consumer: key("c"), prefetch: 1 });
        q.apply(4, &Command::Return { consumer: key("c"), ids: vec![1] });
        let (_, e) = q.apply(5, &Command::Return { consumer: key("c"), ids: vec![1] });
        assert!(e.contains(&Effect::DeadLetter {
            id: 1,
            body: BodyRef { index: 1, position: 0 },
            reason: Reason::DeliveryLimit,
            delivery_count: 2
        }));
        // 2 was delivered next; discarding it dead-letters it as rejected.
        let (_, e) = q.apply(6, &Command::Discard { consumer: key("c"), ids: vec![2] });
        assert!(e.iter().any(|e| matches!(e, Effect::DeadLetter { id: 2, reason: Reason::Rejected, .. })));
        // 3 is held by c now; a cancelled consumer's message ready again
        // expires on the leader's tick, at 1,000 + 500.
        q.apply(7, &Command::Cancel { consumer: key("c") });
        assert_eq!(q.apply(8, &Command::Tick { time: 1_499 }).0, Outcome::Done(0));
        let (outcome, e) = q.apply(9, &Command::Tick { time: 1_500 });
        assert_eq!(outcome, Outcome::Done(1));
        assert!(matches!(
            e[..],
            [Effect::DeadLetter { id: 3, body: BodyRef { index: 2, position: 0 }, reason: Reason::Expired, .. }]
        ));
        assert_eq!(q.oldest_body(), None);
    }

    #[test]
    fn max_length_drops_the_head_or_rejects_the_publish() {
        let mut q = QuorumQueue::new(QuorumSettings { max_length: Some(2), ..Default::default() });
        enqueue(&mut q, 1);
        enqueue(&mut q, 2);
        let (outcome, e) = enqueue(&mut q, 3);
        assert_eq!(outcome, Outcome::Enqueued(3));
        assert!(matches!(e[..], [Effect::DeadLetter { id: 1, reason: Reason::MaxLength, .. }]));
        assert_eq!(q.ready(), 2);

        let settings =
            QuorumSettings { max_length_bytes: Some(25), overflow: Overflow::RejectPublish, ..Default::default() };
        let mut q = QuorumQueue::new(settings);
        enqueue(&mut q, 1);
        enqueue(&mut q, 2);
        assert_eq!(enqueue(&mut q, 3).0, Outcome::Rejected);
        assert_eq!((q.ready(), q.ready_bytes()), (2, 20));
        // Held messages do not count: with a consumer, there is room.
        q.apply(4, &Command::Checkout { consumer: key("c"), prefetch: 0 });
        assert_eq!(enqueue(&mut q, 5).0, Outcome::Enqueued(3));
        assert_eq!(q.apply(6, &Command::Purge).0, Outcome::Done(0), "purge leaves held messages");
    }

    fn command() -> impl Strategy<Value = Command> {
        let consumer = prop_oneof![Just(key("n1/a")), Just(key("n1/b")), Just(key("n2/c"))];
        let ids = proptest::collection::vec(1u64..40, 0..4);
        prop_oneof![
            8 => (0u64..3_000, 1u32..100, proptest::option::of(0u64..2_000))
                .prop_map(|(time, size, expiration)| Command::Enqueue { time, size, expiration }),
            2 => (consumer.clone(), 0u32..4).prop_map(|(consumer, prefetch)| Command::Checkout { consumer, prefetch }),
            1 => consumer.clone().prop_map(|consumer| Command::Cancel { consumer }),
            4 => (consumer.clone(), ids.clone()).prop_map(|(consumer, ids)| Command::Settle { consumer, ids }),
            2 => (consumer.clone(), ids.clone()).prop_map(|(consumer, ids)| Command::Return { consumer, ids }),
            1 => (consumer, ids).prop_map(|(consumer, ids)| Command::Discard { consumer, ids }),
            1 => prop_oneof![Just(key("n1")), Just(key("n2"))].prop_map(|prefix| Command::Down { prefix }),
            1 => Just(Command::Purge),
            1 => (0u64..5_000).prop_map(|time| Command::Tick { time }),
        ]
    }

    fn settings() -> impl Strategy<Value = QuorumSettings> {
        (
            proptest::option::of(0u32..3),
            proptest::option::of(1u64..10),
            proptest::option::of(50u64..500),
            any::<bool>(),
            proptest::option::of(0u64..3_000),
        )
            .prop_map(|(delivery_limit, max_length, max_length_bytes, reject, message_ttl)| QuorumSettings {
                delivery_limit,
                max_length,
                max_length_bytes,
                overflow: if reject { Overflow::RejectPublish } else { Overflow::DropHead },
                message_ttl,
            })
    }

    fn check_invariants(q: &QuorumQueue) -> Result<(), TestCaseError> {
        let mut held = BTreeSet::new();
        for c in q.consumers.values() {
            for id in &c.held {
                prop_assert!(held.insert(*id), "message {} held twice", id);
                prop_assert!(!q.ready.contains(id), "message {} held and ready", id);
            }
        }
        let all: BTreeSet<MessageId> = q.ready.union(&held).copied().collect();
        prop_assert_eq!(all, q.messages.keys().copied().collect::<BTreeSet<_>>());
        let bytes: u64 = q.ready.iter().map(|id| u64::from(q.messages[id].size)).sum();
        prop_assert_eq!(bytes, q.ready_bytes);
        // Nothing stays ready while a consumer has credit.
        prop_assert!(q.ready.is_empty() || q.consumers.values().all(|c| !c.has_credit()));
        Ok(())
    }

    proptest! {
        /// Any sequence of commands keeps every message in exactly one
        /// place; a replica restored from a snapshot taken anywhere goes
        /// on exactly as the original (same state, same effects); and
        /// every command survives its encoding.
        #[test]
        fn replicas_agree_from_any_snapshot(
            settings in settings(),
            commands in proptest::collection::vec((command(), any::<bool>()), 1..80),
            cut in 0usize..80,
        ) {
            let mut original = QuorumQueue::new(settings);
            let mut copy: Option<QuorumQueue> = None;
            let mut index = 1;
            for (step, (command, next_entry)) in commands.iter().enumerate() {
                let encoded = command.encode(b"body");
                let (decoded, rest) = Command::decode(&encoded).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&decoded, command);
                prop_assert_eq!(rest, if matches!(command, Command::Enqueue { .. }) { &b"body"[..] } else { &b""[..] });
                if *next_entry {
                    index += 1;
                }
                if step == cut {
                    copy = Some(QuorumQueue::restore(&original.snapshot()).map_err(|e| TestCaseError::fail(e.to_string()))?);
                }
                let expected = original.apply(index, command);
                check_invariants(&original)?;
                for effect in &expected.1 {
                    if let Effect::Deliver { consumer, .. } = effect {
                        // A consumer may hold more than a prefetch it lowered, but is
                        // given nothing beyond it.
                        let c = &original.consumers[consumer];
                        prop_assert!(c.prefetch == 0 || c.held.len() <= c.prefetch as usize);
                    }
                }
                if let Some(copy) = copy.as_mut() {
                    prop_assert_eq!(copy.apply(index, command), expected);
                    prop_assert_eq!(&*copy, &original);
                }
            }
        }
    }

    #[test]
    fn malformed_bytes_are_refused() {
        assert_eq!(Command::decode(b""), Err(Malformed("command")));
        assert_eq!(Command::decode(b"S\x05\x00\x00\x00ab"), Err(Malformed("command")));
        assert_eq!(Command::decode(b"S\x00\x00\x00\x00\xff\xff\xff\xff"), Err(Malformed("command")));
        let snapshot = QuorumQueue::new(QuorumSettings::default()).snapshot();
        assert!(QuorumQueue::restore(&snapshot).is_ok());
        assert_eq!(QuorumQueue::restore(&snapshot[..snapshot.len() - 1]), Err(Malformed("snapshot")));
    }
}
