"""Held-out preference-pair accuracy of any model, against a common reference.

DPO's implicit reward of a response is beta * (log pi(y) - log pi_ref(y)); its pair accuracy is the
share of pairs where the chosen side's reward beats the rejected side's (a tie counts one half).
The DPO trainer reports it against its own reference, i.e. its starting model, where that model
scores 0.5 by construction. To compare models fairly, every model here is scored against one
common reference (e.g. the base model): an SFT model then has an accuracy of its own (did SFT
raise the chosen answers more than the rejected ones?), and DPO trained from it must beat it.
beta scales rewards but never changes a sign, so accuracy does not depend on it.

A trained model is also scored against the model it was trained *from* (`start`), the way its
own trainer measured it: DPO's accuracy vs its SFT start, SFT's vs the base. Each model is then
judged by what its own training added, on the same pairs, and `paired` compares the two per pair.

`logp_accuracy` needs no reference: the share of pairs where the model gives the chosen side the
higher mean log-prob per token (the model's own preference).

Pairs are read and tokenized exactly as the DPO trainer does (`alignloop.train.dpo_data`), and
their held-out split, when asked for, is the trainer's (a stable hash of the user id).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from alignloop.train.dpo import sequence_logps
from alignloop.train.dpo_data import PairBatches, TokenizedPair
from alignloop.train.logprobs import TokenLogprobs
from alignloop.train.loop import autocast
from alignloop.ui import progress


@dataclass(frozen=True)
class PairAccuracy:
    accuracy: float | None       # implicit reward vs the reference (None for the reference itself)
    margin: float | None         # mean (log-ratio chosen - log-ratio rejected), beta = 1
    logp_accuracy: float         # chosen has the higher mean log-prob per token
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"accuracy": self.accuracy, "margin": self.margin, "logp_accuracy": self.logp_accuracy, "n": self.n}


def pair_lengths(pairs: Sequence[TokenizedPair]) -> torch.Tensor:
    """[P, 2] scored (response) tokens of each side."""
    return torch.tensor([[sum(p.chosen.loss_mask[1:]), sum(p.rejected.loss_mask[1:])] for p in pairs],
                        dtype=torch.float32)


def pair_logps(model: torch.nn.Module, pairs: Sequence[TokenizedPair], micro_batch: int = 8, row_len: int = 2048,
               pad_id: int = 0, bf16: bool = False, label: str = "pairs") -> torch.Tensor:
    """[len(pairs), 2] summed log-probs of each pair's chosen and rejected response under `model`."""
    module = TokenLogprobs(model)
    module.eval()
    device = next(model.parameters()).device
    table = torch.full((len(pairs), 2), float("nan"))
    position = {p.index: i for i, p in enumerate(pairs)}
    batches = PairBatches(pairs, row_len, micro_batch, pad_id=pad_id, shuffle=False)(0)
    with torch.no_grad(), autocast(device, bf16), progress() as bar:
        task = bar.add_task(f"log-probs: {label}", total=len(batches), info="")
        for i in range(len(batches)):
            rows = torch.tensor([position[p.index] for p in batches.items(i)], dtype=torch.long)
            table[rows] = sequence_logps(module, batches[i].to(device)).float().cpu()
            bar.update(task, advance=1)
    if torch.isnan(table).any():
        raise RuntimeError("pairs left without log-probs")  # a bug, not bad input
    return table


def _wins(margin: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where the chosen side wins, 0 where the rejected does, 0.5 on a tie."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def correct(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per pair: does the implicit reward (policy vs reference log-probs) prefer the chosen side."""
    ratio = policy - reference
    return _wins(ratio[:, 0] - ratio[:, 1])


def prefers_chosen(policy: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per pair: does the model itself give the chosen side the higher mean log-prob per token."""
    per_token = policy / lengths.clamp(min=1)
    return _wins(per_token[:, 0] - per_token[:, 1])


def accuracy(policy: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor) -> PairAccuracy:
    """Pair accuracy of `policy` log-probs ([P, 2]) against `reference` ([P, 2]; None: only logp_accuracy)."""
    own = float(prefers_chosen(policy, lengths).mean())
    if reference is None:
        return PairAccuracy(None, None, own, policy.shape[0])
    ratio = policy - reference
    margin = ratio[:, 0] - ratio[:, 1]
    return PairAccuracy(float(correct(policy, reference).mean()), float(margin.mean()), own, policy.shape[0])
