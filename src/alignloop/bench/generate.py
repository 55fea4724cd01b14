"""`alignloop bench generate`: the RL rollout workload, our engine vs vLLM on CPU and transformers.

Work, the same on every side: the 64 fixed chat prompts of assets/bench_prompts.json through
SmolLM2-135M-Instruct's chat template (the same token ids everywhere), one sampled completion
each at temperature 1.0, top-p 0.95, top-k off, up to 128 new tokens, a sequence stopping at its
EOS; sequence i is seeded with 1234 + i where a side takes per-request seeds (ours, vLLM), the
batch with 1234 where it takes one (transformers). Fixed-length variant (`fixed_length` in the
line): the same with EOS ignored, so every sequence generates exactly 128 tokens: scheduling has
nothing to win there, and what is left is the cost of a decode step. It runs on ours and vLLM
(transformers' `generate` has no way to ignore EOS: an unset eos_token_id falls back to the
model's).

Metric: useful tokens per second: generated tokens up to and including each sequence's EOS (all
of them in the fixed-length variant), per second of generation. The clock runs around the
generate call alone: model loading, chat templating and tokenization are outside it on every
side; prefill is inside it on every side. Each side also reports `computed` tokens: the token
slots it ran through the model's decode (a padded batch keeps every row until the longest is
done, so its finished rows and their post-EOS tokens are computed; a continuous batch computes
exactly the useful ones). Prefill tokens are counted on neither.

Rounds (the shared harness): threads fixed (`--threads`, default every core), every timed
configuration run once untimed first, then >= 3 rounds whose order flips each round; medians
with min/max. Before them, an untimed sweep runs every transformers candidate (path x dtype x
batch size) once on a shorter version of the work (`sweep_tokens` new tokens per prompt); the
rounds then time transformers' fastest configuration in our dtype (`timed_paths="each"`: every
path's fastest in our dtype; about 1 minute a round more per path on 2 cores), and its fastest
of all when that one is in another dtype. The sweep's numbers are in the line (`sweep`).

The sides:
- ours: `Engine` (continuous batching, up to 64 rows, fused and pre-packed weights, slot KV
  cache), in the engine's default dtype for this CPU (bf16 where it has AVX512-BF16 or AMX);
- vLLM on CPU (`bench.vllm_peer`, its own environment from `make peers`; settings as its CPU docs
  recommend, listed there and in the line), max_num_seqs 64, same dtype as ours;
- transformers, each path as its docs describe it, sdpa attention, `do_sample=True`:
  `generate` with the dynamic cache (left-padded batches), `generate` with
  `cache_implementation="static"`, and `generate_batch` (its continuous batching, its manager
  kept between calls with `persistent_manager=True`; the paged cache sized to the work,
  `num_blocks` = every request's prompt + max_tokens at once: left unset, on CPU it sizes the
  cache from the machine's free RAM, 90% of it, and the attention masks with it).
- the GEMM roofline (`bench.roofline`): a decode step's matrix multiplies alone, in our dtype,
  measured in the same rounds, at 64 rows (`ceiling`; the fixed-length variant's steps are all
  64 rows: its fraction is against this one) and at the row counts of the steps the sampled run
  had (`workload_ceiling`, `ours_fraction_of_ceiling`): with EOS the batch shrinks as sequences
  finish (`decode_rows_mean`), and a GEMM step at fewer rows still reads every weight, so 64
  rows' tokens/s is a ceiling that run cannot reach (`ours_fraction_of_64_row_ceiling`, beside).

Headline: ours vs vLLM (the peer users pick for rollouts), same dtype; `ratio_transformers_best`
is ours over the fastest transformers path in that dtype; `best_of_each` compares each side's
fastest configuration whatever its dtype. Without vLLM the headline peer is transformers' best
path and the line says `"vllm": "not measured: <reason>"`.

What differs, and is inherent: transformers' `generate` draws from one RNG per batch, ours and
vLLM from per-request seeds, so the sampled texts (and their lengths) differ between sides;
each side does the same work in every round. The vLLM worker sits idle while the others run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from alignloop.bench.harness import alternate_rounds, fixed_threads, headline, machine_facts, ratio, summary
from alignloop.bench.prompts import bench_prompts
from alignloop.bench.roofline import GemmRoofline, WorkloadCeiling, fraction
from alignloop.engine.api import SamplingParams
from alignloop.engine.engine import Engine, pick_dtype
from alignloop.engine.llama import Arch
from alignloop.errors import AlignloopError
from alignloop.models import load_model
from alignloop.ui import say

SEED = 1234
TEMPERATURE = 1.0
TOP_P = 0.95
MAX_BATCH = 64
PATHS = ("generate", "static", "generate_batch")
UNIT = "useful tokens/s"


# --- the work ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The prompts (as chats, token ids and text), the EOS ids, and how much to generate."""

    chats: list[list[dict]]
    prompt_ids: list[list[int]]
    texts: list[str]
    eos: frozenset[int]
    max_tokens: int
    ignore_eos: bool = False

    @property
    def seeds(self) -> list[int]:
        return [SEED + i for i in range(len(self.chats))]

    def fixed_length(self) -> Workload:
        return replace(self, ignore_eos=True)

    def shorter(self, max_tokens: int) -> Workload:
        return replace(self, max_tokens=min(max_tokens, self.max_tokens))


