//! One AMQP connection as a state machine without I/O: bytes in
//! (`Connection::process`), encoded frames out (into its
//! [`ConnectionOutbox`]), and a `Wait` when it needs something only the
//! I/O task can do (a slow password check, a durable log index). `io.rs`
//! is the thin tokio task around it.
//!
//! Rooms: `handshake.rs` (start, tune, open, close), `methods.rs` (channel,
//! exchange, queue, basic and tx methods), `content.rs` (content assembly
//! and routing a complete message), `confirms.rs` (publisher confirms in
//! order), `permissions.rs` (the cached permission checks).
//!
//! Invariants:
//! - every frame a batch of reads yielded is applied in one virtual-host
//!   [`Session`], and dispatch runs before it ends;
//! - publisher confirms for a batch go out after every `basic.return` of that
//!   batch, coalesced into one `basic.ack multiple=true` per channel;
//! - a soft error closes only its channel (its unacked messages are requeued
//!   at once); a hard error sends `connection.close` and the connection then
//!   only waits for `close-ok`.

mod confirms;
mod content;
mod handshake;
mod io;
mod methods;
mod permissions;
mod quorum;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tracing::{debug, info};
use warren_codec::encode;
use warren_codec::frame::{Frame, FrameDecoder, FrameKind, FRAME_MIN_SIZE};
use warren_codec::method::{self, Method};
use warren_codec::reply::{AmqpError, ReplyCode};
use warren_codec::spec::{channel, connection, AMQPClass};
use warren_codec::types::{FieldTable, LongString, ShortString};
use warren_core::{ChannelKey, VirtualHost};

use crate::access::User;
use crate::alarm::AlarmState;
use crate::auth;
use crate::broker::Broker;
use crate::outbox::ConnectionOutbox;
use crate::session::Session;
use crate::store::Store;
use confirms::Confirms;
use content::Content;
use methods::TxOp;
use permissions::PermissionCache;

pub use io::{serve, serve_tls};

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

/// Who is at each end of a connection.
pub(crate) struct Endpoints {
    pub(crate) peer: SocketAddr,
    pub(crate) local: SocketAddr,
    pub(crate) tls: bool,
    /// The verified client certificate's common name (TLS), for EXTERNAL.
    pub(crate) certificate: Option<String>,
}

/// What the state machine needs from its I/O task before it reads on.
pub(crate) enum Wait {
    /// Check a password with the slow KDF, then [`Connection::finish_login`].
    Password { user: Arc<User>, password: String, mechanism: String },
    /// Send a reply once the log is durable up to its index, then
    /// [`Connection::send_deferred`].
    Durable(DeferredReply),
    /// Place a quorum queue in the cluster, then
    /// [`Connection::finish_quorum_declare`].
    Quorum(QuorumDeclare),
    /// Subscribe a consumer at its quorum queue's leader (the queue here is
    /// a stand-in), then [`Connection::finish_relayed_consume`].
    Relay(RelayedConsume),
    /// Ask a quorum queue's leader for its counts (a passive declare
    /// here), then [`Connection::finish_passive_declare`].
    Counts(PassiveDeclare),
    /// Purge a queue that lives on (or is led from) another node, then
    /// [`Connection::finish_remote_purge`].
    Purge(RemotePurge),
    /// `basic.get` from a classic queue on another node, then
    /// [`Connection::finish_remote_get`].
    Get(RemoteGet),
    /// Delete a classic queue on another node, then
    /// [`Connection::finish_remote_delete`].
    Delete(RemoteDelete),
}

/// A `queue.delete` on the stand-in of a classic queue of another node.
pub(crate) struct RemoteDelete {
    pub(crate) channel: u16,
    pub(crate) name: String,
    pub(crate) if_unused: bool,
    pub(crate) if_empty: bool,
    nowait: bool,
}

/// A `basic.get` on the stand-in of a classic queue of another node.
pub(crate) struct RemoteGet {
    pub(crate) channel: u16,
    pub(crate) name: String,
    pub(crate) no_ack: bool,
}

/// A `queue.purge` of a stand-in: the queue's node purges it.
pub(crate) struct RemotePurge {
    pub(crate) channel: u16,
    pub(crate) name: String,
    nowait: bool,
}

