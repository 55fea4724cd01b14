"""The GEMM roofline of a decode step, measured on this machine.

A decode step of a Llama-family model multiplies the batch's rows (one new token per sequence)
by every linear layer's weight: q, k, v, o, gate, up and down in each layer, then the LM head.
`GemmRoofline` times exactly those matrix multiplies, at the model's real shapes, in a given dtype,
with `rows` rows, back to back over freshly allocated weights of the model's size (so the weights
stream from memory as they do in a real step, instead of sitting in cache), and nothing else: no
attention, norms, activations, sampling or scheduling. `rows` divided by the time of one such
step is the tokens/s a decoder would reach if a step cost nothing but its GEMMs: a ceiling.
A bench reports `ours / ceiling` as the fraction of it that a real engine reaches.

The ceiling is the best this machine does, not the kernel our engine happens to use: it tries
the model's own layer shapes and the fused ones (q|k|v and gate|up as one weight each), with
torch's plain `F.linear` and with weights pre-packed for MKL (fp32) / oneDNN (bf16), and keeps
the fastest.

`WorkloadCeiling` is the same roofline for a workload whose steps have fewer rows as sequences
finish (sampling with EOS): the GEMM-only time of the steps it actually ran, row count by row count.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from alignloop.engine.llama import Arch, PackedLinear


def linear_shapes(arch: Arch, fused: bool = False) -> list[tuple[int, int]]:
    """(in_features, out_features) of every linear layer one decode step runs, the LM head last.

    `fused`: q|k|v and gate|up as one weight each (same multiply-adds, fewer and wider GEMMs).
    """
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    if fused:
        layer = [(arch.hidden, q + 2 * kv), (q, arch.hidden), (arch.hidden, 2 * arch.intermediate),
                 (arch.intermediate, arch.hidden)]
    else:
        layer = [(arch.hidden, q), (arch.hidden, kv), (arch.hidden, kv), (q, arch.hidden),
                 (arch.hidden, arch.intermediate), (arch.hidden, arch.intermediate), (arch.intermediate, arch.hidden)]
    return layer * arch.layers + [(arch.hidden, arch.vocab)]


def flops_per_row(arch: Arch) -> int:
    """Multiply-adds (x2) of one decode step's GEMMs for one row."""
    return 2 * sum(k * n for k, n in linear_shapes(arch))


class _Chain:
    """One decode step's GEMMs, each over its own weight (allocated once, here); `step(rows)` is
    a callable that runs them all on `rows` input rows."""

    def __init__(self, arch: Arch, dtype: torch.dtype, fused: bool, packed: bool):
        gen = torch.Generator().manual_seed(0)
        self.dtype, self.shapes = dtype, linear_shapes(arch, fused)
        weights = [(torch.rand(n, k, generator=gen) - 0.5).mul_(0.04).to(dtype) for k, n in self.shapes]
        self.linears = [PackedLinear(w) if packed else (lambda x, w=w: F.linear(x, w)) for w in weights]
        self._steps: dict[int, Callable[[], None]] = {}

    def step(self, rows: int) -> Callable[[], None]:
        if rows not in self._steps:
            gen = torch.Generator().manual_seed(rows)
            inputs = {k: torch.randn(rows, k, generator=gen).to(self.dtype) for k, _ in self.shapes}
            pairs = [(fn, inputs[k]) for fn, (k, _) in zip(self.linears, self.shapes)]

            @torch.inference_mode()
            def run() -> None:
                for fn, x in pairs:
                    fn(x)

            self._steps[rows] = run
        return self._steps[rows]


