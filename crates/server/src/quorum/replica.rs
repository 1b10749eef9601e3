//! A quorum queue's replicated state: every message not yet settled, by
//! the key the leader gave it, with the returns counted so far. The
//! leader's queue decides (dispatch, expiry, limits) and its journal
//! becomes this machine's commands, so every replica holds what the
//! leader held once it was committed, and a new leader starts from it.
//!
//! Bodies stay in the group's log: a replica keeps, per message, the
//! entry that holds it and its place there (about 24 bytes, packed by `kept.rs`), and reads it
//! back when asked (the leader's queue pages bodies out and reads them
//! back through [`ReplicaLoader`]). The log is kept from the oldest
//! message's entry on ([`StateMachine::keep_log_from`]), and snapshots
//! refer to entries too; a snapshot sent to a node that lacks the log
//! carries the bodies, which that node then keeps in memory until they
//! are settled. Without a log (tests), bodies are kept in memory.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use parking_lot::Mutex;
use warren_codec::properties::Properties;
use warren_core::{Message, MessageLoader};
use warren_raft::{Exporter, LogReader, Machine, StateMachine};

use super::kept::{Kept, KeptMap};

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
/// Marks a snapshot whose messages refer to log entries (or carry their
/// bytes, when the entry is not in the log).
const SNAPSHOT_V3: u64 = u64::MAX - 1;

/// Keys of forwarded messages: the leader's own keys stay below, and
/// paged-out spill references (bit 62) above.
pub(super) const FORWARDED_BIT: u64 = 1 << 61;
/// Forwarded keys written before: never paged out (the bit marks spill
/// references in a queue), still settled by key.
pub(super) const OLD_FORWARDED_BIT: u64 = 1 << 62;

/// The key of the `position`th message of the forwarded batch at log
/// `index`: the same on every replica, and never one a leader hands out.
fn forwarded_key(index: u64, position: u64) -> u64 {
    FORWARDED_BIT | ((index & 0x1FF_FFFF_FFFF) << 20) | (position & 0xF_FFFF)
}

/// A forwarded message as applied, for the leader's node to put in its
/// queue.
pub struct Applied {
    pub index: u64,
    pub message: Message,
}

#[derive(Default)]
pub struct QueueReplica {
    messages: KeptMap,
    /// Messages in no entry of this node's log: from a snapshot another
    /// node sent, or every message when there is no log.
    inline: HashMap<u64, Box<[u8]>>,
    /// The largest key a leader ever gave (a new leader goes on above it).
    last_key: u64,
    /// The log index of the last command applied.
    last_index: u64,
    /// The entry being applied and the place of its next message.
    cursor: (u64, u32),
    /// Where forwarded messages are told as they are applied.
    forwarded: Option<tokio::sync::mpsc::UnboundedSender<Applied>>,
    /// Each forwarding node's (per run) last batch applied.
    batches: BTreeMap<u64, u64>,
    /// The group's log, where the bodies are.
    log: Option<LogReader>,
    /// The last entry read back: its messages' bytes.
    cache: Mutex<Option<ReadBack>>,
}

/// An entry read back from the log: its index and its messages' bytes.
type ReadBack = (u64, Vec<Box<[u8]>>);

/// A message's key, body size, priority and returns, as the leader's queue
/// is rebuilt from them.
pub type Entry = (u64, u64, u8, u64);

/// The messages a command holds (their bytes as [`encode_message`] wrote
/// them), in order: one for `E`, each of a forwarded batch's (skipped or
/// not), none for the others. A message's place in its entry counts these
/// over the entry's commands.
fn message_records(command: &[u8]) -> Vec<&[u8]> {
    let mut rest = match command.first() {
        Some(&ENQUEUE) => return command.get(9..).into_iter().collect(),
        Some(&FORWARDED) => command.get(1..).unwrap_or_default(),
        Some(&FORWARDED_ONCE) => command.get(17..).unwrap_or_default(),
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    while let Some(len) = u64_at(rest, 0).and_then(|l| usize::try_from(l).ok()) {
        let Some(data) = rest.get(8..8 + len) else { break };
        out.push(data);
        rest = &rest[8 + len..];
    }
    out
}

/// Body size and priority of a message as [`encode_message`] wrote it.
fn measure(data: &[u8]) -> Option<(u32, u8)> {
    let mut at = 8;
    at += 1 + usize::from(*data.get(at)?);
    at += 1 + usize::from(*data.get(at)?);
    let props_len = usize::try_from(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?)).ok()?;
    let properties = data.get(at + 4..at + 4 + props_len)?;
    let body = data.len().checked_sub(at + 4 + props_len)?;
    let priority = Properties::view(properties).priority().unwrap_or(0);
    Some((u32::try_from(body).unwrap_or(u32::MAX), priority))
}

