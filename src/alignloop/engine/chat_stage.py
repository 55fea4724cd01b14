"""`alignloop chat`: one user message in, the model's answer out, recorded as a run stage."""

from __future__ import annotations

from pathlib import Path

from alignloop.engine.api import SamplingParams
from alignloop.runs import Stage, atomic_write_json, default_run_name


def run_chat(prompt: str, model: str = "smollm2-135m", system: str | None = None, max_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, run: str | None = None,
             runs_dir: Path = Path("runs")) -> str:
    from alignloop.engine.engine import Engine

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    config = {"model": model, "messages": messages, "sampling": params.__dict__ | {"stop": list(params.stop)}}
    stage = Stage(runs_dir, run or default_run_name(), "chat", config).start()
    engine = Engine.from_name(model, max_batch=1, show_progress=False)
    out = engine.chat([messages], params)[0]
    transcript = stage.path("transcript.json")
    atomic_write_json(transcript, {
        "messages": messages + [{"role": "assistant", "content": out.text}],
        "finish_reason": out.finish_reason,
        "completion_tokens": len(out.token_ids),
        "prompt_tokens": len(out.prompt_token_ids),
    })
    stage.finish([transcript])
    return out.text
