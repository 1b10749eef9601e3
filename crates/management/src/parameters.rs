//! Runtime policies and limits: read and written as RabbitMQ's API does.
//! Policies are for policymakers and administrators in the virtual hosts
//! they may use; limits are for administrators. Both are stored in the
//! access definitions (as `warren ctl` writes them) and applied at once.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Map, Value};
use warren_server::access::PolicyDef;

use crate::admin::{current, update_access};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::json::integer;
use crate::json::JsonBody;
use crate::AppState;

fn policy_json(p: &PolicyDef) -> Value {
    json!({
        "vhost": p.vhost,
        "name": p.name,
        "pattern": p.pattern,
        "apply-to": p.apply_to,
        "definition": p.definition,
        "priority": p.priority,
    })
}

/// Policies in effect: the configuration file's and the runtime ones.
pub async fn policies(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let items = state
        .broker
        .vhost_names()
        .into_iter()
        .filter(|v| caller.sees_vhost(&state, v))
        .flat_map(|v| state.broker.policies(&v))
        .map(|p| policy_json(&p))
        .collect();
    Ok(Json(Value::Array(items)))
}

pub async fn vhost_policies(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    Ok(Json(Value::Array(state.broker.policies(&vhost).iter().map(policy_json).collect())))
}

pub async fn get_policy(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    state
        .broker
        .policies(&vhost)
        .iter()
        .find(|p| p.name == name)
        .map(|p| Json(policy_json(p)))
        .ok_or(ApiError::NotFound)
}

/// `PUT /api/policies/{vhost}/{name}` with `pattern`, `definition`,
/// `priority` and `apply-to` (a number may come as a string).
pub async fn put_policy(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    caller.require_policymaker()?;
    caller.vhost_access(&state, &vhost)?;
    let pattern = body
        .get("pattern")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::BadRequest("'pattern' is required".into()))?
        .to_string();
    let definition = match body.get("definition") {
        Some(Value::Object(map)) => map.clone(),
        Some(Value::String(text)) => serde_json::from_str::<Map<String, Value>>(text)
            .map_err(|e| ApiError::BadRequest(format!("'definition' is not a JSON object: {e}")))?,
        _ => return Err(ApiError::BadRequest("'definition' is required and must be an object".into())),
    };
    let priority = match body.get("priority") {
        None | Some(Value::Null) => 0,
        given => integer(given).ok_or_else(|| ApiError::BadRequest("'priority' must be an integer".into()))?,
    };
    let apply_to = body.get("apply-to").and_then(Value::as_str).unwrap_or("all").to_string();
    let existed = state.broker.policies(&vhost).iter().any(|p| p.name == name);
    let policy = PolicyDef { vhost, name, pattern, apply_to, definition, priority };
    update_access(&state, move |defs| defs.set_policy(policy)).await?;
    Ok(if existed { StatusCode::NO_CONTENT } else { StatusCode::CREATED })
}

pub async fn delete_policy(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_policymaker()?;
    caller.vhost_access(&state, &vhost)?;
    let runtime = current(&state)?.policies.iter().any(|p| p.vhost == vhost && p.name == name);
    if !runtime {
        return Err(if state.broker.policies(&vhost).iter().any(|p| p.name == name) {
            ApiError::BadRequest(format!("policy '{name}' is set in the configuration file; remove it there"))
        } else {
            ApiError::NotFound
        });
    }
    update_access(&state, move |defs| defs.clear_policy(&vhost, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A limit's value from `{"value": n}` (a string of digits too).
fn limit_value(body: &Value) -> Result<i64, ApiError> {
    integer(body.get("value")).ok_or_else(|| ApiError::BadRequest("'value' is required and must be an integer".into()))
}

fn limits_json(limits: &std::collections::BTreeMap<String, i64>) -> String {
    serde_json::to_string(limits).unwrap_or_else(|_| "{}".into())
}

pub async fn get_vhost_limits(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.vhost_access(&state, &vhost)?;
    let limits = current(&state)?.vhost_limits(&vhost);
    let items = if limits.is_empty() { Vec::new() } else { vec![json!({"vhost": vhost, "value": limits})] };
    Ok(Json(Value::Array(items)))
}

/// `PUT /api/vhost-limits/{vhost}/{max-connections|max-queues}`.
pub async fn put_vhost_limit(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let value = limit_value(&body)?;
    update_access(&state, move |defs| {
        let mut limits = defs.vhost_limits(&vhost);
        limits.insert(name, value);
        defs.set_vhost_limits(&vhost, &limits_json(&limits))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_vhost_limit(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    update_access(&state, move |defs| {
        let mut limits = defs.vhost_limits(&vhost);
        limits.remove(&name);
        if limits.is_empty() {
            defs.clear_vhost_limits(&vhost)
        } else {
            defs.set_vhost_limits(&vhost, &limits_json(&limits))
        }
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn get_user_limits(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_monitor()?;
    let defs = current(&state)?;
    let user = defs.user(&user).ok_or(ApiError::NotFound)?;
    let items =
        if user.limits.is_empty() { Vec::new() } else { vec![json!({"user": user.name, "value": user.limits})] };
    Ok(Json(Value::Array(items)))
}

/// `PUT /api/user-limits/{user}/{max-connections|max-channels}`.
pub async fn put_user_limit(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let value = limit_value(&body)?;
    update_access(&state, move |defs| {
        let mut limits = defs.user(&user).map(|u| u.limits.clone()).unwrap_or_default();
        limits.insert(name, value);
        defs.set_user_limits(&user, &limits_json(&limits))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_user_limit(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    update_access(&state, move |defs| {
        let mut limits = defs.user(&user).map(|u| u.limits.clone()).unwrap_or_default();
        limits.remove(&name);
        defs.set_user_limits(&user, &limits_json(&limits))
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
