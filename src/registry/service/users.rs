//! Users, API tokens and sessions: the service's operations, shared by the
//! CLI (`salt-steward user|token …`) and the HTTP API (`api::http`). Each
//! write names its actor and is audited in the same transaction. argon2id
//! runs on the blocking pool, never on a runtime thread. Time (`now`, Unix
//! ms) is a parameter, so tests drive expiry without sleeping.

use std::sync::OnceLock;

use super::Service;
use crate::registry::store::{NewSession, NewToken, NewUser};
use crate::registry::users::{
    secret_hash, validate_token_name, validate_user_name, ApiToken, AuditEntry, AuditNote,
    Password, PasswordHash, Role, Scope, Session, SessionSecret, TokenSecret, User, TOKEN_PREFIX,
};
use crate::registry::{Error, Store};

/// How long sessions last, from the `http` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// A session unused this long (ms) is over.
    pub idle_ms: i64,
    /// A session is over this long (ms) after login, used or not.
    pub absolute_ms: i64,
}

/// Who a bearer token speaks for: the token and its user, if it has one.
#[derive(Debug, Clone)]
pub struct TokenPrincipal {
    /// The token (scopes, expiry).
    pub token: ApiToken,
    /// Its user (enabled), whose role caps the scopes.
    pub user: Option<User>,
}

/// Runs argon2 (slow on purpose) on the blocking pool.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::invalid("password", format!("{what}: the hashing task failed: {e}")))
}

/// A hash to verify against when the user does not exist, so that a login
/// for an unknown name costs the same time as one for a known name.
fn decoy_hash() -> Option<&'static PasswordHash> {
    static DECOY: OnceLock<Option<PasswordHash>> = OnceLock::new();
    DECOY
        .get_or_init(|| {
            Password::new("decoy password that no one has".to_owned())
                .and_then(|p| PasswordHash::of(&p))
                .ok()
        })
        .as_ref()
}

impl<S: Store> Service<S> {
    /// Adds user `name` with `role` and `password` (hashed with argon2id).
    pub async fn add_user(
        &self,
        actor: &str,
        name: &str,
        role: Role,
        password: Password,
    ) -> Result<User, Error> {
        let name = validate_user_name(name)?;
        if self.store.user(&name).await?.is_some() {
            return Err(Error::DuplicateUser { name });
        }
        let password_hash = blocking("hashing", move || PasswordHash::of(&password)).await??;
        let audit = AuditNote {
            actor: actor.to_owned(),
            action: "user.add",
            target: name.clone(),
            detail: serde_json::json!({"role": role}),
        };
        self.store
            .insert_user(
                &NewUser {
                    name,
                    role,
                    password_hash,
                },
                &audit,
            )
            .await
    }

    /// Sets user `name`'s password; its sessions end.
    pub async fn user_passwd(
        &self,
        actor: &str,
        name: &str,
        password: Password,
    ) -> Result<User, Error> {
        let hash = blocking("hashing", move || PasswordHash::of(&password)).await??;
        let audit = AuditNote {
            actor: actor.to_owned(),
            action: "user.passwd",
            target: name.to_owned(),
            detail: serde_json::json!({}),
        };
        self.store.set_user_password(name, &hash, &audit).await
    }

    /// Disables user `name`: no login, its sessions end, its tokens stop working.
    pub async fn disable_user(&self, actor: &str, name: &str) -> Result<User, Error> {
        let audit = AuditNote {
            actor: actor.to_owned(),
            action: "user.disable",
            target: name.to_owned(),
            detail: serde_json::json!({}),
        };
        self.store.set_user_disabled(name, true, &audit).await
    }

    /// Every user, by name.
    pub async fn list_users(&self) -> Result<Vec<User>, Error> {
        self.store.users().await
    }

    /// Adds API token `name` with `scopes`, for `user` (whose role must allow
    /// each scope) or none, expiring `expires_in_ms` after `now`; the secret
    /// is returned here, and only here.
    pub async fn add_token(
        &self,
        actor: &str,
        name: &str,
        scopes: &[Scope],
        user: Option<&str>,
        expires_in_ms: Option<i64>,
        now: i64,
    ) -> Result<(ApiToken, TokenSecret), Error> {
        let name = validate_token_name(name)?;
        if scopes.is_empty() {
            return Err(Error::invalid(
                "scope",
                "at least one scope: read, write, admin",
            ));
        }
        let user = match user {
            Some(u) => {
                let u = self.store.user(u).await?.ok_or_else(|| Error::NotFound {
                    kind: "user",
                    key: u.to_owned(),
                })?;
                if u.disabled {
                    return Err(Error::invalid("user", format!("{} is disabled", u.name)));
                }
                if let Some(s) = scopes.iter().find(|s| **s > Scope::for_role(u.role)) {
                    return Err(Error::invalid(
                        "scope",
                        format!("{s} is more than {}'s role {} allows", u.name, u.role),
                    ));
                }
                Some(u)
            }
            None => None,
        };
        let secret = TokenSecret::generate()?;
        let expires_at = expires_in_ms.map(|ms| now.saturating_add(ms));
        let audit = AuditNote {
            actor: actor.to_owned(),
            action: "token.add",
            target: name.clone(),
            detail: serde_json::json!({
                "scopes": scopes,
                "user": user.as_ref().map(|u| &u.name),
                "expires_at": expires_at,
            }),
        };
        let token = self
            .store
            .insert_token(
                &NewToken {
                    name,
                    user_id: user.map(|u| u.id),
                    secret_hash: secret.hash(),
                    scopes: scopes.to_vec(),
                    expires_at,
                },
                &audit,
            )
            .await?;
        Ok((token, secret))
    }

