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

/// `x-queue-type`. Classic and quorum queues share one implementation on
/// one node (a cluster replicates quorum queues); the type chooses
/// RabbitMQ's declare rules. A stream is a log read without being consumed
/// (`crate::stream`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
    Stream,
}

/// How a queue type refuses a declaration, in RabbitMQ's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypeRefusal {
    /// `invalid arg 'x-queue-type' … : "<problem>"`.
    UnknownType(String),
    /// `invalid arg '<key>' … of queue type rabbit_<type>_queue`.
    Argument(&'static str),
    /// `invalid property '<property>' …`.
    Property(&'static str),
}

impl QueueType {
    /// The type `x-queue-type` asks for (absent means classic).
    pub fn from_arguments(arguments: &FieldTable) -> Result<QueueType, TypeRefusal> {
        let Some(value) = table::get(arguments, "x-queue-type") else {
            return Ok(QueueType::Classic);
        };
        match table::as_str(value) {
            // A non-string is refused by the argument type check.
            None | Some("classic") => Ok(QueueType::Classic),
            Some("quorum") => Ok(QueueType::Quorum),
            Some("stream") => Ok(QueueType::Stream),
            Some(other) => Err(TypeRefusal::UnknownType(format!("\"unsupported queue type '{other}'\""))),
        }
    }

    /// RabbitMQ's module name, as its error texts give it.
    pub fn rabbitmq_name(self) -> &'static str {
        match self {
            QueueType::Classic => "rabbit_classic_queue",
            QueueType::Quorum => "rabbit_quorum_queue",
            QueueType::Stream => "rabbit_stream_queue",
        }
    }

    /// RabbitMQ's known queue arguments this type does not take (3.10).
    /// `x-delivery-limit` stays allowed on classic queues: Warren counts
    /// deliveries on every queue.
    fn unsupported(self) -> &'static [&'static str] {
        match self {
            QueueType::Classic => &[
                "x-max-age",
                "x-stream-max-segment-size-bytes",
                "x-initial-cluster-size",
                "x-stream-filter-size-bytes",
                "x-quorum-initial-group-size",
                "x-dead-letter-strategy",
                "x-queue-leader-locator",
                "x-max-in-memory-length",
                "x-max-in-memory-bytes",
            ],
            QueueType::Quorum => &[
                "x-max-age",
                "x-stream-max-segment-size-bytes",
                "x-initial-cluster-size",
                "x-stream-filter-size-bytes",
                "x-max-priority",
                "x-queue-mode",
                "x-queue-master-locator",
                "x-queue-version",
            ],
            QueueType::Stream => &[
                "x-expires",
                "x-message-ttl",
                "x-dead-letter-exchange",
                "x-dead-letter-routing-key",
                "x-max-length",
                "x-max-priority",
                "x-overflow",
                "x-queue-mode",
                "x-queue-version",
                "x-single-active-consumer",
                "x-delivery-limit",
                "x-quorum-initial-group-size",
                "x-dead-letter-strategy",
                "x-max-in-memory-length",
                "x-max-in-memory-bytes",
                "x-queue-master-locator",
            ],
        }
    }

    /// The first argument this type does not take, if any.
    pub fn unsupported_argument(self, arguments: &FieldTable) -> Option<&'static str> {
        let unsupported = self.unsupported();
        arguments.inner().keys().find_map(|key| unsupported.iter().copied().find(|u| *u == key.as_str()))
    }

    /// The arguments without those this type does not take: RabbitMQ checks
    /// the values of the others first.
    pub fn supported_arguments(self, arguments: &FieldTable) -> FieldTable {
        let unsupported = self.unsupported();
        let kept: std::collections::BTreeMap<_, _> = arguments
            .inner()
            .iter()
            .filter(|(key, _)| !unsupported.contains(&key.as_str()))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        FieldTable::from(kept)
    }

    /// The queue properties this type refuses, in RabbitMQ's order.
    pub fn check_properties(self, durable: bool, exclusive: bool, auto_delete: bool) -> Result<(), TypeRefusal> {
        if self == QueueType::Classic {
            return Ok(());
        }
        if auto_delete {
            return Err(TypeRefusal::Property("auto-delete"));
        }
        if exclusive {
            return Err(TypeRefusal::Property("exclusive-owner"));
        }
        if !durable {
            return Err(TypeRefusal::Property("non-durable"));
        }
        Ok(())
    }

    /// Values of this type's own arguments, with RabbitMQ's problem texts.
    fn check_own_arguments(self, arguments: &FieldTable) -> Result<(), (&'static str, String)> {
        if self == QueueType::Stream {
            return check_stream_arguments(arguments).map(|_| ());
        }
        if self != QueueType::Quorum {
            return Ok(());
        }
        let choice = |key: &'static str, allowed: &[&str], problem: &str| match table::get(arguments, key) {
            Some(value) if !table::as_str(value).is_some_and(|v| allowed.contains(&v)) => Err((key, problem.into())),
            _ => Ok(()),
        };
        choice("x-dead-letter-strategy", &["at-most-once", "at-least-once"], "invalid_dlx_strategy")?;
        choice("x-queue-leader-locator", &["client-local", "balanced"], "invalid_queue_locator_arg")?;
        for key in ["x-quorum-initial-group-size", "x-max-in-memory-length", "x-max-in-memory-bytes"] {
            let Some(value) = table::get(arguments, key) else { continue };
            match table::as_i64(value) {
                Some(n) if n < 0 => return Err((key, format!("{{value_negative,{n}}}"))),
                Some(_) => {}
                None => return Err((key, format!("\"expected integer, got {}\"", value_type(value)))),
            }
        }
        Ok(())
    }
}

