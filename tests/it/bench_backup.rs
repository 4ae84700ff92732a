//! The backup benchmarks of issue #13's closing note, run by
//! `scripts/bench-backup` (whose header says what is measured): `#[ignore]`d,
//! so the test suite never runs them. Both use the stack of
//! `tests/it/backups.rs` ([`BackupStack`]: a real master, the daemon, the
//! backup server's and the source's real minions, the source's sshd on
//! loopback) and write their measurements as JSON to BENCH_OUT.
//!
//! - [`bench_backup_tree`]: a tree of BENCH_FILES files backed up through
//!   salt-steward (`backup add`, `backup run` twice) and by hand with the
//!   rsnapshot configuration the state wrote (`rsnapshot sync` + `hourly`
//!   twice, into a separate destination).
//! - [`bench_backup_burst`]: BENCH_BACKUPS backups added in one burst onto
//!   one backup server: its `steward.backup` runs and the time until it
//!   converged.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::backups::{steward, steward_json, target, unread_by_dispatcher, BackupStack, BACKUP};
use crate::support::cli;

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

fn say(msg: &str) {
    eprintln!("bench-backup: {msg}");
}

fn write_out(v: &Value) {
    let out = std::env::var("BENCH_OUT").unwrap_or_else(|_| panic!("BENCH_OUT is not set"));
    std::fs::write(&out, serde_json::to_string_pretty(v).unwrap()).unwrap();
    say(&format!("wrote {out}"));
}

/// `Name: 123 …` of rsync's `--stats` in `text`.
fn stat(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .and_then(|v| v.split_whitespace().next()?.replace(',', "").parse().ok())
}

/// BENCH_FILES files over BENCH_DIRS folders, 200 to 2,000 bytes each:
/// (files, bytes).
fn make_tree(root: &Path) -> (u64, u64) {
    let files = env_num("BENCH_FILES", 100_000);
    let dirs = env_num("BENCH_DIRS", 1_000).max(1);
    let mut bytes = 0;
    for i in 0..files {
        let d = root.join(format!("d{:04}", i % dirs));
        if i < dirs {
            std::fs::create_dir_all(&d).unwrap();
        }
        let len = 200 + (i * 7_919) % 1_800;
        let line = format!("file {i} of the salt-steward backup bench\n");
        let text: String = line.chars().cycle().take(len as usize).collect();
        std::fs::write(d.join(format!("f{i:06}.txt")), text).unwrap();
        bytes += len;
    }
    (files, bytes)
}

