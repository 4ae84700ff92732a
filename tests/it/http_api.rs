//! The HTTP API (issue #15) in process: `api::http::router` driven with
//! `tower::ServiceExt::oneshot`, on SQLite and on PostgreSQL, with a test
//! clock (expiry is proved by moving the clock, never by sleeping): login
//! and logout, idle and absolute session expiry, a new session id at every
//! login, 401/403 by role and by token scope, token expiry, disabled users,
//! the login rate limit, CSRF refusal of cookie writes, ETag/If-Match
//! (428/412), a PATCH equal to what `server set` writes, the error shape,
//! the security headers; then `user add` and `token add` on the CLI.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use salt_steward::api::http::{router, HttpState};
use salt_steward::config::HttpConfig;
use salt_steward::pki::KeyIssuer;
use salt_steward::registry::service::SessionLimits;
use salt_steward::registry::store::UserStore as _;
use salt_steward::registry::users::{secret_hash, Password, Role, Scope};
use salt_steward::registry::{self, DbStore, ServerPatch, Service};
use serde_json::{json, Value};
use tower::ServiceExt as _;

use crate::registry::TestDb;
use crate::support::steward;

const T0: i64 = 1_800_000_000_000;
const IDLE_MS: i64 = 60_000;
const ABSOLUTE_MS: i64 = 600_000;
pub(crate) const PASSWORD: &str = "a long enough password";

/// The API over one test database, with a clock the test moves.
struct Api {
    app: Router,
    clock: Arc<AtomicI64>,
    svc: Arc<Service<DbStore>>,
    db: TestDb,
}

/// A response: status, headers, JSON body (`Null` when empty).
struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Resp {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    /// The session cookie's value from Set-Cookie.
    fn cookie(&self) -> String {
        let set = self.headers[header::SET_COOKIE].to_str().unwrap();
        set.split(';')
            .next()
            .unwrap()
            .strip_prefix("steward_session=")
            .unwrap()
            .to_owned()
    }
    fn etag(&self) -> &str {
        self.headers[header::ETAG].to_str().unwrap()
    }
}

/// How a request authenticates.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Cookie(&'a str),
    /// The cookie and `X-Requested-With` (what the dashboard's scripts send).
    CookieXhr(&'a str),
    Bearer(&'a str),
}

impl Api {
    async fn new(db: TestDb) -> Self {
        Self::with(db, HttpConfig::default()).await
    }

    async fn with(db: TestDb, cfg: HttpConfig) -> Self {
        let svc = Arc::new(registry::open(&db.url).await.unwrap());
        svc.create_model("web", "", &[]).await.unwrap();
        for role in Role::ALL {
            svc.add_user(
                "test",
                &format!("{role}1"),
                role,
                Password::new(PASSWORD.into()).unwrap(),
            )
            .await
            .unwrap();
        }
        let clock = Arc::new(AtomicI64::new(T0));
        let c = clock.clone();
        let state = HttpState::new(svc.clone(), &cfg)
            .with_clock(Arc::new(move || c.load(Ordering::SeqCst)))
            .with_session_limits(SessionLimits {
                idle_ms: IDLE_MS,
                absolute_ms: ABSOLUTE_MS,
            });
        Self {
            app: router(Arc::new(state)),
            clock,
            svc,
            db,
        }
    }

    fn now(&self) -> i64 {
        self.clock.load(Ordering::SeqCst)
    }

    fn advance(&self, ms: i64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
    }

    async fn server(&self, name: &str) {
        let mut p = ServerPatch::default();
        p.set("name", name).unwrap();
        p.set("model", "web").unwrap();
        self.svc.create_server(p).await.unwrap();
    }

    async fn token(
        &self,
        name: &str,
        scopes: &[Scope],
        user: Option<&str>,
        ms: Option<i64>,
    ) -> String {
        let (_, secret) = self
            .svc
            .add_token("test", name, scopes, user, ms, self.now())
            .await
            .unwrap();
        secret.expose().to_owned()
    }

    async fn send(&self, req: Request<Body>) -> Resp {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {bytes:?}"))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn call(&self, method: Method, uri: &str, auth: Auth<'_>, body: Option<Value>) -> Resp {
        self.call_with(method, uri, auth, body, &[]).await
    }

    async fn call_with(
        &self,
        method: Method,
        uri: &str,
        auth: Auth<'_>,
        body: Option<Value>,
        extra: &[(&str, &str)],
    ) -> Resp {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "127.0.0.1:8467");
        match auth {
            Auth::None => {}
            Auth::Cookie(c) => b = b.header(header::COOKIE, format!("steward_session={c}")),
            Auth::CookieXhr(c) => {
                b = b
                    .header(header::COOKIE, format!("steward_session={c}"))
                    .header("x-requested-with", "test")
            }
            Auth::Bearer(t) => b = b.header(header::AUTHORIZATION, format!("Bearer {t}")),
        }
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        let req = match body {
            Some(v) => b
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        }
        .unwrap();
        self.send(req).await
    }

    /// POST /api/v1/login from client `ip` as JSON.
    async fn login_from(&self, ip: &str, name: &str, password: &str, old: Option<&str>) -> Resp {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri("/api/v1/login")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(c) = old {
            b = b.header(header::COOKIE, format!("steward_session={c}"));
        }
        let mut req = b
            .body(Body::from(
                json!({"name": name, "password": password}).to_string(),
            ))
            .unwrap();
        let addr: SocketAddr = format!("{ip}:40000").parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(addr));
        self.send(req).await
    }

    async fn login(&self, name: &str) -> String {
        let r = self.login_from("127.0.0.1", name, PASSWORD, None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        r.cookie()
    }
}

fn assert_error(r: &Resp, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.code(), code, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        r.body
    );
}

/// Sessions: cookie flags, only the hash stored, idle and absolute expiry,
/// rotation at login, logout (CSRF-checked), forms, disabled users.
async fn session_story(api: Api) {
    let me = |auth| api.call(Method::GET, "/api/v1/me", auth, None);
    let r = me(Auth::None).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
    for (h, v) in [
        (
            "content-security-policy",
            "default-src 'self'; frame-ancestors 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
    ] {
        assert_eq!(r.headers[h], v, "{h}");
    }

    let r = api
        .login_from("127.0.0.1", "viewer1", "not the password", None)
        .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "invalid_credentials");
    assert!(!r.headers.contains_key(header::SET_COOKIE));
    let r = api.login_from("127.0.0.1", "viewer1", PASSWORD, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let set = r.headers[header::SET_COOKIE].to_str().unwrap().to_owned();
    for flag in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
        "Secure",
        "Max-Age=600",
    ] {
        assert!(set.contains(flag), "{flag} not in {set}");
    }
    assert_eq!(r.body["user"]["role"], "viewer");
    assert!(!r.body.to_string().contains("argon2"), "{}", r.body);
    let c1 = r.cookie();
    assert_eq!(c1.len(), 64);
    // Only its sha256 is stored.
    assert!(api.svc.store().session(&c1).await.unwrap().is_none());
    assert!(api
        .svc
        .store()
        .session(&secret_hash(&c1))
        .await
        .unwrap()
        .is_some());
    let r = me(Auth::Cookie(&c1)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        (r.body["actor"].as_str(), r.body["role"].as_str()),
        (Some("user:viewer1"), Some("viewer"))
    );

    // Rotation: logging in with the old cookie gives a new one, the old ends.
    let r = api
        .login_from("127.0.0.1", "viewer1", PASSWORD, Some(&c1))
        .await;
    let c2 = r.cookie();
    assert_ne!(c1, c2);
    assert_error(
        &me(Auth::Cookie(&c1)).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    );
    assert_eq!(me(Auth::Cookie(&c2)).await.status, StatusCode::OK);

    // Idle expiry: a request just inside the idle time keeps it, one after ends it.
    api.advance(IDLE_MS);
    assert_eq!(me(Auth::Cookie(&c2)).await.status, StatusCode::OK);
    api.advance(IDLE_MS + 1);
    assert_error(
        &me(Auth::Cookie(&c2)).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    );
    // …and stays ended when the clock would allow it again.
    api.advance(-IDLE_MS);
    assert_eq!(me(Auth::Cookie(&c2)).await.status, StatusCode::UNAUTHORIZED);

    // Absolute expiry: used every 50 s, it still ends 600 s after login.
    let c3 = api.login("viewer1").await;
    let start = api.now();
    while api.now() + 50_000 < start + ABSOLUTE_MS {
        api.advance(50_000);
        assert_eq!(me(Auth::Cookie(&c3)).await.status, StatusCode::OK);
    }
    api.clock.store(start + ABSOLUTE_MS, Ordering::SeqCst);
    assert_eq!(me(Auth::Cookie(&c3)).await.status, StatusCode::UNAUTHORIZED);

    // Logout: a cookie write, so CSRF-checked.
    let c4 = api.login("viewer1").await;
    let r = api
        .call(Method::POST, "/api/v1/logout", Auth::Cookie(&c4), None)
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "csrf");
    let r = api
        .call(Method::POST, "/api/v1/logout", Auth::CookieXhr(&c4), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(me(Auth::Cookie(&c4)).await.status, StatusCode::UNAUTHORIZED);

    // A form login, as a plain HTML form posts it.
    let mut req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/login")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!(
            "name=operator1&password={}",
            PASSWORD.replace(' ', "+")
        )))
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo("127.0.0.1:1".parse::<SocketAddr>().unwrap()));
    let r = api.send(req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let op = r.cookie();
    // A login from another site is refused.
    let r = api
        .call_with(
            Method::POST,
            "/api/v1/login",
            Auth::None,
            Some(json!({"name": "operator1", "password": PASSWORD})),
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "csrf");

    // A disabled user: its session and tokens stop, it cannot log in.
    let tok = api
        .token("op-token", &[Scope::Read], Some("operator1"), None)
        .await;
    assert_eq!(
        api.call(Method::GET, "/api/v1/me", Auth::Bearer(&tok), None)
            .await
            .status,
        StatusCode::OK
    );
    api.svc.disable_user("test", "operator1").await.unwrap();
    assert_eq!(me(Auth::Cookie(&op)).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        me(Auth::Bearer(&tok)).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = api
        .login_from("127.0.0.1", "operator1", PASSWORD, None)
        .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "invalid_credentials");
}

