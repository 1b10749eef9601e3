//! `queue.declare` of quorum queues in a cluster: a new one is placed
//! through the metadata group (the connection waits, reading nothing
//! further, as for a durable definition), and a passive declare finds a
//! quorum queue led from another node; a consumer of such a queue is
//! confirmed once the queue's leader accepted it.

use warren_codec::reply::AmqpError;
use warren_codec::spec::{basic, queue, AMQPClass};
use warren_core::settings::QueueType;
use warren_core::QueueDeclare;

use super::{access_refused, short, Connection, PassiveDeclare, QuorumDeclare, RelayedConsume, RemotePurge, Wait};
use crate::access::{Permission, Resource};
use crate::session::Session;

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
        let (durable, auto_delete, arguments) = state.shareable(name)?;
        let classic = crate::quorum::placements::Classic { durable, auto_delete };
        replication.place_classic(&state.name, name, classic, &arguments)
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
