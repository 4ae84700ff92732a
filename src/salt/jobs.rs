//! Following jobs to their results on the event bus.
//!
//! Returns never come in the publish reply; they arrive as
//! `salt/job/<jid>/ret/<minion>` events (runner results as
//! `salt/run/<jid>/ret`). One [`JobTracker`] reads the bus once and hands each
//! caller the returns for its jid. Callers register their jid *before*
//! publishing (we choose jids ourselves), so a fast minion's return is never
//! missed. Runner jids are chosen by the master and only known from the reply,
//! so recent runner returns are kept briefly for a caller that registers late.
//!
//! Return events can be missed: the bus reader reconnects after a master
//! restart, or a consumer lags behind a flood. The tracker counts such gaps;
//! a watch made through [`crate::salt::SaltClient`] then asks the master's job
//! cache (`jobs.list_job`, by the jid we chose) for the returns it has not
//! seen, so a job never waits for its timeout because an event was lost.
//!
//! Return events can also be forged: a minion can make the master fire an
//! unwrapped `salt/job/<jid>/ret/<another minion>` (see [`crate::bus::origin`]).
//! So on a watch made through the client, a return event is only a hint:
//! what counts is the master's job cache, where a return is stored under the
//! id the returning minion authenticated as (Salt's request server binds the
//! id to the minion's session key, `minimum_auth_version: 3`, the default),
//! and the first return stored for a (jid, minion) stays. Once every expected
//! minion has shown a return on the bus the cache is asked (one lookup for the
//! whole job), again with backoff for those it does not hold yet, and once
//! more at the deadline; a return the cache never confirms is reported as
//! `unconfirmed`, never as an answer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::bus::event::{Event, EventKind};
use crate::bus::{BusItem, Subscription};

/// After a bus gap, when the job cache is asked a second time.
const RECHECK_AFTER: Duration = Duration::from_secs(2);

/// The first wait between a return event and asking the job cache for it
/// (the master fires the event just before it writes the cache); doubled up
/// to [`CONFIRM_MAX_WAIT`] while the cache does not hold it.
const CONFIRM_FIRST_WAIT: Duration = Duration::from_millis(200);

/// The longest wait between two lookups of returns not confirmed yet.
const CONFIRM_MAX_WAIT: Duration = Duration::from_secs(2);

/// How long the last lookup, made at the deadline, may take.
const CONFIRM_AT_DEADLINE: Duration = Duration::from_secs(10);

/// How many runner returns are kept for callers that register after them.
const RECENT_RUNS: usize = 1024;

/// Makes Salt-style jids (`YYYYMMDDhhmmssffffff`, UTC), unique and increasing
/// within this process even when many are made in the same microsecond.
pub fn new_jid() -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default();
    let mut prev = LAST.load(Ordering::Relaxed);
    let micros = loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => break next,
            Err(p) => prev = p,
        }
    };
    let stamp =
        crate::bus::publisher::salt_stamp(SystemTime::UNIX_EPOCH + Duration::from_micros(micros));
    stamp.chars().filter(char::is_ascii_digit).collect()
}

/// One minion's return of a job.
#[derive(Debug, Clone, Serialize)]
pub struct MinionReturn {
    pub success: bool,
    /// The `steward_correlation` the job was published with, as the minion
    /// sent it back in the return's `metadata`.
    pub correlation: Option<String>,
    pub retcode: Option<i64>,
    #[serde(rename = "return")]
    pub ret: Json,
}

type Waiters = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Arc<Event>>>>>;

/// Reads job and runner returns off the bus and routes them by jid.
#[derive(Clone)]
pub struct JobTracker {
    waiters: Waiters,
    recent_runs: Arc<Mutex<VecDeque<Arc<Event>>>>,
    connected: watch::Receiver<bool>,
    /// Bumped at each reconnect or lag: events may have been missed.
    gaps: watch::Receiver<u64>,
    /// Bumped at each reconnect: the master may have restarted.
    reconnects: watch::Receiver<u64>,
}

