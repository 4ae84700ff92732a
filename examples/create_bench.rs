//! Server creation latency with per-server key issuing: N servers created one
//! at a time through `registry::open(url).with_keys(issuer)` →
//! `create_server`, each timed on its own (registry transaction, outbox row,
//! claiming a pooled key pair by rename and parsing it, or generating one on
//! the spot when the pool is empty).
//!
//! Usage: `cargo run --release --example create_bench -- [OPTIONS]`
//!
//! - `--n N` servers (default 1000);
//! - `--registry URL` (default: a new SQLite file in a temp directory);
//! - `--keys-dir DIR` (default: a temp directory) — the issuer's `keys.dir`;
//! - `--pool-from DIR`: before timing, copies up to N `*.pem` files (PKCS#1
//!   private keys, e.g. the `openssl genrsa -traditional` keys cached by
//!   `scripts/bench-accept`) into the pool `<keys-dir>/pool/<bits>/`.
//!   Without it the pool starts empty unless `<keys-dir>` already has one;
//! - `--bits B` (default 2048), `--model M` (default `bench`, created if
//!   missing), `--prefix P` (host names `P00001…`, default `bench`);
//! - `--ids-out FILE`: writes the created servers' minion ids, one a line.
//!
//! Prints one JSON line: servers, pool sizes before/after, total seconds,
//! creation p50/p99/max/mean in ms. Not part of CI. Issue #5's target:
//! p99 < 20 ms with the pool warm.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use salt_steward::pki::KeyIssuer;
use salt_steward::registry::{self, ServerPatch};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    n: usize,
    #[arg(long)]
    registry: Option<String>,
    #[arg(long)]
    keys_dir: Option<PathBuf>,
    #[arg(long)]
    pool_from: Option<PathBuf>,
    #[arg(long, default_value_t = 2048)]
    bits: usize,
    #[arg(long, default_value = "bench")]
    model: String,
    #[arg(long, default_value = "bench")]
    prefix: String,
    #[arg(long)]
    ids_out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let tmp = tempfile::tempdir().context("creating a temp dir")?;
    let url = a
        .registry
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", tmp.path().join("bench.db").display()));
    let keys_dir = a
        .keys_dir
        .clone()
        .unwrap_or_else(|| tmp.path().join("keys"));
    let issuer = KeyIssuer::new(&keys_dir, a.bits)?;
    if let Some(src) = &a.pool_from {
        let mut pems: Vec<PathBuf> = std::fs::read_dir(src)
            .with_context(|| format!("reading {}", src.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "pem"))
            .collect();
        pems.sort();
        for (i, p) in pems.iter().take(a.n).enumerate() {
            let to = issuer.pool_dir().join(format!("bench{i:05}.pem"));
            std::fs::copy(p, &to).with_context(|| format!("copying {}", p.display()))?;
        }
    }
    let pool_before = issuer.pool_len();
    let svc = registry::open(&url).await?.with_keys(issuer.clone());
    if svc.get_model(&a.model).await.is_err() {
        svc.create_model(&a.model, "benchmark", &[]).await?;
    }

    let mut ids = Vec::with_capacity(a.n);
    let mut lat: Vec<Duration> = Vec::with_capacity(a.n);
    let start = Instant::now();
    for i in 0..a.n {
        let mut p = ServerPatch::default();
        p.set("name", &format!("{}{i:05}", a.prefix))?;
        p.set("model", &a.model)?;
        let t = Instant::now();
        let s = svc.create_server(p).await?;
        lat.push(t.elapsed());
        anyhow::ensure!(s.public_key.is_some(), "server {} got no key", s.name);
        ids.push(s.minion_id);
    }
    let total = start.elapsed();
    if let Some(path) = &a.ids_out {
        let mut text = ids.join("\n");
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }

    let mean = lat.iter().map(Duration::as_secs_f64).sum::<f64>() / lat.len().max(1) as f64;
    lat.sort();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len().max(1)) - 1;
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "{}",
        serde_json::json!({
            "backend": svc.store().backend(),
            "servers": a.n,
            "bits": a.bits,
            "pool_before": pool_before,
            "pool_after": issuer.pool_len(),
            "seconds": total.as_secs_f64(),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
            "mean_ms": mean * 1e3,
        })
    );
    Ok(())
}
