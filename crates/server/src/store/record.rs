//! Log entries: their encoding and decoding (one byte tag, then fields;
//! little-endian integers, short strings with a length byte).

use std::sync::Arc;

use bytes::Bytes;
use warren_codec::properties::Properties;
use warren_core::vhost::{BindingDefinition, ExchangeDefinition, JournalEvent, QueueDefinition};
use warren_core::Message;

use super::definitions::Change;

pub(super) fn put_short(out: &mut Vec<u8>, value: &[u8]) {
    let len = u8::try_from(value.len()).unwrap_or(u8::MAX);
    out.push(len);
    out.extend_from_slice(&value[..usize::from(len)]);
}

pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.at..self.at + n)?;
        self.at += n;
        Some(slice)
    }
    pub(super) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(super) fn u16(&mut self) -> Option<u16> {
        self.take(2).and_then(|b| b.try_into().ok()).map(u16::from_le_bytes)
    }
    pub(super) fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }
    pub(super) fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }
    pub(super) fn short(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()? as usize;
        self.take(len)
    }
    pub(super) fn short_str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.short()?).ok()
    }
    pub(super) fn rest(&mut self) -> &'a [u8] {
        let rest = self.bytes.get(self.at..).unwrap_or_default();
        self.at = self.bytes.len();
        rest
    }
}

/// The queue list of a `P` or `M` entry: counted in a u16, or, for a
/// message routed to more durable queues than that, in a u32 under the
/// wide tag (`p`, `m`), so older logs read unchanged.
fn put_queues<Q: AsRef<str>>(out: &mut Vec<u8>, tag: u8, from: Option<u64>, vhost: &str, queues: &[Q]) {
    let narrow = u16::try_from(queues.len()).ok();
    out.push(if narrow.is_some() { tag } else { tag.to_ascii_lowercase() });
    if let Some(from) = from {
        out.extend_from_slice(&from.to_le_bytes());
    }
    put_short(out, vhost.as_bytes());
    match narrow {
        Some(count) => out.extend_from_slice(&count.to_le_bytes()),
        None => out.extend_from_slice(&u32::try_from(queues.len()).unwrap_or(u32::MAX).to_le_bytes()),
    }
    for queue in queues {
        put_short(out, queue.as_ref().as_bytes());
    }
}

pub(super) fn encode_published(out: &mut Vec<u8>, vhost: &str, message: &Message, queues: &[Arc<str>]) {
    put_queues(out, b'P', None, vhost, queues);
    encode_message(out, message);
}

/// A message as a `P` entry's tail holds it (and the spill, a page):
/// exchange, routing key, properties, arrival time, body.
pub(super) fn encode_message(out: &mut Vec<u8>, message: &Message) {
    encode_head(out, message);
    out.extend_from_slice(message.body());
}

/// A copy of a stored message (dead-lettered, or a delayed message
/// released) whose body the entry at `body_at` already holds: the tail is
/// the message as [`encode_message`] writes it without the body, then the
/// body's length.
pub(super) fn encode_linked(out: &mut Vec<u8>, vhost: &str, body_at: u64, message: &Message, queues: &[Arc<str>]) {
    put_queues(out, b'L', Some(body_at), vhost, queues);
    encode_head(out, message);
    out.extend_from_slice(&(message.body_len() as u64).to_le_bytes());
}

/// Everything of a message before its body.
fn encode_head(out: &mut Vec<u8>, message: &Message) {
    encode_head_with(out, message, message.properties());
}

fn encode_head_with(out: &mut Vec<u8>, message: &Message, properties: &[u8]) {
    put_short(out, message.exchange());
    put_short(out, message.routing_key());
    // Properties come from one content header frame: below frame_max (u32).
    let properties_len = u32::try_from(properties.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&properties_len.to_le_bytes());
    out.extend_from_slice(properties);
    out.extend_from_slice(&message.arrived().to_le_bytes());
}

