//! A quorum queue's replicated state: every message not yet settled, by
//! the key the leader gave it, with the returns counted so far. The
//! leader's queue decides (dispatch, expiry, limits) and its journal
//! becomes this machine's commands, so every replica holds what the
//! leader held once it was committed, and a new leader starts from it.
//!
//! Bodies are kept in memory here for now (and in the snapshots): the
//! queue's log is the group's, and reading bodies back from it is to come.

use std::collections::BTreeMap;

use bytes::Bytes;
use warren_codec::properties::Properties;
use warren_core::Message;
use warren_raft::StateMachine;

const ENQUEUE: u8 = b'E';
const SETTLE: u8 = b'S';
const RETURN: u8 = b'R';
/// Messages published through another node: each takes a key from its
/// log position ([`forwarded_key`]). Written before batches had numbers;
/// still read.
const FORWARDED: u8 = b'F';
/// The same, numbered by the node that sent them: a batch sent again
/// (its first answer was lost with a leader that died after committing
/// it) is applied once.
const FORWARDED_ONCE: u8 = b'G';
/// Marks a snapshot that carries the forwarding nodes' last batches (no
/// leader key is this large).
const SNAPSHOT_V2: u64 = u64::MAX;

/// Keys of forwarded messages: the leader's own keys stay below.
const FORWARDED_BIT: u64 = 1 << 62;

/// The key of the `position`th message of the forwarded batch at log
/// `index`: the same on every replica, and never one a leader hands out.
fn forwarded_key(index: u64, position: u64) -> u64 {
    FORWARDED_BIT | (index << 20) | (position & 0xF_FFFF)
}

/// A forwarded message as applied, for the leader's node to put in its
/// queue.
pub struct Applied {
    pub index: u64,
    pub message: Message,
}

/// A message as the replica keeps it: when it arrived, then exchange,
/// routing key, properties and body, as [`encode_enqueue`] wrote them.
struct Kept {
    data: Box<[u8]>,
    returns: u64,
}

#[derive(Default)]
pub struct QueueReplica {
    messages: BTreeMap<u64, Kept>,
    /// The largest key a leader ever gave (a new leader goes on above it).
    last_key: u64,
    /// The log index of the last command applied.
    last_index: u64,
    /// Where forwarded messages are told as they are applied.
    forwarded: Option<tokio::sync::mpsc::UnboundedSender<Applied>>,
    /// Each forwarding node's (per run) last batch applied.
    batches: BTreeMap<u64, u64>,
}

/// `E`, key, then the message as `encode_message` writes it.
pub fn encode_enqueue(out: &mut Vec<u8>, key: u64, message: &Message) {
    out.push(ENQUEUE);
    out.extend_from_slice(&key.to_le_bytes());
    encode_message(out, message);
}

/// Arrival time, exchange, routing key, properties, body.
pub(super) fn encode_message(out: &mut Vec<u8>, message: &Message) {
    out.extend_from_slice(&message.arrived().to_le_bytes());
    // Both at most 255 bytes (the message cut them).
    out.push(u8::try_from(message.exchange().len()).unwrap_or(u8::MAX));
    out.extend_from_slice(message.exchange());
    out.push(u8::try_from(message.routing_key().len()).unwrap_or(u8::MAX));
    out.extend_from_slice(message.routing_key());
    out.extend_from_slice(&u32::try_from(message.properties().len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(message.properties());
    out.extend_from_slice(message.body());
}

/// `G`, the sending node's `origin` and the batch's number (rising), then
/// each message as [`encode_enqueue`] writes it after its key, with its
/// length first.
pub fn encode_forwarded<'a>(
    out: &mut Vec<u8>,
    origin: u64,
    batch: u64,
    messages: impl IntoIterator<Item = &'a Message>,
) {
    out.push(FORWARDED_ONCE);
    out.extend_from_slice(&origin.to_le_bytes());
    out.extend_from_slice(&batch.to_le_bytes());
    let mut one = Vec::new();
    for message in messages {
        one.clear();
        encode_enqueue(&mut one, 0, message);
        let data = &one[9..];
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(data);
    }
}

pub fn encode_settle(out: &mut Vec<u8>, key: u64) {
    out.push(SETTLE);
    out.extend_from_slice(&key.to_le_bytes());
}

pub fn encode_return(out: &mut Vec<u8>, key: u64, returns: u64) {
    out.push(RETURN);
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&returns.to_le_bytes());
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
}

