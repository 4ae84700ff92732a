//! Registry throughput through the service layer: N servers created one at a
//! time (each create is one transaction with its outbox row, as in
//! production), then N lookups by minion id in random order.
//!
//! Usage: `cargo run --release --example registry_bench -- [N] [URL]`
//!
//! N defaults to 10000; URL defaults to a new SQLite file in a temp
//! directory (a PostgreSQL URL must name an empty database). Prints one JSON
//! line: backend, servers, seconds, creates/s, lookup p50/p99/max in µs.
//! Not part of CI. The target on SQLite: ≥ 5,000 creates/s, p99 < 1 ms.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use salt_steward::registry::{self, ServerPatch, Store as _};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let url = match args.next() {
        Some(u) if u != "-" => u,
        _ => format!("sqlite://{}", dir.path().join("bench.db").display()),
    };
    let callers: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1)
        .max(1);
    let svc = registry::open(&url).await?;
    svc.create_model("web", "benchmark", &["nginx".to_owned()])
        .await?;

    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..callers {
        let svc = svc.clone();
        tasks.spawn(async move {
            let mut minions = Vec::with_capacity(n / callers + 1);
            for i in (c..n).step_by(callers) {
                let mut p = ServerPatch::default();
                p.set("name", &format!("web{i:06}.bench.example.org"))?;
                p.set("model", "web")?;
                p.set(
                    "internal_ip",
                    &format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255),
                )?;
                minions.push(svc.create_server(p).await?.minion_id);
            }
            anyhow::Ok(minions)
        });
    }
    let mut minions = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        minions.extend(done??);
    }
    let create = start.elapsed();

    // A fixed shuffle (xorshift), so runs compare.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..minions.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        minions.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(n);
    for m in &minions {
        let t = Instant::now();
        let s = svc.server_by_minion_id(m).await?;
        lat.push(t.elapsed());
        anyhow::ensure!(s.is_some(), "minion {m} not found");
    }
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    // Every change is still in the outbox for a consumer that starts now.
    svc.store().outbox_subscribe("bench").await?;
    let outbox_rows = svc.store().outbox_pending("bench", i64::MAX).await?.len();
    println!(
        "{}",
        serde_json::json!({
            "backend": svc.store().backend(),
            "servers": n,
            "concurrent_callers": callers,
            "create_seconds": create.as_secs_f64(),
            "creates_per_s": n as f64 / create.as_secs_f64(),
            "outbox_rows": outbox_rows,
            "lookup_p50_us": pct(0.50),
            "lookup_p99_us": pct(0.99),
            "lookup_max_us": pct(1.0),
        })
    );
    Ok(())
}
