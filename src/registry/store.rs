//! Persistence: the [`Store`] trait, every SQL statement of the registry, and
//! its two backends.
//!
//! Both backends run the very same SQL text (`$1` placeholders work in SQLite
//! too), and their implementations are one body instantiated twice by
//! `store_impl!`, so a query cannot drift between them. Each writing method is
//! one transaction that also appends its outbox row: on any error it is rolled
//! back (the transaction is dropped) and nothing is written.
//!
//! SQLite: WAL, `synchronous=NORMAL` (a commit survives a crash of the
//! process, not necessarily a power cut: the usual WAL trade), foreign keys on
//! for every connection, file created if missing, write transactions started
//! with `BEGIN IMMEDIATE` so a writer waits for the lock (busy timeout) instead
//! of failing when another process wrote in between.
//! PostgreSQL: the server's defaults (READ COMMITTED); the unique and foreign
//! keys settle races. TLS is rustls (sqlx `tls-rustls-ring-native-roots`):
//! the URL's `sslmode` (`require`, `verify-ca`, `verify-full`) and
//! `sslrootcert` are honoured, roots from the system's store plus that file.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::error::ErrorKind;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row as _;

pub use self::backup::{BackupFilter, BackupStore, NewBackup};
pub use self::cluster::ClusterStore;
pub use self::dispatch::{DispatchStore, EXPIRED_LEASE_BACKOFF_MS};
pub use self::exec::ExecStore;
pub use self::inventory::{InventoryStore, NewHostnameForward, NewPortForward};
pub use self::shares::{NewShare, ShareStore};
pub use self::users::{NewSession, NewToken, NewUser, UserStore};
use super::dispatch::{
    Debounce, DispatchRun, DispatchStatus, DispatchTarget, Finish, Here, StateKind,
};
use super::exec::{ExecEnd, ExecRecord, NewExec};
use super::inventory::{HostnameForward, PortForward};
use super::outbox::{self, ConsumerStatus, OutboxRow, Quarantined};
use super::{Error, OutboxKind, Server, ServerModel, Status};

