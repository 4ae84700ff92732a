//! Fires events into the master's pull socket (salt-protocol.md §1.3).
//!
//! The master answers nothing and silently drops a frame it cannot unpack, so
//! everything that could make it drop one is refused here, before writing:
//! the body is always msgpack bin, the tag is non-empty and has no `\n\n`.
//! Like Salt's own `fire_event`, a map gets a `_stamp` when it has none.
//!
//! The pull socket's framing differs between releases (raw msgpack up to
//! 3006.9/3007.8, length-prefixed since 3006.30/3007.17 and in 3008) and a
//! frame in the wrong one is dropped without a word, so it cannot be learnt
//! from the pull socket, nor from the publish socket (3007.17 and 3008
//! publish raw frames but pull prefixed ones). Each new pull connection is
//! therefore probed: a probe event is fired in the prefixed framing on a
//! throwaway connection and looked for on the publish socket; if it does not
//! come through, the same in the raw framing. The prefixed probe is padded
//! so that its length prefix ends in 0xc1, a byte msgpack never uses: a raw
//! reader fails on it instead of publishing what follows.

use std::time::{Duration, SystemTime};

use rmpv::Value;
use serde_json::Value as Json;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::warn;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::codec::{encode_framed, Decoded, FrameDecoder, Framing, DEFAULT_MAX_FRAME};
use super::{BusEndpoint, BusStream};

/// The tag of the framing probe (data: `{"probe": <nonce>, "pad": …}`).
pub const PROBE_TAG: &str = "steward/bus/probe";

/// How long one probe waits to see its event published.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// Why an event was not fired.
#[derive(Debug, thiserror::Error)]
pub enum FireError {
    #[error("invalid tag {tag:?}: {reason}")]
    InvalidTag { tag: String, reason: &'static str },
    #[error("event {tag} is {len} bytes, over the limit of {max}")]
    TooLarge { tag: String, len: usize, max: usize },
    #[error("master event bus {endpoint} not reachable: {source}")]
    Connect {
        endpoint: BusEndpoint,
        source: std::io::Error,
    },
    #[error("writing to master event bus {endpoint}: {source}")]
    Write {
        endpoint: BusEndpoint,
        source: std::io::Error,
    },
    #[error("writing to master event bus {endpoint} timed out after {timeout:?}")]
    Timeout {
        endpoint: BusEndpoint,
        timeout: Duration,
    },
    /// The daemon's writer did not get to the event before its deadline (a
    /// full queue, or a master not taking events).
    #[error("event {tag} not fired within {deadline:?}: the event writer is behind")]
    Expired { tag: String, deadline: Duration },
    /// The daemon's writer task has stopped (shutdown).
    #[error("event {tag} not fired: the event writer has stopped")]
    Stopped { tag: String },
    /// Neither framing's probe event came back on the publish socket.
    #[error("cannot tell the framing of master event bus {pull}: a probe event fired into it did not appear on {publish} within {wait:?} (raw or length-prefixed)")]
    Framing {
        pull: BusEndpoint,
        publish: BusEndpoint,
        wait: Duration,
    },
}

/// Where the framing of a new pull connection comes from.
#[derive(Debug, Clone)]
enum FramingSource {
    /// Probed through this publish socket for each new connection.
    Probe(BusEndpoint),
    /// Given (tests, or a caller that knows).
    Fixed(Framing),
}

/// A connection to the pull socket, opened on first use and reopened once
/// when the master has restarted in between.
#[derive(Debug)]
pub struct EventFirer {
    endpoint: BusEndpoint,
    conn: Option<(BusStream, Framing)>,
    source: FramingSource,
    timeout: Duration,
}

impl EventFirer {
    /// A firer for the pull socket `endpoint` (see `MasterConfig::event_pull`)
    /// that probes its framing through the publish socket `publish`
    /// (`MasterConfig::event_pub`).
    pub fn new(endpoint: BusEndpoint, publish: BusEndpoint) -> Self {
        Self {
            endpoint,
            conn: None,
            source: FramingSource::Probe(publish),
            timeout: Duration::from_secs(5),
        }
    }