/// Rebuilds a message from what [`encode_message`] wrote.
pub(super) fn decode_message(data: &[u8]) -> Option<Message> {
    let arrived = u64_at(data, 0)?;
    let mut at = 8;
    let exchange_len = usize::from(*data.get(at)?);
    let exchange = data.get(at + 1..at + 1 + exchange_len)?;
    at += 1 + exchange_len;
    let key_len = usize::from(*data.get(at)?);
    let routing_key = data.get(at + 1..at + 1 + key_len)?;
    at += 1 + key_len;
    let props_len = usize::try_from(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?)).ok()?;
    let properties = data.get(at + 4..at + 4 + props_len)?;
    at += 4 + props_len;
    let body = data.get(at..)?;
    let properties = Properties::parse(Bytes::copy_from_slice(properties))?;
    let mut builder = Message::builder(exchange, routing_key, &properties, body.len());
    builder.push_body(body);
    let message = builder.finish();
    if arrived != 0 {
        message.set_arrived(arrived);
    }
    Some(message)
}

impl QueueReplica {
    /// A replica that tells `forwarded` of forwarded messages it applies.
    pub fn telling(forwarded: tokio::sync::mpsc::UnboundedSender<Applied>) -> QueueReplica {
        QueueReplica { forwarded: Some(forwarded), ..QueueReplica::default() }
    }

    /// The log index of the last command applied.
    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn last_key(&self) -> u64 {
        self.last_key
    }

    fn apply_forwarded(&mut self, index: u64, mut rest: &[u8]) {
        let mut position = 0;
        while let Some(len) = u64_at(rest, 0).and_then(|l| usize::try_from(l).ok()) {
            let Some(data) = rest.get(8..8 + len) else { break };
            let key = forwarded_key(index, position);
            if let Some(forwarded) = &self.forwarded {
                if let Some(message) = decode_message(data) {
                    message.set_stored_index(key);
                    let _ = forwarded.send(Applied { index, message });
                }
            }
            self.messages.insert(key, Kept { data: data.into(), returns: 0 });
            rest = &rest[8 + len..];
            position += 1;
        }
    }

    /// The messages in key order (the order they were enqueued), each with
    /// its key set as its stored index, and its returns.
    pub fn messages(&self) -> Vec<(Message, u64)> {
        let mut out = Vec::with_capacity(self.messages.len());
        for (&key, kept) in &self.messages {
            match decode_message(&kept.data) {
                Some(message) => {
                    message.set_stored_index(key);
                    out.push((message, kept.returns));
                }
                None => tracing::error!(key, "a replicated message cannot be read: skipped"),
            }
        }
        out
    }
}

