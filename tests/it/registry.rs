//! The registry story, run on SQLite (a temp file) always and on PostgreSQL
//! when `STEWARD_TEST_POSTGRES_URL` names a server (`eval "$(scripts/pg-test-env)"`):
//! create/find/update/delete; each refusal gives its specific error and writes
//! nothing (row counts of models, servers and outbox unchanged); the database
//! itself enforces the constraints; one outbox row per change; acknowledging the
//! outbox is idempotent, per consumer, pruned behind every cursor, and a row
//! that cannot be read is quarantined instead of blocking. Then the CLI on a SQLite file.

use proptest::prelude::*;
use salt_steward::pki::{fingerprint, KeyIssuer};
use salt_steward::registry::store::KeyColumns;
use salt_steward::registry::{
    self, DbStore, Error, OutboxEntry, OutboxKind, OutboxRow, Server, ServerFilter, ServerPatch,
    ServerRef, Service, Status, Store,
};
use serde_json::Value as Json;

use crate::support::steward;

const PG_ENV: &str = "STEWARD_TEST_POSTGRES_URL";

/// A database for one test, destroyed on drop (the PostgreSQL one is a fresh
/// database created on the server the env var names).
pub(crate) struct TestDb {
    pub(crate) url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub(crate) fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("registry.db").display());
        Self {
            url,
            _dir: Some(dir),
            pg: None,
        }
    }

    async fn postgres() -> Option<Self> {
        let admin = std::env::var(PG_ENV).ok().filter(|u| !u.is_empty())?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("steward_test_{}_{nanos}", std::process::id());
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        // The name is ours (digits and underscores): no injection possible.
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let (base, query) = match admin.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin.as_str(), String::new()),
        };
        let (server, _db) = base.rsplit_once('/').unwrap();
        Some(Self {
            url: format!("{server}/{name}{query}"),
            _dir: None,
            pg: Some((admin, name)),
        })
    }
}

impl TestDb {
    /// A PostgreSQL database; never a silent skip: scripts/test always
    /// provides the server.
    pub(crate) async fn postgres_required() -> Self {
        match Self::postgres().await {
            Some(db) => db,
            None => panic!(
                "{PG_ENV} is not set: run the tests with `scripts/test`, or start the test \
                 PostgreSQL first with `eval \"$(scripts/pg-test-env)\"`"
            ),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg.take() else {
            return;
        };
        // Drop may run inside a runtime: do the async work on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&pool)
                        .await;
                }
            });
        })
        .join();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    models: i64,
    servers: i64,
    outbox: i64,
}

async fn counts(store: &DbStore) -> Counts {
    async fn one(store: &DbStore, table: &str) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM {table}");
        match store {
            DbStore::Sqlite(s) => sqlx::query_scalar(&sql).fetch_one(s.pool()).await.unwrap(),
            DbStore::Postgres(p) => sqlx::query_scalar(&sql).fetch_one(p.pool()).await.unwrap(),
        }
    }
    Counts {
        models: one(store, "models").await,
        servers: one(store, "servers").await,
        outbox: one(store, "outbox").await,
    }
}

/// Runs one SQL statement of the test's own (no binds) on either backend.
async fn exec(store: &DbStore, sql: &str) {
    match store {
        DbStore::Sqlite(s) => {
            sqlx::query(sql).execute(s.pool()).await.unwrap();
        }
        DbStore::Postgres(p) => {
            sqlx::query(sql).execute(p.pool()).await.unwrap();
        }
    }
}

/// The entries of rows that must all be readable.
fn entries(rows: Vec<OutboxRow>) -> Vec<OutboxEntry> {
    rows.into_iter()
        .map(|r| match r {
            OutboxRow::Entry(e) => e,
            OutboxRow::Unreadable { id, reason } => panic!("row {id} unreadable: {reason}"),
        })
        .collect()
}

/// Every change still in the outbox, as a consumer that never acknowledged
/// anything sees them.
async fn all_changes(store: &DbStore) -> Vec<OutboxEntry> {
    store.outbox_subscribe("test-reader").await.unwrap();
    entries(store.outbox_pending("test-reader", 10_000).await.unwrap())
}

fn patch(pairs: &[(&str, &str)]) -> ServerPatch {
    let mut p = ServerPatch::default();
    for (k, v) in pairs {
        p.set(k, v).unwrap();
    }
    p
}

/// Runs `op`, expects the error `code`, and checks that nothing was written.
macro_rules! refused {
    ($svc:expr, $code:expr, $op:expr) => {{
        let before = counts($svc.store()).await;
        let err: Error = $op.await.expect_err("should be refused");
        assert_eq!(err.code(), $code, "{err}");
        assert_eq!(counts($svc.store()).await, before, "written despite {err}");
        err
    }};
}

