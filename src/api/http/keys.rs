//! `GET /api/v1/keys`: the master's minion keys as its pki directory holds
//! them — accepted (`minions/`), pending (`minions_pre/`), rejected
//! (`minions_rejected/`) and denied (`minions_denied/`) — each with the
//! fingerprint of the key presented (`salt-key -F`, sha256) beside the one
//! the registry issued for that minion id (`key_fingerprint`), and whether
//! they match.
//!
//! Read only: accepting and rejecting stay with the acceptor
//! (`dispatch::accept`) and `salt-key`; the daemon serves one master, so
//! the list has one entry. Without the master's pki directory (an API not
//! run by the daemon) the answer is 503.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, Method};
use axum::Json;
use serde_json::{json, Value as JsonValue};

use super::auth;
use super::error::ApiError;
use super::openapi::ErrorBody;
use super::HttpState;
use crate::pki::keys::fingerprint;
use crate::registry::users::Role;
use crate::registry::ServerFilter;

/// The key directories under the pki dir, by the state they mean.
const DIRS: [(&str, &str); 4] = [
    ("accepted", "minions"),
    ("pending", "minions_pre"),
    ("rejected", "minions_rejected"),
    ("denied", "minions_denied"),
];

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

/// `GET /api/v1/keys`: the master's keys by state, each with the presented
/// and the issued fingerprint.
#[utoipa::path(get, path = "/api/v1/keys", tag = "keys",
    responses((status = 200, description = "`{items: [{pki_dir, accepted, pending, rejected, denied}]}`; each key `{minion_id, fingerprint, issued_fingerprint, matches, server}`", body = Object),
        (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn list_keys(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    let Some(pki_dir) = state.pki_dir.clone() else {
        return Err(ApiError::new(
            "unavailable",
            "the keys need the daemon's master pki directory",
        ));
    };
    let issued: HashMap<String, (String, Option<String>)> = state
        .service
        .find_servers(&ServerFilter::default())
        .await?
        .into_iter()
        .map(|s| (s.minion_id, (s.name, s.key_fingerprint)))
        .collect();
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

type KeyDirs = (PathBuf, Vec<Vec<(String, Option<String>)>>);

fn read_all(pki_dir: &Path) -> std::io::Result<KeyDirs> {
    let mut all = Vec::new();
    for (_, sub) in DIRS {
        all.push(read_dir(&pki_dir.join(sub))?);
    }
    Ok((pki_dir.to_owned(), all))
}
