//! The master's request server (`ret_port`), spoken natively.
//!
//! Clear requests `{"enc": "clear", "load": {...}}` authenticated with the
//! master's own key file `<cachedir>/.<user>_key`, as Salt's `LocalClient`,
//! `WheelClient` and `RunnerClient` send them (salt-protocol.md §3). Two
//! transports, as the master's `transport` setting says:
//!
//! - **ZeroMQ** (the default): Salt's own clients send exactly `["",
//!   payload]` on a REQ-like socket and get `["", reply]` back. Salt 3008's
//!   pooled request device reads the payload from frame 2 of what its ROUTER
//!   receives, so nothing may go in front of it: there is no room for a
//!   correlation frame. Many requests are kept in flight by a pool of DEALER
//!   sockets with one request on each; a socket whose request timed out is
//!   dropped (its late reply must not be taken for the next request's), and
//!   every socket older than the timeout with it (a master restart leaves
//!   them all silent: the `zeromq` crate does not reconnect on its own).
//! - **TCP** (`transport: tcp`): one connection carrying msgpack frames
//!   `{"head": {"mid": N}, "body": envelope}`; the reply echoes the head, so
//!   `mid` correlates and many requests share the connection.
//!
//! The master's `worker_threads` caps how many requests run in parallel.
//! Errors are distinct: master down, authentication refused, request refused
//! by the master, timeout.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rmpv::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Mutex, Semaphore};
use zeromq::{Socket as _, SocketRecv as _, SocketSend as _, ZmqMessage};

use crate::bus::codec::object_len;
use crate::bus::event::{as_str, map_get};
use crate::master_config::MasterConfig;
/// Why a request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Nothing listens on the request port, or the connection broke.
    #[error("salt-master not reachable at {uri}: {reason}")]
    MasterDown { uri: String, reason: String },
    /// The master refused our key (after re-reading it once).
    #[error("salt-master at {uri} refused authentication ({name}): check that {key_file} is the master's current key and readable by this user")]
    AuthRejected {
        uri: String,
        name: String,
        key_file: PathBuf,
    },
    /// The master answered with an error.
    #[error("salt-master refused the request: {name}: {message}")]
    Refused { name: String, message: String },
    /// The master is reachable but did not answer in time.
    #[error("salt-master at {uri} did not answer within {timeout:?}")]
    Timeout { uri: String, timeout: Duration },
    /// The key file could not be read.
    #[error("cannot read the master key {path}: {source}")]
    Key {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The reply was not msgpack, or not the shape expected.
    #[error("unexpected reply from salt-master: {0}")]
    BadReply(String),
    /// The master is configured in a way we do not speak.
    #[error("unsupported salt-master configuration: {0}")]
    Unsupported(String),
}

/// Most ZeroMQ sockets kept open to the master (each carries one request at a
/// time). More than the master's `worker_threads` only queues at the master.
pub const DEFAULT_MAX_SOCKETS: usize = 32;

/// Which request channel the master speaks (its `transport` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `transport: zeromq`, the default.
    Zeromq,
    /// `transport: tcp`: Salt's plain TCP framing.
    Tcp,
}

impl Transport {
    /// From the master config's `transport` value; `None` for one we do not speak.
    pub fn from_master(name: &str) -> Option<Self> {
        match name {
            "zeromq" | "" => Some(Self::Zeromq),
            "tcp" => Some(Self::Tcp),
            _ => None,
        }
    }
}

/// How one round trip failed, before it is told apart as down/timeout.
enum Failure {
    /// The connection could not be made or broke.
    Down(String),
    /// Nothing came back within the timeout.
    Silent,
    /// Something came back that is not a reply.
    Bad(String),
}

/// A client of the master's request server; cheap to clone, safe to share.
#[derive(Clone)]
pub struct ReqClient {
    inner: Arc<Inner>,
}

struct Inner {
    uri: String,
    addr: String,
    key_file: PathBuf,
    user: String,
    timeout: Duration,
    key: std::sync::Mutex<Option<String>>,
    channel: Channel,
}

enum Channel {
    Zmq(ZmqPool),
    Tcp(TcpChannel),
}

