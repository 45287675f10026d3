"""Timing shared by the benchmark scripts."""

import statistics
import time


def median_ms(fn, reps: int) -> float:
    """Median wall milliseconds of `fn()` over `reps` calls after one warm-up call (compile, caches)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
