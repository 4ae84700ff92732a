//! Issue #12 end to end: the inventory changed through the CLI exactly as an
//! operator types it, a running `salt-steward daemon` dispatching
//! `steward.portfwd` / `steward.hostfwd` through a real master to real
//! minions registered from their bundles by the daemon's acceptor, and the
//! result checked where it matters (packets through the NAT, nginx's
//! answers, the master's job cache, the dispatcher's records):
//!
//! - port forwards on a "Proxmox host" whose minion runs inside the `pve`
//!   namespace of a [`NatLab`]: TCP and UDP from `ext` to the VM, the
//!   masquerade, foreign nft/iptables state byte for byte, removal, a forced
//!   re-run without changes, a table deleted by hand repaired by a retry
//!   and by drift repair;
//! - hostname forwards on an nginx proxy minion (loopback, [`NginxLab`]):
//!   routing by Host, a change `nginx -t` refuses recorded failed with
//!   nginx's message, the last good file kept and nginx still starting;
//! - durability: changes made while the daemon is stopped give one run per
//!   target (counted in the job cache); a daemon SIGKILLed mid-run
//!   converges after restart; a failing state is retried with growing
//!   delays and succeeds once fixed; a target without a registered minion
//!   waits, then runs when it registers.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::accept::{bundle, signing_master_serving, wait_status};
use crate::support::netns::{refused, NatLab, PVE_PUBLIC, VM_IP, VM_UDP_PORT};
use crate::support::nginx::{backend_of, nginx_bin, NginxLab};
use crate::support::salt::{install_bundle, salt_states_dir};
use crate::support::{
    assert_ok, cli, eventually, eventually_within, json_line, run_ok, start_daemon, steward_config,
    wait_event_data, watch_steward, LineChild, SaltHarness,
};

const HOST: &str = "pve1.example.org";
const VM: &str = "vm100.example.org";
const PROXY: &str = "proxy1.example.org";
const APP: &str = "app1.example.org";
const TCP_PORT: u16 = 18080;
const UDP_PORT: u16 = 15353;

/// How long a target may take to converge (a state run through the master
/// on a loaded 2-core machine, after the debounce).
const CONVERGE: Duration = Duration::from_secs(90);

/// A master that signs its key (bundles verify it), does not auto-accept
/// and serves `salt-states/`.
fn master() -> SaltHarness {
    signing_master_serving(vec![salt_states_dir()])
}

/// The daemon's config for `h`: bundles name this master, short dispatch
/// delays, plus `dispatch` lines (indented two spaces) of the test.
fn config(h: &SaltHarness, dispatch: &str) -> PathBuf {
    steward_config(
        h,
        &[],
        &format!(
            "masters: [\"127.0.0.1:{}\"]\n\
             dispatch:\n  debounce_ms: 300\n  job_timeout: 120\n{dispatch}",
            h.ret_port
        ),
    )
}

/// `salt-steward ARGS` (it must succeed): its stdout.
fn steward(cfg: &Path, args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ok(cli(cfg, args)).stdout).into_owned()
}

