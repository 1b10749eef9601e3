//! Quorum queues in a cluster: each is a Raft group (`warren-raft`) whose
//! members hold a replica of its messages; the metadata group says where
//! each queue is placed.
//!
//! The queue runs on its leader's node as a queue of the virtual host
//! like any other (`warren_core::vhost::replicated`), and what it
//! journals (a message in, settled, returned) goes to its group instead
//! of the local store ([`Replication`] is the store's
//! [`crate::store::Replicator`]). A publisher confirm waits until those
//! commands are committed, that is fsynced on a majority of the members
//! (`store::tickets`). When leadership moves, the old leader's node drops the
//! queue and the new leader's node rebuilds it from its replica
//! ([`replica`]); what was delivered and not acknowledged is delivered
//! again, marked redelivered. The other members hold a stand-in that
//! forwards publishes to the leader (`forward.rs`), and whose consumers
//! the leader serves (`relay.rs`). When leadership moves, consumers stay:
//! the old leader's node keeps its queue as a stand-in and subscribes them
//! at the new leader; the new leader's node serves its own from the queue
//! it rebuilt.
//!
//! Durable exchanges and the bindings to quorum queues are known on every
//! node (`definitions.rs`).
//!
//! Classic queues, exclusive ones too, are reachable from every node the
//! same way (`classic.rs`): the metadata group places each on the node that
//! declared it (its home, which is its fixed "leader"), the other nodes
//! hold stand-ins, publishes through them are forwarded to the home node
//! and confirmed once stored there, and their consumers are relayed.

mod classic;
mod definitions;
mod forward;
mod kept;
pub mod placements;
mod relay;
pub mod replica;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::RwLock;
use tokio::sync::mpsc;
use tracing::{info, warn};
use warren_codec::reply::{AmqpError, ReplyCode};
use warren_codec::types::FieldTable;
use warren_core::vhost::JournalEvent;
use warren_raft::metadata::METADATA;
use warren_raft::{GroupId, Machine, Node, Submission};

use crate::broker::Broker;
use crate::session::Session;
use placements::{Change, Classic, Event, Placement, Placements};
use replica::QueueReplica;

/// How long a quorum queue's declaration may take (the metadata write,
/// then its group's first election).
const DECLARE_PATIENCE: Duration = Duration::from_secs(10);
/// How long a publish's commands may wait for their commit before the
/// publish is nacked (a leader cut off from its majority).
const COMMIT_PATIENCE: Duration = Duration::from_secs(30);
/// How often leaderships are looked at.
const WATCH_EVERY: Duration = Duration::from_millis(20);
/// How often a node that is not a member of a quorum queue asks the
/// members who leads it.
const LEADER_ASK_EVERY: Duration = Duration::from_secs(1);
/// Body bytes per command forwarding publishes to a leader, about.
const FORWARD_BATCH_BYTES: usize = 4 << 20;

/// A quorum queue this node holds a replica of.
struct Local {
    vhost: String,
    name: String,
    group: GroupId,
    arguments: FieldTable,
    /// Its replica; none on a node that is not a member (which holds only
    /// a stand-in, and learns who leads from the members).
    machine: Option<Machine<QueueReplica>>,
    /// Asking the members who leads is under way (not a member).
    asking: AtomicBool,
    /// When the members were last asked who leads (not a member).
    asked: parking_lot::Mutex<Option<std::time::Instant>>,
    /// The next key for a message (leader only).
    next_key: AtomicU64,
    /// The queue runs in this node's virtual host (this node leads).
    active: AtomicBool,
    /// A takeover is under way.
    activating: AtomicBool,
    /// Its leader here is changing the group's members to the placement's.
    reconciling: AtomicBool,
    /// Dropping the replica here is under way (no longer a member).
    leaving: AtomicBool,
    /// While this node leads: the log index its queue was rebuilt from
    /// (forwarded messages up to it were in the replica then), and the term
    /// it leads in. Taking up and taking in forwarded messages hold it, so
    /// none is missed or taken twice.
    restored: parking_lot::Mutex<Option<(u64, u64)>>,
    /// A stand-in for the queue is in this node's virtual host (another
    /// node leads): publishes to it are forwarded.
    stand_in: AtomicBool,
    /// Messages published here waiting to be forwarded to the leader.
    forwarding: parking_lot::Mutex<Forwarding>,
    /// Putting its stand-in up here was refused (and said so).
    refused: AtomicBool,
    /// A classic queue: the node it lives on (always its "leader"), and
    /// what its stand-ins answer declarations with.
    home: Option<(String, Classic)>,
}

