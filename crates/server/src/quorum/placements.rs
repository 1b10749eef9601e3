//! What the metadata group holds for quorum queues: where each one is
//! placed (its group and the nodes holding its replicas) and its
//! arguments. Every node applies the same placements and starts the
//! groups it is a member of.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;
use warren_codec::types::FieldTable;
use warren_raft::{GroupId, StateMachine};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub vhost: String,
    pub name: String,
    pub group: GroupId,
    /// The nodes holding replicas; the first declared the queue (and
    /// leads it first: `client-local`).
    pub members: Vec<String>,
    pub arguments: FieldTable,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Change {
    Declare {
        vhost: String,
        name: String,
        members: Vec<String>,
        arguments: FieldTable,
    },
    Delete {
        vhost: String,
        name: String,
    },
    /// A replica of the queue is to be on `node` (`add`) or not any more
    /// (`add_member`, `delete_member`, `grow`, `shrink`): a new member
    /// starts the group, the leader changes the group's membership, and a
    /// member left out drops its replica once the group no longer counts
    /// it. Applied to the members the log has by then (two changes at once
    /// both count), never removing the last one.
    Member {
        vhost: String,
        name: String,
        node: String,
        add: bool,
    },
    /// Node `node` left the cluster for good (`forget_cluster_node`): it
    /// leaves every queue it is a member of (but not a queue's last).
    Forget {
        node: String,
    },
}

/// What applying changed, for the node to act on.
#[derive(Debug)]
pub enum Event {
    Placed(Placement),
    Removed { vhost: String, name: String, group: GroupId },
    Forgotten(String),
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    placements: BTreeMap<(String, String), Placement>,
    /// Group ids are never reused (0 is the metadata group).
    next_group: GroupId,
    /// Nodes removed from the cluster.
    #[serde(default)]
    forgotten: std::collections::BTreeSet<String>,
}

#[derive(Default)]
pub struct Placements {
    state: State,
    events: Option<UnboundedSender<Event>>,
}

impl Placements {
    pub fn new(events: UnboundedSender<Event>) -> Placements {
        Placements { state: State::default(), events: Some(events) }
    }

    pub fn get(&self, vhost: &str, name: &str) -> Option<&Placement> {
        self.state.placements.get(&(vhost.to_string(), name.to_string()))
    }

    /// The nodes removed from the cluster.
    pub fn forgotten(&self) -> &std::collections::BTreeSet<String> {
        &self.state.forgotten
    }

    /// Every placement, in (vhost, name) order.
    pub fn all(&self) -> Vec<Placement> {
        self.state.placements.values().cloned().collect()
    }

    /// How many queues each node was placed first for (it led them first).
    pub fn first_members(&self) -> std::collections::HashMap<String, usize> {
        let mut counts = std::collections::HashMap::new();
        for placement in self.state.placements.values() {
            if let Some(first) = placement.members.first() {
                *counts.entry(first.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    fn tell(&self, event: Event) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }
}

impl StateMachine for Placements {
    /// Answers a declaration with its group (the existing one if the queue
    /// was placed already).
    fn apply(&mut self, _index: u64, command: &[u8]) -> Vec<u8> {
        match serde_json::from_slice::<Change>(command) {
            Ok(Change::Declare { vhost, name, members, arguments }) => {
                let key = (vhost.clone(), name.clone());
                if let Some(existing) = self.state.placements.get(&key) {
                    return existing.group.to_le_bytes().to_vec();
                }
                self.state.next_group = self.state.next_group.max(1);
                let group = self.state.next_group;
                self.state.next_group += 1;
                let placement = Placement { vhost, name, group, members, arguments };
                self.state.placements.insert(key, placement.clone());
                self.tell(Event::Placed(placement));
                group.to_le_bytes().to_vec()
            }
            Ok(Change::Member { vhost, name, node, add }) => {
                if let Some(placement) = self.state.placements.get_mut(&(vhost, name)) {
                    let member = placement.members.contains(&node);
                    if add && !member {
                        placement.members.push(node);
                    } else if !add && member && placement.members.len() > 1 {
                        placement.members.retain(|m| *m != node);
                    }
                    let placement = placement.clone();
                    self.tell(Event::Placed(placement));
                }
                Vec::new()
            }
            Ok(Change::Forget { node }) => {
                let mut changed = Vec::new();
                for placement in self.state.placements.values_mut() {
                    if placement.members.contains(&node) && placement.members.len() > 1 {
                        placement.members.retain(|m| *m != node);
                        changed.push(placement.clone());
                    }
                }
                for placement in changed {
                    self.tell(Event::Placed(placement));
                }
                self.state.forgotten.insert(node.clone());
                self.tell(Event::Forgotten(node));
                Vec::new()
            }
            Ok(Change::Delete { vhost, name }) => {
                if let Some(gone) = self.state.placements.remove(&(vhost, name)) {
                    self.tell(Event::Removed { vhost: gone.vhost, name: gone.name, group: gone.group });
                }
                Vec::new()
            }
            Err(error) => {
                tracing::error!(%error, "unreadable metadata command ignored");
                Vec::new()
            }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.state).unwrap_or_default()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let state: State = if snapshot.is_empty() {
            State::default()
        } else {
            serde_json::from_slice(snapshot).map_err(|e| e.to_string())?
        };
        for placement in state.placements.values() {
            self.tell(Event::Placed(placement.clone()));
        }
        for node in &state.forgotten {
            self.tell(Event::Forgotten(node.clone()));
        }
        self.state = state;
        Ok(())
    }
}
