//! The one set of registry operations, used by the CLI and by the bus:
//! validate, then write through the [`Store`], which appends the outbox row in
//! the same transaction. On any error nothing is written.
//!
//! Validation here gives the specific error early; the database's own
//! constraints (unique names, foreign keys, checks) still hold when two
//! writers race, and their violations map to the same errors in `store.rs`.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::Value as Json;

mod backups;
mod forwards;
mod shares;
mod users;

pub use shares::samba_base;
pub use users::{SessionLimits, TokenPrincipal};

pub use backups::BackupSpec;

use super::group_commit::GroupCommit;
use super::store::{Filter, KeyColumns, ServerKey};
use super::{Error, Server, ServerModel, ServerRef, Status, Store};
use crate::pki::{fingerprint, IssueError, KeyIssuer};

/// Longest hostname (RFC 1123 with RFC 1035's limit).
const MAX_HOSTNAME: usize = 253;
/// Longest label of a hostname (RFC 1035 §2.3.4).
const MAX_LABEL: usize = 63;
/// Longest Linux interface name (`IFNAMSIZ` - 1).
const MAX_IFNAME: usize = 15;
/// Longest user name `useradd` accepts by default.
const MAX_USER: usize = 32;
/// Minion ids tried for one new server before giving up: with 32 random
/// bits per id, a second collision in a row already means something else
/// is wrong (a broken random source, a directory full of stray key files).
const MINION_ID_TRIES: usize = 8;
/// Times a patch without an expected revision is reapplied to a re-read row
/// when another writer got in between read and write.
const UPDATE_TRIES: usize = 5;

/// Changes to a model; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ModelPatch {
    /// New description.
    pub description: Option<String>,
    /// New list of states (replaces the old one).
    pub states: Option<Vec<String>>,
}

/// Values for a new server, or changes to one. `None` leaves a field as it is;
/// `Some(None)` clears an optional one. Built from `KEY=VALUE` strings
/// ([`ServerPatch::set`]) or a JSON map ([`ServerPatch::from_json`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerPatch {
    /// Hostname.
    pub name: Option<String>,
    /// Model name.
    pub model: Option<String>,
    /// The revision the change was made from (`revision=N`): when given, the
    /// update is refused with `conflict` if the row moved on since. Without
    /// it the patch is applied to the row as it is when written.
    pub revision: Option<i64>,
    /// Status.
    pub status: Option<Status>,
    /// Is a VM.
    pub is_vm: Option<bool>,
    /// The VM's host.
    pub vm_host: Option<Option<ServerRef>>,
    /// Public address.
    pub external_ip: Option<Option<IpAddr>>,
    /// Internal address.
    pub internal_ip: Option<Option<IpAddr>>,
    /// Is a Proxmox host.
    pub is_proxmox_host: Option<bool>,
    /// Proxmox node name.
    pub proxmox_node: Option<Option<String>>,
    /// Interface facing the outside.
    pub external_interface: Option<Option<String>>,
    /// The host's internal network (CIDR), masqueraded.
    pub internal_network: Option<Option<String>>,
    /// This Proxmox host's nginx proxy.
    pub nginx_proxy: Option<Option<ServerRef>>,
    /// Samba managed.
    pub samba_managed: Option<bool>,
    /// Samba base folder.
    pub samba_base_folder: Option<Option<String>>,
    /// System users (replaces the list).
    pub users: Option<Vec<String>>,
}

/// The keys [`ServerPatch::set`] knows, as `server set` documents them.
pub const SERVER_KEYS: &[&str] = &[
    "name",
    "model",
    "revision",
    "status",
    "is_vm",
    "vm_host",
    "external_ip",
    "internal_ip",
    "is_proxmox_host",
    "proxmox_node",
    "external_interface",
    "internal_network",
    "nginx_proxy",
    "samba_managed",
    "samba_base_folder",
    "samba_base",
    "users",
];

fn opt_text(v: &str) -> Option<String> {
    (!v.is_empty()).then(|| v.to_owned())
}

fn parse_bool(field: &str, v: &str) -> Result<bool, Error> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(Error::invalid(field, format!("{v:?} is not true or false"))),
    }
}

fn parse_ip(field: &str, v: &str) -> Result<Option<IpAddr>, Error> {
    if v.is_empty() {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|_| Error::invalid(field, format!("{v:?} is not an IP address")))
}

