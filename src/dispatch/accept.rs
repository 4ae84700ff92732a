//! Verified auto-accept: a pending minion key is accepted only when it is,
//! as text, the key the registry issued for that minion id.
//!
//! Pending keys are noticed three ways, because any one can miss: the
//! master's `salt/auth` `act: pend` event (repeated at every retry, so
//! decisions are de-duplicated), a file appearing in `<pki_dir>/minions_pre/`
//! (watched with notify), and a scan of that directory at start-up and after
//! every bus reconnect. What is compared is the pending *file* (what
//! `key.accept` would accept), never the event's copy.
//!
//! - identical → `key.accept_dict` (one wheel call for a whole burst),
//!   status `registered`, `steward/v1/minion/registered`;
//! - different → `key.reject_dict`, `steward/v1/alert/key-mismatch`;
//! - unknown id → left pending (or rejected, `unknown_minions: reject`),
//!   `steward/v1/alert/unknown-minion` once per id.
//!
//! Events off the bus prove nothing (see [`crate::bus::origin`]): any minion
//! can forge a `salt/auth` or another minion's start event. So they are only
//! triggers to look at what can be checked:
//! - `salt/auth` `act: denied` (a key differing from the accepted one; in
//!   preseed mode the master decides itself) becomes the key-mismatch alert
//!   when `minions_denied/<id>` holds a key other than the issued one — the
//!   alert names that file's key, never the event's;
//! - `salt/minion/<id>/start` marks the server `online` once the minion
//!   answers a `test.ping` whose return the master's job cache holds (only
//!   that minion can store it); the first start applies the states of the
//!   server's model. In preseed mode that confirmed start is also what
//!   marks the server `registered`: `salt/auth` `act: accept` is never taken
//!   as proof of anything.
//!
//! Alert memory (which ids and keys were alerted about) is bounded
//! ([`ALERT_MEMORY`], oldest forgotten first), so forged ids cannot grow it.
//!
//! Several masters (config `masters`), one registry (seed 004): a key
//! verified on any master is installed on the others (`sync`, every [`SYNC_INTERVAL`]): a minion
//! failing over must find its key accepted, because Salt 3007 minions check
//! a pending answer's signature against the key of the master they knew,
//! and give up. Only keys the registry issued are ever written.
//!
//! A minion-wrapped event on a Salt tag is never taken for Salt's own:
//! [`EventKind`] never takes a minion-fired event for `salt/auth` or a start
//! event of another minion (though an unwrapped imitation is possible, hence
//! the checks above).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value as Json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::bus::event::{AuthAct, EventKind};
use crate::bus::Firer;
use crate::bus::{BusItem, Subscription};
use crate::config::{AcceptMode, UnknownMinions};
use crate::lifecycle::{stale_key_in, KEY_DIRS};
use crate::pki::{clean_key, fingerprint};
use crate::registry::{DbStore, Server, ServerFilter, Service, Status};
use crate::salt::{is_key_file_name, key_dict, Publish, SaltClient, TargetType};

/// Tag prefix of the acceptor's events.
pub const MINION_REGISTERED: &str = "steward/v1/minion/registered";
/// A minion presented a key other than the one issued for its id.
pub const ALERT_KEY_MISMATCH: &str = "steward/v1/alert/key-mismatch";
/// A pending key's minion id is not in the registry.
pub const ALERT_UNKNOWN_MINION: &str = "steward/v1/alert/unknown-minion";
/// The states of a server's model were applied at its first start.
pub const MINION_PROVISIONED: &str = "steward/v1/minion/provisioned";
/// Fired when a key this master had accepted for a registry server was not
/// the one issued for it (a rekey elsewhere, a key accepted by hand) and was
/// deleted.
pub const ALERT_KEY_RETIRED: &str = "steward/v1/alert/key-retired";

