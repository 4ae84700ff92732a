//! The daemon's own config file (`/etc/salt-steward/config.yaml`).
//!
//! Every key is optional; the defaults are documented on [`ConfigFile`] and in
//! `contrib/config.yaml`. Unknown keys are an error naming the key, the file
//! and the line, so a typo never passes silently. Every number has a range
//! (the [`Limit`] constants); a value outside it is an error naming the file,
//! the key, the line and the range, so nothing downstream sees it. Everything about Salt is
//! read from the master's own config, found through `master_config`.
//! YAML is parsed with `serde_yaml_ng`, the maintained continuation of the
//! archived `serde_yaml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bus::codec::DEFAULT_MAX_FRAME;
use crate::bus::subscriber::MAX_QUEUE_CAPACITY;
use crate::master_config::{MasterConfig, DEFAULT_MASTER_CONFIG};
use crate::pki::keys::{MAX_BITS, MIN_BITS};
use crate::pki::KeyIssuer;
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
    /// Values outside what is allowed (numbers out of range, a
    /// non-loopback `metrics_listen`), each with its key and line.
    #[error("config {path}: {}", problems.join("; "))]
    OutOfRange {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The inclusive range a number of the config must lie in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The key, dotted (`keys.bits`).
    pub key: &'static str,
    /// Smallest value allowed.
    pub min: u64,
    /// Largest value allowed.
    pub max: u64,
}

/// `bus.queue_capacity`: the queue is allocated whole, one slot per event.
pub const BUS_QUEUE_CAPACITY: Limit = Limit {
    key: "bus.queue_capacity",
    min: 16,
    max: MAX_QUEUE_CAPACITY as u64,
};
/// `bus.max_event_size`: 4 KiB to 1 GiB (an event is buffered whole).
pub const BUS_MAX_EVENT_SIZE: Limit = Limit {
    key: "bus.max_event_size",
    min: 4096,
    max: 1 << 30,
};
/// `rules.concurrency`: jobs in flight at once.
pub const RULES_CONCURRENCY: Limit = Limit {
    key: "rules.concurrency",
    min: 1,
    max: 1024,
};
/// `rules.queue_per_sender`: actions waiting per sender.
pub const RULES_QUEUE_PER_SENDER: Limit = Limit {
    key: "rules.queue_per_sender",
    min: 1,
    max: 1_000_000,
};
/// `rules.job_timeout`, seconds: 1 s to 1 day (as a rule's `timeout`).
pub const RULES_JOB_TIMEOUT: Limit = Limit {
    key: "rules.job_timeout",
    min: 1,
    max: 86_400,
};
/// `rules.max_waiting`: debounced actions and rate-limit windows kept.
pub const RULES_MAX_WAITING: Limit = Limit {
    key: "rules.max_waiting",
    min: 1,
    max: 1_000_000,
};
/// `backups.stale_after_hours`: 1 hour to a year.
pub const BACKUPS_STALE_AFTER_HOURS: Limit = Limit {
    key: "backups.stale_after_hours",
    min: 1,
    max: 8760,
};
/// `dispatch.debounce_ms`: quiet time after a change, up to an hour.
pub const DISPATCH_DEBOUNCE_MS: Limit = Limit {
    key: "dispatch.debounce_ms",
    min: 0,
    max: 3_600_000,
};
/// `dispatch.max_delay_ms`: cap on the wait under a stream of changes, up to a day.
pub const DISPATCH_MAX_DELAY_MS: Limit = Limit {
    key: "dispatch.max_delay_ms",
    min: 0,
    max: 86_400_000,
};
/// `dispatch.concurrency`: state runs in flight at once.
pub const DISPATCH_CONCURRENCY: Limit = Limit {
    key: "dispatch.concurrency",
    min: 1,
    max: 1024,
};
/// `dispatch.job_timeout`, seconds: 1 s to 1 day.
pub const DISPATCH_JOB_TIMEOUT: Limit = Limit {
    key: "dispatch.job_timeout",
    min: 1,
    max: 86_400,
};
/// `dispatch.retry_base_ms`: the first retry delay, 10 ms to 1 hour.
pub const DISPATCH_RETRY_BASE_MS: Limit = Limit {
    key: "dispatch.retry_base_ms",
    min: 10,
    max: 3_600_000,
};
/// `dispatch.retry_max_ms`: the longest retry delay, 10 ms to 1 day.
pub const DISPATCH_RETRY_MAX_MS: Limit = Limit {
    key: "dispatch.retry_max_ms",
    min: 10,
    max: 86_400_000,
};
/// `dispatch.drift_interval`, seconds: 0 (off) to 30 days.
pub const DISPATCH_DRIFT_INTERVAL: Limit = Limit {
    key: "dispatch.drift_interval",
    min: 0,
    max: 2_592_000,
};
/// `exec.timeout`, seconds: 1 s to 1 day.
/// `cluster.heartbeat_secs`.
pub const CLUSTER_HEARTBEAT_SECS: Limit = Limit {
    key: "cluster.heartbeat_secs",
    min: 1,
    max: 60,
};
/// `cluster.dead_after_beats`.
pub const CLUSTER_DEAD_AFTER_BEATS: Limit = Limit {
    key: "cluster.dead_after_beats",
    min: 2,
    max: 100,
};
/// `cluster.lease_secs`.
pub const CLUSTER_LEASE_SECS: Limit = Limit {
    key: "cluster.lease_secs",
    min: 5,
    max: 3_600,
};
pub const EXEC_TIMEOUT: Limit = Limit {
    key: "exec.timeout",
    min: 1,
    max: 86_400,
};
/// `keys.bits`: what [`crate::pki::keys::KeyPair::generate`] accepts.
pub const KEYS_BITS: Limit = Limit {
    key: "keys.bits",
    min: MIN_BITS as u64,
    max: MAX_BITS as u64,
};
/// `keys.pool_size`: pairs kept generated (0: none).
pub const KEYS_POOL_SIZE: Limit = Limit {
    key: "keys.pool_size",
    min: 0,
    max: 1024,
};
/// The port of a `masters` entry written `host:port`.
pub const MASTERS_PORT: Limit = Limit {
    key: "masters",
    min: 1,
    max: 65_535,
};