/// A network in CIDR form (`10.0.0.0/24`, `fd00::/64`), host bits zero;
/// empty clears.
pub fn parse_cidr(field: &str, v: &str) -> Result<Option<String>, Error> {
    if v.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| {
        Error::invalid(
            field,
            format!("{v:?} is not a network in CIDR form ({why})"),
        )
    };
    let (addr, len) = v.split_once('/').ok_or_else(|| bad("no /prefix"))?;
    let addr: IpAddr = addr.parse().map_err(|_| bad("bad address"))?;
    let len: u32 = len.parse().map_err(|_| bad("bad prefix length"))?;
    let (bits, max) = match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    };
    if len > max {
        return Err(bad("prefix too long"));
    }
    // The address sits in the top bits either way: the host part is the
    // low `128 - len` bits.
    let host_mask = if len == 0 {
        u128::MAX
    } else {
        (1u128 << (128 - len)) - 1
    };
    if bits & host_mask != 0 {
        return Err(bad("host bits set"));
    }
    Ok(Some(format!("{addr}/{len}")))
}

fn parse_ref(v: &str) -> Option<ServerRef> {
    // `ServerRef::from_str` cannot fail.
    v.parse::<ServerRef>().ok().filter(|_| !v.is_empty())
}

impl ServerPatch {
    /// Sets `key` from its text form: an empty value clears an optional field;
    /// booleans are `true|false|yes|no|on|off|1|0`; `users` is comma-separated;
    /// `vm_host` and `nginx_proxy` are a server id or name.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), Error> {
        let v = value.trim();
        match key {
            "name" => self.name = Some(v.to_owned()),
            "model" => self.model = Some(v.to_owned()),
            "revision" => {
                self.revision =
                    Some(v.parse().map_err(|_| {
                        Error::invalid(key, format!("{v:?} is not a revision number"))
                    })?)
            }
            "key_fingerprint" | "public_key" | "minion_id" => {
                return Err(Error::invalid(
                    key,
                    "set by the registry, never patched (the fingerprint is the public \
                     key's; `server rekey` issues a new key)",
                ))
            }
            "status" => self.status = Some(v.parse()?),
            "is_vm" => self.is_vm = Some(parse_bool(key, v)?),
            "vm_host" => self.vm_host = Some(parse_ref(v)),
            "external_ip" => self.external_ip = Some(parse_ip(key, v)?),
            "internal_ip" => self.internal_ip = Some(parse_ip(key, v)?),
            "is_proxmox_host" => self.is_proxmox_host = Some(parse_bool(key, v)?),
            "proxmox_node" => self.proxmox_node = Some(opt_text(v)),
            "external_interface" => self.external_interface = Some(opt_text(v)),
            "internal_network" => self.internal_network = Some(parse_cidr(key, v)?),
            "nginx_proxy" => self.nginx_proxy = Some(parse_ref(v)),
            "samba_managed" => self.samba_managed = Some(parse_bool(key, v)?),
            "samba_base_folder" => self.samba_base_folder = Some(opt_text(v)),
            // The one switch for shares: a base folder makes the server
            // samba-managed, an empty one makes it not.
            "samba_base" => {
                let base = opt_text(v);
                self.samba_managed = Some(base.is_some());
                self.samba_base_folder = Some(base);
            }
            "users" => {
                self.users = Some(
                    v.split(',')
                        .map(str::trim)
                        .filter(|u| !u.is_empty())
                        .map(str::to_owned)
                        .collect(),
                )
            }
            _ => {
                return Err(Error::invalid(
                    key,
                    format!("unknown key; known: {}", SERVER_KEYS.join(", ")),
                ))
            }
        }
        Ok(())
    }

    /// Parses `KEY=VALUE`.
    pub fn set_assignment(&mut self, assignment: &str) -> Result<(), Error> {
        let (k, v) = assignment
            .split_once('=')
            .ok_or_else(|| Error::invalid(assignment, "expected KEY=VALUE".to_owned()))?;
        self.set(k.trim(), v)
    }

    /// Builds a patch from a JSON map (a bus request). Keys not in
    /// [`SERVER_KEYS`] are skipped only if listed in `ignore` (e.g. `request_id`);
    /// `null` clears; `users` may be a list or a comma-separated string.
    pub fn from_json(map: &serde_json::Map<String, Json>, ignore: &[&str]) -> Result<Self, Error> {
        let mut p = ServerPatch::default();
        for (k, v) in map {
            if ignore.contains(&k.as_str()) {
                continue;
            }
            let text = match v {
                Json::Null => String::new(),
                Json::Bool(b) => b.to_string(),
                Json::Number(n) => n.to_string(),
                Json::String(s) => s.clone(),
                Json::Array(items) if k == "users" => {
                    let mut names = Vec::with_capacity(items.len());
                    for i in items {
                        match i {
                            Json::String(s) => names.push(s.clone()),
                            _ => return Err(Error::invalid(k, "users must be strings")),
                        }
                    }
                    names.join(",")
                }
                _ => return Err(Error::invalid(k, format!("unexpected value {v}"))),
            };
            p.set(k, &text)?;
        }
        Ok(p)
    }
}

