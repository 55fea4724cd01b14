"""A DeepSeek-V3-style causal LM in one file: MLA, DeepSeekMoE with aux-loss-free balancing, MTP.

Read top to bottom: config helpers, RMSNorm, (YaRN) rotary embedding, MLA, the MoE pieces (router,
experts, shared experts), the decoder block, the MTP block, the model, then training helpers
(balance loss, router-bias update, load statistics, the loss); checkpoint layouts are in
`deepseek_checkpoint.py`.

Contracts
- The config is transformers' `DeepseekV3Config` (the boundary type: what `config.json` holds).
- Parameter names are those of transformers' `DeepseekV3ForCausalLM` *in memory* (experts fused as
  `mlp.experts.gate_up_proj` [E, 2I, D] and `mlp.experts.down_proj` [E, D, I]), so a state dict moves
  between the two models unchanged, and the MTP modules sit after the main stack at
  `model.layers.{num_hidden_layers + k}` as in DeepSeek's published checkpoint.
- With the same weights the logits equal transformers' (fp32, max |delta| 3e-6 to 1e-5), prefill and cached
  decode. Where transformers and DeepSeek's reference `inference/model.py` disagree we follow
  transformers, and say so where it happens (group score, rope layout, RMSNorm casting).
- `forward(input_ids, attention_mask, position_ids, ...)` behaves like a transformers causal LM:
  `.logits`, `get_decoder()(...).last_hidden_state`, `get_output_embeddings()`, and the plain
  attention path dispatches through transformers' attention registry (`config._attn_implementation`),
  so the trainers' dense masks and per-document attention work unchanged.

Dimensions below: B batch, T new tokens, S tokens in the cache (past + new), H heads, D hidden,
r = kv_lora_rank, dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim, E routed experts,
K experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV3Config, GenerationMixin, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def deepseek_config(**kw: Any) -> DeepseekV3Config:
    """A `DeepseekV3Config` with the fields a small model must not inherit from the 671B defaults.

    `DeepseekV3Config()` defaults to num_key_value_heads=128 whatever num_attention_heads is, so it is
    pinned to the head count here (MLA has no GQA: every head gets its own K/V from the latent).
    """
    kw.setdefault("num_key_value_heads", kw.get("num_attention_heads", 128))
    config = DeepseekV3Config(**kw)
    check_config(config)
    return config


def check_config(config: DeepseekV3Config) -> None:
    """Raise ValueError on shapes this implementation cannot run."""
    E, G = config.n_routed_experts, config.n_group or 1
    if E % G:
        raise ValueError(f"n_routed_experts={E} is not divisible by n_group={G}")
    if E // G < 2:
        # A group's score is the sum of its two best experts (see Router.select).
        raise ValueError(f"each expert group needs >= 2 experts, got {E // G}")
    if not 1 <= (config.topk_group or 1) <= G:
        raise ValueError(f"topk_group={config.topk_group} must be in [1, n_group={G}]")
    if config.num_experts_per_tok > (config.topk_group or 1) * (E // G):
        raise ValueError("num_experts_per_tok exceeds the experts in the kept groups")
    if config.qk_rope_head_dim % 2:
        raise ValueError("qk_rope_head_dim must be even (rope rotates pairs)")
    if getattr(config, "scoring_func", "sigmoid") not in ("sigmoid",):
        raise ValueError("only sigmoid routing (V3) is implemented")


def _yarn(factor: float, original: int, mscale: float, mscale_all_dim: float, theta: float = 10000.0) -> dict:
    return {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32, "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


def deepseek_v3_671b_config() -> DeepseekV3Config:
    """DeepSeek-V3 / R1 shapes (671B total, ~37B active; 61 layers, 3 dense, 256 experts top-8 in 8 groups
    limited to 4, one shared expert, q/kv LoRA 1536/512, YaRN factor 40 from 4096 to 163840)."""
    return deepseek_config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=163840, rope_parameters=_yarn(40.0, 4096, 1.0, 1.0), num_nextn_predict_layers=1,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )


def deepseek_v2_lite_config() -> DeepseekV3Config:
    """DeepSeek-V2-Lite shapes (16B total, 2.4B active; 27 layers, 1 dense, 64 experts top-6, two shared,
    no q-LoRA). V2 routes with a softmax gate and no group limit; this model routes with V3's sigmoid gate,
    so the shapes are V2-Lite's but real V2-Lite weights would not give V2-Lite's outputs."""
    return deepseek_config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        max_position_embeddings=163840, rope_parameters=_yarn(40.0, 4096, 0.707, 0.707), num_nextn_predict_layers=0,
        bos_token_id=100000, eos_token_id=100001, tie_word_embeddings=False,
    )


# Tiny CPU presets (random init, SmolLM2's 49152-token vocabulary, tied embeddings). The vocabulary
# dominates at this size: 49152 x 96 = 4.7M of tiny's 6.2M parameters (5.2M active per token),
# 49152 x 256 = 12.6M of small's 28.5M (17.5M active). Each has q-LoRA, 16 experts in 4 groups of
# which 2 are eligible per token (so group-limited routing is exercised), top-2 routing, a dense
# first layer, a shared expert and one MTP module.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-deepseek": dict(
        hidden_size=96, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, num_nextn_predict_layers=1),
    "small-deepseek": dict(
        hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=8,
        first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, num_nextn_predict_layers=1),
}


def preset_config(name: str, vocab_size: int, **kw: Any) -> DeepseekV3Config:
    """The config of a tiny preset; `kw` (token ids, ...) override."""
    fields = dict(PRESETS[name], vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=True,
                  norm_topk_prob=True)
    fields.update(kw)
    return deepseek_config(**fields)


# ---------------------------------------------------------------------------------------------
# Norm and rotary embedding
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistic in fp32.

    Like transformers (Llama style) the normalised x is cast back to the input dtype *before* the
    weight multiplies it; the reference multiplies in the input dtype via F.rms_norm. The two agree in
    fp32 and differ in the last bf16 bit.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _mscale(factor: float, m: float = 1.0) -> float:
    # YaRN's attention temperature: 0.1 m ln(s) + 1, e.g. 1.369 for s = 40, m = 1.
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def rope_frequencies(config: DeepseekV3Config) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dr/2] fp32, cos/sin multiplier) for plain RoPE or YaRN.

    YaRN blends per frequency: wavelengths shorter than the original context (>= beta_fast = 32
    rotations over it) keep their frequency, those longer than it (<= beta_slow = 1 rotation) are
    divided by the factor (40: 4096 -> 163840 tokens), with a linear ramp between. The ramp ends are
    floored/ceiled like transformers' default `truncate=True`.
    """
    p = config.rope_parameters
    dim, base = config.qk_rope_head_dim, p["rope_theta"]
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if p.get("rope_type", "default") == "default":
        return freqs, 1.0
    if p["rope_type"] != "yarn":
        raise ValueError(f"rope_type {p['rope_type']!r} is not supported (default or yarn)")
    factor, original = p["factor"], p["original_max_position_embeddings"]
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def dim_for(rotations: float) -> float:  # the rotary dim that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / (high - low)).clamp(0, 1)
    freqs = freqs / factor * ramp + freqs * (1 - ramp)
    # cos/sin carry mscale/mscale_all_dim (1.0 for V3 and V2-Lite, whose two are equal); the rest of
    # the temperature is in the softmax scale (`softmax_scale`).
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)
    return freqs, float(attention_factor)


