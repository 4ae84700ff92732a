//! Operations over HTTP: the dispatcher's targets and their retry (the
//! same store call as `dispatch retry`), and exec (`crate::exec::exec`,
//! the function the bus's `steward/v1/server/exec` and `salt-steward exec`
//! run) with its record (as `exec-log`).
//!
//! Exec policy: an HTTP requester (`Requester::Http`, recorded as
//! `user:<name>` / `token:<name>`) needs the operator role (token scope
//! `write`) and is then held to the master's allow-list (`exec.master`),
//! as the master and the CLI are; the timeout is `exec.timeout`, capped a
//! second below `http.request_timeout` (so the answer is the exec's 504
//! `no_answer`, not the layer's 408). Without a
//! Salt client (an API not run by the daemon) `POST /exec` is 503.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, Method};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value as JsonValue};

use super::auth;
use super::error::ApiError;
use super::inventory::{audit, object};
use super::openapi::{ErrorBody, ListPage};
use super::HttpState;
use crate::exec::{ExecRequest, Requester};
use crate::registry::dispatch::{DispatchStatus, StateKind};
use crate::registry::store::DispatchStore as _;
use crate::registry::users::Role;
use crate::registry::ServerRef;

fn server_ref(text: &str) -> ServerRef {
    text.parse()
        .unwrap_or_else(|_| ServerRef::Name(text.to_owned()))
}

fn query<T: for<'de> Deserialize<'de>>(q: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(q.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("query: {e}")))
}

/// `GET /dispatches` filters and page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DispatchQuery {
    status: Option<String>,
    /// `state=` is the dispatch status too (the dashboard's word).
    state: Option<String>,
    server: Option<String>,
    limit: Option<i64>,
    after: Option<i64>,
}

/// `limit` checked against the page bounds (the default without).
fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(super::PAGE_DEFAULT);
    if (1..=super::PAGE_MAX).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_request(format!(
            "limit must be 1 to {}",
            super::PAGE_MAX
        )))
    }
}

/// `GET /dispatches?status=&server=&limit=&after=`: the dispatcher's
/// targets (as `dispatch list --json`), by server id and state; a page
/// ends on a whole server, `next` is the last server's id.
#[utoipa::path(get, path = "/api/v1/dispatches", tag = "dispatch",
    params(("status" = Option<String>, Query, description = "Filter: pending, running, done, failed, waiting (also as `state`)"), ("server" = Option<String>, Query, description = "Filter: a server (id or name)"), ("limit" = Option<i64>, Query, description = "Page size (1 to 1000, default 100); a server's targets are never split"), ("after" = Option<i64>, Query, description = "The previous page's `next` (a server id)")),
    responses((status = 200, description = "A page of targets", body = ListPage), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn list_dispatches(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    let q: DispatchQuery = query(q.as_deref())?;
    let limit = page_limit(q.limit)?;
    if q.status.is_some() && q.state.is_some() {
        return Err(ApiError::bad_request(
            "status= and state= are the same filter: one of them",
        ));
    }
    let status = q
        .status
        .or(q.state)
        .as_deref()
        .map(str::parse::<DispatchStatus>)
        .transpose()?;
    let server = match q.server.as_deref() {
        Some(s) => Some(state.service.get_server(&server_ref(s)).await?.id),
        None => None,
    };
    let store = state.service.store();
    let after = q.after.unwrap_or(0);
    let mut items = store
        .dispatch_targets_page(status, server, after, limit + 1)
        .await?;
    let cap = usize::try_from(limit).unwrap_or(usize::MAX);
    let next = if items.len() > cap {
        // The first server left out may have targets on this page too: they
        // go to the next one, so that `after=` (a server id) skips nothing.
        let cut = items[cap].server_id;
        items.truncate(cap);
        let whole = items
            .iter()
            .rposition(|t| t.server_id != cut)
            .map(|i| i + 1);
        match whole {
            Some(n) => items.truncate(n),
            // One server with more targets than the page: all of them.
            None => {
                items = store
                    .dispatch_targets_page(status, Some(cut), cut - 1, super::PAGE_MAX)
                    .await?;
            }
        }
        items.last().map(|t| t.server_id)
    } else {
        None
    };
    Ok(Json(json!({"items": items, "next": next})))
}

/// `POST /dispatches/{server}/retry` with optional `{"state": …}`: its
/// targets (or that one) due now, as `dispatch retry` does. The dashboard's
/// form (`state`, `next`) is answered with a 303 to `next`.
#[utoipa::path(post, path = "/api/v1/dispatches/{server}/retry", tag = "dispatch",
    params(("server" = String, Path, description = "Id or name")),
    request_body(content = Object, description = "Optional `{state}`: that target only (or a form with `state` and `next`)"),
    responses((status = 200, description = "`{server, due}`: how many targets are due now", body = Object), (status = 303, description = "A form with `next`: back to that page"), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn retry_dispatch(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(server): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    let (args, next) = if is_form(&headers) {
        read_form(&body)?
    } else {
        (object(&body)?, None)
    };
    if let Some(k) = args.keys().find(|k| *k != "state") {
        return Err(ApiError::bad_request(format!(
            "{k:?} is not an argument (state)"
        )));
    }
    let kind = match args.get("state") {
        None | Some(JsonValue::Null) => None,
        Some(JsonValue::String(s)) => Some(s.parse::<StateKind>()?),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "state: {other} is not a state name"
            )))
        }
    };
    let s = state.service.get_server(&server_ref(&server)).await?;
    let due = state.service.store().dispatch_retry(s.id, kind).await?;
    audit(
        &state,
        &p,
        "dispatch.retry",
        format!("#{} {}", s.id, s.name),
        JsonValue::Object(args),
    )
    .await;
    match next {
        Some(to) => Ok(Redirect::to(&to).into_response()),
        None => Ok(Json(json!({"server": s.name, "due": due})).into_response()),
    }
}

