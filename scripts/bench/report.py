#!/usr/bin/env python3
"""Turns the per-run results of scripts/bench-bus into a markdown table.

Usage: report.py RUNS_DIR
RUNS_DIR holds one directory per run, named <k>-<kind>, each with fire.json
(fire.py), sub.json (the subscriber's result line), and meta.json in RUNS_DIR.
"""
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            lines = [l for l in f.read().splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    except OSError:
        return {}


def secs(v):
    return "–" if v is None else f"{v:.2f} s"


def main():
    runs_dir = sys.argv[1]
    meta = load(os.path.join(runs_dir, "meta.json"))
    rows = []
    for name in sorted(d for d in os.listdir(runs_dir) if os.path.isdir(os.path.join(runs_dir, d))):
        d = os.path.join(runs_dir, name)
        fire, sub = load(os.path.join(d, "fire.json")), load(os.path.join(d, "sub.json"))
        drain = load(os.path.join(d, "drain-after.json"))
        fired, got = fire.get("fired"), sub.get("received")
        if got is None:
            recv = "– (no result)"
        elif got == fired:
            recv = f"{got} (all)"
        else:
            recv = f"{got} (**{fired - got} missing**)" if fired is not None else str(got)
        e2e = None
        if sub.get("t_last") and fire.get("t_start"):
            e2e = sub["t_last"] - fire["t_start"]
        rate = sub.get("rate_per_s")
        extra = []
        if sub.get("lagged"):
            extra.append(f"lagged {sub['lagged']}")
        if sub.get("decode_errors"):
            extra.append(f"decode errors {sub['decode_errors']}")
        rows.append([
            name.split("-", 1)[0],
            sub.get("subscriber", name.split("-", 1)[1]) + (f" ({', '.join(extra)})" if extra else ""),
            str(fired) if fired is not None else "–",
            recv,
            secs(fire.get("seconds")) + (f" ({fire['rate_per_s']}/s)" if fire.get("rate_per_s") else ""),
            secs(sub.get("seconds")),
            f"{round(rate):,}".replace(",", " ") if rate else "–",
            secs(e2e),
            secs(sub.get("cpu_seconds")),
            secs(drain.get("drain_seconds")),
        ])
    head = ["run", "subscriber", "events fired", "events received", "fire duration (rate)",
            "first → last received", "received/s", "fire start → last received",
            "subscriber CPU", "backlog drain after"]
    out = []
    out.append("# Event-bus throughput: one salt-master, one subscriber per run\n")
    if meta:
        out.append(f"- date: {meta.get('date')}; Salt {meta.get('salt')}; salt-steward {meta.get('steward')}")
        out.append(f"- machine: {meta.get('cpus')} CPUs ({meta.get('cpu_model')}), load average at start {meta.get('loadavg')}")
        out.append(f"- each run: one subscriber alone on the bus, then {meta.get('n')} events `bench/evt` "
                   f"({meta.get('frame_bytes')} bytes per frame, ~{meta.get('payload')} bytes of padding) fired "
                   f"by one raw Python writer into master_event_pull.ipc; subscriber stops at N events or "
                   f"after {meta.get('idle')} s without one")
        out.append(f"- master: {meta.get('master_log')} (log), lab {meta.get('lab')}")
        out.append("")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        out.append("| " + " | ".join(r) + " |")
    out.append("")
    out.append("Columns: *fire duration* is how long the writer took to hand all events to the master's "
               "pull socket (the master never acknowledges, so a backlog can build up inside it); "
               "*first → last received* and *received/s* are measured by the subscriber; "
               "*fire start → last received* is wall-clock from the first write to the last event read "
               "(includes any backlog); *subscriber CPU* is user+system CPU of the subscriber process; "
               "*backlog drain after* is how long a marker event fired after the run took to come out "
               "of the bus.")
    print("\n".join(out))


if __name__ == "__main__":
    main()