def workload(tokenizer, eos: Iterable[int], n_prompts: int = 64, max_tokens: int = 128) -> Workload:
    chats = [[{"role": "user", "content": p}] for p in bench_prompts()[:n_prompts]]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return Workload(chats, ids, texts, frozenset(eos), max_tokens)


def eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        ids.update([source] if isinstance(source, int) else source or [])
    return frozenset(ids)


# --- token accounting ----------------------------------------------------------------------------


def useful_tokens(generated: Sequence[int], eos: frozenset[int], ignore_eos: bool = False) -> int:
    """Tokens up to and including the first EOS (every token when EOS is ignored)."""
    if not ignore_eos:
        for i, t in enumerate(generated):
            if t in eos:
                return i + 1
    return len(generated)


def padded_batch_tokens(rows: Sequence[Sequence[int]], eos: frozenset[int],
                        ignore_eos: bool = False) -> tuple[int, int]:
    """(useful, computed) for one padded batch's generated part, `rows` x steps as `generate` returns it.

    Every row runs every step until the batch is done, so computed = rows x steps; useful stops at
    each row's first EOS (after it come pad tokens the batch still computed).
    """
    useful = sum(useful_tokens(r, eos, ignore_eos) for r in rows)
    return useful, sum(len(r) for r in rows)


# --- the sides -----------------------------------------------------------------------------------


class Ours:
    """Our engine on the work; each call is one timed unit."""

    def __init__(self, model, tokenizer, dtype: str, work: Workload, max_batch: int = MAX_BATCH):
        self.engine = Engine(model, tokenizer, dtype=dtype, max_batch=max_batch, show_progress=False)
        self.work, self.dtype = work, str(self.engine.dtype).removeprefix("torch.")
        self.params = [SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, top_k=0, max_tokens=work.max_tokens,
                                      seed=s, ignore_eos=work.ignore_eos) for s in work.seeds]

    def __call__(self) -> dict[str, Any]:
        began = time.perf_counter()
        outs = self.engine.generate(self.work.prompt_ids, self.params)
        seconds = time.perf_counter() - began
        stats = self.engine.stats
        return {"useful": sum(useful_tokens(o.token_ids, self.work.eos, self.work.ignore_eos) for o in outs),
                "computed": int(stats["generated_tokens"]), "seconds": seconds,
                "eos_rate": sum(o.finish_reason == "stop" for o in outs) / len(outs),
                # The first token of each sequence comes from its prefill, not from a decode step.
                "decode_rows_mean": round((stats["generated_tokens"] - len(outs)) / max(stats["decode_steps"], 1), 1)}


