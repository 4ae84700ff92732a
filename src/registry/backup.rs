//! Backups: a backup server (the destination) pulls a source server's
//! folder over SSH into rotating snapshots (`steward.backup` on the
//! destination, `steward.backup_source` on the source), and the results its
//! wrapper reports.
//!
//! The records and their validation (the rules `salt-states/README.md`
//! states for the pillars, checked here first so a bad backup is refused
//! before anything is written or dispatched); the SQL is in
//! `store/backup.rs`, the operations in `service/backups.rs`. Migration 0009
//! keeps one backup per destination folder of a server in the database.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::dispatch::StateKind;
use super::Error;

/// The SSH port when none is given.
pub const DEFAULT_SSH_PORT: u16 = 22;
/// The SSH user when none is given.
pub const DEFAULT_SSH_USER: &str = "root";
/// Longest folder accepted.
const MAX_FOLDER: usize = 1024;
/// Most excludes of one backup.
const MAX_EXCLUDES: usize = 256;

/// The report prefix of `steward.backup` (last line of its comment).
pub const BACKUP_REPORT: &str = "steward.backup report: ";
/// The report prefix of `steward.backup_source`.
pub const SOURCE_REPORT: &str = "steward.backup_source report: ";
/// The report prefix of `steward.backup.run`.
pub const RUN_REPORT: &str = "steward.backup.run report: ";
/// The tag the wrapper's result event is sent on.
pub const RESULT_TAG: &str = "steward/v1/backup/result";

/// One snapshot level: how many are kept and when it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retain {
    /// Level name (letters and digits, not `sync`).
    pub level: String,
    /// Snapshots kept.
    pub count: u32,
    /// When it runs: five cron fields.
    pub cron: String,
}

/// The retention used when neither the backup nor the config says:
/// every 4 hours ×6, daily ×7, weekly ×4, monthly ×3.
pub fn default_retain() -> Vec<Retain> {
    let r = |level: &str, count, cron: &str| Retain {
        level: level.to_owned(),
        count,
        cron: cron.to_owned(),
    };
    vec![
        r("hourly", 6, "0 */4 * * *"),
        r("daily", 7, "30 3 * * *"),
        r("weekly", 4, "0 3 * * 1"),
        r("monthly", 3, "30 2 1 * *"),
    ]
}

/// A backup as the registry keeps it, with what the dispatcher needs of its
/// two servers (read with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// Assigned by the registry.
    pub id: i64,
    /// The server backed up (server id).
    pub source_id: i64,
    /// Its name.
    pub source: String,
    /// The folder backed up (absolute).
    pub source_folder: String,
    /// The backup server (server id).
    pub dest_id: i64,
    /// Its name.
    pub dest: String,
    /// Its minion id (where `steward.backup` runs).
    pub dest_minion_id: String,
    /// The snapshot root on the backup server (absolute, dedicated).
    pub dest_folder: String,
    /// rsync patterns, relative to the source folder.
    pub excludes: Vec<String>,
    /// Also exclude /proc and /sys (for a source folder `/`).
    pub exclude_proc_sys: bool,
    /// Scheduled (false: configured, not in cron).
    pub active: bool,
    /// Levels; `None`: the configured default (`backups.retain`).
    pub retain: Option<Vec<Retain>>,
    /// Address the backup server reaches the source at; `None`: its IP.
    pub ssh_host: Option<String>,
    /// SSH port on the source.
    pub ssh_port: u16,
    /// SSH user on the source.
    pub ssh_user: String,
    /// The source's addresses (internal first), for a `None` ssh_host.
    pub source_ips: Vec<IpAddr>,
    /// The source's SSH host keys as last reported (`type base64`).
    pub source_host_keys: Vec<String>,
    /// The backup server's SSH public key as last reported.
    pub dest_pubkey: Option<String>,
    /// Until when a run started by `backup run` may still be going (Unix
    /// ms); `None` when none was started or it ended.
    #[serde(default)]
    pub running_until: Option<i64>,
    /// Incremented by every write.
    pub revision: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
}

