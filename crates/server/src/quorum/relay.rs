//! Consuming through any node. A consumer of a stand-in is subscribed at
//! the queue's leader, whose node serves it as a consumer of its own queue
//! on a channel of no connection; the leader's deliveries come back over
//! the cluster connection and go to the client under its channel's tags,
//! and what the client settles goes back under the leader's tags.
//!
//! Each subscription has a number of its own (`wire`). When the leader
//! changes, the stand-in's node takes back what the client holds unsettled
//! (the next leader delivers it again, marked redelivered), and subscribes
//! again under a new number: a late delivery or settlement of the old
//! subscription is recognised and dropped, never applied to the new one.
//!
//! Requests (this node's handler beside Raft's, `Node::serve_also`), first
//! byte: to the leader `C` subscribe, `S` settle, `X` cancel, `N` the
//! queue's counts (a passive declare elsewhere), `U` purge, `T` get and
//! `K` settle what it got, `Q` delete (classic queues only), `P` publish (to a classic
//! queue's home, `classic.rs`); to the stand-in's node `D`
//! deliver, `G` gone (the leader stopped serving it), `F` failed (a
//! delivery acknowledgement timed out: close the channel).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};
use warren_codec::reply::{AmqpError, ReplyCode};
use warren_codec::types::{AMQPValue, FieldTable};
use warren_core::vhost::{ChannelKey, Outcome, Relay, RelayedConsumer};
use warren_core::{Consume, Message, Outbox};

use super::{replica, Local, RelayedGot, Replication};
use crate::session::Session;

const SUBSCRIBE: u8 = b'C';
const SETTLE: u8 = b'S';
const CANCEL: u8 = b'X';
const DELIVER: u8 = b'D';
const GONE: u8 = b'G';
const FAILED: u8 = b'F';
const COUNTS: u8 = b'N';
/// Purge the queue (through a stand-in), to its leader or home node.
const PURGE: u8 = b'U';
/// `basic.get` through a classic queue's stand-in, to its home node; and
/// the settling of what it got.
const GET: u8 = b'T';
const SETTLE_GOT: u8 = b'K';
/// Delete a classic queue (through its stand-in), to its home node.
const DELETE: u8 = b'Q';
/// How long a node that had a queue deleted on its home node waits to see
/// the placement go (then its stand-in is gone here too).
const UNPLACED_PATIENCE: Duration = Duration::from_secs(2);
/// The queue had nothing for a get.
const EMPTY: u8 = 5;
/// Messages published through a stand-in, to a classic queue's home node.
pub(super) const PUBLISH: u8 = b'P';

pub(super) const OK: u8 = 0;
/// The queue does not run on the node asked (not its leader, or not yet).
pub(super) const NOT_LEADER: u8 = 1;
/// The leader refused the consumer (then code, hard flag, text).
const REFUSED: u8 = 2;
/// No such subscription (or an older one).
pub(super) const UNKNOWN: u8 = 3;
/// A cancelled consumer's last delivery was settled: the leader no longer
/// serves it.
const CLOSED: u8 = 4;

/// How long one relay request may take.
const CALL_PATIENCE: Duration = Duration::from_secs(10);
/// How long one subscription request may take (then it is tried again,
/// at whichever node leads by then).
const SUBSCRIBE_CALL_PATIENCE: Duration = Duration::from_secs(1);
/// How often a connection waiting for its relayed consumer's answer looks
/// whether this node took the queue over meanwhile.
const RELAY_ANSWER_CHECK: Duration = Duration::from_millis(200);
/// How long a passive declare through a stand-in waits for the leader's
/// counts (then it answers from what this node knows).
const COUNTS_PATIENCE: Duration = Duration::from_secs(2);
/// How long `basic.consume` through a stand-in waits for the leader.
const SUBSCRIBE_PATIENCE: Duration = Duration::from_secs(10);
/// Unsent delivery bytes above which the leader stops delivering to a
/// relayed consumer until they are sent.
const RELAY_BUFFER_BYTES: usize = 4 << 20;
/// How often a waiting subscription looks for a leader again.
const RETRY_EVERY: Duration = Duration::from_millis(25);

/// Both sides' state on this node.
#[derive(Default)]
pub(super) struct Relays {
    /// Stand-in side: (vhost, consumer id) -> its subscription.
    subscribers: Mutex<HashMap<(String, u64), Arc<Subscriber>>>,
    /// Home side: (node, vhost) -> the channel holding what `basic.get`
    /// through that node's stand-ins took and the client has not settled.
    getters: Mutex<HashMap<(String, String), ChannelKey>>,
    /// Leader side: (node, vhost, consumer id) -> the consumer served here.
    served: Mutex<HashMap<(String, String, u64), Arc<Served>>>,
    next_wire: AtomicU64,
    next_connection: AtomicU64,
}

impl Relays {
    /// `seed`: subscription numbers differ from a previous run's (a leader
    /// may still serve one of those).
    pub(super) fn new(seed: u64) -> Relays {
        Relays { next_wire: AtomicU64::new(seed | 1), next_connection: AtomicU64::new(1), ..Relays::default() }
    }

    fn wire(&self) -> u64 {
        self.next_wire.fetch_add(1, Ordering::Relaxed)
    }
}

/// A consumer of a stand-in here, subscribed at the leader.
pub(super) struct Subscriber {
    vhost: String,
    local: Arc<Local>,
    consumer: RelayedConsumer,
    state: Mutex<SubState>,
    /// Set once the client has its `consume-ok` (deliveries wait for it).
    ready: watch::Sender<bool>,
    /// The first subscription's outcome, for the `basic.consume` waiting.
    answered: watch::Sender<Option<Result<(), AmqpError>>>,
}

struct SubState {
    /// The current subscription (0: none, the consumer is gone or served
    /// here).
    wire: u64,
    /// Where the current subscription was accepted.
    leader: Option<String>,
    ops: VecDeque<Op>,
    sending: bool,
    /// The client cancelled it: what it holds may still be settled, then
    /// the leader closes it.
    cancelled: bool,
}

enum Op {
    Subscribe(u64),
    Settle(u64, u64, Outcome),
    Cancel(u64),
}

/// A consumer of another node's stand-in, served by this node's queue.
struct Served {
    node: String,
    vhost: String,
    consumer: u64,
    wire: u64,
    key: ChannelKey,
    tag: Arc<str>,
    queue: String,
    outbox: Arc<RelayOutbox>,
    cancelled: AtomicBool,
}

