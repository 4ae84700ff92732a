//! The Salt states of `salt-states/steward/` applied for real by
//! `salt-call --local` (the venv's, `SALT_BIN_DIR`):
//!
//! - `steward.portfwd` inside the `pve` namespace of a [`NatLab`]: nftables
//!   NAT loaded, traffic from `ext` through it to the `vm`, foreign tables and
//!   iptables-nft rules left byte for byte;
//! - `steward.hostfwd` against a private nginx on loopback ([`NginxLab`]).

use serde_json::{json, Value};

use crate::support::eventually;
use crate::support::netns::{refused, NatLab, Netns, PVE_PUBLIC, VM_IP};
use crate::support::nginx::{backend_of, NginxLab};
use crate::support::salt_local::{LocalMinion, StateRun};
use crate::support::{MasterOptions, SaltHarness};

const TCP_PORT: u16 = 18080;
const UDP_PORT: u16 = 15353;

/// A masterless minion in the lab's pve namespace with every portfwd path
/// redirected into its temp dir.
fn pve_minion(lab: &NatLab) -> LocalMinion {
    LocalMinion::new("pve-test", &lab.portfwd_settings()).in_netns(lab.pve.name())
}

fn forward(id: u64, proto: &str, port: u16, to_port: u16) -> Value {
    json!({"id": id, "proto": proto, "port": port, "to_ip": VM_IP, "to_port": to_port})
}

fn portfwd_pillar(revision: u64, forwards: Vec<Value>) -> Value {
    json!({"steward": {"portfwd": {
        "revision": revision,
        "target": "pve-test",
        "external_interface": "vmbr0",
        "external_ip": PVE_PUBLIC,
        "internal_network": "10.99.0.0/24",
        "forwards": forwards,
    }}})
}

fn both_forwards(revision: u64) -> Value {
    portfwd_pillar(
        revision,
        vec![
            forward(1, "tcp", TCP_PORT, 8080),
            forward(2, "udp", UDP_PORT, 5353),
        ],
    )
}

fn assert_applied(run: &StateRun) {
    assert!(run.ok(), "state failed:\n{}", run.raw);
    assert!(run.changed(), "state reported no changes:\n{}", run.raw);
}

fn assert_unchanged(run: &StateRun) {
    assert!(run.ok(), "state failed:\n{}", run.raw);
    assert!(!run.changed(), "second run reported changes:\n{}", run.raw);
}

#[test]
fn portfwd_forwards_masquerades_and_leaves_foreign_rules_alone() {
    let lab = NatLab::start();
    lab.load_foreign();
    let before = lab.foreign_state();
    assert!(
        before
            .1
            .contains("-A POSTROUTING -s 10.77.0.0/24 -j MASQUERADE"),
        "{}",
        before.1
    );
    // No forward yet: nothing answers on the public address's port.
    assert!(lab.client_http(PVE_PUBLIC, TCP_PORT).is_err());
    assert!(
        lab.vm_fetch_outside().is_err(),
        "without masquerade the outside's answer has no way back"
    );

    let minion = pve_minion(&lab);
    let run = minion.apply("steward.portfwd", &both_forwards(42));
    assert_applied(&run);
    let table = lab.portfwd_table();
    assert!(table.contains("comment \"rev=42 sha256="), "{table}");
    assert!(
        table.contains(
            "iifname \"vmbr0\" fib daddr type local tcp dport 18080 dnat to 10.99.0.5:8080"
        ),
        "{table}"
    );
    assert!(
        table.contains("ip saddr 10.99.0.0/24 oifname \"vmbr0\" masquerade"),
        "{table}"
    );

    // Real traffic through the DNAT, TCP and UDP, and the masquerade.
    assert_eq!(lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap(), lab.marker);
    assert_eq!(
        lab.client_udp(PVE_PUBLIC, UDP_PORT, "ping-42").unwrap(),
        "ping-42"
    );
    assert_eq!(lab.vm_fetch_outside().unwrap(), PVE_PUBLIC);

    // The files: the table file, sysctl for boot, the boot unit.
    let d = lab.dir.path();
    let file = std::fs::read_to_string(d.join("etc/portfwd.nft")).unwrap();
    assert!(
        file.contains("delete table ip salt_steward_portfwd"),
        "{file}"
    );
    assert!(!file.contains("flush ruleset"), "{file}");
    let sysctl = std::fs::read_to_string(d.join("sysctl.d/90-salt-steward-portfwd.conf")).unwrap();
    assert!(sysctl.contains("net.ipv4.ip_forward = 1"), "{sysctl}");
    let unit = std::fs::read_to_string(d.join("systemd/salt-steward-portfwd.service")).unwrap();
    assert!(unit.contains("Type=oneshot"), "{unit}");
    assert!(
        unit.contains(&format!("nft -f {}", d.join("etc/portfwd.nft").display())),
        "{unit}"
    );
    assert!(
        unit.contains("ExecStop=-") && unit.contains("delete table ip salt_steward_portfwd"),
        "{unit}"
    );
    // ip_forward of the namespace, as the state left it.
    assert_eq!(
        lab.pve
            .exec_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"])
            .trim(),
        "1"
    );

    // Idempotent.
    let again = minion.apply("steward.portfwd", &both_forwards(42));
    assert_unchanged(&again);
    assert_eq!(
        lab.portfwd_table(),
        table,
        "a no-change run reloaded the table"
    );

    // Foreign state byte for byte.
    assert_eq!(lab.foreign_state(), before);
}

