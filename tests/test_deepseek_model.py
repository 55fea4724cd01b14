"""alignloop.models.deepseek against transformers' DeepseekV3ForCausalLM, and its training helpers.

What is matched: transformers 5.x, not DeepSeek's reference `inference/model.py`. The two differ
when n_group > 1: transformers ranks expert groups by the sum of their top-2 biased scores and
always has a (zero-init) correction bias; the reference does so only when its gate has a bias (it
creates one only for dim 7168) and otherwise ranks groups by their max. We follow transformers,
give both models the same random nonzero bias, and so test the V3 rule with the bias in play.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from alignloop.models import deepseek as ds
from alignloop.models import deepseek_checkpoint as ckpt

VOCAB = 97
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def config(n_group=1, topk_group=1, q_lora_rank=16, mtp=0, **kw):
    # initializer_range 0.3 (not 0.02): logits of magnitude ~6 and peaked routing, so a 1e-4 bound means something.
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=q_lora_rank,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=n_group, topk_group=topk_group,
                  num_nextn_predict_layers=mtp, initializer_range=0.3)
    fields.update(kw)
    return ds.deepseek_config(**fields)


CASES = {
    "one-group": dict(),
    "groups-4-keep-2": dict(n_group=4, topk_group=2),
    "no-qlora-yarn": dict(n_group=2, topk_group=1, q_lora_rank=None, rope_parameters=YARN,
                          max_position_embeddings=256),
}


def pair(case: str, seed: int = 0):
    """(transformers model, our model) with the same random weights and a random router bias."""
    cfg = config(**CASES[case])
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(copy.deepcopy(cfg)).eval()
    with torch.no_grad():
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    ours = ds.DeepseekForCausalLM(copy.deepcopy(cfg)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # in-memory names are identical
    return hf, ours


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are a few thousand parameters wide: one thread. With two on a loaded 2-core
    machine, each tiny matmul waits at a thread barrier (measured: 10 balancing steps 0.04 s on one
    thread, 36 s on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ids(b=2, t=12, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(CASES))
def models(request):
    return pair(request.param)


def test_prefill_and_cached_decode_match_transformers(models):
    hf, ours = models
    x = ids()
    with torch.no_grad():
        a, b = hf(x).logits, ours(x).logits
        assert (a - b).abs().max() <= 1e-4, (a - b).abs().max()  # measured ~5e-6, logits |.| ~6
        assert a.abs().max() > 1.0
        # Prefill 8 tokens, then decode 4 one at a time (ours: absorbed path against the latent cache).
        h, o = hf(x[:, :8], use_cache=True), ours(x[:, :8], use_cache=True)
        hl, ol = [h.logits], [o.logits]
        for t in range(8, 12):
            h = hf(x[:, t:t + 1], cache=h.cache, use_cache=True)
            o = ours(x[:, t:t + 1], cache=o.cache, use_cache=True)
            hl.append(h.logits)
            ol.append(o.logits)
        hl, ol = torch.cat(hl, 1), torch.cat(ol, 1)
    assert (hl - ol).abs().max() <= 1e-4
    assert (ol - b).abs().max() <= 1e-4  # incremental decode = one full prefill
    # The cache holds r + dr numbers per token per layer: the normed latent and the shared rotary key.
    assert o.cache.latent[0].shape == (2, 12, 16) and o.cache.rope_key[0].shape == (2, 12, 8)


def test_absorbed_path_equals_plain_path(models):
    _, ours = models
    x = ids(t=10)
    with torch.no_grad():
        plain = ours(x, absorb=False).logits
        absorbed = ours(x, absorb=True).logits  # prefill through the absorbed path too
        assert (plain - absorbed).abs().max() <= 1e-4
        pre = ours(x[:, :6], use_cache=True)
        step_plain = ours(x[:, 6:], cache=copy.deepcopy(pre.cache), absorb=False).logits
        step_absorbed = ours(x[:, 6:], cache=pre.cache, absorb=True).logits
    assert (step_plain - step_absorbed).abs().max() <= 1e-4
    assert (step_plain - plain[:, 6:]).abs().max() <= 1e-4


def test_routing_indices_match_transformers(models):
    hf, ours = models
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, out: seen.append(out[2]))
             for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    x = ids(t=16, seed=5)
    with torch.no_grad():
        hf(x)
        mine = ours(x, output_routing=True).routing
    for h in hooks:
        h.remove()
    assert len(seen) == len(mine) == 2
    for theirs, chosen in zip(seen, mine):
        assert torch.equal(theirs.sort(-1).values, chosen.reshape(-1, 2).sort(-1).values)
    # Group limit: every token's experts lie in its topk_group kept groups.
    cfg = ours.config
    per_group = cfg.n_routed_experts // cfg.n_group
    for chosen in mine:
        groups = (chosen // per_group).reshape(-1, 2)
        assert all(len(set(g.tolist())) <= cfg.topk_group for g in groups)


def test_routing_replay():
    _, ours = pair("groups-4-keep-2")
    x = ids(t=10)
    with torch.no_grad():
        free = ours(x, output_routing=True)
        replay = ours(x, routing=free.routing, output_routing=True)
        assert torch.equal(replay.logits, free.logits)
        shifted = [(r + 1) % ours.config.n_routed_experts for r in free.routing]
        moved = ours(x, routing=shifted, output_routing=True)
    assert all(torch.equal(a, b) for a, b in zip(moved.routing, shifted))
    assert (moved.logits - free.logits).abs().max() > 1e-3


def test_checkpoint_round_trips(tmp_path):
    hf, ours = pair("groups-4-keep-2")
    x = ids()
    with torch.no_grad():
        want = ours(x).logits
    # ours -> transformers' on-disk layout (per-expert tensors) -> transformers loads it.
    ckpt.save_hf(ours, tmp_path / "hf")
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (loaded(x).logits - want).abs().max() <= 1e-4
    # Both expert layouts read back into ours.
    per_expert = ckpt.to_hf_state_dict(ours)
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in per_expert
    fused = hf.state_dict()
    assert fused["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 32, 32)
    for state in (per_expert, fused):
        model = ds.DeepseekForCausalLM(copy.deepcopy(ours.config)).eval()
        ckpt.load_state(model, ckpt.from_hf_state_dict(state, model.config))
        with torch.no_grad():
            assert torch.equal(model(x).logits, want)
    # Reference layout (convert.py names) round trip.
    ref = ckpt.to_reference_state_dict(ours)
    for key in ("embed.weight", "head.weight", "layers.0.attn.wq_a.weight", "layers.0.attn.kv_norm.weight",
                "layers.0.ffn.w1.weight", "layers.1.ffn.gate.bias", "layers.1.ffn.experts.3.w2.weight",
                "layers.1.ffn.shared_experts.w3.weight", "layers.2.attn.wkv_b.weight"):
        assert key in ref, key
    ckpt.save_reference(ours, tmp_path / "ref")
    back = ckpt.load_reference(tmp_path / "ref").eval()
    with torch.no_grad():
        assert torch.equal(back(x).logits, want)


def test_mtp_layout_alignment_and_round_trip(tmp_path):
    cfg = config(n_group=4, topk_group=2, mtp=1)
    torch.manual_seed(0)
    model = ds.DeepseekForCausalLM(cfg).eval()
    x = ids(t=9)
    with torch.no_grad():
        out = model(x, mtp=True)
        (mtp,) = out.mtp_logits
        assert mtp.shape == (2, 8, VOCAB)  # row i: h_i with Emb(t_{i+1}) -> predicts t_{i+2}
        # By hand: embedding first, then the main model's pre-norm hidden state.
        layer = model.model.layers[3]
        h = model.model(x).pre_norm_hidden
        xin = layer.eh_proj(torch.cat((layer.enorm(model.model.embed_tokens(x[:, 1:])), layer.hnorm(h[:, :8])), -1))
        cos, sin = model.model.rope(torch.arange(1, 9)[None].expand(2, 8), xin.dtype)
        hk, _, _ = layer(xin, cos, sin, None, None, False)
        assert (model.lm_head(layer.shared_head.norm(hk)) - mtp).abs().max() <= 1e-5
        # Causal: changing token j changes MTP rows >= j - 1 only.
        y = x.clone()
        y[:, 5] = (y[:, 5] + 1) % VOCAB
        # (> 1e-4, not > 0: an expert's matmul batches whichever tokens it got, so rounding may move.)
        changed = (model(y, mtp=True).mtp_logits[0] - mtp).abs().amax(dim=(0, 2)) > 1e-4
        assert changed.tolist() == [False] * 4 + [True] * 4
    keys = ckpt.to_hf_state_dict(model)
    for k in ("model.layers.3.enorm.weight", "model.layers.3.hnorm.weight", "model.layers.3.eh_proj.weight",
              "model.layers.3.shared_head.norm.weight", "model.layers.3.shared_head.head.weight",
              "model.layers.3.embed_tokens.weight", "model.layers.3.mlp.experts.0.gate_proj.weight"):
        assert k in keys, k
    ckpt.save_hf(model, tmp_path / "m")
    back = ckpt.load_hf(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(back(x, mtp=True).mtp_logits[0], mtp)
    # transformers loads the main model from the same folder (it ignores the MTP keys).
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert (hf(x).logits - out.logits).abs().max() <= 1e-4


def test_training_loss_backward():
    cfg = config(n_group=4, topk_group=2, mtp=1)
    torch.manual_seed(0)
    model = ds.DeepseekForCausalLM(cfg).train()
    x = ids(t=16)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    loss, parts = ds.training_loss(model, x, mask, mtp_weight=0.3, balance_alpha=1e-2)
    assert set(parts) == {"ce", "mtp_ce", "balance"}
    loss.backward()
    router = model.model.layers[1].mlp.gate
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert model.model.layers[3].eh_proj.weight.grad.abs().sum() > 0
    assert router.e_score_correction_bias.grad is None  # a buffer: moved by the update rule only
    # Counted: 32 tokens x 2 slots per main MoE layer, 30 tokens x 2 in the MTP block.
    loads = [m.load.sum().item() for m in ds.moe_layers(model)]
    assert loads == [64.0, 64.0, 60.0]


def test_sequence_balance_loss_matches_hand_computation():
    # One sequence, T = 2 tokens, E = 4 experts, K = 2.
    s = torch.tensor([[[0.9, 0.5, 0.3, 0.3], [0.8, 0.2, 0.6, 0.4]]])
    idx = torch.tensor([[[0, 1], [0, 2]]])
    # f = E/(K T) * counts = 4/4 * [2, 1, 1, 0]; P = mean_t s / sum(s): rows sum to 2.0 each.
    f = torch.tensor([2.0, 1.0, 1.0, 0.0])
    p = (torch.tensor([0.9, 0.5, 0.3, 0.3]) / 2.0 + torch.tensor([0.8, 0.2, 0.6, 0.4]) / 2.0) / 2
    want = (f * p).sum()  # = 2 * 0.425 + 0.175 + 0.225 = 1.25
    got = ds.sequence_balance_loss([s], [idx], top_k=2)
    assert torch.allclose(got, want) and abs(want.item() - 1.25) < 1e-6
    # A masked-out third token changes nothing; two layers add.
    s3 = torch.cat((s, torch.tensor([[[0.1, 0.9, 0.9, 0.1]]])), 1)
    idx3 = torch.cat((idx, torch.tensor([[[1, 2]]])), 1)
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(ds.sequence_balance_loss([s3, s3], [idx3, idx3], 2, mask), 2 * want)


def _run_balancing(gamma, steps=60, tokens=1024):
    """MaxVio per step of one MoE layer (8 experts, top-2) whose router favours experts 0 and 1,
    fed a fresh batch of tokens each step; the bias is updated after every step."""
    cfg = config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8)
    torch.manual_seed(0)
    moe = ds.MoE(cfg).train()
    direction = torch.ones(16) / 4  # unit norm: the mean token
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.gate.weight.normal_(0, 0.3)
        moe.gate.weight[:2] += 2.0 * direction  # experts 0, 1: logit +2 on the mean token
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        with torch.enable_grad():  # counts accumulate only where a training step would
            moe(direction + torch.randn(1, tokens, 16, generator=gen))
        history.append(ds.update_router_bias(moe, gamma)["moe0/maxvio"])
    return history


def test_bias_update_balances_a_skewed_router():
    # Start: MaxVio ~1.66 (experts 0 and 1 each take ~2.7x the mean load). With gamma = 0.01 the
    # sign rule closes the gap in ~30 steps, then oscillates around balance: measured mean MaxVio
    # 0.17 (max 0.28) over steps 40-59 on 2 x 1024 slots per step.
    on = _run_balancing(0.01)
    off = _run_balancing(0.0, steps=10)
    assert on[0] > 1.3 and off[0] > 1.3
    assert sum(on[40:]) / 20 < 0.3 and max(on[40:]) < 0.45, on[40:]
    assert min(off) > 1.3  # gamma = 0 freezes the bias: still skewed
    stats = ds.load_stats(torch.tensor([4.0, 2.0, 1.0, 1.0]))
    assert stats == {"maxvio": 1.0, "min_share": 0.125, "max_share": 0.5}


def test_trainer_logprobs_run_on_the_model():
    """The trainers' TokenLogprobs (decoder + head, dense and per-document masks) works unchanged."""
    from alignloop.train.logprobs import TokenLogprobs

    _, ours = pair("one-group")
    x = ids(b=1, t=10)
    pos = torch.cat((torch.arange(6), torch.arange(4)))[None]
    docs = torch.tensor([[0] * 6 + [1] * 4])
    select = torch.ones_like(x, dtype=torch.bool)
    select[:, -1] = False
    targets = x[:, 1:][select[:, :-1]]
    module = TokenLogprobs(ours)
    with torch.no_grad():
        by_docs = module(x, pos, None, select, targets, segments=docs)
        dense = module(x, pos, (docs[:, None, :, None] == docs[:, None, None, :]) &
                       torch.ones(10, 10, dtype=torch.bool).tril(), select, targets)
        first = ours(x[:, :6]).logits.log_softmax(-1)[0, :5].gather(1, x[0, 1:6, None])[:, 0]
    assert (by_docs - dense).abs().max() <= 1e-4
    assert (by_docs[:5] - first).abs().max() <= 1e-4  # document 1 sees nothing of document 0


