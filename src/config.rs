//! The daemon's own config file (`/etc/salt-steward/config.yaml`).
//!
//! Every key is optional; the defaults are documented on [`ConfigFile`] and in
//! `contrib/config.yaml`. Unknown keys are an error naming the key, the file
//! and the line, so a typo never passes silently. Everything about Salt is
//! read from the master's own config, found through `master_config`.
//! YAML is parsed with `serde_yaml_ng`, the maintained continuation of the
//! archived `serde_yaml`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bus::codec::DEFAULT_MAX_FRAME;
use crate::master_config::DEFAULT_MASTER_CONFIG;
use crate::telemetry::LogFormat;

/// Where the config is read from when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/salt-steward/config.yaml";

/// The example shipped in `contrib/`, which states every default.
pub const EXAMPLE_CONFIG: &str = include_str!("../contrib/config.yaml");

/// Why the config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {source}")]
    Invalid {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
}

/// The file as written. Field docs are the user documentation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Path of the salt-master config. Default `/etc/salt/master`.
    pub master_config: Option<PathBuf>,
    /// Registry database URL (`sqlite://…` or `postgres://…`).
    /// Default `sqlite:///var/lib/salt-steward/registry.db`.
    pub registry: Option<String>,
    /// Directory of reactor rule files. Default `/etc/salt-steward/rules.d`.
    pub rules_dir: Option<PathBuf>,
    /// Minion ids whose requests on the bus may change the registry. Default none.
    #[serde(default)]
    pub trusted_minions: Vec<String>,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Event bus reader tuning.
    #[serde(default)]
    pub bus: BusConfig,
    /// The rules engine (the rule files are in `rules_dir`).
    #[serde(default)]
    pub rules: RulesConfig,
    /// Minion keys: where they are kept, their size, how they are accepted.
    #[serde(default)]
    pub keys: KeysConfig,
    /// The masters a server's bundle lists (`host` or `host:port`); empty: this master.
    #[serde(default)]
    pub masters: Vec<String>,
}

/// How minion keys are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptMode {
    /// The daemon compares each pending key with the issued one and accepts
    /// or rejects it through the wheel.
    #[default]
    Verify,
    /// The issued key is written into the master's accepted keys at issue time.
    Preseed,
}

/// What to do with a pending key whose minion id the registry does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownMinions {
    /// Leave it pending (an alert is fired once).
    #[default]
    Ignore,
    /// Reject it through the wheel.
    Reject,
}

/// The `keys:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// Private keys of issued pairs (0700 dir, 0600 files) and the pool.
    #[serde(default = "default_keys_dir")]
    pub dir: PathBuf,
    /// RSA size of issued minion keys.
    #[serde(default = "default_bits")]
    pub bits: usize,
    /// Pre-generated pairs the daemon keeps ready.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// `verify` or `preseed`.
    #[serde(default)]
    pub accept_mode: AcceptMode,
    /// `ignore` or `reject`.
    #[serde(default)]
    pub unknown_minions: UnknownMinions,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            dir: default_keys_dir(),
            bits: default_bits(),
            pool_size: default_pool(),
            accept_mode: AcceptMode::default(),
            unknown_minions: UnknownMinions::default(),
        }
    }
}

fn default_keys_dir() -> PathBuf {
    PathBuf::from("/var/lib/salt-steward/keys")
}

fn default_bits() -> usize {
    2048
}

fn default_pool() -> usize {
    8
}

/// `log:` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info` (default), `debug`, `trace`, or a tracing filter.
    #[serde(default = "default_level")]
    pub level: String,
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: default_level(),
            format: LogFormat::Text,
        }
    }
}

fn default_level() -> String {
    "info".to_owned()
}

/// `bus:` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// Events buffered per consumer before the oldest are dropped (counted). Default 16384.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// Largest event accepted, in bytes; bigger ones are dropped. Default 64 MiB.
    #[serde(default = "default_max_event")]
    pub max_event_size: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            queue_capacity: default_queue(),
            max_event_size: default_max_event(),
        }
    }
}

fn default_queue() -> usize {
    16_384
}

fn default_max_event() -> usize {
    DEFAULT_MAX_FRAME
}

/// `rules:` section: the rules engine.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Rule actions (jobs) running at once, all senders together. Default 8.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Actions waiting per sender (a minion, or the master) before more are
    /// dropped (counted). Default 1000.
    #[serde(default = "default_queue_per_sender")]
    pub queue_per_sender: usize,
    /// Seconds a job's returns are waited for, unless the rule sets `timeout`. Default 300.
    #[serde(default = "default_job_timeout")]
    pub job_timeout: u64,
    /// Debounced actions waiting at once (and rate-limit windows kept) before
    /// more are dropped (counted). Default 10000.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            queue_per_sender: default_queue_per_sender(),
            job_timeout: default_job_timeout(),
            max_waiting: default_max_waiting(),
        }
    }
}

