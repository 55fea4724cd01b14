"""Supervised fine-tuning on messages-format conversations: the objective and its batches.

The loss is the mean, over assistant tokens, of each token's cross-entropy times its
conversation's weight: only what the assistant wrote is learned (never the user's turns or the
template's headers), and a conversation with weight 0.5 pulls half as hard as one with 1.0.

`alignloop train sft RECIPE` (`alignloop.train.stage.run_sft`) writes runs/<run>/sft/: model/ (the
final model as a plain HF checkpoint: safetensors, config, tokenizer; LoRA adapters merged in),
checkpoints/, metrics.jsonl, manifest.json.

Several processes, same recipe, same results (see `alignloop.train.dist`):

    torchrun --nproc_per_node 2 -m alignloop.cli train sft RECIPE [--set train.parallel=fsdp]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignloop.train.config import SFTTrainSection
from alignloop.train.logprobs import TokenLogprobs
from alignloop.train.packing import Example, PackedBatch
from alignloop.train.sft_data import PackedBatches


class SFTObjective:
    """Weighted token cross-entropy on the assistant tokens of packed batches."""

    def weight(self, batch: PackedBatch) -> float:
        return float(batch.n_loss_tokens)

    def loss(self, module: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        select = batch.loss_mask
        # Document ids instead of a dense [B, 1, L, L] mask: attention then runs per conversation.
        logp = module(batch.input_ids, batch.position_ids, None, select, batch.targets[select],
                      segments=batch.doc_ids)
        ce = -logp
        loss = (ce * batch.loss_weight[select]).sum()
        # ce_sum: the unweighted cross-entropy, so the log shows how well it fits whatever the weights.
        return loss, {"ce_sum": float(ce.detach().sum()), "tokens": batch.n_tokens}


def per_token_losses(model: torch.nn.Module, batch: PackedBatch, segments: bool = False) -> torch.Tensor:
    """Cross-entropy of each loss token of `batch`, in row-major order (for tests and inspection).

    segments=False: through the dense block mask; True: per-document attention, as training runs.
    """
    module = model if isinstance(model, TokenLogprobs) else TokenLogprobs(model)
    select = batch.loss_mask
    with torch.no_grad():
        if segments:
            return -module(batch.input_ids, batch.position_ids, None, select, batch.targets[select],
                           segments=batch.doc_ids)
        return -module(batch.input_ids, batch.position_ids, batch.attention_mask(), select, batch.targets[select])


def packed_batches(train: Sequence[Example], held_out: Sequence[Example], cfg: SFTTrainSection, pad_id: int
                   ) -> tuple[PackedBatches, Sequence[PackedBatch]]:
    """(the training batches of every epoch, the held-out batches) of tokenized conversations."""
    batches = PackedBatches(train, cfg.max_seq_len, cfg.micro_batch, seed=cfg.seed, pad_id=pad_id,
                            packing=cfg.packing)
    eval_batches = PackedBatches(held_out, cfg.max_seq_len, cfg.micro_batch, pad_id=pad_id, packing=cfg.packing,
                                 shuffle=False)(0) if held_out else ()
    return batches, eval_batches
