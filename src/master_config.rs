//! Reads the salt-master's own config, so the daemon needs one setting about
//! Salt: the path of that file.
//!
//! Mirrors `salt/config/__init__.py: master_config` of 3006/3007: the main file,
//! then `default_include` (`master.d/*.conf`, relative to the file's directory)
//! and `include` files, each *overriding* the main file; Salt's defaults for
//! absent keys; then the `sock_dir` length rule and `prepend_root_dir` applied
//! the way `apply_master_config` applies them.

use std::path::{Component, Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use crate::bus::BusEndpoint;

/// Where Salt looks for the master config by default.
pub const DEFAULT_MASTER_CONFIG: &str = "/etc/salt/master";

/// Why the master config could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MasterConfigError {
    #[error("cannot read master config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("master config {path} is not valid YAML: {source}")]
    Yaml {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("master config {path} is not a mapping of options")]
    NotAMapping { path: PathBuf },
    #[error("master config {path}: option `{key}` {problem}")]
    BadValue {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

/// How the master's local IPC (the event bus among others) is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpcMode {
    /// Unix sockets under `sock_dir` (the default on Linux).
    Ipc,
    /// TCP on 127.0.0.1 at `tcp_master_pub_port` / `tcp_master_pull_port`.
    Tcp,
}

/// The master options the daemon uses, resolved as Salt resolves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterConfig {
    /// The file these options came from.
    pub path: PathBuf,
    pub root_dir: PathBuf,
    pub sock_dir: PathBuf,
    pub pki_dir: PathBuf,
    pub cachedir: PathBuf,
    pub interface: String,
    pub ret_port: u16,
    pub publish_port: u16,
    pub transport: String,
    pub ipc_mode: IpcMode,
    pub tcp_master_pub_port: u16,
    pub tcp_master_pull_port: u16,
    /// The user the master runs as (its root key is `<cachedir>/.<user>_key`).
    pub user: String,
    /// RSA size of keys the master generates (`keysize`, default 2048).
    pub keysize: usize,
    /// Base name of the signing pair (`master_sign_key_name`: `<name>.pem`/`.pub`).
    pub master_sign_key_name: String,
    /// File name, in `pki_dir`, of the pre-made signature of `master.pub`.
    pub master_pubkey_signature: String,
    /// Whether the config names `master_pubkey_signature` itself: Salt 3008's
    /// default is `<master id>_pubkey_signature`, not the file name 3006 and
    /// 3007 use, so a signing master must name it to be read by every release.
    pub master_pubkey_signature_set: bool,
    /// The master signs its public key for minions (`master_sign_pubkey`).
    pub master_sign_pubkey: bool,
    /// The master sends the pre-made signature file (`master_use_pubkey_signature`).
    pub master_use_pubkey_signature: bool,
    /// 3007's `keys.cache_driver` (`localfs_key`, the plain files, by default).
    pub keys_cache_driver: String,
    /// `file_roots` of the `base` environment (Salt's default `/srv/salt`,
    /// `/srv/spm/salt`): where `salt-states/` must be for the daemon's states.
    pub file_roots_base: Vec<PathBuf>,
}

impl MasterConfig {
    /// Reads `path` and its includes. A missing or malformed file is an error naming it.
    pub fn load(path: &Path) -> Result<Self, MasterConfigError> {
        let mut opts = read_mapping(path)?;
        let default_include = match opts.get("default_include") {
            Some(v) => string_list(v),
            None => vec!["master.d/*.conf".to_owned()],
        };
        let include = opts.get("include").map(string_list).unwrap_or_default();
        for pattern in default_include.iter().chain(include.iter()) {
            for file in expand_include(path, pattern) {
                for (k, v) in read_mapping(&file)? {
                    opts.insert(k, v);
                }
            }
        }
        Self::from_options(path, &opts)
    }

