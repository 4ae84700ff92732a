//! `salt-steward doctor` against a real master (issue #14): every check
//! passes on a working set-up, and each broken premise fails with its line.

use std::path::Path;

use crate::support::salt::{current_user, salt_states_dir};
use crate::support::{cli, steward_config, text, MasterOptions, SaltHarness};

/// Runs doctor (with another master config when given): exit success, stdout.
fn doctor(cfg: &Path, master: Option<&Path>) -> (bool, String, String) {
    let mut args: Vec<&str> = Vec::new();
    let m;
    if let Some(p) = master {
        m = p.display().to_string();
        args.extend(["--master-config", m.as_str()]);
    }
    args.push("doctor");
    let out = cli(cfg, &args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        text(&out),
    )
}

fn has_line(stdout: &str, verdict: &str, check: &str) -> bool {
    stdout
        .lines()
        .any(|l| l.starts_with(verdict) && l[verdict.len()..].trim_start().starts_with(check))
}

#[test]
fn doctor_passes_on_a_working_master_and_names_what_is_broken() {
    let mut h = SaltHarness::start_with(MasterOptions {
        file_roots: vec![salt_states_dir()],
        ..MasterOptions::default()
    });
    h.wait_req_ready();
    let cfg = steward_config(&h, &[], "");

    let (ok, out, all) = doctor(&cfg, None);
    assert!(ok, "{all}");
    for check in [
        "config:",
        "master config:",
        "bus publisher:",
        "bus pull:",
        "root key:",
        "request server:",
        "states in file_roots:",
        "registry:",
        "registry file:",
    ] {
        assert!(has_line(&out, "ok", check), "no ok line for {check}\n{all}");
    }
    let (major, minor) = crate::support::salt::salt_version();
    assert!(out.contains(&format!("Salt {major}.{minor}")), "{all}");
    // The registry file doctor created is readable by its owner only.
    let reg = h.root().join("registry.db");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&reg).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // With the daemon's metrics endpoint: doctor asks it too.
    let port = crate::support::salt::free_port();
    let cfg = steward_config(&h, &[], &format!("metrics_listen: 127.0.0.1:{port}\n"));
    let (ok, out, all) = doctor(&cfg, None);
    assert!(ok, "{all}");
    assert!(
        has_line(&out, "warn", "daemon endpoint:"),
        "no daemon yet\n{all}"
    );
    let daemon = crate::support::start_daemon(&cfg);
    let (ok, out, all) = doctor(&cfg, None);
    assert!(ok, "{all}");
    assert!(has_line(&out, "ok", "daemon endpoint:"), "{all}");
    assert!(daemon.terminate().success());

    // The states are not in file_roots (the same master, another config).
    let states = salt_states_dir().display().to_string();
    let text_of = std::fs::read_to_string(h.master_config()).unwrap();
    let without: String = text_of
        .lines()
        .filter(|l| !l.contains(&states))
        .map(|l| format!("{l}\n"))
        .collect();
    let other = h.root().join("master-without-states");
    std::fs::write(&other, without).unwrap();
    let (ok, out, all) = doctor(&cfg, Some(&other));
    assert!(!ok, "{all}");
    assert!(
        has_line(
            &out,
            "FAIL",
            "states in file_roots: salt-states/ is not in the master's file_roots"
        ),
        "{all}"
    );
    assert!(has_line(&out, "ok", "request server:"), "{all}");

    // The root key is not there to read.
    let key = h.root().join(format!("m/cache/.{}_key", current_user()));
    let aside = h.root().join("root-key-aside");
    std::fs::rename(&key, &aside).unwrap();
    let (ok, out, all) = doctor(&cfg, None);
    std::fs::rename(&aside, &key).unwrap();
    assert!(!ok, "{all}");
    assert!(has_line(&out, "FAIL", "root key:"), "{all}");
    assert!(has_line(&out, "FAIL", "request server: not asked"), "{all}");

    // The master is stopped: its bus sockets are gone.
    h.stop_master();
    let (ok, out, all) = doctor(&cfg, None);
    assert!(!ok, "{all}");
    assert!(has_line(&out, "FAIL", "bus publisher:"), "{all}");
    assert!(has_line(&out, "ok", "registry:"), "{all}");
}

#[test]
fn doctor_reports_a_broken_config_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("steward.yaml");
    std::fs::write(&cfg, "dispatch: {concurrency: 0}\n").unwrap();
    let (ok, out, all) = doctor(&cfg, None);
    assert!(!ok, "{all}");
    assert!(has_line(&out, "FAIL", "config:"), "{all}");
    assert!(out.contains("dispatch.concurrency"), "{all}");
}
