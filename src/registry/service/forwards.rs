//! Port and hostname forwards: the service's operations (CLI and bus alike)
//! and the check that a server change does not break the forwards using it.
//! Each operation validates and names the problem first; the database's
//! constraints (migration 0005) still hold when writers race.

use super::Service;
use crate::registry::inventory::{
    validate_domain, validate_path, validate_port, HostnameForward, HostnameForwardPatch,
    PortForward, PortForwardPatch, Proto,
};
use crate::registry::store::{NewHostnameForward, NewPortForward};
use crate::registry::{Error, Server, ServerRef, Store};

/// The default port nginx listens on for a hostname forward.
pub const DEFAULT_LISTEN_PORT: i64 = 80;

impl<S: Store> Service<S> {
    /// Adds a port forward: `host`'s `proto`/`port` to `dest`:`to_port`.
    /// The host must be a Proxmox host with an external interface and an
    /// internal network; the destination a guest of it with an internal IP.
    pub async fn create_port_forward(
        &self,
        host: &ServerRef,
        dest: &ServerRef,
        proto: Proto,
        port: i64,
        to_port: i64,
    ) -> Result<PortForward, Error> {
        let source_port = validate_port("port", port)?;
        let dest_port = validate_port("to_port", to_port)?;
        let host = self.get_server(host).await?;
        check_nat_host(&host)?;
        let dest = self.get_server(dest).await?;
        check_guest(&dest, &host)?;
        self.check_port_free(&host, proto, source_port, None)
            .await?;
        self.store
            .insert_port_forward(&NewPortForward {
                host_id: host.id,
                dest_id: dest.id,
                proto,
                source_port,
                dest_port,
            })
            .await
    }

    /// Port forwards, of one host or all.
    pub async fn list_port_forwards(
        &self,
        host: Option<&ServerRef>,
    ) -> Result<Vec<PortForward>, Error> {
        let host_id = match host {
            Some(h) => Some(self.get_server(h).await?.id),
            None => None,
        };
        self.store.port_forwards(host_id).await
    }

