//! The master's event bus (capability 1): decoding, subscribing, firing.
//!
//! - [`codec`]: the byte stream ↔ frames (check-then-parse, bounded, resyncs).
//! - [`event`]: an event's tag and data, and typed views of those we act on.
//! - [`subscriber`]: one reader task per daemon; fans events out through a
//!   bounded broadcast queue so the socket is never held up by a slow consumer;
//!   reconnects with backoff and says so.
//! - [`publisher`]: fires events into the master's pull socket.
//! - [`origin`]: who produced an event ([`Origin`]): only what this process
//!   made and handed over in memory ([`LocalEvents`]) is the master's.
//! - `log`: how the bus's occurrences are logged.

pub mod codec;
pub mod event;
mod log;
pub mod origin;
pub mod publisher;
pub mod subscriber;

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::{TcpStream, UnixStream};

pub use event::{Event, EventKind};
pub use origin::{is_own_tag, LocalEvents, Origin};
pub use publisher::{EventFirer, FireError, Firer};
pub use subscriber::{BusHandle, BusItem, BusStats, SubscriberOptions, Subscription};

/// One end of the bus: a unix socket under `sock_dir`, or TCP on loopback
/// when the master runs with `ipc_mode: tcp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEndpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for BusEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// A connected bus socket of either kind.
pub(crate) type BusStream = tokio_util::either::Either<UnixStream, TcpStream>;

impl BusEndpoint {
    /// Opens a connection. A stale socket file gives `ConnectionRefused`
    /// until the master listens again, so callers retry rather than test files.
    pub(crate) async fn connect(&self) -> std::io::Result<BusStream> {
        Ok(match self {
            Self::Unix(path) => tokio_util::either::Either::Left(UnixStream::connect(path).await?),
            Self::Tcp(addr) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                tokio_util::either::Either::Right(s)
            }
        })
    }
}
