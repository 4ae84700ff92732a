//! The SQL of the exec record (`registry::exec`), for both backends (one
//! body, `exec_impl!`).

use std::future::Future;

use sqlx::Row as _;

use super::{db, now_ms, PgStore, SqliteStore};
use crate::registry::exec::{ExecEnd, ExecRecord, NewExec};
use crate::registry::Error;

/// The exec record.
pub trait ExecStore {
    /// Records a request (running, or refused); the record as stored.
    fn exec_insert(&self, e: &NewExec) -> impl Future<Output = Result<ExecRecord, Error>> + Send;
    /// Records the end of a running request.
    fn exec_finish(&self, id: i64, end: &ExecEnd)
        -> impl Future<Output = Result<(), Error>> + Send;
    /// The last `limit` requests (of one server, or all) with an id below
    /// `before` (any without), newest first.
    fn exec_list(
        &self,
        server_id: Option<i64>,
        before: Option<i64>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<ExecRecord>, Error>> + Send;
    /// At start-up: requests left running by a stopped process are
    /// `interrupted`. How many.
    fn exec_recover(&self) -> impl Future<Output = Result<u64, Error>> + Send;
}

mod sql {
    /// Every column, in the order the row reader takes them.
    pub const COLUMNS: &str = "id, requested_by, server_id, server, minion_id, fun, args, \
         jid, outcome, error_code, error, summary, created_at, finished_at";
    pub const INSERT: &str = "INSERT INTO exec_jobs (requested_by, server_id, server, minion_id, \
         fun, args, jid, outcome, error_code, error, created_at, finished_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
         CASE WHEN $8 = 'running' THEN NULL ELSE CAST($11 AS BIGINT) END) RETURNING ";
    pub const FINISH: &str = "UPDATE exec_jobs SET outcome = $1, error_code = $2, error = $3, \
         summary = $4, finished_at = $5 WHERE id = $6 AND outcome = 'running'";
    pub const RECOVER: &str = "UPDATE exec_jobs SET outcome = 'interrupted', finished_at = $1 \
         WHERE outcome = 'running'";
}

macro_rules! exec_impl {
    ($store:ty, $row:ty) => {
        impl $store {
            fn exec_row(r: &$row) -> Result<ExecRecord, Error> {
                (|| -> Result<ExecRecord, sqlx::Error> {
                    Ok(ExecRecord {
                        id: r.try_get("id")?,
                        requested_by: r.try_get("requested_by")?,
                        server_id: r.try_get("server_id")?,
                        server: r.try_get("server")?,
                        minion_id: r.try_get("minion_id")?,
                        fun: r.try_get("fun")?,
                        args: r.try_get("args")?,
                        jid: r.try_get("jid")?,
                        outcome: r.try_get("outcome")?,
                        error_code: r.try_get("error_code")?,
                        error: r.try_get("error")?,
                        summary: r.try_get("summary")?,
                        created_at: r.try_get("created_at")?,
                        finished_at: r.try_get("finished_at")?,
                    })
                })()
                .map_err(db("reading an exec record"))
            }
        }

        impl ExecStore for $store {
            async fn exec_insert(&self, e: &NewExec) -> Result<ExecRecord, Error> {
                let op = || format!("recording exec of {} on {}", e.fun, e.server);
                let row = sqlx::query(&format!("{}{}", sql::INSERT, sql::COLUMNS))
                    .bind(&e.requested_by)
                    .bind(e.server_id)
                    .bind(&e.server)
                    .bind(&e.minion_id)
                    .bind(&e.fun)
                    .bind(&e.args)
                    .bind(&e.jid)
                    .bind(&e.outcome)
                    .bind(&e.error_code)
                    .bind(&e.error)
                    .bind(now_ms())
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db(op()))?;
                Self::exec_row(&row)
            }

            async fn exec_finish(&self, id: i64, end: &ExecEnd) -> Result<(), Error> {
                sqlx::query(sql::FINISH)
                    .bind(&end.outcome)
                    .bind(&end.error_code)
                    .bind(&end.error)
                    .bind(&end.summary)
                    .bind(now_ms())
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(db(format!("recording the end of exec #{id}")))?;
                Ok(())
            }

            async fn exec_list(
                &self,
                server_id: Option<i64>,
                before: Option<i64>,
                limit: i64,
            ) -> Result<Vec<ExecRecord>, Error> {
                let before = before.unwrap_or(i64::MAX);
                let rows = match server_id {
                    Some(s) => {
                        sqlx::query(&format!(
                            "SELECT {} FROM exec_jobs WHERE server_id = $1 AND id < $2 \
                             ORDER BY id DESC LIMIT $3",
                            sql::COLUMNS
                        ))
                        .bind(s)
                        .bind(before)
                        .bind(limit)
                        .fetch_all(&self.pool)
                        .await
                    }
                    None => {
                        sqlx::query(&format!(
                            "SELECT {} FROM exec_jobs WHERE id < $1 ORDER BY id DESC LIMIT $2",
                            sql::COLUMNS
                        ))
                        .bind(before)
                        .bind(limit)
                        .fetch_all(&self.pool)
                        .await
                    }
                }
                .map_err(db("listing exec records"))?;
                rows.iter().map(Self::exec_row).collect()
            }

            async fn exec_recover(&self) -> Result<u64, Error> {
                let r = sqlx::query(sql::RECOVER)
                    .bind(now_ms())
                    .execute(&self.pool)
                    .await
                    .map_err(db("marking interrupted exec records"))?;
                Ok(r.rows_affected())
            }
        }
    };
}

exec_impl!(SqliteStore, sqlx::sqlite::SqliteRow);
exec_impl!(PgStore, sqlx::postgres::PgRow);
