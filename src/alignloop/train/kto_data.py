"""KTO data: answers labelled desirable or not -> the pairs the preference trainer packs.

Input rows (JSONL lines or Parquet rows), either of:

    {"messages": [..., {"role": "assistant", ...}], "label": +1 | -1, "weight"?: x, "user_id"?: ...}
        (the `rm/thumbs/{train,eval}.parquet` sets of `alignloop.data.builders`: a thumbs-up is +1)
    {"prompt": [messages...] | text, "completion": [messages...] | text, "label": true | false | number, ...}

A label > 0 (or true) is desirable, anything else undesirable; a null label is an error.

KTO's reference point is estimated from answers paired with a prompt they do not belong to. Each
row becomes a `Pair` whose `chosen` is its own answer and whose `rejected` is the previous row's
answer (the first row takes the last one's) under this row's prompt: the mismatched answers are
the same set as the real ones, rotated by one, so the trainer's packing, splitting, reference
cache and batching serve KTO unchanged. A row whose mismatched answer tokenizes like its own is
skipped as an identical pair (one warning).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignloop.errors import AlignloopError
from alignloop.train.dpo_data import Pair, _pair
from alignloop.train.rows import read_rows


def _label(where: str, value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else -1.0
    if isinstance(value, (int, float)) and value == value:
        return 1.0 if value > 0 else -1.0
    raise AlignloopError(f"{where}: 'label' must be a boolean or a number, got {value!r}")


def _split(where: str, row: Any) -> tuple[Any, Any]:
    """(prompt, completion) of one row, either layout."""
    if not isinstance(row, dict) or "label" not in row:
        raise AlignloopError(f"{where}: expected an object with 'label' and 'messages' (or 'prompt' and 'completion')")
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise AlignloopError(f"{where}: 'messages' must hold a prompt and the answer")
        return messages[:-1], messages[-1:]
    if "prompt" in row and "completion" in row:
        return row["prompt"], row["completion"]
    raise AlignloopError(f"{where}: expected 'messages', or 'prompt' and 'completion'")


def read_unpaired(path: str | Path) -> list[Pair]:
    """Every row as a Pair (answer, mismatched answer) with its label; see the module docstring."""
    rows = list(read_rows(path, "labelled answers"))
    parsed = [(where, row, *_split(where, row)) for where, row in rows]
    out = []
    for i, (where, row, prompt, completion) in enumerate(parsed):
        other = parsed[i - 1][3]  # i = 0 takes the last row's answer
        pair = _pair(where, {**{k: v for k, v in row.items() if k not in ("messages", "completion")},
                             "prompt": prompt, "chosen": completion, "rejected": other})
        pair.label = _label(where, row["label"])
        out.append(pair)
    return out
