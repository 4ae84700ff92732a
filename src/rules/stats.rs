//! Counters of the rules engine, logged periodically and at shutdown, and
//! what the HTTP API shows of it (`GET /api/v1/rules`, [`RuleStats::report`]):
//! the set loaded, the last load's problems and per-rule counters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value as Json};

use super::compile::{RuleError, RuleSet};

/// One rule's counters (the engine's totals, per rule).
#[derive(Debug, Default, Clone, Copy)]
pub struct PerRule {
    /// Events it matched.
    pub matched: u64,
    /// Actions handed to the queues.
    pub actions: u64,
    /// Actions dropped: rate limit, full queue, debounce overflow, or not
    /// filled in from the event.
    pub dropped: u64,
    /// Actions whose job succeeded.
    pub done: u64,
    /// Actions whose job failed.
    pub failed: u64,
}

/// Which per-rule counter to bump.
#[derive(Debug, Clone, Copy)]
pub enum RuleCount {
    /// [`PerRule::matched`].
    Matched,
    /// [`PerRule::actions`].
    Action,
    /// [`PerRule::dropped`].
    Dropped,
    /// [`PerRule::done`].
    Done,
    /// [`PerRule::failed`].
    Failed,
}

/// The rule set loaded and the last load's outcome.
#[derive(Debug, Default)]
struct Loaded {
    dir: Option<PathBuf>,
    /// Unix ms of the last load attempt.
    at: Option<i64>,
    set: Arc<RuleSet>,
    /// The last attempt's problems (empty when it loaded).
    errors: Vec<RuleError>,
    /// Counters of the rules of the set, by name (bounded by the set).
    per_rule: HashMap<Arc<str>, PerRule>,
}

/// Everything the engine counts; nothing it drops goes uncounted.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// Events read from the bus.
    pub events: AtomicU64,
    /// Events lost because the engine fell behind the bus (its queue is bounded).
    pub lagged: AtomicU64,
    /// Bus copies of salt-steward's own tags, not acted on (the daemon's
    /// own events come in memory; these prove nothing).
    pub own_tags_ignored: AtomicU64,
    /// (event, rule) matches.
    pub matched: AtomicU64,
    /// Matches whose actions could not be rendered (a missing field …).
    pub render_errors: AtomicU64,
    /// Actions handed to the sender queues.
    pub queued: AtomicU64,
    /// Actions folded into a later one by debounce.
    pub coalesced: AtomicU64,
    /// Actions dropped by a rate limit.
    pub rate_limited: AtomicU64,
    /// Actions dropped because their sender's queue was full.
    pub queue_full: AtomicU64,
    /// Actions dropped because too many debounced actions were waiting.
    pub debounce_overflow: AtomicU64,
    /// Actions whose job succeeded.
    pub done: AtomicU64,
    /// Actions whose job failed (or timed out).
    pub failed: AtomicU64,
    /// Jobs running now.
    pub running: AtomicU64,
    /// Rule sets loaded (the first included).
    pub reloads: AtomicU64,
    /// Reloads refused because a file was invalid.
    pub reload_failures: AtomicU64,
    /// What `GET /api/v1/rules` shows.
    loaded: Mutex<Loaded>,
}

impl RuleStats {
    /// All counters as a JSON map (for logs).
    pub fn snapshot(&self) -> Json {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "events": g(&self.events),
            "lagged": g(&self.lagged),
            "own_tags_ignored": g(&self.own_tags_ignored),
            "matched": g(&self.matched),
            "render_errors": g(&self.render_errors),
            "queued": g(&self.queued),
            "coalesced": g(&self.coalesced),
            "rate_limited": g(&self.rate_limited),
            "queue_full": g(&self.queue_full),
            "debounce_overflow": g(&self.debounce_overflow),
            "done": g(&self.done),
            "failed": g(&self.failed),
            "running": g(&self.running),
            "reloads": g(&self.reloads),
            "reload_failures": g(&self.reload_failures),
        })
    }
}

impl RuleStats {
    fn loaded(&self) -> MutexGuard<'_, Loaded> {
        // Counters and a snapshot: nothing a panic could leave half-done.
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a load of `dir` that gave `set` (its rules' counters kept,
    /// those of rules gone forgotten).
    pub fn loaded_set(&self, dir: &Path, set: Arc<RuleSet>) {
        let mut l = self.loaded();
        l.per_rule
            .retain(|name, _| set.rules().iter().any(|r| &r.name == name));
        l.dir = Some(dir.to_owned());
        l.at = Some(now_ms());
        l.set = set;
        l.errors.clear();
    }

    /// Records a load of `dir` refused for `errors` (the set stays).
    pub fn load_refused(&self, dir: &Path, errors: &[RuleError]) {
        let mut l = self.loaded();
        l.dir = Some(dir.to_owned());
        l.at = Some(now_ms());
        l.errors = errors.to_vec();
    }

    /// Bumps one counter of rule `name` (a rule of the loaded set only, so
    /// the map stays bounded by the set).
    pub fn count_rule(&self, name: &Arc<str>, what: RuleCount) {
        let mut l = self.loaded();
        if !l.per_rule.contains_key(name) && !l.set.rules().iter().any(|r| &r.name == name) {
            return;
        }
        let c = l.per_rule.entry(name.clone()).or_default();
        match what {
            RuleCount::Matched => c.matched += 1,
            RuleCount::Action => c.actions += 1,
            RuleCount::Dropped => c.dropped += 1,
            RuleCount::Done => c.done += 1,
            RuleCount::Failed => c.failed += 1,
        }
    }

    /// The rules as `GET /api/v1/rules` shows them: `{dir, loaded_at,
    /// files, rules: [{name, file, line, enabled, matched, actions, dropped,
    /// done, failed}], errors, warnings: [{file, line, column, rule,
    /// message, at}], counters}` (`at`: `file:line:column`).
    pub fn report(&self) -> Json {
        let l = self.loaded();
        let problem = |e: &RuleError| {
            let mut at = e.file.display().to_string();
            if let Some(line) = e.line {
                at.push_str(&format!(":{line}:{}", e.column.unwrap_or(1)));
            }
            json!({"file": e.file.display().to_string(), "line": e.line, "column": e.column,
                   "rule": e.rule, "message": e.message, "at": at})
        };
        let rules: Vec<Json> = l
            .set
            .rules()
            .iter()
            .map(|r| {
                let c = l.per_rule.get(&r.name).copied().unwrap_or_default();
                json!({"name": &*r.name, "file": r.file.display().to_string(), "line": r.line,
                       "enabled": r.enabled, "matched": c.matched, "actions": c.actions,
                       "dropped": c.dropped, "done": c.done, "failed": c.failed})
            })
            .collect();
        json!({
            "dir": l.dir.as_ref().map(|d| d.display().to_string()),
            "loaded_at": l.at,
            "files": l.set.files().iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
            "rules": rules,
            "errors": l.errors.iter().map(problem).collect::<Vec<_>>(),
            "warnings": l.set.warnings().iter().map(problem).collect::<Vec<_>>(),
            "counters": self.snapshot(),
        })
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Whether the `n`th occurrence of something frequent is logged: the first
/// ten, then every 10,000th (all are counted).
pub fn worth_logging(n: u64) -> bool {
    n <= 10 || n.is_multiple_of(10_000)
}
