"""The engine's DeepSeek runner (latent cache, absorbed decode, MoE) and MTP speculative decoding,
against the model's own forward on tiny-deepseek in fp32."""

from __future__ import annotations

import pytest
import torch

from alignloop.engine.api import SamplingParams
from alignloop.engine.deepseek import DeepseekLM
from alignloop.engine.engine import Engine
from alignloop.engine.mtp import MTPGreedy
from alignloop.models import load_model

# Different lengths, and max_tokens that end the rows at different steps; 5 prompts through 3 slots,
# so rows leave, the batch is re-packed and waiting prompts are prefilled mid-run.
PROMPTS = [[5, 17, 300, 9], list(range(100, 113)), [42], list(range(1000, 1030)), [7, 8, 9, 10, 11, 12]]
MAX_TOKENS = [6, 9, 3, 12, 5]


pytestmark = pytest.mark.usefixtures("one_thread")  # a 6M-parameter model: one thread


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-deepseek", seed=0)


def params():
    return [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]


@torch.no_grad()
def model_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """The model's own cached generation: prefill, then one absorbed decode step per token."""
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens, logprobs = [], []
    for _ in range(n):
        lp = out.logits[0, -1].float().log_softmax(-1)
        t = int(lp.argmax())
        tokens.append(t)
        logprobs.append(float(lp[t]))
        out = model(torch.tensor([[t]]), cache=out.cache, use_cache=True)
    return tokens, logprobs


def test_engine_greedy_and_routing_match_the_model(model):
    net, tokenizer = model
    engine = Engine(net, tokenizer, dtype="float32", max_batch=3, show_progress=False, record_routing=True)
    outs = engine.generate(PROMPTS, params())
    for prompt, n, out in zip(PROMPTS, MAX_TOKENS, outs):
        tokens, logprobs = model_greedy(net, prompt, n)
        assert out.token_ids == tokens
        assert max(abs(a - b) for a, b in zip(out.logprobs, logprobs)) < 1e-4  # measured <= 1e-6
        with torch.no_grad():
            full = net(torch.tensor([prompt + out.token_ids]), output_routing=True)
        expected = torch.stack([r[0] for r in full.routing])  # [moe layers, tokens, K]
        # Every token fed to the model: the prompt and all generated tokens but the last.
        assert out.routing.shape == (3, len(prompt) + n - 1, 2)
        assert torch.equal(out.routing.long().sort(-1).values, expected[:, :-1].sort(-1).values)


def test_shared_prompt_prefix_is_prefilled_once_and_changes_nothing(model):
    net, tokenizer = model
    prefix = list(range(300, 309))
    prompts = [prefix + [1, 2, 3], prefix + [4], prefix + [5, 6, 7, 8, 9]]
    engine = Engine(net, tokenizer, dtype="float32", max_batch=3, show_progress=False, record_routing=True)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = model_greedy(net, prompt, 4)
        assert out.token_ids == tokens
        assert max(abs(a - b) for a, b in zip(out.logprobs, logprobs)) < 1e-4
        with torch.no_grad():
            full = net(torch.tensor([prompt + out.token_ids]), output_routing=True)
        expected = torch.stack([r[0] for r in full.routing])[:, :-1]
        assert torch.equal(out.routing.long().sort(-1).values, expected.sort(-1).values)


def test_routing_is_off_by_default(model):
    net, tokenizer = model
    out = Engine(net, tokenizer, dtype="float32", max_batch=2, show_progress=False).generate(PROMPTS[:2], params()[:2])
    assert out[0].routing is None


def test_load_weights_replaces_the_engines_copy(model):
    net, tokenizer = model
    engine = Engine(net, tokenizer, dtype="float32", max_batch=2, show_progress=False)
    other, _ = load_model("tiny-deepseek", seed=1)
    engine.load_weights(other.state_dict().items())
    out = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert out.token_ids == model_greedy(other, PROMPTS[1], 4)[0]


def test_bfloat16_runs(model):
    net, tokenizer = model
    engine = Engine(net, tokenizer, dtype="bfloat16", max_batch=2, show_progress=False)
    outs = engine.generate(PROMPTS[:3], params()[:3])
    assert [len(o.token_ids) for o in outs] == MAX_TOKENS[:3]
    assert net.dtype == torch.float32  # the engine converted its own copy


@torch.no_grad()
def test_cached_mtp_matches_the_models_mtp_forward(model):
    net, _ = model
    seq = list(range(200, 220))
    lm = DeepseekLM(net, torch.float32, max_slots=1)
    P = 12
    hidden = lm.prefill_hidden([seq[:P]], 0)
    got = [lm.mtp(hidden, torch.tensor([seq[1:P + 1]]), torch.arange(P)[None])[0]]  # fresh: plain path
    for m in range(P, len(seq) - 1):  # then one row at a time: absorbed against the MTP cache
        h = lm.forward(torch.tensor([[seq[m]]]), torch.tensor([[m]]))
        got.append(lm.mtp(h, torch.tensor([[seq[m + 1]]]), torch.tensor([[m]]))[0])
    expected = net(torch.tensor([seq]), mtp=True).mtp_logits[0][0]
    assert (torch.cat(got) - expected).abs().max() < 1e-4


class _Oracle(MTPGreedy):
    """Drafts the right token on every other draft (the random-init MTP head almost never does), so
    both the accept and the reject path run."""

    def __init__(self, lm, expected: dict[tuple[int, ...], list[int]]):
        super().__init__(lm)
        self.expected, self.calls = expected, 0

    def _draft(self, live, fresh):
        super()._draft(live, fresh)
        self.calls += 1
        for row in live:
            want = self.expected[tuple(row.prompt)]
            k = len(row.out.token_ids)  # the draft is for completion token k
            if self.calls % 2 and k < len(want):
                row.draft = want[k]


def test_mtp_speculative_greedy_equals_plain_greedy(model):
    net, tokenizer = model
    plain = Engine(net, tokenizer, dtype="float32", max_batch=3, show_progress=False).generate(PROMPTS, params())
    spec = MTPGreedy(DeepseekLM(net, torch.float32, max_slots=3))
    outs = spec.generate(PROMPTS, MAX_TOKENS)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert spec.stats.drafts > 0 and spec.stats.generated == sum(MAX_TOKENS)

    oracle = _Oracle(DeepseekLM(net, torch.float32, max_slots=3),
                     {tuple(p): o.token_ids for p, o in zip(PROMPTS, plain)})
    outs = oracle.generate(PROMPTS, MAX_TOKENS)
    for a, b in zip(outs, plain):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    assert 0 < oracle.stats.accepted < oracle.stats.drafts
    assert oracle.stats.verify_steps < sum(MAX_TOKENS)


def test_mtp_stops_at_a_stop_token(model):
    net, tokenizer = model
    plain = Engine(net, tokenizer, dtype="float32", max_batch=1, show_progress=False).generate(
        [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))[0]
    stop = plain.token_ids[4]
    first = plain.token_ids.index(stop)
    out = MTPGreedy(DeepseekLM(net, torch.float32, max_slots=1), stop_ids=[stop]).generate([PROMPTS[1]], 9)[0]
    assert out.token_ids == plain.token_ids[: first + 1] and out.finish_reason == "stop"
