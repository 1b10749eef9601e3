//! Users, virtual hosts, permissions and limits as the API shows them
//! (read from the access definitions, the file `warren ctl` edits), and the
//! definitions export.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde_json::{json, Map, Value};
use warren_server::access::AccessDefinitions;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::table_to_json;
use crate::listing::{answer, ListQuery};
use crate::rates::{depth_detail, message_stats_json};
use crate::AppState;

fn definitions(state: &AppState) -> Result<AccessDefinitions, ApiError> {
    state.broker.access_file().read().map_err(|e| ApiError::Internal(e.to_string())).map(Option::unwrap_or_default)
}

pub async fn whoami(caller: Caller) -> Json<Value> {
    Json(json!({"name": caller.user.name, "tags": caller.user.tags}))
}

fn vhost_json(state: &AppState, name: &str) -> Value {
    let stats = state.broker.vhost(name).map(|host| host.lock().message_stats()).unwrap_or_default();
    let (ready, unacked) =
        crate::queues::summaries(state, name).iter().fold((0, 0), |(r, u), q| (r + q.ready, u + q.unacked));
    let rates = state.rates.vhost(name);
    json!({
        "name": name,
        "description": "",
        "tags": [],
        "default_queue_type": "classic",
        "metadata": {"description": "", "tags": []},
        "tracing": false,
        "cluster_state": {state.node.clone(): "running"},
        "messages": ready + unacked,
        "messages_details": depth_detail(rates.map(|r| r.messages())),
        "messages_ready": ready,
        "messages_ready_details": depth_detail(rates.map(|r| r.ready())),
        "messages_unacknowledged": unacked,
        "messages_unacknowledged_details": depth_detail(rates.map(|r| r.unacked())),
        "message_stats": message_stats_json(&stats, rates),
    })
}

pub async fn vhosts(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let items = state
        .broker
        .vhost_names()
        .iter()
        .filter(|v| caller.sees_vhost(&state, v))
        .map(|v| vhost_json(&state, v))
        .collect();
    Ok(Json(answer(items, &query)?))
}

pub async fn vhost(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    Ok(Json(vhost_json(&state, &vhost)))
}

fn user_json(user: &warren_server::access::UserDef) -> Value {
    let limits: serde_json::Map<String, Value> = user.limits.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({
        "name": user.name,
        "password_hash": user.password_hash,
        "hashing_algorithm": user.hashing_algorithm,
        "tags": user.tags,
        "limits": limits,
    })
}

pub async fn users(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    let items = definitions(&state)?.users.iter().map(user_json).collect();
    Ok(Json(answer(items, &query)?))
}

pub async fn user(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    definitions(&state)?.users.iter().find(|u| u.name == name).map(|u| Json(user_json(u))).ok_or(ApiError::NotFound)
}

pub async fn permissions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    let items = definitions(&state)?
        .permissions
        .iter()
        .map(|p| json!({"user": p.user, "vhost": p.vhost, "configure": p.configure, "write": p.write, "read": p.read}))
        .collect();
    Ok(Json(answer(items, &query)?))
}

pub async fn topic_permissions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    let items = definitions(&state)?
        .topic_permissions
        .iter()
        .map(|p| json!({"user": p.user, "vhost": p.vhost, "exchange": p.exchange, "write": p.write, "read": p.read}))
        .collect();
    Ok(Json(answer(items, &query)?))
}

pub async fn vhost_limits(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require_monitor()?;
    let defs = definitions(&state)?;
    let items: Vec<Value> = defs
        .vhosts
        .iter()
        .map(|v| (v.name.clone(), defs.vhost_limits(&v.name)))
        .filter(|(_, limits)| !limits.is_empty())
        .map(|(vhost, limits)| json!({"vhost": vhost, "value": limits}))
        .collect();
    Ok(Json(Value::Array(items)))
}

pub async fn user_limits(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require_monitor()?;
    let items: Vec<Value> = definitions(&state)?
        .users
        .iter()
        .filter(|u| !u.limits.is_empty())
        .map(|u| json!({"user": u.name, "value": u.limits}))
        .collect();
    Ok(Json(Value::Array(items)))
}

/// Warren has no runtime parameters, global parameters or feature flags:
/// their lists are empty, as on a fresh RabbitMQ node.
pub async fn empty_list(_caller: Caller) -> Json<Value> {
    Json(Value::Array(Vec::new()))
}

