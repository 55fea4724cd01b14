"""`alignloop generate RECIPE`: answer a file of prompts with a model, as a resumable run stage.

Input: JSONL, one request per line, either {"prompt": "..."} (raw text) or {"messages": [...]}
(chat, rendered with the model's template). Optional "id" is carried through.
Output in runs/<run>/generate/: completions.jsonl (one line per valid request, input order),
quarantine.jsonl (invalid lines with the reason), metrics.jsonl, manifest.json.
Completions are appended chunk by chunk to a partial file, so a killed job resumes where it
stopped; per-request seeds make the resumed result the same as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from alignloop.recipes import ExistingFile, Section, recipe_to_dict
from alignloop.runs import Stage, atomic_write_text, config_hash, default_run_name
from alignloop.sections import ModelSection, RunSection, SamplingSection
from alignloop.ui import say


class GenerateSection(Section):
    prompts: ExistingFile
    chunk: int = Field(64, ge=1, description="requests per checkpointed chunk")
    max_batch: int = Field(64, ge=1)


class GenerateRecipe(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    sampling: SamplingSection = SamplingSection()
    generate: GenerateSection


def read_requests(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a JSONL file into valid requests and quarantined lines (with reasons). Counts add up."""
    good, bad = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            reason = None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row, reason = None, f"not JSON: {e.msg}"
            if reason is None:
                reason = _request_problem(row)
            if reason:
                bad.append({"line": number, "reason": reason, "raw": line.rstrip("\n")})
            else:
                good.append({"line": number, **row})
    return good, bad


def _request_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "expected a JSON object"
    has_prompt, has_messages = "prompt" in row, "messages" in row
    if has_prompt == has_messages:
        return "needs exactly one of 'prompt' or 'messages'"
    if has_prompt and (not isinstance(row["prompt"], str) or not row["prompt"].strip()):
        return "'prompt' must be a non-empty string"
    if has_messages:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                return "each message needs a string 'role' and a 'content'"
    return None


def run_generate(recipe: GenerateRecipe, run: str | None = None, force: bool = False) -> Stage:
    from alignloop.engine.engine import Engine

    run_name = run or recipe.run.name or default_run_name()
    stage = Stage(recipe.run.dir, run_name, "generate", recipe_to_dict(recipe),
                  inputs=[recipe.generate.prompts])
    if not force and stage.is_complete():
        say(f"[green]generate: up to date[/] ({stage.dir}), skipped")
        return stage
    stage.start()
    requests, quarantined = read_requests(recipe.generate.prompts)
    quarantine = stage.path("quarantine.jsonl")
    atomic_write_text(quarantine, "".join(json.dumps(q) + "\n" for q in quarantined))
    if quarantined:
        say(f"[yellow]{len(quarantined)} invalid line(s) quarantined[/] -> {quarantine}")

    # Keyed by the config, so a partial file from a different recipe is never resumed.
    partial = stage.path(f"completions.partial-{config_hash(stage.config)[:12]}.jsonl")
    done = _read_partial(partial)
    if done:
        say(f"resuming: {len(done)} of {len(requests)} requests already done")
    engine = Engine.from_name(recipe.model.name, seed=recipe.model.seed, dtype=recipe.model.dtype,
                              max_batch=recipe.generate.max_batch)
    todo = [i for i in range(len(requests)) if i not in done]
    with open(partial, "a", encoding="utf-8") as sink:
        for start in range(0, len(todo), recipe.generate.chunk):
            chunk = todo[start : start + recipe.generate.chunk]
            outs = engine.generate(
                [_encode(engine, requests[i]) for i in chunk],
                [recipe.sampling.params(i) for i in chunk],
            )
            for i, out in zip(chunk, outs):
                done[i] = _row(requests[i], i, out)
                sink.write(json.dumps(done[i]) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            stage.log_metrics(step=len(done), completed=len(done), total=len(requests),
                              tokens=sum(len(o.token_ids) for o in outs), **engine.stats)
    completions = stage.path("completions.jsonl")
    atomic_write_text(completions, "".join(json.dumps(done[i]) + "\n" for i in range(len(requests))))
    partial.unlink(missing_ok=True)
    stage.finish([completions, quarantine],
                 extra={"counts": {"lines": len(requests) + len(quarantined), "ok": len(requests),
                                   "quarantined": len(quarantined)}})
    say(f"[green]generate: {len(requests)} completions[/] -> {completions}")
    return stage


def _encode(engine, request: dict[str, Any]) -> list[int]:
    if "messages" in request:
        return engine.encode_chat(request["messages"])
    return engine.tokenizer(request["prompt"], add_special_tokens=False)["input_ids"]


def _row(request: dict[str, Any], index: int, out) -> dict[str, Any]:
    return {
        "index": index,
        "id": request.get("id"),
        "line": request["line"],
        "text": out.text,
        "finish_reason": out.finish_reason,
        "token_ids": out.token_ids,
        "logprobs": [round(x, 6) for x in out.logprobs],
    }


def _read_partial(path: Path) -> dict[int, dict[str, Any]]:
    """Completed rows from an interrupted run; a torn last line (killed mid-write) is dropped."""
    done: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[row["index"]] = row
    # Rewrite without the torn line, so new rows are not appended onto half a JSON object.
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in done.values()))
    return done
