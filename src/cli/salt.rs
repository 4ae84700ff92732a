//! `salt-steward salt publish|wheel|runner`: the master driven natively.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use clap::{Args, Subcommand};
use serde_json::{Map, Value as Json};
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::bus::subscriber::{BusHandle, SubscriberOptions};
use crate::salt::{
    parse_value, split_cli_args, wheel, JobOutcome, JobTracker, Publish, ReqClient, SaltClient,
    StateSummary, TargetType,
};

/// `salt` subcommands.
#[derive(Debug, Subcommand)]
pub enum SaltCommand {
    /// Publish a job to minions and print their returns.
    Publish(PublishArgs),
    /// Call a wheel function (key management …) on the master.
    Wheel(CallArgs),
    /// Call a runner function on the master and print its result.
    Runner(CallArgs),
}

/// `salt publish` arguments.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Target expression, e.g. `'*'`, `web*`, `m1,m2` with --tgt-type list.
    target: String,
    /// Execution function, e.g. `test.ping`, `state.apply`.
    fun: String,
    /// Positional arguments, passed as the salt CLI passes them (`k=v` works too).
    args: Vec<String>,
    /// How the target is matched.
    #[arg(long, default_value = "glob",
          value_parser = PossibleValuesParser::new(TargetType::NAMES).try_map(|s| s.parse::<TargetType>()))]
    tgt_type: TargetType,
    /// Keyword argument `k=v` (value parsed as JSON when it is JSON); repeatable.
    #[arg(long = "kwarg", value_name = "K=V")]
    kwargs: Vec<String>,
    /// Pillar data for the job, as JSON (e.g. for state.apply).
    #[arg(long, value_name = "JSON", value_parser = parse_json_object)]
    pillar: Option<Map<String, Json>>,
    /// Seconds to wait for the master and for every minion's return.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Print one JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// `salt wheel|runner` arguments.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// Function, e.g. `key.list_all`, `jobs.lookup_jid`.
    fun: String,
    /// Arguments: `k=v` is a keyword argument, anything else positional.
    args: Vec<String>,
    /// Seconds to wait for the master (and for a runner's result).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
}

