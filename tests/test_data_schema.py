"""The log schema: row models, Parquet and JSONL round trips, streaming writes, derived labels, docs."""

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignloop.data import (
    EVENT_TYPES,
    LOG_SCHEMAS,
    ROW_MODELS,
    SCHEMAS,
    SchemaError,
    TableWriter,
    conform,
    derive_labels,
    read_logs,
    read_table,
    rows_to_table,
    table_to_rows,
    write_logs,
)
from alignloop.data.schema import markdown_tables
from alignloop.sim.truth import TRUTH_SCHEMAS

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "logs.md"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def tiny_logs() -> dict[str, pa.Table]:
    """Two conversations by one user: a swipe, a reply, a return the next day, then silence."""
    users = [{"user_id": "u1", "first_seen": at(0)}]
    sessions = [
        {"session_id": "s1", "user_id": "u1", "started_at": at(0), "ended_at": at(100)},
        {"session_id": "s2", "user_id": "u1", "started_at": at(86_000), "ended_at": at(86_050)},
    ]
    conv = {"character_id": "ava", "character_name": "Ava", "system_prompt": "You are Ava.", "model_version": "m1"}
    conversations = [
        {"conversation_id": "c1", "session_id": "s1", "user_id": "u1", "started_at": at(0), **conv},
        {"conversation_id": "c2", "session_id": "s2", "user_id": "u1", "started_at": at(86_000), **conv},
    ]

    def turn(tid, cid, parent, role, pos, cand, shown, selected, t, text="hi 😊 *smiles*"):
        return {"turn_id": tid, "conversation_id": cid, "parent_id": parent, "role": role, "text": text,
                "position": pos, "candidate_index": cand, "shown": shown, "selected": selected, "created_at": at(t)}

    turns = [
        turn("t1", "c1", None, "user", 0, 0, True, True, 0),
        turn("t2", "c1", "t1", "assistant", 1, 0, True, False, 2),
        turn("t3", "c1", "t1", "assistant", 1, 1, True, True, 10),
        turn("t4", "c1", "t1", "assistant", 1, 2, False, False, 9),
        turn("t5", "c1", "t3", "user", 2, 0, True, True, 40),
        turn("t6", "c1", "t5", "assistant", 3, 0, True, True, 42),
        turn("t7", "c2", None, "user", 0, 0, True, True, 86_000),
        turn("t8", "c2", "t7", "assistant", 1, 0, True, True, 86_002),
    ]

    def event(eid, type_, tid, value, t, sid="s1", cid="c1", text=None):
        return {"event_id": eid, "type": type_, "user_id": "u1", "session_id": sid, "conversation_id": cid,
                "turn_id": tid, "value": value, "text": text, "timestamp": at(t)}

    events = [
        event("e1", "message", "t1", None, 0),
        event("e2", "read", "t2", 6.5, 8),
        event("e3", "swipe", "t2", 1, 8),
        event("e4", "read", "t3", 4.0, 14),
        event("e5", "select", "t3", 1, 15),
        event("e6", "vote", "t3", 1, 16),
        event("e7", "message", "t5", None, 40),
        event("e8", "report", "t6", None, 50, text="unsafe content"),
        event("e9", "edit", "t6", None, 60, text="shorter ✂"),
        event("e10", "message", "t7", None, 86_000, sid="s2", cid="c2"),
    ]
    rows = {"users": users, "sessions": sessions, "conversations": conversations, "turns": turns, "events": events}
    return {name: rows_to_table(name, r) for name, r in rows.items()}


def assert_same(a: dict[str, pa.Table], b: dict[str, pa.Table]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].schema.equals(b[name].schema), name
        assert a[name].equals(b[name]), name


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    logs = tiny_logs()
    files = write_logs(tmp_path, logs, format=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.{fmt}" for n in LOG_SCHEMAS)
    assert all(p.suffix == f".{fmt}" for p in files)
    assert_same(read_logs(tmp_path), logs)


def test_jsonl_is_plain_json_with_iso_timestamps(tmp_path: Path) -> None:
    write_logs(tmp_path, tiny_logs(), format="jsonl")
    first = (tmp_path / "events.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert '"timestamp":"2026-01-05T09:00:00' in first and '"type":"message"' in first


def test_simulated_world_round_trips(tmp_path: Path, small_world) -> None:
    logs, truth = small_world
    for fmt in ("parquet", "jsonl"):
        write_logs(tmp_path / fmt, logs, format=fmt)
        assert_same(read_logs(tmp_path / fmt), logs)


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.fixed_dictionaries({
    "event_id": st.text(min_size=1, max_size=12),
    "type": st.sampled_from(["message", "edit", "report"]),
    "user_id": st.text(min_size=1, max_size=8),
    "session_id": st.just("s"),
    "conversation_id": st.just("c"),
    "turn_id": st.none() | st.text(min_size=1, max_size=8),
    "value": st.none(),
    "text": st.none() | text,
    "timestamp": st.integers(0, 10**11).map(lambda ms: datetime.fromtimestamp(ms / 1000, timezone.utc)),
}), max_size=8))
def test_any_events_round_trip(tmp_path_factory, rows) -> None:
    rows = [r for r in rows if r["turn_id"] is not None or r["type"] == "message"]
    table = rows_to_table("events", rows)
    for fmt in ("parquet", "jsonl"):
        folder = tmp_path_factory.mktemp(fmt)
        write_logs(folder, {"events": table}, format=fmt)
        assert read_table(folder / f"events.{fmt}", "events").equals(table)


