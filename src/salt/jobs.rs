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
        };
        (tracker, task)
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

/// What came back for a published job.
#[derive(Debug, Clone, Serialize)]
pub struct JobOutcome {
    pub jid: String,
    pub returns: BTreeMap<String, MinionReturn>,
    /// Expected minions that did not answer before the timeout.
    pub no_answer: Vec<String>,
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
    /// `timeout` passed; unexpected minions' returns are kept too.
    pub async fn collect(mut self, expected: &[String], timeout: Duration) -> JobOutcome {
        let mut returns = BTreeMap::new();
        let deadline = crate::clock::deadline_in(timeout);
        // The master fires a return's event before it writes the return to
        // its job cache: a lookup right after a gap can come too early, so a
        // second one follows once, a little later.
        let mut recheck: Option<tokio::time::Instant> = None;
        while !expected.iter().all(|m| returns.contains_key(m)) {
            let gap = async {
                match self.lookup {
                    Some(_) => self.gaps.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let later = async {
                match recheck {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                e = tokio::time::timeout_at(deadline, self.rx.recv()) => e,
                true = gap => {
                    self.reconcile(expected, &mut returns, deadline).await;
                    recheck = Some(crate::clock::deadline_in(RECHECK_AFTER));
                    continue;
                }
                () = later => {
                    recheck = None;
                    self.reconcile(expected, &mut returns, deadline).await;
                    continue;
                }
            };
            let Ok(Some(event)) = event else {
                break;
            };
            if let EventKind::JobReturn(r) = event.kind() {
                returns.insert(
                    r.id.to_owned(),
                    MinionReturn {
                        correlation: event
                            .field("metadata")
                            .and_then(|m| crate::bus::event::map_get(m, "steward_correlation"))
                            .and_then(crate::bus::event::as_str)
                            .map(str::to_owned),
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
        }
    }

    /// Makes the job cache fill in what the bus may have lost.
    pub(crate) fn with_lookup(mut self, client: super::SaltClient) -> Self {
        self.lookup = Some(client);
        self
    }

    /// After a gap: the returns the master has stored for this jid that were
    /// not seen on the bus are taken from its job cache.
    async fn reconcile(
        &mut self,
        expected: &[String],
        returns: &mut BTreeMap<String, MinionReturn>,
        deadline: tokio::time::Instant,
    ) {
        let Some(client) = &self.lookup else {
            return;
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.job_cache_returns(&self.jid, left).await {
            Ok(found) => {
                let mut added = 0usize;
                for (minion, ret) in found {
                    if let std::collections::btree_map::Entry::Vacant(e) = returns.entry(minion) {
                        e.insert(ret);
                        added += 1;
                    }
                }
                tracing::info!(
                    message = "Job returns reconciled from the master's job cache after a bus gap.",
                    jid = %self.jid,
                    added,
                    still_missing = expected.iter().filter(|m| !returns.contains_key(*m)).count()
                );
            }
            Err(error) => {
                tracing::warn!(message = "Job cache lookup after a bus gap failed.", jid = %self.jid, %error);
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
