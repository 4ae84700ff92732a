//! The metrics endpoint (issue #14) against a real master: scraped during a
//! burst of bus events and registry requests, every scrape parsed by the
//! Prometheus project's own Python parsers (`support/parse_metrics.py`),
//! and the counters matching what was sent; a non-loopback `metrics_listen`
//! refused at load.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::salt::free_port;
use crate::support::{
    assert_ok, cli, json_line, run_ok, start_daemon, steward_config, text, watch_steward,
    SaltHarness, T,
};

/// Events fired in the burst.
const FLOOD: u64 = 5_000;
/// Successful creates sent in the burst (with `salt-run event.send`).
const CREATES: usize = 6;

/// The Python that has the parser: Debian's, where
/// `scripts/install-system-packages` puts `python3-prometheus-client`.
const PYTHON: &str = "/usr/bin/python3";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Fails (never skips) when the parser is missing, naming the fix.
fn require_parser() {
    let ok = Command::new(PYTHON)
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the metrics test parses with the prometheus_client Python package, missing from \
         {PYTHON}: run scripts/install-system-packages (as root; it runs \
         apt-get install python3-prometheus-client)"
    );
}

/// One HTTP/1.1 GET on loopback: (status code, headers lowercased, body).
fn get(port: u16, path: &str) -> std::io::Result<(u16, HashMap<String, String>, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, body.to_owned()))
}

/// A scrape as the parsers read it.
struct Scrape {
    families: BTreeMap<String, (String, String)>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// The sample `name` with exactly `labels`, if present.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
    }

    fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in {:#?}", self.samples))
    }
}

