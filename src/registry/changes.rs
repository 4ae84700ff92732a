//! Wake-ups for the registry's readers (the outbox notifier, the
//! dispatcher): a change may come from any process — the daemon, or the CLI
//! writing the same SQLite file. On SQLite the file and its `-wal` are
//! watched (inotify through notify), so readers sleep until a write instead
//! of polling; on PostgreSQL (or when the watch cannot be set up) readers
//! poll at their own pace.

use std::path::Path;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::watch;
use tracing::warn;

/// How often a reader looks anyway while the file is watched (a missed
/// notification costs at most this).
pub const WATCHED_POLL: Duration = Duration::from_secs(30);

/// The registry's change signal; readers [`subscribe`](Self::subscribe).
#[derive(Debug)]
pub struct ChangeFeed {
    tx: watch::Sender<u64>,
    watcher: Option<RecommendedWatcher>,
}

/// One reader's end of a [`ChangeFeed`].
#[derive(Debug, Clone)]
pub struct Changes {
    rx: watch::Receiver<u64>,
    watched: bool,
}

impl ChangeFeed {
    /// Watches `file` (a SQLite database) when given; otherwise readers
    /// only poll.
    pub fn new(file: Option<&Path>) -> Self {
        let (tx, _) = watch::channel(0u64);
        let watcher = file.and_then(|f| match watch_file(f, tx.clone()) {
            Ok(w) => Some(w),
            Err(error) => {
                warn!(message = "Registry file not watched; readers poll it.", file = %f.display(), %error);
                None
            }
        });
        ChangeFeed { tx, watcher }
    }

    /// A reader's handle.
    pub fn subscribe(&self) -> Changes {
        Changes {
            rx: self.tx.subscribe(),
            watched: self.watcher.is_some(),
        }
    }
}

impl Changes {
    /// Whether writes of other processes wake this reader.
    pub fn watched(&self) -> bool {
        self.watched
    }

    /// Waits for the next change, or `poll` at most when writes of other
    /// processes are not seen ([`WATCHED_POLL`] at most when they are).
    pub async fn next(&mut self, poll: Duration) {
        let wait = if self.watched { WATCHED_POLL } else { poll };
        // A closed feed (the daemon stopping) falls back to the timer.
        let _ = tokio::time::timeout(wait, self.rx.changed()).await;
    }
}

fn watch_file(file: &Path, tx: watch::Sender<u64>) -> notify::Result<RecommendedWatcher> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let wal = format!("{name}-wal");
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if !(ev.kind.is_modify() || ev.kind.is_create()) {
            return;
        }
        let ours = ev.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| n.to_str() == Some(&name) || n.to_str() == Some(&wal))
        });
        if ours {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    };
    let mut w = notify::recommended_watcher(handler)?;
    w.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_by_another_connection_wakes_a_reader() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.db");
        let url = format!("sqlite://{}", file.display());
        let store = crate::registry::DbStore::open(&url).await.unwrap();
        // Another process's connection, as the CLI makes it.
        let other = crate::registry::DbStore::open(&url).await.unwrap();
        let feed = ChangeFeed::new(store.sqlite_file());
        let mut changes = feed.subscribe();
        assert!(changes.watched());
        let crate::registry::DbStore::Sqlite(s) = &other else {
            unreachable!()
        };
        let write = async {
            sqlx::query("INSERT INTO models (name, created_at, updated_at) VALUES ('m', 0, 0)")
                .execute(s.pool())
                .await
                .unwrap();
        };
        let (_, woke) = tokio::join!(
            write,
            tokio::time::timeout(Duration::from_secs(10), changes.rx.changed())
        );
        assert!(woke.is_ok(), "no wake-up for a write to {}", file.display());
    }
}
