//! The registry's Server service on the event bus (capability 4).
//!
//! Requests are events `steward/v1/<entity>/<create|find|update|delete>`,
//! the entity `server`, `model`, `forward/port` or `forward/hostname` (their
//! arguments: [`super::forward`]), or `share` (also `passwd`; its arguments:
//! [`super::share`]), whose data is a map with a `request_id`
//! beside the arguments; the reply is
//! fired as `steward/v1/reply/<request_id>`: `{ok: true, result}` or
//! `{ok: false, error: {code, message}}`. A server `update` may carry the
//! `revision` it was made from: refused with `conflict` if the server moved
//! on; without it the patch is applied to the server as it is (never a
//! stale write-back, see [`registry::Service::update_server`]). A request
//! that cannot be read gets `bad_request` whenever its `request_id` can be.
//!
//! Who may change the registry. Salt's bus carries no sender identity (see
//! [`crate::bus::origin`]): a minion can make the master fire an unwrapped
//! event with any tag — Salt's blacklisted `salt/run/…` included, with a
//! batch's `pretag` — and data imitating another minion's wrapping. So
//! neither a request's shape nor the runner event seen beside it proves
//! anything; what does is the master's **job cache**, where only the
//! master's own runner stores a runner's return (under the master's id, which
//! is no minion's accepted key) and a minion's return is stored only under the
//! id it authenticated as. The rules:
//! - `find` changes nothing and is answered for anyone;
//! - a minion-wrapped request from an id not in `trusted_minions` is refused;
//! - any other request needs a **receipt**, a job event naming the same
//!   payload (tag and data, by their [`Digest`]): for an unwrapped request
//!   the `salt/run/<jid>/new` that `salt-run event.send` fires just before
//!   it; for a trusted minion's the `salt/job/<jid>/ret/<id>` of its
//!   `salt-call event.send`, just after it. The receipt is then **confirmed**
//!   from the job cache (`jobs.list_job <jid>`): the runner's stored return,
//!   under an id with no accepted minion key, ran `runner.event.send` with
//!   this payload; or the minion's stored job is `event.send` with this
//!   payload and has that minion's return. Only then is the request served.
//!
//! Receipts and requests are paired by digest, so a forged request with the
//! same `request_id` neither takes a genuine receipt nor keeps the genuine
//! request from being served. Both wait in bounded, indexed pools
//! ([`MAX_PENDING`] each); a request waits up to [`CORROBORATION_WAIT`] for
//! its receipt, then is refused.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value as Json};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use super::args::{encode, Args};
use crate::bus::event::{to_json, Event, EventKind};
use crate::bus::origin::REQUEST_OPS;
use crate::bus::Origin;
use crate::registry::{self, ServerRef, Store};
use crate::salt::SaltClient;

/// Tag prefix of requests.
pub const REQUEST_PREFIX: &str = crate::bus::origin::STEWARD_PREFIX;

/// How long a request waits for its receipt (the runner's event comes just
/// before an unwrapped request, a minion's return just after its request).
/// Long enough for a genuine request to be served before a forgery with its
/// id sent just before it times out (its refusal is then not fired).
pub const CORROBORATION_WAIT: Duration = Duration::from_secs(10);

/// How long a receipt is remembered for a request that follows it.
const CORROBORATION_TTL: Duration = Duration::from_secs(30);

/// How long the job cache is asked to confirm a receipt (the master writes
/// a runner's return once the runner ends, a minion's just after its event).
pub const CONFIRM_WAIT: Duration = Duration::from_secs(10);

/// How long a backup result waits for its receipt, and its receipt for the
/// job cache's confirmation. Nobody waits for a reply to a result, and the
/// wrapper's `salt-call` may be slow to return on a loaded backup server
/// (it re-authenticates, then returns after the event): patience costs only
/// a bounded pool slot, a refusal loses the event (recovered from the local
/// JSON only at the next dispatch or run).
pub const RESULT_WAIT: Duration = Duration::from_secs(60);

/// Most requests waiting for a receipt, and most receipts waiting for a
/// request; the oldest go first.
pub const MAX_PENDING: usize = 4096;

/// The notification verbs sharing the request prefix (not requests).
const NOTIFICATIONS: [&str; 3] = ["created", "updated", "deleted"];

/// What a request is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    Server,
    Model,
    /// `forward/port` (see [`super::forward`]).
    PortForward,
    /// `forward/hostname` (see [`super::forward`]).
    HostnameForward,
    /// `share` (see [`super::share`]).
    Share,
    /// `backup` (see [`super::backup`]).
    Backup,
}

impl Entity {
    /// Every entity, in the order of [`crate::bus::origin::REQUEST_ENTITIES`].
    pub const ALL: [Entity; 6] = [
        Entity::Server,
        Entity::Model,
        Entity::PortForward,
        Entity::HostnameForward,
        Entity::Share,
        Entity::Backup,
    ];

    /// Its part of a request tag (`steward/v1/<entity>/<op>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Server => "server",
            Entity::Model => "model",
            Entity::PortForward => "forward/port",
            Entity::HostnameForward => "forward/hostname",
            Entity::Share => "share",
            Entity::Backup => "backup",
        }
    }

    fn from_tag_part(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Find,
    Update,
    Delete,
    /// `steward/v1/server/exec`: exec translation (`crate::exec`), served by
    /// the request server with the Salt client, not by [`serve`].
    Exec,
    /// `steward/v1/share/passwd`: a new password for a share.
    Passwd,
    /// `steward/v1/backup/result`: a backup server's run result, recorded
    /// only when its own minion provably sent it ([`super::backup::result`]).
    Result,
}

impl Op {
    /// Its part of a request tag (`create`, `find` …).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Find => "find",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Exec => "exec",
            Op::Passwd => "passwd",
            Op::Result => "result",
        }
    }
}

/// A sha256 over a request's whole payload: its tag and its data, without
/// the keys Salt adds (`_stamp`, `__pub_*`), as canonical JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `tag` with `data`.
    pub fn of(tag: &str, data: &Map<String, Json>) -> Self {
        let mut clean = data.clone();
        clean.retain(|k, _| !salt_key(k));
        let mut h = Sha256::new();
        h.update(tag.as_bytes());
        h.update([0u8]);
        // serde_json's maps are sorted by key: one text per payload.
        h.update(Json::Object(clean).to_string().as_bytes());
        Self(h.finalize().into())
    }
}

