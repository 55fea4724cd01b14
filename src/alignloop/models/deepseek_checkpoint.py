"""DeepSeek-style checkpoints (`deepseek.py`'s model) in transformers' and DeepSeek's reference layouts.

transformers' `DeepseekV3ForCausalLM`: experts per expert on disk (`mlp.experts.{e}.{gate,up,down}_proj`,
what transformers 5.x writes and DeepSeek publishes) or fused as in memory (`gate_up_proj`,
`down_proj`); both load. DeepSeek's reference (`inference/convert.py` naming): `embed`, `layers.N.attn.*`,
`ffn.experts.N.w1/w2/w3`, `ffn.shared_experts.*`, with its own `config.json` arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import DeepseekV3Config

from alignloop.models.deepseek import DeepseekForCausalLM, _yarn, deepseek_config




def to_hf_state_dict(model: DeepseekForCausalLM, fused: bool = False, mtp: bool = True) -> dict[str, torch.Tensor]:
    """The state dict in transformers' DeepseekV3ForCausalLM naming.

    fused=False: the on-disk layout transformers 5.x writes and DeepSeek publishes
    (`mlp.experts.{e}.{gate,up,down}_proj.weight`); fused=True: its in-memory layout
    (`mlp.experts.gate_up_proj` [E, 2I, D], `down_proj` [E, D, I]) = ours. With mtp, the MTP modules
    are written at model.layers.{L+k} with their copies of embed_tokens and shared_head.head, as in
    DeepSeek's checkpoint (transformers' DeepseekV3ForCausalLM ignores those keys).
    """
    L = model.config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if name.startswith("model.layers.") and int(parts[2]) >= L and not mtp:
            continue
        if not fused and name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            prefix = name.rsplit(".", 1)[0]
            for e, w in enumerate(tensor.unbind(0)):
                if name.endswith("gate_up_proj"):
                    gate, up = w.chunk(2, dim=0)
                    out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                    out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
                else:
                    out[f"{prefix}.{e}.down_proj.weight"] = w.contiguous()
            continue
        out[name] = tensor
    if model.config.tie_word_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = model.lm_head.weight.detach()
    if mtp:
        for k in range(model.config.num_nextn_predict_layers):
            out[f"model.layers.{L + k}.embed_tokens.weight"] = model.model.embed_tokens.weight.detach()
            out[f"model.layers.{L + k}.shared_head.head.weight"] = model.lm_head.weight.detach()
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], config: DeepseekV3Config) -> dict[str, torch.Tensor]:
    """Our state dict from transformers/DeepSeek naming, experts fused or per expert; the MTP copies of
    the embedding and head are dropped (they are the shared ones); FP8 `weight_scale_inv` is refused."""
    if any(k.endswith("weight_scale_inv") for k in state):
        raise ValueError("FP8 checkpoint: dequantize the weights first (weight * weight_scale_inv per 128x128 block)")
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensor in state.items():
        if name.endswith((".embed_tokens.weight", ".shared_head.head.weight")) and name.startswith("model.layers."):
            continue
        parts = name.split(".")
        if ".mlp.experts." in name and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            prefix = ".".join(parts[: i + 1])
            per_expert.setdefault(prefix, {}).setdefault(int(parts[i + 1]), {})[parts[i + 2]] = tensor
            continue
        out[name] = tensor
    for prefix, experts in per_expert.items():
        order = [experts[e] for e in range(len(experts))]
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat((w["gate_proj"], w["up_proj"]), 0) for w in order])
        out[f"{prefix}.down_proj"] = torch.stack([w["down_proj"] for w in order])
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


# Reference (inference/convert.py) names for transformers' module names.
_REFERENCE = {"embed_tokens": "embed", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
              "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
              "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3", "lm_head": "head",
              "self_attn": "attn", "mlp": "ffn", "e_score_correction_bias": "bias"}
_FROM_REFERENCE = {v: k for k, v in _REFERENCE.items()}


def to_reference_state_dict(model: DeepseekForCausalLM, mtp: bool = True) -> dict[str, torch.Tensor]:
    """DeepSeek's reference naming (`inference/convert.py` with one model-parallel rank): embed.weight,
    layers.N.attn.{wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo}, layers.N.ffn.gate.{weight, bias},
    layers.N.ffn.experts.E.w{1,2,3}, layers.N.ffn.shared_experts.w{1,2,3}, norm, head.

    convert.py drops the MTP layer (model.layers.61); with mtp=True we keep it under the same renaming
    at layers.{L+k} (enorm, hnorm, eh_proj, shared_head.norm keep their names), without the embed/head
    copies. Every tensor is a separate contiguous copy (safetensors refuses shared storage)."""
    out = {}
    for name, tensor in to_hf_state_dict(model, fused=False, mtp=mtp).items():
        if name.endswith((".embed_tokens.weight", ".shared_head.head.weight")) and name.startswith("model.layers."):
            continue
        parts = name.removeprefix("model.").split(".")
        out[".".join(_REFERENCE.get(p, p) for p in parts)] = tensor.detach().clone().contiguous()
    return out


def from_reference_state_dict(state: dict[str, torch.Tensor], config: DeepseekV3Config) -> dict[str, torch.Tensor]:
    """Our state dict from reference naming (inverse of `to_reference_state_dict`)."""
    hf = {}
    for name, tensor in state.items():
        parts = [_FROM_REFERENCE.get(p, p) for p in name.split(".")]
        if parts[-1] == "e_score_correction_bias" and parts[-2] != "gate":
            parts[-1] = "bias"  # a Linear's own bias (attention_bias=True), not the router's
        key = ".".join(parts)
        hf[key if key == "lm_head.weight" else "model." + key] = tensor
    return from_hf_state_dict(hf, config)


def load_state(model: DeepseekForCausalLM, state: dict[str, torch.Tensor]) -> None:
    """Load our-layout `state` strictly (a tied lm_head may be absent)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")


