"""Resident memory of this process from /proc (Linux), shared by the benchmarks."""


def _status_mib(field):
    try:
        with open("/proc/self/status") as stream:
            for line in stream:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def current_rss_mib():
    return _status_mib("VmRSS")


def reset_peak_rss():
    """Reset VmHWM (Linux >= 4.0), so the peak covers only what follows; False where /proc
    does not allow it (the peak then runs from the process start). ru_maxrss is no substitute:
    it never goes down, and a subprocess inherits its parent's peak through fork + exec."""
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib():
    """Highest RSS since the last successful :func:`reset_peak_rss` (or since the process started)."""
    peak = _status_mib("VmHWM")
    if peak != peak:  # no /proc: the running maximum of the resource module
        import resource

        import sys

        # ru_maxrss is in KiB on Linux and in bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    return peak
