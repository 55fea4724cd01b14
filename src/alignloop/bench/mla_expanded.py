"""The `bench mla-decode` peer: DeepSeek decoding with an expanded per-head K/V cache.

This is how MLA runs when it is treated as ordinary multi-head attention (transformers'
DeepseekV3 caches this way): each new token's latent is up-projected once by kv_b_proj into H
per-head keys [dn + dr] (the shared rope key copied into every head) and values [dv], which are
cached; a decode step attends over them like any MHA. Per token and layer that is
H (dn + dr + dv) cached numbers (small-deepseek: 8 x 80 = 640) against the latent cache's r + dr
(80), and per cached token H (dn + dr + dv) multiply-adds of attention (640) against the
absorbed path's H (2r + dr) (1152): the expanded cache reads 8x more bytes, the absorbed path does
1.8x more arithmetic, at these shapes.

Everything but the attention is the model's modules (projections, norms, rope, MoE) and the
scheduling is `DeepseekLM`'s (slots, prefill, decode), so the two sides differ in the cache and
attention only.
"""

from __future__ import annotations

import torch

from alignloop.engine.deepseek import DeepseekLM
from alignloop.models.deepseek import apply_rope


class ExpandedKVLM(DeepseekLM):
    """`DeepseekLM` with expanded per-head K/V cache: k [layer, slot, head, position, dn + dr],
    v [layer, slot, head, position, dv]. Main stack only (no MTP), no routing record."""

    def ensure_cache(self, slots: int, length: int) -> None:
        c = self.config
        length = min(length, self.max_len) + 1
        if getattr(self, "k", None) is not None and self.k.shape[1] >= slots and self.k.shape[3] >= length:
            return
        H, L = c.num_attention_heads, c.num_hidden_layers
        self.k = torch.zeros(L, slots, H, length, c.qk_nope_head_dim + c.qk_rope_head_dim, dtype=self.dtype)
        self.v = torch.zeros(L, slots, H, length, c.v_head_dim, dtype=self.dtype)
        self.latent = self.rope_key = torch.zeros(0, slots, length, 1)  # read for sizes only

    def cache_bytes_per_token(self) -> int:
        return self.k.shape[0] * self.k.shape[2] * (self.k.shape[-1] + self.v.shape[-1]) * self.k.element_size()

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def _run(self, layers, x, positions, index, first_slot, absorb):
        b, T = index.shape
        span = int(index.max()) + 1
        cos, sin = self.model.model.rope(positions, x.dtype)
        allowed = torch.arange(span)[None, None, :] <= index[:, :, None]  # [b, T, span]
        bias = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))[:, None]  # [b, 1, T, span]
        rows = torch.arange(first_slot, first_slot + b)
        chosen = []
        for li, layer in enumerate(layers):
            attn = self._attention(li, layer.self_attn, layer.input_layernorm(x), cos, sin, rows, index, span, bias)
            h = x + attn
            if layer.is_moe:
                y, idx, _ = layer.mlp(layer.post_attention_layernorm(h))
                chosen.append(idx)
            else:
                y = layer.mlp(layer.post_attention_layernorm(h))
            x = h + y
        return x, chosen

    def _attention(self, li, mla, x, cos, sin, rows, index, span, bias) -> torch.Tensor:
        b, T, _ = x.shape
        H, dn, dr, dv = mla.n_heads, mla.dn, mla.dr, mla.dv
        q = mla.q_proj(x) if mla.config.q_lora_rank is None else mla.q_b_proj(mla.q_a_layernorm(mla.q_a_proj(x)))
        q_nope, q_rope = q.view(b, T, H, dn + dr).split([dn, dr], dim=-1)
        latent, k_rope = mla.kv_a_proj_with_mqa(x).split([mla.r, dr], dim=-1)
        interleaved = mla.config.rope_interleave
        q = torch.cat((q_nope, apply_rope(q_rope, cos[:, :, None], sin[:, :, None], interleaved)), dim=-1)
        k_rope = apply_rope(k_rope, cos, sin, interleaved)
        k_nope, v = mla.kv_b_proj(mla.kv_a_layernorm(latent)).view(b, T, H, dn + dv).split([dn, dv], dim=-1)
        k = torch.cat((k_nope, k_rope[:, :, None].expand(b, T, H, dr)), dim=-1)
        # New entries at [row, head, index]: advanced indexing over (rows, positions), heads kept.
        self.k[li][rows[:, None], :, index] = k
        self.v[li][rows[:, None], :, index] = v
        live = slice(int(rows[0]), int(rows[-1]) + 1)  # a view, not a gather
        keys, values = self.k[li, live, :, :span], self.v[li, live, :, :span]  # [b, H, span, d]
        scores = torch.matmul(q.transpose(1, 2), keys.transpose(2, 3)).float() * mla.scaling + bias
        out = torch.matmul(scores.softmax(-1).to(values.dtype), values)  # [b, H, T, dv]
        return mla.o_proj(out.transpose(1, 2).reshape(b, T, H * dv))
