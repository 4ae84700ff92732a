//! The SQL of users, API tokens, sessions and the audit log, for both
//! backends (one body, `users_impl!`, instantiated twice like
//! `store_impl!`). Every write of a user or token is one transaction that
//! also appends its audit entry. Nothing here is an inventory change: no
//! outbox row (nothing is dispatched, nothing is announced on the bus).
//! Secrets never come in or out except as their hashes; only
//! [`UserStore::user_with_hash`] reads a password hash (for login).

use std::future::Future;

use sqlx::error::ErrorKind;
use sqlx::Row as _;

use super::{db, now_ms, violation, DbStore, PgStore, SqliteStore};
use crate::registry::users::{
    parse_scopes, scopes_text, ApiToken, AuditEntry, AuditNote, PasswordHash, Role, Session, User,
};
use crate::registry::Error;

/// A new user, validated by the service.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// The argon2id hash of the password.
    pub password_hash: PasswordHash,
}

/// A new API token, validated by the service.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// Unique name.
    pub name: String,
    /// The user it acts for.
    pub user_id: Option<i64>,
    /// sha256 (hex) of the secret.
    pub secret_hash: String,
    /// Scopes.
    pub scopes: Vec<crate::registry::users::Scope>,
    /// Expiry, Unix ms.
    pub expires_at: Option<i64>,
}

/// A new browser session.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// sha256 (hex) of the cookie value.
    pub id_hash: String,
    /// Whose.
    pub user_id: i64,
    /// Login time, Unix ms.
    pub now: i64,
    /// Absolute expiry, Unix ms.
    pub expires_at: i64,
    /// The session the browser presented at login, ended by this one
    /// (rotation at login).
    pub replaces: Option<String>,
}

