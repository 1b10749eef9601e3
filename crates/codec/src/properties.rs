//! Content-header properties of class `basic`, kept as the publisher's raw
//! bytes (flags word followed by the present fields) and read lazily. The
//! one place that knows the property layout: the rest of the broker reads
//! fields through [`Properties`], owned (`Bytes`) or borrowed (a view of a
//! stored message's bytes, no copy).
//!
//! Invariant: property bytes are validated once on arrival ([`Properties::parse`]),
//! so accessors never fail on them; every accessor is bounds-checked all the
//! same and answers `None` on malformed bytes. Consumers receive exactly
//! these bytes.

use bytes::{BufMut, Bytes};

use crate::table::validate_table;

/// Flag bits, in wire order (bit 15 first).
pub mod flag {
    pub const CONTENT_TYPE: u16 = 1 << 15;
    pub const CONTENT_ENCODING: u16 = 1 << 14;
    pub const HEADERS: u16 = 1 << 13;
    pub const DELIVERY_MODE: u16 = 1 << 12;
    pub const PRIORITY: u16 = 1 << 11;
    pub const CORRELATION_ID: u16 = 1 << 10;
    pub const REPLY_TO: u16 = 1 << 9;
    pub const EXPIRATION: u16 = 1 << 8;
    pub const MESSAGE_ID: u16 = 1 << 7;
    pub const TIMESTAMP: u16 = 1 << 6;
    pub const TYPE: u16 = 1 << 5;
    pub const USER_ID: u16 = 1 << 4;
    pub const APP_ID: u16 = 1 << 3;
    pub const CLUSTER_ID: u16 = 1 << 2;
}

#[derive(Clone, Copy)]
enum FieldKind {
    ShortStr,
    Table,
    Octet,
    Timestamp,
}

const FIELDS: [(u16, FieldKind); 14] = [
    (flag::CONTENT_TYPE, FieldKind::ShortStr),
    (flag::CONTENT_ENCODING, FieldKind::ShortStr),
    (flag::HEADERS, FieldKind::Table),
    (flag::DELIVERY_MODE, FieldKind::Octet),
    (flag::PRIORITY, FieldKind::Octet),
    (flag::CORRELATION_ID, FieldKind::ShortStr),
    (flag::REPLY_TO, FieldKind::ShortStr),
    (flag::EXPIRATION, FieldKind::ShortStr),
    (flag::MESSAGE_ID, FieldKind::ShortStr),
    (flag::TIMESTAMP, FieldKind::Timestamp),
    (flag::TYPE, FieldKind::ShortStr),
    (flag::USER_ID, FieldKind::ShortStr),
    (flag::APP_ID, FieldKind::ShortStr),
    (flag::CLUSTER_ID, FieldKind::ShortStr),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Properties<B = Bytes> {
    raw: B,
}

/// The flags word of raw property bytes (0 when too short).
pub fn flags_of(raw: &[u8]) -> u16 {
    match raw.get(..2) {
        Some(&[high, low]) => u16::from_be_bytes([high, low]),
        _ => 0,
    }
}

fn field_len(kind: FieldKind, bytes: &[u8]) -> Option<usize> {
    match kind {
        FieldKind::ShortStr => {
            let len = *bytes.first()? as usize;
            bytes.get(..1 + len)?;
            Some(1 + len)
        }
        FieldKind::Table => validate_table(bytes),
        FieldKind::Octet => bytes.first().map(|_| 1),
        FieldKind::Timestamp => bytes.get(..8).map(|_| 8),
    }
}

/// RabbitMQ's sender-selected distribution: extra routing keys given in
/// the `CC` and `BCC` headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SenderSelected {
    pub cc: Vec<Vec<u8>>,
    pub bcc: Vec<Vec<u8>>,
}

impl SenderSelected {
    pub fn is_empty(&self) -> bool {
        self.cc.is_empty() && self.bcc.is_empty()
    }
}

impl SenderSelected {
    /// The keys of decoded headers.
    pub fn of(headers: &amq_protocol::types::FieldTable) -> SenderSelected {
        SenderSelected { cc: string_array(headers, "CC"), bcc: string_array(headers, "BCC") }
    }
}

fn string_array(headers: &amq_protocol::types::FieldTable, name: &str) -> Vec<Vec<u8>> {
    match crate::table::get(headers, name) {
        Some(amq_protocol::types::AMQPValue::FieldArray(array)) => {
            array.as_slice().iter().filter_map(crate::table::as_str).map(|k| k.as_bytes().to_vec()).collect()
        }
        _ => Vec::new(),
    }
}

