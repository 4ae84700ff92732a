#!/usr/bin/env python3
"""Time Salt's own reactor matching: how Salt's reactor lists the reactions
for each event's tag (salt/utils/reactor.py: Reactor.list_reactors, one
fnmatch per entry of the `reactor:` config), for the same tags and globs as
examples/rules_bench.rs.

  salt_reactor_match.py SALT_REACTOR_YAML TAGS_TXT [SAMPLE]

Runs Salt's unmodified list_reactors function on the first SAMPLE tags
(default 20000; the whole million would take many minutes) with the reactor
map loaded as Salt loads it (opts["reactor"] as a list), and prints one JSON
line: events, seconds, events_per_s, matches. Run with .salt/venv's python.
"""
import json
import sys
import time

import salt.utils.reactor
import salt.utils.yaml


class Opts:
    """The one attribute list_reactors reads: self.opts["reactor"]."""

    def __init__(self, react_map):
        self.opts = {"reactor": react_map}


def main():
    reactor_yaml, tags_txt = sys.argv[1], sys.argv[2]
    sample = int(sys.argv[3]) if len(sys.argv) > 3 else 20000
    with open(reactor_yaml) as f:
        react_map = salt.utils.yaml.safe_load(f)
    with open(tags_txt) as f:
        tags = [next(f).rstrip("\n") for _ in range(sample)]
    me = Opts(react_map)
    list_reactors = salt.utils.reactor.Reactor.list_reactors
    # Warm fnmatch's pattern cache, as a running reactor would have it.
    for tag in tags[:1000]:
        list_reactors(me, tag)
    best, matches = None, 0
    for _ in range(3):
        matches = 0
        t0 = time.perf_counter()
        for tag in tags:
            matches += len(list_reactors(me, tag))
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    print(json.dumps({"engine": "salt-reactor", "salt": salt.version.__version__,
                      "events": len(tags), "rules": len(react_map), "seconds": best,
                      "events_per_s": round(len(tags) / best), "matches": matches}))


if __name__ == "__main__":
    import salt.version  # noqa: F401
    main()
