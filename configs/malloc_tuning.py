"""glibc malloc settings for this workload, applied once when the package is imported.

A sampling step allocates and frees the same few large temporaries (edge tensors of a few MB)
every step. With glibc's defaults the top of the heap is trimmed back to the kernel as soon
as more than a few MB are free, and blocks above the (dynamic) mmap threshold are mmap'd and
unmapped per allocation; the next step faults every page in again. On the quick start's model
that put about as much time in the kernel as in the computation (issue 9). Raising the mmap
threshold to its maximum and keeping freed memory in the process removes it; memory is still
reused, it is only not returned to the kernel between steps.

A no-op off glibc (macOS, musl, Windows), when mallopt refuses a value, and when the
environment sets ``EDM_MALLOC_TUNING=0`` (to measure or rule it out).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# glibc caps the mmap threshold at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit); larger blocks stay mmap'd.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 512 * 1024 * 1024  # free heap kept before trimming
TOP_PAD = 64 * 1024 * 1024  # extra heap requested per growth (fewer brk calls)

_applied: dict[str, bool] | None = None


def tune_malloc() -> dict[str, bool]:
    """Apply the settings (once per process); returns which ones glibc accepted."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = {}
    if not sys.platform.startswith("linux") or os.environ.get("EDM_MALLOC_TUNING", "1") == "0":
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has mallopt but other semantics)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return _applied
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    for name, param, value in (("mmap_threshold", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                               ("trim_threshold", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                               ("top_pad", M_TOP_PAD, TOP_PAD)):
        _applied[name] = bool(mallopt(param, value))
    return _applied
