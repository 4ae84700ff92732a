#!/usr/bin/env python3
"""Parse a scrape of salt-steward's /metrics with the Prometheus project's
own Python parsers, and print its samples as JSON.

  parse_metrics.py < scrape.txt

The endpoint serves OpenMetrics text (what Prometheus asks for first), so the
OpenMetrics parser (strict: `# EOF`, counters' `_total`, TYPE before samples)
must accept it with the types we declare; the classic Prometheus text parser
must read the same samples from it.
Prints one JSON object: {"families": {name: {"type", "help"}},
"samples": [[name, {labels}, value], ...]} (from the OpenMetrics parse).
Exits 1 with the parser's error on a malformed scrape.
"""
import json
import sys

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families


def main():
    text = sys.stdin.read()
    try:
        families = list(openmetrics_families(text))
        # The classic text parser too (what a 0.0.4 scraper reads); it
        # ignores `# EOF` as a comment.
        classic = list(text_families(text))
    except Exception as e:  # the parsers raise ValueError and others
        print(f"parse error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
    # The classic parser groups families by its own rules (a counter's
    # `_total` sample outside its TYPE'd name becomes an untyped family), but
    # both must read the same samples.
    def samples(fams):
        return sorted((s.name, sorted(s.labels.items()), s.value) for f in fams for s in f.samples)

    if samples(classic) != samples(families):
        print(f"parsers disagree:\n{samples(families)}\n{samples(classic)}", file=sys.stderr)
        sys.exit(1)
    out = {"families": {}, "samples": []}
    for f in families:
        out["families"][f.name] = {"type": f.type, "help": f.documentation}
        for s in f.samples:
            out["samples"].append([s.name, s.labels, s.value])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
