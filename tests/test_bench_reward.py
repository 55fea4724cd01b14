"""`alignloop bench reward`: both sides score the same pairs with the same batch size, threads and
dtype; batching order does not change a score; the JSON line carries the harness's fields."""

import numpy as np
import pytest
import torch

from alignloop.errors import AlignloopError
from alignloop.bench import reward as bench
from alignloop.bench.reward import HFRewardModel, our_model, run_bench, synthetic_pairs, token_accounting
from alignloop.rewards.model import RewardModel


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs(12)


@pytest.fixture(scope="module")
def ours():
    return our_model("float32", batch=4)


@pytest.fixture(scope="module")
def peer():
    return HFRewardModel("float32", batch=4)


def _fresh_scores(model: RewardModel, contexts, responses) -> dict[str, np.ndarray]:
    model.backbone.cache.clear()
    return model.score(contexts, responses)


def test_our_scores_do_not_depend_on_the_order_or_the_batch_of_a_pair(ours, pairs):
    contexts, responses = pairs
    base = _fresh_scores(ours, contexts, responses)
    again = _fresh_scores(ours, contexts, responses)
    perm = np.random.default_rng(1).permutation(len(responses))
    shuffled = _fresh_scores(ours, [contexts[i] for i in perm], [responses[i] for i in perm])
    for head in ours.names:
        np.testing.assert_array_equal(base[head], again[head])  # eval mode: no dropout in the heads
        np.testing.assert_allclose(shuffled[head], base[head][perm], rtol=1e-4, atol=1e-5)
    # Sorted batches of 4 vs one text per forward vs the given (unsorted) order in one batch.
    texts = [c[-1]["content"] for c in contexts[:3]] + list(responses[:3])
    backbone = ours.backbone
    sorted_batches = {t: v for chunk in backbone.batches(texts) for t, v in zip(chunk, backbone._encode(chunk))}
    one_by_one = np.concatenate([backbone._encode([t]) for t in texts])
    unsorted = backbone._encode(texts)
    np.testing.assert_allclose(np.stack([sorted_batches[t] for t in texts]), one_by_one, atol=1e-5)
    np.testing.assert_allclose(unsorted, one_by_one, atol=1e-5)


def test_peer_scores_do_not_depend_on_sorting_and_its_batches_are_sorted(peer, pairs):
    contexts, responses = pairs
    unsorted = HFRewardModel("float32", batch=4, sort=False)
    np.testing.assert_allclose(peer.score(contexts, responses), unsorted.score(contexts, responses), atol=1e-5)
    users = [c[-1]["content"] for c in contexts]
    rows = [i for batch in peer.batches(users, responses) for i in batch]
    assert sorted(rows) == list(range(len(users)))
    lengths = [len(users[i]) + len(responses[i]) for i in rows]
    assert lengths == sorted(lengths)
    assert [i for batch in unsorted.batches(users, responses) for i in batch] == list(range(len(users)))


def test_both_sides_count_the_same_texts_untruncated(ours, peer, pairs):
    contexts, responses = pairs
    counted = token_accounting(ours, peer, contexts, responses)
    assert counted["ours_tokens"]["texts"] == 2 * len(responses)  # the synthetic texts never repeat
    assert counted["peer_tokens"]["texts"] == len(responses)
    assert counted["truncated"] == {"ours": 0, "peer": 0}
    assert counted["ours_tokens"]["computed"] == counted["ours_tokens"]["useful"]  # packed: no padding
    assert counted["peer_tokens"]["computed"] >= counted["peer_tokens"]["useful"]
    # The pair's tokens are the two texts' tokens with one [CLS]/[SEP] pair fewer: the same words.
    assert counted["peer_tokens"]["useful"] == counted["ours_tokens"]["useful"] - len(responses)


