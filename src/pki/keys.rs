//! RSA key pairs in the exact text forms Salt writes and compares, and the
//! fingerprints `salt-key -F` prints.
//!
//! Salt's rules (salt-protocol §4–5): private keys are PKCS#1
//! (`BEGIN RSA PRIVATE KEY`), public keys SPKI (`BEGIN PUBLIC KEY`) with a
//! trailing newline on disk; the master stores a minion's key *clean_key'd*
//! (surrounding whitespace stripped, line endings normalised) and compares
//! keys as text after `clean_key`, never as numbers. A fingerprint is the
//! hash of the base64 lines (each with its `\n`), BEGIN/END and blank lines
//! dropped, as colon-separated hex pairs.

use std::fmt;

use rsa::pkcs1::EncodeRsaPrivateKey as _;
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePublicKey as _, EncodePublicKey as _, LineEnding};
use rsa::signature::{SignatureEncoding as _, Signer as _, Verifier as _};
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// Smallest key size accepted (Salt's default and floor in practice).
pub const MIN_BITS: usize = 2048;
/// Largest key size accepted (generation time grows with the cube).
pub const MAX_BITS: usize = 8192;

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Key size out of range.
    #[error("key size {0} bits: use {MIN_BITS} to {MAX_BITS}")]
    Size(usize),
    /// RSA generation or signing failed.
    #[error("RSA: {0}")]
    Rsa(String),
    /// A PEM text could not be read as a key.
    #[error("not a PEM {what}: {reason}")]
    Pem {
        /// What was expected.
        what: &'static str,
        /// The parser's reason.
        reason: String,
    },
}

/// A freshly generated (or loaded) RSA pair with its two PEM texts.
#[derive(Clone)]
pub struct KeyPair {
    /// PKCS#1 `BEGIN RSA PRIVATE KEY`, with trailing newline (zeroed on drop).
    private_pem: Zeroizing<String>,
    /// SPKI `BEGIN PUBLIC KEY`, with trailing newline, as Salt writes `minion.pub`.
    public_pem: String,
}

impl fmt::Debug for KeyPair {
    /// Never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("fingerprint", &fingerprint(&self.public_pem))
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// Generates a pair of `bits` bits (slow: ~0.1–1 s for 2048 in release).
    pub fn generate(bits: usize) -> Result<Self, KeyError> {
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return Err(KeyError::Size(bits));
        }
        let key = RsaPrivateKey::new(&mut rand_core::OsRng, bits)
            .map_err(|e| KeyError::Rsa(e.to_string()))?;
        Self::from_private(&key)
    }

    /// The pair of a private key.
    pub fn from_private(key: &RsaPrivateKey) -> Result<Self, KeyError> {
        let private_pem = key
            .to_pkcs1_pem(LineEnding::LF)
            .map_err(|e| KeyError::Rsa(e.to_string()))?;
        let public_pem = RsaPublicKey::from(key)
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| KeyError::Rsa(e.to_string()))?;
        Ok(Self {
            private_pem: Zeroizing::new(private_pem.as_str().to_owned()),
            public_pem,
        })
    }

    /// Reads a private key PEM (PKCS#1 or PKCS#8, as Salt accepts both).
    pub fn from_private_pem(pem: &str) -> Result<Self, KeyError> {
        Self::from_private(&parse_private(pem)?)
    }

    /// The private key text (PKCS#1 PEM). Goes only into 0600 files and bundles.
    pub fn private_pem(&self) -> &str {
        &self.private_pem
    }

    /// The public key text as Salt writes `minion.pub` / `master.pub`.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// The public key as the master stores and compares it.
    pub fn public_clean(&self) -> String {
        clean_key(&self.public_pem)
    }

    /// `salt-key -F` fingerprint (sha256) of the public key.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public_pem)
    }

    /// Whether `public_pem` (SPKI, or PKCS#1 `BEGIN RSA PUBLIC KEY`) is this
    /// pair's public key, compared as numbers, not as text.
    pub fn matches_public(&self, public_pem: &str) -> Result<bool, KeyError> {
        Ok(parse_public(public_pem)? == parse_public(&self.public_pem)?)
    }

    /// RSASSA-PKCS1-v1_5 over SHA-1 of `message` (the only algorithm Salt's
    /// pre-made master key signature can use).
    pub fn sign_sha1(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let key = parse_private(&self.private_pem)?;
        let signer = SigningKey::<sha1::Sha1>::new(key);
        let sig = signer
            .try_sign(message)
            .map_err(|e| KeyError::Rsa(e.to_string()))?;
        Ok(sig.to_vec())
    }
}

