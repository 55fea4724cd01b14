"""The engine's one hand-written kernel (`csrc/decode_attention.cpp`), compiled on first use.

`decode_attention()` returns the compiled function, or None where it cannot be had: no C++
compiler, no `ninja`, not an x86 CPU with AVX-512, or `ALIGNLOOP_NATIVE=0` in the environment. The
engine then runs the same attention as torch ops, so nothing but speed depends on it.

It is built with `-march=native` for the CPU it runs on: the build folder's name carries a hash of
the source and of this CPU's flags, so a cache shared between machines never hands one CPU a binary
made for another. The first build takes about a minute on 2 cores (torch's headers); later
processes load it from `torch_extensions`' cache in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"]
# -ffast-math lets GCC reassociate the dot products and call glibc's vector expf; finite math stays
# off so the softmax's max and exp keep IEEE infinities.

_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def why_not() -> str | None:
    """Why the kernel cannot be used here (None: it can)."""
    if os.environ.get("ALIGNLOOP_NATIVE", "1") == "0":
        return "ALIGNLOOP_NATIVE=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if "avx512f" not in cpu_flags():
        return "no AVX-512 on this CPU"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    if importlib.util.find_spec("ninja") is None:
        return "ninja is not installed"
    return None


def build_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + sorted(cpu_flags())).encode()).hexdigest()
    return f"alignloop_decode_attention_{digest[:12]}"


def decode_attention() -> Any:
    """The compiled `decode_attention(q, k_cache, v_cache, lengths, scale)`, or None (see the module)."""
    with _lock:
        if "fn" not in _loaded:
            _loaded["fn"] = _build()
        return _loaded["fn"]


def _build() -> Any:
    reason = why_not()
    if reason is not None:
        return None
    import torch
    from torch.utils.cpp_extension import load

    try:
        # -fopenmp: torch's at::parallel_for is OpenMP in these headers; the library links the
        # libgomp.so.1 torch already loaded (same soname), so both share one thread pool.
        load(name=build_name(), sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as e:  # a broken toolchain must not stop generation: torch ops do the same work
        warnings.warn(f"alignloop: the native decode-attention kernel did not build ({e}); using torch ops",
                      stacklevel=3)
        return None
    return torch.ops.alignloop.decode_attention
