//! Exec translation against a real master (issue #14): a server named in
//! the registry runs a function on its minion if and only if it is
//! Salt-managed; refusals publish nothing; every request is recorded.

use serde_json::Value;

use crate::accept::{add_server, bundle, signing_master, wait_status};
use crate::support::{
    assert_ok, cli, reply, run_ok, start_daemon, steward_config, text, watch_steward, SaltHarness,
};

/// The minion jobs the master's job cache holds (`jobs.list_jobs`; not the
/// runner and wheel calls, ours included), as (function, target).
fn cached_jobs(h: &SaltHarness) -> Vec<(String, String)> {
    let out = h.master_cmd("salt-run", &["jobs.list_jobs", "--out=json"]);
    assert!(out.status.success(), "{}", text(&out));
    let jobs: Value = serde_json::from_slice(&out.stdout).unwrap();
    jobs.as_object()
        .unwrap()
        .values()
        .filter(|j| {
            let f = j["Function"].as_str().unwrap_or_default();
            !f.starts_with("runner.") && !f.starts_with("wheel.")
        })
        .map(|j| {
            (
                j["Function"].as_str().unwrap_or_default().to_owned(),
                j["Target"].to_string(),
            )
        })
        .collect()
}

fn exec_json(cfg: &std::path::Path, args: &[&str]) -> (bool, Value, String) {
    let mut full = vec!["exec"];
    full.extend_from_slice(args);
    full.push("--json");
    let out = cli(cfg, &full).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("exec --json printed no JSON ({e}): {}", text(&out)));
    (out.status.success(), v, text(&out))
}

