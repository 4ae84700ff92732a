//! The dashboard (issue #15): server-rendered HTML pages in the daemon's
//! HTTP server, beside the JSON API, for people with a browser.
//!
//! - Pages: `GET /login` + `POST /login` (the form; the API's session start,
//!   same cookie), `POST /logout`, `GET /` (counts and the attention list),
//!   `/servers`, `/servers/{name}` (+ `/servers/{name}/rekey`, the
//!   confirmation), `/keys` (+ `/keys/{minion}/confirm`), `/dispatches`,
//!   `/backups`, `/rules`, `/activity`, `/audit` and `/admin` (admin only),
//!   in [`pages`].
//! - Templates: minijinja, embedded with `include_str!`, HTML auto-escape,
//!   strict undefined.
//! - Assets: htmx 2.0.4 (vendored, `assets/README.md`), a CSS file and a
//!   small script, embedded and served at `/assets/…` with a long cache
//!   policy (the pages name them with `?v=<version>`). No inline script or
//!   style: the API's CSP (`default-src 'self'`) holds for the pages too.
//! - Live: one event stream per tab, `GET /events`: an event `changed`
//!   when the registry moved (its outbox or the dispatch targets), polled
//!   once a second, each stream ended after [`STREAM_LIFETIME`] (the
//!   browser reconnects, its session checked again) and at shutdown; the
//!   script then fetches the fragments marked `data-fragment` on the page
//!   (`GET /fragments/overview`, `/fragments/servers?…` with the page's
//!   filters, `/fragments/dispatches?status=`, `/fragments/activity`).
//!
//! Every control is a plain link or form: a page without a session is a
//! 303 to `/login`, a viewer sees no write controls, and the write forms
//! post to the JSON API, whose role and CSRF checks are the ones that count.

mod pages;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use tracing::debug;

use super::auth::{self, Principal, COOKIE};
use super::error::ApiError;
use super::HttpState;
use crate::registry::dispatch::DispatchStatus;
use crate::registry::store::{BackupStore as _, DispatchStore as _};
use crate::registry::users::{Role, User};
use crate::registry::Store as _;

/// Most event streams open at once (one per tab); more are refused (503).
pub(super) const MAX_STREAMS: usize = 64;

/// How often a stream looks at the registry.
const POLL: Duration = Duration::from_secs(1);

/// How long one stream lives; the browser's `EventSource` then reconnects,
/// and the session is checked again (a stream never outlives its session
/// by more than this).
pub(super) const STREAM_LIFETIME: Duration = Duration::from_secs(300);

/// The dashboard's routes (merged into the API's router, under its layers).
pub(super) fn routes() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/login", get(login_page).post(login_form))
        .route("/logout", post(logout))
        .route("/", get(pages::overview))
        .route("/fragments/overview", get(pages::overview_fragment))
        .route("/servers", get(pages::servers))
        .route("/fragments/servers", get(pages::servers_fragment))
        .route("/servers/{name}", get(pages::server))
        .route("/servers/{name}/rekey", get(pages::confirm_rekey))
        .route("/keys", get(pages::keys))
        .route("/keys/{minion}/confirm", get(pages::confirm_key))
        .route("/dispatches", get(pages::dispatches))
        .route("/fragments/dispatches", get(pages::dispatches_fragment))
        .route("/rules", get(pages::rules))
        .route("/activity", get(pages::activity))
        .route("/fragments/activity", get(pages::activity_fragment))
        .route("/backups", get(pages::backups))
        .route("/audit", get(pages::audit))
        .route("/admin", get(pages::admin))
        .route("/events", get(events))
        .route("/assets/{name}", get(asset))
}

// ------------------------------------------------------------ templates

/// Every template, by name (`.html`: auto-escaped).
const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("login.html", include_str!("templates/login.html")),
    ("error.html", include_str!("templates/error.html")),
    ("overview.html", include_str!("templates/overview.html")),
    (
        "overview_fragment.html",
        include_str!("templates/overview_fragment.html"),
    ),
    ("servers.html", include_str!("templates/servers.html")),
    (
        "servers_fragment.html",
        include_str!("templates/servers_fragment.html"),
    ),
    ("server.html", include_str!("templates/server.html")),
    ("keys.html", include_str!("templates/keys.html")),
    ("confirm.html", include_str!("templates/confirm.html")),
    ("dispatches.html", include_str!("templates/dispatches.html")),
    (
        "dispatches_fragment.html",
        include_str!("templates/dispatches_fragment.html"),
    ),
    ("rekey.html", include_str!("templates/rekey.html")),
    ("rules.html", include_str!("templates/rules.html")),
    ("activity.html", include_str!("templates/activity.html")),
    (
        "activity_fragment.html",
        include_str!("templates/activity_fragment.html"),
    ),
    ("backups.html", include_str!("templates/backups.html")),
    ("audit.html", include_str!("templates/audit.html")),
    ("admin.html", include_str!("templates/admin.html")),
];

