"""Generated tasks: reproducible, failing at the start, fixable, graded on the grader's own tests.
(No sandbox needed: the runner is checked on the host against our own generated code.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignloop.agentenv import agent_main
from alignloop.agentenv.limits import AgentEnvError
from alignloop.agentenv.tasks import (
    DIFFICULTIES,
    TASKS_PER_LEVEL,
    make_task,
    sample_tasks,
    task_set,
    tiny_suite,
)


def run_tests(files: dict[str, str], root: Path) -> dict:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    out = subprocess.run([sys.executable, "-I", agent_main.__file__, "--tests", str(root)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_tasks_are_a_pure_function_of_their_address():
    assert make_task("hard", 7).to_json() == make_task("hard", 7).to_json()
    assert make_task("hard", 7).files != make_task("hard", 8).files
    assert make_task("easy", 3, "train").files != make_task("easy", 3, "heldout").files
    assert [t.id for t in sample_tasks("easy", 5, seed=1)] == [t.id for t in sample_tasks("easy", 5, seed=1)]
    assert len({t.id for t in task_set("medium", TASKS_PER_LEVEL)}) == TASKS_PER_LEVEL


def test_levels_grow_in_size():
    sizes = {d: len(make_task(d, 0).tests) for d in DIFFICULTIES}
    assert sizes["guided"] == sizes["trivial"] == 1 and sizes["trivial"] < sizes["easy"] < sizes["medium"] < sizes["hard"]
    assert sum(len(t.files) for t in task_set("hard", 3)) >= 12  # two modules and two test files each


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_every_task_fails_as_described_and_the_grade_counts_its_own_tests(difficulty, tmp_path):
    for i, task in enumerate(task_set(difficulty, 4, "heldout", seed=3)):
        report = run_tests(task.files, tmp_path / str(i))
        assert sorted(report["failed"]) == sorted(f.split(":")[0] + "::" + f.split("::")[1].split(":")[0]
                                                  for f in task.failing)
        assert 0 <= task.grade(report) < 1
        assert set(report["passed"]) | set(report["failed"]) == set(task.tests)


def test_trivial_task_fixed_scores_one_and_tests_cannot_be_edited_to_pass(tmp_path):
    task = tiny_suite()[0]
    want = task.failing[0].split("expected ")[1]
    fixed = {**task.files, "solution.py": f"def answer():\n    return {want}\n"}
    assert task.grade(run_tests(fixed, tmp_path / "fixed")) == 1.0
    cheat = {**task.files, "tests/test_solution.py": "def test_answer():\n    pass\n"}
    assert task.grade(run_tests({**cheat, **task.test_files}, tmp_path / "cheat")) == 0.0


def test_bad_addresses_are_clear_errors():
    with pytest.raises(AgentEnvError, match="unknown task difficulty"):
        make_task("impossible", 0)
    with pytest.raises(AgentEnvError, match="per level"):
        task_set("easy", TASKS_PER_LEVEL + 1)
