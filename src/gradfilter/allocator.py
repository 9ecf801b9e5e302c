"""Keep freed CPU memory for reuse instead of returning it to the OS (glibc only).

PyTorch's CPU allocator is plain ``malloc``. glibc serves blocks above its mmap threshold (128 KiB,
rising to at most 32 MiB) with fresh ``mmap`` pages and unmaps them on ``free``, so every training
step faults in, and the kernel zeroes, every large activation and gradient again. Measured on
this project's 2-core VM (docs/performance.md), that is most of a MobileNetV2 forward at 224² and
most of the filtered backward on big maps. :func:`tune_cpu_allocator` sets ``M_MMAP_MAX=0`` and a
huge ``M_TRIM_THRESHOLD``, so large blocks come from the heap and stay there for the next step —
what the CUDA caching allocator does on GPUs, and what ``LD_PRELOAD``-ing jemalloc/tcmalloc does
on CPUs. The cost: the process keeps its peak heap size until it exits.

It changes the whole process, vanilla PyTorch included; the benchmarks apply it to both methods
alike. Equivalent without code: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["allocator_tuned", "tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_state = {"tuned": False}


def tune_cpu_allocator() -> bool:
    """Make glibc keep freed large blocks for reuse; return False where this is not glibc.

    Processes started afterwards (benchmark workers, data loaders) inherit it through glibc's
    ``MALLOC_MMAP_MAX_``/``MALLOC_TRIM_THRESHOLD_`` environment variables, set here too.
    """
    if _state["tuned"]:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if ok:
        os.environ["MALLOC_MMAP_MAX_"] = "0"
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(2**31 - 1)
    _state["tuned"] = ok
    return ok


def allocator_tuned() -> bool:
    """Whether this process's malloc keeps freed large blocks (tuned here or by environment)."""
    return _state["tuned"] or os.environ.get("MALLOC_MMAP_MAX_") == "0"
