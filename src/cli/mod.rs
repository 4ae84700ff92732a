//! The command line: argument parsing, settings, exit codes (0 ok, 2 usage,
//! 1 anything else, with a one-line message). One file per command family.

mod backup;
mod cluster;
mod doctor;
mod events;
mod exec;
mod forward;
mod pki;
mod registry;
mod rules;
mod salt;
mod share;
mod users;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::master_config::MasterConfig;

/// Command-line interface of salt-steward.
#[derive(Debug, Parser)]
#[command(
    name = "salt-steward",
    version,
    about = "Server management beside a salt-master"
)]
pub struct Cli {
    /// The salt-steward config file (YAML).
    #[arg(long, global = true, value_name = "PATH", env = "SALT_STEWARD_CONFIG")]
    config: Option<PathBuf>,
    /// The salt-master config, overriding `master_config` from the config file.
    #[arg(long, global = true, value_name = "PATH")]
    master_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch and fire events on the master's event bus.
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// Run the daemon: the registry service on the bus, notifications of changes.
    Daemon,
    /// Drive the salt-master: publish jobs, call wheel and runner functions.
    #[command(subcommand)]
    Salt(salt::SaltCommand),
    /// Server models in the registry: add, list, show, rm.
    #[command(subcommand)]
    Model(registry::ModelCommand),
    /// Servers in the registry: add, list, show, set, rm.
    #[command(subcommand)]
    Server(registry::ServerCommand),
    /// The registry's outbox: where each consumer of its changes is, what it quarantined.
    #[command(subcommand)]
    Outbox(registry::OutboxCommand),
    /// Port and hostname forwards in the inventory: add, list, rm.
    #[command(subcommand)]
    Forward(forward::ForwardCommand),
    /// Samba shares of samba-managed servers: add, list, rm, passwd.
    #[command(subcommand)]
    Share(share::ShareCommand),
    /// Backups (a backup server pulls a source's folder): add, list, show, rm, run.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Users of the HTTP API: add, passwd, disable, list.
    #[command(subcommand)]
    User(users::UserCommand),
    /// API tokens of the HTTP API: add (printed once), list, rm.
    #[command(subcommand)]
    Token(users::TokenCommand),
    /// What the dispatcher applies: targets, runs, retry.
    #[command(subcommand)]
    Dispatch(forward::DispatchCommand),
    /// What needs attention: pending, running, failed and waiting targets.
    Status(forward::StatusArgs),
    /// Run an execution function on a server named in the registry (its minion, if Salt-managed).
    Exec(exec::ExecArgs),
    /// The record of exec requests: who asked, server, function, jid, outcome.
    ExecLog(exec::ExecLogArgs),
    /// Check the installation: config, master, bus, root key, request server, registry, rules, states, file modes.
    Doctor,
    /// The daemons sharing the registry (several masters): status.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Reactor rules: check files, test which rules an event triggers.
    #[command(subcommand)]
    Rules(rules::RulesCommand),
    /// The master's keys and its signed public key: init, verify, export/import the signing pair.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
}

/// `cluster …`.
#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Each daemon alive or dead (heartbeats), the chore leases, minions by
    /// master; exit 1 when a daemon is dead.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Loaded once per invocation and handed to the command.
pub(crate) struct Context {
    pub settings: Settings,
}

impl Context {
    fn load(cli: &Cli) -> anyhow::Result<Self> {
        let mut settings = Settings::load(cli.config.as_deref())?;
        if let Some(p) = &cli.master_config {
            settings.master_config = p.clone();
        }
        Ok(Self { settings })
    }

    /// The salt-master config the settings point at.
    pub fn master(&self) -> anyhow::Result<MasterConfig> {
        Ok(MasterConfig::load(Path::new(&self.settings.master_config))?)
    }
}

/// Parses arguments, runs the command, maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print and exit 0; usage errors exit 2.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("salt-steward: error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ctx = match Context::load(&cli) {
        Ok(ctx) => ctx,
        Err(e) if matches!(cli.command, Command::Doctor) => return Ok(doctor::config_failed(&e)),
        Err(e) => return Err(e),
    };
    crate::telemetry::init(&ctx.settings.log.level, ctx.settings.log.format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        match cli.command {
            Command::Events(cmd) => events::run(&ctx, cmd).await,
            Command::Salt(cmd) => salt::run(&ctx, cmd).await,
            Command::Daemon => {
                let master = ctx.master()?;
                crate::daemon::run(&ctx.settings, &master, cli.master_config.clone()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Model(cmd) => registry::run_model(&ctx, cmd).await,
            Command::Server(cmd) => registry::run_server(&ctx, cmd).await,
            Command::Outbox(cmd) => registry::run_outbox(&ctx, cmd).await,
            Command::Forward(cmd) => forward::run_forward(&ctx, cmd).await,
            Command::Share(cmd) => share::run_share(&ctx, cmd).await,
            Command::Backup(cmd) => backup::run(&ctx, cmd).await,
            Command::User(cmd) => users::run_user(&ctx, cmd).await,
            Command::Token(cmd) => users::run_token(&ctx, cmd).await,
            Command::Dispatch(cmd) => forward::run_dispatch(&ctx, cmd).await,
            Command::Status(args) => forward::run_status(&ctx, args).await,
            Command::Exec(args) => exec::run_exec(&ctx, args).await,
            Command::ExecLog(args) => exec::run_exec_log(&ctx, args).await,
            Command::Doctor => doctor::run(&ctx).await,
            Command::Cluster(ClusterCommand::Status { json }) => {
                cluster::run_status(&ctx, json).await
            }
            Command::Rules(cmd) => rules::run(&ctx, cmd).await,
            Command::Pki(cmd) => pki::run(&ctx, cmd),
        }
    })
}

/// The error chain on one line, joined with `: `.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string().replace('\n', " ");
        // thiserror messages often already embed their source.
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