    /// Every token, by name (never their secrets).
    pub async fn list_tokens(&self) -> Result<Vec<ApiToken>, Error> {
        self.store.tokens().await
    }

    /// Removes token `name`.
    pub async fn remove_token(&self, actor: &str, name: &str) -> Result<ApiToken, Error> {
        let audit = AuditNote {
            actor: actor.to_owned(),
            action: "token.rm",
            target: name.to_owned(),
            detail: serde_json::json!({}),
        };
        self.store.delete_token(name, &audit).await
    }

    /// Who the bearer token `secret` speaks for at `now`: `None` when it is
    /// unknown, expired, or its user is disabled.
    pub async fn token_principal(
        &self,
        secret: &str,
        now: i64,
    ) -> Result<Option<TokenPrincipal>, Error> {
        if !secret.starts_with(TOKEN_PREFIX) {
            return Ok(None);
        }
        let Some((token, user_id)) = self.store.token_by_hash(&secret_hash(secret)).await? else {
            return Ok(None);
        };
        if token.expires_at.is_some_and(|t| now >= t) {
            return Ok(None);
        }
        let user = match user_id {
            Some(id) => match self.store.user_by_id(id).await? {
                Some(u) if !u.disabled => Some(u),
                _ => return Ok(None),
            },
            None => None,
        };
        self.store.touch_token(token.id, now).await?;
        Ok(Some(TokenPrincipal { token, user }))
    }

    /// Checks `name`'s `password` (argon2 on the blocking pool; an unknown
    /// name costs the same) and starts a session: `None` if refused (unknown,
    /// wrong password, disabled). The session the browser presented
    /// (`replaces`, its cookie value) ends: a new id at every login.
    pub async fn login(
        &self,
        name: &str,
        password: String,
        replaces: Option<&str>,
        now: i64,
        limits: SessionLimits,
    ) -> Result<Option<(User, SessionSecret)>, Error> {
        let password = zeroize::Zeroizing::new(password);
        let found = self.store.user_with_hash(name).await?;
        let (user, hash) = match found {
            Some((u, h)) => (Some(u), Some(h)),
            None => (None, decoy_hash().cloned()),
        };
        let Some(hash) = hash else {
            return Ok(None);
        };
        let ok = blocking("verifying", move || hash.verify(&password)).await?;
        let Some(user) = user.filter(|u| ok && !u.disabled) else {
            return Ok(None);
        };
        let secret = SessionSecret::generate()?;
        self.store
            .insert_session(
                &NewSession {
                    id_hash: secret.hash(),
                    user_id: user.id,
                    now,
                    expires_at: now.saturating_add(limits.absolute_ms),
                    replaces: replaces.map(secret_hash),
                },
                now.saturating_sub(limits.idle_ms),
            )
            .await?;
        self.store
            .append_audit(&AuditNote {
                actor: format!("user:{}", user.name),
                action: "session.login",
                target: user.name.clone(),
                detail: serde_json::json!({}),
            })
            .await?;
        Ok(Some((user, secret)))
    }

    /// The session of cookie value `cookie` at `now`, its activity recorded:
    /// `None` (and the session ended) when it is past its absolute expiry,
    /// idle too long, or its user is disabled.
    pub async fn session(
        &self,
        cookie: &str,
        now: i64,
        limits: SessionLimits,
    ) -> Result<Option<Session>, Error> {
        let hash = secret_hash(cookie);
        let Some(s) = self.store.session(&hash).await? else {
            return Ok(None);
        };
        let over = now >= s.expires_at
            || now.saturating_sub(s.last_seen_at) > limits.idle_ms
            || s.user.disabled;
        if over {
            self.store.delete_session(&hash).await?;
            return Ok(None);
        }
        self.store.touch_session(&hash, now).await?;
        Ok(Some(s))
    }

    /// Ends the session of cookie value `cookie`; whether there was one.
    pub async fn logout(&self, cookie: &str) -> Result<bool, Error> {
        self.store.delete_session(&secret_hash(cookie)).await
    }

    /// Records a change made elsewhere (a server update through the API).
    pub async fn audit(&self, note: &AuditNote) -> Result<(), Error> {
        self.store.append_audit(note).await
    }

