"""FP8 checkpoints: `alignloop export fp8` writes the fine-grained layout transformers reads (it
dequantises on CPU), the import brings it back, and the engine serves it weight-only with the
logits of the dequantised model.

Tolerances (random tiny models, logits ~1 in magnitude): e4m3 keeps 3 mantissa bits, so each weight
moves by up to 6.25% of itself; through 2-5 layers the logits measured max |diff| 0.035 (tiny, Llama)
and 0.22 (tiny-deepseek, whose top-2 routing flips on some tokens) against the unquantised model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from alignloop.fp8.checkpoint import export_fp8, import_fp8, pick_block
from alignloop.models import load_model

IDS = (torch.arange(40).view(2, 20) * 7) % 500


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for name in ("tiny", "tiny-deepseek"):
        model, tokenizer = load_model(name)
        out[name] = (model, export_fp8(model, tokenizer, root / name))
    return root, out


@pytest.mark.parametrize("name,tolerance", [("tiny", 0.06), ("tiny-deepseek", 0.35)])
def test_export_loads_in_transformers_close_to_the_source(exported, name, tolerance):
    root, out = exported
    source, report = out[name]
    folder = root / name
    config = json.loads((folder / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "fp8" and q["weight_block_size"] == [report.block] * 2
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        proj = next(k for k in keys if k.endswith("o_proj.weight"))
        assert f.get_tensor(proj).dtype == torch.float8_e4m3fn
        assert proj + "_scale_inv" in keys
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert report.quantised > 0 and report.bytes_fp8 < report.bytes_bf16
    hf = AutoModelForCausalLM.from_pretrained(folder)  # no GPU: transformers dequantises to bf16
    assert float((_logits(hf) - _logits(source)).abs().max()) <= tolerance


def test_import_gives_back_a_model_our_zoo_loads(exported, tmp_path):
    root, out = exported
    for name, tolerance in (("tiny", 0.06), ("tiny-deepseek", 0.35)):
        back = import_fp8(root / name, tmp_path / name)
        model, _ = load_model(str(back))
        assert type(model) is type(out[name][0])
        assert float((_logits(model) - _logits(out[name][0])).abs().max()) <= tolerance


def test_engine_serves_fp8_weights_with_the_dequantised_models_logits(exported, tmp_path):
    from alignloop.engine.engine import Engine

    root, _ = exported
    fp8 = Engine.from_fp8(str(root / "tiny"), dtype="bfloat16", show_progress=False)
    plain = Engine.from_name(str(import_fp8(root / "tiny", tmp_path / "back")), dtype="bfloat16",
                             show_progress=False)
    prompts = [[1, 5, 9, 200, 33, 7], [1, 8, 100, 3]]
    assert torch.equal(fp8.lm.prefill(prompts, 0), plain.lm.prefill(prompts, 0))
    assert fp8.lm.weight_bytes() < plain.lm.weight_bytes()
    with pytest.raises(ValueError, match="FP8 weights"):
        fp8.load_weights([("model.norm.weight", fp8.lm.final_norm.clone())])  # RL's in-place update


def test_block_size_is_128_unless_a_dimension_needs_less():
    proj = "model.layers.0.self_attn.o_proj.weight"
    assert pick_block({proj: torch.zeros(256, 384)}) == 128
    assert pick_block({proj: torch.zeros(576, 1536)}) == 64  # SmolLM2's hidden size
    assert pick_block({proj: torch.zeros(256, 384), "model.embed_tokens.weight": torch.zeros(49152, 100)}) == 128
