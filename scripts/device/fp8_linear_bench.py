"""Device check: the fused FP8 linear (alignloop.fp8.triton_linear) against nn.Linear in bf16.

    python scripts/device/fp8_linear_bench.py        # on a machine with a CUDA GPU (sm 8.9+) and Triton

For each shape (tokens x in -> out, Llama-7B-like and DeepSeek-expert-like), it checks the result
against the pure-torch blockwise GEMM (same inputs, fp32 accumulation per 128-wide K block; max
relative error printed) and times both with CUDA events, median of 50 after 10 warm-ups. The last
line is one JSON object {"ours", "peer", "unit", "ratio"} with ratio = fp8 time / bf16 time (goal
<= 1.2). Without a GPU it prints why and exits 0, so CI and CPU machines can run it.
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

SHAPES = [(4096, 4096, 4096), (4096, 4096, 11008), (4096, 11008, 4096), (512, 7168, 2048), (128, 2048, 7168)]


def main() -> int:
    from alignloop.fp8 import triton_linear
    from alignloop.fp8.blockwise import blockwise_gemm, quantize_activation, quantize_weight

    if not triton_linear.available():
        print("skipped: the fused FP8 linear needs Triton and a CUDA GPU with compute capability 8.9+")
        return 0
    torch.manual_seed(0)
    ratios = []
    for m, k, n in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda") * 0.02
        q, s = quantize_weight(w)
        dense = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            dense.weight.copy_(w)
        fused = triton_linear.fp8_linear(x, q, s).float()
        qa, sa = quantize_activation(x.float())
        reference = blockwise_gemm(qa, sa, q, s)
        err = float((fused - reference).abs().max() / reference.abs().max())

        def timed(fn) -> float:
            for _ in range(10):
                fn()
            times = []
            for _ in range(50):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

        with torch.no_grad():
            t_fp8 = timed(lambda: triton_linear.fp8_linear(x, q, s))
            t_bf16 = timed(lambda: dense(x))
        ratios.append(t_fp8 / t_bf16)
        print(f"{m}x{k}->{n}: fp8 {t_fp8:.3f} ms, bf16 {t_bf16:.3f} ms, x{t_fp8 / t_bf16:.2f}; max rel err vs "
              f"blockwise reference {err:.2e}")
    ratio = statistics.median(ratios)
    print(json.dumps({"ours": round(ratio, 3), "peer": 1.0, "unit": "time relative to nn.Linear bf16 (median shape)",
                      "ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