impl Backup {
    /// Whether a run started by `backup run` is going on at `now_ms`.
    pub fn running(&self, now_ms: i64) -> bool {
        self.running_until.is_some_and(|t| t > now_ms)
    }

    /// The host the backup server connects to: `ssh_host`, else the
    /// source's first IPv4 address (the state takes names or IPv4).
    pub fn host(&self) -> Option<String> {
        self.ssh_host.clone().or_else(|| {
            self.source_ips
                .iter()
                .find(|ip| ip.is_ipv4())
                .map(|ip| ip.to_string())
        })
    }
}

impl fmt::Display for Backup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backup #{} ({}:{} → {}:{})",
            self.id, self.source, self.source_folder, self.dest, self.dest_folder
        )
    }
}

/// How a run ended (the wrapper's classification).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// rsync exit 0.
    Ok,
    /// Files vanished during the run (rsync 24); kept and rotated.
    Warning,
    /// Partial transfer (rsync 23), also a missing source folder.
    Attention,
    /// Anything else: nothing rotated.
    Error,
    /// A higher level whose lower one is not full yet.
    InsufficientHistory,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Warning,
        Outcome::Attention,
        Outcome::Error,
        Outcome::InsufficientHistory,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Warning => "warning",
            Outcome::Attention => "attention",
            Outcome::Error => "error",
            Outcome::InsufficientHistory => "insufficient_history",
        }
    }

    /// A run that produced a usable snapshot.
    pub fn succeeded(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Warning)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| Error::invalid("outcome", format!("{s:?} is not a backup outcome")))
    }
}

/// One run of a backup, as its wrapper reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupResult {
    /// The backup.
    pub backup_id: i64,
    /// The wrapper's id of the run (a result is recorded once).
    pub run_id: String,
    /// The level run.
    pub level: String,
    /// Start, Unix milliseconds.
    pub started_at: i64,
    /// How long it took.
    pub duration_ms: i64,
    /// How it ended.
    pub outcome: Outcome,
    /// rsync's "Number of files".
    pub files: Option<i64>,
    /// rsync's "Total file size", bytes.
    pub size: Option<i64>,
    /// rsync's "Total transferred file size", bytes.
    pub transferred: Option<i64>,
    /// rsync's exit code.
    pub rsync_exit: Option<i64>,
    /// Why it failed (empty when it did not).
    pub error: String,
    /// When the registry got it, Unix milliseconds (0 before).
    pub received_at: i64,
}

impl BackupResult {
    /// Reads the wrapper's result JSON (`files/run.py`: `backup_id`,
    /// `run_id`, `level`, `started` (s), `duration_s`, `outcome`,
    /// `rsync_exit`, `files`, `size`, `transferred`, `error`); extra keys
    /// (Salt's `__pub_*`) are ignored.
    pub fn from_wrapper(v: &Json) -> Result<Self, String> {
        let m = v.as_object().ok_or("the result is not a map")?;
        let int = |k: &str| -> Result<Option<i64>, String> {
            match m.get(k) {
                None | Some(Json::Null) => Ok(None),
                Some(x) => x
                    .as_i64()
                    .or_else(|| x.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
                    .map(Some)
                    .ok_or_else(|| format!("{k} is not a number: {x}")),
            }
        };
        let text = |k: &str| -> Result<String, String> {
            m.get(k)
                .and_then(Json::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("{k} missing or not text"))
        };
        let secs = |k: &str| -> Result<i64, String> {
            m.get(k)
                .and_then(Json::as_f64)
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < 1e12)
                .map(|f| (f * 1000.0).round() as i64)
                .ok_or_else(|| format!("{k} missing or not seconds"))
        };
        let backup_id = int("backup_id")?.ok_or("backup_id missing")?;
        let run_id = text("run_id")?;
        if run_id.is_empty()
            || run_id.len() > 64
            || !run_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(format!("run_id {run_id:?} is not a run id"));
        }
        let level = text("level")?;
        validate_level(&level).map_err(|e| e.to_string())?;
        let outcome: Outcome = text("outcome")?.parse().map_err(|e: Error| e.to_string())?;
        let mut error = m
            .get("error")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_owned();
        if error.len() > 4096 {
            error = error.chars().take(4096).collect();
        }
        Ok(Self {
            backup_id,
            run_id,
            level,
            started_at: secs("started")?,
            duration_ms: secs("duration_s")?,
            outcome,
            files: int("files")?,
            size: int("size")?,
            transferred: int("transferred")?,
            rsync_exit: int("rsync_exit")?,
            error,
            received_at: 0,
        })
    }
}

