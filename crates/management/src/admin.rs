//! Administrator writes: users, virtual hosts, permissions, and the
//! definitions import. Access changes go to the access definitions file
//! under its lock (as `warren ctl` writes it) and are applied at once;
//! queues, exchanges and bindings of an import go through sessions.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use warren_core::{ExchangeDeclare, QueueDeclare};
use warren_server::access::{AccessDefinitions, AccessError, Seed, UserDef};

use crate::auth::Caller;
use crate::change::{change, HTTP_CONNECTION};
use crate::error::ApiError;
use crate::json::JsonBody;
use crate::json::{flag, json_to_table};
use crate::AppState;

fn access_error(error: AccessError) -> ApiError {
    match error {
        AccessError::NoUser(_) | AccessError::NoVhost(_) => ApiError::NotFound,
        AccessError::Io { .. } => ApiError::Internal(error.to_string()),
        other => ApiError::BadRequest(other.to_string()),
    }
}

/// Applies `change` to the access definitions (file lock, atomic replace,
/// off the async workers) and makes the broker use them.
pub(crate) async fn update_access(
    state: &Arc<AppState>,
    change: impl FnOnce(&mut AccessDefinitions) -> Result<(), AccessError> + Send + 'static,
) -> Result<(), ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let seed = Seed { vhosts: &[], users: Vec::new() };
        state.broker.access_file().update(&seed, change).map_err(access_error)?;
        state.broker.reload_access().map_err(access_error)?;
        Ok(())
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

pub(crate) fn current(state: &AppState) -> Result<AccessDefinitions, ApiError> {
    state.broker.access_file().read().map_err(access_error).map(Option::unwrap_or_default)
}

/// Tags as RabbitMQ accepts them: a list, or a comma-separated string.
fn tags_of(value: Option<&Value>) -> Result<Vec<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) => {
            Ok(text.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect())
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| t.as_str().map(String::from).ok_or_else(|| ApiError::BadRequest("tags must be strings".into())))
            .collect(),
        Some(_) => Err(ApiError::BadRequest("tags must be a list or a comma-separated string".into())),
    }
}

pub async fn put_user(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let tags = tags_of(body.get("tags"))?;
    let existed = current(&state)?.user(&name).is_some();
    let password = body.get("password").and_then(Value::as_str).map(String::from);
    let hash = body.get("password_hash").and_then(Value::as_str).map(String::from);
    let algorithm =
        body.get("hashing_algorithm").and_then(Value::as_str).unwrap_or("rabbit_password_hashing_sha256").to_string();
    update_access(&state, move |defs| match (password, hash) {
        (Some(password), _) => defs.upsert_user(&name, &password, &tags),
        (None, Some(password_hash)) => {
            let limits = defs.user(&name).map(|u| u.limits.clone()).unwrap_or_default();
            let user = UserDef { name, password_hash, hashing_algorithm: algorithm, tags, limits };
            defs.import(AccessDefinitions { users: vec![user], ..AccessDefinitions::default() })
        }
        (None, None) if defs.user(&name).is_some() => defs.set_user_tags(&name, &tags),
        // No password: only certificate logins (RabbitMQ's passwordless user).
        (None, None) => {
            let user = UserDef {
                name,
                password_hash: String::new(),
                hashing_algorithm: algorithm,
                tags,
                limits: Default::default(),
            };
            defs.import(AccessDefinitions { users: vec![user], ..AccessDefinitions::default() })
        }
    })
    .await?;
    Ok(if existed { StatusCode::NO_CONTENT } else { StatusCode::CREATED })
}

