"""Filters against the simulator's ground truth: precision and recall (evaluation only)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from alignloop.data.filters.report import FunnelReport
from alignloop.data.io import read_jsonl

# What the bot and skimmer filters must reach on simulated logs (precision, recall).
TARGETS: dict[str, tuple[float, float]] = {"bots": (0.9, 0.8), "min_reading": (0.9, 0.8)}

# The ground-truth columns the filters are judged by. The simulator writes these and more
# (`alignloop.sim.truth`); the data layer comes before it, so it names the few it reads.
TRUTH_COLUMNS: dict[str, pa.Schema] = {
    "users": pa.schema([("user_id", pa.string()), ("is_bot", pa.bool_()), ("is_skimmer", pa.bool_())]),
    "candidates": pa.schema([("turn_id", pa.string()), ("n_unsafe", pa.int32()), ("repeat_within", pa.float32()),
                             ("repeat_across", pa.float32())]),
}


def read_ground_truth(folder: str | Path) -> dict[str, pa.Table]:
    """The `TRUTH_COLUMNS` of each ground-truth table in `folder` (Parquet preferred over JSONL)."""
    found = {}
    for name, schema in TRUTH_COLUMNS.items():
        parquet, jsonl = Path(folder) / f"{name}.parquet", Path(folder) / f"{name}.jsonl"
        if parquet.is_file():
            found[name] = pq.read_table(parquet, columns=schema.names).cast(schema)
        elif jsonl.is_file():
            found[name] = read_jsonl(jsonl, schema, unexpected="ignore")
    return found


def _truth_frame(table: pa.Table | pl.DataFrame) -> pl.DataFrame:
    return table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)


def filter_precision_recall(report: FunnelReport, ground_truth: Mapping[str, pa.Table | pl.DataFrame]
                            ) -> dict[str, dict[str, Any]]:
    """Each filter's precision and recall against the simulator's ground truth (evaluation only).

    Targets: bots -> users that are bots; min_reading -> skimmers (also reported: any non-reader,
    skimmer or bot); repeats -> conversations of bots; quality -> candidates with unsafe words or
    repeated sentences (by reason: unsafe, repetitive, repeats_earlier_turn). Computed over the items
    each filter judged (`report.inputs`); filters without a ground-truth target are left out.
    """
    users = _truth_frame(ground_truth["users"]).select("user_id", "is_bot", "is_skimmer")
    out: dict[str, dict[str, Any]] = {}
    for f in report.filters:
        items = report.inputs.get(f.name)
        if items is None:
            continue
        flagged = report.dropped.filter(pl.col("filter") == f.name).select("id", "reason").unique("id")
        judged = items.join(flagged, on="id", how="left").with_columns(pred=pl.col("reason").is_not_null())
        if f.name in ("bots", "min_reading", "repeats"):
            judged = judged.join(users, on="user_id", how="left").with_columns(pl.col("is_bot", "is_skimmer").fill_null(False))
            target = {"bots": "is_bot", "min_reading": "is_skimmer", "repeats": "is_bot"}[f.name]
            out[f.name] = _pr(judged["pred"], judged[target])
            if f.name in TARGETS:
                p, r = out[f.name]["precision"], out[f.name]["recall"]
                out[f.name]["target"] = {"precision": TARGETS[f.name][0], "recall": TARGETS[f.name][1]}
                out[f.name]["meets_target"] = (p is not None and r is not None and p >= TARGETS[f.name][0]
                                               and r >= TARGETS[f.name][1])
            if f.name == "min_reading":
                out[f.name]["non_reader"] = _pr(judged["pred"], judged["is_bot"] | judged["is_skimmer"])
        elif f.name == "quality" and "candidates" in ground_truth:
            cand = _truth_frame(ground_truth["candidates"]).select(
                id="turn_id", unsafe=pl.col("n_unsafe") > 0, within=pl.col("repeat_within") > 0,
                across=pl.col("repeat_across") > 0.5)
            j = judged.join(cand, on="id", how="inner")
            bad = j["unsafe"] | j["within"] | j["across"]
            res = _pr(j["pred"], bad)
            res["by_reason"] = {
                r: _pr(j["reason"] == r, j[col]) for r, col in
                (("unsafe", "unsafe"), ("repetitive", "within"), ("repeats_earlier_turn", "across"))}
            out[f.name] = res
    return out


def _pr(pred: pl.Series, actual: pl.Series) -> dict[str, Any]:
    pred = pred.fill_null(False).to_numpy().astype(bool)
    actual = actual.fill_null(False).to_numpy().astype(bool)
    tp = int((pred & actual).sum())
    fp = int((pred & ~actual).sum())
    fn = int((~pred & actual).sum())
    return {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "tp": tp, "fp": fp, "fn": fn, "n": len(pred)}


