//! Debounce and rate limits, per rule, action and target.
//!
//! Pure bookkeeping: time is passed in (`now`), so tests drive it. Memory is
//! bounded: at most `max_keys` debounced actions wait at once and at most
//! `max_keys` rate-limit windows are kept; beyond that an action is refused
//! (the caller counts it), and the heap holds one entry per waiting key
//! however many events a burst brings.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::compile::RateLimit;

/// What debounce and rate limits are counted by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The rule's name.
    pub rule: Arc<str>,
    /// The action's position in the rule (1-based).
    pub action: usize,
    /// The rendered target (`master` for wheel, runner, fire).
    pub target: String,
}

/// What became of an action offered for debouncing.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// It waits; the first of a burst.
    Waiting,
    /// It replaced a waiting one (the burst is coalesced).
    Coalesced,
    /// Too many keys wait already; dropped.
    Overflow,
}

struct Pending<T> {
    deadline: Instant,
    item: T,
}

struct Window {
    per: Duration,
    runs: VecDeque<Instant>,
}

/// Debounced actions waiting, and rate-limit windows.
pub struct Throttle<T> {
    pending: HashMap<Key, Pending<T>>,
    heap: BinaryHeap<Reverse<(Instant, Key)>>,
    windows: HashMap<Key, Window>,
    max_keys: usize,
}

impl<T> Throttle<T> {
    /// At most `max_keys` waiting actions and as many rate-limit windows.
    pub fn new(max_keys: usize) -> Self {
        Self {
            pending: HashMap::new(),
            heap: BinaryHeap::new(),
            windows: HashMap::new(),
            max_keys: max_keys.max(1),
        }
    }

    /// Debounces `item`: it will be due `wait` after the last offer for
    /// `key`, replacing any earlier one waiting.
    pub fn offer(&mut self, key: Key, wait: Duration, item: T, now: Instant) -> Offer {
        let deadline = crate::clock::deadline(now, wait);
        if let Some(p) = self.pending.get_mut(&key) {
            // The heap entry keeps its old deadline; `due` re-queues it.
            p.deadline = deadline;
            p.item = item;
            return Offer::Coalesced;
        }
        if self.pending.len() >= self.max_keys {
            return Offer::Overflow;
        }
        self.heap.push(Reverse((deadline, key.clone())));
        self.pending.insert(key, Pending { deadline, item });
        Offer::Waiting
    }

