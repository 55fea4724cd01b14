"""SFT data: messages rows -> tokenized examples with assistant-only loss masks -> packed batches.

Input rows (JSONL lines or Parquet rows): {"messages": [{"role": ..., "content": ...}, ...],
"weight": 1.0}. `weight` is optional; it multiplies the loss of every token of the row, so a
per-user cap can down-weight a heavy user's conversations instead of dropping them.

Nothing is ever cut silently:
- a malformed row is an error naming the file and line;
- a conversation longer than `max_seq_len` is skipped and counted (truncating it would train on
  an assistant turn without its end, or on nothing at all), with one warning for all of them;
- a conversation without any assistant token is skipped and counted; a dataset where that
  leaves nothing is an error.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch

from alignloop.chat.masks import mask_conversation, token_mask
from alignloop.errors import AlignloopError
from alignloop.train.packing import Example, collate, pack
from alignloop.train.rows import read_rows
from alignloop.ui import say


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    weight: float
    where: str  # "file:line" (or "file:row N"), for error messages


@dataclass
class TokenizeCounts:
    rows: int = 0
    kept: int = 0
    skipped_too_long: int = 0
    skipped_no_assistant: int = 0
    longest_skipped: int = 0
    dropped_assistant_messages: int = 0  # assistant messages the chat template itself does not render
    loss_tokens: int = 0
    tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --- reading -----------------------------------------------------------------------------------


def read_conversations(path: str | Path) -> list[Conversation]:
    """All rows of a JSONL or Parquet messages file; a malformed row is an AlignloopError."""
    return [_conversation(where, row) for where, row in read_rows(path, "conversations")]


def draw_conversations(conversations: list[Conversation], cap: int | None, seed: int) -> list[Conversation]:
    """At most `cap` conversations, drawn at random (seeded), in file order; all of them without a cap.
    The draw comes before tokenizing, which on a big log costs more than a short run's training."""
    if cap is None or len(conversations) <= cap:
        return conversations
    keep = sorted(random.Random(seed).sample(range(len(conversations)), cap))
    return [conversations[i] for i in keep]


