//! Network namespaces for tests that run real packet paths (nftables NAT,
//! a minion inside a "host"), never touching the machine's own interfaces,
//! tables or files.
//!
//! - [`Netns`]: one namespace of a test (unique name `ss<pid>n<k><role>`,
//!   `lo` up), commands inside it by `ip netns exec`, long-running processes
//!   inside it (killed by process group on drop), `ip netns del` on drop;
//!   namespaces of test processes that died without dropping theirs are
//!   deleted by the next test that makes one.
//! - [`NatLab`]: the Proxmox topology of the port-forward tests: `ext` (an
//!   outside client, 198.51.100.2, with a server answering its peer's
//!   address), `pve` (the host: `vmbr0` 198.51.100.1/24 towards ext, bridge
//!   `vmbr1` 10.99.0.1/24, forwarding on), `vm` (a guest 10.99.0.5/24 via
//!   10.99.0.1 with an HTTP server serving a marker file on :8080 and a UDP
//!   echo on :5353). Traffic stays inside these namespaces.
//! - [`LabProcess`]: a process in its own process group whose first stdout
//!   line `READY` is awaited (the servers of `lab_servers.py`), killed on drop.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// The servers and clients the labs run (`lab_servers.py`).
pub const LAB_SERVERS_PY: &str = include_str!("lab_servers.py");

/// Fails the test unless every program is installed, naming the command that
/// installs it. Never skips.
pub fn require_tools(tools: &[&str]) {
    for t in tools {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t} || test -x /usr/sbin/{t}"))
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            found,
            "{t} is not installed: run `scripts/install-system-packages` as root \
             (apt-get install nftables iptables conntrack nginx socat curl iproute2)"
        );
    }
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "network-namespace and nginx tests need root (ip netns, nft, nginx's workers)"
    );
}

/// The system Python 3 (not a pyenv shim), for the lab servers.
pub fn python3() -> PathBuf {
    let system = Path::new("/usr/bin/python3");
    if system.is_file() {
        system.to_owned()
    } else {
        PathBuf::from("python3")
    }
}

/// Writes `lab_servers.py` into `dir` and returns its path.
pub fn lab_servers_script(dir: &Path) -> PathBuf {
    let path = dir.join("lab_servers.py");
    if !path.exists() {
        fs::write(&path, LAB_SERVERS_PY).unwrap();
    }
    path
}

/// A process of a lab in a process group of its own; killed on drop.
#[derive(Debug)]
pub struct LabProcess {
    pub label: String,
    child: Child,
    log: PathBuf,
}

