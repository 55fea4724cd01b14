"""Distillation: teach a student model what a teacher model says.

Two levels (`distill.level`):

- **sequence**: the teacher answers every prompt through the generation engine
  (`alignloop.engine.engine.Engine`), the answers are written as an SFT dataset
  (`generations.jsonl`: `{"messages": prompt + [answer], "weight"}`), and the student does SFT on
  them with the SFT trainer's pieces (assistant-only loss, packing, sample weights). Teacher and
  student may have different tokenizers.

- **logit**: the student matches the teacher's next-token distribution on every response token,
  through a KL divergence on the teacher's top-k log-probs (`distill.top_k`). Responses come from
  the teacher (`distill.responses = "teacher"`, generated as above) or from the data's own
  assistant turns (`"data"`). This needs the same tokenizer on both sides (same vocabulary, same
  ids for the same text): token i must mean the same thing to both models. When the tokenizers
  differ the run stops at once with a one-line error.

How the top-k KL treats the rest of the vocabulary (`distill.tail`):

- `bucket` (default): both distributions are coarsened to k + 1 outcomes: the teacher's k tokens
  and one "tail" bucket holding all the remaining probability (1 - sum of the k). The KL of the
  coarsened distributions is a true KL (0 iff they agree on the k tokens and on the tail mass) and
  a lower bound on the full-vocabulary KL. The student is pushed to give the tail exactly the
  mass the teacher gives it, so it cannot hide probability outside the teacher's top k.
- `renormalise`: both are renormalised over the k tokens and the tail is ignored. Cheaper to
  explain but blind to mass the student puts elsewhere: a student can score 0 while giving the
  k tokens only a sliver of its probability.

`distill.kl = "forward"` is KL(teacher || student) (mass-covering, the classic distillation loss);
`"reverse"` is KL(student || teacher) (mode-seeking). `distill.temperature` divides both models'
logits before the softmax (the loss is not rescaled by T^2).

The teacher's top-k ids and log-probs are computed in one pass before training and cached in the
stage folder (`teacher_topk.safetensors`), so the student trains without the teacher in memory
and a resumed run does not run the teacher again. Teacher generations are cached likewise.

`alignloop train distill RECIPE` (`alignloop.train.stage.run_distill`) writes runs/<run>/distill/:
model/, generations.jsonl (teacher answers), teacher_topk.safetensors
(logit level), checkpoints/, metrics.jsonl (loss; kl and ce at the logit level), manifest.json.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from alignloop.engine.config import SamplingSection
from alignloop.engine.engine import Engine
from alignloop.errors import AlignloopError
from alignloop.models import load_model
from alignloop.models.fingerprint import model_fingerprint
from alignloop.runs import Stage, atomic_write_json, atomic_write_text, config_hash, file_hash
from alignloop.sections import ModelSection
from alignloop.train import dist
from alignloop.train.cache import load_or_compute
from alignloop.train.config import DistillRecipe, DistillTrainSection
from alignloop.train.context import check_fits_context
from alignloop.train.logprobs import (
    _LOGIT_POSTPROCESSING,
    TokenLogprobs,
    attention_inputs,
    causal_lm,
)
from alignloop.train.loop import Objective, autocast
from alignloop.train.packing import Example, PackedBatch, collate
from alignloop.train.session import master_dtype
from alignloop.train.sft import SFTObjective, packed_batches
from alignloop.train.sft_data import Conversation, PackedBatches, read_conversations
from alignloop.ui import progress, say

GENERATIONS = "generations.jsonl"
GENERATIONS_META = "generations.meta.json"
TOPK_FILE = "teacher_topk.safetensors"


# --- tokenizers --------------------------------------------------------------------------------

_PROBES = ("Hello, world! 12345 naïve café 日本語 🙂\n\tdone.", "  leading spaces and\r\nCRLF", "<|im_start|>user")


def check_same_tokenizer(student: Any, teacher: Any, student_name: str, teacher_name: str,
                         texts: Sequence[str] = ()) -> None:
    """Raise a one-line AlignloopError unless both tokenizers have one vocabulary and encode alike."""
    reason = None
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if len(sv) != len(tv):
        reason = f"vocabularies of {len(sv)} and {len(tv)} tokens"
    elif sv != tv:
        token = next(t for t in sorted(sv) if tv.get(t) != sv[t])
        reason = f"token {token!r} has id {sv[token]} in the student's and {tv.get(token)} in the teacher's"
    else:
        for text in (*_PROBES, *texts):
            a = student(text, add_special_tokens=False)["input_ids"]
            b = teacher(text, add_special_tokens=False)["input_ids"]
            if list(a) != list(b):
                reason = f"they split {text[:40]!r} differently"
                break
    if reason is not None:
        raise AlignloopError(
            f"logit distillation needs teacher and student to share a tokenizer, and {teacher_name} and "
            f"{student_name} do not ({reason}); use distill.level = \"sequence\" instead")


# --- sequence level: the teacher answers --------------------------------------------------------


@dataclass
class GenerationCounts:
    prompts: int = 0
    answered: int = 0
    replaced_answers: int = 0   # rows that ended with assistant turns: those were dropped, the teacher answers
    skipped_no_prompt: int = 0  # nothing to answer (no user turn)
    skipped_truncated: int = 0  # cut off at max_tokens (unless keep_truncated)
    skipped_empty: int = 0
    generated_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def prompt_of(messages: Sequence[dict]) -> tuple[list[dict], bool]:
    """(messages up to the last non-assistant turn, whether trailing assistant turns were dropped)."""
    end = len(messages)
    while end and messages[end - 1].get("role") == "assistant":
        end -= 1
    return list(messages[:end]), end < len(messages)


def teacher_generations(engine: Any, conversations: Sequence[Conversation], sampling: SamplingSection,
                        keep_truncated: bool = False) -> tuple[list[dict[str, Any]], GenerationCounts]:
    """The teacher's answer to each prompt, as SFT rows {"messages": prompt + [answer], "weight", ...}."""
    counts = GenerationCounts(prompts=len(conversations))
    prompts, weights = [], []
    for conv in conversations:
        prompt, replaced = prompt_of(conv.messages)
        if not prompt or not any(m.get("role") == "user" for m in prompt):
            counts.skipped_no_prompt += 1
            continue
        counts.replaced_answers += replaced
        prompts.append(prompt)
        weights.append(conv.weight)
    if not prompts:
        raise AlignloopError(f"none of the {counts.prompts} rows has a user turn for the teacher to answer")
    completions = engine.chat(prompts, [sampling.params(i) for i in range(len(prompts))])
    rows = []
    for prompt, weight, c in zip(prompts, weights, completions):
        counts.generated_tokens += len(c.token_ids)
        if c.finish_reason == "length" and not keep_truncated:
            counts.skipped_truncated += 1
            continue
        if not c.text.strip():
            counts.skipped_empty += 1
            continue
        rows.append({"messages": [*prompt, {"role": "assistant", "content": c.text}], "weight": weight,
                     "finish_reason": c.finish_reason})
        counts.answered += 1
    if counts.skipped_truncated:
        say(f"[yellow]warning: {counts.skipped_truncated} teacher answer(s) hit sampling.max_tokens="
            f"{sampling.max_tokens} and were left out (distill.keep_truncated = true keeps them)[/]")
    if not rows:
        raise AlignloopError(f"the teacher gave no usable answer to {len(prompts)} prompt(s): "
                             f"{counts.skipped_truncated} cut off at sampling.max_tokens={sampling.max_tokens}, "
                             f"{counts.skipped_empty} empty; raise sampling.max_tokens or set distill.keep_truncated")
    return rows, counts


