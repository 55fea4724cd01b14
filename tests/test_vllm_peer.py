"""The vLLM bench peer's plumbing (bench/vllm_peer.py), with a fake worker in place of vLLM: why it is
unavailable, the settings it hands the worker, the JSON-line protocol, and a worker that fails.
No vLLM needed; the real worker runs in the peers venv (`make peers`)."""

import json
import os
import sys
import textwrap

import pytest

from alignloop.bench import vllm_peer, vllm_worker
from alignloop.errors import AlignloopError

FAKE = textwrap.dedent("""
    import json, os, sys
    out = sys.stdout
    config = json.loads(sys.argv[1])
    if config.get("model", "").endswith("silent"):
        sys.stdin.read()
    if config.get("model", "").endswith("crash"):
        print("loading failed: out of cheese", file=sys.stderr, flush=True)
        sys.exit(3)
    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k == "LD_PRELOAD"}
    out.write(json.dumps({"ready": True, "facts": {"vllm": "fake", "env": env, "config": config}}) + "\\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] != "run" or cmd["max_tokens"] < 1:
            out.write(json.dumps({"error": "ValueError: max_tokens must be at least 1"}) + "\\n")
        else:
            n = len(cmd["prompts"])
            out.write(json.dumps({"useful": n * cmd["max_tokens"], "computed": n * cmd["max_tokens"] + 1,
                                  "seconds": 0.5, "eos_rate": 0.25, "echo": cmd}) + "\\n")
        out.flush()
""")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """VllmPeer with the fake worker; the model name picks its behaviour (ok, silent, crash)."""
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE)
    monkeypatch.setattr(vllm_peer, "available", lambda: None)
    monkeypatch.setattr(vllm_peer, "model_folder", lambda name: tmp_path / name)
    monkeypatch.setattr(vllm_peer, "worker_command",
                        lambda config: [sys.executable, str(script), json.dumps(config)])
    return tmp_path


def test_available_says_how_to_get_the_peers_venv(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_PEERS_VENV", str(tmp_path / "absent"))
    assert "run `make peers`" in vllm_peer.available()
    with pytest.raises(AlignloopError, match=r"vLLM peer: no .*absent: run `make peers`"):
        vllm_peer.VllmPeer("smollm2-135m", "bfloat16", threads=1)
    (tmp_path / "absent" / "bin").mkdir(parents=True)
    (tmp_path / "absent" / "bin" / "python").write_text("")
    assert "has no vllm" in vllm_peer.available()
    site = tmp_path / "absent" / "lib" / "python3.11" / "site-packages" / "vllm"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    assert vllm_peer.available() is None


def test_the_worker_gets_vllms_cpu_settings_and_answers_runs(fake):
    first = str(min(os.sched_getaffinity(0)))
    with vllm_peer.VllmPeer("ok", "bfloat16", threads=1, max_num_seqs=16) as peer:
        facts = peer.facts()
        env = facts["env"]
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == first == facts["thread_binding"]
        assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
        assert facts["config"] == {"model": str(fake / "ok"), "dtype": "bfloat16", "max_num_seqs": 16}
        assert facts["settings"]["threads"] == 1 and "EOS" in facts["accounting"]
        chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
        result = peer.run(chats, max_tokens=8, seeds=[1, 2], temperature=1.0, top_p=0.95)
        assert {k: result[k] for k in ("useful", "computed", "seconds", "eos_rate")} == {
            "useful": 16, "computed": 17, "seconds": 0.5, "eos_rate": 0.25}
        assert result["echo"] == {"cmd": "run", "prompts": chats, "max_tokens": 8, "seeds": [1, 2],
                                  "temperature": 1.0, "top_p": 0.95, "ignore_eos": False}
        with pytest.raises(AlignloopError, match="vLLM peer: run failed: ValueError: max_tokens"):
            peer.run(chats, max_tokens=0, seeds=[1, 2], temperature=1.0, top_p=0.95)
        assert peer.run(chats, 4, [1, 2], 1.0, 1.0)["useful"] == 8  # still up after an error
        with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
            peer.run(chats, 4, [1], 1.0, 1.0)
        proc = peer._worker._proc
    assert proc.poll() == 0  # quit on the way out


def test_a_worker_that_dies_at_start_is_one_line_with_its_log(fake):
    with pytest.raises(AlignloopError, match=r"ended during start \(exit 3\).*out of cheese") as caught:
        vllm_peer.VllmPeer("crash", "bfloat16", threads=1)
    assert "\n" not in str(caught.value)


def test_a_worker_that_never_answers_times_out(fake, monkeypatch):
    monkeypatch.setattr(vllm_peer, "START_TIMEOUT_S", 1)
    with pytest.raises(AlignloopError, match="no answer to start within 1 s"):
        vllm_peer.VllmPeer("silent", "bfloat16", threads=1)


def test_threads_bind_to_cores_this_process_may_use():
    cores = sorted(os.sched_getaffinity(0))
    assert vllm_peer.thread_binding(len(cores)) == ",".join(map(str, cores))
    with pytest.raises(AlignloopError, match="threads asked for"):
        vllm_peer.thread_binding(len(cores) + 1)


def test_useful_tokens_stop_at_the_first_eos():
    assert vllm_worker._count([5, 7, 2, 9, 2], {2}) == (3, True)
    assert vllm_worker._count([5, 7, 9], {2, 0}) == (3, False)
    assert vllm_worker._count([], {2}) == (0, False)
