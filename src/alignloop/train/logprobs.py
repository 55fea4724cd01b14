"""Log-probs of chosen tokens, computing the vocabulary projection only where a loss needs it.

The output layer is the single most expensive matmul of a small chat model (SmolLM2-135M:
576 x 49152, a fifth of all FLOPs) and its fp32 logits the largest activation. SFT only scores
assistant tokens and DPO only response tokens, so `TokenLogprobs` runs the decoder, picks the
hidden states at the selected positions, and projects just those.

It is an `nn.Module` wrapping the causal LM on purpose: a trainer calls it (not the LM's own
forward), so DDP/FSDP wrap *this* module and see every forward go through their hooks.

Packed rows can also skip the dense mask: given `segments` (the document id of each token, as
`PackedBatch.doc_ids`), attention runs document by document, each a plain causal attention
(`segment_attention`). A dense [L, L] block mask makes the attention kernel do all L^2 query-key
pairs of the row and throw most away; per document it is sum(n_i^2)/2. With ~150-token chat turns
packed into 512-token rows that is ~7x less attention work, and no [B, 1, L, L] mask is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AttentionInterface

from alignloop.train.lora_forward import fused_lora
from alignloop.train.moe_balance import moe_layers_named, real_tokens
from alignloop.train.packing import block_causal_mask

# Heads that do more than a plain projection: for these, fall back to the model's own forward.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def decoder_inputs(input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                   routing: list[torch.Tensor] | None, moe_layers: list) -> dict:
    """Keyword arguments of the decoder's forward. use_cache=False matters beyond speed: with a cache
    object present, transformers skips the position-id packing detection the non-dense backends use."""
    kwargs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask, "use_cache": False}
    if routing is not None:
        if not moe_layers:
            raise ValueError("routing replay needs an MoE model; this one has no MoE layers")
        kwargs["routing"] = routing
    return kwargs


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a peft or DDP/FSDP wrapper (LoRA layers stay injected)."""
    while True:
        if hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def attention_inputs(lm: torch.nn.Module, allowed: torch.Tensor) -> torch.Tensor | None:
    """The 4D mask (`allowed`: bool [B, 1, L, L], True = may attend) in the form the LM's attention takes.

    transformers passes a 4D mask to the attention function untouched, and the conventions differ:
    sdpa takes a bool mask (True = attend) as is, but eager *adds* the mask to the scores, so a bool
    mask there is silently added as 0/1 and attends everywhere. Other backends (flash, flex) take no
    dense mask: for those we pass None and transformers rebuilds the packing from the position ids.
    """
    impl = getattr(lm.config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        blocked = torch.finfo(torch.float32).min
        return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, blocked)
    return None


SEGMENT_ATTENTION = "alignloop_segments"


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each document of packed rows (a transformers attention function).

    `attention_mask` carries the document ids, [B, 1, 1, L] (contiguous runs; padding is one more
    run, attending causally to itself so it never produces NaN). query [B, H, L, D], key/value
    [B, Hkv, L, D]; returns [B, L, H, D] like transformers' sdpa function.

    On CPU the attention itself runs in fp32 even under bf16 autocast: there the fp32 kernels are
    ~3x faster than the bf16 ones (measured: a 170-token causal forward+backward, 9 heads), and
    fp32 is the more exact of the two. The projections around it stay in bf16.
    """
    segments = attention_mask.reshape(attention_mask.shape[0], -1)
    gqa = query.shape[1] != key.shape[1]
    out_dtype = query.dtype
    upcast = query.device.type == "cpu" and query.dtype != torch.float32
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    rows = []
    # Documents are cut out with unbind/split, not indexing: the backward of `split` is one
    # concatenation per row, while each index slice's backward zero-fills a full-size gradient
    # buffer (per document, q, k and v alike). Measured here on 4 packed rows of ~500 tokens,
    # SmolLM2-135M's heads: 0.23 s -> 0.14 s forward+backward per layer, 1 thread.
    # Autocast would cast the fp32 inputs straight back to bf16.
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        for b, (q, k, v) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):
            counts = torch.unique_consecutive(segments[b], return_counts=True)[1].tolist()
            parts = [F.scaled_dot_product_attention(qd[None], kd[None], vd[None], is_causal=True, dropout_p=dropout,
                                                    scale=scaling, enable_gqa=gqa)
                     for qd, kd, vd in zip(q.split(counts, dim=1), k.split(counts, dim=1), v.split(counts, dim=1))]
            rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).to(out_dtype).contiguous(), None


def _register_segment_attention() -> None:
    if SEGMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


def supports_segments(lm: torch.nn.Module, length: int) -> bool:
    """Whether per-document causal attention is exact for this LM: plain softmax attention, no
    sliding window shorter than the row, no logit soft-capping."""
    config = lm.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", None):
        return False  # flash / flex: they do their own packing from position ids
    if any(getattr(config, k, None) for k in ("attn_logit_softcapping", "attention_chunk_size")):
        return False
    window = getattr(config, "sliding_window", None)
    return not (window is not None and getattr(config, "use_sliding_window", True) and window < length)


@contextlib.contextmanager
def _attention(lm: torch.nn.Module, name: str) -> Iterator[None]:
    """Route the LM's attention through `name` for one forward (autograd keeps what it recorded)."""
    previous = lm.config._attn_implementation
    lm.config._attn_implementation = name
    try:
        yield
    finally:
        lm.config._attn_implementation = previous


