//! `salt-steward forward port|hostname …`, `salt-steward dispatch …` and
//! `salt-steward status`: the inventory and what the dispatcher made of it,
//! from the command line, through the same `registry::Service` as the bus.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::registry::{open, out, parse_ref, print_json};
use super::Context;
use crate::registry::store::DispatchStore as _;
use crate::registry::Store as _;
use crate::registry::{DispatchStatus, DispatchTarget, Proto, StateKind};

/// `forward` subcommands.
#[derive(Debug, Subcommand)]
pub enum ForwardCommand {
    /// Port forwards (NAT on a Proxmox host to one of its guests).
    #[command(subcommand)]
    Port(PortCommand),
    /// Hostname forwards (a domain on the nginx proxy of a guest's host).
    #[command(subcommand)]
    Hostname(HostnameCommand),
}

/// `forward port` subcommands.
#[derive(Debug, Subcommand)]
pub enum PortCommand {
    /// Forward HOST's PORT to DEST's TO_PORT; prints the new id.
    Add {
        /// The Proxmox host (id or name).
        host: String,
        /// The guest (id or name).
        dest: String,
        /// tcp or udp.
        #[arg(long)]
        proto: String,
        /// The port on the host.
        #[arg(long)]
        port: i64,
        /// The port on the guest.
        #[arg(long)]
        to_port: i64,
        /// Print the record as JSON instead of the id.
        #[arg(long)]
        json: bool,
    },
    /// Port forwards, of one host or all.
    List {
        /// Only this host's.
        #[arg(long, value_name = "SERVER")]
        host: Option<String>,
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove a port forward.
    Rm {
        /// Its id.
        id: i64,
    },
}

/// `forward hostname` subcommands.
#[derive(Debug, Subcommand)]
pub enum HostnameCommand {
    /// Serve DOMAIN on DEST's host's nginx proxy, proxied to DEST; prints the new id.
    Add {
        /// The domain (lower-cased).
        domain: String,
        /// The guest (id or name).
        dest: String,
        /// The port nginx listens on.
        #[arg(long, default_value_t = 80)]
        port: i64,
        /// The port on the guest (default: the listen port).
        #[arg(long)]
        to_port: Option<i64>,
        /// The path prefix proxied.
        #[arg(long, default_value = "/")]
        path: String,
        /// Print the record as JSON instead of the id.
        #[arg(long)]
        json: bool,
    },
    /// Hostname forwards.
    List {
        /// Only this proxy's.
        #[arg(long, value_name = "SERVER")]
        proxy: Option<String>,
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove a hostname forward.
    Rm {
        /// Its id.
        id: i64,
    },
}

/// Runs a `forward` subcommand.
pub async fn run_forward(ctx: &Context, cmd: ForwardCommand) -> anyhow::Result<ExitCode> {
    let reg = open(ctx).await?;
    match cmd {
        ForwardCommand::Port(PortCommand::Add {
            host,
            dest,
            proto,
            port,
            to_port,
            json,
        }) => {
            let proto: Proto = proto.parse()?;
            let f = reg
                .create_port_forward(&parse_ref(&host), &parse_ref(&dest), proto, port, to_port)
                .await?;
            if json {
                print_json(&f)?;
            } else {
                out(f.id)?;
            }
        }
        ForwardCommand::Port(PortCommand::List { host, json }) => {
            let all = reg
                .list_port_forwards(host.as_deref().map(parse_ref).as_ref())
                .await?;
            if json {
                print_json(&all)?;
            } else {
                out("id\thost\tproto\tport\tdest\tdest_ip\tto_port")?;
                for f in &all {
                    let ip = f.dest_ip.map(|i| i.to_string()).unwrap_or_default();
                    out(format_args!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        f.id, f.host, f.proto, f.source_port, f.dest, ip, f.dest_port
                    ))?;
                }
            }
        }
        ForwardCommand::Port(PortCommand::Rm { id }) => {
            let f = reg.delete_port_forward(id).await?;
            out(format_args!("removed {f}"))?;
        }
        ForwardCommand::Hostname(HostnameCommand::Add {
            domain,
            dest,
            port,
            to_port,
            path,
            json,
        }) => {
            let f = reg
                .create_hostname_forward(
                    &domain,
                    &parse_ref(&dest),
                    Some(port),
                    to_port,
                    Some(&path),
                )
                .await?;
            if json {
                print_json(&f)?;
            } else {
                out(f.id)?;
            }
        }
        ForwardCommand::Hostname(HostnameCommand::List { proxy, json }) => {
            let all = reg
                .list_hostname_forwards(proxy.as_deref().map(parse_ref).as_ref())
                .await?;
            if json {
                print_json(&all)?;
            } else {
                out("id\tdomain\tport\tpath\tproxy\tdest\tdest_ip\tto_port")?;
                for f in &all {
                    let ip = f.dest_ip.map(|i| i.to_string()).unwrap_or_default();
                    out(format_args!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        f.id, f.domain, f.listen_port, f.path, f.proxy, f.dest, ip, f.dest_port
                    ))?;
                }
            }
        }
        ForwardCommand::Hostname(HostnameCommand::Rm { id }) => {
            let f = reg.delete_hostname_forward(id).await?;
            out(format_args!("removed {f}"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dispatch` subcommands.
#[derive(Debug, Subcommand)]
pub enum DispatchCommand {
    /// Every target (server, state): status, revisions, attempts, last result.
    List {
        /// Only targets with this status (pending, running, done, failed, waiting).
        #[arg(long)]
        status: Option<String>,
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// One server's targets and its last runs.
    Show {
        /// The server (id or name).
        server: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a server's targets (one state or all) again now, even unchanged.
    Retry {
        /// The server (id or name).
        server: String,
        /// Only this state (portfwd, hostfwd, share, backup, backup_source).
        #[arg(long)]
        state: Option<String>,
    },
}

/// `status` options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// As JSON.
    #[arg(long)]
    json: bool,
}

/// Runs a `dispatch` subcommand.
pub async fn run_dispatch(ctx: &Context, cmd: DispatchCommand) -> anyhow::Result<ExitCode> {
    let reg = open(ctx).await?;
    let store = reg.store();
    match cmd {
        DispatchCommand::List { status, json } => {
            let status = status
                .as_deref()
                .map(str::parse::<DispatchStatus>)
                .transpose()?;
            let all = store.dispatch_targets(status).await?;
            if json {
                print_json(&all)?;
            } else {
                print_targets(&all)?;
            }
        }
        DispatchCommand::Show { server, json } => {
            let s = reg.get_server(&parse_ref(&server)).await?;
            let targets = store.dispatch_targets_of(s.id).await?;
            let runs = store.dispatch_runs(s.id, 20).await?;
            if json {
                print_json(&serde_json::json!({"targets": targets, "runs": runs}))?;
            } else {
                print_targets(&targets)?;
                out("")?;
                out("run\tstate\trevision\tjid\toutcome\terror")?;
                for r in &runs {
                    out(format_args!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        r.id,
                        r.state,
                        r.revision,
                        r.jid,
                        r.outcome.as_deref().unwrap_or("running"),
                        r.error.as_deref().unwrap_or("")
                    ))?;
                }
            }
        }
        DispatchCommand::Retry { server, state } => {
            let s = reg.get_server(&parse_ref(&server)).await?;
            let state = state.as_deref().map(str::parse::<StateKind>).transpose()?;
            let n = store.dispatch_retry(s.id, state).await?;
            out(format_args!("{n} target(s) of {} due now", s.name))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `status`: the targets that need attention (pending, running,
/// failed, waiting) with their reasons; exit 1 when one failed.
pub async fn run_status(ctx: &Context, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let reg = open(ctx).await?;
    let store = reg.store();
    let all = store.dispatch_targets(None).await?;
    let open_items: Vec<&DispatchTarget> = all
        .iter()
        .filter(|t| t.status != DispatchStatus::Done)
        .collect();
    let failed = all.iter().any(|t| t.status == DispatchStatus::Failed);
    let outbox = store.outbox_status().await?;
    let backups = reg
        .backups_with_health(ctx.settings.backups.stale_after_ms())
        .await?;
    if args.json {
        let backups: Vec<serde_json::Value> = backups
            .iter()
            .map(|(b, h, last)| super::backup::row_json(b, *h, last.as_ref()))
            .collect();
        print_json(&serde_json::json!({
            "targets": all.len(),
            "attention": open_items,
            "outbox": outbox,
            "backups": backups,
        }))?;
    } else {
        let done = all.len() - open_items.len();
        out(format_args!(
            "dispatch: {} target(s), {done} done, {} need attention",
            all.len(),
            open_items.len()
        ))?;
        let owned: Vec<DispatchTarget> = open_items.into_iter().cloned().collect();
        if !owned.is_empty() {
            print_targets(&owned)?;
        }
        for (b, h, _) in &backups {
            out(format_args!(
                "backup #{} {}:{} → {}:{}\t{}",
                b.id,
                b.source,
                b.source_folder,
                b.dest,
                b.dest_folder,
                super::backup::paint(*h)
            ))?;
        }
        for c in &outbox {
            if c.pending > 0 || c.quarantined > 0 {
                out(format_args!(
                    "outbox: {} has {} change(s) to read, {} quarantined",
                    c.consumer, c.pending, c.quarantined
                ))?;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_targets(all: &[DispatchTarget]) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let colour = std::io::stdout().is_terminal();
    // Several daemons on one registry record where minions are: then each
    // row says through which master its target goes.
    let located = all.iter().any(|t| t.location.is_some());
    out(format_args!(
        "server\tstate\tstatus\tdesired\tapplied\tattempts\tjid\t{}reason",
        if located { "master\t" } else { "" }
    ))?;
    for t in all {
        let master = match (&t.location, located) {
            (Some(m), _) => format!("{m}\t"),
            (None, true) => "location unknown\t".to_owned(),
            (None, false) => String::new(),
        };
        let status = if colour {
            let code = match t.status {
                DispatchStatus::Done => "32",
                DispatchStatus::Failed => "31",
                DispatchStatus::Running => "36",
                DispatchStatus::Pending | DispatchStatus::Waiting => "33",
            };
            format!("\x1b[{code}m{}\x1b[0m", t.status)
        } else {
            t.status.to_string()
        };
        // A tool's message may span lines (nginx -t): its first line in the
        // row, the rest indented under it, so the table stays one row a target.
        let mut reason = t
            .last_error
            .as_deref()
            .unwrap_or("")
            .lines()
            .filter(|l| !l.trim().is_empty());
        out(format_args!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{master}{}",
            t.server,
            t.state,
            status,
            t.desired,
            t.applied,
            t.attempts,
            t.last_jid.as_deref().unwrap_or(""),
            reason.next().unwrap_or("")
        ))?;
        for line in reason {
            out(format_args!("    {}", line.trim_end()))?;
        }
    }
    Ok(())
}
