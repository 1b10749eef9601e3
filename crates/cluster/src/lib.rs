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

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

pub use handshake::HandshakeError;

/// How often each side of a connection says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// A peer not heard from for this long is down, though its connection may
/// still look open (a paused process, a dropped link).
pub const DOWN_AFTER: Duration = Duration::from_millis(1000);
/// Bytes of queued frames written to a peer with one call, at most (about:
/// the last frame taken may pass it).
const WRITE_BATCH: usize = 256 << 10;
/// How long a dialer waits between attempts to reach a seed.
const REDIAL: Duration = Duration::from_millis(500);
/// A handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest request or response: an authenticated peer is trusted, but a
/// bug there must not make this node allocate without bound.
pub const FRAME_MAX: usize = 64 * 1024 * 1024;

// Frames after the handshake: kind, request id (0 for heartbeats), payload
// length (u32, little-endian), payload.
const FRAME_HEARTBEAT: u8 = 1;
const FRAME_REQUEST: u8 = 2;
const FRAME_RESPONSE: u8 = 3;
const FRAME_HEADER: usize = 1 + 8 + 4;

/// A frame on its way out: the header apart, so that a large payload is
/// written as it is and never copied behind one.
struct Frame {
    header: [u8; FRAME_HEADER],
    payload: Vec<u8>,
}

fn frame(kind: u8, id: u64, payload: Vec<u8>) -> Frame {
    let mut header = [0u8; FRAME_HEADER];
    header[0] = kind;
    header[1..9].copy_from_slice(&id.to_le_bytes());
    header[9..].copy_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
    Frame { header, payload }
}

/// Payloads up to this size are copied into the write of the frames queued
/// with them (many groups' small requests go out in one write); larger ones
/// are written from where they are.
const COPIED_PAYLOAD: usize = 16 << 10;

/// Writes `first` then `second` with as few calls as the socket allows.
async fn write_both(writer: &mut (impl AsyncWriteExt + Unpin), first: &[u8], second: &[u8]) -> std::io::Result<()> {
    let (mut first, mut second) = (first, second);
    while !first.is_empty() {
        let written = writer.write_vectored(&[std::io::IoSlice::new(first), std::io::IoSlice::new(second)]).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if written < first.len() {
            first = &first[written..];
        } else {
            second = &second[written - first.len()..];
            first = &[];
        }
    }
    writer.write_all(second).await
}

/// Answers the requests other nodes send with [`Members::call`].
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, from: &str, request: Vec<u8>) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;
}

/// A node that serves no requests answers each with nothing.
struct Unhandled;

impl Handler for Unhandled {
    fn handle(&self, _from: &str, _request: Vec<u8>) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> {
        Box::pin(async { Vec::new() })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("node '{0}' is not connected")]
    NotConnected(String),
    #[error("node '{0}' went away before answering")]
    Lost(String),
    #[error("node '{0}' did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("a request of {0} bytes is above the frame limit")]
    TooLarge(usize),
}

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
    /// The number its process picked at start, as its last connection
    /// told it: it changes when the node restarted, not when its
    /// heartbeats were late or its connections were lost and made again
    /// (a partition that healed). 0 before any connection.
    pub incarnation: u64,
}

/// One open connection to a peer: where to send frames, and the calls
/// waiting for its answers.
#[derive(Clone)]
struct Link {
    id: u64,
    outbox: mpsc::Sender<Frame>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>,
}

struct Peer {
    address: String,
    /// Open connections to it (both sides may dial each other).
    links: Vec<Link>,
    last_heard: Instant,
    incarnation: u64,
}

struct Shared {
    config: ClusterConfig,
    handler: Arc<dyn Handler>,
    next_id: AtomicU64,
    peers: Mutex<BTreeMap<String, Peer>>,
    /// Seed address -> why it could not be joined.
    seed_errors: Mutex<BTreeMap<String, String>>,
    /// The seed address that turned out to be this node.
    own_seed: Mutex<Option<String>>,
    /// Remote address -> why its last connection was refused: a node with
    /// another secret redials every half second, and is logged once.
    refusals: Mutex<HashMap<std::net::IpAddr, String>>,
    /// Nodes removed from the cluster for good (`forget_cluster_node`):
    /// their connections are closed as they open.
    forgotten: Mutex<std::collections::HashSet<String>>,
    /// This process's run, told to every peer.
    run: u64,
}

impl Shared {
    fn refused(&self, from: SocketAddr, why: &str) {
        let mut refusals = self.refusals.lock();
        if refusals.get(&from.ip()).map(String::as_str) == Some(why) {
            debug!(%from, why, "cluster connection refused");
            return;
        }
        warn!(%from, why, "cluster connection refused");
        if refusals.len() >= 1024 {
            // Many strangers knocking: start over rather than grow.
            refusals.clear();
        }
        refusals.insert(from.ip(), why.to_string());
    }
}

