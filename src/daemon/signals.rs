//! The daemon's one owner of signals: SIGTERM and SIGINT ask for shutdown
//! (the supervisor counts them: a second one while stopping stops at once),
//! SIGHUP asks the rules to reload. Components never install handlers
//! themselves; they watch the counters this hands out.

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

/// The counters the signals feed: shutdown requests and reload requests.
#[derive(Debug, Clone)]
pub struct SignalCounts {
    /// SIGTERM and SIGINT received so far.
    pub stop: watch::Receiver<u64>,
    /// SIGHUP received so far.
    pub reload: watch::Receiver<u64>,
}

/// Installs the handlers and starts the task that counts the signals; the
/// task ends when the returned guard is dropped.
pub fn install() -> std::io::Result<(SignalCounts, SignalTask)> {
    let (term, int, hup) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
        signal(SignalKind::hangup())?,
    );
    let (stop_tx, stop) = watch::channel(0u64);
    let (reload_tx, reload) = watch::channel(0u64);
    let task = tokio::spawn(count(term, int, hup, stop_tx, reload_tx));
    Ok((SignalCounts { stop, reload }, SignalTask(task)))
}

/// Aborts the signal task when dropped.
#[derive(Debug)]
pub struct SignalTask(tokio::task::JoinHandle<()>);

impl Drop for SignalTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn count(
    mut term: Signal,
    mut int: Signal,
    mut hup: Signal,
    stop: watch::Sender<u64>,
    reload: watch::Sender<u64>,
) {
    loop {
        tokio::select! {
            Some(()) = term.recv() => stop.send_modify(|n| *n += 1),
            Some(()) = int.recv() => stop.send_modify(|n| *n += 1),
            Some(()) = hup.recv() => reload.send_modify(|n| *n += 1),
            else => return,
        }
    }
}

/// Resolves once `counter` has reached `n`, or never if its sender is gone
/// first (no more signals can come).
pub async fn reached(mut counter: watch::Receiver<u64>, n: u64) {
    if counter.wait_for(|c| *c >= n).await.is_err() {
        std::future::pending::<()>().await;
    }
}
