//! Who may use the HTTP API (issue #15): users with a role, API tokens with
//! scopes, browser sessions, and the audit log of every write.
//!
//! No secret is ever stored or shown twice: a password is kept as its
//! argon2id PHC string ([`PasswordHash`]), an API token ([`TokenSecret`]) and
//! a session cookie ([`SessionSecret`]) as the sha256 of their random value,
//! so a copy of the database lets nobody log in. Every type that holds a
//! secret has a redacting `Debug` and no `Display`; none is `Serialize`.
//!
//! Why sha256 and not argon2 for tokens and cookies: they are 256 random
//! bits, not something a person chose, so a fast hash cannot be brute-forced;
//! the lookup is by that hash (an index), so what a timing difference could
//! reveal is a prefix of the hash, never of the secret.
//!
//! Service operations: `registry::service::users`; SQL:
//! `registry::store::users` (both backends, one body).

use std::fmt;
use std::str::FromStr;

use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::Error;

/// The shortest password accepted, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// The longest password accepted, in bytes (argon2 takes any length; a
/// bound keeps a login request from hashing megabytes).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// The prefix of every API token: recognisable in a leaked log or file.
pub const TOKEN_PREFIX: &str = "sst_";

/// What a user may do. Ordered: each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything (GET).
    Viewer,
    /// Also changes the inventory and runs exec.
    Operator,
    /// Also manages users, tokens and reads the audit log.
    Admin,
}

impl Role {
    /// Every role, least first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "role",
                    format!("{s:?} is not one of viewer, operator, admin"),
                )
            })
    }
}

/// What an API token may do; a token's scopes are checked like a role:
/// `read` ≈ viewer, `write` ≈ operator, `admin` ≈ admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// GET requests.
    Read,
    /// Inventory writes and exec.
    Write,
    /// Users, tokens, audit.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Write, Scope::Admin];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    /// The role a request needs for this scope to be required.
    pub fn for_role(role: Role) -> Scope {
        match role {
            Role::Viewer => Scope::Read,
            Role::Operator => Scope::Write,
            Role::Admin => Scope::Admin,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Scope::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                Error::invalid("scope", format!("{s:?} is not one of read, write, admin"))
            })
    }
}

/// Scopes as stored: sorted, comma-separated.
pub fn scopes_text(scopes: &[Scope]) -> String {
    let mut v = scopes.to_vec();
    v.sort();
    v.dedup();
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
}

/// Scopes from their stored (or typed) comma-separated form.
pub fn parse_scopes(text: &str) -> Result<Vec<Scope>, Error> {
    let mut v = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<Vec<Scope>, Error>>()?;
    v.sort();
    v.dedup();
    Ok(v)
}

/// A user of the HTTP API, as shown (never with its password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Assigned by the registry.
    pub id: i64,
    /// Unique login name.
    pub name: String,
    /// What the user may do.
    pub role: Role,
    /// A disabled user cannot log in; its sessions and tokens stop working.
    pub disabled: bool,
    /// Creation time, Unix milliseconds.
    pub created_at: i64,
}

/// An API token, as shown (never its secret or hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Assigned by the registry.
    pub id: i64,
    /// Unique name, for people (`ci-deploy`).
    pub name: String,
    /// The user it acts for (its role caps the scopes), or none: a service token.
    pub user: Option<String>,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// When it stops working, Unix milliseconds; `None`: never.
    pub expires_at: Option<i64>,
    /// Creation time, Unix milliseconds.
    pub created_at: i64,
    /// Last accepted use, Unix milliseconds.
    pub last_used_at: Option<i64>,
}

/// A browser session, as the HTTP layer checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Whose it is (as stored now: a disabled user's session is refused).
    pub user: User,
    /// Login time, Unix milliseconds.
    pub created_at: i64,
    /// Last request seen, Unix milliseconds (idle expiry counts from it).
    pub last_seen_at: i64,
    /// Absolute expiry, Unix milliseconds.
    pub expires_at: i64,
}

