//! A private nginx on loopback for the hostname-forward tests, and two
//! Python backends behind it.
//!
//! Everything lives under a temp prefix `T`: `nginx -p T -c T/nginx.conf -e
//! T/error.log`, pid, logs and temp paths under `T`, `include
//! T/conf.d/*.conf;`, a default server on `127.0.0.1:<listen_port>` (404 for
//! unknown hosts), master in the foreground (`daemon off`) in its own process
//! group, stopped on drop. Nothing under /etc, /var or /run is used.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::netns::{lab_servers_script, python3, require_tools, LabProcess};

/// A python backend on 127.0.0.1 answering JSON naming it (`backend`) with
/// the request's path and proxy headers (`host`, `x_real_ip`,
/// `x_forwarded_for`, `x_forwarded_proto`, `x_forwarded_host`).
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub port: u16,
    _process: LabProcess,
}

/// The nginx lab. Field order is drop order: processes before the prefix.
#[derive(Debug)]
pub struct NginxLab {
    nginx: Option<LabProcess>,
    pub a: Backend,
    pub b: Backend,
    /// The port the tests' sites listen on (127.0.0.1), with a default server.
    pub listen_port: u16,
    /// `T`: nginx's prefix.
    pub prefix: PathBuf,
    /// `T/conf.d`, included by `T/nginx.conf`.
    pub conf_d: PathBuf,
    dir: tempfile::TempDir,
}

impl NginxLab {
    /// Starts backends A and B and nginx; waits until each answers.
    pub fn start() -> Self {
        require_tools(&["nginx", "curl"]);
        let dir = tempfile::Builder::new()
            .prefix("ss-nginx-")
            .tempdir()
            .unwrap();
        let prefix = dir.path().to_owned();
        let conf_d = prefix.join("conf.d");
        fs::create_dir_all(&conf_d).unwrap();
        fs::create_dir_all(prefix.join("tmp")).unwrap();
        fs::create_dir_all(prefix.join("logs")).unwrap();
        let script = lab_servers_script(&prefix);
        let backend = |name: &str| {
            let port = super::salt::free_port();
            let mut cmd = Command::new(python3());
            cmd.arg(&script)
                .args(["http-echo", "127.0.0.1", &port.to_string(), name]);
            let p = LabProcess::spawn_ready(
                &format!("backend {name}"),
                cmd,
                &prefix.join(format!("backend-{name}.log")),
                Duration::from_secs(20),
            );
            Backend {
                name: name.to_owned(),
                port,
                _process: p,
            }
        };
        let a = backend("A");
        let b = backend("B");
        let listen_port = super::salt::free_port();
        let p = prefix.display();
        let conf = format!(
            "# Private nginx of a salt-steward test.\n\
             daemon off;\n\
             master_process on;\n\
             worker_processes 1;\n\
             pid {p}/nginx.pid;\n\
             error_log {p}/error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {p}/tmp/body;\n\
             \x20   proxy_temp_path {p}/tmp/proxy;\n\
             \x20   fastcgi_temp_path {p}/tmp/fastcgi;\n\
             \x20   uwsgi_temp_path {p}/tmp/uwsgi;\n\
             \x20   scgi_temp_path {p}/tmp/scgi;\n\
             \x20   server {{\n\
             \x20       listen 127.0.0.1:{listen_port} default_server;\n\
             \x20       server_name _;\n\
             \x20       return 404;\n\
             \x20   }}\n\
             \x20   include {p}/conf.d/*.conf;\n\
             }}\n"
        );
        fs::write(prefix.join("nginx.conf"), conf).unwrap();
        let mut lab = Self {
            nginx: None,
            a,
            b,
            listen_port,
            prefix,
            conf_d,
            dir,
        };
        lab.restart_from_disk()
            .unwrap_or_else(|e| panic!("starting the private nginx: {e}"));
        lab
    }

    /// `-p T -c T/nginx.conf -e T/error.log`: what every nginx command of
    /// this lab takes (the `steward:hostfwd:nginx_args` setting).
    pub fn nginx_args(&self) -> Vec<String> {
        let p = self.prefix.display();
        vec![
            "-p".into(),
            format!("{p}/"),
            "-c".into(),
            format!("{p}/nginx.conf"),
            "-e".into(),
            format!("{p}/error.log"),
        ]
    }

    /// `nginx <args> extra…` (not run).
    pub fn nginx_cmd(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(nginx_bin());
        cmd.args(self.nginx_args()).args(extra);
        cmd
    }

