//! The SQL of backups and their results, for both backends (one body,
//! `backup_impl!`, instantiated twice like `store_impl!`). Every write of a
//! backup or of a key learnt from a state's report is one transaction
//! ending with its outbox row, whose payload names the (server, state)
//! targets it affects.

use std::future::Future;

use sqlx::error::ErrorKind;
use sqlx::Row as _;

use super::{db, now_ms, parse_ip, violation, DbStore, PgStore, SqliteStore};
use crate::registry::backup::{Backup, BackupChange, BackupResult, KeysChange, Retain};
use crate::registry::{outbox, Error, OutboxKind, StateKind};

/// Most backups a list returns (a bound; far above one installation's).
pub const MAX_LIST: i64 = 100_000;

/// A new backup, its references resolved and checked by the service.
#[derive(Debug, Clone)]
pub struct NewBackup {
    /// Source server id.
    pub source_id: i64,
    /// Absolute, normalised.
    pub source_folder: String,
    /// Backup server id.
    pub dest_id: i64,
    /// Absolute, normalised.
    pub dest_folder: String,
    /// rsync patterns.
    pub excludes: Vec<String>,
    /// Also /proc and /sys.
    pub exclude_proc_sys: bool,
    /// Scheduled.
    pub active: bool,
    /// `None`: the configured default.
    pub retain: Option<Vec<Retain>>,
    /// `None`: the source's IP.
    pub ssh_host: Option<String>,
    /// SSH port.
    pub ssh_port: u16,
    /// SSH user.
    pub ssh_user: String,
}

/// Which backups to list; `None` matches any.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackupFilter {
    /// Pulled by this backup server.
    pub dest_id: Option<i64>,
    /// Of this source.
    pub source_id: Option<i64>,
}

