//! Channel methods: channel, exchange, queue, basic (other than the
//! content of a publish), confirm and tx.

use std::sync::Arc;

use bytes::Bytes;
use warren_codec::method::Method;
use warren_codec::reply::{AmqpError, ReplyCode};
use warren_codec::spec::{self, basic, channel, confirm, exchange, queue, tx, AMQPClass};
use warren_core::vhost::REPLY_TO_QUEUE;
use warren_core::{Consume, ExchangeDeclare, Message, QueueDeclare};
use warren_storage::StorageError;

use super::content::str_of;
use super::{access_refused, not_stored, short, ChannelProto, Connection, DeferredReply, Wait};
use crate::access::{Permission, Resource};
use crate::session::Session;

pub(super) enum TxOp {
    Publish { exchange: Bytes, message: Message, mandatory: bool, extra_keys: Vec<Vec<u8>> },
    Ack { delivery_tag: u64, multiple: bool },
    Nack { delivery_tag: u64, multiple: bool, requeue: bool },
}

impl Connection {
    pub(super) fn handle_channel_method(
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

    pub(super) fn queue_name(&self, number: u16, given: &str) -> Result<String, AmqpError> {
        if !given.is_empty() {
            return Ok(given.to_string());
        }
        match self.channels.get(&number).map(|c| c.last_queue.as_str()) {
            Some(last) if !last.is_empty() => Ok(last.to_string()),
            _ => Err(AmqpError::soft(ReplyCode::NotFound, "no previously declared queue", 0, 0)),
        }
    }

    pub(super) fn handle_other(
        &mut self,
        number: u16,
        class: AMQPClass,
        state: &mut Session<'_>,
    ) -> Result<(), AmqpError> {
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
                ch.confirms.enabled = true;
                state.set_channel_mode(self.key(number), true, false);
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
    /// their log entry is durable, and in a cluster once the metadata group
    /// committed what every node must know (the connection reads nothing
    /// more meanwhile, so replies stay in order); a store or a cluster that
    /// cannot take the change closes the connection with 541.
    pub(super) fn reply_stored(
        &mut self,
        number: u16,
        reply: AMQPClass,
        nowait: bool,
        state: &mut Session<'_>,
    ) -> Result<(), AmqpError> {
        self.reply_stored_after(number, reply, nowait, state, None)
    }

    /// [`Self::reply_stored`], also after ticket `also` (a classic queue's
    /// placement in the cluster).
    pub(super) fn reply_stored_after(
        &mut self,
        number: u16,
        reply: AMQPClass,
        nowait: bool,
        state: &mut Session<'_>,
        also: Option<u64>,
    ) -> Result<(), AmqpError> {
        let appended = state.flush_indices().map_err(|_| not_stored())?;
        if nowait {
            return Ok(());
        }
        let index = appended.definitions.filter(|&index| index > self.store.durable_index());
        let ticket = match (appended.replicated, also) {
            (Some(a), Some(b)) => Some(self.broker.tickets.join(a, b)),
            (a, b) => a.or(b),
        };
        if index.is_none() && ticket.is_none() {
            self.send(number, reply);
        } else {
            let index = index.unwrap_or(0);
            self.waiting = Some(Wait::Durable(DeferredReply { index, ticket, channel: number, reply }));
        }
        Ok(())
    }

    pub(super) fn send_deferred(&mut self, deferred: DeferredReply, stored: Result<(), StorageError>) {
        match stored {
            Ok(()) => self.send(deferred.channel, deferred.reply),
            Err(_) => self.close_connection(not_stored()),
        }
    }

    pub(super) fn handle_exchange(
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
                let sharing = if d.passive { None } else { self.share_exchange(name, state) };
                let reply = AMQPClass::Exchange(M::DeclareOk(exchange::DeclareOk {}));
                self.reply_stored_after(number, reply, d.nowait, state, sharing)?;
            }
            M::Delete(d) => {
                self.allow(Permission::Configure, Resource::Exchange, d.exchange.as_str())?;
                let shared = self.shared_transient_exchange(d.exchange.as_str(), state);
                state.delete_exchange(d.exchange.as_str(), d.if_unused)?;
                let sharing = if shared { self.unshare_exchange(d.exchange.as_str(), state) } else { None };
                let reply = AMQPClass::Exchange(M::DeleteOk(exchange::DeleteOk {}));
                self.reply_stored_after(number, reply, d.nowait, state, sharing)?;
            }
            M::Bind(b) => {
                let (destination, source, key) = (b.destination.as_str(), b.source.as_str(), b.routing_key.as_str());
                self.allow(Permission::Write, Resource::Exchange, destination)?;
                self.allow(Permission::Read, Resource::Exchange, source)?;
                self.allow_topic(Permission::Read, source, key, state)?;
                state.bind_exchange(destination, source, key, b.arguments.clone(), true)?;
                let sharing = self.share_binding((source, destination, false), key, &b.arguments, true, state);
                let reply = AMQPClass::Exchange(M::BindOk(exchange::BindOk {}));
                self.reply_stored_after(number, reply, b.nowait, state, sharing)?;
            }
            M::Unbind(b) => {
                let (destination, source, key) = (b.destination.as_str(), b.source.as_str(), b.routing_key.as_str());
                self.allow(Permission::Write, Resource::Exchange, destination)?;
                self.allow(Permission::Read, Resource::Exchange, source)?;
                self.allow_topic(Permission::Read, source, key, state)?;
                state.bind_exchange(destination, source, key, b.arguments.clone(), false)?;
                let sharing = self.share_binding((source, destination, false), key, &b.arguments, false, state);
                let reply = AMQPClass::Exchange(M::UnbindOk(exchange::UnbindOk {}));
                self.reply_stored_after(number, reply, b.nowait, state, sharing)?;
            }
            _ => {
                return Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected exchange method from client", 0, 0));
            }
        }
        Ok(())
    }