/// How the service reads and writes the registry. Writing methods append the
/// outbox row of their change in the same transaction.
pub trait Store:
    InventoryStore
    + DispatchStore
    + ShareStore
    + BackupStore
    + UserStore
    + Send
    + Sync
    + Clone
    + 'static
{
    /// Inserts a model (its `id` is ignored) and returns it with its id.
    fn insert_model(
        &self,
        model: &ServerModel,
    ) -> impl Future<Output = Result<ServerModel, Error>> + Send;
    /// The model called `name`.
    fn model(&self, name: &str) -> impl Future<Output = Result<Option<ServerModel>, Error>> + Send;
    /// All models, by name.
    fn models(&self) -> impl Future<Output = Result<Vec<ServerModel>, Error>> + Send;
    /// Up to `limit` models with an id above `after`, by id (a page of the
    /// HTTP list).
    fn models_page(
        &self,
        after: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<ServerModel>, Error>> + Send;
    /// Rewrites the model with `model.id`.
    fn update_model(
        &self,
        model: &ServerModel,
    ) -> impl Future<Output = Result<ServerModel, Error>> + Send;
    /// Deletes the model called `name`, refused while servers use it.
    fn delete_model(&self, name: &str) -> impl Future<Output = Result<ServerModel, Error>> + Send;

    /// Inserts a server (its `id` is ignored; `model` is a model name) and
    /// returns it with its id: [`Store::insert_servers`] with one.
    fn insert_server(&self, server: &Server) -> impl Future<Output = Result<Server, Error>> + Send {
        async move {
            self.insert_servers(std::slice::from_ref(server))
                .await?
                .pop()
                .ok_or_else(|| Error::Database {
                    op: format!("creating server {}: no row returned", server.name),
                    source: sqlx::Error::RowNotFound,
                })
        }
    }
    /// Inserts several servers in one transaction, with one multi-row
    /// statement per table (group commit): all are written or none. Returned
    /// in the order given.
    fn insert_servers(
        &self,
        servers: &[Server],
    ) -> impl Future<Output = Result<Vec<Server>, Error>> + Send;
    /// One server, by id, name or minion id.
    fn server(
        &self,
        key: ServerKey<'_>,
    ) -> impl Future<Output = Result<Option<Server>, Error>> + Send;
    /// Servers matching every given filter, by id.
    fn find_servers(
        &self,
        filter: &Filter<'_>,
    ) -> impl Future<Output = Result<Vec<Server>, Error>> + Send;
    /// How many servers have each status (a status no server has is
    /// absent): counts without reading every row.
    fn server_status_counts(
        &self,
    ) -> impl Future<Output = Result<Vec<(Status, i64)>, Error>> + Send;
    /// Rewrites the patchable columns of the server with `server.id` (not
    /// its minion id, public key or fingerprint) if it is still at
    /// `server.revision`; returns the row as stored. [`Error::Conflict`] when
    /// the row moved on, `NotFound` when it is gone.
    fn update_server(&self, server: &Server) -> impl Future<Output = Result<Server, Error>> + Send;
    /// Sets server `id`'s status to `to` if it is one of `from` (one narrow
    /// `UPDATE … WHERE status IN …`, nothing else of the row is written):
    /// the row after the change, `None` if its status is not in `from`.
    fn set_server_status(
        &self,
        id: i64,
        from: &[Status],
        to: Status,
    ) -> impl Future<Output = Result<Option<Server>, Error>> + Send;
    /// Records a new key of server `id` (public key, its fingerprint and
    /// `status`) if the row is still at `revision`: [`Error::Conflict`] if not.
    fn set_server_key(
        &self,
        id: i64,
        revision: i64,
        key: &KeyColumns<'_>,
        status: Status,
    ) -> impl Future<Output = Result<Server, Error>> + Send;
    /// Deletes server `id`, refused while it is another server's VM host or proxy.
    fn delete_server(&self, id: i64) -> impl Future<Output = Result<Server, Error>> + Send;

    /// Adds `consumer` with its cursor at the start of the outbox (it will
    /// see every change not yet pruned), unless it exists; its position.
    fn outbox_subscribe(&self, consumer: &str) -> impl Future<Output = Result<i64, Error>> + Send;
    /// The oldest rows past `consumer`'s cursor, `limit` at most, readable or
    /// not; `NotFound` for a consumer that never subscribed.
    fn outbox_pending(
        &self,
        consumer: &str,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, Error>> + Send;
    /// `consumer` is done with every entry up to `id`: `true` if this moved
    /// its cursor, `false` if it was there already (idempotent).
    fn outbox_ack(
        &self,
        consumer: &str,
        id: i64,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
    /// Copies row `id` with `reason` to `consumer`'s quarantine and moves its
    /// cursor past it, in one transaction.
    fn outbox_quarantine(
        &self,
        consumer: &str,
        id: i64,
        reason: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// Every consumer: position, pending and quarantined counts.
    fn outbox_status(&self) -> impl Future<Output = Result<Vec<ConsumerStatus>, Error>> + Send;
    /// Every quarantined row.
    fn outbox_quarantined(&self) -> impl Future<Output = Result<Vec<Quarantined>, Error>> + Send;
    /// Deletes the rows every consumer has passed; how many.
    fn outbox_prune(&self) -> impl Future<Output = Result<u64, Error>> + Send;
}

/// The key columns of a server, written together: the fingerprint is the
/// public key's, computed by the caller from it (never patched on its own).
#[derive(Debug, Clone, Copy)]
pub struct KeyColumns<'a> {
    /// clean_key'd SPKI PEM.
    pub public_key: &'a str,
    /// `salt-key -F` fingerprint of `public_key`.
    pub fingerprint: &'a str,
}

/// A unique key of a server.
#[derive(Debug, Clone, Copy)]
pub enum ServerKey<'a> {
    /// Registry id.
    Id(i64),
    /// Hostname.
    Name(&'a str),
    /// Salt minion id.
    MinionId(&'a str),
}

/// Filters of [`Store::find_servers`]; `None` matches anything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Filter<'a> {
    /// Exact hostname.
    pub name: Option<&'a str>,
    /// Model name.
    pub model: Option<&'a str>,
    /// Exact minion id.
    pub minion_id: Option<&'a str>,
    /// Status.
    pub status: Option<Status>,
    /// Changed at or after this time (Unix ms, `updated_at`).
    pub changed_since: Option<i64>,
    /// Changed before this time (Unix ms, `updated_at`): what has been quiet.
    pub changed_before: Option<i64>,
    /// Only ids greater than this: the next page after a last seen id.
    pub after_id: Option<i64>,
    /// At most this many rows (pages keep a sweep's memory bounded).
    pub limit: Option<i64>,
    /// The most recently changed first (`updated_at`, then id, descending)
    /// instead of by id: the last few changes without reading the rest.
    pub newest_first: bool,
}

// ---------------------------------------------------------------- the SQL

/// Columns of a server read back; `model` is the model's name.
macro_rules! select_server {
    ($where:literal) => {
        concat!(
            "SELECT s.id, s.name, m.name AS model, s.minion_id, s.key_fingerprint, s.status, ",
            "s.is_vm, s.vm_host, s.external_ip, s.internal_ip, s.is_proxmox_host, ",
            "s.proxmox_node, s.external_interface, s.nginx_proxy, s.samba_managed, ",
            "s.samba_base_folder, s.users, s.public_key, s.revision, s.internal_network, ",
            "s.created_at, ",
            "s.updated_at ",
            "FROM servers s JOIN models m ON m.id = s.model_id ",
            $where
        )
    };
}

mod sql {
    pub const INSERT_MODEL: &str = "INSERT INTO models (name, description, states, created_at, \
         updated_at) VALUES ($1, $2, $3, $4, $4) RETURNING id";
    pub const MODEL_BY_NAME: &str =
        "SELECT id, name, description, states FROM models WHERE name = $1";
    pub const MODELS: &str = "SELECT id, name, description, states FROM models ORDER BY name";
    pub const MODELS_PAGE: &str =
        "SELECT id, name, description, states FROM models WHERE id > $1 ORDER BY id LIMIT $2";
    pub const UPDATE_MODEL: &str =
        "UPDATE models SET name = $2, description = $3, states = $4, updated_at = $5 WHERE id = $1";
    pub const MODEL_USERS: &str = "SELECT COUNT(*) FROM servers WHERE model_id = $1";
    pub const DELETE_MODEL: &str = "DELETE FROM models WHERE id = $1";

    /// Binds per server row: 18 fields and the time.
    pub const PER_ROW: usize = 19;

    /// Inserts `rows` servers: `PER_ROW` binds per row, in the order of
    /// `bind_server_fields!`; returns `id, name` of each. The model is named,
    /// not numbered: an unknown one makes model_id NULL, which the NOT NULL
    /// constraint refuses (mapped to UnknownModel).
    pub fn insert_servers(rows: usize) -> String {
        let mut sql = String::from(
            "INSERT INTO servers (name, model_id, minion_id, key_fingerprint, status, is_vm, \
             vm_host, external_ip, internal_ip, is_proxmox_host, proxmox_node, \
             external_interface, nginx_proxy, samba_managed, samba_base_folder, users, \
             public_key, internal_network, created_at, updated_at) VALUES ",
        );
        for r in 0..rows {
            let b = r * PER_ROW;
            let p = |i: usize| format!("${}", b + i);
            sql.push_str(if r == 0 { "(" } else { ", (" });
            sql.push_str(&p(1));
            sql.push_str(&format!(", (SELECT id FROM models WHERE name = {})", p(2)));
            for i in 3..=PER_ROW {
                sql.push_str(", ");
                sql.push_str(&p(i));
            }
            sql.push_str(", ");
            sql.push_str(&p(PER_ROW));
            sql.push(')');
        }
        sql.push_str(" RETURNING id, name");
        sql
    }

    /// `outbox::APPEND` for `rows` entries at once: 4 binds per row.
    pub fn append_outbox(rows: usize) -> String {
        let mut sql =
            String::from("INSERT INTO outbox (kind, server_id, payload, created_at) VALUES ");
        for r in 0..rows {
            let b = r * 4;
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("(${}, ${}, ${}, ${})", b + 1, b + 2, b + 3, b + 4));
        }
        sql
    }

    /// The patchable columns, bound by `bind_patch_fields!` (`$1`–`$15`,
    /// `$16` time), `$17` the id, `$18` the revision the patch was made from.
    /// The minion id and the key columns are not among them.
    pub const UPDATE_SERVER: &str = "UPDATE servers SET name = $1, \
         model_id = (SELECT id FROM models WHERE name = $2), status = $3, is_vm = $4, \
         vm_host = $5, external_ip = $6, internal_ip = $7, is_proxmox_host = $8, \
         proxmox_node = $9, external_interface = $10, nginx_proxy = $11, \
         samba_managed = $12, samba_base_folder = $13, users = $14, \
         internal_network = $15, updated_at = $16, \
         revision = revision + 1 WHERE id = $17 AND revision = $18";
    /// A new key: public key, fingerprint, status, time; id and revision.
    pub const SET_SERVER_KEY: &str = "UPDATE servers SET public_key = $1, \
         key_fingerprint = $2, status = $3, updated_at = $4, revision = revision + 1 \
         WHERE id = $5 AND revision = $6";
    pub const SERVER_REVISION: &str = "SELECT revision FROM servers WHERE id = $1";

    /// A status transition: `$1` the new status, `$2` the time, `$3` the id,
    /// `$4`… the `from` statuses allowed.
    pub fn set_status(from: usize) -> String {
        let list: Vec<String> = (0..from).map(|i| format!("${}", i + 4)).collect();
        format!(
            "UPDATE servers SET status = $1, updated_at = $2, revision = revision + 1 \
             WHERE id = $3 AND status IN ({})",
            list.join(", ")
        )
    }
    pub const DELETE_SERVER: &str = "DELETE FROM servers WHERE id = $1";
    pub const SERVER_BY_ID: &str = select_server!("WHERE s.id = $1");
    pub const SERVER_BY_NAME: &str = select_server!("WHERE s.name = $1");
    pub const SERVER_BY_MINION_ID: &str = select_server!("WHERE s.minion_id = $1");

    /// A value bound by `find`.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Arg {
        Text(String),
        Int(i64),
    }

    /// `find_servers`: fixed fragments only; the values are bound.
    pub fn find(filter: &super::Filter<'_>) -> (String, Vec<Arg>) {
        let mut sql = String::from(select_server!(""));
        let mut args: Vec<Arg> = Vec::new();
        let text = |v: Option<&str>| v.map(|v| Arg::Text(v.to_owned()));
        let conds = [
            ("s.name =", text(filter.name)),
            ("m.name =", text(filter.model)),
            ("s.minion_id =", text(filter.minion_id)),
            ("s.status =", text(filter.status.map(|s| s.as_str()))),
            ("s.updated_at >=", filter.changed_since.map(Arg::Int)),
            ("s.updated_at <", filter.changed_before.map(Arg::Int)),
            ("s.id >", filter.after_id.map(Arg::Int)),
        ];
        for (column, value) in conds {
            if let Some(v) = value {
                sql.push_str(if args.is_empty() { "WHERE " } else { "AND " });
                args.push(v);
                sql.push_str(&format!("{column} ${} ", args.len()));
            }
        }
        sql.push_str(if filter.newest_first {
            "ORDER BY s.updated_at DESC, s.id DESC"
        } else {
            "ORDER BY s.id"
        });
        if let Some(limit) = filter.limit {
            args.push(Arg::Int(limit));
            sql.push_str(&format!(" LIMIT ${}", args.len()));
        }
        (sql, args)
    }
}

// ------------------------------------------------------- shared conversions

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn json_list(v: &[String]) -> Result<String, Error> {
    outbox::payload(&v)
}

fn parse_list(field: &str, text: &str) -> Result<Vec<String>, Error> {
    serde_json::from_str(text)
        .map_err(|e| Error::invalid(field, format!("stored value is not a JSON list: {e}")))
}

fn parse_ip(field: &str, text: Option<String>) -> Result<Option<std::net::IpAddr>, Error> {
    text.map(|t| {
        t.parse()
            .map_err(|e| Error::invalid(field, format!("stored value {t:?}: {e}")))
    })
    .transpose()
}

fn db(op: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
    let op = op.into();
    move |source| Error::Database { op, source }
}

/// The constraint a database error violates, if it is one: PostgreSQL names
/// it; SQLite puts `table.column` in the message.
fn violation(e: &sqlx::Error) -> Option<(ErrorKind, String)> {
    let d = e.as_database_error()?;
    let what = d
        .constraint()
        .map(str::to_owned)
        .unwrap_or_else(|| d.message().to_owned());
    let kind = match d.kind() {
        // SQLite reports a RESTRICT action as a trigger failure.
        ErrorKind::Other if d.message().contains("FOREIGN KEY constraint failed") => {
            ErrorKind::ForeignKeyViolation
        }
        k => k,
    };
    Some((kind, what))
}

/// Maps a failed insert/update of `model`: its name taken, or the database.
fn model_write_error(op: String, model: &ServerModel, e: sqlx::Error) -> Error {
    match violation(&e) {
        Some((ErrorKind::UniqueViolation, _)) => Error::DuplicateName {
            kind: "model",
            name: model.name.clone(),
        },
        _ => db(op)(e),
    }
}

/// Maps a failed insert/update of `server` to the error the caller can act on.
fn server_write_error(op: &str, server: &Server, e: sqlx::Error) -> Error {
    match violation(&e) {
        Some((ErrorKind::UniqueViolation, what)) if what.contains("minion_id") => {
            Error::MinionIdTaken {
                minion_id: server.minion_id.clone(),
                by: "another server of the registry".to_owned(),
            }
        }
        Some((ErrorKind::UniqueViolation, _)) => Error::DuplicateName {
            kind: "server",
            name: server.name.clone(),
        },
        Some((ErrorKind::NotNullViolation, what)) if what.contains("model_id") => {
            Error::UnknownModel(server.model.clone())
        }
        Some((ErrorKind::ForeignKeyViolation, _)) => Error::invalid(
            "vm_host/nginx_proxy",
            "the server referred to does not exist (any more)",
        ),
        Some((ErrorKind::CheckViolation, what)) => Error::invalid(
            "server",
            format!("refused by the database constraint {what}"),
        ),
        _ => Error::Database {
            op: format!("{op} {}", server.name),
            source: e,
        },
    }
}

/// The columns of a server row, as read.
struct ServerRow {
    id: i64,
    name: String,
    model: String,
    minion_id: String,
    key_fingerprint: Option<String>,
    status: String,
    is_vm: bool,
    vm_host: Option<i64>,
    external_ip: Option<String>,
    internal_ip: Option<String>,
    is_proxmox_host: bool,
    proxmox_node: Option<String>,
    external_interface: Option<String>,
    nginx_proxy: Option<i64>,
    samba_managed: bool,
    samba_base_folder: Option<String>,
    users: String,
    public_key: Option<String>,
    revision: i64,
    internal_network: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl ServerRow {
    fn into_server(self) -> Result<Server, Error> {
        Ok(Server {
            id: self.id,
            status: self.status.parse()?,
            external_ip: parse_ip("external_ip", self.external_ip)?,
            internal_ip: parse_ip("internal_ip", self.internal_ip)?,
            users: parse_list("users", &self.users)?,
            name: self.name,
            model: self.model,
            minion_id: self.minion_id,
            key_fingerprint: self.key_fingerprint,
            is_vm: self.is_vm,
            vm_host: self.vm_host,
            is_proxmox_host: self.is_proxmox_host,
            proxmox_node: self.proxmox_node,
            external_interface: self.external_interface,
            nginx_proxy: self.nginx_proxy,
            samba_managed: self.samba_managed,
            samba_base_folder: self.samba_base_folder,
            public_key: self.public_key,
            revision: self.revision,
            internal_network: self.internal_network,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

// ------------------------------------------------------------ the backends

/// The registry on a SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The database file; `None` in memory.
    file: Option<PathBuf>,
}

/// The registry on a PostgreSQL database (several masters share one).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl SqliteStore {
    /// Opens (creating the file and its directory if missing) and migrates.
    pub async fn open(url: &str) -> Result<Self, Error> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(db(format!("parsing the URL {url}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            .pragma("mmap_size", "268435456");
        let file = opts.get_filename().to_owned();
        // `sqlite::memory:` becomes a `file:sqlx-in-memory-N` name: no file.
        let in_memory = file.as_os_str() == ":memory:"
            || url.contains(":memory:")
            || url.contains("mode=memory");
        if !in_memory {
            if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::invalid(
                        "registry",
                        format!("cannot create the directory {}: {e}", dir.display()),
                    )
                })?;
            }
            // A new registry is readable by its owner only (it will hold
            // password hashes); SQLite gives its -wal/-shm files the same mode.
            use std::os::unix::fs::OpenOptionsExt as _;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(Error::invalid(
                        "registry",
                        format!("cannot create {}: {e}", file.display()),
                    ))
                }
            }
        }
        // An in-memory database lives as long as its one connection. A local
        // file's connection does not go stale: no ping before each use.
        let mut pool = SqlitePoolOptions::new()
            .max_connections(if in_memory { 1 } else { 4 })
            .test_before_acquire(false);
        if in_memory {
            pool = pool.idle_timeout(None).max_lifetime(None);
        }
        let pool = pool
            .connect_with(opts)
            .await
            .map_err(db(format!("opening {}", file.display())))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| Error::Database {
                op: format!("migrating {}", file.display()),
                source: e.into(),
            })?;
        Ok(Self {
            pool,
            file: (!in_memory).then_some(file),
        })
    }

    /// The connection pool (tests and tools count rows with it).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

impl PgStore {
    /// Connects and migrates.
    pub async fn open(url: &str) -> Result<Self, Error> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(pg_options(url)?)
            .await
            .map_err(db("connecting to PostgreSQL"))?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| Error::Database {
                op: "migrating the PostgreSQL registry".to_owned(),
                source: e.into(),
            })?;
        Ok(Self { pool })
    }

    /// The connection pool (tests and tools count rows with it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The connect options of a `postgres://` URL (`sslmode`, `sslrootcert` …).
