"""The memory allocator under the engine: keep freed memory instead of faulting fresh pages in.

A decode step allocates the same few dozen tensors every step, several of them hundreds of
kilobytes to megabytes (SmolLM2 at 64 rows: a layer's fused q|k|v 393 KB, gate|up 393 KB; the
logits 6.3 MB in bf16, their fp32 copy and the probabilities 12.6 MB each). glibc's malloc serves
blocks that large with mmap and unmaps them on free (its threshold only adapts upwards as blocks
are freed) and trims the heap's free top, so step after step the kernel faults in and zeroes the
same pages again. Profiled on a 2-core AMX Xeon (64 rows, EOS ignored): the logits' fp32 copy took
6.8 ms a step and their softmax 8.3 ms, against 0.34 and 0.85 ms on a reused tensor.

Two remedies, both measured there on `alignloop bench generate`'s workload (bf16, 3 rounds each,
useful tok/s sampled / fixed-length): glibc as it comes 785 / 841; `keep_freed_memory()` below
(mallopt: blocks up to 32 MB from the heap, no trimming under 1 GB, 64 MB of top padding) 875 /
974; TCMalloc preloaded (`LD_PRELOAD=libtcmalloc_minimal.so.4`, what vLLM's CPU docs ask for)
938 / 1023. The engine applies the first itself; `tcmalloc_path()` finds the second for a
process about to start (`alignloop bench generate` restarts itself under it, as vLLM's worker
runs under it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

# Where Debian/Ubuntu (libtcmalloc-minimal4) and Fedora put TCMalloc.
TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
                  "/usr/lib/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20   # glibc's own ceiling for the adaptive threshold
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20

_tuned = False


def tcmalloc_path() -> str | None:
    """The system's TCMalloc library, if installed."""
    return next((p for p in TCMALLOC_PATHS if Path(p).exists()), None)


def ld_preload(first: list[str], current: str) -> str:
    """An LD_PRELOAD value: `first`, then what `current` already preloads, each library once."""
    rest = [p for p in current.split(":") if p and p not in first]
    return ":".join([*first, *rest])


def tcmalloc_loaded() -> bool:
    """Is TCMalloc mapped into this process (preloaded)?"""
    try:
        return "tcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc so freed blocks are reused rather than unmapped or trimmed (see the
    module). Process-wide, idempotent; does nothing under TCMalloc or without glibc. Returns
    whether glibc is now tuned. The cost: up to about a gigabyte of freed memory stays mapped."""
    global _tuned
    if _tuned:
        return True
    if tcmalloc_loaded():
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD)))
    return _tuned


def describe() -> str:
    """Which allocator this process runs on, for benchmark lines."""
    if tcmalloc_loaded():
        return "tcmalloc (preloaded)"
    return "glibc malloc, tuned (keep_freed_memory)" if _tuned else "glibc malloc"
