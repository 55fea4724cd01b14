"""Reward-model examples from `alignloop logs build`: one set per head, train/eval split by user.

Reads rm/<signal>/{train,eval}.parquet (see alignloop.data.builders) and checks what a head needs:
the columns, labels of the right kind, and no user on both sides of the split. A head sees the
conversation so far (`context`, OpenAI messages) and the scored answer (`response`); preference
examples carry a second, swiped-away answer (`rejected`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from alignloop.errors import AlignloopError
from alignloop.rewards.config import BINARY, DataSection

SCALAR_COLUMNS = ("example_id", "user_id", "conversation_id", "turn_id", "messages", "label", "censored", "weight")
PAIR_COLUMNS = ("example_id", "user_id", "conversation_id", "chosen_turn_id", "rejected_turn_id", "prompt",
                "chosen", "rejected", "weight")


@dataclass
class HeadData:
    head: str
    split: str
    user_id: np.ndarray          # [n] str
    conversation_id: np.ndarray  # [n] str
    turn_id: np.ndarray          # [n] str: the scored turn (preference: the chosen one)
    contexts: list[list[dict]]
    responses: list[str]
    label: np.ndarray            # [n] float; NaN where censored; preference: 1 (chosen beats rejected)
    censored: np.ndarray         # [n] bool
    weight: np.ndarray           # [n] float
    rejected: list[str] | None = None
    rejected_turn_id: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.responses)


def dataset_path(build: Path, signal: str, split: str) -> Path:
    for suffix in ("parquet", "jsonl"):
        p = build / "rm" / signal / f"{split}.{suffix}"
        if p.is_file():
            return p
    raise AlignloopError(f"reward-model set missing: {build / 'rm' / signal / split}.parquet "
                         f"(run `alignloop logs build` with build.rm.signals including {signal!r})")


def _read(path: Path, columns: tuple[str, ...]) -> pl.DataFrame:
    df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_ndjson(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AlignloopError(f"{path}: missing column(s) {missing}")
    return df


def _rare_positives(df: pl.DataFrame, head: str) -> pl.Series | None:
    """Mask of the positive rows of a binary head whose positives are under 5% of its rows, else None."""
    if head == "preference" or "label" not in df.columns:
        return None
    label = df["label"].cast(pl.Float64)
    positive = label > 0
    share = positive.mean() or 0.0
    return positive if 0 < share < 0.05 and label.is_in([0.0, 1.0]).all() else None


def load_head(config: DataSection, head: str, split: str, max_rows: int | None = None) -> HeadData:
    """The examples of one head on one side of the user split (a seeded sample of `max_rows`)."""
    build = Path(config.build)
    signal = "continue" if head == "quality" else head  # quality rides on every selected answer
    path = dataset_path(build, signal, split)
    if head == "preference":
        df = _read(path, PAIR_COLUMNS)
    else:
        df = _read(path, SCALAR_COLUMNS)
    if head == "quality":
        df = _join_quality(df, Path(config.quality_labels))  # type: ignore[arg-type]
    df = df.sort("example_id")
    if max_rows is not None and df.height > max_rows:
        # A seeded hash of the scored turn, not a per-head draw: heads sample the same turns, so
        # a text is embedded once for all of them.
        turn = "chosen_turn_id" if head == "preference" else "turn_id"
        df = df.with_columns(_h=pl.col(turn).hash(seed=config.seed))
        rare = _rare_positives(df, head) if split == "train" else None
        if rare is not None and 0 < rare.sum() < max_rows:
            # A rare label (safety reports: well under 1%) would leave a handful of positives in the
            # sample: keep every one, draw the rest from the negatives, and weight those up by how
            # thinly they were drawn, so the loss still sees the true base rate (calibrated p_unsafe).
            pos, neg = df.filter(rare), df.filter(~rare)
            kept = neg.sort("_h", "example_id").head(max_rows - pos.height)
            kept = kept.with_columns(weight=pl.col("weight").cast(pl.Float64).fill_null(1.0) * (neg.height / kept.height))
            df = pl.concat([pos.with_columns(pl.col("weight").cast(pl.Float64)), kept], how="vertical_relaxed")
        else:
            df = df.sort("_h", "example_id").head(max_rows)
        df = df.drop("_h").sort("example_id")
    if df.height == 0:
        raise AlignloopError(f"{path}: no examples for head {head!r}")
    weight = df["weight"].cast(pl.Float64).fill_null(1.0).to_numpy()
    if head == "preference":
        prompts = df["prompt"].to_list()
        return HeadData(head, split, df["user_id"].to_numpy(), df["conversation_id"].to_numpy(),
                        df["chosen_turn_id"].to_numpy(), prompts, [c[-1]["content"] for c in df["chosen"].to_list()],
                        np.ones(df.height), np.zeros(df.height, dtype=bool), weight,
                        rejected=[r[-1]["content"] for r in df["rejected"].to_list()],
                        rejected_turn_id=df["rejected_turn_id"].to_numpy())
    label = df["label"].cast(pl.Float64).to_numpy().copy()
    censored = df["censored"].fill_null(False).to_numpy().astype(bool)
    _check_labels(path, head, label, censored)
    if head == "thumbs":
        label = (label > 0).astype(np.float64)  # +1 / -1 -> 1 / 0
    label[censored] = np.nan
    messages = df["messages"].to_list()
    for i, m in enumerate(messages):
        if not m or m[-1]["role"] != "assistant":
            raise AlignloopError(f"{path}: example {df['example_id'][i]} does not end with an assistant message")
    return HeadData(head, split, df["user_id"].to_numpy(), df["conversation_id"].to_numpy(), df["turn_id"].to_numpy(),
                    [m[:-1] for m in messages], [m[-1]["content"] for m in messages], label, censored, weight)


def _check_labels(path: Path, head: str, label: np.ndarray, censored: np.ndarray) -> None:
    observed = label[~censored]
    if np.isnan(observed).any():
        raise AlignloopError(f"{path}: column 'label' has {int(np.isnan(observed).sum())} null(s) not marked censored")
    if head == "thumbs" and not np.isin(observed, (-1.0, 1.0)).all():
        raise AlignloopError(f"{path}: thumbs labels must be +1 or -1")
    elif head in BINARY and head != "thumbs" and not np.isin(observed, (0.0, 1.0)).all():
        raise AlignloopError(f"{path}: {head} labels must be 0 or 1")
    elif head in ("turns_after", "time_to_next") and (observed < 0).any():
        raise AlignloopError(f"{path}: {head} labels must be >= 0")
    if head != "time_to_next" and censored.any():
        raise AlignloopError(f"{path}: {head} has censored rows; only time_to_next may")


def _join_quality(df: pl.DataFrame, labels_path: Path) -> pl.DataFrame:
    labels = pl.read_parquet(labels_path) if labels_path.suffix == ".parquet" else pl.read_ndjson(labels_path)
    missing = [c for c in ("turn_id", "label") if c not in labels.columns]
    if missing:
        raise AlignloopError(f"{labels_path}: missing column(s) {missing} (want turn_id, label in [0, 1])")
    labels = labels.select("turn_id", q=pl.col("label").cast(pl.Float64))
    if labels["q"].null_count() or ((labels["q"] < 0) | (labels["q"] > 1)).any():
        raise AlignloopError(f"{labels_path}: quality labels must be numbers in [0, 1]")
    return (df.drop("label").join(labels.unique("turn_id", keep="last"), on="turn_id", how="inner")
            .rename({"q": "label"}).with_columns(censored=pl.lit(False)))


def take(d: HeadData, idx: np.ndarray) -> HeadData:
    """The examples of `d` at positions `idx`."""
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
    arr = lambda a: None if a is None else a[idx]  # noqa: E731
    return HeadData(d.head, d.split, d.user_id[idx], d.conversation_id[idx], d.turn_id[idx], pick(d.contexts),
                    pick(d.responses), d.label[idx], d.censored[idx], d.weight[idx], pick(d.rejected),
                    arr(d.rejected_turn_id))


def user_holdout(d: HeadData, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of rows whose user falls in a seeded `fraction` of users (validation for early stopping)."""
    users = np.unique(d.user_id)
    rng = np.random.default_rng([seed, zlib.crc32(d.head.encode())])
    held = set(rng.choice(users, max(1, int(round(fraction * len(users)))), replace=False).tolist()) if len(users) > 1 else set()
    return np.array([u in held for u in d.user_id], dtype=bool)


