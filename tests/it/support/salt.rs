//! A real salt-master and real salt-minions for tests.
//!
//! Everything lives in a temporary root dir (configs, pki, cache, sockets,
//! logs), on free loopback ports, as the current user. Each Salt process runs
//! in its own process group and is stopped by PID (TERM, then KILL of the
//! group) when the harness is dropped, which also happens on panic.
//!
//! Salt comes from the virtualenv made by `scripts/install-salt`; without it
//! the harness fails with the command to run. It never skips.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// The directory holding `salt-master`, `salt-minion`, `salt-key`, `python` ….
pub fn salt_bin_dir() -> PathBuf {
    let dir = match std::env::var_os("SALT_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".salt/venv/bin"),
    };
    assert!(
        dir.join("salt-master").is_file() && dir.join("salt-minion").is_file(),
        "Salt is not installed at {}: run `scripts/install-salt` (or `scripts/test`, \
         which installs it), or set SALT_BIN_DIR to a directory holding salt-master",
        dir.display()
    );
    dir
}

/// The Salt release the tests run against (`salt-master --version`), e.g. `(3008, 5)`.
pub fn salt_version() -> (u32, u32) {
    static VERSION: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
    *VERSION.get_or_init(|| {
        let out = Command::new(salt_bin_dir().join("salt-master"))
            .arg("--version")
            .output()
            .expect("running salt-master --version");
        // "salt-master 3008.5 (Potassium)"
        let text = String::from_utf8_lossy(&out.stdout);
        let v = text.split_whitespace().nth(1).unwrap_or_default();
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    })
}

/// A free TCP port on 127.0.0.1 (the kernel picks it; it is released at once).
pub fn free_port() -> u16 {
    // nextest runs each test in a process of its own: a port freed here could
    // be handed to a parallel test before our master binds it. Each port is
    // therefore reserved by a file naming this process; a reservation whose
    // process has exited is taken over.
    let dir = std::env::temp_dir().join("salt-steward-test-ports");
    fs::create_dir_all(&dir).expect("creating the port reservation directory");
    let me = std::process::id().to_string();
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral loopback port");
        let port = l.local_addr().expect("local addr").port();
        let file = dir.join(port.to_string());
        let reserved = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, me.as_bytes()));
        match reserved {
            Ok(()) => return port,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = fs::read_to_string(&file).unwrap_or_default();
                let alive = !owner.is_empty() && Path::new("/proc").join(owner.trim()).exists();
                if !alive || owner.trim() == me {
                    // Stale (or our own from an earlier call): take it over.
                    if fs::write(&file, &me).is_ok() && owner.trim() != me {
                        return port;
                    }
                }
            }
            Err(e) => panic!("reserving port {port} in {}: {e}", dir.display()),
        }
    }
}

/// How the master is set up.
#[derive(Debug, Clone)]
pub struct MasterOptions {
    /// `auto_accept: True` in the master config.
    pub auto_accept: bool,
    /// `ipc_mode: tcp`: the event bus on loopback TCP ports instead of unix sockets.
    pub ipc_tcp: bool,
    /// `transport: tcp` (master and minions): Salt's plain TCP transport
    /// instead of ZeroMQ for requests and publishes.
    pub transport_tcp: bool,
    /// Extra lines appended to the master config.
    pub extra: String,
    /// Directories served after the harness's own `srv/` in `file_roots:
    /// base` (e.g. the repository's `salt-states/`, [`salt_states_dir`]).
    pub file_roots: Vec<PathBuf>,
}

impl Default for MasterOptions {
    fn default() -> Self {
        Self {
            auto_accept: true,
            ipc_tcp: false,
            transport_tcp: false,
            extra: String::new(),
            file_roots: Vec::new(),
        }
    }
}

/// A Salt process stopped by PID (and its process group) on drop.
#[derive(Debug)]
struct SaltProcess {
    child: Child,
}

