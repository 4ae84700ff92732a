//! The master's own keys for a signed master key (`master_sign_pubkey: True`
//! with `master_use_pubkey_signature: True`): the master pair, the signing
//! pair and the pre-made signature of `master.pub`, all under `pki_dir`.
//!
//! Why we sign and not `salt-key --gen-signature` (salt-protocol §4): on Salt
//! 3006.9 and 3007.8, salt-key signs `master.pub` as stored, *with* its
//! trailing newline, while the master sends `clean_key(master.pub)` (the
//! newline stripped) next to that signature, and the minion verifies the
//! signature over what it received — so it always fails (saltstack/salt#68930,
//! #66259). We sign the clean_key'd text, which is what the minion verifies on
//! fixed and unfixed releases alike. The algorithm is RSASSA-PKCS1-v1_5 over
//! SHA-1 (`crypt.py: sign_message` default, the only one a pre-made signature
//! can use); the file is base64 on one line plus `\n`, as salt-key writes it.
//!
//! Several masters may share one signing pair (`export_signing` /
//! `import_signing`); each signs its own `master.pub`. Private key text is
//! only ever written to 0600 files created new (or renamed into place from
//! such a file), never printed or logged.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Serialize;
use zeroize::Zeroizing;

use super::files;
use super::keys::{clean_key, fingerprint, verify_sha1, KeyError, KeyPair};
use crate::master_config::MasterConfig;

/// Base name of the master's own pair in `pki_dir` (`crypt.py: MasterKeys`).
pub const MASTER_KEY_NAME: &str = "master";

/// Why a master PKI operation failed; every variant names its file.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a file (the message names it).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A file that is not a usable key.
    #[error("{path}: {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        source: KeyError,
    },
    /// One half of a pair exists: we never overwrite a key to complete it.
    #[error(
        "{present} exists but {missing} does not: restore {missing} or move {present} away \
         (an existing key is never overwritten)"
    )]
    HalfPair {
        /// The half that is there.
        present: PathBuf,
        /// The half that is not.
        missing: PathBuf,
    },
    /// A public key file that is not the public key of its private key.
    #[error("{public} is not the public key of {private}")]
    Mismatch {
        /// The private key file.
        private: PathBuf,
        /// The public key file.
        public: PathBuf,
    },
    /// A file the operation needs is missing.
    #[error("{path} does not exist{hint}")]
    Missing {
        /// The file.
        path: PathBuf,
        /// What to do about it, starting with `: ` (or empty).
        hint: &'static str,
    },
    /// `import_signing` over a different signing pair without `force`.
    #[error(
        "{dir} already holds a different signing pair ({existing}); importing {imported}: \
         use --force to replace it (minions that trust the old master_sign.pub will then \
         refuse this master)"
    )]
    DifferentSigningPair {
        /// The master's pki_dir.
        dir: PathBuf,
        /// What is there now (fingerprint, or why it is unusable).
        existing: String,
        /// Fingerprint of the pair being imported.
        imported: String,
    },
}

/// What an operation did to a file or pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// It was missing and has been written.
    Created,
    /// It was there and right; untouched.
    Kept,
    /// It was there and wrong (or `--force`); replaced atomically.
    Replaced,
}

impl Action {
    /// Lower-case word for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Kept => "kept",
            Self::Replaced => "replaced",
        }
    }
}

/// A key pair's files and what was done to them.
#[derive(Debug, Clone, Serialize)]
pub struct PairReport {
    /// The private key file.
    pub private: PathBuf,
    /// The public key file.
    pub public: PathBuf,
    /// Created, kept or replaced.
    pub action: Action,
    /// `salt-key -F` fingerprint of the public key.
    pub fingerprint: String,
    /// Anything unusual, e.g. a signing private key kept off this master.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
}

/// Which text a signature file covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Covers {
    /// `clean_key(master.pub)`: what minions verify.
    Clean,
    /// `master.pub` with its trailing newline: `salt-key --gen-signature`'s form.
    WithNewline,
    /// Neither: another key signed it, it signs another master key, or it is corrupt.
    Neither,
}