impl Local {
    fn new(placement: &Placement, machine: Option<Machine<QueueReplica>>, stand_in: bool) -> Arc<Local> {
        Arc::new(Local {
            vhost: placement.vhost.clone(),
            name: placement.name.clone(),
            group: placement.group,
            arguments: placement.arguments.clone(),
            machine,
            asking: AtomicBool::new(false),
            asked: parking_lot::Mutex::new(None),
            next_key: AtomicU64::new(1),
            active: AtomicBool::new(false),
            activating: AtomicBool::new(false),
            reconciling: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            restored: parking_lot::Mutex::new(None),
            stand_in: AtomicBool::new(stand_in),
            forwarding: parking_lot::Mutex::default(),
            refused: AtomicBool::new(false),
            home: placement.home().zip(placement.classic).map(|(home, classic)| (home.to_string(), classic)),
        })
    }
}

/// Publishes through a node that does not lead the queue, sent to the
/// leader in order, a batch at a time.
#[derive(Default)]
struct Forwarding {
    waiting: Vec<(Arc<warren_core::Message>, tokio::sync::oneshot::Sender<bool>)>,
    sending: bool,
    /// The last batch's number.
    batches: u64,
}

/// A number this run of the node has and no earlier one had: forwarded
/// batches and relay subscriptions are told apart by it.
fn run_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| (d.as_secs() << 30) ^ u64::from(d.subsec_nanos()))
}

/// What a `basic.get` through a stand-in got from the queue's home node.
pub struct RelayedGot {
    /// Its delivery tag there.
    pub upstream: u64,
    pub redelivered: bool,
    pub message_count: u32,
    pub message: warren_core::Message,
}

/// A quorum queue as one node sees it.
pub struct QuorumStatus {
    pub placement: Placement,
    /// The node answering.
    pub node: String,
    /// Its group here, if this node holds a replica.
    pub group: Option<warren_raft::GroupStatus>,
    /// Messages in this node's replica.
    pub messages: Option<usize>,
}

pub struct Replication {
    node: Node,
    members: warren_cluster::Members,
    metadata: Machine<Placements>,
    broker: Weak<Broker>,
    /// vhost -> queue -> the replica here.
    queues: RwLock<HashMap<String, HashMap<String, Arc<Local>>>>,
    /// Forwarded messages applied by the replicas here.
    applied: mpsc::UnboundedSender<(GroupId, replica::Applied)>,
    /// Consumers through stand-ins, here and served from here.
    relays: relay::Relays,
    /// Names this node's run in the batches it forwards.
    origin: u64,
    /// Its leader here is taking forgotten nodes out of the metadata group.
    forgetting: AtomicBool,
    /// Definition changes made here, on their way to the metadata group.
    defining: mpsc::UnboundedSender<definitions::Defining>,
    /// Classic queues here whose placement is being written.
    placing: parking_lot::Mutex<std::collections::HashSet<(String, String)>>,
    /// When this node last matched its classic queues with their placements.
    swept: parking_lot::Mutex<Option<std::time::Instant>>,
    /// Itself, for the tasks it starts.
    me: Weak<Replication>,
}