    /// One port forward.
    pub async fn get_port_forward(&self, id: i64) -> Result<PortForward, Error> {
        self.store
            .port_forward(id)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "port forward",
                key: format!("#{id}"),
            })
    }

    /// Changes a port forward's guest, protocol or ports (its host stays).
    pub async fn update_port_forward(
        &self,
        id: i64,
        patch: PortForwardPatch,
    ) -> Result<PortForward, Error> {
        let mut f = self.get_port_forward(id).await?;
        if let Some(expected) = patch.revision {
            if expected != f.revision {
                return Err(Error::Conflict {
                    kind: "port forward",
                    key: format!("#{id}"),
                    expected,
                    current: f.revision,
                });
            }
        }
        let host = self.get_server(&ServerRef::Id(f.host_id)).await?;
        if let Some(d) = &patch.dest {
            let dest = self.get_server(d).await?;
            check_guest(&dest, &host)?;
            f.dest_id = dest.id;
        }
        if let Some(p) = patch.proto {
            f.proto = p;
        }
        if let Some(p) = patch.source_port {
            f.source_port = validate_port("port", p)?;
        }
        if let Some(p) = patch.dest_port {
            f.dest_port = validate_port("to_port", p)?;
        }
        self.check_port_free(&host, f.proto, f.source_port, Some(f.id))
            .await?;
        self.store.update_port_forward(&f).await
    }

    /// Removes a port forward.
    pub async fn delete_port_forward(&self, id: i64) -> Result<PortForward, Error> {
        self.store.delete_port_forward(id).await
    }

    /// Adds a hostname forward: `domain` on the nginx proxy of `dest`'s host,
    /// listening on `listen_port` (80), proxied to `dest`:`to_port` (the
    /// listen port), for requests under `path` (`/`).
    pub async fn create_hostname_forward(
        &self,
        domain: &str,
        dest: &ServerRef,
        listen_port: Option<i64>,
        to_port: Option<i64>,
        path: Option<&str>,
    ) -> Result<HostnameForward, Error> {
        let domain = validate_domain(domain)?;
        let listen = listen_port.unwrap_or(DEFAULT_LISTEN_PORT);
        let listen_port = validate_port("port", listen)?;
        let dest_port = validate_port("to_port", to_port.unwrap_or(listen))?;
        let path = validate_path(path.unwrap_or("/"))?;
        let dest = self.get_server(dest).await?;
        let (host, proxy) = self.proxy_of(&dest).await?;
        self.check_domain_free(&proxy, &domain, listen_port, None)
            .await?;
        self.store
            .insert_hostname_forward(&NewHostnameForward {
                domain,
                dest_id: dest.id,
                host_id: host.id,
                proxy_id: proxy.id,
                listen_port,
                dest_port,
                path,
            })
            .await
    }

    /// Hostname forwards, of one proxy or all.
    pub async fn list_hostname_forwards(
        &self,
        proxy: Option<&ServerRef>,
    ) -> Result<Vec<HostnameForward>, Error> {
        let proxy_id = match proxy {
            Some(p) => Some(self.get_server(p).await?.id),
            None => None,
        };
        self.store.hostname_forwards(proxy_id).await
    }

    /// One hostname forward.
    pub async fn get_hostname_forward(&self, id: i64) -> Result<HostnameForward, Error> {
        self.store
            .hostname_forward(id)
            .await?
            .ok_or_else(|| Error::NotFound {
                kind: "hostname forward",
                key: format!("#{id}"),
            })
    }

    /// Changes a hostname forward; a new guest may move it to another proxy
    /// (both proxies are then dispatched).
    pub async fn update_hostname_forward(
        &self,
        id: i64,
        patch: HostnameForwardPatch,
    ) -> Result<HostnameForward, Error> {
        let mut f = self.get_hostname_forward(id).await?;
        if let Some(expected) = patch.revision {
            if expected != f.revision {
                return Err(Error::Conflict {
                    kind: "hostname forward",
                    key: format!("#{id}"),
                    expected,
                    current: f.revision,
                });
            }
        }
        let previous_proxy = f.proxy_id;
        if let Some(d) = &patch.domain {
            f.domain = validate_domain(d)?;
        }
        if let Some(d) = &patch.dest {
            let dest = self.get_server(d).await?;
            let (host, proxy) = self.proxy_of(&dest).await?;
            f.dest_id = dest.id;
            f.host_id = host.id;
            f.proxy_id = proxy.id;
            f.proxy = proxy.name;
        }
        if let Some(p) = patch.listen_port {
            f.listen_port = validate_port("port", p)?;
        }
        if let Some(p) = patch.dest_port {
            f.dest_port = validate_port("to_port", p)?;
        }
        if let Some(p) = &patch.path {
            f.path = validate_path(p)?;
        }
        let proxy = self.get_server(&ServerRef::Id(f.proxy_id)).await?;
        self.check_domain_free(&proxy, &f.domain, f.listen_port, Some(f.id))
            .await?;
        self.store.update_hostname_forward(&f, previous_proxy).await
    }

    /// Removes a hostname forward.
    pub async fn delete_hostname_forward(&self, id: i64) -> Result<HostnameForward, Error> {
        self.store.delete_hostname_forward(id).await
    }

    /// Refuses a server change that would break a forward naming the
    /// server: a guest moved or without its internal IP, a host no longer a
    /// NAT host, a host's proxy changed.
    pub(super) async fn check_forwards_kept(
        &self,
        before: &Server,
        after: &Server,
    ) -> Result<(), Error> {
        let lost = |b: bool, a: bool| b && !a;
        let breaking = before.is_vm != after.is_vm
            || before.vm_host != after.vm_host
            || lost(before.internal_ip.is_some(), after.internal_ip.is_some())
            || lost(before.is_proxmox_host, after.is_proxmox_host)
            || lost(
                before.external_interface.is_some(),
                after.external_interface.is_some(),
            )
            || lost(
                before.internal_network.is_some(),
                after.internal_network.is_some(),
            )
            || (before.nginx_proxy.is_some() && before.nginx_proxy != after.nginx_proxy);
        if !breaking {
            return Ok(());
        }
        let by = self.store.forward_references(before.id).await?;
        if by.is_empty() {
            Ok(())
        } else {
            Err(Error::ServerReferenced {
                name: before.name.clone(),
                by,
            })
        }
    }

    /// A guest's host and that host's nginx proxy.
    async fn proxy_of(&self, dest: &Server) -> Result<(Server, Server), Error> {
        let Some(host_id) = dest.vm_host.filter(|_| dest.is_vm) else {
            return Err(Error::NotAGuest {
                dest: dest.name.clone(),
                host: "any Proxmox host (server set NAME is_vm=true vm_host=HOST)".to_owned(),
            });
        };
        let host = self.get_server(&ServerRef::Id(host_id)).await?;
        let Some(proxy_id) = host.nginx_proxy else {
            return Err(Error::NoProxy {
                dest: dest.name.clone(),
                host: host.name,
            });
        };
        if dest.internal_ip.is_none() {
            return Err(no_internal_ip(dest));
        }
        let proxy = self.get_server(&ServerRef::Id(proxy_id)).await?;
        Ok((host, proxy))
    }

    async fn check_port_free(
        &self,
        host: &Server,
        proto: Proto,
        port: u16,
        except: Option<i64>,
    ) -> Result<(), Error> {
        let taken = self.store.port_forwards(Some(host.id)).await?;
        match taken
            .iter()
            .find(|f| f.proto == proto && f.source_port == port && Some(f.id) != except)
        {
            Some(f) => Err(Error::DuplicateForward {
                what: format!("{proto}/{port} on {}", host.name),
                by: f.to_string(),
            }),
            None => Ok(()),
        }
    }

    async fn check_domain_free(
        &self,
        proxy: &Server,
        domain: &str,
        port: u16,
        except: Option<i64>,
    ) -> Result<(), Error> {
        let taken = self.store.hostname_forwards(Some(proxy.id)).await?;
        match taken
            .iter()
            .find(|f| f.domain == domain && f.listen_port == port && Some(f.id) != except)
        {
            Some(f) => Err(Error::DuplicateForward {
                what: format!("{domain}:{port} on proxy {}", proxy.name),
                by: f.to_string(),
            }),
            None => Ok(()),
        }
    }
}