/// Keys Salt adds to event data: `_stamp`, and `__pub_*` from `event.send`.
fn salt_key(k: &str) -> bool {
    k == "_stamp" || k.starts_with("__pub_")
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// What it is about.
    pub entity: Entity,
    /// What it asks.
    pub op: Op,
    /// Its tag, as fired.
    pub tag: String,
    /// The caller's id, which the reply's tag names.
    pub request_id: String,
    /// Who fired it, as far as the bus tells: a minion's (claimed) or unverified.
    pub origin: Origin,
    /// The arguments, without `request_id` and Salt's own keys.
    pub args: Map<String, Json>,
    /// The digest of the whole payload, `request_id` included.
    pub digest: Digest,
}

/// A request that cannot be served, with the id to reply to when known.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    /// The id to reply to, when it can be read.
    pub request_id: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// Parses `event` as a request. `None` when its tag is not for the registry
/// service (replies and notifications share the prefix and are not requests).
pub fn parse(event: &Event) -> Option<Result<Request, Malformed>> {
    let rest = event.tag.strip_prefix(REQUEST_PREFIX)?;
    // The op is the last segment: a forward's entity has two.
    let (entity, op) = rest.rsplit_once('/')?;
    let entity = Entity::from_tag_part(entity)?;
    let (origin, payload) = match event.kind() {
        EventKind::MinionFired(m) => (Origin::Minion(m.id.to_owned()), to_json(m.payload)),
        _ => (Origin::Unverified, event.data_json()),
    };
    let op = match op {
        "create" => Op::Create,
        "find" => Op::Find,
        "update" => Op::Update,
        "delete" => Op::Delete,
        "exec" => Op::Exec,
        "passwd" => Op::Passwd,
        // Only backups have results (a backup server's run).
        "result" if entity == Entity::Backup => Op::Result,
        other if NOTIFICATIONS.contains(&other) => return None,
        other => {
            return Some(Err(Malformed {
                request_id: readable_id(&payload),
                message: format!(
                    "{}: unknown operation {other:?} (one of {})",
                    event.tag,
                    REQUEST_OPS.join(", ")
                ),
            }))
        }
    };
    let Json::Object(mut args) = payload else {
        return Some(Err(Malformed {
            request_id: None,
            message: format!("{}: data is not a map", event.tag),
        }));
    };
    let digest = Digest::of(&event.tag, &args);
    args.retain(|k, _| !salt_key(k));
    if op == Op::Result && !args.contains_key("request_id") {
        // A wrapper's result has no request id: its run id stands for one
        // (no reply is fired for a result).
        if let Some(Json::String(run)) = args.get("run_id") {
            let id = format!("result-{run}");
            if valid_request_id(&id) {
                args.insert("request_id".into(), Json::String(id));
            }
        }
    }
    let request_id = match args.remove("request_id") {
        Some(Json::String(id)) if valid_request_id(&id) => id,
        Some(Json::Number(n)) if valid_request_id(&n.to_string()) => {
            return Some(Err(Malformed {
                request_id: Some(n.to_string()),
                message: format!("{}: request_id must be a string, not {n}", event.tag),
            }))
        }
        Some(other) => {
            return Some(Err(Malformed {
                request_id: None,
                message: format!(
                    "{}: request_id must be 1-128 characters of [A-Za-z0-9._-], not {other}",
                    event.tag
                ),
            }))
        }
        None => {
            return Some(Err(Malformed {
                request_id: None,
                message: format!("{}: no request_id", event.tag),
            }))
        }
    };
    Some(Ok(Request {
        entity,
        op,
        tag: event.tag.clone(),
        request_id,
        origin,
        args,
        digest,
    }))
}

/// The `request_id` of a payload when it can be replied to.
fn readable_id(payload: &Json) -> Option<String> {
    let id = match payload.get("request_id")? {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        _ => return None,
    };
    valid_request_id(&id).then_some(id)
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The tag a reply to `request_id` is fired on.
pub fn reply_tag(request_id: &str) -> String {
    format!("{REQUEST_PREFIX}reply/{request_id}")
}

/// The reply for a failure.
pub fn error_reply(code: &str, message: &str) -> Json {
    json!({"ok": false, "error": {"code": code, "message": message}})
}

/// Who a receipt says ran the job that fired a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptBy {
    /// The master's runner (`salt-run event.send`): for unwrapped requests.
    Runner,
    /// This minion's `salt-call event.send`: for its wrapped requests.
    Minion(String),
}

/// A job event naming a request's payload: the claim that the job cache is
/// asked to confirm before the request is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The job, as the event names it.
    pub jid: String,
    /// The digest of the payload the job sent.
    pub digest: Digest,
    /// Who ran it, as the event says.
    pub by: ReceiptBy,
}

impl Receipt {
    /// Whether this receipt is for requests of `origin`.
    fn fits(&self, origin: &Origin) -> bool {
        match (&self.by, origin) {
            (ReceiptBy::Runner, Origin::Unverified) => true,
            (ReceiptBy::Minion(a), Origin::Minion(b)) => a == b,
            _ => false,
        }
    }
}

/// `event` as a receipt: the `salt/run/<jid>/new` of `runner.event.send`, or
/// the `salt/job/<jid>/ret/<id>` of a minion's `event.send`, for a request tag.
pub fn receipt_of(event: &Event) -> Option<Receipt> {
    if let Some(rest) = event.tag.strip_prefix("salt/run/") {
        let jid = rest.strip_suffix("/new")?;
        if event.str_field("fun") != Some("runner.event.send") {
            return None;
        }
        // A minion's plain `event.fire_master` on this tag keeps the
        // wrapper's `cmd` and `id` (preload can change them, not remove
        // them); the runner's own event has neither. (A batch's `pretag` can
        // make a clean one: hence the job cache, see the module docs.)
        if event.field("cmd").is_some() || event.field("id").is_some() {
            return None;
        }
        let args = event.field("fun_args").map(to_json).unwrap_or(Json::Null);
        let digest = sent_digest(&args)?;
        return Some(Receipt {
            jid: jid.to_owned(),
            digest,
            by: ReceiptBy::Runner,
        });
    }
    match event.kind() {
        EventKind::JobReturn(r) if r.fun == "event.send" => {
            let args = event.field("fun_args").map(to_json).unwrap_or(Json::Null);
            Some(Receipt {
                jid: r.jid.to_owned(),
                digest: sent_digest(&args)?,
                by: ReceiptBy::Minion(r.id.to_owned()),
            })
        }
        _ => None,
    }
}

