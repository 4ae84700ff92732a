//! `salt-steward daemon`: the long-running process.
//!
//! A [`Supervisor`] of named components ([`TaskName`]), each a task stopped
//! by one cancellation token; one that ends before shutdown stops the daemon
//! with an error (`supervisor`). Signals have one owner (`signals`).
//! - the bus reader (`bus::subscriber`), shared by the others;
//! - the request server: registry requests from the bus (`api::server`):
//!   who may ask what, receipts confirmed from the master's job cache,
//!   replies;
//! - the outbox dispatcher: every change recorded in the registry's outbox
//!   (by the bus or by the CLI, daemon running or not) is fired as
//!   `steward/v1/<server|model>/<created|updated|deleted>`, then acknowledged
//!   on the `notify` cursor. Fire-then-acknowledge: at least once, and a crash
//!   in between fires again on restart. A row it cannot read is quarantined;
//!   rows every consumer has passed are pruned;
//! - the rules engine (`rules`): reactor rules from `rules_dir`, hot-reloaded;
//!   what the daemon fires under its own tags reaches it in memory
//!   ([`Firer::with_local`], `bus::origin`);
//! - the acceptor (`dispatch::accept`): verified auto-accept of minion keys,
//!   presence, first-start states; and the key-pool filler;
//! - the inventory dispatcher (`dispatch::inventory`): the states of the
//!   hosts and proxies whose forwards changed, applied once per burst,
//!   recorded and retried; a run cut by a stop is due again at start-up;
//! - the metrics endpoint (`metrics`, with `metrics_listen`): `GET /metrics`
//!   reads the components' counters at scrape time;
//! - the HTTP API (`http`, with `http.listen`): `api::http`, users,
//!   sessions, tokens, servers, audit.
//!
//! Shutdown (SIGTERM/SIGINT): stop taking requests, let the dispatcher finish
//! the entry in hand, exit 0 within [`SHUTDOWN_GRACE`]; a second signal
//! stops at once (non-zero).

pub mod metrics;
mod reload;
mod signals;
pub mod supervisor;

pub use supervisor::{Supervisor, TaskName};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::api::server::{serve_requests, Answering, PolicyHandle};
use crate::bus::{BusHandle, EventFirer, Firer, LocalEvents, SubscriberOptions};
use crate::config::Settings;
use crate::dispatch::accept::{self as acceptor, AcceptorConfig};
use crate::dispatch::cluster::{self, Identity};
use crate::dispatch::inventory::{self, DispatcherConfig, Shared};
use crate::dispatch::notify::dispatch_outbox;
use crate::master_config::MasterConfig;
use crate::pki::KeyIssuer;
use crate::registry;
use crate::registry::dispatch::{Debounce, Here};
use crate::registry::store::ExecStore as _;
use crate::salt::{JobTracker, ReqClient, SaltClient};

