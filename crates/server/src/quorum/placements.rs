//! What the metadata group holds: where each quorum queue is placed (its
//! group and the nodes holding its replicas) and its arguments, which node
//! each classic queue is on (reachable from every node), and the
//! durable exchanges and the bindings every node routes by (those between
//! exchanges, and those to quorum queues). Every node applies the same
//! placements and starts the groups it is a member of, and makes its
//! virtual hosts' exchanges and bindings follow the log's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;
use warren_codec::types::FieldTable;
use warren_core::vhost::{BindingDefinition, Definitions, ExchangeDefinition, SharedQueue};
use warren_raft::{GroupId, StateMachine};

use crate::access::AccessDefinitions;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub vhost: String,
    pub name: String,
    pub group: GroupId,
    /// The nodes holding replicas; the first declared the queue (and
    /// leads it first: `client-local`).
    pub members: Vec<String>,
    pub arguments: FieldTable,
    /// A classic queue: it lives on its one member (its home node) and
    /// nowhere else; the group is never started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classic: Option<Classic>,
}

/// What a classic queue's stand-ins elsewhere must answer as it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Classic {
    pub durable: bool,
    pub auto_delete: bool,
    /// Only its declaring connection may use it; every node may publish
    /// to it.
    #[serde(default)]
    pub exclusive: bool,
}

impl Classic {
    /// What queue `queue` of this node is to its stand-ins elsewhere.
    pub fn of(queue: &SharedQueue) -> Classic {
        Classic { durable: queue.durable, auto_delete: queue.auto_delete, exclusive: queue.exclusive }
    }

    /// The stand-in to declare for it, with its arguments.
    pub fn stand_in(self, arguments: FieldTable) -> SharedQueue {
        SharedQueue { durable: self.durable, auto_delete: self.auto_delete, exclusive: self.exclusive, arguments }
    }
}

impl Placement {
    /// The node a classic queue lives on.
    pub fn home(&self) -> Option<&str> {
        self.classic.and(self.members.first().map(String::as_str))
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Change {
    Declare {
        vhost: String,
        name: String,
        members: Vec<String>,
        arguments: FieldTable,
        #[serde(default)]
        classic: Option<Classic>,
    },
    Delete {
        vhost: String,
        name: String,
        /// The run of the node that asked (0: none known).
        #[serde(default)]
        origin: u64,
    },
    /// A replica of the queue is to be on `node` (`add`) or not any more
    /// (`add_member`, `delete_member`, `grow`, `shrink`): a new member
    /// starts the group, the leader changes the group's membership, and a
    /// member left out drops its replica once the group no longer counts
    /// it. Applied to the members the log has by then (two changes at once
    /// both count), never removing the last one.
    Member { vhost: String, name: String, node: String, add: bool },
    /// Node `node` left the cluster for good (`forget_cluster_node`): it
    /// leaves every queue it is a member of (but not a quorum queue's
    /// last); its classic queues are gone with it.
    Forget { node: String },
    /// Exchanges and bindings changed on one node (`origin`: its run,
    /// which has them already): every other node makes the same changes.
    Definitions { vhost: String, origin: u64, changes: Vec<Definition> },
    /// Changes written together, applied in order (what one node had
    /// waiting to be written).
    Batch(Vec<Change>),
    /// Users, virtual hosts, permissions, limits and policies changed on
    /// the node of run `origin`: the whole access file, as it is there now.
    Access { origin: u64, definitions: Box<AccessDefinitions> },
}

/// A change of the definitions every node routes by.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Definition {
    Exchange(ExchangeDefinition),
    /// A non-durable exchange (known on every node while the cluster
    /// keeps its metadata, as RabbitMQ's are while a node of it runs).
    TransientExchange(ExchangeDefinition),
    ExchangeDeleted(String),
    Bound(BindingDefinition),
    Unbound(BindingDefinition),
}

/// What applying changed, for the node to act on.
#[derive(Debug)]
pub enum Event {
    Placed(Placement),
    Removed {
        vhost: String,
        name: String,
        group: GroupId,
        /// The run of the node that asked.
        origin: u64,
    },
    Forgotten(String),
    /// Definitions changed on the node of run `origin`.
    Defined {
        vhost: String,
        origin: u64,
        changes: Vec<Definition>,
    },
    /// A snapshot was restored: every definition it holds, by vhost (and
    /// the non-durable exchanges).
    Known(BTreeMap<String, Definitions>, BTreeMap<String, Vec<ExchangeDefinition>>),
    /// The access file changed on the node of run `origin` (0: restored).
    Access {
        origin: u64,
        definitions: Box<AccessDefinitions>,
    },
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    /// Stored as a list (JSON maps take string keys only).
    #[serde(with = "by_queue")]
    placements: BTreeMap<(String, String), Placement>,
    /// Group ids are never reused (0 is the metadata group).
    next_group: GroupId,
    /// Nodes removed from the cluster.
    #[serde(default)]
    forgotten: std::collections::BTreeSet<String>,
    /// vhost -> its replicated exchanges and bindings (no queues).
    #[serde(default)]
    definitions: BTreeMap<String, Definitions>,
    /// The access file as last changed on any node.
    #[serde(default)]
    access: Option<Box<AccessDefinitions>>,
    /// vhost -> its non-durable exchanges.
    #[serde(default)]
    transient: BTreeMap<String, Vec<ExchangeDefinition>>,
}

/// Placements keyed by (vhost, name), written as the list of placements.
mod by_queue {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::Placement;

