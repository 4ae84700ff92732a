//! Backups on the bus (`steward/v1/backup/<op>`): a request's arguments
//! read into the registry's backup operations (`registry::Service::
//! create_backup` …); parsing, trust and replies are [`super::bus`]'s, as
//! for servers. And the wrapper's results (`steward/v1/backup/result`),
//! recorded only when they provably come from the backup server's own
//! minion ([`result`]).
//!
//! | op | arguments |
//! | --- | --- |
//! | create | `source`\|`source_id`, `source_folder`, `dest`\|`dest_id`, `dest_folder`, optional `excludes` (list), `exclude_proc_sys`, `active` (booleans), `retain` (`[{level, count, cron}]`), `ssh_host`, `ssh_port`, `ssh_user` |
//! | find | `id` (→ a list of that one), or optional `dest`\|`dest_id` |
//! | delete | `id` |
//!
//! Results: the record (create, delete: as it was) or a list (find).

use serde_json::{json, Value as Json};
use tracing::{info, warn};

use super::args::{encode, Args};
use super::bus::{error_reply, Op, Request};
use crate::bus::Origin;
use crate::registry::backup::{BackupResult, Retain};
use crate::registry::service::BackupSpec;
use crate::registry::{Error, Service, Store};

const ID: &[&str] = &["id"];
const SOURCE: &[&str] = &["source", "source_id"];
const DEST: &[&str] = &["dest", "dest_id"];

/// Serves a backup request (not `result`: see [`result`]).
pub async fn backup<S: Store>(service: &Service<S>, op: Op, args: Args<'_>) -> Result<Json, Error> {
    match op {
        Op::Create => {
            args.only(
                &[
                    SOURCE,
                    DEST,
                    &[
                        "source_folder",
                        "dest_folder",
                        "excludes",
                        "exclude_proc_sys",
                        "active",
                        "retain",
                        "ssh_host",
                        "ssh_port",
                        "ssh_user",
                    ],
                ]
                .concat(),
            )?;
            let spec = BackupSpec {
                source: args.server(SOURCE)?,
                source_folder: args.text("source_folder")?,
                dest: args.server(DEST)?,
                dest_folder: args.text("dest_folder")?,
                excludes: typed(args, "excludes")?.unwrap_or_default(),
                exclude_proc_sys: typed(args, "exclude_proc_sys")?.unwrap_or(false),
                active: typed(args, "active")?,
                retain: typed::<Vec<Retain>>(args, "retain")?,
                ssh_host: args.opt_text("ssh_host")?,
                ssh_port: args.opt_int(&["ssh_port"])?,
                ssh_user: args.opt_text("ssh_user")?,
            };
            encode(&service.create_backup(spec).await?)
        }
        Op::Find => {
            args.only(&[ID, DEST].concat())?;
            match args.opt_int(ID)? {
                Some(id) => encode(&vec![service.get_backup(id).await?]),
                None => encode(
                    &service
                        .list_backups(args.opt_server(DEST)?.as_ref())
                        .await?,
                ),
            }
        }
        Op::Delete => {
            args.only(ID)?;
            encode(&service.delete_backup(args.int(ID)?).await?)
        }
        Op::Update => Err(Error::invalid(
            "op",
            "a backup is not updated: delete it and create it anew (its snapshots stay)",
        )),
        Op::Exec | Op::Passwd | Op::Result => Err(super::bus::not_here("backup")),
    }
}

/// The value under `key` as `T` (`None` when absent or null).
fn typed<T: serde::de::DeserializeOwned>(args: Args<'_>, key: &str) -> Result<Option<T>, Error> {
    match args.0.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| Error::invalid(key, e.to_string())),
    }
}

/// Records a backup result whose receipt the job cache confirmed: the
/// minion that sent it (the wrapped event's id, proved by its `event.send`
/// job) must be the backup's backup server. The reply data (never fired:
/// counted by its code, refusals logged with their reason).
pub async fn result<S: Store>(service: &Service<S>, req: &Request) -> Json {
    let Origin::Minion(minion) = &req.origin else {
        return refused(
            req,
            "unverified_sender",
            "a result must be a minion's event",
        );
    };
    let mut data = req.args.clone();
    data.remove("request_id");
    let parsed = match BackupResult::from_wrapper(&Json::Object(data)) {
        Ok(r) => r,
        Err(why) => return refused(req, "invalid_value", &format!("from {minion}: {why}")),
    };
    let backup = match service.get_backup(parsed.backup_id).await {
        Ok(b) => b,
        Err(e) => return refused(req, e.code(), &format!("from {minion}: {e}")),
    };
    if &backup.dest_minion_id != minion {
        return refused(
            req,
            "wrong_minion",
            &format!(
                "{minion} sent a result of {backup}, whose backup server is {} ({})",
                backup.dest, backup.dest_minion_id
            ),
        );
    }
    match service.record_backup_result(&backup, &parsed).await {
        Ok(new) => {
            info!(message = "Backup result received.", backup_id = backup.id, run_id = %parsed.run_id, outcome = %parsed.outcome, minion_id = %minion, new);
            json!({"ok": true, "result": {"recorded": new}})
        }
        Err(e) => refused(req, e.code(), &format!("from {minion}: {e}")),
    }
}

fn refused(req: &Request, code: &str, why: &str) -> Json {
    warn!(message = "Backup result refused.", tag = %req.tag, origin = req.origin.as_str(), minion_id = ?req.origin.minion(), code, reason = %why);
    error_reply(code, why)
}
