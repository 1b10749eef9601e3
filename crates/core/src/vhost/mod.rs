//! One virtual host: its exchanges, queues, bindings and the delivery state
//! of every channel opened on it, behind one lock.
//!
//! Invariants:
//! - a message is in exactly one place per queue it was routed to: a queue's
//!   ready list, or one channel's unacked list;
//! - delivery tags on a channel increase by one per delivery, so a channel's
//!   unacked list is sorted by tag;
//! - deliveries are written to an [`Outbox`] while the lock is held, so they
//!   are ordered with every reply the server writes under the same lock.
//!
//! Operations that free credit or add messages only mark queues dirty; the
//! caller runs [`VirtualHostState::run_dispatch`] after writing its own reply
//! (a `basic.consume-ok` must precede the first delivery).
//!
//! The state is one type; its methods live by concern: `topology.rs`
//! (declare, delete, bind), `routing.rs` (publish), `dispatch.rs`
//! (consumers, dispatch, `basic.get`), `channels.rs` (channel delivery state
//! and settling), `timers.rs` (expiry, delays, consumer timeouts),
//! `dead_letters.rs`, `durable.rs` (journal, definitions, recovery).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use warren_codec::reply::{AmqpError, ReplyCode};
use warren_codec::types::FieldTable;

use crate::dead_letter::{self, Reason};
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind, DELAYED_PREFIX, DELAYED_TYPE};
use crate::message::Message;
use crate::policy::{self, Policy};
use crate::queue::{MessageLoader, Queue, QueueConsumer, QueuedMessage};
use crate::settings::{int_type, value_type, Overflow, QueueSettings, QueueType, TypeRefusal};
use crate::{Clock, SystemClock};

pub type ConnectionId = u64;
pub type QueueId = u64;

/// The pseudo-queue of Direct Reply-To.
pub const REPLY_TO_QUEUE: &str = "amq.rabbitmq.reply-to";
const REPLY_TO_PREFIX: &str = "amq.rabbitmq.reply-to.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    pub connection: ConnectionId,
    pub channel: u16,
}

/// Where the core writes frames for a connection.
pub trait Outbox: Send + Sync {
    fn deliver(&self, channel: u16, consumer_tag: &str, delivery_tag: u64, redelivered: bool, message: &Message);
    /// A first delivery of `message` with other properties (a stream's
    /// message with its offset header), the body sent as it is.
    fn deliver_with_properties(
        &self,
        channel: u16,
        consumer_tag: &str,
        delivery_tag: u64,
        message: &Message,
        properties: &[u8],
    ) {
        let raw = bytes::Bytes::copy_from_slice(properties);
        let Some(properties) = warren_codec::properties::Properties::parse(raw) else {
            return self.deliver(channel, consumer_tag, delivery_tag, false, message);
        };
        let mut copy = Message::builder(message.exchange(), message.routing_key(), &properties, message.body_len());
        copy.push_body(message.body());
        self.deliver(channel, consumer_tag, delivery_tag, false, &copy.finish());
    }
    /// The server cancelled a consumer (its queue was deleted).
    fn consumer_cancelled(&self, channel: u16, consumer_tag: &str);
    /// True while the connection's unsent bytes are above its limit: the core
    /// then stops delivering to it until [`VirtualHostState::resume_connection`].
    fn is_congested(&self) -> bool;
    /// The core wants this channel closed with 406 and `text` (a delivery
    /// acknowledgement timeout in RabbitMQ's close-the-channel mode).
    fn fail_channel(&self, _channel: u16, _text: &str) {}
}

#[derive(Debug)]
struct Unacked {
    delivery_tag: u64,
    queue: QueueId,
    seq: u64,
    message: Arc<Message>,
    /// None for `basic.get`.
    consumer: Option<(Arc<str>, u64)>,
    /// When it was delivered (coarse clock), for the consumer timeout.
    delivered_at: u64,
}

