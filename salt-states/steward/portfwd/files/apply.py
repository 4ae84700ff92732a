"""Applies salt-steward's port forwards on a Proxmox host (steward.portfwd).

Reads one JSON object on stdin:

    {"pillar": {revision, target, external_interface, external_ip,
                internal_network, forwards: [{id, proto, port, to_ip, to_port}]},
     "settings": {config_dir, nft, conntrack, sysctl_conf, unit_dir}}

and makes the host match it:

- renders the nftables table ``ip salt_steward_portfwd`` (declare + delete +
  define, one transaction) into ``<config_dir>/portfwd.nft``, checked with
  ``nft -c -f`` on a staged copy before it replaces the live file, then
  loaded with ``nft -f``; the table's comment carries the revision and the
  sha256 of the rendering, and its listing right after the load is kept
  (``portfwd.nft.listed``), so a table deleted or changed by hand (another
  hash, a flushed chain, an added rule) is re-applied;
- turns on IPv4 forwarding (/proc, and ``sysctl_conf`` for boot);
- deletes the conntrack entries of UDP forwards that changed or went away;
- writes the boot unit ``salt-steward-portfwd.service`` into ``unit_dir``
  (enabled only where systemd runs).

Nothing outside our table is touched. Prints one JSON object for Salt's
``cmd.run stateful: True`` (``changed``, ``comment``, what changed) and exits
non-zero on failure, with nft's message in the comment.

Standard library only: it runs under the minion's own Python.
"""

import hashlib
import json
import os
import re
import subprocess
import sys

TABLE = "salt_steward_portfwd"
FAMILY = "ip"
UNIT = "salt-steward-portfwd.service"
FILE = "portfwd.nft"
PROC_FORWARD = "/proc/sys/net/ipv4/ip_forward"

# Interface names go inside nft double quotes, which have no escape: refuse
# anything that could end the string or the statement. Other values are
# single nft tokens of digits, dots (and a slash): no value can add a
# statement; whether the token is a valid address is nft's to say (its
# message is reported).
IFACE_RE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}$")
# Addresses are IPv4 (the table is family ip) in dotted numbers: no host name
# reaches nft, which would resolve it.
ADDR_RE = re.compile(r"^[0-9.]{1,15}$")
CIDR_RE = re.compile(r"^[0-9.]{1,15}/[0-9]{1,2}$")


class Failure(Exception):
    pass


def out(changed, comment, changes=None, ok=True):
    data = {"changed": changed, "comment": comment}
    data.update(changes or {})
    sys.stdout.write(json.dumps(data, sort_keys=True))
    sys.stdout.write("\n")
    sys.exit(0 if ok else 1)


def run(argv, stdin=None):
    try:
        p = subprocess.run(
            argv,
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
            timeout=60,
        )
    except FileNotFoundError:
        raise Failure("{}: command not found".format(argv[0]))
    except subprocess.TimeoutExpired:
        raise Failure("{}: no answer within 60 s".format(" ".join(argv)))
    return p.returncode, p.stdout, p.stderr


def token(what, value, pattern):
    text = str(value)
    if not pattern.match(text):
        raise Failure("{} {!r}: not an IPv4 address in dotted numbers".format(what, value))
    return text