fn pg_options(url: &str) -> Result<PgConnectOptions, Error> {
    PgConnectOptions::from_str(url).map_err(db("reading the PostgreSQL URL"))
}

/// Appends the outbox row of a change to `$tx`, then commits: every write
/// of the store ends this way, so a change and its notification are one
/// transaction.
macro_rules! append_and_commit {
    ($tx:ident, $kind:expr, $server_id:expr, $record:expr, $now:expr, $op:expr) => {
        lock_outbox_order!($tx, $op);
        sqlx::query(outbox::APPEND)
            .bind($kind.as_str())
            .bind($server_id)
            .bind(outbox::payload($record)?)
            .bind($now)
            .execute(&mut *$tx)
            .await
            .map_err(db($op))?;
        $tx.commit().await.map_err(db($op))?;
    };
}

/// Takes the backend's outbox order lock in `$tx`, if it has one.
macro_rules! lock_outbox_order {
    ($tx:ident, $op:expr) => {
        if let Some(lock) = Self::OUTBOX_ORDER_LOCK {
            sqlx::query(lock)
                .execute(&mut *$tx)
                .await
                .map_err(db($op))?;
        }
    };
}

/// Binds a server's 18 stored fields and the time, in the order
/// `sql::insert_servers` (per row) uses (`$1`–`$19`).
macro_rules! bind_server_fields {
    ($q:expr, $server:expr, $now:expr) => {
        $q.bind(&$server.name)
            .bind(&$server.model)
            .bind(&$server.minion_id)
            .bind(&$server.key_fingerprint)
            .bind($server.status.as_str())
            .bind($server.is_vm)
            .bind($server.vm_host)
            .bind($server.external_ip.map(|ip| ip.to_string()))
            .bind($server.internal_ip.map(|ip| ip.to_string()))
            .bind($server.is_proxmox_host)
            .bind(&$server.proxmox_node)
            .bind(&$server.external_interface)
            .bind($server.nginx_proxy)
            .bind($server.samba_managed)
            .bind(&$server.samba_base_folder)
            .bind(json_list(&$server.users)?)
            .bind(&$server.public_key)
            .bind(&$server.internal_network)
            .bind($now)
    };
}