impl Replication {
    /// Starts the metadata group with the quorum queues' placements and
    /// the task that follows them (groups to start, leaderships to take
    /// up or give up).
    pub async fn start(
        broker: &Arc<Broker>,
        node: Node,
        members: warren_cluster::Members,
    ) -> Result<Arc<Replication>, warren_raft::NodeError> {
        let (events, received) = mpsc::unbounded_channel();
        let (applied, applied_received) = mpsc::unbounded_channel();
        let metadata = warren_raft::metadata::start(&node, members.clone(), Placements::new(events)).await?;
        // Two nodes started in the same nanosecond still differ.
        let origin = node.name().bytes().fold(run_seed(), |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3));
        let (defining, to_define) = mpsc::unbounded_channel();
        tokio::spawn(definitions::write_in_order(node.clone(), to_define));
        let replication = Arc::new_cyclic(|me| Replication {
            node,
            members,
            metadata,
            broker: Arc::downgrade(broker),
            queues: RwLock::default(),
            applied,
            relays: relay::Relays::new(run_seed()),
            origin,
            forgetting: AtomicBool::new(false),
            defining,
            placing: parking_lot::Mutex::default(),
            swept: parking_lot::Mutex::new(None),
            me: me.clone(),
        });
        replication.node.serve_also(Arc::new(relay::RelayHandler(Arc::downgrade(&replication))));
        broker.store.set_replicator(replication.clone());
        let sharing = Arc::downgrade(&replication);
        broker.share_access(Box::new(move |definitions| {
            if let Some(replication) = sharing.upgrade() {
                replication.share_access(definitions);
            }
        }));
        tokio::spawn(run(Arc::downgrade(&replication), received, applied_received));
        Ok(replication)
    }

    fn local(&self, vhost: &str, name: &str) -> Option<Arc<Local>> {
        self.queues.read().get(vhost).and_then(|queues| queues.get(name)).cloned()
    }

    /// A ticket resolved once `committed` answers: with its outcome, or
    /// (`done_anyway`) as done whatever it was (the change holds here either
    /// way and is written again later).
    fn ticket_for(&self, committed: tokio::sync::oneshot::Receiver<bool>, done_anyway: bool) -> Option<u64> {
        let broker = self.broker.upgrade()?;
        let ticket = broker.tickets.issue();
        let tickets = Arc::downgrade(&broker);
        tokio::spawn(async move {
            let ok = committed.await.unwrap_or(false) || done_anyway;
            if let Some(broker) = tickets.upgrade() {
                broker.tickets.resolve(ticket, ok);
            }
        });
        Some(ticket)
    }

    /// The node a queue's publishes and consumers go to: a classic queue's
    /// home, or the quorum queue's leader as last known.
    fn leader_of(&self, local: &Local) -> Option<String> {
        match &local.home {
            Some((home, _)) => Some(home.clone()),
            None => self.node.known_leader(local.group),
        }
    }

    /// Whether a quorum queue of this name is placed in the cluster, and
    /// its ready messages as this node's replica knows them.
    pub fn placed(&self, vhost: &str, name: &str) -> Option<u32> {
        self.metadata.with(|p| p.get(vhost, name).is_some()).then(|| {
            let count =
                self.local(vhost, name).and_then(|l| l.machine.as_ref().map(|m| m.with(|r| r.len()))).unwrap_or(0);
            u32::try_from(count).unwrap_or(u32::MAX)
        })
    }

    /// Where a quorum queue is placed and how its group stands as this node
    /// sees it (`warren ctl quorum_status`): its members' indices are known
    /// on the leader only.
    pub fn status(&self, vhost: &str, name: &str) -> Option<QuorumStatus> {
        let placement = self.metadata.with(|p| p.get(vhost, name).cloned())?;
        let group = self.node.status(placement.group);
        let messages = self.local(vhost, name).and_then(|l| l.machine.as_ref().map(|m| m.with(|r| r.len())));
        Some(QuorumStatus { placement, node: self.node.name().to_string(), group, messages })
    }

    /// Places a new quorum queue (replicas on this node and the next ones
    /// up, `x-quorum-initial-group-size` in all) and waits until it runs
    /// here or has a leader elsewhere. The declaration's arguments were
    /// checked by the caller.
    pub async fn declare(&self, vhost: &str, name: &str, arguments: &FieldTable) -> Result<(), AmqpError> {
        let unavailable = |why: String| {
            AmqpError::soft(
                ReplyCode::ResourceLocked,
                format!("RESOURCE_LOCKED - cannot declare quorum queue '{name}' in vhost '{vhost}': {why}"),
                50,
                10,
            )
        };
        if self.metadata.with(|p| p.get(vhost, name).is_none()) {
            let size = warren_codec::table::get(arguments, "x-quorum-initial-group-size")
                .and_then(warren_codec::table::as_i64)
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(3)
                .max(1);
            let mut others: Vec<String> = self.members.status().into_iter().filter(|p| p.up).map(|p| p.name).collect();
            others.sort();
            let mut members = vec![self.node.name().to_string()];
            members.extend(others);
            // The first member leads first: this node (`client-local`), or
            // with `balanced` the node that leads the fewest queues first
            // (this node on a tie), as the placements count them.
            let locator =
                warren_codec::table::get(arguments, "x-queue-leader-locator").and_then(warren_codec::table::as_str);
            if locator == Some("balanced") {
                let led = self.metadata.with(|p| p.first_members());
                let load = |name: &String| led.get(name).copied().unwrap_or(0);
                members.sort_by(|a, b| {
                    load(a).cmp(&load(b)).then((a != self.node.name()).cmp(&(b != self.node.name()))).then(a.cmp(b))
                });
            }
            members.truncate(size);
            let change = Change::Declare {
                vhost: vhost.into(),
                name: name.into(),
                members,
                arguments: arguments.clone(),
                classic: None,
            };
            let command = serde_json::to_vec(&change).map_err(|e| unavailable(e.to_string()))?;
            self.node
                .write_anywhere(METADATA, command, DECLARE_PATIENCE)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
        }
        // Applied here too, then its group elects a leader.
        let give_up = tokio::time::Instant::now() + DECLARE_PATIENCE;
        loop {
            let placement = self.metadata.with(|p| p.get(vhost, name).cloned());
            if let Some(placement) = placement {
                let here = self.local(vhost, name);
                let led_here = here.as_ref().is_some_and(|l| l.active.load(Ordering::Acquire));
                let stand_in = here.as_ref().is_some_and(|l| l.stand_in.load(Ordering::Acquire));
                let member = placement.members.iter().any(|m| m == self.node.name());
                // A member waits for the group's first leader; a node that
                // is not one for its stand-in only.
                let leader_elsewhere = !member
                    || self
                        .node
                        .status(placement.group)
                        .is_some_and(|s| s.leader.is_some_and(|l| l != self.node.name()));
                if led_here || (leader_elsewhere && stand_in) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(unavailable("its replicas elected no leader in time".into()));
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    }

    /// Every quorum queue's placement.
    pub fn placements(&self) -> Vec<Placement> {
        self.metadata.with(|p| p.all())
    }

    /// Adds node `node` to a quorum queue's members (`add`), or removes it
    /// (rabbitmq-queues' `add_member` and `delete_member`). Answered once
    /// the metadata group committed the new members; the queue's leader
    /// then changes the group's membership (`warren ctl quorum_status`
    /// shows it).
    pub async fn set_member(&self, vhost: &str, name: &str, node: &str, add: bool) -> Result<Vec<String>, AmqpError> {
        let refused = |why: String| AmqpError::soft(ReplyCode::PreconditionFailed, why, 50, 0);
        let Some(placement) = self.metadata.with(|p| p.get(vhost, name).filter(|p| p.classic.is_none()).cloned())
        else {
            return Err(AmqpError::soft(
                ReplyCode::NotFound,
                format!("no quorum queue '{name}' in vhost '{vhost}'"),
                50,
                0,
            ));
        };
        let mut members = placement.members.clone();
        let is_member = members.iter().any(|m| m == node);
        if add {
            let up = node == self.node.name() || self.members.status().iter().any(|p| p.name == node && p.up);
            if !up {
                return Err(refused(format!("node '{node}' is not a running member of the cluster")));
            }
            if is_member {
                return Err(refused(format!("node '{node}' is already a member of quorum queue '{name}'")));
            }
            members.push(node.to_string());
        } else {
            if !is_member {
                return Err(refused(format!("node '{node}' is not a member of quorum queue '{name}'")));
            }
            if members.len() == 1 {
                return Err(refused(format!("node '{node}' is the last member of quorum queue '{name}'")));
            }
            members.retain(|m| m != node);
        }
        let change = Change::Member { vhost: vhost.into(), name: name.into(), node: node.into(), add };
        let unavailable = |why: String| AmqpError::soft(ReplyCode::ResourceLocked, why, 50, 0);
        let command = serde_json::to_vec(&change).map_err(|e| unavailable(e.to_string()))?;
        self.node.write_anywhere(METADATA, command, DECLARE_PATIENCE).await.map_err(|e| unavailable(e.to_string()))?;
        // What this change makes of the members read above (the log applies
        // it to whatever they are by then).
        Ok(members)
    }

    /// Removes node `node` from the cluster for good (rabbitmqctl's
    /// `forget_cluster_node`): it must be stopped. It leaves the metadata
    /// group and every quorum queue it is a member of (a queue it is the
    /// only member of keeps it, and is lost with it), and its connections
    /// are refused from then on (a node of that name cannot join again).
    pub async fn forget_node(&self, node: &str) -> Result<(), AmqpError> {
        let refused = |why: String| AmqpError::soft(ReplyCode::PreconditionFailed, why, 50, 0);
        if node == self.node.name() {
            return Err(refused(format!("node '{node}' is the node asked: ask another one")));
        }
        let status = self.members.status();
        if status.iter().any(|p| p.name == node && p.up) {
            return Err(refused(format!("node '{node}' is running: stop it first")));
        }
        let known = status.iter().any(|p| p.name == node)
            || self.node.status(METADATA).is_some_and(|s| s.voters.iter().any(|v| v == node))
            || self.placements().iter().any(|p| p.members.iter().any(|m| m == node));
        if !known {
            return Err(AmqpError::soft(ReplyCode::NotFound, format!("node '{node}' is not in the cluster"), 50, 0));
        }
        let change = Change::Forget { node: node.into() };
        let unavailable = |why: String| AmqpError::soft(ReplyCode::ResourceLocked, why, 50, 0);
        let command = serde_json::to_vec(&change).map_err(|e| unavailable(e.to_string()))?;
        self.node.write_anywhere(METADATA, command, DECLARE_PATIENCE).await.map_err(|e| unavailable(e.to_string()))?;
        Ok(())
    }

    /// The metadata group's leader takes forgotten nodes out of its voters.
    fn forget_in_metadata(self: &Arc<Self>) {
        let Some(status) = self.node.status(METADATA).filter(|s| s.state == "Leader") else { return };
        let gone: Vec<String> =
            self.metadata.with(|p| status.voters.iter().filter(|v| p.forgotten().contains(*v)).cloned().collect());
        if gone.is_empty() || self.forgetting.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            for node in &gone {
                match this.node.remove_member(METADATA, node).await {
                    Ok(()) => info!(%node, "node removed from the metadata group"),
                    Err(e) => warn!(%node, %e, "removing a node from the metadata group failed"),
                }
            }
            this.forgetting.store(false, Ordering::Release);
        });
    }

    /// The leader makes the group's voters the placement's members, one
    /// change at a time (a new member is added as a learner first and
    /// becomes a voter once it caught up).
    fn reconcile(
        self: &Arc<Self>,
        local: &Arc<Local>,
        status: &warren_raft::GroupStatus,
        members: &[String],
        up: &std::collections::HashSet<String>,
    ) {
        if members.len() == status.voters.len() && members.iter().all(|m| status.voters.contains(m)) {
            return;
        }
        let add: Vec<String> = members
            .iter()
            .filter(|m| !status.voters.contains(m) && (up.contains(*m) || *m == self.node.name()))
            .cloned()
            .collect();
        let remove: Vec<String> = status.voters.iter().filter(|v| !members.contains(*v)).cloned().collect();
        if (add.is_empty() && remove.is_empty()) || local.reconciling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (this, local) = (self.clone(), local.clone());
        tokio::spawn(async move {
            for node in &add {
                match this.node.add_member(local.group, node).await {
                    Ok(()) => info!(queue = %local.name, %node, "quorum queue member added"),
                    Err(e) => warn!(queue = %local.name, %node, %e, "adding a quorum queue member failed"),
                }
            }
            for node in &remove {
                match this.node.remove_member(local.group, node).await {
                    Ok(()) => info!(queue = %local.name, %node, "quorum queue member removed"),
                    Err(e) => warn!(queue = %local.name, %node, %e, "removing a quorum queue member failed"),
                }
            }
            local.reconciling.store(false, Ordering::Release);
        });
    }

    /// This node is no longer among the queue's members and its group no
    /// longer counts it: the replica goes (and with it the queue's stand-in
    /// here: consumers here are cancelled).
    async fn leave(&self, local: &Local) {
        let removed = {
            let mut queues = self.queues.write();
            let here = queues.get_mut(&local.vhost);
            here.and_then(|q| q.remove(&local.name).filter(|l| l.group == local.group))
        };
        if let Some(local) = removed {
            self.give_up(&local);
            self.forget_subscriptions(&local);
            self.drop_stand_in(&local);
            if let Err(e) = self.node.remove_group(local.group).await {
                warn!(queue = %local.name, group = local.group, %e, "cannot drop a quorum queue's replica");
            }
            info!(vhost = %local.vhost, queue = %local.name, "no longer a member of the quorum queue: replica dropped");
            // The queue is still reachable from here, through a stand-in.
            if let Some(placement) = self.metadata.with(|p| p.get(&local.vhost, &local.name).cloned()) {
                let stand_in = Local::new(&placement, None, false);
                let mut queues = self.queues.write();
                let here = queues.entry(placement.vhost.clone()).or_default();
                here.entry(placement.name.clone()).or_insert(stand_in);
            }
        }
    }

    /// A quorum queue was deleted on this node (its leader): its placement
    /// goes.
    fn deleted(&self, vhost: &str, name: &str) {
        let change = Change::Delete { vhost: vhost.into(), name: name.into(), origin: self.origin };
        let Ok(command) = serde_json::to_vec(&change) else { return };
        let node = self.node.clone();
        let (vhost, name) = (vhost.to_string(), name.to_string());
        tokio::spawn(async move {
            if let Err(e) = node.write_anywhere(METADATA, command, DECLARE_PATIENCE).await {
                warn!(%vhost, queue = %name, %e, "removing a deleted quorum queue's placement failed");
            }
        });
    }

    async fn placed_event(&self, placement: Placement) {
        if placement.classic.is_some() {
            self.placed_classic(&placement);
            return;
        }
        let member = placement.members.iter().any(|m| m == self.node.name());
        let existing = self.local(&placement.vhost, &placement.name);
        match &existing {
            // Not a member: a stand-in here, with no replica.
            None if !member => {
                let local = Local::new(&placement, None, false);
                self.queues.write().entry(placement.vhost.clone()).or_default().insert(placement.name.clone(), local);
                return;
            }
            None => {}
            // Made a member: the replica comes (the stand-in stays).
            Some(local) if member && local.machine.is_none() => {}
            Some(_) => return,
        }
        let stand_in = existing.is_some_and(|l| l.stand_in.load(Ordering::Acquire));
        // The replica tells of forwarded messages as it applies them.
        let (tell, mut told) = mpsc::unbounded_channel();
        let applied = self.applied.clone();
        let group = placement.group;
        tokio::spawn(async move {
            while let Some(message) = told.recv().await {
                if applied.send((group, message)).is_err() {
                    return;
                }
            }
        });
        let machine = match self.node.create_group(placement.group, QueueReplica::telling(tell)).await {
            Ok(machine) => machine,
            Err(e) => {
                warn!(vhost = %placement.vhost, queue = %placement.name, %e, "cannot start a quorum queue's group");
                return;
            }
        };
        self.node.set_leader_hint(placement.group, None);
        let local = Local::new(&placement, Some(machine), stand_in);
        self.queues.write().entry(placement.vhost.clone()).or_default().insert(placement.name.clone(), local);
        // The declaring node sets the group up (once: later it is a no-op)
        // and, as it called the election itself, leads it first.
        if placement.members.first().map(String::as_str) == Some(self.node.name()) {
            if let Err(e) = self.node.initialize(placement.group, &placement.members).await {
                warn!(queue = %placement.name, %e, "cannot set up a quorum queue's group");
            }
        }
    }

    async fn removed_event(&self, vhost: &str, name: &str, group: GroupId, origin: u64) {
        let local = self.queues.write().get_mut(vhost).and_then(|queues| queues.remove(name));
        if let Some(local) = local.as_ref().filter(|l| l.home.is_some()) {
            self.removed_classic(local, origin);
            return;
        }
        if let Some(local) = local {
            self.give_up(&local);
            self.forget_subscriptions(&local);
            self.drop_stand_in(&local);
            self.node.set_leader_hint(group, None);
            if local.machine.is_none() {
                info!(%vhost, queue = %name, group, "quorum queue removed");
                return;
            }
            if let Err(e) = self.node.remove_group(group).await {
                warn!(%vhost, queue = %name, group, %e, "cannot remove a deleted quorum queue's group");
            }
        }
        info!(%vhost, queue = %name, group, "quorum queue removed");
    }

    /// Takes up or gives up the leaderships that moved.
    fn watch_leaderships(self: &Arc<Self>) {
        let up: std::collections::HashSet<String> =
            self.members.status().into_iter().filter(|p| p.up).map(|p| p.name).collect();
        self.check_subscriptions(&up);
        self.check_served(&up);
        self.forget_in_metadata();
        let locals: Vec<Arc<Local>> = self.queues.read().values().flat_map(|q| q.values().cloned()).collect();
        self.sweep_classic();
        for local in locals {
            if local.home.is_some() {
                self.watch_classic(&local);
                continue;
            }
            if local.machine.is_none() {
                self.watch_from_outside(&local, &up);
                continue;
            }
            let Some(status) = self.node.status(local.group) else { continue };
            // No placement: the queue was deleted (`removed_event` drops it).
            let Some(members) = self.metadata.with(|p| p.get(&local.vhost, &local.name).map(|p| p.members.clone()))
            else {
                continue;
            };
            let member = members.iter().any(|m| m == self.node.name());
            if !member && !status.voters.iter().any(|v| v == self.node.name()) {
                if !local.leaving.swap(true, Ordering::AcqRel) {
                    let (this, local) = (self.clone(), local.clone());
                    tokio::spawn(async move { this.leave(&local).await });
                }
                continue;
            }
            let leading = status.state == "Leader";
            if leading {
                self.reconcile(&local, &status, &members, &up);
            }
            let active = local.active.load(Ordering::Acquire);
            if leading && !active && !local.activating.swap(true, Ordering::AcqRel) {
                let (this, local) = (self.clone(), local.clone());
                tokio::spawn(async move {
                    this.take_up(&local).await;
                    local.activating.store(false, Ordering::Release);
                });
            } else if !leading && active {
                self.give_up(&local);
            }
            // Led elsewhere, or no leader yet: a stand-in here takes
            // publishes and consumers for it (they wait for a leader), so
            // the queue is there on every member once it is placed.
            if !leading && !local.active.load(Ordering::Acquire) && !local.stand_in.load(Ordering::Acquire) {
                self.put_stand_in(&local);
            }
        }
    }

    /// A queue this node is not a member of: its stand-in is up, and the
    /// members are asked who leads when that is not known, when the leader
    /// known went down, and every second (leadership moves between
    /// members that stay up).
    fn watch_from_outside(self: &Arc<Self>, local: &Arc<Local>, up: &std::collections::HashSet<String>) {
        if !local.stand_in.load(Ordering::Acquire) {
            self.put_stand_in(local);
        }
        let known = self.node.known_leader(local.group);
        let stale = local.asked.lock().is_none_or(|at| at.elapsed() >= LEADER_ASK_EVERY);
        let lost = known.as_ref().is_none_or(|leader| !up.contains(leader));
        if !(lost || stale) || local.asking.swap(true, Ordering::AcqRel) {
            return;
        }
        *local.asked.lock() = Some(std::time::Instant::now());
        let Some(members) = self.metadata.with(|p| p.get(&local.vhost, &local.name).map(|p| p.members.clone())) else {
            local.asking.store(false, Ordering::Release);
            return;
        };
        let asked: Vec<String> = members.into_iter().filter(|m| up.contains(m)).collect();
        let (this, local) = (self.clone(), local.clone());
        tokio::spawn(async move {
            for member in asked {
                if let Ok(Some(leader)) = this.node.ask_leader(local.group, &member).await {
                    this.node.set_leader_hint(local.group, Some(leader));
                    break;
                }
            }
            local.asking.store(false, Ordering::Release);
        });
    }

    /// This node leads the queue's group: once its replica holds every
    /// committed command, the queue runs here from it.
    async fn take_up(&self, local: &Local) {
        let Some(term) = self.node.status(local.group).map(|s| s.term) else { return };
        if let Err(e) = self.node.barrier(local.group).await {
            info!(queue = %local.name, %e, "leadership lost before taking the queue up");
            return;
        }
        if self.node.status(local.group).is_none_or(|s| s.term != term || s.state != "Leader") {
            return;
        }
        let Some(broker) = self.broker.upgrade() else { return };
        let Some(vhost) = broker.vhost(&local.vhost) else {
            warn!(vhost = %local.vhost, queue = %local.name, "a quorum queue's virtual host is not on this node");
            return;
        };
        let mut restored = local.restored.lock();
        let Some(machine) = &local.machine else { return };
        let (messages, last_key, last_index) = machine.with(|r| (r.entries(), r.last_key(), r.last_index()));
        let count = messages.len();
        let _applying = definitions::Applying::enter();
        let mut session = Session::open(&vhost, &broker.store);
        // The stand-in becomes the queue: its consumers stay, served from
        // here now.
        if local.stand_in.swap(false, Ordering::AcqRel) {
            self.forget_subscriptions(local);
            session.promote_replicated(&local.name);
        } else if let Err(error) = session.declare_replicated(&local.name, local.arguments.clone(), false) {
            warn!(queue = %local.name, %error, "cannot run a quorum queue here");
            return;
        } else {
            self.bind_known(&mut session, local);
        }
        local.next_key.store(last_key + 1, Ordering::Release);
        local.active.store(true, Ordering::Release);
        *restored = Some((last_index, term));
        let loader = Arc::new(replica::ReplicaLoader(machine.clone()));
        session.restore_replicated_paged(&local.name, loader, messages);
        drop(session);
        drop(restored);
        info!(vhost = %local.vhost, queue = %local.name, term, messages = count, "quorum queue led from this node");
    }

    fn give_up(&self, local: &Local) {
        let mut restored = local.restored.lock();
        *restored = None;
        if !local.active.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(broker) = self.broker.upgrade() else { return };
        if let Some(vhost) = broker.vhost(&local.vhost) {
            // It stays as a stand-in, whose consumers are subscribed at the
            // next leader as its journal goes through `take`.
            let mut session = Session::open(&vhost, &broker.store);
            local.stand_in.store(true, Ordering::Release);
            let serving = self.stop_serving(&local.vhost, &local.name);
            session.demote_replicated(&local.name, &serving);
        }
        info!(vhost = %local.vhost, queue = %local.name, "quorum queue no longer led from this node");
    }

    /// Submits a message in, settled or returned of a queue led here to its
    /// group (other events carry nothing for the replicas); `Err` if the
    /// group is gone.
    fn submit(&self, local: &Local, event: &JournalEvent, out: &mut Vec<Submitted>) -> Result<(), ()> {
        let mut command = Vec::new();
        let submission = match event {
            // Written into the entry by the group's writing task, outside
            // the virtual host's lock held here.
            JournalEvent::Published { message, .. } => {
                let key = local.next_key.fetch_add(1, Ordering::AcqRel);
                message.set_stored_index(key);
                let message = message.clone();
                let len = replica::enqueue_len(&message);
                Submission::Deferred { len, write: Box::new(move |out| replica::encode_enqueue(out, key, &message)) }
            }
            JournalEvent::Settled { stored, .. } => {
                replica::encode_settle(&mut command, *stored);
                Submission::Bytes(command)
            }
            JournalEvent::Returned { stored, returns, .. } => {
                replica::encode_return(&mut command, *stored, *returns);
                Submission::Bytes(command)
            }
            _ => return Ok(()),
        };
        out.push(self.node.submit_as(local.group, submission).map_err(|_| ())?);
        Ok(())
    }
}

