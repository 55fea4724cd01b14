"""Tasks: small Python repositories with failing tests, generated reproducibly from a seed.

A task is a pure function of (difficulty, split, index): the same three give the same files,
byte for byte, on any machine, so "shipping" the task set is shipping this module (and
`alignloop env tasks --out DIR` writes any slice of it to disk). TASKS_PER_LEVEL tasks per
difficulty and split are addressable; `split` "train" and "heldout" draw from different seeds.

Each task is a repository of one or two modules built from a library of small functions (each
with its correct body, a few plausible bugs, and input generators), and tests/test_*.py with one
assertion per test function. Some functions get a bug; every bug is checked to break at least one
test of its function, so every task starts with failing tests and can be fixed fully.

    guided   trivial, and the task shows the exact tool call that fixes it: the loop-check set, small
             enough for a 135M policy (SmolLM2-135M-Instruct writes no tool call at all unguided)
    trivial  solution.py with `answer()` returning the wrong constant; one test
    easy     one module, one function, one bug, 3 tests
    medium   one module, three functions, one bug, 6 tests
    hard     two modules, five functions, two or three bugs, 10 tests

The grade (`Task.grade`) is the share of the task's own tests that pass when the grader's copies of
the test files are put back first: a policy that edits or deletes tests does not pass them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from alignloop.agentenv.limits import AgentEnvError

Difficulty = Literal["guided", "trivial", "easy", "medium", "hard"]
DIFFICULTIES: tuple[str, ...] = ("guided", "trivial", "easy", "medium", "hard")
TASKS_PER_LEVEL = 300
SPLITS = {"train": 0, "heldout": 1_000_003}


@dataclass
class Task:
    id: str
    difficulty: str
    files: dict[str, str]          # path -> content, the repository the episode starts from
    test_files: dict[str, str]     # the grader's copies of the test files
    tests: list[str]               # "test_module::test_name" of every test the grade counts
    failing: list[str]             # the tests that fail at the start, with why
    description: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Task:
        return cls(**data)

    def grade(self, report: dict) -> float:
        """The share of this task's tests that passed in a test report {"passed": [...], ...}."""
        passed = set(report.get("passed", ()))
        return sum(t in passed for t in self.tests) / max(len(self.tests), 1)


# --- the function library ------------------------------------------------------------------------


@dataclass
class Fn:
    name: str
    source: str                     # the correct definition
    bugs: list[str]                 # buggy definitions
    inputs: Callable[[random.Random], tuple]  # arguments of one test call
    tests_per_fn: int = 2
    extra: dict = field(default_factory=dict)


