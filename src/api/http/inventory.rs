//! The inventory over HTTP: servers (create, delete), models, port and
//! hostname forwards, shares and backups. Every handler is thin: the role
//! check ([`auth::require`]), then the bus's execute path
//! ([`execute_op`]) with the request's JSON as the op's arguments — the
//! same arguments, validation and errors as `steward/v1/<entity>/<op>` —
//! then the audit entry.
//!
//! Lists are `{items, next}`: the op's `find` (with the filters it takes,
//! from the query string), ordered by id and cut at `?limit=` after
//! `?after=` (models: a page by id from the store).
//!
//! A share's password (create, `passwd`) is in that one response only: the
//! audit entry carries the request's arguments, never the reply.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value as JsonValue};
use tracing::error;

use super::auth::{self, Principal};
use super::error::ApiError;
use super::openapi::{ErrorBody, ListPage};
use super::{HttpState, PAGE_DEFAULT, PAGE_MAX};
use crate::api::bus::{execute_op, Entity, Op};
use crate::registry::store::Store as _;
use crate::registry::users::{AuditNote, Role};

/// A request body that must be a JSON object.
pub(super) fn object(body: &[u8]) -> Result<Map<String, JsonValue>, ApiError> {
    if body.is_empty() {
        return Ok(Map::new());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body: a JSON object: {e}")))
}

/// Runs `op` on `entity` with `args` and audits it as `action` by `p`
/// (`detail`: the arguments, never the reply).
pub(super) async fn write(
    state: &HttpState,
    p: &Principal,
    entity: Entity,
    op: Op,
    args: Map<String, JsonValue>,
    action: &'static str,
) -> Result<JsonValue, ApiError> {
    let done = execute_op(&state.service, entity, op, &args).await?;
    let id = done.get("id").and_then(JsonValue::as_i64);
    let name = done.get("name").and_then(JsonValue::as_str);
    let target = match (id, name) {
        (Some(id), Some(name)) => format!("#{id} {name}"),
        (Some(id), None) => format!("#{id}"),
        (None, Some(name)) => name.to_owned(),
        (None, None) => String::new(),
    };
    audit(state, p, action, target, JsonValue::Object(args)).await;
    Ok(done)
}

/// Writes the audit entry of `action` on `target` by `p`; a failure is
/// logged (the change itself is done).
pub(super) async fn audit(
    state: &HttpState,
    p: &Principal,
    action: &'static str,
    target: String,
    detail: JsonValue,
) {
    let note = AuditNote {
        actor: p.actor(),
        action,
        target,
        detail,
    };
    if let Err(e) = state.service.audit(&note).await {
        // The change is written; its audit entry is not: say so loudly.
        error!(message = "Change not audited.", actor = %note.actor, action, target = %note.target, error = %e);
    }
}

/// A list's query: `?limit=&after=` and the filters, as an op's arguments.
pub(super) struct ListQuery {
    limit: usize,
    after: Option<i64>,
    filters: Map<String, JsonValue>,
}

/// The query string as a [`ListQuery`], refusing a filter not in `filters`.
pub(super) fn list_query(query: Option<&str>, filters: &[&str]) -> Result<ListQuery, ApiError> {
    let mut q: BTreeMap<String, String> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    let limit = match q.remove("limit") {
        None => PAGE_DEFAULT,
        Some(t) => t
            .parse()
            .map_err(|_| ApiError::bad_request("limit is a number"))?,
    };
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {PAGE_MAX}"
        )));
    }
    let after = q
        .remove("after")
        .map(|t| t.parse::<i64>())
        .transpose()
        .map_err(|_| ApiError::bad_request("after is an id"))?;
    let mut args = Map::new();
    for (k, v) in q {
        if !filters.contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "{k:?} is not a filter here (filters: limit, after, {})",
                filters.join(", ")
            )));
        }
        args.insert(k, JsonValue::String(v));
    }
    Ok(ListQuery {
        limit: usize::try_from(limit).unwrap_or(usize::MAX),
        after,
        filters: args,
    })
}

/// `{items, next}` of `items` (any order) by id: those after `after`, at
/// most `limit`; `next` is the last id when more follow.
pub(super) fn paged(mut items: Vec<JsonValue>, limit: usize, after: Option<i64>) -> JsonValue {
    let id = |v: &JsonValue| v.get("id").and_then(JsonValue::as_i64).unwrap_or_default();
    items.retain(|v| after.is_none_or(|a| id(v) > a));
    items.sort_by_key(id);
    let more = items.len() > limit;
    items.truncate(limit);
    let next = if more { items.last().map(id) } else { None };
    json!({"items": items, "next": next})
}

