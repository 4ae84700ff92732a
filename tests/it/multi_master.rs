//! Issue #16 with real masters: two signing masters sharing the signing
//! pair, a daemon on each (`cluster.daemon_id` d1, d2), one PostgreSQL
//! registry, and a failover minion. A change is applied once, through the
//! master the minion is on (counted in both masters' job caches); each
//! master's bus carries each notification once (one notifier cursor per
//! daemon); when that master stops, the minion fails over, its start event
//! on the other master records where it is; a run in flight when the master
//! died is recorded by its jid through the other daemon (handed back by
//! d1, found on the minion by d2), and the next change goes through the
//! other daemon, once. Two daemons on one master: one killed mid-run, the
//! other completes that run under its jid once the lease lapses.

use std::path::Path;
use std::time::Duration;

use salt_steward::registry::store::ClusterStore as _;
use salt_steward::registry::DbStore;
use serde_json::Value;

use crate::accept::{bundle, signing_master_serving, wait_listed, wait_ping, wait_status};
use crate::dispatch::state_apply_jobs;
use crate::failover::{install_failover_bundle, share_signing_pair};
use crate::registry::TestDb;
use crate::support::salt::{salt_states_dir, SaltHarness};
use crate::support::{
    cli, eventually_within, run_ok, start_daemon, steward_config, watch_steward, LineChild,
};

const SOURCE: &str = "src01.example.org";
const CONVERGE: Duration = Duration::from_secs(120);

fn steward_json(cfg: &Path, args: &[&str]) -> Value {
    let out = run_ok(cli(cfg, args));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The `steward.backup_source` jobs of `minion` in `h`'s job cache.
fn source_jobs(h: &SaltHarness, minion: &str) -> Vec<String> {
    state_apply_jobs(h, minion)
        .into_iter()
        .filter(|(_, j)| j["Arguments"].to_string().contains("steward.backup_source"))
        .map(|(jid, _)| jid)
        .collect()
}

/// Waits until the source's `backup_source` target is done at its desired
/// revision, the dispatcher having read every change; returns the target.
fn converged(cfg: &Path) -> Value {
    eventually_within("the source's target converged", CONVERGE, || {
        // Every change read first: the target read after it reflects them.
        let unread = steward_json(cfg, &["outbox", "status", "--json"]);
        let dispatch_unread = unread
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["consumer"] == "dispatch")
            .map_or(-1, |c| c["pending"].as_i64().unwrap_or(-1));
        let all = steward_json(cfg, &["dispatch", "list", "--json"]);
        let t = all
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["server"] == SOURCE && t["state"] == "backup_source")
            .cloned();
        match t {
            Some(t)
                if t["status"] == "done"
                    && t["applied"] == t["desired"]
                    && dispatch_unread == 0 =>
            {
                Ok(t)
            }
            other => Err(format!("{other:?}, dispatch unread {dispatch_unread}")),
        }
    })
}

/// The daemons' shared settings: `masters`, the PostgreSQL registry, the
/// first master's key store, a quick dispatcher (`job_timeout` seconds,
/// `debounce_ms`), and the cluster section of daemon `daemon_id` beside
/// master `master_id`.
pub(crate) fn cluster_settings(
    masters: &[&SaltHarness],
    db_url: &str,
    keys_root: &Path,
    debounce_ms: u64,
    job_timeout: u64,
    daemon_id: &str,
    master_id: &str,
) -> String {
    let masters: Vec<String> = masters
        .iter()
        .map(|h| format!("\"127.0.0.1:{}\"", h.ret_port))
        .collect();
    format!(
        "masters: [{}]\n\
         registry: {db_url}\n\
         keys: {{dir: {}/keys, pool_size: 8}}\n\
         dispatch:\n  debounce_ms: {debounce_ms}\n  job_timeout: {job_timeout}\n  retry_base_ms: 1000\n\
         cluster:\n  daemon_id: {daemon_id}\n  master_id: {master_id}\n  heartbeat_secs: 1\n  dead_after_beats: 3\n",
        masters.join(", "),
        keys_root.display()
    )
}

