#!/usr/bin/env python3
"""Fire N small events into a salt-master's bus as fast as one raw writer can:
one connection to <sock_dir>/master_event_pull.ipc, one frame per sendall,
each {"head": {}, "body": bin(tag + "\\n\\n" + msgpack(data))} as Salt itself
writes them (salt-protocol.md 1.3). The master never acknowledges, so "fired"
means the socket took the bytes.

Adapted from salt-probes/bench_events.py. Run with the venv's python (msgpack).
Usage: fire.py SOCK_DIR N [--tag bench/evt] [--payload 100]
Prints one JSON line: fired, frame_bytes, t_start, t_end (epoch s), seconds, rate_per_s.
"""
import argparse
import datetime
import json
import os
import socket
import time

import msgpack

from busframe import pull_frame


def frame(tag, data):
    return pull_frame(tag, data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sock_dir")
    ap.add_argument("n", type=int)
    ap.add_argument("--tag", default="bench/evt")
    ap.add_argument("--payload", type=int, default=100, help="bytes of padding per event")
    a = ap.parse_args()

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(a.sock_dir, "master_event_pull.ipc"))
    pad = "x" * a.payload
    size = len(frame(a.tag, {"seq": 0, "pad": pad, "_stamp": datetime.datetime.utcnow().isoformat()}))
    t0 = time.time()
    for i in range(a.n):
        stamp = datetime.datetime.utcnow().isoformat()
        s.sendall(frame(a.tag, {"seq": i, "pad": pad, "_stamp": stamp}))
    t1 = time.time()
    s.close()
    print(json.dumps({"fired": a.n, "frame_bytes": size, "t_start": t0, "t_end": t1,
                      "seconds": round(t1 - t0, 3),
                      "rate_per_s": round(a.n / (t1 - t0)) if t1 > t0 else None}), flush=True)


if __name__ == "__main__":
    main()