/// Filters of [`Service::find_servers`]; `None` matches anything.
#[derive(Debug, Clone, Default)]
pub struct ServerFilter {
    /// Hostname.
    pub name: Option<String>,
    /// Model name.
    pub model: Option<String>,
    /// Minion id.
    pub minion_id: Option<String>,
    /// Status.
    pub status: Option<Status>,
    /// Changed at or after this time (Unix ms): what moved since a last look.
    pub changed_since: Option<i64>,
    /// Changed before this time (Unix ms): what has been quiet since.
    pub changed_before: Option<i64>,
    /// Only ids greater than this: the page after the last id seen.
    pub after_id: Option<i64>,
    /// At most this many servers (a page).
    pub limit: Option<i64>,
    /// The most recently changed first, instead of by id (not for pages,
    /// which go by id).
    pub newest_first: bool,
}

/// Makes a minion id for a hostname.
type MinionIdFn = dyn Fn(&str) -> Result<String, Error> + Send + Sync;

/// Where new minion ids come from: [`new_minion_id`], or a script in tests.
#[derive(Clone)]
struct MinionIds(Arc<MinionIdFn>);

impl std::fmt::Debug for MinionIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MinionIds")
    }
}

/// The registry's operations over a [`Store`].
#[derive(Debug, Clone)]
pub struct Service<S> {
    store: S,
    creates: Arc<GroupCommit>,
    keys: Option<Arc<KeyIssuer>>,
    minion_ids: MinionIds,
    /// `shares.user_prefix`: a share's user is this + its lower-cased name.
    share_user_prefix: Arc<str>,
}

/// Pages of servers, from [`Service::server_pages`].
#[derive(Debug)]
pub struct ServerPages<'a, S> {
    service: &'a Service<S>,
    filter: ServerFilter,
}

impl<S: Store> ServerPages<'_, S> {
    /// The next page; `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<Server>>, Error> {
        let servers = self.service.find_servers(&self.filter).await?;
        let Some(last) = servers.last().map(|s| s.id) else {
            return Ok(None);
        };
        self.filter.after_id = Some(last);
        Ok(Some(servers))
    }
}

impl<S: Store> Service<S> {
    /// Wraps a store.
    pub fn new(store: S) -> Self {
        Self {
            store,
            creates: Arc::default(),
            keys: None,
            minion_ids: MinionIds(Arc::new(new_minion_id)),
            share_user_prefix: Arc::from(super::shares::DEFAULT_USER_PREFIX),
        }
    }

    /// Share users are named `prefix` + the share name (`shares.user_prefix`).
    pub fn with_share_user_prefix(mut self, prefix: &str) -> Self {
        self.share_user_prefix = Arc::from(prefix);
        self
    }

    /// Issues a minion key pair for every server created (status
    /// `keys-issued`); without an issuer servers are created without keys.
    pub fn with_keys(mut self, issuer: KeyIssuer) -> Self {
        self.keys = Some(Arc::new(issuer));
        self
    }

    /// The key issuer, if servers get keys.
    pub fn keys(&self) -> Option<&KeyIssuer> {
        self.keys.as_deref()
    }

    /// The store underneath (tests and tools).
    pub fn store(&self) -> &S {
        &self.store
    }

    // ------------------------------------------------------------ models

    /// Creates a model.
    pub async fn create_model(
        &self,
        name: &str,
        description: &str,
        states: &[String],
    ) -> Result<ServerModel, Error> {
        validate_model_name(name)?;
        let states = validate_states(states)?;
        self.store
            .insert_model(&ServerModel {
                id: 0,
                name: name.to_owned(),
                description: description.to_owned(),
                states,
            })
            .await
    }

    /// Every model, by name.
    pub async fn list_models(&self) -> Result<Vec<ServerModel>, Error> {
        self.store.models().await
    }