impl JobTracker {
    /// Starts routing from `sub` until `cancel` fires, on a task of its own.
    pub fn start(sub: Subscription, cancel: CancellationToken) -> Self {
        let (tracker, task) = Self::new(sub, cancel);
        tokio::spawn(task);
        tracker
    }

    /// A tracker and the task that routes for it (until `cancel` fires), for
    /// a caller that runs the task itself (the daemon's supervisor).
    pub fn new(
        mut sub: Subscription,
        cancel: CancellationToken,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let waiters: Waiters = Arc::default();
        let recent_runs: Arc<Mutex<VecDeque<Arc<Event>>>> = Arc::default();
        let (connected_tx, connected) = watch::channel(false);
        let (gaps_tx, gaps) = watch::channel(0u64);
        let (reconnects_tx, reconnects) = watch::channel(0u64);
        let (w, r) = (waiters.clone(), recent_runs.clone());
        let task = async move {
            loop {
                let item = tokio::select! {
                    _ = cancel.cancelled() => break,
                    item = sub.recv() => item,
                };
                match item {
                    None => break,
                    Some(BusItem::Connected { reconnect }) => {
                        let _ = connected_tx.send(true);
                        if reconnect {
                            gaps_tx.send_modify(|g| *g += 1);
                            reconnects_tx.send_modify(|r| *r += 1);
                        }
                    }
                    Some(BusItem::Disconnected { .. }) => {
                        let _ = connected_tx.send(false);
                    }
                    Some(BusItem::Lagged(_)) => gaps_tx.send_modify(|g| *g += 1),
                    Some(BusItem::Event(event)) => route(&w, &r, event),
                }
            }
        };
        let tracker = Self {
            waiters,
            recent_runs,
            connected,
            gaps,
            reconnects,
        };
        (tracker, task)
    }

    /// How many bus reconnects the tracker has seen so far.
    pub fn reconnects(&self) -> u64 {
        *self.reconnects.borrow()
    }

    /// How many gaps (reconnects, lags) the tracker has seen so far.
    pub fn gaps(&self) -> u64 {
        *self.gaps.borrow()
    }

    /// Waits until the bus is connected, so that what is published next is
    /// seen. Fails after `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Registers interest in `jid`; returns come through the [`JobWatch`].
    pub fn watch(&self, jid: &str) -> JobWatch {
        let (tx, rx) = mpsc::unbounded_channel();
        // A runner return that came before we registered.
        {
            let recent = self
                .recent_runs
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for e in recent.iter().filter(|e| run_jid(&e.tag) == Some(jid)) {
                let _ = tx.send(e.clone());
            }
        }
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(jid.to_owned(), tx);
        let mut gaps = self.gaps.clone();
        gaps.mark_unchanged();
        JobWatch {
            jid: jid.to_owned(),
            rx,
            waiters: self.waiters.clone(),
            gaps,
            lookup: None,
        }
    }
}

/// The `metadata` key a job is published with and its returns carry back:
/// which of our requests a job answers.
pub const CORRELATION_KEY: &str = "steward_correlation";

/// The `steward_correlation` a return event carries back in its `metadata`.
fn correlation_of(event: &Event) -> Option<String> {
    event
        .field("metadata")
        .and_then(|m| crate::bus::event::map_get(m, CORRELATION_KEY))
        .and_then(crate::bus::event::as_str)
        .map(str::to_owned)
}

fn run_jid(tag: &str) -> Option<&str> {
    tag.strip_prefix("salt/run/")?.strip_suffix("/ret")
}

fn route(waiters: &Waiters, recent: &Mutex<VecDeque<Arc<Event>>>, event: Arc<Event>) {
    let jid = match event.kind() {
        EventKind::JobReturn(r) => r.jid.to_owned(),
        _ => match run_jid(&event.tag) {
            Some(jid) => {
                let mut recent = recent.lock().unwrap_or_else(PoisonError::into_inner);
                if recent.len() >= RECENT_RUNS {
                    recent.pop_front();
                }
                recent.push_back(event.clone());
                jid.to_owned()
            }
            None => return,
        },
    };
    let waiters = waiters.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(tx) = waiters.get(&jid) {
        let _ = tx.send(event);
    }
}

