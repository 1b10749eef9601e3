//! Prometheus metrics (`/metrics`, `/metrics/per-object`), with
//! `rabbitmq_prometheus`'s metric names and labels so RabbitMQ's Grafana
//! dashboards read them unchanged, plus Warren's own (`warren_*`). Encoded
//! by `prometheus-client` (OpenMetrics text), built afresh per scrape from a
//! snapshot taken a bounded chunk of queues per lock acquisition.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use warren_core::MessageStats;

use crate::error::ApiError;
use crate::AppState;

type Labels = Vec<(String, String)>;

/// One queue as the metrics see it.
struct QueueRow {
    vhost: String,
    name: String,
    ready: u64,
    unacked: u64,
    bytes: u64,
    consumers: u64,
    published: u64,
}

/// A histogram read from counters kept elsewhere (the broker's atomics):
/// `prometheus-client`'s own type can only observe, not be loaded.
#[derive(Debug)]
struct Loaded {
    sum: f64,
    count: u64,
    /// (upper bound, count in that bucket), not cumulative; `f64::MAX` last.
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for Loaded {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Reads one figure of a queue.
type QueueField = fn(&QueueRow) -> u64;

struct Snapshot {
    queues: Vec<QueueRow>,
    stats: MessageStats,
    connections: u64,
    channels: u64,
}

fn snapshot(state: &AppState) -> Snapshot {
    let mut queues = Vec::new();
    let mut stats = MessageStats::default();
    let connections = state.broker.connections();
    let channels: u64 = connections.iter().map(|c| crate::connections::channel_count(state, c) as u64).sum();
    for vhost in state.broker.vhost_names() {
        let Some(host) = state.broker.vhost(&vhost) else { continue };
        stats.add(&host.lock().message_stats());
        for q in crate::queues::summaries(state, &vhost) {
            queues.push(QueueRow {
                vhost: vhost.clone(),
                name: q.name,
                ready: q.ready,
                unacked: q.unacked,
                bytes: q.ready_bytes,
                consumers: q.consumers as u64,
                published: q.stats.publish,
            });
        }
    }
    Snapshot { queues, stats, connections: connections.len() as u64, channels }
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let metric: Gauge = Gauge::default();
    metric.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register(name, help, metric);
}

fn registry(state: &AppState, per_object: bool) -> Registry {
    let snapshot = snapshot(state);
    let mut registry = Registry::default();
    registry.register(
        "rabbitmq_identity",
        "RabbitMQ node and cluster identity",
        Info::new(vec![
            ("rabbitmq_node".to_string(), state.node.clone()),
            ("rabbitmq_cluster".to_string(), state.node.clone()),
            ("rabbitmq_cluster_permanent_id".to_string(), state.node.clone()),
        ]),
    );
    registry.register(
        "rabbitmq_build",
        "RabbitMQ version info",
        Info::new(vec![
            ("rabbitmq_version".to_string(), crate::overview::RABBITMQ_VERSION.to_string()),
            ("product_name".to_string(), "Warren".to_string()),
            ("product_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ("prometheus_plugin_version".to_string(), crate::overview::RABBITMQ_VERSION.to_string()),
        ]),
    );
    gauge(&mut registry, "rabbitmq_connections", "Connections currently open", snapshot.connections);
    gauge(&mut registry, "rabbitmq_channels", "Channels currently open", snapshot.channels);
    gauge(&mut registry, "rabbitmq_queues", "Queues available", snapshot.queues.len() as u64);
    let consumers: u64 = snapshot.queues.iter().map(|q| q.consumers).sum();
    gauge(&mut registry, "rabbitmq_consumers", "Consumers currently connected", consumers);

    let s = &snapshot.stats;
    for (name, help, value) in [
        ("rabbitmq_global_messages_received", "Total number of messages received from publishers", s.publish),
        ("rabbitmq_global_messages_routed", "Total number of messages routed to queues", s.publish - s.unroutable),
        (
            "rabbitmq_global_messages_unroutable_dropped",
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
            s.unroutable,
        ),
        ("rabbitmq_global_messages_delivered", "Total number of messages delivered to consumers", s.deliver_get()),
        (
            "rabbitmq_global_messages_delivered_consume_manual_ack",
            "Total number of messages delivered to consumers using basic.consume with manual acknowledgment",
            s.deliver,
        ),
        (
            "rabbitmq_global_messages_delivered_consume_auto_ack",
            "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment",
            s.deliver_no_ack,
        ),
        (
            "rabbitmq_global_messages_delivered_get_manual_ack",
            "Total number of messages delivered to consumers using basic.get with manual acknowledgment",
            s.get,
        ),
        (
            "rabbitmq_global_messages_delivered_get_auto_ack",
            "Total number of messages delivered to consumers using basic.get with automatic acknowledgment",
            s.get_no_ack,
        ),
        ("rabbitmq_global_messages_redelivered", "Total number of messages redelivered to consumers", s.redeliver),
        ("rabbitmq_global_messages_acknowledged", "Total number of messages acknowledged by consumers", s.ack),
    ] {
        amqp_counter(&mut registry, name, help, value);
    }

    let node = crate::rates::NodeCounts::now(state);
    for (name, help, value) in [
        ("rabbitmq_connections_opened", "Total number of connections opened", node.connections_opened),
        ("rabbitmq_connections_closed", "Total number of connections closed or terminated", node.connections_closed),
        ("rabbitmq_channels_opened", "Total number of channels opened", node.channels_opened),
        ("rabbitmq_channels_closed", "Total number of channels closed", node.channels_closed),
        ("rabbitmq_queues_declared", "Total number of queues declared", node.queues_declared),
        ("rabbitmq_queues_created", "Total number of queues created", node.queues_created),
        ("rabbitmq_queues_deleted", "Total number of queues deleted", node.queues_deleted),
    ] {
        counter(&mut registry, name, help, value);
    }
    use warren_server::broker::Counters;
    let counters = &state.broker.counters;
    for (name, help, value) in [
        (
            "rabbitmq_global_messages_received_confirm",
            "Total number of messages received from publishers expecting confirmations",
            Counters::get(&counters.received_confirm),
        ),
        ("rabbitmq_global_messages_confirmed", "Total number of messages confirmed to publishers", node.confirmed),
        (
            "rabbitmq_global_messages_unroutable_returned",
            "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
            node.returned_unroutable,
        ),
    ] {
        amqp_counter(&mut registry, name, help, value);
    }

    // rabbitmq_prometheus's channel counters, summed over the node: what
    // RabbitMQ's Overview dashboard charts.
    for (name, help, value) in [
        ("rabbitmq_channel_messages_published", "Total number of messages published into an exchange on a channel", s.publish),
        ("rabbitmq_channel_messages_confirmed", "Total number of messages published into an exchange and confirmed on the channel", node.confirmed),
        ("rabbitmq_channel_messages_unroutable_dropped", "Total number of messages published as non-mandatory into an exchange and dropped as unroutable", s.unroutable),
        ("rabbitmq_channel_messages_unroutable_returned", "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable", node.returned_unroutable),
        ("rabbitmq_channel_messages_delivered_ack", "Total number of messages delivered to consumers in manual acknowledgement mode", s.deliver),
        ("rabbitmq_channel_messages_delivered", "Total number of messages delivered to consumers in automatic acknowledgement mode", s.deliver_no_ack),
        ("rabbitmq_channel_messages_redelivered", "Total number of messages redelivered to consumers", s.redeliver),
        ("rabbitmq_channel_messages_acked", "Total number of messages acknowledged by consumers", s.ack),
        ("rabbitmq_channel_get_ack", "Total number of messages fetched with basic.get in manual acknowledgement mode", s.get),
        ("rabbitmq_channel_get", "Total number of messages fetched with basic.get in automatic acknowledgement mode", s.get_no_ack),
        ("rabbitmq_channel_get_empty", "Total number of times basic.get operations fetched no message", s.get_empty),
        ("rabbitmq_queue_messages_published", "Total number of messages published to queues", snapshot.queues.iter().map(|q| q.published).sum()),
    ] {
        counter(&mut registry, name, help, value);
    }
    gauge(&mut registry, "rabbitmq_channel_consumers", "Consumers on a channel", consumers);
    let unconfirmed = state.broker.connections().iter().map(|c| c.unconfirmed).sum();
    gauge(
        &mut registry,
        "rabbitmq_channel_messages_unconfirmed",
        "Published but not yet confirmed messages",
        unconfirmed,
    );

    let ready: u64 = snapshot.queues.iter().map(|q| q.ready).sum();
    let unacked: u64 = snapshot.queues.iter().map(|q| q.unacked).sum();
    let bytes: u64 = snapshot.queues.iter().map(|q| q.bytes).sum();
    if per_object {
        let families: [(&str, &str, QueueField); 5] = [
            ("rabbitmq_queue_messages", "Sum of ready and unacknowledged messages", |q| q.ready + q.unacked),
            ("rabbitmq_queue_messages_ready", "Messages ready to be delivered to consumers", |q| q.ready),
            ("rabbitmq_queue_messages_unacked", "Messages delivered to consumers but not yet acknowledged", |q| {
                q.unacked
            }),
            ("rabbitmq_queue_messages_bytes", "Size in bytes of ready messages' bodies", |q| q.bytes),
            ("rabbitmq_queue_consumers", "Consumers on a queue", |q| q.consumers),
        ];
        for (name, help, pick) in families {
            let family = Family::<Labels, Gauge>::default();
            for q in &snapshot.queues {
                let labels = vec![("vhost".to_string(), q.vhost.clone()), ("queue".to_string(), q.name.clone())];
                family.get_or_create(&labels).set(i64::try_from(pick(q)).unwrap_or(i64::MAX));
            }
            registry.register(name, help, family);
        }
    } else {
        gauge(&mut registry, "rabbitmq_queue_messages", "Sum of ready and unacknowledged messages", ready + unacked);
        gauge(&mut registry, "rabbitmq_queue_messages_ready", "Messages ready to be delivered to consumers", ready);
        gauge(&mut registry, "rabbitmq_queue_messages_unacked", "Messages delivered but not yet acknowledged", unacked);
        gauge(&mut registry, "rabbitmq_queue_messages_bytes", "Size in bytes of ready messages' bodies", bytes);
        gauge(&mut registry, "rabbitmq_queue_consumers", "Consumers on queues", consumers);
    }

    let memory = warren_server::alarm::resident_bytes().unwrap_or(0);
    gauge(&mut registry, "rabbitmq_process_resident_memory_bytes", "Memory used in bytes", memory);
    gauge(
        &mut registry,
        "rabbitmq_resident_memory_limit_bytes",
        "Memory high watermark in bytes",
        state.broker.config.memory_limit().unwrap_or(0),
    );
    gauge(
        &mut registry,
        "rabbitmq_disk_space_available_bytes",
        "Disk space available in bytes",
        warren_server::alarm::disk_free(&state.broker.config.data_dir).unwrap_or(0),
    );
    let (fds, sockets) = warren_server::alarm::open_fds_and_sockets();
    let max_fds = warren_server::alarm::max_open_files().unwrap_or(0);
    gauge(&mut registry, "rabbitmq_process_open_fds", "Open file descriptors", fds);
    gauge(&mut registry, "rabbitmq_process_max_fds", "Open file descriptors limit", max_fds);
    gauge(&mut registry, "rabbitmq_process_open_tcp_sockets", "Open TCP sockets", sockets);
    // Sockets are file descriptors: no limit of their own.
    gauge(&mut registry, "rabbitmq_process_max_tcp_sockets", "Open TCP sockets limit", max_fds);
    let alarms = state.broker.alarms.state();
    gauge(
        &mut registry,
        "rabbitmq_alarms_memory_used_watermark",
        "Is the memory alarm in effect",
        u64::from(alarms.memory),
    );
    gauge(
        &mut registry,
        "rabbitmq_alarms_free_disk_space_watermark",
        "Is the disk alarm in effect",
        u64::from(alarms.disk),
    );

    let spill = state.broker.store.spill_stats();
    gauge(&mut registry, "warren_spill_bytes", "Bytes of the spill's files (pages of transient messages)", spill.bytes);
    gauge(&mut registry, "warren_spill_messages", "Message bodies paged out to the spill", spill.live);
    gauge(
        &mut registry,
        "warren_paging_pressure",
        "Is memory above the paging ratio of the watermark (queues keep a short head in memory)",
        u64::from(state.broker.paging_pressure()),
    );
    let (log_bytes, segments) = state.broker.store.disk_usage();
    gauge(&mut registry, "warren_log_bytes", "Bytes of the message log on disk", log_bytes);
    gauge(&mut registry, "warren_log_segments", "Segment files of the message log", segments as u64);
    let commits = state.broker.store.commit_stats();
    counter(&mut registry, "warren_log_fsyncs", "Fsyncs of the message log (group commits)", commits.syncs);
    counter(&mut registry, "warren_log_entries", "Entries appended to the message log", commits.entries);
    let bounds = warren_storage::group::BATCH_BOUNDS.iter().map(|&b| b as f64).chain(std::iter::once(f64::MAX));
    #[expect(clippy::cast_precision_loss, reason = "a metric")]
    let per_fsync = Loaded {
        sum: commits.entries as f64,
        count: commits.batch_sizes.iter().sum(),
        buckets: bounds.zip(commits.batch_sizes).collect(),
    };
    registry.register("warren_log_entries_per_fsync", "Log entries made durable by one group commit", per_fsync);
    let latency = state.broker.counters.confirm_latency.read();
    registry.register(
        "warren_confirm_latency_seconds",
        "Time from a publish to its confirm (one publish in flight per channel is timed)",
        Loaded { sum: latency.sum_seconds, count: latency.count, buckets: latency.buckets },
    );
    let traffic =
        state.broker.connections().iter().fold((0, 0), |(r, s), c| (r + c.traffic.recv_oct, s + c.traffic.send_oct));
    for (name, help, value) in [
        ("rabbitmq_connection_incoming_bytes", "Total number of bytes received on a connection", traffic.0),
        ("rabbitmq_connection_outgoing_bytes", "Total number of bytes sent on a connection", traffic.1),
    ] {
        counter(&mut registry, name, help, value);
    }
    registry
}

async fn metrics(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    render(&state, false)
}

async fn per_object(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    render(&state, true)
}

fn render(state: &AppState, per_object: bool) -> Result<impl IntoResponse, ApiError> {
    let registry = registry(state, per_object);
    let mut text = String::new();
    encode(&mut text, &registry).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text))
}

/// `/metrics/detailed?family=…&vhost=…`: RabbitMQ's metric groups by
/// name, per object, `rabbitmq_detailed_` prefixed; the queue groups limited
/// to the given virtual hosts (all when none is given). Groups Warren has no
/// figures for (Erlang's, Raft's) are answered empty, as unknown ones are.
async fn detailed(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let mut families = Vec::new();
    let mut vhosts = Vec::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "family" => families.push(value.into_owned()),
            "vhost" => vhosts.push(value.into_owned()),
            _ => {}
        }
    }
    let registry = detailed_registry(&state, &families, &vhosts);
    let mut text = String::new();
    encode(&mut text, &registry).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text))
}

