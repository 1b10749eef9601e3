//! Arbitrary bytes through everything that reads client input before any
//! broker logic: the frame splitter, method decoding (hand-written hot-path
//! codecs and amq-protocol's), content-header properties and field tables.
//! Nothing may panic, and a frame larger than frame_max must be refused.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use warren_codec::frame::{FrameDecoder, FrameKind, FRAME_MIN_SIZE};
use warren_codec::properties::Properties;
use warren_codec::{method, table};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // The first two bytes pick frame_max (at least the protocol minimum).
    let frame_max = FRAME_MIN_SIZE + u32::from(u16::from_be_bytes([data[0], data[1]]));
    let input = &data[2..];
    let decoder = FrameDecoder::new(frame_max);
    let mut buf = BytesMut::from(input);
    while let Ok(Some(frame)) = decoder.decode(&mut buf) {
        assert!(frame.payload.len() as u64 + 8 <= u64::from(frame_max), "frame above frame_max accepted");
        match frame.kind {
            FrameKind::Method => {
                let _ = method::ids(&frame.payload);
                let _ = method::decode(&frame.payload);
            }
            FrameKind::Header if frame.payload.len() >= 12 => {
                if let Some(properties) = Properties::parse(frame.payload.slice(12..)) {
                    let _ = (properties.delivery_mode(), properties.expiration(), properties.message_id());
                    let _ = (properties.reply_to(), properties.user_id(), properties.headers());
                    let _ = properties.with_reply_to("amq.rabbitmq.reply-to.x");
                }
            }
            _ => {}
        }
    }
    // Field tables on their own, as method arguments and headers carry them.
    if let Some(len) = table::validate_table(input) {
        assert!(len <= input.len());
    }
    if let Some(parsed) = table::parse_table(input) {
        let mut out = Vec::new();
        table::encode_table(&parsed, &mut out);
    }
    let _ = Properties::parse(Bytes::copy_from_slice(input));
});