    /// The model called `name`.
    pub async fn get_model(&self, name: &str) -> Result<ServerModel, Error> {
        self.store
            .model(name)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "model",
                key: name.to_owned(),
            })
    }

    /// Changes a model's description or states.
    pub async fn update_model(&self, name: &str, patch: ModelPatch) -> Result<ServerModel, Error> {
        let mut m = self.get_model(name).await?;
        if let Some(d) = patch.description {
            m.description = d;
        }
        if let Some(s) = patch.states {
            m.states = validate_states(&s)?;
        }
        self.store.update_model(&m).await
    }

    /// Deletes a model no server uses.
    pub async fn delete_model(&self, name: &str) -> Result<ServerModel, Error> {
        self.store.delete_model(name).await
    }

    // ----------------------------------------------------------- servers

    /// Creates a server: `patch.name` and `patch.model` are required, the
    /// rest optional. The minion id is generated (see the module docs of
    /// [`crate::registry`]); the status starts at `created` unless given.
    /// A generated minion id that is taken (by a server, or by a key file
    /// in `keys.dir`) is replaced by a new one, eight times
    /// at most; a key file that is there is never touched.
    pub async fn create_server(&self, patch: ServerPatch) -> Result<Server, Error> {
        let name = patch
            .name
            .clone()
            .ok_or_else(|| Error::invalid("name", "required"))?;
        let name = validate_hostname(&name)?;
        let model = patch
            .model
            .clone()
            .ok_or_else(|| Error::invalid("model", "required"))?;
        if patch.revision.is_some() {
            return Err(Error::invalid("revision", "a new server starts at 1"));
        }
        let mut server = Server {
            id: 0,
            minion_id: String::new(),
            name,
            model,
            key_fingerprint: None,
            status: Status::Created,
            is_vm: false,
            vm_host: None,
            external_ip: None,
            internal_ip: None,
            is_proxmox_host: false,
            proxmox_node: None,
            external_interface: None,
            internal_network: None,
            nginx_proxy: None,
            samba_managed: false,
            samba_base_folder: None,
            users: Vec::new(),
            public_key: None,
            revision: 1,
            created_at: 0,
            updated_at: 0,
        };
        self.apply(&mut server, patch).await?;
        let mut taken = None;
        for _ in 0..MINION_ID_TRIES {
            server.minion_id = (self.minion_ids.0)(&server.name)?;
            match self.create_as(server.clone()).await {
                Err(e @ Error::MinionIdTaken { .. }) => {
                    tracing::info!(message = "Generated minion id taken; trying another.", %e);
                    taken = Some(e);
                }
                done => return done,
            }
        }
        Err(taken.unwrap_or_else(|| Error::invalid("minion_id", "no minion id tried")))
    }

    /// One try of [`Self::create_server`] with the minion id chosen: the key
    /// (if servers get keys), then the row. If the row is not written, only
    /// the key file this try created is removed.
    async fn create_as(&self, mut server: Server) -> Result<Server, Error> {
        let Some(keys) = &self.keys else {
            return self.creates.insert(&self.store, server).await;
        };
        let minion_id = server.minion_id.clone();
        let claim = match keys.issue(&minion_id).await {
            Ok(claim) => claim,
            Err(IssueError::Exists(path)) => {
                return Err(Error::MinionIdTaken {
                    minion_id,
                    by: format!("the key file {}", path.display()),
                })
            }
            Err(e) => {
                return Err(Error::Keys {
                    minion_id,
                    reason: e.to_string(),
                })
            }
        };
        let public = claim.issued().public_clean.clone();
        server.key_fingerprint = Some(fingerprint(&public));
        server.public_key = Some(public);
        server.status = Status::KeysIssued;
        match self.creates.insert(&self.store, server).await {
            Ok(created) => {
                let _ = claim.keep();
                self.preseed(keys, &created).await;
                Ok(created)
            }
            Err(e) => {
                if let Err(error) = keys.discard(claim).await {
                    tracing::warn!(message = "Key of a server not created left behind.", %minion_id, %error);
                }
                Err(e)
            }
        }
    }

    /// Issues a new key pair for a re-provisioned machine: the registry gets
    /// the new public key (status `keys-issued`), the new private key replaces
    /// the old one for the bundle. Returns the server before and after; the
    /// caller retires the old key on the master ([`crate::lifecycle`]).
    /// Refused with `conflict` if the row changed while the key was made.
    pub async fn rekey_server(&self, server: &ServerRef) -> Result<(Server, Server), Error> {
        let keys = self.keys.as_ref().ok_or_else(|| {
            Error::invalid("keys", "no key issuer configured (keys_dir in the config)")
        })?;
        let old = self.get_server(server).await?;
        let minion_id = old.minion_id.clone();
        let key_error = |e: IssueError| Error::Keys {
            minion_id: minion_id.clone(),
            reason: e.to_string(),
        };
        let claim = keys.reissue(&minion_id).await.map_err(key_error)?;
        let public = claim.issued().public_clean.clone();
        let columns = KeyColumns {
            public_key: &public,
            fingerprint: &fingerprint(&public),
        };
        match self
            .store
            .set_server_key(old.id, old.revision, &columns, Status::KeysIssued)
            .await
        {
            Ok(updated) => {
                keys.commit_reissue(claim).await.map_err(key_error)?;
                self.preseed(keys, &updated).await;
                Ok((old, updated))
            }
            Err(e) => {
                if let Err(error) = keys.discard(claim).await {
                    tracing::warn!(message = "Unused replacement key left behind.", %minion_id, %error);
                }
                Err(e)
            }
        }
    }

    /// Moves `server` to `status` if it is still in the status the caller
    /// read (`server.status`): only the status is written, so a change made
    /// meanwhile (a rekey, a patch) is kept. `None` when the status had moved
    /// on and nothing was written.
    pub async fn set_status(
        &self,
        server: &Server,
        status: Status,
    ) -> Result<Option<Server>, Error> {
        self.transition(server.id, &[server.status], status).await
    }

    /// Moves server `id` to `to` if its status is one of `from`; `None` if
    /// it is not (nothing written).
    pub async fn transition(
        &self,
        id: i64,
        from: &[Status],
        to: Status,
    ) -> Result<Option<Server>, Error> {
        self.store.set_server_status(id, from, to).await
    }

    /// Preseed mode: the master gets the key now. A failure is logged, not
    /// returned: the server and its key exist; `server rekey` reinstalls.
    async fn preseed(&self, keys: &KeyIssuer, server: &Server) {
        if let Some(public) = &server.public_key {
            if let Err(error) = keys.preseed(&server.minion_id, public).await {
                tracing::warn!(message = "Key not preseeded on the master.", minion_id = %server.minion_id, %error);
            }
        }
    }

    /// One server by id or name.
    pub async fn get_server(&self, server: &ServerRef) -> Result<Server, Error> {
        let found = match server {
            ServerRef::Id(id) => self.store.server(ServerKey::Id(*id)).await?,
            ServerRef::Name(n) => {
                self.store
                    .server(ServerKey::Name(&n.to_ascii_lowercase()))
                    .await?
            }
        };
        found.ok_or_else(|| Error::NotFound {
            kind: "server",
            key: server.to_string(),
        })
    }

    /// The server a minion belongs to, if any.
    pub async fn server_by_minion_id(&self, minion_id: &str) -> Result<Option<Server>, Error> {
        self.store.server(ServerKey::MinionId(minion_id)).await
    }

    /// The servers matching `filter` (its `after_id` and `limit` set here),
    /// `page` at a time by id: a sweep over many servers holds one page.
    pub fn server_pages(&self, filter: ServerFilter, page: i64) -> ServerPages<'_, S> {
        ServerPages {
            service: self,
            filter: ServerFilter {
                after_id: None,
                limit: Some(page),
                newest_first: false,
                ..filter
            },
        }
    }

    /// Servers matching every given filter, by id.
    pub async fn find_servers(&self, filter: &ServerFilter) -> Result<Vec<Server>, Error> {
        let name = filter.name.as_ref().map(|n| n.to_ascii_lowercase());
        self.store
            .find_servers(&Filter {
                name: name.as_deref(),
                model: filter.model.as_deref(),
                minion_id: filter.minion_id.as_deref(),
                status: filter.status,
                changed_since: filter.changed_since,
                changed_before: filter.changed_before,
                after_id: filter.after_id,
                limit: filter.limit,
                newest_first: filter.newest_first,
            })
            .await
    }

    /// Changes a server. The id, minion id and key never change here.
    /// With `patch.revision` the change is made from that revision and
    /// refused with `conflict` if the row moved on; without it, the patch is
    /// applied to the row as read and written only if the row is still that
    /// revision (re-read and reapplied otherwise), so no column is ever
    /// written back from a stale copy.
    pub async fn update_server(
        &self,
        server: &ServerRef,
        patch: ServerPatch,
    ) -> Result<Server, Error> {
        let tries = if patch.revision.is_some() {
            1
        } else {
            UPDATE_TRIES
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut s = self.get_server(server).await?;
            if let Some(expected) = patch.revision {
                if expected != s.revision {
                    return Err(Error::Conflict {
                        kind: "server",
                        key: server.to_string(),
                        expected,
                        current: s.revision,
                    });
                }
            }
            if let Some(n) = &patch.name {
                s.name = validate_hostname(n)?;
            }
            let before = s.clone();
            self.apply(&mut s, patch.clone()).await?;
            self.check_forwards_kept(&before, &s).await?;
            self.check_shares_kept(&before, &s).await?;
            match self.store.update_server(&s).await {
                Err(Error::Conflict { .. }) if attempt < tries => continue,
                done => return done,
            }
        }
    }

    /// Deletes a server that is no other server's VM host or proxy and that
    /// no forward or backup names (refused, naming them).
    pub async fn delete_server(&self, server: &ServerRef) -> Result<Server, Error> {
        let s = self.get_server(server).await?;
        let mut by = self.store.forward_references(s.id).await?;
        by.extend(self.store.share_references(s.id).await?);
        by.extend(self.store.backup_references(s.id).await?);
        if !by.is_empty() {
            return Err(Error::ServerReferenced { name: s.name, by });
        }
        self.store.delete_server(s.id).await
    }

    /// Applies everything but the name (validated by the caller), resolves
    /// server references, then checks the record as a whole.
    async fn apply(&self, s: &mut Server, p: ServerPatch) -> Result<(), Error> {
        if let Some(m) = p.model {
            if m.is_empty() {
                return Err(Error::invalid("model", "required"));
            }
            s.model = m;
        }
        if let Some(st) = p.status {
            s.status = st;
        }
        if let Some(b) = p.is_vm {
            s.is_vm = b;
        }
        if let Some(r) = p.vm_host {
            s.vm_host = self.resolve("vm_host", r).await?;
        }
        if let Some(ip) = p.external_ip {
            s.external_ip = ip;
        }
        if let Some(ip) = p.internal_ip {
            s.internal_ip = ip;
        }
        if let Some(b) = p.is_proxmox_host {
            s.is_proxmox_host = b;
        }
        if let Some(n) = p.proxmox_node {
            s.proxmox_node = n;
        }
        if let Some(i) = p.external_interface {
            s.external_interface = i;
        }
        if let Some(n) = p.internal_network {
            s.internal_network = n;
        }
        if let Some(r) = p.nginx_proxy {
            s.nginx_proxy = self.resolve("nginx_proxy", r).await?;
        }
        if let Some(b) = p.samba_managed {
            s.samba_managed = b;
        }
        if let Some(f) = p.samba_base_folder {
            s.samba_base_folder = f;
        }
        if let Some(u) = p.users {
            s.users = u;
        }
        validate_server(s)
    }

    async fn resolve(&self, field: &str, r: Option<ServerRef>) -> Result<Option<i64>, Error> {
        let Some(r) = r else { return Ok(None) };
        match self.get_server(&r).await {
            Ok(s) => Ok(Some(s.id)),
            Err(Error::NotFound { .. }) => Err(Error::invalid(field, format!("no server {r}"))),
            Err(e) => Err(e),
        }
    }
}

