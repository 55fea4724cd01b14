"""Greedy speculative decoding with DeepSeek's MTP module as the draft model.

Each step, per live row: the MTP module drafts the token after next (one MoE block and the LM head
on top of the main stack's last hidden state: a fraction of a forward, though at tiny-deepseek's
size the 49152-row LM head dominates both); one main-stack forward of
two tokens [newest, draft] then verifies it. The main model's greedy choice g1 at the newest token
is always emitted; if it equals the draft, the second position's choice g2 was conditioned on the
right token and is emitted too. Every emitted token is the main model's own argmax on the true
prefix, so the output is plain greedy decoding's, token for token (up to float noise in the logits
of a 2-token forward against a 1-token one), with 1 + acceptance tokens per main forward.

Bookkeeping per row, with m = tokens whose main-stack latents are cached (the newest token t_m is
not yet fed): MTP row i combines the main hidden h_i with the embedding of t_{i+1} and sits at MTP
cache index i. Rows up to j-1 are cached; rows j..m-1 are pending (the prompt after prefill; then 1
after a rejection, 2 after an acceptance) and are run in the next draft, whose last row drafts
t_{m+1}. A rejected draft's main-cache entry (position m+1) is overwritten by the next verify.

Scheduling is simpler than `engine.Engine`'s: prompts run in batches of the runner's slot count; a
row that finishes leaves and the batch is re-packed, but no new prompt joins mid-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from alignloop.engine.api import Completion
from alignloop.engine.deepseek import DeepseekLM


@dataclass
class MTPStats:
    drafts: int = 0
    accepted: int = 0
    verify_steps: int = 0  # batched main-stack forwards (prefill included)
    row_forwards: int = 0  # the same, counted per row
    generated: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafts if self.drafts else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens per row per main-stack forward (prefill's first token included): 1 + the
        acceptance rate, less where a row ends on the first of two tokens."""
        return self.generated / max(self.row_forwards, 1)


@dataclass
class _Row:
    index: int
    prompt: list[int]
    max_tokens: int
    out: Completion
    pending_hidden: torch.Tensor = field(default=None)  # [rows, D] main hidden of MTP rows j..m-1
    pending_start: int = 0  # j
    draft: int = -1

    @property
    def fed(self) -> int:  # m: tokens whose latents are in the main cache
        return len(self.prompt) + len(self.out.token_ids) - 1


