"""`PackedEncoder` gives what transformers' `BertModel` + mean pooling gives, without padding."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from alignloop.rewards.backbones import minilm_dir
from alignloop.rewards.encoder import PackedEncoder, _fused_linear_available
from native_paths import native_and_torch

TEXTS = ["hi", "", "Is the ramen place on the corner still open this late at night?",
         "Sure! Try the miso one.", "galaxy " * 40]


kernels = native_and_torch("packed_attention", "layer_norm")  # the native kernels, and torch's ops


@pytest.fixture(scope="module")
def bert():
    return AutoModel.from_pretrained(minilm_dir()).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


def _reference(bert, tokenizer, texts, max_length=128):
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize(((hidden * mask).sum(1) / mask.sum(1)).float(), dim=-1)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _fused_linear_available(), reason="no oneDNN in this torch"))])
def test_packed_fp32_matches_padded_bert(bert, tokenizer, fused):
    ids = tokenizer(TEXTS, truncation=True, max_length=128)["input_ids"]
    out = PackedEncoder(bert, torch.float32, fused=fused).encode(ids)
    assert out.dtype == torch.float32 and out.shape == (len(TEXTS), bert.config.hidden_size)
    torch.testing.assert_close(out, _reference(bert, tokenizer, TEXTS), atol=1e-5, rtol=0)


def test_packed_bf16_is_as_close_to_fp32_as_bert_in_bf16(bert, tokenizer):
    ids = tokenizer(TEXTS, truncation=True, max_length=128)["input_ids"]
    exact = _reference(bert, tokenizer, TEXTS)
    bert_bf16 = AutoModel.from_pretrained(minilm_dir(), dtype=torch.bfloat16).eval()
    theirs = (_reference(bert_bf16, tokenizer, TEXTS) - exact).abs().max()
    ours = (PackedEncoder(bert, torch.bfloat16).encode(ids) - exact).abs().max()
    assert ours < max(2 * theirs, 5e-3)


def test_empty_batch_and_too_long_text(bert):
    enc = PackedEncoder(bert)
    assert enc.encode([]).shape == (0, bert.config.hidden_size)
    with pytest.raises(ValueError, match="positions"):
        enc.encode([[101] + [2000] * 600 + [102]])


def test_texts_of_equal_length_in_any_order_match_padded_bert(bert, tokenizer):
    # Attention runs once per run of equal-length texts after sorting: the sort and its inverse
    # must put every embedding back on its own text.
    texts = ["red cat", "sure thing", "big dog", "hi", "a much longer text than the rest of them",
             "blue fox", "ok", "green owl", "hi"]
    ids = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    assert len({len(i) for i in ids}) < len(ids) - 3   # several runs of equal length
    out = PackedEncoder(bert, torch.float32).encode(ids)
    torch.testing.assert_close(out, _reference(bert, tokenizer, texts), atol=1e-5, rtol=0)
