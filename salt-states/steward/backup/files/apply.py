"""Applies salt-steward's backups on the backup server (steward.backup).

Reads one JSON object on stdin:

    {"pillar": {revision, target,
                backups: [{id, source: {host, port, user}, source_folder,
                           dest_folder, excludes, exclude_proc_sys, active,
                           known_hosts, retain: [{level, count, cron}]}]},
     "settings": {state_dir, cron_file, rsnapshot, rsync, ssh, ssh_keygen,
                  salt_call},
     "minion": {id, conf_dir}, "wrapper_source": <path of run.py>}

and makes this server pull exactly those backups:

- one SSH key, generated once (``<state_dir>/id_ed25519``, 0600, in a 0700
  dir); its public line is reported as ``pubkey`` on every run;
- ``<state_dir>/known_hosts``: the sources' host keys, rendered whole; ssh
  always runs with ``StrictHostKeyChecking=yes`` against it;
- per backup ``<state_dir>/<id>/rsnapshot.conf`` (TAB-separated, its own
  lockfile, ``sync_first``, ``link_dest``, ``no_create_root``, rsync's
  ``--stats --no-human-readable``), checked with ``rsnapshot -c <candidate>
  configtest`` before it replaces the live file: one refused candidate fails
  the state with rsnapshot's message and no live file changes;
- ``<state_dir>/<id>/backup.json``: what the wrapper needs to run it;
- each destination folder dedicated to its backup by a marker file
  (``.salt-steward-backup`` holding the id): a non-empty folder without our
  marker, or with another backup's, is refused and nothing is written there;
- the wrapper ``<state_dir>/steward-backup-run`` (``run.py`` with this
  Python in its ``#!`` line) and ``<state_dir>/rsync-recorder`` (rsnapshot's
  ``cmd_rsync``: rsync, recording its exit code for the wrapper);
- ONE cron file (``cron_file``): a line per level of every active backup
  whose source host keys are known;
- backups no longer listed lose their cron lines and configuration; their
  snapshots and results stay.

Prints one JSON object for Salt's ``cmd.run stateful: True`` and exits
non-zero on failure. Salt keeps the keys of that object only when ``changed``
is true, so the comment's last line always carries the report the dispatcher
reads (``steward.backup report: {"pubkey": ..., "results": [...]}``).
Standard library only: it runs under the minion's own Python.
"""

import base64
import json
import os
import re
import shlex
import subprocess
import sys

MARKER = ".salt-steward-backup"
KEY = "id_ed25519"
WRAPPER = "steward-backup-run"
RECORDER = "rsync-recorder"
REPORT_PREFIX = "steward.backup report: "

HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
# Folders go into rsnapshot's config, ssh's forced command (on the source)
# and cron: a conservative character set, no whitespace, no quotes.
FOLDER_RE = re.compile(r"^/[A-Za-z0-9._/@+,:=~%-]*$")
LEVEL_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
CRON_FIELD_RE = re.compile(r"^[A-Za-z0-9*/,-]+$")
KEY_TYPES = {
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
}

REPORT = {"pubkey": None, "results": []}


class Failure(Exception):
    pass


def out(changed, comment, changes=None, ok=True):
    data = {"changed": changed}
    data.update(changes or {})
    data.update(REPORT)
    data["comment"] = "{}\n{}{}".format(comment, REPORT_PREFIX, json.dumps(REPORT, sort_keys=True))
    sys.stdout.write(json.dumps(data, sort_keys=True))
    sys.stdout.write("\n")
    sys.exit(0 if ok else 1)


def run(argv, timeout=120):
    try:
        p = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            universal_newlines=True,
            timeout=timeout,
        )
    except FileNotFoundError:
        raise Failure("{}: command not found".format(argv[0]))
    except subprocess.TimeoutExpired:
        raise Failure("{}: no answer within {} s".format(" ".join(argv), timeout))
    return p.returncode, p.stdout


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_atomic(path, data, mode):
    """Writes ``data`` (bytes) to ``path`` through ``path.new`` and a rename."""
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


def converge(path, data, mode):
    """Makes ``path`` hold ``data`` with ``mode``; True when it changed."""
    old = read(path)
    if old == data:
        if os.stat(path).st_mode & 0o7777 != mode:
            os.chmod(path, mode)
            return True
        return False
    write_atomic(path, data, mode)
    return True


