//! The HTTP API (`http.listen`, issue #15): JSON under `/api/v1`, served
//! by axum in the daemon as the `http` component.
//!
//! - [`auth`]: sessions, bearer tokens, roles and scopes, CSRF, the login
//!   rate limit.
//! - [`error`](mod@error): the one error shape and the status of every code.
//! - [`inventory`]: servers (create, delete), models, forwards, shares,
//!   backups — thin handlers over the bus's execute path.
//! - [`keys`](mod@keys): the master's minion keys with their fingerprints;
//!   accept (only the key the registry issued) and reject.
//! - [`ops`]: dispatch targets and retry, exec and its record.
//! - [`rules`](mod@rules): the rules engine's report (loaded files, errors
//!   with file:line, per-rule counters), through the daemon's
//!   [`RulesSource`].
//! - [`lifecycle`](mod@lifecycle): a server's rekey and its bundle download
//!   (the CLI's `server rekey` / `server bundle` paths).
//! - [`alerts`]: the attention list ([`alerts::collect`], for the
//!   dashboard too).
//! - this file: the state, the router and its layers (trace, timeout, body
//!   limit, gzip, security headers), the session, server and audit
//!   handlers.
//!
//! Writes go through the bus's execute path ([`crate::api::bus::execute_op`],
//! then `registry::Service`), so HTTP and bus never diverge; each is audited
//! with the actor `user:<name>` or `token:<name>`. A server's `ETag` is its
//! `revision`; `PATCH` needs `If-Match` (428 without, 412 when the server
//! moved on). Lists page with `?limit=&after=` → `{items, next}`, `after`
//! being the previous page's `next`: by id (servers, models, forwards,
//! shares, backups), by server id, a server's targets never split
//! (dispatches), newest first (exec, audit). Filters: servers `name`,
//! `model`, `status`; dispatches `status` (or `state`), `server`; exec
//! `server`; keys `state`. Keys and alerts are not paged: one entry per
//! master, and at most `alerts::PER_KIND` alerts per kind.
//!
//! Endpoints: `POST /api/v1/login` (JSON or form `{name, password}` → the
//! `steward_session` cookie), `POST /api/v1/logout`, `GET /api/v1/me`,
//! `GET|POST /api/v1/servers`, `GET|PATCH|DELETE /api/v1/servers/{id_or_name}`,
//! `POST /api/v1/servers/{id_or_name}/rekey` (operator; JSON or a form with
//! `next`), `GET /api/v1/servers/{id_or_name}/bundle` (admin, audited: the
//! one response with a private key),
//! `GET|POST /api/v1/models`, `DELETE /api/v1/models/{name}`,
//! `GET|POST /api/v1/forwards/port`, `GET|DELETE /api/v1/forwards/port/{id}`,
//! the same for `/api/v1/forwards/hostname`, `GET|POST /api/v1/shares`,
//! `GET|DELETE /api/v1/shares/{id}`, `POST /api/v1/shares/{id}/passwd`,
//! `GET|POST /api/v1/backups`, `GET|DELETE /api/v1/backups/{id}` (with
//! health and results), `GET /api/v1/dispatches`,
//! `POST /api/v1/dispatches/{server}/retry`, `GET|POST /api/v1/exec` (JSON,
//! or the dashboard's form answered with a 303 to `next` with the jid),
//! `GET /api/v1/keys`, `POST /api/v1/keys/{minion}/accept`,
//! `POST /api/v1/keys/{minion}/reject` (JSON, or a form answered with a
//! 303 to its local `next`), `GET /api/v1/rules`, `GET /api/v1/alerts`,
//! `GET /api/v1/audit` (admin), `GET /api/v1/openapi.json`. Reads need
//! viewer (token scope `read`); inventory writes, retries, exec, rekeys and
//! key decisions operator (`write`); the bundle (a private key) admin.

pub(crate) mod alerts;
pub mod auth;
mod dashboard;
pub mod error;
mod inventory;
mod keys;
mod lifecycle;
pub mod openapi;
mod ops;
mod rules;

pub use self::lifecycle::BundleContext;
pub use self::rules::RulesSource;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value as JsonValue};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::{error, warn};

use self::auth::{Principal, COOKIE};
use self::error::ApiError;
use self::openapi::{ErrorBody, ListPage};
use crate::api::bus::{execute_op, Entity, Op};
use crate::api::server::PolicyHandle;
use crate::config::HttpConfig;
use crate::exec::ExecStats;
use crate::registry::service::SessionLimits;
use crate::registry::users::{validate_user_name, AuditNote, Role, MAX_PASSWORD_BYTES};
use crate::registry::{DbStore, Server, ServerFilter, ServerRef, Service};
use crate::salt::SaltClient;

