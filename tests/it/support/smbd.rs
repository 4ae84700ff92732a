//! A private smbd on loopback for the share-state tests, the system users
//! they create (removed on drop), and the NT-hash / RSA-OAEP helpers that
//! build the pillar the way the daemon will.
//!
//! Everything of the lab lives under a temp dir `T`: `T/smb.conf` (standalone
//! server on `127.0.0.1:<port>` only, no NetBIOS, no printers, every
//! private/lock/state/cache/pid/ncalrpc directory under `T`, one admin share
//! `[admin]` of its own), the shares file and the state directory the state
//! is pointed at, the base folder `T/base`. smbd runs in the foreground in its
//! own process group, with a `samba-dcerpcd` of the same config (smbd would
//! start one on demand with the machine's config, which `smbclient -L` needs
//! for the share list), both stopped on drop. Nothing under /etc/samba or
//! /var/lib/samba is read or written.

use std::fs;
use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::netns::{require_tools, LabProcess};

/// The lab. Field order is drop order: processes before the directory.
#[derive(Debug)]
pub struct SmbdLab {
    smbd: Option<LabProcess>,
    dcerpcd: Option<LabProcess>,
    pub port: u16,
    /// `T`.
    pub root: PathBuf,
    pub smb_conf: PathBuf,
    pub shares_file: PathBuf,
    pub state_dir: PathBuf,
    /// The base folder of the pillar (`T/base`).
    pub base: PathBuf,
    client_conf: PathBuf,
    dir: tempfile::TempDir,
}

/// The admin's own smb.conf of the lab, before the state adds its include.
const ADMIN_SHARE: &str = "admin";

