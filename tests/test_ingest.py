"""Ingest: validation with quarantine, counts that always add up, idempotent re-ingest, Parquet input,
simulator round trip, and the chitchat-dataset adapter."""

from __future__ import annotations

import json
import math
import random
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignloop.data.ingest import (
    BAD_JSON,
    CONFLICT,
    DANGLING,
    INVALID,
    REFERENCES,
    TABLES,
    TRUNCATED,
    UNKNOWN,
    UNKNOWN_TABLE,
    _row_model_reason,
    column_problems,
    ingest,
    iter_quarantine,
)
from alignloop.data.io import read_logs, write_logs
from alignloop.data.schema import EVENT_TYPES, LOG_SCHEMAS, ROLES, conform, rows_to_table

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)


def _ts(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def tiny_world(users: int = 3, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """A small, valid, hand-made log: rows per table as JSON-ready dicts."""
    rng = random.Random(seed)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in TABLES}
    t = 0.0
    n_event = 0

    def event(type_: str, u: str, s: str, c: str, turn: str | None, value: float | None, text: str | None = None):
        nonlocal n_event
        n_event += 1
        rows["events"].append({"event_id": f"e{seed}-{n_event}", "type": type_, "user_id": u, "session_id": s,
                               "conversation_id": c, "turn_id": turn, "value": value, "text": text,
                               "timestamp": _ts(t)})

    for ui in range(users):
        u = f"u{seed}-{ui}"
        rows["users"].append({"user_id": u, "first_seen": _ts(t)})
        for si in range(rng.randint(1, 2)):
            s = f"{u}-s{si}"
            s_start = t
            for ci in range(rng.randint(1, 2)):
                c = f"{s}-c{ci}"
                rows["conversations"].append({
                    "conversation_id": c, "session_id": s, "user_id": u, "character_id": f"ch{ci}",
                    "character_name": f"Character {ci}", "system_prompt": "Be nice.", "model_version": "test",
                    "started_at": _ts(t)})
                parent = None
                for k in range(rng.randint(1, 3)):
                    ut = f"{c}-u{k}"
                    t += 5
                    rows["turns"].append({"turn_id": ut, "conversation_id": c, "parent_id": parent, "role": "user",
                                          "text": f"hello {k}", "position": 2 * k, "candidate_index": 0,
                                          "shown": True, "selected": True, "created_at": _ts(t)})
                    event("message", u, s, c, ut, None)
                    n_cand = rng.randint(1, 2)
                    chosen = n_cand - 1
                    for j in range(n_cand):
                        at = f"{c}-a{k}-{j}"
                        t += 2
                        rows["turns"].append({"turn_id": at, "conversation_id": c, "parent_id": ut,
                                              "role": "assistant", "text": f"answer {k}.{j}", "position": 2 * k + 1,
                                              "candidate_index": j, "shown": True, "selected": j == chosen,
                                              "created_at": _ts(t)})
                        t += 3
                        event("read", u, s, c, at, 3.0)
                        if j < chosen:
                            event("swipe", u, s, c, at, float(j + 1))
                    if n_cand > 1:
                        event("select", u, s, c, f"{c}-a{k}-{chosen}", float(chosen))
                    if rng.random() < 0.5:
                        event("vote", u, s, c, f"{c}-a{k}-{chosen}", rng.choice([1.0, -1.0]))
                    parent = f"{c}-a{k}-{chosen}"
            rows["sessions"].append({"session_id": s, "user_id": u, "started_at": _ts(s_start), "ended_at": _ts(t)})
            t += 3600
    return rows


def world_tables(rows: dict[str, list[dict[str, Any]]]) -> dict[str, pa.Table]:
    return {name: rows_to_table(name, rows[name]) for name in TABLES}


def write_mixed(path: Path, lines: list[str], final_newline: bool = True) -> None:
    text = "\n".join(lines) + ("\n" if final_newline else "")
    path.write_text(text, encoding="utf-8")


def tagged(name: str, row: dict[str, Any]) -> str:
    return json.dumps({"table": name, **row})


def all_tagged(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [tagged(name, r) for name in TABLES for r in rows[name]]


def assert_balanced(report, lines: int | None = None) -> None:
    for name, c in report.counts.items():
        assert c.ingested + c.quarantined + c.duplicates == c.read, (name, c)
    if lines is not None:
        assert report.total.read == lines


def assert_closed(folder: Path) -> None:
    """Every reference in the ingested tables resolves."""
    tables = read_logs(folder)
    for name, refs in REFERENCES.items():
        for column, target in refs:
            targets = set(tables[target].column(LOG_SCHEMAS[target].names[0]).to_pylist())
            values = [v for v in tables[name].column(column).to_pylist() if v is not None]
            assert set(values) <= targets, (name, column)


def sorted_table(table: pa.Table) -> pa.Table:
    return table.sort_by(table.schema.names[0])


# --- malformed rows ----------------------------------------------------------------------------


def test_malformed_file_every_row_accounted_for(tmp_path):
    rows = tiny_world(3, seed=1)
    good = all_tagged(rows)
    ev = rows["events"][0]
    turn = next(r for r in rows["turns"] if r["role"] == "user")
    conv = rows["conversations"][0]
    bad = {
        "bad json": ('{"table": "events", "event_id": "x",, }', BAD_JSON),
        "not an object": ("[1, 2, 3]", INVALID),
        "wrong type int": (tagged("turns", {**turn, "turn_id": "w1", "position": "3"}), INVALID),
        "wrong type bool": (tagged("turns", {**turn, "turn_id": "w2", "shown": "yes"}), INVALID),
        "wrong type id": (tagged("users", {"user_id": 17, "first_seen": _ts(0)}), INVALID),
        "unknown role": (tagged("turns", {**turn, "turn_id": "w3", "role": "bot"}), INVALID),
        "unknown event type": (tagged("events", {**ev, "event_id": "w4", "type": "like"}), INVALID),
        "missing id": (tagged("events", {k: v for k, v in ev.items() if k != "event_id"}), INVALID),
        "empty id": (tagged("events", {**ev, "event_id": ""}), INVALID),
        "bad timestamp": (tagged("events", {**ev, "event_id": "w5", "timestamp": "2026-13-45T25:00:00Z"}), INVALID),
        "naive timestamp": (tagged("events", {**ev, "event_id": "w6", "timestamp": "2026-01-05T10:00:00"}), INVALID),
        "bad vote": (tagged("events", {**ev, "event_id": "w7", "type": "vote", "value": 5}), INVALID),
        "extra field": (tagged("users", {"user_id": "w8", "first_seen": _ts(0), "is_bot": True}), INVALID),
        "unknown table": (json.dumps({"table": "labels", "turn_id": "x"}), UNKNOWN_TABLE),
        "no table": (json.dumps({"user_id": "w9", "first_seen": _ts(0)}), INVALID),
        "dangling conversation": (tagged("events", {**ev, "event_id": "w10", "conversation_id": "nope"}), DANGLING),
        "dangling turn": (tagged("events", {**ev, "event_id": "w11", "turn_id": "ghost"}), DANGLING),
        "dangling parent": (tagged("turns", {**turn, "turn_id": "w12", "parent_id": "ghost"}), DANGLING),
        "cascade child": (tagged("turns", {**turn, "turn_id": "w13", "parent_id": "w12", "role": "assistant",
                                           "position": 1}), DANGLING),
        "cascade event": (tagged("events", {**ev, "event_id": "w14", "turn_id": "w13"}), DANGLING),
        "bad session user": (tagged("sessions", {"session_id": "w15", "user_id": "nobody", "started_at": _ts(0),
                                                 "ended_at": _ts(1)}), DANGLING),
        "conv of bad session": (tagged("conversations", {**conv, "conversation_id": "w16", "session_id": "w15"}),
                                DANGLING),
        "same id other content": (tagged("events", {**ev, "text": "changed"}), CONFLICT),
        "exact repeat": (tagged("events", ev), None),
    }
    lines = good[:]
    expected: dict[int, str | None] = {}
    rng = random.Random(0)
    after = good.index(tagged("events", ev)) + 1  # repeats of `ev` must come after it
    for _label, (line, kind) in bad.items():
        lines.insert(rng.randint(after, len(lines)), line)
    lines.insert(5, "")  # blank lines are not rows
    for number, line in enumerate(lines, start=1):
        for _label, (bad_line, kind) in bad.items():
            if line == bad_line:
                expected[number] = kind
    truncated = tagged("events", {**ev, "event_id": "w99"})[:40]
    lines.append(truncated)
    expected[len(lines)] = TRUNCATED
    src = tmp_path / "mixed.jsonl"
    write_mixed(src, lines, final_newline=False)

    report = ingest([src], tmp_path / "out")
    n_rows = sum(1 for line in lines if line.strip())
    assert_balanced(report, n_rows)
    q = list(iter_quarantine(tmp_path / "out" / "quarantine.jsonl"))
    got = {r["line"]: r["kind"] for r in q}
    assert got == {n: k for n, k in expected.items() if k is not None}
    assert all(r["reason"] and "\n" not in r["reason"] and r["raw"] == lines[r["line"] - 1] for r in q)
    assert all(r["source"] == str(src) for r in q)
    assert report.counts["events"].duplicates == 1
    # an array, a labels row, a row without "table": their table cannot be told (the bad JSON
    # line and the cut-off one still show theirs)
    assert report.counts[UNKNOWN].read == report.counts[UNKNOWN].quarantined == 3
    assert {r["table"] for r in q if r["kind"] in (BAD_JSON, TRUNCATED)} == {"events"}
    for name in TABLES:
        assert report.counts[name].ingested == len(rows[name])
    out = read_logs(tmp_path / "out")
    for name, table in world_tables(rows).items():
        assert sorted_table(out[name]).equals(sorted_table(table))
    assert_closed(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "ingest_report.json").read_text())
    assert saved["total"]["read"] == n_rows and saved["counts"]["events"]["duplicates"] == 1


def test_reasons_are_specific(tmp_path):
    rows = tiny_world(1)
    ev = rows["events"][0]
    src = tmp_path / "events.jsonl"  # a per-table file: no "table" key needed
    write_mixed(src, [json.dumps(ev), json.dumps({**ev, "event_id": "b", "type": "like"}),
                      json.dumps({**ev, "event_id": "c", "timestamp": "yesterday"}),
                      json.dumps({"table": "turns", **ev, "event_id": "d"})])
    report = ingest([src], tmp_path / "out", existing=None)
    reasons = [r["reason"] for r in iter_quarantine(tmp_path / "out" / "quarantine.jsonl")]
    # the first row is fine but its references are not in this batch (no existing given)
    assert reasons[0].startswith("user_id 'u0-0' is not a known users row")
    assert reasons[1].startswith("type:") and "'read'" in reasons[1]
    assert reasons[2].startswith("timestamp:")
    assert reasons[3].startswith("table:")
    assert report.counts["events"].quarantined == 4


def test_timestamps_any_offset_become_utc_ms(tmp_path):
    users = tmp_path / "users.jsonl"
    write_mixed(users, [json.dumps({"user_id": "a", "first_seen": "2026-01-05T11:30:00.123456+02:00"}),
                        json.dumps({"user_id": "b", "first_seen": "2026-01-05 09:30:00Z"}),
                        json.dumps({"user_id": "c", "first_seen": "2026-01-05T09:30:00.5-01:30"})])
    ingest([users], tmp_path / "out")
    got = read_logs(tmp_path / "out")["users"].to_pylist()
    assert [u["first_seen"] for u in got] == [
        datetime(2026, 1, 5, 9, 30, 0, 123000, tzinfo=timezone.utc), datetime(2026, 1, 5, 9, 30, tzinfo=timezone.utc),
        datetime(2026, 1, 5, 11, 0, 0, 500000, tzinfo=timezone.utc)]


def test_rules_the_mirror_does_not_know_fall_back_to_the_model(tmp_path, monkeypatch):
    import alignloop.data.ingest as ingest_module

    rows = tiny_world(2, seed=11)
    ev = rows["events"][0]
    lines = all_tagged(rows) + [tagged("events", {**ev, "event_id": "v", "type": "vote", "value": 0.5}),
                                tagged("turns", {**rows["turns"][0], "turn_id": "p", "parent_id": "p"})]
    src = tmp_path / "logs.jsonl"
    write_mixed(src, lines)
    fast = ingest([src], tmp_path / "fast")
    monkeypatch.setitem(ingest_module._CHECKS, "events", None)
    monkeypatch.setitem(ingest_module._CHECKS, "turns", None)
    slow = ingest([src], tmp_path / "slow")
    assert fast.to_dict()["counts"] == slow.to_dict()["counts"]
    assert [r["reason"] for r in iter_quarantine(tmp_path / "fast" / "quarantine.jsonl")] == [
        r["reason"] for r in iter_quarantine(tmp_path / "slow" / "quarantine.jsonl")] == [
        "vote event: value must be +1, -1 or 0, got 0.5", "a turn cannot be its own parent"]


# --- idempotence -------------------------------------------------------------------------------


def test_reingest_is_idempotent(tmp_path):
    rows = tiny_world(4, seed=2)
    src = tmp_path / "logs.jsonl"
    write_mixed(src, all_tagged(rows))
    out = tmp_path / "out"
    first = ingest([src], out)
    assert first.total.ingested == first.total.read and first.total.quarantined == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    tables_before = read_logs(out)

    second = ingest([src], out, existing=out)
    assert_balanced(second)
    assert second.total.duplicates == second.total.read == first.total.read
    assert second.total.ingested == second.total.quarantined == 0
    tables_after = read_logs(out)
    for name in TABLES:
        assert tables_after[name].equals(tables_before[name])
    assert set(before) == {p.name for p in out.glob("*.parquet")}

    # The same rows twice in one batch: the second copies are duplicates.
    third = ingest([src, src], tmp_path / "twice")
    assert third.total.ingested == first.total.read and third.total.duplicates == first.total.read


def test_incremental_ingest_with_references_into_existing(tmp_path):
    rows = tiny_world(2, seed=3)
    early = {name: rows[name] for name in ("users", "sessions", "conversations")}
    late = {name: rows[name] for name in ("turns", "events")}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_mixed(a, [tagged(n, r) for n, rs in early.items() for r in rs])
    write_mixed(b, [tagged(n, r) for n, rs in late.items() for r in rs])
    out = tmp_path / "out"
    ingest([a], out)
    lonely = ingest([b], tmp_path / "alone")  # without the early rows every turn dangles
    assert lonely.total.ingested == 0 and lonely.reasons == {DANGLING: lonely.total.read}
    report = ingest([b], out, existing=out)
    assert report.total.ingested == report.total.read
    assert_closed(out)
    for name, table in world_tables(rows).items():
        assert sorted_table(read_logs(out)[name]).equals(sorted_table(table))


def test_conflicting_id_against_existing_is_quarantined(tmp_path):
    rows = tiny_world(1, seed=4)
    src = tmp_path / "logs.jsonl"
    write_mixed(src, all_tagged(rows))
    out = tmp_path / "out"
    ingest([src], out)
    changed = tmp_path / "events.jsonl"
    write_mixed(changed, [json.dumps({**rows["events"][0], "text": "edited later"}), json.dumps(rows["events"][1])])
    report = ingest([changed], out, existing=out)
    assert (report.counts["events"].quarantined, report.counts["events"].duplicates) == (1, 1)
    assert report.reasons == {CONFLICT: 1}


# --- Parquet -----------------------------------------------------------------------------------


def test_parquet_folder_round_trip(tmp_path):
    tables = world_tables(tiny_world(3, seed=5))
    write_logs(tmp_path / "src", tables)
    report = ingest([tmp_path / "src"], tmp_path / "out")
    assert report.total.ingested == sum(t.num_rows for t in tables.values())
    out = read_logs(tmp_path / "out")
    for name in TABLES:
        assert out[name].equals(tables[name])


def test_parquet_bad_rows_are_quarantined_with_row_numbers(tmp_path):
    rows = tiny_world(2, seed=6)
    tables = world_tables(rows)
    write_logs(tmp_path / "src", {n: t for n, t in tables.items() if n != "turns"})
    turns = tables["turns"].to_pylist()
    turns[1] = {**turns[1], "role": "bot"}
    turns[3] = {**turns[3], "text": None}
    turns[4] = {**turns[4], "created_at": datetime(2026, 1, 5, 9, 0, 0, 123456, tzinfo=timezone.utc)}
    relaxed = pa.schema([f.with_nullable(True) for f in LOG_SCHEMAS["turns"]])
    pq.write_table(pa.Table.from_pylist(turns, schema=relaxed), tmp_path / "src" / "turns.parquet")
    report = ingest([tmp_path / "src"], tmp_path / "out")
    assert_balanced(report)
    q = [r for r in iter_quarantine(tmp_path / "out" / "quarantine.jsonl") if r["kind"] == INVALID]
    assert [(r["line"], r["reason"].split(":")[0]) for r in q] == [(2, "role"), (4, "text")]
    assert json.loads(q[0]["raw"])["role"] == "bot"
    assert_closed(tmp_path / "out")


def test_parquet_with_wrong_column_types_goes_row_by_row(tmp_path):
    rows = tiny_world(1, seed=7)
    users = [{**u, "first_seen": u["first_seen"]} for u in rows["users"]] + [{"user_id": "x", "first_seen": "soon"}]
    folder = tmp_path / "src"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(users), folder / "users.parquet")  # first_seen is a string column
    report = ingest([folder / "users.parquet"], tmp_path / "out")
    assert_balanced(report, len(users))
    # cast like `alignloop.data.io` does: ISO strings are timestamps, "soon" is not
    assert report.counts["users"].quarantined == 1
    assert [r["line"] for r in iter_quarantine(tmp_path / "out" / "quarantine.jsonl")] == [len(users)]