/// A running member of a cluster; stops its tasks when dropped.
pub struct Cluster {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

impl Cluster {
    /// Serves the cluster port on `listener` and dials the seeds.
    pub fn start(config: ClusterConfig, listener: TcpListener) -> std::io::Result<Cluster> {
        Self::start_with(config, listener, Arc::new(Unhandled))
    }

    /// The same, answering other nodes' requests with `handler`.
    pub fn start_with(
        config: ClusterConfig,
        listener: TcpListener,
        handler: Arc<dyn Handler>,
    ) -> std::io::Result<Cluster> {
        let local_addr = listener.local_addr()?;
        let run = handshake::new_run().map_err(|e| std::io::Error::other(e.to_string()))?;
        let shared = Arc::new(Shared {
            config,
            handler,
            next_id: AtomicU64::new(1),
            peers: Mutex::new(BTreeMap::new()),
            seed_errors: Mutex::new(BTreeMap::new()),
            own_seed: Mutex::new(None),
            refusals: Mutex::new(HashMap::new()),
            forgotten: Mutex::new(std::collections::HashSet::new()),
            run,
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, shared.clone()));
        for seed in shared.config.seeds.clone() {
            tasks.spawn(dial_loop(seed, shared.clone()));
        }
        info!(node = %shared.config.node_name, %local_addr, seeds = ?shared.config.seeds, "cluster port open");
        Ok(Cluster { shared, tasks })
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
    /// Every peer reached so far, and every seed not reached, by name.
    pub fn status(&self) -> Vec<PeerStatus> {
        let shared = &self.0;
        let peers = shared.peers.lock();
        let mut out: Vec<PeerStatus> = peers
            .iter()
            .map(|(name, peer)| PeerStatus {
                name: name.clone(),
                address: peer.address.clone(),
                up: !peer.links.is_empty() && peer.last_heard.elapsed() < DOWN_AFTER,
                error: None,
                incarnation: peer.incarnation,
            })
            .collect();
        for (seed, error) in shared.seed_errors.lock().iter() {
            if !peers.values().any(|p| &p.address == seed && !p.links.is_empty()) {
                out.push(PeerStatus {
                    name: seed.clone(),
                    address: seed.clone(),
                    up: false,
                    error: Some(error.clone()),
                    incarnation: 0,
                });
            }
        }
        out
    }

    /// Removes node `name` from the cluster for good: it is no longer
    /// listed, and its connections are closed as they open (a node with its
    /// name must not come back with the state it had). False if it is
    /// connected now.
    pub fn forget(&self, name: &str) -> bool {
        let mut peers = self.0.peers.lock();
        if peers.get(name).is_some_and(|p| !p.links.is_empty()) {
            return false;
        }
        peers.remove(name);
        self.0.forgotten.lock().insert(name.to_string());
        true
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.0.config.node_name
    }

    /// The seed addresses the node was started with.
    pub fn seeds(&self) -> &[String] {
        &self.0.config.seeds
    }

    /// Which of the seeds is this node itself, once dialing it showed so.
    pub fn own_seed(&self) -> Option<String> {
        self.0.own_seed.lock().clone()
    }

    /// Sends `request` to `peer`'s handler and waits up to `timeout` for
    /// its answer.
    pub async fn call(&self, peer: &str, request: &[u8], timeout: Duration) -> Result<Vec<u8>, CallError> {
        self.call_owned(peer, request.to_vec(), timeout).await
    }

    /// [`Members::call`] with a request this node no longer needs (it is
    /// sent without a copy).
    pub async fn call_owned(&self, peer: &str, request: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, CallError> {
        if request.len() > FRAME_MAX {
            return Err(CallError::TooLarge(request.len()));
        }
        let link = self.0.peers.lock().get(peer).and_then(|p| p.links.first().cloned());
        let Some(link) = link else {
            return Err(CallError::NotConnected(peer.into()));
        };
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        link.pending.lock().insert(id, answer);
        if link.outbox.send(frame(FRAME_REQUEST, id, request)).await.is_err() {
            link.pending.lock().remove(&id);
            return Err(CallError::Lost(peer.into()));
        }
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(CallError::Lost(peer.into())),
            Err(_) => {
                link.pending.lock().remove(&id);
                Err(CallError::Timeout(peer.into(), timeout))
            }
        }
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
                            handshake::accept(stream, &shared.config.node_name, &shared.config.secret, shared.run),
                        );
                        match handshake.await {
                            Ok(Ok((stream, peer))) => run_connection(stream, peer, from.to_string(), shared).await,
                            Ok(Err(HandshakeError::SameNode)) => {}
                            Ok(Err(error)) => shared.refused(from, &error.to_string()),
                            Err(_) => shared.refused(from, "handshake timed out"),
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
            handshake::dial(stream, &shared.config.node_name, &shared.config.secret, shared.run).await
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
            Ok(Ok((stream, peer))) => {
                shared.seed_errors.lock().remove(&seed);
                run_connection(stream, peer, seed.clone(), shared.clone()).await;
            }
            Ok(Err(HandshakeError::SameNode)) => {
                debug!(%seed, "a seed is this node itself");
                *shared.own_seed.lock() = Some(seed);
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

/// Heartbeats both ways and carries requests and responses until the
/// connection fails; the peer is up meanwhile.
async fn run_connection(stream: TcpStream, greeted: handshake::Greeted, address: String, shared: Arc<Shared>) {
    let handshake::Greeted { name: peer, run } = greeted;
    if shared.forgotten.lock().contains(&peer) {
        debug!(peer = %peer, %address, "a node removed from the cluster connected: closed");
        return;
    }
    let (outbox, mut outgoing) = mpsc::channel::<Frame>(1024);
    let link = Link {
        id: shared.next_id.fetch_add(1, Ordering::Relaxed),
        outbox: outbox.clone(),
        pending: Arc::new(Mutex::new(HashMap::new())),
    };
    {
        let mut peers = shared.peers.lock();
        let entry = peers.entry(peer.clone()).or_insert_with(|| Peer {
            address: address.clone(),
            links: Vec::new(),
            last_heard: Instant::now(),
            incarnation: 0,
        });
        if entry.links.is_empty() {
            info!(peer = %peer, %address, "cluster peer up");
        }
        entry.incarnation = run;
        entry.links.push(link.clone());
        entry.address = address;
        entry.last_heard = Instant::now();
    }
    let (reader, mut writer) = stream.into_split();
    // Frames are read header then payload: buffered, a read brings many.
    let mut reader = tokio::io::BufReader::with_capacity(64 << 10, reader);
    let write = async {
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut buf = Vec::with_capacity(WRITE_BATCH);
        loop {
            let mut next = Some(tokio::select! {
                _ = tick.tick() => frame(FRAME_HEARTBEAT, 0, Vec::new()),
                next = outgoing.recv() => match next {
                    Some(frame) => frame,
                    None => return,
                },
            });
            // What is queued meanwhile joins this write, up to a bound.
            buf.clear();
            while let Some(frame) = next.take() {
                buf.extend_from_slice(&frame.header);
                if frame.payload.len() <= COPIED_PAYLOAD {
                    buf.extend_from_slice(&frame.payload);
                } else {
                    if write_both(&mut writer, &buf, &frame.payload).await.is_err() {
                        return;
                    }
                    buf.clear();
                }
                if buf.len() < WRITE_BATCH {
                    next = outgoing.try_recv().ok();
                }
            }
            if !buf.is_empty() && writer.write_all(&buf).await.is_err() {
                return;
            }
        }
    };
    let read = async {
        let mut header = [0u8; FRAME_HEADER];
        loop {
            // A closed socket, long silence or a malformed frame ends it.
            match tokio::time::timeout(DOWN_AFTER * 3, reader.read_exact(&mut header)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let kind = header[0];
            let id = u64::from_le_bytes(header[1..9].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(header[9..13].try_into().unwrap_or_default()) as usize;
            if len > FRAME_MAX {
                warn!(peer = %peer, len, "cluster frame above the limit: connection closed");
                return;
            }
            let mut payload = vec![0u8; len];
            if reader.read_exact(&mut payload).await.is_err() {
                return;
            }
            if let Some(entry) = shared.peers.lock().get_mut(&peer) {
                entry.last_heard = Instant::now();
            }
            match kind {
                FRAME_HEARTBEAT => {}
                FRAME_REQUEST => {
                    let (handler, outbox, from) = (shared.handler.clone(), outbox.clone(), peer.clone());
                    tokio::spawn(async move {
                        let response = handler.handle(&from, payload).await;
                        if response.len() <= FRAME_MAX {
                            let _ = outbox.send(frame(FRAME_RESPONSE, id, response)).await;
                        }
                    });
                }
                FRAME_RESPONSE => {
                    if let Some(answer) = link.pending.lock().remove(&id) {
                        let _ = answer.send(payload);
                    }
                }
                _ => return,
            }
        }
    };
    tokio::select! {
        () = write => {}
        () = read => {}
    }
    let mut peers = shared.peers.lock();
    if let Some(entry) = peers.get_mut(&peer) {
        entry.links.retain(|l| l.id != link.id);
        if entry.links.is_empty() {
            info!(peer = %peer, "cluster peer down");
        }
    }
    // Calls waiting on this connection learn it is gone.
    link.pending.lock().clear();
}