/// The digest of what `event.send(tag, data)` sent, from its arguments as
/// Salt records them: `[tag, data]` with data a map or text holding JSON or
/// YAML (`data=` in front when given by keyword), or kwargs in a `__kwarg__`
/// map. Only request tags count.
fn sent_digest(args: &Json) -> Option<Digest> {
    let list = args.as_array()?;
    let mut tag = None;
    let mut data = None;
    for (i, a) in list.iter().enumerate() {
        match a {
            Json::String(s) if i == 0 => tag = Some(s.clone()),
            Json::Object(m) if m.get("__kwarg__").is_some() => {
                if let Some(Json::String(t)) = m.get("tag") {
                    tag = Some(t.clone());
                }
                if let Some(d) = m.get("data") {
                    data = Some(d.clone());
                }
            }
            Json::String(s) if i == 1 => {
                data = Some(Json::String(
                    s.strip_prefix("data=").unwrap_or(s).to_owned(),
                ))
            }
            other if i == 1 => data = Some(other.clone()),
            _ => {}
        }
    }
    let tag = tag?;
    if !crate::bus::origin::is_request_tag(&tag) {
        return None;
    }
    let map = match data? {
        Json::Object(m) => m,
        Json::String(text) => match serde_json::from_str(&text)
            .or_else(|_| serde_yaml_ng::from_str::<Json>(&text).map_err(|_| ()))
        {
            Ok(Json::Object(m)) => m,
            _ => return None,
        },
        _ => return None,
    };
    Some(Digest::of(&tag, &map))
}

/// A bounded pool of items by digest, first in first out, each kept for the
/// same time (so insertion order is expiry order).
#[derive(Debug)]
struct Pool<T> {
    ttl: Duration,
    seq: u64,
    by_digest: HashMap<Digest, VecDeque<(u64, Instant, T)>>,
    /// (seq, digest) in insertion order; entries taken out early stay here
    /// until they reach the front.
    order: VecDeque<(u64, Digest)>,
    len: usize,
}

impl<T> Pool<T> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            seq: 0,
            by_digest: HashMap::new(),
            order: VecDeque::new(),
            len: 0,
        }
    }

    /// Adds `item`; returns the oldest item when that made room for it.
    fn push(&mut self, digest: Digest, item: T, now: Instant) -> Option<T> {
        let evicted = if self.len >= MAX_PENDING {
            self.pop_oldest().map(|(_, t)| t)
        } else {
            None
        };
        self.seq += 1;
        let until = crate::clock::deadline(now, self.ttl);
        self.by_digest
            .entry(digest)
            .or_default()
            .push_back((self.seq, until, item));
        self.order.push_back((self.seq, digest));
        self.len += 1;
        evicted
    }

    /// Takes the oldest item with `digest` that `fits`.
    fn take(&mut self, digest: &Digest, fits: impl Fn(&T) -> bool) -> Option<T> {
        let list = self.by_digest.get_mut(digest)?;
        let i = list.iter().position(|(_, _, t)| fits(t))?;
        let (_, _, item) = list.remove(i)?;
        if list.is_empty() {
            self.by_digest.remove(digest);
        }
        self.len -= 1;
        self.compact();
        Some(item)
    }

    /// The items whose time is up.
    fn expire(&mut self, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(&(seq, digest)) = self.order.front() {
            let until = self
                .by_digest
                .get(&digest)
                .and_then(|l| l.iter().find(|(s, _, _)| *s == seq))
                .map(|(_, u, _)| *u);
            match until {
                Some(u) if u > now => break,
                Some(_) => {
                    if let Some((_, t)) = self.pop_oldest() {
                        out.push(t);
                    }
                }
                // Taken out already.
                None => {
                    self.order.pop_front();
                }
            }
        }
        out
    }

    fn pop_oldest(&mut self) -> Option<(Digest, T)> {
        while let Some((seq, digest)) = self.order.pop_front() {
            let Some(list) = self.by_digest.get_mut(&digest) else {
                continue;
            };
            let Some(i) = list.iter().position(|(s, _, _)| *s == seq) else {
                continue;
            };
            let item = list.remove(i).map(|(_, _, t)| t);
            if list.is_empty() {
                self.by_digest.remove(&digest);
            }
            if let Some(t) = item {
                self.len -= 1;
                return Some((digest, t));
            }
        }
        None
    }

    /// Drops order entries of items taken out early, when they pile up.
    fn compact(&mut self) {
        if self.order.len() > 2 * MAX_PENDING {
            let live = &self.by_digest;
            self.order.retain(|(seq, d)| {
                live.get(d)
                    .is_some_and(|l| l.iter().any(|(s, _, _)| s == seq))
            });
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn any(&self, pred: impl Fn(&T) -> bool) -> bool {
        self.by_digest
            .values()
            .any(|l| l.iter().any(|(_, _, t)| pred(t)))
    }
}

/// Requests waiting for their receipt, and receipts waiting for their request.
#[derive(Debug)]
pub struct Corroborations {
    receipts: Pool<Receipt>,
    waiting: Pool<Request>,
    /// Backup results: they wait [`RESULT_WAIT`] (a pool per wait keeps
    /// each pool's expiry in insertion order).
    results: Pool<Request>,
}

impl Default for Corroborations {
    fn default() -> Self {
        Self {
            receipts: Pool::new(CORROBORATION_TTL),
            waiting: Pool::new(CORROBORATION_WAIT),
            results: Pool::new(RESULT_WAIT),
        }
    }
}

/// What became of a request given to [`Corroborations::request`].
#[derive(Debug)]
pub enum Pairing {
    /// Its receipt had come: confirm it, then serve.
    Paired(Request, Receipt),
    /// It waits for its receipt; `evicted` is the oldest waiting request,
    /// pushed out to make room (refuse it).
    Waiting { evicted: Option<Request> },
}

impl Corroborations {
    /// A receipt came: the waiting request it is for, if any; otherwise it
    /// is kept for a request that follows.
    pub fn receipt(&mut self, receipt: Receipt, now: Instant) -> Option<(Request, Receipt)> {
        let fits = |r: &Request| receipt.fits(&r.origin);
        if let Some(req) = self.waiting.take(&receipt.digest, fits) {
            return Some((req, receipt));
        }
        if let Some(req) = self.results.take(&receipt.digest, fits) {
            return Some((req, receipt));
        }
        let digest = receipt.digest;
        self.receipts.push(digest, receipt, now);
        None
    }

    /// A request that needs a receipt: paired with one that came, or kept waiting.
    pub fn request(&mut self, req: Request, now: Instant) -> Pairing {
        if let Some(receipt) = self.receipts.take(&req.digest, |r| r.fits(&req.origin)) {
            return Pairing::Paired(req, receipt);
        }
        let digest = req.digest;
        let pool = if req.op == Op::Result {
            &mut self.results
        } else {
            &mut self.waiting
        };
        Pairing::Waiting {
            evicted: pool.push(digest, req, now),
        }
    }

    /// The requests whose wait for a receipt is over (refuse them).
    pub fn expired(&mut self, now: Instant) -> Vec<Request> {
        self.receipts.expire(now);
        let mut out = self.waiting.expire(now);
        out.extend(self.results.expire(now));
        out
    }

    /// Nothing waits: no request for its receipt, no receipt for its request.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.results.is_empty() && self.receipts.is_empty()
    }

    /// Whether a request with `request_id` waits for its receipt.
    pub fn waiting_with_id(&self, request_id: &str) -> bool {
        let same = |r: &Request| r.request_id == request_id;
        self.waiting.any(same) || self.results.any(same)
    }

    /// How many requests and receipts are waiting (tests check the bounds).
    #[cfg(test)]
    pub fn len(&self) -> (usize, usize) {
        (self.waiting.len() + self.results.len(), self.receipts.len())
    }
}

