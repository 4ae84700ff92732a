"""Applies salt-steward's samba shares on the samba server (steward.share).

Reads one JSON object on stdin:

    {"pillar": {revision, target, base,
                shares: [{id, name, folder, user, nt_hash_enc}]},
     "minion_id": "<this minion's id>",
     "settings": {smb_conf, shares_file, state_dir, minion_key, testparm,
                  pdbedit, smbcontrol, useradd, userdel, nologin,
                  share_options}}

and makes smbd serve exactly those shares:

- every share's folder must stay inside the base folder: ``realpath(base/
  folder)`` under ``realpath(base)``, checked now (``..``, an absolute folder
  and a symlink leading out are refused); a refused share is not served
  (left out of the shares file), the others are applied, the state fails;
- one system user per share (``useradd --system --no-create-home
  --user-group --shell nologin --home-dir <folder>``) when missing; a user
  that exists but was not created by us is refused (the pillar must not
  hand out an existing account such as root); the users we create are
  recorded in ``<state_dir>/users.json``;
- the folder, when missing: owner the share user, its group, mode 0770
  (parents root 0755); an existing folder is left as it is, data never
  deleted;
- the passdb entry set from the NT hash, decrypted here with the minion's
  own RSA key (RSA-OAEP, MGF1+SHA-256, empty label): compared first
  (``pdbedit -L -w``), so the same hash changes nothing; otherwise imported
  with ``pdbedit -i smbpasswd:/proc/self/fd/N`` from an in-memory file
  (memfd) handed to pdbedit as an inherited descriptor: the hash is never
  on a command line (``/proc/*/cmdline`` is world-readable), never on disk,
  never printed (``pdbedit --set-nt-hash`` only takes it as an argument);
- ONE shares file for all our shares (``shares_file``), rendered whole and
  validated BEFORE it is written: testparm on the file alone (a non-zero
  exit, or an "Unknown parameter"/"Ignoring unknown parameter"/ERROR line,
  on which testparm still exits 0, refuses it) and on a copy of smb.conf
  that includes it (must load); a refused candidate is never written, the
  live file stays and smbd keeps serving it, the state fails with
  testparm's message. A share name that is also a section of smb.conf
  itself (an admin's share) is refused: samba would merge the two;
- ``include = <shares_file>`` appended to smb.conf when missing (that line
  and a comment above it are ours, the rest of smb.conf is untouched);
- after a change, ``smbcontrol -s <smb_conf> smbd reload-config`` (and
  ``close-share`` for the shares that went away);
- users that left the pillar (and that we created): ``pdbedit -x``, then
  ``userdel`` (not -r); their folders stay, made root's (0700, the top
  folder only) since the freed uid would go to the next system user created
  along with the data; a share added again on such a folder hands it to its
  (new) user: the entries of the old uid/gid are re-owned.

Prints one JSON object for Salt's ``cmd.run stateful: True`` (never the
hash) and exits non-zero on failure. Needs the ``cryptography`` package of
the minion's own Python (Salt's) for the RSA decryption; nothing else outside
the standard library.
"""

import base64
import binascii
import json
import os
import posixpath
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time

SHARE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
USER_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
FOLDER_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+ -]*$")
HASH_RE = re.compile(r"^[0-9a-f]{32}$")
OPTION_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9 :_.-]*$")
# Section names samba treats specially: never one of ours.
RESERVED = {"global", "homes", "printers", "print$", "ipc$"}
# testparm exits 0 on these: they refuse a candidate all the same.
TESTPARM_BAD_RE = re.compile(
    r"(Unknown parameter encountered|Ignoring unknown parameter|ERROR|Error loading|"
    r"Ignoring invalid value|value is not boolean|Badly formed)",
    re.IGNORECASE,
)
INCLUDE_RE = re.compile(r"^\s*include\s*=\s*(.*?)\s*$", re.IGNORECASE)
SECTION_RE = re.compile(r"^\[(.*)\]\s*$")
MARK = "# salt-steward (steward.share): our shares; this line and the next are ours"


class Failure(Exception):
    pass


def out(changed, comment, changes=None, ok=True):
    data = {"changed": changed, "comment": comment}
    data.update(changes or {})
    sys.stdout.write(json.dumps(data, sort_keys=True))
    sys.stdout.write("\n")
    sys.exit(0 if ok else 1)


