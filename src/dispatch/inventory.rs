//! The inventory dispatcher: when the inventory changes, the infrastructure
//! follows, through Salt states.
//!
//! Level-triggered, as a controller is, not event by event:
//! - **intake**: every outbox entry past the `dispatch` cursor names the
//!   targets it affects (a port forward: its host's `portfwd`; a hostname
//!   forward: its proxy's `hostfwd`, old and new when it moved; a server:
//!   every target it appears in). Their desired revision becomes the entry's
//!   id and they are due after the debounce — in the same transaction as the
//!   cursor moves (`dispatch_bump`), so a change is counted exactly once;
//! - **worker**: a due target is rendered whole from the registry at that
//!   moment (so a burst of changes is one run, and a run converges whatever
//!   happened before), skipped if the rendering is what was applied, else
//!   claimed under a jid chosen and recorded first, published as
//!   `state.apply <sls> pillar={"steward": {<state>: …}} queue=True` to its
//!   minion, followed until the master's job cache confirms the return, and
//!   recorded (`dispatch_finish`, fenced by the jid): done, or failed and
//!   retried with a capped exponential backoff. Then
//!   `steward/v1/dispatch/done|failed` is fired;
//! - a target whose server has no accepted minion waits; the acceptor's
//!   status change is a server change that makes it due again;
//! - everything is in the registry: a daemon stopped mid-run leaves the
//!   target `running`, and the next start makes it due again
//!   (`dispatch_recover`; the states are idempotent);
//! - drift repair: with `dispatch.drift_interval`, a target applied longer
//!   ago than that is applied again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value as Json};
use sha2::{Digest as _, Sha256};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::bus::origin::STEWARD_PREFIX;
use crate::bus::{BusStats, Firer};
use crate::registry::backup::Retain;
use crate::registry::changes::{Changes, WATCHED_POLL};
use crate::registry::cluster::{Chore, SeenBy};
use crate::registry::dispatch::{Debounce, Finish, Here};
use crate::registry::store::{now_ms, ClusterStore as _, DispatchStore as _, InventoryStore as _};
use crate::registry::{
    DbStore, DispatchTarget, Error, OutboxEntry, OutboxKind, OutboxRow, ServerRef, Service,
    StateKind, Status, Store as _,
};
use crate::salt::jobs::new_jid;
use crate::salt::{
    JobOutcome, Publish, Published, RequestError, SaltClient, StateSummary, TargetType,
};

/// The outbox consumer of the dispatcher (its cursor is created by migration 0006).
pub const DISPATCH_CONSUMER: &str = "dispatch";

/// How often the dispatcher (sharing its registry) looks for runs whose
/// lease lapsed.
const EXPIRE_EVERY: Duration = Duration::from_secs(5);

/// How often the dispatcher looks whether its master is back.
const MASTER_DOWN_POLL: Duration = Duration::from_secs(1);

/// The shortest pause between two looks at the due targets.
const MIN_WAIT: Duration = Duration::from_millis(20);

/// How often the outbox is looked at when writes of other processes (the
/// CLI) are not seen (PostgreSQL).
const POLL: Duration = Duration::from_millis(500);

/// Outbox rows read per pass.
const INTAKE_BATCH: i64 = 200;

/// Due targets read per pass.
const DUE_BATCH: i64 = 256;

/// How long to wait before trying the registry again after an error.
const DB_RETRY: Duration = Duration::from_secs(1);

/// How often a run without a return asks its minion whether it runs the job.
const FIND_JOB_EVERY: Duration = Duration::from_secs(10);

/// How long a `saltutil.find_job` answer is waited for.
const FIND_JOB_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a return may still come after the minion said it does not run
/// the job (it may have finished between the two).
const FIND_JOB_GRACE: Duration = Duration::from_secs(5);

/// How long a run's master may be gone (its bus disconnected) before a
/// daemon sharing the registry hands the run back for another master's
/// daemon to find it by its jid (the minion fails over meanwhile).
const MASTER_GONE: Duration = Duration::from_secs(5);

/// Attempts at recording a run's end before leaving it to the next start-up.
const FINISH_TRIES: u32 = 5;

/// Runs finished by the dispatcher, by outcome; read by the metrics
/// endpoint (the queue itself is the registry's `dispatch_targets`).
#[derive(Debug, Default)]
pub struct DispatchStats {
    /// Runs that applied their state.
    pub done: AtomicU64,
    /// Runs that failed (retried with backoff).
    pub failed: AtomicU64,
}

