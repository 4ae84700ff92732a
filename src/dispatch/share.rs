//! The `share` target of the inventory dispatcher: a samba-managed server's
//! whole set of shares rendered as `steward.share`'s pillar
//! (`salt-states/README.md`): `{revision, target: <minion id>, base,
//! shares: [{id, name, folder, user, nt_hash_enc}]}`.
//!
//! `nt_hash_enc` is the share's NT hash (32 lower-case hex digits) encrypted
//! with RSA-OAEP-SHA256 for the minion's public key as the master accepted it
//! (`<pki_dir>/minions/<minion id>`, read at each rendering), base64: the
//! pillar travels on the bus and lands in the job cache, the hash never does
//! in clear. OAEP is randomised, so the hash that decides whether anything
//! changed (`applied_hash`) is taken over the clear rendering, not the
//! encrypted pillar. Without the accepted key the target waits, with why.

use std::path::Path;

use base64::Engine as _;
use serde_json::{json, Value as Json};
use sha2::{Digest as _, Sha256};

use super::inventory::{Prepared, Rendered};
use crate::pki::encrypt_oaep_sha256;
use crate::registry::service::samba_base;
use crate::registry::store::ShareStore as _;
use crate::registry::{DbStore, DispatchTarget, Error, ServerRef, Service};

/// Renders target `t` (a `share` target) at `revision`; `pki_dir` is the
/// master's.
pub(super) async fn prepare(
    service: &Service<DbStore>,
    t: &DispatchTarget,
    revision: i64,
    pki_dir: &Path,
) -> Result<Prepared, Error> {
    let server = service.get_server(&ServerRef::Id(t.server_id)).await?;
    let shares = service.store().shares_with_hashes(t.server_id).await?;
    let Some(base) = samba_base(&server).map(str::to_owned) else {
        return Ok(if shares.is_empty() {
            Prepared::Wait(format!(
                "{} is not samba-managed (no samba_base) and has no shares: nothing to apply",
                server.name
            ))
        } else {
            Prepared::Render(Err(format!(
                "{} has {} share(s) but no samba base (server set {} samba_base=PATH)",
                server.name,
                shares.len(),
                server.name
            )))
        });
    };
    let minion = &t.minion_id;
    if !crate::salt::is_key_file_name(minion) {
        return Ok(Prepared::Render(Err(format!(
            "minion id {minion:?} is not a key file name"
        ))));
    }
    let key_path = pki_dir.join("minions").join(minion);
    let public_pem = match tokio::fs::read_to_string(&key_path).await {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Prepared::Wait(format!(
                "the master has no accepted key for {minion} ({}): the share passwords are \
                 encrypted for it",
                key_path.display()
            )))
        }
        Err(e) => {
            return Ok(Prepared::Render(Err(format!(
                "reading the accepted key {}: {e}",
                key_path.display()
            ))))
        }
    };
    let mut clear = Vec::with_capacity(shares.len());
    let mut sent = Vec::with_capacity(shares.len());
    for (s, hash) in &shares {
        let encrypted = match encrypt_oaep_sha256(&public_pem, hash.expose().as_bytes()) {
            Ok(c) => base64::engine::general_purpose::STANDARD.encode(c),
            Err(e) => {
                return Ok(Prepared::Render(Err(format!(
                    "encrypting the hash of {s} for {minion} with {}: {e}",
                    key_path.display()
                ))))
            }
        };
        clear.push(json!({
            "id": s.id, "name": s.name, "folder": s.folder, "user": s.user,
            "nt_hash": hash.expose(),
        }));
        sent.push(json!({
            "id": s.id, "name": s.name, "folder": s.folder, "user": s.user,
            "nt_hash_enc": encrypted,
        }));
    }
    // What the state makes of it: equal for equal clear contents, whatever
    // the encryption drew.
    let hash = crate::hex::encode(&Sha256::digest(
        json!({"target": minion, "base": base, "shares": clear})
            .to_string()
            .as_bytes(),
    ));
    let pillar = json!({
        "revision": revision,
        "target": minion,
        "base": base,
        "shares": Json::Array(sent),
    });
    Ok(Prepared::Render(Ok(Rendered { pillar, hash })))
}

#[cfg(test)]
mod tests {
    use rsa::pkcs1::DecodeRsaPrivateKey as _;

    use super::*;
    use crate::pki::KeyPair;
    use crate::registry::{DispatchStatus, ServerPatch, StateKind};

