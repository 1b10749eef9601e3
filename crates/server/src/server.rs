//! Listeners and the accept loop, with graceful shutdown: on the shutdown
//! signal every connection is sent `connection.close` (320) and given a
//! moment to answer before the process exits.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::broker::{Broker, Environment};
use crate::config::Config;
use crate::session::Session;

/// How often the access file is checked for changes.
const ACCESS_POLL: Duration = Duration::from_millis(250);

/// Bodies paged out per virtual host every 5 ms besides what publishes
/// page: bounds how long the lock is held (256 × 16 KiB is 4 MiB written).
const PAGE_PER_TICK: usize = 256;

pub struct Server {
    listeners: Vec<TcpListener>,
    /// AMQPS listeners, with the acceptor they share.
    tls_listeners: Vec<TcpListener>,
    tls: Option<TlsAcceptor>,
    broker: Arc<Broker>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {address}: {source}")]
    Bind { address: String, source: std::io::Error },
    #[error("invalid listen address '{0}'")]
    Address(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Expands one `bind` entry: `localhost` is both loopback addresses.
/// The addresses a `bind` entry stands for (`localhost`: 127.0.0.1 and ::1).
pub fn expand(entry: &str) -> Result<Vec<IpAddr>, ServerError> {
    match entry {
        "localhost" => Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)]),
        other => other
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .map(|ip| vec![ip])
            .map_err(|_| ServerError::Address(other.to_string())),
    }
}

