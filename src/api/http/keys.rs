//! `GET /api/v1/keys`: the master's minion keys as its pki directory holds
//! them — accepted (`minions/`), pending (`minions_pre/`), rejected
//! (`minions_rejected/`) and denied (`minions_denied/`) — each with the
//! fingerprint of the key presented (`salt-key -F`, sha256) beside the one
//! the registry issued for that minion id (`key_fingerprint`), and whether
//! they match.
//!
//! `POST /api/v1/keys/{minion}/accept|reject` decide one key by hand (the
//! dashboard's confirmation step): accept only what the acceptor
//! (`dispatch::accept`) would — a pending key that is, as text, the key
//! the registry issued for that minion id — and reject a pending or
//! accepted key, with the same wheel calls (`key.accept_dict`,
//! `key.reject_dict`); every decision and every refused accept is audited.
//! A plain form post (`application/x-www-form-urlencoded`) with a `next`
//! path of this site is answered with a 303 there.
//!
//! The daemon serves one master, so the list has one entry. Without the
//! master's pki directory and request client (an API not run by the
//! daemon) the answer is 503.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as AxPath, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value as JsonValue};

use super::auth;
use super::error::ApiError;
use super::inventory::audit;
use super::openapi::ErrorBody;
use super::HttpState;
use crate::pki::keys::{clean_key, fingerprint};
use crate::registry::users::Role;
use crate::registry::{ServerFilter, Status};
use crate::salt::{is_key_file_name, wheel, ReqClient};

/// The key directories under the pki dir, by the state they mean.
const DIRS: [(&str, &str); 4] = [
    ("accepted", "minions"),
    ("pending", "minions_pre"),
    ("rejected", "minions_rejected"),
    ("denied", "minions_denied"),
];

/// Servers read per registry query.
const SERVER_PAGE: i64 = 500;

/// One key file: its minion id and the fingerprint of the key in it.
fn read_dir(dir: &Path) -> std::io::Result<Vec<(String, Option<String>)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if id.starts_with('.') {
            continue;
        }
        let fp = std::fs::read_to_string(entry.path())
            .ok()
            .map(|pem| fingerprint(&pem));
        out.push((id, fp));
    }
    out.sort();
    Ok(out)
}

/// `GET /keys` filter.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysQuery {
    state: Option<String>,
}

