//! The dashboard's pages: each reads what it shows from `registry::Service`
//! (and the keys view of [`super::super::keys`]) and renders one template.
//! Nothing here writes: the forms post to the JSON API.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method};
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::{page_user, render, render_text, seg, Frame, PageError};
use crate::api::http::alerts;
use crate::api::http::error::ApiError;
use crate::api::http::{keys, HttpState};
use crate::registry::backup::Health;
use crate::registry::dispatch::{DispatchStatus, DispatchTarget};
use crate::registry::store::DispatchStore as _;
use crate::registry::users::{Role, User};
use crate::registry::Store as _;
use crate::registry::{Server, ServerFilter, ServerRef, Status};

/// How many audit entries a page shows.
const AUDIT_PAGE: i64 = 100;

fn query<T: for<'de> Deserialize<'de> + Default>(q: Option<&str>) -> Result<T, PageError> {
    match q {
        None | Some("") => Ok(T::default()),
        Some(q) => serde_urlencoded::from_str(q)
            .map_err(|e| ApiError::bad_request(format!("query: {e}")).into()),
    }
}

fn need(user: &User, role: Role) -> Result<(), PageError> {
    if user.role >= role {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!("this page needs the {role} role")).into())
    }
}

// ------------------------------------------------------------- keys view

/// One key file as the keys view has it.
#[derive(Debug, Clone, Serialize)]
struct Key {
    state: &'static str,
    minion_id: String,
    fingerprint: Option<String>,
    issued_fingerprint: Option<String>,
    matches: Option<bool>,
    server: Option<String>,
    /// `/keys/{minion}/confirm?action=…` links (empty for a viewer).
    accept: Option<String>,
    reject: Option<String>,
}

