"""Run folders: atomic writes, content hashes, and one manifest per finished stage.

Layout: `runs/<run>/<stage>/` holds a stage's outputs, its `metrics.jsonl` and, once it has
finished, `manifest.json`. A stage is complete when that manifest still matches the config, the
inputs and the outputs on disk, so a rerun can skip it; anything less and it runs again.
"""

import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import alignloop

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"


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
        yield tmp
        # Flush to disk before the rename, or a power cut could leave a renamed empty file.
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        self._started_at: datetime | None = None
        self._started_clock = 0.0

    def path(self, name: str) -> Path:
        """Where this stage writes its output `name`."""
        return self.dir / name

    def start(self) -> "Stage":
        self.dir.mkdir(parents=True, exist_ok=True)
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

    def log_metrics(self, step: int | None = None, **values: Any) -> None:
        """Append one JSON line to metrics.jsonl, stamped with the wall-clock time."""
        if "time" in values:
            raise ValueError("'time' is set by log_metrics; name the metric something else")
        record = {"time": time.time(), **({} if step is None else {"step": step}), **values}
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path(METRICS), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

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
        return manifest

    def _input_hashes(self) -> dict[str, str]:
        return {str(p): file_hash(p) for p in self.inputs}

    def _relative(self, output: str | Path) -> str:
        # Relative paths keep a run folder valid after it is moved or copied elsewhere.
        try:
            return Path(output).resolve().relative_to(self.dir.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"output {output} is outside the stage folder {self.dir}") from None


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