impl std::fmt::Debug for ReqClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ReqClient")
            .field("uri", &self.inner.uri)
            .field("key_file", &self.inner.key_file)
            .finish_non_exhaustive()
    }
}

impl ReqClient {
    /// A client for the master described by `master`, with a per-request
    /// timeout. A `transport` we do not speak is an error naming it.
    pub fn new(master: &MasterConfig, timeout: Duration) -> Result<Self, RequestError> {
        let transport = Transport::from_master(&master.transport).ok_or_else(|| {
            RequestError::Unsupported(format!(
                "{}: transport {:?} (salt-steward speaks zeromq and tcp)",
                master.path.display(),
                master.transport
            ))
        })?;
        let host = match master.interface.as_str() {
            "0.0.0.0" | "" => "127.0.0.1".to_owned(),
            "::" => "::1".to_owned(),
            other => other.to_owned(),
        };
        let addr = if host.contains(':') {
            format!("[{host}]:{}", master.ret_port)
        } else {
            format!("{host}:{}", master.ret_port)
        };
        Ok(Self::with_key_file(
            addr,
            transport,
            master.cachedir.join(format!(".{}_key", master.user)),
            master.user.clone(),
            timeout,
        ))
    }

    /// A client for `addr` (host:port) using an explicit key file.
    pub fn with_key_file(
        addr: String,
        transport: Transport,
        key_file: PathBuf,
        user: String,
        timeout: Duration,
    ) -> Self {
        let uri = format!("tcp://{addr}");
        let channel = match transport {
            Transport::Zeromq => Channel::Zmq(ZmqPool::new(uri.clone(), DEFAULT_MAX_SOCKETS)),
            Transport::Tcp => Channel::Tcp(TcpChannel::new(addr.clone())),
        };
        Self {
            inner: Arc::new(Inner {
                uri,
                addr,
                key_file,
                user,
                timeout,
                key: std::sync::Mutex::new(None),
                channel,
            }),
        }
    }