/// `http.session_idle_minutes`.
pub const HTTP_SESSION_IDLE_MINUTES: Limit = Limit {
    key: "http.session_idle_minutes",
    min: 1,
    max: 1_440,
};

/// `http.session_absolute_hours`.
pub const HTTP_SESSION_ABSOLUTE_HOURS: Limit = Limit {
    key: "http.session_absolute_hours",
    min: 1,
    max: 720,
};

/// `http.login_failures_per_minute`.
pub const HTTP_LOGIN_FAILURES: Limit = Limit {
    key: "http.login_failures_per_minute",
    min: 1,
    max: 1_000,
};

/// `http.request_timeout` (seconds).
pub const HTTP_REQUEST_TIMEOUT: Limit = Limit {
    key: "http.request_timeout",
    min: 1,
    max: 600,
};

/// `http.max_body_bytes`.
pub const HTTP_MAX_BODY_BYTES: Limit = Limit {
    key: "http.max_body_bytes",
    min: 1_024,
    max: 64 * 1024 * 1024,
};

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
    /// The inventory dispatcher (states applied when the inventory changes).
    #[serde(default)]
    pub dispatch: DispatchConfig,
    /// Exec translation: who may run which functions on a server by name.
    #[serde(default)]
    pub exec: ExecConfig,
    /// Samba shares (`salt-steward share …`).
    #[serde(default)]
    pub shares: SharesConfig,
    /// Several daemons (one per master) on one registry.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Backups: default levels, when a backup turns red.
    #[serde(default)]
    pub backups: BackupsConfig,
    /// Minion keys: where they are kept, their size, how they are accepted.
    #[serde(default)]
    pub keys: KeysConfig,
    /// The masters a server's bundle lists (`host` or `host:port`, port 1 to
    /// 65535); empty: this master.
    #[serde(default)]
    pub masters: Vec<String>,
    /// Where the daemon serves `GET /metrics` (Prometheus text format), an
    /// `IP:port` on a loopback address (the endpoint has no authentication;
    /// put a reverse proxy in front to expose it). Default: off.
    pub metrics_listen: Option<SocketAddr>,
    /// The HTTP API (`/api/v1`). Default: off.
    #[serde(default)]
    pub http: HttpConfig,
}

