//! Issuing minion key pairs for servers: the registry keeps the public key,
//! the private key lives only in `<keys_dir>/<minion_id>.pem` (0600) until
//! it goes into the server's bundle.
//!
//! RSA generation takes a fraction of a second to seconds, so pairs are
//! pre-generated into a pool directory (`<keys_dir>/pool/<bits>/`) by the
//! daemon; anyone creating a server (the daemon or the CLI, in another
//! process) claims one with an atomic `rename` to a name of its own, so no
//! pair is ever handed out twice, then hard-links it to `<minion_id>.pem`,
//! which fails rather than replace an existing key. An empty pool means
//! generating on the spot (`O_EXCL`, never over a file either).
//!
//! Every issue returns a [`Claim`] naming the file it created: only that
//! file can be discarded when the server is then not written, so a failed
//! create never removes another server's key.
//!
//! `preseed` mode: the public key is also written where the master keeps
//! accepted keys (`<pki_dir>/minions/<id>`, clean_key'd text, no trailing
//! newline, as Salt writes it), so the master accepts that key at the
//! minion's first connection and denies any other.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::files;
use super::keys::KeyPair;

/// Where a claimed pair went and what the registry records of it.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The public key, clean_key'd (as the master stores it).
    pub public_clean: String,
    /// `salt-key -F` fingerprint.
    pub fingerprint: String,
}

/// Why a key could not be issued or installed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The target key file exists already: a claim never replaces a key
    /// (the caller picks another minion id).
    #[error("{}: a key file exists already and is never replaced", .0.display())]
    Exists(PathBuf),
    /// Reading, writing or generating a key failed (the message names the file).
    #[error("{0}")]
    Failed(String),
}

/// A key file that one call of [`KeyIssuer::issue`] or
/// [`KeyIssuer::reissue`] created, and the pair in it. It is the only
/// licence to remove that file ([`KeyIssuer::discard`]) or to make it the
/// current key ([`KeyIssuer::commit_reissue`]): nobody can discard a file
/// they did not create. [`Claim::keep`] ends it when the file stays.
#[must_use = "a claimed key file is kept, discarded or committed"]
#[derive(Debug)]
pub struct Claim {
    issued: Issued,
    /// The file this claim created.
    path: PathBuf,
    /// For a rekey: the current key file the new one replaces when committed.
    replaces: Option<PathBuf>,
}

impl Claim {
    /// The pair claimed.
    pub fn issued(&self) -> &Issued {
        &self.issued
    }

    /// The file it created.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file stays where it is (the server was written): the claim ends.
    pub fn keep(self) -> Issued {
        self.issued
    }
}

/// Issues, stores and (in preseed mode) installs minion keys.
#[derive(Debug, Clone)]
pub struct KeyIssuer {
    dir: PathBuf,
    bits: usize,
    preseed_dir: Option<PathBuf>,
    /// Bounds the file work (with fsync) and on-the-spot generation running
    /// on the blocking pool at once: a burst of creates with an empty pool
    /// generates a few pairs at a time, not one thread each.
    work: Arc<Semaphore>,
}

/// File work and generations of one issuer running at once, at most.
fn work_permits() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8))
}

