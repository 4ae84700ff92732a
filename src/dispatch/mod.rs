//! Turning intent into Salt actions and notifications: the acceptor
//! (verified keys accepted, stale ones retired, presence, first-start
//! states) and the outbox notifier; next the inventory and exec.
//!
//! - [`accept`]: the acceptor component.
//! - [`notify`]: the outbox notifier component.

pub mod accept;
pub mod notify;
