//! `salt-steward daemon`: the long-running process.
//!
//! A [`Supervisor`] of named components ([`TaskName`]), each a task stopped
//! by one cancellation token; one that ends before shutdown stops the daemon
//! with an error (`supervisor`). Signals have one owner (`signals`).
//! - the bus reader (`bus::subscriber`), shared by the others;
//! - the request server: registry requests from the bus (`service_bus`),
//!   trust checks, replies;
//! - the outbox dispatcher: every change recorded in the registry's outbox
//!   (by the bus or by the CLI, daemon running or not) is fired as
//!   `steward/v1/<server|model>/<created|updated|deleted>`, then acknowledged
//!   on the `notify` cursor. Fire-then-acknowledge: at least once, and a crash
//!   in between fires again on restart. A row it cannot read is quarantined;
//!   rows every consumer has passed are pruned;
//! - the rules engine (`rules`): reactor rules from `rules_dir`, hot-reloaded;
//! - the acceptor (`acceptor`): verified auto-accept of minion keys,
//!   presence, first-start states; and the key-pool filler.
//!
//! Shutdown (SIGTERM/SIGINT): stop taking requests, let the dispatcher finish
//! the entry in hand, exit 0 within [`SHUTDOWN_GRACE`]; a second signal
//! stops at once (non-zero).

mod signals;
pub mod supervisor;

pub use supervisor::{Supervisor, SupervisorError, TaskName};

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value as Json;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::acceptor::{self, AcceptorConfig};
use crate::bus::{BusHandle, BusItem, EventFirer, Firer, SubscriberOptions, Subscription};
use crate::config::Settings;
use crate::master_config::MasterConfig;
use crate::pki::KeyIssuer;
use crate::registry::{self, DbStore, OutboxRow, Service, Store as _};
use crate::salt::{JobTracker, ReqClient, SaltClient};
use crate::service_bus::{self, Corroborations, Request, Sender, CORROBORATION_WAIT};

/// How long shutdown waits for the components.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Timeout of one request to the master's request server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Registry requests answered at the same time.
const MAX_REQUESTS_IN_FLIGHT: usize = 64;

/// How often the outbox is polled for changes made by other processes (the CLI).
const OUTBOX_POLL: Duration = Duration::from_secs(1);

/// Runs the daemon until SIGTERM/SIGINT (a second one while stopping: at
/// once) or until a component ends, which is an error: the caller exits
/// non-zero.
pub async fn run(settings: &Settings, master: &MasterConfig) -> anyhow::Result<()> {
    supervisor::install_panic_hook();
    let (signals, _signal_task) = signals::install().context("installing signal handlers")?;
    let keys = settings.key_issuer()?;
    let service = Arc::new(
        registry::open(&settings.registry)
            .await
            .with_context(|| format!("opening the registry {}", redact(&settings.registry)))?
            .with_keys(keys.clone()),
    );
    let cancel = CancellationToken::new();
    let mut sup = Supervisor::new(cancel.clone());
    let bus = BusHandle::new(
        master.event_pub(),
        SubscriberOptions {
            queue_capacity: settings.bus.queue_capacity,
            max_frame: settings.bus.max_event_size,
            ..SubscriberOptions::default()
        },
    );
    // Every consumer subscribes before the reader starts: nothing is missed.
    let requests = bus.subscribe();
    let rules = crate::rules::RulesComponent::new(&bus, settings);
    let acceptor_events = bus.subscribe();
    let (tracker, routing) = JobTracker::new(bus.subscribe(), cancel.clone());
    // One Salt client (one request connection, one job tracker) for the
    // acceptor and the rules engine.
    let salt = SaltClient::new(ReqClient::new(master, REQUEST_TIMEOUT)?, tracker);
    let (firer, writer) = Firer::new(
        EventFirer::new(master.event_pull(), master.event_pub()),
        Firer::QUEUE,
        Firer::DEADLINE,
    );
    let changed = Arc::new(Notify::new());

    info!(message = "Daemon started.", master_config = %master.path.display(), registry_backend = service.store().backend());
    sup.spawn(TaskName::BusReader, bus.reader(cancel.clone()));
    // Ends once every component has dropped its handle, after writing what
    // they queued.
    sup.spawn(TaskName::EventWriter, writer);
    sup.spawn(TaskName::JobTracker, routing);
    sup.spawn(
        TaskName::OutboxNotifier,
        dispatch_outbox(
            service.clone(),
            firer.clone(),
            changed.clone(),
            cancel.clone(),
        ),
    );
    sup.spawn(
        TaskName::Acceptor,
        acceptor::run(
            AcceptorConfig {
                pki_dir: master.pki_dir.clone(),
                mode: settings.keys.accept_mode,
                unknown: settings.keys.unknown_minions,
                sync_keys: settings.masters.len() > 1,
                helpers: sup.helpers(),
            },
            acceptor_events,
            service.clone(),
            salt.clone(),
            firer.clone(),
            cancel.clone(),
        ),
    );
    sup.spawn(
        TaskName::KeyPool,
        fill_key_pool(keys, settings.keys.pool_size, cancel.clone()),
    );
    sup.spawn(
        TaskName::Rules,
        rules.run(salt, firer.clone(), signals.reload.clone(), cancel.clone()),
    );
    let helpers = sup.helpers();
    sup.spawn(
        TaskName::RequestServer,
        serve_requests(
            requests,
            service,
            firer,
            changed,
            settings.trusted_minions.iter().cloned().collect(),
            helpers,
            cancel.clone(),
        ),
    );

    let result = sup
        .run(
            signals::reached(signals.stop.clone(), 1),
            signals::reached(signals.stop.clone(), 2),
            SHUTDOWN_GRACE,
        )
        .await;
    info!(message = "Stopped.");
    Ok(result?)
}

