//! Reactor rules in YAML files, hot-reloaded (capability 7).
//!
//! A rule is a tag glob (or several), optional conditions on the sender and
//! the event's data, and actions (`state.apply`, `local`, `wheel`, `runner`,
//! `fire`) whose values are Jinja templates filled from the event.
//!
//! - [`format`]: the file as written (serde, unknown fields refused).
//! - [`compile`]: files → one [`RuleSet`], every problem with file:line:column
//!   and rule; used by the daemon and by `salt-steward rules check`.
//! - [`matcher`]: one glob automaton for every rule's tags; sender and
//!   conditions.
//! - [`template`]: minijinja with strict undefined.
//! - [`throttle`]: debounce and rate limits per rule, action and target.
//! - [`engine`]: the intake task (bus → matches → throttle → queues).
//! - [`exec`]: per-sender ordered queues, bounded concurrency, jobs followed
//!   to their results and reported as `steward/v1/rule/<rule>/done|failed`.
//! - [`reload`]: notify watcher and reload requests (SIGHUP, from the daemon) → validated, atomic swap.
//!
//! [`RulesComponent`] wires them into the daemon.

pub mod compile;
pub mod engine;
pub mod exec;
pub mod format;
pub mod matcher;
pub mod reload;
pub mod stats;
pub mod template;
pub mod throttle;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use compile::{
    compile, load_dir, Action, ActionKind, Rendered, Rule, RuleError, RuleSet, Scratch,
    RESULT_PREFIX,
};
pub use matcher::EventView;
pub use stats::{RuleCount, RuleStats};

use crate::bus::origin::LocalSubscription;
use crate::bus::Firer;
use crate::bus::{BusHandle, LocalEvents, Subscription};
use crate::config::Settings;
use crate::salt::SaltClient;

/// The rules engine as a daemon component: create it (it subscribes to the
/// bus) before the bus reader starts, then [`spawn`](Self::spawn) it.
pub struct RulesComponent {
    dir: PathBuf,
    intake: Subscription,
    local: LocalSubscription,
    concurrency: usize,
    queue_per_sender: usize,
    intake_opts: engine::IntakeOptions,
    stats: Arc<RuleStats>,
}

impl RulesComponent {
    /// Subscribes to `bus` and to the daemon's own events (`local`) for the
    /// events rules match.
    pub fn new(bus: &BusHandle, local: &LocalEvents, settings: &Settings) -> Self {
        let cfg = &settings.rules;
        Self {
            dir: settings.rules_dir.clone(),
            intake: bus.subscribe(),
            local: local.subscribe(),
            concurrency: cfg.concurrency,
            queue_per_sender: cfg.queue_per_sender,
            intake_opts: engine::IntakeOptions {
                job_timeout: Duration::from_secs(cfg.job_timeout),
                max_waiting: cfg.max_waiting,
            },
            stats: Arc::default(),
        }
    }

    /// The engine's counters (matches, actions, drops), shared with the
    /// running engine.
    pub fn stats(&self) -> Arc<RuleStats> {
        self.stats.clone()
    }

    /// Loads the rules, starts watching them (and reloads at each value sent
    /// on `reload_requests`, the directory to load: SIGHUP) and serving events, running actions through
    /// the daemon's Salt client and event firer; ends once `cancel` fired and
    /// every part stopped.
    pub async fn run(
        self,
        salt: SaltClient,
        firer: Firer,
        reload_requests: watch::Receiver<PathBuf>,
        cancel: CancellationToken,
    ) {
        let stats = self.stats;
        let runner = Arc::new(exec::SaltRunner::new(salt, firer));
        let executor = exec::Executor::new(
            runner,
            self.concurrency,
            self.queue_per_sender,
            stats.clone(),
            cancel.clone(),
        );
        let set = reload::initial(&self.dir, &stats).await;
        let (tx, rx) = watch::channel(set);
        let watcher = tokio::spawn(reload::watch_dir(
            self.dir,
            tx,
            stats.clone(),
            reload_requests,
            cancel.clone(),
        ));
        engine::run_intake(
            self.intake,
            self.local,
            rx,
            executor.clone(),
            stats,
            self.intake_opts,
            cancel,
        )
        .await;
        let _ = watcher.await;
        executor.join().await;
    }
}
