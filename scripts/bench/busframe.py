"""The master's bus framing for the bench helpers, whichever Salt release runs
(docs/salt-releases.md): writes what the pull socket reads (Salt's own
`frame_msg_ipc`: length-prefixed since 3006.30/3007.17, raw before), and reads
the publish socket in either framing (detected from the first bytes: `{"head"`
at offset 0 is raw, at offset 4 length-prefixed). Run with the master's Python.
"""
import struct

import msgpack

MAGIC = b"\x82\xa4head"


def pull_frame(tag, data):
    """One event as the master's pull socket reads it (imports Salt: readers
    that only use PubReader stay free of it)."""
    import salt.transport.frame

    body = tag.encode() + b"\n\n" + msgpack.packb(data, use_bin_type=True)
    return salt.transport.frame.frame_msg_ipc(body)


class PubReader:
    """feed(bytes), then iterate: the frames ({"head", "body"}) read so far."""

    def __init__(self):
        self.buf = bytearray()
        self.prefixed = None
        self.unp = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=0)

    def feed(self, data):
        if self.prefixed is False:
            self.unp.feed(data)
            return
        self.buf += data
        if self.prefixed is None and len(self.buf) >= 10:
            self.prefixed = self.buf[4:10] == MAGIC and self.buf[:6] != MAGIC
            if not self.prefixed:
                self.unp.feed(bytes(self.buf))
                self.buf.clear()

    def __iter__(self):
        if not self.prefixed:
            yield from self.unp
            return
        while len(self.buf) >= 4:
            (n,) = struct.unpack(">I", self.buf[:4])
            if len(self.buf) < 4 + n:
                return
            payload = bytes(self.buf[4:4 + n])
            del self.buf[:4 + n]
            yield msgpack.unpackb(payload, raw=False, strict_map_key=False)