/// A backup with its health and its last result (`Service::backups_with_health`).
pub type WithHealth = (Backup, Health, Option<BackupResult>);

/// Green or red, as the dashboard shows a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// The last success is recent enough and copied something.
    Green,
    /// No recent success with data.
    Red,
    /// No result yet.
    NeverRun,
    /// A run is going on now.
    Running,
}

impl Health {
    /// Every health, in the order shown.
    pub const ALL: [Health; 4] = [
        Health::Green,
        Health::Red,
        Health::NeverRun,
        Health::Running,
    ];

    /// The shown name.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Green => "green",
            Health::Red => "red",
            Health::NeverRun => "never run",
            Health::Running => "running",
        }
    }

    /// `results` newest first; `stale_after_ms`: how old the last success
    /// may be; `running`: a run is in flight now.
    pub fn of(results: &[BackupResult], now_ms: i64, stale_after_ms: i64, running: bool) -> Self {
        if running {
            return Health::Running;
        }
        if results.is_empty() {
            return Health::NeverRun;
        }
        let good = results
            .iter()
            .find(|r| r.outcome.succeeded())
            .is_some_and(|r| {
                r.size.unwrap_or(0) > 0
                    && now_ms.saturating_sub(r.started_at.saturating_add(r.duration_ms))
                        <= stale_after_ms
            });
        if good {
            Health::Green
        } else {
            Health::Red
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backup change as the outbox records it: the backup and the
/// (server, state) targets it affects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupChange {
    /// The backup after the change (as it was, for a deletion).
    #[serde(flatten)]
    pub backup: Backup,
    /// Targets affected: the destination's `backup`, the source's `backup_source`.
    pub targets: Vec<(i64, StateKind)>,
}

/// A key learnt from a state's report (`backup.keys`): the server and the
/// targets that must be applied again with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeysChange {
    /// The server whose key changed.
    pub server_id: i64,
    /// `backup_pubkey` or `ssh_host_keys`.
    pub key: String,
    /// Targets to apply again.
    pub targets: Vec<(i64, StateKind)>,
}

/// A folder: absolute, of `[A-Za-z0-9._/@+,:=~%-]`, no `..` segment (it
/// goes into an ssh forced command, rsnapshot's config and cron).
pub fn validate_folder(field: &str, folder: &str) -> Result<String, Error> {
    let ok = folder.starts_with('/')
        && folder.len() <= MAX_FOLDER
        && folder.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'_' | b'/' | b'@' | b'+' | b',' | b':' | b'=' | b'~' | b'%' | b'-'
                )
        });
    if !ok {
        return Err(Error::invalid(
            field,
            format!(
                "{folder:?} is not an absolute folder of letters, digits and ._/@+,:=~%- \
                 (at most {MAX_FOLDER} characters)"
            ),
        ));
    }
    if folder.split('/').any(|s| s == "..") {
        return Err(Error::invalid(
            field,
            format!("{folder:?} has a .. segment"),
        ));
    }
    Ok(normalise(folder))
}

/// `/a//b/./c/` → `/a/b/c` (what comparisons of destinations use).
fn normalise(folder: &str) -> String {
    let parts: Vec<&str> = folder
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

/// Whether two normalised folders are equal or one is inside the other.
pub fn nested(a: &str, b: &str) -> bool {
    let inside = |x: &str, y: &str| {
        y == "/" || x == y || x.strip_prefix(y).is_some_and(|r| r.starts_with('/'))
    };
    inside(a, b) || inside(b, a)
}

/// An exclude: an rsync pattern relative to the source folder, one line,
/// no `..` segment, the folder's characters plus `*?[]`.
pub fn validate_exclude(pattern: &str) -> Result<String, Error> {
    let ok = !pattern.is_empty()
        && pattern.len() <= MAX_FOLDER
        && pattern.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'_'
                        | b'/'
                        | b'@'
                        | b'+'
                        | b','
                        | b':'
                        | b'='
                        | b'~'
                        | b'%'
                        | b'-'
                        | b'*'
                        | b'?'
                        | b'['
                        | b']'
                )
        })
        && !pattern.split('/').any(|s| s == "..");
    if ok {
        Ok(pattern.to_owned())
    } else {
        Err(Error::invalid(
            "exclude",
            format!(
                "{pattern:?} is not an rsync pattern of letters, digits and ._/@+,:=~%-*?[] \
                 without .."
            ),
        ))
    }
}