def softmax_scale(config: DeepseekV3Config) -> float:
    """(dn + dr)^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN: 192^-0.5 * 1.874 for V3."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    p = config.rope_parameters
    if p.get("rope_type", "default") != "default" and p.get("mscale_all_dim"):
        scale *= _mscale(p["factor"], p["mscale_all_dim"]) ** 2
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of x [..., dr] by cos/sin [..., dr/2] (broadcast over the middle dims).

    interleaved (DeepSeek's layout, `rope_interleave=True`): the pairs are (x0,x1), (x2,x3), ... and
    the output keeps that layout, as the reference's complex multiply does. transformers returns
    evens-then-odds instead; that permutes q and k alike, so every q.k (and every logit) is unchanged,
    but cached rotary keys are laid out differently between the two implementations.
    Not interleaved: the pairs are (x_i, x_{i+dr/2}) (checkpoints whose weights were pre-permuted).
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---------------------------------------------------------------------------------------------
# Multi-head latent attention
# ---------------------------------------------------------------------------------------------


class LatentCache:
    """The MLA decode cache: per layer, the normed KV latent [B, S, r] and the roped shared key [B, S, dr].

    That is r + dr = 576 numbers per token per layer for V3, against H (dn + dr + dv) = 128 x 320 =
    40960 for the expanded per-head K and V (71x less).
    """

    def __init__(self) -> None:
        self.latent: list[torch.Tensor | None] = []
        self.rope_key: list[torch.Tensor | None] = []

    def get_seq_length(self, layer: int = 0) -> int:
        return 0 if layer >= len(self.latent) or self.latent[layer] is None else self.latent[layer].shape[1]

    def update(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' entries for `layer`; return everything cached for it."""
        while len(self.latent) <= layer:
            self.latent.append(None)
            self.rope_key.append(None)
        if self.latent[layer] is not None:
            latent = torch.cat((self.latent[layer], latent), dim=1)
            rope_key = torch.cat((self.rope_key[layer], rope_key), dim=1)
        self.latent[layer], self.rope_key[layer] = latent, rope_key
        return latent, rope_key


