"""`alignloop train ep-check RECIPE`: what goes wrong in expert-parallel training, shown.

Trains one MoE recipe (pre-training or SFT) five times on the same global batch:

    reference     one process, all experts, one thread: the same kernels each parallel process runs
    fastest       the same with as many threads as the parallel runs have processes (for speed only)
    correct       P processes, experts split P ways, replicated gradients over all ranks and
                  expert gradients over their expert-data group (`expert_parallel`)
    none          the same without any gradient reduction (the forgotten hooks)
    experts_too   expert gradients averaged over all ranks as well (the replicas agree, wrongly)

A one-process run with more threads is no reference for the weights: on tiny-deepseek, 30 steps
at 2 threads end 1e-3 (replicated) and 1e-2 (experts) away from the same run at 1 thread, because
fp32 summation order flips near-tied top-k choices and the bias update turns each flip into a full
step; the correct expert-parallel run ends 1e-7 from the 1-thread run. For the same reason the
reference runs one pass per micro batch, the shapes each parallel process runs, although an
expert's gradient is then a sum of two GEMMs where its owner rank does one over the same rows: on
pretrain_moe.toml, forwarding each step's micro batches together (micro_batch x 2) tracked the
correct run's loss to 1e-7 for 19 steps, then a near-tie flipped and after 30 steps the experts
were 1.0e-1 apart (7.5e-3 replicated). Over the few steps of the tests, where no tie flips, the
combined batch is the tighter reference for the experts (`tests/test_expert_parallel.py`).

Then it writes `ep_check.png` (per step: gradient norm, loss, and the replicas' divergence, per mode)
and `ep_check.json` into runs/<run>/ep-check/, and prints a table with each mode's final distance
from the reference and the speed of the correct mode against one process. Each parallel run is a
`torchrun` of `alignloop train KIND` (the same code path as a real launch); the reference runs in a
child process too, so every run starts from the same state.

On one machine with few cores the parallel runs measure overhead, not speed-up: P processes share
the cores one process had, and pay the all-to-all on top.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from alignloop.errors import AlignloopError
from alignloop.runs import atomic_path
from alignloop.ui import say

MODES = ("correct", "none", "experts_too")
PLOT_FILE = "ep_check.png"
REPORT_FILE = "ep_check.json"


@dataclass(frozen=True)
class Plan:
    kind: str           # "pretrain" or "sft": the `alignloop train` command
    recipe: Path
    overrides: list[str]
    folder: Path        # runs/<run>/ep-check
    processes: int = 2


def _run_dir(plan: Plan, name: str) -> Path:
    return plan.folder / name


def stage_dir(plan: Plan, name: str) -> Path:
    return _run_dir(plan, name) / "r" / plan.kind


def _command(plan: Plan, name: str, parallel: bool, threads: int) -> tuple[list[str], dict[str, str]]:
    sets = [*plan.overrides, "run.name=r", f"run.dir={_run_dir(plan, name)}"]
    if parallel:
        sets += [f"train.parallel.expert={plan.processes}", f"train.parallel.grad_sync={name}",
                 "train.parallel.check_replicas=true"]
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={plan.processes}", "-m", "alignloop.cli"]
    else:
        head = [sys.executable, "-m", "alignloop.cli"]
    cmd = [*head, "train", plan.kind, str(plan.recipe), *[a for s in sets for a in ("--set", s)]]
    return cmd, {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"}


def run_all(plan: Plan) -> None:
    """The five trainings, one after the other (each finished one is skipped on a rerun)."""
    runs = [("reference", False, 1), ("fastest", False, plan.processes), *((m, True, 1) for m in MODES)]
    for name, parallel, threads in runs:
        if (stage_dir(plan, name) / "manifest.json").exists():
            say(f"ep-check: {name} done before, kept")
            continue
        say(f"ep-check: training {name} ({plan.processes} processes, 1 thread each)" if parallel
            else f"ep-check: training {name} (1 process, {threads} thread{'s' if threads > 1 else ''})")
        cmd, env = _command(plan, name, parallel, threads)
        child = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise AlignloopError(f"ep-check: the {name} run failed (exit {child.returncode}):\n"
                                 + (child.stderr or child.stdout)[-3000:])


def metrics(stage: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def distance(model: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], experts: bool) -> float:
    """|model - reference| / |reference| over the routed-expert tensors (experts=True) or all others."""
    keys = [k for k in reference if (".mlp.experts." in k) == experts]
    diff = sum(float((model[k].double() - reference[k].double()).pow(2).sum()) for k in keys) ** 0.5
    return diff / max(sum(float(reference[k].double().pow(2).sum()) for k in keys) ** 0.5, 1e-30)


def speed(rows: list[dict[str, Any]]) -> dict[str, float]:
    """tokens/s over the steps after the first (warm-up), and the all-to-all share of that time."""
    timed = rows[1:] or rows
    seconds = sum(r["seconds"] for r in timed)
    out = {"tokens_per_s": round(sum(r.get("tokens", 0) for r in timed) / seconds, 1) if seconds else 0.0}
    if any("ep/a2a_s" in r for r in timed):
        out["a2a_share"] = round(sum(r.get("ep/a2a_s", 0.0) for r in timed) / seconds, 4)
    return out


def summarise(plan: Plan) -> dict[str, Any]:
    """The numbers of `ep_check.json`: per mode, its curves, final distances and speed."""
    ref_stage = stage_dir(plan, "reference")
    reference = load_file(ref_stage / "model" / "model.safetensors")
    out: dict[str, Any] = {"processes": plan.processes, "kind": plan.kind, "modes": {}}
    ref_rows = metrics(ref_stage)
    out["reference"] = {"loss": [r["loss"] for r in ref_rows], "grad_norm": [r["grad_norm"] for r in ref_rows],
                        **speed(ref_rows)}
    for mode in MODES:
        stage = stage_dir(plan, mode)
        rows = metrics(stage)
        weights = load_file(stage / "model" / "model.safetensors")
        out["modes"][mode] = {
            "loss": [r["loss"] for r in rows], "grad_norm": [r["grad_norm"] for r in rows],
            "replica_divergence": [r.get("ep/replica_divergence", 0.0) for r in rows],
            "replicated_vs_reference": distance(weights, reference, experts=False),
            "experts_vs_reference": distance(weights, reference, experts=True),
            **speed(rows)}
    fastest = stage_dir(plan, "fastest")
    out["fastest"] = speed(metrics(fastest)) if (fastest / "metrics.jsonl").exists() else dict(out["reference"])
    out["fastest"]["threads"] = plan.processes if (fastest / "metrics.jsonl").exists() else 1
    correct = out["modes"]["correct"]
    out["speed_ratio"] = round(correct["tokens_per_s"] / out["fastest"]["tokens_per_s"], 3)
    return out


def plot(report: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    colours = {"correct": "tab:green", "none": "tab:red", "experts_too": "tab:orange"}
    labels = {"correct": "correct", "none": "no gradient sync", "experts_too": "experts wrongly reduced"}
    ref = report["reference"]
    for ax, key, title in ((axes[0], "grad_norm", "gradient norm (before clipping)"), (axes[1], "loss", "training loss")):
        ax.plot(range(1, len(ref[key]) + 1), ref[key], "k--", linewidth=1.5, label="1 process, 1 thread (reference)")
        for mode, data in report["modes"].items():
            ax.plot(range(1, len(data[key]) + 1), data[key], color=colours[mode], linewidth=1.2, label=labels[mode])
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    for mode, data in report["modes"].items():
        values = [max(v, 1e-12) for v in data["replica_divergence"]]
        axes[2].plot(range(1, len(values) + 1), values, color=colours[mode], label=labels[mode])
    axes[2].set_yscale("log")
    axes[2].set_title("replicas apart: max |p - p(rank 0)| / |p(rank 0)|\n(0 drawn at 1e-12)", fontsize=10)
    axes[2].set_xlabel("optimizer step")
    axes[2].legend(fontsize=8)
    modes = list(report["modes"])
    x = range(len(modes))
    for offset, key, name in ((-0.2, "replicated_vs_reference", "replicated"), (0.2, "experts_vs_reference", "routed experts")):
        axes[3].bar([i + offset for i in x], [max(report["modes"][m][key], 1e-12) for m in modes], width=0.4,
                    label=name, color="tab:blue" if offset < 0 else "tab:purple")
    axes[3].set_xticks(list(x), [labels[m] for m in modes], fontsize=8)
    axes[3].set_yscale("log")
    axes[3].set_title("final weights: |p - p(reference)| / |p(reference)|")
    axes[3].legend(fontsize=8)
    fig.suptitle(f"expert parallel, {report['processes']} processes vs 1 on the same global batch ({report['kind']})")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def table(report: dict[str, Any]) -> list[str]:
    lines = [f"{'mode':<12} {'final loss':>10} {'max grad norm':>13} {'replicas apart':>14} "
             f"{'replicated vs ref':>17} {'experts vs ref':>14}"]
    ref = report["reference"]
    lines.append(f"{'reference':<12} {ref['loss'][-1]:>10.4f} {max(ref['grad_norm']):>13.3f} {'-':>14} {'-':>17} {'-':>14}")
    for mode, d in report["modes"].items():
        lines.append(f"{mode:<12} {d['loss'][-1]:>10.4f} {max(d['grad_norm']):>13.3f} "
                     f"{d['replica_divergence'][-1]:>14.2e} {d['replicated_vs_reference']:>17.2e} "
                     f"{d['experts_vs_reference']:>14.2e}")
    correct = report["modes"]["correct"]
    fastest = report["fastest"]
    lines.append(f"speed: {report['processes']}-process EP {correct['tokens_per_s']:.1f} tok/s vs 1 process "
                 f"({fastest['threads']} threads) {fastest['tokens_per_s']:.1f} tok/s (x{report['speed_ratio']:.2f}); all-to-all "
                 f"{correct.get('a2a_share', 0.0):.1%} of the EP step time. Same cores for both: this "
                 f"measures the overhead of splitting the experts, not a speed-up.")
    return lines


def ep_check(plan: Plan) -> dict[str, Any]:
    plan.folder.mkdir(parents=True, exist_ok=True)
    run_all(plan)
    report = summarise(plan)
    with atomic_path(plan.folder / REPORT_FILE) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plot(report, plan.folder / PLOT_FILE)
    for line in table(report):
        say(line)
    say(f"plot: {plan.folder / PLOT_FILE}")
    return report
