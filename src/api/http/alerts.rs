//! `GET /api/v1/alerts`: the attention list — what an operator should look
//! at now, computed in one place ([`collect`]) for the API and the
//! dashboard's overview:
//!
//! - `key_mismatch` (critical): a key on the master (pending, accepted or
//!   denied) for a registry minion id that is not the key issued for it;
//! - `unknown_minion` (warning): a pending key of a minion id no server
//!   has; `denied_minion` (warning): a denied key of an unknown id;
//! - `dispatch_failed` (critical), `dispatch_stuck` (warning: running or
//!   pending longer than [`STUCK_MS`]);
//! - `backup_red` (critical: stale, empty or failed), `backup_never_run`
//!   (warning);
//! - `rule_error` (critical): a problem of the last rules load, with
//!   `file:line:column`;
//! - `server_not_seen` (warning): a server offline, or registered (its
//!   key accepted) without answering for [`NOT_SEEN_MS`].
//!
//! Each kind lists at most [`PER_KIND`] items, then one item saying how
//! many more there are. Registry reads go by bounded pages.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, Method};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value as JsonValue};

use super::auth;
use super::error::ApiError;
use super::openapi::ErrorBody;
use super::HttpState;
use crate::pki::keys::clean_key;
use crate::registry::backup::Health;
use crate::registry::dispatch::DispatchStatus;
use crate::registry::store::DispatchStore as _;
use crate::registry::users::Role;
use crate::registry::{ServerFilter, Status};

/// A dispatch target running or pending longer than this is stuck.
pub(crate) const STUCK_MS: i64 = 30 * 60 * 1000;
/// A registered server silent this long (since its last change) is "not
/// seen".
pub(crate) const NOT_SEEN_MS: i64 = 60 * 60 * 1000;
/// Items listed per kind; the rest are counted in one more item.
pub(crate) const PER_KIND: usize = 100;
/// Rows read per registry query.
const PAGE: i64 = 500;

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Severity {
    /// Something is wrong now (a foreign key, a failure, a red backup).
    Critical,
    /// Something to look at (an unknown minion, a silent server).
    Warning,
}

/// One item of the attention list.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Alert {
    /// What kind of problem (`key_mismatch`, `dispatch_failed` …).
    pub kind: &'static str,
    /// How urgent.
    pub severity: Severity,
    /// What it is about: a minion id, a server, `server/state`, a backup,
    /// a rule file's `file:line:column`.
    pub subject: String,
    /// For people.
    pub message: String,
    /// Since when, Unix ms, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
}

/// The alerts gathered, [`PER_KIND`] at most per kind.
#[derive(Default)]
struct List {
    items: Vec<Alert>,
    counts: HashMap<&'static str, (usize, Severity)>,
}

impl List {
    fn push(
        &mut self,
        kind: &'static str,
        severity: Severity,
        subject: String,
        message: String,
        since: Option<i64>,
    ) {
        let n = self.counts.entry(kind).or_insert((0, severity));
        n.0 += 1;
        if n.0 <= PER_KIND {
            self.items.push(Alert {
                kind,
                severity,
                subject,
                message,
                since,
            });
        }
    }

    fn finish(mut self) -> Vec<Alert> {
        let mut more: Vec<_> = self
            .counts
            .iter()
            .filter(|(_, (n, _))| *n > PER_KIND)
            .map(|(k, (n, s))| (*k, *n, *s))
            .collect();
        more.sort_by_key(|(k, _, _)| *k);
        for (kind, n, severity) in more {
            self.items.push(Alert {
                kind,
                severity,
                subject: "…".to_owned(),
                message: format!("and {} more", n - PER_KIND),
                since: None,
            });
        }
        // Critical first, then by kind; each kind in the order found.
        self.items
            .sort_by_key(|a| (a.severity != Severity::Critical, a.kind));
        self.items
    }
}

/// The attention list now: keys (when the state has the master's pki
/// directory), dispatches, backups, rule errors (when it has the rules
/// engine) and silent servers; critical first. What the dashboard's
/// overview shows and `GET /api/v1/alerts` returns.
pub(crate) async fn collect(state: &HttpState) -> Result<Vec<Alert>, ApiError> {
    let now = state.now();
    let mut list = List::default();
    keys(state, &mut list).await?;
    dispatches(state, now, &mut list).await?;
    for (b, health, last) in state
        .service
        .backups_with_health(state.backup_stale_ms)
        .await?
    {
        let subject = format!(
            "#{} {}:{} → {}:{}",
            b.id, b.source, b.source_folder, b.dest, b.dest_folder
        );
        match health {
            Health::Red => {
                let why = match &last {
                    Some(r) => format!("last run {:?} ({} files)", r.outcome, r.files.unwrap_or(0)),
                    None => "no result".to_owned(),
                };
                list.push(
                    "backup_red",
                    Severity::Critical,
                    subject,
                    format!("no recent successful backup with data: {why}"),
                    last.as_ref().map(|r| r.started_at),
                );
            }
            Health::NeverRun if b.active => list.push(
                "backup_never_run",
                Severity::Warning,
                subject,
                "this backup has never run".to_owned(),
                None,
            ),
            _ => {}
        }
    }
    if let Some(source) = &state.rules {
        let report = source();
        for e in report["errors"].as_array().into_iter().flatten() {
            list.push(
                "rule_error",
                Severity::Critical,
                e["at"].as_str().unwrap_or("rules").to_owned(),
                e["message"].as_str().unwrap_or("").to_owned(),
                report["loaded_at"].as_i64(),
            );
        }
    }
    silent_servers(state, now, &mut list).await?;
    Ok(list.finish())
}

