//! A node's Raft groups: created and reached by group id, answering other
//! nodes' RPCs, with elections started from the cluster's failure
//! detector rather than from a timer per group.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;
use tracing::{debug, info};
use warren_cluster::Handler;
use warren_storage::{Backend, FsBackend, FsyncPolicy};

use crate::log_store::SharedLog;
use crate::machine::Machine;
use crate::network::{self, Network};
use crate::transport::Transport;
use crate::{node_id, Command, GroupId, NodeId, Raft, Reply, StateMachine};

/// How often the election driver looks at the groups.
const DRIVE_EVERY: Duration = Duration::from_millis(25);
/// How long a follower refuses votes after it last heard its leader
/// (`election_timeout_max`).
const LEADER_LEASE_MS: u64 = 120;
const LEADER_LEASE: Duration = Duration::from_millis(LEADER_LEASE_MS);
/// How long a member with no leader known waits before an election.
const UNKNOWN_LEADER_GRACE: Duration = Duration::from_millis(500);
/// How often a leader prods members that lag behind its log.
const PROD_EVERY: Duration = Duration::from_millis(500);
/// How long after a node came back its leaders prod it regardless.
const CAME_BACK_WINDOW: Duration = Duration::from_secs(10);
/// Between two election attempts of one group on one node.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Between the election attempts of successive voters (in an order that
/// differs per group), so that two voters rarely split a vote.
const RANK_STEP: Duration = Duration::from_millis(100);
/// How often a command handed to another node's leader checks that it
/// still leads.
const LEADER_WATCH: Duration = Duration::from_millis(50);

#[derive(Clone, Debug, thiserror::Error)]
pub enum NodeError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("group {0} is not on this node")]
    NoGroup(GroupId),
    #[error("group {0} is already on this node")]
    Exists(GroupId),
    #[error("the cluster transport is not attached yet")]
    Detached,
    #[error("group {group}: this node is not its leader (the leader is {leader:?})")]
    NotLeader { group: GroupId, leader: Option<String> },
    #[error("group {0}: {1}")]
    Raft(GroupId, String),
}

/// A group as this node sees it (`warren ctl quorum_status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    pub group: GroupId,
    pub state: String,
    pub term: u64,
    pub leader: Option<String>,
    pub voters: Vec<String>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// The last index in this member's latest snapshot.
    pub snapshot_index: Option<u64>,
    /// The last index this member's log has forgotten (the snapshot has it).
    pub purged_index: Option<u64>,
    /// On the leader: the last index each member holds.
    pub matched: BTreeMap<String, Option<u64>>,
}

struct Inner {
    id: NodeId,
    name: String,
    log: Arc<SharedLog>,
    snapshots: PathBuf,
    config: Arc<openraft::Config>,
    transport: OnceLock<Arc<dyn Transport>>,
    groups: RwLock<HashMap<GroupId, Group>>,
    /// Answers the requests that are not Raft's ([`Node::serve_also`]).
    other: OnceLock<Arc<dyn Handler>>,
    /// What votes said about who should stand (`network::Hints`).
    hints: Arc<network::Hints>,
    /// The leaders of groups this node has no member of, as last learned
    /// ([`Node::set_leader_hint`], or from a forward's refusal).
    leader_hints: RwLock<HashMap<GroupId, String>>,
    /// The node is handing its leaderships over before it stops: it takes
    /// no more writes (forwarded ones are sent again to the next leader).
    handing_over: std::sync::atomic::AtomicBool,
}

/// A request for another node's [`Node::serve_also`] handler, to send with
/// `warren_cluster::Members::call` on the same cluster connections.
pub fn other_request(payload: &[u8]) -> Vec<u8> {
    let mut request = Vec::with_capacity(9 + payload.len());
    request.extend_from_slice(&0u64.to_le_bytes());
    request.push(network::OTHER);
    request.extend_from_slice(payload);
    request
}

/// Where a write's reply goes.
type Answer = oneshot::Sender<Result<Vec<u8>, NodeError>>;

/// A submitted write's reply, once it is committed (or refused).
pub type Submitted = oneshot::Receiver<Result<Vec<u8>, NodeError>>;

/// A command as submitted: its bytes, or how to write them. A deferred
/// one is written straight into the group's next entry by the task that
/// writes it, so the submitter (holding a virtual host's lock) neither
/// copies a body nor waits for it.
pub enum Submission {
    Bytes(Vec<u8>),
    Deferred { len: usize, write: WriteCommand },
}

/// Writes a deferred command's bytes at the end of the entry being built.
pub type WriteCommand = Box<dyn FnOnce(&mut Vec<u8>) + Send>;

impl Submission {
    fn len(&self) -> usize {
        match self {
            Submission::Bytes(bytes) => bytes.len(),
            Submission::Deferred { len, .. } => *len,
        }
    }

    fn write(self, out: &mut Vec<u8>) {
        match self {
            Submission::Bytes(bytes) => out.extend_from_slice(&bytes),
            Submission::Deferred { write, .. } => write(out),
        }
    }
}

/// Writes waiting for the group's next entry.
#[derive(Default)]
struct Pending {
    commands: Vec<(Submission, Answer)>,
    /// A task is writing the group's entries.
    flushing: bool,
}