def _conversation(where: str, row: Any) -> Conversation:
    if not isinstance(row, dict) or "messages" not in row:
        raise AlignloopError(f"{where}: expected an object with 'messages' (and optionally 'weight')")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise AlignloopError(f"{where}: 'messages' must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise AlignloopError(f"{where}: messages[{i}] needs a string 'role'")
        if not isinstance(m.get("content"), (str, list, type(None))):
            raise AlignloopError(f"{where}: messages[{i}].content must be a string, a list of parts or null")
        # Parquet structs carry every field of the column; a None there means "absent".
        clean.append({k: v for k, v in m.items() if v is not None or k == "content"})
    weight = row.get("weight", 1.0)
    if weight is None:
        weight = 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise AlignloopError(f"{where}: 'weight' must be a finite number >= 0, got {weight!r}")
    return Conversation(clean, float(weight), where)


# --- tokenizing --------------------------------------------------------------------------------


def tokenize(
    tokenizer: Any,
    conversations: Sequence[Conversation],
    max_seq_len: int,
    last_turn_only: bool = False,
) -> tuple[list[Example], TokenizeCounts]:
    """Render each conversation with the tokenizer's chat template and mask its assistant tokens."""
    counts = TokenizeCounts(rows=len(conversations))
    examples: list[Example] = []
    for conv in conversations:
        try:
            masked = mask_conversation(tokenizer, conv.messages)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:  # raise_exception, unknown family, ...
            raise AlignloopError(f"{conv.where}: cannot render with the chat template: {e}") from None
        counts.dropped_assistant_messages += len(masked.dropped)
        mask = masked.mask
        if last_turn_only and masked.spans:
            offsets = tokenizer(masked.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            mask = token_mask(offsets, masked.spans[-1:])
        if not any(mask):
            counts.skipped_no_assistant += 1
            continue
        if len(masked.input_ids) > max_seq_len:
            counts.skipped_too_long += 1
            counts.longest_skipped = max(counts.longest_skipped, len(masked.input_ids))
            continue
        examples.append(Example(list(masked.input_ids), list(mask), conv.weight))
        counts.kept += 1
        counts.tokens += len(masked.input_ids)
        counts.loss_tokens += sum(mask)

    if counts.skipped_too_long:
        say(f"[yellow]warning: skipped {counts.skipped_too_long} of {counts.rows} conversation(s) longer than "
            f"max_seq_len={max_seq_len} tokens (longest {counts.longest_skipped}); they are not truncated. "
            f"Raise train.max_seq_len to keep them.[/]")
    if counts.skipped_no_assistant and examples:
        say(f"[yellow]warning: skipped {counts.skipped_no_assistant} conversation(s) with no assistant "
            f"tokens to learn from[/]")
    if counts.dropped_assistant_messages:
        say(f"[yellow]warning: the chat template does not render {counts.dropped_assistant_messages} "
            f"assistant message(s); they get no loss[/]")
    if not examples:
        if counts.skipped_no_assistant == counts.rows:
            raise AlignloopError(f"no assistant tokens in any of the {counts.rows} conversation(s): "
                                 f"SFT needs assistant turns to learn from")
        raise AlignloopError(f"no conversation left to train on: {counts.skipped_too_long} too long for "
                             f"max_seq_len={max_seq_len}, {counts.skipped_no_assistant} without assistant tokens")
    if not any(e.weight > 0 for e in examples):
        raise AlignloopError("every conversation has weight 0: nothing to learn from")
    return examples, counts


def split(examples: Sequence[Example], eval_fraction: float, seed: int,
          micro_batch: int = 1) -> tuple[list[Example], list[Example]]:
    """(train, eval), eval drawn at random (seeded); at least one of each when there are two or more.

    An `AlignloopError` when the held-out share leaves a train split smaller than the eval split,
    or than two micro batches of `micro_batch` conversations: a run on that learns next to nothing.
    """
    n = len(examples)
    n_eval = round(eval_fraction * n)
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    else:
        n_eval = 0
    n_train = n - n_eval
    if n_eval and (n_train < n_eval or n_train < 2 * micro_batch):
        raise AlignloopError(
            f"train.eval_fraction = {eval_fraction} leaves {n_train} conversation(s) to train on and {n_eval} "
            f"for eval; the train split needs at least as many as eval and {2 * micro_batch} (two micro "
            f"batches of train.micro_batch = {micro_batch}): lower train.eval_fraction")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


# --- batching ----------------------------------------------------------------------------------


def epoch_chunks(n_rows: int, micro_batch: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Row indices of each micro batch of one epoch.

    Seeded by (seed, epoch) alone, not by a global RNG: a resumed run sees the same order.
    """
    order = list(range(n_rows))
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n_rows, generator=g).tolist()
    return [order[i : i + micro_batch] for i in range(0, n_rows, micro_batch)]


class PackedBatches:
    """`batches(epoch)` for the training loop: packed rows, reshuffled each epoch from the seed."""

    def __init__(self, examples: Sequence[Example], max_seq_len: int, micro_batch: int,
                 seed: int = 0, pad_id: int = 0, packing: bool = True, shuffle: bool = True) -> None:
        self.examples = list(examples)
        self.micro_batch = micro_batch
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        lengths = [len(e) for e in self.examples]
        self.rows = pack(lengths, max_seq_len) if packing else [[i] for i in range(len(lengths))]

    def __call__(self, epoch: int) -> EpochBatches:
        return EpochBatches(self, epoch_chunks(len(self.rows), self.micro_batch, self.seed, epoch, self.shuffle))

    def collate(self, rows: list[list[Example]]) -> Any:
        """One micro batch from its rows of examples (subclasses add what their objective needs)."""
        return collate(rows, self.pad_id)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.micro_batch)

    def fill(self, max_seq_len: int) -> float:
        """Share of the rows' max_seq_len slots that hold real tokens (1.0 = no padding at all)."""
        return sum(len(e) for e in self.examples) / (max_seq_len * max(1, len(self.rows)))


class EpochBatches(Sequence[Any]):
    """One epoch of a `PackedBatches`: batch i is `source.collate` of the rows in `chunks[i]`, collated
    when the loop asks for it, not a whole epoch up front."""

    def __init__(self, source: PackedBatches, chunks: list[list[int]]) -> None:
        self.source = source
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def rows(self, i: int) -> list[list[Any]]:
        """The rows of batch i, each a list of the source's examples."""
        s = self.source
        return [[s.examples[j] for j in s.rows[r]] for r in self.chunks[i]]

    def items(self, i: int) -> list[Any]:
        """The examples of batch i, in the batch's order."""
        return [e for row in self.rows(i) for e in row]

    def __getitem__(self, i):  # type: ignore[override]
        return self.source.collate(self.rows(i))
