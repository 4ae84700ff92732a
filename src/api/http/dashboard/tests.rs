//! The dashboard in process (`tower::ServiceExt::oneshot` on the API's
//! router, SQLite in memory, a pki directory with one pending key).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use tower::ServiceExt as _;

use crate::api::http::{router, HttpState};
use crate::config::HttpConfig;
use crate::registry::users::{Password, Role};
use crate::registry::{DbStore, ServerPatch, Service};

const PASSWORD: &str = "a long enough password";

struct App {
    app: Router,
    svc: Arc<Service<DbStore>>,
    _pki: tempfile::TempDir,
    _keys: Option<tempfile::TempDir>,
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Resp {
    fn header(&self, name: header::HeaderName) -> &str {
        self.headers
            .get(&name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

async fn app() -> App {
    let svc = crate::registry::open("sqlite::memory:").await.unwrap();
    app_from(svc, |state, _| state).await
}

/// What the daemon hands over too: a key issuer, the master's request
/// client and config (for rekey and the bundle; nothing listens on its
/// port, and a rekey with no stale key on the master never calls it), and
/// a rules report with one load error.
async fn full_app() -> App {
    let keys_dir = tempfile::tempdir().unwrap();
    let issuer = crate::pki::KeyIssuer::new(keys_dir.path(), 2048).unwrap();
    let svc = crate::registry::open("sqlite::memory:")
        .await
        .unwrap()
        .with_keys(issuer);
    let mut a = app_from(svc, |state, pki| {
        std::fs::write(
            pki.join("master_sign.pub"),
            "-----BEGIN PUBLIC KEY-----\nsigning\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let cfg = pki.join("master");
        std::fs::write(
            &cfg,
            format!(
                "pki_dir: {}\nret_port: 1\ninterface: 127.0.0.1\n",
                pki.display()
            ),
        )
        .unwrap();
        let master = crate::master_config::MasterConfig::load(&cfg).unwrap();
        let req = crate::salt::ReqClient::new(&master, std::time::Duration::from_secs(1)).unwrap();
        state
            .with_wheel(req)
            .with_bundle(crate::api::http::BundleContext {
                master,
                masters: vec!["salt.example".to_owned()],
            })
            .with_rules(Arc::new(|| {
                serde_json::json!({
                    "dir": "/etc/steward/rules", "loaded_at": 1_700_000_000_000_i64,
                    "files": ["/etc/steward/rules/ok.yaml"],
                    "rules": [{"name": "restart-web", "file": "/etc/steward/rules/ok.yaml",
                        "line": 3, "enabled": true, "matched": 5, "actions": 4,
                        "dropped": 0, "done": 3, "failed": 1}],
                    "errors": [{"file": "/etc/steward/rules/bad.yaml", "line": 7, "column": 3,
                        "rule": "broken", "message": "unknown field `whn`",
                        "at": "/etc/steward/rules/bad.yaml:7:3"}],
                    "warnings": [],
                    "counters": {"events": 10, "matched": 5},
                })
            }))
    })
    .await;
    a._keys = Some(keys_dir);
    a
}

async fn app_from(
    svc: Service<DbStore>,
    with: impl FnOnce(HttpState, &std::path::Path) -> HttpState,
) -> App {
    let svc = Arc::new(svc);
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
    let pki = tempfile::tempdir().unwrap();
    std::fs::create_dir(pki.path().join("minions_pre")).unwrap();
    std::fs::write(
        pki.path().join("minions_pre").join("stray-minion"),
        "-----BEGIN PUBLIC KEY-----\nnot a real key\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let state =
        HttpState::new(svc.clone(), &HttpConfig::default()).with_pki_dir(pki.path().to_owned());
    let state = with(state, pki.path());
    App {
        app: router(Arc::new(state)),
        svc,
        _pki: pki,
        _keys: None,
    }
}

impl App {
    async fn call(&self, req: Request<Body>) -> Resp {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        // minijinja escapes `/` as `&#x2f;` in text and attributes alike;
        // a browser reads it back as `/` (`<` and `>` stay escaped).
        Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).replace("&#x2f;", "/"),
        }
    }

    async fn get(&self, uri: &str, cookie: Option<&str>) -> Resp {
        let mut req = Request::get(uri);
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        self.call(req.body(Body::empty()).unwrap()).await
    }

    async fn login_form(&self, name: &str, password: &str) -> Resp {
        let body = serde_urlencoded::to_string([("name", name), ("password", password)]).unwrap();
        self.call(
            Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
    }

    /// Logs in through the form: the `Cookie` header value.
    async fn login(&self, name: &str) -> String {
        let r = self.login_form(name, PASSWORD).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
        r.header(header::SET_COOKIE)
            .split(';')
            .next()
            .unwrap()
            .to_owned()
    }

    /// A same-origin form post (as the dashboard's own page sends it).
    async fn form(&self, uri: &str, cookie: &str, body: &str) -> Resp {
        self.call(
            Request::post(uri)
                .header(header::COOKIE, cookie)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header("sec-fetch-site", "same-origin")
                .body(Body::from(body.to_owned()))
                .unwrap(),
        )
        .await
    }

    async fn server(&self, name: &str) {
        let mut p = ServerPatch::default();
        p.set("name", name).unwrap();
        p.set("model", "web").unwrap();
        self.svc.create_server(p).await.unwrap();
    }
}

#[tokio::test]
async fn the_login_form_sets_the_session_cookie_and_redirects_home() {
    let a = app().await;
    let r = a.login_form("viewer1", PASSWORD).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.header(header::LOCATION), "/");
    let set = r.header(header::SET_COOKIE);
    assert!(set.starts_with("steward_session="), "{set}");
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap();
    // The cookie works for the pages and for the JSON API alike.
    let home = a.get("/", Some(cookie)).await;
    assert_eq!(home.status, StatusCode::OK, "{}", home.body);
    assert!(home.body.contains("Attention"), "{}", home.body);
    assert_eq!(
        a.get("/api/v1/me", Some(cookie)).await.status,
        StatusCode::OK
    );
    // A logged-in user asking for the form is sent home.
    let again = a.get("/login", Some(cookie)).await;
    assert_eq!(again.status, StatusCode::SEE_OTHER);
    assert_eq!(again.header(header::LOCATION), "/");

    // A wrong password: the form again, with why, no cookie.
    let bad = a.login_form("viewer1", "not the password at all").await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert!(bad.body.contains("wrong name or password"), "{}", bad.body);
    assert!(bad.headers.get(header::SET_COOKIE).is_none());
    assert!(bad.header(header::CONTENT_TYPE).starts_with("text/html"));
    // A form without a password says what is missing.
    let r = a
        .call(
            Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from("name=viewer1"))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("password"), "{}", r.body);
    // A login posted from another site is refused.
    let r = a
        .call(
            Request::post("/login")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header("sec-fetch-site", "cross-site")
                .body(Body::from(format!("name=viewer1&password={PASSWORD}")))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn pages_without_a_session_redirect_to_the_login_form() {
    let a = app().await;
    for uri in [
        "/",
        "/servers",
        "/servers/web01",
        "/keys",
        "/keys/x/confirm?action=accept",
        "/dispatches",
        "/backups",
        "/audit",
        "/admin",
        "/fragments/overview",
    ] {
        let r = a.get(uri, None).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{uri}");
        assert_eq!(r.header(header::LOCATION), "/login", "{uri}");
        // A cookie that is no session is the same.
        let r = a.get(uri, Some("steward_session=nothing")).await;
        assert_eq!(r.header(header::LOCATION), "/login", "{uri}");
    }
    // The event stream answers 401 (an EventSource cannot follow it).
    assert_eq!(
        a.get("/events", None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let form = a.get("/login", None).await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(form.body.contains(r#"action="/login""#), "{}", form.body);
}

#[tokio::test]
async fn a_viewer_sees_no_write_controls_an_operator_does() {
    let a = app().await;
    a.server("web01").await;
    let viewer = a.login("viewer1").await;
    let operator = a.login("operator1").await;

    let v = a.get("/keys", Some(&viewer)).await;
    assert_eq!(v.status, StatusCode::OK, "{}", v.body);
    assert!(v.body.contains("stray-minion"), "{}", v.body);
    assert!(!v.body.contains("confirm?action="), "{}", v.body);
    let o = a.get("/keys", Some(&operator)).await;
    assert!(
        o.body.contains("/keys/stray-minion/confirm?action=accept"),
        "{}",
        o.body
    );
    assert!(o.body.contains("/keys/stray-minion/confirm?action=reject"));

    // The confirmation page: operators only; its form posts to the API.
    let r = a
        .get("/keys/stray-minion/confirm?action=accept", Some(&viewer))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a
        .get("/keys/stray-minion/confirm?action=accept", Some(&operator))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r
        .body
        .contains(r#"action="/api/v1/keys/stray-minion/accept""#));
    assert!(
        r.body.contains(r#"name="fingerprint""#) && r.body.contains(r#"name="next" value="/keys""#)
    );
    let r = a
        .get("/keys/stray-minion/confirm?action=delete", Some(&operator))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body.contains("accept or reject"), "{}", r.body);
    let r = a
        .get("/keys/nobody/confirm?action=accept", Some(&operator))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // The server page's retry form, and the logout form for both.
    let v = a.get("/servers/web01", Some(&viewer)).await;
    assert_eq!(v.status, StatusCode::OK, "{}", v.body);
    assert!(!v.body.contains("/retry"), "{}", v.body);
    assert!(v.body.contains(r#"action="/logout""#));
    let o = a.get("/servers/web01", Some(&operator)).await;
    assert!(
        o.body
            .contains(r#"action="/api/v1/dispatches/web01/retry""#),
        "{}",
        o.body
    );

    // The unknown key is on the attention list.
    let home = a.get("/", Some(&viewer)).await;
    assert!(home.body.contains("unknown minion"), "{}", home.body);
    // Admin pages are for admins.
    assert_eq!(
        a.get("/admin", Some(&operator)).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        a.get("/audit", Some(&viewer)).await.status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn every_page_renders_for_an_admin_with_the_security_headers() {
    let a = app().await;
    a.server("web01").await;
    a.server("db01").await;
    let admin = a.login("admin1").await;
    for uri in [
        "/",
        "/fragments/overview",
        "/servers",
        "/servers?sort=status&q=web&status=keys-issued",
        "/servers?sort=updated",
        "/servers/web01",
        "/keys",
        "/keys/stray-minion/confirm?action=reject",
        "/dispatches",
        "/dispatches?status=failed",
        "/backups",
        "/audit",
        "/admin",
        "/rules",
        "/activity",
        "/fragments/activity",
        "/fragments/servers?q=web",
        "/fragments/dispatches?status=failed",
        "/servers/web01/rekey",
        "/servers/web01?jid=20261204",
    ] {
        let r = a.get(uri, Some(&admin)).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.body);
        assert!(
            r.header(header::CONTENT_TYPE).starts_with("text/html"),
            "{uri}"
        );
        assert!(
            r.header(header::CONTENT_SECURITY_POLICY)
                .contains("default-src 'self'"),
            "{uri}"
        );
        assert_eq!(r.header(header::CACHE_CONTROL), "no-store", "{uri}");
        assert!(
            !r.body.contains("<script>") && !r.body.contains(" style="),
            "{uri}: inline script or style"
        );
    }
    let servers = a.get("/servers?q=web", Some(&admin)).await;
    assert!(
        servers.body.contains("web01") && !servers.body.contains("db01"),
        "{}",
        servers.body
    );
    // Bad input is a clear error, not a page with nothing on it.
    let r = a.get("/servers?sort=colour", Some(&admin)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.body.contains("sort by name, model, status or updated"),
        "{}",
        r.body
    );
    // The API's status for the registry's code.
    let r = a.get("/servers?status=sleepy", Some(&admin)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(r.body.contains("is not one of"), "{}", r.body);
    let r = a.get("/servers?colour=red", Some(&admin)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = a.get("/servers/nowhere", Some(&admin)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(r.header(header::CONTENT_TYPE).starts_with("text/html"));
    // The admin page lists users, never a secret.
    let r = a.get("/admin", Some(&admin)).await;
    assert!(r.body.contains("viewer1") && r.body.contains("operator1"));
    assert!(!r.body.contains("argon2"));
}

#[tokio::test]
async fn html_hostile_text_is_escaped() {
    let a = app().await;
    let admin = a.login("admin1").await;
    let hostile = "<script>alert(1)</script>";
    // A server name from the path, in the not-found page.
    let r = a
        .get("/servers/%3Cscript%3Ealert(1)%3C%2Fscript%3E", Some(&admin))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(!r.body.contains(hostile), "{}", r.body);
    assert!(r.body.contains("&lt;script&gt;"), "{}", r.body);
    // A name typed into the login form, shown back with the refusal.
    let r = a.login_form(hostile, "not the password at all").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(!r.body.contains(hostile), "{}", r.body);
    assert!(r.body.contains("&lt;script&gt;"), "{}", r.body);
    // A minion id in a key file name.
    let r = a
        .get("/keys/%3Cscript%3E/confirm?action=accept", Some(&admin))
        .await;
    assert!(!r.body.contains("<script>"), "{}", r.body);
}

#[tokio::test]
async fn assets_are_served_with_their_type_and_a_long_cache() {
    let a = app().await;
    for (uri, ctype, needle) in [
        ("/assets/htmx.min.js", "text/javascript", "htmx"),
        ("/assets/dashboard.js", "text/javascript", "EventSource"),
        ("/assets/dashboard.css", "text/css", "--green"),
    ] {
        let r = a.get(&format!("{uri}?v=1"), None).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        assert!(r.header(header::CONTENT_TYPE).starts_with(ctype), "{uri}");
        assert!(
            r.header(header::CACHE_CONTROL).contains("max-age=31536000"),
            "{uri}"
        );
        assert_eq!(r.header(header::X_CONTENT_TYPE_OPTIONS), "nosniff");
        assert!(r.body.contains(needle), "{uri}");
    }
    assert_eq!(
        a.get("/assets/nothing.js", None).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn logout_needs_a_same_origin_form_and_ends_the_session() {
    let a = app().await;
    let cookie = a.login("viewer1").await;
    let post = |origin: Option<&'static str>| {
        let mut req = Request::post("/logout")
            .header(header::COOKIE, cookie.clone())
            .header(header::HOST, "127.0.0.1:8467");
        if let Some(o) = origin {
            req = req.header(header::ORIGIN, o);
        }
        req.body(Body::empty()).unwrap()
    };
    let r = a.call(post(Some("https://evil.example"))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(a.get("/", Some(&cookie)).await.status, StatusCode::OK);
    let r = a.call(post(Some("http://127.0.0.1:8467"))).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.header(header::LOCATION), "/login");
    assert!(r.header(header::SET_COOKIE).contains("Max-Age=0"));
    assert_eq!(
        a.get("/", Some(&cookie)).await.header(header::LOCATION),
        "/login"
    );
}

#[tokio::test]
async fn the_event_stream_is_a_stream_for_a_session() {
    let a = app().await;
    let cookie = a.login("viewer1").await;
    // The daemon's notifier's cursor (a new consumer is a change too).
    use crate::registry::Store as _;
    a.svc.store().outbox_subscribe("notify").await.unwrap();
    let resp = a
        .app
        .clone()
        .oneshot(
            Request::get("/events")
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()[header::CONTENT_TYPE].to_str().unwrap(),
        "text/event-stream"
    );
    // The first event comes at once.
    let mut body = resp.into_body().into_data_stream();
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), {
        use futures_util::StreamExt as _;
        body.next()
    })
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&first);
    assert!(text.contains("event: hello"), "{text}");

    // A registry write (an outbox row past a consumer's cursor) is told
    // within a few polls; nothing before it.
    async fn next(
        body: &mut axum::body::BodyDataStream,
        secs: u64,
    ) -> Result<Option<Result<Bytes, axum::Error>>, tokio::time::error::Elapsed> {
        use futures_util::StreamExt as _;
        tokio::time::timeout(std::time::Duration::from_secs(secs), body.next()).await
    }
    // A keep-alive comment is all that may come while nothing changes.
    if let Ok(Some(Ok(quiet))) = next(&mut body, 2).await {
        let quiet = String::from_utf8_lossy(&quiet);
        assert!(!quiet.contains("changed"), "{quiet}");
    }
    a.server("web09").await;
    let changed = loop {
        let chunk = next(&mut body, 5).await.unwrap().unwrap().unwrap();
        let chunk = String::from_utf8_lossy(&chunk).into_owned();
        if !chunk.starts_with(':') {
            break chunk;
        }
    };
    assert!(changed.contains("event: changed"), "{changed}");
}

#[test]
fn timestamps_read_as_utc_dates() {
    assert_eq!(super::ts(0), "1970-01-01 00:00:00");
    assert_eq!(super::ts(1_800_000_000_000), "2027-01-15 08:00:00");
    assert_eq!(super::ts(951_782_400_000), "2000-02-29 00:00:00");
    assert_eq!(super::seg("a b/<c>"), "a%20b%2F%3Cc%3E");
}

#[tokio::test]
async fn the_retry_form_posts_to_the_api_and_comes_back() {
    let a = app().await;
    a.server("web01").await;
    let viewer = a.login("viewer1").await;
    let operator = a.login("operator1").await;
    let post = |cookie: &str, body: &'static str| {
        Request::post("/api/v1/dispatches/web01/retry")
            .header(header::COOKIE, cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("sec-fetch-site", "same-origin")
            .body(Body::from(body))
            .unwrap()
    };
    let r = a.call(post(&operator, "next=%2Fdispatches")).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.header(header::LOCATION), "/dispatches");
    let r = a
        .call(post(&operator, "state=share&next=%2Fservers%2Fweb01"))
        .await;
    assert_eq!(r.header(header::LOCATION), "/servers/web01", "{}", r.body);
    // Only a path of this site, and only a known state.
    let r = a
        .call(post(&operator, "next=https%3A%2F%2Fevil.example"))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = a.call(post(&operator, "next=%2F%2Fevil.example")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let r = a
        .call(post(&operator, "state=nothing&next=%2Fdispatches"))
        .await;
    assert!(r.status.is_client_error(), "{}", r.body);
    // A viewer may not; without the form fields it is the API's JSON.
    let r = a.call(post(&viewer, "next=%2Fdispatches")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a.call(post(&operator, "")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains(r#""due":0"#), "{}", r.body);
    // Each retry is audited as the user.
    let log = a.svc.audit_log(None, 10).await.unwrap();
    assert!(
        log.iter()
            .filter(|e| e.action == "dispatch.retry" && e.actor == "user:operator1")
            .count()
            >= 2
    );
}

#[tokio::test]
async fn the_rules_page_shows_the_load_errors_with_file_and_line() {
    let a = full_app().await;
    let viewer = a.login("viewer1").await;
    let r = a.get("/rules", Some(&viewer)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        r.body.contains("/etc/steward/rules/bad.yaml:7:3"),
        "{}",
        r.body
    );
    assert!(r.body.contains("unknown field `whn`"), "{}", r.body);
    assert!(r.body.contains("restart-web") && r.body.contains("ok.yaml:3"));
    assert!(r.body.contains(r#"href="/rules" aria-current="page""#));
    // The attention list sends a rule error to this page.
    let home = a.get("/", Some(&viewer)).await;
    assert!(home.body.contains(r#"<a href="/rules">"#), "{}", home.body);
    // Without the daemon's engine: a note, not an error.
    let b = app().await;
    let viewer = b.login("viewer1").await;
    let r = b.get("/rules", Some(&viewer)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("rules-unavailable"), "{}", r.body);
    assert_eq!(b.get("/rules", None).await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn the_activity_page_lists_audited_writes_and_execs_newest_first() {
    use crate::registry::exec::NewExec;
    use crate::registry::store::ExecStore as _;
    let a = app().await;
    a.server("web01").await;
    let operator = a.login("operator1").await;
    let r = a
        .form(
            "/api/v1/dispatches/web01/retry",
            &operator,
            "next=%2Factivity",
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    // Times are milliseconds: the exec comes after.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    a.svc
        .store()
        .exec_insert(&NewExec {
            requested_by: "user:operator1".into(),
            server_id: None,
            server: "web01".into(),
            minion_id: None,
            fun: "cmd.run".into(),
            args: "[]".into(),
            jid: None,
            outcome: "refused".into(),
            error_code: Some("forbidden_function".into()),
            error: Some("not on exec.master".into()),
        })
        .await
        .unwrap();
    let admin = a.login("admin1").await;
    for uri in ["/activity", "/fragments/activity"] {
        let r = a.get(uri, Some(&admin)).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.body);
        assert!(
            r.body.contains(r#"data-fragment="/fragments/activity""#),
            "{uri}"
        );
        let retry = r.body.find("dispatch.retry").expect("the audited retry");
        let exec = r.body.find("cmd.run").expect("the exec record");
        assert!(exec < retry, "newest first: {}", r.body);
        assert!(r.body.contains("user:operator1"));
        assert!(r.body.contains("not on exec.master"));
    }
    assert!(a
        .get("/activity", Some(&admin))
        .await
        .body
        .contains(r#"href="/activity""#));
    // The audit log is the admins': a viewer sees the exec record only.
    let viewer = a.login("viewer1").await;
    let r = a.get("/activity", Some(&viewer)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("cmd.run") && !r.body.contains("dispatch.retry"));
    assert_eq!(
        a.get("/fragments/activity", None).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn the_servers_and_dispatches_tables_are_fragments_too() {
    let a = app().await;
    a.server("web01").await;
    a.server("db01").await;
    let viewer = a.login("viewer1").await;
    let r = a.get("/servers?q=web&sort=status", Some(&viewer)).await;
    assert!(
        r.body
            .contains(r#"data-fragment="/fragments/servers?q=web&amp;status=&amp;sort=status""#),
        "{}",
        r.body
    );
    let f = a
        .get(
            "/fragments/servers?q=web&status=&sort=status",
            Some(&viewer),
        )
        .await;
    assert_eq!(f.status, StatusCode::OK, "{}", f.body);
    assert!(
        f.body.starts_with(r#"<section id="servers-live""#),
        "{}",
        f.body
    );
    assert!(f.body.contains("web01") && !f.body.contains("db01"));
    assert!(!f.body.contains("<html"));
    let r = a.get("/dispatches?status=failed", Some(&viewer)).await;
    assert!(r
        .body
        .contains(r#"data-fragment="/fragments/dispatches?status=failed""#));
    let f = a.get("/fragments/dispatches", Some(&viewer)).await;
    assert_eq!(f.status, StatusCode::OK, "{}", f.body);
    assert!(f.body.starts_with(r#"<section id="dispatches-live""#));
    let f = a.get("/fragments/servers?sort=colour", Some(&viewer)).await;
    assert_eq!(f.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        a.get("/fragments/servers", None).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn the_exec_form_is_the_apis_for_operators_only() {
    let a = app().await;
    a.server("web01").await;
    let viewer = a.login("viewer1").await;
    let operator = a.login("operator1").await;
    // The form is on the server page for an operator, not for a viewer.
    let page = a.get("/servers/web01", Some(&operator)).await;
    assert!(page.body.contains(r#"id="exec-form""#), "{}", page.body);
    assert!(page.body.contains(r#"action="/api/v1/exec""#));
    assert!(!a
        .get("/servers/web01", Some(&viewer))
        .await
        .body
        .contains("exec-form"));
    let ok = "server=web01&fun=test.arg&args=a+b%0Ac&next=%2Fservers%2Fweb01";
    let r = a.form("/api/v1/exec", &viewer, ok).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    for bad in [
        "server=web01&next=%2Fservers%2Fweb01",
        "fun=test.ping&next=%2F",
        "server=web01&fun=test.ping",
        "server=web01&fun=test.ping&next=https%3A%2F%2Fevil.example",
        "server=web01&fun=test.ping&next=%2F&colour=red",
    ] {
        let r = a.form("/api/v1/exec", &operator, bad).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.body);
    }
    // A good form reaches the exec path, which needs the daemon's master.
    let r = a.form("/api/v1/exec", &operator, ok).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert!(r.body.contains("unavailable"), "{}", r.body);
    // A cross-site form is refused before anything.
    let r = a
        .call(
            Request::post("/api/v1/exec")
                .header(header::COOKIE, &operator)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header("sec-fetch-site", "cross-site")
                .body(Body::from(ok))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    // Where the 303 goes: the server page shows the jid, or the refusal.
    let r = a
        .get("/servers/web01?jid=20261204034500123456", Some(&viewer))
        .await;
    assert!(
        r.body.contains("jid <code>20261204034500123456</code>"),
        "{}",
        r.body
    );
    let r = a
        .get(
            "/servers/web01?exec_error=forbidden_function",
            Some(&viewer),
        )
        .await;
    assert!(r.body.contains("Exec refused"), "{}", r.body);
}

#[tokio::test]
async fn rekey_goes_through_a_confirmation_and_is_audited() {
    let a = full_app().await;
    a.server("web01").await;
    let before = a
        .svc
        .get_server(&crate::registry::ServerRef::Name("web01".into()))
        .await
        .unwrap();
    assert!(before.key_fingerprint.is_some());
    let viewer = a.login("viewer1").await;
    let operator = a.login("operator1").await;
    let page = a.get("/servers/web01", Some(&operator)).await;
    assert!(
        page.body.contains(r#"href="/servers/web01/rekey""#),
        "{}",
        page.body
    );
    assert!(!a
        .get("/servers/web01", Some(&viewer))
        .await
        .body
        .contains("/rekey"));
    assert_eq!(
        a.get("/servers/web01/rekey", Some(&viewer)).await.status,
        StatusCode::FORBIDDEN
    );
    let confirm = a.get("/servers/web01/rekey", Some(&operator)).await;
    assert_eq!(confirm.status, StatusCode::OK, "{}", confirm.body);
    assert!(confirm
        .body
        .contains(r#"action="/api/v1/servers/web01/rekey""#));
    assert!(confirm
        .body
        .contains(before.key_fingerprint.as_deref().unwrap()));
    let r = a
        .form(
            "/api/v1/servers/web01/rekey",
            &viewer,
            "next=%2Fservers%2Fweb01",
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    let r = a
        .form(
            "/api/v1/servers/web01/rekey",
            &operator,
            "next=%2Fservers%2Fweb01",
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(r.header(header::LOCATION), "/servers/web01");
    let after = a
        .svc
        .get_server(&crate::registry::ServerRef::Name("web01".into()))
        .await
        .unwrap();
    assert_ne!(after.key_fingerprint, before.key_fingerprint);
    assert_ne!(after.public_key, before.public_key);
    let log = a.svc.audit_log(None, 10).await.unwrap();
    let e = log
        .iter()
        .find(|e| e.action == "server.rekey")
        .expect("the rekey is audited");
    assert_eq!(e.actor, "user:operator1");
    assert_eq!(
        e.detail["new_fingerprint"].as_str(),
        after.key_fingerprint.as_deref()
    );
    // As JSON: the server with its new public key, never a private one.
    let r = a
        .call(
            Request::post("/api/v1/servers/web01/rekey")
                .header(header::COOKIE, &operator)
                .header("sec-fetch-site", "same-origin")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("\"retire_error\":null"), "{}", r.body);
    assert!(!r.body.contains("PRIVATE KEY"));
    let r = a
        .form("/api/v1/servers/nowhere/rekey", &operator, "next=%2F")
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let r = a
        .form(
            "/api/v1/servers/web01/rekey",
            &operator,
            "next=%2F&colour=red",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    // Without a key issuer and a master (an API not run by the daemon): 503.
    let b = app().await;
    b.server("web01").await;
    let operator = b.login("operator1").await;
    let r = b
        .form("/api/v1/servers/web01/rekey", &operator, "next=%2F")
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
}

#[tokio::test]
async fn the_bundle_is_for_admins_audited_and_the_only_private_key_out() {
    use std::io::Read as _;
    let a = full_app().await;
    a.server("web01").await;
    let minion = a
        .svc
        .get_server(&crate::registry::ServerRef::Name("web01".into()))
        .await
        .unwrap()
        .minion_id;
    let private = a
        .svc
        .keys()
        .unwrap()
        .private_pem(&minion)
        .unwrap()
        .private_pem()
        .to_string();
    let body_line = private.lines().nth(1).unwrap().to_owned();
    let admin = a.login("admin1").await;
    let operator = a.login("operator1").await;
    let viewer = a.login("viewer1").await;
    for who in [&operator, &viewer] {
        let r = a.get("/api/v1/servers/web01/bundle", Some(who)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    }
    assert!(a
        .get("/servers/web01", Some(&admin))
        .await
        .body
        .contains(r#"href="/api/v1/servers/web01/bundle""#));
    assert!(!a
        .get("/servers/web01", Some(&operator))
        .await
        .body
        .contains("/bundle"));
    let resp = a
        .app
        .clone()
        .oneshot(
            Request::get("/api/v1/servers/web01/bundle")
                .header(header::COOKIE, &admin)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(h[header::CONTENT_TYPE], "application/gzip");
    assert_eq!(h[header::CACHE_CONTROL], "no-store");
    let disposition = h[header::CONTENT_DISPOSITION].to_str().unwrap();
    assert!(disposition.starts_with("attachment;"), "{disposition}");
    let gz = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
    let mut pem = None;
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some("minion.pem") {
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            pem = Some(text);
        }
    }
    assert_eq!(pem.as_deref(), Some(private.as_str()));
    let log = a.svc.audit_log(None, 10).await.unwrap();
    let e = log
        .iter()
        .find(|e| e.action == "server.bundle")
        .expect("the download is audited");
    assert_eq!(e.actor, "user:admin1");
    assert!(e.target.contains("web01"));
    assert!(e.at > 0);
    // No other answer carries it.
    for uri in [
        "/",
        "/servers",
        "/servers/web01",
        "/servers/web01/rekey",
        "/fragments/servers",
        "/activity",
        "/fragments/activity",
        "/audit",
        "/admin",
        "/rules",
        "/keys",
        "/api/v1/servers",
        "/api/v1/servers/web01",
        "/api/v1/audit",
        "/api/v1/exec",
        "/api/v1/keys",
        "/api/v1/alerts",
        "/api/v1/dispatches",
    ] {
        let r = a.get(uri, Some(&admin)).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.body);
        assert!(
            !r.body.contains("PRIVATE KEY") && !r.body.contains(&body_line),
            "{uri} shows the private key"
        );
    }
    // Without the daemon's master config: 503.
    let b = app().await;
    b.server("web01").await;
    let admin = b.login("admin1").await;
    let r = b.get("/api/v1/servers/web01/bundle", Some(&admin)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
}

/// The 303 of the exec form, without a master: the daemon's exec context
/// (a Salt client whose event reader finds no bus) with an allow-list of
/// `test.*`, so `cmd.run` is refused before anything is published — and
/// recorded, and shown on the server page the browser is sent back to.
#[tokio::test]
async fn a_refused_exec_form_comes_back_to_the_server_page_recorded() {
    let cancel = tokio_util::sync::CancellationToken::new();
    let bus_dir = tempfile::tempdir().unwrap();
    let bus = crate::bus::BusHandle::new(
        crate::bus::BusEndpoint::Unix(bus_dir.path().join("nobody.ipc")),
        crate::bus::SubscriberOptions::default(),
    );
    let tracker = crate::salt::JobTracker::start(bus.subscribe(), cancel.clone());
    let svc = crate::registry::open("sqlite::memory:").await.unwrap();
    let a = app_from(svc, |state, pki| {
        let cfg = pki.join("master");
        std::fs::write(
            &cfg,
            format!(
                "pki_dir: {}\nret_port: 1\ninterface: 127.0.0.1\n",
                pki.display()
            ),
        )
        .unwrap();
        let master = crate::master_config::MasterConfig::load(&cfg).unwrap();
        let req = crate::salt::ReqClient::new(&master, std::time::Duration::from_secs(1)).unwrap();
        let policy = crate::api::server::Policy {
            trusted: std::collections::HashSet::new(),
            exec: crate::exec::ExecPolicy::new(&["test.*".to_owned()], std::iter::empty()).unwrap(),
            exec_timeout: std::time::Duration::from_secs(2),
        };
        state.with_exec(crate::api::http::ExecContext {
            salt: crate::salt::SaltClient::new(req, tracker),
            policy: crate::api::server::PolicyHandle::new(policy),
            stats: Arc::new(crate::exec::ExecStats::default()),
        })
    })
    .await;
    a.server("web01").await;
    let operator = a.login("operator1").await;
    let r = a
        .form(
            "/api/v1/exec",
            &operator,
            "server=web01&fun=cmd.run&args=rm+-rf%0A%2F&next=%2Fservers%2Fweb01",
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(
        r.header(header::LOCATION),
        "/servers/web01?exec_error=forbidden_function"
    );
    let page = a.get(r.header(header::LOCATION), Some(&operator)).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("Exec refused"), "{}", page.body);
    assert!(page.body.contains("cmd.run") && page.body.contains("refused"));
    let log = a.svc.audit_log(None, 5).await.unwrap();
    assert!(log
        .iter()
        .any(|e| e.action == "exec.run" && e.actor == "user:operator1"));
    let record = crate::exec::history(&a.svc, None, None, 5).await.unwrap();
    assert_eq!(record.len(), 1);
    assert_eq!(record[0].requested_by, "user:operator1");
    assert_eq!(record[0].outcome, "refused");
    assert!(record[0].args.contains("rm") && record[0].args.contains("-rf"));
    cancel.cancel();
}

/// Two rekeys of one server at once: both read the same revision, the
/// second to write is refused with 409 (and its new key discarded).
#[tokio::test]
async fn concurrent_rekeys_conflict() {
    let a = full_app().await;
    a.server("web01").await;
    let operator = a.login("operator1").await;
    let post = || {
        Request::post("/api/v1/servers/web01/rekey")
            .header(header::COOKIE, &operator)
            .header("sec-fetch-site", "same-origin")
            .body(Body::empty())
            .unwrap()
    };
    let (r1, r2) = tokio::join!(a.call(post()), a.call(post()));
    let mut statuses = [r1.status, r2.status];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::CONFLICT],
        "{} / {}",
        r1.body,
        r2.body
    );
    let refused = if r1.status == StatusCode::CONFLICT {
        &r1
    } else {
        &r2
    };
    assert!(refused.body.contains("\"conflict\""), "{}", refused.body);
    let log = a.svc.audit_log(None, 10).await.unwrap();
    assert_eq!(log.iter().filter(|e| e.action == "server.rekey").count(), 1);
}

// ------------------------------------------------------------ security

const HOSTILE: &str = "<script>alert(1)</script>";

/// Free text that the registry takes with `<` in it (server names, model
/// names and backup folders refuse it): a server's samba base folder, a
/// backup result's error, a dispatch target's wait reason and an audit
/// entry's detail. Each is shown escaped on every page that shows it, and
/// raw on none.
#[tokio::test]
async fn html_hostile_free_text_is_escaped_on_every_page() {
    use crate::registry::backup::{BackupResult, Outcome};
    use crate::registry::dispatch::{Debounce, StateKind};
    use crate::registry::service::BackupSpec;
    use crate::registry::store::DispatchStore as _;
    use crate::registry::users::AuditNote;
    use crate::registry::ServerRef;

    let a = app().await;
    let mut p = ServerPatch::default();
    p.set("name", "web01").unwrap();
    p.set("model", "web").unwrap();
    p.set("samba_base", &format!("/srv/{HOSTILE}")).unwrap();
    let web01 = a.svc.create_server(p).await.unwrap();
    a.server("bk01").await;
    let b = a
        .svc
        .create_backup(BackupSpec {
            source: ServerRef::Name("web01".into()),
            source_folder: "/srv/data".into(),
            dest: ServerRef::Name("bk01".into()),
            dest_folder: "/backups/web01".into(),
            excludes: Vec::new(),
            exclude_proc_sys: false,
            active: None,
            retain: None,
            ssh_host: Some("127.0.0.1".into()),
            ssh_port: None,
            ssh_user: None,
        })
        .await
        .unwrap();
    let result = BackupResult {
        backup_id: b.id,
        run_id: "run-1".into(),
        level: "daily".into(),
        started_at: 1_800_000_000_000,
        duration_ms: 1_000,
        outcome: Outcome::Error,
        files: None,
        size: None,
        transferred: None,
        rsync_exit: Some(12),
        error: format!("rsync said {HOSTILE}"),
        received_at: 0,
    };
    assert!(a.svc.record_backup_result(&b, &result).await.unwrap());
    let store = a.svc.store();
    store
        .dispatch_bump(
            "test",
            1,
            &[(web01.id, StateKind::Share)],
            Debounce {
                debounce_ms: 0,
                max_delay_ms: 0,
            },
        )
        .await
        .unwrap();
    assert!(store
        .dispatch_wait(
            web01.id,
            StateKind::Share,
            &format!("waiting for {HOSTILE}")
        )
        .await
        .unwrap());
    a.svc
        .audit(&AuditNote {
            actor: "user:admin1".into(),
            action: "server.update",
            target: "web01".into(),
            detail: serde_json::json!({"samba_base": format!("/srv/{HOSTILE}")}),
        })
        .await
        .unwrap();

    let admin = a.login("admin1").await;
    let escaped = "&lt;script&gt;alert(1)&lt;/script&gt;";
    // The overview and the server list show none of these texts; the other
    // pages show at least one, escaped.
    for (uri, shows) in [
        ("/", false),
        ("/fragments/overview", false),
        ("/servers", false),
        ("/servers/web01", true),
        ("/dispatches", true),
        ("/backups", true),
        ("/audit", true),
    ] {
        let r = a.get(uri, Some(&admin)).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.body);
        assert!(!r.body.contains("<script>"), "{uri}: {}", r.body);
        if shows {
            assert!(r.body.contains(escaped), "{uri}: {}", r.body);
        }
    }
    // The server page shows all three of its own.
    let r = a.get("/servers/web01", Some(&admin)).await;
    assert!(
        r.body.contains(&format!("/srv/{escaped}")),
        "the samba base: {}",
        r.body
    );
    assert!(
        r.body.contains(&format!("waiting for {escaped}")),
        "the wait reason: {}",
        r.body
    );
}

/// Every HTML answer carries the strict CSP: the pages, the login form,
/// its refusal, and the error pages (400, 403, 404, 422).
#[tokio::test]
async fn every_html_response_has_the_csp_error_pages_and_login_too() {
    let a = app().await;
    a.server("web01").await;
    let admin = a.login("admin1").await;
    let viewer = a.login("viewer1").await;
    let mut answers = vec![
        ("GET /login".to_owned(), a.get("/login", None).await),
        (
            "POST /login (refused)".to_owned(),
            a.login_form("viewer1", "not the password at all").await,
        ),
        (
            "GET /servers/nowhere".to_owned(),
            a.get("/servers/nowhere", Some(&admin)).await,
        ),
        (
            "GET /servers?sort=colour".to_owned(),
            a.get("/servers?sort=colour", Some(&admin)).await,
        ),
        (
            "GET /servers?status=sleepy".to_owned(),
            a.get("/servers?status=sleepy", Some(&admin)).await,
        ),
        (
            "GET /keys/stray-minion/confirm?action=delete".to_owned(),
            a.get("/keys/stray-minion/confirm?action=delete", Some(&admin))
                .await,
        ),
        (
            "GET /keys/nobody/confirm?action=accept".to_owned(),
            a.get("/keys/nobody/confirm?action=accept", Some(&admin))
                .await,
        ),
        (
            "GET /admin as viewer".to_owned(),
            a.get("/admin", Some(&viewer)).await,
        ),
    ];
    for uri in [
        "/",
        "/fragments/overview",
        "/servers",
        "/servers/web01",
        "/keys",
        "/keys/stray-minion/confirm?action=accept",
        "/dispatches",
        "/backups",
        "/audit",
        "/admin",
    ] {
        answers.push((format!("GET {uri}"), a.get(uri, Some(&admin)).await));
    }
    let mut statuses = std::collections::BTreeSet::new();
    for (what, r) in &answers {
        statuses.insert(r.status.as_u16());
        assert!(
            r.header(header::CONTENT_TYPE).starts_with("text/html"),
            "{what}: {} {}",
            r.status,
            r.header(header::CONTENT_TYPE)
        );
        let csp = r.header(header::CONTENT_SECURITY_POLICY);
        assert!(
            csp.contains("default-src 'self'") && !csp.contains("unsafe-inline"),
            "{what} ({}): CSP {csp:?}",
            r.status
        );
        assert_eq!(r.header(header::X_FRAME_OPTIONS), "DENY", "{what}");
        assert_eq!(
            r.header(header::X_CONTENT_TYPE_OPTIONS),
            "nosniff",
            "{what}"
        );
    }
    // The error pages were among them.
    for s in [200, 400, 401, 403, 404, 422] {
        assert!(statuses.contains(&s), "no {s} answer: {statuses:?}");
    }
}

/// The session cookie's flags, from the form and from the JSON login:
/// HttpOnly, SameSite=Strict, Path=/ and (the default) Secure.
#[tokio::test]
async fn the_session_cookie_has_its_flags_from_the_form_and_the_api() {
    let a = app().await;
    let form = a.login_form("viewer1", PASSWORD).await;
    assert_eq!(form.status, StatusCode::SEE_OTHER, "{}", form.body);
    let api = a
        .call(
            Request::post("/api/v1/login")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    serde_json::json!({"name": "viewer1", "password": PASSWORD}).to_string(),
                ))
                .unwrap(),
        )
        .await;
    assert_eq!(api.status, StatusCode::OK, "{}", api.body);
    for (what, r) in [("form", &form), ("api", &api)] {
        let set = r.header(header::SET_COOKIE);
        let attrs: Vec<String> = set
            .split(';')
            .map(|s| s.trim().to_ascii_lowercase())
            .collect();
        assert!(attrs[0].starts_with("steward_session="), "{what}: {set}");
        for flag in ["httponly", "samesite=strict", "path=/", "secure"] {
            assert!(
                attrs.iter().any(|x| x == flag),
                "{what}: no {flag} in {set}"
            );
        }
    }
}

/// A `Write` into a shared buffer: the log of the test's requests.
#[derive(Clone, Default)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// No secret in any answer or in the log: with a user, a token, a share
/// (made through the API: its password is in that one reply only) and a
/// server whose key pair the registry issued (its private key in the key
/// store), every GET of the API and every dashboard page, as admin,
/// carries none of the user's password, the token's secret, the share's
/// password or NT hash, the private key's PEM body or an argon2 hash; and
/// the log of all these requests (every level) has none either.
#[tokio::test]
async fn no_secret_in_any_response_or_log() {
    use crate::pki::KeyIssuer;
    use crate::registry::users::Scope;

    let log = LogBuf::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _log = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("registry.db").display());
    let keys = dir.path().join("keys");
    let svc = Arc::new(
        crate::registry::open(&url)
            .await
            .unwrap()
            .with_keys(KeyIssuer::new(&keys, 2048).unwrap()),
    );
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
    let mut p = ServerPatch::default();
    p.set("name", "files1").unwrap();
    p.set("model", "web").unwrap();
    p.set("samba_base", "/srv/samba").unwrap();
    let files1 = svc.create_server(p).await.unwrap();
    let (_, token) = svc
        .add_token("test", "ci", &[Scope::Read], None, None, 0)
        .await
        .unwrap();
    let token = token.expose().to_owned();
    // The private keys the registry keeps: their PEM bodies.
    let mut pem_bodies = Vec::new();
    for e in walk(&keys) {
        let text = std::fs::read_to_string(&e).unwrap_or_default();
        if text.contains("PRIVATE KEY") {
            let body: String = text
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<Vec<_>>()
                .join("\n");
            // The body, and a line of it (a reply might wrap differently).
            pem_bodies.push(text.lines().nth(2).unwrap().to_owned());
            pem_bodies.push(body);
        }
    }
    assert!(
        !pem_bodies.is_empty(),
        "no private key under {}",
        keys.display()
    );
    // The pki dir shows the issued server's key pending.
    let pki = tempfile::tempdir().unwrap();
    std::fs::create_dir(pki.path().join("minions_pre")).unwrap();
    std::fs::write(
        pki.path().join("minions_pre").join(&files1.minion_id),
        files1.public_key.clone().unwrap(),
    )
    .unwrap();
    let state =
        HttpState::new(svc.clone(), &HttpConfig::default()).with_pki_dir(pki.path().to_owned());
    let a = App {
        app: router(Arc::new(state)),
        svc: svc.clone(),
        _pki: pki,
        _keys: None,
    };
    let admin = a.login("admin1").await;
    let made = a
        .call(
            Request::post("/api/v1/shares")
                .header(header::COOKIE, &admin)
                .header("x-requested-with", "test")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    serde_json::json!({"server": "files1", "name": "docs", "folder": "docs"})
                        .to_string(),
                ))
                .unwrap(),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let reply: serde_json::Value = serde_json::from_str(&made.body).unwrap();
    let share_password = reply["password"].as_str().unwrap().to_owned();
    let share_id = reply["id"].as_i64().unwrap();
    // What the registry stores: MD4 of the UTF-16LE password, in hex.
    let nt = {
        use md4::{Digest as _, Md4};
        let utf16: Vec<u8> = share_password
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        crate::hex::encode(&Md4::digest(&utf16))
    };

    let minion = files1.minion_id.clone();
    let uris = [
        "/api/v1/me".to_owned(),
        "/api/v1/servers".to_owned(),
        "/api/v1/servers/files1".to_owned(),
        format!("/api/v1/servers/{}", files1.id),
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
        "/".to_owned(),
        "/fragments/overview".to_owned(),
        "/servers".to_owned(),
        "/servers/files1".to_owned(),
        "/keys".to_owned(),
        format!("/keys/{minion}/confirm?action=accept"),
        "/dispatches".to_owned(),
        "/backups".to_owned(),
        "/audit".to_owned(),
        "/admin".to_owned(),
    ];
    let secrets = {
        let mut s = vec![
            ("the user's password", PASSWORD.to_owned()),
            ("the token", token.clone()),
            ("the share's password", share_password.clone()),
            ("the NT hash", nt.clone()),
            ("an argon2 hash", "$argon2id$".to_owned()),
        ];
        s.extend(pem_bodies.iter().map(|b| ("a private key", b.clone())));
        s
    };
    let mut ok = 0;
    for uri in &uris {
        let r = a.get(uri, Some(&admin)).await;
        if r.status == StatusCode::OK {
            ok += 1;
        }
        for (what, secret) in &secrets {
            assert!(
                !r.body.contains(secret.as_str()),
                "{what} in {uri}: {}",
                r.body
            );
        }
    }
    // The token works (so its absence above means something) and shows
    // nothing either.
    let r = a
        .call(
            Request::get("/api/v1/servers")
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains(&minion), "{}", r.body);
    assert!(
        ok >= uris.len() - 3,
        "only {ok} of {} answered 200",
        uris.len()
    );
    // The secrets are in the store (so looking for them means something).
    assert!(a.svc.list_shares(None).await.unwrap().len() == 1);

    let logged = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("/api/v1/shares"),
        "the requests were not logged: {logged}"
    );
    for (what, secret) in &secrets {
        assert!(
            !logged.contains(secret.as_str()),
            "{what} in the log: {logged}"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
