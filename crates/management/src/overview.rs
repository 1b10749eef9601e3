//! `/api/overview`, `/api/nodes`: the node, its listeners and totals.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::queues::rate;
use crate::rates::{depth_detail, message_stats_json, sum_message_stats, NodeCounter, NodeCounts};
use crate::AppState;

/// The RabbitMQ version whose management API Warren follows.
pub const RABBITMQ_VERSION: &str = "3.10.8";

fn listeners_json(state: &AppState) -> Vec<Value> {
    state
        .listeners
        .iter()
        .map(|l| {
            json!({
                "node": state.node,
                "protocol": l.protocol,
                "ip_address": l.address.ip().to_string(),
                "port": l.address.port(),
                "socket_opts": {},
            })
        })
        .collect()
}

/// Totals over the virtual hosts the caller sees: (queues, ready,
/// unacked, exchanges, consumers).
fn totals(state: &AppState, caller: &Caller) -> (u64, u64, u64, u64, u64) {
    let mut out = (0, 0, 0, 0, 0);
    for vhost in state.broker.vhost_names() {
        if !caller.sees_vhost(state, &vhost) {
            continue;
        }
        let Some(host) = state.broker.vhost(&vhost) else { continue };
        for q in crate::queues::summaries(state, &vhost) {
            out.0 += 1;
            out.1 += q.ready;
            out.2 += q.unacked;
            out.4 += q.consumers as u64;
        }
        out.3 += host.lock().exchange_summaries().len() as u64;
    }
    out
}

pub async fn overview(State(state): State<Arc<AppState>>, caller: Caller) -> Json<Value> {
    let (queues, ready, unacked, exchanges, consumers) = totals(&state, &caller);
    let per_vhost: Vec<Value> = state
        .broker
        .vhost_names()
        .iter()
        .filter(|v| caller.sees_vhost(&state, v))
        .filter_map(|v| state.broker.vhost(v).map(|host| (v, host.lock().message_stats())))
        .map(|(v, stats)| message_stats_json(&stats, state.rates.vhost(v)))
        .collect();
    let depth_rates = state
        .broker
        .vhost_names()
        .iter()
        .filter(|v| caller.sees_vhost(&state, v))
        .filter_map(|v| state.rates.vhost(v))
        .fold((0.0, 0.0, 0.0), |(m, r, u), view| (m + view.messages(), r + view.ready(), u + view.unacked()));
    let connections = state.broker.connections();
    let visible = connections.iter().filter(|c| caller.is_monitor() || c.user == caller.user.name);
    let (connection_count, channel_count) =
        visible.fold((0u64, 0u64), |(n, ch), c| (n + 1, ch + crate::connections::channel_count(&state, c) as u64));
    let node = NodeCounts::now(&state);
    let mut churn = serde_json::Map::new();
    let fields: [(&str, NodeCounter); 7] = [
        ("channel_closed", |n| n.channels_closed),
        ("channel_created", |n| n.channels_opened),
        ("connection_closed", |n| n.connections_closed),
        ("connection_created", |n| n.connections_opened),
        ("queue_created", |n| n.queues_created),
        ("queue_declared", |n| n.queues_declared),
        ("queue_deleted", |n| n.queues_deleted),
    ];
    for (name, pick) in fields {
        churn.insert(name.into(), json!(pick(&node)));
        churn.insert(format!("{name}_details"), depth_detail(Some(state.rates.node_rate(pick))));
    }
    let mut message_stats = sum_message_stats(&per_vhost);
    if let Value::Object(map) = &mut message_stats {
        let publisher: [(&str, NodeCounter); 2] =
            [("confirm", |n| n.confirmed), ("return_unroutable", |n| n.returned_unroutable)];
        for (name, pick) in publisher {
            map.insert(name.into(), json!(pick(&node)));
            map.insert(format!("{name}_details"), depth_detail(Some(state.rates.node_rate(pick))));
        }
    }
    let exchange_types: Vec<Value> = ["direct", "fanout", "headers", "topic", "x-delayed-message"]
        .iter()
        .map(|t| json!({"name": t, "description": "", "enabled": true}))
        .collect();
    Json(json!({
        "management_version": RABBITMQ_VERSION,
        "rates_mode": "basic",
        "sample_retention_policies": {"global": [600, 3600, 28800, 86400], "basic": [600, 3600], "detailed": [600]},
        "exchange_types": exchange_types,
        "product_version": env!("CARGO_PKG_VERSION"),
        "product_name": "Warren",
        "rabbitmq_version": RABBITMQ_VERSION,
        "cluster_name": state.node,
        "erlang_version": "none (Rust)",
        "erlang_full_version": "none (Rust)",
        "release_series_support_status": "supported",
        "disable_stats": false,
        "is_op_policy_updating_enabled": false,
        "enable_queue_totals": true,
        "message_stats": message_stats,
        "churn_rates": churn,
        "queue_totals": {
            "messages": ready + unacked,
            "messages_details": depth_detail(Some(depth_rates.0)),
            "messages_ready": ready,
            "messages_ready_details": depth_detail(Some(depth_rates.1)),
            "messages_unacknowledged": unacked,
            "messages_unacknowledged_details": depth_detail(Some(depth_rates.2)),
        },
        "object_totals": {
            "channels": channel_count,
            "connections": connection_count,
            "consumers": consumers,
            "exchanges": exchanges,
            "queues": queues,
        },
        "statistics_db_event_queue": 0,
        "node": state.node,
        "listeners": listeners_json(&state),
        "contexts": [],
    }))
}