async fn story(svc: Service<DbStore>) {
    let backend = svc.store().backend();
    assert_eq!(
        counts(svc.store()).await,
        Counts {
            models: 0,
            servers: 0,
            outbox: 0
        }
    );

    // Models.
    let web = svc
        .create_model("web", "Web servers", &["nginx".into(), "base.users".into()])
        .await
        .unwrap();
    assert_eq!(web.states, ["nginx", "base.users"]);
    svc.create_model("hypervisor", "", &[]).await.unwrap();
    assert_eq!(svc.get_model("web").await.unwrap(), web);
    let names: Vec<_> = svc
        .list_models()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["hypervisor", "web"]);
    let web = svc
        .update_model(
            "web",
            registry::ModelPatch {
                description: Some("Front ends".into()),
                states: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(web.description, "Front ends");

    // Servers.
    let pve = svc
        .create_server(patch(&[
            ("name", "pve1.example.org"),
            ("model", "hypervisor"),
            ("is_proxmox_host", "true"),
            ("proxmox_node", "pve1"),
            ("external_ip", "192.0.2.1"),
            ("external_interface", "vmbr0"),
        ]))
        .await
        .unwrap();
    let proxy = svc
        .create_server(patch(&[("name", "proxy1.example.org"), ("model", "web")]))
        .await
        .unwrap();
    let pve = svc
        .update_server(
            &ServerRef::Id(pve.id),
            patch(&[("nginx_proxy", "proxy1.example.org")]),
        )
        .await
        .unwrap();
    assert_eq!(pve.nginx_proxy, Some(proxy.id));

    let web01 = svc
        .create_server(patch(&[
            ("name", "Web01.Example.org"),
            ("model", "web"),
            ("is_vm", "true"),
            ("vm_host", "pve1.example.org"),
            ("internal_ip", "10.0.0.5"),
            ("users", "alice,bob"),
        ]))
        .await
        .unwrap();
    assert_eq!(web01.name, "web01.example.org", "stored in lower case");
    assert!(web01.minion_id.starts_with("web01.example.org-"));
    assert_eq!(web01.status, Status::Created);
    assert_eq!(web01.vm_host, Some(pve.id));
    assert_eq!(web01.users, ["alice", "bob"]);
    assert!(web01.id > proxy.id && proxy.id > pve.id);

    // Find.
    let by_id = svc.get_server(&ServerRef::Id(web01.id)).await.unwrap();
    let by_name = svc
        .get_server(&ServerRef::Name("WEB01.example.org".into()))
        .await
        .unwrap();
    let by_minion = svc
        .server_by_minion_id(&web01.minion_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_id, web01);
    assert_eq!(by_name, web01);
    assert_eq!(by_minion, web01);
    assert!(svc.server_by_minion_id("nobody").await.unwrap().is_none());
    let ids = |v: Vec<Server>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(
        ids(svc.find_servers(&ServerFilter::default()).await.unwrap()),
        [pve.id, proxy.id, web01.id]
    );
    // changed_since binds an integer (PostgreSQL is strict about it).
    let since = |t: i64| ServerFilter {
        changed_since: Some(t),
        ..ServerFilter::default()
    };
    assert_eq!(svc.find_servers(&since(0)).await.unwrap().len(), 3);
    assert!(svc.find_servers(&since(i64::MAX)).await.unwrap().is_empty());
    let f = ServerFilter {
        model: Some("web".into()),
        ..ServerFilter::default()
    };
    assert_eq!(
        ids(svc.find_servers(&f).await.unwrap()),
        [proxy.id, web01.id]
    );
    let f = ServerFilter {
        model: Some("web".into()),
        name: Some("proxy1.example.org".into()),
        ..ServerFilter::default()
    };
    assert_eq!(ids(svc.find_servers(&f).await.unwrap()), [proxy.id]);

    // Update: the id and minion id stay.
    let web01 = svc
        .update_server(
            &ServerRef::Name("web01.example.org".into()),
            patch(&[
                ("status", "online"),
                ("external_ip", "2001:db8::5"),
                ("internal_ip", ""),
                ("name", "web01b.example.org"),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(web01.status, Status::Online);
    assert_eq!(web01.external_ip, Some("2001:db8::5".parse().unwrap()));
    assert_eq!(web01.internal_ip, None);
    assert_eq!(web01.name, "web01b.example.org");
    assert_eq!(web01.id, by_id.id);
    assert_eq!(web01.minion_id, by_id.minion_id);
    assert_eq!(
        svc.get_server(&ServerRef::Id(web01.id)).await.unwrap(),
        web01
    );
    let f = ServerFilter {
        status: Some(Status::Online),
        ..ServerFilter::default()
    };
    assert_eq!(ids(svc.find_servers(&f).await.unwrap()), [web01.id]);
    // Counted by status in the database, and the last changed first.
    let mut by_status = svc.store().server_status_counts().await.unwrap();
    by_status.sort_by_key(|(s, _)| s.as_str());
    let created = svc.find_servers(&ServerFilter::default()).await.unwrap()[0].status;
    assert_eq!(by_status, [(created, 2), (Status::Online, 1)]);
    let newest = ServerFilter {
        newest_first: true,
        limit: Some(2),
        ..ServerFilter::default()
    };
    assert_eq!(ids(svc.find_servers(&newest).await.unwrap())[0], web01.id);
    assert_eq!(svc.find_servers(&newest).await.unwrap().len(), 2);
    let quiet = |t: i64| ServerFilter {
        changed_before: Some(t),
        ..ServerFilter::default()
    };
    let all = svc.find_servers(&ServerFilter::default()).await.unwrap();
    let before: Vec<i64> = all
        .iter()
        .filter(|s| s.updated_at < web01.updated_at)
        .map(|s| s.id)
        .collect();
    assert!(!before.contains(&web01.id));
    assert_eq!(
        ids(svc.find_servers(&quiet(web01.updated_at)).await.unwrap()),
        before
    );
    assert_eq!(svc.find_servers(&quiet(i64::MAX)).await.unwrap().len(), 3);

    // Refusals: the specific error, nothing written.
    let e = refused!(
        svc,
        "duplicate_name",
        svc.create_server(patch(&[("name", "PVE1.example.org"), ("model", "web")]))
    );
    assert!(e.to_string().contains("pve1.example.org"), "{e}");
    refused!(
        svc,
        "duplicate_name",
        svc.update_server(
            &ServerRef::Id(web01.id),
            patch(&[("name", "pve1.example.org")])
        )
    );
    refused!(svc, "duplicate_name", svc.create_model("web", "", &[]));
    refused!(
        svc,
        "unknown_model",
        svc.create_server(patch(&[("name", "db1.example.org"), ("model", "db")]))
    );
    refused!(
        svc,
        "unknown_model",
        svc.update_server(&ServerRef::Id(web01.id), patch(&[("model", "db")]))
    );
    let e = refused!(svc, "model_in_use", svc.delete_model("web"));
    assert!(matches!(e, Error::ModelInUse { servers: 2, .. }), "{e:?}");
    refused!(
        svc,
        "invalid_hostname",
        svc.create_server(patch(&[("name", "web_01.example.org"), ("model", "web")]))
    );
    refused!(
        svc,
        "invalid_hostname",
        svc.create_server(patch(&[("name", "-web.example.org"), ("model", "web")]))
    );
    refused!(
        svc,
        "invalid_value",
        svc.create_server(patch(&[
            ("name", "db1.example.org"),
            ("model", "web"),
            ("vm_host", "pve1.example.org"),
        ]))
    );
    refused!(
        svc,
        "invalid_value",
        svc.create_server(patch(&[
            ("name", "db1.example.org"),
            ("model", "web"),
            ("is_vm", "true"),
            ("vm_host", "nowhere.example.org"),
        ]))
    );
    refused!(
        svc,
        "invalid_value",
        svc.update_server(&ServerRef::Id(web01.id), patch(&[("users", "Root")]))
    );
    refused!(
        svc,
        "server_in_use",
        svc.delete_server(&ServerRef::Name("pve1.example.org".into()))
    );
    refused!(svc, "not_found", svc.delete_server(&ServerRef::Id(999_999)));
    refused!(
        svc,
        "not_found",
        svc.update_server(&ServerRef::Name("ghost".into()), ServerPatch::default())
    );
    refused!(svc, "not_found", svc.delete_model("ghost"));

    // The database enforces the constraints itself (the store, bypassing the
    // service's checks).
    let store = svc.store();
    let mut clash = web01.clone();
    clash.minion_id = "other-minion".into();
    clash.name = "pve1.example.org".into();
    refused!(svc, "duplicate_name", store.insert_server(&clash));
    clash.name = "fresh.example.org".into();
    clash.model = "nope".into();
    refused!(svc, "unknown_model", store.insert_server(&clash));
    clash.model = "web".into();
    clash.vm_host = Some(999_999);
    refused!(svc, "invalid_value", store.insert_server(&clash));
    clash.vm_host = None;
    clash.minion_id = web01.minion_id.clone();
    refused!(svc, "minion_id_taken", store.insert_server(&clash));
    clash.minion_id = "other-minion".into();
    clash.is_vm = false;
    clash.vm_host = Some(pve.id);
    refused!(svc, "invalid_value", store.insert_server(&clash));

    // Delete.
    let gone = svc
        .delete_server(&ServerRef::Name("web01b.example.org".into()))
        .await
        .unwrap();
    assert_eq!(gone, web01);
    refused!(svc, "not_found", svc.get_server(&ServerRef::Id(web01.id)));
    svc.create_model("spare", "", &[]).await.unwrap();
    svc.delete_model("spare").await.unwrap();

    // The outbox: exactly one row per successful change, in order.
    let store = svc.store();
    assert_eq!(store.outbox_subscribe("notify").await.unwrap(), 0);
    let pending = entries(store.outbox_pending("notify", 1000).await.unwrap());
    let kinds: Vec<_> = pending.iter().map(|e| (e.kind, e.server_id)).collect();
    use OutboxKind::*;
    assert_eq!(
        kinds,
        [
            (ModelCreated, None),
            (ModelCreated, None),
            (ModelUpdated, None),
            (ServerCreated, Some(pve.id)),
            (ServerCreated, Some(proxy.id)),
            (ServerUpdated, Some(pve.id)),
            (ServerCreated, Some(web01.id)),
            (ServerUpdated, Some(web01.id)),
            (ServerDeleted, Some(web01.id)),
            (ModelCreated, None),
            (ModelDeleted, None),
        ],
        "{backend}"
    );
    let payload =
        |i: usize| -> Server { serde_json::from_value(pending[i].payload.clone()).unwrap() };
    assert_eq!(payload(7), web01);
    assert_eq!(payload(8), web01);
    assert_eq!(pending[0].payload["name"], Json::from("web"));

    // Acknowledging is idempotent: the second one changes nothing.
    assert_eq!(store.outbox_pending("notify", 3).await.unwrap().len(), 3);
    for e in &pending[..5] {
        assert!(store.outbox_ack("notify", e.id).await.unwrap());
        assert!(!store.outbox_ack("notify", e.id).await.unwrap());
    }
    let left = entries(store.outbox_pending("notify", 1000).await.unwrap());
    assert_eq!(left, pending[5..], "{backend}");

    // A second consumer sees every change from the start, at its own pace;
    // subscribing again does not move it.
    assert_eq!(store.outbox_subscribe("inventory").await.unwrap(), 0);
    assert_eq!(
        entries(store.outbox_pending("inventory", 1000).await.unwrap()),
        pending,
        "{backend}"
    );
    store.outbox_ack("inventory", pending[2].id).await.unwrap();
    assert_eq!(
        store.outbox_subscribe("inventory").await.unwrap(),
        pending[2].id
    );
    refused!(svc, "not_found", store.outbox_ack("nobody", pending[0].id));
    refused!(svc, "not_found", store.outbox_pending("nobody", 1));
    refused!(svc, "invalid_value", store.outbox_subscribe("No Body"));

    // Only what every consumer has passed is pruned: "inventory" is at 3.
    let last = pending.last().unwrap().id;
    store.outbox_ack("notify", last).await.unwrap();
    // The dispatcher's cursor exists from migration 0006 on: until it has
    // read a row, the row is kept.
    assert_eq!(store.outbox_prune().await.unwrap(), 0, "{backend}");
    store.outbox_ack("dispatch", last).await.unwrap();
    assert!(store
        .outbox_pending("notify", 1000)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.outbox_prune().await.unwrap(), 3, "{backend}");
    assert_eq!(
        entries(store.outbox_pending("inventory", 1000).await.unwrap()),
        pending[3..],
        "{backend}: pruning took nothing a consumer has not passed"
    );
    assert_eq!(store.outbox_prune().await.unwrap(), 0, "{backend}");
    store.outbox_ack("inventory", last).await.unwrap();
    assert_eq!(
        store.outbox_prune().await.unwrap(),
        pending.len() as u64 - 3,
        "{backend}"
    );
    assert_eq!(counts(store).await.outbox, 0, "{backend}");

    // A row that cannot be read is quarantined by the consumer that met it,
    // and the rows after it go on; the quarantine outlives pruning.
    exec(
        store,
        "INSERT INTO outbox (kind, server_id, payload, created_at) VALUES ('server.exploded', NULL, '{}', 0)",
    )
    .await;
    exec(
        store,
        "INSERT INTO outbox (kind, server_id, payload, created_at) VALUES ('model.created', NULL, 'not json', 0)",
    )
    .await;
    svc.update_server(&ServerRef::Id(proxy.id), patch(&[("status", "offline")]))
        .await
        .unwrap();
    let rows = store.outbox_pending("notify", 1000).await.unwrap();
    assert_eq!(rows.len(), 3, "{backend}");
    for row in &rows[..2] {
        let OutboxRow::Unreadable { id, reason } = row else {
            panic!("{backend}: {row:?} should be unreadable");
        };
        store
            .outbox_quarantine("notify", *id, reason)
            .await
            .unwrap();
    }
    let OutboxRow::Entry(change) = &rows[2] else {
        panic!("{backend}: {:?} should be readable", rows[2]);
    };
    assert_eq!(
        (change.kind, change.server_id),
        (ServerUpdated, Some(proxy.id))
    );
    assert_eq!(
        store.outbox_pending("notify", 1000).await.unwrap(),
        rows[2..],
        "{backend}: the quarantined rows no longer block"
    );
    let status = store.outbox_status().await.unwrap();
    let notify = status.iter().find(|c| c.consumer == "notify").unwrap();
    assert_eq!((notify.pending, notify.quarantined), (1, 2), "{backend}");
    store.outbox_ack("notify", change.id).await.unwrap();
    store.outbox_ack("inventory", change.id).await.unwrap();
    store.outbox_ack("test-reader", change.id).await.ok();
    store.outbox_prune().await.unwrap();
    let q = store.outbox_quarantined().await.unwrap();
    assert_eq!(q.len(), 2, "{backend}");
    assert_eq!(q[0].kind, "server.exploded");
    assert_eq!(q[0].reason, "unknown kind \"server.exploded\"");
    assert_eq!(q[1].payload, "not json");
    assert!(
        q[1].reason.starts_with("payload is not JSON"),
        "{}",
        q[1].reason
    );
}

/// Concurrent creates are group-committed: 200 at once, two of them with a
/// name another one has and one with an unknown model. Each caller gets its
/// own answer: the 197 good ones written with one outbox row each, the
/// duplicates `duplicate_name`, the unknown model `unknown_model`.
async fn group_commit_story(svc: Service<DbStore>) {
    let backend = svc.store().backend();
    svc.create_model("web", "", &[]).await.unwrap();
    let before = counts(svc.store()).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200usize {
        let svc = svc.clone();
        // 50 and 120 repeat 10's name; 77 names a model that does not exist.
        let n = if i == 50 || i == 120 { 10 } else { i };
        let model = if i == 77 { "nosuch" } else { "web" };
        tasks.spawn(async move {
            let r = svc
                .create_server(patch(&[
                    ("name", &format!("gc{n:03}.example.org")),
                    ("model", model),
                ]))
                .await;
            (i, r)
        });
    }
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            (i, Ok(s)) => ok.push((i, s)),
            (i, Err(e)) => errors.push((i, e.code())),
        }
    }
    errors.sort();
    // Of 10, 50 and 120 one wins (whichever was written first), two lose.
    let dup_losers: Vec<_> = errors.iter().filter(|e| e.1 == "duplicate_name").collect();
    assert_eq!(dup_losers.len(), 2, "{backend}: {errors:?}");
    assert!(
        errors.contains(&(77, "unknown_model")),
        "{backend}: {errors:?}"
    );
    assert_eq!(errors.len(), 3, "{backend}: {errors:?}");
    assert_eq!(ok.len(), 197, "{backend}");
    for (i, s) in &ok {
        let n = if *i == 50 || *i == 120 { 10 } else { *i };
        assert_eq!(s.name, format!("gc{n:03}.example.org"), "{backend}");
        assert!(s.id > 0);
        let stored = svc.get_server(&ServerRef::Id(s.id)).await.unwrap();
        assert_eq!(&stored, s, "{backend}: answer is what was stored");
    }
    let after = counts(svc.store()).await;
    assert_eq!(after.servers - before.servers, 197, "{backend}");
    assert_eq!(
        after.outbox - before.outbox,
        197,
        "{backend}: one outbox row each"
    );
    let pending = all_changes(svc.store()).await;
    let created: std::collections::HashSet<i64> = pending
        .iter()
        .filter(|e| e.kind == OutboxKind::ServerCreated)
        .filter_map(|e| e.server_id)
        .collect();
    assert!(ok.iter().all(|(_, s)| created.contains(&s.id)), "{backend}");
}

/// Writers that interleave lose nothing. A copy read before a rekey is
/// written back as a status change: the new key stays. A patch made from a
/// stale revision is refused (`conflict`) and writes nothing. Patches
/// without a revision, at once, each land. The key columns are never
/// written by a patch, even through the store.
async fn interleaving_story(svc: Service<DbStore>) {
    let backend = svc.store().backend();
    let keys_dir = tempfile::tempdir().unwrap();
    let svc = svc.with_keys(KeyIssuer::new(keys_dir.path(), 2048).unwrap());
    svc.create_model("web", "", &[]).await.unwrap();
    let created = svc
        .create_server(patch(&[("name", "web01.example.org"), ("model", "web")]))
        .await
        .unwrap();
    assert_eq!(created.revision, 1, "{backend}");
    assert_eq!(created.status, Status::KeysIssued);
    let by = ServerRef::Id(created.id);

    // The acceptor reads the server, then waits on a wheel call; meanwhile
    // an operator rekeys it.
    let stale = svc.get_server(&by).await.unwrap();
    let (_, rekeyed) = svc.rekey_server(&by).await.unwrap();
    assert_ne!(rekeyed.public_key, stale.public_key, "{backend}");
    assert_eq!(rekeyed.revision, 2, "{backend}");
    let fp = rekeyed.public_key.as_deref().map(fingerprint);
    assert_eq!(rekeyed.key_fingerprint, fp, "derived from the public key");

    // The acceptor's status change from its stale copy keeps the new key.
    let registered = svc
        .set_status(&stale, Status::Registered)
        .await
        .unwrap()
        .expect("keys-issued → registered");
    assert_eq!(registered.status, Status::Registered);
    assert_eq!(
        registered.public_key, rekeyed.public_key,
        "{backend}: key kept"
    );
    assert_eq!(registered.key_fingerprint, rekeyed.key_fingerprint);
    assert_eq!(registered.revision, 3);
    assert_eq!(svc.get_server(&by).await.unwrap(), registered);

    // A second change from the same stale copy: its status moved on, so
    // nothing is written (no row, no outbox entry).
    let before = counts(svc.store()).await;
    assert_eq!(svc.set_status(&stale, Status::Online).await.unwrap(), None);
    assert_eq!(counts(svc.store()).await, before);
    assert_eq!(svc.get_server(&by).await.unwrap(), registered);
    // An explicit transition from allowed statuses.
    let online = svc
        .transition(
            created.id,
            &[Status::Registered, Status::Offline],
            Status::Online,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!((online.status, online.revision), (Status::Online, 4));
    refused!(
        svc,
        "not_found",
        svc.transition(999_999, &[Status::Online], Status::Offline)
    );

    // A patch made from a stale revision: conflict, the row unchanged.
    let mut stale_patch = patch(&[("external_ip", "192.0.2.4"), ("status", "offline")]);
    stale_patch.revision = Some(stale.revision);
    let e = refused!(svc, "conflict", svc.update_server(&by, stale_patch));
    assert!(
        matches!(
            e,
            Error::Conflict {
                expected: 1,
                current: 4,
                ..
            }
        ),
        "{backend}: {e:?}"
    );
    assert_eq!(svc.get_server(&by).await.unwrap(), online);
    // Through the store too (the revision check is in the UPDATE itself),
    // and for a key written from a stale read.
    refused!(svc, "conflict", svc.store().update_server(&stale));
    let other = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----";
    let columns = KeyColumns {
        public_key: other,
        fingerprint: &fingerprint(other),
    };
    refused!(
        svc,
        "conflict",
        svc.store()
            .set_server_key(created.id, stale.revision, &columns, Status::KeysIssued)
    );
    assert_eq!(svc.get_server(&by).await.unwrap(), online);

    // From the current revision: applied; the key columns are not patchable.
    let mut current = patch(&[("external_ip", "192.0.2.4")]);
    current.revision = Some(online.revision);
    let patched = svc.update_server(&by, current).await.unwrap();
    assert_eq!(patched.external_ip, Some("192.0.2.4".parse().unwrap()));
    assert_eq!((patched.status, patched.revision), (Status::Online, 5));
    assert_eq!(patched.public_key, rekeyed.public_key);
    refused!(svc, "invalid_value", async {
        ServerPatch::default().set("key_fingerprint", "aa:bb")
    });
    // A whole row written back through the store with the right revision
    // but an old key: every patchable column is written, the key is not.
    let mut old_key = patched.clone();
    old_key.public_key = stale.public_key.clone();
    old_key.key_fingerprint = stale.key_fingerprint.clone();
    old_key.minion_id = "someone-else".into();
    let written = svc.store().update_server(&old_key).await.unwrap();
    assert_eq!(written.public_key, rekeyed.public_key, "{backend}");
    assert_eq!(written.key_fingerprint, rekeyed.key_fingerprint);
    assert_eq!(written.minion_id, created.minion_id);
    assert_eq!(written.revision, 6);

    // Patches without a revision, all at once: each lands (re-read and
    // reapplied when another got in first), none undoes another.
    let changes = [
        ("external_ip", "198.51.100.7"),
        ("internal_ip", "10.0.0.7"),
        ("external_interface", "eth1"),
        ("users", "alice,bob"),
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for (k, v) in changes {
        let svc = svc.clone();
        let by = by.clone();
        tasks.spawn(async move { svc.update_server(&by, patch(&[(k, v)])).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    let last = svc.get_server(&by).await.unwrap();
    assert_eq!(
        last.external_ip,
        Some("198.51.100.7".parse().unwrap()),
        "{backend}"
    );
    assert_eq!(
        last.internal_ip,
        Some("10.0.0.7".parse().unwrap()),
        "{backend}"
    );
    assert_eq!(
        last.external_interface.as_deref(),
        Some("eth1"),
        "{backend}"
    );
    assert_eq!(last.users, ["alice", "bob"], "{backend}");
    assert_eq!(last.revision, 10, "{backend}: one revision per write");
    assert_eq!(last.public_key, rekeyed.public_key);

    // Every write announced the row as stored, revision included.
    let pending = all_changes(svc.store()).await;
    let announced: Server =
        serde_json::from_value(pending.last().unwrap().payload.clone()).unwrap();
    assert_eq!(announced, last, "{backend}");
    let revisions: Vec<i64> = pending
        .iter()
        .filter(|e| e.server_id == Some(created.id))
        .map(|e| e.payload["revision"].as_i64().unwrap())
        .collect();
    assert_eq!(revisions, (1..=10).collect::<Vec<_>>(), "{backend}");
}

#[tokio::test]
async fn registry_interleaved_writes_on_sqlite() {
    let db = TestDb::sqlite();
    interleaving_story(registry::open(&db.url).await.unwrap()).await;
}

#[tokio::test]
async fn registry_interleaved_writes_on_postgres() {
    let db = TestDb::postgres_required().await;
    interleaving_story(registry::open(&db.url).await.unwrap()).await;
}

#[tokio::test]
async fn registry_group_commit_on_sqlite() {
    let db = TestDb::sqlite();
    group_commit_story(registry::open(&db.url).await.unwrap()).await;
}

#[tokio::test]
async fn registry_group_commit_on_postgres() {
    let db = TestDb::postgres_required().await;
    group_commit_story(registry::open(&db.url).await.unwrap()).await;
}

/// A cursor never passes a change that commits late: writers racing on
/// several connections while a consumer reads and acknowledges as fast as it
/// can, and the consumer sees every change. (On PostgreSQL ids come from a
/// sequence at insert time; without the order lock a later id can commit
/// first and the cursor skip the earlier one.)
async fn concurrent_cursor_story(svc: Service<DbStore>) {
    let backend = svc.store().backend();
    let svc = std::sync::Arc::new(svc);
    svc.create_model("web", "", &[]).await.unwrap();
    let store = svc.store();
    store.outbox_subscribe("racer").await.unwrap();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let svc = svc.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    svc.create_model(&format!("w{w}-{i}"), "", &[])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut done = false;
    while !done {
        done = writers.iter().all(|w| w.is_finished());
        for e in entries(store.outbox_pending("racer", 1000).await.unwrap()) {
            assert!(seen.insert(e.id), "{backend}: {} seen twice", e.id);
            store.outbox_ack("racer", e.id).await.unwrap();
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    let all: std::collections::BTreeSet<i64> =
        all_changes(store).await.iter().map(|e| e.id).collect();
    let missed: Vec<_> = all.difference(&seen).collect();
    assert!(missed.is_empty(), "{backend}: the cursor passed {missed:?}");
    assert_eq!(seen.len(), 401, "{backend}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_cursor_misses_nothing_on_sqlite() {
    let db = TestDb::sqlite();
    concurrent_cursor_story(registry::open(&db.url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_cursor_misses_nothing_on_postgres() {
    let db = TestDb::postgres_required().await;
    concurrent_cursor_story(registry::open(&db.url).await.unwrap()).await;
}

/// The story on `db`, then a reopen: migrations run once, the data stays.
async fn story_and_reopen(db: &TestDb, backend: &str) {
    let svc = registry::open(&db.url).await.unwrap();
    assert_eq!(svc.store().backend(), backend);
    story(svc).await;
    let svc = registry::open(&db.url).await.unwrap();
    assert_eq!(
        svc.find_servers(&ServerFilter::default())
            .await
            .unwrap()
            .len(),
        2
    );
}

/// Migration 0004 hands the one-consumer `processed_at` over to the `notify`
/// cursor: the notifier goes on before the oldest unprocessed entry (nothing
/// skipped), or after the last one when all were processed (nothing fired
/// twice), and a fresh registry gets no cursor until a consumer subscribes.
#[tokio::test]
async fn registry_outbox_migration_keeps_the_notifier_position() {
    async fn migrated(processed: &[bool]) -> Option<i64> {
        let db = TestDb::sqlite();
        let pool = sqlx::SqlitePool::connect(&format!("{}?mode=rwc", db.url))
            .await
            .unwrap();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite");
        let run = |file: &str| std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        for f in [
            "0001_registry.sql",
            "0002_server_public_key.sql",
            "0003_server_revision.sql",
        ] {
            sqlx::raw_sql(&run(f)).execute(&pool).await.unwrap();
        }
        for (i, done) in processed.iter().enumerate() {
            sqlx::query(
                "INSERT INTO outbox (kind, payload, created_at, processed_at) VALUES ('model.created', $1, 0, $2)",
            )
            .bind(format!("{{\"n\": {i}}}"))
            .bind(done.then_some(1_i64))
            .execute(&pool)
            .await
            .unwrap();
        }
        sqlx::raw_sql(&run("0004_outbox_cursors.sql"))
            .execute(&pool)
            .await
            .unwrap();
        let position =
            sqlx::query_scalar("SELECT position FROM outbox_cursors WHERE consumer = 'notify'")
                .fetch_optional(&pool)
                .await
                .unwrap();
        pool.close().await;
        position
    }
    assert_eq!(migrated(&[true, true, false, true]).await, Some(2));
    assert_eq!(migrated(&[true, true, true]).await, Some(3));
    assert_eq!(migrated(&[false, false]).await, Some(0));
    assert_eq!(migrated(&[]).await, None);
}

#[tokio::test]
async fn registry_story_on_sqlite() {
    story_and_reopen(&TestDb::sqlite(), "sqlite").await;
}

#[tokio::test]
async fn registry_story_on_postgres() {
    story_and_reopen(&TestDb::postgres_required().await, "postgres").await;
}

#[tokio::test]
async fn registry_sqlite_enforces_foreign_keys_on_every_connection() {
    let db = TestDb::sqlite();
    let svc = registry::open(&db.url).await.unwrap();
    let DbStore::Sqlite(s) = svc.store() else {
        unreachable!()
    };
    // Several pooled connections: each must have the pragma on.
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut c = s.pool().acquire().await.unwrap();
        let on: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&mut *c)
            .await
            .unwrap();
        assert_eq!(on, 1);
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *c)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        conns.push(c);
    }
}

#[tokio::test]
async fn registry_refuses_an_unknown_url_scheme() {
    let e = registry::open("mysql://localhost/x").await.unwrap_err();
    assert_eq!(e.code(), "invalid_value");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Whatever order and repetition of acknowledgements: each moves the
    /// cursor at most once, what is pending is what is past the furthest one,
    /// in order, and pruning keeps what the other consumer has not passed.
    #[test]
    fn registry_outbox_acknowledging_is_idempotent(
        n in 1usize..8,
        acks in proptest::collection::vec(0usize..8, 0..24),
        other in 0usize..8,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let db = TestDb::sqlite();
            let svc = registry::open(&db.url).await.unwrap();
            let store = svc.store();
            for i in 0..n {
                svc.create_model(&format!("m{i}"), "", &[]).await.unwrap();
            }
            store.outbox_subscribe("a").await.unwrap();
            store.outbox_subscribe("b").await.unwrap();
            let all = entries(store.outbox_pending("a", 100).await.unwrap());
            assert_eq!(all.len(), n);
            let mut furthest: Option<usize> = None;
            for &m in acks.iter().filter(|&&m| m < n) {
                let moved = store.outbox_ack("a", all[m].id).await.unwrap();
                assert_eq!(moved, furthest.is_none_or(|f| m > f), "ack {m} after {furthest:?}");
                furthest = furthest.max(Some(m));
            }
            let left: Vec<i64> = entries(store.outbox_pending("a", 100).await.unwrap())
                .iter()
                .map(|e| e.id)
                .collect();
            let from = furthest.map_or(0, |f| f + 1);
            let expect: Vec<i64> = all[from..].iter().map(|e| e.id).collect();
            assert_eq!(left, expect);
            let other = other.min(n - 1);
            store.outbox_ack("b", all[other].id).await.unwrap();
            // The dispatcher's cursor (migration 0006) has read everything.
            store.outbox_ack("dispatch", all[n - 1].id).await.unwrap();
            let pruned = store.outbox_prune().await.unwrap();
            assert_eq!(pruned as usize, furthest.map_or(0, |f| f.min(other) + 1));
        });
    }
}

/// The CLI end to end on a SQLite file: ids printed, JSON records, exit codes
/// and one-line errors.
#[test]
fn registry_cli_adds_shows_sets_and_removes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    let db = dir.path().join("state/registry.db");
    std::fs::write(
        &cfg,
        format!(
            "registry: sqlite://{}\nkeys: {{dir: {}}}\n",
            db.display(),
            dir.path().join("keys").display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| run_cli(&cfg, args);
    let (code, out, err) = run(&["model", "add", "web", "--state", "nginx"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "1");
    let (code, out, err) = run(&[
        "server",
        "add",
        "web01.example.org",
        "--model",
        "web",
        "--external-ip",
        "192.0.2.9",
        "--user",
        "alice",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "1");
    let (code, out, _) = run(&[
        "server",
        "add",
        "web02.example.org",
        "--model",
        "web",
        "--json",
    ]);
    assert_eq!(code, Some(0));
    let s: Server = serde_json::from_str(&out).unwrap();
    assert_eq!((s.id, s.name.as_str()), (2, "web02.example.org"));

    let (code, _, err) = run(&[
        "server",
        "set",
        "web01.example.org",
        "status=online",
        "users=alice,bob",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = run(&["server", "show", "1", "--json"]);
    let s: Server = serde_json::from_str(&out).unwrap();
    assert_eq!(s.status, Status::Online);
    assert_eq!(s.users, ["alice", "bob"]);
    assert_eq!(s.external_ip, Some("192.0.2.9".parse().unwrap()));
    let (_, out, _) = run(&["server", "list", "--json"]);
    let all: Vec<Server> = serde_json::from_str(&out).unwrap();
    assert_eq!(all.len(), 2);
    let (_, out, _) = run(&["server", "list"]);
    assert_eq!(out.lines().count(), 2, "{out}");

    for (args, needle) in [
        (
            &["server", "add", "bad_name", "--model", "web"][..],
            "invalid hostname",
        ),
        (
            &["server", "add", "db1", "--model", "db"][..],
            "no model named \"db\"",
        ),
        (
            &["server", "add", "web01.example.org", "--model", "web"][..],
            "already exists",
        ),
        (&["model", "rm", "web"][..], "used by 2 server(s)"),
        (&["server", "set", "1", "colour=red"][..], "unknown key"),
        (
            &["server", "set", "1", "revision=1", "users=carol"][..],
            "changed meanwhile",
        ),
        (
            &["server", "set", "1", "key_fingerprint=aa"][..],
            "never patched",
        ),
        (&["server", "show", "ghost"][..], "no server ghost"),
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let (code, _, err) = run(&["server", "set", "1"]);
    assert_eq!(code, Some(2), "KEY=VALUE is required: {err}");

    assert_eq!(run(&["server", "rm", "web01.example.org"]).0, Some(0));
    assert_eq!(run(&["server", "rm", "2"]).0, Some(0));
    assert_eq!(run(&["model", "rm", "web"]).0, Some(0));
    let (_, out, _) = run(&["model", "list", "--json"]);
    assert_eq!(out.trim(), "[]");
}

/// Runs `salt-steward --config CFG ARGS…`: exit code, stdout, stderr.
fn run_cli(cfg: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = steward()
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

// ------------------------------------------------ inventory (issue #12)

/// Port and hostname forwards: every refusal its own error, nothing written
/// (no forward, no outbox row); the database refuses what the service would;
/// deleting or moving a server that forwards name is refused, naming them;
/// the dispatcher's records bump, claim and finish by compare-and-set.
async fn inventory_story(svc: Service<DbStore>) {
    use registry::dispatch::{Debounce, Finish};
    use registry::store::DispatchStore as _;
    use registry::{DispatchStatus, Proto, StateKind};
    svc.create_model("vm", "", &[]).await.unwrap();
    let mk = |pairs: &[(&str, &str)]| patch(pairs);
    let host = svc
        .create_server(mk(&[
            ("name", "pve1"),
            ("model", "vm"),
            ("is_proxmox_host", "true"),
            ("external_interface", "vmbr0"),
            ("internal_network", "10.99.0.0/24"),
        ]))
        .await
        .unwrap();
    let bare = svc
        .create_server(mk(&[
            ("name", "pve2"),
            ("model", "vm"),
            ("is_proxmox_host", "true"),
        ]))
        .await
        .unwrap();
    let vm = svc
        .create_server(mk(&[
            ("name", "vm1"),
            ("model", "vm"),
            ("is_vm", "true"),
            ("vm_host", "pve1"),
            ("internal_ip", "10.99.0.5"),
        ]))
        .await
        .unwrap();
    let other = svc
        .create_server(mk(&[
            ("name", "vm2"),
            ("model", "vm"),
            ("is_vm", "true"),
            ("vm_host", "pve2"),
            ("internal_ip", "10.98.0.5"),
        ]))
        .await
        .unwrap();
    let h = ServerRef::Name("pve1".into());
    let v = ServerRef::Name("vm1".into());
    let pf = svc
        .create_port_forward(&h, &v, Proto::Tcp, 2222, 22)
        .await
        .unwrap();
    assert_eq!((pf.host.as_str(), pf.dest.as_str()), ("pve1", "vm1"));
    assert_eq!(pf.dest_ip, Some("10.99.0.5".parse().unwrap()));
    // The same port on another protocol is another forward.
    svc.create_port_forward(&h, &v, Proto::Udp, 2222, 53)
        .await
        .unwrap();
    let forwards = || async { svc.list_port_forwards(None).await.unwrap().len() };
    refused!(
        svc,
        "duplicate_forward",
        svc.create_port_forward(&h, &v, Proto::Tcp, 2222, 80)
    );
    refused!(
        svc,
        "not_a_guest",
        svc.create_port_forward(&h, &ServerRef::Name("vm2".into()), Proto::Tcp, 3333, 80)
    );
    refused!(
        svc,
        "not_a_host",
        svc.create_port_forward(
            &ServerRef::Name("pve2".into()),
            &ServerRef::Name("vm2".into()),
            Proto::Tcp,
            1,
            1
        )
    );
    refused!(
        svc,
        "invalid_value",
        svc.create_port_forward(&h, &v, Proto::Tcp, 0, 22)
    );
    refused!(
        svc,
        "invalid_value",
        svc.create_port_forward(&h, &v, Proto::Tcp, 22, 65536)
    );
    refused!(
        svc,
        "not_found",
        svc.create_port_forward(&ServerRef::Name("nope".into()), &v, Proto::Tcp, 22, 22)
    );
    assert_eq!(forwards().await, 2);

    // Hostname forwards: vm1's host has no proxy yet.
    refused!(
        svc,
        "no_proxy",
        svc.create_hostname_forward("a.test", &v, None, Some(8080), None)
    );
    let proxy = svc
        .create_server(mk(&[
            ("name", "proxy1"),
            ("model", "vm"),
            ("is_vm", "true"),
            ("vm_host", "pve1"),
            ("internal_ip", "10.99.0.2"),
        ]))
        .await
        .unwrap();
    svc.update_server(&h, mk(&[("nginx_proxy", "proxy1")]))
        .await
        .unwrap();
    let hf = svc
        .create_hostname_forward("A.Test", &v, None, Some(8080), None)
        .await
        .unwrap();
    assert_eq!(
        (
            hf.domain.as_str(),
            hf.listen_port,
            hf.dest_port,
            hf.path.as_str(),
            hf.proxy_id
        ),
        ("a.test", 80, 8080, "/", proxy.id)
    );
    refused!(
        svc,
        "duplicate_forward",
        svc.create_hostname_forward("a.TEST", &v, Some(80), None, None)
    );
    refused!(
        svc,
        "invalid_value",
        svc.create_hostname_forward("a..test", &v, None, None, None)
    );
    refused!(
        svc,
        "invalid_value",
        svc.create_hostname_forward("b.test", &v, Some(70000), None, None)
    );
    refused!(
        svc,
        "invalid_value",
        svc.create_hostname_forward("b.test", &v, None, None, Some("x;"))
    );
    refused!(
        svc,
        "not_a_guest",
        svc.create_hostname_forward("b.test", &h, None, None, None)
    );
    // Another listen port is another site.
    svc.create_hostname_forward("a.test", &v, Some(8443), Some(8080), Some("/app"))
        .await
        .unwrap();

    // Servers the forwards name cannot be deleted or moved.
    let err = refused!(svc, "server_in_use", svc.delete_server(&v));
    assert!(err.to_string().contains("port forward #"), "{err}");
    assert!(err.to_string().contains("hostname forward #"), "{err}");
    refused!(
        svc,
        "server_in_use",
        svc.update_server(&v, mk(&[("vm_host", "pve2")]))
    );
    refused!(
        svc,
        "server_in_use",
        svc.update_server(&v, mk(&[("internal_ip", "")]))
    );
    refused!(
        svc,
        "server_in_use",
        svc.update_server(&h, mk(&[("internal_network", "")]))
    );
    refused!(
        svc,
        "server_in_use",
        svc.update_server(&h, mk(&[("nginx_proxy", "")]))
    );
    // A harmless change goes through.
    svc.update_server(&v, mk(&[("internal_ip", "10.99.0.6")]))
        .await
        .unwrap();
    let moved = svc.get_port_forward(pf.id).await.unwrap();
    assert_eq!(moved.dest_ip, Some("10.99.0.6".parse().unwrap()));

    // The database holds the rules whatever writes.
    let store = svc.store();
    let before = counts(store).await;
    for bad in [
        format!("INSERT INTO port_forwards (host_id, dest_id, proto, source_port, dest_port, created_at, updated_at) VALUES ({}, {}, 'tcp', 2222, 1, 0, 0)", host.id, vm.id),
        format!("INSERT INTO port_forwards (host_id, dest_id, proto, source_port, dest_port, created_at, updated_at) VALUES ({}, {}, 'tcp', 4444, 1, 0, 0)", host.id, other.id),
        format!("INSERT INTO port_forwards (host_id, dest_id, proto, source_port, dest_port, created_at, updated_at) VALUES ({}, {}, 'icmp', 4444, 1, 0, 0)", host.id, vm.id),
        format!("INSERT INTO port_forwards (host_id, dest_id, proto, source_port, dest_port, created_at, updated_at) VALUES ({}, {}, 'tcp', 70000, 1, 0, 0)", host.id, vm.id),
        format!("INSERT INTO hostname_forwards (domain, dest_id, host_id, proxy_id, listen_port, dest_port, created_at, updated_at) VALUES ('a.test', {}, {}, {}, 80, 1, 0, 0)", vm.id, host.id, proxy.id),
        format!("INSERT INTO hostname_forwards (domain, dest_id, host_id, proxy_id, listen_port, dest_port, created_at, updated_at) VALUES ('B.test', {}, {}, {}, 80, 1, 0, 0)", vm.id, host.id, proxy.id),
        format!("INSERT INTO hostname_forwards (domain, dest_id, host_id, proxy_id, listen_port, dest_port, created_at, updated_at) VALUES ('c.test', {}, {}, {}, 80, 1, 0, 0)", vm.id, host.id, bare.id),
        format!("UPDATE servers SET vm_host = {} WHERE id = {}", bare.id, vm.id),
        format!("DELETE FROM servers WHERE id = {}", vm.id),
    ] {
        let res = match store {
            DbStore::Sqlite(s) => sqlx::query(&bad).execute(s.pool()).await.map(|_| ()),
            DbStore::Postgres(p) => sqlx::query(&bad).execute(p.pool()).await.map(|_| ()),
        };
        assert!(res.is_err(), "the database accepted: {bad}");
    }
    assert_eq!(counts(store).await, before);
    assert_eq!(forwards().await, 2);

    // Outbox rows name their targets; the notifier tag follows the kind.
    let changes = all_changes(store).await;
    let pf_rows: Vec<_> = changes
        .iter()
        .filter(|e| e.kind == OutboxKind::PortForwardCreated)
        .collect();
    assert_eq!(pf_rows.len(), 2);
    assert_eq!(pf_rows[0].payload["targets"], serde_json::json!([host.id]));

    // Dispatcher records: a bump creates the target, due after the debounce;
    // a claim is compare-and-set; the end of a run is fenced by its jid.
    store.outbox_subscribe("dispatch").await.unwrap();
    let d = Debounce {
        debounce_ms: 0,
        max_delay_ms: 1000,
    };
    let last = changes.last().unwrap().id;
    store
        .dispatch_bump("dispatch", last, &[(host.id, StateKind::Portfwd)], d)
        .await
        .unwrap();
    store
        .dispatch_bump("dispatch", last, &[(host.id, StateKind::Portfwd)], d)
        .await
        .unwrap();
    let due = store.dispatch_due(i64::MAX, 10, None).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].desired, due[0].status),
        (last, DispatchStatus::Pending)
    );
    let claimed = store
        .dispatch_claim(
            host.id,
            StateKind::Portfwd,
            last,
            "20261202000000000001",
            "d",
            i64::MAX,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.status, DispatchStatus::Running);
    assert_eq!(
        store.dispatch_status_counts().await.unwrap(),
        [(DispatchStatus::Running, 1)]
    );
    assert!(store
        .dispatch_claim(
            host.id,
            StateKind::Portfwd,
            last,
            "20261202000000000002",
            "d",
            i64::MAX,
        )
        .await
        .unwrap()
        .is_none());
    // A bump during the run keeps it running; its end makes it pending again.
    store
        .dispatch_bump("dispatch", last + 1, &[(host.id, StateKind::Portfwd)], d)
        .await
        .unwrap();
    let ok = Finish::Applied {
        hash: "h".into(),
        summary: "{}".into(),
    };
    assert!(store
        .dispatch_finish(
            host.id,
            StateKind::Portfwd,
            "20261202000000000009",
            claimed.lease_epoch,
            &ok,
        )
        .await
        .unwrap()
        .is_none());
    let after = store
        .dispatch_finish(
            host.id,
            StateKind::Portfwd,
            "20261202000000000001",
            claimed.lease_epoch,
            &ok,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (after.applied, after.status),
        (last, DispatchStatus::Pending)
    );
    assert!(store
        .dispatch_unchanged(host.id, StateKind::Portfwd, last + 1)
        .await
        .unwrap());
    let t = &store.dispatch_targets_of(host.id).await.unwrap()[0];
    assert_eq!((t.applied, t.status), (last + 1, DispatchStatus::Done));
    assert_eq!(
        store.dispatch_status_counts().await.unwrap(),
        [(DispatchStatus::Done, 1)]
    );
    let runs = store.dispatch_runs(host.id, 10).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].outcome.as_deref(), Some("done"));
    let affected = store.dispatch_affected(vm.id).await.unwrap();
    assert!(
        affected.contains(&(host.id, StateKind::Portfwd)),
        "{affected:?}"
    );
    assert!(
        affected.contains(&(proxy.id, StateKind::Hostfwd)),
        "{affected:?}"
    );
}

#[tokio::test]
async fn registry_inventory_on_sqlite() {
    let db = TestDb::sqlite();
    inventory_story(registry::open(&db.url).await.unwrap()).await;
}

#[tokio::test]
async fn registry_inventory_on_postgres() {
    let db = TestDb::postgres_required().await;
    inventory_story(registry::open(&db.url).await.unwrap()).await;
}

/// `forward port|hostname add|list|rm`, `server add --internal-network`,
/// `dispatch list` and `status` as operators type them; a refused forward
/// exits 1 naming the problem and writes nothing.
#[test]
fn registry_cli_forwards() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    let db = dir.path().join("registry.db");
    std::fs::write(
        &cfg,
        format!(
            "registry: sqlite://{}\nkeys: {{dir: {}}}\n",
            db.display(),
            dir.path().join("keys").display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| run_cli(&cfg, args);
    let ok = |args: &[&str]| {
        let (code, out, err) = run(args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        out
    };
    ok(&["model", "add", "vm"]);
    ok(&[
        "server",
        "add",
        "pve1",
        "--model",
        "vm",
        "--proxmox-host",
        "--external-interface",
        "vmbr0",
        "--internal-network",
        "10.99.0.0/24",
    ]);
    ok(&[
        "server",
        "add",
        "proxy1",
        "--model",
        "vm",
        "--vm-host",
        "pve1",
        "--internal-ip",
        "10.99.0.2",
    ]);
    ok(&["server", "set", "pve1", "nginx_proxy=proxy1"]);
    ok(&[
        "server",
        "add",
        "vm1",
        "--model",
        "vm",
        "--vm-host",
        "pve1",
        "--internal-ip",
        "10.99.0.5",
    ]);
    ok(&[
        "server",
        "add",
        "lone",
        "--model",
        "vm",
        "--internal-ip",
        "10.99.0.9",
    ]);
    assert!(ok(&["server", "show", "pve1"]).contains("internal_network: 10.99.0.0/24"));
    let id = ok(&[
        "forward",
        "port",
        "add",
        "pve1",
        "vm1",
        "--proto",
        "tcp",
        "--port",
        "18080",
        "--to-port",
        "8080",
    ]);
    assert_eq!(id.trim(), "1");
    let (code, _, err) = run(&[
        "forward",
        "port",
        "add",
        "pve1",
        "vm1",
        "--proto",
        "tcp",
        "--port",
        "18080",
        "--to-port",
        "81",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is taken by port forward #1"), "{err}");
    let (code, _, err) = run(&[
        "forward",
        "port",
        "add",
        "pve1",
        "lone",
        "--proto",
        "udp",
        "--port",
        "53",
        "--to-port",
        "53",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not a guest of pve1"), "{err}");
    let (code, _, err) = run(&[
        "forward",
        "port",
        "add",
        "pve1",
        "vm1",
        "--proto",
        "sctp",
        "--port",
        "1",
        "--to-port",
        "1",
    ]);
    assert_eq!(code, Some(1), "{err}");
    let listed: Json = serde_json::from_str(&ok(&[
        "forward", "port", "list", "--host", "pve1", "--json",
    ]))
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["dest_ip"], "10.99.0.5");
    let hid = ok(&[
        "forward",
        "hostname",
        "add",
        "A.test",
        "vm1",
        "--port",
        "8081",
        "--to-port",
        "8080",
    ]);
    assert_eq!(hid.trim(), "1");
    let (code, _, err) = run(&[
        "forward", "hostname", "add", "a.test", "vm1", "--port", "8081",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is taken"), "{err}");
    let (code, _, err) = run(&["forward", "hostname", "add", "not a domain", "vm1"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("domain"), "{err}");
    let hosts: Json =
        serde_json::from_str(&ok(&["forward", "hostname", "list", "--json"])).unwrap();
    assert_eq!(hosts[0]["domain"], "a.test");
    assert_eq!(hosts[0]["proxy"], "proxy1");
    let (code, _, err) = run(&["server", "rm", "vm1"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("port forward #1") && err.contains("hostname forward #1"),
        "{err}"
    );
    ok(&["forward", "port", "rm", "1"]);
    ok(&["forward", "hostname", "rm", "1"]);
    assert_eq!(ok(&["forward", "port", "list", "--json"]).trim(), "[]");
    // No daemon has read the changes yet: status says so.
    let st: Json = serde_json::from_str(&ok(&["status", "--json"])).unwrap();
    assert_eq!(st["targets"], 0);
    assert_eq!(ok(&["dispatch", "list", "--json"]).trim(), "[]");
    ok(&["server", "rm", "vm1"]);
}
