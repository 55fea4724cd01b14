"""The verifiable task's grading and its before/after comparison."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.rl.arithmetic import ArithmeticEnv, accuracy_change, last_number, make_problem, score

FILLER = st.text(alphabet=st.characters(blacklist_categories=("Nd",), blacklist_characters="-.,"), max_size=40)


@settings(max_examples=200, deadline=None)
@given(FILLER, st.integers(-10_000, 10_000), FILLER)
def test_last_number_is_the_last_integer_whatever_surrounds_it(head, n, tail):
    assert last_number(f"{head} 12 {head} {n}{tail}") == n


def test_grading_modes():
    text = "17 + 7 = 24"
    assert score(text, 24, answer_from="tag") == (0.0, False, False)       # no tag: no answer reward
    assert score(text, 24, answer_from="last_number") == (1.0, True, False)
    assert score("24, or maybe 25", 24, answer_from="last_number")[1] is False
    assert score("So 3 * 4 = 12. Answer: 12", 12, answer_from="last_number") == pytest.approx((1.1, True, True))
    assert score("Answer: 1,200", 1200, answer_from="last_number")[1] is True
    assert score("It is 24.5", 24, answer_from="last_number")[1] is False
    assert last_number("no digits here") is None
    env = ArithmeticEnv(max_operand=9, answer_from="last_number")
    tasks = env.sample_tasks(3, seed=0)
    env.reset(tasks)
    step = env.step([f"= {p.answer}" for p in tasks])
    assert list(step.rewards) == [1.0, 1.0, 1.0] and all(i["correct"] == 1.0 for i in step.info)


def test_problems_are_fixed_by_the_seed():
    a = [make_problem(random.Random(5)) for _ in range(3)]
    assert a == [make_problem(random.Random(5)) for _ in range(3)]
    assert ArithmeticEnv().sample_tasks(4, 1) == ArithmeticEnv().sample_tasks(4, 1)


def test_accuracy_change_is_paired_with_mcnemar():
    before = [0.0] * 60 + [1.0] * 40
    after = [1.0] * 30 + [0.0] * 30 + [1.0] * 38 + [0.0] * 2     # 30 gained, 2 lost
    c = accuracy_change(before, after)
    assert (c.before, c.after, c.gained, c.lost, c.n) == (0.4, 0.68, 30, 2, 100)
    assert c.diff == pytest.approx(0.28) and c.lo < 0.28 < c.hi and c.p_value < 1e-6
    assert "McNemar p" in c.line()
    same = accuracy_change(before, before)
    assert same.p_value == 1.0 and same.diff == 0.0
    with pytest.raises(ValueError):
        accuracy_change([1.0], [1.0, 0.0])