# --- logit level: top-k KL ---------------------------------------------------------------------


class SelectedLogits(torch.nn.Module):
    """forward(input_ids, position_ids, allowed, select) -> fp32 logits [N, V] at the `select` positions.

    Like `TokenLogprobs`, it projects onto the vocabulary only where a loss needs it.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor,
                select: torch.Tensor) -> torch.Tensor:
        lm = causal_lm(self.model)
        kwargs = {"input_ids": input_ids, "position_ids": position_ids,
                  "attention_mask": attention_inputs(lm, allowed), "use_cache": False}
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
        head = lm.get_output_embeddings()
        if decoder is None or head is None or any(getattr(lm.config, k, None) for k in _LOGIT_POSTPROCESSING):
            return lm(**kwargs).logits[select].float()
        return head(decoder(**kwargs).last_hidden_state[select]).float()


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0,
                  vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, k], log-probs [N, k]) of the k most likely tokens among the first `vocab` ids.

    The log-probs are over the whole softmax (all of `logits`), not renormalised over the k.
    """
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logp[:, : vocab or logp.shape[-1]].topk(min(k, vocab or logp.shape[-1]), dim=-1)
    return ids, values


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends; the tail mass is floored at 1e-12."""
    x = x.clamp(max=math.log1p(-1e-12))
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logps: torch.Tensor,
            direction: Literal["forward", "reverse"] = "forward", tail: Literal["bucket", "renormalise"] = "bucket",
            temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL [N] between the teacher's top-k distribution and the student's, as in the module docs."""
    s_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    s = s_all.gather(-1, teacher_ids.long())
    t = teacher_logps.float()
    if tail == "bucket":
        s = torch.cat([s, _log1mexp(torch.logsumexp(s, -1, keepdim=True))], dim=-1)
        t = torch.cat([t, _log1mexp(torch.logsumexp(t, -1, keepdim=True))], dim=-1)
    elif tail == "renormalise":
        s = s - torch.logsumexp(s, -1, keepdim=True)
        t = t - torch.logsumexp(t, -1, keepdim=True)
    else:
        raise ValueError(f"unknown tail '{tail}'")
    if direction == "forward":
        return (t.exp() * (t - s)).sum(-1)
    if direction == "reverse":
        return (s.exp() * (s - t)).sum(-1)
    raise ValueError(f"unknown KL direction '{direction}'")


