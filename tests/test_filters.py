"""Log filters on a small simulated world: bot and skimmer precision/recall against ground truth,
per-user cap, near-duplicate detection, counts that add up, partitioned runs equal to one run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.data.filters import (
    FilterConfig,
    QualityConfig,
    QualityFilter,
    filter_precision_recall,
    funnel_plot,
    prepare,
    run_filters,
    share_caps,
    to_arrow,
)
from alignloop.data.neardup import lsh_groups, near_duplicate_groups
from alignloop.data.schema import conform, rows_to_table

WORLD = {"seed": 1, "users": 400, "days": 5, "bot_fraction": 0.06, "skimmer_fraction": 0.12}


@pytest.fixture(scope="module")
def world():
    from alignloop.sim import SimConfig, simulate

    return simulate(SimConfig(**WORLD))


@pytest.fixture(scope="module")
def filtered(world):
    logs, _ = world
    return run_filters(logs, FilterConfig())


def test_bot_and_skimmer_filters_match_ground_truth(world, filtered):
    _, truth = world
    _, report = filtered
    pr = filter_precision_recall(report, truth)
    for name in ("bots", "min_reading", "quality"):
        print(f"{name}: precision {pr[name]['precision']:.3f} recall {pr[name]['recall']:.3f} "
              f"(tp {pr[name]['tp']}, fp {pr[name]['fp']}, fn {pr[name]['fn']})")
    assert pr["bots"]["tp"] + pr["bots"]["fn"] >= 10, "the test world needs bots"
    assert pr["min_reading"]["tp"] + pr["min_reading"]["fn"] >= 20, "the test world needs skimmers"
    for name in ("bots", "min_reading"):
        assert pr[name]["precision"] >= 0.9
        assert pr[name]["recall"] >= 0.8


def test_counts_add_up(world, filtered):
    logs, _ = world
    out, report = filtered
    assert report.input_rows["events"] == logs["events"].num_rows
    previous = report.input_rows
    for f in report.filters:
        assert f.kept + f.dropped == f.input, f.name
        assert report.dropped.filter(pl.col("filter") == f.name).height == f.dropped + f.weighted
        assert sum(f.reasons.values()) == f.dropped + f.weighted
        assert f.rows_before == previous
        for table, n in f.rows_after.items():
            if table != "target_flags":  # the quality filter adds flags; everything else only shrinks
                assert n <= f.rows_before[table], (f.name, table)
        previous = f.rows_after
    assert report.output_rows == {name: df.height for name, df in out.items()}
    # The user filters dropped exactly the users they reported, with everything of theirs.
    gone = set(report.dropped.filter(pl.col("unit") == "users", pl.col("filter") == "bots")["id"])
    assert gone and not gone & set(out["users"]["user_id"]) and not gone & set(out["events"]["user_id"])
    # Filtered tables still fit the log schema (nothing leaked in, e.g. from ground truth).
    for name, table in to_arrow(out).items():
        assert table.num_rows == out[name].height


def test_skimmers_lose_preference_signal_only(world, filtered):
    out, report = filtered
    skimmers = report.dropped.filter(pl.col("filter") == "min_reading").select(user_id="id")
    assert skimmers.height
    theirs = out["events"].join(skimmers, on="user_id", how="semi")
    assert set(theirs["type"]) <= {"message", "edit", "report"}
    assert out["conversations"].join(skimmers, on="user_id", how="semi").height > 0  # conversations stay


@pytest.mark.parametrize("cap", [{"max_conversations": 3}, {"max_examples": 12, "max_conversations": None}])
def test_user_cap_holds(world, cap):
    logs, _ = world
    config = FilterConfig(order=["user_cap"])
    config.user_cap = config.user_cap.model_copy(update=cap)
    out, report = run_filters(logs, config)
    convs = out["conversations"].group_by("user_id").len()
    if cap.get("max_conversations"):
        assert convs["len"].max() <= cap["max_conversations"]
        before = pl.from_arrow(logs["conversations"]).group_by("user_id").len()
        expected = before.select((pl.col("len") - pl.col("len").clip(upper_bound=3)).sum()).item()
        assert report["user_cap"].dropped == expected
    else:
        examples = (out["turns"].filter((pl.col("role") == "assistant") & pl.col("selected"))
                    .join(out["conversations"], on="conversation_id").group_by("user_id").len())
        assert examples["len"].max() <= cap["max_examples"]
    assert report["user_cap"].dropped > 0


def test_user_cap_can_down_weight_instead(world):
    logs, _ = world
    config = FilterConfig(order=["user_cap"])
    config.user_cap.max_conversations = 3
    config.user_cap.mode = "weight"
    out, report = run_filters(logs, config)
    f = report["user_cap"]
    assert f.dropped == 0 and f.weighted > 0 and f.kept == f.input
    assert out["conversations"].height == logs["conversations"].num_rows
    per_user = out["weights"].group_by("user_id").agg(pl.col("weight").sum(), n=pl.len())
    assert (per_user["weight"] <= 3 + 1e-9).all()
    assert per_user.filter(pl.col("n") <= 3)["weight"].to_list() == per_user.filter(pl.col("n") <= 3)["n"].cast(
        pl.Float64).to_list()


def test_partitioned_run_equals_single_run(world, filtered):
    logs, _ = world
    out, report = filtered
    out3, report3 = run_filters(logs, FilterConfig(partitions=3))
    assert report3.output_rows == report.output_rows
    for name in out:
        key = out[name].columns
        assert out3[name].sort(key).equals(out[name].sort(key)), name
    assert report3.dropped.sort("filter", "id").equals(report.dropped.sort("filter", "id"))


def test_partitions_on_threads_equal_a_single_run(world, filtered):
    """Partitions run side by side on threads (`drive` with workers) give the single run's result,
    and the report adds them up in partition order."""
    from alignloop.data.filters import memory_partitions

    logs, _ = world
    out, report = filtered
    one, report_one = run_filters(logs, FilterConfig(partitions=3), workers=1)
    out3, report3 = run_filters(logs, FilterConfig(partitions=3), workers=2)
    assert report3.output_rows == report.output_rows
    for name in out:
        assert out3[name].equals(one[name]), name  # the same rows in the same order
        assert out3[name].sort(out[name].columns).equals(out[name].sort(out[name].columns)), name
    assert report3.dropped.equals(report_one.dropped)
    assert [f.dropped for f in report3.filters] == [f.dropped for f in report_one.filters]
    assert memory_partitions(10_000) == 1 and memory_partitions(1_000_000) == 2  # not the thread count


def test_funnel_plot(filtered, tmp_path):
    _, report = filtered
    path = funnel_plot(report, tmp_path / "funnel.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diversity_caps_character_share(world):
    logs, _ = world
    config = FilterConfig(order=["diversity"])
    config.diversity.max_character_share = 0.15
    config.diversity.max_topic_share = None
    out, report = run_filters(logs, config)
    shares = out["conversations"].group_by("character_id").len().with_columns(s=pl.col("len") / pl.col("len").sum())
    assert shares["s"].max() <= 0.15 + 1e-9
    assert report["diversity"].dropped > 0


def test_share_caps():
    assert share_caps({"a": 10, "b": 10}, 0.5) == {}
    assert share_caps({"a": 80, "b": 10, "c": 10}, 0.5) == {"a": 20}
    cut = share_caps({"a": 50, "b": 40, "c": 10}, 0.4)
    kept = {"a": 50, "b": 40, "c": 10} | cut
    assert max(kept.values()) <= 0.4 * sum(kept.values())
    assert share_caps({"a": 5, "b": 5}, 0.3) == {}  # impossible: nothing cut


# --- near duplicates ---------------------------------------------------------------------------

VOCAB = [a + b + c for a in "bcdfglmnprst" for b in "aeiou" for c in "nrstkl"]  # 360 pseudo-words
EMOJI = ["😊", "✨", "🎉", ""]


@st.composite
def edited_pair(draw):
    n = draw(st.integers(40, 70))
    words = draw(st.lists(st.sampled_from(VOCAB), min_size=n, max_size=n, unique=True))
    unused = sorted(set(VOCAB) - set(words))
    text = " ".join(words) + "."
    # Light edits: case, punctuation, spacing, emojis, and one changed word.
    edited = list(words)
    i = draw(st.integers(0, n - 1))
    edited[i] = draw(st.sampled_from(VOCAB))
    out = []
    for w in edited:
        style = draw(st.sampled_from(["same", "upper", "title", "punct", "space"]))
        w = {"upper": w.upper(), "title": w.title(), "punct": w + draw(st.sampled_from(list(",.!?;"))),
             "space": w + " "}.get(style, w)
        out.append(w)
    copy = " ".join(out) + draw(st.sampled_from(EMOJI))
    other = " ".join(draw(st.lists(st.sampled_from(unused), min_size=n, max_size=n)))  # another text
    return text, copy, other


@settings(max_examples=60, deadline=None)
@given(edited_pair())
def test_near_duplicates_catch_lightly_edited_repeats(pair):
    text, copy, other = pair
    groups = near_duplicate_groups([text, copy, other, "short one"])
    assert groups[0] == groups[1]
    assert groups[2] != groups[0]
    assert groups[3] == 3


def _lsh_reference(sig: np.ndarray, rows: int, threshold: float, eligible: np.ndarray) -> np.ndarray:
    """Banded LSH spelled out: per band, every eligible document with the same band values as an
    earlier one is compared with the band's first; similar ones are joined (union-find)."""
    parent = list(range(len(sig)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for b in range(sig.shape[1] // rows):
        first: dict[tuple, int] = {}
        for i in np.flatnonzero(eligible):
            key = tuple(sig[i, b * rows:(b + 1) * rows])
            j = first.setdefault(key, i)
            if j != i and (sig[i] == sig[j]).mean() >= threshold:
                a, c = root(i), root(j)
                parent[max(a, c)] = min(a, c)
    return np.array([root(i) for i in range(len(sig))])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 60), st.sampled_from([2, 3, 4]))
def test_lsh_groups_equal_banded_lsh_spelled_out(seed, n, values):
    rng = np.random.default_rng(seed)
    sig = rng.integers(0, values, size=(n, 16)).astype(np.uint64)  # few values: many shared bands
    eligible = rng.random(n) > 0.2
    assert np.array_equal(lsh_groups(sig, 4, 0.7, eligible), _lsh_reference(sig, 4, 0.7, eligible))


def _conversation_logs(user_texts: list[list[str]]) -> dict:
    """Tiny hand-made logs: one user per conversation, each user turn answered by one assistant turn."""
    t0 = datetime(2026, 1, 5, tzinfo=UTC)
    rows = {k: [] for k in ("users", "sessions", "conversations", "turns", "events")}
    for c, texts in enumerate(user_texts):
        uid, sid, cid = f"u{c}", f"s{c}", f"c{c}"
        start = t0 + timedelta(hours=c)
        rows["users"].append({"user_id": uid, "first_seen": start})
        rows["sessions"].append({"session_id": sid, "user_id": uid, "started_at": start,
                                 "ended_at": start + timedelta(minutes=30)})
        rows["conversations"].append({"conversation_id": cid, "session_id": sid, "user_id": uid,
                                      "character_id": "x", "character_name": "X", "system_prompt": "Be X.",
                                      "model_version": "m", "started_at": start})
        parent = None
        for k, text in enumerate(texts):
            ts = start + timedelta(minutes=k)
            ut, at = f"{cid}-u{k}", f"{cid}-a{k}"
            rows["turns"].append({"turn_id": ut, "conversation_id": cid, "parent_id": parent, "role": "user",
                                  "text": text, "position": 2 * k, "candidate_index": 0, "shown": True,
                                  "selected": True, "created_at": ts})
            rows["turns"].append({"turn_id": at, "conversation_id": cid, "parent_id": ut, "role": "assistant",
                                  "text": f"Answer {k} of {c}.", "position": 2 * k + 1, "candidate_index": 0,
                                  "shown": True, "selected": True, "created_at": ts + timedelta(seconds=2)})
            rows["events"].append({"event_id": f"{ut}-m", "type": "message", "user_id": uid, "session_id": sid,
                                   "conversation_id": cid, "turn_id": ut, "value": None, "text": None,
                                   "timestamp": ts})
            parent = at
    return {name: rows_to_table(name, r) for name, r in rows.items()}


def test_repeat_filter_keeps_max_copies_of_a_repeated_conversation():
    rng = np.random.default_rng(0)
    base = [" ".join(rng.choice(VOCAB, 12)) + "." for _ in range(3)]
    repeats = [base] + [[t.upper() if i % 2 else t + " 🙂" for t in base] for i in range(4)]
    others = [[" ".join(rng.choice(VOCAB, 12)) + "." for _ in range(3)] for _ in range(5)]
    logs = _conversation_logs(repeats + others)
    config = FilterConfig(order=["repeats"])
    config.repeats.max_copies = 2
    _, report = run_filters(logs, config)
    f = report["repeats"]
    assert (f.input, f.dropped, f.kept) == (10, 3, 7)
    assert set(report.dropped["id"]) == {"c2", "c3", "c4"}  # the earliest two copies stay


def test_quality_flags_empty_truncated_unsafe_repetitive():
    texts = {
        "ok": "That sounds lovely. Tell me more about your day!",
        "empty": "   ",
        "truncated": "I was going to say that the best thing about",
        "unsafe": "You are a stupid idiot.",
        "repetitive": "I hear you, my friend. I hear you, my friend. Anything else?",
        "gesture": "*smiles warmly* That is a fair point. *nods* That is a fair point. 😊",
    }
    logs = _conversation_logs([["hi there."]] * len(texts))
    turns = conform("turns", logs["turns"])
    assistant_texts = list(texts.values())
    new_text = pl.from_arrow(turns).with_columns(
        text=pl.when(pl.col("role") == "assistant")
        .then(pl.col("conversation_id").str.slice(1).cast(pl.Int64).map_elements(
            lambda i: assistant_texts[i], return_dtype=pl.String))
        .otherwise(pl.col("text")))
    logs["turns"] = conform("turns", new_text.to_arrow())
    frames = prepare(logs)
    flags = QualityFilter(QualityConfig()).signature(frames)
    got = dict(zip(flags["conversation_id"], flags["reason"]))
    names = list(texts)
    assert {names[int(c[1:])]: r for c, r in got.items()} == {
        "empty": "empty", "truncated": "truncated", "unsafe": "unsafe", "repetitive": "repetitive",
        "gesture": "repetitive"}


def test_streamed_from_disk_equals_in_memory(world, filtered, tmp_path):
    from alignloop.data.filters import FILTERED_SCHEMAS, run_filters_on_disk
    from alignloop.data.io import read_tables, write_logs
    from alignloop.data.parts import partitions_in, read_partition

    logs, _ = world
    out, report = filtered
    write_logs(tmp_path / "logs", logs)
    _, disk_report = run_filters_on_disk(tmp_path / "logs", tmp_path / "filtered", FilterConfig(), partitions=3)
    assert disk_report.output_rows == report.output_rows
    assert [f.to_dict() | {"seconds": 0} for f in disk_report.filters] == \
        [f.to_dict() | {"seconds": 0} for f in report.filters]
    got = read_tables(tmp_path / "filtered", FILTERED_SCHEMAS)
    for name, df in out.items():
        key = df.columns
        assert pl.from_arrow(got[name]).sort(key).equals(df.sort(key)), name
    assert partitions_in(tmp_path / "filtered") == 3
    parts = [read_partition(tmp_path / "filtered", k, FILTERED_SCHEMAS) for k in range(3)]
    users = [set(p["users"]["user_id"].to_pylist()) for p in parts]
    assert sum(len(u) for u in users) == out["users"].height and not users[0] & users[1]
