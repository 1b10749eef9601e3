//! `warren`: the broker (default) and its tools (`warren perf`, `warren ctl`).

#[cfg(feature = "alloc-count")]
mod alloc_count;
mod ctl;
mod perf;

use std::path::PathBuf;

/// jemalloc gives freed memory back to the kernel within a second (its
/// background threads purge dirty pages), so the resident set the memory
/// alarm watches falls once queues drain; glibc's arenas keep it.
#[cfg(all(not(target_env = "msvc"), not(feature = "alloc-count")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(not(target_env = "msvc"), not(feature = "alloc-count")))]
#[allow(non_upper_case_globals)]
// jemalloc reads its options from this exported symbol; nothing else names it.
#[allow(unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use warren_server::{Config, Server};

#[derive(Parser)]
#[command(name = "warren", version, about = "Warren: an AMQP 0-9-1 message broker")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Load generator: publish and consume against a broker, print rates and latencies.
    Perf(perf::PerfArgs),
    /// Manage users, virtual hosts, permissions and limits (rabbitmqctl's commands).
    Ctl(ctl::CtlArgs),
}

#[derive(Args, Clone, Default)]
struct ServeArgs {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, env = "WARREN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// AMQP port [default: 5672].
    #[arg(long, env = "WARREN_AMQP_PORT")]
    amqp_port: Option<u16>,
    /// Management HTTP API port; 0 turns it off [default: 15672].
    #[arg(long, env = "WARREN_HTTP_PORT")]
    http_port: Option<u16>,
    /// Prometheus metrics port; 0 turns it off [default: 15692].
    #[arg(long, env = "WARREN_PROMETHEUS_PORT")]
    prometheus_port: Option<u16>,
    /// Address to listen on; repeat for several. `localhost` (the default) means 127.0.0.1 and ::1;
    /// use 0.0.0.0 or :: to accept remote clients.
    #[arg(long, env = "WARREN_BIND", value_delimiter = ',')]
    bind: Vec<String>,
    /// Data directory [default: ./warren-data].
    #[arg(long, env = "WARREN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Heartbeat interval offered to clients, in seconds (0 disables) [default: 60].
    #[arg(long, env = "WARREN_HEARTBEAT")]
    heartbeat: Option<u16>,
    /// Largest frame offered to clients, in bytes [default: 131072].
    #[arg(long, env = "WARREN_FRAME_MAX")]
    frame_max: Option<u32>,
    /// Most channels per connection [default: 2047].
    #[arg(long, env = "WARREN_CHANNEL_MAX")]
    channel_max: Option<u16>,
    /// Largest message body accepted, in bytes [default: 134217728].
    #[arg(long, env = "WARREN_MAX_MESSAGE_SIZE")]
    max_message_size: Option<u64>,
    /// When a persistent message is confirmed: `always` after fsync (default), or `never`
    /// (once written to the OS: survives a broker crash, not a power cut).
    #[arg(long, env = "WARREN_FSYNC")]
    fsync: Option<warren_server::config::Fsync>,
    /// Milliseconds a delivery may stay unacknowledged before it is taken back and returned to
    /// its queue; 0 = never [default: 1800000].
    #[arg(long, env = "WARREN_CONSUMER_TIMEOUT")]
    consumer_timeout: Option<u64>,
    /// This node's name in a cluster (default: `warren@` followed by the host name).
    #[arg(long, env = "WARREN_NODE_NAME")]
    node_name: Option<String>,
    /// Port the other nodes of a cluster connect to, on the first --bind address; 0 (the default)
    /// runs a single node.
    #[arg(long, env = "WARREN_CLUSTER_PORT")]
    cluster_port: Option<u16>,
    /// Cluster ports of nodes to join, `host:port`, comma-separated (this node's own may be among
    /// them).
    #[arg(long, env = "WARREN_CLUSTER_SEEDS", value_delimiter = ',')]
    cluster_seeds: Vec<String>,
    /// File holding the secret every node of the cluster shares; required with --cluster-port.
    #[arg(long, env = "WARREN_CLUSTER_SECRET_FILE", value_name = "FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// Log entries a Raft group applies between snapshots [default: 8192].
    #[arg(long, env = "WARREN_CLUSTER_SNAPSHOT_EVERY", value_name = "ENTRIES")]
    cluster_snapshot_every: Option<u64>,
    /// Log filter, e.g. `info` or `warren_server=debug` [default: info]. openraft logs only errors unless the filter names it (`info,openraft=info`).
    #[arg(long, env = "WARREN_LOG", default_value = "info")]
    log: String,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(port) = self.amqp_port {
            config.amqp_port = port;
        }
        if let Some(port) = self.http_port {
            config.http_port = port;
        }
        if let Some(port) = self.prometheus_port {
            config.prometheus_port = port;
        }
        if !self.bind.is_empty() {
            config.bind = self.bind.clone();
        }
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        if let Some(heartbeat) = self.heartbeat {
            config.heartbeat_s = heartbeat;
        }
        if let Some(frame_max) = self.frame_max {
            config.frame_max = frame_max;
        }
        if let Some(channel_max) = self.channel_max {
            config.channel_max = channel_max;
        }
        if let Some(size) = self.max_message_size {
            config.max_message_size = size;
        }
        if let Some(fsync) = self.fsync {
            config.fsync = fsync;
        }
        if let Some(millis) = self.consumer_timeout {
            config.consumer_timeout_ms = millis;
        }
        if let Some(name) = &self.node_name {
            config.node_name = Some(name.clone());
        }
        if let Some(port) = self.cluster_port {
            config.cluster_port = port;
        }
        if !self.cluster_seeds.is_empty() {
            config.cluster_seeds = self.cluster_seeds.clone();
        }
        if let Some(file) = &self.cluster_secret_file {
            config.cluster_secret_file = Some(file.clone());
        }
        if let Some(entries) = self.cluster_snapshot_every {
            config.cluster_snapshot_every = entries;
        }
        config.validate()?;
        Ok(config)
    }
}

