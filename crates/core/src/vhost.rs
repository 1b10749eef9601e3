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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use warren_codec::reply::{AmqpError, ReplyCode};
use warren_codec::types::FieldTable;

use crate::dead_letter::{self, Reason};
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind, DELAYED_PREFIX, DELAYED_TYPE};
use crate::message::Message;
use crate::policy::{self, Policy};
use crate::queue::{MessageLoader, Queue, QueueConsumer, QueuedMessage, LOADED_WINDOW};
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
}

impl ChannelState {
    fn can_deliver(&self, tag: &str, size: usize) -> bool {
        if !self.flow_active || self.outbox.is_congested() {
            return false;
        }
        let Some(consumer) = self.consumers.get(tag) else {
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
    /// (`x-delivery-limit`, `x-retry-*`); `returns` is its count so far.
    Returned { queue: Arc<str>, stored: u64, returns: u64 },
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
    scratch_destinations: Vec<Destination>,
    scratch_queues: Vec<QueueId>,
    /// The virtual host's queue limit (RabbitMQ's `max-queues`).
    max_queues: Option<u64>,
    /// `basic.cancel` notifications for consumers of deleted queues, sent
    /// by [`VirtualHostState::send_notices`] after the reply to the method
    /// that caused them, as RabbitMQ orders them (`queue.delete-ok` first).
    cancel_notices: Vec<(Arc<dyn Outbox>, u16, Arc<str>)>,
}

pub struct VirtualHost {
    state: Mutex<VirtualHostState>,
}

impl VirtualHost {
    pub fn new(name: &str) -> VirtualHost {
        VirtualHost { state: Mutex::new(VirtualHostState::new(name)) }
    }

    pub fn lock(&self) -> MutexGuard<'_, VirtualHostState> {
        self.state.lock()
    }
}

fn soft(code: ReplyCode, text: impl std::fmt::Display) -> AmqpError {
    AmqpError::soft(code, text, 0, 0)
}

fn precondition(text: impl std::fmt::Display) -> AmqpError {
    soft(ReplyCode::PreconditionFailed, text)
}

fn bool_str(value: bool) -> &'static str {
    if value {
        "true"
    } else {
        "false"
    }
}

/// Queue arguments whose values must be equal on redeclaration.
const EQUIVALENT_QUEUE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-queue-type",
    "x-queue-mode",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-queue-master-locator",
];

fn describe(value: Option<&warren_codec::types::AMQPValue>) -> String {
    use warren_codec::types::AMQPValue as V;
    match value {
        None => "none".into(),
        Some(v) => match v {
            V::LongString(_) | V::ShortString(_) => {
                format!("the value '{}' of type 'longstr'", warren_codec::table::as_str(v).unwrap_or(""))
            }
            V::Boolean(b) => format!("the value '{b}' of type 'bool'"),
            other => match warren_codec::table::as_i64(other) {
                Some(n) => format!("the value '{n}' of type '{}'", int_type(other)),
                None => format!("the value '{other:?}'"),
            },
        },
    }
}

/// A value as RabbitMQ quotes it when both sides of a comparison have one.
fn plain(value: &warren_codec::types::AMQPValue) -> String {
    use warren_codec::types::AMQPValue as V;
    match value {
        V::Boolean(b) => b.to_string(),
        other => warren_codec::table::as_str(other)
            .map(str::to_string)
            .or_else(|| warren_codec::table::as_i64(other).map(|n| n.to_string()))
            .unwrap_or_else(|| format!("{other:?}")),
    }
}

/// Argument equality as RabbitMQ sees it: integers compare by value
/// whatever their width.
fn equivalent(a: Option<&warren_codec::types::AMQPValue>, b: Option<&warren_codec::types::AMQPValue>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => match (warren_codec::table::as_i64(x), warren_codec::table::as_i64(y)) {
            (Some(m), Some(n)) => m == n,
            _ => x == y,
        },
        (None, None) => true,
        _ => false,
    }
}

/// Types of the queue arguments Warren knows, checked on declaration.
fn validate_queue_argument(key: &str, value: &warren_codec::types::AMQPValue) -> Result<(), &'static str> {
    use warren_codec::types::AMQPValue as V;
    let type_name = match value {
        V::LongString(_) | V::ShortString(_) => "longstr",
        V::Boolean(_) => "bool",
        V::FieldTable(_) => "table",
        V::FieldArray(_) => "array",
        V::Void => "void",
        V::Float(_) | V::Double(_) => "double",
        V::ByteArray(_) => "binary",
        _ => "integer",
    };
    let wants_integer = matches!(
        key,
        "x-message-ttl" | "x-expires" | "x-max-length" | "x-max-length-bytes" | "x-max-priority" | "x-delivery-limit"
    );
    let wants_string = matches!(
        key,
        "x-dead-letter-exchange" | "x-dead-letter-routing-key" | "x-overflow" | "x-queue-type" | "x-queue-mode"
    );
    if wants_integer && type_name != "integer" {
        return Err(match type_name {
            "longstr" => "expected integer, got longstr",
            "bool" => "expected integer, got bool",
            _ => "expected integer",
        });
    }
    if wants_string && type_name != "longstr" {
        return Err("expected longstr");
    }
    Ok(())
}

/// A message's deduplication key: its `x-deduplication-header` header (a
/// string or bytes; other values by their text), else its `message_id`.
fn dedup_key(message: &Message) -> Option<Vec<u8>> {
    let properties = message.properties_view();
    if let Some(headers) = properties.headers() {
        if let Some(value) = warren_codec::table::get(&headers, "x-deduplication-header") {
            return Some(match value {
                warren_codec::types::AMQPValue::ByteArray(bytes) => bytes.as_slice().to_vec(),
                other => match warren_codec::table::as_str(other) {
                    Some(text) => text.as_bytes().to_vec(),
                    None => warren_codec::table::as_i64(other)
                        .map_or_else(|| format!("{other:?}"), |n| n.to_string())
                        .into_bytes(),
                },
            });
        }
    }
    properties.message_id().map(|id| id.as_bytes().to_vec())
}

