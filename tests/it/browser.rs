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
    c.goto(&format!("{base}/")).await.unwrap();
    // No session: the overview sends the browser to the form.
    assert_eq!(path_of(c).await, "/login");
    c.find(Locator::Css("#name"))
        .await
        .unwrap()
        .send_keys("alice")
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