/// A database URL with any password hidden, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Keeps `size` pre-generated key pairs in the pool, one at a time on a
/// blocking thread (generation is CPU-bound), checking every few seconds.
async fn fill_key_pool(keys: KeyIssuer, size: usize, cancel: CancellationToken) {
    loop {
        if cancel.is_cancelled() {
            return;
        }
        if keys.pool_len() < size {
            let k = keys.clone();
            match tokio::task::spawn_blocking(move || k.generate_into_pool()).await {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => warn!(message = "Key pool not refilled.", %error),
                Err(error) => warn!(message = "Key pool not refilled.", %error),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// The outbox consumer that fires the bus notifications.
pub const NOTIFY_CONSUMER: &str = "notify";

/// How often rows every outbox consumer has passed are pruned.
const OUTBOX_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Fires every outbox entry past the `notify` cursor in order (a row it
/// cannot read is quarantined and passed), then waits for a change; prunes
/// what every consumer has passed now and then.
async fn dispatch_outbox(
    service: Arc<Service<DbStore>>,
    firer: Firer,
    changed: Arc<Notify>,
    cancel: CancellationToken,
) {
    let store = service.store();
    let mut pruned_at: Option<tokio::time::Instant> = None;
    let mut subscribed = false;
    loop {
        if !subscribed {
            match store.outbox_subscribe(NOTIFY_CONSUMER).await {
                Ok(_) => subscribed = true,
                Err(error) => {
                    warn!(message = "Subscribing to the outbox failed; will retry.", consumer = NOTIFY_CONSUMER, %error)
                }
            }
        }
        if subscribed {
            notify_pending(store, &firer, &cancel).await;
            if pruned_at.is_none_or(|t| t.elapsed() >= OUTBOX_PRUNE_EVERY) {
                pruned_at = Some(tokio::time::Instant::now());
                match store.outbox_prune().await {
                    Ok(0) => {}
                    Ok(rows) => info!(message = "Outbox pruned.", rows),
                    Err(error) => warn!(message = "Pruning the outbox failed.", %error),
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(OUTBOX_POLL) => {}
        }
    }
}

/// One pass of [`dispatch_outbox`]: up to 100 rows past the cursor; stops at
/// the first one that cannot be fired or acknowledged (retried next pass).
async fn notify_pending(store: &DbStore, firer: &Firer, cancel: &CancellationToken) {
    let rows = match store.outbox_pending(NOTIFY_CONSUMER, 100).await {
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
                error!(message = "Outbox row cannot be read; quarantined.", consumer = NOTIFY_CONSUMER, outbox_id = id, %reason);
                if let Err(error) = store.outbox_quarantine(NOTIFY_CONSUMER, id, &reason).await {
                    warn!(message = "Quarantining an outbox row failed; will retry.", outbox_id = id, %error);
                    return;
                }
                continue;
            }
        };
        // "server.created" → steward/v1/server/created
        let tag = format!(
            "{}{}",
            service_bus::REQUEST_PREFIX,
            entry.kind.as_str().replace('.', "/")
        );
        if let Err(error) = firer.fire(&tag, &entry.payload).await {
            warn!(message = "Notification not fired; will retry.", %tag, outbox_id = entry.id, %error);
            return;
        }
        if let Err(error) = store.outbox_ack(NOTIFY_CONSUMER, entry.id).await {
            warn!(message = "Notification fired but not acknowledged; it will be fired again.", %tag, outbox_id = entry.id, %error);
            return;
        }
    }
}

/// Serves registry requests from the bus.
async fn serve_requests(
    mut sub: Subscription,
    service: Arc<Service<DbStore>>,
    firer: Firer,
    changed: Arc<Notify>,
    trusted: HashSet<String>,
    helpers: TaskTracker,
    cancel: CancellationToken,
) {
    let answering = Answering {
        service,
        firer: firer.clone(),
        changed,
        slots: Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT)),
        helpers,
    };
    let mut corroborations = Corroborations::default();
    // Unwrapped requests waiting for their salt-run event.
    let mut waiting: Vec<(tokio::time::Instant, Request)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let item = tokio::select! {
            _ = cancel.cancelled() => return answering.drain().await,
            _ = tick.tick() => None,
            item = sub.recv() => match item {
                Some(item) => Some(item),
                None => return answering.drain().await,
            },
        };
        let now = tokio::time::Instant::now();
        if let Some(BusItem::Event(event)) = item {
            if corroborations.observe(&event, now) {
                // A waiting request may be the one it vouches for.
                let mut still = Vec::new();
                for (deadline, req) in waiting.drain(..) {
                    if corroborations.take(&req) {
                        answering.start(req).await;
                    } else {
                        still.push((deadline, req));
                    }
                }
                waiting = still;
                continue;
            }
            match service_bus::parse(&event) {
                None => {}
                Some(Err(bad)) => {
                    warn!(message = "Malformed registry request.", tag = %event.tag, reason = %bad.message);
                    if let Some(id) = &bad.request_id {
                        reply(
                            &firer,
                            id,
                            &service_bus::error_reply("bad_request", &bad.message),
                        )
                        .await;
                    }
                }
                Some(Ok(req)) => match (&req.sender, req.op) {
                    // A lookup changes nothing: anyone may ask.
                    (_, service_bus::Op::Find) => answering.start(req).await,
                    (Sender::Minion(id), _) if trusted.contains(id) => answering.start(req).await,
                    (Sender::Minion(id), _) => {
                        warn!(message = "Registry request refused: minion not trusted.", minion_id = %id, tag = %req.tag);
                        let msg = format!(
                            "minion {id} is not in trusted_minions; the registry was not changed"
                        );
                        reply(
                            &firer,
                            &req.request_id,
                            &service_bus::error_reply("untrusted_sender", &msg),
                        )
                        .await;
                    }
                    (Sender::Unwrapped, _) if corroborations.take(&req) => {
                        answering.start(req).await
                    }
                    (Sender::Unwrapped, _) => {
                        waiting.push((crate::clock::deadline(now, CORROBORATION_WAIT), req))
                    }
                },
            }
        }
        // Requests whose salt-run event never came.
        let (expired, still): (Vec<_>, Vec<_>) = waiting
            .drain(..)
            .partition(|(deadline, _)| *deadline <= now);
        waiting = still;
        for (_, req) in expired {
            warn!(message = "Registry request refused: sender not verified.", tag = %req.tag, request_id = %req.request_id);
            let msg = "request not verified as fired on the master (use `salt-run event.send`, or a trusted minion's `salt-call event.send`); the registry was not changed";
            reply(
                &firer,
                &req.request_id,
                &service_bus::error_reply("unverified_sender", msg),
            )
            .await;
        }
    }
}

/// Runs accepted requests, up to [`MAX_REQUESTS_IN_FLIGHT`] at a time, so that
/// a burst of creates is group-committed by the registry. No order between
/// requests is promised (as with any request over the bus): a caller that
/// needs one waits for the reply before sending the next.
struct Answering {
    service: Arc<Service<DbStore>>,
    firer: Firer,
    changed: Arc<Notify>,
    slots: Arc<Semaphore>,
    /// Where each request's task runs (the supervisor waits for them).
    helpers: TaskTracker,
}

impl Answering {
    /// Starts answering `req`; waits for a free slot first (backpressure: the
    /// bus queue absorbs, and counts, what cannot wait).
    async fn start(&self, req: Request) {
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return;
        };
        let (service, firer, changed) = (
            self.service.clone(),
            self.firer.clone(),
            self.changed.clone(),
        );
        self.helpers.spawn(async move {
            let result = service_bus::serve(&service, &req).await;
            if req.op != service_bus::Op::Find && result.get("ok") == Some(&Json::Bool(true)) {
                changed.notify_one();
            }
            reply(&firer, &req.request_id, &result).await;
            drop(slot);
        });
    }

    /// Waits for the requests in hand (bounded by the daemon's grace period).
    async fn drain(&self) {
        let all = u32::try_from(MAX_REQUESTS_IN_FLIGHT).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(all).await;
    }
}

async fn reply(firer: &Firer, request_id: &str, data: &Json) {
    firer
        .fire_or_warn(&service_bus::reply_tag(request_id), data)
        .await;
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://steward:s3cret@db/reg"),
            "postgres://steward:***@db/reg"
        );
        assert_eq!(redact("sqlite:///var/lib/x.db"), "sqlite:///var/lib/x.db");
    }
}
