//! One AMQP connection: handshake (start, tune, open), then the frame loop
//! that assembles content, applies methods to the virtual host, and answers.
//!
//! Invariants:
//! - every frame a batch of reads yielded is applied under one virtual-host
//!   lock, and dispatch runs before the lock is released;
//! - publisher confirms for a batch go out after every `basic.return` of that
//!   batch, coalesced into one `basic.ack multiple=true` per channel;
//! - a soft error closes only its channel (its unacked messages are requeued
//!   at once); a hard error sends `connection.close` and the connection then
//!   only waits for `close-ok`.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::{debug, info, warn};
use warren_codec::frame::{Frame, FrameDecoder, FrameKind, FRAME_MIN_SIZE};
use warren_codec::method::{self, BasicPublish, Method};
use warren_codec::properties::{flag, Properties};
use warren_codec::reply::{AmqpError, ReplyCode};
use warren_codec::spec::{self, basic, channel, confirm, connection, exchange, queue, tx, AMQPClass};
use warren_codec::types::{AMQPValue, FieldTable, LongString, ShortString};
use warren_codec::{encode, table, PROTOCOL_HEADER};
use warren_core::message::MessageBuilder;
use warren_core::vhost::REPLY_TO_QUEUE;
use warren_core::{ChannelKey, Consume, ExchangeDeclare, Message, QueueDeclare, VirtualHost, VirtualHostState};
use warren_storage::StorageError;

use crate::access::{Permission, Permissions, Resource, User};
use crate::alarm::AlarmState;
use crate::auth::{self, AuthError};
use crate::broker::Broker;
use crate::outbox::ConnectionOutbox;
use crate::session::Session;
use crate::store::{Appended, Store};

const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long, at most, a connection whose `connection.close` was answered
/// waits for the client to close the socket (RabbitMQ's 30 s, or the
/// heartbeat interval when shorter).
const CLOSED_LINGER_MAX: Duration = Duration::from_secs(30);
/// Log index standing for "the store refused this publish: nack it".
const NACK: u64 = u64::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    StartOk,
    TuneOk,
    Open,
    Running,
    /// We sent `connection.close` and wait for `close-ok`.
    Closing,
    /// Nothing more to read: flush and drop the socket.
    Done,
}

/// A reply waiting for the log entry of the change it reports.
struct DeferredReply {
    index: u64,
    channel: u16,
    reply: AMQPClass,
}

struct Content {
    /// Validated UTF-8; a slice of the method frame, not a copy.
    exchange: Bytes,
    routing_key: Bytes,
    mandatory: bool,
    builder: Option<MessageBuilder>,
}

enum TxOp {
    Publish { exchange: Bytes, message: Message, mandatory: bool, extra_keys: Vec<Vec<u8>> },
    Ack { delivery_tag: u64, multiple: bool },
    Nack { delivery_tag: u64, multiple: bool, requeue: bool },
}

#[derive(Default)]
struct ChannelProto {
    closing: bool,
    content: Option<Content>,
    confirm: bool,
    published: u64,
    confirmed: u64,
    /// Publishes whose confirm waits for the store: (publish seq, log index),
    /// in seq order; `NACK` marks one the store refused.
    awaiting_store: VecDeque<(u64, u64)>,
    tx: Option<Vec<TxOp>>,
    last_queue: String,
}

struct Connection {
    id: u64,
    broker: Arc<Broker>,
    peer: SocketAddr,
    outbox: Arc<ConnectionOutbox>,
    decoder: FrameDecoder,
    phase: Phase,
    vhost: Option<Arc<VirtualHost>>,
    channel_max: u16,
    heartbeat_s: u16,
    channels: HashMap<u16, ChannelProto>,
    auth_failure_close: bool,
    user: String,
    /// The logged-in user (after start-ok).
    account: Option<Arc<User>>,
    /// A password waiting for the KDF: (user, password, mechanism).
    pending_login: Option<(Arc<User>, String, String)>,
    /// The reply to a method that changed durable definitions, sent once
    /// its log entry is durable; no further frame is read meanwhile.
    deferred_reply: Option<DeferredReply>,
    /// Permissions in the open virtual host, and the access generation
    /// they were read at.
    permissions: Option<Arc<Permissions>>,
    permissions_generation: u64,
    /// Counted in the broker's registry (after connection.open).
    registered: bool,
    vhost_name: String,
    /// The verified client certificate's common name (TLS), for EXTERNAL.
    certificate: Option<String>,
    /// Has published: resource alarms block it.
    publisher: bool,
    /// The client understands `connection.blocked`.
    blocked_capability: bool,
    /// Reading is suspended by a resource alarm.
    blocked: bool,
    /// Bytes read since an alarm asked to block this connection while a
    /// message was half received (see `apply_alarm`).
    block_deferred_bytes: usize,
    /// A framing error was seen: input is discarded from then on.
    unparseable: bool,
    /// We answered the client's `connection.close`: the client closes the
    /// socket, and what it still sends meanwhile is read and discarded.
    answered_close: bool,
    store: Arc<Store>,
}

/// Frame overhead allowed on top of the largest message while a block waits
/// for a half-received message to complete.
const BLOCK_GRACE_SLACK: usize = 64 * 1024;

/// The store refused a change (poisoned after a failed write or fsync).
fn not_stored() -> AmqpError {
    AmqpError::hard(ReplyCode::InternalError, "the change could not be stored (see the broker log)", 0, 0)
}

/// Waits until the log is durable up to `index`, or the store is poisoned.
async fn wait_durable(durable: &mut watch::Receiver<u64>, store: &Store, index: u64) -> Result<(), StorageError> {
    loop {
        if store.is_poisoned() {
            return Err(StorageError::Poisoned);
        }
        match tokio::time::timeout(Duration::from_millis(100), durable.wait_for(|&d| d >= index)).await {
            Ok(Ok(_)) => return Ok(()),
            // The store is gone (shutting down).
            Ok(Err(_)) => return Err(StorageError::Poisoned),
            Err(_) => {}
        }
    }
}

fn access_refused(text: String) -> AmqpError {
    AmqpError::soft(ReplyCode::AccessRefused, text, 0, 0)
}

fn short(value: &str) -> ShortString {
    ShortString::from(value)
}

fn server_properties() -> FieldTable {
    let mut capabilities = FieldTable::default();
    for name in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        capabilities.insert(short(name), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert(short("capabilities"), AMQPValue::FieldTable(capabilities));
    props.insert(short("cluster_name"), AMQPValue::LongString(LongString::from("warren")));
    props.insert(short("copyright"), AMQPValue::LongString(LongString::from("Warren contributors")));
    props.insert(short("information"), AMQPValue::LongString(LongString::from("Warren: an AMQP 0-9-1 message broker")));
    props.insert(short("platform"), AMQPValue::LongString(LongString::from("Rust")));
    props.insert(short("product"), AMQPValue::LongString(LongString::from("Warren")));
    props.insert(short("version"), AMQPValue::LongString(LongString::from(env!("CARGO_PKG_VERSION"))));
    props
}

fn client_capability(client_properties: &FieldTable, name: &str) -> bool {
    match table::get(client_properties, "capabilities") {
        Some(AMQPValue::FieldTable(caps)) => {
            matches!(table::get(caps, name), Some(AMQPValue::Boolean(true)))
        }
        _ => false,
    }
}

fn str_of(bytes: &[u8]) -> Result<&str, AmqpError> {
    std::str::from_utf8(bytes)
        .map_err(|_| AmqpError::hard(ReplyCode::SyntaxError, "short string is not valid UTF-8", 0, 0))
}

/// CC and BCC header routing keys (sender-selected distribution); BCC is
/// removed from the message the queues receive.
fn sender_selected(message: Message) -> (Message, Vec<Vec<u8>>) {
    let properties = message.properties_view();
    let selected = properties.sender_selected();
    if selected.is_empty() {
        return (message, Vec::new());
    }
    let rewritten = properties.without_header("BCC");
    let mut keys = selected.cc;
    keys.extend(selected.bcc);
    match rewritten {
        Some(rewritten) => (message.with_properties(&rewritten), keys),
        None => (message, keys),
    }
}

/// Serves one plain TCP connection.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
    handshake: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    serve_stream(reader, writer, peer, None, broker, shutdown, handshake).await;
}

