//! Raft groups under injected faults: three nodes in one process over a
//! simulated network (partitions, lost requests and answers, delays that
//! reorder them) with each node's shared log on a simulated disk that a
//! crash cuts the power of (unsynced bytes are lost), restarted from what
//! survived. The schedule of faults and writes comes from a seed; after
//! every step the invariants are checked:
//!
//! - at most one leader per term, over the whole run;
//! - the applied logs of any two nodes agree wherever both have an entry;
//! - every acknowledged write is at its position on every node that has
//!   it, and, once the faults stop, on every node.
//!
//! Timing comes from tokio and the commit threads, so a seed gives the
//! same schedule of faults, not the same interleaving. `WARREN_SIM_SEEDS`
//! sets how many seeds to run (300 by default; docs/clustering.md has the
//! longer run), `WARREN_SIM_PARALLEL` how many at once (100),
//! `WARREN_SIM_SEED` runs one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use warren_cluster::Handler;
use warren_raft::{Call, Machine, Node, NodeOptions, StateMachine, Transport};
use warren_storage::sim::{Faults, SimBackend};

const GROUP: u64 = 1;
const NAMES: [&str; 3] = ["a", "b", "c"];

/// Every command, in the order applied; a command's position (from 1) is
/// its reply, the same on every replica.
#[derive(Default)]
struct Journal(Vec<Vec<u8>>);

impl StateMachine for Journal {
    fn apply(&mut self, _index: u64, command: &[u8]) -> Vec<u8> {
        self.0.push(command.to_vec());
        (self.0.len() as u64).to_le_bytes().to_vec()
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for command in &self.0 {
            out.extend_from_slice(&(command.len() as u32).to_le_bytes());
            out.extend_from_slice(command);
        }
        out
    }

    fn restore(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        self.0.clear();
        while !bytes.is_empty() {
            let len = u32::from_le_bytes(bytes.get(..4).ok_or("short")?.try_into().map_err(|_| "short")?) as usize;
            self.0.push(bytes.get(4..4 + len).ok_or("short")?.to_vec());
            bytes = &bytes[4 + len..];
        }
        Ok(())
    }
}

/// A journal as position -> command.
fn positions(journal: &Journal) -> BTreeMap<u64, Vec<u8>> {
    journal.0.iter().enumerate().map(|(i, c)| (i as u64 + 1, c.clone())).collect()
}

/// A small seeded generator (xorshift64*): the schedule needs no more.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

#[derive(Default)]
struct NetState {
    /// Node -> (its running instance, its handler); absent while crashed.
    nodes: HashMap<String, (u64, Arc<dyn Handler>)>,
    /// Pairs that cannot reach each other (both orders stored).
    cut: HashSet<(String, String)>,
    loss_percent: u64,
    max_delay_ms: u64,
}

struct Net {
    state: Mutex<NetState>,
    rng: Mutex<Rng>,
}

impl Net {
    fn reachable(state: &NetState, from: &str, instance: u64, to: &str) -> bool {
        state.nodes.get(from).is_some_and(|(i, _)| *i == instance)
            && state.nodes.contains_key(to)
            && !state.cut.contains(&(from.to_string(), to.to_string()))
    }

    /// (delay, lost) for one message.
    fn fate(&self) -> (Duration, bool) {
        let (loss, delay) = {
            let state = self.state.lock();
            (state.loss_percent, state.max_delay_ms)
        };
        let mut rng = self.rng.lock();
        (Duration::from_millis(rng.below(delay + 1)), rng.below(100) < loss)
    }
}

struct SimTransport {
    net: Arc<Net>,
    me: String,
    instance: u64,
}

impl Transport for SimTransport {
    fn call(&self, peer: &str, request: Vec<u8>, timeout: Duration) -> Call {
        let (net, me, instance, peer) = (self.net.clone(), self.me.clone(), self.instance, peer.to_string());
        Box::pin(async move {
            let handler = {
                let state = net.state.lock();
                if !Net::reachable(&state, &me, instance, &peer) {
                    return Err(format!("{peer} is unreachable"));
                }
                state.nodes[&peer].1.clone()
            };
            let (delay, lost) = net.fate();
            tokio::time::sleep(delay).await;
            if lost {
                tokio::time::sleep(timeout.min(Duration::from_millis(20))).await;
                return Err("request lost".into());
            }
            let answer = handler.handle(&me, request).await;
            let (delay, lost) = net.fate();
            tokio::time::sleep(delay).await;
            let state = net.state.lock();
            if lost || !Net::reachable(&state, &me, instance, &peer) {
                return Err("answer lost".into());
            }
            Ok(answer)
        })
    }

    fn up(&self) -> HashSet<String> {
        let state = self.net.state.lock();
        NAMES
            .iter()
            .filter(|n| **n != self.me && Net::reachable(&state, &self.me, self.instance, n))
            .map(|n| n.to_string())
            .collect()
    }
}

