"""LD-DPO, R-DPO and KTO: by hand, against TRL's loss math, properties, and tiny-model runs."""

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignloop.errors import AlignloopError
from alignloop.train import dpo as dpo_module
from alignloop.train.dpo import LossOptions, PreferenceObjective, preference_loss, sequence_logps
from alignloop.train.dpo_data import TokenizedPair, collate_pairs, tokenize_pairs
from alignloop.train.kto_data import read_unpaired
from alignloop.train.packing import Example

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "dpo_tiny.toml"
FAST = ["train.max_seq_len=128", "train.micro_batch=2"]


def _table_module(table: torch.Tensor):
    """A stand-in for TokenLogprobs: log p(token) = table[token], whatever the context."""
    def module(input_ids, position_ids, allowed, select, targets, segments=None):
        return table[targets]
    return module


def _random_pairs(n: int, seed: int, vocab: int = 50) -> list[TokenizedPair]:
    """Pairs with prompts of 3-5 tokens and answers of 1-9 tokens (chosen longer, shorter, equal)."""
    g = torch.Generator().manual_seed(seed)

    def side(prompt: list[int], length: int) -> Example:
        answer = torch.randint(1, vocab, (length,), generator=g).tolist()
        return Example(prompt + answer, [0] * len(prompt) + [1] * length)

    pairs = []
    for i in range(n):
        prompt = torch.randint(1, vocab, (3 + i % 3,), generator=g).tolist()
        lc, lr = [(7, 3), (2, 9), (5, 5), (1, 4), (8, 6)][i % 5]
        label = 1.0 if i % 3 else -1.0
        pairs.append(TokenizedPair(i, side(prompt, lc), side(prompt, lr), 1.0, f"u{i}", label))
    return pairs


# --- by hand and properties ---------------------------------------------------------------------


def test_shared_length_split_by_hand():
    """Each side's first min(|c|, |r|) scored tokens, summed apart from the rest."""
    a = TokenizedPair(0, Example([9, 1, 2, 3], [0, 1, 1, 1]), Example([9, 4], [0, 1]), 1.0, "u")
    b = TokenizedPair(1, Example([9, 5, 6], [0, 1, 1]), Example([9, 7, 8, 1, 2], [0, 1, 1, 1, 1]), 1.0, "v")
    batch = collate_pairs([[a], [b]])
    table = -torch.arange(10, dtype=torch.float32)  # log p(token t) = -t
    got = sequence_logps(_table_module(table), batch, shared=True)
    # pair a: m = 1: chosen (1+2+3, 1), rejected (4, 4); pair b: m = 2: chosen (5+6, 5+6), rejected (7+8+1+2, 7+8)
    assert (-got).tolist() == [[[6, 1], [4, 4]], [[11, 11], [18, 15]]]
    assert torch.equal(sequence_logps(_table_module(table), batch), got[..., 0])


def test_ld_alpha_one_and_rdpo_alpha_zero_are_dpo():
    g = torch.Generator().manual_seed(0)
    full, ref_full = -10 * torch.rand(6, 2, generator=g), -10 * torch.rand(6, 2, generator=g)
    shared = torch.stack([full, full * 0.6], -1)  # any prefix sums
    ref_shared = torch.stack([ref_full, ref_full * 0.3], -1)
    lengths = torch.tensor([[4.0, 9.0], [3.0, 3.0], [12.0, 2.0]] * 2)
    dpo, dpo_rewards = preference_loss(full, ref_full, lengths, "dpo", 0.1)
    ld, ld_rewards = preference_loss(shared, ref_shared, lengths, "ld_dpo", 0.1, options=LossOptions(ld_alpha=1.0))
    rdpo, _ = preference_loss(full, ref_full, lengths, "rdpo", 0.1, options=LossOptions(length_alpha=0.0))
    assert torch.allclose(ld, dpo) and torch.allclose(ld_rewards, dpo_rewards) and torch.allclose(rdpo, dpo)
    # ld_alpha = 0: only the shared length counts; R-DPO: a longer chosen side needs a larger margin.
    ld0, _ = preference_loss(shared, ref_shared, lengths, "ld_dpo", 0.1, options=LossOptions(ld_alpha=0.0))
    only_shared, _ = preference_loss(shared[..., 1], ref_shared[..., 1], lengths, "dpo", 0.1)
    assert torch.allclose(ld0, only_shared)
    rdpo1, _ = preference_loss(full, ref_full, lengths, "rdpo", 0.1, options=LossOptions(length_alpha=0.05))
    margin = 0.1 * ((full - ref_full)[:, 0] - (full - ref_full)[:, 1]) - 0.05 * (lengths[:, 0] - lengths[:, 1])
    assert torch.allclose(rdpo1, -torch.nn.functional.logsigmoid(margin))
    assert (rdpo1[lengths[:, 0] > lengths[:, 1]] > dpo[lengths[:, 0] > lengths[:, 1]]).all()