/// `salt-steward ARGS` whose stdout is JSON.
fn steward_json(cfg: &Path, args: &[&str]) -> Value {
    let out = steward(cfg, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// `forward … add …` (prints the new id): the id.
fn add_forward(cfg: &Path, args: &[&str]) -> String {
    let mut all = vec!["forward"];
    all.extend_from_slice(args);
    let id = steward(cfg, &all).trim().to_owned();
    assert!(id.parse::<i64>().is_ok(), "{all:?} printed {id:?}");
    id
}

/// `forward port add pve1 vm100 --proto PROTO --port PORT --to-port TO`: the id.
fn add_port_forward(cfg: &Path, proto: &str, port: u16, to_port: u16) -> String {
    add_forward(
        cfg,
        &[
            "port",
            "add",
            HOST,
            VM,
            "--proto",
            proto,
            "--port",
            &port.to_string(),
            "--to-port",
            &to_port.to_string(),
        ],
    )
}

/// The inventory of these tests: a Proxmox host (NAT towards `vmbr0`,
/// guests on 10.99.0.0/24, nginx proxy `proxy1`), the proxy, a VM on the
/// lab's guest network and an "app" guest whose services are the nginx
/// lab's loopback backends. Returns the minion ids of the host and the proxy.
fn inventory(cfg: &Path) -> (String, String) {
    steward(cfg, &["model", "add", "pve"]);
    let proxy = steward_json(cfg, &["server", "add", PROXY, "--model", "pve", "--json"]);
    let host = steward_json(
        cfg,
        &[
            "server",
            "add",
            HOST,
            "--model",
            "pve",
            "--proxmox-host",
            "--external-interface",
            "vmbr0",
            "--external-ip",
            PVE_PUBLIC,
            "--internal-network",
            "10.99.0.0/24",
            "--nginx-proxy",
            PROXY,
            "--json",
        ],
    );
    for (name, ip) in [(VM, VM_IP), (APP, "127.0.0.1")] {
        steward(
            cfg,
            &[
                "server",
                "add",
                name,
                "--model",
                "pve",
                "--vm-host",
                HOST,
                "--internal-ip",
                ip,
            ],
        );
    }
    (
        host["minion_id"].as_str().unwrap().to_owned(),
        proxy["minion_id"].as_str().unwrap().to_owned(),
    )
}

/// Starts `name`'s minion from its bundle (inside `netns` if given) with
/// the state settings `settings` in its config, and waits until the
/// daemon's acceptor has registered it and seen it online.
fn register(
    h: &mut SaltHarness,
    cfg: &Path,
    name: &str,
    minion_id: &str,
    settings: &str,
    netns: Option<&str>,
) {
    let b = bundle(h, cfg, name, &format!("{name}.tgz"));
    match netns {
        Some(ns) => {
            h.start_minion_in_netns_from_bundle(name, minion_id, settings, ns, &b);
        }
        None => {
            h.start_minion_with(name, minion_id, settings, |dir| install_bundle(&b, dir));
        }
    }
    wait_status(cfg, name, "online");
}

/// The (server, state) target as `dispatch show SERVER --json` lists it.
fn target(cfg: &Path, server: &str, state: &str) -> Option<Value> {
    let show = steward_json(cfg, &["dispatch", "show", server, "--json"]);
    show["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["state"] == state)
        .cloned()
}

/// `dispatch show SERVER --json`'s runs of `state`, oldest first.
fn runs(cfg: &Path, server: &str, state: &str) -> Vec<Value> {
    let show = steward_json(cfg, &["dispatch", "show", server, "--json"]);
    let mut runs: Vec<Value> = show["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == state)
        .cloned()
        .collect();
    runs.sort_by_key(|r| r["id"].as_i64());
    runs
}

/// Changes of the registry the dispatcher has not read yet (`outbox status`),
/// or `None` before it ever subscribed.
fn unread_by_dispatcher(cfg: &Path) -> Option<i64> {
    let status = steward_json(cfg, &["outbox", "status", "--json"]);
    status
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["consumer"] == "dispatch")
        .and_then(|c| c["pending"].as_i64())
}

/// Waits until the dispatcher has read every change and the target is
/// `done` with `applied == desired`; the target.
fn converged(cfg: &Path, server: &str, state: &str) -> Value {
    eventually_within(&format!("{server} {state} converged"), CONVERGE, || {
        let unread = unread_by_dispatcher(cfg);
        let t = target(cfg, server, state);
        match (&unread, &t) {
            (Some(0), Some(t)) if t["status"] == "done" && t["applied"] == t["desired"] => {
                Ok(t.clone())
            }
            _ => Err(format!(
                "unread {unread:?}, target {}",
                t.map(|t| t.to_string()).unwrap_or_default()
            )),
        }
    })
}

/// Waits until the dispatcher has read every change and no target is
/// pending or running; `dispatch list --json`.
fn settled(cfg: &Path) -> Vec<Value> {
    eventually_within("every target settled", CONVERGE, || {
        let unread = unread_by_dispatcher(cfg);
        let all = steward_json(cfg, &["dispatch", "list", "--json"]);
        let busy = all
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["status"] == "pending" || t["status"] == "running");
        if unread == Some(0) && !busy {
            Ok(all.as_array().unwrap().clone())
        } else {
            Err(format!("unread {unread:?}, targets {all}"))
        }
    })
}

/// The `steward/v1/dispatch/<outcome>` event of `server`'s `state` whose
/// data satisfies `pred`, among the events seen so far or the next ones.
fn dispatch_event(
    w: &mut LineChild,
    daemon: &mut LineChild,
    outcome: &str,
    server: &str,
    state: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let tag = format!("steward/v1/dispatch/{outcome}");
    let hit = |d: &Value| d["server"] == server && d["state"] == state && pred(d);
    if let Some(v) = w
        .seen
        .iter()
        .map(|l| json_line(l))
        .find(|v| v["tag"] == tag.as_str() && hit(&v["data"]))
    {
        return v["data"].clone();
    }
    wait_event_data(w, daemon, &tag, hit)
}

/// Whether the event data `d` is of a run started after run `jid` (our
/// jids are timestamps of one width).
fn newer(d: &Value, jid: &Value) -> bool {
    d["jid"].as_str() > jid.as_str()
}

/// The done event of the last run of `t` (a converged target). Its revision
/// may be below `applied`: a change whose rendering equals the applied one
/// moves `applied` on without a run.
fn done_event(w: &mut LineChild, daemon: &mut LineChild, t: &Value) -> Value {
    let (server, state) = (t["server"].as_str().unwrap(), t["state"].as_str().unwrap());
    let done = dispatch_event(w, daemon, "done", server, state, |d| {
        d["jid"] == t["last_jid"]
    });
    assert!(
        done["revision"].as_i64() <= t["applied"].as_i64(),
        "{done}\n{t}"
    );
    assert_eq!(done["summary"]["failed"], 0, "{done}");
    done
}

/// The jobs of `state.apply` on `minion` in the master's job cache
/// (`salt-run jobs.list_jobs`): jid → job.
pub fn state_apply_jobs(h: &SaltHarness, minion: &str) -> Vec<(String, Value)> {
    let out = h.master_cmd(
        "salt-run",
        &[
            "jobs.list_jobs",
            "search_function=state.apply",
            "--out=json",
        ],
    );
    assert_ok(&out);
    let all: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("jobs.list_jobs: {e}\n{}", crate::support::text(&out)));
    let mut jobs: Vec<(String, Value)> = all
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, j)| match &j["Target"] {
            Value::String(s) => s.split(',').any(|t| t == minion),
            Value::Array(a) => a.iter().any(|t| t == minion),
            _ => false,
        })
        .map(|(jid, j)| (jid.clone(), j.clone()))
        .collect();
    jobs.sort_by(|a, b| a.0.cmp(&b.0));
    jobs
}

