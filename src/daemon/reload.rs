//! SIGHUP: the config file is read again and what can change while the
//! daemon runs is applied — `log.level` (unless `RUST_LOG` fixes it),
//! `trusted_minions` and the `exec` allow-list (the request server reads
//! them at each request) and `rules_dir`. Every SIGHUP is passed on to the
//! rules, which reload from the directory named then. A file that does not
//! load (syntax, range) changes nothing (the rules still reload from their
//! directory); settings only taken at start that changed are named in the
//! log.

use std::path::PathBuf;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::server::{Policy, PolicyHandle};
use crate::config::Settings;
use crate::exec::ExecPolicy;

/// The request server's policy from `settings`.
pub fn policy_of(settings: &Settings) -> anyhow::Result<Policy> {
    Ok(Policy {
        trusted: settings.trusted_minions.iter().cloned().collect(),
        exec: ExecPolicy::new(&settings.exec.master, &settings.exec.minions)
            .map_err(anyhow::Error::msg)?,
        exec_timeout: std::time::Duration::from_secs(settings.exec.timeout),
    })
}

/// Reloads on each SIGHUP (`reload` counts them) until `cancel`; after each,
/// asks the rules to reload through `rules`, with the rules directory in
/// force.
/// `current` are the settings the daemon started with; `master_config` is
/// kept when it came from the command line.
pub async fn run(
    mut current: Settings,
    master_from_cli: Option<PathBuf>,
    mut reload: watch::Receiver<u64>,
    policy: PolicyHandle,
    rules: watch::Sender<PathBuf>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = reload.changed() => if changed.is_err() {
                // No more signals can come.
                cancel.cancelled().await;
                return;
            },
        }
        apply(&mut current, master_from_cli.as_deref(), &policy);
        rules.send_replace(current.rules_dir.clone());
    }
}

/// Reads the config file again and applies what can change to `current`.
fn apply(current: &mut Settings, master_from_cli: Option<&std::path::Path>, policy: &PolicyHandle) {
    let Some(path) = current.source.clone() else {
        info!(
            message = "SIGHUP: no config file to read again (defaults in use); the rules reload."
        );
        return;
    };
    let mut new = match Settings::load(Some(&path)) {
        Ok(s) => s,
        Err(error) => {
            warn!(message = "Config not reloaded; the running settings stay.", file = %path.display(), %error);
            return;
        }
    };
    if let Some(m) = master_from_cli {
        new.master_config = m.to_owned();
    }
    let mut applied: Vec<&str> = Vec::new();
    if new.log.level != current.log.level {
        match crate::telemetry::set_level(&new.log.level) {
            Ok(()) => {
                current.log.level = new.log.level.clone();
                applied.push("log.level");
            }
            Err(error) => {
                warn!(message = "log.level not applied.", level = %new.log.level, %error)
            }
        }
    }
    if new.trusted_minions != current.trusted_minions || new.exec != current.exec {
        match policy_of(&new) {
            Ok(p) => {
                policy.set(p);
                current.trusted_minions = new.trusted_minions.clone();
                current.exec = new.exec.clone();
                applied.push("trusted_minions/exec");
            }
            Err(error) => {
                warn!(message = "trusted_minions and exec not applied.", %error)
            }
        }
    }
    if new.rules_dir != current.rules_dir {
        current.rules_dir = new.rules_dir.clone();
        applied.push("rules_dir");
    }
    let restart = current.restart_needed(&new);
    info!(message = "Config reloaded.", file = %path.display(), applied = ?applied, level = %current.log.level);
    if !restart.is_empty() {
        warn!(message = "Changed in the config but only taken at start: restart the daemon to apply.", keys = ?restart);
    }
}