impl Server {
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        Self::bind_with(config, Environment::default()).await
    }

    /// Binds with the broker's files on a given storage backend and its
    /// queues on a given clock.
    pub async fn bind_with(config: Config, environment: Environment) -> Result<Server, ServerError> {
        config.validate()?;
        let mut addresses = Vec::new();
        for entry in &config.bind {
            addresses.extend(expand(entry)?);
        }
        let listeners = listen(&addresses, config.amqp_port).await?;
        let (tls_listeners, tls) = match &config.tls {
            Some(tls) => (listen(&addresses, tls.port).await?, Some(crate::tls::acceptor(tls)?)),
            None => (Vec::new(), None),
        };
        let broker = Arc::new(Broker::open_with(config, environment)?);
        Ok(Server { listeners, tls_listeners, tls, broker })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    pub fn local_tls_addrs(&self) -> Vec<SocketAddr> {
        self.tls_listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    pub fn broker(&self) -> Arc<Broker> {
        self.broker.clone()
    }

    /// Serves until `shutdown` completes, then closes every connection.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        for address in self.local_addrs() {
            info!(%address, "listening for AMQP 0-9-1");
        }
        for address in self.local_tls_addrs() {
            info!(%address, "listening for AMQP 0-9-1 over TLS");
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut accepts = JoinSet::new();
        for listener in self.listeners {
            accepts.spawn(accept_loop(listener, None, self.broker.clone(), stop_rx.clone()));
        }
        for listener in self.tls_listeners {
            accepts.spawn(accept_loop(listener, self.tls.clone(), self.broker.clone(), stop_rx.clone()));
        }
        // Expire messages and queues, release delayed messages: every 5 ms
        // (so a due time is met within 10 ms), only in virtual hosts that
        // have something timed. Page out what publishes left behind.
        let timer_broker = self.broker.clone();
        let timers = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            for ticks in 0u64.. {
                tick.tick().await;
                // Consumer timeouts are checked every 100 ms.
                let check_consumers = ticks.is_multiple_of(20);
                if check_consumers {
                    timer_broker.tickets.age(std::time::Instant::now());
                }
                for vhost in timer_broker.vhosts() {
                    let mut session = Session::open(&vhost, &timer_broker.store);
                    if session.has_paging_due() {
                        session.page_due(PAGE_PER_TICK);
                    }
                    if check_consumers {
                        session.check_consumer_timeouts();
                    } else if !session.has_timers() {
                        continue;
                    }
                    session.tick();
                }
            }
        });
        // Streams' consumers are served up to what is fsynced: the streams'
        // writer says how far each stream got.
        let (notify, mut notices) = tokio::sync::mpsc::unbounded_channel();
        self.broker.store.streams().set_notify(notify);
        let stream_broker = self.broker.clone();
        let stream_notices = tokio::spawn(async move {
            let mut batch = Vec::new();
            while notices.recv_many(&mut batch, 1024).await > 0 {
                let mut latest: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> =
                    Default::default();
                for (vhost, queue, durable) in batch.drain(..) {
                    let entry = latest.entry(vhost).or_default().entry(queue).or_default();
                    *entry = (*entry).max(durable);
                }
                for (vhost, streams) in &latest {
                    let Some(host) = stream_broker.vhost(vhost) else { continue };
                    let mut session = Session::open(&host, &stream_broker.store);
                    for (queue, durable) in streams {
                        session.stream_durable(queue, *durable);
                    }
                }
            }
        });
        // Give disk space back as messages are settled.
        let janitor_store = self.broker.store.clone();
        let janitor_broker = self.broker.clone();
        let janitor = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last = janitor_store.commit_stats();
            let mut seconds = 0u64;
            loop {
                tick.tick().await;
                seconds += 1;
                if seconds.is_multiple_of(10) {
                    let now = janitor_store.commit_stats();
                    let (syncs, entries) = (now.syncs - last.syncs, now.entries - last.entries);
                    // Rates are for tuning, not for every idle interval:
                    // DEBUG, and only when something was written.
                    if syncs > 0 && entries > 0 {
                        debug!(
                            fsyncs_per_s = syncs / 10,
                            entries_per_s = entries / 10,
                            entries_per_fsync = entries / syncs,
                            "group commit"
                        );
                    }
                    last = now;
                }
                let store = janitor_store.clone();
                let vhosts = janitor_broker.vhosts();
                let dedup_store = janitor_store.clone();
                let dedup_vhosts = vhosts.clone();
                if let Ok(Err(error)) = tokio::task::spawn_blocking(move || dedup_store.save_dedup(&dedup_vhosts)).await
                {
                    warn!(%error, "saving deduplication keys failed");
                }
                // Definition entries since the last snapshot: a new one lets
                // their segments go.
                let snapshot_store = janitor_store.clone();
                if let Ok(Err(error)) = tokio::task::spawn_blocking(move || snapshot_store.snapshot_definitions()).await
                {
                    warn!(%error, "writing the definitions snapshot failed");
                }
                match tokio::task::spawn_blocking(move || store.compact(&vhosts).and_then(|_| store.reclaim())).await {
                    Ok(Ok(removed)) if removed > 0 => tracing::debug!(removed, "log segments reclaimed"),
                    Ok(Err(error)) => warn!(%error, "reclaiming log segments failed"),
                    _ => {}
                }
            }
        });
        // Apply access changes `warren ctl` wrote (users, permissions, virtual
        // hosts, limits) within a quarter of a second.
        let access_broker = self.broker.clone();
        let access_watch = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ACCESS_POLL);
            loop {
                tick.tick().await;
                let broker = access_broker.clone();
                match tokio::task::spawn_blocking(move || broker.reload_access()).await {
                    Ok(Ok(true)) => info!("access definitions reloaded"),
                    Ok(Err(error)) => warn!(%error, "access definitions not reloaded"),
                    _ => {}
                }
            }
        });
        let monitor = tokio::spawn(watch_resources(self.broker.clone()));
        shutdown.await;
        monitor.abort();
        access_watch.abort();
        janitor.abort();
        timers.abort();
        stream_notices.abort();
        info!("shutting down: closing connections");
        let _ = stop_tx.send(true);
        let drain = async { while accepts.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
            warn!("some connections did not close in time");
        }
        let store = self.broker.store.clone();
        let vhosts = self.broker.vhosts();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(error) = store.save_dedup(&vhosts) {
                warn!(%error, "saving deduplication keys failed");
            }
            store.shutdown()
        })
        .await;
    }
}

