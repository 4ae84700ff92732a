//! The event bus client against a real salt-master and real minions.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::{
    assert_ok, json_line, run_ok, steward_for, LineChild, MasterOptions, SaltHarness,
};

const T: Duration = Duration::from_secs(60);

fn watch(master_config: &Path, extra: &[&str]) -> LineChild {
    let mut args = vec!["events", "watch", "--json"];
    args.extend_from_slice(extra);
    LineChild::spawn(steward_for(master_config, &args))
}

fn tag_of(line: &str) -> String {
    json_line(line)["tag"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Waits until `events watch` reports being connected (its log line).
fn wait_connected(w: &mut LineChild) {
    w.wait_err_line("connected log", T, |l| {
        l.contains("Connected to the master event bus")
    });
}

#[test]
fn watch_sees_a_minions_auth_and_start_events() {
    let mut salt = SaltHarness::start();
    // One watcher shows everything; another stops at the minion's start
    // event and reports its reader's counters.
    let mut all = watch(&salt.master_config(), &[]);
    wait_connected(&mut all);
    let mut w = watch(
        &salt.master_config(),
        &[
            "--tag",
            "salt/minion/m-auth-1/start",
            "--count",
            "1",
            "--stats",
        ],
    );
    wait_connected(&mut w);
    salt.start_minion("m-auth-1");

    let auth = all.wait_line("salt/auth from m-auth-1", T, |l| {
        let v = json_line(l);
        v["tag"] == "salt/auth" && v["data"]["id"] == "m-auth-1"
    });
    let auth = json_line(&auth);
    assert_eq!(auth["data"]["result"], json!(true));
    let key = auth["data"]["pub"].as_str().unwrap();
    assert!(key.starts_with("-----BEGIN PUBLIC KEY-----"), "{key}");
    w.wait_line("minion start", T, |l| {
        tag_of(l) == "salt/minion/m-auth-1/start"
    });
    assert_no_decode_errors(&mut w);
}

#[test]
fn pending_key_then_salt_key_accept_shows_pend_key_and_start() {
    let mut salt = SaltHarness::start_with(MasterOptions {
        auto_accept: false,
        ..MasterOptions::default()
    });
    let mut w = watch(&salt.master_config(), &["--tag", "salt/*"]);
    wait_connected(&mut w);
    salt.start_minion("m-pend-1");
    w.wait_line("pending auth", T, |l| {
        let v = json_line(l);
        v["tag"] == "salt/auth" && v["data"]["act"] == "pend" && v["data"]["id"] == "m-pend-1"
    });
    let out = salt.master_cmd("salt-key", &["-y", "-a", "m-pend-1"]);
    assert_ok(&out);
    w.wait_line("salt/key accept", T, |l| {
        let v = json_line(l);
        // 3008 names the new state ("accepted"), older releases the act.
        v["tag"] == "salt/key" && (v["data"]["act"] == "accept" || v["data"]["act"] == "accepted")
    });
    w.wait_line("minion start", T, |l| {
        tag_of(l) == "salt/minion/m-pend-1/start"
    });
    // The filter let nothing but salt/* through.
    assert!(
        w.seen.iter().all(|l| tag_of(l).starts_with("salt/")),
        "{:?}",
        w.seen
    );
}

fn fire_ok(master_config: &Path, tag: &str) {
    run_ok(steward_for(master_config, &["events", "fire", tag, "{}"]));
}

fn salt_listener(salt: &SaltHarness, prefix: &str, count: usize) -> LineChild {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/support/salt_events.py"
    );
    let mut cmd = Command::new(salt.python());
    cmd.arg(script)
        .arg("listen")
        .arg(salt.master_config())
        .arg(prefix)
        .arg(count.to_string())
        .arg("60");
    let mut l = LineChild::spawn(cmd);
    l.wait_line("salt listener READY", T, |line| line == "READY");
    l
}

fn without_stamp(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(m) = v.as_object_mut() {
        m.remove("_stamp");
    }
    v
}

#[test]
fn events_fired_by_us_reach_salts_own_subscriber_and_back() {
    let salt = SaltHarness::start();
    let data = json!({"n": 1, "s": "héllo", "f": 1.5, "none": null, "list": [1, "two"],
                      "nested": {"a": {"b": [true, false]}}});

    // ours → Salt's get_event
    let mut listener = salt_listener(&salt, "steward/test/", 1);
    run_ok(steward_for(
        &salt.master_config(),
        &["events", "fire", "steward/test/one", &data.to_string()],
    ));
    let got = json_line(&listener.wait_line("event at salt", T, |l| l.starts_with('{')));
    assert_eq!(got["tag"], "steward/test/one");
    assert!(
        got["data"]["_stamp"].is_string(),
        "we stamp events as Salt does: {got}"
    );
    assert_eq!(without_stamp(got["data"].clone()), data);

    // Salt's fire_event → ours, with not one frame our reader could not decode.
    let mut w = watch(
        &salt.master_config(),
        &["--tag", "from/salt/*", "--count", "1", "--stats"],
    );
    wait_connected(&mut w);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/support/salt_events.py"
    );
    let mut fire = Command::new(salt.python());
    fire.args([script, "fire"])
        .arg(salt.master_config())
        .args(["from/salt/two", &data.to_string()]);
    run_ok(fire);
    let got = json_line(&w.wait_line("event from salt", T, |l| tag_of(l) == "from/salt/two"));
    assert_eq!(without_stamp(got["data"].clone()), data);
    assert_no_decode_errors(&mut w);
}

