#!/usr/bin/env python3
"""Salt's baseline for scripts/bench-accept: the master has `autosign_file`
listing the minion ids, and Salt autosigns only while answering a minion's
`_auth` request, so this drives one real `_auth` per id at the ReqServer
(tcp://127.0.0.1:RET_PORT), as salt.crypt.AsyncAuth.minion_sign_in_payload
builds it: {cmd: "_auth", id, pub (clean_key'd SPKI), nonce, enc_algo:
OAEP-SHA1, sig_algo: PKCS1v15-SHA1, token: a random key string encrypted
with the master's public key (OAEP-SHA1)}, in a clear envelope with
version 3 (what 3007 minions send). Per request the master checks the id
against autosign_file, writes the key to minions/<id>, decrypts the token,
encrypts the AES and session keys to the minion's key and signs the reply —
the work it does for a real minion's first sign-in. The tokens are encrypted
before T0 (a real minion does that in its own process).

Requests are multiplexed over one ZeroMQ DEALER ([corr, b"", payload]; the
REP workers echo the envelope), IN_FLIGHT at a time. T0 is the first send;
<pki_dir>/minions/ is polled every 10 ms until every id is there.

Usage: auth_burst.py PKI_DIR RET_PORT KEYS_DIR IDS_FILE [IN_FLIGHT] [TIMEOUT_S]
Prints one JSON line.
"""
import json
import os
import secrets
import sys
import time
import uuid

import msgpack
import zmq
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from accept_common import AcceptedPoller, minion_pubs


def main():
    pki_dir, port, keys_dir, ids_file = sys.argv[1:5]
    in_flight = int(sys.argv[5]) if len(sys.argv) > 5 else 20
    timeout = float(sys.argv[6]) if len(sys.argv) > 6 else 300
    keys = minion_pubs(keys_dir, ids_file)
    with open(os.path.join(pki_dir, "master.pub"), "rb") as f:
        master_pub = serialization.load_pem_public_key(f.read())
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    payloads = []
    for mid, pub in keys:
        token = master_pub.encrypt(secrets.token_urlsafe(48).encode(), oaep)
        load = {"cmd": "_auth", "id": mid, "pub": pub, "nonce": uuid.uuid4().hex,
                "enc_algo": "OAEP-SHA1", "sig_algo": "PKCS1v15-SHA1", "token": token}
        payloads.append(msgpack.packb({"enc": "clear", "load": load, "version": 3},
                                      use_bin_type=True))
    poller = AcceptedPoller(pki_dir, [m for m, _ in keys])
    if poller.count():
        sys.exit("auth_burst.py: some of these ids are already accepted")

    ctx = zmq.Context.instance()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(f"tcp://127.0.0.1:{port}")
    replies = {"accepted": 0, "other": 0}
    other_example = None
    sent = 0
    t0 = time.time()
    while sent < min(in_flight, len(payloads)):
        d.send_multipart([str(sent).encode(), b"", payloads[sent]])
        sent += 1
    got = 0
    next_poll = 0.0
    t_replies = None
    while time.time() - t0 < timeout:
        if got < len(payloads) and d.poll(10):
            _, _, body = d.recv_multipart()
            got += 1
            rep = msgpack.unpackb(body, raw=True, strict_map_key=False)
            inner = rep.get(b"load") if isinstance(rep, dict) else None
            if isinstance(inner, bytes):  # signed reply: load is msgpack bytes
                inner = msgpack.unpackb(inner, raw=True, strict_map_key=False)
            if isinstance(inner, dict) and b"aes" in inner:
                replies["accepted"] += 1
            else:
                replies["other"] += 1
                other_example = other_example or repr(rep)[:200]
            if sent < len(payloads):
                d.send_multipart([str(sent).encode(), b"", payloads[sent]])
                sent += 1
            if got == len(payloads):
                t_replies = time.time()
        now = time.time()
        if now >= next_poll:
            poller.count()
            next_poll = now + 0.01
            if poller.t_all and got == len(payloads):
                break
        if got == len(payloads) and not poller.t_all:
            if now - t_replies > 10:  # every request answered; no more will come
                break
            time.sleep(0.01)
    n = poller.count()
    d.close()
    print(json.dumps({
        "keys": len(keys),
        "in_flight": in_flight,
        "accepted": n,
        "all_accepted_s": round(poller.t_all - t0, 3) if poller.t_all else None,
        "all_replies_s": round(t_replies - t0, 3) if t_replies else None,
        "replies": replies,
        "other_reply_example": other_example,
    }), flush=True)


if __name__ == "__main__":
    main()