/// A `find`'s list as `{items, next}`.
async fn find(
    state: &HttpState,
    entity: Entity,
    query: Option<&str>,
    filters: &[&str],
) -> Result<JsonValue, ApiError> {
    let q = list_query(query, filters)?;
    let found = execute_op(&state.service, entity, Op::Find, &q.filters).await?;
    let items = match found {
        JsonValue::Array(a) => a,
        other => vec![other],
    };
    Ok(paged(items, q.limit, q.after))
}

/// One record by id (`find` with `id`): 404 when there is none.
async fn one(state: &HttpState, entity: Entity, id: i64) -> Result<JsonValue, ApiError> {
    let found = execute_op(&state.service, entity, Op::Find, &id_args(id)).await?;
    match found {
        JsonValue::Array(mut a) if !a.is_empty() => Ok(a.swap_remove(0)),
        _ => Err(ApiError::new("not_found", format!("no record #{id}"))),
    }
}

fn id_args(id: i64) -> Map<String, JsonValue> {
    let mut m = Map::new();
    m.insert("id".to_owned(), json!(id));
    m
}

fn created(v: JsonValue) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

// -------------------------------------------------------------- servers

/// `POST /servers`: the fields as `server add` takes them.
#[utoipa::path(post, path = "/api/v1/servers", tag = "servers",
    request_body(content = Object, description = "The fields, as `server add` takes them"),
    responses((status = 201, description = "The server; ETag: its revision", body = Object), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn create_server(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    let args = object(&body)?;
    let v = write(
        &state,
        &p,
        Entity::Server,
        Op::Create,
        args,
        "server.create",
    )
    .await?;
    let mut resp = super::server_response(&v)?;
    *resp.status_mut() = StatusCode::CREATED;
    Ok(resp)
}

/// `DELETE /servers/{id_or_name}`: the server as it was.
#[utoipa::path(delete, path = "/api/v1/servers/{server}", tag = "servers",
    params(("server" = String, Path, description = "Id or name")),
    responses((status = 200, description = "The server as it was", body = Object), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn delete_server(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(server): Path<String>,
) -> Result<Json<JsonValue>, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    let mut args = Map::new();
    args.insert("server".to_owned(), JsonValue::String(server));
    let v = write(
        &state,
        &p,
        Entity::Server,
        Op::Delete,
        args,
        "server.delete",
    )
    .await?;
    Ok(Json(v))
}

// --------------------------------------------------------------- models

/// `GET /models?limit=&after=`: the models, by id.
#[utoipa::path(get, path = "/api/v1/models", tag = "models",
    params(("limit" = Option<i64>, Query, description = "Page size (1 to 1000, default 100)"), ("after" = Option<i64>, Query, description = "The previous page's `next`")),
    responses((status = 200, description = "A page of models", body = ListPage), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn list_models(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    let q = list_query(query.as_deref(), &[])?;
    let limit = i64::try_from(q.limit).unwrap_or(PAGE_MAX);
    let mut items = state
        .service
        .store()
        .models_page(q.after.unwrap_or(0), limit + 1)
        .await?;
    let next = if items.len() > q.limit {
        items.truncate(q.limit);
        items.last().map(|m| m.id)
    } else {
        None
    };
    Ok(Json(json!({"items": items, "next": next})))
}

/// `POST /models`: `{name, description?, states?}`.
#[utoipa::path(post, path = "/api/v1/models", tag = "models",
    request_body(content = Object, description = "`{name, description?, states?}`"),
    responses((status = 201, description = "The model", body = Object), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn create_model(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    let args = object(&body)?;
    for k in args.keys() {
        if !["name", "description", "states"].contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "{k:?} is not a model field (name, description, states)"
            )));
        }
    }
    let v = write(&state, &p, Entity::Model, Op::Create, args, "model.create").await?;
    Ok(created(v))
}

