"""The table of scripts/bench-dispatch from its JSON (argument 1): markdown on stdout."""
import datetime, json, os, sys
r = json.load(open(sys.argv[1]))
sides = [(k, r[k]) for k in ("ours", "salt") if k in r]
name = {"ours": "salt-steward dispatcher", "salt": "Salt reactor (state.apply per event)"}

def secs(x):
    return "-" if x is None else f"{x:.1f} s"

def cut_short(s):
    return s["side"] == "salt-reactor" and s.get("drained_s") is None

def runs(s):
    if cut_short(s):
        return f"**{s['runs']}** when it gave up (one per event: {s['changes']})"
    return f"**{s['runs']}**"

def published(s):
    if cut_short(s) and s["bus_published"] < s["changes"]:
        last = s.get("last_published_s")
        if s["bus_returned"] >= s["bus_published"] or (last is not None and s["give_up_s"] - last > 30):
            return (f"{secs(last)}, then none for {s['give_up_s'] - last:.0f} s: "
                    f"{s['bus_published']} of {s['changes']} events became a job")
        return f"still publishing when it gave up ({s['bus_published']} of {s['changes']})"
    return secs(s.get("last_published_s"))

def idle(s):
    if s["bus_returned"] >= s["bus_published"]:
        lost = s["changes"] - s["bus_published"] if cut_short(s) else 0
        tail = f" ({lost} events never ran)" if lost > 0 else ""
        return secs(s.get("last_returned_s")) + tail
    return (f"not after {s['give_up_s']} s (gave up): {s['bus_returned']} of "
            f"{s['bus_published']} returned")

def converge(s):
    if s["converged"]:
        return f"**{s['converge_s']:.1f} s**"
    return (f"not converged: {s['stopped']}; {s['hosts_converged']}/{s['hosts']} hosts, "
            f"{s['forwards_live']}/{s['forwards_wanted']} forwards live")

rows = [
    ("changes (port forwards added)", lambda s: str(s["changes"])),
    ("hosts (real minions, one netns each)", lambda s: str(s["hosts"])),
    ("burst written / fired in", lambda s: secs(s["burst_s"])),
    ("time to converge (every live table final)", converge),
    ("state.apply runs (job cache)", runs),
    ("runs per target (min–max)", lambda s: f"{s['runs_min_per_host']}–{s['runs_max_per_host']}"),
    ("duplicates (runs beyond one per target)",
     lambda s: ("at least " if cut_short(s) else "") + str(s["runs"] - s["hosts"])),
    ("runs published / returned by convergence (bus)",
     lambda s: f"{s['bus_published_by_convergence']} / {s['bus_returned_by_convergence']}"),
    ("last run published at", published),
    ("last run returned at (minions idle)", idle),
]
print("# Inventory dispatch: a burst of changes, salt-steward vs a Salt reactor\n")
print(f"- {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {r['salt_version']}, {os.cpu_count()} CPUs, "
      f"load average {r['loadavg']} at the end")
print(f"- {r['changes']} port-forward changes in one burst over {r['hosts']} Proxmox hosts; "
      f"salt-steward debounce {r['debounce_ms']} ms; minions' process_count_max {r['process_count_max']}")
print("- time from the first change until every host's live nft table holds its final forwards\n")
print("| | " + " | ".join(name[k] for k, _ in sides) + " |")
print("|---" * (len(sides) + 1) + "|")
for label, f in rows:
    print(f"| {label} | " + " | ".join(f(s) for _, s in sides) + " |")
if "ours" in r:
    d = r["ours"].get("dispatch_list")
    if isinstance(d, list):
        done = sum(1 for t in d if t.get("status") == "done" and t.get("applied") == t.get("desired"))
        print(f"\nsalt-steward `dispatch list --json` after the run: {len(d)} targets, "
              f"{done} done with applied = desired")
        for t in d:
            keep = {k: t.get(k) for k in ("server", "state", "status", "desired", "applied", "attempts", "last_jid") if k in t}
            print(f"- {json.dumps(keep)}")
    elif d is not None:
        print(f"\nsalt-steward `dispatch list --json`: {json.dumps(d)[:2000]}")
for k, s in sides:
    per = ", ".join(f"{h} {n}" for h, n in s["runs_per_host"].items())
    print(f"\n{name[k]}: runs per host: {per}.")
    f = s.get("reactor_failures")
    if f and f["count"]:
        print(f"The master logged {f['count']} failed reactions (change events whose state.apply "
              f"was never published); the first one's cause: `{f['why']}`.")
    if f and f.get("slow_subscribers_discarded"):
        print(f"The master's event publisher discarded {f['slow_subscribers_discarded']} slow "
              "subscriber(s) (\"Publisher discarding slow subscriber\", drain timeout 60 s): "
              "a reactor dropped that way misses the events published until it reconnects.")