/// Where the core writes a served consumer's deliveries: encoded for the
/// stand-in's node, sent by the consumer's task.
struct RelayOutbox {
    buf: Mutex<Vec<u8>>,
    notify: Notify,
    congested: AtomicBool,
    gone: AtomicBool,
    failed: Mutex<Option<String>>,
    closed: AtomicBool,
}

impl Outbox for RelayOutbox {
    fn deliver(&self, _channel: u16, _consumer_tag: &str, delivery_tag: u64, redelivered: bool, message: &Message) {
        let mut buf = self.buf.lock();
        let start = buf.len();
        buf.extend_from_slice(&delivery_tag.to_le_bytes());
        buf.push(u8::from(redelivered));
        buf.extend_from_slice(&[0; 4]);
        replica::encode_message(&mut buf, message);
        let len = u32::try_from(buf.len() - start - 13).unwrap_or(u32::MAX);
        buf[start + 9..start + 13].copy_from_slice(&len.to_le_bytes());
        if buf.len() > RELAY_BUFFER_BYTES {
            self.congested.store(true, Ordering::Release);
        }
        drop(buf);
        self.notify.notify_one();
    }

    fn consumer_cancelled(&self, _channel: u16, _consumer_tag: &str) {
        self.gone.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    fn is_congested(&self) -> bool {
        self.congested.load(Ordering::Acquire)
    }

    fn fail_channel(&self, _channel: u16, text: &str) {
        *self.failed.lock() = Some(text.to_string());
        self.notify.notify_one();
    }
}

/// The channel of no connection that holds other nodes' `basic.get`s:
/// nothing is delivered on it.
struct NoDeliveries;

impl Outbox for NoDeliveries {
    fn deliver(&self, _channel: u16, _consumer_tag: &str, _delivery_tag: u64, _redelivered: bool, _message: &Message) {}
    fn consumer_cancelled(&self, _channel: u16, _consumer_tag: &str) {}
    fn is_congested(&self) -> bool {
        false
    }
}

pub(super) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u16::try_from(s.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A request's start, either way: kind, subscription, consumer, virtual
/// host.
fn header(kind: u8, wire: u64, consumer: u64, vhost: &str) -> Vec<u8> {
    let mut request = vec![kind];
    request.extend_from_slice(&wire.to_le_bytes());
    request.extend_from_slice(&consumer.to_le_bytes());
    put_str(&mut request, vhost);
    request
}

/// Reads what [`put_str`] and the fixed-size writes put, in order.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    pub(super) fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }
    pub(super) fn u16(&mut self) -> Option<u16> {
        self.bytes(2)?.try_into().ok().map(u16::from_le_bytes)
    }
    pub(super) fn u32(&mut self) -> Option<u32> {
        self.bytes(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    pub(super) fn u64(&mut self) -> Option<u64> {
        self.bytes(8)?.try_into().ok().map(u64::from_le_bytes)
    }
    pub(super) fn str(&mut self) -> Option<&'a str> {
        let n = usize::from(self.u16()?);
        std::str::from_utf8(self.bytes(n)?).ok()
    }
}

/// A refusal (`REFUSED`, the reply code, whether it is hard, the text) as
/// the queue's node answers it.
fn refused(error: &AmqpError) -> Vec<u8> {
    let mut answer = vec![REFUSED];
    answer.extend_from_slice(&error.code.code().to_le_bytes());
    answer.push(u8::from(error.hard));
    put_str(&mut answer, &error.text);
    answer
}

/// The refusal of the queue's node (after `REFUSED`) as the client is to
/// hear it, for the method (`class_id`, `method_id`) it answers.
fn refusal(reader: &mut Reader<'_>, (class_id, method_id): (u16, u16)) -> AmqpError {
    let (code, hard) = (reader.u16().unwrap_or(406), reader.u8() == Some(1));
    let text = reader.str().unwrap_or("PRECONDITION_FAILED");
    let code = match code {
        403 => ReplyCode::AccessRefused,
        404 => ReplyCode::NotFound,
        405 => ReplyCode::ResourceLocked,
        530 => ReplyCode::NotAllowed,
        540 => ReplyCode::NotImplemented,
        _ => ReplyCode::PreconditionFailed,
    };
    AmqpError { code, text: text.to_string(), class_id, method_id, hard }
}

fn outcome_byte(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Ack => 0,
        Outcome::Requeue => 1,
        Outcome::Reject => 2,
    }
}

impl Replication {
    // ---- the stand-in's side ----

    /// A stand-in's consumer came or went, or settled a delivery (called
    /// while its virtual host is locked: only queues work).
    pub(super) fn relay_event(&self, vhost: &str, local: &Arc<Local>, relay: Relay) {
        let mut subscribers = self.relays.subscribers.lock();
        let subscriber = match relay {
            Relay::Consume(consumer) => {
                let wire = self.relays.wire();
                let subscriber = Arc::new(Subscriber {
                    vhost: vhost.to_string(),
                    local: local.clone(),
                    state: Mutex::new(SubState {
                        wire,
                        leader: None,
                        ops: VecDeque::from([Op::Subscribe(wire)]),
                        sending: false,
                        cancelled: false,
                    }),
                    // A consumer already confirmed to its client (its
                    // queue was led from here) is subscribed again as is.
                    ready: watch::channel(consumer.established).0,
                    answered: watch::channel(consumer.established.then_some(Ok(()))).0,
                    consumer,
                });
                subscribers.insert((vhost.to_string(), subscriber.consumer.id), subscriber.clone());
                subscriber
            }
            Relay::Cancel { consumer } => {
                let Some(subscriber) = subscribers.get(&(vhost.to_string(), consumer)).cloned() else { return };
                let mut state = subscriber.state.lock();
                state.cancelled = true;
                let wire = state.wire;
                state.ops.push_back(Op::Cancel(wire));
                drop(state);
                subscriber
            }
            Relay::Settle { consumer: warren_core::vhost::GOT, upstream, outcome } => {
                drop(subscribers);
                self.settle_got(vhost, &local.name, upstream, outcome);
                return;
            }
            Relay::Settle { consumer, upstream, outcome } => {
                let Some(subscriber) = subscribers.get(&(vhost.to_string(), consumer)).cloned() else { return };
                let mut state = subscriber.state.lock();
                let wire = state.wire;
                if wire != 0 {
                    state.ops.push_back(Op::Settle(wire, upstream, outcome));
                }
                drop(state);
                subscriber
            }
        };
        drop(subscribers);
        self.send_ops(subscriber);
    }