/// The master's keys (`GET /api/v1/keys`'s view, read by its handler):
/// `None` when the daemon gave the API no pki directory.
async fn key_view(
    state: &Arc<HttpState>,
    headers: &HeaderMap,
    can_write: bool,
) -> Result<Option<(String, Vec<Key>)>, PageError> {
    let view = match keys::list_keys(
        State(state.clone()),
        Method::GET,
        headers.clone(),
        axum::extract::RawQuery(None),
    )
    .await
    {
        Ok(v) => v.0,
        Err(e) if e.code == "unavailable" => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(entry) = view["items"].get(0) else {
        return Ok(None);
    };
    let pki_dir = entry["pki_dir"].as_str().unwrap_or_default().to_owned();
    let mut out = Vec::new();
    for state_name in ["pending", "accepted", "rejected", "denied"] {
        for k in entry[state_name].as_array().into_iter().flatten() {
            let text = |f: &str| k[f].as_str().map(str::to_owned);
            let minion_id = text("minion_id").unwrap_or_default();
            let link = |action: &str| format!("/keys/{}/confirm?action={action}", seg(&minion_id));
            let (accept, reject) = match (can_write, state_name) {
                (false, _) | (true, "denied") => (None, None),
                (true, "pending") => (Some(link("accept")), Some(link("reject"))),
                (true, "accepted") => (None, Some(link("reject"))),
                (true, _) => (Some(link("accept")), None),
            };
            out.push(Key {
                state: state_name,
                fingerprint: text("fingerprint"),
                issued_fingerprint: text("issued_fingerprint"),
                matches: k["matches"].as_bool(),
                server: text("server"),
                minion_id,
                accept,
                reject,
            });
        }
    }
    Ok(Some((pki_dir, out)))
}

// ------------------------------------------------------------- attention

/// One entry of the attention list: what is wrong, and the page to fix it.
#[derive(Debug, Clone, Serialize)]
struct Attention {
    kind: String,
    text: String,
    link: String,
}

/// The attention list: the API's alerts ([`alerts::collect`], the same
/// list as `GET /api/v1/alerts`), each with the page to fix it on.
async fn attention(state: &HttpState) -> Result<Vec<Attention>, PageError> {
    Ok(alerts::collect(state)
        .await?
        .into_iter()
        .map(|a| {
            let server = a.subject.split('/').next().unwrap_or_default();
            let link = match a.kind {
                "key_mismatch" | "unknown_minion" | "denied_minion" => "/keys".to_owned(),
                "dispatch_failed" | "dispatch_stuck" | "server_not_seen" => {
                    format!("/servers/{}", seg(server))
                }
                "backup_red" | "backup_never_run" => "/backups".to_owned(),
                "rule_error" => "/rules".to_owned(),
                _ => "/".to_owned(),
            };
            Attention {
                kind: a.kind.replace('_', " "),
                text: format!("{}: {}", a.subject, a.message),
                link,
            }
        })
        .collect())
}

// -------------------------------------------------------------- overview

#[derive(Debug, Default, Serialize)]
struct Counts {
    servers: usize,
    online: usize,
    offline: usize,
    backups_green: usize,
    backups_red: usize,
    backups_never: usize,
    dispatch_pending: usize,
    dispatch_running: usize,
    dispatch_failed: usize,
    keys_pending: Option<usize>,
}

#[derive(Debug, Serialize)]
struct Overview {
    counts: Counts,
    attention: Vec<Attention>,
    /// The servers changed last (newest first).
    recent: Vec<Server>,
}

/// The count of `status` in `(status, count)` rows from the database.
fn counted<T: PartialEq>(rows: &[(T, i64)], status: &T) -> usize {
    rows.iter()
        .find(|(s, _)| s == status)
        .map_or(0, |(_, n)| usize::try_from(*n).unwrap_or(0))
}

async fn overview_data(
    state: &Arc<HttpState>,
    headers: &HeaderMap,
    user: &User,
) -> Result<Overview, PageError> {
    // Counted in the database, and only the last ten changed read: the
    // overview's cost does not grow with the servers and targets.
    let by_status = state.service.store().server_status_counts().await?;
    let by_dispatch = state.service.store().dispatch_status_counts().await?;
    let backups = state
        .service
        .backups_with_health(state.backup_stale_ms)
        .await?;
    let keys = key_view(state, headers, user.role >= Role::Operator).await?;
    let count = |st: DispatchStatus| counted(&by_dispatch, &st);
    let health = |h: Health| backups.iter().filter(|b| b.1 == h).count();
    let counts = Counts {
        servers: usize::try_from(by_status.iter().map(|(_, n)| n).sum::<i64>()).unwrap_or(0),
        online: counted(&by_status, &Status::Online),
        offline: counted(&by_status, &Status::Offline),
        backups_green: health(Health::Green),
        backups_red: health(Health::Red),
        backups_never: health(Health::NeverRun),
        dispatch_pending: count(DispatchStatus::Pending),
        dispatch_running: count(DispatchStatus::Running),
        dispatch_failed: count(DispatchStatus::Failed),
        keys_pending: keys
            .as_ref()
            .map(|(_, k)| k.iter().filter(|k| k.state == "pending").count()),
    };
    let attention = attention(state).await?;
    let recent = state
        .service
        .find_servers(&ServerFilter {
            newest_first: true,
            limit: Some(10),
            ..ServerFilter::default()
        })
        .await?;
    Ok(Overview {
        counts,
        attention,
        recent,
    })
}

/// `GET /`: counts and the attention list, refreshed live.
pub(super) async fn overview(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    let data = overview_data(&state, &headers, &user).await?;
    render(
        "overview.html",
        &minijinja::context! { user => Frame::of(&user), nav => "overview", title => "Overview", data },
    )
}

/// `GET /fragments/overview`: the overview's live part alone (what the
/// event stream's script swaps in).
pub(super) async fn overview_fragment(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    let data = overview_data(&state, &headers, &user).await?;
    let html = render_text("overview_fragment.html", &minijinja::context! { data })?;
    Ok(Html(html).into_response())
}

// --------------------------------------------------------------- servers

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServersQuery {
    q: Option<String>,
    status: Option<String>,
    sort: Option<String>,
}

#[derive(Debug, Serialize)]
struct ServerRow {
    server: Server,
    link: String,
    dispatch: Option<&'static str>,
    backup: Option<&'static str>,
}

/// The worst of a server's dispatch targets (failed first).
fn worst_dispatch(targets: &[&DispatchTarget]) -> Option<&'static str> {
    [
        DispatchStatus::Failed,
        DispatchStatus::Running,
        DispatchStatus::Pending,
        DispatchStatus::Waiting,
        DispatchStatus::Done,
    ]
    .into_iter()
    .find(|s| targets.iter().any(|t| t.status == *s))
    .map(DispatchStatus::as_str)
}

