"""The sandbox under attack: every escape attempt fails safely, the host and the other episodes are
unharmed, and the episode gets a clear error result. Plus state across calls and snapshot/restore.

Needs bubblewrap (CI installs it: `apt-get install -y bubblewrap`); skipped, saying why, without it.
"""

import json
import os
import socket
import subprocess

import pytest

from alignloop.agentenv.episodes import Episodes
from alignloop.agentenv.limits import AgentEnvError, SandboxError, SandboxLimits
from alignloop.agentenv.sandbox import Sandbox, bwrap_problem
from alignloop.agentenv.tasks import make_task

pytestmark = pytest.mark.skipif(bwrap_problem() is not None, reason=f"no sandbox here: {bwrap_problem()}")

LIMITS = SandboxLimits(wall_seconds=3, cpu_seconds=3, memory_mb=256, processes=32, disk_mb=8, tmp_mb=4)
FILES = {"app.py": "def f():\n    return 1\n", "tests/test_app.py": "from app import f\n\n\ndef test_f():\n"
                                                                   "    assert f() == 1\n"}


@pytest.fixture
def box():
    with Sandbox(LIMITS).start(FILES) as b:
        yield b


@pytest.fixture
def other():
    with Sandbox(LIMITS).start({"secret.txt": "OTHER-EPISODE-SECRET\n"}) as b:
        yield b


def run(b, command, **kw):
    return b.call("run", command=command, **kw)


def host_is_fine():
    return subprocess.run(["true"], check=False).returncode == 0


def test_state_survives_between_calls(box):
    assert run(box, "export GREETING=hi; mkdir -p sub && cd sub && echo data > f.txt")["exit_code"] == 0
    out = run(box, "echo $GREETING; pwd; cat f.txt; sleep 60 & echo $! > /tmp/pid")
    assert out["output"].split() == ["hi", "/work/sub", "data"]
    # a background process started by one call is still running at the next
    assert run(box, "kill -0 $(cat /tmp/pid) && echo alive")["output"].strip() == "alive"


def test_no_network(box):
    with socket.socket() as listener:  # a server on the host's loopback: not the sandbox's loopback
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = (f"import socket\nfor host, port in (('1.1.1.1', 53), ('127.0.0.1', {port})):\n"
                "    try:\n        socket.create_connection((host, port), timeout=1); print('CONNECTED', host)\n"
                "    except OSError as e:\n        print('blocked', host, e.errno)\n")
        out = run(box, f"python3 -c \"{code}\"")
    assert "CONNECTED" not in out["output"] and out["output"].count("blocked") == 2


def test_host_files_are_out_of_reach(box, tmp_path):
    secret = tmp_path / "host_secret.txt"
    secret.write_text("HOST-SECRET")
    out = run(box, f"cat {secret}; cat /etc/passwd; ls /root; ls {os.getcwd()}; cat /proc/1/root/etc/hostname")
    assert "HOST-SECRET" not in out["output"] and "root:x" not in out["output"]
    # writes outside the repository fail: the host's /usr, the agent's runtime, the host's tmp_path
    out = run(box, f"touch /usr/evil; echo x > /opt/agentenv/evil; echo x > {tmp_path}/evil; echo rc=$?")
    assert "rc=1" in out["output"]
    assert not (tmp_path / "evil").exists() and not os.path.exists("/usr/evil")
    # the file tools refuse paths that leave the repository, with a clear error
    for op, args in (("read", {"path": "../etc/passwd"}), ("write", {"path": "/tmp/../../usr/x", "content": ""}),
                     ("read", {"path": str(secret)})):
        with pytest.raises(AgentEnvError, match="outside the repository"):
            box.call(op, **args)


def test_another_episode_is_invisible(box, other):
    out = run(box, "grep -rs OTHER-EPISODE-SECRET /work /tmp /run /opt; ls /proc/*/root/work 2>&1; "
                   "ls /proc | grep -c '^[0-9]'")
    assert "OTHER-EPISODE-SECRET" not in out["output"] and "secret.txt" not in out["output"]
    assert run(other, "cat secret.txt")["output"] == "OTHER-EPISODE-SECRET\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="the process limit is per sandbox only when the host is root "
                    "(each sandbox then runs as a uid of its own)")