/// Binds the patchable fields of a server and the time, in the order of
/// `sql::UPDATE_SERVER` (`$1`–`$16`).
macro_rules! bind_patch_fields {
    ($q:expr, $server:expr, $now:expr) => {
        $q.bind(&$server.name)
            .bind(&$server.model)
            .bind($server.status.as_str())
            .bind($server.is_vm)
            .bind($server.vm_host)
            .bind($server.external_ip.map(|ip| ip.to_string()))
            .bind($server.internal_ip.map(|ip| ip.to_string()))
            .bind($server.is_proxmox_host)
            .bind(&$server.proxmox_node)
            .bind(&$server.external_interface)
            .bind($server.nginx_proxy)
            .bind($server.samba_managed)
            .bind(&$server.samba_base_folder)
            .bind(json_list(&$server.users)?)
            .bind(&$server.internal_network)
            .bind($now)
    };
}

/// Reads server `$id` back inside transaction `$tx` (after a write: the
/// row as stored, for the answer and the outbox).
macro_rules! server_in_tx {
    ($tx:ident, $id:expr, $op:expr) => {
        match sqlx::query(sql::SERVER_BY_ID)
            .bind($id)
            .fetch_optional(&mut *$tx)
            .await
            .map_err(db($op))?
        {
            Some(r) => Some(Self::server_row(&r)?),
            None => None,
        }
    };
}

/// After a revision-checked `UPDATE` changed no row: `NotFound` if the
/// `$kind` row `$id` is gone, else `Conflict` with the revision stored now
/// (`$revision_sql` reads it; servers by default).
macro_rules! no_row_error {
    ($tx:ident, $id:expr, $expected:expr, $op:expr) => {
        no_row_error!($tx, sql::SERVER_REVISION, "server", $id, $expected, $op)
    };
    ($tx:ident, $revision_sql:expr, $kind:expr, $id:expr, $expected:expr, $op:expr) => {{
        let current: Option<i64> = sqlx::query_scalar($revision_sql)
            .bind($id)
            .fetch_optional(&mut *$tx)
            .await
            .map_err(db($op))?;
        match current {
            None => Error::NotFound {
                kind: $kind,
                key: format!("#{}", $id),
            },
            Some(current) => Error::Conflict {
                kind: $kind,
                key: format!("#{}", $id),
                expected: $expected,
                current,
            },
        }
    }};
}