pub async fn delete_user(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    update_access(&state, move |defs| defs.delete_user(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn put_vhost(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    if state.broker.vhost(&name).is_some() {
        return Ok(StatusCode::NO_CONTENT);
    }
    // As RabbitMQ: the administrator who creates it may use it at once.
    let user = caller.user.name.clone();
    update_access(&state, move |defs| {
        if defs.has_vhost(&name) {
            return Ok(());
        }
        defs.add_vhost(&name)?;
        defs.set_permissions(&name, &user, ".*", ".*", ".*")
    })
    .await?;
    Ok(StatusCode::CREATED)
}

pub async fn delete_vhost(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    update_access(&state, move |defs| defs.delete_vhost(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn get_permission(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    current(&state)?
        .permissions
        .iter()
        .find(|p| p.vhost == vhost && p.user == user)
        .map(|p| {
            Json(json!({"user": p.user, "vhost": p.vhost, "configure": p.configure, "write": p.write, "read": p.read}))
        })
        .ok_or(ApiError::NotFound)
}

pub async fn put_permission(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let field = |name: &str| required(&body, name);
    let (configure, write, read) = (field("configure")?, field("write")?, field("read")?);
    let existed = current(&state)?.permissions.iter().any(|p| p.vhost == vhost && p.user == user);
    update_access(&state, move |defs| defs.set_permissions(&vhost, &user, &configure, &write, &read)).await?;
    Ok(if existed { StatusCode::NO_CONTENT } else { StatusCode::CREATED })
}

pub async fn delete_permission(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    update_access(&state, move |defs| defs.clear_permissions(&vhost, &user)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn get_topic_permission(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    let items: Vec<Value> = current(&state)?
        .topic_permissions
        .iter()
        .filter(|p| p.vhost == vhost && p.user == user)
        .map(|p| json!({"user": p.user, "vhost": p.vhost, "exchange": p.exchange, "write": p.write, "read": p.read}))
        .collect();
    if items.is_empty() {
        return Err(ApiError::NotFound);
    }
    Ok(Json(Value::Array(items)))
}

/// `PUT /api/topic-permissions/{vhost}/{user}` with `exchange`, `write` and
/// `read`: one exchange's rules, added or replaced.
pub async fn put_topic_permission(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let field = |name: &str| required(&body, name);
    let (exchange, write, read) = (field("exchange")?, field("write")?, field("read")?);
    let existed =
        current(&state)?.topic_permissions.iter().any(|p| p.vhost == vhost && p.user == user && p.exchange == exchange);
    update_access(&state, move |defs| defs.set_topic_permissions(&vhost, &user, &exchange, &write, &read)).await?;
    Ok(if existed { StatusCode::NO_CONTENT } else { StatusCode::CREATED })
}

/// Clears all of a user's topic permissions in a virtual host.
pub async fn delete_topic_permission(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    update_access(&state, move |defs| defs.clear_topic_permissions(&vhost, &user, None)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A string field a write needs.
fn required(body: &Value, name: &str) -> Result<String, ApiError> {
    body.get(name)
        .and_then(Value::as_str)
        .map(String::from)
        .ok_or_else(|| ApiError::BadRequest(format!("'{name}' is required")))
}

fn text<'a>(item: &'a Value, key: &str) -> Result<&'a str, ApiError> {
    item.get(key).and_then(Value::as_str).ok_or_else(|| ApiError::BadRequest(format!("'{key}' is required in {item}")))
}

/// `POST /api/definitions`: RabbitMQ's (or Warren's) export imported. Users,
/// virtual hosts and permissions are added or replaced; then exchanges,
/// queues and bindings are declared (what exists already stays).
pub async fn import(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let access: AccessDefinitions =
        serde_json::from_value(body.clone()).map_err(|e| ApiError::BadRequest(format!("definitions: {e}")))?;
    update_access(&state, move |defs| defs.import(access)).await?;
    import_topology(&state, &body, None).await
}

/// `POST /api/definitions/{vhost}`: a per-vhost export (or a full one, of
/// which only the topology and policies are taken) into this virtual host.
pub async fn import_vhost(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(vhost): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    caller.vhost_access(&state, &vhost)?;
    let mut policies = Vec::new();
    for item in body.get("policies").and_then(Value::as_array).into_iter().flatten() {
        let mut item = item.clone();
        if let Some(object) = item.as_object_mut() {
            object.insert("vhost".into(), Value::from(vhost.as_str()));
        }
        policies.push(serde_json::from_value(item).map_err(|e| ApiError::BadRequest(format!("policies: {e}")))?);
    }
    if !policies.is_empty() {
        let access = AccessDefinitions { policies, ..AccessDefinitions::default() };
        update_access(&state, move |defs| defs.import(access)).await?;
    }
    import_topology(&state, &body, Some(&vhost)).await
}

/// Declares an export's exchanges, queues and bindings (what exists stays),
/// in `into` if given, else in each item's own vhost.
async fn import_topology(state: &Arc<AppState>, body: &Value, into: Option<&str>) -> Result<StatusCode, ApiError> {
    let state = state.clone();
    let vhost_of = |item: &Value| -> Result<String, ApiError> {
        match into {
            Some(vhost) => Ok(vhost.to_string()),
            None => text(item, "vhost").map(String::from),
        }
    };
    let list = |key: &str| body.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
    for x in list("exchanges") {
        let vhost = vhost_of(&x)?;
        let arguments = json_to_table(x.get("arguments").unwrap_or(&Value::Null)).unwrap_or_default();
        let (name, kind) = (text(&x, "name")?.to_string(), text(&x, "type")?.to_string());
        change(&state, &vhost, |session| {
            session.declare_exchange(ExchangeDeclare {
                name: &name,
                kind: &kind,
                passive: false,
                durable: flag(x.get("durable")).unwrap_or(true),
                auto_delete: flag(x.get("auto_delete")).unwrap_or(false),
                internal: flag(x.get("internal")).unwrap_or(false),
                arguments,
            })
        })
        .await?;
    }
    for q in list("queues") {
        let vhost = vhost_of(&q)?;
        let name = text(&q, "name")?.to_string();
        let arguments = json_to_table(q.get("arguments").unwrap_or(&Value::Null)).unwrap_or_default();
        change(&state, &vhost, |session| {
            let declare = QueueDeclare {
                name: &name,
                passive: false,
                durable: flag(q.get("durable")).unwrap_or(true),
                exclusive: false,
                auto_delete: flag(q.get("auto_delete")).unwrap_or(false),
                arguments,
            };
            session.declare_queue_as(HTTP_CONNECTION, declare, &mut |_| Ok(()))
        })
        .await?;
    }
    for b in list("bindings") {
        let vhost = vhost_of(&b)?;
        let (source, destination) = (text(&b, "source")?.to_string(), text(&b, "destination")?.to_string());
        let routing_key = b.get("routing_key").and_then(Value::as_str).unwrap_or_default().to_string();
        let arguments = json_to_table(b.get("arguments").unwrap_or(&Value::Null)).unwrap_or_default();
        let to_queue = b.get("destination_type").and_then(Value::as_str) != Some("exchange");
        change(&state, &vhost, |session| {
            if to_queue {
                session.bind_queue(HTTP_CONNECTION, &destination, &source, &routing_key, arguments, true)
            } else {
                session.bind_exchange(&destination, &source, &routing_key, arguments, true)
            }
        })
        .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}