def test_presets_and_real_shapes():
    tiny = ds.preset_config("tiny-deepseek", 49152)
    with torch.device("meta"):
        n = sum(p.numel() for p in ds.DeepseekForCausalLM(tiny).parameters())
    assert 3e6 < n < 8e6
    v3 = ds.deepseek_v3_671b_config()
    shape = (v3.hidden_size, v3.num_hidden_layers, v3.n_routed_experts, v3.n_group, v3.topk_group)
    assert shape == (7168, 61, 256, 8, 4)
    assert abs(ds.softmax_scale(v3) / 192 ** -0.5 - (0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1) ** 2) < 1e-6
    lite = ds.deepseek_v2_lite_config()
    assert (lite.q_lora_rank, lite.n_shared_experts, lite.num_experts_per_tok) == (None, 2, 6)


def test_zoo_presets_load_our_model(tmp_path):
    from alignloop.models import load_model

    model, tokenizer = load_model("tiny-deepseek", seed=0)
    assert isinstance(model, ds.DeepseekForCausalLM) and model.config.vocab_size == len(tokenizer)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    n = sum(p.numel() for p in model.parameters())
    assert 3e6 < n < 8e6
    x = torch.tensor([tokenizer.encode("hello there")])
    model.save_pretrained(tmp_path)  # what a training run writes
    tokenizer.save_pretrained(tmp_path)
    again, _ = load_model(str(tmp_path))
    assert isinstance(again, ds.DeepseekForCausalLM)
    with torch.no_grad():
        assert (again(x).logits - model(x).logits).abs().max() <= 1e-4
