//! The inventory that drives the infrastructure: port forwards (NAT on a
//! Proxmox host) and hostname forwards (nginx on a host's proxy).
//!
//! The records and their validation; the SQL is in `store/inventory.rs`, the
//! operations in `service::Service` (`create_port_forward` …). The rules
//! also hold in the database (migration 0005): one (host, protocol, source
//! port), one (proxy, domain, listen port), the destination a guest of the
//! host (composite foreign key on `servers (id, vm_host)`), the proxy the
//! destination's host's (on `servers (id, nginx_proxy)`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::service::validate_hostname;
use super::Error;

/// A transport protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The stored and shown name.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(Error::invalid("proto", format!("{s:?} is not tcp or udp"))),
        }
    }
}

/// Traffic to a host's external address and port, forwarded (DNAT) to a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// Assigned by the registry.
    pub id: i64,
    /// The Proxmox host (server id) whose external address is forwarded.
    pub host_id: i64,
    /// Its name.
    pub host: String,
    /// The guest (server id) the traffic goes to.
    pub dest_id: i64,
    /// Its name.
    pub dest: String,
    /// The guest's internal address (read with the forward).
    pub dest_ip: Option<IpAddr>,
    /// tcp or udp.
    pub proto: Proto,
    /// The port on the host.
    pub source_port: u16,
    /// The port on the guest.
    pub dest_port: u16,
    /// Incremented by every write (optimistic concurrency).
    pub revision: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "port forward #{} ({} {}/{} → {}:{})",
            self.id, self.host, self.proto, self.source_port, self.dest, self.dest_port
        )
    }
}

/// A domain served by a proxy's nginx, proxied to a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostnameForward {
    /// Assigned by the registry.
    pub id: i64,
    /// The domain (lower case).
    pub domain: String,
    /// The guest (server id) the requests go to.
    pub dest_id: i64,
    /// Its name.
    pub dest: String,
    /// The guest's internal address (read with the forward).
    pub dest_ip: Option<IpAddr>,
    /// The guest's Proxmox host (server id).
    pub host_id: i64,
    /// The host's nginx proxy (server id): where the site is served.
    pub proxy_id: i64,
    /// Its name.
    pub proxy: String,
    /// The port nginx listens on.
    pub listen_port: u16,
    /// The port on the guest.
    pub dest_port: u16,
    /// The path prefix proxied (`/` for all).
    pub path: String,
    /// Incremented by every write (optimistic concurrency).
    pub revision: i64,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
}

impl fmt::Display for HostnameForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "hostname forward #{} ({}:{}{} on {} → {}:{})",
            self.id,
            self.domain,
            self.listen_port,
            self.path,
            self.proxy,
            self.dest,
            self.dest_port
        )
    }
}

/// A forward change as the outbox records it: the forward and the servers
/// whose configuration it changes (both the old and the new one when an
/// update moved it), so the dispatcher bumps exactly those.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardChange<T> {
    /// The forward after the change (as it was, for a deletion).
    #[serde(flatten)]
    pub forward: T,
    /// Target servers affected.
    pub targets: Vec<i64>,
}

/// A port on either side of a forward: 1–65535.
pub fn validate_port(field: &str, n: i64) -> Result<u16, Error> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| Error::invalid(field, format!("{n} is not a port (1-65535)")))
}

/// A domain nginx serves: a hostname (RFC 1123), lower-cased, with at least
/// one dot (a bare label is not a public name).
pub fn validate_domain(domain: &str) -> Result<String, Error> {
    let d =
        validate_hostname(domain.trim()).map_err(|e| Error::invalid("domain", e.to_string()))?;
    if !d.contains('.') {
        return Err(Error::invalid(
            "domain",
            format!("{d:?} has no dot: a domain is at least name.tld"),
        ));
    }
    Ok(d)
}

/// A path prefix: starts with `/`, only characters that need no quoting in
/// an nginx `location` (letters, digits, `/ . _ - ~ %`), no `..` segment.
pub fn validate_path(path: &str) -> Result<String, Error> {
    let ok = path.starts_with('/')
        && path.len() <= 1024
        && path.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b'~' | b'%')
        })
        && !path.split('/').any(|seg| seg == "..");
    if ok {
        Ok(path.to_owned())
    } else {
        Err(Error::invalid(
            "path",
            format!("{path:?} is not a path prefix (/, letters, digits, . _ - ~ %)"),
        ))
    }
}

/// Changes to a port forward (bus `update`); `None` leaves a field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortForwardPatch {
    /// The revision the change was made from (`conflict` if it moved on).
    pub revision: Option<i64>,
    /// New guest.
    pub dest: Option<super::ServerRef>,
    /// New protocol.
    pub proto: Option<Proto>,
    /// New host port.
    pub source_port: Option<i64>,
    /// New guest port.
    pub dest_port: Option<i64>,
}

/// Changes to a hostname forward (bus `update`); `None` leaves a field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostnameForwardPatch {
    /// The revision the change was made from (`conflict` if it moved on).
    pub revision: Option<i64>,
    /// New domain.
    pub domain: Option<String>,
    /// New guest (its host's proxy serves it).
    pub dest: Option<super::ServerRef>,
    /// New listen port.
    pub listen_port: Option<i64>,
    /// New guest port.
    pub dest_port: Option<i64>,
    /// New path prefix.
    pub path: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_lower_cased_hostnames_with_a_dot() {
        assert_eq!(validate_domain("A.Test").unwrap(), "a.test");
        for bad in [
            "",
            "localhost",
            "a..test",
            "-a.test",
            "a_b.test",
            "1.2.3.4",
            "a.test/x",
        ] {
            assert_eq!(
                validate_domain(bad).unwrap_err().code(),
                "invalid_value",
                "{bad}"
            );
        }
    }

    #[test]
    fn ports_and_paths_are_checked() {
        assert_eq!(validate_port("port", 1).unwrap(), 1);
        assert_eq!(validate_port("port", 65535).unwrap(), 65535);
        for bad in [0, -1, 65536] {
            assert!(validate_port("port", bad).is_err());
        }
        assert_eq!(validate_path("/app/v1").unwrap(), "/app/v1");
        for bad in ["", "app", "/a b", "/a;", "/../x", "/a{"] {
            assert!(validate_path(bad).is_err(), "{bad}");
        }
        assert_eq!("UDP".parse::<Proto>().unwrap(), Proto::Udp);
        assert!("icmp".parse::<Proto>().is_err());
    }
}