/// The time in Unix milliseconds: the registry's clock, or a test's.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Page sizes of the lists: default and largest.
pub(crate) const PAGE_DEFAULT: i64 = 100;
pub(crate) const PAGE_MAX: i64 = 1000;

/// What every handler shares.
pub struct HttpState {
    service: Arc<Service<DbStore>>,
    limits: SessionLimits,
    cookie_secure: bool,
    login_failures: u64,
    timeout: Duration,
    max_body: usize,
    clock: Clock,
    limiter: Mutex<auth::LoginLimiter>,
    /// `backups.stale_after_hours` in ms: a backup's health.
    backup_stale_ms: i64,
    /// What `POST /exec` runs with (the daemon's; none in tests).
    exec: Option<ExecContext>,
    /// The master's pki directory (`GET /keys`).
    pki_dir: Option<std::path::PathBuf>,
    /// Cancelled when the server stops: ends the dashboard's event streams,
    /// which graceful shutdown would otherwise wait for.
    shutdown: CancellationToken,
    /// Bounds the dashboard's open event streams (one per tab).
    streams: Arc<tokio::sync::Semaphore>,
    /// The master's request client: the wheel calls deciding keys.
    wheel: Option<crate::salt::ReqClient>,
    /// The rules engine's report (`GET /rules`, the alerts).
    rules: Option<RulesSource>,
    /// What `GET /servers/{server}/bundle` builds with.
    bundle: Option<BundleContext>,
}

/// The daemon's Salt client, policy and exec counters, for `POST /exec`.
#[derive(Clone)]
pub struct ExecContext {
    /// The master client.
    pub salt: SaltClient,
    /// The policy now (`exec.master`, `exec.timeout`).
    pub policy: PolicyHandle,
    /// The exec counters the metrics read.
    pub stats: Arc<ExecStats>,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("limits", &self.limits)
            .field("cookie_secure", &self.cookie_secure)
            .finish_non_exhaustive()
    }
}

impl HttpState {
    /// The state for `service` with the `http` settings.
    pub fn new(service: Arc<Service<DbStore>>, cfg: &HttpConfig) -> Self {
        let ms = |n: u64, unit: i64| i64::try_from(n).unwrap_or(i64::MAX).saturating_mul(unit);
        Self {
            service,
            limits: SessionLimits {
                idle_ms: ms(cfg.session_idle_minutes, 60_000),
                absolute_ms: ms(cfg.session_absolute_hours, 3_600_000),
            },
            cookie_secure: cfg.cookie_secure,
            login_failures: cfg.login_failures_per_minute,
            timeout: Duration::from_secs(cfg.request_timeout),
            max_body: usize::try_from(cfg.max_body_bytes).unwrap_or(usize::MAX),
            clock: Arc::new(crate::registry::store::now_ms),
            limiter: Mutex::new(auth::LoginLimiter::default()),
            backup_stale_ms: stale_ms(crate::config::BackupsConfig::default().stale_after_hours),
            exec: None,
            pki_dir: None,
            shutdown: CancellationToken::new(),
            streams: Arc::new(tokio::sync::Semaphore::new(dashboard::MAX_STREAMS)),
            wheel: None,
            rules: None,
            bundle: None,
        }
    }

    /// Lets `GET /keys` read the master's key directories under `pki_dir`.
    pub fn with_pki_dir(mut self, pki_dir: std::path::PathBuf) -> Self {
        self.pki_dir = Some(pki_dir);
        self
    }

    /// Lets `POST /keys/{minion}/accept|reject` call the master's wheel
    /// through `req` (with the pki directory of [`Self::with_pki_dir`]).
    pub fn with_wheel(mut self, req: crate::salt::ReqClient) -> Self {
        self.wheel = Some(req);
        self
    }

    /// Lets `GET /rules` and the alerts read the rules engine's report.
    pub fn with_rules(mut self, rules: RulesSource) -> Self {
        self.rules = Some(rules);
        self
    }

    /// Lets `GET /servers/{server}/bundle` build bundles (admin only) with
    /// the master's config and `masters`.
    pub fn with_bundle(mut self, bundle: BundleContext) -> Self {
        self.bundle = Some(bundle);
        self
    }