    fn target(server_id: i64, minion_id: &str) -> DispatchTarget {
        DispatchTarget {
            server_id,
            server: "files1".into(),
            minion_id: minion_id.into(),
            server_status: "online".into(),
            state: StateKind::Share,
            desired: 7,
            applied: 0,
            applied_hash: None,
            status: DispatchStatus::Pending,
            forced: false,
            attempts: 0,
            next_attempt_at: 0,
            pending_since: None,
            running_revision: None,
            started_at: None,
            last_jid: None,
            last_summary: None,
            last_error: None,
            last_applied_at: None,
            updated_at: 0,
            lease_holder: None,
            lease_epoch: 0,
            orphan_jid: None,
            location: None,
        }
    }

    fn ready(p: Prepared) -> Rendered {
        match p {
            Prepared::Render(Ok(r)) => r,
            Prepared::Render(Err(why)) | Prepared::Wait(why) => panic!("{why}"),
        }
    }

    #[tokio::test]
    async fn hashes_are_encrypted_for_the_accepted_key_and_the_skip_hash_is_stable() {
        let svc = crate::registry::open("sqlite::memory:").await.unwrap();
        svc.create_model("files", "", &[]).await.unwrap();
        let mut p = ServerPatch::default();
        for kv in ["name=files1", "model=files", "samba_base=/srv/samba"] {
            p.set_assignment(kv).unwrap();
        }
        let server = svc.create_server(p).await.unwrap();
        svc.create_share(&ServerRef::Id(server.id), "docs", "docs")
            .await
            .unwrap();
        let pki = tempfile::tempdir().unwrap();
        let t = target(server.id, &server.minion_id);

        // No accepted key on the master: the target waits, saying why.
        match prepare(&svc, &t, 7, pki.path()).await.unwrap() {
            Prepared::Wait(why) => assert!(why.contains("no accepted key"), "{why}"),
            Prepared::Render(r) => panic!("rendered without a key: {:?}", r.err()),
        }

        let pair = KeyPair::generate(2048).unwrap();
        std::fs::create_dir_all(pki.path().join("minions")).unwrap();
        std::fs::write(
            pki.path().join("minions").join(&server.minion_id),
            pair.public_pem(),
        )
        .unwrap();
        let a = ready(prepare(&svc, &t, 7, pki.path()).await.unwrap());
        let b = ready(prepare(&svc, &t, 8, pki.path()).await.unwrap());
        // OAEP draws anew each time; the hash of what is configured does not.
        assert_eq!(a.hash, b.hash);
        let enc = |r: &Rendered| {
            r.pillar["shares"][0]["nt_hash_enc"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_ne!(enc(&a), enc(&b));
        assert_eq!(a.pillar["target"], server.minion_id.as_str());
        assert_eq!(a.pillar["base"], "/srv/samba");
        assert_eq!(a.pillar["revision"], 7);
        assert_eq!(a.pillar["shares"][0]["user"], "smb-docs");
        assert!(a.pillar["shares"][0].get("nt_hash").is_none());
        // The minion's private key opens it: the stored hash, in hex.
        let stored = svc.store().shares_with_hashes(server.id).await.unwrap();
        let private = rsa::RsaPrivateKey::from_pkcs1_pem(pair.private_pem()).unwrap();
        let cipher = base64::engine::general_purpose::STANDARD
            .decode(enc(&a))
            .unwrap();
        let clear = private
            .decrypt(rsa::Oaep::new::<sha2::Sha256>(), &cipher)
            .unwrap();
        assert_eq!(clear, stored[0].1.expose().as_bytes());
        assert!(!a.pillar.to_string().contains(stored[0].1.expose()));

        // A new password changes the hash.
        let (share, _) = svc
            .list_shares(None)
            .await
            .unwrap()
            .pop()
            .map(|s| (s, ()))
            .unwrap();
        svc.share_passwd(share.id).await.unwrap();
        let c = ready(prepare(&svc, &t, 9, pki.path()).await.unwrap());
        assert_ne!(c.hash, a.hash);

        // No shares and no samba base: nothing to apply, the target waits.
        svc.delete_share(share.id).await.unwrap();
        let mut p = ServerPatch::default();
        p.set("samba_base", "").unwrap();
        svc.update_server(&ServerRef::Id(server.id), p)
            .await
            .unwrap();
        assert!(matches!(
            prepare(&svc, &t, 10, pki.path()).await.unwrap(),
            Prepared::Wait(_)
        ));
    }
}
