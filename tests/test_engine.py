import warnings

import pytest
import torch

from alignloop.bench.prompts import bench_prompts
from alignloop.engine.api import SamplingParams
from alignloop.engine.engine import Engine

NEAR_TIE = 1e-4


def hf_greedy(model, ids: list[int], max_new: int):
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(ids):].tolist(), [s[0] for s in out.scores]


def assert_same_greedy(model, engine, prompts, max_new):
    """Token-identical to HF greedy, except right after a near-tie (top-2 logit gap < 1e-4)."""
    encoded = [engine.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    ours = engine.generate(encoded, SamplingParams(temperature=0, max_tokens=max_new))
    ties = 0
    for ids, out in zip(encoded, ours):
        theirs, scores = hf_greedy(model, ids, max_new)
        for step, (a, b) in enumerate(zip(out.token_ids, theirs)):
            if a != b:
                top2 = scores[step].float().topk(2).values
                gap = float(top2[0] - top2[1])
                assert gap < NEAR_TIE, f"diverged at step {step} with top-2 gap {gap}"
                warnings.warn(f"near-tie at step {step} (gap {gap:.2e}): divergence allowed")
                ties += 1
                break
        else:
            # No divergence: both stopped at the same place too.
            assert out.token_ids == theirs[: len(out.token_ids)]
            assert len(out.token_ids) == len(theirs)
    return ties


def test_greedy_matches_hf_generate_smollm2(smollm2):
    model, tokenizer = smollm2
    engine = Engine(model, tokenizer, dtype="float32", show_progress=False)
    ties = assert_same_greedy(model, engine, bench_prompts()[:8], max_new=48)
    assert ties <= 1


@pytest.mark.parametrize("fixture", ["tiny", "tiny_qwen2"])
def test_greedy_matches_hf_generate_tiny(fixture, request):
    model, tokenizer = request.getfixturevalue(fixture)
    engine = Engine(model, tokenizer, dtype="float32", show_progress=False)
    assert_same_greedy(model, engine, bench_prompts()[:4], max_new=24)


def test_logprobs_match_hf_scores(smollm2):
    model, tokenizer = smollm2
    engine = Engine(model, tokenizer, dtype="float32", show_progress=False)
    ids = engine.encode_chat([{"role": "user", "content": "Name a color."}])
    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=8))[0]
    _, scores = hf_greedy(model, ids, 8)
    for tok, lp, s in zip(out.token_ids, out.logprobs, scores):
        assert lp == pytest.approx(torch.log_softmax(s.float(), -1)[tok].item(), abs=1e-4)


def test_continuous_batching_gives_same_greedy_output_for_any_batch_size(smollm2):
    model, tokenizer = smollm2
    prompts = [[{"role": "user", "content": p}] for p in bench_prompts()[:6]]
    params = SamplingParams(temperature=0, max_tokens=24)
    wide = Engine(model, tokenizer, dtype="float32", max_batch=6, show_progress=False).chat(prompts, params)
    narrow = Engine(model, tokenizer, dtype="float32", max_batch=2, show_progress=False).chat(prompts, params)
    agree = sum(a.token_ids == b.token_ids for a, b in zip(wide, narrow))
    assert agree >= 5  # numerics differ with row count; at most a near-tie may flip one