/// One body for both backends: `$begin` opens a write transaction;
/// `$order_lock` (if any) is run by a write before it draws its outbox id.
macro_rules! store_impl {
    ($store:ty, $row:ty, $begin:literal, $order_lock:expr) => {
        impl $store {
            /// Taken by a write before its outbox insert, held to its commit
            /// (see `outbox`): outbox ids commit in order.
            const OUTBOX_ORDER_LOCK: Option<&'static str> = $order_lock;

            fn model_row(r: &$row) -> Result<ServerModel, Error> {
                let get = |e| Error::Database {
                    op: "reading a model row".to_owned(),
                    source: e,
                };
                let states: String = r.try_get("states").map_err(get)?;
                Ok(ServerModel {
                    id: r.try_get("id").map_err(get)?,
                    name: r.try_get("name").map_err(get)?,
                    description: r.try_get("description").map_err(get)?,
                    states: parse_list("states", &states)?,
                })
            }

            /// The `(status, count)` rows of `query`, a `SELECT status,
            /// COUNT(*) … GROUP BY status`, each status parsed.
            async fn status_counts<T: FromStr<Err = Error>>(
                &self,
                query: &str,
                op: &str,
            ) -> Result<Vec<(T, i64)>, Error> {
                let rows = sqlx::query(query)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db(op))?;
                rows.iter()
                    .map(|r| {
                        let status: String = r.try_get(0).map_err(db(op))?;
                        let n: i64 = r.try_get(1).map_err(db(op))?;
                        Ok((status.parse()?, n))
                    })
                    .collect()
            }

            fn server_row(r: &$row) -> Result<Server, Error> {
                Self::server_columns(r)
                    .map_err(|e| Error::Database {
                        op: "reading a server row".to_owned(),
                        source: e,
                    })?
                    .into_server()
            }

            fn server_columns(r: &$row) -> Result<ServerRow, sqlx::Error> {
                Ok(ServerRow {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    model: r.try_get("model")?,
                    minion_id: r.try_get("minion_id")?,
                    key_fingerprint: r.try_get("key_fingerprint")?,
                    status: r.try_get("status")?,
                    is_vm: r.try_get("is_vm")?,
                    vm_host: r.try_get("vm_host")?,
                    external_ip: r.try_get("external_ip")?,
                    internal_ip: r.try_get("internal_ip")?,
                    is_proxmox_host: r.try_get("is_proxmox_host")?,
                    proxmox_node: r.try_get("proxmox_node")?,
                    external_interface: r.try_get("external_interface")?,
                    nginx_proxy: r.try_get("nginx_proxy")?,
                    samba_managed: r.try_get("samba_managed")?,
                    samba_base_folder: r.try_get("samba_base_folder")?,
                    users: r.try_get("users")?,
                    public_key: r.try_get("public_key")?,
                    revision: r.try_get("revision")?,
                    internal_network: r.try_get("internal_network")?,
                    created_at: r.try_get("created_at")?,
                    updated_at: r.try_get("updated_at")?,
                })
            }
        }

        impl Store for $store {
            async fn insert_model(&self, model: &ServerModel) -> Result<ServerModel, Error> {
                let op = || format!("creating model {}", model.name);
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let row = sqlx::query(sql::INSERT_MODEL)
                    .bind(&model.name)
                    .bind(&model.description)
                    .bind(json_list(&model.states)?)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| model_write_error(op(), model, e))?;
                let created = ServerModel {
                    id: row.try_get(0).map_err(db(op()))?,
                    ..model.clone()
                };
                append_and_commit!(
                    tx,
                    OutboxKind::ModelCreated,
                    None::<i64>,
                    &created,
                    now,
                    op()
                );
                Ok(created)
            }

            async fn model(&self, name: &str) -> Result<Option<ServerModel>, Error> {
                sqlx::query(sql::MODEL_BY_NAME)
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db(format!("reading model {name}")))?
                    .map(|r| Self::model_row(&r))
                    .transpose()
            }

            async fn models(&self) -> Result<Vec<ServerModel>, Error> {
                sqlx::query(sql::MODELS)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db("listing models"))?
                    .iter()
                    .map(Self::model_row)
                    .collect()
            }

            async fn models_page(&self, after: i64, limit: i64) -> Result<Vec<ServerModel>, Error> {
                sqlx::query(sql::MODELS_PAGE)
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db(format!("listing models after #{after}")))?
                    .iter()
                    .map(Self::model_row)
                    .collect()
            }

            async fn update_model(&self, model: &ServerModel) -> Result<ServerModel, Error> {
                let op = || format!("updating model {}", model.name);
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let done = sqlx::query(sql::UPDATE_MODEL)
                    .bind(model.id)
                    .bind(&model.name)
                    .bind(&model.description)
                    .bind(json_list(&model.states)?)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| model_write_error(op(), model, e))?;
                if done.rows_affected() == 0 {
                    return Err(Error::NotFound {
                        kind: "model",
                        key: model.name.clone(),
                    });
                }
                append_and_commit!(tx, OutboxKind::ModelUpdated, None::<i64>, model, now, op());
                Ok(model.clone())
            }

            async fn delete_model(&self, name: &str) -> Result<ServerModel, Error> {
                let op = || format!("deleting model {name}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let model = match sqlx::query(sql::MODEL_BY_NAME)
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db(op()))?
                {
                    Some(r) => Self::model_row(&r)?,
                    None => {
                        return Err(Error::NotFound {
                            kind: "model",
                            key: name.to_owned(),
                        })
                    }
                };
                let users: i64 = sqlx::query_scalar(sql::MODEL_USERS)
                    .bind(model.id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let in_use = |servers| Error::ModelInUse {
                    name: name.to_owned(),
                    servers,
                };
                if users > 0 {
                    return Err(in_use(users));
                }
                // The foreign key still guards a server added meanwhile (PostgreSQL).
                sqlx::query(sql::DELETE_MODEL)
                    .bind(model.id)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| match violation(&e) {
                        Some((ErrorKind::ForeignKeyViolation, _)) => in_use(1),
                        _ => db(op())(e),
                    })?;
                append_and_commit!(
                    tx,
                    OutboxKind::ModelDeleted,
                    None::<i64>,
                    &model,
                    now_ms(),
                    op()
                );
                Ok(model)
            }

            async fn insert_servers(&self, servers: &[Server]) -> Result<Vec<Server>, Error> {
                let op = || format!("creating {} servers", servers.len());
                if servers.is_empty() {
                    return Ok(Vec::new());
                }
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let text = sql::insert_servers(servers.len());
                let mut q = sqlx::query(&text);
                for server in servers {
                    q = bind_server_fields!(q, server, now);
                }
                let rows = q.fetch_all(&mut *tx).await.map_err(|e| match servers {
                    [one] => server_write_error("creating server", one, e),
                    _ => db(op())(e),
                })?;
                // RETURNING's order is not promised by PostgreSQL: match by name.
                let mut ids = std::collections::HashMap::with_capacity(rows.len());
                for r in &rows {
                    let id: i64 = r.try_get(0).map_err(db(op()))?;
                    let name: String = r.try_get(1).map_err(db(op()))?;
                    ids.insert(name, id);
                }
                let mut created = Vec::with_capacity(servers.len());
                for server in servers {
                    let id = ids
                        .get(&server.name)
                        .copied()
                        .ok_or_else(|| Error::Database {
                            op: format!("{}: no id returned for {}", op(), server.name),
                            source: sqlx::Error::RowNotFound,
                        })?;
                    created.push(Server {
                        id,
                        revision: 1,
                        created_at: now,
                        updated_at: now,
                        ..server.clone()
                    });
                }
                lock_outbox_order!(tx, op());
                let text = sql::append_outbox(created.len());
                let mut q = sqlx::query(&text);
                for c in &created {
                    q = q
                        .bind(OutboxKind::ServerCreated.as_str())
                        .bind(Some(c.id))
                        .bind(outbox::payload(c)?)
                        .bind(now);
                }
                q.execute(&mut *tx).await.map_err(db(op()))?;
                tx.commit().await.map_err(db(op()))?;
                Ok(created)
            }

            async fn server(&self, key: ServerKey<'_>) -> Result<Option<Server>, Error> {
                let q = match key {
                    ServerKey::Id(id) => sqlx::query(sql::SERVER_BY_ID).bind(id),
                    ServerKey::Name(n) => sqlx::query(sql::SERVER_BY_NAME).bind(n),
                    ServerKey::MinionId(m) => sqlx::query(sql::SERVER_BY_MINION_ID).bind(m),
                };
                q.fetch_optional(&self.pool)
                    .await
                    .map_err(db(format!("reading server {key:?}")))?
                    .map(|r| Self::server_row(&r))
                    .transpose()
            }

            async fn find_servers(&self, filter: &Filter<'_>) -> Result<Vec<Server>, Error> {
                let (text, args) = sql::find(filter);
                let mut q = sqlx::query(&text);
                for a in args {
                    q = match a {
                        sql::Arg::Text(t) => q.bind(t),
                        sql::Arg::Int(i) => q.bind(i),
                    };
                }
                q.fetch_all(&self.pool)
                    .await
                    .map_err(db("finding servers"))?
                    .iter()
                    .map(Self::server_row)
                    .collect()
            }

            async fn server_status_counts(&self) -> Result<Vec<(Status, i64)>, Error> {
                self.status_counts(
                    "SELECT status, COUNT(*) FROM servers GROUP BY status ORDER BY status",
                    "counting servers by status",
                )
                .await
            }

            async fn update_server(&self, server: &Server) -> Result<Server, Error> {
                let op = "updating server";
                let opn = || format!("{op} {}", server.name);
                let mut tx = self.pool.begin_with($begin).await.map_err(db(opn()))?;
                let now = now_ms();
                let done = bind_patch_fields!(sqlx::query(sql::UPDATE_SERVER), server, now)
                    .bind(server.id)
                    .bind(server.revision)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| server_write_error(op, server, e))?;
                if done.rows_affected() == 0 {
                    return Err(no_row_error!(tx, server.id, server.revision, opn()));
                }
                let updated =
                    server_in_tx!(tx, server.id, opn()).ok_or_else(|| Error::NotFound {
                        kind: "server",
                        key: format!("#{}", server.id),
                    })?;
                append_and_commit!(
                    tx,
                    OutboxKind::ServerUpdated,
                    Some(updated.id),
                    &updated,
                    now,
                    opn()
                );
                Ok(updated)
            }

            async fn set_server_status(
                &self,
                id: i64,
                from: &[Status],
                to: Status,
            ) -> Result<Option<Server>, Error> {
                let op = || format!("setting the status of server #{id} to {to}");
                if from.is_empty() {
                    return Ok(None);
                }
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let text = sql::set_status(from.len());
                let mut q = sqlx::query(&text).bind(to.as_str()).bind(now).bind(id);
                for st in from {
                    q = q.bind(st.as_str());
                }
                let done = q.execute(&mut *tx).await.map_err(db(op()))?;
                let Some(updated) = server_in_tx!(tx, id, op()) else {
                    return Err(Error::NotFound {
                        kind: "server",
                        key: format!("#{id}"),
                    });
                };
                if done.rows_affected() == 0 {
                    return Ok(None);
                }
                append_and_commit!(tx, OutboxKind::ServerUpdated, Some(id), &updated, now, op());
                Ok(Some(updated))
            }

            async fn set_server_key(
                &self,
                id: i64,
                revision: i64,
                key: &KeyColumns<'_>,
                status: Status,
            ) -> Result<Server, Error> {
                let op = || format!("recording the new key of server #{id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let done = sqlx::query(sql::SET_SERVER_KEY)
                    .bind(key.public_key)
                    .bind(key.fingerprint)
                    .bind(status.as_str())
                    .bind(now)
                    .bind(id)
                    .bind(revision)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                if done.rows_affected() == 0 {
                    return Err(no_row_error!(tx, id, revision, op()));
                }
                let updated = server_in_tx!(tx, id, op()).ok_or_else(|| Error::NotFound {
                    kind: "server",
                    key: format!("#{id}"),
                })?;
                append_and_commit!(tx, OutboxKind::ServerUpdated, Some(id), &updated, now, op());
                Ok(updated)
            }

            async fn delete_server(&self, id: i64) -> Result<Server, Error> {
                let op = || format!("deleting server #{id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let server = match sqlx::query(sql::SERVER_BY_ID)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db(op()))?
                {
                    Some(r) => Self::server_row(&r)?,
                    None => {
                        return Err(Error::NotFound {
                            kind: "server",
                            key: format!("#{id}"),
                        })
                    }
                };
                sqlx::query(sql::DELETE_SERVER)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| match violation(&e) {
                        Some((ErrorKind::ForeignKeyViolation, _)) => Error::ServerInUse {
                            name: server.name.clone(),
                        },
                        _ => db(op())(e),
                    })?;
                append_and_commit!(
                    tx,
                    OutboxKind::ServerDeleted,
                    Some(id),
                    &server,
                    now_ms(),
                    op()
                );
                Ok(server)
            }

            async fn outbox_subscribe(&self, consumer: &str) -> Result<i64, Error> {
                outbox::check_consumer(consumer)?;
                let op = || format!("subscribing {consumer} to the outbox");
                sqlx::query(outbox::SUBSCRIBE)
                    .bind(consumer)
                    .bind(now_ms())
                    .execute(&self.pool)
                    .await
                    .map_err(db(op()))?;
                self.outbox_position(consumer).await
            }

            async fn outbox_pending(
                &self,
                consumer: &str,
                limit: i64,
            ) -> Result<Vec<OutboxRow>, Error> {
                let position = self.outbox_position(consumer).await?;
                let rows = sqlx::query(outbox::PENDING)
                    .bind(position)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db("reading the outbox"))?;
                rows.iter()
                    .map(|r| {
                        let cols = (|| -> Result<_, sqlx::Error> {
                            Ok((
                                r.try_get::<i64, _>("id")?,
                                r.try_get::<String, _>("kind")?,
                                r.try_get::<Option<i64>, _>("server_id")?,
                                r.try_get::<String, _>("payload")?,
                                r.try_get::<i64, _>("created_at")?,
                            ))
                        })()
                        .map_err(db("reading an outbox row"))?;
                        Ok(outbox::row(cols.0, &cols.1, cols.2, &cols.3, cols.4))
                    })
                    .collect()
            }

            async fn outbox_ack(&self, consumer: &str, id: i64) -> Result<bool, Error> {
                let op = || format!("acknowledging outbox entry {id} for {consumer}");
                let done = sqlx::query(outbox::ACK)
                    .bind(consumer)
                    .bind(id)
                    .bind(now_ms())
                    .execute(&self.pool)
                    .await
                    .map_err(db(op()))?;
                if done.rows_affected() > 0 {
                    return Ok(true);
                }
                // Not moved: already there, or no such consumer.
                self.outbox_position(consumer).await.map(|_| false)
            }

            async fn outbox_quarantine(
                &self,
                consumer: &str,
                id: i64,
                reason: &str,
            ) -> Result<(), Error> {
                let op = || format!("quarantining outbox entry {id} for {consumer}");
                let now = now_ms();
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                sqlx::query(outbox::QUARANTINE)
                    .bind(consumer)
                    .bind(id)
                    .bind(reason)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let moved = sqlx::query(outbox::ACK)
                    .bind(consumer)
                    .bind(id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                tx.commit().await.map_err(db(op()))?;
                if moved.rows_affected() == 0 {
                    self.outbox_position(consumer).await?;
                }
                Ok(())
            }

            async fn outbox_status(&self) -> Result<Vec<ConsumerStatus>, Error> {
                let rows = sqlx::query(outbox::STATUS)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db("reading the outbox consumers"))?;
                rows.iter()
                    .map(|r| {
                        (|| -> Result<_, sqlx::Error> {
                            Ok(ConsumerStatus {
                                consumer: r.try_get("consumer")?,
                                position: r.try_get("position")?,
                                pending: r.try_get("pending")?,
                                quarantined: r.try_get("quarantined")?,
                            })
                        })()
                        .map_err(db("reading an outbox consumer"))
                    })
                    .collect()
            }

            async fn outbox_quarantined(&self) -> Result<Vec<Quarantined>, Error> {
                let rows = sqlx::query(outbox::QUARANTINED)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db("reading the outbox quarantine"))?;
                rows.iter()
                    .map(|r| {
                        (|| -> Result<_, sqlx::Error> {
                            Ok(Quarantined {
                                consumer: r.try_get("consumer")?,
                                outbox_id: r.try_get("outbox_id")?,
                                kind: r.try_get("kind")?,
                                payload: r.try_get("payload")?,
                                reason: r.try_get("reason")?,
                                at: r.try_get("at")?,
                            })
                        })()
                        .map_err(db("reading a quarantined outbox row"))
                    })
                    .collect()
            }

            async fn outbox_prune(&self) -> Result<u64, Error> {
                let done = sqlx::query(outbox::PRUNE)
                    .execute(&self.pool)
                    .await
                    .map_err(db("pruning the outbox"))?;
                Ok(done.rows_affected())
            }
        }

        impl $store {
            /// `consumer`'s cursor; `NotFound` if it never subscribed.
            async fn outbox_position(&self, consumer: &str) -> Result<i64, Error> {
                sqlx::query_scalar::<_, i64>(outbox::POSITION)
                    .bind(consumer)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db(format!("reading the outbox cursor of {consumer}")))?
                    .ok_or_else(|| Error::NotFound {
                        kind: "outbox consumer",
                        key: consumer.to_owned(),
                    })
            }
        }
    };
}

