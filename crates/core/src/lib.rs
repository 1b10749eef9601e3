//! Warren's broker core: virtual hosts, exchanges and their binding tables,
//! queues, consumers, and the delivery side of channels (prefetch, unacked
//! messages, delivery tags).
//!
//! The core does no I/O and reads no clock. Frames leave through the
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

pub mod exchange;
pub mod headers;
pub mod message;
pub mod names;
pub mod queue;
pub mod topic;
pub mod vhost;

pub use message::Message;
pub use queue::MessageLoader;
pub use vhost::{ChannelKey, ConnectionId, Definitions, JournalEvent, Outbox, QueueId, VirtualHost, VirtualHostState};