/// `http:` section: the REST API (`api::http`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `IP:port` to serve on; loopback only unless `allow_non_loopback`.
    /// Default: off.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Allows a non-loopback `listen`. The daemon speaks plain HTTP: put a
    /// TLS reverse proxy in front instead whenever possible. Default false.
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// The session cookie's Secure flag. Default true.
    #[serde(default = "default_true")]
    pub cookie_secure: bool,
    /// Minutes a session may stay unused. Default 30; 1 to 1440.
    #[serde(default = "default_session_idle")]
    pub session_idle_minutes: u64,
    /// Hours a session lasts from login. Default 12; 1 to 720.
    #[serde(default = "default_session_absolute")]
    pub session_absolute_hours: u64,
    /// Failed logins per minute per client address and per user name before
    /// 429. Default 5; 1 to 1000.
    #[serde(default = "default_login_failures")]
    pub login_failures_per_minute: u64,
    /// Seconds a request may take. Default 30; 1 to 600.
    #[serde(default = "default_http_timeout")]
    pub request_timeout: u64,
    /// Largest request body in bytes. Default 1 MiB; 1024 to 64 MiB.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: None,
            allow_non_loopback: false,
            cookie_secure: true,
            session_idle_minutes: default_session_idle(),
            session_absolute_hours: default_session_absolute(),
            login_failures_per_minute: default_login_failures(),
            request_timeout: default_http_timeout(),
            max_body_bytes: default_max_body(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_session_idle() -> u64 {
    30
}
fn default_session_absolute() -> u64 {
    12
}
fn default_login_failures() -> u64 {
    5
}
fn default_http_timeout() -> u64 {
    30
}
fn default_max_body() -> u64 {
    1024 * 1024
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// Private keys of issued pairs (0700 dir, 0600 files) and the pool.
    #[serde(default = "default_keys_dir")]
    pub dir: PathBuf,
    /// RSA size of issued minion keys. Default 2048; 2048 to 8192.
    #[serde(default = "default_bits")]
    pub bits: usize,
    /// Pre-generated pairs the daemon keeps ready. Default 8; 0 to 1024.
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// Events buffered per consumer before the oldest are dropped (counted).
    /// Default 16384; 16 to 1048576.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// Largest event accepted, in bytes; bigger ones are dropped. Default
    /// 64 MiB; 4096 (4 KiB) to 1073741824 (1 GiB).
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Rule actions (jobs) running at once, all senders together. Default 8; 1 to 1024.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Actions waiting per sender (a minion, or the master) before more are
    /// dropped (counted). Default 1000; 1 to 1000000.
    #[serde(default = "default_queue_per_sender")]
    pub queue_per_sender: usize,
    /// Seconds a job's returns are waited for, unless the rule sets `timeout`.
    /// Default 300; 1 to 86400 (a day).
    #[serde(default = "default_job_timeout")]
    pub job_timeout: u64,
    /// Debounced actions waiting at once (and rate-limit windows kept) before
    /// more are dropped (counted). Default 10000; 1 to 1000000.
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

/// `dispatch:` section: the inventory dispatcher (`dispatch::inventory`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchConfig {
    /// Quiet time after a change before its targets run, so a burst becomes
    /// one run per target. Default 2000; 0 to 3600000.
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
    /// Longest wait under a steady stream of changes. Default 30000; 0 to 86400000.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// State runs in flight at once, all targets together. Default 8; 1 to 1024.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Seconds a run's return is waited for. Default 300; 1 to 86400.
    #[serde(default = "default_job_timeout")]
    pub job_timeout: u64,
    /// Delay before the first retry of a failed run, doubled for each
    /// further failure. Default 5000; 10 to 3600000.
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    /// Longest delay between retries. Default 600000 (10 min); 10 to 86400000.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Seconds between drift repairs: every applied target is applied again
    /// this long after its last run (hand edits undone). 0 (default): off;
    /// up to 2592000 (30 days).
    #[serde(default)]
    pub drift_interval: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            debounce_ms: default_debounce_ms(),
            max_delay_ms: default_max_delay_ms(),
            concurrency: default_concurrency(),
            job_timeout: default_job_timeout(),
            retry_base_ms: default_retry_base_ms(),
            retry_max_ms: default_retry_max_ms(),
            drift_interval: 0,
        }
    }
}

fn default_debounce_ms() -> u64 {
    2000
}

fn default_max_delay_ms() -> u64 {
    30_000
}

fn default_retry_base_ms() -> u64 {
    5000
}

fn default_retry_max_ms() -> u64 {
    600_000
}

/// `exec:` section: exec translation (`salt-steward exec`, the bus's
/// `steward/v1/server/exec`), which is remote execution, so allow-listed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// Function globs the master (`salt-run event.send`) and the CLI may run.
    /// Default `["*"]`: everything.
    #[serde(default = "default_exec_master")]
    pub master: Vec<String>,
    /// Per trusted minion id (or id glob), the function globs it may run.
    /// Default none: minions run nothing.
    #[serde(default)]
    pub minions: std::collections::BTreeMap<String, Vec<String>>,
    /// Seconds a return is waited for. Default 60; 1 to 86400.
    #[serde(default = "default_exec_timeout")]
    pub timeout: u64,
}