    fn from_options(path: &Path, opts: &Mapping) -> Result<Self, MasterConfigError> {
        let get_str = |key: &'static str, default: &str| -> Result<String, MasterConfigError> {
            match opts.get(key) {
                None | Some(Value::Null) => Ok(default.to_owned()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Number(n)) => Ok(n.to_string()),
                Some(other) => Err(bad(path, key, format!("must be a string, not {other:?}"))),
            }
        };
        let get_port = |key: &'static str, default: u16| -> Result<u16, MasterConfigError> {
            match opts.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Number(n)) => n
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| bad(path, key, format!("must be a port number, not {n}"))),
                Some(Value::String(s)) => s
                    .trim()
                    .parse()
                    .map_err(|_| bad(path, key, format!("must be a port number, not {s:?}"))),
                Some(other) => Err(bad(
                    path,
                    key,
                    format!("must be a port number, not {other:?}"),
                )),
            }
        };
        let get_bool = |key: &'static str, default: bool| -> Result<bool, MasterConfigError> {
            match opts.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(bad(
                    path,
                    key,
                    format!("must be True or False, not {other:?}"),
                )),
            }
        };
        let keysize = match opts.get("keysize") {
            None | Some(Value::Null) => 2048,
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|k| usize::try_from(k).ok())
                .ok_or_else(|| {
                    bad(
                        path,
                        "keysize",
                        format!("must be a number of bits, not {n}"),
                    )
                })?,
            Some(other) => {
                return Err(bad(
                    path,
                    "keysize",
                    format!("must be a number of bits, not {other:?}"),
                ))
            }
        };
        let root_dir = absolute(Path::new(&get_str("root_dir", "/")?));
        let cachedir = get_str("cachedir", "/var/cache/salt/master")?;
        let mut sock_dir = get_str("sock_dir", "/var/run/salt/master")?;
        // apply_master_config: a sock_dir too long for a unix socket path moves
        // under the cachedir, before root_dir is applied.
        if sock_dir.len() > cachedir.len() + 10 {
            sock_dir = format!("{}/.salt-unix", cachedir.trim_end_matches('/'));
        }
        let ipc_mode = match get_str("ipc_mode", "ipc")?.as_str() {
            "ipc" => IpcMode::Ipc,
            "tcp" => IpcMode::Tcp,
            other => {
                return Err(bad(
                    path,
                    "ipc_mode",
                    format!("must be ipc or tcp, not {other:?}"),
                ))
            }
        };
        Ok(Self {
            path: path.to_owned(),
            sock_dir: prepend_root_dir(&root_dir, &sock_dir),
            pki_dir: prepend_root_dir(&root_dir, &get_str("pki_dir", "/etc/salt/pki/master")?),
            cachedir: prepend_root_dir(&root_dir, &cachedir),
            root_dir,
            interface: get_str("interface", "0.0.0.0")?,
            ret_port: get_port("ret_port", 4506)?,
            publish_port: get_port("publish_port", 4505)?,
            transport: get_str("transport", "zeromq")?,
            ipc_mode,
            tcp_master_pub_port: get_port("tcp_master_pub_port", 4512)?,
            tcp_master_pull_port: get_port("tcp_master_pull_port", 4513)?,
            user: match opts.get("user") {
                Some(_) => get_str("user", "")?,
                None => current_user(),
            },
            keysize,
            master_sign_key_name: get_str("master_sign_key_name", "master_sign")?,
            master_pubkey_signature_set: opts
                .get("master_pubkey_signature")
                .is_some_and(|v| !v.is_null()),
            master_pubkey_signature: get_str("master_pubkey_signature", "master_pubkey_signature")?,
            master_sign_pubkey: get_bool("master_sign_pubkey", false)?,
            master_use_pubkey_signature: get_bool("master_use_pubkey_signature", false)?,
            keys_cache_driver: get_str("keys.cache_driver", "localfs_key")?,
            file_roots_base: match opts.get("file_roots") {
                None | Some(Value::Null) => {
                    vec![PathBuf::from("/srv/salt"), PathBuf::from("/srv/spm/salt")]
                }
                Some(Value::Mapping(envs)) => envs
                    .get("base")
                    .map(string_list)
                    .unwrap_or_default()
                    .into_iter()
                    .map(PathBuf::from)
                    .collect(),
                Some(other) => {
                    return Err(bad(
                        path,
                        "file_roots",
                        format!("must map environments to directories, not {other:?}"),
                    ))
                }
            },
        })
    }

    /// Where subscribers read the master's events.
    pub fn event_pub(&self) -> BusEndpoint {
        match self.ipc_mode {
            IpcMode::Ipc => BusEndpoint::Unix(self.sock_dir.join("master_event_pub.ipc")),
            IpcMode::Tcp => {
                BusEndpoint::Tcp((std::net::Ipv4Addr::LOCALHOST, self.tcp_master_pub_port).into())
            }
        }
    }

    /// Where events are fired into the master's bus.
    pub fn event_pull(&self) -> BusEndpoint {
        match self.ipc_mode {
            IpcMode::Ipc => BusEndpoint::Unix(self.sock_dir.join("master_event_pull.ipc")),
            IpcMode::Tcp => {
                BusEndpoint::Tcp((std::net::Ipv4Addr::LOCALHOST, self.tcp_master_pull_port).into())
            }
        }
    }
}

