"""The trainer's forward: each policy token's log-prob (and entropy, and a value for PPO).

`PolicyLogprobs` is the SFT/DPO `TokenLogprobs` (vocabulary projection only at scored positions)
with the log-softmax kept whole once per scored token, so the entropy comes from the same logits,
and with the sampling temperature applied as the engine applied it when it drew the tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignloop.train.logprobs import TokenLogprobs


class PolicyLogprobs(TokenLogprobs):
    """forward(input_ids, position_ids, allowed, select, targets[, segments, routing])
    -> (logp [N], entropy [N], values [N] | None)."""

    def __init__(self, model: torch.nn.Module, temperature: float = 1.0, value_head: bool = False,
                 entropy_grad: bool = False) -> None:
        super().__init__(model)
        self.temperature = temperature if temperature > 0 else 1.0
        self.entropy_grad = entropy_grad
        hidden = model.config.hidden_size if hasattr(model, "config") else None
        # PPO's critic: a linear value head on the policy's last hidden state (shared backbone).
        self.value_head = torch.nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    def _logprobs(self, lm, kwargs, select, targets):
        hidden = lm.get_decoder()(**kwargs).last_hidden_state[select]
        logits = lm.get_output_embeddings()(hidden).float()
        if self.temperature != 1.0:
            # x / 1.0 is x, but it is one more pass over [N, vocab] logits forward and one backward:
            # ~2% of a GRPO training step's CPU time on SmolLM2-135M (measured with torch.profiler)
            logits = logits / self.temperature
        logp_all = F.log_softmax(logits, dim=-1)
        logp = logp_all.gather(1, targets[:, None]).squeeze(1)
        with torch.set_grad_enabled(self.entropy_grad and torch.is_grad_enabled()):
            source = logp_all if self.entropy_grad else logp_all.detach()
            entropy = -(source.exp() * source).sum(dim=-1)
        values = self.value_head(hidden.float()).squeeze(-1) if self.value_head is not None else None
        return logp, entropy, values
