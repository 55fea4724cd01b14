"""The local generation engine: continuous batching over a model runner (`llama.CausalLM`, `deepseek.DeepseekLM`).

Scheduling, in one paragraph: up to `max_batch` requests are live at once, packed into cache slots
0..n-1. Each step decodes one token for every live row. A row that finishes (EOS, stop token, stop
string, max_tokens, context end) leaves at once; the last live row moves into its slot so the batch
stays packed, and waiting prompts are prefilled into the free slots. No row ever computes past
its own end, which is where padded batch generation loses most of its time on mixed lengths.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from alignloop.engine.allocator import keep_freed_memory
from alignloop.engine.api import Completion, SamplingParams, per_prompt
from alignloop.engine.llama import CausalLM
from alignloop.engine.prefix_cache import PrefixCache
from alignloop.engine.sampling import sample
from alignloop.kernels.native import cpu_flags
from alignloop.models import load_model
from alignloop.ui import progress


def pick_dtype(name: str) -> torch.dtype:
    """"auto" picks bf16 where the hardware multiplies bf16 natively (CUDA, or a CPU with AMX or
    AVX512-BF16), fp32 elsewhere.

    Measured on a 2-core AMD EPYC with AVX512-BF16 and no AMX (one thread, SmolLM2-135M, a decode
    step's matmuls at 64 rows, weights pre-packed): oneDNN bf16 716 tok/s, MKL fp32 281 tok/s
    (192 vs 76 GFLOP/s); at 16 rows 517 vs 157. The whole engine on the rollout workload
    (`alignloop bench generate`): see its `--dtype` runs. Without those instructions bf16 is
    emulated and slower than fp32.
    """
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16
    flags = cpu_flags()
    return torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & flags else torch.float32


@dataclass
class _Live:
    index: int  # position in the caller's request list
    prompt: list[int]
    params: SamplingParams
    seed: int
    out: Completion
    stop_ids: frozenset[int]
    done: bool = False
    text_checked: int = field(default=0)
    routing: list[torch.Tensor] = field(default_factory=list)  # per fed chunk [moe_layers, tokens, K]

    @property
    def length(self) -> int:
        """Tokens whose keys/values are (or are about to be) in the cache."""
        return len(self.prompt) + len(self.out.token_ids)


class Engine:
    """Batched generation with a KV cache; implements `api.InferenceEngine`."""

    def __init__(self, model, tokenizer, dtype: str = "auto", max_batch: int = 64,
                 prefill_tokens: int = 4096, show_progress: bool = True, record_routing: bool = False):
        keep_freed_memory()  # decode's megabyte tensors, reused instead of faulted in every step (allocator.py)
        self.tokenizer = tokenizer
        self.dtype = pick_dtype(dtype)
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens
        self.show_progress = show_progress
        self.record_routing = record_routing
        self.lm = _runner(model, self.dtype, max_batch, record_routing)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.stats: dict[str, float] = {}
        self.step_rows: dict[int, int] = {}  # the last generate's decode steps by live rows (the batch shrinks at EOS)
        self.prefix_cache: PrefixCache | None = None

    @classmethod
    def from_name(cls, name: str, seed: int = 0, **kwargs) -> Engine:
        model, tokenizer = load_model(name, dtype="float32", seed=seed)
        return cls(model, tokenizer, **kwargs)

    @classmethod
    def from_fp8(cls, folder: str, **kwargs) -> Engine:
        """Serve an FP8 checkpoint folder (`alignloop export fp8`): projections stay e4m3 in memory,
        dequantised per matmul (Llama-family models). transformers reads the folder first for its
        config and the bf16 parts, dequantising on CPU; those dense copies are then dropped."""
        from alignloop.fp8.checkpoint import block_of, read_fp8

        model, tokenizer = load_model(folder, dtype="float32")
        engine = cls(model, tokenizer, **kwargs)
        if not hasattr(engine.lm, "use_fp8"):
            raise ValueError(f"{folder}: weight-only FP8 serving covers Llama-family models; this is "
                             f"{model.config.model_type} (serve it dequantised with Engine.from_name)")
        pairs, _, config = read_fp8(folder)
        engine.lm.use_fp8(pairs, block_of(config))
        return engine

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.lm.load_weights(named_tensors)
        if self.prefix_cache is not None:  # its keys/values came from the old weights
            self.prefix_cache = PrefixCache(self.prefix_cache.max_bytes)

    def use_prefix_cache(self, max_bytes: int) -> None:
        """Keep finished requests' keys/values (up to `max_bytes`) and reuse them for later prompts
        that start the same way (`prefix_cache.py`). Off by default: `generate`'s batches (RL, eval)
        rarely repeat a finished sequence, and a reused prefix's keys were computed in another batch
        shape, so low-precision logits can differ in the last bits from a full prefill's. The server
        turns it on: a chat API re-sends the whole conversation every exchange."""
        if not hasattr(self.lm, "slot_kv"):
            raise ValueError(f"the prefix cache covers Llama-family runners, not {type(self.lm).__name__}")
        self.prefix_cache = PrefixCache(max_bytes)

    # ---- public API --------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def prompt_problem(self, token_ids: Sequence[int]) -> str | None:
        """Why `generate` would refuse this encoded prompt (empty, or no room left in the context); None if fine.

        A prompt must leave at least one position free: the first generated token needs it.
        """
        if not token_ids:
            return "the prompt is empty"
        if len(token_ids) >= self.lm.max_len:
            return (f"the prompt has {len(token_ids)} tokens; the model's context is {self.lm.max_len} "
                    f"(prompt and answer together)")
        return None

    def chat(self, conversations: Sequence[list[dict]],
             params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        return self.generate([self.encode_chat(m) for m in conversations], params)

    def generate(self, prompts: Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        params = per_prompt(params, len(prompts))
        encoded = [p if isinstance(p, list) else self._encode(p) for p in prompts]
        for i, p in enumerate(encoded):
            if (problem := self.prompt_problem(p)) is not None:
                raise ValueError(f"prompt {i}: {problem}")
        longest = max((len(p) + sp.max_tokens for p, sp in zip(encoded, params)), default=1)
        self.lm.ensure_cache(min(self.max_batch, len(encoded)), longest)
        return self._run(encoded, list(params))

    # ---- the loop ----------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(prompts)
        waiting = deque(range(len(prompts)))
        live: list[_Live] = []
        started, generated = time.perf_counter(), 0
        step_rows: dict[int, int] = {}  # live rows in a decode step -> how many steps had that many
        # No bar at all when it would not show: rich's live display redraws from a thread of its own.
        shown = self.show_progress and len(prompts) > 1
        with progress() if shown else _NoBar() as bar:
            task = bar.add_task("generating", total=len(prompts), info="")
            while waiting or live:
                if live:
                    step_rows[len(live)] = step_rows.get(len(live), 0) + 1
                    self._decode_step(live)
                    generated += len(live)
                finished = self._retire(live, results)
                if waiting and len(live) < self.max_batch:
                    fresh = self._admit(waiting, prompts, params, len(live))
                    live.extend(fresh)
                    generated += len(fresh)
                    finished += self._retire(live, results)  # max_tokens=1, or EOS right away
                if finished:
                    rate = generated / max(time.perf_counter() - started, 1e-9)
                    bar.update(task, advance=finished, info=f"{rate:,.0f} tok/s")
        self.stats = {"decode_steps": sum(step_rows.values()), "generated_tokens": generated,
                      "seconds": time.perf_counter() - started}
        self.step_rows = dict(sorted(step_rows.items()))
        return results  # type: ignore[return-value]

    def _decode_step(self, live: list[_Live]) -> None:
        """One token for every live row: feed each row's last token, sample the next."""
        last = torch.tensor([s.out.token_ids[-1] for s in live])
        positions = torch.tensor([s.length - 1 for s in live])
        logits = self.lm.decode(last, positions)
        self._keep_routing(live)
        self._append(live, logits)

    def _admit(self, waiting: deque, prompts, params, first_slot: int) -> list[_Live]:
        """Prefill as many waiting prompts as fit (slots and a token budget) and sample their first token."""
        batch: list[int] = []
        budget = self.prefill_tokens
        while waiting and first_slot + len(batch) < self.max_batch:
            cost = len(prompts[waiting[0]])
            if batch and cost > budget:
                break
            budget -= cost
            batch.append(waiting.popleft())
        fresh = []
        for i in batch:
            sp = params[i]
            seed = sp.seed if sp.seed is not None else i
            stop_ids = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else self.eos_ids)
            fresh.append(_Live(i, prompts[i], sp, seed, Completion(list(prompts[i])), stop_ids))
        batch_prompts = [prompts[i] for i in batch]
        if self.prefix_cache is not None:
            cached = [self.prefix_cache.lookup(p) for p in batch_prompts]
            for s, c in zip(fresh, cached):
                s.out.cached_tokens = c[1] if c is not None else 0
            logits = self.lm.prefill(batch_prompts, first_slot, cached)
        else:
            logits = self.lm.prefill(batch_prompts, first_slot)
        self._keep_routing(fresh)
        self._append(fresh, logits)
        return fresh

    def _keep_routing(self, rows: list[_Live]) -> None:
        """With `record_routing`, each row's experts for the tokens the runner just fed (MoE models)."""
        if self.record_routing:
            for s, chosen in zip(rows, self.lm.routing):
                s.routing.append(chosen)

    def _append(self, rows: list[_Live], logits: torch.Tensor) -> None:
        temperature = torch.tensor([s.params.temperature for s in rows], dtype=torch.float32)
        top_p = torch.tensor([s.params.top_p for s in rows], dtype=torch.float32)
        top_k = torch.tensor([s.params.top_k for s in rows], dtype=torch.long)
        seeds = np.array([s.seed for s in rows], dtype=np.uint64)
        counters = np.array([len(s.out.token_ids) for s in rows], dtype=np.uint64)
        tokens, logprobs = sample(logits, temperature, top_p, top_k, seeds, counters)
        for s, t, lp in zip(rows, tokens.tolist(), logprobs.tolist()):
            s.out.token_ids.append(t)
            s.out.logprobs.append(lp)
            self._check_done(s, t)

    def _check_done(self, s: _Live, token: int) -> None:
        out, sp = s.out, s.params
        if token in s.stop_ids:
            s.done, out.finish_reason, out.stop_reason = True, "stop", token
        elif sp.stop and (hit := self._stop_string(s)) is not None:
            s.done, out.finish_reason, out.stop_reason = True, "stop", hit
        elif len(out.token_ids) >= sp.max_tokens or s.length >= self.lm.max_len:
            s.done, out.finish_reason = True, "length"

    def _stop_string(self, s: _Live) -> str | None:
        text = self.tokenizer.decode(s.out.token_ids, skip_special_tokens=True)
        # Only the new tail can complete a stop string that was not there a step ago.
        window = max(len(x) for x in s.params.stop) + 16
        start = max(0, s.text_checked - window)
        s.text_checked = len(text)
        hits = [(text.find(x, start), x) for x in s.params.stop]
        hits = [(pos, x) for pos, x in hits if pos >= 0]
        return min(hits)[1] if hits else None

    def _retire(self, live: list[_Live], results: list[Completion | None]) -> int:
        """Finish done rows and move the last live rows into their slots so the batch stays packed."""
        done = [i for i, s in enumerate(live) if s.done]
        if not done:
            return 0
        for i in done:
            if self.prefix_cache is not None:
                # The slot holds keys/values for the prompt and every generated token but the last
                # (sampled, never fed back).
                s = live[i]
                n = s.length - 1
                self.prefix_cache.store((s.prompt + s.out.token_ids)[:n], self.lm.slot_kv(i, n))
            results[live[i].index] = self._finalize(live[i])
        keep = len(live) - len(done)
        holes = [i for i in done if i < keep]
        movers = [i for i in range(keep, len(live)) if not live[i].done]
        for hole, mover in zip(holes, movers):
            self.lm.move_slot(mover, hole, live[mover].length)
            live[hole] = live[mover]
        del live[keep:]
        return len(done)

    def _finalize(self, s: _Live) -> Completion:
        out = s.out
        ids = out.token_ids[:-1] if out.finish_reason == "stop" and isinstance(out.stop_reason, int) else out.token_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if isinstance(out.stop_reason, str):
            text = text[: text.find(out.stop_reason)]
        out.text = text
        if self.record_routing:
            out.routing = torch.cat(s.routing, dim=1)
        return out


class _NoBar:
    """The progress bar's interface, doing nothing."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        pass


def _runner(model, dtype: torch.dtype, max_batch: int, record_routing: bool):
    """The model runner for the config's model type: DeepSeek (MLA latent cache, MoE) or Llama-family."""
    if getattr(model.config, "model_type", None) == "deepseek_v3":
        from alignloop.engine.deepseek import DeepseekLM

        return DeepseekLM(model, dtype, max_slots=max_batch, record_routing=record_routing)
    if record_routing:
        raise ValueError("record_routing needs an MoE model (deepseek_v3)")
    return CausalLM(model, dtype, max_slots=max_batch)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return frozenset(ids)