fn bad(path: &Path, key: &'static str, problem: String) -> MasterConfigError {
    MasterConfigError::BadValue {
        path: path.to_owned(),
        key,
        problem,
    }
}

fn read_mapping(path: &Path) -> Result<Mapping, MasterConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| MasterConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let value: Value =
        serde_yaml_ng::from_str(&text).map_err(|source| MasterConfigError::Yaml {
            path: path.to_owned(),
            source,
        })?;
    match value {
        // An empty file is an empty config, as for Salt.
        Value::Null => Ok(Mapping::new()),
        Value::Mapping(m) => Ok(m),
        _ => Err(MasterConfigError::NotAMapping {
            path: path.to_owned(),
        }),
    }
}

fn string_list(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Sequence(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// Files matched by an include pattern, sorted as `include_config` sorts them.
/// Relative patterns are relative to the including file's directory.
fn expand_include(config: &Path, pattern: &str) -> Vec<PathBuf> {
    let pattern = match pattern.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(rest))
            .unwrap_or_else(|| PathBuf::from(pattern)),
        None => PathBuf::from(pattern),
    };
    let pattern = if pattern.is_absolute() {
        pattern
    } else {
        config.parent().unwrap_or(Path::new(".")).join(pattern)
    };
    // Salt globs the whole path; in practice only the file name has wildcards.
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return Vec::new();
    };
    let Ok(matcher) = globset::Glob::new(&name.to_string_lossy()) else {
        return Vec::new();
    };
    let matcher = matcher.compile_matcher();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| matcher.is_match(e.file_name()))
        // Python's glob skips dot files unless the pattern starts with a dot.
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// `salt/config/__init__.py: prepend_root_dir` for one path, on POSIX
/// (`salt.syspaths.ROOT_DIR` is `/`, so its prefix is empty).
fn prepend_root_dir(root_dir: &Path, path: &str) -> PathBuf {
    let root = root_dir.to_string_lossy();
    let root = root.trim_end_matches('/');
    let under_root = !root.is_empty() && (path == root || path.starts_with(&format!("{root}/")));
    // Outside root_dir, an absolute path matches Salt's default root "/" and
    // is re-rooted under root_dir whole; a relative one is joined as it is.
    let rel = if under_root {
        &path[root.len()..]
    } else {
        path
    };
    // salt.utils.path.join: normalised, leading separators stripped.
    let rel = normalise(rel);
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        root_dir.to_owned()
    } else {
        root_dir.join(rel)
    }
}

fn normalise(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str().unwrap_or_default()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    parts.join("/")
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        PathBuf::from(format!("/{}", normalise(&p.to_string_lossy())))
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_owned())
    }
}

