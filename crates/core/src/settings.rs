//! A queue's behaviour settings, read once from its `x-` arguments at
//! declaration and checked the way RabbitMQ checks them.

use std::sync::Arc;

use warren_codec::table;
use warren_codec::types::{AMQPValue, FieldTable};

/// What a full queue does with one more message (`x-overflow`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest messages to make room.
    #[default]
    DropHead,
    /// Refuse the new message; a publisher in confirm mode gets a nack.
    RejectPublish,
    /// As `RejectPublish`, and dead-letter the refused message.
    RejectPublishDlx,
}

/// Upper bound of `x-max-priority`, as in RabbitMQ.
pub const MAX_PRIORITY: i64 = 255;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueSettings {
    /// `x-message-ttl`, milliseconds.
    pub message_ttl: Option<u64>,
    /// `x-expires`: the queue is deleted after this many milliseconds unused.
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter_exchange: Option<Arc<str>>,
    pub dead_letter_routing_key: Option<Arc<str>>,
    /// `x-delivery-limit`: returns allowed before the message is dead-lettered.
    pub delivery_limit: Option<u64>,
    pub max_priority: Option<u8>,
    /// `x-single-active-consumer`: one consumer at a time gets messages.
    pub single_active_consumer: bool,
}

impl QueueSettings {
    /// Reads the arguments; `Err((argument, problem))` names the first bad one
    /// with RabbitMQ's description of the problem.
    pub fn from_arguments(arguments: &FieldTable) -> Result<QueueSettings, (&'static str, String)> {
        let mut settings = QueueSettings::default();
        let int = |key: &'static str| -> Result<Option<i64>, (&'static str, String)> {
            match table::get(arguments, key) {
                None => Ok(None),
                Some(value) => table::as_i64(value)
                    .map(Some)
                    .ok_or_else(|| (key, format!("{{unacceptable_type,{}}}", type_name(value)))),
            }
        };
        let non_negative = |key: &'static str| -> Result<Option<u64>, (&'static str, String)> {
            match int(key)? {
                Some(n) if n < 0 => Err((key, format!("{{value_negative,{n}}}"))),
                other => Ok(other.map(|n| n as u64)),
            }
        };
        let string = |key: &'static str| -> Result<Option<&str>, (&'static str, String)> {
            match table::get(arguments, key) {
                None => Ok(None),
                Some(value) => table::as_str(value)
                    .map(Some)
                    .ok_or_else(|| (key, format!("{{unacceptable_type,{}}}", type_name(value)))),
            }
        };
        settings.message_ttl = non_negative("x-message-ttl")?;
        settings.expires = match int("x-expires")? {
            Some(0) => return Err(("x-expires", "{value_zero,0}".into())),
            Some(n) if n < 0 => return Err(("x-expires", format!("{{value_negative,{n}}}"))),
            other => other.map(|n| n as u64),
        };
        settings.max_length = non_negative("x-max-length")?;
        settings.max_length_bytes = non_negative("x-max-length-bytes")?;
        settings.delivery_limit = non_negative("x-delivery-limit")?;
        settings.max_priority = match non_negative("x-max-priority")? {
            Some(n) if n > MAX_PRIORITY as u64 => {
                return Err(("x-max-priority", format!("{{max_value_exceeded,{n}}}")))
            }
            other => other.map(|n| n as u8),
        };
        settings.overflow = match string("x-overflow")? {
            None | Some("drop-head") => Overflow::DropHead,
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            Some(_) => return Err(("x-overflow", "invalid_overflow".into())),
        };
        settings.single_active_consumer = match table::get(arguments, "x-single-active-consumer") {
            None => false,
            Some(AMQPValue::Boolean(on)) => *on,
            Some(other) => {
                return Err(("x-single-active-consumer", format!("{{unacceptable_type,{}}}", type_name(other))))
            }
        };
        settings.dead_letter_exchange = string("x-dead-letter-exchange")?.map(Arc::from);
        settings.dead_letter_routing_key = string("x-dead-letter-routing-key")?.map(Arc::from);
        if settings.dead_letter_routing_key.is_some() && settings.dead_letter_exchange.is_none() {
            return Err(("x-dead-letter-routing-key", "routing_key_but_no_dlx_defined".into()));
        }
        Ok(settings)
    }

    /// True when messages of this queue can expire.
    pub fn has_ttl(&self) -> bool {
        self.message_ttl.is_some()
    }

    /// True when this queue needs the periodic tick (expiry of messages or
    /// of the queue itself).
    pub fn is_timed(&self) -> bool {
        self.message_ttl.is_some() || self.expires.is_some()
    }
}

fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => "longstr",
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Void => "void",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "double",
        AMQPValue::ByteArray(_) => "binary",
        _ => "long",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_codec::types::{LongString, ShortString};

    fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in pairs {
            table.insert(ShortString::from(*key), value.clone());
        }
        table
    }

    fn text(value: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(value))
    }

    #[test]
    fn reads_every_argument() {
        let settings = QueueSettings::from_arguments(&args(&[
            ("x-message-ttl", AMQPValue::LongInt(50)),
            ("x-expires", AMQPValue::ShortShortUInt(9)),
            ("x-max-length", AMQPValue::LongLongInt(2)),
            ("x-overflow", text("reject-publish-dlx")),
            ("x-dead-letter-exchange", text("dlx")),
            ("x-dead-letter-routing-key", text("dead")),
            ("x-delivery-limit", AMQPValue::ShortInt(3)),
            ("x-max-priority", AMQPValue::ShortShortUInt(10)),
        ]))
        .unwrap();
        assert_eq!(settings.message_ttl, Some(50));
        assert_eq!(settings.expires, Some(9));
        assert_eq!(settings.max_length, Some(2));
        assert_eq!(settings.overflow, Overflow::RejectPublishDlx);
        assert_eq!(settings.dead_letter_exchange.as_deref(), Some("dlx"));
        assert_eq!(settings.dead_letter_routing_key.as_deref(), Some("dead"));
        assert_eq!(settings.delivery_limit, Some(3));
        assert_eq!(settings.max_priority, Some(10));
    }

    #[test]
    fn refuses_what_rabbitmq_refuses() {
        let bad = |pairs: &[(&str, AMQPValue)]| QueueSettings::from_arguments(&args(pairs)).unwrap_err();
        assert_eq!(bad(&[("x-message-ttl", AMQPValue::LongInt(-1))]).1, "{value_negative,-1}");
        assert_eq!(bad(&[("x-expires", AMQPValue::LongInt(0))]).1, "{value_zero,0}");
        assert_eq!(bad(&[("x-max-priority", AMQPValue::LongInt(300))]).1, "{max_value_exceeded,300}");
        assert_eq!(bad(&[("x-overflow", text("bogus"))]).1, "invalid_overflow");
        assert_eq!(bad(&[("x-dead-letter-routing-key", text("k"))]).0, "x-dead-letter-routing-key");
    }
}
