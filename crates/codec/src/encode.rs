//! Frame encoding into a caller's buffer. Per-message frames (deliver,
//! get-ok, ack/nack, content header and body) are written by hand so that
//! the delivery path appends bytes and never allocates.

use bytes::{BufMut, BytesMut};

use crate::frame::{FrameKind, FRAME_END, FRAME_OVERHEAD};
use crate::method::{CLASS_BASIC, CLASS_CHANNEL};
use crate::spec::{gen_class, AMQPClass};

/// Writes a method frame whose payload `write` appends.
#[inline]
fn method_frame(buf: &mut BytesMut, channel: u16, write: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(FrameKind::Method as u8);
    buf.put_u16(channel);
    let size_at = buf.len();
    buf.put_u32(0);
    let start = buf.len();
    write(buf);
    // A method frame's arguments are a few short strings and a field table
    // the broker built: far below 4 GiB.
    let size = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
    buf[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
    buf.put_u8(FRAME_END);
}

#[inline]
fn put_short_str(buf: &mut BytesMut, value: &[u8]) {
    let len = u8::try_from(value.len()).unwrap_or(u8::MAX);
    buf.put_u8(len);
    buf.put_slice(&value[..usize::from(len)]);
}

/// Any method, through the generated codec.
pub fn method(buf: &mut BytesMut, channel: u16, class: &AMQPClass) {
    let mut out = Vec::with_capacity(64);
    // Generation into a Vec only fails on a generator bug; a frame with an
    // empty payload then makes the peer close the connection, loudly.
    if let Ok(bytes) = cookie_factory::gen_simple(gen_class(class), std::mem::take(&mut out)) {
        out = bytes;
    }
    method_frame(buf, channel, |buf| buf.put_slice(&out));
}

/// `basic.deliver`.
#[inline]
pub fn basic_deliver(
    buf: &mut BytesMut,
    channel: u16,
    consumer_tag: &[u8],
    delivery_tag: u64,
    redelivered: bool,
    exchange: &[u8],
    routing_key: &[u8],
) {
    method_frame(buf, channel, |buf| {
        buf.put_u16(CLASS_BASIC);
        buf.put_u16(60);
        put_short_str(buf, consumer_tag);
        buf.put_u64(delivery_tag);
        buf.put_u8(u8::from(redelivered));
        put_short_str(buf, exchange);
        put_short_str(buf, routing_key);
    });
}

/// `basic.get-ok`.
pub fn basic_get_ok(
    buf: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &[u8],
    routing_key: &[u8],
    message_count: u32,
) {
    method_frame(buf, channel, |buf| {
        buf.put_u16(CLASS_BASIC);
        buf.put_u16(71);
        buf.put_u64(delivery_tag);
        buf.put_u8(u8::from(redelivered));
        put_short_str(buf, exchange);
        put_short_str(buf, routing_key);
        buf.put_u32(message_count);
    });
}

/// `basic.return`.
pub fn basic_return(
    buf: &mut BytesMut,
    channel: u16,
    reply_code: u16,
    reply_text: &str,
    exchange: &[u8],
    routing_key: &[u8],
) {
    method_frame(buf, channel, |buf| {
        buf.put_u16(CLASS_BASIC);
        buf.put_u16(50);
        buf.put_u16(reply_code);
        put_short_str(buf, reply_text.as_bytes());
        put_short_str(buf, exchange);
        put_short_str(buf, routing_key);
    });
}

/// `basic.ack` (publisher confirm, or the client side of a consumer ack).
#[inline]
pub fn basic_ack(buf: &mut BytesMut, channel: u16, delivery_tag: u64, multiple: bool) {
    method_frame(buf, channel, |buf| {
        buf.put_u16(CLASS_BASIC);
        buf.put_u16(80);
        buf.put_u64(delivery_tag);
        buf.put_u8(u8::from(multiple));
    });
}

/// `basic.nack`.
pub fn basic_nack(buf: &mut BytesMut, channel: u16, delivery_tag: u64, multiple: bool, requeue: bool) {
    method_frame(buf, channel, |buf| {
        buf.put_u16(CLASS_BASIC);
        buf.put_u16(120);
        buf.put_u64(delivery_tag);
        buf.put_u8(u8::from(multiple) | (u8::from(requeue) << 1));
    });
}

/// `basic.publish` (used by the load generator).
pub fn basic_publish(buf: &mut BytesMut, channel: u16, exchange: &[u8], routing_key: &[u8], mandatory: bool) {
    method_frame(buf, channel, |buf| {
        buf.put_u16(CLASS_BASIC);
        buf.put_u16(40);
        buf.put_u16(0);
        put_short_str(buf, exchange);
        put_short_str(buf, routing_key);
        buf.put_u8(u8::from(mandatory));
    });
}

/// `basic.cancel` sent by the server (consumer_cancel_notify).
pub fn basic_cancel(buf: &mut BytesMut, channel: u16, consumer_tag: &[u8]) {
    method_frame(buf, channel, |buf| {
        buf.put_u16(CLASS_BASIC);
        buf.put_u16(30);
        put_short_str(buf, consumer_tag);
        buf.put_u8(1); // nowait: the client does not answer
    });
}

/// `channel.close`.
pub fn channel_close(
    buf: &mut BytesMut,
    channel: u16,
    reply_code: u16,
    reply_text: &str,
    class_id: u16,
    method_id: u16,
) {
    method_frame(buf, channel, |buf| {
        buf.put_u16(CLASS_CHANNEL);
        buf.put_u16(40);
        buf.put_u16(reply_code);
        put_short_str(buf, reply_text.as_bytes());
        buf.put_u16(class_id);
        buf.put_u16(method_id);
    });
}

/// A content header frame followed by body frames no larger than
/// `frame_max`. `properties` are the raw flags-and-fields bytes.
#[inline]
pub fn content(buf: &mut BytesMut, channel: u16, properties: &[u8], body: &[u8], frame_max: u32) {
    let header_size = 12 + properties.len();
    buf.reserve(FRAME_OVERHEAD * 2 + header_size + body.len());
    buf.put_u8(FrameKind::Header as u8);
    buf.put_u16(channel);
    // Properties came from one content header frame (below frame_max).
    buf.put_u32(u32::try_from(header_size).unwrap_or(u32::MAX));
    buf.put_u16(CLASS_BASIC);
    buf.put_u16(0);
    buf.put_u64(body.len() as u64);
    buf.put_slice(properties);
    buf.put_u8(FRAME_END);
    let chunk_max = (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
    for chunk in body.chunks(chunk_max) {
        buf.put_u8(FrameKind::Body as u8);
        buf.put_u16(channel);
        // At most frame_max bytes, a u32.
        buf.put_u32(u32::try_from(chunk.len()).unwrap_or(u32::MAX));
        buf.put_slice(chunk);
        buf.put_u8(FRAME_END);
    }
}

pub fn heartbeat(buf: &mut BytesMut) {
    buf.put_slice(&[FrameKind::Heartbeat as u8, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameDecoder;
    use crate::method::{decode, Method};
    use crate::spec::basic;

    #[test]
    fn hand_written_frames_parse_with_the_generated_codec() {
        let mut buf = BytesMut::new();
        basic_deliver(&mut buf, 3, b"ctag", 9, true, b"ex", b"rk");
        basic_get_ok(&mut buf, 3, 10, false, b"", b"q", 4);
        basic_nack(&mut buf, 3, 11, true, false);
        basic_return(&mut buf, 3, 312, "NO_ROUTE", b"ex", b"rk");
        let decoder = FrameDecoder::new(131072);
        let deliver = decoder.decode(&mut buf).unwrap().unwrap();
        assert_eq!(deliver.channel, 3);
        assert_eq!(
            decode(&deliver.payload).unwrap(),
            Method::Other(AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "ctag".into(),
                delivery_tag: 9,
                redelivered: true,
                exchange: "ex".into(),
                routing_key: "rk".into(),
            })))
        );
        let get_ok = decoder.decode(&mut buf).unwrap().unwrap();
        assert_eq!(
            decode(&get_ok.payload).unwrap(),
            Method::Other(AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag: 10,
                redelivered: false,
                exchange: "".into(),
                routing_key: "q".into(),
                message_count: 4,
            })))
        );
        let nack = decoder.decode(&mut buf).unwrap().unwrap();
        assert_eq!(
            decode(&nack.payload).unwrap(),
            Method::Other(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: 11,
                multiple: true,
                requeue: false
            })))
        );
        assert!(decoder.decode(&mut buf).unwrap().is_some());
        assert!(buf.is_empty());
    }

    #[test]
    fn content_is_split_by_frame_max() {
        let mut buf = BytesMut::new();
        let body = vec![7u8; 10_000];
        content(&mut buf, 1, &[0, 0], &body, 4096);
        let decoder = FrameDecoder::new(4096);
        let header = decoder.decode(&mut buf).unwrap().unwrap();
        assert_eq!(header.kind, FrameKind::Header);
        let mut total = 0;
        let mut frames = 0;
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            assert_eq!(frame.kind, FrameKind::Body);
            assert!(frame.payload.len() + FRAME_OVERHEAD <= 4096);
            total += frame.payload.len();
            frames += 1;
        }
        assert_eq!(total, body.len());
        assert_eq!(frames, 3);
    }
}

