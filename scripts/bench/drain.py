#!/usr/bin/env python3
"""Waits until the master's event bus has no backlog: connects to the publish
socket, fires one marker event (tag sync/bench/<random>) into the pull socket
and waits until the marker comes back out. Events queued earlier in the
master come out first, so the bus is drained when it returns.

Usage: drain.py SOCK_DIR [TIMEOUT_SECS]   (exit 1 on timeout)
Prints one JSON line: {"drain_seconds": S, "events_before_marker": N}.
"""
import json
import os
import socket
import sys
import time
import uuid

import msgpack

from busframe import PubReader, pull_frame


def main():
    sock_dir = sys.argv[1]
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 300
    sub = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sub.connect(os.path.join(sock_dir, "master_event_pub.ipc"))
    sub.settimeout(1)
    time.sleep(0.2)  # let the publisher register this subscriber
    tag = f"sync/bench/{uuid.uuid4().hex}".encode()
    pull = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pull.connect(os.path.join(sock_dir, "master_event_pull.ipc"))
    pull.sendall(pull_frame(tag.decode(), {}))
    pull.close()
    t0 = time.time()
    unp = PubReader()
    before = 0
    while time.time() - t0 < timeout:
        try:
            b = sub.recv(1 << 20)
        except socket.timeout:
            continue
        if not b:
            break
        unp.feed(b)
        for fr in unp:
            if fr["body"].partition(b"\n\n")[0] == tag:
                print(json.dumps({"drain_seconds": round(time.time() - t0, 3),
                                  "events_before_marker": before}), flush=True)
                return 0
            before += 1
    print(json.dumps({"drain_seconds": None, "events_before_marker": before,
                      "error": "marker not seen"}), flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
