//! The backup part of the inventory dispatcher (issue #13): the targets a
//! backup change names, the pillars of `steward.backup` (on the backup
//! server) and `steward.backup_source` (on the source), and what the
//! dispatcher learns from their reports.
//!
//! A new backup converges without anyone's help: its creation bumps both
//! targets; the backup server's run reports its SSH public key (stored,
//! and when it changed every source it pulls from is bumped); the source's
//! run reports its host keys (stored, and when they changed every backup
//! server pulling from it is bumped). A `steward.backup` report also
//! carries the last result of each backup: one whose event was lost is
//! recorded then.

use serde_json::{json, Value as Json};
use tracing::{info, warn};

use crate::registry::backup::{
    report_of, Backup, BackupResult, Retain, BACKUP_REPORT, SOURCE_REPORT,
};
use crate::registry::store::{BackupFilter, BackupStore as _};
use crate::registry::{DbStore, DispatchTarget, Error, OutboxEntry, Service, StateKind};

/// The targets a `backup.*` outbox entry names (`targets`: `[[server id,
/// state], …]`); `Err` for a payload that does not say.
pub fn entry_targets(entry: &OutboxEntry) -> Result<Vec<(i64, StateKind)>, String> {
    let kind = entry.kind.as_str();
    let list = entry
        .payload
        .get("targets")
        .and_then(Json::as_array)
        .ok_or_else(|| format!("{kind} entry without a targets list"))?;
    let mut out = Vec::with_capacity(list.len());
    for t in list {
        let pair = t
            .as_array()
            .filter(|p| p.len() == 2)
            .ok_or_else(|| format!("{kind} entry: target {t} is not [server id, state]"))?;
        let id = pair[0]
            .as_i64()
            .ok_or_else(|| format!("{kind} entry: target {t} has no server id"))?;
        let state = pair[1]
            .as_str()
            .and_then(|s| s.parse::<StateKind>().ok())
            .ok_or_else(|| format!("{kind} entry: target {t} names no state"))?;
        out.push((id, state));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The pillar body of a backup target (`salt-states/README.md`);
/// `Ok(Err(why))` when the registry holds something the state cannot be
/// given.
pub async fn render(
    service: &Service<DbStore>,
    t: &DispatchTarget,
    default_retain: &[Retain],
) -> Result<Result<Json, String>, Error> {
    let store = service.store();
    match t.state {
        StateKind::Backup => {
            let mut backups = Vec::new();
            let all = store
                .backups(BackupFilter {
                    dest_id: Some(t.server_id),
                    source_id: None,
                })
                .await?;
            for b in &all {
                let Some(host) = b.host() else {
                    return Ok(Err(format!(
                        "{b}: the source {} has no IPv4 address and the backup no ssh_host",
                        b.source
                    )));
                };
                backups.push(json!({
                    "id": b.id,
                    "source": {"host": host, "port": b.ssh_port, "user": b.ssh_user},
                    "source_folder": b.source_folder,
                    "dest_folder": b.dest_folder,
                    "excludes": b.excludes,
                    "exclude_proc_sys": b.exclude_proc_sys,
                    "active": b.active,
                    "known_hosts": b.source_host_keys,
                    "retain": b.retain.as_deref().unwrap_or(default_retain),
                }));
            }
            Ok(Ok(json!({"target": t.minion_id, "backups": backups})))
        }
        StateKind::BackupSource => {
            let all = store
                .backups(BackupFilter {
                    dest_id: None,
                    source_id: Some(t.server_id),
                })
                .await?;
            let authorized: Vec<Json> = all
                .iter()
                .map(|b| {
                    json!({
                        "id": b.id,
                        "folder": b.source_folder,
                        "pubkey": b.dest_pubkey.as_deref().unwrap_or(""),
                    })
                })
                .collect();
            Ok(Ok(json!({"target": t.minion_id, "authorized": authorized})))
        }
        StateKind::Portfwd | StateKind::Hostfwd | StateKind::Share => {
            Ok(Err(format!("{} is not a backup state", t.state.as_str())))
        }
    }
}

/// What a run of a backup target reported (`ret`: the minion's state
/// return, failed or not): the backup server's public key and the results
/// not recorded yet, or the source's host keys. Failures are logged; the
/// run's own outcome is judged elsewhere.
pub async fn learn(service: &Service<DbStore>, t: &DispatchTarget, ret: &Json) {
    let done = match t.state {
        StateKind::Backup => learn_backup(service, t, ret).await,
        StateKind::BackupSource => learn_source(service, t, ret).await,
        StateKind::Portfwd | StateKind::Hostfwd | StateKind::Share => Ok(()),
    };
    if let Err(error) = done {
        warn!(message = "Recording what a backup state reported failed; the next run reports it again.", server = %t.server, state = %t.state, minion_id = %t.minion_id, %error);
    }
}

async fn learn_backup(
    service: &Service<DbStore>,
    t: &DispatchTarget,
    ret: &Json,
) -> Result<(), Error> {
    let Some(report) = report_of(ret, BACKUP_REPORT) else {
        warn!(message = "steward.backup returned no report line.", server = %t.server, minion_id = %t.minion_id);
        return Ok(());
    };
    let store = service.store();
    if let Some(key) = report
        .get("pubkey")
        .and_then(Json::as_str)
        .map(str::trim)
        .filter(|k| valid_key_line(k))
    {
        if store.set_backup_pubkey(t.server_id, key).await? {
            info!(message = "Backup server's SSH key learnt; its sources are due.", server = %t.server);
        }
    }
    let results = report
        .get("results")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default();
    for r in results.iter().take(10_000) {
        let result = match BackupResult::from_wrapper(r) {
            Ok(x) => x,
            Err(why) => {
                warn!(message = "A result in steward.backup's report is unreadable; skipped.", server = %t.server, %why);
                continue;
            }
        };
        record_for_dest(service, t.server_id, &result, &t.server).await?;
    }
    Ok(())
}

/// Records `result` when its backup is pulled by server `dest_id` (a
/// result naming another server's backup is refused, logged).
pub async fn record_for_dest(
    service: &Service<DbStore>,
    dest_id: i64,
    result: &BackupResult,
    dest: &str,
) -> Result<bool, Error> {
    let Some(backup): Option<Backup> = service.store().backup(result.backup_id).await? else {
        warn!(message = "A result names a backup that does not exist (any more); not recorded.", server = %dest, backup_id = result.backup_id, run_id = %result.run_id);
        return Ok(false);
    };
    if backup.dest_id != dest_id {
        warn!(message = "A result names a backup another server pulls; refused.", server = %dest, backup_id = result.backup_id, run_id = %result.run_id);
        return Ok(false);
    }
    let new = service.record_backup_result(&backup, result).await?;
    if new {
        info!(message = "Backup result recorded.", backup_id = backup.id, run_id = %result.run_id, outcome = %result.outcome, level = %result.level);
    }
    Ok(new)
}

async fn learn_source(
    service: &Service<DbStore>,
    t: &DispatchTarget,
    ret: &Json,
) -> Result<(), Error> {
    let Some(report) = report_of(ret, SOURCE_REPORT) else {
        warn!(message = "steward.backup_source returned no report line.", server = %t.server, minion_id = %t.minion_id);
        return Ok(());
    };
    let Some(list) = report.get("host_keys").and_then(Json::as_array) else {
        return Ok(());
    };
    let mut keys: Vec<String> = list
        .iter()
        .filter_map(Json::as_str)
        .map(str::trim)
        .filter(|k| valid_key_line(k))
        .map(str::to_owned)
        .take(64)
        .collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return Ok(());
    }
    if service
        .store()
        .set_ssh_host_keys(t.server_id, &keys)
        .await?
    {
        info!(message = "Source's SSH host keys learnt; its backup servers are due.", server = %t.server, keys = keys.len());
    }
    Ok(())
}

/// An OpenSSH public key line as the states report them: `type base64
/// [comment]`, one line, printable.
fn valid_key_line(k: &str) -> bool {
    let mut parts = k.split_whitespace();
    let ty = parts.next().unwrap_or("");
    let blob = parts.next().unwrap_or("");
    k.len() <= 16_384
        && !k.contains(['\n', '\r'])
        && (ty.starts_with("ssh-") || ty.starts_with("ecdsa-") || ty.starts_with("sk-"))
        && !blob.is_empty()
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lines() {
        assert!(valid_key_line("ssh-ed25519 AAAAC3Nza+/= steward@b"));
        assert!(!valid_key_line("ssh-ed25519"));
        assert!(!valid_key_line("rm -rf /"));
        assert!(!valid_key_line("ssh-ed25519 AA;A"));
    }
}
