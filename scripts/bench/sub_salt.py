#!/usr/bin/env python3
"""Subscriber (a): Salt's own Python event API, the way Salt's tools and most
third-party Python integrations read the bus:
salt.utils.event.get_master_event(opts, sock_dir, listen=True) + get_event().

Adapted from salt-probes/bench_sub_salt.py. Run with the venv's python.
Usage: sub_salt.py MASTER_CONFIG_FILE N IDLE_SECS
Prints "READY" once connected, then one JSON line when N events tagged
bench/evt were received or none came for IDLE_SECS:
subscriber, received, t_first, t_last (epoch s), seconds, rate_per_s, cpu_seconds.
"""
import json
import resource
import sys
import time

import salt.config
import salt.utils.event


def main():
    cfg, n_want, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    opts = salt.config.master_config(cfg)
    ev = salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=True)
    print("READY", flush=True)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    n = 0
    t_first = t_last = None
    while n < n_want:
        e = ev.get_event(wait=idle, tag="bench/evt", full=True)
        if e is None:
            break
        t_last = time.time()
        if t_first is None:
            t_first = t_last
        n += 1
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    dt = (t_last - t_first) if n else 0.0
    print(json.dumps({
        "subscriber": "Salt Python API (get_event)",
        "received": n, "t_first": t_first, "t_last": t_last,
        "seconds": round(dt, 3), "rate_per_s": round(n / dt) if dt else None,
        "cpu_seconds": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2),
    }), flush=True)
    ev.destroy()


if __name__ == "__main__":
    main()
