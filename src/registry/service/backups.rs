//! Backups: the service's operations (CLI and bus alike). Each validates
//! and names the problem first (the rules the states enforce, so a bad
//! backup is refused before anything is written or dispatched); the
//! database's unique destination still holds when writers race.

use super::Service;
use crate::registry::backup::{
    nested, validate_excludes, validate_folder, validate_retain, validate_ssh_host,
    validate_ssh_user, Backup, BackupResult, Health, Retain, WithHealth, DEFAULT_SSH_PORT,
    DEFAULT_SSH_USER,
};
use crate::registry::inventory::validate_port;
use crate::registry::store::{now_ms, BackupFilter, NewBackup};
use crate::registry::{Error, ServerRef, Store};

/// How many of a backup's newest results its health is judged from: enough
/// to find the last success behind a few failures.
const HEALTH_RESULTS: i64 = 20;

/// What `backup add` asks for (the optional parts `None` for their defaults).
#[derive(Debug, Clone)]
pub struct BackupSpec {
    /// The server backed up.
    pub source: ServerRef,
    /// Its folder (absolute).
    pub source_folder: String,
    /// The backup server.
    pub dest: ServerRef,
    /// The snapshot root there (absolute, dedicated).
    pub dest_folder: String,
    /// rsync patterns relative to the source folder.
    pub excludes: Vec<String>,
    /// Also /proc and /sys.
    pub exclude_proc_sys: bool,
    /// Scheduled (default true).
    pub active: Option<bool>,
    /// Levels (default: the configured ones).
    pub retain: Option<Vec<Retain>>,
    /// SSH address of the source (default: its IP).
    pub ssh_host: Option<String>,
    /// SSH port (default 22).
    pub ssh_port: Option<i64>,
    /// SSH user (default root).
    pub ssh_user: Option<String>,
}

impl<S: Store> Service<S> {
    /// Adds a backup of `spec.source`'s folder into `spec.dest`'s folder.
    /// Refused: a folder not absolute, with `..` or other characters; a
    /// destination folder equal to, inside or around another backup's on
    /// that server; a second backup of the same source by the same backup
    /// server (its one SSH key carries one forced folder on the source); a
    /// source without an address when no SSH host is given.
    pub async fn create_backup(&self, spec: BackupSpec) -> Result<Backup, Error> {
        let source_folder = validate_folder("source_folder", &spec.source_folder)?;
        let dest_folder = validate_folder("dest_folder", &spec.dest_folder)?;
        if dest_folder == "/" {
            return Err(Error::invalid(
                "dest_folder",
                "/ cannot be a backup destination",
            ));
        }
        let excludes = validate_excludes(&spec.excludes)?;
        if let Some(r) = &spec.retain {
            validate_retain(r)?;
        }
        let ssh_host = spec
            .ssh_host
            .as_deref()
            .map(validate_ssh_host)
            .transpose()?;
        let ssh_port = validate_port("ssh_port", spec.ssh_port.unwrap_or(DEFAULT_SSH_PORT.into()))?;
        let ssh_user = validate_ssh_user(spec.ssh_user.as_deref().unwrap_or(DEFAULT_SSH_USER))?;
        let source = self.get_server(&spec.source).await?;
        let dest = self.get_server(&spec.dest).await?;
        if ssh_host.is_none()
            && !source
                .internal_ip
                .iter()
                .chain(source.external_ip.iter())
                .any(|ip| ip.is_ipv4())
        {
            return Err(Error::invalid(
                "ssh_host",
                format!(
                    "{} has no IPv4 address to reach it at: give --ssh-host or \
                     server set {} internal_ip=…",
                    source.name, source.name
                ),
            ));
        }
        let taken = self
            .store
            .backups(BackupFilter {
                dest_id: Some(dest.id),
                source_id: None,
            })
            .await?;
        if let Some(b) = taken.iter().find(|b| nested(&b.dest_folder, &dest_folder)) {
            return Err(Error::DuplicateBackup {
                what: format!("destination {dest_folder} on {}", dest.name),
                by: if b.dest_folder == dest_folder {
                    b.to_string()
                } else {
                    format!("{b} (one destination inside the other)")
                },
            });
        }
        // The backup server has one SSH key, and sshd applies the first
        // authorized_keys line of a key: a second folder of this source
        // granted to it would be pulled through the first one's forced
        // command. One backup per (source, backup server).
        if let Some(b) = taken.iter().find(|b| b.source_id == source.id) {
            return Err(Error::DuplicateBackup {
                what: format!("a second backup of {} by {}", source.name, dest.name),
                by: format!(
                    "{b} (one backup per source and backup server: its single SSH key can be \
                     restricted to one folder on the source; back up a common parent folder, \
                     with excludes, instead)"
                ),
            });
        }
        self.store
            .insert_backup(&NewBackup {
                source_id: source.id,
                source_folder,
                dest_id: dest.id,
                dest_folder,
                excludes,
                exclude_proc_sys: spec.exclude_proc_sys,
                active: spec.active.unwrap_or(true),
                retain: spec.retain,
                ssh_host,
                ssh_port,
                ssh_user,
            })
            .await
    }

    /// Backups, of one backup server or all.
    pub async fn list_backups(&self, dest: Option<&ServerRef>) -> Result<Vec<Backup>, Error> {
        let dest_id = match dest {
            Some(d) => Some(self.get_server(d).await?.id),
            None => None,
        };
        self.store
            .backups(BackupFilter {
                dest_id,
                source_id: None,
            })
            .await
    }

    /// One backup.
    pub async fn get_backup(&self, id: i64) -> Result<Backup, Error> {
        self.store.backup(id).await?.ok_or_else(|| Error::NotFound {
            kind: "backup",
            key: format!("#{id}"),
        })
    }

    /// Removes a backup (its results go with it; its snapshots stay on the
    /// backup server).
    pub async fn delete_backup(&self, id: i64) -> Result<Backup, Error> {
        self.store.delete_backup(id).await
    }

    /// Records a result reported for `backup` (by the dispatcher from a
    /// state's report, or from a proven event): refused when it names
    /// another backup; `true` when it was new (a run is recorded once).
    pub async fn record_backup_result(
        &self,
        backup: &Backup,
        result: &BackupResult,
    ) -> Result<bool, Error> {
        if result.backup_id != backup.id {
            return Err(Error::invalid(
                "backup_id",
                format!(
                    "the result of run {} names backup #{}, not #{}",
                    result.run_id, result.backup_id, backup.id
                ),
            ));
        }
        self.store.insert_backup_result(result).await
    }

    /// Every backup with its health (as `backup list`, `status` and the
    /// metrics show it) and its last result; `stale_after_ms`:
    /// `backups.stale_after_hours`.
    pub async fn backups_with_health(&self, stale_after_ms: i64) -> Result<Vec<WithHealth>, Error> {
        let now = now_ms();
        let mut rows = Vec::new();
        for b in self.list_backups(None).await? {
            // The newest results: enough to find the last success behind a
            // few failures.
            let results = self.backup_results(b.id, HEALTH_RESULTS).await?;
            let health = Health::of(&results, now, stale_after_ms, b.running(now));
            rows.push((b, health, results.into_iter().next()));
        }
        Ok(rows)
    }

    /// A backup's results, newest first.
    pub async fn backup_results(&self, id: i64, limit: i64) -> Result<Vec<BackupResult>, Error> {
        self.store.backup_results(id, limit).await
    }
}
