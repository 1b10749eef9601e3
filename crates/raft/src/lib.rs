//! Replicated state machines for Warren: Raft groups on openraft.
//!
//! openraft is pinned to one exact version and stays behind this crate:
//! the rest of Warren sees [`StateMachine`] (what a replicated queue or the
//! metadata implements: apply a committed command, take and restore a
//! snapshot) and [`Node`] (a node's groups: create, write, read their
//! status). Underneath:
//!
//! - every group's log and vote are records in one shared write-ahead log
//!   ([`warren_storage::GroupLog`]), so one fsync makes the appends of all
//!   groups on a node durable (`log_store.rs`);
//! - the RPCs go over the cluster port as requests of `warren-cluster`,
//!   tagged with their group (`network.rs`);
//! - groups send no heartbeats of their own and start no elections on
//!   their own timers: the cluster's one failure detector per node pair
//!   tells [`Node`] when a leader's node went, and it starts elections in
//!   the groups that leader led (`node.rs`).

// openraft's traits return its `StorageError` (some 200 bytes); helpers
// that build it return it too rather than converting twice.
#![allow(clippy::result_large_err)]

mod batch;
mod log_store;
mod machine;
pub mod metadata;
mod network;
mod node;
mod transport;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use log_store::{KeepFrom, LogReader, LogStore, SharedLog};
pub use machine::Machine;
pub use node::{other_request, GroupStatus, Node, NodeError, NodeOptions, Submission, Submitted};
pub use transport::{Call, Transport};
pub use warren_storage::{FsyncPolicy, GroupId};

/// openraft's node id. Warren names nodes; the id is derived from the name
/// ([`node_id`]), so every node computes the same id for the same name.
pub type NodeId = u64;

/// A command for a group's state machine, as the log stores it. Shared:
/// the log's in-memory tail hands each follower's append a clone, which
/// for a `Vec` copied every body once per follower.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(#[serde(with = "shared_bytes")] pub ::bytes::Bytes);

/// A state machine's answer to one command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply(#[serde(with = "bytes")] pub Vec<u8>);

/// Byte strings through serde as bytes: serde's own `Vec<u8>` goes one
/// element at a time, which was a fifth of a leader's CPU sending appends
/// (bincode writes both the same way: a length, then the bytes).
pub(crate) mod bytes {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        // Formats without a byte type write a sequence of numbers.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(byte) = seq.next_element()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
}

/// [`bytes`] for a shared byte string (read into one buffer, as a `Vec`).
pub(crate) mod shared_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &::bytes::Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<::bytes::Bytes, D::Error> {
        super::bytes::deserialize(deserializer).map(::bytes::Bytes::from)
    }
}

openraft::declare_raft_types!(
    /// Warren's openraft configuration: opaque commands, nodes named by
    /// their cluster name (in `BasicNode::addr`), snapshots in memory.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;

/// What Warren replicates: a deterministic machine over a log of commands.
/// Every replica applies the same commands in the same order and must end
/// in the same state with the same replies.
pub trait StateMachine: Send + Sync + 'static {
    /// Applies a committed command of the entry at log `index`. Writes
    /// that arrive together share an entry, so several commands may come
    /// with the same index, in order.
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;
    /// The whole state, to be given to [`StateMachine::restore`].
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the state with a snapshot's.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
    /// Hands the machine its group's log, to read committed entries back
    /// (before it restores anything).
    fn attach(&mut self, _log: LogReader) {}
    /// The first log index whose entry the state still reads (the log is
    /// kept from there on), if any.
    fn keep_log_from(&self) -> Option<u64> {
        None
    }
    /// What makes one of this machine's snapshots stand alone for a node
    /// that has none of the log it refers to (it is sent to one that fell
    /// behind); `None` if snapshots stand alone already.
    fn exporter(&self) -> Option<Exporter> {
        None
    }
}

/// Turns a snapshot that refers to log entries into one that holds them.
pub type Exporter = Box<dyn FnOnce(Vec<u8>) -> Result<Vec<u8>, String> + Send>;

/// The node id of a node name: the first 8 bytes of its SHA-256. The
/// largest id is kept free (the log stores "voted for nobody" as it).
pub fn node_id(name: &str) -> NodeId {
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(bytes).min(u64::MAX - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_written_as_before_and_read_back() {
        let body: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let command = Command(body.clone().into());
        let written = bincode::serialize(&command).unwrap_or_default();
        assert_eq!(written, bincode::serialize(&body).unwrap_or_default(), "the layout of a Vec<u8>");
        assert_eq!(bincode::deserialize::<Command>(&written).ok(), Some(command));
        let reply: Reply =
            bincode::deserialize(&bincode::serialize(&Reply(vec![1, 2])).unwrap_or_default()).unwrap_or_default();
        assert_eq!(reply, Reply(vec![1, 2]));
    }
}
