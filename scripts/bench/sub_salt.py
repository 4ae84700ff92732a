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
import sys
import time

from sub_common import cpu_now, report

import salt.config
import salt.utils.event


def main():
    cfg, n_want, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    opts = salt.config.master_config(cfg)
    ev = salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=True)
    print("READY", flush=True)
    cpu0 = cpu_now()
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
    report("Salt Python API (get_event)", n, t_first, t_last, cpu0)
    ev.destroy()


if __name__ == "__main__":
    main()