/// `GET /api/v1/keys`: the master's keys by state, each with the presented
/// and the issued fingerprint.
#[utoipa::path(get, path = "/api/v1/keys", tag = "keys",
    params(("state" = Option<String>, Query, description = "Filter: accepted, pending, rejected or denied (the other lists are left out)")),
    responses((status = 200, description = "`{items: [{pki_dir, accepted, pending, rejected, denied}]}`; each key `{minion_id, fingerprint, issued_fingerprint, matches, server}`", body = Object),
        (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn list_keys(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    let q: KeysQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    if let Some(s) = q.state.as_deref() {
        if !DIRS.iter().any(|(name, _)| *name == s) {
            return Err(ApiError::bad_request(format!(
                "state {s:?}: accepted, pending, rejected or denied"
            )));
        }
    }
    let Some(pki_dir) = state.pki_dir.clone() else {
        return Err(ApiError::new(
            "unavailable",
            "the keys need the daemon's master pki directory",
        ));
    };
    // The issued fingerprints, read by bounded pages.
    let mut issued: HashMap<String, (String, Option<String>)> = HashMap::new();
    let mut pages = state
        .service
        .server_pages(ServerFilter::default(), SERVER_PAGE);
    while let Some(servers) = pages.next().await? {
        issued.extend(
            servers
                .into_iter()
                .map(|s| (s.minion_id, (s.name, s.key_fingerprint))),
        );
    }
    let dirs = tokio::task::spawn_blocking(move || read_all(&pki_dir))
        .await
        .map_err(|e| ApiError::new("internal", e.to_string()))?
        .map_err(|e| {
            tracing::error!(message = "Reading the master's key directories failed.", error = %e);
            ApiError::new("internal", "reading the master's key directories failed")
        })?;
    let mut entry = serde_json::Map::new();
    entry.insert("pki_dir".to_owned(), json!(dirs.0));
    for ((state_name, _), keys) in DIRS.iter().zip(dirs.1) {
        if q.state.as_deref().is_some_and(|s| s != *state_name) {
            continue;
        }
        let keys: Vec<JsonValue> = keys
            .into_iter()
            .map(|(id, fp)| {
                let (server, want) = issued
                    .get(&id)
                    .map_or((None, None), |(n, f)| (Some(n.clone()), f.clone()));
                let matches = match (&fp, &want) {
                    (Some(a), Some(b)) => Some(a == b),
                    _ => None,
                };
                json!({"minion_id": id, "fingerprint": fp, "issued_fingerprint": want,
                       "matches": matches, "server": server})
            })
            .collect();
        entry.insert((*state_name).to_owned(), JsonValue::Array(keys));
    }
    Ok(Json(json!({"items": [entry], "next": null})))
}

/// The key files of one state (`accepted`, `pending` …): minion id and text.
pub(super) type KeyTexts = (&'static str, Vec<(String, String)>);

/// Every key file of the master by state, with its text (the alerts
/// compare it with the issued key).
pub(super) fn read_keys(pki_dir: &Path) -> std::io::Result<Vec<KeyTexts>> {
    let mut out = Vec::new();
    for (state_name, sub) in DIRS {
        let mut keys = Vec::new();
        for (id, _) in read_dir(&pki_dir.join(sub))? {
            match std::fs::read_to_string(pki_dir.join(sub).join(&id)) {
                Ok(text) => keys.push((id, text)),
                // Decided (moved) meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        out.push((state_name, keys));
    }
    Ok(out)
}

type KeyDirs = (PathBuf, Vec<Vec<(String, Option<String>)>>);

fn read_all(pki_dir: &Path) -> std::io::Result<KeyDirs> {
    let mut all = Vec::new();
    for (_, sub) in DIRS {
        all.push(read_dir(&pki_dir.join(sub))?);
    }
    Ok((pki_dir.to_owned(), all))
}

// ------------------------------------------------------ accept / reject

/// What an accept or reject may carry: as JSON, or as the dashboard's
/// plain form (`application/x-www-form-urlencoded`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyDecision {
    /// The fingerprint the operator confirmed: refused when the pending
    /// key is no longer that one.
    fingerprint: Option<String>,
    /// Forms only: where to go after (a path of this site).
    next: Option<String>,
}

/// Whether the body was a form (the answer is then a 303 to `next`).
fn read_decision(headers: &HeaderMap, body: &[u8]) -> Result<(KeyDecision, bool), ApiError> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ctype.starts_with("application/x-www-form-urlencoded") {
        let d: KeyDecision = serde_urlencoded::from_bytes(body)
            .map_err(|e| ApiError::bad_request(format!("form {{fingerprint?, next?}}: {e}")))?;
        return Ok((d, true));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((KeyDecision::default(), false));
    }
    let d: KeyDecision = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body: {{fingerprint?}}: {e}")))?;
    if d.next.is_some() {
        return Err(ApiError::bad_request(
            "next is for forms: a JSON request gets a JSON reply",
        ));
    }
    Ok((d, false))
}

/// `next` when it is a path of this site (`/…`, not `//host` nor `/\host`).
fn local_path(next: Option<&str>) -> Option<&str> {
    next.filter(|n| {
        n.starts_with('/')
            && !n.starts_with("//")
            && !n.starts_with("/\\")
            && !n.chars().any(|c| c.is_control())
    })
}

/// Where a form's decision sends the browser: `next` when it is a path of
/// this site, else nowhere (a JSON reply). Checked before anything moves.
fn redirect_to(form: bool, next: Option<&str>) -> Result<Option<HeaderValue>, ApiError> {
    match local_path(next) {
        Some(path) if form => {
            let refused = || {
                ApiError::bad_request(
                    "next: a path of this site in visible ASCII (percent-encoded)",
                )
            };
            if !path.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(refused());
            }
            HeaderValue::from_str(path).map(Some).map_err(|_| refused())
        }
        _ => Ok(None),
    }
}

/// The reply to a done decision: a 303 to `location`, else JSON.
fn decided(location: Option<HeaderValue>, reply: JsonValue) -> Response {
    match location {
        Some(location) => (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response(),
        None => Json(reply).into_response(),
    }
}

/// The master's pki dir and request client, or 503.
fn master_of(state: &HttpState) -> Result<(PathBuf, ReqClient), ApiError> {
    match (&state.pki_dir, &state.wheel) {
        (Some(dir), Some(req)) => Ok((dir.clone(), req.clone())),
        _ => Err(ApiError::new(
            "unavailable",
            "deciding keys needs the daemon's master (pki directory and request client)",
        )),
    }
}

fn check_id(minion: &str) -> Result<(), ApiError> {
    if is_key_file_name(minion) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{minion:?} is not a minion id"
        )))
    }
}