/// The worst health of the backups of a server (as source).
fn worst_backup(healths: &[Health]) -> Option<&'static str> {
    [
        Health::Red,
        Health::NeverRun,
        Health::Running,
        Health::Green,
    ]
    .into_iter()
    .find(|h| healths.contains(h))
    .map(Health::as_str)
}

/// The servers' table (page and fragment): the rows, the filters as given,
/// and the fragment's URL (with the same filters).
async fn servers_data(state: &HttpState, q: ServersQuery) -> Result<minijinja::Value, PageError> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<Status>().map_err(ApiError::from)?),
    };
    let sort = q.sort.as_deref().unwrap_or("name").to_owned();
    if !["name", "model", "status", "updated"].contains(&sort.as_str()) {
        return Err(ApiError::bad_request(format!(
            "sort={sort:?}: sort by name, model, status or updated"
        ))
        .into());
    }
    let mut servers = state
        .service
        .find_servers(&ServerFilter {
            status,
            ..ServerFilter::default()
        })
        .await?;
    let needle = q.q.as_deref().unwrap_or("").trim().to_lowercase();
    if !needle.is_empty() {
        servers.retain(|s| s.name.contains(&needle) || s.minion_id.contains(&needle));
    }
    match sort.as_str() {
        "model" => servers.sort_by(|a, b| a.model.cmp(&b.model).then(a.name.cmp(&b.name))),
        "status" => servers.sort_by(|a, b| {
            a.status
                .as_str()
                .cmp(b.status.as_str())
                .then(a.name.cmp(&b.name))
        }),
        "updated" => servers.sort_by_key(|s| std::cmp::Reverse(s.updated_at)),
        _ => servers.sort_by(|a, b| a.name.cmp(&b.name)),
    }
    let targets = state.service.store().dispatch_targets(None).await?;
    let backups = state
        .service
        .backups_with_health(state.backup_stale_ms)
        .await?;
    let mut by_server: HashMap<i64, Vec<&DispatchTarget>> = HashMap::new();
    for t in &targets {
        by_server.entry(t.server_id).or_default().push(t);
    }
    let mut health: HashMap<i64, Vec<Health>> = HashMap::new();
    for (b, h, _) in &backups {
        health.entry(b.source_id).or_default().push(*h);
    }
    let rows: Vec<ServerRow> = servers
        .into_iter()
        .map(|s| ServerRow {
            link: format!("/servers/{}", seg(&s.name)),
            dispatch: worst_dispatch(by_server.get(&s.id).map_or(&[][..], Vec::as_slice)),
            backup: worst_backup(health.get(&s.id).map_or(&[][..], Vec::as_slice)),
            server: s,
        })
        .collect();
    let q_text = q.q.unwrap_or_default();
    let status_text = q.status.unwrap_or_default();
    let fragment = format!(
        "/fragments/servers?{}",
        serde_urlencoded::to_string([
            ("q", q_text.as_str()),
            ("status", status_text.as_str()),
            ("sort", sort.as_str()),
        ])
        .unwrap_or_default()
    );
    Ok(minijinja::context! { rows, q => q_text, status => status_text, sort, fragment })
}

/// `GET /servers?q=&status=&sort=`: the servers, filtered by a name part
/// and a status, sorted by name, model, status or last change; the table
/// refreshed live.
pub(super) async fn servers(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    let data = servers_data(&state, query(q.as_deref())?).await?;
    let statuses: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
    render(
        "servers.html",
        &minijinja::context! {
            user => Frame::of(&user), nav => "servers", title => "Servers", data, statuses,
        },
    )
}

