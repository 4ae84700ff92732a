//! `salt-steward backup add|list|show|rm|run`: backups from the command
//! line, through the same `registry::Service` as the bus; `run` applies
//! `steward.backup.run` on the backup server through the CLI's own Salt
//! client (as `exec` does), waits for the result and records it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Subcommand;
use serde_json::{json, Map, Value as Json};

use super::registry::{open, out, parse_ref, print_json};
use super::salt::connect;
use super::Context;
use crate::registry::backup::{report_of, Backup, BackupResult, Health, RUN_REPORT};
use crate::registry::service::BackupSpec;
use crate::registry::store::{now_ms, BackupStore as _};
use crate::registry::{DbStore, Service};
use crate::salt::{Publish, TargetType};

/// Results shown by `backup show`.
const SHOWN_RESULTS: i64 = 20;

/// `backup` subcommands.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up SOURCE's SOURCE_FOLDER into DEST's DEST_FOLDER; prints the new id.
    Add {
        /// The server backed up (id or name).
        source: String,
        /// Its folder (absolute).
        source_folder: String,
        /// The backup server (id or name).
        dest: String,
        /// The snapshot root there (absolute, dedicated to this backup).
        dest_folder: String,
        /// An rsync pattern relative to SOURCE_FOLDER (repeatable).
        #[arg(long = "exclude", value_name = "PATH")]
        excludes: Vec<String>,
        /// Also exclude /proc and /sys (for a SOURCE_FOLDER of /).
        #[arg(long)]
        exclude_proc_sys: bool,
        /// The address the backup server reaches SOURCE at (default: its IP).
        #[arg(long, value_name = "H")]
        ssh_host: Option<String>,
        /// SSH port on SOURCE (default 22).
        #[arg(long, value_name = "N")]
        ssh_port: Option<i64>,
        /// Print the record as JSON instead of the id.
        #[arg(long)]
        json: bool,
    },
    /// Every backup, green or red.
    List {
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// One backup and its results.
    Show {
        /// Its id.
        id: i64,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a backup (its snapshots stay on the backup server).
    Rm {
        /// Its id.
        id: i64,
    },
    /// Run a backup now on its backup server and wait for the result; exit
    /// 1 unless it is ok or warning.
    Run {
        /// Its id.
        id: i64,
        /// The level (default: the lowest, a real copy).
        #[arg(long)]
        level: Option<String>,
        /// Seconds to wait for the result (default: dispatch.job_timeout).
        #[arg(long)]
        timeout: Option<u64>,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `backup` subcommand.
pub async fn run(ctx: &Context, cmd: BackupCommand) -> anyhow::Result<ExitCode> {
    let reg = open(ctx).await?;
    let stale_ms = ctx.settings.backups.stale_after_ms();
    match cmd {
        BackupCommand::Add {
            source,
            source_folder,
            dest,
            dest_folder,
            excludes,
            exclude_proc_sys,
            ssh_host,
            ssh_port,
            json,
        } => {
            let b = reg
                .create_backup(BackupSpec {
                    source: parse_ref(&source),
                    source_folder,
                    dest: parse_ref(&dest),
                    dest_folder,
                    excludes,
                    exclude_proc_sys,
                    active: None,
                    retain: None,
                    ssh_host,
                    ssh_port,
                    ssh_user: None,
                })
                .await?;
            if json {
                print_json(&b)?;
            } else {
                out(b.id)?;
            }
        }
        BackupCommand::List { json } => {
            let rows = reg.backups_with_health(stale_ms).await?;
            if json {
                let all: Vec<Json> = rows
                    .iter()
                    .map(|(b, h, last)| row_json(b, *h, last.as_ref()))
                    .collect();
                print_json(&all)?;
            } else {
                out("id\tsource\tsource_folder\tdest\tdest_folder\thealth\tlast\tfiles\tsize")?;
                for (b, h, last) in &rows {
                    out(format_args!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        b.id,
                        b.source,
                        b.source_folder,
                        b.dest,
                        b.dest_folder,
                        paint(*h),
                        last.as_ref()
                            .map_or("-".to_owned(), |r| r.outcome.to_string()),
                        last.as_ref()
                            .and_then(|r| r.files)
                            .map_or("-".to_owned(), |n| n.to_string()),
                        last.as_ref()
                            .and_then(|r| r.size)
                            .map_or("-".to_owned(), |n| n.to_string()),
                    ))?;
                }
            }
        }
        BackupCommand::Show { id, json } => {
            let b = reg.get_backup(id).await?;
            let results = reg.backup_results(id, SHOWN_RESULTS).await?;
            let now = now_ms();
            let health = Health::of(&results, now, stale_ms, b.running(now));
            if json {
                let mut v = serde_json::to_value(&b)?;
                if let Json::Object(m) = &mut v {
                    m.insert("health".into(), json!(health));
                    m.insert("results".into(), serde_json::to_value(&results)?);
                }
                print_json(&v)?;
            } else {
                out(format_args!("{b}: {}", paint(health)))?;
                out(format_args!(
                    "ssh {}@{}:{}, excludes {:?}{}, {}",
                    b.ssh_user,
                    b.host().unwrap_or_else(|| "?".into()),
                    b.ssh_port,
                    b.excludes,
                    if b.exclude_proc_sys {
                        " + /proc /sys"
                    } else {
                        ""
                    },
                    if b.active { "active" } else { "inactive" }
                ))?;
                out(format_args!(
                    "keys: backup server {}, source host keys {}",
                    if b.dest_pubkey.is_some() {
                        "known"
                    } else {
                        "not known yet"
                    },
                    b.source_host_keys.len()
                ))?;
                out("")?;
                out("started\tlevel\toutcome\tduration_ms\tfiles\tsize\ttransferred\terror")?;
                for r in &results {
                    out(format_args!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        r.started_at,
                        r.level,
                        r.outcome,
                        r.duration_ms,
                        opt(r.files),
                        opt(r.size),
                        opt(r.transferred),
                        r.error.lines().next().unwrap_or("")
                    ))?;
                }
            }
        }
        BackupCommand::Rm { id } => {
            let b = reg.delete_backup(id).await?;
            out(format_args!("removed {b}"))?;
        }
        BackupCommand::Run {
            id,
            level,
            timeout,
            json,
        } => return run_now(ctx, &reg, id, level, timeout, json).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// `backup run`: `state.apply steward.backup.run` on the backup server's
/// minion, its report's result recorded (idempotent: the event the
/// wrapper sends carries the same run id).
async fn run_now(
    ctx: &Context,
    reg: &Service<DbStore>,
    id: i64,
    level: Option<String>,
    timeout: Option<u64>,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    let b = reg.get_backup(id).await?;
    let timeout = Duration::from_secs(timeout.unwrap_or(ctx.settings.dispatch.job_timeout).max(1));
    let mut run = Map::new();
    run.insert("target".into(), json!(b.dest_minion_id));
    run.insert("id".into(), json!(b.id));
    if let Some(l) = &level {
        run.insert("level".into(), json!(l));
    }
    let mut kwarg = Map::new();
    kwarg.insert("pillar".into(), json!({"steward": {"backup_run": run}}));
    kwarg.insert("queue".into(), Json::Bool(true));
    let publish = Publish {
        target: b.dest_minion_id.clone(),
        tgt_type: TargetType::List,
        fun: "state.apply".into(),
        arg: vec![json!("steward.backup.run")],
        kwarg,
        correlation: Some(format!("backup/{}/run", b.id)),
    };
    let master = ctx.master()?;
    let (client, cancel) = connect(ctx, &master, timeout).await?;
    // Shown as running until it ends (or its timeout, if this process dies).
    let until = now_ms().saturating_add(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX));
    reg.store().set_backup_running(b.id, Some(until)).await?;
    let job = client.run_job(&publish, timeout).await;
    cancel.cancel();
    if let Err(e) = reg.store().set_backup_running(b.id, None).await {
        eprintln!("salt-steward: warning: {e}");
    }
    let (published, outcome) =
        job.with_context(|| format!("running {b} on {} ({})", b.dest, b.dest_minion_id))?;
    if !published.minions.iter().any(|m| m == &b.dest_minion_id) {
        bail!(
            "{b}: the master targeted no minion {} (is its key accepted?)",
            b.dest_minion_id
        );
    }
    let Some(ret) = outcome.returns.get(&b.dest_minion_id) else {
        bail!(
            "{b}: no confirmed answer from {} within {} s",
            b.dest_minion_id,
            timeout.as_secs()
        );
    };
    let Some(report) = report_of(&ret.ret, RUN_REPORT) else {
        bail!(
            "{b}: steward.backup.run on {} gave no result: {}",
            b.dest_minion_id,
            failure_text(&ret.ret)
        );
    };
    let result = report
        .get("result")
        .ok_or_else(|| anyhow::anyhow!("{b}: the run's report has no result"))
        .and_then(|r| BackupResult::from_wrapper(r).map_err(|e| anyhow::anyhow!("{b}: {e}")))?;
    let new = reg.record_backup_result(&b, &result).await?;
    let event_sent = report
        .get("event_sent")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    if json_out {
        print_json(&json!({"result": result, "recorded": new, "event_sent": event_sent}))?;
    } else {
        out(format_args!(
            "{b} {}: {} ({} files, {} bytes, {} transferred, {} ms){}",
            result.level,
            result.outcome,
            opt(result.files),
            opt(result.size),
            opt(result.transferred),
            result.duration_ms,
            if result.error.is_empty() {
                String::new()
            } else {
                format!(": {}", result.error)
            }
        ))?;
    }
    Ok(if result.outcome.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A backup as `list --json` and `status --json` show it.
pub(super) fn row_json(b: &Backup, h: Health, last: Option<&BackupResult>) -> Json {
    json!({
        "id": b.id,
        "source": b.source,
        "source_folder": b.source_folder,
        "dest": b.dest,
        "dest_folder": b.dest_folder,
        "health": h,
        "last": last,
    })
}

/// Green and red in a terminal.
pub(super) fn paint(h: Health) -> String {
    use std::io::IsTerminal as _;
    if !std::io::stdout().is_terminal() {
        return h.to_string();
    }
    let code = match h {
        Health::Green => "32",
        Health::Red => "31",
        Health::Running => "36",
        Health::NeverRun => "33",
    };
    format!("\x1b[{code}m{h}\x1b[0m")
}

fn opt(n: Option<i64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// The comments of the failed states of a state return, or the return.
fn failure_text(ret: &Json) -> String {
    match ret.as_object() {
        Some(states) => states
            .values()
            .filter_map(|v| v.get("comment").and_then(Json::as_str))
            .collect::<Vec<_>>()
            .join("; "),
        None => ret.to_string(),
    }
}