    /// Lets `POST /exec` run functions through `exec`.
    pub fn with_exec(mut self, exec: ExecContext) -> Self {
        self.exec = Some(exec);
        self
    }

    /// Uses `backups.stale_after_hours` (the default's otherwise) for the
    /// backups' health.
    pub fn with_backup_stale_hours(mut self, hours: u64) -> Self {
        self.backup_stale_ms = stale_ms(hours);
        self
    }

    /// Uses `clock` instead of the system's (tests drive expiry with it).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Overrides the session lifetimes (tests).
    pub fn with_session_limits(mut self, limits: SessionLimits) -> Self {
        self.limits = limits;
        self
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    fn limiter(&self) -> std::sync::MutexGuard<'_, auth::LoginLimiter> {
        // A panic while holding it leaves counts, never a broken invariant.
        self.limiter.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn stale_ms(hours: u64) -> i64 {
    i64::try_from(hours)
        .unwrap_or(i64::MAX)
        .saturating_mul(3_600_000)
}

/// The API's router with its layers (outermost first: trace, security
/// headers, gzip, the error shape for the layers' own errors, timeout, body
/// limit).
pub fn router(state: Arc<HttpState>) -> Router {
    let timeout = state.timeout;
    let max_body = state.max_body;
    let header = |name: HeaderName, value: &'static str| {
        SetResponseHeaderLayer::overriding(name, HeaderValue::from_static(value))
    };
    Router::new()
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .route("/api/v1/me", get(me))
        .route(
            "/api/v1/servers",
            get(list_servers).post(inventory::create_server),
        )
        .route(
            "/api/v1/servers/{server}",
            get(get_server)
                .patch(patch_server)
                .delete(inventory::delete_server),
        )
        .route("/api/v1/servers/{server}/rekey", post(lifecycle::rekey))
        .route("/api/v1/servers/{server}/bundle", get(lifecycle::bundle))
        .route(
            "/api/v1/models",
            get(inventory::list_models).post(inventory::create_model),
        )
        .route("/api/v1/models/{name}", delete(inventory::delete_model))
        .route(
            "/api/v1/forwards/port",
            get(inventory::list_port_forwards).post(inventory::create_port_forward),
        )
        .route(
            "/api/v1/forwards/port/{id}",
            get(inventory::get_port_forward).delete(inventory::delete_port_forward),
        )
        .route(
            "/api/v1/forwards/hostname",
            get(inventory::list_hostname_forwards).post(inventory::create_hostname_forward),
        )
        .route(
            "/api/v1/forwards/hostname/{id}",
            get(inventory::get_hostname_forward).delete(inventory::delete_hostname_forward),
        )
        .route(
            "/api/v1/shares",
            get(inventory::list_shares).post(inventory::create_share),
        )
        .route(
            "/api/v1/shares/{id}",
            get(inventory::get_share).delete(inventory::delete_share),
        )
        .route("/api/v1/shares/{id}/passwd", post(inventory::share_passwd))
        .route(
            "/api/v1/backups",
            get(inventory::list_backups).post(inventory::create_backup),
        )
        .route(
            "/api/v1/backups/{id}",
            get(inventory::get_backup).delete(inventory::delete_backup),
        )
        .route("/api/v1/dispatches", get(ops::list_dispatches))
        .route(
            "/api/v1/dispatches/{server}/retry",
            post(ops::retry_dispatch),
        )
        .route("/api/v1/exec", get(ops::exec_log).post(ops::run_exec))
        .route("/api/v1/keys", get(keys::list_keys))
        .route("/api/v1/keys/{minion}/accept", post(keys::accept_key))
        .route("/api/v1/keys/{minion}/reject", post(keys::reject_key))
        .route("/api/v1/rules", get(rules::list_rules))
        .route("/api/v1/alerts", get(alerts::list_alerts))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/openapi.json", get(openapi::serve_document))
        .merge(dashboard::routes())
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(TraceLayer::new_for_http())
                .layer(header(
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'self'; frame-ancestors 'none'",
                ))
                .layer(header(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                .layer(header(header::X_FRAME_OPTIONS, "DENY"))
                .layer(header(header::REFERRER_POLICY, "no-referrer"))
                // The dashboard's assets set their own (long) cache policy.
                .layer(SetResponseHeaderLayer::if_not_present(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("no-store"),
                ))
                .layer(CompressionLayer::new())
                .layer(axum::middleware::map_response(error_shape))
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    timeout,
                ))
                .layer(RequestBodyLimitLayer::new(max_body)),
        )
}