/// Users, tokens, sessions and the audit log in the registry.
pub trait UserStore {
    /// Adds a user (and its audit entry).
    fn insert_user(
        &self,
        u: &NewUser,
        audit: &AuditNote,
    ) -> impl Future<Output = Result<User, Error>> + Send;
    /// One user by name.
    fn user(&self, name: &str) -> impl Future<Output = Result<Option<User>, Error>> + Send;
    /// One user by id.
    fn user_by_id(&self, id: i64) -> impl Future<Output = Result<Option<User>, Error>> + Send;
    /// One user with its password hash (login only).
    fn user_with_hash(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<(User, PasswordHash)>, Error>> + Send;
    /// All users, by name.
    fn users(&self) -> impl Future<Output = Result<Vec<User>, Error>> + Send;
    /// Replaces a user's password hash and ends its sessions.
    fn set_user_password(
        &self,
        name: &str,
        hash: &PasswordHash,
        audit: &AuditNote,
    ) -> impl Future<Output = Result<User, Error>> + Send;
    /// Disables (or enables) a user; disabling ends its sessions.
    fn set_user_disabled(
        &self,
        name: &str,
        disabled: bool,
        audit: &AuditNote,
    ) -> impl Future<Output = Result<User, Error>> + Send;

    /// Adds an API token.
    fn insert_token(
        &self,
        t: &NewToken,
        audit: &AuditNote,
    ) -> impl Future<Output = Result<ApiToken, Error>> + Send;
    /// All tokens, by name.
    fn tokens(&self) -> impl Future<Output = Result<Vec<ApiToken>, Error>> + Send;
    /// The token whose secret hashes to `hash`, with its user's id.
    fn token_by_hash(
        &self,
        hash: &str,
    ) -> impl Future<Output = Result<Option<(ApiToken, Option<i64>)>, Error>> + Send;
    /// Records an accepted use of token `id`.
    fn touch_token(&self, id: i64, now: i64) -> impl Future<Output = Result<(), Error>> + Send;
    /// Removes a token by name, returning it.
    fn delete_token(
        &self,
        name: &str,
        audit: &AuditNote,
    ) -> impl Future<Output = Result<ApiToken, Error>> + Send;

    /// Starts a session (ending the one it replaces, and every session that
    /// expired before `now` or was idle since `idle_before`).
    fn insert_session(
        &self,
        s: &NewSession,
        idle_before: i64,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// The session whose cookie hashes to `hash`.
    fn session(&self, hash: &str) -> impl Future<Output = Result<Option<Session>, Error>> + Send;
    /// Records a request seen on a session.
    fn touch_session(&self, hash: &str, now: i64)
        -> impl Future<Output = Result<(), Error>> + Send;
    /// Ends a session; whether there was one.
    fn delete_session(&self, hash: &str) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Appends an audit entry on its own (for changes written elsewhere).
    fn append_audit(&self, audit: &AuditNote) -> impl Future<Output = Result<(), Error>> + Send;
    /// Audit entries, newest first, with ids below `before`.
    fn audit(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<AuditEntry>, Error>> + Send;
}

mod sql {
    pub const USER: &str = "SELECT id, name, role, disabled, created_at FROM users ";
    pub const USER_HASH: &str =
        "SELECT id, name, role, disabled, created_at, password_hash FROM users WHERE name = $1";
    pub const INSERT_USER: &str = "INSERT INTO users (name, role, password_hash, disabled, \
         created_at) VALUES ($1, $2, $3, $4, $5) RETURNING id";
    pub const SET_PASSWORD: &str = "UPDATE users SET password_hash = $1 WHERE name = $2";
    pub const SET_DISABLED: &str = "UPDATE users SET disabled = $1 WHERE name = $2";
    pub const END_USER_SESSIONS: &str = "DELETE FROM sessions WHERE user_id = $1";
    pub const TOKEN: &str = "SELECT t.id, t.name, u.name AS user_name, t.user_id, t.scopes, \
         t.expires_at, t.created_at, t.last_used_at \
         FROM api_tokens t LEFT JOIN users u ON u.id = t.user_id ";
    pub const INSERT_TOKEN: &str = "INSERT INTO api_tokens (name, user_id, secret_hash, scopes, \
         expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id";
    pub const TOUCH_TOKEN: &str = "UPDATE api_tokens SET last_used_at = $1 WHERE id = $2";
    pub const DELETE_TOKEN: &str = "DELETE FROM api_tokens WHERE id = $1";
    pub const INSERT_SESSION: &str = "INSERT INTO sessions (id_hash, user_id, created_at, \
         last_seen_at, expires_at) VALUES ($1, $2, $3, $3, $4)";
    pub const PRUNE_SESSIONS: &str =
        "DELETE FROM sessions WHERE expires_at <= $1 OR last_seen_at < $2";
    pub const SESSION: &str = "SELECT s.created_at AS s_created_at, s.last_seen_at, \
         s.expires_at, u.id, u.name, u.role, u.disabled, u.created_at \
         FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id_hash = $1";
    pub const TOUCH_SESSION: &str = "UPDATE sessions SET last_seen_at = $1 WHERE id_hash = $2";
    pub const DELETE_SESSION: &str = "DELETE FROM sessions WHERE id_hash = $1";
    pub const APPEND_AUDIT: &str =
        "INSERT INTO audit (actor, action, target, detail, at) VALUES ($1, $2, $3, $4, $5)";
    pub const AUDIT: &str = "SELECT id, actor, action, target, detail, at FROM audit \
         WHERE id < $1 ORDER BY id DESC LIMIT $2";
}

/// A failed user or token write mapped to what the caller can act on.
fn write_error(kind: &str, name: &str, e: sqlx::Error) -> Error {
    match violation(&e) {
        Some((ErrorKind::UniqueViolation, c)) if c.contains("secret_hash") => Error::Database {
            op: format!("adding {kind} {name}: the random secret collided"),
            source: e,
        },
        Some((ErrorKind::UniqueViolation, _)) if kind == "user" => Error::DuplicateUser {
            name: name.to_owned(),
        },
        Some((ErrorKind::UniqueViolation, _)) => Error::DuplicateToken {
            name: name.to_owned(),
        },
        Some((ErrorKind::CheckViolation, c)) => Error::invalid(
            kind,
            format!("{name}: refused by the database constraint {c}"),
        ),
        Some((ErrorKind::ForeignKeyViolation, c)) => {
            Error::invalid(kind, format!("{name}: its user is gone (refused by {c})"))
        }
        _ => db(format!("writing {kind} {name}"))(e),
    }
}

fn no_user(name: &str) -> Error {
    Error::NotFound {
        kind: "user",
        key: name.to_owned(),
    }
}

fn audit_detail(audit: &AuditNote) -> Result<String, Error> {
    serde_json::to_string(&audit.detail)
        .map_err(|e| Error::invalid("audit", format!("encoding the detail: {e}")))
}

macro_rules! users_impl {
    ($store:ty, $row:ty, $begin:literal) => {
        impl $store {
            fn user_row(r: &$row) -> Result<User, Error> {
                let cols = (|| -> Result<_, sqlx::Error> {
                    let role: String = r.try_get("role")?;
                    Ok((
                        r.try_get("id")?,
                        r.try_get("name")?,
                        role,
                        r.try_get("disabled")?,
                        r.try_get("created_at")?,
                    ))
                })()
                .map_err(db("reading a user row"))?;
                Ok(User {
                    id: cols.0,
                    name: cols.1,
                    role: cols.2.parse()?,
                    disabled: cols.3,
                    created_at: cols.4,
                })
            }

            fn token_row(r: &$row) -> Result<(ApiToken, Option<i64>), Error> {
                let cols = (|| -> Result<_, sqlx::Error> {
                    let scopes: String = r.try_get("scopes")?;
                    Ok((
                        ApiToken {
                            id: r.try_get("id")?,
                            name: r.try_get("name")?,
                            user: r.try_get("user_name")?,
                            scopes: Vec::new(),
                            expires_at: r.try_get("expires_at")?,
                            created_at: r.try_get("created_at")?,
                            last_used_at: r.try_get("last_used_at")?,
                        },
                        scopes,
                        r.try_get::<Option<i64>, _>("user_id")?,
                    ))
                })()
                .map_err(db("reading a token row"))?;
                let (mut token, scopes, user_id) = cols;
                token.scopes = parse_scopes(&scopes)?;
                Ok((token, user_id))
            }

            async fn audit_in(
                tx: &mut sqlx::Transaction<'_, <$row as sqlx::Row>::Database>,
                audit: &AuditNote,
                now: i64,
            ) -> Result<(), Error> {
                sqlx::query(sql::APPEND_AUDIT)
                    .bind(&audit.actor)
                    .bind(audit.action)
                    .bind(&audit.target)
                    .bind(audit_detail(audit)?)
                    .bind(now)
                    .execute(&mut **tx)
                    .await
                    .map_err(db(format!("auditing {} {}", audit.action, audit.target)))?;
                Ok(())
            }
        }

        impl UserStore for $store {
            async fn insert_user(&self, u: &NewUser, audit: &AuditNote) -> Result<User, Error> {
                let op = || format!("adding user {}", u.name);
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let id: i64 = sqlx::query_scalar(sql::INSERT_USER)
                    .bind(&u.name)
                    .bind(u.role.as_str())
                    .bind(u.password_hash.expose())
                    .bind(false)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| write_error("user", &u.name, e))?;
                Self::audit_in(&mut tx, audit, now).await?;
                tx.commit().await.map_err(db(op()))?;
                Ok(User {
                    id,
                    name: u.name.clone(),
                    role: u.role,
                    disabled: false,
                    created_at: now,
                })
            }

            async fn user(&self, name: &str) -> Result<Option<User>, Error> {
                sqlx::query(&format!("{}WHERE name = $1", sql::USER))
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db(format!("reading user {name}")))?
                    .as_ref()
                    .map(Self::user_row)
                    .transpose()
            }

            async fn user_by_id(&self, id: i64) -> Result<Option<User>, Error> {
                sqlx::query(&format!("{}WHERE id = $1", sql::USER))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db(format!("reading user #{id}")))?
                    .as_ref()
                    .map(Self::user_row)
                    .transpose()
            }

            async fn user_with_hash(
                &self,
                name: &str,
            ) -> Result<Option<(User, PasswordHash)>, Error> {
                let Some(r) = sqlx::query(sql::USER_HASH)
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db(format!("reading user {name}")))?
                else {
                    return Ok(None);
                };
                let hash: String = r
                    .try_get("password_hash")
                    .map_err(db("reading a user's password hash"))?;
                Ok(Some((Self::user_row(&r)?, PasswordHash::from_stored(hash))))
            }

            async fn users(&self) -> Result<Vec<User>, Error> {
                let rows = sqlx::query(&format!("{}ORDER BY name", sql::USER))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db("listing users"))?;
                rows.iter().map(Self::user_row).collect()
            }

