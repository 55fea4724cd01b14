"""Trust in the run folders and the log pipeline: one writer per stage (a lock that a second process
is refused, that a killed holder gives back), quarantines that accumulate over ingests, implausible
log rows quarantined with one reason per rule, and a full disk as one line with no partial file."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from alignloop.data.ingest import (
    DUPLICATE_KEY,
    IMPLAUSIBLE_INDEX,
    IMPLAUSIBLE_TIME,
    OUT_OF_ORDER,
    TABLES,
    ingest,
    iter_quarantine,
)
from alignloop.data.io import read_logs
from alignloop.data.schema import Plausible
from alignloop.data.stage import run_ingest
from alignloop.errors import AlignloopError
from alignloop.runs import LOCK, Stage
from test_ingest import all_tagged, tagged, tiny_world, write_mixed

PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[1]


def _child(code: str, *args: str) -> subprocess.Popen:
    """A Python process running `code` (dedented), its stdout a pipe, its stdin a pipe that holds it."""
    return subprocess.Popen([PYTHON, "-c", textwrap.dedent(code), *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


HOLD = """
    import sys
    from alignloop.runs import Stage
    Stage(sys.argv[1], "r1", "sft", {}).start()
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills us
"""


# --- 1. one writer per stage ---------------------------------------------------------------------


def test_a_second_process_is_refused_a_stage_another_holds_until_the_holder_dies(tmp_path):
    holder = _child(HOLD, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()
        with pytest.raises(AlignloopError) as refused:
            Stage(tmp_path, "r1", "sft", {}).start()
        message = str(refused.value)
        assert "\n" not in message
        assert str(tmp_path / "r1" / "sft" / LOCK) in message and f"process {holder.pid}" in message
        Stage(tmp_path, "r1", "other", {}).start()  # another stage of the same run is free
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the OS drops the lock
        holder.wait()
    stage = Stage(tmp_path, "r1", "sft", {}).start()
    stage.finish([])
    assert stage.is_complete()


def test_finish_hands_the_stage_back(tmp_path):
    code = """
        import sys
        from alignloop.runs import Stage
        Stage(sys.argv[1], "r1", "sft", {}).start().finish([])
        print("finished", flush=True)
        sys.stdin.read()
    """
    child = _child(code, str(tmp_path))
    try:
        assert child.stdout.readline().strip() == "finished", child.stderr.read()
        Stage(tmp_path, "r1", "sft", {}).start()  # the holder is alive but done with it
    finally:
        child.kill()
        child.wait()


def test_skipping_a_complete_stage_needs_no_lock(tmp_path):
    Stage(tmp_path, "r1", "sft", {}).start().finish([])
    code = """
        import fcntl, os, sys
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.read()
    """
    child = _child(code, str(tmp_path / "r1" / "sft" / LOCK))
    try:
        assert child.stdout.readline().strip() == "locked", child.stderr.read()
        assert Stage(tmp_path, "r1", "sft", {}).skip_if_complete() is True
        with pytest.raises(AlignloopError, match="in use"):
            Stage(tmp_path, "r1", "sft", {}).skip_if_complete(force=True)
    finally:
        child.kill()
        child.wait()


def test_one_process_may_start_its_own_stage_again(tmp_path):
    first = Stage(tmp_path, "r1", "sft", {}).start()  # e.g. an attempt that raised, then a retry
    second = Stage(tmp_path, "r1", "sft", {}).start()
    second.finish([])
    first.finish([])
    lock = os.open(tmp_path / "r1" / "sft" / LOCK, os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released once both have finished
    finally:
        os.close(lock)


TRAIN = """
    import sys, time
    from pathlib import Path
    from alignloop.errors import AlignloopError
    from alignloop.runs import Stage
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.01)
    stage = Stage(sys.argv[1], "r1", "sft", {"lr": 0.1})
    try:
        if stage.skip_if_complete():
            sys.exit(0)
    except AlignloopError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    for step in range(1, 5):
        stage.log_metrics(step=step, loss=1.0 / step)
        time.sleep(0.2)
    stage.finish([])