def save_hf(model: DeepseekForCausalLM, folder: str | Path) -> Path:
    """config.json + model.safetensors in transformers' on-disk layout (per-expert, MTP at layers.L)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    state = {k: v.detach().clone().contiguous() for k, v in to_hf_state_dict(model).items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _read_safetensors(folder: Path, pattern: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} in {folder}")
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_hf(folder: str | Path, dtype: torch.dtype = torch.float32) -> DeepseekForCausalLM:
    """A model from a transformers/DeepSeek checkpoint folder (config.json + *.safetensors, experts fused
    or per expert). Without MTP weights in the files, the config's MTP depth is set to 0."""
    folder = Path(folder)
    config = DeepseekV3Config.from_pretrained(folder)
    state = _read_safetensors(folder, "*.safetensors")
    L = config.num_hidden_layers
    depth = sum(1 for k in range(config.num_nextn_predict_layers) if f"model.layers.{L + k}.eh_proj.weight" in state)
    config.num_nextn_predict_layers = depth
    model = DeepseekForCausalLM(config)
    load_state(model, from_hf_state_dict(state, config))
    return model.to(dtype)


def reference_args(config: DeepseekV3Config) -> dict[str, Any]:
    """The reference's ModelArgs (inference/configs/*.json) for `config`."""
    p = config.rope_parameters
    yarn = p.get("rope_type") == "yarn"
    return {
        "vocab_size": config.vocab_size, "dim": config.hidden_size, "inter_dim": config.intermediate_size,
        "moe_inter_dim": config.moe_intermediate_size, "n_layers": config.num_hidden_layers,
        "n_dense_layers": config.first_k_dense_replace, "n_heads": config.num_attention_heads,
        "n_routed_experts": config.n_routed_experts, "n_shared_experts": config.n_shared_experts,
        "n_activated_experts": config.num_experts_per_tok, "n_expert_groups": config.n_group or 1,
        "n_limited_groups": config.topk_group or 1, "score_func": "sigmoid",
        "route_scale": config.routed_scaling_factor, "q_lora_rank": config.q_lora_rank or 0,
        "kv_lora_rank": config.kv_lora_rank, "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim, "v_head_dim": config.v_head_dim,
        "rope_theta": p["rope_theta"],
        "original_seq_len": p.get("original_max_position_embeddings", config.max_position_embeddings),
        "max_seq_len": config.max_position_embeddings, "rope_factor": p.get("factor", 1.0) if yarn else 1.0,
        "beta_fast": p.get("beta_fast", 32), "beta_slow": p.get("beta_slow", 1),
        "mscale": p.get("mscale_all_dim", 1.0) if yarn else 1.0,
        # Not ModelArgs fields: what the reference format cannot say but this model needs back.
        "alignloop": {"tie_word_embeddings": config.tie_word_embeddings, "norm_topk_prob": config.norm_topk_prob,
                      "num_nextn_predict_layers": config.num_nextn_predict_layers,
                      "rms_norm_eps": config.rms_norm_eps, "bos_token_id": config.bos_token_id,
                      "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id},
    }


def config_from_reference(args: dict[str, Any]) -> DeepseekV3Config:
    extra = args.get("alignloop", {})
    yarn = args.get("rope_factor", 1.0) > 1 and args.get("max_seq_len", 0) > args.get("original_seq_len", 4096)
    rope = _yarn(args["rope_factor"], args["original_seq_len"], args.get("mscale", 1.0), args.get("mscale", 1.0),
                 args.get("rope_theta", 10000.0)) if yarn else {"rope_type": "default",
                                                                 "rope_theta": args.get("rope_theta", 10000.0)}
    return deepseek_config(
        vocab_size=args["vocab_size"], hidden_size=args["dim"], intermediate_size=args["inter_dim"],
        moe_intermediate_size=args["moe_inter_dim"], num_hidden_layers=args["n_layers"],
        first_k_dense_replace=args["n_dense_layers"], num_attention_heads=args["n_heads"],
        n_routed_experts=args["n_routed_experts"], n_shared_experts=args["n_shared_experts"],
        num_experts_per_tok=args["n_activated_experts"], n_group=args["n_expert_groups"],
        topk_group=args["n_limited_groups"], routed_scaling_factor=args["route_scale"],
        q_lora_rank=args["q_lora_rank"] or None, kv_lora_rank=args["kv_lora_rank"],
        qk_nope_head_dim=args["qk_nope_head_dim"], qk_rope_head_dim=args["qk_rope_head_dim"],
        v_head_dim=args["v_head_dim"], max_position_embeddings=args.get("max_seq_len", 4096), rope_parameters=rope,
        norm_topk_prob=extra.get("norm_topk_prob", True),
        tie_word_embeddings=extra.get("tie_word_embeddings", False),
        num_nextn_predict_layers=extra.get("num_nextn_predict_layers", 0),
        rms_norm_eps=extra.get("rms_norm_eps", 1e-6), bos_token_id=extra.get("bos_token_id"),
        eos_token_id=extra.get("eos_token_id"), pad_token_id=extra.get("pad_token_id"),
    )


def save_reference(model: DeepseekForCausalLM, folder: str | Path) -> Path:
    """config.json (ModelArgs) + model0-mp1.safetensors, as convert.py writes for one rank."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(reference_args(model.config), indent=2))
    save_file(to_reference_state_dict(model), str(folder / "model0-mp1.safetensors"))
    return folder


def load_reference(folder: str | Path, dtype: torch.dtype = torch.float32) -> DeepseekForCausalLM:
    """A model from a reference-layout folder (one model-parallel rank)."""
    folder = Path(folder)
    config = config_from_reference(json.loads((folder / "config.json").read_text()))
    state = _read_safetensors(folder, "model*-mp*.safetensors")
    L = config.num_hidden_layers
    config.num_nextn_predict_layers = sum(1 for k in range(config.num_nextn_predict_layers)
                                          if f"layers.{L + k}.eh_proj.weight" in state)
    model = DeepseekForCausalLM(config)
    load_state(model, from_reference_state_dict(state, config))
    return model.to(dtype)