def remove(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


# ---- validation ----


def integer(what, value, low=None):
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise Failure("{} {!r}: not an integer{}".format(what, value, "" if low is None else " >= {}".format(low)))
    return value


def folder(what, value):
    text = str(value or "")
    parts = text.split("/")
    if not FOLDER_RE.match(text) or ".." in parts:
        raise Failure(
            "{} {!r}: not an absolute folder of letters, digits and ._/@+,:=~%- "
            "(no spaces, quotes or ..)".format(what, value)
        )
    return "/" + "/".join(p for p in parts if p not in ("", "."))


def public_key(what, line):
    """``type base64`` of an OpenSSH public key line (its comment dropped)."""
    parts = str(line or "").split()
    if len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise Failure("{} {!r}: not an OpenSSH public key line (type base64 [comment])".format(what, line))
    try:
        blob = base64.b64decode(parts[1].encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise Failure("{} {!r}: the key is not base64".format(what, line))
    n = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4 : 4 + n].decode("ascii", "replace") != parts[0]:
        raise Failure("{} {!r}: the key does not hold a {} key".format(what, line, parts[0]))
    return "{} {}".format(parts[0], parts[1])


def exclude(what, value):
    text = str(value if value is not None else "")
    if not text or text != text.strip() or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise Failure("{} {!r}: empty, padded with spaces or holding a control character".format(what, value))
    # rsnapshot splits its exclude arguments on whitespace and honours quotes.
    if '"' not in text:
        return '"{}"'.format(text)
    if "'" not in text:
        return "'{}'".format(text)
    raise Failure("{} {!r}: holds both kinds of quotes".format(what, value))


def cron_spec(what, value):
    text = str(value or "")
    fields = text.split()
    if len(fields) != 5 or not all(CRON_FIELD_RE.match(f) for f in fields):
        raise Failure("{} {!r}: not five cron fields (minute hour day month weekday)".format(what, value))
    return " ".join(fields)


def validate(pillar):
    revision = integer("pillar steward:backup:revision", pillar.get("revision"))
    backups = pillar.get("backups")
    if backups is None:
        backups = []
    if not isinstance(backups, list):
        raise Failure("pillar steward:backup:backups: not a list")
    result = []
    seen = {}
    for b in backups:
        if not isinstance(b, dict):
            raise Failure("backup {!r}: not a mapping".format(b))
        bid = integer("backup id", b.get("id"), 1)
        what = "backup {}".format(bid)
        if bid in seen:
            raise Failure("{} is listed twice".format(what))
        src = b.get("source") or {}
        host = str(src.get("host") or "")
        if not HOST_RE.match(host):
            raise Failure("{} source host {!r}: not a host name or IPv4 address".format(what, host))
        port = src.get("port", 22)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise Failure("{} source port {!r}: not a port number".format(what, port))
        user = str(src.get("user") or "root")
        if not USER_RE.match(user):
            raise Failure("{} source user {!r}: not a user name".format(what, user))
        source_folder = folder("{} source_folder".format(what), b.get("source_folder"))
        dest = folder("{} dest_folder".format(what), b.get("dest_folder"))
        if dest == "/":
            raise Failure("{} dest_folder is /".format(what))
        excludes = [exclude("{} exclude".format(what), e) for e in (b.get("excludes") or [])]
        if b.get("exclude_proc_sys"):
            excludes += ['"/proc"', '"/sys"']
        retain = b.get("retain") or []
        if not isinstance(retain, list) or not retain:
            raise Failure("{} retain: no levels".format(what))
        levels = []
        for r in retain:
            level = str((r or {}).get("level") or "")
            if not LEVEL_RE.match(level) or level == "sync":
                raise Failure("{} retain level {!r}: not a name of letters and digits (nor 'sync')".format(what, level))
            if level in [lv["level"] for lv in levels]:
                raise Failure("{} retain level {} is listed twice".format(what, level))
            levels.append(
                {
                    "level": level,
                    "count": integer("{} retain {} count".format(what, level), r.get("count"), 1),
                    "cron": cron_spec("{} retain {} cron".format(what, level), r.get("cron")),
                }
            )
        if len(levels) > 1 and levels[0]["count"] < 2:
            raise Failure(
                "{} retain {}: count {} — a level above it needs at least 2 to rotate from".format(
                    what, levels[0]["level"], levels[0]["count"]
                )
            )
        keys = []
        for k in b.get("known_hosts") or []:
            key = public_key("{} known_hosts".format(what), k)
            if key not in keys:
                keys.append(key)
        entry = {
            "id": bid,
            "host": host,
            "port": port,
            "user": user,
            "source_folder": source_folder,
            "dest_folder": dest,
            "excludes": excludes,
            "active": b.get("active", True) is not False,
            "known_hosts": keys,
            "levels": levels,
        }
        seen[bid] = entry
        result.append(entry)
    dests = sorted((e["dest_folder"], e["id"]) for e in result)
    for (d1, i1), (d2, i2) in zip(dests, dests[1:]):
        if d1 == d2:
            raise Failure("backups {} and {} share dest_folder {}: a destination is dedicated to one backup".format(i1, i2, d1))
        if d2.startswith(d1 + "/"):
            raise Failure("backup {}'s dest_folder {} is inside backup {}'s {}".format(i2, d2, i1, d1))
    return revision, result


def check_dest(entry):
    """Refuses a destination that is not ours: 'create', 'mark' or None (ours)."""
    d = entry["dest_folder"]
    if not os.path.lexists(d):
        return "create"
    if os.path.islink(d) or not os.path.isdir(d):
        raise Failure("backup {}: dest_folder {} exists and is not a directory".format(entry["id"], d))
    marker = os.path.join(d, MARKER)
    text = read(marker)
    if text is not None:
        owner = text.decode("utf-8", "replace").strip()
        if owner != str(entry["id"]):
            raise Failure(
                "backup {}: dest_folder {} belongs to backup {} (its {} says so); refused".format(
                    entry["id"], d, owner, MARKER
                )
            )
        return None
    if os.listdir(d):
        raise Failure(
            "backup {}: dest_folder {} is not empty and was not created by salt-steward "
            "(no {}); refused, nothing written there (rsync would delete what is in it)".format(
                entry["id"], d, MARKER
            )
        )
    return "mark"


# ---- rendering ----


def known_host_name(host, port):
    # ssh looks a host up as "[host]:port" except on its default port 22.
    return host if port == 22 else "[{}]:{}".format(host, port)


def render_known_hosts(entries):
    lines = set()
    for e in entries:
        for k in e["known_hosts"]:
            lines.add("{} {}".format(known_host_name(e["host"], e["port"]), k))
    head = [
        "# Managed by salt-steward (steward.backup): the sources' SSH host keys,",
        "# rendered whole on every apply; do not edit.",
    ]
    return ("\n".join(head + sorted(lines)) + "\n").encode()


def render_conf(entry, s):
    state_dir = s["state_dir"]
    bdir = os.path.join(state_dir, str(entry["id"]))
    ssh_args = " ".join(
        [
            "-i",
            os.path.join(state_dir, KEY),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "UserKnownHostsFile={}".format(os.path.join(state_dir, "known_hosts")),
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-p",
            str(entry["port"]),
        ]
    )
    rows = [
        ("config_version", "1.2"),
        ("snapshot_root", entry["dest_folder"].rstrip("/") + "/"),
        ("no_create_root", "1"),
        ("cmd_cp", "/bin/cp"),
        ("cmd_rm", "/bin/rm"),
        ("cmd_rsync", os.path.join(state_dir, RECORDER)),
        ("cmd_ssh", s["ssh"]),
        ("lockfile", os.path.join(bdir, "rsnapshot.pid")),
        ("sync_first", "1"),
        ("link_dest", "1"),
        ("verbose", "2"),
        ("rsync_short_args", "-a"),
        ("rsync_long_args", "--delete --numeric-ids --delete-excluded --stats --no-human-readable"),
        ("ssh_args", ssh_args),
    ]
    rows += [("retain", lv["level"], str(lv["count"])) for lv in entry["levels"]]
    rows += [("exclude", x) for x in entry["excludes"]]
    # rrsync -ro <source_folder> on the source maps "/" to that folder.
    rows.append(("backup", "{}@{}:/".format(entry["user"], entry["host"]), "./"))
    lines = [
        "# Managed by salt-steward (steward.backup): backup {}, {}:{} from {}.".format(
            entry["id"], entry["host"], entry["source_folder"], entry["user"]
        ),
        "# Do not edit: the next apply replaces it. Fields are TAB-separated.",
    ]
    lines += ["\t".join(r) for r in rows]
    return ("\n".join(lines) + "\n").encode()


def runnable_why(entry):
    if not entry["known_hosts"]:
        return "the source's SSH host keys are not collected yet"
    return ""


def render_backup_json(entry, s, minion):
    data = {
        "id": entry["id"],
        "source": "{}@{}:{}".format(entry["user"], entry["host"], entry["source_folder"]),
        "dest_folder": entry["dest_folder"],
        "levels": [{"level": lv["level"], "count": lv["count"]} for lv in entry["levels"]],
        "conf": os.path.join(s["state_dir"], str(entry["id"]), "rsnapshot.conf"),
        "rsnapshot": s["rsnapshot"],
        "salt_call": s["salt_call"],
        "minion_conf_dir": minion["conf_dir"],
        "active": entry["active"],
        "not_runnable": runnable_why(entry),
    }
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def render_recorder(rsync):
    return (
        "#!/bin/sh\n"
        "# Installed by salt-steward (steward.backup): rsnapshot's cmd_rsync. Run by\n"
        "# steward-backup-run (STEWARD_BACKUP_RSYNC=<prefix> set), it runs rsync with its\n"
        "# output into <prefix>.out and its exit code into <prefix>.exit: rsnapshot\n"
        "# itself only tells warning or error. Run by hand, it is plain rsync.\n"
        'if [ -z "${{STEWARD_BACKUP_RSYNC:-}}" ]; then\n'
        '    exec {rsync} "$@"\n'
        "fi\n"
        '{rsync} "$@" >"$STEWARD_BACKUP_RSYNC.out" 2>&1\n'
        "rc=$?\n"
        'echo "$rc" >"$STEWARD_BACKUP_RSYNC.exit"\n'
        'exit "$rc"\n'
    ).format(rsync=shlex.quote(rsync)).encode()


def render_wrapper(source_path):
    with open(source_path, "rb") as f:
        body = f.read()
    if body.startswith(b"#!"):
        body = body.split(b"\n", 1)[1]
    return "#!{}\n".format(sys.executable).encode() + body


def render_cron(entries, s):
    wrapper = os.path.join(s["state_dir"], WRAPPER)
    lines = [
        "# Managed by salt-steward (steward.backup): every backup this server pulls,",
        "# one line per level; do not edit, the next apply replaces it.",
        "SHELL=/bin/sh",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ]
    for e in sorted(entries, key=lambda e: e["id"]):
        if not e["active"] or runnable_why(e):
            continue
        for lv in e["levels"]:
            lines.append("{} root {} --id {} --level {}".format(lv["cron"], wrapper, e["id"], lv["level"]))
    return ("\n".join(lines) + "\n").encode()


# ---- steps ----


def ensure_key(s, minion):
    """Generates the key once; returns (public line, whether it was made)."""
    key = os.path.join(s["state_dir"], KEY)
    made = False
    if not os.path.exists(key):
        rc, output = run(
            [s["ssh_keygen"], "-q", "-t", "ed25519", "-N", "", "-C", "salt-steward-backup@{}".format(minion["id"]), "-f", key]
        )
        if rc != 0:
            raise Failure("ssh-keygen failed: {}".format(output.strip()))
        made = True
    os.chmod(key, 0o600)
    pub = read(key + ".pub")
    if pub is None:
        rc, output = run([s["ssh_keygen"], "-y", "-f", key])
        if rc != 0:
            raise Failure("ssh-keygen -y failed: {}".format(output.strip()))
        pub = output.encode()
        write_atomic(key + ".pub", pub, 0o644)
        made = True
    return pub.decode().strip(), made


def last_results(state_dir, ids):
    results = []
    for bid in sorted(ids):
        text = read(os.path.join(state_dir, str(bid), "last.json"))
        if text is None:
            continue
        try:
            results.append(json.loads(text.decode("utf-8")))
        except ValueError:
            continue
    return results


def configtest(s, path):
    rc, output = run([s["rsnapshot"], "-c", path, "configtest"])
    return rc == 0 and "Syntax OK" in output, output.strip()


def settings(spec):
    s = dict(spec.get("settings") or {})
    for k in ("state_dir", "cron_file"):
        v = str(s.get(k) or "")
        if not v.startswith("/") or any(c.isspace() for c in v):
            raise Failure("setting steward:backup:{} {!r}: not an absolute path without spaces".format(k, v))
        s[k] = os.path.normpath(v)
    if not s.get("salt_call"):
        here = os.path.dirname(sys.executable)
        candidates = [os.path.join(here, "salt-call"), os.path.join(os.path.dirname(here), "salt-call")]
        s["salt_call"] = next((c for c in candidates if os.access(c, os.X_OK)), "salt-call")
    return s


def main():
    spec = json.load(sys.stdin)
    s = settings(spec)
    minion = spec.get("minion") or {}
    pillar = spec.get("pillar")
    if not isinstance(pillar, dict):
        raise Failure("no pillar steward:backup (the dispatcher sends it with state.apply)")
    if str(pillar.get("target")) != str(minion.get("id")):
        raise Failure(
            "pillar steward:backup is for {!r}, this minion is {!r}: refused".format(pillar.get("target"), minion.get("id"))
        )
    state_dir = s["state_dir"]
    changes = {}
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    if os.stat(state_dir).st_mode & 0o777 != 0o700:
        os.chmod(state_dir, 0o700)
    REPORT["pubkey"], made = ensure_key(s, minion)
    if made:
        changes["key"] = os.path.join(state_dir, KEY)

    revision, entries = validate(pillar)
    ids = {e["id"] for e in entries}
    REPORT["results"] = last_results(state_dir, ids)

    # Every destination is checked before anything is written to any.
    todo = [(e, check_dest(e)) for e in entries]

    created = []
    for e, what in todo:
        d = e["dest_folder"]
        if what == "create":
            os.makedirs(d, mode=0o700)
        if what in ("create", "mark"):
            write_atomic(os.path.join(d, MARKER), "{}\n".format(e["id"]).encode(), 0o644)
            created.append(d)
    if created:
        changes["dest_folders"] = created

    # The programs the configurations run (configtest checks cmd_rsync).
    if converge(os.path.join(state_dir, RECORDER), render_recorder(s["rsync"]), 0o700):
        changes["rsync_recorder"] = os.path.join(state_dir, RECORDER)
    if converge(os.path.join(state_dir, WRAPPER), render_wrapper(spec["wrapper_source"]), 0o700):
        changes["wrapper"] = os.path.join(state_dir, WRAPPER)

    # Candidates of every configuration, each checked by rsnapshot, before
    # any live one is replaced.
    staged = []
    try:
        for e in entries:
            bdir = os.path.join(state_dir, str(e["id"]))
            os.makedirs(bdir, mode=0o700, exist_ok=True)
            conf = os.path.join(bdir, "rsnapshot.conf")
            text = render_conf(e, s)
            if read(conf) == text:
                continue
            cand = conf + ".candidate"
            write_atomic(cand, text, 0o600)
            staged.append((e["id"], cand, conf))
            ok, output = configtest(s, cand)
            if not ok:
                raise Failure(
                    "backup {}: rsnapshot configtest refused the new configuration (the previous {} is kept):\n{}".format(
                        e["id"], conf if os.path.exists(conf) else "state, without " + conf, output
                    )
                )
    except BaseException:
        for _, cand, _ in staged:
            remove(cand)
        raise

    # The host keys the configurations trust.
    if converge(os.path.join(state_dir, "known_hosts"), render_known_hosts(entries), 0o644):
        changes["known_hosts"] = os.path.join(state_dir, "known_hosts")

    configs = []
    for bid, cand, conf in staged:
        os.rename(cand, conf)
        configs.append(bid)
    for e in entries:
        bdir = os.path.join(state_dir, str(e["id"]))
        if converge(os.path.join(bdir, "backup.json"), render_backup_json(e, s, minion), 0o600) and e["id"] not in configs:
            configs.append(e["id"])
    if configs:
        changes["configs"] = sorted(configs)

    # Backups no longer listed: configuration out, results and snapshots kept.
    removed = []
    for name in sorted(os.listdir(state_dir)):
        if not name.isdigit() or int(name) in ids:
            continue
        bdir = os.path.join(state_dir, name)
        gone = [remove(os.path.join(bdir, f)) for f in ("rsnapshot.conf", "backup.json")]
        if any(gone):
            removed.append(int(name))
    if removed:
        changes["removed"] = removed

    cron_dir = os.path.dirname(s["cron_file"])
    os.makedirs(cron_dir, exist_ok=True)
    if converge(s["cron_file"], render_cron(entries, s), 0o644):
        changes["cron_file"] = s["cron_file"]

    scheduled = [e["id"] for e in entries if e["active"] and not runnable_why(e)]
    waiting = [e["id"] for e in entries if runnable_why(e)]
    inactive = [e["id"] for e in entries if not e["active"] and not runnable_why(e)]
    parts = ["backups at revision {}: {} scheduled {}".format(revision, len(scheduled), scheduled)]
    if inactive:
        parts.append("inactive (configured, not scheduled): {}".format(inactive))
    if waiting:
        parts.append(
            "not runnable yet, the sources' SSH host keys are not collected: {}".format(waiting)
        )
    if removed:
        parts.append("removed (snapshots kept): {}".format(removed))
    comment = "; ".join(parts)
    info = {"revision": revision, "scheduled": scheduled, "waiting_host_keys": waiting, "inactive": inactive}
    if changes:
        changes.update(info)
        out(True, comment, changes)
    out(False, comment)


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        out(False, str(e), ok=False)
    except Exception as e:  # the state fails with the reason, not a traceback
        out(False, "steward.backup apply failed: {}: {}".format(type(e).__name__, e), ok=False)
