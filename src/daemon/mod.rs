//! `salt-steward daemon`: the long-running process.
//!
//! A [`Supervisor`] of named components ([`TaskName`]), each a task stopped
//! by one cancellation token; one that ends before shutdown stops the daemon
//! with an error (`supervisor`). Signals have one owner (`signals`).
//! - the bus reader (`bus::subscriber`), shared by the others;
//! - the request server: registry requests from the bus (`service_bus`):
//!   who may ask what, receipts confirmed from the master's job cache,
//!   replies;
//! - the outbox dispatcher: every change recorded in the registry's outbox
//!   (by the bus or by the CLI, daemon running or not) is fired as
//!   `steward/v1/<server|model>/<created|updated|deleted>`, then acknowledged
//!   on the `notify` cursor. Fire-then-acknowledge: at least once, and a crash
//!   in between fires again on restart. A row it cannot read is quarantined;
//!   rows every consumer has passed are pruned;
//! - the rules engine (`rules`): reactor rules from `rules_dir`, hot-reloaded;
//!   what the daemon fires under its own tags reaches it in memory
//!   ([`Firer::with_local`], `bus::origin`);
//! - the acceptor (`acceptor`): verified auto-accept of minion keys,
//!   presence, first-start states; and the key-pool filler.
//!
//! Shutdown (SIGTERM/SIGINT): stop taking requests, let the dispatcher finish
//! the entry in hand, exit 0 within [`SHUTDOWN_GRACE`]; a second signal
//! stops at once (non-zero).

mod signals;
pub mod supervisor;