    /// Where the hostfwd state writes our site file in this lab.
    pub fn site_file(&self) -> PathBuf {
        self.conf_d.join("salt-steward-hostfwd.conf")
    }

    /// The minion config lines that point steward.hostfwd at this nginx.
    pub fn minion_settings(&self) -> String {
        self.minion_settings_with(&nginx_bin())
    }

    /// [`minion_settings`](Self::minion_settings) with another program in
    /// place of nginx (a wrapper that fails or stalls, then runs nginx).
    pub fn minion_settings_with(&self, nginx: &Path) -> String {
        format!(
            "steward:\n  hostfwd:\n    nginx: {}\n    nginx_args: {}\n    site_file: {}\n    listen_address: 127.0.0.1\n",
            nginx.display(),
            serde_json::to_string(&self.nginx_args().join(" ")).unwrap(),
            self.site_file().display(),
        )
    }

    /// `GET http://127.0.0.1:PORT/` with `Host: HOST` (curl, 3 s at most):
    /// the body, or curl's error / the status for a non-2xx answer.
    /// Asked once a reload has settled ([`Self::wait_one_generation`]).
    pub fn get(&self, port: u16, host: &str) -> Result<String, String> {
        self.get_path(port, host, "/")
    }

    /// `GET http://127.0.0.1:PORT/PATH` with `Host: HOST`, once a reload
    /// has settled.
    pub fn get_path(&self, port: u16, host: &str, path: &str) -> Result<String, String> {
        self.wait_one_generation();
        get_path(port, host, path)
    }

    /// Waits (15 s at most) until nginx runs one worker and none shutting
    /// down. Just after a reload, a worker of the old configuration may
    /// still take a new connection and answer from the old sites. (Before
    /// the master has read the reload signal there is one worker, of the
    /// old generation: callers that wait for a new site use `eventually`.)
    fn wait_one_generation(&self) {
        let Some(master) = self.nginx.as_ref().map(LabProcess::pid) else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let workers = children_titles(master);
            let settled = workers.len() == 1
                && workers[0].starts_with("nginx: worker process")
                && !workers[0].contains("shutting down");
            // Past the deadline the request itself tells what is wrong.
            if settled || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops nginx (if running) and starts it again from the files on disk;
    /// `Err` with nginx's output when it does not start (as a reboot would
    /// find it), `Ok` once its default server answers.
    pub fn restart_from_disk(&mut self) -> Result<(), String> {
        self.stop();
        let log = self.prefix.join("nginx.out");
        let mut nginx = LabProcess::spawn("nginx", self.nginx_cmd(&[]), &log);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if !nginx.running() {
                return Err(format!("nginx exited: {}", nginx.log_text()));
            }
            // The default server answers 404 once nginx listens.
            if let Err(e) = get_path(self.listen_port, "unknown.invalid", "/") {
                if e.contains("404") {
                    break;
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nginx did not answer within 20 s: {}",
                    nginx.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.nginx = Some(nginx);
        Ok(())
    }

    /// Stops nginx (TERM of its process group, then KILL). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut n) = self.nginx.take() {
            n.stop();
        }
    }

    /// Whether the nginx master started by this lab is still running.
    pub fn running(&mut self) -> bool {
        self.nginx.as_mut().is_some_and(|n| n.running())
    }

    /// The lab's directory (kept on a failing test by `keep()`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NginxLab {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "nginx lab kept for inspection: {}",
                self.dir.path().display()
            );
        }
    }
}

/// The `backend` an answer of [`Backend`] names ("A", "B").
pub fn backend_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["backend"].as_str().unwrap().to_owned()
}

/// The nginx binary (`/usr/sbin/nginx` on Debian).
pub fn nginx_bin() -> PathBuf {
    let p = Path::new("/usr/sbin/nginx");
    if p.is_file() {
        p.to_owned()
    } else {
        PathBuf::from("nginx")
    }
}

/// The process titles (`/proc/N/cmdline`) of `parent`'s children.
fn children_titles(parent: i32) -> Vec<String> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`: comm may hold spaces and ')'.
            let ppid: i32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            if ppid != parent {
                return None;
            }
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let title = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            Some(title.trim().to_owned())
        })
        .collect()
}

fn get_path(port: u16, host: &str, path: &str) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "3", "--noproxy", "*", "-H"])
        .arg(format!("Host: {host}"))
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "curl exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    if code.starts_with('2') {
        Ok(body.to_owned())
    } else {
        Err(format!("HTTP {code}: {body}"))
    }
}
