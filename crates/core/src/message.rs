//! A published message: exchange, routing key, raw content-header properties
//! and body, in one exact-size buffer shared by every queue it was routed to.

use warren_codec::properties::Properties;

#[derive(Debug)]
pub struct Message {
    /// exchange | routing key | properties | body
    data: Box<[u8]>,
    exchange_len: u8,
    routing_key_len: u8,
    properties_len: u32,
    pub persistent: bool,
    pub priority: u8,
    /// Per-message TTL from the `expiration` property, in milliseconds
    /// (`NO_EXPIRATION` when absent).
    expiration: u64,
    /// When the message entered the broker, in milliseconds since the Unix
    /// epoch; set when a TTL applies to it (0: not recorded). Stored with
    /// the message so expiry survives restarts.
    arrived: std::sync::atomic::AtomicU64,
    /// Log index of the stored copy (0: not stored). Set by the server once
    /// the message's entry is appended; the journal refers to it by this.
    stored: std::sync::atomic::AtomicU64,
    /// Log index of an earlier entry holding this very body, when the
    /// stored copy refers to it instead of holding the body (a dead-lettered
    /// or released delayed copy), or when such a copy is yet to be stored;
    /// 0 otherwise.
    body_at: std::sync::atomic::AtomicU64,
}

const NO_EXPIRATION: u64 = u64::MAX;

/// Reads an `expiration` property as RabbitMQ does: a decimal integer of
/// milliseconds, at least 0. `Err` carries RabbitMQ's description of what
/// is wrong (`no_integer`, `{value_negative,-1}`, `{leftover_string,".5"}`).
pub fn parse_expiration(value: &str) -> Result<u64, String> {
    let bytes = value.as_bytes();
    let sign = usize::from(matches!(bytes.first(), Some(b'+' | b'-')));
    let digits = bytes[sign..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return Err("no_integer".into());
    }
    let (number, rest) = value.split_at(sign + digits);
    if !rest.is_empty() {
        return Err(format!("{{leftover_string,\"{rest}\"}}"));
    }
    let number: i128 = number.parse().map_err(|_| "no_integer".to_string())?;
    if number < 0 {
        return Err(format!("{{value_negative,{number}}}"));
    }
    Ok(u64::try_from(number).unwrap_or(u64::MAX))
}

impl Message {
    /// Starts a message whose body will arrive in `body_size` bytes of body
    /// frames; the buffer is allocated once at its final size.
    pub fn builder(exchange: &[u8], routing_key: &[u8], properties: &Properties, body_size: usize) -> MessageBuilder {
        let exchange = &exchange[..exchange.len().min(255)];
        let routing_key = &routing_key[..routing_key.len().min(255)];
        let props = properties.as_bytes();
        let mut data = Vec::with_capacity(exchange.len() + routing_key.len() + props.len() + body_size);
        data.extend_from_slice(exchange);
        data.extend_from_slice(routing_key);
        data.extend_from_slice(props);
        MessageBuilder {
            data,
            // Cut to 255 bytes above.
            exchange_len: u8::try_from(exchange.len()).unwrap_or(u8::MAX),
            routing_key_len: u8::try_from(routing_key.len()).unwrap_or(u8::MAX),
            // From one content header frame: below frame_max, a u32.
            properties_len: u32::try_from(props.len()).unwrap_or(u32::MAX),
            body_size,
            persistent: properties.delivery_mode() == Some(2),
            priority: properties.priority().unwrap_or(0),
            expiration: properties.expiration().and_then(|e| parse_expiration(e).ok()).unwrap_or(NO_EXPIRATION),
        }
    }

    pub fn exchange(&self) -> &[u8] {
        &self.data[..self.exchange_len as usize]
    }

    pub fn routing_key(&self) -> &[u8] {
        let start = self.exchange_len as usize;
        &self.data[start..start + self.routing_key_len as usize]
    }

    pub fn properties(&self) -> &[u8] {
        let start = self.exchange_len as usize + self.routing_key_len as usize;
        &self.data[start..start + self.properties_len as usize]
    }

    pub fn body(&self) -> &[u8] {
        let start = self.exchange_len as usize + self.routing_key_len as usize + self.properties_len as usize;
        &self.data[start..]
    }

    /// The properties, read in place (validated when the message arrived).
    pub fn properties_view(&self) -> Properties<&[u8]> {
        Properties::view(self.properties())
    }