class GemmRoofline:
    """The GEMM-only decode step at `rows` rows in `dtype`: a bench configuration of its own.

    Built once (it picks the fastest layout and kernel, untimed); each call then times `steps`
    steps one by one and returns {"useful": rows * steps, "computed": same, "seconds": steps x
    the median step, "step_ms": [fastest, median, slowest]}, so it can run in
    `harness.alternate_rounds` beside the engines and see the same load they see.

    The median step, not the sum: a ceiling errs high or not at all. A step that another process
    interrupts is slower than what the machine does, and a ceiling lowered by it would flatter every
    fraction measured against it. Measured on a 2-core AMD EPYC (bf16, SmolLM2, 64 rows): 4 steps
    summed gave 751 to 1,263 tok/s in the three rounds of one bench; 16 steps one by one, medians
    of 46.8-51.0 ms (1,255-1,368 tok/s), with single steps up to 150 ms.
    """

    def __init__(self, arch: Arch, dtype: str | torch.dtype, rows: int, steps: int = 16):
        self.arch, self.rows, self.steps = arch, rows, steps
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.choice, self.chain = self._fastest()
        self.step = self.chain.step(rows)

    def _fastest(self) -> tuple[str, _Chain]:
        best: tuple[float, str, _Chain] | None = None
        for fused in (False, True):
            for packed in (False, True):
                if packed and PackedLinear(torch.zeros(1, 1, dtype=self.dtype)).kind == "plain":
                    continue  # no MKL / oneDNN here: plain F.linear is the only kernel
                chain = _Chain(self.arch, self.dtype, fused, packed)
                step = chain.step(self.rows)
                step()  # first call: kernel selection, packing caches
                seconds = min(_timed(step) for _ in range(2))
                name = f"{'fused' if fused else 'per-layer'} weights, {'pre-packed' if packed else 'F.linear'}"
                if best is None or seconds < best[0]:
                    best = (seconds, name, chain)
                del chain, step  # the best so far stays in `best`; the others are freed as we go
        assert best is not None
        return best[1], best[2]

    def __call__(self) -> dict[str, Any]:
        times = sorted(_timed(self.step) for _ in range(self.steps))
        median = statistics.median(times)
        return {"useful": self.rows * self.steps, "computed": self.rows * self.steps, "seconds": median * self.steps,
                "step_ms": [round(times[0] * 1e3, 2), round(median * 1e3, 2), round(times[-1] * 1e3, 2)]}

    def step_seconds(self, rows: int, steps: int) -> float:
        """The median of `steps` GEMM-only steps at `rows` rows (same weights and kernel)."""
        step = self.chain.step(rows)
        step()  # first call at this shape: oneDNN picks its kernel
        return statistics.median(_timed(step) for _ in range(steps))

    def facts(self) -> dict[str, Any]:
        return {"dtype": str(self.dtype).removeprefix("torch."), "rows": self.rows, "kernel": self.choice,
                "gflop_per_step": round(flops_per_row(self.arch) * self.rows / 1e9, 2)}


class WorkloadCeiling:
    """The GEMM roofline of the decode steps a workload actually ran: a bench configuration too.

    With EOS a sampled rollout's batch shrinks as sequences finish: its steps run 64 rows, then
    fewer, down to one (`Engine.step_rows` counts them). A GEMM-only step does not get cheaper in
    proportion (on a 2-core AMD EPYC, bf16, SmolLM2: 49.5 ms at 64 rows, 46.2 at 53, 26.8 at 32,
    13.1 at 1; weights are read whole at any row count), so 64 rows' tokens/s is a ceiling such a
    workload cannot reach. This one is: each call times `steps` steps (median) at each row count of
    `grid`, interpolates between them, and returns the histogram's tokens over the time its steps'
    GEMMs take ({"useful": tokens, "seconds": s}). `step_rows` gives the histogram (the side's
    last run: the same seeded work every round); it is read at each call.
    """

    GRID = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)

    def __init__(self, roofline: GemmRoofline, step_rows: Callable[[], dict[int, int]], steps: int = 5,
                 grid: tuple[int, ...] = GRID):
        self.roofline, self.step_rows, self.steps = roofline, step_rows, steps
        self.grid = tuple(sorted({g for g in grid if g <= roofline.rows} | {roofline.rows}))

    def __call__(self) -> dict[str, Any]:
        histogram = self.step_rows()
        if not histogram:
            raise RuntimeError("workload ceiling: the side it follows has not run yet (no decode steps counted)")
        if max(histogram) > self.grid[-1]:
            raise ValueError(f"workload ceiling: a step of {max(histogram)} rows, past the roofline's {self.grid[-1]}")
        times = {rows: self.roofline.step_seconds(rows, self.steps) for rows in self.grid}
        seconds = sum(count * interpolate(times, rows) for rows, count in histogram.items())
        tokens = sum(rows * count for rows, count in histogram.items())
        return {"useful": tokens, "computed": tokens, "seconds": seconds, "steps": sum(histogram.values()),
                "step_ms": {rows: round(t * 1e3, 2) for rows, t in times.items()}}


def interpolate(times: dict[int, float], rows: int) -> float:
    """times[rows], or linear between the nearest measured row counts around it."""
    if rows in times:
        return times[rows]
    known = sorted(times)
    if rows < known[0]:
        return times[known[0]]  # below the smallest measured: as cheap as it, no cheaper
    above = next(r for r in known if r > rows)
    below = max(r for r in known if r < rows)
    return times[below] + (times[above] - times[below]) * (rows - below) / (above - below)


def _timed(step: Callable[[], None]) -> float:
    began = time.perf_counter()
    step()
    return time.perf_counter() - began


def fraction(ours_tok_s: float, ceiling_tok_s: float) -> float:
    """ours / ceiling, rounded; 0 when the ceiling is unknown."""
    return round(ours_tok_s / ceiling_tok_s, 3) if ceiling_tok_s else 0.0
