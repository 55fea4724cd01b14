"""Bad input gets one clear line: an over-long or empty prompt, a non-finite training step, a full
disk during a checkpoint, and recipes that contradict themselves (warmup past the end of the run,
an eval split that leaves next to nothing to train on)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from test_cli import generate, invoke

from alignloop.errors import AlignloopError
from alignloop.runs import DiskFullError, Stage
from alignloop.train import checkpoint as ckpt
from alignloop.train.config import TrainSection
from alignloop.train.loop import train

REPO = Path(__file__).resolve().parents[1]
SFT_TINY = REPO / "recipes" / "sft_tiny.toml"
# The tiny model's context is 4096 tokens; "word " is one token each, so this prompt cannot fit.
OVERLONG = "word " * 5000


def _strict_json(line: str) -> dict:
    """json.loads that refuses NaN and Infinity, which Python writes but no other JSON reader takes."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(line, parse_constant=refuse)


# --- generate and chat -------------------------------------------------------------------------


def test_generate_quarantines_an_overlong_or_unrenderable_request_and_answers_the_rest(tmp_path):
    _, stage, rows, bad = generate(tmp_path, "".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "prompt": "Once upon"},
        {"id": "long", "prompt": OVERLONG},
        {"id": "long-chat", "messages": [{"role": "user", "content": OVERLONG}]},
        {"id": "unrenderable", "messages": [{"role": "user", "content": 123}]},
        {"id": "b", "messages": [{"role": "user", "content": "hi"}]},
    ]))
    assert [r["id"] for r in rows] == ["a", "b"]
    assert [b["line"] for b in bad] == [2, 3, 4]
    assert all("tokens" in b["reason"] and "4096" in b["reason"] for b in bad[:2]), bad
    assert "cannot render with the chat template" in bad[2]["reason"]
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["counts"] == {"lines": 5, "ok": 2, "quarantined": 3}


def test_chat_with_an_overlong_or_empty_prompt_is_one_line(tmp_path):
    runs = ["--runs-dir", str(tmp_path / "runs")]
    code, out = invoke("chat", "--model", "tiny", *runs, OVERLONG)
    assert code == 2 and "4096" in out and len(out.strip().splitlines()) == 1, out
    for empty in ("", "   \n"):
        code, out = invoke("chat", "--model", "tiny", *runs, empty)
        assert code == 2 and "empty" in out and len(out.strip().splitlines()) == 1, out


# --- non-finite training -----------------------------------------------------------------------


class _Objective:
    """Squared output of a linear layer; NaN (or inf) from step `bad_at` on, or only at eval."""

    def __init__(self, bad_at: int | None = None, bad: float = float("nan"), eval_bad: bool = False) -> None:
        self.calls, self.bad_at, self.bad, self.eval_bad = 0, bad_at, bad, eval_bad

    def weight(self, batch):
        return 1.0

    def loss(self, module, batch):
        loss = module(batch).square().sum()
        if module.training:
            self.calls += 1
            if self.bad_at is not None and self.calls >= self.bad_at:
                loss = loss * self.bad
        elif self.eval_bad:
            loss = loss * float("inf")
        return loss, {}


def _run(tmp_path, objective, **config):
    stage = Stage(tmp_path, "r", "t", {"lr": 0.1})
    section = TrainSection(**{"lr": 0.1, "steps": 3, "save_every": 1, **config})
    net = torch.nn.Linear(2, 2)
    return train(net, objective, lambda epoch: [torch.ones(1, 2)] * 2, section, stage,
                 eval_batches=[torch.ones(1, 2)]), stage


