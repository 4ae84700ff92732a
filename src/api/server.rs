//! The request server: registry requests on the bus ([`super::bus`]) —
//! who may ask what, receipts confirmed from the master's job cache, up to
//! [`MAX_REQUESTS_IN_FLIGHT`] answered at once, replies.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use serde_json::{json, Value as Json};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::bus::{self as service_bus, Corroborations, Pairing, Receipt, Request};
use crate::bus::{BusItem, Firer, Origin, Subscription};
use crate::exec::{ExecPolicy, ExecStats, Requester};
use crate::registry::{DbStore, Service};
use crate::salt::SaltClient;
use crate::telemetry::Counts;

/// Registry requests by entity, op and outcome (`ok` or the reply's error
/// code: `untrusted_sender`, `not_found` …); a malformed request, whose
/// entity or op may be unreadable, is `unknown`/`unknown`/`bad_request`.
/// Read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct RequestStats(Counts<(&'static str, &'static str, String)>);

impl RequestStats {
    /// Counts one request of `entity`/`op` answered (or refused) with `outcome`.
    pub fn count(&self, entity: &'static str, op: &'static str, outcome: &str) {
        self.0.add((entity, op, outcome.to_owned()));
    }

    /// Counts `req` by the reply it got.
    fn count_reply(&self, req: &Request, reply: &Json) {
        let outcome = if reply.get("ok") == Some(&Json::Bool(true)) {
            "ok"
        } else {
            reply
                .pointer("/error/code")
                .and_then(Json::as_str)
                .unwrap_or("error")
        };
        self.count(req.entity.as_str(), req.op.as_str(), outcome);
    }

    /// Every (entity, op, outcome) counted so far with its count.
    pub fn snapshot(&self) -> Vec<((&'static str, &'static str, String), u64)> {
        self.0.snapshot()
    }
}

/// Registry requests answered at the same time.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 64;

