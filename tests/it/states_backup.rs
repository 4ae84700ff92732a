//! The backup states of `salt-states/steward/` applied for real by
//! `salt-call --local` (the venv's, `SALT_BIN_DIR`), with two masterless
//! minions on this machine: `backup-1` (the backup server: `steward.backup`,
//! `steward.backup.run`) and `web-1` (the source: `steward.backup_source`),
//! whose SSH is a private sshd on loopback ([`Sshd`]). Real rsnapshot, rsync,
//! rrsync, ssh and sshd; ssh always with `StrictHostKeyChecking=yes`. One
//! test runs the server as a salt-minion of a real master instead, to see
//! the result event reach the master's bus.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::salt_local::{LocalMinion, StateRun};
use crate::support::sshd::{keygen, Sshd};

const SERVER: &str = "backup-1";
const SOURCE: &str = "web-1";
const BACKUP_REPORT: &str = "steward.backup report: ";
const SOURCE_REPORT: &str = "steward.backup_source report: ";
const RUN_REPORT: &str = "steward.backup.run report: ";

/// The backup server and the source, their sshd, and a folder for the
/// source's data and the destinations. Field order is drop order.
struct BackupLab {
    server: LocalMinion,
    source: LocalMinion,
    sshd: Sshd,
    /// `T/src`: the folder backed up (on the "source").
    src: PathBuf,
    /// `T/backups`: where destinations go (on the "backup server").
    backups: PathBuf,
    /// `T/state`: the server's `steward:backup:state_dir`.
    state_dir: PathBuf,
    /// `T/cron.d/salt-steward-backup`: its `steward:backup:cron_file`.
    cron_file: PathBuf,
    dir: tempfile::TempDir,
}

impl BackupLab {
    fn start() -> Self {
        Self::start_with("")
    }

    /// `extra`: more `steward:backup:` settings of the server (YAML lines
    /// indented by four spaces).
    fn start_with(extra: &str) -> Self {
        crate::support::netns::require_tools(&["rsync", "rsnapshot", "rrsync"]);
        let sshd = Sshd::start();
        let dir = tempfile::Builder::new()
            .prefix("ss-backup-")
            .tempdir()
            .unwrap();
        let t = dir.path();
        let src = t.join("src");
        let backups = t.join("backups");
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&backups).unwrap();
        let state_dir = t.join("state");
        let cron_file = t.join("cron.d/salt-steward-backup");
        let server = LocalMinion::new(
            SERVER,
            &format!(
                "steward:\n  backup:\n    state_dir: {}\n    cron_file: {}\n{extra}",
                state_dir.display(),
                cron_file.display()
            ),
        );
        let source = LocalMinion::new(
            SOURCE,
            &format!(
                "steward:\n  backup_source:\n    authorized_keys: {}\n    host_keys_dir: {}\n",
                sshd.authorized_keys.display(),
                sshd.host_keys_dir.display()
            ),
        );
        Self {
            server,
            source,
            sshd,
            src,
            backups,
            state_dir,
            cron_file,
            dir,
        }
    }

    /// One backup of `folder` into `T/backups/<name>` through the lab's
    /// sshd, hourly ×3 and daily ×2, with `known_hosts` as given.
    fn backup(&self, id: u64, folder: &Path, name: &str, known_hosts: &[String]) -> Value {
        json!({
            "id": id,
            "source": {"host": "127.0.0.1", "port": self.sshd.port, "user": "root"},
            "source_folder": folder,
            "dest_folder": self.backups.join(name),
            "excludes": ["cache/", "*.tmp"],
            "exclude_proc_sys": false,
            "active": true,
            "known_hosts": known_hosts,
            "retain": [
                {"level": "hourly", "count": 3, "cron": "0 */4 * * *"},
                {"level": "daily", "count": 2, "cron": "30 3 * * *"},
            ],
        })
    }

    fn apply_backup(&self, revision: u64, backups: Vec<Value>) -> StateRun {
        self.server.apply(
            "steward.backup",
            &json!({"steward": {"backup": {
                "revision": revision, "target": SERVER, "backups": backups,
            }}}),
        )
    }

    fn apply_source(&self, revision: u64, authorized: Vec<Value>) -> StateRun {
        self.source.apply(
            "steward.backup_source",
            &json!({"steward": {"backup_source": {
                "revision": revision, "target": SOURCE, "authorized": authorized,
            }}}),
        )
    }

    /// `steward.backup.run` of backup `id` (at `level`, or the lowest).
    fn run(&self, id: u64, level: Option<&str>) -> StateRun {
        let mut run = json!({"target": SERVER, "id": id});
        if let Some(l) = level {
            run["level"] = json!(l);
        }
        self.server.apply(
            "steward.backup.run",
            &json!({"steward": {"backup_run": run}}),
        )
    }

    /// The whole setup a dispatcher does: the server's key, the source's
    /// grant and host keys, the server's job. Returns the server's pubkey.
    fn set_up(&self, id: u64, name: &str) -> String {
        let run = self.apply_backup(1, vec![]);
        assert_ok(&run);
        let pubkey = report(&run, BACKUP_REPORT)["pubkey"]
            .as_str()
            .unwrap()
            .to_owned();
        let run = self.apply_source(1, vec![grant(id, &self.src, &pubkey)]);
        assert_ok(&run);
        let host_keys = strings(&report(&run, SOURCE_REPORT)["host_keys"]);
        assert_ok(&self.apply_backup(2, vec![self.backup(id, &self.src, name, &host_keys)]));
        pubkey
    }

    fn dest(&self, name: &str) -> PathBuf {
        self.backups.join(name)
    }

    /// `ssh` with the backup server's key and known_hosts, as the backups
    /// run it, plus `args`.
    fn ssh(&self, args: &[&str]) -> Output {
        Command::new("ssh")
            .args(self.ssh_args())
            .arg("root@127.0.0.1")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ssh_args(&self) -> Vec<String> {
        vec![
            "-i".into(),
            self.state_dir.join("id_ed25519").display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            format!(
                "UserKnownHostsFile={}",
                self.state_dir.join("known_hosts").display()
            ),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-p".into(),
            self.sshd.port.to_string(),
        ]
    }

    /// `rsync -a -e "ssh <the backups' args>" args…`.
    fn rsync(&self, args: &[&str]) -> Output {
        Command::new("rsync")
            .arg("-a")
            .arg("-e")
            .arg(format!("ssh {}", self.ssh_args().join(" ")))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for BackupLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "backup lab kept for inspection: {} (server minion {}, source minion {})",
                self.dir.path().display(),
                self.server.dir().display(),
                self.source.dir().display()
            );
        }
    }
}