    type Keyed = BTreeMap<(String, String), Placement>;

    pub fn serialize<S: Serializer>(placements: &Keyed, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(placements.values())
    }

    /// A list; or a map, which only an empty one could have been written as.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        List(Vec<Placement>),
        Map(BTreeMap<String, Placement>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Keyed, D::Error> {
        let placements = match Written::deserialize(deserializer)? {
            Written::List(list) => list,
            Written::Map(map) => map.into_values().collect(),
        };
        Ok(placements.into_iter().map(|p| ((p.vhost.clone(), p.name.clone()), p)).collect())
    }
}

impl State {
    fn define(&mut self, vhost: &str, change: &Definition) {
        let transient = self.transient.entry(vhost.to_string()).or_default();
        match change {
            Definition::TransientExchange(exchange) => {
                transient.retain(|x| x.name != exchange.name);
                transient.push(exchange.clone());
            }
            Definition::Exchange(exchange) => transient.retain(|x| x.name != exchange.name),
            Definition::ExchangeDeleted(name) => transient.retain(|x| x.name != *name),
            Definition::Bound(_) | Definition::Unbound(_) => {}
        }
        if transient.is_empty() {
            self.transient.remove(vhost);
        }
        let definitions = self.definitions.entry(vhost.to_string()).or_default();
        match change {
            Definition::TransientExchange(exchange) => definitions.exchanges.retain(|x| x.name != exchange.name),
            Definition::Exchange(exchange) => {
                definitions.exchanges.retain(|x| x.name != exchange.name);
                definitions.exchanges.push(exchange.clone());
            }
            Definition::ExchangeDeleted(name) => {
                definitions.exchanges.retain(|x| x.name != *name);
                definitions
                    .bindings
                    .retain(|b| b.source != *name && (b.destination_is_queue || b.destination != *name));
            }
            Definition::Bound(binding) => {
                if !definitions.bindings.contains(binding) {
                    definitions.bindings.push(binding.clone());
                }
            }
            Definition::Unbound(binding) => definitions.bindings.retain(|b| b != binding),
        }
        if definitions.exchanges.is_empty() && definitions.bindings.is_empty() {
            self.definitions.remove(vhost);
        }
    }

