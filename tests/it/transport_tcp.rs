//! A master with `transport: tcp` (Salt's plain TCP transport, no ZeroMQ):
//! the native client publishes, calls wheel and runner functions through it,
//! and the daemon accepts a bundle-installed minion's verified key on it.

use std::path::Path;

use serde_json::{json, Value};

use crate::accept::{add_server, bundle, listed, wait_listed, wait_ping};
use crate::support::{
    cli, run_ok, start_daemon, steward_config, steward_for, text, MasterOptions, SaltHarness, T,
};

fn salt_json(h: &SaltHarness, args: &[&str]) -> Value {
    let mut full = vec!["salt"];
    full.extend_from_slice(args);
    let o = steward_for(&h.master_config(), &full).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&o)))
}

#[test]
fn a_tcp_transport_master_serves_publish_wheel_runner_and_auto_accept() {
    let mut h = SaltHarness::start_with(MasterOptions {
        auto_accept: false,
        transport_tcp: true,
        extra: "master_sign_pubkey: True\n".into(),
        ..MasterOptions::default()
    });
    h.wait_req_ready();

    // wheel: a plain minion's pending key accepted through the TCP request channel.
    // (A signing master: 3008 refuses minions that do not verify its signature.)
    h.start_minion_verifying("tcp-plain", "tcp-plain");
    let deadline = std::time::Instant::now() + T;
    while !listed(&h, "minions_pre", "tcp-plain") {
        assert!(
            std::time::Instant::now() < deadline,
            "tcp-plain never pending"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let accepted = salt_json(&h, &["wheel", "key.accept", "match=tcp-plain"]);
    assert_eq!(accepted["minions"], json!(["tcp-plain"]), "{accepted}");
    let all = salt_json(&h, &["wheel", "key.list_all"]);
    assert_eq!(all["minions"], json!(["tcp-plain"]), "{all}");

    // publish: test.ping answered over the TCP publisher.
    let cfg = h.master_config();
    let deadline = std::time::Instant::now() + T;
    loop {
        let o = steward_for(
            &cfg,
            &[
                "salt",
                "publish",
                "tcp-plain",
                "test.ping",
                "--json",
                "--timeout",
                "5",
            ],
        )
        .output()
        .unwrap();
        if o.status.success() {
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["minions"]["tcp-plain"]["return"], json!(true), "{v}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tcp-plain never answered: {}",
            text(&o)
        );
    }

    // runner: result followed on the bus.
    let v = salt_json(&h, &["runner", "test.arg", "a1", "k=v"]);
    assert_eq!(v["args"], json!(["a1"]), "{v}");

    // auto-accept: the daemon verifies a bundle-installed minion's key and
    // accepts it through the TCP request channel; the bundle says tcp.
    let steward = steward_config(
        &h,
        &[],
        &format!(
            "masters: [\"127.0.0.1:{}\"]\nkeys: {{dir: {}/keys, pool_size: 1, accept_mode: verify}}\n",
            h.ret_port,
            h.root().display()
        ),
    );
    run_ok(cli(&steward, &["model", "add", "web"]));
    let _daemon = start_daemon(&steward);
    let server = add_server(&steward, "tcp01.example.org");
    let id = server["minion_id"].as_str().unwrap().to_owned();
    let b = bundle(&h, &steward, "tcp01.example.org", "tcp01.tgz");
    assert_bundle_says_tcp(&b, &h.root().join("tcp01-unpacked"));
    h.start_minion_from_bundle("tcp01", &id, &b);
    wait_listed(&h, "minions", &id);
    wait_ping(&steward, &id);
}

/// The bundle's minion config names the master's transport.
fn assert_bundle_says_tcp(bundle: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let o = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(bundle)
        .arg("-C")
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let conf = std::fs::read_to_string(dir.join("minion.d/steward.conf")).unwrap();
    assert!(conf.contains("transport: \"tcp\""), "{conf}");
}
