"""`alignloop bench reward`: scoring (context, response) pairs with our CPU reward model vs a plain
Hugging Face reward model of the same size.

Work: `responses` seeded synthetic pairs (a one-message context of 5-25 words and a response of
10-60 words; no text repeats, and none reaches either side's truncation length: `truncated` in the
JSON line says so), all scored in one call per round by each side.

Metric: scored responses per second, the median of >= 3 rounds (min and max beside it). Every
configuration runs once untimed first; then the rounds alternate the sides, who goes first
flipping each round. Only the scoring call is timed (not model loading, not emptying the cache).

Ours: `RewardModel.score` with the default MiniLM backbone and 8 heads (untrained: their weights
do not change the time), cold: the embedding cache is emptied before every round, so every text is
embedded. The last user message and the response are embedded separately by all-MiniLM-L6-v2
(`PackedEncoder`: texts sorted by length, 64 per forward, each cut at 128 tokens, packed without
padding), then text statistics and the heads.

Peer: transformers `AutoModelForSequenceClassification` on the same all-MiniLM-L6-v2 weights with
one output: a BERT cross-encoder over "last user message [SEP] response", the reward model of this
size as practitioners build it. Batched the way HF users run inference for speed: pairs sorted by
length, 64 pairs per forward padded to the longest of the batch, `truncation=True` at 256 tokens per
pair (both texts' 128), under `torch.inference_mode()`, weights loaded in the dtype being timed
(`from_pretrained(dtype=...)`), with transformers' default attention (`sdpa`) and `eager` both timed.

Both: the same pairs, the same torch threads (`--threads`, default every core; the fast tokenizer,
about 1.5% of either side's time, runs in its library's own pool), 64 sequences per forward,
each dtype timed (bfloat16 and float32: on an AVX512-BF16 CPU without AMX bf16 measured about 2x
faster for both sides). The headline compares the sides in the same dtype: the one of the peer's
fastest configuration; `grid` has every configuration's rate. `ours_warm_cache` (ours again with
every text already embedded: what a repeated text costs) is beside the ratio, not in it.

What differs is inherent to the two designs, and counted in `ours_tokens` / `peer_tokens`: ours
runs two short sequences per pair (message and response apart, [CLS] and [SEP] each) where the peer
runs one longer one (the pair, cross-attending); ours computes 8 heads and text statistics where
the peer computes one linear score; ours packs a batch's tokens (every op computes only real
tokens; attention runs per run of equal-length texts), the peer pads every op to the batch's longest
pair, as BERT in transformers does.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignloop.bench.harness import (
    MIN_ROUNDS,
    alternate_rounds,
    fixed_threads,
    headline,
    machine_facts,
    rate,
    summary,
)
from alignloop.errors import AlignloopError
from alignloop.rewards.backbones import MiniLMBackbone, minilm_dir
from alignloop.rewards.config import BackboneSection, HeadTrainSection
from alignloop.rewards.model import RewardModel
from alignloop.rewards.textstats import last_user
from alignloop.ui import say

HEADS = ["preference", "thumbs", "continue", "turns_after", "time_to_next", "returned_1d", "returned_7d", "safety"]
DTYPES = ("bfloat16", "float32")
PEER_ATTENTION = ("sdpa", "eager")
WORDS = ("ramen sushi travel music guitar concert football science planets puppy movie popcorn hiking beach "
         "coffee recipe tomato rhythm galaxy kitten festival mountain river novel dragon castle").split()


def synthetic_pairs(n: int, seed: int = 0) -> tuple[list[list[dict]], list[str]]:
    rng = np.random.default_rng(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS, k)) + rng.choice([".", "?", "!"])

    contexts = [[{"role": "user", "content": text(int(rng.integers(5, 25)))}] for _ in range(n)]
    responses = [text(int(rng.integers(10, 60))) for _ in range(n)]
    return contexts, responses


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No loading bars, and no report that the peer's score head is new (it is untrained on purpose)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


# --- the two sides -------------------------------------------------------------------------------


def our_model(dtype: str = "float32", batch: int = 64, max_length: int = 128) -> RewardModel:
    """Ours as `rm train` builds it (MiniLM backbone, 8 heads), untrained, without a disk cache, and
    in eval mode as `RewardModel.load` leaves it (no dropout in the heads)."""
    with _quiet_transformers():
        backbone = MiniLMBackbone(BackboneSection(max_length=max_length, batch_size=batch, dtype=dtype))
    model = RewardModel(backbone, HEADS, HeadTrainSection())
    model.heads.eval()
    return model


class HFRewardModel:
    """The peer: `AutoModelForSequenceClassification` (one score) on all-MiniLM-L6-v2, scoring pairs
    sorted by length (`sort=False`: in the given order), `batch` pairs per padded forward."""

    def __init__(self, dtype: str = "float32", attention: str = "sdpa", batch: int = 64, max_length: int = 256,
                 sort: bool = True):
        self.batch, self.max_length, self.sort = batch, max_length, sort
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        torch.manual_seed(0)  # the new score head: the same on every load
        with _quiet_transformers():
            self.model = AutoModelForSequenceClassification.from_pretrained(
                minilm_dir(), num_labels=1, dtype=getattr(torch, dtype), attn_implementation=attention).eval()

    def batches(self, users: list[str], responses: list[str]) -> list[list[int]]:
        order = list(range(len(users)))
        if self.sort:
            order.sort(key=lambda i: len(users[i]) + len(responses[i]))
        return [order[i:i + self.batch] for i in range(0, len(order), self.batch)]

    def encode(self, users: list[str], responses: list[str], rows: list[int]) -> dict[str, torch.Tensor]:
        return self.tokenizer([users[i] for i in rows], [responses[i] for i in rows], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")

    @torch.inference_mode()
    def score(self, contexts: list[list[dict]], responses: list[str]) -> np.ndarray:
        users = [last_user(c) for c in contexts]
        out = np.empty(len(users), dtype=np.float32)
        for rows in self.batches(users, responses):
            out[rows] = self.model(**self.encode(users, responses, rows)).logits[:, 0].float().numpy()
        return out


# --- the work, counted ---------------------------------------------------------------------------


def token_accounting(ours: RewardModel, peer: HFRewardModel, contexts: list[list[dict]], responses: list[str]
                     ) -> dict[str, Any]:
    """Each side's texts and tokens for one round: `useful` (real tokens) and `computed` (rows through
    the matmuls, padding included); `truncated`: the texts (ours) and pairs (peer) longer than the side's truncation length."""
    backbone = ours.backbone
    users = [last_user(c) for c in contexts]
    texts = list(dict.fromkeys(users + list(responses)))  # the cache embeds each distinct text once
    useful = sum(len(ids) for chunk in backbone.batches(texts) for ids in backbone.token_ids(chunk))
    full = backbone.tokenizer(texts)["input_ids"]
    peer_useful = peer_computed = 0
    for rows in peer.batches(users, list(responses)):
        mask = peer.encode(users, list(responses), rows)["attention_mask"]
        peer_useful += int(mask.sum())
        peer_computed += mask.numel()
    pairs = peer.tokenizer(users, list(responses))["input_ids"]
    return {"ours_tokens": {"texts": len(texts), "useful": useful, "computed": useful},
            "peer_tokens": {"texts": len(users), "useful": peer_useful, "computed": peer_computed},
            "truncated": {"ours": sum(len(ids) > backbone.config.max_length for ids in full),
                          "peer": sum(len(ids) > peer.max_length for ids in pairs)}}


