//! The SQL of several daemons on one registry (`registry::cluster`), for
//! both backends (one body, `cluster_impl!`, given each backend's
//! expression for the database clock in milliseconds).
//!
//! A lease is granted by one statement: an upsert that takes the row when
//! it is free, lapsed or already the caller's, and otherwise changes
//! nothing and returns no row. On PostgreSQL concurrent callers queue on
//! the row lock and the condition is evaluated again on the latest row, so
//! exactly one of them wins; SQLite has one writer.

use std::future::Future;

use sqlx::Row as _;

use super::{db, DbStore, PgStore, SqliteStore};
use crate::registry::cluster::{DaemonInfo, Lease, Presence, SeenBy};
use crate::registry::Error;

/// Daemons, leases and minion presence in the registry.
pub trait ClusterStore {
    /// The database clock now (ms since the epoch).
    fn db_now(&self) -> impl Future<Output = Result<i64, Error>> + Send;
    /// Records daemon `id`'s heartbeat (and, with `starting`, its start):
    /// the database time of the beat.
    fn daemon_beat(
        &self,
        id: &str,
        master: &str,
        version: &str,
        starting: bool,
    ) -> impl Future<Output = Result<i64, Error>> + Send;
    /// Every daemon known, by id, with the database time now.
    fn daemons(&self) -> impl Future<Output = Result<(Vec<DaemonInfo>, i64), Error>> + Send;
    /// Forgets daemon `id` (a clean stop): `true` if it was there.
    fn daemon_remove(&self, id: &str) -> impl Future<Output = Result<bool, Error>> + Send;
    /// Takes or renews lease `name` for `holder` for `ttl_ms`: the lease as
    /// granted, or `None` while another holder's has not lapsed. A renewal
    /// keeps the epoch; a new tenure (another holder, or the same after a
    /// lapse) is the last epoch + 1.
    fn lease_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> impl Future<Output = Result<Option<Lease>, Error>> + Send;
    /// Lets lease `name` lapse now if `holder` still holds it in `epoch`
    /// (a clean stop hands it over at once): `true` if it did.
    fn lease_release(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
    /// Lease `name` as stored (lapsed or not), with the database time now.
    fn lease(&self, name: &str)
        -> impl Future<Output = Result<(Option<Lease>, i64), Error>> + Send;
    /// Records that `minion_id` was seen on `master`'s bus by `daemon_id`.
    fn presence_seen(
        &self,
        minion_id: &str,
        master: &str,
        daemon_id: &str,
        seen_by: SeenBy,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// Where `minion_id` was last seen.
    fn presence(
        &self,
        minion_id: &str,
    ) -> impl Future<Output = Result<Option<Presence>, Error>> + Send;
    /// Every lease, by name, with the database time now.
    fn leases(&self) -> impl Future<Output = Result<(Vec<Lease>, i64), Error>> + Send;
    /// How many minions were last seen on each master, by master.
    fn presence_by_master(&self) -> impl Future<Output = Result<Vec<(String, i64)>, Error>> + Send;
}

macro_rules! cluster_impl {
    ($store:ty, $row:ty, $begin:literal, $now:literal) => {
        impl $store {
            fn lease_row(r: &$row) -> Result<Lease, Error> {
                (|| -> Result<Lease, sqlx::Error> {
                    Ok(Lease {
                        name: r.try_get("name")?,
                        holder: r.try_get("holder")?,
                        epoch: r.try_get("epoch")?,
                        acquired_at: r.try_get("acquired_at")?,
                        expires_at: r.try_get("expires_at")?,
                    })
                })()
                .map_err(db("reading a lease row"))
            }
        }

        impl ClusterStore for $store {
            async fn db_now(&self) -> Result<i64, Error> {
                sqlx::query_scalar(concat!("SELECT ", $now))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db("reading the database clock"))
            }

            async fn daemon_beat(
                &self,
                id: &str,
                master: &str,
                version: &str,
                starting: bool,
            ) -> Result<i64, Error> {
                sqlx::query_scalar(concat!(
                    "INSERT INTO daemons (id, master, version, started_at, heartbeat_at) \
                     VALUES ($1, $2, $3, ", $now, ", ", $now, ") \
                     ON CONFLICT (id) DO UPDATE SET master = excluded.master, \
                     version = excluded.version, heartbeat_at = excluded.heartbeat_at, \
                     started_at = CASE WHEN $4 THEN excluded.started_at \
                     ELSE daemons.started_at END \
                     RETURNING heartbeat_at"
                ))
                .bind(id)
                .bind(master)
                .bind(version)
                .bind(starting)
                .fetch_one(&self.pool)
                .await
                .map_err(db(format!("recording daemon {id}'s heartbeat")))
            }

            async fn daemons(&self) -> Result<(Vec<DaemonInfo>, i64), Error> {
                let rows = sqlx::query(
                    "SELECT id, master, version, started_at, heartbeat_at FROM daemons ORDER BY id",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(db("listing daemons"))?;
                let daemons = rows
                    .iter()
                    .map(|r| -> Result<DaemonInfo, sqlx::Error> {
                        Ok(DaemonInfo {
                            id: r.try_get("id")?,
                            master: r.try_get("master")?,
                            version: r.try_get("version")?,
                            started_at: r.try_get("started_at")?,
                            heartbeat_at: r.try_get("heartbeat_at")?,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db("reading a daemon row"))?;
                Ok((daemons, self.db_now().await?))
            }

            async fn daemon_remove(&self, id: &str) -> Result<bool, Error> {
                let r = sqlx::query("DELETE FROM daemons WHERE id = $1")
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(db(format!("removing daemon {id}")))?;
                Ok(r.rows_affected() > 0)
            }

            async fn lease_acquire(
                &self,
                name: &str,
                holder: &str,
                ttl_ms: i64,
            ) -> Result<Option<Lease>, Error> {
                let row = sqlx::query(concat!(
                    "INSERT INTO leases (name, holder, epoch, acquired_at, expires_at) \
                     VALUES ($1, $2, 1, ", $now, ", ", $now, " + $3) \
                     ON CONFLICT (name) DO UPDATE SET \
                     epoch = CASE WHEN leases.holder = excluded.holder \
                       AND leases.expires_at > excluded.acquired_at \
                       THEN leases.epoch ELSE leases.epoch + 1 END, \
                     acquired_at = CASE WHEN leases.holder = excluded.holder \
                       AND leases.expires_at > excluded.acquired_at \
                       THEN leases.acquired_at ELSE excluded.acquired_at END, \
                     holder = excluded.holder, \
                     expires_at = excluded.expires_at \
                     WHERE leases.holder = excluded.holder \
                       OR leases.expires_at <= excluded.acquired_at \
                     RETURNING name, holder, epoch, acquired_at, expires_at"
                ))
                .bind(name)
                .bind(holder)
                .bind(ttl_ms)
                .fetch_optional(&self.pool)
                .await
                .map_err(db(format!("taking lease {name} for {holder}")))?;
                row.as_ref().map(Self::lease_row).transpose()
            }

            async fn lease_release(
                &self,
                name: &str,
                holder: &str,
                epoch: i64,
            ) -> Result<bool, Error> {
                let r = sqlx::query(concat!(
                    "UPDATE leases SET expires_at = ", $now,
                    " WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > ", $now
                ))
                .bind(name)
                .bind(holder)
                .bind(epoch)
                .execute(&self.pool)
                .await
                .map_err(db(format!("releasing lease {name} of {holder}")))?;
                Ok(r.rows_affected() > 0)
            }

            async fn lease(&self, name: &str) -> Result<(Option<Lease>, i64), Error> {
                let row = sqlx::query(
                    "SELECT name, holder, epoch, acquired_at, expires_at FROM leases WHERE name = $1",
                )
                .bind(name)
                .fetch_optional(&self.pool)
                .await
                .map_err(db(format!("reading lease {name}")))?;
                let lease = row.as_ref().map(Self::lease_row).transpose()?;
                Ok((lease, self.db_now().await?))
            }

            async fn presence_seen(
                &self,
                minion_id: &str,
                master: &str,
                daemon_id: &str,
                seen_by: SeenBy,
            ) -> Result<(), Error> {
                sqlx::query(concat!(
                    "INSERT INTO minion_presence (minion_id, master, daemon_id, seen_by, seen_at) \
                     VALUES ($1, $2, $3, $4, ", $now, ") \
                     ON CONFLICT (minion_id) DO UPDATE SET master = excluded.master, \
                     daemon_id = excluded.daemon_id, seen_by = excluded.seen_by, \
                     seen_at = excluded.seen_at \
                     WHERE excluded.seen_at >= minion_presence.seen_at"
                ))
                .bind(minion_id)
                .bind(master)
                .bind(daemon_id)
                .bind(seen_by.as_str())
                .execute(&self.pool)
                .await
                .map_err(db(format!("recording where minion {minion_id} is")))?;
                Ok(())
            }

            async fn leases(&self) -> Result<(Vec<Lease>, i64), Error> {
                let rows = sqlx::query(
                    "SELECT name, holder, epoch, acquired_at, expires_at FROM leases ORDER BY name",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(db("listing leases"))?;
                let leases = rows.iter().map(Self::lease_row).collect::<Result<Vec<_>, _>>()?;
                Ok((leases, self.db_now().await?))
            }

            async fn presence_by_master(&self) -> Result<Vec<(String, i64)>, Error> {
                sqlx::query_as(
                    "SELECT master, COUNT(*) FROM minion_presence GROUP BY master ORDER BY master",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(db("counting minions by master"))
            }

            async fn presence(&self, minion_id: &str) -> Result<Option<Presence>, Error> {
                let row = sqlx::query(
                    "SELECT minion_id, master, daemon_id, seen_by, seen_at \
                     FROM minion_presence WHERE minion_id = $1",
                )
                .bind(minion_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db(format!("reading where minion {minion_id} is")))?;
                row.map(|r| -> Result<Presence, sqlx::Error> {
                    Ok(Presence {
                        minion_id: r.try_get("minion_id")?,
                        master: r.try_get("master")?,
                        daemon_id: r.try_get("daemon_id")?,
                        seen_by: r.try_get("seen_by")?,
                        seen_at: r.try_get("seen_at")?,
                    })
                })
                .transpose()
                .map_err(db("reading a presence row"))
            }
        }
    };
}

for_both_backends!(cluster_impl);

impl ClusterStore for DbStore {
    async fn db_now(&self) -> Result<i64, Error> {
        dispatch!(self, s => s.db_now())
    }
    async fn daemon_beat(
        &self,
        id: &str,
        master: &str,
        version: &str,
        starting: bool,
    ) -> Result<i64, Error> {
        dispatch!(self, s => s.daemon_beat(id, master, version, starting))
    }
    async fn daemons(&self) -> Result<(Vec<DaemonInfo>, i64), Error> {
        dispatch!(self, s => s.daemons())
    }
    async fn daemon_remove(&self, id: &str) -> Result<bool, Error> {
        dispatch!(self, s => s.daemon_remove(id))
    }
    async fn lease_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<Option<Lease>, Error> {
        dispatch!(self, s => s.lease_acquire(name, holder, ttl_ms))
    }
    async fn lease_release(&self, name: &str, holder: &str, epoch: i64) -> Result<bool, Error> {
        dispatch!(self, s => s.lease_release(name, holder, epoch))
    }
    async fn lease(&self, name: &str) -> Result<(Option<Lease>, i64), Error> {
        dispatch!(self, s => s.lease(name))
    }
    async fn presence_seen(
        &self,
        minion_id: &str,
        master: &str,
        daemon_id: &str,
        seen_by: SeenBy,
    ) -> Result<(), Error> {
        dispatch!(self, s => s.presence_seen(minion_id, master, daemon_id, seen_by))
    }
    async fn presence(&self, minion_id: &str) -> Result<Option<Presence>, Error> {
        dispatch!(self, s => s.presence(minion_id))
    }
    async fn leases(&self) -> Result<(Vec<Lease>, i64), Error> {
        dispatch!(self, s => s.leases())
    }
    async fn presence_by_master(&self) -> Result<Vec<(String, i64)>, Error> {
        dispatch!(self, s => s.presence_by_master())
    }
}