# --- the column-wise checks agree with the row models -----------------------------------------

_IDS = st.sampled_from(["", "a", "b"])
_TS = st.sampled_from([T0, T0 + timedelta(seconds=1), T0 - timedelta(days=1)])
_INT = st.sampled_from([0, 1, 2, -1])
_FLOAT = st.sampled_from([None, 0.0, 1.0, -1.0, 0.5, 2.0, 3.0, -3.0, math.nan, math.inf, -math.inf])
_ROW = {
    "users": {"user_id": _IDS, "first_seen": _TS},
    "sessions": {"session_id": _IDS, "user_id": _IDS, "started_at": _TS, "ended_at": _TS},
    "conversations": {"conversation_id": _IDS, "session_id": _IDS, "user_id": _IDS, "character_id": _IDS,
                      "character_name": _IDS, "system_prompt": _IDS, "model_version": _IDS, "started_at": _TS},
    "turns": {"turn_id": _IDS, "conversation_id": _IDS, "parent_id": st.none() | _IDS,
              "role": st.sampled_from([*ROLES, "bot"]), "text": _IDS, "position": _INT, "candidate_index": _INT,
              "shown": st.booleans(), "selected": st.booleans(), "created_at": _TS},
    "events": {"event_id": _IDS, "type": st.sampled_from([*EVENT_TYPES, "like"]), "user_id": _IDS,
               "session_id": _IDS, "conversation_id": _IDS, "turn_id": st.none() | _IDS, "value": _FLOAT,
               "text": st.none() | _IDS, "timestamp": _TS},
}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(TABLES))
def test_column_checks_agree_with_row_models(data, name):
    rows = data.draw(st.lists(st.fixed_dictionaries(_ROW[name]), min_size=1, max_size=8))
    nulls = data.draw(st.lists(st.sampled_from(LOG_SCHEMAS[name].names), max_size=1))
    rows = [{**r, **{c: None for c in nulls}} for r in rows]
    relaxed = pa.schema([f.with_nullable(True) for f in LOG_SCHEMAS[name]])
    table = pa.Table.from_pylist(rows, schema=relaxed)
    flagged = column_problems(name, table).is_not_null().to_list()
    by_model = [_row_model_reason(name, r) is not None for r in table.to_pylist()]
    assert flagged == by_model


