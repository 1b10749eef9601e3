//! Dead-lettering as RabbitMQ does it: the copy republished to a queue's
//! dead-letter exchange carries an `x-death` history (one entry per queue
//! and reason, most recent first, with a count), `x-first-death-*` headers,
//! loses its `expiration`, and is dropped where it would cycle without a
//! client ever rejecting it.

use std::collections::BTreeMap;

use warren_codec::properties::{flag, Properties, SenderSelected};
use warren_codec::table;
use warren_codec::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

use crate::message::Message;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// `basic.reject` or `basic.nack` with `requeue=false`.
    Rejected,
    Expired,
    /// Dropped or refused by a length limit.
    Maxlen,
    /// Returned more times than `x-delivery-limit` allows.
    DeliveryLimit,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::Maxlen => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

fn key(name: &str) -> ShortString {
    ShortString::from(name)
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Where a dead-lettered copy goes.
pub struct Target<'a> {
    /// The queue the message died in.
    pub queue: &'a str,
    pub exchange: &'a str,
    /// `x-dead-letter-routing-key`, replacing the original routing keys.
    pub routing_key: Option<&'a str>,
}

/// Builds the copy of `message` to publish to the dead-letter exchange, and
/// the routing keys to publish it with (first one is its routing key).
pub fn copy(message: &Message, reason: Reason, target: &Target<'_>, now_secs: u64) -> (Message, Vec<Vec<u8>>) {
    let properties = message.properties_view();
    let decoded = properties.headers().unwrap_or_default();
    // The first routing key is the one of `basic.publish`; the others came
    // from CC (BCC never reaches a queue).
    let mut original_keys = vec![message.routing_key().to_vec()];
    original_keys.extend(SenderSelected::of(&decoded).cc);
    let mut headers: BTreeMap<ShortString, AMQPValue> = decoded.inner().clone();
    let mut info: Vec<(&str, AMQPValue)> = vec![
        ("reason", text(reason.as_str())),
        ("queue", text(target.queue)),
        ("time", AMQPValue::Timestamp(now_secs)),
        ("exchange", text(&String::from_utf8_lossy(message.exchange()))),
        (
            "routing-keys",
            AMQPValue::FieldArray(FieldArray::from(
                original_keys.iter().map(|k| text(&String::from_utf8_lossy(k))).collect::<Vec<_>>(),
            )),
        ),
    ];
    if let Some(expiration) = properties.expiration() {
        info.push(("original-expiration", text(expiration)));
    }
    let previous = match headers.get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => Some(deaths.as_slice().to_vec()),
        _ => None,
    };
    let deaths = match previous {
        None => {
            headers.insert(key("x-first-death-reason"), text(reason.as_str()));
            headers.insert(key("x-first-death-queue"), text(target.queue));
            headers.insert(key("x-first-death-exchange"), text(&String::from_utf8_lossy(message.exchange())));
            vec![AMQPValue::FieldTable(death_entry(1, &info))]
        }
        Some(deaths) => {
            let same = |death: &AMQPValue| match death {
                AMQPValue::FieldTable(t) => {
                    table::get(t, "queue").and_then(table::as_str) == Some(target.queue)
                        && table::get(t, "reason").and_then(table::as_str) == Some(reason.as_str())
                }
                _ => false,
            };
            let (matching, mut others): (Vec<AMQPValue>, Vec<AMQPValue>) = deaths.into_iter().partition(same);
            // As RabbitMQ 3.10: an earlier death in the same queue for the
            // same reason keeps its fields and counts one more, moved first.
            let entry = match matching.into_iter().next() {
                Some(AMQPValue::FieldTable(old)) => {
                    let count = table::get(&old, "count").and_then(table::as_i64).unwrap_or(0);
                    let mut entry = old.inner().clone();
                    entry.insert(key("count"), AMQPValue::LongLongInt(count.saturating_add(1)));
                    FieldTable::from(entry)
                }
                _ => death_entry(1, &info),
            };
            others.insert(0, AMQPValue::FieldTable(entry));
            others
        }
    };
    headers.insert(key("x-death"), AMQPValue::FieldArray(FieldArray::from(deaths)));
    let routing_keys = match target.routing_key {
        Some(routing_key) => {
            headers.remove("CC");
            vec![routing_key.as_bytes().to_vec()]
        }
        None => original_keys,
    };
    let mut encoded = Vec::new();
    table::encode_table(&FieldTable::from(headers), &mut encoded);
    let properties = properties.with_field(flag::HEADERS, Some(&encoded)).with_field(flag::EXPIRATION, None);
    let first = routing_keys.first().map(Vec::as_slice).unwrap_or_default();
    let mut builder = Message::builder(target.exchange.as_bytes(), first, &properties, message.body_len());
    builder.push_body(message.body());
    let mut copy = builder.finish();
    copy.persistent = message.persistent;
    (copy, routing_keys)
}