#[derive(Debug)]
struct ConsumerState {
    /// Unique in the virtual host: a tag can be reused after a cancel, and
    /// the old consumer's unacked deliveries must not count against the new.
    id: u64,
    queue: QueueId,
    no_ack: bool,
    prefetch_count: u16,
    unacked: u32,
    /// Its `consume-ok` is out. A consumer of a stand-in is answered only
    /// once the leader accepted it; if this node takes the queue over
    /// meanwhile, its deliveries wait for that answer (the client knows
    /// no consumer before it).
    answered: bool,
}

struct ChannelState {
    outbox: Arc<dyn Outbox>,
    next_delivery_tag: u64,
    unacked: VecDeque<Unacked>,
    unacked_bytes: u64,
    consumers: HashMap<Arc<str>, ConsumerState>,
    /// `basic.qos global=true`: shared by every consumer of the channel.
    prefetch_count: u16,
    /// Applies to the channel as a whole.
    prefetch_size: u32,
    /// `basic.qos global=false`: for consumers created afterwards.
    consumer_prefetch: u16,
    flow_active: bool,
    reply_consumer: Option<(Box<str>, Arc<str>)>,
    /// Delivery tags taken back after the consumer timeout: acknowledging
    /// one later is not an error.
    timed_out: BTreeSet<u64>,
    /// Asked to be closed for a consumer timeout (close-channel mode).
    failing: bool,
    /// `confirm.select` or `tx.select` was received (for operators).
    confirm: bool,
    transactional: bool,
}

impl ChannelState {
    fn can_deliver(&self, tag: &str, size: usize) -> bool {
        if !self.flow_active || self.outbox.is_congested() {
            return false;
        }
        let Some(consumer) = self.consumers.get(tag).filter(|c| c.answered) else {
            return false;
        };
        if consumer.no_ack {
            return true;
        }
        if consumer.prefetch_count != 0 && consumer.unacked >= u32::from(consumer.prefetch_count) {
            return false;
        }
        if self.prefetch_count != 0 && self.unacked.len() >= usize::from(self.prefetch_count) {
            return false;
        }
        self.prefetch_size == 0
            || self.unacked_bytes == 0
            || self.unacked_bytes + size as u64 <= u64::from(self.prefetch_size)
    }

    fn next_tag(&mut self) -> u64 {
        self.next_delivery_tag += 1;
        self.next_delivery_tag
    }
}

/// What the durable store must record, in the order it happened under the
/// virtual-host lock. Only persistent messages in durable queues appear.
#[derive(Debug)]
pub enum JournalEvent {
    /// A persistent message entered these durable queues. Whoever stores
    /// it records the log index in the message (`set_stored_index`).
    Published { message: Arc<Message>, queues: Vec<Arc<str>> },
    /// A stored message (by log index) left a durable queue for good
    /// (acked, rejected without requeue, purged, or delivered to a no-ack
    /// consumer).
    Settled { queue: Arc<str>, stored: u64 },
    /// A durable queue was deleted with everything in it (and its bindings).
    QueueDeleted { queue: Arc<str> },
    /// A durable queue (not exclusive) was declared.
    QueueDeclared(QueueDefinition),
    /// A durable exchange was declared.
    ExchangeDeclared(ExchangeDefinition),
    /// A durable exchange was deleted, with the bindings from and to it.
    ExchangeDeleted { name: Arc<str> },
    /// A binding between durable ends was added.
    Bound(BindingDefinition),
    /// A binding between durable ends was removed.
    Unbound(BindingDefinition),
    /// A stored message came back to a queue that counts returns
    /// (`x-delivery-limit`, `x-retry-*`); `returns` is its count so far,
    /// `retry_at_ms` when it is ready again (`x-retry-delay`; wall clock).
    Returned { queue: Arc<str>, stored: u64, returns: u64, retry_at_ms: Option<u64> },
    /// Messages numbered into a stream (offsets `first` on, in order),
    /// stamped `timestamp` (milliseconds): the store appends them to the
    /// stream's log as one chunk.
    StreamAppended { queue: Arc<str>, first: u64, timestamp: u64, messages: Vec<Arc<Message>> },
    /// What a consumer of a quorum queue's stand-in asks of the queue's
    /// leader (nothing stored here: the server sends it to the leader's
    /// node).
    Relay { queue: Arc<str>, relay: Relay },
}

