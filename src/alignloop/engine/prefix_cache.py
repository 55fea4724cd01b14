"""Keys and values of finished requests, kept so that the next request starting the same way skips
their prefill.

Why: a chat API is stateless, so every exchange re-sends the whole conversation. Through the server,
the quickstart's world sent 4.5 prompt tokens for every generated one (9,127 answers: 1,893,925
prompt tokens, 424,312 completion tokens), and each prompt was prefilled from its first token. The
next request of a conversation begins with the previous request's prompt and answer, whose keys and
values were in the cache a moment ago. Here they are kept (a copy per finished request, least
recently used dropped first beyond a byte budget) and found again by the longest common prefix.

Lookup walks the prompt in blocks of `BLOCK` tokens, each block's key chaining the hash of everything
before it (so equal keys mean equal prefixes, up to hash collisions, which `_common` rules out by
comparing the tokens), then extends the match token by token inside the entry it found. One entry
per finished request: no block sharing between entries (vLLM's paged pool shares blocks; copies are
simpler and, at ~23 KB a token for SmolLM2 in bf16, cheap against recomputing them).

Values are whatever the runner's `slot_kv` returns (for `llama.CausalLM`: keys and values per layer
and kv head); this module only counts their bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK = 16
# A prefix shorter than this is not worth a lookup, a copy and a separate attention mask.
MIN_REUSE = 16


@dataclass
class _Entry:
    tokens: list[int]
    kv: tuple[torch.Tensor, ...]
    nbytes: int
    keys: list[int]          # the block-chain hashes this entry registered


class PrefixCache:
    """Finished sequences' keys/values, looked up by longest common token prefix; LRU within `max_bytes`."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"a prefix cache needs a positive byte budget, not {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._by_key: dict[int, int] = {}
        self._next = 0
        self.lookups = self.hits = self.reused_tokens = self.prompt_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _chain(tokens: list[int], blocks: int) -> list[int]:
        keys, h = [], 0
        for b in range(blocks):
            h = hash((h, tuple(tokens[b * BLOCK : (b + 1) * BLOCK])))
            keys.append(h)
        return keys

    def store(self, tokens: list[int], kv: tuple[torch.Tensor, ...]) -> None:
        """Keep `kv` (the keys/values of exactly `tokens`, positions 0..len-1)."""
        if len(tokens) < MIN_REUSE:
            return
        nbytes = sum(t.numel() * t.element_size() for t in kv)
        if nbytes > self.max_bytes:
            return
        ident = self._next
        self._next += 1
        keys = self._chain(tokens, len(tokens) // BLOCK)
        self._entries[ident] = _Entry(list(tokens), kv, nbytes, keys)
        for k in keys:
            self._by_key[k] = ident     # the newest entry with this prefix wins
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, ident: int) -> None:
        entry = self._entries.pop(ident)
        self.bytes -= entry.nbytes
        for k in entry.keys:
            if self._by_key.get(k) == ident:
                del self._by_key[k]

    def lookup(self, prompt: list[int]) -> tuple[tuple[torch.Tensor, ...], int] | None:
        """(kv, n): the stored keys/values whose first n positions are `prompt[:n]`, n as long as any
        entry allows but below len(prompt) (the last prompt token is always computed: its logits
        are what prefill is for); None when no entry shares at least `MIN_REUSE` tokens."""
        self.lookups += 1
        self.prompt_tokens += len(prompt)
        limit = len(prompt) - 1
        best, h = None, 0
        for b in range(limit // BLOCK):
            h = hash((h, tuple(prompt[b * BLOCK : (b + 1) * BLOCK])))
            ident = self._by_key.get(h)
            if ident is None:
                break
            best = ident
        if best is None:
            return None
        entry = self._entries[best]
        n = _common(entry.tokens, prompt, limit)
        if n < MIN_REUSE:
            return None
        self._entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += n
        return entry.kv, n

    def stats(self) -> dict[str, int]:
        return {"lookups": self.lookups, "hits": self.hits, "reused_tokens": self.reused_tokens,
                "prompt_tokens": self.prompt_tokens, "entries": len(self._entries), "bytes": self.bytes}


def _common(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    n, end = 0, min(len(a), len(b), limit)
    while n < end and a[n] == b[n]:
        n += 1
    return n
