//! Logging set-up, and one function per observable bus occurrence so each is
//! logged the same way everywhere (style.md habit 11).

use tracing::{debug, info, warn};

use crate::bus::codec::BadFrame;
use crate::bus::BusEndpoint;

/// Log output format, from the `log.format` config key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber: logs go to stderr; `RUST_LOG` overrides `level`.
pub fn init(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal, and never when NO_COLOR is set.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A frame that could not be decoded. Logged with its tag (if readable) and
/// length; after the first 100 only every 1000th is logged, all are counted.
pub fn event_decode_failed(bad: &BadFrame, total: u64) {
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
pub fn bus_consumer_lagged(n: u64) {
    warn!(
        message = "Bus consumer fell behind; events dropped for it.",
        dropped = n
    );
}

/// Connected (or reconnected) to the master's publisher.
pub fn bus_connected(endpoint: &BusEndpoint, reconnect: bool) {
    if reconnect {
        info!(message = "Reconnected to the master event bus.", %endpoint);
    } else {
        info!(message = "Connected to the master event bus.", %endpoint);
    }
}

/// The master's publisher went away.
pub fn bus_disconnected(endpoint: &BusEndpoint, reason: &str) {
    warn!(message = "Lost the master event bus; reconnecting.", %endpoint, reason);
}

/// A connection attempt failed; the first and then every 20th is a warning.
pub fn bus_connect_failed(endpoint: &BusEndpoint, attempt: u32, error: &std::io::Error) {
    if attempt == 1 || attempt.is_multiple_of(20) {
        warn!(message = "Master event bus not reachable; retrying.", %endpoint, attempt, %error);
    } else {
        debug!(message = "Master event bus not reachable; retrying.", %endpoint, attempt, %error);
    }
}