/// `DELETE /models/{name}`: the model as it was (409 while servers use it).
#[utoipa::path(delete, path = "/api/v1/models/{name}", tag = "models",
    params(("name" = String, Path, description = "The model")),
    responses((status = 200, description = "The model as it was", body = Object), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn delete_model(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<JsonValue>, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    let mut args = Map::new();
    args.insert("name".to_owned(), JsonValue::String(name));
    let v = write(&state, &p, Entity::Model, Op::Delete, args, "model.delete").await?;
    Ok(Json(v))
}

// ------------------------------------------- forwards, shares, backups

/// A resource kept by id: its entity, audit prefix and list filters.
#[derive(Debug, Clone, Copy)]
struct Kind {
    entity: Entity,
    create: &'static str,
    delete: &'static str,
    filters: &'static [&'static str],
}

/// Port forwards: filter `host`.
const PORT_FORWARD: Kind = Kind {
    entity: Entity::PortForward,
    create: "forward.port.create",
    delete: "forward.port.delete",
    filters: &["host"],
};

/// Hostname forwards: filters `proxy`, `domain`.
const HOSTNAME_FORWARD: Kind = Kind {
    entity: Entity::HostnameForward,
    create: "forward.hostname.create",
    delete: "forward.hostname.delete",
    filters: &["proxy", "domain"],
};

/// Shares: filter `server`.
const SHARE: Kind = Kind {
    entity: Entity::Share,
    create: "share.create",
    delete: "share.delete",
    filters: &["server"],
};

/// Backups: filter `dest`.
const BACKUP: Kind = Kind {
    entity: Entity::Backup,
    create: "backup.create",
    delete: "backup.delete",
    filters: &["dest"],
};

/// `GET` of a kind's list.
async fn list(
    kind: Kind,
    state: Arc<HttpState>,
    method: Method,
    headers: HeaderMap,
    query: Option<String>,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    Ok(Json(
        find(&state, kind.entity, query.as_deref(), kind.filters).await?,
    ))
}

/// `POST` of a kind: its create op's arguments as the body → 201.
async fn create(
    kind: Kind,
    state: Arc<HttpState>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    let args = object(&body)?;
    let v = write(&state, &p, kind.entity, Op::Create, args, kind.create).await?;
    Ok(created(v))
}

/// `GET /{id}` of a kind.
async fn get_one(
    kind: Kind,
    state: Arc<HttpState>,
    method: Method,
    headers: HeaderMap,
    id: i64,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    Ok(Json(one(&state, kind.entity, id).await?))
}

/// `DELETE /{id}` of a kind: the record as it was.
async fn delete(
    kind: Kind,
    state: Arc<HttpState>,
    method: Method,
    headers: HeaderMap,
    id: i64,
) -> Result<Json<JsonValue>, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    let v = write(
        &state,
        &p,
        kind.entity,
        Op::Delete,
        id_args(id),
        kind.delete,
    )
    .await?;
    Ok(Json(v))
}