    /// A firer that writes `framing` without probing.
    pub fn with_framing(endpoint: BusEndpoint, framing: Framing) -> Self {
        Self {
            endpoint,
            conn: None,
            source: FramingSource::Fixed(framing),
            timeout: Duration::from_secs(5),
        }
    }

    /// The framing of the current connection, if one is open.
    pub fn framing(&self) -> Option<Framing> {
        self.conn.as_ref().map(|(_, f)| *f)
    }

    /// Fires one event. `Ok` means the master's socket took the bytes; the
    /// master itself never acknowledges.
    pub async fn fire(&mut self, tag: &str, mut data: Value) -> Result<(), FireError> {
        check_tag(tag)?;
        add_stamp(&mut data, SystemTime::now());
        match self.write(tag, &data).await {
            Ok(()) => Ok(()),
            // A connection kept from before a master restart fails on first
            // write: reconnect once (probing again: the master may have been
            // upgraded) and retry.
            Err(FireError::Write { .. }) => {
                self.conn = None;
                self.write(tag, &data).await
            }
            Err(e) => Err(e),
        }
    }

    async fn write(&mut self, tag: &str, data: &Value) -> Result<(), FireError> {
        let (conn, framing) = match self.conn.as_mut() {
            Some((c, f)) => (c, *f),
            None => {
                let framing = match &self.source {
                    FramingSource::Fixed(f) => *f,
                    FramingSource::Probe(publish) => {
                        probe_framing(&self.endpoint, publish, self.timeout).await?
                    }
                };
                let c = self.connect().await?;
                let (c, f) = self.conn.insert((c, framing));
                (c, *f)
            }
        };
        let frame = encode_framed(framing, tag, data);
        if frame.len() > DEFAULT_MAX_FRAME {
            return Err(FireError::TooLarge {
                tag: tag.to_owned(),
                len: frame.len(),
                max: DEFAULT_MAX_FRAME,
            });
        }
        let write = async {
            conn.write_all(&frame).await?;
            conn.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => {
                self.conn = None;
                Err(FireError::Write {
                    endpoint: self.endpoint.clone(),
                    source,
                })
            }
            Err(_) => {
                self.conn = None;
                Err(FireError::Timeout {
                    endpoint: self.endpoint.clone(),
                    timeout: self.timeout,
                })
            }
        }
    }
}

impl EventFirer {
    async fn connect(&self) -> Result<BusStream, FireError> {
        self.endpoint
            .connect()
            .await
            .map_err(|source| FireError::Connect {
                endpoint: self.endpoint.clone(),
                source,
            })
    }
}

/// One event waiting for the writer task.
struct Job {
    tag: String,
    data: Value,
    due: Instant,
    done: oneshot::Sender<Result<(), FireError>>,
}

/// The daemon's shared event writer: a cloneable handle to the one task that
/// owns the [`EventFirer`] (one pull connection), with a bounded queue and a
/// deadline per event. Components fire replies, notifications and alerts
/// through it without waiting on each other's locks; an event the writer
/// cannot get to in time fails with [`FireError::Expired`] instead of
/// holding its caller. The task ends when the last handle is dropped, after
/// writing what is queued.
///
/// With [`Firer::with_local`], an event with one of salt-steward's own tags
/// ([`super::is_own_tag`]) is also handed to the daemon's consumers in memory
/// once the master's socket took it: that copy is the only one they act on
/// ([`super::Origin::Master`]); the bus copy proves nothing.
#[derive(Debug, Clone)]
pub struct Firer {
    tx: mpsc::Sender<Job>,
    deadline: Duration,
    local: Option<super::LocalEvents>,
}

impl Firer {
    /// Events queued for the writer at most.
    pub const QUEUE: usize = 1024;
    /// How long an event may wait for the writer, queue included.
    pub const DEADLINE: Duration = Duration::from_secs(10);

    /// Starts the writer task over `firer`; the handle and the task.
    pub fn spawn(firer: EventFirer) -> (Self, tokio::task::JoinHandle<()>) {
        Self::spawn_with(firer, Self::QUEUE, Self::DEADLINE)
    }

    /// [`Self::spawn`] with a given queue size and per-event deadline.
    pub fn spawn_with(
        firer: EventFirer,
        queue: usize,
        deadline: Duration,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (handle, task) = Self::new(firer, queue, deadline);
        (handle, tokio::spawn(task))
    }