    fn send_ops(&self, subscriber: Arc<Subscriber>) {
        {
            let mut state = subscriber.state.lock();
            if state.ops.is_empty() || std::mem::replace(&mut state.sending, true) {
                return;
            }
        }
        let Some(this) = self.me.upgrade() else { return };
        tokio::spawn(async move { this.run_ops(&subscriber).await });
    }

    /// Sends a subscriber's requests in order, settlements in batches.
    async fn run_ops(&self, subscriber: &Subscriber) {
        loop {
            let op = {
                let mut state = subscriber.state.lock();
                match state.ops.pop_front() {
                    Some(op) => op,
                    None => {
                        state.sending = false;
                        return;
                    }
                }
            };
            match op {
                Op::Subscribe(wire) => self.subscribe(subscriber, wire).await,
                Op::Settle(wire, upstream, outcome) => {
                    let mut settles = vec![(upstream, outcome)];
                    {
                        let mut state = subscriber.state.lock();
                        while let Some(Op::Settle(w, upstream, outcome)) = state.ops.front() {
                            if *w != wire {
                                break;
                            }
                            settles.push((*upstream, *outcome));
                            state.ops.pop_front();
                        }
                    }
                    let Some(leader) = subscriber.state.lock().leader.clone() else { continue };
                    let mut request = self.header(SETTLE, subscriber, wire);
                    request.extend_from_slice(&u32::try_from(settles.len()).unwrap_or(u32::MAX).to_le_bytes());
                    for (upstream, outcome) in settles {
                        request.extend_from_slice(&upstream.to_le_bytes());
                        request.push(outcome_byte(outcome));
                    }
                    // Lost with a leader that went: the next one delivers
                    // those messages again.
                    let answer = self.call_while(&leader, &request, || subscriber.state.lock().wire == wire).await;
                    self.closed_if(subscriber, answer.as_deref());
                }
                Op::Cancel(wire) => {
                    let leader = subscriber.state.lock().leader.clone();
                    let answer = match leader {
                        Some(leader) => self.call(&leader, &self.header(CANCEL, subscriber, wire)).await,
                        // Never subscribed: nothing to tell.
                        None => Some(vec![CLOSED]),
                    };
                    self.closed_if(subscriber, answer.as_deref());
                }
            }
        }
    }

    /// A cancelled subscriber whose leader closed it (or that has no leader
    /// any more) is forgotten.
    fn closed_if(&self, subscriber: &Subscriber, answer: Option<&[u8]>) {
        let cancelled = subscriber.state.lock().cancelled;
        if cancelled && matches!(answer, None | Some([CLOSED | UNKNOWN])) {
            self.forget(subscriber);
        }
    }

    fn forget(&self, subscriber: &Subscriber) {
        let mut subscribers = self.relays.subscribers.lock();
        let id = (subscriber.vhost.clone(), subscriber.consumer.id);
        if subscribers.get(&id).is_some_and(|s| std::ptr::eq(&**s, subscriber)) {
            subscribers.remove(&id);
        }
    }

    fn header(&self, kind: u8, subscriber: &Subscriber, wire: u64) -> Vec<u8> {
        header(kind, wire, subscriber.consumer.id, &subscriber.vhost)
    }

    async fn call(&self, node: &str, payload: &[u8]) -> Option<Vec<u8>> {
        self.call_within(node, payload, CALL_PATIENCE).await
    }

    pub(super) async fn call_within(&self, node: &str, payload: &[u8], patience: Duration) -> Option<Vec<u8>> {
        let request = warren_raft::other_request(payload);
        self.members.call(node, &request, patience).await.ok()
    }

    /// [`Self::call`], given up as soon as `still` is false (the
    /// subscription was replaced: a leader cut off by a partition answers
    /// nothing and closes no connection).
    async fn call_while(&self, node: &str, payload: &[u8], still: impl Fn() -> bool) -> Option<Vec<u8>> {
        let call = self.call(node, payload);
        tokio::pin!(call);
        loop {
            tokio::select! {
                answer = &mut call => return answer,
                () = tokio::time::sleep(RETRY_EVERY) => {
                    if !still() {
                        return None;
                    }
                }
            }
        }
    }

    pub(super) fn is_up(&self, node: &str) -> bool {
        self.members.status().iter().any(|p| p.name == node && p.up)
    }

