//! `/api/connections`, `/api/channels`, `/api/consumers`: who is connected,
//! and closing a connection as an operator.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};
use warren_core::ConsumerSummary;
use warren_server::broker::ConnectionView;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::table_to_json;
use crate::listing::{answer, ListQuery};
use crate::AppState;

pub fn channel_count(state: &AppState, c: &ConnectionView) -> usize {
    state.broker.vhost(&c.vhost).map_or(0, |host| host.lock().channel_summaries(c.id).len())
}

fn connection_json(state: &AppState, c: &ConnectionView) -> Value {
    let info = &c.info;
    let (received, sent) = state.rates.traffic(c.id);
    json!({
        "name": info.name,
        "node": state.node,
        "vhost": c.vhost,
        "user": c.user,
        "user_who_performed_action": c.user,
        "state": "running",
        "type": "network",
        "protocol": "AMQP 0-9-1",
        "auth_mechanism": "PLAIN",
        "host": info.local.ip().to_string(),
        "port": info.local.port(),
        "peer_host": info.peer.ip().to_string(),
        "peer_port": info.peer.port(),
        "ssl": info.tls,
        "channels": channel_count(state, c),
        "channel_max": info.channel_max,
        "frame_max": info.frame_max,
        "timeout": info.heartbeat_s,
        "connected_at": info.connected_at_ms,
        "client_properties": table_to_json(&info.client_properties),
        "recv_oct": c.traffic.recv_oct,
        "recv_oct_details": crate::rates::depth_detail(Some(received)),
        "recv_cnt": c.traffic.recv_cnt,
        "send_oct": c.traffic.send_oct,
        "send_oct_details": crate::rates::depth_detail(Some(sent)),
        "send_cnt": c.traffic.send_cnt,
    })
}

/// The connections the caller may see: all for monitors, else its own.
fn visible(state: &AppState, caller: &Caller) -> Vec<ConnectionView> {
    let mut all = state.broker.connections();
    if !caller.is_monitor() {
        all.retain(|c| c.user == caller.user.name);
    }
    all
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let items = visible(&state, &caller).iter().map(|c| connection_json(&state, c)).collect();
    Ok(Json(answer(items, &query)?))
}

pub async fn vhost_connections(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    let items =
        visible(&state, &caller).iter().filter(|c| c.vhost == vhost).map(|c| connection_json(&state, c)).collect();
    Ok(Json(answer(items, &query)?))
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    visible(&state, &caller)
        .iter()
        .find(|c| c.info.name == name)
        .map(|c| Json(connection_json(&state, c)))
        .ok_or(ApiError::NotFound)
}

/// Closes the connection with 320 CONNECTION_FORCED and the `X-Reason`
/// header's text, as RabbitMQ does.
pub async fn close(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let owned = visible(&state, &caller).iter().any(|c| c.info.name == name);
    if !owned {
        return Err(ApiError::NotFound);
    }
    let reason = headers.get("x-reason").and_then(|v| v.to_str().ok()).unwrap_or("Closed via management plugin");
    if state.broker.close_connection_named(&name, reason) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound)
    }
}

pub async fn channels(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(answer(channel_items(&state, visible(&state, &caller)), &query)?))
}

/// `GET /api/connections/{name}/channels`.
pub async fn connection_channels(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let mut mine = visible(&state, &caller);
    mine.retain(|c| c.info.name == name);
    if mine.is_empty() {
        return Err(ApiError::NotFound);
    }
    Ok(Json(answer(channel_items(&state, mine), &query)?))
}

/// `GET /api/channels/{name}`, the name as listed (`connection (number)`).
pub async fn channel(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    channel_items(&state, visible(&state, &caller))
        .into_iter()
        .find(|c| c["name"] == name.as_str())
        .map(Json)
        .ok_or(ApiError::NotFound)
}

fn channel_items(state: &AppState, connections: Vec<ConnectionView>) -> Vec<Value> {
    let mut items = Vec::new();
    for c in connections {
        let Some(host) = state.broker.vhost(&c.vhost) else { continue };
        let channels = host.lock().channel_summaries(c.id);
        for ch in channels {
            let number = ch.channel;
            items.push(json!({
                "name": format!("{} ({number})", c.info.name),
                "node": state.node,
                "number": number,
                "user": c.user,
                "vhost": c.vhost,
                "state": "running",
                "consumer_count": ch.consumers,
                "messages_unacknowledged": ch.unacked,
                "messages_unconfirmed": 0,
                "messages_uncommitted": 0,
                "acks_uncommitted": 0,
                "prefetch_count": ch.prefetch_count,
                "global_prefetch_count": ch.global_prefetch_count,
                "confirm": ch.confirm,
                "transactional": ch.transactional,
                "connection_details": {
                    "name": c.info.name,
                    "peer_host": c.info.peer.ip().to_string(),
                    "peer_port": c.info.peer.port(),
                },
            }));
        }
    }
    items
}

fn consumer_json(state: &AppState, vhost: &str, c: &ConsumerSummary, names: &HashMap<u64, ConnectionView>) -> Value {
    let connection = names.get(&c.channel.connection);
    let connection_name = connection.map(|v| v.info.name.clone()).unwrap_or_default();
    json!({
        "queue": {"name": c.queue, "vhost": vhost},
        "consumer_tag": c.tag,
        "exclusive": c.exclusive,
        "ack_required": c.ack_required,
        "prefetch_count": c.prefetch_count,
        "active": true,
        "activity_status": "up",
        "arguments": {"x-priority": c.priority},
        "consumer_timeout": state.broker.config.consumer_timeout_ms,
        "channel_details": {
            "name": format!("{connection_name} ({})", c.channel.channel),
            "node": state.node,
            "number": c.channel.channel,
            "connection_name": connection_name,
            "peer_host": connection.map(|v| v.info.peer.ip().to_string()),
            "peer_port": connection.map(|v| v.info.peer.port()),
            "user": connection.map(|v| v.user.clone()),
        },
    })
}

fn vhost_consumer_list(state: &AppState, vhost: &str, names: &HashMap<u64, ConnectionView>) -> Vec<Value> {
    let consumers = state.broker.vhost(vhost).map(|host| host.lock().consumer_summaries()).unwrap_or_default();
    consumers.iter().map(|c| consumer_json(state, vhost, c, names)).collect()
}

/// The consumers of one queue (a queue's `consumer_details`).
pub fn queue_consumers(state: &AppState, vhost: &str, queue: &str) -> Vec<Value> {
    let names = connection_names(state);
    let consumers = state.broker.vhost(vhost).map(|host| host.lock().consumer_summaries()).unwrap_or_default();
    consumers.iter().filter(|c| c.queue == queue).map(|c| consumer_json(state, vhost, c, &names)).collect()
}

fn connection_names(state: &AppState) -> HashMap<u64, ConnectionView> {
    state.broker.connections().into_iter().map(|c| (c.id, c)).collect()
}

pub async fn consumers(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let names = connection_names(&state);
    let mut items = Vec::new();
    for vhost in state.broker.vhost_names() {
        if caller.sees_vhost(&state, &vhost) {
            items.extend(vhost_consumer_list(&state, &vhost, &names));
        }
    }
    Ok(Json(answer(items, &query)?))
}

pub async fn vhost_consumers(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    let names = connection_names(&state);
    Ok(Json(answer(vhost_consumer_list(&state, &vhost, &names), &query)?))
}
