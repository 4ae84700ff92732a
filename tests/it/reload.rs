//! SIGHUP against a running daemon (issue #14): the config is read again;
//! `log.level`, `trusted_minions` and `rules_dir` apply without a restart, a
//! setting only taken at start is named, a broken file changes nothing.

use serde_json::json;

use std::time::{Duration, Instant};

use crate::support::{
    assert_ok, cli, reply, run_ok, start_daemon, steward_config, watch_steward, LineChild,
    SaltHarness, T,
};

fn hup(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

#[test]
fn sighup_applies_the_log_level_trusted_minions_and_rules_dir_without_a_restart() {
    let mut h = SaltHarness::start();
    h.wait_req_ready();
    h.start_minions_and_wait(&["r-minion"]);
    let rules = h.root().join("rules.d");
    std::fs::create_dir_all(&rules).unwrap();
    let rules_dir = format!("rules_dir: {}\n", rules.display());
    let cfg = steward_config(&h, &[], &format!("log: {{level: info}}\n{rules_dir}"));
    // The CLI's view of the registry the daemon started with.
    let listing = h.root().join("listing.yaml");
    std::fs::copy(&cfg, &listing).unwrap();
    run_ok(cli(&cfg, &["model", "add", "web"]));
    let mut daemon = start_daemon(&cfg);
    let mut w = watch_steward(&cfg);
    let create = |request_id: &str, name: &str| {
        let data = json!({"request_id": request_id, "name": name, "model": "web"});
        assert_ok(&h.minion_call(
            "r-minion",
            &["event.send", "steward/v1/server/create", &data.to_string()],
        ));
    };

    create("q1", "a.example.org");
    let r = reply(&mut w, &mut daemon, "q1");
    assert_eq!(r["error"]["code"], "untrusted_sender", "{r}");

    // The minion trusted, the level debug, another rules directory, and
    // another registry (only taken at start).
    let rules2 = h.root().join("rules2.d");
    std::fs::create_dir_all(&rules2).unwrap();
    std::fs::write(
        rules2.join("pong.yaml"),
        "rules:\n  - name: pong\n    on: reload/ping\n    do:\n      - fire: { tag: reload/pong }\n",
    )
    .unwrap();
    let rules_dir2 = format!("rules_dir: {}\n", rules2.display());
    let other_registry = format!("registry: sqlite://{}/other.db\n", h.root().display());
    steward_config(
        &h,
        &["r-minion"],
        &format!("log: {{level: debug}}\n{rules_dir2}{other_registry}"),
    );
    hup(daemon.pid());
    daemon.wait_err_line("reload applied", T, |l| {
        l.contains("Config reloaded.")
            && l.contains("log.level")
            && l.contains("trusted_minions")
            && l.contains("rules_dir")
    });
    daemon.wait_err_line("restart named", T, |l| {
        l.contains("only taken at start") && l.contains("registry") && !l.contains("rules_dir")
    });
    // The rule of the new directory runs.
    let mut pongs = LineChild::spawn(cli(
        &cfg,
        &["events", "watch", "--json", "--tag", "reload/pong"],
    ));
    pongs.wait_err_line("watch connected", T, |l| {
        l.contains("Connected to the master event bus")
    });
    let start = Instant::now();
    loop {
        run_ok(cli(&cfg, &["events", "fire", "reload/ping", "{}"]));
        if pongs
            .try_wait_line(Duration::from_millis(500), |l| l.contains("reload/pong"))
            .is_ok()
        {
            break;
        }
        assert!(
            start.elapsed() < T,
            "no pong from the rule of {}",
            rules2.display()
        );
    }
    create("q2", "b.example.org");
    let r = reply(&mut w, &mut daemon, "q2");
    assert_eq!(r["ok"], true, "{r}");
    // Served from the registry the daemon runs with, not the new file's.
    let names = crate::support::server_names(&listing);
    assert_eq!(names, vec!["b.example.org".to_owned()], "{names:?}");
    assert!(!h.root().join("other.db").exists());

    // Debug lines now: the rules' reload on the next SIGHUP says it at debug.
    // (The first SIGHUP's may say it too, so the config's second reload is
    // awaited: the next write must not race with its read.)
    hup(daemon.pid());
    daemon.wait_err_lines("the second reload", T, 2, |l| {
        l.contains("Config reloaded.")
    });
    daemon.wait_err_line("a debug line", T, |l| l.contains("Rules unchanged."));

    // A broken file: refused, the running settings stay (the minion still trusted).
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}dispatch: {{concurrency: 0}}\n")).unwrap();
    hup(daemon.pid());
    daemon.wait_err_line("broken file refused", T, |l| {
        l.contains("Config not reloaded") && l.contains("dispatch.concurrency")
    });
    create("q3", "c.example.org");
    let r = reply(&mut w, &mut daemon, "q3");
    assert_eq!(r["ok"], true, "{r}");
}