def test_kto_reference_point_is_clamped_and_detached():
    policy = torch.tensor([[-3.0, -5.0], [-2.0, -6.0], [-4.0, -4.0]], requires_grad=True)
    reference = torch.tensor([[-4.0, -6.0], [-1.0, -5.0], [-4.0, -7.0]])
    label = torch.tensor([1.0, -1.0, 1.0])
    opt = LossOptions(desirable_weight=2.0, undesirable_weight=0.5)
    loss, rewards = preference_loss(policy, reference, torch.ones(3, 2), "kto", 0.5, options=opt, label=label)
    z = (1 + -1 + 3) / 3  # mean mismatched log-ratio, > 0
    rho = [1.0, -1.0, 0.0]
    want = [2.0 * (1 - 1 / (1 + math.exp(-0.5 * (rho[0] - z)))), 0.5 * (1 - 1 / (1 + math.exp(-0.5 * (z - rho[1])))),
            2.0 * (1 - 1 / (1 + math.exp(-0.5 * (rho[2] - z))))]
    assert loss.tolist() == pytest.approx(want, rel=1e-6)
    assert rewards[:, 0].tolist() == pytest.approx([0.5, -0.5, 0.0])
    loss.sum().backward()
    assert policy.grad[:, 1].abs().sum() == 0  # no gradient through the reference point
    # A policy that moved down on mismatched answers: the estimate is clamped at 0.
    low, _ = preference_loss(policy.detach(), reference + 10, torch.ones(3, 2), "kto", 0.5, label=label)
    assert low[0] == pytest.approx(1 - 1 / (1 + math.exp(-0.5 * -9.0)), rel=1e-6)
    with pytest.raises(ValueError, match="needs a label"):
        preference_loss(policy, reference, torch.ones(3, 2), "kto", 0.5)


# --- against TRL ---------------------------------------------------------------------------------