#[test]
fn portfwd_repairs_a_table_deleted_by_hand() {
    let lab = NatLab::start();
    let minion = pve_minion(&lab);
    assert_applied(&minion.apply("steward.portfwd", &both_forwards(5)));
    assert_eq!(lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap(), lab.marker);

    lab.pve
        .exec_ok(&["nft", "delete", "table", "ip", "salt_steward_portfwd"]);
    let err = lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap_err();
    assert!(refused(&err), "{err}");

    let run = minion.apply("steward.portfwd", &both_forwards(5));
    assert_applied(&run);
    assert!(
        run.single().changes["reloaded"]
            .as_str()
            .unwrap_or_default()
            .contains("missing"),
        "{}",
        run.raw
    );
    assert_eq!(lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap(), lab.marker);

    // A table changed by hand (its comment intact, a chain flushed) is
    // repaired at the same revision.
    lab.pve.exec_ok(&[
        "nft",
        "flush",
        "chain",
        "ip",
        "salt_steward_portfwd",
        "prerouting",
    ]);
    let err = lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap_err();
    assert!(refused(&err), "{err}");
    let run = minion.apply("steward.portfwd", &both_forwards(5));
    assert_applied(&run);
    assert_eq!(
        run.single().changes["reloaded"],
        json!("live table was changed by hand"),
        "{}",
        run.raw
    );
    assert_eq!(lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap(), lab.marker);
    assert_unchanged(&minion.apply("steward.portfwd", &both_forwards(5)));
}

