//! Counters of the rules engine, logged periodically and at shutdown.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value as Json};

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

/// Whether the `n`th occurrence of something frequent is logged: the first
/// ten, then every 10,000th (all are counted).
pub fn worth_logging(n: u64) -> bool {
    n <= 10 || n.is_multiple_of(10_000)
}
