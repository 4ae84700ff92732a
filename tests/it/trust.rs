//! Issue #10 §1 against a real master with two accepted minions and every
//! file of `reactors/` installed as shipped: trust is decided from an event's
//! origin, never from its shape. `trust-a` plays the attacker: with
//! `salt-call event.fire_master … preload=…` it makes the master fire any
//! unwrapped event (a batch), imitate another minion's wrapping, or — with
//! the batch's `pretag` — fire a blacklisted `salt/run/<jid>/new`.
//! `trust-b` is the trusted minion (`trusted_minions`).
//!
//! Absence is never proved by a sleep: a marker goes through the same
//! ordered path (the same batch, or the same component), or the component
//! says what it decided.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::accept::{add_server, listed};
use crate::support::{
    assert_ok, cli, json_line, reply, run_ok, server_names, steward_config, wait_event_data,
    LineChild, SaltHarness, T,
};

const ATTACKER: &str = "trust-a";
const TRUSTED: &str = "trust-b";

/// Rules of the tests beside the shipped ones: a marker, and a job on the
/// trusted minion that fails after a while.
const TEST_RULES: &str = r#"rules:
  - name: trust-marker
    on: trust/marker
    do:
      - fire: { tag: trust/marker/seen, data: { n: "{{ payload.n }}" } }
  - name: trust-job
    on: trust/job
    from: unverified
    timeout: 60s
    do:
      - local: { target: trust-b, tgt_type: list, fun: cmd.run, arg: ["sleep 8; exit 1"], kwarg: { python_shell: true } }
"#;