/// What the dispatcher needs from the settings (`dispatch:` in the config).
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Debounce of bumps.
    pub debounce: Debounce,
    /// Runs in flight at once.
    pub concurrency: usize,
    /// How long a run's return is waited for.
    pub job_timeout: Duration,
    /// First retry delay, ms.
    pub retry_base_ms: i64,
    /// Longest retry delay, ms.
    pub retry_max_ms: i64,
    /// Drift repair interval; `None`: off.
    pub drift_interval: Option<Duration>,
    /// Where runs are started, so shutdown waits for them.
    pub helpers: TaskTracker,
    /// Where finished runs are counted.
    pub stats: Arc<DispatchStats>,
    /// The master's pki_dir: `share` pillars are encrypted for the minion
    /// keys accepted in its `minions/`.
    pub master_pki_dir: std::path::PathBuf,
    /// The backup levels of a backup without its own (`backups.retain`).
    pub backup_retain: Vec<Retain>,
    /// This daemon's id among the registry's daemons (`cluster.daemon_id`):
    /// the holder of the drift-repair chore's lease when it runs it.
    pub daemon_id: String,
    /// Sharing the registry with other daemons (`cluster.daemon_id` set,
    /// or PostgreSQL): where this one claims, its chores' leases. `None`:
    /// alone, every target is its own and its chores need no lease.
    pub shared: Option<Shared>,
    /// The bus reader's state: while this daemon's master is down (its bus
    /// disconnected) the dispatcher claims nothing, so another daemon can
    /// take its minions once they move. `None`: always up (tests).
    pub bus: Option<Arc<BusStats>>,
}

/// A dispatcher among several daemons of one registry.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Where it claims targets: its master, and when another master's
    /// daemon is dead.
    pub here: Here,
    /// How long a chore's lease lasts unless renewed (`cluster.lease_secs`).
    pub chore_lease: Duration,
}

impl DispatcherConfig {
    /// The delay before retry number `attempts` (1 for the first failure):
    /// `retry_base_ms · 2^(attempts−1)`, at most `retry_max_ms`.
    pub fn backoff_ms(&self, attempts: i64) -> i64 {
        let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 40)).unwrap_or(40);
        self.retry_base_ms
            .saturating_mul(1_i64.checked_shl(doublings).unwrap_or(i64::MAX))
            .min(self.retry_max_ms)
    }

    /// How long a run's lease lasts: its job's timeout, the `find_job`
    /// probes' grace, and a margin to record its end. Another daemon takes
    /// the target over only after that.
    pub fn run_lease(&self) -> Duration {
        self.job_timeout + FIND_JOB_EVERY + FIND_JOB_GRACE + RUN_LEASE_MARGIN
    }
}

/// What a run's lease adds to its job's timeout and probes (recording its
/// end, a slow registry).
const RUN_LEASE_MARGIN: Duration = Duration::from_secs(30);

/// Runs the dispatcher until `cancel`: recovers what a stopped daemon left
/// running, then takes in changes and applies due targets.
pub async fn run(
    cfg: DispatcherConfig,
    service: Arc<Service<DbStore>>,
    salt: SaltClient,
    firer: Firer,
    mut registry_changes: Changes,
    cancel: CancellationToken,
) {
    if !startup(service.store(), &cfg.daemon_id, &cancel).await {
        return;
    }
    let runner = Arc::new(Runner {
        service: service.clone(),
        salt,
        firer,
        cfg: cfg.clone(),
        cancel: cancel.clone(),
    });
    let inflight: Arc<Mutex<HashSet<(i64, StateKind)>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let wake = Arc::new(Notify::new());
    let drift_every = cfg
        .drift_interval
        .map(|d| (d / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)));
    let mut drift_at = tokio::time::Instant::now();
    // With several daemons on the registry, one of them repairs drift.
    let mut drift_chore = match &cfg.shared {
        Some(s) => Chore::new("chore/drift", &cfg.daemon_id, s.chore_lease),
        None => Chore::solo("chore/drift", &cfg.daemon_id),
    };
    let store = service.store();
    let mut expired_at = tokio::time::Instant::now();
    loop {
        if cancel.is_cancelled() {
            drift_chore.release(store).await;
            return;
        }
        if let Err(error) = intake(store, cfg.debounce).await {
            warn!(message = "Reading the outbox for the dispatcher failed; will retry.", consumer = DISPATCH_CONSUMER, %error);
        }
        if let (Some(interval), Some(every)) = (cfg.drift_interval, drift_every) {
            if drift_at.elapsed() >= every && drift_chore.held(store).await {
                drift_at = tokio::time::Instant::now();
                let cutoff = now_ms().saturating_sub(millis(interval));
                match store.dispatch_drift(cutoff).await {
                    Ok(0) => {}
                    Ok(targets) => info!(message = "Drift repair: targets due again.", targets),
                    Err(error) => {
                        warn!(message = "Drift repair not scheduled; will retry.", %error)
                    }
                }
            }
        }
        // Runs whose daemon died (its lease lapsed) are due again, here or
        // on another daemon (alone on the registry, the start-up recovery
        // is enough).
        if cfg.shared.is_some() && expired_at.elapsed() >= EXPIRE_EVERY {
            expired_at = tokio::time::Instant::now();
            match store.dispatch_expire(now_ms()).await {
                Ok(0) => {}
                Ok(targets) => {
                    warn!(
                        message = "Runs whose daemon stopped answering are due again.",
                        targets
                    )
                }
                Err(error) => {
                    warn!(message = "Lapsed dispatch leases not read; will retry.", %error)
                }
            }
        }
        if let Err(error) = launch_due(&runner, &inflight, &permits, &wake).await {
            warn!(message = "Reading the due dispatch targets failed; will retry.", %error);
        }
        // Until the next due target, a drift check, a finished run or a
        // change of the registry (by any process when its writes are seen;
        // otherwise polled every POLL).
        let mut wait = match store.dispatch_next_due().await {
            Ok(Some(at)) => Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)),
            Ok(None) => WATCHED_POLL,
            Err(_) => DB_RETRY,
        };
        if permits.available_permits() == 0 {
            // A finished run wakes it (`wake`), not the due time.
            wait = WATCHED_POLL;
        }
        if cfg.bus.as_ref().is_some_and(|b| !b.is_connected()) {
            // The master is down: look again now and then, not at due times
            // that have passed.
            wait = MASTER_DOWN_POLL;
        }
        if let Some(every) = drift_every {
            wait = wait.min(every.saturating_sub(drift_at.elapsed()));
        }
        // A due target whose run is starting is not due again at once.
        let wait = wait.max(MIN_WAIT);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = wake.notified() => {}
            _ = registry_changes.next(POLL) => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Subscribes the consumer (idempotent) and makes what a stopped daemon