/// Deterministic noise in [-1, 1] for retry jitter (splitmix64 of the
/// message's sequence number and attempt).
fn noise(seq: u64, attempt: u64) -> f64 {
    let mut z = seq ^ attempt.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// The `x-delay` header of a message, in milliseconds.
fn delay_of(message: &Message) -> Option<u64> {
    let headers = message.properties_view().headers()?;
    let value = warren_codec::table::get(&headers, "x-delay")?;
    let delay = warren_codec::table::as_i64(value)
        .or_else(|| warren_codec::table::as_str(value).and_then(|s| s.trim().parse().ok()))?;
    Some(delay.max(0) as u64)
}

/// When a scheduled message is due: its arrival plus its delay.
fn due_of(message: &Message) -> u64 {
    message.arrived().saturating_add(delay_of(message).unwrap_or(0))
}

/// The consumer the next message of `queue` goes to: round-robin among the
/// highest-priority consumers that can take it, lower priorities only when
/// all higher ones are full; with a single active consumer, only the first
/// registered one.
fn pick_consumer(queue: &mut Queue, channels: &HashMap<ChannelKey, ChannelState>, size: usize) -> Option<usize> {
    let can_take = |consumer: &QueueConsumer| {
        channels.get(&consumer.channel).is_some_and(|channel| channel.can_deliver(&consumer.tag, size))
    };
    if queue.settings.single_active_consumer {
        return queue.consumers.first().filter(|c| can_take(c)).map(|_| 0);
    }
    let count = queue.consumers.len();
    let mut start = 0;
    while start < count {
        let priority = queue.consumers[start].priority;
        let group = queue.consumers[start..].iter().take_while(|c| c.priority == priority).count();
        for k in 0..group {
            let index = start + (queue.cursor + k) % group;
            if can_take(&queue.consumers[index]) {
                queue.cursor = index - start + 1;
                return Some(index);
            }
        }
        start += group;
    }
    None
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
            loader: None,
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
            scratch_destinations: Vec::new(),
            scratch_queues: Vec::new(),
            max_queues: None,
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

    /// Types and values of a declaration's arguments, as RabbitMQ checks them.
    fn check_queue_arguments(&self, name: &str, arguments: &FieldTable) -> Result<(), AmqpError> {
        for (key, value) in arguments.inner() {
            let key = key.as_str();
            if matches!(key, "x-dead-letter-exchange" | "x-dead-letter-routing-key")
                && warren_codec::table::as_str(value).is_none()
            {
                return Err(precondition(format!(
                    "invalid type '{}' for arg '{key}' in queue '{name}' in vhost '{}'",
                    value_type(value),
                    self.name
                )));
            }
            if let Err(problem) = validate_queue_argument(key, value) {
                return Err(precondition(format!(
                    "invalid arg '{key}' for queue '{name}' in vhost '{}': \"{problem}\"",
                    self.name
                )));
            }
        }
        QueueSettings::from_arguments(arguments).map_err(|(key, problem)| {
            precondition(format!("invalid arg '{key}' for queue '{name}' in vhost '{}': {problem}", self.name))
        })?;
        Ok(())
    }

    fn type_refusal(&self, name: &str, queue_type: QueueType, refusal: TypeRefusal) -> AmqpError {
        let vhost = &self.name;
        precondition(match refusal {
            TypeRefusal::UnknownType(problem) => {
                format!("invalid arg 'x-queue-type' for queue '{name}' in vhost '{vhost}': {problem}")
            }
            TypeRefusal::Argument(key) => format!(
                "invalid arg '{key}' for queue '{name}' in vhost '{vhost}' of queue type {}",
                queue_type.rabbitmq_name()
            ),
            TypeRefusal::Property(property) => {
                format!("invalid property '{property}' for queue '{name}' in vhost '{vhost}'")
            }
        })
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

    /// Moves the journal events recorded so far into `out`.
    pub fn drain_journal(&mut self, out: &mut Vec<JournalEvent>) {
        out.append(&mut self.journal);
    }

    pub fn has_journal(&self) -> bool {
        !self.journal.is_empty()
    }

    fn settled(&mut self, unacked: &Unacked) {
        let Some(q) = self.queues.get_mut(&unacked.queue) else {
            return;
        };
        if !q.returns.is_empty() {
            q.returns.remove(&unacked.seq);
        }
        let stored = unacked.message.stored_index();
        if stored != 0 && q.durable {
            self.journal.push(JournalEvent::Settled { queue: q.name.clone(), stored });
        }
    }

    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
    }

    /// True while some queue has a TTL, an expiry or expiring messages:
    /// [`VirtualHostState::tick`] then has work.
    pub fn has_timers(&self) -> bool {
        !self.timed.is_empty() || !self.delaying.is_empty()
    }

    /// Expires messages whose deadline passed (wherever they are in their
    /// queue) and queues unused for longer than `x-expires`. Call it often
    /// (every 10 ms): it does a bounded amount of work each time.
    pub fn tick(&mut self) {
        let now = self.clock.now_ms();
        self.coarse_now = now;
        let ids: Vec<QueueId> = self.timed.iter().copied().collect();
        let mut expired = Vec::new();
        for id in ids {
            let Some(queue) = self.queues.get_mut(&id) else {
                self.timed.remove(&id);
                continue;
            };
            if let Some(expires) = queue.settings.expires {
                if queue.consumers.is_empty() && now.saturating_sub(queue.last_used) >= expires {
                    tracing::debug!(queue = %queue.name, "queue expired");
                    self.remove_queue(id);
                    continue;
                }
            }
            expired.clear();
            if queue.settings.has_ttl() {
                let need_body =
                    queue.settings.dead_letter_exchange.is_some() || queue.settings.max_length_bytes.is_some();
                let mut taken = 0;
                while taken < EXPIRE_PER_TICK {
                    taken += 1;
                    match queue.pop_expired_head(now, self.loader.as_deref(), need_body) {
                        Some(Ok(message)) => expired.push(message),
                        Some(Err(stored)) if queue.durable => {
                            self.journal.push(JournalEvent::Settled { queue: queue.name.clone(), stored })
                        }
                        Some(Err(_)) => {}
                        None => break,
                    }
                }
            }
            queue.pop_expired_anywhere(now, self.loader.as_deref(), &mut expired);
            queue.dedup.expire(now);
            if queue.release_retries(now) > 0 && !queue.consumers.is_empty() && !self.dirty.contains(&id) {
                self.dirty.push(id);
            }
            if !queue.settings.is_timed() && queue.next_expiry().is_none() && queue.retrying().next().is_none() {
                self.timed.remove(&id);
            }
            for message in expired.drain(..) {
                self.dead_letter(id, message, Reason::Expired);
            }
            self.settle_unreadable(id);
        }
        self.process_dead_letters();
        self.release_delayed(now);
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
        if let Some(timeout) = settings.consumer_timeout {
            self.shortest_consumer_timeout = Some(self.shortest_consumer_timeout.map_or(timeout, |t| t.min(timeout)));
        }
    }

    /// Deduplication windows of durable queues that changed since the last
    /// call: (queue, [(key, forgotten at ms)]).
    pub fn take_dedup_changes(&mut self) -> Vec<(String, DedupEntries)> {
        let mut changed = Vec::new();
        for queue in self.queues.values_mut().filter(|q| q.durable && q.dedup.changed) {
            queue.dedup.changed = false;
            let entries = queue.dedup.entries().map(|(key, until)| (key.to_vec(), until)).collect();
            changed.push((queue.name.to_string(), entries));
        }
        changed
    }

    /// Restores a durable queue's deduplication keys (at start).
    pub fn restore_dedup(&mut self, queue: &str, entries: &[(Vec<u8>, u64)]) {
        let now = self.clock.now_ms();
        let Some(q) = self.queue_ids.get(queue).and_then(|id| self.queues.get_mut(id)) else { return };
        let Some(dedup) = q.settings.dedup else { return };
        let mut sorted: Vec<&(Vec<u8>, u64)> = entries.iter().filter(|(_, until)| *until > now).collect();
        sorted.sort_by_key(|(_, until)| *until);
        for (key, until) in sorted {
            q.dedup.remember(Arc::from(key.as_slice()), *until, dedup.max_keys);
        }
        q.dedup.changed = false;
    }

    /// Sets the delivery acknowledgement timeout of queues that have no
    /// `x-consumer-timeout`.
    pub fn set_consumer_timeout(&mut self, millis: Option<u64>) {
        self.default_consumer_timeout = millis;
    }

    /// Makes a consumer timeout close the channel (406), as RabbitMQ does,
    /// instead of taking the delivery back.
    pub fn set_max_queues(&mut self, max: Option<u64>) {
        self.max_queues = max;
    }

    pub fn channel_consumer_count(&self, key: ChannelKey) -> usize {
        self.channels.get(&key).map_or(0, |c| c.consumers.len())
    }

    /// Deletes every queue (their stored messages settled) and every
    /// exchange but the predeclared ones: the virtual host is going away.
    pub fn delete_everything(&mut self) {
        let ids: Vec<QueueId> = self.queues.keys().copied().collect();
        for id in ids {
            self.remove_queue(id);
        }
        let names: Vec<String> =
            self.exchanges.keys().filter(|n| !n.is_empty() && !n.starts_with("amq.")).map(|n| n.to_string()).collect();
        for name in names {
            let _ = self.delete_exchange(&name, false);
        }
    }

    pub fn set_consumer_timeout_closes_channel(&mut self, close: bool) {
        self.timeout_closes_channel = close;
    }

    /// Takes back deliveries unacknowledged for longer than their queue's
    /// consumer timeout: they return to their queue (or wait for a retry)
    /// with their delivery count raised, and the channel stays open; a late
    /// ack of one is ignored. Call it periodically (every 100 ms).
    pub fn check_consumer_timeouts(&mut self) {
        let now = self.clock.now_ms();
        self.coarse_now = now;
        let shortest = match (self.default_consumer_timeout, self.shortest_consumer_timeout) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(timeout) => timeout,
                None => return,
            },
        };
        let mut expired: Vec<(ChannelKey, u64)> = Vec::new();
        for (key, channel) in self.channels.iter_mut().filter(|(_, c)| !c.failing) {
            // Oldest first: stop at the first delivery younger than the
            // shortest timeout.
            for unacked in channel.unacked.iter().take_while(|u| u.delivered_at.saturating_add(shortest) <= now) {
                let timeout = self
                    .queues
                    .get(&unacked.queue)
                    .and_then(|q| q.settings.consumer_timeout(self.default_consumer_timeout));
                if let Some(timeout) = timeout.filter(|t| unacked.delivered_at.saturating_add(*t) <= now) {
                    if self.timeout_closes_channel {
                        // RabbitMQ's wording; the connection closes the
                        // channel, which requeues its deliveries.
                        let text = format!(
                            "delivery acknowledgement on channel {} timed out. Timeout value used: {timeout} ms. This timeout value can be configured, see consumers doc guide to learn more",
                            key.channel
                        );
                        channel.outbox.fail_channel(key.channel, &text);
                        channel.failing = true;
                        break;
                    }
                    expired.push((*key, unacked.delivery_tag));
                }
            }
        }
        for (key, delivery_tag) in expired {
            let Ok(taken) = self.take_unacked(key, delivery_tag, false) else { continue };
            if let Some(channel) = self.channels.get_mut(&key) {
                channel.timed_out.insert(delivery_tag);
            }
            for unacked in taken {
                tracing::info!(
                    connection = key.connection,
                    channel = key.channel,
                    delivery_tag,
                    "delivery not acknowledged in time: taken back"
                );
                self.give_up(unacked, Reason::Expired);
            }
        }
        self.run_dispatch();
    }

    /// Routes scheduled messages that are due (at most `DELAYED_PER_TICK`
    /// per exchange per tick).
    fn release_delayed(&mut self, now: u64) {
        const DELAYED_PER_TICK: usize = 10_000;
        let names: Vec<Box<str>> = self.delaying.iter().cloned().collect();
        let readable = self.loader.as_ref().map_or(0, |l| l.readable_upto());
        let (mut due, mut unreadable) = (Vec::new(), Vec::new());
        for name in names {
            let Some(exchange) = self.exchanges.get_mut(&name) else {
                self.delaying.remove(&name);
                continue;
            };
            let durable = exchange.durable;
            let Some(delayed) = exchange.delayed.as_mut() else {
                self.delaying.remove(&name);
                continue;
            };
            delayed.scheduler.settle_staging(readable, self.loader.as_deref(), due_of);
            due.clear();
            delayed.scheduler.pop_due(now, DELAYED_PER_TICK, self.loader.as_deref(), &mut due, &mut unreadable);
            if delayed.scheduler.is_empty() {
                self.delaying.remove(&name);
            }
            let store_name = delayed.store_name.clone();
            for stored in unreadable.drain(..) {
                self.journal.push(JournalEvent::Settled { queue: store_name.clone(), stored });
            }
            for message in due.drain(..) {
                // Routed as a new message; its scheduled copy is settled
                // after the routed one is journaled.
                let scheduled = message.stored_index();
                // As the plugin: the released message carries `x-delay`
                // negated, so publishing it to a delayed exchange again does
                // not delay it twice.
                let message = Arc::new(dead_letter::with_header(
                    &message,
                    "x-delay",
                    warren_codec::types::AMQPValue::LongInt(
                        -(delay_of(&message).unwrap_or(0).min(i32::MAX as u64) as i32),
                    ),
                ));
                let mut queues = Vec::new();
                let cc = dead_letter::cc_keys(&message);
                self.route_message(&name, &message, &cc, &mut queues);
                self.enqueue_all(&queues, &message);
                if durable && scheduled != 0 {
                    self.journal.push(JournalEvent::Settled { queue: store_name.clone(), stored: scheduled });
                }
            }
        }
        self.process_dead_letters();
    }

    /// Queues a message that left queue `id` for good to be dead-lettered
    /// (or just settled when the queue has no dead-letter exchange).
    fn dead_letter(&mut self, id: QueueId, entry: QueuedMessage, reason: Reason) {
        let Some(queue) = self.queues.get_mut(&id) else {
            return;
        };
        if !queue.returns.is_empty() {
            queue.returns.remove(&entry.seq);
        }
        let settle = queue.durable && entry.message.stored_index() != 0;
        self.dead_letters.push_back(DeadLetter::new(queue, entry.message, reason, settle));
    }

    /// Routes queued dead letters to their exchanges. The copy is journaled
    /// before the original is settled, so a crash in between duplicates a
    /// message rather than losing it. Dead letters caused by enqueueing a
    /// dead letter (a full target queue) are handled in the same loop, not
    /// recursively.
    fn process_dead_letters(&mut self) {
        if self.dead_lettering {
            return;
        }
        self.dead_lettering = true;
        while let Some(dead) = self.dead_letters.pop_front() {
            if let Some(exchange) = dead.exchange.as_deref() {
                if exchange.is_empty() || self.exchanges.contains_key(exchange) {
                    let target =
                        dead_letter::Target { queue: &dead.source, exchange, routing_key: dead.routing_key.as_deref() };
                    let (copy, keys) =
                        dead_letter::copy(&dead.message, dead.reason, &target, self.clock.now_ms() / 1000);
                    let copy = Arc::new(copy);
                    let mut queues = Vec::new();
                    self.route_message(exchange, &copy, keys.get(1..).unwrap_or_default(), &mut queues);
                    if dead.reason != Reason::Rejected {
                        queues.retain(|id| match self.queues.get(id) {
                            Some(q) if dead_letter::cycles(&copy, &q.name) => {
                                tracing::warn!(queue = %q.name, "dead-letter cycle detected: message dropped");
                                false
                            }
                            _ => true,
                        });
                    }
                    self.enqueue_all(&queues, &copy);
                } else {
                    tracing::debug!(exchange, queue = %dead.source, "dead-letter exchange missing: message dropped");
                }
            }
            let stored = dead.message.stored_index();
            if dead.settle && stored != 0 {
                self.journal.push(JournalEvent::Settled { queue: dead.source, stored });
            }
        }
        self.dead_lettering = false;
    }

    fn mark_dirty(&mut self, queue: QueueId) {
        if !self.dirty.contains(&queue) {
            self.dirty.push(queue);
        }
    }

    // ---- durable state ----------------------------------------------------

    /// The durable exchanges, queues and bindings (exclusive queues excluded).
    pub fn durable_definitions(&self) -> Definitions {
        let mut definitions = Definitions::default();
        let durable_queue = |id: &QueueId| self.queues.get(id).filter(|q| q.durable && q.exclusive_owner.is_none());
        for exchange in self.exchanges.values().filter(|x| x.durable) {
            if !exchange.name.starts_with("amq.") {
                definitions.exchanges.push(ExchangeDefinition {
                    name: exchange.name.to_string(),
                    kind: exchange.type_name().to_string(),
                    auto_delete: exchange.auto_delete,
                    internal: exchange.internal,
                    arguments: exchange.arguments.clone(),
                });
            }
            for binding in exchange.bindings() {
                let (destination, destination_is_queue) = match &binding.destination {
                    Destination::Queue(id) => match durable_queue(id) {
                        Some(q) => (q.name.to_string(), true),
                        None => continue,
                    },
                    Destination::Exchange(name) => match self.exchanges.get(&**name) {
                        Some(x) if x.durable => (name.to_string(), false),
                        _ => continue,
                    },
                };
                definitions.bindings.push(BindingDefinition {
                    source: exchange.name.to_string(),
                    destination,
                    destination_is_queue,
                    routing_key: binding.routing_key.to_string(),
                    arguments: binding.arguments.clone(),
                });
            }
        }
        for queue in self.queues.values().filter(|q| q.durable && q.exclusive_owner.is_none()) {
            definitions.queues.push(QueueDefinition {
                name: queue.name.to_string(),
                auto_delete: queue.auto_delete,
                arguments: queue.arguments.clone(),
            });
        }
        definitions.exchanges.sort_by(|a, b| a.name.cmp(&b.name));
        definitions.queues.sort_by(|a, b| a.name.cmp(&b.name));
        definitions
    }

    /// Declares stored definitions (at start, before any client).
    pub fn restore(&mut self, definitions: &Definitions) {
        for x in &definitions.exchanges {
            if let Err(error) =
                self.declare_exchange(&x.name, &x.kind, false, true, x.auto_delete, x.internal, x.arguments.clone())
            {
                tracing::warn!(exchange = %x.name, %error, "stored exchange not restored");
            }
        }
        for q in &definitions.queues {
            if let Err(error) = self.declare_queue(0, &q.name, false, true, false, q.auto_delete, q.arguments.clone()) {
                tracing::warn!(queue = %q.name, %error, "stored queue not restored");
            }
        }
        for b in &definitions.bindings {
            let result = if b.destination_is_queue {
                self.bind_queue(0, &b.destination, &b.source, &b.routing_key, b.arguments.clone(), true)
            } else {
                self.bind_exchange(&b.destination, &b.source, &b.routing_key, b.arguments.clone(), true)
            };
            if let Err(error) = result {
                tracing::warn!(source = %b.source, destination = %b.destination, %error, "stored binding not restored");
            }
        }
        // Restored from the store: nothing to write back.
        self.journal.clear();
    }

    /// Puts a message recovered from the store back into a durable queue,
    /// paged out (read back from the log when delivered).
    pub fn recover_stored(&mut self, queue: &str, stored: u64, size: u64, priority: u8, returns: u64) -> bool {
        if let Some(exchange) = queue.strip_prefix(DELAYED_PREFIX) {
            return match self.exchanges.get_mut(exchange).and_then(|x| x.delayed.as_mut()) {
                Some(delayed) => {
                    delayed.scheduler.recover(stored);
                    self.delaying.insert(exchange.into());
                    true
                }
                None => false,
            };
        }
        let id = match &self.recovering {
            Some((name, id)) if &**name == queue => Some(*id),
            _ => self.queue_ids.get(queue).copied(),
        };
        match id.and_then(|id| self.queues.get_mut(&id)) {
            Some(q) if q.durable => {
                if self.recovering.as_ref().is_none_or(|(_, id)| *id != q.id) {
                    self.recovering = Some((q.name.clone(), q.id));
                }
                let seq = q.push_stored(stored, size, priority);
                if returns > 0 {
                    q.returns.insert(seq, returns);
                }
                true
            }
            _ => false,
        }
    }

    /// Stored messages whose log index is in `range`, with the durable
    /// queues holding them (ready or unacked), for compaction.
    pub fn stored_in(&self, range: std::ops::Range<u64>) -> Vec<(u64, Vec<Arc<str>>)> {
        let mut found: std::collections::BTreeMap<u64, Vec<Arc<str>>> = std::collections::BTreeMap::new();
        for queue in self.queues.values().filter(|q| q.durable) {
            queue.for_each_entry(|entry| {
                if range.contains(&entry.stored) {
                    found.entry(entry.stored).or_default().push(queue.name.clone());
                }
            });
            for stored in queue.retrying().map(|m| m.stored_index()).filter(|s| range.contains(s)) {
                found.entry(stored).or_default().push(queue.name.clone());
            }
        }
        for channel in self.channels.values() {
            for unacked in &channel.unacked {
                let stored = unacked.message.stored_index();
                if range.contains(&stored) {
                    if let Some(queue) = self.queues.get(&unacked.queue).filter(|q| q.durable) {
                        found.entry(stored).or_default().push(queue.name.clone());
                    }
                }
            }
        }
        for exchange in self.exchanges.values().filter(|x| x.durable) {
            if let Some(delayed) = &exchange.delayed {
                for stored in delayed.scheduler.stored().filter(|s| range.contains(s)) {
                    found.entry(stored).or_default().push(delayed.store_name.clone());
                }
            }
        }
        found.into_iter().collect()
    }

    /// Re-keys stored messages moved to new log indices (compaction).
    pub fn rekey_stored(&mut self, moved: &HashMap<u64, u64>) {
        for queue in self.queues.values_mut().filter(|q| q.durable) {
            queue.for_each_entry(|entry| {
                if let Some(message) = entry.message {
                    if let Some(new) = moved.get(&entry.stored) {
                        message.set_stored_index(*new);
                    }
                }
            });
            for message in queue.retrying() {
                if let Some(new) = moved.get(&message.stored_index()) {
                    message.set_stored_index(*new);
                }
            }
            queue.rekey(moved);
        }
        for channel in self.channels.values() {
            for unacked in &channel.unacked {
                if let Some(new) = moved.get(&unacked.message.stored_index()) {
                    unacked.message.set_stored_index(*new);
                }
            }
        }
        for exchange in self.exchanges.values_mut() {
            if let Some(delayed) = &mut exchange.delayed {
                delayed.scheduler.rekey(moved);
            }
        }
    }

    /// Where paged-out messages are read back from.
    pub fn set_loader(&mut self, loader: Arc<dyn MessageLoader>) {
        self.loader = Some(loader);
    }

    // ---- channels -------------------------------------------------------

    pub fn open_channel(&mut self, key: ChannelKey, outbox: Arc<dyn Outbox>) {
        self.channels.insert(
            key,
            ChannelState {
                outbox,
                next_delivery_tag: 0,
                unacked: VecDeque::new(),
                unacked_bytes: 0,
                consumers: HashMap::new(),
                prefetch_count: 0,
                prefetch_size: 0,
                consumer_prefetch: 0,
                flow_active: true,
                reply_consumer: None,
                timed_out: BTreeSet::new(),
                failing: false,
            },
        );
    }

    /// Closes a channel: its consumers go away and its unacked messages
    /// return to their queues, marked redelivered.
    pub fn close_channel(&mut self, key: ChannelKey) {
        let Some(channel) = self.channels.remove(&key) else {
            return;
        };
        if let Some((token, _)) = &channel.reply_consumer {
            self.reply_tokens.remove(token);
        }
        for unacked in channel.unacked.into_iter().rev() {
            self.requeue(unacked);
        }
        for (tag, consumer) in channel.consumers {
            self.detach_consumer(consumer.queue, key, &tag);
        }
        self.run_dispatch();
    }

    /// Closes every channel of a connection and deletes its exclusive queues.
    pub fn close_connection(&mut self, connection: ConnectionId) {
        let keys: Vec<ChannelKey> = self.channels.keys().filter(|k| k.connection == connection).copied().collect();
        for key in keys {
            self.close_channel(key);
        }
        let exclusive: Vec<QueueId> =
            self.queues.values().filter(|q| q.exclusive_owner == Some(connection)).map(|q| q.id).collect();
        for id in exclusive {
            self.remove_queue(id);
        }
        self.send_notices();
    }

    /// Delivers again to a connection that was congested.
    pub fn resume_connection(&mut self, connection: ConnectionId) {
        let queues: Vec<QueueId> = self
            .channels
            .iter()
            .filter(|(k, _)| k.connection == connection)
            .flat_map(|(_, c)| c.consumers.values().map(|c| c.queue))
            .collect();
        for queue in queues {
            self.mark_dirty(queue);
        }
        self.run_dispatch();
    }

    /// The queues a channel's consumers read from may deliver again.
    fn channel_queues_dirty(&mut self, key: ChannelKey) {
        let queues: Vec<QueueId> =
            self.channels.get(&key).map(|c| c.consumers.values().map(|c| c.queue).collect()).unwrap_or_default();
        for queue in queues {
            self.mark_dirty(queue);
        }
    }

    pub fn qos(&mut self, key: ChannelKey, prefetch_size: u32, prefetch_count: u16, global: bool) {
        if let Some(channel) = self.channels.get_mut(&key) {
            if global {
                channel.prefetch_count = prefetch_count;
            } else {
                channel.consumer_prefetch = prefetch_count;
            }
            channel.prefetch_size = prefetch_size;
        }
        self.channel_queues_dirty(key);
    }

    pub fn flow(&mut self, key: ChannelKey, active: bool) {
        if let Some(channel) = self.channels.get_mut(&key) {
            channel.flow_active = active;
        }
        self.channel_queues_dirty(key);
    }

    // ---- exchanges ------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub fn declare_exchange(
        &mut self,
        name: &str,
        kind: &str,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Result<(), AmqpError> {
        if name.is_empty() {
            return Err(soft(ReplyCode::AccessRefused, "operation not permitted on the default exchange"));
        }
        if let Some(existing) = self.exchanges.get(name) {
            if passive {
                return Ok(());
            }
            if existing.type_name() != kind {
                return Err(precondition(format!(
                    "inequivalent arg 'type' for exchange '{name}' in vhost '{}': received '{kind}' but current is '{}'",
                    self.name,
                    existing.type_name()
                )));
            }
            for (what, received, current) in [
                ("durable", durable, existing.durable),
                ("auto_delete", auto_delete, existing.auto_delete),
                ("internal", internal, existing.internal),
            ] {
                if received != current {
                    return Err(precondition(format!(
                        "inequivalent arg '{what}' for exchange '{name}' in vhost '{}': received '{}' but current is '{}'",
                        self.name,
                        bool_str(received),
                        bool_str(current)
                    )));
                }
            }
            return Ok(());
        }
        if passive {
            return Err(self.not_found_exchange(name));
        }
        if name.starts_with("amq.") {
            return Err(soft(
                ReplyCode::AccessRefused,
                format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        let unknown =
            |kind: &str| AmqpError::hard(ReplyCode::CommandInvalid, format!("unknown exchange type '{kind}'"), 0, 0);
        let delayed = kind == DELAYED_TYPE;
        let kind = if delayed {
            // As the RabbitMQ delayed-message plugin: routing follows the
            // type named by `x-delayed-type`.
            match warren_codec::table::get(&arguments, "x-delayed-type").and_then(warren_codec::table::as_str) {
                Some(DELAYED_TYPE) => {
                    return Err(precondition(
                        "Invalid argument, 'x-delayed-message' can't be used for 'x-delayed-type'",
                    ))
                }
                Some(inner) => ExchangeKind::parse(inner).ok_or_else(|| unknown(inner))?,
                None => {
                    return Err(precondition("Invalid argument, 'x-delayed-type' must be an existing exchange type"))
                }
            }
        } else {
            ExchangeKind::parse(kind).ok_or_else(|| unknown(kind))?
        };
        let mut exchange = Exchange::new(name, kind, durable, auto_delete, internal, arguments);
        if delayed {
            exchange = exchange.with_delay();
            self.delayed_exchanges += 1;
        }
        let policy = policy::effective(&self.policies, name, false);
        exchange.alternate_exchange = policy::alternate_exchange(&exchange.arguments, policy).map(Into::into);
        if durable {
            self.journal.push(JournalEvent::ExchangeDeclared(ExchangeDefinition {
                name: name.to_string(),
                kind: exchange.type_name().to_string(),
                auto_delete,
                internal,
                arguments: exchange.arguments.clone(),
            }));
        }
        self.exchanges.insert(name.into(), exchange);
        Ok(())
    }

    pub fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<(), AmqpError> {
        if name.is_empty() {
            return Err(soft(ReplyCode::AccessRefused, "operation not permitted on the default exchange"));
        }
        if name.starts_with("amq.") {
            return Err(soft(
                ReplyCode::AccessRefused,
                format!("deletion of system exchange '{name}' in vhost '{}' not allowed", self.name),
            ));
        }
        let Some(exchange) = self.exchanges.get(name) else {
            // RabbitMQ answers delete-ok for a missing exchange.
            return Ok(());
        };
        if if_unused && exchange.has_bindings() {
            return Err(precondition(format!("exchange '{name}' in vhost '{}' in use", self.name)));
        }
        if let Some(exchange) = self.exchanges.remove(name) {
            if exchange.durable {
                self.journal.push(JournalEvent::ExchangeDeleted { name: Arc::from(&*exchange.name) });
            }
            if let Some(mut delayed) = exchange.delayed {
                self.delayed_exchanges = self.delayed_exchanges.saturating_sub(1);
                // Scheduled messages go with their exchange.
                let journal = &mut self.journal;
                let store_name = delayed.store_name.clone();
                delayed.scheduler.clear(|stored| {
                    journal.push(JournalEvent::Settled { queue: store_name.clone(), stored });
                });
                if exchange.durable {
                    self.journal.push(JournalEvent::QueueDeleted { queue: store_name });
                }
                self.delaying.remove(name);
            }
        }
        let destination = Destination::Exchange(name.into());
        self.unbind_everywhere(&destination);
        Ok(())
    }

    /// Removes every binding to `destination`, then auto-deletes source
    /// exchanges left without bindings.
    fn unbind_everywhere(&mut self, destination: &Destination) {
        let mut emptied = Vec::new();
        for exchange in self.exchanges.values_mut() {
            if exchange.unbind_destination(destination) > 0 && exchange.auto_delete && !exchange.has_bindings() {
                emptied.push(exchange.name.clone());
            }
        }
        for name in emptied {
            self.remove_auto_deleted_exchange(&name);
        }
    }

    fn source_exchange(&self, name: &str) -> Result<(), AmqpError> {
        if name.is_empty() {
            return Err(soft(ReplyCode::AccessRefused, "operation not permitted on the default exchange"));
        }
        if self.exchanges.contains_key(name) {
            Ok(())
        } else {
            Err(self.not_found_exchange(name))
        }
    }

    /// An auto-delete exchange left without bindings goes, and the bindings
    /// to it with it.
    fn remove_auto_deleted_exchange(&mut self, name: &str) {
        if self.exchanges.remove(name).is_some_and(|x| x.durable) {
            self.journal.push(JournalEvent::ExchangeDeleted { name: Arc::from(name) });
        }
        self.unbind_everywhere(&Destination::Exchange(name.into()));
    }

    /// The stored name of a binding's destination: durable exchanges and
    /// durable queues that are not exclusive are stored, others are not.
    fn stored_destination(&self, destination: &Destination) -> Option<(String, bool)> {
        match destination {
            Destination::Queue(id) => self
                .queues
                .get(id)
                .filter(|q| q.durable && q.exclusive_owner.is_none())
                .map(|q| (q.name.to_string(), true)),
            Destination::Exchange(name) => {
                self.exchanges.get(&**name).filter(|x| x.durable).map(|_| (name.to_string(), false))
            }
        }
    }

    fn binding_change(&mut self, source: &str, binding: Binding, bind: bool) -> Result<(), AmqpError> {
        let vhost = self.name.clone();
        // Only bindings between durable ends are stored.
        let stored = match self.exchanges.get(source).filter(|x| x.durable) {
            Some(_) => self.stored_destination(&binding.destination).map(|(destination, destination_is_queue)| {
                BindingDefinition {
                    source: source.to_string(),
                    destination,
                    destination_is_queue,
                    routing_key: binding.routing_key.to_string(),
                    arguments: binding.arguments.clone(),
                }
            }),
            None => None,
        };
        if let Some(definition) = stored {
            self.journal.push(if bind { JournalEvent::Bound(definition) } else { JournalEvent::Unbound(definition) });
        }
        let Some(exchange) = self.exchanges.get_mut(source) else {
            return Err(soft(ReplyCode::NotFound, format!("no exchange '{source}' in vhost '{vhost}'")));
        };
        if bind {
            exchange.bind(binding).map_err(|bad| {
                precondition(format!(
                    "invalid x-match field value {bad}; expected one of all, any, all-with-x, any-with-x"
                ))
            })?;
        } else {
            exchange.unbind(&binding);
            if exchange.auto_delete && !exchange.has_bindings() {
                self.remove_auto_deleted_exchange(source);
            }
        }
        Ok(())
    }

    pub fn bind_queue(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
        bind: bool,
    ) -> Result<(), AmqpError> {
        if !bind
            && (!self.exchanges.contains_key(exchange) || !self.queue_ids.contains_key(queue))
            && !exchange.is_empty()
        {
            // RabbitMQ answers unbind-ok when there is nothing to unbind.
            return Ok(());
        }
        self.source_exchange(exchange)?;
        let id = self.queue_id(connection, queue)?;
        let binding = Binding { destination: Destination::Queue(id), routing_key: routing_key.into(), arguments };
        self.binding_change(exchange, binding, bind)
    }

    pub fn bind_exchange(
        &mut self,
        destination: &str,
        source: &str,
        routing_key: &str,
        arguments: FieldTable,
        bind: bool,
    ) -> Result<(), AmqpError> {
        if !bind && (!self.exchanges.contains_key(source) || !self.exchanges.contains_key(destination)) {
            return Ok(());
        }
        self.source_exchange(source)?;
        self.source_exchange(destination)?;
        let binding = Binding {
            destination: Destination::Exchange(destination.into()),
            routing_key: routing_key.into(),
            arguments,
        };
        self.binding_change(source, binding, bind)
    }

    // ---- queues ---------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub fn declare_queue(
        &mut self,
        connection: ConnectionId,
        name: &str,
        passive: bool,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Result<QueueDeclared, AmqpError> {
        self.declare_queue_as(connection, name, passive, durable, exclusive, auto_delete, arguments, &mut |_| Ok(()))
    }

    /// `declare_queue` with `admit` asked first about the queue's final
    /// name (a server-generated one for `""`), before any other check, as
    /// RabbitMQ checks configure permission. Passive declares skip it.
    #[allow(clippy::too_many_arguments)]
    pub fn declare_queue_as(
        &mut self,
        connection: ConnectionId,
        name: &str,
        passive: bool,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: FieldTable,
        admit: &mut dyn FnMut(&str) -> Result<(), AmqpError>,
    ) -> Result<QueueDeclared, AmqpError> {
        if passive {
            if name == REPLY_TO_QUEUE {
                // As RabbitMQ: the pseudo-queue always reports one consumer.
                return Ok(QueueDeclared { name: name.to_string(), message_count: 0, consumer_count: 1 });
            }
            let id = self.queue_id(connection, name)?;
            let now = self.clock.now_ms();
            if let Some(queue) = self.queues.get_mut(&id) {
                queue.last_used = now;
            }
            return Ok(self.declared(id));
        }
        let server_named = name.is_empty();
        let generated;
        let name = if server_named {
            generated = crate::names::generate("amq.gen-");
            generated.as_str()
        } else {
            name
        };
        admit(name)?;
        let queue_type =
            QueueType::from_arguments(&arguments).map_err(|r| self.type_refusal(name, QueueType::Classic, r))?;
        // As RabbitMQ: the values of the arguments the type takes are
        // checked first, then an argument it does not take is refused.
        match queue_type.unsupported_argument(&arguments) {
            Some(key) => {
                self.check_queue_arguments(name, &queue_type.supported_arguments(&arguments))?;
                return Err(self.type_refusal(name, queue_type, TypeRefusal::Argument(key)));
            }
            None => self.check_queue_arguments(name, &arguments)?,
        }
        queue_type
            .check_properties(durable, exclusive, auto_delete)
            .map_err(|r| self.type_refusal(name, queue_type, r))?;
        let now = self.clock.now_ms();
        if let Some(&id) = self.queue_ids.get(name) {
            if let Some(queue) = self.queues.get_mut(&id) {
                queue.last_used = now;
            }
            let Some(queue) = self.queues.get(&id) else {
                return Err(self.not_found_queue(name));
            };
            if queue.is_exclusive_to_other(connection) || exclusive != queue.exclusive_owner.is_some() {
                return Err(self.locked(name));
            }
            for (what, received, current) in
                [("durable", durable, queue.durable), ("auto_delete", auto_delete, queue.auto_delete)]
            {
                if received != current {
                    return Err(precondition(format!(
                        "inequivalent arg '{what}' for queue '{name}' in vhost '{}': received '{}' but current is '{}'",
                        self.name,
                        bool_str(received),
                        bool_str(current)
                    )));
                }
            }
            for key in EQUIVALENT_QUEUE_ARGS {
                let received = warren_codec::table::get(&arguments, key);
                let current = warren_codec::table::get(&queue.arguments, key);
                // No x-queue-type means classic.
                let same_type = *key == "x-queue-type" && queue_type == queue.settings.queue_type;
                if !same_type && !equivalent(received, current) {
                    let (received, current) = match (received, current) {
                        (Some(r), Some(c)) => (format!("'{}'", plain(r)), format!("'{}'", plain(c))),
                        (r, c) => (describe(r), describe(c)),
                    };
                    return Err(precondition(format!(
                        "inequivalent arg '{key}' for queue '{name}' in vhost '{}': received {received} but current is {current}",
                        self.name
                    )));
                }
            }
            return Ok(self.declared(id));
        }
        if !server_named && name.starts_with("amq.") {
            return Err(soft(
                ReplyCode::AccessRefused,
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        if self.max_queues.is_some_and(|max| self.queues.len() as u64 >= max) {
            return Err(precondition(format!(
                "cannot declare queue '{name}': queue limit in vhost '{}' ({}) is reached",
                self.name,
                self.max_queues.unwrap_or_default()
            )));
        }
        let name = name.to_string();
        let id = self.next_queue_id;
        self.next_queue_id += 1;
        let owner = exclusive.then_some(connection);
        let settings = self.queue_settings(&name, &arguments).map_err(|(key, problem)| {
            precondition(format!("invalid arg '{key}' for queue '{name}' in vhost '{}': {problem}", self.name))
        })?;
        if settings.is_timed() {
            self.timed.insert(id);
        }
        self.note_consumer_timeout(&settings);
        // Exclusive queues go with their connection: never stored.
        if durable && !exclusive {
            self.journal.push(JournalEvent::QueueDeclared(QueueDefinition {
                name: name.clone(),
                auto_delete,
                arguments: arguments.clone(),
            }));
        }
        let mut queue = Queue::new(id, &name, durable, owner, auto_delete, arguments, settings);
        queue.last_used = now;
        self.queues.insert(id, queue);
        self.queue_ids.insert(name.as_str().into(), id);
        Ok(self.declared(id))
    }

    fn declared(&self, id: QueueId) -> QueueDeclared {
        match self.queues.get(&id) {
            Some(queue) => QueueDeclared {
                name: queue.name.to_string(),
                message_count: queue.len() as u32,
                consumer_count: queue.consumers.len() as u32,
            },
            None => QueueDeclared { name: String::new(), message_count: 0, consumer_count: 0 },
        }
    }

    pub fn purge_queue(&mut self, connection: ConnectionId, name: &str) -> Result<u32, AmqpError> {
        let id = self.queue_id(connection, name)?;
        let Some(queue) = self.queues.get_mut(&id) else {
            return Ok(0);
        };
        let journal = &mut self.journal;
        let (durable, queue_name) = (queue.durable, queue.name.clone());
        let count = queue.purge(|stored| {
            if durable && stored != 0 {
                journal.push(JournalEvent::Settled { queue: queue_name.clone(), stored });
            }
        });
        Ok(count as u32)
    }

    pub fn delete_queue(
        &mut self,
        connection: ConnectionId,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, AmqpError> {
        let Some(&id) = self.queue_ids.get(name) else {
            // RabbitMQ answers delete-ok with 0 for a missing queue.
            return Ok(0);
        };
        let id = self.queue_id(connection, name).map(|_| id)?;
        if let Some(queue) = self.queues.get(&id) {
            if if_unused && !queue.consumers.is_empty() {
                return Err(precondition(format!("queue '{name}' in vhost '{}' in use", self.name)));
            }
            if if_empty && !queue.is_empty() {
                return Err(precondition(format!("queue '{name}' in vhost '{}' not empty", self.name)));
            }
        }
        Ok(self.remove_queue(id))
    }

    /// Deletes a queue, cancelling its consumers; returns its ready count.
    fn remove_queue(&mut self, id: QueueId) -> u32 {
        let Some(queue) = self.queues.remove(&id) else {
            return 0;
        };
        self.queue_ids.remove(&*queue.name);
        self.timed.remove(&id);
        if queue.durable {
            // Every stored message it held is settled, ready or unacked, so
            // the store can reclaim them; then the deletion itself.
            let journal = &mut self.journal;
            queue.for_each_entry(|entry| {
                if entry.stored != 0 {
                    journal.push(JournalEvent::Settled { queue: queue.name.clone(), stored: entry.stored });
                }
            });
            for channel in self.channels.values() {
                for unacked in channel.unacked.iter().filter(|u| u.queue == id && u.message.stored_index() != 0) {
                    self.journal.push(JournalEvent::Settled {
                        queue: queue.name.clone(),
                        stored: unacked.message.stored_index(),
                    });
                }
            }
            for message in queue.retrying().filter(|m| m.stored_index() != 0) {
                self.journal.push(JournalEvent::Settled { queue: queue.name.clone(), stored: message.stored_index() });
            }
            self.journal.push(JournalEvent::QueueDeleted { queue: queue.name.clone() });
        }
        for consumer in &queue.consumers {
            if let Some(channel) = self.channels.get_mut(&consumer.channel) {
                channel.consumers.remove(&consumer.tag);
                self.cancel_notices.push((channel.outbox.clone(), consumer.channel.channel, consumer.tag.clone()));
            }
        }
        self.unbind_everywhere(&Destination::Queue(id));
        queue.len() as u32
    }

    // ---- publishing -----------------------------------------------------

    /// The Direct Reply-To address of a channel's reply consumer, for
    /// rewriting `reply_to`.
    pub fn reply_to_address(&self, key: ChannelKey) -> Option<String> {
        let channel = self.channels.get(&key)?;
        let (token, _) = channel.reply_consumer.as_ref()?;
        Some(format!("{REPLY_TO_PREFIX}{token}"))
    }

    /// Checks that a publish to `exchange` is allowed (exists, not internal).
    pub fn check_publish(&self, exchange: &str) -> Result<(), AmqpError> {
        if exchange.is_empty() {
            return Ok(());
        }
        match self.exchanges.get(exchange) {
            None => Err(self.not_found_exchange(exchange)),
            Some(x) if x.internal => Err(soft(
                ReplyCode::AccessRefused,
                format!("cannot publish to internal exchange '{exchange}' in vhost '{}'", self.name),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Routes a message and enqueues it. `extra_keys` are CC/BCC routing
    /// keys.
    pub fn publish(
        &mut self,
        exchange: &str,
        message: Arc<Message>,
        extra_keys: &[Vec<u8>],
    ) -> Result<Routed, AmqpError> {
        self.check_publish(exchange)?;
        if let Some(routed) = self.schedule(exchange, &message) {
            return Ok(routed);
        }
        let mut queues = std::mem::take(&mut self.scratch_queues);
        queues.clear();
        let direct = self.route_message(exchange, &message, extra_keys, &mut queues);
        let rejected = self.enqueue_all(&queues, &message);
        let routed = Routed { queues: queues.len() + direct, rejected };
        self.scratch_queues = queues;
        self.process_dead_letters();
        Ok(routed)
    }

    /// Holds a message published to a delayed-message exchange with a
    /// positive `x-delay` header until it is due; `None` to route it now.
    /// A held message counts as routed: it is not returned as unroutable
    /// (the plugin returns it, since no queue is known yet).
    fn schedule(&mut self, exchange: &str, message: &Arc<Message>) -> Option<Routed> {
        if self.delayed_exchanges == 0 {
            return None;
        }
        let x = self.exchanges.get_mut(exchange)?;
        let delayed = x.delayed.as_mut()?;
        let delay = delay_of(message).filter(|delay| *delay > 0)?;
        message.set_arrived(self.clock.now_ms());
        let due = message.arrived().saturating_add(delay);
        let stored = x.durable && message.persistent;
        if stored {
            self.journal
                .push(JournalEvent::Published { message: message.clone(), queues: vec![delayed.store_name.clone()] });
        }
        delayed.scheduler.schedule(due, message.clone(), stored);
        if !self.delaying.contains(exchange) {
            self.delaying.insert(exchange.into());
        }
        Some(Routed { queues: 1, rejected: false })
    }

    /// The queues a message goes to (sorted, no duplicates); Direct Reply-To
    /// deliveries are made on the way and counted in the result.
    fn route_message(
        &mut self,
        exchange: &str,
        message: &Arc<Message>,
        extra_keys: &[Vec<u8>],
        queues: &mut Vec<QueueId>,
    ) -> usize {
        let mut destinations = std::mem::take(&mut self.scratch_destinations);
        let mut delivered_direct = 0;
        let mut headers: Option<Option<FieldTable>> = None;
        for key in std::iter::once(message.routing_key()).chain(extra_keys.iter().map(Vec::as_slice)) {
            if exchange.is_empty() {
                if let Ok(key) = std::str::from_utf8(key) {
                    if let Some(token) = key.strip_prefix(REPLY_TO_PREFIX) {
                        delivered_direct += usize::from(self.deliver_reply(token, message));
                    } else if let Some(&id) = self.queue_ids.get(key) {
                        queues.push(id);
                    }
                }
                continue;
            }
            let mut visited: Vec<&str> = Vec::new();
            self.route_exchange(exchange, key, message, &mut headers, &mut visited, &mut destinations, queues);
        }
        queues.sort_unstable();
        queues.dedup();
        self.scratch_destinations = destinations;
        delivered_direct
    }

    /// Enqueues a routed message in each queue and journals it for the
    /// durable ones; true if a queue refused it.
    fn enqueue_all(&mut self, queues: &[QueueId], message: &Arc<Message>) -> bool {
        let mut durable: Vec<Arc<str>> = Vec::new();
        let mut rejected = false;
        for &id in queues {
            match self.enqueue(id, message) {
                Enqueued::Accepted { durable: true } => {
                    if let Some(queue) = self.queues.get(&id) {
                        durable.push(queue.name.clone());
                    }
                }
                Enqueued::Accepted { durable: false } | Enqueued::Dropped | Enqueued::Duplicate => {}
                Enqueued::Rejected => rejected = true,
            }
        }
        if !durable.is_empty() {
            self.journal.push(JournalEvent::Published { message: message.clone(), queues: durable });
        }
        rejected
    }

    /// Puts a message in one queue, applying its TTL and length limit.
    fn enqueue(&mut self, id: QueueId, message: &Arc<Message>) -> Enqueued {
        let Some(queue) = self.queues.get_mut(&id) else {
            return Enqueued::Dropped;
        };
        // The key is remembered only once the message is accepted, so a
        // publish refused by a length limit can be retried.
        let mut dedup_key_now = None;
        if queue.settings.dedup.is_some() {
            if let Some(key) = dedup_key(message) {
                let now = self.clock.now_ms();
                if queue.dedup.contains(&key, now) {
                    return Enqueued::Duplicate;
                }
                dedup_key_now = Some((key, now));
            }
        }
        if queue.settings.has_ttl() || message.expiration().is_some() {
            message.set_arrived(self.clock.now_ms());
            if !self.timed.contains(&id) {
                self.timed.insert(id);
            }
        }
        let settings = &queue.settings;
        let limited = settings.max_length.is_some() || settings.max_length_bytes.is_some();
        if limited && settings.overflow != Overflow::DropHead {
            let full = settings.max_length.is_some_and(|max| queue.len() as u64 >= max)
                || settings.max_length_bytes.is_some_and(|max| queue.bytes() + message.body_len() as u64 > max);
            if full {
                if settings.overflow == Overflow::RejectPublishDlx {
                    // Never in the queue: nothing to settle.
                    self.dead_letters.push_back(DeadLetter::new(queue, message.clone(), Reason::Maxlen, false));
                }
                return Enqueued::Rejected;
            }
        }
        queue.push(message.clone());
        if let (Some((key, now)), Some(dedup)) = (dedup_key_now, queue.settings.dedup) {
            queue.dedup.remember(Arc::from(key.as_slice()), now.saturating_add(dedup.window), dedup.max_keys);
        }
        let mut dropped_itself = false;
        if limited && queue.settings.overflow == Overflow::DropHead {
            let (max_length, max_bytes) = (queue.settings.max_length, queue.settings.max_length_bytes);
            let mut heads = Vec::new();
            while max_length.is_some_and(|max| queue.len() as u64 > max)
                || max_bytes.is_some_and(|max| queue.bytes() > max)
            {
                let Some(head) = queue.pop(self.loader.as_deref()) else { break };
                dropped_itself |= Arc::ptr_eq(&head.message, message);
                heads.push(head);
            }
            for head in heads {
                self.dead_letter(id, head, Reason::Maxlen);
            }
            self.settle_unreadable(id);
        }
        let Some(queue) = self.queues.get_mut(&id) else {
            return Enqueued::Dropped;
        };
        if dropped_itself {
            return Enqueued::Dropped;
        }
        if queue.durable && queue.len() > LOADED_WINDOW {
            if let Some(loader) = &self.loader {
                queue.page_out(loader.readable_upto(), 2);
            }
        }
        if queue.consumers.is_empty() {
            // No one was waiting: from now on its TTL counts.
            queue.mark_offered();
        } else if !self.dirty.contains(&id) {
            self.dirty.push(id);
        }
        Enqueued::Accepted { durable: message.persistent && queue.durable }
    }

    #[allow(clippy::too_many_arguments)]
    fn route_exchange<'a>(
        &'a self,
        name: &'a str,
        key: &[u8],
        message: &Message,
        headers: &mut Option<Option<FieldTable>>,
        visited: &mut Vec<&'a str>,
        destinations: &mut Vec<Destination>,
        queues: &mut Vec<QueueId>,
    ) {
        if visited.contains(&name) {
            return;
        }
        visited.push(name);
        let Some(exchange) = self.exchanges.get(name) else {
            return;
        };
        let before = queues.len();
        let start = destinations.len();
        let headers_ref = if exchange.needs_headers() {
            headers.get_or_insert_with(|| message.properties_view().headers()).as_ref()
        } else {
            None
        };
        exchange.route(key, headers_ref, destinations);
        let mut index = start;
        while index < destinations.len() {
            match &destinations[index] {
                Destination::Queue(id) => queues.push(*id),
                Destination::Exchange(next) => {
                    let next = next.clone();
                    if let Some((next_name, _)) = self.exchanges.get_key_value(&*next) {
                        let mut nested = Vec::new();
                        self.route_exchange(next_name, key, message, headers, visited, &mut nested, queues);
                    }
                }
            }
            index += 1;
        }
        destinations.truncate(start);
        if queues.len() == before {
            if let Some(alternate) = &exchange.alternate_exchange {
                if let Some((alternate_name, _)) = self.exchanges.get_key_value(&**alternate) {
                    self.route_exchange(alternate_name, key, message, headers, visited, destinations, queues);
                }
            }
        }
    }

    fn deliver_reply(&mut self, token: &str, message: &Message) -> bool {
        let Some((key, tag)) = self.reply_tokens.get(token).cloned() else {
            return false;
        };
        let Some(channel) = self.channels.get_mut(&key) else {
            return false;
        };
        let delivery_tag = channel.next_tag();
        channel.outbox.deliver(key.channel, &tag, delivery_tag, false, message);
        true
    }

    // ---- consuming ------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub fn consume(
        &mut self,
        key: ChannelKey,
        queue: &str,
        consumer_tag: &str,
        no_ack: bool,
        exclusive: bool,
        arguments: &FieldTable,
    ) -> Result<String, AmqpError> {
        let tag: Arc<str> =
            if consumer_tag.is_empty() { crate::names::generate("amq.ctag-").into() } else { consumer_tag.into() };
        let channel = self.channels.get(&key).ok_or_else(|| soft(ReplyCode::ChannelError, "channel is not open"))?;
        if channel.consumers.contains_key(&tag) || channel.reply_consumer.as_ref().is_some_and(|(_, t)| *t == tag) {
            return Err(AmqpError::hard(ReplyCode::NotAllowed, format!("attempt to reuse consumer tag '{tag}'"), 0, 0));
        }
        if queue == REPLY_TO_QUEUE {
            if !no_ack {
                return Err(precondition("reply consumer cannot acknowledge"));
            }
            if channel.reply_consumer.is_some() {
                return Err(precondition("reply consumer already set"));
            }
            let token: Box<str> = crate::names::generate("").into();
            self.reply_tokens.insert(token.clone(), (key, tag.clone()));
            if let Some(channel) = self.channels.get_mut(&key) {
                channel.reply_consumer = Some((token, tag.clone()));
            }
            return Ok(tag.to_string());
        }
        let id = self.queue_id(key.connection, queue)?;
        let global_qos = self.channels.get(&key).is_some_and(|c| c.prefetch_count > 0);
        if global_qos && self.queues.get(&id).is_some_and(|q| q.settings.queue_type == QueueType::Quorum) {
            return Err(AmqpError::hard(
                ReplyCode::NotImplemented,
                format!("queue '{queue}' in vhost '{}' does not support global qos", self.name),
                0,
                0,
            ));
        }
        let priority = match warren_codec::table::get(arguments, "x-priority") {
            None => 0,
            Some(value) => warren_codec::table::as_i64(value).ok_or_else(|| {
                precondition(format!(
                    "invalid arg 'x-priority' for queue '{queue}' in vhost '{}': {{unacceptable_type,{}}}",
                    self.name,
                    value_type(value)
                ))
            })?,
        };
        let vhost = &self.name;
        let Some(q) = self.queues.get_mut(&id) else {
            return Err(self.not_found_queue(queue));
        };
        if q.consumers.iter().any(|c| c.exclusive) || (exclusive && !q.consumers.is_empty()) {
            return Err(soft(ReplyCode::AccessRefused, format!("queue '{queue}' in vhost '{vhost}' in exclusive use")));
        }
        // Sorted by priority, highest first; registration order within one.
        let position = q.consumers.partition_point(|c| c.priority >= priority);
        q.consumers.insert(position, QueueConsumer { channel: key, tag: tag.clone(), exclusive, priority });
        q.had_consumer = true;
        q.last_used = self.clock.now_ms();
        let consumer_id = self.next_consumer_id;
        self.next_consumer_id += 1;
        if let Some(channel) = self.channels.get_mut(&key) {
            let prefetch_count = channel.consumer_prefetch;
            channel
                .consumers
                .insert(tag.clone(), ConsumerState { id: consumer_id, queue: id, no_ack, prefetch_count, unacked: 0 });
        }
        self.mark_dirty(id);
        Ok(tag.to_string())
    }

    /// Cancels a consumer; returns whether it existed.
    pub fn cancel(&mut self, key: ChannelKey, consumer_tag: &str) -> bool {
        let Some(channel) = self.channels.get_mut(&key) else {
            return false;
        };
        if channel.reply_consumer.as_ref().is_some_and(|(_, t)| &**t == consumer_tag) {
            if let Some((token, _)) = channel.reply_consumer.take() {
                self.reply_tokens.remove(&token);
            }
            return true;
        }
        let Some(consumer) = channel.consumers.remove(consumer_tag) else {
            return false;
        };
        self.detach_consumer(consumer.queue, key, consumer_tag);
        true
    }

    fn detach_consumer(&mut self, queue: QueueId, key: ChannelKey, tag: &str) {
        let Some(q) = self.queues.get_mut(&queue) else {
            return;
        };
        q.consumers.retain(|c| !(c.channel == key && &*c.tag == tag));
        q.last_used = self.clock.now_ms();
        if q.auto_delete && q.had_consumer && q.consumers.is_empty() {
            self.remove_queue(queue);
        }
    }

    /// Sends the notifications (consumer cancels) that the last method
    /// caused; the caller has already written that method's reply.
    pub fn send_notices(&mut self) {
        for (outbox, channel, tag) in self.cancel_notices.drain(..) {
            outbox.consumer_cancelled(channel, &tag);
        }
    }

    /// Sends pending notices, then delivers what can be delivered from
    /// every queue marked dirty.
    pub fn run_dispatch(&mut self) {
        self.send_notices();
        while let Some(id) = self.dirty.pop() {
            self.dispatch_queue(id);
        }
    }

    fn dispatch_queue(&mut self, id: QueueId) {
        let Some(queue) = self.queues.get_mut(&id) else {
            return;
        };
        let mut expired = Vec::new();
        let mut now = None;
        while let Some(size) = queue.front_size() {
            let Some(index) = pick_consumer(queue, &self.channels, size) else {
                break;
            };
            let consumer_channel = queue.consumers[index].channel;
            let Some(channel) = self.channels.get_mut(&consumer_channel) else {
                break;
            };
            let tag = queue.consumers[index].tag.clone();
            let Some(entry) = queue.pop(self.loader.as_deref()) else {
                break;
            };
            if (queue.settings.has_ttl() || entry.message.expiration().is_some()) && !queue.is_fresh(&entry) {
                let now = *now.get_or_insert_with(|| self.clock.now_ms());
                if entry.message.deadline(queue.settings.message_ttl).is_some_and(|deadline| deadline < now) {
                    // Never delivered after its deadline, unless offered by
                    // the dispatch its own publish triggered.
                    expired.push(entry);
                    continue;
                }
            }
            let size = entry.message.body_len();
            let delivery_tag = channel.next_tag();
            match queue.settings.delivery_limit {
                // As quorum queues: the count is sent from the first delivery.
                Some(_) => {
                    let returns = queue.returns.get(&entry.seq).copied().unwrap_or(0);
                    let copy = dead_letter::with_delivery_count(&entry.message, returns);
                    channel.outbox.deliver(consumer_channel.channel, &tag, delivery_tag, entry.redelivered, &copy);
                }
                None => channel.outbox.deliver(
                    consumer_channel.channel,
                    &tag,
                    delivery_tag,
                    entry.redelivered,
                    &entry.message,
                ),
            }
            let Some(state) = channel.consumers.get_mut(&tag) else {
                continue;
            };
            if state.no_ack {
                if entry.message.stored_index() != 0 && queue.durable {
                    let stored = entry.message.stored_index();
                    self.journal.push(JournalEvent::Settled { queue: queue.name.clone(), stored });
                }
            } else {
                state.unacked += 1;
                channel.unacked_bytes += size as u64;
                queue.unacked += 1;
                channel.unacked.push_back(Unacked {
                    delivery_tag,
                    queue: id,
                    seq: entry.seq,
                    message: entry.message,
                    consumer: Some((tag, state.id)),
                    delivered_at: self.coarse_now,
                });
            }
        }
        queue.mark_offered();
        for entry in expired {
            self.dead_letter(id, entry, Reason::Expired);
        }
        self.settle_unreadable(id);
        self.process_dead_letters();
    }

    /// Stored messages a queue could not read back are gone: settle them so
    /// the store can reclaim their space.
    fn settle_unreadable(&mut self, id: QueueId) {
        let Some(queue) = self.queues.get_mut(&id) else {
            return;
        };
        for stored in queue.unreadable.drain(..) {
            self.journal.push(JournalEvent::Settled { queue: queue.name.clone(), stored });
        }
    }

    pub fn get(&mut self, key: ChannelKey, queue: &str, no_ack: bool) -> Result<Option<GetResult>, AmqpError> {
        let id = self.queue_id(key.connection, queue)?;
        let Some(q) = self.queues.get_mut(&id) else {
            return Err(self.not_found_queue(queue));
        };
        if !self.channels.contains_key(&key) {
            return Err(soft(ReplyCode::ChannelError, "channel is not open"));
        }
        let now = self.clock.now_ms();
        q.last_used = now;
        let mut expired = Vec::new();
        let popped = loop {
            let Some(entry) = q.pop(self.loader.as_deref()) else {
                break None;
            };
            if entry.message.deadline(q.settings.message_ttl).is_some_and(|deadline| deadline < now) {
                expired.push(entry);
                continue;
            }
            break Some(entry);
        };
        for stored in q.unreadable.drain(..) {
            self.journal.push(JournalEvent::Settled { queue: q.name.clone(), stored });
        }
        let delivered = match (&popped, q.settings.delivery_limit) {
            (Some(entry), Some(_)) => {
                let returns = q.returns.get(&entry.seq).copied().unwrap_or(0);
                Some(Arc::new(dead_letter::with_delivery_count(&entry.message, returns)))
            }
            _ => None,
        };
        let message_count = q.len() as u32;
        if !expired.is_empty() {
            for entry in expired {
                self.dead_letter(id, entry, Reason::Expired);
            }
            self.process_dead_letters();
        }
        let Some(entry) = popped else {
            return Ok(None);
        };
        let (Some(q), Some(channel)) = (self.queues.get_mut(&id), self.channels.get_mut(&key)) else {
            return Ok(None);
        };
        let delivery_tag = channel.next_tag();
        if no_ack {
            if entry.message.stored_index() != 0 && q.durable {
                let stored = entry.message.stored_index();
                self.journal.push(JournalEvent::Settled { queue: q.name.clone(), stored });
            }
        } else {
            q.unacked += 1;
            channel.unacked_bytes += entry.message.body_len() as u64;
            channel.unacked.push_back(Unacked {
                delivery_tag,
                queue: id,
                seq: entry.seq,
                message: entry.message.clone(),
                consumer: None,
                delivered_at: self.coarse_now,
            });
        }
        Ok(Some(GetResult {
            delivery_tag,
            redelivered: entry.redelivered,
            message: delivered.unwrap_or(entry.message),
            message_count,
        }))
    }

    // ---- settling -------------------------------------------------------

    /// Takes the unacked entries an ack/nack/reject names (RabbitMQ's rules:
    /// `multiple` with tag 0 means all; otherwise the tag must be outstanding).
    fn take_unacked(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool) -> Result<Vec<Unacked>, AmqpError> {
        let Some(channel) = self.channels.get_mut(&key) else {
            return Ok(Vec::new());
        };
        let taken: Vec<Unacked> = if multiple && delivery_tag == 0 {
            channel.unacked.drain(..).collect()
        } else {
            let position = channel.unacked.binary_search_by_key(&delivery_tag, |u| u.delivery_tag);
            let timed_out = !channel.timed_out.is_empty() && channel.timed_out.remove(&delivery_tag);
            if multiple && !channel.timed_out.is_empty() {
                channel.timed_out.retain(|tag| *tag > delivery_tag);
            }
            match position {
                Ok(index) if multiple => channel.unacked.drain(..=index).collect(),
                Ok(index) => channel.unacked.remove(index).into_iter().collect(),
                // Settling a delivery taken back by the consumer timeout.
                Err(end) if timed_out && multiple => channel.unacked.drain(..end).collect(),
                Err(_) if timed_out => Vec::new(),
                Err(_) => return Err(precondition(format!("unknown delivery tag {delivery_tag}"))),
            }
        };
        let mut freed_queues = Vec::new();
        for unacked in &taken {
            channel.unacked_bytes = channel.unacked_bytes.saturating_sub(unacked.message.body_len() as u64);
            let owner =
                unacked.consumer.as_ref().and_then(|(tag, id)| channel.consumers.get_mut(tag).filter(|c| c.id == *id));
            if let Some(consumer) = owner {
                consumer.unacked = consumer.unacked.saturating_sub(1);
            }
        }
        if !taken.is_empty() {
            freed_queues.extend(channel.consumers.values().map(|c| c.queue));
        }
        for unacked in &taken {
            if let Some(queue) = self.queues.get_mut(&unacked.queue) {
                queue.unacked = queue.unacked.saturating_sub(1);
            }
        }
        for queue in freed_queues {
            self.mark_dirty(queue);
        }
        Ok(taken)
    }

    pub fn ack(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool) -> Result<(), AmqpError> {
        for unacked in self.take_unacked(key, delivery_tag, multiple)? {
            self.settled(&unacked);
        }
        Ok(())
    }

    /// `basic.nack` / `basic.reject`: requeue, or dead-letter (dropped when
    /// the queue has no dead-letter exchange).
    pub fn nack(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<(), AmqpError> {
        let taken = self.take_unacked(key, delivery_tag, multiple)?;
        if requeue {
            for unacked in taken.into_iter().rev() {
                self.requeue(unacked);
            }
        } else {
            for unacked in taken {
                self.give_up(unacked, Reason::Rejected);
            }
            self.process_dead_letters();
        }
        Ok(())
    }

    /// `basic.recover`: every unacked message of the channel is requeued.
    pub fn recover(&mut self, key: ChannelKey) {
        if let Ok(taken) = self.take_unacked(key, 0, true) {
            for unacked in taken.into_iter().rev() {
                self.requeue(unacked);
            }
        }
    }

    /// A delivery its consumer gave up on: rejected without requeue
    /// (`Rejected`) or not acknowledged in time (`Expired`). With `x-retry-*`
    /// it comes back after a growing delay (up to the delivery limit); else
    /// a rejected message is dead-lettered and a timed-out one requeued.
    fn give_up(&mut self, unacked: Unacked, reason: Reason) {
        let Some(retry) = self.queues.get(&unacked.queue).and_then(|q| q.settings.retry) else {
            match reason {
                Reason::Rejected => {
                    let entry = QueuedMessage { seq: unacked.seq, message: unacked.message, redelivered: true };
                    self.dead_letter(unacked.queue, entry, Reason::Rejected);
                }
                _ => self.requeue(unacked),
            }
            return;
        };
        let Some(unacked) = self.count_return(unacked) else { return };
        let now = self.clock.now_ms();
        let Some(queue) = self.queues.get_mut(&unacked.queue) else { return };
        let attempt = queue.returns.get(&unacked.seq).copied().unwrap_or(1);
        let delay = retry.delay_for(attempt, noise(unacked.seq, attempt));
        queue.retry_later(unacked.seq, unacked.message, now.saturating_add(delay));
        self.timed.insert(unacked.queue);
    }

    /// Returns a delivered message to its queue, or dead-letters it once it
    /// came back more often than the queue's delivery limit allows.
    fn requeue(&mut self, unacked: Unacked) {
        let Some(unacked) = self.count_return(unacked) else { return };
        if let Some(queue) = self.queues.get_mut(&unacked.queue) {
            queue.requeue(unacked.seq, unacked.message);
            self.mark_dirty(unacked.queue);
        }
    }

    /// Counts one more return of a delivered message, in queues that count
    /// them (`x-delivery-limit`, `x-retry-*`; journaled when stored). Over
    /// the delivery limit the message is dead-lettered and `None` returned;
    /// otherwise it is handed back for the caller to put somewhere.
    fn count_return(&mut self, unacked: Unacked) -> Option<Unacked> {
        let queue = self.queues.get_mut(&unacked.queue)?;
        if queue.settings.delivery_limit.is_none() && queue.settings.retry.is_none() {
            return Some(unacked);
        }
        let returns = queue.returns.entry(unacked.seq).or_insert(0);
        *returns += 1;
        let returns = *returns;
        let stored = unacked.message.stored_index();
        if queue.durable && stored != 0 {
            self.journal.push(JournalEvent::Returned { queue: queue.name.clone(), stored, returns });
        }
        if queue.settings.delivery_limit.is_some_and(|limit| returns > limit) {
            let entry = QueuedMessage { seq: unacked.seq, message: unacked.message, redelivered: true };
            self.dead_letter(unacked.queue, entry, Reason::DeliveryLimit);
            self.process_dead_letters();
            return None;
        }
        Some(unacked)
    }

    pub fn channel_unacked(&self, key: ChannelKey) -> usize {
        self.channels.get(&key).map_or(0, |c| c.unacked.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_codec::properties::Properties;

    type Delivery = (u16, String, u64, bool, Vec<u8>);

    #[derive(Default)]
    struct Recorder {
        deliveries: Mutex<Vec<Delivery>>,
        cancelled: Mutex<Vec<String>>,
    }

    impl Outbox for Recorder {
        fn deliver(&self, channel: u16, consumer_tag: &str, delivery_tag: u64, redelivered: bool, message: &Message) {
            self.deliveries.lock().push((
                channel,
                consumer_tag.into(),
                delivery_tag,
                redelivered,
                message.body().to_vec(),
            ));
        }
        fn consumer_cancelled(&self, _channel: u16, consumer_tag: &str) {
            self.cancelled.lock().push(consumer_tag.into());
        }
        fn is_congested(&self) -> bool {
            false
        }
    }

    fn message(routing_key: &str, body: &[u8]) -> Arc<Message> {
        let mut builder = Message::builder(b"", routing_key.as_bytes(), &Properties::empty(), body.len());
        builder.push_body(body);
        Arc::new(builder.finish())
    }

    fn setup() -> (VirtualHostState, Arc<Recorder>, ChannelKey) {
        let mut vhost = VirtualHostState::new("/");
        let recorder = Arc::new(Recorder::default());
        let key = ChannelKey { connection: 1, channel: 1 };
        vhost.open_channel(key, recorder.clone());
        (vhost, recorder, key)
    }

    /// A manual clock at 5 s, queue "q" dead-lettering to queue "dlq".
    fn setup_expiring() -> (VirtualHostState, Arc<Recorder>, ChannelKey, Arc<crate::ManualClock>) {
        let (mut vhost, recorder, key) = setup();
        let clock = Arc::new(crate::ManualClock::new(5_000));
        vhost.set_clock(clock.clone());
        vhost.declare_queue(1, "dlq", false, false, false, false, FieldTable::default()).unwrap();
        let dl = args(&[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("dlq"))]);
        vhost.declare_queue(1, "q", false, false, false, false, dl).unwrap();
        (vhost, recorder, key, clock)
    }

    use crate::test_support::{table as args, text};

    fn int(value: i64) -> warren_codec::types::AMQPValue {
        warren_codec::types::AMQPValue::LongLongInt(value)
    }

    fn bodies(vhost: &mut VirtualHostState, key: ChannelKey, queue: &str) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| vhost.get(key, queue, true).unwrap()).map(|m| m.message.body().to_vec()).collect()
    }

    fn with_expiration(routing_key: &str, body: &[u8], millis: &str) -> Arc<Message> {
        let mut encoded = vec![millis.len() as u8];
        encoded.extend_from_slice(millis.as_bytes());
        let props = Properties::empty().with_field(warren_codec::properties::flag::EXPIRATION, Some(&encoded));
        let mut builder = Message::builder(b"", routing_key.as_bytes(), &props, body.len());
        builder.push_body(body);
        Arc::new(builder.finish())
    }

    #[test]
    fn rejected_messages_go_to_the_dead_letter_exchange_and_cycles_stop() {
        let (mut vhost, recorder, key) = setup();
        vhost.declare_queue(1, "dlq", false, false, false, false, FieldTable::default()).unwrap();
        let dl = args(&[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("dlq"))]);
        vhost.declare_queue(1, "work", false, false, false, false, dl).unwrap();
        vhost.consume(key, "work", "c", false, false, &FieldTable::default()).unwrap();
        vhost.publish("", message("work", b"a"), &[]).unwrap();
        vhost.publish("", message("work", b"b"), &[]).unwrap();
        vhost.run_dispatch();
        assert_eq!(recorder.deliveries.lock().len(), 2);
        vhost.nack(key, 2, true, false).unwrap();
        vhost.cancel(key, "c");
        assert_eq!(bodies(&mut vhost, key, "dlq"), vec![b"a".to_vec(), b"b".to_vec()]);

        // An expiring queue dead-lettering into itself: dropped as a cycle.
        let clock = Arc::new(crate::ManualClock::new(1_000));
        vhost.set_clock(clock.clone());
        let selfish = args(&[
            ("x-message-ttl", int(10)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("loop")),
        ]);
        vhost.declare_queue(1, "loop", false, false, false, false, selfish).unwrap();
        vhost.publish("", message("loop", b"x"), &[]).unwrap();
        clock.advance(10);
        vhost.tick();
        assert_eq!(vhost.queue("loop").map(Queue::len), Some(1), "due only once strictly past its deadline");
        clock.advance(1);
        vhost.tick();
        assert_eq!(vhost.queue("loop").map(Queue::len), Some(0), "back into the queue it died in: a cycle, dropped");
    }

    #[test]
    fn length_limits_drop_the_head_or_refuse_the_publish() {
        let (mut vhost, _, key) = setup();
        vhost.declare_queue(1, "dlq", false, false, false, false, FieldTable::default()).unwrap();
        let drop_head = args(&[
            ("x-max-length", int(2)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("dlq")),
        ]);
        vhost.declare_queue(1, "head", false, false, false, false, drop_head).unwrap();
        for body in [b"1", b"2", b"3"] {
            assert!(!vhost.publish("", message("head", body), &[]).unwrap().rejected);
        }
        assert_eq!(bodies(&mut vhost, key, "head"), vec![b"2".to_vec(), b"3".to_vec()]);
        assert_eq!(bodies(&mut vhost, key, "dlq"), vec![b"1".to_vec()]);

        let reject = args(&[("x-max-length-bytes", int(10)), ("x-overflow", text("reject-publish"))]);
        vhost.declare_queue(1, "bytes", false, false, false, false, reject).unwrap();
        let outcomes: Vec<bool> = [&b"123456"[..], b"1234", b"1"]
            .iter()
            .map(|body| vhost.publish("", message("bytes", body), &[]).unwrap().rejected)
            .collect();
        assert_eq!(outcomes, vec![false, false, true]);
        assert_eq!(vhost.queue("bytes").map(Queue::bytes), Some(10));
    }

    #[test]
    fn expired_messages_leave_from_anywhere_and_are_never_delivered() {
        let (mut vhost, recorder, key, clock) = setup_expiring();
        vhost.publish("", with_expiration("q", b"long", "1000"), &[]).unwrap();
        vhost.publish("", with_expiration("q", b"short", "10"), &[]).unwrap();
        vhost.publish("", message("q", b"forever"), &[]).unwrap();
        clock.advance(11);
        vhost.tick();
        assert_eq!(vhost.queue("q").map(Queue::len), Some(2), "the short one left from behind the head");
        assert_eq!(bodies(&mut vhost, key, "dlq"), vec![b"short".to_vec()]);

        // Due but not yet ticked: a consumer still never sees it.
        clock.advance(1_000);
        vhost.consume(key, "q", "c", true, false, &FieldTable::default()).unwrap();
        vhost.run_dispatch();
        let delivered: Vec<Vec<u8>> = recorder.deliveries.lock().iter().map(|d| d.4.clone()).collect();
        assert_eq!(delivered, vec![b"forever".to_vec()]);
        assert_eq!(bodies(&mut vhost, key, "dlq"), vec![b"long".to_vec()]);

        // x-expires: an unused queue goes away.
        vhost.declare_queue(1, "brief", false, false, false, false, args(&[("x-expires", int(100))])).unwrap();
        clock.advance(99);
        vhost.tick();
        assert!(vhost.queue("brief").is_some());
        clock.advance(1);
        vhost.tick();
        assert!(vhost.queue("brief").is_none());
    }

    #[test]
    fn a_zero_ttl_reaches_a_waiting_consumer_however_late_the_dispatch() {
        let (mut vhost, recorder, key, clock) = setup_expiring();
        vhost.qos(key, 0, 1, false);
        vhost.consume(key, "q", "c", false, false, &FieldTable::default()).unwrap();
        vhost.run_dispatch();
        vhost.publish("", with_expiration("q", b"waited-for", "0"), &[]).unwrap();
        clock.advance(5);
        vhost.run_dispatch();
        // The consumer's one credit is taken: the next has no one waiting.
        vhost.publish("", with_expiration("q", b"too-late", "0"), &[]).unwrap();
        vhost.run_dispatch();
        clock.advance(1);
        vhost.ack(key, 1, false).unwrap();
        vhost.run_dispatch();
        let delivered: Vec<Vec<u8>> = recorder.deliveries.lock().iter().map(|d| d.4.clone()).collect();
        assert_eq!(delivered, vec![b"waited-for".to_vec()]);
        vhost.cancel(key, "c");
        assert_eq!(bodies(&mut vhost, key, "dlq"), vec![b"too-late".to_vec()]);
    }

    #[test]
    fn a_delivery_limit_counts_returns_then_dead_letters() {
        let (mut vhost, recorder, key) = setup();
        vhost.declare_queue(1, "dlq", false, false, false, false, FieldTable::default()).unwrap();
        let limited = args(&[
            ("x-delivery-limit", int(1)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text("dlq")),
        ]);
        vhost.declare_queue(1, "q", false, false, false, false, limited).unwrap();
        vhost.publish("", message("q", b"poison"), &[]).unwrap();
        vhost.consume(key, "q", "c", false, false, &FieldTable::default()).unwrap();
        vhost.run_dispatch();
        vhost.nack(key, 1, false, true).unwrap();
        vhost.run_dispatch();
        {
            let deliveries = recorder.deliveries.lock();
            assert_eq!(deliveries.len(), 2);
            assert!(deliveries[1].3, "second delivery is flagged redelivered");
        }
        vhost.nack(key, 2, false, true).unwrap();
        vhost.run_dispatch();
        assert_eq!(recorder.deliveries.lock().len(), 2, "not delivered a third time");
        vhost.cancel(key, "c");
        let dead = vhost.get(key, "dlq", true).unwrap().unwrap();
        let headers = dead.message.properties_view().headers().unwrap();
        let first = warren_codec::table::get(&headers, "x-first-death-reason").and_then(warren_codec::table::as_str);
        assert_eq!(first, Some("delivery_limit"));
    }

    #[test]
    fn prefetch_limits_deliveries_and_acks_release_more() {
        let (mut vhost, recorder, key) = setup();
        vhost.declare_queue(1, "q", false, false, false, false, FieldTable::default()).unwrap();
        vhost.qos(key, 0, 2, false);
        vhost.consume(key, "q", "c", false, false, &FieldTable::default()).unwrap();
        for i in 0..5u8 {
            vhost.publish("", message("q", &[i]), &[]).unwrap();
        }
        vhost.run_dispatch();
        assert_eq!(recorder.deliveries.lock().len(), 2);
        vhost.ack(key, 2, true).unwrap();
        vhost.run_dispatch();
        let bodies: Vec<u8> = recorder.deliveries.lock().iter().map(|d| d.4[0]).collect();
        assert_eq!(bodies, vec![0, 1, 2, 3]);
        assert!(vhost.ack(key, 2, false).is_err(), "double ack is an unknown tag");
    }

    #[test]
    fn closing_a_channel_requeues_in_original_order_with_redelivered() {
        let (mut vhost, recorder, key) = setup();
        vhost.declare_queue(1, "q", false, false, false, false, FieldTable::default()).unwrap();
        vhost.consume(key, "q", "c", false, false, &FieldTable::default()).unwrap();
        for i in 0..3u8 {
            vhost.publish("", message("q", &[i]), &[]).unwrap();
        }
        vhost.run_dispatch();
        assert_eq!(recorder.deliveries.lock().len(), 3);
        vhost.close_channel(key);
        let queue = vhost.queue("q").unwrap();
        assert_eq!(queue.len(), 3);
        assert!(queue.entries()[0].redelivered);
        let other = ChannelKey { connection: 1, channel: 2 };
        vhost.open_channel(other, recorder.clone());
        let got = vhost.get(other, "q", true).unwrap().unwrap();
        assert_eq!(got.message.body(), &[0]);
        assert!(got.redelivered);
        assert_eq!(got.message_count, 2);
    }

    /// Found by the model test: acking a delivery made to a cancelled
    /// consumer used to free credit of a new consumer with the same tag.
    #[test]
    fn reusing_a_consumer_tag_does_not_inherit_old_unacked_credit() {
        let (mut vhost, recorder, key) = setup();
        vhost.declare_queue(1, "q", false, false, false, false, FieldTable::default()).unwrap();
        for i in 0..3u8 {
            vhost.publish("", message("q", &[i]), &[]).unwrap();
        }
        vhost.consume(key, "q", "tag", false, false, &FieldTable::default()).unwrap();
        vhost.run_dispatch();
        assert!(vhost.cancel(key, "tag"));
        for i in 3..5u8 {
            vhost.publish("", message("q", &[i]), &[]).unwrap();
        }
        vhost.qos(key, 0, 1, false);
        vhost.consume(key, "q", "tag", false, false, &FieldTable::default()).unwrap();
        vhost.run_dispatch();
        assert_eq!(recorder.deliveries.lock().len(), 4);
        vhost.ack(key, 1, false).unwrap();
        vhost.run_dispatch();
        assert_eq!(recorder.deliveries.lock().len(), 4, "the new consumer still holds its one message");
    }

    #[test]
    fn journal_records_persistent_messages_in_durable_queues_and_their_settlement() {
        let (mut vhost, _recorder, key) = setup();
        vhost.declare_queue(1, "durable", false, true, false, false, FieldTable::default()).unwrap();
        vhost.declare_queue(1, "transient", false, false, false, false, FieldTable::default()).unwrap();
        vhost.declare_exchange("fan", "fanout", false, true, false, false, FieldTable::default()).unwrap();
        vhost.bind_queue(1, "durable", "fan", "", FieldTable::default(), true).unwrap();
        vhost.bind_queue(1, "transient", "fan", "", FieldTable::default(), true).unwrap();
        let mut definitions = Vec::new();
        vhost.drain_journal(&mut definitions);
        let kinds: Vec<String> = definitions
            .iter()
            .map(|e| match e {
                JournalEvent::QueueDeclared(q) => format!("Q{}", q.name),
                JournalEvent::ExchangeDeclared(x) => format!("X{}", x.name),
                JournalEvent::Bound(b) => format!("B{}>{}", b.source, b.destination),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(kinds, ["Qdurable", "Xfan", "Bfan>durable"], "only durable definitions are journaled");
        let props = Properties::parse(bytes::Bytes::from_static(&[0x10, 0, 2])).unwrap();
        let transient = Properties::empty();
        let mut events = Vec::new();
        // What a store does: record where each published message went.
        let mut publish = |vhost: &mut VirtualHostState, index: u64, persistent: bool| {
            let mut builder = Message::builder(b"fan", b"", if persistent { &props } else { &transient }, 1);
            builder.push_body(b"x");
            vhost.publish("fan", Arc::new(builder.finish()), &[]).unwrap();
            let start = events.len();
            vhost.drain_journal(&mut events);
            for event in &events[start..] {
                if let JournalEvent::Published { message, .. } = event {
                    message.set_stored_index(index);
                }
            }
        };
        publish(&mut vhost, 7, true);
        publish(&mut vhost, 0, false);
        publish(&mut vhost, 8, true);
        let got = vhost.get(key, "durable", false).unwrap().unwrap();
        vhost.ack(key, got.delivery_tag, false).unwrap();
        vhost.purge_queue(1, "durable").unwrap();
        vhost.drain_journal(&mut events);
        let summary: Vec<String> = events
            .iter()
            .map(|e| match e {
                JournalEvent::Published { message, queues } => format!("P{}{:?}", message.stored_index(), queues),
                JournalEvent::Settled { queue, stored } => format!("S{stored}{queue}"),
                JournalEvent::QueueDeleted { queue } => format!("D{queue}"),
                JournalEvent::Returned { queue, stored, returns } => format!("R{stored}{queue}{returns}"),
                _ => "definition".into(),
            })
            .collect();
        assert_eq!(summary, vec!["P7[\"durable\"]", "P8[\"durable\"]", "S7durable", "S8durable"]);
        let definitions = vhost.durable_definitions();
        assert_eq!(definitions.queues.len(), 1);
        assert_eq!(definitions.exchanges.len(), 1);
        assert_eq!(definitions.bindings.len(), 1, "only bindings between durable ends are stored");
        let mut restored = VirtualHostState::new("/");
        restored.restore(&definitions);
        assert_eq!(restored.durable_definitions(), definitions);
    }

    #[test]
    fn round_robin_between_competing_consumers() {
        let (mut vhost, recorder, key) = setup();
        vhost.declare_queue(1, "q", false, false, false, false, FieldTable::default()).unwrap();
        vhost.consume(key, "q", "a", true, false, &FieldTable::default()).unwrap();
        vhost.consume(key, "q", "b", true, false, &FieldTable::default()).unwrap();
        for i in 0..4u8 {
            vhost.publish("", message("q", &[i]), &[]).unwrap();
            vhost.run_dispatch();
        }
        let tags: Vec<String> = recorder.deliveries.lock().iter().map(|d| d.1.clone()).collect();
        assert_eq!(tags, vec!["a", "b", "a", "b"]);
    }

    #[test]
    fn exchange_to_exchange_cycles_and_alternate_exchange() {
        let (mut vhost, _recorder, _key) = setup();
        let none = FieldTable::default;
        vhost.declare_exchange("x1", "fanout", false, false, false, false, none()).unwrap();
        vhost.declare_exchange("x2", "fanout", false, false, false, false, none()).unwrap();
        vhost.bind_exchange("x2", "x1", "", none(), true).unwrap();
        vhost.bind_exchange("x1", "x2", "", none(), true).unwrap();
        vhost.declare_queue(1, "q", false, false, false, false, none()).unwrap();
        vhost.bind_queue(1, "q", "x2", "", none(), true).unwrap();
        assert_eq!(vhost.publish("x1", message("k", b"m"), &[]).unwrap().queues, 1);
        let mut args = FieldTable::default();
        args.insert("alternate-exchange".into(), warren_codec::types::AMQPValue::LongString("x1".into()));
        vhost.declare_exchange("d", "direct", false, false, false, false, args).unwrap();
        assert_eq!(vhost.publish("d", message("nothing-bound", b"m"), &[]).unwrap().queues, 1);
        assert_eq!(vhost.queue("q").unwrap().len(), 2);
    }

    #[test]
    fn deleting_a_queue_cancels_its_consumers() {
        let (mut vhost, recorder, key) = setup();
        vhost.declare_queue(1, "q", false, false, false, false, FieldTable::default()).unwrap();
        vhost.consume(key, "q", "c", false, false, &FieldTable::default()).unwrap();
        vhost.delete_queue(1, "q", false, false).unwrap();
        // Held until the caller has written delete-ok.
        assert!(recorder.cancelled.lock().is_empty());
        vhost.send_notices();
        assert_eq!(*recorder.cancelled.lock(), vec!["c".to_string()]);
        assert!(vhost.publish("", message("q", b"x"), &[]).unwrap().queues == 0);
    }
}

/// The queue and channel state machine against a reference model: whatever
/// the interleaving of publishes, consumers, gets, acks, nacks, recovers,
/// qos changes and channel closes, every message is in exactly one place
/// (ready, unacked on one channel, or settled), prefetch is never exceeded,
/// and first deliveries leave in publish order.
#[cfg(test)]
mod model {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use warren_codec::properties::Properties;

    #[derive(Default)]
    struct Recorder {
        deliveries: Mutex<Vec<(u16, u64, bool, u32)>>,
    }

    impl Outbox for Recorder {
        fn deliver(&self, channel: u16, _tag: &str, delivery_tag: u64, redelivered: bool, message: &Message) {
            let id = u32::from_be_bytes(message.body()[..4].try_into().unwrap());
            self.deliveries.lock().push((channel, delivery_tag, redelivered, id));
        }
        fn consumer_cancelled(&self, _channel: u16, _consumer_tag: &str) {}
        fn is_congested(&self) -> bool {
            false
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Publish,
        Consume(u16, u16),
        Cancel(u16),
        Get(u16, bool),
        Ack(u16, prop::sample::Index, bool),
        Nack(u16, prop::sample::Index, bool, bool),
        Recover(u16),
        Close(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        let channel = 1u16..=2;
        prop_oneof![
            4 => Just(Op::Publish),
            1 => (channel.clone(), 0u16..4).prop_map(|(c, p)| Op::Consume(c, p)),
            1 => channel.clone().prop_map(Op::Cancel),
            1 => (channel.clone(), any::<bool>()).prop_map(|(c, n)| Op::Get(c, n)),
            3 => (channel.clone(), any::<prop::sample::Index>(), any::<bool>()).prop_map(|(c, i, m)| Op::Ack(c, i, m)),
            2 => (channel.clone(), any::<prop::sample::Index>(), any::<bool>(), any::<bool>()).prop_map(|(c, i, m, r)| Op::Nack(c, i, m, r)),
            1 => channel.clone().prop_map(Op::Recover),
            1 => channel.prop_map(Op::Close),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn every_message_is_in_exactly_one_place(ops in proptest::collection::vec(op(), 1..120)) {
            let mut vhost = VirtualHostState::new("/");
            let recorder = Arc::new(Recorder::default());
            let key = |c: u16| ChannelKey { connection: 1, channel: c };
            for c in 1..=2 {
                vhost.open_channel(key(c), recorder.clone());
            }
            // Rejected messages, and those returned more than twice, go to
            // "dlq": they must neither vanish nor be duplicated.
            vhost.declare_queue(1, "dlq", false, false, false, false, FieldTable::default()).unwrap();
            let mut arguments = FieldTable::default();
            arguments.insert("x-dead-letter-exchange".into(), warren_codec::types::AMQPValue::LongString("".into()));
            arguments.insert("x-dead-letter-routing-key".into(), warren_codec::types::AMQPValue::LongString("dlq".into()));
            arguments.insert("x-delivery-limit".into(), warren_codec::types::AMQPValue::LongLongInt(2));
            vhost.declare_queue(1, "q", false, false, false, false, arguments).unwrap();
            let mut published = 0u32;
            let mut settled: Vec<u32> = Vec::new();
            // Per channel: outstanding (delivery tag, id), in tag order.
            let mut outstanding: BTreeMap<u16, Vec<(u64, u32)>> = BTreeMap::new();
            let mut consuming: BTreeMap<u16, (bool, u16)> = BTreeMap::new();
            // Delivery tags each current consumer received (prefetch counts these).
            let mut consumer_tags: BTreeMap<u16, std::collections::HashSet<u64>> = BTreeMap::new();
            let mut seen = 0usize;
            let mut first_deliveries: Vec<u32> = Vec::new();
            for op in ops {
                match op {
                    Op::Publish => {
                        let mut builder = Message::builder(b"", b"q", &Properties::empty(), 4);
                        builder.push_body(&published.to_be_bytes());
                        published += 1;
                        vhost.publish("", Arc::new(builder.finish()), &[]).unwrap();
                    }
                    Op::Consume(c, prefetch) => {
                        if let std::collections::btree_map::Entry::Vacant(slot) = consuming.entry(c) {
                            vhost.qos(key(c), 0, prefetch, false);
                            let no_ack = prefetch == 3;
                            vhost.consume(key(c), "q", "tag", no_ack, false, &FieldTable::default()).unwrap();
                            slot.insert((no_ack, prefetch));
                            consumer_tags.insert(c, Default::default());
                        }
                    }
                    Op::Cancel(c) => {
                        if consuming.remove(&c).is_some() {
                            prop_assert!(vhost.cancel(key(c), "tag"));
                        }
                    }
                    Op::Get(c, no_ack) => {
                        if let Some(got) = vhost.get(key(c), "q", no_ack).unwrap() {
                            let id = u32::from_be_bytes(got.message.body()[..4].try_into().unwrap());
                            if !got.redelivered {
                                first_deliveries.push(id);
                            }
                            if no_ack {
                                settled.push(id);
                            } else {
                                outstanding.entry(c).or_default().push((got.delivery_tag, id));
                            }
                        }
                    }
                    Op::Ack(c, index, multiple) | Op::Nack(c, index, multiple, _) => {
                        let list = outstanding.entry(c).or_default();
                        if list.is_empty() {
                            continue;
                        }
                        let i = index.index(list.len());
                        let tag = list[i].0;
                        let taken: Vec<(u64, u32)> = if multiple { list.drain(..=i).collect() } else { vec![list.remove(i)] };
                        match op {
                            Op::Nack(_, _, _, true) => {
                                vhost.nack(key(c), tag, multiple, true).unwrap();
                            }
                            Op::Nack(_, _, _, false) => {
                                // Dead-lettered into "dlq", counted there.
                                vhost.nack(key(c), tag, multiple, false).unwrap();
                            }
                            _ => {
                                vhost.ack(key(c), tag, multiple).unwrap();
                                settled.extend(taken.iter().map(|t| t.1));
                            }
                        }
                    }
                    Op::Recover(c) => {
                        vhost.recover(key(c));
                        outstanding.remove(&c);
                    }
                    Op::Close(c) => {
                        vhost.close_channel(key(c));
                        outstanding.remove(&c);
                        consuming.remove(&c);
                        vhost.open_channel(key(c), recorder.clone());
                    }
                }
                vhost.run_dispatch();
                for &(channel, tag, redelivered, id) in &recorder.deliveries.lock()[seen..] {
                    if !redelivered {
                        first_deliveries.push(id);
                    }
                    match consuming.get(&channel) {
                        Some((true, _)) => settled.push(id),
                        _ => {
                            outstanding.entry(channel).or_default().push((tag, id));
                            consumer_tags.entry(channel).or_default().insert(tag);
                        }
                    }
                }
                seen = recorder.deliveries.lock().len();

                // Conservation: ready + dead-lettered + unacked + settled is
                // every id once.
                let body_id = |m: crate::queue::EntryRef<'_>| u32::from_be_bytes(m.message.unwrap().body()[..4].try_into().unwrap());
                let mut all: Vec<u32> = vhost.queue("q").unwrap().entries().into_iter().map(body_id).collect();
                all.extend(vhost.queue("dlq").unwrap().entries().into_iter().map(body_id));
                for (c, list) in &outstanding {
                    prop_assert_eq!(vhost.channel_unacked(key(*c)), list.len());
                    all.extend(list.iter().map(|t| t.1));
                }
                all.extend(settled.iter().copied());
                all.sort_unstable();
                prop_assert_eq!(all, (0..published).collect::<Vec<_>>());
                // Prefetch is respected for acking consumers.
                for (c, (no_ack, prefetch)) in &consuming {
                    if !no_ack && *prefetch > 0 {
                        let tags = consumer_tags.get(c);
                        let held = outstanding.get(c).map_or(0, |l| l.iter().filter(|t| tags.is_some_and(|s| s.contains(&t.0))).count());
                        prop_assert!(held <= usize::from(*prefetch), "prefetch {} exceeded on channel {}: {}", prefetch, c, held);
                    }
                }
            }
            // First deliveries leave in publish order.
            let mut sorted = first_deliveries.clone();
            sorted.sort_unstable();
            prop_assert_eq!(first_deliveries, sorted);
        }
    }
}