/// Serves one connection after its TLS handshake; `certificate` is the
/// verified client certificate's common name (for EXTERNAL).
pub async fn serve_tls(
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    certificate: Option<String>,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
    handshake: OwnedSemaphorePermit,
) {
    let (reader, writer) = tokio::io::split(stream);
    serve_stream(reader, writer, peer, certificate, broker, shutdown, handshake).await;
}

async fn serve_stream<R, W>(
    mut reader: R,
    mut writer: W,
    peer: SocketAddr,
    certificate: Option<String>,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
    handshake: OwnedSemaphorePermit,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let handshake_timeout = Duration::from_secs(broker.config.handshake_timeout_s.max(1));
    // Held until connection.open is answered (`max_pending_handshakes`).
    let mut handshake = Some(handshake);

    let mut header = [0u8; 8];
    match tokio::time::timeout(handshake_timeout, reader.read_exact(&mut header)).await {
        Ok(Ok(_)) if header == PROTOCOL_HEADER => {}
        Ok(Ok(_)) => {
            debug!(%peer, "bad protocol header");
            let _ = writer.write_all(&PROTOCOL_HEADER).await;
            let _ = writer.shutdown().await;
            return;
        }
        _ => return,
    }

    let id = broker.next_connection_id();
    let outbox = Arc::new(ConnectionOutbox::new(id, FRAME_MIN_SIZE, broker.config.connection_write_buffer_max));
    let mut conn = Connection {
        id,
        broker: broker.clone(),
        peer,
        outbox: outbox.clone(),
        decoder: FrameDecoder::new(FRAME_MIN_SIZE),
        phase: Phase::StartOk,
        vhost: None,
        channel_max: broker.config.channel_max,
        heartbeat_s: 0,
        channels: HashMap::new(),
        auth_failure_close: false,
        user: String::new(),
        account: None,
        pending_login: None,
        deferred_reply: None,
        permissions: None,
        permissions_generation: 0,
        registered: false,
        vhost_name: String::new(),
        certificate,
        publisher: false,
        blocked_capability: false,
        blocked: false,
        block_deferred_bytes: 0,
        unparseable: false,
        answered_close: false,
        store: broker.store.clone(),
    };
    let mut durable = broker.store.durable_watch();
    let mut alarms = broker.alarms.subscribe();
    conn.send(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: LongString::from(if conn.certificate.is_some() {
                auth::MECHANISMS_WITH_CERTIFICATE
            } else {
                auth::MECHANISMS
            }),
            locales: LongString::from("en_US"),
        })),
    );

    let (heartbeat_tx, heartbeat_rx) = watch::channel(0u16);
    let writer_task = tokio::spawn(write_loop(writer, outbox.clone(), heartbeat_rx));

    let mut buf = BytesMut::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + handshake_timeout;
    let mut close_deadline: Option<tokio::time::Instant> = None;
    loop {
        if conn.phase == Phase::Done {
            break;
        }
        let read_timeout = match (conn.phase, close_deadline) {
            (Phase::Closing, Some(at)) => at,
            (Phase::Running, _) if conn.heartbeat_s > 0 => {
                tokio::time::Instant::now() + Duration::from_secs(u64::from(conn.heartbeat_s) * 2)
            }
            (Phase::Running, _) => tokio::time::Instant::now() + Duration::from_secs(86_400 * 365),
            _ => deadline,
        };
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        tokio::select! {
            // A blocked connection is still read while it closes, for its close-ok.
            read = tokio::time::timeout_at(read_timeout, reader.read_buf(&mut buf)), if !conn.blocked || conn.phase == Phase::Closing => {
                match read {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => {
                        if conn.publisher && !conn.blocked && alarms.borrow().any() {
                            conn.block_deferred_bytes = conn.block_deferred_bytes.saturating_add(n);
                        }
                    }
                    Err(_) => {
                        match conn.phase {
                            Phase::Running => warn!(peer = %conn.peer, heartbeat_s = conn.heartbeat_s, "missed heartbeats from client, closing"),
                            Phase::Closing => {}
                            _ => warn!(peer = %conn.peer, "handshake timed out"),
                        }
                        break;
                    }
                }
            }
            _ = alarms.changed() => {
                conn.apply_alarm(*alarms.borrow_and_update());
                continue;
            }
            _ = durable.changed(), if conn.awaiting_store() => {
                conn.flush_confirms();
                continue;
            }
            _ = outbox.failed_notify.notified() => {
                if let Some((code, text)) = outbox.take_forced() {
                    if conn.phase == Phase::Running {
                        conn.close_connection(AmqpError::hard(code, text, 0, 0));
                        close_deadline = Some(tokio::time::Instant::now() + CLOSE_OK_TIMEOUT);
                    }
                }
                conn.fail_channels();
                continue;
            }
            _ = shutdown.changed() => {
                if conn.phase == Phase::Running {
                    conn.close_connection(AmqpError::hard(ReplyCode::ConnectionForced, "broker forced connection closure with reason 'shutdown'", 0, 0));
                    close_deadline = Some(tokio::time::Instant::now() + CLOSE_OK_TIMEOUT);
                } else {
                    break;
                }
                continue;
            }
        }
        let before = conn.phase;
        conn.process(&mut buf);
        // What made processing stop before the end of the input.
        loop {
            if let Some((user, password, mechanism)) = conn.pending_login.take() {
                let ok = broker.verify_password(user.clone(), password).await;
                conn.finish_login(ok, user, &mechanism);
            } else if let Some(deferred) = conn.deferred_reply.take() {
                let stored = wait_durable(&mut durable, &conn.store, deferred.index).await;
                conn.send_deferred(deferred, stored);
            } else {
                break;
            }
            conn.process(&mut buf);
        }
        if conn.publisher && !conn.blocked {
            conn.apply_alarm(*alarms.borrow());
        }
        if before != Phase::Running && conn.phase == Phase::Running {
            handshake.take();
            let _ = heartbeat_tx.send(conn.heartbeat_s);
        }
        if conn.phase == Phase::Closing && close_deadline.is_none() {
            close_deadline = Some(tokio::time::Instant::now() + CLOSE_OK_TIMEOUT);
        }
    }

    if let Some(vhost) = conn.vhost.clone() {
        Session::open(&vhost, &conn.store).close_connection(conn.id);
    }
    if conn.registered {
        broker.unregister(conn.id, conn.channels.len() as u64);
    }
    // Stop the writer after it has flushed what is queued.
    let _ = heartbeat_tx.send(u16::MAX);
    outbox.notify.notify_one();
    let writer = writer_task.await.ok().flatten();
    if conn.answered_close {
        // The client may still be writing frames it queued before its close
        // (they cross our close-ok). Closing the socket now would reset it
        // mid-write and lose the close-ok; as RabbitMQ, let the client close.
        let linger = match conn.heartbeat_s {
            0 => CLOSED_LINGER_MAX,
            seconds => CLOSED_LINGER_MAX.min(Duration::from_secs(u64::from(seconds))),
        };
        discard_until_closed(&mut reader, linger, &mut shutdown).await;
    }
    if let Some(mut writer) = writer {
        let _ = writer.shutdown().await;
    }
    debug!(peer = %conn.peer, user = %conn.user, "connection closed");
}

