"""Reward-model inputs: bad label columns and user overlap between splits are clear errors."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from alignloop.errors import AlignloopError
from alignloop.rewards.config import DataSection
from alignloop.rewards.data import check_disjoint, load_head


def _rows(users: list[str], labels: list[float | None], censored: list[bool] | None = None) -> pl.DataFrame:
    n = len(users)
    msgs = [[{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"answer {i}"}]
            for i in range(n)]
    return pl.DataFrame({"example_id": [f"e{i}" for i in range(n)], "user_id": users,
                         "conversation_id": [f"c{i}" for i in range(n)], "turn_id": [f"t{i}" for i in range(n)],
                         "messages": msgs, "label": pl.Series(labels, dtype=pl.Float64),
                         "censored": censored or [False] * n, "weight": [1.0] * n})


def _write(tmp_path, signal: str, train: pl.DataFrame, eval_: pl.DataFrame) -> DataSection:
    for split, df in (("train", train), ("eval", eval_)):
        (tmp_path / "rm" / signal).mkdir(parents=True, exist_ok=True)
        df.write_parquet(tmp_path / "rm" / signal / f"{split}.parquet")
    return DataSection(build=str(tmp_path), heads=[signal])


def test_loads_and_censors(tmp_path):
    config = _write(tmp_path, "time_to_next", _rows(["a", "b"], [3.0, None], [False, True]), _rows(["c"], [1.0]))
    d = load_head(config, "time_to_next", "train")
    assert d.censored.tolist() == [False, True] and d.label[0] == 3.0
    assert d.responses == ["answer 0", "answer 1"] and d.contexts[0][-1]["role"] == "user"


def test_missing_label_column(tmp_path):
    config = _write(tmp_path, "continue", _rows(["a"], [1.0]).drop("label"), _rows(["c"], [1.0]))
    with pytest.raises(AlignloopError, match=r"missing column\(s\) \['label'\]"):
        load_head(config, "continue", "train")


def test_misshaped_labels(tmp_path):
    config = _write(tmp_path, "continue", _rows(["a", "b"], [1.0, 3.0]), _rows(["c"], [1.0]))
    with pytest.raises(AlignloopError, match="continue labels must be 0 or 1"):
        load_head(config, "continue", "train")
    config = _write(tmp_path, "thumbs", _rows(["a"], [0.0]), _rows(["c"], [1.0]))
    with pytest.raises(AlignloopError, match=r"\+1 or -1"):
        load_head(config, "thumbs", "train")
    config = _write(tmp_path, "continue", _rows(["a", "b"], [1.0, None]), _rows(["c"], [1.0]))
    with pytest.raises(AlignloopError, match="not marked censored"):
        load_head(config, "continue", "train")


def test_shared_users_between_splits(tmp_path):
    config = _write(tmp_path, "continue", _rows(["a", "b"], [1.0, 0.0]), _rows(["b"], [1.0]))
    with pytest.raises(AlignloopError, match="1 user\\(s\\) in both train and eval"):
        check_disjoint(load_head(config, "continue", "train"), load_head(config, "continue", "eval"))


def test_missing_set_and_quality_labels(tmp_path):
    with pytest.raises(AlignloopError, match="reward-model set missing"):
        load_head(DataSection(build=str(tmp_path)), "continue", "train")
    with pytest.raises(ValueError, match="quality_labels"):
        DataSection(heads=["quality"])


def test_quality_from_a_labels_file(tmp_path):
    config = _write(tmp_path, "continue", _rows(["a", "b", "c"], [1.0, 0.0, 1.0]), _rows(["d"], [1.0]))
    labels = tmp_path / "labels.parquet"
    pl.DataFrame({"turn_id": ["t0", "t2"], "label": [0.9, 0.1]}).write_parquet(labels)
    config = DataSection(build=str(tmp_path), heads=["quality"], quality_labels=labels)
    d = load_head(config, "quality", "train")
    assert sorted(d.label.tolist()) == [0.1, 0.9]


def test_sampling_keeps_every_rare_positive_and_reweights_the_negatives(tmp_path):
    labels = [1.0] * 3 + [0.0] * 197                      # 1.5% positives, like safety reports
    users = [f"u{i}" for i in range(200)]
    config = _write(tmp_path, "safety", _rows(users, labels), _rows(["v1", "v2"], [0.0, 1.0]))
    d = load_head(config, "safety", "train", max_rows=50)
    assert len(d.label) == 50 and d.label.sum() == 3        # all three kept, not ~0.75 of one
    neg = d.label == 0
    np.testing.assert_allclose(d.weight[neg], 197 / 47)    # 47 negatives stand for 197
    np.testing.assert_allclose(d.weight[~neg], 1.0)
    # weighted base rate = the true one
    assert abs((d.weight * d.label).sum() / d.weight.sum() - 3 / 200) < 1e-9
    common = load_head(_write(tmp_path / "c", "continue", _rows(users, [float(i % 2) for i in range(200)]),
                              _rows(["v1"], [1.0])), "continue", "train", max_rows=50)
    np.testing.assert_allclose(common.weight, 1.0)          # a common label: a plain sample
