//! Issuing minion key pairs for servers: the registry keeps the public key,
//! the private key lives only in `<keys_dir>/<minion_id>.pem` (0600) until
//! it goes into the server's bundle.
//!
//! RSA generation takes a fraction of a second to seconds, so pairs are
//! pre-generated into a pool directory (`<keys_dir>/pool/<bits>/`) by the
//! daemon; anyone creating a server (the daemon or the CLI, in another
//! process) claims one with an atomic `rename`, so no pair is ever handed
//! out twice. An empty pool means generating on the spot.
//!
//! `preseed` mode: the public key is also written where the master keeps
//! accepted keys (`<pki_dir>/minions/<id>`, clean_key'd text, no trailing
//! newline, as Salt writes it), so the master accepts that key at the
//! minion's first connection and denies any other.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::files;
use super::keys::KeyPair;
use crate::config::{AcceptMode, Settings};
use crate::master_config::MasterConfig;

/// Where a claimed pair went and what the registry records of it.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The public key, clean_key'd (as the master stores it).
    pub public_clean: String,
    /// `salt-key -F` fingerprint.
    pub fingerprint: String,
}

/// Why a key could not be issued or installed (the message names the file).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IssueError(pub String);

/// Issues, stores and (in preseed mode) installs minion keys.
#[derive(Debug, Clone)]
pub struct KeyIssuer {
    dir: PathBuf,
    bits: usize,
    preseed_dir: Option<PathBuf>,
}

impl KeyIssuer {
    /// The issuer the settings describe. In preseed mode it needs the
    /// master's pki_dir, and refuses a master whose key cache is not the
    /// plain files (3007's `keys.cache_driver`), where a written file would
    /// not be seen.
    pub fn configured(settings: &Settings) -> anyhow::Result<Self> {
        let keys = &settings.keys;
        let issuer = Self::new(&keys.dir, keys.bits)
            .with_context(|| format!("keys.dir {}", keys.dir.display()))?;
        if keys.accept_mode != AcceptMode::Preseed {
            return Ok(issuer);
        }
        let master = MasterConfig::load(&settings.master_config)?;
        if master.keys_cache_driver != "localfs_key" {
            anyhow::bail!(
                "keys.accept_mode preseed needs the master's keys in plain files, but {} sets \
                 keys.cache_driver: {}; use accept_mode: verify",
                master.path.display(),
                master.keys_cache_driver
            );
        }
        Ok(issuer.with_preseed(&master.pki_dir))
    }

    /// Keys of `bits` bits kept under `dir` (created 0700 if missing).
    pub fn new(dir: &Path, bits: usize) -> Result<Self, IssueError> {
        let me = Self {
            dir: dir.to_owned(),
            bits,
            preseed_dir: None,
        };
        files::private_dir(&me.pool_dir()).map_err(|e| IssueError(e.to_string()))?;
        Ok(me)
    }

    /// Also writes each issued public key into `<pki_dir>/minions/`.
    pub fn with_preseed(mut self, pki_dir: &Path) -> Self {
        self.preseed_dir = Some(pki_dir.join("minions"));
        self
    }

    /// RSA size of the keys issued.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// The pool of pre-generated pairs of this size.
    pub fn pool_dir(&self) -> PathBuf {
        self.dir.join("pool").join(self.bits.to_string())
    }

    /// The private key file of `minion_id`.
    pub fn private_path(&self, minion_id: &str) -> PathBuf {
        self.dir.join(format!("{minion_id}.pem"))
    }

    /// Where a new pair for `minion_id` waits while a rekey is committed.
    fn next_path(&self, minion_id: &str) -> PathBuf {
        self.dir.join(format!("{minion_id}.pem.next"))
    }

    /// Issues the first pair of `minion_id` (its private key file must not exist).
    pub async fn issue(&self, minion_id: &str) -> Result<Issued, IssueError> {
        self.claim_into(&self.private_path(minion_id)).await
    }

    /// Issues a replacement pair; it takes effect with [`Self::commit_reissue`].
    pub async fn reissue(&self, minion_id: &str) -> Result<Issued, IssueError> {
        let next = self.next_path(minion_id);
        let _ = std::fs::remove_file(&next);
        self.claim_into(&next).await
    }

    /// Makes the pair from [`Self::reissue`] the current one.
    pub fn commit_reissue(&self, minion_id: &str) -> Result<(), IssueError> {
        std::fs::rename(self.next_path(minion_id), self.private_path(minion_id))
            .map_err(|e| IssueError(format!("{}: {e}", self.private_path(minion_id).display())))
    }

    /// Forgets a pair issued for a server that was then not written
    /// (current or pending replacement).
    pub fn discard(&self, minion_id: &str, reissue: bool) {
        let path = if reissue {
            self.next_path(minion_id)
        } else {
            self.private_path(minion_id)
        };
        let _ = std::fs::remove_file(path);
    }

