//! `queue.declare` of quorum queues in a cluster: a new one is placed
//! through the metadata group (the connection waits, reading nothing
//! further, as for a durable definition), and a passive declare finds a
//! quorum queue led from another node; a consumer of such a queue is
//! confirmed once the queue's leader accepted it.

use warren_codec::reply::AmqpError;
use warren_codec::spec::{basic, queue, AMQPClass};
use warren_codec::types::FieldTable;
use warren_core::settings::QueueType;
use warren_core::vhost::{BindingDefinition, ExchangeDefinition};
use warren_core::QueueDeclare;

use super::{
    access_refused, short, Connection, PassiveDeclare, QuorumDeclare, RelayedConsume, RemoteDelete, RemoteGet,
    RemotePurge, Wait,
};
use crate::access::{Permission, Resource};
use crate::quorum::placements::Definition;
use crate::quorum::RelayedGot;
use crate::session::Session;
use warren_core::vhost::Outcome;

impl Connection {
    /// Handles the declaration here if it is a quorum queue's that the
    /// local virtual host cannot answer alone; false to go on as usual.
    pub(super) fn quorum_declare(
        &mut self,
        number: u16,
        d: &queue::Declare,
        state: &mut Session<'_>,
    ) -> Result<bool, AmqpError> {
        let Some(replication) = self.broker.replication.get().cloned() else { return Ok(false) };
        let name = d.queue.as_str();
        // A stand-in (the queue is led elsewhere) answers a passive
        // declare from this node's replica, as a missing queue does.
        if name.is_empty() || (state.has_queue(name) && !(d.passive && state.is_remote(name))) {
            return Ok(false);
        }
        // Refused here, as its own node refuses it to other connections.
        if state.is_exclusive_elsewhere(name) {
            return Ok(false);
        }
        if d.passive {
            let Some(known) = replication.placed(&state.name, name) else { return Ok(false) };
            // The counts are the leader's (a replica does not know which
            // messages are out with consumers, nor the consumers).
            let declare = PassiveDeclare { channel: number, name: name.to_string(), nowait: d.nowait, known };
            self.waiting = Some(Wait::Counts(declare));
            return Ok(true);
        }
        let declare = QueueDeclare {
            name,
            passive: false,
            durable: d.durable,
            exclusive: d.exclusive,
            auto_delete: d.auto_delete,
            arguments: d.arguments.clone(),
        };
        if QueueType::from_arguments(&declare.arguments) != Ok(QueueType::Quorum) {
            return Ok(false);
        }
        self.current_permissions().check(Permission::Configure, Resource::Queue, name).map_err(access_refused)?;
        state.check_new_queue(&declare)?;
        self.waiting = Some(Wait::Quorum(QuorumDeclare {
            channel: number,
            name: name.to_string(),
            arguments: declare.arguments,
            nowait: d.nowait,
        }));
        Ok(true)
    }

    /// In a cluster, a classic queue declared here that the other nodes do
    /// not know yet is placed (they put up stand-ins): the ticket its
    /// `declare-ok` waits for.
    pub(super) fn place_classic(&self, name: &str, state: &Session<'_>) -> Option<u64> {
        let replication = self.broker.replication.get()?;
        let queue = state.shareable(name)?;
        replication.place_classic(&state.name, name, crate::quorum::placements::Classic::of(&queue), &queue.arguments)
    }

    /// In a cluster, a non-durable exchange declared here that the other
    /// nodes do not know yet is declared on them too (the journal carries
    /// durable ones): the ticket the reply waits for.
    pub(super) fn share_exchange(&self, name: &str, state: &Session<'_>) -> Option<u64> {
        let replication = self.broker.replication.get()?;
        let x = state.exchange(name).filter(|x| !x.durable)?;
        if replication.shares_exchange(&state.name, name) {
            return None;
        }
        let definition = ExchangeDefinition {
            name: name.to_string(),
            kind: x.type_name().to_string(),
            auto_delete: x.auto_delete,
            internal: x.internal,
            arguments: x.arguments.clone(),
        };
        replication.share_transient(&state.name, vec![Definition::TransientExchange(definition)])
    }

    /// Whether deleting exchange `name` here must be told to every node:
    /// a non-durable one they know (the journal carries durable ones).
    pub(super) fn shared_transient_exchange(&self, name: &str, state: &Session<'_>) -> bool {
        let Some(replication) = self.broker.replication.get() else { return false };
        state.exchange(name).is_some_and(|x| !x.durable) && replication.shares_exchange(&state.name, name)
    }

    /// Tells every node that non-durable exchange `name` was deleted.
    pub(super) fn unshare_exchange(&self, name: &str, state: &Session<'_>) -> Option<u64> {
        let replication = self.broker.replication.get()?;
        replication.share_transient(&state.name, vec![Definition::ExchangeDeleted(name.to_string())])
    }

