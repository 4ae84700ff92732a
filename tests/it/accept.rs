//! Issue #5 against a real master and real minions: servers created with the
//! CLI get keys; a minion installed from the server's bundle is accepted
//! without `salt-key` (verify and preseed modes), answers test.ping and
//! shows `online`, and its model's states are applied at its first start; a
//! minion with a key of its own claiming an issued id is never accepted and
//! raises an alert; an unknown id stays pending with one alert; a rekeyed
//! server's old key is refused and its new one accepted; a key pending
//! before the daemon starts is accepted at start-up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    cli, json_line, run_ok, start_daemon, steward_config, watch_steward, LineChild, MasterOptions,
    SaltHarness, T,
};

/// A master that signs its public key (bundles make minions verify it) and
/// does not auto-accept; the provisioning state in its file roots.
pub fn signing_master() -> SaltHarness {
    signing_master_serving(Vec::new())
}

/// [`signing_master`], also serving `file_roots` (e.g. the repository's
/// `salt-states/`).
pub fn signing_master_serving(file_roots: Vec<PathBuf>) -> SaltHarness {
    let h = SaltHarness::start_with(MasterOptions {
        auto_accept: false,
        extra: "master_sign_pubkey: True\n".into(),
        file_roots,
        ..MasterOptions::default()
    });
    h.wait_req_ready();
    let sls = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/sls/steward_provision.sls");
    std::fs::copy(sls, h.file_roots.join("steward_provision.sls")).unwrap();
    h
}

fn config(h: &SaltHarness, mode: &str) -> PathBuf {
    steward_config(
        h,
        &[],
        &format!(
            "masters: [\"127.0.0.1:{}\"]\nkeys: {{dir: {}/keys, pool_size: 2, accept_mode: {mode}}}\n",
            h.ret_port,
            h.root().display()
        ),
    )
}

/// Two configs, one per master, naming both masters and sharing one
/// registry and one key store (the first master's).
pub fn shared_configs(h1: &SaltHarness, h2: &SaltHarness) -> (PathBuf, PathBuf) {
    let masters = format!(
        "masters: [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n",
        h1.ret_port, h2.ret_port
    );
    let shared = format!(
        "registry: sqlite://{root}/registry.db\nkeys: {{dir: {root}/keys, pool_size: 1}}\n",
        root = h1.root().display()
    );
    (
        steward_config(h1, &[], &format!("{masters}{shared}")),
        steward_config(h2, &[], &format!("{masters}{shared}")),
    )
}

