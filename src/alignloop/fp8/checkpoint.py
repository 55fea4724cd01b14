"""Checkpoints in the fine-grained FP8 layout, and back.

The layout DeepSeek publishes V3 in and transformers (`FineGrainedFP8Config`), vLLM and SGLang load:
every quantised Linear weight is stored as e4m3 (`...proj.weight`, dtype F8_E4M3) beside its fp32
block scales (`...proj.weight_scale_inv`, [ceil(N/128), ceil(K/128)], the dequantisation multiplier);
config.json carries

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "modules_to_not_convert": [...]}

What stays in its own dtype, as in DeepSeek's release: embeddings, the output head, norms, the MoE
router (its weight and balancing bias: gating runs in fp32) and any 1-D tensor. Everything else
that is a 2-D projection weight in a decoder layer (attention, dense and shared FFNs, each routed
expert, the MTP projection) is quantised. DeepSeek-style models are written in transformers'
per-expert layout (`mlp.experts.{e}.gate_proj.weight`), so each expert is its own 2-D weight.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alignloop.fp8.blockwise import BLOCK, FP8, dequantize_weight, quantize_weight
from alignloop.models.deepseek import DeepseekForCausalLM
from alignloop.models.deepseek_checkpoint import load_hf, to_hf_state_dict

SCALE_SUFFIX = "_scale_inv"
# A decoder layer's projection weight: attention (q/k/v/o, MLA's q_a/q_b/kv_a.../kv_b), FFN
# gate/up/down (dense, shared, per expert), MTP's eh_proj.
_QUANTISED = re.compile(r"^model\.layers\.\d+\..*proj[a-z_]*\.weight$")


@dataclass(frozen=True)
class ExportReport:
    folder: Path
    quantised: int         # tensors stored as fp8
    kept: int              # tensors kept in their dtype
    block: int             # square block size of the scales
    bytes_fp8: int         # bytes of the exported weights (fp8 + scales + the rest)
    bytes_source: int      # bytes of the same weights in the source dtype
    bytes_bf16: int        # ... and in bf16

    def line(self) -> str:
        return (f"fp8 export: {self.quantised} tensors in e4m3 ({self.block}x{self.block} blocks), {self.kept} kept; weights "
                f"{self.bytes_fp8 / 2**20:.2f} MiB vs {self.bytes_bf16 / 2**20:.2f} MiB in bf16 "
                f"({self.bytes_fp8 / self.bytes_bf16:.2f}x) -> {self.folder}")


def is_quantised_name(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and bool(_QUANTISED.match(name)) and ".mlp.gate." not in name


def hf_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in transformers' on-disk naming, config dict) of a zoo model."""
    config = model.config.to_dict()
    if isinstance(model, DeepseekForCausalLM):
        state = to_hf_state_dict(model)
        config["architectures"] = ["DeepseekV3ForCausalLM"]
    else:
        state = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach() for k, v in state.items()}, config


def pick_block(state: dict[str, torch.Tensor]) -> int:
    """128 (DeepSeek's blocks), or the largest power of two below it that divides every quantised
    weight's dimensions. transformers' CPU dequantisation refuses partial blocks: SmolLM2's 576-wide
    hidden size (4.5 x 128) loads with 64 x 64 blocks and fails with 128 x 128."""
    return largest_block({d for n, t in state.items() if is_quantised_name(n, t) for d in t.shape})


def largest_block(dims: set[int]) -> int:
    block = BLOCK
    while block > 1 and any(d % block for d in dims):
        block //= 2
    return block


def quantise_state(state: dict[str, torch.Tensor], pow2: bool = False, block: int = BLOCK) -> dict[str, torch.Tensor]:
    """Projection weights as (e4m3, fp32 block scales); the router's bias in fp32 (its 1e-3 steps
    vanish in bf16 once |bias| > 0.25); every other float tensor in bf16, as DeepSeek ships them."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_quantised_name(name, tensor):
            q, s = quantize_weight(tensor, block=block, pow2=pow2)
            out[name], out[name + SCALE_SUFFIX] = q, s
        elif tensor.is_floating_point() and not name.endswith("e_score_correction_bias"):
            out[name] = tensor.to(torch.bfloat16).contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def quantization_config(pow2: bool = False, block: int = BLOCK) -> dict[str, Any]:
    cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
           "weight_block_size": [block, block], "modules_to_not_convert": ["lm_head"]}
    if pow2:
        cfg["scale_fmt"] = "ue8m0"
    return cfg


def export_fp8(model: torch.nn.Module, tokenizer: Any, folder: str | Path, pow2: bool = False,
               block: int | None = None) -> ExportReport:
    """Write `model` as an FP8 checkpoint folder (config.json, model.safetensors, tokenizer); atomic.
    `block`: the square block size (default: `pick_block`)."""
    folder = Path(folder)
    state, config = hf_state(model)
    block = block or pick_block(state)
    quantised = quantise_state({k: v.contiguous().clone() for k, v in state.items()}, pow2, block)
    config["quantization_config"] = quantization_config(pow2, block)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(quantised, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_fp8 = sum(1 for v in quantised.values() if v.dtype == FP8)
    return ExportReport(folder, n_fp8, len(state) - n_fp8, block,
                        bytes_fp8=sum(v.numel() * v.element_size() for v in quantised.values()),
                        bytes_source=sum(v.numel() * v.element_size() for v in state.values()),
                        bytes_bf16=sum(v.numel() * 2 for v in state.values()))


def read_fp8(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(fp8 weights with their scales as {name: (q, s)}, the other tensors, config) of an FP8 folder."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config") or {}
    block = list(quant.get("weight_block_size") or [])
    if quant.get("quant_method") != "fp8" or len(block) != 2 or block[0] != block[1]:
        raise ValueError(f"{folder}: not a fine-grained FP8 checkpoint with square blocks (quantization_config {quant})")
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    pairs = {name: (t, state[name + SCALE_SUFFIX]) for name, t in state.items() if t.dtype == FP8}
    missing = [n for n, t in state.items() if t.dtype == FP8 and n + SCALE_SUFFIX not in state]
    if missing:
        raise ValueError(f"{folder}: fp8 weights without {SCALE_SUFFIX}: {missing[:3]}")
    rest = {n: t for n, t in state.items() if n not in pairs and not n.endswith(SCALE_SUFFIX)}
    return pairs, rest, config


def block_of(config: dict[str, Any]) -> int:
    return int(config["quantization_config"]["weight_block_size"][0])


def dequantised_state(folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole state dict of an FP8 folder with every fp8 weight dequantised to `dtype`."""
    pairs, rest, config = read_fp8(folder)
    block = block_of(config)
    state = {n: dequantize_weight(q, s, dtype, block) for n, (q, s) in pairs.items()}
    state.update({n: t.to(dtype) if t.is_floating_point() and t.dim() > 1 else t for n, t in rest.items()})
    return state, config


def import_fp8(folder: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """An FP8 folder back to a plain checkpoint folder in `dtype` (loads anywhere, trains)."""
    folder, out = Path(folder), Path(out)
    state, config = dequantised_state(folder, dtype)
    config.pop("quantization_config", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
    for f in folder.iterdir():  # the tokenizer and generation config travel unchanged
        if f.name not in ("model.safetensors", "config.json") and f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)
    if "DeepseekV3ForCausalLM" in (config.get("architectures") or []):
        # Ours, not transformers' class: re-save through our model so the zoo loads it with MTP.
        model = load_hf(out, dtype)
        (out / "model.safetensors").unlink()
        model.save_pretrained(out)
    return out
