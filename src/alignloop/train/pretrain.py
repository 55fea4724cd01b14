"""Pre-training from scratch on chat text: every token is learned, documents packed into rows.

`alignloop train pretrain RECIPE` writes runs/<run>/pretrain/: model/ (an HF checkpoint folder the
zoo loads by path), checkpoints/, metrics.jsonl (with per-layer expert load for MoE models),
moe_maxvio.png (MoE models), manifest.json.

The corpus is conversations rendered with the model's chat template, from three sources:
- the simulated world (`data.sim_users` users over `data.sim_days` days, template responder: the
  world's users writing, the deployed template model answering);
- real human conversations, the `chitchat-dataset` package (`data.chitchat`; the opener is "user",
  the other person "assistant", as `alignloop.data.adapters.chitchat` maps them);
- messages JSONL/Parquet files (`data.paths`), as SFT reads them.

It is SFT's machinery with a different mask: an all-ones loss mask (the loss is the mean
next-token cross-entropy over every token but each document's last), `PackedBatches` (first-fit
packing, per-document attention through `TokenLogprobs(segments=...)`), `SFTObjective`. A model
with multi-token-prediction modules (the DeepSeek-style presets) also learns them: `MTPObjective`
adds `mtp.weight` x the mean over depths of their cross-entropy (DeepSeek-V3: 0.3), on the same
packed rows, so the MTP head can draft for speculative decoding afterwards. A
document longer than a row is cut into row-sized pieces, not skipped: with no assistant turn to
keep whole, a piece is as good a training text as any (each piece restarts its positions at 0).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from alignloop.models.deepseek import DeepseekForCausalLM, HeadCrossEntropy
from alignloop.recipes import ExistingFile, Section
from alignloop.runs import Stage
from alignloop.sections import ModelSection, RunSection
from alignloop.train import session
from alignloop.train.config import SFTTrainSection
from alignloop.train.context import check_fits_context
from alignloop.train.logprobs import TokenLogprobs, causal_lm
from alignloop.train.loop import StepCallback
from alignloop.train.moe_balance import real_tokens
from alignloop.train.packing import Example, PackedBatch
from alignloop.train.sft import SFTObjective, packed_batches
from alignloop.train.sft_data import read_conversations, split
from alignloop.ui import say


class PretrainDataSection(Section):
    sim_users: int = Field(200, ge=0, description="users of the simulated world whose conversations are text; 0: none")
    sim_days: int = Field(7, ge=1, le=3650)
    sim_seed: int = 0
    chitchat: bool = Field(True, description="real human conversations of the chitchat-dataset package")
    paths: list[ExistingFile] = Field(default_factory=list, description="messages files (JSONL/Parquet), as SFT reads")
    max_documents: int | None = Field(None, ge=1, description="at most this many conversations, a seeded draw "
                                      "made before tokenizing")


class MTPSection(Section):
    weight: float = Field(0.3, ge=0, description="multi-token prediction loss weight (models with MTP modules; "
                                                  "DeepSeek-V3: 0.3, then 0.1); 0 leaves the modules untrained")


class PretrainRecipe(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: PretrainDataSection = PretrainDataSection()
    train: SFTTrainSection = SFTTrainSection()
    mtp: MTPSection = MTPSection()


class MTPObjective(SFTObjective):
    """SFT's cross-entropy plus `weight` x the mean over MTP depths of theirs, on packed rows.

    One forward of the main stack (per-document attention through the block mask) feeds both the
    head and the MTP modules (`DeepseekForCausalLM.mtp_hidden`); every head runs fused with its loss
    (`head_cross_entropy`'s kernel), never as [B, T, V] logits. Depth k's target at position i is
    token i + k + 1 of the same document; rows across a document boundary carry no loss.
    """

    def __init__(self, weight: float) -> None:
        self.mtp_weight = weight

    def loss(self, module: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        lm = causal_lm(module.model)
        mask = batch.attention_mask()
        select = batch.loss_mask
        with real_tokens(module.moe_layers, batch.doc_ids >= 0):  # found once, not per micro batch
            out = lm.model(batch.input_ids, mask, batch.position_ids)
            ce = HeadCrossEntropy.apply(out.last_hidden_state[select], lm.lm_head.weight, batch.targets[select])
            depths = lm.mtp_hidden(batch.input_ids, out.pre_norm_hidden, mask, batch.position_ids, batch.doc_ids)
        T, mtp = batch.input_ids.shape[1], []
        for k, h in enumerate(depths, start=1):
            # Target of row i: token i + k + 1, in the same document as token i (and not padding).
            n = T - k - 1
            docs = batch.doc_ids
            keep = (docs[:, :n] == docs[:, k + 1:]) & (docs[:, :n] >= 0)
            mtp.append(HeadCrossEntropy.apply(h[:, :n][keep], lm.lm_head.weight, batch.input_ids[:, k + 1:][keep])
                       * (select.sum() / keep.sum().clamp(min=1)))  # on the main loss's token scale
        mtp_loss = torch.stack(mtp).mean() if mtp else ce.new_zeros(())
        stats = {"ce_sum": float(ce.detach()), "tokens": batch.n_tokens}
        if mtp:
            stats["mtp_ce_sum"] = float(mtp_loss.detach())
        return ce + self.mtp_weight * mtp_loss, stats


@dataclass
class CorpusCounts:
    documents: int = 0
    pieces: int = 0
    tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"documents": self.documents, "pieces": self.pieces, "tokens": self.tokens}


# --- sources -----------------------------------------------------------------------------------


def sim_conversations(users: int, days: int, seed: int) -> list[list[dict[str, str]]]:
    """The simulated world's conversations as messages: the turns the conversation went on from
    (selected), in order (template responder: a few seconds for hundreds of users)."""
    from alignloop.sim import SimConfig, simulate

    logs, _ = simulate(SimConfig(users=users, days=days, seed=seed))
    turns = logs["turns"].select(["conversation_id", "position", "role", "text", "selected"]).to_pylist()
    by_conversation: dict[str, list[dict]] = {}
    for t in turns:
        if t["selected"] and t["role"] in ("user", "assistant"):
            by_conversation.setdefault(t["conversation_id"], []).append(t)
    return [[{"role": t["role"], "content": t["text"]} for t in sorted(ts, key=lambda t: t["position"])]
            for _, ts in sorted(by_conversation.items())]


def chitchat_conversations() -> list[list[dict[str, str]]]:
    """The chitchat dataset's conversations as messages: the opener is the user; a message is its
    lines joined by newlines (as the chitchat adapter makes turns)."""
    from alignloop.data.adapters.chitchat import load_chitchat

    out = []
    for _, conv in sorted(load_chitchat().items()):
        messages = conv.get("messages") or []
        if not messages:
            continue
        opener = messages[0][0]["sender"]
        out.append([{"role": "user" if m[0]["sender"] == opener else "assistant",
                     "content": "\n".join(line["text"] for line in m)} for m in messages])
    return out


def corpus(data: PretrainDataSection, seed: int) -> list[list[dict[str, str]]]:
    """Every source's conversations, then the seeded draw of `data.max_documents`."""
    docs: list[list[dict[str, str]]] = []
    if data.sim_users:
        docs += sim_conversations(data.sim_users, data.sim_days, data.sim_seed)
    if data.chitchat:
        docs += chitchat_conversations()
    for path in data.paths:
        docs += [c.messages for c in read_conversations(path)]
    if data.max_documents is not None and len(docs) > data.max_documents:
        keep = sorted(random.Random(seed).sample(range(len(docs)), data.max_documents))
        docs = [docs[i] for i in keep]
    return docs


# --- tokens ------------------------------------------------------------------------------------


def pieces(ids: Sequence[int], max_len: int) -> list[list[int]]:
    """`ids` cut into consecutive pieces of at most `max_len` tokens; a last piece of one token
    (nothing to predict) is dropped."""
    return [list(ids[i:i + max_len]) for i in range(0, len(ids), max_len) if len(ids) - i >= 2]


def tokenize_corpus(tokenizer: Any, docs: Sequence[list[dict[str, str]]], max_len: int
                    ) -> tuple[list[Example], CorpusCounts]:
    """Every document through the chat template, cut into row-sized pieces, all tokens in the loss."""
    counts = CorpusCounts(documents=len(docs))
    examples = []
    for messages in docs:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        for piece in pieces(ids, max_len):
            examples.append(Example(piece, [1] * len(piece)))
            counts.tokens += len(piece)
    counts.pieces = len(examples)
    return examples, counts


# --- the stage ---------------------------------------------------------------------------------


def run_pretrain(recipe: PretrainRecipe, run: str | None = None, force: bool = False,
                 callbacks: Sequence[StepCallback] = ()) -> Stage:
    """Pre-train `recipe.model` (a zoo preset: random init) on the corpus: write runs/<run>/pretrain/."""
    cfg = recipe.train
    stage, done = session.open_stage(recipe, "pretrain", run, force, inputs=list(recipe.data.paths))
    if done:
        return stage
    model, tokenizer = session.load_base_model(recipe.model)
    check_fits_context(model, cfg.max_seq_len)
    examples, counts = tokenize_corpus(tokenizer, corpus(recipe.data, cfg.seed), cfg.max_seq_len)
    if not examples:
        raise ValueError("pretrain: the corpus is empty (data.sim_users = 0, data.chitchat = false, no data.paths)")
    train_examples, eval_examples = split(examples, cfg.eval_fraction, cfg.seed, cfg.micro_batch)
    batches, eval_batches = packed_batches(train_examples, eval_examples, cfg, tokenizer.pad_token_id or 0)
    say(f"pretrain: {counts.documents} conversations -> {len(train_examples)} train / {len(eval_examples)} eval "
        f"pieces, {counts.tokens} tokens; {len(batches.rows)} rows {batches.fill(cfg.max_seq_len):.0%} full")

    model = session.make_trainable(model, cfg)
    module = TokenLogprobs(model)
    with_mtp = recipe.mtp.weight > 0 and isinstance(causal_lm(model), DeepseekForCausalLM) \
        and len(causal_lm(model).model.mtp_layers) > 0
    objective = MTPObjective(recipe.mtp.weight) if with_mtp else SFTObjective()
    result = session.train(module, objective, batches, cfg, stage, eval_batches=eval_batches,
                           callbacks=callbacks, description="pretrain")
    keep = ("loss", "ce", "mtp_ce", "moe/maxvio")
    session.finish(stage, module, model, tokenizer, recipe.model, cfg,
                   extra={"data": counts.as_dict(), "train": session.summarise(result, keep)})
    session.report("pretrain", result, stage)
    return stage
