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