            async fn set_user_password(
                &self,
                name: &str,
                hash: &PasswordHash,
                audit: &AuditNote,
            ) -> Result<User, Error> {
                let op = || format!("setting the password of user {name}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let done = sqlx::query(sql::SET_PASSWORD)
                    .bind(hash.expose())
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| write_error("user", name, e))?;
                if done.rows_affected() == 0 {
                    return Err(no_user(name));
                }
                let row = sqlx::query(&format!("{}WHERE name = $1", sql::USER))
                    .bind(name)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let user = Self::user_row(&row)?;
                sqlx::query(sql::END_USER_SESSIONS)
                    .bind(user.id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                Self::audit_in(&mut tx, audit, now_ms()).await?;
                tx.commit().await.map_err(db(op()))?;
                Ok(user)
            }

            async fn set_user_disabled(
                &self,
                name: &str,
                disabled: bool,
                audit: &AuditNote,
            ) -> Result<User, Error> {
                let op = || format!("disabling user {name}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let done = sqlx::query(sql::SET_DISABLED)
                    .bind(disabled)
                    .bind(name)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                if done.rows_affected() == 0 {
                    return Err(no_user(name));
                }
                let row = sqlx::query(&format!("{}WHERE name = $1", sql::USER))
                    .bind(name)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let user = Self::user_row(&row)?;
                if disabled {
                    sqlx::query(sql::END_USER_SESSIONS)
                        .bind(user.id)
                        .execute(&mut *tx)
                        .await
                        .map_err(db(op()))?;
                }
                Self::audit_in(&mut tx, audit, now_ms()).await?;
                tx.commit().await.map_err(db(op()))?;
                Ok(user)
            }

            async fn insert_token(
                &self,
                t: &NewToken,
                audit: &AuditNote,
            ) -> Result<ApiToken, Error> {
                let op = || format!("adding token {}", t.name);
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let now = now_ms();
                let id: i64 = sqlx::query_scalar(sql::INSERT_TOKEN)
                    .bind(&t.name)
                    .bind(t.user_id)
                    .bind(&t.secret_hash)
                    .bind(scopes_text(&t.scopes))
                    .bind(t.expires_at)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(|e| write_error("token", &t.name, e))?;
                let row = sqlx::query(&format!("{}WHERE t.id = $1", sql::TOKEN))
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                let (token, _) = Self::token_row(&row)?;
                Self::audit_in(&mut tx, audit, now).await?;
                tx.commit().await.map_err(db(op()))?;
                Ok(token)
            }

            async fn tokens(&self) -> Result<Vec<ApiToken>, Error> {
                let rows = sqlx::query(&format!("{}ORDER BY t.name", sql::TOKEN))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db("listing tokens"))?;
                rows.iter().map(|r| Ok(Self::token_row(r)?.0)).collect()
            }

            async fn token_by_hash(
                &self,
                hash: &str,
            ) -> Result<Option<(ApiToken, Option<i64>)>, Error> {
                sqlx::query(&format!("{}WHERE t.secret_hash = $1", sql::TOKEN))
                    .bind(hash)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db("reading a token"))?
                    .as_ref()
                    .map(Self::token_row)
                    .transpose()
            }