    pub(super) fn handle_queue(
        &mut self,
        number: u16,
        m: queue::AMQPMethod,
        state: &mut Session<'_>,
    ) -> Result<(), AmqpError> {
        use queue::AMQPMethod as M;
        let conn = self.id;
        match m {
            M::Declare(d) => {
                if self.broker.replication.get().is_some() && self.quorum_declare(number, &d, state)? {
                    return Ok(());
                }
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
                let placing = if d.passive { None } else { self.place_classic(&declared.name, state) };
                self.reply_stored_after(number, AMQPClass::Queue(M::DeclareOk(ok)), d.nowait, state, placing)?;
            }
            M::Bind(b) => {
                let name = self.queue_name(number, b.queue.as_str())?;
                self.allow_bind(&name, b.exchange.as_str(), b.routing_key.as_str(), state)?;
                let (exchange, key) = (b.exchange.as_str(), b.routing_key.as_str());
                state.bind_queue(conn, &name, exchange, key, b.arguments.clone(), true)?;
                let sharing = self.share_binding((exchange, &name, true), key, &b.arguments, true, state);
                let reply = AMQPClass::Queue(M::BindOk(queue::BindOk {}));
                self.reply_stored_after(number, reply, b.nowait, state, sharing)?;
            }
            M::Unbind(b) => {
                let name = self.queue_name(number, b.queue.as_str())?;
                self.allow_bind(&name, b.exchange.as_str(), b.routing_key.as_str(), state)?;
                let (exchange, key) = (b.exchange.as_str(), b.routing_key.as_str());
                state.bind_queue(conn, &name, exchange, key, b.arguments.clone(), false)?;
                let sharing = self.share_binding((exchange, &name, true), key, &b.arguments, false, state);
                let reply = AMQPClass::Queue(M::UnbindOk(queue::UnbindOk {}));
                self.reply_stored_after(number, reply, false, state, sharing)?;
            }
            M::Purge(p) => {
                let name = self.queue_name(number, p.queue.as_str())?;
                self.allow(Permission::Read, Resource::Queue, &name)?;
                if state.is_remote(&name) {
                    self.remote_purge(number, name, p.nowait);
                    return Ok(());
                }
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
                if self.remote_delete(number, &name, (d.if_unused, d.if_empty, d.nowait), state) {
                    return Ok(());
                }
                let message_count = state.delete_queue(conn, &name, d.if_unused, d.if_empty)?;
                let unplacing = self.broker.replication.get().and_then(|r| r.unplace_classic(&state.name, &name));
                self.reply_stored_after(
                    number,
                    AMQPClass::Queue(M::DeleteOk(queue::DeleteOk { message_count })),
                    d.nowait,
                    state,
                    unplacing,
                )?;
            }
            _ => return Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected queue method from client", 0, 0)),
        }
        Ok(())
    }