    /// A handle and the writer task, for a caller that runs the task itself
    /// (the daemon's supervisor); the task ends when the last handle is
    /// dropped.
    pub fn new(
        mut firer: EventFirer,
        queue: usize,
        deadline: Duration,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (tx, mut rx) = mpsc::channel::<Job>(queue.max(1));
        let task = async move {
            while let Some(job) = rx.recv().await {
                let result = if Instant::now() >= job.due {
                    Err(FireError::Expired {
                        tag: job.tag,
                        deadline,
                    })
                } else {
                    // EventFirer bounds its own writes and probes; a write is
                    // never cut in the middle (that would corrupt the stream).
                    firer.fire(&job.tag, job.data).await
                };
                // The caller may have stopped waiting; nothing to tell then.
                let _ = job.done.send(result);
            }
        };
        (
            Self {
                tx,
                deadline,
                local: None,
            },
            task,
        )
    }

    /// Delivers what is fired under own tags on `local` too (see the type's docs).
    pub fn with_local(mut self, local: super::LocalEvents) -> Self {
        self.local = Some(local);
        self
    }

    /// Fires `data` (msgpack) as `tag`: `Ok` once the master's socket took
    /// it; an own tag is then delivered in memory.
    pub async fn fire_value(&self, tag: &str, data: Value) -> Result<(), FireError> {
        let local = self
            .local
            .as_ref()
            .filter(|_| super::is_own_tag(tag))
            .map(|l| (l, data.clone()));
        self.fire_value_bus_only(tag, data).await?;
        if let Some((local, mut value)) = local {
            add_stamp(&mut value, SystemTime::now());
            local.deliver(super::Event::new(tag.to_owned(), value));
        }
        Ok(())
    }

    /// Fires on the bus only: what the daemon fires on behalf of an event
    /// it cannot prove (a rule's `fire` answering a minion's event) must
    /// not come back to it as the master's.
    pub async fn fire_bus_only(&self, tag: &str, data: &Json) -> Result<(), FireError> {
        self.fire_value_bus_only(tag, super::event::from_json(data))
            .await
    }

    async fn fire_value_bus_only(&self, tag: &str, data: Value) -> Result<(), FireError> {
        check_tag(tag)?;
        let due = crate::clock::deadline(Instant::now(), self.deadline);
        let (done, answer) = oneshot::channel();
        let job = Job {
            tag: tag.to_owned(),
            data,
            due,
            done,
        };
        let expired = || FireError::Expired {
            tag: tag.to_owned(),
            deadline: self.deadline,
        };
        let stopped = || FireError::Stopped {
            tag: tag.to_owned(),
        };
        match tokio::time::timeout_at(due, self.tx.send(job)).await {
            Err(_) => return Err(expired()),
            Ok(Err(_)) => return Err(stopped()),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(due, answer).await {
            Err(_) => Err(expired()),
            Ok(Err(_)) => Err(stopped()),
            Ok(Ok(result)) => result,
        }
    }

    /// Fires JSON `data` as `tag` (see [`super::event::from_json`]).
    pub async fn fire(&self, tag: &str, data: &Json) -> Result<(), FireError> {
        self.fire_value(tag, super::event::from_json(data)).await
    }

    /// Fires an event; a failure is logged (the caller goes on).
    pub async fn fire_or_warn(&self, tag: &str, data: &Json) {
        if let Err(error) = self.fire(tag, data).await {
            warn!(message = "Event not fired.", %tag, %error);
        }
    }
}

/// Finds the framing the master's pull socket reads: fires a probe event in
/// each framing (prefixed first, the current releases' one) on a throwaway
/// connection and waits for it on the publish socket.
pub async fn probe_framing(
    pull: &BusEndpoint,
    publish: &BusEndpoint,
    timeout: Duration,
) -> Result<Framing, FireError> {
    let connect = |endpoint: &BusEndpoint| {
        let endpoint = endpoint.clone();
        async move {
            match tokio::time::timeout(timeout, endpoint.connect()).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(source)) => Err(FireError::Connect { endpoint, source }),
                Err(_) => Err(FireError::Timeout { endpoint, timeout }),
            }
        }
    };
    let mut sub = connect(publish).await?;
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    for framing in [Framing::Prefixed, Framing::Raw] {
        let nonce = probe_nonce();
        let frame = probe_frame(framing, &nonce);
        let mut conn = connect(pull).await?;
        let written = tokio::time::timeout(timeout, async {
            conn.write_all(&frame).await?;
            conn.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                return Err(FireError::Write {
                    endpoint: pull.clone(),
                    source,
                })
            }
            Err(_) => {
                return Err(FireError::Timeout {
                    endpoint: pull.clone(),
                    timeout,
                })
            }
        }
        let seen = tokio::time::timeout(PROBE_WAIT, async {
            loop {
                while let Some(decoded) = decoder.decode(&mut buf) {
                    if let Decoded::Event(e) = decoded {
                        if e.tag == PROBE_TAG && e.str_field("probe") == Some(nonce.as_str()) {
                            return true;
                        }
                    }
                }
                match sub.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {}
                }
            }
        })
        .await;
        // The throwaway connection goes: a master that could not read the
        // probe may have lost its place in that stream.
        drop(conn);
        if seen == Ok(true) {
            tracing::debug!(message = "Event bus framing probed.", pull = %pull, %framing);
            return Ok(framing);
        }
    }
    Err(FireError::Framing {
        pull: pull.clone(),
        publish: publish.clone(),
        wait: PROBE_WAIT,
    })
}

