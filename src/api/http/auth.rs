//! Who is asking, and may they: sessions (cookie `steward_session`),
//! bearer tokens, roles and scopes, CSRF for cookie writes, and the login
//! rate limit.
//!
//! - A request with `Authorization: Bearer <token>` is that token's (a bad
//!   token is 401, never a fall-back to the cookie); else the session cookie.
//! - A token's scopes cover the roles at or below them (`read` ≈ viewer,
//!   `write` ≈ operator, `admin` ≈ admin), capped by its user's role.
//! - CSRF: a write authenticated by the cookie needs `X-Requested-With`, or
//!   `Sec-Fetch-Site: same-origin`, or an `Origin` equal to the request's
//!   host; a browser sends none of these cross-site without a CORS
//!   preflight, which this API never grants. Bearer writes need nothing:
//!   a browser never adds the header by itself.
//! - Login failures are counted per client address and per user name in a
//!   bounded map; over `login_failures_per_minute` → 429 with Retry-After.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, Method};

use super::error::ApiError;
use super::HttpState;
use crate::registry::users::{ApiToken, Role, Scope, User};

/// The session cookie's name.
pub const COOKIE: &str = "steward_session";

/// Most keys the login limiter remembers (addresses and names together);
/// beyond, the key whose last failure is oldest is forgotten first.
pub const LIMITER_KEYS: usize = 10_000;

/// The limiter's window.
const WINDOW_MS: i64 = 60_000;

/// Who a request is from.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A browser session of a user.
    Session(User),
    /// An API token, with its user if it has one.
    Token {
        /// The token.
        token: ApiToken,
        /// Its user (enabled).
        user: Option<User>,
    },
}

impl Principal {
    /// The actor written in the audit log: `user:<name>` or `token:<name>`.
    pub fn actor(&self) -> String {
        match self {
            Principal::Session(u) => format!("user:{}", u.name),
            Principal::Token { token, .. } => format!("token:{}", token.name),
        }
    }

    /// Whether this principal may do what `need` may.
    pub fn allows(&self, need: Role) -> bool {
        match self {
            Principal::Session(u) => u.role >= need,
            Principal::Token { token, user } => {
                let scoped = token.scopes.iter().any(|s| *s >= Scope::for_role(need));
                scoped && user.as_ref().is_none_or(|u| u.role >= need)
            }
        }
    }

    fn via_cookie(&self) -> bool {
        matches!(self, Principal::Session(_))
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The request's principal, if it has (working) credentials.
pub async fn authenticate(
    state: &HttpState,
    headers: &HeaderMap,
) -> Result<Option<Principal>, ApiError> {
    let now = state.now();
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let text = auth.to_str().map_err(|_| ApiError::unauthenticated())?;
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let secret = text
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .ok_or_else(ApiError::unauthenticated)?;
        return match state.service.token_principal(secret, now).await? {
            Some(p) => Ok(Some(Principal::Token {
                token: p.token,
                user: p.user,
            })),
            None => Err(ApiError::unauthenticated()),
        };
    }
    let Some(value) = cookie(headers, COOKIE) else {
        return Ok(None);
    };
    Ok(state
        .service
        .session(value, now, state.limits)
        .await?
        .map(|s| Principal::Session(s.user)))
}

/// The principal of a request that needs `need`: 401 without credentials,
/// 403 (`csrf`) for a cookie write without proof of a same-origin page, 403
/// (`forbidden`) when the role or scope is not enough.
pub async fn require(
    state: &HttpState,
    method: &Method,
    headers: &HeaderMap,
    need: Role,
) -> Result<Principal, ApiError> {
    let p = authenticate(state, headers)
        .await?
        .ok_or_else(ApiError::unauthenticated)?;
    if p.via_cookie() && is_write(method) && !same_origin_proof(headers) {
        return Err(ApiError::new(
            "csrf",
            "a write with the session cookie needs the X-Requested-With header \
             (or a same-origin browser request)",
        ));
    }
    if !p.allows(need) {
        return Err(ApiError::forbidden(format!(
            "this needs the {need} role (or a token scope covering it)"
        )));
    }
    Ok(p)
}

fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Proof that a cookie-carrying write comes from our own pages.
pub fn same_origin_proof(headers: &HeaderMap) -> bool {
    if headers.contains_key("x-requested-with") {
        return true;
    }
    let text = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    if text("sec-fetch-site") == Some("same-origin") {
        return true;
    }
    match (text("origin"), text("host")) {
        (Some(origin), Some(host)) => origin_host(origin) == Some(host),
        _ => false,
    }
}

/// A login (no session yet) is refused only when the browser says it comes
/// from another site: a plain client (curl) sends neither header.
/// `Sec-Fetch-Site` decides when present.
pub fn cross_site(headers: &HeaderMap) -> bool {
    let text = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    match text("sec-fetch-site") {
        Some("cross-site" | "same-site") => return true,
        // The browser's own word (a page cannot set it). Its `Origin` may
        // then be `null`: Chromium sends that for a form posted from a page
        // under `Referrer-Policy: no-referrer`, which every page here has.
        Some("same-origin") => return false,
        _ => {}
    }
    match (text("origin"), text("host")) {
        (Some(origin), Some(host)) => origin_host(origin) != Some(host),
        (Some(_), None) => true,
        _ => false,
    }
}

fn origin_host(origin: &str) -> Option<&str> {
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
}

/// The client's address (the connection's peer), as a limiter key.
pub fn client_key(conn: Option<&ConnectInfo<SocketAddr>>) -> String {
    conn.map_or_else(|| "ip:unknown".to_owned(), |c| format!("ip:{}", c.0.ip()))
}

/// Failed logins per key in the last minute, bounded to [`LIMITER_KEYS`].
#[derive(Debug, Default)]
pub struct LoginLimiter {
    failures: HashMap<String, VecDeque<i64>>,
}

impl LoginLimiter {
    /// Seconds to wait if any of `keys` had `max` failures in the last
    /// minute before `now` (ms); `None`: go ahead.
    pub fn check(&mut self, keys: &[&str], max: u64, now: i64) -> Option<u64> {
        let mut wait = None;
        for k in keys {
            let Some(q) = self.failures.get_mut(*k) else {
                continue;
            };
            while q.front().is_some_and(|t| *t <= now - WINDOW_MS) {
                q.pop_front();
            }
            if u64::try_from(q.len()).unwrap_or(u64::MAX) >= max {
                let oldest = q.front().copied().unwrap_or(now);
                let ms = (oldest + WINDOW_MS - now).max(1);
                let secs = u64::try_from((ms + 999) / 1000).unwrap_or(60);
                wait = Some(wait.map_or(secs, |w: u64| w.max(secs)));
            }
        }
        wait
    }