/// `GET /fragments/servers?q=&status=&sort=`: the servers' table alone
/// (what the event stream's script swaps in).
pub(super) async fn servers_fragment(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, PageError> {
    page_user(&state, &headers).await?;
    let data = servers_data(&state, query(q.as_deref())?).await?;
    let html = render_text("servers_fragment.html", &minijinja::context! { data })?;
    Ok(Html(html).into_response())
}

/// What the exec form's answer adds to the server page: the jid it
/// published, or the code of its refusal.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerQuery {
    jid: Option<String>,
    exec_error: Option<String>,
}

/// How many exec records the server page shows.
const EXEC_ROWS: i64 = 10;

/// How far back (exec records of any server) the server page looks for the
/// refusals recorded without a server id.
const EXEC_UNRESOLVED: i64 = 200;

/// `GET /servers/{name}?jid=|exec_error=`: one server with its keys,
/// forwards, shares, backups, dispatches and exec record; for an operator
/// the exec form and the rekey link, for an admin the bundle download.
pub(super) async fn server(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    let q: ServerQuery = query(q.as_deref())?;
    let r: ServerRef = name.parse().unwrap_or(ServerRef::Name(name));
    let s = state.service.get_server(&r).await?;
    let r = ServerRef::Id(s.id);
    let mut fields: Vec<(String, String)> = Vec::new();
    if let Ok(JsonValue::Object(map)) = serde_json::to_value(&s) {
        for (k, v) in map {
            let text = match (k.as_str(), v) {
                ("public_key", JsonValue::Null) => "none".to_owned(),
                ("public_key", _) => "issued (PEM, not shown)".to_owned(),
                ("created_at" | "updated_at", JsonValue::Number(n)) => {
                    n.as_i64().map_or_else(String::new, super::ts)
                }
                (_, JsonValue::Null) => String::new(),
                (_, JsonValue::String(t)) => t,
                (_, other) => other.to_string(),
            };
            fields.push((k, text));
        }
    }
    let keys = key_view(&state, &headers, user.role >= Role::Operator)
        .await?
        .map(|(_, k)| {
            k.into_iter()
                .filter(|k| k.minion_id == s.minion_id)
                .collect::<Vec<_>>()
        });
    let port_forwards: Vec<_> = state
        .service
        .list_port_forwards(None)
        .await?
        .into_iter()
        .filter(|f| f.host_id == s.id || f.dest_id == s.id)
        .collect();
    let hostname_forwards: Vec<_> = state
        .service
        .list_hostname_forwards(None)
        .await?
        .into_iter()
        .filter(|f| f.proxy_id == s.id || f.dest_id == s.id || f.host_id == s.id)
        .collect();
    let shares = state.service.list_shares(Some(&r)).await?;
    let backups: Vec<_> = state
        .service
        .backups_with_health(state.backup_stale_ms)
        .await?
        .into_iter()
        .filter(|(b, _, _)| b.source_id == s.id || b.dest_id == s.id)
        .map(|(b, h, last)| minijinja::context! { backup => b, health => h.as_str(), last })
        .collect();
    let targets = state.service.store().dispatch_targets_of(s.id).await?;
    let runs = state.service.store().dispatch_runs(s.id, 20).await?;
    // A request refused before its server resolved is recorded without the
    // server's id: the latest of those naming it (by name or id) too.
    let mut execs = crate::exec::history(&state.service, Some(&r), None, EXEC_ROWS).await?;
    let id_text = s.id.to_string();
    execs.extend(
        crate::exec::history(&state.service, None, None, EXEC_UNRESOLVED)
            .await?
            .into_iter()
            .filter(|x| x.server_id.is_none() && (x.server == s.name || x.server == id_text)),
    );
    execs.sort_by_key(|x| std::cmp::Reverse(x.id));
    execs.truncate(usize::try_from(EXEC_ROWS).unwrap_or(usize::MAX));
    let link = format!("/servers/{}", seg(&s.name));
    let rekey = format!("/servers/{}/rekey", seg(&s.name));
    let bundle = format!("/api/v1/servers/{}/bundle", seg(&s.name));
    render(
        "server.html",
        &minijinja::context! {
            user => Frame::of(&user), nav => "servers", title => s.name.clone(),
            server => s, fields, keys, port_forwards, hostname_forwards, shares, backups,
            targets, runs, execs, link, rekey, bundle,
            jid => q.jid, exec_error => q.exec_error,
        },
    )
}

