//! `salt-call --local` of the repository's states with a throwaway minion
//! config: file_roots = `salt-states/`, the state settings (`steward:<state>:…`,
//! read by `config.get`) in the minion config, optionally inside a network
//! namespace. Salt comes from the same virtualenv as the harness
//! (`SALT_BIN_DIR`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::salt::{salt_bin_dir, salt_states_dir};

/// A masterless minion config in a temp dir.
#[derive(Debug)]
pub struct LocalMinion {
    pub config_dir: PathBuf,
    netns: Option<String>,
    dir: tempfile::TempDir,
}

/// One state's result out of `--out=json`.
#[derive(Debug, Clone)]
pub struct StateResult {
    pub id: String,
    pub result: Option<bool>,
    pub comment: String,
    pub changes: serde_json::Value,
}

/// The outcome of one `state.apply`.
#[derive(Debug, Clone)]
pub struct StateRun {
    pub exit: Option<i32>,
    /// Every state's result (empty when rendering failed: see `errors`).
    pub states: Vec<StateResult>,
    /// Render/compile errors Salt returned instead of results.
    pub errors: Vec<String>,
    /// stdout and stderr, for assertion messages.
    pub raw: String,
}

impl StateRun {
    /// Every state succeeded (and there was at least one).
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
            && !self.states.is_empty()
            && self.states.iter().all(|s| s.result == Some(true))
    }

    /// Some state reported changes.
    pub fn changed(&self) -> bool {
        self.states
            .iter()
            .any(|s| s.changes.as_object().is_some_and(|m| !m.is_empty()))
    }

    /// The comments of every state and the errors, one per line.
    pub fn comments(&self) -> String {
        self.states
            .iter()
            .map(|s| s.comment.clone())
            .chain(self.errors.iter().cloned())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The one state's result (these SLS have one state each).
    pub fn single(&self) -> &StateResult {
        assert_eq!(self.states.len(), 1, "one state expected:\n{}", self.raw);
        &self.states[0]
    }
}

impl LocalMinion {
    /// A minion `id` whose config has file_roots = the repository's
    /// `salt-states/` plus `settings` (YAML lines, e.g. from
    /// `NginxLab::minion_settings`).
    pub fn new(id: &str, settings: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ss-local-")
            .tempdir()
            .unwrap();
        let config_dir = dir.path().join("conf");
        fs::create_dir_all(&config_dir).unwrap();
        let d = dir.path().display();
        let text = format!(
            "id: {id}\n\
             root_dir: {d}/root\n\
             pki_dir: {d}/root/pki\n\
             cachedir: {d}/root/cache\n\
             sock_dir: {d}/root/sock\n\
             pidfile: {d}/root/salt-minion.pid\n\
             log_file: {d}/root/minion.log\n\
             log_level_logfile: info\n\
             file_client: local\n\
             file_roots:\n  base:\n    - {states}\n\
             {settings}",
            states = salt_states_dir().display(),
        );
        fs::write(config_dir.join("minion"), text).unwrap();
        Self {
            config_dir,
            netns: None,
            dir,
        }
    }

    /// Runs every `salt-call` of this minion inside network namespace `ns`.
    pub fn in_netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_owned());
        self
    }

    /// The temp dir (a place for the settings' redirected paths).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `salt-call --local state.apply MODS pillar=PILLAR --out=json`.
    pub fn apply(&self, mods: &str, pillar: &serde_json::Value) -> StateRun {
        let salt_call = salt_bin_dir().join("salt-call");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&salt_call);
                c
            }
            None => Command::new(&salt_call),
        };
        cmd.arg("-c")
            .arg(&self.config_dir)
            .args([
                "--local",
                "--out=json",
                "--retcode-passthrough",
                "-l",
                "quiet",
            ])
            .args(["state.apply", mods])
            .arg(format!("pillar={pillar}"))
            .stdin(Stdio::null());
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let raw = format!(
            "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("salt-call output is not JSON ({e}):\n{raw}"));
        let mut states = Vec::new();
        let mut errors = Vec::new();
        match &v["local"] {
            serde_json::Value::Object(m) => {
                for (id, s) in m {
                    states.push(StateResult {
                        id: id.clone(),
                        result: s["result"].as_bool(),
                        comment: match &s["comment"] {
                            serde_json::Value::String(c) => c.clone(),
                            other => other.to_string(),
                        },
                        changes: s["changes"].clone(),
                    });
                }
            }
            serde_json::Value::Array(a) => {
                errors.extend(a.iter().map(|e| e.as_str().unwrap_or_default().to_owned()));
            }
            other => errors.push(other.to_string()),
        }
        StateRun {
            exit: out.status.code(),
            states,
            errors,
            raw,
        }
    }
}
