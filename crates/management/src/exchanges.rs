//! `/api/exchanges` and `/api/bindings`: list, declare, delete, bind,
//! unbind, and publish a message.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};
use warren_codec::properties::{flag, Properties};
use warren_codec::types::FieldTable;
use warren_core::{BindingSummary, ExchangeDeclare, ExchangeSummary, Message};
use warren_server::access::{Permission, Resource};

use crate::auth::Caller;
use crate::change::{change, HTTP_CONNECTION};
use crate::error::ApiError;
use crate::json::JsonBody;
use crate::json::{flag as json_flag, json_to_table, table_to_json};
use crate::listing::{answer, DeleteQuery, ListQuery};
use crate::AppState;

/// The default exchange's name in paths (its real name is empty).
const DEFAULT_EXCHANGE: &str = "amq.default";

fn real_name(name: &str) -> &str {
    if name == DEFAULT_EXCHANGE {
        ""
    } else {
        name
    }
}

fn exchange_json(vhost: &str, x: &ExchangeSummary) -> Value {
    json!({
        "name": x.name,
        "vhost": vhost,
        "type": x.kind,
        "durable": x.durable,
        "auto_delete": x.auto_delete,
        "internal": x.internal,
        "arguments": table_to_json(&x.arguments),
        "policy": Value::Null,
        "user_who_performed_action": "rmq-internal",
        "message_stats": {},
    })
}

/// RabbitMQ's `properties_key`: what identifies a binding between the same
/// two ends in a DELETE path.
fn properties_key(routing_key: &str, arguments: &FieldTable) -> String {
    if arguments.inner().is_empty() {
        return if routing_key.is_empty() { "~".into() } else { routing_key.into() };
    }
    // A stable digest of the arguments (FNV-1a over their JSON).
    let text = table_to_json(arguments).to_string();
    let digest = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.to_be_bytes());
    format!("{routing_key}~{digest}")
}

fn binding_json(vhost: &str, b: &BindingSummary) -> Value {
    json!({
        "source": b.source,
        "vhost": vhost,
        "destination": b.destination,
        "destination_type": if b.to_queue { "queue" } else { "exchange" },
        "routing_key": b.routing_key,
        "arguments": table_to_json(&b.arguments),
        "properties_key": properties_key(&b.routing_key, &b.arguments),
    })
}

fn vhost_exchanges(state: &AppState, vhost: &str) -> Vec<Value> {
    let Some(host) = state.broker.vhost(vhost) else { return Vec::new() };
    let summaries = host.lock().exchange_summaries();
    summaries.iter().map(|x| exchange_json(vhost, x)).collect()
}

fn vhost_bindings(state: &AppState, vhost: &str) -> Vec<BindingSummary> {
    state.broker.vhost(vhost).map(|host| host.lock().binding_summaries()).unwrap_or_default()
}

pub async fn list_all(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let mut items = Vec::new();
    for vhost in state.broker.vhost_names() {
        if caller.sees_vhost(&state, &vhost) {
            items.extend(vhost_exchanges(&state, &vhost));
        }
    }
    Ok(Json(answer(items, &query)?))
}

pub async fn list_vhost(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    Ok(Json(answer(vhost_exchanges(&state, &vhost), &query)?))
}

pub async fn show(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    let name = real_name(&name);
    let host = state.broker.vhost(&vhost).ok_or(ApiError::NotFound)?;
    let found = host.lock().exchange_summaries().into_iter().find(|x| x.name == name);
    let mut exchange = found.map(|x| exchange_json(&vhost, &x)).ok_or(ApiError::NotFound)?;
    if let Value::Object(map) = &mut exchange {
        // Per-channel and per-queue rates (RabbitMQ's `detailed` mode): none.
        map.insert("incoming".into(), json!([]));
        map.insert("outgoing".into(), json!([]));
    }
    Ok(Json(exchange))
}