/// `GET /servers/{name}/rekey` (operator): the server's key once more, and
/// the form that posts to `POST /api/v1/servers/{name}/rekey`.
pub(super) async fn confirm_rekey(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    need(&user, Role::Operator)?;
    let r: ServerRef = name.parse().unwrap_or(ServerRef::Name(name));
    let s = state.service.get_server(&r).await?;
    let post = format!("/api/v1/servers/{}/rekey", seg(&s.name));
    let back = format!("/servers/{}", seg(&s.name));
    render(
        "rekey.html",
        &minijinja::context! {
            user => Frame::of(&user), nav => "servers", title => "Rekey", server => s, post, back,
        },
    )
}

// ------------------------------------------------------------------ keys

/// `GET /keys`: the master's keys by state, presented vs issued.
pub(super) async fn keys(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    let view = key_view(&state, &headers, user.role >= Role::Operator).await?;
    let (pki_dir, keys) = view.map_or((None, Vec::new()), |(d, k)| (Some(d), k));
    let groups: Vec<_> = ["pending", "accepted", "rejected", "denied"]
        .into_iter()
        .map(|st| {
            let ks: Vec<&Key> = keys.iter().filter(|k| k.state == st).collect();
            minijinja::context! { state => st, keys => ks }
        })
        .collect();
    render(
        "keys.html",
        &minijinja::context! { user => Frame::of(&user), nav => "keys", title => "Keys", pki_dir, groups },
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfirmQuery {
    action: Option<String>,
}

/// `GET /keys/{minion}/confirm?action=accept|reject` (operator): the key
/// once more, and the form that posts to the API.
pub(super) async fn confirm_key(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(minion): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    need(&user, Role::Operator)?;
    let q: ConfirmQuery = query(q.as_deref())?;
    let action = match q.action.as_deref() {
        Some(a @ ("accept" | "reject")) => a,
        Some(other) => {
            return Err(ApiError::bad_request(format!("action={other:?}: accept or reject")).into())
        }
        None => {
            return Err(ApiError::bad_request("action=accept or action=reject is missing").into())
        }
    };
    let keys = key_view(&state, &headers, true)
        .await?
        .map(|(_, k)| k)
        .unwrap_or_default();
    let Some(key) = keys.into_iter().find(|k| k.minion_id == minion) else {
        return Err(ApiError::new(
            "not_found",
            format!("the master has no key of minion {minion:?}"),
        )
        .into());
    };
    let post = format!("/api/v1/keys/{}/{action}", seg(&minion));
    render(
        "confirm.html",
        &minijinja::context! { user => Frame::of(&user), nav => "keys", title => "Confirm", key, action, post },
    )
}

// ------------------------------------------------------------ dispatches

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DispatchQuery {
    status: Option<String>,
}

/// The dispatch table (page and fragment): every target with its retry
/// form, and the fragment's URL (with the same filter).
async fn dispatches_data(
    state: &HttpState,
    q: DispatchQuery,
    can_write: bool,
) -> Result<minijinja::Value, PageError> {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<DispatchStatus>().map_err(ApiError::from)?),
    };
    let targets = state.service.store().dispatch_targets(status).await?;
    let rows: Vec<_> = targets
        .into_iter()
        .map(|t| {
            let link = format!("/servers/{}", seg(&t.server));
            let retry = format!("/api/v1/dispatches/{}/retry", seg(&t.server));
            minijinja::context! { t, link, retry }
        })
        .collect();
    let status_text = q.status.unwrap_or_default();
    let fragment = format!(
        "/fragments/dispatches?{}",
        serde_urlencoded::to_string([("status", status_text.as_str())]).unwrap_or_default()
    );
    Ok(minijinja::context! { rows, status => status_text, fragment, can_write })
}