fn parse_json_object(s: &str) -> Result<Map<String, Json>, String> {
    match serde_json::from_str(s) {
        Ok(Json::Object(m)) => Ok(m),
        Ok(_) => Err("must be a JSON object".to_owned()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("--timeout {s} is not a duration"))
}

pub(crate) async fn run(ctx: &Context, cmd: SaltCommand) -> anyhow::Result<ExitCode> {
    let master = ctx.master()?;
    match cmd {
        SaltCommand::Wheel(a) => {
            let req = ReqClient::new(&master, secs(a.timeout)?)?;
            let (arg, kwarg) = split_cli_args(&a.args);
            let result = wheel(&req, &a.fun, arg, kwarg)
                .await
                .with_context(|| format!("wheel {}", a.fun))?;
            println!("{}", serde_json::to_string_pretty(&result.ret)?);
            Ok(if result.success {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        SaltCommand::Runner(a) => {
            let timeout = secs(a.timeout)?;
            let (client, cancel) = connect(ctx, &master, timeout).await?;
            let (arg, kwarg) = split_cli_args(&a.args);
            let result = client
                .runner(&a.fun, arg, kwarg, timeout)
                .await
                .with_context(|| format!("runner {}", a.fun))?;
            cancel.cancel();
            println!("{}", serde_json::to_string_pretty(&result.ret)?);
            Ok(if result.success {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        SaltCommand::Publish(a) => publish(ctx, &master, a).await,
    }
}

/// A client whose tracker is subscribed to the bus and connected.
pub(super) async fn connect(
    ctx: &Context,
    master: &crate::master_config::MasterConfig,
    timeout: Duration,
) -> anyhow::Result<(SaltClient, CancellationToken)> {
    let opts = SubscriberOptions {
        queue_capacity: ctx.settings.bus.queue_capacity,
        max_frame: ctx.settings.bus.max_event_size,
        ..SubscriberOptions::default()
    };
    let mut bus = BusHandle::new(master.event_pub(), opts);
    let cancel = CancellationToken::new();
    let tracker = JobTracker::start(bus.subscribe(), cancel.clone());
    bus.spawn(cancel.clone());
    if !tracker.wait_connected(timeout).await {
        cancel.cancel();
        bail!(
            "salt-master event bus {} not reachable within {timeout:?}",
            master.event_pub()
        );
    }
    Ok((
        SaltClient::new(ReqClient::new(master, timeout)?, tracker),
        cancel,
    ))
}

async fn publish(
    ctx: &Context,
    master: &crate::master_config::MasterConfig,
    a: PublishArgs,
) -> anyhow::Result<ExitCode> {
    let timeout = secs(a.timeout)?;
    let mut kwarg = Map::new();
    for kv in &a.kwargs {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--kwarg {kv:?} is not K=V");
        };
        kwarg.insert(k.to_owned(), parse_value(v));
    }
    if let Some(p) = a.pillar {
        kwarg.insert("pillar".to_owned(), Json::Object(p));
    }
    let job = Publish {
        target: a.target.clone(),
        tgt_type: a.tgt_type,
        fun: a.fun.clone(),
        arg: a.args.iter().map(|s| Json::String(s.clone())).collect(),
        kwarg,
        correlation: Some(format!("cli-{}", std::process::id())),
    };
    let (client, cancel) = connect(ctx, master, timeout).await?;
    let (published, outcome) = client
        .run_job(&job, timeout)
        .await
        .with_context(|| format!("publishing {} to {:?}", a.fun, a.target))?;
    cancel.cancel();
    if published.minions.is_empty() {
        bail!(
            "no minion matched target {:?} ({})",
            a.target,
            a.tgt_type.as_str()
        );
    }
    let is_state = a.fun.starts_with("state.");
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json_report(&published.missing, &outcome, is_state))?
        );
    } else {
        print_report(&outcome, is_state);
    }
    Ok(if outcome.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn json_report(missing: &[String], o: &JobOutcome, is_state: bool) -> Json {
    let minions: Map<String, Json> = o
        .returns
        .iter()
        .map(|(id, r)| {
            let mut v =
                serde_json::json!({"success": r.success, "retcode": r.retcode, "return": r.ret, "correlation": r.correlation});
            if is_state {
                v["summary"] = serde_json::to_value(StateSummary::of(&r.ret)).unwrap_or(Json::Null);
            }
            (id.clone(), v)
        })
        .collect();
    serde_json::json!({"jid": o.jid, "minions": minions, "no_answer": o.no_answer,
        "unconfirmed": o.unconfirmed, "missing": missing})
}

fn print_report(o: &JobOutcome, is_state: bool) {
    for (id, r) in &o.returns {
        if is_state {
            let s = StateSummary::of(&r.ret);
            println!(
                "{id}: {} succeeded ({} changed), {} failed{}",
                s.succeeded,
                s.changed,
                s.failed,
                if r.success { "" } else { " [FAILED]" }
            );
            for (state, comment) in &s.failures {
                let state = if state.is_empty() { "(render)" } else { state };
                println!("    FAILED {state}: {comment}");
            }
        } else {
            let shown = match &r.ret {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{id}: {shown}{}", if r.success { "" } else { " [FAILED]" });
        }
    }
    for id in &o.no_answer {
        if o.unconfirmed.contains(id) {
            println!("{id}: did not answer (a return event came, but the master's job cache does not hold it)");
        } else {
            println!("{id}: did not answer");
        }
    }
    let failed = o.returns.values().filter(|r| !r.success).count();
    println!(
        "-- jid {}: {} answered, {} failed, {} did not answer",
        o.jid,
        o.returns.len(),
        failed,
        o.no_answer.len()
    );
}
