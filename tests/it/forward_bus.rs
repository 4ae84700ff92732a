//! Port and hostname forwards on the bus against a real master: CRUD by
//! `salt-run event.send` and a trusted minion, the outbox notifications,
//! bad input refused with its error code and nothing written, an untrusted
//! minion refused.

use serde_json::{json, Value};

use crate::support::{
    assert_ok, cli, json_line, reply, run_ok, start_daemon, steward_config, wait_event_data,
    watch_steward, LineChild, SaltHarness,
};

const PORT: &str = "steward/v1/forward/port/";
const HOSTNAME: &str = "steward/v1/forward/hostname/";

/// Fires a request from the master (`salt-run event.send`) and waits for its reply.
fn ask(
    h: &SaltHarness,
    w: &mut LineChild,
    daemon: &mut LineChild,
    tag: &str,
    request_id: &str,
    mut data: Value,
) -> Value {
    data["request_id"] = json!(request_id);
    assert_ok(&h.master_cmd("salt-run", &["event.send", tag, &data.to_string()]));
    reply(w, daemon, request_id)
}

/// The data of the notification `tag` for forward `id`, seen already or to come.
fn notified(w: &mut LineChild, daemon: &mut LineChild, tag: &str, id: &Value) -> Value {
    let is = |v: &Value| v["tag"] == tag && v["data"]["id"] == *id;
    if let Some(v) = w.seen.iter().map(|l| json_line(l)).find(is) {
        return v["data"].clone();
    }
    wait_event_data(w, daemon, tag, |d| d["id"] == *id)
}

fn cli_json(cfg: &std::path::Path, args: &[&str]) -> Value {
    serde_json::from_slice(&run_ok(cli(cfg, args)).stdout).unwrap()
}

/// How many forwards of each kind the registry holds (CLI `list --json`).
fn counts(cfg: &std::path::Path) -> (usize, usize) {
    let n = |kind| {
        cli_json(cfg, &["forward", kind, "list", "--json"])
            .as_array()
            .unwrap()
            .len()
    };
    (n("port"), n("hostname"))
}