/// The key file `<pki_dir>/<dir>/<minion>`; `None` when there is none.
async fn key_file(pki_dir: &Path, dir: &str, minion: &str) -> Result<Option<String>, ApiError> {
    let path = pki_dir.join(dir).join(minion);
    match tokio::fs::read_to_string(&path).await {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            tracing::error!(message = "Reading a key file failed.", path = %path.display(), error = %e);
            Err(ApiError::new(
                "internal",
                format!("reading the master's {dir}/{minion} failed"),
            ))
        }
    }
}

/// Calls a `key.*_dict` wheel function; the ids the master reports moved.
async fn wheel_dict(
    req: &ReqClient,
    fun: &str,
    matches: JsonValue,
    include_accepted: bool,
) -> Result<Vec<String>, ApiError> {
    let mut kwarg = Map::new();
    kwarg.insert("match".to_owned(), matches);
    if include_accepted {
        kwarg.insert("include_accepted".to_owned(), JsonValue::Bool(true));
    }
    let r = wheel(req, fun, Vec::new(), kwarg)
        .await
        .map_err(|e| ApiError::new("publish_failed", format!("{fun} on the master: {e}")))?;
    if !r.success {
        return Err(ApiError::new(
            "publish_failed",
            format!("{fun} on the master failed: {}", r.ret),
        ));
    }
    Ok(r.ret
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(JsonValue::as_array)
        .flatten()
        .filter_map(JsonValue::as_str)
        .map(str::to_owned)
        .collect())
}

/// A refusal: audited (who tried what), then the error.
async fn refuse(
    state: &HttpState,
    p: &auth::Principal,
    minion: &str,
    e: ApiError,
    presented: Option<String>,
) -> ApiError {
    audit(
        state,
        p,
        "key.accept_refused",
        minion.to_owned(),
        json!({"code": e.code, "presented_fingerprint": presented}),
    )
    .await;
    e
}