impl StateMachine for QueueReplica {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        self.last_index = index;
        if command.first() == Some(&FORWARDED) {
            self.apply_forwarded(index, &command[1..]);
            return Vec::new();
        }
        if command.first() == Some(&FORWARDED_ONCE) {
            if let (Some(origin), Some(batch)) = (u64_at(command, 1), u64_at(command, 9)) {
                let last = self.batches.entry(origin).or_insert(0);
                if batch > *last {
                    *last = batch;
                    self.apply_forwarded(index, &command[17..]);
                }
            }
            return Vec::new();
        }
        let key = u64_at(command, 1);
        match (command.first(), key) {
            (Some(&ENQUEUE), Some(key)) => {
                let data = command.get(9..).unwrap_or_default();
                self.messages.insert(key, Kept { data: data.into(), returns: 0 });
                self.last_key = self.last_key.max(key);
            }
            (Some(&SETTLE), Some(key)) => {
                self.messages.remove(&key);
            }
            (Some(&RETURN), Some(key)) => {
                if let (Some(kept), Some(returns)) = (self.messages.get_mut(&key), u64_at(command, 9)) {
                    kept.returns = returns;
                }
            }
            // Commands are written by this module only: a replica that
            // cannot read one ignores it, as every replica does.
            _ => tracing::error!(len = command.len(), "unreadable quorum queue command ignored"),
        }
        Vec::new()
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&SNAPSHOT_V2.to_le_bytes());
        out.extend_from_slice(&self.last_key.to_le_bytes());
        out.extend_from_slice(&self.last_index.to_le_bytes());
        out.extend_from_slice(&(self.batches.len() as u64).to_le_bytes());
        for (origin, batch) in &self.batches {
            out.extend_from_slice(&origin.to_le_bytes());
            out.extend_from_slice(&batch.to_le_bytes());
        }
        for (key, kept) in &self.messages {
            out.extend_from_slice(&key.to_le_bytes());
            out.extend_from_slice(&kept.returns.to_le_bytes());
            out.extend_from_slice(&(kept.data.len() as u64).to_le_bytes());
            out.extend_from_slice(&kept.data);
        }
        out
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let bad = || "a quorum queue snapshot is cut short".to_string();
        let v2 = u64_at(snapshot, 0) == Some(SNAPSHOT_V2);
        let mut at = if v2 { 8 } else { 0 };
        let last_key = u64_at(snapshot, at).ok_or_else(bad)?;
        let last_index = u64_at(snapshot, at + 8).ok_or_else(bad)?;
        at += 16;
        let mut batches = BTreeMap::new();
        if v2 {
            let count = u64_at(snapshot, at).ok_or_else(bad)?;
            at += 8;
            for _ in 0..count {
                batches.insert(u64_at(snapshot, at).ok_or_else(bad)?, u64_at(snapshot, at + 8).ok_or_else(bad)?);
                at += 16;
            }
        }
        let mut messages = BTreeMap::new();
        while at < snapshot.len() {
            let key = u64_at(snapshot, at).ok_or_else(bad)?;
            let returns = u64_at(snapshot, at + 8).ok_or_else(bad)?;
            let len = usize::try_from(u64_at(snapshot, at + 16).ok_or_else(bad)?).map_err(|_| bad())?;
            let data = snapshot.get(at + 24..at + 24 + len).ok_or_else(bad)?;
            messages.insert(key, Kept { data: data.into(), returns });
            at += 24 + len;
        }
        let forwarded = self.forwarded.take();
        *self = QueueReplica { messages, last_key, last_index, forwarded, batches };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &[u8]) -> Message {
        let properties = Properties::parse(Bytes::from_static(&[0x10, 0, 2])).unwrap_or_else(|| unreachable!());
        let mut builder = Message::builder(b"ex", b"rk", &properties, body.len());
        builder.push_body(body);
        builder.finish()
    }

    fn command(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut out);
        out
    }

    #[test]
    fn commands_build_the_leaders_queue_and_a_snapshot_restores_it() {
        let mut replica = QueueReplica::default();
        let first = message(b"one");
        first.set_arrived(1234);
        replica.apply(1, &command(|o| encode_enqueue(o, 7, &first)));
        replica.apply(2, &command(|o| encode_enqueue(o, 9, &message(b"two"))));
        replica.apply(3, &command(|o| encode_enqueue(o, 11, &message(b"three"))));
        replica.apply(4, &command(|o| encode_settle(o, 9)));
        replica.apply(5, &command(|o| encode_return(o, 11, 2)));
        let check = |replica: &QueueReplica| {
            let messages = replica.messages();
            let seen: Vec<(u64, Vec<u8>, u64)> =
                messages.iter().map(|(m, r)| (m.stored_index(), m.body().to_vec(), *r)).collect();
            assert_eq!(seen, vec![(7, b"one".to_vec(), 0), (11, b"three".to_vec(), 2)]);
            assert_eq!(messages[0].0.arrived(), 1234);
            assert_eq!(messages[0].0.exchange(), b"ex");
            assert_eq!(messages[0].0.routing_key(), b"rk");
            assert!(messages[0].0.persistent, "properties are kept");
            assert_eq!(replica.last_key(), 11);
        };
        check(&replica);
        let mut restored = QueueReplica::default();
        assert_eq!(restored.restore(&replica.snapshot()), Ok(()));
        check(&restored);
        assert!(restored.restore(&replica.snapshot()[..20]).is_err());
    }

    #[test]
    fn a_forwarded_batch_sent_again_is_applied_once_even_after_a_snapshot() {
        let mut replica = QueueReplica::default();
        let (a, b) = (message(b"a"), message(b"b"));
        let first = command(|o| encode_forwarded(o, 77, 1, [&a, &b]));
        replica.apply(1, &first);
        replica.apply(2, &first);
        assert_eq!(replica.len(), 2, "the second copy of batch 1 is skipped");
        // Another node's batch 1 is its own.
        replica.apply(3, &command(|o| encode_forwarded(o, 78, 1, [&a])));
        assert_eq!(replica.len(), 3);
        let mut restored = QueueReplica::default();
        assert_eq!(restored.restore(&replica.snapshot()), Ok(()));
        restored.apply(4, &first);
        assert_eq!(restored.len(), 3, "a restored replica remembers the batches");
        restored.apply(5, &command(|o| encode_forwarded(o, 77, 2, [&b])));
        assert_eq!(restored.len(), 4);
        let bodies: Vec<Vec<u8>> = restored.messages().iter().map(|(m, _)| m.body().to_vec()).collect();
        assert_eq!(bodies, [b"a".to_vec(), b"b".to_vec(), b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn a_snapshot_written_before_batches_had_numbers_still_restores() {
        let mut replica = QueueReplica::default();
        replica.apply(1, &command(|o| encode_enqueue(o, 5, &message(b"old"))));
        let v2 = replica.snapshot();
        // The earlier layout: the same without the marker and the batches.
        let old = [&v2[8..24], &v2[32..]].concat();
        let mut restored = QueueReplica::default();
        assert_eq!(restored.restore(&old), Ok(()));
        assert_eq!(restored.len(), 1);
        assert_eq!(restored.last_key(), 5);
    }
}