def test_row_models_match_schemas() -> None:
    for name, schema in SCHEMAS.items():
        assert list(ROW_MODELS[name].model_fields) == schema.names, name


def test_rows_round_trip_through_models() -> None:
    logs = tiny_logs()
    for name, table in logs.items():
        rows = table_to_rows(name, table)
        assert rows_to_table(name, rows).equals(table)
    assert table_to_rows("turns", logs["turns"])[0].created_at == T0


@pytest.mark.parametrize("name,change,message", [
    ("turns", {"role": "narrator"}, "role"),
    ("turns", {"turn_id": ""}, "turn_id"),
    ("turns", {"candidate_index": -1}, "candidate_index"),
    ("events", {"type": "vote", "value": 2}, "vote event"),
    ("events", {"type": "read", "value": -1.0}, "read event"),
    ("events", {"type": "swipe", "value": 0.5}, "candidate index"),
    ("events", {"type": "vote", "turn_id": None, "value": 1}, "needs a turn_id"),
    ("events", {"timestamp": datetime(2026, 1, 5)}, "timezone"),
    ("events", {"extra": 1}, "extra"),
    ("sessions", {"ended_at": T0 - timedelta(seconds=1)}, "before started_at"),
])
def test_bad_rows_are_named(name: str, change: dict, message: str) -> None:
    row = tiny_logs()[name].slice(0, 1).to_pylist()[0]
    with pytest.raises(SchemaError, match=re.escape(f"table '{name}', row 0")) as e:
        rows_to_table(name, [{**row, **change}])
    assert message in str(e.value)


def test_conform_rejects_leaks_gaps_and_nulls() -> None:
    events = tiny_logs()["events"]
    with pytest.raises(SchemaError, match=r"unexpected columns \['is_bot'\]"):
        conform("events", events.append_column("is_bot", pa.array([False] * events.num_rows)))
    with pytest.raises(SchemaError, match=r"missing columns \['text'\]"):
        conform("events", events.drop_columns(["text"]))
    nulls = events.set_column(0, "event_id", pa.array([None] * events.num_rows, pa.string()))
    with pytest.raises(SchemaError, match="null"):
        conform("events", nulls)
    # Column order is fixed up, not rejected.
    shuffled = events.select(list(reversed(events.column_names)))
    assert conform("events", shuffled).equals(events)


def test_event_types_are_the_documented_ones() -> None:
    assert set(EVENT_TYPES) == {"swipe", "select", "vote", "read", "edit", "report", "message"}


def test_writer_streams_chunks_and_is_atomic(tmp_path: Path) -> None:
    events = tiny_logs()["events"]
    with TableWriter(tmp_path, format="parquet", only=["events", "labels"]) as writer:
        for start in range(0, events.num_rows, 3):
            writer.write({"events": events.slice(start, 3)})
    assert read_table(tmp_path / "events.parquet", "events").equals(events)
    assert read_table(tmp_path / "labels.parquet", "labels").num_rows == 0  # every table gets a file

    before = (tmp_path / "events.parquet").read_bytes()
    with pytest.raises(RuntimeError), TableWriter(tmp_path, only=["events"]) as writer:
        writer.write({"events": events.slice(0, 2)})
        raise RuntimeError("crash midway")
    assert (tmp_path / "events.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.parquet", "labels.parquet"]


def test_labels_from_the_logs() -> None:
    labels = {row["turn_id"]: row for row in derive_labels(tiny_logs()).to_pylist()}
    assert set(labels) == {"t3", "t6", "t8"}  # selected assistant turns only
    assert labels["t3"]["continued"] and labels["t3"]["turns_after"] == 1
    assert labels["t3"]["time_to_next_user_message"] == pytest.approx(30.0)
    assert labels["t3"]["returned_1d"] is True and labels["t3"]["returned_7d"] is True
    # No reply: censored time, not zero.
    assert not labels["t6"]["continued"] and labels["t6"]["time_to_next_user_message"] is None
    assert labels["t6"]["turns_after"] == 0
    # The log ends right after t8: whether the user came back is unknown.
    assert labels["t8"]["returned_1d"] is None and labels["t8"]["returned_7d"] is None
    # With a longer window, not coming back is a plain "no".
    later = derive_labels(tiny_logs(), observed_until=at(86_002 + 8 * 86_400))
    t8 = [row for row in later.to_pylist() if row["turn_id"] == "t8"][0]
    assert t8["returned_1d"] is False and t8["returned_7d"] is False


def test_docs_column_reference_is_current() -> None:
    docs = DOCS.read_text(encoding="utf-8")
    for generated in (markdown_tables(SCHEMAS), markdown_tables(TRUTH_SCHEMAS)):
        assert generated in docs, "docs/logs.md is stale: paste `python -m alignloop.data.schema` and `... sim.truth`"
