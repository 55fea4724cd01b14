"""`alignloop bench reward`: scoring throughput of the CPU default reward model vs a plain HF reward model.

Ours: frozen all-MiniLM-L6-v2 features (last user message and response embedded separately, no
cross-attention) + small heads for every signal at once, with the embedding cache off for the cold
number. Peer: `AutoModelForSequenceClassification` on the same MiniLM weights (a BERT cross-encoder
over "context [SEP] response", one score) — a reward model of the same size as practitioners build
it. Same texts, same threads, same max_length per text.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignloop.rewards.backbones import MiniLMBackbone, minilm_dir
from alignloop.rewards.config import BackboneSection, HeadTrainSection
from alignloop.rewards.model import RewardModel
from alignloop.train.threads import torch_threads
from alignloop.ui import say

WORDS = ("ramen sushi travel music guitar concert football science planets puppy movie popcorn hiking beach "
         "coffee recipe tomato rhythm galaxy kitten festival mountain river novel dragon castle").split()


def synthetic_pairs(n: int, seed: int = 0) -> tuple[list[list[dict]], list[str]]:
    rng = np.random.default_rng(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS, k)) + rng.choice([".", "?", "!"])

    contexts = [[{"role": "user", "content": text(int(rng.integers(5, 25)))}] for _ in range(n)]
    responses = [text(int(rng.integers(10, 60))) for _ in range(n)]
    return contexts, responses


def run_bench(n: int = 256, batch: int = 64, max_length: int = 128, threads: int = 1, rounds: int = 2) -> dict[str, Any]:
    """The benchmark at `threads` torch threads; the caller's thread count is restored after."""
    with torch_threads(threads):
        return _run_bench(n, batch, max_length, threads, rounds)


def _run_bench(n: int, batch: int, max_length: int, threads: int, rounds: int) -> dict[str, Any]:
    contexts, responses = synthetic_pairs(n)
    heads = ["preference", "thumbs", "continue", "turns_after", "time_to_next", "returned_1d", "returned_7d", "safety"]
    ours = RewardModel(MiniLMBackbone(BackboneSection(max_length=max_length, batch_size=batch)), heads,
                       HeadTrainSection())
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    peer = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=1).eval()

    def score_ours() -> None:
        ours.backbone.cache.rows.clear()  # cold: every text embedded again
        for i in range(0, n, batch):
            ours.score(contexts[i:i + batch], responses[i:i + batch])

    @torch.inference_mode()
    def score_peer() -> None:
        for i in range(0, n, batch):
            enc = tok([c[-1]["content"] for c in contexts[i:i + batch]], responses[i:i + batch], padding=True,
                      truncation=True, max_length=2 * max_length, return_tensors="pt")
            peer(**enc).logits

    times: dict[str, list[float]] = {"ours": [], "peer": []}
    score_ours(), score_peer()  # warm-up
    for _ in range(rounds):  # alternate, so load on a shared machine hits both alike
        for name, fn in (("ours", score_ours), ("peer", score_peer)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    t = time.perf_counter()
    ours.score(contexts, responses)  # everything cached: what a repeated context costs
    warm = n / (time.perf_counter() - t)
    ours_rps, peer_rps = n / min(times["ours"]), n / min(times["peer"])
    say(f"bench reward: ours {ours_rps:.1f} responses/s ({len(heads)} heads, cold cache), warm cache {warm:.1f}/s; "
        f"HF AutoModelForSequenceClassification (MiniLM cross-encoder, 1 score) {peer_rps:.1f}/s; "
        f"ratio {ours_rps / peer_rps:.2f}x")
    return {"bench": "reward", "ours": round(ours_rps, 2), "peer": round(peer_rps, 2), "unit": "responses/s",
            "ratio": round(ours_rps / peer_rps, 3), "ours_warm_cache": round(warm, 2), "heads": len(heads),
            "responses": n, "batch": batch, "threads": threads}
