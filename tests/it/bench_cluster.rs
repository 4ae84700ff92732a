//! The several-masters benchmark of issue #16, run by `scripts/bench-cluster`
//! (its header says what is measured): `#[ignore]`d, so the test suite never
//! runs it. Two signing masters sharing the signing pair, a daemon beside
//! each (`cluster.daemon_id` d1, d2), one PostgreSQL registry, BENCH_MINIONS
//! failover minions (half listing m1 first, half m2: each master has its
//! share), and BENCH_CHANGES backups written in one burst, each one a change
//! of its source's `steward.backup_source` target. Measured: time until every
//! source target has converged, runs per target, which master each run went
//! through (the one its minion is on), and duplicates (a change applied
//! twice, or one jid through both masters). Writes the result as JSON to
//! BENCH_OUT.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use salt_steward::registry::store::{ClusterStore as _, DispatchStore as _};
use salt_steward::registry::DbStore;
use serde_json::{json, Value};

use crate::accept::{signing_master_serving, wait_status};
use crate::dispatch::state_apply_jobs;
use crate::failover::share_signing_pair;
use crate::multi_master::{add_source, cluster_settings, start_source_minion};
use crate::registry::TestDb;
use crate::support::salt::{salt_states_dir, SaltHarness};
use crate::support::{cli, eventually_within, run_ok, start_daemon, steward_config};

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

/// The `steward.backup_source` jids of `minion` in `h`'s job cache.
fn source_jids(h: &SaltHarness, minion: &str) -> BTreeSet<String> {
    state_apply_jobs(h, minion)
        .into_iter()
        .filter(|(_, j)| j["Arguments"].to_string().contains("steward.backup_source"))
        .map(|(jid, _)| jid)
        .collect()
}