#[derive(Clone)]
struct Group {
    raft: Raft,
    pending: Arc<Mutex<Pending>>,
    /// The first index its machine's state still reads (a new snapshot
    /// would keep the log from there).
    keep: crate::KeepFrom,
}

/// At most this many commands, or about this many bytes, in one entry (an
/// entry is sent to a follower whole: see `log_store::APPEND_BYTES`).
const BATCH_COMMANDS: usize = 4096;
const BATCH_BYTES: usize = 1 << 20;

/// This node's Raft groups. Clones share them.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

/// Raft's timing. Groups send no heartbeats and start no elections on
/// their own (`enable_heartbeat`, `enable_elect` off): the failure
/// detector of `warren-cluster` does that for all groups at once. The
/// election timeout still bounds the leader lease: a follower refuses to
/// vote for another while it heard its leader within the maximum.
fn raft_config(options: &NodeOptions) -> Result<openraft::Config, NodeError> {
    openraft::Config {
        cluster_name: "warren".into(),
        // Only the maximum counts (the lease); the minimum bounds the
        // interval from above.
        election_timeout_min: LEADER_LEASE_MS - 10,
        election_timeout_max: LEADER_LEASE_MS,
        // With heartbeats off, this is how long an append may take to be
        // answered before openraft sends it again (and how often a group's
        // timer ticks, times 1.5). It was 20 ms: large appends to a loaded
        // follower timed out again and again, and the group stalled.
        heartbeat_interval: 100,
        enable_heartbeat: false,
        enable_elect: false,
        max_payload_entries: 4096,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(options.snapshot_every),
        // The log up to a snapshot goes at once: a member far behind gets
        // the snapshot.
        max_in_snapshot_log_to_keep: 0,
        // Every snapshot purges: one taken to release the shared log (a
        // drained quorum queue) may follow the last by a few entries only.
        purge_batch_size: 1,
        ..Default::default()
    }
    .validate()
    .map_err(|e| NodeError::Raft(0, e.to_string()))
}

/// How a node keeps its groups.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub fsync: FsyncPolicy,
    /// A group snapshots its state machine after this many log entries,
    /// and forgets the log before it.
    pub snapshot_every: u64,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions { fsync: FsyncPolicy::Always, snapshot_every: 8192 }
    }
}

impl Node {
    /// Opens this node's shared log and snapshots under `dir`.
    pub fn open(name: &str, dir: &Path, options: NodeOptions) -> Result<Node, NodeError> {
        Self::open_on(name, Arc::new(FsBackend), dir, options)
    }

