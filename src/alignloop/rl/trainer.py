"""The Trainer role: turns a batch of scored trajectories into one policy update.

GRPO, Dr.GRPO, DAPO, RLOO and REINFORCE++ differ only in the advantage (`advantages.py`), the
aggregation and the clip range (`losses.py`): one code path serves them all. PPO adds a value
head, per-token rewards (the KL penalty on every token, the reward on the last) and GAE. The KL
is charged once: in the loss for the group methods (GRPO as published), in the reward for PPO
(PPO-RLHF).

One RL step = `epochs` optimizer steps over the batch, each accumulating gradients over micro
batches of `micro_batch` sequences. With epochs = 1 the policy that sampled (up to engine
numerics) is the one being trained, so pi_old is simply the forward's own log-probs, detached:
no extra forward pass. The gap between them and the engine's log-probs is logged and, with
`tis_cap`, corrected by truncated importance sampling.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any

import torch

from alignloop.errors import AlignloopError
from alignloop.rl import advantages as adv_fns
from alignloop.rl.config import RLSection
from alignloop.rl.losses import (
    Norm,
    aggregate,
    clipped_surrogate,
    kl,
    masked_mean,
    truncated_is,
    value_loss,
)
from alignloop.rl.policy import PolicyLogprobs
from alignloop.rl.trajectory import Batch, Trajectory, collate, collate_shared
from alignloop.rl.weights import policy_weights
from alignloop.train import checkpoint as ckpt
from alignloop.train import dist, expert_parallel, session
from alignloop.train.config import ParallelSection
from alignloop.train.lora import merged
from alignloop.train.loop import autocast, make_optimizer
from alignloop.train.schedule import Schedule, make_scheduler


def sequence_advantages(rewards: torch.Tensor, cfg: RLSection) -> torch.Tensor:
    if cfg.algorithm in ("grpo", "dr_grpo", "dapo"):
        return adv_fns.grpo(rewards, cfg.group, scale=cfg.scale)
    if cfg.algorithm == "rloo":
        return adv_fns.rloo(rewards, cfg.group)
    if cfg.algorithm == "reinforce_pp":
        return adv_fns.reinforce_pp(rewards, cfg.group)
    raise ValueError(f"{cfg.algorithm} has no sequence-level advantage")


def _require_finite(**values: float) -> None:
    """Stop before an update that would poison the weights (and, after it, metrics.jsonl)."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise AlignloopError(f"non-finite {name.replace('_', ' ')} ({value}): lower rl.lr or check the reward")


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: RLSection, temperature: float = 1.0, pad_id: int = 0,
                 max_tokens: int = 64, parallel: ParallelSection | None = None) -> None:
        """`parallel` (under torchrun, MoE models): split the routed experts across the processes
        (`train.expert_parallel`). Every process then calls `step` with the same trajectories and
        trains on its share of the micro batches; the result is the one-process step."""
        self.cfg = cfg
        self.model = model
        self.pad_id = pad_id
        self.max_tokens = max_tokens
        self.device = next(model.parameters()).device
        self._ref = None
        if cfg.beta > 0 and not hasattr(model, "peft_config"):
            # Before any expert sharding: the frozen reference stays whole on every process.
            self._ref = copy.deepcopy(model).requires_grad_(False).eval()
        self.module = PolicyLogprobs(model, temperature, value_head=cfg.algorithm == "ppo",
                                     entropy_grad=cfg.entropy_coef > 0).to(self.device)
        self.module.train()
        self.ep = expert_parallel.setup(self.module, parallel)  # before the optimizer: it swaps parameters
        self.optimizer = make_optimizer(self.module, cfg)
        self.scheduler = make_scheduler(self.optimizer, Schedule(cfg.schedule, cfg.steps * cfg.epochs,
                                                                 cfg.warmup_steps, cfg.min_lr_ratio))
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

    # ---- pieces ---------------------------------------------------------------------------------
    def _forward(self, module: torch.nn.Module, b: Batch):
        routing = b.routing if self.cfg.routing_replay else None
        return module(b.input_ids, b.position_ids, b.allowed, b.select, b.targets, routing=routing)

    @torch.no_grad()
    def _reference(self, b: Batch) -> torch.Tensor:
        """Reference-policy log-probs: the base model (LoRA: adapters off; full: a frozen copy)."""
        if self._ref is not None:
            module, ctx = PolicyLogprobs(self._ref, self.module.temperature), contextlib.nullcontext()
        else:
            module, ctx = self.module, self.model.disable_adapter()
        with ctx, autocast(self.device, self.cfg.bf16):
            return b.scatter(self._forward(module, b)[0])

    def _micro_batches(self, trajectories: list[Trajectory], keep: list[int]) -> list[Batch]:
        size = self.cfg.micro_batch
        if not self.cfg.share_prefix:
            # Similar lengths together: less padding in every forward.
            order = sorted(keep, key=lambda i: len(trajectories[i].tokens))
            return [collate([trajectories[i] for i in order[s:s + size]], order[s:s + size], self.pad_id)
                    .to(self.device) for s in range(0, len(order), size)]
        # One row per prompt group (its prompt computed once), up to `micro_batch` sequences a batch.
        groups: dict[int, list[int]] = {}
        for i in keep:
            groups.setdefault(trajectories[i].group, []).append(i)
        rows = [g[s:s + size] for g in groups.values() for s in range(0, len(g), size)]
        rows.sort(key=lambda r: sum(len(trajectories[i].tokens) for i in r))  # similar lengths together
        batches, current = [], []
        for row in rows:
            if current and sum(map(len, current)) + len(row) > size:
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
        return [collate_shared(b, trajectories, self.pad_id).to(self.device) for b in batches]

    # ---- one RL step ----------------------------------------------------------------------------
    def step(self, trajectories: list[Trajectory]) -> dict[str, Any]:
        cfg = self.cfg
        began = time.perf_counter()
        rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float32)
        if not torch.isfinite(rewards).all():
            bad = int((~torch.isfinite(rewards)).nonzero()[0])
            raise AlignloopError(f"non-finite reward {float(rewards[bad])} at sample {bad}")
        norm = Norm(sequences=len(trajectories), tokens=sum(t.n_policy for t in trajectories),
                    max_tokens=self.max_tokens)
        ppo = cfg.algorithm == "ppo"
        seq_adv = None if ppo else sequence_advantages(rewards, cfg)
        # A sequence with advantage 0 adds exactly 0 to the policy loss (and to the gradient) when no
        # per-token KL or entropy term applies: skip its forward and backward. Whole GRPO groups that
        # were all right or all wrong are common, early and late in a run.
        exact_skip = not ppo and cfg.beta == 0 and cfg.entropy_coef == 0
        keep = [i for i in range(len(trajectories))
                if trajectories[i].n_policy and not (exact_skip and float(seq_adv[i]) == 0.0)]
        batches = self._micro_batches(trajectories, keep)

        # What must come from the policy *before* any update: for several epochs or PPO, pi_old and
        # the values; for a KL term, the reference.
        pre: list[dict[str, torch.Tensor]] = [{} for _ in batches]
        if cfg.epochs > 1 or ppo:
            with torch.no_grad(), autocast(self.device, cfg.bf16):
                for b, p in zip(batches, pre):
                    logp, _, values = self._forward(self.module, b)
                    p["old"] = b.scatter(logp)
                    if values is not None:
                        p["values"] = b.scatter(values.float())
        if cfg.beta > 0:
            for b, p in zip(batches, pre):
                p["ref"] = self._reference(b)
        if ppo:
            self._ppo_advantages(batches, pre, rewards)

        # Expert parallel: this process trains micro batches r, r + W, ... (and padding passes, so
        # every process runs as many forwards and backwards: each one exchanges tokens). The losses
        # are normalised by the whole step's counts (`norm`), so the step's gradient is the sum over
        # processes: times W here, as `ExpertParallel.reduce_gradients` averages.
        ctx = dist.context()
        mine = dist.my_share(len(batches), ctx) if self.ep is not None else list(range(len(batches)))
        padding = (dist.passes_per_process(len(batches), ctx) - len(mine)) if self.ep is not None and batches else 0
        scale = float(ctx.world) if self.ep is not None else 1.0
        stats: dict[str, float] = {}
        last_grad_norm = 0.0
        for _ in range(cfg.epochs):
            self.optimizer.zero_grad(set_to_none=True)
            totals: dict[str, float] = {}
            for i in mine:
                with autocast(self.device, cfg.bf16):
                    loss, s = self._loss(batches[i], pre[i], seq_adv, norm)
                (loss * scale if scale != 1.0 else loss).backward()
                for k, v in s.items():
                    totals[k] = totals.get(k, 0.0) + v
            for _ in range(padding):
                j = mine[0] if mine else 0
                with autocast(self.device, cfg.bf16):
                    loss, s = self._loss(batches[j], pre[j], seq_adv, norm)
                (loss * 0.0).backward()
                for k in s:
                    totals.setdefault(k, 0.0)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
            if self.ep is not None:
                totals = _reduce_totals(totals)
                self.ep.reduce_gradients(self.trainable)
                last_grad_norm = self.ep.clip_grad_norm(self.trainable, max_norm) if batches else 0.0
            else:
                last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)) if batches else 0.0
            _require_finite(loss=totals.get("loss", 0.0), gradient_norm=last_grad_norm)  # before the update
            self.optimizer.step()
            self.scheduler.step()
            stats = totals
        tokens = max(sum(int(b.mask.sum()) for b in batches), 1)
        out = {k.removesuffix("_tok"): v / tokens for k, v in stats.items() if k.endswith("_tok")}
        out.update({k: v for k, v in stats.items() if not k.endswith("_tok")})
        out.update({"grad_norm": last_grad_norm, "lr": self.scheduler.get_last_lr()[0],
                    "trained_sequences": len(keep), "skipped_sequences": len(trajectories) - len(keep),
                    "policy_tokens": norm.tokens, "train_seconds": time.perf_counter() - began})
        if seq_adv is not None:
            out["adv_abs"] = float(seq_adv.abs().mean())
        return out

    def _loss(self, b: Batch, p: dict[str, torch.Tensor], seq_adv: torch.Tensor | None, norm: Norm):
        cfg = self.cfg
        logp_flat, ent_flat, values_flat = self._forward(self.module, b)
        logp = b.scatter(logp_flat)
        old = p.get("old", logp.detach())
        weights = None
        n_tok = float(b.mask.sum())
        s: dict[str, float] = {}
        if cfg.tis_cap is not None:
            weights, mm = truncated_is(old, b.rollout_logp, b.mask, cfg.tis_cap)
            s.update({f"{k}_tok": float(v) * n_tok for k, v in mm.items() if k != "mismatch_max"})
            s["mismatch_max"] = float(mm["mismatch_max"])
        adv = p["adv"] if "adv" in p else seq_adv[b.index].to(logp.device)
        per_token, ps = clipped_surrogate(logp, old, adv, b.mask, cfg.clip_low, cfg.high, weights)
        total = per_token
        entropy = b.scatter(ent_flat)
        if cfg.beta > 0:
            k = kl(logp, p["ref"], cfg.kl)
            if cfg.algorithm != "ppo":  # PPO charged the KL in its per-token rewards: once is the objective
                total = total + cfg.beta * k
            s["kl_tok"] = float(masked_mean(k.detach(), b.mask)) * n_tok
        if cfg.entropy_coef > 0:
            total = total - cfg.entropy_coef * entropy
        loss = aggregate(total, b.mask, cfg.agg, norm)
        if values_flat is not None:
            values = b.scatter(values_flat.float())
            vl = value_loss(values, p["values"], p["returns"], cfg.value_clip)
            loss = loss + cfg.vf_coef * aggregate(vl, b.mask, "token-mean", norm)
            s["value_loss_tok"] = float(masked_mean(vl.detach(), b.mask)) * n_tok
        s.update({"loss": float(loss.detach()), "entropy_tok": float(masked_mean(entropy.detach(), b.mask)) * n_tok,
                  "clip_frac_tok": float(ps["clip_frac"]) * n_tok})
        s.update(self._engine_gap(old, b))  # pi_old: before this step's update, as the engine sampled
        if cfg.replay_check and b.routing is not None:
            with torch.no_grad():  # the same tokens through the router's own choices: what replay saves
                other = b.scatter(self.module(b.input_ids, b.position_ids, b.allowed, b.select, b.targets,
                                              routing=None if cfg.routing_replay else b.routing)[0])
            tag = "noreplay" if cfg.routing_replay else "replay"
            s.update({f"{tag}/{k}": v for k, v in self._engine_gap(other, b).items()})
        return loss, s

    def _engine_gap(self, logp: torch.Tensor, b: Batch) -> dict[str, float]:
        """How far the trainer's log-probs are from the engine's on the policy tokens (summed, per
        token): |log p_trainer - log p_engine| and the share whose ratio falls outside the clip range
        [1 - clip_low, 1 + clip_high], i.e. would be clipped if the engine's log-probs were pi_old."""
        gap = (logp - b.rollout_logp).float()
        m = b.mask
        ratio = gap.exp()
        outside = (ratio < 1 - self.cfg.clip_low) | (ratio > 1 + self.cfg.high)
        return {"engine_gap_tok": float(gap.abs()[m].sum()), "engine_clip_frac_tok": float(outside[m].sum())}

    def _ppo_advantages(self, batches: list[Batch], pre: list[dict], rewards: torch.Tensor) -> None:
        """Per-token rewards (-beta x the `cfg.kl` estimate on every policy token, the episode reward on
        its last), GAE, whitening. With k1 this is PPO-RLHF's reward; the KL is charged here only."""
        cfg = self.cfg
        for b, p in zip(batches, pre):
            token_rewards = torch.zeros(b.mask.shape)
            if cfg.beta > 0:
                token_rewards -= cfg.beta * kl(p["old"], p["ref"], cfg.kl) * b.mask
            last = b.mask.float().cumsum(1).argmax(1)  # the last policy token of each row
            token_rewards[torch.arange(len(b.index)), last] += rewards[b.index]
            p["adv"], p["returns"] = adv_fns.gae(token_rewards, p["values"], b.mask, cfg.gamma, cfg.lam)
        whitened = adv_fns.whiten([p["adv"] for p in pre], [b.mask for b in batches])
        for p, adv in zip(pre, whitened):
            p["adv"] = adv