fn grant(id: u64, folder: &Path, pubkey: &str) -> Value {
    json!({"id": id, "folder": folder, "pubkey": pubkey})
}

fn assert_ok(run: &StateRun) {
    assert!(run.ok(), "state failed:\n{}", run.raw);
}

fn assert_failed(run: &StateRun) {
    assert!(!run.ok(), "state succeeded:\n{}", run.raw);
}

/// The JSON after `prefix` on the comment's last line (the report every
/// run carries, changed or not).
fn report(run: &StateRun, prefix: &str) -> Value {
    let comment = run.comments();
    let line = comment
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in the comment:\n{}", run.raw));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// The result JSON of a `steward.backup.run`.
fn result(run: &StateRun) -> Value {
    report(run, RUN_REPORT)["result"].clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn inode(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

/// The snapshot directories (`hourly.0` …) under `dest`, sorted.
fn snapshots(dest: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("hourly.") || n.starts_with("daily."))
        .collect();
    v.sort();
    v
}

/// A source tree with files to exclude: (files rsync counts, their bytes).
/// rsync's "Number of files" counts the folder itself, directories and
/// files; "Total file size" the regular files' bytes.
fn populate(src: &Path) -> (u64, u64) {
    write(&src.join("a.txt"), "hello\n");
    write(&src.join("sub/b.txt"), "0123456789\n");
    write(&src.join("sub/deeper/c.bin"), &"x".repeat(4096));
    write(&src.join("cache/skipped"), "excluded by cache/\n");
    write(&src.join("sub/scratch.tmp"), "excluded by *.tmp\n");
    // ".", a.txt, sub, sub/b.txt, sub/deeper, sub/deeper/c.bin
    (6, 6 + 11 + 4096)
}

#[test]
fn backup_pulls_rotates_and_reports() {
    let lab = BackupLab::start();
    let (files, size) = populate(&lab.src);

    // The server's first apply: the key, generated once, reported.
    let run = lab.apply_backup(1, vec![]);
    assert_ok(&run);
    assert!(run.changed(), "{}", run.raw);
    let pubkey = report(&run, BACKUP_REPORT)["pubkey"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(pubkey.starts_with("ssh-ed25519 AAAA"), "{pubkey}");
    let key = lab.state_dir.join("id_ed25519");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(&lab.state_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(
        !run.raw.contains("PRIVATE KEY"),
        "the private key was printed"
    );

    // The backup without the source's host keys: configured, not scheduled.
    let waiting = lab.backup(7, &lab.src, "web1", &[]);
    let run = lab.apply_backup(2, vec![waiting.clone()]);
    assert_ok(&run);
    assert!(
        run.comments().contains("not runnable yet") && run.comments().contains("[7]"),
        "{}",
        run.raw
    );
    let cron = fs::read_to_string(&lab.cron_file).unwrap();
    assert!(!cron.contains("--id 7"), "{cron}");
    let early = lab.run(7, None);
    assert_failed(&early);
    assert!(
        result(&early)["error"]
            .as_str()
            .unwrap()
            .contains("host keys are not collected"),
        "{}",
        early.raw
    );

    // The source: our restricted line next to another tool's, kept byte for byte.
    let foreign = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIxmLWnJ5uSVsJdbkTxOSJ4KvKXNDXZ6ANgS5IUw7Bn/ admin@laptop";
    write(
        &lab.sshd.authorized_keys,
        &format!("# by hand\n{foreign}\n"),
    );
    let run = lab.apply_source(1, vec![grant(7, &lab.src, &pubkey)]);
    assert_ok(&run);
    let host_keys = strings(&report(&run, SOURCE_REPORT)["host_keys"]);
    assert_eq!(host_keys, vec![lab.sshd.host_key()]);
    let ak = fs::read_to_string(&lab.sshd.authorized_keys).unwrap();
    let key_b64 = pubkey.split_whitespace().nth(1).unwrap();
    assert_eq!(
        ak,
        format!(
            "# by hand\n{foreign}\ncommand=\"/usr/bin/rrsync -ro {}\",restrict ssh-ed25519 {key_b64} steward-backup-7\n",
            lab.src.display()
        )
    );
    let again = lab.apply_source(1, vec![grant(7, &lab.src, &pubkey)]);
    assert_ok(&again);
    assert!(!again.changed(), "{}", again.raw);
    // Unchanged runs still report the host keys.
    assert_eq!(
        strings(&report(&again, SOURCE_REPORT)["host_keys"]),
        host_keys
    );

    // The server with the host keys: scheduled; idempotent; the key stays.
    let pillar = vec![lab.backup(7, &lab.src, "web1", &host_keys)];
    let run = lab.apply_backup(3, pillar.clone());
    assert_ok(&run);
    assert!(run.changed(), "{}", run.raw);
    let known_hosts = fs::read_to_string(lab.state_dir.join("known_hosts")).unwrap();
    assert!(
        known_hosts.contains(&format!(
            "[127.0.0.1]:{} {}",
            lab.sshd.port,
            lab.sshd.host_key()
        )),
        "{known_hosts}"
    );
    let conf = fs::read_to_string(lab.state_dir.join("7/rsnapshot.conf")).unwrap();
    for line in [
        format!("snapshot_root\t{}/", lab.dest("web1").display()),
        "sync_first\t1".to_owned(),
        format!(
            "lockfile\t{}",
            lab.state_dir.join("7/rsnapshot.pid").display()
        ),
        "retain\thourly\t3".to_owned(),
        "retain\tdaily\t2".to_owned(),
        "exclude\t\"cache/\"".to_owned(),
        "backup\troot@127.0.0.1:/\t./".to_owned(),
    ] {
        assert!(conf.lines().any(|l| l == line), "{line:?} not in:\n{conf}");
    }
    assert!(conf.contains("--stats --no-human-readable"), "{conf}");
    assert!(conf.contains("StrictHostKeyChecking=yes"), "{conf}");
    let again = lab.apply_backup(3, pillar.clone());
    assert_ok(&again);
    assert!(!again.changed(), "second apply changed:\n{}", again.raw);
    assert_eq!(report(&again, BACKUP_REPORT)["pubkey"], json!(pubkey));
    let dest = lab.dest("web1");
    assert_eq!(
        fs::read_to_string(dest.join(".salt-steward-backup")).unwrap(),
        "7\n"
    );

    // A higher level before the lower one has history: not a failure.
    let daily = lab.run(7, Some("daily"));
    assert_ok(&daily);
    assert_eq!(
        result(&daily)["outcome"],
        "insufficient_history",
        "{}",
        daily.raw
    );

    // The first run: the folder copied, excludes honoured, stats exact.
    let first = lab.run(7, None);
    assert_ok(&first);
    let r = result(&first);
    assert_eq!(r["outcome"], "ok", "{}", first.raw);
    assert_eq!(r["level"], "hourly");
    assert_eq!(r["backup_id"], 7);
    assert_eq!(r["rsync_exit"], 0);
    assert_eq!(r["files"], files, "{}", first.raw);
    assert_eq!(r["size"], size, "{}", first.raw);
    assert_eq!(r["transferred"], size, "{}", first.raw);
    assert_eq!(r["error"], "");
    assert!(r["duration_s"].as_f64().unwrap() > 0.0);
    let h0 = dest.join("hourly.0");
    assert_eq!(fs::read_to_string(h0.join("a.txt")).unwrap(), "hello\n");
    assert_eq!(
        fs::read_to_string(h0.join("sub/deeper/c.bin"))
            .unwrap()
            .len(),
        4096
    );
    assert!(!h0.join("cache").exists(), "cache/ was not excluded");
    assert!(
        !h0.join("sub/scratch.tmp").exists(),
        "*.tmp was not excluded"
    );

    // Written locally first: last.json and the results history.
    let last: Value =
        serde_json::from_str(&fs::read_to_string(lab.state_dir.join("7/last.json")).unwrap())
            .unwrap();
    assert_eq!(last, r);
    let history = fs::read_dir(lab.state_dir.join("7/results"))
        .unwrap()
        .count();
    assert_eq!(history, 3, "three runs, three results");
    // The event was attempted with the real salt-call; masterless, it
    // is not sent (event.send returns False) and that is no failure.
    let sent = report(&first, RUN_REPORT);
    assert_eq!(sent["event_sent"], false, "{}", first.raw);
    let changes = &first.single().changes;
    assert!(
        changes["event_output"]
            .as_str()
            .unwrap_or_default()
            .contains("\"local\": false"),
        "{}",
        first.raw
    );
    // The next apply reports the result (a missed event is recovered).
    let run = lab.apply_backup(3, pillar.clone());
    assert_eq!(report(&run, BACKUP_REPORT)["results"], json!([r]));

    // More runs: rotation keeps 3; an unchanged file is one inode across
    // snapshots, a changed one is not.
    let second = lab.run(7, None);
    assert_ok(&second);
    let r2 = result(&second);
    assert_eq!(r2["outcome"], "ok");
    assert_eq!(r2["transferred"], 0, "nothing changed: {}", second.raw);
    assert_eq!(
        inode(&dest.join("hourly.0/a.txt")),
        inode(&dest.join("hourly.1/a.txt"))
    );
    write(&lab.src.join("sub/b.txt"), "changed content\n");
    for _ in 0..3 {
        let run = lab.run(7, None);
        assert_ok(&run);
        assert_eq!(result(&run)["outcome"], "ok", "{}", run.raw);
    }
    assert_eq!(snapshots(&dest), ["hourly.0", "hourly.1", "hourly.2"]);
    assert_eq!(
        inode(&dest.join("hourly.0/a.txt")),
        inode(&dest.join("hourly.2/a.txt"))
    );
    assert_eq!(
        fs::read_to_string(dest.join("hourly.0/sub/b.txt")).unwrap(),
        "changed content\n"
    );

    // Enough history: the daily level rotates the oldest hourly into daily.0.
    let oldest = inode(&dest.join("hourly.2/a.txt"));
    let daily = lab.run(7, Some("daily"));
    assert_ok(&daily);
    let d = result(&daily);
    assert_eq!(d["outcome"], "ok", "{}", daily.raw);
    assert_eq!(d["rsync_exit"], Value::Null);
    assert_eq!(d["files"], Value::Null);
    assert_eq!(snapshots(&dest), ["daily.0", "hourly.0", "hourly.1"]);
    assert_eq!(inode(&dest.join("daily.0/a.txt")), oldest);
}

#[test]
fn backup_vanished_file_is_a_warning_and_still_rotates() {
    // rsync throttled (the server's `steward:backup:rsync`: rsync with
    // --bwlimit, which the client passes on to the source's sender), so the
    // transfer of a large first file lasts seconds: the test removes a later
    // file of the already-sent file list while it runs; the sender then
    // finds it gone (rsync exit 24).
    let tools = tempfile::Builder::new()
        .prefix("ss-slow-rsync-")
        .tempdir()
        .unwrap();
    let slow = tools.path().join("slow-rsync");
    write(
        &slow,
        "#!/bin/sh\nexec /usr/bin/rsync --bwlimit=256 \"$@\"\n",
    );
    fs::set_permissions(&slow, fs::Permissions::from_mode(0o755)).unwrap();
    let lab = BackupLab::start_with(&format!("    rsync: {}\n", slow.display()));
    let big: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(lab.src.join("aa-big.bin"), &big).unwrap();
    write(&lab.src.join("zz-vanishing.txt"), "gone soon\n");
    lab.set_up(7, "web1");
    let dest = lab.dest("web1");

    let run = std::thread::scope(|s| {
        let running = s.spawn(|| lab.run(7, None));
        // The receiver's temp file of the big file: its transfer is on.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let started = fs::read_dir(dest.join(".sync"))
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
            assert!(Instant::now() < deadline, "no transfer within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        fs::remove_file(lab.src.join("zz-vanishing.txt")).unwrap();
        running.join().unwrap()
    });
    assert_ok(&run);
    let r = result(&run);
    assert_eq!(r["outcome"], "warning", "{}", run.raw);
    assert_eq!(r["rsync_exit"], 24);
    assert!(
        r["error"].as_str().unwrap().contains("vanished"),
        "{}",
        run.raw
    );
    // Kept and rotated.
    assert_eq!(snapshots(&dest), ["hourly.0"]);
    assert_eq!(fs::read(dest.join("hourly.0/aa-big.bin")).unwrap(), big);
    assert!(!dest.join("hourly.0/zz-vanishing.txt").exists());
}

#[test]
fn backup_failures_are_never_success() {
    let lab = BackupLab::start();
    populate(&lab.src);
    let pubkey = lab.set_up(7, "web1");
    let dest = lab.dest("web1");
    assert_eq!(result(&lab.run(7, None))["outcome"], "ok");

    // A partial transfer (rsync 23): a name deeper than rsync's max path.
    // Attention (the state fails); what came is kept and rotated.
    let deep = lab.src.join("deep");
    deep_tree(&deep, 18);
    let run = lab.run(7, None);
    assert_failed(&run);
    let r = result(&run);
    assert_eq!(r["outcome"], "attention", "{}", run.raw);
    assert_eq!(r["rsync_exit"], 23);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("overflows max-path len"),
        "{}",
        run.raw
    );
    assert_eq!(snapshots(&dest), ["hourly.0", "hourly.1"]);
    assert!(dest.join("hourly.0/sub/b.txt").is_file());
    fs::remove_dir_all(&deep).unwrap();
    let before = snapshots(&dest);

    // A source folder that does not exist (on the source, and so in the key).
    let missing = lab.dir.path().join("no-such-folder");
    let run = lab.apply_source(2, vec![grant(7, &missing, &pubkey)]);
    assert_ok(&run);
    assert!(run.comments().contains("folder missing"), "{}", run.raw);
    let host_keys = vec![lab.sshd.host_key()];
    assert_ok(&lab.apply_backup(3, vec![lab.backup(7, &missing, "web1", &host_keys)]));
    let run = lab.run(7, None);
    assert_failed(&run);
    let r = result(&run);
    assert_eq!(r["outcome"], "error", "{}", run.raw);
    assert_ne!(r["rsync_exit"], 0);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("Restricted directory does not exist"),
        "{}",
        run.raw
    );
    assert_eq!(snapshots(&dest), before, "a failed run rotated");
    let last: Value =
        serde_json::from_str(&fs::read_to_string(lab.state_dir.join("7/last.json")).unwrap())
            .unwrap();
    assert_eq!(last, r);

    // The right folder again, but a host key that is not the source's.
    assert_ok(&lab.apply_source(3, vec![grant(7, &lab.src, &pubkey)]));
    let other = lab.dir.path().join("other-host-key");
    keygen(&other, "not-the-source");
    let other_key = fs::read_to_string(other.with_extension("pub")).unwrap();
    assert_ok(&lab.apply_backup(
        4,
        vec![lab.backup(7, &lab.src, "web1", &[other_key.trim().to_owned()])],
    ));
    let run = lab.run(7, None);
    assert_failed(&run);
    let r = result(&run);
    assert_eq!(r["outcome"], "error", "{}", run.raw);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("Host key verification failed"),
        "{}",
        run.raw
    );
    assert_eq!(snapshots(&dest), before);
    // Nowhere is host key checking turned off.
    let conf = fs::read_to_string(lab.state_dir.join("7/rsnapshot.conf")).unwrap();
    assert!(!conf.contains("StrictHostKeyChecking=no"), "{conf}");
    assert!(!conf.contains("StrictHostKeyChecking=accept-new"), "{conf}");
}

#[test]
fn backup_restricted_key_reads_only_its_folder() {
    let lab = BackupLab::start();
    populate(&lab.src);
    std::os::unix::fs::symlink("/etc", lab.src.join("escape")).unwrap();
    lab.set_up(7, "web1");
    let outside = lab.dir.path().join("outside");
    fs::create_dir_all(&outside).unwrap();

    // No command but rsync: no shell, no cat, no forwarding.
    let o = lab.ssh(&["cat", "/etc/hostname"]);
    assert!(!o.status.success() && o.stdout.is_empty(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not run rsync"),
        "{}",
        text(&o)
    );
    let o = lab.ssh(&[]);
    assert!(!o.status.success() && o.stdout.is_empty(), "{}", text(&o));
    let o = Command::new("ssh")
        .args(lab.ssh_args())
        .args(["-W", &format!("127.0.0.1:{}", lab.sshd.port)])
        .arg("root@127.0.0.1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "stdio forwarding allowed: {}",
        text(&o)
    );

    // rsync outside the folder: by .., by an absolute path (it is the
    // folder's), through a symlink.
    let remote = |p: &str| format!("root@127.0.0.1:{p}");
    for path in ["../", "/etc/hostname", "/escape/hostname", "/escape/"] {
        let target = outside.join("got");
        let o = lab.rsync(&[&remote(path), target.to_str().unwrap()]);
        assert!(!o.status.success(), "{path}: {}", text(&o));
        assert!(!target.exists(), "{path} was copied: {}", text(&o));
    }
    // The folder itself can be read; its symlink comes as a symlink.
    let o = lab.rsync(&[&remote("/"), outside.join("copy/").to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(outside.join("copy/sub/b.txt").is_file());
    // (the link itself, not what it points to)
    assert!(outside.join("copy/escape").is_symlink());
    assert_eq!(
        fs::read_link(outside.join("copy/escape")).unwrap(),
        Path::new("/etc")
    );

    // No writing: pushing into the folder is refused, nothing lands.
    write(&outside.join("planted"), "planted\n");
    let o = lab.rsync(&[outside.join("planted").to_str().unwrap(), &remote("/")]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("read-only"),
        "{}",
        text(&o)
    );
    assert!(!lab.src.join("planted").exists());
}

#[test]
fn backup_refuses_foreign_and_shared_destinations() {
    let lab = BackupLab::start();
    populate(&lab.src);
    let keys = vec![lab.sshd.host_key()];

    // Not ours: a non-empty folder without our marker.
    let foreign = lab.dest("foreign");
    write(&foreign.join("precious.txt"), "keep me\n");
    let run = lab.apply_backup(1, vec![lab.backup(7, &lab.src, "foreign", &keys)]);
    assert_failed(&run);
    assert!(
        run.comments().contains(&foreign.display().to_string())
            && run.comments().contains("not empty"),
        "{}",
        run.raw
    );
    assert_eq!(dir_names(&foreign), ["precious.txt"]);
    assert!(!lab.state_dir.join("7/rsnapshot.conf").exists());
    // The pubkey is reported even by a refused apply.
    assert!(report(&run, BACKUP_REPORT)["pubkey"]
        .as_str()
        .unwrap()
        .starts_with("ssh-ed25519 "));

    // Another backup's folder.
    assert_ok(&lab.apply_backup(2, vec![lab.backup(8, &lab.src, "eight", &keys)]));
    let run = lab.apply_backup(3, vec![lab.backup(7, &lab.src, "eight", &keys)]);
    assert_failed(&run);
    assert!(
        run.comments().contains("belongs to backup 8"),
        "{}",
        run.raw
    );
    assert_eq!(
        fs::read_to_string(lab.dest("eight").join(".salt-steward-backup")).unwrap(),
        "8\n"
    );

    // Two backups into one folder, in one pillar.
    let run = lab.apply_backup(
        4,
        vec![
            lab.backup(7, &lab.src, "shared", &keys),
            lab.backup(9, &lab.src, "shared", &keys),
        ],
    );
    assert_failed(&run);
    assert!(run.comments().contains("share dest_folder"), "{}", run.raw);
    assert!(!lab.dest("shared").exists(), "a refused pillar wrote");

    // An empty existing folder is taken (and marked).
    fs::create_dir_all(lab.dest("empty")).unwrap();
    assert_ok(&lab.apply_backup(5, vec![lab.backup(7, &lab.src, "empty", &keys)]));
    assert_eq!(
        fs::read_to_string(lab.dest("empty").join(".salt-steward-backup")).unwrap(),
        "7\n"
    );

    // A pillar for another minion is refused.
    let run = lab.server.apply(
        "steward.backup",
        &json!({"steward": {"backup": {"revision": 6, "target": "backup-2", "backups": []}}}),
    );
    assert_failed(&run);
    assert!(run.comments().contains("backup-2"), "{}", run.raw);
    assert!(lab.state_dir.join("7/rsnapshot.conf").exists());
}

#[test]
fn backup_configtest_failure_keeps_the_old_config() {
    let lab = BackupLab::start();
    populate(&lab.src);
    lab.set_up(7, "web1");
    let keys = vec![lab.sshd.host_key()];
    let good = vec![lab.backup(7, &lab.src, "web1", &keys)];
    let conf_path = lab.state_dir.join("7/rsnapshot.conf");
    let conf = fs::read(&conf_path).unwrap();
    let cron = fs::read(&lab.cron_file).unwrap();

    // An ssh that is not there (a setting, here from the pillar: the
    // server's minion config does not set it): the candidates name it,
    // rsnapshot's configtest refuses them. Backup 8 is new in the same apply.
    let src2 = lab.dir.path().join("src2");
    fs::create_dir_all(&src2).unwrap();
    let run = lab.server.apply(
        "steward.backup",
        &json!({"steward": {"backup": {
            "revision": 3, "target": SERVER,
            "ssh": "/nonexistent/ssh",
            "backups": [good[0].clone(), lab.backup(8, &src2, "eight", &keys)],
        }}}),
    );
    assert_failed(&run);
    let comment = run.comments();
    assert!(
        comment.contains("configtest") && comment.contains("/nonexistent/ssh"),
        "{}",
        run.raw
    );
    assert_eq!(
        fs::read(&conf_path).unwrap(),
        conf,
        "the live config changed"
    );
    assert!(!lab.state_dir.join("8/rsnapshot.conf").exists());
    assert_eq!(fs::read(&lab.cron_file).unwrap(), cron);
    let leftovers: Vec<String> = [
        dir_names(&lab.state_dir.join("7")),
        dir_names(&lab.state_dir.join("8")),
    ]
    .concat()
    .into_iter()
    .filter(|n| n.contains("candidate") || n.ends_with(".new"))
    .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The live config still runs, and the good pillar is still the applied one.
    let run = lab.run(7, None);
    assert_eq!(result(&run)["outcome"], "ok", "{}", run.raw);
    let again = lab.apply_backup(2, good);
    assert_ok(&again);
    assert!(!again.changed(), "{}", again.raw);
}

#[test]
fn backup_cron_lists_active_runnable_and_removal_keeps_snapshots() {
    let lab = BackupLab::start();
    populate(&lab.src);
    let pubkey = lab.set_up(7, "web1");
    let keys = vec![lab.sshd.host_key()];
    let mut inactive = lab.backup(8, &lab.src, "eight", &keys);
    inactive["active"] = json!(false);
    let mut weekly = lab.backup(9, &lab.src, "nine", &[]);
    weekly["retain"] = json!([
        {"level": "hourly", "count": 6, "cron": "0 */4 * * *"},
        {"level": "weekly", "count": 4, "cron": "0 3 * * 1"},
    ]);
    let mut seven = lab.backup(7, &lab.src, "web1", &keys);
    seven["retain"] = json!([
        {"level": "hourly", "count": 6, "cron": "0 */4 * * *"},
        {"level": "daily", "count": 7, "cron": "30 3 * * *"},
        {"level": "weekly", "count": 4, "cron": "0 3 * * 1"},
        {"level": "monthly", "count": 3, "cron": "30 2 1 * *"},
    ]);
    let run = lab.apply_backup(5, vec![seven.clone(), inactive, weekly]);
    assert_ok(&run);
    let wrapper = lab.state_dir.join("steward-backup-run");
    let w = wrapper.display();
    assert_eq!(
        fs::read_to_string(&lab.cron_file).unwrap(),
        format!(
            "# Managed by salt-steward (steward.backup): every backup this server pulls,\n\
             # one line per level; do not edit, the next apply replaces it.\n\
             SHELL=/bin/sh\n\
             PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
             0 */4 * * * root {w} --id 7 --level hourly\n\
             30 3 * * * root {w} --id 7 --level daily\n\
             0 3 * * 1 root {w} --id 7 --level weekly\n\
             30 2 1 * * root {w} --id 7 --level monthly\n"
        )
    );
    assert!(
        lab.state_dir.join("8/rsnapshot.conf").exists(),
        "inactive: config kept"
    );
    assert!(lab.state_dir.join("9/rsnapshot.conf").exists());
    let c = run.comments();
    assert!(c.contains("inactive") && c.contains("[8]"), "{c}");
    assert!(c.contains("not runnable yet") && c.contains("[9]"), "{c}");
    // The wrapper runs with the minion's Python.
    let head = fs::read_to_string(&wrapper).unwrap();
    let interpreter = Path::new(head.lines().next().unwrap().strip_prefix("#!").unwrap());
    assert_eq!(
        interpreter.parent().unwrap().canonicalize().unwrap(),
        crate::support::salt::salt_bin_dir().canonicalize().unwrap(),
        "{}",
        interpreter.display()
    );
    // The cron line's command works as cron would run it.
    let o = Command::new(&wrapper)
        .args(["--id", "7", "--level", "hourly"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(o.stdout.is_empty(), "cron would mail: {}", text(&o));
    let dest = lab.dest("web1");
    assert_eq!(snapshots(&dest), ["hourly.0"]);
    let last = fs::read_to_string(lab.state_dir.join("7/last.json")).unwrap();

    // Backup 7 removed: its cron lines and config go; snapshots, marker and
    // results stay. Its source line goes too.
    let run = lab.apply_backup(6, vec![lab.backup(8, &lab.src, "eight", &keys)]);
    assert_ok(&run);
    assert_eq!(
        run.single().changes["removed"],
        json!([7, 9]),
        "{}",
        run.raw
    );
    let cron = fs::read_to_string(&lab.cron_file).unwrap();
    assert!(!cron.contains("--id 7"), "{cron}");
    assert!(cron.contains("--id 8 --level hourly"), "{cron}");
    assert!(!lab.state_dir.join("7/rsnapshot.conf").exists());
    assert!(!lab.state_dir.join("7/backup.json").exists());
    assert_eq!(
        fs::read_to_string(lab.state_dir.join("7/last.json")).unwrap(),
        last
    );
    assert_eq!(snapshots(&dest), ["hourly.0"]);
    assert!(dest.join("hourly.0/a.txt").is_file());
    assert!(dest.join(".salt-steward-backup").is_file());
    assert_eq!(report(&run, BACKUP_REPORT)["results"], json!([]));
    let run = lab.run(7, None);
    assert_failed(&run);
    assert!(run.comments().contains("not configured"), "{}", run.raw);

    let run = lab.apply_source(2, vec![grant(8, &lab.src, &pubkey)]);
    assert_ok(&run);
    assert_eq!(run.single().changes["removed"], json!([7]), "{}", run.raw);
    let ak = fs::read_to_string(&lab.sshd.authorized_keys).unwrap();
    assert!(
        !ak.contains("steward-backup-7") && ak.contains("steward-backup-8"),
        "{ak}"
    );
    // An empty pubkey: skipped, said so, nothing written for it.
    let run = lab.apply_source(
        3,
        vec![grant(8, &lab.src, &pubkey), grant(10, &lab.src, "")],
    );
    assert_ok(&run);
    assert!(
        run.comments().contains("skipped") && run.comments().contains("[10]"),
        "{}",
        run.raw
    );
    assert!(!fs::read_to_string(&lab.sshd.authorized_keys)
        .unwrap()
        .contains("steward-backup-10"));
}

/// `levels` nested directories of 250-character names under `top`: deeper
/// than PATH_MAX, made relative to each parent's descriptor.
fn deep_tree(top: &Path, levels: usize) {
    fs::create_dir_all(top).unwrap();
    let script = "import os, sys\n\
                  fd = os.open(sys.argv[1], os.O_RDONLY)\n\
                  for _ in range(int(sys.argv[2])):\n\
                  \x20   os.mkdir('d' * 250, dir_fd=fd)\n\
                  \x20   sub = os.open('d' * 250, os.O_RDONLY, dir_fd=fd)\n\
                  \x20   os.close(fd)\n\
                  \x20   fd = sub\n";
    let o = Command::new(crate::support::netns::python3())
        .arg("-c")
        .arg(script)
        .arg(top)
        .arg(levels.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn text(o: &Output) -> String {
    crate::support::text(o)
}

/// The dispatcher's path through a real master: `salt backup-1 state.apply
/// steward.backup …` on a salt-minion (the server), the source's grant by a
/// masterless source, `steward.backup.run` through the master; the wrapper's
/// `salt-call event.send` reaches the master's bus with the result, from
/// the server's authenticated minion id.
#[test]
fn backup_result_event_reaches_a_real_master() {
    use crate::support::salt::{salt_states_dir, SaltHarness};
    use crate::support::{eventually, LineChild, MasterOptions, T};

    let sshd = Sshd::start();
    let dir = tempfile::Builder::new()
        .prefix("ss-backup-")
        .tempdir()
        .unwrap();
    let src = dir.path().join("src");
    let (files, size) = populate(&src);
    let state_dir = dir.path().join("state");
    let mut h = SaltHarness::start_with(MasterOptions {
        file_roots: vec![salt_states_dir()],
        ..MasterOptions::default()
    });
    h.start_minion_with(
        "backup",
        SERVER,
        &format!(
            "steward:\n  backup:\n    state_dir: {}\n    cron_file: {}\n",
            state_dir.display(),
            dir.path().join("cron.d/salt-steward-backup").display()
        ),
        |_| {},
    );
    eventually("the backup server answers", || {
        let out = h.master_cmd("salt", &[SERVER, "test.ping", "--out=json", "-t", "5"]);
        if String::from_utf8_lossy(&out.stdout).contains("true") {
            Ok(())
        } else {
            Err(crate::support::text(&out))
        }
    });
    let apply = |mods: &str, pillar: Value| -> Value {
        let out = h.master_cmd(
            "salt",
            &[
                SERVER,
                "state.apply",
                mods,
                &format!("pillar={pillar}"),
                "--out=json",
                "-t",
                "120",
            ],
        );
        let text = crate::support::text(&out);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{text}"));
        let states = v[SERVER].as_object().unwrap_or_else(|| panic!("{text}"));
        assert_eq!(states.len(), 1, "{text}");
        states.values().next().unwrap().clone()
    };
    let last_json = |state: &Value, prefix: &str| -> Value {
        let comment = state["comment"].as_str().unwrap();
        let line = comment
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no report in {state}"));
        serde_json::from_str(line).unwrap()
    };
    let backup_pillar = |revision: u64, known_hosts: Vec<String>| {
        json!({"steward": {"backup": {"revision": revision, "target": SERVER, "backups": [{
            "id": 7,
            "source": {"host": "127.0.0.1", "port": sshd.port, "user": "root"},
            "source_folder": src, "dest_folder": dir.path().join("backups/web1"),
            "excludes": ["cache/", "*.tmp"], "exclude_proc_sys": false, "active": true,
            "known_hosts": known_hosts,
            "retain": [{"level": "hourly", "count": 6, "cron": "0 */4 * * *"}],
        }]}}})
    };

    let first = apply("steward.backup", backup_pillar(1, vec![]));
    assert_eq!(first["result"], json!(true), "{first}");
    let pubkey = last_json(&first, BACKUP_REPORT)["pubkey"]
        .as_str()
        .unwrap()
        .to_owned();
    let source = LocalMinion::new(
        SOURCE,
        &format!(
            "steward:\n  backup_source:\n    authorized_keys: {}\n    host_keys_dir: {}\n",
            sshd.authorized_keys.display(),
            sshd.host_keys_dir.display()
        ),
    );
    let run = source.apply(
        "steward.backup_source",
        &json!({"steward": {"backup_source": {"revision": 1, "target": SOURCE,
            "authorized": [grant(7, &src, &pubkey)]}}}),
    );
    assert_ok(&run);
    let host_keys = strings(&report(&run, SOURCE_REPORT)["host_keys"]);
    let second = apply("steward.backup", backup_pillar(2, host_keys));
    assert_eq!(second["result"], json!(true), "{second}");

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/support/salt_events.py"
    );
    let mut cmd = Command::new(h.python());
    cmd.arg(script)
        .arg("listen")
        .arg(h.master_config())
        .arg("steward/v1/backup/result")
        .arg("1")
        .arg("120");
    let mut listener = LineChild::spawn(cmd);
    listener.wait_line("salt listener READY", T, |l| l == "READY");

    let state = apply(
        "steward.backup.run",
        json!({"steward": {"backup_run": {"target": SERVER, "id": 7}}}),
    );
    assert_eq!(state["result"], json!(true), "{state}");
    let ran = last_json(&state, RUN_REPORT);
    assert_eq!(ran["event_sent"], json!(true), "{state}");
    let result = ran["result"].clone();
    assert_eq!(result["outcome"], "ok", "{state}");
    assert_eq!(result["files"], files);
    assert_eq!(result["size"], size);

    let line = listener.wait_line("the result event", T, |l| l.starts_with('{'));
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["tag"], "steward/v1/backup/result");
    // salt-call event.send: the master fires the minion's whole load, its
    // authenticated `id` beside our `data` (to which salt-call adds its
    // `__pub_*` keys).
    assert_eq!(event["data"]["id"], SERVER, "{event}");
    let mut data = event["data"]["data"].as_object().unwrap().clone();
    data.retain(|k, _| !k.starts_with("__pub_"));
    assert_eq!(Value::Object(data), result, "{event}");
}