/// Durable definitions of a virtual host, as stored and restored.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Definitions {
    pub exchanges: Vec<ExchangeDefinition>,
    pub queues: Vec<QueueDefinition>,
    pub bindings: Vec<BindingDefinition>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExchangeDefinition {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QueueDefinition {
    pub name: String,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BindingDefinition {
    pub source: String,
    pub destination: String,
    pub destination_is_queue: bool,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// What `basic.get` hands back.
pub struct GetResult {
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub message: Arc<Message>,
    pub message_count: u32,
}

/// Deduplication keys with the time (ms) each is forgotten.
pub type DedupEntries = Vec<(Vec<u8>, u64)>;

/// What `publish` did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    /// Queues (and reply consumers) the message was routed to.
    pub queues: usize,
    /// A queue refused it (`x-overflow` reject-publish): a publisher in
    /// confirm mode gets a nack.
    pub rejected: bool,
}

/// A message leaving a queue for its dead-letter exchange (or for nowhere).
/// The source queue's settings are captured when it dies.
struct DeadLetter {
    source: Arc<str>,
    /// The message was in the source queue's store: settle it there once
    /// the copy is routed.
    settle: bool,
    exchange: Option<Arc<str>>,
    routing_key: Option<Arc<str>>,
    message: Arc<Message>,
    reason: Reason,
}

impl DeadLetter {
    fn new(source: &Queue, message: Arc<Message>, reason: Reason, settle: bool) -> DeadLetter {
        DeadLetter {
            source: source.name.clone(),
            settle,
            exchange: source.settings.dead_letter_exchange.clone(),
            routing_key: source.settings.dead_letter_routing_key.clone(),
            message,
            reason,
        }
    }
}

/// Expired messages are taken at most this many per queue per tick, so an
/// expiring backlog never holds the lock for long.
const EXPIRE_PER_TICK: usize = 2048;

enum Enqueued {
    /// In the queue; `durable` when it must be stored with it.
    Accepted { durable: bool },
    /// Seen within the queue's deduplication window: confirmed, not queued.
    Duplicate,
    /// Refused by the queue's length limit.
    Rejected,
    /// Accepted and dropped at once by the length limit.
    Dropped,
    /// Numbered into a stream (journaled by the stream itself).
    Streamed,
}

/// What `queue.declare` asks for.
#[derive(Clone, Debug, Default)]
pub struct QueueDeclare<'a> {
    /// Empty: a server-generated name.
    pub name: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

impl<'a> QueueDeclare<'a> {
    /// A transient, shared queue with no arguments.
    pub fn named(name: &'a str) -> QueueDeclare<'a> {
        QueueDeclare { name, ..QueueDeclare::default() }
    }

    pub fn durable(self) -> QueueDeclare<'a> {
        QueueDeclare { durable: true, ..self }
    }

    pub fn with_arguments(self, arguments: FieldTable) -> QueueDeclare<'a> {
        QueueDeclare { arguments, ..self }
    }
}

/// What `exchange.declare` asks for.
#[derive(Clone, Debug, Default)]
pub struct ExchangeDeclare<'a> {
    pub name: &'a str,
    /// The type: `direct`, `fanout`, `topic`, `headers`, `x-delayed-message`.
    pub kind: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

impl<'a> ExchangeDeclare<'a> {
    /// A transient exchange of this type with no arguments.
    pub fn new(name: &'a str, kind: &'a str) -> ExchangeDeclare<'a> {
        ExchangeDeclare { name, kind, ..ExchangeDeclare::default() }
    }

    pub fn durable(self) -> ExchangeDeclare<'a> {
        ExchangeDeclare { durable: true, ..self }
    }

    pub fn with_arguments(self, arguments: FieldTable) -> ExchangeDeclare<'a> {
        ExchangeDeclare { arguments, ..self }
    }
}

/// What `basic.consume` asks for.
#[derive(Clone, Debug, Default)]
pub struct Consume<'a> {
    pub queue: &'a str,
    /// Empty: a server-generated tag.
    pub consumer_tag: &'a str,
    pub no_ack: bool,
    pub exclusive: bool,
    /// `x-priority` and the like.
    pub arguments: FieldTable,
}

