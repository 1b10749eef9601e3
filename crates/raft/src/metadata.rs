//! The metadata group: group 0, with every node of the cluster a voter.
//!
//! It is to hold what every node must agree on (virtual hosts, users,
//! definitions, where each quorum queue's replicas are), RabbitMQ's Khepri
//! role. For now it holds the cluster's membership only, which Raft keeps
//! itself: its state machine is empty.
//!
//! Forming it needs one node to go first, and only one: the node at the
//! first seed address (in sorted order) initializes the group once it
//! reaches a majority of the seeds, with the nodes it reaches, unless one
//! of them already has the group (the first seed lost its disk). From then
//! on its leader adds every node that connects and is not yet a member
//! (nodes started later join this way).

use std::time::Duration;

use tracing::{info, warn};
use warren_cluster::Members;

use crate::{GroupId, Machine, Node, StateMachine};

pub const METADATA: GroupId = 0;

/// The metadata group's state machine: nothing beyond the membership yet.
#[derive(Default)]
pub struct Metadata;

impl StateMachine for Metadata {
    fn apply(&mut self, _index: u64, _command: &[u8]) -> Vec<u8> {
        Vec::new()
    }

    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }

    fn restore(&mut self, _snapshot: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// How often formation and joining are looked at.
const EVERY: Duration = Duration::from_millis(200);

/// Starts the metadata group on this node with `state` as its machine
/// ([`Metadata`] when the broker keeps nothing there) and keeps its
/// membership: forms it (on the first seed), adds nodes that join (on the
/// leader).
pub async fn start<S: StateMachine>(node: &Node, members: Members, state: S) -> Result<Machine<S>, crate::NodeError> {
    let machine = node.create_group(METADATA, state).await?;
    let node = node.clone();
    tokio::spawn(async move {
        let mut first_seeds: Vec<String> = members.seeds().to_vec();
        first_seeds.sort();
        let first = first_seeds.first().cloned();
        loop {
            tokio::time::sleep(EVERY).await;
            let Some(status) = node.status(METADATA) else { return };
            let up: Vec<String> = members.status().into_iter().filter(|p| p.up).map(|p| p.name).collect();
            if status.voters.is_empty() {
                let majority = (up.len() + 1) * 2 > members.seeds().len();
                if first.is_some() && members.own_seed() == first && majority {
                    // A first seed that lost its disk finds the group on the
                    // others (their leader brings it up to date).
                    match node.formed_elsewhere(METADATA).await {
                        Ok(false) => {}
                        Ok(true) => continue,
                        Err(e) => {
                            warn!(%e, "cannot tell whether the metadata group exists");
                            continue;
                        }
                    }
                    let mut voters = up.clone();
                    voters.push(node.name().to_string());
                    info!(?voters, "forming the cluster's metadata group");
                    if let Err(e) = node.initialize(METADATA, &voters).await {
                        warn!(%e, "forming the metadata group failed");
                    }
                }
                continue;
            }
            if status.state == "Leader" {
                for name in up.iter().filter(|n| !status.voters.contains(n)) {
                    info!(node = %name, "adding a node to the metadata group");
                    if let Err(e) = node.add_member(METADATA, name).await {
                        warn!(node = %name, %e, "adding a node to the metadata group failed");
                    }
                }
            }
        }
    });
    Ok(machine)
}
