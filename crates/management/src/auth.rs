//! HTTP Basic authentication against Warren's users, and RabbitMQ's tag
//! rules: `management`, `policymaker`, `monitoring` and `administrator`
//! may use the API; monitors and administrators see every virtual host and
//! connection, the others only their own.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use warren_server::access::{Permission, Resource, User};

use crate::error::ApiError;
use crate::AppState;

/// The authenticated user of a request.
pub struct Caller {
    pub user: Arc<User>,
}

impl Caller {
    fn has(&self, tag: &str) -> bool {
        self.user.tags.iter().any(|t| t == tag)
    }

    pub fn is_administrator(&self) -> bool {
        self.has("administrator")
    }

    /// Sees every virtual host, connection and channel.
    pub fn is_monitor(&self) -> bool {
        self.is_administrator() || self.has("monitoring")
    }

    pub fn require_administrator(&self) -> Result<(), ApiError> {
        if self.is_administrator() {
            Ok(())
        } else {
            Err(ApiError::Unauthorised("Not administrator user".into()))
        }
    }

    /// Policies: policymakers and administrators (RabbitMQ's tags).
    pub fn require_policymaker(&self) -> Result<(), ApiError> {
        if self.is_administrator() || self.has("policymaker") {
            Ok(())
        } else {
            Err(ApiError::Unauthorised("Not policymaker user".into()))
        }
    }

    pub fn require_monitor(&self) -> Result<(), ApiError> {
        if self.is_monitor() {
            Ok(())
        } else {
            Err(ApiError::Unauthorised("Not monitor user".into()))
        }
    }

    /// Whether the caller may see `vhost` at all (monitors see every one).
    pub fn sees_vhost(&self, state: &AppState, vhost: &str) -> bool {
        self.is_monitor() || state.broker.access().permissions(&self.user.name, vhost).is_some()
    }

    /// A virtual host the caller may use, or 401 as RabbitMQ answers.
    pub fn vhost_access(&self, state: &AppState, vhost: &str) -> Result<(), ApiError> {
        if state.broker.vhost(vhost).is_none() {
            return Err(ApiError::NotFound);
        }
        if self.is_administrator() || state.broker.access().permissions(&self.user.name, vhost).is_some() {
            Ok(())
        } else {
            Err(ApiError::Unauthorised(format!("Access refused to vhost '{vhost}'")))
        }
    }

    /// An AMQP-level permission in `vhost`, checked as a connection would.
    pub fn allow(
        &self,
        state: &AppState,
        vhost: &str,
        permission: Permission,
        resource: Resource,
        name: &str,
    ) -> Result<(), ApiError> {
        let Some(permissions) = state.broker.access().permissions(&self.user.name, vhost) else {
            return Err(ApiError::Unauthorised(format!("Access refused to vhost '{vhost}'")));
        };
        permissions.check(permission, resource, name).map_err(ApiError::Forbidden)
    }
}

const MANAGEMENT_TAGS: [&str; 4] = ["management", "policymaker", "monitoring", "administrator"];

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Caller, ApiError> {
        let (name, password) = credentials(parts).ok_or(ApiError::NoCredentials)?;
        let refused = || ApiError::Unauthorised("Login failed".into());
        let user = state.broker.access().user(&name).ok_or_else(refused)?;
        if state.broker.config.loopback_only(&name) {
            let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
            if !peer.is_some_and(|p| warren_server::auth::is_loopback(p.ip())) {
                return Err(ApiError::Unauthorised(format!("User can only log in via localhost: {name}")));
            }
        }
        let ok = state.broker.login_cached(&user, &password)
            || state.broker.verify_password(user.clone(), password.clone()).await;
        if !ok {
            return Err(refused());
        }
        if !user.tags.iter().any(|t| MANAGEMENT_TAGS.contains(&t.as_str())) {
            return Err(ApiError::Unauthorised("Not management user".into()));
        }
        Ok(Caller { user })
    }
}

/// The user and password of a Basic `Authorization` header.
fn credentials(parts: &Parts) -> Option<(String, String)> {
    let header = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let encoded = header.strip_prefix("Basic ").or_else(|| header.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}
