//! Raft RPCs as requests on the cluster port.
//!
//! A request is the group id (8 bytes, little-endian), one byte for the
//! RPC, and the RPC encoded with bincode. The answer is one status byte
//! and, when the group answered, its `Result` encoded the same way.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;

use crate::transport::Transport;

/// What votes taught this node about its groups' elections. A candidate
/// whose log is behind another member's cannot win, but every attempt it
/// makes raises the term under the better one's feet (openraft 0.9 has no
/// pre-vote): two members then took turns for seconds. So a candidate
/// refused for its log stands back for a while (group -> until when).
#[derive(Default)]
pub(crate) struct Hints(parking_lot::Mutex<std::collections::HashMap<GroupId, std::time::Instant>>);

/// How long a candidate refused for its log stands back.
const OUTRANKED_FOR: Duration = Duration::from_millis(1000);

impl Hints {
    /// Whether this node is to stand back in `group` at `now`.
    pub(crate) fn outranked(&self, group: GroupId, now: std::time::Instant) -> bool {
        self.0.lock().get(&group).is_some_and(|until| now < *until)
    }

    pub(crate) fn clear(&self, group: GroupId) {
        self.0.lock().remove(&group);
    }

    /// Learns from the answer to this node's vote request in `group`.
    fn learn(&self, group: GroupId, request: &VoteRequest<NodeId>, answer: &VoteResponse<NodeId>) {
        if !answer.vote_granted && answer.last_log_id > request.last_log_id {
            self.0.lock().insert(group, std::time::Instant::now() + OUTRANKED_FOR);
        }
    }
}

use crate::{GroupId, NodeId, Raft, TypeConfig};

pub(crate) const APPEND: u8 = 1;
pub(crate) const VOTE: u8 = 2;
pub(crate) const SNAPSHOT: u8 = 3;
/// A client's command handed to the leader by a follower (not openraft's:
/// the answer is `ANSWERED` and the reply's bytes, or `NOT_LEADER`).
pub(crate) const FORWARD: u8 = 4;
/// Whether the group has members on the node asked (the answer is
/// `ANSWERED` and one byte, 1 if it has).
pub(crate) const PROBE: u8 = 5;
/// Not Raft's: a request for the handler given to `Node::serve_also`.
pub(crate) const OTHER: u8 = 6;
/// Who leads the group as the node asked knows it (the answer is
/// `ANSWERED` and the leader's name, empty if it knows none).
pub(crate) const LEADER: u8 = 7;
/// Stand for election now: the leader, about to stop, hands the group over
/// (answered `ANSWERED` once the election started).
pub(crate) const CAMPAIGN: u8 = 8;

/// How long a vote waits for a member to create its group.
const NO_GROUP_PATIENCE: Duration = Duration::from_secs(1);

/// The group answered (with its result, success or a Raft error).
pub(crate) const ANSWERED: u8 = 0;
/// This node has no such group (not created yet, or deleted).
pub(crate) const NO_GROUP: u8 = 1;
/// The request could not be read.
pub(crate) const MALFORMED: u8 = 2;
/// A forwarded command found no leader here (then the name of the leader
/// this node knows, if any).
pub(crate) const NOT_LEADER: u8 = 3;

#[derive(Debug, thiserror::Error)]
enum TransportError {
    #[error("{0}")]
    Call(String),
    #[error("node '{0}' has no group {1}")]
    NoGroup(String, GroupId),
    #[error("node '{0}' could not read the request")]
    Malformed(String),
    #[error("unreadable answer from '{0}': {1}")]
    Answer(String, bincode::Error),
}

/// Makes openraft's clients for one group.
pub(crate) struct Network {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) group: GroupId,
    pub(crate) hints: Arc<Hints>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            transport: self.transport.clone(),
            group: self.group,
            target,
            name: node.addr.clone(),
            hints: self.hints.clone(),
        }
    }
}