impl SmbdLab {
    /// Writes the config and starts smbd and samba-dcerpcd; waits until smbd
    /// accepts connections and the share list service is there.
    pub fn start() -> Self {
        require_tools(&["smbd", "smbclient", "pdbedit", "testparm", "smbcontrol"]);
        let dir = tempfile::Builder::new()
            .prefix("ss-smbd-")
            .tempdir()
            .unwrap();
        let root = dir.path().to_owned();
        for d in [
            "private", "lock", "state", "cache", "pid", "ncalrpc", "log", "base", "admin",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let port = super::salt::free_port();
        let t = root.display();
        let conf = format!(
            "# The admin's smb.conf of a salt-steward test: steward.share adds only\n\
             # its include line.\n\
             [global]\n\
             \x20  server role = standalone server\n\
             \x20  workgroup = SSTEST\n\
             \x20  netbios name = SSTEST\n\
             \x20  interfaces = 127.0.0.1\n\
             \x20  bind interfaces only = yes\n\
             \x20  smb ports = {port}\n\
             \x20  disable netbios = yes\n\
             \x20  private dir = {t}/private\n\
             \x20  lock directory = {t}/lock\n\
             \x20  state directory = {t}/state\n\
             \x20  cache directory = {t}/cache\n\
             \x20  pid directory = {t}/pid\n\
             \x20  ncalrpc dir = {t}/ncalrpc\n\
             \x20  log file = {t}/log/%m.log\n\
             \x20  load printers = no\n\
             \x20  printing = bsd\n\
             \x20  printcap name = /dev/null\n\
             \x20  disable spoolss = yes\n\
             \x20  usershare max shares = 0\n\
             \x20  rpc start on demand helpers = no\n\
             \x20  passdb backend = tdbsam\n\
             \n\
             [{ADMIN_SHARE}]\n\
             \x20  path = {t}/admin\n\
             \x20  read only = yes\n"
        );
        let smb_conf = root.join("smb.conf");
        fs::write(&smb_conf, conf).unwrap();
        let client_conf = root.join("client.conf");
        fs::write(&client_conf, "[global]\n   client min protocol = SMB2\n").unwrap();
        let mut lab = Self {
            smbd: None,
            dcerpcd: None,
            port,
            shares_file: root.join("salt-steward-shares.conf"),
            state_dir: root.join("steward-state"),
            base: root.join("base"),
            smb_conf,
            client_conf,
            root,
            dir,
        };
        lab.spawn();
        lab
    }

    fn spawn(&mut self) {
        let conf = self.smb_conf.display().to_string();
        let mut smbd = Command::new(sbin("smbd"));
        smbd.args(["-F", "--no-process-group", "--debug-stdout", "-s", &conf]);
        self.smbd = Some(LabProcess::spawn("smbd", smbd, &self.root.join("smbd.out")));
        let mut rpc = Command::new("/usr/libexec/samba/samba-dcerpcd");
        rpc.args([
            "-F",
            "--no-process-group",
            "--libexec-rpcds",
            "--debug-stdout",
            "-s",
            &conf,
        ]);
        self.dcerpcd = Some(LabProcess::spawn(
            "samba-dcerpcd",
            rpc,
            &self.root.join("dcerpcd.out"),
        ));
        let srvsvc = self.root.join("ncalrpc/np/srvsvc");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for p in [&mut self.smbd, &mut self.dcerpcd].into_iter().flatten() {
                assert!(p.running(), "{} exited:\n{}", p.label, p.log_text());
            }
            let listening = TcpStream::connect_timeout(
                &([127, 0, 0, 1], self.port).into(),
                Duration::from_secs(1),
            )
            .is_ok();
            if listening && srvsvc.exists() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "smbd/samba-dcerpcd not ready within 30 s:\n{}\n{}",
                self.smbd.as_ref().unwrap().log_text(),
                self.dcerpcd.as_ref().unwrap().log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The minion config lines pointing steward.share at this lab, plus
    /// `extra` lines inside `steward:share:` (indented by 4).
    pub fn minion_settings(&self, extra: &str) -> String {
        format!(
            "steward:\n  share:\n    smb_conf: {}\n    shares_file: {}\n    state_dir: {}\n{extra}",
            self.smb_conf.display(),
            self.shares_file.display(),
            self.state_dir.display(),
        )
    }

    /// `smbclient //127.0.0.1/SHARE -p PORT -U USER%PASSWORD -c COMMANDS`
    /// (the credentials through an authentication file, 0600, not argv):
    /// stdout, or the error.
    pub fn smbclient(
        &self,
        share: &str,
        user: &str,
        password: &str,
        commands: &str,
    ) -> Result<String, String> {
        let auth = self.auth_file(user, password);
        let out = Command::new("smbclient")
            .arg("-s")
            .arg(&self.client_conf)
            .arg(format!("//127.0.0.1/{share}"))
            .args(["-p", &self.port.to_string(), "-A"])
            .arg(auth.path())
            .args(["-c", commands])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "smbclient exit {:?}: {}",
                out.status.code(),
                text.trim()
            ))
        }
    }

    /// The disk shares `smbclient -L` lists (as `user`).
    pub fn list_shares(&self, user: &str, password: &str) -> Result<Vec<String>, String> {
        let auth = self.auth_file(user, password);
        let out = Command::new("smbclient")
            .arg("-s")
            .arg(&self.client_conf)
            .args([
                "-L",
                "//127.0.0.1",
                "-g",
                "-p",
                &self.port.to_string(),
                "-A",
            ])
            .arg(auth.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "smbclient -L exit {:?}: {text}{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("Disk|"))
            .map(|l| l.split('|').next().unwrap_or_default().to_owned())
            .collect())
    }

    /// An smbclient authentication file (0600, removed when dropped): the
    /// password is not on smbclient's command line.
    fn auth_file(&self, user: &str, password: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .prefix("auth-")
            .tempfile_in(&self.root)
            .unwrap();
        write!(f, "username = {user}\npassword = {password}\n").unwrap();
        f.flush().unwrap();
        f
    }

    /// The user names in the lab's passdb (`pdbedit -L`).
    pub fn passdb_users(&self) -> Vec<String> {
        let out = Command::new("pdbedit")
            .arg("-s")
            .arg(&self.smb_conf)
            .arg("-L")
            .output()
            .unwrap();
        assert!(out.status.success(), "pdbedit -L: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').next())
            .map(str::to_owned)
            .collect()
    }

    /// The lab's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.dcerpcd.take() {
            p.stop();
        }
        if let Some(mut p) = self.smbd.take() {
            p.stop();
        }
    }
}