/// `POST /shares/{id}/passwd`: a new password, in this response only.
#[utoipa::path(post, path = "/api/v1/shares/{id}/passwd", tag = "shares",
    params(("id" = i64, Path, description = "The share")),
    responses((status = 200, description = "The share and its new `password`, shown once", body = Object), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn share_passwd(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<JsonValue>, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    let v = write(
        &state,
        &p,
        Entity::Share,
        Op::Passwd,
        id_args(id),
        "share.passwd",
    )
    .await?;
    Ok(Json(v))
}

/// How many results `GET /backups/{id}` shows.
const BACKUP_RESULTS: i64 = 50;

/// `GET /backups`: each backup with `health` and `last_result` (as
/// `backup list` shows them); filter `dest`.
#[utoipa::path(get, path = "/api/v1/backups", tag = "backups",
    params(("limit" = Option<i64>, Query, description = "Page size (1 to 1000, default 100)"), ("after" = Option<i64>, Query, description = "The previous page's `next`"), ("dest" = Option<String>, Query, description = "Filter: the backup server (id or name)")),
    responses((status = 200, description = "A page of backups with `health` and `last_result`", body = ListPage), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn list_backups(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    let q = list_query(query.as_deref(), BACKUP.filters)?;
    let dest = q.filters.get("dest").and_then(JsonValue::as_str).map(|d| {
        d.parse::<i64>()
            .map_or_else(|_| (None, Some(d.to_owned())), |id| (Some(id), None))
    });
    let mut items = Vec::new();
    for (b, health, last) in state
        .service
        .backups_with_health(state.backup_stale_ms)
        .await?
    {
        if let Some((id, name)) = &dest {
            if id.is_some_and(|id| id != b.dest_id) || name.as_ref().is_some_and(|n| *n != b.dest) {
                continue;
            }
        }
        let mut v =
            serde_json::to_value(&b).map_err(|e| ApiError::new("internal", e.to_string()))?;
        v["health"] = json!(health);
        v["last_result"] = json!(last);
        items.push(v);
    }
    Ok(Json(paged(items, q.limit, q.after)))
}

/// `GET /backups/{id}`: the backup, its `health` and its newest `results`.
#[utoipa::path(get, path = "/api/v1/backups/{id}", tag = "backups",
    params(("id" = i64, Path, description = "Its id")),
    responses((status = 200, description = "The backup with `health` and its newest `results`", body = Object), (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn get_backup(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    let b = state.service.get_backup(id).await?;
    let results = state.service.backup_results(id, BACKUP_RESULTS).await?;
    // The system's clock, as `GET /backups` (`backups_with_health`) uses.
    let now = crate::registry::store::now_ms();
    let health =
        crate::registry::backup::Health::of(&results, now, state.backup_stale_ms, b.running(now));
    let mut v = serde_json::to_value(&b).map_err(|e| ApiError::new("internal", e.to_string()))?;
    v["health"] = json!(health);
    v["results"] = json!(results);
    Ok(Json(v))
}

/// `GET /api/v1/forwards/port`: the port forwards, `{items, next}` by id.
#[utoipa::path(get, path = "/api/v1/forwards/port", tag = "forwards",
    params(
        ("limit" = Option<i64>, Query, description = "Page size (1 to 1000, default 100)"),
        ("after" = Option<i64>, Query, description = "The previous page's `next`"),
        ("host" = Option<String>, Query, description = "Filter: the host (id or name)")
    ),
    responses((status = 200, description = "A page of port forwards", body = ListPage), (status = "4XX", body = ErrorBody)))]
pub(super) async fn list_port_forwards(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<JsonValue>, ApiError> {
    list(PORT_FORWARD, state, method, headers, query).await
}

/// `POST /api/v1/forwards/port`: a new port forward (operator).
#[utoipa::path(post, path = "/api/v1/forwards/port", tag = "forwards",
    request_body(content = Object, description = "`{host, dest, proto, port, to_port}` (as `steward/v1/forward/port/create`)"),
    responses((status = 201, description = "The port forward", body = Object), (status = "4XX", body = ErrorBody)))]
pub(super) async fn create_port_forward(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    create(PORT_FORWARD, state, method, headers, body).await
}

/// `GET /api/v1/forwards/port/{id}`: one port forward.
#[utoipa::path(get, path = "/api/v1/forwards/port/{id}", tag = "forwards",
    params(("id" = i64, Path, description = "Its id")),
    responses((status = 200, description = "The port forward", body = Object), (status = "4XX", body = ErrorBody)))]
pub(super) async fn get_port_forward(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<JsonValue>, ApiError> {
    get_one(PORT_FORWARD, state, method, headers, id).await
}

/// `DELETE /api/v1/forwards/port/{id}`: the port forward as it was (operator).
#[utoipa::path(delete, path = "/api/v1/forwards/port/{id}", tag = "forwards",
    params(("id" = i64, Path, description = "Its id")),
    responses((status = 200, description = "The port forward as it was", body = Object), (status = "4XX", body = ErrorBody)))]
pub(super) async fn delete_port_forward(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<JsonValue>, ApiError> {
    delete(PORT_FORWARD, state, method, headers, id).await
}

/// `GET /api/v1/forwards/hostname`: the hostname forwards, `{items, next}` by id.
#[utoipa::path(get, path = "/api/v1/forwards/hostname", tag = "forwards",
    params(
        ("limit" = Option<i64>, Query, description = "Page size (1 to 1000, default 100)"),
        ("after" = Option<i64>, Query, description = "The previous page's `next`"),
        ("proxy" = Option<String>, Query, description = "Filter: the proxy (id or name)"),
        ("domain" = Option<String>, Query, description = "Filter: the domain")
    ),
    responses((status = 200, description = "A page of hostname forwards", body = ListPage), (status = "4XX", body = ErrorBody)))]
pub(super) async fn list_hostname_forwards(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<JsonValue>, ApiError> {
    list(HOSTNAME_FORWARD, state, method, headers, query).await
}

/// `POST /api/v1/forwards/hostname`: a new hostname forward (operator).
#[utoipa::path(post, path = "/api/v1/forwards/hostname", tag = "forwards",
    request_body(content = Object, description = "`{domain, dest, port?, to_port?, path?}` (as `steward/v1/forward/hostname/create`)"),
    responses((status = 201, description = "The hostname forward", body = Object), (status = "4XX", body = ErrorBody)))]