/// The `steward:<state>` pillar a cached `state.apply` job was published with.
fn job_pillar(job: &Value, state: &str) -> Value {
    job["Arguments"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|a| a.get("pillar"))
        .map(|p| p["steward"][state].clone())
        .unwrap_or_else(|| panic!("no pillar in {job}"))
}

// ---- port forwards ----

#[test]
fn port_forwards_follow_the_inventory_on_a_proxmox_host_minion() {
    let lab = NatLab::start();
    lab.load_foreign();
    let foreign = lab.foreign_state();
    let mut h = master();
    let cfg = config(&h, "");
    let (host_minion, _) = inventory(&cfg);
    let mut daemon = start_daemon(&cfg);
    let mut w = watch_steward(&cfg);
    register(
        &mut h,
        &cfg,
        HOST,
        &host_minion,
        &lab.portfwd_settings(),
        Some(lab.pve.name()),
    );
    assert!(lab.client_http(PVE_PUBLIC, TCP_PORT).is_err());

    let tcp = add_port_forward(&cfg, "tcp", TCP_PORT, 8080);
    let udp = add_port_forward(&cfg, "udp", UDP_PORT, VM_UDP_PORT);
    let t = converged(&cfg, HOST, "portfwd");
    let done = done_event(&mut w, &mut daemon, &t);
    assert_eq!(done["minion_id"], host_minion.as_str(), "{done}");
    // The run is the master's job: state.apply steward.portfwd on the host's
    // minion, with our jid, both forwards in its pillar.
    let jobs = state_apply_jobs(&h, &host_minion);
    let (_, job) = jobs
        .iter()
        .find(|(jid, _)| *jid == done["jid"])
        .unwrap_or_else(|| panic!("jid {} not in the job cache: {jobs:?}", done["jid"]));
    let pillar = job_pillar(job, "portfwd");
    assert_eq!(pillar["forwards"].as_array().unwrap().len(), 2, "{pillar}");
    assert_eq!(pillar["external_interface"], "vmbr0", "{pillar}");

    // Real traffic from outside through the host's address, TCP and UDP,
    // and the guest's own traffic masqueraded.
    assert_eq!(lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap(), lab.marker);
    assert_eq!(
        lab.client_udp(PVE_PUBLIC, UDP_PORT, "ping-e2e").unwrap(),
        "ping-e2e"
    );
    assert_eq!(lab.vm_fetch_outside().unwrap(), PVE_PUBLIC);
    assert_eq!(lab.foreign_state(), foreign);
    let table = lab.portfwd_table();

    // A forced re-run (nothing changed): applied again, no changes, the
    // table not reloaded.
    steward(&cfg, &["dispatch", "retry", HOST]);
    let again = dispatch_event(&mut w, &mut daemon, "done", HOST, "portfwd", |d| {
        newer(d, &done["jid"])
    });
    assert_eq!(again["summary"]["changed"], 0, "{again}");
    assert_eq!(again["revision"], done["revision"], "{again}");
    assert_eq!(lab.portfwd_table(), table, "a no-change run reloaded");

    // A table deleted by hand is repaired by the next run.
    lab.pve
        .exec_ok(&["nft", "delete", "table", "ip", "salt_steward_portfwd"]);
    let err = lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap_err();
    assert!(refused(&err), "{err}");
    steward(&cfg, &["dispatch", "retry", HOST]);
    let repaired = dispatch_event(&mut w, &mut daemon, "done", HOST, "portfwd", |d| {
        newer(d, &again["jid"])
    });
    assert!(
        repaired["summary"]["changed"].as_i64().unwrap() > 0,
        "{repaired}"
    );
    assert_eq!(lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap(), lab.marker);

    // Removing the forwards closes the ports.
    steward(&cfg, &["forward", "port", "rm", &tcp]);
    let t = converged(&cfg, HOST, "portfwd");
    done_event(&mut w, &mut daemon, &t);
    let err = eventually("tcp forward closed", || {
        match lab.client_http(PVE_PUBLIC, TCP_PORT) {
            Ok(body) => Err(format!("answered {body:?}")),
            Err(e) => Ok(e),
        }
    });
    assert!(refused(&err), "{err}");
    assert_eq!(
        lab.client_udp(PVE_PUBLIC, UDP_PORT, "still").unwrap(),
        "still"
    );
    steward(&cfg, &["forward", "port", "rm", &udp]);
    let t = converged(&cfg, HOST, "portfwd");
    done_event(&mut w, &mut daemon, &t);
    let err = eventually("udp forward closed", || {
        match lab.client_udp(PVE_PUBLIC, UDP_PORT, "gone") {
            Ok(answer) => Err(format!("answered {answer:?}")),
            Err(e) => Ok(e),
        }
    });
    assert!(refused(&err), "{err}");
    // The masquerade stays (the host keeps its internal network).
    assert_eq!(lab.vm_fetch_outside().unwrap(), PVE_PUBLIC);
    assert!(!lab.portfwd_table().contains("dnat"));
    assert_eq!(lab.foreign_state(), foreign, "foreign state touched");

    // Drift repair: with drift_interval set, a table deleted by hand comes
    // back without anyone asking.
    assert!(daemon.terminate().success());
    let cfg = config(&h, "  drift_interval: 2\n");
    let mut daemon = start_daemon(&cfg);
    settled(&cfg);
    let before = target(&cfg, HOST, "portfwd").unwrap();
    lab.pve
        .exec_ok(&["nft", "delete", "table", "ip", "salt_steward_portfwd"]);
    let drift = dispatch_event(&mut w, &mut daemon, "done", HOST, "portfwd", |d| {
        newer(d, &before["last_jid"]) && d["summary"]["changed"].as_i64() > Some(0)
    });
    assert_eq!(drift["revision"], before["applied"], "{drift}");
    assert!(
        lab.portfwd_table().contains("masquerade"),
        "{}",
        lab.portfwd_table()
    );
    assert_eq!(lab.vm_fetch_outside().unwrap(), PVE_PUBLIC);
    assert_eq!(lab.foreign_state(), foreign);
}

