//! Hot reload: the rules directory is watched (notify, inotify on Linux) and
//! SIGHUP asks for a reload too (the daemon's config reload passes each one
//! on with the directory its config names now, so `rules_dir` can move
//! without a restart). Both lead to the same step: parse and
//! compile every file; if all are valid, the new set replaces the old one
//! atomically (a `watch` channel of `Arc<RuleSet>`); otherwise every problem
//! is logged with file:line:column and rule, and the previous set stays.
//!
//! Changes are debounced ([`SETTLE`]) so an editor's save (temp file,
//! rename) is one reload. A reload that finds the same files and contents
//! changes nothing. A missing directory is retried every [`RETRY`].

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::compile::{load_dir, RuleSet};
use super::stats::RuleStats;

/// Quiet time after a change before reloading.
pub const SETTLE: Duration = Duration::from_millis(150);

/// How often a missing or lost directory is looked for again.
pub const RETRY: Duration = Duration::from_secs(2);

/// What the watcher thread reports.
enum Change {
    Files,
    /// The directory itself went away: the watch must be set up again.
    DirGone,
}

/// Loads the rules once, for the start of the daemon: the set, or an empty
/// set when the directory is missing or invalid (logged).
pub async fn initial(dir: &Path, stats: &RuleStats) -> Arc<RuleSet> {
    if !dir.is_dir() {
        info!(message = "No rules directory: no rules until it appears.", dir = %dir.display());
        let set = Arc::new(RuleSet::empty());
        stats.loaded_set(dir, set.clone());
        return set;
    }
    match load(dir).await {
        Ok(set) => {
            stats.reloads.fetch_add(1, Ordering::Relaxed);
            info!(message = "Rules loaded.", dir = %dir.display(), rules = set.rules().len(), files = set.files().len());
            log_warnings(&set);
            let set = Arc::new(set);
            stats.loaded_set(dir, set.clone());
            set
        }
        Err(errors) => {
            stats.reload_failures.fetch_add(1, Ordering::Relaxed);
            log_refused(dir, &errors, "no rule is active until they are fixed");
            stats.load_refused(dir, &errors);
            Arc::new(RuleSet::empty())
        }
    }
}

async fn load(dir: &Path) -> Result<RuleSet, Vec<super::RuleError>> {
    let dir = dir.to_owned();
    match tokio::task::spawn_blocking(move || load_dir(&dir)).await {
        Ok(r) => r,
        Err(e) => Err(vec![super::RuleError {
            file: PathBuf::from("<reload>"),
            line: None,
            column: None,
            rule: None,
            message: format!("the reload task failed: {e}"),
        }]),
    }
}

fn log_warnings(set: &RuleSet) {
    for warning in set.warnings() {
        warn!(message = "Rule loaded with a warning.", %warning);
    }
}

fn log_refused(dir: &Path, errors: &[super::RuleError], consequence: &str) {
    warn!(message = "Rules refused: invalid rule files.", dir = %dir.display(), problems = errors.len(), consequence);
    for error in errors {
        warn!(message = "Invalid rule file.", %error);
    }
}

/// Watches `dir` and publishes each valid new rule set on `tx`, until `cancel`.
/// Each value sent on `reload_requests` asks for a reload from that
/// directory (watched from then on when it differs).
pub async fn watch_dir(
    mut dir: PathBuf,
    tx: watch::Sender<Arc<RuleSet>>,
    stats: Arc<RuleStats>,
    mut reload_requests: watch::Receiver<PathBuf>,
    cancel: CancellationToken,
) {
    let (changes_tx, mut changes) = mpsc::channel::<Change>(64);
    let mut watcher = watch_or_say(&dir, &changes_tx);
    let mut retry = tokio::time::interval(RETRY);
    let mut requests_open = true;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            change = changes.recv() => {
                let mut gone = matches!(change, Some(Change::DirGone));
                // Let a burst of writes settle into one reload.
                tokio::time::sleep(SETTLE).await;
                while let Ok(c) = changes.try_recv() {
                    gone |= matches!(c, Change::DirGone);
                }
                if gone {
                    watcher = None;
                }
                reload(&dir, &tx, &stats).await;
            }
            _ = retry.tick(), if watcher.is_none() => {
                // A watcher (a thread) only once there is a directory.
                if !dir.is_dir() {
                    continue;
                }
                watcher = attach(&dir, &changes_tx);
                if watcher.is_some() {
                    info!(message = "Watching the rules directory.", dir = %dir.display());
                    reload(&dir, &tx, &stats).await;
                }
            }
            asked = reload_requests.changed(), if requests_open => {
                if asked.is_err() {
                    // The daemon's signal owner is gone: no more requests.
                    requests_open = false;
                    continue;
                }
                let asked_dir = reload_requests.borrow_and_update().clone();
                if asked_dir != dir {
                    info!(message = "SIGHUP: the rules directory changed.", from = %dir.display(), to = %asked_dir.display());
                    dir = asked_dir;
                    watcher = watch_or_say(&dir, &changes_tx);
                }
                info!(message = "SIGHUP: reloading the rules.", dir = %dir.display());
                reload(&dir, &tx, &stats).await;
            }
        }
    }
}