impl Default for ExecConfig {
    fn default() -> Self {
        Self {
            master: default_exec_master(),
            minions: Default::default(),
            timeout: default_exec_timeout(),
        }
    }
}

fn default_exec_master() -> Vec<String> {
    vec!["*".to_owned()]
}

fn default_exec_timeout() -> u64 {
    60
}

/// `shares:` section: samba shares (`salt-steward share`, `steward.share`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharesConfig {
    /// A share's system user is this prefix + the lower-cased share name
    /// (32 characters at most in all). Empty, or `[a-z][a-z0-9_-]*`. Default
    /// `smb-`.
    #[serde(default = "default_share_user_prefix")]
    pub user_prefix: String,
}

impl Default for SharesConfig {
    fn default() -> Self {
        Self {
            user_prefix: default_share_user_prefix(),
        }
    }
}

fn default_share_user_prefix() -> String {
    crate::registry::shares::DEFAULT_USER_PREFIX.to_owned()
}

/// `cluster:` section: several daemons, one per master, on one (PostgreSQL)
/// registry. One daemon on SQLite needs none of it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This daemon's id among the daemons of the registry. Default: the
    /// master's id (one daemon per master).
    #[serde(default)]
    pub daemon_id: Option<String>,
    /// The id of the master this daemon serves, as recorded for the minions
    /// seen on it. Default `<host name>:<ret_port>`.
    #[serde(default)]
    pub master_id: Option<String>,
    /// Seconds between heartbeats. Default 5; 1 to 60.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// A daemon is seen dead after this many missed heartbeats. Default 3;
    /// 2 to 100.
    #[serde(default = "default_dead_after_beats")]
    pub dead_after_beats: u64,
    /// Seconds a singleton chore's lease (outbox pruning, drift repair, the
    /// full key-sync sweep) lasts unless renewed: how long the chores pause
    /// when their holder dies. Default 30; 5 to 3600.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            daemon_id: None,
            master_id: None,
            heartbeat_secs: default_heartbeat_secs(),
            dead_after_beats: default_dead_after_beats(),
            lease_secs: default_lease_secs(),
        }
    }
}

impl ClusterConfig {
    /// Between heartbeats.
    pub fn heartbeat(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.heartbeat_secs)
    }

    /// A daemon silent this long (ms) is dead: `dead_after_beats` beats.
    pub fn dead_after_ms(&self) -> i64 {
        i64::try_from(self.heartbeat_secs.saturating_mul(self.dead_after_beats))
            .unwrap_or(i64::MAX)
            .saturating_mul(1000)
    }
}

/// A daemon id made of `name` (`cluster.daemon_id`'s characters: lower-case
/// letters, digits, `_` and `-`; anything else becomes `-`; 48 at most).
pub fn daemon_id_of(name: &str) -> String {
    let id: String = name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(DAEMON_ID_MAX)
        .collect();
    if id.is_empty() {
        "daemon".to_owned()
    } else {
        id
    }
}

/// The longest `cluster.daemon_id` (its notifier's outbox consumer is
/// `notify-<id>`).
pub const DAEMON_ID_MAX: usize = 48;

fn default_heartbeat_secs() -> u64 {
    5
}

fn default_dead_after_beats() -> u64 {
    3
}

fn default_lease_secs() -> u64 {
    30
}

/// `backups:` section: backups (`salt-steward backup …`, the dispatcher's
/// `steward.backup`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupsConfig {
    /// Levels of a backup without its own, lowest first. Default: hourly 6
    /// `0 */4 * * *`, daily 7 `30 3 * * *`, weekly 4 `0 3 * * 1`, monthly 3
    /// `30 2 1 * *`.
    #[serde(default = "crate::registry::backup::default_retain")]
    pub retain: Vec<crate::registry::backup::Retain>,
    /// A backup is red when its last success is older than this. Default
    /// 26; 1 to 8760.
    #[serde(default = "default_stale_after_hours")]
    pub stale_after_hours: u64,
}

impl Default for BackupsConfig {
    fn default() -> Self {
        Self {
            retain: crate::registry::backup::default_retain(),
            stale_after_hours: default_stale_after_hours(),
        }
    }
}

