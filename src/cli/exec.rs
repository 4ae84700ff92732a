//! `salt-steward exec SERVER FUN [ARG…]` and `salt-steward exec-log`: exec
//! translation from the command line (`crate::exec`), and its record.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use serde_json::{Map, Value as Json};

use super::registry::{open, out, parse_ref, print_json};
use super::salt::connect;
use super::Context;
use crate::config::Settings;
use crate::exec::{self, ExecPolicy, ExecRequest, Requester};
use crate::salt::parse_value;

/// `exec` arguments.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The server, by id or name (not a minion id).
    server: String,
    /// Execution function, e.g. `test.ping`, `cmd.run`.
    fun: String,
    /// Positional arguments, as the salt CLI passes them.
    args: Vec<String>,
    /// Keyword argument `k=v` (value parsed as JSON when it is JSON); repeatable.
    #[arg(long = "kwarg", value_name = "K=V")]
    kwargs: Vec<String>,
    /// Seconds to wait for the return (default: `exec.timeout`).
    #[arg(long)]
    timeout: Option<u64>,
    /// Print one JSON document instead of the return.
    #[arg(long)]
    json: bool,
}

/// `exec-log` arguments.
#[derive(Debug, Args)]
pub struct ExecLogArgs {
    /// Only this server's requests.
    #[arg(long)]
    server: Option<String>,
    /// How many, newest first.
    #[arg(long, default_value_t = 50)]
    limit: i64,
    /// As JSON.
    #[arg(long)]
    json: bool,
}

/// The allow-list the `exec:` settings describe.
pub(crate) fn policy(settings: &Settings) -> anyhow::Result<ExecPolicy> {
    ExecPolicy::new(&settings.exec.master, &settings.exec.minions).map_err(anyhow::Error::msg)
}

/// Runs `exec`: exit 0 when the minion reported success, 1 otherwise (a
/// refusal prints its code and reason).
pub async fn run_exec(ctx: &Context, a: ExecArgs) -> anyhow::Result<ExitCode> {
    let mut kwarg = Map::new();
    for kv in &a.kwargs {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--kwarg {kv:?} is not K=V");
        };
        kwarg.insert(k.to_owned(), parse_value(v));
    }
    let timeout = Duration::from_secs(a.timeout.unwrap_or(ctx.settings.exec.timeout).max(1));
    let req = ExecRequest {
        server: parse_ref(&a.server),
        fun: a.fun.clone(),
        arg: a.args.iter().map(|s| Json::String(s.clone())).collect(),
        kwarg,
        timeout,
    };
    let policy = policy(&ctx.settings)?;
    let service = open(ctx).await?;
    let master = ctx.master()?;
    let (client, cancel) = connect(ctx, &master, timeout).await?;
    let result = exec::exec(&service, &client, &policy, &Requester::Cli, &req).await;
    cancel.cancel();
    match result {
        Ok(reply) => {
            if a.json {
                print_json(&reply)?;
            } else {
                match &reply.ret {
                    Json::String(s) => out(s)?,
                    other => out(serde_json::to_string_pretty(other)?)?,
                }
            }
            Ok(if reply.success {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Err(e) => {
            if a.json {
                print_json(
                    &serde_json::json!({"ok": false, "error": {"code": e.code(), "message": e.to_string()}}),
                )?;
            }
            bail!("{} ({})", e, e.code())
        }
    }
}

/// Runs `exec-log`.
pub async fn run_exec_log(ctx: &Context, a: ExecLogArgs) -> anyhow::Result<ExitCode> {
    let service = open(ctx).await?;
    let server = a.server.as_deref().map(parse_ref);
    let records = exec::history(&service, server.as_ref(), None, a.limit.clamp(1, 10_000)).await?;
    if a.json {
        print_json(&records)?;
        return Ok(ExitCode::SUCCESS);
    }
    out("id\twhen\tby\tserver\tfun\tjid\toutcome\terror")?;
    for r in &records {
        out(format_args!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            r.id,
            r.created_at,
            r.requested_by,
            r.server,
            r.fun,
            r.jid.as_deref().unwrap_or("-"),
            r.outcome,
            r.error_code.as_deref().unwrap_or("")
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}
