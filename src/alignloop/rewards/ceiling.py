"""EVALUATION ONLY: the simulator's ground truth as the best any reward head could do.

On simulated logs, the true per-turn probabilities (p_continue, p_return_7d, ...) that generated
the labels are scored with the same metrics on the same held-out examples; no model trained on the
logs can beat them by more than noise. Nothing that trains imports this module (a test checks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from alignloop.rewards import metrics as M
from alignloop.rewards.data import HeadData


def find_ground_truth(build: Path, setting: str) -> Path | None:
    if setting == "none":
        return None
    folder = build.parent / "simulate" / "ground_truth" if setting == "auto" else Path(setting)
    return folder if (folder / "candidates.parquet").is_file() else None


def _table(folder: Path, name: str) -> pl.DataFrame:
    for suffix, read in (("parquet", pl.read_parquet), ("jsonl", pl.read_ndjson)):
        if (folder / f"{name}.{suffix}").is_file():
            return read(folder / f"{name}.{suffix}")
    raise FileNotFoundError(folder / name)


class Ceiling:
    def __init__(self, truth: Path):
        self.candidates = _table(truth, "candidates").select("turn_id", "engagement", "quality", "p_continue", "n_unsafe")
        sessions = _table(truth, "sessions").select("session_id", "p_return_1d", "p_return_7d")
        convs = _table(truth.parent / "logs", "conversations").select("conversation_id", "session_id")
        self.returns = convs.join(sessions, on="session_id", how="inner")

    def _by_turn(self, turn_ids: np.ndarray, column: str) -> np.ndarray:
        df = pl.DataFrame({"turn_id": turn_ids}).join(self.candidates, on="turn_id", how="left", maintain_order="left")
        return df[column].cast(pl.Float64).to_numpy()

    def _by_conversation(self, conv_ids: np.ndarray, column: str) -> np.ndarray:
        df = pl.DataFrame({"conversation_id": conv_ids}).join(self.returns, on="conversation_id", how="left",
                                                               maintain_order="left")
        return df[column].cast(pl.Float64).to_numpy()

    def report(self, d: HeadData, bins: int = 10) -> dict[str, float] | None:
        """The ground truth's own metrics on head set `d`, or None for a head with no true counterpart."""
        h = d.head
        if h == "preference":
            chosen = self._by_turn(d.turn_id, "engagement")
            rejected = self._by_turn(d.rejected_turn_id, "engagement")
            return {"pair_accuracy": float(np.nanmean(chosen > rejected)), "truth": "engagement"}
        if h in ("continue", "thumbs", "safety"):
            col = {"continue": "p_continue", "thumbs": "quality", "safety": "n_unsafe"}[h]
            p = self._by_turn(d.turn_id, col)
            out = {"auc": M.auc(d.label, p), "truth": col}
            if h != "safety":
                out["accuracy"] = M.accuracy(d.label, p)
                out["ece"] = M.ece(d.label, p, bins)
            return out
        if h in ("returned_1d", "returned_7d"):
            col = f"p_return_{h.split('_')[1]}"
            p = self._by_conversation(d.conversation_id, col)
            ok = ~np.isnan(p)
            return {"auc": M.auc(d.label[ok], p[ok]), "accuracy": M.accuracy(d.label[ok], p[ok]),
                    "ece": M.ece(d.label[ok], p[ok], bins), "truth": col}
        if h == "turns_after":
            p = self._by_turn(d.turn_id, "p_continue")
            return {"pearson": M.pearson(np.log1p(d.label), p), "truth": "p_continue"}
        if h == "time_to_next":
            p = self._by_turn(d.turn_id, "p_continue")
            return {"concordance": M.concordance(d.label, d.censored, -p), "truth": "-p_continue"}
        return None
