//! The registry: server models, servers and the outbox of their changes.
//!
//! Layout:
//! - this file: the records ([`ServerModel`], [`Server`], [`Status`]), the
//!   ways to name a server ([`ServerRef`]) and the one [`Error`] type.
//! - [`service`]: the one set of operations the CLI and the bus use —
//!   validate, write, append to the outbox, in one transaction.
//! - [`store`]: the [`Store`] trait, all of the SQL, and its two backends
//!   (SQLite, PostgreSQL) running the very same queries.
//! - [`outbox`]: the change log a dispatcher reads (at-least-once, idempotent).
//! - [`inventory`]: port and hostname forwards (the records, validation).
//! - [`shares`]: samba shares (the records, validation, passwords).
//! - [`users`]: users, API tokens, sessions and the audit log of the HTTP
//!   API (records, validation, secrets hashed and redacted).
//! - [`dispatch`]: per (target server, state) what is wanted and what was
//!   applied, for the inventory dispatcher.
//!
//! Schemas live in `migrations/sqlite/` and `migrations/postgres/`, embedded in
//! the binary and applied when the registry is opened.
//!
//! A server's minion id is chosen once, at creation: its hostname, a dash and
//! eight random hex digits (`web01.example.org-3fa94c1e`). It never changes,
//! even when the server is renamed, and it is never reused: a server created
//! later with the same hostname gets a different minion id, so a key issued for
//! the old one can never be taken for the new one.

pub mod backup;
pub mod changes;
pub mod cluster;
pub mod dispatch;
pub mod exec;
pub mod group_commit;
pub mod inventory;
pub mod outbox;
pub mod service;
pub mod shares;
pub mod store;
pub mod users;

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use dispatch::{DispatchRun, DispatchStatus, DispatchTarget, StateKind};
pub use inventory::{HostnameForward, HostnameForwardPatch, PortForward, PortForwardPatch, Proto};
pub use outbox::{OutboxEntry, OutboxKind, OutboxRow};
pub use service::{ModelPatch, ServerFilter, ServerPatch, Service};
pub use shares::Share;
pub use store::{open, DbStore, Store};

/// A kind of server: which Salt states a server of this model gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerModel {
    /// Assigned by the registry.
    pub id: i64,
    /// Unique name, e.g. `web`.
    pub name: String,
    /// Free text for people.
    pub description: String,
    /// The Salt states (SLS names) applied when a server of this model registers.
    pub states: Vec<String>,
}

/// Where a server is in its life with Salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Recorded, no keys yet.
    Created,
    /// The minion key pair and bundle were generated.
    KeysIssued,
    /// The minion's key arrived at the master and waits.
    Pending,
    /// The key was accepted: the minion is linked to the server.
    Registered,
    /// The minion answers.
    Online,
    /// The minion stopped answering.
    Offline,
}

impl Status {
    /// Every status, in life order.
    pub const ALL: [Status; 6] = [
        Status::Created,
        Status::KeysIssued,
        Status::Pending,
        Status::Registered,
        Status::Online,
        Status::Offline,
    ];

    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "created",
            Status::KeysIssued => "keys-issued",
            Status::Pending => "pending",
            Status::Registered => "registered",
            Status::Online => "online",
            Status::Offline => "offline",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| Error::InvalidValue {
                field: "status".to_owned(),
                reason: format!(
                    "{s:?} is not one of created, keys-issued, pending, registered, online, offline"
                ),
            })
    }
}

/// A server as the registry knows it (the attributes come from the manual in
/// `seeds/001_*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    /// Assigned by the registry.
    pub id: i64,
    /// The hostname (RFC 1123, lower case), unique.
    pub name: String,
    /// The model's name.
    pub model: String,
    /// The Salt minion id, generated at creation, unique and stable.
    pub minion_id: String,
    /// Fingerprint of the minion key issued for this server.
    pub key_fingerprint: Option<String>,
    /// Where the server is in its life with Salt.
    pub status: Status,
    /// A virtual machine (then `vm_host` may name its host).
    pub is_vm: bool,
    /// Id of the server this VM runs on.
    pub vm_host: Option<i64>,
    /// Public address.
    pub external_ip: Option<IpAddr>,
    /// Address on the internal network.
    pub internal_ip: Option<IpAddr>,
    /// A Proxmox host (port forwards are set up on it).
    pub is_proxmox_host: bool,
    /// Proxmox node name of this host.
    pub proxmox_node: Option<String>,
    /// Network interface facing the outside (for NAT), e.g. `vmbr0`.
    pub external_interface: Option<String>,
    /// The internal network of this Proxmox host (CIDR, e.g. `10.0.0.0/24`),
    /// masqueraded towards `external_interface`.
    #[serde(default)]
    pub internal_network: Option<String>,
    /// Id of the nginx reverse-proxy server of this Proxmox host.
    pub nginx_proxy: Option<i64>,
    /// Samba shares on this server are managed.
    pub samba_managed: bool,
    /// Directory under which the samba shares are created.
    pub samba_base_folder: Option<String>,
    /// System users of this server.
    pub users: Vec<String>,
    /// The minion public key issued for this server: SPKI PEM, clean_key'd
    /// (as the master stores it), compared as text with what a minion presents.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Incremented by every write of the row (starts at 1): a patch may name
    /// the revision it was made from and is refused with [`Error::Conflict`]
    /// when the row has moved on since.
    #[serde(default)]
    pub revision: i64,
    /// Creation time, Unix milliseconds.
    pub created_at: i64,
    /// Last change, Unix milliseconds.
    pub updated_at: i64,
}