/// Keys on the master that the registry did not issue.
async fn keys(state: &HttpState, list: &mut List) -> Result<(), ApiError> {
    let Some(pki_dir) = state.pki_dir.clone() else {
        return Ok(());
    };
    let held = tokio::task::spawn_blocking(move || super::keys::read_keys(&pki_dir))
        .await
        .map_err(|e| ApiError::new("internal", e.to_string()))?
        .map_err(|e| {
            tracing::error!(message = "Reading the master's key directories failed.", error = %e);
            ApiError::new("internal", "reading the master's key directories failed")
        })?;
    if held.iter().all(|(_, keys)| keys.is_empty()) {
        return Ok(());
    }
    // The issued keys, read by pages.
    let mut issued: HashMap<String, (String, Option<String>)> = HashMap::new();
    let mut pages = state.service.server_pages(ServerFilter::default(), PAGE);
    while let Some(servers) = pages.next().await? {
        for s in servers {
            issued.insert(s.minion_id, (s.name, s.public_key.map(|k| clean_key(&k))));
        }
    }
    for (dir, keys) in held {
        for (id, text) in keys {
            match issued.get(&id) {
                Some((name, Some(want))) if clean_key(&text) != *want => list.push(
                    "key_mismatch",
                    Severity::Critical,
                    id.clone(),
                    format!(
                        "the {dir} key of {id} ({}) is not the key issued for {name}",
                        crate::pki::fingerprint(&text)
                    ),
                    None,
                ),
                Some(_) => {}
                None if dir == "pending" => list.push(
                    "unknown_minion",
                    Severity::Warning,
                    id.clone(),
                    format!("a key of {id}, a minion id no server has, is pending"),
                    None,
                ),
                None if dir == "denied" => list.push(
                    "denied_minion",
                    Severity::Warning,
                    id.clone(),
                    format!("the master denied a key of {id}, a minion id no server has"),
                    None,
                ),
                None => {}
            }
        }
    }
    Ok(())
}

/// Failed dispatch targets, and those running or pending too long.
async fn dispatches(state: &HttpState, now: i64, list: &mut List) -> Result<(), ApiError> {
    let store = state.service.store();
    for status in [
        DispatchStatus::Failed,
        DispatchStatus::Running,
        DispatchStatus::Pending,
    ] {
        let mut after = 0;
        loop {
            let mut page = store
                .dispatch_targets_page(Some(status), None, after, PAGE)
                .await?;
            let full = i64::try_from(page.len()).unwrap_or(i64::MAX) >= PAGE;
            if full {
                // The page may end inside its last server: that server's
                // targets come whole with the next page (unless it is the
                // only one on this page).
                if let Some(last) = page.last().map(|t| t.server_id) {
                    let cut = page.iter().position(|t| t.server_id == last).unwrap_or(0);
                    if cut > 0 {
                        page.truncate(cut);
                    }
                }
            }
            for t in &page {
                dispatch_alert(t, status, now, list);
            }
            match page.last() {
                Some(t) if full => after = t.server_id,
                _ => break,
            }
        }
    }
    Ok(())
}

/// The alert of target `t` (of `status`), if any.
fn dispatch_alert(
    t: &crate::registry::dispatch::DispatchTarget,
    status: DispatchStatus,
    now: i64,
    list: &mut List,
) {
    let subject = format!("{}/{}", t.server, t.state.as_str());
    if status == DispatchStatus::Failed {
        list.push(
            "dispatch_failed",
            Severity::Critical,
            subject,
            t.last_error
                .clone()
                .unwrap_or_else(|| format!("failed after {} attempts", t.attempts)),
            Some(t.updated_at),
        );
        return;
    }
    let since = if status == DispatchStatus::Running {
        t.started_at
    } else {
        t.pending_since
    };
    if let Some(since) = since.filter(|s| now - s > STUCK_MS) {
        list.push(
            "dispatch_stuck",
            Severity::Warning,
            subject,
            format!("{} for {} min", status.as_str(), (now - since) / 60_000),
            Some(since),
        );
    }
}

/// Servers offline, or registered and silent for [`NOT_SEEN_MS`].
async fn silent_servers(state: &HttpState, now: i64, list: &mut List) -> Result<(), ApiError> {
    for status in [Status::Offline, Status::Registered] {
        // Registered servers changed lately are not silent yet: the
        // database leaves them out.
        let filter = ServerFilter {
            status: Some(status),
            changed_before: (status == Status::Registered).then(|| now - NOT_SEEN_MS),
            ..ServerFilter::default()
        };
        let mut pages = state.service.server_pages(filter, PAGE);
        while let Some(servers) = pages.next().await? {
            for s in servers {
                let message = if status == Status::Offline {
                    format!("{} stopped answering", s.name)
                } else {
                    format!("{} has its key accepted but has not answered since", s.name)
                };
                list.push(
                    "server_not_seen",
                    Severity::Warning,
                    s.name.clone(),
                    message,
                    Some(s.updated_at),
                );
            }
        }
    }
    Ok(())
}

/// `GET /api/v1/alerts`: the attention list.
#[utoipa::path(get, path = "/api/v1/alerts", tag = "alerts",
    responses((status = 200, description = "`{items: [{kind, severity, subject, message, since?}], next: null}`, critical first; kinds: key_mismatch, unknown_minion, denied_minion, dispatch_failed, dispatch_stuck, backup_red, backup_never_run, rule_error, server_not_seen", body = Object),
        (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn list_alerts(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    let items = collect(&state).await?;
    Ok(Json(json!({"items": items, "next": null})))
}
