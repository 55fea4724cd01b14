"""Hand-written CPU kernels (`csrc/*.cpp`), compiled on first use into one library:

    decode_attention   the engine's decode-step attention over its bf16 KV cache, read in place
                       (rotating q and k on the way in)
    add_rms_norm       the engine's residual add and RMSNorm in one op, and `silu_mul`: its MLP's
                       activation from the fused gate|up output
    softmax_blocks     a logits matrix's log-normaliser and per-block probability mass (sampling),
                       and `mass_above`: the mass more likely than a drawn token (its top-p test)
    packed_attention   the reward encoder's self-attention of texts packed without padding
    layer_norm         the reward encoder's LayerNorm (bf16), one read and one write per row

`op(name)` returns the compiled operator (`torch.ops.alignloop.<name>`), or None where it cannot
be had: no C++ compiler, no `ninja`, not an x86 CPU with AVX-512, or `ALIGNLOOP_NATIVE=0` in the
environment. Their callers then do the same work in torch ops: nothing but speed depends on them.

It is built with `-march=native` for the CPU it runs on: the build folder's name carries a hash of
the sources and of this CPU's flags, so a cache shared between machines never hands one CPU a binary
made for another. The first build takes 20-30 s on 2 cores (torch's headers); later processes
load it from `torch_extensions`' cache in well under a second.
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

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "decode_attention.cpp", CSRC / "layer_ops.cpp", CSRC / "softmax_blocks.cpp",
           CSRC / "packed_attention.cpp", CSRC / "layer_norm.cpp"]
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp"]
# -ffast-math lets GCC reassociate the sums into vector lanes and if-convert the max; it also
# assumes finite floats, so the kernels check their inputs' bits where an infinity can come in
# (masked logits) and leave such rows to torch ops.

_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
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
    text = b"".join(p.read_bytes() for p in sorted(CSRC.iterdir())) + " ".join(FLAGS + sorted(cpu_flags())).encode()
    return f"alignloop_kernels_{hashlib.sha256(text).hexdigest()[:12]}"


def op(name: str) -> Any:
    """The compiled operator `name` (see the module), or None."""
    with _lock:
        if "built" not in _loaded:
            _loaded["built"] = _build()
        return getattr(_loaded["built"], name) if _loaded["built"] is not None else None


def status() -> str:
    """For reports, without building anything: "on" (built and loaded in this process), "off: <why>",
    or "not used" (this process has not asked for them)."""
    reason = why_not()
    if reason is not None:
        return f"off: {reason}"
    if "built" not in _loaded:
        return "not used"
    return "on" if _loaded["built"] is not None else "off: the build failed"


def decode_attention() -> Any:
    return op("decode_attention")


def add_rms_norm() -> Any:
    return op("add_rms_norm")


def silu_mul() -> Any:
    return op("silu_mul")


def softmax_blocks() -> Any:
    return op("softmax_blocks")


def mass_above() -> Any:
    return op("mass_above")


def packed_attention() -> Any:
    return op("packed_attention")


def layer_norm() -> Any:
    return op("layer_norm")


def _build() -> Any:
    if why_not() is not None:
        return None
    import torch
    from torch.utils.cpp_extension import load

    try:
        # -fopenmp: torch's at::parallel_for is OpenMP in these headers; the library links the
        # libgomp.so.1 torch already loaded (same soname), so both share one thread pool.
        load(name=build_name(), sources=[str(p) for p in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as e:  # a broken toolchain must not stop generation: torch ops do the same work
        warnings.warn(f"alignloop: the native kernels did not build ({e}); using torch ops", stacklevel=3)
        return None
    return torch.ops.alignloop