/// Waits for `events watch --stats`' summary and checks it decoded every frame.
fn assert_no_decode_errors(w: &mut LineChild) {
    w.wait_err_line("watch stats", T, |l| l.contains("\"decode_errors\""));
    let stats = w
        .seen_err
        .iter()
        .rev()
        .find(|l| l.contains("\"decode_errors\""))
        .map(|l| json_line(l))
        .unwrap();
    assert_eq!(
        stats["decode_errors"],
        json!(0),
        "{stats}; stderr: {:?}",
        w.seen_err
    );
    assert!(
        !w.seen_err.iter().any(|l| l.contains("cannot decode")),
        "{:?}",
        w.seen_err
    );
}

#[test]
fn minion_fired_events_carry_the_minion_id() {
    let mut salt = SaltHarness::start();
    let mut w = watch(&salt.master_config(), &[]);
    wait_connected(&mut w);
    salt.start_minion("m-fire-1");
    w.wait_line("minion start", T, |l| {
        tag_of(l) == "salt/minion/m-fire-1/start"
    });
    let out = salt.minion_call(
        "m-fire-1",
        &["event.send", "myapp/deploy", r#"{"version": "1.2"}"#],
    );
    assert_ok(&out);
    let got = json_line(&w.wait_line("myapp/deploy", T, |l| tag_of(l) == "myapp/deploy"));
    assert_eq!(got["data"]["id"], "m-fire-1");
    assert_eq!(got["data"]["cmd"], "_minion_event");
    assert_eq!(got["data"]["data"]["version"], "1.2");
}

#[test]
fn watch_reconnects_after_a_master_restart() {
    let mut salt = SaltHarness::start();
    let mut w = watch(&salt.master_config(), &["--tag", "restart/*"]);
    wait_connected(&mut w);
    fire_ok(&salt.master_config(), "restart/before");
    w.wait_line("event before restart", T, |l| tag_of(l) == "restart/before");

    salt.restart_master();
    // Events fired while no subscriber is connected are gone (the bus keeps
    // nothing), so fire until the reconnected watcher shows one.
    let deadline = std::time::Instant::now() + T;
    loop {
        fire_ok(&salt.master_config(), "restart/after");
        if w.try_wait_line(Duration::from_millis(500), |l| tag_of(l) == "restart/after")
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no event after restart: {:?}",
            w.seen
        );
    }
    w.wait_err_line("reconnect log", T, |l| {
        l.contains("Reconnected to the master event bus")
    });
    assert!(w.terminate().success());
}

#[test]
fn the_bus_works_over_tcp_with_ipc_mode_tcp() {
    let mut salt = SaltHarness::start_with(MasterOptions {
        ipc_tcp: true,
        ..MasterOptions::default()
    });
    let mut w = watch(&salt.master_config(), &[]);
    wait_connected(&mut w);
    salt.start_minion("m-tcp-1");
    w.wait_line("minion start over tcp", T, |l| {
        tag_of(l) == "salt/minion/m-tcp-1/start"
    });
    run_ok(steward_for(
        &salt.master_config(),
        &["events", "fire", "tcp/hello", r#"{"x": 1}"#],
    ));
    let got = json_line(&w.wait_line("fired over tcp", T, |l| tag_of(l) == "tcp/hello"));
    assert_eq!(got["data"]["x"], 1);
}

/// Salt behaviour the registry's trust rules must design around: a minion can
/// make the master fire an event *without* the `_minion_event` wrapper (and
/// so without its id) through `event.fire_master`'s `preload` ("events"
/// batch form, `daemons/masterapi.py: _minion_event`). Only tags on Salt's
/// MINION_EVENT_BLACKLIST (`salt/run/*`, `salt/key`, `salt/job/*/new` …) are
/// refused. So "not wrapped" does not prove "fired on the master".
#[test]
fn a_minion_can_fire_an_unwrapped_event_but_not_a_blacklisted_tag() {
    let mut salt = SaltHarness::start();
    salt.wait_req_ready();
    salt.start_minions_and_wait(&["m-forge-1"]);
    let mut w = watch(&salt.master_config(), &["--tag", "{forge/*,salt/run/*}"]);
    wait_connected(&mut w);
    let preload = json!({"events": [
        {"tag": "forge/request", "data": {"request_id": "r1", "name": "evil.example.org"}},
        {"tag": "salt/run/1/new", "data": {"fun": "runner.event.send"}},
    ]});
    let out = salt.minion_call(
        "m-forge-1",
        &[
            "event.fire_master",
            "{}",
            "forge/ignored",
            &format!("preload={preload}"),
        ],
    );
    assert_ok(&out);
    let got = json_line(&w.wait_line("unwrapped event", T, |l| tag_of(l) == "forge/request"));
    assert_eq!(got["data"]["name"], "evil.example.org");
    assert!(
        got["data"].get("id").is_none() && got["data"].get("cmd").is_none(),
        "{got}"
    );
    // The blacklisted tag never reaches the bus: a marker fired afterwards
    // comes out, and nothing under salt/run/ came before it.
    run_ok(steward_for(
        &salt.master_config(),
        &["events", "fire", "forge/marker", "{}"],
    ));
    w.wait_line("marker", T, |l| tag_of(l) == "forge/marker");
    assert!(
        !w.seen.iter().any(|l| tag_of(l).starts_with("salt/run/")),
        "{:?}",
        w.seen
    );
}