/// A stream's own arguments, with RabbitMQ's problem texts.
pub fn check_stream_arguments(arguments: &FieldTable) -> Result<crate::stream::StreamSettings, (&'static str, String)> {
    let mut settings =
        crate::stream::StreamSettings { max_segment_bytes: crate::stream::DEFAULT_SEGMENT_BYTES, ..Default::default() };
    let positive = |key: &'static str| -> Result<Option<u64>, (&'static str, String)> {
        match table::get(arguments, key) {
            None => Ok(None),
            Some(value) => match table::as_i64(value) {
                Some(n) if n < 0 => Err((key, format!("{{value_negative,{n}}}"))),
                Some(n) => Ok(Some(n.unsigned_abs())),
                None => Err((key, format!("{{unacceptable_type,{}}}", value_type(value)))),
            },
        }
    };
    settings.max_length_bytes = positive("x-max-length-bytes")?;
    if let Some(size) = positive("x-stream-max-segment-size-bytes")? {
        // Larger ones are refused before this (their own text); 0 is taken
        // as RabbitMQ takes it: a segment per chunk.
        settings.max_segment_bytes = size.clamp(1, crate::stream::MAX_SEGMENT_BYTES);
    }
    if let Some(value) = table::get(arguments, "x-max-age") {
        let Some(text) = table::as_str(value) else {
            return Err(("x-max-age", format!("{{unacceptable_type,{}}}", value_type(value))));
        };
        // RabbitMQ 3.10 fails with an internal error on some of these
        // ("abc", "-1h"); Warren says what is wrong with all of them.
        let age = crate::stream::parse_age(text).filter(|ms| *ms > 0);
        settings.max_age_ms = Some(age.ok_or(("x-max-age", "invalid_max_age".to_string()))?);
    }
    if let Some(value) = table::get(arguments, "x-queue-leader-locator") {
        if !table::as_str(value).is_some_and(|v| v == "client-local" || v == "balanced") {
            return Err(("x-queue-leader-locator", "invalid_queue_locator_arg".into()));
        }
    }
    if let Some(value) = table::get(arguments, "x-initial-cluster-size") {
        match table::as_i64(value) {
            Some(0) => return Err(("x-initial-cluster-size", "{value_zero,0}".into())),
            Some(n) if n < 0 => return Err(("x-initial-cluster-size", format!("{{value_negative,{n}}}"))),
            _ => {}
        }
    }
    Ok(settings)
}