/// Every message of the entry at `index`, read from `log`.
fn read_entry(log: &LogReader, index: u64) -> Option<Vec<Box<[u8]>>> {
    let commands = log.commands(index)?;
    Some(commands.iter().flat_map(|c| message_records(c)).map(Box::from).collect())
}

/// `E`, key, then the message as `encode_message` writes it.
pub fn encode_enqueue(out: &mut Vec<u8>, key: u64, message: &Message) {
    out.push(ENQUEUE);
    out.extend_from_slice(&key.to_le_bytes());
    encode_message(out, message);
}

/// The length [`encode_enqueue`] writes.
pub fn enqueue_len(message: &Message) -> usize {
    // Kind, key, arrival, the names' two lengths, the properties' length.
    let fixed = 1 + 8 + 8 + 2 + 4;
    fixed + message.exchange().len() + message.routing_key().len() + message.properties().len() + message.body().len()
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

    /// Whether the message of this key is here (committed, not settled).
    pub fn holds(&self, key: u64) -> bool {
        self.messages.contains_key(key)
    }

    /// The place of the next message of the entry at `index`.
    fn next_at(&mut self, index: u64) -> u32 {
        if self.cursor.0 != index {
            self.cursor = (index, 0);
        }
        let at = self.cursor.1;
        self.cursor.1 = at.saturating_add(1);
        at
    }

    /// Keeps a committed message: where it is in the log, or its bytes
    /// when there is no log.
    fn keep(&mut self, key: u64, index: u64, at: u32, data: &[u8]) {
        let (size, priority) = measure(data).unwrap_or((0, 0));
        let index = if self.log.is_some() {
            index
        } else {
            self.inline.insert(key, data.into());
            0
        };
        self.messages.insert(key, Kept { index, at, size, returns: 0, priority });
    }

    fn apply_forwarded(&mut self, index: u64, command: &[u8], apply: bool) {
        for (position, data) in message_records(command).into_iter().enumerate() {
            let at = self.next_at(index);
            if !apply {
                continue;
            }
            let key = forwarded_key(index, position as u64);
            if let Some(forwarded) = &self.forwarded {
                if let Some(message) = decode_message(data) {
                    message.set_stored_index(key);
                    let _ = forwarded.send(Applied { index, message });
                }
            }
            self.keep(key, index, at, data);
        }
    }

    /// The messages in the order they were committed: key, body size,
    /// priority and returns.
    pub fn entries(&self) -> Vec<Entry> {
        self.messages
            .in_log_order()
            .into_iter()
            .map(|(key, k)| (key, u64::from(k.size), k.priority, u64::from(k.returns)))
            .collect()
    }

    /// The bytes of a kept message (from the log, or from memory).
    fn data(&self, key: u64, kept: &Kept) -> Option<Box<[u8]>> {
        if kept.index == 0 {
            return self.inline.get(&key).cloned();
        }
        let log = self.log.as_ref()?;
        let at = usize::try_from(kept.at).ok()?;
        let mut cache = self.cache.lock();
        if let Some((index, messages)) = cache.as_ref() {
            if *index == kept.index {
                return messages.get(at).cloned();
            }
        }
        let messages = read_entry(log, kept.index)?;
        let found = messages.get(at).cloned();
        *cache = Some((kept.index, messages));
        found
    }

    /// The message of this key, read back, with its key as its stored
    /// index.
    pub fn body(&self, key: u64) -> Option<Message> {
        let kept = self.messages.get(key)?;
        let data = self.data(key, &kept)?;
        let message = decode_message(&data)?;
        message.set_stored_index(key);
        Some(message)
    }

    /// The messages in key order, each read back with its key as its
    /// stored index, and its returns.
    #[cfg(test)]
    pub fn messages(&self) -> Vec<(Message, u64)> {
        let mut out = Vec::with_capacity(self.messages.len());
        for (key, kept) in self.messages.iter() {
            match self.body(key) {
                Some(message) => out.push((message, u64::from(kept.returns))),
                None => tracing::error!(key, "a replicated message cannot be read: skipped"),
            }
        }
        out
    }

    fn settle(&mut self, key: u64) {
        if let Some(kept) = self.messages.remove(key) {
            if kept.index == 0 {
                self.inline.remove(&key);
            }
        }
    }

    /// The snapshot's header: marker, last key, last index, batches.
    fn snapshot_header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&SNAPSHOT_V3.to_le_bytes());
        out.extend_from_slice(&self.last_key.to_le_bytes());
        out.extend_from_slice(&self.last_index.to_le_bytes());
        out.extend_from_slice(&(self.batches.len() as u64).to_le_bytes());
        for (origin, batch) in &self.batches {
            out.extend_from_slice(&origin.to_le_bytes());
            out.extend_from_slice(&batch.to_le_bytes());
        }
    }
}