def _reduce_totals(totals: dict[str, float]) -> dict[str, float]:
    """Every process's step statistics combined: sums summed, `*_max` maxed."""
    maxed = {k: v for k, v in totals.items() if k.endswith("_max")}
    _, summed = dist.reduce_sums(0.0, {k: v for k, v in totals.items() if k not in maxed})
    if maxed and dist.context().enabled:
        keys = sorted(maxed)
        box = torch.tensor([maxed[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
        maxed = dict(zip(keys, box.tolist()))
    return {**summed, **maxed}


class TrainerRole:
    """The Trainer role behind one interface, in this process (`--backend local`) or inside a Ray
    actor (`ray_backend.TrainerWorker`): train on scored trajectories, hand out the policy's weights
    for Inference, checkpoint and resume, save the final model.

    `model` must already have been copied by the engine (it fuses its own buffers): the adapters
    are added here, after it, from torch's RNG seeded with `cfg.seed`.
    """

    def __init__(self, model: torch.nn.Module, cfg: RLSection, temperature: float, pad_id: int,
                 max_tokens: int) -> None:
        self.model = session.make_trainable(model, cfg)
        self.trainer = Trainer(self.model, cfg, temperature, pad_id, max_tokens)

    def step(self, trajectories: list[Trajectory]) -> dict[str, float]:
        return self.trainer.step(trajectories)

    def weights(self) -> list[tuple[str, torch.Tensor]]:
        return list(policy_weights(self.model))

    def save_checkpoint(self, root: Any, step: int, extra: dict[str, Any], keep: int) -> None:
        t = self.trainer
        ckpt.save_checkpoint(root, step, t.module, t.optimizer, t.scheduler, extra, keep=keep)

    def load_checkpoint(self, path: Any) -> dict[str, Any]:
        """Weights, optimizer, scheduler and RNGs from `path`; its trainer state (step, extras)."""
        t = self.trainer
        return ckpt.load_checkpoint(path, t.module, t.optimizer, t.scheduler)

    def save_policy(self, tokenizer: Any, folder: Any) -> list:
        return session.save_model(merged(self.model), tokenizer, folder)
