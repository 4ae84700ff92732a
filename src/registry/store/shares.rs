//! The SQL of samba shares, for both backends (one body, `shares_impl!`,
//! instantiated twice like `store_impl!`). Every write is one transaction
//! ending with its outbox row, whose payload ([`ShareChange`]) names the
//! target server and never carries the NT hash.

use std::future::Future;

use sqlx::error::ErrorKind;
use sqlx::Row as _;

use super::{db, now_ms, violation, DbStore, PgStore, SqliteStore};
use crate::registry::shares::{NtHash, Share, ShareChange};
use crate::registry::{outbox, Error, OutboxKind};

/// A new share, validated by the service.
#[derive(Debug, Clone)]
pub struct NewShare {
    /// The samba server.
    pub server_id: i64,
    /// Share name.
    pub name: String,
    /// Folder relative to the samba base.
    pub folder: String,
    /// System user.
    pub user: String,
    /// The NT hash of the generated password.
    pub nt_hash: NtHash,
}

/// Samba shares in the registry, each write with its outbox row.
pub trait ShareStore {
    /// Adds a share.
    fn insert_share(&self, s: &NewShare) -> impl Future<Output = Result<Share, Error>> + Send;
    /// One share.
    fn share(&self, id: i64) -> impl Future<Output = Result<Option<Share>, Error>> + Send;
    /// Shares, of one server or all, by id.
    fn shares(
        &self,
        server_id: Option<i64>,
    ) -> impl Future<Output = Result<Vec<Share>, Error>> + Send;
    /// A server's shares with their NT hashes (for its pillar only).
    fn shares_with_hashes(
        &self,
        server_id: i64,
    ) -> impl Future<Output = Result<Vec<(Share, NtHash)>, Error>> + Send;
    /// Replaces a share's NT hash (a new password).
    fn set_share_hash(
        &self,
        id: i64,
        nt_hash: &NtHash,
    ) -> impl Future<Output = Result<Share, Error>> + Send;
    /// Removes a share, returning it.
    fn delete_share(&self, id: i64) -> impl Future<Output = Result<Share, Error>> + Send;
    /// Every share of server `id`, described.
    fn share_references(&self, id: i64) -> impl Future<Output = Result<Vec<String>, Error>> + Send;
}

mod sql {
    pub const SELECT: &str = "SELECT sh.id, sh.server_id, s.name AS server, sh.name, \
         sh.folder, sh.user_name, sh.revision, sh.created_at, sh.updated_at \
         FROM shares sh JOIN servers s ON s.id = sh.server_id ";
    pub const HASHES: &str = "SELECT sh.id, sh.server_id, s.name AS server, sh.name, \
         sh.folder, sh.user_name, sh.revision, sh.created_at, sh.updated_at, sh.nt_hash \
         FROM shares sh JOIN servers s ON s.id = sh.server_id \
         WHERE sh.server_id = $1 ORDER BY sh.id";
    pub const INSERT: &str = "INSERT INTO shares (server_id, name, folder, user_name, nt_hash, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING id";
    pub const SET_HASH: &str = "UPDATE shares SET nt_hash = $1, updated_at = $2, \
         revision = revision + 1 WHERE id = $3";
    pub const DELETE: &str = "DELETE FROM shares WHERE id = $1";
}

/// A failed share write mapped to what the caller can act on.
fn share_write_error(what: &str, e: sqlx::Error) -> Error {
    match violation(&e) {
        Some((ErrorKind::UniqueViolation, c)) => {
            let key = if c.contains("folder") {
                "its folder"
            } else if c.contains("user") {
                "its user"
            } else {
                "its name"
            };
            Error::DuplicateShare {
                what: format!("{what} ({key})"),
                by: "another share".to_owned(),
            }
        }
        Some((ErrorKind::CheckViolation, c)) => Error::invalid(
            "share",
            format!("{what}: refused by the database constraint {c}"),
        ),
        Some((ErrorKind::ForeignKeyViolation, c)) => Error::invalid(
            "share",
            format!("{what}: the server is gone (refused by {c})"),
        ),
        _ => db(format!("writing {what}"))(e),
    }
}

fn not_found(id: i64) -> Error {
    Error::NotFound {
        kind: "share",
        key: format!("#{id}"),
    }
}