struct SimNode {
    disk: SimBackend,
    dir: tempfile::TempDir,
    running: Option<(Node, Machine<Journal>)>,
}

struct Cluster {
    net: Arc<Net>,
    nodes: BTreeMap<String, SimNode>,
    instances: u64,
    /// Term -> the node that led in it.
    leaders: HashMap<u64, String>,
    /// Position -> command, for every acknowledged write.
    acked: BTreeMap<u64, Vec<u8>>,
    seed: u64,
}

impl Cluster {
    async fn boot(&mut self, name: &str) {
        self.instances += 1;
        let instance = self.instances;
        let sim = self.nodes.get_mut(name).unwrap();
        let options = NodeOptions { snapshot_every: 10, ..NodeOptions::default() };
        let node = Node::open_on(name, Arc::new(sim.disk.clone()), sim.dir.path(), options).unwrap();
        self.net.state.lock().nodes.insert(name.to_string(), (instance, node.handler()));
        node.attach(Arc::new(SimTransport { net: self.net.clone(), me: name.to_string(), instance }));
        let machine = node.create_group(GROUP, Journal::default()).await.unwrap();
        sim.running = Some((node, machine));
    }

    /// The process dies: the disk takes no more writes, the power goes
    /// (unsynced bytes are lost), the node is gone from the network.
    fn crash(&mut self, name: &str) {
        let sim = self.nodes.get_mut(name).unwrap();
        let Some((node, _)) = sim.running.take() else { return };
        self.net.state.lock().nodes.remove(name);
        sim.disk.set_faults(Faults { crash_after_ops: Some(sim.disk.ops()), ..Faults::default() });
        node.crash();
        sim.disk.power_cut();
        sim.disk.set_faults(Faults::default());
    }

    fn running(&self) -> impl Iterator<Item = (&String, &Node, &Machine<Journal>)> {
        self.nodes.iter().filter_map(|(name, sim)| sim.running.as_ref().map(|(node, machine)| (name, node, machine)))
    }

    /// The running node claiming leadership in the highest term.
    fn leader(&self) -> Option<Node> {
        self.running()
            .filter_map(|(_, node, _)| {
                node.status(GROUP).filter(|s| s.state == "Leader").map(|s| (s.term, node.clone()))
            })
            .max_by_key(|(term, _)| *term)
            .map(|(_, node)| node)
    }