/// Reads and drops input until the peer closes, `linger` passes or the
/// broker shuts down.
async fn discard_until_closed<R: AsyncRead + Unpin>(
    reader: &mut R,
    linger: Duration,
    shutdown: &mut watch::Receiver<bool>,
) {
    let deadline = tokio::time::Instant::now() + linger;
    let mut scratch = vec![0u8; 8192];
    loop {
        tokio::select! {
            read = tokio::time::timeout_at(deadline, reader.read(&mut scratch)) => match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Writes the outbox to the socket, with heartbeats, until told to stop
/// (`u16::MAX` on the heartbeat watch); then flushes what is queued and
/// hands the writer back unclosed, or `None` if the socket failed.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    outbox: Arc<ConnectionOutbox>,
    mut heartbeat: watch::Receiver<u16>,
) -> Option<W> {
    let mut spare = BytesMut::with_capacity(512);
    loop {
        let interval = *heartbeat.borrow();
        if interval == u16::MAX {
            outbox.take(&mut spare);
            if !spare.is_empty() && writer.write_all(&spare).await.is_err() {
                return None;
            }
            let _ = writer.flush().await;
            return Some(writer);
        }
        let wait =
            if interval == 0 { Duration::from_secs(86_400 * 365) } else { Duration::from_secs(u64::from(interval)) };
        tokio::select! {
            _ = outbox.notify.notified() => {}
            _ = heartbeat.changed() => continue,
            _ = tokio::time::sleep(wait) => {
                outbox.write(encode::heartbeat);
                continue;
            }
        }
        outbox.take(&mut spare);
        if spare.is_empty() {
            continue;
        }
        if writer.write_all(&spare).await.is_err() {
            return None;
        }
        spare.clear();
        // Do not keep a huge buffer around after a burst.
        if spare.capacity() > 1 << 20 {
            spare = BytesMut::with_capacity(512);
        }
        outbox.drained();
    }
}

impl Connection {
    fn send(&self, channel: u16, class: AMQPClass) {
        self.outbox.write(|buf| encode::method(buf, channel, &class));
    }

    fn key(&self, channel: u16) -> ChannelKey {
        ChannelKey { connection: self.id, channel }
    }

    /// Decodes and applies every complete frame in `buf`.
    fn process(&mut self, buf: &mut BytesMut) {
        if self.unparseable {
            buf.clear();
            return;
        }
        'batch: loop {
            let (vhost, store) = (self.vhost.clone(), self.store.clone());
            // Dispatch and the journal's write happen when it is dropped.
            let mut guard = vhost.as_ref().map(|v| Session::open(v, &store));
            loop {
                if matches!(self.phase, Phase::Done) {
                    break;
                }
                let frame = match self.decoder.decode(buf) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(error) => {
                        // The stream cannot be parsed past this point: close,
                        // then discard input until the close-ok timeout.
                        buf.clear();
                        self.close_connection(error.to_amqp());
                        self.unparseable = true;
                        break;
                    }
                };
                let result = self.handle_frame(frame, guard.as_mut());
                if let Err(error) = result {
                    self.close_connection(error);
                }
                if self.pending_login.is_some() || self.deferred_reply.is_some() {
                    break;
                }
                if let Some(state) = guard.as_mut() {
                    // Notices the frame caused follow its reply; settlements
                    // and definitions reach the store in the order they
                    // happened (publishes are appended in `route`).
                    state.flush();
                }
                if guard.is_none() && self.vhost.is_some() {
                    continue 'batch;
                }
            }
            drop(guard);
            self.flush_confirms();
            break;
        }
    }

    /// Stops or resumes reading a publishing connection as resource alarms
    /// rise and clear, telling clients that asked to be told.
    ///
    /// A message whose frames are still arriving is let in first: clients
    /// write a publish's frames one by one, and stopping between them would
    /// leave that message (and its confirm) hanging until the alarm clears.
    /// The grace is bounded by one largest message, so a client cannot keep
    /// a content open to dodge the alarm.
    fn apply_alarm(&mut self, alarm: AlarmState) {
        let block = alarm.any() && self.publisher && self.phase == Phase::Running;
        if block == self.blocked {
            return;
        }
        let grace = usize::try_from(self.broker.config.max_message_size)
            .unwrap_or(usize::MAX)
            .saturating_add(BLOCK_GRACE_SLACK);
        if block && self.channels.values().any(|ch| ch.content.is_some()) && self.block_deferred_bytes < grace {
            return;
        }
        self.block_deferred_bytes = 0;
        self.blocked = block;
        info!(peer = %self.peer, blocked = block, reason = alarm.reason(), "publisher flow");
        if !self.blocked_capability {
            return;
        }
        let method = if block {
            connection::AMQPMethod::Blocked(connection::Blocked { reason: short(alarm.reason()) })
        } else {
            connection::AMQPMethod::Unblocked(connection::Unblocked {})
        };
        self.send(0, AMQPClass::Connection(method));
    }

    fn login_accepted(&mut self, user: Arc<User>) {
        self.user = user.name.clone();
        self.account = Some(user);
        let config = &self.broker.config;
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: config.channel_max,
                frame_max: config.frame_max,
                heartbeat: config.heartbeat_s,
            })),
        );
        self.phase = Phase::TuneOk;
    }

    fn login_refused(&mut self, mechanism: &str, user: &str) -> Result<(), AmqpError> {
        warn!(peer = %self.peer, %user, "login refused");
        if self.auth_failure_close {
            Err(AmqpError::hard(
                ReplyCode::AccessRefused,
                format!(
                    "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                ),
                10,
                11,
            ))
        } else {
            // Pre-capability clients expect the socket to close.
            self.phase = Phase::Done;
            Ok(())
        }
    }

    /// Ends a login that waited for the password check.
    fn finish_login(&mut self, ok: bool, user: Arc<User>, mechanism: &str) {
        if ok {
            self.login_accepted(user);
        } else if let Err(error) = self.login_refused(mechanism, &user.name) {
            self.close_connection(error);
        }
    }

    fn forget_channel(&mut self, number: u16) {
        if self.channels.remove(&number).is_some() && self.account.is_some() {
            self.broker.close_channel(&self.user);
        }
    }

    /// Checks a permission as RabbitMQ does (403, channel closed), with the
    /// permissions re-read if the access definitions changed.
    fn allow(&mut self, permission: Permission, resource: Resource, name: &str) -> Result<(), AmqpError> {
        self.current_permissions().check(permission, resource, name).map_err(access_refused)
    }

    fn allow_topic(
        &mut self,
        permission: Permission,
        exchange: &str,
        routing_key: &str,
        state: &VirtualHostState,
    ) -> Result<(), AmqpError> {
        let permissions = self.current_permissions();
        if !permissions.has_topic_rules(exchange) || state.exchange(exchange).is_none_or(|e| e.type_name() != "topic") {
            return Ok(());
        }
        permissions.check_topic(permission, exchange, routing_key).map_err(access_refused)
    }

    /// queue.bind and unbind: write on the queue, read on the exchange (and
    /// its topic permission for the binding key).
    fn allow_bind(
        &mut self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        state: &VirtualHostState,
    ) -> Result<(), AmqpError> {
        self.allow(Permission::Write, Resource::Queue, queue)?;
        self.allow(Permission::Read, Resource::Exchange, exchange)?;
        self.allow_topic(Permission::Read, exchange, routing_key, state)
    }

    fn current_permissions(&mut self) -> Arc<Permissions> {
        let generation = self.broker.access_generation();
        if generation != self.permissions_generation || self.permissions.is_none() {
            let vhost = &self.vhost_name;
            self.permissions = Some(
                self.broker
                    .access()
                    .permissions(&self.user, vhost)
                    .unwrap_or_else(|| Arc::new(Permissions::none(&self.user, vhost))),
            );
            self.permissions_generation = generation;
        }
        self.permissions.clone().unwrap_or_else(|| Arc::new(Permissions::none(&self.user, "")))
    }

    fn awaiting_store(&self) -> bool {
        self.channels.values().any(|ch| !ch.awaiting_store.is_empty())
    }

    /// Sends what can be confirmed: every publish up to the first one still
    /// waiting for the store, as one `basic.ack multiple`; nacks for
    /// publishes the store refused.
    fn flush_confirms(&mut self) {
        let durable = self.store.durable_index();
        let poisoned = self.store.is_poisoned();
        for (&number, ch) in self.channels.iter_mut().filter(|(_, ch)| ch.confirm && !ch.closing) {
            loop {
                while ch.awaiting_store.front().is_some_and(|&(_, index)| index != NACK && index <= durable) {
                    ch.awaiting_store.pop_front();
                }
                if poisoned {
                    for entry in ch.awaiting_store.iter_mut() {
                        entry.1 = NACK;
                    }
                }
                let confirmable = ch.awaiting_store.front().map_or(ch.published, |&(seq, _)| seq - 1);
                if confirmable > ch.confirmed {
                    let multiple = confirmable - ch.confirmed > 1;
                    self.outbox.write(|buf| encode::basic_ack(buf, number, confirmable, multiple));
                    ch.confirmed = confirmable;
                }
                match ch.awaiting_store.front() {
                    Some(&(seq, NACK)) if seq == ch.confirmed + 1 => {
                        ch.awaiting_store.pop_front();
                        self.outbox.write(|buf| encode::basic_nack(buf, number, seq, false, false));
                        ch.confirmed = seq;
                    }
                    _ => break,
                }
            }
        }
    }

    /// Answers the client's `connection.close`: every other frame still
    /// arriving is discarded, and the client closes the socket.
    fn answer_close(&mut self) {
        self.send(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})));
        self.phase = Phase::Done;
        self.answered_close = true;
    }

    fn close_connection(&mut self, error: AmqpError) {
        if matches!(self.phase, Phase::Closing | Phase::Done) {
            return;
        }
        info!(peer = %self.peer, code = error.code.code(), text = %error.text, "closing connection");
        self.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: error.code.code(),
                reply_text: short(&error.text),
                class_id: error.class_id,
                method_id: error.method_id,
            })),
        );
        self.phase = Phase::Closing;
    }

    /// Closes the channels the core asked to close (consumer timeout in
    /// close-channel mode) with 406.
    fn fail_channels(&mut self) {
        let failed = self.outbox.take_failed();
        let (Some(vhost), store) = (self.vhost.clone(), self.store.clone()) else { return };
        let mut session = Session::open(&vhost, &store);
        for (number, text) in failed {
            if self.channels.get(&number).is_some_and(|ch| !ch.closing) {
                let error = AmqpError::soft(ReplyCode::PreconditionFailed, text, 0, 0);
                self.channel_error(number, error, Some(&mut session));
            }
        }
    }

    fn channel_error(&mut self, number: u16, error: AmqpError, state: Option<&mut Session<'_>>) {
        debug!(peer = %self.peer, channel = number, code = error.code.code(), text = %error.text, "closing channel");
        if let Some(state) = state {
            state.close_channel(self.key(number));
        }
        if let Some(ch) = self.channels.get_mut(&number) {
            ch.closing = true;
            ch.content = None;
            ch.tx = None;
        }
        self.outbox.write(|buf| {
            encode::channel_close(buf, number, error.code.code(), &error.text, error.class_id, error.method_id)
        });
    }

    fn handle_frame(&mut self, frame: Frame, state: Option<&mut Session<'_>>) -> Result<(), AmqpError> {
        if self.phase == Phase::Closing {
            // Only close-ok (or a crossing close) matters now.
            if frame.kind == FrameKind::Method {
                if let Ok(Method::Other(AMQPClass::Connection(m))) = method::decode(&frame.payload) {
                    match m {
                        connection::AMQPMethod::CloseOk(_) => self.phase = Phase::Done,
                        connection::AMQPMethod::Close(_) => self.answer_close(),
                        _ => {}
                    }
                }
            }
            return Ok(());
        }
        match frame.kind {
            FrameKind::Heartbeat => {
                if frame.channel != 0 {
                    return Err(AmqpError::hard(ReplyCode::FrameError, "heartbeat frame on non-zero channel", 0, 0));
                }
                Ok(())
            }
            FrameKind::Method => {
                let method = method::decode(&frame.payload).map_err(|e| e.to_amqp())?;
                let (class_id, method_id) = method::ids(&frame.payload);
                if frame.channel == 0 {
                    let closing =
                        matches!(method, Method::Other(AMQPClass::Connection(connection::AMQPMethod::Close(_))));
                    if let (true, Some(state)) = (closing, state) {
                        // As RabbitMQ: close-ok once the channels are gone
                        // (consumers cancelled, unacked messages requeued).
                        state.close_connection(self.id);
                        state.flush();
                    }
                    return self.handle_connection_method(method).map_err(|e| e.at(class_id, method_id));
                }
                if self.phase != Phase::Running {
                    return Err(AmqpError::hard(
                        ReplyCode::ChannelError,
                        "expected 'connection.open'",
                        class_id,
                        method_id,
                    ));
                }
                let mut state = state;
                let number = frame.channel;
                match self.channels.get(&number) {
                    Some(ch) if ch.closing => {
                        // After channel.close only close-ok and close count.
                        if let Method::Other(AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))) = method {
                            self.forget_channel(number);
                        } else if let Method::Other(AMQPClass::Channel(channel::AMQPMethod::Close(_))) = method {
                            self.send(number, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})));
                            self.forget_channel(number);
                        }
                        return Ok(());
                    }
                    Some(ch) if ch.content.is_some() => {
                        return Err(AmqpError::hard(
                            ReplyCode::UnexpectedFrame,
                            "expected content header for class 60, got non content header frame instead",
                            class_id,
                            method_id,
                        ));
                    }
                    _ => {}
                }
                match self.handle_channel_method(number, method, state.as_deref_mut()) {
                    Ok(()) => Ok(()),
                    Err(error) if error.hard => Err(error.at(class_id, method_id)),
                    Err(error) => {
                        self.channel_error(number, error.at(class_id, method_id), state);
                        Ok(())
                    }
                }
            }
            FrameKind::Header | FrameKind::Body => {
                let number = frame.channel;
                let closing = self.channels.get(&number).map(|c| c.closing);
                match closing {
                    Some(true) => Ok(()),
                    Some(false) if number != 0 => self.handle_content(number, frame, state),
                    _ => Err(AmqpError::hard(
                        ReplyCode::UnexpectedFrame,
                        "expected method frame, got non method frame instead",
                        0,
                        0,
                    )),
                }
            }
        }
    }

    fn handle_connection_method(&mut self, method: Method) -> Result<(), AmqpError> {
        let Method::Other(AMQPClass::Connection(method)) = method else {
            return Err(AmqpError::hard(ReplyCode::CommandInvalid, "only connection methods may use channel 0", 0, 0));
        };
        use connection::AMQPMethod as M;
        match (self.phase, method) {
            (Phase::StartOk, M::StartOk(start_ok)) => {
                self.auth_failure_close =
                    client_capability(&start_ok.client_properties, "authentication_failure_close");
                self.outbox.set_cancel_notify(client_capability(&start_ok.client_properties, "consumer_cancel_notify"));
                self.blocked_capability = client_capability(&start_ok.client_properties, "connection.blocked");
                let mechanism = start_ok.mechanism.as_str().to_string();
                let (name, password) =
                    match auth::login(&mechanism, start_ok.response.as_bytes(), self.certificate.as_deref()) {
                        Ok(auth::Login::Password { user, password }) => (user, Some(password)),
                        Ok(auth::Login::Certificate { user }) => (user, None),
                        Err(AuthError::UnknownMechanism(m)) => {
                            return Err(AmqpError::hard(
                                ReplyCode::CommandInvalid,
                                format!("unknown authentication mechanism '{m}'"),
                                10,
                                11,
                            ))
                        }
                        Err(AuthError::Refused { .. }) => return self.login_refused(&mechanism, ""),
                    };
                let Some(user) = self.broker.access().user(&name) else {
                    return self.login_refused(&mechanism, &name);
                };
                if self.broker.config.loopback_only(&name) && !auth::is_loopback(self.peer.ip()) {
                    return self.login_refused(&mechanism, &name);
                }
                match password {
                    None => self.login_accepted(user),
                    Some(password) if self.broker.login_cached(&user, &password) => self.login_accepted(user),
                    // The KDF runs off this task; see `serve_stream`.
                    Some(password) => self.pending_login = Some((user, password, mechanism)),
                }
                Ok(())
            }
            (Phase::StartOk, M::SecureOk(_)) => {
                Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected connection.secure-ok", 10, 21))
            }
            (Phase::TuneOk, M::TuneOk(tune_ok)) => {
                let config = &self.broker.config;
                let frame_max = if tune_ok.frame_max == 0 { config.frame_max } else { tune_ok.frame_max };
                if frame_max < FRAME_MIN_SIZE {
                    return Err(AmqpError::hard(
                        ReplyCode::NotAllowed,
                        format!("frame_max={frame_max} < {FRAME_MIN_SIZE} min size"),
                        10,
                        31,
                    ));
                }
                if config.frame_max != 0 && frame_max > config.frame_max {
                    return Err(AmqpError::hard(
                        ReplyCode::NotAllowed,
                        format!("frame_max={frame_max} > {} max size", config.frame_max),
                        10,
                        31,
                    ));
                }
                self.channel_max = match (tune_ok.channel_max, config.channel_max) {
                    (0, server) => server,
                    (client, 0) => client,
                    (client, server) => client.min(server),
                };
                if self.channel_max == 0 {
                    self.channel_max = u16::MAX;
                }
                self.heartbeat_s = tune_ok.heartbeat;
                self.decoder = FrameDecoder::new(frame_max);
                self.outbox.set_frame_max(frame_max);
                self.phase = Phase::Open;
                Ok(())
            }
            (Phase::Open, M::Open(open)) => {
                let name = open.virtual_host.as_str();
                let Some(vhost) = self.broker.vhost(name) else {
                    return Err(AmqpError::hard(ReplyCode::NotAllowed, format!("vhost {name} not found"), 10, 40));
                };
                let Some(user) = self.account.clone() else {
                    return Err(AmqpError::hard(ReplyCode::InternalError, "no user", 10, 40));
                };
                let Some(permissions) = self.broker.access().permissions(&user.name, name) else {
                    return Err(AmqpError::hard(
                        ReplyCode::NotAllowed,
                        format!("access to vhost '{name}' refused for user '{}'", user.name),
                        10,
                        40,
                    ));
                };
                self.broker
                    .register(self.id, &user, name, self.outbox.clone())
                    .map_err(|text| AmqpError::hard(ReplyCode::NotAllowed, text, 10, 40))?;
                self.registered = true;
                self.permissions = Some(permissions);
                self.vhost_name = name.to_string();
                self.permissions_generation = self.broker.access_generation();
                let _ = self.outbox.vhost.set((vhost.clone(), self.store.clone()));
                self.vhost = Some(vhost);
                self.send(0, AMQPClass::Connection(M::OpenOk(connection::OpenOk {})));
                self.phase = Phase::Running;
                debug!(peer = %self.peer, user = %self.user, vhost = name, "connection open");
                Ok(())
            }
            (_, M::Close(close)) => {
                debug!(peer = %self.peer, code = close.reply_code, text = close.reply_text.as_str(), "client closed connection");
                self.answer_close();
                Ok(())
            }
            (Phase::Running, M::UpdateSecret(_)) => {
                // Password-based users: the new secret is accepted as is.
                self.send(0, AMQPClass::Connection(M::UpdateSecretOk(connection::UpdateSecretOk {})));
                Ok(())
            }
            (Phase::Running, M::Blocked(_) | M::Unblocked(_)) => Ok(()),
            (_, other) => Err(AmqpError::hard(
                ReplyCode::CommandInvalid,
                format!("unexpected method {other:?} in connection state {:?}", self.phase)
                    .chars()
                    .take(200)
                    .collect::<String>(),
                0,
                0,
            )),
        }
    }

    fn handle_channel_method(
        &mut self,
        number: u16,
        method: Method,
        state: Option<&mut Session<'_>>,
    ) -> Result<(), AmqpError> {
        let Some(state) = state else {
            return Err(AmqpError::hard(ReplyCode::InternalError, "no virtual host", 0, 0));
        };
        let key = self.key(number);
        if !self.channels.contains_key(&number) {
            return match method {
                Method::Other(AMQPClass::Channel(channel::AMQPMethod::Open(_))) => {
                    // As RabbitMQ: the count of open channels is limited, not their numbers.
                    if self.channels.len() >= usize::from(self.channel_max) {
                        return Err(AmqpError::hard(
                            ReplyCode::NotAllowed,
                            format!(
                                "number of channels opened ({}) has reached the negotiated channel_max ({})",
                                self.channels.len(),
                                self.channel_max
                            ),
                            0,
                            0,
                        ));
                    }
                    if let Some(user) = &self.account {
                        self.broker
                            .open_channel(user)
                            .map_err(|text| AmqpError::hard(ReplyCode::NotAllowed, text, 0, 0))?;
                    }
                    self.channels.insert(number, ChannelProto::default());
                    state.open_channel(key, self.outbox.clone());
                    self.send(number, AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})));
                    Ok(())
                }
                _ => Err(AmqpError::hard(ReplyCode::ChannelError, "expected 'channel.open'", 0, 0)),
            };
        }
        match method {
            Method::Publish(publish) => {
                let exchange = str_of(&publish.exchange)?;
                self.allow(Permission::Write, Resource::Exchange, exchange)?;
                self.allow_topic(Permission::Write, exchange, str_of(&publish.routing_key)?, state)?;
                self.start_publish(number, publish)
            }
            Method::Ack { delivery_tag, multiple } => {
                if let Some(ops) = self.channels.get_mut(&number).and_then(|c| c.tx.as_mut()) {
                    ops.push(TxOp::Ack { delivery_tag, multiple });
                    return Ok(());
                }
                state.ack(key, delivery_tag, multiple)
            }
            Method::Qos { prefetch_size, prefetch_count, global } => {
                state.qos(key, prefetch_size, prefetch_count, global);
                self.send(number, AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
                Ok(())
            }
            Method::Other(class) => self.handle_other(number, class, state),
        }
    }

    fn queue_name(&self, number: u16, given: &str) -> Result<String, AmqpError> {
        if !given.is_empty() {
            return Ok(given.to_string());
        }
        match self.channels.get(&number).map(|c| c.last_queue.as_str()) {
            Some(last) if !last.is_empty() => Ok(last.to_string()),
            _ => Err(AmqpError::soft(ReplyCode::NotFound, "no previously declared queue", 0, 0)),
        }
    }

    fn handle_other(&mut self, number: u16, class: AMQPClass, state: &mut Session<'_>) -> Result<(), AmqpError> {
        let key = self.key(number);
        match class {
            AMQPClass::Channel(m) => match m {
                channel::AMQPMethod::Open(_) => {
                    Err(AmqpError::hard(ReplyCode::ChannelError, "second 'channel.open' seen", 0, 0))
                }
                channel::AMQPMethod::Close(_) => {
                    state.close_channel(key);
                    self.forget_channel(number);
                    self.send(number, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})));
                    Ok(())
                }
                channel::AMQPMethod::CloseOk(_) => Ok(()),
                channel::AMQPMethod::Flow(flow) => {
                    state.flow(key, flow.active);
                    self.send(
                        number,
                        AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk { active: flow.active })),
                    );
                    Ok(())
                }
                channel::AMQPMethod::FlowOk(_) => Ok(()),
                channel::AMQPMethod::OpenOk(_) => {
                    Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected channel.open-ok", 0, 0))
                }
            },
            AMQPClass::Access(spec::access::AMQPMethod::Request(_)) => {
                self.send(number, AMQPClass::Access(spec::access::AMQPMethod::RequestOk(spec::access::RequestOk {})));
                Ok(())
            }
            AMQPClass::Exchange(m) => self.handle_exchange(number, m, state),
            AMQPClass::Queue(m) => self.handle_queue(number, m, state),
            AMQPClass::Basic(m) => self.handle_basic(number, m, state),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => {
                let Some(ch) = self.channels.get_mut(&number) else {
                    return Ok(());
                };
                if ch.tx.is_some() {
                    return Err(AmqpError::soft(
                        ReplyCode::PreconditionFailed,
                        "cannot switch from tx to confirm mode",
                        0,
                        0,
                    ));
                }
                ch.confirm = true;
                if !select.nowait {
                    self.send(number, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})));
                }
                Ok(())
            }
            AMQPClass::Confirm(_) => {
                Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected confirm method from client", 0, 0))
            }
            AMQPClass::Tx(m) => self.handle_tx(number, m, state),
            AMQPClass::Connection(_) => {
                Err(AmqpError::hard(ReplyCode::CommandInvalid, "connection method on a non-zero channel", 0, 0))
            }
            AMQPClass::Access(_) => {
                Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected access method from client", 0, 0))
            }
        }
    }

    /// The reply to a method that changed durable definitions goes out once
    /// their log entry is durable (the connection reads nothing more
    /// meanwhile, so replies stay in order); a store that cannot take the
    /// change closes the connection with 541.
    fn reply_stored(
        &mut self,
        number: u16,
        reply: AMQPClass,
        nowait: bool,
        state: &mut Session<'_>,
    ) -> Result<(), AmqpError> {
        let appended = state.flush_indices().map_err(|_| not_stored())?;
        if nowait {
            return Ok(());
        }
        match appended.definitions {
            Some(index) if index > self.store.durable_index() => {
                self.deferred_reply = Some(DeferredReply { index, channel: number, reply });
            }
            _ => self.send(number, reply),
        }
        Ok(())
    }

    fn send_deferred(&mut self, deferred: DeferredReply, stored: Result<(), StorageError>) {
        match stored {
            Ok(()) => self.send(deferred.channel, deferred.reply),
            Err(_) => self.close_connection(not_stored()),
        }
    }

    fn handle_exchange(
        &mut self,
        number: u16,
        m: exchange::AMQPMethod,
        state: &mut Session<'_>,
    ) -> Result<(), AmqpError> {
        use exchange::AMQPMethod as M;
        match m {
            M::Declare(d) => {
                let kind = d.kind.as_str();
                let name = d.exchange.as_str();
                if !d.passive {
                    self.allow(Permission::Configure, Resource::Exchange, name)?;
                }
                state.declare_exchange(ExchangeDeclare {
                    name,
                    kind,
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments,
                })?;
                self.reply_stored(number, AMQPClass::Exchange(M::DeclareOk(exchange::DeclareOk {})), d.nowait, state)?;
            }
            M::Delete(d) => {
                self.allow(Permission::Configure, Resource::Exchange, d.exchange.as_str())?;
                state.delete_exchange(d.exchange.as_str(), d.if_unused)?;
                self.reply_stored(number, AMQPClass::Exchange(M::DeleteOk(exchange::DeleteOk {})), d.nowait, state)?;
            }
            M::Bind(b) => {
                let (destination, source, key) = (b.destination.as_str(), b.source.as_str(), b.routing_key.as_str());
                self.allow(Permission::Write, Resource::Exchange, destination)?;
                self.allow(Permission::Read, Resource::Exchange, source)?;
                self.allow_topic(Permission::Read, source, key, state)?;
                state.bind_exchange(destination, source, key, b.arguments, true)?;
                self.reply_stored(number, AMQPClass::Exchange(M::BindOk(exchange::BindOk {})), b.nowait, state)?;
            }
            M::Unbind(b) => {
                let (destination, source, key) = (b.destination.as_str(), b.source.as_str(), b.routing_key.as_str());
                self.allow(Permission::Write, Resource::Exchange, destination)?;
                self.allow(Permission::Read, Resource::Exchange, source)?;
                self.allow_topic(Permission::Read, source, key, state)?;
                state.bind_exchange(destination, source, key, b.arguments, false)?;
                self.reply_stored(number, AMQPClass::Exchange(M::UnbindOk(exchange::UnbindOk {})), b.nowait, state)?;
            }
            _ => {
                return Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected exchange method from client", 0, 0));
            }
        }
        Ok(())
    }

    fn handle_queue(&mut self, number: u16, m: queue::AMQPMethod, state: &mut Session<'_>) -> Result<(), AmqpError> {
        use queue::AMQPMethod as M;
        let conn = self.id;
        match m {
            M::Declare(d) => {
                let permissions = self.current_permissions();
                let declare = QueueDeclare {
                    name: d.queue.as_str(),
                    passive: d.passive,
                    durable: d.durable,
                    exclusive: d.exclusive,
                    auto_delete: d.auto_delete,
                    arguments: d.arguments,
                };
                let declared = state.declare_queue_as(conn, declare, &mut |name| {
                    permissions.check(Permission::Configure, Resource::Queue, name).map_err(access_refused)
                })?;
                if let Some(ch) = self.channels.get_mut(&number) {
                    ch.last_queue = declared.name.clone();
                }
                let ok = queue::DeclareOk {
                    queue: short(&declared.name),
                    message_count: declared.message_count,
                    consumer_count: declared.consumer_count,
                };
                self.reply_stored(number, AMQPClass::Queue(M::DeclareOk(ok)), d.nowait, state)?;
            }
            M::Bind(b) => {
                let name = self.queue_name(number, b.queue.as_str())?;
                self.allow_bind(&name, b.exchange.as_str(), b.routing_key.as_str(), state)?;
                state.bind_queue(conn, &name, b.exchange.as_str(), b.routing_key.as_str(), b.arguments, true)?;
                self.reply_stored(number, AMQPClass::Queue(M::BindOk(queue::BindOk {})), b.nowait, state)?;
            }
            M::Unbind(b) => {
                let name = self.queue_name(number, b.queue.as_str())?;
                self.allow_bind(&name, b.exchange.as_str(), b.routing_key.as_str(), state)?;
                state.bind_queue(conn, &name, b.exchange.as_str(), b.routing_key.as_str(), b.arguments, false)?;
                self.reply_stored(number, AMQPClass::Queue(M::UnbindOk(queue::UnbindOk {})), false, state)?;
            }
            M::Purge(p) => {
                let name = self.queue_name(number, p.queue.as_str())?;
                self.allow(Permission::Read, Resource::Queue, &name)?;
                let message_count = state.purge_queue(conn, &name)?;
                self.reply_stored(
                    number,
                    AMQPClass::Queue(M::PurgeOk(queue::PurgeOk { message_count })),
                    p.nowait,
                    state,
                )?;
            }
            M::Delete(d) => {
                let name = self.queue_name(number, d.queue.as_str())?;
                self.allow(Permission::Configure, Resource::Queue, &name)?;
                let message_count = state.delete_queue(conn, &name, d.if_unused, d.if_empty)?;
                self.reply_stored(
                    number,
                    AMQPClass::Queue(M::DeleteOk(queue::DeleteOk { message_count })),
                    d.nowait,
                    state,
                )?;
            }
            _ => return Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected queue method from client", 0, 0)),
        }
        Ok(())
    }

    fn handle_basic(&mut self, number: u16, m: basic::AMQPMethod, state: &mut Session<'_>) -> Result<(), AmqpError> {
        let key = self.key(number);
        match m {
            basic::AMQPMethod::Consume(c) => {
                let name = if c.queue.as_str() == REPLY_TO_QUEUE {
                    REPLY_TO_QUEUE.to_string()
                } else {
                    let name = self.queue_name(number, c.queue.as_str())?;
                    self.allow(Permission::Read, Resource::Queue, &name)?;
                    name
                };
                let max = self.broker.config.consumer_max_per_channel;
                if max > 0 && state.channel_consumer_count(key) as u64 >= max {
                    // As RabbitMQ: a connection error.
                    return Err(AmqpError::hard(
                        ReplyCode::NotAllowed,
                        format!("reached maximum ({max}) of consumers per channel"),
                        0,
                        0,
                    ));
                }
                let consume = Consume {
                    queue: &name,
                    consumer_tag: c.consumer_tag.as_str(),
                    no_ack: c.no_ack,
                    exclusive: c.exclusive,
                    arguments: c.arguments,
                };
                let tag = state.consume(key, consume)?;
                if !c.nowait {
                    self.send(
                        number,
                        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk { consumer_tag: short(&tag) })),
                    );
                }
                // Dispatch only after consume-ok is queued.
                state.run_dispatch();
                Ok(())
            }
            basic::AMQPMethod::Cancel(c) => {
                state.cancel(key, c.consumer_tag.as_str());
                if !c.nowait {
                    self.send(
                        number,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk { consumer_tag: c.consumer_tag })),
                    );
                }
                Ok(())
            }
            basic::AMQPMethod::Get(g) => {
                let name = self.queue_name(number, g.queue.as_str())?;
                self.allow(Permission::Read, Resource::Queue, &name)?;
                match state.get(key, &name, g.no_ack)? {
                    Some(got) => {
                        let frame_max = self.outbox.frame_max();
                        self.outbox.write(|buf| {
                            encode::basic_get_ok(
                                buf,
                                number,
                                got.delivery_tag,
                                got.redelivered,
                                got.message.exchange(),
                                got.message.routing_key(),
                                got.message_count,
                            );
                            encode::content(buf, number, got.message.properties(), got.message.body(), frame_max);
                        });
                    }
                    None => self.send(number, AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {}))),
                }
                Ok(())
            }
            basic::AMQPMethod::Nack(n) => self.settle(number, n.delivery_tag, n.multiple, Some(n.requeue), state),
            basic::AMQPMethod::Reject(r) => self.settle(number, r.delivery_tag, false, Some(r.requeue), state),
            basic::AMQPMethod::Ack(a) => self.settle(number, a.delivery_tag, a.multiple, None, state),
            basic::AMQPMethod::Recover(basic::Recover { requeue: false })
            | basic::AMQPMethod::RecoverAsync(basic::RecoverAsync { requeue: false }) => {
                Err(AmqpError::hard(ReplyCode::NotImplemented, "requeue=false", 60, 110))
            }
            basic::AMQPMethod::Recover(_) => {
                state.recover(key);
                self.send(number, AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})));
                Ok(())
            }
            basic::AMQPMethod::RecoverAsync(_) => {
                state.recover(key);
                Ok(())
            }
            basic::AMQPMethod::Qos(_) | basic::AMQPMethod::Publish(_) => Ok(()),
            _ => Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected basic method from client", 0, 0)),
        }
    }

    fn settle(
        &mut self,
        number: u16,
        delivery_tag: u64,
        multiple: bool,
        requeue: Option<bool>,
        state: &mut Session<'_>,
    ) -> Result<(), AmqpError> {
        let key = self.key(number);
        if let Some(ops) = self.channels.get_mut(&number).and_then(|c| c.tx.as_mut()) {
            ops.push(match requeue {
                None => TxOp::Ack { delivery_tag, multiple },
                Some(requeue) => TxOp::Nack { delivery_tag, multiple, requeue },
            });
            return Ok(());
        }
        match requeue {
            None => state.ack(key, delivery_tag, multiple),
            Some(requeue) => state.nack(key, delivery_tag, multiple, requeue),
        }
    }

    fn handle_tx(&mut self, number: u16, m: tx::AMQPMethod, state: &mut Session<'_>) -> Result<(), AmqpError> {
        let key = self.key(number);
        let Some(ch) = self.channels.get_mut(&number) else {
            return Ok(());
        };
        match m {
            tx::AMQPMethod::Select(_) => {
                if ch.confirm {
                    return Err(AmqpError::soft(
                        ReplyCode::PreconditionFailed,
                        "cannot switch from confirm to tx mode",
                        0,
                        0,
                    ));
                }
                if ch.tx.is_none() {
                    ch.tx = Some(Vec::new());
                }
                self.send(number, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(ops) = ch.tx.replace(Vec::new()) else {
                    return Err(AmqpError::soft(ReplyCode::PreconditionFailed, "channel is not transactional", 0, 0));
                };
                for op in ops {
                    match op {
                        TxOp::Publish { exchange, message, mandatory, extra_keys } => {
                            let exchange = str_of(&exchange)?;
                            self.route(number, exchange, Arc::new(message), mandatory, &extra_keys, state)?;
                        }
                        TxOp::Ack { delivery_tag, multiple } => state.ack(key, delivery_tag, multiple)?,
                        TxOp::Nack { delivery_tag, multiple, requeue } => {
                            state.nack(key, delivery_tag, multiple, requeue)?
                        }
                    }
                }
                self.send(number, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
                Ok(())
            }
            tx::AMQPMethod::Rollback(_) => {
                if ch.tx.replace(Vec::new()).is_none() {
                    return Err(AmqpError::soft(ReplyCode::PreconditionFailed, "channel is not transactional", 0, 0));
                }
                self.send(number, AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})));
                Ok(())
            }
            _ => Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected tx method from client", 0, 0)),
        }
    }

    // ---- content --------------------------------------------------------

    fn start_publish(&mut self, number: u16, publish: BasicPublish) -> Result<(), AmqpError> {
        if publish.immediate {
            return Err(AmqpError::hard(ReplyCode::NotImplemented, "immediate=true", 60, 40));
        }
        str_of(&publish.exchange)?;
        self.publisher = true;
        let exchange = publish.exchange;
        if let Some(ch) = self.channels.get_mut(&number) {
            ch.content = Some(Content {
                exchange,
                routing_key: publish.routing_key,
                mandatory: publish.mandatory,
                builder: None,
            });
        }
        Ok(())
    }

    fn handle_content(&mut self, number: u16, frame: Frame, state: Option<&mut Session<'_>>) -> Result<(), AmqpError> {
        let max_message_size = self.broker.config.max_message_size;
        let key = self.key(number);
        let unexpected = |text: &str| AmqpError::hard(ReplyCode::UnexpectedFrame, text, 60, 40);
        let Some(content) = self.channels.get_mut(&number).and_then(|c| c.content.as_mut()) else {
            return Err(unexpected("expected method frame, got non method frame instead"));
        };
        match (frame.kind, content.builder.is_some()) {
            (FrameKind::Header, false) => {
                let payload = &frame.payload;
                if payload.len() < 14 {
                    return Err(AmqpError::hard(ReplyCode::FrameError, "content header frame too short", 60, 40));
                }
                let class_id = u16::from_be_bytes([payload[0], payload[1]]);
                if class_id != method::CLASS_BASIC {
                    return Err(AmqpError::hard(
                        ReplyCode::FrameError,
                        format!("content header for unknown class {class_id}"),
                        60,
                        40,
                    ));
                }
                let mut size_bytes = [0u8; 8];
                size_bytes.copy_from_slice(&payload[4..12]);
                let body_size = u64::from_be_bytes(size_bytes);
                let Some(mut properties) = Properties::parse(payload.slice(12..)) else {
                    return Err(AmqpError::hard(ReplyCode::FrameError, "malformed content header properties", 60, 40));
                };
                if body_size > max_message_size {
                    let error = AmqpError::soft(
                        ReplyCode::PreconditionFailed,
                        format!("message size {body_size} is larger than configured max size {max_message_size}"),
                        60,
                        40,
                    );
                    self.channel_error(number, error, state);
                    return Ok(());
                }
                if properties.flags() & flag::USER_ID != 0 {
                    if let Some(claimed) = properties.user_id().filter(|claimed| *claimed != self.user) {
                        let error = AmqpError::soft(
                            ReplyCode::PreconditionFailed,
                            format!("user_id property set to '{claimed}' but authenticated user was '{}'", self.user),
                            60,
                            40,
                        );
                        self.channel_error(number, error, state);
                        return Ok(());
                    }
                }
                if let Some(Err(problem)) = properties.expiration().map(warren_core::message::parse_expiration) {
                    let text =
                        format!("invalid expiration '{}': {problem}", properties.expiration().unwrap_or_default());
                    let error = AmqpError::soft(ReplyCode::PreconditionFailed, text, 60, 40);
                    self.channel_error(number, error, state);
                    return Ok(());
                }
                if properties.reply_to() == Some(REPLY_TO_QUEUE) {
                    match state.as_deref().and_then(|s| s.reply_to_address(key)) {
                        Some(address) => properties = properties.with_reply_to(&address),
                        None => {
                            let error = AmqpError::soft(
                                ReplyCode::PreconditionFailed,
                                "fast reply consumer does not exist",
                                60,
                                40,
                            );
                            self.channel_error(number, error, state);
                            return Ok(());
                        }
                    }
                }
                let builder =
                    Message::builder(&content.exchange, &content.routing_key, &properties, body_size as usize);
                content.builder = Some(builder);
            }
            (FrameKind::Body, true) => {
                if let Some(builder) = content.builder.as_mut() {
                    if !builder.push_body(&frame.payload) {
                        return Err(AmqpError::hard(
                            ReplyCode::FrameError,
                            "content body exceeds the size declared in its header",
                            60,
                            40,
                        ));
                    }
                }
            }
            (FrameKind::Header, true) => return Err(unexpected("expected content body, got content header instead")),
            _ => return Err(unexpected("expected content header for class 60, got non content header frame instead")),
        }
        if !content.builder.as_ref().is_some_and(MessageBuilder::is_complete) {
            return Ok(());
        }
        let Some(ch) = self.channels.get_mut(&number) else {
            return Ok(());
        };
        let Some(Content { exchange, mandatory, builder: Some(builder), .. }) = ch.content.take() else {
            return Ok(());
        };
        let in_tx = ch.tx.is_some();
        let (message, extra_keys) = sender_selected(builder.finish());
        let Some(state) = state else {
            return Ok(());
        };
        let exchange_name = str_of(&exchange)?;
        if in_tx {
            if let Err(error) = state.check_publish(exchange_name) {
                self.channel_error(number, error.at(60, 40), Some(state));
                return Ok(());
            }
            if let Some(ops) = self.channels.get_mut(&number).and_then(|c| c.tx.as_mut()) {
                ops.push(TxOp::Publish { exchange, message, mandatory, extra_keys });
            }
            return Ok(());
        }
        match self.route(number, exchange_name, Arc::new(message), mandatory, &extra_keys, state) {
            Ok(()) => Ok(()),
            Err(error) if error.hard => Err(error),
            Err(error) => {
                self.channel_error(number, error.at(60, 40), Some(state));
                Ok(())
            }
        }
    }

    /// Routes a complete message; sends `basic.return` when mandatory and
    /// unroutable; counts it for publisher confirms.
    fn route(
        &mut self,
        number: u16,
        exchange: &str,
        message: Arc<Message>,
        mandatory: bool,
        extra_keys: &[Vec<u8>],
        state: &mut Session<'_>,
    ) -> Result<(), AmqpError> {
        let seq = match self.channels.get_mut(&number) {
            Some(ch) if ch.confirm => {
                ch.published += 1;
                Some(ch.published)
            }
            _ => None,
        };
        let routed = state.publish(exchange, message.clone(), extra_keys)?;
        let stored = state.flush_indices();
        if let (Some(seq), Some(ch)) = (seq, self.channels.get_mut(&number)) {
            match stored {
                // A queue at its length limit refused it (reject-publish).
                _ if routed.rejected => ch.awaiting_store.push_back((seq, NACK)),
                Ok(Appended { published: Some(index), .. }) => ch.awaiting_store.push_back((seq, index)),
                Err(_) if message.persistent => ch.awaiting_store.push_back((seq, NACK)),
                _ => {}
            }
        }
        if routed.queues == 0 && mandatory {
            let frame_max = self.outbox.frame_max();
            self.outbox.write(|buf| {
                encode::basic_return(
                    buf,
                    number,
                    ReplyCode::NoRoute.code(),
                    "NO_ROUTE",
                    message.exchange(),
                    message.routing_key(),
                );
                encode::content(buf, number, message.properties(), message.body(), frame_max);
            });
        }
        Ok(())
    }
}
