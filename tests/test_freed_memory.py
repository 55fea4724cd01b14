"""freed_memory.py: the allocator policy a command chooses before Polars loads, the user's settings
winning, and `alignloop logs filter|build` restarting under "release" when their logs stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignloop import freed_memory
from alignloop.freed_memory import CHOSEN, KEEP, RELEASE

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "logs.toml"


@pytest.fixture
def clean_env(monkeypatch):
    # A copy of the environment for the test: what `choose` writes must not leak into later tests.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for k in (CHOSEN, *KEEP):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_choose_sets_the_policy_once_and_the_users_settings_win(clean_env):
    assert freed_memory.choose("keep") == "keep"
    assert {k: os.environ[k] for k in KEEP} == KEEP and os.environ[CHOSEN] == "keep"
    # Polars puts its defaults in front when it loads: still ours, and a second choice keeps it.
    clean_env.setenv("_RJEM_MALLOC_CONF", "dirty_decay_ms:500,muzzy_decay_ms:1000," + KEEP["_RJEM_MALLOC_CONF"])
    assert freed_memory.choose("release") == "keep"
    for k in (CHOSEN, *KEEP):
        clean_env.delenv(k)
    clean_env.setenv("MIMALLOC_PURGE_DELAY", "250")
    assert freed_memory.choose("keep") == "user"
    assert os.environ["MIMALLOC_PURGE_DELAY"] == "250" and "_RJEM_MALLOC_CONF" not in os.environ
    with pytest.raises(ValueError, match="unknown policy"):
        freed_memory.choose("hoard")


def test_a_restart_only_switches_a_policy_alignloop_chose(clean_env):
    assert freed_memory.restart_command("release") is None  # nothing chosen: a library caller
    freed_memory.choose("keep")
    assert freed_memory.restart_command("keep") is None
    argv, env = freed_memory.restart_command("release")
    assert argv == [sys.executable, *sys.orig_argv[1:]]
    assert env[CHOSEN] == "release" and all(env[k] == v for k, v in RELEASE.items())
    clean_env.setenv("MIMALLOC_PURGE_DELAY", "250")  # the user changed one: theirs now
    assert freed_memory.restart_command("release") is None


def test_a_child_gets_the_policy_unless_the_user_set_their_own(clean_env):
    env = freed_memory.environment("keep", {"PATH": "/bin"})
    assert env == {"PATH": "/bin", **KEEP, CHOSEN: "keep"}
    assert freed_memory.environment("release", env)[CHOSEN] == "release"
    # A process that imported Polars carries its defaults: not the user's.
    assert freed_memory.environment("keep", {"_RJEM_MALLOC_CONF": "dirty_decay_ms:500,muzzy_decay_ms:1000"}) == {
        **KEEP, CHOSEN: "keep"}
    user = freed_memory.environment("keep", {"_RJEM_MALLOC_CONF": "narenas:1"})
    assert user == {"_RJEM_MALLOC_CONF": "narenas:1", CHOSEN: "user"}


def _alignloop(tmp: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (CHOSEN, *KEEP)}
    done = subprocess.run([sys.executable, "-m", "alignloop.cli", "--quiet", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def _policy(tmp: Path, stage: str) -> str:
    manifest = json.loads((tmp / "runs" / "logs-demo" / stage / "manifest.json").read_text(encoding="utf-8"))
    return manifest["allocators"][CHOSEN]


def test_filter_and_build_keep_freed_pages_in_memory_and_restart_to_release_them_when_streamed(tmp_path):
    _alignloop(tmp_path, "logs", "simulate", str(RECIPE), "--set", "simulate.users=60")
    _alignloop(tmp_path, "logs", "filter", str(RECIPE))
    _alignloop(tmp_path, "logs", "build", str(RECIPE))
    assert _policy(tmp_path, "filter") == _policy(tmp_path, "build") == "keep"
    _alignloop(tmp_path, "logs", "filter", str(RECIPE), "--set", "filter.partitions=2", "--force")
    _alignloop(tmp_path, "logs", "build", str(RECIPE), "--force")
    assert _policy(tmp_path, "filter") == _policy(tmp_path, "build") == "release"