def _library(rng: random.Random) -> list[Fn]:
    """The function templates, their constants drawn from `rng`."""
    c = rng.randint(2, 9)
    ch = rng.choice("aeiost")
    other = rng.choice([x for x in "aeiost" if x != ch])

    def ints(r: random.Random) -> tuple:
        return (r.randint(-20, 40),)

    def lists(r: random.Random) -> tuple:
        return ([r.randint(-9, 30) for _ in range(r.randint(2, 6))],)

    def words(r: random.Random) -> tuple:
        pool = ["tea", "sea", "stone", "oak", "mist", "iris", "toast", "east", "sail", "site"]
        return (" ".join(r.choice(pool) for _ in range(r.randint(2, 5))),)

    return [
        Fn("add_offset", f"def add_offset(x):\n    return x + {c}\n",
           [f"def add_offset(x):\n    return x - {c}\n", f"def add_offset(x):\n    return x + {c + 1}\n"], ints),
        Fn("scale", f"def scale(x):\n    return x * {c}\n",
           [f"def scale(x):\n    return x * {c - 1}\n", f"def scale(x):\n    return x + {c}\n"],
           lambda r: (r.randint(1, 40),)),
        Fn("clamp", "def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    if x > hi:\n        return hi\n"
                    "    return x\n",
           [("def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    if x > hi:\n        return lo\n"
             "    return x\n"),
            ("def clamp(x, lo, hi):\n    if x > lo:\n        return lo\n    if x > hi:\n        return hi\n"
             "    return x\n")],
           lambda r: (r.randint(-30, 30), -10, 10), 3),
        Fn("count_letter", f"def count_letter(s):\n    return s.count({ch!r})\n",
           [f"def count_letter(s):\n    return s.count({other!r})\n",
            f"def count_letter(s):\n    return s.count({ch!r}) + 1\n"], words),
        Fn("total", "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n",
           ["def total(xs):\n    s = 0\n    for x in xs[1:]:\n        s += x\n    return s\n",
            "def total(xs):\n    s = 1\n    for x in xs:\n        s += x\n    return s\n"], lists),
        Fn("largest", "def largest(xs):\n    m = xs[0]\n    for x in xs:\n        if x > m:\n            m = x\n"
                      "    return m\n",
           [("def largest(xs):\n    m = xs[0]\n    for x in xs:\n        if x < m:\n            m = x\n"
             "    return m\n")], lists, 3),
        Fn("reverse_words", "def reverse_words(s):\n    return \" \".join(reversed(s.split()))\n",
           ["def reverse_words(s):\n    return \" \".join(s.split())\n",
            "def reverse_words(s):\n    return \"\".join(reversed(s.split()))\n"], words),
        Fn("is_even", "def is_even(n):\n    return n % 2 == 0\n",
           ["def is_even(n):\n    return n % 2 == 1\n"], lambda r: (r.randint(0, 99),), 4),
        Fn("squares", "def squares(n):\n    return [i * i for i in range(n)]\n",
           ["def squares(n):\n    return [i * i for i in range(1, n)]\n",
            "def squares(n):\n    return [i * 2 for i in range(n)]\n"], lambda r: (r.randint(3, 7),)),
        Fn("fizz", f"def fizz(n):\n    return \"Fizz\" if n % {c} == 0 else str(n)\n",
           [f"def fizz(n):\n    return \"Fizz\" if n % {c + 1} == 0 else str(n)\n",
            f"def fizz(n):\n    return \"Fizz\" if n % {c} == 1 else str(n)\n"],
           lambda r: (r.choice([c * r.randint(1, 9), r.randint(1, 60)]),), 4),
        Fn("average", "def average(xs):\n    return sum(xs) / len(xs)\n",
           ["def average(xs):\n    return sum(xs) / (len(xs) + 1)\n",
            "def average(xs):\n    return sum(xs) // len(xs)\n"],
           lambda r: ([r.randint(0, 30) for _ in range(r.choice([2, 4]))],)),
        Fn("word_count", "def word_count(s):\n    return len(s.split())\n",
           ["def word_count(s):\n    return len(s)\n", "def word_count(s):\n    return len(s.split()) - 1\n"], words),
        Fn("capitalize", "def capitalize(s):\n    return s[:1].upper() + s[1:]\n",
           ["def capitalize(s):\n    return s[:1].lower() + s[1:]\n",
            "def capitalize(s):\n    return s.upper()\n"], words),
        Fn("last", "def last(xs):\n    return xs[-1]\n", ["def last(xs):\n    return xs[0]\n"], lists, 3),
    ]


def _call(source: str, name: str, args: tuple) -> object:
    """What `name(*args)` returns under `source` (our own generated code), or the exception."""
    scope: dict = {}
    exec(compile(source, "<task>", "exec"), scope)  # noqa: S102 our own templates, never model output
    try:
        return scope[name](*args)
    except Exception as e:  # noqa: BLE001 a bug that raises is a failing test like any other
        return e


def _tests_for(fn: Fn, rng: random.Random, module: str, bug: str | None) -> tuple[list[tuple[str, str]], list[str]]:
    """(test name, test source) pairs for `fn` and which of them fail under `bug`. Inputs are
    redrawn until the bug (if any) breaks at least one test."""
    for _ in range(100):
        cases = [fn.inputs(rng) for _ in range(fn.tests_per_fn)]
        if len({repr(c) for c in cases}) < len(cases):
            continue
        expected = [_call(fn.source, fn.name, args) for args in cases]
        if any(isinstance(e, Exception) for e in expected):
            continue
        fails = ([i for i, args in enumerate(cases) if _call(bug, fn.name, args) != expected[i]]
                 if bug is not None else [])
        if bug is not None and not fails:
            continue
        tests, failing = [], []
        for i, (args, want) in enumerate(zip(cases, expected)):
            call = f"{fn.name}({', '.join(repr(a) for a in args)})"
            name = f"test_{fn.name}_{i + 1}"
            tests.append((name, f"def {name}():\n    assert {call} == {want!r}, {call + ' should be ' + repr(want)!r}\n"))
            if i in fails:
                failing.append(f"test_{module}::{name}: {call} returned {_call(bug, fn.name, args)!r}, "
                               f"expected {want!r}")
        return tests, failing
    raise AssertionError(f"no failing inputs for a bug of {fn.name}")  # a library bug, not the user's


def _module(rng: random.Random, module: str, fns: list[Fn], buggy: set[int]) -> tuple[dict[str, str], list[str], list[str]]:
    """Files of one module and its test file; (files, test ids, failing descriptions)."""
    source, tests, ids, failing = [], [], [], []
    for i, fn in enumerate(fns):
        bug = rng.choice(fn.bugs) if i in buggy else None
        source.append(bug or fn.source)
        pairs, fails = _tests_for(fn, rng, module, bug)
        tests.extend(src for _, src in pairs)
        ids.extend(f"test_{module}::{name}" for name, _ in pairs)
        failing.extend(fails)
    imports = f"from {module} import {', '.join(fn.name for fn in fns)}\n\n\n"
    files = {f"{module}.py": "\n\n".join(source), f"tests/test_{module}.py": imports + "\n\n".join(tests)}
    return files, ids, failing


