//! Raft groups on three nodes over the real cluster transport (TCP on
//! 127.0.0.1, the shared-secret handshake, the failure detector), with
//! real files: replication, a leader's node going away, a node restarting
//! from its data, and a new member catching up from a snapshot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use warren_cluster::{Cluster, ClusterConfig};
use warren_raft::{Machine, Node, NodeError, NodeOptions, StateMachine};

/// Remembers every command in order.
#[derive(Default)]
struct Journal(Vec<Vec<u8>>);

impl StateMachine for Journal {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        self.0.push(command.to_vec());
        index.to_le_bytes().to_vec()
    }

    fn snapshot(&self) -> Vec<u8> {
        self.0.join(&b"\n"[..])
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.0 = if snapshot.is_empty() {
            Vec::new()
        } else {
            snapshot.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
        };
        Ok(())
    }
}

struct Member {
    node: Node,
    cluster: Cluster,
    machine: Machine<Journal>,
}

const GROUP: u64 = 42;

async fn start(name: &str, dir: &Path, listener: TcpListener, seeds: &[String], snapshot_every: u64) -> Member {
    let node = Node::open(name, dir, NodeOptions { snapshot_every, ..NodeOptions::default() }).unwrap();
    let config = ClusterConfig { node_name: name.into(), seeds: seeds.to_vec(), secret: b"cookie".to_vec() };
    let cluster = Cluster::start_with(config, listener, node.handler()).unwrap();
    node.attach(Arc::new(cluster.members()));
    let machine = node.create_group(GROUP, Journal::default()).await.unwrap();
    Member { node, cluster, machine }
}