/// How long triggers are gathered into one batch.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Queue of triggers (the watcher and the bus feed it; overflow is harmless:
/// a missed pending key is found by the next `salt/auth` retry or scan).
const TRIGGER_QUEUE: usize = 65_536;
/// How often keys accepted elsewhere are installed on this master.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// Servers read per page by a sweep (sync, reconcile): what one sweep holds
/// in memory at a time, whatever the size of the registry.
const SWEEP_PAGE: i64 = 500;
/// A sync reads only servers changed since the last one, minus this margin
/// (other masters' clocks write `updated_at` into a shared registry).
const SYNC_OVERLAP_MS: i64 = 5 * 60 * 1000;
/// Every this many syncs, all servers are read again (a safety net).
const FULL_SYNC_EVERY: u32 = 120;
/// How long a model's state run may take at a server's first start.
const STATES_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a started minion has to answer the `test.ping` confirming it.
const START_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Most minion ids (and keys) remembered as alerted about; the oldest are
/// forgotten first (a forgotten one may be alerted about again).
pub const ALERT_MEMORY: usize = 4096;

/// Something that may need a decision.
#[derive(Debug)]
enum Trigger {
    /// A key may be pending for this id.
    Pending(String),
    /// Scan `minions_pre/` (start-up, bus reconnect).
    Scan,
    /// The master may have denied a key differing from the accepted one.
    Denied(String),
    /// The master may have accepted a key at first contact (preseeded).
    Accepted(String),
    /// The master refused this key because a key for the id is rejected.
    RefusedRejected { id: String, presented: String },
    /// The minion started.
    Started(String),
    /// Install keys accepted on other masters, retire stale ones.
    Sync,
    /// Retire every accepted key that is not the issued one (start-up, bus
    /// reconnect).
    Reconcile,
}

/// What the acceptor did with keys, and the alerts it fired; read by the
/// metrics endpoint.
#[derive(Debug, Default)]
pub struct KeyStats {
    /// Keys accepted (verified byte for byte against the issued one).
    pub accepted: AtomicU64,
    /// Keys the master rejected on our call (not the issued key, or an
    /// unknown id with `unknown_minions: reject`).
    pub rejected: AtomicU64,
    /// `alert/key-mismatch` fired.
    pub alert_key_mismatch: AtomicU64,
    /// `alert/unknown-minion` fired.
    pub alert_unknown_minion: AtomicU64,
    /// `alert/key-retired` fired.
    pub alert_key_retired: AtomicU64,
}

impl KeyStats {
    /// The alert counters with the alert's name (`key-mismatch` …).
    pub fn alerts(&self) -> [(&'static str, u64); 3] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("key-mismatch", g(&self.alert_key_mismatch)),
            ("key-retired", g(&self.alert_key_retired)),
            ("unknown-minion", g(&self.alert_unknown_minion)),
        ]
    }

