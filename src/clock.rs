//! Deadline arithmetic that cannot panic.
//!
//! `Instant + Duration` panics when the sum does not fit, and a duration
//! comes from a config or rule file (or the command line). Every deadline is
//! computed here: a sum that overflows becomes a deadline so far ahead that
//! it never comes, which is what an absurdly long wait means anyway. The
//! loaders refuse such values first (see `config` and `rules::compile`);
//! this is the second line.

use std::time::Duration;

use tokio::time::Instant;

/// Roughly thirty years: "never" for a deadline (what tokio uses too).
pub const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `now + wait`, or a deadline that never comes when that does not fit.
pub fn deadline(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(FAR_FUTURE))
        // Unreachable in practice (an Instant thirty years from its clock's
        // end); `now` keeps the result well defined without panicking.
        .unwrap_or(now)
}

/// `wait` from now on tokio's (pausable) clock; see [`deadline`].
pub fn deadline_in(wait: Duration) -> Instant {
    deadline(Instant::now(), wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflowing_deadline_saturates_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let far = deadline(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(86_400 * 365));
        let far = deadline_in(Duration::from_secs(u64::MAX));
        assert!(far > now);
    }
}
