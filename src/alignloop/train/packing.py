"""Packing: several tokenized conversations per row, each one blind to the others.

Padding every conversation to the longest in its batch wastes most of a CPU's FLOPs on pad tokens
when lengths vary (chat logs: 30 to 1000+ tokens). Packing fills rows of up to `max_len` tokens
with whole conversations instead. Done naively it is wrong twice: a conversation would attend to
the ones before it in the row, and rotary positions would continue across them. So each
conversation ("document") gets

- position ids that restart at 0, and
- a block-diagonal causal attention mask: token i sees token j iff same document and j <= i.

With both, every token's log-prob is the same as if its conversation were alone in the batch
(tested to 1e-5 in fp32). Conversations are never split across rows: a split one would lose its
context, and one longer than a row is skipped upstream (never truncated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Example:
    """One tokenized conversation, ready for packing."""

    input_ids: list[int]
    loss_mask: list[int]  # 1 where a token is one the model should learn to write (assistant tokens)
    weight: float = 1.0   # sample weight, applied to each of its loss tokens

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Group item indices into rows of total length <= max_len (first-fit decreasing).

    FFD stays within 11/9 of the optimal row count and is deterministic: equal inputs give equal
    rows, which resume-after-kill relies on. Items longer than max_len are an error: the caller
    must have skipped them (and counted them).
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    if too_long:
        raise ValueError(f"{len(too_long)} item(s) longer than max_len={max_len} (e.g. index {too_long[0]})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        # Linear scan: datasets here are thousands of conversations, not billions.
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return rows


@dataclass
class PackedBatch:
    """A micro batch of packed rows, shape [B, L] each (L = the longest row, not max_len)."""

    input_ids: torch.Tensor     # long
    position_ids: torch.Tensor  # long, restarting at 0 for each document
    doc_ids: torch.Tensor       # long, document index within the row; -1 on padding
    targets: torch.Tensor       # long, the next token (0 where there is none)
    loss_mask: torch.Tensor     # bool, True where the next token is a loss token of the same document
    loss_weight: torch.Tensor   # float32, the document's sample weight where loss_mask, else 0
    n_tokens: int               # non-pad tokens (what "trained tokens/s" counts)

    @property
    def n_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def attention_mask(self) -> torch.Tensor:
        return block_causal_mask(self.doc_ids)

    def to(self, device: torch.device | str) -> PackedBatch:
        move = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return PackedBatch(**move)


def collate(rows: Sequence[Sequence[Example]], pad_id: int = 0) -> PackedBatch:
    """Lay out rows of examples as a PackedBatch; rows are right-padded to the longest one."""
    width = max(sum(len(e) for e in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc_ids = torch.full(shape, -1, dtype=torch.long)
    targets = torch.zeros(shape, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.bool)
    loss_weight = torch.zeros(shape, dtype=torch.float32)
    n_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for d, ex in enumerate(row):
            n = len(ex)
            ids = torch.tensor(ex.input_ids, dtype=torch.long)
            mask = torch.tensor(ex.loss_mask, dtype=torch.bool)
            input_ids[r, at : at + n] = ids
            position_ids[r, at : at + n] = torch.arange(n)
            doc_ids[r, at : at + n] = d
            # Position t predicts token t+1 of the same document; the document's last token
            # predicts nothing (the next one belongs to another conversation or is padding).
            targets[r, at : at + n - 1] = ids[1:]
            loss_mask[r, at : at + n - 1] = mask[1:]
            loss_weight[r, at : at + n - 1] = mask[1:].float() * float(ex.weight)
            at += n
            n_tokens += n
        # Padding continues the positions so they stay in range; its doc id (-1) isolates it.
        position_ids[r, at:] = torch.arange(width - at)
    return PackedBatch(input_ids, position_ids, doc_ids, targets, loss_mask, loss_weight, n_tokens)


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool, True where query i may attend key j: same document and j <= i.

    Padding (doc -1) attends to earlier padding only. It must see something: a query row with
    no allowed key gives NaN in softmax, and NaN values times zero weights still poison the
    next layer's sums for real tokens.
    """
    length = doc_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]