@dataclass(frozen=True)
class IndexedExample(Example):
    index: int = -1  # row of the teacher top-k table


@dataclass
class TopKTable:
    ids: torch.Tensor      # [T, k] int32: the teacher's top-k ids at every scored token of every example
    logps: torch.Tensor    # [T, k] float32
    offsets: torch.Tensor  # [E + 1] int64: example i owns rows offsets[i]:offsets[i+1]

    def of(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.ids[a:b], self.logps[a:b]


def _scored(example: Example) -> int:
    return sum(example.loss_mask[1:])


def _teacher_forward(module: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """One no-grad teacher forward: logits at the batch's scored positions (tests count these)."""
    return module(batch.input_ids, batch.position_ids, batch.attention_mask(), batch.loss_mask)


def compute_teacher_topk(teacher: torch.nn.Module, examples: Sequence[Example], k: int, temperature: float,
                         micro_batch: int, pad_id: int, device: torch.device, bf16: bool,
                         vocab: int | None = None) -> TopKTable:
    """The teacher's top-k at every scored token of `examples` (in order), one example per row."""
    module = SelectedLogits(teacher).eval()
    counts = torch.tensor([0] + [_scored(e) for e in examples], dtype=torch.int64)
    offsets = counts.cumsum(0)
    total, width = int(offsets[-1]), None
    ids_out: list[torch.Tensor] = []
    logps_out: list[torch.Tensor] = []
    chunks = [list(examples[i : i + micro_batch]) for i in range(0, len(examples), micro_batch)]
    with torch.no_grad(), autocast(device, bf16), progress() as bar:
        task = bar.add_task("teacher top-k", total=len(chunks), info="")
        for chunk in chunks:
            batch = collate([[e] for e in chunk], pad_id).to(device)
            ids, logps = topk_logprobs(_teacher_forward(module, batch), k, temperature, vocab)
            width = ids.shape[-1]
            ids_out.append(ids.to(torch.int32).cpu())
            logps_out.append(logps.float().cpu())
            bar.update(task, advance=1)
    table = TopKTable(torch.cat(ids_out) if ids_out else torch.zeros(0, width or k, dtype=torch.int32),
                      torch.cat(logps_out) if logps_out else torch.zeros(0, width or k), offsets)
    if table.ids.shape[0] != total:
        raise RuntimeError(f"teacher top-k rows {table.ids.shape[0]} != scored tokens {total}")  # a bug
    return table


@dataclass
class TopKBatch:
    packed: PackedBatch
    teacher_ids: torch.Tensor    # [N, k] (N = scored tokens, row-major like the loss mask)
    teacher_logps: torch.Tensor  # [N, k]

    def to(self, device: torch.device | str) -> TopKBatch:
        return TopKBatch(self.packed.to(device), self.teacher_ids.to(device), self.teacher_logps.to(device))


class TopKBatches(PackedBatches):
    """`batches(epoch)`: packed rows of examples with their teacher top-k, reshuffled per epoch from the seed."""

    def __init__(self, examples: Sequence[IndexedExample], table: TopKTable, max_seq_len: int, micro_batch: int,
                 seed: int = 0, pad_id: int = 0, packing: bool = True, shuffle: bool = True) -> None:
        super().__init__(examples, max_seq_len, micro_batch, seed, pad_id, packing, shuffle)
        self.table = table

    def collate(self, rows: list[list[IndexedExample]]) -> TopKBatch:
        parts = [self.table.of(e.index) for row in rows for e in row]
        return TopKBatch(collate(rows, self.pad_id), torch.cat([p[0] for p in parts]).long(),
                         torch.cat([p[1] for p in parts]))


class TopKDistillObjective:
    """Sample-weighted per-token KL to the teacher's top-k; weight = scored tokens (as SFT)."""

    def __init__(self, direction: Literal["forward", "reverse"], tail: Literal["bucket", "renormalise"],
                 temperature: float = 1.0) -> None:
        self.direction, self.tail, self.temperature = direction, tail, temperature

    def weight(self, batch: TopKBatch) -> float:
        return float(batch.packed.n_loss_tokens)

    def loss(self, module: torch.nn.Module, batch: TopKBatch) -> tuple[torch.Tensor, dict[str, float]]:
        pk = batch.packed
        select = pk.loss_mask
        logits = module(pk.input_ids, pk.position_ids, pk.attention_mask(), select)
        kl = topk_kl(logits, batch.teacher_ids, batch.teacher_logps, self.direction, self.tail, self.temperature)
        ce = F.cross_entropy(logits.detach().float(), pk.targets[select], reduction="none")
        return (kl * pk.loss_weight[select]).sum(), {"kl_sum": float(kl.detach().sum()),
                                                     "ce_sum": float(ce.sum()), "tokens": pk.n_tokens}


# --- the run -----------------------------------------------------------------------------------


class Teacher:
    """The teacher model, loaded on first use and released once the student trains."""

    def __init__(self, section: ModelSection) -> None:
        self.section = section
        self._loaded: tuple[Any, Any] | None = None

    def get(self) -> tuple[Any, Any]:
        if self._loaded is None:
            self._loaded = load_model(self.section.name, dtype=master_dtype(self.section), seed=self.section.seed)
        return self._loaded

    def release(self) -> None:
        self._loaded = None
        gc.collect()


def teacher_answers(stage: Stage, recipe: DistillRecipe, teacher: Teacher) -> tuple[Path, dict[str, int]]:
    """generations.jsonl in the stage folder (reused when teacher, data and sampling are unchanged)."""
    out, meta_path = stage.path(GENERATIONS), stage.path(GENERATIONS_META)
    fingerprint = config_hash({"teacher": model_fingerprint(recipe.teacher),
                               "data": file_hash(recipe.data.path),
                               "sampling": recipe.sampling.model_dump(mode="json"),
                               "keep_truncated": recipe.distill.keep_truncated,
                               "engine_dtype": recipe.distill.engine_dtype})
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["fingerprint"] == fingerprint and file_hash(out) == meta["sha256"]:
            say(f"teacher answers: cached ({out.name})")
            return out, meta["counts"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not dist.is_main():  # run under main_first: rank 0 has just written them
        raise RuntimeError(f"rank {dist.context().rank}: rank 0 left no readable teacher answers in {out}")
    model, tokenizer = teacher.get()
    engine = Engine(model, tokenizer, dtype=recipe.distill.engine_dtype, show_progress=True)
    rows, counts = teacher_generations(engine, read_conversations(recipe.data.path), recipe.sampling,
                                       recipe.distill.keep_truncated)
    del engine
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_json(meta_path, {"fingerprint": fingerprint, "sha256": file_hash(out), "counts": counts.as_dict()})
    say(f"teacher answered {counts.answered} of {counts.prompts} prompts ({counts.generated_tokens} tokens)")
    return out, counts.as_dict()


def _examples_digest(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(torch.tensor(e.input_ids, dtype=torch.int64).numpy().tobytes())
        h.update(bytes(e.loss_mask))
        h.update(b"|")
    return h.hexdigest()


def teacher_topk(stage: Stage, recipe: DistillRecipe, teacher: Teacher, student: torch.nn.Module,
                 examples: Sequence[Example], vocab: int, pad_id: int, device: torch.device) -> TopKTable:
    """The teacher's top-k over `examples`: from the stage's cache, else computed (and cached).

    `vocab`: ids the student's tokenizer and both output layers have. Under torchrun rank 0
    computes and writes the cache; the others read it.
    """
    cfg, dcfg = recipe.train, recipe.distill

    def compute() -> dict[str, torch.Tensor]:
        t_model, _ = teacher.get()
        check_fits_context(t_model, cfg.max_seq_len, "teacher")
        t_model.to(device)
        common = min(vocab, t_model.get_output_embeddings().weight.shape[0],
                     student.get_output_embeddings().weight.shape[0])
        return asdict(compute_teacher_topk(t_model, examples, dcfg.top_k, dcfg.temperature, cfg.micro_batch,
                                           pad_id, device, cfg.bf16, common))

    fingerprint = config_hash({"teacher": model_fingerprint(recipe.teacher), "tokens": _examples_digest(examples),
                               "top_k": dcfg.top_k, "temperature": dcfg.temperature, "bf16": cfg.bf16,
                               "device": device.type, "version": 1})
    with dist.main_first():
        return TopKTable(**load_or_compute(stage.path(TOPK_FILE), fingerprint, compute, "teacher top-k"))


def student_setup(model: torch.nn.Module, level: str, recipe: DistillRecipe, table: TopKTable | None,
                  train: Sequence[IndexedExample], held_out: Sequence[IndexedExample], pad_id: int
                  ) -> tuple[torch.nn.Module, Objective, PackedBatches, Sequence[Any]]:
    """(module, objective, batches, held-out batches) of the student at `level`.

    logit: the top-k KL on logits at the scored positions; sequence: SFT on the teacher's answers.
    """
    cfg: DistillTrainSection = recipe.train
    if level == "sequence":
        return (TokenLogprobs(model), SFTObjective(), *packed_batches(train, held_out, cfg, pad_id))
    dcfg = recipe.distill
    batches = TopKBatches(train, table, cfg.max_seq_len, cfg.micro_batch, seed=cfg.seed, pad_id=pad_id,
                          packing=cfg.packing)
    eval_batches = TopKBatches(held_out, table, cfg.max_seq_len, cfg.micro_batch, pad_id=pad_id,
                               packing=cfg.packing, shuffle=False)(0) if held_out else ()
    return (SelectedLogits(model), TopKDistillObjective(dcfg.kl, dcfg.tail, dcfg.temperature), batches,
            eval_batches)
