"""The engine's model runner for `alignloop.models.deepseek` (DeepSeek-V3 style: MLA, DeepSeekMoE, MTP).

Same contract as `engine.llama.CausalLM` (what `engine.Engine` calls): `max_len`, `ensure_cache`,
`load_weights`, `prefill(prompts, first_slot) -> last-token logits`, `decode(tokens, positions) ->
logits`, `move_slot`. Rows 0..n-1 of the running batch live in cache slots 0..n-1.

The cache is MLA's latent cache, per slot: for every token and layer the normed compressed KV latent
[kv_lora_rank] and the one roped key shared by all heads [qk_rope_head_dim], never the expanded
per-head K/V. For DeepSeek-V3 that is 512 + 64 = 576 numbers per token per layer against
128 x (192 + 128) = 40960 expanded (71x less); tiny-deepseek 32 + 16 = 48 against 4 x 48 = 192 (4x).

The maths is the model file's own: every forward runs the model's `DecoderLayer`s (MLA, the router,
the experts, the shared expert) with `_SlotCache` standing in for its `LatentCache`: MLA hands it the
new tokens' latent and rope key, it writes them into the slots at their positions and hands back
each row's cached span. Prefill runs MLA's plain path (expand the latent to per-head K/V, the
registered attention function), decode the absorbed path (W_UK folded into the query, W_UV into the
output, scores taken against the latent directly). So greedy tokens equal the model's own cached
generation, and the router's choices are the model's.

Routing record (`record_routing=True`): after each `prefill`/`decode`/`forward`, `routing` holds
per row an int tensor [n_moe_layers, tokens_fed, K] of the experts the main stack chose for every
token fed in that call, so the engine can hand each completion the routing of its prompt and all
generated tokens but the last (which is never fed: nothing is conditioned on it).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from alignloop.engine.llama import MIN_SHARED_PREFIX, _common_prefix
from alignloop.models.deepseek import DeepseekForCausalLM, _as_plain_mask

SUPPORTED = {"deepseek_v3"}


class _SlotCache:
    """What MLA's forward takes as `cache` for one call: `update(layer, latent, rope_key)` writes the
    new tokens' entries at their cache index in their slot and returns the rows' cached [0, span)."""

    def __init__(self, lm: DeepseekLM, first_slot: int, index: torch.Tensor, span: int):
        b = index.shape[0]
        capacity = lm.latent.shape[2]
        slots = torch.arange(first_slot, first_slot + b)[:, None]
        # Flat row of each new token in a layer's cache seen as [slot * capacity, dim]: one index_copy_
        # per layer and tensor.
        self.where = (slots * capacity + index).reshape(-1)
        self.lm, self.rows, self.span = lm, slice(first_slot, first_slot + b), span

    def update(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor):
        cached_latent, cached_key = self.lm.latent[layer], self.lm.rope_key[layer]
        cached_latent.view(-1, latent.shape[-1]).index_copy_(0, self.where, latent.reshape(-1, latent.shape[-1]))
        cached_key.view(-1, rope_key.shape[-1]).index_copy_(0, self.where, rope_key.reshape(-1, rope_key.shape[-1]))
        return cached_latent[self.rows, : self.span], cached_key[self.rows, : self.span]


class DeepseekLM:
    """A private copy of the model in the engine's dtype + the slot latent cache + the forwards."""

    def __init__(self, model: DeepseekForCausalLM, dtype: torch.dtype, max_slots: int = 64, max_len: int = 4096,
                 record_routing: bool = False):
        config = model.config
        if config.model_type not in SUPPORTED:
            raise ValueError(f"DeepseekLM runs {sorted(SUPPORTED)}, not '{config.model_type}'")
        # A copy: the caller's model (often the policy being trained) keeps its dtype and mode, and
        # `load_weights` is the only way new weights get in, as with the Llama runner.
        self.model = copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
        self.config, self.dtype = config, dtype
        self.max_slots = max_slots
        self.max_len = min(max_len, config.max_position_embeddings)
        self.record_routing = record_routing
        self.routing: list[torch.Tensor] | None = None
        self.layers = self.model.model.main_layers
        self.mtp_layers = self.model.model.mtp_layers
        self.latent = self.rope_key = torch.empty(0)
        self.ensure_cache(max_slots, min(self.max_len, 256))

    # ---- cache -----------------------------------------------------------------------------------
    def ensure_cache(self, slots: int, length: int) -> None:
        """Grow the cache to at least `slots` x `length` (contents are not kept: call between batches).

        One position more than asked: MTP verification writes the draft's entry one past the row's
        last token. Layers: the main stack, then one per MTP module (its own attention cache)."""
        c = self.config
        length = min(length, self.max_len) + 1
        if self.latent.numel() and self.latent.shape[1] >= slots and self.latent.shape[2] >= length:
            return
        n = c.num_hidden_layers + len(self.mtp_layers)
        # Zeros, not empty: masked-out positions still enter the score matmul, and a NaN left in
        # fresh memory would poison a row even under a -inf mask.
        self.latent = torch.zeros(n, slots, length, c.kv_lora_rank, dtype=self.dtype)
        self.rope_key = torch.zeros(n, slots, length, c.qk_rope_head_dim, dtype=self.dtype)

    def cache_bytes_per_token(self) -> int:
        """Bytes one token occupies in the cache, all layers (main stack + MTP)."""
        return (self.latent.shape[0] * (self.latent.shape[-1] + self.rope_key.shape[-1]) *
                self.latent.element_size())

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a row's cache to another slot (the scheduler keeps live rows packed at the front)."""
        self.latent[:, dst, :length] = self.latent[:, src, :length]
        self.rope_key[:, dst, :length] = self.rope_key[:, src, :length]

    # ---- weights ---------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy tensors named as the model's state dict (= transformers' in-memory names) in place;
        names the model does not have (e.g. per-expert on-disk names) are refused."""
        state = self.model.state_dict(keep_vars=True)
        for name, t in named:
            if name not in state:
                raise KeyError(f"DeepseekLM.load_weights: unknown tensor {name!r}")
            state[name].data.copy_(t)

    # ---- forwards --------------------------------------------------------------------------------
    def _mask(self, index: torch.Tensor, span: int, absorb: bool) -> torch.Tensor:
        """Query t of row b sees cache entries 0..index[b, t]: causal, and blind to stale entries of a
        shorter row and to a right-padded prompt's pads (which only ever sit after its real tokens).
        Additive [b, 1, T, span] for the absorbed path, in the plain path's form otherwise."""
        allowed = torch.arange(span)[None, None, :] <= index[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        mask = mask[:, None]
        return mask if absorb else _as_plain_mask(mask, self.config._attn_implementation)

    def _run(self, layers: list[nn.Module], x: torch.Tensor, positions: torch.Tensor, index: torch.Tensor,
             first_slot: int, absorb: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [b, T, D] through `layers` with cache entries at `index` [b, T] and rope `positions` [b, T];
        returns (pre-norm hidden [b, T, D], chosen experts per MoE layer [b, T, K])."""
        span = int(index.max()) + 1
        cos, sin = self.model.model.rope(positions, x.dtype)
        mask = self._mask(index, span, absorb)
        cache = _SlotCache(self, first_slot, index, span)
        chosen = []
        for layer in layers:
            x, idx, _ = layer(x, cos, sin, mask, cache, absorb)
            if idx is not None:
                chosen.append(idx)
        return x, chosen

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, first_slot: int = 0,
                absorb: bool = True) -> torch.Tensor:
        """Feed tokens [b, T] at positions [b, T] (rows first_slot.., cache already holding every
        earlier position); returns the main stack's pre-norm hidden [b, T, D] (`logits` of it)."""
        h, chosen = self._run(self.layers, self.model.model.embed_tokens(tokens), positions, positions,
                              first_slot, absorb)
        self._keep_routing(chosen, [tokens.shape[1]] * tokens.shape[0])
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of pre-norm hidden states."""
        return self.model.lm_head(self.model.model.norm(hidden))

    def _keep_routing(self, chosen: list[torch.Tensor], lengths: list[int]) -> None:
        if not self.record_routing:
            return
        stacked = torch.stack(chosen, dim=1) if chosen else torch.zeros(len(lengths), 0, max(lengths), 0)
        self.routing = [stacked[i, :, :n].to(torch.int16).clone() for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def prefill_hidden(self, prompts: list[list[int]], first_slot: int, start: int = 0) -> torch.Tensor:
        """Append token chunks to slots first_slot.. whose cache holds `start` positions (0: whole
        prompts), MLA's plain path; returns the pre-norm hidden [b, longest, D] of every new position
        (right-padded rows: entries past a row's length are pads; no real query sees a pad, and the
        pad's cache entry is overwritten by the row's next token)."""
        b, width = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros(b, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        positions = (start + torch.arange(width))[None].expand(b, width)
        h, chosen = self._run(self.layers, self.model.model.embed_tokens(tokens), positions, positions,
                              first_slot, absorb=False)
        self._keep_routing(chosen, [len(p) for p in prompts])
        return h

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], first_slot: int) -> torch.Tensor:
        """Fill cache slots first_slot.. with whole prompts; return each prompt's last-token logits.

        Prompts that start alike (a GRPO group's copies of one prompt, a shared system prompt) share
        their common prefix as in the Llama runner: computed once, its latents copied to every slot
        (r + dr numbers per token and layer, so the copy is cheap), only the suffixes run after it."""
        shared = _common_prefix(prompts) if len(prompts) > 1 else 0
        prefix_routing = None
        if shared >= MIN_SHARED_PREFIX:
            self.prefill_hidden([prompts[0][:shared]], first_slot)
            prefix_routing = self.routing
            rows = slice(first_slot + 1, first_slot + len(prompts))
            self.latent[:, rows, :shared] = self.latent[:, first_slot: first_slot + 1, :shared]
            self.rope_key[:, rows, :shared] = self.rope_key[:, first_slot: first_slot + 1, :shared]
        else:
            shared = 0
        h = self.prefill_hidden([p[shared:] for p in prompts], first_slot, start=shared)
        if prefix_routing is not None:
            self.routing = [torch.cat((prefix_routing[0], r), dim=1) for r in self.routing]
        last = h[torch.arange(len(prompts)), torch.tensor([len(p) - shared for p in prompts]) - 1]
        return self.logits(last)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token for each live row 0..n-1 at the given positions (absorbed MLA); logits [n, vocab]."""
        h = self.forward(tokens[:, None], positions[:, None], 0, absorb=True)
        return self.logits(h[:, 0])

    @torch.inference_mode()
    def mtp(self, hidden: torch.Tensor, next_tokens: torch.Tensor, index: torch.Tensor,
            first_slot: int = 0) -> torch.Tensor:
        """MTP module 1 over rows whose main-stack pre-norm `hidden` [b, T, D] sits at cache index
        `index` [b, T], each combined with the embedding of the token after it, `next_tokens` [b, T];
        returns its logits [b, T, vocab] (row i predicts the token two after position i).

        Its attention cache is the extra layer after the main stack, entry i for row i; the rope
        position is that of the embedded token (i + 1), as in the model's `mtp_forward`. The first
        call for a slot must start at index 0 (the MTP module attends over all earlier rows)."""
        layer = self.mtp_layers[0]
        emb = self.model.model.embed_tokens(next_tokens)
        x = layer.eh_proj(torch.cat((layer.enorm(emb), layer.hnorm(hidden)), dim=-1))
        absorb = bool(index.min() > 0)  # a fresh slot's first chunk: plain path, like the main prefill
        h, _ = self._run([layer], x, index + 1, index, first_slot, absorb)
        return self.model.lm_head(layer.shared_head.norm(h))