/// A passive `queue.declare` of a quorum queue led from another node.
pub(crate) struct PassiveDeclare {
    pub(crate) channel: u16,
    pub(crate) name: String,
    nowait: bool,
    /// What this node knows without its leader: its replica's messages.
    known: u32,
}

/// A `basic.consume` on a quorum queue led from another node.
pub(crate) struct RelayedConsume {
    pub(crate) channel: u16,
    pub(crate) tag: String,
    nowait: bool,
}

/// A `queue.declare` of a quorum queue not placed yet.
pub(crate) struct QuorumDeclare {
    channel: u16,
    name: String,
    arguments: warren_codec::types::FieldTable,
    nowait: bool,
}

/// A reply waiting for the log entry of the change it reports (the method
/// changed durable definitions).
pub(crate) struct DeferredReply {
    index: u64,
    /// In a cluster, the ticket of the change's metadata write.
    pub(crate) ticket: Option<u64>,
    channel: u16,
    reply: AMQPClass,
}

#[derive(Default)]
struct ChannelProto {
    closing: bool,
    content: Option<Content>,
    confirms: Confirms,
    tx: Option<Vec<TxOp>>,
    last_queue: String,
}

struct Connection {
    id: u64,
    broker: Arc<Broker>,
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
    /// What the client said of itself in `start-ok` (product, version…).
    client_properties: FieldTable,
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
    /// What the connection waits for; no further frame is read meanwhile.
    waiting: Option<Wait>,
    permissions: PermissionCache,
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

fn access_refused(text: String) -> AmqpError {
    AmqpError::soft(ReplyCode::AccessRefused, text, 0, 0)
}

fn short(value: &str) -> ShortString {
    ShortString::from(value)
}

impl Connection {
    /// A connection whose client sent the protocol header: queues
    /// `connection.start`.
    pub(crate) fn new(broker: Arc<Broker>, endpoints: Endpoints) -> Connection {
        let Endpoints { peer, local, tls, certificate } = endpoints;
        let id = broker.next_connection_id();
        let outbox = Arc::new(ConnectionOutbox::new(id, FRAME_MIN_SIZE, broker.config.connection_write_buffer_max));
        let mechanisms = if certificate.is_some() { auth::MECHANISMS_WITH_CERTIFICATE } else { auth::MECHANISMS };
        let conn = Connection {
            id,
            peer,
            local,
            tls,
            client_properties: FieldTable::default(),
            outbox,
            decoder: FrameDecoder::new(FRAME_MIN_SIZE),
            phase: Phase::StartOk,
            vhost: None,
            channel_max: broker.config.channel_max,
            heartbeat_s: 0,
            channels: HashMap::new(),
            auth_failure_close: false,
            user: String::new(),
            account: None,
            waiting: None,
            permissions: PermissionCache::default(),
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
            broker,
        };
        conn.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: handshake::server_properties(),
                mechanisms: LongString::from(mechanisms),
                locales: LongString::from("en_US"),
            })),
        );
        conn
    }

    /// What the connection waits for before it reads on, if anything.
    pub(crate) fn take_wait(&mut self) -> Option<Wait> {
        self.waiting.take()
    }

    fn send(&self, channel: u16, class: AMQPClass) {
        self.outbox.write(|buf| encode::method(buf, channel, &class));
    }

    fn send_get_ok(&self, channel: u16, got: &warren_core::vhost::GetResult) {
        let frame_max = self.outbox.frame_max();
        let message = &got.message;
        self.outbox.write(|buf| {
            encode::basic_get_ok(
                buf,
                channel,
                got.delivery_tag,
                got.redelivered,
                message.exchange(),
                message.routing_key(),
                got.message_count,
            );
            encode::content(buf, channel, message.properties(), message.body(), frame_max);
        });
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
                if self.waiting.is_some() {
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

    fn forget_channel(&mut self, number: u16) {
        if let Some(channel) = self.channels.remove(&number) {
            self.outbox.sub_unconfirmed(channel.confirms.pending());
            if self.account.is_some() {
                self.broker.close_channel(&self.user);
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
}