impl Covers {
    /// The verdict in words, for `pki verify` and `pki init`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Clean => "the stripped master.pub (what minions verify: OK)",
            Self::WithNewline => {
                "master.pub with its trailing newline (salt-key --gen-signature's form: \
                 minions on Salt <= 3007.8 will FAIL; run `salt-steward pki init` to re-sign)"
            }
            Self::Neither => "neither (wrong key or corrupt)",
        }
    }
}

/// The signature file and what `init` did to it.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureReport {
    /// `<pki_dir>/<master_pubkey_signature>`.
    pub path: PathBuf,
    /// Created, kept (it already covered the clean text) or replaced.
    pub action: Action,
    /// What a replaced signature covered.
    pub previous: Option<Covers>,
}

/// What `init` found and did.
#[derive(Debug, Clone, Serialize)]
pub struct InitReport {
    /// `master.pem` / `master.pub`.
    pub master: PairReport,
    /// `<master_sign_key_name>.pem` / `.pub`.
    pub signing: PairReport,
    /// The pre-made signature of `master.pub`.
    pub signature: SignatureReport,
}

impl InitReport {
    /// Whether any file was written.
    pub fn changed(&self) -> bool {
        [
            self.master.action,
            self.signing.action,
            self.signature.action,
        ]
        .iter()
        .any(|a| *a != Action::Kept)
    }
}

/// Whether the signing public key belongs to the signing private key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SigningPair {
    /// Both present and they belong together.
    Match,
    /// Both present, different keys.
    Mismatch,
    /// Only the public key is here (fine: a master using a pre-made
    /// signature does not need the signing private key).
    NoPrivateKey,
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The signature file checked.
    pub signature: PathBuf,
    /// Which text it covers.
    pub covers: Covers,
    /// The signing pair's consistency.
    pub signing_pair: SigningPair,
    /// Fingerprint of `master.pub`.
    pub master_fingerprint: String,
    /// Fingerprint of the signing public key.
    pub signing_fingerprint: String,
}

impl VerifyReport {
    /// Minions will accept this master's signature.
    pub fn ok(&self) -> bool {
        self.covers == Covers::Clean && self.signing_pair != SigningPair::Mismatch
    }
}

/// What `export_signing` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The exported files.
    pub pair: PairReport,
}

/// What `import_signing` did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The signing pair in this master's pki_dir.
    pub signing: PairReport,
    /// The `init` run after it (this master's own signature over its own key).
    pub init: InitReport,
}

/// The two files of a pair.
struct Pair {
    private: PathBuf,
    public: PathBuf,
}

/// A pair read from disk, with its texts as found.
struct Loaded {
    key: KeyPair,
    private_text: Zeroizing<String>,
    public_text: String,
}

impl Pair {
    fn in_dir(dir: &Path, name: &str) -> Self {
        Self {
            private: dir.join(format!("{name}.pem")),
            public: dir.join(format!("{name}.pub")),
        }
    }

    fn master(m: &MasterConfig) -> Self {
        Self::in_dir(&m.pki_dir, MASTER_KEY_NAME)
    }

    fn signing(m: &MasterConfig) -> Self {
        Self::in_dir(&m.pki_dir, &m.master_sign_key_name)
    }

    /// `None` if neither file exists; an error if only one does, if one is
    /// not a key, or if they do not belong together.
    fn load(&self) -> Result<Option<Loaded>, PkiError> {
        match (exists(&self.private)?, exists(&self.public)?) {
            (false, false) => Ok(None),
            (true, false) => Err(PkiError::HalfPair {
                present: self.private.clone(),
                missing: self.public.clone(),
            }),
            (false, true) => Err(PkiError::HalfPair {
                present: self.public.clone(),
                missing: self.private.clone(),
            }),
            (true, true) => {
                let private_text = Zeroizing::new(read(&self.private)?);
                let key =
                    KeyPair::from_private_pem(&private_text).map_err(|source| PkiError::Key {
                        path: self.private.clone(),
                        source,
                    })?;
                let public_text = read(&self.public)?;
                let same = key
                    .matches_public(&public_text)
                    .map_err(|source| PkiError::Key {
                        path: self.public.clone(),
                        source,
                    })?;
                if !same {
                    return Err(PkiError::Mismatch {
                        private: self.private.clone(),
                        public: self.public.clone(),
                    });
                }
                Ok(Some(Loaded {
                    key,
                    private_text,
                    public_text,
                }))
            }
        }
    }

