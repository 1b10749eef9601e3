//! Warren's broker core: virtual hosts, exchanges and their binding tables,
//! queues, consumers, and the delivery side of channels (prefetch, unacked
//! messages, delivery tags).
//!
//! The core does no I/O and reads time only through the [`Clock`] it is
//! given (TTLs, queue expiry, `x-death` times). Frames leave through the
//! [`Outbox`] trait, which the server implements on top of a connection's
//! write buffer. All state of one virtual host sits behind one lock
//! ([`VirtualHost::lock`]); the server takes it once per batch of frames read
//! from a socket, so routing, enqueueing and dispatching a whole batch costs
//! one lock acquisition.
//!
//! Ownership that the durable store slots under: a published [`Message`] is
//! immutable and shared (`Arc`) by every queue it was routed to; a queue owns
//! only small entries (sequence number, redelivered flag, the shared message),
//! so a log-backed queue can later replace the in-memory entries without the
//! channel layer noticing.

pub mod dead_letter;
pub mod exchange;
pub mod headers;
mod lane;
pub mod message;
pub mod names;
pub mod policy;
pub mod queue;
pub mod scheduler;
pub mod settings;
pub mod stats;
pub mod stream;
pub mod topic;
pub mod vhost;

#[cfg(test)]
pub(crate) mod test_support {
    use warren_codec::types::{AMQPValue, FieldTable, LongString, ShortString};

    /// A field table (queue arguments, headers, a policy definition).
    pub fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in pairs {
            table.insert(ShortString::from(*key), value.clone());
        }
        table
    }

    pub fn text(value: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(value))
    }
}

pub use message::Message;
pub use queue::MessageLoader;
pub use stats::{MessageStats, QueueChurn};
pub use vhost::{
    BindingSummary, ChannelKey, ConnectionId, Consume, ConsumerSummary, Definitions, ExchangeDeclare, ExchangeSummary,
    JournalEvent, Outbox, QueueDeclare, QueueId, QueueSummary, VirtualHost, VirtualHostState,
};

/// Wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told to (tests).
#[derive(Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    pub fn new(now_ms: u64) -> ManualClock {
        ManualClock(std::sync::atomic::AtomicU64::new(now_ms))
    }

    pub fn advance(&self, millis: u64) {
        self.0.fetch_add(millis, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}
