//! `/api/queues`: list, show, declare, delete, purge, and get messages.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};
use warren_codec::properties::{flag, Properties};
use warren_core::vhost::{ChannelKey, Outbox};
use warren_core::{Message, QueueDeclare, QueueSummary};
use warren_server::access::{Permission, Resource};

use crate::auth::Caller;
use crate::change::{change, HTTP_CONNECTION};
use crate::error::ApiError;
use crate::json::JsonBody;
use crate::json::{count, flag as json_flag, table_to_json, TableJson};
use crate::listing::{answer, DeleteQuery, ListQuery};
use crate::rates::{MessageStatsJson, Rate};
use crate::AppState;

/// Queues listed per lock acquisition: a listing of many queues never holds
/// a virtual host's lock for long (well under a millisecond per chunk).
const QUEUES_PER_LOCK: usize = 128;

/// RabbitMQ's rate object, for figures Warren does not sample (yet).
pub fn rate() -> Value {
    json!({"rate": 0.0})
}

/// A queue as RabbitMQ's API shows it, serialized straight from the
/// summary (a listing of 10,000 queues builds no intermediate `Value`s).
#[derive(Serialize)]
pub struct QueueJson<'a> {
    name: &'a str,
    vhost: &'a str,
    #[serde(rename = "type")]
    queue_type: &'static str,
    node: &'a str,
    state: &'static str,
    durable: bool,
    auto_delete: bool,
    exclusive: bool,
    arguments: TableJson<'a>,
    consumers: usize,
    consumer_capacity: f64,
    consumer_utilisation: f64,
    exclusive_consumer_tag: Option<&'a str>,
    single_active_consumer_tag: Option<&'a str>,
    policy: Option<&'a str>,
    operator_policy: Option<&'a str>,
    effective_policy_definition: serde_json::Map<String, Value>,
    memory: u64,
    messages: u64,
    messages_details: Rate,
    messages_ready: u64,
    messages_ready_details: Rate,
    messages_unacknowledged: u64,
    messages_unacknowledged_details: Rate,
    messages_ram: u64,
    messages_ready_ram: u64,
    messages_unacknowledged_ram: u64,
    messages_persistent: u64,
    messages_paged_out: u64,
    message_bytes: u64,
    message_bytes_ready: u64,
    message_bytes_unacknowledged: u64,
    message_bytes_ram: u64,
    message_bytes_persistent: u64,
    message_bytes_paged_out: u64,
    head_message_timestamp: Option<u64>,
    recoverable_slaves: Option<Vec<String>>,
    /// RabbitMQ's local-time form, `2026-12-04 15:38:30`.
    idle_since: Option<String>,
    message_stats: MessageStatsJson<'a>,
}