/// The user this process runs as (Salt's default for `user`).
fn current_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_when_keys_are_absent() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MasterConfig::load(&write(dir.path(), "master", "")).unwrap();
        assert_eq!(cfg.root_dir, PathBuf::from("/"));
        assert_eq!(cfg.sock_dir, PathBuf::from("/var/run/salt/master"));
        assert_eq!(cfg.pki_dir, PathBuf::from("/etc/salt/pki/master"));
        assert_eq!(cfg.cachedir, PathBuf::from("/var/cache/salt/master"));
        assert_eq!(cfg.interface, "0.0.0.0");
        assert_eq!((cfg.ret_port, cfg.publish_port), (4506, 4505));
        assert_eq!(cfg.transport, "zeromq");
        assert_eq!(cfg.ipc_mode, IpcMode::Ipc);
        assert_eq!(
            cfg.event_pub(),
            BusEndpoint::Unix("/var/run/salt/master/master_event_pub.ipc".into())
        );
    }

    #[test]
    fn root_dir_is_applied_as_salt_applies_it() {
        let dir = tempfile::tempdir().unwrap();
        let text = "root_dir: /srv/salt-root\n\
                    pki_dir: /srv/salt-root/pki\n\
                    cachedir: cache\n";
        let cfg = MasterConfig::load(&write(dir.path(), "master", text)).unwrap();
        // already under root_dir: kept; relative: joined; default absolute: re-rooted
        assert_eq!(cfg.pki_dir, PathBuf::from("/srv/salt-root/pki"));
        assert_eq!(cfg.cachedir, PathBuf::from("/srv/salt-root/cache"));
        // the default sock_dir is longer than "cache" + 10: it moves under cachedir
        assert_eq!(
            cfg.sock_dir,
            PathBuf::from("/srv/salt-root/cache/.salt-unix")
        );
    }

    #[test]
    fn default_paths_move_under_root_dir() {
        let dir = tempfile::tempdir().unwrap();
        let text =
            "root_dir: /opt/r\ncachedir: /var/cache/salt/master\nsock_dir: /var/run/salt/m\n";
        let cfg = MasterConfig::load(&write(dir.path(), "master", text)).unwrap();
        assert_eq!(cfg.sock_dir, PathBuf::from("/opt/r/var/run/salt/m"));
        assert_eq!(cfg.pki_dir, PathBuf::from("/opt/r/etc/salt/pki/master"));
        assert_eq!(cfg.cachedir, PathBuf::from("/opt/r/var/cache/salt/master"));
    }

    #[test]
    fn long_sock_dir_moves_under_cachedir() {
        let dir = tempfile::tempdir().unwrap();
        let text = "cachedir: /c\nsock_dir: /a/very/long/socket/directory/path\n";
        let cfg = MasterConfig::load(&write(dir.path(), "master", text)).unwrap();
        assert_eq!(cfg.sock_dir, PathBuf::from("/c/.salt-unix"));
    }

    #[test]
    fn master_d_overrides_the_main_file_and_include_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "master",
            "ret_port: 1000\ninclude: extra/*.yml\n",
        );
        write(
            dir.path(),
            "master.d/10-ports.conf",
            "ret_port: 2000\nipc_mode: tcp\n",
        );
        write(dir.path(), "master.d/ignored.txt", "ret_port: 3000\n");
        write(dir.path(), "extra/a.yml", "tcp_master_pub_port: 5512\n");
        let cfg = MasterConfig::load(&main).unwrap();
        assert_eq!(cfg.ret_port, 2000);
        assert_eq!(cfg.ipc_mode, IpcMode::Tcp);
        assert_eq!(
            cfg.event_pub(),
            BusEndpoint::Tcp(([127, 0, 0, 1], 5512).into())
        );
        assert_eq!(
            cfg.event_pull(),
            BusEndpoint::Tcp(([127, 0, 0, 1], 4513).into())
        );
    }

    #[test]
    fn missing_and_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = MasterConfig::load(&missing).unwrap_err().to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");

        let broken = write(dir.path(), "broken", "ret_port: [1,\n");
        let err = MasterConfig::load(&broken).unwrap_err().to_string();
        assert!(
            err.contains("broken") && err.contains("not valid YAML"),
            "{err}"
        );

        let list = write(dir.path(), "list", "- a\n- b\n");
        assert!(matches!(
            MasterConfig::load(&list),
            Err(MasterConfigError::NotAMapping { .. })
        ));

        let port = write(dir.path(), "port", "ret_port: lots\n");
        let err = MasterConfig::load(&port).unwrap_err().to_string();
        assert!(err.contains("ret_port") && err.contains("lots"), "{err}");

        let bad_include = write(dir.path(), "withinc", "include: inc.conf\n");
        write(dir.path(), "inc.conf", "a: [\n");
        let err = MasterConfig::load(&bad_include).unwrap_err().to_string();
        assert!(err.contains("inc.conf"), "{err}");
    }
}
