"""engine/allocator.py: glibc tuned in-process, TCMalloc found and detected, the vLLM worker's preload
list without duplicates, and the bench restart only from a real command line."""

import os
import subprocess
import sys
import textwrap

import pytest

from alignloop.bench import vllm_peer
from alignloop.cli import bench as cli_bench
from alignloop.engine import allocator


def _run(code: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_tunes_glibc_once_and_says_so():
    # A fresh process: the tuning is process-wide and this test must not depend on test order.
    out = _run("""
        from alignloop.engine import allocator
        before = allocator.describe()
        print(before, "|", allocator.keep_freed_memory(), allocator.keep_freed_memory(), "|", allocator.describe())
    """, {"LD_PRELOAD": ""})
    assert out == "glibc malloc | True True | glibc malloc, tuned (keep_freed_memory)"


def test_the_engine_tunes_the_allocator_when_it_starts():
    out = _run("""
        from alignloop.engine import allocator
        from alignloop.engine.engine import Engine
        Engine.from_name("tiny-llama", show_progress=False)
        print(allocator.describe())
    """, {"LD_PRELOAD": ""})
    assert out.endswith("tuned (keep_freed_memory)") or out.startswith("tcmalloc")


@pytest.mark.skipif(allocator.tcmalloc_path() is None, reason="no TCMalloc installed (libtcmalloc-minimal4)")
def test_tcmalloc_is_detected_when_preloaded_and_glibc_is_left_alone():
    out = _run("""
        from alignloop.engine import allocator
        print(allocator.tcmalloc_loaded(), allocator.keep_freed_memory(), allocator.describe())
    """, {"LD_PRELOAD": allocator.tcmalloc_path()})
    assert out == "True False tcmalloc (preloaded)"


def test_vllm_worker_preload_lists_each_library_once(monkeypatch, tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_text("")
    monkeypatch.setattr(vllm_peer, "peers_venv", lambda: tmp_path)
    monkeypatch.setattr(vllm_peer, "tcmalloc_path", lambda: "/x/libtcmalloc_minimal.so.4")
    monkeypatch.setenv("LD_PRELOAD", "/x/libtcmalloc_minimal.so.4:/y/other.so")
    env = vllm_peer.worker_env(threads=1)
    assert env["LD_PRELOAD"].split(":") == ["/x/libtcmalloc_minimal.so.4", str(tmp_path / "lib" / "libiomp5.so"),
                                            "/y/other.so"]


def test_bench_restarts_under_tcmalloc_only_from_its_own_command_line(monkeypatch):
    calls = []
    monkeypatch.setattr(cli_bench.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(allocator, "tcmalloc_path", lambda: "/x/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "tcmalloc_loaded", lambda: False)
    monkeypatch.setattr(sys, "argv", ["pytest", "tests"])
    cli_bench._restart_under_tcmalloc("generate")
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["/venv/bin/alignloop", "bench", "generate", "--rounds", "3"])
    monkeypatch.setenv("LD_PRELOAD", "/y/other.so")
    cli_bench._restart_under_tcmalloc("generate")
    (exe, argv, env), = calls
    assert argv == [sys.executable, "-m", "alignloop.cli", "bench", "generate", "--rounds", "3"]
    assert env["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4:/y/other.so"
    monkeypatch.setattr(allocator, "tcmalloc_loaded", lambda: True)
    cli_bench._restart_under_tcmalloc("generate")
    assert len(calls) == 1