def _timed(fn: Callable[[], Any], n: int, before: Callable[[], None] = lambda: None) -> Callable[[], dict[str, Any]]:
    def one_round() -> dict[str, Any]:
        before()
        began = time.perf_counter()
        fn()
        return {"useful": n, "seconds": time.perf_counter() - began}
    return one_round


# --- the bench -----------------------------------------------------------------------------------


def run_bench(n: int = 256, batch: int = 64, max_length: int = 128, threads: int | None = None, rounds: int = 3,
              dtypes: tuple[str, ...] = DTYPES, peer_attention: tuple[str, ...] = PEER_ATTENTION) -> dict[str, Any]:
    """The bench at a fixed thread count (`None`: every core); the caller's count is restored after."""
    for name, asked, known in (("dtype", dtypes, DTYPES), ("peer attention", peer_attention, PEER_ATTENTION)):
        if not asked or set(asked) - set(known):
            raise AlignloopError(f"bench reward: {name} must be some of {', '.join(known)}, got {', '.join(asked)}")
    if rounds < MIN_ROUNDS:
        raise AlignloopError(f"bench reward: at least {MIN_ROUNDS} rounds, got {rounds}")
    with fixed_threads(threads) as n_threads:
        return _run_bench(n, batch, max_length, n_threads, rounds, tuple(dtypes), tuple(peer_attention))