/// Serves the API on `listener` until `cancel` fires (in-flight requests
/// finish; the supervisor bounds the wait).
pub async fn serve(listener: TcpListener, state: Arc<HttpState>, cancel: CancellationToken) {
    let streams = state.shutdown.clone();
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            cancel.cancelled_owned().await;
            // Open event streams never end by themselves.
            streams.cancel();
        })
        .await
    {
        warn!(message = "HTTP API failed.", %error);
    }
}

/// Gives the one error shape to the errors the layers and extractors
/// answer themselves (408 timeout, 413 body too large, a path that is not
/// UTF-8 …): any error response that is not already JSON (or one of the
/// dashboard's HTML pages).
async fn error_shape<B>(resp: axum::http::Response<B>) -> Response
where
    B: axum::body::HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let resp = resp.map(axum::body::Body::new);
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/html"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let code = match status {
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "bad_request",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let message = status.canonical_reason().unwrap_or("error").to_owned();
    let body = json!({"error": {"code": code, "message": message}});
    let mut out = (status, Json(body)).into_response();
    for (k, v) in resp.headers() {
        if ![
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
        ]
        .contains(k)
        {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

async fn no_route() -> ApiError {
    ApiError::new("no_route", "no such endpoint (see /api/v1/…)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

// ------------------------------------------------------------- sessions

/// A login's body (JSON or form). No `Debug`: it holds the password.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    name: String,
    password: String,
}

fn read_login(headers: &HeaderMap, body: &[u8]) -> Result<LoginBody, ApiError> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ctype.starts_with("application/json") {
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("login body: {e}")))
    } else if ctype.starts_with("application/x-www-form-urlencoded") {
        serde_urlencoded::from_bytes(body)
            .map_err(|e| ApiError::bad_request(format!("login form: {e}")))
    } else {
        Err(ApiError::bad_request(
            "login takes application/json or application/x-www-form-urlencoded {name, password}",
        ))
    }
}

fn session_cookie(state: &HttpState, value: &str, max_age_s: i64) -> Result<HeaderValue, ApiError> {
    let secure = if state.cookie_secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}{secure}"
    ))
    .map_err(|_| ApiError::new("internal", "building the session cookie"))
}

#[utoipa::path(post, path = "/api/v1/login", tag = "session", security(()),
    request_body(content = Object, description = "`{name, password}` as JSON or a form", content_type = "application/json"),
    responses((status = 200, description = "`{user}`; Set-Cookie steward_session", body = Object), (status = "4XX", description = "The error shape", body = ErrorBody)))]
async fn login(State(state): State<Arc<HttpState>>, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    if auth::cross_site(headers) {
        return Err(ApiError::new(
            "csrf",
            "a login from another site is refused",
        ));
    }
    let client = auth::client_key(parts.extensions.get::<ConnectInfo<SocketAddr>>());
    let body = axum::body::to_bytes(body, state.max_body)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
    let form = read_login(headers, &body)?;
    let (user, cookie) = start_session(&state, headers, &client, form).await?;
    let mut resp = Json(json!({"user": user})).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(resp)
}

/// Checks a login (`form`) from `client` against the rate limit and the
/// registry and starts its session: the user and the `Set-Cookie` value.
/// Shared by `POST /api/v1/login` and the dashboard's login form, so both
/// count failures and rotate sessions the same way. The caller refuses
/// cross-site requests first.
async fn start_session(
    state: &HttpState,
    headers: &HeaderMap,
    client: &str,
    form: LoginBody,
) -> Result<(crate::registry::users::User, HeaderValue), ApiError> {
    // Keys stay small whatever is sent: a name no user can have shares one.
    let name_key = match validate_user_name(&form.name) {
        Ok(n) => format!("user:{n}"),
        Err(_) => "user:<invalid>".to_owned(),
    };
    let keys = [client, name_key.as_str()];
    let now = state.now();
    let max = state.login_failures;
    // Counted before the (slow) check, so parallel attempts count too; a
    // success takes its count back.
    {
        let mut l = state.limiter();
        if let Some(secs) = l.check(&keys, max, now) {
            let mut e = ApiError::new(
                "rate_limited",
                format!("too many failed logins: try again in {secs} s"),
            );
            e.retry_after = Some(secs);
            return Err(e);
        }
        l.fail(&keys, max, now);
    }
    let replaces = auth::cookie(headers, COOKIE).map(str::to_owned);
    // No user has a longer one: not worth an argon2 run.
    let done = if form.password.len() > MAX_PASSWORD_BYTES {
        None
    } else {
        state
            .service
            .login(
                &form.name,
                form.password,
                replaces.as_deref(),
                now,
                state.limits,
            )
            .await?
    };
    let Some((user, secret)) = done else {
        warn!(message = "Login refused.", user = %name_key, client = %client);
        return Err(ApiError::new(
            "invalid_credentials",
            "wrong name or password",
        ));
    };
    {
        let mut l = state.limiter();
        l.forget(&name_key);
        l.undo(client, now);
    }
    let cookie = session_cookie(state, secret.expose(), state.limits.absolute_ms / 1000)?;
    Ok((user, cookie))
}