/// Asks the master's job cache, until `deadline`, whether `receipt` is true
/// for `req` (see the module docs). `pki_dir`: the master's, whose
/// `minions/` lists the ids of accepted minions. `Err` says why not.
pub async fn confirm(
    client: &SaltClient,
    pki_dir: &Path,
    req: &Request,
    receipt: &Receipt,
    deadline: Instant,
) -> Result<(), String> {
    let mut wait = Duration::from_millis(200);
    loop {
        // The lookup ends by the deadline, so a refusal is fired in time.
        let left = deadline.saturating_duration_since(Instant::now());
        let why = match client.job_cache_lookup(&receipt.jid, left).await {
            Ok(job) => match confirmed_by(&job, pki_dir, req, receipt) {
                Ok(()) => return Ok(()),
                Err(why) => why,
            },
            Err(error) => format!("job cache lookup failed: {error}"),
        };
        if crate::clock::deadline_in(wait) >= deadline {
            return Err(why);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Whether `job`, the job cache's `jobs.list_job` of the receipt's jid,
/// confirms the receipt for `req`.
fn confirmed_by(
    job: &Json,
    pki_dir: &Path,
    req: &Request,
    receipt: &Receipt,
) -> Result<(), String> {
    let result = job
        .get("Result")
        .and_then(Json::as_object)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            format!(
                "the master's job cache has no return for job {}",
                receipt.jid
            )
        })?;
    match &receipt.by {
        ReceiptBy::Runner => {
            let vouches = result.iter().any(|(id, entry)| {
                // The runner stores its return under the master's own id:
                // never an accepted minion's (a minion can store returns
                // for any jid, but only under its own id).
                let a_minion =
                    !crate::salt::is_key_file_name(id) || pki_dir.join("minions").join(id).exists();
                let ret = entry.get("return");
                !a_minion
                    && ret.and_then(|r| r.get("fun")).and_then(Json::as_str)
                        == Some("runner.event.send")
                    && ret.and_then(|r| r.get("fun_args")).and_then(sent_digest) == Some(req.digest)
            });
            if vouches {
                Ok(())
            } else {
                Err(format!(
                    "job {} in the master's job cache is no runner.event.send of this request",
                    receipt.jid
                ))
            }
        }
        ReceiptBy::Minion(id) => {
            let function = job.get("Function").and_then(Json::as_str);
            let digest = job.get("Arguments").and_then(sent_digest);
            if result.contains_key(id)
                && function == Some("event.send")
                && digest == Some(req.digest)
            {
                Ok(())
            } else {
                Err(format!(
                    "job {} in the master's job cache is no event.send of this request by {id}",
                    receipt.jid
                ))
            }
        }
    }
}

/// Serves one authorised request against the registry; the reply data.
pub async fn serve<S: Store>(service: &registry::Service<S>, req: &Request) -> Json {
    match execute(service, req).await {
        Ok(result) => json!({"ok": true, "result": result}),
        Err(e) => error_reply(e.code(), &e.to_string()),
    }
}

async fn execute<S: Store>(
    service: &registry::Service<S>,
    req: &Request,
) -> Result<Json, registry::Error> {
    execute_op(service, req.entity, req.op, &req.args).await
}

/// Runs one registry operation with its arguments, as read from a bus
/// request or built by the HTTP API (`api::http`): the one execute path,
/// so the two never diverge. Who may ask is the caller's business.
pub async fn execute_op<S: Store>(
    service: &registry::Service<S>,
    entity: Entity,
    op: Op,
    args: &Map<String, Json>,
) -> Result<Json, registry::Error> {
    let args = Args(args);
    match entity {
        Entity::Server => server(service, op, args).await,
        Entity::Model => model(service, op, args).await,
        Entity::PortForward => super::forward::port(service, op, args).await,
        Entity::HostnameForward => super::forward::hostname(service, op, args).await,
        Entity::Share => super::share::serve(service, op, args).await,
        Entity::Backup => super::backup::backup(service, op, args).await,
    }
}

/// The server referred to as `server`, `id` or `name` (an id or a name, as the CLI reads one).
const SERVER: &[&str] = &["server", "id", "name"];

async fn server<S: Store>(
    service: &registry::Service<S>,
    op: Op,
    args: Args<'_>,
) -> Result<Json, registry::Error> {
    match op {
        Op::Create => {
            let patch = registry::ServerPatch::from_json(args.0, &[])?;
            encode(&service.create_server(patch).await?)
        }
        Op::Find => {
            let status = match args.opt_text("status")? {
                Some(s) => Some(s.parse()?),
                None => None,
            };
            let filter = registry::ServerFilter {
                name: args.opt_text("name")?,
                model: args.opt_text("model")?,
                minion_id: args.opt_text("minion_id")?,
                status,
                ..registry::ServerFilter::default()
            };
            encode(&service.find_servers(&filter).await?)
        }
        Op::Update => {
            let target = server_ref(args)?;
            let patch = registry::ServerPatch::from_json(args.0, &["server", "id"])?;
            encode(&service.update_server(&target, patch).await?)
        }
        Op::Delete => encode(&service.delete_server(&server_ref(args)?).await?),
        Op::Exec | Op::Passwd | Op::Result => Err(not_here("server")),
    }
}

/// `exec` on an entity that has none (or, for servers, outside the request
/// server's exec path).
pub(super) fn not_here(entity: &str) -> registry::Error {
    registry::Error::invalid(
        "op",
        format!("exec and passwd are not {entity} operations here (steward/v1/server/exec runs a function on a server, steward/v1/share/passwd sets a share's password)"),
    )
}

/// The exec request `req` asks: `server` (id or name), `fun`, optional
/// `arg` (list), `kwarg` (map) and `timeout` (seconds, at most `max_timeout`).
pub fn exec_request(
    req: &Request,
    max_timeout: std::time::Duration,
) -> Result<crate::exec::ExecRequest, registry::Error> {
    let args = Args(&req.args);
    args.only(&["server", "id", "name", "fun", "arg", "kwarg", "timeout"])?;
    let arg = match req.args.get("arg") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(a)) => a.clone(),
        Some(other) => {
            return Err(registry::Error::invalid(
                "arg",
                format!("{other} is not a list"),
            ))
        }
    };
    let kwarg = match req.args.get("kwarg") {
        None | Some(Json::Null) => Map::new(),
        Some(Json::Object(m)) => m.clone(),
        Some(other) => {
            return Err(registry::Error::invalid(
                "kwarg",
                format!("{other} is not a map"),
            ))
        }
    };
    let timeout = match args.opt_int(&["timeout"])? {
        Some(t) if t >= 1 => std::time::Duration::from_secs(t.unsigned_abs()).min(max_timeout),
        Some(t) => {
            return Err(registry::Error::invalid(
                "timeout",
                format!("{t} is not a positive number of seconds"),
            ))
        }
        None => max_timeout,
    };
    Ok(crate::exec::ExecRequest {
        server: server_ref(args)?,
        fun: args.text("fun")?,
        arg,
        kwarg,
        timeout,
    })
}

