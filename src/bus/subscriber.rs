//! The one reader of the master's publish socket.
//!
//! The master's publisher waits on each subscriber's write in turn, so a slow
//! reader slows the whole bus (salt-protocol.md §6). The reader task here only
//! reads, decodes and hands each event to a bounded `broadcast` queue, whose
//! `send` never waits: a consumer that falls behind loses the oldest events
//! and is told how many ([`BusItem::Lagged`]), which is counted in
//! [`BusStats`] and logged. Memory stays bounded by the queue capacity.
//!
//! When the master goes away the task reconnects with backoff and emits
//! [`BusItem::Connected`] with `reconnect: true`, so consumers can reconcile
//! what they may have missed meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::codec::{BadFrame, Decoded, FrameDecoder, DEFAULT_MAX_FRAME};
use super::log;
use super::{BusEndpoint, Event};

/// The largest `queue_capacity`: the broadcast queue is allocated whole
/// (one slot per event), so a huge value would exhaust memory at start-up.
pub const MAX_QUEUE_CAPACITY: usize = 1 << 20;

/// Tuning of the reader; every field has a default.
#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    /// Events buffered for each consumer before the oldest are dropped.
    pub queue_capacity: usize,
    /// Largest frame accepted; a bigger one is dropped without buffering it.
    pub max_frame: usize,
    /// First reconnect delay; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 16_384,
            max_frame: DEFAULT_MAX_FRAME,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What consumers receive: events, and the state of the connection.
#[derive(Debug, Clone)]
pub enum BusItem {
    /// Connected to the publisher. `reconnect` is true after a loss, when
    /// events may have been missed.
    Connected {
        reconnect: bool,
    },
    /// The connection was lost; the reader is reconnecting.
    Disconnected {
        reason: String,
    },
    Event(Arc<Event>),
    /// This consumer fell behind and `n` events were dropped for it.
    Lagged(u64),
}

/// Counters of the reader, shared with consumers and the metrics endpoint.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Events decoded and queued.
    pub events: AtomicU64,
    /// Frames that could not be decoded (skipped).
    pub decode_errors: AtomicU64,
    /// Bytes skipped while resynchronising on a garbled stream.
    pub bytes_discarded: AtomicU64,
    /// Connections made (the first and each reconnect).
    pub connects: AtomicU64,
    /// Events dropped for consumers that fell behind.
    pub lagged: AtomicU64,
    /// Connected to the master's publisher now: the master (beside the
    /// daemon) is up. A dispatcher takes no work while it is not.
    pub connected: std::sync::atomic::AtomicBool,
    /// When the reader lost its connection (cleared at the next one): how
    /// long a master has been gone.
    lost_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl BusStats {
    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Whether the reader is connected to the master's publisher now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// How long the reader has been disconnected after losing a connection
    /// (`None` while connected, and before the first connection).
    pub fn disconnected_for(&self) -> Option<std::time::Duration> {
        self.lost_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map(|at| at.elapsed())
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
        let mut lost_at = self
            .lost_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *lost_at = if up {
            None
        } else {
            Some(lost_at.unwrap_or_else(std::time::Instant::now))
        };
    }
}

/// The running reader: subscribe to it, read its stats, stop it.
#[derive(Debug)]
pub struct BusHandle {
    endpoint: BusEndpoint,
    tx: broadcast::Sender<BusItem>,
    stats: Arc<BusStats>,
    opts: SubscriberOptions,
    task: Option<JoinHandle<()>>,
}

impl BusHandle {
    /// Prepares a reader; call [`subscribe`](Self::subscribe) for the first
    /// consumers, then [`spawn`](Self::spawn), so nothing is missed.
    pub fn new(endpoint: BusEndpoint, opts: SubscriberOptions) -> Self {
        // The queue is allocated whole: bounded (the config is checked
        // against the same bound).
        let (tx, _) = broadcast::channel(opts.queue_capacity.clamp(1, MAX_QUEUE_CAPACITY));
        Self {
            endpoint,
            tx,
            stats: Arc::new(BusStats::default()),
            opts,
            task: None,
        }
    }

