//! The master's request server (`ret_port`), spoken natively over ZeroMQ.
//!
//! Clear requests `{"enc": "clear", "load": {...}}` authenticated with the
//! master's own key file `<cachedir>/.<user>_key`, as Salt's `LocalClient`,
//! `WheelClient` and `RunnerClient` send them (salt-protocol.md §3). One
//! DEALER socket carries many requests at once: each goes out as
//! `[corr_id, "", payload]`, the master's REP workers echo the envelope, and a
//! reader task hands each reply to its caller. The master's `worker_threads`
//! caps how many run in parallel.
//!
//! The pure-Rust `zeromq` crate does not reconnect on its own, so a
//! connection that fails or goes silent is dropped and the next request opens
//! a new one. Errors are distinct: master down, authentication refused,
//! request refused by the master, timeout.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rmpv::Value;
use tokio::sync::{oneshot, Mutex};
use zeromq::{Socket as _, SocketRecv as _, SocketSend as _, ZmqMessage};

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
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

struct Conn {
    send: zeromq::DealerSendHalf,
    pending: Pending,
    reader: tokio::task::JoinHandle<()>,
    generation: u64,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
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
    conn: Mutex<Option<Conn>>,
    next_id: AtomicU64,
    generation: AtomicU64,
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
    /// A client for the master described by `master`, with a per-request timeout.
    pub fn new(master: &MasterConfig, timeout: Duration) -> Self {
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
        Self::with_key_file(
            addr,
            master.cachedir.join(format!(".{}_key", master.user)),
            master.user.clone(),
            timeout,
        )
    }

    /// A client for `addr` (host:port) using an explicit key file.
    pub fn with_key_file(addr: String, key_file: PathBuf, user: String, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                uri: format!("tcp://{addr}"),
                addr,
                key_file,
                user,
                timeout,
                key: std::sync::Mutex::new(None),
                conn: Mutex::new(None),
                next_id: AtomicU64::new(1),
                generation: AtomicU64::new(0),
            }),
        }
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
        let mut payload = Vec::with_capacity(256);
        // Writing into a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut payload, &envelope);

        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let generation = {
            let mut guard = self.inner.conn.lock().await;
            if guard.is_none() {
                *guard = Some(self.connect().await?);
            }
            let Some(conn) = guard.as_mut() else {
                return Err(self.down("no connection"));
            };
            conn.pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id, tx);
            let frames = vec![
                Bytes::copy_from_slice(&id.to_be_bytes()),
                Bytes::new(),
                Bytes::from(payload),
            ];
            let msg = ZmqMessage::try_from(frames)
                .map_err(|e| RequestError::BadReply(format!("building request: {e}")))?;
            let sent = tokio::time::timeout(self.inner.timeout, conn.send.send(msg)).await;
            match sent {
                Ok(Ok(())) => conn.generation,
                Ok(Err(e)) => {
                    *guard = None;
                    return Err(self.down(&format!("send failed: {e}")));
                }
                Err(_) => {
                    *guard = None;
                    return Err(self.down_or_timeout().await);
                }
            }
        };

        match tokio::time::timeout(self.inner.timeout, rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(reason))) => Err(RequestError::BadReply(reason)),
            // The reader ended: the connection is gone.
            Ok(Err(_)) => {
                self.drop_conn(generation).await;
                Err(self.down("connection lost"))
            }
            Err(_) => {
                self.forget(id).await;
                // A silent connection may be one to a master that restarted
                // (the zeromq crate does not notice): start afresh next time.
                self.drop_conn(generation).await;
                Err(self.down_or_timeout().await)
            }
        }
    }

    async fn forget(&self, id: u64) {
        if let Some(conn) = self.inner.conn.lock().await.as_ref() {
            conn.pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
        }
    }

    async fn drop_conn(&self, generation: u64) {
        let mut guard = self.inner.conn.lock().await;
        if guard.as_ref().is_some_and(|c| c.generation == generation) {
            *guard = None;
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

    async fn connect(&self) -> Result<Conn, RequestError> {
        let mut socket = zeromq::DealerSocket::new();
        match tokio::time::timeout(self.inner.timeout, socket.connect(&self.inner.uri)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.down(&e.to_string())),
            Err(_) => return Err(self.down("connect timed out")),
        }
        let (send, mut recv) = socket.split();
        let pending: Pending = Arc::default();
        let for_reader = pending.clone();
        let reader = tokio::spawn(async move {
            loop {
                let Ok(msg) = recv.recv().await else {
                    break;
                };
                deliver(&for_reader, msg);
            }
            // Dropping the senders tells every waiter the connection is gone.
            for_reader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        });
        Ok(Conn {
            send,
            pending,
            reader,
            generation: self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }
}

/// Hands a reply `[corr_id, "", body]` to its waiter.
fn deliver(pending: &Pending, msg: ZmqMessage) {
    let frames = msg.into_vec();
    let (Some(id), Some(body)) = (frames.first(), frames.last()) else {
        return;
    };
    let Ok(id) = <[u8; 8]>::try_from(id.as_ref()) else {
        return;
    };
    let id = u64::from_be_bytes(id);
    let waiter = pending
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&id);
    if let Some(waiter) = waiter {
        let reply = decode_reply(body);
        let _ = waiter.send(reply);
    }
}

/// Decodes a reply and removes the `{"enc": "clear", "load": …}` wrapper.
pub fn decode_reply(body: &[u8]) -> Result<Value, String> {
    let value = rmpv::decode::read_value_with_max_depth(&mut &body[..], 512)
        .map_err(|e| format!("reply is not msgpack: {e}"))?;
    if map_get(&value, "enc").is_some() {
        if let Some(load) = map_get(&value, "load") {
            return Ok(load.clone());
        }
    }
    Ok(value)
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