/// One message of a snapshot: key, returns, entry index, place, size,
/// priority, then (entry index 0) the message's bytes with their length.
fn put_kept(out: &mut Vec<u8>, key: u64, kept: &Kept, data: Option<&[u8]>) {
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&u64::from(kept.returns).to_le_bytes());
    out.extend_from_slice(&kept.index.to_le_bytes());
    out.extend_from_slice(&kept.at.to_le_bytes());
    out.extend_from_slice(&kept.size.to_le_bytes());
    out.push(kept.priority);
    if kept.index == 0 {
        let data = data.unwrap_or_default();
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(data);
    }
}

/// A snapshot as read: header fields and each message with its bytes when
/// they were carried.
struct Parsed<'a> {
    last_key: u64,
    last_index: u64,
    batches: BTreeMap<u64, u64>,
    messages: Vec<(u64, Kept, Option<&'a [u8]>)>,
}

fn parse_snapshot(snapshot: &[u8]) -> Result<Parsed<'_>, String> {
    let bad = || "a quorum queue snapshot is cut short".to_string();
    let marker = u64_at(snapshot, 0);
    let v3 = marker == Some(SNAPSHOT_V3);
    let v2 = marker == Some(SNAPSHOT_V2);
    let mut at = if v2 || v3 { 8 } else { 0 };
    let last_key = u64_at(snapshot, at).ok_or_else(bad)?;
    let last_index = u64_at(snapshot, at + 8).ok_or_else(bad)?;
    at += 16;
    let mut batches = BTreeMap::new();
    if v2 || v3 {
        let count = u64_at(snapshot, at).ok_or_else(bad)?;
        at += 8;
        for _ in 0..count {
            batches.insert(u64_at(snapshot, at).ok_or_else(bad)?, u64_at(snapshot, at + 8).ok_or_else(bad)?);
            at += 16;
        }
    }
    let mut messages = Vec::new();
    while at < snapshot.len() {
        let key = u64_at(snapshot, at).ok_or_else(bad)?;
        let returns = u32::try_from(u64_at(snapshot, at + 8).ok_or_else(bad)?).unwrap_or(u32::MAX);
        if !v3 {
            // Earlier layouts carry every message's bytes.
            let len = usize::try_from(u64_at(snapshot, at + 16).ok_or_else(bad)?).map_err(|_| bad())?;
            let data = snapshot.get(at + 24..at + 24 + len).ok_or_else(bad)?;
            let (size, priority) = measure(data).unwrap_or((0, 0));
            messages.push((key, Kept { index: 0, at: 0, size, returns, priority }, Some(data)));
            at += 24 + len;
            continue;
        }
        let index = u64_at(snapshot, at + 16).ok_or_else(bad)?;
        let fields = snapshot.get(at + 24..at + 33).ok_or_else(bad)?;
        let place = u32::from_le_bytes([fields[0], fields[1], fields[2], fields[3]]);
        let size = u32::from_le_bytes([fields[4], fields[5], fields[6], fields[7]]);
        let kept = Kept { index, at: place, size, returns, priority: fields[8] };
        at += 33;
        let data = if index == 0 {
            let len = usize::try_from(u64_at(snapshot, at).ok_or_else(bad)?).map_err(|_| bad())?;
            let data = snapshot.get(at + 8..at + 8 + len).ok_or_else(bad)?;
            at += 8 + len;
            Some(data)
        } else {
            None
        };
        messages.push((key, kept, data));
    }
    Ok(Parsed { last_key, last_index, batches, messages })
}