class _FakeLM(torch.nn.Module):
    """What TRL's trainers call: per-token log-probs of the labelled tokens, table[token], 0 elsewhere."""

    is_gradient_checkpointing = False

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids, labels, fused_lm_head=True, **kwargs):
        target = labels[:, 1:]
        logp = torch.where(target != -100, self.table[target.clamp(min=0)], torch.zeros(()))
        zeros = torch.zeros_like(logp)
        return SimpleNamespace(log_probs=logp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _padded(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, completion_mask), right-padded with token 0."""
    width = max(len(e) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, :len(e)] = torch.tensor(e.input_ids)
        attention[i, :len(e)] = 1
        completion[i, :len(e)] = torch.tensor(e.loss_mask)
    return ids, attention, completion


def _trl_stub(policy: _FakeLM, reference: _FakeLM, **fields) -> SimpleNamespace:
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                                  unwrap_model=lambda m: m)
    return SimpleNamespace(model=policy, ref_model=reference, accelerator=accelerator, aux_loss_enabled=False,
                           precompute_ref_logps=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           **fields)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3, 1.0])
def test_ld_dpo_matches_trl(ld_alpha):
    trl = pytest.importorskip("trl.trainer.dpo_trainer")
    pairs = _random_pairs(10, seed=1)
    g = torch.Generator().manual_seed(2)
    table, ref_table = -5 * torch.rand(50, generator=g), -5 * torch.rand(50, generator=g)
    stub = _trl_stub(_FakeLM(table), _FakeLM(ref_table), ld_alpha=ld_alpha, beta=0.1,
                     f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
                     use_weighting=False, label_smoothing=0.0)
    ids, attention, completion = _padded([p.chosen for p in pairs] + [p.rejected for p in pairs])
    theirs = trl.DPOTrainer._compute_loss(stub, stub.model, {"input_ids": ids, "attention_mask": attention,
                                                              "completion_mask": completion}, False)
    reference = dpo_module.compute_reference(_as_module(ref_table), pairs, 3, 64, 0, torch.device("cpu"),
                                             bf16=False, shared=True)
    batch = collate_pairs([pairs], reference=reference)
    objective = PreferenceObjective("ld_dpo", 0.1, options=LossOptions(ld_alpha=ld_alpha))
    ours, _ = objective.loss(_table_module(table), batch)
    assert float(ours) / len(pairs) == pytest.approx(float(theirs), abs=1e-6)


def _as_module(table: torch.Tensor) -> torch.nn.Module:
    """The table stand-in as an nn.Module (compute_reference switches it to eval mode and back)."""
    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, position_ids, allowed, select, targets, segments=None):
            return table[targets]
    return Table()


def test_kto_matches_trl():
    trl = pytest.importorskip("trl.trainer.kto_trainer")
    pairs = _random_pairs(9, seed=3)  # `rejected` plays the mismatched answer
    g = torch.Generator().manual_seed(4)
    table, ref_table = -5 * torch.rand(50, generator=g), -5 * torch.rand(50, generator=g) - 1.5
    for desirable, undesirable in ((1.0, 1.0), (1.33, 0.75)):
        stub = _trl_stub(_FakeLM(table), _FakeLM(ref_table), calculate_KL=True, loss_type="kto", beta=0.3,
                         desirable_weight=desirable, undesirable_weight=undesirable)
        stub._compute_kl_logps = lambda model, batch: trl.KTOTrainer._compute_kl_logps(stub, model, batch)
        ids, attention, completion = _padded([p.chosen for p in pairs])
        kl_ids, kl_attention, kl_completion = _padded([p.rejected for p in pairs])
        label = torch.tensor([p.label > 0 for p in pairs])
        theirs = trl.KTOTrainer._compute_loss(stub, stub.model, {
            "input_ids": ids, "attention_mask": attention, "completion_mask": completion, "KL_input_ids": kl_ids,
            "KL_attention_mask": kl_attention, "KL_completion_mask": kl_completion, "label": label}, False)
        reference = dpo_module.compute_reference(_as_module(ref_table), pairs, 3, 64, 0, torch.device("cpu"),
                                                 bf16=False)
        objective = PreferenceObjective("kto", 0.3, options=LossOptions(desirable_weight=desirable,
                                                                        undesirable_weight=undesirable))
        ours, _ = objective.loss(_table_module(table), collate_pairs([pairs], reference=reference))
        assert stub._metrics["train"]["kl"][-1] > 0  # the estimate is active, not clamped away
        assert float(ours) / len(pairs) == pytest.approx(float(theirs), abs=1e-6)


# --- KTO data ------------------------------------------------------------------------------------


def test_thumbs_rows_become_answer_and_mismatched_answer(tmp_path, tiny):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignloop.data.builders import SCALAR

    def row(i: int, label: float) -> dict:
        return {"example_id": f"thumbs:t{i}", "user_id": f"u{i}", "conversation_id": f"c{i}", "turn_id": f"t{i}",
                "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Q{i}?"},
                             {"role": "assistant", "content": f"Answer number {i}."}],
                "label": label, "censored": False, "weight": 1.0}

    pq.write_table(pa.Table.from_pylist([row(0, 1.0), row(1, -1.0), row(2, 1.0)], schema=SCALAR),
                   tmp_path / "train.parquet")
    rows = read_unpaired(tmp_path / "train.parquet")
    assert [r.label for r in rows] == [1.0, -1.0, 1.0] and [r.key for r in rows] == ["u0", "u1", "u2"]
    assert [r.chosen[-1]["content"] for r in rows] == ["Answer number 0.", "Answer number 1.", "Answer number 2."]
    assert [r.rejected[-1]["content"] for r in rows] == ["Answer number 2.", "Answer number 0.", "Answer number 1."]
    assert rows[1].prompt[-1]["content"] == "Q1?"
    _, tokenizer = tiny
    tokenized, counts = tokenize_pairs(tokenizer, rows, 128)
    assert counts.kept == 3 and [p.label for p in tokenized] == [1.0, -1.0, 1.0]
    assert collate_pairs([tokenized]).label.tolist() == [1.0, -1.0, 1.0]

    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "completion": "yes", "label": True}) + "\n"
                    + json.dumps({"prompt": "hi", "completion": "no", "label": None}) + "\n")
    with pytest.raises(AlignloopError, match=r"kto.jsonl:2: 'label' must be a boolean or a number"):
        read_unpaired(path)


# --- tiny-model runs -----------------------------------------------------------------------------


def _run(tmp_path, *overrides: str) -> list[dict]:
    from alignloop.recipes import load_recipe
    from alignloop.train.config import DPORecipe
    from alignloop.train.stage import run_dpo

    recipe = load_recipe(TINY_RECIPE, DPORecipe, [*FAST, f"run.dir={tmp_path}", "train.steps=8",
                                                  "train.eval_every=8", *overrides])
    stage = run_dpo(recipe)
    return [json.loads(line) for line in stage.path("metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["ld_dpo", "rdpo"])
def test_length_controlled_runs_learn_the_preference(tmp_path, loss):
    metrics = _run(tmp_path, f"train.loss={loss}", "train.ld_alpha=0.5", "train.length_alpha=0.01")
    assert metrics[0]["accuracy"] == 0.5 and metrics[0]["margin"] == pytest.approx(0, abs=1e-5)
    assert metrics[-1]["eval_accuracy"] >= 0.8 and metrics[-1]["eval_margin"] > 0


def test_kto_run_learns_from_labelled_answers(tmp_path):
    """The demo pairs as unpaired answers: chosen ones desirable, rejected ones undesirable."""
    rows = [json.loads(line) for line in (REPO / "recipes" / "data" / "dpo_demo.jsonl").read_text().splitlines()]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps({"user_id": r["user_id"], "prompt": r["prompt"], "completion": r[side],
                                        "label": side == "chosen"}) + "\n"
                            for r in rows for side in ("chosen", "rejected")))
    metrics = _run(tmp_path, "train.loss=kto", f"data.path={path}")
    assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-5)  # policy = reference: 1 - sigma(0)
    assert 0 < metrics[0]["desirable"] < 1  # share of desirable answers in the step's batches
    assert metrics[-1]["eval_loss"] < 0.45
