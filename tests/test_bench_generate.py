"""`alignloop bench generate`: token accounting, the harness's rounds, and what the JSON line says.

No timing is asserted: the peers are fakes with fixed rates where the logic under test (which
configuration is the headline, which dtype) must not depend on this machine's speed, and real
sides run on the tiny model only to check what they count.
"""

import pytest

from alignloop.bench import generate, harness
from alignloop.bench.generate import (
    Ours,
    TransformersGenerate,
    TransformersGenerateBatch,
    eos_ids,
    padded_batch_tokens,
    useful_tokens,
    workload,
)

EOS = frozenset({2})


def test_padded_batch_counts_useful_up_to_eos_and_computes_every_slot():
    # A padded batch of 3 rows that ran 5 steps: row 0 stopped at step 3 and kept computing pads,
    # row 1 never stopped, row 2 stopped at once.
    rows = [[5, 6, 2, 2, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]]
    assert padded_batch_tokens(rows, EOS) == (3 + 5 + 1, 15)
    assert padded_batch_tokens(rows, EOS, ignore_eos=True) == (15, 15)
    assert useful_tokens([7, 2, 9], EOS) == 2 and useful_tokens([], EOS) == 0


@pytest.fixture(scope="module")
def tiny_work(tiny):
    model, tokenizer = tiny
    return workload(tokenizer, eos_ids(model, tokenizer), n_prompts=3, max_tokens=6)


def test_each_side_counts_what_it_generated_and_computed(tiny, tiny_work):
    model, tokenizer = tiny
    side = Ours(model, tokenizer, "float32", tiny_work)
    # every side starts from the same token ids: the chat template's, as the engine encodes a chat
    assert tiny_work.prompt_ids == [side.engine.encode_chat(c) for c in tiny_work.chats]
    ours = side()
    assert ours["useful"] == ours["computed"] <= 3 * 6  # rows leave at EOS: nothing wasted
    fixed = Ours(model, tokenizer, "float32", tiny_work.fixed_length())()
    assert fixed["useful"] == fixed["computed"] == 3 * 6 and fixed["eos_rate"] == 0

    for cache in ("dynamic", "static"):
        peer = TransformersGenerate(model, tokenizer, tiny_work, batch=2, cache=cache)
        assert [len(b["input_ids"]) for b in peer.batches] == [2, 1]
        r = peer()
        # computed: every row of each padded batch for as many steps as its longest row ran
        assert r["useful"] <= r["computed"] <= 3 * 6

    cb = TransformersGenerateBatch(model, tokenizer, tiny_work, max_requests=2)
    try:
        r = cb()
    finally:
        cb.close()
    assert r["useful"] == r["computed"] <= 3 * 6
    with pytest.raises(ValueError, match="EOS"):
        TransformersGenerate(model, tokenizer, tiny_work.fixed_length(), batch=2)


class FakeSide:
    """A peer with a fixed rate: `useful` tokens in `useful / rate` seconds."""

    def __init__(self, rate: float, useful: int = 100, computed: int = 120):
        self.rate, self.useful, self.computed = rate, useful, computed

    def __call__(self):
        return {"useful": self.useful, "computed": self.computed, "seconds": self.useful / self.rate,
                "eos_rate": 0.5}


# fp32 is the fastest transformers path here on purpose: the headline must still be bf16 vs bf16.
RATES = {("generate", "bfloat16"): 40.0, ("generate", "float32"): 90.0,
         ("generate_batch", "bfloat16"): 30.0, ("generate_batch", "float32"): 20.0}


class FakeVllm:
    def __init__(self, model, dtype, threads, max_num_seqs=64):
        self.dtype = dtype

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def run(self, prompts, max_tokens, seeds, temperature, top_p, ignore_eos=False):
        assert len(seeds) == len(prompts) and temperature == 1.0 and top_p == 0.95
        n = len(prompts) * max_tokens
        return {"useful": n if ignore_eos else n // 2, "computed": n if ignore_eos else n // 2,
                "seconds": 1.0 if ignore_eos else 0.8, "eos_rate": 0.0 if ignore_eos else 0.5}

    def facts(self):
        return {"vllm": "fake", "dtype": self.dtype}