class TransformersGenerate:
    """transformers `generate` over left-padded batches of `batch` prompts, dynamic or static cache."""

    def __init__(self, model, tokenizer, work: Workload, batch: int, cache: str = "dynamic"):
        from transformers import GenerationConfig

        _no_fixed_length(work)
        self.model, self.work = model, work
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            self.batches = [tokenizer(work.texts[i : i + batch], return_tensors="pt", padding=True,
                                      add_special_tokens=False) for i in range(0, len(work.texts), batch)]
        finally:
            tokenizer.padding_side = padding_side
        self.config = GenerationConfig(
            do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0, max_new_tokens=work.max_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(work.eos),
            cache_implementation="static" if cache == "static" else None)

    @torch.inference_mode()
    def __call__(self) -> dict[str, Any]:
        torch.manual_seed(SEED)
        useful = computed = stopped = 0
        began = time.perf_counter()
        for enc in self.batches:
            out = self.model.generate(**enc, generation_config=self.config)
            rows = out[:, enc["input_ids"].shape[1] :].tolist()
            u, c = padded_batch_tokens(rows, self.work.eos)
            useful, computed = useful + u, computed + c
            stopped += sum(any(t in self.work.eos for t in r) for r in rows)
        seconds = time.perf_counter() - began
        return {"useful": useful, "computed": computed, "seconds": seconds, "eos_rate": stopped / len(self.work.texts)}


class TransformersGenerateBatch:
    """transformers `generate_batch` (its continuous batching), up to `max_requests` at once.

    The manager persists between calls (`persistent_manager=True`, as for repeated rollouts); the
    paged cache holds every request at once (see the module docstring).
    """

    def __init__(self, model, tokenizer, work: Workload, max_requests: int):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        _no_fixed_length(work)
        self.model, self.work = model, work
        self.config = GenerationConfig(
            do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0, max_new_tokens=work.max_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(work.eos))
        page = 256  # transformers' default page size
        longest = max(len(p) for p in work.prompt_ids) + work.max_tokens
        self.cb_config = ContinuousBatchingConfig(
            page_size=page, num_blocks=len(work.prompt_ids) * math.ceil(longest / page),
            max_requests_per_batch=max_requests, seed=SEED)

    def __call__(self) -> dict[str, Any]:
        began = time.perf_counter()
        outs = self.model.generate_batch(self.work.prompt_ids, generation_config=self.config,
                                         continuous_batching_config=self.cb_config, persistent_manager=True)
        seconds = time.perf_counter() - began
        rows = [o.generated_tokens for o in outs.values()]
        if len(rows) != len(self.work.prompt_ids):
            raise RuntimeError(f"generate_batch returned {len(rows)} of {len(self.work.prompt_ids)} requests")
        return {"useful": sum(useful_tokens(r, self.work.eos) for r in rows), "computed": sum(len(r) for r in rows),
                "seconds": seconds, "eos_rate": sum(any(t in self.work.eos for t in r) for r in rows) / len(rows)}

    def close(self) -> None:
        self.model.destroy_cached_continuous_batching_manager()


def _no_fixed_length(work: Workload) -> None:
    # transformers' generate has no "ignore EOS": an unset eos_token_id falls back to the model's
    # (measured: it still stopped at EOS), and -1 is a documented-as-unsupported trick.
    if work.ignore_eos:
        raise ValueError("the transformers paths run the workload with EOS only")


def transformers_side(path: str, model, tokenizer, work: Workload, batch: int):
    if path == "generate_batch":
        return TransformersGenerateBatch(model, tokenizer, work, batch)
    return TransformersGenerate(model, tokenizer, work, batch, cache="static" if path == "static" else "dynamic")


class Vllm:
    """One `VllmPeer.run` of the work; each call is one timed unit (timed by the worker)."""

    def __init__(self, peer, work: Workload):
        self.peer, self.work = peer, work

    def __call__(self) -> dict[str, Any]:
        w = self.work
        result = dict(self.peer.run(w.chats, w.max_tokens, w.seeds, TEMPERATURE, TOP_P, ignore_eos=w.ignore_eos))
        if w.ignore_eos:
            # The worker counts up to the first EOS whatever the mode; with EOS ignored every
            # generated token is asked for, so every one is useful (as on our side).
            result["useful"] = result["computed"]
        return result