#[cfg(test)]
mod round_trip {
    use super::*;
    use crate::frame::FrameDecoder;
    use crate::method::{decode, Method};
    use crate::spec::basic;
    use proptest::prelude::*;

    fn short() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z0-9._:/-]{0,40}").expect("valid regex")
    }

    fn one_frame(buf: &mut BytesMut) -> crate::frame::Frame {
        let frame = FrameDecoder::new(131_072).decode(buf).expect("valid frame").expect("complete frame");
        assert!(buf.is_empty());
        frame
    }

    proptest! {
        #[test]
        fn hand_written_per_message_methods_match_the_generated_codec(
            channel in 1u16..2048,
            consumer_tag in short(),
            exchange in short(),
            routing_key in short(),
            delivery_tag in any::<u64>(),
            flags in any::<(bool, bool)>(),
            message_count in any::<u32>(),
        ) {
            let mut buf = BytesMut::new();
            basic_deliver(&mut buf, channel, consumer_tag.as_bytes(), delivery_tag, flags.0, exchange.as_bytes(), routing_key.as_bytes());
            let frame = one_frame(&mut buf);
            prop_assert_eq!(frame.channel, channel);
            prop_assert_eq!(decode(&frame.payload).expect("decodes"), Method::Other(AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: consumer_tag.as_str().into(),
                delivery_tag,
                redelivered: flags.0,
                exchange: exchange.as_str().into(),
                routing_key: routing_key.as_str().into(),
            }))));

            basic_get_ok(&mut buf, channel, delivery_tag, flags.1, exchange.as_bytes(), routing_key.as_bytes(), message_count);
            let frame = one_frame(&mut buf);
            prop_assert_eq!(decode(&frame.payload).expect("decodes"), Method::Other(AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag,
                redelivered: flags.1,
                exchange: exchange.as_str().into(),
                routing_key: routing_key.as_str().into(),
                message_count,
            }))));

            basic_publish(&mut buf, channel, exchange.as_bytes(), routing_key.as_bytes(), flags.0);
            let frame = one_frame(&mut buf);
            match decode(&frame.payload).expect("decodes") {
                Method::Publish(p) => {
                    prop_assert_eq!(&p.exchange[..], exchange.as_bytes());
                    prop_assert_eq!(&p.routing_key[..], routing_key.as_bytes());
                    prop_assert_eq!(p.mandatory, flags.0);
                }
                other => prop_assert!(false, "decoded as {:?}", other),
            }

            basic_ack(&mut buf, channel, delivery_tag, flags.0);
            let frame = one_frame(&mut buf);
            prop_assert_eq!(decode(&frame.payload).expect("decodes"), Method::Ack { delivery_tag, multiple: flags.0 });

            basic_nack(&mut buf, channel, delivery_tag, flags.0, flags.1);
            let frame = one_frame(&mut buf);
            prop_assert_eq!(decode(&frame.payload).expect("decodes"), Method::Other(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag, multiple: flags.0, requeue: flags.1,
            }))));
        }

        #[test]
        fn any_method_payload_decodes_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes::Bytes::from(bytes));
        }
    }
}
