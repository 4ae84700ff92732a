#!/usr/bin/env python3
"""1,000 pending keys at once, as the master itself would make them
(scripts/bench-accept, "ours"): for every minion id, its public key
(clean_key'd SPKI PEM, no trailing newline) is written to
<pki_dir>/minions_pre/<id> and then the master's `salt/auth`
{result: true, act: "pend", id, pub, _stamp} event is fired into
<sock_dir>/master_event_pull.ipc (in the framing the installed Salt reads there,
as fire.py writes them: busframe.py). T0 is just before the first file. Then
<pki_dir>/minions/ is polled every 10 ms until every id is there.

A raw subscriber on master_event_pub.ipc records the wheel calls the
daemon makes (`salt/wheel/<jid>/ret` with fun wheel.key.accept_dict /
reject_dict) and how many keys each moved.

Usage: pend.py PKI_DIR SOCK_DIR KEYS_DIR IDS_FILE [TIMEOUT_S]
Prints one JSON line.
"""
import datetime
import json
import os
import socket
import sys
import threading
import time

import msgpack

from busframe import PubReader, pull_frame

from accept_common import AcceptedPoller, minion_pubs


def frame(tag, data):
    return pull_frame(tag, data)


def watch_wheel(sock_dir, calls, stop):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(sock_dir, "master_event_pub.ipc"))
    s.settimeout(0.2)
    unp = PubReader()
    while not stop.is_set():
        try:
            b = s.recv(1 << 20)
        except socket.timeout:
            continue
        if not b:
            break
        unp.feed(b)
        for fr in unp:
            tag, _, packed = fr["body"].partition(b"\n\n")
            if not (tag.startswith(b"salt/wheel/") and tag.endswith(b"/ret")):
                continue
            data = msgpack.unpackb(packed, raw=False, strict_map_key=False)
            fun = data.get("fun", "") if isinstance(data, dict) else ""
            # Each wheel call through the ReqServer fires two ret events: the
            # call's own, and the inner one of the wheel mixin (user UNKNOWN).
            if fun in ("wheel.key.accept_dict", "wheel.key.reject_dict") \
                    and data.get("user") != "UNKNOWN":
                ret = data.get("return") or {}
                moved = sum(len(v) for v in ret.values() if isinstance(v, list)) \
                    if isinstance(ret, dict) else 0
                calls.append({"fun": fun[6:], "keys": moved, "t": time.time()})
    s.close()


def main():
    pki_dir, sock_dir, keys_dir, ids_file = sys.argv[1:5]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 120
    keys = minion_pubs(keys_dir, ids_file)
    poller = AcceptedPoller(pki_dir, [m for m, _ in keys])
    if poller.count():
        sys.exit("pend.py: some of these ids are already accepted")
    calls, stop = [], threading.Event()
    th = threading.Thread(target=watch_wheel, args=(sock_dir, calls, stop), daemon=True)
    th.start()
    time.sleep(1)  # the publisher registers a new subscriber asynchronously
    pull = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    pull.connect(os.path.join(sock_dir, "master_event_pull.ipc"))
    pre = os.path.join(pki_dir, "minions_pre")

    t0 = time.time()
    for mid, pub in keys:
        with open(os.path.join(pre, mid), "w+") as f:
            f.write(pub)
        pull.sendall(frame("salt/auth", {"result": True, "act": "pend", "id": mid, "pub": pub,
                                         "_stamp": datetime.datetime.utcnow().isoformat()}))
    t_fired = time.time()
    pull.close()
    n = 0
    while time.time() - t0 < timeout:
        n = poller.count()
        if poller.t_all:
            break
        time.sleep(0.01)
    time.sleep(0.5)  # the last wheel ret event
    stop.set()
    th.join(2)
    print(json.dumps({
        "keys": len(keys),
        "accepted": n,
        "t0": t0,
        "fired_s": round(t_fired - t0, 3),
        "all_accepted_s": round(poller.t_all - t0, 3) if poller.t_all else None,
        "pending_left": len(os.listdir(pre)),
        "wheel_calls": [{"fun": c["fun"], "keys": c["keys"], "at_s": round(c["t"] - t0, 3)}
                        for c in calls],
    }), flush=True)


if __name__ == "__main__":
    main()