class MLA(nn.Module):
    """Multi-head latent attention (V3 paper section 2.1.1).

    q:  q_proj(x), or q_b_proj(q_a_layernorm(q_a_proj(x))) with q-LoRA     -> per head [dn | dr]
    kv: kv_a_proj_with_mqa(x) -> [c (r) | k_rope (dr)]; c is normed; k_rope is ONE key shared by all heads
    kv_b_proj (r -> H (dn + dv)) up-projects c into each head's key part (W_UK) and value (W_UV).

    Two ways to compute the same attention:
    - plain (training, prefill): expand c to per-head K and V and run the registered attention function;
    - absorbed (decode): fold W_UK into the query and W_UV into the output, so scores and values are
      taken against the cached latent directly and K/V are never materialised: per new token,
      H (r + dr) work per cached token instead of expanding S x H x (dn + dv).
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_heads = config.num_attention_heads
        self.dn, self.dr, self.dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.r = config.kv_lora_rank
        bias = config.attention_bias
        D, H = config.hidden_size, self.n_heads
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * (self.dn + self.dr), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * (self.dn + self.dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.r + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.r)
        self.kv_b_proj = nn.Linear(self.r, H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(H * self.dv, D, bias=bias)
        self.scaling = softmax_scale(config)
        # Read by transformers' attention functions.
        self.is_causal = True
        self.num_key_value_groups = 1

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Any,
                cache: LatentCache | None, absorb: bool) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]. `mask`: see `DeepseekModel._masks` (plain: the form the registered
        attention function takes; absorbed: an additive float [B, 1, T, S] or None = no masking)."""
        B, T, _ = x.shape
        H, dn, dr = self.n_heads, self.dn, self.dr
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, H, dn + dr).split([dn, dr], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.r, dr], dim=-1)
        latent = self.kv_a_layernorm(latent)
        interleaved = self.config.rope_interleave
        q_rope = apply_rope(q_rope, cos[:, :, None], sin[:, :, None], interleaved)
        k_rope = apply_rope(k_rope, cos, sin, interleaved)
        if cache is not None:
            latent, k_rope = cache.update(self.layer_idx, latent, k_rope)  # now [B, S, r], [B, S, dr]
        if absorb and type(self.kv_b_proj) is not nn.Linear:
            # An adapter wraps kv_b_proj (peft LoRA): the absorbed path reads its weight directly and
            # would skip the adapter, so expand through the module instead (same result, more work).
            absorb, mask = False, _as_plain_mask(mask, self.config._attn_implementation)
        out = self._absorbed(q_nope, q_rope, latent, k_rope, mask) if absorb else \
            self._plain(q_nope, q_rope, latent, k_rope, mask)
        return self.o_proj(out.reshape(B, T, H * self.dv))

    def _plain(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        B, S, H = latent.shape[0], latent.shape[1], self.n_heads
        k_nope, v = self.kv_b_proj(latent).view(B, S, H, self.dn + self.dv).split([self.dn, self.dv], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # [B, H, T, dn + dr]
        k = torch.cat((k_nope, k_rope[:, :, None].expand(B, S, H, self.dr)), dim=-1).transpose(1, 2)
        impl = self.config._attn_implementation
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(impl, _eager_attention)
        pad = (self.dn + self.dr - self.dv) if impl == "sdpa" else 0
        if pad > 0:
            # torch's fused (flash) CPU kernel wants one head size for q, k and v; with MLA's wider
            # q/k it falls back to the math path (materialised scores, mask fix-ups). Zero columns on v
            # cost a little in P @ V and are sliced off. tiny-deepseek, 8 x 256 tokens, 1 thread:
            # attention forward + backward 28 -> 20 ms per layer.
            v = F.pad(v, (0, pad))
        out, _ = attend(self, q, k, v.transpose(1, 2), mask, dropout=0.0, scaling=self.scaling)
        return out[..., : self.dv] if pad > 0 else out  # [B, T, H, dv]

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        w = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.r)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # each head's query in latent space
        scores = (torch.einsum("bthr,bsr->bhts", q_latent, latent) +
                  torch.einsum("bthd,bsd->bhts", q_rope, k_rope)) * self.scaling
        if mask is not None:
            scores = scores + mask
        probs = scores.float().softmax(dim=-1).to(q_nope.dtype)
        out_latent = torch.einsum("bhts,bsr->bthr", probs, latent)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv)


def _as_plain_mask(mask: torch.Tensor | None, impl: str) -> torch.Tensor | None:
    """An absorbed-path mask (additive float [B, 1, T, S] or None) in the plain path's form: sdpa takes
    a bool mask (True = attend), eager and most others the additive one."""
    if mask is None or impl != "sdpa":
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling + mask) v, for when no attention function is registered: [B, T, H, dv]."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = scores.float().softmax(dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


