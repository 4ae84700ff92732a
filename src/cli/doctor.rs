//! `salt-steward doctor`: what an operator runs after installing, or when
//! something is off — one line per check, exit 1 when one failed. It checks
//! the config, the master's config, the bus sockets, the root key, the
//! request server (and the Salt release it runs), the registry and its
//! migrations, the rules, that `salt-states/` is served by the master, and
//! the modes of the key and registry files.

use std::fmt;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Map, Value as Json};

use super::Context;
use crate::bus::BusEndpoint;
use crate::master_config::MasterConfig;
use crate::registry::StateKind;

/// How long each network check waits.
const WAIT: Duration = Duration::from_secs(5);

/// The file of the SLS `sls` under a `file_roots` directory
/// (`steward.portfwd` → `steward/portfwd/init.sls`).
fn sls_file(sls: &str) -> std::path::PathBuf {
    std::path::Path::new(&sls.replace('.', "/")).join("init.sls")
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        })
    }
}

/// The lines printed, and whether one failed.
#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, v: Verdict, what: &str, detail: impl fmt::Display) {
        if v == Verdict::Fail {
            self.failed = true;
        }
        println!("{v}  {what}: {detail}");
    }

    fn result<E: fmt::Display>(&mut self, what: &str, r: Result<String, E>) -> bool {
        match r {
            Ok(detail) => {
                self.line(Verdict::Ok, what, detail);
                true
            }
            Err(e) => {
                self.line(Verdict::Fail, what, e);
                false
            }
        }
    }
}

/// A config that did not load: the one failing line.
pub fn config_failed(e: &anyhow::Error) -> ExitCode {
    Report::default().line(Verdict::Fail, "config", super::one_line(e));
    ExitCode::from(1)
}

