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

/// The installed filter, replaceable at run time (SIGHUP with a new
/// `log.level`); `None` before [`init`] or when `RUST_LOG` fixed it.
static LEVEL: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// Installs the global subscriber: logs go to stderr; `RUST_LOG` overrides `level`.
pub fn init(level: &str, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let fixed = from_env.is_some();
    let filter = from_env
        .or_else(|| tracing_subscriber::EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colour only on a terminal, and never when NO_COLOR is set.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (tests) keeps the first subscriber.
    let installed = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json()).try_init(),
    };
    if installed.is_ok() && !fixed {
        let _ = LEVEL.set(handle);
    }
}

/// Why a new log level was not applied.
#[derive(Debug, thiserror::Error)]
pub enum LevelError {
    /// `RUST_LOG` is set: it takes precedence over the config.
    #[error("RUST_LOG is set and takes precedence over log.level")]
    Fixed,
    /// Not a level or filter.
    #[error("log.level {0:?} is not a level or tracing filter: {1}")]
    Invalid(String, String),
    /// The subscriber is gone.
    #[error("the log filter cannot be replaced: {0}")]
    Reload(String),
}

/// Replaces the log filter with `level` (a level or a tracing filter).
pub fn set_level(level: &str) -> Result<(), LevelError> {
    let handle = LEVEL.get().ok_or(LevelError::Fixed)?;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| LevelError::Invalid(level.to_owned(), e.to_string()))?;
    handle
        .reload(filter)
        .map_err(|e| LevelError::Reload(e.to_string()))
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