impl<'a> QueueJson<'a> {
    pub fn new(state: &'a AppState, vhost: &'a str, q: &'a QueueSummary) -> QueueJson<'a> {
        let rates = state.rates.queue(vhost, &q.name);
        let busy = if q.consumers > 0 { 1.0 } else { 0.0 };
        QueueJson {
            name: &q.name,
            vhost,
            queue_type: q.queue_type,
            node: &state.node,
            state: "running",
            durable: q.durable,
            auto_delete: q.auto_delete,
            exclusive: q.exclusive,
            arguments: TableJson(&q.arguments),
            consumers: q.consumers,
            consumer_capacity: busy,
            consumer_utilisation: busy,
            exclusive_consumer_tag: q.exclusive_consumer_tag.as_deref(),
            single_active_consumer_tag: None,
            policy: q.policy.as_ref().map(|(name, _)| name.as_str()),
            operator_policy: None,
            effective_policy_definition: match q.policy.as_ref().map(|(_, d)| crate::json::table_to_json(d)) {
                Some(Value::Object(map)) => map,
                _ => serde_json::Map::new(),
            },
            memory: 0,
            messages: q.ready + q.unacked,
            messages_details: Rate::of(rates.map(|r| r.messages())),
            messages_ready: q.ready,
            messages_ready_details: Rate::of(rates.map(|r| r.ready())),
            messages_unacknowledged: q.unacked,
            messages_unacknowledged_details: Rate::of(rates.map(|r| r.unacked())),
            messages_ram: q.ready_ram + q.unacked,
            messages_ready_ram: q.ready_ram,
            messages_unacknowledged_ram: q.unacked,
            messages_persistent: 0,
            messages_paged_out: q.ready.saturating_sub(q.ready_ram),
            message_bytes: q.ready_bytes,
            message_bytes_ready: q.ready_bytes,
            message_bytes_unacknowledged: 0,
            message_bytes_ram: 0,
            message_bytes_persistent: 0,
            message_bytes_paged_out: 0,
            head_message_timestamp: None,
            recoverable_slaves: None,
            idle_since: (q.consumers == 0 && q.last_used_ms > 0).then(|| timestamp(q.last_used_ms)),
            message_stats: MessageStatsJson { stats: &q.stats, rates },
        }
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn timestamp(millis: u64) -> String {
    let seconds = millis / 1000;
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

pub fn queue_json(state: &AppState, vhost: &str, q: &QueueSummary) -> Value {
    serde_json::to_value(QueueJson::new(state, vhost, q)).unwrap_or(Value::Null)
}

/// Every queue of a virtual host, sorted by name, read a bounded chunk per
/// lock acquisition: the one walk every listing, total, sample and scrape
/// uses, so none holds a virtual host's lock for long.
pub fn summaries(state: &AppState, vhost: &str) -> Vec<QueueSummary> {
    let Some(host) = state.broker.vhost(vhost) else { return Vec::new() };
    // Time the lock is held (not waited for), for the debug log.
    let (mut names, mut longest) = {
        let locked = host.lock();
        let held = std::time::Instant::now();
        (locked.queue_name_list(), held.elapsed())
    };
    names.sort_unstable();
    let mut out = Vec::with_capacity(names.len());
    for chunk in names.chunks(QUEUES_PER_LOCK) {
        let locked = host.lock();
        let held = std::time::Instant::now();
        out.extend(chunk.iter().filter_map(|name| locked.queue_summary(name)));
        longest = longest.max(held.elapsed());
        drop(locked);
    }
    tracing::debug!(
        vhost,
        queues = names.len(),
        longest_lock_us = u64::try_from(longest.as_micros()).unwrap_or(u64::MAX),
        "queues listed"
    );
    out
}

fn vhost_queues(state: &AppState, vhost: &str, out: &mut Vec<(String, QueueSummary)>) {
    out.extend(summaries(state, vhost).into_iter().map(|q| (vhost.to_string(), q)));
}

/// A list answer: serialized straight to bytes when the query asks for the
/// plain list (the common case, and the large one), through `Value`s when
/// it filters, sorts, pages or picks columns.
fn list_answer(state: &AppState, queues: &[(String, QueueSummary)], query: &ListQuery) -> Result<Response, ApiError> {
    if query.is_plain() {
        let items: Vec<QueueJson<'_>> = queues.iter().map(|(vhost, q)| QueueJson::new(state, vhost, q)).collect();
        let body = serde_json::to_vec(&items).map_err(|e| ApiError::Internal(e.to_string()))?;
        return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
    }
    let items = queues.iter().map(|(vhost, q)| queue_json(state, vhost, q)).collect();
    Ok(Json(answer(items, query)?).into_response())
}

pub async fn list_all(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let mut queues = Vec::new();
    for vhost in state.broker.vhost_names() {
        if caller.sees_vhost(&state, &vhost) {
            vhost_queues(&state, &vhost, &mut queues);
        }
    }
    list_answer(&state, &queues, &query)
}

pub async fn list_vhost(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    let mut queues = Vec::new();
    vhost_queues(&state, &vhost, &mut queues);
    list_answer(&state, &queues, &query)
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    let host = state.broker.vhost(&vhost).ok_or(ApiError::NotFound)?;
    let summary = host.lock().queue_summary(&name).ok_or(ApiError::NotFound)?;
    let mut queue = queue_json(&state, &vhost, &summary);
    if let Value::Object(map) = &mut queue {
        map.insert("consumer_details".into(), Value::Array(crate::connections::queue_consumers(&state, &vhost, &name)));
        // Per-exchange and per-channel rates (RabbitMQ's `detailed` mode): none.
        map.insert("incoming".into(), json!([]));
        map.insert("deliveries".into(), json!([]));
    }
    Ok(Json(queue))
}

pub async fn declare(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    if !matches!(body, Value::Object(_) | Value::Null) {
        return Err(ApiError::BadRequest("the body must be a JSON object".into()));
    }
    let durable = json_flag(body.get("durable")).unwrap_or(true);
    let auto_delete = json_flag(body.get("auto_delete")).unwrap_or(false);
    if json_flag(body.get("exclusive")).unwrap_or(false) {
        return Err(ApiError::BadRequest("exclusive queues are owned by a connection: declare them over AMQP".into()));
    }
    let arguments = crate::json::json_to_table(body.get("arguments").unwrap_or(&Value::Null))
        .ok_or_else(|| ApiError::BadRequest("arguments must be a JSON object".into()))?;
    if name.is_empty() || name.starts_with("amq.") {
        // RabbitMQ answers 401 here, not 403.
        return Err(ApiError::Unauthorised(format!("queue name '{name}' contains reserved prefix 'amq.*'")));
    }
    caller.allow(&state, &vhost, Permission::Configure, Resource::Queue, &name)?;
    let existed = state.broker.vhost(&vhost).is_some_and(|h| h.lock().queue(&name).is_some());
    change(&state, &vhost, |session| {
        let declare = QueueDeclare { name: &name, passive: false, durable, exclusive: false, auto_delete, arguments };
        session.declare_queue_as(HTTP_CONNECTION, declare, &mut |_| Ok(()))
    })
    .await?;
    Ok(if existed { StatusCode::NO_CONTENT } else { StatusCode::CREATED })
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    caller.allow(&state, &vhost, Permission::Configure, Resource::Queue, &name)?;
    // AMQP's queue.delete of a missing queue succeeds; the API answers 404.
    change(&state, &vhost, |session| match session.queue(&name) {
        None => Ok(false),
        Some(_) => session.delete_queue(HTTP_CONNECTION, &name, query.if_unused(), query.if_empty()).map(|_| true),
    })
    .await?
    .then_some(StatusCode::NO_CONTENT)
    .ok_or(ApiError::NotFound)
}

pub async fn purge(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    caller.allow(&state, &vhost, Permission::Read, Resource::Queue, &name)?;
    change(&state, &vhost, |session| session.purge_queue(HTTP_CONNECTION, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deliveries never reach the API's channel (it consumes nothing).
struct NoOutbox;

impl Outbox for NoOutbox {
    fn deliver(&self, _: u16, _: &str, _: u64, _: bool, _: &Message) {}
    fn consumer_cancelled(&self, _: u16, _: &str) {}
    fn is_congested(&self) -> bool {
        false
    }
}

/// `ackmode` of a get request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AckMode {
    /// Peek: the messages go back, marked redelivered (as RabbitMQ does).
    Requeue,
    Ack,
    /// Rejected without requeue: dead-lettered where the queue says so.
    RejectDrop,
}

pub async fn get_messages(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    caller.allow(&state, &vhost, Permission::Read, Resource::Queue, &name)?;
    let wanted = count(body.get("count")).ok_or_else(|| ApiError::BadRequest("count is required".into()))?;
    let mode = match body.get("ackmode").and_then(Value::as_str) {
        Some("ack_requeue_true") | Some("reject_requeue_true") => AckMode::Requeue,
        Some("ack_requeue_false") => AckMode::Ack,
        Some("reject_requeue_false") => AckMode::RejectDrop,
        other => return Err(ApiError::BadRequest(format!("ackmode {other:?} is not one of RabbitMQ's four"))),
    };
    let base64 = match body.get("encoding").and_then(Value::as_str) {
        Some("auto") | None => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::BadRequest(format!("encoding '{other}' is neither auto nor base64"))),
    };
    let truncate = count(body.get("truncate")).map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let key = ChannelKey { connection: HTTP_CONNECTION, channel: 1 };
    let got = change(&state, &vhost, |session| {
        if session.queue(&name).is_none() {
            return Err(warren_codec::reply::AmqpError::soft(
                warren_codec::reply::ReplyCode::NotFound,
                format!("no queue '{name}' in vhost '{vhost}'"),
                0,
                0,
            ));
        }
        session.open_channel(key, Arc::new(NoOutbox));
        let mut got = Vec::new();
        let mut result = Ok(());
        for _ in 0..wanted {
            match session.get(key, &name, mode == AckMode::Ack) {
                Ok(Some(message)) => got.push(message),
                Ok(None) => break,
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
        }
        if mode == AckMode::RejectDrop {
            if let Some(last) = got.last() {
                let _rejected = session.nack(key, last.delivery_tag, true, false);
            }
        }
        // Requeues what is still unacknowledged (the peeked messages).
        session.close_channel(key);
        result.map(|()| got)
    })
    .await?;
    let messages: Vec<Value> = got
        .iter()
        .map(|g| {
            let body = g.message.body();
            let shown = &body[..truncate.unwrap_or(body.len()).min(body.len())];
            let (payload, encoding) = match (base64, std::str::from_utf8(shown)) {
                (false, Ok(text)) => (text.to_string(), "string"),
                _ => (base64::engine::general_purpose::STANDARD.encode(shown), "base64"),
            };
            json!({
                "payload_bytes": body.len(),
                "redelivered": g.redelivered,
                "exchange": String::from_utf8_lossy(g.message.exchange()),
                "routing_key": String::from_utf8_lossy(g.message.routing_key()),
                "message_count": g.message_count,
                "properties": properties_json(&Properties::view(g.message.properties())),
                "payload": payload,
                "payload_encoding": encoding,
            })
        })
        .collect();
    Ok(Json(Value::Array(messages)))
}

/// A message's properties as RabbitMQ's API shows them (present ones only).
pub fn properties_json(properties: &Properties<&[u8]>) -> Value {
    let mut map = serde_json::Map::new();
    for (name, bit) in [
        ("content_type", flag::CONTENT_TYPE),
        ("content_encoding", flag::CONTENT_ENCODING),
        ("correlation_id", flag::CORRELATION_ID),
        ("reply_to", flag::REPLY_TO),
        ("expiration", flag::EXPIRATION),
        ("message_id", flag::MESSAGE_ID),
        ("type", flag::TYPE),
        ("user_id", flag::USER_ID),
        ("app_id", flag::APP_ID),
        ("cluster_id", flag::CLUSTER_ID),
    ] {
        if let Some(value) = properties.short_str(bit) {
            map.insert(name.into(), Value::String(value.into()));
        }
    }
    if let Some(mode) = properties.delivery_mode() {
        map.insert("delivery_mode".into(), json!(mode));
    }
    if let Some(priority) = properties.priority() {
        map.insert("priority".into(), json!(priority));
    }
    if let Some(timestamp) = properties.timestamp() {
        map.insert("timestamp".into(), json!(timestamp));
    }
    if let Some(headers) = properties.headers() {
        map.insert("headers".into(), table_to_json(&headers));
    }
    Value::Object(map)
}

/// `GET /api/warren/quorum/{vhost}/{name}`: where a quorum queue is placed
/// and its Raft group as this node sees it (the members' indices come from
/// the leader: ask the node named `leader` for them).
pub async fn quorum_status(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    let replication = state.broker.replication.get().ok_or(ApiError::NotFound)?;
    let status = replication.status(&vhost, &name).ok_or(ApiError::NotFound)?;
    let group = status.group.as_ref();
    Ok(Json(json!({
        "name": name,
        "vhost": vhost,
        "node": status.node,
        "group": status.placement.group,
        "members": status.placement.members,
        "raft_state": group.map(|g| g.state.clone()),
        "term": group.map(|g| g.term),
        "leader": group.and_then(|g| g.leader.clone()),
        "voters": group.map(|g| g.voters.clone()),
        "last_log_index": group.and_then(|g| g.last_log_index),
        "applied_index": group.and_then(|g| g.applied_index),
        "snapshot_index": group.and_then(|g| g.snapshot_index),
        "matched": group.map(|g| g.matched.clone()),
        "messages": status.messages,
    })))
}

/// `GET /api/warren/quorum`: every quorum queue's placement (the
/// virtual hosts the caller may see).
pub async fn quorum_list(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let replication = state.broker.replication.get().ok_or(ApiError::NotFound)?;
    let placements = replication.placements();
    let visible: Vec<Value> = placements
        .into_iter()
        .filter(|p| p.classic.is_none() && caller.vhost_access(&state, &p.vhost).is_ok())
        .map(|p| json!({ "vhost": p.vhost, "name": p.name, "group": p.group, "members": p.members }))
        .collect();
    Ok(Json(Value::Array(visible)))
}

/// `PUT /api/warren/quorum/{vhost}/{name}/members/{node}`: another replica
/// on `node` (rabbitmq-queues' `add_member`); administrators only.
pub async fn add_quorum_member(
    state: State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name, node)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    set_quorum_member(state, caller, (vhost, name, node), true).await
}

/// `DELETE /api/warren/quorum/{vhost}/{name}/members/{node}`: the replica
/// on `node` goes (rabbitmq-queues' `delete_member`).
pub async fn delete_quorum_member(
    state: State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name, node)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    set_quorum_member(state, caller, (vhost, name, node), false).await
}

/// `DELETE /api/warren/nodes/{node}`: a stopped node leaves the cluster for
/// good (rabbitmqctl's `forget_cluster_node`); administrators only.
pub async fn forget_node(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(node): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    let replication = state.broker.replication.get().ok_or(ApiError::NotFound)?;
    replication.forget_node(&node).await.map_err(|e| ApiError::from_amqp(&e))?;
    Ok(Json(json!({ "forgotten": node })))
}

async fn set_quorum_member(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    (vhost, name, node): (String, String, String),
    add: bool,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    let replication = state.broker.replication.get().ok_or(ApiError::NotFound)?;
    let members = replication.set_member(&vhost, &name, &node, add).await.map_err(|e| ApiError::from_amqp(&e))?;
    Ok(Json(json!({ "vhost": vhost, "name": name, "members": members })))
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_written_as_rabbitmq_writes_them() {
        assert_eq!(super::timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(super::timestamp(1_796_398_710_000), "2026-12-04 15:38:30");
        assert_eq!(super::timestamp(951_782_400_000), "2000-02-29 00:00:00");
    }
}