/// The CC routing keys a message was published with (kept in its headers).
pub fn cc_keys(message: &Message) -> Vec<Vec<u8>> {
    message.properties_view().sender_selected().cc
}

fn death_entry(count: i64, info: &[(&str, AMQPValue)]) -> FieldTable {
    let mut entry = FieldTable::default();
    entry.insert(key("count"), AMQPValue::LongLongInt(count));
    for (name, value) in info {
        entry.insert(key(name), value.clone());
    }
    entry
}

/// RabbitMQ's cycle rule, applied to a dead-lettered copy about to enter
/// `queue`: it cycles if `queue` is already in its `x-death` history and no
/// death between now and then was a client's rejection.
pub fn cycles(copy: &Message, queue: &str) -> bool {
    let Some(headers) = Properties::parse(bytes::Bytes::copy_from_slice(copy.properties())).and_then(|p| p.headers())
    else {
        return false;
    };
    let Some(AMQPValue::FieldArray(deaths)) = table::get(&headers, "x-death") else {
        return false;
    };
    for death in deaths.as_slice() {
        let AMQPValue::FieldTable(death) = death else {
            // Something a client put there: not a fully automatic cycle.
            return false;
        };
        if table::get(death, "reason").and_then(table::as_str) == Some(Reason::Rejected.as_str()) {
            return false;
        }
        if table::get(death, "queue").and_then(table::as_str) == Some(queue) {
            return true;
        }
    }
    false
}

/// A copy of `message` whose headers carry `x-delivery-count` (sent on
/// redelivery from queues with a delivery limit).
pub fn with_delivery_count(message: &Message, count: u64) -> Message {
    with_header(message, "x-delivery-count", AMQPValue::LongLongInt(i64::try_from(count).unwrap_or(i64::MAX)))
}