class FakeLlamaCpp(FakeVllm):
    def __init__(self, dtype, threads, n_seq, n_ctx):
        self.dtype = dtype
        assert n_seq == 3 and n_ctx >= 3 * 4

    def run(self, prompt_ids, max_tokens, seeds, temperature, top_p, ignore_eos=False):
        assert all(isinstance(t, int) for p in prompt_ids for t in p)  # the same token ids as ours
        result = super().run(prompt_ids, max_tokens, seeds, temperature, top_p, ignore_eos)
        return {**result, "seconds": result["seconds"] * (0.5 if self.dtype == "q4_1" else 2.0)}

    def facts(self):
        return {"llama_cpp_python": "fake", "dtype": self.dtype}


@pytest.fixture
def fake_peers(monkeypatch):
    from alignloop.bench import llamacpp_peer, vllm_peer

    monkeypatch.setattr(llamacpp_peer, "available", lambda: None)
    monkeypatch.setattr(llamacpp_peer, "LlamaCppPeer", FakeLlamaCpp)

    def side(path, model, tokenizer, work, batch):
        dtype = str(model.dtype).removeprefix("torch.")
        return FakeSide(RATES[path, dtype] * (1.5 if batch == 4 else 1.0))

    monkeypatch.setattr(generate, "transformers_side", side)
    monkeypatch.setattr(vllm_peer, "available", lambda: None)
    monkeypatch.setattr(vllm_peer, "VllmPeer", FakeVllm)
    calls: list[str] = []
    seen: dict[str, list[str]] = {}

    def spy(configs, rounds, warmup, label):
        seen["names"] = list(configs)
        logged = {name: (lambda name=name, fn=fn: (calls.append(name), fn())[1]) for name, fn in configs.items()}
        return harness.alternate_rounds(logged, rounds=rounds, warmup=warmup, label=label)

    monkeypatch.setattr(generate, "alternate_rounds", spy)
    return calls, seen


def run_tiny(**kwargs):
    settings = dict(model="tiny", n_prompts=3, max_tokens=4, rounds=3, threads=1, dtype="bfloat16",
                    peer_batches=(2, 4), peer_dtypes=("bfloat16", "float32"), paths=("generate", "generate_batch"),
                    sweep_tokens=2)
    return generate.run_bench(**{**settings, **kwargs})


def test_every_configuration_is_warmed_up_then_alternated(fake_peers):
    calls, seen = fake_peers
    run_tiny()
    names = seen["names"]
    # by default transformers is timed at its fastest in our dtype, plus its fastest of all (fp32 here)
    assert set(names) == {"ours bfloat16", "ours bfloat16 fixed-length", "vllm bfloat16", "vllm bfloat16 fixed-length",
                          "gemm ceiling", "gemm ceiling, the sampled run's steps",
                          "transformers generate bfloat16 batch 4", "transformers generate float32 batch 4"}
    k = len(names)
    assert calls[:k] == names  # warm-up: each once
    for r in range(3):
        assert calls[k * (r + 1) : k * (r + 2)] == (names if r % 2 == 0 else names[::-1])
    assert len(calls) == 4 * k