impl KeyIssuer {
    /// Keys of `bits` bits kept under `dir` (created 0700 if missing).
    pub fn new(dir: &Path, bits: usize) -> Result<Self, IssueError> {
        let me = Self {
            dir: dir.to_owned(),
            bits,
            preseed_dir: None,
            work: Arc::new(Semaphore::new(work_permits())),
        };
        files::private_dir(&me.pool_dir()).map_err(|e| IssueError::Failed(e.to_string()))?;
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

    /// Where a new pair for `minion_id` waits while a rekey is committed:
    /// a name of this call's own, so two rekeys never share (or remove) a file.
    fn next_path(&self, minion_id: &str) -> PathBuf {
        self.dir
            .join(format!("{minion_id}.pem.next-{}", random_name()))
    }

    /// Issues the first pair of `minion_id`. Its private key file must not
    /// exist: [`IssueError::Exists`] if it does (never replaced).
    pub async fn issue(&self, minion_id: &str) -> Result<Claim, IssueError> {
        let target = self.private_path(minion_id);
        let to = target.clone();
        let issued = self.off_runtime(move |k| k.claim_into(&to)).await?;
        Ok(Claim {
            issued,
            path: target,
            replaces: None,
        })
    }

    /// Issues a replacement pair; it takes effect with [`Self::commit_reissue`].
    pub async fn reissue(&self, minion_id: &str) -> Result<Claim, IssueError> {
        let next = self.next_path(minion_id);
        let to = next.clone();
        let issued = self.off_runtime(move |k| k.claim_into(&to)).await?;
        Ok(Claim {
            issued,
            path: next,
            replaces: Some(self.private_path(minion_id)),
        })
    }

    /// Makes the pair of a [`Self::reissue`] claim the current one (an
    /// atomic rename over the old key: a rekey is the one intended replace).
    pub async fn commit_reissue(&self, claim: Claim) -> Result<Issued, IssueError> {
        self.off_runtime(move |_| Self::commit_blocking(claim))
            .await
    }

    fn commit_blocking(claim: Claim) -> Result<Issued, IssueError> {
        let Some(target) = &claim.replaces else {
            return Err(IssueError::Failed(format!(
                "{}: not a replacement key, nothing to commit",
                claim.path.display()
            )));
        };
        std::fs::rename(&claim.path, target)
            .map_err(|e| IssueError::Failed(format!("{}: {e}", target.display())))?;
        Ok(claim.issued)
    }

    /// Removes the file `claim` created (its server was then not written).
    /// Only that file, and only while it still holds the claimed pair.
    pub async fn discard(&self, claim: Claim) -> Result<(), IssueError> {
        self.off_runtime(move |_| Self::discard_blocking(claim))
            .await
    }

    fn discard_blocking(claim: Claim) -> Result<(), IssueError> {
        let failed = |e: &dyn std::fmt::Display| {
            IssueError::Failed(format!("discarding {}: {e}", claim.path.display()))
        };
        let text = match std::fs::read_to_string(&claim.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(failed(&e)),
        };
        let held = KeyPair::from_private_pem(&text).map_err(|e| failed(&e))?;
        if held.public_clean() != claim.issued.public_clean {
            return Err(failed(&"the file holds another key now; left in place"));
        }
        match std::fs::remove_file(&claim.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(failed(&e)),
        }
    }

    /// The private key of `minion_id` (for its bundle).
    pub fn private_pem(&self, minion_id: &str) -> Result<KeyPair, IssueError> {
        let path = self.private_path(minion_id);
        let named =
            |e: &dyn std::fmt::Display| IssueError::Failed(format!("{}: {e}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|e| named(&e))?;
        KeyPair::from_private_pem(&text).map_err(|e| named(&e))
    }

    /// In preseed mode, installs `public_clean` as the accepted key of
    /// `minion_id` (replacing an older one: rekey). Otherwise does nothing.
    pub async fn preseed(&self, minion_id: &str, public_clean: &str) -> Result<(), IssueError> {
        if self.preseed_dir.is_none() {
            return Ok(());
        }
        let (id, public) = (minion_id.to_owned(), public_clean.to_owned());
        self.off_runtime(move |k| k.preseed_blocking(&id, &public))
            .await
    }

    fn preseed_blocking(&self, minion_id: &str, public_clean: &str) -> Result<(), IssueError> {
        let Some(dir) = &self.preseed_dir else {
            return Ok(());
        };
        let target = dir.join(minion_id);
        let tmp = dir.join(format!(".{minion_id}.steward-tmp"));
        let _ = std::fs::remove_file(&tmp);
        files::create_public(&tmp, public_clean)
            .and_then(|()| std::fs::rename(&tmp, &target))
            .map_err(|e| IssueError::Failed(format!("preseeding {}: {e}", target.display())))
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
        let pair = KeyPair::generate(self.bits).map_err(|e| IssueError::Failed(e.to_string()))?;
        let name = random_name();
        let tmp = self.pool_dir().join(format!(".{name}.tmp"));
        files::create_private(&tmp, pair.private_pem())
            .and_then(|()| std::fs::rename(&tmp, self.pool_dir().join(format!("{name}.pem"))))
            .map_err(|e| IssueError::Failed(e.to_string()))
    }

    /// Puts a pooled pair at `target` (or generates one there) and reads
    /// it. Never replaces `target`: [`IssueError::Exists`] if it is there.
    ///
    /// A pooled pair is first taken by renaming it to a name of this call's
    /// own inside the pool (atomic: of two processes, the loser gets
    /// `NotFound` and tries the next file), then hard-linked to `target`
    /// (`link` fails with `AlreadyExists` rather than replacing, unlike
    /// `rename`), and only then unlinked from the pool. A refused link puts
    /// the pair back into the pool.
    fn claim_into(&self, target: &Path) -> Result<Issued, IssueError> {
        let named =
            |e: &dyn std::fmt::Display| IssueError::Failed(format!("{}: {e}", target.display()));
        let pool = self.pool_dir();
        let pooled: Vec<PathBuf> = std::fs::read_dir(&pool)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pem"))
            .map(|e| e.path())
            .collect();
        for from in pooled {
            let taken = pool.join(format!(".{}.claiming", random_name()));
            match std::fs::rename(&from, &taken) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(named(&format_args!("claiming {}: {e}", from.display()))),
            }
            let pair = match std::fs::read_to_string(&taken)
                .map_err(|e| e.to_string())
                .and_then(|t| KeyPair::from_private_pem(&t).map_err(|e| e.to_string()))
            {
                Ok(pair) => pair,
                Err(error) => {
                    // Not a usable pair: out of the pool, kept for a look.
                    let _ = std::fs::rename(&taken, taken.with_extension("bad"));
                    tracing::warn!(message = "Unreadable pooled key set aside.", path = %from.display(), %error);
                    continue;
                }
            };
            if let Err(e) = std::fs::hard_link(&taken, target) {
                // Back into the pool under its old name (unique, random).
                let _ = std::fs::rename(&taken, &from);
                return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                    IssueError::Exists(target.to_owned())
                } else {
                    named(&e)
                });
            }
            if let Err(error) = std::fs::remove_file(&taken) {
                // The pair is ours at `target`; the leftover name in the pool
                // is skipped (not `*.pem`), never handed out again.
                tracing::warn!(message = "Claimed pooled key not unlinked from the pool.", path = %taken.display(), %error);
            }
            return Ok(Issued {
                public_clean: pair.public_clean(),
                fingerprint: pair.fingerprint(),
            });
        }
        // Empty pool. Not worth generating for a taken name (`create_new`
        // below is what guarantees it, this only saves the work).
        if target.symlink_metadata().is_ok() {
            return Err(IssueError::Exists(target.to_owned()));
        }
        let pair = KeyPair::generate(self.bits).map_err(|e| named(&e))?;
        files::create_private(target, pair.private_pem()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                IssueError::Exists(target.to_owned())
            } else {
                named(&e)
            }
        })?;
        Ok(Issued {
            public_clean: pair.public_clean(),
            fingerprint: pair.fingerprint(),
        })
    }
}

