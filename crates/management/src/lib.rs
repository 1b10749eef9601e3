//! Warren's management HTTP API, compatible with RabbitMQ's management
//! plugin (the same paths, JSON field names and types, status codes), so
//! `rabbitmqadmin`, `rabbitmq_http_client` and scripts written for RabbitMQ
//! work unchanged.
//!
//! Rooms: `auth.rs` (Basic auth, RabbitMQ's tags), `error.rs` (status
//! codes and error bodies), `json.rs` (field tables as JSON), `listing.rs`
//! (pagination, filtering and sorting), and one module per family of
//! endpoints. Every change goes through the broker's
//! [`warren_server::session::Session`], as an AMQP method would; a change
//! to durable definitions is answered once its log entry is durable.

mod access;
mod admin;
mod auth;
mod change;
mod connections;
mod error;
mod exchanges;
mod health;
mod https;
mod json;
mod listing;
mod overview;
mod parameters;
mod prometheus;
mod queues;
mod rates;
mod ui;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post, put};
use axum::Router;
use tokio::net::TcpListener;
use tracing::info;
use warren_server::Broker;

pub use error::ApiError;

/// A listener of the node, as `/api/overview` and the health checks list it.
#[derive(Clone, Debug)]
pub struct Listener {
    /// `amqp`, `amqp/ssl`, `http` or `https`.
    pub protocol: &'static str,
    pub address: SocketAddr,
}

/// What every handler shares.
pub struct AppState {
    pub broker: Arc<Broker>,
    pub listeners: Vec<Listener>,
    /// RabbitMQ's node name form: `warren@<host>`.
    pub node: String,
    pub rates: rates::Rates,
    /// When the management API started (the node's `uptime`).
    pub started: std::time::Instant,
    /// The other nodes, when this one is in a cluster.
    pub cluster: std::sync::OnceLock<warren_cluster::Members>,
    /// This node's Raft groups, when clustered.
    pub raft: std::sync::OnceLock<warren_raft::Node>,
}

/// The management API's listeners, ready to serve.
pub struct Management {
    listeners: Vec<TcpListener>,
    prometheus: Vec<TcpListener>,
    https: Vec<https::TlsListener>,
    state: Arc<AppState>,
}

/// Largest request body accepted (a definitions import is the largest).
pub const BODY_LIMIT_BYTES: usize = 16 * 1024 * 1024;

impl Management {
    /// Serves on listeners bound by the caller; `amqp` lists the broker's
    /// own listeners for the overview and health checks.
    pub fn new(broker: Arc<Broker>, listeners: Vec<TcpListener>, mut amqp: Vec<Listener>) -> Management {
        for listener in &listeners {
            if let Ok(address) = listener.local_addr() {
                amqp.push(Listener { protocol: "http", address });
            }
        }
        let node = broker.config.node_name();
        let state = Arc::new(AppState {
            broker,
            listeners: amqp,
            node,
            rates: rates::Rates::default(),
            started: std::time::Instant::now(),
            cluster: std::sync::OnceLock::new(),
            raft: std::sync::OnceLock::new(),
        });
        Management { listeners, prometheus: Vec::new(), https: Vec::new(), state }
    }

    /// Lists the cluster's other nodes in `/api/nodes`.
    pub fn with_cluster(self, members: warren_cluster::Members) -> Management {
        let _ = self.state.cluster.set(members);
        self
    }

    /// Shows this node's view of the metadata group in `/api/nodes`.
    pub fn with_raft(self, node: warren_raft::Node) -> Management {
        let _ = self.state.raft.set(node);
        self
    }

    /// Also serves Prometheus metrics (`/metrics`, `/metrics/per-object`)
    /// on these listeners.
    pub fn with_prometheus(mut self, listeners: Vec<TcpListener>) -> Management {
        self.prometheus = listeners;
        self
    }

    /// Also serves the API over HTTPS on these listeners.
    pub fn with_https(mut self, listeners: Vec<TcpListener>, acceptor: tokio_rustls::TlsAcceptor) -> Management {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            for listener in &listeners {
                if let Ok(address) = listener.local_addr() {
                    state.listeners.push(Listener { protocol: "https", address });
                }
            }
        }
        self.https = listeners.into_iter().map(|tcp| https::TlsListener { tcp, acceptor: acceptor.clone() }).collect();
        self
    }

    pub fn prometheus_addrs(&self) -> Vec<SocketAddr> {
        self.prometheus.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let interval = Duration::from_millis(self.state.broker.config.collect_statistics_interval_ms.max(100));
        let sampler = tokio::spawn(rates::sample_forever(self.state.clone(), interval));
        let api = router(self.state.clone());
        let metrics = prometheus::router(self.state.clone());
        let mut tasks = tokio::task::JoinSet::new();
        let served = self.listeners.into_iter().map(|l| (l, api.clone(), "the management API"));
        let served = served.chain(self.prometheus.into_iter().map(|l| (l, metrics.clone(), "Prometheus metrics")));
        for (listener, router, what) in served {
            if let Ok(address) = listener.local_addr() {
                info!(%address, "listening for {what}");
            }
            let service = router.clone().into_make_service_with_connect_info::<SocketAddr>();
            let mut stopped = stopped.clone();
            tasks.spawn(async move {
                let graceful = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                if let Err(error) = axum::serve(listener, service).with_graceful_shutdown(graceful).await {
                    tracing::warn!(%error, "management listener failed");
                }
            });
        }
        for listener in self.https {
            if let Ok(address) = axum::serve::Listener::local_addr(&listener) {
                info!(%address, "listening for the management API over HTTPS");
            }
            let listener = axum::serve::ListenerExt::tap_io(listener, |_| {});
            let service = api.clone().into_make_service_with_connect_info::<SocketAddr>();
            let mut stopped = stopped.clone();
            tasks.spawn(async move {
                let graceful = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                if let Err(error) = axum::serve(listener, service).with_graceful_shutdown(graceful).await {
                    tracing::warn!(%error, "management HTTPS listener failed");
                }
            });
        }
        shutdown.await;
        let _ = stop.send(true);
        while tasks.join_next().await.is_some() {}
        sampler.abort();
    }
}