macro_rules! shares_impl {
    ($store:ty, $row:ty, $begin:literal) => {
        impl $store {
            fn share_row(r: &$row) -> Result<Share, Error> {
                let get = db("reading a share row");
                let cols = (|| -> Result<_, sqlx::Error> {
                    Ok(Share {
                        id: r.try_get("id")?,
                        server_id: r.try_get("server_id")?,
                        server: r.try_get("server")?,
                        name: r.try_get("name")?,
                        folder: r.try_get("folder")?,
                        user: r.try_get("user_name")?,
                        revision: r.try_get("revision")?,
                        created_at: r.try_get("created_at")?,
                        updated_at: r.try_get("updated_at")?,
                    })
                })()
                .map_err(get)?;
                Ok(cols)
            }
        }

        impl ShareStore for $store {
            async fn insert_share(&self, s: &NewShare) -> Result<Share, Error> {
                let what = format!("share {} on server #{}", s.name, s.server_id);
                let op = || format!("adding {what}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let id: i64 = sqlx::query_scalar(sql::INSERT)
                    .bind(s.server_id)
                    .bind(&s.name)
                    .bind(&s.folder)
                    .bind(&s.user)
                    .bind(s.nt_hash.expose())
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| share_write_error(&what, e))?;
                let row = sqlx::query(&format!("{}WHERE sh.id = $1", sql::SELECT))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let created = Self::share_row(&row)?;
                let change = ShareChange {
                    share: created.clone(),
                    targets: vec![created.server_id],
                };
                append_and_commit!(
                    tx,
                    OutboxKind::ShareCreated,
                    Some(created.server_id),
                    &change,
                    now,
                    op()
                );
                Ok(created)
            }

            async fn share(&self, id: i64) -> Result<Option<Share>, Error> {
                sqlx::query(&format!("{}WHERE sh.id = $1", sql::SELECT))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db(format!("reading share #{id}")))?
                    .as_ref()
                    .map(Self::share_row)
                    .transpose()
            }

            async fn shares(&self, server_id: Option<i64>) -> Result<Vec<Share>, Error> {
                let rows = match server_id {
                    Some(s) => {
                        sqlx::query(&format!(
                            "{}WHERE sh.server_id = $1 ORDER BY sh.id",
                            sql::SELECT
                        ))
                        .bind(s)
                        .fetch_all(&self.pool)
                        .await
                    }
                    None => {
                        sqlx::query(&format!("{}ORDER BY sh.id", sql::SELECT))
                            .fetch_all(&self.pool)
                            .await
                    }
                }
                .map_err(db("listing shares"))?;
                rows.iter().map(Self::share_row).collect()
            }

            async fn shares_with_hashes(
                &self,
                server_id: i64,
            ) -> Result<Vec<(Share, NtHash)>, Error> {
                let rows = sqlx::query(sql::HASHES)
                    .bind(server_id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db(format!("reading the shares of server #{server_id}")))?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    let hash: String =
                        r.try_get("nt_hash").map_err(db("reading a share's hash"))?;
                    out.push((Self::share_row(r)?, NtHash::from_stored(hash)?));
                }
                Ok(out)
            }

            async fn set_share_hash(&self, id: i64, nt_hash: &NtHash) -> Result<Share, Error> {
                let op = || format!("setting a new password of share #{id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let done = sqlx::query(sql::SET_HASH)
                    .bind(nt_hash.expose())
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                if done.rows_affected() == 0 {
                    return Err(not_found(id));
                }
                let row = sqlx::query(&format!("{}WHERE sh.id = $1", sql::SELECT))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let updated = Self::share_row(&row)?;
                let change = ShareChange {
                    share: updated.clone(),
                    targets: vec![updated.server_id],
                };
                append_and_commit!(
                    tx,
                    OutboxKind::ShareUpdated,
                    Some(updated.server_id),
                    &change,
                    now,
                    op()
                );
                Ok(updated)
            }

            async fn delete_share(&self, id: i64) -> Result<Share, Error> {
                let op = || format!("removing share #{id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let row = sqlx::query(&format!("{}WHERE sh.id = $1", sql::SELECT))
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db(op()))?
                    .ok_or_else(|| not_found(id))?;
                let gone = Self::share_row(&row)?;
                sqlx::query(sql::DELETE)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let change = ShareChange {
                    share: gone.clone(),
                    targets: vec![gone.server_id],
                };
                append_and_commit!(
                    tx,
                    OutboxKind::ShareDeleted,
                    Some(gone.server_id),
                    &change,
                    now_ms(),
                    op()
                );
                Ok(gone)
            }

            async fn share_references(&self, id: i64) -> Result<Vec<String>, Error> {
                Ok(self
                    .shares(Some(id))
                    .await?
                    .iter()
                    .map(Share::to_string)
                    .collect())
            }
        }
    };
}

shares_impl!(SqliteStore, sqlx::sqlite::SqliteRow, "BEGIN IMMEDIATE");
shares_impl!(PgStore, sqlx::postgres::PgRow, "BEGIN");

impl ShareStore for DbStore {
    async fn insert_share(&self, s: &NewShare) -> Result<Share, Error> {
        dispatch!(self, st => st.insert_share(s))
    }
    async fn share(&self, id: i64) -> Result<Option<Share>, Error> {
        dispatch!(self, st => st.share(id))
    }
    async fn shares(&self, server_id: Option<i64>) -> Result<Vec<Share>, Error> {
        dispatch!(self, st => st.shares(server_id))
    }
    async fn shares_with_hashes(&self, server_id: i64) -> Result<Vec<(Share, NtHash)>, Error> {
        dispatch!(self, st => st.shares_with_hashes(server_id))
    }
    async fn set_share_hash(&self, id: i64, nt_hash: &NtHash) -> Result<Share, Error> {
        dispatch!(self, st => st.set_share_hash(id, nt_hash))
    }
    async fn delete_share(&self, id: i64) -> Result<Share, Error> {
        dispatch!(self, st => st.delete_share(id))
    }
    async fn share_references(&self, id: i64) -> Result<Vec<String>, Error> {
        dispatch!(self, st => st.share_references(id))
    }
}