    /// The private key of `minion_id` (for its bundle).
    pub fn private_pem(&self, minion_id: &str) -> Result<KeyPair, IssueError> {
        let path = self.private_path(minion_id);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| IssueError(format!("{}: {e}", path.display())))?;
        KeyPair::from_private_pem(&text).map_err(|e| IssueError(format!("{}: {e}", path.display())))
    }

    /// In preseed mode, installs `public_clean` as the accepted key of
    /// `minion_id` (replacing an older one: rekey). Otherwise does nothing.
    pub fn preseed(&self, minion_id: &str, public_clean: &str) -> Result<(), IssueError> {
        let Some(dir) = &self.preseed_dir else {
            return Ok(());
        };
        let target = dir.join(minion_id);
        let tmp = dir.join(format!(".{minion_id}.steward-tmp"));
        let _ = std::fs::remove_file(&tmp);
        files::create_public(&tmp, public_clean)
            .and_then(|()| std::fs::rename(&tmp, &target))
            .map_err(|e| IssueError(format!("preseeding {}: {e}", target.display())))
    }

    /// Number of pairs waiting in the pool.
    pub fn pool_len(&self) -> usize {
        std::fs::read_dir(self.pool_dir())
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".pem"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Generates one pair into the pool (blocking: run it off the runtime).
    pub fn generate_into_pool(&self) -> Result<(), IssueError> {
        let pair = KeyPair::generate(self.bits).map_err(|e| IssueError(e.to_string()))?;
        let name = random_name();
        let tmp = self.pool_dir().join(format!(".{name}.tmp"));
        files::create_private(&tmp, pair.private_pem())
            .and_then(|()| std::fs::rename(&tmp, self.pool_dir().join(format!("{name}.pem"))))
            .map_err(|e| IssueError(e.to_string()))
    }

    /// Moves a pooled pair to `target` (or generates one there) and reads it.
    async fn claim_into(&self, target: &Path) -> Result<Issued, IssueError> {
        let named = |e: &dyn std::fmt::Display| IssueError(format!("{}: {e}", target.display()));
        let claimed = std::fs::read_dir(self.pool_dir())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pem"))
            // Another process may take the same file first: rename is atomic,
            // the loser gets NotFound and tries the next.
            .any(|e| std::fs::rename(e.path(), target).is_ok());
        let pair = if claimed {
            let text = std::fs::read_to_string(target).map_err(|e| named(&e))?;
            KeyPair::from_private_pem(&text).map_err(|e| named(&e))?
        } else {
            let bits = self.bits;
            let pair = tokio::task::spawn_blocking(move || KeyPair::generate(bits))
                .await
                .map_err(|e| named(&e))?
                .map_err(|e| named(&e))?;
            files::create_private(target, pair.private_pem()).map_err(|e| named(&e))?;
            pair
        };
        Ok(Issued {
            public_clean: pair.public_clean(),
            fingerprint: pair.fingerprint(),
        })
    }
}

fn random_name() -> String {
    let mut b = [0u8; 12];
    // Uniqueness only (the content is random anyway): fall back to the time.
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b[..12].copy_from_slice(&t.to_le_bytes()[..12]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[tokio::test]
    async fn pooled_pairs_are_claimed_once_and_private_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let iss = KeyIssuer::new(dir.path(), 2048).unwrap();
        iss.generate_into_pool().unwrap();
        assert_eq!(iss.pool_len(), 1);
        let a = iss.issue("a-1").await.unwrap();
        assert_eq!(iss.pool_len(), 0, "claimed from the pool");
        let b = iss.issue("b-2").await.unwrap();
        assert_ne!(a.fingerprint, b.fingerprint);
        for id in ["a-1", "b-2"] {
            let m = std::fs::metadata(iss.private_path(id)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600);
            let kp = iss.private_pem(id).unwrap();
            assert_eq!(
                kp.public_clean(),
                if id == "a-1" { &a } else { &b }.public_clean
            );
        }
        assert!(iss.issue("a-1").await.is_err(), "never overwrites a key");
        // Rekey: the new pair takes over only when committed.
        let c = iss.reissue("a-1").await.unwrap();
        assert_eq!(
            iss.private_pem("a-1").unwrap().public_clean(),
            a.public_clean
        );
        iss.commit_reissue("a-1").unwrap();
        assert_eq!(
            iss.private_pem("a-1").unwrap().public_clean(),
            c.public_clean
        );
    }

    #[tokio::test]
    async fn preseed_writes_the_stored_form() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(pki.join("minions")).unwrap();
        let iss = KeyIssuer::new(&dir.path().join("keys"), 2048)
            .unwrap()
            .with_preseed(&pki);
        let k = iss.issue("m-1").await.unwrap();
        iss.preseed("m-1", &k.public_clean).unwrap();
        let stored = std::fs::read_to_string(pki.join("minions/m-1")).unwrap();
        assert_eq!(stored, k.public_clean);
        assert!(!stored.ends_with('\n'));
    }
}