/// Carries in `snapshot` the bytes of every message it refers to in `log`.
fn export(log: &LogReader, snapshot: &[u8]) -> Result<Vec<u8>, String> {
    let parsed = parse_snapshot(snapshot)?;
    let header = QueueReplica {
        last_key: parsed.last_key,
        last_index: parsed.last_index,
        batches: parsed.batches,
        ..QueueReplica::default()
    };
    let mut out = Vec::with_capacity(snapshot.len());
    header.snapshot_header(&mut out);
    let mut entry: Option<(u64, Vec<Box<[u8]>>)> = None;
    for (key, kept, data) in parsed.messages {
        let data: Box<[u8]> = match data {
            Some(data) => data.into(),
            None => {
                if entry.as_ref().is_none_or(|(index, _)| *index != kept.index) {
                    let read = read_entry(log, kept.index)
                        .ok_or_else(|| format!("log entry {} of a snapshot's message is gone", kept.index))?;
                    entry = Some((kept.index, read));
                }
                let place = usize::try_from(kept.at).unwrap_or(usize::MAX);
                entry
                    .as_ref()
                    .and_then(|(_, messages)| messages.get(place).cloned())
                    .ok_or_else(|| format!("a snapshot's message is not in log entry {}", kept.index))?
            }
        };
        put_kept(&mut out, key, &Kept { index: 0, at: 0, ..kept }, Some(&data));
    }
    Ok(out)
}

impl StateMachine for QueueReplica {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        self.last_index = index;
        if command.first() == Some(&FORWARDED) {
            self.apply_forwarded(index, command, true);
            return Vec::new();
        }
        if command.first() == Some(&FORWARDED_ONCE) {
            if let (Some(origin), Some(batch)) = (u64_at(command, 1), u64_at(command, 9)) {
                let last = self.batches.entry(origin).or_insert(0);
                let fresh = batch > *last;
                if fresh {
                    *last = batch;
                }
                // A batch sent again still counts its places in the entry.
                self.apply_forwarded(index, command, fresh);
            }
            return Vec::new();
        }
        let key = u64_at(command, 1);
        match (command.first(), key) {
            (Some(&ENQUEUE), Some(key)) => {
                let data = command.get(9..).unwrap_or_default();
                let at = self.next_at(index);
                self.keep(key, index, at, data);
                self.last_key = self.last_key.max(key);
            }
            (Some(&SETTLE), Some(key)) => self.settle(key),
            (Some(&RETURN), Some(key)) => {
                if let Some(returns) = u64_at(command, 9) {
                    self.messages.set_returns(key, u32::try_from(returns).unwrap_or(u32::MAX));
                }
            }
            // Commands are written by this module only: a replica that
            // cannot read one ignores it, as every replica does.
            _ => tracing::error!(len = command.len(), "unreadable quorum queue command ignored"),
        }
        Vec::new()
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.messages.len() * 33);
        self.snapshot_header(&mut out);
        for (key, kept) in self.messages.iter() {
            let data = (kept.index == 0).then(|| self.inline.get(&key)).flatten();
            put_kept(&mut out, key, &kept, data.map(|d| &d[..]));
        }
        out
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let parsed = parse_snapshot(snapshot)?;
        let mut messages = KeptMap::default();
        let mut inline = HashMap::new();
        for (key, kept, data) in parsed.messages {
            if let (0, Some(data)) = (kept.index, data) {
                inline.insert(key, Box::from(data));
            }
            messages.insert(key, kept);
        }
        self.messages = messages;
        self.inline = inline;
        self.last_key = parsed.last_key;
        self.last_index = parsed.last_index;
        self.batches = parsed.batches;
        self.cursor = (0, 0);
        *self.cache.lock() = None;
        Ok(())
    }

    fn attach(&mut self, log: LogReader) {
        self.log = Some(log);
    }

    fn keep_log_from(&self) -> Option<u64> {
        self.messages.oldest_entry()
    }

    fn exporter(&self) -> Option<Exporter> {
        let log = self.log.clone()?;
        Some(Box::new(move |snapshot: Vec<u8>| export(&log, &snapshot)))
    }
}