/// The server a request names: the first of `server`, `id`, `name` given.
fn server_ref(args: Args<'_>) -> Result<ServerRef, registry::Error> {
    let key = SERVER
        .iter()
        .find_map(|k| args.text(k).ok())
        .ok_or_else(|| registry::Error::invalid("server", "required"))?;
    Ok(key.parse().unwrap_or(ServerRef::Name(key)))
}

async fn model<S: Store>(
    service: &registry::Service<S>,
    op: Op,
    args: Args<'_>,
) -> Result<Json, registry::Error> {
    match op {
        Op::Create => {
            let states = string_list(args.0.get("states"))?;
            let model = service
                .create_model(
                    &args.text("name")?,
                    &args.opt_text("description")?.unwrap_or_default(),
                    &states,
                )
                .await?;
            encode(&model)
        }
        Op::Find => match args.opt_text("name")? {
            Some(name) => encode(&vec![service.get_model(&name).await?]),
            None => encode(&service.list_models().await?),
        },
        Op::Update => {
            let patch = registry::ModelPatch {
                description: args.opt_text("description")?,
                states: match args.0.get("states") {
                    Some(v) => Some(string_list(Some(v))?),
                    None => None,
                },
            };
            encode(&service.update_model(&args.text("name")?, patch).await?)
        }
        Op::Delete => encode(&service.delete_model(&args.text("name")?).await?),
        Op::Exec | Op::Passwd | Op::Result => Err(not_here("model")),
    }
}

