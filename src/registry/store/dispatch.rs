//! The SQL of the dispatcher's records (`registry::dispatch`), for both
//! backends (one body, `dispatch_impl!`). Status changes are compare-and-set
//! on the status (and, for the end of a run, on its jid), so a late writer
//! never overwrites a newer state.

use std::future::Future;

use sqlx::Row as _;

use super::{db, now_ms, PgStore, SqliteStore};
use crate::registry::dispatch::{
    Debounce, DispatchRun, DispatchStatus, DispatchTarget, Finish, Here, StateKind,
};
use crate::registry::{outbox, Error};

/// The dispatcher's records.
pub trait DispatchStore {
    /// Bumps the desired revision of `targets` to `outbox_id` (creating the
    /// rows), due after the debounce, and moves `consumer`'s outbox cursor to
    /// `outbox_id` — one transaction, so a change is counted exactly once.
    fn dispatch_bump(
        &self,
        consumer: &str,
        outbox_id: i64,
        targets: &[(i64, StateKind)],
        debounce: Debounce,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// The targets a change of server `id` may affect: its own, the hosts of
    /// the port forwards and the proxies of the hostname forwards to it.
    fn dispatch_affected(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Vec<(i64, StateKind)>, Error>> + Send;
    /// At start-up of daemon `holder`: its runs left `running` (and those
    /// without a holder, or whose lease lapsed) are due again, their jid kept
    /// as the orphan to look up, their run rows `interrupted`; another live
    /// daemon's runs are left alone. Returns how many targets.
    fn dispatch_recover(&self, holder: &str) -> impl Future<Output = Result<u64, Error>> + Send;
    /// Runs whose lease lapsed at `now` (their daemon died) are due again,
    /// as at a recovery, after a backoff ([`EXPIRED_LEASE_BACKOFF_MS`] ×
    /// attempts). Returns how many targets.
    fn dispatch_expire(&self, now: i64) -> impl Future<Output = Result<u64, Error>> + Send;
    /// Pending or failed targets due at `now`, oldest first; with `here`,
    /// only those whose minion was last seen on that master, or nowhere, or
    /// on a master whose daemon is dead.
    fn dispatch_due(
        &self,
        now: i64,
        limit: i64,
        here: Option<&Here>,
    ) -> impl Future<Output = Result<Vec<DispatchTarget>, Error>> + Send;
    /// When the next pending or failed target is due.
    fn dispatch_next_due(&self) -> impl Future<Output = Result<Option<i64>, Error>> + Send;
    /// Marks a due target running at `revision` with `jid` (and records the
    /// run) under `holder`'s lease until `lease_until`, in a new epoch (the
    /// target returned carries it); `None` if it is no longer
    /// pending/failed and due (another daemon claimed it).
    fn dispatch_claim(
        &self,
        server_id: i64,
        state: StateKind,
        revision: i64,
        jid: &str,
        holder: &str,
        lease_until: i64,
    ) -> impl Future<Output = Result<Option<DispatchTarget>, Error>> + Send;
    /// A due target whose rendering equals what was applied: `applied` moves
    /// to `revision` without a run.
    fn dispatch_unchanged(
        &self,
        server_id: i64,
        state: StateKind,
        revision: i64,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
    /// A due target whose minion cannot run it: waiting, with why.
    fn dispatch_wait(
        &self,
        server_id: i64,
        state: StateKind,
        reason: &str,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
    /// Records the end of run `jid` claimed in `epoch`, only if it is still
    /// the target's run in that epoch (a holder whose lease lapsed and was
    /// claimed again is refused: `None`).
    fn dispatch_finish(
        &self,
        server_id: i64,
        state: StateKind,
        jid: &str,
        epoch: i64,
        finish: &Finish,
    ) -> impl Future<Output = Result<Option<DispatchTarget>, Error>> + Send;
    /// Hands run `jid` claimed in `epoch` back: its daemon lost its master
    /// mid-run (the minion may have moved to another master). The target is
    /// due again at once with `jid` as the orphan to look up (the return,
    /// or the minion's own record of the job, may show up elsewhere), the
    /// run row `interrupted`. `false` if fenced off (not its run any more).
    fn dispatch_release(
        &self,
        server_id: i64,
        state: StateKind,
        jid: &str,
        epoch: i64,
    ) -> impl Future<Output = Result<bool, Error>> + Send;
    /// Every target (optionally of one status), by server and state.
    fn dispatch_targets(
        &self,
        status: Option<DispatchStatus>,
    ) -> impl Future<Output = Result<Vec<DispatchTarget>, Error>> + Send;
    /// How many targets have each status (a status no target has is
    /// absent): counts without reading every row.
    fn dispatch_status_counts(
        &self,
    ) -> impl Future<Output = Result<Vec<(DispatchStatus, i64)>, Error>> + Send;
    /// One server's targets.
    fn dispatch_targets_of(
        &self,
        server_id: i64,
    ) -> impl Future<Output = Result<Vec<DispatchTarget>, Error>> + Send;
    /// Up to `limit` targets (optionally of one status, of one server) of
    /// servers with an id above `after`, by server id and state: a page of
    /// the HTTP list.
    fn dispatch_targets_page(
        &self,
        status: Option<DispatchStatus>,
        server_id: Option<i64>,
        after: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<DispatchTarget>, Error>> + Send;
    /// The last `limit` runs of a server, newest first.
    fn dispatch_runs(
        &self,
        server_id: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<DispatchRun>, Error>> + Send;
    /// A server's targets (one state or all) due now and forced, attempts
    /// reset; not those running. Returns how many.
    fn dispatch_retry(
        &self,
        server_id: i64,
        state: Option<StateKind>,
    ) -> impl Future<Output = Result<u64, Error>> + Send;
    /// Drift repair: done targets last applied before `cutoff` are due, forced.
    fn dispatch_drift(&self, cutoff: i64) -> impl Future<Output = Result<u64, Error>> + Send;
}

/// A run whose lease lapsed is due again after this × its attempts (at
/// most 6×): a target whose runs keep outliving their daemons (or a
/// minion that takes the daemons down) is not retried in a tight loop.
pub const EXPIRED_LEASE_BACKOFF_MS: i64 = 2_000;

mod sql {
    pub const TARGET_SELECT: &str = "SELECT t.server_id, s.name AS server, s.minion_id, \
         s.status AS server_status, t.state, t.desired, t.applied, t.applied_hash, t.status, \
         t.forced, t.attempts, t.next_attempt_at, t.pending_since, t.running_revision, \
         t.started_at, t.last_jid, t.last_summary, t.last_error, t.last_applied_at, \
         t.updated_at, t.lease_holder, t.lease_epoch, t.orphan_jid, \
         (SELECT mp.master FROM minion_presence mp WHERE mp.minion_id = s.minion_id) \
         AS location \
         FROM dispatch_targets t JOIN servers s ON s.id = t.server_id ";

    /// `$1` server, `$2` state, `$3` outbox id, `$4` now, `$5` debounce,
    /// `$6` max delay. A running target stays running (its end sees
    /// desired > rendered and makes it pending); a waiting one's reason goes.
    pub const BUMP: &str = "INSERT INTO dispatch_targets (server_id, state, desired, status, \
         next_attempt_at, pending_since, updated_at) \
         SELECT CAST($1 AS BIGINT), CAST($2 AS TEXT), CAST($3 AS BIGINT), 'pending', \
         CAST($4 AS BIGINT) + CAST($5 AS BIGINT), CAST($4 AS BIGINT), CAST($4 AS BIGINT) \
         WHERE EXISTS (SELECT 1 FROM servers WHERE id = $1) \
         ON CONFLICT (server_id, state) DO UPDATE SET \
         desired = CASE WHEN excluded.desired > dispatch_targets.desired \
             THEN excluded.desired ELSE dispatch_targets.desired END, \
         status = CASE WHEN dispatch_targets.status = 'running' THEN 'running' ELSE 'pending' END, \
         last_error = CASE WHEN dispatch_targets.status = 'waiting' THEN NULL \
             ELSE dispatch_targets.last_error END, \
         pending_since = COALESCE(dispatch_targets.pending_since, excluded.pending_since), \
         next_attempt_at = CASE \
             WHEN COALESCE(dispatch_targets.pending_since, excluded.pending_since) + $6 \
                  < excluded.next_attempt_at \
             THEN COALESCE(dispatch_targets.pending_since, excluded.pending_since) + $6 \
             ELSE excluded.next_attempt_at END, \
         updated_at = excluded.updated_at";

    pub const AFFECTED: &str =
        "SELECT server_id, state FROM dispatch_targets WHERE server_id = $1 \
         UNION SELECT host_id, 'portfwd' FROM port_forwards WHERE dest_id = $1 OR host_id = $1 \
         UNION SELECT proxy_id, 'hostfwd' FROM hostname_forwards \
             WHERE dest_id = $1 OR host_id = $1 OR proxy_id = $1 \
         UNION SELECT dest_id, 'backup' FROM backups WHERE source_id = $1 OR dest_id = $1 \
         UNION SELECT source_id, 'backup_source' FROM backups WHERE source_id = $1 OR dest_id = $1";

    /// `$1` now, `$2` the recovering daemon (NULL: none). Every unfinished
    /// run but those under another daemon's live lease.
    pub const RECOVER_RUNS: &str = "UPDATE dispatch_runs SET outcome = 'interrupted', \
         finished_at = $1 WHERE finished_at IS NULL AND NOT EXISTS (SELECT 1 \
         FROM dispatch_targets t WHERE t.server_id = dispatch_runs.server_id \
         AND t.state = dispatch_runs.state AND t.status = 'running' \
         AND t.last_jid = dispatch_runs.jid AND t.lease_holder <> COALESCE($2, '') \
         AND t.lease_until > $1)";
    /// `$1` now, `$2` the recovering daemon (NULL: none), `$3` the backoff
    /// step (ms): its own runs, those without a holder (from before leases)
    /// and lapsed ones are due again, their jid kept, after `$3` × their
    /// attempts (at most 6).
    pub const RECOVER: &str = "UPDATE dispatch_targets SET status = 'pending', \
         next_attempt_at = $1 + $3 * (CASE WHEN attempts > 6 THEN 6 ELSE attempts END), \
         updated_at = $1, orphan_jid = last_jid, \
         running_revision = NULL, lease_holder = NULL, lease_until = NULL \
         WHERE status = 'running' AND (lease_holder IS NULL OR lease_holder = $2 \
         OR lease_until <= $1)";

    /// `$1` now, `$2` server, `$3` state, `$4` jid, `$5` epoch.
    pub const RELEASE: &str = "UPDATE dispatch_targets SET status = 'pending', \
         next_attempt_at = $1, updated_at = $1, orphan_jid = last_jid, \
         running_revision = NULL, lease_holder = NULL, lease_until = NULL \
         WHERE server_id = $2 AND state = $3 AND last_jid = $4 AND status = 'running' \
         AND lease_epoch = $5";

    pub const NEXT_DUE: &str = "SELECT MIN(next_attempt_at) FROM dispatch_targets \
         WHERE status IN ('pending', 'failed')";

    /// `$1` revision, `$2` jid, `$3` now, `$4` server, `$5` state, `$6`
    /// holder, `$7` lease until.
    pub const CLAIM: &str = "UPDATE dispatch_targets SET status = 'running', \
         attempts = attempts + 1, running_revision = $1, last_jid = $2, started_at = $3, \
         pending_since = NULL, updated_at = $3, lease_holder = $6, lease_until = $7, \
         lease_epoch = lease_epoch + 1, orphan_jid = NULL \
         WHERE server_id = $4 AND state = $5 AND status IN ('pending', 'failed') \
         AND next_attempt_at <= $3";
    pub const INSERT_RUN: &str = "INSERT INTO dispatch_runs (server_id, state, revision, jid, \
         started_at) VALUES ($1, $2, $3, $4, $5)";

    /// `$1` revision, `$2` now, `$3` server, `$4` state.
    pub const UNCHANGED: &str = "UPDATE dispatch_targets SET \
         applied = CASE WHEN $1 > applied THEN $1 ELSE applied END, \
         status = CASE WHEN desired > $1 THEN 'pending' ELSE 'done' END, \
         attempts = 0, last_error = NULL, pending_since = NULL, updated_at = $2 \
         WHERE server_id = $3 AND state = $4 AND status IN ('pending', 'failed') AND NOT forced";

    /// `$1` reason, `$2` now, `$3` server, `$4` state.
    pub const WAIT: &str = "UPDATE dispatch_targets SET status = 'waiting', last_error = $1, \
         pending_since = NULL, updated_at = $2 \
         WHERE server_id = $3 AND state = $4 AND status IN ('pending', 'failed')";

    /// `$1` hash, `$2` summary, `$3` now, `$4` server, `$5` state, `$6` jid,
    /// `$7` epoch.
    pub const APPLIED: &str = "UPDATE dispatch_targets SET \
         applied = CASE WHEN running_revision > applied THEN running_revision ELSE applied END, \
         applied_hash = $1, last_summary = $2, last_error = NULL, last_applied_at = $3, \
         attempts = 0, forced = FALSE, \
         status = CASE WHEN desired > running_revision THEN 'pending' ELSE 'done' END, \
         running_revision = NULL, updated_at = $3, lease_holder = NULL, lease_until = NULL \
         WHERE server_id = $4 AND state = $5 AND last_jid = $6 AND status = 'running' \
         AND lease_epoch = $7";
    /// `$1` error, `$2` summary, `$3` retry at, `$4` now, `$5` server, `$6` state, `$7` jid,
    /// `$8` epoch.
    /// A failed run may have changed part of the configuration: the next one
    /// runs whatever it renders (`applied_hash` cleared).
    pub const FAILED: &str = "UPDATE dispatch_targets SET status = 'failed', \
         applied_hash = NULL, last_error = $1, last_summary = $2, next_attempt_at = $3, running_revision = NULL, \
         updated_at = $4, lease_holder = NULL, lease_until = NULL \
         WHERE server_id = $5 AND state = $6 AND last_jid = $7 AND status = 'running' \
         AND lease_epoch = $8";
    /// `$1` now, `$2` outcome, `$3` summary, `$4` error, `$5` jid, `$6` server, `$7` state.
    pub const FINISH_RUN: &str = "UPDATE dispatch_runs SET finished_at = $1, outcome = $2, \
         summary = $3, error = $4 WHERE jid = $5 AND server_id = $6 AND state = $7 \
         AND finished_at IS NULL";

    pub const RUNS: &str = "SELECT id, server_id, state, revision, jid, started_at, finished_at, \
         outcome, summary, error FROM dispatch_runs WHERE server_id = $1 \
         ORDER BY id DESC LIMIT $2";

    /// `$1` now, `$2` server.
    pub const RETRY: &str = "UPDATE dispatch_targets SET status = 'pending', forced = TRUE, \
         attempts = 0, next_attempt_at = $1, updated_at = $1 \
         WHERE server_id = $2 AND status <> 'running'";
    pub const RETRY_STATE: &str = "UPDATE dispatch_targets SET status = 'pending', \
         forced = TRUE, attempts = 0, next_attempt_at = $1, updated_at = $1 \
         WHERE server_id = $2 AND state = $3 AND status <> 'running'";

    /// `$1` now, `$2` cutoff.
    pub const DRIFT: &str = "UPDATE dispatch_targets SET status = 'pending', forced = TRUE, \
         next_attempt_at = $1, updated_at = $1 \
         WHERE status = 'done' AND COALESCE(last_applied_at, 0) < $2";
}

macro_rules! dispatch_impl {
    ($store:ty, $row:ty, $begin:literal, $now:literal) => {
        impl $store {
            /// Makes runs due again, their run rows `interrupted`: those of
            /// `holder` (at its start), those without a holder, and those
            /// whose lease lapsed at `now`.
            async fn recover_runs(
                &self,
                now: i64,
                holder: Option<&str>,
                backoff_ms: i64,
            ) -> Result<u64, Error> {
                let op = "recovering interrupted dispatch runs";
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op))?;
                sqlx::query(sql::RECOVER_RUNS)
                    .bind(now)
                    .bind(holder)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op))?;
                let done = sqlx::query(sql::RECOVER)
                    .bind(now)
                    .bind(holder)
                    .bind(backoff_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op))?;
                tx.commit().await.map_err(db(op))?;
                Ok(done.rows_affected())
            }

            fn target_row(r: &$row) -> Result<DispatchTarget, Error> {
                let get = db("reading a dispatch target row");
                let cols = (|| -> Result<_, sqlx::Error> {
                    Ok((
                        (
                            r.try_get::<i64, _>("server_id")?,
                            r.try_get::<String, _>("server")?,
                            r.try_get::<String, _>("minion_id")?,
                            r.try_get::<String, _>("server_status")?,
                            r.try_get::<String, _>("state")?,
                        ),
                        (
                            r.try_get::<i64, _>("desired")?,
                            r.try_get::<i64, _>("applied")?,
                            r.try_get::<Option<String>, _>("applied_hash")?,
                            r.try_get::<String, _>("status")?,
                            r.try_get::<bool, _>("forced")?,
                            r.try_get::<i64, _>("attempts")?,
                            r.try_get::<i64, _>("next_attempt_at")?,
                        ),
                        (
                            r.try_get::<Option<i64>, _>("pending_since")?,
                            r.try_get::<Option<i64>, _>("running_revision")?,
                            r.try_get::<Option<i64>, _>("started_at")?,
                            r.try_get::<Option<String>, _>("last_jid")?,
                            r.try_get::<Option<String>, _>("last_summary")?,
                            r.try_get::<Option<String>, _>("last_error")?,
                            r.try_get::<Option<i64>, _>("last_applied_at")?,
                            r.try_get::<i64, _>("updated_at")?,
                        ),
                        (
                            r.try_get::<Option<String>, _>("lease_holder")?,
                            r.try_get::<i64, _>("lease_epoch")?,
                            r.try_get::<Option<String>, _>("orphan_jid")?,
                            r.try_get::<Option<String>, _>("location")?,
                        ),
                    ))
                })()
                .map_err(get)?;
                let (a, b, c, d) = cols;
                Ok(DispatchTarget {
                    server_id: a.0,
                    server: a.1,
                    minion_id: a.2,
                    server_status: a.3,
                    state: a.4.parse()?,
                    desired: b.0,
                    applied: b.1,
                    applied_hash: b.2,
                    status: b.3.parse()?,
                    forced: b.4,
                    attempts: b.5,
                    next_attempt_at: b.6,
                    pending_since: c.0,
                    running_revision: c.1,
                    started_at: c.2,
                    last_jid: c.3,
                    last_summary: c.4,
                    last_error: c.5,
                    last_applied_at: c.6,
                    updated_at: c.7,
                    lease_holder: d.0,
                    lease_epoch: d.1,
                    orphan_jid: d.2,
                    location: d.3,
                })
            }

            async fn target_in(
                &self,
                server_id: i64,
                state: StateKind,
            ) -> Result<Option<DispatchTarget>, Error> {
                sqlx::query(&format!(
                    "{}WHERE t.server_id = $1 AND t.state = $2",
                    sql::TARGET_SELECT
                ))
                .bind(server_id)
                .bind(state.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(db(format!(
                    "reading the {state} target of server #{server_id}"
                )))?
                .as_ref()
                .map(Self::target_row)
                .transpose()
            }
        }

        impl DispatchStore for $store {
            async fn dispatch_bump(
                &self,
                consumer: &str,
                outbox_id: i64,
                targets: &[(i64, StateKind)],
                debounce: Debounce,
            ) -> Result<(), Error> {
                let op = || format!("bumping the targets of outbox entry {outbox_id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                for (server, state) in targets {
                    sqlx::query(sql::BUMP)
                        .bind(*server)
                        .bind(state.as_str())
                        .bind(outbox_id)
                        .bind(now)
                        .bind(debounce.debounce_ms)
                        .bind(debounce.max_delay_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(db(op()))?;
                }
                sqlx::query(outbox::ACK)
                    .bind(consumer)
                    .bind(outbox_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                tx.commit().await.map_err(db(op()))
            }

            async fn dispatch_affected(&self, id: i64) -> Result<Vec<(i64, StateKind)>, Error> {
                let rows = sqlx::query(sql::AFFECTED)
                    .bind(id)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db(format!("listing the targets server #{id} affects")))?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    let server: i64 = r.try_get(0).map_err(db("reading an affected target"))?;
                    let state: String = r.try_get(1).map_err(db("reading an affected target"))?;
                    out.push((server, state.parse()?));
                }
                out.sort();
                out.dedup();
                Ok(out)
            }

            async fn dispatch_recover(&self, holder: &str) -> Result<u64, Error> {
                self.recover_runs(now_ms(), Some(holder), 0).await
            }

            async fn dispatch_expire(&self, now: i64) -> Result<u64, Error> {
                self.recover_runs(now, None, EXPIRED_LEASE_BACKOFF_MS).await
            }

            async fn dispatch_due(
                &self,
                now: i64,
                limit: i64,
                here: Option<&Here>,
            ) -> Result<Vec<DispatchTarget>, Error> {
                let rows = match here {
                    None => {
                        sqlx::query(&format!(
                            "{}WHERE t.status IN ('pending', 'failed') AND t.next_attempt_at <= $1 \
                             ORDER BY t.next_attempt_at, t.server_id, t.state LIMIT $2",
                            sql::TARGET_SELECT
                        ))
                        .bind(now)
                        .bind(limit)
                        .fetch_all(&self.pool)
                        .await
                    }
                    Some(here) => {
                        sqlx::query(&format!(
                            "{}{}",
                            sql::TARGET_SELECT,
                            concat!(
                                "LEFT JOIN minion_presence p ON p.minion_id = s.minion_id \
                                 WHERE t.status IN ('pending', 'failed') AND t.next_attempt_at <= $1 \
                                 AND (p.master IS NULL OR p.master = $3 OR NOT EXISTS (SELECT 1 \
                                 FROM daemons d WHERE d.master = p.master AND d.heartbeat_at >= ",
                                $now,
                                " - $4)) ORDER BY t.next_attempt_at, t.server_id, t.state LIMIT $2"
                            )
                        ))
                        .bind(now)
                        .bind(limit)
                        .bind(&here.master_id)
                        .bind(here.dead_after_ms)
                        .fetch_all(&self.pool)
                        .await
                    }
                }
                .map_err(db("listing due dispatch targets"))?;
                rows.iter().map(Self::target_row).collect()
            }

            async fn dispatch_next_due(&self) -> Result<Option<i64>, Error> {
                sqlx::query_scalar::<_, Option<i64>>(sql::NEXT_DUE)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db("reading when the next dispatch is due"))
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
                let op = || format!("claiming the {state} target of server #{server_id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let done = sqlx::query(sql::CLAIM)
                    .bind(revision)
                    .bind(jid)
                    .bind(now)
                    .bind(server_id)
                    .bind(state.as_str())
                    .bind(holder)
                    .bind(lease_until)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                if done.rows_affected() == 0 {
                    return Ok(None);
                }
                sqlx::query(sql::INSERT_RUN)
                    .bind(server_id)
                    .bind(state.as_str())
                    .bind(revision)
                    .bind(jid)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                tx.commit().await.map_err(db(op()))?;
                self.target_in(server_id, state).await
            }

            async fn dispatch_unchanged(
                &self,
                server_id: i64,
                state: StateKind,
                revision: i64,
            ) -> Result<bool, Error> {
                let done = sqlx::query(sql::UNCHANGED)
                    .bind(revision)
                    .bind(now_ms())
                    .bind(server_id)
                    .bind(state.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(db(format!(
                        "recording the {state} target of server #{server_id} unchanged"
                    )))?;
                Ok(done.rows_affected() > 0)
            }

            async fn dispatch_wait(
                &self,
                server_id: i64,
                state: StateKind,
                reason: &str,
            ) -> Result<bool, Error> {
                let done = sqlx::query(sql::WAIT)
                    .bind(reason)
                    .bind(now_ms())
                    .bind(server_id)
                    .bind(state.as_str())
                    .execute(&self.pool)
                    .await
                    .map_err(db(format!(
                        "making the {state} target of server #{server_id} wait"
                    )))?;
                Ok(done.rows_affected() > 0)
            }

            async fn dispatch_finish(
                &self,
                server_id: i64,
                state: StateKind,
                jid: &str,
                epoch: i64,
                finish: &Finish,
            ) -> Result<Option<DispatchTarget>, Error> {
                let op = || format!("recording run {jid} of {state} on server #{server_id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let (done, outcome, summary, error) = match finish {
                    Finish::Applied { hash, summary } => (
                        sqlx::query(sql::APPLIED)
                            .bind(hash)
                            .bind(summary)
                            .bind(now)
                            .bind(server_id)
                            .bind(state.as_str())
                            .bind(jid)
                            .bind(epoch)
                            .execute(&mut *tx)
                            .await
                            .map_err(db(op()))?,
                        "done",
                        summary,
                        None,
                    ),
                    Finish::Failed {
                        error,
                        summary,
                        retry_at,
                    } => (
                        sqlx::query(sql::FAILED)
                            .bind(error)
                            .bind(summary)
                            .bind(*retry_at)
                            .bind(now)
                            .bind(server_id)
                            .bind(state.as_str())
                            .bind(jid)
                            .bind(epoch)
                            .execute(&mut *tx)
                            .await
                            .map_err(db(op()))?,
                        "failed",
                        summary,
                        Some(error),
                    ),
                };
                if done.rows_affected() == 0 {
                    // Fenced off: the run row belongs to whoever holds the
                    // target now (it may run the same jid again).
                    return Ok(None);
                }
                sqlx::query(sql::FINISH_RUN)
                    .bind(now)
                    .bind(outcome)
                    .bind(summary)
                    .bind(error)
                    .bind(jid)
                    .bind(server_id)
                    .bind(state.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                tx.commit().await.map_err(db(op()))?;
                self.target_in(server_id, state).await
            }

            async fn dispatch_release(
                &self,
                server_id: i64,
                state: StateKind,
                jid: &str,
                epoch: i64,
            ) -> Result<bool, Error> {
                let op = || format!("handing back run {jid} of {state} on server #{server_id}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let done = sqlx::query(sql::RELEASE)
                    .bind(now)
                    .bind(server_id)
                    .bind(state.as_str())
                    .bind(jid)
                    .bind(epoch)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                if done.rows_affected() == 0 {
                    return Ok(false);
                }
                sqlx::query(sql::FINISH_RUN)
                    .bind(now)
                    .bind("interrupted")
                    .bind(None::<String>)
                    .bind(Some("its daemon lost its master mid-run"))
                    .bind(jid)
                    .bind(server_id)
                    .bind(state.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                tx.commit().await.map_err(db(op()))?;
                Ok(true)
            }

            async fn dispatch_targets(
                &self,
                status: Option<DispatchStatus>,
            ) -> Result<Vec<DispatchTarget>, Error> {
                let rows = match status {
                    Some(st) => {
                        sqlx::query(&format!(
                            "{}WHERE t.status = $1 ORDER BY s.name, t.state",
                            sql::TARGET_SELECT
                        ))
                        .bind(st.as_str())
                        .fetch_all(&self.pool)
                        .await
                    }
                    None => {
                        sqlx::query(&format!("{}ORDER BY s.name, t.state", sql::TARGET_SELECT))
                            .fetch_all(&self.pool)
                            .await
                    }
                }
                .map_err(db("listing dispatch targets"))?;
                rows.iter().map(Self::target_row).collect()
            }

            async fn dispatch_status_counts(&self) -> Result<Vec<(DispatchStatus, i64)>, Error> {
                self.status_counts(
                    "SELECT status, COUNT(*) FROM dispatch_targets GROUP BY status ORDER BY status",
                    "counting dispatch targets by status",
                )
                .await
            }

            async fn dispatch_targets_of(
                &self,
                server_id: i64,
            ) -> Result<Vec<DispatchTarget>, Error> {
                let rows = sqlx::query(&format!(
                    "{}WHERE t.server_id = $1 ORDER BY t.state",
                    sql::TARGET_SELECT
                ))
                .bind(server_id)
                .fetch_all(&self.pool)
                .await
                .map_err(db(format!("listing the targets of server #{server_id}")))?;
                rows.iter().map(Self::target_row).collect()
            }

            async fn dispatch_targets_page(
                &self,
                status: Option<DispatchStatus>,
                server_id: Option<i64>,
                after: i64,
                limit: i64,
            ) -> Result<Vec<DispatchTarget>, Error> {
                let rows = sqlx::query(&format!(
                    "{}WHERE t.server_id > $1 \
                     AND (CAST($2 AS TEXT) IS NULL OR t.status = $2) \
                     AND (CAST($3 AS BIGINT) IS NULL OR t.server_id = $3) \
                     ORDER BY t.server_id, t.state LIMIT $4",
                    sql::TARGET_SELECT
                ))
                .bind(after)
                .bind(status.map(|s| s.as_str()))
                .bind(server_id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(db(format!("listing dispatch targets after server #{after}")))?;
                rows.iter().map(Self::target_row).collect()
            }

            async fn dispatch_runs(
                &self,
                server_id: i64,
                limit: i64,
            ) -> Result<Vec<DispatchRun>, Error> {
                let op = || format!("listing the runs of server #{server_id}");
                let rows = sqlx::query(sql::RUNS)
                    .bind(server_id)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db(op()))?;
                rows.iter()
                    .map(|r| {
                        let get = |e| db(op())(e);
                        let state: String = r.try_get("state").map_err(get)?;
                        Ok(DispatchRun {
                            id: r.try_get("id").map_err(get)?,
                            server_id: r.try_get("server_id").map_err(get)?,
                            state: state.parse()?,
                            revision: r.try_get("revision").map_err(get)?,
                            jid: r.try_get("jid").map_err(get)?,
                            started_at: r.try_get("started_at").map_err(get)?,
                            finished_at: r.try_get("finished_at").map_err(get)?,
                            outcome: r.try_get("outcome").map_err(get)?,
                            summary: r.try_get("summary").map_err(get)?,
                            error: r.try_get("error").map_err(get)?,
                        })
                    })
                    .collect()
            }

            async fn dispatch_retry(
                &self,
                server_id: i64,
                state: Option<StateKind>,
            ) -> Result<u64, Error> {
                let now = now_ms();
                let q = match state {
                    Some(st) => sqlx::query(sql::RETRY_STATE)
                        .bind(now)
                        .bind(server_id)
                        .bind(st.as_str()),
                    None => sqlx::query(sql::RETRY).bind(now).bind(server_id),
                };
                let done = q
                    .execute(&self.pool)
                    .await
                    .map_err(db(format!("retrying the targets of server #{server_id}")))?;
                Ok(done.rows_affected())
            }

            async fn dispatch_drift(&self, cutoff: i64) -> Result<u64, Error> {
                let done = sqlx::query(sql::DRIFT)
                    .bind(now_ms())
                    .bind(cutoff)
                    .execute(&self.pool)
                    .await
                    .map_err(db("scheduling drift repair"))?;
                Ok(done.rows_affected())
            }
        }
    };
}

for_both_backends!(dispatch_impl);