// --------------------------------------------------------------- validation

/// Checks a hostname against RFC 1123 §2.1 (labels of letters, digits and
/// inner hyphens, 1–63 characters, 253 in all, no trailing dot) and returns
/// it in lower case, the form stored (hostnames are case-insensitive).
pub fn validate_hostname(name: &str) -> Result<String, Error> {
    let bad = |reason: &str| Error::InvalidHostname {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_HOSTNAME {
        return Err(bad("longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad("empty label (leading, trailing or double dot)"));
        }
        if label.len() > MAX_LABEL {
            return Err(bad("a label is longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad("only letters, digits, hyphens and dots are allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label starts or ends with a hyphen"));
        }
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(bad("an IP address is not a hostname"));
    }
    Ok(name.to_ascii_lowercase())
}

fn validate_model_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            format!("model name {name:?}: 1-64 letters, digits, '-', '_' or '.'"),
        ))
    }
}

/// SLS names: dotted paths of letters, digits, `_` and `-`.
fn validate_states(states: &[String]) -> Result<Vec<String>, Error> {
    for s in states {
        let ok = !s.is_empty()
            && s.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
            });
        if !ok {
            return Err(Error::invalid(
                "states",
                format!("{s:?} is not an SLS name"),
            ));
        }
    }
    Ok(states.to_vec())
}