/// How a caller names a server: its id, or its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerRef {
    /// The registry id.
    Id(i64),
    /// The hostname.
    Name(String),
}

impl FromStr for ServerRef {
    type Err = std::convert::Infallible;

    /// All digits is an id, anything else a name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse::<i64>() {
            Ok(id) if !s.starts_with(['+', '-']) => ServerRef::Id(id),
            _ => ServerRef::Name(s.to_owned()),
        })
    }
}

impl fmt::Display for ServerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerRef::Id(id) => write!(f, "#{id}"),
            ServerRef::Name(n) => f.write_str(n),
        }
    }
}

/// Why a registry operation failed. Every variant has a stable [`Error::code`]
/// that the bus puts in its error replies.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model or server with this name exists already.
    #[error("a {kind} named {name:?} already exists")]
    DuplicateName {
        /// `model` or `server`.
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// A server was attached to a model that does not exist.
    #[error("no model named {0:?}")]
    UnknownModel(String),
    /// A model still has servers.
    #[error("model {name:?} is used by {servers} server(s)")]
    ModelInUse {
        /// The model.
        name: String,
        /// How many servers use it.
        servers: i64,
    },
    /// A server is the VM host or nginx proxy of another.
    #[error("server {name:?} is the VM host or nginx proxy of another server")]
    ServerInUse {
        /// The server.
        name: String,
    },
    /// A server name is not a valid hostname.
    #[error("invalid hostname {name:?}: {reason}")]
    InvalidHostname {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A field has a value the registry refuses.
    #[error("invalid {field}: {reason}")]
    InvalidValue {
        /// The field (as in `server set KEY=VALUE`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No such model or server.
    #[error("no {kind} {key}")]
    NotFound {
        /// `model`, `server` or `outbox entry`.
        kind: &'static str,
        /// How it was named.
        key: String,
    },
    /// A minion key pair could not be issued, stored or installed.
    #[error("minion key for {minion_id}: {reason}")]
    Keys {
        /// The minion the key is for.
        minion_id: String,
        /// What failed (names the file).
        reason: String,
    },
    /// The generated minion id is taken (by a server, or by a key file):
    /// creating retries with a new one, a bounded number of times.
    #[error("minion id {minion_id} is taken ({by})")]
    MinionIdTaken {
        /// The minion id.
        minion_id: String,
        /// What holds it: a server of the registry, or a key file.
        by: String,
    },
    /// The record changed since the caller read it (optimistic concurrency):
    /// nothing was written; read it again and reapply.
    #[error("{kind} {key} changed meanwhile: it is at revision {current}, not {expected}")]
    Conflict {
        /// `server`.
        kind: &'static str,
        /// How it was named.
        key: String,
        /// The revision the caller's change was made from.
        expected: i64,
        /// The revision stored now.
        current: i64,
    },
    /// A forward with the same key exists (one (host, protocol, source port),
    /// one (proxy, domain, listen port)).
    #[error("{what} is taken by {by}")]
    DuplicateForward {
        /// The key asked for.
        what: String,
        /// The forward holding it.
        by: String,
    },
    /// A port forward's destination is not a guest of its host (or a hostname
    /// forward's destination is not a guest at all).
    #[error("server {dest:?} is not a guest of {host}")]
    NotAGuest {
        /// The destination.
        dest: String,
        /// The host it should run on.
        host: String,
    },
    /// A port forward's host is not a Proxmox host ready for NAT.
    #[error("server {name:?} cannot forward ports: {reason}")]
    NotAHost {
        /// The server.
        name: String,
        /// What it lacks, and how to give it.
        reason: String,
    },
    /// A hostname forward's destination's host has no nginx proxy.
    #[error(
        "the host {host:?} of {dest:?} has no nginx proxy (server set {host} nginx_proxy=SERVER)"
    )]
    NoProxy {
        /// The destination.
        dest: String,
        /// Its host.
        host: String,
    },
    /// A change to a server would break the forwards that use it.
    #[error("server {name:?} is used by {}: remove or move them first", by.join(", "))]
    ServerReferenced {
        /// The server.
        name: String,
        /// The forwards, described.
        by: Vec<String>,
    },
    /// A share on a server that is not samba-managed (no samba base).
    #[error("server {name:?} is not samba-managed (server set {name} samba_base=/ABSOLUTE/PATH)")]
    NotSambaManaged {
        /// The server.
        name: String,
    },
    /// A share with the same name (ignoring case), folder or user exists on
    /// that server.
    #[error("{what} is taken by {by}")]
    DuplicateShare {
        /// The key asked for.
        what: String,
        /// The share holding it.
        by: String,
    },
    /// The share user (`shares.user_prefix` + the share name) is longer than
    /// `useradd` takes.
    #[error("share user {user:?} is longer than {max} characters: choose a shorter share name")]
    UserNameTooLong {
        /// The user name it would be.
        user: String,
        /// The longest.
        max: usize,
    },
    /// A backup destination folder is taken (one backup per destination
    /// folder of a server, none inside another).
    #[error("{what} is taken by {by}")]
    DuplicateBackup {
        /// The destination asked for.
        what: String,
        /// The backup holding it.
        by: String,
    },
    /// A user with this name exists already (HTTP API users).
    #[error("a user named {name:?} already exists")]
    DuplicateUser {
        /// The name asked for.
        name: String,
    },
    /// An API token with this name exists already.
    #[error("a token named {name:?} already exists")]
    DuplicateToken {
        /// The name asked for.
        name: String,
    },
    /// A password shorter than the minimum (or empty).
    #[error("the password must have at least {min} characters")]
    PasswordTooShort {
        /// The minimum, in characters.
        min: usize,
    },
    /// The database failed (not a constraint the registry knows about).
    #[error("registry database, {op}: {source}")]
    Database {
        /// What was being done, naming the subject.
        op: String,
        /// The driver's error.
        source: sqlx::Error,
    },
}

