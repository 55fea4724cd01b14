"""`Sandbox`: one episode's isolated, stateful machine (bubblewrap), and its snapshot.

Isolation (Linux namespaces through `bwrap --unshare-all`): no network (a fresh network namespace
with only loopback), its own PID namespace (it cannot see or signal the host's processes or another
episode's), its own mount namespace whose only writable places are /work (the repository, a
private copy on a size-capped tmpfs), /tmp and /run (also capped tmpfs); the host shows through
read-only /usr and the agent's runtime folder only (no /etc, /home, /root, host /tmp). When the
host is root every sandbox also runs as a uid of its own (unprivileged user namespace inside), so
the process limit is per sandbox and no file of the host or of another episode belongs to it.
Killing the sandbox (`close`, or the host process dying: `--die-with-parent`) kills everything
in it.

State across calls lives in the agent process inside (`agent_main.py`): files, env vars, working
directory, background processes. `snapshot()` captures files + env + cwd (not processes: that would
need CRIU); `Sandbox.restore(snapshot)` starts a fresh sandbox holding exactly them.

Calls are thread-safe and concurrent: each request carries an id and its answer is matched back,
so the tool calls of one turn run in parallel inside one sandbox.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from alignloop.agentenv.limits import AgentEnvError, SandboxError, SandboxLimits

SANDBOX_PYTHON = "/usr/bin/python3"   # the interpreter the sandbox sees (under the read-only /usr)
UID_BASE = 200_000                    # host uids for sandboxes: UID_BASE + a slot (host root only)
UID_SLOTS = 100_000
GRACE_SECONDS = 15.0                  # a call's answer may lag its command's wall limit by this much

_LAUNCHER = ThreadPoolExecutor(1, thread_name_prefix="sandbox-launcher")
_runtime_lock = threading.Lock()
_runtime: Path | None = None
_slots = itertools.count((os.getpid() * 613) % UID_SLOTS)


@dataclass
class Snapshot:
    """A hibernated episode: its repository (a gzipped tar of /work), env vars and working directory."""

    tar: bytes
    env: dict[str, str]
    cwd: str

    def to_json(self) -> dict:
        return {"tar": base64.b64encode(self.tar).decode(), "env": self.env, "cwd": self.cwd}

    @classmethod
    def from_json(cls, data: dict) -> Snapshot:
        return cls(base64.b64decode(data["tar"]), dict(data["env"]), str(data["cwd"]))


@functools.cache
def bwrap_problem() -> str | None:
    """Why sandboxes cannot start here (None: they can). Tried once per process: bubblewrap may be
    installed where namespaces are not allowed (a container's seccomp profile, a sysctl)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install -y bubblewrap)"
    if not os.access(SANDBOX_PYTHON, os.X_OK):
        return f"{SANDBOX_PYTHON} is missing: the sandbox runs its agent and the tests with the system Python"
    probe = subprocess.run(["bwrap", "--unshare-all", "--die-with-parent", *_system_dirs(), "--proc", "/proc",
                            "--dev", "/dev", "--", SANDBOX_PYTHON, "-I", "-S", "-c", "pass"],
                           capture_output=True, text=True, check=False, timeout=60, **_sandbox_user())
    if probe.returncode != 0:
        return f"bubblewrap cannot make a sandbox here: {probe.stderr.strip()[-300:]}"
    return None


def _sandbox_user() -> dict:
    """Popen arguments running a sandbox as a host uid of its own (host root only; see the module)."""
    if os.geteuid() != 0:
        return {}
    uid = UID_BASE + next(_slots) % UID_SLOTS
    return {"user": uid, "group": uid, "extra_groups": []}


def runtime_dir() -> Path:
    """A world-readable folder that the sandbox sees as /opt/agentenv: the agent script,
    `python`/`python3` and `ruff` (copied: the venv may sit under /root, which a sandbox's own uid
    cannot enter). One per content, shared by this user's processes (ruff is ~30 MB); built aside
    and renamed into place, and used only if this user owns it and nobody else can write to it
    (else this process builds a private one)."""
    global _runtime
    with _runtime_lock:
        if _runtime is not None and _trusted(_runtime):
            return _runtime
        agent, ruff = Path(__file__).with_name("agent_main.py"), _ruff()
        stamp = f"{ruff}:{ruff.stat().st_size}:{ruff.stat().st_mtime_ns}" if ruff else ""
        key = hashlib.sha256(agent.read_bytes() + stamp.encode()).hexdigest()[:16]
        final = Path(tempfile.gettempdir()) / f"alignloop-agentenv-{os.geteuid()}-{key}"
        if not _trusted(final):
            build = _build(Path(tempfile.mkdtemp(prefix="alignloop-agentenv-build-")), agent, ruff)
            try:
                build.rename(final)
            except OSError:  # another process got there first, or a stranger's folder is in the way
                if _trusted(final):
                    shutil.rmtree(build, ignore_errors=True)
                else:
                    final = build
        _runtime = final
        return final


def _ruff() -> Path | None:
    ruff = Path(sysconfig.get_path("scripts")) / "ruff"
    found = ruff if ruff.is_file() else Path(shutil.which("ruff") or "/nonexistent")
    return found if found.is_file() else None


def _build(root: Path, agent: Path, ruff: Path | None) -> Path:
    (root / "bin").mkdir()
    shutil.copy(agent, root / "agent_main.py")
    for name in ("python", "python3"):
        (root / "bin" / name).symlink_to(SANDBOX_PYTHON)
    if ruff is not None:
        shutil.copy(ruff, root / "bin" / "ruff")
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755)
    (root / "ready").write_text("")
    return root


