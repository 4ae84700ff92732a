#!/usr/bin/env python3
"""steward-backup-run: one run of one salt-steward backup (steward.backup).

Installed by steward.backup as ``<state_dir>/steward-backup-run`` with the
minion's Python in its ``#!`` line; cron runs it (``--id N --level L``) and
so does the state ``steward.backup.run`` (with ``--state``). It reads
``<state_dir>/<id>/backup.json`` (written by the state) and:

- takes the backup's lock (``<state_dir>/<id>/run.lock``; a second run waits
  for it, ``--lock-wait`` seconds at most);
- for the lowest level: ``rsnapshot -c <conf> sync`` (rsync into
  ``<dest>/.sync``), then ``rsnapshot -c <conf> <lowest>`` (rotation) unless
  the sync failed; rsync's exit code and output come from ``rsync-recorder``
  (rsnapshot's ``cmd_rsync``, which writes them to ``<state_dir>/<id>/
  rsync.exit`` and ``rsync.out`` when run from here): 0 ``ok``; 24 (files vanished) ``warning``;
  23 (partial transfer, e.g. unreadable files) ``attention``; these three
  are rotated. Anything else (ssh refused, host key changed, source folder
  gone, rsync missing) is an ``error`` and nothing is rotated;
- for a higher level: rotation only (``rsnapshot -c <conf> <level>``),
  or ``insufficient_history`` without running rsnapshot while the level
  below has not filled its last slot (``<lower>.<count-1>``) yet;
- parses rsync's ``--stats`` (``Number of files``, ``Total file size``,
  ``Total transferred file size``);
- writes the result JSON LOCALLY FIRST (``<state_dir>/<id>/results/
  <started>.json`` and ``<state_dir>/<id>/last.json``), then sends it to the
  master: ``<salt_call> -c <minion conf dir> event.send
  steward/v1/backup/result '<json>'``. A failed send is not a failure of the
  backup: the JSON stays for the next ``steward.backup`` to report.

Exit status: 0 for ok, warning and insufficient_history, 1 for attention and
error, 2 for a usage error. Without ``--state`` it prints nothing on success
and one line on stderr otherwise (cron mails it); with ``--state`` it prints
the JSON of Salt's ``cmd.run stateful: True`` (``result`` = the result JSON).

Standard library only.
"""

import argparse
import errno
import fcntl
import json
import os
import re
import subprocess
import sys
import time
import uuid

TAG = "steward/v1/backup/result"
KEEP_RESULTS = 500
REPORT_PREFIX = "steward.backup.run report: "

STATS = {
    "files": re.compile(r"^Number of files: (\d+)", re.M),
    "size": re.compile(r"^Total file size: (\d+) bytes", re.M),
    "transferred": re.compile(r"^Total transferred file size: (\d+) bytes", re.M),
}


class Usage(Exception):
    pass


def write_atomic(path, data):
    tmp = "{}.new".format(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def rsnapshot(conf, what, env=None):
    """``rsnapshot -c <conf> <what>``: (exit, what it said: its warnings and errors)."""
    argv = [conf["rsnapshot"], "-c", conf["conf"], what]
    try:
        p = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            universal_newlines=True,
            env=env,
        )
    except OSError as e:
        return 127, "{}: {}".format(argv[0], e)
    return p.returncode, p.stdout.strip()


def rsync_messages(output):
    """rsync's output (its own, ssh's and the source's messages) without the --stats block."""
    lines, in_stats = [], False
    for line in output.splitlines():
        if line.startswith("Number of files:"):
            in_stats = True
        if not in_stats and line.strip():
            lines.append(line.rstrip())
        if line.startswith("total size is"):
            in_stats = False
    return "\n".join(lines)


def tail(text, limit=4000, line_limit=300):
    """``text`` for the result's ``error``: long lines cut in the middle, and
    at most ``limit`` characters (its first and last lines kept)."""
    lines = []
    for line in text.strip().splitlines():
        if len(line) > line_limit:
            half = line_limit // 2
            line = "{} … {}".format(line[:half], line[-half:])
        lines.append(line)
    total = sum(len(l) + 1 for l in lines)
    if total <= limit:
        return "\n".join(lines)
    head = lines[:10]
    budget = limit - sum(len(l) + 1 for l in head) - 40
    tail_lines = []
    for line in reversed(lines[10:]):
        if budget - len(line) - 1 < 0:
            break
        budget -= len(line) + 1
        tail_lines.append(line)
    tail_lines.reverse()
    left_out = len(lines) - len(head) - len(tail_lines)
    return "\n".join(head + ["… ({} lines left out)".format(left_out)] + tail_lines)


def take_lock(path, wait):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            os.close(fd)
            return None
        time.sleep(1)


def lowest_run(conf, bdir, level):
    """sync + rotation of the lowest level; (outcome, rsync_exit, stats, error)."""
    prefix = os.path.join(bdir, "rsync")
    for f in (prefix + ".exit", prefix + ".out"):
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass
    env = dict(os.environ)
    env["STEWARD_BACKUP_RSYNC"] = prefix
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    rc, said = rsnapshot(conf, "sync", env)
    try:
        with open(prefix + ".exit") as f:
            rsync_exit = int(f.read().strip())
    except (OSError, ValueError):
        rsync_exit = None
    try:
        with open(prefix + ".out", errors="replace") as f:
            rsync_out = f.read()
    except OSError:
        rsync_out = ""
    stats = {k: (int(m.group(1)) if m else None) for k, m in ((k, r.search(rsync_out)) for k, r in STATS.items())}
    told = "\n".join(t for t in (rsync_messages(rsync_out), said) if t)
    if rsync_exit == 0 and rc == 0:
        outcome, error = "ok", ""
    elif rsync_exit == 24:
        outcome, error = "warning", tail(told)
    elif rsync_exit == 23:
        outcome, error = "attention", tail(told)
    else:
        why = "rsync exited {}".format(rsync_exit) if rsync_exit is not None else "rsync did not run"
        return "error", rsync_exit, stats, tail("rsnapshot sync failed (exit {}, {}):\n{}".format(rc, why, told))
    rc, said = rsnapshot(conf, level)
    if rc not in (0, 2):
        return "error", rsync_exit, stats, tail("rsnapshot {} (rotation) failed (exit {}):\n{}".format(level, rc, said))
    return outcome, rsync_exit, stats, error


