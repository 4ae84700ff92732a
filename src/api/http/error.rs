//! The one error shape of the HTTP API, `{"error": {"code", "message"}}`,
//! with the registry's stable codes ([`crate::registry::Error::code`]) and
//! the HTTP layer's own, and one function mapping a code to its status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tracing::error;

use crate::registry;

/// An API error: a stable code, a message for people, the status from
/// [`status_for`], and for 429 when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// Stable, for machines: a registry code or one of this module's.
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// Seconds to wait (429 only).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 401: no credentials, or ones that do not (or no longer) work.
    pub fn unauthenticated() -> Self {
        Self::new(
            "unauthenticated",
            "log in (POST /api/v1/login) or send Authorization: Bearer <token>",
        )
    }

    /// 403: authenticated, but the role or scope does not allow it.
    pub fn forbidden(why: impl Into<String>) -> Self {
        Self::new("forbidden", why)
    }

    /// 400: a request the API cannot read.
    pub fn bad_request(why: impl Into<String>) -> Self {
        Self::new("bad_request", why)
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        status_for(self.code)
    }
}

/// The HTTP status of an error code: every code the registry or this layer
/// returns has one, here and only here.
pub fn status_for(code: &str) -> StatusCode {
    match code {
        "bad_request" => StatusCode::BAD_REQUEST,
        "unauthenticated" | "invalid_credentials" => StatusCode::UNAUTHORIZED,
        "forbidden" | "csrf" => StatusCode::FORBIDDEN,
        "not_found" | "unknown_server" | "no_route" => StatusCode::NOT_FOUND,
        "method_not_allowed" => StatusCode::METHOD_NOT_ALLOWED,
        "conflict" | "duplicate_name" | "duplicate_forward" | "duplicate_share"
        | "duplicate_backup" | "duplicate_user" | "duplicate_token" | "model_in_use"
        | "server_in_use" | "minion_id_taken" => StatusCode::CONFLICT,
        "precondition_failed" => StatusCode::PRECONDITION_FAILED,
        "precondition_required" => StatusCode::PRECONDITION_REQUIRED,
        "invalid_hostname" | "invalid_value" | "unknown_model" | "not_a_guest" | "not_a_host"
        | "no_proxy" | "not_samba_managed" | "user_name_too_long" | "password_too_short" => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        "forbidden_function" => StatusCode::FORBIDDEN,
        "not_salt_managed" | "not_pending" | "unknown_minion" | "not_issued" | "key_mismatch"
        | "key_changed" => StatusCode::CONFLICT,
        "publish_failed" => StatusCode::BAD_GATEWAY,
        "no_answer" => StatusCode::GATEWAY_TIMEOUT,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        "request_timeout" => StatusCode::REQUEST_TIMEOUT,
        "payload_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<registry::Error> for ApiError {
    fn from(e: registry::Error) -> Self {
        let code = e.code();
        if status_for(code) == StatusCode::INTERNAL_SERVER_ERROR {
            // The database's or the key store's details stay in the log.
            error!(message = "HTTP request failed.", code, error = %e);
            return Self::new(code, "internal error (see the daemon's log)");
        }
        Self::new(code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status(), Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registry_code_has_a_status_and_the_database_is_not_leaked() {
        let e: ApiError = registry::Error::NotFound {
            kind: "server",
            key: "x".into(),
        }
        .into();
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let e: ApiError = registry::Error::DuplicateUser { name: "a".into() }.into();
        assert_eq!(e.status(), StatusCode::CONFLICT);
        let e: ApiError = registry::Error::invalid("x", "y").into();
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let e: ApiError = registry::Error::Database {
            op: "secret detail".into(),
            source: sqlx::Error::RowNotFound,
        }
        .into();
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message.contains("secret detail"));
        assert_eq!(status_for("rate_limited"), StatusCode::TOO_MANY_REQUESTS);
    }
}