impl Drop for SmbdLab {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "smbd lab kept for inspection: {}",
                self.dir.path().display()
            );
        }
    }
}

fn sbin(name: &str) -> PathBuf {
    let p = Path::new("/usr/sbin").join(name);
    if p.is_file() {
        p
    } else {
        PathBuf::from(name)
    }
}

/// The system users a test has the state create: names `sst<pid>u<suffix>`
/// (unique to the test process), each deleted on drop (`userdel`, also when
/// the test fails). Users of test processes that are gone are deleted by the
/// next guard made.
#[derive(Debug)]
pub struct TestUsers {
    prefix: String,
}

impl TestUsers {
    pub fn new() -> Self {
        sweep_stale_users();
        Self {
            prefix: format!("sst{}u", std::process::id()),
        }
    }

    /// A user name of this test (`sst<pid>u<suffix>`).
    pub fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// Whether `name` is in the system's user database.
    pub fn exists(name: &str) -> bool {
        Command::new("getent")
            .args(["passwd", name])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    }
}

impl Drop for TestUsers {
    fn drop(&mut self) {
        for name in users_with_prefix(&self.prefix) {
            let _ = Command::new("userdel").arg(&name).status();
        }
    }
}

fn users_with_prefix(prefix: &str) -> Vec<String> {
    fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// Deletes the `sst<pid>u…` users of test processes that are gone.
fn sweep_stale_users() {
    for name in users_with_prefix("sst") {
        let Some(rest) = name.strip_prefix("sst") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('u') else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("userdel").arg(&name).status();
        }
    }
}

/// Writes a fresh RSA key as the minion's `minion.pem` / `minion.pub` into
/// `pki_dir` (`openssl genrsa -traditional`: PKCS#1 like Salt's own keys; the
/// public key as SubjectPublicKeyInfo like the master's copy in
/// `pki/master/minions/<id>`); the public key's PEM.
pub fn write_minion_key(pki_dir: &Path) -> String {
    fs::create_dir_all(pki_dir).unwrap();
    let pem = pki_dir.join("minion.pem");
    let out = Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&pem)
        .arg("2048")
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl genrsa: {out:?}");
    let out = Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl rsa -pubout: {out:?}");
    let public = String::from_utf8(out.stdout).unwrap();
    fs::write(pki_dir.join("minion.pub"), &public).unwrap();
    public
}

/// `nt_hash_enc` of the pillar for `password`: the NT hash
/// (MD4(UTF-16LE(password))) as 32 lowercase hex digits, RSA-OAEP encrypted
/// (MGF1 and digest SHA-256, empty label) with the minion's public key
/// (SPKI PEM), base64 (standard alphabet, padded).
pub fn nt_hash_enc(public_pem: &str, password: &str) -> String {
    use rsa::pkcs8::DecodePublicKey as _;
    let key = rsa::RsaPublicKey::from_public_key_pem(public_pem.trim()).unwrap();
    let hex = nt_hash_hex(password);
    let mut rng = rand_core::OsRng;
    let enc = key
        .encrypt(&mut rng, rsa::Oaep::new::<sha2::Sha256>(), hex.as_bytes())
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(enc)
}

/// The NT hash of `password`, lowercase hex.
pub fn nt_hash_hex(password: &str) -> String {
    let utf16: Vec<u8> = password.encode_utf16().flat_map(u16::to_le_bytes).collect();
    md4(&utf16).iter().map(|b| format!("{b:02x}")).collect()
}

/// MD4 (RFC 1320), from the `md4` crate the daemon uses (OpenSSL 3 has no
/// MD4 without its legacy provider).
pub fn md4(message: &[u8]) -> [u8; 16] {
    use md4::Digest as _;
    md4::Md4::digest(message).into()
}

/// Asserts that an `smbclient` login was refused for its password.
pub fn logon_refused(r: Result<String, String>) {
    match r {
        Ok(out) => panic!("the login was accepted:\n{out}"),
        Err(e) => assert!(e.contains("NT_STATUS_LOGON_FAILURE"), "{e}"),
    }
}
