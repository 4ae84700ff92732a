//! The intake: events from the bus and from this process → matching rules →
//! rendered actions → debounce and rate limits → the sender queues of the
//! [`Executor`].
//!
//! Each event comes with its [`Origin`]: what the daemon itself fired under
//! its own tags arrives in memory ([`Origin::Master`]); the bus copies of
//! those tags are dropped here (counted as `own_tags_ignored`), since anyone
//! can fire them; everything else off the bus is a minion's (claimed) or
//! unverified.
//!
//! One task reads its own bus subscription. It never waits on a job: the
//! sender queues refuse work when full, so the intake keeps up with the bus
//! (and if it ever falls behind, the subscription's bounded queue drops the
//! oldest events and says how many). Every drop is counted in
//! [`RuleStats`] and logged (the first ten of a kind, then every 10,000th).
//! The rule set is read from a `watch` channel at each event, so a reload
//! applies from the next event on.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::compile::{Rendered, Rule, RuleSet};
use super::exec::{Executor, Job, SubmitError};
use super::matcher::EventView;
use super::stats::{worth_logging, RuleCount, RuleStats};
use super::throttle::{Key, Offer, Throttle};
use super::Scratch;
use crate::bus::origin::{LocalItem, LocalSubscription};
use crate::bus::{is_own_tag, BusItem, Event, Origin, Subscription};

/// How often the counters are logged when they changed.
const STATS_EVERY: Duration = Duration::from_secs(10);

/// Intake tuning.
#[derive(Debug, Clone)]
pub struct IntakeOptions {
    /// Default wait for a job's returns (a rule's `timeout` overrides it).
    pub job_timeout: Duration,
    /// Most debounced actions waiting at once, and most rate-limit windows.
    pub max_waiting: usize,
}