pub async fn declare(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    let kind = body
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::BadRequest("'type' is required (direct, fanout, topic, headers…)".into()))?
        .to_string();
    let durable = json_flag(body.get("durable")).unwrap_or(true);
    let auto_delete = json_flag(body.get("auto_delete")).unwrap_or(false);
    let internal = json_flag(body.get("internal")).unwrap_or(false);
    let arguments = json_to_table(body.get("arguments").unwrap_or(&Value::Null))
        .ok_or_else(|| ApiError::BadRequest("arguments must be a JSON object".into()))?;
    caller.allow(&state, &vhost, Permission::Configure, Resource::Exchange, &name)?;
    let existed = state.broker.vhost(&vhost).is_some_and(|h| h.lock().exchange(&name).is_some());
    change(&state, &vhost, |session| {
        session.declare_exchange(ExchangeDeclare {
            name: &name,
            kind: &kind,
            passive: false,
            durable,
            auto_delete,
            internal,
            arguments,
        })
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
    caller.allow(&state, &vhost, Permission::Configure, Resource::Exchange, &name)?;
    // AMQP's exchange.delete of a missing exchange succeeds; the API answers 404.
    change(&state, &vhost, |session| match session.exchange(&name) {
        None => Ok(false),
        Some(_) => session.delete_exchange(&name, query.if_unused()).map(|_| true),
    })
    .await?
    .then_some(StatusCode::NO_CONTENT)
    .ok_or(ApiError::NotFound)
}

/// Properties of a message published through the API, from RabbitMQ's JSON.
fn properties_from_json(value: &Value) -> Result<Properties, ApiError> {
    let mut properties = Properties::empty();
    let Some(map) = value.as_object() else {
        return Ok(properties);
    };
    let short = |text: &str| -> Result<Vec<u8>, ApiError> {
        let len =
            u8::try_from(text.len()).map_err(|_| ApiError::BadRequest(format!("'{text}' is longer than 255 bytes")))?;
        let mut encoded = vec![len];
        encoded.extend_from_slice(text.as_bytes());
        Ok(encoded)
    };
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
        if let Some(text) = map.get(name).and_then(Value::as_str) {
            properties = properties.with_field(bit, Some(&short(text)?));
        }
    }
    for (name, bit) in [("delivery_mode", flag::DELIVERY_MODE), ("priority", flag::PRIORITY)] {
        if let Some(n) = crate::json::count(map.get(name)) {
            let octet = u8::try_from(n).map_err(|_| ApiError::BadRequest(format!("{name} {n} is not an octet")))?;
            properties = properties.with_field(bit, Some(&[octet]));
        }
    }
    if let Some(n) = crate::json::count(map.get("timestamp")) {
        properties = properties.with_field(flag::TIMESTAMP, Some(&n.to_be_bytes()));
    }
    if let Some(headers) = map.get("headers") {
        let table = json_to_table(headers).ok_or_else(|| ApiError::BadRequest("headers must be an object".into()))?;
        let mut encoded = Vec::new();
        warren_codec::table::encode_table(&table, &mut encoded);
        properties = properties.with_field(flag::HEADERS, Some(&encoded));
    }
    Ok(properties)
}

pub async fn publish(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    let exchange = real_name(&name).to_string();
    caller.allow(&state, &vhost, Permission::Write, Resource::Exchange, &exchange)?;
    let routing_key = body
        .get("routing_key")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::BadRequest("routing_key is required".into()))?;
    let payload = body.get("payload").and_then(Value::as_str).unwrap_or_default();
    let payload = match body.get("payload_encoding").and_then(Value::as_str).unwrap_or("string") {
        "string" => payload.as_bytes().to_vec(),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(payload)
            .map_err(|e| ApiError::BadRequest(format!("payload is not base64: {e}")))?,
        other => return Err(ApiError::BadRequest(format!("payload_encoding '{other}' is neither string nor base64"))),
    };
    if payload.len() as u64 > state.broker.config.max_message_size {
        return Err(ApiError::BadRequest(format!(
            "message size {} is larger than configured max size {}",
            payload.len(),
            state.broker.config.max_message_size
        )));
    }
    let properties = properties_from_json(body.get("properties").unwrap_or(&Value::Null))?;
    let mut builder = Message::builder(exchange.as_bytes(), routing_key.as_bytes(), &properties, payload.len());
    builder.push_body(&payload);
    let message = Arc::new(builder.finish());
    let routed = change(&state, &vhost, |session| session.publish(&exchange, message, &[])).await?;
    Ok(Json(json!({"routed": routed.queues > 0})))
}

fn filtered(
    state: &AppState,
    caller: &Caller,
    vhost: &str,
    keep: impl Fn(&BindingSummary) -> bool,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(state, vhost)?;
    let items: Vec<Value> =
        vhost_bindings(state, vhost).iter().filter(|b| keep(b)).map(|b| binding_json(vhost, b)).collect();
    Ok(Json(Value::Array(items)))
}

