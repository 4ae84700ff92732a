//! The metrics endpoint (`metrics_listen`): `GET /metrics` in the
//! Prometheus text format (OpenMetrics 1.0, which Prometheus scrapes).
//!
//! Nothing is counted here: each component keeps its own atomic counters
//! (`bus::BusStats`, `api::server::RequestStats`, `exec::ExecStats`,
//! `rules::RuleStats`, `dispatch::inventory::DispatchStats`,
//! `dispatch::accept::KeyStats`, `salt::JobStats`) and [`Scrape`], a
//! `prometheus-client` collector, reads them when the endpoint is scraped.
//! The dispatch queue depth and the backups' health and last results are
//! read from the registry at scrape time (`dispatch_targets` by status,
//! `Service::backups_with_health`), so results the CLI's `backup run`
//! recorded count too.
//!
//! The endpoint has no authentication: `config` refuses a non-loopback
//! `metrics_listen`. Served with axum, the crate the REST API builds on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::api::server::RequestStats;
use crate::bus::BusStats;
use crate::dispatch::accept::KeyStats;
use crate::dispatch::inventory::DispatchStats;
use crate::exec::ExecStats;
use crate::registry::backup::{Health, Outcome, WithHealth};
use crate::registry::dispatch::DispatchStatus;
use crate::registry::store::DispatchStore as _;
use crate::registry::{DbStore, Service};
use crate::rules::RuleStats;
use crate::salt::JobStats;

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The dispatch statuses counted as the queue (`done` is not queued).
const QUEUED: [DispatchStatus; 4] = [
    DispatchStatus::Pending,
    DispatchStatus::Running,
    DispatchStatus::Failed,
    DispatchStatus::Waiting,
];

/// Every counter the endpoint reads, shared with the components that count.
#[derive(Clone)]
pub struct Sources {
    /// The bus reader's counters.
    pub bus: Arc<BusStats>,
    /// Registry requests by entity, op and outcome (request server).
    pub requests: Arc<RequestStats>,
    /// Exec requests by outcome (request server, `exec`).
    pub exec: Arc<ExecStats>,
    /// The rules engine's counters.
    pub rules: Arc<RuleStats>,
    /// Inventory dispatch runs by outcome.
    pub dispatch: Arc<DispatchStats>,
    /// Keys accepted, rejected, alerts (acceptor).
    pub keys: Arc<KeyStats>,
    /// Jobs followed to their end by the shared Salt client.
    pub jobs: Arc<JobStats>,
    /// The registry, for the dispatch queue depth and the backups.
    pub service: Arc<Service<DbStore>>,
    /// `backups.stale_after_hours` in ms: when a backup turns red.
    pub backup_stale_after_ms: i64,
}

/// Serves `GET /metrics` on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, sources: Sources, cancel: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(sources));
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        warn!(message = "Metrics endpoint failed.", %error);
    }
}

async fn metrics(State(sources): State<Arc<Sources>>) -> impl IntoResponse {
    let mut queue = Vec::with_capacity(QUEUED.len());
    for status in QUEUED {
        match sources.service.store().dispatch_targets(Some(status)).await {
            Ok(targets) => queue.push((status.as_str(), targets.len())),
            // The rest is still worth serving; the gauge is left out.
            Err(error) => {
                warn!(message = "Dispatch queue depth not read for the metrics.", %error);
                queue.clear();
                break;
            }
        }
    }
    let backups = match sources
        .service
        .backups_with_health(sources.backup_stale_after_ms)
        .await
    {
        Ok(rows) => Some(BackupCounts::of(&rows)),
        Err(error) => {
            warn!(message = "Backups not read for the metrics.", %error);
            None
        }
    };
    match render(Scrape {
        sources: sources.as_ref().clone(),
        queue,
        backups,
    }) {
        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text),
        Err(error) => {
            warn!(message = "Metrics not encoded.", %error);
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "metrics not encoded\n".to_owned(),
            )
        }
    }
}

