"""vLLM behind `InferenceEngine`, in this process: generation with per-token log-probs, and the
trainer's weights loaded in place after every RL step.

It works wherever `import vllm` does: a CUDA machine with `pip install vllm`, or the CPU peers
environment that `make peers` builds (.venv-peers). vLLM is imported on first use only.

What it returns, against our `Engine` (tests/test_vllm_backend.py checks the first two):
- greedy: the same tokens, and log-probs equal up to kernel numerics (raw log-probs both);
- sampled, top_p 1 and top_k 0: log softmax(logits / temperature) of each token, as ours
  (vLLM's `processed_logprobs` mode); the samples themselves differ, since each engine draws
  from its own RNG (a seed gives the same episodes on one engine, not across the two);
- sampled with top_p < 1 or top_k > 0: vLLM reports the log-prob under the truncated,
  renormalised distribution it sampled from; ours reports it before truncation. The RL trainer's
  importance weights see the difference as policy mismatch.
A prompt with no explicit seed gets its index as the seed, as in our engine, so runs repeat.

Weight sync: vLLM's `reload_weights` worker method, called through `LLM.collective_rpc`. It
reloads layer by layer and re-runs each layer's post-load processing, which the CPU backend
needs: its linear layers keep the weights in a prepacked oneDNN copy, and a plain
`model.load_weights` (what TRL's colocate mode calls on GPUs) would leave that copy stale. A layer
is processed once all of its weights have arrived, so q/k/v (one fused matmul in vLLM) and
gate/up travel together: the ones the trainer did not send (LoRA on some projections only) come
from the last values sent, else from the checkpoint on disk. The prefix cache is dropped after a
load: its keys and values were computed by the old weights.

vLLM runs its engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set when this module
builds an engine), so the weights go to it without a copy through a pipe.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from alignloop.engine.api import Completion, SamplingParams, per_prompt
from alignloop.errors import AlignloopError
from alignloop.models import resolve_model

# vLLM fuses these HF projections into one module each; it processes a module once all of its
# parts have been loaded.
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}


def import_problem() -> str | None:
    """None when vLLM imports here, else why not (one line)."""
    try:
        importlib.import_module("vllm")
    except Exception as exc:  # ImportError, or a broken build's OSError/RuntimeError
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


def require_vllm() -> None:
    if (problem := import_problem()) is not None:
        raise AlignloopError(
            f"the vllm inference backend needs vLLM, which does not import here ({problem}); on a CUDA "
            f"machine `pip install vllm`, on a CPU run from the environment `make peers` builds (.venv-peers)")


def checkpoint_folder(model: str) -> Path:
    """The HF checkpoint folder of a zoo name, which vLLM loads (SmolLM2 is converted once)."""
    where = resolve_model(model)
    if not isinstance(where, Path):
        raise AlignloopError(f"vLLM loads checkpoint folders; '{model}' is a random-init preset built in memory: "
                             f"use smollm2-135m or a folder")
    return where


@contextlib.contextmanager
def _quiet(logger: str):
    """vLLM warns about every module a reload leaves alone ("Failed to load weights"); with LoRA
    that is most of them, every step, by design."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def kv_cache_bytes(folder: Path, dtype: str, sequences: int, length: int) -> int:
    """Keys and values for `sequences` x `length` tokens of the checkpoint's architecture (at least 64 MiB)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = 2 if dtype in ("bfloat16", "float16", "half") else 4  # "auto" may keep a float32 checkpoint's dtype
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * width
    return max(per_token * sequences * length, 64 * 2**20)


def _group(name: str) -> tuple[str, str]:
    """The vLLM module an HF parameter name lands in: (parent path, module)."""
    module = name.rsplit(".", 1)[0]
    parent, _, leaf = module.rpartition(".")
    return parent, FUSED.get(leaf, leaf)


def _fused(name: str) -> bool:
    return _group(name)[1] in FUSED.values()


def _vllm_params(params: SamplingParams, index: int):
    from vllm import SamplingParams as VSamplingParams

    return VSamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, max_tokens=params.max_tokens,
        stop=list(params.stop) or None, stop_token_ids=list(params.stop_token_ids) or None,
        ignore_eos=params.ignore_eos, seed=params.seed if params.seed is not None else index,
        logprobs=0, skip_special_tokens=True)


class VllmEngine:
    """`api.InferenceEngine` on vLLM's offline `LLM`, loaded from an HF checkpoint folder."""

    def __init__(self, folder: str | Path, dtype: str = "auto", max_batch: int = 64, max_len: int = 4096,
                 seed: int = 0, enforce_eager: bool = False, **llm_args: Any):
        """`max_len`: prompt and answer together. On a CPU the KV cache is sized for `max_batch`
        sequences of `max_len` tokens (vLLM's default there is a fraction of all memory, which a
        shared machine rarely has free); on a GPU vLLM sizes it."""
        require_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: see the docstring
        from vllm import LLM

        self.folder = Path(folder)
        if not torch.cuda.is_available():
            llm_args.setdefault("kv_cache_memory_bytes", kv_cache_bytes(self.folder, dtype, max_batch, max_len))
        self.llm = LLM(model=str(self.folder), dtype=dtype, max_num_seqs=max_batch, max_model_len=max_len,
                       seed=seed, enforce_eager=enforce_eager, logprobs_mode="processed_logprobs", **llm_args)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = self.llm.llm_engine.model_config.max_model_len
        self._latest: dict[str, torch.Tensor] = {}

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        params = per_prompt(params, len(prompts))
        encoded = [p if isinstance(p, list) else self.tokenizer(p, add_special_tokens=False)["input_ids"]
                   for p in prompts]
        for i, p in enumerate(encoded):
            if not p:
                raise ValueError(f"prompt {i}: the prompt is empty")
            if len(p) >= self.max_len:
                raise ValueError(f"prompt {i}: the prompt has {len(p)} tokens; the model's context is {self.max_len}")
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in encoded],
                                    [_vllm_params(sp, i) for i, sp in enumerate(params)], use_tqdm=False)
        return [self._completion(p, out.outputs[0]) for p, out in zip(encoded, outputs)]

    @staticmethod
    def _completion(prompt: list[int], out: Any) -> Completion:
        ids = list(out.token_ids)
        logprobs = [step[t].logprob for t, step in zip(ids, out.logprobs or [])]
        finish = "stop" if out.finish_reason == "stop" else "length"
        # vLLM says None for "stopped at EOS"; ours names the token, as for any stop token.
        stop = out.stop_reason if out.stop_reason is not None or finish == "length" else ids[-1]
        return Completion(list(prompt), ids, logprobs, out.text, finish, stop)

    # ---- weights ---------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors in place (the whole fused module each belongs to), then drop the prefix cache."""
        sent = {name: t.detach() for name, t in named_tensors}
        # Kept for the fused modules only (the parts a later load may leave out), on the CPU, as a
        # copy: the trainer goes on changing its own tensors.
        self._latest.update({n: t.to("cpu", copy=True) for n, t in sent.items() if _fused(n)})
        weights = self._whole_modules(sent)
        with _quiet("vllm.model_executor.model_loader.reload"):
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def _whole_modules(self, sent: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        touched = {_group(n) for n in sent}
        names = [n for n in self._checkpoint_names() if _group(n) in touched and n not in sent]
        missing = [n for n in names if n not in self._latest]
        self._latest.update(self._read_checkpoint(missing))
        return list(sent.items()) + [(n, self._latest[n]) for n in names]

    def _checkpoint_names(self) -> list[str]:
        from safetensors import safe_open

        names: list[str] = []
        for file in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                names.extend(f.keys())
        return names

    def _read_checkpoint(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        wanted, found = set(names), {}
        for file in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in wanted.intersection(f.keys()):
                    found[name] = f.get_tensor(name)
        return found
