//! What the inventory dispatcher keeps in the registry: per (target server,
//! state) what is wanted and what was applied, and every run.
//!
//! `desired` is the id of the last outbox entry that affected the target (so
//! it only grows), `applied` the desired revision the last successful run
//! rendered. The dispatcher (`dispatch::inventory`) applies a target when it
//! is `pending` (or `failed`) and due; everything is in the database, so a
//! daemon stopped or killed mid-run picks the work up again at start-up.
//! The SQL is in `store/dispatch.rs`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Error;

/// A state the dispatcher applies, and the server kind it targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateKind {
    /// Port forwarding (nftables) on a Proxmox host: `steward.portfwd`.
    Portfwd,
    /// Hostname forwarding (nginx) on a proxy: `steward.hostfwd`.
    Hostfwd,
    /// Samba shares on a samba-managed server: `steward.share`.
    Share,
    /// The backups a backup server pulls: `steward.backup`.
    Backup,
    /// A source's read-only keys for its backup servers: `steward.backup_source`.
    #[serde(rename = "backup_source")]
    BackupSource,
}

impl StateKind {
    /// Every state, in the order shown.
    pub const ALL: [StateKind; 5] = [
        StateKind::Portfwd,
        StateKind::Hostfwd,
        StateKind::Share,
        StateKind::Backup,
        StateKind::BackupSource,
    ];

    /// The stored name, also the pillar key under `steward:`.
    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::Portfwd => "portfwd",
            StateKind::Hostfwd => "hostfwd",
            StateKind::Share => "share",
            StateKind::Backup => "backup",
            StateKind::BackupSource => "backup_source",
        }
    }

    /// The SLS applied (`salt-states/steward/<name>/`).
    pub fn sls(self) -> &'static str {
        match self {
            StateKind::Portfwd => "steward.portfwd",
            StateKind::Hostfwd => "steward.hostfwd",
            StateKind::Share => "steward.share",
            StateKind::Backup => "steward.backup",
            StateKind::BackupSource => "steward.backup_source",
        }
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StateKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        StateKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "state",
                    format!("{s:?} is not portfwd, hostfwd, share, backup or backup_source"),
                )
            })
    }
}

/// Where a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DispatchStatus {
    /// Something changed: a run is due at `next_attempt_at`.
    Pending,
    /// A run is in flight (`last_jid`).
    Running,
    /// Applied what is wanted.
    Done,
    /// The last run failed; retried at `next_attempt_at`.
    Failed,
    /// The target's minion is not registered yet (`last_error` says why).
    Waiting,
}

impl DispatchStatus {
    /// Every status.
    pub const ALL: [DispatchStatus; 5] = [
        DispatchStatus::Pending,
        DispatchStatus::Running,
        DispatchStatus::Done,
        DispatchStatus::Failed,
        DispatchStatus::Waiting,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DispatchStatus::Pending => "pending",
            DispatchStatus::Running => "running",
            DispatchStatus::Done => "done",
            DispatchStatus::Failed => "failed",
            DispatchStatus::Waiting => "waiting",
        }
    }
}

impl fmt::Display for DispatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DispatchStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        DispatchStatus::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "dispatch status",
                    format!("{s:?} is not pending, running, done, failed or waiting"),
                )
            })
    }
}

/// One (target server, state) as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchTarget {
    /// The target server.
    pub server_id: i64,
    /// Its name.
    pub server: String,
    /// Its minion id (where the state runs).
    pub minion_id: String,
    /// Its registry status (a minion must be registered to run).
    pub server_status: String,
    /// The state.
    pub state: StateKind,
    /// The outbox id of the last change that affected the target.
    pub desired: i64,
    /// The desired revision the last successful run rendered.
    pub applied: i64,
    /// sha256 of the configuration last applied (a run whose rendering is the
    /// same is not repeated unless forced).
    pub applied_hash: Option<String>,
    /// Where it is.
    pub status: DispatchStatus,
    /// Run even if the rendering equals the applied one (retry, drift repair).
    pub forced: bool,
    /// Runs since the last success.
    pub attempts: i64,
    /// When the next run is due (Unix ms).
    pub next_attempt_at: i64,
    /// First bump of the current debounce window (Unix ms).
    pub pending_since: Option<i64>,
    /// The desired revision the run in flight rendered.
    pub running_revision: Option<i64>,
    /// When the run in flight (or the last one) started.
    pub started_at: Option<i64>,
    /// The jid of the run in flight or the last one.
    pub last_jid: Option<String>,
    /// The last run's summary (JSON text).
    pub last_summary: Option<String>,
    /// Why the last run failed, or why the target waits.
    pub last_error: Option<String>,
    /// When the configuration was last applied (Unix ms).
    pub last_applied_at: Option<i64>,
    /// Last change of this row (Unix ms).
    pub updated_at: i64,
    /// The daemon whose run is in flight (`cluster.daemon_id`).
    pub lease_holder: Option<String>,
    /// The run's fencing epoch: one more at every claim; its end is
    /// recorded only under it.
    pub lease_epoch: i64,
    /// The jid of a run whose daemon stopped or died before its end: looked
    /// up, and published again under the same jid if the minion never
    /// returned.
    pub orphan_jid: Option<String>,
    /// The master its minion was last seen on (several daemons on one
    /// registry, `minion_presence`); `None`: location unknown.
    pub location: Option<String>,
}

/// Where a daemon claims targets (several daemons on one registry): the
/// master it publishes through, and when another master's daemon counts as
/// dead (its minions are then anyone's).
#[derive(Debug, Clone)]
pub struct Here {
    /// This daemon's master (`cluster.master_id`).
    pub master_id: String,
    /// A daemon without a heartbeat for this long is dead (ms).
    pub dead_after_ms: i64,
}

/// One run of a state on a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchRun {
    /// Assigned by the registry.
    pub id: i64,
    /// The target server.
    pub server_id: i64,
    /// The state.
    pub state: StateKind,
    /// The desired revision it rendered.
    pub revision: i64,
    /// Our jid.
    pub jid: String,
    /// Unix ms.
    pub started_at: i64,
    /// Unix ms; none while in flight.
    pub finished_at: Option<i64>,
    /// `done`, `failed`, `interrupted` (the daemon stopped first); none while in flight.
    pub outcome: Option<String>,
    /// Summary (JSON text).
    pub summary: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// How a run ended, as [`Store::dispatch_finish`](super::Store::dispatch_finish) records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The state succeeded: `applied` = the rendered revision.
    Applied {
        /// sha256 of the configuration applied.
        hash: String,
        /// Summary (JSON text).
        summary: String,
    },
    /// The state failed (or the minion did not answer): retried at `retry_at`.
    Failed {
        /// What failed: the failing state's id and comment, or the job error.
        error: String,
        /// Summary (JSON text).
        summary: String,
        /// When to try again (Unix ms).
        retry_at: i64,
    },
}

/// The debounce of bumps: a run is due `debounce_ms` after the last change,
/// but never later than `max_delay_ms` after the first of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debounce {
    /// Quiet time after a change.
    pub debounce_ms: i64,
    /// Cap on the wait under a stream of changes.
    pub max_delay_ms: i64,
}
