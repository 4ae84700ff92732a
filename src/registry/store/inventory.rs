//! The SQL of port and hostname forwards, for both backends (one body,
//! `inventory_impl!`, instantiated twice like `store_impl!`). Every write is
//! one transaction ending with its outbox row, whose payload names the
//! target servers the change affects.

use std::future::Future;

use sqlx::error::ErrorKind;
use sqlx::Row as _;

use super::{db, now_ms, parse_ip, violation, PgStore, SqliteStore};
use crate::registry::inventory::{ForwardChange, HostnameForward, PortForward, Proto};
use crate::registry::{outbox, Error, OutboxKind};

/// A new port forward, its references resolved and checked by the service.
#[derive(Debug, Clone, Copy)]
pub struct NewPortForward {
    /// Host server id.
    pub host_id: i64,
    /// Guest server id.
    pub dest_id: i64,
    /// Protocol.
    pub proto: Proto,
    /// Host port.
    pub source_port: u16,
    /// Guest port.
    pub dest_port: u16,
}

/// A new hostname forward, its references resolved and checked by the service.
#[derive(Debug, Clone)]
pub struct NewHostnameForward {
    /// Domain, lower case.
    pub domain: String,
    /// Guest server id.
    pub dest_id: i64,
    /// The guest's host.
    pub host_id: i64,
    /// The host's proxy.
    pub proxy_id: i64,
    /// Listen port.
    pub listen_port: u16,
    /// Guest port.
    pub dest_port: u16,
    /// Path prefix.
    pub path: String,
}

