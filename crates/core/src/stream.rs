//! Stream queues (`x-queue-type: stream`): an append-only log read without
//! being consumed. Every message gets the next offset and an
//! `x-stream-offset` header; each consumer reads from its own offset, and
//! an ack only gives credit back. The log itself is the store's
//! ([`StreamStorage`]); the core keeps the newest messages in memory (the
//! tail) for consumers that keep up, and each consumer that has fallen
//! behind reads ahead from the store a bounded batch at a time.

use std::collections::VecDeque;
use std::sync::Arc;

use warren_codec::properties::{flag, Properties};
use warren_codec::table;
use warren_codec::types::AMQPValue;

use crate::Message;

/// The header every message of a stream carries: its offset.
pub const OFFSET_HEADER: &str = "x-stream-offset";
/// The publisher's header naming a message's filter value.
pub const FILTER_VALUE_HEADER: &str = "x-stream-filter-value";

/// RabbitMQ's default and largest segment size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 500_000_000;
pub const MAX_SEGMENT_BYTES: u64 = 3_000_000_000;

/// Messages and bytes of the in-memory tail (the newest messages).
const TAIL_MESSAGES: usize = 1024;
const TAIL_BYTES: u64 = 4 << 20;
/// What one read from the store brings in for one consumer (at least one
/// chunk): small, since every reader holds this much decoded.
pub const READ_AHEAD_BYTES: usize = 64 * 1024;

/// A stream's retention and layout, from its arguments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSettings {
    /// `x-max-length-bytes`: older segments go beyond it.
    pub max_length_bytes: Option<u64>,
    /// `x-max-age`: segments whose newest message is older go.
    pub max_age_ms: Option<u64>,
    /// `x-stream-max-segment-size-bytes`.
    pub max_segment_bytes: u64,
}

/// Where a stream stands in the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamBounds {
    /// The oldest offset retained.
    pub first: u64,
    /// The offset the next message gets.
    pub next: u64,
    /// First offset of the newest chunk (one append).
    pub last_chunk: Option<u64>,
}

impl StreamBounds {
    pub fn len(&self) -> u64 {
        self.next - self.first
    }

    pub fn is_empty(&self) -> bool {
        self.next == self.first
    }
}

/// A message read from a stream, with its offset.
#[derive(Clone, Debug)]
pub struct StreamItem {
    pub offset: u64,
    pub message: Arc<Message>,
}

/// The store's own note of where a reader stands, kept between reads so a
/// reader carries on without searching.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadHint(pub [u64; 3]);

/// The streams' logs, as the store keeps them.
pub trait StreamStorage: Send + Sync {
    /// Opens the log of a stream (creating it if new); where it stands.
    fn open_stream(&self, vhost: &str, queue: &str, settings: &StreamSettings) -> Result<StreamBounds, String>;
    /// Where an open stream stands.
    fn bounds(&self, vhost: &str, queue: &str) -> Option<StreamBounds>;
    /// The first offset of the first chunk stamped at or after `timestamp_ms`.
    fn offset_at(&self, vhost: &str, queue: &str, timestamp_ms: u64) -> u64;
    /// Reads about `max_bytes` of messages from `cursor.next` on into
    /// `cursor.ahead`, skipping chunks that carry filter values of which
    /// the cursor's filter wants none (and keeping `cursor.hint`). Returns
    /// the offset after what was read or skipped; `None` when nothing is
    /// durable at `cursor.next` yet.
    fn read(&self, vhost: &str, queue: &str, cursor: &mut StreamCursor, max_bytes: usize) -> Option<u64>;
    /// A tracking consumer acked `offset` (server-side offset tracking).
    fn track(&self, vhost: &str, queue: &str, consumer_tag: &str, offset: u64);
    /// The last offset a tracking consumer of this tag acked.
    fn tracked(&self, vhost: &str, queue: &str, consumer_tag: &str) -> Option<u64>;
}

/// Where a consumer starts (`x-stream-offset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetSpec {
    First,
    /// The start of the newest chunk.
    Last,
    /// Only what is published from now on (the default).
    Next,
    Offset(u64),
    /// The first chunk stamped at or after this time (milliseconds); an
    /// interval (`1h`) is a time before now.
    Timestamp(u64),
}