/// `GET /dispatches?status=`: every target, with a retry form per server;
/// the table refreshed live.
pub(super) async fn dispatches(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    let data = dispatches_data(&state, query(q.as_deref())?, user.role >= Role::Operator).await?;
    let statuses: Vec<&str> = DispatchStatus::ALL.iter().map(|s| s.as_str()).collect();
    render(
        "dispatches.html",
        &minijinja::context! {
            user => Frame::of(&user), nav => "dispatches", title => "Dispatches", data, statuses,
        },
    )
}

/// `GET /fragments/dispatches?status=`: the dispatch table alone.
pub(super) async fn dispatches_fragment(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    let data = dispatches_data(&state, query(q.as_deref())?, user.role >= Role::Operator).await?;
    let html = render_text("dispatches_fragment.html", &minijinja::context! { data })?;
    Ok(Html(html).into_response())
}

// --------------------------------------------------------------- backups

/// `GET /backups`: each backup green or red, with its last results.
pub(super) async fn backups(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    let mut rows = Vec::new();
    for (b, h, _) in state
        .service
        .backups_with_health(state.backup_stale_ms)
        .await?
    {
        let results = state.service.backup_results(b.id, 5).await?;
        rows.push(minijinja::context! { backup => b, health => h.as_str(), results });
    }
    render(
        "backups.html",
        &minijinja::context! { user => Frame::of(&user), nav => "backups", title => "Backups", rows },
    )
}

// ----------------------------------------------------------------- rules