impl Properties<Bytes> {
    /// Validates raw property bytes (flags and fields). Returns `None` for
    /// anything malformed, including trailing garbage.
    pub fn parse(raw: Bytes) -> Option<Properties> {
        let flags = flags_of(&raw);
        if raw.len() < 2 || flags & 0b11 != 0 {
            // Bit 0 would announce a second flags word; class basic has no
            // properties beyond the fourteen above, and bit 1 is unused.
            return None;
        }
        let mut at = 2;
        for (bit, kind) in FIELDS {
            if flags & bit != 0 {
                at += field_len(kind, raw.get(at..)?)?;
            }
        }
        (at == raw.len()).then_some(Properties { raw })
    }

    /// Properties with no field set.
    pub fn empty() -> Properties {
        Properties { raw: Bytes::from_static(&[0, 0]) }
    }
}

impl<'a> Properties<&'a [u8]> {
    /// A view of property bytes validated earlier (a stored message's): no
    /// copy, no validation.
    pub fn view(raw: &'a [u8]) -> Properties<&'a [u8]> {
        Properties { raw }
    }
}

impl<B: AsRef<[u8]>> Properties<B> {
    pub fn as_bytes(&self) -> &[u8] {
        self.raw.as_ref()
    }

    pub fn flags(&self) -> u16 {
        flags_of(self.as_bytes())
    }

    /// Whether the field with this flag bit is present.
    pub fn has(&self, wanted: u16) -> bool {
        self.flags() & wanted != 0
    }

    /// The encoded bytes of one field, if present.
    fn field(&self, wanted: u16) -> Option<&[u8]> {
        let flags = self.flags();
        if flags & wanted == 0 {
            return None;
        }
        let raw = self.as_bytes();
        let mut at = 2;
        for (bit, kind) in FIELDS {
            if flags & bit == 0 {
                continue;
            }
            let len = field_len(kind, raw.get(at..)?)?;
            if bit == wanted {
                return raw.get(at..at + len);
            }
            at += len;
        }
        None
    }

    /// A short-string field (`content_type`, `app_id`, … by their flag).
    pub fn short_str(&self, wanted: u16) -> Option<&str> {
        self.field(wanted).and_then(|f| std::str::from_utf8(f.get(1..)?).ok())
    }

    /// The `timestamp` field, seconds since the epoch.
    pub fn timestamp(&self) -> Option<u64> {
        self.field(flag::TIMESTAMP).and_then(|f| f.try_into().ok()).map(u64::from_be_bytes)
    }

    pub fn delivery_mode(&self) -> Option<u8> {
        self.field(flag::DELIVERY_MODE).and_then(|f| f.first().copied())
    }

    pub fn priority(&self) -> Option<u8> {
        self.field(flag::PRIORITY).and_then(|f| f.first().copied())
    }

    pub fn expiration(&self) -> Option<&str> {
        self.short_str(flag::EXPIRATION)
    }

    pub fn reply_to(&self) -> Option<&str> {
        self.short_str(flag::REPLY_TO)
    }

    pub fn correlation_id(&self) -> Option<&str> {
        self.short_str(flag::CORRELATION_ID)
    }

    pub fn message_id(&self) -> Option<&str> {
        self.short_str(flag::MESSAGE_ID)
    }

    pub fn user_id(&self) -> Option<&str> {
        self.short_str(flag::USER_ID)
    }

    /// The headers table, length prefix included.
    pub fn headers_raw(&self) -> Option<&[u8]> {
        self.field(flag::HEADERS)
    }

    pub fn headers(&self) -> Option<amq_protocol::types::FieldTable> {
        self.headers_raw().and_then(crate::table::parse_table)
    }

    /// The `CC` and `BCC` routing keys. The headers are decoded only when
    /// their raw bytes name one of the two (most messages have neither).
    pub fn sender_selected(&self) -> SenderSelected {
        let Some(raw) = self.headers_raw() else {
            return SenderSelected::default();
        };
        let mentions = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
        if !mentions(b"\x02CC") && !mentions(b"\x03BCC") {
            return SenderSelected::default();
        }
        self.headers().map(|headers| SenderSelected::of(&headers)).unwrap_or_default()
    }

    /// A copy without the header `name` (the headers re-encoded), or `None`
    /// when there is no such header.
    pub fn without_header(&self, name: &str) -> Option<Properties> {
        let headers = self.headers()?;
        crate::table::get(&headers, name)?;
        let kept: std::collections::BTreeMap<_, _> =
            headers.inner().iter().filter(|(k, _)| k.as_str() != name).map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut encoded = Vec::new();
        crate::table::encode_table(&amq_protocol::types::FieldTable::from(kept), &mut encoded);
        Some(self.with_field(flag::HEADERS, Some(&encoded)))
    }

