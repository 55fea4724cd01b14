"""Offline evaluation: rule metrics on known texts, judge prompts and score parsing (property-tested)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alignloop.eval.judge import DIMENSIONS, judge_prompt, parse_score, rubric_eval
from alignloop.eval.rules import distinct_n, repetition_across, repetition_within, rule_metrics


def test_rule_metrics_on_known_texts():
    texts = ["Hello there! How are you? 😊", "*smiles* I love pizza and pasta.", "You are stupid."]
    m = rule_metrics(texts)
    assert m.n == 3
    assert m.question_rate == pytest.approx(1 / 3)
    assert m.emoji_rate == pytest.approx(1 / 3)
    assert m.gesture_rate == pytest.approx(1 / 3)
    assert m.unsafe_rate == pytest.approx(1 / 3)
    assert m.mean_words == pytest.approx((5 + 6 + 3) / 3)


def test_repetition_and_distinct():
    assert repetition_within("a b c a b c") == pytest.approx(1 / 4)   # grams abc bca cab abc
    assert repetition_within("one two three four") == 0.0
    assert repetition_across("we went to the sea", ["then we went to the park"]) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "a b"], 2) == 0.5
    assert distinct_n([""], 1) == 0.0
    with pytest.raises(ValueError):
        rule_metrics([])


@given(st.integers(1, 5), st.text(max_size=40).filter(lambda s: not any(c.isdigit() for c in s)))
def test_parse_score_reads_the_declared_score(score, noise):
    assert parse_score(f"{noise} Score: {score}") == score
    assert parse_score(f"**Score:** {score}\n{noise}") == score


@given(st.text(alphabet=st.characters(blacklist_categories=("Nd",)), max_size=60))
def test_parse_score_never_invents_a_score(text):
    assert parse_score(text) is None


def test_parse_score_ignores_other_numbers():
    assert parse_score("I would say 10 out of 10") is None
    assert parse_score("3.5") is None
    assert parse_score("4") == 4


def test_judge_prompt_names_the_dimension_and_shows_the_reply():
    conv = [{"role": "system", "content": "You are Mira."}, {"role": "user", "content": "hi"}]
    for name in DIMENSIONS:
        text = judge_prompt(name, conv, "hello!")[0]["content"]
        assert name.replace("_", " ") in text and "hello!" in text and "Mira" in text and "Score: N" in text


class _FakeEngine:
    """Answers each judge prompt with a score derived from the reply's length: parsing must keep order."""

    def chat(self, prompts, params):
        from types import SimpleNamespace

        replies = [p[0]["content"].split("Reply to grade:\n")[1].split("\n\nAnswer")[0] for p in prompts]
        return [SimpleNamespace(text=f"Score: {min(5, len(r.split()))}") for r in replies]


def test_rubric_eval_keeps_responses_and_dimensions_apart():
    conv = [{"role": "user", "content": "hi"}]
    result = rubric_eval(_FakeEngine(), [conv, conv], ["one", "one two three"], dimensions=["responsiveness"])
    assert result.scores["responsiveness"] == [1, 3]
    summary = result.summary()["responsiveness"]
    assert summary["n"] == 2 and summary["unparsed_rate"] == 0.0
    with pytest.raises(ValueError):
        rubric_eval(_FakeEngine(), [conv], ["x"], dimensions=["charisma"])