def port(what, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise Failure("{} {!r}: not a port number (1-65535)".format(what, value))
    return value


def render(pillar):
    """The table file (text) and the forwards it maps, as {(proto, port): "ip:port"}."""
    revision = pillar.get("revision")
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise Failure("pillar steward:portfwd:revision {!r}: not an integer".format(revision))
    ext = pillar.get("external_interface")
    if ext is not None and not IFACE_RE.match(str(ext)):
        raise Failure(
            "external_interface {!r}: not an interface name nft can quote "
            "(1-15 of A-Z a-z 0-9 _ . : @ + -)".format(ext)
        )
    cidr = pillar.get("internal_network")
    if cidr is not None:
        cidr = token("internal_network", cidr, CIDR_RE)
    forwards = pillar.get("forwards") or []
    if not isinstance(forwards, list):
        raise Failure("forwards: not a list")
    if forwards and ext is None:
        raise Failure("forwards given but external_interface is null")
    mapped = {}
    dnat = []
    for f in sorted(forwards, key=lambda f: (str(f.get("proto")), str(f.get("port")))):
        proto = f.get("proto")
        if proto not in ("tcp", "udp"):
            raise Failure("forward {}: proto {!r} is not tcp or udp".format(f.get("id"), proto))
        p = port("forward {} port".format(f.get("id")), f.get("port"))
        to_ip = token("forward {} to_ip".format(f.get("id")), f.get("to_ip"), ADDR_RE)
        to_port = port("forward {} to_port".format(f.get("id")), f.get("to_port"))
        if (proto, p) in mapped:
            raise Failure("{} port {} is forwarded twice".format(proto, p))
        mapped[(proto, p)] = "{}:{}".format(to_ip, to_port)
        dnat.append(
            '        iifname "{ext}" fib daddr type local {proto} dport {p} '
            "dnat to {ip}:{tp} comment \"forward {id}\"".format(
                ext=ext, proto=proto, p=p, ip=to_ip, tp=to_port, id=int(f.get("id") or 0)
            )
        )
    post = []
    if cidr is not None and ext is not None:
        post.append('        ip saddr {} oifname "{}" masquerade'.format(cidr, ext))
    body = "\n".join(
        [
            "    chain prerouting {",
            "        type nat hook prerouting priority dstnat; policy accept;",
        ]
        + dnat
        + [
            "    }",
            "    chain postrouting {",
            "        type nat hook postrouting priority srcnat; policy accept;",
        ]
        + post
        + ["    }"]
    )
    digest = hashlib.sha256("rev={}\n{}".format(revision, body).encode()).hexdigest()
    text = "\n".join(
        [
            "#!/usr/sbin/nft -f",
            "# Managed by salt-steward (steward.portfwd): do not edit, the next",
            "# apply replaces it. Revision {}, target {}.".format(
                revision, json.dumps(pillar.get("target"))
            ),
            "# Only this table is touched: it is declared (a no-op if it exists),",
            "# deleted and defined again in one transaction.",
            "table {} {} {{ }}".format(FAMILY, TABLE),
            "delete table {} {}".format(FAMILY, TABLE),
            "table {} {} {{".format(FAMILY, TABLE),
            '    comment "rev={} sha256={}"'.format(revision, digest),
            body,
            "}",
            "",
        ]
    )
    return text, digest, mapped


DNAT_RE = re.compile(r"\b(tcp|udp) dport (\d+) dnat to (\S+)")


def mapped_in(text):
    """The forwards an earlier rendering of ours maps."""
    found = {}
    for m in DNAT_RE.finditer(text or ""):
        found[(m.group(1), int(m.group(2)))] = m.group(3)
    return found


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_atomic(path, text, mode=0o644):
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = "{}.tmp-{}".format(path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def unit_text(nft, path):
    return "\n".join(
        [
            "# Managed by salt-steward (steward.portfwd).",
            "[Unit]",
            "Description=salt-steward port forwards (nftables table {} {})".format(FAMILY, TABLE),
            "Wants=network-pre.target",
            "Before=network-pre.target",
            "",
            "[Service]",
            "Type=oneshot",
            "RemainAfterExit=yes",
            "ExecStart={} -f {}".format(nft, path),
            "ExecReload={} -f {}".format(nft, path),
            "ExecStop=-{} delete table {} {}".format(nft, FAMILY, TABLE),
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def absolute(prog):
    """A unit needs an absolute path."""
    if os.path.isabs(prog):
        return prog
    for d in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]:
        cand = os.path.join(d, prog)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return prog


def main():
    spec = json.load(sys.stdin)
    pillar = spec.get("pillar")
    if not isinstance(pillar, dict):
        raise Failure("no pillar steward:portfwd (the dispatcher sends it with state.apply)")
    s = spec["settings"]
    nft = s["nft"]
    path = os.path.join(s["config_dir"], FILE)
    staged = path + ".new"

    text, digest, mapped = render(pillar)
    revision = pillar["revision"]

    live_rc, live, _ = run([nft, "list", "table", FAMILY, TABLE])
    if live_rc != 0:
        live = ""
    # The live table is ours as loaded when it names this rendering's hash
    # and lists exactly as it did right after our load (a chain flushed or a
    # rule added by hand is drift too).
    listed_path = path + ".listed"
    live_ok = live_rc == 0 and "sha256={}".format(digest) in live and read(listed_path) == live
    old_text = read(path)
    file_ok = old_text == text
    changes = {}

    if not (live_ok and file_ok):
        # Stage and check against the running kernel before anything changes.
        write_atomic(staged, text, 0o600)
        rc, _, err = run([nft, "-c", "-f", staged])
        if rc != 0:
            os.unlink(staged)
            raise Failure("nft -c refused the candidate (the live table is unchanged):\n" + err.strip())
        os.rename(staged, path)
        rc, _, err = run([nft, "-f", path])
        if rc != 0:
            # The transaction did not happen: put the previous file back.
            if old_text is None:
                os.unlink(path)
            else:
                write_atomic(path, old_text, 0o600)
            raise Failure("nft -f failed (the live table is unchanged):\n" + err.strip())
        rc, listed, err = run([nft, "list", "table", FAMILY, TABLE])
        if rc != 0:
            raise Failure("nft list table {} {} after loading it: {}".format(FAMILY, TABLE, err.strip()))
        write_atomic(listed_path, listed, 0o600)
        changes["table"] = "{} {} revision {} sha256 {}".format(FAMILY, TABLE, revision, digest)
        if not file_ok:
            changes["file"] = path
        if not live_ok:
            if not live:
                why = "missing"
            elif "sha256={}".format(digest) not in live:
                why = "another rendering"
            else:
                why = "changed by hand"
            changes["reloaded"] = "live table was {}".format(why)

        # NAT is decided on a flow's first packet: UDP flows of a forward
        # that moved or went away keep their old mapping until flushed.
        old = mapped_in(old_text)
        if not old:
            old = mapped_in(live)
        flushed = []
        for (proto, p), dest in sorted(old.items()):
            if proto == "udp" and mapped.get((proto, p)) != dest:
                crc, cout, cerr = run([s["conntrack"], "-D", "-p", "udp", "--orig-port-dst", str(p)])
                # rc 1 with "0 flow entries have been deleted" is nothing to do.
                if crc != 0 and "0 flow entries" not in (cout + cerr):
                    raise Failure("conntrack -D -p udp --orig-port-dst {}: {}".format(p, cerr.strip()))
                flushed.append(p)
        if flushed:
            changes["conntrack_flushed_udp_ports"] = flushed

    # Forwarding on: now (in a network namespace, the namespace's own) and at boot.
    if (read(PROC_FORWARD) or "").strip() != "1":
        with open(PROC_FORWARD, "w") as f:
            f.write("1\n")
        changes["ip_forward"] = "1"
    sysctl = "# Managed by salt-steward (steward.portfwd).\nnet.ipv4.ip_forward = 1\n"
    if read(s["sysctl_conf"]) != sysctl:
        write_atomic(s["sysctl_conf"], sysctl)
        changes["sysctl_conf"] = s["sysctl_conf"]

    unit_path = os.path.join(s["unit_dir"], UNIT)
    unit = unit_text(absolute(nft), path)
    if read(unit_path) != unit:
        write_atomic(unit_path, unit)
        changes["unit"] = unit_path
        if os.path.isdir("/run/systemd/system"):
            run(["systemctl", "daemon-reload"])
    if os.path.isdir("/run/systemd/system"):
        rc, state, _ = run(["systemctl", "is-enabled", UNIT])
        if state.strip() != "enabled":
            rc, _, err = run(["systemctl", "enable", UNIT])
            if rc != 0:
                raise Failure("systemctl enable {}: {}".format(UNIT, err.strip()))
            changes["unit_enabled"] = UNIT

    if changes:
        changes["revision"] = revision
        out(True, "port forwards at revision {} applied ({} forwards)".format(revision, len(mapped)), changes)
    out(False, "port forwards already at revision {} (sha256 {})".format(revision, digest))


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        out(False, str(e), ok=False)
    except Exception as e:  # the state fails with the reason, not a traceback
        out(False, "steward.portfwd apply failed: {}: {}".format(type(e).__name__, e), ok=False)