/// The excludes of one backup.
pub fn validate_excludes(patterns: &[String]) -> Result<Vec<String>, Error> {
    if patterns.len() > MAX_EXCLUDES {
        return Err(Error::invalid(
            "exclude",
            format!("{} excludes, at most {MAX_EXCLUDES}", patterns.len()),
        ));
    }
    patterns.iter().map(|p| validate_exclude(p)).collect()
}

/// The SSH host: a host name (RFC 1123) or an IPv4 address.
pub fn validate_ssh_host(host: &str) -> Result<String, Error> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return if ip.is_ipv4() {
            Ok(ip.to_string())
        } else {
            Err(Error::invalid(
                "ssh_host",
                format!("{host:?}: IPv6 addresses are not supported (a name or IPv4)"),
            ))
        };
    }
    super::service::validate_hostname(host).map_err(|e| Error::invalid("ssh_host", e.to_string()))
}

/// The SSH user: what `useradd` accepts.
pub fn validate_ssh_user(user: &str) -> Result<String, Error> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && user
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(user.to_owned())
    } else {
        Err(Error::invalid(
            "ssh_user",
            format!("{user:?} is not a user name"),
        ))
    }
}

/// A level name: letters and digits, not `sync`.
pub fn validate_level(level: &str) -> Result<(), Error> {
    if level.is_empty()
        || level.len() > 32
        || !level.bytes().all(|b| b.is_ascii_alphanumeric())
        || level == "sync"
    {
        return Err(Error::invalid(
            "retain",
            format!("level {level:?} is not letters and digits (and not sync)"),
        ));
    }
    Ok(())
}

/// A retention: at least one level, unique names, counts ≥ 1 (≥ 2 for the
/// lowest when there are several), five cron fields each.
pub fn validate_retain(levels: &[Retain]) -> Result<(), Error> {
    if levels.is_empty() || levels.len() > 16 {
        return Err(Error::invalid("retain", "1 to 16 levels"));
    }
    for (i, r) in levels.iter().enumerate() {
        validate_level(&r.level)?;
        if levels[..i].iter().any(|o| o.level == r.level) {
            return Err(Error::invalid(
                "retain",
                format!("level {:?} twice", r.level),
            ));
        }
        if r.count < 1 || r.count > 10_000 {
            return Err(Error::invalid(
                "retain",
                format!("{}: count {} is not 1 to 10000", r.level, r.count),
            ));
        }
        let fields: Vec<&str> = r.cron.split_whitespace().collect();
        let cron_ok = fields.len() == 5
            && fields.iter().all(|f| {
                f.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'*' | b'/' | b',' | b'-'))
            });
        if !cron_ok {
            return Err(Error::invalid(
                "retain",
                format!("{}: cron {:?} is not five cron fields", r.level, r.cron),
            ));
        }
    }
    if levels.len() > 1 && levels[0].count < 2 {
        return Err(Error::invalid(
            "retain",
            format!(
                "the lowest level {} keeps {}: at least 2 when higher levels rotate from it",
                levels[0].level, levels[0].count
            ),
        ));
    }
    Ok(())
}