fn per_queue(registry: &mut Registry, rows: &[QueueRow], name: &str, help: &str, pick: QueueField) {
    let family = Family::<Labels, Gauge>::default();
    for q in rows {
        let labels = vec![("vhost".to_string(), q.vhost.clone()), ("queue".to_string(), q.name.clone())];
        family.get_or_create(&labels).set(i64::try_from(pick(q)).unwrap_or(i64::MAX));
    }
    registry.register(name, help, family);
}

/// A counter of rabbitmq_prometheus's `global` family, labelled with the
/// protocol (named without `_total`: the encoder adds it).
fn amqp_counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let family = Family::<Labels, Counter>::default();
    family.get_or_create(&vec![("protocol".to_string(), "amqp091".to_string())]).inc_by(value);
    registry.register(name, help, family);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let metric: Counter<u64, AtomicU64> = Counter::default();
    metric.inc_by(value);
    registry.register(name, help, metric);
}

fn detailed_registry(state: &AppState, families: &[String], vhosts: &[String]) -> Registry {
    let mut registry = Registry::default();
    let wants = |family: &str| families.iter().any(|f| f == family);
    if wants("connection_churn_metrics") {
        let node = crate::rates::NodeCounts::now(state);
        for (name, help, value) in [
            ("rabbitmq_detailed_connections_opened", "Total number of connections opened", node.connections_opened),
            (
                "rabbitmq_detailed_connections_closed",
                "Total number of connections closed or terminated",
                node.connections_closed,
            ),
            ("rabbitmq_detailed_channels_opened", "Total number of channels opened", node.channels_opened),
            ("rabbitmq_detailed_channels_closed", "Total number of channels closed", node.channels_closed),
            ("rabbitmq_detailed_queues_declared", "Total number of queues declared", node.queues_declared),
            ("rabbitmq_detailed_queues_created", "Total number of queues created", node.queues_created),
            ("rabbitmq_detailed_queues_deleted", "Total number of queues deleted", node.queues_deleted),
        ] {
            counter(&mut registry, name, help, value);
        }
    }
    if wants("node_coarse_metrics") {
        gauge(
            &mut registry,
            "rabbitmq_detailed_process_open_fds",
            "Open file descriptors",
            warren_server::alarm::open_fds_and_sockets().0,
        );
        let memory = warren_server::alarm::resident_bytes().unwrap_or(0);
        gauge(&mut registry, "rabbitmq_detailed_process_resident_memory_bytes", "Memory used in bytes", memory);
        let free = warren_server::alarm::disk_free(&state.broker.config.data_dir).unwrap_or(0);
        gauge(&mut registry, "rabbitmq_detailed_disk_space_available_bytes", "Disk space available in bytes", free);
    }
    if wants("node_metrics") {
        let config = &state.broker.config;
        let limit = config.memory_limit().unwrap_or(0);
        gauge(&mut registry, "rabbitmq_detailed_resident_memory_limit_bytes", "Memory high watermark in bytes", limit);
        let low = config.disk_free_limit_bytes;
        gauge(
            &mut registry,
            "rabbitmq_detailed_disk_space_available_limit_bytes",
            "Free disk space low watermark in bytes",
            low,
        );
    }
    let queue_groups = ["queue_coarse_metrics", "queue_consumer_count", "queue_metrics"];
    if queue_groups.iter().any(|g| wants(g)) {
        let mut rows = Vec::new();
        for vhost in state.broker.vhost_names().into_iter().filter(|v| vhosts.is_empty() || vhosts.contains(v)) {
            for q in crate::queues::summaries(state, &vhost) {
                let consumers = q.consumers as u64;
                let row = QueueRow {
                    vhost: vhost.clone(),
                    name: q.name,
                    ready: q.ready,
                    unacked: q.unacked,
                    bytes: q.ready_bytes,
                    consumers,
                    published: q.stats.publish,
                };
                rows.push(row);
            }
        }
        if wants("queue_coarse_metrics") {
            per_queue(
                &mut registry,
                &rows,
                "rabbitmq_detailed_queue_messages_ready",
                "Messages ready to be delivered to consumers",
                |q| q.ready,
            );
            per_queue(
                &mut registry,
                &rows,
                "rabbitmq_detailed_queue_messages_unacked",
                "Messages delivered to consumers but not yet acknowledged",
                |q| q.unacked,
            );
            per_queue(
                &mut registry,
                &rows,
                "rabbitmq_detailed_queue_messages",
                "Sum of ready and unacknowledged messages - total queue depth",
                |q| q.ready + q.unacked,
            );
        }
        // `queue_metrics` includes the consumer count, as in RabbitMQ.
        if wants("queue_consumer_count") || wants("queue_metrics") {
            per_queue(&mut registry, &rows, "rabbitmq_detailed_queue_consumers", "Consumers on a queue", |q| {
                q.consumers
            });
        }
        if wants("queue_metrics") {
            per_queue(
                &mut registry,
                &rows,
                "rabbitmq_detailed_queue_messages_ready_bytes",
                "Size in bytes of ready messages",
                |q| q.bytes,
            );
        }
    }
    if wants("connection_coarse_metrics") {
        let incoming = Family::<Labels, Counter>::default();
        let outgoing = Family::<Labels, Counter>::default();
        for c in state.broker.connections() {
            let labels = vec![("vhost".to_string(), c.vhost.clone()), ("connection".to_string(), c.info.name.clone())];
            incoming.get_or_create(&labels).inc_by(c.traffic.recv_oct);
            outgoing.get_or_create(&labels).inc_by(c.traffic.send_oct);
        }
        registry.register(
            "rabbitmq_detailed_connection_incoming_bytes",
            "Total number of bytes received on a connection",
            incoming,
        );
        registry.register(
            "rabbitmq_detailed_connection_outgoing_bytes",
            "Total number of bytes sent on a connection",
            outgoing,
        );
    }
    registry
}

/// The Prometheus endpoints (no authentication, as RabbitMQ's).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/metrics/per-object", get(per_object))
        .route("/metrics/detailed", get(detailed))
        .with_state(state)
}
