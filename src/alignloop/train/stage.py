"""The trainer stages: `run_sft`, `run_dpo`, `run_distill` (`alignloop train sft|dpo|distill RECIPE`).

Each is the skeleton of `alignloop.train.session` around its own data and objective (in `sft`,
`dpo`, `distill`): open the stage, load the model, build the batches, make the model trainable,
`train`, finish. Each returns its stage; a finished stage with the same config and inputs is
skipped. Under torchrun every process runs the same call with the same recipe; rank 0 alone
writes (caches, metrics, checkpoints, the model, the manifest) and the others read its caches.
"""

from __future__ import annotations

from collections.abc import Sequence

from alignloop.models import load_tokenizer
from alignloop.models.fingerprint import local_model_files
from alignloop.runs import Stage
from alignloop.train import dist, session
from alignloop.train.config import DistillRecipe, DPORecipe, SFTRecipe
from alignloop.train.context import check_fits_context
from alignloop.train.distill import (
    GENERATIONS,
    GENERATIONS_META,
    TOPK_FILE,
    IndexedExample,
    teacher_answers,
    Teacher,
    check_same_tokenizer,
    student_setup,
    teacher_topk,
)
from alignloop.train.dpo import REFERENCE_FILE, PreferenceObjective, cached_reference, loss_options, pair_batches
from alignloop.train.dpo_data import limit_pairs, read_pairs, split_pairs, tokenize_pairs
from alignloop.train.kto_data import read_unpaired
from alignloop.train.logprobs import TokenLogprobs
from alignloop.train.loop import StepCallback, evaluate, pick_device
from alignloop.train.sft import SFTObjective, packed_batches
from alignloop.train.sft_data import draw_conversations, read_conversations, split, tokenize
from alignloop.ui import say


def run_sft(recipe: SFTRecipe, run: str | None = None, force: bool = False,
            callbacks: Sequence[StepCallback] = ()) -> Stage:
    """Supervised fine-tuning: write runs/<run>/sft/ (see `alignloop.train.sft`), return the stage."""
    cfg = recipe.train
    stage, done = session.open_stage(recipe, "sft", run, force, inputs=[recipe.data.path])
    if done:
        return stage
    model, tokenizer = session.load_base_model(recipe.model)
    check_fits_context(model, cfg.max_seq_len)
    conversations = read_conversations(recipe.data.path)
    drawn = draw_conversations(conversations, cfg.max_conversations, cfg.seed)
    if len(drawn) < len(conversations):
        say(f"sft: {len(drawn)} of {len(conversations)} conversations, a seeded draw (train.max_conversations)")
    examples, counts = tokenize(tokenizer, drawn, cfg.max_seq_len, cfg.last_turn_only)
    train_examples, eval_examples = split(examples, cfg.eval_fraction, cfg.seed, cfg.micro_batch)
    batches, eval_batches = packed_batches(train_examples, eval_examples, cfg, tokenizer.pad_token_id or 0)
    say(f"sft: {len(train_examples)} train / {len(eval_examples)} eval conversations, "
        f"{counts.loss_tokens} assistant tokens of {counts.tokens}; {len(batches.rows)} rows "
        f"{batches.fill(cfg.max_seq_len):.0%} full")

    model = session.make_trainable(model, cfg)
    module = TokenLogprobs(model)
    result = session.train(module, SFTObjective(), batches, cfg, stage, eval_batches=eval_batches,
                           callbacks=callbacks, description="sft")
    session.finish(stage, module, model, tokenizer, recipe.model, cfg,
                   extra={"data": counts.as_dict(), "train": session.summarise(result, ("loss", "ce"))})
    session.report("sft", result, stage)
    return stage