#[test]
fn exec_runs_only_on_salt_managed_servers_and_records_every_request() {
    let mut h = signing_master();
    let cfg = steward_config(
        &h,
        &[],
        &format!(
            "keys: {{dir: {}/keys, pool_size: 1}}\nexec: {{master: [\"test.*\"], timeout: 30}}\n",
            h.root().display()
        ),
    );
    run_ok(cli(&cfg, &["model", "add", "web"]));
    let web = add_server(&cfg, "web01.example.org");
    let web_minion = web["minion_id"].as_str().unwrap().to_owned();
    let bare = add_server(&cfg, "bare01.example.org");
    let bare_minion = bare["minion_id"].as_str().unwrap().to_owned();
    // web01's own minion is trusted, and may run test.* through the bus.
    let cfg = steward_config(
        &h,
        &[&web_minion],
        &format!(
            "keys: {{dir: {}/keys, pool_size: 1}}\nexec: {{master: [\"test.*\"], timeout: 30, \
             minions: {{\"{web_minion}\": [\"test.*\"]}}}}\n",
            h.root().display()
        ),
    );
    let mut daemon = start_daemon(&cfg);
    let b = bundle(&h, &cfg, "web01.example.org", "web01.tgz");
    h.start_minion_from_bundle("web01", &web_minion, &b);
    wait_status(&cfg, "web01.example.org", "online");

    // A Salt-managed server, by name and by id: the minion's answer.
    let (ok, r, t) = exec_json(&cfg, &["web01.example.org", "test.ping"]);
    assert!(ok, "{t}");
    assert_eq!(r["return"], true, "{t}");
    assert_eq!(r["minion_id"], web_minion.as_str());
    assert!(r["jid"].as_str().is_some_and(|j| j.len() == 20), "{t}");
    let id = web["id"].to_string();
    let (ok, r, t) = exec_json(&cfg, &[&id, "test.echo", "hello there"]);
    assert!(ok, "{t}");
    assert_eq!(r["return"], "hello there", "{t}");

    // Refusals: each its code, exit 1, nothing published.
    let before = cached_jobs(&h);
    let (ok, r, t) = exec_json(&cfg, &["bare01.example.org", "test.ping"]);
    assert!(!ok, "{t}");
    assert_eq!(r["error"]["code"], "not_salt_managed", "{t}");
    let (ok, r, t) = exec_json(&cfg, &["ghost.example.org", "test.ping"]);
    assert!(!ok, "{t}");
    assert_eq!(r["error"]["code"], "unknown_server", "{t}");
    let (ok, r, t) = exec_json(&cfg, &["web01.example.org", "cmd.run", "id"]);
    assert!(!ok, "{t}");
    assert_eq!(r["error"]["code"], "forbidden_function", "{t}");
    let after = cached_jobs(&h);
    assert_eq!(
        after.len(),
        before.len(),
        "a refusal published a job: {after:?}"
    );
    assert!(
        !after
            .iter()
            .any(|(f, t)| f == "cmd.run" || t.contains(&bare_minion)),
        "{after:?}"
    );

    // On the bus: from the master (salt-run event.send) the reply carries the
    // jid and the return; the trusted minion may run test.* but not cmd.run;
    // an unknown server is refused.
    let mut w = watch_steward(&cfg);
    let send = |tag: &str, data: Value| {
        assert_ok(&h.master_cmd("salt-run", &["event.send", tag, &data.to_string()]));
    };
    send(
        "steward/v1/server/exec",
        serde_json::json!({"request_id": "x1", "server": "web01.example.org", "fun": "test.echo", "arg": ["from the bus"]}),
    );
    let r = reply(&mut w, &mut daemon, "x1");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["return"], "from the bus", "{r}");
    assert!(r["result"]["jid"].as_str().is_some(), "{r}");
    send(
        "steward/v1/server/exec",
        serde_json::json!({"request_id": "x2", "server": "ghost", "fun": "test.ping"}),
    );
    assert_eq!(
        reply(&mut w, &mut daemon, "x2")["error"]["code"],
        "unknown_server"
    );
    let minion_send = |data: Value| {
        assert_ok(&h.minion_call(
            &web_minion,
            &["event.send", "steward/v1/server/exec", &data.to_string()],
        ));
    };
    minion_send(
        serde_json::json!({"request_id": "x3", "server": "web01.example.org", "fun": "test.ping"}),
    );
    let r = reply(&mut w, &mut daemon, "x3");
    assert_eq!(r["result"]["return"], true, "{r}");
    minion_send(
        serde_json::json!({"request_id": "x4", "server": "web01.example.org", "fun": "cmd.run", "arg": ["id"]}),
    );
    let r = reply(&mut w, &mut daemon, "x4");
    assert_eq!(r["error"]["code"], "forbidden_function", "{r}");
    let out = run_ok(cli(&cfg, &["exec-log", "--limit", "4", "--json"]));
    let log: Value = serde_json::from_slice(&out.stdout).unwrap();
    let by: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requested_by"].as_str().unwrap())
        .collect();
    let me = format!("minion:{web_minion}");
    assert_eq!(
        by,
        vec![me.as_str(), me.as_str(), "master", "master"],
        "{log}"
    );

    // The CLI's five, newest first, with who asked.
    let out = run_ok(cli(&cfg, &["exec-log", "--json"]));
    let log: Value = serde_json::from_slice(&out.stdout).unwrap();
    let log = Value::Array(log.as_array().unwrap()[4..].to_vec());
    let rows: Vec<(String, String, String)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["fun"].as_str().unwrap().to_owned(),
                r["outcome"].as_str().unwrap().to_owned(),
                r["error_code"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "cmd.run".into(),
                "refused".into(),
                "forbidden_function".into()
            ),
            (
                "test.ping".into(),
                "refused".into(),
                "unknown_server".into()
            ),
            (
                "test.ping".into(),
                "refused".into(),
                "not_salt_managed".into()
            ),
            ("test.echo".into(), "ok".into(), String::new()),
            ("test.ping".into(), "ok".into(), String::new()),
        ],
        "{log}"
    );
    assert!(log
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["requested_by"] == "cli"));
    assert!(log[3]["jid"].as_str().is_some() && log[0]["jid"].is_null());
}
