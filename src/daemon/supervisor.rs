//! The daemon's supervisor: every long-running part is a named component,
//! started and awaited here, so that none is detached and none ends unseen.
//!
//! - A component that ends (returns or panics) before shutdown is an error
//!   logged with its name; the supervisor then stops the others and
//!   [`Supervisor::run`] fails, so the daemon exits non-zero and systemd
//!   restarts it.
//! - Shutdown: one cancellation token for every component; the components
//!   and the helper tasks (the [`TaskTracker`]: per-request tasks,
//!   provisioning runs) are awaited for at most the grace period; a second
//!   signal ends the wait at once.
//! - A panic anywhere is logged through tracing by the hook [`install_panic_hook`] sets.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// The daemon's components, as logs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskName {
    /// Reads the master's event bus (`bus::subscriber`).
    BusReader,
    /// Writes the daemon's events to the master (`bus::Firer`).
    EventWriter,
    /// Routes job returns to their callers (`salt::JobTracker`).
    JobTracker,
    /// Registry requests on the bus (`api::server`).
    RequestServer,
    /// Fires the registry's changes from the outbox.
    OutboxNotifier,
    /// Verified auto-accept, presence, first-start states (`dispatch::accept`).
    Acceptor,
    /// Keeps pre-generated key pairs in the pool.
    KeyPool,
    /// Reactor rules (`rules`).
    Rules,
    /// Applies the inventory's states when it changes (`dispatch::inventory`).
    InventoryDispatcher,
    /// Reads the config again on SIGHUP (`daemon::reload`).
    ConfigReload,
    /// Serves `GET /metrics` (`daemon::metrics`), when `metrics_listen` is set.
    Metrics,
    /// Serves the HTTP API (`api::http`), when `http.listen` is set.
    Http,
    /// Heartbeat, the other daemons, where minions are (`dispatch::cluster`).
    Cluster,
}

impl TaskName {
    /// The name in logs (`bus-reader` …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BusReader => "bus-reader",
            Self::EventWriter => "event-writer",
            Self::JobTracker => "job-tracker",
            Self::RequestServer => "request-server",
            Self::OutboxNotifier => "outbox-notifier",
            Self::Acceptor => "acceptor",
            Self::KeyPool => "key-pool",
            Self::Rules => "rules",
            Self::InventoryDispatcher => "inventory-dispatcher",
            Self::ConfigReload => "config-reload",
            Self::Cluster => "cluster",
            Self::Metrics => "metrics",
            Self::Http => "http",
        }
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the daemon stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A component ended before shutdown was asked for.
    #[error("component {name} {how} before shutdown; the daemon stopped")]
    ComponentEnded {
        /// Which one ([`TaskName::as_str`]).
        name: &'static str,
        /// "stopped" or "panicked: <message>".
        how: String,
    },
    /// A second signal came while the components were stopping.
    #[error("second signal during shutdown: stopped at once, {left} component(s) still running")]
    Interrupted {
        /// Components not stopped yet.
        left: usize,
    },
}

/// Starts the daemon's components and watches them (see the module docs).
#[derive(Debug)]
pub struct Supervisor {
    cancel: CancellationToken,
    set: JoinSet<()>,
    names: HashMap<Id, TaskName>,
    helpers: TaskTracker,
}

impl Supervisor {
    /// A supervisor whose components stop when `cancel` fires.
    pub fn new(cancel: CancellationToken) -> Self {
        Self {
            cancel,
            set: JoinSet::new(),
            names: HashMap::new(),
            helpers: TaskTracker::new(),
        }
    }

    /// Where components start their short-lived helper tasks, so shutdown
    /// waits for them too.
    pub fn helpers(&self) -> TaskTracker {
        self.helpers.clone()
    }

    /// Starts component `name`.
    pub fn spawn<F>(&mut self, name: TaskName, component: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = self.set.spawn(fault::inject(name, component));
        self.names.insert(handle.id(), name);
        info!(message = "Started component.", component = %name);
    }