/// `scrape` in the text format.
fn render(scrape: Scrape) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// One scrape: the counters, and the queue depth read for it.
pub struct Scrape {
    sources: Sources,
    /// Dispatch targets by status (empty: the registry could not be read).
    queue: Vec<(&'static str, usize)>,
    /// The backups by health and by last outcome (`None`: not read).
    backups: Option<BackupCounts>,
}

/// The backups counted for one scrape.
#[derive(Debug, Default)]
struct BackupCounts {
    /// Backups by health (every health, zeros too).
    health: Vec<(&'static str, i64)>,
    /// Backups by their last result's outcome (every outcome, zeros too).
    last: Vec<(&'static str, i64)>,
}

impl BackupCounts {
    fn of(rows: &[WithHealth]) -> Self {
        let count = |keep: &dyn Fn(&WithHealth) -> bool| {
            i64::try_from(rows.iter().filter(|r| keep(r)).count()).unwrap_or(i64::MAX)
        };
        Self {
            health: Health::ALL
                .iter()
                .map(|&h| (metric_name(h), count(&|r| r.1 == h)))
                .collect(),
            last: Outcome::ALL
                .iter()
                .map(|&o| {
                    (
                        o.as_str(),
                        count(&|r| r.2.as_ref().map(|x| x.outcome) == Some(o)),
                    )
                })
                .collect(),
        }
    }
}

/// A health as a label value (no spaces).
fn metric_name(h: Health) -> &'static str {
    match h {
        Health::Green => "green",
        Health::Red => "red",
        Health::NeverRun => "never_run",
        Health::Running => "running",
    }
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrape")
            .field("queue", &self.queue)
            .finish()
    }
}

fn get_u64(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Writes one counter without labels (`name` without `_total`: the encoder adds it).
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

/// Writes a gauge family with one label.
fn gauge_by(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, i64)],
) -> std::fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (value, n) in values {
        let labels = [(label, *value)];
        ConstGauge::new(*n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes a counter family with one label.
fn counter_by<V: AsRef<str>>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(V, u64)],
) -> std::fmt::Result {
    let mut family =
        e.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (value, n) in values {
        let labels = [(label, value.as_ref())];
        ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.sources;
        let info = ConstGauge::new(1i64);
        info.encode(
            e.encode_descriptor(
                "salt_steward_build_info",
                "The running salt-steward's version (always 1).",
                None,
                info.metric_type(),
            )?
            .encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?,
        )?;

        // The bus reader.
        let bus = &s.bus;
        let decoded = get_u64(&bus.events);
        let failed = get_u64(&bus.decode_errors);
        counter(
            &mut e,
            "salt_steward_events_received",
            "Events read from the master's bus (decoded or not).",
            decoded + failed,
        )?;
        counter(
            &mut e,
            "salt_steward_events_decoded",
            "Events decoded and handed to the daemon's components.",
            decoded,
        )?;
        counter(
            &mut e,
            "salt_steward_events_failed",
            "Bus frames that could not be decoded (skipped).",
            failed,
        )?;
        counter(
            &mut e,
            "salt_steward_bus_discarded_bytes",
            "Bytes skipped while resynchronising on a garbled bus stream.",
            get_u64(&bus.bytes_discarded),
        )?;
        counter(
            &mut e,
            "salt_steward_bus_reconnects",
            "Reconnections to the master's bus after the first connection.",
            get_u64(&bus.connects).saturating_sub(1),
        )?;
        counter(
            &mut e,
            "salt_steward_bus_lagged_events",
            "Events a component lost because it fell behind the bus.",
            get_u64(&bus.lagged),
        )?;

        // Registry requests on the bus.
        let mut family = e.encode_descriptor(
            "salt_steward_requests",
            "Registry requests on the bus, by entity, op and outcome (ok or the error code).",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for ((entity, op, outcome), n) in s.requests.snapshot() {
            let labels = [
                ("entity", entity),
                ("op", op),
                ("outcome", outcome.as_str()),
            ];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        counter_by(
            &mut e,
            "salt_steward_exec_requests",
            "Exec requests on the bus, by outcome (ok, failed or the refusal's code).",
            "outcome",
            &s.exec.snapshot(),
        )?;

        // Rules.
        let r = &s.rules;
        counter(
            &mut e,
            "salt_steward_rule_matches",
            "(event, rule) matches.",
            get_u64(&r.matched),
        )?;
        counter(
            &mut e,
            "salt_steward_rule_actions_queued",
            "Rule actions handed to the sender queues.",
            get_u64(&r.queued),
        )?;
        counter_by(
            &mut e,
            "salt_steward_rule_actions",
            "Rule actions finished, by outcome.",
            "outcome",
            &[("done", get_u64(&r.done)), ("failed", get_u64(&r.failed))],
        )?;
        counter_by(
            &mut e,
            "salt_steward_rule_drops",
            "Events or actions the rules engine dropped, by reason.",
            "reason",
            &[
                ("lagged", get_u64(&r.lagged)),
                ("render_error", get_u64(&r.render_errors)),
                ("coalesced", get_u64(&r.coalesced)),
                ("rate_limited", get_u64(&r.rate_limited)),
                ("queue_full", get_u64(&r.queue_full)),
                ("debounce_overflow", get_u64(&r.debounce_overflow)),
            ],
        )?;
        counter_by(
            &mut e,
            "salt_steward_rule_reloads",
            "Rule set loads, by outcome (refused: a file was invalid, the old set kept).",
            "outcome",
            &[
                ("ok", get_u64(&r.reloads)),
                ("refused", get_u64(&r.reload_failures)),
            ],
        )?;

        // Inventory dispatch.
        if !self.queue.is_empty() {
            let mut family = e.encode_descriptor(
                "salt_steward_dispatch_queue",
                "Dispatch targets not done, by status (read from the registry).",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (status, n) in &self.queue {
                let labels = [("status", *status)];
                ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        if let Some(b) = &self.backups {
            gauge_by(
                &mut e,
                "salt_steward_backups",
                "Backups by health: green (a recent success that copied something), red, never_run, running (read from the registry).",
                "health",
                &b.health,
            )?;
            gauge_by(
                &mut e,
                "salt_steward_backup_last_result",
                "Backups by the outcome of their last recorded result (read from the registry).",
                "outcome",
                &b.last,
            )?;
        }
        counter_by(
            &mut e,
            "salt_steward_dispatch_runs",
            "Inventory dispatch runs finished, by outcome.",
            "outcome",
            &[
                ("done", get_u64(&s.dispatch.done)),
                ("failed", get_u64(&s.dispatch.failed)),
            ],
        )?;

        // Jobs, keys.
        counter_by(
            &mut e,
            "salt_steward_jobs",
            "Salt jobs followed to their end (returns confirmed by the job cache), by outcome.",
            "outcome",
            &[
                ("ok", get_u64(&s.jobs.ok)),
                ("failed", get_u64(&s.jobs.failed)),
                ("no_answer", get_u64(&s.jobs.no_answer)),
            ],
        )?;
        counter(
            &mut e,
            "salt_steward_keys_accepted",
            "Minion keys accepted (identical to the issued key).",
            get_u64(&s.keys.accepted),
        )?;
        counter(
            &mut e,
            "salt_steward_keys_rejected",
            "Minion keys rejected.",
            get_u64(&s.keys.rejected),
        )?;
        counter_by(
            &mut e,
            "salt_steward_alerts",
            "Alerts fired (steward/v1/alert/<alert>).",
            "alert",
            &s.keys.alerts(),
        )?;
        Ok(())
    }
}