def check_disjoint(train: HeadData, eval_: HeadData) -> None:
    """An eval split that shares users with train measures memory, not generalisation."""
    shared = np.intersect1d(np.unique(train.user_id), np.unique(eval_.user_id))
    if len(shared):
        raise AlignloopError(f"head {train.head}: {len(shared)} user(s) in both train and eval "
                             f"(e.g. {shared[0]}); the split must be by user")


def activity_features(config: DataSection, split: str) -> dict[str, np.ndarray]:
    """Per user, what the logs say about how active they are: log conversations, log turns per conversation.

    These are the shortcut a retention model can learn instead of the response's effect; heads see
    them only when train.user_activity is on, and the shortcut check compares both.
    """
    path = dataset_path(Path(config.build), "continue", split)
    df = _read(path, ("user_id", "conversation_id", "turn_id"))
    per_user = df.group_by("user_id").agg(conv=pl.col("conversation_id").n_unique(), turns=pl.len())
    feats = np.stack([np.log1p(per_user["conv"].to_numpy()),
                      np.log1p(per_user["turns"].to_numpy() / per_user["conv"].to_numpy())], axis=1)
    return dict(zip(per_user["user_id"].to_list(), feats.astype(np.float32), strict=True))


ACTIVITY_DIM = 2


def activity_matrix(table: dict[str, np.ndarray], user_ids: np.ndarray) -> np.ndarray:
    zero = np.zeros(ACTIVITY_DIM, dtype=np.float32)
    return np.stack([table.get(u, zero) for u in user_ids]) if len(user_ids) else np.zeros((0, ACTIVITY_DIM), np.float32)