    /// A new consumer; it sees what is read from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
            stats: self.stats.clone(),
        }
    }

    /// The reader's counters.
    pub fn stats(&self) -> &Arc<BusStats> {
        &self.stats
    }

    /// Starts the reader task; it runs until `cancel` fires.
    pub fn spawn(&mut self, cancel: CancellationToken) {
        self.task = Some(tokio::spawn(self.reader(cancel)));
    }

    /// The reader, for a caller that runs it as a task of its own (the
    /// daemon's supervisor); it runs until `cancel` fires.
    pub fn reader(
        &self,
        cancel: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let reader = Reader {
            endpoint: self.endpoint.clone(),
            tx: self.tx.clone(),
            stats: self.stats.clone(),
            opts: self.opts.clone(),
        };
        reader.run(cancel)
    }

    /// Waits for the reader task to end (after its token was cancelled).
    pub async fn join(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// One consumer's end of the queue.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<BusItem>,
    stats: Arc<BusStats>,
}

impl Subscription {
    /// The next item; `None` once the reader has stopped.
    pub async fn recv(&mut self) -> Option<BusItem> {
        match self.rx.recv().await {
            Ok(item) => Some(item),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                self.stats.lagged.fetch_add(n, Ordering::Relaxed);
                log::bus_consumer_lagged(n);
                Some(BusItem::Lagged(n))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

struct Reader {
    endpoint: BusEndpoint,
    tx: broadcast::Sender<BusItem>,
    stats: Arc<BusStats>,
    opts: SubscriberOptions,
}

impl Reader {
    async fn run(self, cancel: CancellationToken) {
        let mut connected_before = false;
        let mut delay = self.opts.backoff_min;
        let mut failures: u32 = 0;
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                s = self.endpoint.connect() => s,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(error) => {
                    failures += 1;
                    log::bus_connect_failed(&self.endpoint, failures, &error);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = delay.saturating_mul(2).min(self.opts.backoff_max);
                    continue;
                }
            };
            delay = self.opts.backoff_min;
            failures = 0;
            self.stats.connects.fetch_add(1, Ordering::Relaxed);
            self.stats.set_connected(true);
            log::bus_connected(&self.endpoint, connected_before);
            let _ = self.tx.send(BusItem::Connected {
                reconnect: connected_before,
            });
            connected_before = true;

            let reason = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.read_until_closed(&mut stream) => r,
            };
            self.stats.set_connected(false);
            log::bus_disconnected(&self.endpoint, &reason);
            let _ = self.tx.send(BusItem::Disconnected { reason });
        }
    }

    /// Reads and dispatches frames until the connection ends; returns why.
    async fn read_until_closed(&self, stream: &mut super::BusStream) -> String {
        let mut decoder = FrameDecoder::new(self.opts.max_frame);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut discarded = 0;
        loop {
            if buf.capacity() - buf.len() < 16 * 1024 {
                buf.reserve(64 * 1024);
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) => return "closed by the master".to_owned(),
                Ok(_) => {}
                Err(error) => return format!("read error: {error}"),
            }
            while let Some(decoded) = decoder.decode(&mut buf) {
                match decoded {
                    Decoded::Event(event) => {
                        self.stats.events.fetch_add(1, Ordering::Relaxed);
                        // No receiver is not an error: the event is simply unwanted.
                        let _ = self.tx.send(BusItem::Event(Arc::new(event)));
                    }
                    Decoded::Bad(bad) => self.bad_frame(&bad),
                }
            }
            let now = decoder.discarded();
            if now > discarded {
                self.stats
                    .bytes_discarded
                    .fetch_add(now - discarded, Ordering::Relaxed);
                discarded = now;
            }
        }
    }

    fn bad_frame(&self, bad: &BadFrame) {
        let n = self.stats.decode_errors.fetch_add(1, Ordering::Relaxed) + 1;
        log::event_decode_failed(bad, n);
    }
}