    /// Counts a failure for each of `keys` at `now`.
    pub fn fail(&mut self, keys: &[&str], max: u64, now: i64) {
        for k in keys {
            if !self.failures.contains_key(*k) && self.failures.len() >= LIMITER_KEYS {
                self.evict(now);
            }
            let q = self.failures.entry((*k).to_owned()).or_default();
            q.push_back(now);
            // Only the last `max` failures matter.
            while u64::try_from(q.len()).unwrap_or(u64::MAX) > max {
                q.pop_front();
            }
        }
    }

    /// Takes back the failure counted for `key` at `now` (the attempt
    /// succeeded).
    pub fn undo(&mut self, key: &str, now: i64) {
        if let Some(q) = self.failures.get_mut(key) {
            if let Some(at) = q.iter().rposition(|t| *t == now) {
                q.remove(at);
            }
            if q.is_empty() {
                self.failures.remove(key);
            }
        }
    }

    /// Forgets `key`'s failures (a successful login of that name).
    pub fn forget(&mut self, key: &str) {
        self.failures.remove(key);
    }

    /// Keys remembered (tests).
    pub fn len(&self) -> usize {
        self.failures.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }

    fn evict(&mut self, now: i64) {
        self.failures
            .retain(|_, q| q.back().is_some_and(|t| *t > now - WINDOW_MS));
        if self.failures.len() >= LIMITER_KEYS {
            let oldest = self
                .failures
                .iter()
                .min_by_key(|(_, q)| q.back().copied().unwrap_or(i64::MIN))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.failures.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_counts_per_key_in_a_sliding_minute_and_stays_bounded() {
        let mut l = LoginLimiter::default();
        for i in 0..5 {
            assert_eq!(l.check(&["ip:a", "user:x"], 5, 1_000 + i), None);
            l.fail(&["ip:a", "user:x"], 5, 1_000 + i);
        }
        assert_eq!(l.check(&["ip:a"], 5, 2_000), Some(59));
        assert_eq!(l.check(&["user:x", "ip:b"], 5, 2_000), Some(59));
        assert_eq!(l.check(&["ip:b"], 5, 2_000), None);
        assert_eq!(l.check(&["ip:a"], 5, 61_000), None);
        for i in 0..(LIMITER_KEYS as i64 + 10) {
            l.fail(&[&format!("ip:{i}")], 5, 100_000 + i);
        }
        assert!(l.len() <= LIMITER_KEYS);
    }

    #[test]
    fn csrf_proof_and_cross_site_logins() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().unwrap());
            }
            m
        };
        assert!(same_origin_proof(&h(&[("x-requested-with", "x")])));
        assert!(same_origin_proof(&h(&[("sec-fetch-site", "same-origin")])));
        assert!(same_origin_proof(&h(&[
            ("origin", "http://127.0.0.1:8467"),
            ("host", "127.0.0.1:8467")
        ])));
        assert!(!same_origin_proof(&h(&[
            ("origin", "https://evil.example"),
            ("host", "127.0.0.1:8467")
        ])));
        assert!(!same_origin_proof(&h(&[])));
        assert!(!cross_site(&h(&[])));
        assert!(cross_site(&h(&[("sec-fetch-site", "cross-site")])));
        // The dashboard's login form as Chromium posts it (no-referrer page).
        assert!(!cross_site(&h(&[
            ("sec-fetch-site", "same-origin"),
            ("origin", "null"),
            ("host", "127.0.0.1:8467")
        ])));
        assert!(cross_site(&h(&[
            ("origin", "null"),
            ("host", "127.0.0.1:8467")
        ])));
        assert!(cross_site(&h(&[
            ("origin", "https://evil.example"),
            ("host", "127.0.0.1:8467")
        ])));
    }
}
