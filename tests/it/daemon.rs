//! The daemon against a real master: registry requests on the bus, who may
//! make them, and notifications of changes from the outbox.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{
    assert_ok, cli, json_line, reply, run_ok, server_names, start_daemon, steward_config,
    watch_steward, with_registry_db, LineChild, SaltHarness, T,
};

fn tag_is(line: &str, tag: &str) -> bool {
    json_line(line)["tag"] == tag
}

fn salt_run_send(h: &SaltHarness, tag: &str, data: Value) {
    assert_ok(&h.master_cmd("salt-run", &["event.send", tag, &data.to_string()]));
}

/// `event.fire_master` on the untrusted minion with `preload` keys.
fn fire_master_preload(h: &SaltHarness, tag: &str, preload: &Value) {
    let preload = format!("preload={preload}");
    assert_ok(&h.minion_call("d-untrusted", &["event.fire_master", "{}", tag, &preload]));
}

/// The untrusted minion making the master fire an unwrapped create request
/// (an `events` batch), which looks as if fired on the master.
fn forge_unwrapped_create(h: &SaltHarness, request_id: &str, name: &str) {
    let batch = json!({"events": [{"tag": "steward/v1/server/create",
        "data": {"request_id": request_id, "name": name, "model": "web"}}]});
    fire_master_preload(h, "x/y", &batch);
}

#[test]
fn registry_requests_on_the_bus_with_trust_rules() {
    let mut h = SaltHarness::start();
    h.wait_req_ready();
    h.start_minions_and_wait(&["d-trusted", "d-untrusted"]);
    let cfg = steward_config(&h, &["d-trusted"], "");
    run_ok(cli(&cfg, &["model", "add", "web"]));
    let mut daemon = start_daemon(&cfg);
    let mut w = watch_steward(&cfg);

    // From the master (salt-run event.send): create, update, find
    salt_run_send(
        &h,
        "steward/v1/server/create",
        json!({"request_id": "r1", "name": "web01.example.org", "model": "web"}),
    );
    let r = reply(&mut w, &mut daemon, "r1");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["name"], "web01.example.org");
    // A server created over the bus gets its key pair too (issue #5); the
    // private key stays on disk, never in the reply.
    assert_eq!(r["result"]["status"], "keys-issued", "{r}");
    let minion_id = r["result"]["minion_id"].as_str().unwrap();
    assert!(h
        .root()
        .join("keys")
        .join(format!("{minion_id}.pem"))
        .exists());
    assert!(!r.to_string().contains("PRIVATE KEY"), "{r}");
    let created =
        json_line(&w.seen_or_wait_line("created", T, |l| tag_is(l, "steward/v1/server/created")));
    assert_eq!(created["data"]["name"], "web01.example.org");

    salt_run_send(
        &h,
        "steward/v1/server/update",
        json!({"request_id": "r2", "server": "web01.example.org", "external_ip": "192.0.2.10"}),
    );
    assert_eq!(reply(&mut w, &mut daemon, "r2")["ok"], true);
    let updated =
        json_line(&w.seen_or_wait_line("updated", T, |l| tag_is(l, "steward/v1/server/updated")));
    assert_eq!(updated["data"]["external_ip"], "192.0.2.10");

    salt_run_send(
        &h,
        "steward/v1/server/find",
        json!({"request_id": "r3", "model": "web"}),
    );
    let found = reply(&mut w, &mut daemon, "r3");
    assert_eq!(found["result"].as_array().map(Vec::len), Some(1), "{found}");

    // Bad input: a specific error, nothing written
    salt_run_send(
        &h,
        "steward/v1/server/create",
        json!({"request_id": "r4", "name": "bad host!", "model": "web"}),
    );
    assert_eq!(
        reply(&mut w, &mut daemon, "r4")["error"]["code"],
        "invalid_hostname"
    );
    salt_run_send(
        &h,
        "steward/v1/server/create",
        json!({"request_id": "r5", "name": "x.example.org", "model": "nope"}),
    );
    assert_eq!(
        reply(&mut w, &mut daemon, "r5")["error"]["code"],
        "unknown_model"
    );

    // An untrusted minion: refused, nothing written
    assert_ok(&h.minion_call(
        "d-untrusted",
        &[
            "event.send",
            "steward/v1/server/create",
            r#"{"request_id": "u1", "name": "evil.example.org", "model": "web"}"#,
        ],
    ));
    assert_eq!(
        reply(&mut w, &mut daemon, "u1")["error"]["code"],
        "untrusted_sender"
    );

    // The same minion forging an unwrapped event: not verified, nothing written
    forge_unwrapped_create(&h, "f1", "forged.example.org");
    assert_eq!(
        reply(&mut w, &mut daemon, "f1")["error"]["code"],
        "unverified_sender"
    );

    // ... even with a forged `salt/run/<jid>/new` vouching for it: a minion's
    // non-batch event.fire_master is not blacklist-checked by Salt, and
    // `preload` puts runner-looking keys at the top of the fired data.
    let fake_run = json!({"fun": "runner.event.send", "fun_args": ["steward/v1/server/create",
        {"request_id": "f2", "name": "forged2.example.org", "model": "web"}]});
    fire_master_preload(&h, "salt/run/20261123000000000001/new", &fake_run);
    forge_unwrapped_create(&h, "f2", "forged2.example.org");
    assert_eq!(
        reply(&mut w, &mut daemon, "f2")["error"]["code"],
        "unverified_sender"
    );

    // A trusted minion: accepted
    assert_ok(&h.minion_call(
        "d-trusted",
        &[
            "event.send",
            "steward/v1/server/create",
            r#"{"request_id": "t1", "name": "db01.example.org", "model": "web"}"#,
        ],
    ));
    assert_eq!(reply(&mut w, &mut daemon, "t1")["ok"], true);

    salt_run_send(
        &h,
        "steward/v1/server/delete",
        json!({"request_id": "r6", "server": "web01.example.org"}),
    );
    assert_eq!(reply(&mut w, &mut daemon, "r6")["ok"], true);
    w.seen_or_wait_line("deleted", T, |l| tag_is(l, "steward/v1/server/deleted"));

    assert_eq!(server_names(&cfg), ["db01.example.org"]);
}