pub async fn queue_bindings(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if state.broker.vhost(&vhost).is_some_and(|h| h.lock().queue(&name).is_none()) {
        return Err(ApiError::NotFound);
    }
    filtered(&state, &caller, &vhost, |b| b.to_queue && b.destination == name)
}

pub async fn source_bindings(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let name = real_name(&name).to_string();
    filtered(&state, &caller, &vhost, |b| b.source == name && !b.source.is_empty())
}

pub async fn destination_bindings(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    filtered(&state, &caller, &vhost, |b| !b.to_queue && b.destination == name)
}

pub async fn bindings_all(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let mut items = Vec::new();
    for vhost in state.broker.vhost_names() {
        if caller.sees_vhost(&state, &vhost) {
            items.extend(vhost_bindings(&state, &vhost).iter().map(|b| binding_json(&vhost, b)));
        }
    }
    Ok(Json(answer(items, &query)?))
}

pub async fn bindings_vhost(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    let items = vhost_bindings(&state, &vhost).iter().map(|b| binding_json(&vhost, b)).collect();
    Ok(Json(answer(items, &query)?))
}

/// The destination kind of a bindings path: `q` or `e`.
fn to_queue(kind: &str) -> Result<bool, ApiError> {
    match kind {
        "q" => Ok(true),
        "e" => Ok(false),
        _ => Err(ApiError::NotFound),
    }
}

pub async fn bindings_between(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let queue = to_queue(&kind)?;
    let source = real_name(&source).to_string();
    filtered(&state, &caller, &vhost, |b| b.source == source && b.to_queue == queue && b.destination == destination)
}

pub async fn binding(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let queue = to_queue(&kind)?;
    caller.vhost_access(&state, &vhost)?;
    let source = real_name(&source);
    vhost_bindings(&state, &vhost)
        .iter()
        .find(|b| {
            b.source == source
                && b.to_queue == queue
                && b.destination == destination
                && properties_key(&b.routing_key, &b.arguments) == props
        })
        .map(|b| Json(binding_json(&vhost, b)))
        .ok_or(ApiError::NotFound)
}

/// Checks the permissions a binding needs: write on the destination, read
/// on the source.
fn allow_bind(
    state: &AppState,
    caller: &Caller,
    vhost: &str,
    source: &str,
    destination: &str,
    queue: bool,
) -> Result<(), ApiError> {
    let resource = if queue { Resource::Queue } else { Resource::Exchange };
    caller.allow(state, vhost, Permission::Write, resource, destination)?;
    caller.allow(state, vhost, Permission::Read, Resource::Exchange, source)
}

pub async fn bind(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
    JsonBody(body): JsonBody,
) -> Result<impl IntoResponse, ApiError> {
    let queue = to_queue(&kind)?;
    caller.vhost_access(&state, &vhost)?;
    let routing_key = body.get("routing_key").and_then(Value::as_str).unwrap_or_default().to_string();
    let arguments = json_to_table(body.get("arguments").unwrap_or(&Value::Null))
        .ok_or_else(|| ApiError::BadRequest("arguments must be a JSON object".into()))?;
    if source.is_empty() || source == DEFAULT_EXCHANGE {
        return Err(ApiError::Forbidden("operation not permitted on the default exchange".into()));
    }
    allow_bind(&state, &caller, &vhost, &source, &destination, queue)?;
    let key = properties_key(&routing_key, &arguments);
    change(&state, &vhost, |session| {
        if queue {
            session.bind_queue(HTTP_CONNECTION, &destination, &source, &routing_key, arguments, true)
        } else {
            session.bind_exchange(&destination, &source, &routing_key, arguments, true)
        }
    })
    .await?;
    let location = escape(&key);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)]))
}

/// A path segment as RabbitMQ writes one in `Location`.
fn escape(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn unbind(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let queue = to_queue(&kind)?;
    caller.vhost_access(&state, &vhost)?;
    allow_bind(&state, &caller, &vhost, &source, &destination, queue)?;
    let found = vhost_bindings(&state, &vhost).into_iter().find(|b| {
        b.source == source
            && b.to_queue == queue
            && b.destination == destination
            && properties_key(&b.routing_key, &b.arguments) == props
    });
    let Some(found) = found else {
        return Err(ApiError::NotFound);
    };
    change(&state, &vhost, |session| {
        if queue {
            session.bind_queue(HTTP_CONNECTION, &destination, &source, &found.routing_key, found.arguments, false)
        } else {
            session.bind_exchange(&destination, &source, &found.routing_key, found.arguments, false)
        }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