    pub(super) fn handle_basic(
        &mut self,
        number: u16,
        m: basic::AMQPMethod,
        state: &mut Session<'_>,
    ) -> Result<(), AmqpError> {
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
                if state.is_remote(&name) {
                    self.relayed_consume(number, tag, c.nowait);
                    return Ok(());
                }
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
                if self.remote_get(number, &name, g.no_ack, state) {
                    return Ok(());
                }
                match state.get(key, &name, g.no_ack)? {
                    Some(got) => self.send_get_ok(number, &got),
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
                state.recover(key)?;
                self.send(number, AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})));
                Ok(())
            }
            basic::AMQPMethod::RecoverAsync(_) => {
                state.recover(key)?;
                Ok(())
            }
            basic::AMQPMethod::Qos(_) | basic::AMQPMethod::Publish(_) => Ok(()),
            _ => Err(AmqpError::hard(ReplyCode::CommandInvalid, "unexpected basic method from client", 0, 0)),
        }
    }

    pub(super) fn settle(
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

    pub(super) fn handle_tx(
        &mut self,
        number: u16,
        m: tx::AMQPMethod,
        state: &mut Session<'_>,
    ) -> Result<(), AmqpError> {
        let key = self.key(number);
        let Some(ch) = self.channels.get_mut(&number) else {
            return Ok(());
        };
        match m {
            tx::AMQPMethod::Select(_) => {
                if ch.confirms.enabled {
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
                state.set_channel_mode(key, false, true);
                self.send(number, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(ops) = ch.tx.replace(Vec::new()) else {
                    return Err(AmqpError::soft(ReplyCode::PreconditionFailed, "channel is not transactional", 0, 0));
                };
                let mut waits_for = None;
                // What quorum queues and streams must commit first.
                let tickets = self.broker.tickets.clone();
                let mut ticket = 0;
                for op in ops {
                    match op {
                        TxOp::Publish { exchange, message, mandatory, extra_keys } => {
                            let exchange = str_of(&exchange)?;
                            let stored =
                                self.route(number, exchange, Arc::new(message), mandatory, &extra_keys, state)?;
                            let (index, replicated) = stored.map_err(|()| not_stored())?;
                            waits_for = waits_for.max(index);
                            ticket = tickets.join(ticket, replicated.unwrap_or(0));
                        }
                        TxOp::Ack { delivery_tag, multiple } => state.ack(key, delivery_tag, multiple)?,
                        TxOp::Nack { delivery_tag, multiple, requeue } => {
                            state.nack(key, delivery_tag, multiple, requeue)?
                        }
                    }
                }
                // Persistent messages into durable queues are fsynced before
                // commit-ok, as RabbitMQ promises (one group-committed fsync
                // per commit), and those into quorum queues or streams
                // committed there; a store that cannot take them closes
                // with 541.
                // Those into quorum queues or streams, once committed there.
                let appended = state.flush_indices().map_err(|_| not_stored())?;
                let ticket = tickets.join(ticket, appended.replicated.unwrap_or(0));
                let reply = AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {}));
                let index = waits_for.max(appended.published).filter(|&index| index > self.store.durable_index());
                let ticket = (ticket != 0).then_some(ticket);
                if index.is_none() && ticket.is_none() {
                    self.send(number, reply);
                } else {
                    let index = index.unwrap_or(0);
                    self.waiting = Some(Wait::Durable(DeferredReply { index, ticket, channel: number, reply }));
                }
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
}