fn probe_nonce() -> String {
    let mut bytes = [0u8; 8];
    // Uniqueness only: a failed read of the system's randomness falls back to the clock.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = (nanos as u64).to_be_bytes();
    }
    crate::hex::encode(&bytes)
}

/// The probe event in `framing`; prefixed, padded until its length prefix
/// ends in 0xc1 (see the module's doc).
fn probe_frame(framing: Framing, nonce: &str) -> Vec<u8> {
    let data = |pad: usize| {
        Value::Map(vec![
            (Value::from("probe"), Value::from(nonce)),
            (Value::from("pad"), Value::from("-".repeat(pad))),
        ])
    };
    match framing {
        Framing::Raw => encode_framed(Framing::Raw, PROBE_TAG, &data(0)),
        Framing::Prefixed => {
            // Header sizes move with the lengths: search the pad that gives a
            // frame of exactly 0x1c1 bytes (there is one for any short nonce).
            let mut frame = Vec::new();
            for pad in 0..0x1c1 {
                frame = encode_framed(Framing::Prefixed, PROBE_TAG, &data(pad));
                if frame.len() >= 4 + 0x1c1 {
                    break;
                }
            }
            frame
        }
    }
}

/// Refuses tags the master would drop or split wrongly.
pub fn check_tag(tag: &str) -> Result<(), FireError> {
    let reason = if tag.is_empty() {
        "empty"
    } else if tag.contains("\n\n") {
        "contains the tag/data separator \\n\\n"
    } else if tag.len() > 4096 {
        "longer than 4096 bytes"
    } else {
        return Ok(());
    };
    Err(FireError::InvalidTag {
        tag: tag.chars().take(80).collect(),
        reason,
    })
}

/// Adds `_stamp` (UTC, `YYYY-MM-DDTHH:MM:SS.ffffff`) to a map that has none,
/// as `salt.utils.event.SaltEvent.fire_event` does.
pub fn add_stamp(data: &mut Value, now: SystemTime) {
    if let Value::Map(entries) = data {
        if !entries
            .iter()
            .any(|(k, _)| super::event::as_str(k) == Some("_stamp"))
        {
            entries.push((Value::from("_stamp"), Value::from(salt_stamp(now))));
        }
    }
}