impl SaltProcess {
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        let out = fs::File::create(log).expect("creating process log");
        let err = out.try_clone().expect("cloning log handle");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { child }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    /// TERM the group, wait up to 10 s, then KILL it. Idempotent.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            // The leader is gone; make sure no child of it lingers.
            let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
            return;
        }
        let pgid = Pid::from_raw(self.pid());
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
        // Salt's worker processes may outlive the leader briefly.
        std::thread::sleep(Duration::from_millis(100));
        let _ = killpg(pgid, Signal::SIGKILL);
    }
}

impl Drop for SaltProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One minion of the harness.
#[derive(Debug)]
pub struct Minion {
    pub id: String,
    pub config_dir: PathBuf,
    /// The network namespace it runs in (`start_minion_in_netns`), if any.
    pub netns: Option<String>,
    process: Option<SaltProcess>,
}

/// A running salt-master with its minions, in a temporary root.
#[derive(Debug)]
pub struct SaltHarness {
    /// Kept last in drop order: processes stop before the directory goes.
    root: tempfile::TempDir,
    bin: PathBuf,
    pub master_config_dir: PathBuf,
    pub sock_dir: PathBuf,
    pub pki_dir: PathBuf,
    pub file_roots: PathBuf,
    pub ret_port: u16,
    pub publish_port: u16,
    pub options: MasterOptions,
    pub tcp_pub_port: u16,
    pub tcp_pull_port: u16,
    master: Option<SaltProcess>,
    minions: Vec<Minion>,
    /// socat relays of the minions in network namespaces (stopped after them).
    relays: Vec<SaltProcess>,
}

impl Drop for SaltHarness {
    fn drop(&mut self) {
        for m in &mut self.minions {
            if let Some(mut p) = m.process.take() {
                p.stop();
            }
        }
        for p in &mut self.relays {
            p.stop();
        }
        if let Some(mut p) = self.master.take() {
            p.stop();
        }
        // Salt 3008 starts some master processes (Maintenance,
        // FileserverUpdate) outside the master's process group: anything
        // still running with this harness's config dir goes too.
        let _ = Command::new("pkill")
            .arg("-KILL")
            .arg("-f")
            .arg(self.root.path().as_os_str())
            .status();
        if std::thread::panicking() || std::env::var_os("KEEP_SALT_ROOT").is_some() {
            // Keep the logs of a failed test for the reader.
            self.root.disable_cleanup(true);
            eprintln!(
                "salt harness root kept for inspection: {}",
                self.root.path().display()
            );
        }
    }
}

impl SaltHarness {
    /// Starts a master with default options and waits until its bus is up.
    pub fn start() -> Self {
        Self::start_with(MasterOptions::default())
    }

    /// Starts a master with `options` and waits until its bus is up.
    pub fn start_with(options: MasterOptions) -> Self {
        let bin = salt_bin_dir();
        // Short root: unix socket paths are limited to ~107 bytes.
        let root = tempfile::Builder::new()
            .prefix("ss-")
            .tempdir_in(std::env::temp_dir())
            .expect("temp root");
        let r = root.path().to_owned();
        let master_config_dir = r.join("master");
        let file_roots = r.join("srv");
        for d in [&master_config_dir, &file_roots] {
            fs::create_dir_all(d).expect("creating harness dirs");
        }
        let mut h = Self {
            sock_dir: r.join("m/sock"),
            pki_dir: r.join("m/pki"),
            root,
            bin,
            master_config_dir,
            file_roots,
            ret_port: free_port(),
            publish_port: free_port(),
            tcp_pub_port: free_port(),
            tcp_pull_port: free_port(),
            options,
            master: None,
            minions: Vec::new(),
            relays: Vec::new(),
        };
        h.write_master_config();
        h.start_master();
        h
    }

    /// The temporary root of everything.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The master config file, for `--master-config`.
    pub fn master_config(&self) -> PathBuf {
        self.master_config_dir.join("master")
    }