def _logged_steps(stage: Stage) -> list[int]:
    path = stage.path("metrics.jsonl")
    return [_strict_json(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_nan_loss_stops_in_one_line_naming_the_step_and_the_intact_checkpoint(tmp_path):
    with pytest.raises(AlignloopError, match=r"^step 2: non-finite loss \(nan\).*train\.lr.*"
                                             r"the last checkpoint \(.*step-000001\) is intact$"):
        _run(tmp_path, _Objective(bad_at=2))
    stage = Stage(tmp_path, "r", "t", {"lr": 0.1})
    assert _logged_steps(stage) == [1]
    assert [s for s, _ in ckpt.list_checkpoints(stage.path("checkpoints"))] == [1]


def test_without_a_checkpoint_the_error_says_so(tmp_path):
    with pytest.raises(AlignloopError, match=r"^step 2: non-finite loss \(inf\).*no checkpoint was saved") as e:
        _run(tmp_path, _Objective(bad_at=2, bad=float("inf")), save_every=10)
    assert "intact" not in str(e.value)
    stage = Stage(tmp_path, "r", "t", {"lr": 0.1})
    assert _logged_steps(stage) == [1] and not ckpt.list_checkpoints(stage.path("checkpoints"))


def test_a_non_finite_eval_never_reaches_metrics_jsonl(tmp_path):
    with pytest.raises(AlignloopError, match=r"^step 1: non-finite eval_loss \(inf\)"):
        _run(tmp_path, _Objective(eval_bad=True), eval_every=1)
    stage = Stage(tmp_path, "r", "t", {"lr": 0.1})
    assert _logged_steps(stage) == [] and not ckpt.list_checkpoints(stage.path("checkpoints"))


# --- a full disk during a checkpoint -----------------------------------------------------------


def _fail_on_call(n: int, error: Exception, real):
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)
    return fake


@pytest.mark.parametrize("where,error", [
    # safetensors' Rust writer reports ENOSPC as a SafetensorError, not an OSError.
    ("save_file", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
    ("_fsync", OSError(errno.ENOSPC, "No space left on device")),
])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path, monkeypatch, where, error):
    # Checkpoint 1 is written whole; checkpoint 2's writes run out of space (save_file: its first
    # file; _fsync: after the files, as a delayed allocation fails at fsync).
    first_bad_call = {"save_file": 4, "_fsync": 6}[where]  # checkpoint 1: 3 files, 5 fsyncs
    monkeypatch.setattr(ckpt, where, _fail_on_call(first_bad_call, error, getattr(ckpt, where)))
    with pytest.raises(DiskFullError, match=r"step-000002: no space left on device.*"
                                            r"the last checkpoint \(.*step-000001\) is intact"):
        _run(tmp_path, _Objective())
    root = Stage(tmp_path, "r", "t", {"lr": 0.1}).path("checkpoints")
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no partial folder, hidden or not
    monkeypatch.undo()
    result, _ = _run(tmp_path, _Objective())  # space again: resumes from the intact checkpoint
    assert result.resumed_from == 1 and result.steps == 3


def test_a_full_disk_while_saving_the_model_is_one_line(tmp_path, monkeypatch):
    from alignloop.models import load_model
    from alignloop.train import session

    model, tokenizer = load_model("tiny", dtype="float32", seed=0)
    error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full(*args, **kwargs):
        raise error
    monkeypatch.setattr(type(model), "save_pretrained", full)
    folder = tmp_path / "model"
    with pytest.raises(DiskFullError, match=r"model: no space left on device"):
        session.save_model(model, tokenizer, folder)
    assert list(tmp_path.iterdir()) == []


# --- recipes that contradict themselves --------------------------------------------------------


def test_warmup_longer_than_the_run_is_a_one_line_warning(tmp_path, capsys):
    _run(tmp_path / "a", _Objective(), warmup_steps=10)
    err = capsys.readouterr().err.replace("\n", " ")  # the console wraps long lines
    assert err.count("warning:") == 1 and "train.warmup_steps = 10 is longer than the run's 3 steps" in err, err
    _run(tmp_path / "b", _Objective(), warmup_steps=3)  # the whole run warming up, on purpose
    assert "warmup" not in capsys.readouterr().err


def test_an_eval_split_that_leaves_too_little_to_train_on_is_refused(tmp_path):
    from alignloop.recipes import load_recipe
    from alignloop.train.config import SFTRecipe
    from alignloop.train.stage import run_sft

    def run(fraction):
        return run_sft(load_recipe(SFT_TINY, SFTRecipe, [f"run.dir={tmp_path}", "train.steps=1",
                                                         "train.max_seq_len=128", f"train.eval_fraction={fraction}"]))
    # sft_demo keeps 36 conversations at max_seq_len 128: 0.99 holds out 35 and trains on 1.
    with pytest.raises(AlignloopError, match=r"eval_fraction = 0.99 leaves 1 conversation\(s\) to train on and "
                                             r"35 for eval"):
        run(0.99)
    with pytest.raises(AlignloopError, match=r"leaves 17 conversation\(s\) to train on and 19 for eval"):
        run(0.52)