/// The notifier's outbox position once it has passed every row (CLI `outbox status --json`).
fn outbox_position(cfg: &std::path::Path) -> i64 {
    let deadline = std::time::Instant::now() + crate::support::T;
    loop {
        let status = cli_json(cfg, &["outbox", "status", "--json"]);
        let notify = status
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["consumer"] == "notify")
            .cloned()
            .unwrap_or(Value::Null);
        if notify["pending"] == 0 {
            return notify["position"].as_i64().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outbox never processed: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn forwards_on_the_bus_with_trust_rules_and_bad_input_refused() {
    let mut h = SaltHarness::start();
    h.wait_req_ready();
    h.start_minions_and_wait(&["f-trusted", "f-untrusted"]);
    let cfg = steward_config(&h, &["f-trusted"], "");
    run_ok(cli(&cfg, &["model", "add", "web"]));
    let add = |args: &[&str]| {
        let mut all = vec!["server", "add"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--model", "web"]);
        run_ok(cli(&cfg, &all));
    };
    add(&["proxy"]);
    add(&[
        "pve1",
        "--proxmox-host",
        "--external-interface",
        "vmbr0",
        "--internal-network",
        "10.0.0.0/24",
        "--nginx-proxy",
        "proxy",
    ]);
    // A host without a proxy.
    add(&[
        "pve2",
        "--proxmox-host",
        "--external-interface",
        "vmbr0",
        "--internal-network",
        "10.1.0.0/24",
    ]);
    add(&[
        "vm1",
        "--vm",
        "--vm-host",
        "pve1",
        "--internal-ip",
        "10.0.0.2",
    ]);
    add(&[
        "vm2",
        "--vm",
        "--vm-host",
        "pve2",
        "--internal-ip",
        "10.1.0.2",
    ]);

    let mut daemon = start_daemon(&cfg);
    let mut w = watch_steward(&cfg);
    let (h, w, d) = (&h, &mut w, &mut daemon);

    // Port forward: create, find, update
    let r = ask(
        h,
        w,
        d,
        &format!("{PORT}create"),
        "p1",
        json!({"host": "pve1", "dest": "vm1", "proto": "tcp", "port": 8080, "to_port": 80}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let port_id = r["result"]["id"].clone();
    assert_eq!(
        (&r["result"]["host"], &r["result"]["dest_ip"]),
        (&json!("pve1"), &json!("10.0.0.2")),
        "{r}"
    );
    let created = notified(w, d, &format!("{PORT}created"), &port_id);
    assert_eq!(created["source_port"], 8080, "{created}");

    let r = ask(
        h,
        w,
        d,
        &format!("{PORT}find"),
        "p2",
        json!({"host": "pve1"}),
    );
    assert_eq!(r["result"].as_array().map(Vec::len), Some(1), "{r}");
    let r = ask(
        h,
        w,
        d,
        &format!("{PORT}find"),
        "p3",
        json!({"id": port_id}),
    );
    assert_eq!(r["result"][0]["dest"], "vm1", "{r}");

    let r = ask(
        h,
        w,
        d,
        &format!("{PORT}update"),
        "p4",
        json!({"id": port_id, "dest_port": 8081, "revision": 1}),
    );
    assert_eq!(
        (&r["result"]["dest_port"], &r["result"]["revision"]),
        (&json!(8081), &json!(2)),
        "{r}"
    );
    let updated = notified(w, d, &format!("{PORT}updated"), &port_id);
    assert_eq!(updated["dest_port"], 8081, "{updated}");

    // Hostname forward: create, find, update
    let r = ask(
        h,
        w,
        d,
        &format!("{HOSTNAME}create"),
        "h1",
        json!({"domain": "A.Example.org", "dest": "vm1", "to_port": 8080}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let host_id = r["result"]["id"].clone();
    assert_eq!(
        (
            &r["result"]["domain"],
            &r["result"]["proxy"],
            &r["result"]["listen_port"]
        ),
        (&json!("a.example.org"), &json!("proxy"), &json!(80)),
        "{r}"
    );
    notified(w, d, &format!("{HOSTNAME}created"), &host_id);
    let r = ask(
        h,
        w,
        d,
        &format!("{HOSTNAME}find"),
        "h2",
        json!({"proxy": "proxy"}),
    );
    assert_eq!(r["result"][0]["domain"], "a.example.org", "{r}");
    let r = ask(
        h,
        w,
        d,
        &format!("{HOSTNAME}update"),
        "h3",
        json!({"id": host_id, "path": "/app"}),
    );
    assert_eq!(r["result"]["path"], "/app", "{r}");
    notified(w, d, &format!("{HOSTNAME}updated"), &host_id);

    // Bad input: each its error code, nothing written
    let position = outbox_position(&cfg);
    assert_eq!(counts(&cfg), (1, 1));
    for (tag, id, data, code) in [
        (
            PORT,
            "b1",
            json!({"host": "pve1", "dest": "vm1", "proto": "tcp", "port": 8080, "to_port": 9}),
            "duplicate_forward",
        ),
        (
            PORT,
            "b2",
            json!({"host": "pve1", "dest": "vm2", "proto": "tcp", "port": 2222, "to_port": 22}),
            "not_a_guest",
        ),
        (
            PORT,
            "b3",
            json!({"host": "pve1", "dest": "vm1", "proto": "udp", "port": 70000, "to_port": 53}),
            "invalid_value",
        ),
        (
            HOSTNAME,
            "b4",
            json!({"domain": "b.example.org", "dest": "vm2"}),
            "no_proxy",
        ),
        (
            HOSTNAME,
            "b5",
            json!({"domain": "not a domain", "dest": "vm1"}),
            "invalid_value",
        ),
        (
            HOSTNAME,
            "b6",
            json!({"domain": "a.example.org", "dest": "vm1", "to_port": 9000}),
            "duplicate_forward",
        ),
    ] {
        let r = ask(h, w, d, &format!("{tag}create"), id, data.clone());
        assert_eq!(r["error"]["code"], code, "{data}: {r}");
    }
    // Malformed, with a readable id
    let r = ask(h, w, d, &format!("{PORT}frobnicate"), "b7", json!({}));
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    assert_eq!(counts(&cfg), (1, 1));
    assert_eq!(outbox_position(&cfg), position, "no outbox row");

    // An untrusted minion: refused, nothing written; a trusted one: served.
    let minion_send = |minion: &str, id: &str, port: u16| {
        let data = json!({"request_id": id, "host": "pve1", "dest": "vm1", "proto": "udp",
                          "port": port, "to_port": 53});
        assert_ok(&h.minion_call(
            minion,
            &["event.send", &format!("{PORT}create"), &data.to_string()],
        ));
    };
    minion_send("f-untrusted", "u1", 53);
    assert_eq!(reply(w, d, "u1")["error"]["code"], "untrusted_sender");
    assert_eq!(counts(&cfg), (1, 1));
    assert_eq!(outbox_position(&cfg), position, "no outbox row");
    minion_send("f-trusted", "t1", 5353);
    let r = reply(w, d, "t1");
    assert_eq!(r["result"]["source_port"], 5353, "{r}");
    let trusted_id = r["result"]["id"].clone();
    notified(w, d, &format!("{PORT}created"), &trusted_id);

    // Delete
    for (kind, request_id, id) in [(PORT, "p5", &port_id), (HOSTNAME, "h4", &host_id)] {
        let r = ask(
            h,
            w,
            d,
            &format!("{kind}delete"),
            request_id,
            json!({"id": id}),
        );
        assert_eq!(r["result"]["id"], *id, "{r}");
        notified(w, d, &format!("{kind}deleted"), id);
    }
    let r = ask(
        h,
        w,
        d,
        &format!("{PORT}delete"),
        "p6",
        json!({"id": port_id}),
    );
    assert_eq!(r["error"]["code"], "not_found", "{r}");

    let ports = cli_json(&cfg, &["forward", "port", "list", "--json"]);
    assert_eq!(ports[0]["id"], trusted_id, "{ports}");
    assert_eq!(counts(&cfg), (1, 0));
    assert_eq!(
        outbox_position(&cfg),
        position + 3,
        "one row each: the trusted create, two deletes"
    );
}