impl KeyIssuer {
    /// Runs `work` (file I/O with fsync, RSA generation) on the blocking
    /// pool, never on a runtime thread, at most [`work_permits`] at a time.
    async fn off_runtime<T, F>(&self, work: F) -> Result<T, IssueError>
    where
        T: Send + 'static,
        F: FnOnce(&KeyIssuer) -> Result<T, IssueError> + Send + 'static,
    {
        let _permit = self
            .work
            .acquire()
            .await
            .map_err(|e| IssueError::Failed(format!("{}: {e}", self.dir.display())))?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || work(&me))
            .await
            .map_err(|e| IssueError::Failed(format!("{}: {e}", self.dir.display())))?
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
    crate::hex::encode(&b)
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
        let a = iss.issue("a-1").await.unwrap().keep();
        assert_eq!(iss.pool_len(), 0, "claimed from the pool");
        assert_eq!(
            std::fs::read_dir(iss.pool_dir()).unwrap().count(),
            0,
            "nothing left behind in the pool"
        );
        let b = iss.issue("b-2").await.unwrap().keep();
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
        // Rekey: the new pair takes over only when committed.
        let c = iss.reissue("a-1").await.unwrap();
        let c_public = c.issued().public_clean.clone();
        assert_eq!(
            iss.private_pem("a-1").unwrap().public_clean(),
            a.public_clean
        );
        iss.commit_reissue(c).await.unwrap();
        assert_eq!(iss.private_pem("a-1").unwrap().public_clean(), c_public);
    }

    /// The pool path: a pooled pair and an existing `<id>.pem`. The claim is
    /// refused with `Exists`; the existing key and the pooled pair are intact.
    #[tokio::test]
    async fn a_pooled_claim_never_overwrites_an_existing_key() {
        let dir = tempfile::tempdir().unwrap();
        let iss = KeyIssuer::new(dir.path(), 2048).unwrap();
        iss.generate_into_pool().unwrap();
        let pooled = |iss: &KeyIssuer| -> Vec<(String, String)> {
            std::fs::read_dir(iss.pool_dir())
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, std::fs::read_to_string(e.path()).unwrap())
                })
                .collect()
        };
        let pool_before = pooled(&iss);
        assert_eq!(pool_before.len(), 1);
        let existing = iss.issue("taken-1").await.unwrap().keep();
        assert_eq!(iss.pool_len(), 0);
        iss.generate_into_pool().unwrap();
        let pool_before = pooled(&iss);
        let key_before = std::fs::read_to_string(iss.private_path("taken-1")).unwrap();

        let err = iss.issue("taken-1").await.unwrap_err();
        assert!(
            matches!(&err, IssueError::Exists(p) if *p == iss.private_path("taken-1")),
            "{err:?}"
        );
        assert_eq!(
            std::fs::read_to_string(iss.private_path("taken-1")).unwrap(),
            key_before,
            "the existing key is intact"
        );
        assert_eq!(
            iss.private_pem("taken-1").unwrap().public_clean(),
            existing.public_clean
        );
        assert_eq!(pooled(&iss), pool_before, "the pooled pair is intact");

        // A file the issuer did not create (by hand, another tool): the same.
        let target = iss.private_path("late-1");
        std::fs::write(&target, "precious").unwrap();
        assert!(matches!(
            iss.claim_into(&target).unwrap_err(),
            IssueError::Exists(_)
        ));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(pooled(&iss), pool_before);
    }

    #[tokio::test]
    async fn a_generated_claim_never_overwrites_either() {
        let dir = tempfile::tempdir().unwrap();
        let iss = KeyIssuer::new(dir.path(), 2048).unwrap();
        assert_eq!(iss.pool_len(), 0, "empty pool: generated on the spot");
        std::fs::write(iss.private_path("m-1"), "precious").unwrap();
        assert!(matches!(
            iss.issue("m-1").await.unwrap_err(),
            IssueError::Exists(_)
        ));
        assert_eq!(
            std::fs::read_to_string(iss.private_path("m-1")).unwrap(),
            "precious"
        );
    }

    #[tokio::test]
    async fn discard_removes_only_the_file_the_claim_created() {
        let dir = tempfile::tempdir().unwrap();
        let iss = KeyIssuer::new(dir.path(), 2048).unwrap();
        let claim = iss.issue("d-1").await.unwrap();
        assert!(iss.private_path("d-1").exists());
        iss.discard(claim).await.unwrap();
        assert!(!iss.private_path("d-1").exists());

        // The file was replaced meanwhile (not by this claim): left alone.
        let claim = iss.issue("d-2").await.unwrap();
        let other = iss.issue("d-3").await.unwrap().keep();
        std::fs::rename(iss.private_path("d-3"), iss.private_path("d-2")).unwrap();
        assert!(iss.discard(claim).await.is_err());
        assert_eq!(
            iss.private_pem("d-2").unwrap().public_clean(),
            other.public_clean
        );

        // Two rekeys at once use files of their own: discarding one leaves
        // the other's, and the current key, alone.
        let current = iss.issue("r-1").await.unwrap().keep();
        let one = iss.reissue("r-1").await.unwrap();
        let two = iss.reissue("r-1").await.unwrap();
        assert_ne!(one.path(), two.path());
        let two_public = two.issued().public_clean.clone();
        iss.discard(one).await.unwrap();
        assert!(two.path().exists());
        assert_eq!(
            iss.private_pem("r-1").unwrap().public_clean(),
            current.public_clean
        );
        iss.commit_reissue(two).await.unwrap();
        assert_eq!(iss.private_pem("r-1").unwrap().public_clean(), two_public);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("r-1"))
            .collect();
        assert_eq!(left, ["r-1.pem"]);
    }

    #[tokio::test]
    async fn preseed_writes_the_stored_form() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(pki.join("minions")).unwrap();
        let iss = KeyIssuer::new(&dir.path().join("keys"), 2048)
            .unwrap()
            .with_preseed(&pki);
        let k = iss.issue("m-1").await.unwrap().keep();
        iss.preseed("m-1", &k.public_clean).await.unwrap();
        let stored = std::fs::read_to_string(pki.join("minions/m-1")).unwrap();
        assert_eq!(stored, k.public_clean);
        assert!(!stored.ends_with('\n'));
    }
}
