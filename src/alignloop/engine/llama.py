"""An inference-only forward for Llama-family models (Llama, Mistral, Qwen2, SmolLM2) over a slot KV cache.

Why not call the transformers model? For generation it spends its time on things a rollout engine
does not need: a cache that grows with torch.cat every step, masks rebuilt for every layer, an
LM head over every prompt position, and rows that keep computing after they have finished. Here
the weights are fused (q|k|v and gate|up are one matmul each), the cache is allocated once, and the
scheduler (`engine.py`) keeps the live rows packed at the front of the cache so that every step
reads plain slices.

Cache layout: `k[layer, slot, kv_head, position, head_dim]` (same for v). Slot i holds row i of
the running batch; rows 0..n-1 are always the live ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignloop.fp8.linear import Fp8Linear
from alignloop.kernels import native

SUPPORTED = {"llama", "mistral", "qwen2"}
# Below this many tokens, a separate forward for the shared prefix costs more than it saves.
MIN_SHARED_PREFIX = 4
# Most attention-score entries (fp32: 4 bytes each) one batched prefill of cached rows may hold.
ATTENTION_SCORES_MAX = 64 << 20


@dataclass(frozen=True)
class Arch:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rms_eps: float
    qkv_bias: bool
    max_positions: int

    @classmethod
    def from_config(cls, config) -> Arch:
        if config.model_type not in SUPPORTED:
            raise ValueError(f"engine supports {sorted(SUPPORTED)}, not '{config.model_type}'")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            rms_eps=config.rms_norm_eps,
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            max_positions=config.max_position_embeddings,
        )


class PackedLinear:
    """y = x @ W.T + b with W pre-packed for the CPU GEMM library.

    Decoding multiplies a few dozen rows by each weight. MKL (fp32) and oneDNN (bf16) first
    re-layout the weight into their blocked format on every call, which at these shapes costs
    as much as the multiply; packing once (and again after each weight update) measured
    1.4x faster at 64 rows and 2.6x at 8. Results are the same kernels' results. Elsewhere
    (GPU, no MKL) this is plain F.linear.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.packed: torch.Tensor | None = None
        self.kind = "plain"
        if weight.device.type == "cpu":
            if weight.dtype == torch.float32 and torch.backends.mkl.is_available():
                self.kind = "mkl"
            elif weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
                self.kind = "onednn"
        self.repack()

    def repack(self) -> None:
        if self.kind == "mkl":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, 64)
        elif self.kind == "onednn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mkl":
            rows = x.numel() // x.shape[-1]
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, rows)
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the prefix all prompts share, leaving each at least one token of its own (the
    last token's logits are what prefill is for)."""
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32: normalise, then scale, transformers' order, so greedy fp32 decoding matches it token for
    # token (torch's rms_norm gives bit-identical fp32 results). bf16: torch's rms_norm with the
    # weight (fp32 statistics inside, one rounding at the end): 37 us against 43 us for
    # normalise-round-scale at 64 rows, one thread.
    if x.dtype == torch.float32:
        return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding; `signed_sin` carries rotate-half's minus sign (-sin, +sin), so the
    rotation is x * cos + swap_halves(x) * signed_sin: one kernel fewer than negating x each call,
    the same values bit for bit."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


class CausalLM:
    """Weights + KV cache + two forwards: `prefill` (new prompts) and `decode` (one token per row)."""

    def __init__(self, model, dtype: torch.dtype, max_slots: int = 64, max_len: int = 4096):
        config = model.config
        self.arch = a = Arch.from_config(config)
        self.dtype = dtype
        self.max_slots = max_slots
        self.max_len = min(max_len, a.max_positions)
        self.q_size = a.heads * a.head_dim
        self.kv_size = a.kv_heads * a.head_dim
        self._alloc_weights()
        self.load_weights(model.state_dict().items())
        # Rotary tables come from the HF module itself so every rope variant (llama3, yarn, ...) the
        # config asks for is honoured without re-implementing it here.
        rotary = model.model.rotary_emb
        inv_freq = rotary.inv_freq.float()
        scale = float(getattr(rotary, "attention_scaling", 1.0))
        positions = torch.arange(self.max_len, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scale).to(dtype)
        sin = emb.sin() * scale
        half = sin.shape[-1] // 2
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype)  # see _rotate
        self._scratch: dict[str, torch.Tensor] = {}
        self.use_native = True  # the hand-written decode kernels where they build (`_native_ops`)
        self.k_cache = self.v_cache = torch.empty(0)
        self._layer_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ensure_cache(max_slots, min(self.max_len, 256))

    def ensure_cache(self, slots: int, length: int) -> None:
        """Grow the cache to at least `slots` x `length` (contents are not kept: call between batches)."""
        a = self.arch
        length = min(length, self.max_len)
        if self.k_cache.numel() and self.k_cache.shape[1] >= slots and self.k_cache.shape[3] >= length:
            return
        # Zeros, not empty: masked-out positions still enter the attention matmul, and a NaN left
        # over in freshly allocated memory would poison the row even with a -inf mask.
        shape = (a.layers, slots, a.kv_heads, length, a.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, dtype=self.dtype)
        # Each layer's cache as a view, made once: indexing them anew cost 60 ops a decode step.
        self._layer_kv = list(zip(self.k_cache.unbind(0), self.v_cache.unbind(0)))

    # ---- weights ---------------------------------------------------------------------------
    def _alloc_weights(self) -> None:
        a, dt = self.arch, self.dtype
        e = lambda *s: torch.empty(*s, dtype=dt)  # noqa: E731
        self.embed = e(a.vocab, a.hidden)
        self.lm_head = e(a.vocab, a.hidden)
        self.final_norm = e(a.hidden)
        self.layers = [
            {
                "ln1": e(a.hidden),
                "ln2": e(a.hidden),
                "qkv": e(self.q_size + 2 * self.kv_size, a.hidden),
                "qkv_bias": e(self.q_size + 2 * self.kv_size) if a.qkv_bias else None,
                "o": e(a.hidden, self.q_size),
                "gate_up": e(2 * a.intermediate, a.hidden),
                "down": e(a.hidden, a.intermediate),
            }
            for _ in range(a.layers)
        ]
        self._tied = True

    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into our fused buffers, in place (the RL trainer calls this every step)."""
        q, kv = self.q_size, self.kv_size
        inter = self.arch.intermediate
        for name, t in named:
            if name in ("model.embed_tokens.weight",):
                self.embed.copy_(t)
                if self._tied:
                    self.lm_head.copy_(t)
                continue
            if name == "lm_head.weight":
                self._tied = False
                self.lm_head.copy_(t)
                continue
            if name == "model.norm.weight":
                self.final_norm.copy_(t)
                continue
            parts = name.split(".")
            if parts[:2] != ["model", "layers"]:
                continue
            layer = self.layers[int(parts[2])]
            rest = ".".join(parts[3:])
            slices = {
                "input_layernorm.weight": ("ln1", None),
                "post_attention_layernorm.weight": ("ln2", None),
                "self_attn.q_proj.weight": ("qkv", (0, q)),
                "self_attn.k_proj.weight": ("qkv", (q, q + kv)),
                "self_attn.v_proj.weight": ("qkv", (q + kv, q + 2 * kv)),
                "self_attn.q_proj.bias": ("qkv_bias", (0, q)),
                "self_attn.k_proj.bias": ("qkv_bias", (q, q + kv)),
                "self_attn.v_proj.bias": ("qkv_bias", (q + kv, q + 2 * kv)),
                "self_attn.o_proj.weight": ("o", None),
                "mlp.gate_proj.weight": ("gate_up", (0, inter)),
                "mlp.up_proj.weight": ("gate_up", (inter, 2 * inter)),
                "mlp.down_proj.weight": ("down", None),
            }
            if rest not in slices:
                continue
            key, span = slices[rest]
            target = layer[key]
            (target if span is None else target[span[0] : span[1]]).copy_(t)
        self._pack()

    def use_fp8(self, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], block: int) -> None:
        """Serve the projections from an FP8 checkpoint's e4m3 weights and block scales (weight-only:
        `fp8.linear.Fp8Linear` dequantises each right before its matmul); their dense buffers are freed.
        Embeddings, norms and the head stay in the engine's dtype."""
        scratch: dict = {}
        names = {"qkv_fn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o_fn": ("self_attn.o_proj",),
                 "gate_up_fn": ("mlp.gate_proj", "mlp.up_proj"), "down_fn": ("mlp.down_proj",)}
        for i, layer in enumerate(self.layers):
            for fn, parts in names.items():
                keys = [f"model.layers.{i}.{p}.weight" for p in parts]
                missing = [k for k in keys if k not in pairs]
                if missing:
                    raise ValueError(f"FP8 checkpoint lacks {missing[0]} (or it is not stored in fp8)")
                bias = layer["qkv_bias"] if fn == "qkv_fn" else None
                layer[fn] = Fp8Linear([pairs[k] for k in keys], self.dtype, scratch, bias, block)
            for dense in ("qkv", "o", "gate_up", "down"):
                layer[dense] = torch.empty(0, dtype=self.dtype)
        self.fp8 = True

    def weight_bytes(self) -> int:
        """Resident bytes of the weights (fp8 projections count their fp8 values and scales)."""
        total = sum(t.numel() * t.element_size() for t in (self.embed, self.final_norm))
        total += 0 if self._tied else self.lm_head.numel() * self.lm_head.element_size()
        for layer in self.layers:
            for key, value in layer.items():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
                elif isinstance(value, Fp8Linear):
                    total += value.nbytes
        return total

    def _pack(self) -> None:
        if getattr(self, "fp8", False):
            raise ValueError("this engine serves FP8 weights: it cannot take new weights in place")
        for layer in self.layers:
            layer["qkv_fn"] = PackedLinear(layer["qkv"], layer["qkv_bias"])
            layer["o_fn"] = PackedLinear(layer["o"])
            layer["gate_up_fn"] = PackedLinear(layer["gate_up"])
            layer["down_fn"] = PackedLinear(layer["down"])
        self.lm_head_fn = PackedLinear(self.lm_head)

    # ---- forward pieces --------------------------------------------------------------------
    def _qkv(self, layer: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        a = self.arch
        qkv = layer["qkv_fn"](x)
        lead = x.shape[:-1]
        # q and k sit side by side in the fused output: rotate them in one go.
        qk = qkv[..., : self.q_size + self.kv_size].view(*lead, a.heads + a.kv_heads, a.head_dim)
        q, k = _rotate(qk, cos, sin).split((a.heads, a.kv_heads), dim=-2)
        return q, k, qkv[..., self.q_size + self.kv_size :].view(*lead, a.kv_heads, a.head_dim)

    def _mlp_and_residual(self, layer: dict, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The residual stream after attention's output projection and the MLP (updates `h` in place)."""
        x = self._add_norm(h, layer["o_fn"](attn), layer["ln2"])
        return h.add_(layer["down_fn"](self._act(layer["gate_up_fn"](x))))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits in the engine's dtype (`sampling.sample` takes its softmax in fp32 from them)."""
        return self.lm_head_fn(_rms_norm(h, self.final_norm, self.arch.rms_eps))

    def _scratch_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reusable work tensor of `shape`: decode needs the same few large temporaries every layer
        of every step, and a fresh multi-megabyte allocation each time costs page faults (copying
        the keys into a reused buffer measured 2x faster than into a new one)."""
        need = math.prod(shape)
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < need or buf.dtype != dtype:
            # Room for the whole cache span of every slot, so it is allocated once per cache size.
            most = self.k_cache.shape[1] * self.k_cache.shape[2] * self.k_cache.shape[3] * self.arch.head_dim
            buf = self._scratch[name] = torch.empty(max(need, most), dtype=dtype)
        return buf[:need].view(shape)

    # ---- prefill -----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], first_slot: int,
                cached: list[tuple[tuple[torch.Tensor, torch.Tensor], int] | None] | None = None) -> torch.Tensor:
        """Fill cache slots first_slot.. with whole prompts; return each prompt's last-token logits.

        Prompts that start alike (one system prompt for every chat; a GRPO group's copies of one
        prompt; earlier turns of a conversation) share their common prefix: it is computed once and
        its keys/values copied to every slot, so only the differing suffixes pay for a forward.

        `cached` (per prompt, from a `prefix_cache.PrefixCache`: ((keys, values), n) or None) gives
        keys/values of a prompt's first n tokens computed earlier: they are copied into the slot
        and only the rest of that prompt is computed.
        """
        if cached is not None and any(c is not None for c in cached):
            starts = []
            for i, c in enumerate(cached):
                if c is None:
                    starts.append(0)
                    continue
                (k, v), n = c
                self.k_cache[:, first_slot + i, :, :n] = k[:, :, :n]
                self.v_cache[:, first_slot + i, :, :n] = v[:, :, :n]
                starts.append(n)
            chunks = [p[s:] for p, s in zip(prompts, starts)]
            width, end = max(len(c) for c in chunks), max(len(p) for p in prompts)
            if len(chunks) > 1 and len(chunks) * self.arch.heads * width * end > ATTENTION_SCORES_MAX:
                # The attention scores of a padded batch are [rows, heads, width, end]: one long
                # uncached prompt beside many short ones would make them gigabytes. Row by row then.
                last = torch.cat([self._extend([c], first_slot + i, [s])
                                  for i, (c, s) in enumerate(zip(chunks, starts))])
            else:
                last = self._extend(chunks, first_slot, starts)
            return self._logits(last)
        shared = _common_prefix(prompts) if len(prompts) > 1 else 0
        if shared >= MIN_SHARED_PREFIX:
            self._extend([prompts[0][:shared]], first_slot, [0])
            rows = slice(first_slot + 1, first_slot + len(prompts))
            self.k_cache[:, rows, :, :shared] = self.k_cache[:, first_slot : first_slot + 1, :, :shared]
            self.v_cache[:, rows, :, :shared] = self.v_cache[:, first_slot : first_slot + 1, :, :shared]
        else:
            shared = 0
        last = self._extend([p[shared:] for p in prompts], first_slot, [shared] * len(prompts))
        return self._logits(last)

    def _extend(self, chunks: list[list[int]], first_slot: int, starts: list[int]) -> torch.Tensor:
        """Append token chunks to rows whose cache already holds `starts[i]` positions; return the
        hidden state of each chunk's last token. Chunks are right-padded into one batch: a pad
        only ever sits after a row's real tokens, so no real query sees it. Row i's query j sits at
        starts[i] + j and sees keys 0..starts[i] + j.

        All rows at one start (a fresh batch, a shared prefix's suffixes): the pads' keys/values are
        written too (decode overwrites them later) and from start 0 attention is plain causal. Rows
        at their own starts (prefix-cache hits beside fresh prompts): only real tokens are written,
        since a pad's position could lie past the cache's end."""
        a = self.arch
        b, width = len(chunks), max(len(c) for c in chunks)
        lengths = [len(c) for c in chunks]
        tokens = torch.zeros(b, width, dtype=torch.long)
        for i, c in enumerate(chunks):
            tokens[i, : len(c)] = torch.tensor(c)
        rows = slice(first_slot, first_slot + b)
        start = starts[0]
        if all(s == start for s in starts):
            end = start + width
            cos, sin = self.cos[start:end, None, :], self.sin[start:end, None, :]
            # Query i (at position start + i) sees every key up to its own position.
            mask = None if start == 0 else torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
            spans = None
        else:
            positions = (torch.tensor(starts)[:, None] + torch.arange(width)[None, :]).clamp_(max=self.max_len - 1)
            cos, sin = self.cos[positions][:, :, None, :], self.sin[positions][:, :, None, :]
            end = max(s + n for s, n in zip(starts, lengths))
            mask = (torch.arange(end)[None, None, :] <= positions[:, :, None])[:, None]   # [b, 1, width, end]
            spans = list(zip(starts, lengths))
        h = F.embedding(tokens, self.embed)
        for li, layer in enumerate(self.layers):
            x = _rms_norm(h, layer["ln1"], a.rms_eps)
            q, k, v = (t.transpose(1, 2) for t in self._qkv(layer, x, cos, sin))  # [b, heads, t, d]
            if spans is None:
                self.k_cache[li, rows, :, start:end] = k
                self.v_cache[li, rows, :, start:end] = v
            else:
                for i, (s0, n) in enumerate(spans):
                    self.k_cache[li, first_slot + i, :, s0 : s0 + n] = k[i, :, :n]
                    self.v_cache[li, first_slot + i, :, s0 : s0 + n] = v[i, :, :n]
            if mask is None:
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                attn = F.scaled_dot_product_attention(
                    q, self.k_cache[li, rows, :, :end], self.v_cache[li, rows, :, :end],
                    attn_mask=mask, enable_gqa=True)
            h = self._mlp_and_residual(layer, h, attn.transpose(1, 2).reshape(b, width, -1))
        return h[torch.arange(b), torch.tensor(lengths) - 1]

    def slot_kv(self, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of slot `slot`'s keys and values for positions 0..n-1 ([layers, kv_heads, n, d] each)."""
        return self.k_cache[:, slot, :, :n].clone(), self.v_cache[:, slot, :, :n].clone()

    # ---- decode ------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token for each live row 0..n-1 at the given positions; returns logits [n, vocab].

        Each layer as `add_norm` (the previous layer's residual add, then the norm), q|k|v, attention,
        `add_norm` again, gate|up, `act` (silu(gate) * up) and down; the last layer's residual add
        comes with the final norm. With the native kernels (`_native_ops`) that is 4 matmuls and 4
        other ops a layer; the torch path runs the same maths op by op."""
        a = self.arch
        n = tokens.shape[0]
        span = int(positions.max()) + 1
        ops = self._native_ops()
        if ops is None:
            cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
            # Where each row's new key/value goes in a layer's cache seen as [slot * kv_head * position, d]:
            # one index_copy_ per layer (0.015 ms) instead of an advanced-index assignment (0.03 ms).
            capacity = self.k_cache.shape[3]
            heads = torch.arange(a.kv_heads)
            where = ((torch.arange(n)[:, None] * a.kv_heads + heads[None, :]) * capacity
                     + positions[:, None]).view(-1)
            # Rows shorter than the longest one must not see stale cache entries beyond their position.
            hidden = torch.arange(span)[None, :] > positions[:, None]
            bias = torch.zeros(n, 1, span).masked_fill_(hidden[:, None, :], float("-inf"))
            add_norm, act = self._add_norm, self._act
        else:
            attention, add_rms_norm, act = ops
            rows_at, scale = positions.to(torch.long).contiguous(), a.head_dim**-0.5

            def add_norm(h, delta, weight):
                return add_rms_norm(h, delta, weight, a.rms_eps)
        h = F.embedding(tokens, self.embed)
        delta = None  # the previous layer's MLP output, not yet added to h
        for li, layer in enumerate(self.layers):
            x = add_norm(h, delta, layer["ln1"])
            k_cache, v_cache = self._layer_kv[li]
            if ops is not None:  # the kernel rotates q and k and writes k and v into the cache itself
                qkv = layer["qkv_fn"](x)
                q = qkv[:, : self.q_size].view(n, a.heads, a.head_dim)
                k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, a.kv_heads, a.head_dim)
                v = qkv[:, self.q_size + self.kv_size :].view(n, a.kv_heads, a.head_dim)
                attn = attention(q, k, v, k_cache, v_cache, rows_at, scale, self.cos, self.sin)
            else:
                q, k, v = self._qkv(layer, x, cos, sin)  # q [n, heads, d], k/v [n, kv_heads, d]
                k_cache.view(-1, a.head_dim).index_copy_(0, where, k.reshape(-1, a.head_dim))
                v_cache.view(-1, a.head_dim).index_copy_(0, where, v.reshape(-1, a.head_dim))
                attn = self._decode_attention(q, k_cache[:n, :, :span], v_cache[:n, :, :span], bias)
            x = add_norm(h, layer["o_fn"](attn), layer["ln2"])
            delta = layer["down_fn"](act(layer["gate_up_fn"](x)))
        return self.lm_head_fn(add_norm(h, delta, self.final_norm))

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """h += delta (in place; none: nothing to add), then RMSNorm(h) * weight."""
        if delta is not None:
            h += delta
        return _rms_norm(h, weight, self.arch.rms_eps)

    @staticmethod
    def _act(gate_up: torch.Tensor) -> torch.Tensor:
        # silu out of place: `gate` is a strided half of gate|up, and the down projection wants a
        # contiguous input.
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    def _native_ops(self):
        """(decode attention, add_rms_norm, silu_mul): the hand-written kernels for a bf16 engine on
        a CPU (`alignloop.kernels`), else None.

        Attention writes the new keys and values and reads each row's cache where it lies, once;
        the torch-ops path below copies every layer's slice out first. At 64 rows x ~100 positions
        (SmolLM2's 3 KV heads, 2 threads, AMX Xeon) attention took 0.28 ms a layer against ~0.65,
        and the 64-prompt rollout ran 1,055 against 957 tokens/s sampled, 1,179 against 1,034 with
        EOS ignored. The kernel also rotates q and k, and the other two fuse the residual adds,
        norms and activation (8 ops a layer instead of ~16, each launched from Python): with them
        1,316-1,323 against 1,015-1,053 tokens/s sampled, 1,366-1,491 against 1,213-1,266 with EOS
        ignored (alternating processes, TCMalloc). Outputs differ from the torch path's by bf16
        rounding only (the kernels round once where torch rounds after each op): both are as close
        to the fp32 engine (tests/test_native_kernels.py).
        """
        if self.dtype != torch.bfloat16 or self.k_cache.device.type != "cpu" or not self.use_native:
            return None
        ops = (native.decode_attention(), native.add_rms_norm(), native.silu_mul())
        return None if any(op is None for op in ops) else ops

    def _decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          bias: torch.Tensor) -> torch.Tensor:
        """Attention of one query per row over that row's cached keys/values: [n, heads * d].

        Two batched matmuls, one matrix pair per (row, kv head), its group of query heads as the
        rows. torch's fused SDPA kernel is slow at this shape: at 64 rows x 160 positions its bf16
        CPU kernel took 10 ms a layer (one thread), these matmuls under 1 ms. Scores come out in
        the cache's dtype and go through softmax in fp32, as in transformers' eager attention.
        """
        a = self.arch
        n, span = keys.shape[0], keys.shape[2]
        group = a.heads // a.kv_heads
        rows = n * a.kv_heads
        q = q.reshape(rows, group, a.head_dim)
        if keys.dtype == torch.bfloat16:
            # The bf16 batched matmul is fast only on contiguous operands, and the cache slice is
            # strided (its rows are `capacity` long). Copying first, into a reused buffer, measured
            # 0.35 ms against 0.9 ms for the keys at 64 rows x 104 positions, 0.33 against 0.45 ms for
            # the values.
            keys = self._scratch_buffer("keys", keys.shape, keys.dtype).copy_(keys)
            values = self._scratch_buffer("values", values.shape, values.dtype).copy_(values)
        scores = torch.bmm(q, keys.view(rows, span, a.head_dim).transpose(1, 2),
                           out=self._scratch_buffer("scores", (rows, group, span), q.dtype))
        # One fp32 kernel for scale + mask (bias is fp32), then softmax in fp32.
        weights = torch.softmax(torch.add(bias, scores.view(n, a.heads, span), alpha=a.head_dim**-0.5), dim=-1)
        out = torch.bmm(weights.to(values.dtype).view(rows, group, span), values.view(rows, span, a.head_dim))
        return out.view(n, a.heads * a.head_dim)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a row's cache to another slot (used to keep live rows packed at the front)."""
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]