struct Setup {
    h: SaltHarness,
    cfg: PathBuf,
    daemon: LineChild,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A master with `trust-a` and `trust-b` accepted, a daemon (preseed mode,
/// `trust-b` trusted) with every shipped rule file and [`TEST_RULES`].
fn setup() -> Setup {
    let mut h = SaltHarness::start();
    h.wait_req_ready();
    h.start_minions_and_wait(&[ATTACKER, TRUSTED]);
    let rules = h.root().join("rules.d");
    std::fs::create_dir_all(&rules).unwrap();
    let mut shipped = 0;
    for entry in std::fs::read_dir(repo().join("reactors")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
            std::fs::copy(&path, rules.join(path.file_name().unwrap())).unwrap();
            shipped += 1;
        }
    }
    assert!(shipped >= 4, "only {shipped} shipped rule files");
    std::fs::write(rules.join("trust-test.yaml"), TEST_RULES).unwrap();
    let cfg = steward_config(
        &h,
        &[TRUSTED],
        &format!(
            "rules_dir: {}\nkeys: {{dir: {}/keys, pool_size: 1, accept_mode: preseed}}\n",
            rules.display(),
            h.root().display()
        ),
    );
    run_ok(cli(&cfg, &["model", "add", "web"]));
    let mut daemon = LineChild::spawn(cli(&cfg, &["daemon"]));
    daemon.wait_err_line("rules loaded", T, |l| l.contains("Rules loaded."));
    daemon.wait_err_line("daemon on the bus", T, |l| {
        l.contains("Connected to the master event bus")
    });
    Setup { h, cfg, daemon }
}

/// `events watch --json` of everything.
fn watch_all(cfg: &Path) -> LineChild {
    let mut w = LineChild::spawn(cli(cfg, &["events", "watch", "--json"]));
    w.wait_err_line("watch connected", T, |l| {
        l.contains("Connected to the master event bus")
    });
    w
}

/// The attacker makes the master fire `events` (tag, data) as an unwrapped
/// batch, in order.
fn forge(h: &SaltHarness, events: &[(&str, Value)]) {
    let events: Vec<Value> = events
        .iter()
        .map(|(tag, data)| json!({"tag": tag, "data": data}))
        .collect();
    let preload = json!({ "events": events });
    assert_ok(&h.minion_call(
        ATTACKER,
        &[
            "event.fire_master",
            "{}",
            "ignored",
            &format!("preload={preload}"),
        ],
    ));
}

/// The attacker makes the master fire `<pretag>/<tag>` unwrapped: Salt
/// checks its blacklist on `tag` only.
fn forge_pretagged(h: &SaltHarness, pretag: &str, tag: &str, data: Value) {
    let preload = json!({"events": [{"tag": tag, "data": data}], "pretag": pretag});
    assert_ok(&h.minion_call(
        ATTACKER,
        &[
            "event.fire_master",
            "{}",
            "ignored",
            &format!("preload={preload}"),
        ],
    ));
}

fn tag_of(line: &str) -> String {
    json_line(line)["tag"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn status(cfg: &Path, name: &str) -> Value {
    let out = run_ok(cli(cfg, &["server", "show", name, "--json"]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["status"].clone()
}

#[test]
fn a_forged_server_deleted_notification_deletes_no_key() {
    let Setup { h, cfg, mut daemon } = setup();
    let mut w = watch_all(&cfg);
    // Any minion id, "*" included, and an imitation of the trusted minion's
    // wrapping; then a marker in the same batch: the rules engine reads the
    // bus in order, and the marker's rule queue follows the same order as
    // the deletes' would have.
    forge(
        &h,
        &[
            (
                "steward/v1/server/deleted",
                json!({"id": 1, "name": "b.example.org", "minion_id": TRUSTED}),
            ),
            ("steward/v1/server/deleted", json!({"minion_id": "*"})),
            (
                "steward/v1/server/deleted",
                json!({"cmd": "_minion_event", "id": TRUSTED, "tag": "steward/v1/server/deleted",
                       "data": {"minion_id": "*"}}),
            ),
            ("trust/marker", json!({"n": 1})),
        ],
    );
    let done = wait_event_data(
        &mut w,
        &mut daemon,
        "steward/v1/rule/trust-marker/done",
        |_| true,
    );
    for id in [ATTACKER, TRUSTED] {
        assert!(listed(&h, "minions", id), "{id}'s key was deleted");
    }
    assert!(
        !w.seen
            .iter()
            .any(|l| tag_of(l).starts_with("steward/v1/rule/delete-key-of-removed-server/")),
        "the shipped rule ran on a forged notification: {:?}",
        w.seen
    );
    assert_eq!(done["event"]["origin"], "unverified", "{done}");

    // The daemon's own notification still works: a server deleted from the
    // registry loses its (preseeded) key, by its exact id.
    let server = add_server(&cfg, "gone.example.org");
    let id = server["minion_id"].as_str().unwrap().to_owned();
    assert!(listed(&h, "minions", &id));
    run_ok(cli(&cfg, &["server", "rm", "gone.example.org"]));
    let done = wait_event_data(
        &mut w,
        &mut daemon,
        "steward/v1/rule/delete-key-of-removed-server/done",
        |_| true,
    );
    assert_eq!(done["event"]["origin"], "master", "{done}");
    assert!(
        !listed(&h, "minions", &id),
        "the removed server's key stays"
    );
    for other in [ATTACKER, TRUSTED] {
        assert!(
            listed(&h, "minions", other),
            "{other}'s key was deleted too"
        );
    }
}

#[test]
fn a_minions_forged_registry_request_writes_nothing() {
    let Setup { h, cfg, mut daemon } = setup();
    let mut w = watch_all(&cfg);
    // An unwrapped create with a clean `salt/run/<jid>/new` of
    // runner.event.send naming it, made with `pretag` (as salt-run would
    // fire it, before the request).
    let f1 = json!({"request_id": "f1", "name": "forged1.example.org", "model": "web"});
    forge_pretagged(
        &h,
        "salt/run/20261123000000000123",
        "new",
        json!({"fun": "runner.event.send", "jid": "20261123000000000123", "user": "root",
               "fun_args": ["steward/v1/server/create", f1]}),
    );
    w.wait_line("forged runner event", T, |l| {
        tag_of(l) == "salt/run/20261123000000000123/new"
    });
    forge(&h, &[("steward/v1/server/create", f1.clone())]);
    // An imitation of the trusted minion's wrapped request, with a forged
    // return of its `salt-call event.send` after it.
    let f3 = json!({"request_id": "f3", "name": "forged3.example.org", "model": "web"});
    forge(
        &h,
        &[
            (
                "steward/v1/server/create",
                json!({"cmd": "_minion_event", "id": TRUSTED, "tag": "steward/v1/server/create",
                       "data": f3}),
            ),
            (
                "salt/job/20261123000000000124/ret/trust-b",
                json!({"cmd": "_return", "id": TRUSTED, "jid": "20261123000000000124",
                       "fun": "event.send", "fun_args": ["steward/v1/server/create", f3.to_string()],
                       "return": true, "retcode": 0, "success": true}),
            ),
        ],
    );
    // The refusals are the markers: fired once each request was decided.
    for id in ["f1", "f3"] {
        let r = reply(&mut w, &mut daemon, id);
        assert_eq!(r["error"]["code"], "unverified_sender", "{id}: {r}");
    }
    assert!(server_names(&cfg).is_empty(), "{:?}", server_names(&cfg));

    // The trusted minion's genuine request is served.
    assert_ok(&h.minion_call(
        TRUSTED,
        &[
            "event.send",
            "steward/v1/server/create",
            r#"{"request_id": "t1", "name": "db01.example.org", "model": "web"}"#,
        ],
    ));
    let r = reply(&mut w, &mut daemon, "t1");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(server_names(&cfg), ["db01.example.org"]);

    // A malformed request with a readable id is answered.
    forge(
        &h,
        &[(
            "steward/v1/server/frobnicate",
            json!({"request_id": "b1", "name": "x"}),
        )],
    );
    assert_eq!(
        reply(&mut w, &mut daemon, "b1")["error"]["code"],
        "bad_request"
    );
}

#[test]
fn the_genuine_salt_run_request_is_served_though_a_forgery_with_its_id_came_first() {
    let Setup { h, cfg, mut daemon } = setup();
    let mut w = watch_all(&cfg);
    forge(
        &h,
        &[(
            "steward/v1/server/create",
            json!({"request_id": "g1", "name": "evil.example.org", "model": "web"}),
        )],
    );
    w.wait_line("the forgery is on the bus first", T, |l| {
        let v = json_line(l);
        v["tag"] == "steward/v1/server/create" && v["data"]["name"] == "evil.example.org"
    });
    assert_ok(&h.master_cmd(
        "salt-run",
        &[
            "event.send",
            "steward/v1/server/create",
            r#"{"request_id": "g1", "name": "good.example.org", "model": "web"}"#,
        ],
    ));
    let r = reply(&mut w, &mut daemon, "g1");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["name"], "good.example.org", "{r}");
    // The forgery waited for a receipt that never came; its refusal is not
    // fired on the reply tag of the request that was served.
    daemon.wait_err_line("forgery refused silently", T, |l| {
        l.contains("Registry request refused, not answered") && l.contains("request_id=g1")
    });
    assert_eq!(server_names(&cfg), ["good.example.org"]);
    let replies = w
        .seen
        .iter()
        .filter(|l| tag_of(l) == "steward/v1/reply/g1")
        .count();
    assert_eq!(replies, 1, "{:?}", w.seen);
}

#[test]
fn a_forged_salt_auth_accept_does_not_change_a_servers_status() {
    let Setup { h, cfg, mut daemon } = setup();
    // Preseeded: its key is in minions/ already; no machine runs it.
    let server = add_server(&cfg, "pre01.example.org");
    let id = server["minion_id"].as_str().unwrap().to_owned();
    assert_eq!(server["status"], "keys-issued");
    assert!(listed(&h, "minions", &id));
    forge(
        &h,
        &[
            (
                "salt/auth",
                json!({"result": true, "act": "accept", "id": id, "pub": server["public_key"]}),
            ),
            // and its start, imitating the minion's own wrapping
            (
                &format!("salt/minion/{id}/start"),
                json!({"cmd": "_minion_event", "id": id, "tag": format!("salt/minion/{id}/start"),
                       "data": format!("Minion {id} started")}),
            ),
        ],
    );
    // The acceptor says what it made of each event (the start only after
    // its test.ping went unanswered); the status must not move meanwhile.
    let decided = |d: &LineChild, what: &str| {
        d.seen_err
            .iter()
            .any(|l| l.contains(what) && l.contains(id.as_str()))
    };
    let deadline = std::time::Instant::now() + T;
    loop {
        daemon.drain_err();
        let s = status(&cfg, "pre01.example.org");
        assert_eq!(s, "keys-issued", "a forged event changed the status");
        if decided(&daemon, "Accept event for a preseeded key: not proof")
            && decided(&daemon, "Start event not confirmed")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the acceptor did not decide:\n{}",
            daemon.seen_err.join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        !daemon.seen_err.iter().any(|l| l.contains("Server online.")),
        "{:?}",
        daemon.seen_err
    );
}

#[test]
fn a_forged_job_return_for_another_minion_does_not_count_as_its_success() {
    let Setup { h, cfg, mut daemon } = setup();
    let mut w = watch_all(&cfg);
    // The rule runs a job on the trusted minion that fails after 8 s.
    assert_ok(&h.master_cmd("salt-run", &["event.send", "trust/job", "{}"]));
    let new = w.wait_line("the rule's job published", T, |l| {
        let v = json_line(l);
        v["tag"]
            .as_str()
            .is_some_and(|t| t.starts_with("salt/job/") && t.ends_with("/new"))
            && v["data"]["fun"] == "cmd.run"
            && v["data"]["minions"] == json!([TRUSTED])
    });
    let jid = json_line(&new)["data"]["jid"].as_str().unwrap().to_owned();
    // Before the minion answers, a success in its name.
    forge(
        &h,
        &[(
            &format!("salt/job/{jid}/ret/{TRUSTED}"),
            json!({"cmd": "_return", "id": TRUSTED, "jid": jid, "fun": "cmd.run",
                   "fun_args": ["sleep 8; exit 1"], "return": "", "retcode": 0, "success": true}),
        )],
    );
    let result = match w.try_wait_line(Duration::from_secs(120), |l| {
        tag_of(l).starts_with("steward/v1/rule/trust-job/")
    }) {
        Ok(line) => json_line(&line),
        Err(why) => {
            daemon.drain_err();
            panic!(
                "no result of trust-job: {why}\ndaemon:\n{}",
                daemon.seen_err.join("\n")
            )
        }
    };
    assert_eq!(
        result["tag"], "steward/v1/rule/trust-job/failed",
        "{result}"
    );
    let b = &result["data"]["minions"][TRUSTED];
    assert_eq!(b["success"], false, "{result}");
    assert_eq!(b["retcode"], 1, "{result}");
    // The forged event did come first.
    let forged_at = w
        .seen
        .iter()
        .position(|l| tag_of(l) == format!("salt/job/{jid}/ret/{TRUSTED}"))
        .unwrap();
    let real: Vec<&String> = w
        .seen
        .iter()
        .filter(|l| tag_of(l) == format!("salt/job/{jid}/ret/{TRUSTED}"))
        .collect();
    assert_eq!(real.len(), 2, "the forged return and the real one");
    assert_eq!(json_line(&w.seen[forged_at])["data"]["success"], true);
}