/// Formats a time as Salt's `_stamp` (`datetime.utcnow().isoformat()`).
pub fn salt_stamp(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads every frame written to a unix listener at `path`.
    async fn collect(listener: tokio::net::UnixListener, want: usize) -> Vec<super::super::Event> {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        while seen.len() < want {
            while let Some(d) = dec.decode(&mut buf) {
                if let Decoded::Event(e) = d {
                    seen.push(e);
                }
            }
            if seen.len() < want && conn.read_buf(&mut buf).await.unwrap() == 0 {
                break;
            }
        }
        seen
    }

    #[tokio::test]
    async fn the_shared_firer_writes_every_handles_events_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pull.ipc");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let firer = EventFirer::with_framing(BusEndpoint::Unix(path), Framing::Prefixed);
        let (handle, writer) = Firer::spawn(firer);
        let reader = tokio::spawn(collect(listener, 300));
        let senders: Vec<_> = (0..3)
            .map(|k| {
                let h = handle.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        h.fire(&format!("t/{k}"), &serde_json::json!({"i": i}))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for s in senders {
            s.await.unwrap();
        }
        drop(handle);
        writer.await.unwrap();
        let seen = reader.await.unwrap();
        assert_eq!(seen.len(), 300);
        for k in 0..3 {
            let mine: Vec<_> = seen
                .iter()
                .filter(|e| e.tag == format!("t/{k}"))
                .map(|e| e.field("i").and_then(Value::as_u64).unwrap())
                .collect();
            assert_eq!(mine, (0..100).collect::<Vec<u64>>(), "handle {k}");
        }
    }

    #[tokio::test]
    async fn an_event_the_writer_cannot_get_to_expires_instead_of_waiting() {
        // A master that accepts the connection but never reads: the first
        // large event fills the socket and holds the writer (up to its own
        // write timeout); the events behind it expire at their deadline.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pull.ipc");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let accepted = tokio::spawn(async move { listener.accept().await.unwrap() });
        let firer = EventFirer::with_framing(BusEndpoint::Unix(path), Framing::Prefixed);
        let (handle, _writer) = Firer::spawn_with(firer, 4, Duration::from_millis(200));
        let big = Value::Binary(vec![0; 8 * 1024 * 1024]);
        let blocker = {
            let h = handle.clone();
            tokio::spawn(async move {
                h.fire_value("big", Value::Map(vec![("b".into(), big)]))
                    .await
            })
        };
        let _conn = accepted.await.unwrap();
        let r = handle.fire("small", &serde_json::json!({})).await;
        assert!(matches!(r, Err(FireError::Expired { .. })), "{r:?}");
        let r = blocker.await.unwrap();
        assert!(matches!(r, Err(FireError::Expired { .. })), "{r:?}");
        // Bad tags are refused before queueing.
        let r = handle.fire("a\n\nb", &serde_json::json!({})).await;
        assert!(matches!(r, Err(FireError::InvalidTag { .. })), "{r:?}");
    }

    #[test]
    fn stamp_looks_like_salts() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_422_653_095_846);
        assert_eq!(salt_stamp(t), "2026-11-23T08:30:53.095846");
        assert_eq!(
            salt_stamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000"
        );
    }

    #[test]
    fn stamp_is_added_only_to_maps_without_one() {
        let t = SystemTime::UNIX_EPOCH;
        let mut m = Value::Map(vec![]);
        add_stamp(&mut m, t);
        assert_eq!(m.as_map().map(Vec::len), Some(1));
        add_stamp(&mut m, t);
        assert_eq!(m.as_map().map(Vec::len), Some(1));
        let mut list = Value::Array(vec![]);
        add_stamp(&mut list, t);
        assert_eq!(list, Value::Array(vec![]));
    }

    #[test]
    fn the_prefixed_probe_length_ends_in_a_byte_msgpack_never_uses() {
        let frame = probe_frame(Framing::Prefixed, "0123456789abcdef");
        assert_eq!(&frame[..4], &[0, 0, 0x01, 0xc1]);
        assert_eq!(frame.len(), 4 + 0x1c1);
        let mut buf = BytesMut::from(&frame[..]);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        match dec.decode(&mut buf) {
            Some(Decoded::Event(e)) => {
                assert_eq!(e.tag, PROBE_TAG);
                assert_eq!(e.str_field("probe"), Some("0123456789abcdef"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(dec.framing(), Some(Framing::Prefixed));
    }

    #[test]
    fn tags_the_master_would_drop_are_refused() {
        assert!(check_tag("").is_err());
        assert!(check_tag("a\n\nb").is_err());
        assert!(check_tag(&"x".repeat(5000)).is_err());
        assert!(check_tag("steward/v1/server/create").is_ok());
    }
}