# --- property: random mixes of valid and corrupted rows always add up --------------------------

_WORLD = tiny_world(3, seed=8)
_WORLD_LINES = [(name, r) for name in TABLES for r in _WORLD[name]]


def _corrupt(kind: str, name: str, row: dict[str, Any], rng: random.Random) -> str:
    if kind == "json":
        text = tagged(name, row)
        return text[: rng.randint(1, len(text) - 1)]
    if kind == "type":
        key = rng.choice(list(row))
        return tagged(name, {**row, key: rng.choice([[1], {"a": 1}, 3.5, True])})
    if kind == "drop":
        key = rng.choice(list(row))
        return tagged(name, {k: v for k, v in row.items() if k != key})
    if kind == "ref":
        refs = [c for c, _ in REFERENCES[name]]
        return tagged(name, {**row, rng.choice(refs): "ghost"}) if refs else tagged(name, {**row, "x": 1})
    if kind == "table":
        return json.dumps({"table": rng.choice(["labels", "", "Events"]), **row})
    if kind == "garbage":
        return rng.choice(["{", "null", "\x00\x01", '{"table": "events"}', "42", "\ud800".encode(
            "utf-8", "surrogatepass").decode("latin-1")])
    raise AssertionError(kind)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(st.sampled_from(["keep", "keep", "keep", "dup", "json", "type", "drop", "ref", "table",
                                      "garbage"]), min_size=len(_WORLD_LINES), max_size=len(_WORLD_LINES)),
       seed=st.integers(0, 2**16), cut_last=st.booleans(), shuffle=st.booleans())
