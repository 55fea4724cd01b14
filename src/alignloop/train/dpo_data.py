"""DPO data: preference pairs -> tokenized (chosen, rejected) sequences -> packed pair batches.

Input rows (JSONL lines or Parquet rows, e.g. the `dpo` table of `alignloop.data.builders`):

    {"prompt": [messages...], "chosen": ..., "rejected": ..., "weight"?: x, "user_id"?: ..., "example_id"?: ...}

`chosen` and `rejected` are each a list of messages ending with the assistant's answer (the
builders write `[{"role": "assistant", "content": ...}]`), a single message, or a plain text
(read as one assistant message). `prompt` is a list of messages (or a text, read as one user
message). Other columns are ignored.

Each side is rendered as prompt + response with the model's chat template and only the tokens of
the final assistant turn (its content and end-of-turn, from `alignloop.chat.masks`) are scored:
never the prompt, never an earlier assistant turn of the context.

Rows are never cut. A pair where either side is longer than `max_seq_len`, where the template does
not render the response, or whose two sides tokenize identically (no preference to learn) is
skipped and counted, with one warning per reason.

Held-out pairs are chosen by a stable hash (`alignloop.data.stablehash`) of the row's `user_id`
(else its `example_id`, else its content), so a user's pairs all land on one side and the split is
the same on every machine and every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jinja2
import torch

from alignloop.chat.masks import mask_conversation, token_mask
from alignloop.data.stablehash import hash_strings, unit_interval
from alignloop.errors import AlignloopError
from alignloop.train.packing import Example, PackedBatch, collate
from alignloop.train.rows import read_rows
from alignloop.train.sft_data import PackedBatches
from alignloop.ui import say


@dataclass
class Pair:
    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    weight: float
    key: str    # what the train/eval split hashes: user id, else example id, else the content
    where: str  # "file:line" or "file:row N"
    label: float = 1.0  # kto only (`alignloop.train.kto_data`): > 0 desirable, else undesirable


@dataclass(frozen=True)
class TokenizedPair:
    index: int          # position among all kept pairs (train and eval): the reference cache's row
    chosen: Example
    rejected: Example
    weight: float
    key: str
    label: float = 1.0  # kto only

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


@dataclass
class PairCounts:
    rows: int = 0
    kept: int = 0
    skipped_too_long: int = 0
    skipped_no_response: int = 0
    skipped_identical: int = 0
    longest_skipped: int = 0
    tokens: int = 0
    response_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --- reading -----------------------------------------------------------------------------------


def read_pairs(path: str | Path) -> list[Pair]:
    """All rows of a JSONL or Parquet pairs file; a malformed row is an AlignloopError naming it."""
    return [_pair(where, row) for where, row in read_rows(path, "preference pairs")]


def _messages(where: str, name: str, value: Any, default_role: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise AlignloopError(f"{where}: '{name}' must be a text or a non-empty list of messages")
    clean = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise AlignloopError(f"{where}: {name}[{i}] needs a string 'role'")
        if not isinstance(m.get("content"), (str, list, type(None))):
            raise AlignloopError(f"{where}: {name}[{i}].content must be a string, a list of parts or null")
        # Parquet structs carry every field of the column; a None there means "absent".
        clean.append({k: v for k, v in m.items() if v is not None or k == "content"})
    return clean


def _pair(where: str, row: Any) -> Pair:
    if not isinstance(row, dict) or not all(k in row for k in ("prompt", "chosen", "rejected")):
        raise AlignloopError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
    prompt = _messages(where, "prompt", row["prompt"], "user")
    sides = {}
    for side in ("chosen", "rejected"):
        messages = _messages(where, side, row[side], "assistant")
        if messages[-1]["role"] != "assistant":
            raise AlignloopError(f"{where}: '{side}' must end with an assistant message, "
                                 f"not '{messages[-1]['role']}'")
        sides[side] = messages
    weight = row.get("weight", 1.0)
    if weight is None:
        weight = 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise AlignloopError(f"{where}: 'weight' must be a finite number >= 0, got {weight!r}")
    key = row.get("user_id") or row.get("example_id")
    if not isinstance(key, str) or not key:
        key = json.dumps([prompt, sides["chosen"], sides["rejected"]], sort_keys=True, ensure_ascii=False)
    return Pair(prompt, sides["chosen"], sides["rejected"], float(weight), key, where)


# --- tokenizing --------------------------------------------------------------------------------


def _side(tokenizer: Any, pair: Pair, response: list[dict[str, Any]]) -> Example | None:
    """prompt + response, masked on the last assistant turn; None when the template drops it."""
    messages = pair.prompt + response
    try:
        masked = mask_conversation(tokenizer, messages)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
        raise AlignloopError(f"{pair.where}: cannot render with the chat template: {e}") from None
    if not masked.spans or (len(messages) - 1) in masked.dropped:
        return None
    offsets = tokenizer(masked.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    mask = token_mask(offsets, masked.spans[-1:])
    if not any(mask[1:]):  # position 0 is never scored (nothing predicts it)
        return None
    return Example(list(masked.input_ids), mask, pair.weight)


def tokenize_pairs(tokenizer: Any, pairs: Sequence[Pair], max_seq_len: int) -> tuple[list[TokenizedPair], PairCounts]:
    counts = PairCounts(rows=len(pairs))
    out: list[TokenizedPair] = []
    for pair in pairs:
        chosen, rejected = _side(tokenizer, pair, pair.chosen), _side(tokenizer, pair, pair.rejected)
        if chosen is None or rejected is None:
            counts.skipped_no_response += 1
            continue
        longest = max(len(chosen), len(rejected))
        if longest > max_seq_len:
            counts.skipped_too_long += 1
            counts.longest_skipped = max(counts.longest_skipped, longest)
            continue
        if chosen.input_ids == rejected.input_ids:
            counts.skipped_identical += 1
            continue
        out.append(TokenizedPair(len(out), chosen, rejected, pair.weight, pair.key, pair.label))
        counts.kept += 1
        counts.tokens += len(chosen) + len(rejected)
        counts.response_tokens += sum(chosen.loss_mask[1:]) + sum(rejected.loss_mask[1:])

    if counts.skipped_too_long:
        say(f"[yellow]warning: skipped {counts.skipped_too_long} of {counts.rows} pair(s) with a side longer than "
            f"max_seq_len={max_seq_len} tokens (longest {counts.longest_skipped}); they are not truncated. "
            f"Raise train.max_seq_len to keep them.[/]")
    if counts.skipped_no_response:
        say(f"[yellow]warning: skipped {counts.skipped_no_response} pair(s) whose response the chat template "
            f"does not render[/]")
    if counts.skipped_identical:
        say(f"[yellow]warning: skipped {counts.skipped_identical} pair(s) whose chosen and rejected sides are "
            f"the same tokens[/]")
    if not out:
        raise AlignloopError(f"no preference pair left to train on: {counts.skipped_too_long} too long for "
                             f"max_seq_len={max_seq_len}, {counts.skipped_no_response} without a rendered response, "
                             f"{counts.skipped_identical} identical")
    if not any(p.weight > 0 for p in out):
        raise AlignloopError("every pair has weight 0: nothing to learn from")
    return out, counts


def split_pairs(pairs: Sequence[TokenizedPair], eval_fraction: float, salt: str
                ) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """(train, eval) by a stable hash of each pair's key (its user when known)."""
    if eval_fraction <= 0 or not pairs:
        return list(pairs), []
    held = unit_interval(hash_strings([p.key for p in pairs], salt)) < eval_fraction
    train = [p for p, h in zip(pairs, held) if not h]
    held_out = [p for p, h in zip(pairs, held) if h]
    if not train:
        raise AlignloopError(f"all {len(pairs)} pairs hash into the eval split (eval_fraction={eval_fraction}); "
                             f"lower train.eval_fraction or change train.split_salt")
    return train, held_out