/// One entry of the audit log: who did what to what, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Assigned by the registry, increasing.
    pub id: i64,
    /// `user:<name>`, `token:<name>` or `cli:<unix user>`.
    pub actor: String,
    /// What was done (`user.add`, `server.update` …).
    pub action: String,
    /// What it was done to (a name, `#id`).
    pub target: String,
    /// Details (never a secret).
    pub detail: serde_json::Value,
    /// When, Unix milliseconds.
    pub at: i64,
}

/// An audit entry to write with a change (the store adds id and time).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditNote {
    /// Who.
    pub actor: String,
    /// What was done.
    pub action: &'static str,
    /// To what.
    pub target: String,
    /// Details, never a secret.
    pub detail: serde_json::Value,
}

/// A user name: 1 to 64 of `a-z A-Z 0-9 . _ @ -`, starting with a letter or
/// digit (it appears in actors `user:<name>` and in logs: no spaces, no
/// colons, no control characters).
pub fn validate_user_name(name: &str) -> Result<String, Error> {
    validate_label("user name", name)
}

/// A token name: the same rules as a user name.
pub fn validate_token_name(name: &str) -> Result<String, Error> {
    validate_label("token name", name)
}

fn validate_label(field: &str, name: &str) -> Result<String, Error> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-');
    if name.is_empty() || name.len() > 64 {
        return Err(Error::invalid(
            field,
            format!("{name:?} must be 1 to 64 characters"),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) || !name.chars().all(ok_char) {
        return Err(Error::invalid(
            field,
            format!(
                "{name:?}: letters, digits, '.', '_', '@', '-', starting with a letter or digit"
            ),
        ));
    }
    Ok(name.to_owned())
}

/// A password a person typed, checked for length; zeroized on drop.
pub struct Password(Zeroizing<String>);

impl Password {
    /// Checks `text` (at least [`MIN_PASSWORD_CHARS`] characters, at most
    /// [`MAX_PASSWORD_BYTES`] bytes, not all whitespace).
    pub fn new(text: String) -> Result<Self, Error> {
        let text = Zeroizing::new(text);
        if text.trim().is_empty() {
            return Err(Error::PasswordTooShort {
                min: MIN_PASSWORD_CHARS,
            });
        }
        if text.chars().count() < MIN_PASSWORD_CHARS {
            return Err(Error::PasswordTooShort {
                min: MIN_PASSWORD_CHARS,
            });
        }
        if text.len() > MAX_PASSWORD_BYTES {
            return Err(Error::invalid(
                "password",
                format!("longer than {MAX_PASSWORD_BYTES} bytes"),
            ));
        }
        Ok(Self(text))
    }

    /// The text (to hash it).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A password's argon2id PHC string (`$argon2id$v=19$…`), as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(String);

impl PasswordHash {
    /// Hashes `password` with argon2id, the crate's default parameters and a
    /// random salt. Slow on purpose (tens of ms): call it off the runtime.
    pub fn of(password: &Password) -> Result<Self, Error> {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt)
            .map_err(|e| Error::invalid("password", format!("no randomness available: {e}")))?;
        let salt = SaltString::encode_b64(&salt)
            .map_err(|e| Error::invalid("password", format!("encoding the salt: {e}")))?;
        let phc = Argon2::default()
            .hash_password(password.expose().as_bytes(), &salt)
            .map_err(|e| Error::invalid("password", format!("hashing: {e}")))?;
        Ok(Self(phc.to_string()))
    }

    /// The stored form, as read back (not checked until verified).
    pub fn from_stored(phc: String) -> Self {
        Self(phc)
    }

    /// The PHC string, to store.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `password` is the one hashed (argon2's comparison is constant
    /// time). An unreadable stored hash verifies nothing. Slow: call it off
    /// the runtime.
    pub fn verify(&self, password: &str) -> bool {
        match argon2::PasswordHash::new(&self.0) {
            Ok(parsed) => Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok(),
            Err(_) => false,
        }
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash(<redacted>)")
    }
}

/// sha256 of `secret`, lower-case hex: what is stored of a token or cookie.
pub fn secret_hash(secret: &str) -> String {
    crate::hex::encode(Sha256::digest(secret.as_bytes()).as_slice())
}

/// 32 random bytes as hex.
fn random_hex() -> Result<Zeroizing<String>, Error> {
    let mut b = Zeroizing::new([0u8; 32]);
    getrandom::fill(b.as_mut_slice())
        .map_err(|e| Error::invalid("secret", format!("no randomness available: {e}")))?;
    Ok(Zeroizing::new(crate::hex::encode(b.as_slice())))
}

/// An API token's secret, `sst_` + 32 random bytes in hex: shown once, at
/// creation; only its sha256 is stored.
pub struct TokenSecret(Zeroizing<String>);

impl TokenSecret {
    /// A new random token.
    pub fn generate() -> Result<Self, Error> {
        let hex = random_hex()?;
        Ok(Self(Zeroizing::new(format!(
            "{TOKEN_PREFIX}{}",
            hex.as_str()
        ))))
    }

    /// The token, to show once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What is stored.
    pub fn hash(&self) -> String {
        secret_hash(&self.0)
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

/// A session cookie's value, 32 random bytes in hex; only its sha256 is stored.
pub struct SessionSecret(Zeroizing<String>);

impl SessionSecret {
    /// A new random session id.
    pub fn generate() -> Result<Self, Error> {
        Ok(Self(random_hex()?))
    }

    /// The cookie value, to send once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What is stored.
    pub fn hash(&self) -> String {
        secret_hash(&self.0)
    }
}

impl fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionSecret(<redacted>)")
    }
}

/// A duration as typed on the command line: `30d`, `12h`, `45m`, `90s`.
pub fn parse_duration_ms(text: &str) -> Result<i64, Error> {
    let bad = || {
        Error::invalid(
            "expires",
            format!("{text:?} is not a duration like 30d, 12h, 45m or 90s"),
        )
    };
    let t = text.trim();
    let unit_at = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = t.split_at(unit_at);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    match n.checked_mul(ms) {
        Some(v) if v > 0 => Ok(v),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roles_and_scopes_are_checked() {
        assert!(validate_user_name("alice").is_ok());
        assert!(validate_user_name("ops.bob@example-1").is_ok());
        for bad in ["", "-x", "a b", "a:b", &"a".repeat(65)] {
            assert_eq!(validate_user_name(bad).unwrap_err().code(), "invalid_value");
        }
        assert_eq!("admin".parse::<Role>().unwrap(), Role::Admin);
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        assert_eq!("root".parse::<Role>().unwrap_err().code(), "invalid_value");
        assert_eq!(
            parse_scopes("write, read,read").unwrap(),
            vec![Scope::Read, Scope::Write]
        );
        assert_eq!(scopes_text(&[Scope::Admin, Scope::Read]), "read,admin");
        assert!(parse_scopes("all").is_err());
    }

    #[test]
    fn passwords_are_long_enough_hashed_with_argon2id_and_never_shown() {
        assert_eq!(
            Password::new("short".into()).unwrap_err().code(),
            "password_too_short"
        );
        assert!(Password::new(" ".repeat(20)).is_err());
        let p = Password::new("correct horse battery".into()).unwrap();
        let h = PasswordHash::of(&p).unwrap();
        assert!(h.expose().starts_with("$argon2id$"), "{}", h.expose());
        assert!(h.verify("correct horse battery"));
        assert!(!h.verify("correct horse batterY"));
        assert!(!PasswordHash::from_stored("garbage".into()).verify("x"));
        for dbg in [format!("{p:?}"), format!("{h:?}")] {
            assert!(!dbg.contains("horse") && !dbg.contains("argon"), "{dbg}");
        }
    }

    #[test]
    fn tokens_are_random_prefixed_and_stored_as_sha256() {
        let a = TokenSecret::generate().unwrap();
        let b = TokenSecret::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("sst_") && a.expose().len() == 4 + 64);
        assert_eq!(a.hash().len(), 64);
        assert_eq!(a.hash(), secret_hash(a.expose()));
        assert!(!format!("{a:?}").contains(a.expose()));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30d").unwrap(), 30 * 86_400_000);
        assert_eq!(parse_duration_ms("90s").unwrap(), 90_000);
        for bad in ["", "d", "10", "10w", "0d", "-1d"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }
}
