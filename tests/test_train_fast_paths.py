"""The trainers' fast paths compute what the plain ones do: the fused LoRA forward (peft's
function, scale folded into B, add folded into the matmul) and the label log-probs (log-softmax
in fp32 without an fp32 copy of the logits). Tiny shapes, so it is quick."""

import contextlib

import torch
import torch.nn.functional as F

from alignloop.models import load_model
from alignloop.train.config import LoraSection
from alignloop.train.logprobs import TokenLogprobs, label_logprobs
from alignloop.train.lora import add_lora
from alignloop.train.lora_forward import fused_lora
from alignloop.train.loop import autocast


def _lora_model(dtype: str, dropout: float = 0.0):
    model, _ = load_model("tiny", dtype=dtype, seed=0)
    torch.manual_seed(0)
    lora = add_lora(model, LoraSection(r=4, alpha=8, dropout=dropout))
    with torch.no_grad():  # B starts at zero: give the adapters something to add
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return lora


def _forward_backward(lora, fused: bool, bf16: bool):
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (2, 24))
    x = lora.get_base_model().model.embed_tokens(ids).detach()
    with autocast(torch.device("cpu"), bf16), (fused_lora(lora) if fused else contextlib.nullcontext()):
        out = lora.get_base_model().model(inputs_embeds=x, use_cache=False).last_hidden_state
    if out.requires_grad:  # not with the adapters disabled
        out.float().pow(2).mean().backward()
    grads = [p.grad.clone() for p in lora.parameters() if p.requires_grad and p.grad is not None]
    lora.zero_grad(set_to_none=True)
    return out.detach().float(), grads


def _error(x: torch.Tensor, truth: torch.Tensor) -> float:
    return float((x.float() - truth).norm() / truth.norm())


def test_fused_lora_is_peft_function_exactly_in_fp32():
    lora = _lora_model("float32")
    (a, ga), (b, gb) = _forward_backward(lora, True, False), _forward_backward(lora, False, False)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb)) and len(ga) == len(gb) > 0
    assert not any("forward" in m.__dict__ for m in lora.modules())  # peft's forward is back after the block


def test_fused_lora_in_bf16_is_as_close_to_fp32_as_peft_is():
    lora = _lora_model("bfloat16")
    (a, ga), (b, gb) = _forward_backward(lora, True, True), _forward_backward(lora, False, True)
    truth, truth_grads = _forward_backward(lora.float(), False, False)
    assert _error(a, truth) <= 1.25 * _error(b, truth) < 0.02
    fused = sum(_error(x, t) for x, t in zip(ga, truth_grads)) / len(ga)
    plain = sum(_error(x, t) for x, t in zip(gb, truth_grads)) / len(gb)
    assert fused <= 1.25 * plain  # bf16 noise either way on this tiny random model, no more of it


def test_fused_lora_leaves_disabled_adapters_and_dropout_to_peft():
    lora = _lora_model("float32", dropout=0.5)
    lora.train()
    a, _ = _forward_backward(lora, True, False)  # each seeds torch the same way first
    b, _ = _forward_backward(lora, False, False)
    assert torch.equal(a, b)  # dropout draws the same mask on both paths
    with lora.disable_adapter():
        base, _ = _forward_backward(lora, True, False)
        plain, _ = _forward_backward(lora, False, False)
    assert torch.equal(base, plain) and not torch.equal(base, a)


def test_label_logprobs_match_fp32_cross_entropy_and_keep_the_logits_dtype_for_grads():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(37, 500) * 3).to(dtype)
        targets = torch.randint(0, 500, (37,))
        weights = torch.randn(37)
        a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours = label_logprobs(a, targets)
        plain = -F.cross_entropy(b.float(), targets, reduction="none")
        (ours * weights).sum().backward()
        (plain * weights).sum().backward()
        assert ours.dtype == torch.float32 and a.grad.dtype == dtype
        assert torch.allclose(ours, plain, atol=1e-5)
        assert torch.allclose(a.grad.float(), b.grad.float(), atol=1e-6 if dtype == torch.float32 else 4e-3)
    assert label_logprobs(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_token_logprobs_take_both_fast_paths_and_match_the_plain_model():
    lora = _lora_model("float32")
    module = TokenLogprobs(lora)
    ids = torch.randint(0, 1000, (1, 20))
    positions = torch.arange(20)[None]
    select = torch.ones(1, 20, dtype=torch.bool)
    select[0, -1] = False
    targets = ids[0, 1:]
    with torch.no_grad():
        fast = module(ids, positions, None, select, targets, segments=torch.zeros(1, 20, dtype=torch.long))
        logits = lora(input_ids=ids, use_cache=False).logits[0, :-1]
    assert torch.allclose(fast, torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0], atol=1e-5)