def limit_pairs(train: Sequence[TokenizedPair], held_out: Sequence[TokenizedPair], max_train: int | None,
                max_eval: int | None, seed: int) -> tuple[list[TokenizedPair], list[TokenizedPair], list[TokenizedPair]]:
    """(kept, train, eval): at most `max_train` / `max_eval` pairs drawn at random (seeded), in file
    order, re-indexed 0..n-1 so the reference pass covers only what is used."""
    def draw(pairs: Sequence[TokenizedPair], cap: int | None, salt: int) -> list[TokenizedPair]:
        if cap is None or len(pairs) <= cap:
            return list(pairs)
        keep = sorted(random.Random(seed * 1_000_003 + salt).sample(range(len(pairs)), cap))
        return [pairs[i] for i in keep]

    chosen_train, chosen_eval = draw(train, max_train, 0), draw(held_out, max_eval, 1)
    kept = [replace(p, index=i) for i, p in enumerate(chosen_train + chosen_eval)]
    return kept, kept[:len(chosen_train)], kept[len(chosen_train):]


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """sha256 of the token ids and masks of every pair, in order (what reference log-probs depend on)."""
    h = hashlib.sha256()
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            h.update(torch.tensor(ex.input_ids, dtype=torch.int64).numpy().tobytes())
            h.update(bytes(ex.loss_mask))
            h.update(b"|")
    return h.hexdigest()


