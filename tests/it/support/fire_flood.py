#!/usr/bin/env python3
"""Fire a flood of minion-looking events into a salt-master's bus, then a marker.

  fire_flood.py SOCK_DIR N TAG MINION[,MINION...] END_TAG

Writes N events with tag TAG into <sock_dir>/master_event_pull.ipc over one
connection, as fast as a raw writer can, each wrapped exactly as the master
wraps a minion's `event.send` ({cmd: _minion_event, id, tag, data: {seq}}),
the sender cycling through the minion ids; then one unwrapped END_TAG event
(as fired on the master). Frames are {"head": {}, "body": bin(tag "\\n\\n"
msgpack(data))} (salt-protocol.md 1.3), framed by the installed Salt's own
`frame_msg_ipc` (length-prefixed since 3006.30/3007.17; run this with the
master's Python); the master never acknowledges.
Prints one JSON line: fired, seconds, rate_per_s.
"""
import datetime
import json
import os
import socket
import sys
import time

import msgpack
import salt.transport.frame


def frame(tag, data):
    body = tag.encode() + b"\n\n" + msgpack.packb(data, use_bin_type=True)
    # What the master's pull socket reads, whichever release this is.
    return salt.transport.frame.frame_msg_ipc(body)


def main():
    sock_dir, n, tag, minions, end_tag = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split(","), sys.argv[5]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(sock_dir, "master_event_pull.ipc"))
    stamp = datetime.datetime.utcnow().isoformat()
    t0 = time.time()
    for i in range(n):
        mid = minions[i % len(minions)]
        s.sendall(frame(tag, {"cmd": "_minion_event", "id": mid, "tag": tag,
                              "data": {"seq": i, "__pub_fun": "event.send"}, "_stamp": stamp}))
    s.sendall(frame(end_tag, {"fired": n, "_stamp": stamp}))
    t1 = time.time()
    s.close()
    print(json.dumps({"fired": n, "seconds": round(t1 - t0, 3),
                      "rate_per_s": round(n / (t1 - t0)) if t1 > t0 else None}), flush=True)


if __name__ == "__main__":
    main()
