#!/usr/bin/env python3
"""Makes sure DIR holds N RSA private keys key00000.pem … (PKCS#1
"BEGIN RSA PRIVATE KEY", as Salt and salt-steward write them), generating
only the missing ones, in parallel on every CPU (OpenSSL through the venv's
`cryptography`). A cache: reruns of scripts/bench-accept reuse the keys.

Usage: genkeys.py DIR N [BITS]
Prints one JSON line: wanted, generated, seconds.
"""
import json
import multiprocessing
import os
import sys
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def gen(args):
    path, bits = args
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.rename(tmp, path)


def main():
    d, n = sys.argv[1], int(sys.argv[2])
    bits = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
    os.makedirs(d, mode=0o700, exist_ok=True)
    todo = [(os.path.join(d, f"key{i:05d}.pem"), bits) for i in range(n)
            if not os.path.exists(os.path.join(d, f"key{i:05d}.pem"))]
    t = time.time()
    if todo:
        with multiprocessing.Pool(os.cpu_count()) as p:
            p.map(gen, todo, chunksize=8)
    print(json.dumps({"wanted": n, "generated": len(todo),
                      "seconds": round(time.time() - t, 2)}), flush=True)


if __name__ == "__main__":
    main()