def run(argv, cwd=None, pass_fds=()):
    try:
        p = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
            timeout=60,
            cwd=cwd,
            pass_fds=pass_fds,
        )
    except FileNotFoundError:
        raise Failure("{}: command not found".format(argv[0]))
    except subprocess.TimeoutExpired:
        raise Failure("{}: no answer within 60 s".format(" ".join(argv)))
    return p.returncode, p.stdout, p.stderr


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_atomic(path, data, mode=0o644, like=None):
    """Writes `data` beside `path` and renames it over `path`; owner and mode
    of `like` (an os.stat_result) when given."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".{}.".format(os.path.basename(path)), dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if like is not None:
            os.chown(tmp, like.st_uid, like.st_gid)
            os.chmod(tmp, like.st_mode & 0o7777)
        else:
            os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------- state file


def load_state(state_dir):
    data = read(os.path.join(state_dir, "users.json"))
    if data is None:
        return {"users": {}}
    try:
        state = json.loads(data.decode())
        if not isinstance(state.get("users"), dict):
            raise ValueError("no users object")
        return state
    except ValueError as e:
        raise Failure("{}/users.json is unreadable ({}): fix or remove it".format(state_dir, e))


def save_state(state_dir, state):
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)
    text = json.dumps(state, sort_keys=True, indent=1) + "\n"
    write_atomic(os.path.join(state_dir, "users.json"), text.encode(), mode=0o600)


# ---------------------------------------------------------------- the pillar


def check_pillar(pillar, minion_id):
    if not isinstance(pillar, dict):
        raise Failure("no pillar steward:share (the dispatcher sends it with state.apply)")
    revision = pillar.get("revision")
    if isinstance(revision, bool) or not isinstance(revision, int):
        raise Failure("pillar steward:share:revision {!r}: not an integer".format(revision))
    target = pillar.get("target")
    if target != minion_id:
        raise Failure(
            "pillar steward:share is for {!r}, this minion is {!r}: refused".format(target, minion_id)
        )
    base = pillar.get("base")
    if not isinstance(base, str) or not base.startswith("/") or not safe_path(base):
        raise Failure("base {!r}: not an absolute path of plain characters".format(base))
    shares = pillar.get("shares") or []
    if not isinstance(shares, list):
        raise Failure("shares: not a list")
    names, users, folders = {}, {}, {}
    checked = []
    for s in shares:
        if not isinstance(s, dict):
            raise Failure("shares: {!r} is not an object".format(s))
        sid = s.get("id")
        name = s.get("name")
        user = s.get("user")
        if not isinstance(name, str) or not SHARE_NAME_RE.match(name) or name.lower() in RESERVED:
            raise Failure(
                "share {}: name {!r} refused (letters, digits, '_', '.', '-', at most 80, "
                "first a letter or digit; not global/homes/printers)".format(sid, name)
            )
        if not isinstance(user, str) or not USER_RE.match(user):
            raise Failure(
                "share {} ({}): user {!r} refused (a-z first, then a-z 0-9 '_' '-', at most 32)".format(
                    sid, name, user
                )
            )
        if name.lower() in names:
            raise Failure("share name {!r} twice (shares {} and {})".format(name, names[name.lower()], sid))
        if user in users:
            raise Failure("user {!r} twice (shares {} and {})".format(user, users[user], sid))
        names[name.lower()] = sid
        users[user] = sid
        enc = s.get("nt_hash_enc")
        if not isinstance(enc, str) or not enc:
            raise Failure("share {} ({}): no nt_hash_enc".format(sid, name))
        folder, why = check_folder(s.get("folder"))
        if folder is not None:
            if folder in folders:
                raise Failure("folder {!r} twice (shares {} and {})".format(folder, folders[folder], sid))
            folders[folder] = sid
        checked.append({"id": sid, "name": name, "user": user, "folder": folder, "enc": enc, "refused": why})
    return revision, base, checked


def safe_path(p):
    """Nothing samba would read as more than a path: no control character, no
    backslash (line continuation), no % (substitution), no edge blanks."""
    return (
        all(ord(c) >= 32 and c != "\x7f" for c in p)
        and "\\" not in p
        and "%" not in p
        and p == p.strip()
    )


def check_folder(folder):
    """(normalised relative folder, None) or (None, why it is refused)."""
    if not isinstance(folder, str) or not folder:
        return None, "folder {!r}: empty".format(folder)
    if folder.startswith("/"):
        return None, "folder {!r}: absolute (it is relative to base)".format(folder)
    parts = [p for p in folder.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "folder {!r}: contains '..'".format(folder)
    if not parts:
        return None, "folder {!r}: is base itself".format(folder)
    for p in parts:
        if not FOLDER_PART_RE.match(p) or p != p.strip():
            return None, "folder {!r}: component {!r} refused (letters, digits, '_', '.', '@', '+', '-', blanks inside)".format(
                folder, p
            )
    return "/".join(parts), None


def contained(base_real, folder):
    """realpath(base_real/folder) when it stays inside base_real, else raises."""
    path = os.path.join(base_real, folder)
    real = os.path.realpath(path)
    if os.path.commonpath([real, base_real]) != base_real or real == base_real:
        raise Failure("folder {!r}: leads out of base ({} resolves to {})".format(folder, path, real))
    if os.path.lexists(real) and not os.path.isdir(real):
        raise Failure("folder {!r}: {} exists and is not a directory".format(folder, real))
    if not safe_path(real):
        raise Failure("folder {!r}: resolves to {!r}, not a plain path".format(folder, real))
    return real


# ---------------------------------------------------------------- the hashes


def decrypter(key_path):
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding
    except ImportError as e:
        raise Failure("the minion's Python lacks the cryptography package ({})".format(e))
    try:
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise Failure("minion key {}: {}".format(key_path, e))
    pad = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)

    def decrypt(sid, name, enc):
        try:
            clear = key.decrypt(base64.b64decode(enc, validate=True), pad)
        except (ValueError, binascii.Error, TypeError):
            # No detail: nothing of the input or output goes to the output.
            raise Failure(
                "share {} ({}): nt_hash_enc does not decrypt with {} (RSA-OAEP SHA-256, "
                "encrypted for another key?)".format(sid, name, key_path)
            )
        try:
            text = clear.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if not HASH_RE.match(text):
            raise Failure("share {} ({}): nt_hash_enc is not 32 lowercase hex digits once decrypted".format(sid, name))
        return text

    return decrypt


# ---------------------------------------------------------------- testparm


def testparm(settings, conf, cwd):
    rc, o, e = run([settings["testparm"], "-s", conf], cwd=cwd)
    return rc, (o, e)


def sections_of(dump):
    return [m.group(1) for m in (SECTION_RE.match(l) for l in dump.splitlines()) if m]


def includes_ours(line, shares_file):
    m = INCLUDE_RE.match(line)
    return bool(m) and m.group(1) == shares_file


# ---------------------------------------------------------------- passdb


def passdb_entry(settings, user):
    """(nt hash lowercase, flags) of `user`'s passdb entry, or None."""
    rc, o, e = run([settings["pdbedit"], "-s", settings["smb_conf"], "-L", "-w", "-u", user])
    if rc != 0:
        if "not found" in (o + e) or "does not exist" in (o + e):
            return None
        # stdout may hold a hash line: only stderr in the message.
        raise Failure("pdbedit -L -w -u {} failed (exit {}): {}".format(user, rc, e.strip()))
    for line in o.splitlines():
        f = line.split(":")
        if len(f) >= 5 and f[0] == user:
            return f[3].lower(), f[4]
    return None