/// left running due again; retried until it works or `cancel`.
async fn startup(store: &DbStore, daemon_id: &str, cancel: &CancellationToken) -> bool {
    loop {
        let done = async {
            store.outbox_subscribe(DISPATCH_CONSUMER).await?;
            store.dispatch_recover(daemon_id).await
        };
        match done.await {
            Ok(0) => return true,
            Ok(targets) => {
                info!(
                    message = "Runs interrupted by the last stop are due again.",
                    targets
                );
                return true;
            }
            Err(error) => warn!(message = "Starting the dispatcher failed; will retry.", %error),
        }
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(DB_RETRY) => {}
        }
    }
}

/// Bumps the targets of every outbox entry past the cursor, in order; an
/// entry it cannot read is quarantined (and passed).
async fn intake(store: &DbStore, debounce: Debounce) -> Result<(), Error> {
    loop {
        let rows = store
            .outbox_pending(DISPATCH_CONSUMER, INTAKE_BATCH)
            .await?;
        let n = rows.len();
        for row in rows {
            let (id, targets) = match row {
                OutboxRow::Entry(entry) => (entry.id, targets_of(store, &entry).await?),
                OutboxRow::Unreadable { id, reason } => (id, Err(reason)),
            };
            match targets {
                Ok(targets) => {
                    store
                        .dispatch_bump(DISPATCH_CONSUMER, id, &targets, debounce)
                        .await?;
                    if !targets.is_empty() {
                        debug!(message = "Targets bumped.", outbox_id = id, targets = ?targets);
                    }
                }
                Err(reason) => {
                    error!(message = "Outbox row cannot be read; quarantined.", consumer = DISPATCH_CONSUMER, outbox_id = id, %reason);
                    store
                        .outbox_quarantine(DISPATCH_CONSUMER, id, &reason)
                        .await?;
                }
            }
        }
        if i64::try_from(n).unwrap_or(i64::MAX) < INTAKE_BATCH {
            return Ok(());
        }
    }
}

/// The targets an outbox entry affects; `Err(reason)` for an entry whose
/// payload does not say (quarantined by the caller).
async fn targets_of(
    store: &DbStore,
    entry: &OutboxEntry,
) -> Result<Result<Vec<(i64, StateKind)>, String>, Error> {
    let forward_targets = |state: StateKind| -> Result<Vec<(i64, StateKind)>, String> {
        let list = entry
            .payload
            .get("targets")
            .and_then(Json::as_array)
            .ok_or_else(|| format!("{} entry without a targets list", entry.kind.as_str()))?;
        let mut out = Vec::with_capacity(list.len());
        for t in list {
            let id = t.as_i64().ok_or_else(|| {
                format!(
                    "{} entry: target {t} is not a server id",
                    entry.kind.as_str()
                )
            })?;
            out.push((id, state));
        }
        out.sort();
        out.dedup();
        Ok(out)
    };
    Ok(match entry.kind {
        OutboxKind::PortForwardCreated
        | OutboxKind::PortForwardUpdated
        | OutboxKind::PortForwardDeleted => forward_targets(StateKind::Portfwd),
        OutboxKind::HostnameForwardCreated
        | OutboxKind::HostnameForwardUpdated
        | OutboxKind::HostnameForwardDeleted => forward_targets(StateKind::Hostfwd),
        OutboxKind::ShareCreated | OutboxKind::ShareUpdated | OutboxKind::ShareDeleted => {
            forward_targets(StateKind::Share)
        }
        OutboxKind::ServerCreated | OutboxKind::ServerUpdated | OutboxKind::ServerDeleted => {
            let id = entry
                .server_id
                .or_else(|| entry.payload.get("id").and_then(Json::as_i64));
            match id {
                Some(id) => Ok(store.dispatch_affected(id).await?),
                None => Err(format!("{} entry without a server id", entry.kind.as_str())),
            }
        }
        OutboxKind::ModelCreated | OutboxKind::ModelUpdated | OutboxKind::ModelDeleted => {
            Ok(Vec::new())
        }
        OutboxKind::BackupCreated | OutboxKind::BackupDeleted | OutboxKind::BackupKeys => {
            super::backup::entry_targets(entry)
        }
    })
}