/// One caller's view of one job; unregisters itself when dropped.
pub struct JobWatch {
    jid: String,
    rx: mpsc::UnboundedReceiver<Arc<Event>>,
    waiters: Waiters,
    gaps: watch::Receiver<u64>,
    /// Asks the job cache after a gap (set by `SaltClient::publish`).
    lookup: Option<super::SaltClient>,
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        self.waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.jid);
    }
}

/// Jobs followed to their end through the client (the job cache
/// confirming the returns), by outcome; read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct JobStats {
    /// Every expected minion answered and succeeded.
    pub ok: AtomicU64,
    /// Every expected minion answered, at least one failed.
    pub failed: AtomicU64,
    /// At least one expected minion did not answer in time.
    pub no_answer: AtomicU64,
}

impl JobStats {
    /// Counts one followed job by its outcome.
    pub fn count(&self, outcome: &JobOutcome) {
        let counter = if !outcome.no_answer.is_empty() {
            &self.no_answer
        } else if outcome.all_ok() {
            &self.ok
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What came back for a published job.
#[derive(Debug, Clone, Serialize)]
pub struct JobOutcome {
    pub jid: String,
    /// The returns, as the master's job cache holds them (for a watch made
    /// through the client), by minion.
    pub returns: BTreeMap<String, MinionReturn>,
    /// Expected minions that did not answer before the timeout.
    pub no_answer: Vec<String>,
    /// Minions whose return event came but which the job cache never
    /// confirmed (a forged event, or a cache that keeps nothing): not answers.
    pub unconfirmed: Vec<String>,
}

impl JobOutcome {
    /// True when every expected minion answered and succeeded.
    pub fn all_ok(&self) -> bool {
        self.no_answer.is_empty() && self.returns.values().all(|r| r.success)
    }
}

impl JobWatch {
    /// The jid watched.
    pub fn jid(&self) -> &str {
        &self.jid
    }

    /// Collects returns until every minion in `expected` answered or
    /// `timeout` passed; unexpected minions' returns are kept too. With a
    /// job cache to ask (a watch made by [`crate::salt::SaltClient`]), only
    /// returns the cache holds count; return events are hints (see the
    /// module docs).
    pub async fn collect(mut self, expected: &[String], timeout: Duration) -> JobOutcome {
        let deadline = crate::clock::deadline_in(timeout);
        let Some(client) = self.lookup.clone() else {
            return self.collect_from_bus(expected, deadline).await;
        };
        // Return events not confirmed yet: minion → correlation it carried.
        let mut hinted: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut confirmed: BTreeMap<String, MinionReturn> = BTreeMap::new();
        let mut check_at: Option<tokio::time::Instant> = None;
        let mut wait = CONFIRM_FIRST_WAIT;
        // The master fires a return's event before it writes the return to
        // its job cache: a lookup right after a gap can come too early, so a
        // second one follows once, a little later.
        let mut recheck: Option<tokio::time::Instant> = None;
        while !expected.iter().all(|m| confirmed.contains_key(m)) {
            let gaps = &mut self.gaps;
            let gap = async {
                if gaps.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let check = async {
                match check_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let later = async {
                match recheck {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            enum Step {
                Event(Option<Arc<Event>>),
                Gap,
                Recheck,
                Check,
            }
            let step = tokio::select! {
                e = tokio::time::timeout_at(deadline, self.rx.recv()) => Step::Event(e.ok().flatten()),
                () = gap => Step::Gap,
                () = later => Step::Recheck,
                () = check => Step::Check,
            };
            match step {
                Step::Event(None) => break,
                Step::Event(Some(event)) => {
                    let EventKind::JobReturn(r) = event.kind() else {
                        continue;
                    };
                    if confirmed.contains_key(r.id) {
                        continue;
                    }
                    hinted.insert(r.id.to_owned(), correlation_of(&event));
                    let all_shown = expected
                        .iter()
                        .all(|m| confirmed.contains_key(m) || hinted.contains_key(m));
                    if all_shown {
                        wait = CONFIRM_FIRST_WAIT;
                        let soon = crate::clock::deadline_in(wait);
                        check_at = Some(check_at.map_or(soon, |at| at.min(soon)));
                    }
                }
                Step::Gap => {
                    self.lookup_cache(&client, &mut hinted, &mut confirmed, deadline, true)
                        .await;
                    recheck = Some(crate::clock::deadline_in(RECHECK_AFTER));
                }
                Step::Recheck => {
                    recheck = None;
                    self.lookup_cache(&client, &mut hinted, &mut confirmed, deadline, true)
                        .await;
                }
                Step::Check => {
                    check_at = None;
                    self.lookup_cache(&client, &mut hinted, &mut confirmed, deadline, false)
                        .await;
                    if !hinted.is_empty() {
                        wait = (wait * 2).min(CONFIRM_MAX_WAIT);
                        check_at = Some(crate::clock::deadline_in(wait));
                    }
                }
            }
        }
        if !hinted.is_empty() {
            // Shown on the bus, not confirmed yet: one last look.
            let last = crate::clock::deadline_in(CONFIRM_AT_DEADLINE);
            self.lookup_cache(&client, &mut hinted, &mut confirmed, last, false)
                .await;
        }
        if !hinted.is_empty() {
            tracing::warn!(
                message = "Job return events the master's job cache does not hold: not counted (forged, or the master keeps no job cache).",
                jid = %self.jid,
                minions = ?hinted.keys().collect::<Vec<_>>()
            );
        }
        let no_answer = expected
            .iter()
            .filter(|m| !confirmed.contains_key(*m))
            .cloned()
            .collect();
        let outcome = JobOutcome {
            jid: self.jid.clone(),
            returns: confirmed,
            no_answer,
            unconfirmed: hinted.into_keys().collect(),
        };
        client.job_stats().count(&outcome);
        outcome
    }

    /// Without a job cache to ask: every return event counts (the tracker's
    /// own tests, tools reading a bus they trust).
    async fn collect_from_bus(
        mut self,
        expected: &[String],
        deadline: tokio::time::Instant,
    ) -> JobOutcome {
        let mut returns = BTreeMap::new();
        while !expected.iter().all(|m| returns.contains_key(m)) {
            let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.rx.recv()).await else {
                break;
            };
            if let EventKind::JobReturn(r) = event.kind() {
                returns.insert(
                    r.id.to_owned(),
                    MinionReturn {
                        correlation: correlation_of(&event),
                        success: r.success && r.retcode.unwrap_or(0) == 0,
                        retcode: r.retcode,
                        ret: crate::bus::event::to_json(r.ret),
                    },
                );
            }
        }
        let no_answer = expected
            .iter()
            .filter(|m| !returns.contains_key(*m))
            .cloned()
            .collect();
        JobOutcome {
            jid: self.jid.clone(),
            returns,
            no_answer,
            unconfirmed: Vec::new(),
        }
    }

    /// Makes the job cache fill in what the bus may have lost.
    pub(crate) fn with_lookup(mut self, client: super::SaltClient) -> Self {
        self.lookup = Some(client);
        self
    }

    /// Takes every return the master's job cache holds for this jid: those
    /// shown on the bus are confirmed (with the correlation they carried),
    /// the others were lost on the bus (`after_gap`: logged as reconciled).
    async fn lookup_cache(
        &self,
        client: &super::SaltClient,
        hinted: &mut BTreeMap<String, Option<String>>,
        confirmed: &mut BTreeMap<String, MinionReturn>,
        deadline: tokio::time::Instant,
        after_gap: bool,
    ) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.job_cache_returns(&self.jid, left).await {
            Ok(found) => {
                let mut reconciled = 0usize;
                for (minion, mut ret) in found {
                    if confirmed.contains_key(&minion) {
                        continue;
                    }
                    match hinted.remove(&minion) {
                        Some(correlation) => ret.correlation = correlation,
                        None => reconciled += 1,
                    }
                    confirmed.insert(minion, ret);
                }
                if after_gap || reconciled > 0 {
                    tracing::info!(
                        message = "Job returns reconciled from the master's job cache after a bus gap.",
                        jid = %self.jid,
                        added = reconciled,
                        not_confirmed_yet = hinted.len()
                    );
                }
            }
            Err(error) => {
                tracing::warn!(message = "Job cache lookup failed.", jid = %self.jid, %error);
            }
        }
    }

    /// Waits for a runner's `salt/run/<jid>/ret` event and returns its data.
    pub async fn runner_result(mut self, timeout: Duration) -> Option<Json> {
        let deadline = crate::clock::deadline_in(timeout);
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            if run_jid(&event.tag).is_some() {
                return Some(event.data_json());
            }
        }
        None
    }
}

/// A `state.apply` / `state.sls` / `state.highstate` return, summarised.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StateSummary {
    pub succeeded: usize,
    pub failed: usize,
    pub changed: usize,
    /// `(state id, comment)` of each failed state, in run order; a render
    /// error is reported as one entry with an empty id.
    pub failures: Vec<(String, String)>,
}

impl StateSummary {
    /// Summarises a minion's state return (`return` of `salt/job/…/ret`).
    pub fn of(ret: &Json) -> Self {
        let mut s = Self::default();
        match ret {
            Json::Object(states) => {
                let mut entries: Vec<(&String, &Json)> = states.iter().collect();
                entries.sort_by_key(|(_, v)| {
                    v.get("__run_num__")
                        .and_then(Json::as_u64)
                        .unwrap_or(u64::MAX)
                });
                for (key, v) in entries {
                    let ok = v.get("result").and_then(Json::as_bool);
                    let changed = v
                        .get("changes")
                        .is_some_and(|c| c.as_object().is_some_and(|m| !m.is_empty()));
                    if changed {
                        s.changed += 1;
                    }
                    if ok == Some(false) {
                        s.failed += 1;
                        let id = v
                            .get("__id__")
                            .and_then(Json::as_str)
                            .map(str::to_owned)
                            .unwrap_or_else(|| key.split("_|-").nth(1).unwrap_or(key).to_owned());
                        let comment = match v.get("comment") {
                            Some(Json::String(c)) => c.clone(),
                            Some(other) => other.to_string(),
                            None => String::new(),
                        };
                        s.failures.push((id, comment));
                    } else {
                        s.succeeded += 1;
                    }
                }
            }
            // Render or compile errors: a list of messages (retcode 1).
            Json::Array(errors) => {
                s.failed = errors.len().max(1);
                for e in errors {
                    s.failures.push((
                        String::new(),
                        e.as_str().map_or_else(|| e.to_string(), str::to_owned),
                    ));
                }
            }
            Json::String(e) => {
                s.failed = 1;
                s.failures.push((String::new(), e.clone()));
            }
            _ => {}
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn jids_look_like_salts_and_never_repeat() {
        let a = new_jid();
        assert_eq!(a.len(), 20, "{a}");
        assert!(a.starts_with("20"), "{a}");
        let many: std::collections::HashSet<_> = (0..10_000).map(|_| new_jid()).collect();
        assert_eq!(many.len(), 10_000);
    }

    #[test]
    fn state_returns_are_summarised() {
        // Shape observed on 3007.8 (salt-protocol.md §2).
        let ret = json!({
            "file_|-hello_file_|-/tmp/x_|-managed": {"result": true, "changes": {"diff": "New file"},
                "comment": "File updated", "__id__": "hello_file", "__run_num__": 0},
            "cmd_|-say_hi_|-echo hi_|-run": {"result": true, "changes": {}, "comment": "",
                "__id__": "say_hi", "__run_num__": 1},
            "cmd_|-broken_|-false_|-run": {"result": false, "changes": {"retcode": 1},
                "comment": "Command \"false\" run", "__id__": "broken", "__run_num__": 2},
        });
        let s = StateSummary::of(&ret);
        assert_eq!((s.succeeded, s.failed, s.changed), (2, 1, 2));
        assert_eq!(
            s.failures,
            vec![("broken".into(), "Command \"false\" run".into())]
        );

        let render = json!(["No matching sls found for 'nonexist' in env 'base'"]);
        let s = StateSummary::of(&render);
        assert_eq!(s.failed, 1);
        assert!(s.failures[0].1.contains("No matching sls"));
    }
}