    /// The audit log, newest first, entries with ids below `before`.
    pub async fn audit_log(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditEntry>, Error> {
        self.store.audit(before, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{DbStore, Service};

    async fn registry() -> Service<DbStore> {
        crate::registry::open("sqlite::memory:").await.unwrap()
    }

    fn pw(s: &str) -> Password {
        Password::new(s.to_owned()).unwrap()
    }

    const LIMITS: SessionLimits = SessionLimits {
        idle_ms: 1_000,
        absolute_ms: 10_000,
    };

    #[tokio::test]
    async fn users_sessions_and_tokens_expire_and_are_audited() {
        let svc = registry().await;
        let alice = svc
            .add_user(
                "cli:test",
                "alice",
                Role::Operator,
                pw("alice's long password"),
            )
            .await
            .unwrap();
        assert_eq!(
            svc.add_user(
                "cli:test",
                "alice",
                Role::Viewer,
                pw("another long password")
            )
            .await
            .unwrap_err()
            .code(),
            "duplicate_user"
        );
        // Login: wrong password, unknown user, right one.
        let now = 1_000_000;
        assert!(svc
            .login("alice", "wrong password!!".into(), None, now, LIMITS)
            .await
            .unwrap()
            .is_none());
        assert!(svc
            .login("nobody", "wrong password!!".into(), None, now, LIMITS)
            .await
            .unwrap()
            .is_none());
        let (u, s1) = svc
            .login("alice", "alice's long password".into(), None, now, LIMITS)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(u, alice);
        assert!(svc
            .session(s1.expose(), now + 500, LIMITS)
            .await
            .unwrap()
            .is_some());
        // Idle: 1 s after the last request, over.
        assert!(svc
            .session(s1.expose(), now + 1_501, LIMITS)
            .await
            .unwrap()
            .is_none());
        // Rotation: a new login ends the session presented.
        let (_, s2) = svc
            .login("alice", "alice's long password".into(), None, now, LIMITS)
            .await
            .unwrap()
            .unwrap();
        let (_, s3) = svc
            .login(
                "alice",
                "alice's long password".into(),
                Some(s2.expose()),
                now,
                LIMITS,
            )
            .await
            .unwrap()
            .unwrap();
        assert!(svc
            .session(s2.expose(), now, LIMITS)
            .await
            .unwrap()
            .is_none());
        // Absolute: kept busy, still over after 10 s.
        let mut t = now;
        while t < now + 10_000 {
            assert!(
                svc.session(s3.expose(), t, LIMITS).await.unwrap().is_some(),
                "{t}"
            );
            t += 900;
        }
        assert!(svc
            .session(s3.expose(), now + 10_000, LIMITS)
            .await
            .unwrap()
            .is_none());

        // Tokens: scopes capped by the role, expiry, disabled user.
        assert_eq!(
            svc.add_token("cli:test", "t1", &[Scope::Admin], Some("alice"), None, now)
                .await
                .unwrap_err()
                .code(),
            "invalid_value"
        );
        let (tok, secret) = svc
            .add_token(
                "cli:test",
                "t1",
                &[Scope::Read, Scope::Write],
                Some("alice"),
                Some(5_000),
                now,
            )
            .await
            .unwrap();
        assert_eq!(tok.scopes, vec![Scope::Read, Scope::Write]);
        assert_eq!(
            svc.add_token("cli:test", "t1", &[Scope::Read], None, None, now)
                .await
                .unwrap_err()
                .code(),
            "duplicate_token"
        );
        let p = svc
            .token_principal(secret.expose(), now + 4_999)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.user.unwrap().name, "alice");
        assert!(svc
            .token_principal(secret.expose(), now + 5_000)
            .await
            .unwrap()
            .is_none());
        assert!(svc
            .token_principal("sst_nope", now)
            .await
            .unwrap()
            .is_none());
        let (_, s4) = svc
            .login("alice", "alice's long password".into(), None, now, LIMITS)
            .await
            .unwrap()
            .unwrap();
        let (_, forever) = svc
            .add_token("cli:test", "t2", &[Scope::Read], Some("alice"), None, now)
            .await
            .unwrap();
        svc.disable_user("cli:test", "alice").await.unwrap();
        assert!(svc
            .session(s4.expose(), now, LIMITS)
            .await
            .unwrap()
            .is_none());
        assert!(svc
            .token_principal(forever.expose(), now)
            .await
            .unwrap()
            .is_none());
        assert!(svc
            .login("alice", "alice's long password".into(), None, now, LIMITS)
            .await
            .unwrap()
            .is_none());

        let log = svc.audit_log(None, 100).await.unwrap();
        let actions: Vec<&str> = log.iter().rev().map(|e| e.action.as_str()).collect();
        assert_eq!(
            actions,
            [
                "user.add",
                "session.login",
                "session.login",
                "session.login",
                "token.add",
                "session.login",
                "token.add",
                "user.disable"
            ]
        );
        let text = format!("{log:?}");
        assert!(
            !text.contains(secret.expose()) && !text.contains("argon2"),
            "{text}"
        );
    }
}
