//! Several daemons on one registry (issue #16), the database side, on
//! PostgreSQL (where daemons share a registry) and SQLite (the default,
//! which must work unchanged): leases raced for by several daemons are held
//! by exactly one, renewed in the same epoch, taken over only after they
//! lapse (in a new epoch, the old holder then refused), released at once;
//! heartbeats by the database clock; concurrent migrations of daemons
//! starting together; where each minion was last seen.

use std::time::{Duration, Instant};

use salt_steward::registry::cluster::SeenBy;
use salt_steward::registry::store::ClusterStore;
use salt_steward::registry::DbStore;

use crate::registry::TestDb;

/// Each test's bound on waiting for a lease to lapse.
const LAPSE: Duration = Duration::from_secs(20);

/// `daemons` stores on one database, as separate daemons would open it.
async fn daemons(db: &TestDb, n: usize) -> Vec<DbStore> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(DbStore::open(&db.url).await.unwrap());
    }
    out
}

async fn leases_story(db: &TestDb) {
    let stores = daemons(db, 4).await;
    // 4 daemons × 8 tasks race for one lease: exactly one wins, epoch 1.
    let mut tasks = Vec::new();
    for (d, store) in stores.iter().enumerate() {
        for t in 0..8 {
            let store = store.clone();
            let holder = format!("d{d}");
            tasks.push(tokio::spawn(async move {
                let got = store
                    .lease_acquire("chore/sweep", &holder, 60_000)
                    .await
                    .unwrap();
                (holder, t, got)
            }));
        }
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (holder, _, got) = t.await.unwrap();
        if let Some(l) = got {
            winners.push((holder, l));
        }
    }
    let holders: std::collections::BTreeSet<_> = winners.iter().map(|(h, _)| h.clone()).collect();
    assert_eq!(holders.len(), 1, "one holder: {winners:?}");
    assert!(winners.iter().all(|(_, l)| l.epoch == 1), "{winners:?}");
    let holder = holders.into_iter().next().unwrap();
    let other = if holder == "d0" { "d1" } else { "d0" };

    // The holder renews in the same epoch; another daemon is refused.
    let renewed = stores[0]
        .lease_acquire("chore/sweep", &holder, 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(renewed.epoch, 1);
    assert!(stores[1]
        .lease_acquire("chore/sweep", other, 60_000)
        .await
        .unwrap()
        .is_none());

    // Leases are independent.
    let l = stores[1]
        .lease_acquire("chore/prune", other, 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((l.holder.as_str(), l.epoch), (other, 1));

    // A short lease lapses (the holder "died"): another daemon takes it in
    // a new epoch, and the old holder can neither renew nor release it.
    let short = stores[2]
        .lease_acquire("chore/drift", "dead", 300)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(short.epoch, 1);
    let deadline = Instant::now() + LAPSE;
    let taken = loop {
        if let Some(l) = stores[3]
            .lease_acquire("chore/drift", "heir", 60_000)
            .await
            .unwrap()
        {
            break l;
        }
        assert!(Instant::now() < deadline, "the lease never lapsed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((taken.holder.as_str(), taken.epoch), ("heir", 2));
    assert!(taken.acquired_at >= short.expires_at, "{taken:?} {short:?}");
    assert!(stores[2]
        .lease_acquire("chore/drift", "dead", 60_000)
        .await
        .unwrap()
        .is_none());
    assert!(!stores[2]
        .lease_release("chore/drift", "dead", 1)
        .await
        .unwrap());
    let (stored, now) = stores[0].lease("chore/drift").await.unwrap();
    let stored = stored.unwrap();
    assert_eq!((stored.holder.as_str(), stored.epoch), ("heir", 2));
    assert!(stored.expires_at > now);

    // A clean stop releases it: the next daemon takes it at once, epoch 3;
    // a release naming an old epoch changes nothing.
    assert!(!stores[3]
        .lease_release("chore/drift", "heir", 1)
        .await
        .unwrap());
    assert!(stores[3]
        .lease_release("chore/drift", "heir", 2)
        .await
        .unwrap());
    let next = stores[0]
        .lease_acquire("chore/drift", "next", 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.epoch, 3);

    // The same holder after its own lapse: a new tenure (its old writes
    // fenced off too).
    stores[0]
        .lease_acquire("chore/once", "solo", 200)
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + LAPSE;
    loop {
        let (l, now) = stores[0].lease("chore/once").await.unwrap();
        if l.unwrap().expires_at <= now {
            break;
        }
        assert!(Instant::now() < deadline, "the lease never lapsed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = stores[0]
        .lease_acquire("chore/once", "solo", 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.epoch, 2);
}

async fn heartbeats_and_presence_story(db: &TestDb) {
    let stores = daemons(db, 2).await;
    let t1 = stores[0]
        .daemon_beat("d-a", "127.0.0.1:4506", "0.1.0", true)
        .await
        .unwrap();
    stores[1]
        .daemon_beat("d-b", "127.0.0.2:4506", "0.1.0", true)
        .await
        .unwrap();
    let t2 = stores[0]
        .daemon_beat("d-a", "127.0.0.1:4506", "0.1.0", false)
        .await
        .unwrap();
    assert!(t2 >= t1);
    let (all, now) = stores[1].daemons().await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let a = &all[0];
    assert_eq!(
        (a.id.as_str(), a.master.as_str()),
        ("d-a", "127.0.0.1:4506")
    );
    assert_eq!(a.started_at, t1, "a beat keeps the start");
    assert_eq!(a.heartbeat_at, t2);
    assert!(a.alive(now, 15_000));
    // d-b stops beating: seen dead once the database clock passes its
    // last beat by more than the bound, while d-a keeps beating.
    let deadline = Instant::now() + LAPSE;
    loop {
        stores[0]
            .daemon_beat("d-a", "127.0.0.1:4506", "0.1.0", false)
            .await
            .unwrap();
        let (all, now) = stores[0].daemons().await.unwrap();
        if !all[1].alive(now, 300) {
            assert!(all[0].alive(now, 300), "{all:?} at {now}");
            break;
        }
        assert!(Instant::now() < deadline, "d-b never seen dead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stores[1].daemon_remove("d-b").await.unwrap());
    assert!(!stores[1].daemon_remove("d-b").await.unwrap());

    // Presence: the last sighting wins, whichever daemon records it.
    assert!(stores[0].presence("web1-0a").await.unwrap().is_none());
    stores[0]
        .presence_seen("web1-0a", "127.0.0.1:4506", "d-a", SeenBy::Start)
        .await
        .unwrap();
    let p = stores[1].presence("web1-0a").await.unwrap().unwrap();
    assert_eq!(
        (p.master.as_str(), p.seen_by.as_str()),
        ("127.0.0.1:4506", "start")
    );
    stores[1]
        .presence_seen("web1-0a", "127.0.0.2:4506", "d-b", SeenBy::Return)
        .await
        .unwrap();
    let q = stores[0].presence("web1-0a").await.unwrap().unwrap();
    assert_eq!(
        (q.master.as_str(), q.daemon_id.as_str(), q.seen_by.as_str()),
        ("127.0.0.2:4506", "d-b", "return")
    );
    assert!(q.seen_at >= p.seen_at);
}

#[tokio::test]
async fn leases_on_postgres() {
    leases_story(&TestDb::postgres_required().await).await;
}

#[tokio::test]
async fn leases_on_sqlite() {
    leases_story(&TestDb::sqlite()).await;
}

#[tokio::test]
async fn heartbeats_and_presence_on_postgres() {
    heartbeats_and_presence_story(&TestDb::postgres_required().await).await;
}

#[tokio::test]
async fn heartbeats_and_presence_on_sqlite() {
    heartbeats_and_presence_story(&TestDb::sqlite()).await;
}

/// Daemons starting together on a fresh PostgreSQL registry migrate it
/// concurrently: each opens it, the schema is migrated once.
#[tokio::test]
async fn concurrent_migrations_on_postgres() {
    let db = TestDb::postgres_required().await;
    let mut opens = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        opens.push(tokio::spawn(async move { DbStore::open(&url).await }));
    }
    for o in opens {
        o.await.unwrap().unwrap();
    }
    let store = DbStore::open(&db.url).await.unwrap();
    let DbStore::Postgres(pg) = &store else {
        unreachable!()
    };
    let (n, failed): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(*) FILTER (WHERE NOT success) FROM _sqlx_migrations",
    )
    .fetch_one(pg.pool())
    .await
    .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres"))
        .unwrap()
        .count();
    assert_eq!((n, failed), (files as i64, 0));
    // And it works: a lease through the migrated schema.
    assert!(store
        .lease_acquire("chore/x", "d", 1000)
        .await
        .unwrap()
        .is_some());
}

// ------------------------------------------------ dispatch claims

/// `m` servers, each with a due `portfwd` target.
async fn due_targets(store: &DbStore, m: usize) -> Vec<i64> {
    use salt_steward::registry::dispatch::Debounce;
    use salt_steward::registry::store::DispatchStore as _;
    use salt_steward::registry::{ServerPatch, Service, StateKind, Store as _};
    let svc = Service::new(store.clone());
    svc.create_model("m", "", &[]).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..m {
        let mut p = ServerPatch::default();
        p.set("name", &format!("t{i}.example.org")).unwrap();
        p.set("model", "m").unwrap();
        ids.push(svc.create_server(p).await.unwrap().id);
    }
    store.outbox_subscribe("dispatch").await.unwrap();
    let targets: Vec<_> = ids.iter().map(|&id| (id, StateKind::Portfwd)).collect();
    let d = Debounce {
        debounce_ms: 0,
        max_delay_ms: 1000,
    };
    store
        .dispatch_bump("dispatch", 1, &targets, d)
        .await
        .unwrap();
    ids
}

async fn claims_story(db: &TestDb) {
    use salt_steward::registry::dispatch::{Finish, Here};
    use salt_steward::registry::store::DispatchStore as _;
    use salt_steward::registry::StateKind;
    const M: usize = 40;
    let stores = daemons(db, 4).await;
    let ids = due_targets(&stores[0], M).await;

    // 4 daemons × 2 workers race over the same due targets: each target is
    // claimed exactly once, each claim in epoch 1.
    let mut tasks = Vec::new();
    for (d, store) in stores.iter().enumerate() {
        for w in 0..2 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let holder = format!("d{d}");
                let mut mine = Vec::new();
                let due = store.dispatch_due(i64::MAX, 1000, None).await.unwrap();
                for t in due {
                    let jid = format!("2026120300000{d}{w}{:05}", t.server_id);
                    if let Some(c) = store
                        .dispatch_claim(t.server_id, t.state, t.desired, &jid, &holder, i64::MAX)
                        .await
                        .unwrap()
                    {
                        assert_eq!(c.lease_epoch, 1);
                        assert_eq!(c.lease_holder.as_deref(), Some(holder.as_str()));
                        mine.push(t.server_id);
                    }
                }
                mine
            }));
        }
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    claimed.sort();
    assert_eq!(claimed, ids, "every target claimed exactly once");

    // A run whose daemon died: its lease lapses, the target is due again
    // with its jid kept; another daemon claims it (epoch 2) and the dead
    // holder's late result is refused by its epoch, the new one recorded.
    let store = &stores[0];
    let victim = ids[0];
    let (t, _) = target(store, victim).await;
    let old_jid = t.last_jid.clone().unwrap();
    let old_epoch = t.lease_epoch;
    // Its lease lapsed (written as a past time: no waiting on the clock).
    sql(
        store,
        &format!("UPDATE dispatch_targets SET lease_until = 1 WHERE server_id = {victim}"),
    )
    .await;
    assert_eq!(store.dispatch_expire(1_000).await.unwrap(), 1);
    let (t, runs) = target(store, victim).await;
    assert_eq!(t.status.as_str(), "pending");
    assert_eq!(
        t.next_attempt_at,
        1_000 + salt_steward::registry::store::EXPIRED_LEASE_BACKOFF_MS * t.attempts,
        "due again after a backoff: {t:?}"
    );
    assert_eq!(t.orphan_jid.as_deref(), Some(old_jid.as_str()));
    assert_eq!(runs, ["interrupted"], "the dead holder's run row");
    let heir = stores[1]
        .dispatch_claim(
            victim,
            StateKind::Portfwd,
            t.desired,
            &old_jid,
            "heir",
            i64::MAX,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (heir.lease_epoch, heir.orphan_jid.clone()),
        (old_epoch + 1, None)
    );
    let ok = Finish::Applied {
        hash: "h".into(),
        summary: "{}".into(),
    };
    assert!(
        stores[2]
            .dispatch_finish(victim, StateKind::Portfwd, &old_jid, old_epoch, &ok)
            .await
            .unwrap()
            .is_none(),
        "the old holder's late result is refused"
    );
    let (_, runs) = target(store, victim).await;
    assert_eq!(runs, ["running", "interrupted"], "the heir's run untouched");
    let done = stores[1]
        .dispatch_finish(victim, StateKind::Portfwd, &old_jid, heir.lease_epoch, &ok)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status.as_str(), "done");
    let (_, runs) = target(store, victim).await;
    assert_eq!(runs, ["done", "interrupted"]);

    // A holder whose master went away hands its run back: due again at
    // once, its jid the orphan to look up; an older epoch is fenced off.
    let handed = ids[3];
    let (t, _) = target(store, handed).await;
    let jid = t.last_jid.clone().unwrap();
    assert!(
        !store
            .dispatch_release(handed, StateKind::Portfwd, &jid, t.lease_epoch - 1)
            .await
            .unwrap(),
        "a stale epoch hands nothing back"
    );
    assert!(!store
        .dispatch_release(handed, StateKind::Portfwd, "another-jid", t.lease_epoch)
        .await
        .unwrap());
    assert!(store
        .dispatch_release(handed, StateKind::Portfwd, &jid, t.lease_epoch)
        .await
        .unwrap());
    let (t, runs) = target(store, handed).await;
    assert_eq!(
        (
            t.status.as_str(),
            t.orphan_jid.as_deref(),
            t.lease_holder.as_deref()
        ),
        ("pending", Some(jid.as_str()), None)
    );
    assert_eq!(runs, ["interrupted"]);
    assert!(store
        .dispatch_due(i64::MAX, 1000, None)
        .await
        .unwrap()
        .iter()
        .any(|t| t.server_id == handed));

    // A restarting daemon recovers its own runs and those whose lease
    // lapsed, never another live daemon's.
    let mine = ids[1];
    let (t, _) = target(store, mine).await;
    let holder = t.lease_holder.clone().unwrap();
    // Another daemon's live run (its lease far ahead).
    let other = ids[2];
    sql(
        store,
        &format!(
            "UPDATE dispatch_targets SET lease_holder = 'someone-else', \
             lease_until = 9000000000000 WHERE server_id = {other}"
        ),
    )
    .await;
    assert_ne!(holder, "someone-else");
    let recovered = store.dispatch_recover(&holder).await.unwrap();
    assert!(recovered >= 1);
    assert_eq!(target(store, mine).await.0.status.as_str(), "pending");
    assert_eq!(target(store, other).await.0.status.as_str(), "running");

    // Placement: a target whose minion was last seen on another master with
    // a live daemon is not due here; on this master, or nowhere, or on a
    // master whose daemon is dead, it is.
    use salt_steward::registry::cluster::SeenBy;
    let here = Here {
        master_id: "m-a".into(),
        dead_after_ms: 60_000,
    };
    let (t, _) = target(store, mine).await;
    let due_here = |store: DbStore, here: Here| async move {
        store
            .dispatch_due(i64::MAX, 1000, Some(&here))
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.server_id)
            .collect::<Vec<_>>()
    };
    assert!(
        due_here(store.clone(), here.clone()).await.contains(&mine),
        "nowhere yet"
    );
    store.daemon_beat("d-b", "m-b", "0", true).await.unwrap();
    store
        .presence_seen(&t.minion_id, "m-b", "d-b", SeenBy::Start)
        .await
        .unwrap();
    assert!(
        !due_here(store.clone(), here.clone()).await.contains(&mine),
        "on m-b, whose daemon lives"
    );
    assert!(due_here(
        store.clone(),
        Here {
            master_id: "m-b".into(),
            dead_after_ms: 60_000
        }
    )
    .await
    .contains(&mine));
    sql(
        store,
        "UPDATE daemons SET heartbeat_at = 1 WHERE id = 'd-b'",
    )
    .await;
    assert!(
        due_here(store.clone(), here.clone()).await.contains(&mine),
        "m-b's daemon is dead"
    );
    store
        .presence_seen(&t.minion_id, "m-a", "d-a", SeenBy::Start)
        .await
        .unwrap();
    assert!(
        due_here(store.clone(), here).await.contains(&mine),
        "back on m-a"
    );
}

/// Target `server_id`'s `portfwd` row and its runs' outcomes, newest first
/// (`running` for one not finished).
async fn target(
    store: &DbStore,
    server_id: i64,
) -> (salt_steward::registry::DispatchTarget, Vec<String>) {
    use salt_steward::registry::store::DispatchStore as _;
    use salt_steward::registry::StateKind;
    let t = store
        .dispatch_targets(None)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.server_id == server_id && t.state == StateKind::Portfwd)
        .unwrap();
    let runs = store
        .dispatch_runs(server_id, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.outcome.unwrap_or_else(|| "running".into()))
        .collect();
    (t, runs)
}

