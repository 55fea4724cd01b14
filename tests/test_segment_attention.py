"""Per-document attention for packed rows: the same log-probs and gradients as the dense block mask."""

from pathlib import Path

import pytest
import torch

from alignloop.train.logprobs import TokenLogprobs, supports_segments
from alignloop.train.packing import collate
from alignloop.train.sft import SFTObjective, per_token_losses
from alignloop.train.sft_data import read_conversations, tokenize

REPO = Path(__file__).resolve().parents[1]


def _batch(tokenizer, rows=((0, 1, 2), (3, 4), (5,))):
    examples, _ = tokenize(tokenizer, read_conversations(REPO / "recipes/data/sft_demo.jsonl"), 256)
    return collate([[examples[i] for i in row] for row in rows])  # uneven rows: padding too


@pytest.mark.parametrize("fixture", ["tiny", "tiny_qwen2"])
def test_segments_match_the_dense_mask(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    batch = _batch(tokenizer)
    assert supports_segments(model, batch.input_ids.shape[1])
    dense = per_token_losses(model, batch)
    per_doc = per_token_losses(model, batch, segments=True)
    assert torch.allclose(dense, per_doc, atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # restored after the forward


def test_segments_give_the_dense_gradient(tiny):
    model, tokenizer = tiny
    batch = _batch(tokenizer)
    module, grads = TokenLogprobs(model), []
    model.requires_grad_(True)
    try:
        for segments in (False, True):
            model.zero_grad(set_to_none=True)
            select = batch.loss_mask
            if segments:
                logp = module(batch.input_ids, batch.position_ids, None, select, batch.targets[select],
                              segments=batch.doc_ids)
            else:
                logp = module(batch.input_ids, batch.position_ids, batch.attention_mask(), select,
                              batch.targets[select])
            logp.sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max()
    loss, _ = SFTObjective().loss(module, batch)  # the trainer's objective takes this path
    assert torch.isfinite(loss)


def test_sliding_window_shorter_than_the_row_falls_back(tiny_qwen2):
    model, _ = tiny_qwen2
    config = model.config
    saved = (getattr(config, "sliding_window", None), getattr(config, "use_sliding_window", None))
    try:
        config.sliding_window, config.use_sliding_window = 16, True
        assert not supports_segments(model, 64)
        assert supports_segments(model, 16)
    finally:
        config.sliding_window, config.use_sliding_window = saved
