//! Several daemons on one registry (issue #16): each daemon's heartbeat,
//! leases with a fencing epoch, and where each minion was last seen.
//!
//! Every time here is read from the database's clock (milliseconds since
//! the epoch), never from a daemon's, so daemons whose clocks drift still
//! agree on who is alive and when a lease expires. SQL in
//! `registry::store::cluster` (`ClusterStore`, both backends from one body).
//!
//! A lease is a row, not a session advisory lock: it works behind a
//! connection pooler and on SQLite, survives a reconnect, and its `epoch`
//! (one more at every new tenure) is the fencing token a holder's writes
//! carry, so a holder that stalled past its expiry cannot overwrite its
//! successor's work.

use serde::Serialize;

/// A daemon as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DaemonInfo {
    /// Its id (`cluster.daemon_id`).
    pub id: String,
    /// The master it serves (its request server's address).
    pub master: String,
    /// The salt-steward version it runs.
    pub version: String,
    /// When it started (database clock, ms).
    pub started_at: i64,
    /// Its last heartbeat (database clock, ms).
    pub heartbeat_at: i64,
}

impl DaemonInfo {
    /// Alive at database time `now`: a heartbeat within `dead_after_ms`.
    pub fn alive(&self, now: i64, dead_after_ms: i64) -> bool {
        now.saturating_sub(self.heartbeat_at) <= dead_after_ms
    }
}

/// A lease as granted: `holder` has it until `expires_at`, in tenure `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    /// What it guards (`chore/prune`, …).
    pub name: String,
    /// The daemon holding it.
    pub holder: String,
    /// The tenure: one more each time the lease changes hands or lapses.
    pub epoch: i64,
    /// When this tenure began (database clock, ms).
    pub acquired_at: i64,
    /// When it lapses unless renewed (database clock, ms).
    pub expires_at: i64,
}

/// How a minion was seen on a master's bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SeenBy {
    /// `salt/minion/<id>/start`: it (re)connected to that master.
    Start,
    /// `salt/auth` accepted: it authenticated there.
    Auth,
    /// `salt/job/<jid>/ret/<id>`: its return arrived there.
    Return,
}

impl SeenBy {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            SeenBy::Start => "start",
            SeenBy::Auth => "auth",
            SeenBy::Return => "return",
        }
    }
}

/// Where a minion was last seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Presence {
    /// The minion.
    pub minion_id: String,
    /// The master whose bus saw it.
    pub master: String,
    /// The daemon that recorded it.
    pub daemon_id: String,
    /// How (`start`, `auth`, `return`).
    pub seen_by: String,
    /// When (database clock, ms).
    pub seen_at: i64,
}

/// A singleton chore's lease, as one daemon sees it: the chore runs where
/// the lease is held. `held` takes or renews it (at most every third of its
/// time to live, so a holder keeps it while it lives) and says whether this
/// daemon holds it now; a dead holder's lapses and the next daemon to ask
/// takes it in a new epoch. Alone on a registry, a daemon always holds it.
#[derive(Debug)]
pub struct Chore {
    name: String,
    holder: String,
    ttl_ms: i64,
    /// The lease as last granted, and when (this process's clock).
    granted: Option<(Lease, std::time::Instant)>,
    /// Alone on its registry: always held, nothing written.
    solo: bool,
}

impl Chore {
    /// Chore `name` (`chore/<what>`) as daemon `holder` runs it, its lease
    /// lasting `ttl`.
    pub fn new(name: &str, holder: &str, ttl: std::time::Duration) -> Self {
        Self {
            name: name.to_owned(),
            holder: holder.to_owned(),
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            granted: None,
            solo: false,
        }
    }

    /// The chore of a daemon alone on its registry: always held, no lease
    /// row written.
    pub fn solo(name: &str, holder: &str) -> Self {
        Self {
            solo: true,
            ..Self::new(name, holder, std::time::Duration::ZERO)
        }
    }

    /// Whether this daemon holds the lease now (taking or renewing it).
    /// A database error is "not held": the chore waits for the next turn.
    pub async fn held<S: crate::registry::store::ClusterStore>(&mut self, store: &S) -> bool {
        if self.solo {
            return true;
        }
        let renew_after =
            std::time::Duration::from_millis(u64::try_from(self.ttl_ms / 3).unwrap_or(0));
        if let Some((_, at)) = &self.granted {
            if at.elapsed() < renew_after {
                return true;
            }
        }
        let asked = std::time::Instant::now();
        match store
            .lease_acquire(&self.name, &self.holder, self.ttl_ms)
            .await
        {
            Ok(Some(lease)) => {
                let new_tenure = self
                    .granted
                    .as_ref()
                    .is_none_or(|(l, _)| l.epoch != lease.epoch);
                if new_tenure {
                    tracing::info!(message = "Chore lease taken.", chore = %self.name, daemon_id = %self.holder, epoch = lease.epoch);
                }
                self.granted = Some((lease, asked));
                true
            }
            Ok(None) => {
                if self.granted.take().is_some() {
                    tracing::warn!(message = "Chore lease lost to another daemon.", chore = %self.name, daemon_id = %self.holder);
                }
                false
            }
            Err(error) => {
                tracing::warn!(message = "Chore lease not renewed; the chore waits.", chore = %self.name, daemon_id = %self.holder, %error);
                self.granted = None;
                false
            }
        }
    }

    /// Lets the lease lapse now (a clean stop), so the next daemon takes it
    /// at once.
    pub async fn release<S: crate::registry::store::ClusterStore>(&mut self, store: &S) {
        if let Some((lease, _)) = self.granted.take() {
            if let Err(error) = store
                .lease_release(&self.name, &self.holder, lease.epoch)
                .await
            {
                tracing::warn!(message = "Chore lease not released; it lapses by itself.", chore = %self.name, %error);
            }
        }
    }
}