/// Forwards in the registry: CRUD, each write with its outbox row.
pub trait InventoryStore {
    /// Adds a port forward.
    fn insert_port_forward(
        &self,
        f: &NewPortForward,
    ) -> impl Future<Output = Result<PortForward, Error>> + Send;
    /// One port forward.
    fn port_forward(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Option<PortForward>, Error>> + Send;
    /// Port forwards, of one host or all, by id.
    fn port_forwards(
        &self,
        host_id: Option<i64>,
    ) -> impl Future<Output = Result<Vec<PortForward>, Error>> + Send;
    /// Writes `f`'s dest/proto/ports if the row is still at `f.revision`.
    fn update_port_forward(
        &self,
        f: &PortForward,
    ) -> impl Future<Output = Result<PortForward, Error>> + Send;
    /// Removes a port forward, returning it.
    fn delete_port_forward(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<PortForward, Error>> + Send;
    /// Adds a hostname forward.
    fn insert_hostname_forward(
        &self,
        f: &NewHostnameForward,
    ) -> impl Future<Output = Result<HostnameForward, Error>> + Send;
    /// One hostname forward.
    fn hostname_forward(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Option<HostnameForward>, Error>> + Send;
    /// Hostname forwards, of one proxy or all, by id.
    fn hostname_forwards(
        &self,
        proxy_id: Option<i64>,
    ) -> impl Future<Output = Result<Vec<HostnameForward>, Error>> + Send;
    /// Writes `f` if the row is still at `f.revision`; `previous_proxy` is
    /// bumped too when the change moved the site.
    fn update_hostname_forward(
        &self,
        f: &HostnameForward,
        previous_proxy: i64,
    ) -> impl Future<Output = Result<HostnameForward, Error>> + Send;
    /// Removes a hostname forward, returning it.
    fn delete_hostname_forward(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<HostnameForward, Error>> + Send;
    /// Every forward that names server `id` (as host, guest or proxy), described.
    fn forward_references(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Vec<String>, Error>> + Send;
}

mod sql {
    pub const PORT_SELECT: &str = "SELECT f.id, f.host_id, h.name AS host, f.dest_id, \
         d.name AS dest, d.internal_ip AS dest_ip, f.proto, f.source_port, f.dest_port, \
         f.revision, f.created_at, f.updated_at \
         FROM port_forwards f JOIN servers h ON h.id = f.host_id \
         JOIN servers d ON d.id = f.dest_id ";
    pub const INSERT_PORT: &str = "INSERT INTO port_forwards (host_id, dest_id, proto, \
         source_port, dest_port, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) \
         RETURNING id";
    pub const UPDATE_PORT: &str = "UPDATE port_forwards SET dest_id = $1, proto = $2, \
         source_port = $3, dest_port = $4, updated_at = $5, revision = revision + 1 \
         WHERE id = $6 AND revision = $7";
    pub const DELETE_PORT: &str = "DELETE FROM port_forwards WHERE id = $1";
    pub const PORT_REVISION: &str = "SELECT revision FROM port_forwards WHERE id = $1";

    pub const HOST_SELECT: &str = "SELECT f.id, f.domain, f.dest_id, d.name AS dest, \
         d.internal_ip AS dest_ip, f.host_id, f.proxy_id, p.name AS proxy, f.listen_port, \
         f.dest_port, f.path, f.revision, f.created_at, f.updated_at \
         FROM hostname_forwards f JOIN servers d ON d.id = f.dest_id \
         JOIN servers p ON p.id = f.proxy_id ";
    pub const INSERT_HOST: &str = "INSERT INTO hostname_forwards (domain, dest_id, host_id, \
         proxy_id, listen_port, dest_port, path, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) RETURNING id";
    pub const UPDATE_HOST: &str = "UPDATE hostname_forwards SET domain = $1, dest_id = $2, \
         host_id = $3, proxy_id = $4, listen_port = $5, dest_port = $6, path = $7, \
         updated_at = $8, revision = revision + 1 WHERE id = $9 AND revision = $10";
    pub const DELETE_HOST: &str = "DELETE FROM hostname_forwards WHERE id = $1";
    pub const HOST_REVISION: &str = "SELECT revision FROM hostname_forwards WHERE id = $1";
}

fn port(field: &str, n: i64) -> Result<u16, Error> {
    u16::try_from(n).map_err(|_| Error::invalid(field, format!("stored value {n} is not a port")))
}

/// A failed forward write mapped to what the caller can act on.
fn forward_write_error(what: &str, e: sqlx::Error) -> Error {
    match violation(&e) {
        Some((ErrorKind::UniqueViolation, _)) => Error::DuplicateForward {
            what: what.to_owned(),
            by: "another forward".to_owned(),
        },
        Some((ErrorKind::ForeignKeyViolation, c)) => Error::invalid(
            "forward",
            format!(
                "{what}: the destination is not a guest of that host, or the proxy is not its \
                 host's (refused by {c})"
            ),
        ),
        Some((ErrorKind::CheckViolation, c)) => Error::invalid(
            "forward",
            format!("{what}: refused by the database constraint {c}"),
        ),
        _ => db(format!("writing {what}"))(e),
    }
}

fn not_found(kind: &'static str, id: i64) -> Error {
    Error::NotFound {
        kind,
        key: format!("#{id}"),
    }
}

macro_rules! inventory_impl {
    ($store:ty, $row:ty, $begin:literal) => {
        impl $store {
            fn port_row(r: &$row) -> Result<PortForward, Error> {
                let get = db("reading a port forward row");
                let cols = (|| -> Result<_, sqlx::Error> {
                    Ok((
                        r.try_get::<i64, _>("id")?,
                        r.try_get::<i64, _>("host_id")?,
                        r.try_get::<String, _>("host")?,
                        r.try_get::<i64, _>("dest_id")?,
                        r.try_get::<String, _>("dest")?,
                        r.try_get::<Option<String>, _>("dest_ip")?,
                        r.try_get::<String, _>("proto")?,
                        r.try_get::<i64, _>("source_port")?,
                        r.try_get::<i64, _>("dest_port")?,
                        (
                            r.try_get::<i64, _>("revision")?,
                            r.try_get::<i64, _>("created_at")?,
                            r.try_get::<i64, _>("updated_at")?,
                        ),
                    ))
                })()
                .map_err(get)?;
                Ok(PortForward {
                    id: cols.0,
                    host_id: cols.1,
                    host: cols.2,
                    dest_id: cols.3,
                    dest: cols.4,
                    dest_ip: parse_ip("internal_ip", cols.5)?,
                    proto: cols.6.parse()?,
                    source_port: port("source_port", cols.7)?,
                    dest_port: port("dest_port", cols.8)?,
                    revision: cols.9 .0,
                    created_at: cols.9 .1,
                    updated_at: cols.9 .2,
                })
            }

            fn hostname_row(r: &$row) -> Result<HostnameForward, Error> {
                let get = db("reading a hostname forward row");
                let cols = (|| -> Result<_, sqlx::Error> {
                    Ok((
                        r.try_get::<i64, _>("id")?,
                        r.try_get::<String, _>("domain")?,
                        r.try_get::<i64, _>("dest_id")?,
                        r.try_get::<String, _>("dest")?,
                        r.try_get::<Option<String>, _>("dest_ip")?,
                        r.try_get::<i64, _>("host_id")?,
                        r.try_get::<i64, _>("proxy_id")?,
                        r.try_get::<String, _>("proxy")?,
                        r.try_get::<i64, _>("listen_port")?,
                        r.try_get::<i64, _>("dest_port")?,
                        r.try_get::<String, _>("path")?,
                        (
                            r.try_get::<i64, _>("revision")?,
                            r.try_get::<i64, _>("created_at")?,
                            r.try_get::<i64, _>("updated_at")?,
                        ),
                    ))
                })()
                .map_err(get)?;
                Ok(HostnameForward {
                    id: cols.0,
                    domain: cols.1,
                    dest_id: cols.2,
                    dest: cols.3,
                    dest_ip: parse_ip("internal_ip", cols.4)?,
                    host_id: cols.5,
                    proxy_id: cols.6,
                    proxy: cols.7,
                    listen_port: port("listen_port", cols.8)?,
                    dest_port: port("dest_port", cols.9)?,
                    path: cols.10,
                    revision: cols.11 .0,
                    created_at: cols.11 .1,
                    updated_at: cols.11 .2,
                })
            }
        }

        impl InventoryStore for $store {
            async fn insert_port_forward(&self, f: &NewPortForward) -> Result<PortForward, Error> {
                let what = format!("port {}/{} on host #{}", f.proto, f.source_port, f.host_id);
                let op = || format!("adding {what}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let id: i64 = sqlx::query_scalar(sql::INSERT_PORT)
                    .bind(f.host_id)
                    .bind(f.dest_id)
                    .bind(f.proto.as_str())
                    .bind(i64::from(f.source_port))
                    .bind(i64::from(f.dest_port))
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| forward_write_error(&what, e))?;
                let row = sqlx::query(&format!("{}WHERE f.id = $1", sql::PORT_SELECT))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let created = Self::port_row(&row)?;
                let change = ForwardChange {
                    forward: created.clone(),
                    targets: vec![created.host_id],
                };
                append_and_commit!(
                    tx,
                    OutboxKind::PortForwardCreated,
                    Some(created.host_id),
                    &change,
                    now,
                    op()
                );
                Ok(created)
            }

            async fn port_forward(&self, id: i64) -> Result<Option<PortForward>, Error> {
                sqlx::query(&format!("{}WHERE f.id = $1", sql::PORT_SELECT))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db(format!("reading port forward #{id}")))?
                    .as_ref()
                    .map(Self::port_row)
                    .transpose()
            }

            async fn port_forwards(&self, host_id: Option<i64>) -> Result<Vec<PortForward>, Error> {
                let rows = match host_id {
                    Some(h) => {
                        sqlx::query(&format!(
                            "{}WHERE f.host_id = $1 ORDER BY f.id",
                            sql::PORT_SELECT
                        ))
                        .bind(h)
                        .fetch_all(&self.pool)
                        .await
                    }
                    None => {
                        sqlx::query(&format!("{}ORDER BY f.id", sql::PORT_SELECT))
                            .fetch_all(&self.pool)
                            .await
                    }
                }
                .map_err(db("listing port forwards"))?;
                rows.iter().map(Self::port_row).collect()
            }

            async fn update_port_forward(&self, f: &PortForward) -> Result<PortForward, Error> {
                let what = format!("port {}/{} on {}", f.proto, f.source_port, f.host);
                let op = || format!("updating port forward #{}", f.id);
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let done = sqlx::query(sql::UPDATE_PORT)
                    .bind(f.dest_id)
                    .bind(f.proto.as_str())
                    .bind(i64::from(f.source_port))
                    .bind(i64::from(f.dest_port))
                    .bind(now)
                    .bind(f.id)
                    .bind(f.revision)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| forward_write_error(&what, e))?;
                if done.rows_affected() == 0 {
                    return Err(no_row_error!(
                        tx,
                        sql::PORT_REVISION,
                        "port forward",
                        f.id,
                        f.revision,
                        op()
                    ));
                }
                let row = sqlx::query(&format!("{}WHERE f.id = $1", sql::PORT_SELECT))
                    .bind(f.id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let updated = Self::port_row(&row)?;
                let change = ForwardChange {
                    forward: updated.clone(),
                    targets: vec![updated.host_id],
                };
                append_and_commit!(
                    tx,
                    OutboxKind::PortForwardUpdated,
                    Some(updated.host_id),
                    &change,
                    now,
                    op()
                );
                Ok(updated)
            }

            async fn delete_port_forward(&self, id: i64) -> Result<PortForward, Error> {
                let op = || format!("removing port forward #{id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let row = sqlx::query(&format!("{}WHERE f.id = $1", sql::PORT_SELECT))
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db(op()))?
                    .ok_or_else(|| not_found("port forward", id))?;
                let gone = Self::port_row(&row)?;
                sqlx::query(sql::DELETE_PORT)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let change = ForwardChange {
                    forward: gone.clone(),
                    targets: vec![gone.host_id],
                };
                append_and_commit!(
                    tx,
                    OutboxKind::PortForwardDeleted,
                    Some(gone.host_id),
                    &change,
                    now_ms(),
                    op()
                );
                Ok(gone)
            }

            async fn insert_hostname_forward(
                &self,
                f: &NewHostnameForward,
            ) -> Result<HostnameForward, Error> {
                let what = format!("{}:{} on proxy #{}", f.domain, f.listen_port, f.proxy_id);
                let op = || format!("adding hostname forward {what}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let id: i64 = sqlx::query_scalar(sql::INSERT_HOST)
                    .bind(&f.domain)
                    .bind(f.dest_id)
                    .bind(f.host_id)
                    .bind(f.proxy_id)
                    .bind(i64::from(f.listen_port))
                    .bind(i64::from(f.dest_port))
                    .bind(&f.path)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| forward_write_error(&what, e))?;
                let row = sqlx::query(&format!("{}WHERE f.id = $1", sql::HOST_SELECT))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let created = Self::hostname_row(&row)?;
                let change = ForwardChange {
                    forward: created.clone(),
                    targets: vec![created.proxy_id],
                };
                append_and_commit!(
                    tx,
                    OutboxKind::HostnameForwardCreated,
                    Some(created.proxy_id),
                    &change,
                    now,
                    op()
                );
                Ok(created)
            }

            async fn hostname_forward(&self, id: i64) -> Result<Option<HostnameForward>, Error> {
                sqlx::query(&format!("{}WHERE f.id = $1", sql::HOST_SELECT))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db(format!("reading hostname forward #{id}")))?
                    .as_ref()
                    .map(Self::hostname_row)
                    .transpose()
            }

            async fn hostname_forwards(
                &self,
                proxy_id: Option<i64>,
            ) -> Result<Vec<HostnameForward>, Error> {
                let rows = match proxy_id {
                    Some(p) => {
                        sqlx::query(&format!(
                            "{}WHERE f.proxy_id = $1 ORDER BY f.id",
                            sql::HOST_SELECT
                        ))
                        .bind(p)
                        .fetch_all(&self.pool)
                        .await
                    }
                    None => {
                        sqlx::query(&format!("{}ORDER BY f.id", sql::HOST_SELECT))
                            .fetch_all(&self.pool)
                            .await
                    }
                }
                .map_err(db("listing hostname forwards"))?;
                rows.iter().map(Self::hostname_row).collect()
            }

            async fn update_hostname_forward(
                &self,
                f: &HostnameForward,
                previous_proxy: i64,
            ) -> Result<HostnameForward, Error> {
                let what = format!("{}:{} on {}", f.domain, f.listen_port, f.proxy);
                let op = || format!("updating hostname forward #{}", f.id);
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let done = sqlx::query(sql::UPDATE_HOST)
                    .bind(&f.domain)
                    .bind(f.dest_id)
                    .bind(f.host_id)
                    .bind(f.proxy_id)
                    .bind(i64::from(f.listen_port))
                    .bind(i64::from(f.dest_port))
                    .bind(&f.path)
                    .bind(now)
                    .bind(f.id)
                    .bind(f.revision)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| forward_write_error(&what, e))?;
                if done.rows_affected() == 0 {
                    return Err(no_row_error!(
                        tx,
                        sql::HOST_REVISION,
                        "hostname forward",
                        f.id,
                        f.revision,
                        op()
                    ));
                }
                let row = sqlx::query(&format!("{}WHERE f.id = $1", sql::HOST_SELECT))
                    .bind(f.id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let updated = Self::hostname_row(&row)?;
                let mut targets = vec![updated.proxy_id];
                if previous_proxy != updated.proxy_id {
                    targets.push(previous_proxy);
                }
                let change = ForwardChange {
                    forward: updated.clone(),
                    targets,
                };
                append_and_commit!(
                    tx,
                    OutboxKind::HostnameForwardUpdated,
                    Some(updated.proxy_id),
                    &change,
                    now,
                    op()
                );
                Ok(updated)
            }

            async fn delete_hostname_forward(&self, id: i64) -> Result<HostnameForward, Error> {
                let op = || format!("removing hostname forward #{id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let row = sqlx::query(&format!("{}WHERE f.id = $1", sql::HOST_SELECT))
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db(op()))?
                    .ok_or_else(|| not_found("hostname forward", id))?;
                let gone = Self::hostname_row(&row)?;
                sqlx::query(sql::DELETE_HOST)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let change = ForwardChange {
                    forward: gone.clone(),
                    targets: vec![gone.proxy_id],
                };
                append_and_commit!(
                    tx,
                    OutboxKind::HostnameForwardDeleted,
                    Some(gone.proxy_id),
                    &change,
                    now_ms(),
                    op()
                );
                Ok(gone)
            }

            async fn forward_references(&self, id: i64) -> Result<Vec<String>, Error> {
                let op = || format!("listing the forwards of server #{id}");
                let ports = sqlx::query(&format!(
                    "{}WHERE f.host_id = $1 OR f.dest_id = $1 ORDER BY f.id",
                    sql::PORT_SELECT
                ))
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(db(op()))?;
                let hosts = sqlx::query(&format!(
                    "{}WHERE f.dest_id = $1 OR f.host_id = $1 OR f.proxy_id = $1 ORDER BY f.id",
                    sql::HOST_SELECT
                ))
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(db(op()))?;
                let mut out = Vec::with_capacity(ports.len() + hosts.len());
                for r in &ports {
                    out.push(Self::port_row(r)?.to_string());
                }
                for r in &hosts {
                    out.push(Self::hostname_row(r)?.to_string());
                }
                Ok(out)
            }
        }
    };
}

inventory_impl!(SqliteStore, sqlx::sqlite::SqliteRow, "BEGIN IMMEDIATE");
inventory_impl!(PgStore, sqlx::postgres::PgRow, "BEGIN");
