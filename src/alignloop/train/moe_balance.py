"""Expert balancing for MoE models in the training loop (DeepSeek-V3's recipe, section 2.1.2).

What the loop does when the module holds MoE layers (`alignloop.models.deepseek.MoE`), nothing
otherwise:

- after each optimizer step, the router-bias update: b_e += gamma * sign(mean load - load_e) from
  the step's per-expert token counts (`train.moe.bias_update_speed`, V3's 1e-3; 0 freezes the bias
  and only measures). The counts cover real tokens only: `TokenLogprobs` marks padding out
  (`real_tokens`);
- optionally V3's complementary sequence-wise balance loss, alpha * L_bal, added to each micro
  batch's loss (`train.moe.balance_loss`, default 0; see `MoESection`);
- per step, per MoE layer, MaxVio = (max load - mean) / mean and the least/most loaded expert's
  share of the routed slots, into metrics.jsonl (`moe/L{layer}/maxvio`, ..., and `moe/maxvio`, the
  mean over layers);
- at the end of the run, `moe_maxvio.png` in the stage folder: MaxVio per layer over steps.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignloop.models.deepseek import MoE, load_stats, sequence_balance_loss, update_router_bias
from alignloop.train.config import MoESection

PLOT_FILE = "moe_maxvio.png"


def moe_layers_named(module: torch.nn.Module) -> list[tuple[str, MoE]]:
    """(label, layer) of every MoE block; label `L{n}` is the decoder layer's index (MTP blocks: L{num_layers+k})."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, MoE):
            found = re.search(r"layers\.(\d+)\.", name)
            out.append((f"L{found.group(1)}" if found else name, m))
    return out


def has_moe(module: torch.nn.Module) -> bool:
    return any(isinstance(m, MoE) for m in module.modules())


@contextlib.contextmanager
def real_tokens(layers: list[MoE], mask: torch.Tensor | None) -> Iterator[None]:
    """During the block, the MoE `layers` count only the tokens where `mask` [B, T] is True (None: all)."""
    if mask is None or not layers:
        yield
        return
    for m in layers:
        m.real_tokens = mask
    try:
        yield
    finally:
        for m in layers:
            m.real_tokens = None


def layer_stats(module: torch.nn.Module) -> dict[str, float]:
    """Load statistics of the counts accumulated since the last update, for the layers that routed
    anything this step (the MTP block is not run by the trainers' forward: no row for it)."""
    out: dict[str, float] = {}
    vios = []
    for label, m in moe_layers_named(module):
        if float(m.load.sum()) == 0:
            continue
        for key, value in load_stats(m.load).items():
            out[f"moe/{label}/{key}"] = round(value, 5)
        vios.append(out[f"moe/{label}/maxvio"])
    if vios:
        out["moe/maxvio"] = round(sum(vios) / len(vios), 5)
    return out


@dataclass
class Balancer:
    """The loop's balancing hook for one module: `objective(...)` adds the balance loss,
    `after_step()` updates the bias and returns the step's load metrics."""

    module: torch.nn.Module
    gamma: float = 1e-3
    alpha: float = 0.0
    all_reduce: bool = True  # sum the counts over processes (under torchrun) before the update
    _captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)

    def after_step(self) -> dict[str, float]:
        """Once after each optimizer step: the step's load statistics, then the bias update
        (which consumes the counts; all-reduced over processes under torchrun)."""
        stats = layer_stats(self.module)
        update_router_bias(self.module, self.gamma, all_reduce=self.all_reduce)
        return stats

    @contextlib.contextmanager
    def capture(self) -> Iterator[list]:
        """Record (chosen experts, scores, real-token mask) of every MoE layer run in the block."""
        self._captured = []

        def hook(layer: MoE, args: Any, output: tuple) -> None:
            _, idx, scores = output
            self._captured.append((idx, scores, layer.real_mask(*idx.shape[:2])))

        handles = [m.register_forward_hook(hook) for _, m in moe_layers_named(self.module)]
        try:
            yield self._captured
        finally:
            for h in handles:
                h.remove()

    def balance_loss(self, top_k: int) -> torch.Tensor | None:
        """V3's sequence-wise balance loss over the captured layers (each packed row is a sequence)."""
        if not self._captured:
            return None
        total = None
        for idx, scores, mask in self._captured:
            part = sequence_balance_loss([scores], [idx], top_k, mask)
            total = part if total is None else total + part
        return total


class BalancedObjective:
    """An `Objective` plus alpha x the sequence-wise balance loss, weighted like the objective's own
    mean: alpha * L_bal * weight(batch), which the loop divides by the step's weight."""

    def __init__(self, objective: Any, balancer: Balancer, top_k: int) -> None:
        self.objective, self.balancer, self.top_k = objective, balancer, top_k

    def weight(self, batch: Any) -> float:
        return self.objective.weight(batch)

    def loss(self, module: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        with self.balancer.capture():
            loss, stats = self.objective.loss(module, batch)
            bal = self.balancer.balance_loss(self.top_k)
        if bal is None or not torch.is_grad_enabled():
            return loss, stats
        w = self.objective.weight(batch)
        return loss + self.balancer.alpha * bal * w, {**stats, "balance_sum": float(bal.detach()) * w}


def balancer_for(module: torch.nn.Module, config: Any) -> Balancer | None:
    """The loop's hook for `module` under `config.moe` (a TrainSection), or None without MoE layers."""
    if not has_moe(module):
        return None
    moe = getattr(config, "moe", None) or MoESection()
    return Balancer(module, gamma=moe.bias_update_speed, alpha=moe.balance_loss)


def top_k_of(module: torch.nn.Module) -> int:
    return next(m for _, m in moe_layers_named(module)).gate.top_k


# --- the plot ----------------------------------------------------------------------------------


def maxvio_series(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """{layer label: [(step, maxvio)]} from a stage's metrics.jsonl (a resumed run's last record per step)."""
    series: dict[str, dict[int, float]] = {}
    if not metrics_file.exists():
        return {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        step = record.get("step")
        for key, value in record.items():
            found = re.fullmatch(r"moe/(L\d+)/maxvio", key)
            if found and step is not None:
                series.setdefault(found.group(1), {})[step] = value
    return {k: sorted(v.items()) for k, v in sorted(series.items(), key=lambda kv: int(kv[0][1:]))}


def plot_maxvio(metrics_file: Path, out: Path) -> Path | None:
    """MaxVio per MoE layer over steps as a PNG (written atomically); None when nothing was logged."""
    series = maxvio_series(metrics_file)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        ax.plot([s for s, _ in points], [v for _, v in points], label=f"layer {label[1:]}", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MaxVio = (max load - mean) / mean")
    ax.set_title("Expert load imbalance per MoE layer")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