fn validate_server(s: &Server) -> Result<(), Error> {
    if s.vm_host.is_some() && !s.is_vm {
        return Err(Error::invalid(
            "vm_host",
            "only a VM (is_vm=true) has a VM host",
        ));
    }
    if s.id != 0 && s.vm_host == Some(s.id) {
        return Err(Error::invalid(
            "vm_host",
            "a server cannot be its own VM host",
        ));
    }
    if s.id != 0 && s.nginx_proxy == Some(s.id) {
        return Err(Error::invalid(
            "nginx_proxy",
            "a server cannot be its own proxy",
        ));
    }
    if s.nginx_proxy.is_some() && !s.is_proxmox_host {
        return Err(Error::invalid(
            "nginx_proxy",
            "only a Proxmox host (is_proxmox_host=true) has an nginx proxy",
        ));
    }
    if let Some(n) = &s.proxmox_node {
        if validate_hostname(n).is_err() || n.contains('.') {
            return Err(Error::invalid(
                "proxmox_node",
                format!("{n:?} is not a node name (one hostname label)"),
            ));
        }
    }
    if let Some(i) = &s.external_interface {
        let ok = !i.is_empty()
            && i.len() <= MAX_IFNAME
            && i != "."
            && i != ".."
            // What Linux allows, less what would need quoting in an nft or
            // shell line: letters, digits, `.`, `_`, `-`, `@`.
            && i
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
        if !ok {
            return Err(Error::invalid(
                "external_interface",
                format!("{i:?} is not an interface name"),
            ));
        }
    }
    if let Some(f) = &s.samba_base_folder {
        if !f.starts_with('/') || f.contains('\0') || f.split('/').any(|p| p == "..") {
            return Err(Error::invalid(
                "samba_base_folder",
                format!("{f:?} is not an absolute path"),
            ));
        }
    }
    if s.samba_managed && s.samba_base_folder.is_none() {
        return Err(Error::invalid(
            "samba_base_folder",
            "required when samba_managed=true",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for u in &s.users {
        let ok = !u.is_empty()
            && u.len() <= MAX_USER
            && u.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && u.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
        if !ok {
            return Err(Error::invalid("users", format!("{u:?} is not a user name")));
        }
        if !seen.insert(u) {
            return Err(Error::invalid("users", format!("{u:?} is listed twice")));
        }
    }
    Ok(())
}

/// `<hostname>-<8 random hex digits>`: stable (chosen once), unique, never
/// reused for a later server of the same name.
fn new_minion_id(hostname: &str) -> Result<String, Error> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b)
        .map_err(|e| Error::invalid("minion_id", format!("no randomness available: {e}")))?;
    Ok(format!("{hostname}-{:08x}", u32::from_be_bytes(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn server_pages_cover_every_server_once_in_id_order() {
        let svc = crate::registry::open("sqlite::memory:").await.unwrap();
        svc.create_model("web", "", &[]).await.unwrap();
        for k in 0..5 {
            let mut p = ServerPatch::default();
            for kv in [format!("name=s{k}.example.org"), "model=web".to_owned()] {
                p.set_assignment(&kv).unwrap();
            }
            svc.create_server(p).await.unwrap();
        }
        let mut pages = svc.server_pages(ServerFilter::default(), 2);
        let mut sizes = Vec::new();
        let mut names = Vec::new();
        while let Some(page) = pages.next().await.unwrap() {
            sizes.push(page.len());
            names.extend(page.into_iter().map(|s| s.name));
        }
        assert_eq!(sizes, [2, 2, 1]);
        let want: Vec<String> = (0..5).map(|k| format!("s{k}.example.org")).collect();
        assert_eq!(names, want);
    }

    /// A service on a fresh in-memory registry whose minion ids come from
    /// `ids` in order, issuing keys into `keys`.
    async fn scripted(
        keys: &std::path::Path,
        ids: &[&str],
    ) -> (Service<crate::registry::DbStore>, Arc<Mutex<usize>>) {
        let svc = crate::registry::open("sqlite::memory:")
            .await
            .unwrap()
            .with_keys(KeyIssuer::new(keys, 2048).unwrap());
        svc.create_model("web", "", &[]).await.unwrap();
        let script: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        let used = Arc::new(Mutex::new(0));
        let counter = used.clone();
        let svc = Service {
            minion_ids: MinionIds(Arc::new(move |_| {
                let mut n = counter.lock().unwrap();
                let id = script[(*n).min(script.len() - 1)].clone();
                *n += 1;
                Ok(id)
            })),
            ..svc
        };
        (svc, used)
    }

    fn named(name: &str) -> ServerPatch {
        ServerPatch {
            name: Some(name.into()),
            model: Some("web".into()),
            ..ServerPatch::default()
        }
    }

    /// A minion id held by a key file (a server of another master whose row
    /// is not here, a stray file): a new id is drawn, the file is untouched.
    #[tokio::test]
    async fn a_minion_id_held_by_a_key_file_is_regenerated_and_the_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, used) = scripted(dir.path(), &["a-00000001", "a-00000002"]).await;
        let held = svc.keys().unwrap().private_path("a-00000001");
        std::fs::write(&held, "precious").unwrap();
        let s = svc.create_server(named("a")).await.unwrap();
        assert_eq!(s.minion_id, "a-00000002");
        assert_eq!(*used.lock().unwrap(), 2);
        assert_eq!(std::fs::read_to_string(&held).unwrap(), "precious");
        let issued = svc.keys().unwrap().private_pem("a-00000002").unwrap();
        assert_eq!(
            s.public_key.as_deref(),
            Some(issued.public_clean().as_str())
        );
        assert_eq!(
            s.key_fingerprint.as_deref(),
            Some(issued.fingerprint().as_str())
        );
    }

    /// A minion id held by a server (unique constraint): the failed insert
    /// removes only the key file it created, never the existing server's.
    #[tokio::test]
    async fn a_minion_id_held_by_a_server_is_regenerated_and_its_key_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, _) = scripted(dir.path(), &["b-00000001", "b-00000001", "b-00000002"]).await;
        let first = svc.create_server(named("b")).await.unwrap();
        let keys = svc.keys().unwrap();
        let first_key = std::fs::read_to_string(keys.private_path("b-00000001")).unwrap();
        // The row exists, its key file is elsewhere (issued on another master):
        // the claim succeeds, the insert is refused, the claim is discarded.
        let moved = dir.path().join("elsewhere.pem");
        std::fs::rename(keys.private_path("b-00000001"), &moved).unwrap();
        let second = svc.create_server(named("b2")).await.unwrap();
        assert_eq!(second.minion_id, "b-00000002");
        assert!(
            !keys.private_path("b-00000001").exists(),
            "the key of the refused try is discarded"
        );
        std::fs::rename(&moved, keys.private_path("b-00000001")).unwrap();
        // Now with the key file in place: refused at the claim, nothing touched.
        let (svc, _) = scripted(dir.path(), &["b-00000001", "b-00000003"]).await;
        let third = svc.create_server(named("b3")).await.unwrap();
        assert_eq!(third.minion_id, "b-00000003");
        assert_eq!(
            std::fs::read_to_string(keys.private_path("b-00000001")).unwrap(),
            first_key,
            "the existing server's key is intact"
        );
        assert_eq!(
            svc.keys()
                .unwrap()
                .private_pem("b-00000001")
                .unwrap()
                .public_clean(),
            first.public_key.unwrap()
        );
    }

    #[tokio::test]
    async fn minion_id_tries_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (svc, used) = scripted(dir.path(), &["c-00000001"]).await;
        svc.create_server(named("c")).await.unwrap();
        let e = svc.create_server(named("c2")).await.unwrap_err();
        assert_eq!(e.code(), "minion_id_taken", "{e}");
        assert_eq!(*used.lock().unwrap(), 1 + MINION_ID_TRIES);
        assert_eq!(
            svc.find_servers(&ServerFilter::default())
                .await
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn key_columns_are_never_patched() {
        let mut p = ServerPatch::default();
        for k in ["key_fingerprint", "public_key", "minion_id"] {
            let e = p.set(k, "x").unwrap_err();
            assert_eq!(e.code(), "invalid_value", "{k}");
        }
        p.set("revision", "7").unwrap();
        assert_eq!(p.revision, Some(7));
        assert!(p.set("revision", "seven").is_err());
    }

    #[test]
    fn hostnames_follow_rfc_1123() {
        for ok in ["web01", "Web01.Example.org", "1host", "a-b.c", "x"] {
            assert!(validate_hostname(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            validate_hostname("Web01.EXAMPLE.org").unwrap(),
            "web01.example.org"
        );
        let long_label = "a".repeat(64);
        let too_long = ["a"; 127].join(".") + ".b";
        for bad in [
            "",
            "-web",
            "web-",
            "we b",
            "web_01",
            "web..x",
            "web.",
            ".web",
            long_label.as_str(),
            too_long.as_str(),
            "10.0.0.1",
            "héte",
        ] {
            let e = validate_hostname(bad).unwrap_err();
            assert_eq!(e.code(), "invalid_hostname", "{bad}");
        }
    }

    #[test]
    fn minion_ids_start_with_the_hostname_and_differ() {
        let a = new_minion_id("web01").unwrap();
        let b = new_minion_id("web01").unwrap();
        assert!(
            a.starts_with("web01-") && a.len() == "web01-".len() + 8,
            "{a}"
        );
        assert_ne!(a, b);
    }

    #[test]
    fn patches_parse_key_value_text() {
        let mut p = ServerPatch::default();
        p.set_assignment("is_vm=yes").unwrap();
        p.set_assignment("vm_host=3").unwrap();
        p.set_assignment("external_ip=192.0.2.7").unwrap();
        p.set_assignment("internal_ip=").unwrap();
        p.set_assignment("users=alice, bob").unwrap();
        assert_eq!(p.is_vm, Some(true));
        assert_eq!(p.vm_host, Some(Some(ServerRef::Id(3))));
        assert_eq!(p.external_ip, Some(Some("192.0.2.7".parse().unwrap())));
        assert_eq!(p.internal_ip, Some(None));
        assert_eq!(p.users, Some(vec!["alice".into(), "bob".into()]));
        for (bad, field) in [
            ("is_vm=maybe", "is_vm"),
            ("external_ip=300.1.1.1", "external_ip"),
            ("colour=red", "colour"),
            ("status=sleeping", "status"),
            ("no-equals", "no-equals"),
        ] {
            match p.set_assignment(bad).unwrap_err() {
                Error::InvalidValue { field: f, .. } => assert_eq!(f, field, "{bad}"),
                e => panic!("{bad}: {e:?}"),
            }
        }
    }

    #[test]
    fn patches_parse_json_maps() {
        let v = serde_json::json!({
            "request_id": "r1", "name": "web01", "model": "web",
            "is_vm": true, "vm_host": 4, "users": ["alice"], "proxmox_node": null,
            "revision": 3
        });
        let p = ServerPatch::from_json(v.as_object().unwrap(), &["request_id"]).unwrap();
        assert_eq!(p.name.as_deref(), Some("web01"));
        assert_eq!(p.vm_host, Some(Some(ServerRef::Id(4))));
        assert_eq!(p.users, Some(vec!["alice".to_owned()]));
        assert_eq!(p.proxmox_node, Some(None));
        assert_eq!(p.revision, Some(3), "a bus update may name its revision");
        let v = serde_json::json!({"request_id": "r1"});
        assert_eq!(
            ServerPatch::from_json(v.as_object().unwrap(), &[])
                .unwrap_err()
                .code(),
            "invalid_value"
        );
    }
}
