//! A private sshd on loopback, standing for a backup source's SSH.
//!
//! Everything lives in a temp dir `T`: its own ed25519 host key
//! (`T/hostkeys/ssh_host_ed25519_key`, the dir a source's
//! `steward:backup_source:host_keys_dir` names), `T/sshd_config`, the pid
//! file and the log; `AuthorizedKeysFile T/authorized_keys/%u`, so root's
//! keys are `T/authorized_keys/root` (the source's
//! `steward:backup_source:authorized_keys`). It listens on
//! `127.0.0.1:<free port>` only, in the foreground (`-D -e`) in its own
//! process group, and is stopped on drop. Nothing under /etc/ssh or
//! /root/.ssh is read or written (sshd only needs its privilege-separation
//! directory /run/sshd, created empty when missing, as the package does).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::netns::{require_tools, LabProcess};

/// The sshd lab. Field order is drop order: the process before its dir.
#[derive(Debug)]
pub struct Sshd {
    process: Option<LabProcess>,
    pub port: u16,
    /// Holds `ssh_host_ed25519_key.pub` (and the private key, 0600).
    pub host_keys_dir: PathBuf,
    /// The file sshd reads root's keys from.
    pub authorized_keys: PathBuf,
    dir: tempfile::TempDir,
}

impl Sshd {
    /// Generates the host key, writes the config (checked with `sshd -t`)
    /// and starts sshd; returns once it listens.
    pub fn start() -> Self {
        require_tools(&["sshd", "ssh", "ssh-keygen"]);
        let dir = tempfile::Builder::new()
            .prefix("ss-sshd-")
            .tempdir()
            .unwrap();
        let t = dir.path();
        let host_keys_dir = t.join("hostkeys");
        fs::create_dir_all(&host_keys_dir).unwrap();
        fs::create_dir_all(t.join("authorized_keys")).unwrap();
        let host_key = host_keys_dir.join("ssh_host_ed25519_key");
        keygen(&host_key, "test-sshd-host-key");
        let port = super::salt::free_port();
        let config = format!(
            "# Private sshd of a salt-steward test.\n\
             Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {hk}\n\
             PidFile {t}/sshd.pid\n\
             AuthorizedKeysFile {t}/authorized_keys/%u\n\
             AuthorizedPrincipalsFile none\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             UseDNS no\n\
             PermitUserEnvironment no\n\
             # The temp dir is under /tmp (mode 1777), which StrictModes refuses.\n\
             StrictModes no\n\
             LogLevel VERBOSE\n",
            hk = host_key.display(),
            t = t.display(),
        );
        let config_path = t.join("sshd_config");
        fs::write(&config_path, config).unwrap();
        // sshd's privilege separation directory (the package creates it at boot).
        if !Path::new("/run/sshd").is_dir() {
            fs::create_dir_all("/run/sshd").unwrap();
        }
        let check = Command::new(sshd_bin())
            .arg("-t")
            .arg("-f")
            .arg(&config_path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "sshd -t refused the test config: {}",
            crate::support::text(&check)
        );
        let mut cmd = Command::new(sshd_bin());
        cmd.args(["-D", "-e", "-f"]).arg(&config_path);
        let log = t.join("sshd.log");
        let mut process = LabProcess::spawn("sshd", cmd, &log);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if !process.running() {
                panic!("sshd exited: {}", process.log_text());
            }
            if process
                .log_text()
                .contains(&format!("Server listening on 127.0.0.1 port {port}"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not listen within 20 s: {}",
                process.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            process: Some(process),
            port,
            authorized_keys: t.join("authorized_keys/root"),
            host_keys_dir,
            dir,
        }
    }

    /// `ssh-ed25519 AAAA…` of the host key (no comment).
    pub fn host_key(&self) -> String {
        let text = fs::read_to_string(self.host_keys_dir.join("ssh_host_ed25519_key.pub")).unwrap();
        let mut parts = text.split_whitespace();
        format!("{} {}", parts.next().unwrap(), parts.next().unwrap())
    }

    /// What sshd logged so far (authentication and forced commands).
    pub fn log_text(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default()
    }

    /// The lab's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop();
        }
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "sshd lab kept for inspection: {}",
                self.dir.path().display()
            );
        }
    }
}

/// `ssh-keygen -q -t ed25519 -N '' -C comment -f path` (private key 0600).
pub fn keygen(path: &Path, comment: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        crate::support::text(&out)
    );
}

/// The sshd binary (`/usr/sbin/sshd` on Debian).
pub fn sshd_bin() -> PathBuf {
    let p = Path::new("/usr/sbin/sshd");
    if p.is_file() {
        p.to_owned()
    } else {
        PathBuf::from("sshd")
    }
}