/// Runs one SQL statement of the test's own.
async fn sql(store: &DbStore, sql: &str) {
    match store {
        DbStore::Sqlite(s) => sqlx::query(sql).execute(s.pool()).await.map(|_| ()),
        DbStore::Postgres(p) => sqlx::query(sql).execute(p.pool()).await.map(|_| ()),
    }
    .unwrap();
}

#[tokio::test]
async fn claims_on_postgres() {
    claims_story(&TestDb::postgres_required().await).await;
}

#[tokio::test]
async fn claims_on_sqlite() {
    claims_story(&TestDb::sqlite()).await;
}

/// `salt-steward cluster status`: each daemon alive or dead by the database
/// clock, the leases, minions by master; exit 1 once a daemon is dead.
#[tokio::test]
async fn cluster_status_on_the_command_line() {
    let db = TestDb::sqlite();
    let store = DbStore::open(&db.url).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("steward.yaml");
    std::fs::write(
        &cfg,
        format!(
            "registry: {}\ncluster: {{heartbeat_secs: 1, dead_after_beats: 3}}\n",
            db.url
        ),
    )
    .unwrap();
    store
        .daemon_beat("d-a", "m-a", "0.1.0", true)
        .await
        .unwrap();
    store
        .daemon_beat("d-b", "m-b", "0.1.0", true)
        .await
        .unwrap();
    store
        .lease_acquire("chore/prune", "d-a", 60_000)
        .await
        .unwrap();
    store
        .presence_seen("web1-0a", "m-a", "d-a", SeenBy::Start)
        .await
        .unwrap();
    let status = |cfg: &std::path::Path| {
        let o = crate::support::cli(cfg, &["cluster", "status", "--json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", crate::support::text(&o)));
        (o.status.code(), v)
    };
    let (code, v) = status(&cfg);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["daemons"][0]["id"], "d-a");
    assert_eq!(v["daemons"][0]["alive"], true);
    assert_eq!(v["leases"][0]["name"], "chore/prune");
    assert_eq!(v["leases"][0]["held"], true);
    assert_eq!(v["minions_by_master"][0]["master"], "m-a");
    assert_eq!(v["minions_by_master"][0]["minions"], 1);
    // d-b's last beat long ago: dead, exit 1.
    sql(
        &store,
        "UPDATE daemons SET heartbeat_at = 1 WHERE id = 'd-b'",
    )
    .await;
    let (code, v) = status(&cfg);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["daemons"][1]["alive"], false);
    let text = crate::support::cli(&cfg, &["cluster", "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("d-b\t") && l.contains("DEAD")),
        "{text}"
    );
}
