//! The outbox notifier: every change recorded in the registry's outbox (by
//! the bus or by the CLI, daemon running or not) is fired as
//! `steward/v1/<server|model>/<created|updated|deleted>`, then acknowledged
//! on the `notify` cursor. Fire-then-acknowledge: at least once, and a crash
//! in between fires again on restart. A row it cannot read is quarantined;
//! rows every consumer has passed are pruned.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::bus::origin::STEWARD_PREFIX;
use crate::bus::Firer;
use crate::dispatch::cluster::Identity;
use crate::registry::changes::Changes;
use crate::registry::cluster::Chore;
use crate::registry::{DbStore, OutboxRow, Service, Store as _};

/// How often the outbox is polled for changes made by other processes (the
/// CLI) when their writes are not seen (PostgreSQL).
const OUTBOX_POLL: Duration = Duration::from_secs(1);

/// The outbox consumer that fires the bus notifications.
pub const NOTIFY_CONSUMER: &str = "notify";

/// How often rows every outbox consumer has passed are pruned.
const OUTBOX_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The outbox consumer of daemon `me`'s notifier: `notify` for a daemon
/// whose `cluster.daemon_id` is not set (one daemon, as before), else
/// `notify-<daemon_id>`, so each daemon — each master's bus — fires every
/// notification once.
pub fn notify_consumer(me: &Identity) -> String {
    if me.explicit {
        format!("{NOTIFY_CONSUMER}-{}", me.daemon_id)
    } else {
        NOTIFY_CONSUMER.to_owned()
    }
}

/// Fires every outbox entry past this daemon's notifier cursor in order (a
/// row it cannot read is quarantined and passed), then waits for a change;
/// prunes what every consumer has passed now and then (one daemon of the
/// registry does: the `chore/prune` lease).
pub async fn dispatch_outbox(
    service: Arc<Service<DbStore>>,
    firer: Firer,
    changed: Arc<Notify>,
    mut registry_changes: Changes,
    me: Identity,
    chore_lease: Duration,
    cancel: CancellationToken,
) {
    let store = service.store();
    let consumer = notify_consumer(&me);
    let mut prune = if me.shared {
        Chore::new("chore/prune", &me.daemon_id, chore_lease)
    } else {
        Chore::solo("chore/prune", &me.daemon_id)
    };
    let mut pruned_at: Option<tokio::time::Instant> = None;
    let mut subscribed = false;
    loop {
        if !subscribed {
            match store.outbox_subscribe(&consumer).await {
                Ok(_) => subscribed = true,
                Err(error) => {
                    warn!(message = "Subscribing to the outbox failed; will retry.", consumer = %consumer, %error)
                }
            }
        }
        if subscribed {
            notify_pending(store, &consumer, &firer, &cancel).await;
            if pruned_at.is_none_or(|t| t.elapsed() >= OUTBOX_PRUNE_EVERY)
                && prune.held(store).await
            {
                pruned_at = Some(tokio::time::Instant::now());
                match store.outbox_prune().await {
                    Ok(0) => {}
                    Ok(rows) => info!(message = "Outbox pruned.", rows),
                    Err(error) => warn!(message = "Pruning the outbox failed.", %error),
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                prune.release(store).await;
                return;
            }
            _ = changed.notified() => {}
            _ = registry_changes.next(OUTBOX_POLL) => {}
        }
    }
}

/// One pass of [`dispatch_outbox`]: up to 100 rows past the cursor; stops at
/// the first one that cannot be fired or acknowledged (retried next pass).
async fn notify_pending(
    store: &DbStore,
    consumer: &str,
    firer: &Firer,
    cancel: &CancellationToken,
) {
    let rows = match store.outbox_pending(consumer, 100).await {
        Ok(rows) => rows,
        Err(error) => {
            warn!(message = "Reading the outbox failed; will retry.", %error);
            return;
        }
    };
    for row in rows {
        if cancel.is_cancelled() {
            return;
        }
        let entry = match row {
            OutboxRow::Entry(entry) => entry,
            OutboxRow::Unreadable { id, reason } => {
                error!(message = "Outbox row cannot be read; quarantined.", consumer, outbox_id = id, %reason);
                if let Err(error) = store.outbox_quarantine(consumer, id, &reason).await {
                    warn!(message = "Quarantining an outbox row failed; will retry.", outbox_id = id, %error);
                    return;
                }
                continue;
            }
        };
        // "server.created" → steward/v1/server/created
        let tag = format!(
            "{}{}",
            STEWARD_PREFIX,
            entry.kind.as_str().replace('.', "/")
        );
        if let Err(error) = firer.fire(&tag, &entry.payload).await {
            warn!(message = "Notification not fired; will retry.", %tag, outbox_id = entry.id, %error);
            return;
        }
        if let Err(error) = store.outbox_ack(consumer, entry.id).await {
            warn!(message = "Notification fired but not acknowledged; it will be fired again.", %tag, outbox_id = entry.id, %error);
            return;
        }
    }
}
