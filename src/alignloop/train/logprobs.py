"""Log-probs of chosen tokens, computing the vocabulary projection only where a loss needs it.

The output layer is the single most expensive matmul of a small chat model (SmolLM2-135M:
576 x 49152, a fifth of all FLOPs) and its fp32 logits the largest activation. SFT only scores
assistant tokens and DPO only response tokens, so `TokenLogprobs` runs the decoder, picks the
hidden states at the selected positions, and projects just those.

It is an `nn.Module` wrapping the causal LM on purpose: a trainer calls it (not the LM's own
forward), so DDP/FSDP wrap *this* module and see every forward go through their hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Heads that do more than a plain projection: for these, fall back to the model's own forward.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


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


class TokenLogprobs(torch.nn.Module):
    """forward(input_ids, position_ids, allowed, select, targets) -> log p(targets) at `select`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,     # [B, L]
        position_ids: torch.Tensor,  # [B, L]
        allowed: torch.Tensor,       # [B, 1, L, L] bool
        select: torch.Tensor,        # [B, L] bool: positions whose next token is scored
        targets: torch.Tensor,       # [N] long, N = select.sum()
    ) -> torch.Tensor:               # [N] float32
        lm = causal_lm(self.model)
        mask = attention_inputs(lm, allowed)
        # use_cache=False matters beyond speed: with a cache object present, transformers skips
        # the position-id packing detection that the non-dense backends rely on.
        kwargs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask, "use_cache": False}
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
        head = lm.get_output_embeddings()
        if decoder is None or head is None or any(getattr(lm.config, k, None) for k in _LOGIT_POSTPROCESSING):
            logits = lm(**kwargs).logits[select]
        else:
            hidden = decoder(**kwargs).last_hidden_state
            logits = head(hidden[select])
        # Log-softmax in fp32 whatever the autocast dtype: bf16 would round log-probs to ~3 digits.
        return -F.cross_entropy(logits.float(), targets, reduction="none")
