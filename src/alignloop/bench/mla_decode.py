"""`alignloop bench mla-decode`: MLA's latent cache and absorbed decode vs an expanded K/V cache, and
MTP speculative decoding vs plain greedy.

Three measurements, one JSON line (headline: decode tokens/s, ours = latent cache + absorbed
attention (`engine.deepseek.DeepseekLM`), peer = expanded per-head K/V cache (`bench.mla_expanded`),
the same model, batch, prompts and number of steps; only decode steps are timed, prefill is not;
`same_greedy_tokens` compares the two sides' first round: equal in fp32, while in bf16 the two
attention orders round differently and a random-init model's near-flat logits soon diverge):

- kv_cache_bytes_per_token: from the config alone, main stack, bf16: latent r + dr per layer vs
  expanded H (dn + dr + dv), for the bench's preset, tiny-deepseek and the real DeepSeek-V3 shapes;
- decode tokens/s, both sides in alternating rounds (`harness.alternate_rounds`), fixed threads;
- MTP: greedy generation with MTP drafts (`engine.mtp.MTPGreedy`) vs plain greedy on the same
  runner: acceptance rate, tokens per main forward, and the wall-time speed-up (median of rounds).
  The presets are random-init unless `--checkpoint` names a trained folder: a random MTP head
  drafts about as well as chance, so the acceptance it reports says nothing of a trained model's
  (DeepSeek reports 85-90% for V3's second token); the line says which weights were used.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from alignloop.bench.harness import alternate_rounds, fixed_threads, headline, machine_facts, summary
from alignloop.bench.mla_expanded import ExpandedKVLM
from alignloop.bench.prompts import bench_prompts
from alignloop.engine.deepseek import DeepseekLM
from alignloop.engine.engine import pick_dtype
from alignloop.engine.mtp import MTPGreedy
from alignloop.models import deepseek as ds
from alignloop.models import deepseek_checkpoint as ckpt
from alignloop.models import load_model, load_tokenizer
from alignloop.ui import say


def cache_bytes(config, bytes_per_number: int = 2) -> dict[str, Any]:
    """KV-cache bytes per token, main stack (MTP modules excluded), latent vs expanded."""
    L, H = config.num_hidden_layers, config.num_attention_heads
    latent = L * (config.kv_lora_rank + config.qk_rope_head_dim) * bytes_per_number
    expanded = L * H * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * bytes_per_number
    return {"latent": latent, "expanded": expanded, "ratio": round(expanded / latent, 2)}


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Token ids past the first 1000 (specials and bytes); lengths vary by up to 25% so rows differ.
    lengths = torch.randint(max(1, length * 3 // 4), length + 1, (batch,), generator=g).tolist()
    return [torch.randint(1000, vocab, (n,), generator=g).tolist() for n in lengths]


def _chat_prompts(checkpoint: str, batch: int, length: int) -> list[list[int]]:
    """The generate bench's fixed prompts as user turns in the checkpoint's chat template, cut to `length`."""
    tokenizer = load_tokenizer(checkpoint)
    texts = bench_prompts()
    out = []
    for i in range(batch):
        text = tokenizer.apply_chat_template([{"role": "user", "content": texts[i % len(texts)]}],
                                             add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"][-length:])
    return out


def _decode_run(lm: DeepseekLM, prompts: list[list[int]], steps: int) -> dict[str, Any]:
    """Prefill (untimed), then `steps` greedy decode steps for every row (timed)."""
    lm.ensure_cache(len(prompts), max(map(len, prompts)) + steps)
    token = lm.prefill(prompts, 0).argmax(-1)
    positions = torch.tensor([len(p) for p in prompts])
    out = [token]
    began = time.perf_counter()
    for s in range(steps):
        token = lm.decode(token, positions + s).argmax(-1)
        out.append(token)
    return {"useful": steps * len(prompts), "seconds": time.perf_counter() - began,
            "tokens": torch.stack(out, 1).tolist()}


def run_bench(model: str = "small-deepseek", batch: int = 16, prompt_len: int = 128, steps: int = 64,
              mtp_tokens: int = 64, rounds: int = 3, threads: int | None = None, dtype: str = "auto",
              checkpoint: str | None = None, seed: int = 0) -> dict[str, Any]:
    torch_dtype = pick_dtype(dtype)
    with fixed_threads(threads) as n_threads:
        if checkpoint:
            net, weights = ckpt.load_hf(checkpoint), f"trained checkpoint {checkpoint}"
        else:
            net, weights = load_model(model, seed=seed)[0], f"random init ({model}, seed {seed})"
        # A trained model gets real chat prompts (the generate bench's, in its chat template): MTP's
        # acceptance on random ids would say little about drafting the text it learned.
        prompts = (_chat_prompts(checkpoint, batch, prompt_len) if checkpoint else
                   _prompts(batch, prompt_len, net.config.vocab_size, seed))
        ours = DeepseekLM(net, torch_dtype, max_slots=batch)
        peer = ExpandedKVLM(net, torch_dtype, max_slots=batch)
        say(f"bench mla-decode: {batch} rows, prompts <= {prompt_len} tokens, {steps} decode steps, {torch_dtype}")
        runs = alternate_rounds({"latent": lambda: _decode_run(ours, prompts, steps),
                                 "expanded": lambda: _decode_run(peer, prompts, steps)},
                                rounds=rounds, label="bench mla-decode")
        same = runs["latent"][0]["tokens"] == runs["expanded"][0]["tokens"]
        mtp = _mtp(ours, net, prompts, mtp_tokens, rounds)
    lat, exp = summary(runs["latent"]), summary(runs["expanded"])
    shapes = {"bench_model": cache_bytes(net.config),
              "tiny-deepseek": cache_bytes(ds.preset_config("tiny-deepseek", 49152)),
              "deepseek-v3-671b": cache_bytes(ds.deepseek_v3_671b_config())}
    return headline(
        "mla-decode", lat, exp, "tokens/s",
        ours_config=f"DeepseekLM latent cache (r + dr per layer) + absorbed MLA decode, {torch_dtype}",
        peer_config=f"expanded per-head K/V cache (H (dn + dr + dv) per layer) + MHA decode, {torch_dtype}",
        machine=machine_facts(n_threads),
        model=model, weights=weights, batch=batch, prompt_len=prompt_len, steps=steps,
        same_greedy_tokens=same,
        runtime_cache_bytes_per_token={"latent_incl_mtp": ours.cache_bytes_per_token(),
                                       "expanded": peer.cache_bytes_per_token()},
        kv_cache_bytes_per_token_bf16=shapes, mtp=mtp)


def _mtp(lm: DeepseekLM, net, prompts: list[list[int]], max_tokens: int, rounds: int) -> dict[str, Any]:
    """MTP speculative greedy vs plain greedy (both on `lm`, EOS ignored so every row runs max_tokens)."""
    spec = MTPGreedy(lm)
    last: dict[str, Any] = {}

    def plain() -> dict[str, Any]:
        lm.ensure_cache(len(prompts), max(map(len, prompts)) + max_tokens)
        began = time.perf_counter()
        token = lm.prefill(prompts, 0).argmax(-1)
        positions = torch.tensor([len(p) for p in prompts])
        out = [token]
        for s in range(max_tokens - 1):
            token = lm.decode(token, positions + s).argmax(-1)
            out.append(token)
        last["plain"] = torch.stack(out, 1).tolist()
        return {"useful": max_tokens * len(prompts), "seconds": time.perf_counter() - began}

    def speculative() -> dict[str, Any]:
        spec.stats = type(spec.stats)()
        began = time.perf_counter()
        outs = spec.generate(prompts, max_tokens)
        seconds = time.perf_counter() - began
        last["mtp"] = [o.token_ids for o in outs]
        last["stats"] = spec.stats
        return {"useful": max_tokens * len(prompts), "seconds": seconds}

    runs = alternate_rounds({"mtp": speculative, "plain": plain}, rounds=rounds, label="bench mla-decode mtp")
    stats = last["stats"]
    m, p = summary(runs["mtp"]), summary(runs["plain"])
    speedups = [p_["seconds"] / m_["seconds"] for m_, p_ in zip(runs["mtp"], runs["plain"])]
    return {"acceptance": round(stats.acceptance, 4), "drafts": stats.drafts, "accepted": stats.accepted,
            "tokens_per_main_forward": round(stats.tokens_per_step, 3), "mtp_tokens_per_s": m, "plain_tokens_per_s": p,
            "speedup_median": round(statistics.median(speedups), 3), "max_tokens": max_tokens,
            "identical_to_plain_greedy": last["mtp"] == last["plain"]}
