//! Method-frame decoding. `basic.publish` and `basic.ack` (the per-message
//! methods) are decoded here without allocation; every other method goes
//! through `amq-protocol`'s generated parsers.

use bytes::Bytes;

use crate::error::CodecError;
use crate::spec::AMQPClass;

pub const CLASS_CONNECTION: u16 = 10;
pub const CLASS_CHANNEL: u16 = 20;
pub const CLASS_EXCHANGE: u16 = 40;
pub const CLASS_QUEUE: u16 = 50;
pub const CLASS_BASIC: u16 = 60;
pub const CLASS_CONFIRM: u16 = 85;
pub const CLASS_TX: u16 = 90;

pub const BASIC_PUBLISH: u16 = 40;
pub const BASIC_ACK: u16 = 80;
pub const BASIC_QOS: u16 = 10;

/// `basic.publish`, borrowing the frame's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BasicPublish {
    pub exchange: Bytes,
    pub routing_key: Bytes,
    pub mandatory: bool,
    pub immediate: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    Publish(BasicPublish),
    Ack {
        delivery_tag: u64,
        multiple: bool,
    },
    /// Decoded here because the generated codec drops `prefetch_size`.
    Qos {
        prefetch_size: u32,
        prefetch_count: u16,
        global: bool,
    },
    Other(AMQPClass),
}

/// The class and method ids at the head of a method payload.
pub fn ids(payload: &[u8]) -> (u16, u16) {
    match payload {
        [c0, c1, m0, m1, ..] => (u16::from_be_bytes([*c0, *c1]), u16::from_be_bytes([*m0, *m1])),
        _ => (0, 0),
    }
}

fn short_str(payload: &Bytes, at: usize) -> Option<(Bytes, usize)> {
    let len = *payload.get(at)? as usize;
    let end = at + 1 + len;
    if end > payload.len() {
        return None;
    }
    Some((payload.slice(at + 1..end), end))
}

fn decode_publish(payload: &Bytes) -> Option<BasicPublish> {
    // class(2) method(2) reserved-1(2)
    let (exchange, at) = short_str(payload, 6)?;
    let (routing_key, at) = short_str(payload, at)?;
    let bits = *payload.get(at)?;
    Some(BasicPublish { exchange, routing_key, mandatory: bits & 1 != 0, immediate: bits & 2 != 0 })
}

fn decode_ack(payload: &[u8]) -> Option<(u64, bool)> {
    let tag = payload.get(4..12)?;
    let bits = *payload.get(12)?;
    let tag = u64::from_be_bytes([tag[0], tag[1], tag[2], tag[3], tag[4], tag[5], tag[6], tag[7]]);
    Some((tag, bits & 1 != 0))
}

pub fn decode(payload: &Bytes) -> Result<Method, CodecError> {
    let (class_id, method_id) = ids(payload);
    if payload.len() < 4 {
        return Err(CodecError::Malformed { what: "method frame", class_id, method_id });
    }
    let malformed = |what| CodecError::Malformed { what, class_id, method_id };
    match (class_id, method_id) {
        (CLASS_BASIC, BASIC_PUBLISH) => decode_publish(payload).map(Method::Publish).ok_or(malformed("basic.publish")),
        (CLASS_BASIC, BASIC_ACK) => decode_ack(payload)
            .map(|(delivery_tag, multiple)| Method::Ack { delivery_tag, multiple })
            .ok_or(malformed("basic.ack")),
        (CLASS_BASIC, BASIC_QOS) => match payload.get(4..11) {
            Some(&[s0, s1, s2, s3, c0, c1, bits]) => Ok(Method::Qos {
                prefetch_size: u32::from_be_bytes([s0, s1, s2, s3]),
                prefetch_count: u16::from_be_bytes([c0, c1]),
                global: bits & 1 != 0,
            }),
            _ => Err(malformed("basic.qos")),
        },
        _ => match crate::spec::parse_class(&payload[..]) {
            Ok((_, class)) => Ok(Method::Other(class)),
            // Streaming parsers report a known method with short arguments as
            // incomplete; anything else is a method id we do not know.
            Err(nom::Err::Incomplete(_)) => Err(malformed("method arguments")),
            Err(_) => Err(CodecError::UnknownMethod { class_id, method_id }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;
    use crate::spec::{basic, queue};
    use amq_protocol::types::FieldTable;
    use bytes::BytesMut;

    fn payload_of(class: &AMQPClass) -> Bytes {
        let mut buf = BytesMut::new();
        encode::method(&mut buf, 1, class);
        // Skip the frame header and trailing end byte.
        buf.freeze().slice(7..).slice(..)
    }

    #[test]
    fn publish_and_ack_fast_paths_agree_with_the_generated_codec() {
        let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "ex".into(),
            routing_key: "rk.1".into(),
            mandatory: true,
            immediate: false,
        }));
        let payload = payload_of(&publish);
        let payload = payload.slice(..payload.len() - 1);
        match decode(&payload).unwrap() {
            Method::Publish(p) => {
                assert_eq!(&p.exchange[..], b"ex");
                assert_eq!(&p.routing_key[..], b"rk.1");
                assert!(p.mandatory && !p.immediate);
            }
            other => panic!("unexpected {other:?}"),
        }
        let ack = AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: 77, multiple: true }));
        let payload = payload_of(&ack);
        let payload = payload.slice(..payload.len() - 1);
        assert_eq!(decode(&payload).unwrap(), Method::Ack { delivery_tag: 77, multiple: true });
    }

    #[test]
    fn other_methods_round_trip_and_truncations_are_malformed() {
        let declare = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "q".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        }));
        let payload = payload_of(&declare);
        let payload = payload.slice(..payload.len() - 1);
        assert_eq!(decode(&payload).unwrap(), Method::Other(declare));
        for cut in 4..payload.len() - 1 {
            assert!(decode(&payload.slice(..cut)).is_err(), "cut {cut}");
        }
        let unknown = Bytes::from_static(&[0, 60, 0, 250]);
        assert_eq!(decode(&unknown), Err(CodecError::UnknownMethod { class_id: 60, method_id: 250 }));
    }
}