/// Runs every check in order (a check whose premise failed is skipped with
/// a line saying so).
pub async fn run(ctx: &Context) -> anyhow::Result<ExitCode> {
    let mut r = Report::default();
    let s = &ctx.settings;
    r.line(
        Verdict::Ok,
        "config",
        "parsed, every number in range (see contrib/config.yaml)",
    );
    let master = match ctx.master() {
        Ok(m) => {
            r.line(Verdict::Ok, "master config", m.path.display());
            Some(m)
        }
        Err(e) => {
            r.line(Verdict::Fail, "master config", super::one_line(&e));
            None
        }
    };
    if let Some(m) = &master {
        let mut bus_ok = true;
        for (what, ep) in [
            ("bus publisher", m.event_pub()),
            ("bus pull", m.event_pull()),
        ] {
            let res = match tokio::time::timeout(WAIT, connect(&ep)).await {
                Ok(Ok(())) => Ok(format!("{ep} accepts a connection")),
                Ok(Err(e)) => Err(format!(
                    "{ep}: {e} (is the salt-master running? the daemon runs as the master's user)"
                )),
                Err(_) => Err(format!("{ep}: no connection within {WAIT:?}")),
            };
            bus_ok &= r.result(what, res);
        }
        let key = m.cachedir.join(format!(".{}_key", m.user));
        let key_ok = r.result("root key", root_key(&key));
        if bus_ok && key_ok {
            let res = request_server(ctx, m).await;
            r.result("request server", res);
        } else {
            r.line(
                Verdict::Fail,
                "request server",
                "not asked (the bus or the root key failed above)",
            );
        }
        r.result("states in file_roots", states_served(m));
    }
    match crate::registry::open(&s.registry).await {
        Ok(reg) => r.line(
            Verdict::Ok,
            "registry",
            format!(
                "{} opens, schema migrated to the current version",
                reg.store().backend()
            ),
        ),
        Err(e) => r.line(Verdict::Fail, "registry", e),
    }
    rules(&mut r, &s.rules_dir);
    modes(&mut r, &s.keys.dir, &s.registry);
    if let Some(addr) = s.metrics_listen {
        match tokio::time::timeout(WAIT, scrape(addr)).await {
            Ok(Ok(status)) if status.contains(" 200 ") => r.line(
                Verdict::Ok,
                "daemon endpoint",
                format!("http://{addr}/metrics answers ({})", status.trim()),
            ),
            Ok(Ok(status)) => r.line(
                Verdict::Fail,
                "daemon endpoint",
                format!("http://{addr}/metrics answered {}", status.trim()),
            ),
            Ok(Err(e)) => r.line(
                Verdict::Warn,
                "daemon endpoint",
                format!("http://{addr}/metrics: {e} (is the daemon running?)"),
            ),
            Err(_) => r.line(
                Verdict::Fail,
                "daemon endpoint",
                format!("http://{addr}/metrics: no answer within {WAIT:?}"),
            ),
        }
    }
    Ok(if r.failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The status line of `GET /metrics` from the daemon's endpoint.
async fn scrape(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut line = String::new();
    tokio::io::BufReader::new(stream)
        .read_line(&mut line)
        .await?;
    Ok(line)
}

async fn connect(ep: &BusEndpoint) -> std::io::Result<()> {
    match ep {
        BusEndpoint::Unix(p) => tokio::net::UnixStream::connect(p).await.map(drop),
        BusEndpoint::Tcp(a) => tokio::net::TcpStream::connect(a).await.map(drop),
    }
}

fn root_key(key: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(key).map_err(|e| {
        format!(
            "{} not readable: {e} (run as the master's user)",
            key.display()
        )
    })?;
    if text.trim().is_empty() {
        return Err(format!("{} is empty", key.display()));
    }
    Ok(format!("{} readable", key.display()))
}

/// Asks the request server for the master's Salt release (`salt.cmd
/// test.version` on the master, through the runner).
async fn request_server(ctx: &Context, m: &MasterConfig) -> Result<String, String> {
    let (client, cancel) = super::salt::connect(ctx, m, WAIT)
        .await
        .map_err(|e| super::one_line(&e))?;
    let mut kwarg = Map::new();
    kwarg.insert("fun".into(), Json::from("test.version"));
    let r = client.runner("salt.cmd", Vec::new(), kwarg, WAIT).await;
    cancel.cancel();
    let r = r.map_err(|e| format!("{}:{} did not answer: {e}", m.interface, m.ret_port))?;
    let version = r
        .ret
        .as_str()
        .map_or_else(|| r.ret.to_string(), str::to_owned);
    Ok(format!(
        "{}:{} answers (transport {}), Salt {version}",
        m.interface, m.ret_port, m.transport
    ))
}

fn states_served(m: &MasterConfig) -> Result<String, String> {
    let found = m.file_roots_base.iter().find(|d| {
        StateKind::ALL
            .iter()
            .all(|s| d.join(sls_file(s.sls())).is_file())
    });
    match found {
        Some(d) => Ok(format!(
            "{} served from {}",
            StateKind::ALL.map(StateKind::sls).join(", "),
            d.display()
        )),
        None => Err(format!(
            "salt-states/ is not in the master's file_roots (base: {}); add its path there and restart the master (salt-states/README.md)",
            m.file_roots_base
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn rules(r: &mut Report, dir: &Path) {
    if !dir.is_dir() {
        r.line(
            Verdict::Warn,
            "rules",
            format!("{} does not exist: no reactor rules", dir.display()),
        );
        return;
    }
    match crate::rules::compile::load_dir(dir) {
        Ok(set) => {
            let v = if set.warnings().is_empty() {
                Verdict::Ok
            } else {
                Verdict::Warn
            };
            r.line(
                v,
                "rules",
                format!(
                    "{} rule(s) from {}, {} warning(s) (`salt-steward rules check`)",
                    set.rules().len(),
                    dir.display(),
                    set.warnings().len()
                ),
            );
        }
        Err(errors) => {
            for e in &errors {
                r.line(Verdict::Fail, "rules", e);
            }
        }
    }
}

/// Key files and their directory readable by their owner only; a SQLite
/// registry not readable by others.
fn modes(r: &mut Report, keys: &Path, registry: &str) {
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    match mode(keys) {
        Ok(m) if m & 0o077 == 0 => {
            let loose: Vec<PathBuf> = std::fs::read_dir(keys)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "pem"))
                .filter(|p| mode(p).is_ok_and(|m| m & 0o077 != 0))
                .collect();
            if loose.is_empty() {
                r.line(
                    Verdict::Ok,
                    "key files",
                    format!("{} is {m:o}, private keys 0600", keys.display()),
                );
            } else {
                for p in loose {
                    r.line(
                        Verdict::Fail,
                        "key files",
                        format!("{} is readable by others: chmod 0600 it", p.display()),
                    );
                }
            }
        }
        Ok(m) => r.line(
            Verdict::Fail,
            "key files",
            format!("{} is {m:o}: chmod 0700 it", keys.display()),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => r.line(
            Verdict::Warn,
            "key files",
            format!(
                "{} does not exist yet (made with the first server)",
                keys.display()
            ),
        ),
        Err(e) => r.line(
            Verdict::Fail,
            "key files",
            format!("{}: {e}", keys.display()),
        ),
    }
    let Some(file) = registry
        .strip_prefix("sqlite://")
        .map(|p| p.split('?').next().unwrap_or(p))
    else {
        return;
    };
    match mode(Path::new(file)) {
        Ok(m) if m & 0o007 == 0 => r.line(Verdict::Ok, "registry file", format!("{file} is {m:o}")),
        Ok(m) => r.line(
            Verdict::Fail,
            "registry file",
            format!("{file} is {m:o}, readable by others: chmod o-rwx it"),
        ),
        Err(e) => r.line(Verdict::Warn, "registry file", format!("{file}: {e}")),
    }
}