    /// A deleted quorum queue's bindings go with it.
    fn unbind_queue(&mut self, vhost: &str, name: &str) {
        if let Some(definitions) = self.definitions.get_mut(vhost) {
            definitions.bindings.retain(|b| !(b.destination_is_queue && b.destination == name));
        }
    }
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
        for placement in self.state.placements.values().filter(|p| p.classic.is_none()) {
            if let Some(first) = placement.members.first() {
                *counts.entry(first.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The names of the queues placed in `vhost`.
    pub fn names_in(&self, vhost: &str) -> std::collections::HashSet<String> {
        self.state.placements.keys().filter(|(v, _)| v == vhost).map(|(_, name)| name.clone()).collect()
    }

    /// The classic queues placed on `node`: (vhost, name) each.
    pub fn homed_at(&self, node: &str) -> Vec<(String, String)> {
        self.state.placements.iter().filter(|(_, p)| p.home() == Some(node)).map(|(key, _)| key.clone()).collect()
    }

    /// Whether exchange `name` is known to every node (durable or not).
    pub fn has_exchange(&self, vhost: &str, name: &str) -> bool {
        let known = |list: Option<&Vec<ExchangeDefinition>>| list.is_some_and(|l| l.iter().any(|x| x.name == name));
        known(self.state.transient.get(vhost)) || known(self.state.definitions.get(vhost).map(|d| &d.exchanges))
    }

    /// The replicated bindings to queue `name`.
    pub fn bindings_to(&self, vhost: &str, name: &str) -> Vec<BindingDefinition> {
        self.state.definitions.get(vhost).map_or_else(Vec::new, |d| {
            d.bindings.iter().filter(|b| b.destination_is_queue && b.destination == name).cloned().collect()
        })
    }

    /// Applies one change (a batch, each of its changes in order).
    fn apply_change(&mut self, change: Change) -> Vec<u8> {
        match change {
            Change::Batch(changes) => {
                for change in changes {
                    self.apply_change(change);
                }
                Vec::new()
            }
            Change::Declare { vhost, name, members, arguments, classic } => {
                let key = (vhost.clone(), name.clone());
                if let Some(existing) = self.state.placements.get(&key) {
                    return existing.group.to_le_bytes().to_vec();
                }
                self.state.next_group = self.state.next_group.max(1);
                let group = self.state.next_group;
                self.state.next_group += 1;
                let placement = Placement { vhost, name, group, members, arguments, classic };
                self.state.placements.insert(key, placement.clone());
                self.tell(Event::Placed(placement));
                group.to_le_bytes().to_vec()
            }
            Change::Member { vhost, name, node, add } => {
                let key = (vhost, name);
                if let Some(placement) = self.state.placements.get_mut(&key).filter(|p| p.classic.is_none()) {
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
            Change::Forget { node } => {
                let lost: Vec<(String, String)> = (self.state.placements.iter())
                    .filter(|(_, p)| p.home() == Some(node.as_str()))
                    .map(|(key, _)| key.clone())
                    .collect();
                for (vhost, name) in lost {
                    self.remove(vhost, name, 0);
                }
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
            Change::Definitions { vhost, origin, changes } => {
                for change in &changes {
                    self.state.define(&vhost, change);
                }
                self.tell(Event::Defined { vhost, origin, changes });
                Vec::new()
            }
            Change::Access { origin, definitions } => {
                self.state.access = Some(definitions.clone());
                self.tell(Event::Access { origin, definitions });
                Vec::new()
            }
            Change::Delete { vhost, name, origin } => {
                self.remove(vhost, name, origin);
                Vec::new()
            }
        }
    }

    fn remove(&mut self, vhost: String, name: String, origin: u64) {
        self.state.unbind_queue(&vhost, &name);
        if let Some(gone) = self.state.placements.remove(&(vhost, name)) {
            self.tell(Event::Removed { vhost: gone.vhost, name: gone.name, group: gone.group, origin });
        }
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
            Ok(change) => self.apply_change(change),
            Err(error) => {
                tracing::error!(%error, "unreadable metadata command ignored");
                Vec::new()
            }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.state).unwrap_or_else(|error| {
            // Nothing in the state can fail to serialize; an empty
            // snapshot would lose every placement.
            tracing::error!(%error, "the metadata snapshot could not be written");
            Vec::new()
        })
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let state: State = if snapshot.is_empty() {
            State::default()
        } else {
            serde_json::from_slice(snapshot).map_err(|e| e.to_string())?
        };
        // Placements the snapshot no longer has were removed meanwhile.
        for (key, gone) in &self.state.placements {
            if !state.placements.contains_key(key) {
                let (vhost, name, group) = (gone.vhost.clone(), gone.name.clone(), gone.group);
                self.tell(Event::Removed { vhost, name, group, origin: 0 });
            }
        }
        for placement in state.placements.values() {
            self.tell(Event::Placed(placement.clone()));
        }
        for node in &state.forgotten {
            self.tell(Event::Forgotten(node.clone()));
        }
        if let Some(definitions) = &state.access {
            self.tell(Event::Access { origin: 0, definitions: definitions.clone() });
        }
        if !state.definitions.is_empty() || !state.transient.is_empty() {
            self.tell(Event::Known(state.definitions.clone(), state.transient.clone()));
        }
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::definitions::tests::binding;

    fn exchange(name: &str, kind: &str) -> ExchangeDefinition {
        ExchangeDefinition {
            name: name.into(),
            kind: kind.into(),
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        }
    }

    fn apply(machine: &mut Placements, change: &Change) {
        let command = serde_json::to_vec(change).unwrap_or_default();
        machine.apply(1, &command);
    }

    #[test]
    fn definitions_follow_the_log_and_survive_a_snapshot() {
        let (events, mut told) = tokio::sync::mpsc::unbounded_channel();
        let mut machine = Placements::new(events);
        let changes = vec![
            Definition::Exchange(exchange("orders", "fanout")),
            Definition::Exchange(exchange("orders", "topic")),
            Definition::Exchange(exchange("audit", "fanout")),
            Definition::Bound(binding("orders", "q", true)),
            Definition::Bound(binding("orders", "q", true)),
            Definition::Bound(binding("orders", "audit", false)),
            Definition::Bound(binding("audit", "q", true)),
        ];
        apply(&mut machine, &Change::Definitions { vhost: "/".into(), origin: 7, changes: changes.clone() });
        assert!(matches!(told.try_recv(), Ok(Event::Defined { origin: 7, changes: c, .. }) if c == changes));
        assert_eq!(machine.bindings_to("/", "q").len(), 2, "a binding made twice is kept once");
        let defined = &machine.state.definitions["/"];
        assert_eq!(defined.exchanges.len(), 2);
        assert_eq!(defined.exchanges.iter().find(|x| x.name == "orders").map(|x| x.kind.as_str()), Some("topic"));

        // Deleting an exchange takes the bindings from and to it; deleting
        // a quorum queue takes those to it.
        let deleted = vec![Definition::ExchangeDeleted("audit".into())];
        apply(&mut machine, &Change::Definitions { vhost: "/".into(), origin: 8, changes: deleted });
        assert_eq!(machine.bindings_to("/", "q"), vec![binding("orders", "q", true)]);
        assert_eq!(machine.state.definitions["/"].bindings.len(), 1, "orders -> audit went too");
        apply(&mut machine, &Change::Delete { vhost: "/".into(), name: "q".into(), origin: 0 });
        assert!(machine.bindings_to("/", "q").is_empty());

        // A restored snapshot tells every definition it holds.
        let again = vec![Definition::Bound(binding("orders", "q", true))];
        apply(&mut machine, &Change::Definitions { vhost: "/".into(), origin: 9, changes: again });
        let snapshot = machine.snapshot();
        let (events, mut told) = tokio::sync::mpsc::unbounded_channel();
        let mut restored = Placements::new(events);
        assert_eq!(restored.restore(&snapshot), Ok(()));
        match told.try_recv() {
            Ok(Event::Known(known, _)) => {
                assert_eq!(known["/"].exchanges.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(), ["orders"]);
                assert_eq!(known["/"].bindings, vec![binding("orders", "q", true)]);
            }
            other => panic!("expected the known definitions, got {other:?}"),
        }
        // Snapshots written before definitions were kept still restore.
        assert_eq!(restored.restore(br#"{"placements":{},"next_group":3}"#), Ok(()));
        assert!(restored.bindings_to("/", "q").is_empty());
    }

    #[test]
    fn placements_survive_a_snapshot() {
        let mut machine = Placements::default();
        let declare = Change::Declare {
            vhost: "/".into(),
            name: "q".into(),
            members: vec!["a".into()],
            arguments: FieldTable::default(),
            classic: None,
        };
        machine.apply(1, &serde_json::to_vec(&declare).unwrap_or_default());
        let snapshot = machine.snapshot();
        let mut restored = Placements::default();
        assert_eq!(restored.restore(&snapshot), Ok(()));
        assert!(restored.get("/", "q").is_some(), "snapshot: {}", String::from_utf8_lossy(&snapshot));
    }

    #[test]
    fn classic_queues_are_placed_on_their_home_and_go_with_a_forgotten_node() {
        let (events, mut told) = tokio::sync::mpsc::unbounded_channel();
        let mut machine = Placements::new(events);
        let classic = |name: &str, home: &str| Change::Declare {
            vhost: "/".into(),
            name: name.into(),
            members: vec![home.into()],
            arguments: FieldTable::default(),
            classic: Some(Classic { durable: true, auto_delete: false, exclusive: false }),
        };
        apply(&mut machine, &classic("jobs", "a"));
        apply(&mut machine, &classic("mail", "b"));
        // Declared again elsewhere: the first placement stands.
        apply(&mut machine, &classic("jobs", "b"));
        assert_eq!(machine.get("/", "jobs").and_then(Placement::home), Some("a"));
        assert_eq!(machine.homed_at("a"), vec![("/".to_string(), "jobs".to_string())]);
        // A classic queue takes no members and leads nothing for `balanced`.
        let member = Change::Member { vhost: "/".into(), name: "jobs".into(), node: "c".into(), add: true };
        apply(&mut machine, &member);
        assert_eq!(machine.get("/", "jobs").map(|p| p.members.clone()), Some(vec!["a".to_string()]));
        assert!(machine.first_members().is_empty());
        let snapshot = machine.snapshot();

        // Its home forgotten, a classic queue is gone.
        apply(&mut machine, &Change::Forget { node: "a".into() });
        assert!(machine.get("/", "jobs").is_none());
        let mut removed = Vec::new();
        while let Ok(event) = told.try_recv() {
            if let Event::Removed { name, .. } = event {
                removed.push(name);
            }
        }
        assert_eq!(removed, ["jobs"]);

        // A snapshot without a placement held here tells of its removal.
        let (events, mut told) = tokio::sync::mpsc::unbounded_channel();
        let mut restored = Placements::new(events);
        assert_eq!(restored.restore(&snapshot), Ok(()));
        while told.try_recv().is_ok() {}
        assert_eq!(restored.restore(&machine.snapshot()), Ok(()));
        let mut removed = Vec::new();
        while let Ok(event) = told.try_recv() {
            if let Event::Removed { name, origin, .. } = event {
                removed.push((name, origin));
            }
        }
        assert_eq!(removed, [("jobs".to_string(), 0)]);
    }

    #[test]
    fn a_batch_applies_its_changes_in_order() {
        let (events, _told) = tokio::sync::mpsc::unbounded_channel();
        let mut machine = Placements::new(events);
        let declare = |name: &str| Change::Declare {
            vhost: "/".into(),
            name: name.into(),
            members: vec!["a".into()],
            arguments: FieldTable::default(),
            classic: Some(Classic { durable: false, auto_delete: false, exclusive: true }),
        };
        let changes = [
            serde_json::to_vec(&declare("r1")).unwrap_or_default(),
            serde_json::to_vec(&declare("r2")).unwrap_or_default(),
            serde_json::to_vec(&Change::Delete { vhost: "/".into(), name: "r1".into(), origin: 3 }).unwrap_or_default(),
        ];
        // As the writer joins them: the commands side by side.
        let command = [&b"{\"Batch\":["[..], &changes.join(&b","[..]), b"]}"].concat();
        machine.apply(1, &command);
        assert!(machine.get("/", "r1").is_none());
        assert_eq!(machine.homed_at("a"), vec![("/".to_string(), "r2".to_string())]);
    }
}
