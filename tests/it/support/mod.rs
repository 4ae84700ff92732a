//! Shared test support: the real-Salt harness and helpers to drive our CLI.

// Later capabilities use parts of the harness that the bus tests do not.
#![allow(dead_code)]

pub mod netns;
pub mod nginx;
pub mod salt;
pub mod salt_local;
pub mod smbd;
pub mod sshd;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use salt::{MasterOptions, SaltHarness};

/// `salt-steward` as built by cargo for this test run, or the binary
/// `SALT_STEWARD_BIN` names (`scripts/bench-dispatch` runs the release build).
pub fn steward() -> Command {
    let bin = std::env::var_os("SALT_STEWARD_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_salt-steward").into());
    let mut cmd = Command::new(bin);
    // No user config from the machine leaks into a test.
    cmd.env_remove("SALT_STEWARD_CONFIG").env_remove("RUST_LOG");
    cmd
}

/// `salt-steward --config /dev/null --master-config <master>` plus `args`.
pub fn steward_for(master_config: &Path, args: &[&str]) -> Command {
    let mut cmd = steward();
    cmd.arg("--config")
        .arg("/dev/null")
        .arg("--master-config")
        .arg(master_config)
        .args(args);
    cmd
}

/// Fails the test, with the command's output, unless it exited 0.
pub fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "command failed ({:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cmd` to completion; it must exit 0.
pub fn run_ok(mut cmd: Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert_ok(&out);
    out
}

/// A child whose stdout and stderr lines are collected as they come.
pub struct LineChild {
    child: Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    pub seen: Vec<String>,
    pub seen_err: Vec<String>,
}

