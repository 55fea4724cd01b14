"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Two choices here are about speed and reproducibility:

- Top-p normally sorts the whole vocabulary (49k entries per row, every step). We sample by
  rejection instead (see `_sample_nucleus`): exact, and no sort.
- Randomness is counter-based: the uniform number for token t of a request is a hash of
  (seed, t). A request's sample path therefore depends on its own seed only, not on which other
  requests happened to share its batch or in what order they were scheduled.

When every row is sampled without top-k (the RL rollout's case), the probabilities need not be
written out at all: the native `softmax_blocks` kernel gives each row's log-normaliser and per-block
mass in one read of the logits, and the draw computes the few probabilities it looks at from the
logits (`_FromLogits`). Elsewhere the same draw reads a softmax matrix (`_FromSoftmax`).
"""

from __future__ import annotations

import numpy as np
import torch

from alignloop.kernels import native

_MAX_TRIES = 64
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def uniforms(seeds: np.ndarray, counters: np.ndarray) -> torch.Tensor:
    """splitmix64(seed * golden + counter) mapped to [0, 1): one draw per row, no shared state."""
    with np.errstate(over="ignore"):
        z = seeds.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + counters.astype(np.uint64)
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        z = z ^ (z >> np.uint64(31))
    # The top 53 bits give a double in [0, 1) with full mantissa precision.
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)))


def _keep_nucleus(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep a token if the mass strictly above it is below top_p (the first token is always kept)."""
    mass_above = sorted_probs.cumsum(-1) - sorted_probs
    return mass_above < top_p[:, None]


def _draw(sorted_probs: torch.Tensor, keep: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of a rank from the kept, renormalised probabilities."""
    p = torch.where(keep, sorted_probs, 0.0).double()
    cdf = p.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    rank = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    kept = keep.sum(-1) - 1
    return torch.minimum(rank, kept)  # u*total can round up to the last cdf value


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seeds: np.ndarray,
    counters: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. Returns (tokens, logprobs of those tokens under softmax(logits / T)).

    temperature 0 means greedy; top_k 0 means no top-k; top_p 1 means no nucleus cut.
    `seeds` and `counters` (per row: the request's seed and how many tokens it has) key the
    random numbers.
    """
    kernel = native.softmax_blocks() if logits.device.type == "cpu" and logits.stride(-1) == 1 else None
    if kernel is not None and bool(((temperature > 0) & (top_k <= 0)).all()):
        inv_t = (1.0 / temperature).float().contiguous()
        logz, mass, finite = kernel(logits, inv_t, _block_size(logits.shape[-1]))
        if bool(finite):  # else (an infinite or NaN logit) torch ops below
            tokens = _sample_nucleus(_FromLogits(logits, inv_t, logz, mass), top_p, seeds, counters)
            return tokens, logits.gather(-1, tokens[:, None]).squeeze(-1).float() * inv_t - logz
    logits = logits.float()
    greedy = temperature <= 0
    if not bool((temperature == 1).all()):
        logits = logits / torch.where(greedy, 1.0, temperature)[:, None]
    # Every pass over [rows, vocab] costs ~1 ms on a CPU, so this function makes as few as it can.
    # (bf16 logits are converted first: torch's fp32 softmax on the copy took 4.4 ms at 64 x 49152,
    # one thread; its bf16-input softmax 18 ms on real logits.)
    probs = torch.softmax(logits, dim=-1)
    tokens = torch.empty(len(seeds), dtype=torch.long)
    for rows, pick in (
        (greedy, lambda r: _take(logits, r).argmax(-1)),
        (~greedy & (top_k > 0), lambda r: _sample_top_k(_take(probs, r), top_p[r], top_k[r],
                                                        uniforms(seeds[r.numpy()], counters[r.numpy()]))),
        (~greedy & (top_k <= 0), lambda r: _sample_nucleus(_FromSoftmax(_take(probs, r)), top_p[r],
                                                           seeds[r.numpy()], counters[r.numpy()])),
    ):
        if bool(rows.any()):
            tokens[rows] = pick(rows)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()


def _take(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t[rows] without copying [rows, vocab] when every row is selected (the common case)."""
    return t if bool(rows.all()) else t[rows]


def _sample_top_k(probs, top_p, top_k, u):
    """Top-k (then top-p over the renormalised top k, as transformers orders them)."""
    k = min(int(top_k.max()), probs.shape[-1])
    vals, idx = probs.topk(k, dim=-1, sorted=True)
    in_k = torch.arange(k)[None, :] < top_k[:, None]
    vals = torch.where(in_k, vals, 0.0)
    vals = vals / vals.sum(-1, keepdim=True)
    keep = _keep_nucleus(vals, top_p) & in_k
    rank = _draw(vals, keep, u)
    return idx.gather(-1, rank[:, None]).squeeze(-1)


def _sample_nucleus(src: _FromSoftmax | _FromLogits, top_p, seeds, counters):
    """Exact top-p without sorting the vocabulary: draw from the full distribution, keep the draw
    if it lies in the nucleus, else draw again.

    Accepting only nucleus tokens yields exactly the renormalised nucleus distribution, and since
    the nucleus holds at least top_p of the mass, a draw is accepted with probability >= top_p
    (0.95 in typical RL settings). A full sort of 49k logits costs ~1 ms per row; this costs
    one pass over the vocabulary per batch, plus one per doubtful draw.
    """
    blocks = src.block_mass()
    out = torch.full((len(seeds),), -1, dtype=torch.long)
    todo = torch.arange(len(seeds))
    for attempt in range(_MAX_TRIES):
        u = uniforms(seeds[todo.numpy()], counters[todo.numpy()] * _MAX_TRIES + attempt)
        token = _inverse_cdf(src, todo, blocks if len(todo) == len(seeds) else blocks[todo], u)
        ok = _in_nucleus(src, todo, token, top_p[todo])
        out[todo[ok]] = token[ok]
        todo = todo[~ok]
        if not todo.numel():
            return out
    # Astronomically rare (every try landed in a <= 1 - top_p tail): sort these rows.
    vals, idx = src.rows(todo).sort(dim=-1, descending=True)
    u = uniforms(seeds[todo.numpy()], counters[todo.numpy()] * _MAX_TRIES + _MAX_TRIES - 1)
    rank = _draw(vals, _keep_nucleus(vals, top_p[todo]), u)
    out[todo] = idx.gather(-1, rank[:, None]).squeeze(-1)
    return out


def _block_size(vocab: int) -> int:
    return next((b for b in (256, 128, 64, 32, 16, 8) if vocab % b == 0), 1)


class _FromSoftmax:
    """The nucleus draw's probabilities, read from a softmax matrix [rows, vocab]."""

    def __init__(self, probs: torch.Tensor):
        self.probs = probs
        self.size = _block_size(probs.shape[-1])

    def block_mass(self) -> torch.Tensor:
        n, vocab = self.probs.shape
        return self.probs.view(n, vocab // self.size, -1).sum(-1).double()

    def block(self, rows: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        return self.probs.view(self.probs.shape[0], -1, self.size)[rows, block]

    def at(self, rows: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return self.probs[rows, token]

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.probs[rows]

    def mass_above(self, rows: torch.Tensor, token: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        p = self.probs[rows]
        return torch.where(p > chosen[:, None], p, 0.0).sum(-1)


class _FromLogits:
    """The same probabilities computed where they are needed, exp(logit / T - logz), from the
    logits and `native.softmax_blocks`' log-normaliser and block mass."""

    def __init__(self, logits: torch.Tensor, inv_t: torch.Tensor, logz: torch.Tensor, mass: torch.Tensor):
        self.logits, self.inv_t, self.logz, self.mass = logits, inv_t, logz, mass
        self.size = _block_size(logits.shape[-1])

    def block_mass(self) -> torch.Tensor:
        return self.mass

    def _p(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (x.float() * self.inv_t[rows].view(shape) - self.logz[rows].view(shape)).exp()

    def block(self, rows: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        return self._p(self.logits.view(self.logits.shape[0], -1, self.size)[rows, block], rows)

    def at(self, rows: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return self._p(self.logits[rows, token], rows)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self._p(self.logits[rows], rows)

    def mass_above(self, rows: torch.Tensor, token: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        # Its kernel is built with softmax_blocks' (one library): one read of each doubtful row, no
        # [rows, vocab] temporaries (tokens more likely than the draw are those with a larger logit).
        return native.mass_above()(self.logits, rows.contiguous(), token.contiguous(), self.inv_t, self.logz)


def _inverse_cdf(src: _FromSoftmax | _FromLogits, rows: torch.Tensor, block_sums: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:
    """Two-level inverse CDF: find the block of the vocabulary, then the token inside it.

    A cumulative sum over the whole vocabulary is a slow, sequential pass; block sums are a fast
    reduction, and the cumulative sum is then taken over one block per row only.
    """
    size = src.size
    block_cdf = block_sums.cumsum(-1)
    target = u * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, target[:, None], right=True).squeeze(-1)
    block = block.clamp_(max=block_cdf.shape[-1] - 1)
    here = torch.arange(len(rows))
    before = torch.where(block > 0, block_cdf[here, (block - 1).clamp(min=0)], 0.0)
    inner = src.block(rows, block).double().cumsum(-1) + before[:, None]
    offset = torch.searchsorted(inner, target[:, None], right=True).squeeze(-1).clamp_(max=size - 1)
    return block * size + offset


def _in_nucleus(src: _FromSoftmax | _FromLogits, rows: torch.Tensor, token: torch.Tensor,
                top_p: torch.Tensor) -> torch.Tensor:
    """Is each drawn token inside its row's nucleus (mass strictly above it < top_p)?"""
    chosen = src.at(rows, token)
    # The mass above a token is at most 1 - its own probability, so a draw with p > 1 - top_p
    # (most draws from a chat model) is in without looking at the rest of the row.
    ok = (top_p >= 1.0) | (chosen > 1.0 - top_p + 1e-6)
    doubtful = (~ok & (chosen > 0)).nonzero().squeeze(-1)
    if doubtful.numel():
        ok[doubtful] = src.mass_above(rows[doubtful], token[doubtful], chosen[doubtful]) < top_p[doubtful]
    return ok & (chosen > 0)  # a zero-probability token can only come from rounding: draw again
