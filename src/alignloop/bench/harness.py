"""What every `alignloop bench` shares: the thread count, the machine facts, alternating rounds, and
the median/min/max summary that goes into the JSON line.

The rules, one place for all benches:
- threads are fixed: `--threads`, default every core this process may run on
  (`os.sched_getaffinity`), never guessed from the load average (a loaded start would silently
  run one side, or both, on one thread and report it as the machine's speed);
- every configuration, ours and the peer's, runs once untimed first (first-call allocations,
  kernel selection, oneDNN primitive caches), then in `rounds` >= 3 timed rounds whose order
  flips every round, so load that comes and goes hits both sides alike;
- a rate is reported as the median over rounds with the min and max beside it;
- the JSON line carries the machine (CPU, ISA, AMX or not, threads, library versions), so a ratio
  is never read without the hardware it was measured on.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

import torch

from alignloop.engine import allocator
from alignloop.kernels import native
from alignloop.kernels.native import cpu_flags
from alignloop.train.threads import torch_threads
from alignloop.ui import say

MIN_ROUNDS = 3


# --- threads -------------------------------------------------------------------------------------


def all_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def bench_threads(threads: int | None) -> int:
    """`threads` as asked, or every core this process may run on."""
    return threads if threads else all_cores()


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Run the block with the bench's fixed torch thread count (intra-op), then restore it."""
    n = bench_threads(threads)
    with torch_threads(n):
        yield n


# --- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa(flags: set[str] | None = None) -> str:
    """The widest matrix/vector ISA the CPU offers, as oneDNN would pick its bf16 kernels from it."""
    flags = cpu_flags() if flags is None else flags
    for name, needs in (("amx_bf16", {"amx_bf16", "amx_tile"}), ("avx512_bf16", {"avx512_bf16"}),
                        ("avx512", {"avx512f"}), ("avx2", {"avx2"})):
        if needs <= flags:
            return name
    return platform.machine()


def has_amx(flags: set[str] | None = None) -> bool:
    return {"amx_bf16", "amx_tile"} <= (cpu_flags() if flags is None else flags)


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_facts(threads: int, peers: tuple[str, ...] = ()) -> dict[str, Any]:
    """The hardware and software a ratio was measured on: CPU, ISA, AMX, threads, this process's
    memory allocator, whether ours ran on its native kernels, versions."""
    flags = cpu_flags()
    return {"cpu": cpu_model(), "isa": isa(flags), "amx": has_amx(flags), "cores": all_cores(), "threads": threads,
            "torch": torch.__version__, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "allocator": allocator.describe(), "native_kernels": native.status(),
            "versions": {p: version(p) for p in ("alignloop", *peers)}}


# --- rounds --------------------------------------------------------------------------------------


def alternate_rounds(configs: dict[str, Callable[[], dict[str, Any]]], rounds: int = MIN_ROUNDS,
                     warmup: bool = True, label: str = "bench") -> dict[str, list[dict[str, Any]]]:
    """Run every configuration once untimed, then `rounds` timed rounds, the order flipping each round.

    Each configuration is a callable that does the whole timed unit of work once and returns a
    dict with at least `useful` (the work that counts: tokens, rows, ...) and `seconds` (the time it
    took, measured by the callable around exactly the work, or by this function when absent).
    Extra keys (e.g. `computed`, the tokens actually run through the model) are kept.
    Returns every timed result per configuration, in round order.
    """
    if rounds < MIN_ROUNDS:
        raise ValueError(f"{label}: at least {MIN_ROUNDS} rounds, got {rounds}")
    names = list(configs)
    if warmup:
        for name in names:
            say(f"{label}: warm-up {name}")
            configs[name]()
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            began = time.perf_counter()
            result = dict(configs[name]())
            result.setdefault("seconds", time.perf_counter() - began)
            out[name].append(result)
            say(f"{label} round {r + 1}/{rounds} {name}: {rate(result):.1f}/s")
    return out


def rate(result: dict[str, Any], key: str = "useful") -> float:
    return result[key] / result["seconds"] if result["seconds"] else 0.0


def summary(results: list[dict[str, Any]], key: str = "useful") -> dict[str, float]:
    """Median, min and max of the per-round rate (`key` per second), with the rounds counted."""
    rates = [rate(r, key) for r in results]
    return {"median": round(statistics.median(rates), 2), "min": round(min(rates), 2),
            "max": round(max(rates), 2), "rounds": len(rates)}


def ratio(ours: dict[str, float], peer: dict[str, float]) -> float:
    """The headline ratio: median over median."""
    return round(ours["median"] / peer["median"], 2) if peer["median"] else float("inf")


def headline(bench: str, ours: dict[str, float], peer: dict[str, float], unit: str, *, ours_config: str,
             peer_config: str, machine: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The one JSON line every bench ends with: `ours`, `peer`, `unit`, `ratio` first (medians), then
    each side's min/max and configuration, the machine facts, and whatever the bench adds (token
    accounting, the best-of-each comparison, settings)."""
    return {"bench": bench, "ours": ours["median"], "peer": peer["median"], "unit": unit, "ratio": ratio(ours, peer),
            "ours_min_max": [ours["min"], ours["max"]], "peer_min_max": [peer["min"], peer["max"]],
            "rounds": min(ours["rounds"], peer["rounds"]), "ours_config": ours_config, "peer_config": peer_config,
            **extra, "machine": machine}