    /// In a cluster, a binding made or removed here that the journal does
    /// not carry (an end is not durable) but whose ends every node may know
    /// (a placed queue, an exchange) is made there too (a node without
    /// them skips it): the ticket the reply waits for.
    pub(super) fn share_binding(
        &self,
        (source, destination, destination_is_queue): (&str, &str, bool),
        routing_key: &str,
        arguments: &FieldTable,
        bind: bool,
        state: &Session<'_>,
    ) -> Option<u64> {
        let replication = self.broker.replication.get()?;
        let vhost = &state.name;
        let durable_exchange = |name: &str| state.exchange(name).is_some_and(|x| x.durable);
        // Shared when declared (its commit may not be applied here yet).
        let known_exchange = |name: &str| state.exchange(name).is_some() || replication.shares_exchange(vhost, name);
        // Journaled bindings are shared from the journal.
        let (stored, known) = if destination_is_queue {
            // A queue declared here is placed, or about to be (the
            // binding is written after its placement).
            let placed = state.shareable(destination).is_some() || replication.shares_queue(vhost, destination);
            (durable_exchange(source) && state.is_stored_queue(destination), placed)
        } else {
            (durable_exchange(source) && durable_exchange(destination), known_exchange(destination))
        };
        if stored || !known || !known_exchange(source) {
            return None;
        }
        let binding = BindingDefinition {
            source: source.to_string(),
            destination: destination.to_string(),
            destination_is_queue,
            routing_key: routing_key.to_string(),
            arguments: arguments.clone(),
        };
        let change = if bind { Definition::Bound(binding) } else { Definition::Unbound(binding) };
        replication.share_transient(vhost, vec![change])
    }

    /// Answers a quorum queue's declaration once it is placed: from the
    /// queue here if this node leads it, else as placed elsewhere.
    pub(crate) fn finish_quorum_declare(&mut self, declare: QuorumDeclare, placed: Result<(), AmqpError>) {
        let QuorumDeclare { channel, name, nowait, .. } = declare;
        let Some(vhost) = self.vhost.clone() else { return };
        let store = self.store.clone();
        let mut session = Session::open(&vhost, &store);
        if let Err(error) = placed {
            self.channel_error(channel, error.at(50, 10), Some(&mut session));
            return;
        }
        let passive = QueueDeclare { passive: true, ..QueueDeclare::named(&name) };
        let (message_count, consumer_count) = match session.declare_queue(self.id, passive) {
            Ok(declared) => (declared.message_count, declared.consumer_count),
            Err(_) => (0, 0),
        };
        drop(session);
        self.answer_declare(channel, &name, (message_count, consumer_count), nowait);
    }

    /// A consumer of a stand-in: registered here, and answered once the
    /// leader accepted it.
    pub(super) fn relayed_consume(&mut self, channel: u16, tag: String, nowait: bool) {
        self.waiting = Some(Wait::Relay(RelayedConsume { channel, tag, nowait }));
    }