/// [`encode_message`] with other properties (a stream's message, with its
/// offset header).
pub(super) fn encode_message_with(out: &mut Vec<u8>, message: &Message, properties: &[u8]) {
    encode_head_with(out, message, properties);
    out.extend_from_slice(message.body());
}

/// A live message rewritten at the head (compaction): `message` is the
/// encoded message of its old entry.
pub(super) fn encode_moved(out: &mut Vec<u8>, from: u64, vhost: &str, queues: &[Arc<str>], message: &[u8]) {
    put_queues(out, b'M', Some(from), vhost, queues);
    out.extend_from_slice(message);
}

/// Settlements in one vhost: (queue, log index of the message's `P` entry).
pub(super) fn encode_settled(out: &mut Vec<u8>, vhost: &str, settled: &[(Arc<str>, u64)]) {
    out.push(b'S');
    put_short(out, vhost.as_bytes());
    // Runs are cut at `SETTLED_RUN_MAX` entries.
    out.extend_from_slice(&u32::try_from(settled.len()).unwrap_or(u32::MAX).to_le_bytes());
    for (queue, stored) in settled {
        out.extend_from_slice(&stored.to_le_bytes());
        put_short(out, queue.as_bytes());
    }
}

/// A stored message's return count in one queue.
/// `R`, or `r` with the retry's due time (wall-clock ms) appended: logs
/// written before retries were kept read unchanged.
pub(super) fn encode_returned(
    out: &mut Vec<u8>,
    vhost: &str,
    queue: &str,
    stored: u64,
    returns: u64,
    retry_at_ms: Option<u64>,
) {
    out.push(if retry_at_ms.is_some() { b'r' } else { b'R' });
    put_short(out, vhost.as_bytes());
    put_short(out, queue.as_bytes());
    out.extend_from_slice(&stored.to_le_bytes());
    out.extend_from_slice(&returns.to_le_bytes());
    if let Some(due) = retry_at_ms {
        out.extend_from_slice(&due.to_le_bytes());
    }
}

pub(super) fn encode_deleted(out: &mut Vec<u8>, vhost: &str, queue: &str) {
    out.push(b'D');
    put_short(out, vhost.as_bytes());
    put_short(out, queue.as_bytes());
}

/// A definition change: the tag, the virtual host, then the definition as
/// JSON (rare and small, so a readable, evolvable form) or a name.
pub(super) fn encode_definition(out: &mut Vec<u8>, vhost: &str, event: &JournalEvent) -> bool {
    let (tag, body) = match event {
        JournalEvent::QueueDeclared(queue) => (b'Q', serde_json::to_vec(queue).ok()),
        JournalEvent::ExchangeDeclared(exchange) => (b'X', serde_json::to_vec(exchange).ok()),
        JournalEvent::Bound(binding) => (b'B', serde_json::to_vec(binding).ok()),
        JournalEvent::Unbound(binding) => (b'U', serde_json::to_vec(binding).ok()),
        JournalEvent::ExchangeDeleted { name } => (b'x', Some(name.as_bytes().to_vec())),
        _ => return false,
    };
    let Some(body) = body else { return false };
    out.push(tag);
    put_short(out, vhost.as_bytes());
    out.extend_from_slice(&body);
    true
}

pub(super) fn encode_vhost_deleted(out: &mut Vec<u8>, vhost: &str) {
    out.push(b'V');
    put_short(out, vhost.as_bytes());
}

/// A decoded definition entry.
pub(super) enum DefinitionRecord<'a> {
    QueueDeclared(QueueDefinition),
    ExchangeDeclared(ExchangeDefinition),
    ExchangeDeleted(&'a str),
    Bound(BindingDefinition),
    Unbound(BindingDefinition),
    VhostDeleted,
}

impl DefinitionRecord<'_> {
    pub(super) fn change(&self) -> Change<'_> {
        match self {
            DefinitionRecord::QueueDeclared(queue) => Change::QueueDeclared(queue),
            DefinitionRecord::ExchangeDeclared(exchange) => Change::ExchangeDeclared(exchange),
            DefinitionRecord::ExchangeDeleted(name) => Change::ExchangeDeleted(name),
            DefinitionRecord::Bound(binding) => Change::Bound(binding),
            DefinitionRecord::Unbound(binding) => Change::Unbound(binding),
            DefinitionRecord::VhostDeleted => Change::VhostDeleted,
        }
    }
}

