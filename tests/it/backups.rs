//! Issue #13, backups, end to end: `backup add` typed as an operator does,
//! a running daemon dispatching `steward.backup` (backup server) and
//! `steward.backup_source` (source) through a real master to two real
//! minions registered from their bundles, the source's SSH a private sshd
//! on loopback ([`Sshd`]); the keys exchanged through the states' reports
//! alone; `backup run` copies the folder (excludes honoured) and the result
//! reaches the registry. Bad input is refused with specific errors, nothing
//! written, nothing to dispatch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::accept::{bundle, signing_master_serving, wait_status};
use crate::registry::TestDb;
use crate::support::salt::{free_port, install_bundle, salt_states_dir};
use crate::support::sshd::Sshd;
use crate::support::{
    cli, eventually_within, run_ok, start_daemon, steward_config, LineChild, SaltHarness,
};

pub(crate) const BACKUP: &str = "bk1.example.org";
const SOURCE: &str = "web1.example.org";

/// The value of `salt_steward_requests_total` for backup results with
/// `outcome` on the daemon's metrics endpoint (0 when not counted yet).
fn results_counted(port: u16, outcome: &str) -> u64 {
    use std::io::{Read as _, Write as _};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    c.read_to_string(&mut body).unwrap();
    let want = format!("outcome=\"{outcome}\"");
    body.lines()
        .filter(|l| {
            l.starts_with("salt_steward_requests_total{")
                && l.contains("entity=\"backup\"")
                && l.contains("op=\"result\"")
                && l.contains(&want)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// How long convergence may take (several state runs through the master
/// on a loaded machine, after the debounce).
const CONVERGE: Duration = Duration::from_secs(180);

/// `salt-steward ARGS` (it must succeed): its stdout.
pub(crate) fn steward(cfg: &Path, args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ok(cli(cfg, args)).stdout).into_owned()
}

/// `salt-steward ARGS` whose stdout is JSON.
pub(crate) fn steward_json(cfg: &Path, args: &[&str]) -> Value {
    let out = steward(cfg, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// `salt-steward ARGS` that must fail: its stderr.
fn refused(cfg: &Path, args: &[&str]) -> String {
    let out = cli(cfg, args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail: {err}");
    err
}

/// Changes of the registry the dispatcher has not read yet.
pub(crate) fn unread_by_dispatcher(cfg: &Path) -> i64 {
    let status = steward_json(cfg, &["outbox", "status", "--json"]);
    status
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["consumer"] == "dispatch")
        .and_then(|c| c["pending"].as_i64())
        .unwrap()
}

/// The (server, state) target as `dispatch show SERVER --json` lists it.
pub(crate) fn target(cfg: &Path, server: &str, state: &str) -> Option<Value> {
    let show = steward_json(cfg, &["dispatch", "show", server, "--json"]);
    show["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["state"] == state)
        .cloned()
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// The source's data: (files rsync counts, their total size).
fn populate(src: &Path) -> (i64, i64) {
    write(&src.join("a.txt"), "hello\n");
    write(&src.join("sub/b.txt"), "0123456789\n");
    write(&src.join("sub/deeper/c.bin"), &"x".repeat(4096));
    write(&src.join("cache/skipped"), "excluded by cache/\n");
    write(&src.join("sub/scratch.tmp"), "excluded by *.tmp\n");
    // ".", a.txt, sub, sub/b.txt, sub/deeper, sub/deeper/c.bin
    (6, 6 + 11 + 4096)
}

#[test]
fn bad_backups_are_refused_and_nothing_is_written() {
    let dir = tempfile::Builder::new()
        .prefix("ss-backups-")
        .tempdir()
        .unwrap();
    let cfg = dir.path().join("steward.yaml");
    write(
        &cfg,
        &format!(
            "registry: sqlite://{}/registry.db\nkeys:\n  dir: {}/keys\n",
            dir.path().display(),
            dir.path().display()
        ),
    );
    steward(&cfg, &["model", "add", "m"]);
    steward(
        &cfg,
        &[
            "server",
            "add",
            SOURCE,
            "--model",
            "m",
            "--internal-ip",
            "10.1.0.5",
        ],
    );
    steward(&cfg, &["server", "add", BACKUP, "--model", "m"]);
    let first = steward(
        &cfg,
        &["backup", "add", SOURCE, "/srv/data", BACKUP, "/b/web1"],
    );
    assert_eq!(first.trim(), "1");
    let unread = unread_by_dispatcher(&cfg);

    let cases: [(&[&str], &str); 8] = [
        (
            &["backup", "add", SOURCE, "/srv/other", BACKUP, "/b/other"],
            "a second backup of web1.example.org by bk1.example.org is taken by backup #1",
        ),
        (
            &[
                "backup",
                "add",
                SOURCE,
                "/srv",
                "nosuch.example.org",
                "/b/x",
            ],
            "no server nosuch.example.org",
        ),
        (
            &["backup", "add", SOURCE, "/srv/other", BACKUP, "/b/web1"],
            "destination /b/web1 on bk1.example.org is taken by backup #1",
        ),
        (
            &[
                "backup",
                "add",
                SOURCE,
                "/srv/other",
                BACKUP,
                "/b/web1/inner",
            ],
            "one destination inside the other",
        ),
        (
            &["backup", "add", SOURCE, "srv/data", BACKUP, "/b/x"],
            "invalid source_folder: \"srv/data\" is not an absolute folder",
        ),
        (
            &["backup", "add", SOURCE, "/srv", BACKUP, "b/x"],
            "invalid dest_folder",
        ),
        (
            &["backup", "add", SOURCE, "/srv/../etc", BACKUP, "/b/x"],
            "has a .. segment",
        ),
        (
            &[
                "backup",
                "add",
                SOURCE,
                "/srv",
                BACKUP,
                "/b/y",
                "--exclude",
                "../up",
            ],
            "invalid exclude",
        ),
    ];
    for (args, want) in cases {
        let err = refused(&cfg, args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A source without an address needs --ssh-host.
    let err = refused(&cfg, &["backup", "add", BACKUP, "/srv", SOURCE, "/b/z"]);
    assert!(err.contains("no IPv4 address"), "{err}");
    // A server a backup names cannot be deleted.
    let err = refused(&cfg, &["server", "rm", BACKUP]);
    assert!(err.contains("backup #1"), "{err}");

    let all = steward_json(&cfg, &["backup", "list", "--json"]);
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    assert_eq!(all[0]["health"], "never_run", "{all}");
    assert_eq!(
        unread_by_dispatcher(&cfg),
        unread,
        "a refusal wrote an outbox row"
    );

    steward(&cfg, &["backup", "rm", "1"]);
    steward(&cfg, &["server", "rm", BACKUP]);
    assert_eq!(
        steward_json(&cfg, &["backup", "list", "--json"]),
        serde_json::json!([])
    );
}

/// The master, the daemon, both minions registered, the source's sshd and
/// the folders.
/// Field order is drop order: the daemon first, the master and minions,
/// then sshd and the folders.
pub(crate) struct BackupStack {
    /// `None` while stopped.
    pub(crate) daemon: Option<LineChild>,
    pub(crate) h: SaltHarness,
    /// The daemon's metrics endpoint.
    metrics_port: u16,
    source_minion: String,
    pub(crate) backup_minion: String,
    pub(crate) cfg: PathBuf,
    pub(crate) sshd: Sshd,
    pub(crate) src: PathBuf,
    pub(crate) dest: PathBuf,
    /// The backup server's `steward:backup:state_dir`.
    pub(crate) state_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl BackupStack {
    fn start() -> Self {
        Self::start_with("", "")
    }

    /// As [`BackupStack::start`], with `backup_settings` appended to the
    /// backup server's `steward:backup:` minion settings (indented four
    /// spaces) and `steward_extra` to the daemon's config (top level; its
    /// own `dispatch:` replaces the tests' quick one).
    pub(crate) fn start_with(backup_settings: &str, steward_extra: &str) -> Self {
        crate::support::netns::require_tools(&["rsync", "rsnapshot", "rrsync"]);
        let sshd = Sshd::start();
        let dir = tempfile::Builder::new()
            .prefix("ss-backups-")
            .tempdir()
            .unwrap();
        let src = dir.path().join("src");
        let dest = dir.path().join("backups/web1");
        let mut h = signing_master_serving(vec![salt_states_dir()]);
        let metrics_port = free_port();
        let cfg = steward_config(
            &h,
            &[],
            &format!(
                "metrics_listen: 127.0.0.1:{metrics_port}\n\
                 masters: [\"127.0.0.1:{}\"]\n\
                 {}{steward_extra}",
                h.ret_port,
                // The tests' own quick dispatcher unless the caller sets one.
                if steward_extra.lines().any(|l| l.starts_with("dispatch:")) {
                    ""
                } else {
                    "dispatch:\n  debounce_ms: 300\n  job_timeout: 120\n  retry_base_ms: 1000\n"
                }
            ),
        );
        steward(&cfg, &["model", "add", "m"]);
        let b = steward_json(&cfg, &["server", "add", BACKUP, "--model", "m", "--json"]);
        let s = steward_json(
            &cfg,
            &[
                "server",
                "add",
                SOURCE,
                "--model",
                "m",
                "--internal-ip",
                "127.0.0.1",
                "--json",
            ],
        );
        let daemon = start_daemon(&cfg);
        let state_dir = dir.path().join("state");
        let backup_settings = format!(
            "steward:\n  backup:\n    state_dir: {}\n    cron_file: {}\n{backup_settings}",
            state_dir.display(),
            dir.path().join("cron.d/salt-steward-backup").display()
        );
        let source_settings = format!(
            "steward:\n  backup_source:\n    authorized_keys: {}\n    host_keys_dir: {}\n",
            sshd.authorized_keys.display(),
            sshd.host_keys_dir.display()
        );
        for (name, minion, settings) in [
            (BACKUP, b["minion_id"].as_str().unwrap(), &backup_settings),
            (SOURCE, s["minion_id"].as_str().unwrap(), &source_settings),
        ] {
            let bundle = bundle(&h, &cfg, name, &format!("{name}.tgz"));
            h.start_minion_with(name, minion, settings, |d| install_bundle(&bundle, d));
            wait_status(&cfg, name, "online");
        }
        Self {
            daemon: Some(daemon),
            h,
            metrics_port,
            source_minion: s["minion_id"].as_str().unwrap().to_owned(),
            backup_minion: b["minion_id"].as_str().unwrap().to_owned(),
            cfg,
            sshd,
            src,
            dest,
            state_dir,
            _dir: dir,
        }
    }

    /// `backup add SOURCE <src> BACKUP <dest> --ssh-port <sshd> EXTRA…`:
    /// the new backup's id.
    pub(crate) fn add(&self, extra: &[&str]) -> String {
        let port = self.sshd.port.to_string();
        let mut args = vec![
            "backup",
            "add",
            SOURCE,
            self.src.to_str().unwrap(),
            BACKUP,
            self.dest.to_str().unwrap(),
            "--ssh-port",
            &port,
        ];
        args.extend_from_slice(extra);
        steward(&self.cfg, &args).trim().to_owned()
    }

    /// `backup run ID [--level L] --json`: its exit code and JSON output.
    pub(crate) fn run(&self, id: &str, level: Option<&str>) -> (Option<i32>, Value) {
        run_backup(&self.cfg, id, level)
    }

    /// Waits until both targets are done at their desired revision, the
    /// dispatcher has read every change, and the keys are exchanged.
    pub(crate) fn converged(&self, id: &str) -> Value {
        eventually_within("the backup converged", CONVERGE, || {
            let unread = unread_by_dispatcher(&self.cfg);
            let b = steward_json(&self.cfg, &["backup", "show", id, "--json"]);
            let t = target(&self.cfg, BACKUP, "backup");
            let s = target(&self.cfg, SOURCE, "backup_source");
            let done = |t: &Option<Value>| {
                t.as_ref()
                    .is_some_and(|t| t["status"] == "done" && t["applied"] == t["desired"])
            };
            let keys = b["dest_pubkey"].is_string()
                && !b["source_host_keys"].as_array().unwrap().is_empty();
            if unread == 0 && done(&t) && done(&s) && keys {
                Ok(b)
            } else {
                Err(format!("unread {unread}, backup {b}, targets {t:?} {s:?}"))
            }
        })
    }
}

/// `salt-steward backup run ID [--level L] --json`: its exit code and JSON output.
fn run_backup(cfg: &Path, id: &str, level: Option<&str>) -> (Option<i32>, Value) {
    let mut args = vec!["backup", "run", id, "--json", "--timeout", "180"];
    if let Some(l) = level {
        args.extend(["--level", l]);
    }
    let out = cli(cfg, &args).output().unwrap();
    let ran = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{args:?}: {}", crate::support::text(&out)));
    (out.status.code(), ran)
}

#[test]
fn a_backup_converges_by_itself_then_runs_and_records_its_result() {
    let s = BackupStack::start();
    let (files, size) = populate(&s.src);
    let src = s.src.to_str().unwrap();
    let port = s.sshd.port.to_string();
    let id = s.add(&["--exclude", "cache/", "--exclude", "*.tmp"]);
    let id = id.as_str();
    assert_eq!(id, "1");
    let b = s.converged(id);
    // The keys came from the states' reports: the source's host key as its
    // sshd has it, the backup server's key installed restricted on the source.
    let host_key = s.sshd.host_key();
    assert!(
        b["source_host_keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| host_key.starts_with(k.as_str().unwrap())),
        "{b}\n{host_key}"
    );
    let pubkey = b["dest_pubkey"].as_str().unwrap();
    let blob = pubkey.split_whitespace().nth(1).unwrap();
    let authorized = std::fs::read_to_string(&s.sshd.authorized_keys).unwrap();
    let line = authorized
        .lines()
        .find(|l| l.contains(blob))
        .unwrap_or_else(|| panic!("no key of the backup server in {authorized}"));
    assert!(
        line.contains("rrsync -ro") && line.contains("restrict"),
        "{line}"
    );
    assert!(line.contains(src), "{line}");

    // Run it now: a real copy, the result recorded.
    let out = run_ok(cli(
        &s.cfg,
        &["backup", "run", id, "--json", "--timeout", "180"],
    ));
    let ran: Value = serde_json::from_slice(&out.stdout).unwrap();
    let result = &ran["result"];
    assert_eq!(result["outcome"], "ok", "{ran}");
    assert_eq!(result["files"], files, "{ran}");
    assert_eq!(result["size"], size, "{ran}");
    let snapshot = s.dest.join("hourly.0");
    assert_eq!(
        std::fs::read_to_string(snapshot.join("sub/deeper/c.bin")).unwrap(),
        "x".repeat(4096)
    );
    assert!(snapshot.join("a.txt").exists());
    assert!(!snapshot.join("cache").exists(), "cache/ was excluded");
    assert!(
        !snapshot.join("sub/scratch.tmp").exists(),
        "*.tmp was excluded"
    );

    let shown = steward_json(&s.cfg, &["backup", "show", id, "--json"]);
    let results = shown["results"].as_array().unwrap();
    assert_eq!(results.len(), 1, "one run, recorded once: {shown}");
    assert_eq!(results[0]["run_id"], result["run_id"], "{shown}");
    assert_eq!(results[0]["files"], files, "{shown}");
    assert_eq!(results[0]["size"], size, "{shown}");
    assert_eq!(shown["health"], "green", "{shown}");
    let list = steward(&s.cfg, &["backup", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("1\t") && l.contains("green")),
        "{list}"
    );
    let status = steward(&s.cfg, &["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.contains("backup #1") && l.contains("green")),
        "{status}"
    );

    // The wrapper's own event (salt-call event.send on the backup server)
    // is proved by its job and accepted (the run was recorded once already).
    let deadline = std::time::Instant::now() + CONVERGE;
    while results_counted(s.metrics_port, "ok") == 0 {
        if std::time::Instant::now() >= deadline {
            // Any other outcome counted says why (a refusal's code), and
            // the daemon's log why it refused.
            let counted = [
                "unverified_sender",
                "wrong_minion",
                "invalid_value",
                "not_found",
            ]
            .map(|o| (o, results_counted(s.metrics_port, o)));
            let mut s = s;
            let d = s.daemon.as_mut().unwrap();
            d.drain_err();
            let refusals: Vec<_> = d
                .seen_err
                .iter()
                .filter(|l| l.contains("refused"))
                .collect();
            panic!("the genuine result event was not counted; counted otherwise: {counted:?}; the daemon's refusals: {refusals:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The same result with a new run id, sent by the SOURCE's minion
    // (salt-call event.send: wrapped with its own authenticated id, its
    // job proves it sent it): refused (not the backup server), counted,
    // not recorded. The same by the master's runner (unwrapped): refused.
    // (The wrapper's own shape: files/run.py.)
    let forged = serde_json::json!({
        "backup_id": 1, "run_id": "forged-0001", "level": "hourly",
        "started": result["started_at"].as_f64().unwrap() / 1000.0 + 60.0,
        "duration_s": 0.5, "outcome": "ok", "rsync_exit": 0,
        "files": files, "size": size, "transferred": size, "error": "",
    });
    let forged_text = forged.to_string();
    let out = s.h.minion_call(
        &s.source_minion,
        &["event.send", "steward/v1/backup/result", &forged_text],
    );
    assert!(out.status.success(), "{}", crate::support::text(&out));
    eventually_within(
        "the forged result refused",
        CONVERGE,
        || match results_counted(s.metrics_port, "wrong_minion") {
            1 => Ok(()),
            n => Err(format!("counted {n}")),
        },
    );
    let out = s.h.master_cmd(
        "salt-run",
        &["event.send", "steward/v1/backup/result", &forged_text],
    );
    assert!(out.status.success(), "{}", crate::support::text(&out));
    eventually_within(
        "the unwrapped result refused",
        CONVERGE,
        || match results_counted(s.metrics_port, "unverified_sender") {
            0 => Err("not yet".into()),
            _ => Ok(()),
        },
    );
    let shown = steward_json(&s.cfg, &["backup", "show", id, "--json"]);
    let runs: Vec<&Value> = shown["results"].as_array().unwrap().iter().collect();
    assert_eq!(runs.len(), 1, "a forged result was recorded: {shown}");
    assert_eq!(runs[0]["run_id"], result["run_id"], "{shown}");

    // A run whose event is lost (the daemon is stopped; the cron wrapper
    // would do the same) is recovered from the backup server's report at
    // its next steward.backup run (here forced by `dispatch retry`).
    let mut s = s;
    assert!(s.daemon.take().unwrap().terminate().success());
    let pillar =
        serde_json::json!({"steward": {"backup_run": {"target": s.backup_minion, "id": 1}}});
    let out = s.h.master_cmd(
        "salt",
        &[
            &s.backup_minion,
            "state.apply",
            "steward.backup.run",
            &format!("pillar={pillar}"),
            "--out=json",
            "-t",
            "120",
        ],
    );
    let text = crate::support::text(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{text}"));
    let comment = v[s.backup_minion.as_str()]
        .as_object()
        .and_then(|states| states.values().next())
        .and_then(|state| state["comment"].as_str())
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();
    let lost: Value = comment
        .lines()
        .find_map(|l| l.strip_prefix("steward.backup.run report: "))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_else(|| panic!("no run report: {text}"));
    let lost_run = lost["result"]["run_id"].as_str().unwrap().to_owned();
    assert_eq!(lost["result"]["outcome"], "ok", "{lost}");
    s.daemon = Some(start_daemon(&s.cfg));
    steward(&s.cfg, &["dispatch", "retry", BACKUP, "--state", "backup"]);
    eventually_within("the lost result recovered", CONVERGE, || {
        let shown = steward_json(&s.cfg, &["backup", "show", id, "--json"]);
        let runs = shown["results"].as_array().unwrap();
        if runs.iter().any(|r| r["run_id"] == lost_run.as_str()) {
            Ok(runs.len())
        } else {
            Err(shown.to_string())
        }
    });
    // A wrong source folder is never a success: the run is recorded as
    // an error, `backup run` exits 1, the backup is red. (One backup per
    // source and backup server: the first goes first.)
    steward(&s.cfg, &["backup", "rm", id]);
    let top = s.src.parent().unwrap().to_owned();
    let missing = top.join("missing");
    let missing_dest = top.join("backups/missing");
    let id2 = steward(
        &s.cfg,
        &[
            "backup",
            "add",
            SOURCE,
            missing.to_str().unwrap(),
            BACKUP,
            missing_dest.to_str().unwrap(),
            "--ssh-port",
            &port,
        ],
    );
    let id2 = id2.trim();
    s.converged(id2);
    let out = cli(
        &s.cfg,
        &["backup", "run", id2, "--json", "--timeout", "180"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", crate::support::text(&out));
    let ran: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", crate::support::text(&out)));
    let outcome = ran["result"]["outcome"].as_str().unwrap();
    assert!(outcome == "error" || outcome == "attention", "{ran}");
    let shown = steward_json(&s.cfg, &["backup", "show", id2, "--json"]);
    assert_eq!(shown["health"], "red", "{shown}");
    assert_eq!(shown["results"][0]["outcome"], outcome, "{shown}");
}

/// The snapshots under a backup's destination (`.sync` and our marker aside), sorted.
fn snapshots(dest: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dest)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

/// Small levels from the daemon's `backups.retain`: through `backup run`
/// (and `--level daily`) the snapshots rotate to exactly the configured
/// counts, an unchanged file is one inode in consecutive snapshots and a
/// changed one is not, every run is in `backup show` with its outcome; a
/// file vanishing mid-run is a recorded `warning` and the snapshot still
/// rotates.
#[test]
fn backup_runs_rotate_to_the_configured_levels_and_a_vanished_file_is_a_warning() {
    // The backup server's rsync throttled (`steward:backup:rsync`, as in
    // states_backup::backup_vanished_file_is_a_warning_and_still_rotates):
    // the transfer of a large first file lasts seconds, during which the
    // test removes a later file of the file list already sent.
    let tools = tempfile::Builder::new()
        .prefix("ss-slow-rsync-")
        .tempdir()
        .unwrap();
    let slow = tools.path().join("slow-rsync");
    write(
        &slow,
        "#!/bin/sh\nexec /usr/bin/rsync --bwlimit=256 \"$@\"\n",
    );
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let s = BackupStack::start_with(
        &format!("    rsync: {}\n", slow.display()),
        "backups:\n  retain:\n\
         \x20   - {level: hourly, count: 2, cron: \"0 */4 * * *\"}\n\
         \x20   - {level: daily, count: 2, cron: \"30 3 * * *\"}\n",
    );
    let (files, size) = populate(&s.src);
    let id = s.add(&["--exclude", "cache/", "--exclude", "*.tmp"]);
    let id = id.as_str();
    s.converged(id);
    let conf = std::fs::read_to_string(s.state_dir.join(id).join("rsnapshot.conf")).unwrap();
    for line in ["retain\thourly\t2", "retain\tdaily\t2"] {
        assert!(conf.lines().any(|l| l == line), "{line:?} not in:\n{conf}");
    }
    let dest = &s.dest;
    // Each run: (run id, outcome) as `backup run` reported it.
    let mut runs: Vec<(Value, &str)> = Vec::new();
    let mut run = |level: Option<&str>, want: &'static str| -> Value {
        let (code, ran) = s.run(id, level);
        let r = ran["result"].clone();
        assert_eq!(r["outcome"], want, "{level:?}: {ran}");
        let ok = want == "ok" || want == "warning";
        assert_eq!(code, Some(if ok { 0 } else { 1 }), "{level:?}: {ran}");
        // Recorded by `backup run` or, first, from the wrapper's event:
        // either way once (checked against `backup show` at the end).
        runs.push((r["run_id"].clone(), want));
        r
    };

    // A higher level before the lower one has history: not a success, nothing made.
    run(Some("daily"), "insufficient_history");
    assert!(snapshots(dest).is_empty(), "{:?}", snapshots(dest));
    let r = run(None, "ok");
    assert_eq!(
        (r["files"].clone(), r["size"].clone()),
        (files.into(), size.into())
    );
    assert_eq!(r["transferred"], size, "{r}");
    let r = run(None, "ok");
    assert_eq!(r["transferred"], 0, "nothing changed: {r}");
    assert_eq!(snapshots(dest), ["hourly.0", "hourly.1"]);
    assert_eq!(
        inode(&dest.join("hourly.0/a.txt")),
        inode(&dest.join("hourly.1/a.txt"))
    );
    assert_eq!(
        inode(&dest.join("hourly.0/sub/b.txt")),
        inode(&dest.join("hourly.1/sub/b.txt"))
    );
    write(&s.src.join("sub/b.txt"), "changed content\n");
    let r = run(None, "ok");
    assert_eq!(r["transferred"], 16, "only the changed file: {r}");
    assert_eq!(snapshots(dest), ["hourly.0", "hourly.1"], "hourly keeps 2");
    assert_eq!(
        inode(&dest.join("hourly.0/a.txt")),
        inode(&dest.join("hourly.1/a.txt"))
    );
    assert_ne!(
        inode(&dest.join("hourly.0/sub/b.txt")),
        inode(&dest.join("hourly.1/sub/b.txt"))
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("hourly.0/sub/b.txt")).unwrap(),
        "changed content\n"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("hourly.1/sub/b.txt")).unwrap(),
        "0123456789\n"
    );

    // daily takes the oldest hourly (hourly.1) each time; daily keeps 2.
    let oldest = inode(&dest.join("hourly.1/sub/b.txt"));
    run(Some("daily"), "ok");
    assert_eq!(snapshots(dest), ["daily.0", "hourly.0"]);
    assert_eq!(inode(&dest.join("daily.0/sub/b.txt")), oldest);
    run(None, "ok");
    run(Some("daily"), "ok");
    assert_eq!(snapshots(dest), ["daily.0", "daily.1", "hourly.0"]);
    run(None, "ok");
    assert_eq!(
        snapshots(dest),
        ["daily.0", "daily.1", "hourly.0", "hourly.1"]
    );
    let next = inode(&dest.join("hourly.1/sub/b.txt"));
    run(Some("daily"), "ok");
    assert_eq!(
        snapshots(dest),
        ["daily.0", "daily.1", "hourly.0"],
        "daily keeps 2"
    );
    assert_eq!(inode(&dest.join("daily.0/sub/b.txt")), next);
    // Unchanged since the first run: one inode in all of them.
    let a = inode(&dest.join("hourly.0/a.txt"));
    for snap in ["daily.0", "daily.1"] {
        assert_eq!(inode(&dest.join(snap).join("a.txt")), a, "{snap}");
    }

    // A file vanishing while rsync runs: a warning, kept and rotated.
    let big: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(s.src.join("aa-big.bin"), &big).unwrap();
    write(&s.src.join("zz-vanishing.txt"), "gone soon\n");
    let before = inode(&dest.join("hourly.0/a.txt"));
    let (code, ran) = std::thread::scope(|sc| {
        let cfg = s.cfg.clone();
        let running = sc.spawn(move || run_backup(&cfg, id, None));
        // The receiver's temp file of the big file: its transfer is on.
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let started = std::fs::read_dir(dest.join(".sync"))
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with(".aa-big.bin."))
                })
                .unwrap_or(false);
            if started {
                break;
            }
            assert!(
                !running.is_finished(),
                "the run ended before the big file's transfer was seen"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "no transfer within 90 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::remove_file(s.src.join("zz-vanishing.txt")).unwrap();
        running.join().unwrap()
    });
    assert_eq!(code, Some(0), "a warning is a success: {ran}");
    let r = &ran["result"];
    assert_eq!(r["outcome"], "warning", "{ran}");
    assert_eq!(r["rsync_exit"], 24, "{ran}");
    assert!(r["error"].as_str().unwrap().contains("vanished"), "{ran}");
    runs.push((r["run_id"].clone(), "warning"));
    assert_eq!(
        snapshots(dest),
        ["daily.0", "daily.1", "hourly.0", "hourly.1"],
        "rotated, hourly still 2"
    );
    assert_eq!(inode(&dest.join("hourly.1/a.txt")), before);
    assert_eq!(
        std::fs::read(dest.join("hourly.0/aa-big.bin")).unwrap(),
        big
    );
    assert!(!dest.join("hourly.0/zz-vanishing.txt").exists());

    // Every run recorded once, newest first, with its outcome.
    let shown = steward_json(&s.cfg, &["backup", "show", id, "--json"]);
    let recorded: Vec<(Value, &str)> = shown["results"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|r| (r["run_id"].clone(), r["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(recorded, runs, "{shown}");
    assert_eq!(shown["results"][0]["rsync_exit"], 24, "{shown}");
    assert_eq!(shown["health"], "green", "{shown}");
}

// ------------------------------------------------------------ the registry

/// The backup registry on one backend: create (both targets in the
/// outbox), refusals writing nothing, keys learnt once (their targets in
/// the outbox), results recorded once per run, the server kept while a
/// backup names it, delete (results go with it).
async fn registry_story(db: &TestDb) {
    use salt_steward::registry::backup::{BackupResult, Outcome};
    use salt_steward::registry::service::BackupSpec;
    use salt_steward::registry::store::{BackupStore as _, Store as _};
    use salt_steward::registry::{OutboxRow, ServerPatch, ServerRef};

    let reg = salt_steward::registry::open(&db.url).await.unwrap();
    reg.create_model("m", "", &[]).await.unwrap();
    let server = |name: &str, ip: Option<&str>| {
        let mut m = serde_json::Map::new();
        m.insert("name".into(), Value::from(name));
        m.insert("model".into(), Value::from("m"));
        if let Some(ip) = ip {
            m.insert("internal_ip".into(), Value::from(ip));
        }
        ServerPatch::from_json(&m, &[]).unwrap()
    };
    let src = reg
        .create_server(server(SOURCE, Some("10.1.0.5")))
        .await
        .unwrap();
    let bk = reg.create_server(server(BACKUP, None)).await.unwrap();
    let spec = |folder: &str, dest: &str| BackupSpec {
        source: ServerRef::Name(SOURCE.into()),
        source_folder: folder.into(),
        dest: ServerRef::Name(BACKUP.into()),
        dest_folder: dest.into(),
        excludes: vec!["cache/".into()],
        exclude_proc_sys: true,
        active: None,
        retain: None,
        ssh_host: None,
        ssh_port: Some(2222),
        ssh_user: None,
    };
    let store = reg.store();
    store.outbox_subscribe("t").await.unwrap();
    let b = reg
        .create_backup(spec("/srv/data", "/b/web1/"))
        .await
        .unwrap();
    assert_eq!(b.dest_folder, "/b/web1");
    assert_eq!(b.host().as_deref(), Some("10.1.0.5"));
    assert!(b.exclude_proc_sys && b.active);
    let rows = store.outbox_pending("t", 100).await.unwrap();
    let OutboxRow::Entry(e) = rows.last().unwrap() else {
        panic!("{rows:?}")
    };
    assert_eq!(e.kind.as_str(), "backup.created");
    assert_eq!(
        e.payload["targets"],
        serde_json::json!([[bk.id, "backup"], [src.id, "backup_source"]])
    );
    let before = rows.len();
    for (folder, dest, code) in [
        ("/srv/x", "/b/web1", "duplicate_backup"),
        ("/srv/x", "/b", "duplicate_backup"),
        ("/srv/x", "/b/other", "duplicate_backup"),
        ("srv", "/b/other", "invalid_value"),
        ("/srv/../x", "/b/other", "invalid_value"),
        ("/srv", "/", "invalid_value"),
    ] {
        let err = reg.create_backup(spec(folder, dest)).await.unwrap_err();
        assert_eq!(err.code(), code, "{folder} {dest}: {err}");
    }
    assert_eq!(store.outbox_pending("t", 100).await.unwrap().len(), before);
    assert_eq!(reg.list_backups(None).await.unwrap().len(), 1);

    // Keys: stored once, each change naming the targets to apply again.
    assert!(store
        .set_backup_pubkey(bk.id, "ssh-ed25519 AAAA k")
        .await
        .unwrap());
    assert!(!store
        .set_backup_pubkey(bk.id, "ssh-ed25519 AAAA k")
        .await
        .unwrap());
    let keys = vec!["ssh-ed25519 BBBB".to_owned()];
    assert!(store.set_ssh_host_keys(src.id, &keys).await.unwrap());
    assert!(!store.set_ssh_host_keys(src.id, &keys).await.unwrap());
    let rows = store.outbox_pending("t", 100).await.unwrap();
    let targets: Vec<Value> = rows[before..]
        .iter()
        .map(|r| match r {
            OutboxRow::Entry(e) => e.payload["targets"].clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        targets,
        vec![
            serde_json::json!([[src.id, "backup_source"]]),
            serde_json::json!([[bk.id, "backup"]])
        ]
    );
    let b = reg.get_backup(b.id).await.unwrap();
    assert_eq!(b.dest_pubkey.as_deref(), Some("ssh-ed25519 AAAA k"));
    assert_eq!(b.source_host_keys, keys);

    // Results: once per run id.
    let r = BackupResult {
        backup_id: b.id,
        run_id: "r-1".into(),
        level: "hourly".into(),
        started_at: 1_000,
        duration_ms: 5,
        outcome: Outcome::Warning,
        files: Some(3),
        size: Some(30),
        transferred: None,
        rsync_exit: Some(24),
        error: "vanished".into(),
        received_at: 0,
    };
    // `backup run` marks it running until its end (or its deadline).
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    store
        .set_backup_running(b.id, Some(now + 60_000))
        .await
        .unwrap();
    assert!(reg.get_backup(b.id).await.unwrap().running(now));
    store.set_backup_running(b.id, None).await.unwrap();
    assert!(!reg.get_backup(b.id).await.unwrap().running(now));
    // The mark the dashboard's event stream watches moves with a new
    // result only.
    let (n0, last0) = store.backup_results_mark().await.unwrap();
    assert!(reg.record_backup_result(&b, &r).await.unwrap());
    let (n1, last1) = store.backup_results_mark().await.unwrap();
    assert_eq!(n1, n0 + 1);
    assert!(last1 > last0, "{last1} after {last0}");
    assert!(!reg.record_backup_result(&b, &r).await.unwrap());
    assert_eq!(store.backup_results_mark().await.unwrap(), (n1, last1));
    let got = reg.backup_results(b.id, 10).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].outcome, Outcome::Warning);
    assert_eq!(got[0].rsync_exit, Some(24));

    let err = reg.delete_server(&ServerRef::Id(src.id)).await.unwrap_err();
    assert_eq!(err.code(), "server_in_use", "{err}");
    reg.delete_backup(b.id).await.unwrap();
    assert!(reg.backup_results(b.id, 10).await.unwrap().is_empty());
    reg.delete_server(&ServerRef::Id(src.id)).await.unwrap();
}

#[tokio::test]
async fn registry_story_on_sqlite() {
    registry_story(&TestDb::sqlite()).await;
}

#[tokio::test]
async fn registry_story_on_postgres() {
    registry_story(&TestDb::postgres_required().await).await;
}

// ------------------------------------------------------------- the bus

/// Fires a request from the master (`salt-run event.send`) and waits for its reply.
fn ask(
    h: &SaltHarness,
    w: &mut LineChild,
    d: &mut LineChild,
    op: &str,
    id: &str,
    mut data: Value,
) -> Value {
    data["request_id"] = Value::from(id);
    let tag = format!("steward/v1/backup/{op}");
    crate::support::assert_ok(&h.master_cmd("salt-run", &["event.send", &tag, &data.to_string()]));
    crate::support::reply(w, d, id)
}

#[test]
fn backups_on_the_bus_with_trust_rules_and_bad_input_refused() {
    let mut h = SaltHarness::start();
    h.wait_req_ready();
    h.start_minions_and_wait(&["b-untrusted"]);
    let cfg = steward_config(&h, &[], "");
    steward(&cfg, &["model", "add", "m"]);
    steward(
        &cfg,
        &[
            "server",
            "add",
            SOURCE,
            "--model",
            "m",
            "--internal-ip",
            "10.1.0.5",
        ],
    );
    steward(&cfg, &["server", "add", BACKUP, "--model", "m"]);
    let mut daemon = start_daemon(&cfg);
    let mut w = crate::support::watch_steward(&cfg);
    let (w, d) = (&mut w, &mut daemon);

    let create = serde_json::json!({
        "source": SOURCE, "source_folder": "/srv/data", "dest": BACKUP,
        "dest_folder": "/b/web1", "excludes": ["cache/"], "ssh_port": 2222,
    });
    let r = ask(&h, w, d, "create", "b1", create.clone());
    assert_eq!(r["ok"], true, "{r}");
    let id = r["result"]["id"].clone();
    assert_eq!(r["result"]["ssh_port"], 2222, "{r}");
    assert_eq!(
        r["result"]["excludes"],
        serde_json::json!(["cache/"]),
        "{r}"
    );
    // Published by the outbox relay: before or after the reply.
    let created = crate::support::json_line(&w.seen_or_wait_line(
        "steward/v1/backup/created",
        crate::support::T,
        |l| {
            let v = crate::support::json_line(l);
            v["tag"] == "steward/v1/backup/created" && v["data"]["id"] == id
        },
    ))["data"]
        .clone();
    assert_eq!(created["dest"], BACKUP, "{created}");

    let r = ask(&h, w, d, "find", "b2", serde_json::json!({"id": id}));
    assert_eq!(r["result"][0]["dest_folder"], "/b/web1", "{r}");

    let mut dup = create.clone();
    dup["source_folder"] = Value::from("/srv/other");
    let r = ask(&h, w, d, "create", "b3", dup);
    assert_eq!(r["error"]["code"], "duplicate_backup", "{r}");
    let mut rel = create.clone();
    rel["dest_folder"] = Value::from("b/x");
    let r = ask(&h, w, d, "create", "b4", rel);
    assert_eq!(r["error"]["code"], "invalid_value", "{r}");
    let mut nodest = create.clone();
    nodest["dest"] = Value::from("nosuch.example.org");
    nodest["dest_folder"] = Value::from("/b/y");
    let r = ask(&h, w, d, "create", "b5", nodest);
    assert_eq!(r["error"]["code"], "not_found", "{r}");
    let mut unknown = create.clone();
    unknown["colour"] = Value::from("red");
    let r = ask(&h, w, d, "create", "b6", unknown);
    assert_eq!(r["error"]["code"], "invalid_value", "{r}");

    // A minion not in trusted_minions changes nothing.
    let mut other = create.clone();
    other["dest_folder"] = Value::from("/b/z");
    other["request_id"] = Value::from("b7");
    let out = h.minion_call(
        "b-untrusted",
        &["event.send", "steward/v1/backup/create", &other.to_string()],
    );
    crate::support::assert_ok(&out);
    let r = crate::support::reply(w, d, "b7");
    assert_eq!(r["error"]["code"], "untrusted_sender", "{r}");
    let all = steward_json(&cfg, &["backup", "list", "--json"]);
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");

    let r = ask(&h, w, d, "delete", "b8", serde_json::json!({"id": id}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        steward_json(&cfg, &["backup", "list", "--json"]),
        serde_json::json!([])
    );
}
