//! A server's key over HTTP: `POST /api/v1/servers/{server}/rekey` and
//! `GET /api/v1/servers/{server}/bundle`, the paths of the CLI's
//! `server rekey` and `server bundle` ([`crate::lifecycle`]), so the
//! dashboard's server page can offer them.
//!
//! - rekey (operator, token scope `write`): [`crate::lifecycle::rekey`] — a
//!   new pair in the registry and the key directory (status
//!   `keys-issued`), then the old key retired on the master with exact-id
//!   wheel calls. 409 when the server changed meanwhile. The registry
//!   change stands even when retiring failed: the answer says so
//!   (`retire_error`), as the CLI does.
//! - bundle (admin only): the tar.gz a fresh machine installs — the one
//!   response that carries a private key — audited with who and when,
//!   `Content-Disposition: attachment`, `Cache-Control: no-store`.
//!
//! Both need what the daemon hands over (the key issuer, the master's pki
//! directory and request client, its config for the bundle); without, 503.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use serde_json::json;

use super::auth;
use super::error::ApiError;
use super::inventory::{audit, object};
use super::openapi::ErrorBody;
use super::ops::{is_form, read_form};
use super::HttpState;
use crate::lifecycle::LifecycleError;
use crate::registry::users::Role;
use crate::registry::ServerRef;

/// What the bundle needs from the daemon: the master's config (its pki
/// directory, signing key, transport) and `masters` (the minion's list).
#[derive(Debug, Clone)]
pub struct BundleContext {
    /// The master's config.
    pub master: crate::master_config::MasterConfig,
    /// `masters` from the settings (this master when empty).
    pub masters: Vec<String>,
}

fn server_ref(text: &str) -> ServerRef {
    text.parse()
        .unwrap_or_else(|_| ServerRef::Name(text.to_owned()))
}

/// A lifecycle error as the API's error shape (the registry's codes kept).
fn api_error(e: LifecycleError) -> ApiError {
    match e {
        LifecycleError::Registry(e) => e.into(),
        LifecycleError::NoIssuer => ApiError::new(
            "unavailable",
            "no key issuer configured (keys.dir in the config)",
        ),
        LifecycleError::Wheel { .. } => ApiError::new("publish_failed", e.to_string()),
        // A set-up to finish (no signing key yet, a key issued elsewhere):
        // the text says which file and what to do; no secret is in it.
        LifecycleError::MasterFile { .. } | LifecycleError::PrivateKey { .. } => {
            ApiError::new("unavailable", e.to_string())
        }
        other => {
            tracing::error!(message = "Key lifecycle over HTTP failed.", error = %other);
            ApiError::new(
                "internal",
                "the key files could not be read (see the daemon's log)",
            )
        }
    }
}

/// `POST /servers/{server}/rekey`: a new key pair, the old key retired on
/// the master. A form (`next`) is answered with a 303 there.
#[utoipa::path(post, path = "/api/v1/servers/{server}/rekey", tag = "servers",
    params(("server" = String, Path, description = "Id or name")),
    request_body(content = Object, description = "Empty (or `{}`); as a form, `next`: a path of this site (303)"),
    responses((status = 200, description = "`{server, old_fingerprint, retired, retire_error}`: the server with its new public key (never a private key); `retire_error` when the old key could not be removed from the master (run it again)", body = Object),
        (status = 303, description = "A form's `next`"),
        (status = "4XX", description = "The error shape (409 when the server changed meanwhile)", body = ErrorBody)))]
pub(super) async fn rekey(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(server): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Operator).await?;
    let next = if is_form(&headers) {
        let (args, next) = read_form(&body)?;
        if let Some(k) = args.keys().next() {
            return Err(ApiError::bad_request(format!(
                "{k:?} is not a field of the rekey form (next)"
            )));
        }
        next
    } else {
        if let Some(k) = object(&body)?.keys().next() {
            return Err(ApiError::bad_request(format!(
                "{k:?}: rekey takes no arguments"
            )));
        }
        None
    };
    let (Some(pki_dir), Some(req)) = (&state.pki_dir, &state.wheel) else {
        return Err(ApiError::new(
            "unavailable",
            "rekey needs the daemon's master (pki directory and request client)",
        ));
    };
    if state.service.keys().is_none() {
        return Err(api_error(LifecycleError::NoIssuer));
    }
    let done = crate::lifecycle::rekey(&state.service, req, pki_dir, &server_ref(&server))
        .await
        .map_err(api_error)?;
    let (old, new) = (&done.old, &done.new);
    let (retired, retire_error) = match &done.retired {
        Ok(dirs) => (Some(dirs.clone()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    audit(
        &state,
        &p,
        "server.rekey",
        format!("#{} {}", new.id, new.name),
        json!({
            "old_fingerprint": old.key_fingerprint,
            "new_fingerprint": new.key_fingerprint,
            "retired": retired,
            "retire_error": retire_error,
        }),
    )
    .await;
    match next {
        Some(to) => Ok(Redirect::to(&to).into_response()),
        None => Ok(Json(json!({
            "server": new,
            "old_fingerprint": old.key_fingerprint,
            "retired": retired,
            "retire_error": retire_error,
        }))
        .into_response()),
    }
}

/// A file name for the minion's bundle: its id with anything but
/// `[A-Za-z0-9._-]` replaced.
fn bundle_name(minion_id: &str) -> String {
    let safe: String = minion_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}-bundle.tar.gz")
}

/// `GET /servers/{server}/bundle` (admin): the server's bundle, as
/// `server bundle` writes it, as a download; audited.
#[utoipa::path(get, path = "/api/v1/servers/{server}/bundle", tag = "servers",
    params(("server" = String, Path, description = "Id or name")),
    responses((status = 200, description = "The tar.gz (minion.pem, minion.pub, master_sign.pub, minion.d/steward.conf, install.sh): the server's private key, admin only, audited; attachment, no-store", content_type = "application/gzip"),
        (status = "4XX", description = "The error shape", body = ErrorBody)))]
pub(super) async fn bundle(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(server): Path<String>,
) -> Result<Response, ApiError> {
    let p = auth::require(&state, &method, &headers, Role::Admin).await?;
    let Some(ctx) = &state.bundle else {
        return Err(ApiError::new(
            "unavailable",
            "the bundle needs the daemon's master config",
        ));
    };
    let keys = state
        .service
        .keys()
        .ok_or_else(|| api_error(LifecycleError::NoIssuer))?;
    let s = state.service.get_server(&server_ref(&server)).await?;
    let bytes = crate::lifecycle::bundle(keys, &ctx.master, &ctx.masters, &s).map_err(api_error)?;
    audit(
        &state,
        &p,
        "server.bundle",
        format!("#{} {}", s.id, s.name),
        json!({"minion_id": s.minion_id, "key_fingerprint": s.key_fingerprint}),
    )
    .await;
    let disposition = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}\"",
        bundle_name(&s.minion_id)
    ))
    .map_err(|_| ApiError::new("internal", "building the file name"))?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/gzip"),
            ),
            (header::CONTENT_DISPOSITION, disposition),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        bytes,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_file_name_is_safe() {
        assert_eq!(bundle_name("web1.example"), "web1.example-bundle.tar.gz");
        assert_eq!(bundle_name("a\"b/c d"), "a_b_c_d-bundle.tar.gz");
    }
}
