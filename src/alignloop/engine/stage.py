"""The engine's two run stages: `alignloop generate` (a file of prompts) and `alignloop chat` (one).

generate. Input: JSONL, one request per line, either {"prompt": "..."} (raw text) or
{"messages": [...]} (chat, rendered with the model's template). Optional "id" is carried through.
Output in runs/<run>/generate/: completions.jsonl (one line per valid request, input order),
quarantine.jsonl (invalid lines with the reason: not JSON, a malformed request, messages the chat
template cannot render, or a prompt with no room left in the model's context), metrics.jsonl,
manifest.json.
Completions are appended chunk by chunk to a partial file, so a killed job resumes where it
stopped; per-request seeds make the resumed result the same as an uninterrupted one.

chat. One user message in, the model's answer out; runs/<run>/chat/transcript.json records both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jinja2

from alignloop.engine.api import SamplingParams
from alignloop.engine.config import GenerateRecipe
from alignloop.engine.engine import Engine
from alignloop.errors import AlignloopError
from alignloop.recipes import recipe_to_dict
from alignloop.runs import Stage, atomic_write_json, atomic_write_text, config_hash, default_run_name
from alignloop.ui import say


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
    """Answer every valid request of `recipe.generate.prompts`; see the module docstring for the files."""
    run_name = run or recipe.run.name or default_run_name()
    stage = Stage(recipe.run.dir, run_name, "generate", recipe_to_dict(recipe),
                  inputs=[recipe.generate.prompts])
    if stage.skip_if_complete(force):
        return stage
    engine = Engine.from_name(recipe.model.name, seed=recipe.model.seed, dtype=recipe.model.dtype,
                              max_batch=recipe.generate.max_batch)
    requests, quarantined = read_requests(recipe.generate.prompts)
    requests, unfit = _split_unfit(engine, requests)
    quarantined = sorted(quarantined + unfit, key=lambda q: q["line"])
    quarantine = stage.path("quarantine.jsonl")
    atomic_write_text(quarantine, "".join(json.dumps(q) + "\n" for q in quarantined))
    if quarantined:
        say(f"[yellow]{len(quarantined)} invalid line(s) quarantined[/] -> {quarantine}")

    # Keyed by the config, so a partial file from a different recipe is never resumed.
    partial = stage.path(f"completions.partial-{config_hash(stage.config)[:12]}.jsonl")
    done = _read_partial(partial)
    if done:
        say(f"resuming: {len(done)} of {len(requests)} requests already done")
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


def _split_unfit(engine: Engine, requests: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(requests the model can answer, quarantine entries for those it cannot: messages its chat
    template cannot render, or a prompt too long for its context).

    Checked for the whole file before the first chunk, so one bad line never stops the job midway
    (and every rerun at the same line); the token ids are not kept, each chunk encodes its own again.
    """
    fit, unfit = [], []
    for request in requests:
        try:
            problem = engine.prompt_problem(_encode(engine, request))
        except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:  # as SFT's tokenize catches
            problem = f"cannot render with the chat template: {e}"
        if problem is None:
            fit.append(request)
        else:
            raw = json.dumps({k: v for k, v in request.items() if k != "line"}, ensure_ascii=False)
            unfit.append({"line": request["line"], "reason": problem, "raw": raw})
    return fit, unfit


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


def run_chat(prompt: str, model: str = "smollm2-135m", system: str | None = None, max_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, run: str | None = None,
             runs_dir: Path = Path("runs")) -> str:
    """Answer one message (after an optional system message); the transcript goes to the chat stage."""
    if not prompt.strip():
        raise AlignloopError("chat: the prompt is empty; say something")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    config = {"model": model, "messages": messages, "sampling": params.__dict__ | {"stop": list(params.stop)}}
    engine = Engine.from_name(model, max_batch=1, show_progress=False)
    ids = engine.encode_chat(messages)
    if (problem := engine.prompt_problem(ids)) is not None:
        raise AlignloopError(f"chat: {problem}; shorten the prompt (or the system prompt)")
    stage = Stage(runs_dir, run or default_run_name(), "chat", config).start()
    out = engine.generate([ids], params)[0]
    transcript = stage.path("transcript.json")
    atomic_write_json(transcript, {
        "messages": messages + [{"role": "assistant", "content": out.text}],
        "finish_reason": out.finish_reason,
        "completion_tokens": len(out.token_ids),
        "prompt_tokens": len(out.prompt_token_ids),
    })
    stage.finish([transcript])
    return out.text