// SQLite: one writer at a time (BEGIN IMMEDIATE) already orders the ids.
store_impl!(
    SqliteStore,
    sqlx::sqlite::SqliteRow,
    "BEGIN IMMEDIATE",
    None
);
store_impl!(
    PgStore,
    sqlx::postgres::PgRow,
    "BEGIN",
    Some(outbox::PG_ORDER_LOCK)
);

/// The backend chosen by the registry URL.
#[derive(Debug, Clone)]
pub enum DbStore {
    /// `sqlite:…`
    Sqlite(SqliteStore),
    /// `postgres://…` or `postgresql://…`
    Postgres(PgStore),
}

/// Opens the registry at `url` (`sqlite:…` or `postgres[ql]://…`), applying
/// the embedded migrations, and returns the service over it.
pub async fn open(url: &str) -> Result<super::Service<DbStore>, Error> {
    Ok(super::Service::new(DbStore::open(url).await?))
}

impl DbStore {
    /// Picks the backend from the URL's scheme, opens and migrates it.
    pub async fn open(url: &str) -> Result<Self, Error> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DbStore::Postgres(PgStore::open(url).await?))
        } else if url.starts_with("sqlite:") {
            Ok(DbStore::Sqlite(SqliteStore::open(url).await?))
        } else {
            Err(Error::invalid(
                "registry",
                format!("{url:?} is neither sqlite:… nor postgres://…"),
            ))
        }
    }

    /// The SQLite database file (`None` in memory and on PostgreSQL): its
    /// writes, by any process, can be watched.
    pub fn sqlite_file(&self) -> Option<&Path> {
        match self {
            DbStore::Sqlite(s) => s.file.as_deref(),
            DbStore::Postgres(_) => None,
        }
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            DbStore::Sqlite(_) => "sqlite",
            DbStore::Postgres(_) => "postgres",
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            DbStore::Sqlite($s) => $call.await,
            DbStore::Postgres($s) => $call.await,
        }
    };
}