impl<'a> Consume<'a> {
    /// An acknowledging, shared consumer with no arguments.
    pub fn new(queue: &'a str, consumer_tag: &'a str) -> Consume<'a> {
        Consume { queue, consumer_tag, ..Consume::default() }
    }
}

pub struct QueueDeclared {
    pub name: String,
    pub message_count: u32,
    pub consumer_count: u32,
}

pub struct VirtualHostState {
    pub name: String,
    exchanges: HashMap<Box<str>, Exchange>,
    queue_ids: HashMap<Box<str>, QueueId>,
    queues: HashMap<QueueId, Queue>,
    next_queue_id: QueueId,
    channels: HashMap<ChannelKey, ChannelState>,
    reply_tokens: HashMap<Box<str>, (ChannelKey, Arc<str>)>,
    dirty: Vec<QueueId>,
    next_consumer_id: u64,
    journal: Vec<JournalEvent>,
    loader: Option<Arc<dyn MessageLoader>>,
    /// Where streams' logs are (`set_streams`).
    streams: Option<Arc<dyn crate::stream::StreamStorage>>,
    clock: Arc<dyn Clock>,
    dead_letters: VecDeque<DeadLetter>,
    dead_lettering: bool,
    /// Queues with a TTL, an expiry or messages with their own expiration.
    timed: BTreeSet<QueueId>,
    /// Delayed-message exchanges holding scheduled messages.
    delaying: BTreeSet<Box<str>>,
    /// How many delayed-message exchanges exist: publishing skips the
    /// delay check while there are none.
    delayed_exchanges: usize,
    /// The clock as last read by a periodic call, for stamping deliveries
    /// without reading the clock per message.
    coarse_now: u64,
    /// Delivery acknowledgement timeout of queues without their own.
    default_consumer_timeout: Option<u64>,
    /// RabbitMQ's behaviour on a consumer timeout: close the channel.
    timeout_closes_channel: bool,
    /// Shortest consumer timeout of any queue declared so far.
    shortest_consumer_timeout: Option<u64>,
    policies: Vec<Policy>,
    /// The queue recovery last filled (recovery visits long runs of one).
    recovering: Option<(Arc<str>, QueueId)>,
    /// Recovered messages still inside a retry delay: (queue, seq, due),
    /// held back once the store can read them.
    recovered_retries: Vec<(QueueId, u64, u64)>,
    scratch_destinations: Vec<Destination>,
    /// A queue of another node is being declared here (a stand-in): its
    /// name may be a server-generated one (`amq.gen-`).
    declaring_shared: bool,
    scratch_queues: Vec<QueueId>,
    /// The virtual host's queue limit (RabbitMQ's `max-queues`).
    max_queues: Option<u64>,
    /// How much of each queue's head stays in memory.
    paging: crate::queue::Paging,
    /// Queues with bodies still to page out (their `paging_due` is set),
    /// for [`VirtualHostState::page_due`].
    paging_due: Vec<QueueId>,
    /// `basic.cancel` notifications for consumers of deleted queues, sent
    /// by [`VirtualHostState::send_notices`] after the reply to the method
    /// that caused them, as RabbitMQ orders them (`queue.delete-ok` first).
    cancel_notices: Vec<(Arc<dyn Outbox>, u16, Arc<str>)>,
    /// Counters of the whole virtual host.
    stats: crate::stats::MessageStats,
    churn: crate::stats::QueueChurn,
}

pub struct VirtualHost {
    state: Mutex<VirtualHostState>,
}

impl VirtualHost {
    pub fn new(name: &str) -> VirtualHost {
        VirtualHost { state: Mutex::new(VirtualHostState::new(name)) }
    }

    /// The state, locked. Outside the core, only the server's `Session`
    /// (which dispatches and writes the journal before unlocking) and the
    /// store's recovery and compaction take it.
    pub fn lock(&self) -> MutexGuard<'_, VirtualHostState> {
        self.state.lock()
    }
}