/// Binds every address on `port`; with port 0 every further address shares
/// the first one's port. An unavailable IPv6 loopback is skipped.
/// Listeners on `port` at every address (0: one free port shared by all);
/// an IPv6 loopback the machine lacks is skipped with a warning.
pub async fn listen(addresses: &[IpAddr], mut port: u16) -> Result<Vec<TcpListener>, ServerError> {
    let mut listeners = Vec::new();
    for &ip in addresses {
        let address = SocketAddr::new(ip, port);
        match TcpListener::bind(address).await {
            Ok(listener) => {
                if port == 0 {
                    port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
                }
                listeners.push(listener);
            }
            Err(source) if ip.is_ipv6() && ip.is_loopback() && !listeners.is_empty() => {
                warn!(%address, %source, "IPv6 loopback unavailable; listening on IPv4 only");
            }
            Err(source) => return Err(ServerError::Bind { address: address.to_string(), source }),
        }
    }
    Ok(listeners)
}

/// Accepts connections until shutdown, then waits for them to close. With
/// `tls`, each connection first completes a TLS handshake (within the
/// handshake timeout).
async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    broker: Arc<Broker>,
    stop: watch::Receiver<bool>,
) {
    let mut stop_accept = stop.clone();
    let mut tasks = JoinSet::new();
    let mut refused = 0u64;
    let mut last_refusal_log = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(handshake) = broker.handshakes.clone().try_acquire_owned() else {
                        refused += 1;
                        if last_refusal_log.is_none_or(|at: tokio::time::Instant| at.elapsed() >= Duration::from_secs(10)) {
                            warn!(%peer, refused, limit = broker.config.max_pending_handshakes,
                                "too many connections in their handshake: closing new ones at accept");
                            last_refusal_log = Some(tokio::time::Instant::now());
                        }
                        drop(stream);
                        continue;
                    };
                    let (broker, stop) = (broker.clone(), stop.clone());
                    match tls.clone() {
                        None => {
                            tasks.spawn(crate::connection::serve(stream, peer, broker, stop, handshake));
                        }
                        Some(acceptor) => {
                            tasks.spawn(async move {
                                let _ = stream.set_nodelay(true);
                                let timeout = Duration::from_secs(broker.config.handshake_timeout_s.max(1));
                                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                                    Ok(Ok(stream)) => {
                                        let certificate =
                                            crate::tls::peer_common_name(stream.get_ref().1.peer_certificates());
                                        crate::connection::serve_tls(stream, peer, certificate, broker, stop, handshake)
                                            .await;
                                    }
                                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                                }
                            });
                        }
                    }
                }
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop_accept.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Raises and clears the memory and disk alarms. The memory alarm clears
/// only below 95% of the watermark, so it does not flap around it.
async fn watch_resources(broker: Arc<Broker>) {
    let config = &broker.config;
    let memory_limit = config.memory_limit();
    let paging_threshold = config.paging_threshold();
    let disk_limit = config.disk_free_limit_bytes;
    info!(memory_limit = ?memory_limit, disk_free_limit = disk_limit, "resource alarms armed");
    let mut tick = tokio::time::interval(Duration::from_millis(config.resource_check_interval_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    for n in 0u64.. {
        tick.tick().await;
        let used = crate::alarm::resident_bytes();
        if let (Some(threshold), Some(used)) = (paging_threshold, used) {
            // Ends below 90% of the threshold, so it does not flap around it.
            let pressure = if broker.paging_pressure() { used >= threshold / 10 * 9 } else { used > threshold };
            if broker.set_paging_pressure(pressure) {
                if pressure {
                    info!(used, threshold, "memory above the paging ratio: queues keep a short head in memory");
                } else {
                    info!(used, threshold, "memory below the paging ratio: queues keep their full head in memory");
                }
            }
        }
        if let (Some(limit), Some(used)) = (memory_limit, used) {
            let on = broker.alarms.state().memory;
            let alarm = if on { used >= limit / 20 * 19 } else { used > limit };
            if broker.alarms.set(Some(alarm), None) {
                if alarm {
                    warn!(used, limit, "memory alarm set: publishers blocked");
                } else {
                    info!(used, limit, "memory alarm cleared");
                }
            }
        }
        if n.is_multiple_of(10) {
            if let Some(free) = crate::alarm::disk_free(&config.data_dir) {
                let alarm = free < disk_limit;
                if broker.alarms.set(None, Some(alarm)) {
                    if alarm {
                        warn!(free, limit = disk_limit, "disk alarm set: publishers blocked");
                    } else {
                        info!(free, limit = disk_limit, "disk alarm cleared");
                    }
                }
            }
        }
    }
}
