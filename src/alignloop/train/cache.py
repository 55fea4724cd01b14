"""Tensors a trainer computes once per stage and keeps on disk (reference log-probs, teacher top-k).

Each cache file is a safetensors file whose metadata holds the fingerprint of everything its
values depend on; a file with another fingerprint (or a torn one) is recomputed, never trusted.
A model named by a local folder is fingerprinted by its files' names, sizes and modification
times, so retraining the model in that folder (e.g. an SFT stage that DPO starts from) invalidates
the cache even though the name did not change.

Under torchrun only rank 0 writes a cache file: call `load_or_compute` inside `dist.main_first()`
so rank 0 computes and writes it first and the other processes read it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alignloop.runs import atomic_path
from alignloop.ui import say

_MODEL_FILES = ("*.safetensors", "*.bin", "config.json", "tokenizer.json", "tokenizer_config.json")


def local_model_files(name: str) -> list[Path]:
    """The weight, config and tokenizer files of a model given as a local folder ([] for zoo names)."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return []
    return sorted({p for pattern in _MODEL_FILES for p in folder.glob(pattern) if p.is_file()})


def model_identity(section: Any) -> dict[str, Any]:
    """What a model's outputs depend on: its recipe section, plus its files' stats for a local folder."""
    files = local_model_files(section.name)
    return {"section": section.model_dump(mode="json"),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def load_or_compute(path: Path, fingerprint: str, compute: Callable[[], dict[str, torch.Tensor]],
                    what: str) -> dict[str, torch.Tensor]:
    """The tensors cached at `path` if their fingerprint matches, else `compute()` (then cached)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    if path.exists():
        try:
            with safe_open(path, framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") == fingerprint:
                    say(f"{what}: cached ({path.name})")
                    return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, ValueError, SafetensorError):
            say(f"[yellow]{what}: {path.name} is unreadable, computing it again[/]")
    tensors = compute()
    from alignloop.train import dist

    if dist.is_main():  # under torchrun rank 0 writes; the others compute only if they found no cache
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"fingerprint": fingerprint})
    return tensors