static ENV: LazyLock<Result<Environment<'static>, String>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.add_filter("ts", |ms: Option<i64>| ms.map_or_else(String::new, ts));
    env.add_filter("seg", |text: String| seg(&text));
    for (name, source) in TEMPLATES {
        env.add_template(name, source)
            .map_err(|e| format!("template {name}: {e}"))?;
    }
    Ok(env)
});

/// Renders template `name` with `ctx` as a page (200).
fn render(name: &str, ctx: &impl Serialize) -> Result<Response, PageError> {
    let html = render_text(name, ctx)?;
    Ok(Html(html).into_response())
}

fn render_text(name: &str, ctx: &impl Serialize) -> Result<String, PageError> {
    let env = ENV
        .as_ref()
        .map_err(|e| PageError::Api(ApiError::new("internal", e.clone())))?;
    env.get_template(name)
        .and_then(|t| t.render(ctx))
        .map_err(|e| {
            tracing::error!(message = "Rendering a dashboard page failed.", template = name, error = %e);
            PageError::Api(ApiError::new("internal", "rendering the page failed"))
        })
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` (UTC).
fn ts(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A path segment percent-encoded (minion ids and names in links).
fn seg(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// --------------------------------------------------------------- errors

/// Why a page is not shown: no session (→ the login page), or an error
/// shown as a page with the API's status for its code.
#[derive(Debug)]
pub(super) enum PageError {
    /// No (working) session.
    Login,
    /// Anything else.
    Api(ApiError),
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError::Api(e)
    }
}

impl From<crate::registry::Error> for PageError {
    fn from(e: crate::registry::Error) -> Self {
        PageError::Api(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::Login => Redirect::to("/login").into_response(),
            PageError::Api(e) => {
                let status = e.status();
                // Database errors are logged where they happen, not shown.
                let message = if status.is_server_error() {
                    "the daemon could not answer this page (see its log)".to_owned()
                } else {
                    e.message.clone()
                };
                let ctx = minijinja::context! {
                    status => status.as_u16(), code => e.code, message,
                };
                match render_text("error.html", &ctx) {
                    Ok(html) => (status, Html(html)).into_response(),
                    Err(_) => (status, format!("{}: {}", e.code, e.message)).into_response(),
                }
            }
        }
    }
}

/// The user of a page request: a browser session (tokens are for the API).
async fn page_user(state: &HttpState, headers: &HeaderMap) -> Result<User, PageError> {
    match auth::authenticate(state, headers).await {
        Ok(Some(Principal::Session(u))) => Ok(u),
        Ok(_) => Err(PageError::Login),
        Err(e) if e.code == "unauthenticated" => Err(PageError::Login),
        Err(e) => Err(e.into()),
    }
}

/// What every page's frame shows of its user.
#[derive(Debug, Serialize)]
struct Frame {
    name: String,
    role: Role,
    can_write: bool,
    is_admin: bool,
    version: &'static str,
}

impl Frame {
    fn of(user: &User) -> Self {
        Self {
            name: user.name.clone(),
            role: user.role,
            can_write: user.role >= Role::Operator,
            is_admin: user.role >= Role::Admin,
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

// ---------------------------------------------------------- login/logout

async fn login_page(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    if page_user(&state, &headers).await.is_ok() {
        return Ok(Redirect::to("/").into_response());
    }
    login_form_page(StatusCode::OK, None, "")
}

fn login_form_page(
    status: StatusCode,
    error: Option<&str>,
    name: &str,
) -> Result<Response, PageError> {
    let html = render_text(
        "login.html",
        &minijinja::context! { error, name, version => env!("CARGO_PKG_VERSION") },
    )?;
    Ok((status, Html(html)).into_response())
}

/// `POST /login`: the form's `name` and `password`, checked as
/// `POST /api/v1/login` does (rate limit, session rotation), then the same
/// cookie and a 303 to `/`; a refusal shows the form again with why.
async fn login_form(State(state): State<Arc<HttpState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    if auth::cross_site(headers) {
        return PageError::Api(ApiError::new(
            "csrf",
            "a login from another site is refused",
        ))
        .into_response();
    }
    let client = auth::client_key(parts.extensions.get::<ConnectInfo<SocketAddr>>());
    let body: Bytes = match axum::body::to_bytes(body, state.max_body).await {
        Ok(b) => b,
        Err(e) => {
            return PageError::Api(ApiError::bad_request(format!("reading the form: {e}")))
                .into_response()
        }
    };
    let form: super::LoginBody = match serde_urlencoded::from_bytes(&body) {
        Ok(f) => f,
        Err(e) => {
            return login_form_page(
                StatusCode::BAD_REQUEST,
                Some(&format!("the form needs a name and a password ({e})")),
                "",
            )
            .unwrap_or_else(IntoResponse::into_response)
        }
    };
    let name = form.name.clone();
    match super::start_session(&state, headers, &client, form).await {
        Ok((_, cookie)) => {
            let mut resp = Redirect::to("/").into_response();
            resp.headers_mut().insert(header::SET_COOKIE, cookie);
            resp
        }
        Err(e) => {
            let status = e.status();
            let mut resp = login_form_page(status, Some(&e.message), &name)
                .unwrap_or_else(IntoResponse::into_response);
            if let Some(secs) = e.retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            resp
        }
    }
}

/// `POST /logout`: ends the session (a same-origin form only: the API's
/// CSRF rule), clears the cookie, back to the login page.
async fn logout(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    if !auth::same_origin_proof(&headers) {
        return Err(ApiError::new(
            "csrf",
            "log out from the dashboard's own page (the request did not say it came from it)",
        )
        .into());
    }
    if let Some(value) = auth::cookie(&headers, COOKIE) {
        state.service.logout(value).await?;
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, super::session_cookie(&state, "", 0)?);
    Ok(resp)
}

// --------------------------------------------------------------- assets

/// htmx 2.0.4, as published on npm (`assets/README.md`).
const HTMX: &str = include_str!("../../../../assets/htmx.min.js");
const SCRIPT: &str = include_str!("../../../../assets/dashboard.js");
const STYLE: &str = include_str!("../../../../assets/dashboard.css");

/// `GET /assets/{name}`: the embedded files, cached for a year (the pages
/// name them with the daemon's version).
async fn asset(Path(name): Path<String>) -> Response {
    let (ctype, body) = match name.as_str() {
        "htmx.min.js" => ("text/javascript; charset=utf-8", HTMX),
        "dashboard.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "dashboard.css" => ("text/css; charset=utf-8", STYLE),
        _ => {
            return PageError::Api(ApiError::new("not_found", format!("no asset {name:?}")))
                .into_response()
        }
    };
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}

// --------------------------------------------------------------- events

/// What a stream compares each second: the outbox consumers' positions and
/// backlogs (every registry write appends a row), the dispatch targets
/// by status and the backup results recorded (they write no outbox row).
#[derive(Debug, PartialEq, Eq)]
struct Signature {
    outbox: Vec<(String, i64, i64)>,
    dispatch: Vec<(DispatchStatus, usize)>,
    backup_results: (i64, i64),
}

async fn signature(state: &HttpState) -> Option<Signature> {
    let store = state.service.store();
    let outbox = match store.outbox_status().await {
        Ok(rows) => rows
            .into_iter()
            .map(|c| (c.consumer, c.position, c.pending))
            .collect(),
        Err(e) => {
            debug!(message = "Event stream: reading the outbox failed.", error = %e);
            return None;
        }
    };
    let targets = match store.dispatch_targets(None).await {
        Ok(t) => t,
        Err(e) => {
            debug!(message = "Event stream: reading the dispatch targets failed.", error = %e);
            return None;
        }
    };
    let dispatch = DispatchStatus::ALL
        .iter()
        .map(|s| (*s, targets.iter().filter(|t| t.status == *s).count()))
        .collect();
    let backup_results = match store.backup_results_mark().await {
        Ok(m) => m,
        Err(e) => {
            debug!(message = "Event stream: reading the backup results failed.", error = %e);
            return None;
        }
    };
    Some(Signature {
        outbox,
        dispatch,
        backup_results,
    })
}

/// `GET /events` (session required): `text/event-stream` with `hello` at
/// once, then `changed` each time the registry moved. Bounded: at most
/// [`MAX_STREAMS`] open, each ends after [`STREAM_LIFETIME`] or at shutdown.
async fn events(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    if page_user(&state, &headers).await.is_err() {
        // An EventSource cannot follow a redirect to a page: a plain 401.
        return Err(ApiError::unauthenticated().into());
    }
    let Ok(permit) = state.streams.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            "unavailable",
            format!("too many open event streams (at most {MAX_STREAMS})"),
        )
        .into());
    };
    let last = signature(&state).await;
    let end = tokio::time::Instant::now() + STREAM_LIFETIME;
    let stop = state.shutdown.clone();
    let start = (state, permit, last, stop, end, true);
    let stream = futures_util::stream::unfold(
        start,
        |(state, permit, last, stop, end, first)| async move {
            if first {
                let hello = Event::default().event("hello").data("live").retry(POLL);
                return Some((
                    Ok::<_, Infallible>(hello),
                    (state, permit, last, stop, end, false),
                ));
            }
            loop {
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = tokio::time::sleep_until(end) => return None,
                    () = tokio::time::sleep(POLL) => {}
                }
                let now = signature(&state).await;
                if now.is_some() && now != last {
                    let changed = Event::default().event("changed").data("registry");
                    return Some((Ok(changed), (state, permit, now, stop, end, false)));
                }
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
