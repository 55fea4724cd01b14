"""Property tests for the request parser of `alignloop generate`: nothing is lost, counts add up."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.engine.stage import read_requests

message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                 "content": st.text(max_size=20)})
valid = st.one_of(
    st.builds(lambda p: {"prompt": p}, st.text(min_size=1, max_size=30).filter(str.strip)),
    st.builds(lambda m: {"messages": m}, st.lists(message, min_size=1, max_size=3)),
)
junk = st.one_of(
    st.text(max_size=30).filter(lambda s: s.strip() and "\n" not in s and "\r" not in s),
    st.builds(json.dumps, st.one_of(st.integers(), st.lists(st.integers()), st.just({}),
                                    st.just({"prompt": ""}), st.just({"messages": []}),
                                    st.just({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}))),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(valid.map(json.dumps), junk, st.just("")), max_size=25))
def test_every_nonblank_line_is_either_a_request_or_quarantined(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("req") / "r.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    good, bad = read_requests(path)
    nonblank = [i + 1 for i, line in enumerate(lines) if line.strip()]
    assert sorted([g["line"] for g in good] + [b["line"] for b in bad]) == nonblank
    assert all(b["reason"] for b in bad)
    for g in good:
        assert ("prompt" in g) != ("messages" in g)
        assert json.loads(lines[g["line"] - 1]) == {k: v for k, v in g.items() if k != "line"}