pub(super) async fn create_hostname_forward(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    create(HOSTNAME_FORWARD, state, method, headers, body).await
}

/// `GET /api/v1/forwards/hostname/{id}`: one hostname forward.
#[utoipa::path(get, path = "/api/v1/forwards/hostname/{id}", tag = "forwards",
    params(("id" = i64, Path, description = "Its id")),
    responses((status = 200, description = "The hostname forward", body = Object), (status = "4XX", body = ErrorBody)))]
pub(super) async fn get_hostname_forward(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<JsonValue>, ApiError> {
    get_one(HOSTNAME_FORWARD, state, method, headers, id).await
}

/// `DELETE /api/v1/forwards/hostname/{id}`: the hostname forward as it was (operator).
#[utoipa::path(delete, path = "/api/v1/forwards/hostname/{id}", tag = "forwards",
    params(("id" = i64, Path, description = "Its id")),
    responses((status = 200, description = "The hostname forward as it was", body = Object), (status = "4XX", body = ErrorBody)))]
pub(super) async fn delete_hostname_forward(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<JsonValue>, ApiError> {
    delete(HOSTNAME_FORWARD, state, method, headers, id).await
}

/// `GET /api/v1/shares`: the shares, `{items, next}` by id.
#[utoipa::path(get, path = "/api/v1/shares", tag = "shares",
    params(
        ("limit" = Option<i64>, Query, description = "Page size (1 to 1000, default 100)"),
        ("after" = Option<i64>, Query, description = "The previous page's `next`"),
        ("server" = Option<String>, Query, description = "Filter: the file server (id or name)")
    ),
    responses((status = 200, description = "A page of shares", body = ListPage), (status = "4XX", body = ErrorBody)))]
pub(super) async fn list_shares(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<JsonValue>, ApiError> {
    list(SHARE, state, method, headers, query).await
}

/// `POST /api/v1/shares`: a new share (operator).
#[utoipa::path(post, path = "/api/v1/shares", tag = "shares",
    request_body(content = Object, description = "`{server, name, folder}`; the response carries `password`, shown once"),
    responses((status = 201, description = "The share", body = Object), (status = "4XX", body = ErrorBody)))]
pub(super) async fn create_share(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    create(SHARE, state, method, headers, body).await
}

/// `GET /api/v1/shares/{id}`: one share.
#[utoipa::path(get, path = "/api/v1/shares/{id}", tag = "shares",
    params(("id" = i64, Path, description = "Its id")),
    responses((status = 200, description = "The share", body = Object), (status = "4XX", body = ErrorBody)))]
pub(super) async fn get_share(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<JsonValue>, ApiError> {
    get_one(SHARE, state, method, headers, id).await
}

/// `DELETE /api/v1/shares/{id}`: the share as it was (operator).
#[utoipa::path(delete, path = "/api/v1/shares/{id}", tag = "shares",
    params(("id" = i64, Path, description = "Its id")),
    responses((status = 200, description = "The share as it was", body = Object), (status = "4XX", body = ErrorBody)))]
pub(super) async fn delete_share(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<JsonValue>, ApiError> {
    delete(SHARE, state, method, headers, id).await
}

/// `POST /api/v1/backups`: a new backup (operator).
#[utoipa::path(post, path = "/api/v1/backups", tag = "backups",
    request_body(content = Object, description = "`{source, source_folder, dest, dest_folder, excludes?, exclude_proc_sys?, active?, retain?, ssh_host?, ssh_port?, ssh_user?}` (as `steward/v1/backup/create`)"),
    responses((status = 201, description = "The backup", body = Object), (status = "4XX", body = ErrorBody)))]
pub(super) async fn create_backup(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    create(BACKUP, state, method, headers, body).await
}

/// `DELETE /api/v1/backups/{id}`: the backup as it was (operator; its
/// snapshots stay).
#[utoipa::path(delete, path = "/api/v1/backups/{id}", tag = "backups",
    params(("id" = i64, Path, description = "Its id")),
    responses((status = 200, description = "The backup as it was", body = Object), (status = "4XX", body = ErrorBody)))]
pub(super) async fn delete_backup(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Json<JsonValue>, ApiError> {
    delete(BACKUP, state, method, headers, id).await
}