#[utoipa::path(post, path = "/api/v1/logout", tag = "session",
    responses((status = 204, description = "Logged out; the cookie cleared"), (status = "4XX", description = "The error shape", body = ErrorBody)))]
async fn logout(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    if let Some(value) = auth::cookie(&headers, COOKIE) {
        state.service.logout(value).await?;
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&state, "", 0)?);
    Ok(resp)
}

#[utoipa::path(get, path = "/api/v1/me", tag = "session",
    responses((status = 200, description = "Who is asking: actor, kind, name, role (and a token's scopes)", body = Object), (status = "4XX", description = "The error shape", body = ErrorBody)))]
async fn me(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
) -> Result<Json<JsonValue>, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Viewer).await?;
    Ok(Json(match &p {
        Principal::Session(u) => json!({
            "actor": p.actor(), "kind": "session", "name": u.name, "role": u.role,
        }),
        Principal::Token { token, user } => json!({
            "actor": p.actor(), "kind": "token", "name": token.name,
            "user": user.as_ref().map(|u| &u.name),
            "role": user.as_ref().map(|u| u.role),
            "scopes": token.scopes, "expires_at": token.expires_at,
        }),
    }))
}

// -------------------------------------------------------------- servers

/// `?limit=&after=` and filters `name`, `model`, `status` (servers) or
/// `?limit=&before=` (audit).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    limit: Option<i64>,
    after: Option<i64>,
    before: Option<i64>,
    /// Servers only: filters, as `server list` has them.
    name: Option<String>,
    model: Option<String>,
    status: Option<String>,
}

fn page(query: Option<String>) -> Result<(Page, i64), ApiError> {
    let p: Page = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    let limit = p.limit.unwrap_or(PAGE_DEFAULT);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {PAGE_MAX}"
        )));
    }
    Ok((p, limit))
}

#[utoipa::path(get, path = "/api/v1/servers", tag = "servers",
    params(("limit" = Option<i64>, Query, description = "Page size (1 to 1000, default 100)"), ("after" = Option<i64>, Query, description = "The previous page's `next`"), ("name" = Option<String>, Query, description = "Filter: name glob"), ("model" = Option<String>, Query, description = "Filter: model"), ("status" = Option<String>, Query, description = "Filter: status")),
    responses((status = 200, description = "A page of servers", body = ListPage), (status = "4XX", description = "The error shape", body = ErrorBody)))]
async fn list_servers(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    let (p, limit) = page(query)?;
    if p.before.is_some() {
        return Err(ApiError::bad_request(
            "servers page with after=, not before=",
        ));
    }
    let status = p.status.as_deref().map(str::parse).transpose()?;
    let mut items = state
        .service
        .find_servers(&ServerFilter {
            name: p.name,
            model: p.model,
            status,
            after_id: p.after,
            limit: Some(limit + 1),
            ..ServerFilter::default()
        })
        .await?;
    let more = items.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next = if more {
        items.last().map(|s| s.id)
    } else {
        None
    };
    Ok(Json(json!({"items": items, "next": next})))
}

fn etag(revision: i64) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(&format!("\"{revision}\""))
        .map_err(|_| ApiError::new("internal", "building the ETag"))
}

pub(crate) fn server_response(server: &JsonValue) -> Result<Response, ApiError> {
    let revision = server
        .get("revision")
        .and_then(JsonValue::as_i64)
        .ok_or_else(|| ApiError::new("internal", "the server has no revision"))?;
    let mut resp = Json(server.clone()).into_response();
    resp.headers_mut().insert(header::ETAG, etag(revision)?);
    Ok(resp)
}

fn server_ref(text: &str) -> ServerRef {
    text.parse()
        .unwrap_or_else(|_| ServerRef::Name(text.to_owned()))
}