def test_the_bench_runs_both_sides_on_the_same_work_and_prints_the_harness_line(monkeypatch):
    seen = []
    our_score, peer_score = RewardModel.score, HFRewardModel.score

    def ours_spy(self, contexts, responses, act=None):
        seen.append(("ours", torch.get_num_threads(), self.backbone.encoder.dtype, self.backbone.config.batch_size,
                     [c[-1]["content"] for c in contexts], list(responses)))
        return our_score(self, contexts, responses, act)

    def peer_spy(self, contexts, responses):
        seen.append(("peer", torch.get_num_threads(), self.model.dtype, self.batch,
                     [c[-1]["content"] for c in contexts], list(responses)))
        return peer_score(self, contexts, responses)

    monkeypatch.setattr(RewardModel, "score", ours_spy)
    monkeypatch.setattr(HFRewardModel, "score", peer_spy)
    before = torch.get_num_threads()
    line = run_bench(n=8, batch=4, threads=1, rounds=3, dtypes=("float32",), peer_attention=("sdpa",))
    assert torch.get_num_threads() == before  # later tests compare runs across processes
    timed = [s for s in seen[:8]]  # warm-up + 3 rounds per side; the warm-cache number comes after
    assert sorted(s[0] for s in timed) == ["ours"] * 4 + ["peer"] * 4
    assert {s[1:4] for s in timed} == {(1, torch.float32, 4)}
    assert all(s[4:] == timed[0][4:] for s in timed)
    assert line["bench"] == "reward" and line["unit"] == "responses/s" and line["rounds"] == 3
    assert line["ours"] > 0 and line["peer"] > 0
    assert abs(line["ratio"] - line["ours"] / line["peer"]) < 0.01
    assert line["ours_min_max"][0] <= line["ours"] <= line["ours_min_max"][1]
    assert line["dtype"] == "float32" and line["peer_attention"] == "sdpa"
    assert set(line["grid"]) == {"ours float32", "peer float32 sdpa"}
    assert line["machine"]["threads"] == 1 and line["machine"]["versions"]["transformers"]
    assert line["ours_tokens"]["texts"] == 16 and line["peer_tokens"]["texts"] == 8
    assert line["truncated"] == {"ours": 0, "peer": 0}
    assert "sorted by length" in line["peer_config"] and "bfloat16" not in line["peer_config"]


def test_the_headline_compares_the_peers_fastest_configuration_in_its_dtype(monkeypatch, ours, peer):
    rates = {"ours bfloat16": 30.0, "ours float32": 20.0, "peer bfloat16 sdpa": 10.0, "peer float32 sdpa": 15.0}

    def fake_rounds(configs, rounds, label):
        assert set(configs) == set(rates)
        return {name: [{"useful": rates[name], "seconds": 1.0}] * rounds for name in configs}

    monkeypatch.setattr(bench, "alternate_rounds", fake_rounds)
    monkeypatch.setattr(bench, "our_model", lambda *args: ours)  # no timing here: no model per dtype either
    monkeypatch.setattr(bench, "HFRewardModel", lambda *args: peer)
    line = run_bench(n=8, batch=4, threads=1, rounds=3, peer_attention=("sdpa",))
    assert (line["dtype"], line["ours"], line["peer"], line["ratio"]) == ("float32", 20.0, 15.0, 1.33)
    assert line["ratio_by_dtype"] == {"bfloat16": 3.0, "float32": 1.33}


def test_an_unknown_dtype_or_too_few_rounds_is_one_line():
    with pytest.raises(AlignloopError, match="dtype must be some of bfloat16, float32"):
        run_bench(n=8, dtypes=("float16",))
    with pytest.raises(AlignloopError, match="at least 3 rounds"):
        run_bench(n=8, rounds=2)


def test_the_cold_path_embeds_every_text_again_after_the_cache_is_emptied(tmp_path):
    from alignloop.rewards.backbones import EmbeddingCache

    cache = EmbeddingCache(2, tmp_path, chunk=1, identity={"model": "m"})
    cache.put(["a", "b"], np.array([[1, 0], [0, 1]], dtype=np.float32))
    cache.put(["c"], np.array([[1, 1]], dtype=np.float32))
    np.testing.assert_array_equal(cache.get(["c", "a"]), [[1, 1], [1, 0]])
    assert cache.missing(["a", "d", "d"]) == ["d"]
    cache.clear()
    assert cache.missing(["a", "b", "c"]) == ["a", "b", "c"] and len(cache.vectors) == 0
    reopened = EmbeddingCache(2, tmp_path, identity={"model": "m"})  # the files stay
    np.testing.assert_array_equal(reopened.get(["b", "c"]), [[0, 1], [1, 1]])