class LlamaCpp:
    """One `LlamaCppPeer.run` of the work (the same token ids as ours); timed by the worker."""

    def __init__(self, peer, work: Workload):
        self.peer, self.work = peer, work

    def __call__(self) -> dict[str, Any]:
        w = self.work
        return self.peer.run(w.prompt_ids, w.max_tokens, w.seeds, TEMPERATURE, TOP_P, ignore_eos=w.ignore_eos)


def start_llamacpp(model: str, dtype: str, threads: int, work: Workload, stack: contextlib.ExitStack):
    """The llama.cpp peer in `dtype`, or the reason it is not measured (a one-line string)."""
    from alignloop.bench import llamacpp_peer

    if model != llamacpp_peer.MODEL:
        return f"not measured: llama.cpp runs the {llamacpp_peer.MODEL} GGUF only, not {model}"
    if (reason := llamacpp_peer.available()) is not None:
        return f"not measured: {reason}"
    # Each sequence its own cache of the longest prompt + max_tokens (llama.cpp splits n_ctx evenly).
    n_ctx = len(work.prompt_ids) * (max(len(p) for p in work.prompt_ids) + work.max_tokens)
    try:
        return stack.enter_context(llamacpp_peer.LlamaCppPeer(dtype, threads, n_seq=len(work.prompt_ids),
                                                              n_ctx=n_ctx))
    except Exception as exc:  # noqa: BLE001 - a peer that fails to start is reported, the bench goes on
        return f"not measured: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def start_vllm(model: str, dtype: str, threads: int, stack: contextlib.ExitStack):
    """The vLLM peer, or the reason it is not measured (a one-line string)."""
    try:
        from alignloop.bench import vllm_peer
    except ImportError as exc:
        return f"not measured: no alignloop.bench.vllm_peer ({exc})"
    if (reason := vllm_peer.available()) is not None:
        return f"not measured: {reason}"
    try:
        return stack.enter_context(vllm_peer.VllmPeer(model, dtype, threads, max_num_seqs=MAX_BATCH))
    except Exception as exc:  # noqa: BLE001 - a peer that fails to start is reported, the bench goes on
        return f"not measured: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


# --- the sweep -----------------------------------------------------------------------------------


def sweep(candidates: dict[str, Callable[[Workload], Any]], proxy: Workload) -> dict[str, float]:
    """Useful tokens/s of each candidate on `proxy` (one run, after a 2-token run of the same shapes
    for first-call costs): picks each path's batch size and dtype. Not part of the headline."""
    rates = {}
    for name, make in candidates.items():
        for work in (proxy.shorter(2), proxy):
            side = make(work)
            try:
                result = side()
            finally:
                if hasattr(side, "close"):
                    side.close()
        rates[name] = round(result["useful"] / result["seconds"], 1)
        say(f"generate sweep {name}: {rates[name]:.1f} tok/s")
    return rates


def config_name(path: str, dtype: str, batch: int) -> str:
    return f"transformers {path} {dtype} {'max_requests' if path == 'generate_batch' else 'batch'} {batch}"


# --- the bench -----------------------------------------------------------------------------------


