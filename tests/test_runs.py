import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alignloop
from alignloop.runs import (
    Stage,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    config_hash,
    default_run_name,
    file_hash,
)

fixture_settings = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


# --- atomic writes -----------------------------------------------------------------------------


@fixture_settings
@given(obj=json_values)
def test_atomic_write_json_round_trips(tmp_path: Path, obj: object) -> None:
    path = tmp_path / "x.json"
    atomic_write_json(path, obj)
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_atomic_writes_replace_and_create_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "néw")
    assert path.read_text(encoding="utf-8") == "néw"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(path) as tmp:
            assert tmp.parent == path.parent
            tmp.write_bytes(b"half a checkpo")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_unserialisable_json_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# --- hashes ------------------------------------------------------------------------------------


def test_file_hash_is_sha256(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert file_hash(tmp_path / "f") == hashlib.sha256(data).hexdigest()


@settings(max_examples=50)
@given(obj=st.dictionaries(st.text(), json_values, max_size=6))
def test_config_hash_ignores_key_order(obj: dict[str, object]) -> None:
    reordered = dict(reversed(list(obj.items())))
    assert config_hash(reordered) == config_hash(obj)


def test_config_hash_sees_values() -> None:
    assert config_hash({"lr": 0.1}) != config_hash({"lr": 0.2})
    assert config_hash({"a": {"b": 1}}) != config_hash({"a": {"b": "1"}})


def test_default_run_name() -> None:
    assert re.fullmatch(r"\d{8}-\d{6}", default_run_name())


# --- stages ------------------------------------------------------------------------------------


CONFIG = {"model": {"name": "m"}, "train": {"lr": 0.01}}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text('{"x": 1}\n')
    return path


def finished_stage(tmp_path: Path, data: Path, config: dict[str, object] = CONFIG) -> Stage:
    stage = Stage(tmp_path / "runs", "r1", "sft", config, [data]).start()
    stage.path("model.bin").write_bytes(b"weights")
    (stage.dir / "sub").mkdir()
    stage.path("sub/tok.json").write_text("{}")
    stage.finish([stage.path("model.bin"), stage.path("sub/tok.json")], extra={"loss": 1.5})
    return stage


def test_manifest_contents(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not a git repo
    stage = finished_stage(tmp_path, data)
    assert stage.dir == tmp_path / "runs" / "r1" / "sft"
    manifest = json.loads(stage.path("manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["run"] == "r1"
    assert manifest["config"] == CONFIG
    assert manifest["config_hash"] == config_hash(CONFIG)
    assert manifest["alignloop_version"] == alignloop.__version__
    assert manifest["git_commit"] is None and manifest["git_dirty"] is False
    assert manifest["inputs"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    assert manifest["outputs"] == {
        "model.bin": hashlib.sha256(b"weights").hexdigest(),
        "sub/tok.json": hashlib.sha256(b"{}").hexdigest(),
    }
    assert manifest["started_at"] <= manifest["finished_at"]
    assert 0 <= manifest["seconds"] < 5
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", manifest["python"])
    assert manifest["torch"] is None or isinstance(manifest["torch"], str)
    assert manifest["loss"] == 1.5


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_manifest_records_git_state(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "code.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "code.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()

    stage = Stage(tmp_path / "runs", "r", "s", {}, [data]).start()
    assert stage.finish([])["git_commit"] == head
    assert stage.finish([])["git_dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    assert stage.finish([])["git_dirty"] is True


def test_is_complete_after_finish(tmp_path: Path, data: Path) -> None:
    assert not Stage(tmp_path / "runs", "r1", "sft", CONFIG, [data]).is_complete()
    finished_stage(tmp_path, data)
    # A fresh Stage object, as a rerun would build, sees the finished work.
    assert Stage(tmp_path / "runs", "r1", "sft", CONFIG, [data]).is_complete()


def test_not_complete_after_config_change(tmp_path: Path, data: Path) -> None:
    finished_stage(tmp_path, data)
    changed = {**CONFIG, "train": {"lr": 0.02}}
    assert not Stage(tmp_path / "runs", "r1", "sft", changed, [data]).is_complete()


def test_not_complete_after_input_change(tmp_path: Path, data: Path) -> None:
    stage = finished_stage(tmp_path, data)
    data.write_text('{"x": 2}\n')
    assert not stage.is_complete()
    data.unlink()
    assert not stage.is_complete()


def test_not_complete_with_other_inputs(tmp_path: Path, data: Path) -> None:
    finished_stage(tmp_path, data)
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text())
    assert not Stage(tmp_path / "runs", "r1", "sft", CONFIG, [other]).is_complete()
    assert not Stage(tmp_path / "runs", "r1", "sft", CONFIG, [data, other]).is_complete()


def test_not_complete_after_output_edited_or_deleted(tmp_path: Path, data: Path) -> None:
    stage = finished_stage(tmp_path, data)
    stage.path("sub/tok.json").write_text('{"edited": true}')
    assert not stage.is_complete()
    stage.path("sub/tok.json").write_text("{}")
    assert stage.is_complete()
    stage.path("model.bin").unlink()
    assert not stage.is_complete()


def test_not_complete_with_garbled_manifest(tmp_path: Path, data: Path) -> None:
    stage = finished_stage(tmp_path, data)
    stage.path("manifest.json").write_text("{not json")
    assert not stage.is_complete()
    stage.path("manifest.json").write_text('{"outputs": []}')
    assert not stage.is_complete()


def test_restart_forgets_old_manifest(tmp_path: Path, data: Path) -> None:
    stage = finished_stage(tmp_path, data)
    stage.start()
    assert not stage.is_complete()


def test_finish_rejects_outputs_outside_the_stage(tmp_path: Path, data: Path) -> None:
    stage = Stage(tmp_path / "runs", "r1", "sft", CONFIG, [data]).start()
    with pytest.raises(ValueError, match="outside the stage folder"):
        stage.finish([data])
    assert not stage.path("manifest.json").exists()


def test_finish_before_start_is_a_bug(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="start"):
        Stage(tmp_path, "r", "s", {}).finish([])


def test_log_metrics_appends_json_lines(tmp_path: Path) -> None:
    stage = Stage(tmp_path / "runs", "r1", "sft", {}).start()
    stage.log_metrics(step=1, loss=2.5)
    stage.log_metrics(accuracy=0.75)
    lines = [json.loads(line) for line in stage.path("metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k != "time"} for line in lines] == [
        {"step": 1, "loss": 2.5},
        {"accuracy": 0.75},
    ]
    assert all(isinstance(line["time"], float) for line in lines)
    assert lines[0]["time"] <= lines[1]["time"]
    with pytest.raises(ValueError, match="time"):
        stage.log_metrics(time=3)


def test_skip_if_complete_skips_a_finished_stage_and_starts_anything_else(tmp_path: Path, data: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    fresh = Stage(tmp_path / "runs", "r1", "sft", CONFIG, [data])
    assert fresh.skip_if_complete() is False and fresh.dir.is_dir()  # started: finish() may follow
    finished_stage(tmp_path, data)
    again = Stage(tmp_path / "runs", "r1", "sft", CONFIG, [data])
    assert again.skip_if_complete(label="train-sft") is True
    assert "train-sft: up to date" in capsys.readouterr().err  # status lines go to stderr
    assert again.is_complete()  # skipping leaves the manifest alone
    assert again.skip_if_complete(force=True) is False and not again.is_complete()  # forced: restarted


def test_skip_if_complete_follows_the_main_process(tmp_path: Path, data: Path) -> None:
    finished_stage(tmp_path, data)
    answers = []

    def agree(done: bool) -> bool:  # stands in for a broadcast from rank 0
        answers.append(done)
        return True

    other_rank = Stage(tmp_path / "runs", "r1", "sft", CONFIG, [data])
    # A non-main rank never reads the manifest itself (False) and follows rank 0's answer.
    assert other_rank.skip_if_complete(main=False, agree=agree) is True and answers == [False]
    starting = Stage(tmp_path / "runs", "r2", "sft", CONFIG, [data])
    assert starting.skip_if_complete(main=False, agree=lambda done: False) is False
    assert not starting.dir.exists()  # only the main process creates and starts the stage