def passdb_set(settings, user, uid, nt_hash):
    """Imports `user` with `nt_hash` from an in-memory smbpasswd file (memfd):
    the hash reaches pdbedit through an inherited descriptor, never argv or a
    file on disk."""
    line = "{}:{}:{}:{}:[U          ]:LCT-{:08X}:\n".format(user, uid, "X" * 32, nt_hash.upper(), int(time.time()))
    fd = os.memfd_create("steward-share-passdb", os.MFD_CLOEXEC)
    try:
        os.write(fd, line.encode("ascii"))
        os.lseek(fd, 0, os.SEEK_SET)
        rc, o, e = run(
            [settings["pdbedit"], "-s", settings["smb_conf"], "-i", "smbpasswd:/proc/self/fd/{}".format(fd)],
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    got = passdb_entry(settings, user)
    if rc != 0 or got is None or got[0] != nt_hash:
        raise Failure("pdbedit import of {} failed (exit {}): {}".format(user, rc, (o + e).strip()))


def passdb_delete(settings, user):
    rc, o, e = run([settings["pdbedit"], "-s", settings["smb_conf"], "-x", "-u", user])
    if rc != 0 and "does not exist" not in (o + e) and "not found" not in (o + e):
        raise Failure("pdbedit -x -u {} failed (exit {}): {}".format(user, rc, (o + e).strip()))
    return rc == 0


# ---------------------------------------------------------------- users


def getpw(user):
    try:
        return pwd.getpwnam(user)
    except KeyError:
        return None


def lock(folder, mine):
    """Makes the kept folder of a deleted user root's (0700, the top only:
    the data is not touched). False when it is not that user's folder."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != mine.get("uid"):
        return False
    os.chown(folder, 0, 0, follow_symlinks=False)
    os.chmod(folder, 0o700)
    return True


def hand_over(folder, old, pw):
    """Gives a retired folder to the share's (new) user: every entry owned by
    the old uid (gid) is re-owned, nothing followed through symlinks; the top
    back to 0770. The number of entries re-owned."""
    n = 0
    for top, dirs, files in os.walk(folder, followlinks=False):
        # Each directory is a `top` of its own; symlinks to directories are
        # not walked into, only re-owned themselves.
        links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
        for entry in [top] + [os.path.join(top, x) for x in files + links]:
            st = os.lstat(entry)
            uid = pw.pw_uid if st.st_uid == old.get("uid") else -1
            gid = pw.pw_gid if st.st_gid == old.get("gid") else -1
            if uid != -1 or gid != -1:
                os.chown(entry, uid, gid, follow_symlinks=False)
                n += 1
    os.chown(folder, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    os.chmod(folder, 0o770)
    return n


def userdel(settings, user):
    """userdel (not -r); while one of the user's processes is still ending
    (an smbd child of a closed share) userdel refuses: retried for 15 s."""
    deadline = time.monotonic() + 15
    while True:
        rc, o, e = run([settings["userdel"], user])
        if rc == 0:
            return
        if rc == 8 and time.monotonic() < deadline:  # "currently used by process"
            time.sleep(0.2)
            continue
        raise Failure("userdel {} failed (exit {}): {}".format(user, rc, (o + e).strip()))


# ---------------------------------------------------------------- rendering


def render(shares, options):
    lines = [
        "# Managed by salt-steward (steward.share): do not edit, the next apply",
        "# replaces it. One section per share of the pillar steward:share.",
    ]
    for s in sorted(shares, key=lambda s: s["name"].lower()):
        params = [
            ("path", s["path"]),
            ("valid users", s["user"]),
            ("force user", s["user"]),
            ("force group", s["user"]),
            ("read only", "no"),
            ("browseable", "yes"),
            ("guest ok", "no"),
            ("create mask", "0660"),
            ("directory mask", "0770"),
        ]
        params += sorted(options.items())
        lines += ["", "# share {}".format(s["id"]), "[{}]".format(s["name"])]
        lines += ["   {} = {}".format(k, v) for k, v in params]
    lines.append("")
    return "\n".join(lines).encode()


def sections_of_file(data):
    """{lower name: (name, body lines)} of our rendered file."""
    result = {}
    current = None
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        m = SECTION_RE.match(line)
        if m:
            current = m.group(1)
            result[current.lower()] = (current, [])
        elif current is not None and line.strip() and not line.startswith("#"):
            result[current.lower()][1].append(line)
    return result


def share_options(raw):
    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise Failure("setting steward:share:share_options: not a mapping")
    opts = {}
    for k, v in raw.items():
        k = str(k)
        v = "yes" if v is True else "no" if v is False else str(v)
        if not OPTION_NAME_RE.match(k) or not all(ord(c) >= 32 for c in k + v) or "\\" in v:
            raise Failure("setting steward:share:share_options: {!r} = {!r} refused".format(k, v))
        opts[k] = v
    return opts


# ---------------------------------------------------------------- main


def main():
    spec = json.load(sys.stdin)
    settings = spec["settings"]
    smb_conf = settings["smb_conf"]
    shares_file = settings["shares_file"]
    state_dir = settings["state_dir"]
    revision, base, shares = check_pillar(spec.get("pillar"), spec.get("minion_id"))
    options = share_options(settings.get("share_options"))
    done = {}  # share name -> what was done to it
    refused = {}  # share name -> why
    changes = {}

    def did(name, what, how):
        done.setdefault(name, {})[what] = how

    # The hashes first: a key problem changes nothing.
    hashes = {}
    if shares:
        decrypt = decrypter(settings["minion_key"])
        for s in shares:
            hashes[s["name"]] = decrypt(s["id"], s["name"], s["enc"])

    state = load_state(state_dir)
    ours = state["users"]
    retired = state.setdefault("retired", {})

    # Every folder checked where it resolves NOW.
    base_real = os.path.realpath(base)
    for s in shares:
        if s["refused"] is None:
            try:
                s["path"] = contained(base_real, s["folder"])
            except Failure as e:
                s["refused"] = str(e)
        if s["refused"] is None:
            pw = getpw(s["user"])
            mine = ours.get(s["user"])
            if pw is not None and mine is None:
                s["refused"] = "user {} exists and was not created by salt-steward: refused".format(s["user"])
            elif pw is not None and pw.pw_uid != mine.get("uid"):
                s["refused"] = "user {} was recreated outside salt-steward (uid {}, ours was {}): refused".format(
                    s["user"], pw.pw_uid, mine.get("uid")
                )

    # smb.conf as it is, without our include: its own sections may not be ours.
    conf_data = read(smb_conf)
    if conf_data is None:
        raise Failure("{} does not exist".format(smb_conf))
    conf_lines = conf_data.decode("utf-8", "replace").splitlines()
    conf_dir = os.path.dirname(os.path.abspath(smb_conf))
    tmp = tempfile.mkdtemp(prefix="steward-share-")
    try:
        base_conf = os.path.join(tmp, "smb-base.conf")
        with open(base_conf, "w") as f:
            f.write("\n".join(l for l in conf_lines if not includes_ours(l, shares_file)) + "\n")
        rc, (dump, err) = testparm(settings, base_conf, conf_dir)
        if rc != 0:
            raise Failure("{} itself does not load (testparm exit {}):\n{}".format(smb_conf, rc, (err + dump).strip()))
        foreign = {n.lower() for n in sections_of(dump)}
        for s in shares:
            if s["refused"] is None and s["name"].lower() in foreign:
                s["refused"] = "share name {} is a section of {} itself: refused".format(s["name"], smb_conf)

        accepted = [s for s in shares if s["refused"] is None]
        for s in shares:
            if s["refused"] is not None:
                refused[s["name"]] = s["refused"]

        text = render(accepted, options)
        old = read(shares_file)
        has_include = any(includes_ours(l, shares_file) for l in conf_lines)
        if text != old or not has_include:
            # The candidate alone: unknown parameters, bad values.
            cand = os.path.join(tmp, "shares.conf")
            with open(cand, "wb") as f:
                f.write(text)
            rc, (o, e) = testparm(settings, cand, conf_dir)
            bad = []
            for l in (e + o).splitlines():
                if TESTPARM_BAD_RE.search(l) and l not in bad:
                    bad.append(l)
            if rc != 0 or bad:
                raise Failure(
                    "testparm refused the shares file (exit {}); {} not written, smbd keeps the live one:\n{}".format(
                        rc, shares_file, "\n".join(bad) or (e + o).strip()
                    )
                )
            # Then smb.conf as it will be, including it.
            full = os.path.join(tmp, "smb.conf")
            lines = ["include = {}".format(cand) if includes_ours(l, shares_file) else l for l in conf_lines]
            if not has_include:
                lines.append("include = {}".format(cand))
            with open(full, "w") as f:
                f.write("\n".join(lines) + "\n")
            rc, (o, e) = testparm(settings, full, conf_dir)
            if rc != 0:
                raise Failure(
                    "testparm refused {} with the new shares file (exit {}); nothing written:\n{}".format(
                        smb_conf, rc, (e + o).strip()
                    )
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # Users, folders, passdb of the accepted shares, before smbd serves them.
    if accepted and not os.path.isdir(base_real):
        os.makedirs(base_real, mode=0o755, exist_ok=True)
        changes["base"] = "created {}".format(base_real)
    for s in accepted:
        name, user = s["name"], s["user"]
        pw = getpw(user)
        if pw is None:
            rc, o, e = run(
                [
                    settings["useradd"],
                    "--system",
                    "--no-create-home",
                    "--user-group",
                    "--shell",
                    settings["nologin"],
                    "--home-dir",
                    s["path"],
                    "--comment",
                    "salt-steward share {}".format(name),
                    user,
                ]
            )
            if rc != 0:
                raise Failure("useradd {} failed (exit {}): {}".format(user, rc, (o + e).strip()))
            pw = getpw(user)
            ours[user] = {"uid": pw.pw_uid, "gid": pw.pw_gid, "share_id": s["id"], "folder": s["path"]}
            save_state(state_dir, state)
            did(name, "user", "created")
        elif ours[user].get("folder") != s["path"]:
            ours[user]["folder"] = s["path"]
            save_state(state_dir, state)
        if s["path"] in retired and os.path.isdir(s["path"]):
            old_ids = retired[s["path"]]
            n = hand_over(s["path"], old_ids, pw)
            del retired[s["path"]]
            save_state(state_dir, state)
            did(
                name,
                "folder",
                "kept data handed to {} (entries re-owned from uid {}: {})".format(user, old_ids.get("uid"), n),
            )
        elif s["path"] in retired:
            del retired[s["path"]]
            save_state(state_dir, state)
        if not os.path.isdir(s["path"]):
            parent = os.path.dirname(s["path"])
            os.makedirs(parent, mode=0o755, exist_ok=True)
            os.mkdir(s["path"], 0o770)
            os.chown(s["path"], pw.pw_uid, pw.pw_gid, follow_symlinks=False)
            os.chmod(s["path"], 0o770)
            if os.path.realpath(s["path"]) != s["path"]:
                raise Failure("folder {}: moved while it was created".format(s["path"]))
            did(name, "folder", "created {}".format(s["path"]))
        entry = passdb_entry(settings, user)
        if entry is None or entry[0] != hashes[name] or "D" in entry[1]:
            passdb_set(settings, user, pw.pw_uid, hashes[name])
            did(name, "passdb", "created" if entry is None else "updated")

    # The shares file and the include line (validated above).
    old_sections = sections_of_file(old)
    new_sections = sections_of_file(text)
    gone = [old_sections[k][0] for k in sorted(old_sections) if k not in new_sections]
    reload_needed = False
    if text != old:
        write_atomic(shares_file, text)
        changes["shares_file"] = shares_file
        reload_needed = True
        for k, (name, body) in sorted(new_sections.items()):
            if k not in old_sections:
                did(name, "share", "added")
            elif old_sections[k][1] != body:
                did(name, "share", "updated")
        for name in gone:
            did(name, "share", "removed")
    if not has_include:
        st = os.stat(smb_conf)
        data = conf_data if conf_data.endswith(b"\n") or not conf_data else conf_data + b"\n"
        data += "{}\ninclude = {}\n".format(MARK, shares_file).encode()
        write_atomic(os.path.realpath(smb_conf), data, like=st)
        changes["smb_conf"] = "include = {} added".format(shares_file)
        reload_needed = True
    if reload_needed:
        rc, o, e = run([settings["smbcontrol"], "-s", smb_conf, "smbd", "reload-config"])
        if rc == 0:
            changes["reloaded"] = True
            for name in gone:
                run([settings["smbcontrol"], "-s", smb_conf, "smbd", "close-share", name])
        elif "Can't find pid" in (o + e):
            changes["reloaded"] = "smbd is not running (it reads the file when it starts)"
        else:
            raise Failure("smbcontrol smbd reload-config failed (exit {}): {}".format(rc, (o + e).strip()))

    # Users (ours) that left the pillar: out of passdb, then deleted.
    wanted = {s["user"] for s in shares}
    for user in sorted(set(ours) - wanted):
        mine = ours[user]
        pw = getpw(user)
        what = {}
        if passdb_delete(settings, user):
            what["passdb"] = "deleted"
        if pw is not None and pw.pw_uid == mine.get("uid"):
            userdel(settings, user)
            what["user"] = "deleted"
        folder = mine.get("folder")
        if folder:
            what["data"] = "kept in {}".format(folder)
            if lock(folder, mine):
                # Its uid is free now: the next system user created would
                # get it, and with it the data. Root's until handed over.
                retired[folder] = {"uid": mine["uid"], "gid": mine.get("gid"), "user": user}
                what["data"] += ", locked root:root 0700"
        elif pw is not None:
            what["user"] = "kept: uid {} is not the one we created ({})".format(pw.pw_uid, mine.get("uid"))
        del ours[user]
        save_state(state_dir, state)
        if what:
            changes.setdefault("removed_users", {})[user] = what

    if done:
        changes["shares"] = done
    changed = bool(changes)
    served = len(accepted)
    if changed:
        comment = "shares at revision {} applied ({} served)".format(revision, served)
    else:
        comment = "shares already at revision {} ({} served)".format(revision, served)
    changes["revision"] = revision
    if refused:
        changes["refused"] = refused
        comment += "; refused: " + "; ".join("{}: {}".format(n, refused[n]) for n in sorted(refused))
    out(changed, comment, changes, ok=not refused)


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        out(False, str(e), ok=False)
    except Exception as e:  # the state fails with the reason, not a traceback
        out(False, "steward.share apply failed: {}: {}".format(type(e).__name__, e), ok=False)