    /// Loads the pair, or generates and writes it when neither file exists.
    fn ensure(&self, bits: usize) -> Result<(Loaded, PairReport), PkiError> {
        let (loaded, action) = match self.load()? {
            Some(l) => (l, Action::Kept),
            None => {
                let key = KeyPair::generate(bits).map_err(|source| PkiError::Key {
                    path: self.private.clone(),
                    source,
                })?;
                files::create_private(&self.private, key.private_pem())?;
                files::create_public(&self.public, key.public_pem())?;
                tracing::info!(
                    message = "Created key pair.",
                    private = %self.private.display(),
                    public = %self.public.display(),
                    fingerprint = %key.fingerprint(),
                );
                let loaded = Loaded {
                    private_text: Zeroizing::new(key.private_pem().to_owned()),
                    public_text: key.public_pem().to_owned(),
                    key,
                };
                (loaded, Action::Created)
            }
        };
        let report = self.report(action, &loaded.public_text);
        Ok((loaded, report))
    }

    fn report(&self, action: Action, public_text: &str) -> PairReport {
        PairReport {
            private: self.private.clone(),
            public: self.public.clone(),
            action,
            fingerprint: fingerprint(public_text),
            note: None,
        }
    }
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists()
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())).into())
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())).into())
}

fn read_required(path: &Path, hint: &'static str) -> Result<String, PkiError> {
    if !exists(path)? {
        return Err(PkiError::Missing {
            path: path.to_owned(),
            hint,
        });
    }
    read(path)
}

/// The signature file text for `master_pub_text`: RSASSA-PKCS1-v1_5/SHA-1
/// over `clean_key(master_pub_text)`, base64 on one line plus `\n`.
pub fn signature_text(signer: &KeyPair, master_pub_text: &str) -> Result<String, KeyError> {
    let sig = signer.sign_sha1(clean_key(master_pub_text).as_bytes())?;
    Ok(format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(sig)
    ))
}

/// Which text of `master_pub_text` the signature file `signature_file`
/// covers, checked with the signing public key `sign_pub`.
pub fn covers(
    sign_pub: &str,
    master_pub_text: &str,
    signature_file: &str,
) -> Result<Covers, KeyError> {
    // The minion decodes with a2b_base64, which skips whitespace.
    let b64: String = signature_file
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(b64) else {
        return Ok(Covers::Neither);
    };
    let clean = clean_key(master_pub_text);
    if verify_sha1(sign_pub, clean.as_bytes(), &sig)? {
        return Ok(Covers::Clean);
    }
    // salt-key signs the file as stored; normally that is clean + "\n".
    let with_newline = format!("{clean}\n");
    for text in [master_pub_text, with_newline.as_str()] {
        if text != clean && verify_sha1(sign_pub, text.as_bytes(), &sig)? {
            return Ok(Covers::WithNewline);
        }
    }
    Ok(Covers::Neither)
}

