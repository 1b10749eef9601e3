//! Cluster membership: each node listens on its cluster port, dials the
//! seed addresses it was given, and keeps one authenticated connection to
//! every peer it reaches, over which both sides send a heartbeat every
//! [`HEARTBEAT`]. A peer is up while a connection to it is open and heard
//! from within [`DOWN_AFTER`]; a closed connection marks it down at once
//! (the failure detector replicated queues will elect leaders from: one per
//! node pair, not one per queue).
//!
//! Connections start with a mutual challenge-response over a shared secret
//! (RabbitMQ's Erlang cookie role): each side sends a random nonce and proves
//! it holds the secret with an HMAC-SHA256 over both nonces and both names,
//! so the secret never crosses the wire and a recorded handshake cannot be
//! replayed. A node with another secret is refused, and both sides log why.

mod handshake;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

pub use handshake::HandshakeError;

/// How often each side of a connection says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// A peer not heard from for this long is down, though its connection may
/// still look open (a paused process, a dropped link).
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);
/// How long a dialer waits between attempts to reach a seed.
const REDIAL: Duration = Duration::from_millis(500);
/// A handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const FRAME_HEARTBEAT: u8 = 1;

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster.
    pub node_name: String,
    /// `host:port` of nodes to dial (this node's own address may be among
    /// them: it is recognised and skipped).
    pub seeds: Vec<String>,
    /// The shared secret every node of the cluster holds.
    pub secret: Vec<u8>,
}

/// What this node knows of another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its node name, or the seed address if no handshake succeeded yet.
    pub name: String,
    /// Where it was reached (or last tried).
    pub address: String,
    pub up: bool,
    /// Why the last attempt to reach it failed, if it did.
    pub error: Option<String>,
}

#[derive(Debug)]
struct Peer {
    address: String,
    /// Open connections to it (both sides may dial each other).
    connections: u32,
    last_heard: Instant,
}

struct Shared {
    config: ClusterConfig,
    peers: Mutex<BTreeMap<String, Peer>>,
    /// Seed address -> why it could not be joined.
    seed_errors: Mutex<BTreeMap<String, String>>,
}

/// A running member of a cluster; stops its tasks when dropped.
pub struct Cluster {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Cluster {
    /// Serves the cluster port on `listener` and dials the seeds.
    pub fn start(config: ClusterConfig, listener: TcpListener) -> std::io::Result<Cluster> {
        let local_addr = listener.local_addr()?;
        let shared =
            Arc::new(Shared { config, peers: Mutex::new(BTreeMap::new()), seed_errors: Mutex::new(BTreeMap::new()) });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, shared.clone()));
        for seed in shared.config.seeds.clone() {
            tasks.spawn(dial_loop(seed, shared.clone()));
        }
        info!(node = %shared.config.node_name, %local_addr, seeds = ?shared.config.seeds, "cluster port open");
        Ok(Cluster { shared, local_addr, tasks })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn node_name(&self) -> &str {
        &self.shared.config.node_name
    }

    /// Every peer reached so far, and every seed not reached, by name.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.members().status()
    }

    /// A handle for reading the membership (the management API holds one).
    pub fn members(&self) -> Members {
        Members(self.shared.clone())
    }

    /// Stops listening, dialing and heartbeating (peers see this node go).
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }
}

/// Read access to a running cluster member's view of its peers.
#[derive(Clone)]
pub struct Members(Arc<Shared>);

impl Members {
    pub fn node_name(&self) -> &str {
        &self.0.config.node_name
    }

