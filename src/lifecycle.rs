//! A server's key across the registry, the key files and the master: the
//! operations the CLI, the bus and (later) the HTTP API and the daemon's
//! start-up reconcile share. The callers only parse arguments and print.
//!
//! - [`rekey`]: a new pair for a re-provisioned machine (registry and key
//!   file, [`Service::rekey_server`]), then the old key retired on the master.
//! - [`retire_stale`]: every key the master holds for a server's minion id
//!   (accepted, pending, rejected, denied) that is not the issued one is
//!   deleted, with exact-id wheel calls (`key.delete_dict`, never a glob).
//!   The same function serves a reconcile at start-up: it compares, so it
//!   is safe to run for any server at any time.
//! - [`bundle`]: the tar.gz a fresh machine installs (its keys, the master's
//!   signing key, a minion config naming the masters).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json};

use crate::master_config::MasterConfig;
use crate::pki::bundle::{self as tarball, BundleSpec};
use crate::pki::{clean_key, IssueError, KeyIssuer};
use crate::registry::{self, Server, ServerRef, Service, Store};
use crate::salt::{key_dict, ReqClient, RequestError};

/// The master's key directories under its `pki_dir`, as `key.*_dict` names them.
pub const KEY_DIRS: [&str; 4] = [
    "minions",
    "minions_pre",
    "minions_rejected",
    "minions_denied",
];

/// Why a key lifecycle operation failed (each names the minion or file).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The registry refused or failed.
    #[error(transparent)]
    Registry(#[from] registry::Error),
    /// No key issuer is configured.
    #[error("no key issuer configured (keys.dir in the config)")]
    NoIssuer,
    /// A key file could not be read.
    #[error("the private key of {minion_id} (issued on another master?): {source}")]
    PrivateKey {
        /// The minion.
        minion_id: String,
        /// What failed.
        source: IssueError,
    },
    /// A file of the master could not be read.
    #[error("reading {}: {source}{hint}", path.display())]
    MasterFile {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
        /// What to do about it, if known.
        hint: &'static str,
    },
    /// The bundle could not be built.
    #[error("building the bundle of {minion_id}: {reason}")]
    Bundle {
        /// The minion.
        minion_id: String,
        /// What failed.
        reason: String,
    },
    /// The wheel call to the master failed or was refused.
    #[error("{fun} for {minion_id}: {reason}")]
    Wheel {
        /// The wheel function.
        fun: &'static str,
        /// The minion.
        minion_id: String,
        /// What the master said, or why it could not be asked.
        reason: String,
    },
}

/// What [`rekey`] did: the registry change is made even when retiring the
/// old key on the master failed (`retired` says so; retry with
/// [`retire_stale`], which the daemon's reconcile also runs).
#[derive(Debug)]
pub struct Rekeyed {
    /// The server before.
    pub old: Server,
    /// The server with its new key (status `keys-issued`).
    pub new: Server,
    /// The key directories the old key was removed from, or why not.
    pub retired: Result<Vec<&'static str>, LifecycleError>,
}

/// Issues a new pair for `server` and retires every other key the master
/// (`req`, its `pki_dir`) holds for its minion id.
pub async fn rekey<S: Store>(
    service: &Service<S>,
    req: &ReqClient,
    pki_dir: &Path,
    server: &ServerRef,
) -> Result<Rekeyed, LifecycleError> {
    let (old, new) = service.rekey_server(server).await?;
    let retired = retire_stale(req, pki_dir, &new).await;
    Ok(Rekeyed { old, new, retired })
}

/// The key directories of the master (under `pki_dir`) that hold a key for
/// `server`'s minion id other than the one issued for it (all of them that
/// hold a key, when none was issued).
pub fn stale_keys(pki_dir: &Path, server: &Server) -> Result<Vec<&'static str>, LifecycleError> {
    let mut stale = Vec::new();
    for dir in KEY_DIRS {
        if stale_key_in(pki_dir, dir, server)?.is_some() {
            stale.push(dir);
        }
    }
    Ok(stale)
}

/// The key (clean_key'd) that `<pki_dir>/<dir>/<minion id>` holds for
/// `server` when it is not the one issued for it (any key, when none was
/// issued); `None` when it is the issued one or there is none.
pub fn stale_key_in(
    pki_dir: &Path,
    dir: &str,
    server: &Server,
) -> Result<Option<String>, LifecycleError> {
    let path = pki_dir.join(dir).join(&server.minion_id);
    match std::fs::read_to_string(&path) {
        Ok(held) => {
            let held = clean_key(&held);
            let issued = server.public_key.as_deref().map(clean_key);
            Ok((issued.as_deref() != Some(held.as_str())).then_some(held))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LifecycleError::MasterFile {
            path,
            source,
            hint: "",
        }),
    }
}

