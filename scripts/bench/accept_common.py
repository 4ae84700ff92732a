"""Shared by pend.py and auth_burst.py (scripts/bench-accept): the minions'
public keys and a poller of the master's accepted-keys directory."""
import os
import time

from cryptography.hazmat.primitives import serialization


def clean_key(text):
    """Salt's clean_key: surrounding whitespace stripped, lines joined by \\n."""
    return "\n".join(text.strip().splitlines())


def minion_pubs(keys_dir, ids_file):
    """[(minion_id, clean SPKI PEM)] from the issued private keys
    <keys_dir>/<minion_id>.pem: what each minion, installed from its bundle,
    would send as `pub` in its `_auth` (salt.crypt: clean_key(minion.pub))."""
    out = []
    with open(ids_file) as f:
        ids = [line.strip() for line in f if line.strip()]
    for mid in ids:
        with open(os.path.join(keys_dir, f"{mid}.pem"), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        out.append((mid, clean_key(pem.decode())))
    return out


class AcceptedPoller:
    """Counts which of `ids` have a file in <pki_dir>/minions/."""

    def __init__(self, pki_dir, ids):
        self.dir = os.path.join(pki_dir, "minions")
        self.ids = set(ids)
        self.t_all = None

    def count(self):
        try:
            n = len(self.ids.intersection(os.listdir(self.dir)))
        except FileNotFoundError:
            n = 0
        if n == len(self.ids) and self.t_all is None:
            self.t_all = time.time()
        return n