// ---- hostname forwards ----

/// A proxy setup: nginx lab, master, config, inventory, daemon and watcher,
/// the proxy's minion started (registered) unless told otherwise.
/// Field order is drop order: our processes, then Salt, then nginx.
struct ProxyStack {
    /// None while stopped.
    daemon: Option<LineChild>,
    w: LineChild,
    h: SaltHarness,
    cfg: PathBuf,
    proxy_minion: String,
    lab: NginxLab,
}

impl ProxyStack {
    /// `dispatch` lines for the config; `nginx`: the program the proxy's
    /// minion runs as nginx; `start_minion`: register the proxy now.
    fn start(dispatch: &str, nginx: Option<&Path>, start_minion: bool) -> Self {
        let lab = NginxLab::start();
        let h = master();
        let cfg = config(&h, dispatch);
        let (_, proxy_minion) = inventory(&cfg);
        let daemon = Some(start_daemon(&cfg));
        let w = watch_steward(&cfg);
        let mut s = Self {
            daemon,
            w,
            h,
            cfg,
            proxy_minion,
            lab,
        };
        if start_minion {
            s.start_proxy_minion(nginx);
        }
        s
    }

    fn start_proxy_minion(&mut self, nginx: Option<&Path>) {
        let settings = self.lab.minion_settings_with(nginx.unwrap_or(&nginx_bin()));
        register(
            &mut self.h,
            &self.cfg,
            PROXY,
            &self.proxy_minion.clone(),
            &settings,
            None,
        );
    }

