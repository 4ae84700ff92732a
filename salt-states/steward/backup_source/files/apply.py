"""Grants salt-steward's backup servers a read-only pull (steward.backup_source).

Reads one JSON object on stdin:

    {"pillar": {revision, target, authorized: [{id, folder, pubkey}]},
     "settings": {authorized_keys, rrsync, host_keys_dir},
     "minion": {id}}

and makes ``authorized_keys`` hold exactly our lines, one per backup:

    command="<rrsync> -ro <folder>",restrict <type> <base64> steward-backup-<id>

``rrsync -ro`` lets the key run nothing but a read-only rsync of that folder
(``restrict``: no pty, no forwarding, no agent, no X11, no user rc). Lines
of other tools stay byte for byte, in place; ours go where the first of ours
was (at the end the first time); lines of backups no longer listed go. A
backup whose ``pubkey`` is empty (the backup server's key is not known yet)
is skipped and said so. The file is created 0600 in a 0700 directory.

It reports the host's SSH host public keys (``host_keys_dir/ssh_host_*_key.pub``)
on every run, as ``host_keys``: the backup server pins them. Salt keeps the
keys of the printed object only when ``changed`` is true, so the comment's
last line always carries them too (``steward.backup_source report: {"host_keys":
[...]}``). Exits non-zero on failure. Standard library only.
"""

import base64
import glob
import json
import os
import re
import sys

REPORT_PREFIX = "steward.backup_source report: "
OURS_RE = re.compile(r"\ssteward-backup-(\d+)\s*$")
FOLDER_RE = re.compile(r"^/[A-Za-z0-9._/@+,:=~%-]*$")
KEY_TYPES = {
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
}

REPORT = {"host_keys": []}


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


def folder(what, value):
    text = str(value or "")
    parts = text.split("/")
    if not FOLDER_RE.match(text) or ".." in parts:
        raise Failure(
            "{} {!r}: not an absolute folder of letters, digits and ._/@+,:=~%- "
            "(no spaces, quotes or ..)".format(what, value)
        )
    return "/" + "/".join(p for p in parts if p not in ("", "."))


def host_keys(directory):
    keys = []
    for path in sorted(glob.glob(os.path.join(directory, "ssh_host_*_key.pub"))):
        try:
            with open(path) as f:
                line = f.read().strip()
            keys.append(public_key(path, line))
        except (OSError, Failure):
            continue
    return keys


def write_atomic(path, data, mode):
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


def main():
    spec = json.load(sys.stdin)
    s = spec.get("settings") or {}
    minion = spec.get("minion") or {}
    REPORT["host_keys"] = host_keys(s["host_keys_dir"])
    pillar = spec.get("pillar")
    if not isinstance(pillar, dict):
        raise Failure("no pillar steward:backup_source (the dispatcher sends it with state.apply)")
    if str(pillar.get("target")) != str(minion.get("id")):
        raise Failure(
            "pillar steward:backup_source is for {!r}, this minion is {!r}: refused".format(
                pillar.get("target"), minion.get("id")
            )
        )
    revision = pillar.get("revision")
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise Failure("pillar steward:backup_source:revision {!r}: not an integer".format(revision))
    rrsync = str(s.get("rrsync") or "")
    if not FOLDER_RE.match(rrsync):
        raise Failure("setting steward:backup_source:rrsync {!r}: not an absolute path".format(rrsync))
    path = str(s.get("authorized_keys") or "")
    if not path.startswith("/"):
        raise Failure("setting steward:backup_source:authorized_keys {!r}: not an absolute path".format(path))

    wanted, skipped, seen, absent = {}, [], set(), []
    for a in pillar.get("authorized") or []:
        bid = a.get("id")
        if isinstance(bid, bool) or not isinstance(bid, int) or bid < 1:
            raise Failure("authorized entry id {!r}: not a positive integer".format(bid))
        if bid in seen:
            raise Failure("backup {} is listed twice".format(bid))
        seen.add(bid)
        what = "backup {}".format(bid)
        d = folder("{} folder".format(what), a.get("folder"))
        if not str(a.get("pubkey") or "").strip():
            skipped.append(bid)
            continue
        key = public_key("{} pubkey".format(what), a.get("pubkey"))
        if not os.path.isdir(d):
            absent.append(bid)
        wanted[bid] = 'command="{} -ro {}",restrict {} steward-backup-{}'.format(rrsync, d, key, bid)
    if wanted and not os.access(rrsync, os.X_OK):
        raise Failure(
            "{} is missing: the forced command of our keys (Debian's rsync package ships "
            "/usr/bin/rrsync since 3.2.4); nothing written".format(rrsync)
        )

    try:
        with open(path, "rb") as f:
            old = f.read()
    except FileNotFoundError:
        old = None
    lines = (old or b"").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    kept, ours_at, had, had_lines, contiguous = [], None, [], [], True
    for line in lines:
        m = OURS_RE.search(line.decode("utf-8", "replace"))
        if m:
            had.append(int(m.group(1)))
            had_lines.append(line)
            if ours_at is None:
                ours_at = len(kept)
            elif len(kept) != ours_at:
                contiguous = False
            continue
        kept.append(line)
    if ours_at is None:
        ours_at = len(kept)
    ours = [wanted[bid].encode() for bid in sorted(wanted)]
    unchanged = had_lines == ours and contiguous
    # Others' lines byte for byte, in their order (a last line without its
    # newline gets one); ours together where the first of ours was.
    new = b"".join(l + b"\n" for l in kept[:ours_at] + ours + kept[ours_at:])

    removed = sorted(set(had) - set(wanted))
    parts = ["read-only keys at revision {}: {}".format(revision, sorted(wanted))]
    if skipped:
        parts.append("skipped, the backup server's key is not known yet: {}".format(sorted(skipped)))
    if removed:
        parts.append("removed: {}".format(removed))
    if absent:
        parts.append("folder missing on this host, those backups will fail: {}".format(sorted(absent)))
    comment = "; ".join(parts)
    if unchanged:
        out(False, comment)
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        os.makedirs(d, mode=0o700)
        os.chmod(d, 0o700)
    mode = os.stat(path).st_mode & 0o7777 if old is not None else 0o600
    write_atomic(path, new, mode)
    out(
        True,
        comment,
        {
            "revision": revision,
            "authorized_keys": path,
            "authorized": sorted(wanted),
            "skipped": sorted(skipped),
            "removed": removed,
        },
    )


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        out(False, str(e), ok=False)
    except Exception as e:  # the state fails with the reason, not a traceback
        out(False, "steward.backup_source apply failed: {}: {}".format(type(e).__name__, e), ok=False)