type Submitted = warren_raft::Submitted;

impl crate::store::Replicator for Replication {
    fn take(&self, vhost: &str, events: &mut Vec<JournalEvent>) -> Option<u64> {
        let defined = self.share_definitions(vhost, events);
        let (submitted, forwarded, failed) = self.take_queue_events(vhost, events);
        if defined.is_none() && submitted.is_empty() && forwarded.is_empty() && !failed {
            return None;
        }
        let broker = self.broker.upgrade()?;
        let ticket = broker.tickets.issue();
        let tickets = Arc::downgrade(&broker);
        tokio::spawn(async move {
            // One deadline for them all (they commit in order): a timer per
            // reply was a cost per message.
            let committed = tokio::time::timeout(COMMIT_PATIENCE, async {
                let mut ok = true;
                for reply in submitted {
                    ok &= matches!(reply.await, Ok(Ok(_)));
                }
                ok
            });
            let mut ok = !failed && committed.await.unwrap_or(false);
            for committed in forwarded {
                ok &= committed.await.unwrap_or(false);
            }
            if let Some(defined) = defined {
                ok &= defined.await.unwrap_or(false);
            }
            if let Some(broker) = tickets.upgrade() {
                broker.tickets.resolve(ticket, ok);
            }
        });
        Some(ticket)
    }
}

