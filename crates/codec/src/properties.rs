//! Content-header properties of class `basic`, kept as the publisher's raw
//! bytes (flags word followed by the present fields) and read lazily.
//!
//! Invariant: a `Properties` value has been validated once on arrival, so
//! accessors never fail on its bytes; consumers receive exactly these bytes.

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
pub struct Properties {
    raw: Bytes,
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

impl Properties {
    /// Validates raw property bytes (flags and fields). Returns `None` for
    /// anything malformed, including trailing garbage.
    pub fn parse(raw: Bytes) -> Option<Properties> {
        let flags = u16::from_be_bytes([*raw.first()?, *raw.get(1)?]);
        if flags & 0b11 != 0 {
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

    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    pub fn flags(&self) -> u16 {
        match self.raw.get(..2) {
            Some(&[high, low]) => u16::from_be_bytes([high, low]),
            _ => 0,
        }
    }

    /// The encoded bytes of one field, if present.
    fn field(&self, wanted: u16) -> Option<&[u8]> {
        let flags = self.flags();
        if flags & wanted == 0 {
            return None;
        }
        let mut at = 2;
        for (bit, kind) in FIELDS {
            if flags & bit == 0 {
                continue;
            }
            let len = field_len(kind, self.raw.get(at..)?)?;
            if bit == wanted {
                return self.raw.get(at..at + len);
            }
            at += len;
        }
        None
    }

    fn short_str(&self, wanted: u16) -> Option<&str> {
        self.field(wanted).and_then(|f| std::str::from_utf8(&f[1..]).ok())
    }

    pub fn delivery_mode(&self) -> Option<u8> {
        self.field(flag::DELIVERY_MODE).map(|f| f[0])
    }

    pub fn priority(&self) -> Option<u8> {
        self.field(flag::PRIORITY).map(|f| f[0])
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

    /// A copy with one field replaced (or added, or removed with `None`),
    /// every other byte kept as it was.
    pub fn with_field(&self, wanted: u16, encoded: Option<&[u8]>) -> Properties {
        let flags = self.flags();
        let new_flags = match encoded {
            Some(_) => flags | wanted,
            None => flags & !wanted,
        };
        let mut out = Vec::with_capacity(self.raw.len() + encoded.map_or(0, <[u8]>::len));
        out.put_u16(new_flags);
        let mut at = 2;
        for (bit, kind) in FIELDS {
            let old = if flags & bit != 0 {
                let len = field_len(kind, self.raw.get(at..).unwrap_or_default()).unwrap_or(0);
                let slice = self.raw.get(at..at + len).unwrap_or_default();
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
        let len = bytes.len().min(255);
        let mut encoded = Vec::with_capacity(len + 1);
        encoded.push(len as u8);
        encoded.extend_from_slice(&bytes[..len]);
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
    fn rejects_truncated_and_trailing_bytes() {
        let raw = build(&[(flag::CONTENT_TYPE, b"\x04text")]);
        assert!(Properties::parse(raw.slice(..raw.len() - 1)).is_none());
        let mut longer = raw.to_vec();
        longer.push(0);
        assert!(Properties::parse(Bytes::from(longer)).is_none());
        assert!(Properties::parse(Bytes::from_static(&[0])).is_none());
    }
}
