"""What every generation backend speaks: the local CPU engine today, vLLM on a GPU later.

RL and evaluation code talk to `InferenceEngine` only, so a backend swap is a config change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. temperature 0 is greedy; top_k 0 and top_p 1 switch those off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    """One finished request.

    `token_ids` and `logprobs` include the token that ended generation (EOS or a stop token): RL
    trains on it. `text` excludes it and anything from a matched stop string on.
    `logprobs[i]` is log softmax(logits / temperature) of token i, before top-k/top-p truncation
    (raw log-probs for greedy).
    `routing` (MoE models, when the engine records it): int16 [moe_layers, tokens, K], the experts
    chosen for prompt + token_ids except the last token (never fed to the model), for routing replay.
    `cached_tokens`: how many prompt tokens were not computed because an earlier request's keys and
    values were reused (`Engine.use_prefix_cache`; 0 without it).
    """

    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = "length"
    stop_reason: int | str | None = None
    routing: torch.Tensor | None = None
    cached_tokens: int = 0   # prompt tokens whose keys/values came from the engine's prefix cache


class InferenceEngine(Protocol):
    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> list[Completion]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the policy weights in place (HF parameter names), e.g. after an RL step."""
        ...


def per_prompt(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: a single one is shared by all `n`; a list must have `n`."""
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{n} prompts but {len(params)} sampling params")
    return list(params)
