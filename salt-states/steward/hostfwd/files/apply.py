"""Applies salt-steward's hostname forwards on the nginx proxy (steward.hostfwd).

Reads one JSON object on stdin:

    {"pillar": {revision, target,
                sites: [{id, domain, listen_port, path, upstream_ip, upstream_port}]},
     "settings": {nginx, nginx_args, site_file, listen_address}}

and makes nginx serve exactly those sites from ONE file, ``site_file``:

- one ``server {}`` per (domain, listen_port), one ``location <path>`` per
  site in it, proxied to the upstream by IP with the Host, X-Real-IP,
  X-Forwarded-For, X-Forwarded-Proto and X-Forwarded-Host headers;
- when the rendering equals the live file: nothing is done (no test, no reload);
- otherwise the new file is staged beside the live one, swapped in, and the
  FULL configuration tested (``nginx <args> -t``); on a failure, or a
  "conflicting server name" warning about one of our domains (nginx only
  warns, and one of the two servers silently wins), the previous file is put
  back byte for byte (or removed if there was none) and the state fails with
  nginx's message; after a pass nginx is reloaded (``nginx <args> -s
  reload``), and a failed reload also puts the previous file back.

Prints one JSON object for Salt's ``cmd.run stateful: True`` and exits
non-zero on failure. Standard library only: it runs under the minion's Python.
"""

import json
import os
import re
import shlex
import subprocess
import sys

DOMAIN_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")
PATH_RE = re.compile(r"^/[A-Za-z0-9._~!$&()*+,=:@%/-]*$")
IPV4_RE = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")
IPV6_RE = re.compile(r"^[0-9A-Fa-f:.]{2,45}$")
CONFLICT_RE = re.compile(r'conflicting server name "([^"]*)" on (\S+)')


class Failure(Exception):
    pass


def out(changed, comment, changes=None, ok=True):
    data = {"changed": changed, "comment": comment}
    data.update(changes or {})
    sys.stdout.write(json.dumps(data, sort_keys=True))
    sys.stdout.write("\n")
    sys.exit(0 if ok else 1)


def run(argv):
    try:
        p = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            universal_newlines=True,
            timeout=60,
        )
    except FileNotFoundError:
        raise Failure("{}: command not found".format(argv[0]))
    except subprocess.TimeoutExpired:
        raise Failure("{}: no answer within 60 s".format(" ".join(argv)))
    return p.returncode, p.stdout


def address(what, value):
    text = str(value)
    if IPV4_RE.match(text):
        return text
    if ":" in text and IPV6_RE.match(text):
        return "[{}]".format(text)
    raise Failure("{} {!r}: not an IP address (upstreams and listen addresses are IPs)".format(what, value))


def port(what, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise Failure("{} {!r}: not a port number (1-65535)".format(what, value))
    return value


def render(pillar, listen_address):
    revision = pillar.get("revision")
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise Failure("pillar steward:hostfwd:revision {!r}: not an integer".format(revision))
    sites = pillar.get("sites") or []
    if not isinstance(sites, list):
        raise Failure("sites: not a list")
    listen_prefix = "{}:".format(address("listen_address", listen_address)) if listen_address else ""
    servers = {}
    for s in sites:
        sid = s.get("id")
        domain = str(s.get("domain", ""))
        if not DOMAIN_RE.match(domain) or len(domain) > 253:
            raise Failure("site {}: domain {!r} is not a host name".format(sid, domain))
        lport = port("site {} listen_port".format(sid), s.get("listen_port"))
        path = s.get("path") or "/"
        if not PATH_RE.match(str(path)):
            raise Failure("site {}: path {!r} is not a URL path".format(sid, path))
        up = "{}:{}".format(
            address("site {} upstream_ip".format(sid), s.get("upstream_ip")),
            port("site {} upstream_port".format(sid), s.get("upstream_port")),
        )
        locations = servers.setdefault((domain.lower(), lport), {})
        if path in locations:
            raise Failure("{} port {} path {} is forwarded twice".format(domain, lport, path))
        locations[path] = (sid, up)
    lines = [
        "# Managed by salt-steward (steward.hostfwd): do not edit, the next apply",
        "# replaces it. Revision {}, target {}.".format(revision, json.dumps(pillar.get("target"))),
    ]
    for (domain, lport) in sorted(servers):
        lines += [
            "",
            "server {",
            "    listen {}{};".format(listen_prefix, lport),
            "    server_name {};".format(domain),
        ]
        for path in sorted(servers[(domain, lport)]):
            sid, up = servers[(domain, lport)][path]
            lines += [
                "",
                "    # site {}".format(sid),
                "    location {} {{".format(path),
                "        proxy_pass http://{};".format(up),
                "        proxy_set_header Host $host;",
                "        proxy_set_header X-Real-IP $remote_addr;",
                "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                "        proxy_set_header X-Forwarded-Proto $scheme;",
                "        proxy_set_header X-Forwarded-Host $host;",
                "    }",
            ]
        lines.append("}")
    lines.append("")
    return "\n".join(lines).encode(), servers


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_atomic(path, data, mode=0o644):
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = "{}.new".format(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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


def restore(path, old):
    if old is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        write_atomic(path, old)


def main():
    spec = json.load(sys.stdin)
    pillar = spec.get("pillar")
    if not isinstance(pillar, dict):
        raise Failure("no pillar steward:hostfwd (the dispatcher sends it with state.apply)")
    s = spec["settings"]
    args = s.get("nginx_args") or []
    if isinstance(args, str):
        args = shlex.split(args)
    nginx = [s["nginx"]] + [str(a) for a in args]
    path = s["site_file"]

    text, servers = render(pillar, s.get("listen_address"))
    revision = pillar["revision"]
    ours = {d for (d, _) in servers}
    old = read(path)
    if old == text:
        out(False, "hostname forwards already at revision {} ({} servers)".format(revision, len(servers)))

    # Staged beside the live file (same file system: the swap is a rename),
    # then the whole configuration is tested with it in place.
    write_atomic(path, text)
    rc, output = run(nginx + ["-t"])
    conflicts = [m.group(0) for m in CONFLICT_RE.finditer(output) if m.group(1).lower() in ours]
    if rc != 0 or conflicts:
        restore(path, old)
        why = "nginx -t failed" if rc != 0 else "nginx -t warned of a server name that is also served elsewhere"
        raise Failure(
            "{} (the previous {} is back in place, nginx not reloaded):\n{}".format(
                why, path if old is not None else "state, without " + path, output.strip()
            )
        )
    rc, reload_out = run(nginx + ["-s", "reload"])
    if rc != 0:
        restore(path, old)
        raise Failure(
            "nginx -s reload failed (the previous file is back in place):\n{}".format(reload_out.strip())
        )
    out(
        True,
        "hostname forwards at revision {} applied, nginx reloaded".format(revision),
        {
            "revision": revision,
            "site_file": path,
            "servers": ["{}:{}".format(d, p) for (d, p) in sorted(servers)],
            "reloaded": True,
        },
    )


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        out(False, str(e), ok=False)
    except Exception as e:  # the state fails with the reason, not a traceback
        out(False, "steward.hostfwd apply failed: {}: {}".format(type(e).__name__, e), ok=False)