def higher_run(conf, level):
    levels = [lv["level"] for lv in conf["levels"]]
    i = levels.index(level)
    lower = conf["levels"][i - 1]
    needed = os.path.join(conf["dest_folder"], "{}.{}".format(lower["level"], lower["count"] - 1))
    if not os.path.isdir(needed):
        return "insufficient_history", "{} does not exist yet: {} has no snapshot to rotate into {}".format(
            needed, lower["level"], level
        )
    rc, said = rsnapshot(conf, level)
    if rc == 0:
        return "ok", ""
    if rc == 2:
        return "warning", tail(said)
    return "error", tail("rsnapshot {} (rotation) failed (exit {}):\n{}".format(level, rc, said))


def send_event(conf, result):
    argv = [
        conf["salt_call"],
        "-c",
        conf["minion_conf_dir"],
        "--out=json",
        "-l",
        "quiet",
        "event.send",
        TAG,
        json.dumps(result, sort_keys=True),
    ]
    try:
        p = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            universal_newlines=True,
            timeout=120,
        )
    except OSError as e:
        return False, "{}: {}".format(argv[0], e)
    except subprocess.TimeoutExpired:
        return False, "salt-call event.send: no answer within 120 s"
    text = p.stdout.strip()
    try:
        sent = p.returncode == 0 and json.loads(text).get("local") is True
    except (ValueError, AttributeError):
        sent = False
    return sent, text[-2000:]


def record(bdir, result):
    results = os.path.join(bdir, "results")
    os.makedirs(results, mode=0o700, exist_ok=True)
    text = json.dumps(result, sort_keys=True) + "\n"
    write_atomic(os.path.join(results, "{:.6f}.json".format(result["started"])), text)
    write_atomic(os.path.join(bdir, "last.json"), text)
    old = sorted(f for f in os.listdir(results) if f.endswith(".json"))
    for f in old[:-KEEP_RESULTS]:
        os.unlink(os.path.join(results, f))


def main():
    ap = argparse.ArgumentParser(description="one run of a salt-steward backup")
    ap.add_argument("--id", required=True, type=int)
    ap.add_argument("--level", default="")
    ap.add_argument("--lock-wait", type=float, default=3600.0)
    ap.add_argument("--state", action="store_true", help="print the JSON of a Salt stateful cmd.run")
    a = ap.parse_args()

    state_dir = os.path.dirname(os.path.realpath(__file__))
    bdir = os.path.join(state_dir, str(a.id))
    try:
        with open(os.path.join(bdir, "backup.json")) as f:
            conf = json.load(f)
    except FileNotFoundError:
        raise Usage("backup {} is not configured on this server (no {}/backup.json)".format(a.id, bdir))
    levels = [lv["level"] for lv in conf["levels"]]
    level = a.level or levels[0]
    if level not in levels:
        raise Usage("backup {} has no level {!r} (levels: {})".format(a.id, level, ", ".join(levels)))

    started = time.time()
    t0 = time.monotonic()
    result = {
        "backup_id": a.id,
        "run_id": str(uuid.uuid4()),
        "level": level,
        "started": started,
        "duration_s": 0.0,
        "outcome": "error",
        "rsync_exit": None,
        "files": None,
        "size": None,
        "transferred": None,
        "error": "",
    }
    if conf.get("not_runnable"):
        result["error"] = "backup {} is not runnable yet: {}".format(a.id, conf["not_runnable"])
    else:
        lock = take_lock(os.path.join(bdir, "run.lock"), a.lock_wait)
        if lock is None:
            result["error"] = "another run of backup {} held its lock for {:.0f} s".format(a.id, a.lock_wait)
        else:
            try:
                if level == levels[0]:
                    outcome, rsync_exit, stats, error = lowest_run(conf, bdir, level)
                    result.update(stats)
                    result["rsync_exit"] = rsync_exit
                else:
                    outcome, error = higher_run(conf, level)
                result["outcome"], result["error"] = outcome, error
            finally:
                os.close(lock)
    result["duration_s"] = round(time.monotonic() - t0, 3)

    record(bdir, result)
    sent, event_output = send_event(conf, result)

    failed = result["outcome"] in ("error", "attention")
    summary = "backup {} {}: {}".format(a.id, level, result["outcome"])
    if result["error"]:
        summary += " — " + result["error"]
    if a.state:
        report = {"result": result, "event_sent": sent}
        data = {
            "changed": True,
            "comment": "{}\n{}{}".format(summary, REPORT_PREFIX, json.dumps(report, sort_keys=True)),
            "result": result,
            "event_sent": sent,
            "event_output": event_output,
        }
        sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    elif failed:
        sys.stderr.write(summary + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Usage as e:
        if "--state" in sys.argv:
            sys.stdout.write(json.dumps({"changed": False, "comment": str(e)}) + "\n")
        else:
            sys.stderr.write("steward-backup-run: {}\n".format(e))
        sys.exit(2)
