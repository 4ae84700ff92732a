//! Port and hostname forwards on the bus (`steward/v1/forward/port/<op>`,
//! `steward/v1/forward/hostname/<op>`): a request's arguments read into the
//! registry's forward operations (`registry::Service::create_port_forward`
//! …), which validate and write; parsing, trust and replies are
//! [`super::bus`]'s, as for servers.
//!
//! The arguments are the fields of the records as `forward … list --json`
//! shows them, with the CLI's option names as aliases (giving both with
//! different values is `invalid_value`); any other key is `invalid_value`,
//! so a misspelt one never passes silently:
//!
//! | op | port forward | hostname forward |
//! | --- | --- | --- |
//! | create | `host`\|`host_id`, `dest`\|`dest_id` (id or name), `proto` (tcp\|udp), `port`\|`source_port`, `to_port`\|`dest_port` | `domain`, `dest`\|`dest_id`, optional `port`\|`listen_port` (80), `to_port`\|`dest_port` (the listen port), `path` (`/`) |
//! | find | `id` (→ a list of that one), or optional `host`\|`host_id` | `id`, or optional `proxy`\|`proxy_id`, `domain` |
//! | update | `id`, optional `revision` (`conflict` if it moved on) and the create fields but `host` (a forward stays on its host) | `id`, optional `revision` and any create field |
//! | delete | `id` | `id` |
//!
//! Results: the record (create, update, delete: as it was) or a list (find).

use serde_json::Value as Json;

use super::args::{encode, Args};
use super::bus::Op;
use crate::registry::{Error, HostnameForwardPatch, PortForwardPatch, Proto, Service, Store};

const ID: &[&str] = &["id"];
const HOST: &[&str] = &["host", "host_id"];
const DEST: &[&str] = &["dest", "dest_id"];
const PROXY: &[&str] = &["proxy", "proxy_id"];
/// A port forward's host port; a hostname forward's listen port.
const PORT: &[&str] = &["port", "source_port"];
const LISTEN_PORT: &[&str] = &["port", "listen_port"];
const TO_PORT: &[&str] = &["to_port", "dest_port"];

/// Serves a port forward request.
pub async fn port<S: Store>(service: &Service<S>, op: Op, args: Args<'_>) -> Result<Json, Error> {
    match op {
        Op::Create => {
            args.only(&[HOST, DEST, PORT, TO_PORT, &["proto"]].concat())?;
            let f = service
                .create_port_forward(
                    &args.server(HOST)?,
                    &args.server(DEST)?,
                    proto(args)?.ok_or_else(|| Error::invalid("proto", "required"))?,
                    args.int(PORT)?,
                    args.int(TO_PORT)?,
                )
                .await?;
            encode(&f)
        }
        Op::Find => {
            args.only(&[ID, HOST].concat())?;
            match by_id(args, HOST)? {
                Some(id) => encode(&vec![service.get_port_forward(id).await?]),
                None => encode(
                    &service
                        .list_port_forwards(args.opt_server(HOST)?.as_ref())
                        .await?,
                ),
            }
        }
        Op::Update => {
            if args.has_any(HOST) {
                return Err(Error::invalid(
                    "host",
                    "a port forward stays on its host: delete it and create one on the other host",
                ));
            }
            args.only(&[ID, DEST, PORT, TO_PORT, &["proto", "revision"]].concat())?;
            let patch = PortForwardPatch {
                revision: args.opt_int(&["revision"])?,
                dest: args.opt_server(DEST)?,
                proto: proto(args)?,
                source_port: args.opt_int(PORT)?,
                dest_port: args.opt_int(TO_PORT)?,
            };
            encode(&service.update_port_forward(args.int(ID)?, patch).await?)
        }
        Op::Delete => {
            args.only(ID)?;
            encode(&service.delete_port_forward(args.int(ID)?).await?)
        }
        Op::Exec | Op::Passwd | Op::Result => Err(super::bus::not_here("port forward")),
    }
}

