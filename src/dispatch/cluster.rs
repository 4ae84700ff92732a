//! The cluster component: this daemon among the daemons of one registry
//! (issue #16). It beats a heartbeat into the registry (database clock),
//! notices other daemons dying and coming back (one log line each), and
//! records where minions are: a minion's own start event on this master's
//! bus (wrapped by the master with the minion's authenticated id, so it is
//! proof the minion is connected here) is a sighting on this master.
//! At a clean stop it removes its heartbeat row.
//!
//! One daemon alone on SQLite (no `cluster.daemon_id`) does none of it:
//! no heartbeat, no sightings (nobody asks where a minion is), nothing
//! written.

use std::collections::BTreeMap;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bus::{BusItem, EventKind, Subscription};
use crate::config::ClusterConfig;
use crate::master_config::MasterConfig;
use crate::registry::cluster::SeenBy;
use crate::registry::store::ClusterStore;
use crate::registry::DbStore;

/// Who this daemon is among the daemons of its registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// This daemon (`cluster.daemon_id`, default the master's id).
    pub daemon_id: String,
    /// The master it serves (`cluster.master_id`, default
    /// `<host name>:<ret_port>`), as recorded for the minions seen on it.
    pub master_id: String,
    /// Whether `cluster.daemon_id` was set: daemons meant to share a
    /// registry name themselves (and get a notifier cursor each).
    pub explicit: bool,
    /// Whether other daemons may share the registry (`daemon_id` set, or a
    /// PostgreSQL registry): then this one beats a heartbeat and runs its
    /// chores under leases. Alone on SQLite it does neither (no periodic
    /// writes, so an idle daemon stays idle).
    pub shared: bool,
}

impl Identity {
    /// From the settings, defaulting from the host's name and the master's
    /// request port; `postgres`: the registry is PostgreSQL (shareable).
    pub fn new(cfg: &ClusterConfig, master: &MasterConfig, postgres: bool) -> Self {
        let master_id = cfg
            .master_id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", host_name(), master.ret_port));
        Self {
            daemon_id: cfg
                .daemon_id
                .clone()
                .unwrap_or_else(|| crate::config::daemon_id_of(&master_id)),
            master_id,
            explicit: cfg.daemon_id.is_some(),
            shared: cfg.daemon_id.is_some() || postgres,
        }
    }
}

/// This machine's name (the kernel's), `localhost` if unreadable.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Runs the component until `cancel`: heartbeats, liveness of the others,
/// minion sightings from `events`.
pub async fn run(
    store: DbStore,
    me: Identity,
    cfg: ClusterConfig,
    mut events: Subscription,
    cancel: CancellationToken,
) {
    let version = env!("CARGO_PKG_VERSION");
    let dead_after_ms = cfg.dead_after_ms();
    let mut starting = true;
    // Each other daemon's last known liveness, to log changes once.
    let mut alive: BTreeMap<String, bool> = BTreeMap::new();
    let mut beat = tokio::time::interval(cfg.heartbeat());
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = beat.tick(), if me.shared => {
                match store.daemon_beat(&me.daemon_id, &me.master_id, version, starting).await {
                    Ok(_) => {
                        if starting {
                            info!(message = "Daemon registered.", daemon_id = %me.daemon_id, master_id = %me.master_id);
                        }
                        starting = false;
                    }
                    Err(error) => warn!(message = "Heartbeat not recorded.", daemon_id = %me.daemon_id, %error),
                }
                watch_others(&store, &me, dead_after_ms, &mut alive).await;
            }
            item = events.recv() => match item {
                None => break,
                Some(BusItem::Event(event)) if me.shared => {
                    if let EventKind::MinionStart { id } = event.kind() {
                        match store.presence_seen(id, &me.master_id, &me.daemon_id, SeenBy::Start).await {
                            Ok(()) => debug!(message = "Minion seen on this master.", minion_id = %id, master_id = %me.master_id),
                            Err(error) => warn!(message = "Where a minion is was not recorded.", minion_id = %id, %error),
                        }
                    }
                }
                Some(_) => {}
            },
        }
    }
    if !me.shared {
        return;
    }
    match store.daemon_remove(&me.daemon_id).await {
        Ok(_) => info!(message = "Daemon unregistered.", daemon_id = %me.daemon_id),
        Err(error) => {
            warn!(message = "Daemon not unregistered; it is seen dead after its missed heartbeats.", daemon_id = %me.daemon_id, %error)
        }
    }
}

/// Logs each other daemon that died or came back since the last look.
async fn watch_others(
    store: &DbStore,
    me: &Identity,
    dead_after_ms: i64,
    alive: &mut BTreeMap<String, bool>,
) {
    let (daemons, now) = match store.daemons().await {
        Ok(d) => d,
        Err(error) => {
            warn!(message = "Daemons not read.", %error);
            return;
        }
    };
    let mut seen = BTreeMap::new();
    for d in daemons.iter().filter(|d| d.id != me.daemon_id) {
        let is_alive = d.alive(now, dead_after_ms);
        match (alive.get(&d.id), is_alive) {
            (None, true) | (Some(false), true) => {
                info!(message = "Daemon alive.", daemon_id = %d.id, master_id = %d.master, version = %d.version);
            }
            (None | Some(true), false) => {
                warn!(message = "Daemon seen dead: no heartbeat.", daemon_id = %d.id, master_id = %d.master, silent_ms = now.saturating_sub(d.heartbeat_at));
            }
            _ => {}
        }
        seen.insert(d.id.clone(), is_alive);
    }
    *alive = seen;
}
