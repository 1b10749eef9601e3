//! Replicated writes: three nodes in one process over the real cluster
//! transport (TCP on 127.0.0.1) and real files, `GROUPS` groups, `WRITERS`
//! concurrent writers per group, each writing `SIZE`-byte commands for
//! `SECONDS`. Prints writes/s, the shared log's fsyncs and entries per
//! fsync on each node, and the process's CPU time per write (all three
//! nodes together).
//!
//! `cargo bench -p warren-raft --bench replication -- GROUPS WRITERS SECONDS SIZE [DIR]`

#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use warren_cluster::{Cluster, ClusterConfig};
use warren_raft::{Node, NodeOptions, StateMachine};

/// Counts commands and bytes; keeps nothing.
#[derive(Default)]
struct Counter(u64, u64);

impl StateMachine for Counter {
    fn apply(&mut self, _index: u64, command: &[u8]) -> Vec<u8> {
        self.0 += 1;
        self.1 += command.len() as u64;
        Vec::new()
    }

    fn snapshot(&self) -> Vec<u8> {
        [self.0.to_le_bytes(), self.1.to_le_bytes()].concat()
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let field = |at: usize| {
            snapshot.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).ok_or("short snapshot")
        };
        *self = Counter(field(0)?, field(8)?);
        Ok(())
    }
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime, fields 14 and 15 of the line (11 and 12 after the name).
    (ticks(11) + ticks(12)) / 100.0
}

fn arg(args: &[String], i: usize, default: u64) -> u64 {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let (groups, writers, seconds, size) =
        (arg(&args, 0, 1), arg(&args, 1, 64), arg(&args, 2, 5), arg(&args, 3, 1024) as usize);
    let base = match args.get(4) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::env::temp_dir(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let dir = tempfile::tempdir_in(&base)?;
        let mut listeners = Vec::new();
        for _ in 0..3 {
            listeners.push(TcpListener::bind("127.0.0.1:0").await?);
        }
        let seeds: Vec<String> = listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.to_string()).collect();
        let names: Vec<String> = ["a", "b", "c"].iter().map(|n| n.to_string()).collect();
        let mut nodes = Vec::new();
        let mut clusters = Vec::new();
        for (name, listener) in names.iter().zip(listeners) {
            let node = Node::open(name, &dir.path().join(name), NodeOptions::default())?;
            let config = ClusterConfig { node_name: name.clone(), seeds: seeds.clone(), secret: b"bench".to_vec() };
            let cluster = Cluster::start_with(config, listener, node.handler())?;
            node.attach(Arc::new(cluster.members()));
            nodes.push(node);
            clusters.push(cluster);
        }
        while clusters.iter().any(|c| c.status().iter().filter(|p| p.up).count() < 2) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for group in 0..groups {
            for node in &nodes {
                node.create_group(group, Counter::default()).await?;
            }
            nodes[0].initialize(group, &names).await?;
        }
        // Every group's leader, from its own node.
        let mut leaders = Vec::new();
        for group in 0..groups {
            let leader = loop {
                if let Some(node) = nodes.iter().find(|n| n.status(group).is_some_and(|s| s.state == "Leader")) {
                    break node.clone();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            leaders.push(leader);
        }
        let before: Vec<_> = nodes.iter().map(|n| n.wal_stats()).collect();
        let done = Arc::new(AtomicU64::new(0));
        let cpu = cpu_seconds();
        let started = Instant::now();
        let until = started + Duration::from_secs(seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for (group, leader) in leaders.iter().enumerate() {
            for _ in 0..writers {
                let (leader, done) = (leader.clone(), done.clone());
                let payload = vec![7u8; size];
                tasks.spawn(async move {
                    while Instant::now() < until {
                        if leader.write(group as u64, payload.clone()).await.is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        }
        while tasks.join_next().await.is_some() {}
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu;
        let writes = done.load(Ordering::Relaxed);
        println!(
            "{groups} groups x {writers} writers, {size} B: {writes} writes in {elapsed:.1} s = {:.0} writes/s, {:.1} us CPU per write (3 nodes)",
            writes as f64 / elapsed,
            cpu * 1e6 / writes.max(1) as f64
        );
        for ((name, node), before) in names.iter().zip(&nodes).zip(before) {
            let after = node.wal_stats();
            let syncs = after.syncs - before.syncs;
            let entries = after.entries - before.entries;
            println!("  {name}: {syncs} fsyncs, {:.1} entries per fsync", entries as f64 / syncs.max(1) as f64);
        }
        for node in &nodes {
            node.shutdown().await;
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
