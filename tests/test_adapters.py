"""Chat-export adapters (OpenAI, ShareGPT, tables): fixtures written from each format's documentation
are ingested and read back from the log tables (conversations, turns, swipes, votes, users); bad
records land in quarantine with their reason; format detection; the `logs ingest` command."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignloop.data.adapters.detect import convert, detect, known_users, split_inputs
from alignloop.data.adapters.records import DEFAULT_START, SALT, digest
from alignloop.data.ingest import BAD_JSON, INVALID, TRUNCATED, IngestError, ingest, iter_quarantine
from alignloop.data.io import read_logs

FIXTURES = Path(__file__).parent / "fixtures" / "adapters"
UTC = timezone.utc


def run(inputs: list[Path], out: Path, fmt: str = "auto", existing: Path | None = None):
    native, exports = split_inputs(inputs, fmt)
    report = ingest(native, out, existing=existing, converted=convert(exports, known_users(existing)))
    assert report.balanced
    return report, read_logs(out)


def hashed(raw: str) -> str:
    return "ex-u-" + digest(SALT, raw)


def transcript(tables: dict[str, pa.Table], cid: str) -> dict[str, Any]:
    """A conversation read back from the log tables: its path, candidates, votes and metadata."""
    turns = pl.from_arrow(tables["turns"]).filter(pl.col("conversation_id") == cid).sort("position",
                                                                                         "candidate_index")
    events = pl.from_arrow(tables["events"]).filter(pl.col("conversation_id") == cid)
    conv = pl.from_arrow(tables["conversations"]).filter(pl.col("conversation_id") == cid).row(0, named=True)
    path, candidates, votes, times = [], {}, {}, []
    parent = None
    for (position,), group in turns.group_by("position", maintain_order=True):
        rows = group.to_dicts()
        assert [r["candidate_index"] for r in rows] == list(range(len(rows)))
        assert all(r["parent_id"] == parent and r["shown"] for r in rows)  # siblings share the parent
        kept = [r for r in rows if r["selected"]]
        assert len(kept) == 1  # exactly one candidate per parent
        chosen = kept[0]
        path.append((chosen["role"], chosen["text"]))
        times.append(chosen["created_at"])
        if len(rows) > 1:
            candidates[position] = ([r["text"] for r in rows], chosen["candidate_index"])
            swiped = set(events.filter(pl.col("type") == "swipe")["turn_id"].to_list())
            assert swiped >= {r["turn_id"] for r in rows if not r["selected"]}
            assert events.filter((pl.col("type") == "select") & (pl.col("turn_id") == chosen["turn_id"])).height == 1
        vote = events.filter((pl.col("type") == "vote") & pl.col("turn_id").is_in([r["turn_id"] for r in rows]))
        if vote.height:
            votes[position] = int(vote["value"][0])
        parent = chosen["turn_id"]
    messages = events.filter(pl.col("type") == "message")
    assert messages.height == sum(role == "user" for role, _ in path)
    return {"path": path, "candidates": candidates, "votes": votes, "times": times, "user_id": conv["user_id"],
            "system": conv["system_prompt"], "model": conv["model_version"], "started_at": conv["started_at"]}


def by_user(tables: dict[str, pa.Table]) -> dict[str, list[str]]:
    convs = pl.from_arrow(tables["conversations"])
    return {u: sorted(g["conversation_id"].to_list()) for (u,), g in convs.group_by("user_id")}


# --- OpenAI format -----------------------------------------------------------------------------


def test_openai_fixture_round_trip(tmp_path):
    report, tables = run([FIXTURES / "openai.jsonl"], tmp_path / "out")
    assert report.total.quarantined == 0 and report.counts["conversations"].ingested == 4
    assert report.counts["users"].ingested == 3  # acct-9 twice, user 42, one without a user id

    c17 = transcript(tables, "c-17")
    assert c17["path"] == [("user", "Ahoy!"), ("assistant", "Arr, welcome aboard!"),
                           ("user", "Where are we sailing?"), ("assistant", "To Tortuga.")]
    assert c17["candidates"] == {1: (["Who goes there?", "Arr, welcome aboard!", "Ahoy, landlubber."], 1)}
    assert c17["votes"] == {1: 1, 3: -1}
    assert c17["system"] == "You are Captain Rook, a pirate." and c17["model"] == "my-model-v3"
    start = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
    assert c17["started_at"] == start and c17["times"] == [start + timedelta(seconds=i) for i in range(4)]

    c18 = transcript(tables, "c-18")
    assert c18["path"] == [("user", "Tell me a joke."),
                           ("assistant", "Why did the pirate go to school? To improve his arrr-ticulation."),
                           ("user", "Ha!")]
    # No selected_index: the message's own content was the last one shown.
    assert c18["candidates"] == {1: (["I only know sea shanties.", c18["path"][1][1]], 1)}
    assert c18["votes"] == {1: 1} and c18["model"] == "unknown" and c18["system"] == ""
    first = datetime(2026, 1, 6, 19, 0, tzinfo=UTC)  # "+01:00" read as its UTC instant
    assert c18["started_at"] == first
    assert c18["times"] == [first, first + timedelta(seconds=5), first + timedelta(minutes=1)]

    c4 = transcript(tables, "4")
    assert c4["path"] == [("user", "Capital of France?"), ("assistant", "Paris.")]
    assert c4["candidates"] == {1: (["Paris.", "It is Paris."], 0)} and c4["votes"] == {1: -1}
    assert c4["system"] == "Be brief.\n\nAnswer in English." and c4["model"] == "my-model-v2"
    assert c4["started_at"] == datetime.fromtimestamp(1767700000, UTC)

    users = by_user(tables)
    assert users[hashed("acct-9")] == ["c-17", "c-18"] and users[hashed("42")] == ["4"]
    [anonymous] = [u for u in users if u not in (hashed("acct-9"), hashed("42"))]
    [cid] = users[anonymous]
    assert cid.startswith("openai-c-") and anonymous == hashed(f"conversation\x00{cid}")
    plain = transcript(tables, cid)
    assert plain["path"] == [("user", "hi"), ("assistant", "Hello! How can I help?")]
    assert plain["votes"] == {} and plain["candidates"] == {}
    assert plain["times"] == [DEFAULT_START, DEFAULT_START + timedelta(seconds=1)]

    first_seen = dict(pl.from_arrow(tables["users"]).select("user_id", "first_seen").iter_rows())
    assert first_seen[hashed("acct-9")] == start  # the earlier of the user's two conversations
    assert "acct-9" not in json.dumps(pl.from_arrow(tables["users"]).to_dicts(), default=str)


def test_openai_reingest_adds_nothing(tmp_path):
    out = tmp_path / "out"
    run([FIXTURES / "openai.jsonl"], out)
    before = read_logs(out)
    again, after = run([FIXTURES / "openai.jsonl"], out, existing=out)
    assert again.total.ingested == 0 and again.total.quarantined == 0 and again.total.duplicates == again.total.read
    assert again.counts["users"].read == 0  # known users get no second row (no conflict with first_seen)
    assert all(after[n].equals(before[n]) for n in before)


def test_a_later_export_of_a_known_user(tmp_path):
    out = tmp_path / "out"
    run([FIXTURES / "openai.jsonl"], out)
    later = {"id": "c-19", "user_id": "acct-9", "created_at": "2026-01-07T08:00:00Z",
             "messages": [{"role": "user", "content": "Ahoy again"},
                          {"role": "assistant", "content": "Welcome back"}]}
    earlier = {**later, "id": "c-16", "created_at": "2026-01-04T08:00:00Z"}
    day = tmp_path / "day2.jsonl"
    day.write_text(json.dumps(later) + "\n" + json.dumps(earlier) + "\n")
    report, tables = run([day], out, existing=out)
    assert report.counts["users"].read == 0 and report.counts["conversations"].ingested == 1
    assert by_user(tables)[hashed("acct-9")] == ["c-17", "c-18", "c-19"]
    # Before the user's stored first_seen: out of order, like any log row dated before its user; the
    # rest of that conversation hangs off its quarantined session.
    assert report.reasons == {"out of order": 1, "dangling reference": 4}
    assert report.counts["sessions"].quarantined == 1 and report.counts["conversations"].quarantined == 1
    assert {r["line"] for r in iter_quarantine(out / "quarantine.jsonl")} == {2}


def test_users_are_gathered_across_files(tmp_path):
    one = {"id": "a", "user_id": "u", "created_at": "2026-01-07T08:00:00Z",
           "messages": [{"role": "user", "content": "x"}]}
    two = {"id": "b", "user_id": "u", "created_at": "2026-01-03T08:00:00Z",
           "conversations": [{"from": "human", "value": "y"}]}
    (tmp_path / "one.jsonl").write_text(json.dumps(one) + "\n")
    (tmp_path / "two.json").write_text(json.dumps([two]))
    report, tables = run([tmp_path / "one.jsonl", tmp_path / "two.json"], tmp_path / "out")
    assert report.total.quarantined == 0
    assert pl.from_arrow(tables["users"]).to_dicts() == [
        {"user_id": hashed("u"), "first_seen": datetime(2026, 1, 3, 8, tzinfo=UTC)}]


def test_bad_records_are_quarantined_with_reasons(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}
    bad = {
        "tool role": {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]},
        "voted greeting": {"messages": [{"role": "assistant", "content": "Welcome!", "thumbs": "up"},
                                        {"role": "user", "content": "hi"}]},
        "two users": {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "late system": {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
        "image": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "user vote": {"messages": [{"role": "user", "content": "a", "thumbs": "up"}]},
        "disagree": {"messages": [{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b", "thumbs": "up", "feedback": {"rating": -1}}]},
        "no messages": {"id": "x", "messages": []},
        "bad time": {"created_at": "yesterday", **good},
        "bad index": {"messages": [{"role": "user", "content": "a"},
                                   {"role": "assistant", "content": "b", "alternatives": ["c"], "selected_index": 2}]},
    }
    words = {"tool role": "messages.1.role", "voted greeting": "a greeting",
             "two users": "messages.1: expected an assistant", "late system": "system message after",
             "image": "only text parts", "user vote": "only assistant messages", "disagree": "disagree",
             "no messages": "messages", "bad time": "created_at", "bad index": "selected_index 2"}
    lines = [json.dumps(good)] + [json.dumps(v) for v in bad.values()] + ["{not json", '{"messages": [{"role"']
    src = tmp_path / "export.jsonl"
    src.write_text("\n".join(lines))  # no final newline: the last line was cut off
    report, tables = run([src], tmp_path / "out", fmt="openai")
    c = report.counts["conversations"]
    assert (c.read, c.ingested, c.quarantined) == (len(lines), 1, len(lines) - 1)
    records = list(iter_quarantine(tmp_path / "out" / "quarantine.jsonl"))
    assert [r["line"] for r in records] == list(range(2, len(lines) + 1))
    assert all(r["source"] == str(src) and r["table"] == "conversations" for r in records)
    for record, (name, raw) in zip(records, bad.items()):
        assert record["kind"] == INVALID and words[name] in record["reason"], (name, record["reason"])
        assert json.loads(record["raw"]) == raw
    assert records[-2]["kind"] == BAD_JSON and records[-1]["kind"] == TRUNCATED
    assert tables["conversations"].num_rows == 1


def test_rows_that_fail_ingest_checks_point_at_the_export_line(tmp_path):
    early = {"id": "old", "created_at": "1999-12-31T00:00:00Z",
             "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}
    src = tmp_path / "export.jsonl"
    src.write_text("\n" + json.dumps(early) + "\n")
    report, tables = run([src], tmp_path / "out")
    assert tables["conversations"].num_rows == 0 and report.total.ingested == 0
    records = list(iter_quarantine(tmp_path / "out" / "quarantine.jsonl"))
    assert records and {r["line"] for r in records} == {2} and {r["source"] for r in records} == {str(src)}
    assert any(r["kind"] == "implausible timestamp" and "1999-12-31" in r["reason"] for r in records)
    assert all(json.loads(r["raw"]) == early for r in records)


# --- ShareGPT ----------------------------------------------------------------------------------


def test_sharegpt_fixture_round_trip_without_feedback(tmp_path):
    report, tables = run([FIXTURES / "sharegpt.json"], tmp_path / "out")
    assert report.total.quarantined == 0 and report.counts["conversations"].ingested == 3
    events = pl.from_arrow(tables["events"])
    assert set(events["type"]) == {"message"}  # no votes, no swipes: nothing but messages
    a = transcript(tables, "QWJhYvA_0")
    assert a["path"] == [("user", "Summarize this article: the tide rises twice a day."),
                         ("assistant", "Tides rise twice daily.")]
    assert a["system"] == "You are a helpful assistant."
    b = transcript(tables, "QWJhYvA_1")
    assert b["system"] == "You are a chef." and [role for role, _ in b["path"]] == ["user", "assistant"] * 2
    assert b["path"][-1] == ("assistant", "About 6 minutes.")
    [other] = [c for c in tables["conversations"].column("conversation_id").to_pylist() if not c.startswith("QW")]
    assert other.startswith("sharegpt-c-") and transcript(tables, other)["path"] == [("user", "What is 2+2?"),
                                                                                      ("assistant", "4")]
    assert len(by_user(tables)) == 3  # no user ids: each conversation its own user


def test_logs_without_feedback_build_sft_but_no_pairs(tmp_path):
    from alignloop.data.builders import BuildConfig, build_datasets
    from alignloop.data.filters import FilterConfig, run_filters

    _, tables = run([FIXTURES / "sharegpt.json"], tmp_path / "out")
    filtered, _ = run_filters(tables, FilterConfig())
    config = BuildConfig()
    config.sft.source = "selected"
    build_datasets(filtered, config, tmp_path / "built")
    sft = pl.read_parquet(tmp_path / "built" / "sft.parquet")
    assert sft.height > 0 and set(sft["conversation_id"]) <= set(tables["conversations"]["conversation_id"].to_pylist())
    assert pl.read_parquet(tmp_path / "built" / "dpo.parquet").height == 0


def test_sharegpt_jsonl_and_unknown_speaker(tmp_path):
    items = json.loads((FIXTURES / "sharegpt.json").read_text())
    odd = {"id": "fn", "conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{}"}]}
    src = tmp_path / "dump.jsonl"
    src.write_text("".join(json.dumps(i) + "\n" for i in [*items, odd]))
    assert detect(src) == "sharegpt"
    report, tables = run([src], tmp_path / "out")
    assert report.counts["conversations"].ingested == 3 and report.counts["conversations"].quarantined == 1
    [record] = iter_quarantine(tmp_path / "out" / "quarantine.jsonl")
    assert record["line"] == 4 and record["reason"].startswith("conversations.1.from")


# --- tables ------------------------------------------------------------------------------------


TABLE_ROWS = [
    {"id": "t-1", "user_id": "acct-1", "created_at": datetime(2026, 2, 1, 12, 0), "model": "v3",
     "messages": [{"role": "user", "content": "Hello", "alternatives": None, "thumbs": None},
                  {"role": "assistant", "content": "Hi there", "alternatives": ["Yo", "Greetings"], "thumbs": "up"}]},
    {"id": "t-2", "user_id": "acct-1", "created_at": datetime(2026, 2, 2, 12, 0), "model": None,
     "messages": [{"role": "user", "content": "Bye", "alternatives": None, "thumbs": None},
                  {"role": "assistant", "content": "See you", "alternatives": None, "thumbs": None}]},
    {"id": "t-3", "user_id": None, "created_at": None, "model": "v3",
     "messages": [{"role": "user", "content": "Hm", "alternatives": None, "thumbs": "sideways"}]},
]


def _check_table_tables(report, tables) -> None:
    assert report.counts["conversations"].ingested == 2 and report.counts["conversations"].quarantined == 1
    t1 = transcript(tables, "t-1")
    assert t1["path"] == [("user", "Hello"), ("assistant", "Hi there")]
    assert t1["candidates"] == {1: (["Yo", "Greetings", "Hi there"], 2)} and t1["votes"] == {1: 1}
    assert t1["started_at"] == datetime(2026, 2, 1, 12, 0, tzinfo=UTC)  # a naive timestamp is UTC
    assert transcript(tables, "t-2")["model"] == "unknown"
    assert by_user(tables) == {hashed("acct-1"): ["t-1", "t-2"]}


def test_parquet_table_round_trip(tmp_path):
    path = tmp_path / "export.parquet"
    pq.write_table(pa.Table.from_pylist(TABLE_ROWS), path)
    assert detect(path) == "table"
    report, tables = run([path], tmp_path / "out")
    _check_table_tables(report, tables)
    [record] = iter_quarantine(tmp_path / "out" / "quarantine.jsonl")
    assert record["line"] == 3 and "thumbs" in record["reason"] and json.loads(record["raw"])["id"] == "t-3"


def test_saved_dataset_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "saved"
    datasets.Dataset.from_list(TABLE_ROWS).save_to_disk(str(path))
    assert detect(path) == "table"
    report, tables = run([path], tmp_path / "out")
    _check_table_tables(report, tables)
    both = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TABLE_ROWS[:2]),
                          "test": datasets.Dataset.from_list(TABLE_ROWS[2:])}).save_to_disk(str(both))
    report, tables = run([both], tmp_path / "out2")
    _check_table_tables(report, tables)


def test_table_without_a_conversation_column(tmp_path):
    path = tmp_path / "export.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "response": ["b"]}), path)
    with pytest.raises(IngestError, match="needs a `messages`"):
        run([path], tmp_path / "out")


# --- detection ---------------------------------------------------------------------------------


def test_detection(tmp_path):
    assert detect(FIXTURES / "openai.jsonl") == "openai" and detect(FIXTURES / "sharegpt.json") == "sharegpt"
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"messages": []}\n{"conversations": []}\n')
    with pytest.raises(IngestError, match=r"different formats: openai \(line 1\), sharegpt \(line 2\)"):
        detect(mixed)
    both = tmp_path / "both.jsonl"
    both.write_text('{"messages": [], "conversations": []}\n')
    with pytest.raises(IngestError, match="more than one format"):
        detect(both)
    logs = tmp_path / "logs.jsonl"
    logs.write_text('{"table": "users"}\n')
    assert detect(logs) == "logs"
    named = tmp_path / "turns.jsonl"
    shutil.copy(FIXTURES / "openai.jsonl", named)
    assert detect(named) == "logs"  # named after a log table: read as that table, as ingest always has
    assert split_inputs([named], "openai")[1] == [(named, "openai")]
    with pytest.raises(IngestError, match="--format must be one of"):
        split_inputs([named], "csv")


# --- builders: swipes become preference pairs ----------------------------------------------------


def test_swipes_become_dpo_pairs(tmp_path):
    from alignloop.data.builders import BuildConfig, build_datasets
    from alignloop.data.filters import FilterConfig, run_filters

    _, tables = run([FIXTURES / "openai.jsonl"], tmp_path / "out")
    config = FilterConfig()
    filtered, _ = run_filters(tables, config)
    build_datasets(filtered, BuildConfig(), tmp_path / "built")
    dpo = pl.read_parquet(tmp_path / "built" / "dpo.parquet")
    pairs = {(r["chosen_turn_id"], r["rejected_turn_id"]) for r in dpo.to_dicts()}
    assert {("c-17-1-1", "c-17-1-0"), ("c-17-1-1", "c-17-1-2"), ("c-18-1-1", "c-18-1-0"),
            ("4-1-0", "4-1-1")} <= pairs


# --- property: any well-formed export comes back as written ----------------------------------------


texts = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=12)


@st.composite
def exports(draw) -> list[dict[str, Any]]:
    records = []
    for i in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 5))
        messages: list[dict[str, Any]] = [{"role": "system", "content": draw(texts)}] if draw(st.booleans()) else []
        t0 = draw(st.integers(1_000_000_000, 1_700_000_000))
        for j in range(n):
            m: dict[str, Any] = {"role": "user" if j % 2 == 0 else "assistant", "content": draw(texts)}
            if draw(st.booleans()):
                m["timestamp"] = t0 + 60 * j
            if m["role"] == "assistant":
                alternatives = draw(st.lists(texts, max_size=3))
                if alternatives:
                    m["alternatives"] = alternatives
                    if draw(st.booleans()):
                        m["selected_index"] = draw(st.integers(0, len(alternatives)))
                vote = draw(st.sampled_from([None, "up", "down", 1, -1]))
                if isinstance(vote, str):
                    m["thumbs"] = vote
                elif vote is not None:
                    m["feedback"] = {"rating": vote}
            messages.append(m)
        record: dict[str, Any] = {"id": f"p-{i}", "messages": messages}
        if draw(st.booleans()):
            record["user_id"] = draw(st.sampled_from(["a", "b"]))
        records.append(record)
    return records


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=exports())
def test_any_export_round_trips(tmp_path, records):
    out = tmp_path / f"out-{abs(hash(json.dumps(records)))}"
    src = out.with_suffix(".jsonl")
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    report, tables = run([src], out)
    assert report.total.quarantined == 0
    assert report.counts["conversations"].ingested == len(records)
    for record in records:
        got = transcript(tables, record["id"])
        system = [m for m in record["messages"] if m["role"] == "system"]
        body = record["messages"][len(system):]
        assert got["system"] == "\n\n".join(m["content"] for m in system)
        assert got["path"] == [(m["role"], m["content"]) for m in body]
        for position, m in enumerate(body):
            if m.get("alternatives"):
                k = m.get("selected_index", len(m["alternatives"]))
                shown = list(m["alternatives"])
                shown.insert(k, m["content"])
                assert got["candidates"][position] == (shown, k)
            else:
                assert position not in got["candidates"]
            vote = {"up": 1, "down": -1}.get(m.get("thumbs"), m.get("feedback", {}).get("rating"))
            assert got["votes"].get(position) == vote
        if "user_id" in record:
            assert got["user_id"] == hashed(record["user_id"])
        else:
            assert got["user_id"] == hashed(f"conversation\x00{record['id']}")


# --- the command -------------------------------------------------------------------------------


def _cli():
    import typer
    from typer.testing import CliRunner

    from alignloop.cli.logs import ingest as ingest_command

    app = typer.Typer()
    app.command("ingest")(ingest_command)
    app.command("other")(lambda: None)
    return app, CliRunner()


def test_ingest_command_reads_exports(tmp_path):
    app, runner = _cli()
    runs = tmp_path / "runs"
    args = ["ingest", str(FIXTURES / "openai.jsonl"), str(FIXTURES / "sharegpt.json"), "--run", "r",
            "--runs-dir", str(runs)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((runs / "r" / "ingest" / "manifest.json").read_text())
    assert manifest["counts"]["conversations"]["ingested"] == 7 and manifest["total"]["quarantined"] == 0
    assert manifest["config"]["format"] == "auto"
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"messages": []}\n{"conversations": []}\n')
    result = runner.invoke(app, ["ingest", str(mixed), "--run", "r2", "--runs-dir", str(runs)])
    assert result.exit_code != 0 and "different formats" in str(result.exception)
    result = runner.invoke(app, ["ingest", str(mixed), "--format", "sharegpt", "--run", "r3", "--runs-dir", str(runs)])
    assert result.exit_code == 0, result.output
    report = json.loads((runs / "r3" / "ingest" / "ingest_report.json").read_text())
    assert report["counts"]["conversations"]["quarantined"] == 2  # an empty conversation, and not ShareGPT


def test_a_greeting_joins_the_system_prompt(tmp_path):
    chat = {"id": "g", "messages": [{"role": "system", "content": "You are Ada."},
                                    {"role": "assistant", "content": "Welcome, traveller!"},
                                    {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}
    src = tmp_path / "export.jsonl"
    src.write_text(json.dumps(chat) + "\n")
    report, tables = run([src], tmp_path / "out", fmt="openai")
    assert report.total.quarantined == 0
    (conversation,) = tables["conversations"].to_pylist()
    assert conversation["system_prompt"] == "You are Ada.\n\nYou opened this conversation with:\nWelcome, traveller!"
    turns = sorted(tables["turns"].to_pylist(), key=lambda t: t["position"])
    assert [(t["role"], t["text"], t["position"]) for t in turns] == [("user", "hi", 0), ("assistant", "hey", 1)]