impl Store for DbStore {
    async fn insert_model(&self, model: &ServerModel) -> Result<ServerModel, Error> {
        dispatch!(self, s => s.insert_model(model))
    }
    async fn model(&self, name: &str) -> Result<Option<ServerModel>, Error> {
        dispatch!(self, s => s.model(name))
    }
    async fn models(&self) -> Result<Vec<ServerModel>, Error> {
        dispatch!(self, s => s.models())
    }
    async fn models_page(&self, after: i64, limit: i64) -> Result<Vec<ServerModel>, Error> {
        dispatch!(self, s => s.models_page(after, limit))
    }
    async fn update_model(&self, model: &ServerModel) -> Result<ServerModel, Error> {
        dispatch!(self, s => s.update_model(model))
    }
    async fn delete_model(&self, name: &str) -> Result<ServerModel, Error> {
        dispatch!(self, s => s.delete_model(name))
    }
    async fn insert_servers(&self, servers: &[Server]) -> Result<Vec<Server>, Error> {
        dispatch!(self, s => s.insert_servers(servers))
    }
    async fn server(&self, key: ServerKey<'_>) -> Result<Option<Server>, Error> {
        dispatch!(self, s => s.server(key))
    }
    async fn find_servers(&self, filter: &Filter<'_>) -> Result<Vec<Server>, Error> {
        dispatch!(self, s => s.find_servers(filter))
    }
    async fn server_status_counts(&self) -> Result<Vec<(Status, i64)>, Error> {
        dispatch!(self, s => s.server_status_counts())
    }
    async fn update_server(&self, server: &Server) -> Result<Server, Error> {
        dispatch!(self, s => s.update_server(server))
    }
    async fn set_server_status(
        &self,
        id: i64,
        from: &[Status],
        to: Status,
    ) -> Result<Option<Server>, Error> {
        dispatch!(self, s => s.set_server_status(id, from, to))
    }
    async fn set_server_key(
        &self,
        id: i64,
        revision: i64,
        key: &KeyColumns<'_>,
        status: Status,
    ) -> Result<Server, Error> {
        dispatch!(self, s => s.set_server_key(id, revision, key, status))
    }
    async fn delete_server(&self, id: i64) -> Result<Server, Error> {
        dispatch!(self, s => s.delete_server(id))
    }
    async fn outbox_subscribe(&self, consumer: &str) -> Result<i64, Error> {
        dispatch!(self, s => s.outbox_subscribe(consumer))
    }
    async fn outbox_pending(&self, consumer: &str, limit: i64) -> Result<Vec<OutboxRow>, Error> {
        dispatch!(self, s => s.outbox_pending(consumer, limit))
    }
    async fn outbox_ack(&self, consumer: &str, id: i64) -> Result<bool, Error> {
        dispatch!(self, s => s.outbox_ack(consumer, id))
    }
    async fn outbox_quarantine(&self, consumer: &str, id: i64, reason: &str) -> Result<(), Error> {
        dispatch!(self, s => s.outbox_quarantine(consumer, id, reason))
    }
    async fn outbox_status(&self) -> Result<Vec<ConsumerStatus>, Error> {
        dispatch!(self, s => s.outbox_status())
    }
    async fn outbox_quarantined(&self) -> Result<Vec<Quarantined>, Error> {
        dispatch!(self, s => s.outbox_quarantined())
    }
    async fn outbox_prune(&self) -> Result<u64, Error> {
        dispatch!(self, s => s.outbox_prune())
    }
}

/// Instantiates the one-body macro `$impl!` for both backends, with what
/// differs between them: the store and row types, how a write transaction
/// begins, and the database clock in ms (SQLite's `julianday('now')` has
/// millisecond precision; PostgreSQL's `now()` is the statement's
/// transaction start; each is one value for the whole statement, so a
/// row's times written together are equal).
macro_rules! for_both_backends {
    ($impl:ident) => {
        $impl!(
            SqliteStore,
            sqlx::sqlite::SqliteRow,
            "BEGIN IMMEDIATE",
            "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)"
        );
        $impl!(
            PgStore,
            sqlx::postgres::PgRow,
            "BEGIN",
            "CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT)"
        );
    };
}

// The inventory and dispatcher SQL, in files of their own; declared here,
// after the macros they use.
mod dispatch;
mod exec;
mod inventory;
mod shares;
// Backups (issue #13), after the macros it uses too.
mod backup;
// Several daemons on one registry (issue #16).
mod cluster;
mod users;