impl BackupsConfig {
    /// `stale_after_hours` in milliseconds, as backups' health is judged.
    pub fn stale_after_ms(&self) -> i64 {
        i64::try_from(self.stale_after_hours)
            .unwrap_or(i64::MAX)
            .saturating_mul(3_600_000)
    }
}

fn default_stale_after_hours() -> u64 {
    26
}

/// The resolved settings the program runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub master_config: PathBuf,
    pub registry: String,
    pub rules_dir: PathBuf,
    pub trusted_minions: Vec<String>,
    pub log: LogConfig,
    pub bus: BusConfig,
    pub rules: RulesConfig,
    pub dispatch: DispatchConfig,
    pub exec: ExecConfig,
    pub backups: BackupsConfig,
    pub keys: KeysConfig,
    pub masters: Vec<String>,
    /// `shares:`.
    pub shares: SharesConfig,
    /// `cluster:`.
    pub cluster: ClusterConfig,
    /// The file these settings were read from (`None`: the defaults), read
    /// again on SIGHUP.
    pub source: Option<PathBuf>,
    /// `metrics_listen`: a loopback address, or `None` (off).
    pub metrics_listen: Option<SocketAddr>,
    /// `http:`: the REST API.
    pub http: HttpConfig,
}

impl Settings {
    /// The settings that differ in `new` and that the daemon only takes at
    /// start (named in the log on a reload); the others — `log.level`,
    /// `trusted_minions`, `exec` — are applied by the reload.
    pub fn restart_needed(&self, new: &Settings) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut differs = |key: &'static str, d: bool| {
            if d {
                out.push(key);
            }
        };
        differs("master_config", self.master_config != new.master_config);
        differs("registry", self.registry != new.registry);
        differs("log.format", self.log.format != new.log.format);
        differs("bus", self.bus != new.bus);
        differs("rules", self.rules != new.rules);
        differs("dispatch", self.dispatch != new.dispatch);
        differs("keys", self.keys != new.keys);
        differs("backups", self.backups != new.backups);
        differs("masters", self.masters != new.masters);
        differs("cluster", self.cluster != new.cluster);
        differs("shares", self.shares != new.shares);
        differs("http", self.http != new.http);
        out
    }

    /// The key issuer the `keys` settings describe. In preseed mode it needs
    /// the master's pki_dir, and refuses a master whose key cache is not the
    /// plain files (3007's `keys.cache_driver`), where a written file would
    /// not be seen.
    pub fn key_issuer(&self) -> anyhow::Result<KeyIssuer> {
        use anyhow::Context as _;
        let keys = &self.keys;
        let issuer = KeyIssuer::new(&keys.dir, keys.bits)
            .with_context(|| format!("keys.dir {}", keys.dir.display()))?;
        if keys.accept_mode != AcceptMode::Preseed {
            return Ok(issuer);
        }
        let master = MasterConfig::load(&self.master_config)?;
        if master.keys_cache_driver != "localfs_key" {
            anyhow::bail!(
                "keys.accept_mode preseed needs the master's keys in plain files, but {} sets \
                 keys.cache_driver: {}; use accept_mode: verify",
                master.path.display(),
                master.keys_cache_driver
            );
        }
        Ok(issuer.with_preseed(&master.pki_dir))
    }

    /// Reads `path`, or the default file if `path` is `None` (a missing
    /// default file means all defaults; a missing explicit one is an error).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let source = match path {
            Some(p) => Some(p.to_owned()),
            None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
        };
        let file = match &source {
            Some(p) => read(p)?,
            None => ConfigFile::default(),
        };
        let mut settings = Self::from_file(file);
        settings.source = source;
        Ok(settings)
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
            dispatch: f.dispatch,
            exec: f.exec,
            backups: f.backups,
            keys: f.keys,
            masters: f.masters,
            shares: f.shares,
            cluster: f.cluster,
            source: None,
            metrics_listen: f.metrics_listen,
            http: f.http,
        }
    }
}

fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file = parse(&text).map_err(|source| ConfigError::Invalid {
        path: path.to_owned(),
        source,
    })?;
    let problems = check(&file, &text);
    if problems.is_empty() {
        Ok(file)
    } else {
        Err(ConfigError::OutOfRange {
            path: path.to_owned(),
            problems,
        })
    }
}