    /// A copy with one field replaced (or added, or removed with `None`),
    /// every other byte kept as it was.
    pub fn with_field(&self, wanted: u16, encoded: Option<&[u8]>) -> Properties {
        let flags = self.flags();
        let raw = self.as_bytes();
        let new_flags = match encoded {
            Some(_) => flags | wanted,
            None => flags & !wanted,
        };
        let mut out = Vec::with_capacity(raw.len() + encoded.map_or(0, <[u8]>::len));
        out.put_u16(new_flags);
        let mut at = 2;
        for (bit, kind) in FIELDS {
            let old = if flags & bit != 0 {
                let len = field_len(kind, raw.get(at..).unwrap_or_default()).unwrap_or(0);
                let slice = raw.get(at..at + len).unwrap_or_default();
                at += len;
                Some(slice)
            } else {
                None
            };
            if bit == wanted {
                if let Some(new) = encoded {
                    out.extend_from_slice(new);
                }
            } else if let Some(old) = old {
                out.extend_from_slice(old);
            }
        }
        Properties { raw: Bytes::from(out) }
    }

    /// A copy with `reply_to` set to `value`.
    pub fn with_reply_to(&self, value: &str) -> Properties {
        let bytes = value.as_bytes();
        let len = u8::try_from(bytes.len()).unwrap_or(u8::MAX);
        let mut encoded = Vec::with_capacity(usize::from(len) + 1);
        encoded.push(len);
        encoded.extend_from_slice(&bytes[..usize::from(len)]);
        self.with_field(flag::REPLY_TO, Some(&encoded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(fields: &[(u16, &[u8])]) -> Bytes {
        let flags = fields.iter().fold(0u16, |acc, (bit, _)| acc | bit);
        let mut out = flags.to_be_bytes().to_vec();
        for (bit, _) in FIELDS {
            if let Some((_, bytes)) = fields.iter().find(|(b, _)| *b == bit) {
                out.extend_from_slice(bytes);
            }
        }
        Bytes::from(out)
    }

    #[test]
    fn reads_fields_and_rewrites_reply_to_keeping_the_rest() {
        let raw = build(&[
            (flag::CONTENT_TYPE, b"\x04text"),
            (flag::DELIVERY_MODE, &[2]),
            (flag::PRIORITY, &[7]),
            (flag::REPLY_TO, b"\x02rq"),
            (flag::TIMESTAMP, &[0, 0, 0, 0, 0, 0, 0, 9]),
        ]);
        let props = Properties::parse(raw).unwrap();
        assert_eq!(props.delivery_mode(), Some(2));
        assert_eq!(props.priority(), Some(7));
        assert_eq!(props.reply_to(), Some("rq"));
        assert_eq!(props.expiration(), None);
        let rewritten = props.with_reply_to("amq.rabbitmq.reply-to.abc");
        assert_eq!(rewritten.reply_to(), Some("amq.rabbitmq.reply-to.abc"));
        assert_eq!(rewritten.delivery_mode(), Some(2));
        assert_eq!(rewritten.field(flag::CONTENT_TYPE), Some(&b"\x04text"[..]));
        assert!(Properties::parse(Bytes::copy_from_slice(rewritten.as_bytes())).is_some());
    }

    #[test]
    fn cc_and_bcc_are_read_and_bcc_removed_in_place() {
        let mut headers = amq_protocol::types::FieldTable::default();
        let keys = |names: &[&str]| {
            amq_protocol::types::AMQPValue::FieldArray(
                names
                    .iter()
                    .map(|n| amq_protocol::types::AMQPValue::LongString((*n).into()))
                    .collect::<Vec<_>>()
                    .into(),
            )
        };
        headers.insert("CC".into(), keys(&["a", "b"]));
        headers.insert("BCC".into(), keys(&["secret"]));
        headers.insert("other".into(), amq_protocol::types::AMQPValue::LongInt(1));
        let mut encoded = Vec::new();
        crate::table::encode_table(&headers, &mut encoded);
        let props = Properties::parse(build(&[(flag::HEADERS, &encoded), (flag::PRIORITY, &[4])])).unwrap();
        let view = Properties::view(props.as_bytes());
        assert_eq!(view.priority(), Some(4));
        let selected = view.sender_selected();
        assert_eq!(selected.cc, vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(selected.bcc, vec![b"secret".to_vec()]);
        let stripped = view.without_header("BCC").unwrap();
        assert_eq!(stripped.priority(), Some(4));
        assert!(stripped.sender_selected().bcc.is_empty());
        assert_eq!(stripped.sender_selected().cc.len(), 2);
        assert!(stripped.without_header("BCC").is_none());
        assert!(Properties::parse(Bytes::copy_from_slice(stripped.as_bytes())).is_some());
        assert!(Properties::empty().sender_selected().is_empty());
    }

    #[test]
    fn rejects_truncated_and_trailing_bytes() {
        let raw = build(&[(flag::CONTENT_TYPE, b"\x04text")]);
        assert!(Properties::parse(raw.slice(..raw.len() - 1)).is_none());
        let mut longer = raw.to_vec();
        longer.push(0);
        assert!(Properties::parse(Bytes::from(longer)).is_none());
        assert!(Properties::parse(Bytes::from_static(&[0])).is_none());
    }
}
