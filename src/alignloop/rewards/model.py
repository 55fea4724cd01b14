"""`RewardModel`: a backbone plus heads, trained on reward-model sets, saved to and loaded from a run folder.

The same class serves both backbones; only `backbone.trainable` changes the training loop: a frozen
backbone's features are computed once per set and the heads train on them, a LoRA backbone computes
features per batch with gradients.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignloop.errors import AlignloopError
from alignloop.rewards import heads as H
from alignloop.rewards.backbones import LMBackbone, MiniLMBackbone, make_backbone
from alignloop.rewards.config import BackboneSection, HeadTrainSection
from alignloop.rewards.data import ACTIVITY_DIM, HeadData, activity_matrix, take, user_holdout
from alignloop.runs import atomic_path, atomic_write_json
from alignloop.train.config import TrainSection
from alignloop.train.loop import make_optimizer
from alignloop.train.schedule import Schedule, make_scheduler

Backbone = MiniLMBackbone | LMBackbone


@dataclass
class Features:
    """A head set's inputs: features of the scored answers (and the rejected ones for preference)."""

    x: torch.Tensor
    x_rejected: torch.Tensor | None = None


def _take_features(f: Features, idx: np.ndarray) -> Features:
    t = torch.as_tensor(idx)
    return Features(f.x[t], None if f.x_rejected is None else f.x_rejected[t])


def _optimizer_config(cfg: HeadTrainSection) -> TrainSection:
    """The heads' optimizer settings in the trainers' terms (AdamW's default betas and eps)."""
    return TrainSection(lr=cfg.lr, weight_decay=cfg.weight_decay)