/// Makes `master`'s pki_dir ready for a signed master key: creates the master
/// pair and the signing pair if missing (key size `keysize`), and writes the
/// signature of `master.pub` unless the one there already covers the clean
/// text. Idempotent: a second run changes nothing.
pub fn init(master: &MasterConfig) -> Result<InitReport, PkiError> {
    files::private_dir(&master.pki_dir)?;
    let (master_keys, master_report) = Pair::master(master).ensure(master.keysize)?;
    let signing = Pair::signing(master);
    let (sign_keys, signing_report) = match signing.ensure(master.keysize) {
        Ok(found) => found,
        Err(e @ PkiError::HalfPair { .. }) => {
            return match offline_signing(master, &signing, &master_keys.public_text)? {
                Some((signing, signature)) => Ok(InitReport {
                    master: master_report,
                    signing,
                    signature,
                }),
                None => Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let signature = ensure_signature(master, &signing, &sign_keys, &master_keys.public_text)?;
    Ok(InitReport {
        master: master_report,
        signing: signing_report,
        signature,
    })
}

/// A master whose signing private key is kept elsewhere (Salt's advice for
/// pre-made signatures): only the public key is here. Fine, and nothing to
/// do, if the signature there already covers the clean text; `None` otherwise
/// (we cannot sign without the private key).
fn offline_signing(
    master: &MasterConfig,
    signing: &Pair,
    master_pub_text: &str,
) -> Result<Option<(PairReport, SignatureReport)>, PkiError> {
    let path = master.pki_dir.join(&master.master_pubkey_signature);
    if exists(&signing.private)? || !exists(&signing.public)? || !exists(&path)? {
        return Ok(None);
    }
    let sign_pub = read(&signing.public)?;
    let sig = String::from_utf8_lossy(
        &std::fs::read(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
    )
    .into_owned();
    let found = covers(&sign_pub, master_pub_text, &sig).map_err(|source| PkiError::Key {
        path: signing.public.clone(),
        source,
    })?;
    if found != Covers::Clean {
        return Ok(None);
    }
    let mut pair = signing.report(Action::Kept, &sign_pub);
    pair.note = Some("public key only: the signing private key is kept off this master");
    Ok(Some((
        pair,
        SignatureReport {
            path,
            action: Action::Kept,
            previous: None,
        },
    )))
}

fn ensure_signature(
    master: &MasterConfig,
    signing: &Pair,
    sign_keys: &Loaded,
    master_pub_text: &str,
) -> Result<SignatureReport, PkiError> {
    let path = master.pki_dir.join(&master.master_pubkey_signature);
    let key_err = |source| PkiError::Key {
        path: signing.private.clone(),
        source,
    };
    let wanted = signature_text(&sign_keys.key, master_pub_text).map_err(key_err)?;
    if !exists(&path)? {
        files::create_public(&path, &wanted)?;
        tracing::info!(message = "Wrote master key signature.", path = %path.display());
        return Ok(SignatureReport {
            path,
            action: Action::Created,
            previous: None,
        });
    }
    let existing = String::from_utf8_lossy(
        &std::fs::read(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?,
    )
    .into_owned();
    let found = covers(&sign_keys.public_text, master_pub_text, &existing).map_err(|source| {
        PkiError::Key {
            path: signing.public.clone(),
            source,
        }
    })?;
    if found == Covers::Clean {
        return Ok(SignatureReport {
            path,
            action: Action::Kept,
            previous: None,
        });
    }
    files::replace_atomic(&path, wanted.as_bytes(), 0o644)?;
    tracing::warn!(
        message = "Replaced master key signature.",
        path = %path.display(),
        previous = found.describe(),
    );
    Ok(SignatureReport {
        path,
        action: Action::Replaced,
        previous: Some(found),
    })
}

/// Checks `<pki_dir>/<master_pubkey_signature>` against `master.pub` and the
/// signing public key, and the signing pair against itself.
pub fn verify(master: &MasterConfig) -> Result<VerifyReport, PkiError> {
    const INIT: &str = ": run `salt-steward pki init`";
    let master_pub = read_required(
        &Pair::master(master).public,
        ": the master has no key yet (start it once, or run `salt-steward pki init`)",
    )?;
    let signing = Pair::signing(master);
    let sign_pub = read_required(&signing.public, INIT)?;
    let sig_path = master.pki_dir.join(&master.master_pubkey_signature);
    let sig = String::from_utf8_lossy(&std::fs::read(&sig_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            PkiError::Missing {
                path: sig_path.clone(),
                hint: INIT,
            }
        } else {
            std::io::Error::new(e.kind(), format!("{}: {e}", sig_path.display())).into()
        }
    })?)
    .into_owned();
    let found = covers(&sign_pub, &master_pub, &sig).map_err(|source| PkiError::Key {
        path: signing.public.clone(),
        source,
    })?;
    let signing_pair = if exists(&signing.private)? {
        let private_text = Zeroizing::new(read(&signing.private)?);
        let key = KeyPair::from_private_pem(&private_text).map_err(|source| PkiError::Key {
            path: signing.private.clone(),
            source,
        })?;
        let same = key
            .matches_public(&sign_pub)
            .map_err(|source| PkiError::Key {
                path: signing.public.clone(),
                source,
            })?;
        if same {
            SigningPair::Match
        } else {
            SigningPair::Mismatch
        }
    } else {
        SigningPair::NoPrivateKey
    };
    Ok(VerifyReport {
        signature: sig_path,
        covers: found,
        signing_pair,
        master_fingerprint: fingerprint(&master_pub),
        signing_fingerprint: fingerprint(&sign_pub),
    })
}

/// Copies the signing pair into `dir` (created 0700 if missing), the private
/// key as a new 0600 file. Refuses to overwrite anything in `dir`.
pub fn export_signing(master: &MasterConfig, dir: &Path) -> Result<ExportReport, PkiError> {
    let src = Pair::signing(master);
    let Some(loaded) = src.load()? else {
        return Err(PkiError::Missing {
            path: src.private,
            hint: ": no signing pair to export; run `salt-steward pki init` first",
        });
    };
    files::private_dir(dir)?;
    let dest = Pair::in_dir(dir, &master.master_sign_key_name);
    for p in [&dest.private, &dest.public] {
        if exists(p)? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{}: already exists (not overwriting)", p.display()),
            )
            .into());
        }
    }
    files::create_private(&dest.private, &loaded.private_text)?;
    files::create_public(&dest.public, &loaded.public_text)?;
    Ok(ExportReport {
        pair: dest.report(Action::Created, &loaded.public_text),
    })
}

