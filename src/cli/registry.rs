//! `salt-steward model …`, `salt-steward server …` and `salt-steward outbox …`: the registry from the
//! command line. They open the database named by `registry` in the config
//! directly, whether or not the daemon runs, and go through the same
//! [`Service`](crate::registry::Service) as the bus, so every change lands in
//! the outbox and is acted on when the daemon next reads it.

use std::io::Write as _;

use std::path::PathBuf;

use crate::lifecycle;
use crate::pki::files;
use crate::salt::ReqClient;
use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::Context;
use crate::registry::{
    self, DbStore, Server, ServerFilter, ServerModel, ServerPatch, ServerRef, Service, Status,
    Store as _,
};

/// `model` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Create a server model.
    Add {
        /// Unique model name, e.g. `web`.
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// A Salt state (SLS name) servers of this model get; repeat for several.
        #[arg(long = "state", value_name = "SLS")]
        states: Vec<String>,
        /// Print the record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the models.
    List {
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show one model.
    Show {
        /// Model name.
        name: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a model no server uses.
    Rm {
        /// Model name.
        name: String,
    },
}

/// `server` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Create a server; prints its id (the record with --json).
    Add(Box<ServerAddArgs>),
    /// List servers.
    List(ServerListArgs),
    /// Show one server.
    Show {
        /// Server id or name.
        server: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a server: KEY=VALUE… (an empty VALUE clears). Keys: name, model,
    /// status, is_vm, vm_host, external_ip, internal_ip, is_proxmox_host,
    /// proxmox_node, external_interface, nginx_proxy, samba_managed,
    /// samba_base_folder, samba_base (sets both samba keys; empty: not
    /// samba-managed), users (comma-separated); revision=N refuses the
    /// change (conflict) if the server is no longer at revision N.
    Set {
        /// Server id or name.
        server: String,
        /// Changes.
        #[arg(required = true, value_name = "KEY=VALUE")]
        changes: Vec<String>,
        /// Print the record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a server.
    Rm {
        /// Server id or name.
        server: String,
    },
    /// Write the server's key bundle (tar.gz: minion.pem, minion.pub,
    /// master_sign.pub, minion.d/steward.conf, install.sh).
    Bundle {
        /// Server id or name.
        server: String,
        /// Output file (created 0600: it holds a private key).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Issue a new key pair for a re-provisioned machine and retire the old
    /// key on the master (accepted, pending, rejected or denied).
    Rekey {
        /// Server id or name.
        server: String,
        /// Print the record as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `server add` options.
#[derive(Debug, Args)]
pub struct ServerAddArgs {
    /// Hostname (RFC 1123).
    name: String,
    /// Model name (must exist).
    #[arg(long)]
    model: String,
    /// The server is a VM.
    #[arg(long)]
    vm: bool,
    /// Id or name of the server this VM runs on (implies --vm).
    #[arg(long, value_name = "SERVER")]
    vm_host: Option<String>,
    /// Public IP address.
    #[arg(long, value_name = "IP")]
    external_ip: Option<String>,
    /// Internal IP address.
    #[arg(long, value_name = "IP")]
    internal_ip: Option<String>,
    /// The server is a Proxmox host.
    #[arg(long)]
    proxmox_host: bool,
    /// Proxmox node name.
    #[arg(long, value_name = "NODE")]
    proxmox_node: Option<String>,
    /// Interface facing the outside, e.g. `vmbr0`.
    #[arg(long, value_name = "IFACE")]
    external_interface: Option<String>,
    /// The Proxmox host's internal network (CIDR), masqueraded for its guests.
    #[arg(long, value_name = "CIDR")]
    internal_network: Option<String>,
    /// Id or name of this Proxmox host's nginx proxy server.
    #[arg(long, value_name = "SERVER")]
    nginx_proxy: Option<String>,
    /// Manage samba shares on this server (needs --samba-base-folder).
    #[arg(long)]
    samba: bool,
    /// Directory the samba shares go under.
    #[arg(long, value_name = "PATH")]
    samba_base_folder: Option<String>,
    /// Samba-managed, its shares under this absolute folder (`share add`);
    /// the same as `--set samba_base=PATH`.
    #[arg(long, value_name = "PATH")]
    samba_base: Option<String>,
    /// A system user; repeat for several.
    #[arg(long = "user", value_name = "NAME")]
    users: Vec<String>,
    /// Any other attribute as KEY=VALUE (as `server set`); repeat for several.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the record as JSON instead of the id.
    #[arg(long)]
    json: bool,
}

/// `server list` options.
#[derive(Debug, Args)]
pub struct ServerListArgs {
    /// Only servers of this model.
    #[arg(long)]
    model: Option<String>,
    /// Only servers with this status.
    #[arg(long)]
    status: Option<String>,
    /// One JSON array.
    #[arg(long)]
    json: bool,
}

/// `outbox` subcommands: where each consumer of the registry's changes is.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Each consumer: its position, the changes past it, the rows it quarantined.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// The rows consumers could not read or act on, with the reason.
    Quarantined {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an `outbox` subcommand.
pub async fn run_outbox(
    ctx: &Context,
    cmd: OutboxCommand,
) -> anyhow::Result<std::process::ExitCode> {
    let reg = open(ctx).await?;
    let store = reg.store();
    match cmd {
        OutboxCommand::Status { json } => {
            let all = store.outbox_status().await?;
            if json {
                print_json(&all)?;
            } else {
                out("consumer\tposition\tpending\tquarantined")?;
                for c in &all {
                    out(format_args!(
                        "{}\t{}\t{}\t{}",
                        c.consumer, c.position, c.pending, c.quarantined
                    ))?;
                }
            }
        }
        OutboxCommand::Quarantined { json } => {
            let all = store.outbox_quarantined().await?;
            if json {
                print_json(&all)?;
            } else {
                for q in &all {
                    out(format_args!(
                        "{}\t{}\t{}\t{}",
                        q.outbox_id, q.consumer, q.kind, q.reason
                    ))?;
                }
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

pub(super) async fn open(ctx: &Context) -> anyhow::Result<Service<DbStore>> {
    let url = &ctx.settings.registry;
    let keys = ctx.settings.key_issuer()?;
    Ok(registry::open(url)
        .await
        .with_context(|| format!("opening the registry {url}"))?
        .with_keys(keys)
        .with_share_user_prefix(&ctx.settings.shares.user_prefix))
}

pub(super) fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v).context("encoding JSON")?;
    writeln!(std::io::stdout(), "{text}").context("writing to stdout")
}

pub(super) fn out(line: impl std::fmt::Display) -> anyhow::Result<()> {
    writeln!(std::io::stdout(), "{line}").context("writing to stdout")
}

/// Runs a `model` subcommand.
pub async fn run_model(ctx: &Context, cmd: ModelCommand) -> anyhow::Result<std::process::ExitCode> {
    let reg = open(ctx).await?;
    match cmd {
        ModelCommand::Add {
            name,
            description,
            states,
            json,
        } => {
            let m = reg.create_model(&name, &description, &states).await?;
            if json {
                print_json(&m)?;
            } else {
                out(m.id)?;
            }
        }
        ModelCommand::List { json } => {
            let models = reg.list_models().await?;
            if json {
                print_json(&models)?;
            } else {
                for m in &models {
                    out(format_args!(
                        "{}\t{}\t{}",
                        m.name,
                        m.states.join(","),
                        m.description
                    ))?;
                }
            }
        }
        ModelCommand::Show { name, json } => {
            let m = reg.get_model(&name).await?;
            if json {
                print_json(&m)?;
            } else {
                show_model(&m)?;
            }
        }
        ModelCommand::Rm { name } => {
            reg.delete_model(&name).await?;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs a `server` subcommand.
pub async fn run_server(
    ctx: &Context,
    cmd: ServerCommand,
) -> anyhow::Result<std::process::ExitCode> {
    let reg = open(ctx).await?;
    match cmd {
        ServerCommand::Add(a) => {
            let json = a.json;
            let patch = add_patch(*a)?;
            let s = reg.create_server(patch).await?;
            if json {
                print_json(&s)?;
            } else {
                out(s.id)?;
            }
        }
        ServerCommand::List(a) => {
            let status = a.status.as_deref().map(str::parse::<Status>).transpose()?;
            let servers = reg
                .find_servers(&ServerFilter {
                    model: a.model,
                    status,
                    ..ServerFilter::default()
                })
                .await?;
            if a.json {
                print_json(&servers)?;
            } else {
                for s in &servers {
                    out(format_args!(
                        "{}\t{}\t{}\t{}\t{}",
                        s.id, s.name, s.model, s.status, s.minion_id
                    ))?;
                }
            }
        }
        ServerCommand::Show { server, json } => {
            let s = reg.get_server(&parse_ref(&server)).await?;
            if json {
                print_json(&s)?;
            } else {
                show_server(&s)?;
            }
        }
        ServerCommand::Set {
            server,
            changes,
            json,
        } => {
            let mut patch = ServerPatch::default();
            for c in &changes {
                patch.set_assignment(c)?;
            }
            let s = reg.update_server(&parse_ref(&server), patch).await?;
            if json {
                print_json(&s)?;
            }
        }
        ServerCommand::Rm { server } => {
            reg.delete_server(&parse_ref(&server)).await?;
        }
        ServerCommand::Bundle { server, output } => {
            let s = reg.get_server(&parse_ref(&server)).await?;
            let keys = reg.keys().ok_or(lifecycle::LifecycleError::NoIssuer)?;
            let bytes = lifecycle::bundle(keys, &ctx.master()?, &ctx.settings.masters, &s)?;
            files::create_new(&output, &bytes, 0o600)?;
            out(format_args!(
                "wrote {} for minion {} (key {})",
                output.display(),
                s.minion_id,
                s.key_fingerprint.as_deref().unwrap_or("-")
            ))?;
        }
        ServerCommand::Rekey { server, json } => {
            let master = ctx.master()?;
            let req = ReqClient::new(&master, std::time::Duration::from_secs(30))?;
            let done = lifecycle::rekey(&reg, &req, &master.pki_dir, &parse_ref(&server)).await?;
            let (old, new) = (&done.old, &done.new);
            done.retired.with_context(|| {
                format!(
                    "the registry has the new key of {} but the old one ({}) may still be on \
                     the master; run `salt-steward server rekey` again, or `salt-key -d {}`",
                    new.minion_id,
                    old.key_fingerprint.as_deref().unwrap_or("-"),
                    new.minion_id
                )
            })?;
            if json {
                print_json(new)?;
            } else {
                out(format_args!(
                    "{}: new key {} (old {} retired); write its bundle with `server bundle`",
                    new.minion_id,
                    new.key_fingerprint.as_deref().unwrap_or("-"),
                    old.key_fingerprint.as_deref().unwrap_or("-")
                ))?;
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

pub(super) fn parse_ref(s: &str) -> ServerRef {
    match s.parse::<ServerRef>() {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

fn add_patch(a: ServerAddArgs) -> Result<ServerPatch, registry::Error> {
    let mut p = ServerPatch::default();
    for kv in &a.set {
        p.set_assignment(kv)?;
    }
    p.set("name", &a.name)?;
    p.set("model", &a.model)?;
    if a.vm || a.vm_host.is_some() {
        p.set("is_vm", "true")?;
    }
    if a.proxmox_host {
        p.set("is_proxmox_host", "true")?;
    }
    if a.samba {
        p.set("samba_managed", "true")?;
    }
    let optional = [
        ("vm_host", a.vm_host),
        ("external_ip", a.external_ip),
        ("internal_ip", a.internal_ip),
        ("proxmox_node", a.proxmox_node),
        ("external_interface", a.external_interface),
        ("internal_network", a.internal_network),
        ("nginx_proxy", a.nginx_proxy),
        ("samba_base_folder", a.samba_base_folder),
        ("samba_base", a.samba_base),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            p.set(k, &v)?;
        }
    }
    if !a.users.is_empty() {
        p.users = Some(a.users);
    }
    Ok(p)
}

fn show_model(m: &ServerModel) -> anyhow::Result<()> {
    out(format_args!("id: {}", m.id))?;
    out(format_args!("name: {}", m.name))?;
    out(format_args!("description: {}", m.description))?;
    out(format_args!("states: {}", m.states.join(", ")))
}

fn show_server(s: &Server) -> anyhow::Result<()> {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let rows: [(&str, String); 21] = [
        ("id", s.id.to_string()),
        ("name", s.name.clone()),
        ("model", s.model.clone()),
        ("minion_id", s.minion_id.clone()),
        ("key_fingerprint", opt(s.key_fingerprint.clone())),
        ("status", s.status.to_string()),
        ("is_vm", s.is_vm.to_string()),
        ("vm_host", opt(s.vm_host.map(|i| i.to_string()))),
        ("external_ip", opt(s.external_ip.map(|i| i.to_string()))),
        ("internal_ip", opt(s.internal_ip.map(|i| i.to_string()))),
        ("is_proxmox_host", s.is_proxmox_host.to_string()),
        ("proxmox_node", opt(s.proxmox_node.clone())),
        ("external_interface", opt(s.external_interface.clone())),
        ("internal_network", opt(s.internal_network.clone())),
        ("nginx_proxy", opt(s.nginx_proxy.map(|i| i.to_string()))),
        ("samba_managed", s.samba_managed.to_string()),
        ("samba_base_folder", opt(s.samba_base_folder.clone())),
        ("users", s.users.join(",")),
        ("revision", s.revision.to_string()),
        ("created_at", s.created_at.to_string()),
        ("updated_at", s.updated_at.to_string()),
    ];
    for (k, v) in rows {
        out(format_args!("{k}: {v}"))?;
    }
    Ok(())
}
