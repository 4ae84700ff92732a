//! Samba shares: a folder of a samba-managed server served under a share
//! name, with one system user per share whose password the daemon generates.
//!
//! The records, their validation (the rules of `steward.share`,
//! `salt-states/README.md`), the generated password and its NT hash. The SQL
//! is in `store/shares.rs`, the operations in `service::shares`
//! (`create_share` …). The password is shown once and never stored: the
//! registry keeps the NT hash (`MD4(UTF-16LE(password))`, what `pdbedit`
//! imports), which is password-equivalent for SMB — [`NtHash`] never prints
//! it, the outbox payload ([`ShareChange`]) and the records never carry it.

use std::fmt;

use md4::{Digest as _, Md4};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::Error;

/// The default prefix of share users (`shares.user_prefix`).
pub const DEFAULT_USER_PREFIX: &str = "smb-";

/// Longest share name (the state's rule).
pub const MAX_NAME: usize = 80;

/// Longest user name: Debian `useradd`'s 32 characters.
pub const MAX_USER: usize = 32;

/// Longest folder (relative), in bytes.
pub const MAX_FOLDER: usize = 4096;

/// Length of a generated password.
pub const PASSWORD_LEN: usize = 20;

/// Characters of generated passwords: letters and digits without the
/// look-alikes (`0 O 1 l I`), so one can be read out and typed.
const PASSWORD_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";

/// Share names samba reserves (sections of smb.conf itself).
const RESERVED: [&str; 5] = ["global", "homes", "printers", "print$", "ipc$"];

/// A samba share as the registry knows it (never with its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Assigned by the registry.
    pub id: i64,
    /// The samba server (server id).
    pub server_id: i64,
    /// Its name.
    pub server: String,
    /// The share name (unique on its server, ignoring case).
    pub name: String,
    /// The folder, relative to the server's samba base.
    pub folder: String,
    /// The system user owning the folder and allowed on the share.
    pub user: String,
    /// Incremented by every write (a new password too).
    pub revision: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "share #{} ({} on {}, folder {}, user {})",
            self.id, self.name, self.server, self.folder, self.user
        )
    }
}

/// A share change as the outbox records it (and `steward/v1/share/*`
/// notifications carry it): the share, without any secret, and the target
/// servers whose `share` state it changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareChange {
    /// The share after the change (as it was, for a deletion).
    #[serde(flatten)]
    pub share: Share,
    /// Target servers affected.
    pub targets: Vec<i64>,
}

/// An NT hash, 32 lower-case hex digits: a secret. `Debug` and `Display`
/// never show it; [`NtHash::expose`] is for the pillar and the database.
#[derive(Clone, PartialEq, Eq)]
pub struct NtHash(Zeroizing<String>);

impl NtHash {
    /// The NT hash of `password`: `MD4(UTF-16LE(password))` in lower-case hex.
    pub fn of(password: &Password) -> Self {
        let utf16: Zeroizing<Vec<u8>> = Zeroizing::new(
            password
                .expose()
                .encode_utf16()
                .flat_map(u16::to_le_bytes)
                .collect(),
        );
        Self(Zeroizing::new(crate::hex::encode(&Md4::digest(
            utf16.as_slice(),
        ))))
    }

    /// A stored hash, checked: 32 lower-case hex digits.
    pub fn from_stored(text: String) -> Result<Self, Error> {
        let ok = text.len() == 32
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(Zeroizing::new(text)))
        } else {
            Err(Error::invalid(
                "nt_hash",
                "the stored value is not 32 lower-case hex digits",
            ))
        }
    }

    /// The hex text (a secret: for the database and the encrypted pillar).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NtHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NtHash(***)")
    }
}

/// A generated password: shown once to whoever asked, never logged or
/// stored. `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Zeroizing<String>);

impl Password {
    /// [`PASSWORD_LEN`] characters of `PASSWORD_ALPHABET` from the
    /// operating system's random source (rejection sampling: no bias).
    pub fn generate() -> Result<Self, Error> {
        let n = PASSWORD_ALPHABET.len();
        // The largest multiple of n below 256: bytes at or above it are drawn again.
        let limit = 256 - (256 % n);
        let mut out = Zeroizing::new(String::with_capacity(PASSWORD_LEN));
        let mut buf = Zeroizing::new([0u8; 64]);
        while out.len() < PASSWORD_LEN {
            getrandom::fill(buf.as_mut_slice())
                .map_err(|e| Error::invalid("password", format!("no randomness available: {e}")))?;
            for &b in buf.iter() {
                if usize::from(b) < limit && out.len() < PASSWORD_LEN {
                    out.push(char::from(PASSWORD_ALPHABET[usize::from(b) % n]));
                }
            }
        }
        Ok(Self(out))
    }

