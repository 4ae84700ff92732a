#!/usr/bin/env python3
"""Salt's own event API, for checking our bus client against it.

  salt_events.py listen MASTER_CONFIG TAG_PREFIX COUNT TIMEOUT
      prints READY once subscribed, then one JSON line per event
      ({"tag": ..., "data": ...}) whose tag starts with TAG_PREFIX.
  salt_events.py fire MASTER_CONFIG TAG JSON
      fires with salt.utils.event (SaltEvent.fire_event), as Salt's code does.
"""
import json
import sys
import time

import salt.config
import salt.utils.event


def main():
    mode, conf = sys.argv[1], sys.argv[2]
    opts = salt.config.master_config(conf)
    if mode == "listen":
        prefix, count, timeout = sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
        ev = salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=True)
        ev.connect_pub(timeout=10)
        print("READY", flush=True)
        end = time.time() + timeout
        got = 0
        while got < count and time.time() < end:
            e = ev.get_event(wait=1, tag=prefix, full=True)
            if e is None:
                continue
            print(json.dumps({"tag": e["tag"], "data": e["data"]}, default=str), flush=True)
            got += 1
    elif mode == "fire":
        tag, data = sys.argv[3], json.loads(sys.argv[4])
        ev = salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=False)
        if not ev.fire_event(data, tag):
            sys.exit("fire_event returned False")
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