/// `server add NAME --model m --internal-ip 127.0.0.1`: its minion id.
pub(crate) fn add_source(cfg: &Path, name: &str) -> String {
    let src = steward_json(
        cfg,
        &[
            "server",
            "add",
            name,
            "--model",
            "m",
            "--internal-ip",
            "127.0.0.1",
            "--json",
        ],
    );
    src["minion_id"].as_str().unwrap().to_owned()
}

/// Starts source `name`'s minion `id` on `h` from its bundle, with the
/// `steward.backup_source` files under `dir` (its SSH host key too). With
/// `failover`, the bundle lists every master (`prefer_second`: the other
/// way round) and the minion checks its master with
/// support/status_master.py (Salt's own flaps when the masters share
/// 127.0.0.1), in a module directory of its own (`module_dirs`).
pub(crate) fn start_source_minion(
    h: &mut SaltHarness,
    cfg: &Path,
    name: &str,
    id: &str,
    dir: &Path,
    failover: Option<bool>,
) {
    std::fs::create_dir_all(dir.join("hk")).unwrap();
    std::fs::create_dir_all(dir.join("ak")).unwrap();
    crate::support::sshd::keygen(&dir.join("hk/ssh_host_ed25519_key"), name);
    let settings = format!(
        "steward:\n  backup_source:\n    authorized_keys: {}\n    host_keys_dir: {}\n",
        dir.join("ak/root").display(),
        dir.join("hk").display()
    );
    let label = name.split('.').next().unwrap_or(name).to_owned();
    let b = bundle(h, cfg, name, &format!("{label}.tgz"));
    h.start_minion_with(&label, id, &settings, |d: &Path| {
        let Some(prefer_second) = failover else {
            crate::support::salt::install_bundle(&b, d);
            return;
        };
        install_failover_bundle(&b, d);
        if prefer_second {
            let conf = d.join("minion.d/steward.conf");
            let text = std::fs::read_to_string(&conf).unwrap();
            let mut lines: Vec<&str> = text.lines().collect();
            let at = lines.iter().position(|l| *l == "master:").unwrap();
            lines.swap(at + 1, at + 2);
            std::fs::write(&conf, lines.join("\n") + "\n").unwrap();
        }
        let modules = d.join("test-modules");
        std::fs::create_dir_all(&modules).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/status_master.py"),
            modules.join("status.py"),
        )
        .unwrap();
        std::fs::write(
            d.join("minion.d/zz-test-modules.conf"),
            format!("module_dirs: [{}]\n", modules.display()),
        )
        .unwrap();
    });
}

/// The `steward/v1/backup/created` notifications a watcher saw.
fn created(w: &LineChild) -> Vec<String> {
    w.seen
        .iter()
        .filter(|l| l.contains("steward/v1/backup/created"))
        .cloned()
        .collect()
}

