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

Backbone = MiniLMBackbone | LMBackbone


@dataclass
class Features:
    """A head set's inputs: features of the scored answers (and the rejected ones for preference)."""

    x: torch.Tensor
    x_rejected: torch.Tensor | None = None


def _take_features(f: Features, idx: np.ndarray) -> Features:
    t = torch.as_tensor(idx)
    return Features(f.x[t], None if f.x_rejected is None else f.x_rejected[t])


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
        """Train all heads jointly: each step draws one batch per head. `cached`: frozen features."""
        cfg = self.train_config
        trainable = self.backbone.trainable and self.use_text and cached is None
        if not trainable and cached is None:
            cached = {n: self.features(sets[n], progress) for n in self.names}
        # Hold out some training users: frozen features and small heads overfit within a few epochs,
        # so each head keeps its state of lowest validation loss.
        val: dict[str, tuple[HeadData, Features | None]] = {}
        if cfg.val_fraction > 0:
            for n in self.names:
                mask = user_holdout(sets[n], cfg.val_fraction, cfg.seed)
                if mask.any() and (~mask).sum() >= 2:
                    keep, held = np.flatnonzero(~mask), np.flatnonzero(mask)
                    val[n] = (take(sets[n], held), None if cached is None else _take_features(cached[n], held))
                    sets = {**sets, n: take(sets[n], keep)}
                    if cached is not None:
                        cached = {**cached, n: _take_features(cached[n], keep)}
        acts = {n: activity_matrix(activity or {}, sets[n].user_id) if self.activity else None for n in self.names}
        if "time_to_next" in sets:
            self.heads.log_censor.fill_(math.log(self._censor_seconds(sets["time_to_next"])))
        # Standardise inputs with training statistics (a sample for a trainable backbone).
        if cached is not None:
            sample = torch.cat([self._inputs(cached[n].x, acts[n]) for n in self.names])
        else:
            sample = torch.cat([self._inputs(self.backbone.features(sets[n].contexts[:64], sets[n].responses[:64]).detach(),
                                             None if acts[n] is None else acts[n][:64]) for n in self.names])
        self.heads.set_standardizer(sample)
        if self.heads.side is not None:
            self._fit_side(sets, acts)
        params = [{"params": [q for q in self.heads.parameters() if q.requires_grad], "lr": cfg.lr}]
        if trainable:
            params.append({"params": self.backbone.parameters(), "lr": cfg.backbone_lr})
        opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
        rng = np.random.default_rng(cfg.seed)
        orders = {n: rng.permutation(len(sets[n])) for n in self.names}
        cursor = dict.fromkeys(self.names, 0)
        self.heads.train()
        self.backbone.train(trainable)
        task = progress.add_task(describe, total=cfg.steps, info="") if progress else None
        running: dict[str, float] = {}
        best: dict[str, tuple[float, int, dict[str, torch.Tensor]]] = {}
        if val and self.heads.side is not None:  # step 0: the activity path alone is a candidate
            best = {n: (v, 0, self._head_state(n)) for n, v in self._val_losses(val, activity).items()}
        for step in range(1, cfg.steps + 1):
            total = torch.zeros(())
            for n in self.names:
                d = sets[n]
                if cursor[n] + cfg.batch_size > len(d):
                    orders[n], cursor[n] = rng.permutation(len(d)), 0
                idx = orders[n][cursor[n]:cursor[n] + cfg.batch_size]
                cursor[n] += len(idx)
                a = None if acts[n] is None else acts[n][idx]
                if trainable:
                    x = self.backbone.features([d.contexts[i] for i in idx], [d.responses[i] for i in idx])
                    xr = (self.backbone.features([d.contexts[i] for i in idx], [d.rejected[i] for i in idx])
                          if d.rejected is not None else None)
                else:
                    x = cached[n].x[idx]
                    xr = None if cached[n].x_rejected is None else cached[n].x_rejected[idx]
                out = self.heads(self._inputs(x, a), n)
                out_r = None if xr is None else self.heads(self._inputs(xr, a), n)
                t = torch.as_tensor
                l = H.loss(self.heads, n, out, t(d.label[idx], dtype=torch.float32),
                           t(d.censored[idx]), t(d.weight[idx], dtype=torch.float32), out_r)
                total = total + l
                lv = float(l.detach())
                running[n] = 0.9 * running.get(n, lv) + 0.1 * lv
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 5.0)
            opt.step()
            sched.step()
            if progress:
                progress.update(task, advance=1, info=f"loss {sum(running.values()):.3f}")
            if val and (step % cfg.eval_every == 0 or step == cfg.steps):
                losses = self._val_losses(val, activity)
                for n, v in losses.items():
                    if n not in best or v < best[n][0]:
                        best[n] = (v, step, self._head_state(n))
                if log:
                    log(step, {**{f"loss/{n}": round(v, 5) for n, v in running.items()},
                               **{f"val_loss/{n}": round(v, 5) for n, v in losses.items()}})
            elif log and (step % cfg.eval_every == 0 or step == cfg.steps):
                log(step, {f"loss/{n}": round(v, 5) for n, v in running.items()})
        for n, (_, _, state) in best.items():
            self._load_head_state(n, state)
        self.best_steps = {n: s for n, (_, s, _) in best.items()}
        self.heads.eval()
        self.backbone.train(False)
        self.calibration = self._calibrate(val, activity) if cfg.calibrate else {}

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