#[test]
#[ignore = "a benchmark: scripts/bench-cluster runs it"]
fn bench_cluster() {
    let minions = usize::try_from(env_num("BENCH_MINIONS", 10)).unwrap();
    let changes = usize::try_from(env_num("BENCH_CHANGES", 1000)).unwrap();
    let debounce = env_num("BENCH_DEBOUNCE_MS", 1000);
    let dests = changes.div_ceil(minions);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = rt.block_on(TestDb::postgres_required());
    let mut h1 = signing_master_serving(vec![salt_states_dir()]);
    let mut h2 = signing_master_serving(vec![salt_states_dir()]);
    let settings =
        |d: &str, m: &str| cluster_settings(&[&h1, &h2], &db.url, h1.root(), debounce, 120, d, m);
    let cfg1 = steward_config(&h1, &[], &settings("d1", "m1"));
    let cfg2 = steward_config(&h2, &[], &settings("d2", "m2"));
    share_signing_pair(&h1, &cfg1, &mut h2, &cfg2);
    let store = rt.block_on(DbStore::open(&db.url)).unwrap();
    run_ok(cli(&cfg1, &["model", "add", "m"]));
    let mut d1 = start_daemon(&cfg1);
    let mut d2 = start_daemon(&cfg2);

    // The sources, each with a failover minion; half prefer m2.
    let root = h1.root().to_owned();
    let mut sources = Vec::new();
    for k in 0..minions {
        let name = format!("src{k:02}.example.org");
        let id = add_source(&cfg1, &name);
        let prefer_m2 = k % 2 == 1;
        let h = if prefer_m2 { &mut h2 } else { &mut h1 };
        start_source_minion(
            h,
            &cfg1,
            &name,
            &id,
            &root.join(format!("src{k:02}")),
            Some(prefer_m2),
        );
        sources.push((name, id, if prefer_m2 { "m2" } else { "m1" }));
    }
    // The backup servers: registry only (their targets wait for a minion).
    for j in 0..dests {
        run_ok(cli(
            &cfg1,
            &[
                "server",
                "add",
                &format!("bk{j:03}.example.org"),
                "--model",
                "m",
            ],
        ));
    }
    for (name, id, master) in &sources {
        wait_status(&cfg1, name, "online");
        eventually_within(
            "the minion seen on its master",
            Duration::from_secs(180),
            || match rt.block_on(store.presence(id)).unwrap() {
                Some(p) if p.master == *master => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }
    let before: Vec<(BTreeSet<String>, BTreeSet<String>)> = sources
        .iter()
        .map(|(_, id, _)| (source_jids(&h1, id), source_jids(&h2, id)))
        .collect();
    eprintln!("bench: {minions} minions on 2 masters, {dests} backup servers; {changes} changes");

    // The burst: one backup per change, sources in turn, through the
    // library (each its own transaction and outbox row, as the CLI or the
    // bus writes them, without 1,000 process starts).
    let t0 = Instant::now();
    rt.block_on(async {
        use salt_steward::registry::service::BackupSpec;
        use salt_steward::registry::ServerRef;
        let svc = salt_steward::registry::open(&db.url).await.unwrap();
        for i in 0..changes {
            let (src, _, _) = &sources[i % minions];
            let j = i / minions;
            svc.create_backup(BackupSpec {
                source: ServerRef::Name(src.clone()),
                source_folder: format!("/srv/data{j}"),
                dest: ServerRef::Name(format!("bk{j:03}.example.org")),
                dest_folder: format!("/backups/src{:02}", i % minions),
                excludes: Vec::new(),
                exclude_proc_sys: false,
                active: None,
                retain: None,
                ssh_host: Some("127.0.0.1".into()),
                ssh_port: None,
                ssh_user: None,
            })
            .await
            .unwrap_or_else(|e| panic!("change {i}: {e}"));
        }
    });
    let written = t0.elapsed();

    // Converged: the dispatcher read every change, then every source target
    // is done at its desired revision.
    eventually_within("every source converged", Duration::from_secs(900), || {
        let status = run_ok(cli(&cfg1, &["outbox", "status", "--json"]));
        let status: Value = serde_json::from_slice(&status.stdout).unwrap();
        let unread = status
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["consumer"] == "dispatch")
            .map_or(-1, |c| c["pending"].as_i64().unwrap_or(-1));
        if unread != 0 {
            return Err(format!("dispatcher unread {unread}"));
        }
        let targets = rt.block_on(store.dispatch_targets(None)).unwrap();
        let open: Vec<_> = targets
            .iter()
            .filter(|t| t.state.as_str() == "backup_source")
            .filter(|t| t.status.as_str() != "done" || t.applied != t.desired)
            .map(|t| {
                format!(
                    "{} {} {}/{}",
                    t.server,
                    t.status.as_str(),
                    t.applied,
                    t.desired
                )
            })
            .collect();
        if open.is_empty() {
            Ok(())
        } else {
            Err(format!("{open:?}"))
        }
    });
    let converged = t0.elapsed();

    // Runs, and where they went.
    let targets = rt.block_on(store.dispatch_targets(None)).unwrap();
    let mut per_target = BTreeMap::new();
    let mut wrong_master = 0;
    let mut both = 0;
    let mut duplicates = 0;
    let mut jobs_total = 0;
    for (k, (name, id, master)) in sources.iter().enumerate() {
        let t = targets
            .iter()
            .find(|t| t.server == *name && t.state.as_str() == "backup_source")
            .unwrap();
        let runs = rt.block_on(store.dispatch_runs(t.server_id, 1000)).unwrap();
        let started: Vec<_> = runs
            .iter()
            .filter(|r| r.state.as_str() == "backup_source")
            .filter(|r| !before[k].0.contains(&r.jid) && !before[k].1.contains(&r.jid))
            .collect();
        // A change applied twice: two successful runs of one revision.
        let mut done_revisions = BTreeMap::new();
        for r in started
            .iter()
            .filter(|r| r.outcome.as_deref() == Some("done"))
        {
            *done_revisions.entry(r.revision).or_insert(0) += 1;
        }
        duplicates += done_revisions.values().filter(|n| **n > 1).count();
        let on1: BTreeSet<_> = source_jids(&h1, id)
            .difference(&before[k].0)
            .cloned()
            .collect();
        let on2: BTreeSet<_> = source_jids(&h2, id)
            .difference(&before[k].1)
            .cloned()
            .collect();
        both += on1.intersection(&on2).count();
        wrong_master += if *master == "m1" {
            on2.len()
        } else {
            on1.len()
        };
        jobs_total += on1.len() + on2.len();
        per_target.insert(
            name.clone(),
            json!({"master": master, "runs": started.len(), "jobs_m1": on1.len(), "jobs_m2": on2.len()}),
        );
    }
    let runs: Vec<u64> = per_target
        .values()
        .map(|v| v["runs"].as_u64().unwrap())
        .collect();
    let result = json!({
        "minions": minions,
        "masters": 2,
        "changes": changes,
        "debounce_ms": debounce,
        "written_s": written.as_secs_f64(),
        "converged_s": converged.as_secs_f64(),
        "runs_total": runs.iter().sum::<u64>(),
        "runs_per_target_max": runs.iter().max(),
        "runs_per_target_min": runs.iter().min(),
        "jobs_total": jobs_total,
        "jobs_through_the_other_master": wrong_master,
        "jids_through_both_masters": both,
        "duplicates": duplicates,
        "targets": per_target,
    });
    eprintln!("{}", serde_json::to_string_pretty(&result).unwrap());
    if let Ok(out) = std::env::var("BENCH_OUT") {
        std::fs::write(out, serde_json::to_string_pretty(&result).unwrap()).unwrap();
    }
    assert_eq!(duplicates, 0, "{result}");
    assert_eq!(both, 0, "{result}");
    for d in [&mut d1, &mut d2] {
        d.drain_err();
        let panics: Vec<_> = d.seen_err.iter().filter(|l| l.contains("panic")).collect();
        assert!(panics.is_empty(), "{panics:?}");
    }
}