/// Whether the body is a plain HTML form (`application/x-www-form-urlencoded`):
/// the dashboard's forms post to the API and are answered with a 303.
pub(super) fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

/// A dashboard form posted to the API (retry, exec, rekey): its fields as
/// string arguments (empty ones left out) and `next`, a path of this site
/// to go back to (answered with a 303); any other `next` is refused.
pub(super) fn read_form(body: &[u8]) -> Result<(Map<String, JsonValue>, Option<String>), ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|e| ApiError::bad_request(format!("form: {e}")))?;
    let mut args = Map::new();
    let mut next = None;
    for (k, v) in pairs {
        if k == "next" {
            // Visible ASCII only: it becomes a Location header as it is.
            if !v.starts_with('/')
                || v.starts_with("//")
                || v.contains('\\')
                || !v.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ApiError::bad_request(format!(
                    "next={v:?}: a path on this site (/…, percent-encoded)"
                )));
            }
            next = Some(v);
        } else if !v.is_empty() {
            args.insert(k, JsonValue::String(v));
        }
    }
    Ok((args, next))
}

/// `GET /exec` filters and page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecQuery {
    server: Option<String>,
    limit: Option<i64>,
    after: Option<i64>,
}

/// `GET /exec?server=&limit=&after=`: the exec record, newest first (as
/// `exec-log --json`; the arguments redacted as recorded); `next` is the
/// last record's id, the next page the older ones.
#[utoipa::path(get, path = "/api/v1/exec", tag = "exec",
    params(("server" = Option<String>, Query, description = "Filter: a server (id or name)"), ("limit" = Option<i64>, Query, description = "Page size, newest first (1 to 1000, default 100)"), ("after" = Option<i64>, Query, description = "The previous page's `next`: older records")),
    responses((status = 200, description = "A page of the exec record", body = ListPage), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn exec_log(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    let q: ExecQuery = query(q.as_deref())?;
    let limit = page_limit(q.limit)?;
    let server = q.server.as_deref().map(server_ref);
    let mut items =
        crate::exec::history(&state.service, server.as_ref(), q.after, limit + 1).await?;
    let cap = usize::try_from(limit).unwrap_or(usize::MAX);
    let next = if items.len() > cap {
        items.truncate(cap);
        items.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Json(json!({"items": items, "next": next})))
}

/// `POST /exec` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    server: String,
    fun: String,
    #[serde(default)]
    args: Vec<JsonValue>,
    #[serde(default)]
    kwargs: Map<String, JsonValue>,
}

/// The dashboard's exec form: `server`, `fun`, `args` (separated by
/// spaces or one per line, each a string as on the `salt` command line)
/// and `next`, where the answer sends the browser.
fn exec_form(body: &[u8]) -> Result<(ExecBody, String), ApiError> {
    let (mut form, next) = read_form(body)?;
    let mut text = |k: &str| match form.remove(k) {
        Some(JsonValue::String(s)) => s.trim().to_owned(),
        _ => String::new(),
    };
    let (server, fun, args) = (text("server"), text("fun"), text("args"));
    if let Some(k) = form.keys().next() {
        return Err(ApiError::bad_request(format!(
            "{k:?} is not a field of the exec form (server, fun, args, next)"
        )));
    }
    if server.is_empty() || fun.is_empty() {
        return Err(ApiError::bad_request(
            "the exec form needs a server and a function",
        ));
    }
    let Some(next) = next else {
        return Err(ApiError::bad_request(
            "the exec form needs next: the page to show the result on",
        ));
    };
    let args = args
        .split_whitespace()
        .map(|a| JsonValue::String(a.to_owned()))
        .collect();
    Ok((
        ExecBody {
            server,
            fun,
            args,
            kwargs: Map::new(),
        },
        next,
    ))
}

