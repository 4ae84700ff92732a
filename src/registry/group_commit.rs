//! Group commit for server creations: creates that arrive while a write is
//! in progress are queued and written together, in one transaction with one
//! multi-row statement per table ([`Store::insert_servers`]).
//!
//! Why: on SQLite the cost of a create is not the disk (WAL, no fsync per
//! commit) but the hand-offs to the database's worker thread, four per
//! transaction; a batch of a hundred pays them once. A lone create is
//! written alone, as before. If a batch fails (one duplicate name among
//! them, say), each of its creates is retried on its own, so every caller
//! gets its own specific error and the others are written.
//!
//! The writing runs in a spawned task, never in a caller's future: a caller
//! that goes away (a cancelled request) cannot strand the others.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::{Error, Server, Store};

/// Most servers written by one statement (18 binds each: under SQLite's
/// 32,766 and PostgreSQL's 65,535 bind limits).
pub const MAX_BATCH: usize = 256;

type Waiter = (Server, oneshot::Sender<Result<Server, Error>>);

/// The queue of creates waiting for the writer.
#[derive(Debug, Default)]
pub struct GroupCommit {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    waiting: Vec<Waiter>,
    /// A writer task is running and will take what is queued.
    writing: bool,
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a queue and a flag, consistent after every statement:
        // a panic elsewhere while holding the lock cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `server` (alone or with others queued at the same time) and
    /// returns it as stored.
    pub async fn insert<S: Store>(
        self: &Arc<Self>,
        store: &S,
        server: Server,
    ) -> Result<Server, Error> {
        let name = server.name.clone();
        let (tx, rx) = oneshot::channel();
        let start_writer = {
            let mut st = self.lock();
            st.waiting.push((server, tx));
            !std::mem::replace(&mut st.writing, true)
        };
        if start_writer {
            tokio::spawn(self.clone().write_all(store.clone()));
        }
        rx.await.unwrap_or_else(|_| {
            Err(Error::Database {
                op: format!("creating server {name}: the writer stopped"),
                source: sqlx::Error::PoolClosed,
            })
        })
    }

    /// Writes batches until the queue is empty, then steps down.
    async fn write_all<S: Store>(self: Arc<Self>, store: S) {
        loop {
            let batch: Vec<Waiter> = {
                let mut st = self.lock();
                if st.waiting.is_empty() {
                    st.writing = false;
                    return;
                }
                let n = st.waiting.len().min(MAX_BATCH);
                st.waiting.drain(..n).collect()
            };
            write_batch(&store, batch).await;
        }
    }
}

async fn write_batch<S: Store>(store: &S, batch: Vec<Waiter>) {
    if batch.len() > 1 {
        let servers: Vec<Server> = batch.iter().map(|(s, _)| s.clone()).collect();
        if let Ok(created) = store.insert_servers(&servers).await {
            for ((_, tx), server) in batch.into_iter().zip(created) {
                // A caller that went away no longer wants its answer.
                let _ = tx.send(Ok(server));
            }
            return;
        }
        // Nothing of the batch was written: each on its own, for its own error.
    }
    for (server, tx) in batch {
        let _ = tx.send(store.insert_server(&server).await);
    }
}