/// Serves registry requests from the bus: who may ask what, receipts paired
/// and confirmed from the job cache (see [`super::bus`]), replies.
pub async fn serve_requests(
    mut sub: Subscription,
    answering: Answering,
    policy: PolicyHandle,
    cancel: CancellationToken,
) {
    let mut corroborations = Corroborations::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let item = tokio::select! {
            _ = cancel.cancelled() => return answering.drain().await,
            // Expiry is looked at only while something waits.
            _ = tick.tick(), if !corroborations.is_empty() => None,
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
                    answering.stats.count("unknown", "unknown", "bad_request");
                    if let Some(id) = &bad.request_id {
                        let reply_data = service_bus::error_reply("bad_request", &bad.message);
                        answering.reply(id, &reply_data).await;
                    }
                }
                Some(Ok(req)) => match (&req.origin, req.op) {
                    // A lookup changes nothing: anyone may ask.
                    (_, service_bus::Op::Find) => answering.start(req).await,
                    // A backup result: only a minion's, proved by its
                    // event.send job (any minion may send one: the job
                    // cache proves which, `api::backup::result` checks it
                    // is the backup's server).
                    (Origin::Minion(_), service_bus::Op::Result) => {
                        match corroborations.request(req, now) {
                            Pairing::Paired(req, receipt) => {
                                answering.start_confirmed(req, receipt).await
                            }
                            Pairing::Waiting { evicted: None } => {}
                            Pairing::Waiting { evicted: Some(old) } => {
                                answering
                                    .unverified(
                                        &old,
                                        "too many requests waiting for their receipt",
                                        false,
                                    )
                                    .await
                            }
                        }
                    }
                    (_, service_bus::Op::Result) => {
                        answering
                            .unverified(
                                &req,
                                "a backup result must be a minion's event.send",
                                false,
                            )
                            .await
                    }
                    (Origin::Minion(id), _) if !policy.get().trusted.contains(id) => {
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
#[derive(Clone)]
pub struct Answering {
    service: Arc<Service<DbStore>>,
    firer: Firer,
    changed: Arc<Notify>,
    slots: Arc<Semaphore>,
    /// Where each request's task runs (the supervisor waits for them).
    helpers: TaskTracker,
    salt: SaltClient,
    pki_dir: PathBuf,
    /// Exec translation: who may run what, and the longest wait.
    /// Trusted minions and the exec allow-list (reloaded on SIGHUP).
    policy: PolicyHandle,
    /// Request ids served lately: a refusal of another request with the
    /// same id (a forgery, or a replay) is not fired on the same reply tag.
    served: Arc<std::sync::Mutex<VecDeque<String>>>,
    /// Request ids being confirmed or served now, with how many.
    busy: BusyIds,
    /// Requests by entity, op and outcome.
    stats: Arc<RequestStats>,
    /// Exec requests by outcome.
    exec_stats: Arc<ExecStats>,
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

/// Who may ask what: the trusted minions and the exec allow-list. Read at
/// each request, replaced as a whole on SIGHUP.
#[derive(Debug)]
pub struct Policy {
    /// `trusted_minions`.
    pub trusted: HashSet<String>,
    /// `exec.master` / `exec.minions`.
    pub exec: ExecPolicy,
    /// `exec.timeout`.
    pub exec_timeout: Duration,
}

/// The current [`Policy`], shared by the request server and the reload.
#[derive(Debug, Clone)]
pub struct PolicyHandle(Arc<std::sync::RwLock<Arc<Policy>>>);

impl PolicyHandle {
    /// A handle on `policy`.
    pub fn new(policy: Policy) -> Self {
        Self(Arc::new(std::sync::RwLock::new(Arc::new(policy))))
    }

    /// The policy now (a request keeps the one it started with).
    pub fn get(&self) -> Arc<Policy> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the policy for the requests that come next.
    pub fn set(&self, policy: Policy) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(policy);
    }
}

/// How many served request ids [`Answering`] remembers.
const SERVED_MEMORY: usize = 4096;

impl Answering {
    /// Answers requests through `service` (and `salt` for confirmations,
    /// with the master's `pki_dir`), replies through `firer`, wakes the
    /// outbox notifier with `changed`, runs each request on `helpers`.
    pub fn new(
        service: Arc<Service<DbStore>>,
        firer: Firer,
        changed: Arc<Notify>,
        salt: SaltClient,
        pki_dir: PathBuf,
        helpers: TaskTracker,
        policy: PolicyHandle,
    ) -> Self {
        Self {
            service,
            firer,
            changed,
            slots: Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT)),
            helpers,
            salt,
            pki_dir,
            policy,
            served: Arc::default(),
            busy: Arc::default(),
            stats: Arc::default(),
            exec_stats: Arc::default(),
        }
    }

    /// The requests counted by entity, op and outcome.
    pub fn stats(&self) -> Arc<RequestStats> {
        self.stats.clone()
    }

    /// The exec requests counted by outcome.
    pub fn exec_stats(&self) -> Arc<ExecStats> {
        self.exec_stats.clone()
    }

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
        let me = self.clone();
        let busy = Busy::enter(&self.busy, &req.request_id);
        self.helpers.spawn(async move {
            if let Some(receipt) = receipt {
                let deadline = crate::clock::deadline_in(if req.op == service_bus::Op::Result {
                    service_bus::RESULT_WAIT
                } else {
                    service_bus::CONFIRM_WAIT
                });
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
            let result = if req.op == service_bus::Op::Exec {
                me.exec(&req).await
            } else if req.op == service_bus::Op::Result {
                let reply = super::backup::result(&me.service, &req).await;
                // Nobody waits for a reply to a result: counted, not fired.
                me.stats.count_reply(&req, &reply);
                drop(busy);
                drop(slot);
                return;
            } else {
                service_bus::serve(&me.service, &req).await
            };
            if req.op != service_bus::Op::Find && result.get("ok") == Some(&Json::Bool(true)) {
                me.changed.notify_one();
            }
            me.stats.count_reply(&req, &result);
            me.reply(&req.request_id, &result).await;
            drop(busy);
            drop(slot);
        });
    }

    /// Serves a confirmed `steward/v1/server/exec`: the requester is the
    /// trusted minion that sent it, or the master (a confirmed runner
    /// receipt); the reply carries the jid and the minion's return.
    async fn exec(&self, req: &Request) -> Json {
        if req.entity != service_bus::Entity::Server {
            let e = service_bus::not_here(req.entity.as_str());
            return service_bus::error_reply(e.code(), &e.to_string());
        }
        let who = match &req.origin {
            Origin::Minion(id) => Requester::Minion(id.clone()),
            _ => Requester::Master,
        };
        let policy = self.policy.get();
        let exec_req = match service_bus::exec_request(req, policy.exec_timeout) {
            Ok(r) => r,
            Err(e) => return service_bus::error_reply(e.code(), &e.to_string()),
        };
        let result =
            crate::exec::exec(&self.service, &self.salt, &policy.exec, &who, &exec_req).await;
        self.exec_stats.count(&result);
        match result {
            Ok(reply) => json!({"ok": true, "result": reply}),
            Err(e) => {
                warn!(message = "Exec request refused or failed.", request_id = %req.request_id, requester = %who, code = e.code(), error = %e);
                service_bus::error_reply(e.code(), &e.to_string())
            }
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
        self.stats.count(req.entity.as_str(), req.op.as_str(), code);
        if req.op == service_bus::Op::Result {
            // A result gets no reply; the refusal is logged and counted.
            warn!(message = "Backup result refused.", tag = %req.tag, request_id = %req.request_id, code, reason = %message);
            return;
        }
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