/// How long a stopping node waits for its leaderships to be taken over.
const HAND_OVER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Colours only on a terminal: a log file or journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // openraft reports every election step at info, and messages of a term
    // gone at warn; Warren logs elections and failures itself. A filter
    // that names openraft gets what it asks for.
    let filter = match args.log.contains("openraft") {
        true => args.log.clone(),
        false => format!("{},openraft=error", args.log),
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info,openraft=error")))
        .with_ansi(ansi)
        .init();
    let config = args.config()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    if let Some(open_files) = warren_server::alarm::raise_open_files_limit() {
        tracing::info!(open_files, "open-files limit");
        let pending = config.max_pending_handshakes as u64;
        if pending == 0 || pending >= open_files / 2 {
            tracing::warn!(open_files, max_pending_handshakes = pending,
                "max_pending_handshakes is not well below the open-files limit: half-open connections could take the descriptors the message log needs");
        }
    }
    let server = Server::bind(config.clone()).await?;
    let cluster = cluster(&config, &server.broker()).await?;
    let management = management(&config, &server).await?.map(|m| match &cluster {
        Some((cluster, raft)) => m.with_cluster(cluster.members()).with_raft(raft.clone()),
        None => m,
    });
    let (stop_http, http_stopped) = tokio::sync::watch::channel(false);
    let http = management.map(|m| {
        let mut stopped = http_stopped.clone();
        tokio::spawn(m.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }))
    });
    server.run(shutdown_signal()).await;
    if let Some((cluster, raft)) = cluster {
        // Before the cluster connections close: the members take over at
        // once instead of waiting out their lease on this node.
        let (handed, led) = raft.hand_over(HAND_OVER_PATIENCE).await;
        if led > 0 {
            tracing::info!(handed, led, "leaderships handed over");
        }
        cluster.stop().await;
        raft.shutdown().await;
    }
    let _ = stop_http.send(true);
    if let Some(http) = http {
        let _ = http.await;
    }
    #[cfg(feature = "alloc-count")]
    {
        let (allocations, bytes) = alloc_count::totals();
        tracing::info!(allocations, bytes, "heap allocations since start");
        println!("allocations: {allocations} bytes: {bytes}");
    }
    Ok(())
}

