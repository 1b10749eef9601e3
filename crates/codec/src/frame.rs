//! Frame splitting: `type:u8 channel:u16 size:u32 payload[size] 0xCE`.
//!
//! Invariant: a frame's claimed size is checked against `frame_max` before
//! any byte of its payload is awaited, so a hostile size never makes the
//! reader buffer (or allocate) more than one legal frame.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::CodecError;

pub const FRAME_END: u8 = 0xCE;
/// Type, channel and size.
pub const FRAME_HEADER_LEN: usize = 7;
/// Header plus the end byte: what a frame costs beyond its payload.
pub const FRAME_OVERHEAD: usize = FRAME_HEADER_LEN + 1;
/// The smallest frame_max a peer may negotiate (spec 4.2.3).
pub const FRAME_MIN_SIZE: u32 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    Method = 1,
    Header = 2,
    Body = 3,
    Heartbeat = 8,
}

impl FrameKind {
    fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(FrameKind::Method),
            2 => Some(FrameKind::Header),
            3 => Some(FrameKind::Body),
            8 => Some(FrameKind::Heartbeat),
            _ => None,
        }
    }
}

/// One frame; the payload shares the read buffer (no copy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub channel: u16,
    pub payload: Bytes,
}

/// Most bytes reserved ahead for a frame still arriving.
const RESERVE_AHEAD: usize = 128 * 1024;

#[derive(Clone, Debug)]
pub struct FrameDecoder {
    /// Largest whole frame accepted, overhead included (AMQP's frame_max).
    pub frame_max: u32,
}

impl FrameDecoder {
    pub fn new(frame_max: u32) -> Self {
        FrameDecoder { frame_max }
    }

    /// Splits one frame off the front of `buf`, or returns `Ok(None)` when
    /// more bytes are needed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let kind_byte = buf[0];
        let kind = FrameKind::from_u8(kind_byte).ok_or(CodecError::UnknownFrameType(kind_byte))?;
        let channel = u16::from_be_bytes([buf[1], buf[2]]);
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
        if self.frame_max != 0 && u64::from(size) + FRAME_OVERHEAD as u64 > u64::from(self.frame_max) {
            return Err(CodecError::FrameTooLarge { size, frame_max: self.frame_max });
        }
        let total = FRAME_HEADER_LEN + size as usize + 1;
        if buf.len() < total {
            // Room for the rest, but never more than a default-sized frame
            // ahead of what arrived: with frame_max 0 (no limit) a claimed
            // 4 GiB frame must not allocate 4 GiB.
            buf.reserve((total - buf.len()).min(RESERVE_AHEAD));
            return Ok(None);
        }
        let end = buf[total - 1];
        if end != FRAME_END {
            return Err(CodecError::BadFrameEnd(end));
        }
        buf.advance(FRAME_HEADER_LEN);
        let payload = buf.split_to(size as usize).freeze();
        buf.advance(1);
        Ok(Some(Frame { kind, channel, payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_claimed_huge_frame_allocates_nothing_near_its_size() {
        // No limit (frame_max 0): the claim is not refused, but only a
        // bounded amount is reserved while the bytes do not arrive.
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0xff, 0xff, 0xff, 0xf0][..]);
        assert!(FrameDecoder::new(0).decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() <= 2 * RESERVE_AHEAD, "reserved {}", buf.capacity());
        // With a limit the claim is refused before anything is reserved.
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0xff, 0xff, 0xff, 0xf0][..]);
        assert!(FrameDecoder::new(131_072).decode(&mut buf).is_err());
        assert!(buf.capacity() < 1024);
    }

    fn raw(kind: u8, channel: u16, payload: &[u8], end: u8) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&channel.to_be_bytes());
        v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        v.extend_from_slice(payload);
        v.push(end);
        v
    }

    #[test]
    fn oversized_frame_is_refused_before_its_payload_arrives() {
        let decoder = FrameDecoder::new(4096);
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0xFF, 0xFF, 0xFF, 0xF0][..]);
        assert!(matches!(decoder.decode(&mut buf), Err(CodecError::FrameTooLarge { .. })));
    }

    #[test]
    fn wrong_frame_end_is_an_error() {
        let decoder = FrameDecoder::new(4096);
        let mut buf = BytesMut::from(&raw(1, 0, b"abc", 0x00)[..]);
        assert_eq!(decoder.decode(&mut buf), Err(CodecError::BadFrameEnd(0)));
    }

    #[test]
    fn unknown_frame_type_is_an_error() {
        let decoder = FrameDecoder::new(4096);
        let mut buf = BytesMut::from(&raw(7, 0, b"", FRAME_END)[..]);
        assert_eq!(decoder.decode(&mut buf), Err(CodecError::UnknownFrameType(7)));
    }

    proptest! {
        #[test]
        fn frames_split_at_any_boundary_decode_identically(
            frames in proptest::collection::vec((1u8..=3, any::<u16>(), proptest::collection::vec(any::<u8>(), 0..200)), 1..10),
            cut in 0usize..2000,
        ) {
            let decoder = FrameDecoder::new(4096);
            let mut wire = Vec::new();
            for (kind, channel, payload) in &frames {
                wire.extend(raw(*kind, *channel, payload, FRAME_END));
            }
            let cut = cut.min(wire.len());
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut out = Vec::new();
            while let Some(frame) = decoder.decode(&mut buf).map_err(|e| TestCaseError::fail(e.to_string()))? {
                out.push(frame);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(frame) = decoder.decode(&mut buf).map_err(|e| TestCaseError::fail(e.to_string()))? {
                out.push(frame);
            }
            prop_assert_eq!(out.len(), frames.len());
            for (frame, (kind, channel, payload)) in out.iter().zip(frames.iter()) {
                prop_assert_eq!(frame.kind as u8, *kind);
                prop_assert_eq!(frame.channel, *channel);
                prop_assert_eq!(&frame.payload[..], &payload[..]);
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let decoder = FrameDecoder::new(4096);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decoder.decode(&mut buf) {}
        }
    }
}