#[test]
fn portfwd_removing_forwards_closes_the_ports() {
    let lab = NatLab::start();
    let minion = pve_minion(&lab);
    assert_applied(&minion.apply("steward.portfwd", &both_forwards(1)));
    // One UDP flow (fixed source port) through the forward: conntrack keeps
    // its DNAT binding for as long as it lives, whatever the rules say.
    assert_eq!(
        lab.client_udp_from(40001, PVE_PUBLIC, UDP_PORT, "flow")
            .unwrap(),
        "flow"
    );

    // Remove the UDP forward: its conntrack entries are deleted, so the same
    // flow now reaches pve itself (nothing listens: refused).
    let run = minion.apply(
        "steward.portfwd",
        &portfwd_pillar(2, vec![forward(1, "tcp", TCP_PORT, 8080)]),
    );
    assert_applied(&run);
    assert_eq!(
        run.single().changes["conntrack_flushed_udp_ports"],
        json!([UDP_PORT]),
        "{}",
        run.raw
    );
    let err = eventually("udp forward closed", || {
        match lab.client_udp_from(40001, PVE_PUBLIC, UDP_PORT, "flow") {
            Ok(answer) => Err(format!("answered {answer:?}")),
            Err(e) => Ok(e),
        }
    });
    assert!(refused(&err), "{err}");
    assert_eq!(lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap(), lab.marker);

    // Remove the TCP one: no forwards, empty DNAT chain, masquerade kept.
    assert_applied(&minion.apply("steward.portfwd", &portfwd_pillar(3, vec![])));
    let err = eventually("tcp forward closed", || {
        match lab.client_http(PVE_PUBLIC, TCP_PORT) {
            Ok(body) => Err(format!("answered {body:?}")),
            Err(e) => Ok(e),
        }
    });
    assert!(refused(&err), "{err}");
    let table = lab.portfwd_table();
    assert!(!table.contains("dnat"), "{table}");
    assert!(table.contains("masquerade"), "{table}");
    assert_eq!(lab.vm_fetch_outside().unwrap(), PVE_PUBLIC);

    // No external interface and no internal network: only empty chains.
    let run = minion.apply(
        "steward.portfwd",
        &json!({"steward": {"portfwd": {
            "revision": 4, "target": "pve-test", "external_interface": null,
            "external_ip": null, "internal_network": null, "forwards": [],
        }}}),
    );
    assert_applied(&run);
    let table = lab.portfwd_table();
    assert!(table.contains("chain prerouting"), "{table}");
    assert!(!table.contains("masquerade"), "{table}");
    assert!(lab.vm_fetch_outside().is_err());
}

#[test]
fn portfwd_broken_candidate_fails_and_keeps_the_live_table() {
    let lab = NatLab::start();
    let minion = pve_minion(&lab);
    assert_applied(&minion.apply("steward.portfwd", &both_forwards(10)));
    let live = lab.portfwd_table();
    let file_path = lab.dir.path().join("etc/portfwd.nft");
    let file = std::fs::read(&file_path).unwrap();

    // An address nft cannot read: nft -c refuses it; its message is the state's.
    let mut bad = both_forwards(11);
    bad["steward"]["portfwd"]["forwards"][0]["to_ip"] = json!("10.99.0.999");
    let run = minion.apply("steward.portfwd", &bad);
    assert!(!run.ok(), "an invalid address was accepted:\n{}", run.raw);
    let comment = run.comments();
    assert!(
        comment.contains("nft -c refused") && comment.contains("Error:"),
        "{}",
        run.raw
    );
    assert!(comment.contains("10.99.0.999"), "{comment}");
    assert_eq!(lab.portfwd_table(), live);
    assert_eq!(std::fs::read(&file_path).unwrap(), file);
    assert!(!lab.dir.path().join("etc/portfwd.nft.new").exists());

    // An interface name that would end nft's quoted string: refused before
    // any nft command.
    let mut bad = both_forwards(12);
    bad["steward"]["portfwd"]["external_interface"] = json!("vmbr0\" accept");
    let run = minion.apply("steward.portfwd", &bad);
    assert!(
        !run.ok(),
        "a quote in the interface was accepted:\n{}",
        run.raw
    );
    assert!(run.comments().contains("external_interface"), "{}", run.raw);
    assert_eq!(lab.portfwd_table(), live);
    assert_eq!(std::fs::read(&file_path).unwrap(), file);

    // Traffic still flows through the table that was there.
    assert_eq!(lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap(), lab.marker);
    // And the good pillar is still the applied one.
    assert_unchanged(&minion.apply("steward.portfwd", &both_forwards(10)));
}