def test_fork_bomb_is_contained(box, other):
    results = [run(box, ":(){ :|:& };:"), run(box, "echo after")]
    errors = " ".join(r.get("error", "") + r["output"] for r in results)
    assert "process limit" in errors or "timed out" in errors
    assert "after" in results[1]["output"] or "after" in run(box, "echo after")["output"]
    assert run(other, "echo fine")["output"] == "fine\n" and host_is_fine()


def test_memory_hog_is_refused(box):
    out = run(box, "python3 -c 'x = bytearray(2 * 1024**3)'")
    assert out["exit_code"] != 0 and "MemoryError" in out["output"]
    assert run(box, "echo ok")["output"] == "ok\n" and host_is_fine()


def test_sleeping_past_the_limit_is_killed(box):
    out = run(box, "sleep 30; echo woke")
    assert out["exit_code"] is None and "timed out" in out["error"] and "woke" not in out["output"]
    out = run(box, "python3 -c 'while True: pass'", timeout=10)  # CPU limit (3 s) before the wall limit
    assert out.get("error") and ("CPU time limit" in out["error"] or "timed out" in out["error"])
    assert run(box, "echo next")["output"] == "next\n"


def test_filling_the_disk_fails_inside_only(box):
    out = run(box, "head -c 50000000 /dev/zero > big; echo rc=$?; head -c 50000000 /dev/zero > /tmp/big; echo rc=$?")
    assert out["output"].count("rc=1") == 2 or "File size limit" in out["output"]
    assert "No space left" in out["output"] or "File size limit" in out["output"]
    assert run(box, "rm -f big /tmp/big; echo ok > small; cat small")["output"] == "ok\n"
    assert box.call("test")["passed"] == ["test_app::test_f"]


def test_killing_the_parent_ends_the_episode_with_a_clear_error(other):
    box = Sandbox(LIMITS).start(FILES)
    with pytest.raises(SandboxError, match="sandbox died"):
        run(box, "kill -9 $PPID; sleep 1")
    assert not box.alive
    with pytest.raises(SandboxError, match="sandbox died"):
        run(box, "echo again")
    box.close()
    assert run(other, "echo fine")["output"] == "fine\n" and host_is_fine()


def test_a_dead_sandbox_grades_zero_with_its_reason_and_spares_the_batch():
    tasks = [make_task("trivial", 0), make_task("trivial", 1)]
    kill = '<tool_call>{"name": "run", "arguments": {"command": "kill -9 -1"}}</tool_call>'
    fix = tasks[1].failing[0].split("expected ")[1]
    write = ('<tool_call>{"name": "write_file", "arguments": {"path": "solution.py", "content": '
             + json.dumps(f"def answer():\n    return {fix}\n") + "}}</tool_call>")
    with Episodes(limits=LIMITS, max_turns=1) as env:
        env.reset(tasks)
        step = env.step([kill, write])
    assert step.done == [True, True]
    assert step.rewards == [0.0, 1.0]
    assert "sandbox died" in step.errors[0] and step.errors[1] is None
    assert step.info[0]["sandbox_error"] == 1.0


def test_snapshot_restore_gives_back_files_env_and_cwd_exactly(box):
    run(box, "mkdir -p deep/er && printf 'x\\0y\\n' > deep/er/bin.dat && chmod 600 deep/er/bin.dat && "
             "export A='one two' B=2 && unset HOME && cd deep/er")
    before_env = box.call("env")
    listing = "(cd /work && find . -type f -exec sha256sum {} + | sort && stat -c '%a %n' deep/er/bin.dat)"
    before_files = run(box, listing)
    snap = box.snapshot()
    with Sandbox.restore(snap, LIMITS) as back:
        assert back.call("env") == before_env
        assert before_env["cwd"] == "/work/deep/er" and before_env["env"]["A"] == "one two"
        assert "HOME" not in before_env["env"]
        after_files = run(back, listing)
        assert after_files["output"] == before_files["output"] and "600 deep/er/bin.dat" in after_files["output"]
        assert run(back, "pwd; echo $A")["output"] == "/work/deep/er\none two\n"