fn default_concurrency() -> usize {
    8
}

fn default_queue_per_sender() -> usize {
    1000
}

fn default_job_timeout() -> u64 {
    300
}

fn default_max_waiting() -> usize {
    10_000
}

/// The resolved settings the program runs with.
#[derive(Debug)]
pub struct Settings {
    pub master_config: PathBuf,
    pub registry: String,
    pub rules_dir: PathBuf,
    pub trusted_minions: Vec<String>,
    pub log: LogConfig,
    pub bus: BusConfig,
    pub rules: RulesConfig,
    pub keys: KeysConfig,
    pub masters: Vec<String>,
}

impl Settings {
    /// Reads `path`, or the default file if `path` is `None` (a missing
    /// default file means all defaults; a missing explicit one is an error).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let file = match path {
            Some(p) => Some(read(p)?),
            None => {
                let p = Path::new(DEFAULT_CONFIG);
                if p.exists() {
                    Some(read(p)?)
                } else {
                    None
                }
            }
        };
        Ok(Self::from_file(file.unwrap_or_default()))
    }

    fn from_file(f: ConfigFile) -> Self {
        Self {
            master_config: f
                .master_config
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MASTER_CONFIG)),
            registry: f
                .registry
                .unwrap_or_else(|| "sqlite:///var/lib/salt-steward/registry.db".to_owned()),
            rules_dir: f
                .rules_dir
                .unwrap_or_else(|| PathBuf::from("/etc/salt-steward/rules.d")),
            trusted_minions: f.trusted_minions,
            log: f.log,
            bus: f.bus,
            rules: f.rules,
            keys: f.keys,
            masters: f.masters,
        }
    }
}

fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|source| ConfigError::Invalid {
        path: path.to_owned(),
        source,
    })
}

fn parse(text: &str) -> Result<ConfigFile, serde_yaml_ng::Error> {
    // An empty (or all-comment) file is all defaults.
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok(ConfigFile::default());
    }
    serde_yaml_ng::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_and_states_the_defaults() {
        let f = parse(EXAMPLE_CONFIG).unwrap();
        let s = Settings::from_file(f);
        let d = Settings::from_file(ConfigFile::default());
        assert_eq!(s.master_config, d.master_config);
        assert_eq!(s.registry, d.registry);
        assert_eq!(s.rules_dir, d.rules_dir);
        assert_eq!(s.trusted_minions, d.trusted_minions);
        assert_eq!(s.log.level, d.log.level);
        assert_eq!(s.log.format, d.log.format);
        assert_eq!(s.bus.queue_capacity, d.bus.queue_capacity);
        assert_eq!(s.bus.max_event_size, d.bus.max_event_size);
        assert_eq!(s.rules.concurrency, d.rules.concurrency);
        assert_eq!(s.rules.queue_per_sender, d.rules.queue_per_sender);
        assert_eq!(s.rules.job_timeout, d.rules.job_timeout);
        assert_eq!(s.rules.max_waiting, d.rules.max_waiting);
        assert_eq!(s.keys.dir, d.keys.dir);
        assert_eq!(s.keys.bits, d.keys.bits);
        assert_eq!(s.keys.pool_size, d.keys.pool_size);
        assert_eq!(s.keys.accept_mode, d.keys.accept_mode);
        assert_eq!(s.keys.unknown_minions, d.keys.unknown_minions);
        assert_eq!(s.masters, d.masters);
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::fs::write(
            &p,
            "log:\n  level: debug\nmaster_cofnig: /etc/salt/master\n",
        )
        .unwrap();
        let err = Settings::load(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("master_cofnig"), "{err}");
        assert!(err.contains("config.yaml"), "{err}");
        assert!(err.contains("line 3"), "{err}");

        std::fs::write(&p, "log:\n  levle: debug\n").unwrap();
        let err = Settings::load(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("levle"), "{err}");
    }

    #[test]
    fn an_explicit_missing_file_is_an_error() {
        let err = Settings::load(Some(Path::new("/nonexistent/steward.yaml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/steward.yaml"), "{err}");
    }

    #[test]
    fn values_are_read() {
        let f = parse("master_config: /tmp/m\nlog: {format: json}\nbus: {queue_capacity: 8}\n")
            .unwrap();
        let s = Settings::from_file(f);
        assert_eq!(s.master_config, PathBuf::from("/tmp/m"));
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.bus.queue_capacity, 8);
    }
}
