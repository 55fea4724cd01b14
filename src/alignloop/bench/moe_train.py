"""`alignloop bench moe-train`: training tokens/s of our DeepSeek-style model class against transformers'
`DeepseekV3ForCausalLM`, same config, same weights, same batch, same optimizer, same dtype.

The work, both sides: one optimizer step = forward + backward of the mean next-token cross-entropy
over every token of a fixed [B, T] batch of random token ids (B=8, T=256 by default), then AdamW
(fused, lr 1e-4) and zero_grad; fp32 weights, no autocast, no gradient checkpointing. The config is
the preset's with `num_nextn_predict_layers=0`: transformers' class has no MTP, so neither side runs it.

- ours: `deepseek.training_loss(model, ids, mtp_weight=0)` (the head fused with its loss, no [B, T, V]
  logits);
- the peer: `model(input_ids=ids, labels=ids).loss`, at its best: its attention implementations
  (sdpa, its default, and eager) and experts implementations (grouped_mm, its default, eager,
  batched_mm) are each timed for one step after a warm-up, and the fastest pair is the one timed in
  the rounds; every pair's seconds are in the JSON line.

Thread counts are fixed per measurement (the harness's `fixed_threads`); each count in `threads` is
measured in its own alternating rounds, and the headline is each side at its fastest count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DeepseekV3ForCausalLM

from alignloop.bench.harness import alternate_rounds, fixed_threads, headline, machine_facts, summary
from alignloop.models import deepseek as ds
from alignloop.ui import say

VOCAB = 49152  # SmolLM2's vocabulary, as the zoo's tiny presets use


def bench_config(preset: str, vocab: int) -> Any:
    """The preset's config without MTP (the peer has none)."""
    return ds.preset_config(preset, vocab, num_nextn_predict_layers=0)


def build_pair(preset: str, vocab: int, seed: int, attention: str = "sdpa", experts: str = "grouped_mm"
               ) -> tuple[ds.DeepseekForCausalLM, DeepseekV3ForCausalLM]:
    """(ours, the peer) with the same weights: ours initialised from `seed`, its state dict loaded
    into the peer strictly (the in-memory names are transformers')."""
    torch.manual_seed(seed)
    ours = ds.DeepseekForCausalLM(bench_config(preset, vocab)).train()
    peer = make_peer(ours, attention, experts)
    return ours, peer


def make_peer(ours: ds.DeepseekForCausalLM, attention: str, experts: str) -> DeepseekV3ForCausalLM:
    peer = DeepseekV3ForCausalLM._from_config(bench_config_of(ours), attn_implementation=attention,
                                              experts_implementation=experts).train()
    peer.load_state_dict(ours.state_dict(), strict=True)
    return peer


def bench_config_of(model: ds.DeepseekForCausalLM) -> Any:
    """A copy of `model`'s config: the peer sets its own attention/experts implementation on it."""
    return model.config.__class__.from_dict(model.config.to_dict())


def ours_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return ds.training_loss(model, ids, mtp_weight=0.0)[0]


def peer_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def trainer(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
            ids: torch.Tensor, steps: int) -> Callable[[], dict[str, Any]]:
    """A harness configuration: `steps` optimizer steps on `ids`, timed around exactly that work."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def run() -> dict[str, Any]:
        began = time.perf_counter()
        for _ in range(steps):
            loss = loss_fn(model, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {"useful": steps * ids.numel(), "seconds": time.perf_counter() - began, "loss": float(loss.detach())}

    return run


def best_peer(ours: ds.DeepseekForCausalLM, ids: torch.Tensor, attentions: Sequence[str], experts: Sequence[str]
              ) -> tuple[tuple[str, str], dict[str, float]]:
    """The peer's fastest (attention, experts) pair: one untimed then one timed step each."""
    seconds = {}
    for attn in attentions:
        for exp in experts:
            peer = make_peer(ours, attn, exp)
            step = trainer(peer, peer_loss, ids, 1)
            step()
            seconds[f"{attn}+{exp}"] = round(step()["seconds"], 3)
            say(f"moe-train: peer {attn} attention, {exp} experts: {seconds[f'{attn}+{exp}']} s/step")
    best = min(seconds, key=seconds.get)
    return tuple(best.split("+", 1)), seconds  # type: ignore[return-value]


def measure(preset: str, vocab: int, batch: int, seq: int, steps: int, rounds: int, threads: int,
            attentions: Sequence[str], experts: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Both sides at one thread count: the peer's sweep, then alternating timed rounds."""
    with fixed_threads(threads) as n:
        torch.manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, seq))
        torch.manual_seed(seed)
        ours = ds.DeepseekForCausalLM(bench_config(preset, vocab)).train()
        (attn, exp), sweep = best_peer(ours, ids, attentions, experts)
        peer = make_peer(ours, attn, exp)  # same starting weights as ours, fresh optimizer state
        results = alternate_rounds({"ours": trainer(ours, ours_loss, ids, steps),
                                    "peer": trainer(peer, peer_loss, ids, steps)},
                                   rounds=rounds, label=f"moe-train ({n} threads)")
        return {"threads": n, "ours": summary(results["ours"]), "peer": summary(results["peer"]),
                "peer_attention": attn, "peer_experts": exp, "peer_sweep_s_per_step": sweep,
                "first_loss": {"ours": results["ours"][0]["loss"], "peer": results["peer"][0]["loss"]}}


def run_bench(preset: str = "tiny-deepseek", vocab: int = VOCAB, batch: int = 8, seq: int = 256, steps: int = 2,
              rounds: int = 3, threads: Sequence[int] = (1, 2), attentions: Sequence[str] = ("sdpa", "eager"),
              experts: Sequence[str] = ("grouped_mm", "eager", "batched_mm")) -> dict[str, Any]:
    """The JSON line: each side at its fastest thread count; every count's numbers under `by_threads`."""
    by_threads = [measure(preset, vocab, batch, seq, steps, rounds, n, attentions, experts) for n in threads]
    ours_best = max(by_threads, key=lambda m: m["ours"]["median"])
    peer_best = max(by_threads, key=lambda m: m["peer"]["median"])
    n_params = sum(p.numel() for p in ds.DeepseekForCausalLM(bench_config(preset, vocab)).parameters())
    return headline(
        "moe-train", ours_best["ours"], peer_best["peer"], "train tokens/s",
        ours_config=f"alignloop DeepseekForCausalLM, training_loss (fused head CE), fp32, AdamW fused, "
                    f"{ours_best['threads']} threads",
        peer_config=f"transformers DeepseekV3ForCausalLM, {peer_best['peer_attention']} attention, "
                    f"{peer_best['peer_experts']} experts, labels= loss, fp32, AdamW fused, no gradient "
                    f"checkpointing, {peer_best['threads']} threads",
        machine=machine_facts(max(threads), ("transformers",)),
        settings={"preset": preset, "parameters": n_params, "vocab": vocab, "batch": batch, "seq": seq,
                  "steps_per_round": steps, "mtp": False, "dtype": "float32"},
        by_threads={str(m["threads"]): {k: v for k, v in m.items() if k != "threads"} for m in by_threads})
