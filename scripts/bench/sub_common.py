"""What every Python subscriber of scripts/bench-bus prints at the end."""
import json
import resource


def cpu_now():
    """This process's CPU time so far (user + system), in seconds."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def report(subscriber, n, t_first, t_last, cpu0, **extra):
    """Prints the one JSON line bench-bus reads."""
    dt = (t_last - t_first) if n else 0.0
    print(json.dumps({
        "subscriber": subscriber,
        "received": n, "t_first": t_first, "t_last": t_last,
        "seconds": round(dt, 3), "rate_per_s": round(n / dt) if dt else None,
        "cpu_seconds": round(cpu_now() - cpu0, 2),
        **extra,
    }), flush=True)