    /// Writes through the leader, waiting up to `within` for one to take
    /// it; whether it was acknowledged.
    async fn write(&mut self, command: Vec<u8>, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(leader) = self.leader() {
                let write = tokio::time::timeout(deadline - Instant::now(), leader.write(GROUP, command.clone()));
                if let Ok(Ok(reply)) = write.await {
                    self.acked.insert(u64::from_le_bytes(reply.try_into().unwrap()), command);
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn check(&mut self, step: &str) {
        let seed = self.seed;
        let mut journals = Vec::new();
        let mut leading = Vec::new();
        for (name, node, machine) in self.running() {
            if let Some(status) = node.status(GROUP).filter(|s| s.state == "Leader") {
                leading.push((status.term, name.clone()));
            }
            journals.push((name.clone(), machine.with(positions)));
        }
        for (term, name) in leading {
            let earlier = self.leaders.entry(term).or_insert_with(|| name.clone());
            assert_eq!(*earlier, name, "seed {seed}, {step}: two leaders in term {term}");
        }
        for (i, (a, ja)) in journals.iter().enumerate() {
            for (index, command) in &self.acked {
                if let Some(applied) = ja.get(index) {
                    assert_eq!(
                        applied, command,
                        "seed {seed}, {step}: {a} applied another command at acked index {index}"
                    );
                }
            }
            for (b, jb) in &journals[i + 1..] {
                for (index, command) in ja {
                    if let Some(other) = jb.get(index) {
                        assert_eq!(command, other, "seed {seed}, {step}: {a} and {b} disagree at position {index}");
                    }
                }
            }
        }
    }
}

async fn run(seed: u64, steps: u32) {
    let net = Arc::new(Net { state: Mutex::new(NetState::default()), rng: Mutex::new(Rng(seed | 1)) });
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut cluster = Cluster {
        net,
        nodes: NAMES
            .iter()
            .map(|n| {
                (n.to_string(), SimNode { disk: SimBackend::new(), dir: tempfile::tempdir().unwrap(), running: None })
            })
            .collect(),
        instances: 0,
        leaders: HashMap::new(),
        acked: BTreeMap::new(),
        seed,
    };
    for name in NAMES {
        cluster.boot(name).await;
    }
    let voters: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
    cluster.nodes["a"].running.as_ref().unwrap().0.initialize(GROUP, &voters).await.unwrap();

    let mut written = 0u32;
    for step in 0..steps {
        let what = match rng.below(100) {
            0..=54 => {
                written += 1;
                let command = format!("{seed}/{written}").into_bytes();
                let acked = cluster.write(command, Duration::from_millis(500)).await;
                format!("write ({})", if acked { "acknowledged" } else { "not acknowledged" })
            }
            55..=64 => {
                let name = NAMES[rng.below(3) as usize];
                let mut state = cluster.net.state.lock();
                state.cut.clear();
                for other in NAMES.iter().filter(|o| **o != name) {
                    state.cut.insert((name.to_string(), other.to_string()));
                    state.cut.insert((other.to_string(), name.to_string()));
                }
                format!("isolate {name}")
            }
            65..=74 => {
                cluster.net.state.lock().cut.clear();
                "heal".to_string()
            }
            75..=81 => {
                let down = cluster.nodes.values().filter(|n| n.running.is_none()).count();
                let name = NAMES[rng.below(3) as usize];
                if down == 0 {
                    cluster.crash(name);
                }
                format!("crash {name}")
            }
            82..=89 => {
                let crashed: Vec<String> =
                    cluster.nodes.iter().filter(|(_, n)| n.running.is_none()).map(|(name, _)| name.clone()).collect();
                for name in &crashed {
                    cluster.boot(name).await;
                }
                format!("restart {crashed:?}")
            }
            90..=95 => {
                let mut state = cluster.net.state.lock();
                state.loss_percent = [0, 5, 20][rng.below(3) as usize];
                state.max_delay_ms = [0, 2, 10][rng.below(3) as usize];
                format!("loss {}% delay {} ms", state.loss_percent, state.max_delay_ms)
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
                "pause".to_string()
            }
        };
        if std::env::var_os("WARREN_SIM_TRACE").is_some() {
            let states: Vec<String> = cluster
                .running()
                .map(|(name, node, _)| {
                    let s = node.status(GROUP).unwrap();
                    format!("{name}:{}/t{}/l{:?}/a{:?}", s.state, s.term, s.leader, s.applied_index)
                })
                .collect();
            println!("seed {seed} step {step} {what}: acked {} {states:?}", cluster.acked.len());
        }
        cluster.check(&format!("step {step} ({what})"));
        // Time passes between steps, for elections and replication.
        tokio::time::sleep(Duration::from_millis(rng.below(30))).await;
    }

    // The faults stop: every node comes back and holds every acknowledged
    // write at its index.
    {
        let mut state = cluster.net.state.lock();
        state.cut.clear();
        state.loss_percent = 0;
        state.max_delay_ms = 0;
    }
    let crashed: Vec<String> =
        cluster.nodes.iter().filter(|(_, n)| n.running.is_none()).map(|(name, _)| name.clone()).collect();
    for name in &crashed {
        cluster.boot(name).await;
    }
    // A write in the current term makes the leader bring everyone up to
    // date (groups send no heartbeats of their own).
    assert!(
        cluster.write(format!("{seed}/final").into_bytes(), Duration::from_secs(10)).await,
        "seed {seed}: no leader took a write after the faults stopped"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        cluster.check("after the faults");
        let complete = cluster.running().all(|(_, _, machine)| {
            let applied = machine.with(positions);
            cluster.acked.iter().all(|(position, command)| applied.get(position) == Some(command))
        });
        if complete {
            break;
        }
        assert!(Instant::now() < deadline, "seed {seed}: acknowledged writes missing after the faults stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let terms = cluster.leaders.keys().max().copied().unwrap_or(0);
    let installed: u64 = cluster.running().map(|(_, _, machine)| machine.snapshots_installed()).sum();
    println!(
        "seed {seed}: {} writes acknowledged of {written}, {} leaders over {terms} terms, {} boots, {installed} snapshots installed (last boots)",
        cluster.acked.len(),
        cluster.leaders.len(),
        cluster.instances
    );
    for (_, node, _) in cluster.running() {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_keep_their_invariants_under_partitions_loss_and_crashes() {
    if std::env::var_os("WARREN_SIM_TRACE").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    }
    let seeds: Vec<u64> = match std::env::var("WARREN_SIM_SEED") {
        Ok(seed) => vec![seed.parse().unwrap()],
        Err(_) => {
            let count: u64 = std::env::var("WARREN_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
            (1..=count).collect()
        }
    };
    let started = Instant::now();
    // A seed spends most of its time waiting on timers (a tenth of a core
    // for eight at a time), so many run at once, a new one as one ends.
    let parallel: usize = std::env::var("WARREN_SIM_PARALLEL").ok().and_then(|s| s.parse().ok()).unwrap_or(100).max(1);
    let mut pending = seeds.iter().copied();
    let mut runs = tokio::task::JoinSet::new();
    loop {
        while runs.len() < parallel {
            let Some(seed) = pending.next() else { break };
            runs.spawn(run(seed, 60));
        }
        let Some(result) = runs.join_next().await else { break };
        if let Err(e) = result {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    println!("{} seeds in {:?}", seeds.len(), started.elapsed());
}