    /// The same, with the shared log on `backend` (a simulated disk in
    /// tests); snapshots are files under `dir` all the same.
    pub fn open_on(name: &str, backend: Arc<dyn Backend>, dir: &Path, options: NodeOptions) -> Result<Node, NodeError> {
        let storage = |e: &dyn std::fmt::Display| NodeError::Storage(e.to_string());
        let snapshots = dir.join("snapshots");
        std::fs::create_dir_all(&snapshots).map_err(|e| storage(&e))?;
        let log = SharedLog::open(backend, &dir.join("wal"), options.fsync).map_err(|e| storage(&e))?;
        Ok(Node {
            inner: Arc::new(Inner {
                id: node_id(name),
                name: name.to_string(),
                log,
                snapshots,
                config: Arc::new(raft_config(&options)?),
                transport: OnceLock::new(),
                groups: RwLock::new(HashMap::new()),
                other: OnceLock::new(),
                hints: Arc::default(),
                leader_hints: RwLock::default(),
                handing_over: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// What answers other nodes' Raft RPCs: give it to
    /// `warren_cluster::Cluster::start_with`.
    pub fn handler(&self) -> Arc<dyn Handler> {
        Arc::new(Serve(Arc::downgrade(&self.inner)))
    }

    /// Hands the requests made with [`other_request`] to `handler` (the
    /// broker's own, beside Raft's on the cluster connections); set once.
    pub fn serve_also(&self, handler: Arc<dyn Handler>) {
        let _ = self.inner.other.set(handler);
    }

    /// Connects the groups to the other nodes (the cluster's `Members`)
    /// and starts the election driver (on the current tokio runtime).
    pub fn attach(&self, transport: Arc<dyn Transport>) {
        if self.inner.transport.set(transport.clone()).is_ok() {
            tokio::spawn(drive(Arc::downgrade(&self.inner), transport));
            tokio::spawn(reclaim(Arc::downgrade(&self.inner)));
        }
    }

    /// Starts (or restarts, from its log and snapshot) group `group` on
    /// this node with `state` as the machine's initial state.
    pub async fn create_group<S: StateMachine>(&self, group: GroupId, state: S) -> Result<Machine<S>, NodeError> {
        let transport = self.inner.transport.get().cloned().ok_or(NodeError::Detached)?;
        if self.inner.groups.read().contains_key(&group) {
            return Err(NodeError::Exists(group));
        }
        let file = self.inner.snapshots.join(format!("{group:016x}.snapshot"));
        let mut state = state;
        state.attach(self.inner.log.reader(group));
        let machine = Machine::open(state, Some(file)).map_err(|e| NodeError::Storage(e.to_string()))?;
        let keeping = machine.clone();
        let purge_from: crate::KeepFrom = Arc::new(move || keeping.keep_log_from());
        let keeping = machine.clone();
        let keep: crate::KeepFrom = Arc::new(move || keeping.with(StateMachine::keep_log_from));
        let raft = Raft::new(
            self.inner.id,
            self.inner.config.clone(),
            Network { transport, group, hints: self.inner.hints.clone() },
            self.inner.log.store(group).keeping(purge_from),
            machine.clone(),
        )
        .await
        .map_err(|e| NodeError::Raft(group, e.to_string()))?;
        self.inner.groups.write().insert(group, Group { raft, pending: Arc::default(), keep });
        Ok(machine)
    }

    /// Makes `voters` (node names, this node among them) the group's first
    /// members. Once, on one node; a group already set up stays as it is.
    pub async fn initialize(&self, group: GroupId, voters: &[String]) -> Result<(), NodeError> {
        let raft = self.raft(group)?;
        let nodes: BTreeMap<NodeId, BasicNode> =
            voters.iter().map(|name| (node_id(name), BasicNode { addr: name.clone() })).collect();
        match raft.initialize(nodes).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(NodeError::Raft(group, e.to_string())),
        }
    }

    /// Commits `command` in `group` (on a majority's disks) and returns the
    /// state machine's reply. Only the leader accepts writes.
    pub async fn write(&self, group: GroupId, command: Vec<u8>) -> Result<Vec<u8>, NodeError> {
        self.submit(group, command)?.await.map_err(|_| NodeError::Raft(group, "the group stopped".into()))?
    }

    /// [`Node::write`] without waiting: the command is queued now (so
    /// commands submitted one after another are committed in that order)
    /// and the receiver gets the reply. Called within a tokio runtime.
    pub fn submit(&self, group: GroupId, command: Vec<u8>) -> Result<Submitted, NodeError> {
        self.submit_as(group, Submission::Bytes(command))
    }

    /// [`Node::submit`] of a command written when its entry is.
    pub fn submit_as(&self, group: GroupId, command: Submission) -> Result<Submitted, NodeError> {
        if self.inner.handing_over.load(std::sync::atomic::Ordering::Acquire) {
            return Err(NodeError::NotLeader { group, leader: None });
        }
        let Group { raft, pending, .. } =
            self.inner.groups.read().get(&group).cloned().ok_or(NodeError::NoGroup(group))?;
        let (reply, replied) = oneshot::channel();
        let start = {
            let mut pending = pending.lock();
            pending.commands.push((command, reply));
            !std::mem::replace(&mut pending.flushing, true)
        };
        if start {
            tokio::spawn(flush(group, raft, pending));
        }
        Ok(replied)
    }

    /// [`Node::write`] from any node: a follower hands the command to the
    /// leader it knows, a node with no member to the leader its hint names
    /// ([`Node::set_leader_hint`]; a member that does not lead says who
    /// does), retrying while none is known, up to `patience`.
    pub async fn write_anywhere(
        &self,
        group: GroupId,
        command: Vec<u8>,
        patience: Duration,
    ) -> Result<Vec<u8>, NodeError> {
        let give_up = Instant::now() + patience;
        loop {
            // Written here while this node leads; a leader deposed meanwhile
            // may never answer its pending writes, so the write is given up
            // once another leads (or at the end of the patience) and the
            // command goes to the leader.
            let written = if self.hosts(group) {
                let local = self.write(group, command.clone());
                tokio::pin!(local);
                let written = loop {
                    tokio::select! {
                        written = &mut local => break Some(written),
                        () = tokio::time::sleep(LEADER_WATCH) => {
                            let leads = self.status(group).is_some_and(|s| s.state == "Leader");
                            if !leads || Instant::now() >= give_up {
                                break None;
                            }
                        }
                    }
                };
                match written {
                    Some(written) => written,
                    None if Instant::now() >= give_up => return Err(NodeError::NotLeader { group, leader: None }),
                    None => Err(NodeError::NotLeader { group, leader: self.known_leader(group) }),
                }
            } else {
                // No member here: to the leader the hints name.
                Err(NodeError::NotLeader { group, leader: self.known_leader(group) })
            };
            let leader = match written {
                Err(NodeError::NotLeader { leader: Some(leader), .. }) if leader != self.inner.name => leader,
                Err(NodeError::NotLeader { .. }) if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                done => return done,
            };
            let transport = self.inner.transport.get().cloned().ok_or(NodeError::Detached)?;
            let mut request = Vec::with_capacity(command.len() + 9);
            request.extend_from_slice(&group.to_le_bytes());
            request.push(network::FORWARD);
            request.extend_from_slice(&command);
            // A leader cut off by a partition answers nothing, and closes no
            // connection: stop waiting for it once another leads or its
            // node is seen down (the command is sent again; a machine that
            // must not apply it twice tells the copies apart).
            let call = transport.call(&leader, request, patience.max(Duration::from_millis(100)));
            tokio::pin!(call);
            let answer = loop {
                tokio::select! {
                    answer = &mut call => break Some(answer),
                    () = tokio::time::sleep(LEADER_WATCH) => {
                        let known = self.known_leader(group);
                        if known.as_deref() != Some(leader.as_str()) || !transport.up().contains(&leader) {
                            break None;
                        }
                    }
                }
            };
            let Some(answer) = answer else {
                if Instant::now() >= give_up {
                    return Err(NodeError::NotLeader { group, leader: Some(leader) });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            match answer.as_deref().map(|a| (a.first(), a.get(1..))) {
                Ok((Some(&network::ANSWERED), Some(reply))) => return Ok(reply.to_vec()),
                // A member that does not lead says who does.
                Ok((Some(&network::NOT_LEADER), Some(named))) if !self.hosts(group) => {
                    let named = String::from_utf8_lossy(named).into_owned();
                    self.set_leader_hint(group, (!named.is_empty() && named != leader).then_some(named));
                    if Instant::now() >= give_up {
                        return Err(NodeError::NotLeader { group, leader: Some(leader) });
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                _ if Instant::now() < give_up => tokio::time::sleep(Duration::from_millis(20)).await,
                Ok(_) => return Err(NodeError::NotLeader { group, leader: Some(leader) }),
                Err(e) => return Err(NodeError::Raft(group, e.clone())),
            }
        }
    }

    /// Stops `group` on this node and forgets it: its log, vote and
    /// snapshot (the group was deleted; every member does this).
    pub async fn remove_group(&self, group: GroupId) -> Result<(), NodeError> {
        let removed = self.inner.groups.write().remove(&group);
        let Some(removed) = removed else { return Err(NodeError::NoGroup(group)) };
        let _ = removed.raft.shutdown().await;
        self.inner.log.drop_group(group).map_err(|e| NodeError::Storage(e.to_string()))?;
        let file = self.inner.snapshots.join(format!("{group:016x}.snapshot"));
        match std::fs::remove_file(&file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NodeError::Storage(e.to_string())),
        }
    }

    /// Whether a node up now holds `group` with members: a node that lost
    /// its disk must not set up anew a group that exists.
    pub async fn formed_elsewhere(&self, group: GroupId) -> Result<bool, NodeError> {
        let transport = self.inner.transport.get().cloned().ok_or(NodeError::Detached)?;
        let mut request = group.to_le_bytes().to_vec();
        request.push(network::PROBE);
        for peer in transport.up() {
            match transport.call(&peer, request.clone(), Duration::from_secs(1)).await {
                Ok(answer) if answer == [network::ANSWERED, 1] => return Ok(true),
                Ok(_) => {}
                // Not knowing is not knowing it is not formed.
                Err(e) => return Err(NodeError::Raft(group, e)),
            }
        }
        Ok(false)
    }

    /// Starts an election in `group` now (a leader placed on this node).
    pub async fn campaign(&self, group: GroupId) -> Result<(), NodeError> {
        self.raft(group)?.trigger().elect().await.map_err(|e| NodeError::Raft(group, e.to_string()))
    }

    /// Returns once this node, as leader, has applied every entry committed
    /// before the call (a new leader's state machine is then complete).
    pub async fn barrier(&self, group: GroupId) -> Result<(), NodeError> {
        match self.raft(group)?.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(_)) => {
                let leader = self.status(group).and_then(|s| s.leader);
                Err(NodeError::NotLeader { group, leader })
            }
            Err(e) => Err(NodeError::Raft(group, e.to_string())),
        }
    }

    /// Adds node `name` to the group's voters (it catches up as a learner
    /// first, from the log or a snapshot). On the leader.
    pub async fn add_member(&self, group: GroupId, name: &str) -> Result<(), NodeError> {
        let raft = self.raft(group)?;
        let id = node_id(name);
        raft.add_learner(id, BasicNode { addr: name.to_string() }, true).await.map_err(|e| write_error(group, e))?;
        let voters: BTreeSet<NodeId> = [id].into();
        raft.change_membership(ChangeMembers::AddVoterIds(voters), false).await.map_err(|e| write_error(group, e))?;
        Ok(())
    }

    /// Removes node `name` from the group. On the leader.
    pub async fn remove_member(&self, group: GroupId, name: &str) -> Result<(), NodeError> {
        let raft = self.raft(group)?;
        let voters: BTreeSet<NodeId> = [node_id(name)].into();
        raft.change_membership(ChangeMembers::RemoveVoters(voters), false).await.map_err(|e| write_error(group, e))?;
        Ok(())
    }

    /// The group's state on this node.
    /// Whether this node has a member of `group`.
    pub fn hosts(&self, group: GroupId) -> bool {
        self.inner.groups.read().contains_key(&group)
    }

    /// Who leads `group` as far as this node knows: its member's view, or
    /// for a group with no member here, the last hint.
    pub fn known_leader(&self, group: GroupId) -> Option<String> {
        match self.status(group) {
            Some(status) => status.leader,
            None => self.inner.leader_hints.read().get(&group).cloned(),
        }
    }

    /// Records who leads `group`, a group with no member here (`None`: not
    /// known). [`Node::write_anywhere`] sends its commands there.
    pub fn set_leader_hint(&self, group: GroupId, leader: Option<String>) {
        let mut hints = self.inner.leader_hints.write();
        match leader {
            Some(leader) => hints.insert(group, leader),
            None => hints.remove(&group),
        };
    }

    /// Asks node `peer` who leads `group` (a member knows).
    pub async fn ask_leader(&self, group: GroupId, peer: &str) -> Result<Option<String>, NodeError> {
        let transport = self.inner.transport.get().cloned().ok_or(NodeError::Detached)?;
        let mut request = group.to_le_bytes().to_vec();
        request.push(network::LEADER);
        let answer =
            transport.call(peer, request, Duration::from_secs(1)).await.map_err(|e| NodeError::Raft(group, e))?;
        match answer.split_first() {
            Some((&network::ANSWERED, name)) if !name.is_empty() => {
                Ok(Some(String::from_utf8_lossy(name).into_owned()))
            }
            _ => Ok(None),
        }
    }

    pub fn status(&self, group: GroupId) -> Option<GroupStatus> {
        let raft = self.raft(group).ok()?;
        let metrics = raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let name = |id: &NodeId| membership.get_node(id).map_or_else(|| format!("{id:016x}"), |n| n.addr.clone());
        let mut voters: Vec<String> = membership.voter_ids().map(|id| name(&id)).collect();
        voters.sort();
        Some(GroupStatus {
            group,
            state: format!("{:?}", metrics.state),
            term: metrics.current_term,
            leader: metrics.current_leader.as_ref().map(name),
            voters,
            last_log_index: metrics.last_log_index,
            applied_index: metrics.last_applied.map(|id| id.index),
            snapshot_index: metrics.snapshot.map(|id| id.index),
            purged_index: metrics.purged.map(|id| id.index),
            matched: metrics
                .replication
                .iter()
                .flatten()
                .map(|(id, matched)| (name(id), matched.map(|m| m.index)))
                .collect(),
        })
    }

    /// Every group on this node.
    pub fn groups(&self) -> Vec<GroupId> {
        let mut groups: Vec<GroupId> = self.inner.groups.read().keys().copied().collect();
        groups.sort_unstable();
        groups
    }

    /// Fsyncs of the shared log, and entries made durable by them.
    pub fn wal_stats(&self) -> warren_storage::Stats {
        self.inner.log.stats()
    }

    /// Stops the shared log and every group without waiting for them, as
    /// a dying process does. (Fault-injection tests make the disk fail
    /// first, so that nothing pending lands.)
    pub fn crash(&self) {
        self.inner.log.shutdown();
        let rafts: Vec<Raft> = self.inner.groups.write().drain().map(|(_, group)| group.raft).collect();
        for raft in rafts {
            tokio::spawn(async move {
                let _ = raft.shutdown().await;
            });
        }
    }

    /// Hands the groups this node leads over before it stops: it takes no
    /// more writes, and in each group, once a member's log has every entry
    /// the leader's has, that member is asked to stand for election, and
    /// this node, the leader, votes for it. The other members refuse votes
    /// while their lease on this leader lasts (120 ms from its last
    /// append): in a group of two or three the two votes suffice at once;
    /// a larger group's candidate stands once the leases ran out with
    /// nothing appended. A leader elected less than a lease before refuses
    /// too. Any group not handed over within `patience` elects a leader
    /// once this node is gone, as after a crash. Returns (handed over,
    /// led).
    pub async fn hand_over(&self, patience: Duration) -> (usize, usize) {
        let Some(transport) = self.inner.transport.get().cloned() else { return (0, 0) };
        self.inner.handing_over.store(true, std::sync::atomic::Ordering::Release);
        let up = transport.up();
        let led: Vec<(GroupId, Group)> = self
            .inner
            .groups
            .read()
            .iter()
            .filter(|(_, g)| g.raft.metrics().borrow().state == ServerState::Leader)
            .map(|(id, g)| (*id, g.clone()))
            .collect();
        let count = led.len();
        let deadline = Instant::now() + patience;
        let tasks: Vec<_> = led
            .into_iter()
            .map(|(id, group)| {
                let (me, transport, up) = (self.inner.id, transport.clone(), up.clone());
                tokio::spawn(async move { hand_over_group(id, &group, me, transport, &up, deadline).await })
            })
            .collect();
        let mut handed = 0;
        for task in tasks {
            handed += usize::from(matches!(task.await, Ok(true)));
        }
        (handed, count)
    }

    /// Stops every group and the shared log.
    pub async fn shutdown(&self) {
        let rafts: Vec<Raft> = self.inner.groups.write().drain().map(|(_, group)| group.raft).collect();
        for raft in rafts {
            let _ = raft.shutdown().await;
        }
        self.inner.log.shutdown();
    }

    fn raft(&self, group: GroupId) -> Result<Raft, NodeError> {
        self.inner.groups.read().get(&group).map(|g| g.raft.clone()).ok_or(NodeError::NoGroup(group))
    }
}

/// How often a leader handing its group over looks again.
const HAND_OVER_STEP: Duration = Duration::from_millis(5);
/// How much longer than the members' lease a larger group waits before
/// its candidate stands (clocks and scheduling differ between nodes).
const HAND_OVER_MARGIN: Duration = Duration::from_millis(30);

/// [`Node::hand_over`] for one group: waits until the commands queued
/// before are written and a voter that is up has every entry, asks it to
/// campaign, and waits until this node no longer leads; whether it was
/// handed over by `deadline`.
async fn hand_over_group(
    group: GroupId,
    Group { raft, pending, .. }: &Group,
    me: NodeId,
    transport: Arc<dyn Transport>,
    up: &HashSet<String>,
    deadline: Instant,
) -> bool {
    let mut asked = false;
    // Since when the log has been complete on a member and nothing was
    // appended (the members' leases run from the last append).
    let mut quiet: Option<(Instant, Option<u64>)> = None;
    loop {
        let metrics = raft.metrics().borrow().clone();
        if metrics.state != ServerState::Leader {
            return asked;
        }
        if Instant::now() >= deadline {
            return false;
        }
        let written = {
            let pending = pending.lock();
            pending.commands.is_empty() && !pending.flushing
        };
        if !asked && written {
            let membership = metrics.membership_config.membership();
            let caught_up = metrics
                .replication
                .iter()
                .flatten()
                .filter(|(id, matched)| {
                    **id != me
                        && matched.map(|m| m.index) == metrics.last_log_index
                        && membership.voter_ids().any(|v| v == **id)
                })
                .filter_map(|(id, _)| membership.get_node(id).filter(|n| up.contains(&n.addr)))
                .map(|node| node.addr.clone())
                .min();
            let voters = membership.voter_ids().count();
            let since = match quiet {
                Some((at, last)) if last == metrics.last_log_index => at,
                _ => {
                    quiet = Some((Instant::now(), metrics.last_log_index));
                    Instant::now()
                }
            };
            let votes_enough = voters <= 3 || since.elapsed() > LEADER_LEASE + HAND_OVER_MARGIN;
            if let Some(target) = caught_up.filter(|_| votes_enough) {
                let mut request = group.to_le_bytes().to_vec();
                request.push(network::CAMPAIGN);
                let patience = deadline.saturating_duration_since(Instant::now());
                asked = matches!(transport.call(&target, request, patience).await.as_deref(), Ok([network::ANSWERED]));
                if asked {
                    debug!(group, to = %target, "leadership handed over");
                }
            }
        }
        tokio::time::sleep(HAND_OVER_STEP).await;
    }
}

/// Writes a group's queued commands, an entry at a time, until none are
/// left.
async fn flush(group: GroupId, raft: Raft, pending: Arc<Mutex<Pending>>) {
    loop {
        let batch: Vec<_> = {
            let mut pending = pending.lock();
            if pending.commands.is_empty() {
                pending.flushing = false;
                return;
            }
            let mut bytes = 0;
            let count = pending
                .commands
                .iter()
                .take(BATCH_COMMANDS)
                .take_while(|(command, _)| {
                    bytes += command.len() + 4;
                    bytes <= BATCH_BYTES
                })
                .count()
                .max(1);
            pending.commands.drain(..count).collect()
        };
        let mut payload = Vec::with_capacity(batch.iter().map(|(command, _)| command.len() + 4).sum());
        let batch: Vec<Answer> = batch
            .into_iter()
            .map(|(command, answer)| {
                crate::batch::push(&mut payload, |out| command.write(out));
                answer
            })
            .collect();
        let result = write_while_leader(group, &raft, payload).await;
        match result {
            Ok(reply) => match crate::batch::decode(&reply.0).filter(|r| r.len() == batch.len()) {
                Some(replies) => {
                    for (reply, answer) in batch.into_iter().zip(replies) {
                        let _ = reply.send(Ok(answer.to_vec()));
                    }
                }
                None => {
                    let e = NodeError::Raft(group, "the state machine's replies do not match the batch".into());
                    for reply in batch {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            },
            Err(e) => {
                for reply in batch {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// `client_write`, given up when this node stops leading the term it
/// was taken in: openraft 0.9 may never answer a write its leader took
/// before stepping down (the new leader may commit it or not; the outcome
/// is unknown, as when a connection drops).
async fn write_while_leader(group: GroupId, raft: &Raft, payload: Vec<u8>) -> Result<Reply, NodeError> {
    let mut metrics = raft.metrics();
    let (term, leading) = {
        let m = metrics.borrow_and_update();
        (m.current_term, m.state == ServerState::Leader)
    };
    let not_leader = |m: &openraft::RaftMetrics<NodeId, BasicNode>| {
        let leader =
            m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).map(|n| n.addr.clone()));
        NodeError::NotLeader { group, leader }
    };
    if !leading {
        return Err(not_leader(&metrics.borrow()));
    }
    tokio::select! {
        result = raft.client_write(Command(payload.into())) => result.map(|r| r.data).map_err(|e| write_error(group, e)),
        changed = metrics.wait_for(|m| m.state != ServerState::Leader || m.current_term != term) => match changed {
            Ok(m) => Err(not_leader(&m)),
            Err(_) => Err(NodeError::Raft(group, "the group stopped".into())),
        },
    }
}

fn write_error(group: GroupId, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> NodeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            NodeError::NotLeader { group, leader: forward.leader_node.map(|node| node.addr) }
        }
        e => NodeError::Raft(group, e.to_string()),
    }
}

struct Serve(Weak<Inner>);

impl Handler for Serve {
    fn handle(&self, from: &str, request: Vec<u8>) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> {
        if request.get(8) == Some(&network::OTHER) {
            return match self.0.upgrade().and_then(|inner| inner.other.get().cloned()) {
                Some(other) => other.handle(from, request[9..].to_vec()),
                None => Box::pin(async { Vec::new() }),
            };
        }
        let parsed = request.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).zip(request.get(8));
        let Some((group, &kind)) = parsed else { return Box::pin(async { vec![network::MALFORMED] }) };
        if kind == network::PROBE {
            let formed =
                self.0.upgrade().and_then(|inner| inner.groups.read().get(&group).map(|g| g.raft.clone())).is_some_and(
                    |raft| raft.metrics().borrow().membership_config.membership().voter_ids().next().is_some(),
                );
            return Box::pin(async move { vec![network::ANSWERED, u8::from(formed)] });
        }
        if kind == network::FORWARD {
            let Some(inner) = self.0.upgrade() else { return Box::pin(async { vec![network::NO_GROUP] }) };
            let node = Node { inner };
            let command = request[9..].to_vec();
            return Box::pin(async move {
                match node.write(group, command).await {
                    Ok(reply) => [&[network::ANSWERED][..], &reply].concat(),
                    Err(NodeError::NotLeader { leader: Some(leader), .. }) => {
                        [&[network::NOT_LEADER][..], leader.as_bytes()].concat()
                    }
                    Err(_) => vec![network::NOT_LEADER],
                }
            });
        }
        if kind == network::CAMPAIGN {
            let raft = self.0.upgrade().and_then(|inner| inner.groups.read().get(&group).map(|g| g.raft.clone()));
            return Box::pin(async move {
                match raft {
                    Some(raft) if raft.trigger().elect().await.is_ok() => vec![network::ANSWERED],
                    _ => vec![network::NO_GROUP],
                }
            });
        }
        if kind == network::LEADER {
            let leader = self.0.upgrade().and_then(|inner| Node { inner }.status(group)).and_then(|s| s.leader);
            let answer = [&[network::ANSWERED][..], leader.unwrap_or_default().as_bytes()].concat();
            return Box::pin(async move { answer });
        }
        let raft = self.0.upgrade().and_then(|inner| inner.groups.read().get(&group).map(|g| g.raft.clone()));
        match raft {
            Some(raft) => Box::pin(async move { network::serve(raft, kind, &request[9..]).await }),
            None => Box::pin(async { vec![network::NO_GROUP] }),
        }
    }
}

/// The order in which `voter` tries to become leader of `group` among
/// the voters: a hash, so that leaderships spread over the nodes.
fn rank_key(group: GroupId, voter: NodeId) -> u64 {
    (group ^ voter).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
}

/// Starts elections in the groups whose leader's node the failure detector
/// reports down, or that have no leader: the voters try one after another,
/// in an order of their own for each group.
async fn drive(inner: Weak<Inner>, transport: Arc<dyn Transport>) {
    // Group -> when this node may next try an election.
    let mut next_try: HashMap<GroupId, Instant> = HashMap::new();
    // Group -> the leader last seen (to log changes).
    let mut seen: HashMap<GroupId, (u64, NodeId)> = HashMap::new();
    // The nodes up at the last look, and when lagging members were last
    // prodded.
    let mut was_up: HashSet<String> = HashSet::new();
    // Each node's reconnection count at the last look.
    let mut incarnations: HashMap<String, u64> = HashMap::new();
    let mut prodded = Instant::now();
    let mut came_back_at: Option<Instant> = None;
    // Group -> the (term, leader) known when that leader's node came back.
    let mut restarted: HashMap<GroupId, (u64, NodeId)> = HashMap::new();
    let mut tick = tokio::time::interval(DRIVE_EVERY);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let up: HashSet<String> = transport.up();
        let now_incarnations = transport.incarnations();
        let groups: Vec<(GroupId, Raft)> = inner.groups.read().iter().map(|(g, r)| (*g, r.raft.clone())).collect();
        let now = Instant::now();
        // Nodes that came back: restarted where the transport knows runs
        // (late heartbeats from a starved process, or a healed partition,
        // do not make a node new), else seen up again.
        let returned: HashSet<&String> = if now_incarnations.is_empty() {
            up.difference(&was_up).collect()
        } else {
            up.iter().filter(|n| incarnations.get(*n) != now_incarnations.get(*n)).collect()
        };
        if !returned.is_empty() {
            came_back_at = Some(now);
        }
        // A node that came back may have lost its disk, and creates its
        // groups as it learns of them: its leaders prod it for a while
        // whatever they think it holds.
        let came_back = came_back_at.is_some_and(|at| now.duration_since(at) < CAME_BACK_WINDOW);
        let prod = now.duration_since(prodded) >= PROD_EVERY;
        if prod {
            prodded = now;
        }
        for (group, raft) in groups {
            let metrics = raft.metrics().borrow().clone();
            // Groups send nothing while idle: a member that came back (or
            // lags, its disk lost, say) hears from its leader only when
            // prodded, and then catches up.
            if prod && metrics.state == ServerState::Leader {
                let behind = metrics
                    .replication
                    .iter()
                    .flatten()
                    .any(|(_, matched)| matched.map(|m| m.index) < metrics.last_log_index);
                if came_back || behind {
                    let _ = raft.trigger().heartbeat().await;
                }
            }
            let membership = metrics.membership_config.membership();
            let is_up =
                |id: NodeId| id == inner.id || membership.get_node(&id).is_some_and(|node| up.contains(&node.addr));
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            if let Some(leader) = metrics.current_leader {
                if seen.insert(group, (metrics.current_term, leader)) != Some((metrics.current_term, leader)) {
                    let name = membership.get_node(&leader).map_or("?", |n| n.addr.as_str());
                    info!(group, term = metrics.current_term, leader = name, "group leader");
                }
            }
            // A leader whose node restarted leads nothing any more,
            // whatever this member last heard. (One cut off by a partition
            // that healed may still lead: the terms sort that out.)
            if let Some(leader) = metrics.current_leader {
                if membership.get_node(&leader).is_some_and(|n| returned.contains(&n.addr)) {
                    restarted.insert(group, (metrics.current_term, leader));
                }
            }
            let stale = restarted
                .get(&group)
                .is_some_and(|&(term, leader)| metrics.current_term == term && metrics.current_leader == Some(leader));
            let leader_alive = match metrics.current_leader {
                Some(leader) if leader == inner.id => metrics.state == ServerState::Leader,
                Some(_) if stale => false,
                Some(leader) => is_up(leader),
                None => false,
            };
            let mut live: Vec<NodeId> = voters.iter().copied().filter(|v| is_up(*v)).collect();
            // A node that cannot reach a majority cannot win: it would only
            // raise the term, and unseat a working leader once it is back
            // (the job Raft's pre-vote does, done by the failure detector).
            let hopeless = live.len() * 2 <= voters.len();
            // A node handing its groups over stands for none of them.
            let stopping = inner.handing_over.load(std::sync::atomic::Ordering::Acquire);
            if leader_alive
                || hopeless
                || stopping
                || !voters.contains(&inner.id)
                || metrics.state == ServerState::Learner
            {
                next_try.remove(&group);
                inner.hints.clear(group);
                continue;
            }
            // Another member's log is ahead: it should lead, and this node's
            // attempts would only raise the term under it.
            if inner.hints.outranked(group, now) {
                continue;
            }
            let at = *next_try.entry(group).or_insert_with(|| {
                live.sort_by_key(|v| rank_key(group, *v));
                let rank = live.iter().position(|v| *v == inner.id).unwrap_or(live.len());
                // A leader that went is replaced once the other members'
                // lease on it has run out (they refuse votes before). With
                // no leader known (a node just started), one may well
                // exist: its replication reaches this node within its
                // retry interval, and an election now would only unseat it.
                let grace = if metrics.current_leader.is_none() { UNKNOWN_LEADER_GRACE } else { LEADER_LEASE };
                now + grace + RANK_STEP * u32::try_from(rank).unwrap_or(u32::MAX)
            });
            if now < at {
                continue;
            }
            debug!(group, term = metrics.current_term, leader = ?metrics.current_leader, "starting an election");
            if raft.trigger().elect().await.is_err() {
                info!(group, "group stopped");
            }
            next_try.insert(group, now + RETRY_AFTER + RANK_STEP * u32::from(rand_below(3)));
        }
        was_up = up;
        incarnations = now_incarnations;
        restarted.retain(|group, _| inner.groups.read().contains_key(group));
        next_try.retain(|group, _| inner.groups.read().contains_key(group));
        seen.retain(|group, _| inner.groups.read().contains_key(group));
    }
}

/// How often the shared log is looked at for segments to reclaim.
const RECLAIM_EVERY: Duration = Duration::from_secs(1);
/// Segments of the shared log kept before groups holding older entries
/// are made to snapshot (16 MiB each).
const KEEP_SEGMENTS: usize = 8;
/// At most one snapshot a group is made to take in this long (a snapshot
/// holds the machine's whole state).
const FORCED_SNAPSHOT_EVERY: Duration = Duration::from_secs(5);

/// Keeps the shared log short: a group whose oldest entry is older than
/// the newest segments snapshots (and forgets its log up to there), then
/// the segments no group needs are deleted. openraft's own policy counts
/// entries per group, which says nothing of the bytes a group pins.
async fn reclaim(inner: Weak<Inner>) {
    let mut forced: HashMap<GroupId, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(RECLAIM_EVERY);
    loop {
        tick.tick().await;
        let Some(node) = inner.upgrade() else { return };
        let now = Instant::now();
        for group in node.log.pinning(KEEP_SEGMENTS) {
            if forced.get(&group).is_some_and(|at| now.duration_since(*at) < FORCED_SNAPSHOT_EVERY) {
                continue;
            }
            let Some((raft, keep)) = node.groups.read().get(&group).map(|g| (g.raft.clone(), g.keep.clone())) else {
                continue;
            };
            // A machine that still reads its oldest entries (a quorum
            // queue's oldest message) would release nothing.
            if keep().is_some_and(|from| node.log.first_index(group).is_none_or(|first| from <= first)) {
                continue;
            }
            forced.insert(group, now);
            debug!(group, "snapshot to release the shared log");
            let _ = raft.trigger().snapshot().await;
        }
        forced.retain(|_, at| now.duration_since(*at) < FORCED_SNAPSHOT_EVERY);
        let log = node.log.clone();
        drop(node);
        match tokio::task::spawn_blocking(move || log.reclaim()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(segments)) => debug!(segments, "shared log segments reclaimed"),
            Ok(Err(e)) => info!(%e, "reclaiming the shared log failed"),
            Err(_) => {}
        }
    }
}

/// A small random number, to keep two voters' retries apart.
fn rand_below(n: u8) -> u8 {
    let mut byte = [0u8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    byte[0] % n.max(1)
}