            async fn touch_token(&self, id: i64, now: i64) -> Result<(), Error> {
                sqlx::query(sql::TOUCH_TOKEN)
                    .bind(now)
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(db(format!("recording the use of token #{id}")))?;
                Ok(())
            }

            async fn delete_token(&self, name: &str, audit: &AuditNote) -> Result<ApiToken, Error> {
                let op = || format!("removing token {name}");
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                let row = sqlx::query(&format!("{}WHERE t.name = $1", sql::TOKEN))
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db(op()))?
                    .ok_or_else(|| Error::NotFound {
                        kind: "token",
                        key: name.to_owned(),
                    })?;
                let (gone, _) = Self::token_row(&row)?;
                sqlx::query(sql::DELETE_TOKEN)
                    .bind(gone.id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                Self::audit_in(&mut tx, audit, now_ms()).await?;
                tx.commit().await.map_err(db(op()))?;
                Ok(gone)
            }

            async fn insert_session(&self, s: &NewSession, idle_before: i64) -> Result<(), Error> {
                let op = || format!("starting a session of user #{}", s.user_id);
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                if let Some(old) = &s.replaces {
                    sqlx::query(sql::DELETE_SESSION)
                        .bind(old)
                        .execute(&mut *tx)
                        .await
                        .map_err(db(op()))?;
                }
                sqlx::query(sql::PRUNE_SESSIONS)
                    .bind(s.now)
                    .bind(idle_before)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                sqlx::query(sql::INSERT_SESSION)
                    .bind(&s.id_hash)
                    .bind(s.user_id)
                    .bind(s.now)
                    .bind(s.expires_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(db(op()))?;
                tx.commit().await.map_err(db(op()))?;
                Ok(())
            }

            async fn session(&self, hash: &str) -> Result<Option<Session>, Error> {
                let Some(r) = sqlx::query(sql::SESSION)
                    .bind(hash)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db("reading a session"))?
                else {
                    return Ok(None);
                };
                let times = (|| -> Result<(i64, i64, i64), sqlx::Error> {
                    Ok((
                        r.try_get("s_created_at")?,
                        r.try_get("last_seen_at")?,
                        r.try_get("expires_at")?,
                    ))
                })()
                .map_err(db("reading a session row"))?;
                Ok(Some(Session {
                    user: Self::user_row(&r)?,
                    created_at: times.0,
                    last_seen_at: times.1,
                    expires_at: times.2,
                }))
            }