/// Durable queues, exchanges and bindings, and policies, of the given
/// virtual hosts, each item naming its vhost unless `one_vhost`.
fn topology(state: &AppState, defs: &AccessDefinitions, vhosts: &[String], one_vhost: bool) -> Map<String, Value> {
    let mut queues = Vec::new();
    let mut exchanges = Vec::new();
    let mut bindings = Vec::new();
    let mut policies = Vec::new();
    let tag = |mut item: Value, vhost: &str| {
        if let (false, Some(object)) = (one_vhost, item.as_object_mut()) {
            object.insert("vhost".into(), Value::from(vhost));
        }
        item
    };
    for vhost in vhosts {
        let Some(host) = state.broker.vhost(vhost) else { continue };
        for q in crate::queues::summaries(state, vhost).into_iter().filter(|q| q.durable && !q.exclusive) {
            queues.push(tag(
                json!({"name": q.name, "durable": true, "auto_delete": q.auto_delete,
                    "arguments": table_to_json(&q.arguments)}),
                vhost,
            ));
        }
        {
            let locked = host.lock();
            for x in locked.exchange_summaries() {
                if x.durable && !x.name.is_empty() && !x.name.starts_with("amq.") {
                    exchanges.push(tag(
                        json!({"name": x.name, "type": x.kind, "durable": true, "auto_delete": x.auto_delete,
                            "internal": x.internal, "arguments": table_to_json(&x.arguments)}),
                        vhost,
                    ));
                }
            }
            for b in locked.binding_summaries().into_iter().filter(|b| !b.source.is_empty()) {
                bindings.push(tag(
                    json!({"source": b.source, "destination": b.destination,
                        "destination_type": if b.to_queue { "queue" } else { "exchange" },
                        "routing_key": b.routing_key, "arguments": table_to_json(&b.arguments)}),
                    vhost,
                ));
            }
        }
        // Policies name their vhost even in a per-vhost export, as RabbitMQ's do.
        for p in state.broker.policies(vhost) {
            policies.push(json!({"vhost": vhost, "name": p.name, "pattern": p.pattern, "apply-to": p.apply_to,
                "definition": p.definition, "priority": p.priority}));
        }
    }
    let mut out = Map::new();
    out.insert("rabbit_version".into(), Value::from(crate::overview::RABBITMQ_VERSION));
    out.insert("rabbitmq_version".into(), Value::from(crate::overview::RABBITMQ_VERSION));
    out.insert("product_name".into(), Value::from("Warren"));
    out.insert("product_version".into(), Value::from(env!("CARGO_PKG_VERSION")));
    let parameters: Vec<Value> = defs
        .parameters
        .iter()
        .filter(|p| vhosts.contains(&p.vhost))
        .map(|p| json!({"vhost": p.vhost, "component": p.component, "name": p.name, "value": p.value}))
        .collect();
    out.insert("parameters".into(), Value::Array(parameters));
    out.insert("policies".into(), Value::Array(policies));
    out.insert("queues".into(), Value::Array(queues));
    out.insert("exchanges".into(), Value::Array(exchanges));
    out.insert("bindings".into(), Value::Array(bindings));
    out
}

/// `GET /api/definitions`: RabbitMQ's export format (users with their
/// hashes, virtual hosts, permissions, durable queues, exchanges and
/// bindings, policies).
pub async fn definitions_export(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    let defs = definitions(&state)?;
    let mut out = topology(&state, &defs, &state.broker.vhost_names(), false);
    out.insert(
        "users".into(),
        defs.users
            .iter()
            .map(|u| {
                json!({"name": u.name, "password_hash": u.password_hash,
        "hashing_algorithm": u.hashing_algorithm, "tags": u.tags, "limits": u.limits})
            })
            .collect(),
    );
    out.insert(
        "vhosts".into(),
        defs.vhosts
            .iter()
            .map(|v| {
                json!({"name": v.name, "limits": [],
        "metadata": {"description": "", "tags": []}})
            })
            .collect(),
    );
    out.insert(
        "permissions".into(),
        defs.permissions
            .iter()
            .map(|p| {
                json!({"user": p.user, "vhost": p.vhost,
        "configure": p.configure, "write": p.write, "read": p.read})
            })
            .collect(),
    );
    out.insert(
        "topic_permissions".into(),
        defs.topic_permissions
            .iter()
            .map(|p| {
                json!({"user": p.user,
        "vhost": p.vhost, "exchange": p.exchange, "write": p.write, "read": p.read})
            })
            .collect(),
    );
    out.insert("global_parameters".into(), Value::Array(Vec::new()));
    Ok(Json(Value::Object(out)))
}

/// `GET /api/definitions/{vhost}`: one virtual host's queues, exchanges,
/// bindings and policies, without vhost fields (RabbitMQ's per-vhost shape).
pub async fn vhost_definitions_export(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    caller.vhost_access(&state, &vhost)?;
    let defs = definitions(&state)?;
    Ok(Json(Value::Object(topology(&state, &defs, &[vhost], true))))
}