impl OffsetSpec {
    /// Reads `x-stream-offset`; `None` if it is not one.
    pub fn parse(value: Option<&AMQPValue>, now_ms: u64) -> Option<OffsetSpec> {
        let Some(value) = value else { return Some(OffsetSpec::Next) };
        if let AMQPValue::Timestamp(seconds) = value {
            return Some(OffsetSpec::Timestamp(seconds.saturating_mul(1000)));
        }
        if let Some(number) = table::as_i64(value) {
            return Some(OffsetSpec::Offset(u64::try_from(number).unwrap_or(0)));
        }
        match table::as_str(value)? {
            "first" => Some(OffsetSpec::First),
            "last" => Some(OffsetSpec::Last),
            "next" => Some(OffsetSpec::Next),
            interval => Some(OffsetSpec::Timestamp(now_ms.saturating_sub(parse_age(interval)?))),
        }
    }
}

/// `x-max-age` and offset intervals: a number and one unit of `Y` (365
/// days), `M` (30 days), `D`, `h`, `m` or `s`; milliseconds.
pub fn parse_age(text: &str) -> Option<u64> {
    let unit = text.chars().last()?;
    let number: u64 = text.get(..text.len() - unit.len_utf8())?.parse().ok()?;
    let seconds: u64 = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    number.checked_mul(seconds)?.checked_mul(1000)
}

/// A consumer's filter (`x-stream-filter`, `x-stream-match-unfiltered`).
/// Warren matches exactly: a consumer gets only the messages whose
/// `x-stream-filter-value` is one of its values (and, with
/// `match_unfiltered`, those without one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamFilter {
    pub values: Vec<Box<[u8]>>,
    pub match_unfiltered: bool,
}

impl StreamFilter {
    /// Does a chunk carrying the filter value `value` hold anything wanted?
    pub fn wants_value(&self, value: &[u8]) -> bool {
        self.values.iter().any(|v| **v == *value)
    }

    /// Is this message wanted?
    pub fn wants(&self, message: &Message) -> bool {
        match filter_value(message) {
            Some(value) => self.wants_value(&value),
            None => self.match_unfiltered,
        }
    }
}

/// A message's `x-stream-filter-value`, if it has one (headers decoded only
/// when their bytes name it).
pub fn filter_value(message: &Message) -> Option<Vec<u8>> {
    let properties = message.properties_view();
    let raw = properties.headers_raw()?;
    if !raw.windows(FILTER_VALUE_HEADER.len()).any(|w| w == FILTER_VALUE_HEADER.as_bytes()) {
        return None;
    }
    let headers = properties.headers()?;
    table::as_str(table::get(&headers, FILTER_VALUE_HEADER)?).map(|s| s.as_bytes().to_vec())
}

/// A copy of `message` whose headers end with `x-stream-offset` (a long,
/// as RabbitMQ sends it); every other byte of the properties is kept.
pub fn with_offset(message: &Message, offset: u64) -> Message {
    let properties = offset_properties(message, offset);
    let mut builder = Message::builder(message.exchange(), message.routing_key(), &properties, message.body_len());
    builder.push_body(message.body());
    let mut copy = builder.finish();
    copy.persistent = message.persistent;
    copy
}

/// `message`'s properties with `x-stream-offset` appended to its headers
/// (a publisher's own `x-stream-offset` dropped); every other byte kept.
/// Built per delivery from the tail and per record written, so the body is
/// never copied for it.
pub fn offset_properties(message: &Message, offset: u64) -> Properties {
    let view = message.properties_view();
    let stripped;
    let properties: Properties<&[u8]> = match view.headers_raw() {
        Some(raw) if raw.windows(OFFSET_HEADER.len()).any(|w| w == OFFSET_HEADER.as_bytes()) => {
            match view.without_header(OFFSET_HEADER) {
                Some(p) => {
                    stripped = p;
                    Properties::view(stripped.as_bytes())
                }
                None => view,
            }
        }
        _ => view,
    };
    let old = properties.headers_raw().and_then(|raw| raw.get(4..)).unwrap_or_default();
    let mut headers = Vec::with_capacity(4 + old.len() + 1 + OFFSET_HEADER.len() + 9);
    let len = old.len() + 1 + OFFSET_HEADER.len() + 9;
    headers.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    headers.extend_from_slice(old);
    headers.push(u8::try_from(OFFSET_HEADER.len()).unwrap_or(u8::MAX));
    headers.extend_from_slice(OFFSET_HEADER.as_bytes());
    headers.push(b'l');
    headers.extend_from_slice(&i64::try_from(offset).unwrap_or(i64::MAX).to_be_bytes());
    properties.with_field(flag::HEADERS, Some(&headers))
}

