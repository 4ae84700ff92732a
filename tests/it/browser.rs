//! The dashboard in a real browser (issue #15): the daemon serves it on a
//! loopback port, Debian's headless Chromium drives it through chromedriver
//! (fantoccini, WebDriver over plain HTTP on loopback). A user made with the
//! CLI logs in through the form, sees the overview, a server added with the
//! CLI appears on the overview through the event stream without a reload,
//! the server page opens, logout ends the session; the daemon then stops
//! within its bound with a tab's event stream open.
//!
//! Needs `chromium` and `chromedriver` (`scripts/install-system-packages`
//! installs them); without them the test fails saying so. A screenshot of
//! the overview is saved under `target/tmp/browser/`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::http_api::{cli_with_stdin, PASSWORD};
use crate::support::salt::free_port;
use crate::support::{cli, run_ok, start_daemon, steward_config, SaltHarness, T};

const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver (and the Chromium it starts) in a process group of its
/// own, killed as a group when dropped — also when the test fails.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(log: &Path) -> Self {
        use std::os::unix::process::CommandExt as _;
        let found = Command::new("chromedriver")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found && Path::new(CHROMIUM).exists(),
            "the browser test needs chromedriver and {CHROMIUM}: run \
             scripts/install-system-packages (apt-get install chromium chromium-driver)"
        );
        let port = free_port();
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let d = Driver { child, port };
        let until = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < until,
                "chromedriver did not listen on {port} within 30 s (log: {})",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let group = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = killpg(group, Signal::SIGTERM);
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (Chromium's own processes too).
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

async fn connect(port: u16) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a WebDriver session with chromedriver")
}

