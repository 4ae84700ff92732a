//! One function per observable bus occurrence, so each is logged the same way
//! everywhere (style.md habit 11).

use tracing::{debug, info, warn};

use super::codec::BadFrame;
use super::BusEndpoint;

/// A frame that could not be decoded. Logged with its tag (if readable) and
/// length; after the first 100 only every 1000th is logged, all are counted.
pub(crate) fn event_decode_failed(bad: &BadFrame, total: u64) {
    if total <= 100 || total.is_multiple_of(1000) {
        warn!(
            message = "Event dropped: cannot decode.",
            tag = bad.tag.as_deref().unwrap_or("<unreadable>"),
            len = bad.len,
            error = %bad.error,
            decode_errors_total = total,
        );
    }
}

/// A consumer fell behind the bus and lost `n` events.
pub(crate) fn bus_consumer_lagged(n: u64) {
    warn!(
        message = "Bus consumer fell behind; events dropped for it.",
        dropped = n
    );
}

/// Connected (or reconnected) to the master's publisher.
pub(crate) fn bus_connected(endpoint: &BusEndpoint, reconnect: bool) {
    if reconnect {
        info!(message = "Reconnected to the master event bus.", %endpoint);
    } else {
        info!(message = "Connected to the master event bus.", %endpoint);
    }
}

/// The master's publisher went away.
pub(crate) fn bus_disconnected(endpoint: &BusEndpoint, reason: &str) {
    warn!(message = "Lost the master event bus; reconnecting.", %endpoint, reason);
}

/// A connection attempt failed; the first and then every 20th is a warning.
pub(crate) fn bus_connect_failed(endpoint: &BusEndpoint, attempt: u32, error: &std::io::Error) {
    if attempt == 1 || attempt.is_multiple_of(20) {
        warn!(message = "Master event bus not reachable; retrying.", %endpoint, attempt, %error);
    } else {
        debug!(message = "Master event bus not reachable; retrying.", %endpoint, attempt, %error);
    }
}