/// The core's side of one stream: the next offset and the newest messages.
#[derive(Debug)]
pub struct StreamState {
    pub settings: StreamSettings,
    /// The offset the next message gets.
    pub next: u64,
    /// The newest messages, offsets `next - tail.len()` to `next - 1`, as
    /// published (without their offset header, which a delivery adds).
    tail: VecDeque<Arc<Message>>,
    tail_bytes: u64,
    /// Offsets below this one are durable in the store: consumers get
    /// nothing beyond.
    pub durable: u64,
}

impl StreamState {
    pub fn new(settings: StreamSettings, next: u64) -> StreamState {
        StreamState { settings, next, tail: VecDeque::new(), tail_bytes: 0, durable: next }
    }

    /// Numbers a message; returns its offset.
    pub fn append(&mut self, message: &Arc<Message>) -> u64 {
        let offset = self.next;
        self.next += 1;
        self.tail_bytes += message.body_len() as u64;
        self.tail.push_back(message.clone());
        offset
    }

    /// The first offset the tail holds.
    pub fn tail_start(&self) -> u64 {
        self.next - self.tail.len() as u64
    }

    pub fn tail_get(&self, offset: u64) -> Option<&Arc<Message>> {
        let start = self.tail_start();
        if offset < start {
            return None;
        }
        self.tail.get(usize::try_from(offset - start).ok()?)
    }

    /// Drops the oldest tail messages beyond the tail's size, but only those
    /// the store has (below `written`): a reader behind the tail reads them
    /// from there.
    pub fn trim(&mut self, written: u64) {
        while (self.tail.len() > TAIL_MESSAGES || self.tail_bytes > TAIL_BYTES) && self.tail_start() < written {
            if let Some(front) = self.tail.pop_front() {
                self.tail_bytes -= front.body_len() as u64;
            }
        }
    }

    /// Whether the tail grew enough to be worth trimming.
    pub fn over_tail(&self) -> bool {
        self.tail.len() > 2 * TAIL_MESSAGES || self.tail_bytes > 2 * TAIL_BYTES
    }

    pub fn clear_tail(&mut self) {
        self.tail.clear();
        self.tail_bytes = 0;
    }
}

/// One consumer's place in a stream.
#[derive(Clone, Debug, Default)]
pub struct StreamCursor {
    /// The next offset to deliver.
    pub next: u64,
    /// Messages read ahead from the store, from `next` on.
    pub ahead: VecDeque<StreamItem>,
    pub hint: ReadHint,
    pub filter: Option<StreamFilter>,
    /// Its acks are remembered under its consumer tag, and a consumer with
    /// that tag starts after the last one (LavinMQ's server-side tracking).
    pub tracking: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{table as field_table, text};

    fn message(headers: Option<&[(&str, AMQPValue)]>) -> Message {
        let properties = match headers {
            Some(pairs) => {
                let mut encoded = Vec::new();
                table::encode_table(&field_table(pairs), &mut encoded);
                Properties::empty().with_field(flag::HEADERS, Some(&encoded))
            }
            None => Properties::empty(),
        };
        let mut builder = Message::builder(b"x", b"k", &properties, 3);
        builder.push_body(b"abc");
        builder.finish()
    }