/// A copy of `message` with one header set.
pub fn with_header(message: &Message, name: &str, value: AMQPValue) -> Message {
    let properties = message.properties_view();
    let mut headers = properties.headers().unwrap_or_default();
    headers.insert(key(name), value);
    let mut encoded = Vec::new();
    table::encode_table(&headers, &mut encoded);
    let properties = properties.with_field(flag::HEADERS, Some(&encoded));
    let mut builder = Message::builder(message.exchange(), message.routing_key(), &properties, message.body_len());
    builder.push_body(message.body());
    let mut copy = builder.finish();
    copy.persistent = message.persistent;
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(properties: &Properties, routing_key: &[u8]) -> Message {
        let mut builder = Message::builder(b"orders", routing_key, properties, 2);
        builder.push_body(b"hi");
        builder.finish()
    }

    fn headers(message: &Message) -> FieldTable {
        message.properties_view().headers().unwrap()
    }

    fn deaths(message: &Message) -> Vec<FieldTable> {
        match table::get(&headers(message), "x-death") {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .iter()
                .map(|d| match d {
                    AMQPValue::FieldTable(t) => t.clone(),
                    _ => panic!("not a table"),
                })
                .collect(),
            _ => panic!("no x-death"),
        }
    }

    fn field<'a>(t: &'a FieldTable, name: &str) -> &'a str {
        table::get(t, name).and_then(table::as_str).unwrap()
    }

    #[test]
    fn first_death_records_history_and_drops_expiration() {
        let props = Properties::empty().with_field(flag::EXPIRATION, Some(b"\x0260"));
        let original = message(&props, b"rk");
        let target = Target { queue: "work", exchange: "dlx", routing_key: None };
        let (copy, keys) = copy(&original, Reason::Expired, &target, 1_700_000_000);
        assert_eq!(keys, vec![b"rk".to_vec()]);
        assert_eq!(copy.exchange(), b"dlx");
        assert_eq!(copy.expiration(), None);
        let h = headers(&copy);
        assert_eq!(field(&h, "x-first-death-reason"), "expired");
        assert_eq!(field(&h, "x-first-death-queue"), "work");
        assert_eq!(field(&h, "x-first-death-exchange"), "orders");
        let d = deaths(&copy);
        assert_eq!(d.len(), 1);
        assert_eq!(table::get(&d[0], "count").and_then(table::as_i64), Some(1));
        assert_eq!(field(&d[0], "original-expiration"), "60");
        assert_eq!(table::get(&d[0], "time"), Some(&AMQPValue::Timestamp(1_700_000_000)));
    }

    #[test]
    fn repeated_deaths_count_and_move_first_and_cycles_are_found() {
        let original = message(&Properties::empty(), b"rk");
        let a = Target { queue: "a", exchange: "", routing_key: Some("b") };
        let b = Target { queue: "b", exchange: "", routing_key: Some("a") };
        let (once, _) = copy(&original, Reason::Expired, &a, 1);
        assert!(!cycles(&once, "b"));
        assert!(cycles(&once, "a"));
        let (twice, _) = copy(&once, Reason::Expired, &b, 2);
        let (thrice, _) = copy(&twice, Reason::Expired, &a, 3);
        let d = deaths(&thrice);
        assert_eq!(d.len(), 2);
        assert_eq!(field(&d[0], "queue"), "a");
        assert_eq!(table::get(&d[0], "count").and_then(table::as_i64), Some(2));
        assert_eq!(field(&headers(&thrice), "x-first-death-queue"), "a");
        // A rejection in the history breaks the cycle rule.
        let (rejected, _) = copy(&once, Reason::Rejected, &b, 2);
        assert!(!cycles(&rejected, "a"));
    }

    #[test]
    fn a_dead_letter_routing_key_replaces_cc() {
        let mut cc = FieldTable::default();
        cc.insert(key("CC"), AMQPValue::FieldArray(FieldArray::from(vec![text("other")])));
        let mut encoded = Vec::new();
        table::encode_table(&cc, &mut encoded);
        let props = Properties::empty().with_field(flag::HEADERS, Some(&encoded));
        let original = message(&props, b"rk");
        let (kept, keys) =
            copy(&original, Reason::Rejected, &Target { queue: "q", exchange: "x", routing_key: None }, 0);
        assert_eq!(keys, vec![b"rk".to_vec(), b"other".to_vec()]);
        assert!(table::get(&headers(&kept), "CC").is_some());
        let (replaced, keys) =
            copy(&original, Reason::Rejected, &Target { queue: "q", exchange: "x", routing_key: Some("dead") }, 0);
        assert_eq!(keys, vec![b"dead".to_vec()]);
        assert_eq!(replaced.routing_key(), b"dead");
        assert!(table::get(&headers(&replaced), "CC").is_none());
        let d = deaths(&replaced);
        assert_eq!(
            table::get(&d[0], "routing-keys"),
            Some(&AMQPValue::FieldArray(FieldArray::from(vec![text("rk"), text("other")])))
        );
    }
}