/// `GET /rules`: the rules engine's report (`GET /api/v1/rules`): loaded
/// files, rules with their counters, the last load's errors with
/// file:line:column, warnings; a note when the daemon gave none.
pub(super) async fn rules(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    let report = match crate::api::http::rules::report(&state) {
        Ok(r) => Some(r),
        Err(e) if e.code == "unavailable" => None,
        Err(e) => return Err(e.into()),
    };
    // The totals as name/value rows, whatever counters the engine keeps.
    let counters: Vec<(String, String)> = report
        .as_ref()
        .and_then(|r| r.get("counters"))
        .and_then(JsonValue::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect())
        .unwrap_or_default();
    let list = |k: &str| -> Vec<JsonValue> {
        report
            .as_ref()
            .and_then(|r| r.get(k))
            .and_then(JsonValue::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let text = |k: &str| {
        report
            .as_ref()
            .and_then(|r| r.get(k))
            .and_then(JsonValue::as_str)
            .map(str::to_owned)
    };
    let loaded_at = report
        .as_ref()
        .and_then(|r| r.get("loaded_at"))
        .and_then(JsonValue::as_i64);
    render(
        "rules.html",
        &minijinja::context! {
            user => Frame::of(&user), nav => "rules", title => "Rules",
            available => report.is_some(), dir => text("dir"), loaded_at,
            files => list("files"), rules => list("rules"), errors => list("errors"),
            warnings => list("warnings"), counters,
        },
    )
}

// -------------------------------------------------------------- activity

/// How many entries of each source the activity page reads (and shows).
const ACTIVITY_ROWS: usize = 50;

/// One line of the activity page.
#[derive(Debug, Serialize)]
struct Activity {
    at: i64,
    kind: &'static str,
    who: String,
    what: String,
    target: String,
    outcome: String,
    link: Option<String>,
}

/// What happened lately, newest first: audit entries (admins only, as
/// `GET /api/v1/audit`), exec records and the dispatch targets' last runs
/// — what the registry already keeps, merged.
async fn activity_data(state: &HttpState, user: &User) -> Result<Vec<Activity>, PageError> {
    let rows = i64::try_from(ACTIVITY_ROWS).unwrap_or(i64::MAX);
    let mut out = Vec::new();
    if user.role >= Role::Admin {
        for e in state.service.audit_log(None, rows).await? {
            out.push(Activity {
                at: e.at,
                kind: "audit",
                who: e.actor,
                what: e.action,
                target: e.target,
                outcome: String::new(),
                link: None,
            });
        }
    }
    for x in crate::exec::history(&state.service, None, None, rows).await? {
        let detail = x.error.clone().or(x.jid.clone()).unwrap_or_default();
        out.push(Activity {
            at: x.finished_at.unwrap_or(x.created_at),
            kind: "exec",
            who: x.requested_by,
            what: x.fun,
            link: Some(format!("/servers/{}", seg(&x.server))),
            target: x.server,
            outcome: if detail.is_empty() {
                x.outcome
            } else {
                format!("{}: {detail}", x.outcome)
            },
        });
    }
    let mut targets: Vec<_> = state
        .service
        .store()
        .dispatch_targets(None)
        .await?
        .into_iter()
        .filter_map(|t| {
            let at = t.started_at.max(t.last_applied_at)?;
            Some((at, t))
        })
        .collect();
    targets.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    targets.truncate(ACTIVITY_ROWS);
    for (at, t) in targets {
        out.push(Activity {
            at,
            kind: "dispatch",
            who: "dispatcher".to_owned(),
            what: format!("state {}", t.state),
            link: Some(format!("/servers/{}", seg(&t.server))),
            target: t.server,
            outcome: match (&t.last_error, &t.last_jid) {
                (Some(e), _) => format!("{}: {e}", t.status.as_str()),
                (None, Some(j)) => format!("{} ({j})", t.status.as_str()),
                (None, None) => t.status.as_str().to_owned(),
            },
        });
    }
    out.sort_by_key(|a| std::cmp::Reverse(a.at));
    out.truncate(ACTIVITY_ROWS);
    Ok(out)
}

/// `GET /activity`: the latest audit entries (admins), exec records and
/// dispatch runs, newest first, refreshed live.
pub(super) async fn activity(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    let items = activity_data(&state, &user).await?;
    render(
        "activity.html",
        &minijinja::context! { user => Frame::of(&user), nav => "activity", title => "Activity", items },
    )
}

/// `GET /fragments/activity`: the activity list alone.
pub(super) async fn activity_fragment(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    let items = activity_data(&state, &user).await?;
    let html = render_text("activity_fragment.html", &minijinja::context! { items })?;
    Ok(Html(html).into_response())
}

// ---------------------------------------------------------- audit, admin

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    before: Option<i64>,
}

/// `GET /audit?before=` (admin): the audit log, newest first.
pub(super) async fn audit(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    need(&user, Role::Admin)?;
    let q: AuditQuery = query(q.as_deref())?;
    let mut entries = state.service.audit_log(q.before, AUDIT_PAGE + 1).await?;
    let more = entries.len() > usize::try_from(AUDIT_PAGE).unwrap_or(usize::MAX);
    entries.truncate(usize::try_from(AUDIT_PAGE).unwrap_or(usize::MAX));
    let next = if more {
        entries.last().map(|e| e.id)
    } else {
        None
    };
    let entries: Vec<_> = entries
        .into_iter()
        .map(|e| {
            let detail = e.detail.to_string();
            minijinja::context! { e, detail }
        })
        .collect();
    render(
        "audit.html",
        &minijinja::context! { user => Frame::of(&user), nav => "audit", title => "Audit", entries, next },
    )
}

/// `GET /admin` (admin): users and API tokens (never their secrets).
pub(super) async fn admin(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let user = page_user(&state, &headers).await?;
    need(&user, Role::Admin)?;
    let users = state.service.list_users().await?;
    let tokens = state.service.list_tokens().await?;
    render(
        "admin.html",
        &minijinja::context! { user => Frame::of(&user), nav => "admin", title => "Admin", users, tokens },
    )
}