/// The JSON of the LAST line starting with `prefix` in the comments of a
/// state return (`ret`: the state results by id, as `state.apply` returns
/// them); `None` when no state reports one.
pub fn report_of(ret: &Json, prefix: &str) -> Option<Json> {
    let states = ret.as_object()?;
    states.values().find_map(|v| {
        let comment = v.get("comment").and_then(Json::as_str)?;
        comment
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|j| serde_json::from_str(j).ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn folders_are_absolute_plain_and_without_dotdot() {
        assert_eq!(validate_folder("f", "/srv//data/").unwrap(), "/srv/data");
        assert_eq!(validate_folder("f", "/").unwrap(), "/");
        for bad in ["", "srv", "./x", "/a/../b", "/a b", "/a;b", "/a\nb", "/$x"] {
            assert_eq!(
                validate_folder("f", bad).unwrap_err().code(),
                "invalid_value",
                "{bad}"
            );
        }
        assert!(nested("/b", "/b/web"));
        assert!(nested("/b/web", "/b"));
        assert!(nested("/b", "/b"));
        assert!(!nested("/b/web", "/b/web2"));
        assert!(nested("/", "/x"));
    }

    #[test]
    fn hosts_levels_and_retention() {
        assert_eq!(validate_ssh_host("127.0.0.1").unwrap(), "127.0.0.1");
        assert_eq!(validate_ssh_host("Web1.Test").unwrap(), "web1.test");
        assert!(validate_ssh_host("::1").is_err());
        assert!(validate_ssh_host("a b").is_err());
        validate_retain(&default_retain()).unwrap();
        let mut r = default_retain();
        r[0].count = 1;
        assert!(validate_retain(&r).is_err());
        let mut r = default_retain();
        r[1].level = "hourly".into();
        assert!(validate_retain(&r).is_err());
        let mut r = default_retain();
        r[2].cron = "0 3 * *".into();
        assert!(validate_retain(&r).is_err());
        assert!(validate_level("sync").is_err());
        assert!(validate_exclude("cache/").is_ok());
        assert!(validate_exclude("../x").is_err());
    }

    #[test]
    fn reports_are_read_from_the_last_comment_line() {
        let ret = json!({"cmd_|-a_|-b_|-run": {"comment": "did things\nsteward.backup report: {\"pubkey\": \"ssh-ed25519 AAA\", \"results\": []}", "result": true}});
        assert_eq!(
            report_of(&ret, BACKUP_REPORT).unwrap()["pubkey"],
            "ssh-ed25519 AAA"
        );
        assert!(report_of(&ret, SOURCE_REPORT).is_none());
        assert!(report_of(&json!(["render error"]), BACKUP_REPORT).is_none());
    }

    #[test]
    fn wrapper_results_parse_and_health_follows_them() {
        let v = json!({"backup_id": 7, "run_id": "0b5c-11", "level": "hourly",
            "started": 1700000000.5, "duration_s": 1.25, "outcome": "ok", "rsync_exit": 0,
            "files": 12, "size": 3000, "transferred": 3000, "error": "", "__pub_jid": "1"});
        let r = BackupResult::from_wrapper(&v).unwrap();
        assert_eq!(r.started_at, 1_700_000_000_500);
        assert_eq!(r.duration_ms, 1250);
        assert_eq!(r.outcome, Outcome::Ok);
        let day = 26 * 3_600_000;
        let now = r.started_at + 10_000;
        assert_eq!(
            Health::of(std::slice::from_ref(&r), now, day, false),
            Health::Green
        );
        assert_eq!(Health::of(&[], now, day, false), Health::NeverRun);
        assert_eq!(Health::of(&[], now, day, true), Health::Running);
        assert_eq!(
            Health::of(std::slice::from_ref(&r), now + 2 * day, day, false),
            Health::Red
        );
        let mut empty = r.clone();
        empty.size = Some(0);
        assert_eq!(Health::of(&[empty], now, day, false), Health::Red);
        for bad in [
            json!({"backup_id": 7}),
            json!({"backup_id": 7, "run_id": "x y", "level": "hourly", "started": 1.0, "duration_s": 0.0, "outcome": "ok"}),
            json!({"backup_id": 7, "run_id": "x", "level": "hourly", "started": 1.0, "duration_s": 0.0, "outcome": "fine"}),
        ] {
            assert!(BackupResult::from_wrapper(&bad).is_err(), "{bad}");
        }
    }
}
