//! Errors as RabbitMQ's management API answers them: a status code and
//! `{"error": …, "reason": …}`; 401 also names the Basic realm.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use warren_codec::reply::{AmqpError, ReplyCode};

/// The realm RabbitMQ's management plugin names in `WWW-Authenticate`.
pub const REALM: &str = "Basic realm=\"RabbitMQ Management\"";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No credentials at all: 401 with the Basic challenge.
    #[error("Not_Authorized")]
    NoCredentials,
    /// Wrong credentials, or a user without the right: 401 without a
    /// challenge (a browser would otherwise prompt over the web UI).
    #[error("{0}")]
    Unauthorised(String),
    /// Known user, not allowed to do this.
    #[error("{0}")]
    Forbidden(String),
    #[error("Not Found")]
    NotFound,
    #[error("{0}")]
    BadRequest(String),
    /// The object is in use or owned elsewhere (RabbitMQ answers 405/400).
    #[error("{0}")]
    NotAllowed(String),
    /// The store refused the change.
    #[error("{0}")]
    Internal(String),
    /// A health check failed: 503 with `{"status":"failed","reason":…}`.
    #[error("{0}")]
    Unhealthy(String),
}

impl ApiError {
    /// The answer to an AMQP-level refusal of the same operation: its text
    /// without the `CODE_NAME - ` prefix, as RabbitMQ's API reports it.
    pub fn from_amqp(error: &AmqpError) -> ApiError {
        let text = error.text.split_once(" - ").map_or(error.text.as_str(), |(_, rest)| rest).to_string();
        match error.code {
            ReplyCode::NotFound => ApiError::NotFound,
            ReplyCode::AccessRefused => ApiError::Forbidden(text),
            ReplyCode::ResourceLocked => ApiError::NotAllowed(text),
            ReplyCode::InternalError => ApiError::Internal(text),
            _ => ApiError::BadRequest(text),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = match &self {
            ApiError::NoCredentials | ApiError::Unauthorised(_) => (StatusCode::UNAUTHORIZED, "not_authorised"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "not_authorised"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "Object Not Found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::NotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "not_allowed"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            ApiError::Unhealthy(reason) => {
                let body = serde_json::json!({"status": "failed", "reason": reason});
                return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
            }
        };
        let body = Json(serde_json::json!({"error": error, "reason": self.to_string()}));
        let mut response = (status, body).into_response();
        if matches!(self, ApiError::NoCredentials) {
            if let Ok(value) = header::HeaderValue::from_str(REALM) {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}