/// Removes its target from the in-flight set when a run ends (or panics).
struct InFlight {
    set: Arc<Mutex<HashSet<(i64, StateKind)>>>,
    key: (i64, StateKind),
    wake: Arc<Notify>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.key);
        }
        self.wake.notify_one();
    }
}

/// Starts a run for each due target not already in flight here, while a
/// permit of the global concurrency limit is free.
async fn launch_due(
    runner: &Arc<Runner>,
    inflight: &Arc<Mutex<HashSet<(i64, StateKind)>>>,
    permits: &Arc<Semaphore>,
    wake: &Arc<Notify>,
) -> Result<(), Error> {
    if permits.available_permits() == 0 {
        return Ok(());
    }
    if runner.cfg.bus.as_ref().is_some_and(|b| !b.is_connected()) {
        // The master is down: a claim would hold the target through a
        // publish that cannot succeed.
        return Ok(());
    }
    let due = runner
        .service
        .store()
        .dispatch_due(
            now_ms(),
            DUE_BATCH,
            runner.cfg.shared.as_ref().map(|s| &s.here),
        )
        .await?;
    for target in due {
        let key = (target.server_id, target.state);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            break;
        };
        {
            let Ok(mut set) = inflight.lock() else {
                return Ok(());
            };
            if !set.insert(key) {
                continue;
            }
        }
        let guard = InFlight {
            set: inflight.clone(),
            key,
            wake: wake.clone(),
        };
        let runner = runner.clone();
        runner.cfg.helpers.clone().spawn(async move {
            let _permit = permit;
            let _guard = guard;
            runner.run(target).await;
        });
    }
    Ok(())
}

/// Applies one target (see the module docs).
struct Runner {
    service: Arc<Service<DbStore>>,
    salt: SaltClient,
    firer: Firer,
    cfg: DispatcherConfig,
    cancel: CancellationToken,
}

/// How a published run ended.
enum Applied {
    /// The returns (confirmed by the job cache) or the timeout.
    Outcome(Published, JobOutcome),
    /// The minion answered that it does not run the job, and no return came.
    Lost,
    /// This daemon's master went away mid-run (sharing the registry only):
    /// the run is handed back, to be found by its jid through the master
    /// the minion moves to.
    Interrupted,
}

/// A rendered configuration: the pillar (with the revision) and the hash of
/// what it configures (without the revision).
pub(super) struct Rendered {
    /// The state's pillar.
    pub(super) pillar: Json,
    /// What decides whether a run is needed (`applied_hash`).
    pub(super) hash: String,
}

impl Runner {
    async fn run(&self, t: DispatchTarget) {
        if let Err(error) = self.try_run(&t).await {
            warn!(message = "Dispatch of a target failed in the registry; will retry.", server = %t.server, state = %t.state, %error);
        }
    }