# ---------------------------------------------------------------------------------------------
# DeepSeekMoE
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers, and the shared experts (width n_shared x moe_inter)."""

    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid gate with a selection-only bias and group-limited top-k (V3 eqs 12-16).

    `weight` [E, D] is kept and applied in fp32. `e_score_correction_bias` [E] (fp32 buffer, no gradient)
    is moved by `update_router_bias`; it changes *which* experts are picked, never their weights.
    """

    # Buffers that training changes: training checkpoints keep them beside the parameters.
    trained_buffers = ("e_score_correction_bias",)

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.zeros(E, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group or 1, config.topk_group or 1
        self.norm_topk_prob, self.scale = config.norm_topk_prob, config.routed_scaling_factor

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` must not reach the gate: V3 keeps gating in fp32, and a bf16 bias (8-bit
        # mantissa) would round gamma = 1e-3 steps away entirely once |bias| > 0.25.
        super()._apply(fn, recurse)
        self.weight.data = self.weight.data.float()
        self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities s = sigmoid(x W^T) in fp32: [N, D] -> [N, E]."""
        return torch.sigmoid(F.linear(x.float(), self.weight.float()))

    @torch.no_grad()
    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The K chosen experts per token [N, K] from scores [N, E] (selection has no gradient).

        Groups are ranked by the sum of their two best biased scores and only `topk_group` of the
        `n_group` groups stay eligible (V3: 4 of 8, i.e. a token reaches at most 4 nodes).
        transformers applies this top-2-sum rule always; DeepSeek's reference uses it only when the gate
        has a bias (which it creates only for dim 7168) and ranks groups by their max otherwise. With
        n_group > 1 the two differ (reference without bias vs transformers: logits off by up to ~5 in
        the research measurements); we match transformers (the bias always exists here, as in V3).
        """
        biased = scores + self.e_score_correction_bias
        N, E = biased.shape
        if self.n_group > 1:
            grouped = biased.view(N, self.n_group, E // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
            keep = group_score.topk(self.topk_group, dim=-1).indices
            allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~allowed[..., None], float("-inf")).view(N, E)
        return biased.topk(self.top_k, dim=-1).indices

    def weights(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Gating weights [N, K] from the *unbiased* scores of the chosen experts: normalised over the
        K (the +1e-20 as transformers), times routed_scaling_factor (2.5 in V3)."""
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scale


class Experts(nn.Module):
    """E SwiGLU experts as two fused tensors (transformers' in-memory layout):
    gate_up_proj [E, 2I, D] (gate rows first) and down_proj [E, D, I]."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        E, D, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, inter))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_k w[n, k] * expert_{idx[n, k]}(x[n]) for x [N, D]; every token is served (no capacity,
        no dropping).

        The N*K (token, expert) pairs are sorted by expert, gathered once, cut into one contiguous
        chunk per expert with `split`, and scattered back with one index_add. Indexing x or the
        weights per expert instead makes each index's backward zero-fill a full-size gradient
        (x's [N, D], and the whole [E, 2I, D] tensor per expert): measured on tiny-deepseek, 4 x 128
        tokens, that was ~25% of a training step.
        """
        E, K = self.gate_up_proj.shape[0], idx.shape[1]
        pairs = idx.flatten()
        order = pairs.argsort(stable=True)
        token = order // K
        counts = torch.bincount(pairs, minlength=E).tolist()
        chunks = x[token].split(counts)
        outs = []
        for chunk, gate_up, down in zip(chunks, self.gate_up_proj.unbind(0), self.down_proj.unbind(0)):
            if chunk.shape[0]:
                gate, up = F.linear(chunk, gate_up).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(gate) * up, down))
        y = torch.cat(outs) * w.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class MoE(nn.Module):
    """Routed experts + shared experts: y = sum_k w_k Expert_k(x) + Shared(x).

    In training (module.training and grad enabled) the routed token counts accumulate in `load` [E]
    until `update_router_bias` consumes them: the bias update sees the load of the whole step,
    summed over micro-batches (and over ranks, where torch.distributed is initialised).
    """

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        self.register_buffer("load", torch.zeros(config.n_routed_experts), persistent=False)
        # [B, T] bool set by a trainer around a forward (`alignloop.train.moe_balance.real_tokens`):
        # only these tokens count in `load`. Packed rows end in padding (up to ~30% of a row at 256
        # tokens), which would otherwise push the bias toward whatever experts padding picks.
        self.real_tokens: torch.Tensor | None = None

    def real_mask(self, B: int, T: int) -> torch.Tensor | None:
        """`real_tokens` where it describes this [B, T] input; None (every token counts) otherwise,
        e.g. for an MTP block, which sees T - k rows of the batch the mask was set for."""
        mask = self.real_tokens
        return mask if mask is not None and mask.shape == (B, T) else None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.load.data = self.load.data.float()  # token counts: bf16 is exact only up to 256
        return self

    def forward(self, x: torch.Tensor, forced: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (y [B, T, D], chosen experts [B, T, K], scores [B, T, E] fp32).

        `forced` [B, T, K]: use these experts instead of the router's choice (routing replay); the
        weights still come from the current scores, so the router keeps its gradient. A token whose
        forced row is negative (nothing was recorded for it: padding, a sequence's last token) keeps
        the router's own choice.
        """
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        scores = self.gate.scores(flat)
        idx = self.gate.select(scores)
        if forced is not None:
            forced = forced.reshape(B * T, -1).to(device=idx.device, dtype=idx.dtype)
            idx = torch.where(forced[:, :1] >= 0, forced, idx)
        w = self.gate.weights(scores, idx)
        if self.training and torch.is_grad_enabled():
            real = self.real_mask(B, T)
            counted = idx if real is None else idx[real.reshape(B * T)]
            self.load += torch.bincount(counted.flatten(), minlength=self.load.numel()).to(self.load.dtype)
        y = self.experts(flat, idx, w).view(B, T, D) + self.shared_experts(x)
        return y, idx.view(B, T, -1), scores.view(B, T, -1)


# ---------------------------------------------------------------------------------------------
# Blocks and the model
# ---------------------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + MLA(norm(x)); out = h + FFN(norm(h)); FFN is dense for the first
    `first_k_dense_replace` layers (3 in V3), MoE after."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int, moe: bool | None = None) -> None:
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        self.is_moe = layer_idx >= config.first_k_dense_replace if moe is None else moe
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, absorb, forced=None):
        """-> (out, chosen experts or None, scores or None)."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, absorb)
        if not self.is_moe:
            return h + self.mlp(self.post_attention_layernorm(h)), None, None
        y, idx, scores = self.mlp(self.post_attention_layernorm(h), forced)
        return h + y, idx, scores


class SharedHead(nn.Module):
    """The MTP module's output norm; the projection itself is the model's lm_head (shared)."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """Multi-token prediction module k (V3 section 2.2), a full MoE block behind a projection:

        h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])     (embedding FIRST, as the checkpoint)
        h^k  = Block(h');   logits^k = lm_head(shared_head.norm(h^k))  -> predicts t_{i+k+1}

    The paper writes [h; emb]; DeepSeek's checkpoint, transformers' MtpLayer, vLLM and torchtitan all
    concatenate the embedding first, and the weights only work that way. h^0 is the main model's last
    block output *before* the final norm (transformers feeds `hidden_states[-1]`). Checkpoint names:
    model.layers.{L + k - 1}.{enorm, hnorm, eh_proj, self_attn, mlp, input_layernorm,
    post_attention_layernorm, shared_head.norm} (+ copies of embed_tokens and shared_head.head).
    """

    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx, moe=True)  # MTP blocks are always MoE in V3
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(config)


@dataclass
class DeepseekModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None   # after the final norm [B, T, D]
    pre_norm_hidden: torch.Tensor | None = None     # before it: the MTP input
    cache: LatentCache | None = None
    routing: list[torch.Tensor] | None = None       # per MoE layer, chosen experts [B, T, K]
    router_scores: list[torch.Tensor] | None = None  # per MoE layer, sigmoid scores [B, T, E] fp32


@dataclass
class DeepseekCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: LatentCache | None = None
    routing: list[torch.Tensor] | None = None
    router_scores: list[torch.Tensor] | None = None
    mtp_logits: list[torch.Tensor] | None = None  # depth k: [B, T - k, V], position i predicts t_{i+k+1}


class DeepseekPreTrainedModel(PreTrainedModel):
    config_class = DeepseekV3Config
    config: DeepseekV3Config
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer", "MTPLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        # One expert implementation here (Experts.forward); a config that transformers' own model
        # marked "grouped_mm" must not make construction fail.
        return "eager"

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear/Embedding normal(0, initializer_range), RMSNorm ones
        std = self.config.initializer_range
        with torch.no_grad():
            if isinstance(module, Router):
                module.weight.normal_(0.0, std)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                module.gate_up_proj.normal_(0.0, std)
                module.down_proj.normal_(0.0, std)
            elif isinstance(module, MoE):
                module.load.zero_()


class DeepseekModel(DeepseekPreTrainedModel):
    """Embedding, the main stack, the final norm; `layers[L:]` hold the MTP modules (run by the LM)."""

    def __init__(self, config: DeepseekV3Config) -> None:
        check_config(config)
        super().__init__(config)
        L = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(L)] +
                                    [MTPLayer(config, L + k) for k in range(config.num_nextn_predict_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._freqs: dict[torch.device, tuple[torch.Tensor, float]] = {}
        self.post_init()

    @property
    def main_layers(self) -> list[DecoderLayer]:
        return list(self.layers[: self.config.num_hidden_layers])

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.layers[self.config.num_hidden_layers:])

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, dr/2] for position ids [B, T] (angles in fp32, then cast like transformers)."""
        if position_ids.device not in self._freqs:
            freqs, factor = rope_frequencies(self.config)
            self._freqs[position_ids.device] = (freqs.to(position_ids.device), factor)
        freqs, factor = self._freqs[position_ids.device]
        angles = position_ids[..., None].float() * freqs
        return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)

    def _masks(self, attention_mask: torch.Tensor | None, B: int, T: int, past: int, device, dtype,
               absorb: bool) -> Any:
        """The mask in the form the attention path takes.

        A 4D `attention_mask` is the caller's (a trainer's dense block mask, or document ids for a
        registered per-document attention function) and goes to the plain path untouched; the absorbed
        path needs it additive. Otherwise build causal-with-offset & padding ([B, past + T] 2D mask,
        1 = real token). Every query may see itself, so a padding query never has an empty row (NaN);
        its output is meaningless and should be ignored.
        """
        impl = self.config._attn_implementation
        if attention_mask is not None and attention_mask.dim() == 4:
            if absorb and attention_mask.dtype == torch.bool:
                return torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(
                    ~attention_mask, torch.finfo(dtype).min)
            return attention_mask
        if attention_mask is None and past == 0 and impl == "sdpa" and not absorb:
            return None  # sdpa runs is_causal without a mask
        if attention_mask is None and T == 1 and absorb:
            return None  # one new token sees the whole cache
        S = past + T
        q_pos = torch.arange(past, S, device=device)
        allowed = torch.arange(S, device=device)[None, :] <= q_pos[:, None]  # [T, S]
        allowed = allowed[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :S].bool()
            allowed = allowed | (torch.arange(S, device=device)[None, :] == q_pos[:, None])[None, None]
        if impl == "sdpa" and not absorb:
            return allowed
        return torch.zeros((B, 1, T, S), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: LatentCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                routing: list[torch.Tensor] | None = None, output_routing: bool = False,
                absorb: bool | None = None, past_key_values: LatentCache | None = None,
                **kwargs: Any) -> DeepseekModelOutput:
        """Run the main stack (`past_key_values` is the pre-5.x name of `cache`, as in transformers).

        routing: forced experts per MoE layer ([B, T, K] each, in layer order) = routing replay.
        output_routing: also return the chosen experts and router scores per MoE layer.
        absorb: MLA path; None = absorbed when decoding against a non-empty cache, plain otherwise.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = LatentCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        if absorb is None:
            absorb = past > 0
        cos, sin = self.rope(position_ids, x.dtype)
        mask = self._masks(attention_mask, B, T, past, x.device, x.dtype, absorb)
        chosen, scores = [], []
        forced = iter(routing) if routing is not None else None
        for layer in self.main_layers:
            x, idx, s = layer(x, cos, sin, mask, cache, absorb,
                              next(forced) if forced is not None and layer.is_moe else None)
            if idx is not None:
                chosen.append(idx)
                scores.append(s)
        return DeepseekModelOutput(
            last_hidden_state=self.norm(x), pre_norm_hidden=x, cache=cache,
            routing=chosen if output_routing else None, router_scores=scores if output_routing else None)


class DeepseekForCausalLM(DeepseekPreTrainedModel, GenerationMixin):
    """The causal LM: `model` (DeepseekModel) + `lm_head`, and the MTP modules' forward.

    GenerationMixin because peft's causal-LM wrapper expects its hooks (LoRA needs it); decoding is
    our engine's job (`alignloop.engine.deepseek`), which keeps the latent cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__(config)
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_decoder(self) -> DeepseekModel:
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: LatentCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, routing: list[torch.Tensor] | None = None,
                output_routing: bool = False, mtp: bool = False, absorb: bool | None = None,
                past_key_values: LatentCache | None = None, **kwargs: Any) -> DeepseekCausalLMOutput:
        """Logits [B, T, V] (+ `loss`: mean next-token CE over labels != -100, as transformers).

        mtp=True also runs the MTP modules on this (cache-free) sequence: `mtp_logits[k-1]` [B, T-k, V].
        """
        cache = cache if cache is not None else past_key_values
        out = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                         routing=routing, output_routing=output_routing or mtp, absorb=absorb)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        mtp_logits = None
        if mtp:
            if input_ids is None or cache is not None:
                raise ValueError("mtp=True needs input_ids and no cache")
            mtp_logits = self.mtp_forward(input_ids, out.pre_norm_hidden, attention_mask, position_ids,
                                          out.routing, out.router_scores)
        return DeepseekCausalLMOutput(
            loss=loss, logits=logits, cache=out.cache,
            routing=out.routing if output_routing or mtp else None,
            router_scores=out.router_scores if output_routing or mtp else None, mtp_logits=mtp_logits)

    def mtp_forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None, routing_out: list | None = None,
                    scores_out: list | None = None) -> list[torch.Tensor]:
        """Logits of each MTP depth k = 1..D: [B, T-k, V]; row i combines h^{k-1}_i with Emb(t_{i+k}).

        Masks: causal (+ a 2D padding mask), or a packed row's document ids (see `mtp_hidden`).
        Positions are those of the embedded token (i + k), as transformers' MTP drafting does.
        The MTP blocks' routing/scores are appended to `routing_out`/`scores_out` when given.
        """
        return [self.lm_head(h) for h in self.mtp_hidden(input_ids, hidden, attention_mask, position_ids,
                                                          routing_out=routing_out, scores_out=scores_out)]

    def mtp_hidden(self, input_ids: torch.Tensor, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None, doc_ids: torch.Tensor | None = None,
                   routing_out: list | None = None, scores_out: list | None = None) -> list[torch.Tensor]:
        """Each MTP depth's normed output [B, T-k, D] (the lm_head's input), for a fused head loss.

        Packed rows (`doc_ids` [B, T], -1 on padding, with the block-causal 4D `attention_mask` the main
        stack used): MTP row i is position i + k's token on top of position i's hidden state, so it is
        real only when both lie in one document; a row that straddles a boundary (the first k tokens of
        each document) is masked out of every other row's attention, as it would not exist unpacked.
        """
        B, T = input_ids.shape
        if attention_mask is not None and attention_mask.dim() == 4 and doc_ids is None:
            raise ValueError("a 4D (packed) mask needs doc_ids: which MTP rows lie within one document")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        out = []
        h = hidden
        for k, layer in enumerate(self.model.mtp_layers, start=1):
            n = T - k
            if n <= 0:
                break
            emb = self.model.embed_tokens(input_ids[:, k:])
            x = layer.eh_proj(torch.cat((layer.enorm(emb), layer.hnorm(h[:, :n])), dim=-1))
            cos, sin = self.model.rope(position_ids[:, k:], x.dtype)
            if doc_ids is not None:
                inside = (doc_ids[:, :n] == doc_ids[:, k:]) & (doc_ids[:, k:] >= 0)  # [B, n]
                allowed = attention_mask[:, :, k:, k:] & inside[:, None, None, :]
                mask = allowed | torch.eye(n, dtype=torch.bool, device=x.device)  # no empty row (NaN)
            else:
                pad = attention_mask[:, k:] if attention_mask is not None else None
                mask = self.model._masks(pad, B, n, 0, x.device, x.dtype, absorb=False)
            h, idx, s = layer(x, cos, sin, mask, None, False)
            if routing_out is not None:
                routing_out.append(idx)
            if scores_out is not None:
                scores_out.append(s)
            out.append(layer.shared_head.norm(h))
        return out


# ---------------------------------------------------------------------------------------------
# Training helpers: balance loss, router-bias update, load statistics, the loss
# ---------------------------------------------------------------------------------------------


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE block in `model` (through peft/DDP wrappers), main stack first, then MTP."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def sequence_balance_loss(scores: list[torch.Tensor], routing: list[torch.Tensor], top_k: int,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """V3's complementary sequence-wise balance loss, summed over layers, averaged over sequences
    (multiply by alpha, 1e-4 in V3):

        L_i = sum_e f_e P_e,  f_e = E / (K T) * #{t : e in topK(t)},  P_e = 1/T sum_t s_{e,t} / sum_j s_{j,t}

    T = tokens of the sequence (the row, with `mask` [B, T]: its 1-tokens). Perfect balance gives
    sum_e f_e P_e = 1 (f = 1, sum P = 1); all tokens on the same K experts gives up to E/K.
    Gradient flows through P only (f is a count).
    """
    total = scores[0].new_zeros(())
    for s, idx in zip(scores, routing):
        B, T, E = s.shape
        m = s.new_ones(B, T) if mask is None else mask.to(s.dtype)
        n = m.sum(dim=1).clamp(min=1)  # [B]
        hits = torch.zeros(B, T, E, dtype=s.dtype, device=s.device).scatter_(2, idx, 1.0)
        f = (hits * m[..., None]).sum(dim=1) * E / (top_k * n[:, None])
        p = (s / s.sum(dim=-1, keepdim=True) * m[..., None]).sum(dim=1) / n[:, None]
        total = total + (f.detach() * p).sum(dim=-1).mean()
    return total


def load_stats(load: torch.Tensor) -> dict[str, float]:
    """Balance of one layer's token counts [E]: MaxVio = (max - mean) / mean (0 = perfectly balanced,
    E/K - 1 = every token on the same K experts), and the least/most loaded expert's share of routed slots."""
    total = float(load.sum())
    if total == 0:
        return {"maxvio": 0.0, "min_share": 0.0, "max_share": 0.0}
    mean = total / load.numel()
    return {"maxvio": (float(load.max()) - mean) / mean, "min_share": float(load.min()) / total,
            "max_share": float(load.max()) / total}


def router_load_stats(model: nn.Module) -> dict[str, float]:
    """Loggable load statistics of the counts accumulated since the last bias update: per MoE layer
    `moe{i}/maxvio`, `moe{i}/min_share`, `moe{i}/max_share`, and `moe/maxvio` (mean over layers)."""
    out: dict[str, float] = {}
    layers = moe_layers(model)
    for i, layer in enumerate(layers):
        for key, value in load_stats(layer.load).items():
            out[f"moe{i}/{key}"] = value
    if layers:
        out["moe/maxvio"] = sum(out[f"moe{i}/maxvio"] for i in range(len(layers))) / len(layers)
    return out


@torch.no_grad()
def update_router_bias(model: nn.Module, gamma: float = 1e-3, all_reduce: bool = True) -> dict[str, float]:
    """Aux-loss-free balancing, once after each optimizer step: b_e += gamma * sign(mean load - load_e).

    The load is the step's token count per expert (summed over ranks when torch.distributed is
    initialised), which this consumes (resets). gamma = 0.001 for V3's first 14.3T tokens, then 0:
    gamma = 0 freezes the bias and only reports the statistics. Returns `router_load_stats` of the step.
    """
    layers = moe_layers(model)
    if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
        for layer in layers:
            torch.distributed.all_reduce(layer.load)
    stats = router_load_stats(model)
    for layer in layers:
        if gamma:
            bias = layer.gate.e_score_correction_bias
            bias += gamma * torch.sign(layer.load.mean() - layer.load).to(bias.dtype)
        layer.load.zero_()
    return stats


# Rows of the vocabulary projection per chunk of `HeadCrossEntropy`: 256 x 49152 fp32 logits are 50 MB,
# against 400 MB for a whole 8 x 256 batch. Measured on tiny-deepseek (8 x 256 tokens, 1 thread): the
# full-logits route (log_softmax, its backward, the zero-filled nll gradient) spent 2.3 s of a 6.7 s
# step outside the head's three matmuls; chunked, that part is ~0.3 s.
_HEAD_ROWS = 256
# exp(60) * 49152 ~ 6e30 fits fp32 (max 3.4e38) with room for a vocabulary 10^7 times larger, and a
# row whose logits all lie in [-60, 60] cannot sum to zero.
_EXP_SAFE = 60.0


class HeadCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight^T, targets[i]) over targets != -100, without [N, V] logits.

    Forward walks the rows in chunks: logits of the chunk (fp32), log-sum-exp, the loss, and, when a
    gradient is needed, the chunk's gradient right away: d logits = softmax - onehot, which gives
    d hidden = d logits @ weight and adds d logits^T @ hidden to d weight. Backward only scales those
    by the incoming gradient (the loss is a scalar). Same numbers as
    `cross_entropy(linear(hidden, weight).float(), targets, reduction="sum")` up to summation order.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = hidden.dtype
        acc = torch.promote_types(dtype, torch.float32)  # the loss and softmax: fp32 at least
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        valid = targets != -100
        safe = targets.clamp(min=0)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            # |logit| <= |h| * max_j |w_j| (Cauchy-Schwarz). Where that bound is under _EXP_SAFE for a
            # whole chunk, exp needs no max subtracted (no overflow even summed over the vocabulary, no
            # underflow of the sum), which saves two of the four passes over the chunk's logits.
            w_norm = w.detach().float().norm(dim=-1).max()
            h_norm = hidden.detach().float().norm(dim=-1)
            # One logits buffer for every chunk: a fresh 50 MB tensor per chunk is a fresh mmap from the
            # allocator, and the kernel faults in and zeroes its pages each time (~1/3 of this loop's
            # system time on tiny-deepseek's 49k vocabulary).
            buffer = hidden.new_empty(min(_HEAD_ROWS, hidden.shape[0]), w.shape[0]) if dtype == acc else None
            for start in range(0, hidden.shape[0], _HEAD_ROWS):
                rows = slice(start, start + _HEAD_ROWS)
                h, t, v = hidden[rows], safe[rows], valid[rows].to(acc)
                if buffer is not None:
                    logits = torch.mm(h, w.t(), out=buffer[: h.shape[0]])
                else:
                    logits = F.linear(h, w).to(acc)
                picked = logits.gather(1, t[:, None]).squeeze(1)
                # One exp pass, in place (torch.logsumexp takes its own, and softmax would take another):
                # exp(logits [- max]) -> its row sum gives the log-sum-exp.
                if float(h_norm[rows].max()) * float(w_norm) < _EXP_SAFE:
                    top = logits.new_zeros(logits.shape[0], 1)
                    e = logits.exp_()
                else:
                    top = logits.amax(dim=-1, keepdim=True)
                    e = logits.sub_(top).exp_()
                norm = e.sum(dim=-1)
                total += ((top.squeeze(1) + norm.log() - picked) * v).sum()
                if not (want_h or want_w):
                    continue
                # d logits = v * (e / norm - onehot(t)). Every pass over the [rows, V] block costs ~4 ms
                # per 256 rows here (50 MB), so the row scale v / norm and the one-hot go to the small
                # [rows, D] side of each product instead: (e @ w) * s - v * w[t], and
                # e^T (h * s) - onehot^T (v * h). Measured on tiny-deepseek (8 x 256 tokens, 1 thread):
                # the head's time outside its three matmuls went from ~0.33 s to ~0.2 s.
                scale = (v / norm)[:, None]
                e = e.to(dtype)
                if want_h:
                    grad_h[rows] = (e @ w) * scale.to(dtype) - w[t] * v[:, None].to(dtype)
                if want_w:
                    h_acc = h.to(acc)
                    grad_w.addmm_(e.t().to(acc), h_acc * scale)
                    grad_w.index_add_(0, t, h_acc * -v[:, None])
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.want, ctx.weight_dtype = (want_h, want_w), weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * grad.to(saved[0].dtype) if ctx.want[0] else None
        grad_w = (saved.pop(0) * grad).to(ctx.weight_dtype) if ctx.want[1] else None
        return grad_h, grad_w, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, shift: int = 1
                       ) -> torch.Tensor:
    """Mean CE of position i's logits (hidden [B, T, D] @ weight^T) against labels[i + shift] (-100 ignored)."""
    target = F.pad(labels[:, shift:], (0, shift), value=-100)
    n = (target != -100).sum().clamp(min=1)
    return HeadCrossEntropy.apply(hidden.flatten(0, 1), weight, target.flatten()) / n


def training_loss(model: DeepseekForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None, mtp_weight: float = 0.3, balance_alpha: float = 0.0
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Pretraining-style loss: CE + mtp_weight / D * sum_k CE_k + balance_alpha * L_bal.

    labels [B, T] (default: input_ids, -100 where attention_mask is 0); position i's logits predict
    labels[i + 1], MTP depth k's predict labels[i + k + 1]. V3: mtp_weight 0.3 for the first 10T
    tokens then 0.1; balance_alpha 1e-4. Returns (loss, {"ce", "mtp_ce", "balance"}).
    """
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    use_mtp = mtp_weight > 0 and model.config.num_nextn_predict_layers > 0
    # The main stack, then the head fused with its loss (no [B, T, V] logits: `HeadCrossEntropy`).
    out = model.model(input_ids, attention_mask, output_routing=balance_alpha > 0 or use_mtp)
    mtp_logits = model.mtp_forward(input_ids, out.pre_norm_hidden, attention_mask, None, out.routing,
                                   out.router_scores) if use_mtp else None

    def shifted_ce(logits: torch.Tensor, shift: int) -> torch.Tensor:
        # Shift the labels (pad with -100), not the logits: a slice of the [B, T, V] logits would
        # zero-fill a full-size gradient in backward (~100 MB per call at 4 x 128 x 49152).
        target = F.pad(labels[:, shift:], (0, shift - (labels.shape[1] - logits.shape[1])), value=-100)
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)

    ce = head_cross_entropy(out.last_hidden_state, model.lm_head.weight, labels)
    loss, parts = ce, {"ce": float(ce.detach())}
    if mtp_logits:
        mtp_ce = []
        for k, lg in enumerate(mtp_logits, start=1):
            if input_ids.shape[1] - k - 1 > 0:  # depth k's last row predicts a token past the end
                mtp_ce.append(shifted_ce(lg, k + 1))
        if mtp_ce:
            mtp_loss = torch.stack(mtp_ce).mean()
            loss = loss + mtp_weight * mtp_loss
            parts["mtp_ce"] = float(mtp_loss.detach())
    if balance_alpha > 0 and out.router_scores:
        # Main-stack layers only: the MTP rows are one token shorter and are balanced by the bias.
        L = len([m for m in model.model.main_layers if m.is_moe])
        bal = sequence_balance_loss(out.router_scores[:L], out.routing[:L], model.config.num_experts_per_tok,
                                    attention_mask)
        loss = loss + balance_alpha * bal
        parts["balance"] = float(bal.detach())
    return loss, parts
