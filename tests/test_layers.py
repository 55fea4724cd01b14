"""Data flows one way through the packages: a package never imports one that comes after it in the loop.

Every `import alignloop.X` and `from alignloop.X import ...` in src/ is parsed (function-local ones
too), so a shortcut such as the data pipeline reaching into the simulator, or the chat layer loading
zoo models, fails here instead of living on as a comment that says it shouldn't.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "alignloop"

# Shared plumbing every package may use; it imports no package itself.
BASE = ("__init__", "errors", "ui", "runs", "recipes", "sections", "assets", "freed_memory")
# The loop's order. A new package gets its place here (the test fails until it has one).
LAYERS = ("chat", "models", "fp8", "kernels", "engine", "data", "sim", "train", "rewards", "agentenv", "rl", "eval", "serve",
          "flywheel", "bench", "cli")


def rank(top: str) -> int:
    if top in BASE:
        return -1
    if top not in LAYERS:
        raise AssertionError(f"alignloop.{top} has no place in the layer order: add it to LAYERS in {__file__}")
    return LAYERS.index(top)


def owner(path: Path) -> str:
    """The top-level package (or base module) a source file belongs to."""
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def alignloop_imports(source: str) -> list[tuple[int, str]]:
    """(line, imported top-level name) for every absolute import of an alignloop module in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "alignloop"
                                     else [])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "alignloop" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def upward_edges(files: dict[str, str]) -> list[str]:
    """'file:line: a -> b' for every import of a later layer; `files` maps paths under SRC to sources."""
    bad = []
    for rel, source in sorted(files.items()):
        here = owner(SRC / rel)
        for line, there in alignloop_imports(source):
            if there == "__version__" or there == here:
                continue
            if rank(there) > rank(here) or (here in BASE and there not in BASE):
                bad.append(f"{rel}:{line}: {here} -> {there}")
    return bad


def tree() -> dict[str, str]:
    return {p.relative_to(SRC).as_posix(): p.read_text(encoding="utf-8") for p in SRC.rglob("*.py")}


def test_no_package_imports_a_later_one():
    bad = upward_edges(tree())
    assert not bad, "imports against the loop's order:\n" + "\n".join(bad)


@pytest.mark.parametrize("rel, source, edge", [
    ("data/stage.py", "from alignloop.sim.truth import TRUTH_SCHEMAS\n", "data -> sim"),
    ("chat/lint.py", "def f():\n    from alignloop.models import load_model\n", "chat -> models"),
    ("rl/run.py", "import alignloop.eval.rl_hook\n", "rl -> eval"),
    ("train/sft.py", "from alignloop import cli\n", "train -> cli"),
    ("sections.py", "from alignloop.engine.api import SamplingParams\n", "sections -> engine"),
])
def test_an_upward_import_is_caught(rel, source, edge):
    assert [e.split(": ", 1)[1] for e in upward_edges({rel: source})] == [edge]


def test_a_downward_import_passes():
    assert upward_edges({"flywheel/stages.py": "from alignloop.rl.stage import run_rl\nimport alignloop.runs\n"}) == []


def test_a_package_without_a_place_fails():
    with pytest.raises(AssertionError, match="no place in the layer order"):
        upward_edges({"newthing/x.py": "import alignloop.chat\n"})


def test_only_the_cli_imports_typer():
    users = sorted(rel for rel, source in tree().items()
                   if not rel.startswith("cli/") and any(
                       (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "typer" for a in n.names))
                       or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "typer")
                       for n in ast.walk(ast.parse(source))))
    assert users == []