    /// Answers a consumer of a stand-in: `consume-ok`, or the leader's
    /// refusal (the consumer is cancelled here).
    pub(crate) fn finish_relayed_consume(&mut self, consume: &RelayedConsume, accepted: Result<(), AmqpError>) {
        let RelayedConsume { channel, tag, nowait } = consume;
        match accepted {
            Ok(()) => {
                if !nowait {
                    let ok = basic::ConsumeOk { consumer_tag: short(tag) };
                    self.send(*channel, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)));
                }
                // After the answer: were the queue taken over meanwhile,
                // this node's deliveries to it waited for it.
                let Some(vhost) = self.vhost.clone() else { return };
                let store = self.store.clone();
                Session::open(&vhost, &store).consumer_answered(self.key(*channel), tag);
            }
            Err(error) => {
                let Some(vhost) = self.vhost.clone() else { return };
                let store = self.store.clone();
                let mut session = Session::open(&vhost, &store);
                session.cancel(self.key(*channel), tag);
                self.channel_error(*channel, error, Some(&mut session));
            }
        }
    }

    /// A `basic.get` on the stand-in of a classic queue of another node:
    /// the home node hands the message over (a quorum queue's stand-in
    /// refuses it in the core). True if it is to wait for that.
    pub(super) fn remote_get(&mut self, channel: u16, name: &str, no_ack: bool, state: &Session<'_>) -> bool {
        let Some(replication) = self.broker.replication.get() else { return false };
        if !state.is_remote(name) || state.is_exclusive_elsewhere(name) || !replication.is_classic(&state.name, name) {
            return false;
        }
        self.waiting = Some(Wait::Get(RemoteGet { channel, name: name.to_string(), no_ack }));
        true
    }

    /// Answers a `basic.get` made on the queue's home node: `get-ok` under
    /// this channel's tag, `get-empty`, or why not.
    pub(crate) fn finish_remote_get(&mut self, get: &RemoteGet, got: Result<Option<RelayedGot>, AmqpError>) {
        let Some(vhost) = self.vhost.clone() else { return };
        let store = self.store.clone();
        let mut session = Session::open(&vhost, &store);
        match got {
            Ok(Some(got)) => {
                let key = self.key(get.channel);
                let upstream = (got.upstream, got.redelivered, get.no_ack);
                let message = std::sync::Arc::new(got.message);
                match session.deliver_got(key, &get.name, upstream, message, got.message_count) {
                    Some(delivered) => self.send_get_ok(get.channel, &delivered),
                    // The channel closed meanwhile: the home node takes it back.
                    None if !get.no_ack => {
                        if let Some(replication) = self.broker.replication.get() {
                            replication.settle_got(&session.name, &get.name, got.upstream, Outcome::Requeue);
                        }
                    }
                    None => {}
                }
            }
            Ok(None) => self.send(get.channel, AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {}))),
            Err(error) => self.channel_error(get.channel, error.at(60, 70), Some(&mut session)),
        }
    }

    /// A `queue.delete` on the stand-in of a classic queue of another node:
    /// its home node deletes it (and checks `if-unused`, `if-empty`).
    /// True if it is to wait for that.
    pub(super) fn remote_delete(
        &mut self,
        channel: u16,
        name: &str,
        (if_unused, if_empty, nowait): (bool, bool, bool),
        state: &Session<'_>,
    ) -> bool {
        let Some(replication) = self.broker.replication.get() else { return false };
        if !state.is_remote(name) || state.is_exclusive_elsewhere(name) || !replication.is_classic(&state.name, name) {
            return false;
        }
        let name = name.to_string();
        self.waiting = Some(Wait::Delete(RemoteDelete { channel, name, if_unused, if_empty, nowait }));
        true
    }

    /// Answers a delete made on the queue's home node: `delete-ok` with
    /// the count it deleted, or why not.
    pub(crate) fn finish_remote_delete(&mut self, delete: &RemoteDelete, deleted: Result<u32, AmqpError>) {
        match deleted {
            Ok(message_count) if !delete.nowait => {
                let ok = queue::DeleteOk { message_count };
                self.send(delete.channel, AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok)));
            }
            Ok(_) => {}
            Err(error) => {
                let Some(vhost) = self.vhost.clone() else { return };
                let store = self.store.clone();
                let mut session = Session::open(&vhost, &store);
                self.channel_error(delete.channel, error.at(50, 40), Some(&mut session));
            }
        }
    }

    /// A purge of a stand-in: the queue's own node purges it.
    pub(super) fn remote_purge(&mut self, channel: u16, name: String, nowait: bool) {
        self.waiting = Some(Wait::Purge(RemotePurge { channel, name, nowait }));
    }

    /// Answers a purge made on the queue's node: `purge-ok` with its
    /// count, or why not.
    pub(crate) fn finish_remote_purge(&mut self, purge: RemotePurge, purged: Result<u32, AmqpError>) {
        let RemotePurge { channel, nowait, .. } = purge;
        match purged {
            Ok(message_count) if !nowait => {
                let ok = queue::PurgeOk { message_count };
                self.send(channel, AMQPClass::Queue(queue::AMQPMethod::PurgeOk(ok)));
            }
            Ok(_) => {}
            Err(error) => {
                let Some(vhost) = self.vhost.clone() else { return };
                let store = self.store.clone();
                let mut session = Session::open(&vhost, &store);
                self.channel_error(channel, error.at(50, 30), Some(&mut session));
            }
        }
    }

    /// Answers a passive declare of a quorum queue led elsewhere with its
    /// leader's counts, or what this node knows if none came.
    pub(crate) fn finish_passive_declare(&mut self, declare: PassiveDeclare, counts: Option<(u32, u32)>) {
        let PassiveDeclare { channel, name, nowait, known } = declare;
        self.answer_declare(channel, &name, counts.unwrap_or((known, 0)), nowait);
    }

    fn answer_declare(&mut self, number: u16, name: &str, (message_count, consumer_count): (u32, u32), nowait: bool) {
        if let Some(ch) = self.channels.get_mut(&number) {
            ch.last_queue = name.to_string();
        }
        if !nowait {
            let ok = queue::DeclareOk { queue: short(name), message_count, consumer_count };
            self.send(number, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)));
        }
    }
}
