//! `/api/health/checks/*`: 200 `{"status":"ok"}`, or 503
//! `{"status":"failed","reason":…}`, as RabbitMQ answers.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::AppState;

fn ok() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn alarms(State(state): State<Arc<AppState>>, _caller: Caller) -> Result<Json<Value>, ApiError> {
    let alarms = state.broker.alarms.state();
    let mut raised = Vec::new();
    if alarms.memory {
        raised.push("memory");
    }
    if alarms.disk {
        raised.push("disk");
    }
    if raised.is_empty() {
        Ok(ok())
    } else {
        Err(ApiError::Unhealthy(format!("resource alarm(s) in effect: {}", raised.join(", "))))
    }
}

/// Every virtual host is running (they always are on a running node).
pub async fn virtual_hosts(State(state): State<Arc<AppState>>, _caller: Caller) -> Result<Json<Value>, ApiError> {
    let missing: Vec<String> =
        state.broker.vhost_names().into_iter().filter(|v| state.broker.vhost(v).is_none()).collect();
    if missing.is_empty() {
        Ok(ok())
    } else {
        Err(ApiError::Unhealthy(format!("virtual hosts not running: {}", missing.join(", "))))
    }
}

pub async fn port_listener(
    State(state): State<Arc<AppState>>,
    _caller: Caller,
    Path(port): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let port: u16 = port.parse().map_err(|_| ApiError::BadRequest(format!("{port} is not a port number")))?;
    if state.listeners.iter().any(|l| l.address.port() == port) {
        Ok(Json(json!({"status": "ok", "port": port})))
    } else {
        let ports: Vec<u16> = state.listeners.iter().map(|l| l.address.port()).collect();
        Err(ApiError::Unhealthy(format!("No active listener on port {port}; listening on {ports:?}")))
    }
}

pub async fn protocol_listener(
    State(state): State<Arc<AppState>>,
    _caller: Caller,
    Path(protocol): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let wanted = match protocol.as_str() {
        "amqp" | "amqp091" | "amqp0.9.1" | "amqp0-9-1" => "amqp",
        "amqps" | "amqp/ssl" => "amqp/ssl",
        "http" | "management" => "http",
        other => other,
    };
    if state.listeners.iter().any(|l| l.protocol == wanted) {
        Ok(Json(json!({"status": "ok", "protocol": protocol})))
    } else {
        Err(ApiError::Unhealthy(format!("No active listener for protocol {protocol}")))
    }
}

/// A single node has no quorum queue replicas to lose.
pub async fn quorum_critical(_caller: Caller) -> Json<Value> {
    ok()
}

pub async fn ping() -> Json<Value> {
    ok()
}
