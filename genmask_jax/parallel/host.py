"""Host memory settings for runs on XLA:CPU (glibc's allocator), applied before jax starts its backends."""

import ctypes
import ctypes.util
import importlib.util
import os

# mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_ACCELERATOR_MODULES = (
    "libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin"
)


def cpu_only() -> bool:
    """Whether jax will run on the CPU: `JAX_PLATFORMS=cpu`, or no GPU/TPU plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_MODULES)


def reuse_freed_memory() -> bool:
    """Makes glibc keep freed memory for reuse in the process instead of handing it back to the OS.

    XLA:CPU allocates the temporaries of each execution as one block (385 MB for the DiT
    forward+backward of bench/bench_dit.py) and frees it at the end. glibc serves a block that large
    from a fresh mmap when the allocating thread has an arena of its own, and unmaps it on free, so
    every step faults in every page again and the kernel zeroes it: about 100,000 page faults per
    step there. With one arena, no mmap and a 2 GiB trim threshold the block comes from the heap and
    stays there: after the heap has grown by a few blocks over the first steps, a step faults in
    nothing, and that forward+backward takes 6-18% less on a 2-core machine (BENCHMARKS.md). The
    price is that the process keeps its peak heap.

    Affects only threads that have not allocated yet: call it before jax starts its backends. Returns
    whether the settings were applied (False off glibc).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(param, value) == 1
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    )
