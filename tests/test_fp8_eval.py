"""The FP8 experiment's table, and the GPU device script that must skip cleanly without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _estimate(mean):
    return {"mean": mean, "lo": mean - 0.01, "hi": mean + 0.01}


def test_the_table_reports_gain_kept_with_intervals():
    from alignloop.eval.fp8 import table

    def gain(d):
        return {"diff_mean": d, "diff_lo": d - 0.02, "diff_hi": d + 0.02, "t": 3.0, "p_value": 0.01}

    result = {"users": 400, "prompts": 400, "rows": {
        "base": {"heldout_loss": 2.0, "engagement": _estimate(0.5), "weight_bytes": 2**20 * 270},
        "bf16": {"heldout_loss": 1.5, "engagement": _estimate(0.7), "gain_vs_base": gain(0.2), "gain_kept": 1.0,
                 "weight_bytes": 2**20 * 270},
        "ptq": {"heldout_loss": 1.6, "engagement": _estimate(0.6), "gain_vs_base": gain(0.1), "gain_kept": 0.5,
                "weight_bytes": 2**20 * 155}}}
    lines = table(result)
    assert len(lines) == 5
    assert "50%" in lines[3] and "+0.1000 [+0.0800, +0.1200] p=0.01" in lines[3] and "155.0" in lines[3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run its benchmark")
def test_device_script_skips_cleanly_without_a_gpu():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "device" / "fp8_linear_bench.py")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.startswith("skipped:"), out.stderr[-2000:]


def test_fused_linear_refuses_clearly_without_a_gpu():
    from alignloop.fp8 import triton_linear

    if triton_linear.available():
        pytest.skip("this machine can run the kernel")
    with pytest.raises(RuntimeError, match="compute capability 8.9"):
        triton_linear.fp8_linear(torch.zeros(1, 128), torch.zeros(128, 128, dtype=torch.float8_e4m3fn),
                                 torch.ones(1, 1))
