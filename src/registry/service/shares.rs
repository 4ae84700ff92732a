//! Samba shares: the service's operations (CLI and bus alike) and the check
//! that a server change keeps its shares possible. Each operation validates
//! and names the problem first (the rules of `steward.share`); the database's
//! constraints (migration 0008) still hold when writers race. A new password
//! is generated here and returned once; only its NT hash is written.

use super::Service;
use crate::registry::shares::{user_for, validate_folder, validate_name, NtHash, Password, Share};
use crate::registry::store::NewShare;
use crate::registry::{Error, Server, ServerRef, Store};

/// A server's samba base folder, when it is samba-managed.
pub fn samba_base(server: &Server) -> Option<&str> {
    server
        .samba_base_folder
        .as_deref()
        .filter(|_| server.samba_managed)
}

impl<S: Store> Service<S> {
    /// Adds share `name` of `folder` (relative to the server's samba base) on
    /// a samba-managed `server`, with its user (`shares.user_prefix` + the
    /// lower-cased name) and a new password: returned here, and only here.
    pub async fn create_share(
        &self,
        server: &ServerRef,
        name: &str,
        folder: &str,
    ) -> Result<(Share, Password), Error> {
        let name = validate_name(name)?;
        let folder = validate_folder(folder)?;
        let user = user_for(&self.share_user_prefix, &name)?;
        let server = self.get_server(server).await?;
        if samba_base(&server).is_none() {
            return Err(Error::NotSambaManaged { name: server.name });
        }
        for other in self.store.shares(Some(server.id)).await? {
            let taken = if other.name.eq_ignore_ascii_case(&name) {
                Some(format!("share name {name:?} on {}", server.name))
            } else if other.folder == folder {
                Some(format!("folder {folder:?} on {}", server.name))
            } else if other.user == user {
                Some(format!("user {user:?} on {}", server.name))
            } else {
                None
            };
            if let Some(what) = taken {
                return Err(Error::DuplicateShare {
                    what,
                    by: other.to_string(),
                });
            }
        }
        let password = Password::generate()?;
        let share = self
            .store
            .insert_share(&NewShare {
                server_id: server.id,
                name,
                folder,
                user,
                nt_hash: NtHash::of(&password),
            })
            .await?;
        Ok((share, password))
    }

    /// Shares, of one server or all.
    pub async fn list_shares(&self, server: Option<&ServerRef>) -> Result<Vec<Share>, Error> {
        let server_id = match server {
            Some(s) => Some(self.get_server(s).await?.id),
            None => None,
        };
        self.store.shares(server_id).await
    }

    /// One share.
    pub async fn get_share(&self, id: i64) -> Result<Share, Error> {
        self.store.share(id).await?.ok_or_else(|| Error::NotFound {
            kind: "share",
            key: format!("#{id}"),
        })
    }

    /// Issues a new password for share `id` (the old one stops working once
    /// the dispatcher applied it); returned here, and only here.
    pub async fn share_passwd(&self, id: i64) -> Result<(Share, Password), Error> {
        let password = Password::generate()?;
        let share = self
            .store
            .set_share_hash(id, &NtHash::of(&password))
            .await?;
        Ok((share, password))
    }

    /// Removes a share (its user and passdb entry go on the next apply; its
    /// data stays on the server).
    pub async fn delete_share(&self, id: i64) -> Result<Share, Error> {
        self.store.delete_share(id).await
    }

    /// A server change that would leave its shares without a samba base
    /// (no longer samba-managed) is refused while it has shares, naming them.
    pub(super) async fn check_shares_kept(
        &self,
        before: &Server,
        after: &Server,
    ) -> Result<(), Error> {
        if samba_base(before).is_none() || samba_base(after).is_some() {
            return Ok(());
        }
        let by = self.store.share_references(before.id).await?;
        if by.is_empty() {
            Ok(())
        } else {
            Err(Error::ServerReferenced {
                name: before.name.clone(),
                by,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::registry::store::{ShareStore as _, Store as _};
    use crate::registry::{DbStore, ServerPatch, ServerRef, Service};

    async fn registry() -> Service<DbStore> {
        let svc = crate::registry::open("sqlite::memory:").await.unwrap();
        svc.create_model("files", "", &[]).await.unwrap();
        for s in [
            json!({"name": "files1", "samba_base": "/srv/samba"}),
            json!({"name": "plain1"}),
        ] {
            let mut m = s.as_object().unwrap().clone();
            m.insert("model".into(), json!("files"));
            svc.create_server(ServerPatch::from_json(&m, &[]).unwrap())
                .await
                .unwrap();
        }
        svc.store().outbox_subscribe("t").await.unwrap();
        svc
    }

    fn files1() -> ServerRef {
        ServerRef::Name("files1".into())
    }

    #[tokio::test]
    async fn shares_are_validated_and_unique_and_the_hash_stays_inside() {
        let svc = registry().await;
        let (share, password) = svc
            .create_share(&files1(), "Projects", "data/projects/")
            .await
            .unwrap();
        assert_eq!(
            (share.folder.as_str(), share.user.as_str()),
            ("data/projects", "smb-projects")
        );
        let stored = svc
            .store()
            .shares_with_hashes(share.server_id)
            .await
            .unwrap();
        assert_eq!(
            stored[0].1.expose(),
            crate::registry::shares::NtHash::of(&password).expose()
        );
        // The outbox payload names the target and carries no hash.
        let rows = svc.store().outbox_pending("t", 100).await.unwrap();
        let text = format!("{rows:?}");
        assert!(!text.contains(stored[0].1.expose()), "{text}");
        assert!(text.contains("\"targets\""), "{text}");

        let code = |r: Result<_, crate::registry::Error>| r.map(|_| ()).unwrap_err().code();
        assert_eq!(
            code(svc.create_share(&files1(), "projects", "other").await),
            "duplicate_share"
        );
        assert_eq!(
            code(svc.create_share(&files1(), "other", "data/projects").await),
            "duplicate_share"
        );
        assert_eq!(
            code(svc.create_share(&files1(), "x", "../etc").await),
            "invalid_value"
        );
        assert_eq!(
            code(svc.create_share(&files1(), "x", "/etc").await),
            "invalid_value"
        );
        assert_eq!(
            code(
                svc.create_share(&ServerRef::Name("plain1".into()), "x", "x")
                    .await
            ),
            "not_samba_managed"
        );
        assert_eq!(
            code(svc.create_share(&files1(), &"a".repeat(29), "y").await),
            "user_name_too_long"
        );
        // Nothing else was written.
        assert_eq!(svc.list_shares(None).await.unwrap().len(), 1);

        let (after, new_password) = svc.share_passwd(share.id).await.unwrap();
        assert_eq!(after.revision, share.revision + 1);
        assert_ne!(new_password, password);

        // The server keeps its samba base while it has shares; it cannot go.
        let mut p = ServerPatch::default();
        p.set("samba_base", "").unwrap();
        assert_eq!(
            svc.update_server(&files1(), p.clone())
                .await
                .unwrap_err()
                .code(),
            "server_in_use"
        );
        let e = svc.delete_server(&files1()).await.unwrap_err();
        assert_eq!(e.code(), "server_in_use");
        assert!(e.to_string().contains("Projects"), "{e}");
        svc.delete_share(share.id).await.unwrap();
        svc.update_server(&files1(), p).await.unwrap();
        svc.delete_server(&files1()).await.unwrap();
    }
}
