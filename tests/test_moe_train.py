"""MoE training: the fused head loss, real-token load counting, balancing in the loop, pretraining,
and the moe-train bench on tiny sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from alignloop.models import deepseek as ds


@pytest.mark.parametrize("scale", [1.0, 40.0], ids=["exp-without-max", "max-subtracted"])
def test_head_cross_entropy_matches_full_logits(scale):
    torch.manual_seed(0)
    # scale 40: |h| |w| is far above the bound under which exp runs without subtracting the max.
    hidden = (torch.randn(3, 300, 8, dtype=torch.float64) * scale).requires_grad_()  # 900 rows: 4 chunks
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 300))
    labels[0, :7] = -100
    got = ds.head_cross_entropy(hidden, weight, labels)
    (gh, gw) = torch.autograd.grad(got * 3.0, (hidden, weight))
    logits = F.linear(hidden, weight)
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    (wh, ww) = torch.autograd.grad(want * 3.0, (hidden, weight))
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(gh, wh, atol=1e-10) and torch.allclose(gw, ww, atol=1e-10)


def test_head_cross_entropy_without_grad():
    hidden, weight = torch.randn(2, 5, 4), torch.randn(11, 4)
    labels = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        got = ds.head_cross_entropy(hidden, weight, labels)
    want = F.cross_entropy(F.linear(hidden, weight)[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert torch.allclose(got, want, atol=1e-5)


def test_bench_pair_starts_from_the_same_loss():
    from alignloop.bench import moe_train

    ours, peer = moe_train.build_pair("tiny-deepseek", 512, seed=0)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.allclose(moe_train.ours_loss(ours, ids), moe_train.peer_loss(peer, ids), atol=1e-5)


def test_bench_moe_train_line_on_tiny_sizes():
    from alignloop.bench import moe_train

    line = moe_train.run_bench(vocab=512, batch=2, seq=16, steps=1, rounds=3, threads=(1,),
                               attentions=("sdpa",), experts=("eager",))
    assert {"bench", "ours", "peer", "unit", "ratio"} <= set(line)
    assert line["bench"] == "moe-train" and line["ours"] > 0 and line["peer"] > 0
    assert set(line["by_threads"]) == {"1"}
    json.dumps(line)


def _pretrain_recipe(tmp_path, **train):
    from alignloop.train.pretrain import PretrainRecipe

    return PretrainRecipe.model_validate({
        "run": {"name": "pt", "dir": str(tmp_path)},
        "model": {"name": "tiny-deepseek"},
        "data": {"sim_users": 4, "sim_days": 2, "chitchat": True, "max_documents": 24},
        "train": {"steps": 3, "micro_batch": 2, "max_seq_len": 64, "bf16": False, "eval_fraction": 0.1,
                  "eval_every": 0, "save_every": 3, "warmup_steps": 1, "lr": 3e-3, **train}})


def test_pretrain_moe_balances_logs_plots_and_saves(tmp_path):
    pytest.importorskip("chitchat_dataset")
    from alignloop.models import load_model
    from alignloop.train.pretrain import run_pretrain

    stage = run_pretrain(_pretrain_recipe(tmp_path, moe={"bias_update_speed": 1e-2, "balance_loss": 1e-4}))
    records = [json.loads(line) for line in stage.path("metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3
    # Per-layer load of the main stack's MoE layers (1-3) and of the MTP block (L4), which pretraining
    # trains with its own cross-entropy (mtp.weight 0.3 by default).
    assert {"moe/L1/maxvio", "moe/L3/min_share", "moe/L2/max_share", "moe/L4/maxvio", "moe/maxvio",
            "balance", "mtp_ce"} <= set(steps[-1])
    assert all(math.isfinite(r["mtp_ce"]) and r["mtp_ce"] > 0 for r in steps)
    assert stage.path("moe_maxvio.png").stat().st_size > 0
    model, _ = load_model(str(stage.path("model")))
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().max() > 0  # three updates of +-0.01 went into the saved checkpoint


def test_real_tokens_only_count_in_the_load():
    from alignloop.train.logprobs import TokenLogprobs

    torch.manual_seed(0)
    model = ds.DeepseekForCausalLM(ds.preset_config("tiny-deepseek", 64, num_nextn_predict_layers=0)).train()
    ids = torch.randint(0, 64, (2, 10))
    segments = torch.zeros(2, 10, dtype=torch.long)
    segments[1, 6:] = -1  # 4 padding tokens
    select = segments >= 0
    TokenLogprobs(model)(ids, torch.arange(10).expand(2, 10), None, select, ids[select], segments=segments)
    # 16 real tokens x top-2 per MoE layer.
    assert [m.load.sum().item() for m in ds.moe_layers(model)] == [32.0] * 3
    assert all(m.real_tokens is None for m in ds.moe_layers(model))


def test_packed_mtp_loss_equals_each_document_alone():
    """Two documents packed in one row: the main and MTP cross-entropies (and the MTP gradient) are
    those of each document run alone, so no MTP row reads across the boundary."""
    from alignloop.train.logprobs import TokenLogprobs
    from alignloop.train.packing import PackedBatch
    from alignloop.train.pretrain import MTPObjective

    torch.manual_seed(0)
    model = ds.DeepseekForCausalLM(ds.preset_config("tiny-deepseek", 97)).eval()
    assert len(model.model.mtp_layers) == 1
    docs = [torch.randint(0, 97, (10,)), torch.randint(0, 97, (7,))]
    ids = torch.cat(docs)[None]
    doc_ids = torch.tensor([[0] * 10 + [1] * 7])
    targets = torch.zeros_like(ids)
    targets[0, :-1] = ids[0, 1:]
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[0, [9, 16]] = False  # each document's last token predicts nothing
    batch = PackedBatch(ids, torch.tensor([list(range(10)) + list(range(7))]), doc_ids, targets, loss_mask,
                        loss_mask.float(), 17)
    loss, stats = MTPObjective(0.3).loss(TokenLogprobs(model), batch)
    (packed_grad,) = torch.autograd.grad(loss, model.model.mtp_layers[0].eh_proj.weight)

    main = mtp = 0.0
    for d in docs:
        out = model(d[None], mtp=True)
        main_d = F.cross_entropy(out.logits[0, :-1], d[1:], reduction="sum")
        mtp_d = F.cross_entropy(out.mtp_logits[0][0, :-1], d[2:], reduction="sum")  # row i -> token i + 2
        main, mtp = main + main_d, mtp + mtp_d
    n_main, n_mtp = 9 + 6, 8 + 5
    want = main + 0.3 * mtp * n_main / n_mtp
    (alone_grad,) = torch.autograd.grad(want, model.model.mtp_layers[0].eh_proj.weight)
    assert stats["ce_sum"] == pytest.approx(float(main.detach()), rel=1e-4)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    assert torch.allclose(packed_grad, alone_grad, atol=1e-5)


def test_a_training_checkpoint_keeps_the_router_bias(tmp_path):
    """The balancing bias is a buffer, not a parameter: a resumed run must not start it from zero."""
    from alignloop.models import load_model
    from alignloop.models.deepseek import moe_layers
    from alignloop.train.checkpoint import load_checkpoint, save_checkpoint

    def parts():
        net, _ = load_model("tiny-deepseek")
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        return net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    net, opt, sched = parts()
    for i, layer in enumerate(moe_layers(net)):
        layer.gate.e_score_correction_bias.fill_(0.25 + i)
    saved = save_checkpoint(tmp_path, 1, net, opt, sched, {})
    again, opt2, sched2 = parts()
    load_checkpoint(saved, again, opt2, sched2)
    assert [float(m.gate.e_score_correction_bias[0]) for m in moe_layers(again)] == \
        [0.25 + i for i in range(len(moe_layers(again)))]