    async fn try_run(&self, t: &DispatchTarget) -> Result<(), Error> {
        let store = self.service.store();
        if !minion_ready(&t.server_status) {
            let reason = format!(
                "waiting for the minion {} of {} to register and connect (server status {})",
                t.minion_id, t.server, t.server_status
            );
            if store.dispatch_wait(t.server_id, t.state, &reason).await? {
                info!(message = "Target waits for its minion.", server = %t.server, state = %t.state, minion_id = %t.minion_id, server_status = %t.server_status);
            }
            return Ok(());
        }
        let revision = t.desired;
        let rendered = match render(&self.service, t, revision, &self.cfg).await? {
            Prepared::Render(r) => r,
            Prepared::Wait(reason) => {
                if store.dispatch_wait(t.server_id, t.state, &reason).await? {
                    info!(message = "Target waits.", server = %t.server, state = %t.state, %reason);
                }
                return Ok(());
            }
        };
        if let Ok(r) = &rendered {
            if !t.forced && t.applied_hash.as_deref() == Some(r.hash.as_str()) {
                if store
                    .dispatch_unchanged(t.server_id, t.state, revision)
                    .await?
                {
                    debug!(message = "Target unchanged; no run.", server = %t.server, state = %t.state, revision);
                }
                return Ok(());
            }
        }
        // A run whose daemon stopped or died keeps its jid: looked up first,
        // published again under it if the minion never returned.
        let jid = t.orphan_jid.clone().unwrap_or_else(new_jid);
        let lease_until = now_ms().saturating_add(millis(self.cfg.run_lease()));
        let Some(claimed) = store
            .dispatch_claim(
                t.server_id,
                t.state,
                revision,
                &jid,
                &self.cfg.daemon_id,
                lease_until,
            )
            .await?
        else {
            return Ok(());
        };
        let epoch = claimed.lease_epoch;
        info!(message = "Applying target.", server = %t.server, state = %t.state, sls = t.state.sls(), minion_id = %t.minion_id, revision, %jid, attempt = claimed.attempts);
        let finish = match rendered {
            Err(why) => self.failed(why, Json::Null, claimed.attempts),
            Ok(r) => {
                let publish = Publish {
                    target: t.minion_id.clone(),
                    tgt_type: TargetType::List,
                    fun: "state.apply".into(),
                    arg: vec![Json::from(t.state.sls())],
                    kwarg: kwargs(t.state, r.pillar),
                    correlation: Some(format!("dispatch/{}/{}/{revision}", t.server_id, t.state)),
                };
                let outcome = tokio::select! {
                    _ = self.cancel.cancelled() => {
                        info!(message = "Stopping with a run in flight; it is due again at the next start.", server = %t.server, state = %t.state, %jid);
                        return Ok(());
                    }
                    o = self.apply_or_find(&publish, &jid, t.orphan_jid.is_some()) => o,
                    () = self.until_master_gone() => Ok(Applied::Interrupted),
                };
                let returned = matches!(&outcome, Ok(Applied::Outcome(_, out)) if out.returns.contains_key(&t.minion_id));
                let outcome = if !returned && self.master_down() {
                    Ok(Applied::Interrupted)
                } else {
                    outcome
                };
                if let Ok(Applied::Interrupted) = outcome {
                    if store
                        .dispatch_release(t.server_id, t.state, &jid, epoch)
                        .await?
                    {
                        warn!(message = "The master went away mid-run; the run is handed back, to be looked up by its jid through the master the minion moves to.", server = %t.server, state = %t.state, minion_id = %t.minion_id, %jid);
                    }
                    return Ok(());
                }
                if let Ok(Applied::Outcome(_, out)) = &outcome {
                    if let Some(ret) = out.returns.get(&t.minion_id) {
                        // Its return reached this master: it is here (a
                        // sighting the job cache confirmed).
                        if let Some(shared) = &self.cfg.shared {
                            if let Err(error) = store
                                .presence_seen(
                                    &t.minion_id,
                                    &shared.here.master_id,
                                    &self.cfg.daemon_id,
                                    SeenBy::Return,
                                )
                                .await
                            {
                                warn!(message = "Where a minion is was not recorded.", minion_id = %t.minion_id, %error);
                            }
                        }
                        // What the backup states report (keys, results).
                        super::backup::learn(&self.service, t, &ret.ret).await;
                    }
                }
                self.judge(&t.minion_id, outcome, r.hash, claimed.attempts)
            }
        };
        let Some(after) = self.record(t, &jid, epoch, &finish).await? else {
            warn!(message = "Run result not recorded: the target moved on to another run (or another daemon took it over).", server = %t.server, state = %t.state, %jid, epoch);
            return Ok(());
        };
        self.announce(&after, revision, &jid, claimed.attempts, &finish)
            .await;
        Ok(())
    }

    /// With `orphan` (a run of a daemon that stopped or died), finds job
    /// `jid` first ([`Self::find_orphan`]): its return found is the outcome
    /// (nothing published); else, or without `orphan`, [`Self::apply`].
    async fn apply_or_find(
        &self,
        publish: &Publish,
        jid: &str,
        orphan: bool,
    ) -> Result<Applied, RequestError> {
        if orphan {
            if let Some(found) = self.find_orphan(publish, jid).await {
                return Ok(found);
            }
            info!(message = "The interrupted run never returned here and the minion kept no return of it; publishing it again under its jid.", minion_id = %publish.target, %jid);
        }
        self.apply(publish, jid).await
    }

    /// The interrupted run `jid`'s return: in this master's job cache, or
    /// kept by the minion itself (`cache_jobs`, set by bundles with several
    /// masters: a minion that failed over drops the return meant for the
    /// master it left; `saltutil.find_cached_job`). While the minion still
    /// runs the job (`saltutil.find_job`), waits, up to `job_timeout`, and
    /// looks once more after it stopped. `None`: nobody has it, publish
    /// again.
    async fn find_orphan(&self, publish: &Publish, jid: &str) -> Option<Applied> {
        let minion = &publish.target;
        let deadline = crate::clock::deadline_in(self.cfg.job_timeout);
        let mut last_look = false;
        loop {
            let here = match self.salt.job_cache_returns(jid, FIND_JOB_TIMEOUT).await {
                Ok(returns) if returns.contains_key(minion) => Some(returns),
                Ok(_) => None,
                Err(error) => {
                    warn!(message = "Looking the interrupted run up in the job cache failed.", minion_id = %minion, %jid, %error);
                    None
                }
            };
            let returns = match here {
                Some(returns) => {
                    info!(message = "The interrupted run's return is in the job cache; not published again.", minion_id = %minion, %jid);
                    Some(returns)
                }
                None => match self
                    .salt
                    .minion_cached_return(minion, jid, FIND_JOB_TIMEOUT)
                    .await
                {
                    Ok(Some(ret)) => {
                        info!(message = "The interrupted run's return was kept by the minion; recorded, not published again.", minion_id = %minion, %jid);
                        Some([(minion.clone(), ret)].into())
                    }
                    Ok(None) => None,
                    Err(error) => {
                        warn!(message = "Asking the minion for the interrupted run's return failed.", minion_id = %minion, %jid, %error);
                        None
                    }
                },
            };
            if let Some(returns) = returns {
                let published = Published {
                    jid: jid.to_owned(),
                    minions: vec![minion.clone()],
                    missing: Vec::new(),
                };
                let outcome = JobOutcome {
                    jid: jid.to_owned(),
                    returns,
                    no_answer: Vec::new(),
                    unconfirmed: Vec::new(),
                };
                return Some(Applied::Outcome(published, outcome));
            }
            if last_look {
                return None;
            }
            if tokio::time::Instant::now() >= deadline
                || self.runs_job(minion, jid).await != Some(true)
            {
                // Its return may have been on its way: one more look.
                last_look = true;
                tokio::time::sleep(FIND_JOB_GRACE).await;
                continue;
            }
            info!(message = "The minion still runs the interrupted run; waiting for it.", minion_id = %minion, %jid);
            tokio::time::sleep(FIND_JOB_EVERY).await;
        }
    }