/// Polls `check` every 100 ms until it gives `Some`, for at most `within`;
/// then fails with the page the browser shows.
async fn wait_for<T, F, Fut>(c: &Client, what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= until {
            let url = c.current_url().await.map(|u| u.to_string());
            let source = c.source().await.unwrap_or_default();
            panic!("waited {within:?} for {what}; the browser shows {url:?}:\n{source}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text_of(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn path_of(c: &Client) -> String {
    c.current_url().await.unwrap().path().to_owned()
}

async fn log_in(c: &Client, base: &str) {
    log_in_as(c, base, "alice").await;
}

async fn log_in_as(c: &Client, base: &str, name: &str) {
    c.goto(&format!("{base}/")).await.unwrap();
    // No session: the overview sends the browser to the form.
    assert_eq!(path_of(c).await, "/login");
    c.find(Locator::Css("#name"))
        .await
        .unwrap()
        .send_keys(name)
        .await
        .unwrap();
    c.find(Locator::Css("#password"))
        .await
        .unwrap()
        .send_keys(PASSWORD)
        .await
        .unwrap();
    c.find(Locator::Css("#login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(c, "the overview after logging in", T, || async {
        (path_of(c).await == "/" && text_of(c, "#count-servers").await.is_some()).then_some(())
    })
    .await;
    // The tab's event stream is open.
    wait_for(c, "the event stream", T, || async {
        let v = c
            .execute("return document.body.getAttribute('data-live');", vec![])
            .await
            .ok()?;
        (v.as_str() == Some("yes")).then_some(())
    })
    .await;
}

fn artefacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn dashboard_in_headless_chromium() {
    let h = SaltHarness::start();
    h.wait_req_ready();
    let port = free_port();
    let cfg = steward_config(
        &h,
        &[],
        &format!("http:\n  listen: 127.0.0.1:{port}\n  cookie_secure: false\n"),
    );
    run_ok(cli(&cfg, &["model", "add", "web"]));
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
    let mut daemon = start_daemon(&cfg);
    daemon.wait_err_line("http started", T, |l| l.contains("HTTP API listening"));
    let dir = artefacts();
    let driver = Driver::start(&dir.join("chromedriver.log"));
    let base = format!("http://127.0.0.1:{port}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async {
        let c = connect(driver.port).await;
        log_in(&c, &base).await;
        assert_eq!(text_of(&c, "#count-servers").await.as_deref(), Some("0"));
        // htmx loaded from the binary, and no <style> element added (the CSP
        // would refuse it: htmx's indicator styles are off in its config).
        let loaded = c
            .execute(
                "return [typeof window.htmx, document.querySelectorAll('style').length];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(loaded, json!(["object", 0]));
        assert!(text_of(&c, "h1").await.unwrap().contains("Overview"));
        // Marks this document: a reload would lose the mark.
        c.execute("window.stewardMark = 'same page';", vec![])
            .await
            .unwrap();

        // A server added with the CLI shows up through the event stream.
        run_ok(cli(
            &cfg,
            &["server", "add", "web07.example.org", "--model", "web"],
        ));
        wait_for(&c, "the new server on the overview", T, || async {
            let n = text_of(&c, "#count-servers").await?;
            let recent = text_of(&c, "#recent").await?;
            (n == "1" && recent.contains("web07.example.org")).then_some(())
        })
        .await;
        let mark = c
            .execute("return window.stewardMark;", vec![])
            .await
            .unwrap();
        assert_eq!(mark, json!("same page"), "the overview was reloaded");
        let png = c.screenshot().await.unwrap();
        std::fs::write(dir.join("overview.png"), png).unwrap();

        // The server's page.
        c.find(Locator::LinkText("web07.example.org"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(&c, "the server page", T, || async {
            let h1 = text_of(&c, "h1").await?;
            (h1 == "web07.example.org").then_some(())
        })
        .await;
        assert_eq!(path_of(&c).await, "/servers/web07.example.org");
        let fields = text_of(&c, "#fields").await.unwrap();
        assert!(
            fields.contains("web07.example.org") && fields.contains("minion_id"),
            "{fields}"
        );

        // Log out: back to the form, and the pages want a login again.
        c.find(Locator::Css("#logout"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(&c, "the login form after logging out", T, || async {
            (path_of(&c).await == "/login").then_some(())
        })
        .await;
        c.goto(&format!("{base}/servers")).await.unwrap();
        assert_eq!(path_of(&c).await, "/login");

        // Logged in again, a tab's stream is open while the daemon stops.
        log_in(&c, &base).await;
        c
    });

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{}", daemon.seen_err.join("\n"));
    assert!(
        daemon
            .seen_err
            .iter()
            .any(|l| l.contains("Stopped component") && l.contains("http")),
        "{}",
        daemon.seen_err.join("\n")
    );
    rt.block_on(async {
        let _ = client.close().await;
    });
    drop(driver);
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(artefacts().join(name), png).unwrap();
}

async fn go(c: &Client, base: &str, path: &str) {
    c.goto(&format!("{base}{path}")).await.unwrap();
    assert_eq!(path_of(c).await, path.split('?').next().unwrap());
}

/// Each row of table `css` as its cells' text.
async fn rows(c: &Client, css: &str) -> Vec<Vec<String>> {
    let v = c
        .execute(
            "return Array.from(document.querySelectorAll(arguments[0] + ' tbody tr'))\
               .map(r => Array.from(r.cells).map(x => x.textContent.trim()));",
            vec![json!(css)],
        )
        .await
        .unwrap();
    serde_json::from_value(v).unwrap()
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A backup goes red on the page while it is open: a user made with the CLI
/// logs in; of two backups (made with the library on the daemon's SQLite
/// registry, as the CLI does), one has a successful result recorded
/// (`Service::record_backup_result`, what `backup run` records with): green
/// on `/backups` and counted green on the overview; the other has not run
/// yet. A failed result recorded for it while the overview is open turns it
/// red there without a reload (the event stream): counted red and on the
/// attention list as `backup red`; `/backups` then shows its red badge (in
/// the stylesheet's red) with the error, the other still green.
/// Screenshots of each step under `target/tmp/browser/`.
#[test]
fn a_backup_turns_red_live_when_its_result_fails() {
    use salt_steward::registry::backup::{BackupResult, Outcome};
    use salt_steward::registry::service::BackupSpec;
    use salt_steward::registry::{self, ServerRef};

    let h = SaltHarness::start();
    h.wait_req_ready();
    let port = free_port();
    let cfg = steward_config(
        &h,
        &[],
        &format!("http:\n  listen: 127.0.0.1:{port}\n  cookie_secure: false\n"),
    );
    run_ok(cli(&cfg, &["model", "add", "web"]));
    for s in ["web01.example.org", "db01.example.org", "bk01.example.org"] {
        run_ok(cli(&cfg, &["server", "add", s, "--model", "web"]));
    }
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
    let url = format!("sqlite://{}/registry.db", h.root().display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = |backup_id: i64, run: &str, outcome: Outcome, error: &str| BackupResult {
        backup_id,
        run_id: run.to_owned(),
        level: "daily".to_owned(),
        started_at: now_ms() - 60_000,
        duration_ms: 5_000,
        outcome,
        files: Some(12),
        size: (outcome == Outcome::Ok).then_some(4096),
        transferred: Some(0),
        rsync_exit: Some(if outcome == Outcome::Ok { 0 } else { 12 }),
        error: error.to_owned(),
        received_at: 0,
    };
    let svc = rt.block_on(registry::open(&url)).unwrap();
    let (web, db) = rt.block_on(async {
        let spec = |source: &str, folder: &str, dest: &str| BackupSpec {
            source: ServerRef::Name(source.into()),
            source_folder: folder.into(),
            dest: ServerRef::Name("bk01.example.org".into()),
            dest_folder: dest.into(),
            excludes: Vec::new(),
            exclude_proc_sys: false,
            active: None,
            retain: None,
            ssh_host: Some("127.0.0.1".into()),
            ssh_port: None,
            ssh_user: None,
        };
        let web = svc
            .create_backup(spec("web01.example.org", "/srv/www", "/backups/web01"))
            .await
            .unwrap();
        let db = svc
            .create_backup(spec("db01.example.org", "/srv/db", "/backups/db01"))
            .await
            .unwrap();
        assert!(svc
            .record_backup_result(&web, &result(web.id, "run-web-1", Outcome::Ok, ""))
            .await
            .unwrap());
        (web, db)
    });

    let mut daemon = start_daemon(&cfg);
    daemon.wait_err_line("http started", T, |l| l.contains("HTTP API listening"));
    let driver = Driver::start(&artefacts().join("chromedriver-backups.log"));
    let base = format!("http://127.0.0.1:{port}");
    let health = |rows: &[Vec<String>], id: i64| -> String {
        rows.iter()
            .find(|r| r[0] == id.to_string())
            .unwrap_or_else(|| panic!("backup #{id} not listed: {rows:?}"))[4]
            .clone()
    };
    let (client, session) = rt.block_on(async {
        let c = connect(driver.port).await;
        log_in(&c, &base).await;
        // The session cookie as the browser keeps it: out of scripts' reach,
        // never sent cross-site.
        let cookie = c.get_named_cookie("steward_session").await.unwrap();
        assert_eq!(cookie.http_only(), Some(true), "{cookie}");
        assert_eq!(
            format!("{:?}", cookie.same_site()),
            "Some(Strict)",
            "{cookie}"
        );
        assert_eq!(cookie.path(), Some("/"), "{cookie}");
        let session = cookie.value().to_owned();
        assert_eq!(
            text_of(&c, "#count-backups-green").await.as_deref(),
            Some("1")
        );
        assert_eq!(
            text_of(&c, "#count-backups-red").await.as_deref(),
            Some("0")
        );
        shot(&c, "backups-1-overview-green.png").await;
        go(&c, &base, "/backups").await;
        let r = rows(&c, "#backups").await;
        assert_eq!(health(&r, web.id), "green", "{r:?}");
        assert_eq!(health(&r, db.id), "never run", "{r:?}");
        shot(&c, "backups-2-list-green.png").await;

        // The overview is open; a failed run of the other backup is recorded.
        go(&c, &base, "/").await;
        wait_for(&c, "the event stream", T, || async {
            let v = c
                .execute("return document.body.getAttribute('data-live');", vec![])
                .await
                .ok()?;
            (v.as_str() == Some("yes")).then_some(())
        })
        .await;
        let attention = text_of(&c, "#attention").await.unwrap();
        assert!(!attention.contains("backup red"), "{attention}");
        c.execute("window.stewardMark = 'same page';", vec![])
            .await
            .unwrap();
        let failed = result(
            db.id,
            "run-db-1",
            Outcome::Error,
            "rsync: connection unexpectedly closed (code 12)",
        );
        assert!(svc.record_backup_result(&db, &failed).await.unwrap());
        wait_for(&c, "the failed backup red on the overview", T, || async {
            let red = text_of(&c, "#count-backups-red").await?;
            let attention = text_of(&c, "#attention").await?;
            (red == "1"
                && attention.contains("backup red")
                && attention.contains(&format!("#{}", db.id)))
            .then_some(())
        })
        .await;
        assert_eq!(
            text_of(&c, "#count-backups-green").await.as_deref(),
            Some("1")
        );
        let mark = c
            .execute("return window.stewardMark;", vec![])
            .await
            .unwrap();
        assert_eq!(mark, json!("same page"), "the overview was reloaded");
        shot(&c, "backups-3-overview-red.png").await;

        go(&c, &base, "/backups").await;
        let r = rows(&c, "#backups").await;
        assert_eq!(health(&r, web.id), "green", "{r:?}");
        assert_eq!(health(&r, db.id), "red", "{r:?}");
        let row = r.iter().find(|r| r[0] == db.id.to_string()).unwrap();
        assert!(row[5].contains("connection unexpectedly closed"), "{row:?}");
        // Red as the stylesheet paints it, not only a class name.
        let colours = c
            .execute(
                "const row = Array.from(document.querySelectorAll('#backups tbody tr'))\
                   .find(r => r.cells[0].textContent.trim() === arguments[0]);\
                 const probe = document.createElement('span');\
                 probe.className = 'badge red'; document.body.appendChild(probe);\
                 const want = getComputedStyle(probe).color; probe.remove();\
                 return [getComputedStyle(row.cells[4].querySelector('.badge')).color, want];",
                vec![json!(db.id.to_string())],
            )
            .await
            .unwrap();
        assert_eq!(colours[0], colours[1], "{colours}");
        shot(&c, "backups-4-list-red.png").await;
        (c, session)
    });

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{}", daemon.seen_err.join("\n"));
    // The daemon's log: no password, session or password hash.
    let log = daemon.seen_err.join("\n");
    assert!(log.contains("HTTP API listening"), "{log}");
    for (what, secret) in [
        ("the password", PASSWORD),
        ("the session", session.as_str()),
        ("a password hash", "$argon2id$"),
    ] {
        assert!(!log.contains(secret), "{what} in the daemon's log:\n{log}");
    }
    rt.block_on(async {
        let _ = client.close().await;
    });
    drop(driver);
}

/// Key decisions through the dashboard against a real salt-master: the
/// pending key of a minion installed from its registry bundle is accepted
/// by an operator in the browser, through `/keys` → its confirmation page
/// → the form posting to `/api/v1/keys/{minion}/accept` (`next=/keys`),
/// back on `/keys` with the key under accepted, and `salt-key -L` on the
/// master lists it accepted. A minion with a key of its own claiming
/// another server's issued id shows as a mismatch; its accept is refused
/// (409 `key_mismatch`) and `salt-key -L` still lists it pending.
///
/// As in `http_api_keys_accept_and_reject_on_a_real_master`, no daemon
/// runs (its acceptor would accept the issued key by itself): the API's
/// router is served on a loopback port by `api::http::serve`, what the
/// daemon's HTTP component runs, with the master's pki dir and a request
/// client for the wheel.
#[test]
fn a_pending_key_is_accepted_in_the_browser_on_a_real_master() {
    use std::sync::Arc;

    use crate::accept::{add_server, bundle, listed, signing_master, wait_listed};
    use salt_steward::api::http::{serve, HttpState};
    use salt_steward::config::HttpConfig;
    use salt_steward::master_config::MasterConfig;
    use salt_steward::registry::{
        self,
        users::{Password, Role},
    };
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
    // A key of its own under web02's issued id.
    h.start_minion_verifying("impostor", &id2);
    for id in [id1.as_str(), id2.as_str()] {
        wait_listed(&h, "minions_pre", id);
    }

    let url = format!("sqlite://{}/registry.db", h.root().display());
    let master = MasterConfig::load(&h.master_config()).unwrap();
    let driver = Driver::start(&artefacts().join("chromedriver-keys.log"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let svc = Arc::new(registry::open(&url).await.unwrap());
        svc.add_user(
            "test",
            "alice",
            Role::Operator,
            Password::new(PASSWORD.into()).unwrap(),
        )
        .await
        .unwrap();
        let http = HttpConfig {
            cookie_secure: false,
            ..HttpConfig::default()
        };
        let state = HttpState::new(svc.clone(), &http)
            .with_pki_dir(h.pki_dir.clone())
            .with_wheel(ReqClient::new(&master, Duration::from_secs(20)).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let cancel = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(state), cancel.clone()));
        // Stops the server also when an assertion below fails.
        let stop = cancel.clone().drop_guard();

        let c = connect(driver.port).await;
        log_in_as(&c, &base, "alice").await;
        go(&c, &base, "/keys").await;
        let pending = rows(&c, "#keys-pending").await;
        let row = |rows: &[Vec<String>], id: &str| -> Vec<String> {
            rows.iter()
                .find(|r| r[0] == id)
                .unwrap_or_else(|| panic!("{id} not listed: {rows:?}"))
                .clone()
        };
        let r1 = row(&pending, &id1);
        assert_eq!(r1[1], "web01.example.org", "{r1:?}");
        assert_eq!(
            (r1[2].as_str(), r1[3].as_str()),
            (fp1.as_str(), fp1.as_str())
        );
        assert_eq!(r1[4], "yes", "{r1:?}");
        let r2 = row(&pending, &id2);
        assert_eq!(r2[1], "web02.example.org", "{r2:?}");
        assert_ne!(r2[2], r2[3], "{r2:?}");
        assert_eq!(r2[4], "no", "{r2:?}");
        assert!(c.find(Locator::Css("#keys-accepted")).await.is_err());
        shot(&c, "keys-1-pending.png").await;

        // The impostor: its confirmation page says no match; accepting is
        // refused and the key stays pending on the master.
        c.find(Locator::Css(&format!(
            "a[href='/keys/{id2}/confirm?action=accept']"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
        wait_for(&c, "the impostor's confirmation page", T, || async {
            (path_of(&c).await == format!("/keys/{id2}/confirm")).then_some(())
        })
        .await;
        let fields = rows(&c, "table.fields").await;
        assert_eq!(fields[0][1], r2[2], "{fields:?}");
        assert_eq!(fields[2], ["Match", "no"], "{fields:?}");
        shot(&c, "keys-2-confirm-mismatch.png").await;
        c.find(Locator::Css("#confirm"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(&c, "the refusal", T, || async {
            let source = c.source().await.ok()?;
            (path_of(&c).await == format!("/api/v1/keys/{id2}/accept")
                && source.contains("key_mismatch"))
            .then_some(())
        })
        .await;
        let status = c
            .execute(
                "return performance.getEntriesByType('navigation')[0].responseStatus;",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(status, json!(409), "the refusal's status");
        shot(&c, "keys-3-mismatch-refused.png").await;
        assert!(listed(&h, "minions_pre", &id2) && !listed(&h, "minions", &id2));

        // web01's key, as issued: accepted through the confirmation page.
        go(&c, &base, "/keys").await;
        c.find(Locator::Css(&format!(
            "a[href='/keys/{id1}/confirm?action=accept']"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
        wait_for(&c, "web01's confirmation page", T, || async {
            (path_of(&c).await == format!("/keys/{id1}/confirm")).then_some(())
        })
        .await;
        let fields = rows(&c, "table.fields").await;
        assert_eq!(fields[0][1], fp1, "{fields:?}");
        assert_eq!(fields[2], ["Match", "yes"], "{fields:?}");
        shot(&c, "keys-4-confirm.png").await;
        c.find(Locator::Css("#confirm"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(&c, "the key under accepted", T, || async {
            if path_of(&c).await != "/keys" {
                return None;
            }
            let accepted = rows(&c, "#keys-accepted").await;
            accepted.iter().any(|r| r[0] == id1).then_some(())
        })
        .await;
        let pending = rows(&c, "#keys-pending").await;
        assert!(pending.iter().all(|r| r[0] != id1), "{pending:?}");
        assert_eq!(row(&pending, &id2)[4], "no", "{pending:?}");
        shot(&c, "keys-5-accepted.png").await;
        assert!(listed(&h, "minions", &id1) && !listed(&h, "minions_pre", &id1));
        assert!(listed(&h, "minions_pre", &id2) && !listed(&h, "minions", &id2));
        let s = svc
            .get_server(&registry::ServerRef::Name("web01.example.org".into()))
            .await
            .unwrap();
        assert_eq!(s.status, registry::Status::Registered);

        let _ = c.close().await;
        drop(stop);
        tokio::time::timeout(Duration::from_secs(15), server)
            .await
            .expect("the HTTP server stops within 15 s")
            .unwrap();
    });
    drop(driver);
}