"""


def test_two_identical_training_runs_do_not_interleave_their_metrics(tmp_path):
    go = tmp_path / "go"
    runs = [_child(TRAIN, str(tmp_path / "runs"), str(go)) for _ in range(2)]
    time.sleep(1.0)  # both have imported alignloop and wait for the word
    go.touch()
    results = [(p.wait(timeout=120), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    assert all("in use" in err for code, err in results if code == 2)
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs" / "r1" / "sft" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]


def test_two_ingests_into_one_run_lose_no_rows(tmp_path):
    batches = []
    for seed in (21, 22):
        rows = tiny_world(40, seed=seed)
        path = tmp_path / f"batch{seed}.jsonl"
        write_mixed(path, all_tagged(rows))
        batches.append((path, rows))
    go = tmp_path / "go"
    code = """
        import sys, time
        from pathlib import Path
        while not Path(sys.argv[1]).exists():
            time.sleep(0.01)
        sys.argv = ["alignloop", *sys.argv[2:]]
        from alignloop.cli import main
        main()
    """
    procs = [_child(code, str(go), "logs", "ingest", str(path), "--run", "r1", "--runs-dir", str(tmp_path / "runs"))
             for path, _ in batches]
    time.sleep(2.0)
    go.touch()
    results = [(p.wait(timeout=300), p.stderr.read() + p.stdout.read()) for p in procs]
    assert any(code == 0 for code, _ in results), results
    tables = read_logs(tmp_path / "runs" / "r1" / "ingest" / "tables")
    for (code, output), (_, rows) in zip(results, batches):
        if code == 0:  # every batch that says it was ingested is there, in every table
            for name in TABLES:
                key = tables[name].schema.names[0]
                assert {r[key] for r in rows[name]} <= set(tables[name].column(key).to_pylist()), name
        else:
            assert code == 2 and "in use" in output and output.count("error:") == 1, output


# --- 2. every ingest's quarantine is kept --------------------------------------------------------


def _day(tmp_path: Path, seed: int, bad: int) -> Path:
    rows = tiny_world(2, seed=seed)
    lines = all_tagged(rows) + [f'{{"table": "events", "broken": {i}' for i in range(bad)]
    path = tmp_path / f"day{seed}.jsonl"
    write_mixed(path, lines)
    return path


def test_a_later_ingest_keeps_the_earlier_quarantine(tmp_path):
    out = tmp_path / "out"
    day1 = ingest([_day(tmp_path, 31, bad=16)], out)
    day2 = ingest([_day(tmp_path, 32, bad=0)], out, existing=out)
    day3 = ingest([_day(tmp_path, 33, bad=3)], out, existing=out)
    records = list(iter_quarantine(out / "quarantine.jsonl"))
    assert len(records) == 16 + 0 + 3
    per_ingest = Counter(r["ingest"] for r in records)
    reports = [day1, day2, day3]
    assert [per_ingest[r.ingest_id] for r in reports] == [16, 0, 3]
    assert len({r.ingest_id for r in reports}) == 3
    assert [r.quarantine_total for r in reports] == [16, 16, 19]
    assert all(r["source"].endswith("day31.jsonl") for r in records[:16])
    saved = json.loads((out / "ingest_report.json").read_text())
    assert saved["ingest_id"] == day3.ingest_id and saved["quarantine_total"] == 19


def test_the_ingest_stage_keeps_every_quarantine(tmp_path):
    runs = tmp_path / "runs"
    _, first = run_ingest([_day(tmp_path, 34, bad=16)], run="r1", runs_dir=runs)
    _, second = run_ingest([_day(tmp_path, 35, bad=0)], run="r1", runs_dir=runs)
    stage = runs / "r1" / "ingest"
    records = list(iter_quarantine(stage / "quarantine.jsonl"))
    assert len(records) == first.total.quarantined + second.total.quarantined == 16
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["quarantine_total"] == 16


# --- 3. implausible rows -----------------------------------------------------------------------


def _kinds(folder: Path) -> dict[str, str]:
    return {json.loads(r["raw"]).get("event_id") or json.loads(r["raw"]).get("user_id"): r["kind"]
            for r in iter_quarantine(folder / "quarantine.jsonl")}


@pytest.mark.parametrize("year", ["0001", "1960", "2999", "9999"])
def test_timestamps_outside_the_plausible_range_are_quarantined(tmp_path, year):
    rows = tiny_world(1, seed=41)
    ev = rows["events"][-1]
    extra = [tagged("events", {**ev, "event_id": "far", "timestamp": f"{year}-06-01T00:00:00.000+00:00"}),
             tagged("users", {"user_id": "old", "first_seen": f"{year}-06-01T00:00:00.000+00:00"})]
    write_mixed(tmp_path / "logs.jsonl", all_tagged(rows) + extra)
    report = ingest([tmp_path / "logs.jsonl"], tmp_path / "out")
    assert _kinds(tmp_path / "out") == {"far": IMPLAUSIBLE_TIME, "old": IMPLAUSIBLE_TIME}
    assert report.reasons == {IMPLAUSIBLE_TIME: 2}
    reasons = [r["reason"] for r in iter_quarantine(tmp_path / "out" / "quarantine.jsonl")]
    assert all("2000-01-01" in r for r in reasons) or all("in the future" in r for r in reasons), reasons


def test_a_product_with_older_logs_widens_the_bounds(tmp_path):
    rows = tiny_world(1, seed=41)
    old = tagged("users", {"user_id": "old", "first_seen": "1995-06-01T00:00:00.000+00:00"})
    write_mixed(tmp_path / "logs.jsonl", all_tagged(rows) + [old])
    bounds = Plausible(earliest=datetime(1990, 1, 1, tzinfo=timezone.utc))
    assert ingest([tmp_path / "logs.jsonl"], tmp_path / "out", bounds=bounds).total.quarantined == 0


def test_events_before_their_user_session_or_conversation_began_are_quarantined(tmp_path):
    rows = tiny_world(3, seed=43)
    users = {u["user_id"]: u["first_seen"] for u in rows["users"]}
    sessions = {s["session_id"]: s["started_at"] for s in rows["sessions"]}
    convs = {c["conversation_id"]: c["started_at"] for c in rows["conversations"]}

    def pick(later_than_parent):  # an event whose own start rules differ, so one rule alone is broken
        return next(e for e in rows["events"] if later_than_parent(e))

    in_later_conv = pick(lambda e: convs[e["conversation_id"]] > sessions[e["session_id"]])
    in_later_session = pick(lambda e: sessions[e["session_id"]] > users[e["user_id"]])
    cases = {"before_user": (rows["events"][0], users[rows["events"][0]["user_id"]], "user"),
             "before_session": (in_later_session, sessions[in_later_session["session_id"]], "session"),
             "before_conversation": (in_later_conv, convs[in_later_conv["conversation_id"]], "conversation")}
    extra = [tagged("events", {**ev, "event_id": event_id, "timestamp": _shift(start, -1)})
             for event_id, (ev, start, _) in cases.items()]
    write_mixed(tmp_path / "logs.jsonl", all_tagged(rows) + extra)
    report = ingest([tmp_path / "logs.jsonl"], tmp_path / "out")
    assert _kinds(tmp_path / "out") == dict.fromkeys(cases, OUT_OF_ORDER)
    assert report.reasons == {OUT_OF_ORDER: 3}
    for record in iter_quarantine(tmp_path / "out" / "quarantine.jsonl"):
        parent = cases[json.loads(record["raw"])["event_id"]][2]
        assert f"before its {parent} began" in record["reason"], record["reason"]


def _shift(stamp: str, seconds: float) -> str:
    return (datetime.fromisoformat(stamp) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def test_an_event_before_an_existing_conversation_began_is_quarantined(tmp_path):
    rows = tiny_world(1, seed=43)
    out = tmp_path / "out"
    write_mixed(tmp_path / "day1.jsonl", all_tagged(rows))
    ingest([tmp_path / "day1.jsonl"], out)
    ev = rows["events"][-1]
    conv = next(c for c in rows["conversations"] if c["conversation_id"] == ev["conversation_id"])
    write_mixed(tmp_path / "day2.jsonl", [tagged("events", {**ev, "event_id": "late_but_early",
                                                            "timestamp": _shift(conv["started_at"], -60)})])
    report = ingest([tmp_path / "day2.jsonl"], out, existing=out)
    assert report.reasons == {OUT_OF_ORDER: 1}


def test_a_swipe_index_of_1e20_is_quarantined(tmp_path):
    rows = tiny_world(1, seed=44)
    ev = next(e for e in rows["events"] if e["turn_id"] and e["type"] == "read")
    extra = [tagged("events", {**ev, "event_id": "huge", "type": "swipe", "value": 1e20}),
             tagged("events", {**ev, "event_id": "ok", "type": "swipe", "value": 3.0})]
    write_mixed(tmp_path / "logs.jsonl", all_tagged(rows) + extra)
    report = ingest([tmp_path / "logs.jsonl"], tmp_path / "out")
    assert _kinds(tmp_path / "out") == {"huge": IMPLAUSIBLE_INDEX}
    assert report.reasons == {IMPLAUSIBLE_INDEX: 1}


def test_a_line_with_a_duplicate_key_is_quarantined(tmp_path):
    rows = tiny_world(1, seed=45)
    ev = rows["events"][-1]
    body = json.dumps({**ev, "event_id": "second"})
    twice = '{"table": "events", "event_id": "first", ' + body[1:]  # "event_id" twice: JSON keeps the last
    quoted = tagged("events", {**ev, "event_id": "quoted", "text": 'he said "x": y', "type": "report"})
    write_mixed(tmp_path / "logs.jsonl", all_tagged(rows) + [twice, quoted])
    report = ingest([tmp_path / "logs.jsonl"], tmp_path / "out")
    records = list(iter_quarantine(tmp_path / "out" / "quarantine.jsonl"))
    assert [(r["kind"], r["raw"]) for r in records] == [(DUPLICATE_KEY, twice)]
    assert "event_id" in records[0]["reason"]
    assert report.counts["events"].ingested == len(rows["events"]) + 1  # the quoted colon is fine


def test_simulated_logs_are_plausible(tmp_path):
    from alignloop.data.io import write_logs
    from alignloop.sim import SimConfig, simulate

    logs, _truth = simulate(SimConfig(users=30, days=14, seed=5))
    write_logs(tmp_path / "sim", logs, format="jsonl")
    report = ingest([tmp_path / "sim"], tmp_path / "out")
    assert report.total.quarantined == 0, list(iter_quarantine(tmp_path / "out" / "quarantine.jsonl"))[:3]


# --- 4. a full disk ----------------------------------------------------------------------------


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["tables", "quarantine"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, where):
    rows = tiny_world(2, seed=46)
    write_mixed(tmp_path / "day1.jsonl", all_tagged(rows))
    out = tmp_path / "out"
    ingest([tmp_path / "day1.jsonl"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_mixed(tmp_path / "day2.jsonl", all_tagged(tiny_world(2, seed=47)) + ['{"bad'])
    if where == "tables":
        monkeypatch.setattr(pq.ParquetWriter, "write_table", _no_space)
    else:
        real = os.fsync  # the kernel reports a full disk at the latest when the file is flushed

        def fsync(fd: int) -> None:
            _no_space() if "quarantine" in os.readlink(f"/proc/self/fd/{fd}") else real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(AlignloopError) as full:
        ingest([tmp_path / "day2.jsonl"], out, existing=out)
    message = str(full.value)
    assert "no space left" in message and "\n" not in message
    assert str(out / ("events.parquet" if where == "tables" else "quarantine.jsonl")) in message or str(out) in message
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before)  # no temporary file left behind
    if where == "tables":
        assert after == before