pub(super) enum Record<'a> {
    /// `message`: the encoded exchange, routing key, properties and body
    /// (see [`decode_message`]); recovery does not need to build it.
    Published {
        vhost: &'a str,
        queues: Vec<&'a str>,
        message: &'a [u8],
    },
    /// A live message rewritten at the log's head by compaction: its old
    /// entry counts as settled for these queues in the same record, so a
    /// crash can never leave both copies live.
    Moved {
        from: u64,
        vhost: &'a str,
        queues: Vec<&'a str>,
        message: &'a [u8],
    },
    /// A copy whose body is in the entry at `body_at`: `head` is its
    /// encoded message up to the body, `body_len` the body's length.
    Linked {
        body_at: u64,
        vhost: &'a str,
        queues: Vec<&'a str>,
        head: &'a [u8],
        body_len: u64,
    },
    Settled {
        vhost: &'a str,
        settled: Vec<(u64, &'a str)>,
    },
    Deleted {
        vhost: &'a str,
        queue: &'a str,
    },
    Returned {
        vhost: &'a str,
        queue: &'a str,
        stored: u64,
        returns: u64,
        retry_at_ms: Option<u64>,
    },
    Definition {
        vhost: &'a str,
        record: DefinitionRecord<'a>,
    },
}

pub(super) fn decode(payload: &[u8]) -> Option<Record<'_>> {
    let mut r = Reader { bytes: payload, at: 0 };
    match r.u8()? {
        tag @ (b'P' | b'M' | b'p' | b'm' | b'L' | b'l') => {
            let from = if matches!(tag, b'M' | b'm' | b'L' | b'l') { Some(r.u64()?) } else { None };
            let vhost = r.short_str()?;
            let count = if tag.is_ascii_lowercase() { r.u32()? } else { u32::from(r.u16()?) };
            let mut queues = Vec::with_capacity(count.min(65_536) as usize);
            for _ in 0..count {
                queues.push(r.short_str()?);
            }
            let message = r.rest();
            Some(match from {
                Some(body_at) if tag.eq_ignore_ascii_case(&b'L') => {
                    let split = message.len().checked_sub(8)?;
                    let (head, len) = message.split_at(split);
                    let body_len = u64::from_le_bytes(len.try_into().ok()?);
                    Record::Linked { body_at, vhost, queues, head, body_len }
                }
                Some(from) => Record::Moved { from, vhost, queues, message },
                None => Record::Published { vhost, queues, message },
            })
        }
        b'S' => {
            let vhost = r.short_str()?;
            let count = r.u32()? as usize;
            let mut settled = Vec::with_capacity(count.min(65_536));
            for _ in 0..count {
                let stored = r.u64()?;
                settled.push((stored, r.short_str()?));
            }
            Some(Record::Settled { vhost, settled })
        }
        b'D' => Some(Record::Deleted { vhost: r.short_str()?, queue: r.short_str()? }),
        tag @ (b'R' | b'r') => {
            let (vhost, queue, stored, returns) = (r.short_str()?, r.short_str()?, r.u64()?, r.u64()?);
            let retry_at_ms = if tag == b'r' { Some(r.u64()?) } else { None };
            Some(Record::Returned { vhost, queue, stored, returns, retry_at_ms })
        }
        tag @ (b'Q' | b'X' | b'x' | b'B' | b'U' | b'V') => {
            let vhost = r.short_str()?;
            let body = r.rest();
            let record = match tag {
                b'Q' => DefinitionRecord::QueueDeclared(serde_json::from_slice(body).ok()?),
                b'X' => DefinitionRecord::ExchangeDeclared(serde_json::from_slice(body).ok()?),
                b'B' => DefinitionRecord::Bound(serde_json::from_slice(body).ok()?),
                b'U' => DefinitionRecord::Unbound(serde_json::from_slice(body).ok()?),
                b'x' => DefinitionRecord::ExchangeDeleted(std::str::from_utf8(body).ok()?),
                _ => DefinitionRecord::VhostDeleted,
            };
            Some(Record::Definition { vhost, record })
        }
        _ => None,
    }
}