/// Reads a quorum queue's bodies back for the leader's queue, which pages
/// them out once its replica holds them.
pub struct ReplicaLoader(pub Machine<QueueReplica>);

impl MessageLoader for ReplicaLoader {
    fn load(&self, stored: u64) -> Option<Message> {
        self.0.with(|replica| replica.body(stored))
    }

    fn readable_upto(&self) -> u64 {
        0
    }

    fn can_page(&self, stored: u64) -> bool {
        stored & OLD_FORWARDED_BIT == 0 && self.0.with(|replica| replica.holds(stored))
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
        let mut written = Vec::new();
        encode_enqueue(&mut written, 7, &first);
        assert_eq!(enqueue_len(&first), written.len(), "the length a deferred enqueue is batched by");
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
    fn snapshots_of_the_earlier_layouts_still_restore() {
        let mut data = Vec::new();
        encode_message(&mut data, &message(b"old"));
        // Last key, last index, then key, returns, length and bytes.
        let entry = [&5u64.to_le_bytes()[..], &2u64.to_le_bytes(), &(data.len() as u64).to_le_bytes(), &data].concat();
        let v1 = [&5u64.to_le_bytes()[..], &1u64.to_le_bytes(), &entry].concat();
        // The same after a marker and the batches (one: origin 9, batch 4).
        let v2 = [
            &SNAPSHOT_V2.to_le_bytes()[..],
            &v1[..16],
            &1u64.to_le_bytes(),
            &9u64.to_le_bytes(),
            &4u64.to_le_bytes(),
            &entry,
        ]
        .concat();
        for old in [v1, v2] {
            let mut restored = QueueReplica::default();
            assert_eq!(restored.restore(&old), Ok(()));
            assert_eq!(restored.len(), 1);
            assert_eq!(restored.last_key(), 5);
            assert_eq!(restored.entries(), vec![(5, 3, 0, 2)], "key, size, priority, returns");
            let body = restored.body(5).map(|m| m.body().to_vec());
            assert_eq!(body.as_deref(), Some(&b"old"[..]));
            // Written again in the current layout, it reads the same.
            let mut again = QueueReplica::default();
            assert_eq!(again.restore(&restored.snapshot()), Ok(()));
            assert_eq!(again.entries(), restored.entries());
        }
    }

    #[test]
    fn places_in_an_entry_count_every_message_of_its_commands() {
        let (a, b, c) = (message(b"a"), message(b"bb"), message(b"ccc"));
        // One entry: a forwarded batch of two, a settle, an enqueue, and the
        // same batch sent again (skipped, but its places count).
        let batch = command(|o| encode_forwarded(o, 7, 1, [&a, &b]));
        let commands = [batch.clone(), command(|o| encode_settle(o, 99)), command(|o| encode_enqueue(o, 3, &c)), batch];
        let mut replica = QueueReplica::default();
        for command in &commands {
            replica.apply(10, command);
        }
        let places: Vec<u32> = replica.messages.iter().map(|(_, k)| k.at).collect();
        let records: Vec<Vec<u8>> = commands.iter().flat_map(|c| message_records(c)).map(<[u8]>::to_vec).collect();
        assert_eq!(records.len(), 5);
        for (key, kept) in replica.messages.iter() {
            let data = replica.inline.get(&key).map(|d| d.to_vec());
            assert_eq!(data.as_ref(), records.get(kept.at as usize), "key {key} at place {}", kept.at);
        }
        assert_eq!(places.len(), 3);
        // Sizes and priorities come from the bytes.
        let sizes: Vec<u64> = replica.entries().iter().map(|e| e.1).collect();
        assert_eq!(sizes, [3, 1, 2]);
    }
}