/// Backups and their results in the registry.
pub trait BackupStore {
    /// Adds a backup (outbox `backup.created`, both targets).
    fn insert_backup(&self, b: &NewBackup) -> impl Future<Output = Result<Backup, Error>> + Send;
    /// One backup.
    fn backup(&self, id: i64) -> impl Future<Output = Result<Option<Backup>, Error>> + Send;
    /// Backups matching `filter`, by id ([`MAX_LIST`] at most).
    fn backups(
        &self,
        filter: BackupFilter,
    ) -> impl Future<Output = Result<Vec<Backup>, Error>> + Send;
    /// Removes a backup and its results (outbox `backup.deleted`, both targets).
    fn delete_backup(&self, id: i64) -> impl Future<Output = Result<Backup, Error>> + Send;
    /// Every backup naming server `id` (as source or destination), described.
    fn backup_references(&self, id: i64)
        -> impl Future<Output = Result<Vec<String>, Error>> + Send;
    /// Stores backup server `id`'s SSH public key; when it changed, the
    /// `backup_source` targets of every source it pulls from are bumped
    /// (outbox `backup.keys`). `true` if it changed.
    fn set_backup_pubkey(
        &self,
        id: i64,
        pubkey: &str,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
    /// Stores source `id`'s SSH host keys; when they changed, the `backup`
    /// targets pulling from it are bumped (outbox `backup.keys`). `true` if
    /// they changed.
    fn set_ssh_host_keys(
        &self,
        id: i64,
        keys: &[String],
    ) -> impl Future<Output = Result<bool, Error>> + Send;
    /// Marks a run started by `backup run` as going on until `until` (Unix
    /// ms), or ended (`None`); not a change of the backup (no outbox row).
    fn set_backup_running(
        &self,
        id: i64,
        until: Option<i64>,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// Records a result once per (backup, run id): `true` if it was new.
    fn insert_backup_result(
        &self,
        r: &BackupResult,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
    /// A backup's results, newest first, `limit` at most.
    fn backup_results(
        &self,
        backup_id: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<BackupResult>, Error>> + Send;
    /// How many results are recorded and the newest one's row id: moves
    /// with each recorded result (which writes no outbox row), so the
    /// dashboard's event stream can see it.
    fn backup_results_mark(&self) -> impl Future<Output = Result<(i64, i64), Error>> + Send;
}

mod sql {
    pub const SELECT: &str = "SELECT b.id, b.source_id, s.name AS source, b.source_folder, \
         b.dest_id, d.name AS dest, d.minion_id AS dest_minion_id, b.dest_folder, b.excludes, \
         b.exclude_proc_sys, b.active, b.retain, b.ssh_host, b.ssh_port, b.ssh_user, \
         b.running_until, \
         s.internal_ip AS source_internal_ip, s.external_ip AS source_external_ip, \
         s.ssh_host_keys AS source_host_keys, d.backup_pubkey AS dest_pubkey, \
         b.revision, b.created_at, b.updated_at \
         FROM backups b JOIN servers s ON s.id = b.source_id JOIN servers d ON d.id = b.dest_id ";
    pub const INSERT: &str = "INSERT INTO backups (source_id, source_folder, dest_id, \
         dest_folder, excludes, exclude_proc_sys, active, retain, ssh_host, ssh_port, ssh_user, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12) \
         RETURNING id";
    pub const DELETE: &str = "DELETE FROM backups WHERE id = $1";
    pub const RUNNING: &str = "UPDATE backups SET running_until = $1 WHERE id = $2";
    pub const PUBKEY: &str = "SELECT backup_pubkey FROM servers WHERE id = $1";
    pub const SET_PUBKEY: &str = "UPDATE servers SET backup_pubkey = $1 WHERE id = $2";
    pub const SOURCES_OF: &str =
        "SELECT DISTINCT source_id FROM backups WHERE dest_id = $1 ORDER BY source_id";
    pub const HOST_KEYS: &str = "SELECT ssh_host_keys FROM servers WHERE id = $1";
    pub const SET_HOST_KEYS: &str = "UPDATE servers SET ssh_host_keys = $1 WHERE id = $2";
    pub const DESTS_OF: &str =
        "SELECT DISTINCT dest_id FROM backups WHERE source_id = $1 ORDER BY dest_id";
    pub const INSERT_RESULT: &str = "INSERT INTO backup_results (backup_id, run_id, level, \
         started_at, duration_ms, outcome, files, size, transferred, rsync_exit, error, \
         received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (backup_id, run_id) DO NOTHING";
    pub const RESULTS: &str = "SELECT backup_id, run_id, level, started_at, duration_ms, \
         outcome, files, size, transferred, rsync_exit, error, received_at \
         FROM backup_results WHERE backup_id = $1 ORDER BY started_at DESC, id DESC LIMIT $2";
    pub const RESULTS_MARK: &str = "SELECT COUNT(*), COALESCE(MAX(id), 0) FROM backup_results";
}

fn port(n: i64) -> Result<u16, Error> {
    u16::try_from(n)
        .map_err(|_| Error::invalid("ssh_port", format!("stored value {n} is not a port")))
}

fn json_text<T: serde::Serialize>(field: &str, v: &T) -> Result<String, Error> {
    serde_json::to_string(v).map_err(|e| Error::invalid(field, e.to_string()))
}

fn parse_json<T: serde::de::DeserializeOwned>(field: &str, text: &str) -> Result<T, Error> {
    serde_json::from_str(text)
        .map_err(|e| Error::invalid(field, format!("stored value is not valid: {e}")))
}

/// A failed backup write mapped to what the caller can act on.
fn backup_write_error(what: &str, e: sqlx::Error) -> Error {
    match violation(&e) {
        Some((ErrorKind::UniqueViolation, _)) => Error::DuplicateBackup {
            what: what.to_owned(),
            by: "another backup".to_owned(),
        },
        Some((ErrorKind::ForeignKeyViolation, c)) => Error::invalid(
            "backup",
            format!("{what}: a server it names is gone (refused by {c})"),
        ),
        Some((ErrorKind::CheckViolation, c)) => Error::invalid(
            "backup",
            format!("{what}: refused by the database constraint {c}"),
        ),
        _ => db(format!("writing {what}"))(e),
    }
}

macro_rules! backup_impl {
    ($store:ty, $row:ty, $begin:literal) => {
        impl $store {
            fn backup_row(r: &$row) -> Result<Backup, Error> {
                let get = db("reading a backup row");
                let cols = (|| -> Result<_, sqlx::Error> {
                    Ok((
                        (
                            r.try_get::<i64, _>("id")?,
                            r.try_get::<i64, _>("source_id")?,
                            r.try_get::<String, _>("source")?,
                            r.try_get::<String, _>("source_folder")?,
                            r.try_get::<i64, _>("dest_id")?,
                            r.try_get::<String, _>("dest")?,
                            r.try_get::<String, _>("dest_minion_id")?,
                            r.try_get::<String, _>("dest_folder")?,
                        ),
                        (
                            r.try_get::<String, _>("excludes")?,
                            r.try_get::<bool, _>("exclude_proc_sys")?,
                            r.try_get::<bool, _>("active")?,
                            r.try_get::<Option<String>, _>("retain")?,
                            r.try_get::<Option<String>, _>("ssh_host")?,
                            r.try_get::<i64, _>("ssh_port")?,
                            r.try_get::<String, _>("ssh_user")?,
                        ),
                        (
                            r.try_get::<Option<String>, _>("source_internal_ip")?,
                            r.try_get::<Option<String>, _>("source_external_ip")?,
                            r.try_get::<Option<String>, _>("source_host_keys")?,
                            r.try_get::<Option<String>, _>("dest_pubkey")?,
                            r.try_get::<i64, _>("revision")?,
                            r.try_get::<i64, _>("created_at")?,
                            r.try_get::<i64, _>("updated_at")?,
                            r.try_get::<Option<i64>, _>("running_until")?,
                        ),
                    ))
                })()
                .map_err(get)?;
                let (a, b, c) = cols;
                let source_ips = [
                    parse_ip("internal_ip", c.0)?,
                    parse_ip("external_ip", c.1)?,
                ]
                .into_iter()
                .flatten()
                .collect();
                Ok(Backup {
                    id: a.0,
                    source_id: a.1,
                    source: a.2,
                    source_folder: a.3,
                    dest_id: a.4,
                    dest: a.5,
                    dest_minion_id: a.6,
                    dest_folder: a.7,
                    excludes: parse_json("excludes", &b.0)?,
                    exclude_proc_sys: b.1,
                    active: b.2,
                    retain: b.3.as_deref().map(|t| parse_json("retain", t)).transpose()?,
                    ssh_host: b.4,
                    ssh_port: port(b.5)?,
                    ssh_user: b.6,
                    source_ips,
                    source_host_keys: match c.2.as_deref() {
                        Some(t) => parse_json("ssh_host_keys", t)?,
                        None => Vec::new(),
                    },
                    dest_pubkey: c.3.filter(|k| !k.is_empty()),
                    running_until: c.7,
                    revision: c.4,
                    created_at: c.5,
                    updated_at: c.6,
                })
            }

            fn result_row(r: &$row) -> Result<BackupResult, Error> {
                let get = db("reading a backup result row");
                let cols = (|| -> Result<_, sqlx::Error> {
                    Ok((
                        r.try_get::<i64, _>("backup_id")?,
                        r.try_get::<String, _>("run_id")?,
                        r.try_get::<String, _>("level")?,
                        r.try_get::<i64, _>("started_at")?,
                        r.try_get::<i64, _>("duration_ms")?,
                        r.try_get::<String, _>("outcome")?,
                        (
                            r.try_get::<Option<i64>, _>("files")?,
                            r.try_get::<Option<i64>, _>("size")?,
                            r.try_get::<Option<i64>, _>("transferred")?,
                            r.try_get::<Option<i64>, _>("rsync_exit")?,
                            r.try_get::<String, _>("error")?,
                            r.try_get::<i64, _>("received_at")?,
                        ),
                    ))
                })()
                .map_err(get)?;
                Ok(BackupResult {
                    backup_id: cols.0,
                    run_id: cols.1,
                    level: cols.2,
                    started_at: cols.3,
                    duration_ms: cols.4,
                    outcome: cols.5.parse()?,
                    files: cols.6 .0,
                    size: cols.6 .1,
                    transferred: cols.6 .2,
                    rsync_exit: cols.6 .3,
                    error: cols.6 .4,
                    received_at: cols.6 .5,
                })
            }
        }

        impl BackupStore for $store {
            async fn insert_backup(&self, b: &NewBackup) -> Result<Backup, Error> {
                let what = format!("destination {} on server #{}", b.dest_folder, b.dest_id);
                let op = || format!("adding the backup into {what}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let retain = b
                    .retain
                    .as_ref()
                    .map(|r| json_text("retain", r))
                    .transpose()?;
                let id: i64 = sqlx::query_scalar(sql::INSERT)
                    .bind(b.source_id)
                    .bind(&b.source_folder)
                    .bind(b.dest_id)
                    .bind(&b.dest_folder)
                    .bind(json_text("excludes", &b.excludes)?)
                    .bind(b.exclude_proc_sys)
                    .bind(b.active)
                    .bind(retain)
                    .bind(&b.ssh_host)
                    .bind(i64::from(b.ssh_port))
                    .bind(&b.ssh_user)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| backup_write_error(&what, e))?;
                let row = sqlx::query(&format!("{}WHERE b.id = $1", sql::SELECT))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let created = Self::backup_row(&row)?;
                let change = BackupChange {
                    targets: targets_of(&created),
                    backup: created.clone(),
                };
                append_and_commit!(
                    tx,
                    OutboxKind::BackupCreated,
                    Some(created.dest_id),
                    &change,
                    now,
                    op()
                );
                Ok(created)
            }

            async fn backup(&self, id: i64) -> Result<Option<Backup>, Error> {
                sqlx::query(&format!("{}WHERE b.id = $1", sql::SELECT))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db(format!("reading backup #{id}")))?
                    .as_ref()
                    .map(Self::backup_row)
                    .transpose()
            }

            async fn backups(&self, filter: BackupFilter) -> Result<Vec<Backup>, Error> {
                let rows = sqlx::query(&format!(
                    "{}WHERE ($1 IS NULL OR b.dest_id = $1) AND ($2 IS NULL OR b.source_id = $2) \
                     ORDER BY b.id LIMIT $3",
                    sql::SELECT
                ))
                .bind(filter.dest_id)
                .bind(filter.source_id)
                .bind(MAX_LIST)
                .fetch_all(&self.pool)
                .await
                .map_err(db("listing backups"))?;
                rows.iter().map(Self::backup_row).collect()
            }

            async fn delete_backup(&self, id: i64) -> Result<Backup, Error> {
                let op = || format!("removing backup #{id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let row = sqlx::query(&format!("{}WHERE b.id = $1", sql::SELECT))
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db(op()))?
                    .ok_or_else(|| Error::NotFound {
                        kind: "backup",
                        key: format!("#{id}"),
                    })?;
                let gone = Self::backup_row(&row)?;
                sqlx::query(sql::DELETE)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let change = BackupChange {
                    targets: targets_of(&gone),
                    backup: gone.clone(),
                };
                append_and_commit!(
                    tx,
                    OutboxKind::BackupDeleted,
                    Some(gone.dest_id),
                    &change,
                    now_ms(),
                    op()
                );
                Ok(gone)
            }

            async fn backup_references(&self, id: i64) -> Result<Vec<String>, Error> {
                let rows = sqlx::query(&format!(
                    "{}WHERE b.source_id = $1 OR b.dest_id = $1 ORDER BY b.id LIMIT $2",
                    sql::SELECT
                ))
                .bind(id)
                .bind(MAX_LIST)
                .fetch_all(&self.pool)
                .await
                .map_err(db(format!("listing the backups of server #{id}")))?;
                rows.iter()
                    .map(|r| Self::backup_row(r).map(|b| b.to_string()))
                    .collect()
            }

            async fn set_backup_pubkey(&self, id: i64, pubkey: &str) -> Result<bool, Error> {
                let op = || format!("storing the backup key of server #{id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let old: Option<Option<String>> = sqlx::query_scalar(sql::PUBKEY)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let Some(old) = old else {
                    return Err(Error::NotFound {
                        kind: "server",
                        key: format!("#{id}"),
                    });
                };
                if old.as_deref() == Some(pubkey) {
                    return Ok(false);
                }
                sqlx::query(sql::SET_PUBKEY)
                    .bind(pubkey)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let sources: Vec<i64> = sqlx::query_scalar(sql::SOURCES_OF)
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let change = KeysChange {
                    server_id: id,
                    key: "backup_pubkey".into(),
                    targets: sources
                        .into_iter()
                        .map(|s| (s, StateKind::BackupSource))
                        .collect(),
                };
                append_and_commit!(tx, OutboxKind::BackupKeys, Some(id), &change, now_ms(), op());
                Ok(true)
            }

            async fn set_ssh_host_keys(&self, id: i64, keys: &[String]) -> Result<bool, Error> {
                let op = || format!("storing the SSH host keys of server #{id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let old: Option<Option<String>> = sqlx::query_scalar(sql::HOST_KEYS)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let Some(old) = old else {
                    return Err(Error::NotFound {
                        kind: "server",
                        key: format!("#{id}"),
                    });
                };
                let text = json_text("ssh_host_keys", &keys)?;
                if old.as_deref() == Some(text.as_str()) {
                    return Ok(false);
                }
                sqlx::query(sql::SET_HOST_KEYS)
                    .bind(&text)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let dests: Vec<i64> = sqlx::query_scalar(sql::DESTS_OF)
                    .bind(id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let change = KeysChange {
                    server_id: id,
                    key: "ssh_host_keys".into(),
                    targets: dests.into_iter().map(|d| (d, StateKind::Backup)).collect(),
                };
                append_and_commit!(tx, OutboxKind::BackupKeys, Some(id), &change, now_ms(), op());
                Ok(true)
            }

            async fn set_backup_running(&self, id: i64, until: Option<i64>) -> Result<(), Error> {
                sqlx::query(sql::RUNNING)
                    .bind(until)
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(db(format!("marking backup #{id} running")))?;
                Ok(())
            }

            async fn insert_backup_result(&self, r: &BackupResult) -> Result<bool, Error> {
                let done = sqlx::query(sql::INSERT_RESULT)
                    .bind(r.backup_id)
                    .bind(&r.run_id)
                    .bind(&r.level)
                    .bind(r.started_at)
                    .bind(r.duration_ms)
                    .bind(r.outcome.as_str())
                    .bind(r.files)
                    .bind(r.size)
                    .bind(r.transferred)
                    .bind(r.rsync_exit)
                    .bind(&r.error)
                    .bind(now_ms())
                    .execute(&self.pool)
                    .await
                    .map_err(|e| match violation(&e) {
                        Some((ErrorKind::ForeignKeyViolation, _)) => Error::NotFound {
                            kind: "backup",
                            key: format!("#{}", r.backup_id),
                        },
                        _ => db(format!(
                            "recording run {} of backup #{}",
                            r.run_id, r.backup_id
                        ))(e),
                    })?;
                Ok(done.rows_affected() > 0)
            }

            async fn backup_results(
                &self,
                backup_id: i64,
                limit: i64,
            ) -> Result<Vec<BackupResult>, Error> {
                let rows = sqlx::query(sql::RESULTS)
                    .bind(backup_id)
                    .bind(limit.clamp(0, MAX_LIST))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db(format!("reading the results of backup #{backup_id}")))?;
                rows.iter().map(Self::result_row).collect()
            }

            async fn backup_results_mark(&self) -> Result<(i64, i64), Error> {
                sqlx::query_as::<_, (i64, i64)>(sql::RESULTS_MARK)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db("reading the backup results' mark"))
            }
        }
    };
}

/// The two targets of a backup.
fn targets_of(b: &Backup) -> Vec<(i64, StateKind)> {
    vec![
        (b.dest_id, StateKind::Backup),
        (b.source_id, StateKind::BackupSource),
    ]
}

backup_impl!(SqliteStore, sqlx::sqlite::SqliteRow, "BEGIN IMMEDIATE");
backup_impl!(PgStore, sqlx::postgres::PgRow, "BEGIN");

impl BackupStore for DbStore {
    async fn insert_backup(&self, b: &NewBackup) -> Result<Backup, Error> {
        dispatch!(self, s => s.insert_backup(b))
    }
    async fn backup(&self, id: i64) -> Result<Option<Backup>, Error> {
        dispatch!(self, s => s.backup(id))
    }
    async fn backups(&self, filter: BackupFilter) -> Result<Vec<Backup>, Error> {
        dispatch!(self, s => s.backups(filter))
    }
    async fn delete_backup(&self, id: i64) -> Result<Backup, Error> {
        dispatch!(self, s => s.delete_backup(id))
    }
    async fn backup_references(&self, id: i64) -> Result<Vec<String>, Error> {
        dispatch!(self, s => s.backup_references(id))
    }
    async fn set_backup_pubkey(&self, id: i64, pubkey: &str) -> Result<bool, Error> {
        dispatch!(self, s => s.set_backup_pubkey(id, pubkey))
    }
    async fn set_ssh_host_keys(&self, id: i64, keys: &[String]) -> Result<bool, Error> {
        dispatch!(self, s => s.set_ssh_host_keys(id, keys))
    }
    async fn set_backup_running(&self, id: i64, until: Option<i64>) -> Result<(), Error> {
        dispatch!(self, s => s.set_backup_running(id, until))
    }
    async fn insert_backup_result(&self, r: &BackupResult) -> Result<bool, Error> {
        dispatch!(self, s => s.insert_backup_result(r))
    }
    async fn backup_results(&self, backup_id: i64, limit: i64) -> Result<Vec<BackupResult>, Error> {
        dispatch!(self, s => s.backup_results(backup_id, limit))
    }
    async fn backup_results_mark(&self) -> Result<(i64, i64), Error> {
        dispatch!(self, s => s.backup_results_mark())
    }
}
