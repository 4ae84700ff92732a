//! Logging set-up. (What each layer logs of its own occurrences lives with
//! it, e.g. `bus::log`, so this module depends on nothing of ours.)

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

/// Counters keyed by a small set of labels (`(entity, op, outcome)` …),
/// for occurrences whose label values are a bounded set (error codes, ops)
/// but not fixed fields. Counted where they happen, read by the metrics
/// endpoint at scrape time; the lock is held for one map update.
#[derive(Debug)]
pub struct Counts<K> {
    map: std::sync::Mutex<std::collections::BTreeMap<K, u64>>,
}

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Self {
            map: std::sync::Mutex::default(),
        }
    }
}

impl<K: Ord + Clone> Counts<K> {
    /// Adds one to `key`'s counter.
    pub fn add(&self, key: K) {
        *self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key)
            .or_default() += 1;
    }

    /// Every key counted so far with its count, in key order.
    pub fn snapshot(&self) -> Vec<(K, u64)> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }
}