def test_the_line_compares_the_same_dtype_and_gives_the_best_of_each_beside_it(fake_peers):
    line = run_tiny(timed_paths="each")
    for key in ("ours", "peer", "unit", "ratio", "ours_min_max", "peer_min_max", "machine"):
        assert key in line
    assert list(line)[:5] == ["bench", "ours", "peer", "unit", "ratio"]
    assert line["machine"]["threads"] == 1 and "isa" in line["machine"] and "amx" in line["machine"]
    assert line["dtype"] == "bfloat16" and line["ours_config"] == "ours bfloat16"
    assert line["ceiling"]["dtype"] == "bfloat16"  # the roofline in the headline's dtype
    assert line["peer_config"] == "vllm bfloat16"  # vLLM measured: it is the headline peer
    assert line["peer"] == pytest.approx(3 * 4 // 2 / 0.8, rel=0.01)
    assert line["ratio"] == pytest.approx(line["ours"] / line["peer"], abs=0.01)
    # transformers' best in our dtype (bf16 generate at batch 4: 60/s), not its faster fp32 path
    assert line["transformers_best"] == "transformers generate bfloat16 batch 4"
    assert line["ratio_transformers_best"] == pytest.approx(line["ours"] / 60.0, abs=0.01)
    best = line["best_of_each"]
    assert best["peer_config"] == "transformers generate float32 batch 4" and best["peer"] == pytest.approx(135.0)
    # the sweep saw every candidate; the rounds timed each path's best in our dtype + the overall best
    assert len(line["sweep"]["tok_s"]) == 2 * 2 * 2
    timed = {n for n in line["configs"] if n.startswith("transformers")}
    assert timed == {"transformers generate bfloat16 batch 4", "transformers generate_batch bfloat16 max_requests 4",
                     "transformers generate float32 batch 4"}
    # token accounting per side
    assert line["configs"]["transformers generate bfloat16 batch 4"]["computed"] == 120
    ours = line["configs"]["ours bfloat16"]
    assert ours["useful"] == ours["computed"] and 0 <= ours["eos_rate"] <= 1
    fixed = line["fixed_length"]
    assert line["configs"]["ours bfloat16 fixed-length"]["useful"] == 3 * 4
    assert fixed["peer_config"] == "vllm bfloat16 fixed-length" and fixed["peer"] == pytest.approx(12.0)


def test_llamacpp_runs_beside_the_headline_in_our_dtype_and_its_own_q4(fake_peers, monkeypatch):
    from alignloop.bench import llamacpp_peer

    calls, seen = fake_peers
    line = run_tiny(paths=("generate",))
    assert line["llama_cpp"] == {dt: "not measured: llama.cpp runs the smollm2-135m GGUF only, not tiny"
                                 for dt in ("bfloat16", "q4_1")}
    monkeypatch.setattr(llamacpp_peer, "MODEL", "tiny")
    line = run_tiny(paths=("generate",))
    assert {"llama.cpp bfloat16", "llama.cpp bfloat16 fixed-length", "llama.cpp q4_1"} <= set(seen["names"])
    assert line["peer_config"] == "vllm bfloat16"  # llama.cpp is beside the headline, never it
    same, q4 = line["llama_cpp"]["bfloat16"], line["llama_cpp"]["q4_1"]
    assert same["tok_s"]["median"] == pytest.approx(6 / 1.6, rel=0.01)
    assert same["ratio"] == pytest.approx(line["ours"] / same["tok_s"]["median"], abs=0.01)
    assert same["fixed_length"]["tok_s"] == pytest.approx(12 / 2.0, rel=0.01)
    assert "4-bit" in q4["note"] and "fixed_length" not in q4
    assert line["llama_cpp"]["facts"]["llama_cpp_python"] == "fake"
    assert "not measured: --no-llamacpp" == run_tiny(paths=("generate",), llamacpp=False)["llama_cpp"]


def test_the_roofline_is_measured_in_the_headline_dtype(fake_peers):
    line = run_tiny(dtype="float32", paths=("generate",))  # bf16: checked in the test above
    assert line["dtype"] == "float32" and line["ceiling"]["dtype"] == "float32"
    assert line["peer_config"] == "vllm float32" and line["configs"]["vllm float32"]
    assert line["ceiling"]["rows"] == 3 and line["ceiling"]["tok_s"] > 0
    assert line["ours_fraction_of_64_row_ceiling"] == pytest.approx(line["ours"] / line["ceiling"]["tok_s"], abs=1e-3)
    assert line["fixed_length"]["ours_fraction_of_ceiling"] == pytest.approx(
        line["fixed_length"]["ours"] / line["ceiling"]["tok_s"], abs=1e-3)
    # the sampled run against the GEMMs of the steps it ran (3 prompts x 4 tokens: 3 decode steps)
    workload = line["workload_ceiling"]
    assert workload["steps"] == 3 and workload["tok_s"] > 0 and set(workload["step_ms_at_rows"]) == {1, 2, 3}
    assert line["ours_fraction_of_ceiling"] == pytest.approx(line["ours"] / workload["tok_s"], abs=1e-3)


def test_without_vllm_the_line_says_why_and_transformers_is_the_peer(fake_peers, monkeypatch):
    from alignloop.bench import vllm_peer

    monkeypatch.setattr(vllm_peer, "available", lambda: "no .venv-peers: run `make peers`")
    line = run_tiny(paths=("generate",))
    assert line["vllm"] == "not measured: no .venv-peers: run `make peers`"
    assert line["peer_config"] == "transformers generate bfloat16 batch 4" and line["peer"] == pytest.approx(60.0)
    assert "peer" not in line["fixed_length"]


def test_settings_a_user_can_get_wrong_are_one_line_errors():
    from alignloop.errors import AlignloopError

    for bad in ({"paths": ("generate", "beam")}, {"peer_dtypes": ("float16",)}, {"timed_paths": "all"},
                {"dtype": "fp8"}):
        with pytest.raises(AlignloopError, match="bench generate --"):
            generate.run_bench(**bad)


def test_the_roofline_times_every_linear_layer_of_the_model(tiny):
    from torch import nn

    from alignloop.bench.roofline import GemmRoofline, linear_shapes
    from alignloop.engine.llama import Arch

    model = tiny[0]
    arch = Arch.from_config(model.config)
    layers = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert sorted(linear_shapes(arch)) == sorted(layers)  # lm_head included
    fused = linear_shapes(arch, fused=True)
    assert len(fused) == 4 * arch.layers + 1 and sum(k * n for k, n in fused) == sum(k * n for k, n in layers)
    ceiling = GemmRoofline(arch, "float32", rows=5, steps=2)
    result = ceiling()
    assert result["useful"] == result["computed"] == 10 and result["seconds"] > 0
    assert ceiling.facts()["rows"] == 5 and ceiling.facts()["dtype"] == "float32"


def test_the_workload_ceiling_times_the_steps_the_run_had(tiny, monkeypatch):
    from alignloop.bench import roofline
    from alignloop.engine.llama import Arch

    ceiling = roofline.GemmRoofline(Arch.from_config(tiny[0].config), "float32", rows=8, steps=2)
    measured = {1: 0.010, 2: 0.012, 4: 0.016, 8: 0.030}  # seconds a GEMM step, by rows (grid up to 8)
    monkeypatch.setattr(ceiling, "step_seconds", lambda rows, steps: measured[rows])
    histogram: dict[int, int] = {}
    workload = roofline.WorkloadCeiling(ceiling, lambda: histogram)
    with pytest.raises(RuntimeError, match="has not run yet"):
        workload()
    histogram.update({8: 10, 6: 2, 1: 3})  # 10 full steps, 2 of 6 rows (between 4 and 8), 3 of one row
    result = workload()
    assert result["useful"] == 8 * 10 + 6 * 2 + 3 and result["steps"] == 15
    assert result["seconds"] == pytest.approx(10 * 0.030 + 2 * 0.023 + 3 * 0.010)
    assert roofline.interpolate(measured, 3) == pytest.approx(0.014)
    histogram[9] = 1
    with pytest.raises(ValueError, match="past the roofline's 8"):
        workload()


def test_an_interrupted_roofline_step_does_not_lower_the_ceiling(tiny, monkeypatch):
    from alignloop.bench import roofline
    from alignloop.engine.llama import Arch

    ceiling = roofline.GemmRoofline(Arch.from_config(tiny[0].config), "float32", rows=4, steps=5)
    times = iter([0.010, 0.011, 0.500, 0.010, 0.012])  # one step shares the CPU with another process
    monkeypatch.setattr(roofline, "_timed", lambda step: next(times))
    result = ceiling()
    assert result["seconds"] == pytest.approx(5 * 0.011)  # five median steps, not the sum (0.543 s)
    assert result["step_ms"] == [10.0, 11.0, 500.0]


def test_the_engine_profile_accounts_for_the_whole_step():
    from alignloop.bench.engine_profile import run_profile

    line = run_profile(model="tiny-llama", dtype="float32", n_prompts=3, max_tokens=5, threads=1)
    parts = line["parts_s"]
    # every part of the step is named, and together they are the profiled wall time
    assert {"gemm", "attention", "kv_write", "python"} <= set(parts)
    assert sum(parts.values()) == pytest.approx(line["wall_s"], abs=0.01 + 0.01 * line["wall_s"])
    assert line["tokens"] == 3 * 5 and line["decode_steps"] == 4  # the first token is prefill's
    assert line["gemm_ceiling_step_ms"] > 0 and line["top_ops"]
    assert parts["sampling"] > 0  # the logits' softmax is told apart by its [rows, vocab] shape