    /// Log index of the stored copy, 0 if not stored.
    pub fn stored_index(&self) -> u64 {
        self.stored.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set_stored_index(&self, index: u64) {
        self.stored.store(index, std::sync::atomic::Ordering::Release);
    }

    /// Log index of the earlier entry holding this body, 0 if none.
    pub fn body_at(&self) -> u64 {
        self.body_at.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set_body_at(&self, index: u64) {
        self.body_at.store(index, std::sync::atomic::Ordering::Release);
    }

    /// The log entry holding this message's body: the one its stored copy
    /// refers to, else the stored copy itself (0 if not stored).
    pub fn body_root(&self) -> u64 {
        match self.body_at() {
            0 => self.stored_index(),
            at => at,
        }
    }

    /// Its stored copy was rewritten whole at `index` (compaction).
    pub fn moved_to(&self, index: u64) {
        self.set_stored_index(index);
        self.set_body_at(0);
    }

    /// Lets this copy of `original` refer to the body `original`'s stored
    /// copy holds. Only for a copy journaled before `original` is settled:
    /// the body's entry must still be live when the copy is written.
    pub fn share_stored_body(&self, original: &Message) {
        self.set_body_at(original.body_root());
    }

    pub fn body_len(&self) -> usize {
        self.body().len()
    }

    /// The `expiration` property in milliseconds, if set.
    pub fn expiration(&self) -> Option<u64> {
        (self.expiration != NO_EXPIRATION).then_some(self.expiration)
    }

    /// Arrival time in milliseconds since the epoch (0: not recorded).
    pub fn arrived(&self) -> u64 {
        self.arrived.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records the arrival time once; later calls keep the first.
    pub fn set_arrived(&self, millis: u64) {
        let _ = self.arrived.compare_exchange(
            0,
            millis,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// When this message expires in a queue whose `x-message-ttl` is
    /// `queue_ttl`: the smaller of the two TTLs after arrival.
    pub fn deadline(&self, queue_ttl: Option<u64>) -> Option<u64> {
        let ttl = match (queue_ttl, self.expiration()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(self.arrived().saturating_add(ttl))
    }

    /// A copy of its own (not stored anywhere yet), keeping when it
    /// arrived: a replicated queue keys its messages by their stored index,
    /// which a message shared with other queues cannot carry twice.
    pub fn duplicate(&self) -> Message {
        let message = MessageBuilder {
            data: self.data.to_vec(),
            exchange_len: self.exchange_len,
            routing_key_len: self.routing_key_len,
            properties_len: self.properties_len,
            body_size: self.body_len(),
            persistent: self.persistent,
            priority: self.priority,
            expiration: self.expiration,
        }
        .finish();
        message.set_arrived(self.arrived());
        message
    }

    /// A copy with different properties (Direct Reply-To, BCC removal).
    pub fn with_properties(&self, properties: &Properties) -> Message {
        let mut builder = Message::builder(self.exchange(), self.routing_key(), properties, self.body_len());
        builder.push_body(self.body());
        let mut message = builder.finish();
        message.persistent = self.persistent;
        message
    }
}

pub struct MessageBuilder {
    data: Vec<u8>,
    exchange_len: u8,
    routing_key_len: u8,
    properties_len: u32,
    body_size: usize,
    persistent: bool,
    priority: u8,
    expiration: u64,
}

impl MessageBuilder {
    pub fn body_received(&self) -> usize {
        self.data.len() - self.exchange_len as usize - self.routing_key_len as usize - self.properties_len as usize
    }

    pub fn body_size(&self) -> usize {
        self.body_size
    }

    pub fn is_complete(&self) -> bool {
        self.body_received() >= self.body_size
    }

    /// Appends a body frame; returns false if it would exceed the size the
    /// content header declared.
    pub fn push_body(&mut self, chunk: &[u8]) -> bool {
        if self.body_received() + chunk.len() > self.body_size {
            return false;
        }
        self.data.extend_from_slice(chunk);
        true
    }

    pub fn finish(self) -> Message {
        Message {
            data: self.data.into_boxed_slice(),
            exchange_len: self.exchange_len,
            routing_key_len: self.routing_key_len,
            properties_len: self.properties_len,
            persistent: self.persistent,
            priority: self.priority,
            expiration: self.expiration,
            arrived: std::sync::atomic::AtomicU64::new(0),
            stored: std::sync::atomic::AtomicU64::new(0),
            body_at: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expirations_are_read_as_rabbitmq_reads_them() {
        assert_eq!(parse_expiration("60000"), Ok(60000));
        assert_eq!(parse_expiration("+5"), Ok(5));
        assert_eq!(parse_expiration("0"), Ok(0));
        assert_eq!(parse_expiration("abc").unwrap_err(), "no_integer");
        assert_eq!(parse_expiration("").unwrap_err(), "no_integer");
        assert_eq!(parse_expiration("-1").unwrap_err(), "{value_negative,-1}");
        assert_eq!(parse_expiration("1.5").unwrap_err(), "{leftover_string,\".5\"}");
    }

    #[test]
    fn parts_are_kept_apart_and_body_size_is_enforced() {
        let props = Properties::parse(bytes::Bytes::from_static(&[0x10, 0, 2])).unwrap();
        let mut builder = Message::builder(b"ex", b"key", &props, 5);
        assert!(builder.push_body(b"hel"));
        assert!(!builder.is_complete());
        assert!(!builder.push_body(b"lo!"));
        assert!(builder.push_body(b"lo"));
        assert!(builder.is_complete());
        let message = builder.finish();
        assert_eq!(message.exchange(), b"ex");
        assert_eq!(message.routing_key(), b"key");
        assert_eq!(message.properties(), &[0x10, 0, 2]);
        assert_eq!(message.body(), b"hello");
        assert!(message.persistent);
    }
}
