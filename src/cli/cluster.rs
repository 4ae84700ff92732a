//! `salt-steward cluster status`: the daemons sharing this registry (alive
//! or dead by their heartbeats, on the database's clock), the chore leases
//! and who holds them, and how many minions were last seen on each master
//! (issue #16).

use std::process::ExitCode;

use serde_json::json;

use super::registry::{open, out, print_json};
use super::Context;
use crate::registry::store::ClusterStore as _;

/// Prints the cluster's state; exit 1 when a known daemon is dead.
pub async fn run_status(ctx: &Context, json: bool) -> anyhow::Result<ExitCode> {
    let reg = open(ctx).await?;
    let store = reg.store();
    let (daemons, now) = store.daemons().await?;
    let (leases, _) = store.leases().await?;
    let presence = store.presence_by_master().await?;
    let dead_after_ms = ctx.settings.cluster.dead_after_ms();
    let dead = daemons
        .iter()
        .filter(|d| !d.alive(now, dead_after_ms))
        .count();
    if json {
        print_json(&json!({
            "now": now,
            "daemons": daemons.iter().map(|d| {
                let mut v = json!(d);
                v["alive"] = json!(d.alive(now, dead_after_ms));
                v
            }).collect::<Vec<_>>(),
            "leases": leases.iter().map(|l| {
                let mut v = json!(l);
                v["held"] = json!(l.expires_at > now);
                v
            }).collect::<Vec<_>>(),
            "minions_by_master": presence.iter().map(|(m, n)| json!({"master": m, "minions": n})).collect::<Vec<_>>(),
        }))?;
    } else {
        out("daemon\tmaster\tversion\tstate\tlast heartbeat")?;
        for d in &daemons {
            let state = if d.alive(now, dead_after_ms) {
                "alive"
            } else {
                "DEAD"
            };
            out(format_args!(
                "{}\t{}\t{}\t{state}\t{:.1} s ago",
                d.id,
                d.master,
                d.version,
                now.saturating_sub(d.heartbeat_at) as f64 / 1000.0
            ))?;
        }
        for l in &leases {
            if l.expires_at > now {
                out(format_args!(
                    "lease {}: {} (epoch {}), {:.1} s left",
                    l.name,
                    l.holder,
                    l.epoch,
                    l.expires_at.saturating_sub(now) as f64 / 1000.0
                ))?;
            } else {
                out(format_args!(
                    "lease {}: free (last {}, epoch {})",
                    l.name, l.holder, l.epoch
                ))?;
            }
        }
        for (m, n) in &presence {
            out(format_args!("master {m}: {n} minion(s) last seen there"))?;
        }
    }
    Ok(if dead == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
