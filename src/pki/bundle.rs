//! A server's key bundle: everything a fresh machine needs to join the
//! master(s) as the minion the registry issued, in one tar.gz.
//!
//! ```text
//! minion.pem              the issued private key (0600 in the archive)
//! minion.pub              its public key, as Salt writes minion.pub
//! master_sign.pub         the masters' shared signing key (verify_master_pubkey_sign)
//! minion.d/steward.conf   id, master list, failover, signature checking
//! install.sh              puts them in place on a Debian-like machine
//! ```

use std::io::Write as _;

use flate2::write::GzEncoder;
use flate2::Compression;

use super::KeyPair;

/// What goes into a bundle.
#[derive(Debug)]
pub struct BundleSpec<'a> {
    /// The minion id the registry chose.
    pub minion_id: &'a str,
    /// The issued pair.
    pub pair: &'a KeyPair,
    /// `master_sign.pub` text of the master(s).
    pub master_sign_pub: &'a str,
    /// `host` or `host:port` of each master; several means failover.
    pub masters: &'a [String],
    /// The masters' `transport` (`zeromq`, Salt's default, or `tcp`): a
    /// minion must speak the same one.
    pub transport: &'a str,
}

/// The minion config the bundle installs as `minion.d/steward.conf`.
pub fn minion_conf(spec: &BundleSpec<'_>) -> String {
    // JSON strings are valid YAML scalars: no quoting surprises in ids.
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let mut c = String::from("# Written by salt-steward: this machine's identity and masters.\n");
    c.push_str(&format!("id: {}\n", q(spec.minion_id)));
    match spec.masters {
        [one] => c.push_str(&format!("master: {}\n", q(one))),
        many => {
            c.push_str("master:\n");
            for m in many {
                c.push_str(&format!("  - {}\n", q(m)));
            }
            c.push_str("master_type: failover\n");
            // How often the minion checks its master is alive (failover needs it).
            c.push_str("master_alive_interval: 10\n");
            c.push_str("retry_dns: 0\n");
            // A run's return is dropped when the minion has failed over
            // since its publish; the copy it keeps lets the other master's
            // daemon record the run by its jid (`saltutil.find_cached_job`).
            c.push_str("cache_jobs: True\n");
        }
    }
    if !spec.transport.is_empty() && spec.transport != "zeromq" {
        c.push_str(&format!("transport: {}\n", q(spec.transport)));
    }
    c.push_str("verify_master_pubkey_sign: True\n");
    // Keep trying while an impostor's rejected key blocks this id: the
    // daemon removes that key when it sees the issued one refused.
    c.push_str("rejected_retry: True\n");
    c
}

/// The installer: stops the minion, installs keys and config with Salt's
/// modes, starts it again.
pub fn install_script(minion_id: &str) -> String {
    format!(
        r#"#!/bin/sh
# Installs the salt-steward bundle of minion {minion_id} on a Debian-like
# machine (salt-minion installed). Run as root from the unpacked bundle.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
conf=${{SALT_CONFIG_DIR:-/etc/salt}}
pki=${{SALT_PKI_DIR:-$conf/pki/minion}}
# The service is managed only for the system's own minion (no SALT_CONFIG_DIR).
service() {{
    if [ -z "${{SALT_CONFIG_DIR:-}}" ] && command -v systemctl >/dev/null 2>&1; then
        systemctl "$1" salt-minion
    fi
}}
service stop || true
install -d -m 0700 "$pki"
install -m 0400 "$here/minion.pem" "$pki/minion.pem"
install -m 0644 "$here/minion.pub" "$pki/minion.pub"
install -m 0644 "$here/master_sign.pub" "$pki/master_sign.pub"
# A master key cached from an earlier life of this machine would be refused.
rm -f "$pki/minion_master.pub"
install -d -m 0755 "$conf/minion.d"
install -m 0644 "$here/minion.d/steward.conf" "$conf/minion.d/steward.conf"
service start
echo "minion {minion_id} installed"
"#
    )
}

/// The bundle as tar.gz bytes.
pub fn build(spec: &BundleSpec<'_>) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let mut add = |path: &str, mode: u32, body: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(mode);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, path, body)
    };
    add("minion.pem", 0o600, spec.pair.private_pem().as_bytes())?;
    add("minion.pub", 0o644, spec.pair.public_pem().as_bytes())?;
    add("master_sign.pub", 0o644, spec.master_sign_pub.as_bytes())?;
    add("minion.d/steward.conf", 0o644, minion_conf(spec).as_bytes())?;
    add(
        "install.sh",
        0o755,
        install_script(spec.minion_id).as_bytes(),
    )?;
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    #[test]
    fn bundle_holds_the_keys_and_a_failover_config() {
        let pair = KeyPair::generate(2048).unwrap();
        let masters = vec!["10.0.0.1".to_owned(), "10.0.0.2:4516".to_owned()];
        let spec = BundleSpec {
            minion_id: "web01.example.org-0a1b2c3d",
            pair: &pair,
            master_sign_pub: "-----BEGIN PUBLIC KEY-----\nX\n-----END PUBLIC KEY-----\n",
            masters: &masters,
            transport: "zeromq",
        };
        let bytes = build(&spec).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
        let mut files = std::collections::BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mode = e.header().mode().unwrap();
            let mut body = String::new();
            e.read_to_string(&mut body).unwrap();
            files.insert(e.path().unwrap().display().to_string(), (mode, body));
        }
        assert_eq!(files["minion.pem"], (0o600, pair.private_pem().to_owned()));
        assert_eq!(files["minion.pub"].1, pair.public_pem());
        let conf: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&files["minion.d/steward.conf"].1).unwrap();
        assert_eq!(conf["id"], "web01.example.org-0a1b2c3d");
        assert_eq!(conf["master"][1], "10.0.0.2:4516");
        assert_eq!(conf["master_type"], "failover");
        assert_eq!(conf["cache_jobs"], true);
        assert_eq!(conf["verify_master_pubkey_sign"], true);
        assert_eq!(files["install.sh"].0, 0o755);
        let one = vec!["salt.example.org".to_owned()];
        let conf = minion_conf(&BundleSpec {
            masters: &one,
            ..spec
        });
        assert!(conf.contains("master: \"salt.example.org\"\n") && !conf.contains("failover"));
        assert!(
            !conf.contains("transport"),
            "Salt's default is left implicit"
        );
        let tcp = minion_conf(&BundleSpec {
            transport: "tcp",
            ..spec
        });
        assert!(tcp.contains("transport: \"tcp\"\n"), "{tcp}");
    }
}
