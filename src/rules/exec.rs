//! Running actions: in order per sender, in parallel across senders, with a
//! bound on how many run at once, each followed to its result.
//!
//! Each sender (a minion id; `master` for the daemon's own events;
//! `unverified` for unwrapped events off the bus, so a forged flood never
//! delays the daemon's own) has its own bounded queue drained by its own task, so one minion's actions
//! run in the order its events came while other minions' run beside them. A
//! global semaphore bounds the jobs in flight. A full queue refuses the
//! action (counted, logged): an event flood never grows memory without bound.
//! A queue's task ends after it has been idle a while; the next action for
//! that sender starts a new one, which waits for the old one to finish so
//! order holds across the hand-over.
//!
//! [`SaltRunner`] runs a job through the native Salt client, follows it to
//! its returns (jid, success, failed states) and fires
//! `steward/v1/rule/<rule>/done` or `…/failed`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{json, Map, Value as Json};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::compile::{RateLimit, Rendered, RESULT_PREFIX};
use super::stats::RuleStats;
use crate::bus::{Firer, Origin};
use crate::salt::{Publish, RequestError, SaltClient, StateSummary, WheelResult};

/// How long a sender's queue task waits for more work before it ends.
const IDLE: Duration = Duration::from_secs(30);

/// Longest `return` of a `local` job copied into a result event, in bytes of JSON.
const MAX_RETURN_IN_RESULT: usize = 16 * 1024;

/// One action to run, filled in from one event.
#[derive(Debug, Clone)]
pub struct Job {
    /// The rule's name.
    pub rule: Arc<str>,
    /// The action's position in the rule (1-based).
    pub action: usize,
    /// The action, rendered.
    pub rendered: Rendered,
    /// The tag of the event behind it.
    pub event_tag: String,
    /// Who produced the event behind it.
    pub origin: Origin,
    /// How long to wait for the job's returns.
    pub timeout: Duration,
    /// The rule's rate limit, applied when the job is released.
    pub rate_limit: Option<RateLimit>,
}

impl Job {
    /// The ordering key: the (claimed) minion id, or `master`, or `unverified`.
    pub fn queue_key(&self) -> &str {
        match &self.origin {
            Origin::Minion(id) => id,
            other => other.as_str(),
        }
    }
}

/// What came of a job.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub success: bool,
    /// The Salt jid (none for `fire`).
    pub jid: Option<String>,
    /// The result event's data.
    pub report: Json,
}

/// Runs jobs. Implemented by [`SaltRunner`]; tests of the queues use their own.
pub trait Runner: Send + Sync + 'static {
    /// Runs one job to its result.
    fn run<'a>(&'a self, job: &'a Job) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;
}

/// Why an action was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The sender's queue is full.
    Full,
    /// The engine is stopping.
    Stopping,
}

struct Queue {
    tx: mpsc::Sender<Job>,
    task: Option<JoinHandle<()>>,
}

struct Inner {
    queues: Mutex<HashMap<String, Queue>>,
    capacity: usize,
    semaphore: Arc<Semaphore>,
    runner: Arc<dyn Runner>,
    stats: Arc<RuleStats>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// Per-sender queues feeding a bounded pool of running jobs.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl Executor {
    /// `concurrency` jobs at most in flight; `capacity` waiting per sender.
    pub fn new(
        runner: Arc<dyn Runner>,
        concurrency: usize,
        capacity: usize,
        stats: Arc<RuleStats>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                queues: Mutex::new(HashMap::new()),
                // Both panic outside these bounds (the config is range-checked
                // far inside them; this keeps a missed check from panicking).
                capacity: capacity.clamp(1, Semaphore::MAX_PERMITS),
                semaphore: Arc::new(Semaphore::new(concurrency.clamp(1, Semaphore::MAX_PERMITS))),
                runner,
                stats,
                cancel,
                tracker: TaskTracker::new(),
            }),
        }
    }

    /// Queues a job behind the same sender's earlier ones; never waits.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.inner.cancel.is_cancelled() {
            return Err(SubmitError::Stopping);
        }
        let mut queues = self
            .inner
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = job.queue_key().to_owned();
        let mut previous = None;
        let job = match queues.get_mut(&key) {
            Some(q) => match q.tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => return Err(SubmitError::Full),
                // Its task went idle and closed: start another after it.
                Err(mpsc::error::TrySendError::Closed(job)) => {
                    previous = q.task.take();
                    job
                }
            },
            None => job,
        };
        if queues.len() > 1024 {
            queues.retain(|_, q| !q.tx.is_closed());
        }
        let (tx, rx) = mpsc::channel(self.inner.capacity);
        if tx.try_send(job).is_err() {
            return Err(SubmitError::Full);
        }
        let inner = self.inner.clone();
        let task = self
            .inner
            .tracker
            .spawn(drain(inner, key.clone(), rx, previous));
        queues.insert(
            key,
            Queue {
                tx,
                task: Some(task),
            },
        );
        Ok(())
    }

    /// Waits for every queue task to end (after the cancel token fired).
    pub async fn join(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}