def run_bench(model: str = "smollm2-135m", n_prompts: int = 64, max_tokens: int = 128, rounds: int = 3,
              threads: int | None = None, dtype: str = "auto", peer_batches: Sequence[int] = (16, 64),
              peer_dtypes: Sequence[str] = ("bfloat16", "float32"), paths: Sequence[str] = PATHS,
              sweep_tokens: int = 32, timed_paths: str = "best", vllm: bool = True,
              llamacpp: bool = True) -> dict[str, Any]:
    """Run every side in alternating rounds and return the bench's JSON line (see the module docstring)."""
    _check_settings(dtype, peer_dtypes, paths, timed_paths)
    with fixed_threads(threads) as n_threads, contextlib.ExitStack() as stack:
        ours_dtype = str(pick_dtype(dtype)).removeprefix("torch.")
        fp32_model, tokenizer = load_model(model, dtype="float32")
        work = workload(tokenizer, eos_ids(fp32_model, tokenizer), n_prompts, max_tokens)
        names = Names(ours_dtype)
        configs: dict[str, Callable[[], dict[str, Any]]] = {
            names.ours: Ours(fp32_model, tokenizer, ours_dtype, work),
            names.ours_fixed: Ours(fp32_model, tokenizer, ours_dtype, work.fixed_length())}

        hf = Transformers(model, fp32_model, tokenizer)
        say(f"generate: sweeping transformers paths over dtypes {list(peer_dtypes)} and batches "
            f"{list(peer_batches)} ({sweep_tokens} new tokens)")
        candidates = [(p, dt, b) for p in paths for dt in peer_dtypes for b in peer_batches]
        swept = sweep({config_name(*c): (lambda w, c=c: hf.side(*c, w)) for c in candidates}, work.shorter(sweep_tokens))
        hf_timed: dict[str, str] = {}  # config name -> its dtype
        for c in timed_transformers(candidates, swept, ours_dtype, timed_paths):
            configs[config_name(*c)] = hf.side(*c, work)
            hf_timed[config_name(*c)] = c[1]
        stack.callback(hf.close)

        vllm_status: Any = "not measured: --no-vllm" if not vllm else start_vllm(model, ours_dtype, n_threads, stack)
        if not isinstance(vllm_status, str):
            configs[names.vllm] = Vllm(vllm_status, work)
            configs[names.vllm_fixed] = Vllm(vllm_status, work.fixed_length())
        llama_status: dict[str, Any] = {}
        for llama_dtype in (ours_dtype, "q4_1") if llamacpp else ():
            peer = start_llamacpp(model, llama_dtype, n_threads, work, stack)
            llama_status[llama_dtype] = peer
            if not isinstance(peer, str):
                configs[names.llamacpp(llama_dtype)] = LlamaCpp(peer, work)
                if llama_dtype == ours_dtype:
                    configs[names.llamacpp(llama_dtype) + " fixed-length"] = LlamaCpp(peer, work.fixed_length())
        ceiling = GemmRoofline(Arch.from_config(fp32_model.config), ours_dtype, min(MAX_BATCH, len(work.chats)))
        configs[names.ceiling] = ceiling
        ours_side = configs[names.ours]
        configs[names.ceiling_workload] = WorkloadCeiling(ceiling, lambda: ours_side.engine.step_rows)

        results = alternate_rounds(configs, rounds=rounds, warmup=True, label="generate")
        line = _line(names, results, hf_timed, vllm_status, ceiling)
        line["llama_cpp"] = _llamacpp_line(names, results, llama_status) if llamacpp else "not measured: --no-llamacpp"
        line["sweep"] = {"new_tokens": min(sweep_tokens, max_tokens), "tok_s": swept}
        line["workload"] = {"model": model, "prompts": len(work.chats), "max_tokens": max_tokens,
                            "temperature": TEMPERATURE, "top_p": TOP_P, "top_k": "off", "seed": SEED}
        ours, peer = line.pop("ours"), line.pop("peer")
        return headline("generate", ours, peer, UNIT, ours_config=names.ours, peer_config=line.pop("peer_config"),
                        machine=machine_facts(n_threads, peers=("transformers",)), **line)


@dataclass(frozen=True)
class Names:
    """The configurations' names in the rounds and the JSON line."""

    dtype: str

    @property
    def ours(self) -> str:
        return f"ours {self.dtype}"

    @property
    def ours_fixed(self) -> str:
        return f"ours {self.dtype} fixed-length"

    @property
    def vllm(self) -> str:
        return f"vllm {self.dtype}"

    @property
    def vllm_fixed(self) -> str:
        return f"vllm {self.dtype} fixed-length"

    ceiling = "gemm ceiling"
    ceiling_workload = "gemm ceiling, the sampled run's steps"

    @staticmethod
    def llamacpp(dtype: str) -> str:
        return f"llama.cpp {dtype}"