#[test]
fn a_change_goes_once_through_the_master_its_minion_is_on_and_follows_a_failover() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::postgres_required());
    let mut h1 = signing_master_serving(vec![salt_states_dir()]);
    let mut h2 = signing_master_serving(vec![salt_states_dir()]);
    let settings =
        |d: &str, m: &str| cluster_settings(&[&h1, &h2], &db.url, h1.root(), 300, 60, d, m);
    let cfg1 = steward_config(&h1, &[], &settings("d1", "m1"));
    let cfg2 = steward_config(&h2, &[], &settings("d2", "m2"));
    share_signing_pair(&h1, &cfg1, &mut h2, &cfg2);
    let store = rt.block_on(DbStore::open(&db.url)).unwrap();

    run_ok(cli(&cfg1, &["model", "add", "m"]));
    let _d1 = start_daemon(&cfg1);
    let _d2 = start_daemon(&cfg2);
    let id = add_source(&cfg1, SOURCE);
    for b in ["bk01.example.org", "bk02.example.org", "bk03.example.org"] {
        run_ok(cli(&cfg1, &["server", "add", b, "--model", "m"]));
    }
    let root = h1.root().to_owned();
    start_source_minion(&mut h1, &cfg1, SOURCE, &id, &root, Some(false));
    wait_status(&cfg1, SOURCE, "online");
    // Accepted on both masters: d2 installs the key d1 verified.
    wait_listed(&h2, "minions", &id);
    eventually_within("the minion seen on m1", CONVERGE, || {
        match rt.block_on(store.presence(&id)).unwrap() {
            Some(p) if p.master == "m1" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let (daemons, _) = rt.block_on(store.daemons()).unwrap();
    let ids: Vec<_> = daemons.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["d1", "d2"], "both daemons registered");

    // A change: applied once, through m1 (the minion is there).
    let mut w1 = watch_steward(&cfg1);
    let mut w2 = watch_steward(&cfg2);
    run_ok(cli(
        &cfg1,
        &[
            "backup",
            "add",
            SOURCE,
            "/srv/a",
            "bk01.example.org",
            "/b/a",
            "--ssh-host",
            "127.0.0.1",
        ],
    ));
    let t = converged(&cfg1);
    assert_eq!(source_jobs(&h1, &id).len(), 1, "one run through m1: {t}");
    // Where each target goes: the source's minion on m1; the backup
    // server has no minion anywhere.
    assert_eq!(t["location"], "m1", "{t}");
    let list = String::from_utf8(run_ok(cli(&cfg1, &["dispatch", "list"])).stdout).unwrap();
    assert!(
        list.lines()
            .any(|l| l.starts_with(SOURCE) && l.contains("\tm1\t")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with("bk01.example.org") && l.contains("\tlocation unknown\t")),
        "{list}"
    );
    assert_eq!(
        source_jobs(&h2, &id),
        Vec::<String>::new(),
        "none through m2"
    );
    // Each master's bus carried the notification (one cursor per daemon).
    for w in [&mut w1, &mut w2] {
        w.seen_or_wait_line("backup/created", CONVERGE, |l| {
            l.contains("steward/v1/backup/created")
        });
    }
    let status = steward_json(&cfg1, &["outbox", "status", "--json"]);
    let consumers: Vec<_> = status
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["consumer"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        consumers.contains(&"notify-d1".to_owned()) && consumers.contains(&"notify-d2".to_owned()),
        "{status}"
    );

    // A run in flight when m1 dies: the minion is busy with a state run of
    // its own, so the dispatched state.apply (queue=True) waits behind it.
    // m1 stops; d1 hands the run back; the minion fails over to m2 and says
    // so there (its start event); d2 takes the run over under its jid and
    // finds it on the minion (it still runs it, then keeps its return with
    // `cache_jobs` while it drops the return meant for m1): recorded by jid,
    // nothing published again.
    busy(&h1, &id);
    run_ok(cli(
        &cfg2,
        &[
            "backup",
            "add",
            SOURCE,
            "/srv/b",
            "bk02.example.org",
            "/b/b",
            "--ssh-host",
            "127.0.0.1",
        ],
    ));
    let running = eventually_within(
        "the run in flight through m1",
        CONVERGE,
        || match source_target(&rt, &store) {
            Some(t)
                if t.status.as_str() == "running" && t.lease_holder.as_deref() == Some("d1") =>
            {
                Ok(t)
            }
            other => Err(format!("{other:?}")),
        },
    );
    let jid = running.last_jid.clone().unwrap();
    // Published through m1 (a claim comes just before its publish).
    eventually_within("the run published through m1", CONVERGE, || {
        let jobs = source_jobs(&h1, &id);
        if jobs.contains(&jid) {
            Ok(())
        } else {
            Err(format!("{jobs:?}"))
        }
    });
    let stopped = std::time::Instant::now();
    h1.stop_master();
    eventually_within("the minion seen on m2", CONVERGE, || {
        match rt.block_on(store.presence(&id)).unwrap() {
            Some(p) if p.master == "m2" && p.daemon_id == "d2" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let seen_on_m2 = stopped.elapsed();
    let taken = eventually_within(
        "the run taken over by d2",
        CONVERGE,
        || match source_target(&rt, &store) {
            Some(t) if t.lease_holder.as_deref() == Some("d2") || t.status.as_str() == "done" => {
                Ok(stopped.elapsed())
            }
            other => Err(format!("{other:?}")),
        },
    );
    let t2 = converged(&cfg2);
    let recorded = stopped.elapsed();
    assert_eq!(t2["last_jid"], jid.as_str(), "recorded by its jid: {t2}");
    assert!(t2["desired"].as_i64() > t["desired"].as_i64(), "{t2}");
    // Through m2, at most the same jid again (a minion that had not
    // started it runs it once; one that had drops the duplicate), never a
    // second run under a new one.
    let through_m2 = source_jobs(&h2, &id);
    assert!(
        through_m2.iter().all(|j| *j == jid),
        "{through_m2:?}, {jid}: {t2}"
    );

    // The next change goes through m2, once.
    run_ok(cli(
        &cfg2,
        &[
            "backup",
            "add",
            SOURCE,
            "/srv/c",
            "bk03.example.org",
            "/b/c",
            "--ssh-host",
            "127.0.0.1",
        ],
    ));
    let t3 = converged(&cfg2);
    eprintln!(
        "failover: m1 stopped → minion seen on m2 after {:.1} s → the run in flight taken over by d2 after {:.1} s, recorded by jid after {:.1} s → the next change applied through m2 after {:.1} s",
        seen_on_m2.as_secs_f64(),
        taken.as_secs_f64(),
        recorded.as_secs_f64(),
        stopped.elapsed().as_secs_f64()
    );
    wait_ping(&cfg2, &id);
    assert!(t3["desired"].as_i64() > t2["desired"].as_i64(), "{t3}");
    let new_runs: Vec<_> = source_jobs(&h2, &id)
        .into_iter()
        .filter(|j| *j != jid)
        .collect();
    assert_eq!(new_runs.len(), 1, "one run through m2: {t3}");
    // m2's bus carried the later notifications, once each; no duplicates
    // of the first.
    w2.seen_or_wait_line("third backup/created", CONVERGE, |l| {
        l.contains("steward/v1/backup/created") && l.contains("/srv/c")
    });
    assert_eq!(created(&w2).len(), 3, "{:#?}", created(&w2));

    // m1 back: its job cache still holds the one run, the second never
    // went through it.
    h1.restart_master();
    h1.wait_req_ready();
    assert_eq!(
        source_jobs(&h1, &id).len(),
        2,
        "still the two runs published through m1"
    );
}

/// Makes `minion` busy with a state run of its own for 25 s (through `h`'s
/// master): a dispatched state.apply (queue=True) waits behind it, so the
/// run stays in flight for a while.
fn busy(h: &SaltHarness, minion: &str) {
    let out = h.master_cmd(
        "salt",
        &[
            "--async",
            minion,
            "state.single",
            "cmd.run",
            "name=sleep 25",
        ],
    );
    crate::support::assert_ok(&out);
    eventually_within("the minion busy", CONVERGE, || {
        let out = h.master_cmd(
            "salt",
            &[minion, "saltutil.is_running", "state.single", "--out=json"],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("\"jid\"") {
            Ok(())
        } else {
            Err(text)
        }
    });
}

/// The source's `backup_source` target as the registry has it.
fn source_target(
    rt: &tokio::runtime::Runtime,
    store: &DbStore,
) -> Option<salt_steward::registry::DispatchTarget> {
    use salt_steward::registry::store::DispatchStore as _;
    rt.block_on(store.dispatch_targets(None))
        .unwrap()
        .into_iter()
        .find(|t| t.server == SOURCE && t.state.as_str() == "backup_source")
}

/// Two daemons on one master (the daemon's own HA) and one PostgreSQL
/// registry: the daemon running a change is killed mid-run; once its lease
/// lapses, the other takes the run over under the same jid, finds the
/// minion's return in the job cache and records it — the state ran once.
#[test]
fn a_run_of_a_killed_daemon_is_completed_by_the_other_under_its_jid() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::postgres_required());
    let h = signing_master_serving(vec![salt_states_dir()]);
    let cfg1 = steward_config(
        &h,
        &[],
        &cluster_settings(&[&h], &db.url, h.root(), 300, 20, "d1", "m1"),
    );
    let cfg2 = h.root().join("steward-d2.yaml");
    std::fs::write(
        &cfg2,
        std::fs::read_to_string(&cfg1)
            .unwrap()
            .replace("daemon_id: d1", "daemon_id: d2"),
    )
    .unwrap();
    let store = rt.block_on(DbStore::open(&db.url)).unwrap();
    run_ok(cli(&cfg1, &["model", "add", "m"]));
    let mut daemons = [Some(start_daemon(&cfg1)), Some(start_daemon(&cfg2))];
    let id = add_source(&cfg1, SOURCE);
    run_ok(cli(
        &cfg1,
        &["server", "add", "bk01.example.org", "--model", "m"],
    ));
    let root = h.root().to_owned();
    let mut h = h;
    start_source_minion(&mut h, &cfg1, SOURCE, &id, &root, None);
    wait_status(&cfg1, SOURCE, "online");

    // The minion is busy with a state run of its own for a while: the
    // dispatched state.apply (queue=True) waits behind it, so the run is in
    // flight long enough to kill its daemon.
    busy(&h, &id);
    run_ok(cli(
        &cfg1,
        &[
            "backup",
            "add",
            SOURCE,
            "/srv/a",
            "bk01.example.org",
            "/b/a",
            "--ssh-host",
            "127.0.0.1",
        ],
    ));
    let running = eventually_within("the run in flight", CONVERGE, || {
        match source_target(&rt, &store) {
            Some(t) if t.status.as_str() == "running" && t.lease_holder.is_some() => Ok(t),
            other => Err(format!("{other:?}")),
        }
    });
    let holder = running.lease_holder.clone().unwrap();
    let jid = running.last_jid.clone().unwrap();
    let (killed, other) = if holder == "d1" { (0, 1) } else { (1, 0) };
    let mut d = daemons[killed].take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    d.wait_exit(Duration::from_secs(15));
    let killed_at = std::time::Instant::now();

    // The other daemon takes the run over once the lease lapses, under the
    // same jid, and records the return the minion made meanwhile.
    let done = eventually_within(
        "the run completed by the other daemon",
        CONVERGE * 2,
        || match source_target(&rt, &store) {
            Some(t) if t.status.as_str() == "done" => Ok(t),
            other => Err(format!("{other:?}")),
        },
    );
    eprintln!(
        "daemon {holder} killed mid-run; the other recorded job {jid} after {:.1} s",
        killed_at.elapsed().as_secs_f64()
    );
    assert_eq!(done.last_jid.as_deref(), Some(jid.as_str()), "{done:?}");
    assert!(
        done.applied >= running.running_revision.unwrap(),
        "{done:?}"
    );
    let jobs = source_jobs(&h, &id);
    assert_eq!(jobs, vec![jid.clone()], "the state ran once, under its jid");
    let show = steward_json(&cfg1, &["dispatch", "show", SOURCE, "--json"]);
    let recorded: Vec<_> = show["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["jid"] == jid.as_str())
        .map(|r| r["outcome"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(recorded.contains(&"done".to_owned()), "{show}");
    drop(daemons[other].take());
}
