"""Run folders: atomic writes, content hashes, and one manifest per finished stage.

Layout: `runs/<run>/<stage>/` holds a stage's outputs, its `metrics.jsonl` and, once it has
finished, `manifest.json`. A stage is complete when that manifest still matches the config, the
inputs and the outputs on disk, so a rerun can skip it; anything less and it runs again.

One process at a time writes a stage: `start()` takes an exclusive lock on the stage's `stage.lock`
file, held until `finish()` or the end of the process (the OS drops it even after a SIGKILL), and
a second process that starts the same stage is refused with one line naming the holder's pid.
"""

import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import alignloop
from alignloop.errors import AlignloopError
from alignloop.ui import say

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
LOCK = "stage.lock"


class DiskFullError(AlignloopError):
    """A write that ran out of disk space; the file it was writing keeps its old content."""


class StageBusyError(AlignloopError):
    """Another process is writing this stage."""


# --- atomic writes -----------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; it replaces `path` on success.

    A crash or an exception midway leaves the old file untouched, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is a rename within one filesystem, hence atomic.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with disk_full_is_an_error(path):
            yield tmp
            # Flush to disk before the rename, or a power cut could leave a renamed empty file.
            with open(tmp, "r+b") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def disk_full_is_an_error(path: str | Path) -> Iterator[None]:
    """A full disk (or quota) while writing `path` becomes one line, a `DiskFullError`, not a traceback."""
    try:
        yield
    except OSError as e:
        # Arrow's writers raise OSError without an errno, naming the cause in the message only.
        if e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
            raise DiskFullError(f"{path}: no space left on device") from None
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# --- hashes ------------------------------------------------------------------------------------


