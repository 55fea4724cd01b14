"""`alignloop bench template`: chat-template rendering, ours vs transformers `apply_chat_template`.

Work: every renderable case of the conformance corpus (shared/conformance/chat_templates/corpus/
transformers_goldens.jsonl: 33 real templates x the conversation shapes that render without an
error, 316 cases), rendered to text, `passes` times per round on each side. `passes` is the same for
both sides, chosen once so that a round of the peer takes about `round_seconds`.

Metric: renders per second, the median of >= 3 rounds (min and max beside it). Every side renders
the corpus once untimed first (template compilation, caches); then the rounds alternate the
sides, who goes first flipping each round; garbage is collected before each timed round.

Ours: `alignloop.chat.render.render(source, messages, bos_token=, eos_token=, tools=,
add_generation_prompt=, continue_final_message=, now=, **extra)`.
Peer: `tokenizer.apply_chat_template(messages, tools=, chat_template=source, add_generation_prompt=,
continue_final_message=, tokenize=False, bos_token=, eos_token=, **extra)`, the call transformers'
docs give for rendering a conversation with a given template, on one real tokenizer (the tiny zoo
preset's); transformers compiles each template once and caches it, as ours does.

Both: the same cases in the same order, each case's bos/eos tokens and extra keywords, the same
frozen clock (ours through `now=`, the peer through the `datetime` that transformers'
`strftime_now` reads), one thread (rendering is Python; `--threads` fixes torch's count, unused
here). Before timing, every output is checked: `identical` is "k/n", the cases where ours equals
the peer's output and the corpus's expected text, with `mismatches` naming any that do not.
Nothing else differs.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import transformers
from transformers.utils import chat_template_utils

from alignloop.bench.harness import MIN_ROUNDS, alternate_rounds, fixed_threads, headline, machine_facts, summary
from alignloop.chat.render import render
from alignloop.errors import AlignloopError
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


def compare_outputs(cases: list[dict], ours: Callable[[dict], str], peer: Callable[[dict], str]) -> dict[str, Any]:
    """Every case rendered by both sides: how many agree with each other and with the corpus."""
    mismatches = []
    for case in cases:
        a, b = ours(case), peer(case)
        if not (a == b == case["expected"]):
            mismatches.append({"id": case["id"], "ours_is_expected": a == case["expected"],
                               "peer_is_expected": b == case["expected"]})
    return {"identical": f"{len(cases) - len(mismatches)}/{len(cases)}", "mismatches": mismatches}


def _timed_passes(render_one: Callable[[dict], str], cases: list[dict], passes: int) -> Callable[[], dict[str, Any]]:
    def one_round() -> dict[str, Any]:
        gc.collect()  # garbage of the other side's round is not collected on this side's clock
        began = time.perf_counter()
        for _ in range(passes):
            for case in cases:
                render_one(case)
        return {"useful": passes * len(cases), "seconds": time.perf_counter() - began}
    return one_round


def run_bench(rounds: int = MIN_ROUNDS, threads: int | None = None, round_seconds: float = 1.0,
              corpus_dir: Path | None = None) -> dict[str, Any]:
    """Ours vs transformers on the corpus: `rounds` alternating rounds of about `round_seconds` each."""
    if rounds < MIN_ROUNDS:
        raise AlignloopError(f"bench template: at least {MIN_ROUNDS} rounds, got {rounds}")
    cases = load_cases(corpus_dir)
    tokenizer = load_tokenizer("tiny")
    clock = _frozen_clock_for_transformers()
    saved = chat_template_utils.datetime
    chat_template_utils.datetime = clock  # strftime_now in transformers reads this name
    try:
        with fixed_threads(threads) as n_threads:
            return _run_bench(cases, lambda case: _peer(tokenizer, clock, case), rounds, n_threads, round_seconds)
    finally:
        chat_template_utils.datetime = saved


def _run_bench(cases: list[dict], peer: Callable[[dict], str], rounds: int, threads: int,
               round_seconds: float) -> dict[str, Any]:
    checked = compare_outputs(cases, _ours, peer)  # also the first (compiling) pass of both sides
    began = time.perf_counter()
    for case in cases:
        peer(case)
    passes = max(1, round(round_seconds / max(time.perf_counter() - began, 1e-6)))
    configs = {"ours": _timed_passes(_ours, cases, passes), "peer": _timed_passes(peer, cases, passes)}
    results = alternate_rounds(configs, rounds=rounds, label="bench template")
    ours, theirs = summary(results["ours"]), summary(results["peer"])
    return headline(
        "template", ours, theirs, "renders/s",
        ours_config="alignloop.chat.render.render(source, messages, bos/eos tokens, tools, flags, now=frozen, **extra)",
        peer_config=(f"transformers {transformers.__version__} tokenizer.apply_chat_template(messages, "
                     "chat_template=source, tokenize=False, bos/eos tokens, tools, flags, **extra), clock frozen"),
        machine=machine_facts(threads, peers=("transformers", "jinja2")),
        cases=len(cases), passes_per_round=passes, renders_per_round=passes * len(cases),
        characters_per_pass=sum(len(case["expected"]) for case in cases), **checked)