/// Roles and scopes: 401/403 by role and by token scope, token expiry,
/// CSRF on cookie writes, ETag/If-Match, PATCH through the bus's path and
/// equal to `server set`, pagination, the error shape, the audit log.
async fn servers_story(api: Api, backend: &str) {
    for i in 1..=5 {
        api.server(&format!("web0{i}.example.org")).await;
    }
    let viewer = api.login("viewer1").await;
    let operator = api.login("operator1").await;
    let admin = api.login("admin1").await;
    let read = api.token("ci-read", &[Scope::Read], None, None).await;
    let write = api
        .token(
            "ci-write",
            &[Scope::Write],
            Some("operator1"),
            Some(3_600_000),
        )
        .await;
    let audit_tok = api
        .token("auditor", &[Scope::Admin], Some("admin1"), None)
        .await;

    // Pagination by id.
    let mut seen = Vec::new();
    let mut uri = "/api/v1/servers?limit=2".to_owned();
    loop {
        let r = api.call(Method::GET, &uri, Auth::Bearer(&read), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let items = r.body["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|s| s["name"].as_str().unwrap().to_owned()));
        match r.body["next"].as_i64() {
            Some(n) => uri = format!("/api/v1/servers?limit=2&after={n}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        (1..=5)
            .map(|i| format!("web0{i}.example.org"))
            .collect::<Vec<_>>()
    );
    let r = api
        .call(
            Method::GET,
            "/api/v1/servers?model=web&status=created&name=WEB03.example.org",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1, "{}", r.body);
    assert_eq!(r.body["items"][0]["name"], "web03.example.org");
    let r = api
        .call(
            Method::GET,
            "/api/v1/servers?status=bogus",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_value");
    let r = api
        .call(
            Method::GET,
            "/api/v1/servers?limit=0",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    let r = api
        .call(
            Method::GET,
            "/api/v1/servers?bogus=1",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");

    // Reads: every role and scope; 404 in the error shape.
    let r = api
        .call(
            Method::GET,
            "/api/v1/servers/web01.example.org",
            Auth::Cookie(&viewer),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.etag(), "\"1\"");
    let id = r.body["id"].as_i64().unwrap();
    let r = api
        .call(
            Method::GET,
            &format!("/api/v1/servers/{id}"),
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.body["name"].as_str()),
        (StatusCode::OK, Some("web01.example.org"))
    );
    let r = api
        .call(
            Method::GET,
            "/api/v1/servers/nope.example.org",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
    let r = api
        .call(Method::GET, "/api/v1/nothing", Auth::Bearer(&read), None)
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "no_route");
    let r = api
        .call(Method::DELETE, "/api/v1/me", Auth::Bearer(&read), None)
        .await;
    assert_error(&r, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    // The layers' and extractors' own refusals have the shape too.
    let big = json!({"users": "x".repeat(2 << 20)});
    let r = api
        .call_with(
            Method::PATCH,
            "/api/v1/servers/web01.example.org",
            Auth::Bearer(&read),
            Some(big),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let r = api
        .call(
            Method::GET,
            "/api/v1/servers/%FF",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    let r = api
        .call(Method::GET, "/api/v1/me", Auth::Bearer("sst_0000"), None)
        .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthenticated");

    let web01 = "/api/v1/servers/web01.example.org";
    let change = json!({"external_ip": "192.0.2.10", "users": ["alice", "bob"], "is_vm": true});
    let if1 = [("if-match", "\"1\"")];
    // 403 by role and by scope (the CSRF header present: not the reason).
    let r = api
        .call_with(
            Method::PATCH,
            web01,
            Auth::CookieXhr(&viewer),
            Some(change.clone()),
            &if1,
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api
        .call_with(
            Method::PATCH,
            web01,
            Auth::Bearer(&read),
            Some(change.clone()),
            &if1,
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api
        .call_with(Method::PATCH, web01, Auth::None, Some(change.clone()), &if1)
        .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
    // CSRF: the operator's cookie without proof of our own page.
    let r = api
        .call_with(
            Method::PATCH,
            web01,
            Auth::Cookie(&operator),
            Some(change.clone()),
            &if1,
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "csrf");
    let evil = [("if-match", "\"1\""), ("origin", "https://evil.example")];
    let r = api
        .call_with(
            Method::PATCH,
            web01,
            Auth::Cookie(&operator),
            Some(change.clone()),
            &evil,
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "csrf");
    // Preconditions.
    let r = api
        .call(
            Method::PATCH,
            web01,
            Auth::CookieXhr(&operator),
            Some(change.clone()),
        )
        .await;
    assert_error(
        &r,
        StatusCode::PRECONDITION_REQUIRED,
        "precondition_required",
    );
    let r = api
        .call_with(
            Method::PATCH,
            web01,
            Auth::CookieXhr(&operator),
            Some(change.clone()),
            &[("if-match", "\"7\"")],
        )
        .await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let r = api
        .call_with(
            Method::PATCH,
            web01,
            Auth::CookieXhr(&operator),
            Some(json!({"external_ip": "not-an-ip"})),
            &if1,
        )
        .await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "invalid_value");
    let r = api
        .call_with(
            Method::PATCH,
            web01,
            Auth::CookieXhr(&operator),
            Some(json!({"revision": 1})),
            &if1,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    // Nothing of that was written.
    let r = api
        .call(Method::GET, web01, Auth::Bearer(&read), None)
        .await;
    assert_eq!(r.etag(), "\"1\"");

    // The change, with a same-origin Origin instead of X-Requested-With.
    let ok = [("if-match", "\"1\""), ("origin", "http://127.0.0.1:8467")];
    let r = api
        .call_with(
            Method::PATCH,
            web01,
            Auth::Cookie(&operator),
            Some(change.clone()),
            &ok,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.etag(), "\"2\"");
    let patched = r.body.clone();
    // The old ETag no longer matches; a bearer write needs no CSRF proof.
    let r = api
        .call_with(
            Method::PATCH,
            web01,
            Auth::Bearer(&write),
            Some(json!({"proxmox_node": "pve1"})),
            &if1,
        )
        .await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");

    // The same change through `server set` on web02: equal records.
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "registry: {}\nkeys: {{dir: {}}}\n",
            api.db.url,
            cfg_dir.path().join("keys").display()
        ),
    )
    .unwrap();
    let out = steward()
        .arg("--config")
        .arg(&cfg)
        .args([
            "server",
            "set",
            "web02.example.org",
            "external_ip=192.0.2.10",
            "users=alice,bob",
            "is_vm=true",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    let strip = |v: &Value| {
        let mut m = v.as_object().unwrap().clone();
        for k in ["id", "name", "minion_id", "created_at", "updated_at"] {
            m.remove(k);
        }
        m
    };
    assert_eq!(strip(&patched), strip(&by_cli), "{backend}");

    // A write token, expiring.
    let r = api
        .call_with(
            Method::PATCH,
            web01,
            Auth::Bearer(&write),
            Some(json!({"proxmox_node": "pve1"})),
            &[("if-match", "\"2\"")],
        )
        .await;
    assert_eq!(
        (r.status, r.etag()),
        (StatusCode::OK, "\"3\""),
        "{}",
        r.body
    );
    api.advance(3_600_000);
    let r = api
        .call(Method::GET, "/api/v1/me", Auth::Bearer(&write), None)
        .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
    api.advance(-3_600_000);

    // The audit log: admins only; both writes there, with their actors.
    let r = api
        .call(
            Method::GET,
            "/api/v1/audit",
            Auth::CookieXhr(&operator),
            None,
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api
        .call(Method::GET, "/api/v1/audit", Auth::Bearer(&read), None)
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api
        .call(
            Method::GET,
            "/api/v1/audit?limit=3",
            Auth::Cookie(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let first = r.body["items"].as_array().unwrap().clone();
    assert_eq!(first[0]["action"], "server.update");
    assert_eq!(first[0]["actor"], "token:ci-write");
    assert_eq!(first[1]["action"], "server.update");
    assert_eq!(first[1]["actor"], "user:operator1");
    assert_eq!(first[1]["detail"]["changes"], change);
    let next = r.body["next"].as_i64().unwrap();
    let r = api
        .call(
            Method::GET,
            &format!("/api/v1/audit?before={next}&limit=1000"),
            Auth::Bearer(&audit_tok),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let text = r.body.to_string() + &first.iter().map(Value::to_string).collect::<String>();
    for secret in [
        read.as_str(),
        write.as_str(),
        audit_tok.as_str(),
        PASSWORD,
        viewer.as_str(),
    ] {
        assert!(!text.contains(secret), "a secret in the audit log");
    }
    assert!(
        text.contains("\"token.add\"") && text.contains("\"user.add\""),
        "{text}"
    );
}

#[tokio::test]
async fn http_api_sessions_on_sqlite() {
    session_story(Api::new(TestDb::sqlite()).await).await;
}

#[tokio::test]
async fn http_api_sessions_on_postgres() {
    session_story(Api::new(TestDb::postgres_required().await).await).await;
}

#[tokio::test]
async fn http_api_servers_on_sqlite() {
    servers_story(Api::new(TestDb::sqlite()).await, "sqlite").await;
}

#[tokio::test]
async fn http_api_servers_on_postgres() {
    servers_story(
        Api::new(TestDb::postgres_required().await).await,
        "postgres",
    )
    .await;
}

/// Five failures a minute per client address and per user name, then 429
/// with Retry-After — even for the right password — until the minute passed.
#[tokio::test]
async fn http_api_login_is_rate_limited() {
    let api = Api::with(
        TestDb::sqlite(),
        HttpConfig {
            login_failures_per_minute: 5,
            ..HttpConfig::default()
        },
    )
    .await;
    for _ in 0..5 {
        let r = api
            .login_from("10.0.0.1", "admin1", "wrong password!", None)
            .await;
        assert_error(&r, StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    let r = api.login_from("10.0.0.1", "admin1", PASSWORD, None).await;
    assert_error(&r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let wait: u64 = r.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // The name is limited from another address too; another name from
    // another address is not.
    let r = api.login_from("10.0.0.2", "admin1", PASSWORD, None).await;
    assert_error(&r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let r = api.login_from("10.0.0.2", "viewer1", PASSWORD, None).await;
    assert_eq!(r.status, StatusCode::OK);
    // Successful logins do not count against the address.
    for _ in 0..6 {
        assert_eq!(
            api.login_from("10.0.0.3", "viewer1", PASSWORD, None)
                .await
                .status,
            StatusCode::OK
        );
    }
    api.advance(60_001);
    let r = api.login_from("10.0.0.1", "admin1", PASSWORD, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // Names no user can have (too long, any bytes) share one key: the
    // limiter's memory does not grow with what is sent.
    for i in 0..5 {
        let name = format!("{i}{}", "x".repeat(10_000));
        let r = api
            .login_from(&format!("10.0.1.{i}"), &name, "wrong password!", None)
            .await;
        assert_error(&r, StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    let r = api
        .login_from("10.0.1.9", "no such:name", "wrong password!", None)
        .await;
    assert_error(&r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
}

// ------------------------------------------------------------------- CLI

fn config(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "registry: sqlite://{}\nkeys: {{dir: {}}}\n",
            dir.join("registry.db").display(),
            dir.join("keys").display()
        ),
    )
    .unwrap();
    cfg
}

pub(crate) fn cli_with_stdin(cfg: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut child = steward()
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env("USER", "tester")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn http_api_cli_user_add_reads_stdin_and_token_add_prints_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let out = cli_with_stdin(
        &cfg,
        &["user", "add", "alice", "--role", "operator"],
        "short\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 12 characters"));
    let out = cli_with_stdin(&cfg, &["user", "add", "alice", "--role", "root"], "");
    assert_eq!(out.status.code(), Some(1));
    let out = cli_with_stdin(
        &cfg,
        &["user", "add", "alice", "--role", "operator"],
        &format!("{PASSWORD}\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli_with_stdin(
        &cfg,
        &["user", "add", "alice", "--role", "admin"],
        &format!("{PASSWORD}\n"),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let out = cli_with_stdin(
        &cfg,
        &[
            "token",
            "add",
            "deploy",
            "--scope",
            "read",
            "--scope",
            "write",
            "--expires",
            "30d",
            "--user",
            "alice",
        ],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("sst_") && token.len() == 68, "{token}");
    let out = cli_with_stdin(
        &cfg,
        &[
            "token", "add", "too-much", "--scope", "admin", "--user", "alice",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    let list = cli_with_stdin(&cfg, &["token", "list", "--json"], "");
    let list_text = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        list_text.contains("\"deploy\"") && !list_text.contains(&token),
        "{list_text}"
    );
    let db = std::fs::read(dir.path().join("registry.db")).unwrap();
    let wal = std::fs::read(dir.path().join("registry.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains(&token) && !text.contains(PASSWORD),
            "a secret in the database file"
        );
    }

    // What the CLI wrote works with the API, and is audited as the CLI's.
    let svc = registry::open(&format!(
        "sqlite://{}",
        dir.path().join("registry.db").display()
    ))
    .await
    .unwrap();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let p = svc.token_principal(&token, now).await.unwrap().unwrap();
    assert_eq!(p.user.unwrap().name, "alice");
    let log = svc.audit_log(None, 10).await.unwrap();
    assert!(log.iter().all(|e| e.actor == "cli:tester"), "{log:?}");
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log.iter().any(|e| e.action == "token.add") && log.iter().any(|e| e.action == "user.add")
    );
    // passwd: same input rules; the old password stops working.
    let out = cli_with_stdin(&cfg, &["user", "passwd", "alice"], "still short\n");
    assert_eq!(out.status.code(), Some(1));
    let out = cli_with_stdin(
        &cfg,
        &["user", "passwd", "alice"],
        "another long password\r\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let limits = SessionLimits {
        idle_ms: IDLE_MS,
        absolute_ms: ABSOLUTE_MS,
    };
    let login = |pw: &'static str| svc.login("alice", pw.to_owned(), None, now, limits);
    assert!(login(PASSWORD).await.unwrap().is_none());
    assert!(login("another long password").await.unwrap().is_some());
    let out = cli_with_stdin(&cfg, &["user", "disable", "alice"], "");
    assert!(out.status.success());
    assert!(svc.token_principal(&token, now).await.unwrap().is_none());
    let out = cli_with_stdin(&cfg, &["token", "rm", "deploy"], "");
    assert!(out.status.success());
    let out = cli_with_stdin(&cfg, &["user", "list"], "");
    assert!(String::from_utf8_lossy(&out.stdout).contains("alice\toperator\ttrue"));
}

// ------------------------------------------------------ in the daemon

/// One HTTP/1.1 request on loopback (connection closed after): status,
/// headers (names lower-cased, repeated ones joined by "\n"), body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, std::collections::HashMap<String, String>, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut map = std::collections::HashMap::<String, String>::new();
    for (k, v) in lines.filter_map(|l| l.split_once(':')) {
        let e = map.entry(k.trim().to_ascii_lowercase()).or_default();
        if !e.is_empty() {
            e.push('\n');
        }
        e.push_str(v.trim());
    }
    (status, map, body.to_owned())
}

/// The daemon serves the API as its `http` component on the configured
/// loopback port: a user made with the CLI logs in, lists the servers the
/// CLI made; the rate limit keys on the connection's address (the daemon
/// passes it); an idle keep-alive connection does not hold up SIGTERM.
#[test]
fn http_api_served_by_the_daemon() {
    use crate::support::salt::free_port;
    use crate::support::{cli, run_ok, start_daemon, steward_config, SaltHarness};

    let h = SaltHarness::start();
    h.wait_req_ready();
    let port = free_port();
    let cfg = steward_config(
        &h,
        &[],
        &format!("http:\n  listen: 127.0.0.1:{port}\n  cookie_secure: false\n"),
    );
    run_ok(cli(&cfg, &["model", "add", "web"]));
    run_ok(cli(
        &cfg,
        &["server", "add", "web01.example.org", "--model", "web"],
    ));
    let out = cli_with_stdin(
        &cfg,
        &["user", "add", "alice", "--role", "viewer"],
        &format!("{PASSWORD}\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut daemon = start_daemon(&cfg);
    daemon.wait_err_line("http started", crate::support::T, |l| {
        l.contains("HTTP API listening")
    });

    let json_ct = ("Content-Type", "application/json");
    let login = json!({"name": "alice", "password": PASSWORD}).to_string();
    let (status, headers, body) = http(port, "POST", "/api/v1/login", &[json_ct], &login);
    assert_eq!(status, 200, "{body}");
    let set = &headers["set-cookie"];
    assert!(!set.contains("Secure") && set.contains("HttpOnly"), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    let (status, headers, body) = http(port, "GET", "/api/v1/servers", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-frame-options"], "DENY");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["items"][0]["name"], "web01.example.org");
    // The daemon hands the API its rules engine and its master's pki dir.
    let (status, _, body) = http(port, "GET", "/api/v1/rules", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["dir"].is_string() && v["counters"]["reloads"].is_u64(),
        "{v}"
    );
    let (status, _, body) = http(port, "GET", "/api/v1/alerts", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = http(port, "GET", "/api/v1/keys", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "{body}");
    // The dashboard's rules page reads the same engine.
    let (status, _, body) = http(port, "GET", "/rules", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("id=\"rule-errors\""), "{body}");
    // The bundle is the admins', and the very tar.gz `server bundle` writes.
    let (status, _, body) = http(
        port,
        "GET",
        "/api/v1/servers/web01.example.org/bundle",
        &[("Cookie", &cookie)],
        "",
    );
    assert_eq!(status, 403, "{body}");
    // This master signs nothing: the bundle needs its signing key's file.
    let pki_dir = salt_steward::master_config::MasterConfig::load(&h.master_config())
        .unwrap()
        .pki_dir;
    std::fs::write(
        pki_dir.join("master_sign.pub"),
        "-----BEGIN PUBLIC KEY-----\nsigning\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let out = cli_with_stdin(
        &cfg,
        &["user", "add", "root1", "--role", "admin"],
        &format!("{PASSWORD}\n"),
    );
    assert!(out.status.success());
    let login = json!({"name": "root1", "password": PASSWORD}).to_string();
    let (status, headers, body) = http(port, "POST", "/api/v1/login", &[json_ct], &login);
    assert_eq!(status, 200, "{body}");
    let admin = headers["set-cookie"].split(';').next().unwrap().to_owned();
    let downloaded = {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        write!(
            s,
            "GET /api/v1/servers/web01.example.org/bundle HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Connection: close\r\nCookie: {admin}\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw[..at]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-disposition: attachment"), "{head}");
        assert!(head.contains("cache-control: no-store"), "{head}");
        raw[at + 4..].to_vec()
    };
    let file = cfg.with_file_name("web01-bundle.tar.gz");
    run_ok(cli(
        &cfg,
        &[
            "server",
            "bundle",
            "web01.example.org",
            "-o",
            file.to_str().unwrap(),
        ],
    ));
    assert_eq!(downloaded, std::fs::read(&file).unwrap());

    // Failures under five different names from this address: the sixth
    // attempt, with yet another name, is refused on the address alone.
    for i in 0..5 {
        let bad = json!({"name": format!("nobody{i}"), "password": "wrong password!"}).to_string();
        assert_eq!(http(port, "POST", "/api/v1/login", &[json_ct], &bad).0, 401);
    }
    let (status, headers, _) = http(port, "POST", "/api/v1/login", &[json_ct], &login);
    assert_eq!(status, 429);
    assert!(headers.contains_key("retry-after"));

    // An idle keep-alive connection open while the daemon stops.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    {
        use std::io::{Read as _, Write as _};
        write!(
            idle,
            "GET /api/v1/me HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: {cookie}\r\n\r\n"
        )
        .unwrap();
        let mut buf = [0u8; 512];
        assert!(idle.read(&mut buf).unwrap() > 0);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait_exit(std::time::Duration::from_secs(15));
    assert!(status.success(), "{}", daemon.seen_err.join("\n"));
    assert!(
        daemon
            .seen_err
            .iter()
            .any(|l| l.contains("Stopped component") && l.contains("http")),
        "{}",
        daemon.seen_err.join("\n")
    );
    // Nothing secret in the daemon's log.
    let log = daemon.seen_err.join("\n");
    assert!(
        !log.contains(PASSWORD) && !log.contains(&cookie[16..]),
        "{log}"
    );
}

/// No secret in the daemon's answers or its log (debug level): with a
/// user, an API token and a share made with the CLI (the token and the
/// share's password printed once), and a server whose key pair the
/// registry issued (its private key in the key store), every GET of the
/// API (by session and by token) and every dashboard page carries none of
/// the user's password, the session, the token, the share's password or NT
/// hash, the private key's PEM body or an argon2 hash; nor does the
/// daemon's log, stopped afterwards.
#[test]
fn http_api_no_secret_in_the_daemons_answers_or_log() {
    use crate::support::salt::free_port;
    use crate::support::{cli, run_ok, start_daemon, steward_config, SaltHarness};

    let h = SaltHarness::start();
    h.wait_req_ready();
    let port = free_port();
    let cfg = steward_config(
        &h,
        &[],
        &format!(
            "http:\n  listen: 127.0.0.1:{port}\n  cookie_secure: false\nlog:\n  level: debug\n"
        ),
    );
    run_ok(cli(&cfg, &["model", "add", "web"]));
    let out = run_ok(cli(
        &cfg,
        &[
            "server",
            "add",
            "files1.example.org",
            "--model",
            "web",
            "--samba-base",
            "/srv/samba",
            "--json",
        ],
    ));
    let server: Value = serde_json::from_slice(&out.stdout).unwrap();
    let minion = server["minion_id"].as_str().unwrap().to_owned();
    let out = cli_with_stdin(
        &cfg,
        &["user", "add", "alice", "--role", "admin"],
        &format!("{PASSWORD}\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli_with_stdin(&cfg, &["token", "add", "ci", "--scope", "read"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("sst_"), "{token}");
    let out = run_ok(cli(
        &cfg,
        &[
            "share",
            "add",
            "files1.example.org",
            "docs",
            "docs",
            "--json",
        ],
    ));
    let share: Value = serde_json::from_slice(&out.stdout).unwrap();
    let share_password = share["password"].as_str().unwrap().to_owned();
    let share_id = share["id"].as_i64().unwrap();
    // What the registry stores: MD4 of the UTF-16LE password, in hex.
    let nt: String = {
        use md4::{Digest as _, Md4};
        let utf16: Vec<u8> = share_password
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        Md4::digest(&utf16)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    // The private keys in the key store: a line of each PEM body.
    let mut secrets: Vec<(&str, String)> = vec![
        ("the user's password", PASSWORD.to_owned()),
        ("the token", token.clone()),
        ("the share's password", share_password.clone()),
        ("the NT hash", nt),
        ("an argon2 hash", "$argon2id$".to_owned()),
    ];
    let mut stack = vec![h.root().join("keys")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                if text.contains("PRIVATE KEY") {
                    secrets.push(("a private key", text.lines().nth(2).unwrap().to_owned()));
                }
            }
        }
    }
    assert!(
        secrets.iter().any(|(w, _)| *w == "a private key"),
        "no private key under {}/keys",
        h.root().display()
    );

    let mut daemon = start_daemon(&cfg);
    daemon.wait_err_line("http started", crate::support::T, |l| {
        l.contains("HTTP API listening")
    });
    let login = json!({"name": "alice", "password": PASSWORD}).to_string();
    let (status, headers, body) = http(
        port,
        "POST",
        "/api/v1/login",
        &[("Content-Type", "application/json")],
        &login,
    );
    assert_eq!(status, 200, "{body}");
    let cookie = headers["set-cookie"].split(';').next().unwrap().to_owned();
    secrets.push((
        "the session",
        cookie.trim_start_matches("steward_session=").to_owned(),
    ));
    let bearer = format!("Bearer {token}");
    let api = [
        "/api/v1/me".to_owned(),
        "/api/v1/servers".to_owned(),
        "/api/v1/servers/files1.example.org".to_owned(),
        "/api/v1/models".to_owned(),
        "/api/v1/forwards/port".to_owned(),
        "/api/v1/forwards/hostname".to_owned(),
        "/api/v1/shares".to_owned(),
        format!("/api/v1/shares/{share_id}"),
        "/api/v1/backups".to_owned(),
        "/api/v1/dispatches".to_owned(),
        "/api/v1/exec".to_owned(),
        "/api/v1/keys".to_owned(),
        "/api/v1/rules".to_owned(),
        "/api/v1/alerts".to_owned(),
        "/api/v1/audit".to_owned(),
        "/api/v1/openapi.json".to_owned(),
    ];
    let pages = [
        "/".to_owned(),
        "/fragments/overview".to_owned(),
        "/servers".to_owned(),
        "/servers/files1.example.org".to_owned(),
        "/keys".to_owned(),
        "/dispatches".to_owned(),
        "/backups".to_owned(),
        "/audit".to_owned(),
        "/admin".to_owned(),
    ];
    let mut answered = Vec::new();
    let mut check = |uri: &str, auth: &[(&str, &str)]| {
        let (status, _, body) = http(port, "GET", uri, auth, "");
        answered.push((uri.to_owned(), status));
        for (what, secret) in &secrets {
            assert!(!body.contains(secret.as_str()), "{what} in {uri}: {body}");
        }
        body
    };
    for uri in api.iter().chain(&pages) {
        check(uri, &[("Cookie", &cookie)]);
    }
    for uri in &api {
        check(uri, &[("Authorization", &bearer)]);
    }
    // The token and the session worked: the answers were the real ones.
    let body = check("/api/v1/servers", &[("Authorization", &bearer)]);
    assert!(body.contains(&minion), "{body}");
    let body = check("/admin", &[("Cookie", &cookie)]);
    assert!(body.contains("alice"), "{body}");
    let ok = answered.iter().filter(|(_, s)| *s == 200).count();
    assert!(ok + 4 >= answered.len(), "{answered:?}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait_exit(std::time::Duration::from_secs(15));
    assert!(status.success(), "{}", daemon.seen_err.join("\n"));
    let log = daemon.seen_err.join("\n");
    assert!(
        log.contains("/api/v1/shares"),
        "the requests were not logged:\n{log}"
    );
    for (what, secret) in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "{what} in the daemon's log:\n{log}"
        );
    }
}

/// The inventory over HTTP: servers created and deleted, models, port
/// forwards, shares and backups — each list equal to the registry's (what
/// the CLI's `--json` lists print), 401/403/CSRF on writes, 409 on
/// duplicates, 404 on unknown ids, every write audited with its actor, a
/// share's password in its one response and nowhere in the audit log.
async fn inventory_story(api: Api) {
    let viewer = api.login("viewer1").await;
    let operator = api.login("operator1").await;
    let read = api.token("inv-read", &[Scope::Read], None, None).await;
    let write = api
        .token("inv-write", &[Scope::Write], Some("operator1"), None)
        .await;
    let post = |uri: &'static str, body: Value| {
        let write = write.clone();
        let api = &api;
        async move {
            api.call(Method::POST, uri, Auth::Bearer(&write), Some(body))
                .await
        }
    };

    // Models.
    let r = post(
        "/api/v1/models",
        json!({"name": "vm", "description": "guests"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["name"], "vm");
    let r = post("/api/v1/models", json!({"name": "vm"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = post("/api/v1/models", json!({"name": "x", "colour": "red"})).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    let r = api
        .call(
            Method::POST,
            "/api/v1/models",
            Auth::Bearer(&read),
            Some(json!({"name": "y"})),
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api
        .call(
            Method::POST,
            "/api/v1/models",
            Auth::CookieXhr(&viewer),
            Some(json!({"name": "y"})),
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api
        .call(
            Method::POST,
            "/api/v1/models",
            Auth::Cookie(&operator),
            Some(json!({"name": "y"})),
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "csrf");
    let r = api
        .call(
            Method::POST,
            "/api/v1/models",
            Auth::None,
            Some(json!({"name": "y"})),
        )
        .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
    let r = api
        .call(Method::GET, "/api/v1/models", Auth::Cookie(&viewer), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let mut models = api.svc.list_models().await.unwrap();
    models.sort_by_key(|m| m.id);
    assert_eq!(r.body["items"], serde_json::to_value(&models).unwrap());
    // Walked one at a time: every model once, by id, then `next` null.
    let mut walked = Vec::new();
    let mut uri = "/api/v1/models?limit=1".to_owned();
    loop {
        let r = api
            .call(Method::GET, &uri, Auth::Cookie(&viewer), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        walked.extend(r.body["items"].as_array().unwrap().iter().cloned());
        match r.body["next"].as_i64() {
            Some(n) => uri = format!("/api/v1/models?limit=1&after={n}"),
            None => break,
        }
    }
    assert!(models.len() >= 2, "{models:?}");
    assert_eq!(Value::Array(walked), serde_json::to_value(&models).unwrap());
    let r = api
        .call(
            Method::POST,
            "/api/v1/models",
            Auth::CookieXhr(&operator),
            Some(json!({"name": "tmp"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = api
        .call(
            Method::DELETE,
            "/api/v1/models/tmp",
            Auth::Bearer(&write),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = api
        .call(
            Method::DELETE,
            "/api/v1/models/tmp",
            Auth::Bearer(&write),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // Servers: created over HTTP (with an ETag), one deleted.
    for s in [
        json!({"name": "pve1", "model": "vm", "is_proxmox_host": true,
               "external_interface": "vmbr0", "internal_network": "10.99.0.0/24"}),
        json!({"name": "vm1", "model": "vm", "is_vm": true, "vm_host": "pve1",
               "internal_ip": "10.99.0.5"}),
        json!({"name": "files1", "model": "web", "samba_base": "/srv/samba"}),
        json!({"name": "src1", "model": "web", "internal_ip": "10.1.0.5"}),
        json!({"name": "bk1", "model": "web"}),
        json!({"name": "gone", "model": "web"}),
    ] {
        let r = post("/api/v1/servers", s).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        assert_eq!(r.etag(), format!("\"{}\"", r.body["revision"]));
    }
    let r = post("/api/v1/servers", json!({"name": "gone", "model": "web"})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = api
        .call(
            Method::DELETE,
            "/api/v1/servers/gone",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api
        .call(
            Method::DELETE,
            "/api/v1/servers/gone",
            Auth::Bearer(&write),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["name"], "gone");
    let r = api
        .call(
            Method::GET,
            "/api/v1/servers/gone",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // Port forwards.
    for port in [2222, 2223, 2224] {
        let r = post(
            "/api/v1/forwards/port",
            json!({"host": "pve1", "dest": "vm1", "proto": "tcp", "port": port, "to_port": 22}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    let r = post(
        "/api/v1/forwards/port",
        json!({"host": "pve1", "dest": "vm1", "proto": "tcp", "port": 2222, "to_port": 80}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = api
        .call(
            Method::GET,
            "/api/v1/forwards/port?limit=2&host=pve1",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let all = serde_json::to_value(api.svc.list_port_forwards(None).await.unwrap()).unwrap();
    assert_eq!(
        r.body["items"].as_array().unwrap()[..],
        all.as_array().unwrap()[..2]
    );
    let next = r.body["next"].as_i64().unwrap();
    let r = api
        .call(
            Method::GET,
            &format!("/api/v1/forwards/port?after={next}"),
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(
        r.body["items"].as_array().unwrap()[..],
        all.as_array().unwrap()[2..]
    );
    assert_eq!(r.body["next"], Value::Null);
    let r = api
        .call(
            Method::GET,
            "/api/v1/forwards/port?colour=red",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    let id = all[0]["id"].as_i64().unwrap();
    let r = api
        .call(
            Method::GET,
            &format!("/api/v1/forwards/port/{id}"),
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r.body, all[0]);
    let r = api
        .call(
            Method::DELETE,
            &format!("/api/v1/forwards/port/{id}"),
            Auth::Bearer(&write),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = api
        .call(
            Method::GET,
            &format!("/api/v1/forwards/port/{id}"),
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
    let r = api
        .call(
            Method::DELETE,
            "/api/v1/forwards/port/999999",
            Auth::Bearer(&write),
            None,
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
    let r = api
        .call(
            Method::GET,
            "/api/v1/forwards/hostname",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r.body, json!({"items": [], "next": null}));

    // Shares: the password once.
    let r = post(
        "/api/v1/shares",
        json!({"server": "files1", "name": "docs", "folder": "docs"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let first = r.body["password"].as_str().unwrap().to_owned();
    let share = r.body["id"].as_i64().unwrap();
    let r = post(
        "/api/v1/shares",
        json!({"server": "files1", "name": "docs", "folder": "x"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = api
        .call(
            Method::GET,
            "/api/v1/shares?server=files1",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(
        r.body["items"],
        serde_json::to_value(api.svc.list_shares(None).await.unwrap()).unwrap()
    );
    assert!(!r.body.to_string().contains(&first));
    let r = api
        .call(
            Method::POST,
            &format!("/api/v1/shares/{share}/passwd"),
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api
        .call(
            Method::POST,
            &format!("/api/v1/shares/{share}/passwd"),
            Auth::Bearer(&write),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let second = r.body["password"].as_str().unwrap().to_owned();
    assert_ne!(first, second);

    // Backups, with health and results.
    let r = post(
        "/api/v1/backups",
        json!({"source": "src1", "source_folder": "/srv/data", "dest": "bk1",
               "dest_folder": "/b/src1", "excludes": ["cache/"]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let backup = r.body["id"].as_i64().unwrap();
    let r = post(
        "/api/v1/backups",
        json!({"source": "src1", "source_folder": "/srv/data", "dest": "bk1",
               "dest_folder": "/b/src1"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = api
        .call(
            Method::GET,
            "/api/v1/backups?dest=bk1",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let listed = serde_json::to_value(api.svc.list_backups(None).await.unwrap()).unwrap();
    assert_eq!(r.body["items"][0]["id"], listed[0]["id"]);
    assert_eq!(r.body["items"][0]["dest_folder"], listed[0]["dest_folder"]);
    assert_eq!(r.body["items"][0]["health"], "never_run");
    let r = api
        .call(
            Method::GET,
            "/api/v1/backups?dest=src1",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r.body["items"], json!([]));
    let r = api
        .call(
            Method::GET,
            &format!("/api/v1/backups/{backup}"),
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["results"], json!([]));
    assert_eq!(r.body["health"], "never_run");
    let r = api
        .call(
            Method::DELETE,
            &format!("/api/v1/backups/{backup}"),
            Auth::Bearer(&write),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = api
        .call(
            Method::GET,
            &format!("/api/v1/backups/{backup}"),
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
    let r = api
        .call(
            Method::DELETE,
            &format!("/api/v1/shares/{share}"),
            Auth::Bearer(&write),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // The audit log: every write with its actor; no password anywhere.
    let log = api.svc.audit_log(None, 1000).await.unwrap();
    let text = serde_json::to_string(&log).unwrap();
    for secret in [&first, &second] {
        assert!(!text.contains(secret.as_str()), "{text}");
    }
    for action in [
        "model.create",
        "model.delete",
        "server.create",
        "server.delete",
        "forward.port.create",
        "forward.port.delete",
        "share.create",
        "share.passwd",
        "share.delete",
        "backup.create",
        "backup.delete",
    ] {
        assert!(text.contains(&format!("\"{action}\"")), "{action}: {text}");
    }
    assert!(text.contains("\"token:inv-write\""), "{text}");
    assert!(text.contains("\"user:operator1\""), "{text}");
}

#[tokio::test]
async fn http_api_inventory_on_sqlite() {
    inventory_story(Api::new(TestDb::sqlite()).await).await;
}

#[tokio::test]
async fn http_api_inventory_on_postgres() {
    inventory_story(Api::new(TestDb::postgres_required().await).await).await;
}

/// Dispatch targets and their retry, exec's record, and exec refused
/// without the daemon's Salt client (503) or without the operator role.
async fn ops_story(api: Api) {
    api.server("web01.example.org").await;
    let read = api.token("ops-read", &[Scope::Read], None, None).await;
    let write = api
        .token("ops-write", &[Scope::Write], Some("operator1"), None)
        .await;
    let r = api
        .call(
            Method::GET,
            "/api/v1/dispatches?server=web01.example.org",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r2 = api
        .call(
            Method::GET,
            "/api/v1/dispatches?status=bogus",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r2.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r2.body);
    let r = api
        .call(
            Method::POST,
            "/api/v1/dispatches/web01.example.org/retry",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api
        .call(
            Method::POST,
            "/api/v1/dispatches/web01.example.org/retry",
            Auth::Bearer(&write),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["server"], "web01.example.org");
    let r = api
        .call(
            Method::POST,
            "/api/v1/dispatches/nope/retry",
            Auth::Bearer(&write),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    let body = json!({"server": "web01.example.org", "fun": "test.ping"});
    let r = api
        .call(
            Method::POST,
            "/api/v1/exec",
            Auth::Bearer(&read),
            Some(body.clone()),
        )
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api
        .call(
            Method::POST,
            "/api/v1/exec",
            Auth::Bearer(&write),
            Some(body),
        )
        .await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let r = api
        .call(
            Method::GET,
            "/api/v1/exec?limit=5",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["items"], json!([]));
    let log = serde_json::to_string(&api.svc.audit_log(None, 100).await.unwrap()).unwrap();
    assert!(log.contains("\"dispatch.retry\""), "{log}");
}

#[tokio::test]
async fn http_api_ops_on_sqlite() {
    ops_story(Api::new(TestDb::sqlite()).await).await;
}

#[tokio::test]
async fn http_api_ops_on_postgres() {
    ops_story(Api::new(TestDb::postgres_required().await).await).await;
}

/// `GET /api/v1/openapi.json` needs no credentials and is the committed
/// `docs/openapi.json`; every operation it lists is routed (without
/// credentials each answers 401, never `no_route` or 405), and a route
/// missing from it would show as a difference in the committed file's
/// review (the unit test `openapi` keeps the file current).
#[tokio::test]
async fn http_api_openapi_document_is_served_and_matches_the_router() {
    let api = Api::new(TestDb::sqlite()).await;
    let r = api
        .call(Method::GET, "/api/v1/openapi.json", Auth::None, None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        r.body, committed,
        "regenerate docs/openapi.json: UPDATE_OPENAPI=1 cargo nextest run --lib openapi"
    );
    let mut operations = 0;
    for (path, item) in r.body["paths"].as_object().unwrap() {
        let uri = path
            .replace("{id}", "1")
            .replace("{server}", "web01")
            .replace("{minion}", "web01-00000000")
            .replace("{name}", "web");
        for method in item.as_object().unwrap().keys() {
            operations += 1;
            let m: Method = method.to_uppercase().parse().unwrap();
            let r = api.call(m.clone(), &uri, Auth::None, None).await;
            assert_ne!(r.code(), "no_route", "{m} {uri}");
            assert_ne!(r.code(), "method_not_allowed", "{m} {uri}");
            let open = ["/api/v1/openapi.json", "/api/v1/login"].contains(&path.as_str());
            if !open {
                assert_error(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
            }
        }
    }
    assert!(operations >= 38, "{operations}");

    // Every write but the session's needs more than viewer / scope read.
    let viewer = api.login("viewer1").await;
    let read = api.token("doc-read", &[Scope::Read], None, None).await;
    let mut writes = 0;
    for (path, item) in r.body["paths"].as_object().unwrap() {
        if ["/api/v1/login", "/api/v1/logout"].contains(&path.as_str()) {
            continue;
        }
        let uri = path
            .replace("{id}", "1")
            .replace("{server}", "web01")
            .replace("{minion}", "web01-00000000")
            .replace("{name}", "web");
        for method in item.as_object().unwrap().keys() {
            if method == "get" {
                continue;
            }
            writes += 1;
            let m: Method = method.to_uppercase().parse().unwrap();
            let r = api
                .call(m.clone(), &uri, Auth::Bearer(&read), Some(json!({})))
                .await;
            assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
            let r = api
                .call(m.clone(), &uri, Auth::CookieXhr(&viewer), Some(json!({})))
                .await;
            assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
        }
    }
    assert!(writes >= 18, "{writes}");
}

/// `GET /api/v1/keys`: the master's key directories, each key's presented
/// fingerprint beside the registry's issued one; 503 without a pki dir.
#[tokio::test]
async fn http_api_keys_read_the_master_pki_dir() {
    let api = Api::new(TestDb::sqlite()).await;
    api.server("web01.example.org").await;
    let read = api.token("keys-read", &[Scope::Read], None, None).await;
    let r = api
        .call(Method::GET, "/api/v1/keys", Auth::Bearer(&read), None)
        .await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "unavailable");

    let server = api
        .svc
        .get_server(&registry::ServerRef::Name("web01.example.org".into()))
        .await
        .unwrap();
    let pki = tempfile::tempdir().unwrap();
    for d in ["minions", "minions_pre", "minions_rejected"] {
        std::fs::create_dir(pki.path().join(d)).unwrap();
    }
    let other = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
    let presented = server
        .public_key
        .clone()
        .unwrap_or_else(|| other.to_owned());
    std::fs::write(
        pki.path().join("minions").join(&server.minion_id),
        &presented,
    )
    .unwrap();
    std::fs::write(pki.path().join("minions_pre").join("stranger"), other).unwrap();
    let state =
        HttpState::new(api.svc.clone(), &HttpConfig::default()).with_pki_dir(pki.path().to_owned());
    let app = router(Arc::new(state));
    let api = Api { app, ..api };
    let r = api
        .call(Method::GET, "/api/v1/keys", Auth::Bearer(&read), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let m = &r.body["items"][0];
    let fp = salt_steward::pki::keys::fingerprint(&presented);
    assert_eq!(
        m["accepted"][0]["minion_id"],
        server.minion_id.as_str(),
        "{m}"
    );
    assert_eq!(m["accepted"][0]["fingerprint"], fp.as_str(), "{m}");
    assert_eq!(m["accepted"][0]["server"], "web01.example.org", "{m}");
    assert_eq!(
        m["accepted"][0]["issued_fingerprint"],
        json!(server.key_fingerprint),
        "{m}"
    );
    if server.key_fingerprint.is_some() {
        assert_eq!(m["accepted"][0]["matches"], true, "{m}");
    }
    assert_eq!(m["pending"][0]["minion_id"], "stranger", "{m}");
    let r = api
        .call(
            Method::GET,
            "/api/v1/keys?state=pending",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let only = &r.body["items"][0];
    assert_eq!(only["pending"][0]["minion_id"], "stranger", "{only}");
    assert!(only.get("accepted").is_none(), "{only}");
    let r = api
        .call(
            Method::GET,
            "/api/v1/keys?state=bogus",
            Auth::Bearer(&read),
            None,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    assert_eq!(m["pending"][0]["server"], Value::Null, "{m}");
    assert_eq!(m["rejected"], json!([]), "{m}");
    assert_eq!(m["denied"], json!([]), "{m}");
    let r = api
        .call(Method::GET, "/api/v1/keys", Auth::None, None)
        .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthenticated");

    // A key the registry issued: the accepted copy matches, a denied
    // other key does not.
    let keys_dir = tempfile::tempdir().unwrap();
    let issuing = registry::open(&api.db.url)
        .await
        .unwrap()
        .with_keys(KeyIssuer::new(keys_dir.path(), 2048).unwrap());
    let mut p = ServerPatch::default();
    p.set("name", "web02.example.org").unwrap();
    p.set("model", "web").unwrap();
    let issued = issuing.create_server(p).await.unwrap();
    let public = issued.public_key.clone().unwrap();
    std::fs::write(pki.path().join("minions").join(&issued.minion_id), &public).unwrap();
    std::fs::create_dir(pki.path().join("minions_denied")).unwrap();
    std::fs::write(
        pki.path().join("minions_denied").join(&issued.minion_id),
        other,
    )
    .unwrap();
    let r = api
        .call(Method::GET, "/api/v1/keys", Auth::Bearer(&read), None)
        .await;
    let m = &r.body["items"][0];
    let accepted = m["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["server"] == "web02.example.org")
        .unwrap();
    assert_eq!(accepted["matches"], true, "{m}");
    assert_eq!(
        accepted["issued_fingerprint"],
        json!(issued.key_fingerprint),
        "{m}"
    );
    assert_eq!(m["denied"][0]["matches"], false, "{m}");
}

// ------------------------------------- pages, rules and alerts in process

/// Every item of a list walked with `limit`, following `next` (`sep`: `?`
/// or `&` before `limit=`); the number of pages.
async fn walk(api: &Api, base: &str, limit: i64, auth: Auth<'_>) -> (Vec<Value>, usize) {
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut items = Vec::new();
    let mut pages = 0;
    let mut uri = format!("{base}{sep}limit={limit}");
    loop {
        let r = api.call(Method::GET, &uri, auth, None).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.body);
        pages += 1;
        let page = r.body["items"].as_array().unwrap();
        assert!(
            page.len() <= usize::try_from(limit).unwrap(),
            "{uri}: {}",
            r.body
        );
        items.extend(page.iter().cloned());
        match r.body["next"].as_i64() {
            Some(n) => uri = format!("{base}{sep}limit={limit}&after={n}"),
            None => return (items, pages),
        }
        assert!(pages < 100, "{uri}: no end");
    }
}

/// Dispatch targets and the audit log walked page by page (a page of
/// dispatches never splits a server's targets); `GET /rules` with one good
/// and one broken file (the refused reload kept the good set); `GET
/// /alerts` naming a foreign key, an unknown minion, a silent server, a
/// stuck target and the rule file's error with its line.
async fn pages_rules_alerts_story(api: Api) {
    use salt_steward::registry::dispatch::{Debounce, DispatchStatus};
    use salt_steward::registry::store::{DispatchStore as _, Store as _};
    use salt_steward::registry::StateKind;

    let viewer = api.login("viewer1").await;
    let admin = api.login("admin1").await;
    for n in ["a", "b", "c"] {
        api.server(&format!("{n}.example.org")).await;
    }
    let ids: Vec<i64> = api
        .svc
        .find_servers(&Default::default())
        .await
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    let store = api.svc.store();
    store.outbox_subscribe("dispatch").await.unwrap();
    let two = [StateKind::Portfwd, StateKind::Hostfwd];
    let mut targets: Vec<(i64, StateKind)> = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let kinds: &[StateKind] = if i < 2 { &two } else { &two[..1] };
        targets.extend(kinds.iter().map(|k| (*id, *k)));
    }
    let d = Debounce {
        debounce_ms: 0,
        max_delay_ms: 1000,
    };
    let last = store.outbox_pending("dispatch", 1000).await.unwrap();
    let last = last.last().map_or(1, |e| e.id());
    store
        .dispatch_bump("dispatch", last, &targets, d)
        .await
        .unwrap();
    let all = store.dispatch_targets(None).await.unwrap();
    assert_eq!(all.len(), 5);
    // limit 3: a's two (b's first would split b), then b's two and c's.
    let (walked, pages) = walk(&api, "/api/v1/dispatches", 3, Auth::Cookie(&viewer)).await;
    assert_eq!(pages, 2, "{walked:?}");
    let got: Vec<(i64, String)> = walked
        .iter()
        .map(|t| {
            (
                t["server_id"].as_i64().unwrap(),
                t["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut want: Vec<(i64, String)> = all
        .iter()
        .map(|t| (t.server_id, t.state.as_str().to_owned()))
        .collect();
    want.sort();
    assert_eq!(got, want);
    let (walked, _) = walk(
        &api,
        "/api/v1/dispatches?state=pending",
        1000,
        Auth::Cookie(&viewer),
    )
    .await;
    let pending = store
        .dispatch_targets(Some(DispatchStatus::Pending))
        .await
        .unwrap();
    assert_eq!(walked.len(), pending.len());
    let (walked, _) = walk(
        &api,
        "/api/v1/dispatches?status=failed&server=a.example.org",
        10,
        Auth::Cookie(&viewer),
    )
    .await;
    assert_eq!(walked, Vec::<Value>::new());
    let r = api
        .call(
            Method::GET,
            "/api/v1/dispatches?state=done&status=done",
            Auth::Cookie(&viewer),
            None,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    let r = api
        .call(
            Method::GET,
            "/api/v1/exec?limit=0",
            Auth::Cookie(&viewer),
            None,
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");

    // The exec record, newest first, two at a time, and of one server.
    use salt_steward::registry::exec::NewExec;
    use salt_steward::registry::store::ExecStore as _;
    for (i, id) in ids.iter().enumerate() {
        for _ in 0..=i {
            store
                .exec_insert(&NewExec {
                    requested_by: "test".into(),
                    server_id: Some(*id),
                    server: format!("#{id}"),
                    minion_id: None,
                    fun: "test.ping".into(),
                    args: "[]".into(),
                    jid: None,
                    outcome: "refused".into(),
                    error_code: Some("forbidden_function".into()),
                    error: None,
                })
                .await
                .unwrap();
        }
    }
    let (walked, pages) = walk(&api, "/api/v1/exec", 2, Auth::Cookie(&viewer)).await;
    assert_eq!(pages, 3);
    let got: Vec<i64> = walked.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    let mut want = got.clone();
    want.sort_unstable_by(|a, b| b.cmp(a));
    want.dedup();
    assert_eq!(got, want, "newest first, each once");
    assert_eq!(got.len(), 6);
    let (walked, pages) = walk(
        &api,
        &format!("/api/v1/exec?server={}", ids[2]),
        2,
        Auth::Cookie(&viewer),
    )
    .await;
    assert_eq!((walked.len(), pages), (3, 2));
    assert!(walked.iter().all(|e| e["server_id"] == ids[2]));

    // The audit log, newest first, two at a time.
    let log = api.svc.audit_log(None, 1000).await.unwrap();
    assert!(log.len() >= 3, "{log:?}");
    let (walked, pages) = walk(&api, "/api/v1/audit", 2, Auth::Cookie(&admin)).await;
    assert!(pages >= 2);
    assert_eq!(Value::Array(walked), serde_json::to_value(&log).unwrap());

    // Rules: one good file loaded, then a broken one refused.
    let rules_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        rules_dir.path().join("good.yaml"),
        "rules:\n  - name: good\n    on: custom/x\n    do: [{fire: {tag: out}}]\n",
    )
    .unwrap();
    let stats = Arc::new(salt_steward::rules::RuleStats::default());
    let set = salt_steward::rules::reload::initial(rules_dir.path(), &stats).await;
    let (tx, _rx) = tokio::sync::watch::channel(set);
    std::fs::write(
        rules_dir.path().join("broken.yaml"),
        "rules:\n  - name: broken\n    on: custom/y\n    bogus: 1\n    do: [{fire: {tag: out}}]\n",
    )
    .unwrap();
    salt_steward::rules::reload::reload(rules_dir.path(), &tx, &stats).await;
    stats.count_rule(&Arc::from("good"), salt_steward::rules::RuleCount::Matched);
    stats.count_rule(&Arc::from("good"), salt_steward::rules::RuleCount::Action);
    // Not a rule of the set: not counted (the map stays bounded).
    stats.count_rule(&Arc::from("nope"), salt_steward::rules::RuleCount::Matched);

    // A failed run of a's hostfwd; a backup that never ran.
    use salt_steward::registry::dispatch::Finish;
    let a = ids[0];
    let claimed = store
        .dispatch_claim(
            a,
            StateKind::Hostfwd,
            last,
            "20261202000000000001",
            "d",
            i64::MAX,
        )
        .await
        .unwrap()
        .expect("claimed");
    store
        .dispatch_finish(
            a,
            StateKind::Hostfwd,
            "20261202000000000001",
            claimed.lease_epoch,
            &Finish::Failed {
                error: "nginx: duplicate server name".into(),
                summary: "{}".into(),
                retry_at: i64::MAX,
            },
        )
        .await
        .unwrap()
        .expect("finished");
    let operator = api.login("operator1").await;
    for body in [
        json!({"name": "src1.example.org", "model": "web", "internal_ip": "10.1.0.5"}),
        json!({"name": "bk1.example.org", "model": "web"}),
    ] {
        let r = api
            .call(
                Method::POST,
                "/api/v1/servers",
                Auth::CookieXhr(&operator),
                Some(body),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    let r = api
        .call(
            Method::POST,
            "/api/v1/backups",
            Auth::CookieXhr(&operator),
            Some(
                json!({"source": "src1.example.org", "source_folder": "/srv/data",
                        "dest": "bk1.example.org", "dest_folder": "/b/src1"}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);

    // Keys: a foreign key for an issued id, an unknown id.
    let keys_dir = tempfile::tempdir().unwrap();
    let issuing = registry::open(&api.db.url)
        .await
        .unwrap()
        .with_keys(KeyIssuer::new(keys_dir.path(), 2048).unwrap());
    let mut p = ServerPatch::default();
    p.set("name", "issued.example.org").unwrap();
    p.set("model", "web").unwrap();
    let issued = issuing.create_server(p).await.unwrap();
    let pki = tempfile::tempdir().unwrap();
    std::fs::create_dir(pki.path().join("minions_pre")).unwrap();
    let other = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
    std::fs::write(
        pki.path().join("minions_pre").join(&issued.minion_id),
        other,
    )
    .unwrap();
    std::fs::write(pki.path().join("minions_pre").join("stranger"), other).unwrap();
    std::fs::create_dir(pki.path().join("minions_denied")).unwrap();
    std::fs::write(pki.path().join("minions_denied").join("intruder"), other).unwrap();
    // A silent server.
    let c = api
        .svc
        .get_server(&registry::ServerRef::Name("c.example.org".into()))
        .await
        .unwrap();
    api.svc
        .transition(c.id, &registry::Status::ALL, registry::Status::Offline)
        .await
        .unwrap()
        .unwrap();

    let c2 = api.clock.clone();
    let state = HttpState::new(api.svc.clone(), &HttpConfig::default())
        .with_clock(Arc::new(move || c2.load(Ordering::SeqCst)))
        .with_pki_dir(pki.path().to_owned());
    let bare = Api {
        app: router(Arc::new(state)),
        clock: api.clock.clone(),
        svc: api.svc.clone(),
        db: TestDb::sqlite(),
    };
    let r = bare
        .call(Method::GET, "/api/v1/rules", Auth::Cookie(&viewer), None)
        .await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let report = stats.clone();
    let c3 = api.clock.clone();
    let state = HttpState::new(api.svc.clone(), &HttpConfig::default())
        .with_clock(Arc::new(move || c3.load(Ordering::SeqCst)))
        .with_pki_dir(pki.path().to_owned())
        .with_rules(Arc::new(move || report.report()));
    let api = Api {
        app: router(Arc::new(state)),
        ..api
    };
    let r = api
        .call(Method::GET, "/api/v1/rules", Auth::None, None)
        .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
    let r = api
        .call(Method::GET, "/api/v1/rules", Auth::Cookie(&viewer), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let rules = r.body["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{}", r.body);
    assert_eq!(rules[0]["name"], "good");
    assert_eq!(rules[0]["matched"], 1);
    assert_eq!(rules[0]["actions"], 1);
    assert_eq!(rules[0]["dropped"], 0);
    assert!(rules[0]["file"].as_str().unwrap().ends_with("good.yaml"));
    let errors = r.body["errors"].as_array().unwrap();
    assert!(!errors.is_empty(), "{}", r.body);
    assert!(
        errors[0]["file"].as_str().unwrap().ends_with("broken.yaml"),
        "{}",
        r.body
    );
    assert!(errors[0]["line"].as_u64().is_some(), "{}", r.body);
    assert!(
        errors[0]["at"].as_str().unwrap().contains("broken.yaml:"),
        "{}",
        r.body
    );
    assert_eq!(r.body["counters"]["reload_failures"], 1, "{}", r.body);

    let r = api
        .call(Method::GET, "/api/v1/alerts", Auth::None, None)
        .await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthenticated");
    let r = api
        .call(Method::GET, "/api/v1/alerts", Auth::Cookie(&viewer), None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let alerts = r.body["items"].as_array().unwrap();
    let find = |kind: &str, subject: &str| {
        alerts
            .iter()
            .find(|a| a["kind"] == kind && a["subject"].as_str().unwrap().contains(subject))
            .unwrap_or_else(|| panic!("no {kind} alert about {subject}: {}", r.body))
    };
    let a = find("key_mismatch", &issued.minion_id);
    assert_eq!(a["severity"], "critical");
    assert!(a["message"]
        .as_str()
        .unwrap()
        .contains("issued.example.org"));
    assert_eq!(find("unknown_minion", "stranger")["severity"], "warning");
    assert_eq!(
        find("server_not_seen", "c.example.org")["severity"],
        "warning"
    );
    let a = find("rule_error", "broken.yaml:");
    assert_eq!(a["severity"], "critical");
    // The targets have waited far longer than STUCK_MS on the test clock.
    find("dispatch_stuck", "a.example.org/portfwd");
    let a = find("dispatch_failed", "a.example.org/hostfwd");
    assert_eq!(a["severity"], "critical");
    assert!(a["message"]
        .as_str()
        .unwrap()
        .contains("duplicate server name"));
    assert_eq!(find("denied_minion", "intruder")["severity"], "warning");
    assert_eq!(
        find("backup_never_run", "src1.example.org:/srv/data")["severity"],
        "warning"
    );
    for a in alerts {
        for k in ["kind", "severity", "subject", "message"] {
            assert!(a[k].is_string(), "{a}");
        }
    }
    // Critical first.
    let first_warning = alerts
        .iter()
        .position(|a| a["severity"] == "warning")
        .unwrap();
    assert!(alerts[first_warning..]
        .iter()
        .all(|a| a["severity"] == "warning"));
    // Nothing foreign about the accepted-nothing, matching keys.
    assert!(!alerts
        .iter()
        .any(|a| a["kind"] == "key_mismatch"
            && a["subject"].as_str().unwrap().contains("a.example.org")));
}

#[tokio::test]
async fn http_api_pages_rules_alerts_on_sqlite() {
    pages_rules_alerts_story(Api::new(TestDb::sqlite()).await).await;
}

#[tokio::test]
async fn http_api_pages_rules_alerts_on_postgres() {
    pages_rules_alerts_story(Api::new(TestDb::postgres_required().await).await).await;
}

// ------------------------------------ key decisions against a real master

/// A form post (`application/x-www-form-urlencoded`) as the dashboard's
/// plain forms send it: the cookie and `Sec-Fetch-Site: same-origin`.
async fn form_post(api: &Api, uri: &str, cookie: &str, form: &str) -> Resp {
    let req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header("host", "127.0.0.1:8467")
        .header(header::COOKIE, format!("steward_session={cookie}"))
        .header("sec-fetch-site", "same-origin")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_owned()))
        .unwrap();
    api.send(req).await
}

/// `POST /api/v1/keys/{minion}/accept|reject` against a real salt-master
/// (no daemon, so no acceptor: only the API decides): the pending key of a
/// minion installed from the registry's bundle is accepted; a minion with a
/// key of its own claiming another server's issued id is refused (409
/// `key_mismatch`) and stays pending, as does an unknown id (409
/// `unknown_minion`) and the right key under a fingerprint the operator
/// did not confirm (409 `key_changed`); rejects move keys (a form post
/// answered with a 303 to its local `next`, never to another site);
/// viewer 403, a cookie write without same-origin proof 403 `csrf`; every
/// decision and refusal audited.
#[test]
fn http_api_keys_accept_and_reject_on_a_real_master() {
    use crate::accept::{add_server, bundle, listed, signing_master, wait_listed};
    use crate::support::{cli, run_ok, steward_config};
    use salt_steward::master_config::MasterConfig;
    use salt_steward::salt::ReqClient;

    let mut h = signing_master();
    let cfg = steward_config(
        &h,
        &[],
        &format!(
            "masters: [\"127.0.0.1:{}\"]\nkeys: {{dir: {}/keys, pool_size: 1}}\n",
            h.ret_port,
            h.root().display()
        ),
    );
    run_ok(cli(&cfg, &["model", "add", "web"]));
    let web01 = add_server(&cfg, "web01.example.org");
    let web02 = add_server(&cfg, "web02.example.org");
    let id1 = web01["minion_id"].as_str().unwrap().to_owned();
    let id2 = web02["minion_id"].as_str().unwrap().to_owned();
    let fp1 = web01["key_fingerprint"].as_str().unwrap().to_owned();
    let b1 = bundle(&h, &cfg, "web01.example.org", "web01.tgz");
    h.start_minion_from_bundle("web01", &id1, &b1);
    // Keys of their own: one claims web02's issued id, one an unknown id.
    h.start_minion_verifying("impostor", &id2);
    h.start_minion_verifying("stranger", "stranger-1");
    for id in [id1.as_str(), id2.as_str(), "stranger-1"] {
        wait_listed(&h, "minions_pre", id);
    }

    let url = format!("sqlite://{}/registry.db", h.root().display());
    let master = MasterConfig::load(&h.master_config()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let svc = Arc::new(registry::open(&url).await.unwrap());
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            svc.add_user(
                "test",
                &format!("{role}1"),
                role,
                Password::new(PASSWORD.into()).unwrap(),
            )
            .await
            .unwrap();
        }
        let state = HttpState::new(svc.clone(), &HttpConfig::default())
            .with_pki_dir(h.pki_dir.clone())
            .with_wheel(ReqClient::new(&master, std::time::Duration::from_secs(20)).unwrap());
        let api = Api {
            app: router(Arc::new(state)),
            clock: Arc::new(AtomicI64::new(0)),
            svc: svc.clone(),
            db: TestDb::sqlite(),
        };
        let viewer = api.login("viewer1").await;
        let operator = api.login("operator1").await;
        let accept = |id: &str| format!("/api/v1/keys/{id}/accept");
        let reject = |id: &str| format!("/api/v1/keys/{id}/reject");

        let r = api
            .call(Method::POST, &accept(&id1), Auth::CookieXhr(&viewer), None)
            .await;
        assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
        let r = api
            .call(Method::POST, &accept(&id1), Auth::Cookie(&operator), None)
            .await;
        assert_error(&r, StatusCode::FORBIDDEN, "csrf");
        assert!(listed(&h, "minions_pre", &id1));

        // The impostor's own key under web02's id: refused, still pending.
        let r = api
            .call(
                Method::POST,
                &accept(&id2),
                Auth::CookieXhr(&operator),
                None,
            )
            .await;
        assert_error(&r, StatusCode::CONFLICT, "key_mismatch");
        assert!(listed(&h, "minions_pre", &id2) && !listed(&h, "minions", &id2));
        let r = api
            .call(
                Method::POST,
                &accept("stranger-1"),
                Auth::CookieXhr(&operator),
                None,
            )
            .await;
        assert_error(&r, StatusCode::CONFLICT, "unknown_minion");
        assert!(listed(&h, "minions_pre", "stranger-1"));
        let r = api
            .call(
                Method::POST,
                &accept(&id1),
                Auth::CookieXhr(&operator),
                Some(json!({"fingerprint": "00:11"})),
            )
            .await;
        assert_error(&r, StatusCode::CONFLICT, "key_changed");
        assert!(listed(&h, "minions_pre", &id1));
        let r = api
            .call(
                Method::POST,
                &accept("../etc"),
                Auth::CookieXhr(&operator),
                None,
            )
            .await;
        assert_ne!(r.status, StatusCode::OK, "{}", r.body);

        // The bundle's key, as issued: accepted.
        let r = api
            .call(
                Method::POST,
                &accept(&id1),
                Auth::CookieXhr(&operator),
                Some(json!({"fingerprint": fp1})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["state"], "accepted");
        assert_eq!(r.body["server"], "web01.example.org");
        assert_eq!(r.body["fingerprint"], fp1.as_str());
        assert!(listed(&h, "minions", &id1) && !listed(&h, "minions_pre", &id1));
        let s = svc
            .get_server(&registry::ServerRef::Name("web01.example.org".into()))
            .await
            .unwrap();
        assert_eq!(s.status, registry::Status::Registered);
        let r = api
            .call(
                Method::POST,
                &accept(&id1),
                Auth::CookieXhr(&operator),
                None,
            )
            .await;
        assert_error(&r, StatusCode::CONFLICT, "not_pending");

        // Reject by a plain form: 303 to its local next.
        let fp2 = salt_steward::pki::fingerprint(
            &std::fs::read_to_string(h.pki_dir.join("minions_pre").join(&id2)).unwrap(),
        );
        let r = form_post(
            &api,
            &reject(&id2),
            &operator,
            &format!(
                "fingerprint={}&next=%2Fkeys%3Fmaster%3D1",
                fp2.replace(':', "%3A")
            ),
        )
        .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        assert_eq!(r.headers[header::LOCATION], "/keys?master=1");
        assert!(listed(&h, "minions_rejected", &id2) && !listed(&h, "minions_pre", &id2));
        // A next off this site: the JSON reply, no redirect.
        let r = form_post(
            &api,
            &reject("stranger-1"),
            &operator,
            "next=%2F%2Fevil.example%2F",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert!(!r.headers.contains_key(header::LOCATION));
        assert_eq!(r.body["was"], "pending");
        assert!(listed(&h, "minions_rejected", "stranger-1"));
        let r = api
            .call(
                Method::POST,
                &reject(&id2),
                Auth::CookieXhr(&operator),
                None,
            )
            .await;
        assert_error(&r, StatusCode::CONFLICT, "not_pending");
        // An accepted key can be rejected too.
        let r = api
            .call(
                Method::POST,
                &reject(&id1),
                Auth::CookieXhr(&operator),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["was"], "accepted");
        assert!(listed(&h, "minions_rejected", &id1) && !listed(&h, "minions", &id1));

        let log = serde_json::to_string(&svc.audit_log(None, 100).await.unwrap()).unwrap();
        for action in ["\"key.accept\"", "\"key.reject\"", "\"key.accept_refused\""] {
            assert!(log.contains(action), "{action}: {log}");
        }
        assert!(
            log.contains("key_mismatch") && log.contains("operator1"),
            "{log}"
        );
    });
}