def _run_bench(n: int, batch: int, max_length: int, threads: int, rounds: int, dtypes: tuple[str, ...],
               peer_attention: tuple[str, ...]) -> dict[str, Any]:
    contexts, responses = synthetic_pairs(n)
    ours = {d: our_model(d, batch, max_length) for d in dtypes}
    peers = {(d, a): HFRewardModel(d, a, batch, 2 * max_length) for d in dtypes for a in peer_attention}
    configs: dict[str, Callable[[], dict[str, Any]]] = {}
    for d, model in ours.items():
        configs[f"ours {d}"] = _timed(lambda m=model: m.score(contexts, responses), n, model.backbone.cache.clear)
    for (d, a), peer in peers.items():
        configs[f"peer {d} {a}"] = _timed(lambda p=peer: p.score(contexts, responses), n)
    results = alternate_rounds(configs, rounds=rounds, label="bench reward")

    grid = {name: summary(r) for name, r in results.items()}
    dtype, attention = max(peers, key=lambda k: grid[f"peer {k[0]} {k[1]}"]["median"])
    ours_s, peer_s = grid[f"ours {dtype}"], grid[f"peer {dtype} {attention}"]
    best_peer_at = {d: max(grid[f"peer {d} {a}"]["median"] for a in peer_attention) for d in dtypes}
    model = ours[dtype]
    warm = [_timed(lambda: model.score(contexts, responses), n)() for _ in range(3)]  # cache full from the last round
    counted = token_accounting(model, peers[(dtype, attention)], contexts, responses)
    texts_per_s = {side: round(counted[f"{side}_tokens"]["texts"] * s["median"] / n, 1)
                   for side, s in (("ours", ours_s), ("peer", peer_s))}
    say(f"bench reward ({dtype}, {threads} threads): ours {ours_s['median']:.1f} responses/s (8 heads, cold cache), "
        f"peer ({attention}) {peer_s['median']:.1f}/s, ratio {ours_s['median'] / peer_s['median']:.2f}x")
    return headline(
        "reward", ours_s, peer_s, "responses/s",
        ours_config=(f"alignloop RewardModel.score, MiniLM backbone + {len(HEADS)} heads, cold embedding cache, "
                     f"{dtype}, texts sorted by length, {batch} texts per forward packed without padding, "
                     f"max_length {max_length} per text"),
        peer_config=(f"transformers {transformers.__version__} AutoModelForSequenceClassification(all-MiniLM-L6-v2, "
                     f"num_labels=1), from_pretrained(dtype={dtype}), attn_implementation={attention}, "
                     f"torch.inference_mode, pairs sorted by length, {batch} pairs per forward padded to the "
                     f"batch's longest, truncation at {2 * max_length} per pair"),
        machine=machine_facts(threads, peers=("transformers", "tokenizers")),
        dtype=dtype, peer_attention=attention, responses=n, batch=batch, heads=len(HEADS),
        ratio_by_dtype={d: round(grid[f"ours {d}"]["median"] / best_peer_at[d], 2) for d in dtypes},
        grid=grid, texts_per_s=texts_per_s, **counted,
        ours_warm_cache=round(statistics.median(rate(w) for w in warm), 2))