def _trusted(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022 and (path / "ready").is_file()


def _system_dirs() -> list[str]:
    """bwrap arguments showing /usr and the usual top-level links into it (merged-/usr Debian)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib64", "lib32"):
        top = Path("/") / name
        if top.is_symlink():
            args += ["--symlink", os.readlink(top), f"/{name}"]
        elif top.is_dir():
            args += ["--ro-bind", str(top), f"/{name}"]
    return args


class Sandbox:
    """One episode's sandbox; `start(files)` makes it, `call(op, **args)` uses it, `close()` ends it."""

    def __init__(self, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self.start_seconds = 0.0
        self.error: str | None = None      # set once the sandbox died: why
        self._proc: subprocess.Popen | None = None
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()

    # --- life ----------------------------------------------------------------------------------
    def command(self) -> list[str]:
        mb = 2**20
        runtime = runtime_dir()
        args = {**self.limits.agent_args(), "processes": self.limits.processes if os.geteuid() == 0 else 0}
        return ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
                *_system_dirs(), "--proc", "/proc", "--dev", "/dev",
                "--size", str(self.limits.disk_mb * mb), "--tmpfs", "/work",
                "--size", str(self.limits.tmp_mb * mb), "--tmpfs", "/tmp",
                "--size", str(8 * mb), "--tmpfs", "/run",
                "--ro-bind", str(runtime), "/opt/agentenv",
                "--setenv", "PATH", "/opt/agentenv/bin:/usr/local/bin:/usr/bin:/bin",
                "--setenv", "HOME", "/work", "--hostname", "sandbox", "--chdir", "/work",
                "--", SANDBOX_PYTHON, "-I", "-S", "/opt/agentenv/agent_main.py", json.dumps(args)]

    def start(self, files: dict[str, str] | None = None) -> Sandbox:
        problem = bwrap_problem()
        if problem is not None:
            raise AgentEnvError(f"cannot start a sandbox: {problem}")
        began = time.perf_counter()
        user = _sandbox_user()
        # bwrap's --die-with-parent is tied to the *thread* that started it (PR_SET_PDEATHSIG): a
        # sandbox started from a pool thread would be killed when that thread ends. One launcher
        # thread that lives as long as the process starts them all.
        self._proc = _LAUNCHER.submit(subprocess.Popen, self.command(), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
                                      **user).result()
        ready: Future = Future()
        self._pending[0] = ready
        threading.Thread(target=self._read, daemon=True).start()
        try:
            ready.result(timeout=30)
        except FutureTimeout:
            self.close()
            raise SandboxError("sandbox did not start within 30 s") from None
        except SandboxError as e:
            raise SandboxError(f"sandbox did not start: {e}") from None
        if files:
            self.call("init", files=files)
        self.start_seconds = time.perf_counter() - began
        return self

    @classmethod
    def restore(cls, snapshot: Snapshot, limits: SandboxLimits | None = None) -> Sandbox:
        """A fresh sandbox holding `snapshot`'s files, env vars and working directory."""
        box = cls(limits).start()
        box.call("restore", **snapshot.to_json())
        return box

    def snapshot(self) -> Snapshot:
        return Snapshot.from_json(self.call("snapshot"))

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self.error is None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()  # bwrap's PID namespace dies with it: every process of the episode goes
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        self._fail("sandbox closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls ---------------------------------------------------------------------------------
    def call(self, op: str, wait: float | None = None, **args: Any) -> dict:
        """The agent's answer to `op`; raises SandboxError when the sandbox is dead or stops
        answering (it is then killed), and the agent's own error (a bad path, ...) as AgentEnvError."""
        proc = self._proc
        if proc is None or self.error is not None:
            raise SandboxError(self.error or "sandbox not started")
        future: Future = Future()
        with self._lock:
            rid = next(self._ids)
            self._pending[rid] = future
        try:
            with self._write_lock:
                proc.stdin.write((json.dumps({"id": rid, "op": op, "args": args}) + "\n").encode())
                proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            self._fail(self._death())
        wait = wait if wait is not None else self.limits.wall_seconds + GRACE_SECONDS
        try:
            answer = future.result(timeout=wait)
        except FutureTimeout:
            self.error = f"sandbox stopped answering ({op} took over {wait:g} s); killed"
            self.close()
            raise SandboxError(self.error) from None
        if not answer["ok"]:
            raise AgentEnvError(answer["error"])
        return answer["result"]

    def _read(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        try:
            for line in proc.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                with self._lock:
                    future = self._pending.pop(message.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except (OSError, ValueError):  # closed under us by close()
            pass
        self._fail(self._death())

    def _death(self) -> str:
        proc = self._proc
        code = proc.poll() if proc is not None else None
        if proc is not None and code is None:
            try:
                code = proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                code = None
        stderr = ""
        if proc is not None and proc.stderr is not None and code is not None:
            try:
                stderr = proc.stderr.read().decode(errors="replace").strip()[-300:]
            except (OSError, ValueError):
                stderr = ""
        return f"sandbox died (exit code {code})" + (f": {stderr}" if stderr else "")

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(SandboxError(self.error))


def python_version_inside() -> str:
    """The sandbox's Python version, for reports (e.g. '3.11.2')."""
    out = subprocess.run([SANDBOX_PYTHON, "-c", "import sys; print(sys.version.split()[0])"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or sys.version.split()[0]
