"""`alignloop bench generate`: the RL rollout workload, our engine vs transformers `generate`.

Work: the 64 fixed chat prompts in assets/bench_prompts.json, sampled at temperature 1.0 and
top-p 0.95 (top-k off on both sides), up to 128 new tokens, stopping at EOS. Metric: useful
tokens per second, i.e. generated tokens up to and including EOS (padding and tokens after EOS
that a padded batch keeps computing do not count).

Each side runs at its best: the peer at every batch size and dtype asked for (default 16 and 64,
bf16 and fp32), ours at bf16 and fp32. The headline compares the best of each; the strict
bf16-vs-bf16 ratio is reported beside it. The "ceiling" is one forward of 64 single-token rows
through the transformers model (no cache, no sampling): how fast decoding could go if a step cost
nothing but the weights.
"""

from __future__ import annotations

import time

import torch
from rich.table import Table

from alignloop.bench.prompts import bench_prompts
from alignloop.engine.api import SamplingParams
from alignloop.engine.engine import Engine
from alignloop.models import load_model
from alignloop.ui import console, say, status

SEED = 1234


def _useful(rows: list[list[int]], eos: set[int]) -> int:
    total = 0
    for row in rows:
        n = len(row)
        for i, t in enumerate(row):
            if t in eos:
                n = i + 1
                break
        total += n
    return total


def time_ours(model, tokenizer, chats, max_tokens: int, dtype: str) -> dict:
    engine = Engine(model, tokenizer, dtype=dtype, max_batch=len(chats), show_progress=False)
    params = [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=max_tokens, seed=SEED + i)
              for i in range(len(chats))]
    engine.chat(chats[:4], params[:4])  # warm-up: first-call allocations, kernel selection
    start = time.perf_counter()
    outs = engine.chat(chats, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"side": "ours", "dtype": dtype, "batch": len(chats), "tokens": tokens, "seconds": seconds,
            "tok_s": tokens / seconds, "eos_rate": sum(o.finish_reason == "stop" for o in outs) / len(outs)}


def time_peer(model, tokenizer, texts, max_tokens: int, batch: int, eos: set[int]) -> dict:
    tokenizer.padding_side = "left"
    torch.manual_seed(SEED)
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                                 max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id)
        tokens += _useful(out[:, enc["input_ids"].shape[1] :].tolist(), eos)
    seconds = time.perf_counter() - start
    return {"side": "peer", "dtype": str(model.dtype).removeprefix("torch."), "batch": batch, "tokens": tokens,
            "seconds": seconds, "tok_s": tokens / seconds}


def forward_ceiling(model, rows: int = 64, repeats: int = 5) -> float:
    ids = torch.randint(0, model.config.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids, use_cache=False)
        start = time.perf_counter()
        for _ in range(repeats):
            model(ids, use_cache=False)
    return rows * repeats / (time.perf_counter() - start)


def run_bench(model: str = "smollm2-135m", n_prompts: int = 64, max_tokens: int = 128,
              peer_batches: list[int] = (16, 64), peer_dtypes: list[str] = ("bfloat16", "float32"),
              our_dtypes: list[str] = ("bfloat16", "float32")) -> dict:
    torch.manual_seed(SEED)
    fp32, tokenizer = load_model(model, dtype="float32")
    chats = [[{"role": "user", "content": p}] for p in bench_prompts()[:n_prompts]]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    eos = {fp32.generation_config.eos_token_id, tokenizer.eos_token_id} - {None}
    results = []
    for dtype in our_dtypes:
        with status(f"ours, {dtype} ..."):
            results.append(time_ours(fp32, tokenizer, chats, max_tokens, dtype))
        say(f"ours {dtype}: {results[-1]['tok_s']:.1f} tok/s")
    ceiling = None
    for dtype in peer_dtypes:
        peer_model = fp32 if dtype == "float32" else load_model(model, dtype=dtype)[0]
        if dtype == "bfloat16":
            ceiling = forward_ceiling(peer_model)
        for batch in peer_batches:
            with status(f"transformers generate, {dtype}, batch {batch} ..."):
                results.append(time_peer(peer_model, tokenizer, texts, max_tokens, batch, eos))
            say(f"peer {dtype} batch {batch}: {results[-1]['tok_s']:.1f} tok/s")
    _table(results)
    best = lambda side, dt=None: max((r for r in results if r["side"] == side and dt in (None, r["dtype"])),  # noqa: E731
                                     key=lambda r: r["tok_s"], default=None)
    ours, peer = best("ours"), best("peer")
    line = {"bench": "generate", "ours": round(ours["tok_s"], 1), "peer": round(peer["tok_s"], 1),
            "unit": "useful tokens/s", "ratio": round(ours["tok_s"] / peer["tok_s"], 2),
            "ours_config": f"{ours['dtype']}, continuous batching {ours['batch']}",
            "peer_config": f"transformers generate {peer['dtype']} batch {peer['batch']}"}
    ours_bf16, peer_bf16 = best("ours", "bfloat16"), best("peer", "bfloat16")
    if ours_bf16 and peer_bf16:
        line["ratio_bf16_vs_bf16"] = round(ours_bf16["tok_s"] / peer_bf16["tok_s"], 2)
    if ceiling:
        line["ceiling_bf16_forward_64x1"] = round(ceiling, 1)
        line["ours_fraction_of_ceiling"] = round(ours["tok_s"] / ceiling, 2)
    return line


def _table(results: list[dict]) -> None:
    table = Table("side", "dtype", "batch", "useful tokens", "seconds", "tok/s", title="bench generate")
    for r in results:
        table.add_row(r["side"], r["dtype"], str(r["batch"]), str(r["tokens"]), f"{r['seconds']:.1f}",
                      f"{r['tok_s']:.1f}")
    console.print(table)