/// Upper bound of `x-max-priority`, as in RabbitMQ.
pub const MAX_PRIORITY: i64 = 255;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueSettings {
    pub queue_type: QueueType,
    /// `x-message-ttl`, milliseconds.
    pub message_ttl_ms: Option<u64>,
    /// `x-expires`: the queue is deleted after this many milliseconds unused.
    pub expires_ms: Option<u64>,
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
    /// `x-consumer-timeout`: milliseconds a delivery may stay unacknowledged
    /// before it is taken back.
    pub consumer_timeout_ms: Option<u64>,
    /// `x-retry-*`: rejected (or timed-out) messages come back after a
    /// growing delay instead of being dead-lettered at once.
    pub retry: Option<Retry>,
    /// `x-message-deduplication`: a message whose key was seen within the
    /// window is confirmed but not enqueued.
    pub dedup: Option<Dedup>,
}

/// Deduplication (the arguments of the RabbitMQ message-deduplication
/// plugin): the key is the `x-deduplication-header` header, else the
/// `message_id` property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dedup {
    /// `x-cache-ttl`: how long a key is remembered, milliseconds.
    pub window_ms: u64,
    /// `x-cache-size`: most keys remembered; the oldest go first.
    pub max_keys: usize,
}

/// Dedup window when `x-cache-ttl` is not given: 10 minutes.
pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 10 * 60 * 1000;
/// Most dedup keys per queue when `x-cache-size` is not given.
pub const DEFAULT_DEDUP_KEYS: usize = 1_000_000;

/// Retry with exponential backoff (`x-retry-delay`, `x-retry-multiplier`,
/// `x-retry-max-delay`, `x-retry-jitter`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Retry {
    /// Delay before the first retry, milliseconds.
    pub delay_ms: u64,
    /// Each further retry waits this many times longer.
    pub multiplier: f64,
    pub max_delay_ms: Option<u64>,
    /// Fraction (0 to 1) by which a delay is randomly shortened or
    /// lengthened, so retries of many messages spread out.
    pub jitter: f64,
}

impl Retry {
    /// The delay before retry number `attempt` (1 for the first), with
    /// `noise` in [-1, 1] scaled by the jitter.
    pub fn delay_for(&self, attempt: u64, noise: f64) -> u64 {
        let exponent = attempt.saturating_sub(1).min(1000) as i32;
        let mut delay = self.delay_ms as f64 * self.multiplier.powi(exponent);
        if let Some(max) = self.max_delay_ms {
            delay = delay.min(max as f64);
        }
        delay *= 1.0 + self.jitter * noise.clamp(-1.0, 1.0);
        if delay.is_finite() {
            // Clamped into range; float-to-integer casts saturate anyway.
            #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "clamped above")]
            let delay = delay.max(0.0).min(u64::MAX as f64) as u64;
            delay
        } else {
            u64::MAX
        }
    }
}

