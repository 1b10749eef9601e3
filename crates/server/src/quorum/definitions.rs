//! Exchanges and bindings known on every node of a cluster, as RabbitMQ's
//! metadata store keeps them: a client on any node publishes through an
//! exchange declared on another, into the quorum queues bound there.
//!
//! A change is made in the virtual host of the node that got it first, as
//! on one node; what it journals (a durable exchange declared or deleted,
//! a binding between exchanges or to a quorum queue) also goes to the
//! metadata group, and the reply waits until it is committed there. Every
//! other node applies the committed change to its own virtual host. The
//! node that made it skips its own run's changes; after a restart its
//! earlier runs' changes are applied in log order like the others', so it
//! ends where the log ends.
//!
//! Users, virtual hosts, permissions, limits and policies (the access
//! file) are shared whole: a change made on one node (`warren ctl`, the
//! API) replaces the file on every other.
//!
//! Non-durable exchanges, and bindings with a non-durable end, are not in
//! the journal: the connection that made them shares them
//! ([`Replication::share_transient`]). A binding to a queue whose stand-in
//! is not up yet on a node is made when it is ([`Replication::bind_known`]).
//! Two nodes changing the same exchange at once in conflicting ways (one
//! declares it as a fanout while another declares it as a topic) can end
//! up disagreeing: each keeps its own and refuses the other's.

use std::cell::Cell;
use std::collections::BTreeMap;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};
use warren_core::vhost::{BindingDefinition, Definitions, ExchangeDefinition, JournalEvent};
use warren_core::ExchangeDeclare;
use warren_raft::metadata::METADATA;
use warren_raft::Node;

use super::placements::{Change, Definition};
use super::{Local, Replication, DECLARE_PATIENCE};
use crate::access::AccessDefinitions;
use crate::session::Session;

thread_local! {
    /// Set while this thread applies changes the metadata log holds: what
    /// that journals is not sent to the log again.
    static APPLYING: Cell<bool> = const { Cell::new(false) };
}

/// Marks the thread as applying replicated definitions until dropped.
pub(super) struct Applying(bool);

impl Applying {
    pub(super) fn enter() -> Applying {
        Applying(APPLYING.replace(true))
    }
}

impl Drop for Applying {
    fn drop(&mut self) {
        APPLYING.set(self.0);
    }
}

/// A metadata command and who waits for its commit.
pub(super) type Defining = (Vec<u8>, oneshot::Sender<bool>);

/// Changes written in one metadata command, at most.
const BATCH_CHANGES: usize = 256;

/// Writes definition changes to the metadata group in the order they were
/// made (a binding after the exchange it needs): those waiting while the
/// last write was under way go in one command (`Change::Batch`), so a
/// burst of declarations (a thousand clients connecting, each with a
/// queue) costs a few commits, not one each.
pub(super) async fn write_in_order(node: Node, mut changes: mpsc::UnboundedReceiver<Defining>) {
    while let Some(first) = changes.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH_CHANGES {
            match changes.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let command = if batch.len() == 1 {
            std::mem::take(&mut batch[0].0)
        } else {
            // Each command is a `Change` in JSON already.
            let mut command = b"{\"Batch\":[".to_vec();
            for (i, (change, _)) in batch.iter().enumerate() {
                if i > 0 {
                    command.push(b',');
                }
                command.extend_from_slice(change);
            }
            command.extend_from_slice(b"]}");
            command
        };
        let written = node.write_anywhere(METADATA, command, DECLARE_PATIENCE).await;
        if let Err(e) = &written {
            warn!(%e, changes = batch.len(), "a definition change was not replicated");
        }
        for (_, done) in batch {
            let _ = done.send(written.is_ok());
        }
    }
}

impl Replication {
    /// Shares this node's access file (users, virtual hosts, permissions,
    /// limits, policies) as it now is: every other node replaces its own
    /// with it. Concurrent changes on two nodes: the later in the log wins.
    pub(super) fn share_access(&self, definitions: AccessDefinitions) {
        let change = Change::Access { origin: self.origin, definitions: Box::new(definitions) };
        let Ok(command) = serde_json::to_vec(&change) else { return };
        let (done, _) = oneshot::channel();
        let _ = self.defining.send((command, done));
    }

    /// The access file another node (or an earlier run of this one)
    /// shared replaces this node's.
    pub(super) fn access_event(&self, origin: u64, definitions: AccessDefinitions) {
        if origin == self.origin {
            return;
        }
        let Some(broker) = self.broker.upgrade() else { return };
        tokio::task::spawn_blocking(move || {
            if let Err(error) = broker.adopt_access(definitions) {
                warn!(%error, "the cluster's access definitions could not be written here");
            }
        });
    }

    /// Sends the changes of `events` every node must know to the metadata
    /// group; the receiver says whether they were committed.
    pub(super) fn share_definitions(&self, vhost: &str, events: &[JournalEvent]) -> Option<oneshot::Receiver<bool>> {
        if APPLYING.get() {
            return None;
        }
        let quorum_queue = |name: &str| self.metadata.with(|p| p.get(vhost, name).is_some());
        let shared = |b: &BindingDefinition| !b.destination_is_queue || quorum_queue(&b.destination);
        let changes: Vec<Definition> = events
            .iter()
            .filter_map(|event| match event {
                JournalEvent::ExchangeDeclared(exchange) => Some(Definition::Exchange(exchange.clone())),
                JournalEvent::ExchangeDeleted { name } => Some(Definition::ExchangeDeleted(name.to_string())),
                JournalEvent::Bound(binding) if shared(binding) => Some(Definition::Bound(binding.clone())),
                JournalEvent::Unbound(binding) if shared(binding) => Some(Definition::Unbound(binding.clone())),
                _ => None,
            })
            .collect();
        if changes.is_empty() {
            return None;
        }
        let change = Change::Definitions { vhost: vhost.to_string(), origin: self.origin, changes };
        let (done, committed) = oneshot::channel();
        let Ok(command) = serde_json::to_vec(&change) else { return Some(failed()) };
        if self.defining.send((command, done)).is_err() {
            return Some(failed());
        }
        Some(committed)
    }