def test_counts_always_add_up(plan, seed, cut_last, shuffle):
    rng = random.Random(seed)
    lines = []
    for (name, row), action in zip(_WORLD_LINES, plan):
        if action in ("keep", "dup"):
            lines.append(tagged(name, row))
            if action == "dup":
                lines.append(tagged(name, row))
        else:
            lines.append(_corrupt(action, name, row, rng))
    if shuffle:
        rng.shuffle(lines)
    lines = [line.replace("\n", " ") for line in lines]
    if cut_last:
        lines[-1] = lines[-1][: max(1, len(lines[-1]) // 2)]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "mixed.jsonl"
        write_mixed(src, lines, final_newline=not cut_last)
        report = ingest([src], Path(tmp) / "out")
        assert_balanced(report, sum(1 for line in lines if line.strip()))
        q = list(iter_quarantine(Path(tmp) / "out" / "quarantine.jsonl"))
        assert len(q) == report.total.quarantined == len({r["line"] for r in q})
        assert_closed(Path(tmp) / "out")
        again = ingest([src], Path(tmp) / "out", existing=Path(tmp) / "out")
        assert again.total.ingested == 0 and again.total.duplicates == report.total.ingested + report.total.duplicates


# --- simulator round trip ----------------------------------------------------------------------


def test_simulator_logs_round_trip(tmp_path):
    from alignloop.sim import SimConfig, simulate

    try:
        logs, _truth = simulate(SimConfig(users=6, days=2, seed=3))
    except Exception as e:  # the simulator is still being finished by another session
        pytest.skip(f"alignloop.sim.simulate does not run yet: {type(e).__name__}: {e}")
    write_logs(tmp_path / "sim", logs, format="jsonl")
    report = ingest([tmp_path / "sim"], tmp_path / "out")
    assert report.total.quarantined == 0, list(iter_quarantine(tmp_path / "out" / "quarantine.jsonl"))[:3]
    out = read_logs(tmp_path / "out")
    for name in TABLES:
        assert out[name].equals(conform(name, logs[name])), name


# --- chitchat-dataset adapter ------------------------------------------------------------------


@pytest.fixture(scope="module")
def chitchat_data():
    pytest.importorskip("chitchat_dataset")
    from alignloop.data.adapters.chitchat import load_chitchat

    return load_chitchat()


def test_chitchat_adapter_on_a_slice(tmp_path, chitchat_data):
    from alignloop.data.adapters.chitchat import chitchat_tables

    data = chitchat_data
    keys = list(data)[:60]
    part = {k: data[k] for k in keys}
    tables = chitchat_tables(part)

    # What the raw data says, computed here independently of the adapter.
    openers = {c["messages"][0][0]["sender"] for c in part.values()}
    n_messages = sum(len(c["messages"]) for c in part.values())
    n_user_turns = sum((len(c["messages"]) + 1) // 2 for c in part.values())
    assert tables["users"].num_rows == len(openers)
    assert tables["conversations"].num_rows == len(part)
    assert tables["turns"].num_rows == n_messages
    turns = tables["turns"].to_pylist()
    assert sum(t["role"] == "user" for t in turns) == n_user_turns
    raw_ids = {u["sender"] for c in part.values() for m in c["messages"] for u in m}
    assert not raw_ids & set(tables["users"].column("user_id").to_pylist())  # hashed, never raw
    # roles alternate along each conversation, starting with the user
    by_conv: dict[str, list[dict]] = {}
    for t in turns:
        by_conv.setdefault(t["conversation_id"], []).append(t)
    for conv_turns in by_conv.values():
        conv_turns.sort(key=lambda t: t["position"])
        assert [t["role"] for t in conv_turns] == ["user" if i % 2 == 0 else "assistant" for i in range(len(conv_turns))]

    # votes come from the ratings: one per rated conversation with an answer and a clear rating
    votes = [e for e in tables["events"].to_pylist() if e["type"] == "vote"]
    expected = {}
    for key, c in part.items():
        r = c.get("ratings")
        if r and len(c["messages"]) > 1:
            mean = sum(r.values()) / len(r)
            if mean >= 6 or mean <= 4:
                expected[f"cc-{key}"] = 1.0 if mean >= 6 else -1.0
    assert {e["conversation_id"]: e["value"] for e in votes} == expected
    assert len(votes) == len(expected) > 0
    turn_roles = {t["turn_id"]: t["role"] for t in turns}
    assert all(turn_roles[e["turn_id"]] == "assistant" for e in votes)

    # then through ingest like any other source
    write_logs(tmp_path / "cc", tables)
    report = ingest([tmp_path / "cc"], tmp_path / "out")
    assert report.total.quarantined == 0 and report.total.ingested == sum(t.num_rows for t in tables.values())
    assert_closed(tmp_path / "out")


# --- the command -------------------------------------------------------------------------------


def _cli():
    import typer
    from typer.testing import CliRunner

    from alignloop.cli.logs import ingest as ingest_command

    app = typer.Typer()
    app.command("ingest")(ingest_command)
    app.command("other")(lambda: None)  # two commands, so "ingest" is a subcommand as under `alignloop logs`
    return app, CliRunner()


def test_ingest_command_writes_a_stage(tmp_path):
    rows = tiny_world(2, seed=9)
    src = tmp_path / "logs.jsonl"
    write_mixed(src, all_tagged(rows) + ['{"table": "events", "oops"', tagged("turns", {**rows["turns"][0],
                                                                                       "role": "bot"})])
    app, runner = _cli()
    args = ["ingest", str(src), "--run", "r1", "--runs-dir", str(tmp_path / "runs")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    stage = tmp_path / "runs" / "r1" / "ingest"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["total"]["read"] == len(all_tagged(rows)) + 2
    assert manifest["total"]["quarantined"] == 2 and manifest["counts"]["turns"]["quarantined"] == 1
    assert set(manifest["outputs"]) >= {f"tables/{n}.parquet" for n in TABLES} | {"quarantine.jsonl"}
    assert len(list(iter_quarantine(stage / "quarantine.jsonl"))) == 2
    assert "quarantined" in result.output and "events" in result.output
    before = read_logs(stage / "tables")

    again = runner.invoke(app, args)  # same run: adds to its tables, so everything is a duplicate
    assert again.exit_code == 0, again.output
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["total"]["duplicates"] == manifest["total"]["read"] - 2 and manifest["total"]["ingested"] == 0
    after = read_logs(stage / "tables")
    assert all(after[n].equals(before[n]) for n in TABLES)
    assert len((stage / "metrics.jsonl").read_text().splitlines()) == 2


def test_ingest_command_needs_inputs(tmp_path):
    app, runner = _cli()
    result = runner.invoke(app, ["ingest", "--runs-dir", str(tmp_path)])
    assert result.exit_code != 0 and "nothing to ingest" in str(result.exception)


def test_ingest_command_chitchat(tmp_path, monkeypatch, chitchat_data):
    from alignloop.data.adapters import chitchat

    data = chitchat_data
    part = {k: data[k] for k in list(data)[:40]}
    monkeypatch.setattr(chitchat, "load_chitchat", lambda path=None: part)  # a slice, to stay fast
    app, runner = _cli()
    result = runner.invoke(app, ["ingest", "--chitchat", "--run", "cc", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "cc" / "ingest" / "manifest.json").read_text())
    assert manifest["counts"]["conversations"]["ingested"] == 40 and manifest["total"]["quarantined"] == 0
    assert any(p.endswith("dataset.json") for p in manifest["inputs"])