    /// The master restarted (its bus reconnected): pooled ZeroMQ sockets
    /// to the old process are dropped, so the next request connects afresh
    /// instead of waiting out its timeout on a dead peer.
    pub fn reset(&self) {
        if let Channel::Zmq(pool) = &self.inner.channel {
            pool.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The master's request server (`tcp://host:port`), for errors.
    pub fn uri(&self) -> &str {
        &self.inner.uri
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The user requests are made as (the master's user).
    pub fn user(&self) -> &str {
        &self.inner.user
    }

    /// `cmd: ping`: the master echoes the load. Ready means this answers.
    pub async fn ping(&self) -> Result<(), RequestError> {
        let load = Value::Map(vec![(Value::from("cmd"), Value::from("ping"))]);
        self.send_clear(load).await.map(|_| ())
    }

    /// Sends an authenticated clear load (`key` and `user` are added here) and
    /// returns the reply with the `enc/load` wrapper removed. An
    /// authentication error makes the client re-read the key file and retry
    /// once (Salt 3006 writes a new key at every master start).
    pub async fn request(
        &self,
        load: Vec<(Value, Value)>,
        with_user: bool,
    ) -> Result<Value, RequestError> {
        let mut reloaded = false;
        loop {
            let key = self.key(reloaded)?;
            let mut l = load.clone();
            l.push((Value::from("key"), Value::from(key)));
            if with_user {
                l.push((Value::from("user"), Value::from(self.inner.user.as_str())));
            }
            let reply = self.send_clear(Value::Map(l)).await?;
            match reply_error(&reply) {
                Some((name, _)) if name.contains("AuthenticationError") && !reloaded => {
                    reloaded = true;
                }
                Some((name, _)) if name.contains("AuthenticationError") => {
                    return Err(RequestError::AuthRejected {
                        uri: self.inner.uri.clone(),
                        name,
                        key_file: self.inner.key_file.clone(),
                    })
                }
                Some((name, message)) => return Err(RequestError::Refused { name, message }),
                None => return Ok(reply),
            }
        }
    }

    fn key(&self, reload: bool) -> Result<String, RequestError> {
        let mut cached = self
            .inner
            .key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if reload || cached.is_none() {
            let text = std::fs::read_to_string(&self.inner.key_file).map_err(|source| {
                RequestError::Key {
                    path: self.inner.key_file.clone(),
                    source,
                }
            })?;
            *cached = Some(text.trim().to_owned());
        }
        Ok(cached.clone().unwrap_or_default())
    }

    /// Sends `{"enc": "clear", "load": load}` and waits for its reply.
    async fn send_clear(&self, load: Value) -> Result<Value, RequestError> {
        let envelope = Value::Map(vec![
            (Value::from("enc"), Value::from("clear")),
            (Value::from("load"), load),
            (Value::from("version"), Value::from(3)),
        ]);
        let timeout = self.inner.timeout;
        let outcome = match &self.inner.channel {
            Channel::Zmq(pool) => pool.round_trip(&envelope, timeout).await,
            Channel::Tcp(tcp) => tcp.round_trip(envelope, timeout).await,
        };
        match outcome {
            Ok(reply) => Ok(reply),
            Err(Failure::Down(reason)) => Err(self.down(&reason)),
            Err(Failure::Bad(reason)) => Err(RequestError::BadReply(reason)),
            Err(Failure::Silent) => Err(self.down_or_timeout().await),
        }
    }

    fn down(&self, reason: &str) -> RequestError {
        RequestError::MasterDown {
            uri: self.inner.uri.clone(),
            reason: reason.to_owned(),
        }
    }

    /// After a silence: is anything listening at all? Tells a stopped master
    /// from a slow one.
    async fn down_or_timeout(&self) -> RequestError {
        let probe = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(&self.inner.addr),
        )
        .await;
        match probe {
            Ok(Ok(_)) => RequestError::Timeout {
                uri: self.inner.uri.clone(),
                timeout: self.inner.timeout,
            },
            Ok(Err(e)) => self.down(&e.to_string()),
            Err(_) => self.down("TCP connect timed out"),
        }
    }
}

/// How long a socket may wait in the pool. Salt 3006.30 and 3008 masters
/// send a heartbeat PING every `zmq_heartbeat_ivl` (10 s) and close a
/// connection that answers nothing within `zmq_heartbeat_timeout` (30 s); a
/// pooled socket answers only while a request uses it (vendor/zeromq), so
/// one idle for longer than this is closed here first.
const MAX_IDLE: Duration = Duration::from_secs(15);

/// A pooled socket: the epoch it was made in, when it was last used.
type IdleSocket = (u64, std::time::Instant, zeromq::DealerSocket);

/// ZeroMQ sockets to the master, one request on each at a time.
struct ZmqPool {
    uri: String,
    /// Connected sockets waiting for a request.
    idle: std::sync::Mutex<Vec<IdleSocket>>,
    /// Bounds the sockets (idle or busy).
    slots: Semaphore,
    /// Bumped when a request goes unanswered: sockets from an older epoch may
    /// be connections to a master that is gone, and are not reused.
    epoch: AtomicU64,
}

impl ZmqPool {
    fn new(uri: String, max_sockets: usize) -> Self {
        Self {
            uri,
            idle: std::sync::Mutex::new(Vec::new()),
            slots: Semaphore::new(max_sockets.clamp(1, Semaphore::MAX_PERMITS)),
            epoch: AtomicU64::new(0),
        }
    }

    fn take_idle(&self) -> Option<(u64, zeromq::DealerSocket)> {
        let current = self.epoch.load(Ordering::Acquire);
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Sockets of an older epoch, or idle too long, are dropped (closed) here.
        idle.retain(|(epoch, used, _)| *epoch == current && used.elapsed() < MAX_IDLE);
        idle.pop().map(|(epoch, _, socket)| (epoch, socket))
    }

    fn put_back(&self, epoch: u64, socket: zeromq::DealerSocket) {
        if epoch == self.epoch.load(Ordering::Acquire) {
            self.idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((epoch, std::time::Instant::now(), socket));
        }
    }

    async fn connect(&self, timeout: Duration) -> Result<zeromq::DealerSocket, Failure> {
        let mut socket = zeromq::DealerSocket::new();
        match tokio::time::timeout(timeout, socket.connect(&self.uri)).await {
            Ok(Ok(())) => Ok(socket),
            Ok(Err(e)) => Err(Failure::Down(e.to_string())),
            Err(_) => Err(Failure::Down("connect timed out".to_owned())),
        }
    }

    /// One request on one socket: `["", payload]` out, `["", reply]` back.
    async fn round_trip(&self, envelope: &Value, timeout: Duration) -> Result<Value, Failure> {
        let mut payload = Vec::with_capacity(256);
        // Writing into a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut payload, envelope);
        // The wait for a free socket is local queueing, not the master's time.
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Failure::Down("client closed".to_owned()))?;
        let (epoch, mut socket) = match self.take_idle() {
            Some(s) => s,
            None => {
                let epoch = self.epoch.load(Ordering::Acquire);
                (epoch, self.connect(timeout).await?)
            }
        };
        let msg = ZmqMessage::try_from(vec![Bytes::new(), Bytes::from(payload)])
            .map_err(|e| Failure::Bad(format!("building request: {e}")))?;
        let exchange = async {
            socket
                .send(msg)
                .await
                .map_err(|e| Failure::Down(format!("send failed: {e}")))?;
            socket
                .recv()
                .await
                .map_err(|e| Failure::Down(format!("connection lost: {e}")))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(reply)) => {
                let frames = reply.into_vec();
                let body = frames.last().cloned().unwrap_or_default();
                self.put_back(epoch, socket);
                decode_reply(&body).map_err(Failure::Bad)
            }
            // A broken socket is dropped; the others may be fine.
            Ok(Err(failure)) => Err(failure),
            Err(_) => {
                // Its late reply must not reach another request, and a silent
                // master may have restarted: start afresh with every socket.
                self.epoch.fetch_add(1, Ordering::AcqRel);
                Err(Failure::Silent)
            }
        }
    }
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// `transport: tcp`: one connection, requests correlated by `head.mid`.
struct TcpChannel {
    addr: String,
    conn: Mutex<Option<TcpConn>>,
    next_mid: AtomicU64,
    generation: AtomicU64,
}

struct TcpConn {
    write: tokio::net::tcp::OwnedWriteHalf,
    pending: Pending,
    reader: tokio::task::JoinHandle<()>,
    generation: u64,
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Largest reply frame taken from a TCP master (a `key.list_all` of many
/// thousands of keys fits easily).
const MAX_TCP_REPLY: usize = 256 * 1024 * 1024;

impl TcpChannel {
    fn new(addr: String) -> Self {
        Self {
            addr,
            conn: Mutex::new(None),
            next_mid: AtomicU64::new(1),
            generation: AtomicU64::new(0),
        }
    }

    async fn round_trip(&self, envelope: Value, timeout: Duration) -> Result<Value, Failure> {
        let mid = self.next_mid.fetch_add(1, Ordering::Relaxed);
        let frame = Value::Map(vec![
            (
                Value::from("head"),
                Value::Map(vec![(Value::from("mid"), Value::from(mid))]),
            ),
            (Value::from("body"), envelope),
        ]);
        let mut bytes = Vec::with_capacity(256);
        let _ = rmpv::encode::write_value(&mut bytes, &frame);
        let (tx, rx) = oneshot::channel();
        let generation = {
            let mut guard = self.conn.lock().await;
            if guard.is_none() {
                *guard = Some(self.connect(timeout).await?);
            }
            let Some(conn) = guard.as_mut() else {
                return Err(Failure::Down("no connection".to_owned()));
            };
            conn.pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(mid, tx);
            match tokio::time::timeout(timeout, conn.write.write_all(&bytes)).await {
                Ok(Ok(())) => conn.generation,
                Ok(Err(e)) => {
                    *guard = None;
                    return Err(Failure::Down(format!("send failed: {e}")));
                }
                Err(_) => {
                    *guard = None;
                    return Err(Failure::Silent);
                }
            }
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(reason))) => Err(Failure::Bad(reason)),
            Ok(Err(_)) => {
                self.drop_conn(generation).await;
                Err(Failure::Down("connection lost".to_owned()))
            }
            Err(_) => {
                self.forget(mid).await;
                self.drop_conn(generation).await;
                Err(Failure::Silent)
            }
        }
    }

    async fn forget(&self, mid: u64) {
        if let Some(conn) = self.conn.lock().await.as_ref() {
            conn.pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&mid);
        }
    }

    async fn drop_conn(&self, generation: u64) {
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_some_and(|c| c.generation == generation) {
            *guard = None;
        }
    }

    async fn connect(&self, timeout: Duration) -> Result<TcpConn, Failure> {
        let stream =
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&self.addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(Failure::Down(e.to_string())),
                Err(_) => return Err(Failure::Down("connect timed out".to_owned())),
            };
        let _ = stream.set_nodelay(true);
        let (mut read, write) = stream.into_split();
        let pending: Pending = Arc::default();
        let for_reader = pending.clone();
        let reader = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            'read: loop {
                match read.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                loop {
                    match object_len(&buf, MAX_TCP_REPLY) {
                        Ok(None) => break,
                        Ok(Some(len)) => {
                            let frame = buf.split_to(len);
                            deliver_tcp(&for_reader, &frame);
                        }
                        // Out of step: nothing after this can be trusted.
                        Err(_) => break 'read,
                    }
                }
            }
            // Dropping the senders tells every waiter the connection is gone.
            for_reader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        });
        Ok(TcpConn {
            write,
            pending,
            reader,
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }
}