    /// When the next waiting action may be due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((d, _))| *d)
    }

    /// How many actions wait.
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    /// The actions due at `now`, in deadline order.
    pub fn due(&mut self, now: Instant) -> Vec<(Key, T)> {
        let mut out = Vec::new();
        while let Some(Reverse((d, _))) = self.heap.peek() {
            if *d > now {
                break;
            }
            let Some(Reverse((_, key))) = self.heap.pop() else {
                break;
            };
            match self.pending.get(&key) {
                Some(p) if p.deadline > now => {
                    // Pushed back by a later offer.
                    self.heap.push(Reverse((p.deadline, key)));
                }
                Some(_) => {
                    if let Some(p) = self.pending.remove(&key) {
                        out.push((key, p.item));
                    }
                }
                None => {}
            }
        }
        out
    }

    /// Takes every waiting action (at shutdown), for counting.
    pub fn drain(&mut self) -> Vec<(Key, T)> {
        self.heap.clear();
        self.pending.drain().map(|(k, p)| (k, p.item)).collect()
    }

    /// Whether [`admit`](Self::admit) would allow a run now, without recording one.
    pub fn would_admit(&self, key: &Key, limit: Option<RateLimit>, now: Instant) -> bool {
        let Some(limit) = limit else {
            return true;
        };
        match self.windows.get(key) {
            // A new window: `admit` decides (it may have to make room).
            None => true,
            Some(w) => {
                w.runs
                    .iter()
                    .filter(|t| now.saturating_duration_since(**t) < limit.per)
                    .count()
                    < limit.max as usize
            }
        }
    }

    /// Whether a run for `key` is allowed now under `limit` (and records it).
    pub fn admit(&mut self, key: &Key, limit: Option<RateLimit>, now: Instant) -> bool {
        let Some(limit) = limit else {
            return true;
        };
        if !self.windows.contains_key(key) && self.windows.len() >= self.max_keys {
            self.sweep(now);
            if self.windows.len() >= self.max_keys {
                return false;
            }
        }
        let w = self.windows.entry(key.clone()).or_insert_with(|| Window {
            per: limit.per,
            runs: VecDeque::new(),
        });
        w.per = limit.per;
        while w
            .runs
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= limit.per)
        {
            w.runs.pop_front();
        }
        if w.runs.len() >= limit.max as usize {
            return false;
        }
        w.runs.push_back(now);
        true
    }

    /// Forgets rate-limit windows with no run inside their interval.
    pub fn sweep(&mut self, now: Instant) {
        self.windows.retain(|_, w| {
            w.runs
                .back()
                .is_some_and(|t| now.saturating_duration_since(*t) < w.per)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(target: &str) -> Key {
        Key {
            rule: Arc::from("r"),
            action: 1,
            target: target.to_owned(),
        }
    }

    #[test]
    fn a_burst_becomes_one_run_per_target_with_the_last_value() {
        let t0 = Instant::now();
        let mut th = Throttle::new(100);
        let d = Duration::from_secs(2);
        for i in 0..100_000u32 {
            let at = t0 + Duration::from_micros(u64::from(i) * 10); // 1 s burst
            let target = if i % 2 == 0 { "a" } else { "b" };
            let o = th.offer(key(target), d, i, at);
            assert_eq!(
                o,
                if i < 2 {
                    Offer::Waiting
                } else {
                    Offer::Coalesced
                }
            );
        }
        assert_eq!(th.heap.len(), 2, "one heap entry per key, not per event");
        assert!(
            th.due(t0 + Duration::from_secs(2)).is_empty(),
            "pushed back by the burst"
        );
        let mut due = th.due(t0 + Duration::from_secs(3));
        due.sort();
        assert_eq!(due, vec![(key("a"), 99_998), (key("b"), 99_999)]);
        assert_eq!(th.waiting(), 0);
        assert_eq!(th.next_deadline(), None);
    }

    #[test]
    fn a_wait_too_long_for_the_clock_never_comes_and_does_not_panic() {
        let now = Instant::now();
        let mut th = Throttle::new(10);
        assert_eq!(th.offer(key("a"), Duration::MAX, 1, now), Offer::Waiting);
        assert_eq!(th.offer(key("a"), Duration::MAX, 2, now), Offer::Coalesced);
        assert!(th.due(now + Duration::from_secs(86_400 * 365)).is_empty());
        assert_eq!(th.waiting(), 1);
    }

    #[test]
    fn waiting_keys_are_bounded() {
        let now = Instant::now();
        let mut th = Throttle::new(3);
        for i in 0..3 {
            assert_eq!(
                th.offer(key(&i.to_string()), Duration::from_secs(1), i, now),
                Offer::Waiting
            );
        }
        assert_eq!(
            th.offer(key("x"), Duration::from_secs(1), 9, now),
            Offer::Overflow
        );
        assert_eq!(
            th.offer(key("0"), Duration::from_secs(1), 9, now),
            Offer::Coalesced
        );
        assert_eq!(th.drain().len(), 3);
    }

    #[test]
    fn rate_limit_holds_per_target_and_slides() {
        let t0 = Instant::now();
        let mut th: Throttle<()> = Throttle::new(100);
        let limit = Some(RateLimit {
            max: 3,
            per: Duration::from_secs(10),
        });
        let allowed = (0..1000)
            .filter(|i| th.admit(&key("a"), limit, t0 + Duration::from_millis(*i)))
            .count();
        assert_eq!(allowed, 3);
        assert!(
            th.admit(&key("b"), limit, t0),
            "another target has its own window"
        );
        assert!(!th.admit(&key("a"), limit, t0 + Duration::from_millis(9_999)));
        assert!(th.admit(&key("a"), limit, t0 + Duration::from_secs(10)));
        assert!(th.admit(&key("a"), None, t0), "no limit");
        th.sweep(t0 + Duration::from_secs(60));
        assert!(th.windows.is_empty());
    }
}