    /// Runs until `shutdown` resolves or a component ends, then stops
    /// everything within `grace`; `again` resolving during that wait (a
    /// second signal) stops at once.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
        again: impl Future<Output = ()>,
        grace: Duration,
    ) -> Result<(), SupervisorError> {
        let early = tokio::select! {
            () = shutdown => {
                info!(message = "Shutting down.");
                None
            }
            Some(done) = self.set.join_next_with_id() => {
                let (name, how) = self.ended(done);
                error!(message = "Component ended before shutdown; stopping the daemon.", component = %name, how = %how);
                Some(SupervisorError::ComponentEnded { name, how })
            }
        };
        self.cancel.cancel();
        self.helpers.close();
        let drain = async {
            while let Some(done) = self.set.join_next_with_id().await {
                let (name, how) = self.ended(done);
                if how == "stopped" {
                    info!(message = "Stopped component.", component = %name);
                } else {
                    error!(message = "Component failed while stopping.", component = %name, how = %how);
                }
            }
            self.helpers.wait().await;
        };
        let interrupted = tokio::select! {
            finished = tokio::time::timeout(grace, drain) => {
                if finished.is_err() {
                    warn!(message = "Components did not stop in time.", grace = ?grace);
                }
                false
            }
            () = again => true,
        };
        if interrupted {
            let left = self.set.len();
            error!(
                message = "Second signal: stopping at once.",
                components_left = left
            );
            self.set.abort_all();
            return Err(SupervisorError::Interrupted { left });
        }
        self.set.abort_all();
        match early {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The name of a finished component and how it ended ("stopped",
    /// "panicked: …").
    fn ended(&mut self, done: Result<(Id, ()), JoinError>) -> (&'static str, String) {
        let (id, how) = match done {
            Ok((id, ())) => (id, "stopped".to_owned()),
            Err(e) => {
                let id = e.id();
                let how = if e.is_panic() {
                    format!("panicked: {}", panic_message(e.into_panic().as_ref()))
                } else {
                    "was cancelled".to_owned()
                };
                (id, how)
            }
        };
        // Every task in the set was started by `spawn`, which named it.
        let name = self.names.remove(&id).map_or("unnamed", TaskName::as_str);
        (name, how)
    }
}

/// The text of a panic payload (a `&str` or `String`, as `panic!` makes).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Logs every panic through tracing (with where it happened), so it reaches
/// the daemon's log in its format instead of only stderr.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        error!(message = "Panic.", panic = %panic_message(info.payload()), %location);
    }));
}

/// Fault injection for tests: in a debug build, the component named by
/// `SALT_STEWARD_TEST_PANIC` panics once started. Release builds have none.
mod fault {
    use std::future::Future;

    use super::TaskName;

    /// `component`, or in a debug build with the variable set to its name, a
    /// component that panics.
    #[cfg(debug_assertions)]
    #[allow(clippy::panic)] // the point: a component that panics, for tests
    pub(super) fn inject<F>(
        name: TaskName,
        component: F,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if std::env::var("SALT_STEWARD_TEST_PANIC").is_ok_and(|v| v == name.as_str()) {
            return Box::pin(async move {
                tokio::task::yield_now().await;
                panic!("fault injected into {name} (SALT_STEWARD_TEST_PANIC)");
            });
        }
        Box::pin(component)
    }

    /// `component` as it is.
    #[cfg(not(debug_assertions))]
    pub(super) fn inject<F>(_name: TaskName, component: F) -> F
    where
        F: Future<Output = ()> + Send + 'static,
    {
        component
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A component that runs until `cancel`, then records that it stopped.
    fn until_cancelled(
        cancel: &CancellationToken,
        stopped: &Arc<AtomicBool>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (cancel, stopped) = (cancel.clone(), stopped.clone());
        async move {
            cancel.cancelled().await;
            stopped.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_component_that_ends_early_stops_the_others_and_is_named() {
        let cancel = CancellationToken::new();
        let mut sup = Supervisor::new(cancel.clone());
        let other = Arc::new(AtomicBool::new(false));
        sup.spawn(TaskName::Acceptor, until_cancelled(&cancel, &other));
        sup.spawn(TaskName::Rules, async { panic!("boom") });
        let r = sup
            .run(
                std::future::pending(),
                std::future::pending(),
                Duration::from_secs(5),
            )
            .await;
        match r {
            Err(SupervisorError::ComponentEnded { name, how }) => {
                assert_eq!(name, "rules");
                assert_eq!(how, "panicked: boom");
            }
            other => panic!("{other:?}"),
        }
        assert!(other.load(Ordering::SeqCst), "the others were stopped");

        // Returning early is an error as well.
        let cancel = CancellationToken::new();
        let mut sup = Supervisor::new(cancel.clone());
        sup.spawn(TaskName::KeyPool, async {});
        let r = sup
            .run(
                std::future::pending(),
                std::future::pending(),
                Duration::from_secs(5),
            )
            .await;
        assert!(
            matches!(r, Err(SupervisorError::ComponentEnded { name: "key-pool", ref how }) if how == "stopped"),
            "{r:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_components_and_helpers() {
        let cancel = CancellationToken::new();
        let mut sup = Supervisor::new(cancel.clone());
        let stopped = Arc::new(AtomicBool::new(false));
        sup.spawn(TaskName::BusReader, until_cancelled(&cancel, &stopped));
        // A helper still busy for 10 s (of paused time) after the signal.
        let helper_done = Arc::new(AtomicBool::new(false));
        {
            let done = helper_done.clone();
            sup.helpers().spawn(async move {
                tokio::time::sleep(Duration::from_secs(10)).await;
                done.store(true, Ordering::SeqCst);
            });
        }
        sup.run(async {}, std::future::pending(), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(stopped.load(Ordering::SeqCst));
        assert!(helper_done.load(Ordering::SeqCst), "the run waited for it");
    }

    #[tokio::test]
    async fn a_second_signal_stops_at_once() {
        let cancel = CancellationToken::new();
        let mut sup = Supervisor::new(cancel.clone());
        // A component that never stops.
        sup.spawn(TaskName::Rules, std::future::pending());
        let r = sup.run(async {}, async {}, Duration::from_secs(3600)).await;
        assert!(
            matches!(r, Err(SupervisorError::Interrupted { left: 1 })),
            "{r:?}"
        );
    }
}
