"""Tensors a trainer computes once per stage and keeps on disk (reference log-probs, teacher top-k).

Each cache file is a safetensors file whose metadata holds the fingerprint of everything its
values depend on; a file with another fingerprint (or a torn one) is recomputed, never trusted.
Models enter a fingerprint through `alignloop.models.fingerprint.model_fingerprint`, so retraining
the model in a local folder (e.g. an SFT stage that DPO starts from) invalidates the cache even
though the name did not change.

Under torchrun only rank 0 writes a cache file: call `load_or_compute` inside `dist.main_first()`
so rank 0 computes and writes it first and the other processes read it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from alignloop.runs import atomic_path
from alignloop.train import dist
from alignloop.ui import say


def load_or_compute(path: Path, fingerprint: str, compute: Callable[[], dict[str, torch.Tensor]],
                    what: str) -> dict[str, torch.Tensor]:
    """The tensors cached at `path` if their fingerprint matches, else `compute()` (then cached)."""
    if path.exists():
        try:
            with safe_open(path, framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") == fingerprint:
                    say(f"{what}: cached ({path.name})")
                    return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, ValueError, SafetensorError):
            say(f"[yellow]{what}: {path.name} is unreadable, computing it again[/]")
    tensors = compute()
    if dist.is_main():  # under torchrun rank 0 writes; the others compute only if they found no cache
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"fingerprint": fingerprint})
    return tensors
