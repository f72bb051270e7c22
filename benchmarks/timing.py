"""Best-of-N wall time, shared by the benchmarks (the machine may be shared: the fastest run is
the one least disturbed)."""
import datetime
import math
import os
import subprocess
import time


def best_time(function, repeats):
    """(seconds of the fastest of ``repeats`` calls, what that call returned)."""
    return best_times_interleaved([function], repeats)[0]


def best_times_interleaved(functions, repeats):
    """Like :func:`best_time` for several functions, called in turn within each repeat, so that a
    change in the machine's load falls on all of them rather than on whichever ran then.
    Returns [(seconds, result)] in the order of ``functions``."""
    best = [(math.inf, None)] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            result = function()
            seconds = time.perf_counter() - start
            if seconds < best[index][0]:
                best[index] = (seconds, result)
    return best


def run_stamp():
    """When and at which commit a benchmark ran, for the record kept beside its figures."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=here, check=True).stdout.strip()
        commit += " with uncommitted changes" if changed else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, " \
           f"load average {os.getloadavg()[0]:.1f}"