/// Installs the signing pair found in `dir` (as written by
/// [`export_signing`]) into this master's pki_dir, then runs [`init`] so
/// this master signs its own `master.pub` with it. The same pair already
/// there is a no-op; a different (or broken) one is an error unless `force`.
pub fn import_signing(
    master: &MasterConfig,
    dir: &Path,
    force: bool,
) -> Result<ImportReport, PkiError> {
    let src = Pair::in_dir(dir, &master.master_sign_key_name);
    let Some(incoming) = src.load()? else {
        return Err(PkiError::Missing {
            path: src.private,
            hint: ": nothing to import (made by `salt-steward pki export-signing DIR`)",
        });
    };
    files::private_dir(&master.pki_dir)?;
    let dest = Pair::signing(master);
    let existing = match dest.load() {
        Ok(None) => None,
        Ok(Some(l)) => {
            let same = incoming
                .key
                .matches_public(&l.public_text)
                .map_err(|source| PkiError::Key {
                    path: dest.public.clone(),
                    source,
                })?;
            if same {
                Some(Ok(()))
            } else {
                Some(Err(fingerprint(&l.public_text)))
            }
        }
        Err(e) => Some(Err(e.to_string())),
    };
    let action = match existing {
        None => {
            files::create_private(&dest.private, &incoming.private_text)?;
            files::create_public(&dest.public, &incoming.public_text)?;
            Action::Created
        }
        Some(Ok(())) => Action::Kept,
        Some(Err(what)) if !force => {
            return Err(PkiError::DifferentSigningPair {
                dir: master.pki_dir.clone(),
                existing: what,
                imported: fingerprint(&incoming.public_text),
            })
        }
        Some(Err(_)) => {
            files::replace_atomic(&dest.private, incoming.private_text.as_bytes(), 0o600)?;
            files::replace_atomic(&dest.public, incoming.public_text.as_bytes(), 0o644)?;
            tracing::warn!(
                message = "Replaced the signing pair (--force).",
                private = %dest.private.display(),
                fingerprint = %fingerprint(&incoming.public_text),
            );
            Action::Replaced
        }
    };
    let signing = dest.report(action, &incoming.public_text);
    let init = init(master)?;
    Ok(ImportReport { signing, init })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn master_in(dir: &Path) -> MasterConfig {
        let cfg = dir.join("master");
        std::fs::write(&cfg, format!("pki_dir: {}/pki\n", dir.display())).unwrap();
        MasterConfig::load(&cfg).unwrap()
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// What `salt-key --gen-signature` writes: the stored file, newline and all.
    fn salt_key_signature(m: &MasterConfig) -> String {
        let pki = &m.pki_dir;
        let signer = KeyPair::from_private_pem(
            &std::fs::read_to_string(pki.join("master_sign.pem")).unwrap(),
        )
        .unwrap();
        let text = std::fs::read_to_string(pki.join("master.pub")).unwrap();
        assert!(text.ends_with('\n'));
        let sig = signer.sign_sha1(text.as_bytes()).unwrap();
        format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(sig)
        )
    }

    #[test]
    fn init_creates_salts_files_with_safe_modes_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let m = master_in(tmp.path());
        let r = init(&m).unwrap();
        assert_eq!(r.master.action, Action::Created);
        assert_eq!(r.signing.action, Action::Created);
        assert_eq!(r.signature.action, Action::Created);
        let pki = &m.pki_dir;
        assert_eq!(mode(pki), 0o700);
        for name in ["master.pem", "master_sign.pem"] {
            assert_eq!(mode(&pki.join(name)), 0o600, "{name}");
            let text = std::fs::read_to_string(pki.join(name)).unwrap();
            assert!(text.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
        }
        for name in ["master.pub", "master_sign.pub"] {
            let text = std::fs::read_to_string(pki.join(name)).unwrap();
            assert!(text.starts_with("-----BEGIN PUBLIC KEY-----\n"));
            assert!(text.ends_with("-----END PUBLIC KEY-----\n"));
            assert_eq!(text.len(), 451, "2048-bit SPKI as Salt writes it");
        }
        let sig = std::fs::read_to_string(pki.join("master_pubkey_signature")).unwrap();
        assert_eq!(sig.len(), 345, "as salt-key writes a 2048-bit signature");
        assert_eq!(sig.matches('\n').count(), 1);
        assert_eq!(
            r.master.fingerprint,
            fingerprint(&std::fs::read_to_string(pki.join("master.pub")).unwrap())
        );
        // The report never carries private key text.
        assert!(!serde_json::to_string(&r).unwrap().contains("PRIVATE"));

        // Every file init writes, byte for byte.
        let files = || -> Vec<Vec<u8>> {
            [
                "master.pem",
                "master.pub",
                "master_sign.pem",
                "master_sign.pub",
                "master_pubkey_signature",
            ]
            .iter()
            .map(|n| std::fs::read(pki.join(n)).unwrap())
            .collect()
        };
        let before = files();
        assert_eq!(before[4], sig.clone().into_bytes());
        let again = init(&m).unwrap();
        assert!(!again.changed(), "{again:?}");
        assert_eq!(again.master.fingerprint, r.master.fingerprint);
        let after = files();
        assert_eq!(before, after);
        assert!(verify(&m).unwrap().ok());
    }

    #[test]
    fn init_keeps_existing_keys_and_refuses_half_a_pair() {
        let tmp = tempfile::tempdir().unwrap();
        let m = master_in(tmp.path());
        std::fs::create_dir(&m.pki_dir).unwrap();
        // A master pair as Salt made it (mode 0400 private key).
        let kp = KeyPair::generate(2048).unwrap();
        files::create_new(
            &m.pki_dir.join("master.pem"),
            kp.private_pem().as_bytes(),
            0o400,
        )
        .unwrap();
        files::create_public(&m.pki_dir.join("master.pub"), kp.public_pem()).unwrap();
        let r = init(&m).unwrap();
        assert_eq!(r.master.action, Action::Kept);
        assert_eq!(r.master.fingerprint, kp.fingerprint());
        assert_eq!(r.signing.action, Action::Created);

        let tmp2 = tempfile::tempdir().unwrap();
        let m2 = master_in(tmp2.path());
        std::fs::create_dir(&m2.pki_dir).unwrap();
        files::create_public(&m2.pki_dir.join("master.pub"), kp.public_pem()).unwrap();
        let err = init(&m2).unwrap_err();
        assert!(matches!(err, PkiError::HalfPair { .. }), "{err}");
        assert!(err.to_string().contains("master.pem does not"), "{err}");
        assert!(
            !m2.pki_dir.join("master.pem").exists(),
            "nothing overwritten"
        );
    }

    #[test]
    fn init_replaces_salt_keys_newline_signature_and_verify_names_each_form() {
        let tmp = tempfile::tempdir().unwrap();
        let m = master_in(tmp.path());
        init(&m).unwrap();
        let sig_path = m.pki_dir.join("master_pubkey_signature");

        // salt-key's form.
        std::fs::write(&sig_path, salt_key_signature(&m)).unwrap();
        let v = verify(&m).unwrap();
        assert_eq!(v.covers, Covers::WithNewline);
        assert!(!v.ok());
        assert!(v.covers.describe().contains("salt-key --gen-signature"));
        let r = init(&m).unwrap();
        assert_eq!(r.signature.action, Action::Replaced);
        assert_eq!(r.signature.previous, Some(Covers::WithNewline));
        assert_eq!(r.master.action, Action::Kept);
        assert_eq!(verify(&m).unwrap().covers, Covers::Clean);
        assert!(verify(&m).unwrap().ok());

        // A signature by another key, and garbage.
        let other = KeyPair::generate(2048).unwrap();
        let master_pub = std::fs::read_to_string(m.pki_dir.join("master.pub")).unwrap();
        std::fs::write(&sig_path, signature_text(&other, &master_pub).unwrap()).unwrap();
        assert_eq!(verify(&m).unwrap().covers, Covers::Neither);
        std::fs::write(&sig_path, "not base64 at all!\n").unwrap();
        assert_eq!(verify(&m).unwrap().covers, Covers::Neither);
        assert_eq!(init(&m).unwrap().signature.previous, Some(Covers::Neither));
        assert!(verify(&m).unwrap().ok());
    }

    #[test]
    fn signing_pair_checked_and_its_private_key_may_be_kept_off_the_master() {
        let tmp = tempfile::tempdir().unwrap();
        let m = master_in(tmp.path());
        init(&m).unwrap();
        let pem = m.pki_dir.join("master_sign.pem");
        let saved = std::fs::read(&pem).unwrap();
        std::fs::remove_file(&pem).unwrap();
        let v = verify(&m).unwrap();
        assert_eq!(v.signing_pair, SigningPair::NoPrivateKey);
        assert!(v.ok(), "a pre-made signature needs no signing private key");
        // init has nothing to do then, and says why.
        let r = init(&m).unwrap();
        assert!(!r.changed(), "{r:?}");
        assert!(r.signing.note.is_some(), "{r:?}");
        // But it cannot re-sign without the private key: half a pair.
        let sig_path = m.pki_dir.join("master_pubkey_signature");
        let good_sig = std::fs::read(&sig_path).unwrap();
        std::fs::write(&sig_path, "garbage\n").unwrap();
        assert!(matches!(init(&m), Err(PkiError::HalfPair { .. })));
        std::fs::write(&sig_path, good_sig).unwrap();

        let other = KeyPair::generate(2048).unwrap();
        files::create_private(&pem, other.private_pem()).unwrap();
        let v = verify(&m).unwrap();
        assert_eq!(v.signing_pair, SigningPair::Mismatch);
        assert!(!v.ok());
        std::fs::remove_file(&pem).unwrap();
        files::create_private(&pem, std::str::from_utf8(&saved).unwrap()).unwrap();

        std::fs::remove_file(m.pki_dir.join("master_pubkey_signature")).unwrap();
        let err = verify(&m).unwrap_err();
        assert!(
            err.to_string()
                .contains("master_pubkey_signature does not exist"),
            "{err}"
        );
        assert!(err.to_string().contains("pki init"), "{err}");
    }

    #[test]
    fn export_then_import_shares_the_pair_and_each_master_signs_its_own_key() {
        let a_dir = tempfile::tempdir().unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let a = master_in(a_dir.path());
        let b = master_in(b_dir.path());
        let ra = init(&a).unwrap();
        let rb = init(&b).unwrap();
        assert_ne!(ra.signing.fingerprint, rb.signing.fingerprint);

        let bundle = out.path().join("signing");
        let e = export_signing(&a, &bundle).unwrap();
        assert_eq!(mode(&bundle), 0o700);
        assert_eq!(mode(&bundle.join("master_sign.pem")), 0o600);
        assert_eq!(e.pair.fingerprint, ra.signing.fingerprint);
        // Exporting again does not overwrite.
        assert!(export_signing(&a, &bundle).is_err());

        // B has its own, different pair: refused without --force, untouched.
        let err = import_signing(&b, &bundle, false).unwrap_err();
        assert!(
            matches!(err, PkiError::DifferentSigningPair { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(
            init(&b).unwrap().signing.fingerprint,
            rb.signing.fingerprint
        );

        let r = import_signing(&b, &bundle, true).unwrap();
        assert_eq!(r.signing.action, Action::Replaced);
        assert_eq!(r.signing.fingerprint, ra.signing.fingerprint);
        assert_eq!(r.init.signature.action, Action::Replaced);
        assert_eq!(mode(&b.pki_dir.join("master_sign.pem")), 0o600);
        assert_eq!(
            std::fs::read(a.pki_dir.join("master_sign.pem")).unwrap(),
            std::fs::read(b.pki_dir.join("master_sign.pem")).unwrap()
        );
        // Each master's signature is over its own key, with the shared pair.
        let vb = verify(&b).unwrap();
        assert!(vb.ok());
        assert_eq!(vb.signing_fingerprint, ra.signing.fingerprint);
        assert_eq!(vb.master_fingerprint, rb.master.fingerprint);
        assert_ne!(
            std::fs::read(a.pki_dir.join("master_pubkey_signature")).unwrap(),
            std::fs::read(b.pki_dir.join("master_pubkey_signature")).unwrap()
        );

        // The same pair again: a no-op, even without --force.
        let again = import_signing(&b, &bundle, false).unwrap();
        assert_eq!(again.signing.action, Action::Kept);
        assert!(!again.init.changed());

        // A fresh master (no keys at all) gets the pair and its own keys.
        let c_dir = tempfile::tempdir().unwrap();
        let c = master_in(c_dir.path());
        let rc = import_signing(&c, &bundle, false).unwrap();
        assert_eq!(rc.signing.action, Action::Created);
        assert_eq!(rc.init.master.action, Action::Created);
        assert!(verify(&c).unwrap().ok());
    }

    #[test]
    fn import_refuses_a_pem_and_pub_that_do_not_belong_together() {
        let tmp = tempfile::tempdir().unwrap();
        let m = master_in(tmp.path());
        let src = tempfile::tempdir().unwrap();
        let one = KeyPair::generate(2048).unwrap();
        let two = KeyPair::generate(2048).unwrap();
        files::create_private(&src.path().join("master_sign.pem"), one.private_pem()).unwrap();
        files::create_public(&src.path().join("master_sign.pub"), two.public_pem()).unwrap();
        let err = import_signing(&m, src.path(), true).unwrap_err();
        assert!(matches!(err, PkiError::Mismatch { .. }), "{err}");
        assert!(!m.pki_dir.join("master_sign.pem").exists());

        std::fs::remove_file(src.path().join("master_sign.pub")).unwrap();
        let err = import_signing(&m, src.path(), true).unwrap_err();
        assert!(matches!(err, PkiError::HalfPair { .. }), "{err}");
    }
}