/// `POST /api/v1/keys/{minion}/accept`: accepts the pending key of
/// `minion` only when it is, as text, the key the registry issued for a
/// registered server with that minion id (what the acceptor checks);
/// anything else is a 409 and nothing moves.
#[utoipa::path(post, path = "/api/v1/keys/{minion}/accept", tag = "keys",
    params(("minion" = String, Path, description = "The minion id")),
    request_body(content = Object, description = "Optional `{fingerprint}`: the presented fingerprint the operator confirmed. Also as a form, with `next`: a path of this site to be sent to (303)"),
    responses((status = 200, description = "`{minion_id, state: accepted, fingerprint, server}`", body = Object),
        (status = 303, description = "A form's `next`"),
        (status = 409, description = "`not_pending`, `unknown_minion`, `not_issued`, `key_mismatch` or `key_changed`: nothing moved", body = ErrorBody),
        (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn accept_key(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    AxPath(minion): AxPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    check_id(&minion)?;
    let (d, form) = read_decision(&headers, &body)?;
    let location = redirect_to(form, d.next.as_deref())?;
    let (pki_dir, req) = master_of(&state)?;
    let Some(text) = key_file(&pki_dir, "minions_pre", &minion).await? else {
        let e = ApiError::new("not_pending", format!("no key of {minion} is pending"));
        return Err(refuse(&state, &p, &minion, e, None).await);
    };
    let presented = clean_key(&text);
    let presented_fp = fingerprint(&presented);
    let Some(server) = state.service.server_by_minion_id(&minion).await? else {
        let e = ApiError::new(
            "unknown_minion",
            format!("no server of the registry has minion id {minion}: its key is not accepted"),
        );
        return Err(refuse(&state, &p, &minion, e, Some(presented_fp)).await);
    };
    let Some(issued) = server.public_key.as_deref().map(clean_key) else {
        let e = ApiError::new(
            "not_issued",
            format!(
                "the registry issued no key for {} ({minion}): nothing to compare with",
                server.name
            ),
        );
        return Err(refuse(&state, &p, &minion, e, Some(presented_fp)).await);
    };
    if issued != presented {
        let e = ApiError::new(
            "key_mismatch",
            format!(
                "the pending key of {minion} ({presented_fp}) is not the one issued for {} ({})",
                server.name,
                fingerprint(&issued)
            ),
        );
        return Err(refuse(&state, &p, &minion, e, Some(presented_fp)).await);
    }
    if let Some(want) = d.fingerprint.as_deref() {
        if want.trim() != presented_fp {
            let e = ApiError::new(
                "key_changed",
                format!("the pending key of {minion} is {presented_fp}, not the {want} confirmed"),
            );
            return Err(refuse(&state, &p, &minion, e, Some(presented_fp)).await);
        }
    }
    let moved = wheel_dict(
        &req,
        "key.accept_dict",
        json!({"minions_pre": [&minion]}),
        false,
    )
    .await?;
    if !moved.iter().any(|m| m == &minion) {
        let e = ApiError::new(
            "not_pending",
            format!("the master accepted no key of {minion} (decided meanwhile?)"),
        );
        return Err(refuse(&state, &p, &minion, e, Some(presented_fp)).await);
    }
    // `accept_dict` accepts whatever is pending at the time of the call: a
    // key presented anew since it was compared is deleted again.
    let accepted = key_file(&pki_dir, "minions", &minion).await?;
    if accepted.as_deref().map(clean_key).as_deref() != Some(issued.as_str()) {
        let held = accepted.as_deref().map(fingerprint);
        wheel_dict(
            &req,
            "key.delete_dict",
            json!({"minions": [&minion]}),
            false,
        )
        .await?;
        let e = ApiError::new(
            "key_mismatch",
            format!("the key of {minion} changed while it was accepted; it was deleted again"),
        );
        return Err(refuse(&state, &p, &minion, e, held).await);
    }
    if let Err(e) = state.service.set_status(&server, Status::Registered).await {
        tracing::warn!(message = "Key accepted; status not recorded.", minion_id = %minion, error = %e);
    }
    audit(
        &state,
        &p,
        "key.accept",
        format!("#{} {} {minion}", server.id, server.name),
        json!({"fingerprint": presented_fp}),
    )
    .await;
    tracing::info!(message = "Minion key verified and accepted over HTTP.", minion_id = %minion, actor = %p.actor());
    Ok(decided(
        location,
        json!({"minion_id": minion, "state": "accepted", "fingerprint": presented_fp, "server": server.name}),
    ))
}

/// `POST /api/v1/keys/{minion}/reject`: moves the pending or accepted key
/// of `minion` to rejected (`key.reject_dict`, as the acceptor does).
#[utoipa::path(post, path = "/api/v1/keys/{minion}/reject", tag = "keys",
    params(("minion" = String, Path, description = "The minion id")),
    request_body(content = Object, description = "Optional `{fingerprint}`: the fingerprint the operator confirmed. Also as a form, with `next` (303)"),
    responses((status = 200, description = "`{minion_id, state: rejected, fingerprint, was}`", body = Object),
        (status = 303, description = "A form's `next`"),
        (status = 409, description = "`not_pending` (no pending or accepted key) or `key_changed`: nothing moved", body = ErrorBody),
        (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn reject_key(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    AxPath(minion): AxPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    check_id(&minion)?;
    let (d, form) = read_decision(&headers, &body)?;
    let location = redirect_to(form, d.next.as_deref())?;
    let (pki_dir, req) = master_of(&state)?;
    let (was, text) = match key_file(&pki_dir, "minions_pre", &minion).await? {
        Some(t) => ("pending", t),
        None => match key_file(&pki_dir, "minions", &minion).await? {
            Some(t) => ("accepted", t),
            None => {
                return Err(ApiError::new(
                    "not_pending",
                    format!("{minion} has no pending or accepted key"),
                ))
            }
        },
    };
    let fp = fingerprint(&text);
    if let Some(want) = d.fingerprint.as_deref() {
        if want.trim() != fp {
            return Err(ApiError::new(
                "key_changed",
                format!("the {was} key of {minion} is {fp}, not the {want} confirmed"),
            ));
        }
    }
    let dir = if was == "pending" {
        "minions_pre"
    } else {
        "minions"
    };
    let mut matches = Map::new();
    matches.insert(dir.to_owned(), json!([&minion]));
    let moved = wheel_dict(
        &req,
        "key.reject_dict",
        JsonValue::Object(matches),
        was == "accepted",
    )
    .await?;
    if !moved.iter().any(|m| m == &minion) {
        return Err(ApiError::new(
            "not_pending",
            format!("the master rejected no key of {minion} (decided meanwhile?)"),
        ));
    }
    audit(
        &state,
        &p,
        "key.reject",
        minion.clone(),
        json!({"fingerprint": fp, "was": was}),
    )
    .await;
    tracing::info!(message = "Minion key rejected over HTTP.", minion_id = %minion, was, actor = %p.actor());
    Ok(decided(
        location,
        json!({"minion_id": minion, "state": "rejected", "fingerprint": fp, "was": was}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_path_of_this_site_is_a_redirect() {
        for ok in ["/", "/keys", "/keys?master=1", "/a/b#c"] {
            assert!(redirect_to(true, Some(ok)).unwrap().is_some(), "{ok}");
            // A JSON request is answered in JSON whatever it says.
            assert!(redirect_to(false, Some(ok)).unwrap().is_none(), "{ok}");
        }
        for off in [
            "//evil.example/",
            "/\\evil.example",
            "https://evil.example/",
            "keys",
            "",
            "/a\nb",
        ] {
            assert!(redirect_to(true, Some(off)).unwrap().is_none(), "{off:?}");
        }
        assert!(redirect_to(true, None).unwrap().is_none());
        // Local but not sendable as a header: refused before anything moves.
        assert_eq!(
            redirect_to(true, Some("/clés")).unwrap_err().code,
            "bad_request"
        );
    }

    #[test]
    fn a_decision_is_json_or_a_form_and_nothing_else() {
        let h = |ct: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            m
        };
        let (d, form) = read_decision(&HeaderMap::new(), b"").unwrap();
        assert!(!form && d.fingerprint.is_none());
        let (d, form) = read_decision(&h("application/json"), br#"{"fingerprint":"aa"}"#).unwrap();
        assert!(!form && d.fingerprint.as_deref() == Some("aa"));
        let (d, form) = read_decision(
            &h("application/x-www-form-urlencoded"),
            b"fingerprint=aa%3Abb&next=%2Fkeys",
        )
        .unwrap();
        assert!(form && d.fingerprint.as_deref() == Some("aa:bb"));
        assert_eq!(d.next.as_deref(), Some("/keys"));
        for (ct, body) in [
            ("application/json", &br#"{"next":"/keys"}"#[..]),
            ("application/json", br#"{"other":1}"#),
            ("application/x-www-form-urlencoded", b"other=1"),
            ("text/plain", b"fingerprint"),
        ] {
            assert_eq!(
                read_decision(&h(ct), body).unwrap_err().code,
                "bad_request",
                "{ct} {body:?}"
            );
        }
    }
}