/// With br_netfilter on in pve (as pve-firewall sets it), a guest bridged on
/// the public side with a public address of its own is reached directly, not
/// hijacked by our DNAT: `fib daddr type local` limits DNAT to pve's own
/// addresses.
#[test]
fn portfwd_does_not_hijack_a_bridged_public_guest() {
    let lab = NatLab::start();
    let sysctl = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    let present = lab.pve.exec(&["test", "-e", sysctl]).status.success();
    assert!(
        present,
        "{sysctl} is missing in the namespace: the kernel needs br_netfilter (modprobe br_netfilter)"
    );
    // A second topology: pve's public side as a bridge (vmbr0 → bridge with
    // the uplink enslaved) is more than NatLab builds, so the "public" guest
    // sits on its own bridge towards ext here: ext2 ↔ br-pub (pve) ↔ guest.
    let ext2 = Netns::new("pub");
    let mut guest = Netns::new("guest");
    let pve = &lab.pve;
    pve.exec_ok(&["ip", "link", "add", "brpub", "type", "bridge"]);
    pve.exec_ok(&["ip", "addr", "add", "203.0.113.1/24", "dev", "brpub"]);
    pve.exec_ok(&["ip", "link", "set", "brpub", "up"]);
    pve.exec_ok(&[
        "ip",
        "link",
        "add",
        "uplink",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ext2.name(),
    ]);
    pve.exec_ok(&[
        "ip",
        "link",
        "add",
        "tap200",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        guest.name(),
    ]);
    for l in ["uplink", "tap200"] {
        pve.exec_ok(&["ip", "link", "set", l, "master", "brpub"]);
        pve.exec_ok(&["ip", "link", "set", l, "up"]);
    }
    ext2.exec_ok(&["ip", "addr", "add", "203.0.113.2/24", "dev", "eth0"]);
    ext2.exec_ok(&["ip", "link", "set", "eth0", "up"]);
    guest.exec_ok(&["ip", "addr", "add", "203.0.113.20/24", "dev", "eth0"]);
    guest.exec_ok(&["ip", "link", "set", "eth0", "up"]);
    pve.sysctl("net.bridge.bridge-nf-call-iptables", "1");

    let www = lab.dir.path().join("guest-www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("marker"), "bridged-guest").unwrap();
    let py = crate::support::netns::python3();
    let script = crate::support::netns::lab_servers_script(lab.dir.path());
    guest.spawn_ready(
        "guest http",
        &[
            py.to_str().unwrap(),
            script.to_str().unwrap(),
            "http-dir",
            "203.0.113.20",
            "18080",
            www.to_str().unwrap(),
        ],
        &lab.dir.path().join("guest-http.log"),
    );

    // Our forward for tcp 18080 on the bridge the guest hangs off: the same
    // port, arriving on that bridge (iifname matches the bridge with
    // br_netfilter).
    let minion = pve_minion(&lab);
    let mut pillar = both_forwards(1);
    pillar["steward"]["portfwd"]["external_interface"] = json!("brpub");
    assert_applied(&minion.apply("steward.portfwd", &pillar));
    let body = crate::support::netns::curl_in(&ext2, "http://203.0.113.20:18080/marker").unwrap();
    assert_eq!(
        body, "bridged-guest",
        "the bridged guest's traffic was DNATed"
    );
    // Sanity: without `fib daddr type local` the same rule would hijack it.
    lab.pve.exec_ok(&[
        "nft",
        "flush",
        "chain",
        "ip",
        "salt_steward_portfwd",
        "prerouting",
    ]);
    lab.pve.exec_ok(&[
        "nft",
        "add rule ip salt_steward_portfwd prerouting iifname \"brpub\" tcp dport 18080 dnat to 10.99.0.5:8080",
    ]);
    let body = crate::support::netns::curl_in(&ext2, "http://203.0.113.20:18080/marker").unwrap();
    assert_eq!(
        body, lab.marker,
        "the control rule without fib did not hijack"
    );
    drop(guest);
    drop(ext2);
}

/// The same state through a real master: a salt-minion in the pve
/// namespace (relayed to the master on loopback), the master serving
/// `salt-states/`, `salt <id> state.apply steward.portfwd pillar=…`.
#[test]
fn portfwd_applied_by_a_minion_inside_the_pve_namespace() {
    let lab = NatLab::start();
    let mut h = SaltHarness::start_with(MasterOptions {
        file_roots: vec![crate::support::salt::salt_states_dir()],
        ..MasterOptions::default()
    });
    h.start_minion_in_netns("pve", "pve-minion", &lab.portfwd_settings(), lab.pve.name());
    eventually("the minion in pve answers", || {
        let out = h.master_cmd(
            "salt",
            &["pve-minion", "test.ping", "--out=json", "-t", "5"],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("true") {
            Ok(())
        } else {
            Err(crate::support::text(&out))
        }
    });
    let pillar = both_forwards(7).to_string();
    let out = h.master_cmd(
        "salt",
        &[
            "pve-minion",
            "state.apply",
            "steward.portfwd",
            &format!("pillar={pillar}"),
            "--out=json",
            "-t",
            "60",
        ],
    );
    let text = crate::support::text(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{text}"));
    let states = v["pve-minion"]
        .as_object()
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        states.values().all(|s| s["result"] == json!(true)),
        "{text}"
    );
    assert_eq!(lab.client_http(PVE_PUBLIC, TCP_PORT).unwrap(), lab.marker);
}

// ---- hostfwd ----

fn site(id: u64, domain: &str, port: u16, upstream: u16) -> Value {
    json!({"id": id, "domain": domain, "listen_port": port, "path": "/",
           "upstream_ip": "127.0.0.1", "upstream_port": upstream})
}

fn hostfwd_pillar(revision: u64, sites: Vec<Value>) -> Value {
    json!({"steward": {"hostfwd": {"revision": revision, "target": "proxy-test", "sites": sites}}})
}

#[test]
fn hostfwd_routes_by_host_and_keeps_the_last_good_file_on_a_conflict() {
    let mut lab = NginxLab::start();
    let minion = LocalMinion::new("proxy-test", &lab.minion_settings());
    let port = lab.listen_port;
    let two = hostfwd_pillar(
        7,
        vec![
            site(1, "a.test", port, lab.a.port),
            site(2, "b.test", port, lab.b.port),
        ],
    );
    assert!(
        lab.get(port, "a.test").is_err(),
        "a.test served before any apply"
    );

    let run = minion.apply("steward.hostfwd", &two);
    assert_applied(&run);
    let a = eventually("a.test via nginx", || lab.get(port, "a.test"));
    assert_eq!(backend_of(&a), "A");
    let headers: Value = serde_json::from_str(&a).unwrap();
    assert_eq!(headers["host"], "a.test");
    assert_eq!(headers["x_forwarded_host"], "a.test");
    assert_eq!(headers["x_forwarded_proto"], "http");
    assert_eq!(headers["x_real_ip"], "127.0.0.1");
    assert_eq!(headers["x_forwarded_for"], "127.0.0.1");
    assert_eq!(backend_of(&lab.get(port, "b.test").unwrap()), "B");
    assert!(lab.get(port, "c.test").unwrap_err().contains("404"));

    // Idempotent: no change, no reload.
    assert_unchanged(&minion.apply("steward.hostfwd", &two));
    let good = std::fs::read(lab.site_file()).unwrap();

    // A file that is not ours already serves c.test on the same listen.
    std::fs::write(
        lab.conf_d.join("other.conf"),
        format!(
            "server {{\n    listen 127.0.0.1:{port};\n    server_name c.test;\n    return 200 \"other\";\n}}\n"
        ),
    )
    .unwrap();
    lab.restart_from_disk().unwrap();
    assert_eq!(lab.get(port, "c.test").unwrap(), "other");
    let mut three = two.clone();
    three["steward"]["hostfwd"]["revision"] = json!(8);
    three["steward"]["hostfwd"]["sites"]
        .as_array_mut()
        .unwrap()
        .push(site(3, "c.test", port, lab.b.port));
    let run = minion.apply("steward.hostfwd", &three);
    assert!(
        !run.ok(),
        "a conflicting server name was accepted:\n{}",
        run.raw
    );
    assert!(
        run.comments()
            .contains("conflicting server name \"c.test\""),
        "{}",
        run.raw
    );
    assert_eq!(
        std::fs::read(lab.site_file()).unwrap(),
        good,
        "not restored byte for byte"
    );
    assert!(!lab.site_file().with_extension("conf.new").exists());
    assert_eq!(backend_of(&lab.get(port, "a.test").unwrap()), "A");
    assert_eq!(backend_of(&lab.get(port, "b.test").unwrap()), "B");
    assert_eq!(lab.get(port, "c.test").unwrap(), "other");

    // What is on disk still starts.
    lab.restart_from_disk().unwrap();
    assert_eq!(backend_of(&lab.get(port, "a.test").unwrap()), "A");
    assert_eq!(backend_of(&lab.get(port, "b.test").unwrap()), "B");

    // The previous pillar is still the applied one.
    assert_unchanged(&minion.apply("steward.hostfwd", &two));

    // A site removed from the pillar is no longer served.
    let one = hostfwd_pillar(9, vec![site(1, "a.test", port, lab.a.port)]);
    assert_applied(&minion.apply("steward.hostfwd", &one));
    eventually("b.test gone", || match lab.get(port, "b.test") {
        Err(e) if e.contains("404") => Ok(()),
        other => Err(format!("{other:?}")),
    });
    assert_eq!(backend_of(&lab.get(port, "a.test").unwrap()), "A");
}

#[test]
fn hostfwd_failing_first_apply_leaves_no_file_and_full_test_failures_restore() {
    let mut lab = NginxLab::start();
    let minion = LocalMinion::new("proxy-test", &lab.minion_settings());
    let port = lab.listen_port;
    std::fs::write(
        lab.conf_d.join("other.conf"),
        format!("server {{\n    listen 127.0.0.1:{port};\n    server_name c.test;\n    return 200 \"other\";\n}}\n"),
    )
    .unwrap();
    lab.restart_from_disk().unwrap();
    assert_eq!(lab.get(port, "c.test").unwrap(), "other");
    let run = minion.apply(
        "steward.hostfwd",
        &hostfwd_pillar(1, vec![site(3, "c.test", port, lab.a.port)]),
    );
    assert!(!run.ok(), "{}", run.raw);
    assert!(
        !lab.site_file().exists(),
        "a failed first apply left its file"
    );
    assert_eq!(lab.get(port, "c.test").unwrap(), "other");

    // A pillar that passes our checks but fails the full `nginx -t`: a
    // listen port another foreign file declares with conflicting options.
    assert_applied(&minion.apply(
        "steward.hostfwd",
        &hostfwd_pillar(2, vec![site(1, "a.test", port, lab.a.port)]),
    ));
    let good = std::fs::read(lab.site_file()).unwrap();
    let port2 = crate::support::salt::free_port();
    std::fs::write(
        lab.conf_d.join("other2.conf"),
        format!("server {{\n    listen 127.0.0.1:{port2} default_server;\n    server_name d.test;\n    return 200 \"d\";\n}}\nserver {{\n    listen 127.0.0.1:{port2} default_server;\n    server_name e.test;\n    return 200 \"e\";\n}}\n"),
    )
    .unwrap();
    let run = minion.apply(
        "steward.hostfwd",
        &hostfwd_pillar(
            3,
            vec![
                site(1, "a.test", port, lab.a.port),
                site(2, "b.test", port, lab.b.port),
            ],
        ),
    );
    assert!(!run.ok(), "{}", run.raw);
    assert!(
        run.comments().contains("nginx -t failed")
            && run.comments().contains("duplicate default server"),
        "{}",
        run.raw
    );
    assert_eq!(std::fs::read(lab.site_file()).unwrap(), good);
    std::fs::remove_file(lab.conf_d.join("other2.conf")).unwrap();
    lab.restart_from_disk().unwrap();
    assert_eq!(backend_of(&lab.get(port, "a.test").unwrap()), "A");
}
