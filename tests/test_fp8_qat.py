"""FP8 quantisation-aware training: the forward sees the served (e4m3) weights, the gradient passes
straight through, and a QAT model's FP8 export serves exactly the function it trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignloop.errors import AlignloopError
from alignloop.fp8.blockwise import dequantize_weight, quantize_weight
from alignloop.fp8.checkpoint import export_fp8, read_fp8
from alignloop.fp8.qat import QATExperts, QATLinear, fake_quantize, fake_quantize_model, torchao_float8
from alignloop.models import load_model

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_fake_quantize_forward_is_the_served_weight_and_backward_is_straight_through():
    w = (torch.randn(200, 96) * 0.05).requires_grad_(True)
    out = fake_quantize(w, 32)
    q, s = quantize_weight(w.detach(), block=32)
    assert torch.equal(out.detach(), dequantize_weight(q, s, block=32))
    upstream = torch.randn_like(w)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


@pytest.mark.parametrize("name", ["tiny", "tiny-deepseek"])
def test_qat_model_and_its_fp8_export_compute_the_same_logits(name, tmp_path):
    model, tokenizer = load_model(name)
    n = fake_quantize_model(model)
    kinds = {type(m) for m in model.modules()}
    assert n > 0 and QATLinear in kinds and (QATExperts in kinds) == (name == "tiny-deepseek")
    ids = (torch.arange(30).view(2, 15) * 11) % 500
    with torch.no_grad():
        qat = model(input_ids=ids).logits
    report = export_fp8(model, tokenizer, tmp_path / "fp8")
    served, _ = load_model(name)  # the same weights; the export's projections swapped in
    pairs, _, config = read_fp8(tmp_path / "fp8")
    block = config["quantization_config"]["weight_block_size"][0]
    state = {n: dequantize_weight(q, s, torch.float32, block) for n, (q, s) in pairs.items()}
    if name == "tiny-deepseek":
        from alignloop.models.deepseek_checkpoint import from_hf_state_dict, to_hf_state_dict

        full = {k: v.clone() for k, v in to_hf_state_dict(served).items()}
        full.update(state)
        served.load_state_dict(from_hf_state_dict(full, served.config), strict=False)
    else:
        served.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert torch.allclose(served(input_ids=ids).logits, qat, atol=1e-5), report.line()


def test_sft_with_qat_trains_and_saves_a_plain_model(tmp_path):
    from alignloop.recipes import load_recipe
    from alignloop.train.config import SFTRecipe
    from alignloop.train.stage import run_sft

    recipe = load_recipe(RECIPES / "sft_tiny.toml", SFTRecipe,
                         [f"run.dir={tmp_path}", "train.steps=3", "train.lora=none", "train.fp8=qat",
                          "train.max_seq_len=128", "train.eval_every=0"])
    stage = run_sft(recipe)
    net, _ = load_model(str(stage.path("model")))
    assert not any(isinstance(m, QATLinear) for m in net.modules())  # a plain model on disk


def test_torchao_fp8_needs_a_gpu_with_fp8():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has FP8 tensor cores")
    with pytest.raises(AlignloopError, match="compute capability 8.9"):
        torchao_float8(torch.nn.Linear(4, 4))