/// Every number of `f` outside its range, as `key: value is out of range
/// (allowed MIN to MAX) at line N` (the line looked up in `text`).
fn check(f: &ConfigFile, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut number = |limit: Limit, value: u64| {
        if !(limit.min..=limit.max).contains(&value) {
            let (section, name) = limit.key.split_once('.').unwrap_or(("", limit.key));
            problems.push(format!(
                "{}: {value} is out of range (allowed {} to {}){}",
                limit.key,
                limit.min,
                limit.max,
                at_line(line_of(text, section, &format!("{name}:")))
            ));
        }
    };
    let wide = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    number(BUS_QUEUE_CAPACITY, wide(f.bus.queue_capacity));
    number(BUS_MAX_EVENT_SIZE, wide(f.bus.max_event_size));
    number(RULES_CONCURRENCY, wide(f.rules.concurrency));
    number(RULES_QUEUE_PER_SENDER, wide(f.rules.queue_per_sender));
    number(RULES_JOB_TIMEOUT, f.rules.job_timeout);
    number(RULES_MAX_WAITING, wide(f.rules.max_waiting));
    number(DISPATCH_DEBOUNCE_MS, f.dispatch.debounce_ms);
    number(DISPATCH_MAX_DELAY_MS, f.dispatch.max_delay_ms);
    number(DISPATCH_CONCURRENCY, wide(f.dispatch.concurrency));
    number(DISPATCH_JOB_TIMEOUT, f.dispatch.job_timeout);
    number(DISPATCH_RETRY_BASE_MS, f.dispatch.retry_base_ms);
    number(DISPATCH_RETRY_MAX_MS, f.dispatch.retry_max_ms);
    number(DISPATCH_DRIFT_INTERVAL, f.dispatch.drift_interval);
    number(EXEC_TIMEOUT, f.exec.timeout);
    number(CLUSTER_HEARTBEAT_SECS, f.cluster.heartbeat_secs);
    number(CLUSTER_DEAD_AFTER_BEATS, f.cluster.dead_after_beats);
    number(CLUSTER_LEASE_SECS, f.cluster.lease_secs);
    number(HTTP_SESSION_IDLE_MINUTES, f.http.session_idle_minutes);
    number(HTTP_SESSION_ABSOLUTE_HOURS, f.http.session_absolute_hours);
    number(HTTP_LOGIN_FAILURES, f.http.login_failures_per_minute);
    number(HTTP_REQUEST_TIMEOUT, f.http.request_timeout);
    number(HTTP_MAX_BODY_BYTES, f.http.max_body_bytes);
    number(BACKUPS_STALE_AFTER_HOURS, f.backups.stale_after_hours);
    number(KEYS_BITS, wide(f.keys.bits));
    number(KEYS_POOL_SIZE, wide(f.keys.pool_size));
    if let Some(id) = &f.cluster.daemon_id {
        if id.is_empty() || id.len() > DAEMON_ID_MAX || daemon_id_of(id) != *id {
            problems.push(format!(
                "cluster.daemon_id: {id:?} is not 1 to {DAEMON_ID_MAX} characters of a-z, 0-9, _ and -{}",
                at_line(line_of(text, "cluster", "daemon_id:"))
            ));
        }
    }
    if let Some(m) = &f.cluster.master_id {
        if m.is_empty() || m.len() > 255 || m.chars().any(char::is_whitespace) {
            problems.push(format!(
                "cluster.master_id: {m:?} is not 1 to 255 characters without spaces{}",
                at_line(line_of(text, "cluster", "master_id:"))
            ));
        }
    }
    if let Err(e) = crate::registry::backup::validate_retain(&f.backups.retain) {
        problems.push(format!(
            "backups.retain: {e}{}",
            at_line(line_of(text, "backups", "retain:"))
        ));
    }
    for (i, master) in f.masters.iter().enumerate() {
        let Some(port) = master_port(master) else {
            continue;
        };
        let ok = port
            .parse::<u64>()
            .is_ok_and(|p| (MASTERS_PORT.min..=MASTERS_PORT.max).contains(&p));
        if !ok {
            problems.push(format!(
                "{}[{i}]: port {port:?} of {master:?} is out of range (allowed {} to {}){}",
                MASTERS_PORT.key,
                MASTERS_PORT.min,
                MASTERS_PORT.max,
                at_line(line_of(text, "masters", master))
            ));
        }
    }
    if let Err(why) = crate::registry::shares::validate_user_prefix(&f.shares.user_prefix) {
        problems.push(format!(
            "shares.user_prefix: {why}{}",
            at_line(line_of(text, "shares", "user_prefix:"))
        ));
    }
    if let Some(addr) = f.metrics_listen {
        if !addr.ip().is_loopback() {
            problems.push(format!(
                "metrics_listen: {addr} is not a loopback address (the metrics endpoint has no \
                 authentication: listen on 127.0.0.1 or [::1] and put a reverse proxy in front \
                 to expose it){}",
                at_line(top_level_line(text, "metrics_listen"))
            ));
        }
    }
    if let Some(addr) = f.http.listen {
        if !addr.ip().is_loopback() && !f.http.allow_non_loopback {
            problems.push(format!(
                "http.listen: {addr} is not a loopback address (the daemon speaks plain HTTP: \
                 listen on 127.0.0.1 or [::1] behind a TLS reverse proxy, or set \
                 http.allow_non_loopback: true){}",
                at_line(line_of(text, "http", "listen:"))
            ));
        }
    }
    problems
}