def trim_jsonl(path: str | Path, upto: int) -> None:
    """Drop JSON lines whose "step" is past `upto` (a resumed run writes those steps again), and
    any line torn by a kill; lines without a step stay."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= upto:
                keep.append(line + "\n")
        except json.JSONDecodeError:
            continue  # torn by the kill
    atomic_write_text(path, "".join(keep))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append `record` to a JSON-lines log. A line torn by a kill or a full disk (one line of error,
    `DiskFullError`) is one `trim_jsonl` drops when the run resumes."""
    with disk_full_is_an_error(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def file_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks so multi-GB checkpoints don't fill memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def config_hash(obj: Any) -> str:
    """sha256 of canonical JSON: equal configs hash equal whatever their key order."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --- stages ------------------------------------------------------------------------------------


def default_run_name() -> str:
    """A run name from the local time, e.g. 20261128-233700; sorts in creation order."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


class Stage:
    """One stage of one run: its folder, metrics log and manifest."""

    def __init__(
        self, runs_dir: str | Path, run: str, name: str, config: dict[str, Any], inputs: Sequence[str | Path] = ()
    ) -> None:
        self.run = run
        self.name = name
        self.config = config
        self.inputs = [Path(p) for p in inputs]
        self.dir = Path(runs_dir) / run / name
        self._work_hash: str | None = None
        self._started_at: datetime | None = None
        self._started_clock = 0.0
        self._locked = False

    def path(self, name: str) -> Path:
        """Where this stage writes its output `name`."""
        return self.dir / name

    def start(self) -> "Stage":
        """Take the stage (its lock; `StageBusyError` if another process has it) and begin afresh."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self._locked:
            _lock(self.dir.resolve() / LOCK, f"stage {self.run}/{self.name}")
            self._locked = True
        # A manifest left by an earlier attempt must not vouch for outputs this attempt rewrites.
        self.path(MANIFEST).unlink(missing_ok=True)
        self._started_at = datetime.now().astimezone()
        self._started_clock = time.monotonic()
        return self

    def is_complete(self) -> bool:
        """True iff the manifest matches the current config, inputs and outputs on disk."""
        try:
            manifest = json.loads(self.path(MANIFEST).read_text(encoding="utf-8"))
            return (
                manifest["config_hash"] == config_hash(self.config)
                and manifest["inputs"] == self._input_hashes()
                and all(file_hash(self.dir / rel) == digest for rel, digest in manifest["outputs"].items())
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            # Missing or garbled manifest, or a vanished input or output: not complete.
            return False

    def skip_if_complete(self, force: bool = False, *, main: bool = True,
                         agree: Callable[[bool], bool] | None = None, label: str | None = None) -> bool:
        """The one "up to date?" preamble of every stage: True when the caller should return now.

        Complete (and not `force`): says "<label>: up to date ... skipped" and returns True.
        Otherwise starts the stage (on the main process only) and returns False. Under torchrun
        pass `main=ctx.is_main, agree=dist.broadcast_object`: rank 0 reads the manifest and
        every rank follows its answer, so no rank trains while another returns.
        """
        done = not force and main and self.is_complete()
        if agree is not None:
            done = agree(done)
        if done:
            say(f"[green]{label or self.name}: up to date[/] ({self.dir}), skipped")
            return True
        if main:
            self.start()
        return False

    def log_metrics(self, step: int | None = None, **values: Any) -> None:
        """Append one JSON line to metrics.jsonl, stamped with the wall-clock time."""
        if "time" in values:
            raise ValueError("'time' is set by log_metrics; name the metric something else")
        record = {"time": time.time(), **({} if step is None else {"step": step}), **values}
        self.dir.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.path(METRICS), record)

    def finish(self, outputs: Sequence[str | Path], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write manifest.json, which marks the stage complete, and return it."""
        if self._started_at is None:
            raise RuntimeError(f"stage {self.name}: call start() before finish()")
        commit, dirty = _git_state()
        manifest = {
            "stage": self.name,
            "run": self.run,
            "config": self.config,
            "config_hash": config_hash(self.config),
            "alignloop_version": alignloop.__version__,
            "git_commit": commit,
            "git_dirty": dirty,
            "inputs": self._input_hashes(),
            "outputs": {self._relative(p): file_hash(p) for p in outputs},
            "started_at": self._started_at.isoformat(timespec="seconds"),
            "finished_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - self._started_clock, 3),
            "python": platform.python_version(),
            "torch": _package_version("torch"),
            **(extra or {}),
        }
        atomic_write_json(self.path(MANIFEST), manifest)
        if self._locked:
            _unlock(self.dir.resolve() / LOCK)
            self._locked = False
        return manifest

    def work_hash(self) -> str:
        """sha256 of what this stage's work depends on: its config and its inputs' bytes.

        Checkpoints carry it, so a run resumes only work done on this very config and these very
        inputs (a retrained reward model or new data at the same path starts afresh). Computed once:
        the inputs do not change while the stage runs.
        """
        if self._work_hash is None:
            self._work_hash = config_hash({"config": self.config, "inputs": self._input_hashes()})
        return self._work_hash

    def _input_hashes(self) -> dict[str, str]:
        return {str(p): file_hash(p) for p in self.inputs}

    def _relative(self, output: str | Path) -> str:
        # Relative paths keep a run folder valid after it is moved or copied elsewhere.
        try:
            return Path(output).resolve().relative_to(self.dir.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"output {output} is outside the stage folder {self.dir}") from None


_HELD: dict[Path, list[int]] = {}
"""Lock files this process holds: [file descriptor, Stage objects holding it]. A process may start
its own stage again (a retry after an exception, a second Stage object for the same folder)."""


def _lock(lock: Path, what: str) -> None:
    """Hold `lock` exclusively, or raise `StageBusyError` naming the process that holds it.

    flock, not a pid file: the kernel drops it when the holder's last descriptor closes, so a
    killed holder never leaves a stale lock behind. The file itself stays (deleting it would let
    two processes lock two different files of the same name).
    """
    if lock in _HELD:
        _HELD[lock][1] += 1
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise StageBusyError(f"{lock}: {what} is in use by process {holder}; wait for it to finish, "
                             f"or use another run") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[lock] = [fd, 1]


def _unlock(lock: Path) -> None:
    held = _HELD[lock]
    held[1] -= 1
    if held[1] == 0:
        os.close(held[0])  # closing the last descriptor releases the flock
        del _HELD[lock]


def _git_state() -> tuple[str | None, bool]:
    """(HEAD commit, uncommitted changes?) of the working directory's repo; (None, False) if none."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, False
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    return head.stdout.strip(), bool(status.stdout.strip())


def _package_version(name: str) -> str | None:
    # Metadata only: importing torch just to read its version would cost seconds.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