#[test]
#[ignore = "a benchmark: scripts/bench-backup"]
fn bench_backup_tree() {
    let s = BackupStack::start_with(
        "",
        "dispatch:\n  debounce_ms: 300\n  job_timeout: 120\n  retry_base_ms: 1000\n",
    );
    say("writing the tree");
    let (files, bytes) = make_tree(&s.src);
    say(&format!("{files} files, {bytes} bytes"));
    let id = s.add(&[]);
    s.converged(&id);
    let bdir = s.state_dir.join(&id);

    // Ours: `backup run` as an operator types it (Salt publish, the state,
    // the wrapper, rsnapshot sync + hourly, the result recorded).
    let ours = |label: &str| -> Value {
        say(&format!("ours, {label}"));
        let t = Instant::now();
        let out = cli(
            &s.cfg,
            &["backup", "run", &id, "--json", "--timeout", "1800"],
        )
        .output()
        .unwrap();
        let wall = t.elapsed().as_secs_f64();
        assert!(out.status.success(), "{}", crate::support::text(&out));
        let ran: Value = serde_json::from_slice(&out.stdout).unwrap();
        let r = &ran["result"];
        let rsync_out = std::fs::read_to_string(bdir.join("rsync.out")).unwrap_or_default();
        json!({
            "run": label,
            "wall_s": wall,
            "wrapper_s": r["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            "outcome": r["outcome"],
            "files": r["files"],
            "transferred": r["transferred"],
            "bytes_received": stat(&rsync_out, "Total bytes received"),
            "bytes_sent": stat(&rsync_out, "Total bytes sent"),
        })
    };

    // By hand: the configuration the state wrote, only its snapshot_root
    // and lockfile moved to a destination of its own.
    let hand_dir = s.dest.parent().unwrap().join("by-hand");
    let hand_root = hand_dir.join("root");
    std::fs::create_dir_all(&hand_root).unwrap();
    let conf = std::fs::read_to_string(bdir.join("rsnapshot.conf")).unwrap();
    let hand_conf: String = conf
        .lines()
        .map(|l| {
            if l.starts_with("snapshot_root\t") {
                format!("snapshot_root\t{}/\n", hand_root.display())
            } else if l.starts_with("lockfile\t") {
                format!("lockfile\t{}\n", hand_dir.join("rsnapshot.pid").display())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let hand_conf_path = hand_dir.join("rsnapshot.conf");
    std::fs::write(&hand_conf_path, &hand_conf).unwrap();
    let hand = |label: &str| -> Value {
        say(&format!("by hand, {label}"));
        let rsnapshot = |what: &str| {
            // -v (verbose 3): rsnapshot prints rsync's output (its --stats),
            // which steward-backup-run reads through its rsync recorder instead.
            let out = Command::new("rsnapshot")
                .arg("-v")
                .arg("-c")
                .arg(&hand_conf_path)
                .arg(what)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "rsnapshot {what}: {}",
                crate::support::text(&out)
            );
            crate::support::text(&out)
        };
        let t = Instant::now();
        let said = rsnapshot("sync");
        rsnapshot("hourly");
        let wall = t.elapsed().as_secs_f64();
        json!({
            "run": label,
            "wall_s": wall,
            "files": stat(&said, "Number of files"),
            "transferred": stat(&said, "Total transferred file size"),
            "bytes_received": stat(&said, "Total bytes received"),
            "bytes_sent": stat(&said, "Total bytes sent"),
        })
    };

    let ours_full = ours("full");
    let hand_full = hand("full");
    let ours_again = ours("no change");
    let hand_again = hand("no change");
    for snap in ["hourly.0", "hourly.1"] {
        assert!(s.dest.join(snap).is_dir() && hand_root.join(snap).is_dir());
    }
    write_out(&json!({
        "files": files,
        "bytes": bytes,
        "ours": [ours_full, ours_again],
        "hand": [hand_full, hand_again],
    }));
}

/// The `state.apply steward.backup` jobs on `minion` in the master's job
/// cache: their jids.
fn backup_jobs(s: &BackupStack, minion: &str) -> BTreeSet<String> {
    let out = s.h.master_cmd(
        "salt-run",
        &[
            "jobs.list_jobs",
            "search_function=state.apply",
            "--out=json",
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("jobs.list_jobs: {e}: {}", crate::support::text(&out)));
    v.as_object()
        .into_iter()
        .flatten()
        .filter(|(_, job)| {
            let on = match &job["Target"] {
                Value::String(t) => t.split(',').any(|t| t == minion),
                Value::Array(a) => a.iter().any(|t| t == minion),
                _ => false,
            };
            on && job["Arguments"][0] == "steward.backup"
        })
        .map(|(jid, _)| jid.clone())
        .collect()
}

#[test]
#[ignore = "a benchmark: scripts/bench-backup"]
fn bench_backup_burst() {
    let n = env_num("BENCH_BACKUPS", 200);
    let give_up = Duration::from_secs(env_num("BENCH_GIVE_UP_S", 900));
    let debounce_ms = env_num("BENCH_DEBOUNCE_MS", 2_000);
    let s = BackupStack::start_with(
        "",
        &format!("dispatch:\n  debounce_ms: {debounce_ms}\n  job_timeout: 600\n"),
    );
    // N source servers without minions (their steward.backup_source targets
    // wait for them); their host keys stored as their first
    // steward.backup_source report would have (before any backup names
    // them: nothing dispatched), so every backup is runnable and in the cron file.
    say(&format!("registering {n} source servers"));
    let host_key = s.sshd.host_key();
    let mut ids = Vec::new();
    for k in 1..=n {
        let ip = format!("10.201.{}.{}", k / 250, k % 250 + 1);
        let v = steward_json(
            &s.cfg,
            &[
                "server",
                "add",
                &format!("src{k}.example.org"),
                "--model",
                "m",
                "--internal-ip",
                &ip,
                "--json",
            ],
        );
        ids.push(v["id"].as_i64().unwrap());
    }
    let url = format!("sqlite://{}/registry.db", s.h.root().display());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            use salt_steward::registry::store::BackupStore as _;
            let reg = salt_steward::registry::open(&url).await.unwrap();
            for id in &ids {
                reg.store()
                    .set_ssh_host_keys(*id, std::slice::from_ref(&host_key))
                    .await
                    .unwrap();
            }
        });
    crate::support::eventually_within("the dispatcher idle", Duration::from_secs(120), || {
        match unread_by_dispatcher(&s.cfg) {
            0 => Ok(()),
            u => Err(format!("{u} unread")),
        }
    });
    let before = backup_jobs(&s, &s.backup_minion);
    let cron = s
        .state_dir
        .parent()
        .unwrap()
        .join("cron.d/salt-steward-backup");
    let dests = s.dest.parent().unwrap().join("burst");

    say(&format!("adding {n} backups"));
    let t0 = Instant::now();
    for k in 1..=n {
        steward(
            &s.cfg,
            &[
                "backup",
                "add",
                &format!("src{k}.example.org"),
                "/srv/data",
                BACKUP,
                dests.join(format!("src{k}")).to_str().unwrap(),
            ],
        );
    }
    let added_s = t0.elapsed().as_secs_f64();
    say(&format!("added in {added_s:.1} s; waiting for convergence"));
    // Default retention: four levels, one cron line each.
    let want_lines = usize::try_from(n).unwrap() * 4;
    let converged_s = loop {
        let lines = std::fs::read_to_string(&cron)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" --id "))
            .count();
        let t = target(&s.cfg, BACKUP, "backup");
        let done = t
            .as_ref()
            .is_some_and(|t| t["status"] == "done" && t["applied"] == t["desired"]);
        if lines == want_lines && done && unread_by_dispatcher(&s.cfg) == 0 {
            break t0.elapsed().as_secs_f64();
        }
        assert!(
            t0.elapsed() < give_up,
            "not converged: cron lines {lines}/{want_lines}, target {t:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    say(&format!("converged after {converged_s:.1} s"));
    // Late runs would still show: a debounce window and 5 s more.
    std::thread::sleep(Duration::from_millis(debounce_ms + 5_000));
    let runs: Vec<String> = backup_jobs(&s, &s.backup_minion)
        .difference(&before)
        .cloned()
        .collect();
    let mut t = target(&s.cfg, BACKUP, "backup").unwrap();
    // The last run's state return: long (every path), not a measurement.
    t.as_object_mut().unwrap().remove("last_summary");
    let configs = (1..=n)
        .filter(|k| {
            s.state_dir
                .join(k.to_string())
                .join("rsnapshot.conf")
                .exists()
        })
        .count();
    write_out(&json!({
        "backups": n,
        "debounce_ms": debounce_ms,
        "added_s": added_s,
        "converged_s": converged_s,
        "runs": runs.len(),
        "jids": runs,
        "cron_lines": want_lines,
        "rsnapshot_configs": configs,
        "target": t,
    }));
}