/// Builds the message of a `P` entry from its encoded tail.
pub(super) fn decode_message(encoded: &[u8]) -> Option<Message> {
    let (head, body) = split_message(encoded)?;
    build_message(head, body)
}

/// An encoded message's head (everything before the body) and body.
pub(super) fn split_message(encoded: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut r = Reader { bytes: encoded, at: 0 };
    r.short()?;
    r.short()?;
    let props_len = r.u32()? as usize;
    r.take(props_len)?;
    r.u64()?;
    Some(encoded.split_at(r.at))
}

/// Builds a message from an encoded head and a body (a `P` entry's parts,
/// or an `L` entry's head and the body it refers to).
pub(super) fn build_message(head: &[u8], body: &[u8]) -> Option<Message> {
    let mut r = Reader { bytes: head, at: 0 };
    let exchange = r.short()?;
    let routing_key = r.short()?;
    let props_len = r.u32()? as usize;
    let properties = Properties::parse(Bytes::copy_from_slice(r.take(props_len)?))?;
    let arrived = r.u64()?;
    let mut builder = Message::builder(exchange, routing_key, &properties, body.len());
    builder.push_body(body);
    let message = builder.finish();
    message.set_arrived(arrived);
    Some(message)
}

/// What recovery needs of an encoded message without building it: its
/// body size (saturated to `u32`) and priority.
pub(super) fn encoded_summary(encoded: &[u8]) -> Option<(u32, u8)> {
    let mut r = Reader { bytes: encoded, at: 0 };
    r.short()?;
    r.short()?;
    let props_len = r.u32()? as usize;
    let properties = r.take(props_len)?;
    r.u64()?;
    let size = u32::try_from(r.rest().len()).unwrap_or(u32::MAX);
    Some((size, Properties::view(properties).priority().unwrap_or(0)))
}

/// The same for an `L` entry's head and body length.
pub(super) fn linked_summary(head: &[u8], body_len: u64) -> Option<(u32, u8)> {
    let (_, priority) = encoded_summary(head)?;
    Some((u32::try_from(body_len).unwrap_or(u32::MAX), priority))
}