/// Every route of the API.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/overview", get(overview::overview))
        .route("/api/whoami", get(access::whoami))
        .route("/api/nodes", get(overview::nodes))
        .route("/api/nodes/{node}", get(overview::node))
        .route("/api/vhosts", get(access::vhosts))
        .route("/api/vhosts/{vhost}", get(access::vhost).put(admin::put_vhost).delete(admin::delete_vhost))
        .route("/api/vhosts/{vhost}/connections", get(connections::vhost_connections))
        .route("/api/users", get(access::users))
        .route("/api/users/{user}", get(access::user).put(admin::put_user).delete(admin::delete_user))
        .route("/api/permissions", get(access::permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(admin::get_permission).put(admin::put_permission).delete(admin::delete_permission),
        )
        .route("/api/queues", get(queues::list_all))
        .route("/api/queues/{vhost}", get(queues::list_vhost))
        .route("/api/queues/{vhost}/{name}", get(queues::show).put(queues::declare).delete(queues::delete))
        .route("/api/queues/{vhost}/{name}/contents", axum::routing::delete(queues::purge))
        .route("/api/queues/{vhost}/{name}/bindings", get(exchanges::queue_bindings))
        .route("/api/queues/{vhost}/{name}/get", post(queues::get_messages))
        .route("/api/warren/quorum", get(queues::quorum_list))
        .route("/api/warren/nodes/{node}", axum::routing::delete(queues::forget_node))
        .route("/api/warren/quorum/{vhost}/{name}", get(queues::quorum_status))
        .route(
            "/api/warren/quorum/{vhost}/{name}/members/{node}",
            put(queues::add_quorum_member).delete(queues::delete_quorum_member),
        )
        .route("/api/exchanges", get(exchanges::list_all))
        .route("/api/exchanges/{vhost}", get(exchanges::list_vhost))
        .route("/api/exchanges/{vhost}/{name}", get(exchanges::show).put(exchanges::declare).delete(exchanges::delete))
        .route("/api/exchanges/{vhost}/{name}/publish", post(exchanges::publish))
        .route("/api/exchanges/{vhost}/{name}/bindings/source", get(exchanges::source_bindings))
        .route("/api/exchanges/{vhost}/{name}/bindings/destination", get(exchanges::destination_bindings))
        .route("/api/bindings", get(exchanges::bindings_all))
        .route("/api/bindings/{vhost}", get(exchanges::bindings_vhost))
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}",
            get(exchanges::bindings_between).post(exchanges::bind),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}/{props}",
            get(exchanges::binding).delete(exchanges::unbind),
        )
        .route("/api/connections", get(connections::list))
        .route("/api/connections/{name}", get(connections::show).delete(connections::close))
        .route("/api/connections/{name}/channels", get(connections::connection_channels))
        .route("/api/channels", get(connections::channels))
        .route("/api/channels/{name}", get(connections::channel))
        .route("/api/consumers", get(connections::consumers))
        .route("/api/consumers/{vhost}", get(connections::vhost_consumers))
        .route("/api/health/checks/alarms", get(health::alarms))
        .route("/api/health/checks/local-alarms", get(health::alarms))
        .route("/api/health/checks/virtual-hosts", get(health::virtual_hosts))
        .route("/api/health/checks/port-listener/{port}", get(health::port_listener))
        .route("/api/health/checks/protocol-listener/{protocol}", get(health::protocol_listener))
        .route("/api/health/checks/node-is-quorum-critical", get(health::quorum_critical))
        .route("/api/definitions", get(access::definitions_export).post(admin::import))
        .route("/api/definitions/{vhost}", get(access::vhost_definitions_export).post(admin::import_vhost))
        .route("/api/extensions", get(overview::extensions))
        .route("/api/vhost-limits", get(access::vhost_limits))
        .route("/api/vhost-limits/{vhost}", get(parameters::get_vhost_limits))
        .route(
            "/api/vhost-limits/{vhost}/{name}",
            put(parameters::put_vhost_limit).delete(parameters::delete_vhost_limit),
        )
        .route("/api/user-limits", get(access::user_limits))
        .route("/api/user-limits/{user}", get(parameters::get_user_limits))
        .route("/api/user-limits/{user}/{name}", put(parameters::put_user_limit).delete(parameters::delete_user_limit))
        .route("/api/policies", get(parameters::policies))
        .route("/api/policies/{vhost}", get(parameters::vhost_policies))
        .route(
            "/api/policies/{vhost}/{name}",
            get(parameters::get_policy).put(parameters::put_policy).delete(parameters::delete_policy),
        )
        .route("/api/topic-permissions", get(access::topic_permissions))
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            get(admin::get_topic_permission).put(admin::put_topic_permission).delete(admin::delete_topic_permission),
        )
        .route("/api/parameters", get(access::empty_list))
        .route("/api/global-parameters", get(access::empty_list))
        .route("/api/feature-flags", get(access::empty_list))
        .route("/api/ping", put(health::ping).get(health::ping))
        .merge(ui::router())
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .with_state(state)
}