/// Serves a hostname forward request.
pub async fn hostname<S: Store>(
    service: &Service<S>,
    op: Op,
    args: Args<'_>,
) -> Result<Json, Error> {
    match op {
        Op::Create => {
            args.only(&[DEST, LISTEN_PORT, TO_PORT, &["domain", "path"]].concat())?;
            let f = service
                .create_hostname_forward(
                    &args.text("domain")?,
                    &args.server(DEST)?,
                    args.opt_int(LISTEN_PORT)?,
                    args.opt_int(TO_PORT)?,
                    args.opt_text("path")?.as_deref(),
                )
                .await?;
            encode(&f)
        }
        Op::Find => {
            args.only(&[ID, PROXY, &["domain"]].concat())?;
            if let Some(id) = by_id(args, &[PROXY, &["domain"]].concat())? {
                return encode(&vec![service.get_hostname_forward(id).await?]);
            }
            let mut all = service
                .list_hostname_forwards(args.opt_server(PROXY)?.as_ref())
                .await?;
            if let Some(domain) = args.opt_text("domain")? {
                let domain = domain.trim().to_ascii_lowercase();
                all.retain(|f| f.domain == domain);
            }
            encode(&all)
        }
        Op::Update => {
            args.only(
                &[
                    ID,
                    DEST,
                    LISTEN_PORT,
                    TO_PORT,
                    &["domain", "path", "revision"],
                ]
                .concat(),
            )?;
            let patch = HostnameForwardPatch {
                revision: args.opt_int(&["revision"])?,
                domain: args.opt_text("domain")?,
                dest: args.opt_server(DEST)?,
                listen_port: args.opt_int(LISTEN_PORT)?,
                dest_port: args.opt_int(TO_PORT)?,
                path: args.opt_text("path")?,
            };
            encode(
                &service
                    .update_hostname_forward(args.int(ID)?, patch)
                    .await?,
            )
        }
        Op::Delete => {
            args.only(ID)?;
            encode(&service.delete_hostname_forward(args.int(ID)?).await?)
        }
        Op::Exec | Op::Passwd | Op::Result => Err(super::bus::not_here("hostname forward")),
    }
}

/// The `proto` argument, when given.
fn proto(args: Args<'_>) -> Result<Option<Proto>, Error> {
    args.opt_text("proto")?.map(|p| p.parse()).transpose()
}