impl LineChild {
    /// Spawns `cmd` with piped stdout/stderr.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning child");
        let out = lines(child.stdout.take().expect("stdout"));
        let err = lines(child.stderr.take().expect("stderr"));
        Self {
            child,
            out,
            err,
            seen: Vec::new(),
            seen_err: Vec::new(),
        }
    }

    /// Moves the stderr lines received so far into `seen_err`.
    pub fn drain_err(&mut self) {
        while let Ok(l) = self.err.try_recv() {
            self.seen_err.push(l);
        }
    }

    /// The first stdout line already received that satisfies `pred`, or
    /// else the next one ([`wait_line`](Self::wait_line)): for a
    /// notification that may come before or after the reply awaited first.
    pub fn seen_or_wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        self.wait_line(what, timeout, pred)
    }

    /// Waits for a stdout line satisfying `pred`; panics with what was seen.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        match self.try_wait_line(timeout, pred) {
            Ok(line) => line,
            Err(why) => {
                self.drain_err();
                panic!(
                    "{what}: {why}; stdout:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    self.seen_err.join("\n")
                );
            }
        }
    }

    /// Like [`wait_line`](Self::wait_line), but a timeout is an `Err`.
    pub fn try_wait_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the process ended".to_owned())
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("not seen within {timeout:?}"));
            }
        }
    }

    /// Waits until a stderr line satisfying `pred` has come (including lines
    /// already received by an earlier wait), so waits may be in any order.
    pub fn wait_err_line(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) {
        if self.seen_err.iter().any(|l| pred(l)) {
            return;
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(l) = self.err.recv_timeout(Duration::from_millis(200)) {
                let hit = pred(&l);
                self.seen_err.push(l);
                if hit {
                    return;
                }
            }
        }
        panic!(
            "{what}: not on stderr within {timeout:?}:\n{}",
            self.seen_err.join("\n")
        );
    }

    /// Waits until `n` stderr lines satisfying `pred` have come (counting
    /// lines already received): for a line each of several signals prints.
    pub fn wait_err_lines(
        &mut self,
        what: &str,
        timeout: Duration,
        n: usize,
        pred: impl Fn(&str) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while self.seen_err.iter().filter(|l| pred(l)).count() < n {
            if Instant::now() >= deadline {
                panic!(
                    "{what}: not {n} times on stderr within {timeout:?}:\n{}",
                    self.seen_err.join("\n")
                );
            }
            if let Ok(l) = self.err.recv_timeout(Duration::from_millis(200)) {
                self.seen_err.push(l);
            }
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits (at most `timeout`) for the child to exit by itself; its exit
    /// status, with everything it wrote to stderr in `seen_err`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for child") {
                // Everything it wrote: the reader thread ends at end of file.
                while let Ok(l) = self.err.recv_timeout(T) {
                    self.seen_err.push(l);
                }
                return status;
            }
            if Instant::now() >= deadline {
                self.drain_err();
                panic!(
                    "still running after {timeout:?}:\n{}",
                    self.seen_err.join("\n")
                );
            }
            if let Ok(l) = self.err.recv_timeout(Duration::from_millis(100)) {
                self.seen_err.push(l);
            }
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = self.child.wait().expect("waiting for child");
        self.drain_err();
        status
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Parses a `--json` line of `events watch`.
pub fn json_line(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
}

/// Polls `f` (every 100 ms, for 15 s at most) until it returns `Ok`; the
/// value, or a panic with `what` and the last attempt's `Err`.
pub fn eventually<T>(what: &str, f: impl FnMut() -> Result<T, String>) -> T {
    eventually_within(what, Duration::from_secs(15), f)
}

/// [`eventually`] with another bound.
pub fn eventually_within<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{what}: still {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Timeout of the daemon tests' waits.
pub const T: Duration = Duration::from_secs(60);

/// A salt-steward config for the harness's master, with its registry and
/// keys in the temp root, `trusted_minions`, and `extra` YAML lines (which
/// may replace the `registry:` and `keys:` settings).
pub fn steward_config(h: &SaltHarness, trusted: &[&str], extra: &str) -> PathBuf {
    let path = h.root().join("steward.yaml");
    let mut text = format!(
        "master_config: {}\ntrusted_minions: {}\n{extra}",
        h.master_config().display(),
        serde_json::to_string(trusted).unwrap(),
    );
    // Registry and keys under the root unless `extra` has its own.
    if !extra.lines().any(|l| l.starts_with("registry:")) {
        text.push_str(&format!(
            "registry: sqlite://{}/registry.db\n",
            h.root().display()
        ));
    }
    if !extra.lines().any(|l| l.starts_with("keys:")) {
        text.push_str(&format!(
            "keys: {{dir: {}/keys, pool_size: 1}}\n",
            h.root().display()
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

pub fn cli(config: &Path, args: &[&str]) -> Command {
    let mut cmd = steward();
    cmd.arg("--config").arg(config).args(args);
    cmd
}

pub fn start_daemon(config: &Path) -> LineChild {
    let mut d = LineChild::spawn(cli(config, &["daemon"]));
    d.wait_err_line("daemon started", T, |l| l.contains("Daemon started"));
    d.wait_err_line("daemon on the bus", T, |l| {
        l.contains("Connected to the master event bus")
    });
    d
}

pub fn watch_steward(config: &Path) -> LineChild {
    let mut w = LineChild::spawn(cli(
        config,
        &["events", "watch", "--json", "--tag", "steward/v1/*"],
    ));
    w.wait_err_line("watch connected", T, |l| {
        l.contains("Connected to the master event bus")
    });
    w
}

/// A command's exit code, stdout and stderr, for assertion messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits on the `events watch --json` child `w` for an event `tag` whose
/// data satisfies `pred` and returns the data; on a timeout, panics showing
/// the bus and what `daemon` logged.
pub fn wait_event_data(
    w: &mut LineChild,
    daemon: &mut LineChild,
    tag: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    match w.try_wait_line(T, |l| {
        let v = json_line(l);
        v["tag"] == tag && pred(&v["data"])
    }) {
        Ok(line) => json_line(&line)["data"].clone(),
        Err(why) => {
            daemon.drain_err();
            panic!(
                "{tag}: {why}\nbus:\n{}\ndaemon:\n{}",
                w.seen.join("\n"),
                daemon.seen_err.join("\n")
            )
        }
    }
}

/// The names of the registry's servers (`server list --json`).
pub fn server_names(config: &Path) -> Vec<String> {
    let out = run_ok(cli(config, &["server", "list", "--json"]));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits for the reply to `request_id`; on a timeout, shows what the daemon said.
pub fn reply(w: &mut LineChild, daemon: &mut LineChild, request_id: &str) -> serde_json::Value {
    wait_event_data(w, daemon, &format!("steward/v1/reply/{request_id}"), |_| {
        true
    })
}

/// Runs `f` on a registry database URL of harness `h` (the SQLite file the
/// test configs name), on a runtime of its own.
pub fn with_registry_db<F, Fut>(h: &SaltHarness, f: F)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let url = format!("sqlite://{}/registry.db", h.root().display());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f(url));
}