fn node_json(state: &AppState) -> Value {
    let alarms = state.broker.alarms.state();
    let memory = warren_server::alarm::resident_bytes().unwrap_or(0);
    let memory_limit = state.broker.config.memory_limit().unwrap_or(0);
    let (log_bytes, _) = state.broker.store.disk_usage();
    let spill = state.broker.store.spill_stats();
    let (fds, sockets) = warren_server::alarm::open_fds_and_sockets();
    let max_fds = warren_server::alarm::max_open_files().unwrap_or(0);
    let mut node = json!({
        "name": state.node,
        "type": "disc",
        "running": true,
        "being_drained": false,
        "mem_used": memory,
        "mem_used_details": rate(),
        "mem_limit": memory_limit,
        "mem_alarm": alarms.memory,
        "disk_free": warren_server::alarm::disk_free(&state.broker.config.data_dir).unwrap_or(0),
        "disk_free_details": rate(),
        "disk_free_limit": state.broker.config.disk_free_limit_bytes,
        "disk_free_alarm": alarms.disk,
        "fd_used": fds,
        "fd_used_details": rate(),
        "fd_total": max_fds,
        "sockets_used": sockets,
        "sockets_used_details": rate(),
        // Sockets are file descriptors: no limit of their own.
        "sockets_total": max_fds,
        "proc_used": 0,
        "proc_used_details": rate(),
        "proc_total": 0,
        "db_dir": state.broker.config.data_dir.display().to_string(),
        "rates_mode": "basic",
        "mem_calculation_strategy": "rss",
        "cluster_links": state.cluster.get().map_or_else(Vec::new, |members| {
            members
                .status()
                .into_iter()
                .filter(|peer| peer.up)
                .map(|peer| json!({"name": peer.name, "peer_addr": peer.address}))
                .collect::<Vec<_>>()
        }),
        "processors": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "uptime": u64::try_from(state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "run_queue": 0,
        "os_pid": std::process::id().to_string(),
        "partitions": [],
        "applications": [],
        "enabled_plugins": ["rabbitmq_management"],
        "exchange_types": [],
        "auth_mechanisms": [],
        "contexts": [],
        "log_files": [],
        "config_files": [],
        "warren_log_bytes": log_bytes,
    });
    // Beyond what one `json!` expands: Warren's own paging figures.
    if let Value::Object(map) = &mut node {
        map.insert("warren_spill_bytes".into(), json!(spill.bytes));
        map.insert("warren_spill_messages".into(), json!(spill.live));
        map.insert("warren_paging_pressure".into(), json!(state.broker.paging_pressure()));
        map.insert("warren_paging_threshold".into(), json!(state.broker.config.paging_threshold().unwrap_or(0)));
        if let Some(status) = state.raft.get().and_then(|raft| raft.status(warren_raft::metadata::METADATA)) {
            map.insert(
                "warren_metadata".into(),
                json!({
                    "state": status.state,
                    "term": status.term,
                    "leader": status.leader,
                    "members": status.voters,
                    "last_log_index": status.last_log_index,
                    "applied_index": status.applied_index,
                }),
            );
        }
    }
    node
}

pub async fn nodes(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require_monitor()?;
    let mut nodes = vec![node_json(&state)];
    if let Some(members) = state.cluster.get() {
        nodes.extend(members.status().iter().map(peer_json));
    }
    Ok(Json(Value::Array(nodes)))
}

/// Another node of the cluster: all this node knows of it is whether it is
/// up (its own figures are on its own API).
fn peer_json(peer: &warren_cluster::PeerStatus) -> Value {
    json!({
        "name": peer.name,
        "type": "disc",
        "running": peer.up,
        "warren_cluster_address": peer.address,
        "warren_cluster_error": peer.error,
    })
}

pub async fn node(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_monitor()?;
    if name != state.node {
        return Err(ApiError::NotFound);
    }
    Ok(Json(node_json(&state)))
}

pub async fn extensions(_caller: Caller) -> Json<Value> {
    Json(Value::Array(Vec::new()))
}