# --- batching ----------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """Pairs laid out as packed documents: each pair's chosen then rejected side, in one row.

    `seq` maps each scored token (row-major order, as `TokenLogprobs` returns them) to its sequence
    2 * p + side (side 0 = chosen, 1 = rejected), for p the pair's place in this batch.
    """

    packed: PackedBatch
    seq: torch.Tensor         # [N] long
    lengths: torch.Tensor     # [P, 2] float: scored tokens per side
    weight: torch.Tensor      # [P] float: sample weights
    reference: torch.Tensor | None  # [P, 2] float: reference log-probs (None: reference-free); [P, 2, 2] ld_dpo
    n_pairs: int
    label: torch.Tensor | None = None  # [P] float: kto's labels (> 0 desirable)

    def to(self, device: torch.device | str) -> PairBatch:
        move = {k: v.to(device) if hasattr(v, "to") else v for k, v in self.__dict__.items()}
        return PairBatch(**move)


def collate_pairs(rows: Sequence[Sequence[TokenizedPair]], pad_id: int = 0,
                  reference: torch.Tensor | None = None) -> PairBatch:
    """Rows of pairs -> a PairBatch; `reference` is the [all pairs, 2] table indexed by `pair.index`."""
    docs = [[ex for p in row for ex in (p.chosen, p.rejected)] for row in rows]
    packed = collate(docs, pad_id)
    flat = [p for row in rows for p in row]
    per_side = torch.tensor([[sum(p.chosen.loss_mask[1:]), sum(p.rejected.loss_mask[1:])] for p in flat],
                            dtype=torch.long)
    seq = torch.repeat_interleave(torch.arange(2 * len(flat)), per_side.flatten())
    ref = None
    if reference is not None:
        ref = reference[torch.tensor([p.index for p in flat], dtype=torch.long)]
    return PairBatch(packed, seq, per_side.float(), torch.tensor([p.weight for p in flat], dtype=torch.float32),
                     ref, len(flat), torch.tensor([p.label for p in flat], dtype=torch.float32))


class PairBatches(PackedBatches):
    """`batches(epoch)` for the loop: pairs packed into rows, reshuffled per epoch from the seed alone.

    A row holds whole pairs (both sides together) up to `row_len` tokens; without packing, one pair
    per row. `micro_batch` counts rows.
    """

    def __init__(self, pairs: Sequence[TokenizedPair], row_len: int, micro_batch: int, seed: int = 0,
                 pad_id: int = 0, packing: bool = True, shuffle: bool = True,
                 reference: torch.Tensor | None = None) -> None:
        super().__init__(pairs, row_len, micro_batch, seed, pad_id, packing, shuffle)
        self.reference = reference

    def collate(self, rows: list[list[TokenizedPair]]) -> PairBatch:
        return collate_pairs(rows, self.pad_id, self.reference)