impl QueueSettings {
    /// Reads the arguments; `Err((argument, problem))` names the first bad one
    /// with RabbitMQ's description of the problem.
    pub fn from_arguments(arguments: &FieldTable) -> Result<QueueSettings, (&'static str, String)> {
        // An unknown type is refused (with its own text) before this is read.
        let queue_type = QueueType::from_arguments(arguments).unwrap_or_default();
        queue_type.check_own_arguments(arguments)?;
        let mut settings = QueueSettings { queue_type, ..QueueSettings::default() };
        let int = |key: &'static str| -> Result<Option<i64>, (&'static str, String)> {
            match table::get(arguments, key) {
                None => Ok(None),
                Some(value) => table::as_i64(value)
                    .map(Some)
                    .ok_or_else(|| (key, format!("{{unacceptable_type,{}}}", value_type(value)))),
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
                    .ok_or_else(|| (key, format!("{{unacceptable_type,{}}}", value_type(value)))),
            }
        };
        settings.message_ttl_ms = non_negative("x-message-ttl")?;
        settings.expires_ms = match int("x-expires")? {
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
            other => other.map(|n| u8::try_from(n).unwrap_or(u8::MAX)),
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
                return Err(("x-single-active-consumer", format!("{{unacceptable_type,{}}}", value_type(other))))
            }
        };
        let number = |key: &'static str| -> Result<Option<f64>, (&'static str, String)> {
            match table::get(arguments, key) {
                None => Ok(None),
                Some(AMQPValue::Double(d)) => Ok(Some(*d)),
                Some(AMQPValue::Float(f)) => Ok(Some(f64::from(*f))),
                Some(value) => table::as_i64(value)
                    .map(|n| Some(n as f64))
                    .ok_or_else(|| (key, format!("{{unacceptable_type,{}}}", value_type(value)))),
            }
        };
        settings.consumer_timeout_ms = non_negative("x-consumer-timeout")?;
        settings.retry = match non_negative("x-retry-delay")? {
            None => {
                for key in ["x-retry-multiplier", "x-retry-max-delay", "x-retry-jitter"] {
                    if table::get(arguments, key).is_some() {
                        return Err((key, "requires x-retry-delay".into()));
                    }
                }
                None
            }
            Some(delay) => {
                let multiplier = number("x-retry-multiplier")?.unwrap_or(2.0);
                if !(1.0..=1000.0).contains(&multiplier) {
                    return Err(("x-retry-multiplier", format!("{{value_out_of_range,{multiplier}}}")));
                }
                let jitter = number("x-retry-jitter")?.unwrap_or(0.0);
                if !(0.0..=1.0).contains(&jitter) {
                    return Err(("x-retry-jitter", format!("{{value_out_of_range,{jitter}}}")));
                }
                Some(Retry { delay_ms: delay, multiplier, max_delay_ms: non_negative("x-retry-max-delay")?, jitter })
            }
        };
        settings.dedup = match table::get(arguments, "x-message-deduplication") {
            None | Some(AMQPValue::Boolean(false)) => None,
            Some(AMQPValue::Boolean(true)) => Some(Dedup {
                window_ms: match non_negative("x-cache-ttl")? {
                    Some(0) => return Err(("x-cache-ttl", "{value_zero,0}".into())),
                    Some(ttl) => ttl,
                    None => DEFAULT_DEDUP_WINDOW_MS,
                },
                max_keys: match non_negative("x-cache-size")? {
                    Some(0) => return Err(("x-cache-size", "{value_zero,0}".into())),
                    Some(size) => usize::try_from(size).unwrap_or(usize::MAX),
                    None => DEFAULT_DEDUP_KEYS,
                },
            }),
            Some(other) => {
                return Err(("x-message-deduplication", format!("{{unacceptable_type,{}}}", value_type(other))))
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
        self.message_ttl_ms.is_some()
    }

    /// True when this queue needs the periodic tick (expiry of messages or
    /// of the queue itself).
    pub fn is_timed(&self) -> bool {
        self.message_ttl_ms.is_some() || self.expires_ms.is_some() || self.dedup.is_some()
    }

    /// The delivery acknowledgement timeout of this queue's consumers.
    pub fn consumer_timeout(&self, default: Option<u64>) -> Option<u64> {
        self.consumer_timeout_ms.or(default)
    }
}

/// RabbitMQ's name of a field value's type.
pub(crate) fn value_type(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => "longstr",
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Void => "void",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::DecimalValue(_) => "decimal",
        other => int_type(other),
    }
}

