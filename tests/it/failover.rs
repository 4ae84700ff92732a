//! Seed 004 / issue #5: two masters share one signing pair (exported from
//! the first, imported into the second with `salt-steward pki`), each has
//! its own daemon, both use the same registry. A minion installed from a
//! bundle listing both masters (`master_type: failover`) is accepted by the
//! first master's daemon and answers there; the second daemon installs the
//! verified key on its master (accepted on both); when the first master
//! stops, the minion fails over and answers test.ping through the second.

use std::path::Path;

use crate::accept::{add_server, bundle, shared_configs, signing_master, wait_listed, wait_ping};
use crate::support::salt::{install_bundle, SaltHarness};
use crate::support::{cli, run_ok, start_daemon};

/// Shares the first master's signing pair with the second (`pki
/// export-signing` / `import-signing`, through each master's salt-steward
/// config), restarting the second so it signs its key with it.
pub fn share_signing_pair(h1: &SaltHarness, cfg1: &Path, h2: &mut SaltHarness, cfg2: &Path) {
    let export = h1.root().join("signing-export");
    run_ok(cli(
        cfg1,
        &["pki", "export-signing", export.to_str().unwrap()],
    ));
    run_ok(cli(
        cfg2,
        &["pki", "import-signing", export.to_str().unwrap(), "--force"],
    ));
    h2.restart_master();
    h2.wait_req_ready();
    assert_eq!(
        std::fs::read(h1.pki_dir.join("master_sign.pub")).unwrap(),
        std::fs::read(h2.pki_dir.join("master_sign.pub")).unwrap()
    );
}

/// Prepares a failover minion's config dir from its bundle: the bundle's
/// files, and the publish port each master reports (4506 makes the minion
/// use it, salt/channel/client.py; the harness's masters use random ports).
pub fn install_failover_bundle(bundle: &Path, dir: &Path) {
    install_bundle(bundle, dir);
    std::fs::write(dir.join("minion.d/ports.conf"), "publish_port: 4506\n").unwrap();
}

#[test]
fn failover_between_two_masters_sharing_the_signing_pair() {
    let mut h1 = signing_master();
    let mut h2 = signing_master();
    // One registry and one key store (the first master's), two configs.
    let (cfg1, cfg2) = shared_configs(&h1, &h2);

    // Share the first master's signing pair; each master signs its own key.
    share_signing_pair(&h1, &cfg1, &mut h2, &cfg2);

    run_ok(cli(&cfg1, &["model", "add", "web"]));
    let _d1 = start_daemon(&cfg1);
    let _d2 = start_daemon(&cfg2);
    let server = add_server(&cfg1, "fo01.example.org");
    let id = server["minion_id"].as_str().unwrap().to_owned();
    let b = bundle(&h1, &cfg1, "fo01.example.org", "fo01.tgz");
    h1.start_minion_with("fo01", &id, "", |dir: &Path| {
        install_failover_bundle(&b, dir)
    });
    wait_listed(&h1, "minions", &id);
    wait_ping(&cfg1, &id);
    // Accepted on both: the second daemon installs the key verified by the first.
    wait_listed(&h2, "minions", &id);
    assert_eq!(
        std::fs::read_to_string(h2.pki_dir.join("minions").join(&id)).unwrap(),
        server["public_key"].as_str().unwrap()
    );

    h1.stop_master();
    // The minion notices (master_alive_interval) and moves to the second
    // master, which knows its key.
    wait_ping(&cfg2, &id);
}