    /// The password (to show once).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A share name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,79}`, not one of samba's own
/// sections (global, homes, printers, print$, ipc$).
pub fn validate_name(name: &str) -> Result<String, Error> {
    let name = name.trim();
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !ok {
        return Err(Error::invalid(
            "name",
            format!(
                "{name:?} is not a share name (a letter or digit, then up to 79 letters, \
                 digits, '_', '.' or '-')"
            ),
        ));
    }
    if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(Error::invalid(
            "name",
            format!("{name:?} is a section samba reserves"),
        ));
    }
    Ok(name.to_owned())
}

/// A share folder relative to the samba base: not absolute, no `..`, each
/// component `[A-Za-z0-9_][A-Za-z0-9_.@+ -]*`; a trailing `/` is dropped.
pub fn validate_folder(folder: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::invalid("folder", format!("{folder:?} {why}"));
    if folder.starts_with('/') {
        return Err(bad(
            "is absolute: a share folder is relative to the server's samba base",
        ));
    }
    let trimmed = folder.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(bad("is empty"));
    }
    if trimmed.len() > MAX_FOLDER {
        return Err(bad("is too long"));
    }
    for part in trimmed.split('/') {
        if part == ".." {
            return Err(bad("leaves the samba base (a '..' component)"));
        }
        if part.is_empty() {
            return Err(bad("has an empty component ('//')"));
        }
        let ok = part
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            && part.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'+' | b' ' | b'-')
            });
        if !ok {
            return Err(bad(&format!(
                "has a component {part:?} that is not [A-Za-z0-9_][A-Za-z0-9_.@+ -]*"
            )));
        }
    }
    Ok(trimmed.to_owned())
}

/// The system user of share `name`: `prefix` + the lower-cased name, a
/// Debian user name `[a-z][a-z0-9_-]{0,31}`; too long is
/// [`Error::UserNameTooLong`].
pub fn user_for(prefix: &str, name: &str) -> Result<String, Error> {
    let user = format!("{prefix}{}", name.to_ascii_lowercase());
    if user.len() > MAX_USER {
        return Err(Error::UserNameTooLong {
            user,
            max: MAX_USER,
        });
    }
    let ok = user.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(user)
    } else {
        Err(Error::invalid(
            "user",
            format!(
                "{user:?} (shares.user_prefix {prefix:?} + the share name) is not a user name \
                 [a-z][a-z0-9_-]*: rename the share (no '.') or change the prefix"
            ),
        ))
    }
}

/// A `shares.user_prefix`: empty, or `[a-z][a-z0-9_-]*` (at most 31).
pub fn validate_user_prefix(prefix: &str) -> Result<(), String> {
    let ok = prefix.is_empty()
        || (prefix.len() < MAX_USER
            && prefix
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-')));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{prefix:?} is not a user name prefix ([a-z][a-z0-9_-]*, at most 31)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nt_hash_is_md4_of_utf16le() {
        // The NT hash of "password" (well known).
        let p = Password(Zeroizing::new("password".to_owned()));
        assert_eq!(NtHash::of(&p).expose(), "8846f7eaee8fb117ad06bdd830b7586c");
        assert_eq!(format!("{:?}", NtHash::of(&p)), "NtHash(***)");
        assert_eq!(format!("{p:?}"), "Password(***)");
        assert!(NtHash::from_stored("8846F7EAEE8FB117AD06BDD830B7586C".into()).is_err());
    }

    #[test]
    fn passwords_are_long_random_and_safe() {
        let a = Password::generate().unwrap();
        let b = Password::generate().unwrap();
        assert_eq!(a.expose().len(), PASSWORD_LEN);
        assert_ne!(a, b);
        assert!(a.expose().bytes().all(|c| PASSWORD_ALPHABET.contains(&c)));
    }

    #[test]
    fn names_folders_and_users_follow_the_state() {
        assert_eq!(validate_name("Projects.v2").unwrap(), "Projects.v2");
        for bad in ["", "-a", "a b", "homes", "IPC$", "print$", &"a".repeat(81)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert_eq!(validate_folder("a/b c/").unwrap(), "a/b c");
        for bad in [
            "", "/", "/srv", "..", "a/../b", "a//b", ".hidden", "a/-x", "a\\b",
        ] {
            assert!(validate_folder(bad).is_err(), "{bad}");
        }
        assert_eq!(user_for("smb-", "Projects").unwrap(), "smb-projects");
        assert_eq!(
            user_for("smb-", &"a".repeat(29)).unwrap_err().code(),
            "user_name_too_long"
        );
        assert_eq!(user_for("smb-", "a.b").unwrap_err().code(), "invalid_value");
        assert!(user_for("", "9x").is_err());
        assert!(validate_user_prefix("smb-").is_ok());
        assert!(validate_user_prefix("").is_ok());
        assert!(validate_user_prefix("Smb").is_err());
    }
}