/// Reads events until `cancel` fires or the bus reader stops.
pub async fn run_intake(
    mut sub: Subscription,
    mut local: LocalSubscription,
    rules: watch::Receiver<Arc<RuleSet>>,
    exec: Executor,
    stats: Arc<RuleStats>,
    opts: IntakeOptions,
    cancel: CancellationToken,
) {
    let mut intake = Intake {
        rules,
        exec,
        stats,
        opts,
        throttle: Throttle::new(1),
        scratch: Scratch::default(),
        hits: Vec::new(),
    };
    intake.throttle = Throttle::new(intake.opts.max_waiting);
    let mut tick = tokio::time::interval(STATS_EVERY);
    let mut last_logged = intake.stats.snapshot();
    let mut local_open = true;
    loop {
        let next = intake.throttle.next_deadline();
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = async {
                match next {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => intake.release_due(),
            _ = tick.tick() => {
                let now = intake.stats.snapshot();
                if now != last_logged {
                    info!(message = "Rules engine counters.", counters = %now);
                    last_logged = now;
                }
                intake.throttle.sweep(tokio::time::Instant::now());
            }
            item = local.recv(), if local_open => match item {
                // Nothing can be delivered any more; the bus goes on.
                None => local_open = false,
                Some(LocalItem::Event(e)) => intake.event(&e, Origin::Master),
                Some(LocalItem::Lagged(n)) => {
                    warn!(message = "Rules engine fell behind the daemon's own events; some were dropped.", dropped = n);
                    intake.stats.lagged.fetch_add(n, Ordering::Relaxed);
                }
            },
            item = sub.recv() => match item {
                None => break,
                Some(BusItem::Event(e)) => {
                    if is_own_tag(&e.tag) {
                        // The real one came in memory; this copy proves nothing.
                        intake.stats.own_tags_ignored.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let origin = Origin::of_bus(&e);
                        intake.event(&e, origin);
                    }
                }
                // Logged by the subscription itself; counted here too.
                Some(BusItem::Lagged(n)) => {
                    intake.stats.lagged.fetch_add(n, Ordering::Relaxed);
                }
                Some(_) => {}
            },
        }
    }
    let left = intake.throttle.drain().len();
    if left > 0 {
        warn!(
            message = "Debounced rule actions not run: shutting down.",
            count = left
        );
    }
    info!(message = "Rules engine stopped.", counters = %intake.stats.snapshot());
}

/// A debounced action: filled in from the last event of the burst when due,
/// with the rule set that matched it.
struct Deferred {
    set: Arc<RuleSet>,
    rule: usize,
    action: usize,
    event: Arc<Event>,
    origin: Origin,
}

struct Intake {
    rules: watch::Receiver<Arc<RuleSet>>,
    exec: Executor,
    stats: Arc<RuleStats>,
    opts: IntakeOptions,
    throttle: Throttle<Deferred>,
    scratch: Scratch,
    hits: Vec<usize>,
}

impl Intake {
    fn event(&mut self, e: &Arc<Event>, origin: Origin) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        let set = self.rules.borrow().clone();
        let view = EventView::of(e, &origin);
        set.matching(&view, &mut self.scratch, &mut self.hits);
        if self.hits.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        let ctx = RuleSet::context(&view);
        let hits = std::mem::take(&mut self.hits);
        'rules: for &i in &hits {
            let Some(rule) = set.rules().get(i) else {
                continue;
            };
            self.stats.matched.fetch_add(1, Ordering::Relaxed);
            self.stats.count_rule(&rule.name, RuleCount::Matched);
            let mut ready = Vec::with_capacity(rule.actions.len());
            for idx in 0..rule.actions.len() {
                // The target first: it is what debounce and limits count by.
                let target = match set.render_target(rule, idx, &ctx) {
                    Ok(t) => t,
                    Err(error) => {
                        self.render_failed(rule, &e.tag, &error);
                        continue 'rules;
                    }
                };
                let key = Key {
                    rule: rule.name.clone(),
                    action: idx + 1,
                    target,
                };
                if let Some(wait) = rule.debounce {
                    let d = Deferred {
                        set: set.clone(),
                        rule: i,
                        action: idx,
                        event: e.clone(),
                        origin: origin.clone(),
                    };
                    match self.throttle.offer(key, wait, d, now) {
                        Offer::Waiting => {}
                        Offer::Coalesced => {
                            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                        }
                        Offer::Overflow => {
                            let n =
                                self.stats.debounce_overflow.fetch_add(1, Ordering::Relaxed) + 1;
                            self.stats.count_rule(&rule.name, RuleCount::Dropped);
                            if worth_logging(n) {
                                warn!(message = "Rule action dropped: too many debounced actions waiting.", rule = %rule.name, action = idx + 1, max_waiting = self.opts.max_waiting, dropped_total = n);
                            }
                        }
                    }
                    continue;
                }
                // Over its limit: dropped before the cost of filling it in.
                if !self.throttle.would_admit(&key, rule.rate_limit, now) {
                    self.rate_limited(&key);
                    continue;
                }
                match set.render_action(rule, idx, &ctx) {
                    Ok(rendered) => ready.push((key, self.job(rule, idx, rendered, &view))),
                    Err(error) => {
                        // No action of the rule runs for this event.
                        self.render_failed(rule, &e.tag, &error);
                        continue 'rules;
                    }
                }
            }
            for (key, job) in ready {
                self.release(key, job);
            }
        }
        self.hits = hits;
    }

    fn job(&self, rule: &Rule, idx: usize, rendered: Rendered, view: &EventView<'_>) -> Job {
        Job {
            rule: rule.name.clone(),
            action: idx + 1,
            event_tag: view.tag.to_owned(),
            origin: view.origin.clone(),
            timeout: rule.timeout.unwrap_or(self.opts.job_timeout),
            rate_limit: rule.rate_limit,
            rendered,
        }
    }

    fn render_failed(&self, rule: &Rule, tag: &str, error: &str) {
        let n = self.stats.render_errors.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.count_rule(&rule.name, RuleCount::Dropped);
        if worth_logging(n) {
            warn!(message = "Rule not run: its actions could not be filled from the event.", rule = %rule.name, file = %rule.file.display(), line = rule.line, %tag, %error, render_errors_total = n);
        }
    }

    fn rate_limited(&self, key: &Key) {
        let n = self.stats.rate_limited.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.count_rule(&key.rule, RuleCount::Dropped);
        if worth_logging(n) {
            warn!(message = "Rule action dropped by its rate limit.", rule = %key.rule, action = key.action, target = %key.target, dropped_total = n);
        }
    }

    /// Debounced actions whose burst is over: filled in from their last event.
    fn release_due(&mut self) {
        let now = tokio::time::Instant::now();
        for (key, d) in self.throttle.due(now) {
            let Some(rule) = d.set.rules().get(d.rule) else {
                continue;
            };
            let view = EventView::of(&d.event, &d.origin);
            let ctx = RuleSet::context(&view);
            match d.set.render_action(rule, d.action, &ctx) {
                Ok(rendered) => {
                    let job = self.job(rule, d.action, rendered, &view);
                    self.release(key, job);
                }
                Err(error) => self.render_failed(rule, &d.event.tag, &error),
            }
        }
    }

    /// Applies the rate limit, then queues the job.
    fn release(&mut self, key: Key, job: Job) {
        let now = tokio::time::Instant::now();
        if !self.throttle.admit(&key, job.rate_limit, now) {
            self.rate_limited(&key);
            return;
        }
        match self.exec.submit(job) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                self.stats.count_rule(&key.rule, RuleCount::Action);
            }
            Err(SubmitError::Full) => {
                let n = self.stats.queue_full.fetch_add(1, Ordering::Relaxed) + 1;
                self.stats.count_rule(&key.rule, RuleCount::Dropped);
                if worth_logging(n) {
                    warn!(message = "Rule action dropped: its sender's queue is full.", rule = %key.rule, action = key.action, target = %key.target, dropped_total = n);
                }
            }
            Err(SubmitError::Stopping) => {}
        }
    }
}