fn string_list(v: Option<&Json>) -> Result<Vec<String>, registry::Error> {
    match v {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| registry::Error::invalid("states", "must be strings".to_owned()))
            })
            .collect(),
        Some(Json::String(s)) => Ok(s
            .split(',')
            .map(|x| x.trim().to_owned())
            .filter(|x| !x.is_empty())
            .collect()),
        Some(other) => Err(registry::Error::invalid(
            "states",
            format!("must be a list, not {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::event::from_json;

    fn ev(tag: &str, data: Json) -> Event {
        Event::new(tag.into(), from_json(&data))
    }

    fn request(tag: &str, data: Json) -> Request {
        parse(&ev(tag, data)).unwrap().unwrap()
    }

    #[test]
    fn backup_results_are_requests_named_by_their_run() {
        // salt-call event.send: the master fires the minion's whole load.
        let wrapped = ev(
            "steward/v1/backup/result",
            json!({"id": "bk1-1", "cmd": "_minion_event", "tag": "steward/v1/backup/result",
                "data": {"backup_id": 1, "run_id": "ab-12", "outcome": "ok", "__pub_jid": "1"}}),
        );
        let r = request_of(&wrapped);
        assert_eq!((r.entity, r.op), (Entity::Backup, Op::Result));
        assert_eq!(r.origin, Origin::Minion("bk1-1".into()));
        assert_eq!(r.request_id, "result-ab-12");
        // The receipt of that event.send names the same digest.
        let args = json!([
            "steward/v1/backup/result",
            "{\"backup_id\": 1, \"run_id\": \"ab-12\", \"outcome\": \"ok\"}"
        ]);
        assert_eq!(sent_digest(&args), Some(r.digest));
        // Only backups have results.
        let other = parse(&ev("steward/v1/server/result", json!({"request_id": "x"})));
        assert!(other.unwrap().is_err());
    }

    fn request_of(e: &Event) -> Request {
        parse(e).unwrap().unwrap()
    }

    #[test]
    fn a_result_with_fractions_has_the_digest_of_its_event_send_arguments() {
        // The wrapper's JSON text (Python's shortest float spellings) is in
        // the receipt; the event carries the same floats as msgpack. This
        // start time is one that serde_json's default (fast, not always
        // correctly rounded) parsing reads 1 ULP off: the digests differed
        // and the genuine result was refused as unverified (CI, under any
        // load: about one timestamp in eight).
        let text = r#"{"backup_id": 1, "duration_s": 0.533, "run_id": "ab-12", "outcome": "ok", "started": 1796355323.0217273}"#;
        let data: Json = serde_json::from_str(text).unwrap();
        let started = data["started"].as_f64().unwrap();
        assert_eq!(started.to_bits(), 1796355323.0217273_f64.to_bits());
        let wrapped = ev(
            "steward/v1/backup/result",
            json!({"id": "bk1-1", "cmd": "_minion_event", "tag": "steward/v1/backup/result",
                "data": data}),
        );
        let r = request_of(&wrapped);
        let args = json!(["steward/v1/backup/result", text]);
        assert_eq!(sent_digest(&args), Some(r.digest));
    }

    #[test]
    fn a_backup_result_waits_longer_for_its_receipt_than_a_request() {
        let now = Instant::now();
        let mut c = Corroborations::default();
        let result = request_of(&ev(
            "steward/v1/backup/result",
            json!({"id": "bk1-1", "cmd": "_minion_event", "tag": "steward/v1/backup/result",
                "data": {"backup_id": 1, "run_id": "ab-12", "outcome": "ok"}}),
        ));
        let create = request_of(&ev(
            "steward/v1/server/create",
            json!({"id": "bk1-1", "cmd": "_minion_event", "tag": "steward/v1/server/create",
                "data": {"request_id": "r1", "name": "a.example.org", "model": "web"}}),
        ));
        assert!(matches!(
            c.request(result.clone(), now),
            Pairing::Waiting { evicted: None }
        ));
        assert!(matches!(
            c.request(create.clone(), now),
            Pairing::Waiting { evicted: None }
        ));
        assert!(c.waiting_with_id("result-ab-12"));
        // Past a request's wait, only the request is given up.
        let later = now + CORROBORATION_WAIT + Duration::from_millis(1);
        assert_eq!(c.expired(later), vec![create]);
        // The slow salt-call's return still pairs with the result...
        let receipt = Receipt {
            jid: "20261204000000000001".into(),
            digest: result.digest,
            by: ReceiptBy::Minion("bk1-1".into()),
        };
        assert_eq!(
            c.receipt(receipt.clone(), later),
            Some((result.clone(), receipt))
        );
        assert!(c.is_empty());
        // ...and a result whose receipt never comes is given up in time.
        assert!(matches!(
            c.request(result.clone(), now),
            Pairing::Waiting { .. }
        ));
        assert!(c.expired(now + CORROBORATION_WAIT * 2).is_empty());
        let expired = c.expired(now + RESULT_WAIT + Duration::from_millis(1));
        assert_eq!(expired, vec![result]);
    }

    #[test]
    fn requests_are_parsed_with_their_origin() {
        let master = ev(
            "steward/v1/server/create",
            json!({"request_id": "r1", "name": "a.example.org", "model": "web", "_stamp": "x"}),
        );
        let r = parse(&master).unwrap().unwrap();
        assert_eq!(
            (r.entity, r.op, r.origin.clone()),
            (Entity::Server, Op::Create, Origin::Unverified)
        );
        assert_eq!(r.request_id, "r1");
        assert_eq!(
            r.args,
            json!({"name": "a.example.org", "model": "web"})
                .as_object()
                .unwrap()
                .clone()
        );

        let minion = ev(
            "steward/v1/model/find",
            json!({"id": "web1", "cmd": "_minion_event", "tag": "steward/v1/model/find",
                   "data": {"request_id": "r2", "__pub_fun": "event.send"}}),
        );
        let r = parse(&minion).unwrap().unwrap();
        assert_eq!(r.origin, Origin::Minion("web1".into()));
        assert!(r.args.is_empty());

        let fwd = ev(
            "steward/v1/forward/port/update",
            json!({"request_id": "r9", "id": 3, "to_port": 80}),
        );
        let r = parse(&fwd).unwrap().unwrap();
        assert_eq!((r.entity, r.op), (Entity::PortForward, Op::Update));
        let r = request(
            "steward/v1/forward/hostname/find",
            json!({"request_id": "r10"}),
        );
        assert_eq!((r.entity, r.op), (Entity::HostnameForward, Op::Find));
        let unknown = parse(&ev(
            "steward/v1/forward/port/frob",
            json!({"request_id": "r11"}),
        ))
        .unwrap()
        .unwrap_err();
        assert_eq!(unknown.request_id.as_deref(), Some("r11"));
        for not_requests in [
            "steward/v1/forward/port/created",
            "steward/v1/forward/hostname/deleted",
            "steward/v1/forward/create",
            "steward/v1/forward/port/create/extra",
        ] {
            assert!(
                parse(&ev(not_requests, json!({"request_id": "r"}))).is_none(),
                "{not_requests}"
            );
        }
        // One list of entities for the tag rules and the parser.
        assert_eq!(
            Entity::ALL.map(Entity::as_str),
            crate::bus::origin::REQUEST_ENTITIES
        );

        assert!(parse(&ev("steward/v1/reply/r1", json!({"ok": true}))).is_none());
        assert!(parse(&ev("steward/v1/server/created", json!({}))).is_none());
        assert!(parse(&ev("other/tag", json!({}))).is_none());
    }

    #[test]
    fn malformed_requests_say_why_and_get_a_reply_when_their_id_is_readable() {
        let no_id = parse(&ev("steward/v1/server/create", json!({"name": "a"}))).unwrap();
        assert!(no_id.unwrap_err().message.contains("no request_id"));
        let bad_id = parse(&ev(
            "steward/v1/server/create",
            json!({"request_id": "a/b"}),
        ))
        .unwrap()
        .unwrap_err();
        assert!(bad_id.message.contains("request_id"));
        assert_eq!(bad_id.request_id, None, "no reply tag can be made of it");
        let list = parse(&ev("steward/v1/server/create", json!([1, 2]))).unwrap();
        assert!(list.unwrap_err().message.contains("not a map"));
        // Readable ids: answered.
        let unknown = parse(&ev(
            "steward/v1/server/frobnicate",
            json!({"request_id": "r7"}),
        ))
        .unwrap()
        .unwrap_err();
        assert_eq!(unknown.request_id.as_deref(), Some("r7"));
        assert!(
            unknown.message.contains("unknown operation"),
            "{}",
            unknown.message
        );
        let number = parse(&ev("steward/v1/server/delete", json!({"request_id": 42})))
            .unwrap()
            .unwrap_err();
        assert_eq!(number.request_id.as_deref(), Some("42"));
        let wrapped = parse(&ev(
            "steward/v1/model/frob",
            json!({"cmd": "_minion_event", "id": "m1", "data": {"request_id": "r8"}}),
        ))
        .unwrap()
        .unwrap_err();
        assert_eq!(wrapped.request_id.as_deref(), Some("r8"));
    }

    #[test]
    fn the_digest_covers_the_whole_payload_but_salts_own_keys() {
        let a = request(
            "steward/v1/server/create",
            json!({"request_id": "r1", "name": "a", "model": "web", "_stamp": "1"}),
        );
        let same = request(
            "steward/v1/server/create",
            json!({"model": "web", "name": "a", "request_id": "r1", "_stamp": "2", "__pub_jid": "x"}),
        );
        assert_eq!(
            a.digest, same.digest,
            "key order and Salt's keys do not count"
        );
        let other_name = request(
            "steward/v1/server/create",
            json!({"request_id": "r1", "name": "evil", "model": "web"}),
        );
        assert_ne!(
            a.digest, other_name.digest,
            "same request_id, other payload"
        );
        let other_tag = request(
            "steward/v1/server/delete",
            json!({"request_id": "r1", "name": "a", "model": "web"}),
        );
        assert_ne!(a.digest, other_tag.digest);
    }

    fn runner_new(jid: &str, fun_args: Json) -> Event {
        ev(
            &format!("salt/run/{jid}/new"),
            json!({"fun": "runner.event.send", "jid": jid, "user": "root", "fun_args": fun_args}),
        )
    }

    #[test]
    fn receipts_are_the_runners_and_minions_job_events_naming_the_payload() {
        let req = request(
            "steward/v1/server/create",
            json!({"request_id": "r1", "name": "a", "_stamp": "x"}),
        );
        let r = receipt_of(&runner_new(
            "20261123000000000001",
            json!(["steward/v1/server/create", {"request_id": "r1", "name": "a"}]),
        ))
        .unwrap();
        assert_eq!(
            (r.jid.as_str(), &r.digest, &r.by),
            ("20261123000000000001", &req.digest, &ReceiptBy::Runner)
        );
        // data given as text (JSON or YAML flow), or by keyword
        for args in [
            json!([
                "steward/v1/server/create",
                "{\"request_id\": \"r1\", \"name\": \"a\"}"
            ]),
            json!(["steward/v1/server/create", "{request_id: r1, name: a}"]),
            json!([
                "steward/v1/server/create",
                "data={\"request_id\": \"r1\", \"name\": \"a\"}"
            ]),
            json!([{"__kwarg__": true, "tag": "steward/v1/server/create",
                    "data": {"request_id": "r1", "name": "a"}}]),
        ] {
            let r = receipt_of(&runner_new("2", args.clone())).unwrap();
            assert_eq!(r.digest, req.digest, "{args}");
        }
        // A forward request's receipt.
        let fwd = request(
            "steward/v1/forward/port/delete",
            json!({"request_id": "r2", "id": 1}),
        );
        let r = receipt_of(&runner_new(
            "3",
            json!(["steward/v1/forward/port/delete", {"request_id": "r2", "id": 1}]),
        ))
        .unwrap();
        assert_eq!(r.digest, fwd.digest);
        // A minion's salt-call event.send, as its return event says.
        let ret = ev(
            "salt/job/20261202134117861877/ret/web1",
            json!({"cmd": "_return", "id": "web1", "jid": "20261202134117861877", "fun": "event.send",
                   "fun_args": ["steward/v1/server/create", "{\"request_id\": \"r1\", \"name\": \"a\"}"],
                   "return": true, "retcode": 0}),
        );
        let r = receipt_of(&ret).unwrap();
        assert_eq!(r.by, ReceiptBy::Minion("web1".into()));
        assert_eq!(r.digest, req.digest);
        // Not receipts: another runner, a non-request tag, a plain fire_master imitation.
        assert!(receipt_of(&ev(
            "salt/run/3/new",
            json!({"fun": "runner.jobs.list_jobs", "fun_args": []})
        ))
        .is_none());
        assert!(receipt_of(&runner_new("4", json!(["myapp/x", {"request_id": "r1"}]))).is_none());
        assert!(receipt_of(&ev(
            "salt/run/5/new",
            json!({"cmd": "_minion_event", "id": "evil", "fun": "runner.event.send",
                   "fun_args": ["steward/v1/server/create", {"request_id": "r1", "name": "a"}]})
        ))
        .is_none());
    }

    #[test]
    fn a_receipt_vouches_only_for_its_payload_and_origin_once() {
        let now = Instant::now();
        let mut c = Corroborations::default();
        let genuine = request(
            "steward/v1/server/create",
            json!({"request_id": "r1", "name": "a.example.org", "model": "web"}),
        );
        let forged = request(
            "steward/v1/server/create",
            json!({"request_id": "r1", "name": "evil.example.org", "model": "web"}),
        );
        // The forged request comes first and waits.
        assert!(matches!(
            c.request(forged.clone(), now),
            Pairing::Waiting { evicted: None }
        ));
        // The genuine receipt is not for it...
        let receipt = Receipt {
            jid: "20261123000000000001".into(),
            digest: genuine.digest,
            by: ReceiptBy::Runner,
        };
        assert!(c.receipt(receipt.clone(), now).is_none());
        // ...but for the genuine request, which is paired at once.
        match c.request(genuine.clone(), now) {
            Pairing::Paired(r, rc) => assert_eq!((r, rc), (genuine.clone(), receipt.clone())),
            other => panic!("{other:?}"),
        }
        // used once
        assert!(matches!(
            c.request(genuine.clone(), now),
            Pairing::Waiting { .. }
        ));
        // A minion's receipt is for that minion's wrapped request only.
        let m_receipt = Receipt {
            jid: "2".into(),
            digest: genuine.digest,
            by: ReceiptBy::Minion("web1".into()),
        };
        assert!(!m_receipt.fits(&Origin::Unverified));
        assert!(!m_receipt.fits(&Origin::Minion("web2".into())));
        assert!(m_receipt.fits(&Origin::Minion("web1".into())));
        // The forged one, and the second genuine, time out.
        let later = now + CORROBORATION_WAIT + Duration::from_millis(1);
        let expired = c.expired(later);
        assert_eq!(expired, vec![forged, genuine]);
        assert_eq!(c.len(), (0, 0));
    }

    #[test]
    fn the_pools_are_bounded_oldest_out_first() {
        let now = Instant::now();
        let mut c = Corroborations::default();
        let mut first = None;
        for i in 0..MAX_PENDING + 3 {
            let req = request(
                "steward/v1/server/create",
                json!({"request_id": format!("r{i}"), "name": "x"}),
            );
            if i == 0 {
                first = Some(req.clone());
            }
            match c.request(req, now) {
                Pairing::Waiting { evicted: Some(old) } if i == MAX_PENDING => {
                    assert_eq!(Some(old), first.clone())
                }
                Pairing::Waiting { evicted: None } if i < MAX_PENDING => {}
                Pairing::Waiting { evicted: Some(_) } if i > MAX_PENDING => {}
                other => panic!("{i}: {other:?}"),
            }
            let receipt = Receipt {
                jid: format!("{i}"),
                digest: Digest::of("steward/v1/server/delete", &Map::new()),
                by: ReceiptBy::Runner,
            };
            c.receipt(receipt, now);
        }
        assert_eq!(c.len(), (MAX_PENDING, MAX_PENDING));
    }

    /// A master that takes the connection and never answers (overloaded,
    /// or stopped) does not hold a request past its deadline: the lookup's
    /// own round trip (connect, then 30 s) is cut off there, so the refusal
    /// is fired in time.
    #[tokio::test(start_paused = true)]
    async fn a_silent_master_does_not_hold_a_confirmation_past_its_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join(".root_key");
        std::fs::write(&key, "k").unwrap();
        let req = crate::salt::ReqClient::with_key_file(
            format!("127.0.0.1:{port}"),
            crate::salt::request::Transport::Zeromq,
            key,
            "root".into(),
            Duration::from_secs(30),
        );
        let cancel = tokio_util::sync::CancellationToken::new();
        let bus = crate::bus::BusHandle::new(
            crate::bus::BusEndpoint::Unix(dir.path().join("nobody.ipc")),
            crate::bus::SubscriberOptions::default(),
        );
        let tracker = crate::salt::JobTracker::start(bus.subscribe(), cancel.clone());
        let client = SaltClient::new(req, tracker);
        let r = request(
            "steward/v1/server/create",
            json!({"request_id": "s1", "name": "a"}),
        );
        let receipt = Receipt {
            jid: "20261204080000000001".into(),
            digest: r.digest,
            by: ReceiptBy::Runner,
        };
        let deadline = Instant::now() + CONFIRM_WAIT;
        let why = confirm(&client, dir.path(), &r, &receipt, deadline)
            .await
            .unwrap_err();
        assert!(
            Instant::now() <= deadline + Duration::from_millis(1),
            "{why}"
        );
        assert!(why.contains("20261204080000000001"), "{why}");
        cancel.cancel();
        drop(listener);
    }

    #[test]
    fn the_job_cache_confirms_the_runners_return_and_the_minions_own_job() {
        let pki = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(pki.path().join("minions")).unwrap();
        std::fs::write(pki.path().join("minions/web1"), "key").unwrap();
        let req = request(
            "steward/v1/server/create",
            json!({"request_id": "g1", "name": "a", "_stamp": "s"}),
        );
        let receipt = Receipt {
            jid: "20261202133802447829".into(),
            digest: req.digest,
            by: ReceiptBy::Runner,
        };
        // `salt-run jobs.list_job` of a `salt-run event.send` (3008.5).
        let runner_job = json!({
            "jid": "20261202133802447829", "Function": "runner.event.send", "Arguments": [],
            "Target": "vm_master",
            "Result": {"vm_master": {"return": {"fun": "runner.event.send", "user": "root",
                "fun_args": ["steward/v1/server/create", {"request_id": "g1", "name": "a", "_stamp": "s"}],
                "return": true, "success": true}}}
        });
        assert_eq!(
            confirmed_by(&runner_job, pki.path(), &req, &receipt),
            Ok(())
        );
        // The same return stored under an accepted minion's id (a minion
        // returning for the jid it forged a runner event for): no.
        let by_minion = json!({"Result": {"web1": runner_job["Result"]["vm_master"].clone()}});
        assert!(confirmed_by(&by_minion, pki.path(), &req, &receipt).is_err());
        // Another payload, or nothing stored: no.
        let other = request(
            "steward/v1/server/create",
            json!({"request_id": "g1", "name": "evil"}),
        );
        assert!(confirmed_by(&runner_job, pki.path(), &other, &receipt).is_err());
        let none = json!({"jid": "1", "Error": "Cannot contact returner or no job with this jid", "Result": {}});
        assert!(confirmed_by(&none, pki.path(), &req, &receipt).is_err());

        // A minion's salt-call event.send, stored by that minion.
        let m_receipt = Receipt {
            jid: "20261202140602025712".into(),
            digest: req.digest,
            by: ReceiptBy::Minion("web1".into()),
        };
        let minion_job = json!({
            "jid": "20261202140602025712", "Function": "event.send",
            "Arguments": ["steward/v1/server/create", "{\"request_id\": \"g1\", \"name\": \"a\"}"],
            "Target": "web1", "Result": {"web1": {"return": true, "retcode": 0}}
        });
        assert_eq!(
            confirmed_by(&minion_job, pki.path(), &req, &m_receipt),
            Ok(())
        );
        let as_other = Receipt {
            by: ReceiptBy::Minion("web2".into()),
            ..m_receipt.clone()
        };
        assert!(confirmed_by(&minion_job, pki.path(), &req, &as_other).is_err());
    }
}