def test_stop_conditions_and_finish_reasons(smollm2):
    model, tokenizer = smollm2
    engine = Engine(model, tokenizer, dtype="float32", show_progress=False)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    eos = engine.chat([chat], SamplingParams(temperature=0, max_tokens=64))[0]
    assert eos.finish_reason == "stop" and eos.stop_reason == tokenizer.eos_token_id
    assert eos.token_ids[-1] == tokenizer.eos_token_id
    assert "Paris" in eos.text and "<|im_end|>" not in eos.text
    short = engine.chat([chat], SamplingParams(temperature=0, max_tokens=3))[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3
    assert short.token_ids == eos.token_ids[:3]
    cut = engine.chat([chat], SamplingParams(temperature=0, max_tokens=64, stop=("France",)))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == "France"
    assert "France" not in cut.text and eos.text.startswith(cut.text)
    tok_stop = engine.chat([chat], SamplingParams(temperature=0, max_tokens=64,
                                                  stop_token_ids=(eos.token_ids[1],)))[0]
    assert tok_stop.token_ids == eos.token_ids[:2] and tok_stop.stop_reason == eos.token_ids[1]
    no_eos = engine.chat([chat], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert len(no_eos.token_ids) == 12 and no_eos.finish_reason == "length"


def test_more_prompts_than_slots_all_finish_in_order(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, dtype="float32", max_batch=3, show_progress=False)
    prompts = [f"count to {i}" for i in range(10)]
    params = [SamplingParams(temperature=1.0, max_tokens=1 + i % 5, seed=i) for i in range(10)]
    outs = engine.generate(prompts, params)
    assert [len(o.token_ids) <= 1 + i % 5 for i, o in enumerate(outs)] == [True] * 10
    # every decode step counted by its live rows (a sequence's first token comes from its prefill)
    rows = engine.step_rows
    assert sum(rows.values()) == engine.stats["decode_steps"] and max(rows) <= 3
    assert sum(n * steps for n, steps in rows.items()) == sum(len(o.token_ids) - 1 for o in outs)
    alone = [engine.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    # Per-request seeds: a request samples the same path whatever shares its batch (tiny logits
    # are near-flat, so allow a rare flip from batch-size numerics).
    assert sum(a.token_ids == b.token_ids for a, b in zip(outs, alone)) >= 9


def test_seeds_reproduce_and_differ(smollm2):
    model, tokenizer = smollm2
    engine = Engine(model, tokenizer, dtype="float32", show_progress=False)
    chat = [[{"role": "user", "content": "Tell me a story about a dragon."}]]
    run = lambda seed: engine.chat(chat, SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24,  # noqa: E731
                                                        seed=seed))[0].token_ids
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_load_weights_in_place(tiny):
    from alignloop.models import load_model

    model, tokenizer = tiny
    other, _ = load_model("tiny-llama", seed=99)
    engine = Engine(model, tokenizer, dtype="float32", show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=16)
    before = engine.generate(["hello there"], params)[0].token_ids
    cache = engine.lm.k_cache
    engine.load_weights(other.state_dict().items())
    after = engine.generate(["hello there"], params)[0].token_ids
    fresh = Engine(other, tokenizer, dtype="float32", show_progress=False).generate(["hello there"], params)[0]
    assert after == fresh.token_ids and after != before
    assert engine.lm.k_cache is cache  # same engine, same buffers: no reload


def test_bf16_engine_runs_and_mostly_agrees(smollm2):
    # Not "the greedy answer says Paris": that first token is a near-tie in fp32 ("The" -1.883 vs
    # "L" -1.965), and bf16 on an AMX CPU ties it exactly (-1.986 both) and takes the other branch,
    # while transformers' bf16 happens to keep "The". What must hold is that bf16 is fp32 up to
    # rounding: next-token log-probs close, and bf16's pick always among fp32's top 3.
    model, tokenizer = smollm2
    e32 = Engine(model, tokenizer, dtype="float32", show_progress=False)
    e16 = Engine(model, tokenizer, dtype="bfloat16", show_progress=False)
    for text in ["What is the capital of France?", *bench_prompts()[:5]]:
        ids = e32.encode_chat([{"role": "user", "content": text}])
        logprobs = []
        for e in (e32, e16):
            e.lm.ensure_cache(1, len(ids) + 1)
            logprobs.append(torch.log_softmax(e.lm.prefill([ids], 0)[0].float(), -1))
        top = torch.topk(logprobs[0], 50).indices
        assert (logprobs[0][top] - logprobs[1][top]).abs().mean() < 0.15, text
        assert int(logprobs[1].argmax()) in torch.topk(logprobs[0], 3).indices.tolist(), text
    out = e16.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                   SamplingParams(temperature=0, max_tokens=16))[0]
    assert out.text.strip() and len(out.token_ids) <= 16


def test_bad_requests_are_clear_errors(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, dtype="float32", show_progress=False)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="2 prompts but 1"):
        engine.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