@contextlib.contextmanager
def _adapter_inputs_uncast(model: torch.nn.Module, device_type: str) -> Iterator[None]:
    """Under autocast, let LoRA layers feed their input to the adapters as it is.

    peft casts each adapter's input to the adapter's dtype: with bf16 base weights and fp32
    adapters that is a bf16 -> fp32 copy of the activations, which autocast then copies straight
    back to bf16 for the adapter's matmul; two copies per adapted layer, forward and backward,
    for nothing. Without autocast the cast is needed (the dtypes must match), so it stays.
    """
    if not (torch.is_autocast_enabled(device_type) and hasattr(model, "peft_config")):
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [getattr(m, "cast_input_dtype_enabled", True) for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, value in zip(layers, saved):
            m.cast_input_dtype_enabled = value


class TokenLogprobs(torch.nn.Module):
    """forward(input_ids, position_ids, allowed, select, targets[, segments]) -> log p(targets) at `select`.

    `allowed` is the [B, 1, L, L] bool mask; with `segments` ([B, L] document ids of packed rows)
    it may be None, and attention runs per document where that is exact (`supports_segments`).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # Found once: walking every module per forward would tax dense models (none) on each micro batch.
        self.moe_layers = [m for _, m in moe_layers_named(model)]

    def forward(
        self,
        input_ids: torch.Tensor,     # [B, L]
        position_ids: torch.Tensor,  # [B, L]
        allowed: torch.Tensor | None,  # [B, 1, L, L] bool
        select: torch.Tensor,        # [B, L] bool: positions whose next token is scored
        targets: torch.Tensor,       # [N] long, N = select.sum()
        segments: torch.Tensor | None = None,  # [B, L] document ids (packed rows), -1 on padding
        routing: list[torch.Tensor] | None = None,  # MoE: forced experts per MoE layer [B, L, K] (replay)
    ) -> torch.Tensor:               # [N] float32
        lm = causal_lm(self.model)
        route: contextlib.AbstractContextManager = contextlib.nullcontext()
        if segments is not None and supports_segments(lm, segments.shape[-1]):
            _register_segment_attention()
            route = _attention(lm, SEGMENT_ATTENTION)
            mask = segments[:, None, None, :]  # 4D: transformers hands it to the attention function as is
        else:
            if allowed is None:
                if segments is None:
                    raise ValueError("TokenLogprobs needs `allowed` or `segments`")
                allowed = block_causal_mask(segments)
            mask = attention_inputs(lm, allowed)
        # MoE models count expert load on real tokens only (padding has document id -1).
        real = segments >= 0 if segments is not None and self.moe_layers else None
        with route, _adapter_inputs_uncast(self.model, input_ids.device.type), fused_lora(self.model), \
                real_tokens(self.moe_layers, real):
            return self._logprobs(lm, decoder_inputs(input_ids, position_ids, mask, routing, self.moe_layers),
                                  select, targets)

    def _logprobs(self, lm, kwargs, select, targets) -> torch.Tensor:
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
        head = lm.get_output_embeddings()
        if decoder is None or head is None or any(getattr(lm.config, k, None) for k in _LOGIT_POSTPROCESSING):
            logits = lm(**kwargs).logits[select]
        else:
            hidden = decoder(**kwargs).last_hidden_state
            logits = head(hidden[select])
        return label_logprobs(logits, targets)


# Rows of logits per chunk of `LabelLogprobs`: 16 x 49152 fp32 is 3 MB, which stays in cache
# between the passes over it. Measured (SmolLM2's head, 1374 positions, 1 thread): the log-probs
# and their gradient cost 0.13 s of CPU beyond the projection, against 0.55 s through fp32 logits.
_CHUNK_ROWS = 16


class LabelLogprobs(torch.autograd.Function):
    """log softmax(logits)[i, targets[i]] per row, in fp32 whatever the logits' dtype, without
    an fp32 copy of the logits (forward) or of their gradient (backward).

    Forward keeps only the fp32 log-sum-exp per row; backward recomputes softmax chunk by chunk
    and writes the gradient straight in the logits' dtype: (onehot - softmax) * grad. The same
    numbers as `cross_entropy(logits.float(), targets)`, up to summation order; its fp32 route
    writes and reads [N, V] fp32 tensors five times per step (cast, log-softmax, zero-filled
    gradient, its backward, cast back), this one reads the logits twice.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            lse[start:start + _CHUNK_ROWS] = torch.logsumexp(logits[start:start + _CHUNK_ROWS].float(), dim=-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad = grad.float()
        out = torch.empty_like(logits)
        for start in range(0, logits.shape[0], _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            g = grad[rows, None]
            chunk = torch.sub(logits[rows], lse[rows, None]).exp_().mul_(-g)  # fp32 by type promotion
            chunk.scatter_add_(1, targets[rows, None], g)
            out[rows] = chunk
        return out, None


def label_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] fp32 log-probs of `targets` under `logits` [N, V] (any float dtype): log-softmax in fp32,
    since bf16 would round log-probs to ~3 digits."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32).requires_grad_(logits.requires_grad)
    with torch.autocast(logits.device.type, enabled=False):
        return LabelLogprobs.apply(logits, targets)