async fn eventually<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "never happened within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `count` members of the group (a, b, c, ...) on 127.0.0.1, in the
/// first `count` of `dirs`, the group set up: (their names, the seeds,
/// the members).
async fn start_members(
    count: usize,
    dirs: &[tempfile::TempDir],
    snapshot_every: u64,
) -> (Vec<String>, Vec<String>, BTreeMap<String, Member>) {
    let mut listeners = Vec::new();
    for _ in 0..count {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let seeds: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let names: Vec<String> = ["a", "b", "c", "d", "e"].iter().take(count).map(|n| n.to_string()).collect();
    let mut members = BTreeMap::new();
    for ((name, listener), dir) in names.iter().zip(listeners).zip(dirs) {
        members.insert(name.clone(), start(name, dir.path(), listener, &seeds, snapshot_every).await);
    }
    members["a"].node.initialize(GROUP, &names).await.unwrap();
    (names, seeds, members)
}

/// The member that is leader, as its own node says.
fn leader(members: &BTreeMap<String, Member>) -> Option<String> {
    members
        .iter()
        .find(|(_, m)| m.node.status(GROUP).is_some_and(|s| s.state == "Leader"))
        .map(|(name, _)| name.clone())
}

/// Writes `command` through whichever member leads, retrying while there
/// is none; returns the log index it was committed at.
async fn write(members: &BTreeMap<String, Member>, command: &[u8]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(name) = leader(members) {
            match members[&name].node.write(GROUP, command.to_vec()).await {
                Ok(reply) => return u64::from_le_bytes(reply.try_into().unwrap()),
                Err(NodeError::NotLeader { .. } | NodeError::Raft(..)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert!(Instant::now() < deadline, "no leader took {command:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What `member` applied. A write retried across a change of leader may
/// have been committed by the old leader as well: once more, right after.
fn journal(member: &Member) -> Vec<Vec<u8>> {
    let mut applied = member.machine.with(|j| j.0.clone());
    applied.dedup();
    applied
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_replicates_fails_over_and_members_catch_up() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (names, seeds, mut members) = start_members(3, &dirs, 50).await;
    eventually("a leader", Duration::from_secs(5), || leader(&members)).await;

    // Every write is committed at the next index, and every replica
    // applies the same commands in the same order.
    let mut written = Vec::new();
    for i in 0..120u32 {
        let command = format!("m{i}").into_bytes();
        write(&members, &command).await;
        written.push(command);
    }
    let applied_all = tokio::time::timeout(Duration::from_secs(5), async {
        while !members.values().all(|m| journal(m) == written) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    if applied_all.await.is_err() {
        let seen: Vec<_> = members.values().map(|m| (journal(m).len(), m.node.status(GROUP))).collect();
        panic!("not every member applied all {} within 5 s: {seen:?}", written.len());
    }
    // (A loaded machine may have seen an election meanwhile.)
    let first = eventually("a leader", Duration::from_secs(5), || leader(&members)).await;
    let status = members[&first].node.status(GROUP).unwrap();
    assert_eq!(status.voters.len(), 3);
    assert_eq!(status.matched.len(), 3, "the leader reports each member: {status:?}");

    // The leader's node goes (its connections close): the failure
    // detector sees it and the others elect a new leader.
    let gone = members.remove(&first).unwrap();
    let went = Instant::now();
    gone.cluster.stop().await;
    gone.node.shutdown().await;
    write(&members, b"after").await;
    let failover = went.elapsed();
    written.push(b"after".to_vec());
    let second = leader(&members).unwrap();
    assert_ne!(second, first);
    println!("writes accepted again {failover:?} after the leader's node went");
    assert!(failover < Duration::from_secs(5), "failover took {failover:?}");

    // Two of three carry on: a majority.
    for i in 120..200u32 {
        let command = format!("m{i}").into_bytes();
        write(&members, &command).await;
        written.push(command);
    }

    // The old leader comes back from its data (on a new port) and catches
    // up; it does not lead on its old term.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = dirs[names.iter().position(|n| *n == first).unwrap()].path();
    let back = start(&first, dir, listener, &seeds, 50).await;
    assert_ne!(back.node.status(GROUP).unwrap().state, "Leader");
    members.insert(first.clone(), back);
    write(&members, b"welcome back").await;
    written.push(b"welcome back".to_vec());
    eventually("the restarted member caught up", Duration::from_secs(10), || {
        (journal(&members[&first]) == written).then_some(())
    })
    .await;

    // A new node joins the group: the log before the last snapshot is
    // gone, so it starts from the snapshot.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let d = start("d", dirs[3].path(), listener, &seeds, 50).await;
    let leader_name = eventually("a leader", Duration::from_secs(5), || leader(&members)).await;
    eventually("d is connected", Duration::from_secs(5), || {
        members[&leader_name].cluster.status().iter().any(|p| p.name == "d" && p.up).then_some(())
    })
    .await;
    let purged = members[&leader_name].node.status(GROUP).unwrap().purged_index;
    assert!(purged.is_some_and(|p| p > 0), "the leader forgot the log before its snapshot: {purged:?}");
    members[&leader_name].node.add_member(GROUP, "d").await.unwrap();
    members.insert("d".into(), d);
    write(&members, b"four").await;
    written.push(b"four".to_vec());
    eventually("d caught up", Duration::from_secs(10), || (journal(&members["d"]) == written).then_some(())).await;
    let d_status = members["d"].node.status(GROUP).unwrap();
    assert_eq!(d_status.voters.len(), 4, "{d_status:?}");
    assert_eq!(members["d"].machine.snapshots_installed(), 1, "d was given a snapshot");
    assert!(dirs[3].path().join("snapshots").read_dir().unwrap().count() > 0, "and keeps it on disk");

    for member in members.values() {
        member.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_its_group_over() {
    hand_over_in(3).await;
}

/// In a group of five the candidate needs a member's vote besides the
/// leader's: it stands once that member's lease on the leader ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_a_group_of_five_over() {
    hand_over_in(5).await;
}

async fn hand_over_in(count: usize) {
    let dirs: Vec<tempfile::TempDir> = (0..count).map(|_| tempfile::tempdir().unwrap()).collect();
    let (_, _, mut members) = start_members(count, &dirs, 1000).await;
    eventually("a leader", Duration::from_secs(5), || leader(&members)).await;
    let mut written = Vec::new();
    for i in 0..50u32 {
        let command = format!("m{i}").into_bytes();
        write(&members, &command).await;
        written.push(command);
    }
    // A leader refuses votes for a lease's length after its election (as
    // its members do on its behalf): one that has led a while hands over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = eventually("a leader", Duration::from_secs(5), || leader(&members)).await;
    let term = members[&first].node.status(GROUP).unwrap().term;

    // Asked to hand over, the leader gets a member with its whole log
    // elected while it still runs: no member waits out a lease.
    let (handed, led) = members[&first].node.hand_over(Duration::from_secs(5)).await;
    assert_eq!((handed, led), (1, 1));
    assert_ne!(members[&first].node.status(GROUP).unwrap().state, "Leader");
    let second = eventually("the new leader", Duration::from_secs(5), || leader(&members)).await;
    assert_ne!(second, first);
    // (At the first try, term + 1, unless a loaded machine delayed the
    // candidate past its lease.)
    assert!(members[&second].node.status(GROUP).unwrap().term > term);

    // The old leader's node stops; the group carries on with every entry.
    let gone = members.remove(&first).unwrap();
    gone.cluster.stop().await;
    gone.node.shutdown().await;
    write(&members, b"after").await;
    written.push(b"after".to_vec());
    eventually("the others applied all", Duration::from_secs(5), || {
        members.values().all(|m| journal(m) == written).then_some(())
    })
    .await;
    for member in members.values() {
        member.node.shutdown().await;
    }
}