class _Draws:
    """Batches of row indices per head: a seeded permutation per pass, redrawn when it runs out."""

    def __init__(self, sets: dict[str, HeadData], names: list[str], batch_size: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.sizes = {n: len(sets[n]) for n in names}
        self.batch_size = batch_size
        self.orders = {n: self.rng.permutation(size) for n, size in self.sizes.items()}
        self.cursor = dict.fromkeys(names, 0)

    def next(self, n: str) -> np.ndarray:
        if self.cursor[n] + self.batch_size > self.sizes[n]:
            self.orders[n], self.cursor[n] = self.rng.permutation(self.sizes[n]), 0
        idx = self.orders[n][self.cursor[n]:self.cursor[n] + self.batch_size]
        self.cursor[n] += len(idx)
        return idx


class RewardModel:
    def __init__(self, backbone: Backbone, names: list[str], train: HeadTrainSection, activity: bool = False,
                 use_text: bool = True):
        self.backbone = backbone
        self.names = list(names)
        self.train_config = train
        self.activity = activity
        self.use_text = use_text  # False: the shortcut check's activity-only model
        dim = (backbone.dim if use_text else 0) + (ACTIVITY_DIM if activity else 0)
        torch.manual_seed(train.seed)
        side = ACTIVITY_DIM if (activity and use_text) else 0
        self.heads = H.Heads(dim, self.names, train.hidden, train.dropout, side_dim=side)

    # --- inputs --------------------------------------------------------------------------------

    def _inputs(self, feats: torch.Tensor, act: np.ndarray | None) -> torch.Tensor:
        parts = [feats] if self.use_text else [feats[:, :0]]
        if self.activity:
            if act is None:
                raise AlignloopError("this reward model was trained with user-activity features; pass them")
            parts.append(torch.from_numpy(act))
        return torch.cat(parts, dim=1)

    def features(self, data: HeadData, progress: Any = None) -> Features:
        with torch.no_grad():
            x = self.backbone.features(data.contexts, data.responses, progress)
            xr = self.backbone.features(data.contexts, data.rejected, progress) if data.rejected is not None else None
        return Features(x.detach(), None if xr is None else xr.detach())

    # --- training ------------------------------------------------------------------------------

    def fit(self, sets: dict[str, HeadData], activity: dict[str, np.ndarray] | None = None,
            cached: dict[str, Features] | None = None, progress: Any = None,
            log: Callable[[int, dict[str, float]], None] | None = None, describe: str = "heads") -> None:
        """Train all heads jointly: each step draws one batch per head. `cached`: frozen features.

        AdamW and a cosine schedule to 0 (the trainers' `make_optimizer` and `make_scheduler`),
        the LoRA backbone (when it trains) at its own `backbone_lr`. Every `eval_every` steps
        the held-out users' losses are computed and each head keeps its state of lowest loss.
        """
        cfg = self.train_config
        trainable = self.backbone.trainable and self.use_text and cached is None
        if not trainable and cached is None:
            cached = {n: self.features(sets[n], progress) for n in self.names}
        sets, cached, val = self._split_validation(sets, cached)
        acts = {n: activity_matrix(activity or {}, sets[n].user_id) if self.activity else None for n in self.names}
        self._prepare_heads(sets, cached, acts)
        backbone = [(self.backbone.model, cfg.backbone_lr)] if trainable else []
        opt = make_optimizer(self.heads, _optimizer_config(cfg), also=backbone)
        sched = make_scheduler(opt, Schedule("cosine", cfg.steps, 0, 0.0))
        draw = _Draws(sets, self.names, cfg.batch_size, cfg.seed)
        self.heads.train()
        self.backbone.train(trainable)
        task = progress.add_task(describe, total=cfg.steps, info="") if progress else None
        running: dict[str, float] = {}
        best: dict[str, tuple[float, int, dict[str, torch.Tensor]]] = {}
        if val and self.heads.side is not None:  # step 0: the activity path alone is a candidate
            best = {n: (v, 0, self._head_state(n)) for n, v in self._val_losses(val, activity).items()}
        for step in range(1, cfg.steps + 1):
            opt.zero_grad(set_to_none=True)
            losses = {}
            for n in self.names:
                # One backward per head, not one for their sum: the same gradient, but a trainable LM
                # backbone then holds one head's activations at a time (SmolLM2, 5 heads x 16 rows x
                # 96 tokens: 16.9 GB resident with the summed backward).
                losses[n] = self._batch_loss(sets[n], n, draw.next(n), None if cached is None else cached[n], acts[n])
                losses[n].backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 5.0)
            opt.step()
            sched.step()
            for n, loss in losses.items():
                value = float(loss.detach())
                running[n] = 0.9 * running.get(n, value) + 0.1 * value
            if progress:
                progress.update(task, advance=1, info=f"loss {sum(running.values()):.3f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                self._validate(step, val, activity, running, best, log)
        for n, (_, _, state) in best.items():
            self._load_head_state(n, state)
        self.best_steps = {n: s for n, (_, s, _) in best.items()}
        self.heads.eval()
        self.backbone.train(False)
        self.calibration = self._calibrate(val, activity) if cfg.calibrate else {}

    def _split_validation(self, sets: dict[str, HeadData], cached: dict[str, Features] | None
                          ) -> tuple[dict[str, HeadData], dict[str, Features] | None,
                                     dict[str, tuple[HeadData, Features | None]]]:
        """(training sets, their features, held-out sets): some training users held out per head.

        Frozen features and small heads overfit within a few epochs, so each head keeps its state
        of lowest validation loss.
        """
        cfg = self.train_config
        val: dict[str, tuple[HeadData, Features | None]] = {}
        if cfg.val_fraction == 0:
            return sets, cached, val
        for n in self.names:
            mask = user_holdout(sets[n], cfg.val_fraction, cfg.seed)
            if mask.any() and (~mask).sum() >= 2:
                keep, held = np.flatnonzero(~mask), np.flatnonzero(mask)
                val[n] = (take(sets[n], held), None if cached is None else _take_features(cached[n], held))
                sets = {**sets, n: take(sets[n], keep)}
                if cached is not None:
                    cached = {**cached, n: _take_features(cached[n], keep)}
        return sets, cached, val

    def _prepare_heads(self, sets: dict[str, HeadData], cached: dict[str, Features] | None,
                       acts: dict[str, np.ndarray | None]) -> None:
        """Censoring time, input standardisation (training statistics), the activity paths."""
        if "time_to_next" in sets:
            self.heads.log_censor.fill_(math.log(self._censor_seconds(sets["time_to_next"])))
        # Standardise inputs with training statistics (a sample of 64 per head for a trainable backbone).
        if cached is not None:
            sample = torch.cat([self._inputs(cached[n].x, acts[n]) for n in self.names])
        else:
            sample = torch.cat([self._inputs(self.backbone.features(sets[n].contexts[:64], sets[n].responses[:64]).detach(),
                                             None if acts[n] is None else acts[n][:64]) for n in self.names])
        self.heads.set_standardizer(sample)
        if self.heads.side is not None:
            self._fit_side(sets, acts)

    def _batch_loss(self, d: HeadData, n: str, idx: np.ndarray, cached: Features | None,
                    act: np.ndarray | None) -> torch.Tensor:
        """Head `n`'s loss on rows `idx` of its set: cached features, or the backbone's with gradients."""
        a = None if act is None else act[idx]
        if cached is None:
            x = self.backbone.features([d.contexts[i] for i in idx], [d.responses[i] for i in idx])
            xr = (self.backbone.features([d.contexts[i] for i in idx], [d.rejected[i] for i in idx])
                  if d.rejected is not None else None)
        else:
            x = cached.x[idx]
            xr = None if cached.x_rejected is None else cached.x_rejected[idx]
        out = self.heads(self._inputs(x, a), n)
        out_r = None if xr is None else self.heads(self._inputs(xr, a), n)
        t = torch.as_tensor
        return H.loss(self.heads, n, out, t(d.label[idx], dtype=torch.float32), t(d.censored[idx]),
                      t(d.weight[idx], dtype=torch.float32), out_r)

    def _validate(self, step: int, val: dict[str, tuple[HeadData, Features | None]],
                  activity: dict[str, np.ndarray] | None, running: dict[str, float],
                  best: dict[str, tuple[float, int, dict[str, torch.Tensor]]],
                  log: Callable[[int, dict[str, float]], None] | None) -> None:
        """Held-out losses at `step`: a head's state is kept when it beats its best; logged."""
        values = {f"loss/{n}": round(v, 5) for n, v in running.items()}
        if val:
            losses = self._val_losses(val, activity)
            for n, v in losses.items():
                if n not in best or v < best[n][0]:
                    best[n] = (v, step, self._head_state(n))
            values.update({f"val_loss/{n}": round(v, 5) for n, v in losses.items()})
        if log:
            log(step, values)

    def _fit_side(self, sets: dict[str, HeadData], acts: dict[str, np.ndarray | None]) -> None:
        """Each head's activity path, alone, to convergence on all its training rows (L-BFGS), then frozen."""
        for n in self.names:
            a = acts[n]
            if n == "preference" or a is None or len(a) == 0:
                continue  # both sides of a pair come from the same user: activity cannot tell them apart
            d, x, t = sets[n], torch.from_numpy(a), torch.as_tensor
            label, censored, weight = t(d.label, dtype=torch.float32), t(d.censored), t(d.weight, dtype=torch.float32)
            params = list(self.heads.side[n].parameters()) + ([self.heads.log_sigma] if n == "time_to_next" else [])
            H.minimize(params, lambda: H.loss(self.heads, n, self.heads.side_output(x, n), label, censored, weight),
                       max_iter=200)
        self.heads.side.requires_grad_(False)

    @torch.no_grad()
    def _calibrate(self, val: dict[str, tuple[HeadData, Features | None]], activity: dict[str, np.ndarray] | None
                   ) -> dict[str, tuple[float, float]]:
        """Scale and shift of each binary/regression head, fitted on the held-out training users."""
        fitted = {}
        for n, (d, f) in val.items():
            if n not in H.CALIBRATED or len(d) < 20 or (n in H.BINARY and len(np.unique(d.label)) < 2):
                continue
            d, f, a = self._held_out(d, f, activity)
            raw = self.heads.raw(self._inputs(f.x, a), n)
            t = torch.as_tensor
            fitted[n] = self.heads.calibrate(n, raw, t(d.label, dtype=torch.float32), t(d.weight, dtype=torch.float32))
        return fitted

    def _held_out(self, d: HeadData, f: Features | None, activity: dict[str, np.ndarray] | None
                  ) -> tuple[HeadData, Features, np.ndarray | None]:
        """A held-out set's rows, features and activity; a trainable backbone embeds (at most 256) now."""
        if f is None:
            d = take(d, np.arange(min(len(d), 256)))
            f = self.features(d)
        return d, f, activity_matrix(activity or {}, d.user_id) if self.activity else None

    @torch.no_grad()
    def _val_losses(self, val: dict[str, tuple[HeadData, Features | None]], activity: dict[str, np.ndarray] | None
                    ) -> dict[str, float]:
        was = self.heads.training
        self.heads.eval()
        out = {}
        for n, (d, f) in val.items():
            d, f, a = self._held_out(d, f, activity)
            o = self.heads(self._inputs(f.x, a), n)
            o_r = None if f.x_rejected is None else self.heads(self._inputs(f.x_rejected, a), n)
            t = torch.as_tensor
            out[n] = float(H.loss(self.heads, n, o, t(d.label, dtype=torch.float32), t(d.censored),
                                  t(d.weight, dtype=torch.float32), o_r))
        self.heads.train(was)
        return out

    def _head_state(self, n: str) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in self.heads.heads[n].state_dict().items()}
        if self.heads.side is not None:  # the activity path belongs to the head: kept from the same step
            state.update({f"__side.{k}": v.detach().clone() for k, v in self.heads.side[n].state_dict().items()})
        if n == "time_to_next":
            state["__log_sigma"] = self.heads.log_sigma.detach().clone()
        return state

    def _load_head_state(self, n: str, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        sigma = state.pop("__log_sigma", None)
        side = {k.removeprefix("__side."): state.pop(k) for k in [k for k in state if k.startswith("__side.")]}
        if side:
            self.heads.side[n].load_state_dict(side)
        self.heads.heads[n].load_state_dict(state)
        if sigma is not None:
            with torch.no_grad():
                self.heads.log_sigma.copy_(sigma)

    def _censor_seconds(self, d: HeadData) -> float:
        if self.train_config.time_censor_seconds is not None:
            return self.train_config.time_censor_seconds
        observed = d.label[~d.censored]
        return float(observed.max()) if len(observed) else 3600.0

    # --- scoring -------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, feats: torch.Tensor, act: np.ndarray | None = None, names: list[str] | None = None
                ) -> dict[str, np.ndarray]:
        """Natural-unit outputs of `names` (default: every head) for precomputed backbone features."""
        x = self._inputs(feats, act)
        return {n: H.natural(n, self.heads(x, n)).double().numpy() for n in (names or self.names)}

    def score(self, contexts: list[list[dict]], responses: list[str], act: np.ndarray | None = None
              ) -> dict[str, np.ndarray]:
        with torch.no_grad():
            feats = self.backbone.features(contexts, responses)
        return self.predict(feats, act)

    # --- saving --------------------------------------------------------------------------------

    def save(self, folder: Path, stem: str = "heads") -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"heads.{k}": v.detach().contiguous() for k, v in self.heads.state_dict().items()}
        tensors.update(self.backbone.state())
        weights = folder / f"{stem}.safetensors"
        with atomic_path(weights) as tmp:
            save_file(tensors, str(tmp))
        meta = folder / f"{stem}.json"
        atomic_write_json(meta, {"heads": self.names, "activity": self.activity, "use_text": self.use_text,
                                 "backbone": self.backbone.config.model_dump(mode="json"),
                                 "train": self.train_config.model_dump(mode="json"),
                                 "log_censor_seconds": float(self.heads.log_censor.exp())})
        return [weights, meta]

    @classmethod
    def load(cls, folder: Path, stem: str = "heads", backbone: Backbone | None = None) -> RewardModel:
        meta_path = folder / f"{stem}.json"
        if not meta_path.is_file():
            raise AlignloopError(f"no reward model in {folder} (run `alignloop rm train` first)")
        meta = json.loads(meta_path.read_text())
        train = HeadTrainSection.model_validate(meta["train"])
        if backbone is None:
            backbone = make_backbone(BackboneSection.model_validate(meta["backbone"]), seed=train.seed)
        model = cls(backbone, meta["heads"], train, activity=meta["activity"], use_text=meta["use_text"])
        tensors = load_file(str(folder / f"{stem}.safetensors"))
        state = {k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")}
        state.setdefault("calibration", model.heads.calibration)  # saved before heads were calibrated
        model.heads.load_state_dict(state)
        backbone.load_state({k: v for k, v in tensors.items() if k.startswith("backbone.")})
        model.heads.eval()
        return model