pub use supervisor::{Supervisor, SupervisorError, TaskName};

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value as Json;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::acceptor::{self, AcceptorConfig};
use crate::bus::{
    BusHandle, BusItem, EventFirer, Firer, LocalEvents, Origin, SubscriberOptions, Subscription,
};
use crate::config::Settings;
use crate::master_config::MasterConfig;
use crate::pki::KeyIssuer;
use crate::registry::{self, DbStore, OutboxRow, Service, Store as _};
use crate::salt::{JobTracker, ReqClient, SaltClient};
use crate::service_bus::{self, Corroborations, Pairing, Receipt, Request};

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
    // What the daemon itself fires under its own tags reaches the rules in
    // memory, as the master's (the bus copies are ignored there).
    let local = LocalEvents::new();
    let rules = crate::rules::RulesComponent::new(&bus, &local, settings);
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
    let firer = firer.with_local(local);
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
        rules.run(
            salt.clone(),
            firer.clone(),
            signals.reload.clone(),
            cancel.clone(),
        ),
    );
    let answering = Answering {
        service,
        firer,
        changed,
        slots: Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT)),
        helpers: sup.helpers(),
        salt,
        pki_dir: master.pki_dir.clone(),
        served: Arc::default(),
        busy: Arc::default(),
    };
    sup.spawn(
        TaskName::RequestServer,
        serve_requests(
            requests,
            answering,
            settings.trusted_minions.iter().cloned().collect(),
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

/// Serves registry requests from the bus: who may ask what, receipts paired
/// and confirmed from the job cache (see [`service_bus`]), replies.
async fn serve_requests(
    mut sub: Subscription,
    answering: Answering,
    trusted: HashSet<String>,
    cancel: CancellationToken,
) {
    let mut corroborations = Corroborations::default();
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
            if let Some(receipt) = service_bus::receipt_of(&event) {
                if let Some((req, receipt)) = corroborations.receipt(receipt, now) {
                    answering.start_confirmed(req, receipt).await;
                }
                continue;
            }
            match service_bus::parse(&event) {
                None => {}
                Some(Err(bad)) => {
                    warn!(message = "Malformed registry request.", tag = %event.tag, request_id = ?bad.request_id, reason = %bad.message);
                    if let Some(id) = &bad.request_id {
                        let reply_data = service_bus::error_reply("bad_request", &bad.message);
                        answering.reply(id, &reply_data).await;
                    }
                }
                Some(Ok(req)) => match (&req.origin, req.op) {
                    // A lookup changes nothing: anyone may ask.
                    (_, service_bus::Op::Find) => answering.start(req).await,
                    (Origin::Minion(id), _) if !trusted.contains(id) => {
                        warn!(message = "Registry request refused: minion not trusted.", minion_id = %id, tag = %req.tag);
                        let msg = format!(
                            "minion {id} is not in trusted_minions; the registry was not changed"
                        );
                        answering
                            .refuse(&req, "untrusted_sender", &msg, false)
                            .await;
                    }
                    // A trusted minion's (claimed) or unwrapped: needs its receipt.
                    _ => match corroborations.request(req, now) {
                        Pairing::Paired(req, receipt) => {
                            answering.start_confirmed(req, receipt).await
                        }
                        Pairing::Waiting { evicted: None } => {}
                        Pairing::Waiting { evicted: Some(old) } => {
                            let twin = corroborations.waiting_with_id(&old.request_id);
                            answering
                                .unverified(
                                    &old,
                                    "too many requests waiting for their receipt",
                                    twin,
                                )
                                .await
                        }
                    },
                },
            }
        }
        // Requests whose receipt never came.
        for req in corroborations.expired(now) {
            let twin = corroborations.waiting_with_id(&req.request_id);
            answering
                .unverified(&req, "no receipt (salt/run/<jid>/new of salt-run event.send, or the trusted minion's event.send return) came", twin)
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
    salt: SaltClient,
    pki_dir: PathBuf,
    /// Request ids served lately: a refusal of another request with the
    /// same id (a forgery, or a replay) is not fired on the same reply tag.
    served: Arc<std::sync::Mutex<VecDeque<String>>>,
    /// Request ids being confirmed or served now, with how many.
    busy: BusyIds,
}

type BusyIds = Arc<std::sync::Mutex<HashMap<String, usize>>>;

/// Marks a request id busy in [`Answering`] while it lives.
struct Busy {
    ids: BusyIds,
    id: String,
}

impl Busy {
    fn enter(ids: &BusyIds, id: &str) -> Self {
        *ids.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.to_owned())
            .or_default() += 1;
        Self {
            ids: ids.clone(),
            id: id.to_owned(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = ids.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                ids.remove(&self.id);
            }
        }
    }
}

/// How many served request ids [`Answering`] remembers.
const SERVED_MEMORY: usize = 4096;

impl Answering {
    /// Starts answering `req`; waits for a free slot first (backpressure: the
    /// bus queue absorbs, and counts, what cannot wait).
    async fn start(&self, req: Request) {
        self.start_with(req, None).await;
    }

    /// Confirms `receipt` from the job cache, then answers `req` (or refuses it).
    async fn start_confirmed(&self, req: Request, receipt: Receipt) {
        self.start_with(req, Some(receipt)).await;
    }

    async fn start_with(&self, req: Request, receipt: Option<Receipt>) {
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            return;
        };
        let me = self.clone_handles();
        let busy = Busy::enter(&self.busy, &req.request_id);
        self.helpers.spawn(async move {
            if let Some(receipt) = receipt {
                let deadline = crate::clock::deadline_in(service_bus::CONFIRM_WAIT);
                if let Err(why) =
                    service_bus::confirm(&me.salt, &me.pki_dir, &req, &receipt, deadline).await
                {
                    warn!(message = "Registry request refused: its receipt is not confirmed by the master's job cache.", tag = %req.tag, request_id = %req.request_id, jid = %receipt.jid, reason = %why);
                    drop(busy);
                    me.unverified(&req, &why, false).await;
                    drop(slot);
                    return;
                }
            }
            if req.op != service_bus::Op::Find {
                me.remember_served(&req.request_id);
            }
            let result = service_bus::serve(&me.service, &req).await;
            if req.op != service_bus::Op::Find && result.get("ok") == Some(&Json::Bool(true)) {
                me.changed.notify_one();
            }
            me.reply(&req.request_id, &result).await;
            drop(busy);
            drop(slot);
        });
    }

    fn clone_handles(&self) -> Self {
        Self {
            service: self.service.clone(),
            firer: self.firer.clone(),
            changed: self.changed.clone(),
            slots: self.slots.clone(),
            helpers: self.helpers.clone(),
            salt: self.salt.clone(),
            pki_dir: self.pki_dir.clone(),
            served: self.served.clone(),
            busy: self.busy.clone(),
        }
    }

    fn remember_served(&self, request_id: &str) {
        let mut served = self.served.lock().unwrap_or_else(PoisonError::into_inner);
        if served.len() >= SERVED_MEMORY {
            served.pop_front();
        }
        served.push_back(request_id.to_owned());
    }

    fn was_served(&self, request_id: &str) -> bool {
        self.served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|id| id == request_id)
    }

    /// Refuses `req` with `code`, unless another request with its id was
    /// served, is in hand, or (`twin`) waits for its receipt: that one's
    /// reply is the one for the id; this refusal is logged only.
    async fn refuse(&self, req: &Request, code: &str, message: &str, twin: bool) {
        let busy = self
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&req.request_id);
        if self.was_served(&req.request_id) || busy || twin {
            warn!(message = "Registry request refused, not answered: another request with its id was served or is in hand.", tag = %req.tag, request_id = %req.request_id, code);
            return;
        }
        self.reply(&req.request_id, &service_bus::error_reply(code, message))
            .await;
    }

    /// Refuses a request not verified as the master's or a trusted minion's.
    async fn unverified(&self, req: &Request, why: &str, twin: bool) {
        warn!(message = "Registry request refused: sender not verified.", tag = %req.tag, request_id = %req.request_id, origin = req.origin.as_str(), reason = why);
        let msg = format!(
            "request not verified as fired on the master or by a trusted minion ({why}; use `salt-run event.send`, or a trusted minion's `salt-call event.send`); the registry was not changed"
        );
        self.refuse(req, "unverified_sender", &msg, twin).await;
    }

    /// Waits for the requests in hand (bounded by the daemon's grace period).
    async fn drain(&self) {
        let all = u32::try_from(MAX_REQUESTS_IN_FLIGHT).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(all).await;
    }

    async fn reply(&self, request_id: &str, data: &Json) {
        self.firer
            .fire_or_warn(&service_bus::reply_tag(request_id), data)
            .await;
    }
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