type Forwarded = tokio::sync::oneshot::Receiver<bool>;

impl Replication {
    /// Takes the events of the quorum queues here out of `events`: those of
    /// queues led here become their groups' commands, publishes to
    /// stand-ins are forwarded; whether any could not be submitted.
    fn take_queue_events(&self, vhost: &str, events: &mut Vec<JournalEvent>) -> (Vec<Submitted>, Vec<Forwarded>, bool) {
        let queues = self.queues.read();
        let Some(here) = queues.get(vhost).filter(|q| !q.is_empty()) else { return (Vec::new(), Vec::new(), false) };
        let mut submitted = Vec::new();
        let mut failed = false;
        let mut deleted = Vec::new();
        let mut forwarded = Vec::new();
        events.retain(|event| {
            if let JournalEvent::Relay { queue, relay } = event {
                if let Some(local) = here.get(&**queue) {
                    self.relay_event(vhost, local, relay.clone());
                }
                return false;
            }
            let name = match event {
                JournalEvent::Published { queues, .. } if queues.len() == 1 => &queues[0],
                JournalEvent::Settled { queue, .. }
                | JournalEvent::Returned { queue, .. }
                | JournalEvent::QueueDeleted { queue } => queue,
                _ => return true,
            };
            let Some(local) = here.get(&**name) else { return true };
            let active = local.active.load(Ordering::Acquire);
            let stand_in = !active && local.stand_in.load(Ordering::Acquire);
            match event {
                // Neither led here nor stood in for: not this queue's event.
                _ if !active && !stand_in => return true,
                JournalEvent::QueueDeleted { queue } => deleted.push(queue.to_string()),
                JournalEvent::Published { message, .. } if stand_in => forwarded.push((local.clone(), message.clone())),
                // What a stand-in journals besides publishes concerns
                // nothing stored (it holds no message).
                _ if stand_in => {}
                _ => failed |= self.submit(local, event, &mut submitted).is_err(),
            }
            false
        });
        drop(queues);
        for name in deleted {
            if let Some(local) = self.local(vhost, &name) {
                local.active.store(false, Ordering::Release);
                local.stand_in.store(false, Ordering::Release);
            }
            self.deleted(vhost, &name);
        }
        let Some(this) = self.me.upgrade() else { return (submitted, Vec::new(), true) };
        let forwarded = forwarded.into_iter().map(|(local, message)| this.forward(&local, message)).collect();
        (submitted, forwarded, failed)
    }
}

/// Follows placements and leaderships until the replication goes.
async fn run(
    replication: Weak<Replication>,
    mut events: mpsc::UnboundedReceiver<Event>,
    mut applied: mpsc::UnboundedReceiver<(GroupId, replica::Applied)>,
) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    loop {
        tokio::select! {
            message = applied.recv() => {
                let (Some((group, message)), Some(this)) = (message, replication.upgrade()) else { return };
                this.applied_event(group, message);
            }
            event = events.recv() => {
                let (Some(event), Some(this)) = (event, replication.upgrade()) else { return };
                match event {
                    Event::Placed(placement) => this.placed_event(placement).await,
                    Event::Removed { vhost, name, group, origin } => {
                        this.removed_event(&vhost, &name, group, origin).await
                    }
                    Event::Forgotten(node) => {
                        this.members.forget(&node);
                    }
                    Event::Defined { vhost, origin, changes } => this.defined_event(&vhost, origin, &changes),
                    Event::Known(known, transient) => this.known_event(known, transient),
                    Event::Access { origin, definitions } => this.access_event(origin, *definitions),
                }
            }
            _ = tick.tick() => {
                let Some(this) = replication.upgrade() else { return };
                this.watch_leaderships();
            }
        }
    }
}