/// [`attach`], saying so when the directory cannot be watched (yet).
fn watch_or_say(dir: &Path, tx: &mpsc::Sender<Change>) -> Option<RecommendedWatcher> {
    let watcher = attach(dir, tx);
    if watcher.is_none() {
        warn!(message = "Rules directory not watched (missing?); looking again periodically.", dir = %dir.display(), every = ?RETRY);
    }
    watcher
}

fn attach(dir: &Path, tx: &mpsc::Sender<Change>) -> Option<RecommendedWatcher> {
    let tx = tx.clone();
    let root = dir.to_owned();
    let handler = move |res: notify::Result<notify::Event>| {
        let change = match res {
            Ok(ev) if ev.kind.is_remove() && ev.paths.iter().any(|p| p == &root) => Change::DirGone,
            Ok(ev) if ev.kind.is_access() => return,
            Ok(_) => Change::Files,
            Err(_) => Change::DirGone,
        };
        // A full channel already holds a pending reload.
        let _ = tx.try_send(change);
    };
    let mut w = notify::recommended_watcher(handler).ok()?;
    w.watch(dir, RecursiveMode::NonRecursive).ok()?;
    Some(w)
}

/// Loads the directory; swaps the set in if valid and different.
pub async fn reload(dir: &Path, tx: &watch::Sender<Arc<RuleSet>>, stats: &RuleStats) {
    match load(dir).await {
        Ok(set) => {
            if set.fingerprint() == tx.borrow().fingerprint() {
                tracing::debug!(message = "Rules unchanged.", dir = %dir.display());
                return;
            }
            stats.reloads.fetch_add(1, Ordering::Relaxed);
            info!(message = "Rules reloaded.", dir = %dir.display(), rules = set.rules().len(), files = set.files().len());
            log_warnings(&set);
            let set = Arc::new(set);
            stats.loaded_set(dir, set.clone());
            tx.send_replace(set);
        }
        Err(errors) => {
            stats.reload_failures.fetch_add(1, Ordering::Relaxed);
            log_refused(dir, &errors, "the previous rules stay active");
            stats.load_refused(dir, &errors);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_valid_change_swaps_an_invalid_one_keeps_the_old_set() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.yaml");
        let rule = |tag: &str| {
            format!("rules:\n  - name: r\n    on: {tag}\n    do: [{{fire: {{tag: out}}}}]\n")
        };
        std::fs::write(&f, rule("one")).unwrap();
        let stats = Arc::new(RuleStats::default());
        let (tx, mut rx) = watch::channel(initial(dir.path(), &stats).await);
        assert_eq!(rx.borrow().rules()[0].on, ["one"]);
        let cancel = CancellationToken::new();
        let (_reload_tx, reload_rx) = watch::channel(dir.path().to_owned());
        let task = tokio::spawn(watch_dir(
            dir.path().to_owned(),
            tx,
            stats.clone(),
            reload_rx,
            cancel.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;

        std::fs::write(&f, rule("two")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow_and_update().rules()[0].on, ["two"]);

        std::fs::write(dir.path().join("b.yaml"), "rules: [oops\n").unwrap();
        tokio::time::sleep(SETTLE * 4).await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(rx.borrow().rules()[0].on, ["two"]);
        assert!(stats.reload_failures.load(Ordering::Relaxed) >= 1);

        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        std::fs::write(&f, rule("three")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().rules()[0].on, ["three"]);
        cancel.cancel();
        task.await.unwrap();
    }
}