    fn alert(&self, tag: &str) {
        let counter = match tag {
            ALERT_KEY_MISMATCH => &self.alert_key_mismatch,
            ALERT_UNKNOWN_MINION => &self.alert_unknown_minion,
            ALERT_KEY_RETIRED => &self.alert_key_retired,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The acceptor's settings.
#[derive(Debug, Clone)]
pub struct AcceptorConfig {
    /// The master's `pki_dir`.
    pub pki_dir: PathBuf,
    /// `verify` or `preseed`.
    pub mode: AcceptMode,
    /// What to do with unknown ids.
    pub unknown: UnknownMinions,
    /// Install keys accepted on the other masters (config `masters` lists
    /// several). Off with one master, so that a key an administrator
    /// deletes by hand stays deleted.
    pub sync_keys: bool,
    /// Where provisioning runs (first-start states) are started, so the
    /// daemon's shutdown waits for them.
    pub helpers: TaskTracker,
    /// Where keys accepted, rejected and alerts are counted.
    pub stats: Arc<KeyStats>,
}

/// Runs the acceptor until `cancel`: reads `sub`, watches `minions_pre/`.
pub async fn run(
    config: AcceptorConfig,
    mut sub: Subscription,
    service: Arc<Service<DbStore>>,
    salt: SaltClient,
    firer: Firer,
    cancel: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel(TRIGGER_QUEUE);
    let pre_dir = config.pki_dir.join("minions_pre");
    let _watcher = watch_pending(&pre_dir, tx.clone());
    let mut state = Acceptor {
        config,
        fx: Effects {
            service,
            salt,
            firer,
        },
        alerted_unknown: Bounded::new(ALERT_MEMORY),
        alerted_mismatch: Bounded::new(ALERT_MEMORY),
        confirming: Arc::default(),
        retire_failed: false,
        synced_until: None,
        syncs: 0,
    };
    let _ = tx.try_send(Trigger::Scan);
    let _ = tx.try_send(Trigger::Reconcile);
    let mut sync = tokio::time::interval(SYNC_INTERVAL);
    // A failed retirement is retried (a full reconcile) at this pace.
    let mut retry = tokio::time::interval(SYNC_INTERVAL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sync.tick(), if state.config.sync_keys => { let _ = tx.try_send(Trigger::Sync); }
            _ = retry.tick(), if state.retire_failed => { let _ = tx.try_send(Trigger::Reconcile); }
            item = sub.recv() => match item {
                None => return,
                Some(BusItem::Connected { .. }) => {
                    let _ = tx.try_send(Trigger::Scan);
                    let _ = tx.try_send(Trigger::Reconcile);
                }
                Some(BusItem::Event(event)) => {
                    if let Some(t) = trigger_of(&event) {
                        let _ = tx.try_send(t);
                    }
                }
                Some(_) => {}
            },
            Some(first) = rx.recv() => {
                let mut batch = vec![first];
                let deadline = crate::clock::deadline_in(BATCH_WINDOW);
                while let Ok(Some(t)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                    batch.push(t);
                }
                state.handle(batch).await;
            }
        }
    }
}

fn trigger_of(event: &crate::bus::Event) -> Option<Trigger> {
    match event.kind() {
        EventKind::Auth(a) => {
            let presented = a.pub_key.unwrap_or_default().to_owned();
            let id = a.id.to_owned();
            match a.act {
                AuthAct::Pend => Some(Trigger::Pending(id)),
                AuthAct::Denied => Some(Trigger::Denied(id)),
                AuthAct::Accept => Some(Trigger::Accepted(id)),
                AuthAct::Rejected => Some(Trigger::RefusedRejected { id, presented }),
                _ => None,
            }
        }
        EventKind::MinionStart { id } => Some(Trigger::Started(id.to_owned())),
        _ => None,
    }
}

/// Watches `dir` for new pending keys. `None` (logged) when it cannot: the
/// bus events and scans still work.
fn watch_pending(dir: &Path, tx: mpsc::Sender<Trigger>) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind as Fs, RecursiveMode, Watcher as _};
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, Fs::Create(_) | Fs::Modify(_)) {
            for p in ev.paths {
                if let Some(id) = p.file_name().and_then(|n| n.to_str()) {
                    let _ = tx.try_send(Trigger::Pending(id.to_owned()));
                }
            }
        }
    };
    let watched = notify::recommended_watcher(handler).and_then(|mut w| {
        w.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(w)
    });
    match watched {
        Ok(w) => Some(w),
        Err(error) => {
            warn!(message = "Not watching pending keys; relying on bus events and scans.", dir = %dir.display(), %error);
            None
        }
    }
}

/// Writes each `(minion id, key)` into `<pki_dir>/minions/` unless the master
/// already holds a key of any kind for that id (blocking: file I/O, fsync).
fn install_missing(pki_dir: &Path, keys: Vec<(String, String)>) {
    for (id, key) in keys {
        let held = KEY_DIRS.iter().any(|d| pki_dir.join(d).join(&id).exists());
        if held {
            continue;
        }
        let path = pki_dir.join("minions").join(&id);
        match crate::pki::files::create_public(&path, &key) {
            Ok(()) => {
                info!(message = "Key accepted on another master installed here.", minion_id = %id)
            }
            Err(error) => warn!(message = "Key not installed.", minion_id = %id, %error),
        }
    }
}

/// The servers among `servers` for which `<pki_dir>/minions/<id>` holds a
/// key other than the issued one, with that key; read on the blocking pool.
async fn stale_accepted(pki_dir: &Path, servers: Vec<Server>) -> Vec<(Server, String)> {
    let pki_dir = pki_dir.to_owned();
    let look = move || {
        servers
            .into_iter()
            // Only servers with an issued key: for the others there is
            // nothing to compare with.
            .filter(|s| s.public_key.is_some() && is_key_file_name(&s.minion_id))
            .filter_map(|s| match stale_key_in(&pki_dir, "minions", &s) {
                Ok(held) => held.map(|k| (s, k)),
                Err(error) => {
                    warn!(message = "Accepted key not compared.", minion_id = %s.minion_id, %error);
                    None
                }
            })
            .collect()
    };
    match tokio::task::spawn_blocking(look).await {
        Ok(stale) => stale,
        Err(error) => {
            warn!(message = "Accepted keys not compared.", %error);
            Vec::new()
        }
    }
}

