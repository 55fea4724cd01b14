"""`alignloop bench mla-decode` on tiny-deepseek with tiny sizes: the line's fields, the cache-size
arithmetic, both decode paths agreeing, MTP output identical to plain greedy. No timed assertions."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from alignloop.bench import mla_decode
from alignloop.cli.bench import app
from alignloop.models import deepseek as ds


def test_cache_bytes_from_the_config():
    v3 = mla_decode.cache_bytes(ds.deepseek_v3_671b_config())
    assert v3["latent"] == 61 * 576 * 2 and v3["expanded"] == 61 * 128 * 320 * 2  # 40960 / 576 = 71.1x
    tiny = mla_decode.cache_bytes(ds.preset_config("tiny-deepseek", 49152), bytes_per_number=4)
    assert tiny == {"latent": 4 * 48 * 4, "expanded": 4 * 4 * 48 * 4, "ratio": 4.0}


def test_the_bench_line_on_the_tiny_preset(tmp_path):
    result = CliRunner().invoke(app, [
        "mla-decode", "--model", "tiny-deepseek", "--batch", "3", "--prompt-len", "6", "--steps", "3",
        "--mtp-tokens", "4", "--rounds", "3", "--threads", "1", "--dtype", "float32", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line["bench"] == "mla-decode" and line["unit"] == "tokens/s" and line["rounds"] == 3
    assert line["ours"] > 0 and line["peer"] > 0 and abs(line["ratio"] - line["ours"] / line["peer"]) < 0.01
    assert line["same_greedy_tokens"] is True
    assert line["kv_cache_bytes_per_token_bf16"]["deepseek-v3-671b"]["ratio"] == 71.11
    assert line["kv_cache_bytes_per_token_bf16"]["tiny-deepseek"]["ratio"] == 4.0
    mtp = line["mtp"]
    assert mtp["identical_to_plain_greedy"] is True and mtp["drafts"] > 0 and 0 <= mtp["acceptance"] <= 1
    assert 1.0 <= mtp["tokens_per_main_forward"] <= 2.0
    assert "random init" in line["weights"] and line["machine"]["threads"] == 1