MODULES = ("mathutils", "textutils", "listutils", "helpers", "core")


def make_task(difficulty: str, index: int, split: str = "train", seed: int = 0) -> Task:
    """Task `index` of `difficulty` in `split`: a pure function of the four."""
    if difficulty not in DIFFICULTIES:
        raise AgentEnvError(f"unknown task difficulty {difficulty!r}: expected one of {', '.join(DIFFICULTIES)}")
    if split not in SPLITS:
        raise AgentEnvError(f"unknown task split {split!r}: expected 'train' or 'heldout'")
    rng = random.Random(f"agentenv:{difficulty}:{seed + SPLITS[split]}:{index}")
    task_id = f"{difficulty}-{split}-{seed}-{index}"
    if difficulty in ("guided", "trivial"):
        want, have = rng.randint(0, 99), rng.randint(100, 199)
        files = {"solution.py": f"def answer():\n    return {have}\n",
                 "tests/test_solution.py": f"from solution import answer\n\n\ndef test_answer():\n"
                                           f"    assert answer() == {want}, 'answer() should be {want}'\n"}
        failing = [f"test_solution::test_answer: answer() returned {have}, expected {want}"]
        tests = ["test_solution::test_answer"]
    else:
        library = _library(rng)
        counts = {"easy": (1, 1, 1), "medium": (1, 3, 1), "hard": (2, 5, rng.choice([2, 3]))}[difficulty]
        n_modules, n_fns, n_bugs = counts
        chosen = rng.sample(library, n_fns)
        buggy = set(rng.sample(range(n_fns), n_bugs))
        names = rng.sample(MODULES, n_modules)
        files, tests, failing = {}, [], []
        split_at = (n_fns + 1) // 2 if n_modules == 2 else n_fns
        for m, (lo, hi) in zip(names, [(0, split_at), (split_at, n_fns)][:n_modules]):
            f, t, fl = _module(rng, m, chosen[lo:hi], {i - lo for i in buggy if lo <= i < hi})
            files.update(f)
            tests.extend(t)
            failing.extend(fl)
    test_files = {k: v for k, v in files.items() if k.startswith("tests/")}
    sources = [k for k in files if not k.startswith("tests/")]
    description = ("Some tests of this repository fail. Fix the code (not the tests) so that every test passes.\n"
                   f"Files: {', '.join(sorted(files))}\nFailing tests:\n" + "\n".join(failing))
    if difficulty in ("guided", "trivial", "easy"):  # one small file: shown, so a policy can act at once
        description += "".join(f"\n\n{k}:\n```python\n{files[k]}```" for k in sources)
    if difficulty == "guided":
        fix = json.dumps({"name": "write_file", "arguments": {"path": "solution.py",
                                                               "content": f"def answer():\n    return {want}\n"}})
        description += f"\n\nTo fix it, reply with this tool call:\n<tool_call>\n{fix}\n</tool_call>"
    return Task(task_id, difficulty, files, test_files, tests, failing, description)


def task_set(difficulty: str, n: int, split: str = "train", seed: int = 0, start: int = 0) -> list[Task]:
    if n + start > TASKS_PER_LEVEL:
        raise AgentEnvError(f"{n + start} tasks asked of {difficulty}: there are {TASKS_PER_LEVEL} per level")
    return [make_task(difficulty, i, split, seed) for i in range(start, start + n)]


def sample_tasks(difficulty: str, n: int, seed: int, split: str = "train", pool: int = TASKS_PER_LEVEL,
                 task_seed: int = 0) -> list[Task]:
    """n tasks drawn (with replacement) from the first `pool` of the split, deterministically from `seed`."""
    if not 1 <= pool <= TASKS_PER_LEVEL:
        raise AgentEnvError(f"task pool {pool}: must be 1..{TASKS_PER_LEVEL}")
    rng = random.Random(seed)
    return [make_task(difficulty, rng.randrange(pool), split, task_seed) for _ in range(n)]


def tiny_suite() -> list[Task]:
    """Four tasks (trivial, easy, medium, hard), for tests."""
    return [make_task(d, 0, "train", 0) for d in DIFFICULTIES[1:]]


def write_tasks(tasks: list[Task], folder: Path) -> Path:
    """Each task as a folder (its repository) plus tasks.jsonl (every task's full record)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "tasks.jsonl", "w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps(task.to_json()) + "\n")
            for name, content in task.files.items():
                path = folder / task.id / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content, encoding="utf-8")
    return folder / "tasks.jsonl"