#[test]
fn a_change_made_while_the_daemon_is_down_is_notified_once() {
    let h = SaltHarness::start();
    let cfg = steward_config(&h, &[], "");
    run_ok(cli(&cfg, &["model", "add", "web"]));
    run_ok(cli(
        &cfg,
        &["server", "add", "offline.example.org", "--model", "web"],
    ));

    let mut w = watch_steward(&cfg);
    let is_ours = |l: &str| {
        let v = json_line(l);
        v["tag"] == "steward/v1/server/created" && v["data"]["name"] == "offline.example.org"
    };
    let daemon = start_daemon(&cfg);
    w.wait_line("created after start", T, is_ours);
    // Fired, then marked processed: wait for the mark (delivery is
    // at-least-once, so a kill between the two would rightly fire again).
    wait_outbox_empty(&h);
    // Killed without warning, then started again: nothing is fired twice.
    let pid = nix::unistd::Pid::from_raw(daemon.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    drop(daemon);
    let _daemon = start_daemon(&cfg);
    run_ok(cli(
        &cfg,
        &["server", "add", "later.example.org", "--model", "web"],
    ));
    w.wait_line("the next change", T, |l| {
        json_line(l)["data"]["name"] == "later.example.org"
    });
    let ours = w.seen.iter().filter(|l| is_ours(l)).count();
    assert_eq!(ours, 1, "{:?}", w.seen);
}

/// Waits until the daemon's notifier and dispatcher have passed every
/// outbox entry.
fn wait_outbox_empty(h: &SaltHarness) {
    with_registry_db(h, |url| async move {
        let service = salt_steward::registry::open(&url).await.unwrap();
        let deadline = std::time::Instant::now() + T;
        use salt_steward::registry::Store as _;
        // Both readers: the notifier, and the dispatcher (which may come
        // later; `outbox status` shows both).
        let pending = || async {
            for consumer in ["notify", "dispatch"] {
                match service.store().outbox_pending(consumer, 10).await {
                    Ok(rows) if rows.is_empty() => {}
                    Ok(_) => return true,
                    // The daemon has not subscribed yet.
                    Err(e) if e.code() == "not_found" => return true,
                    Err(e) => panic!("{e}"),
                }
            }
            false
        };
        while pending().await {
            assert!(
                std::time::Instant::now() < deadline,
                "outbox never processed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// A row the notifier cannot read (here: a kind no release wrote) is
/// quarantined with its reason, and the change after it is still notified;
/// `outbox status` and `outbox quarantined` show it.
#[test]
fn an_unreadable_outbox_row_is_quarantined_not_a_block() {
    let h = SaltHarness::start();
    let cfg = steward_config(&h, &[], "");
    run_ok(cli(&cfg, &["model", "add", "web"]));
    with_registry_db(&h, |url| async move {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query(
            "INSERT INTO outbox (kind, server_id, payload, created_at) VALUES ('server.exploded', NULL, '{}', 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    });
    run_ok(cli(
        &cfg,
        &["server", "add", "after.example.org", "--model", "web"],
    ));

    let mut w = watch_steward(&cfg);
    let _daemon = start_daemon(&cfg);
    w.wait_line("the change after the bad row", T, |l| {
        let v = json_line(l);
        v["tag"] == "steward/v1/server/created" && v["data"]["name"] == "after.example.org"
    });
    wait_outbox_empty(&h);
    let status: Value =
        serde_json::from_slice(&run_ok(cli(&cfg, &["outbox", "status", "--json"])).stdout).unwrap();
    assert_eq!(
        status,
        json!([
            {"consumer": "dispatch", "position": 3, "pending": 0, "quarantined": 1},
            {"consumer": "notify", "position": 3, "pending": 0, "quarantined": 1},
        ]),
        "model created (1), bad row (2), server created (3): each reader quarantined it"
    );
    let q: Value =
        serde_json::from_slice(&run_ok(cli(&cfg, &["outbox", "quarantined", "--json"])).stdout)
            .unwrap();
    for row in q.as_array().unwrap() {
        assert_eq!(row["outbox_id"], 2, "{q}");
        assert_eq!(row["reason"], "unknown kind \"server.exploded\"", "{q}");
    }
}

/// The daemon is a supervisor of named components: SIGTERM stops each of
/// them (named in the log) and exits 0; a component that panics (a fault
/// injected into the test build, `SALT_STEWARD_TEST_PANIC`) is named in the
/// log, through tracing, and the daemon stops the rest and exits non-zero.
#[test]
fn a_component_that_panics_is_named_and_the_daemon_exits_non_zero() {
    let h = SaltHarness::start();
    let cfg = steward_config(&h, &[], "");
    let components = [
        "bus-reader",
        "event-writer",
        "job-tracker",
        "request-server",
        "outbox-notifier",
        "acceptor",
        "key-pool",
        "rules",
        "inventory-dispatcher",
        "config-reload",
    ];
    let stopped = |seen: &[String], name: &str| {
        seen.iter()
            .any(|l| l.contains("Stopped component.") && l.contains(&format!("component={name}")))
    };

    let mut d = start_daemon(&cfg);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = d.wait_exit(T);
    let log = d.seen_err.join("\n");
    assert!(status.success(), "{status:?}\n{log}");
    for name in components {
        assert!(stopped(&d.seen_err, name), "{name} not stopped:\n{log}");
    }

    let mut cmd = cli(&cfg, &["daemon"]);
    cmd.env("SALT_STEWARD_TEST_PANIC", "rules");
    let mut d = LineChild::spawn(cmd);
    let status = d.wait_exit(T);
    let log = d.seen_err.join("\n");
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        d.seen_err
            .iter()
            .any(|l| l.contains("Panic.") && l.contains("fault injected into rules")),
        "the panic is logged through tracing:\n{log}"
    );
    assert!(
        d.seen_err
            .iter()
            .any(|l| l.contains("Component ended before shutdown")
                && l.contains("component=rules")
                && l.contains("panicked")),
        "the component is named:\n{log}"
    );
    for name in components.iter().filter(|n| **n != "rules") {
        assert!(stopped(&d.seen_err, name), "{name} not stopped:\n{log}");
    }
}