    /// Whether this daemon's master is down now (its bus disconnected)
    /// while the registry is shared: a run that ended without the minion's
    /// return then is handed back, not failed (the minion may be moving to
    /// another master, where the run is looked up by its jid).
    fn master_down(&self) -> bool {
        self.cfg.shared.is_some() && self.cfg.bus.as_ref().is_some_and(|b| !b.is_connected())
    }

    /// Returns once this daemon's master is gone (its bus disconnected for
    /// [`MASTER_GONE`]) while the registry is shared: a run in flight, even
    /// one still publishing, is then handed back (see
    /// [`Applied::Interrupted`]). Alone, never: a run waits for its master
    /// to come back instead.
    async fn until_master_gone(&self) {
        let (Some(_), Some(bus)) = (&self.cfg.shared, &self.cfg.bus) else {
            return std::future::pending().await;
        };
        let mut check = tokio::time::interval(MASTER_DOWN_POLL);
        loop {
            check.tick().await;
            if bus.disconnected_for().is_some_and(|d| d >= MASTER_GONE) {
                return;
            }
        }
    }

    /// Publishes under `jid` and collects the confirmed return. Every
    /// [`FIND_JOB_EVERY`] without a return, the minion is asked whether it
    /// runs the job (`saltutil.find_job`, as Salt's CLI does): a minion that
    /// answers that it does not, and whose return does not come within
    /// [`FIND_JOB_GRACE`] after, missed the publish — the run fails now
    /// (and is retried) instead of at `job_timeout`.
    async fn apply(&self, publish: &Publish, jid: &str) -> Result<Applied, RequestError> {
        let (published, watch) = self.salt.publish_as(publish, jid).await?;
        let expected = published.minions.clone();
        let collect = watch.collect(&expected, self.cfg.job_timeout);
        tokio::pin!(collect);
        let mut lost_at: Option<tokio::time::Instant> = None;
        loop {
            let probe_at = match lost_at {
                Some(at) => at,
                None => tokio::time::Instant::now() + FIND_JOB_EVERY,
            };
            tokio::select! {
                outcome = &mut collect => return Ok(Applied::Outcome(published, outcome)),
                () = tokio::time::sleep_until(probe_at) => {
                    if lost_at.is_some() {
                        return Ok(Applied::Lost);
                    }
                    if self.runs_job(&publish.target, jid).await == Some(false) {
                        lost_at = Some(tokio::time::Instant::now() + FIND_JOB_GRACE);
                    }
                }
            }
        }
    }

    /// `Some(true)` if `minion` says it runs job `jid`, `Some(false)` if it
    /// says it does not, `None` if it did not answer.
    async fn runs_job(&self, minion: &str, jid: &str) -> Option<bool> {
        let probe = Publish {
            target: minion.to_owned(),
            tgt_type: TargetType::List,
            fun: "saltutil.find_job".into(),
            arg: vec![Json::from(jid)],
            correlation: Some(format!("find_job/{jid}")),
            ..Publish::default()
        };
        let (_, outcome) = self.salt.run_job(&probe, FIND_JOB_TIMEOUT).await.ok()?;
        let ret = outcome.returns.get(minion)?;
        Some(ret.ret.as_object().is_some_and(|m| !m.is_empty()))
    }

    /// What a job's outcome means for the target.
    fn judge(
        &self,
        minion: &str,
        outcome: Result<Applied, RequestError>,
        hash: String,
        attempts: i64,
    ) -> Finish {
        let (published, out) = match outcome {
            Ok(Applied::Outcome(p, o)) => (p, o),
            Ok(Applied::Lost) => {
                return self.failed(
                    format!(
                    "{minion} is not running the job and returned nothing (it missed the publish?)"
                ),
                    Json::Null,
                    attempts,
                )
            }
            // Handed back before judging (`try_run`); a failure otherwise.
            Ok(Applied::Interrupted) => {
                return self.failed(
                    format!("the master went away while {minion} ran the job"),
                    Json::Null,
                    attempts,
                )
            }
            Err(e) => {
                return self.failed(
                    format!("publishing state.apply to {minion}: {e}"),
                    Json::Null,
                    attempts,
                )
            }
        };
        if !published.minions.iter().any(|m| m == minion) {
            return self.failed(
                format!(
                    "the master targeted no minion {minion} (is its key accepted on this master?)"
                ),
                Json::Null,
                attempts,
            );
        }
        let Some(ret) = out.returns.get(minion) else {
            let why = if out.unconfirmed.iter().any(|m| m == minion) {
                format!("the return of {minion} was not confirmed by the master's job cache")
            } else {
                format!(
                    "no answer from {minion} within {} s",
                    self.cfg.job_timeout.as_secs()
                )
            };
            return self.failed(why, Json::Null, attempts);
        };
        let summary = StateSummary::of(&ret.ret);
        let summary_json = json!({
            "succeeded": summary.succeeded,
            "failed": summary.failed,
            "changed": summary.changed,
            "failures": summary.failures,
            "changes": state_changes(&ret.ret),
        });
        if ret.success && summary.failed == 0 && summary.succeeded > 0 {
            return Finish::Applied {
                hash,
                summary: summary_json.to_string(),
            };
        }
        let why = match summary.failures.first() {
            Some((id, comment)) if id.is_empty() => comment.clone(),
            Some((id, comment)) => format!("{id}: {comment}"),
            None => format!(
                "state.apply on {minion} failed (retcode {}): {}",
                ret.retcode.map_or_else(|| "none".into(), |c| c.to_string()),
                ret.ret
            ),
        };
        self.failed(why, summary_json, attempts)
    }

