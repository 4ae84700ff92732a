//! `GET /api/v1/rules`: the reactor rules the daemon's engine loaded — the
//! directory, files and rules, the last load's problems with
//! `file:line:column` (a refused reload keeps the previous set: both show),
//! warnings, and per-rule counters (matches, actions queued, dropped,
//! done, failed) beside the engine's totals.
//!
//! The rules engine sits beside this layer, so the daemon hands the HTTP
//! state a [`RulesSource`] (a closure returning the engine's report, see
//! `rules::RuleStats::report`); without one (an API not run by the daemon)
//! the answer is 503.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, Method};
use axum::Json;
use serde_json::Value as JsonValue;

use super::auth;
use super::error::ApiError;
use super::openapi::ErrorBody;
use super::HttpState;
use crate::registry::users::Role;

/// The rules engine's report now, as JSON (`{dir, loaded_at, files, rules,
/// errors, warnings, counters}`): how the daemon lets the API read a
/// component of its own layer.
pub type RulesSource = Arc<dyn Fn() -> JsonValue + Send + Sync>;

/// The report, or 503 without a rules engine.
pub(crate) fn report(state: &HttpState) -> Result<JsonValue, ApiError> {
    match &state.rules {
        Some(source) => Ok(source()),
        None => Err(ApiError::new(
            "unavailable",
            "the rules need the daemon's rules engine",
        )),
    }
}

/// `GET /api/v1/rules`: the loaded rules, the last load's errors and the
/// counters.
#[utoipa::path(get, path = "/api/v1/rules", tag = "rules",
    responses((status = 200, description = "`{dir, loaded_at, files, rules: [{name, file, line, enabled, matched, actions, dropped, done, failed}], errors: [{file, line, column, rule, message, at}], warnings, counters}`; the rules are the set running, `errors` those of the last load (which, when refused, left that set running)", body = Object),
        (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn list_rules(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    Ok(Json(report(&state)?))
}