pub fn add_server(cfg: &Path, name: &str) -> Value {
    let out = run_ok(cli(
        cfg,
        &["server", "add", name, "--model", "web", "--json"],
    ));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn show(cfg: &Path, name: &str) -> Value {
    let out = run_ok(cli(cfg, &["server", "show", name, "--json"]));
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn bundle(h: &SaltHarness, cfg: &Path, name: &str, file: &str) -> PathBuf {
    let path = h.root().join(file);
    run_ok(cli(
        cfg,
        &["server", "bundle", name, "-o", path.to_str().unwrap()],
    ));
    path
}

/// Waits until `server show` reports `status`.
pub fn wait_status(cfg: &Path, name: &str, status: &str) {
    let deadline = Instant::now() + T;
    loop {
        let s = show(cfg, name);
        if s["status"] == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never became {status}: {s}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn ping(cfg: &Path, minion_id: &str) -> bool {
    let out = cli(
        cfg,
        &[
            "salt",
            "publish",
            minion_id,
            "test.ping",
            "--json",
            "--timeout",
            "5",
        ],
    )
    .output()
    .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("true")
}

pub fn wait_ping(cfg: &Path, minion_id: &str) {
    let deadline = Instant::now() + T;
    while !ping(cfg, minion_id) {
        assert!(
            Instant::now() < deadline,
            "{minion_id} never answered test.ping"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `salt-key --out json -L` of the master.
fn keys(h: &SaltHarness) -> Value {
    let out = h.master_cmd("salt-key", &["-L", "--out", "json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn listed(h: &SaltHarness, state: &str, id: &str) -> bool {
    keys(h)[state]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x == id))
}

pub fn wait_listed(h: &SaltHarness, state: &str, id: &str) {
    let deadline = Instant::now() + T;
    while !listed(h, state, id) {
        assert!(
            Instant::now() < deadline,
            "{id} never in {state}: {}",
            keys(h)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits for the event `tag` whose data's `minion_id` is `id`.
fn wait_event(w: &mut LineChild, tag: &str, id: &str) -> Value {
    let line = w.wait_line(tag, T, |l| {
        let v = json_line(l);
        v["tag"] == tag && v["data"]["minion_id"] == id
    });
    json_line(&line)["data"].clone()
}

fn count_events(w: &LineChild, tag: &str, id: &str) -> usize {
    w.seen
        .iter()
        .map(|l| json_line(l))
        .filter(|v| v["tag"] == tag && v["data"]["minion_id"] == id)
        .count()
}

#[test]
fn accept_verified_keys_only_and_alert_on_the_rest() {
    let mut h = signing_master();
    let cfg = config(&h, "verify");
    run_ok(cli(
        &cfg,
        &["model", "add", "web", "--state", "steward_provision"],
    ));

    // Created while no daemon runs: keys issued, nothing on the master yet.
    let web01 = add_server(&cfg, "web01.example.org");
    let id1 = web01["minion_id"].as_str().unwrap().to_owned();
    assert_eq!(web01["status"], "keys-issued");
    assert!(web01["key_fingerprint"].as_str().unwrap().contains(':'));
    let b1 = bundle(&h, &cfg, "web01.example.org", "web01.tgz");

    // A key already pending when the daemon starts is accepted at start-up.
    h.start_minion_from_bundle("web01", &id1, &b1);
    wait_listed(&h, "minions_pre", &id1);
    let mut daemon = start_daemon(&cfg);
    let mut w = watch_steward(&cfg);
    wait_listed(&h, "minions", &id1);
    wait_ping(&cfg, &id1);
    wait_status(&cfg, "web01.example.org", "online");
    daemon.wait_err_line("accepted", T, |l| {
        l.contains("Minion key verified and accepted")
    });
    // The model's state ran at the first start.
    let prov = wait_event(&mut w, "steward/v1/minion/provisioned", &id1);
    assert_eq!(prov["success"], true, "{prov}");

    // Created while the daemon runs (a pooled pair): accepted as it arrives.
    let web02 = add_server(&cfg, "web02.example.org");
    let id2 = web02["minion_id"].as_str().unwrap().to_owned();
    let b2 = bundle(&h, &cfg, "web02.example.org", "web02.tgz");
    h.start_minion_from_bundle("web02", &id2, &b2);
    let reg = wait_event(&mut w, "steward/v1/minion/registered", &id2);
    assert_eq!(reg["server_id"], web02["id"]);
    wait_ping(&cfg, &id2);
    wait_status(&cfg, "web02.example.org", "online");

    // A machine with a key of its own claiming web03's issued id.
    let web03 = add_server(&cfg, "web03.example.org");
    let id3 = web03["minion_id"].as_str().unwrap().to_owned();
    h.start_minion_verifying("impostor", &id3);
    let alert = wait_event(&mut w, "steward/v1/alert/key-mismatch", &id3);
    assert_eq!(alert["expected_fingerprint"], web03["key_fingerprint"]);
    assert_ne!(alert["presented_fingerprint"], web03["key_fingerprint"]);
    wait_listed(&h, "minions_rejected", &id3);
    assert!(!listed(&h, "minions", &id3));
    assert_eq!(show(&cfg, "web03.example.org")["status"], "keys-issued");

    // An id the registry does not know: stays pending, one alert for all retries.
    h.start_minion_verifying("stranger", "stranger.example.org");
    wait_event(
        &mut w,
        "steward/v1/alert/unknown-minion",
        "stranger.example.org",
    );
    std::thread::sleep(Duration::from_secs(4)); // several auth retries (acceptance_wait_time 1)
    assert!(listed(&h, "minions_pre", "stranger.example.org"));
    let _ = w.try_wait_line(Duration::from_secs(1), |_| false);
    assert_eq!(
        count_events(
            &w,
            "steward/v1/alert/unknown-minion",
            "stranger.example.org"
        ),
        1
    );

    // Rekey web01 (re-provisioned machine): the old key is retired.
    h.stop_minion(&id1);
    let out = run_ok(cli(
        &cfg,
        &["server", "rekey", "web01.example.org", "--json"],
    ));
    let rekeyed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(rekeyed["key_fingerprint"], web01["key_fingerprint"]);
    assert_eq!(rekeyed["status"], "keys-issued");
    assert!(!listed(&h, "minions", &id1), "old key retired");
    // The old machine comes back with its old key: refused, alert.
    h.start_minion_from_bundle("web01-old", &id1, &b1);
    let alert = wait_event(&mut w, "steward/v1/alert/key-mismatch", &id1);
    assert_eq!(alert["expected_fingerprint"], rekeyed["key_fingerprint"]);
    assert_eq!(alert["presented_fingerprint"], web01["key_fingerprint"]);
    h.stop_minion(&id1);
    // The old key is now rejected; the new machine is refused at first, the
    // daemon removes the stale rejected key, and the new key is accepted.
    wait_listed(&h, "minions_rejected", &id1);
    let b1new = bundle(&h, &cfg, "web01.example.org", "web01-new.tgz");
    h.start_minion_from_bundle("web01-new", &id1, &b1new);
    wait_listed(&h, "minions", &id1);
    wait_ping(&cfg, &id1);
    drop(daemon);
}

#[test]
fn accept_preseeded_keys_and_alert_on_denied_ones() {
    let mut h = signing_master();
    let cfg = config(&h, "preseed");
    run_ok(cli(&cfg, &["model", "add", "web"]));
    let mut _daemon = start_daemon(&cfg);
    let mut w = watch_steward(&cfg);

    let web = add_server(&cfg, "pre01.example.org");
    let id = web["minion_id"].as_str().unwrap().to_owned();
    // Written into the master's accepted keys at issue time, as Salt stores it.
    let stored = std::fs::read_to_string(h.pki_dir.join("minions").join(&id)).unwrap();
    assert_eq!(stored, web["public_key"].as_str().unwrap());
    assert!(listed(&h, "minions", &id));

    let b = bundle(&h, &cfg, "pre01.example.org", "pre01.tgz");
    h.start_minion_from_bundle("pre01", &id, &b);
    wait_event(&mut w, "steward/v1/minion/registered", &id);
    wait_ping(&cfg, &id);
    wait_status(&cfg, "pre01.example.org", "online");

    // Another machine claiming a preseeded id: the master denies it; we alert.
    let other = add_server(&cfg, "pre02.example.org");
    let id2 = other["minion_id"].as_str().unwrap().to_owned();
    h.start_minion_verifying("impostor", &id2);
    let alert = wait_event(&mut w, "steward/v1/alert/key-mismatch", &id2);
    assert_eq!(alert["expected_fingerprint"], other["key_fingerprint"]);
    assert!(listed(&h, "minions_denied", &id2));
    assert_eq!(show(&cfg, "pre02.example.org")["status"], "keys-issued");
}

#[test]
fn preseed_is_refused_when_the_master_keeps_keys_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("master");
    std::fs::write(&master, "keys.cache_driver: mysql_cache\n").unwrap();
    let cfg = dir.path().join("steward.yaml");
    std::fs::write(
        &cfg,
        format!(
            "master_config: {}\nregistry: sqlite://{}/r.db\nkeys: {{dir: {}/keys, accept_mode: preseed}}\n",
            master.display(),
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let out = cli(&cfg, &["model", "add", "web"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keys.cache_driver: mysql_cache"), "{err}");
    assert!(!dir.path().join("r.db").exists(), "nothing written");
}