fn parse_private(pem: &str) -> Result<RsaPrivateKey, KeyError> {
    use rsa::pkcs1::DecodeRsaPrivateKey as _;
    use rsa::pkcs8::DecodePrivateKey as _;
    RsaPrivateKey::from_pkcs1_pem(pem.trim())
        .or_else(|_| RsaPrivateKey::from_pkcs8_pem(pem.trim()))
        .map_err(|e| KeyError::Pem {
            what: "RSA private key",
            reason: e.to_string(),
        })
}

fn parse_public(pem: &str) -> Result<RsaPublicKey, KeyError> {
    use rsa::pkcs1::DecodeRsaPublicKey as _;
    RsaPublicKey::from_public_key_pem(pem.trim())
        .or_else(|_| RsaPublicKey::from_pkcs1_pem(pem.trim()))
        .map_err(|e| KeyError::Pem {
            what: "public key",
            reason: e.to_string(),
        })
}

/// Checks an RSASSA-PKCS1-v1_5/SHA-1 `signature` of `message` by the SPKI
/// `public_pem`.
pub fn verify_sha1(public_pem: &str, message: &[u8], signature: &[u8]) -> Result<bool, KeyError> {
    let key = parse_public(public_pem)?;
    let Ok(sig) = Signature::try_from(signature) else {
        return Ok(false);
    };
    Ok(VerifyingKey::<sha1::Sha1>::new(key)
        .verify(message, &sig)
        .is_ok())
}

/// Encrypts `plaintext` for the holder of the private key of `public_pem`
/// (SPKI or PKCS#1): RSA-OAEP with SHA-256 as the digest and MGF1's digest,
/// empty label (what `steward.share` decrypts with Python's `cryptography`).
pub fn encrypt_oaep_sha256(public_pem: &str, plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
    let key = parse_public(public_pem)?;
    key.encrypt(
        &mut rand_core::OsRng,
        rsa::Oaep::new::<sha2::Sha256>(),
        plaintext,
    )
    .map_err(|e| KeyError::Rsa(e.to_string()))
}

/// Salt's `clean_key`: `"\n".join(text.strip().splitlines())`.
pub fn clean_key(text: &str) -> String {
    text.trim().lines().collect::<Vec<_>>().join("\n")
}

/// `salt-key -F` (`salt.utils.crypt.pem_finger`, sha256): the hash of the
/// PEM's inner lines, each with its newline, BEGIN/END and blank lines dropped.
pub fn fingerprint(pem: &str) -> String {
    let lines: Vec<&str> = pem.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut h = Sha256::new();
    if lines.len() > 2 {
        for l in &lines[1..lines.len() - 1] {
            h.update(l.as_bytes());
            h.update(b"\n");
        }
    }
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minion key pair and `salt-key -f` output captured from a 3007.8 master.
    #[test]
    fn fingerprint_matches_salt_key_for_a_real_key() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let pub_pem = std::fs::read_to_string(dir.join("minion-3007.pub")).unwrap();
        let finger = std::fs::read_to_string(dir.join("minion-3007.finger")).unwrap();
        assert_eq!(fingerprint(&pub_pem), finger.trim());
        // The stored (clean_key'd) form has the same fingerprint.
        assert_eq!(fingerprint(&clean_key(&pub_pem)), finger.trim());
    }

    #[test]
    fn generated_pairs_have_salts_forms_and_sign() {
        let kp = KeyPair::generate(2048).unwrap();
        assert!(kp
            .private_pem()
            .starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
        assert!(kp.public_pem().starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert!(kp.public_pem().ends_with("-----END PUBLIC KEY-----\n"));
        assert_eq!(kp.public_pem().len(), 451, "as Salt's 2048-bit minion.pub");
        assert_eq!(kp.public_clean().len(), 450);
        let sig = kp.sign_sha1(b"hello").unwrap();
        assert!(verify_sha1(kp.public_pem(), b"hello", &sig).unwrap());
        assert!(!verify_sha1(kp.public_pem(), b"hello\n", &sig).unwrap());
        let again = KeyPair::from_private_pem(kp.private_pem()).unwrap();
        assert_eq!(again.public_pem(), kp.public_pem());
        assert!(!format!("{kp:?}").contains("PRIVATE"));
        assert!(kp.matches_public(&kp.public_clean()).unwrap());
        assert!(!KeyPair::generate(2048)
            .unwrap()
            .matches_public(kp.public_pem())
            .unwrap());
        assert!(matches!(KeyPair::generate(1024), Err(KeyError::Size(1024))));
    }

    #[test]
    fn clean_key_is_salts() {
        assert_eq!(clean_key("\n a\r\nb\n\n"), "a\nb");
    }
}
