//! Throughput of the native client: N `test.ping` jobs published at once
//! through one `SaltClient`, every return collected from the bus.
//!
//! Usage: `cargo run --release --example publish_burst -- MASTER_CONFIG [N] [TARGET] [TIMEOUT_S] [IN_FLIGHT]`
//!
//! All N jobs are handed to the library at once; at most IN_FLIGHT (default
//! N) are published and awaited at a time, so the master and minions are
//! not sent more than they can take (a job is "done" when every expected
//! minion returned).
//! Prints one JSON line: jobs, expected returns, returns collected, lost,
//! seconds from first publish to last return, jobs/s. Used by `scripts/bench-salt`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use salt_steward::bus::{BusHandle, SubscriberOptions};
use salt_steward::master_config::MasterConfig;
use salt_steward::salt::{JobTracker, Publish, ReqClient, SaltClient};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: publish_burst MASTER_CONFIG [N] [TARGET]")?;
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let target = args.next().unwrap_or_else(|| "*".to_owned());
    let timeout = Duration::from_secs(args.next().map(|s| s.parse()).transpose()?.unwrap_or(600));
    let in_flight: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(n);
    let gate = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let master = MasterConfig::load(path.as_ref())?;

    let mut bus = BusHandle::new(
        master.event_pub(),
        SubscriberOptions {
            queue_capacity: 1 << 17,
            ..SubscriberOptions::default()
        },
    );
    let cancel = CancellationToken::new();
    let tracker = JobTracker::start(bus.subscribe(), cancel.clone());
    bus.spawn(cancel.clone());
    anyhow::ensure!(
        tracker.wait_connected(Duration::from_secs(10)).await,
        "event bus not reachable"
    );
    let client = Arc::new(SaltClient::new(ReqClient::new(&master, timeout)?, tracker));

    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let client = client.clone();
        let target = target.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let job = Publish {
                target,
                fun: "test.ping".into(),
                correlation: Some(format!("burst-{i}")),
                ..Publish::default()
            };
            client.run_job(&job, timeout).await
        }));
    }
    let (mut expected, mut got, mut errors) = (0usize, 0usize, 0usize);
    let mut last_error = None;
    for t in tasks {
        match t.await? {
            Ok((published, outcome)) => {
                expected += published.minions.len();
                got += outcome.returns.values().filter(|r| r.success).count();
            }
            Err(e) => {
                errors += 1;
                last_error = Some(e.to_string());
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    cancel.cancel();
    println!(
        "{}",
        serde_json::json!({
            "jobs": n, "in_flight": in_flight, "publish_errors": errors, "last_error": last_error,
            "expected_returns": expected, "returns": got, "lost": expected - got.min(expected),
            "seconds": (secs * 1000.0).round() / 1000.0,
            "jobs_per_s": (n as f64 / secs).round(),
            "lagged": bus.stats().lagged.load(std::sync::atomic::Ordering::Relaxed),
        })
    );
    Ok(())
}
