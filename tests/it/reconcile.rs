//! Issue #10 §3: a key a master holds as accepted for a registry server that
//! is not the issued one is retired (exact-id `key.delete_dict`) and alerted,
//! at the daemon's start-up, after a bus reconnect, and, with several
//! masters, on the sync tick (a rekey made through another master).

use serde_json::Value;

use crate::accept::{add_server, shared_configs, signing_master};
use crate::support::{
    cli, json_line, run_ok, start_daemon, steward_config, watch_steward, LineChild, SaltHarness, T,
};

const RETIRED: &str = "steward/v1/alert/key-retired";

/// A public key no one issued, in Salt's accepted-key form.
fn foreign_key() -> String {
    salt_steward::pki::KeyPair::generate(2048)
        .unwrap()
        .public_clean()
}

fn accepted(h: &SaltHarness, id: &str) -> std::path::PathBuf {
    h.pki_dir.join("minions").join(id)
}

/// Waits for the retirement alert of `id` and checks what it says.
fn wait_retired(w: &mut LineChild, id: &str, server: &Value, retired: &str) {
    let line = w.wait_line(RETIRED, T, |l| {
        let v = json_line(l);
        v["tag"] == RETIRED && v["data"]["minion_id"] == id
    });
    let data = &json_line(&line)["data"];
    assert_eq!(data["server_id"], server["id"], "{data}");
    assert_eq!(
        data["retired_fingerprint"],
        salt_steward::pki::fingerprint(retired).as_str(),
        "{data}"
    );
    assert_eq!(
        data["expected_fingerprint"],
        salt_steward::pki::fingerprint(server["public_key"].as_str().unwrap()).as_str(),
        "{data}"
    );
}

fn config(h: &SaltHarness, extra: &str) -> std::path::PathBuf {
    steward_config(
        h,
        &[],
        &format!(
            "keys: {{dir: {}/keys, pool_size: 1}}\n{extra}",
            h.root().display()
        ),
    )
}

#[test]
fn a_stale_accepted_key_is_retired_at_start_up_and_after_a_reconnect() {
    let mut h = signing_master();
    let cfg = config(&h, "");
    run_ok(cli(&cfg, &["model", "add", "web"]));
    let server = add_server(&cfg, "stale01.example.org");
    let id = server["minion_id"].as_str().unwrap().to_owned();
    // A second server whose accepted key is the issued one: left alone.
    let good = add_server(&cfg, "good01.example.org");
    let good_id = good["minion_id"].as_str().unwrap().to_owned();
    std::fs::write(accepted(&h, &good_id), good["public_key"].as_str().unwrap()).unwrap();

    // Accepted by hand while the daemon was down: not the issued key.
    let first = foreign_key();
    std::fs::write(accepted(&h, &id), &first).unwrap();
    let mut w = watch_steward(&cfg);
    let mut d = start_daemon(&cfg);
    wait_retired(&mut w, &id, &server, &first);
    assert!(!accepted(&h, &id).exists(), "the stale key is gone");
    d.wait_err_line("retired at start-up", T, |l| l.contains("was retired."));

    // Again while the daemon runs; the master restarts (the bus reconnects).
    // The watcher reconnects too and may miss the alert: the daemon's log
    // and the key directory say what happened.
    let second = foreign_key();
    std::fs::write(accepted(&h, &id), &second).unwrap();
    h.restart_master();
    h.wait_req_ready();
    d.wait_err_line("reconnected", T, |l| {
        l.contains("Reconnected to the master event bus")
    });
    let second_fp = salt_steward::pki::fingerprint(&second);
    d.wait_err_line("retired after the reconnect", T, |l| {
        l.contains("was retired.") && l.contains(&id) && l.contains(&second_fp)
    });
    assert!(!accepted(&h, &id).exists(), "retired after the reconnect");
    assert_eq!(
        std::fs::read_to_string(accepted(&h, &good_id)).unwrap(),
        good["public_key"].as_str().unwrap(),
        "the issued key stays accepted"
    );
    assert!(
        !d.seen_err
            .iter()
            .any(|l| l.contains("was retired.") && l.contains(&good_id)),
        "{}",
        d.seen_err.join("\n")
    );
}

#[test]
fn a_rekey_through_one_master_retires_the_old_key_on_the_other() {
    let h1 = signing_master();
    let h2 = signing_master();
    // One registry and one key store (the first master's), two configs.
    let (cfg1, cfg2) = shared_configs(&h1, &h2);
    run_ok(cli(&cfg1, &["model", "add", "web"]));
    let server = add_server(&cfg1, "rk01.example.org");
    let id = server["minion_id"].as_str().unwrap().to_owned();
    let old = server["public_key"].as_str().unwrap().to_owned();
    // The old key is accepted on both masters.
    for h in [&h1, &h2] {
        std::fs::write(accepted(h, &id), &old).unwrap();
    }
    let mut w2 = watch_steward(&cfg2);
    let _d2 = start_daemon(&cfg2);

    // Re-provisioned: rekeyed through the first master, which retires the
    // old key there at once.
    let out = run_ok(cli(
        &cfg1,
        &["server", "rekey", "rk01.example.org", "--json"],
    ));
    let rekeyed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(
        rekeyed["public_key"],
        Value::from(old.as_str()),
        "{rekeyed}"
    );
    assert!(!accepted(&h1, &id).exists());
    // The second master's daemon retires it on its sync tick.
    wait_retired(&mut w2, &id, &rekeyed, &old);
    assert!(!accepted(&h2, &id).exists(), "retired on the second master");
}