/// Deletes, on the master, every key of `server`'s minion id that is not
/// the issued one ([`stale_keys`]), with one exact-id `key.delete_dict`;
/// the issued key stays wherever it is. Returns the directories cleared.
///
/// Between the look and the call the minion may present a key anew; a
/// pending key of the issued pair deleted that way comes back at the
/// minion's next attempt, so the race costs a retry, never a wrong accept.
pub async fn retire_stale(
    req: &ReqClient,
    pki_dir: &Path,
    server: &Server,
) -> Result<Vec<&'static str>, LifecycleError> {
    let stale = stale_keys(pki_dir, server)?;
    if stale.is_empty() {
        return Ok(stale);
    }
    let matches: Map<String, Json> = stale
        .iter()
        .map(|d| ((*d).to_owned(), Json::from(vec![server.minion_id.as_str()])))
        .collect();
    let fun = "key.delete_dict";
    let wheel = |reason: String| LifecycleError::Wheel {
        fun,
        minion_id: server.minion_id.clone(),
        reason,
    };
    let r = key_dict(req, fun, Json::Object(matches))
        .await
        .map_err(|e: RequestError| wheel(e.to_string()))?;
    if !r.success {
        return Err(wheel(format!("refused: {}", r.ret)));
    }
    Ok(stale)
}

/// The bundle of `server` (tar.gz bytes): its key pair from `keys`, the
/// signing key of `master`, and `masters` (this master when empty).
pub fn bundle(
    keys: &KeyIssuer,
    master: &MasterConfig,
    masters: &[String],
    server: &Server,
) -> Result<Vec<u8>, LifecycleError> {
    let pair =
        keys.private_pem(&server.minion_id)
            .map_err(|source| LifecycleError::PrivateKey {
                minion_id: server.minion_id.clone(),
                source,
            })?;
    let sign_pub = master
        .pki_dir
        .join(format!("{}.pub", master.master_sign_key_name));
    let sign_text =
        std::fs::read_to_string(&sign_pub).map_err(|source| LifecycleError::MasterFile {
            path: sign_pub.clone(),
            source,
            hint: " (create it with `salt-steward pki init`)",
        })?;
    let masters = if masters.is_empty() {
        vec![this_master(master)]
    } else {
        masters.to_vec()
    };
    tarball::build(&BundleSpec {
        minion_id: &server.minion_id,
        pair: &pair,
        master_sign_pub: &sign_text,
        masters: &masters,
        transport: &master.transport,
    })
    .map_err(|e| LifecycleError::Bundle {
        minion_id: server.minion_id.clone(),
        reason: e.to_string(),
    })
}

/// How a minion reaches this master when the config lists no `masters`.
pub fn this_master(master: &MasterConfig) -> String {
    let host = match master.interface.as_str() {
        "0.0.0.0" | "::" | "" => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "salt".to_owned()),
        other => other.to_owned(),
    };
    if master.ret_port == 4506 {
        host
    } else {
        format!("{host}:{}", master.ret_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::KeyPair;
    use crate::registry::Status;

    fn server(minion_id: &str, public_key: Option<String>) -> Server {
        Server {
            id: 1,
            name: "web01".into(),
            model: "web".into(),
            minion_id: minion_id.into(),
            key_fingerprint: None,
            status: Status::KeysIssued,
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
            public_key,
            revision: 1,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn stale_keys_are_the_master_keys_that_are_not_the_issued_one() {
        let pki = tempfile::tempdir().unwrap();
        for d in KEY_DIRS {
            std::fs::create_dir_all(pki.path().join(d)).unwrap();
        }
        let issued = KeyPair::generate(2048).unwrap();
        let old = KeyPair::generate(2048).unwrap();
        let s = server("web01-1", Some(issued.public_clean()));
        assert!(stale_keys(pki.path(), &s).unwrap().is_empty());
        // Salt's file forms: with or without the trailing newline.
        let write = |d: &str, text: String| {
            std::fs::write(pki.path().join(d).join("web01-1"), text).unwrap()
        };
        write("minions", format!("{}\n", issued.public_clean()));
        write("minions_pre", old.public_clean());
        write("minions_denied", format!("{}\n", old.public_clean()));
        assert_eq!(
            stale_keys(pki.path(), &s).unwrap(),
            ["minions_pre", "minions_denied"]
        );
        // Another minion's files are not looked at.
        std::fs::write(pki.path().join("minions_rejected/web01-10"), "x").unwrap();
        assert_eq!(stale_keys(pki.path(), &s).unwrap().len(), 2);
        // No key issued: every key held is stale.
        let none = server("web01-1", None);
        assert_eq!(
            stale_keys(pki.path(), &none).unwrap(),
            ["minions", "minions_pre", "minions_denied"]
        );
    }
}
