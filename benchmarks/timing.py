"""Best-of-N wall time, shared by the benchmarks (the machine may be shared: the fastest run is
the one least disturbed)."""
import math
import time


def best_time(function, repeats):
    """(seconds of the fastest of ``repeats`` calls, what that call returned)."""
    best, best_result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds = time.perf_counter() - start
        if seconds < best:
            best, best_result = seconds, result
    return best, best_result