impl ExecStore for DbStore {
    async fn exec_insert(&self, e: &NewExec) -> Result<ExecRecord, Error> {
        dispatch!(self, s => s.exec_insert(e))
    }
    async fn exec_finish(&self, id: i64, end: &ExecEnd) -> Result<(), Error> {
        dispatch!(self, s => s.exec_finish(id, end))
    }
    async fn exec_list(
        &self,
        server_id: Option<i64>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<ExecRecord>, Error> {
        dispatch!(self, s => s.exec_list(server_id, before, limit))
    }
    async fn exec_recover(&self) -> Result<u64, Error> {
        dispatch!(self, s => s.exec_recover())
    }
}

impl InventoryStore for DbStore {
    async fn insert_port_forward(&self, f: &NewPortForward) -> Result<PortForward, Error> {
        dispatch!(self, s => s.insert_port_forward(f))
    }
    async fn port_forward(&self, id: i64) -> Result<Option<PortForward>, Error> {
        dispatch!(self, s => s.port_forward(id))
    }
    async fn port_forwards(&self, host_id: Option<i64>) -> Result<Vec<PortForward>, Error> {
        dispatch!(self, s => s.port_forwards(host_id))
    }
    async fn update_port_forward(&self, f: &PortForward) -> Result<PortForward, Error> {
        dispatch!(self, s => s.update_port_forward(f))
    }
    async fn delete_port_forward(&self, id: i64) -> Result<PortForward, Error> {
        dispatch!(self, s => s.delete_port_forward(id))
    }
    async fn insert_hostname_forward(
        &self,
        f: &NewHostnameForward,
    ) -> Result<HostnameForward, Error> {
        dispatch!(self, s => s.insert_hostname_forward(f))
    }
    async fn hostname_forward(&self, id: i64) -> Result<Option<HostnameForward>, Error> {
        dispatch!(self, s => s.hostname_forward(id))
    }
    async fn hostname_forwards(
        &self,
        proxy_id: Option<i64>,
    ) -> Result<Vec<HostnameForward>, Error> {
        dispatch!(self, s => s.hostname_forwards(proxy_id))
    }
    async fn update_hostname_forward(
        &self,
        f: &HostnameForward,
        previous_proxy: i64,
    ) -> Result<HostnameForward, Error> {
        dispatch!(self, s => s.update_hostname_forward(f, previous_proxy))
    }
    async fn delete_hostname_forward(&self, id: i64) -> Result<HostnameForward, Error> {
        dispatch!(self, s => s.delete_hostname_forward(id))
    }
    async fn forward_references(&self, id: i64) -> Result<Vec<String>, Error> {
        dispatch!(self, s => s.forward_references(id))
    }
}

impl DispatchStore for DbStore {
    async fn dispatch_bump(
        &self,
        consumer: &str,
        outbox_id: i64,
        targets: &[(i64, StateKind)],
        debounce: Debounce,
    ) -> Result<(), Error> {
        dispatch!(self, s => s.dispatch_bump(consumer, outbox_id, targets, debounce))
    }
    async fn dispatch_affected(&self, id: i64) -> Result<Vec<(i64, StateKind)>, Error> {
        dispatch!(self, s => s.dispatch_affected(id))
    }
    async fn dispatch_recover(&self, holder: &str) -> Result<u64, Error> {
        dispatch!(self, s => s.dispatch_recover(holder))
    }
    async fn dispatch_expire(&self, now: i64) -> Result<u64, Error> {
        dispatch!(self, s => s.dispatch_expire(now))
    }
    async fn dispatch_due(
        &self,
        now: i64,
        limit: i64,
        here: Option<&Here>,
    ) -> Result<Vec<DispatchTarget>, Error> {
        dispatch!(self, s => s.dispatch_due(now, limit, here))
    }
    async fn dispatch_next_due(&self) -> Result<Option<i64>, Error> {
        dispatch!(self, s => s.dispatch_next_due())
    }
    async fn dispatch_claim(
        &self,
        server_id: i64,
        state: StateKind,
        revision: i64,
        jid: &str,
        holder: &str,
        lease_until: i64,
    ) -> Result<Option<DispatchTarget>, Error> {
        dispatch!(self, s => s.dispatch_claim(server_id, state, revision, jid, holder, lease_until))
    }
    async fn dispatch_unchanged(
        &self,
        server_id: i64,
        state: StateKind,
        revision: i64,
    ) -> Result<bool, Error> {
        dispatch!(self, s => s.dispatch_unchanged(server_id, state, revision))
    }
    async fn dispatch_wait(
        &self,
        server_id: i64,
        state: StateKind,
        reason: &str,
    ) -> Result<bool, Error> {
        dispatch!(self, s => s.dispatch_wait(server_id, state, reason))
    }
    async fn dispatch_finish(
        &self,
        server_id: i64,
        state: StateKind,
        jid: &str,
        epoch: i64,
        finish: &Finish,
    ) -> Result<Option<DispatchTarget>, Error> {
        dispatch!(self, s => s.dispatch_finish(server_id, state, jid, epoch, finish))
    }
    async fn dispatch_release(
        &self,
        server_id: i64,
        state: StateKind,
        jid: &str,
        epoch: i64,
    ) -> Result<bool, Error> {
        dispatch!(self, s => s.dispatch_release(server_id, state, jid, epoch))
    }
    async fn dispatch_targets(
        &self,
        status: Option<DispatchStatus>,
    ) -> Result<Vec<DispatchTarget>, Error> {
        dispatch!(self, s => s.dispatch_targets(status))
    }
    async fn dispatch_status_counts(&self) -> Result<Vec<(DispatchStatus, i64)>, Error> {
        dispatch!(self, s => s.dispatch_status_counts())
    }
    async fn dispatch_targets_of(&self, server_id: i64) -> Result<Vec<DispatchTarget>, Error> {
        dispatch!(self, s => s.dispatch_targets_of(server_id))
    }
    async fn dispatch_targets_page(
        &self,
        status: Option<DispatchStatus>,
        server_id: Option<i64>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<DispatchTarget>, Error> {
        dispatch!(self, s => s.dispatch_targets_page(status, server_id, after, limit))
    }
    async fn dispatch_runs(&self, server_id: i64, limit: i64) -> Result<Vec<DispatchRun>, Error> {
        dispatch!(self, s => s.dispatch_runs(server_id, limit))
    }
    async fn dispatch_retry(&self, server_id: i64, state: Option<StateKind>) -> Result<u64, Error> {
        dispatch!(self, s => s.dispatch_retry(server_id, state))
    }
    async fn dispatch_drift(&self, cutoff: i64) -> Result<u64, Error> {
        dispatch!(self, s => s.dispatch_drift(cutoff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_binds_only_the_given_filters_in_order() {
        let (text, args) = sql::find(&Filter {
            model: Some("web"),
            status: Some(Status::Online),
            ..Filter::default()
        });
        assert!(
            text.ends_with("WHERE m.name = $1 AND s.status = $2 ORDER BY s.id"),
            "{text}"
        );
        assert_eq!(
            args,
            [
                sql::Arg::Text("web".into()),
                sql::Arg::Text("online".into())
            ]
        );
        let (text, args) = sql::find(&Filter {
            changed_since: Some(42),
            ..Filter::default()
        });
        assert!(
            text.ends_with("WHERE s.updated_at >= $1 ORDER BY s.id"),
            "{text}"
        );
        assert_eq!(args, [sql::Arg::Int(42)]);
        let (text, args) = sql::find(&Filter {
            after_id: Some(7),
            limit: Some(500),
            ..Filter::default()
        });
        assert!(
            text.ends_with("WHERE s.id > $1 ORDER BY s.id LIMIT $2"),
            "{text}"
        );
        assert_eq!(args, [sql::Arg::Int(7), sql::Arg::Int(500)]);
        let (text, args) = sql::find(&Filter::default());
        assert!(!text.contains("WHERE"), "{text}");
        assert!(args.is_empty());
    }

    #[test]
    fn postgres_urls_carry_their_tls_settings() {
        use sqlx::postgres::PgSslMode;
        for (query, mode) in [
            ("sslmode=require", PgSslMode::Require),
            (
                "sslmode=verify-full&sslrootcert=/etc/salt-steward/pg-ca.pem",
                PgSslMode::VerifyFull,
            ),
            ("sslmode=verify-ca&sslrootcert=ca.pem", PgSslMode::VerifyCa),
        ] {
            let url = format!("postgres://steward:pw@db.example.org:5433/registry?{query}");
            let o = pg_options(&url).unwrap();
            // PgSslMode has no PartialEq.
            assert_eq!(
                format!("{:?}", o.get_ssl_mode()),
                format!("{mode:?}"),
                "{query}"
            );
            assert_eq!(o.get_host(), "db.example.org");
            assert_eq!(o.get_port(), 5433);
        }
        assert!(pg_options("postgres://db/x?sslmode=sometimes").is_err());
    }

    /// `sslmode=require` really starts TLS: after the server's `S`, the
    /// client's next bytes are a TLS ClientHello. (Built without a TLS
    /// feature, sqlx refuses before sending anything.)
    #[tokio::test]
    async fn sslmode_require_starts_a_tls_handshake() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            // SSLRequest: length 8, code 80877103.
            let mut req = [0u8; 8];
            conn.read_exact(&mut req).await.unwrap();
            assert_eq!(req, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
            conn.write_all(b"S").await.unwrap();
            // A TLS record: handshake (22), then the ClientHello (1).
            let mut head = [0u8; 6];
            conn.read_exact(&mut head).await.unwrap();
            head
        });
        let url = format!("postgres://steward:pw@127.0.0.1:{port}/registry?sslmode=require");
        let err = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(pg_options(&url).unwrap())
            .await
            .unwrap_err();
        let head = server.await.unwrap();
        assert_eq!(head[0], 22, "not a TLS handshake record: {head:?} ({err})");
        assert_eq!(head[5], 1, "not a ClientHello: {head:?} ({err})");
    }
}
