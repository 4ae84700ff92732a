//! `salt-steward events watch|fire`: the event bus from the command line.

use std::io::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::bus::event::{from_json, Event};
use crate::bus::subscriber::{BusHandle, BusItem, BusStats, SubscriberOptions};
use crate::bus::EventFirer;

/// `events` subcommands.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print events from the master's bus, one per line.
    Watch(WatchArgs),
    /// Fire an event into the master's bus.
    Fire(FireArgs),
}

/// `events watch` options.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only events whose tag matches this glob (`*` also matches `/`, as Salt's fnmatch).
    #[arg(long, value_name = "GLOB")]
    tag: Option<String>,
    /// One JSON object per line: {"tag": …, "data": …}.
    #[arg(long)]
    json: bool,
    /// Exit after this many matching events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Exit when no matching event came for this many seconds.
    #[arg(long, value_name = "SECS")]
    idle_timeout: Option<f64>,
    /// Print nothing per event (use with --stats).
    #[arg(long)]
    quiet: bool,
    /// At exit, print a JSON summary to stderr: events received, time from
    /// first to last, rate, and events lost or undecodable.
    #[arg(long)]
    stats: bool,
}

/// `events fire` arguments.
#[derive(Debug, Args)]
pub struct FireArgs {
    /// The event tag, e.g. `myapp/deploy`.
    tag: String,
    /// The event data as JSON (default `{}`).
    #[arg(value_parser = parse_json)]
    data: Option<Json>,
}

fn parse_json(s: &str) -> Result<Json, String> {
    serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))
}

pub(crate) async fn run(
    ctx: &Context,
    cmd: EventsCommand,
) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        EventsCommand::Watch(args) => watch(ctx, args).await,
        EventsCommand::Fire(args) => fire(ctx, args).await,
    }
}

async fn fire(ctx: &Context, args: FireArgs) -> anyhow::Result<std::process::ExitCode> {
    let master = ctx.master()?;
    let data = from_json(&args.data.unwrap_or_else(|| serde_json::json!({})));
    let mut firer = EventFirer::new(master.event_pull(), master.event_pub());
    firer
        .fire(&args.tag, data)
        .await
        .with_context(|| format!("firing {}", args.tag))?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn watch(ctx: &Context, args: WatchArgs) -> anyhow::Result<std::process::ExitCode> {
    let master = ctx.master()?;
    let filter = match &args.tag {
        Some(glob) => Some(
            globset::Glob::new(glob)
                .with_context(|| format!("--tag {glob:?} is not a valid glob"))?
                .compile_matcher(),
        ),
        None => None,
    };
    let idle = args
        .idle_timeout
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .with_context(|| format!("--idle-timeout {s} is not a duration"))
        })
        .transpose()?;
    let opts = SubscriberOptions {
        queue_capacity: ctx.settings.bus.queue_capacity,
        max_frame: ctx.settings.bus.max_event_size,
        ..SubscriberOptions::default()
    };
    let mut bus = BusHandle::new(master.event_pub(), opts);
    let mut sub = bus.subscribe();
    let cancel = CancellationToken::new();
    bus.spawn(cancel.clone());

    // The idle clock restarts only on a matching event.
    let mut idle_deadline = idle.map(crate::clock::deadline_in);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut received: u64 = 0;
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    let shutdown = super::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let next = async {
            match idle_deadline {
                Some(at) => tokio::time::timeout_at(at, sub.recv()).await.ok(),
                None => Some(sub.recv().await),
            }
        };
        let item = tokio::select! {
            _ = &mut shutdown => break,
            item = next => item,
        };
        let Some(item) = item else {
            break; // idle timeout
        };
        match item {
            Some(BusItem::Event(event)) => {
                if filter.as_ref().is_some_and(|f| !f.is_match(&event.tag)) {
                    continue;
                }
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                received += 1;
                idle_deadline = idle.map(crate::clock::deadline_in);
                if !args.quiet {
                    print_event(&mut out, &event, args.json).context("writing to stdout")?;
                }
                if args.count.is_some_and(|n| received >= n) {
                    break;
                }
            }
            Some(BusItem::Lagged(n)) => {
                eprintln!("salt-steward: {n} events dropped (reader fell behind)")
            }
            Some(BusItem::Connected { .. } | BusItem::Disconnected { .. }) => {}
            None => break,
        }
    }
    out.flush().context("writing to stdout")?;
    cancel.cancel();
    let stats = bus.stats().clone();
    bus.join().await;
    if args.stats {
        let secs = match (first, last) {
            (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
            _ => 0.0,
        };
        let summary = serde_json::json!({
            "subscriber": "salt-steward",
            "received": received,
            "seconds": (secs * 1000.0).round() / 1000.0,
            "rate_per_s": if secs > 0.0 { (received as f64 / secs).round() as u64 } else { 0 },
            "lagged": BusStats::get(&stats.lagged),
            "decode_errors": BusStats::get(&stats.decode_errors),
            "bytes_discarded": BusStats::get(&stats.bytes_discarded),
            "connects": stats.connects.load(Ordering::Relaxed),
        });
        eprintln!("{summary}");
    }
    if BusStats::get(&stats.connects) == 0 {
        // Tell "never connected" apart from "no event came".
        anyhow::bail!("master event bus {} not reachable", master.event_pub());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_event(out: &mut impl std::io::Write, event: &Event, json: bool) -> std::io::Result<()> {
    let data = event.data_json();
    if json {
        let line = serde_json::json!({ "tag": event.tag, "data": data });
        writeln!(out, "{line}")?;
    } else {
        let stamp = data
            .get("_stamp")
            .and_then(Json::as_str)
            .unwrap_or("-")
            .to_owned();
        let mut shown = data;
        if let Json::Object(m) = &mut shown {
            m.remove("_stamp");
        }
        writeln!(out, "{stamp} {} {}", event.tag, abbreviate(shown))?;
    }
    // One line at a time: whoever reads the pipe sees events as they come.
    out.flush()
}

/// Shortens long strings (keys, job output) so one event stays one readable line.
fn abbreviate(v: Json) -> Json {
    match v {
        Json::String(s) if s.chars().count() > 80 => {
            let head: String = s.chars().take(60).collect();
            Json::String(format!("{head}…({} chars)", s.chars().count()))
        }
        Json::Array(a) => Json::Array(a.into_iter().map(abbreviate).collect()),
        Json::Object(m) => Json::Object(m.into_iter().map(|(k, v)| (k, abbreviate(v))).collect()),
        other => other,
    }
}