    #[test]
    fn ages_and_intervals_read_as_rabbitmq_reads_them() {
        assert_eq!(parse_age("7D"), Some(7 * 86_400_000));
        assert_eq!(parse_age("12h"), Some(12 * 3_600_000));
        assert_eq!(parse_age("30m"), Some(1_800_000));
        assert_eq!(parse_age("10s"), Some(10_000));
        assert_eq!(parse_age("1Y"), Some(365 * 86_400_000));
        assert_eq!(parse_age("2M"), Some(60 * 86_400_000));
        for bad in ["", "7", "d", "7d", "-1h", "1.5h", "h1"] {
            assert_eq!(parse_age(bad), None, "{bad}");
        }
    }

    #[test]
    fn offset_specs() {
        let now = 10_000_000;
        assert_eq!(OffsetSpec::parse(None, now), Some(OffsetSpec::Next));
        assert_eq!(OffsetSpec::parse(Some(&text("first")), now), Some(OffsetSpec::First));
        assert_eq!(OffsetSpec::parse(Some(&text("last")), now), Some(OffsetSpec::Last));
        assert_eq!(OffsetSpec::parse(Some(&AMQPValue::LongLongInt(5)), now), Some(OffsetSpec::Offset(5)));
        assert_eq!(OffsetSpec::parse(Some(&AMQPValue::Timestamp(7)), now), Some(OffsetSpec::Timestamp(7000)));
        assert_eq!(OffsetSpec::parse(Some(&text("10s")), now), Some(OffsetSpec::Timestamp(now - 10_000)));
        assert_eq!(OffsetSpec::parse(Some(&text("bad")), now), None);
    }

    #[test]
    fn the_offset_header_is_appended_after_the_publishers_headers_byte_for_byte() {
        let original = message(Some(&[("b", AMQPValue::LongInt(1)), ("a", text("z"))]));
        let numbered = with_offset(&original, 42);
        let old = original.properties_view().headers_raw().unwrap().to_vec();
        let new = numbered.properties_view().headers_raw().unwrap().to_vec();
        assert_eq!(&new[4..old.len()], &old[4..], "the publisher's headers are kept as they were");
        let headers = numbered.properties_view().headers().unwrap();
        assert_eq!(table::get(&headers, OFFSET_HEADER), Some(&AMQPValue::LongLongInt(42)));
        assert_eq!(numbered.body(), b"abc");
        // Without headers, and with a stale offset header of the publisher's.
        let plain = with_offset(&message(None), 7);
        let headers = plain.properties_view().headers().unwrap();
        assert_eq!(table::get(&headers, OFFSET_HEADER), Some(&AMQPValue::LongLongInt(7)));
        let again = with_offset(&numbered, 9);
        let headers = again.properties_view().headers().unwrap();
        assert_eq!(headers.inner().len(), 3);
        assert_eq!(table::get(&headers, OFFSET_HEADER), Some(&AMQPValue::LongLongInt(9)));
    }

    #[test]
    fn filters_match_exactly() {
        let red = message(Some(&[(FILTER_VALUE_HEADER, text("red"))]));
        let none = message(None);
        let filter = StreamFilter { values: vec![b"red".to_vec().into()], match_unfiltered: false };
        assert!(filter.wants(&red));
        assert!(!filter.wants(&none));
        assert!(StreamFilter { match_unfiltered: true, ..filter.clone() }.wants(&none));
        assert!(!StreamFilter { values: vec![b"blue".to_vec().into()], match_unfiltered: true }.wants(&red));
    }

    #[test]
    fn the_tail_keeps_what_the_store_has_not_written() {
        let mut stream = StreamState::new(StreamSettings::default(), 10);
        let one = Arc::new(message(None));
        for _ in 0..3000 {
            stream.append(&one);
        }
        assert_eq!(stream.next, 3010);
        stream.trim(100);
        assert_eq!(stream.tail_start(), 100, "nothing unwritten is dropped");
        stream.trim(3010);
        assert_eq!(stream.tail_start(), 3010 - TAIL_MESSAGES as u64);
        assert!(stream.tail_get(3009).is_some_and(|m| Arc::ptr_eq(m, &one)), "the tail shares the published message");
        assert!(stream.tail_get(3010).is_none());
    }
}