class Transformers:
    """The transformers models the paths run on, loaded once per (path family, dtype).

    generate_batch gets models of its own, so that its manager (which may switch the attention
    implementation) never touches the model `generate` runs.
    """

    def __init__(self, model: str, fp32_model, tokenizer):
        self.name, self.tokenizer = model, tokenizer
        self.models: dict[tuple[bool, str], Any] = {(False, "float32"): fp32_model}
        self.closers: list[Callable[[], None]] = []

    def side(self, path: str, dtype: str, batch: int, work: Workload):
        key = (path == "generate_batch", dtype)
        if key not in self.models:
            self.models[key] = load_model(self.name, dtype=dtype)[0]
        side = transformers_side(path, self.models[key], self.tokenizer, work, batch)
        if hasattr(side, "close"):
            self.closers.append(side.close)
        return side

    def close(self) -> None:
        for close in self.closers:
            close()


def timed_transformers(candidates: list[tuple[str, str, int]], swept: dict[str, float], dtype: str,
                       timed_paths: str) -> list[tuple[str, str, int]]:
    """The transformers configurations the rounds time: the sweep's fastest in our dtype (with
    `timed_paths="each"`, every path's fastest in our dtype), and the fastest of all when that one
    is in another dtype (for `best_of_each`)."""
    def fastest(among):
        return max(among, key=lambda c: swept[config_name(*c)])

    same = [c for c in candidates if c[1] == dtype]
    if timed_paths == "each":
        paths = dict.fromkeys(c[0] for c in same)
        timed = [fastest([c for c in same if c[0] == p]) for p in paths]
    else:
        timed = [fastest(same)] if same else []
    if candidates and fastest(candidates)[1] != dtype:
        timed.append(fastest(candidates))
    return timed


def _line(names: Names, results: dict[str, list[dict[str, Any]]], hf_timed: dict[str, str], vllm_status: Any,
          ceiling: GemmRoofline) -> dict[str, Any]:
    """Everything the JSON line says besides the machine (the medians as summaries under ours/peer)."""
    summaries = {name: summary(r) for name, r in results.items()}
    measured_vllm = not isinstance(vllm_status, str)
    ours = summaries[names.ours]
    hf_same = [n for n, dt in hf_timed.items() if dt == names.dtype]
    hf_best = max(hf_same, key=lambda n: summaries[n]["median"]) if hf_same else None
    peer_name = names.vllm if measured_vllm else hf_best
    if peer_name is None:
        raise AlignloopError(f"bench generate: no peer measured in {names.dtype}: vLLM is {vllm_status!r}, "
                             f"and no transformers path ran in {names.dtype} (--peer-dtypes, --paths)")
    ceiling_tok_s = summaries[names.ceiling]["median"]
    workload_tok_s = summaries[names.ceiling_workload]["median"]
    line: dict[str, Any] = {"ours": ours, "peer": summaries[peer_name], "peer_config": peer_name,
                            "dtype": names.dtype}
    if hf_best:
        line["ratio_transformers_best"] = ratio(ours, summaries[hf_best])
        line["transformers_best"] = hf_best
    line["vllm"] = {"facts": vllm_status.facts()} if measured_vllm else vllm_status
    line["ours_fraction_of_ceiling"] = fraction(ours["median"], workload_tok_s)
    line["ours_fraction_of_64_row_ceiling"] = fraction(ours["median"], ceiling_tok_s)
    line["fixed_length"] = _fixed_length_line(summaries, names.ours_fixed,
                                              names.vllm_fixed if measured_vllm else None, ceiling_tok_s)
    line["best_of_each"] = _best_of_each(summaries, names.ours, names.vllm if measured_vllm else None, hf_timed)
    line["ceiling"] = {"tok_s": ceiling_tok_s, **ceiling.facts(),
                       "step_ms_per_round": [r.get("step_ms") for r in results[names.ceiling]],
                       "what": "a decode step's GEMMs alone (no attention, norms, sampling), same dtype; "
                               "each round's median step"}
    workload = results[names.ceiling_workload]
    line["workload_ceiling"] = {
        "tok_s": workload_tok_s, "steps": workload[0]["steps"], "step_ms_at_rows": workload[-1]["step_ms"],
        "what": "the GEMMs alone of the decode steps the sampled run had, at each step's rows (the batch "
                "shrinks as sequences stop at EOS); the headline fraction is against it"}
    line["configs"] = {n: {**s, **_tokens(results[n])} for n, s in summaries.items()
                       if n not in (names.ceiling, names.ceiling_workload)}
    return line