/// One group's client for one other node (named in `BasicNode::addr`).
pub(crate) struct Peer {
    transport: Arc<dyn Transport>,
    group: GroupId,
    target: NodeId,
    name: String,
    hints: Arc<Hints>,
}

type Failed<E> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl Peer {
    async fn call<Req, Resp, E>(&self, kind: u8, rpc: &Req, ttl: Duration) -> Result<Resp, Failed<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        // Sized first: an append of bodies grown by doubling was copied
        // again at each step.
        let size = bincode::serialized_size(rpc).map_or(0, |n| usize::try_from(n).unwrap_or(0));
        let mut request = Vec::with_capacity(9 + size);
        request.extend_from_slice(&self.group.to_le_bytes());
        request.push(kind);
        bincode::serialize_into(&mut request, rpc)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError::Answer(self.name.clone(), e))))?;
        let unreachable = |e: TransportError| RPCError::Unreachable(Unreachable::new(&e));
        // A vote that finds no group may have come first: the group is
        // created on every member as the metadata that places it is
        // applied there, and the member that set it up votes at once.
        let patience = if kind == VOTE { ttl.min(NO_GROUP_PATIENCE) } else { Duration::ZERO };
        let started = std::time::Instant::now();
        let answer = loop {
            let again = (started.elapsed() < patience).then(|| request.clone());
            let answer = self
                .transport
                .call(&self.name, request, ttl)
                .await
                .map_err(|e| unreachable(TransportError::Call(e)))?;
            match again {
                Some(again) if answer.first() == Some(&NO_GROUP) => request = again,
                _ => break answer,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        match answer.split_first() {
            Some((&ANSWERED, body)) => {
                let result: Result<Resp, RaftError<NodeId, E>> = bincode::deserialize(body)
                    .map_err(|e| RPCError::Network(NetworkError::new(&TransportError::Answer(self.name.clone(), e))))?;
                result.map_err(|e| {
                    RPCError::RemoteError(RemoteError::new_with_node(
                        self.target,
                        BasicNode { addr: self.name.clone() },
                        e,
                    ))
                })
            }
            Some((&NO_GROUP, _)) => Err(unreachable(TransportError::NoGroup(self.name.clone(), self.group))),
            _ => Err(unreachable(TransportError::Malformed(self.name.clone()))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, Failed<openraft::error::Infallible>> {
        self.call(APPEND, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, Failed<openraft::error::Infallible>> {
        let answer: VoteResponse<NodeId> = self.call(VOTE, &rpc, option.hard_ttl()).await?;
        self.hints.learn(self.group, &rpc, &answer);
        Ok(answer)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, Failed<InstallSnapshotError>> {
        self.call(SNAPSHOT, &rpc, option.hard_ttl()).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // A peer that went is reported by the failure detector; retrying
        // sooner than openraft's half second brings it back sooner.
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}

fn answered<T: Serialize>(result: &T) -> Vec<u8> {
    let mut out = vec![ANSWERED];
    if bincode::serialize_into(&mut out, result).is_err() {
        return vec![MALFORMED];
    }
    out
}

/// Answers one request of another node, given the group it names.
pub(crate) async fn serve(raft: Raft, kind: u8, body: &[u8]) -> Vec<u8> {
    match kind {
        APPEND => match bincode::deserialize::<AppendEntriesRequest<TypeConfig>>(body) {
            Ok(rpc) => answered(&raft.append_entries(rpc).await),
            Err(_) => vec![MALFORMED],
        },
        VOTE => match bincode::deserialize::<VoteRequest<NodeId>>(body) {
            Ok(rpc) => answered(&raft.vote(rpc).await),
            Err(_) => vec![MALFORMED],
        },
        SNAPSHOT => match bincode::deserialize::<InstallSnapshotRequest<TypeConfig>>(body) {
            Ok(rpc) => answered(&raft.install_snapshot(rpc).await),
            Err(_) => vec![MALFORMED],
        },
        _ => vec![MALFORMED],
    }
}