/// Recovery keeps a message's priority in the top byte of its log index
/// (indices stay far below 2^56).
pub(super) const PRIORITY_SHIFT: u32 = 56;
pub(super) const INDEX_MASK: u64 = (1 << PRIORITY_SHIFT) - 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_routed_to_more_queues_than_a_u16_counts_round_trips() {
        let props = Properties::parse(Bytes::from_static(&[0, 0])).unwrap();
        let mut builder = Message::builder(b"fanout", b"", &props, 1);
        builder.push_body(b"x");
        let message = builder.finish();
        let queues: Vec<Arc<str>> = (0..70_000).map(|i| Arc::from(format!("q{i}"))).collect();
        let mut out = Vec::new();
        encode_published(&mut out, "/", &message, &queues);
        assert_eq!(out[0], b'p');
        let Some(Record::Published { queues: decoded, message: encoded, .. }) = decode(&out) else {
            panic!("not decoded");
        };
        assert_eq!((decoded.len(), decoded[69_999]), (70_000, "q69999"));
        assert_eq!(decode_message(encoded).map(|m| m.body().to_vec()), Some(b"x".to_vec()));
        let encoded = encoded.to_vec();
        let mut out = Vec::new();
        encode_moved(&mut out, 9, "/", &queues, &encoded);
        assert!(matches!(decode(&out), Some(Record::Moved { from: 9, queues, .. }) if queues.len() == 70_000));
        out.clear();
        encode_moved(&mut out, 9, "/", &queues[..2], &encoded);
        assert_eq!(out[0], b'M', "narrow lists keep the old tag");
    }

    #[test]
    fn records_round_trip() {
        let props = Properties::parse(Bytes::from_static(&[0x10, 0, 2])).unwrap();
        let mut builder = Message::builder(b"ex", b"rk", &props, 3);
        builder.push_body(b"abc");
        let message = builder.finish();
        let mut out = Vec::new();
        encode_published(&mut out, "/", &message, &["q1".into(), "q2".into()]);
        match decode(&out) {
            Some(Record::Published { vhost, queues, message: encoded }) => {
                assert_eq!((vhost, queues), ("/", vec!["q1", "q2"]));
                let m = decode_message(encoded).unwrap();
                assert_eq!(
                    (m.exchange(), m.routing_key(), m.properties(), m.body()),
                    (&b"ex"[..], &b"rk"[..], &[0x10, 0, 2][..], &b"abc"[..])
                );
                assert!(m.persistent);
            }
            _ => panic!("not decoded"),
        }
        out.clear();
        encode_settled(&mut out, "/", &[("q1".into(), 42), ("q2".into(), 43)]);
        match decode(&out) {
            Some(Record::Settled { vhost, settled }) => {
                assert_eq!((vhost, settled), ("/", vec![(42, "q1"), (43, "q2")]))
            }
            _ => panic!("not decoded"),
        }
        out.clear();
        encode_deleted(&mut out, "v", "q");
        assert!(matches!(decode(&out), Some(Record::Deleted { vhost: "v", queue: "q" })));
        out.clear();
        encode_returned(&mut out, "v", "q", 7, 3, None);
        assert!(matches!(
            decode(&out),
            Some(Record::Returned { vhost: "v", queue: "q", stored: 7, returns: 3, retry_at_ms: None })
        ));
        out.clear();
        encode_returned(&mut out, "v", "q", 7, 3, Some(1_700_000_000_000));
        assert!(matches!(
            decode(&out),
            Some(Record::Returned {
                vhost: "v",
                queue: "q",
                stored: 7,
                returns: 3,
                retry_at_ms: Some(1_700_000_000_000)
            })
        ));
        out.clear();
        let queue = JournalEvent::QueueDeclared(QueueDefinition {
            name: "q".into(),
            auto_delete: true,
            arguments: Default::default(),
        });
        assert!(encode_definition(&mut out, "v", &queue));
        match decode(&out) {
            Some(Record::Definition { vhost: "v", record: DefinitionRecord::QueueDeclared(q) }) => {
                assert!(q.name == "q" && q.auto_delete)
            }
            _ => panic!("not decoded"),
        }
        out.clear();
        assert!(encode_definition(&mut out, "v", &JournalEvent::ExchangeDeleted { name: "x".into() }));
        assert!(matches!(
            decode(&out),
            Some(Record::Definition { vhost: "v", record: DefinitionRecord::ExchangeDeleted("x") })
        ));
        out.clear();
        encode_vhost_deleted(&mut out, "v");
        assert!(matches!(
            decode(&out),
            Some(Record::Definition { vhost: "v", record: DefinitionRecord::VhostDeleted })
        ));
        out.clear();
        let copy = decode_message(&{
            let mut encoded = Vec::new();
            encode_message(&mut encoded, &message);
            encoded
        })
        .unwrap();
        encode_linked(&mut out, "/", 41, &copy, &["dlq".into()]);
        match decode(&out) {
            Some(Record::Linked { body_at: 41, vhost: "/", queues, head, body_len: 3 }) => {
                assert_eq!(queues, vec!["dlq"]);
                assert_eq!(linked_summary(head, 3), Some((3, 0)));
                let m = build_message(head, b"abc").unwrap();
                assert_eq!((m.exchange(), m.routing_key(), m.body()), (&b"ex"[..], &b"rk"[..], &b"abc"[..]));
            }
            _ => panic!("not decoded"),
        }
        assert!(decode(b"L\x01\x00").is_none(), "too short for its body length");
        assert!(decode(b"Zjunk").is_none());
        assert!(decode(b"P\x01").is_none());
    }
}