/// Hands a TCP reply frame `{"head": {"mid"}, "body"}` to its waiter.
fn deliver_tcp(pending: &Pending, frame: &[u8]) {
    let Ok(value) = rmpv::decode::read_value_with_max_depth(&mut &frame[..], 512) else {
        return;
    };
    let Some(mid) = map_get(&value, "head")
        .and_then(|h| map_get(h, "mid"))
        .and_then(Value::as_u64)
    else {
        return;
    };
    let waiter = pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&mid);
    if let Some(waiter) = waiter {
        let reply = match map_get(&value, "body") {
            Some(body) => Ok(unwrap_clear(body.clone())),
            None => Err("reply frame has no body".to_owned()),
        };
        let _ = waiter.send(reply);
    }
}

/// Removes the `{"enc": "clear", "load": …}` wrapper of a decoded reply.
fn unwrap_clear(value: Value) -> Value {
    if map_get(&value, "enc").is_some() {
        if let Some(load) = map_get(&value, "load") {
            return load.clone();
        }
    }
    value
}

/// Decodes a reply and removes the `{"enc": "clear", "load": …}` wrapper.
pub fn decode_reply(body: &[u8]) -> Result<Value, String> {
    let value = rmpv::decode::read_value_with_max_depth(&mut &body[..], 512)
        .map_err(|e| format!("reply is not msgpack: {e}"))?;
    Ok(unwrap_clear(value))
}