impl Error {
    /// A short stable code for machines (bus replies, scripts).
    pub fn code(&self) -> &'static str {
        match self {
            Error::DuplicateName { .. } => "duplicate_name",
            Error::UnknownModel(_) => "unknown_model",
            Error::ModelInUse { .. } => "model_in_use",
            Error::ServerInUse { .. } => "server_in_use",
            Error::InvalidHostname { .. } => "invalid_hostname",
            Error::InvalidValue { .. } => "invalid_value",
            Error::NotFound { .. } => "not_found",
            Error::Keys { .. } => "key_issue",
            Error::MinionIdTaken { .. } => "minion_id_taken",
            Error::Conflict { .. } => "conflict",
            Error::DuplicateForward { .. } => "duplicate_forward",
            Error::NotAGuest { .. } => "not_a_guest",
            Error::NotAHost { .. } => "not_a_host",
            Error::NoProxy { .. } => "no_proxy",
            Error::ServerReferenced { .. } => "server_in_use",
            Error::NotSambaManaged { .. } => "not_samba_managed",
            Error::DuplicateShare { .. } => "duplicate_share",
            Error::UserNameTooLong { .. } => "user_name_too_long",
            Error::DuplicateBackup { .. } => "duplicate_backup",
            Error::DuplicateUser { .. } => "duplicate_user",
            Error::DuplicateToken { .. } => "duplicate_token",
            Error::PasswordTooShort { .. } => "password_too_short",
            Error::Database { .. } => "database",
        }
    }

    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Error::InvalidValue {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip_and_match_serde() {
        for st in Status::ALL {
            assert_eq!(st.as_str().parse::<Status>().unwrap(), st);
            assert_eq!(
                serde_json::to_value(st).unwrap(),
                serde_json::Value::String(st.as_str().to_owned())
            );
        }
        assert_eq!(
            "bogus".parse::<Status>().unwrap_err().code(),
            "invalid_value"
        );
    }

    #[test]
    fn server_refs_are_ids_when_all_digits() {
        assert_eq!("42".parse::<ServerRef>().unwrap(), ServerRef::Id(42));
        assert_eq!(
            "web01".parse::<ServerRef>().unwrap(),
            ServerRef::Name("web01".into())
        );
        assert_eq!(
            "+4".parse::<ServerRef>().unwrap(),
            ServerRef::Name("+4".into())
        );
    }
}