/// A find's `id`, refused beside the `filters` (one forward by id, or a
/// filtered list: not both).
fn by_id(args: Args<'_>, filters: &[&str]) -> Result<Option<i64>, Error> {
    let id = args.opt_int(ID)?;
    if id.is_some() && args.has_any(filters) {
        return Err(Error::invalid(
            "id",
            format!(
                "find by id or by {}, not both",
                filters
                    .iter()
                    .filter(|k| !k.ends_with("_id"))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::bus::{parse, serve};
    use crate::bus::event::from_json;
    use crate::bus::Event;
    use crate::registry::{DbStore, ServerPatch, Service, Store as _};

    async fn registry() -> Service<DbStore> {
        let svc = crate::registry::open("sqlite::memory:").await.unwrap();
        svc.create_model("web", "", &[]).await.unwrap();
        for s in [
            json!({"name": "proxy.example.org"}),
            json!({"name": "pve1.example.org", "is_proxmox_host": true,
                   "external_interface": "vmbr0", "internal_network": "10.0.0.0/24",
                   "nginx_proxy": "proxy.example.org"}),
            json!({"name": "pve2.example.org", "is_proxmox_host": true,
                   "external_interface": "vmbr0", "internal_network": "10.1.0.0/24"}),
            json!({"name": "vm1.example.org", "is_vm": true, "vm_host": "pve1.example.org",
                   "internal_ip": "10.0.0.2"}),
            json!({"name": "vm2.example.org", "is_vm": true, "vm_host": "pve2.example.org",
                   "internal_ip": "10.1.0.2"}),
        ] {
            let mut m = s.as_object().unwrap().clone();
            m.insert("model".into(), json!("web"));
            svc.create_server(ServerPatch::from_json(&m, &[]).unwrap())
                .await
                .unwrap();
        }
        svc.store().outbox_subscribe("t").await.unwrap();
        svc
    }

    async fn ask(svc: &Service<DbStore>, tag: &str, data: serde_json::Value) -> serde_json::Value {
        let mut data = data;
        data["request_id"] = json!("r");
        let req = parse(&Event::new(tag.into(), from_json(&data)))
            .unwrap()
            .unwrap();
        serve(svc, &req).await
    }

    async fn outbox(svc: &Service<DbStore>) -> usize {
        svc.store().outbox_pending("t", 1000).await.unwrap().len()
    }

    const PORT: &str = "steward/v1/forward/port/";
    const HOST: &str = "steward/v1/forward/hostname/";

    #[tokio::test]
    async fn port_forwards_by_record_field_or_cli_name() {
        let svc = registry().await;
        let r = ask(
            &svc,
            &format!("{PORT}create"),
            json!({"host": "pve1.example.org", "dest": 4, "proto": "tcp", "port": 8080, "to_port": "80"}),
        )
        .await;
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(
            (&r["result"]["source_port"], &r["result"]["dest_port"]),
            (&json!(8080), &json!(80))
        );
        let id = r["result"]["id"].as_i64().unwrap();
        let r = ask(
            &svc,
            &format!("{PORT}create"),
            json!({"host_id": 2, "dest_id": "vm1.example.org", "proto": "udp", "source_port": 53, "dest_port": 53}),
        )
        .await;
        assert_eq!(r["ok"], true, "{r}");
        let found = ask(
            &svc,
            &format!("{PORT}find"),
            json!({"host": "pve1.example.org"}),
        )
        .await;
        assert_eq!(found["result"].as_array().unwrap().len(), 2, "{found}");
        let one = ask(&svc, &format!("{PORT}find"), json!({"id": id})).await;
        assert_eq!(one["result"][0]["id"], id, "{one}");
        let r = ask(
            &svc,
            &format!("{PORT}update"),
            json!({"id": id, "to_port": 8081, "revision": 1}),
        )
        .await;
        assert_eq!(r["result"]["dest_port"], 8081, "{r}");
        let before = outbox(&svc).await;
        for (data, code) in [
            (json!({"id": id, "to_port": 1, "revision": 1}), "conflict"),
            (
                json!({"id": id, "host": "pve2.example.org"}),
                "invalid_value",
            ),
            (json!({"id": id, "to-port": 1}), "invalid_value"),
            (json!({"id": 999, "to_port": 1}), "not_found"),
        ] {
            let r = ask(&svc, &format!("{PORT}update"), data.clone()).await;
            assert_eq!(r["error"]["code"], code, "{data}: {r}");
        }
        for (data, code) in [
            (
                json!({"host": "pve1.example.org", "dest": "vm1.example.org", "proto": "tcp", "port": 8080, "to_port": 1}),
                "duplicate_forward",
            ),
            (
                json!({"host": "pve1.example.org", "dest": "vm2.example.org", "proto": "tcp", "port": 1, "to_port": 1}),
                "not_a_guest",
            ),
            (
                json!({"host": "vm1.example.org", "dest": "vm1.example.org", "proto": "tcp", "port": 1, "to_port": 1}),
                "not_a_host",
            ),
            (
                json!({"host": "pve1.example.org", "dest": "vm1.example.org", "proto": "tcp", "port": 70000, "to_port": 1}),
                "invalid_value",
            ),
            (
                json!({"host": "pve1.example.org", "dest": "vm1.example.org", "proto": "icmp", "port": 1, "to_port": 1}),
                "invalid_value",
            ),
            (
                json!({"host": "pve1.example.org", "dest": "vm1.example.org", "port": 1, "to_port": 1}),
                "invalid_value",
            ),
            (
                json!({"host": "pve1.example.org", "dest": "vm1.example.org", "proto": "tcp", "port": 1, "source_port": 2, "to_port": 1}),
                "invalid_value",
            ),
            (
                json!({"host": "nope.example.org", "dest": "vm1.example.org", "proto": "tcp", "port": 1, "to_port": 1}),
                "not_found",
            ),
        ] {
            let r = ask(&svc, &format!("{PORT}create"), data.clone()).await;
            assert_eq!(r["error"]["code"], code, "{data}: {r}");
        }
        let r = ask(
            &svc,
            &format!("{PORT}find"),
            json!({"id": id, "host": "pve1.example.org"}),
        )
        .await;
        assert_eq!(r["error"]["code"], "invalid_value", "{r}");
        assert_eq!(
            outbox(&svc).await,
            before,
            "nothing written by refused requests"
        );
        let r = ask(&svc, &format!("{PORT}delete"), json!({"id": id})).await;
        assert_eq!(r["result"]["id"], id, "{r}");
        assert_eq!(outbox(&svc).await, before + 1);
    }

    #[tokio::test]
    async fn hostname_forwards_by_record_field_or_cli_name() {
        let svc = registry().await;
        let r = ask(
            &svc,
            &format!("{HOST}create"),
            json!({"domain": "A.Example.org", "dest": "vm1.example.org"}),
        )
        .await;
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(
            (
                &r["result"]["domain"],
                &r["result"]["listen_port"],
                &r["result"]["dest_port"],
                &r["result"]["path"],
                &r["result"]["proxy"]
            ),
            (
                &json!("a.example.org"),
                &json!(80),
                &json!(80),
                &json!("/"),
                &json!("proxy.example.org")
            )
        );
        let id = r["result"]["id"].as_i64().unwrap();
        let r = ask(
            &svc,
            &format!("{HOST}create"),
            json!({"domain": "b.example.org", "dest_id": 4, "listen_port": 8443, "dest_port": 8080, "path": "/app"}),
        )
        .await;
        assert_eq!(r["ok"], true, "{r}");
        let found = ask(
            &svc,
            &format!("{HOST}find"),
            json!({"proxy": "proxy.example.org", "domain": "B.example.org"}),
        )
        .await;
        assert_eq!(found["result"].as_array().unwrap().len(), 1, "{found}");
        let r = ask(
            &svc,
            &format!("{HOST}update"),
            json!({"id": id, "path": "/x", "port": 81}),
        )
        .await;
        assert_eq!(
            (&r["result"]["path"], &r["result"]["listen_port"]),
            (&json!("/x"), &json!(81)),
            "{r}"
        );
        let before = outbox(&svc).await;
        for (data, code) in [
            (
                json!({"domain": "b.example.org", "dest": "vm1.example.org", "port": 8443}),
                "duplicate_forward",
            ),
            (
                json!({"domain": "c.example.org", "dest": "vm2.example.org"}),
                "no_proxy",
            ),
            (
                json!({"domain": "c.example.org", "dest": "pve1.example.org"}),
                "not_a_guest",
            ),
            (
                json!({"domain": "bad_name!.org", "dest": "vm1.example.org"}),
                "invalid_value",
            ),
            (
                json!({"domain": "c.example.org", "dest": "vm1.example.org", "to_port": 0}),
                "invalid_value",
            ),
            (
                json!({"domain": "c.example.org", "dest": "vm1.example.org", "path": "/a b"}),
                "invalid_value",
            ),
            (json!({"domain": "c.example.org"}), "invalid_value"),
        ] {
            let r = ask(&svc, &format!("{HOST}create"), data.clone()).await;
            assert_eq!(r["error"]["code"], code, "{data}: {r}");
        }
        assert_eq!(
            outbox(&svc).await,
            before,
            "nothing written by refused requests"
        );
        let r = ask(&svc, &format!("{HOST}delete"), json!({"id": id})).await;
        assert_eq!(r["ok"], true, "{r}");
    }
}