/// A host NAT can be set up on.
fn check_nat_host(host: &Server) -> Result<(), Error> {
    let not = |reason: &str| {
        Err(Error::NotAHost {
            name: host.name.clone(),
            reason: reason.to_owned(),
        })
    };
    if !host.is_proxmox_host {
        return not("it is not a Proxmox host (server set NAME is_proxmox_host=true)");
    }
    if host.external_interface.is_none() {
        return not("it has no external interface (server set NAME external_interface=vmbr0)");
    }
    if host.internal_network.is_none() {
        return not("it has no internal network (server set NAME internal_network=10.0.0.0/24)");
    }
    Ok(())
}

/// `dest` runs on `host` and has an internal address to forward to.
fn check_guest(dest: &Server, host: &Server) -> Result<(), Error> {
    if !dest.is_vm || dest.vm_host != Some(host.id) {
        return Err(Error::NotAGuest {
            dest: dest.name.clone(),
            host: host.name.clone(),
        });
    }
    if dest.internal_ip.is_none() {
        return Err(no_internal_ip(dest));
    }
    Ok(())
}

fn no_internal_ip(dest: &Server) -> Error {
    Error::invalid(
        "dest",
        format!(
            "{} has no internal IP to forward to (server set {} internal_ip=…)",
            dest.name, dest.name
        ),
    )
}
