"""A peer that lives in another environment's interpreter, behind a JSON-lines pipe.

vLLM and llama.cpp pin or build things the project's venv cannot hold, so each runs as a worker
process of the peers venv (`make peers`): the worker answers one JSON object per line on stdout
for each one it reads on stdin, starting with {"ready": true, "facts": {...}} once loaded and warm,
and {"error": "..."} for anything it cannot do. Its stderr goes to a temporary log whose last
lines every error message quotes.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import tempfile
from pathlib import Path

from alignloop.errors import AlignloopError

REPO = Path(__file__).resolve().parents[3]


def peers_venv() -> Path:
    """Where `make peers` puts the environment (ALIGNLOOP_PEERS_VENV overrides)."""
    return Path(os.environ.get("ALIGNLOOP_PEERS_VENV") or REPO / ".venv-peers")


def peers_python() -> Path:
    return peers_venv() / "bin" / "python"


def missing_from_peers(package: str, how: str) -> str | None:
    """None when the peers venv has `package`; else why not, in one line (`how`: what gets it there)."""
    venv = peers_venv()
    if not peers_python().exists():
        return f"no {venv}: run `make peers` ({how})"
    if not any(venv.glob(f"lib/python3*/site-packages/{package}/__init__.py")):
        return f"{venv} has no {package}: run `make peers` again ({how})"
    return None


class WorkerProcess:
    """One worker: `request` sends a command and waits for its reply; `close` ends it (once)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], start_timeout_s: float):
        self.name = name
        self._log = tempfile.NamedTemporaryFile("w+", prefix=f"alignloop-{name}-", suffix=".log", delete=False)
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      env=env, text=True, bufsize=1)
        try:
            self.ready = self._receive(start_timeout_s, "start")
        except BaseException:
            self.close()
            raise

    def request(self, obj: dict, what: str = "run") -> dict:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(obj) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise self._died(what) from None
        return self._receive(None, what)

    def close(self) -> None:
        """Ask the worker to quit, or end it after a minute."""
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        if not self._log.closed:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)

    def _receive(self, timeout: float | None, what: str) -> dict:
        assert self._proc.stdout is not None
        if timeout is not None:
            with selectors.DefaultSelector() as sel:
                sel.register(self._proc.stdout, selectors.EVENT_READ)
                if not sel.select(timeout):
                    self._proc.kill()
                    self._proc.wait()
                    raise AlignloopError(f"{self.name} peer: no answer to {what} within {timeout:.0f} s; "
                                         f"its log ends: {self._log_tail()}")
        line = self._proc.stdout.readline()
        if not line:
            raise self._died(what)
        reply = json.loads(line)
        if "error" in reply:
            raise AlignloopError(f"{self.name} peer: {what} failed: {reply['error']}")
        return reply

    def _died(self, what: str) -> AlignloopError:
        self._proc.wait()
        return AlignloopError(f"{self.name} peer: the worker ended during {what} (exit {self._proc.returncode}); "
                              f"its log ends: {self._log_tail()}")

    def _log_tail(self, lines: int = 5) -> str:
        self._log.flush()
        text = Path(self._log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(empty)"


class WorkerPeer:
    """What a peer class shares: a `WorkerProcess` in `self._worker`, ended by `close` or on leaving `with`."""

    _worker: WorkerProcess
    _facts: dict

    def facts(self) -> dict:
        """The peer's version and the settings it runs with (as the JSON line records them)."""
        return dict(self._facts)

    def close(self) -> None:
        """Ask the worker to quit, or end it after a minute."""
        self._worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