/// A map that keeps at most `cap` entries, forgetting the oldest first.
#[derive(Debug)]
struct Bounded<K, V> {
    cap: usize,
    map: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K: Clone + Eq + Hash, V: PartialEq> Bounded<K, V> {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Remembers `key → value`; false when exactly that was remembered already.
    fn insert(&mut self, key: K, value: V) -> bool {
        match self.map.get_mut(&key) {
            Some(v) if *v == value => return false,
            Some(v) => {
                *v = value;
                return true;
            }
            None => {}
        }
        while self.map.len() >= self.cap {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.order.push_back(key.clone());
        self.map.insert(key, value);
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// What the acceptor does to the registry, the master and the bus; cloned
/// into the tasks that confirm a start in the background.
#[derive(Clone)]
struct Effects {
    service: Arc<Service<DbStore>>,
    salt: SaltClient,
    firer: Firer,
}

struct Acceptor {
    config: AcceptorConfig,
    fx: Effects,
    alerted_unknown: Bounded<String, ()>,
    /// id → presented key already alerted about (one alert per key).
    alerted_mismatch: Bounded<String, String>,
    /// Minion ids whose start is being confirmed (at most one check each;
    /// only ids of registry servers get one, so it is bounded by the registry).
    confirming: Arc<std::sync::Mutex<HashSet<String>>>,
    /// The last retirement of stale accepted keys failed (master busy or
    /// restarting): a reconcile is retried every [`SYNC_INTERVAL`].
    retire_failed: bool,
    /// When the last sync started (Unix ms); `None`: read everything.
    synced_until: Option<i64>,
    /// Syncs done (every [`FULL_SYNC_EVERY`]th reads everything).
    syncs: u32,
}

/// What to do with one pending key.
enum Decision {
    Accept(Server),
    Reject { server: Server, presented: String },
    Unknown,
    Nothing,
}

impl Acceptor {
    async fn handle(&mut self, batch: Vec<Trigger>) {
        let mut pending = BTreeSet::new();
        for t in batch {
            match t {
                Trigger::Pending(id) => {
                    pending.insert(id);
                }
                Trigger::Scan => pending.extend(self.scan()),
                Trigger::Denied(id) => self.denied(&id).await,
                Trigger::Accepted(id) => self.accepted(&id).await,
                Trigger::RefusedRejected { id, presented } => self.unblock(&id, &presented).await,
                Trigger::Started(id) => self.started(&id).await,
                Trigger::Sync => self.sync().await,
                Trigger::Reconcile => self.reconcile().await,
            }
        }
        if !pending.is_empty() {
            self.decide(pending).await;
        }
    }

    /// Installs on this master the keys of servers accepted on another
    /// (status registered/online/offline; in preseed mode also keys-issued),
    /// unless this master already holds a key of any kind for that id.
    async fn sync(&mut self) {
        let started = crate::registry::store::now_ms();
        let changed_since = if self.syncs.is_multiple_of(FULL_SYNC_EVERY) {
            None
        } else {
            self.synced_until.map(|t| t - SYNC_OVERLAP_MS)
        };
        self.syncs = self.syncs.wrapping_add(1);
        // Keys accepted somewhere (and, in preseed mode, issued ones).
        let wanted = |st: Status| {
            matches!(st, Status::Registered | Status::Online | Status::Offline)
                || (st == Status::KeysIssued && self.config.mode == AcceptMode::Preseed)
        };
        let filter = ServerFilter {
            changed_since,
            ..ServerFilter::default()
        };
        let mut pages = self.fx.service.server_pages(filter, SWEEP_PAGE);
        let mut stale = Vec::new();
        loop {
            let servers = match pages.next().await {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(error) => {
                    warn!(message = "Registry read failed; keys not synced.", %error);
                    return;
                }
            };
            let install: Vec<(String, String)> = servers
                .iter()
                .filter(|s| wanted(s.status) && is_key_file_name(&s.minion_id))
                .filter_map(|s| Some((s.minion_id.clone(), clean_key(s.public_key.as_deref()?))))
                .collect();
            // File checks and the fsync'd writes run on the blocking pool.
            let pki_dir = self.config.pki_dir.clone();
            let installing =
                tokio::task::spawn_blocking(move || install_missing(&pki_dir, install));
            if let Err(error) = installing.await {
                warn!(message = "Keys accepted elsewhere not installed.", %error);
            }
            // A key another master's rekey replaced is retired here too.
            stale.extend(stale_accepted(&self.config.pki_dir, servers).await);
        }
        self.retire(stale).await;
        self.synced_until = Some(started);
    }

    /// Retires every key this master accepted for a registry server that is
    /// not the one issued for it.
    async fn reconcile(&mut self) {
        let mut pages = self
            .fx
            .service
            .server_pages(ServerFilter::default(), SWEEP_PAGE);
        let mut stale = Vec::new();
        loop {
            let servers = match pages.next().await {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(error) => {
                    warn!(message = "Registry read failed; accepted keys not reconciled.", %error);
                    return;
                }
            };
            stale.extend(stale_accepted(&self.config.pki_dir, servers).await);
        }
        self.retire(stale).await;
    }

    /// Deletes the accepted keys of `stale` (one exact-id `key.delete_dict`)
    /// and alerts for each. A key accepted anew between the look and the
    /// call is deleted too: the minion's next sign-in puts it back pending,
    /// where it is verified again.
    async fn retire(&mut self, stale: Vec<(Server, String)>) {
        if stale.is_empty() {
            return;
        }
        // Cleared only by a call that worked.
        self.retire_failed = true;
        let ids: Vec<&str> = stale.iter().map(|(s, _)| s.minion_id.as_str()).collect();
        match key_dict(
            self.fx.salt.req(),
            "key.delete_dict",
            json!({ "minions": ids }),
        )
        .await
        {
            Ok(r) if r.success => self.retire_failed = false,
            Ok(r) => {
                warn!(message = "Stale accepted keys not retired; will retry.", ret = %r.ret);
                return;
            }
            Err(error) => {
                warn!(message = "Stale accepted keys not retired; will retry.", %error);
                return;
            }
        }
        for (server, held) in stale {
            let expected = server.public_key.as_deref().map(fingerprint);
            let retired = fingerprint(&held);
            warn!(message = "An accepted key that is not the issued one was retired.",
                minion_id = %server.minion_id, expected = ?expected, retired = %retired);
            self.fire(
                ALERT_KEY_RETIRED,
                json!({
                    "minion_id": server.minion_id,
                    "server_id": server.id,
                    "expected_fingerprint": expected,
                    "retired_fingerprint": retired,
                }),
            )
            .await;
        }
    }

    fn scan(&self) -> Vec<String> {
        let dir = self.config.pki_dir.join("minions_pre");
        match std::fs::read_dir(&dir) {
            Ok(d) => d
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect(),
            Err(error) => {
                warn!(message = "Cannot scan pending keys.", dir = %dir.display(), %error);
                Vec::new()
            }
        }
    }

    async fn decide(&mut self, ids: BTreeSet<String>) {
        let mut accept = Vec::new();
        let mut reject = Vec::new();
        for id in ids.into_iter().filter(|id| is_key_file_name(id)) {
            match self.decision(&id).await {
                Decision::Accept(s) => accept.push(s),
                Decision::Reject { server, presented } => {
                    self.mismatch(&server, &presented).await;
                    reject.push(id);
                }
                Decision::Unknown => {
                    if self.alerted_unknown.insert(id.clone(), ()) {
                        warn!(message = "Pending key of a minion id the registry does not know.", minion_id = %id);
                        self.fire(ALERT_UNKNOWN_MINION, json!({"minion_id": id}))
                            .await;
                    }
                    if self.config.unknown == UnknownMinions::Reject {
                        reject.push(id);
                    }
                }
                Decision::Nothing => {}
            }
        }
        if !reject.is_empty() {
            if let Some(moved) = self.wheel_dict("key.reject_dict", &reject).await {
                let n = u64::try_from(moved.len()).unwrap_or(u64::MAX);
                self.config.stats.rejected.fetch_add(n, Ordering::Relaxed);
            }
        }
        if accept.is_empty() {
            return;
        }
        let ids: Vec<String> = accept.iter().map(|s| s.minion_id.clone()).collect();
        let Some(accepted) = self.wheel_dict("key.accept_dict", &ids).await else {
            return;
        };
        let accept: Vec<Server> = accept
            .into_iter()
            .filter(|server| {
                let ok = accepted.contains(&server.minion_id);
                if !ok {
                    warn!(message = "The master did not accept the key.", minion_id = %server.minion_id);
                }
                ok
            })
            .collect();
        // `accept_dict` accepts whatever is pending at the time of the call:
        // a key presented anew since it was compared is checked again.
        let stale = stale_accepted(&self.config.pki_dir, accept.clone()).await;
        for server in accept {
            if stale.iter().any(|(s, _)| s.minion_id == server.minion_id) {
                continue;
            }
            info!(message = "Minion key verified and accepted.", minion_id = %server.minion_id, server = %server.name);
            self.config.stats.accepted.fetch_add(1, Ordering::Relaxed);
            self.fx.registered(&server).await;
        }
        self.retire(stale).await;
    }

    async fn decision(&self, id: &str) -> Decision {
        let path = self.config.pki_dir.join("minions_pre").join(id);
        // Gone: already decided (by us or by hand).
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Decision::Nothing;
        };
        let server = match self.fx.service.server_by_minion_id(id).await {
            Ok(Some(s)) => s,
            Ok(None) => return Decision::Unknown,
            Err(error) => {
                warn!(message = "Registry lookup failed; the key stays pending.", minion_id = %id, %error);
                return Decision::Nothing;
            }
        };
        let presented = clean_key(&text);
        match &server.public_key {
            Some(issued) if clean_key(issued) == presented => Decision::Accept(server),
            Some(_) => Decision::Reject { server, presented },
            None => {
                warn!(message = "No key was issued for this server; its pending key stays pending.", minion_id = %id);
                Decision::Nothing
            }
        }
    }

    /// Calls `fun` with `{"minions_pre": ids}` (exact ids, no globbing);
    /// returns the ids the master reports it moved.
    async fn wheel_dict(&self, fun: &str, ids: &[String]) -> Option<HashSet<String>> {
        match key_dict(self.fx.salt.req(), fun, json!({ "minions_pre": ids })).await {
            Ok(r) if r.success => {
                // {"minions": [...]} for accept, {"minions_rejected": [...]} for reject.
                let moved = r
                    .ret
                    .as_object()
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter_map(Json::as_array)
                    .flatten()
                    .filter_map(Json::as_str)
                    .map(str::to_owned)
                    .collect();
                Some(moved)
            }
            Ok(r) => {
                warn!(message = "Wheel call failed; will retry at the next attempt.", %fun, ret = %r.ret);
                None
            }
            Err(error) => {
                warn!(message = "Wheel call failed; will retry at the next attempt.", %fun, %error);
                None
            }
        }
    }

    async fn mismatch(&mut self, server: &Server, presented: &str) {
        let presented = clean_key(presented);
        if !self
            .alerted_mismatch
            .insert(server.minion_id.clone(), presented.clone())
        {
            return;
        }
        let expected = server.public_key.as_deref().map(fingerprint);
        let got = fingerprint(&presented);
        warn!(message = "A minion presented a key other than the one issued for it.",
            minion_id = %server.minion_id, expected = ?expected, presented = %got);
        self.fire(
            ALERT_KEY_MISMATCH,
            json!({
                "minion_id": server.minion_id,
                "server_id": server.id,
                "expected_fingerprint": expected,
                "presented_fingerprint": got,
            }),
        )
        .await;
    }

    /// A `salt/auth` `denied`, which anyone can forge: what counts is the
    /// key the master wrote into `minions_denied/<id>` (Salt writes it before
    /// firing the event). No such file: nothing to say.
    async fn denied(&mut self, id: &str) {
        if !is_key_file_name(id) {
            return;
        }
        let path = self.config.pki_dir.join("minions_denied").join(id);
        let held = match std::fs::read_to_string(&path) {
            Ok(held) => held,
            Err(error) => {
                tracing::debug!(message = "A denied event without a denied key on disk; nothing done.", minion_id = %id, %error);
                return;
            }
        };
        match self.fx.service.server_by_minion_id(id).await {
            Ok(Some(server)) => {
                let issued = server.public_key.as_deref().map(clean_key);
                if issued.as_deref() != Some(clean_key(&held).as_str()) {
                    self.mismatch(&server, &held).await;
                }
            }
            Ok(None) => {
                if self.alerted_unknown.insert(id.to_owned(), ()) {
                    self.fire(ALERT_UNKNOWN_MINION, json!({"minion_id": id}))
                        .await;
                }
            }
            Err(error) => warn!(message = "Registry lookup failed.", minion_id = %id, %error),
        }
    }

    /// The issued key was refused because an impostor's key for the same id
    /// was rejected: that rejected key goes, so the machine's next attempt
    /// (bundles set `rejected_retry: True`) is pending and then verified.
    /// The event only says where to look: the decision is the files'.
    async fn unblock(&self, id: &str, presented: &str) {
        if !is_key_file_name(id) {
            return;
        }
        let Ok(Some(server)) = self.fx.service.server_by_minion_id(id).await else {
            return;
        };
        let issued = server.public_key.as_deref().map(clean_key);
        if issued.as_deref() != Some(&clean_key(presented)) {
            return;
        }
        let rejected = self.config.pki_dir.join("minions_rejected").join(id);
        match std::fs::read_to_string(&rejected) {
            Ok(held) if Some(clean_key(&held)) != issued => {
                info!(message = "The issued key was blocked by a rejected impostor key; removing that key.", minion_id = %id);
                let rejected = json!({ "minions_rejected": [id] });
                if let Err(error) = key_dict(self.fx.salt.req(), "key.delete_dict", rejected).await
                {
                    warn!(message = "Rejected key not removed.", minion_id = %id, %error);
                }
            }
            _ => {}
        }
    }

    /// A `salt/auth` `accept`, which anyone can forge, is never taken as
    /// proof: a preseeded server is registered by its confirmed start.
    async fn accepted(&self, id: &str) {
        if self.config.mode != AcceptMode::Preseed || !is_key_file_name(id) {
            return;
        }
        if let Ok(Some(server)) = self.fx.service.server_by_minion_id(id).await {
            if server.status == Status::KeysIssued {
                info!(message = "Accept event for a preseeded key: not proof; the server is registered once its minion's start is confirmed.", minion_id = %id);
            }
        }
    }

    /// A start event, which anyone can forge for any id: for a server not
    /// yet online, the minion is asked to answer a `test.ping` (in the
    /// background); only a return the master's job cache holds confirms it.
    async fn started(&self, id: &str) {
        if !is_key_file_name(id) {
            return;
        }
        let server = match self.fx.service.server_by_minion_id(id).await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(error) => {
                warn!(message = "Registry lookup failed.", minion_id = %id, %error);
                return;
            }
        };
        if server.status == Status::Online {
            return;
        }
        {
            let mut confirming = self
                .confirming
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !confirming.insert(server.minion_id.clone()) {
                return;
            }
        }
        let (fx, confirming, preseed) = (
            self.fx.clone(),
            self.confirming.clone(),
            self.config.mode == AcceptMode::Preseed,
        );
        self.config.helpers.spawn(async move {
            let id = server.minion_id.clone();
            fx.confirm_start(server, preseed).await;
            confirming
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
        });
    }

    async fn fire(&self, tag: &str, data: Json) {
        self.config.stats.alert(tag);
        self.fx.firer.fire_or_warn(tag, &data).await;
    }
}

impl Effects {
    async fn registered(&self, server: &Server) {
        match self.service.set_status(server, Status::Registered).await {
            Ok(Some(_)) => {}
            // Moved on meanwhile (started, rekeyed): that change stands.
            Ok(None) => {
                info!(message = "Status changed meanwhile; registered not recorded.", minion_id = %server.minion_id)
            }
            Err(error) => {
                warn!(message = "Status not recorded.", minion_id = %server.minion_id, %error)
            }
        }
        self.firer
            .fire_or_warn(
                MINION_REGISTERED,
                &json!({"server_id": server.id, "minion_id": server.minion_id, "name": server.name}),
            )
            .await;
    }

    /// Whether minion `id` answers a `test.ping` with a return the master's
    /// job cache holds: only that minion, connected with its accepted key,
    /// can store one.
    async fn answers_ping(&self, id: &str) -> bool {
        let ping = Publish {
            target: id.to_owned(),
            tgt_type: TargetType::List,
            fun: "test.ping".into(),
            correlation: Some(format!("start:{id}")),
            ..Publish::default()
        };
        match self.salt.run_job(&ping, START_PING_TIMEOUT).await {
            Ok((_, outcome)) => outcome.returns.get(id).is_some_and(|r| r.success),
            Err(error) => {
                warn!(message = "Start not confirmed: test.ping not published.", minion_id = %id, %error);
                false
            }
        }
    }

    /// Confirms a start event ([`Acceptor::started`]); then the server is
    /// online (registered first when preseeded), and its first start
    /// applies its model's states.
    async fn confirm_start(self, server: Server, preseed: bool) {
        let id = server.minion_id.clone();
        if !self.answers_ping(&id).await {
            warn!(message = "Start event not confirmed: the minion did not answer test.ping (a forged event, or it went away); status unchanged.", minion_id = %id, status = %server.status);
            return;
        }
        // A preseeded key is accepted from the start: its first confirmed
        // start is its registration.
        if preseed && server.status == Status::KeysIssued {
            info!(message = "Preseeded minion confirmed connected.", minion_id = %id);
            self.registered(&server).await;
        }
        let first = matches!(server.status, Status::Registered | Status::KeysIssued);
        let from = [Status::KeysIssued, Status::Registered, Status::Offline];
        match self
            .service
            .transition(server.id, &from, Status::Online)
            .await
        {
            Ok(Some(_)) => {}
            // Another writer moved it first (another master's daemon saw the
            // start too): it provisions, not this one.
            Ok(None) => return,
            Err(error) => {
                warn!(message = "Status not recorded.", minion_id = %id, %error);
                return;
            }
        }
        info!(message = "Server online.", minion_id = %id, server = %server.name);
        if first {
            self.provision(server).await;
        }
    }

    /// Applies the states of the server's model (first start); the result is
    /// fired as `steward/v1/minion/provisioned`.
    async fn provision(&self, server: Server) {
        let states = match self.service.get_model(&server.model).await {
            Ok(m) => m.states,
            Err(error) => {
                warn!(message = "Model not read; states not applied.", minion_id = %server.minion_id, %error);
                return;
            }
        };
        if states.is_empty() {
            return;
        }
        let mut kwarg = Map::new();
        kwarg.insert("mods".into(), Json::from(states.join(",")));
        let publish = Publish {
            target: server.minion_id.clone(),
            tgt_type: TargetType::List,
            fun: "state.apply".into(),
            arg: Vec::new(),
            kwarg,
            correlation: Some(format!("provision:{}", server.minion_id)),
        };
        let data = match self.salt.run_job(&publish, STATES_TIMEOUT).await {
            Ok((_, outcome)) => json!({
                "minion_id": server.minion_id,
                "server_id": server.id,
                "states": states,
                "jid": outcome.jid,
                "success": outcome.all_ok(),
            }),
            Err(error) => json!({
                "minion_id": server.minion_id,
                "server_id": server.id,
                "states": states,
                "success": false,
                "error": error.to_string(),
            }),
        };
        info!(message = "Model states applied at first start.", minion_id = %server.minion_id, result = %data);
        self.firer.fire_or_warn(MINION_PROVISIONED, &data).await;
    }
}

#[cfg(test)]
mod tests {
    use super::Bounded;
    use crate::salt::is_key_file_name;

    #[test]
    fn alert_memory_is_bounded_and_forgets_the_oldest() {
        let mut m: Bounded<String, String> = Bounded::new(3);
        assert!(m.insert("a".into(), "k1".into()));
        assert!(
            !m.insert("a".into(), "k1".into()),
            "same key: already alerted"
        );
        assert!(
            m.insert("a".into(), "k2".into()),
            "another key: alert again"
        );
        for id in ["b", "c", "d", "e"] {
            assert!(m.insert(id.into(), "k".into()));
        }
        assert_eq!(m.len(), 3);
        // a forged flood of ids pushed "a" out: it would be alerted again
        assert!(m.insert("a".into(), "k2".into()));
        for i in 0..10_000 {
            m.insert(format!("forged-{i}"), "k".into());
        }
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn ids_that_would_escape_the_key_directory_are_never_used() {
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "a\0b"] {
            assert!(!is_key_file_name(bad), "{bad:?}");
        }
        assert!(is_key_file_name("web01.example.org-0a1b2c3d"));
    }
}
