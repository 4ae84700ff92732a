//! One integration-test binary (one link step): every capability's tests,
//! against a real salt-master started by `support::salt`.

// Test code fails by panicking; the lints against it guard the daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod accept;
mod backups;
mod bench_backup;
mod bench_cluster;
mod bench_dispatch;
mod browser;
mod bus_fake_publisher;
mod bus_salt;
mod cli;
mod cluster;
mod daemon;
mod dispatch;
mod doctor;
mod exec;
mod failover;
mod forward_bus;
mod http_api;
mod job_reconcile;
mod metrics;
mod multi_master;
mod pki;
mod reconcile;
mod registry;
mod reload;
mod rules;
mod salt_client;
mod shares;
mod states;
mod states_backup;
mod states_share;
mod support;
mod transport_tcp;
mod trust;