pub(crate) fn int_type(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::Timestamp(_) => "timestamp",
        _ => "long",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{table as args, text};

    fn bad_stream(pairs: &[(&str, AMQPValue)]) -> String {
        QueueSettings::from_arguments(&args(pairs)).unwrap_err().1
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
        assert_eq!(settings.message_ttl_ms, Some(50));
        assert_eq!(settings.expires_ms, Some(9));
        assert_eq!(settings.max_length, Some(2));
        assert_eq!(settings.overflow, Overflow::RejectPublishDlx);
        assert_eq!(settings.dead_letter_exchange.as_deref(), Some("dlx"));
        assert_eq!(settings.dead_letter_routing_key.as_deref(), Some("dead"));
        assert_eq!(settings.delivery_limit, Some(3));
        assert_eq!(settings.max_priority, Some(10));
    }

    #[test]
    fn retry_delays_grow_up_to_the_maximum() {
        let settings = QueueSettings::from_arguments(&args(&[
            ("x-retry-delay", AMQPValue::LongInt(100)),
            ("x-retry-multiplier", AMQPValue::Double(3.0)),
            ("x-retry-max-delay", AMQPValue::LongInt(2_000)),
            ("x-retry-jitter", AMQPValue::Double(0.5)),
        ]))
        .unwrap();
        let retry = settings.retry.unwrap();
        let delays: Vec<u64> = (1..=5).map(|n| retry.delay_for(n, 0.0)).collect();
        assert_eq!(delays, vec![100, 300, 900, 2_000, 2_000]);
        assert_eq!(retry.delay_for(1, 1.0), 150);
        assert_eq!(retry.delay_for(1, -1.0), 50);
        let bad = |pairs: &[(&str, AMQPValue)]| QueueSettings::from_arguments(&args(pairs)).unwrap_err().0;
        assert_eq!(bad(&[("x-retry-multiplier", AMQPValue::Double(2.0))]), "x-retry-multiplier");
        assert_eq!(
            bad(&[("x-retry-delay", AMQPValue::LongInt(1)), ("x-retry-jitter", AMQPValue::Double(2.0))]),
            "x-retry-jitter"
        );
    }

    #[test]
    fn queue_types_take_rabbitmq_s_arguments_and_properties() {
        let quorum = args(&[("x-queue-type", text("quorum")), ("x-max-priority", AMQPValue::LongInt(5))]);
        assert_eq!(QueueType::from_arguments(&quorum), Ok(QueueType::Quorum));
        assert_eq!(QueueType::Quorum.unsupported_argument(&quorum), Some("x-max-priority"));
        assert_eq!(QueueType::Quorum.unsupported_argument(&QueueType::Quorum.supported_arguments(&quorum)), None);
        assert_eq!(QueueType::Classic.unsupported_argument(&quorum), None);
        assert_eq!(QueueType::Quorum.check_properties(true, false, false), Ok(()));
        assert_eq!(QueueType::Quorum.check_properties(false, true, true), Err(TypeRefusal::Property("auto-delete")));
        assert_eq!(
            QueueType::Quorum.check_properties(false, true, false),
            Err(TypeRefusal::Property("exclusive-owner"))
        );
        assert_eq!(QueueType::Quorum.check_properties(false, false, false), Err(TypeRefusal::Property("non-durable")));
        assert_eq!(QueueType::Classic.check_properties(false, true, true), Ok(()));
        assert_eq!(QueueType::from_arguments(&args(&[("x-queue-type", text("stream"))])), Ok(QueueType::Stream));
        assert_eq!(QueueType::Stream.check_properties(true, false, false), Ok(()));
        assert_eq!(QueueType::Stream.check_properties(false, false, false), Err(TypeRefusal::Property("non-durable")));
        let stream = args(&[("x-queue-type", text("stream")), ("x-message-ttl", AMQPValue::LongInt(5))]);
        assert_eq!(QueueType::Stream.unsupported_argument(&stream), Some("x-message-ttl"));
        let stream_with = |key: &'static str, value: AMQPValue| [("x-queue-type", text("stream")), (key, value)];
        assert_eq!(bad_stream(&stream_with("x-max-age", text("7d"))), "invalid_max_age");
        let settings =
            check_stream_arguments(&args(&[("x-max-age", text("12h")), ("x-max-length-bytes", AMQPValue::LongInt(9))]))
                .unwrap();
        assert_eq!((settings.max_age_ms, settings.max_length_bytes), (Some(12 * 3_600_000), Some(9)));
        let bad = |pairs: &[(&str, AMQPValue)]| QueueSettings::from_arguments(&args(pairs)).unwrap_err();
        let quorum_with = |key: &'static str, value: AMQPValue| [("x-queue-type", text("quorum")), (key, value)];
        assert_eq!(bad(&quorum_with("x-dead-letter-strategy", text("bogus"))).1, "invalid_dlx_strategy");
        assert_eq!(bad(&quorum_with("x-queue-leader-locator", text("bogus"))).1, "invalid_queue_locator_arg");
        assert_eq!(bad(&quorum_with("x-quorum-initial-group-size", text("3"))).1, "\"expected integer, got longstr\"");
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