    /// Shares changes the journal does not carry (a non-durable exchange, a
    /// binding to a transient queue placed in the cluster) with every
    /// node; the ticket resolves once the metadata group committed them
    /// (or gave up: they hold here either way).
    pub fn share_transient(&self, vhost: &str, changes: Vec<Definition>) -> Option<u64> {
        if changes.is_empty() || APPLYING.get() {
            return None;
        }
        let change = Change::Definitions { vhost: vhost.to_string(), origin: self.origin, changes };
        let command = serde_json::to_vec(&change).ok()?;
        let (done, committed) = oneshot::channel();
        self.defining.send((command, done)).ok()?;
        self.ticket_for(committed, true)
    }

    /// Whether exchange `name` is known on every node.
    pub fn shares_exchange(&self, vhost: &str, name: &str) -> bool {
        self.metadata.with(|p| p.has_exchange(vhost, name))
    }

    /// Whether queue `name` is placed in the cluster (reachable from every
    /// node).
    pub fn shares_queue(&self, vhost: &str, name: &str) -> bool {
        self.metadata.with(|p| p.get(vhost, name).is_some())
    }

    /// Applies changes another node (or an earlier run of this one) made.
    pub(super) fn defined_event(&self, vhost: &str, origin: u64, changes: &[Definition]) {
        if origin == self.origin {
            return;
        }
        self.apply_definitions(vhost, changes);
    }

    /// A restored metadata snapshot: every exchange and binding it holds is
    /// made here (the log's later changes follow).
    pub(super) fn known_event(
        &self,
        known: BTreeMap<String, Definitions>,
        transient: BTreeMap<String, Vec<ExchangeDefinition>>,
    ) {
        for (vhost, exchanges) in transient {
            let changes: Vec<Definition> = exchanges.into_iter().map(Definition::TransientExchange).collect();
            self.apply_definitions(&vhost, &changes);
        }
        for (vhost, definitions) in known {
            let mut changes: Vec<Definition> = definitions.exchanges.into_iter().map(Definition::Exchange).collect();
            changes.extend(definitions.bindings.into_iter().map(Definition::Bound));
            self.apply_definitions(&vhost, &changes);
        }
    }

    fn apply_definitions(&self, vhost: &str, changes: &[Definition]) {
        let Some(broker) = self.broker.upgrade() else { return };
        let Some(host) = broker.vhost(vhost) else {
            warn!(%vhost, "replicated definitions of a virtual host this node does not have are ignored");
            return;
        };
        let _applying = Applying::enter();
        let mut session = Session::open(&host, &broker.store);
        for change in changes {
            let applied = match change {
                Definition::Exchange(x) | Definition::TransientExchange(x) => {
                    session.declare_exchange(ExchangeDeclare {
                        name: &x.name,
                        kind: &x.kind,
                        passive: false,
                        durable: matches!(change, Definition::Exchange(_)),
                        auto_delete: x.auto_delete,
                        internal: x.internal,
                        arguments: x.arguments.clone(),
                    })
                }
                Definition::ExchangeDeleted(name) => session.delete_exchange(name, false),
                Definition::Bound(binding) => bind(&mut session, binding, true),
                Definition::Unbound(binding) => bind(&mut session, binding, false),
            };
            // A binding to a quorum queue not up here yet is made when it is.
            if let Err(error) = applied {
                debug!(%vhost, ?change, %error, "a replicated definition change was not applied here");
            }
        }
    }

    /// Makes the replicated bindings to a quorum queue that has just
    /// appeared in `session`'s virtual host (its stand-in, or the queue
    /// itself). The caller holds an [`Applying`].
    pub(super) fn bind_known(&self, session: &mut Session<'_>, local: &Local) {
        for binding in self.metadata.with(|p| p.bindings_to(&local.vhost, &local.name)) {
            if let Err(error) = bind(session, &binding, true) {
                debug!(queue = %local.name, exchange = %binding.source, %error, "a replicated binding was not made here");
            }
        }
    }
}

fn bind(session: &mut Session<'_>, b: &BindingDefinition, bind: bool) -> Result<(), warren_codec::reply::AmqpError> {
    if b.destination_is_queue {
        // A stand-in of an exclusive queue is bound as its owner would.
        let owner = if session.is_exclusive_elsewhere(&b.destination) { warren_core::vhost::ELSEWHERE } else { 0 };
        session.bind_queue(owner, &b.destination, &b.source, &b.routing_key, b.arguments.clone(), bind)
    } else {
        session.bind_exchange(&b.destination, &b.source, &b.routing_key, b.arguments.clone(), bind)
    }
}

fn failed() -> oneshot::Receiver<bool> {
    let (done, committed) = oneshot::channel();
    let _ = done.send(false);
    committed
}
