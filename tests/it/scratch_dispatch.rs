//! Scratch: the dispatcher against a real master and a loopback nginx.
use std::time::Duration;

use crate::accept::bundle;
use crate::support::nginx::NginxLab;
use crate::support::salt::{install_bundle, salt_states_dir};
use crate::support::{
    cli, run_ok, start_daemon, steward_config, wait_event_data, watch_steward, MasterOptions,
    SaltHarness,
};

#[test]
fn scratch_hostfwd_through_the_daemon() {
    let h = SaltHarness::start_with(MasterOptions {
        auto_accept: false,
        extra: "master_sign_pubkey: True\n".into(),
        file_roots: vec![salt_states_dir()],
        ..MasterOptions::default()
    });
    h.wait_req_ready();
    let mut h = h;
    let nginx = NginxLab::start();
    let cfg = steward_config(
        &h,
        &[],
        "dispatch: {debounce_ms: 300, retry_base_ms: 500}\n",
    );
    run_ok(cli(&cfg, &["model", "add", "web"]));
    let out = run_ok(cli(
        &cfg,
        &["server", "add", "proxy1", "--model", "web", "--json"],
    ));
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = p["minion_id"].as_str().unwrap().to_owned();
    run_ok(cli(
        &cfg,
        &[
            "server",
            "add",
            "pve1",
            "--model",
            "web",
            "--proxmox-host",
            "--nginx-proxy",
            "proxy1",
        ],
    ));
    run_ok(cli(
        &cfg,
        &[
            "server",
            "add",
            "vm1",
            "--model",
            "web",
            "--vm",
            "--vm-host",
            "pve1",
            "--internal-ip",
            "127.0.0.1",
        ],
    ));
    let mut daemon = start_daemon(&cfg);
    let mut w = watch_steward(&cfg);
    let b = bundle(&h, &cfg, "proxy1", "proxy1.tgz");
    h.start_minion_with("proxy1", &pid, &nginx.minion_settings(), |dir| {
        install_bundle(&b, dir)
    });
    run_ok(cli(
        &cfg,
        &[
            "forward",
            "hostname",
            "add",
            "a.test",
            "vm1",
            "--port",
            &nginx.listen_port.to_string(),
            "--to-port",
            &nginx.a.port.to_string(),
        ],
    ));
    let done = wait_event_data(&mut w, &mut daemon, "steward/v1/dispatch/done", |_| true);
    eprintln!("done: {done}");
    let body = nginx.get(nginx.listen_port, "a.test").unwrap();
    eprintln!("body: {body}");
    let st = run_ok(cli(&cfg, &["status"]));
    eprintln!("{}", String::from_utf8_lossy(&st.stdout));
    std::thread::sleep(Duration::from_millis(10));
    daemon.drain_err();
    eprintln!("{}", daemon.seen_err.join("\n"));
}