/// The 1-based line where the top-level `key` is written, if it is.
fn top_level_line(text: &str, key: &str) -> Option<usize> {
    let header = format!("{key}:");
    text.lines()
        .position(|l| l.starts_with(&header))
        .map(|i| i + 1)
}

/// The port of `host:port` or `[v6]:port`; `None` for a bare host or IPv6 address.
fn master_port(master: &str) -> Option<&str> {
    if let Some(rest) = master.strip_prefix('[') {
        return rest.split_once("]:").map(|(_, port)| port);
    }
    match master.split_once(':') {
        Some((_, port)) if !port.contains(':') => Some(port),
        _ => None,
    }
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// The 1-based line where `needle` (`bits:`, or a list entry) is written in
/// the top-level `section` (block or flow style), or `None` if not found.
fn line_of(text: &str, section: &str, needle: &str) -> Option<usize> {
    let header = format!("{section}:");
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.starts_with(&header))?;
    let found = |line: &str| {
        line.match_indices(needle).any(|(at, _)| {
            line[..at]
                .chars()
                .next_back()
                .is_none_or(|c| c.is_whitespace() || matches!(c, '{' | '[' | ',' | '"' | '\''))
        })
    };
    if found(&lines[start][header.len()..]) {
        return Some(start + 1);
    }
    for (i, line) in lines.iter().enumerate().skip(start + 1) {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if !line.starts_with(char::is_whitespace) && !line.starts_with('-') {
            return None; // the next top-level key
        }
        if found(line) {
            return Some(i + 1);
        }
    }
    None
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
        assert_eq!(s.metrics_listen, d.metrics_listen);
        assert_eq!(s.shares, d.shares);
        assert_eq!(s.http, d.http);
    }

    #[test]
    fn http_listen_is_loopback_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, "http:\n  listen: 127.0.0.1:8467\n").unwrap();
        let s = Settings::load(Some(&p)).unwrap();
        assert_eq!(s.http.listen, Some("127.0.0.1:8467".parse().unwrap()));
        std::fs::write(&p, "log:\n  level: info\nhttp:\n  listen: 0.0.0.0:8467\n").unwrap();
        let err = Settings::load(Some(&p)).unwrap_err().to_string();
        assert!(
            err.contains("http.listen: 0.0.0.0:8467 is not a loopback address")
                && err.contains("at line 4"),
            "{err}"
        );
        std::fs::write(
            &p,
            "http:\n  listen: 0.0.0.0:8467\n  allow_non_loopback: true\n",
        )
        .unwrap();
        assert!(Settings::load(Some(&p)).is_ok());
        std::fs::write(&p, "http:\n  session_idle_minutes: 0\n  bogus: 1\n").unwrap();
        assert!(Settings::load(Some(&p)).is_err());
        std::fs::write(&p, "http:\n  session_idle_minutes: 0\n").unwrap();
        let err = Settings::load(Some(&p)).unwrap_err().to_string();
        assert!(
            err.contains("http.session_idle_minutes: 0 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn a_share_user_prefix_is_a_user_name_start() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::fs::write(&p, "shares:\n  user_prefix: smbx_\n").unwrap();
        assert_eq!(
            Settings::load(Some(&p)).unwrap().shares.user_prefix,
            "smbx_"
        );
        std::fs::write(
            &p,
            "log:\n  level: info\nshares:\n  user_prefix: \"Smb \"\n",
        )
        .unwrap();
        let err = Settings::load(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("shares.user_prefix"), "{err}");
        assert!(err.ends_with("at line 4"), "{err}");
    }

    #[test]
    fn metrics_listen_is_loopback_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        for ok in ["127.0.0.1:9467", "\"[::1]:9467\""] {
            std::fs::write(&p, format!("metrics_listen: {ok}\n")).unwrap();
            let s = Settings::load(Some(&p)).unwrap();
            assert!(s.metrics_listen.unwrap().ip().is_loopback());
        }
        std::fs::write(&p, "log:\n  level: info\nmetrics_listen: 0.0.0.0:9467\n").unwrap();
        let err = Settings::load(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("config.yaml"), "{err}");
        assert!(
            err.contains("metrics_listen: 0.0.0.0:9467 is not a loopback address"),
            "{err}"
        );
        assert!(err.ends_with("at line 3"), "{err}");
        std::fs::write(&p, "metrics_listen: localhost\n").unwrap();
        let err = Settings::load(Some(&p)).unwrap_err().to_string();
        assert!(err.contains("metrics_listen"), "{err}");
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
    fn the_defaults_are_inside_their_ranges() {
        let f = parse(EXAMPLE_CONFIG).unwrap();
        assert_eq!(check(&f, EXAMPLE_CONFIG), Vec::<String>::new());
        assert!(check(&ConfigFile::default(), "").is_empty());
    }

    #[test]
    fn out_of_range_numbers_name_the_file_key_line_and_range() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::fs::write(
            &p,
            "log:\n  level: debug\nkeys:\n  dir: /tmp/k\n  bits: 1000\nrules: {job_timeout: 0, concurrency: 2305843009213693952}\n",
        )
        .unwrap();
        let err = Settings::load(Some(&p)).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("config {}: ", p.display())),
            "{err}"
        );
        for want in [
            "keys.bits: 1000 is out of range (allowed 2048 to 8192) at line 5",
            "rules.job_timeout: 0 is out of range (allowed 1 to 86400) at line 6",
            "rules.concurrency: 2305843009213693952 is out of range (allowed 1 to 1024) at line 6",
        ] {
            assert!(err.contains(want), "missing {want:?} in {err}");
        }
    }

    #[test]
    fn every_number_is_checked() {
        let cases = [
            (
                "bus: {queue_capacity: 4294967296}",
                "bus.queue_capacity: 4294967296",
            ),
            ("bus: {queue_capacity: 0}", "bus.queue_capacity: 0"),
            ("bus: {max_event_size: 100}", "bus.max_event_size: 100"),
            ("rules: {concurrency: 0}", "rules.concurrency: 0"),
            ("rules: {queue_per_sender: 0}", "rules.queue_per_sender: 0"),
            (
                "rules: {job_timeout: 18446744073709551615}",
                "rules.job_timeout: 18446744073709551615",
            ),
            ("rules: {max_waiting: 0}", "rules.max_waiting: 0"),
            ("keys: {bits: 16384}", "keys.bits: 16384"),
            ("keys: {pool_size: 100000}", "keys.pool_size: 100000"),
            (
                "masters: [\"m1:99999\"]",
                "masters[0]: port \"99999\" of \"m1:99999\"",
            ),
            (
                "masters:\n  - m1\n  - \"[::1]:0\"",
                "masters[1]: port \"0\"",
            ),
            ("masters: [\"m1:x\"]", "masters[0]: port \"x\""),
        ];
        for (text, want) in cases {
            let f = parse(text).unwrap();
            let problems = check(&f, text);
            assert_eq!(problems.len(), 1, "{text}: {problems:?}");
            assert!(problems[0].starts_with(want), "{text}: {problems:?}");
            assert!(problems[0].contains("(allowed "), "{text}: {problems:?}");
            assert!(
                problems[0].ends_with(" at line 1") || problems[0].ends_with(" at line 3"),
                "{text}: {problems:?}"
            );
        }
        // Numbers that do not fit the field are serde's errors, with the key.
        let err = parse("keys: {bits: -1}").unwrap_err().to_string();
        assert!(err.contains("keys.bits"), "{err}");
        // Ports that are not written, and bare IPv6 addresses, are fine.
        let text = "masters: [m1, \"m2:4506\", \"::1\", \"[::1]:4506\"]";
        assert!(check(&parse(text).unwrap(), text).is_empty());
    }

    #[test]
    fn lines_are_found_in_block_and_flow_style() {
        let text = "# bits: 1\nkeys:\n  # bits: 2\n  dir: /k\n  bits: 3\nbus: {max_event_size: 9, queue_capacity: 1}\n";
        assert_eq!(line_of(text, "keys", "bits:"), Some(5));
        assert_eq!(line_of(text, "bus", "queue_capacity:"), Some(6));
        assert_eq!(line_of(text, "keys", "pool_size:"), None);
        assert_eq!(line_of(text, "rules", "concurrency:"), None);
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
