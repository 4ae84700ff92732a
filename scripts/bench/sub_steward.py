#!/usr/bin/env python3
"""Subscriber (b): salt-steward itself, run as
  salt-steward --config STEWARD_CONFIG --master-config CFG events watch
               --tag 'bench/*' --quiet --stats --count N --idle-timeout IDLE
with the same interface as the other sub_*.py: prints "READY" once its log
says "Connected to the master event bus", then one JSON line: its --stats
summary plus t_last (taken when it exited, right after the Nth event),
t_first (t_last - its first-to-last seconds) and cpu_seconds (its rusage).
Its stderr is copied to STDERR_LOG. TERM/INT are passed on to it. RUST_LOG
is removed from its environment (it would override the config's log level).

Usage: sub_steward.py SALT_STEWARD_BIN STEWARD_CONFIG MASTER_CONFIG_FILE N IDLE_SECS STDERR_LOG
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time


def main():
    binary, steward_cfg, cfg, n_want, idle, log = sys.argv[1:7]
    cmd = [binary, "--config", steward_cfg, "--master-config", cfg, "events", "watch",
           "--tag", "bench/*", "--quiet", "--stats", "--count", n_want, "--idle-timeout", idle]
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: p.send_signal(s))
    lines = []
    ready = threading.Event()

    def pump():
        with open(log, "wb") as out:
            for line in p.stderr:
                out.write(line)
                out.flush()
                lines.append(line.decode("utf-8", "replace"))
                if b"Connected to the master event bus" in line:
                    ready.set()
        ready.set()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    ready.wait()
    if p.poll() is None:
        print("READY", flush=True)
    _, status, ru = os.wait4(p.pid, 0)
    t_exit = time.time()
    p.returncode = os.waitstatus_to_exitcode(status)
    th.join(5)
    stats = {}
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                stats = json.loads(line)
                break
            except ValueError:
                pass
    stats.update({
        "subscriber": "salt-steward events watch (Rust)",
        "t_last": t_exit if stats.get("received") else None,
        "t_first": t_exit - stats.get("seconds", 0) if stats.get("received") else None,
        "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 2),
        "exit_code": p.returncode,
    })
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