/// `{"error": {"name", "message"}}` as the master sends it, possibly inside
/// `load` or `data` (wheel replies).
fn reply_error(reply: &Value) -> Option<(String, String)> {
    let err = map_get(reply, "error")
        .or_else(|| map_get(reply, "data").and_then(|d| map_get(d, "error")))?;
    match err {
        Value::Map(_) => Some((
            map_get(err, "name")
                .and_then(as_str)
                .unwrap_or("Error")
                .to_owned(),
            map_get(err, "message")
                .and_then(as_str)
                .unwrap_or_default()
                .to_owned(),
        )),
        other => as_str(other).map(|s| ("Error".to_owned(), s.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    #[test]
    fn wrapped_replies_are_unwrapped_and_errors_found() {
        let wrapped = Value::Map(vec![
            (Value::from("enc"), Value::from("clear")),
            (
                Value::from("load"),
                Value::Map(vec![(Value::from("jid"), Value::from("1"))]),
            ),
        ]);
        let got = decode_reply(&pack(&wrapped)).unwrap();
        assert_eq!(map_get(&got, "jid").and_then(as_str), Some("1"));

        let err = Value::Map(vec![(
            Value::from("error"),
            Value::Map(vec![
                (Value::from("name"), Value::from("AuthenticationError")),
                (
                    Value::from("message"),
                    Value::from("Authentication error occurred."),
                ),
            ]),
        )]);
        let got = decode_reply(&pack(&err)).unwrap();
        assert_eq!(
            reply_error(&got),
            Some((
                "AuthenticationError".into(),
                "Authentication error occurred.".into()
            ))
        );
        assert!(decode_reply(&[0x92, 0x01]).is_err(), "truncated array");
        assert!(decode_reply(&[]).is_err(), "empty");
    }
}
