"""The prefix cache: lookups find the longest stored prefix (never the whole prompt), the byte budget
holds, and an engine that reuses a finished request's keys/values gives the tokens and log-probs a
full prefill gives, for one row or a batch whose rows reuse different lengths."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastapi.testclient import TestClient

from alignloop.engine import llama
from alignloop.engine.api import SamplingParams
from alignloop.engine.engine import Engine
from alignloop.engine.prefix_cache import MIN_REUSE, PrefixCache
from alignloop.serve.app import create_app
from alignloop.serve.backends import ModelBackend
from alignloop.serve.config import ServeRecipe


def kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((1, 1, n, 2), float(n)), torch.zeros(1, 1, n, 2)


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@settings(max_examples=200, deadline=None)
@given(stored=st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=70), max_size=6),
       prompt=st.lists(st.integers(0, 2), min_size=1, max_size=70))
def test_lookup_finds_a_longest_shared_prefix(stored, prompt):
    cache = PrefixCache(1 << 30)
    for tokens in stored:
        cache.store(tokens, kv(len(tokens)))
    found = cache.lookup(prompt)
    kept = [t for t in stored if len(t) >= MIN_REUSE]
    # Entries are found through whole 16-token blocks, then extended token by token: the best a
    # lookup can miss is a longer match that another entry shares only within the first block.
    limit = len(prompt) - 1
    best = max((min(common(t, prompt), limit) for t in kept), default=0)
    if found is None:
        assert best < MIN_REUSE
        return
    (k, _), n = found
    assert MIN_REUSE <= n <= limit < len(prompt)
    assert n <= k.shape[2]
    assert any(common(t, prompt) >= n and len(t) >= n for t in kept)
    assert n // 16 == best // 16  # the same number of whole blocks as the best entry


def test_budget_drops_least_recently_used():
    per_entry = 2 * 32 * 2 * 4  # two [1, 1, 32, 2] fp32 tensors
    cache = PrefixCache(3 * per_entry)
    runs = [[i] * 32 for i in range(4)]
    for tokens in runs[:3]:
        cache.store(tokens, kv(32))
    assert cache.lookup(runs[0] + [9]) is not None       # 0 is now the most recently used
    cache.store(runs[3], kv(32))                         # over budget: 1 goes
    assert len(cache) == 3 and cache.bytes == 3 * per_entry
    assert cache.lookup(runs[1] + [9]) is None
    assert all(cache.lookup(runs[i] + [9]) is not None for i in (0, 2, 3))
    assert cache.lookup(runs[0]) is not None and cache.lookup(runs[0])[1] == 31  # the last token is computed
    with pytest.raises(ValueError, match="positive"):
        PrefixCache(0)


@pytest.fixture(scope="module")
def engines(tiny):
    plain = Engine(*tiny, dtype="float32", max_batch=4, show_progress=False)
    cached = Engine(*tiny, dtype="float32", max_batch=4, show_progress=False)
    cached.use_prefix_cache(64 << 20)
    return plain, cached


def conversation(engine: Engine, words: list[str]) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": " ".join(words)}])


@pytest.mark.parametrize("row_by_row", [False, True])
def test_next_exchange_reuses_the_previous_one_and_matches_a_full_prefill(engines, row_by_row, monkeypatch):
    plain, cached = engines
    cached.use_prefix_cache(64 << 20)
    if row_by_row:  # the path a batch with one long uncached prompt among short ones takes
        monkeypatch.setattr(llama, "ATTENTION_SCORES_MAX", 0)
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    topics = (["tell", "me", "about", "rivers"], ["what", "do", "mountains", "do"], ["sing", "a", "song"])
    first = [conversation(plain, words * 3) for words in topics]
    firsts = cached.generate(first, greedy)
    assert firsts == plain.generate(first, greedy)
    assert cached.prefix_cache.hits == 0 and len(cached.prefix_cache) == 3
    # Each conversation goes on: the previous prompt and answer, then new tokens; one prompt is new.
    follow = [p + c.token_ids + plain.encode_chat([{"role": "user", "content": "and then?"}])[-6:]
              for p, c in zip(first, firsts)]
    follow.append(conversation(plain, ["something", "else", "entirely"] * 3))
    sampled = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=10, seed=7 + i) for i in range(4)]
    want = plain.generate(follow, sampled)
    got = cached.generate(follow, sampled)
    stats = cached.prefix_cache.stats()
    # Every earlier prompt and all of its answer but the last token (never fed back) were reused;
    # the new conversation reuses the chat template's opening (its system prompt) at most.
    assert stats["hits"] == 4
    earlier = sum(len(p) + len(c.token_ids) - 1 for p, c in zip(first, firsts))
    assert earlier <= stats["reused_tokens"] < earlier + len(follow[3])
    assert [c.cached_tokens for c in got[:3]] == [len(p) + len(c.token_ids) - 1 for p, c in zip(first, firsts)]
    assert all(c.cached_tokens == 0 for c in want)
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=1e-4, atol=1e-4)


def test_new_weights_empty_the_cache(engines, tiny):
    _, cached = engines
    cached.generate([conversation(cached, ["weights"] * 20)], SamplingParams(temperature=0.0, max_tokens=4))
    assert len(cached.prefix_cache) > 0
    cached.load_weights(tiny[0].state_dict().items())
    assert len(cached.prefix_cache) == 0


def test_the_openai_api_reports_cached_prompt_tokens(tiny, tmp_path):
    engine = Engine(*tiny, dtype="float32", max_batch=2, show_progress=False)
    engine.use_prefix_cache(16 << 20)
    recipe = ServeRecipe.model_validate({
        "serve": {"store": str(tmp_path / "logs.db"), "api_keys": ["k"], "context": 256},
        "models": [{"version": "v1", "model": "tiny-llama"}], "generation": {"max_tokens": 8}})
    backends = {"v1": ModelBackend("v1", engine, context=256, threads=1)}
    headers = {"Authorization": "Bearer k"}
    messages = [{"role": "system", "content": "You answer in one short sentence, always."},
                {"role": "user", "content": "what is a river made of?"}]
    with TestClient(create_app(recipe, backends=backends)) as client:
        first = client.post("/v1/chat/completions", headers=headers, json={"messages": messages, "seed": 1}).json()
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        messages += [first["choices"][0]["message"], {"role": "user", "content": "and a mountain?"}]
        body = {"messages": messages, "seed": 2, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", headers=headers, json=body) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    # At least the whole first prompt was reused (and the answer, where it re-tokenizes the same).
    assert first["usage"]["prompt_tokens"] <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
