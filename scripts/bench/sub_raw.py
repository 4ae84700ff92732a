#!/usr/bin/env python3
"""Subscriber (c), the "no slow reader" reference: a minimal raw reader of
<sock_dir>/master_event_pub.ipc (socket + msgpack.Unpacker, 1 MiB reads),
decoding each frame's tag and data, with no salt imports.

Adapted from salt-probes/bench_sub_raw.py. Run with the venv's python (msgpack).
Usage: sub_raw.py SOCK_DIR N IDLE_SECS
Prints "READY" once connected, then one JSON line when N events tagged
bench/evt were received or none came for IDLE_SECS:
subscriber, received, t_first, t_last (epoch s), seconds, rate_per_s, cpu_seconds, bytes.
"""
import os
import socket
import sys
import time

from sub_common import cpu_now, report

import msgpack

from busframe import PubReader


def main():
    sock_dir, n_want, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(sock_dir, "master_event_pub.ipc"))
    s.settimeout(idle)
    print("READY", flush=True)
    cpu0 = cpu_now()
    unp = PubReader()
    n = nbytes = 0
    t_first = t_last = None
    while n < n_want:
        try:
            b = s.recv(1 << 20)
        except socket.timeout:
            break
        if not b:
            break
        nbytes += len(b)
        unp.feed(b)
        for fr in unp:
            tag, _, packed = fr["body"].partition(b"\n\n")
            if tag != b"bench/evt":
                continue
            msgpack.unpackb(packed, raw=False, strict_map_key=False)
            t_last = time.time()
            if t_first is None:
                t_first = t_last
            n += 1
    report("raw socket+msgpack (Python)", n, t_first, t_last, cpu0, bytes=nbytes)


if __name__ == "__main__":
    main()
