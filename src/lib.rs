//! salt-steward: a daemon beside a salt-master that turns Salt into a
//! server-management system. See `ARCHITECTURE.md` for the data flow.
//!
//! Layout:
//! - [`master_config`]: reads the salt-master's own config (paths, ports, ipc mode).
//! - [`config`]: the daemon's config file (every number range-checked).
//! - [`clock`]: deadline arithmetic that saturates instead of panicking.
//! - [`bus`]: the master's event bus — decode, subscribe, fire.
//! - [`salt`]: the master's request server (publish, wheel, runner) and job tracking.
//! - [`registry`]: server models, servers and the outbox of their changes (SQLite or PostgreSQL).
//! - [`rules`]: reactor rules from YAML files, hot-reloaded (match, render, run, report).
//! - [`lifecycle`]: a server's key across registry, key files and master (rekey, retire, bundle).
//! - [`api`]: inbound requests (the registry on the bus: parse, receipts, serve; the HTTP API).
//! - [`exec`]: exec translation: a function run on a server named in the registry, allow-listed, recorded.
//! - [`dispatch`]: intent into Salt actions (acceptor, outbox notifier, inventory dispatcher).
//! - [`daemon`]: the long-running process: a supervisor of named components, signals.
//! - [`telemetry`]: logging and the one place each occurrence is logged.
//! - [`cli`]: the command line.

pub mod api;
pub mod bus;
pub mod cli;
pub(crate) mod clock;
pub mod config;
pub(crate) mod daemon;
pub(crate) mod dispatch;
pub(crate) mod exec;
pub(crate) mod hex;
pub(crate) mod lifecycle;
pub mod master_config;
pub mod pki;
pub mod registry;
pub mod rules;
pub mod salt;
pub(crate) mod telemetry;
