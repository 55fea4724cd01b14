"""`alignloop bench template`: both sides render every corpus case equally often, every output is
checked against the other side and the corpus, and the JSON line carries the harness's fields."""

from __future__ import annotations

from collections import Counter

import pytest
from transformers.utils import chat_template_utils

from alignloop.bench import template
from alignloop.errors import AlignloopError

pytestmark = pytest.mark.skipif(not (template.default_corpus_dir() / "corpus" / "transformers_goldens.jsonl").is_file(),
                                reason="chat-template conformance corpus not present")


def test_both_sides_render_every_case_equally_often_and_the_line_has_the_harness_fields(monkeypatch):
    calls: dict[str, Counter] = {"ours": Counter(), "peer": Counter()}
    ours, peer = template._ours, template._peer

    def ours_spy(case):
        calls["ours"][case["id"]] += 1
        return ours(case)

    def peer_spy(tokenizer, clock, case):
        calls["peer"][case["id"]] += 1
        return peer(tokenizer, clock, case)

    monkeypatch.setattr(template, "_ours", ours_spy)
    monkeypatch.setattr(template, "_peer", peer_spy)
    clock = chat_template_utils.datetime
    line = template.run_bench(threads=1, round_seconds=0.001)
    assert chat_template_utils.datetime is clock  # transformers' clock is put back
    n = line["cases"]
    assert n == len(template.load_cases()) > 300
    assert set(calls["ours"]) == set(calls["peer"]) and len(calls["ours"]) == n
    passes = line["passes_per_round"]
    # check + warm-up + 3 rounds each; the peer also renders once more to size the rounds
    assert set(calls["ours"].values()) == {2 + 3 * passes}
    assert set(calls["peer"].values()) == {3 + 3 * passes}
    assert line["identical"] == f"{n}/{n}" and line["mismatches"] == []
    assert line["bench"] == "template" and line["unit"] == "renders/s" and line["rounds"] == 3
    assert line["ours"] > 0 and line["peer"] > 0 and abs(line["ratio"] - line["ours"] / line["peer"]) < 0.01
    assert line["peer_min_max"][0] <= line["peer"] <= line["peer_min_max"][1]
    assert line["renders_per_round"] == passes * n and line["characters_per_pass"] > 0
    machine = line["machine"]
    assert machine["threads"] == 1 and machine["versions"]["transformers"] and machine["versions"]["jinja2"]


def test_a_case_where_the_sides_differ_is_counted_and_named():
    cases = [{"id": "a", "expected": "x"}, {"id": "b", "expected": "y"}, {"id": "c", "expected": "z"}]
    out = template.compare_outputs(cases, ours=lambda c: c["expected"],
                                   peer=lambda c: "other" if c["id"] == "b" else c["expected"])
    assert out == {"identical": "2/3", "mismatches": [{"id": "b", "ours_is_expected": True,
                                                       "peer_is_expected": False}]}


def test_fewer_than_three_rounds_is_one_line():
    with pytest.raises(AlignloopError, match="at least 3 rounds"):
        template.run_bench(rounds=2)