            async fn touch_session(&self, hash: &str, now: i64) -> Result<(), Error> {
                sqlx::query(sql::TOUCH_SESSION)
                    .bind(now)
                    .bind(hash)
                    .execute(&self.pool)
                    .await
                    .map_err(db("recording a session's activity"))?;
                Ok(())
            }

            async fn delete_session(&self, hash: &str) -> Result<bool, Error> {
                let done = sqlx::query(sql::DELETE_SESSION)
                    .bind(hash)
                    .execute(&self.pool)
                    .await
                    .map_err(db("ending a session"))?;
                Ok(done.rows_affected() > 0)
            }

            async fn append_audit(&self, audit: &AuditNote) -> Result<(), Error> {
                let op = || format!("auditing {} {}", audit.action, audit.target);
                let mut tx = self.pool.begin_with($begin).await.map_err(db(op()))?;
                Self::audit_in(&mut tx, audit, now_ms()).await?;
                tx.commit().await.map_err(db(op()))?;
                Ok(())
            }

            async fn audit(
                &self,
                before: Option<i64>,
                limit: i64,
            ) -> Result<Vec<AuditEntry>, Error> {
                let rows = sqlx::query(sql::AUDIT)
                    .bind(before.unwrap_or(i64::MAX))
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db("reading the audit log"))?;
                rows.iter()
                    .map(|r| {
                        let detail: String = r.try_get("detail").map_err(db("reading audit"))?;
                        Ok(AuditEntry {
                            id: r.try_get("id").map_err(db("reading audit"))?,
                            actor: r.try_get("actor").map_err(db("reading audit"))?,
                            action: r.try_get("action").map_err(db("reading audit"))?,
                            target: r.try_get("target").map_err(db("reading audit"))?,
                            detail: serde_json::from_str(&detail)
                                .unwrap_or(serde_json::Value::Null),
                            at: r.try_get("at").map_err(db("reading audit"))?,
                        })
                    })
                    .collect()
            }
        }
    };
}

