"""Resident memory of this process from /proc (Linux), shared by the benchmarks."""


def _status_mib(field):
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mib():
    return _status_mib("VmRSS")


def reset_peak_rss():
    """Reset VmHWM (Linux >= 4.0), so the peak covers only what follows. ru_maxrss cannot be
    used: it never goes down, and a subprocess inherits its parent's peak through fork + exec."""
    with open("/proc/self/clear_refs", "w") as stream:
        stream.write("5")


def peak_rss_mib():
    """Highest RSS since the last :func:`reset_peak_rss` (or since the process started)."""
    return _status_mib("VmHWM")