/// Scrapes `/metrics` and parses it with the Prometheus parsers; panics
/// (with the text) if they refuse it.
fn scrape(port: u16) -> Scrape {
    let (status, headers, body) = get(port, "/metrics").expect("scraping /metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text; version=1.0.0")),
        "{headers:?}"
    );
    let mut p = Command::new(PYTHON)
        .arg(repo().join("tests/it/support/parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parsers refused the scrape: {}\n{body}",
        text(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let families = v["families"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, f)| {
            (
                k.clone(),
                (
                    f["type"].as_str().unwrap().to_owned(),
                    f["help"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    let samples = v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let labels = s[1]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect();
            (
                s[0].as_str().unwrap().to_owned(),
                labels,
                s[2].as_f64().unwrap(),
            )
        })
        .collect();
    Scrape { families, samples }
}

/// Waits until the endpoint answers (it is bound before the components start).
fn wait_listening(port: u16) {
    let deadline = Instant::now() + T;
    while get(port, "/metrics").is_err() {
        assert!(Instant::now() < deadline, "metrics endpoint not answering");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `salt-run event.send TAG DATA` on the harness's master, as a child.
fn spawn_send(h: &SaltHarness, tag: &str, data: &Value) -> Child {
    Command::new(h.bin("salt-run"))
        .arg("-c")
        .arg(&h.master_config_dir)
        .args(["event.send", tag, &data.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn metrics_endpoint_scraped_during_a_burst_matches_what_was_sent() {
    require_parser();
    let h = SaltHarness::start();
    h.wait_req_ready();
    let port = free_port();
    let cfg = steward_config(&h, &[], &format!("metrics_listen: 127.0.0.1:{port}\n"));
    run_ok(cli(&cfg, &["model", "add", "web"]));
    let mut daemon = start_daemon(&cfg);
    wait_listening(port);
    let mut w = watch_steward(&cfg);

    // Before: every family with its HELP and TYPE, the build info, nothing counted.
    let before = scrape(port);
    assert_eq!(
        before.must(
            "salt_steward_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    for (name, kind) in [
        ("salt_steward_build_info", "gauge"),
        ("salt_steward_events_received", "counter"),
        ("salt_steward_events_decoded", "counter"),
        ("salt_steward_events_failed", "counter"),
        ("salt_steward_bus_discarded_bytes", "counter"),
        ("salt_steward_bus_reconnects", "counter"),
        ("salt_steward_bus_lagged_events", "counter"),
        ("salt_steward_requests", "counter"),
        ("salt_steward_exec_requests", "counter"),
        ("salt_steward_rule_matches", "counter"),
        ("salt_steward_rule_actions_queued", "counter"),
        ("salt_steward_rule_actions", "counter"),
        ("salt_steward_rule_drops", "counter"),
        ("salt_steward_rule_reloads", "counter"),
        ("salt_steward_dispatch_queue", "gauge"),
        ("salt_steward_dispatch_runs", "counter"),
        ("salt_steward_backups", "gauge"),
        ("salt_steward_backup_last_result", "gauge"),
        ("salt_steward_jobs", "counter"),
        ("salt_steward_keys_accepted", "counter"),
        ("salt_steward_keys_rejected", "counter"),
        ("salt_steward_alerts", "counter"),
    ] {
        let (t, help) = before
            .families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name}: {:?}", before.families));
        assert_eq!(t, kind, "{name}");
        assert!(!help.is_empty(), "{name} has no HELP");
    }
    for status in ["pending", "running", "failed", "waiting"] {
        assert_eq!(
            before.must("salt_steward_dispatch_queue", &[("status", status)]),
            0.0
        );
    }
    // No backup yet: every health and outcome is there, at zero.
    for health in ["green", "red", "never_run", "running"] {
        assert_eq!(
            before.must("salt_steward_backups", &[("health", health)]),
            0.0
        );
    }
    assert_eq!(
        before.must("salt_steward_backup_last_result", &[("outcome", "ok")]),
        0.0
    );
    let received_before = before.must("salt_steward_events_received_total", &[]);
    assert!(before
        .samples
        .iter()
        .all(|(n, _, _)| n != "salt_steward_requests_total"));

    // The burst: a flood of minion events on the bus, and registry requests
    // (creates, a refused create, finds) from the master, all at once.
    let mut flood = Command::new(h.python())
        .arg(repo().join("tests/it/support/fire_flood.py"))
        .arg(&h.sock_dir)
        .arg(FLOOD.to_string())
        .arg("metrics/flood")
        .arg("mf1,mf2")
        .arg("metrics/flood/end")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut senders = Vec::new();
    let mut ids = Vec::new();
    for i in 0..CREATES {
        let id = format!("m-create-{i}");
        let data = json!({"request_id": id, "name": format!("m{i}.example.org"), "model": "web"});
        senders.push(spawn_send(&h, "steward/v1/server/create", &data));
        ids.push(id);
    }
    let data = json!({"request_id": "m-bad", "name": "x.example.org", "model": "nope"});
    senders.push(spawn_send(&h, "steward/v1/server/create", &data));
    ids.push("m-bad".to_owned());
    for i in 0..2 {
        let id = format!("m-find-{i}");
        let data = json!({"request_id": id, "model": "web"});
        senders.push(spawn_send(&h, "steward/v1/server/find", &data));
        ids.push(id);
    }

    // Scraped while it runs: every scrape parses, counters never go down.
    let mut during = 0;
    let mut last_received = received_before;
    loop {
        let running = flood.try_wait().unwrap().is_none()
            || senders.iter_mut().any(|c| c.try_wait().unwrap().is_none());
        let s = scrape(port);
        let received = s.must("salt_steward_events_received_total", &[]);
        assert!(received >= last_received, "{received} < {last_received}");
        last_received = received;
        if !running {
            break;
        }
        during += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(during >= 1, "no scrape during the burst");
    eprintln!("{during} scrapes parsed during the burst");
    assert_ok(&flood.wait_with_output().unwrap());
    for c in senders {
        assert_ok(&c.wait_with_output().unwrap());
    }

    // Every reply, in whatever order they come.
    let mut replies: HashMap<String, Value> = HashMap::new();
    while replies.len() < ids.len() {
        let line = w
            .try_wait_line(T, |l| {
                json_line(l)["tag"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("steward/v1/reply/"))
            })
            .unwrap_or_else(|why| {
                daemon.drain_err();
                panic!(
                    "replies {:?} of {ids:?}: {why}\ndaemon:\n{}",
                    replies.keys(),
                    daemon.seen_err.join("\n")
                )
            });
        let v = json_line(&line);
        let id = v["tag"].as_str().unwrap()["steward/v1/reply/".len()..].to_owned();
        replies.insert(id, v["data"].clone());
    }
    for id in &ids {
        let ok = replies[id]["ok"] == true;
        assert_eq!(ok, id != "m-bad", "{id}: {}", replies[id]);
    }
    assert_eq!(replies["m-bad"]["error"]["code"], "unknown_model");

    // After: what was sent, counted (once the bus reader has read the whole
    // flood and its end marker).
    let deadline = Instant::now() + T;
    let after = loop {
        let s = scrape(port);
        let received = s.must("salt_steward_events_received_total", &[]);
        if received - received_before >= FLOOD as f64 + 1.0 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let req = |entity, op, outcome| {
        after
            .value(
                "salt_steward_requests_total",
                &[("entity", entity), ("op", op), ("outcome", outcome)],
            )
            .unwrap_or(0.0)
    };
    assert_eq!(req("server", "create", "ok"), CREATES as f64);
    assert_eq!(req("server", "create", "unknown_model"), 1.0);
    assert_eq!(req("server", "find", "ok"), 2.0);
    let total: f64 = after
        .samples
        .iter()
        .filter(|(n, _, _)| n == "salt_steward_requests_total")
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(total, ids.len() as f64, "{:#?}", after.samples);
    let received = after.must("salt_steward_events_received_total", &[]);
    let decoded = after.must("salt_steward_events_decoded_total", &[]);
    // The flood and its end marker, plus Salt's own events of the requests.
    assert!(
        received - received_before > FLOOD as f64,
        "{received} - {received_before}"
    );
    assert_eq!(after.must("salt_steward_events_failed_total", &[]), 0.0);
    assert_eq!(decoded, received);
    assert_eq!(after.must("salt_steward_bus_reconnects_total", &[]), 0.0);
    assert_eq!(
        after.must("salt_steward_bus_discarded_bytes_total", &[]),
        0.0
    );
    assert_eq!(
        after.must("salt_steward_bus_lagged_events_total", &[]),
        0.0,
        "a 5,000-event burst fits the default queue"
    );
    assert_eq!(
        after.must("salt_steward_dispatch_runs_total", &[("outcome", "done")]),
        0.0
    );
    assert_eq!(after.must("salt_steward_keys_accepted_total", &[]), 0.0);

    // A backup defined (on the bus), never run yet: the health gauge reads
    // the registry.
    let data = json!({"request_id": "m-backup", "source": "m0.example.org",
        "source_folder": "/srv/data", "dest": "m1.example.org",
        "dest_folder": "/backups/m0", "ssh_host": "10.0.0.5"});
    assert_ok(
        &spawn_send(&h, "steward/v1/backup/create", &data)
            .wait_with_output()
            .unwrap(),
    );
    let reply = w
        .try_wait_line(T, |l| json_line(l)["tag"] == "steward/v1/reply/m-backup")
        .unwrap();
    assert_eq!(json_line(&reply)["data"]["ok"], true, "{reply}");
    let s = scrape(port);
    assert_eq!(
        s.must("salt_steward_backups", &[("health", "never_run")]),
        1.0
    );
    assert_eq!(s.must("salt_steward_backups", &[("health", "green")]), 0.0);

    // Only /metrics is served.
    let (status, _, _) = get(port, "/").unwrap();
    assert_eq!(status, 404);
    // The endpoint stops with the daemon.
    assert!(daemon.terminate().success());
    assert!(get(port, "/metrics").is_err(), "still listening after stop");
}

#[test]
fn a_non_loopback_metrics_listen_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("steward.yaml");
    std::fs::write(
        &cfg,
        "registry: sqlite:///nonexistent/r.db\nmetrics_listen: 0.0.0.0:9467\n",
    )
    .unwrap();
    let out = cli(&cfg, &["daemon"]).output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics_listen: 0.0.0.0:9467 is not a loopback address")
            && err.contains("at line 2")
            && err.contains("steward.yaml"),
        "{}",
        text(&out)
    );
}