/// How long shutdown waits for the components.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Timeout of one request to the master's request server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the daemon until SIGTERM/SIGINT (a second one while stopping: at
/// once) or until a component ends, which is an error: the caller exits
/// non-zero.
pub async fn run(
    settings: &Settings,
    master: &MasterConfig,
    master_from_cli: Option<PathBuf>,
) -> anyhow::Result<()> {
    supervisor::install_panic_hook();
    let (signals, _signal_task) = signals::install().context("installing signal handlers")?;
    let keys = settings.key_issuer()?;
    let service = Arc::new(
        registry::open(&settings.registry)
            .await
            .with_context(|| format!("opening the registry {}", redact(&settings.registry)))?
            .with_keys(keys.clone())
            .with_share_user_prefix(&settings.shares.user_prefix),
    );
    let policy = PolicyHandle::new(reload::policy_of(settings)?);
    match service.store().exec_recover().await {
        Ok(0) => {}
        Ok(records) => info!(
            message = "Exec requests cut by the last stop recorded as interrupted.",
            records
        ),
        Err(error) => warn!(message = "Exec records of the last run not closed.", %error),
    }
    let cancel = CancellationToken::new();
    let mut sup = Supervisor::new(cancel.clone());
    let bus = BusHandle::new(
        master.event_pub(),
        SubscriberOptions {
            queue_capacity: settings.bus.queue_capacity,
            max_frame: settings.bus.max_event_size,
            ..SubscriberOptions::default()
        },
    );
    // Every consumer subscribes before the reader starts: nothing is missed.
    let requests = bus.subscribe();
    // What the daemon itself fires under its own tags reaches the rules in
    // memory, as the master's (the bus copies are ignored there).
    let local = LocalEvents::new();
    let rules = crate::rules::RulesComponent::new(&bus, &local, settings);
    let acceptor_events = bus.subscribe();
    let cluster_events = bus.subscribe();
    let me = Identity::new(
        &settings.cluster,
        master,
        service.store().backend() == "postgres",
    );
    let (tracker, routing) = JobTracker::new(bus.subscribe(), cancel.clone());
    // One Salt client (one request connection, one job tracker) for the
    // acceptor and the rules engine.
    let salt = SaltClient::new(ReqClient::new(master, REQUEST_TIMEOUT)?, tracker);
    let (firer, writer) = Firer::new(
        EventFirer::new(master.event_pull(), master.event_pub()),
        Firer::QUEUE,
        Firer::DEADLINE,
    );
    let firer = firer.with_local(local);
    let changed = Arc::new(Notify::new());
    // Writes to the registry by any process wake its readers (SQLite).
    let registry_changes = registry::changes::ChangeFeed::new(service.store().sqlite_file());
    // Bound before anything starts: a taken port fails the start, named.
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics_listen {addr}: binding the metrics endpoint"))?,
        ),
        None => None,
    };
    let http_listener = match settings.http.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("http.listen {addr}: binding the HTTP API"))?,
        ),
        None => None,
    };
    let key_stats = Arc::new(acceptor::KeyStats::default());
    let dispatcher = dispatcher_config(settings, master, &me, bus.stats().clone(), sup.helpers());
    let rule_stats = rules.stats();
    let job_stats = salt.job_stats().clone();

    info!(message = "Daemon started.", master_config = %master.path.display(), registry_backend = service.store().backend());
    sup.spawn(TaskName::BusReader, bus.reader(cancel.clone()));
    // Ends once every component has dropped its handle, after writing what
    // they queued.
    sup.spawn(TaskName::EventWriter, writer);
    sup.spawn(TaskName::JobTracker, routing);
    sup.spawn(
        TaskName::Cluster,
        cluster::run(
            service.store().clone(),
            me.clone(),
            settings.cluster.clone(),
            cluster_events,
            cancel.clone(),
        ),
    );
    sup.spawn(
        TaskName::OutboxNotifier,
        dispatch_outbox(
            service.clone(),
            firer.clone(),
            changed.clone(),
            registry_changes.subscribe(),
            me.clone(),
            Duration::from_secs(settings.cluster.lease_secs),
            cancel.clone(),
        ),
    );
    sup.spawn(
        TaskName::Acceptor,
        acceptor::run(
            AcceptorConfig {
                pki_dir: master.pki_dir.clone(),
                mode: settings.keys.accept_mode,
                unknown: settings.keys.unknown_minions,
                sync_keys: settings.masters.len() > 1,
                helpers: sup.helpers(),
                stats: key_stats.clone(),
            },
            acceptor_events,
            service.clone(),
            salt.clone(),
            firer.clone(),
            cancel.clone(),
        ),
    );
    sup.spawn(
        TaskName::KeyPool,
        fill_key_pool(keys, settings.keys.pool_size, cancel.clone()),
    );
    sup.spawn(
        TaskName::InventoryDispatcher,
        inventory::run(
            dispatcher.clone(),
            service.clone(),
            salt.clone(),
            firer.clone(),
            registry_changes.subscribe(),
            cancel.clone(),
        ),
    );
    // Each SIGHUP reaches the rules through the config reload, with the
    // rules directory the config names then.
    let (rules_reload, rules_reload_requests) =
        tokio::sync::watch::channel(settings.rules_dir.clone());
    sup.spawn(
        TaskName::Rules,
        rules.run(
            salt.clone(),
            firer.clone(),
            rules_reload_requests,
            cancel.clone(),
        ),
    );
    let http_salt = salt.clone();
    let answering = Answering::new(
        service.clone(),
        firer,
        changed,
        salt,
        master.pki_dir.clone(),
        sup.helpers(),
        policy.clone(),
    );
    if let Some(listener) = http_listener {
        let state = Arc::new(
            crate::api::http::HttpState::new(service.clone(), &settings.http)
                .with_backup_stale_hours(settings.backups.stale_after_hours)
                .with_pki_dir(master.pki_dir.clone())
                .with_wheel(http_salt.req().clone())
                .with_rules({
                    let stats = rule_stats.clone();
                    Arc::new(move || stats.report())
                })
                .with_bundle(crate::api::http::BundleContext {
                    master: master.clone(),
                    masters: settings.masters.clone(),
                })
                .with_exec(crate::api::http::ExecContext {
                    salt: http_salt,
                    policy: policy.clone(),
                    stats: answering.exec_stats(),
                }),
        );
        info!(message = "HTTP API listening.", address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
        sup.spawn(
            TaskName::Http,
            crate::api::http::serve(listener, state, cancel.clone()),
        );
    }
    if let Some(listener) = metrics_listener {
        let sources = metrics::Sources {
            bus: bus.stats().clone(),
            requests: answering.stats(),
            exec: answering.exec_stats(),
            rules: rule_stats,
            dispatch: dispatcher.stats.clone(),
            keys: key_stats,
            jobs: job_stats,
            service,
            backup_stale_after_ms: settings.backups.stale_after_ms(),
        };
        info!(message = "Metrics endpoint listening.", address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
        sup.spawn(
            TaskName::Metrics,
            metrics::serve(listener, sources, cancel.clone()),
        );
    }
    sup.spawn(
        TaskName::RequestServer,
        serve_requests(requests, answering, policy.clone(), cancel.clone()),
    );
    sup.spawn(
        TaskName::ConfigReload,
        reload::run(
            settings.clone(),
            master_from_cli,
            signals.reload.clone(),
            policy,
            rules_reload,
            cancel.clone(),
        ),
    );

    let result = sup
        .run(
            signals::reached(signals.stop.clone(), 1),
            signals::reached(signals.stop.clone(), 2),
            SHUTDOWN_GRACE,
        )
        .await;
    drop(registry_changes);
    info!(message = "Stopped.");
    Ok(result?)
}

/// The dispatcher's settings from `dispatch:` (numbers range-checked at load).
fn dispatcher_config(
    settings: &Settings,
    master: &MasterConfig,
    me: &Identity,
    bus: Arc<crate::bus::BusStats>,
    helpers: TaskTracker,
) -> DispatcherConfig {
    let d = &settings.dispatch;
    let ms = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    DispatcherConfig {
        debounce: Debounce {
            debounce_ms: ms(d.debounce_ms),
            max_delay_ms: ms(d.max_delay_ms),
        },
        concurrency: d.concurrency,
        job_timeout: Duration::from_secs(d.job_timeout),
        retry_base_ms: ms(d.retry_base_ms),
        retry_max_ms: ms(d.retry_max_ms),
        drift_interval: (d.drift_interval > 0).then(|| Duration::from_secs(d.drift_interval)),
        helpers,
        stats: Arc::default(),
        master_pki_dir: master.pki_dir.clone(),
        backup_retain: settings.backups.retain.clone(),
        daemon_id: me.daemon_id.clone(),
        shared: me.shared.then(|| Shared {
            here: Here {
                master_id: me.master_id.clone(),
                dead_after_ms: settings.cluster.dead_after_ms(),
            },
            chore_lease: Duration::from_secs(settings.cluster.lease_secs),
        }),
        bus: Some(bus),
    }
}

/// A database URL with any password hidden, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Keeps `size` pre-generated key pairs in the pool, one at a time on a
/// blocking thread (generation is CPU-bound), checking every few seconds.
async fn fill_key_pool(keys: KeyIssuer, size: usize, cancel: CancellationToken) {
    loop {
        if cancel.is_cancelled() {
            return;
        }
        if keys.pool_len() < size {
            let k = keys.clone();
            match tokio::task::spawn_blocking(move || k.generate_into_pool()).await {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => warn!(message = "Key pool not refilled.", %error),
                Err(error) => warn!(message = "Key pool not refilled.", %error),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://steward:s3cret@db/reg"),
            "postgres://steward:***@db/reg"
        );
        assert_eq!(redact("sqlite:///var/lib/x.db"), "sqlite:///var/lib/x.db");
    }
}