def run_dpo(recipe: DPORecipe, run: str | None = None, force: bool = False,
            callbacks: Sequence[StepCallback] = ()) -> Stage:
    """Preference optimisation: write runs/<run>/dpo/ (see `alignloop.train.dpo`), return the stage.

    The manifest's `baseline` holds the starting model's held-out numbers, for comparison.
    """
    cfg = recipe.train
    stage, done = session.open_stage(recipe, "dpo", run, force, inputs=[recipe.data.path])
    if done:
        return stage
    model, tokenizer = session.load_base_model(recipe.model)
    check_fits_context(model, cfg.max_seq_len)  # per side: both sides of a pair restart their positions
    # kto reads labelled answers and pairs each with a mismatched one (its reference point)
    rows = read_unpaired(recipe.data.path) if cfg.loss == "kto" else read_pairs(recipe.data.path)
    pairs, counts = tokenize_pairs(tokenizer, rows, cfg.max_seq_len)
    train_pairs, eval_pairs = split_pairs(pairs, cfg.eval_fraction, cfg.split_salt)
    pairs, train_pairs, eval_pairs = limit_pairs(train_pairs, eval_pairs, cfg.max_train_pairs, cfg.max_eval_pairs,
                                                 cfg.seed)
    if cfg.eval_fraction > 0 and not eval_pairs:
        say("[yellow]warning: no pair landed in the eval split: no held-out accuracy will be reported[/]")
    say(f"dpo ({cfg.loss}, beta {cfg.beta:g}): {len(train_pairs)} train / {len(eval_pairs)} eval pairs, "
        f"{counts.response_tokens} response tokens of {counts.tokens}")

    model = session.make_trainable(model, cfg)
    module = TokenLogprobs(model)
    pad_id = tokenizer.pad_token_id or 0
    reference = cached_reference(module, pairs, recipe.model, cfg, pad_id, stage.path(REFERENCE_FILE))
    batches, eval_batches = pair_batches(train_pairs, eval_pairs, cfg, pad_id, reference)
    objective = PreferenceObjective(cfg.loss, cfg.beta, options=loss_options(cfg))
    # The held-out numbers of the starting model (the loop has no step-0 eval; the checkpoint, if
    # any, is only loaded inside `train`, so this is always the initial model, resumed or not).
    device = next(model.parameters()).device
    baseline = evaluate(module, objective, eval_batches, device, cfg.bf16) if eval_batches else {}
    if baseline:
        say(f"dpo: starting model's held-out log-prob preference accuracy {baseline['eval_logp_accuracy']:.3f}")
    result = session.train(module, objective, batches, cfg, stage, eval_batches=eval_batches,
                           callbacks=callbacks, description="dpo")

    keep = ("loss", "accuracy", "logp_accuracy", "margin", "rewards/chosen", "rewards/rejected")
    session.finish(stage, module, model, tokenizer, recipe.model, cfg,
                   outputs=[stage.path(REFERENCE_FILE)] if reference is not None else [],
                   extra={"data": {**counts.as_dict(), "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs)},
                          "baseline": baseline, "train": session.summarise(result, keep)})
    ev = result.eval
    session.report("dpo", result, stage,
                   f", held-out accuracy {ev['eval_accuracy']:.3f} margin {ev['eval_margin']:.3f} on "
                   f"{len(eval_pairs)} pairs" if "eval_accuracy" in ev else "")
    return stage


def run_distill(recipe: DistillRecipe, run: str | None = None, force: bool = False,
                callbacks: Sequence[StepCallback] = ()) -> Stage:
    """Distil the teacher into the student: write runs/<run>/distill/ (see `alignloop.train.distill`).

    Rank 0 alone generates the teacher's answers and computes its top-k; the others read them.
    """
    cfg, dcfg = recipe.train, recipe.distill
    dist.init_from_env()
    # Refuse a tokenizer mismatch before anything is loaded, generated or written.
    with dist.main_first():  # a first load converts into the cache: once, not racing
        student_tokenizer = load_tokenizer(recipe.model.name)
        if dcfg.level == "logit":
            check_same_tokenizer(student_tokenizer, load_tokenizer(recipe.teacher.name), recipe.model.name,
                                 recipe.teacher.name)
    # A teacher given as a folder is an input too: retraining it reruns the stage.
    stage, done = session.open_stage(recipe, "distill", run, force,
                                     inputs=[recipe.data.path, *local_model_files(recipe.teacher.name)])
    if done:
        return stage
    teacher = Teacher(recipe.teacher)
    extra, source = {}, recipe.data.path
    if dcfg.responses == "teacher":
        with dist.main_first():  # rank 0 generates and writes; the others find its answers cached
            source, extra["generation"] = teacher_answers(stage, recipe, teacher)
    examples, counts = tokenize(student_tokenizer, read_conversations(source), cfg.max_seq_len, cfg.last_turn_only)
    examples = [IndexedExample(e.input_ids, e.loss_mask, e.weight, i) for i, e in enumerate(examples)]
    train_examples, eval_examples = split(examples, cfg.eval_fraction, cfg.seed, cfg.micro_batch)
    pad_id = student_tokenizer.pad_token_id or 0

    model, tokenizer = session.load_base_model(recipe.model)
    check_fits_context(model, cfg.max_seq_len, "student")
    table = (teacher_topk(stage, recipe, teacher, model, examples, len(student_tokenizer), pad_id,
                          pick_device(cfg.device)) if dcfg.level == "logit" else None)
    teacher.release()
    say(f"distill ({dcfg.level}, {dcfg.responses} responses): {len(train_examples)} train / {len(eval_examples)} "
        f"eval conversations, {counts.loss_tokens} response tokens of {counts.tokens}")

    model = session.make_trainable(model, cfg)
    module, objective, batches, eval_batches = student_setup(model, dcfg.level, recipe, table, train_examples,
                                                             eval_examples, pad_id)
    result = session.train(module, objective, batches, cfg, stage, eval_batches=eval_batches,
                           callbacks=callbacks, description=f"distill ({dcfg.level})")
    outputs = [stage.path(GENERATIONS), stage.path(GENERATIONS_META)] if dcfg.responses == "teacher" else []
    session.finish(stage, module, model, tokenizer, recipe.model, cfg,
                   outputs=outputs + ([stage.path(TOPK_FILE)] if dcfg.level == "logit" else []),
                   extra={**extra, "data": counts.as_dict(), "train": session.summarise(result, ("loss", "kl", "ce"))})
    session.report("distill", result, stage)
    return stage