/// A count for an AMQP reply's 32-bit field (message and consumer counts),
/// saturated as RabbitMQ's are.
pub(crate) fn count_u32(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

pub use inspect::{BindingSummary, ChannelSummary, ConsumerSummary, ExchangeSummary, QueueSummary};
pub use replicated::{Outcome, Relay, RelayedConsumer, SharedQueue, ELSEWHERE, GOT};
pub use routing::dedup_key;

mod channels;
mod dead_letters;
mod dispatch;
mod durable;
mod inspect;
mod replicated;
mod routing;
mod streams;
mod timers;
mod topology;

fn soft(code: ReplyCode, text: impl std::fmt::Display) -> AmqpError {
    AmqpError::soft(code, text, 0, 0)
}

fn precondition(text: impl std::fmt::Display) -> AmqpError {
    soft(ReplyCode::PreconditionFailed, text)
}

impl VirtualHostState {
    pub fn new(name: &str) -> VirtualHostState {
        let mut state = VirtualHostState {
            name: name.to_string(),
            exchanges: HashMap::new(),
            queue_ids: HashMap::new(),
            queues: HashMap::new(),
            next_queue_id: 1,
            channels: HashMap::new(),
            reply_tokens: HashMap::new(),
            dirty: Vec::new(),
            next_consumer_id: 1,
            journal: Vec::new(),
            cancel_notices: Vec::new(),
            stats: crate::stats::MessageStats::default(),
            churn: crate::stats::QueueChurn::default(),
            loader: None,
            streams: None,
            clock: Arc::new(SystemClock),
            dead_letters: VecDeque::new(),
            dead_lettering: false,
            timed: BTreeSet::new(),
            delaying: BTreeSet::new(),
            delayed_exchanges: 0,
            coarse_now: 0,
            default_consumer_timeout: None,
            timeout_closes_channel: false,
            shortest_consumer_timeout: None,
            policies: Vec::new(),
            recovering: None,
            recovered_retries: Vec::new(),
            scratch_destinations: Vec::new(),
            declaring_shared: false,
            scratch_queues: Vec::new(),
            max_queues: None,
            paging: crate::queue::Paging::default(),
            paging_due: Vec::new(),
        };
        for (name, kind) in [
            ("amq.direct", ExchangeKind::Direct),
            ("amq.fanout", ExchangeKind::Fanout),
            ("amq.topic", ExchangeKind::Topic),
            ("amq.headers", ExchangeKind::Headers),
            ("amq.match", ExchangeKind::Headers),
        ] {
            state.exchanges.insert(name.into(), Exchange::new(name, kind, true, false, false, FieldTable::default()));
        }
        state
    }
    fn not_found_queue(&self, name: &str) -> AmqpError {
        soft(ReplyCode::NotFound, format!("no queue '{name}' in vhost '{}'", self.name))
    }
    fn not_found_exchange(&self, name: &str) -> AmqpError {
        soft(ReplyCode::NotFound, format!("no exchange '{name}' in vhost '{}'", self.name))
    }
    fn locked(&self, name: &str) -> AmqpError {
        soft(
            ReplyCode::ResourceLocked,
            format!(
                "cannot obtain exclusive access to locked queue '{name}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                self.name
            ),
        )
    }
    /// Looks a queue up on behalf of a connection (404 / 405).
    fn queue_id(&self, connection: ConnectionId, name: &str) -> Result<QueueId, AmqpError> {
        let id = *self.queue_ids.get(name).ok_or_else(|| self.not_found_queue(name))?;
        match self.queues.get(&id) {
            Some(queue) if queue.is_exclusive_to_other(connection) => Err(self.locked(name)),
            Some(_) => Ok(id),
            None => Err(self.not_found_queue(name)),
        }
    }
    pub fn queue(&self, name: &str) -> Option<&Queue> {
        self.queue_ids.get(name).and_then(|id| self.queues.get(id))
    }
    pub fn exchange(&self, name: &str) -> Option<&Exchange> {
        self.exchanges.get(name)
    }
    pub fn queue_names(&self) -> Vec<String> {
        self.queue_ids.keys().map(|k| k.to_string()).collect()
    }
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
    }
    /// Replaces the policies and applies them to every queue and exchange.
    pub fn set_policies(&mut self, policies: Vec<Policy>) {
        self.policies = policies;
        let ids: Vec<QueueId> = self.queues.keys().copied().collect();
        for id in ids {
            let Some(queue) = self.queues.get(&id) else { continue };
            let settings = self.queue_settings(&queue.name, &queue.arguments);
            if let Ok(settings) = settings {
                if settings.is_timed() {
                    self.timed.insert(id);
                }
                self.note_consumer_timeout(&settings);
                if let Some(queue) = self.queues.get_mut(&id) {
                    queue.update_settings(settings);
                }
            }
        }
        for exchange in self.exchanges.values_mut() {
            let policy = policy::effective(&self.policies, &exchange.name, false);
            exchange.alternate_exchange = policy::alternate_exchange(&exchange.arguments, policy).map(Into::into);
        }
    }
    /// A queue's settings: its arguments with its policy folded in.
    fn queue_settings(&self, name: &str, arguments: &FieldTable) -> Result<QueueSettings, (&'static str, String)> {
        match policy::effective(&self.policies, name, true) {
            Some(policy) => QueueSettings::from_arguments(&policy::merge(arguments, &policy.definition)),
            None => QueueSettings::from_arguments(arguments),
        }
    }
    fn note_consumer_timeout(&mut self, settings: &QueueSettings) {
        if let Some(timeout) = settings.consumer_timeout_ms {
            self.shortest_consumer_timeout = Some(self.shortest_consumer_timeout.map_or(timeout, |t| t.min(timeout)));
        }
    }
    /// Sets the delivery acknowledgement timeout of queues that have no
    /// `x-consumer-timeout`.
    pub fn set_consumer_timeout(&mut self, millis: Option<u64>) {
        self.default_consumer_timeout = millis;
    }
    pub fn set_max_queues(&mut self, max: Option<u64>) {
        self.max_queues = max;
    }
    pub fn channel_consumer_count(&self, key: ChannelKey) -> usize {
        self.channels.get(&key).map_or(0, |c| c.consumers.len())
    }
    /// New in-memory bounds for every queue (settings, or memory pressure
    /// starting or ending); queues now over theirs are paged out by
    /// [`VirtualHostState::page_due`].
    pub fn set_paging(&mut self, paging: crate::queue::Paging) {
        if self.paging == paging {
            return;
        }
        self.paging = paging;
        for (id, queue) in &mut self.queues {
            queue.paging = paging;
            if !queue.paging_due && queue.needs_paging() {
                queue.paging_due = true;
                self.paging_due.push(*id);
            }
        }
    }
    /// True while some queue has bodies to page out.
    pub fn has_paging_due(&self) -> bool {
        !self.paging_due.is_empty()
    }
    /// Pages out up to `budget` bodies from the queues that have some
    /// waiting: what publishes left (paging trails a burst, or waits for
    /// log entries to be written) and what a shrunken window freed. Call it
    /// often (every few milliseconds); it holds the lock for its budget.
    pub fn page_due(&mut self, budget: usize) {
        let Some(loader) = self.loader.clone() else {
            // Nowhere to page to: nothing is due.
            for id in self.paging_due.drain(..) {
                if let Some(queue) = self.queues.get_mut(&id) {
                    queue.paging_due = false;
                }
            }
            return;
        };
        let mut left = budget;
        let mut kept = Vec::new();
        for id in std::mem::take(&mut self.paging_due) {
            let Some(queue) = self.queues.get_mut(&id) else { continue };
            if left > 0 {
                left -= queue.page_out(loader.as_ref(), left);
            }
            if queue.needs_paging() {
                kept.push(id);
            } else {
                queue.paging_due = false;
            }
        }
        self.paging_due = kept;
    }
    /// Makes a consumer timeout close the channel (406), as RabbitMQ does,
    /// instead of taking the delivery back.
    pub fn set_consumer_timeout_closes_channel(&mut self, close: bool) {
        self.timeout_closes_channel = close;
    }
    fn mark_dirty(&mut self, queue: QueueId) {
        if !self.dirty.contains(&queue) {
            self.dirty.push(queue);
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod model;
