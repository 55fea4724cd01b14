"""What a model is, for a cache key or a stage's inputs: its name, settings and local files.

A zoo or hub name stands for fixed weights, so the name alone identifies it. A local folder (a
checkpoint such as runs/<run>/sft/model) can be retrained in place under the same name, so its
files count too: the stage inputs hash their bytes (`local_model_files`), and the cheaper cache
keys of stage-internal caches use their names, sizes and modification times (`model_fingerprint`).
Either way retraining the model in that folder invalidates what was computed from the old one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignloop.sections import ModelSection

_MODEL_FILES = ("*.safetensors", "*.bin", "config.json", "tokenizer.json", "tokenizer_config.json")


def local_model_files(name: str) -> list[Path]:
    """The weight, config and tokenizer files of a model given as a local folder ([] for zoo names)."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return []
    return sorted({p for pattern in _MODEL_FILES for p in folder.glob(pattern) if p.is_file()})


def model_fingerprint(model: str | ModelSection) -> dict[str, Any]:
    """What a model's outputs depend on: a name, or a model section (its dtype and seed count too),
    plus the names, sizes and modification times of its files when it is a local folder."""
    name = model if isinstance(model, str) else model.name
    settings = {"name": name} if isinstance(model, str) else model.model_dump(mode="json")
    files = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in local_model_files(name)]
    return {"model": settings, "files": files}