    /// A failed run, retried after the backoff of `attempts`.
    fn failed(&self, error: String, summary: Json, attempts: i64) -> Finish {
        Finish::Failed {
            error,
            summary: summary.to_string(),
            retry_at: now_ms().saturating_add(self.cfg.backoff_ms(attempts)),
        }
    }

    /// Records the end of run `jid`, retrying a failing registry a few times
    /// (if it still fails, the next start-up makes the target due again).
    async fn record(
        &self,
        t: &DispatchTarget,
        jid: &str,
        epoch: i64,
        finish: &Finish,
    ) -> Result<Option<DispatchTarget>, Error> {
        let store = self.service.store();
        let mut tries = 0;
        loop {
            match store
                .dispatch_finish(t.server_id, t.state, jid, epoch, finish)
                .await
            {
                Ok(r) => return Ok(r),
                Err(error) if tries + 1 < FINISH_TRIES => {
                    tries += 1;
                    warn!(message = "Recording a run's end failed; will retry.", server = %t.server, state = %t.state, %jid, %error);
                    tokio::time::sleep(DB_RETRY * tries).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Logs the end of a run and fires `steward/v1/dispatch/done|failed`.
    async fn announce(
        &self,
        t: &DispatchTarget,
        revision: i64,
        jid: &str,
        attempt: i64,
        finish: &Finish,
    ) {
        let mut data = Map::new();
        data.insert("server_id".into(), json!(t.server_id));
        data.insert("server".into(), json!(t.server));
        data.insert("minion_id".into(), json!(t.minion_id));
        data.insert("state".into(), json!(t.state));
        data.insert("revision".into(), json!(revision));
        data.insert("jid".into(), json!(jid));
        data.insert("attempts".into(), json!(attempt));
        let counter = match finish {
            Finish::Applied { .. } => &self.cfg.stats.done,
            Finish::Failed { .. } => &self.cfg.stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let verb = match finish {
            Finish::Applied { summary, .. } => {
                data.insert("summary".into(), parse_summary(summary));
                info!(message = "Target applied.", server = %t.server, state = %t.state, revision, %jid, status = %t.status);
                "done"
            }
            Finish::Failed {
                error,
                summary,
                retry_at,
            } => {
                data.insert("summary".into(), parse_summary(summary));
                data.insert("error".into(), json!(error));
                data.insert("retry_at".into(), json!(retry_at));
                warn!(message = "Target failed; will retry.", server = %t.server, state = %t.state, revision, %jid, attempts = attempt, %error, retry_in_ms = retry_at - now_ms());
                "failed"
            }
        };
        self.firer
            .fire_or_warn(
                &format!("{STEWARD_PREFIX}dispatch/{verb}"),
                &Json::Object(data),
            )
            .await;
    }
}

/// Whether a server's minion can be given a run: online (its key accepted
/// and a start confirmed by a `test.ping`) or offline (it was; the run fails
/// and is retried until it is back, and its return makes it due at once).
/// A key accepted whose minion has not connected yet would miss the
/// publish: it waits for the start like a server without a minion.
fn minion_ready(status: &str) -> bool {
    status
        .parse::<Status>()
        .is_ok_and(|s| matches!(s, Status::Online | Status::Offline))
}

/// `pillar={"steward": {<state>: …}}` and `queue=True` (a state run already
/// going on that minion — the other state, a highstate — is waited for
/// instead of failing the run).
fn kwargs(state: StateKind, pillar: Json) -> Map<String, Json> {
    let mut steward = Map::new();
    steward.insert(state.as_str().into(), pillar);
    let mut kw = Map::new();
    kw.insert("pillar".into(), json!({ "steward": steward }));
    kw.insert("queue".into(), Json::Bool(true));
    kw
}

/// The `changes` of each state of a state return, by state id (what the
/// steward states report: tables, files, reloads).
fn state_changes(ret: &Json) -> Json {
    let mut out = Map::new();
    if let Json::Object(states) = ret {
        for (key, v) in states {
            match v.get("changes") {
                Some(Json::Object(c)) if !c.is_empty() => {
                    let id = v
                        .get("__id__")
                        .and_then(Json::as_str)
                        .unwrap_or(key)
                        .to_owned();
                    out.insert(id, Json::Object(c.clone()));
                }
                _ => {}
            }
        }
    }
    Json::Object(out)
}

fn parse_summary(s: &str) -> Json {
    serde_json::from_str(s).unwrap_or(Json::Null)
}

/// What the dispatcher can do with a target now.
pub(super) enum Prepared {
    /// Run it with this pillar, or fail the run with why: the registry
    /// holds something the state cannot be given.
    Render(Result<Rendered, String>),
    /// It cannot be given a pillar yet: it waits (a server change makes it
    /// due again), with why.
    Wait(String),
}

/// The whole desired configuration of target `t` from the registry now, as
/// its state's pillar (`salt-states/README.md`). `cfg.master_pki_dir`:
/// share pillars are encrypted for the minion keys the master accepted;
/// `cfg.backup_retain`: the levels of a backup without its own.
async fn render(
    service: &Service<DbStore>,
    t: &DispatchTarget,
    revision: i64,
    cfg: &DispatcherConfig,
) -> Result<Prepared, Error> {
    let store = service.store();
    let fail = |why: String| Ok(Prepared::Render(Err(why)));
    let mut body = match t.state {
        StateKind::Portfwd => {
            let host = service.get_server(&ServerRef::Id(t.server_id)).await?;
            let mut forwards = Vec::new();
            for f in store.port_forwards(Some(t.server_id)).await? {
                let Some(ip) = f.dest_ip else {
                    return fail(format!("{f}: the guest {} has no internal IP", f.dest));
                };
                forwards.push(json!({
                    "id": f.id,
                    "proto": f.proto,
                    "port": f.source_port,
                    "to_ip": ip.to_string(),
                    "to_port": f.dest_port,
                }));
            }
            json!({
                "target": host.name,
                "external_interface": host.external_interface,
                "external_ip": host.external_ip.map(|ip| ip.to_string()),
                "internal_network": host.internal_network,
                "forwards": forwards,
            })
        }
        StateKind::Hostfwd => {
            let mut sites = Vec::new();
            for f in store.hostname_forwards(Some(t.server_id)).await? {
                let Some(ip) = f.dest_ip else {
                    return fail(format!("{f}: the guest {} has no internal IP", f.dest));
                };
                sites.push(json!({
                    "id": f.id,
                    "domain": f.domain,
                    "listen_port": f.listen_port,
                    "path": f.path,
                    "upstream_ip": ip.to_string(),
                    "upstream_port": f.dest_port,
                }));
            }
            json!({ "target": t.server, "sites": sites })
        }
        StateKind::Share => {
            return super::share::prepare(service, t, revision, &cfg.master_pki_dir).await
        }
        StateKind::Backup | StateKind::BackupSource => {
            match super::backup::render(service, t, &cfg.backup_retain).await? {
                Ok(body) => body,
                Err(why) => return fail(why),
            }
        }
    };
    let hash = crate::hex::encode(&Sha256::digest(body.to_string().as_bytes()));
    if let Json::Object(m) = &mut body {
        m.insert("revision".into(), json!(revision));
    }
    Ok(Prepared::Render(Ok(Rendered { pillar: body, hash })))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(base: i64, max: i64) -> DispatcherConfig {
        DispatcherConfig {
            debounce: Debounce {
                debounce_ms: 0,
                max_delay_ms: 0,
            },
            concurrency: 1,
            job_timeout: Duration::from_secs(1),
            retry_base_ms: base,
            retry_max_ms: max,
            drift_interval: None,
            helpers: TaskTracker::new(),
            stats: Arc::default(),
            master_pki_dir: std::path::PathBuf::new(),
            backup_retain: Vec::new(),
            daemon_id: "test".into(),
            shared: None,
            bus: None,
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let c = cfg(500, 5000);
        let delays: Vec<i64> = (1..=6).map(|a| c.backoff_ms(a)).collect();
        assert_eq!(delays, vec![500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(c.backoff_ms(0), 500);
        assert_eq!(c.backoff_ms(i64::MAX), 5000);
        assert_eq!(cfg(i64::MAX, i64::MAX).backoff_ms(3), i64::MAX);
    }

    #[test]
    fn only_connected_minions_run() {
        for s in ["online", "offline"] {
            assert!(minion_ready(s), "{s}");
        }
        for s in [
            "created",
            "keys-issued",
            "pending",
            "registered",
            "nonsense",
        ] {
            assert!(!minion_ready(s), "{s}");
        }
    }

    #[test]
    fn changes_are_collected_by_state_id() {
        let ret = json!({
            "cmd_|-portfwd_|-x_|-run": {"__id__": "portfwd", "result": true,
                "changes": {"table": "loaded"}},
            "cmd_|-other_|-y_|-run": {"__id__": "other", "result": true, "changes": {}},
        });
        assert_eq!(state_changes(&ret), json!({"portfwd": {"table": "loaded"}}));
        assert_eq!(state_changes(&json!(["render error"])), json!({}));
    }
}