#[utoipa::path(get, path = "/api/v1/servers/{server}", tag = "servers",
    params(("server" = String, Path, description = "Id or name")),
    responses((status = 200, description = "The server; ETag: its revision", body = Object), (status = "4XX", description = "The error shape", body = ErrorBody)))]
async fn get_server(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(server): Path<String>,
) -> Result<Response, ApiError> {
    auth::require(&state, &method, &headers, Role::Viewer).await?;
    let s: Server = state.service.get_server(&server_ref(&server)).await?;
    let v = serde_json::to_value(&s).map_err(|e| ApiError::new("internal", e.to_string()))?;
    server_response(&v)
}

/// The revision `If-Match` names: `Some(n)` for `"n"`, `None` for `*`.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Err(ApiError::new(
            "precondition_required",
            "PATCH needs If-Match with the server's ETag (GET it first)",
        ));
    };
    let text = v
        .to_str()
        .map_err(|_| ApiError::bad_request("If-Match is not text"))?
        .trim();
    if text == "*" {
        return Ok(None);
    }
    if text.starts_with("W/") {
        return Err(ApiError::new(
            "precondition_failed",
            "a weak ETag never matches for a change",
        ));
    }
    text.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .and_then(|t| t.parse().ok())
        .map(Some)
        .ok_or_else(|| ApiError::bad_request(format!("If-Match {text:?} is not an ETag of ours")))
}

#[utoipa::path(patch, path = "/api/v1/servers/{server}", tag = "servers",
    params(("server" = String, Path, description = "Id or name"), ("If-Match" = String, Header, description = "The ETag of a GET (or *)")),
    request_body(content = Object, description = "The fields to change, as `server set` takes them"),
    responses((status = 200, description = "The server as changed; ETag: its revision", body = Object), (status = "4XX", description = "The error shape", body = ErrorBody)))]
async fn patch_server(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(server): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    let revision = if_match(&headers)?;
    let changes: Map<String, JsonValue> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("body: a JSON object of changes: {e}")))?;
    for k in ["server", "id", "revision"] {
        if changes.contains_key(k) {
            return Err(ApiError::bad_request(format!(
                "{k:?} is not a change: the server is in the path, its revision in If-Match"
            )));
        }
    }
    let mut args = changes.clone();
    args.insert("server".to_owned(), JsonValue::String(server.clone()));
    if let Some(r) = revision {
        args.insert("revision".to_owned(), json!(r));
    }
    let updated = match execute_op(&state.service, Entity::Server, Op::Update, &args).await {
        Ok(v) => v,
        Err(crate::registry::Error::Conflict {
            expected, current, ..
        }) => {
            return Err(ApiError::new(
                "precondition_failed",
                format!("server {server} is at revision {current}, not {expected}: GET it again"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let note = AuditNote {
        actor: p.actor(),
        action: "server.update",
        target: format!(
            "#{} {}",
            updated
                .get("id")
                .and_then(JsonValue::as_i64)
                .unwrap_or_default(),
            updated
                .get("name")
                .and_then(JsonValue::as_str)
                .unwrap_or_default()
        ),
        detail: json!({"changes": changes, "revision": updated.get("revision")}),
    };
    if let Err(e) = state.service.audit(&note).await {
        // The change is written; its audit entry is not: say so loudly.
        error!(message = "Server change not audited.", actor = %note.actor, target = %note.target, error = %e);
    }
    server_response(&updated)
}

// ---------------------------------------------------------------- audit

#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    params(("limit" = Option<i64>, Query, description = "Page size (1 to 1000, default 100)"), ("after" = Option<i64>, Query, description = "The previous page's `next` (newest first: older entries)"), ("before" = Option<i64>, Query, description = "The same cursor under its older name")),
    responses((status = 200, description = "A page of audit entries (admin)", body = ListPage), (status = "4XX", description = "The error shape", body = ErrorBody)))]
async fn audit(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<JsonValue>, ApiError> {
    auth::require(&state, &method, &headers, Role::Admin).await?;
    let (p, limit) = page(query)?;
    if (p.after.is_some() && p.before.is_some())
        || p.name.is_some()
        || p.model.is_some()
        || p.status.is_some()
    {
        return Err(ApiError::bad_request(
            "the audit log pages newest first with after= (or before=): the previous page's next",
        ));
    }
    let mut items = state
        .service
        .audit_log(p.after.or(p.before), limit + 1)
        .await?;
    let more = items.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next = if more {
        items.last().map(|e| e.id)
    } else {
        None
    };
    Ok(Json(json!({"items": items, "next": next})))
}