async fn drain(
    inner: Arc<Inner>,
    key: String,
    mut rx: mpsc::Receiver<Job>,
    previous: Option<JoinHandle<()>>,
) {
    if let Some(p) = previous {
        let _ = p.await;
    }
    loop {
        let job = tokio::select! {
            _ = inner.cancel.cancelled() => break,
            next = tokio::time::timeout(IDLE, rx.recv()) => match next {
                Ok(Some(job)) => job,
                Ok(None) => break,
                Err(_) => {
                    // Idle: refuse new work, finish what slipped in, end.
                    rx.close();
                    while let Some(job) = rx.recv().await {
                        if !run_one(&inner, &job).await {
                            return;
                        }
                    }
                    break;
                }
            },
        };
        if !run_one(&inner, &job).await {
            break;
        }
    }
    tracing::debug!(message = "Rule queue ended.", sender = %key);
}

/// Runs a job under the concurrency bound; false when stopping.
async fn run_one(inner: &Inner, job: &Job) -> bool {
    let permit = tokio::select! {
        _ = inner.cancel.cancelled() => return false,
        p = inner.semaphore.acquire() => p,
    };
    let Ok(_permit) = permit else {
        return false;
    };
    inner.stats.running.fetch_add(1, Ordering::Relaxed);
    let outcome = tokio::select! {
        _ = inner.cancel.cancelled() => None,
        o = inner.runner.run(job) => Some(o),
    };
    inner.stats.running.fetch_sub(1, Ordering::Relaxed);
    let Some(outcome) = outcome else {
        warn!(message = "Rule action abandoned: shutting down.", rule = %job.rule, action = job.action, kind = job.rendered.kind().as_str(), target = job.rendered.target());
        return false;
    };
    let jid = outcome.jid.as_deref().unwrap_or("-");
    if outcome.success {
        inner.stats.done.fetch_add(1, Ordering::Relaxed);
        inner.stats.count_rule(&job.rule, super::RuleCount::Done);
        info!(message = "Rule action done.", rule = %job.rule, action = job.action, kind = job.rendered.kind().as_str(), target = job.rendered.target(), jid, event_tag = %job.event_tag);
    } else {
        inner.stats.failed.fetch_add(1, Ordering::Relaxed);
        inner.stats.count_rule(&job.rule, super::RuleCount::Failed);
        let error = outcome
            .report
            .get("error")
            .and_then(Json::as_str)
            .unwrap_or("");
        warn!(message = "Rule action failed.", rule = %job.rule, action = job.action, kind = job.rendered.kind().as_str(), target = job.rendered.target(), jid, event_tag = %job.event_tag, error, result = %outcome.report);
    }
    true
}

/// Runs jobs on the real master and fires their results.
pub struct SaltRunner {
    client: SaltClient,
    firer: Firer,
}

impl SaltRunner {
    /// A runner with its own connection to the master's pull socket.
    pub fn new(client: SaltClient, firer: Firer) -> Self {
        Self { client, firer }
    }