def _argmax_logprob(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    lp = logits.float().log_softmax(-1)
    tokens = lp.argmax(-1)
    return tokens.tolist(), lp.gather(-1, tokens[:, None]).squeeze(-1).tolist()


class MTPGreedy:
    """Greedy generation with MTP drafts over a `DeepseekLM` (which must have an MTP module)."""

    def __init__(self, lm: DeepseekLM, stop_ids: Sequence[int] = ()):
        if not lm.mtp_layers:
            raise ValueError("the model has no MTP module (num_nextn_predict_layers = 0)")
        self.lm, self.stop_ids = lm, frozenset(stop_ids)
        self.stats = MTPStats()

    def generate(self, prompts: Sequence[list[int]], max_tokens: int | Sequence[int]) -> list[Completion]:
        limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
        longest = max(len(p) + n for p, n in zip(prompts, limits))
        self.lm.ensure_cache(min(self.lm.max_slots, len(prompts)), longest)
        results: list[Completion | None] = [None] * len(prompts)
        step = max(1, min(self.lm.max_slots, self.lm.latent.shape[1]))
        for start in range(0, len(prompts), step):
            rows = [_Row(i, list(prompts[i]), limits[i], Completion(list(prompts[i])))
                    for i in range(start, min(start + step, len(prompts)))]
            for row in self._batch(rows):
                results[row.index] = row.out
        return results  # type: ignore[return-value]

    def _emit(self, row: _Row, token: int, logprob: float) -> bool:
        """Append a token; True when the row is finished."""
        row.out.token_ids.append(token)
        row.out.logprobs.append(logprob)
        self.stats.generated += 1
        if token in self.stop_ids:
            row.out.finish_reason, row.out.stop_reason = "stop", token
            return True
        if len(row.out.token_ids) >= row.max_tokens or row.fed + 1 >= self.lm.max_len:
            row.out.finish_reason = "length"
            return True
        return False

    @torch.inference_mode()
    def _batch(self, rows: list[_Row]) -> list[_Row]:
        lm, finished = self.lm, []
        hidden = lm.prefill_hidden([r.prompt for r in rows], 0)
        self.stats.verify_steps += 1
        self.stats.row_forwards += len(rows)
        last = hidden[torch.arange(len(rows)), torch.tensor([len(r.prompt) for r in rows]) - 1]
        tokens, logprobs = _argmax_logprob(lm.logits(last))
        live = []
        for i, (row, t, lp) in enumerate(zip(rows, tokens, logprobs)):
            row.pending_hidden, row.pending_start = hidden[i, : len(row.prompt)], 0
            (finished if self._emit(row, t, lp) else live).append(row)
        live = self._repack(rows, live)
        # The MTP module's prefill: every prompt row, each with the token after it (the last one's is
        # the first generated token).
        self._draft(live, fresh=True)
        while live:
            n = len(live)
            tokens = torch.tensor([[r.out.token_ids[-1], r.draft] for r in live])
            positions = torch.tensor([r.fed for r in live])[:, None] + torch.arange(2)
            h = lm.forward(tokens, positions, 0, absorb=True)
            self.stats.verify_steps += 1
            self.stats.row_forwards += n
            self.stats.drafts += n
            g, lp = _argmax_logprob(lm.logits(h).flatten(0, 1))
            keep = []
            for i, row in enumerate(live):
                g1, g2 = g[2 * i], g[2 * i + 1]
                row.pending_start = row.fed
                done = self._emit(row, g1, lp[2 * i])
                if g1 == row.draft:
                    self.stats.accepted += 1
                    row.pending_hidden = h[i]
                    if not done:
                        done = self._emit(row, g2, lp[2 * i + 1])
                else:
                    row.pending_hidden = h[i, :1]
                (finished if done else keep).append(row)
            live = self._repack(live, keep)
            self._draft(live, fresh=False)
        return finished

    def _repack(self, old: list[_Row], keep: list[_Row]) -> list[_Row]:
        """Move the surviving rows into slots 0..len(keep)-1, in order."""
        slot = {id(r): i for i, r in enumerate(old)}
        for i, row in enumerate(keep):
            if slot[id(row)] != i:
                self.lm.move_slot(slot[id(row)], i, row.fed + 2)
        return keep

    def _draft(self, live: list[_Row], fresh: bool) -> None:
        """Run every row's pending MTP rows (right-padded to the widest) and set each row's draft."""
        if not live:
            return
        counts = [r.pending_hidden.shape[0] for r in live]
        width = max(counts)
        D = live[0].pending_hidden.shape[-1]
        hidden = torch.zeros(len(live), width, D, dtype=live[0].pending_hidden.dtype)
        nxt = torch.zeros(len(live), width, dtype=torch.long)
        for i, (row, c) in enumerate(zip(live, counts)):
            hidden[i, :c] = row.pending_hidden
            seq = row.prompt + row.out.token_ids
            j = row.pending_start
            nxt[i, :c] = torch.tensor(seq[j + 1: j + 1 + c])
        index = torch.tensor([r.pending_start for r in live])[:, None] + torch.arange(width)
        if fresh:
            assert int(index[:, 0].max()) == 0
        logits = self.lm.mtp(hidden, nxt, index, 0)
        drafts = logits[torch.arange(len(live)), torch.tensor(counts) - 1].argmax(-1).tolist()
        for row, d in zip(live, drafts):
            row.draft = d
            row.pending_start += row.pending_hidden.shape[0]
            row.pending_hidden = None
