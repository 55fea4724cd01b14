"""`alignloop bench template`: chat-template rendering, ours vs transformers `apply_chat_template`.

Work: every renderable case of the conformance corpus (shared/conformance/chat_templates/corpus/
transformers_goldens.jsonl: 33 real templates x the conversation shapes that render without an
error), repeated until each side has run for about `seconds` (in alternating rounds, so that noise from
other work on the machine falls on both sides alike). Ours is `alignloop.chat.render.render`;
the peer is `tokenizer.apply_chat_template(..., tokenize=False, chat_template=...)` on one real
tokenizer (the tiny zoo preset's), with each case's bos/eos passed as keyword arguments. Both sides
see each case's frozen clock, so their outputs can be compared: `identical` says every output of
ours equals the peer's (and the corpus's expected text). Metric: renders per second.
"""

from __future__ import annotations

import gc
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from transformers.utils import chat_template_utils

from alignloop.chat.render import render
from alignloop.models import load_tokenizer

CORPUS_SUBDIR = Path("conformance") / "chat_templates"


def default_corpus_dir() -> Path:
    # src/alignloop/bench/template.py -> the repository root's sibling shared/ folder
    return Path(__file__).resolve().parents[3].parent / "shared" / CORPUS_SUBDIR


def load_cases(corpus_dir: Path | None = None) -> list[dict]:
    """The renderable cases (those with an `expected` text), each with its template source loaded."""
    root = Path(corpus_dir) if corpus_dir is not None else default_corpus_dir()
    goldens = root / "corpus" / "transformers_goldens.jsonl"
    if not goldens.exists():
        raise FileNotFoundError(f"chat-template conformance corpus not found at {goldens}")
    sources: dict[str, str] = {}
    cases = []
    for line in goldens.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        case = json.loads(line)
        if "expected" not in case:
            continue
        if case["template"] not in sources:
            sources[case["template"]] = (root / case["template"]).read_text(encoding="utf-8")
        case["source"] = sources[case["template"]]
        case["now"] = datetime.fromisoformat(case["frozen_now"])
        cases.append(case)
    return cases


def _frozen_clock_for_transformers():
    """A stand-in for the `datetime` class transformers' strftime_now reads, frozen at `instant`."""

    class FrozenDatetime(datetime):
        instant = datetime(2000, 1, 1)

        @classmethod
        def now(cls, tz=None):  # noqa: ARG003 - same signature as datetime.now
            return cls.instant

    return FrozenDatetime


def _ours(case: dict) -> str:
    return render(case["source"], case["messages"], bos_token=case["bos_token"], eos_token=case["eos_token"],
                  tools=case["tools"], add_generation_prompt=case["add_generation_prompt"],
                  continue_final_message=case["continue_final_message"], now=case["now"], **case["extra_kwargs"])


def _peer(tokenizer: Any, clock: Any, case: dict) -> str:
    clock.instant = case["now"]
    return tokenizer.apply_chat_template(
        case["messages"], tools=case["tools"], chat_template=case["source"],
        add_generation_prompt=case["add_generation_prompt"], continue_final_message=case["continue_final_message"],
        tokenize=False, bos_token=case["bos_token"], eos_token=case["eos_token"], **case["extra_kwargs"])


def _pass_time(one_pass) -> float:
    one_pass()  # warm-up: compile caches
    start = time.perf_counter()
    one_pass()
    return max(time.perf_counter() - start, 1e-6)


def _rates(ours_pass, peer_pass, n_cases: int, seconds: float, rounds: int = 8) -> tuple[float, float]:
    """Renders per second of each side over about `seconds` each, in alternating rounds so that
    noise from other work on the machine falls on both sides alike."""
    ours_k = max(1, round(seconds / rounds / _pass_time(ours_pass)))
    peer_k = max(1, round(seconds / rounds / _pass_time(peer_pass)))
    ours_s = peer_s = 0.0
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        for _ in range(ours_k):
            ours_pass()
        ours_s += time.perf_counter() - start
        gc.collect()
        start = time.perf_counter()
        for _ in range(peer_k):
            peer_pass()
        peer_s += time.perf_counter() - start
    return rounds * ours_k * n_cases / ours_s, rounds * peer_k * n_cases / peer_s


def run_bench(seconds: float = 4.0, corpus_dir: Path | None = None) -> dict:
    """Time ours vs transformers on the corpus; ~`seconds` of rendering on each side."""
    cases = load_cases(corpus_dir)
    tokenizer = load_tokenizer("tiny")
    clock = _frozen_clock_for_transformers()
    saved = chat_template_utils.datetime
    chat_template_utils.datetime = clock  # strftime_now in transformers reads this name
    try:
        identical = True
        for case in cases:
            ours, peer = _ours(case), _peer(tokenizer, clock, case)
            if ours != peer or ours != case["expected"]:
                identical = False

        def ours_pass() -> None:
            for case in cases:
                _ours(case)

        def peer_pass() -> None:
            for case in cases:
                _peer(tokenizer, clock, case)

        ours_rate, peer_rate = _rates(ours_pass, peer_pass, len(cases), seconds)
    finally:
        chat_template_utils.datetime = saved
    return {"bench": "template", "ours": round(ours_rate, 1), "peer": round(peer_rate, 1), "unit": "renders/s",
            "ratio": round(ours_rate / peer_rate, 2), "cases": len(cases), "identical": identical}