    async fn execute(&self, job: &Job) -> Outcome {
        let mut report = Map::new();
        report.insert("rule".into(), json!(&*job.rule));
        report.insert("action".into(), json!(job.action));
        report.insert("kind".into(), json!(job.rendered.kind().as_str()));
        report.insert("target".into(), json!(job.rendered.target()));
        report.insert(
            "event".into(),
            json!({"tag": job.event_tag, "sender": job.origin.minion(), "origin": job.origin.as_str()}),
        );
        let result = match &job.rendered {
            Rendered::Publish {
                target,
                tgt_type,
                fun,
                arg,
                kwarg,
                ..
            } => {
                report.insert("fun".into(), json!(fun));
                self.publish(job, target, *tgt_type, fun, arg, kwarg, &mut report)
                    .await
            }
            Rendered::Wheel { fun, arg, kwarg } => {
                report.insert("fun".into(), json!(fun));
                let r = self.client.wheel(fun, arg.clone(), kwarg.clone()).await;
                Self::call_report(r, &mut report)
            }
            Rendered::Runner { fun, arg, kwarg } => {
                report.insert("fun".into(), json!(fun));
                let r = (self.client)
                    .runner(fun, arg.clone(), kwarg.clone(), job.timeout)
                    .await;
                Self::call_report(r, &mut report)
            }
            Rendered::Fire { tag, data } => {
                report.insert("fired".into(), json!(tag));
                // Only what answers the daemon's own event comes back to it
                // as the master's; anything else it fires goes by the bus.
                let fired = if job.origin == Origin::Master {
                    self.firer.fire(tag, data).await
                } else {
                    self.firer.fire_bus_only(tag, data).await
                };
                fired.map(|()| (true, None)).map_err(|e| e.to_string())
            }
        };
        let (success, jid) = match result {
            Ok((ok, jid)) => (ok, jid),
            Err(error) => {
                report.insert("error".into(), json!(error));
                (false, None)
            }
        };
        report.insert("jid".into(), json!(jid));
        report.insert("success".into(), json!(success));
        let report = Json::Object(report);
        let tag = format!(
            "{RESULT_PREFIX}{}/{}",
            job.rule,
            if success { "done" } else { "failed" }
        );
        if let Err(error) = self.firer.fire(&tag, &report).await {
            warn!(message = "Rule result not fired.", %tag, %error);
        }
        Outcome {
            success,
            jid,
            report,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn publish(
        &self,
        job: &Job,
        target: &str,
        tgt_type: crate::salt::TargetType,
        fun: &str,
        arg: &[Json],
        kwarg: &Map<String, Json>,
        report: &mut Map<String, Json>,
    ) -> Result<(bool, Option<String>), String> {
        let p = Publish {
            target: target.to_owned(),
            tgt_type,
            fun: fun.to_owned(),
            arg: arg.to_vec(),
            kwarg: kwarg.clone(),
            correlation: Some(format!("rule/{}/{}", job.rule, job.action)),
        };
        let (published, watch) = self.client.publish(&p).await.map_err(|e| e.to_string())?;
        let jid = published.jid.clone();
        if published.minions.is_empty() {
            report.insert("jid".into(), json!(jid));
            return Err(format!("no minion matched target {target:?}"));
        }
        let outcome = watch.collect(&published.minions, job.timeout).await;
        let is_state = fun.starts_with("state.");
        let mut minions = Map::new();
        let mut all_ok = outcome.no_answer.is_empty();
        for (id, r) in &outcome.returns {
            let mut m = Map::new();
            m.insert("retcode".into(), json!(r.retcode));
            let mut ok = r.success;
            if is_state {
                let s = StateSummary::of(&r.ret);
                ok &= s.failed == 0;
                m.insert("succeeded".into(), json!(s.succeeded));
                m.insert("changed".into(), json!(s.changed));
                m.insert(
                    "failed_states".into(),
                    Json::Array(
                        s.failures
                            .iter()
                            .map(|(id, comment)| json!({"id": id, "comment": comment}))
                            .collect(),
                    ),
                );
            } else {
                let text = r.ret.to_string();
                m.insert(
                    "return".into(),
                    if text.len() <= MAX_RETURN_IN_RESULT {
                        r.ret.clone()
                    } else {
                        json!(format!("<{} bytes, not copied>", text.len()))
                    },
                );
            }
            m.insert("success".into(), json!(ok));
            all_ok &= ok;
            minions.insert(id.clone(), Json::Object(m));
        }
        report.insert("minions".into(), Json::Object(minions));
        report.insert("no_answer".into(), json!(outcome.no_answer));
        if !outcome.unconfirmed.is_empty() {
            report.insert("unconfirmed".into(), json!(outcome.unconfirmed));
        }
        if !outcome.no_answer.is_empty() {
            let mut error = format!(
                "no answer within {:?} from {}",
                job.timeout,
                outcome.no_answer.join(", ")
            );
            if !outcome.unconfirmed.is_empty() {
                error.push_str(&format!(
                    " (return events from {} were not in the master's job cache: not counted)",
                    outcome.unconfirmed.join(", ")
                ));
            }
            report.insert("error".into(), json!(error));
        }
        Ok((all_ok, Some(jid)))
    }

    /// A wheel or runner call's result into the report: `(success, jid)`.
    fn call_report(
        result: Result<WheelResult, RequestError>,
        report: &mut Map<String, Json>,
    ) -> Result<(bool, Option<String>), String> {
        let r = result.map_err(|e| e.to_string())?;
        report.insert("return".into(), r.ret);
        Ok((r.success, r.jid))
    }
}

impl Runner for SaltRunner {
    fn run<'a>(&'a self, job: &'a Job) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
        Box::pin(self.execute(job))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::compile::ActionKind;
    use std::sync::atomic::AtomicUsize;

    /// Records the order jobs ran in and how many ran at once.
    #[derive(Default)]
    struct Recorder {
        log: Mutex<Vec<(String, String)>>,
        now: AtomicUsize,
        peak: AtomicUsize,
    }

    impl Runner for Recorder {
        fn run<'a>(&'a self, job: &'a Job) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
            Box::pin(async move {
                let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
                self.peak.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                self.now.fetch_sub(1, Ordering::SeqCst);
                let Rendered::Fire { tag, .. } = &job.rendered else {
                    unreachable!()
                };
                self.log
                    .lock()
                    .unwrap()
                    .push((job.queue_key().to_owned(), tag.clone()));
                Outcome {
                    success: true,
                    jid: None,
                    report: Json::Null,
                }
            })
        }
    }

    fn job(sender: &str, n: usize) -> Job {
        Job {
            rule: Arc::from("r"),
            action: 1,
            rendered: Rendered::Fire {
                tag: format!("{n}"),
                data: Json::Null,
            },
            event_tag: "t".into(),
            origin: Origin::Minion(sender.into()),
            timeout: Duration::from_secs(1),
            rate_limit: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn in_order_per_sender_in_parallel_across_bounded() {
        let rec = Arc::new(Recorder::default());
        let stats = Arc::new(RuleStats::default());
        let cancel = CancellationToken::new();
        let set = |text: &str| {
            Arc::new(
                crate::rules::compile(&[(std::path::PathBuf::from("r.yaml"), text.to_owned())])
                    .unwrap(),
            )
        };
        let r = "rules:\n  - name: r\n    on: x\n    do: [{fire: {tag: out}}]\n";
        stats.loaded_set(std::path::Path::new("/rules"), set(r));
        let ex = Executor::new(rec.clone(), 3, 100, stats.clone(), cancel.clone());
        for n in 0..20 {
            for s in ["a", "b", "c", "d", "e"] {
                ex.submit(job(s, n)).unwrap();
            }
        }
        while stats.done.load(Ordering::SeqCst) < 100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let log = rec.log.lock().unwrap().clone();
        for s in ["a", "b", "c", "d", "e"] {
            let order: Vec<usize> = log
                .iter()
                .filter(|(k, _)| k == s)
                .map(|(_, t)| t.parse().unwrap())
                .collect();
            assert_eq!(order, (0..20).collect::<Vec<_>>(), "sender {s}");
        }
        assert_eq!(rec.peak.load(Ordering::SeqCst), 3, "bounded, and parallel");
        // Counted per rule too (the report the HTTP API serves) …
        let report = stats.report();
        assert_eq!(report["rules"][0]["name"], "r", "{report}");
        assert_eq!(report["rules"][0]["done"], 100, "{report}");
        assert_eq!(report["rules"][0]["failed"], 0, "{report}");
        // … and forgotten with the rule: a reload without it starts anew.
        let other = "rules:\n  - name: s\n    on: x\n    do: [{fire: {tag: out}}]\n";
        stats.loaded_set(std::path::Path::new("/rules"), set(other));
        stats.loaded_set(std::path::Path::new("/rules"), set(r));
        assert_eq!(stats.report()["rules"][0]["done"], 0);
        // 20 jobs of 20 ms, 3 at a time: about 100 × 20 / 3 ms, not 100 × 20.
        cancel.cancel();
        ex.join().await;
        let _ = ActionKind::Fire;
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_and_an_idle_one_hands_over_in_order() {
        let rec = Arc::new(Recorder::default());
        let stats = Arc::new(RuleStats::default());
        let cancel = CancellationToken::new();
        let ex = Executor::new(rec.clone(), 1, 2, stats.clone(), cancel.clone());
        let results: Vec<_> = (0..10).map(|n| ex.submit(job("a", n))).collect();
        // one may already be taken by the task; the queue holds 2 more
        let refused = results.iter().filter(|r| r.is_err()).count();
        assert!((7..=8).contains(&refused), "{results:?}");
        tokio::time::sleep(IDLE * 2).await;
        ex.submit(job("a", 100)).unwrap();
        while rec.log.lock().unwrap().last().map(|(_, t)| t.as_str()) != Some("100") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cancel.cancel();
        ex.join().await;
        assert_eq!(ex.submit(job("a", 1)), Err(SubmitError::Stopping));
    }
}
