//! Turning intent into Salt actions and notifications: the acceptor
//! (verified keys accepted, stale ones retired, presence, first-start
//! states), the outbox notifier and the inventory dispatcher; next exec.
//!
//! - [`accept`]: the acceptor component.
//! - [`notify`]: the outbox notifier component.
//! - [`inventory`]: the inventory dispatcher component (states applied when
//!   the inventory changes).
//! - [`share`]: the `share` targets' pillar (samba shares, hashes encrypted
//!   for the minion).
//! - [`backup`]: the backup targets' pillars and what their reports teach.

pub mod accept;
pub mod backup;
pub mod cluster;
pub mod inventory;
pub mod notify;
pub mod share;