    /// Subscribes at the queue's leader, retrying while it has none or is
    /// not ready; gives up when the subscription was replaced or dropped.
    async fn subscribe(&self, subscriber: &Subscriber, wire: u64) {
        let first = subscriber.answered.borrow().is_none();
        let give_up = tokio::time::Instant::now() + SUBSCRIBE_PATIENCE;
        let mut request = self.header(SUBSCRIBE, subscriber, wire);
        let c = &subscriber.consumer;
        put_str(&mut request, &subscriber.local.name);
        put_str(&mut request, &c.tag);
        request.push(u8::from(c.no_ack));
        request.push(u8::from(c.exclusive));
        request.extend_from_slice(&c.priority.to_le_bytes());
        request.extend_from_slice(&c.prefetch.to_le_bytes());
        loop {
            {
                let state = subscriber.state.lock();
                if state.wire != wire || state.cancelled {
                    return;
                }
            }
            let leader = self.leader_of(&subscriber.local);
            match leader {
                // Led from here (or about to be): the consumer stays on the
                // queue, which is served here once taken up.
                Some(leader) if leader == self.node.name() => {
                    subscriber.answered.send_replace(Some(Ok(())));
                    return;
                }
                // A paused leader answers nothing: wait for its successor.
                Some(leader) if self.is_up(&leader) => {
                    let answer = self.call_within(&leader, &request, SUBSCRIBE_CALL_PATIENCE).await;
                    match answer.as_deref() {
                        Some([OK]) => {
                            // (Cancelled meanwhile: the cancel queued goes
                            // to this leader.)
                            let mut state = subscriber.state.lock();
                            if state.wire == wire {
                                state.leader = Some(leader.clone());
                            }
                            drop(state);
                            subscriber.answered.send_replace(Some(Ok(())));
                            return;
                        }
                        Some([REFUSED, rest @ ..]) => {
                            let error = refusal(&mut Reader(rest), (60, 20));
                            if first {
                                subscriber.answered.send_replace(Some(Err(error)));
                            } else {
                                info!(queue = %subscriber.local.name, %error, "a consumer was refused by the queue's new leader");
                                self.cancel_here(subscriber);
                            }
                            return;
                        }
                        // Asked again from outside the group (the watch
                        // asks its members who leads).
                        Some([NOT_LEADER, ..])
                            if subscriber.local.home.is_none() && !self.node.hosts(subscriber.local.group) =>
                        {
                            self.node.set_leader_hint(subscriber.local.group, None);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
            if let (true, Some((home, _))) = (first, &subscriber.local.home) {
                if !self.is_up(home) {
                    subscriber.answered.send_replace(Some(Err(self.unavailable(&subscriber.local, (60, 20)))));
                    return;
                }
            }
            if first && tokio::time::Instant::now() >= give_up {
                let error = AmqpError::soft(
                    ReplyCode::ResourceLocked,
                    format!(
                        "cannot consume from quorum queue '{}' in vhost '{}': its leader did not answer in time",
                        subscriber.local.name, subscriber.vhost
                    ),
                    60,
                    20,
                );
                subscriber.answered.send_replace(Some(Err(error)));
                return;
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }

    /// Cancels a subscriber's consumer here (its client is told).
    fn cancel_here(&self, subscriber: &Subscriber) {
        let Some(broker) = self.broker.upgrade() else { return };
        let Some(vhost) = broker.vhost(&subscriber.vhost) else { return };
        Session::open(&vhost, &broker.store).cancel_relayed(&subscriber.consumer);
    }

    /// `basic.consume` on a stand-in waits for this: the leader accepted
    /// the consumer, or why not.
    pub async fn relayed_consume(&self, vhost: &str, key: ChannelKey, tag: &str) -> Result<(), AmqpError> {
        let subscriber = self
            .relays
            .subscribers
            .lock()
            .values()
            .find(|s| s.vhost == vhost && s.consumer.key == key && &*s.consumer.tag == tag)
            .cloned();
        // Already gone (cancelled meanwhile) or served here.
        let Some(subscriber) = subscriber else { return Ok(()) };
        let mut answered = subscriber.answered.subscribe();
        loop {
            let waited = tokio::time::timeout(RELAY_ANSWER_CHECK, answered.wait_for(Option::is_some)).await;
            match waited {
                Ok(Ok(outcome)) => return outcome.clone().unwrap_or(Ok(())),
                Ok(Err(_)) => return Ok(()),
                // This node took the queue over meanwhile: the consumer is
                // its own queue's, as `subscribe` answers then (a wait left
                // unanswered here held the connection, unread, for good).
                Err(_) if self.leader_of(&subscriber.local).as_deref() == Some(self.node.name()) => {
                    return Ok(());
                }
                Err(_) => {}
            }
        }
    }

    /// A quorum queue's ready messages and consumers as its leader counts
    /// them (what `queue.declare-ok` reports, as RabbitMQ answers from
    /// the leader); `None` if no leader answered in time or this node
    /// leads it (its own queue answers then).
    pub async fn leader_counts(&self, vhost: &str, name: &str) -> Option<(u32, u32)> {
        let local = self.local(vhost, name)?;
        let leader = self.leader_of(&local).filter(|leader| leader != self.node.name())?;
        let mut request = vec![COUNTS];
        put_str(&mut request, vhost);
        put_str(&mut request, name);
        let answer = self.call_within(&leader, &request, COUNTS_PATIENCE).await?;
        let mut reader = Reader(&answer);
        (reader.u8()? == OK).then_some(())?;
        Some((reader.u32()?, reader.u32()?))
    }

    /// Purges a queue through its stand-in here: its leader (or home node)
    /// purges it; the count it purged.
    pub async fn purge_remote(&self, vhost: &str, name: &str) -> Result<u32, AmqpError> {
        const AT: (u16, u16) = (50, 30);
        let Some(local) = self.local(vhost, name) else { return Ok(0) };
        let answer = self.ask(PURGE, &local, &[], AT).await?;
        let mut reader = Reader(&answer);
        match reader.u8() {
            Some(OK) => Ok(reader.u32().unwrap_or(0)),
            _ => Err(self.unavailable(&local, AT)),
        }
    }

    /// Purges a queue here for a stand-in elsewhere (`U`), once what it
    /// settled is stored (or committed by its group).
    async fn purge_here(&self, mut reader: Reader<'_>) -> Vec<u8> {
        let (Some(vhost), Some(name)) = (reader.str(), reader.str()) else { return vec![UNKNOWN] };
        let Some(broker) = self.broker.upgrade() else { return vec![NOT_LEADER] };
        let Some(host) = broker.vhost(vhost) else { return vec![NOT_LEADER] };
        let (count, appended) = {
            let mut session = Session::open(&host, &broker.store);
            if !session.has_queue(name) || session.is_remote(name) {
                return vec![NOT_LEADER];
            }
            let Ok(count) = session.purge_queue(0, name) else { return vec![NOT_LEADER] };
            (count, session.flush_indices())
        };
        if let Some(ticket) = appended.ok().and_then(|a| a.replicated) {
            broker.tickets.wait(ticket).await;
        }
        let mut answer = vec![OK];
        answer.extend_from_slice(&count.to_le_bytes());
        answer
    }

    /// Answers [`Self::leader_counts`] for a queue this node leads.
    fn counts(&self, mut reader: Reader<'_>) -> Vec<u8> {
        let (Some(vhost), Some(name)) = (reader.str(), reader.str()) else { return vec![UNKNOWN] };
        let Some(broker) = self.broker.upgrade() else { return vec![NOT_LEADER] };
        let Some(vhost) = broker.vhost(vhost) else { return vec![NOT_LEADER] };
        let mut session = Session::open(&vhost, &broker.store);
        if !session.has_queue(name) || session.is_remote(name) {
            return vec![NOT_LEADER];
        }
        let passive = warren_core::QueueDeclare { passive: true, ..warren_core::QueueDeclare::named(name) };
        let Ok(declared) = session.declare_queue(0, passive) else { return vec![NOT_LEADER] };
        let mut answer = vec![OK];
        answer.extend_from_slice(&declared.message_count.to_le_bytes());
        answer.extend_from_slice(&declared.consumer_count.to_le_bytes());
        answer
    }

    /// The client has its `consume-ok`: deliveries may go to it.
    pub fn relay_ready(&self, vhost: &str, key: ChannelKey, tag: &str) {
        let subscribers = self.relays.subscribers.lock();
        let found = subscribers.values().find(|s| s.vhost == vhost && s.consumer.key == key && &*s.consumer.tag == tag);
        if let Some(subscriber) = found {
            subscriber.ready.send_replace(true);
        }
    }

    /// Subscriptions whose leader changed or went down subscribe again
    /// (after taking back what the client holds unsettled).
    pub(super) fn check_subscriptions(&self, up: &std::collections::HashSet<String>) {
        let subscribers: Vec<Arc<Subscriber>> = self.relays.subscribers.lock().values().cloned().collect();
        for subscriber in subscribers {
            let (wire, leader, idle) = {
                let state = subscriber.state.lock();
                (state.wire, state.leader.clone(), !state.sending && !state.cancelled)
            };
            let current = self.leader_of(&subscriber.local);
            let moved = match &leader {
                Some(leader) => current.as_ref() != Some(leader) || !up.contains(leader),
                // Left to this node, which then did not take the queue up
                // (it lost the leadership first): subscribe elsewhere.
                None => idle && current.is_some_and(|c| c != self.node.name() && up.contains(&c)),
            };
            if wire != 0 && moved {
                self.resubscribe(&subscriber, wire);
            }
        }
    }

    /// Subscription `wire` ended: what it delivered and the client did not
    /// settle is taken back, and a new one is made.
    fn resubscribe(&self, subscriber: &Arc<Subscriber>, wire: u64) {
        let Some(broker) = self.broker.upgrade() else { return };
        let Some(vhost) = broker.vhost(&subscriber.vhost) else { return };
        let mut session = Session::open(&vhost, &broker.store);
        {
            let mut state = subscriber.state.lock();
            if state.wire != wire {
                return;
            }
            // A cancelled consumer is not subscribed again: what it still
            // holds comes again from the next leader, to other consumers.
            if state.cancelled {
                state.wire = 0;
                state.ops.clear();
                drop(state);
                session.take_back(&subscriber.local.name, Some(subscriber.consumer.id));
                drop(session);
                self.forget(subscriber);
                return;
            }
            let next = self.relays.wire();
            state.wire = next;
            state.leader = None;
            state.ops.retain(|op| !matches!(op, Op::Settle(..)));
            state.ops.push_back(Op::Subscribe(next));
        }
        session.take_back(&subscriber.local.name, Some(subscriber.consumer.id));
        drop(session);
        self.send_ops(subscriber.clone());
    }

    /// The queue's subscriptions end without a word to the leader: the
    /// queue is led from here now, or deleted.
    pub(super) fn forget_subscriptions(&self, local: &Local) {
        let mut subscribers = self.relays.subscribers.lock();
        subscribers.retain(|_, s| {
            let ours = s.local.group == local.group;
            if ours {
                s.state.lock().wire = 0;
            }
            !ours
        });
    }

    /// Deliveries of a subscription of this node's (`D`).
    async fn delivered(&self, mut reader: Reader<'_>) -> Vec<u8> {
        let (Some(wire), Some(consumer), Some(vhost)) = (reader.u64(), reader.u64(), reader.str()) else {
            return vec![UNKNOWN];
        };
        let subscriber = self.relays.subscribers.lock().get(&(vhost.to_string(), consumer)).cloned();
        let Some(subscriber) = subscriber.filter(|s| s.state.lock().wire == wire) else { return vec![UNKNOWN] };
        let mut ready = subscriber.ready.subscribe();
        if tokio::time::timeout(SUBSCRIBE_PATIENCE, ready.wait_for(|r| *r)).await.is_err() {
            return vec![UNKNOWN];
        }
        let Some(broker) = self.broker.upgrade() else { return vec![UNKNOWN] };
        let Some(vhost) = broker.vhost(vhost) else { return vec![UNKNOWN] };
        {
            let mut session = Session::open(&vhost, &broker.store);
            if subscriber.state.lock().wire != wire {
                return vec![UNKNOWN];
            }
            let mut returned = Vec::new();
            while let (Some(upstream), Some(redelivered), Some(len)) = (reader.u64(), reader.u8(), reader.u32()) {
                let Some(message) = reader.bytes(len as usize).and_then(replica::decode_message) else {
                    return vec![UNKNOWN];
                };
                if !returned.is_empty()
                    || !session.deliver_relayed(&subscriber.consumer, upstream, redelivered == 1, Arc::new(message))
                {
                    returned.push(upstream);
                }
            }
            if !returned.is_empty() {
                // Sent before the leader heard of the cancel: back to it.
                let mut state = subscriber.state.lock();
                if !state.cancelled {
                    return vec![UNKNOWN];
                }
                for upstream in returned {
                    state.ops.push_back(Op::Settle(wire, upstream, Outcome::Requeue));
                }
                drop(state);
                drop(session);
                self.send_ops(subscriber);
                return vec![OK];
            }
        }
        // The client reads slower than the leader delivers: the leader
        // waits for this answer.
        while Session::open(&vhost, &broker.store).relayed_congested(&subscriber.consumer) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        vec![OK]
    }

    // ---- the leader's side ----

    /// A stand-in's consumer to serve from this node's queue (`C`).
    fn serve(&self, from: &str, mut reader: Reader<'_>) -> Vec<u8> {
        let parsed = (|| {
            let (wire, consumer, vhost, queue, tag) =
                (reader.u64()?, reader.u64()?, reader.str()?, reader.str()?, reader.str()?);
            let (no_ack, exclusive) = (reader.u8()? == 1, reader.u8()? == 1);
            let priority = i64::from_le_bytes(reader.bytes(8)?.try_into().ok()?);
            let prefetch = reader.u16()?;
            Some((wire, consumer, vhost, queue, tag, no_ack, exclusive, priority, prefetch))
        })();
        let Some((wire, consumer, vhost_name, queue, tag, no_ack, exclusive, priority, prefetch)) = parsed else {
            return vec![UNKNOWN];
        };
        let Some(broker) = self.broker.upgrade() else { return vec![NOT_LEADER] };
        let Some(vhost) = broker.vhost(vhost_name) else { return vec![NOT_LEADER] };
        let id = (from.to_string(), vhost_name.to_string(), consumer);
        let mut session = Session::open(&vhost, &broker.store);
        if !session.has_queue(queue) || session.is_remote(queue) {
            return vec![NOT_LEADER];
        }
        // A stand-in subscribes again (its last answer was lost): the
        // older subscription's deliveries come back first.
        if let Some(old) = self.relays.served.lock().remove(&id) {
            old.outbox.closed.store(true, Ordering::Release);
            old.outbox.notify.notify_one();
            session.close_channel(old.key);
        }
        let connection = (1 << 62) | self.relays.next_connection.fetch_add(1, Ordering::Relaxed);
        let key = ChannelKey { connection, channel: 1 };
        let outbox = Arc::new(RelayOutbox {
            buf: Mutex::new(Vec::new()),
            notify: Notify::new(),
            congested: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            failed: Mutex::new(None),
            closed: AtomicBool::new(false),
        });
        session.open_channel(key, outbox.clone());
        session.qos(key, 0, prefetch, false);
        let mut arguments = FieldTable::default();
        if priority != 0 {
            arguments.insert("x-priority".into(), AMQPValue::LongLongInt(priority));
        }
        let consume = Consume { queue, consumer_tag: tag, no_ack, exclusive, arguments };
        let tag = match session.consume(key, consume) {
            Ok(tag) => tag,
            Err(error) => {
                session.close_channel(key);
                return refused(&error);
            }
        };
        let served = Arc::new(Served {
            node: from.to_string(),
            vhost: vhost_name.to_string(),
            consumer,
            wire,
            key,
            tag: tag.into(),
            queue: queue.to_string(),
            outbox,
            cancelled: AtomicBool::new(false),
        });
        self.relays.served.lock().insert(id, served.clone());
        drop(session);
        if let Some(this) = self.me.upgrade() {
            tokio::spawn(async move { this.deliver_served(&served).await });
        }
        vec![OK]
    }

    fn find_served(&self, from: &str, reader: &mut Reader<'_>) -> Option<Arc<Served>> {
        let (wire, consumer, vhost) = (reader.u64()?, reader.u64()?, reader.str()?);
        let served = self.relays.served.lock().get(&(from.to_string(), vhost.to_string(), consumer)).cloned()?;
        (served.wire == wire).then_some(served)
    }

    /// A served consumer's client settled deliveries (`S`).
    fn settle_served(&self, from: &str, mut reader: Reader<'_>) -> Vec<u8> {
        let Some(served) = self.find_served(from, &mut reader) else { return vec![UNKNOWN] };
        let Some(count) = reader.u32() else { return vec![UNKNOWN] };
        let Some(broker) = self.broker.upgrade() else { return vec![UNKNOWN] };
        let Some(vhost) = broker.vhost(&served.vhost) else { return vec![UNKNOWN] };
        let mut session = Session::open(&vhost, &broker.store);
        for _ in 0..count {
            let (Some(tag), Some(outcome)) = (reader.u64(), reader.u8()) else { break };
            // A tag the leader took back (consumer timeout) is no error.
            let _ = match outcome {
                0 => session.ack(served.key, tag, false),
                1 => session.nack(served.key, tag, false, true),
                _ => session.nack(served.key, tag, false, false),
            };
        }
        if served.cancelled.load(Ordering::Acquire) && session.channel_unacked(served.key) == 0 {
            self.close_served(&served, &mut session);
            return vec![CLOSED];
        }
        vec![OK]
    }

    /// A served consumer was cancelled (`X`); its channel goes once every
    /// delivery is settled.
    fn cancel_served(&self, from: &str, mut reader: Reader<'_>) -> Vec<u8> {
        let Some(served) = self.find_served(from, &mut reader) else { return vec![UNKNOWN] };
        let Some(broker) = self.broker.upgrade() else { return vec![UNKNOWN] };
        let Some(vhost) = broker.vhost(&served.vhost) else { return vec![UNKNOWN] };
        let mut session = Session::open(&vhost, &broker.store);
        served.cancelled.store(true, Ordering::Release);
        session.cancel(served.key, &served.tag);
        if session.channel_unacked(served.key) == 0 {
            self.close_served(&served, &mut session);
            return vec![CLOSED];
        }
        vec![OK]
    }

    /// Stops serving: its unsettled deliveries return to the queue.
    fn close_served(&self, served: &Arc<Served>, session: &mut Session<'_>) {
        let id = (served.node.clone(), served.vhost.clone(), served.consumer);
        let mut all = self.relays.served.lock();
        if all.get(&id).is_some_and(|s| Arc::ptr_eq(s, served)) {
            all.remove(&id);
        }
        drop(all);
        served.outbox.closed.store(true, Ordering::Release);
        served.outbox.notify.notify_one();
        session.close_channel(served.key);
    }

    fn close_served_now(&self, served: &Arc<Served>) {
        let Some(broker) = self.broker.upgrade() else { return };
        let Some(vhost) = broker.vhost(&served.vhost) else { return };
        let mut session = Session::open(&vhost, &broker.store);
        self.close_served(served, &mut session);
    }

    /// Sends a served consumer's deliveries to its node, a batch per
    /// request, until it is closed.
    async fn deliver_served(&self, served: &Arc<Served>) {
        let outbox = &served.outbox;
        loop {
            if outbox.closed.load(Ordering::Acquire) {
                return;
            }
            let batch = std::mem::take(&mut *outbox.buf.lock());
            if !batch.is_empty() {
                let mut request = header(DELIVER, served.wire, served.consumer, &served.vhost);
                request.extend_from_slice(&batch);
                drop(batch);
                if self.call(&served.node, &request).await.as_deref() != Some(&[OK]) {
                    self.close_served_now(served);
                    return;
                }
                continue;
            }
            if outbox.congested.swap(false, Ordering::AcqRel) {
                if let Some(broker) = self.broker.upgrade() {
                    if let Some(vhost) = broker.vhost(&served.vhost) {
                        Session::open(&vhost, &broker.store).resume_connection(served.key.connection);
                    }
                }
            }
            let failed = outbox.failed.lock().take();
            if let Some(text) = failed {
                let mut request = header(FAILED, served.wire, served.consumer, &served.vhost);
                put_str(&mut request, &text);
                let _ = self.call(&served.node, &request).await;
            }
            if outbox.gone.load(Ordering::Acquire) {
                self.tell_gone(served).await;
                self.close_served_now(served);
                return;
            }
            outbox.notify.notified().await;
        }
    }

    async fn tell_gone(&self, served: &Served) {
        let request = header(GONE, served.wire, served.consumer, &served.vhost);
        let _ = self.call(&served.node, &request).await;
    }

    /// The queue is no longer led from here: the consumers served for other
    /// nodes are dropped (those nodes subscribe at the next leader).
    pub(super) fn stop_serving(&self, vhost: &str, queue: &str) -> Vec<ChannelKey> {
        let mut all = self.relays.served.lock();
        let mut keys = Vec::new();
        all.retain(|_, served| {
            let ours = served.vhost == vhost && served.queue == queue;
            if ours {
                keys.push(served.key);
                served.outbox.gone.store(true, Ordering::Release);
                served.outbox.notify.notify_one();
            }
            !ours
        });
        keys
    }

    /// Whether `name` is a classic queue of another node (`basic.get`
    /// through its stand-in goes to that node).
    pub fn is_classic(&self, vhost: &str, name: &str) -> bool {
        self.local(vhost, name).is_some_and(|l| l.home.as_ref().is_some_and(|(home, _)| home != self.node.name()))
    }

    /// Request `kind` (the virtual host, the queue, then `more`) to the node
    /// queue `local` runs on (a classic queue's home, a quorum queue's
    /// leader): its answer, or why none came, for the method `at`.
    async fn ask(&self, kind: u8, local: &Local, more: &[u8], at: (u16, u16)) -> Result<Vec<u8>, AmqpError> {
        let unavailable = || self.unavailable(local, at);
        let Some(node) = self.leader_of(local).filter(|node| self.is_up(node)) else {
            return Err(unavailable());
        };
        let mut request = vec![kind];
        put_str(&mut request, &local.vhost);
        put_str(&mut request, &local.name);
        request.extend_from_slice(more);
        self.call(&node, &request).await.ok_or_else(unavailable)
    }

    /// RabbitMQ's refusal for a classic queue whose home node is down; a
    /// quorum queue with no leader is locked.
    fn unavailable(&self, local: &Local, (class, method): (u16, u16)) -> AmqpError {
        match &local.home {
            Some((home, classic)) => {
                super::classic::home_down(home, &local.name, &local.vhost, *classic, class, method)
            }
            None => AmqpError::soft(
                ReplyCode::ResourceLocked,
                format!("quorum queue '{}' in vhost '{}' has no leader now", local.name, local.vhost),
                class,
                method,
            ),
        }
    }

    /// `basic.get` through the stand-in of classic queue `name`: its home
    /// node takes the message and holds it unacknowledged (unless
    /// `no_ack`) until this node settles it.
    pub async fn relayed_get(&self, vhost: &str, name: &str, no_ack: bool) -> Result<Option<RelayedGot>, AmqpError> {
        const AT: (u16, u16) = (60, 70);
        let Some(local) = self.local(vhost, name) else {
            return Err(AmqpError::soft(
                ReplyCode::NotFound,
                format!("no queue '{name}' in vhost '{vhost}'"),
                AT.0,
                AT.1,
            ));
        };
        let answer = self.ask(GET, &local, &[u8::from(no_ack)], AT).await?;
        let mut reader = Reader(&answer);
        match reader.u8() {
            Some(OK) => {
                let parsed = (|| {
                    let (upstream, redelivered, message_count) = (reader.u64()?, reader.u8()? == 1, reader.u32()?);
                    let message = replica::decode_message(reader.0)?;
                    Some(RelayedGot { upstream, redelivered, message_count, message })
                })();
                parsed.map(Some).ok_or_else(|| self.unavailable(&local, AT))
            }
            Some(EMPTY) => Ok(None),
            Some(REFUSED) => Err(refusal(&mut reader, AT)),
            _ => Err(self.unavailable(&local, AT)),
        }
    }

    /// Deletes classic queue `name` on its home node, through its stand-in
    /// here; answered once the placement is gone here too (the stand-in
    /// with it). The count of messages deleted, or the home node's refusal.
    pub async fn delete_remote(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, AmqpError> {
        const AT: (u16, u16) = (50, 40);
        let Some(local) = self.local(vhost, name) else { return Ok(0) };
        let answer = self.ask(DELETE, &local, &[u8::from(if_unused), u8::from(if_empty)], AT).await?;
        let mut reader = Reader(&answer);
        match reader.u8() {
            Some(OK) => {
                let count = reader.u32().unwrap_or(0);
                let give_up = tokio::time::Instant::now() + UNPLACED_PATIENCE;
                while self.shares_queue(vhost, name) && tokio::time::Instant::now() < give_up {
                    tokio::time::sleep(RETRY_EVERY).await;
                }
                Ok(count)
            }
            Some(REFUSED) => Err(refusal(&mut reader, AT)),
            // Gone from its home already.
            Some(NOT_LEADER) => Ok(0),
            _ => Err(self.unavailable(&local, AT)),
        }
    }

    /// Deletes a classic queue here for another node's stand-in (`Q`),
    /// answered once its placement is removed.
    async fn delete_here(&self, mut reader: Reader<'_>) -> Vec<u8> {
        let parsed = (reader.str(), reader.str(), reader.u8(), reader.u8());
        let (Some(vhost_name), Some(name), Some(if_unused), Some(if_empty)) = parsed else { return vec![UNKNOWN] };
        let Some(broker) = self.broker.upgrade() else { return vec![NOT_LEADER] };
        let Some(vhost) = broker.vhost(vhost_name) else { return vec![NOT_LEADER] };
        let deleted = {
            let mut session = Session::open(&vhost, &broker.store);
            if session.shareable(name).is_none() {
                return vec![NOT_LEADER];
            }
            session.delete_queue(0, name, if_unused == 1, if_empty == 1)
        };
        match deleted {
            Ok(count) => {
                if let Some(ticket) = self.unplace_classic(vhost_name, name) {
                    broker.tickets.wait(ticket).await;
                }
                let mut answer = vec![OK];
                answer.extend_from_slice(&count.to_le_bytes());
                answer
            }
            Err(error) => refused(&error),
        }
    }

    /// Tells the home node of classic queue `name` how the client settled
    /// what a `basic.get` through the stand-in here took (its tag there:
    /// `upstream`). Lost with a home node that went: it has the message
    /// back then (or lost it with a transient queue).
    pub fn settle_got(&self, vhost: &str, name: &str, upstream: u64, outcome: Outcome) {
        let Some(home) = self.local(vhost, name).and_then(|l| l.home.as_ref().map(|(home, _)| home.clone())) else {
            return;
        };
        let mut request = vec![SETTLE_GOT];
        put_str(&mut request, vhost);
        request.extend_from_slice(&upstream.to_le_bytes());
        request.push(outcome_byte(outcome));
        let Some(this) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            let _ = this.call(&home, &request).await;
        });
    }

    /// The channel that holds `basic.get`s for node `from` here.
    fn getter(&self, from: &str, vhost: &str, session: &mut Session<'_>) -> ChannelKey {
        let mut getters = self.relays.getters.lock();
        *getters.entry((from.to_string(), vhost.to_string())).or_insert_with(|| {
            let connection = (1 << 62) | self.relays.next_connection.fetch_add(1, Ordering::Relaxed);
            let key = ChannelKey { connection, channel: 1 };
            session.open_channel(key, Arc::new(NoDeliveries));
            key
        })
    }

    /// A `basic.get` through another node's stand-in (`T`).
    fn get_here(&self, from: &str, mut reader: Reader<'_>) -> Vec<u8> {
        let (Some(vhost_name), Some(name), Some(no_ack)) = (reader.str(), reader.str(), reader.u8()) else {
            return vec![UNKNOWN];
        };
        let Some(broker) = self.broker.upgrade() else { return vec![NOT_LEADER] };
        let Some(vhost) = broker.vhost(vhost_name) else { return vec![NOT_LEADER] };
        let mut session = Session::open(&vhost, &broker.store);
        if !session.has_queue(name) || session.is_remote(name) {
            return vec![NOT_LEADER];
        }
        let key = self.getter(from, vhost_name, &mut session);
        match session.get(key, name, no_ack == 1) {
            Ok(Some(got)) => {
                let mut answer = vec![OK];
                answer.extend_from_slice(&got.delivery_tag.to_le_bytes());
                answer.push(u8::from(got.redelivered));
                answer.extend_from_slice(&got.message_count.to_le_bytes());
                replica::encode_message(&mut answer, &got.message);
                answer
            }
            Ok(None) => vec![EMPTY],
            Err(error) => refused(&error),
        }
    }

    /// Another node's client settled what its `basic.get` took here (`K`).
    fn settle_got_here(&self, from: &str, mut reader: Reader<'_>) -> Vec<u8> {
        let (Some(vhost_name), Some(tag), Some(outcome)) = (reader.str(), reader.u64(), reader.u8()) else {
            return vec![UNKNOWN];
        };
        let Some(key) = self.relays.getters.lock().get(&(from.to_string(), vhost_name.to_string())).copied() else {
            return vec![UNKNOWN];
        };
        let Some(broker) = self.broker.upgrade() else { return vec![UNKNOWN] };
        let Some(vhost) = broker.vhost(vhost_name) else { return vec![UNKNOWN] };
        let mut session = Session::open(&vhost, &broker.store);
        // A tag taken back meanwhile (its node went and came back) is no error.
        let _ = match outcome {
            0 => session.ack(key, tag, false),
            1 => session.nack(key, tag, false, true),
            _ => session.nack(key, tag, false, false),
        };
        vec![OK]
    }

    /// Consumers served for a node that went down are dropped.
    pub(super) fn check_served(&self, up: &std::collections::HashSet<String>) {
        let gone: Vec<((String, String), ChannelKey)> = {
            let mut getters = self.relays.getters.lock();
            let gone =
                getters.iter().filter(|((node, _), _)| !up.contains(node)).map(|(k, v)| (k.clone(), *v)).collect();
            getters.retain(|(node, _), _| up.contains(node));
            gone
        };
        // What their gets held goes back to its queues.
        if let Some(broker) = self.broker.upgrade() {
            for ((_, vhost), key) in gone {
                if let Some(vhost) = broker.vhost(&vhost) {
                    Session::open(&vhost, &broker.store).close_channel(key);
                }
            }
        }
        let gone: Vec<Arc<Served>> =
            self.relays.served.lock().values().filter(|s| !up.contains(&s.node)).cloned().collect();
        for served in gone {
            warn!(node = %served.node, queue = %served.queue, "a consumer's node went down: its deliveries are taken back");
            self.close_served_now(&served);
        }
    }

    /// This node's answers to relay requests.
    pub(super) async fn relay_request(&self, from: &str, request: &[u8]) -> Vec<u8> {
        let Some((&kind, rest)) = request.split_first() else { return vec![UNKNOWN] };
        let reader = Reader(rest);
        match kind {
            SUBSCRIBE => self.serve(from, reader),
            SETTLE => self.settle_served(from, reader),
            CANCEL => self.cancel_served(from, reader),
            DELIVER => self.delivered(reader).await,
            GONE | FAILED => self.ended(kind, reader),
            COUNTS => self.counts(reader),
            PUBLISH => self.accept_forwarded(reader).await,
            PURGE => self.purge_here(reader).await,
            GET => self.get_here(from, reader),
            DELETE => self.delete_here(reader).await,
            SETTLE_GOT => self.settle_got_here(from, reader),
            _ => vec![UNKNOWN],
        }
    }

    /// The leader stopped serving a subscription of this node's (`G`), or
    /// closed its channel (`F`).
    fn ended(&self, kind: u8, mut reader: Reader<'_>) -> Vec<u8> {
        let (Some(wire), Some(consumer), Some(vhost)) = (reader.u64(), reader.u64(), reader.str()) else {
            return vec![UNKNOWN];
        };
        let subscriber = self.relays.subscribers.lock().get(&(vhost.to_string(), consumer)).cloned();
        let Some(subscriber) = subscriber else { return vec![UNKNOWN] };
        if kind == GONE {
            self.resubscribe(&subscriber, wire);
        } else if let (Some(text), Some(broker)) = (reader.str(), self.broker.upgrade()) {
            if let Some(vhost) = broker.vhost(vhost) {
                Session::open(&vhost, &broker.store).fail_relayed(&subscriber.consumer, text);
            }
        }
        vec![OK]
    }
}

/// Answers relay requests for the node's [`Replication`].
pub struct RelayHandler(pub(super) std::sync::Weak<Replication>);

impl warren_cluster::Handler for RelayHandler {
    fn handle(
        &self,
        from: &str,
        request: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send>> {
        let this = self.0.clone();
        let from = from.to_string();
        Box::pin(async move {
            match this.upgrade() {
                Some(replication) => replication.relay_request(&from, &request).await,
                None => vec![NOT_LEADER],
            }
        })
    }
}