    /// A Salt executable from the virtualenv.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    fn write_master_config(&self) {
        let r = self.root().display();
        let mut text = format!(
            "root_dir: {r}/m\n\
             pki_dir: {r}/m/pki\n\
             cachedir: {r}/m/cache\n\
             sock_dir: {r}/m/sock\n\
             pidfile: {r}/m/salt-master.pid\n\
             log_file: {r}/m/master.log\n\
             log_level: warning\n\
             log_level_logfile: info\n\
             user: {user}\n\
             interface: 127.0.0.1\n\
             publish_port: {pub_port}\n\
             ret_port: {ret}\n\
             auto_accept: {auto}\n\
             worker_threads: 3\n\
             file_roots:\n  base:\n    - {srv}\n{more_roots}",
            user = current_user(),
            pub_port = self.publish_port,
            ret = self.ret_port,
            auto = if self.options.auto_accept {
                "True"
            } else {
                "False"
            },
            srv = self.file_roots.display(),
            more_roots = self
                .options
                .file_roots
                .iter()
                .map(|d| format!("    - {}\n", d.display()))
                .collect::<String>(),
        );
        if self.options.transport_tcp {
            text.push_str("transport: tcp\n");
        }
        if self.options.ipc_tcp {
            text.push_str(&format!(
                "ipc_mode: tcp\n\
                 tcp_master_pub_port: {}\n\
                 tcp_master_pull_port: {}\n\
                 tcp_master_publish_pull: {}\n\
                 tcp_master_workers: {}\n",
                self.tcp_pub_port,
                self.tcp_pull_port,
                free_port(),
                free_port()
            ));
        }
        text.push_str(&self.options.extra);
        fs::write(self.master_config(), text).expect("writing master config");
    }

    fn start_master(&mut self) {
        let mut cmd = Command::new(self.bin("salt-master"));
        cmd.arg("-c")
            .arg(&self.master_config_dir)
            .arg("-l")
            .arg("quiet");
        let log = self.root().join("master.out");
        self.master = Some(SaltProcess::spawn("salt-master", cmd, &log));
        self.wait_master_bus(Duration::from_secs(60));
    }

    /// Appends `lines` to the master config (kept in `options.extra`); takes
    /// effect at the next (re)start.
    pub fn append_master_config(&mut self, lines: &str) {
        self.options.extra.push_str(lines);
        self.write_master_config();
    }

    /// Stops the master (TERM, then KILL) and starts it again with the same config.
    pub fn restart_master(&mut self) {
        self.stop_master();
        self.start_master();
    }

    /// Stops the master; its socket files stay behind, as they do for real.
    pub fn stop_master(&mut self) {
        if let Some(mut p) = self.master.take() {
            p.stop();
        }
    }

    /// Waits until the master's event publisher accepts a connection. Socket
    /// files outlive a stopped master, so the connect itself is the test.
    fn wait_master_bus(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = if self.options.ipc_tcp {
                std::net::TcpStream::connect(("127.0.0.1", self.tcp_pub_port)).is_ok()
            } else {
                std::os::unix::net::UnixStream::connect(self.sock_dir.join("master_event_pub.ipc"))
                    .is_ok()
            };
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "salt-master did not open its event bus within {timeout:?}; log: {}",
                self.log_tail("m/master.log")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of a log under the root, for failure messages.
    pub fn log_tail(&self, rel: &str) -> String {
        let text = fs::read_to_string(self.root().join(rel)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Starts a minion with `id` pointed at this master.
    pub fn start_minion(&mut self, id: &str) -> &Minion {
        self.start_minion_with(id, id, "", |_| {})
    }

    /// Starts a minion with `id` that verifies the master's signed public key
    /// (it has the master's `master_sign.pub`), as a bundle's would, but
    /// with a key pair of its own.
    pub fn start_minion_verifying(&mut self, label: &str, id: &str) -> &Minion {
        let sign = self.pki_dir.join("master_sign.pub");
        self.start_minion_with(label, id, "verify_master_pubkey_sign: True\n", move |dir| {
            fs::create_dir_all(dir.join("pki")).expect("minion pki dir");
            fs::copy(&sign, dir.join("pki/master_sign.pub")).expect("copying master_sign.pub");
        })
    }

    /// Starts a minion installed from a salt-steward bundle (tar.gz): the
    /// bundle's `install.sh` puts keys and `minion.d/steward.conf` (id,
    /// masters) into the minion's config dir `n-<label>`; `id` is what the
    /// harness calls it.
    pub fn start_minion_from_bundle(&mut self, label: &str, id: &str, bundle: &Path) -> &Minion {
        let bundle = bundle.to_owned();
        self.start_minion_with(label, id, "", move |dir| {
            install_bundle(&bundle, dir);
        })
    }

    /// Starts a minion in `n-<label>` with the harness's base config plus
    /// `extra`; `prepare` runs on the config dir first. Unless `extra`'s
    /// preparation installs a `minion.d/` config naming them, the minion's
    /// id is `id` and its master this one.
    pub fn start_minion_with(
        &mut self,
        label: &str,
        id: &str,
        extra: &str,
        prepare: impl FnOnce(&Path),
    ) -> &Minion {
        self.start_minion_inner(label, id, extra, prepare, None)
    }

    /// Starts a minion like [`start_minion_with`](Self::start_minion_with)
    /// (no preparation) INSIDE the network namespace `netns` (which must have
    /// `lo` up, as [`super::netns::Netns`] does). A namespace cannot reach
    /// this master's 127.0.0.1, so the harness relays the master's request
    /// and publish ports over unix sockets (the file system crosses
    /// namespaces): in this namespace `socat UNIX-LISTEN:<dir>/ret.sock,fork
    /// TCP:127.0.0.1:<ret_port>`, inside `netns` `socat
    /// TCP-LISTEN:<ret_port>,bind=127.0.0.1,fork UNIX-CONNECT:<dir>/ret.sock`
    /// (same for the publish port), so the minion's `master: 127.0.0.1`
    /// works unchanged. The relays and the minion stop with the harness;
    /// [`minion_call`](Self::minion_call) runs inside `netns` too.
    pub fn start_minion_in_netns(
        &mut self,
        label: &str,
        id: &str,
        extra: &str,
        netns: &str,
    ) -> &Minion {
        self.start_minion_in_netns_with(label, id, extra, netns, |_| {})
    }

    /// [`start_minion_in_netns`](Self::start_minion_in_netns) of a minion
    /// installed from a salt-steward bundle, as
    /// [`start_minion_from_bundle`](Self::start_minion_from_bundle) does:
    /// the bundle's masters (`127.0.0.1:<ret_port>`) are the relays inside
    /// `netns`.
    pub fn start_minion_in_netns_from_bundle(
        &mut self,
        label: &str,
        id: &str,
        extra: &str,
        netns: &str,
        bundle: &Path,
    ) -> &Minion {
        let bundle = bundle.to_owned();
        self.start_minion_in_netns_with(label, id, extra, netns, move |dir| {
            install_bundle(&bundle, dir);
        })
    }

    /// [`start_minion_in_netns`](Self::start_minion_in_netns) with
    /// `prepare` run on the minion's config dir first (e.g.
    /// [`install_bundle`]).
    pub fn start_minion_in_netns_with(
        &mut self,
        label: &str,
        id: &str,
        extra: &str,
        netns: &str,
        prepare: impl FnOnce(&Path),
    ) -> &Minion {
        super::netns::require_tools(&["socat", "ip", "ss"]);
        let relay_dir = self.root().join(format!("relay-{label}"));
        fs::create_dir_all(&relay_dir).expect("relay dir");
        for (name, port) in [("ret", self.ret_port), ("pub", self.publish_port)] {
            let sock = relay_dir.join(format!("{name}.sock"));
            let mut outer = Command::new("socat");
            outer
                .arg(format!("UNIX-LISTEN:{},fork,unlink-early", sock.display()))
                .arg(format!("TCP:127.0.0.1:{port}"));
            self.relays.push(SaltProcess::spawn(
                &format!("relay {name} of {label}"),
                outer,
                &relay_dir.join(format!("{name}-outer.log")),
            ));
            let deadline = Instant::now() + Duration::from_secs(10);
            while !sock.exists() {
                assert!(
                    Instant::now() < deadline,
                    "socat did not create {} within 10 s",
                    sock.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut inner = Command::new("ip");
            inner
                .args(["netns", "exec", netns, "socat"])
                .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
                .arg(format!("UNIX-CONNECT:{}", sock.display()));
            self.relays.push(SaltProcess::spawn(
                &format!("relay {name} of {label} in {netns}"),
                inner,
                &relay_dir.join(format!("{name}-inner.log")),
            ));
            wait_listen_in(netns, port, Duration::from_secs(10));
        }
        self.start_minion_inner(label, id, extra, prepare, Some(netns))
    }

    fn start_minion_inner(
        &mut self,
        label: &str,
        id: &str,
        extra: &str,
        prepare: impl FnOnce(&Path),
        netns: Option<&str>,
    ) -> &Minion {
        let dir = self.root().join(format!("n-{label}"));
        fs::create_dir_all(&dir).expect("minion dir");
        prepare(&dir);
        let d = dir.display();
        let text = format!(
            "id: {id}\n\
             root_dir: {d}\n\
             pki_dir: {d}/pki\n\
             cachedir: {d}/cache\n\
             sock_dir: {d}/sock\n\
             pidfile: {d}/salt-minion.pid\n\
             log_file: {d}/minion.log\n\
             log_level: warning\n\
             log_level_logfile: info\n\
             user: {user}\n\
             master: 127.0.0.1\n\
             master_port: {ret}\n\
             publish_port: {pub_port}\n\
             acceptance_wait_time: 1\n\
             random_reauth_delay: 0\n\
             file_client: remote\n\
             {transport}\
             {extra}",
            transport = if self.options.transport_tcp {
                "transport: tcp\n"
            } else {
                ""
            },
            user = current_user(),
            ret = self.ret_port,
            pub_port = self.publish_port,
        );
        fs::write(dir.join("minion"), text).expect("writing minion config");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(self.bin("salt-minion"));
                c
            }
            None => Command::new(self.bin("salt-minion")),
        };
        cmd.arg("-c").arg(&dir).arg("-l").arg("quiet");
        let process = SaltProcess::spawn(&format!("salt-minion {id}"), cmd, &dir.join("out.log"));
        self.minions.push(Minion {
            id: id.to_owned(),
            config_dir: dir,
            netns: netns.map(str::to_owned),
            process: Some(process),
        });
        self.minions.last().expect("just pushed")
    }

    /// Starts minions and waits until each has announced its start on the bus
    /// (the master must accept them: `auto_accept`, the default here).
    pub fn start_minions_and_wait(&mut self, ids: &[&str]) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let endpoint = self.bus_endpoint();
        let mut bus = salt_steward::bus::BusHandle::new(endpoint, Default::default());
        let mut sub = bus.subscribe();
        let cancel = tokio_util::sync::CancellationToken::new();
        let mut waiting: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        rt.block_on(async {
            bus.spawn(cancel.clone());
            // Connected first, so no start event is missed.
            loop {
                match sub.recv().await {
                    Some(salt_steward::bus::BusItem::Connected { .. }) => break,
                    Some(_) => {}
                    None => panic!("bus reader stopped"),
                }
            }
        });
        for id in ids {
            self.start_minion(id);
        }
        rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            while !waiting.is_empty() {
                let item = tokio::time::timeout_at(deadline, sub.recv()).await;
                let Ok(Some(item)) = item else {
                    panic!("minions {waiting:?} did not start within 90 s");
                };
                if let salt_steward::bus::BusItem::Event(e) = item {
                    if let salt_steward::bus::EventKind::MinionStart { id } = e.kind() {
                        waiting.retain(|w| w != id);
                    }
                }
            }
            cancel.cancel();
        });
    }

    /// Where the master's event publisher is.
    pub fn bus_endpoint(&self) -> salt_steward::bus::BusEndpoint {
        if self.options.ipc_tcp {
            salt_steward::bus::BusEndpoint::Tcp(([127, 0, 0, 1], self.tcp_pub_port).into())
        } else {
            salt_steward::bus::BusEndpoint::Unix(self.sock_dir.join("master_event_pub.ipc"))
        }
    }

    /// Waits until the master's request server answers a clear `ping`
    /// (it lags the event bus by a few seconds).
    pub fn wait_req_ready(&self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let cfg = salt_steward::master_config::MasterConfig::load(&self.master_config())
            .expect("harness master config");
        let client = salt_steward::salt::ReqClient::new(&cfg, Duration::from_secs(2))
            .expect("harness master transport");
        let deadline = Instant::now() + Duration::from_secs(60);
        rt.block_on(async {
            while client.ping().await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "salt-master request server not ready in 60 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    /// Stops the minion(s) called `id` (they stay known to the master).
    pub fn stop_minion(&mut self, id: &str) {
        for m in self.minions.iter_mut().filter(|m| m.id == id) {
            if let Some(mut p) = m.process.take() {
                p.stop();
            }
        }
    }

    /// Runs a Salt command-line tool against this master (`salt-key`,
    /// `salt-run`, `salt`) with `-c <master config dir>`.
    pub fn master_cmd(&self, tool: &str, args: &[&str]) -> Output {
        let out = Command::new(self.bin(tool))
            .arg("-c")
            .arg(&self.master_config_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {tool}: {e}"));
        out
    }

    /// Runs `salt-call` on minion `id` (inside its network namespace, if it
    /// has one).
    pub fn minion_call(&self, id: &str, args: &[&str]) -> Output {
        let m = self
            .minions
            .iter()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("no minion {id} in the harness"));
        let mut cmd = match &m.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(self.bin("salt-call"));
                c
            }
            None => Command::new(self.bin("salt-call")),
        };
        cmd.arg("-c")
            .arg(&m.config_dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running salt-call on {id}: {e}"))
    }

    /// The virtualenv's Python, which can import salt.
    pub fn python(&self) -> PathBuf {
        self.bin("python")
    }
}

pub fn current_user() -> String {
    let out = Command::new("id")
        .arg("-un")
        .output()
        .expect("running id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Unpacks a salt-steward bundle and runs its `install.sh` with the
/// minion's config dir `dir` (its pki dir `dir/pki`).
pub fn install_bundle(bundle: &Path, dir: &Path) {
    let unpacked = dir.join("bundle");
    fs::create_dir_all(&unpacked).expect("bundle dir");
    let st = Command::new("tar")
        .arg("xzf")
        .arg(bundle)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .expect("running tar");
    assert!(st.success(), "tar xzf {}", bundle.display());
    let out = Command::new("sh")
        .arg(unpacked.join("install.sh"))
        .env("SALT_CONFIG_DIR", dir)
        .env("SALT_PKI_DIR", dir.join("pki"))
        .output()
        .expect("running install.sh");
    assert!(
        out.status.success(),
        "install.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits (bounded) until something listens on TCP `port` in network
/// namespace `netns`.
fn wait_listen_in(netns: &str, port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "ss", "-Hltn"])
            .arg(format!("sport = :{port}"))
            .output()
            .expect("running ss in the namespace");
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not listen on {port} in {netns} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The repository's `salt-states/` (the states the daemon dispatches), for
/// [`MasterOptions::file_roots`] or a local minion's `file_roots`.
pub fn salt_states_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("salt-states")
}