/// `next` with `key=value` added to its query (the value percent-encoded).
fn with_query(next: &str, key: &str, value: &str) -> String {
    let sep = if next.contains('?') { '&' } else { '?' };
    let pair = serde_urlencoded::to_string([(key, value)]).unwrap_or_default();
    format!("{next}{sep}{pair}")
}

/// `POST /exec` `{server, fun, args?, kwargs?}`: runs the function and
/// answers with the jid and the minion's return. The dashboard's form
/// (`server`, `fun`, `args`, `next`) is answered with a 303 to `next` with
/// `jid=` (or `exec_error=`, the refusal's code) added: the exec record,
/// shown on the server page, has the rest.
#[utoipa::path(post, path = "/api/v1/exec", tag = "exec",
    request_body(content = Object, description = "`{server, fun, args?, kwargs?}`; `fun` must be on `exec.master`. Also as a form: `server`, `fun`, `args` (space- or line-separated), `next` (a path of this site)"),
    responses((status = 200, description = "The jid, success, retcode and the minion's return", body = Object), (status = 303, description = "A form: to `next` with `jid=` or `exec_error=`"), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn run_exec(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    let (b, next) = if is_form(&headers) {
        let (b, next) = exec_form(&body)?;
        (b, Some(next))
    } else {
        let b: ExecBody = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!("body: {{server, fun, args, kwargs}}: {e}"))
        })?;
        (b, None)
    };
    let Some(ctx) = &state.exec else {
        return Err(ApiError::new(
            "unavailable",
            "exec needs the daemon's Salt client",
        ));
    };
    let policy = ctx.policy.get();
    let req = ExecRequest {
        server: server_ref(&b.server),
        fun: b.fun.clone(),
        arg: b.args,
        kwarg: b.kwargs,
        // Answered (504 `no_answer` at worst) before the request's own
        // timeout (`http.request_timeout`) cuts it off with 408.
        timeout: policy
            .exec_timeout
            .min(
                state
                    .timeout
                    .saturating_sub(std::time::Duration::from_secs(1)),
            )
            .max(std::time::Duration::from_secs(1)),
    };
    let who = Requester::Http(p.actor());
    audit(
        &state,
        &p,
        "exec.run",
        b.server.clone(),
        json!({"fun": b.fun}),
    )
    .await;
    let result = crate::exec::exec(&state.service, &ctx.salt, &policy.exec, &who, &req).await;
    ctx.stats.count(&result);
    match (result, next) {
        (Ok(reply), None) => Ok(Json(json!(reply)).into_response()),
        (Ok(reply), Some(next)) => {
            Ok(Redirect::to(&with_query(&next, "jid", &reply.jid)).into_response())
        }
        // A server that is not there is the form's mistake, not a result.
        (Err(crate::exec::ExecError::Registry(e)), _) => Err(e.into()),
        (Err(e), Some(next)) => {
            Ok(Redirect::to(&with_query(&next, "exec_error", e.code())).into_response())
        }
        (Err(e), None) => Err(ApiError::new(e.code(), e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exec_form_splits_args_and_needs_a_local_next() {
        let (b, next) =
            exec_form(b"server=web1&fun=test.arg&args=a+b%0Ac%0D%0A+d&next=%2Fservers%2Fweb1")
                .unwrap();
        assert_eq!((b.server.as_str(), b.fun.as_str()), ("web1", "test.arg"));
        assert_eq!(b.args, vec![json!("a"), json!("b"), json!("c"), json!("d")]);
        assert_eq!(next, "/servers/web1");
        assert_eq!(
            with_query(&next, "jid", "2026 1"),
            "/servers/web1?jid=2026+1"
        );
        assert_eq!(with_query("/x?a=1", "jid", "j"), "/x?a=1&jid=j");
        for bad in [
            &b"server=web1&fun=test.ping"[..],
            b"server=web1&fun=test.ping&next=https%3A%2F%2Fevil",
            b"server=web1&fun=test.ping&next=%2F%2Fevil",
            b"fun=test.ping&next=%2F",
            b"server=web1&next=%2F",
            b"server=web1&fun=test.ping&next=%2F&kwargs=x",
        ] {
            assert!(exec_form(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