def _llamacpp_line(names: Names, results: dict[str, list[dict[str, Any]]], status: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp beside the headline: ours over it in our dtype (and fixed-length), and its Q4_1 best case."""
    ours = summary(results[names.ours])
    line: dict[str, Any] = {}
    for dtype, peer in status.items():
        name = names.llamacpp(dtype)
        if isinstance(peer, str):
            line[dtype] = peer
            continue
        entry = {"tok_s": summary(results[name]), "ratio": ratio(ours, summary(results[name])), **_tokens(results[name])}
        if (fixed := name + " fixed-length") in results:
            entry["fixed_length"] = {"tok_s": summary(results[fixed])["median"],
                                     "ratio": ratio(summary(results[names.ours_fixed]), summary(results[fixed]))}
        if dtype == "q4_1":
            entry["note"] = "the shipped 4-bit GGUF: llama.cpp's own best case, a 4-bit-rounded model, never the headline"
        line[dtype] = entry
    first = next((p for p in status.values() if not isinstance(p, str)), None)
    if first is not None:
        line["facts"] = first.facts()
    return line


def _check_settings(dtype: str, peer_dtypes: Sequence[str], paths: Sequence[str], timed_paths: str) -> None:
    dtypes = ("bfloat16", "float32")
    for what, value, allowed in (("--dtype", [dtype], ("auto", *dtypes)), ("--peer-dtypes", peer_dtypes, dtypes),
                                 ("--paths", paths, PATHS), ("--timed-paths", [timed_paths], ("best", "each"))):
        if bad := [v for v in value if v not in allowed]:
            raise AlignloopError(f"bench generate {what}: {', '.join(bad)} is not one of {', '.join(allowed)}")


def _tokens(results: list[dict[str, Any]]) -> dict[str, Any]:
    """A configuration's token accounting per round (the same work every round: the first round's)."""
    first = results[0]
    out = {"useful": first["useful"], "computed": first.get("computed", first["useful"])}
    for key in ("eos_rate", "decode_rows_mean"):
        if key in first:
            out[key] = round(first[key], 3)
    return out


def _fixed_length_line(summaries, ours_name: str, peer_name: str | None, ceiling_tok_s: float) -> dict[str, Any]:
    ours = summaries[ours_name]
    line: dict[str, Any] = {"ours": ours["median"], "ours_min_max": [ours["min"], ours["max"]],
                            "ours_fraction_of_ceiling": fraction(ours["median"], ceiling_tok_s)}
    if peer_name:
        peer = summaries[peer_name]
        line.update(peer=peer["median"], peer_min_max=[peer["min"], peer["max"]], peer_config=peer_name,
                    ratio=ratio(ours, peer), peer_fraction_of_ceiling=fraction(peer["median"], ceiling_tok_s))
    return line


def _best_of_each(summaries, ours_name: str, vllm_name: str | None, hf_timed: dict[str, str]) -> dict[str, Any]:
    """Each side's fastest configuration on the workload with EOS, whatever its dtype."""
    peers = [n for n in (vllm_name, *hf_timed) if n]
    if not peers:
        return {}
    peer = max(peers, key=lambda n: summaries[n]["median"])
    return {"ours": summaries[ours_name]["median"], "ours_config": ours_name, "peer": summaries[peer]["median"],
            "peer_config": peer, "ratio": ratio(summaries[ours_name], summaries[peer])}