users_impl!(SqliteStore, sqlx::sqlite::SqliteRow, "BEGIN IMMEDIATE");
users_impl!(PgStore, sqlx::postgres::PgRow, "BEGIN");

impl UserStore for DbStore {
    async fn insert_user(&self, u: &NewUser, audit: &AuditNote) -> Result<User, Error> {
        dispatch!(self, st => st.insert_user(u, audit))
    }
    async fn user(&self, name: &str) -> Result<Option<User>, Error> {
        dispatch!(self, st => st.user(name))
    }
    async fn user_by_id(&self, id: i64) -> Result<Option<User>, Error> {
        dispatch!(self, st => st.user_by_id(id))
    }
    async fn user_with_hash(&self, name: &str) -> Result<Option<(User, PasswordHash)>, Error> {
        dispatch!(self, st => st.user_with_hash(name))
    }
    async fn users(&self) -> Result<Vec<User>, Error> {
        dispatch!(self, st => st.users())
    }
    async fn set_user_password(
        &self,
        name: &str,
        hash: &PasswordHash,
        audit: &AuditNote,
    ) -> Result<User, Error> {
        dispatch!(self, st => st.set_user_password(name, hash, audit))
    }
    async fn set_user_disabled(
        &self,
        name: &str,
        disabled: bool,
        audit: &AuditNote,
    ) -> Result<User, Error> {
        dispatch!(self, st => st.set_user_disabled(name, disabled, audit))
    }
    async fn insert_token(&self, t: &NewToken, audit: &AuditNote) -> Result<ApiToken, Error> {
        dispatch!(self, st => st.insert_token(t, audit))
    }
    async fn tokens(&self) -> Result<Vec<ApiToken>, Error> {
        dispatch!(self, st => st.tokens())
    }
    async fn token_by_hash(&self, hash: &str) -> Result<Option<(ApiToken, Option<i64>)>, Error> {
        dispatch!(self, st => st.token_by_hash(hash))
    }
    async fn touch_token(&self, id: i64, now: i64) -> Result<(), Error> {
        dispatch!(self, st => st.touch_token(id, now))
    }
    async fn delete_token(&self, name: &str, audit: &AuditNote) -> Result<ApiToken, Error> {
        dispatch!(self, st => st.delete_token(name, audit))
    }
    async fn insert_session(&self, s: &NewSession, idle_before: i64) -> Result<(), Error> {
        dispatch!(self, st => st.insert_session(s, idle_before))
    }
    async fn session(&self, hash: &str) -> Result<Option<Session>, Error> {
        dispatch!(self, st => st.session(hash))
    }
    async fn touch_session(&self, hash: &str, now: i64) -> Result<(), Error> {
        dispatch!(self, st => st.touch_session(hash, now))
    }
    async fn delete_session(&self, hash: &str) -> Result<bool, Error> {
        dispatch!(self, st => st.delete_session(hash))
    }
    async fn append_audit(&self, audit: &AuditNote) -> Result<(), Error> {
        dispatch!(self, st => st.append_audit(audit))
    }
    async fn audit(&self, before: Option<i64>, limit: i64) -> Result<Vec<AuditEntry>, Error> {
        dispatch!(self, st => st.audit(before, limit))
    }
}
