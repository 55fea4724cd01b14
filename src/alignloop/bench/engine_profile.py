"""`alignloop bench engine-profile`: where a decode step of our engine spends its time.

`bench generate` says how fast the engine is against its peers and against the GEMM roofline;
this says why it is not faster. It runs the fixed-length rollout workload (the 64 bench prompts,
EOS ignored, so every decode step has all 64 rows) once untimed, then once under torch's
profiler, and sorts the profiler's per-operator time (self time on the calling thread: with
intra-op threads, that is the wall time the step waits for the op) into what a decode step is
made of:

    gemm        the linear layers and the LM head (MKL / oneDNN linear ops, mm, addmm)
    attention   the native decode-attention kernel where it runs (bf16 on an AVX-512 CPU; it also
                writes the new keys/values), else the batched matmuls, their softmax, the copies
                of the strided cache slices into contiguous buffers, the mask and scale (and
                prefill's fused attention)
    kv_write    each layer's new keys/values into the cache (index_copy_) without the kernel
    norm_rope   RMSNorm, rotary embedding (mul, cat, add of rotations), SiLU and the residual adds
                (with the native kernels: `add_rms_norm` and `silu_mul`; the rotation is inside
                the attention kernel)
    sampling    every op on [rows, vocab] tensors but the LM head (the logits' fp32 copy, softmax,
                top-p), random numbers, argmax
    other_ops   every other operator (embedding, indexing, conversions, small tensors)
    python      the rest of the wall time: the scheduler, Python between ops, the profiler's own cost

The GEMM part is set beside the roofline's time for the same GEMMs at 64 rows (`bench.roofline`),
so the line shows both how close the engine's own matmuls come to the best kernel and how much
of a step is not matmul at all. The profiler adds a few microseconds per op; `wall_s_unprofiled`
is the same run without it, and the shares are of the profiled wall time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from torch.profiler import ProfilerActivity, profile

from alignloop.bench.generate import MAX_BATCH, Ours, eos_ids, workload
from alignloop.bench.harness import fixed_threads, machine_facts
from alignloop.bench.roofline import GemmRoofline
from alignloop.engine.engine import pick_dtype
from alignloop.engine.llama import Arch
from alignloop.models import load_model
from alignloop.ui import say

# Operator name -> part of the step. Names not listed fall into "other_ops"; matching is by the
# operator's full name, so an unexpected kernel shows up there rather than being guessed.
PARTS: dict[str, str] = {
    "mkl::_mkl_linear": "gemm", "mkldnn::_linear_pointwise": "gemm", "aten::linear": "gemm",
    "aten::mm": "gemm", "aten::addmm": "gemm", "aten::matmul": "gemm",
    "aten::bmm": "attention", "aten::_softmax": "attention", "aten::softmax": "attention",
    "aten::copy_": "attention", "aten::add": "attention", "aten::masked_fill_": "attention",
    "aten::index_copy_": "kv_write", "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "alignloop::decode_attention": "attention",
    "aten::rms_norm": "norm_rope", "aten::_fused_rms_norm": "norm_rope", "aten::mul": "norm_rope",
    "aten::mul_": "norm_rope", "aten::cat": "norm_rope", "aten::silu": "norm_rope", "aten::add_": "norm_rope",
    "aten::silu_": "norm_rope", "alignloop::add_rms_norm": "norm_rope", "alignloop::silu_mul": "norm_rope",
    "aten::argmax": "sampling", "aten::multinomial": "sampling", "aten::topk": "sampling",
    "aten::sort": "sampling", "aten::cumsum": "sampling", "aten::div": "sampling", "aten::rand": "sampling",
    "aten::uniform_": "sampling", "aten::exp": "sampling", "aten::sum": "sampling", "aten::where": "sampling",
    "aten::gt": "sampling", "aten::lt": "sampling", "aten::le": "sampling", "aten::ge": "sampling",
    "aten::_to_copy": "other_ops",
}


def run_profile(model: str = "smollm2-135m", dtype: str = "auto", n_prompts: int = 64, max_tokens: int = 128,
                threads: int | None = None, top: int = 12) -> dict[str, Any]:
    with fixed_threads(threads) as n_threads:
        ours_dtype = str(pick_dtype(dtype)).removeprefix("torch.")
        fp32_model, tokenizer = load_model(model, dtype="float32")
        work = workload(tokenizer, eos_ids(fp32_model, tokenizer), n_prompts, max_tokens).fixed_length()
        side = Ours(fp32_model, tokenizer, ours_dtype, work)
        side()  # warm-up: packing, first-touch of the cache, oneDNN's kernel choice
        plain = side()
        say(f"engine-profile: {plain['useful'] / plain['seconds']:.1f} tok/s unprofiled; profiling one run")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            began = time.perf_counter()
            profiled = side()
            wall = time.perf_counter() - began
        ceiling = GemmRoofline(Arch.from_config(fp32_model.config), ours_dtype, min(MAX_BATCH, len(work.chats)))
        gemm_step_s = min(_timed_step(ceiling) for _ in range(5))

    parts: dict[str, float] = defaultdict(float)
    ops: list[tuple[str, float, int]] = []
    vocab = side.engine.lm.arch.vocab
    for event in prof.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6
        if seconds <= 0:
            continue
        part = part_of(event.key, event.input_shapes, vocab)
        parts[part] += seconds
        ops.append((f"{event.key} {_shapes(event.input_shapes)}", seconds, event.count))
    parts["python"] = max(wall - sum(parts.values()), 0.0)
    steps = int(side.engine.stats["decode_steps"])
    tokens = profiled["useful"]
    line = {
        "bench": "engine-profile", "dtype": ours_dtype, "unit": "s",
        "workload": {"model": model, "prompts": len(work.chats), "max_tokens": max_tokens, "ignore_eos": True},
        "tokens": tokens, "decode_steps": steps,
        "wall_s_unprofiled": round(plain["seconds"], 3), "wall_s": round(wall, 3),
        "parts_s": {k: round(v, 3) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        "parts_share": {k: round(v / wall, 3) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        "per_step_ms": {k: round(1e3 * v / max(steps, 1), 2) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        "gemm_ceiling_step_ms": round(1e3 * gemm_step_s, 2),
        "top_ops": [{"op": k, "s": round(s, 3), "calls": c} for k, s, c in sorted(ops, key=lambda o: -o[1])[:top]],
        "machine": machine_facts(n_threads),
    }
    return line


def part_of(op: str, shapes: list, vocab: int) -> str:
    """The part of a decode step an operator call belongs to. The LM head is a GEMM; every other op
    on a [rows, vocab] tensor (the logits' conversion, softmax, top-p) is sampling."""
    part = PARTS.get(op, "other_ops")
    dims = [s for s in shapes or [] if isinstance(s, list) and s]
    if part != "gemm" and any(s[-1] == vocab for s in dims):
        return "sampling"
    if op in ("aten::copy_", "aten::add"):
        # copies of cache slices and the score mask are 3-4-d (rows, heads, positions, ...); on
        # [rows, hidden] a copy is a dtype conversion and an add a residual
        return "attention" if dims and len(dims[0]) >= 3 else ("other_ops" if op == "aten::copy_" else "norm_rope")
    return part


def _shapes(shapes: list) -> str:
    return ",".join("x".join(map(str, s)) for s in shapes or [] if isinstance(s, list) and s)


def _timed_step(ceiling: GemmRoofline) -> float:
    """One 64-row step of the roofline's GEMMs, in seconds."""
    result = ceiling()
    return result["seconds"] / ceiling.steps