    /// `forward hostname add DOMAIN app1 --port <lab> --to-port <backend>`.
    fn add_site(&self, domain: &str, backend_port: u16) -> String {
        add_forward(
            &self.cfg,
            &[
                "hostname",
                "add",
                domain,
                APP,
                "--port",
                &self.lab.listen_port.to_string(),
                "--to-port",
                &backend_port.to_string(),
            ],
        )
    }

    /// Waits until `domain` reaches backend `name` through nginx.
    fn serves(&self, domain: &str, name: &str) {
        let port = self.lab.listen_port;
        eventually(&format!("{domain} → backend {name}"), || {
            let body = self.lab.get(port, domain)?;
            match backend_of(&body) {
                b if b == name => Ok(()),
                other => Err(format!("backend {other}")),
            }
        });
    }

    /// Converged hostfwd on the proxy, with its done event.
    fn converged(&mut self) -> Value {
        let t = converged(&self.cfg, PROXY, "hostfwd");
        done_event(&mut self.w, self.daemon.as_mut().unwrap(), &t);
        t
    }

    /// The proxy's next (or already seen) dispatch event `outcome` whose
    /// data satisfies `pred`.
    fn event(&mut self, outcome: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let daemon = self.daemon.as_mut().unwrap();
        dispatch_event(&mut self.w, daemon, outcome, PROXY, "hostfwd", pred)
    }
}