/// Cluster membership on `cluster_port` (first `bind` address), if set,
/// and this node's Raft groups (under `data_dir/raft`) running over it.
async fn cluster(
    config: &Config,
    broker: &std::sync::Arc<warren_server::Broker>,
) -> anyhow::Result<Option<(warren_cluster::Cluster, warren_raft::Node)>> {
    if config.cluster_port == 0 {
        return Ok(None);
    }
    let Some(path) = &config.cluster_secret_file else {
        anyhow::bail!("cluster_port is set but cluster_secret_file is not");
    };
    let secret = std::fs::read(path).with_context(|| format!("reading the cluster secret {}", path.display()))?;
    let secret = secret.trim_ascii().to_vec();
    if secret.is_empty() {
        anyhow::bail!("the cluster secret file {} is empty", path.display());
    }
    let address = match config.bind.first() {
        Some(entry) => warren_server::server::expand(entry)?.into_iter().next(),
        None => None,
    };
    let Some(address) = address else {
        anyhow::bail!("no bind address for the cluster port");
    };
    let listener = tokio::net::TcpListener::bind((address, config.cluster_port))
        .await
        .with_context(|| format!("listening on cluster port {address}:{}", config.cluster_port))?;
    let fsync = match config.fsync {
        warren_server::config::Fsync::Always => warren_raft::FsyncPolicy::Always,
        warren_server::config::Fsync::Never => warren_raft::FsyncPolicy::Never,
    };
    let options = warren_raft::NodeOptions { fsync, snapshot_every: config.cluster_snapshot_every.max(1) };
    let raft = warren_raft::Node::open(&config.node_name(), &config.data_dir.join("raft"), options)?;
    let members =
        warren_cluster::ClusterConfig { node_name: config.node_name(), seeds: config.cluster_seeds.clone(), secret };
    let cluster = warren_cluster::Cluster::start_with(members, listener, raft.handler())?;
    raft.attach(std::sync::Arc::new(cluster.members()));
    let replication = warren_server::quorum::Replication::start(broker, raft.clone(), cluster.members()).await?;
    let _ = broker.replication.set(replication);
    Ok(Some((cluster, raft)))
}

/// The management API on `http_port` and Prometheus metrics on
/// `prometheus_port`, at the AMQP `bind` addresses, unless turned off.
async fn management(config: &Config, server: &Server) -> anyhow::Result<Option<warren_management::Management>> {
    let https_port = config.tls.as_ref().map_or(0, |tls| tls.https_port);
    if config.http_port == 0 && config.prometheus_port == 0 && https_port == 0 {
        return Ok(None);
    }
    let mut addresses = Vec::new();
    for entry in &config.bind {
        addresses.extend(warren_server::server::expand(entry)?);
    }
    let listeners = match config.http_port {
        0 => Vec::new(),
        port => warren_server::server::listen(&addresses, port).await?,
    };
    let https = match &config.tls {
        Some(tls) if tls.https_port != 0 => {
            let plain = warren_server::config::TlsConfig { verify_peer: false, ..tls.clone() };
            let acceptor = warren_server::tls::acceptor(&plain)?;
            Some((warren_server::server::listen(&addresses, tls.https_port).await?, acceptor))
        }
        _ => None,
    };
    let prometheus = match config.prometheus_port {
        0 => Vec::new(),
        port => warren_server::server::listen(&addresses, port).await?,
    };
    let mut amqp: Vec<warren_management::Listener> = server
        .local_addrs()
        .into_iter()
        .map(|address| warren_management::Listener { protocol: "amqp", address })
        .collect();
    amqp.extend(
        server
            .local_tls_addrs()
            .into_iter()
            .map(|address| warren_management::Listener { protocol: "amqp/ssl", address }),
    );
    let mut management =
        warren_management::Management::new(server.broker(), listeners, amqp).with_prometheus(prometheus);
    if let Some((listeners, acceptor)) = https {
        management = management.with_https(listeners, acceptor);
    }
    Ok(Some(management))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Some(Command::Perf(args)) => runtime.block_on(perf::run(args)),
        Some(Command::Ctl(args)) => ctl::run(args),
        Some(Command::Serve(args)) => runtime.block_on(serve(args)),
        None => runtime.block_on(serve(cli.serve)),
    }
}
