//! Samba shares on the bus (`steward/v1/share/<op>`): a request's arguments
//! read into the registry's share operations (`registry::Service::create_share`
//! …); parsing, trust and replies are [`super::bus`]'s, as for forwards
//! (`find` is answered for anyone, every other op needs its confirmed receipt).
//!
//! | op | arguments | result |
//! | --- | --- | --- |
//! | create | `server`\|`server_id` (id or name), `name`, `folder` | the share and `password` (shown once) |
//! | find | `id` (→ a list of that one), or optional `server`\|`server_id` | a list of shares |
//! | passwd | `id` | the share and its new `password` |
//! | delete | `id` | the share as it was |
//!
//! The password is in the reply to the requester only; the outbox row and
//! the `steward/v1/share/created|updated|deleted` notifications never carry
//! it, nor the NT hash. Any other key is `invalid_value`.

use serde_json::{json, Value as Json};

use super::args::{encode, Args};
use super::bus::Op;
use crate::registry::shares::{Password, Share};
use crate::registry::{Error, Service, Store};

const ID: &[&str] = &["id"];
const SERVER: &[&str] = &["server", "server_id"];

/// Serves a share request.
pub async fn serve<S: Store>(service: &Service<S>, op: Op, args: Args<'_>) -> Result<Json, Error> {
    match op {
        Op::Create => {
            args.only(&[SERVER, &["name", "folder"]].concat())?;
            let (share, password) = service
                .create_share(
                    &args.server(SERVER)?,
                    &args.text("name")?,
                    &args.text("folder")?,
                )
                .await?;
            with_password(&share, &password)
        }
        Op::Find => {
            args.only(&[ID, SERVER].concat())?;
            match args.opt_int(ID)? {
                Some(_) if args.has_any(SERVER) => {
                    Err(Error::invalid("id", "find by id or by server, not both"))
                }
                Some(id) => encode(&vec![service.get_share(id).await?]),
                None => encode(
                    &service
                        .list_shares(args.opt_server(SERVER)?.as_ref())
                        .await?,
                ),
            }
        }
        Op::Passwd => {
            args.only(ID)?;
            let (share, password) = service.share_passwd(args.int(ID)?).await?;
            with_password(&share, &password)
        }
        Op::Delete => {
            args.only(ID)?;
            encode(&service.delete_share(args.int(ID)?).await?)
        }
        Op::Update | Op::Exec | Op::Result => Err(Error::invalid(
            "op",
            format!(
                "{} is not a share operation (create, find, passwd, delete)",
                op.as_str()
            ),
        )),
    }
}

/// The share's record with `password` beside its fields.
fn with_password(share: &Share, password: &Password) -> Result<Json, Error> {
    let mut v = encode(share)?;
    v["password"] = json!(password.expose());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::bus::{parse, serve};
    use crate::bus::event::from_json;
    use crate::bus::Event;
    use crate::registry::store::ShareStore as _;
    use crate::registry::{DbStore, ServerPatch, Service, Store as _};

    async fn ask(svc: &Service<DbStore>, tag: &str, data: serde_json::Value) -> serde_json::Value {
        let mut data = data;
        data["request_id"] = json!("r");
        let req = parse(&Event::new(tag.into(), from_json(&data)))
            .unwrap()
            .unwrap();
        serve(svc, &req).await
    }

    #[tokio::test]
    async fn the_reply_carries_the_password_and_the_outbox_neither_it_nor_the_hash() {
        let svc = crate::registry::open("sqlite::memory:").await.unwrap();
        svc.create_model("files", "", &[]).await.unwrap();
        let mut p = ServerPatch::default();
        for kv in ["name=files1", "model=files", "samba_base=/srv/samba"] {
            p.set_assignment(kv).unwrap();
        }
        svc.create_server(p).await.unwrap();
        svc.store().outbox_subscribe("t").await.unwrap();

        let r = ask(
            &svc,
            "steward/v1/share/create",
            json!({"server": "files1", "name": "docs", "folder": "docs"}),
        )
        .await;
        assert_eq!(r["ok"], true, "{r}");
        let first = r["result"]["password"].as_str().unwrap().to_owned();
        assert_eq!(first.len(), 20);
        let id = r["result"]["id"].as_i64().unwrap();
        let r = ask(&svc, "steward/v1/share/passwd", json!({ "id": id })).await;
        assert_eq!(r["ok"], true, "{r}");
        let second = r["result"]["password"].as_str().unwrap().to_owned();
        assert_ne!(first, second);

        let r = ask(&svc, "steward/v1/share/find", json!({"server": "files1"})).await;
        assert_eq!(r["result"][0]["user"], "smb-docs", "{r}");
        assert!(r["result"][0].get("password").is_none(), "{r}");
        let r = ask(
            &svc,
            "steward/v1/share/create",
            json!({"server": "files1", "name": "x", "folder": "../x"}),
        )
        .await;
        assert_eq!(r["error"]["code"], "invalid_value", "{r}");
        let r = ask(
            &svc,
            "steward/v1/share/create",
            json!({"server": "files1", "name": "docs", "folder": "y", "mode": 1}),
        )
        .await;
        assert_eq!(r["error"]["code"], "invalid_value", "{r}");

        let hash = svc.store().shares_with_hashes(1).await.unwrap()[0]
            .1
            .expose()
            .to_owned();
        let rows = format!("{:?}", svc.store().outbox_pending("t", 100).await.unwrap());
        for secret in [&first, &second, &hash] {
            assert!(!rows.contains(secret.as_str()), "{rows}");
        }
        let r = ask(&svc, "steward/v1/share/delete", json!({ "id": id })).await;
        assert_eq!(r["ok"], true, "{r}");
    }
}