impl LabProcess {
    /// Spawns `cmd` (stderr to `log`) without waiting for anything.
    pub fn spawn(label: &str, mut cmd: Command, log: &Path) -> Self {
        let err = fs::File::create(log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(err.try_clone().unwrap())
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {label} ({cmd:?}): {e}"));
        Self {
            label: label.to_owned(),
            child,
            log: log.to_owned(),
        }
    }

    /// Spawns `cmd` and waits (at most `timeout`) for `READY` on its stdout;
    /// later stdout lines go to `log` (with stderr) by a reader thread.
    pub fn spawn_ready(label: &str, mut cmd: Command, log: &Path, timeout: Duration) -> Self {
        let err = fs::File::create(log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {label} ({cmd:?}): {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Self {
            label: label.to_owned(),
            child,
            log: log.to_owned(),
        };
        match rx.recv_timeout(timeout) {
            Ok(l) if l.trim() == "READY" => p,
            other => {
                let status = p.child.try_wait().ok().flatten();
                p.stop();
                panic!(
                    "{label} did not say READY within {timeout:?} ({other:?}, exit {status:?}); \
                     stderr:\n{}",
                    fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What it wrote to its log.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// TERM the group, wait up to 5 s, then KILL it. Idempotent.
    pub fn stop(&mut self) {
        let pgid = Pid::from_raw(self.pid());
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = killpg(pgid, Signal::SIGKILL);
            return;
        }
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Deletes the test namespaces (`ss<pid>n…`) of processes that are gone.
fn sweep_stale() {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("ss") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('n') else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A network namespace of this test; deleted (its processes killed) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    procs: Vec<LabProcess>,
}

impl Netns {
    /// Creates `ss<pid>n<k><role>` with `lo` up. `role` is a short word
    /// (letters), e.g. `pve`.
    pub fn new(role: &str) -> Self {
        require_tools(&["ip"]);
        if NEXT.load(Ordering::SeqCst) == 0 {
            sweep_stale();
        }
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("ss{}n{k}{role}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Self {
            name,
            procs: Vec::new(),
        };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (for `ip netns exec NAME`, `ip -n NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program args…`, not yet run.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, program: S) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args` inside (bounded by the command itself); its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]).stdin(Stdio::null());
        cmd.output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {args:?}: {e}", self.name))
    }

    /// Runs `args` inside; it must exit 0. Its stdout.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "in netns {}: {args:?} failed ({:?}):\n{}{}",
            self.name,
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a sysctl of this namespace (`/proc/sys/...` inside it).
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec_ok(&["sysctl", "-q", "-w", &format!("{key}={value}")]);
    }

    /// Starts a long-running `args` inside, stderr/stdout to `log`; killed
    /// (process group) on drop of the namespace.
    pub fn spawn(&mut self, label: &str, args: &[&str], log: &Path) -> &mut LabProcess {
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]);
        self.procs.push(LabProcess::spawn(label, cmd, log));
        self.procs.last_mut().unwrap()
    }

    /// Like [`spawn`](Self::spawn), waiting for `READY` on its stdout.
    pub fn spawn_ready(&mut self, label: &str, args: &[&str], log: &Path) -> &mut LabProcess {
        let mut cmd = self.command(args[0]);
        cmd.args(&args[1..]);
        self.procs.push(LabProcess::spawn_ready(
            label,
            cmd,
            log,
            Duration::from_secs(20),
        ));
        self.procs.last_mut().unwrap()
    }

    /// Adopts a process started inside by other means (killed on drop).
    pub fn adopt(&mut self, p: LabProcess) {
        self.procs.push(p);
    }

    /// Waits (bounded) until something listens on TCP `port` inside.
    pub fn wait_tcp_listen(&self, port: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.exec(&["ss", "-Hltn", &format!("sport = :{port}")]);
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on tcp port {port} in {} within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.stop();
        }
        self.procs.clear();
        // Anything else still inside (a child that left our process group).
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Addresses of the [`NatLab`].
pub const EXT_CLIENT: &str = "198.51.100.2";
pub const PVE_PUBLIC: &str = "198.51.100.1";
pub const PVE_BRIDGE: &str = "10.99.0.1";
pub const VM_IP: &str = "10.99.0.5";
pub const INTERNAL_NETWORK: &str = "10.99.0.0/24";
/// The outside server (in ext) that answers the address it saw.
pub const EXT_PEER_PORT: u16 = 8000;
pub const VM_HTTP_PORT: u16 = 8080;
pub const VM_UDP_PORT: u16 = 5353;

/// The port-forward topology: ext — (vmbr0) pve (vmbr1) — vm.
///
/// Field order is drop order: the namespaces go before their directory.
#[derive(Debug)]
pub struct NatLab {
    pub ext: Netns,
    pub pve: Netns,
    pub vm: Netns,
    /// The body of `http://10.99.0.5:8080/marker`.
    pub marker: String,
    pub dir: tempfile::TempDir,
    script: PathBuf,
}

impl NatLab {
    /// Builds the three namespaces, their links and addresses, and starts the
    /// servers (each awaited until bound).
    pub fn start() -> Self {
        require_tools(&["ip", "nft", "iptables", "conntrack", "curl", "ss", "sysctl"]);
        let dir = tempfile::Builder::new()
            .prefix("ss-nat-")
            .tempdir()
            .unwrap();
        let script = lab_servers_script(dir.path());
        let mut ext = Netns::new("ext");
        let pve = Netns::new("pve");
        let mut vm = Netns::new("vm");

        // ext <-> pve: veth made inside pve, its peer moved straight to ext.
        pve.exec_ok(&[
            "ip",
            "link",
            "add",
            "vmbr0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ext.name(),
        ]);
        pve.exec_ok(&["ip", "addr", "add", "198.51.100.1/24", "dev", "vmbr0"]);
        pve.exec_ok(&["ip", "link", "set", "vmbr0", "up"]);
        ext.exec_ok(&["ip", "addr", "add", "198.51.100.2/24", "dev", "eth0"]);
        ext.exec_ok(&["ip", "link", "set", "eth0", "up"]);

        // pve's guest bridge and the vm's link on it.
        pve.exec_ok(&["ip", "link", "add", "vmbr1", "type", "bridge"]);
        pve.exec_ok(&["ip", "addr", "add", "10.99.0.1/24", "dev", "vmbr1"]);
        pve.exec_ok(&["ip", "link", "set", "vmbr1", "up"]);
        pve.exec_ok(&[
            "ip",
            "link",
            "add",
            "tap100",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            vm.name(),
        ]);
        pve.exec_ok(&["ip", "link", "set", "tap100", "master", "vmbr1"]);
        pve.exec_ok(&["ip", "link", "set", "tap100", "up"]);
        vm.exec_ok(&["ip", "addr", "add", "10.99.0.5/24", "dev", "eth0"]);
        vm.exec_ok(&["ip", "link", "set", "eth0", "up"]);
        vm.exec_ok(&["ip", "route", "add", "default", "via", PVE_BRIDGE]);
        pve.sysctl("net.ipv4.ip_forward", "1");

        // Servers.
        let www = dir.path().join("www");
        fs::create_dir_all(&www).unwrap();
        let marker = format!("marker-of-vm-{}-{}", std::process::id(), rand_suffix());
        fs::write(www.join("marker"), &marker).unwrap();
        let py = python3();
        let py = py.to_str().unwrap();
        let s = script.to_str().unwrap();
        let d = dir.path();
        ext.spawn_ready(
            "ext peer server",
            &[py, s, "http-peer", EXT_CLIENT, &EXT_PEER_PORT.to_string()],
            &d.join("ext-peer.log"),
        );
        vm.spawn_ready(
            "vm http server",
            &[
                py,
                s,
                "http-dir",
                VM_IP,
                &VM_HTTP_PORT.to_string(),
                www.to_str().unwrap(),
            ],
            &d.join("vm-http.log"),
        );
        vm.spawn_ready(
            "vm udp echo",
            &[py, s, "udp-echo", VM_IP, &VM_UDP_PORT.to_string()],
            &d.join("vm-udp.log"),
        );
        Self {
            ext,
            pve,
            vm,
            marker,
            dir,
            script,
        }
    }

    /// From ext: `GET http://IP:PORT/marker` (curl, 3 s at most). The body,
    /// or curl's error (e.g. "Connection refused", a timeout).
    pub fn client_http(&self, ip: &str, port: u16) -> Result<String, String> {
        curl_in(&self.ext, &format!("http://{ip}:{port}/marker"))
    }

    /// From ext: one UDP datagram to IP:PORT from an ephemeral port; the
    /// answer, or why there was none ("connection refused", "no answer").
    pub fn client_udp(&self, ip: &str, port: u16, payload: &str) -> Result<String, String> {
        self.udp(ip, port, payload, None)
    }

    /// Like [`client_udp`](Self::client_udp) from a fixed source port, so
    /// successive calls are one conntrack flow.
    pub fn client_udp_from(
        &self,
        src_port: u16,
        ip: &str,
        port: u16,
        payload: &str,
    ) -> Result<String, String> {
        self.udp(ip, port, payload, Some(src_port))
    }

    fn udp(&self, ip: &str, port: u16, payload: &str, src: Option<u16>) -> Result<String, String> {
        let py = python3();
        let port = port.to_string();
        let src = src.map(|p| p.to_string());
        let mut args = vec![
            py.to_str().unwrap(),
            self.script.to_str().unwrap(),
            "udp-client",
            ip,
            &port,
            payload,
        ];
        if let Some(s) = &src {
            args.push(s);
        }
        let out = self.ext.exec(&args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// The minion config lines that point steward.portfwd's files (config
    /// dir, sysctl file, boot unit) into this lab's temp dir; nft and
    /// conntrack are the system's, run inside the pve namespace.
    pub fn portfwd_settings(&self) -> String {
        format!(
            "steward:\n  portfwd:\n    config_dir: {d}/etc\n    sysctl_conf: {d}/sysctl.d/90-salt-steward-portfwd.conf\n    unit_dir: {d}/systemd\n",
            d = self.dir.path().display()
        )
    }

    /// Our table (`ip salt_steward_portfwd`) as nft lists it in pve (empty
    /// when it does not exist).
    pub fn portfwd_table(&self) -> String {
        let out = self
            .pve
            .exec(&["nft", "list", "table", "ip", "salt_steward_portfwd"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Loads state that is not ours into pve: an nft table of another owner
    /// and an iptables-nft rule in `ip nat`; [`foreign_state`](Self::foreign_state)
    /// reads both back.
    pub fn load_foreign(&self) {
        let pve = &self.pve;
        pve.exec_ok(&["nft", "add", "table", "inet", "other"]);
        pve.exec_ok(&[
            "nft",
            "add chain inet other input { type filter hook input priority 10; policy accept; }",
        ]);
        pve.exec_ok(&[
            "nft",
            "add rule inet other input tcp dport 9999 counter accept comment \"not ours\"",
        ]);
        pve.exec_ok(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.77.0.0/24",
            "-j",
            "MASQUERADE",
        ]);
    }

    /// The foreign table and pve's `iptables-save -t nat` (without its
    /// timestamped comment lines), to compare byte for byte.
    pub fn foreign_state(&self) -> (String, String) {
        let nft = self.pve.exec_ok(&["nft", "list", "table", "inet", "other"]);
        let ipt = self
            .pve
            .exec_ok(&["iptables-save", "-t", "nat"])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        (nft, ipt)
    }

    /// From the vm: `GET http://198.51.100.2:8000/`: the source address the
    /// outside server saw (198.51.100.1 when masqueraded). Without the
    /// masquerade the answer cannot come back (ext has no route to
    /// 10.99.0.0/24): curl's timeout error.
    pub fn vm_fetch_outside(&self) -> Result<String, String> {
        curl_in(&self.vm, &format!("http://{EXT_CLIENT}:{EXT_PEER_PORT}/"))
    }
}

/// A connection refused: curl's exit 7 ("Couldn't connect to server", an
/// RST from pve, where nothing listens) or the UDP client's ICMP port
/// unreachable; not a timeout.
pub fn refused(err: &str) -> bool {
    err.contains("exit Some(7)") || err.contains("connection refused")
}

/// `curl -sS --max-time 3 URL` inside `ns`: the body or curl's error.
pub fn curl_in(ns: &Netns, url: &str) -> Result<String, String> {
    let out = ns.exec(&["curl", "-sS", "--max-time", "3", "--noproxy", "*", url]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "curl {url}: exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0)
}