    /// Every peer reached so far, and every seed not reached, by name.
    pub fn status(&self) -> Vec<PeerStatus> {
        let shared = &self.0;
        let peers = shared.peers.lock();
        let mut out: Vec<PeerStatus> = peers
            .iter()
            .map(|(name, peer)| PeerStatus {
                name: name.clone(),
                address: peer.address.clone(),
                up: peer.connections > 0 && peer.last_heard.elapsed() < DOWN_AFTER,
                error: None,
            })
            .collect();
        for (seed, error) in shared.seed_errors.lock().iter() {
            if !peers.values().any(|p| &p.address == seed && p.connections > 0) {
                out.push(PeerStatus {
                    name: seed.clone(),
                    address: seed.clone(),
                    up: false,
                    error: Some(error.clone()),
                });
            }
        }
        out
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let _ = stream.set_nodelay(true);
                        let handshake = tokio::time::timeout(
                            HANDSHAKE_TIMEOUT,
                            handshake::accept(stream, &shared.config.node_name, &shared.config.secret),
                        );
                        match handshake.await {
                            Ok(Ok((stream, peer))) => run_connection(stream, peer, from.to_string(), shared).await,
                            Ok(Err(HandshakeError::SameNode)) => {}
                            Ok(Err(error)) => warn!(%from, %error, "cluster connection refused"),
                            Err(_) => warn!(%from, "cluster connection refused: handshake timed out"),
                        }
                    });
                }
                Err(error) => {
                    warn!(%error, "cluster accept failed");
                    tokio::time::sleep(REDIAL).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn dial_loop(seed: String, shared: Arc<Shared>) {
    loop {
        let attempt = async {
            let stream = TcpStream::connect(&seed).await.map_err(HandshakeError::Io)?;
            let _ = stream.set_nodelay(true);
            handshake::dial(stream, &shared.config.node_name, &shared.config.secret).await
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
            Ok(Ok((stream, peer))) => {
                shared.seed_errors.lock().remove(&seed);
                run_connection(stream, peer, seed.clone(), shared.clone()).await;
            }
            Ok(Err(HandshakeError::SameNode)) => {
                debug!(%seed, "a seed is this node itself");
                return;
            }
            Ok(Err(error)) => {
                let text = error.to_string();
                let mut errors = shared.seed_errors.lock();
                if errors.get(&seed) != Some(&text) {
                    // Said once per kind of failure, not every retry.
                    if matches!(error, HandshakeError::SecretMismatch { .. }) {
                        warn!(%seed, %error, "cannot join the cluster through this seed");
                    } else {
                        debug!(%seed, %error, "seed not reached");
                    }
                    errors.insert(seed.clone(), text);
                }
            }
            Err(_) => {
                shared.seed_errors.lock().insert(seed.clone(), "handshake timed out".into());
            }
        }
        tokio::time::sleep(REDIAL).await;
    }
}

/// Heartbeats both ways until the connection fails; the peer is up
/// meanwhile.
async fn run_connection(stream: TcpStream, peer: String, address: String, shared: Arc<Shared>) {
    {
        let mut peers = shared.peers.lock();
        let entry = peers.entry(peer.clone()).or_insert_with(|| Peer {
            address: address.clone(),
            connections: 0,
            last_heard: Instant::now(),
        });
        if entry.connections == 0 {
            info!(peer = %peer, %address, "cluster peer up");
        }
        entry.connections += 1;
        entry.address = address;
        entry.last_heard = Instant::now();
    }
    let (mut reader, mut writer) = stream.into_split();
    let heartbeats = async {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tick.tick().await;
            if writer.write_all(&[FRAME_HEARTBEAT]).await.is_err() {
                return;
            }
        }
    };
    let listen = async {
        let mut frame = [0u8; 1];
        loop {
            match tokio::time::timeout(DOWN_AFTER * 3, reader.read_exact(&mut frame)).await {
                Ok(Ok(_)) if frame[0] == FRAME_HEARTBEAT => {
                    if let Some(entry) = shared.peers.lock().get_mut(&peer) {
                        entry.last_heard = Instant::now();
                    }
                }
                // An unknown frame, a closed socket or long silence ends it.
                _ => return,
            }
        }
    };
    tokio::select! {
        () = heartbeats => {}
        () = listen => {}
    }
    let mut peers = shared.peers.lock();
    if let Some(entry) = peers.get_mut(&peer) {
        entry.connections = entry.connections.saturating_sub(1);
        if entry.connections == 0 {
            info!(peer = %peer, "cluster peer down");
        }
    }
}