/// A wrapper standing in for nginx in `dir`: fails with a message of its own
/// while `dir/fail` exists, stalls 5 s (after recording `dir/started`)
/// while `dir/slow` exists, else runs nginx with its arguments.
fn nginx_wrapper(dir: &Path) -> PathBuf {
    let path = dir.join("nginx-wrapper");
    let d = dir.display();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             if [ -e {d}/fail ]; then\n\
             \x20   echo 'nginx: [emerg] made to fail by the test' >&2\n\
             \x20   exit 1\n\
             fi\n\
             if [ -e {d}/slow ]; then\n\
             \x20   echo \"$$ $*\" >> {d}/started\n\
             \x20   sleep 5\n\
             fi\n\
             exec {nginx} \"$@\"\n",
            nginx = nginx_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn hostname_forwards_follow_the_inventory_on_a_proxy_minion() {
    // Retries far apart: the site file and nginx stay still while the
    // failed run is checked (a retry stages and restores the file).
    let mut s = ProxyStack::start("  retry_base_ms: 20000\n", None, true);
    let port = s.lab.listen_port;
    s.add_site("a.test", s.lab.a.port);
    s.add_site("b.test", s.lab.b.port);
    let t = s.converged();
    s.serves("a.test", "A");
    s.serves("b.test", "B");
    let body: Value = serde_json::from_str(&s.lab.get(port, "a.test").unwrap()).unwrap();
    assert_eq!(body["x_forwarded_host"], "a.test", "{body}");
    let good = std::fs::read(s.lab.site_file()).unwrap();

    // A server block that is not ours serves c.test; adding c.test makes
    // nginx warn "conflicting server name": the run fails, recorded with
    // nginx's message, and nothing of ours changes.
    std::fs::write(
        s.lab.conf_d.join("other.conf"),
        format!(
            "server {{\n    listen 127.0.0.1:{port};\n    server_name c.test;\n    return 200 \"other\";\n}}\n"
        ),
    )
    .unwrap();
    s.lab.restart_from_disk().unwrap();
    assert_eq!(s.lab.get(port, "c.test").unwrap(), "other");
    let c = s.add_site("c.test", s.lab.b.port);
    let failed = s.event("failed", |d| newer(d, &t["last_jid"]));
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("conflicting server name \"c.test\""),
        "{failed}"
    );
    assert!(failed["summary"]["failed"].as_i64() > Some(0), "{failed}");
    assert!(failed["retry_at"].as_i64().is_some(), "{failed}");
    let f = target(&s.cfg, PROXY, "hostfwd").unwrap();
    assert_eq!(f["status"], "failed", "{f}");
    assert_eq!(f["applied"], t["applied"], "{f}");
    assert!(f["attempts"].as_i64() >= Some(1), "{f}");
    assert!(
        f["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("conflicting server name \"c.test\""),
        "{f}"
    );
    // `status` shows it (and exits 1: something failed).
    let status = cli(&s.cfg, &["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(PROXY) && l.contains("failed") && l.contains("nginx -t")),
        "{text}"
    );
    assert!(
        text.contains("conflicting server name \"c.test\""),
        "{text}"
    );
    assert_eq!(
        std::fs::read(s.lab.site_file()).unwrap(),
        good,
        "the previous site file was not kept byte for byte"
    );
    assert_eq!(backend_of(&s.lab.get(port, "a.test").unwrap()), "A");
    assert_eq!(backend_of(&s.lab.get(port, "b.test").unwrap()), "B");
    assert_eq!(s.lab.get(port, "c.test").unwrap(), "other");
    s.lab.restart_from_disk().unwrap();
    assert_eq!(backend_of(&s.lab.get(port, "a.test").unwrap()), "A");
    assert_eq!(backend_of(&s.lab.get(port, "b.test").unwrap()), "B");

    // The operator removes the offending forward: the proxy converges again.
    steward(&s.cfg, &["forward", "hostname", "rm", &c]);
    let t = s.converged();
    assert_eq!(t["attempts"], 0, "{t}");
    s.serves("a.test", "A");
    s.serves("b.test", "B");
    assert_eq!(s.lab.get(port, "c.test").unwrap(), "other");
}

// ---- durability ----

#[test]
fn changes_made_while_the_daemon_is_stopped_give_one_run_per_target() {
    let nat = NatLab::start();
    let mut s = ProxyStack::start("", None, true);
    let (host_minion, proxy_minion) = (
        steward_json(&s.cfg, &["server", "show", HOST, "--json"])["minion_id"]
            .as_str()
            .unwrap()
            .to_owned(),
        s.proxy_minion.clone(),
    );
    register(
        &mut s.h,
        &s.cfg,
        HOST,
        &host_minion,
        &nat.portfwd_settings(),
        Some(nat.pve.name()),
    );
    settled(&s.cfg);
    assert!(s.daemon.take().unwrap().terminate().success());
    let jobs_before = [
        state_apply_jobs(&s.h, &host_minion).len(),
        state_apply_jobs(&s.h, &proxy_minion).len(),
    ];

    // Five changes, two targets, no daemon.
    let tcp = add_port_forward(&s.cfg, "tcp", TCP_PORT, 8080);
    add_port_forward(&s.cfg, "udp", UDP_PORT, VM_UDP_PORT);
    s.add_site("a.test", s.lab.a.port);
    s.add_site("b.test", s.lab.b.port);
    steward(&s.cfg, &["forward", "port", "rm", &tcp]);

    s.daemon = Some(start_daemon(&s.cfg));
    let host_t = converged(&s.cfg, HOST, "portfwd");
    done_event(&mut s.w, s.daemon.as_mut().unwrap(), &host_t);
    let proxy_t = s.converged();
    settled(&s.cfg);

    // Exactly one state.apply per target in the master's job cache, each
    // with the final configuration.
    let host_jobs = state_apply_jobs(&s.h, &host_minion);
    let proxy_jobs = state_apply_jobs(&s.h, &proxy_minion);
    assert_eq!(
        [host_jobs.len(), proxy_jobs.len()],
        [jobs_before[0] + 1, jobs_before[1] + 1],
        "host jobs {host_jobs:?}\nproxy jobs {proxy_jobs:?}"
    );
    let (jid, job) = host_jobs.last().unwrap();
    assert_eq!(Some(jid.as_str()), host_t["last_jid"].as_str());
    let forwards = job_pillar(job, "portfwd")["forwards"].clone();
    let forwards = forwards.as_array().unwrap();
    assert_eq!(forwards.len(), 1, "{forwards:?}");
    assert_eq!(forwards[0]["proto"], "udp", "{forwards:?}");
    let (jid, job) = proxy_jobs.last().unwrap();
    assert_eq!(Some(jid.as_str()), proxy_t["last_jid"].as_str());
    let mut domains: Vec<String> = job_pillar(job, "hostfwd")["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["domain"].as_str().unwrap().to_owned())
        .collect();
    domains.sort();
    assert_eq!(domains, ["a.test", "b.test"]);
    // The dispatcher's own record agrees: one run each since the restart.
    for (server, state, t) in [(HOST, "portfwd", &host_t), (PROXY, "hostfwd", &proxy_t)] {
        let r = runs(&s.cfg, server, state);
        let last = r.last().unwrap();
        assert_eq!(last["jid"], t["last_jid"], "{r:?}");
        assert_eq!(last["revision"], t["applied"], "{r:?}");
    }

    // And the infrastructure follows.
    assert_eq!(
        nat.client_udp(PVE_PUBLIC, UDP_PORT, "final").unwrap(),
        "final"
    );
    let err = nat.client_http(PVE_PUBLIC, TCP_PORT).unwrap_err();
    assert!(refused(&err), "{err}");
    s.serves("a.test", "A");
    s.serves("b.test", "B");
}

#[test]
fn a_daemon_killed_during_a_run_converges_after_restart() {
    stopped_during_a_run(nix::sys::signal::Signal::SIGKILL);
}

/// SIGTERM with a run in flight: the daemon stops within its grace period
/// and exits 0, the run stays recorded as running (nothing lost), and the
/// next start converges the target.
#[test]
fn a_daemon_stopped_during_a_run_exits_0_and_converges_after_restart() {
    stopped_during_a_run(nix::sys::signal::Signal::SIGTERM);
}

fn stopped_during_a_run(signal: nix::sys::signal::Signal) {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = nginx_wrapper(dir.path());
    let mut s = ProxyStack::start("", Some(&wrapper), true);
    s.add_site("a.test", s.lab.a.port);
    s.converged();
    s.serves("a.test", "A");

    // nginx now stalls: the next run is in flight for seconds.
    std::fs::write(dir.path().join("slow"), "").unwrap();
    s.add_site("b.test", s.lab.b.port);
    let started = dir.path().join("started");
    let running = eventually_within("the run in flight", CONVERGE, || {
        let t = target(&s.cfg, PROXY, "hostfwd").unwrap();
        if t["status"] == "running" && started.exists() {
            Ok(t)
        } else {
            Err(format!("{t}, wrapper started: {}", started.exists()))
        }
    });
    let mut daemon = s.daemon.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(daemon.pid());
    nix::sys::signal::kill(pid, signal).unwrap();
    // SIGTERM: within the daemon's grace period (10 s), exit 0.
    let status = daemon.wait_exit(Duration::from_secs(15));
    if signal == nix::sys::signal::Signal::SIGTERM {
        daemon.drain_err();
        assert!(
            status.success(),
            "{status:?}\n{}",
            daemon.seen_err.join("\n")
        );
    } else {
        assert!(!status.success(), "{status:?}");
    }
    let t = target(&s.cfg, PROXY, "hostfwd").unwrap();
    assert_eq!(t["status"], "running", "the record of the stopped run: {t}");

    s.daemon = Some(start_daemon(&s.cfg));
    let t = s.converged();
    assert!(
        t["applied"].as_i64() >= running["desired"].as_i64(),
        "{t}\n{running}"
    );
    s.serves("a.test", "A");
    s.serves("b.test", "B");
    let r = runs(&s.cfg, PROXY, "hostfwd");
    let killed = r
        .iter()
        .find(|r| r["jid"] == running["last_jid"])
        .unwrap_or_else(|| panic!("no run of the killed jid: {r:?}"));
    assert_ne!(killed["outcome"], "done", "{killed}");
}

#[test]
fn a_failing_state_is_retried_with_growing_delays_until_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = nginx_wrapper(dir.path());
    let fail = dir.path().join("fail");
    std::fs::write(&fail, "").unwrap();
    let mut s = ProxyStack::start(
        "  retry_base_ms: 500\n  retry_max_ms: 8000\n",
        Some(&wrapper),
        true,
    );
    s.add_site("a.test", s.lab.a.port);
    for attempt in 1..=3 {
        let failed = s.event("failed", |d| d["attempts"] == attempt);
        assert!(
            failed["error"]
                .as_str()
                .unwrap_or_default()
                .contains("made to fail by the test"),
            "{failed}"
        );
    }
    let t = target(&s.cfg, PROXY, "hostfwd").unwrap();
    assert!(t["attempts"].as_i64() >= Some(3), "{t}");
    assert!(
        s.lab.get(s.lab.listen_port, "a.test").is_err(),
        "served while failing"
    );

    // The cause goes away: the next retry succeeds.
    std::fs::remove_file(&fail).unwrap();
    let t = s.converged();
    assert_eq!(t["attempts"], 0, "{t}");
    s.serves("a.test", "A");

    // The gaps between a failure and the next attempt grow.
    let r = runs(&s.cfg, PROXY, "hostfwd");
    let failed: Vec<&Value> = r.iter().filter(|r| r["outcome"] == "failed").collect();
    assert!(failed.len() >= 3, "{r:?}");
    let gaps: Vec<i64> = r
        .windows(2)
        .filter(|p| p[0]["outcome"] == "failed")
        .map(|p| p[1]["started_at"].as_i64().unwrap() - p[0]["finished_at"].as_i64().unwrap())
        .collect();
    assert!(gaps.len() >= 3, "{gaps:?} {r:?}");
    assert!(gaps[0] >= 450, "first retry after {} ms: {r:?}", gaps[0]);
    for g in gaps.windows(2) {
        assert!(g[1] > g[0], "retry delays do not grow: {gaps:?}\n{r:?}");
    }
}

#[test]
fn a_target_waits_for_its_minion_then_runs_when_it_registers() {
    let mut s = ProxyStack::start("", None, false);
    s.add_site("a.test", s.lab.a.port);
    let waiting = eventually_within("the proxy's target waiting", CONVERGE, || {
        match target(&s.cfg, PROXY, "hostfwd") {
            Some(t) if t["status"] == "waiting" => Ok(t),
            other => Err(format!("{other:?}")),
        }
    });
    let reason = waiting["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!reason.is_empty(), "no reason given: {waiting}");
    let status = steward_json(&s.cfg, &["status", "--json"]);
    assert!(
        status["attention"].as_array().unwrap().iter().any(|t| {
            t["server"] == PROXY && t["status"] == "waiting" && t["last_error"] == reason.as_str()
        }),
        "{status}"
    );
    let text = steward(&s.cfg, &["status"]);
    assert!(
        text.lines()
            .any(|l| l.contains(PROXY) && l.contains("waiting") && l.contains(&reason)),
        "{text}"
    );
    assert!(s.lab.get(s.lab.listen_port, "a.test").is_err());

    s.start_proxy_minion(None);
    s.converged();
    s.serves("a.test", "A");
}
