"""The simulated user world: determinism, consistent logs, hidden ground truth, engagement, behaviour."""

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from alignloop.data import LOG_SCHEMAS, derive_labels, read_logs
from alignloop.cli.logs import app as logs_app
from alignloop.errors import AlignloopError
from alignloop.sim import SimConfig, simulate
from alignloop.sim import engagement as eg
from alignloop.sim.config import TemplateSection
from alignloop.sim.lexicon import EMOJI_RE, GESTURE_RE, PIECES, TOPICS, WORDS, content_words
from alignloop.sim.messages import content_ids, write_messages
from alignloop.sim.responder import WIDTH, Context, EngineResponder, TemplateResponder
from alignloop.sim.traits import BOT, NORMAL, SKIMMER, sample_population
from alignloop.sim.truth import TRUTH_SCHEMAS

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def frames(world):
    logs, truth = world
    return ({k: pl.from_arrow(v) for k, v in logs.items()}, {k: pl.from_arrow(v) for k, v in truth.items()})


# --- determinism and the tables ---------------------------------------------------------------


def test_same_seed_same_world_other_seed_other_world() -> None:
    config = SimConfig(users=60, days=3, seed=3, block_users=25)  # three blocks
    logs, truth = simulate(config)
    again_logs, again_truth = simulate(config)
    for name in logs:
        assert logs[name].equals(again_logs[name]), name
    for name in truth:
        assert truth[name].equals(again_truth[name]), name
    other, _ = simulate(config.model_copy(update={"seed": 4}))
    assert not other["turns"].column("text").equals(logs["turns"].column("text"))
    assert logs["events"].num_rows > 1000


def test_ground_truth_stays_out_of_the_logs(small_world) -> None:
    logs, truth = small_world
    hidden = {f.name for schema in TRUTH_SCHEMAS.values() for f in schema} - {"user_id", "turn_id", "session_id"}
    for name, table in logs.items():
        assert table.schema.equals(LOG_SCHEMAS[name]), name
        assert not hidden & set(table.column_names), name
    # Keyed by the same ids, so evaluation can join them.
    L, T = frames(small_world)
    assistant = L["turns"].filter(pl.col("role") == "assistant")
    assert T["candidates"]["turn_id"].sort().equals(assistant["turn_id"].sort())
    assert set(L["users"]["user_id"]) <= set(T["users"]["user_id"])
    assert T["sessions"]["session_id"].sort().equals(L["sessions"]["session_id"].sort())


def test_logs_are_a_consistent_tree(small_world) -> None:
    L, _ = frames(small_world)
    turns, events = L["turns"], L["events"]
    assert turns["turn_id"].is_unique().all() and events["event_id"].is_unique().all()

    parents = turns.select("turn_id", parent_conv="conversation_id", parent_role="role",
                           parent_selected="selected")
    linked = turns.filter(pl.col("parent_id").is_not_null()).join(parents, left_on="parent_id", right_on="turn_id")
    assert linked.height == turns["parent_id"].drop_nulls().len()  # every parent exists
    assert (linked["conversation_id"] == linked["parent_conv"]).all()
    assert (linked["role"] != linked["parent_role"]).all()  # user and assistant alternate
    assert linked.filter(pl.col("role") == "user")["parent_selected"].all()  # replies follow the chosen one

    siblings = turns.filter(pl.col("role") == "assistant").group_by("parent_id").agg(
        n=pl.len(), selected=pl.col("selected").sum(), shown=pl.col("shown").sum(),
        max_index=pl.col("candidate_index").max(),
        shown_prefix=(pl.col("shown") == (pl.col("candidate_index") < pl.col("shown").sum())).all(),
        selected_shown=(pl.col("shown") | ~pl.col("selected")).all())
    assert (siblings["selected"] == 1).all() and siblings["shown_prefix"].all() and siblings["selected_shown"].all()
    assert (siblings["max_index"] == siblings["n"] - 1).all()
    assert set(siblings["n"].unique()) == {1, 4}  # one answer, or the four prefetched on a swipe

    counts = dict(events.group_by("type").len().iter_rows())
    assert counts["message"] == turns.filter(pl.col("role") == "user").height
    assert counts["read"] == turns.filter((pl.col("role") == "assistant") & pl.col("shown")).height
    assert {"swipe", "select", "vote", "report", "edit"} <= set(counts)
    assert set(events["turn_id"].drop_nulls()) <= set(turns["turn_id"])
    timed = events.join(L["sessions"], on="session_id")
    outside = (pl.col("timestamp") < pl.col("started_at")) | (pl.col("timestamp") > pl.col("ended_at"))
    assert timed.filter(outside).is_empty()


def test_labels_track_the_true_continue_probability(small_world) -> None:
    L, T = frames(small_world)
    labels = pl.from_arrow(derive_labels(small_world[0])).join(T["candidates"], on="turn_id")
    low, high = labels["p_continue"].quantile(0.25), labels["p_continue"].quantile(0.75)
    assert labels.filter(pl.col("p_continue") >= high)["continued"].mean() > \
        labels.filter(pl.col("p_continue") <= low)["continued"].mean() + 0.2
    assert labels["returned_7d"].null_count() > 0  # the end of the window is censored


# --- the engagement function ------------------------------------------------------------------


def one(**values) -> eg.Features:
    base = dict(n_words=40, asks_question=False, n_emoji=0, n_gestures=0, relevance=0.5,
                topic_counts=np.zeros((1, 8), int), repeat_within=0.0, repeat_across=0.0, n_unsafe=0)
    base.update(values)
    return eg.Features(**{k: np.atleast_1d(np.asarray(v)) if k != "topic_counts" else v for k, v in base.items()})


def taste(pref=40.0, question=0.0, emoji=0.0, gesture=0.0) -> eg.Taste:
    return eg.Taste(np.array([pref]), np.array([question]), np.array([emoji]), np.array([gesture]),
                    np.full((1, 8), 1 / 8))


@settings(max_examples=200, deadline=None)
@given(pref=st.floats(6, 200), near=st.integers(1, 400), far=st.integers(1, 400))
def test_the_preferred_length_scores_higher(pref: float, near: int, far: int) -> None:
    d_near, d_far = abs(np.log((near + 1) / (pref + 1))), abs(np.log((far + 1) / (pref + 1)))
    if d_near + 1e-9 >= d_far:
        near, far = far, near
        d_near, d_far = d_far, d_near
    if d_far - d_near < 1e-6:
        return
    assert eg.engagement(one(n_words=near), taste(pref)) > eg.engagement(one(n_words=far), taste(pref))


@settings(max_examples=100, deadline=None)
@given(words=st.integers(1, 300), unsafe=st.integers(1, 5), repeat=st.floats(0.05, 1.0),
       relevance=st.floats(0, 1), emoji=st.floats(-1, 1))
def test_unsafe_and_repeated_answers_score_lower(words, unsafe, repeat, relevance, emoji) -> None:
    t = taste(emoji=emoji)
    clean = eg.engagement(one(n_words=words, relevance=relevance, n_emoji=1), t)
    assert eg.engagement(one(n_words=words, relevance=relevance, n_emoji=1, n_unsafe=unsafe), t) < clean
    assert eg.engagement(one(n_words=words, relevance=relevance, n_emoji=1, repeat_across=repeat), t) < clean
    assert eg.engagement(one(n_words=words, relevance=relevance, n_emoji=1, repeat_within=repeat), t) < clean


@settings(max_examples=50, deadline=None)
@given(like=st.floats(0.05, 1), gestures=st.integers(1, 3))
def test_tastes_cut_both_ways(like: float, gestures: int) -> None:
    plain, showy = one(), one(n_gestures=gestures, n_emoji=gestures, asks_question=True)
    fan = taste(question=like, emoji=like, gesture=like)
    hater = taste(question=-like, emoji=-like, gesture=-like)
    assert eg.engagement(showy, fan) > eg.engagement(plain, fan)
    assert eg.engagement(showy, hater) < eg.engagement(plain, hater)


def test_engagement_from_text() -> None:
    user = "I really like ramen. Do you like sushi?"
    answer = "Oh, ramen always makes me happy. What do you love most about sushi?"
    dull = "I hear you."
    f = eg.measure([answer, answer, dull, answer + " You are a stupid idiot."], [user] * 4, [[], [answer], [], []])
    assert f.relevance.tolist() == [1.0, 1.0, 0.0, 1.0] and f.asks_question.tolist() == [True, True, False, True]
    assert f.repeat_across.tolist() == [0.0, 1.0, 0.0, 0.0] and f.n_unsafe.tolist() == [0, 0, 0, 2]
    e = eg.engagement(f, eg.Taste(np.full(4, 15.0), np.zeros(4), np.zeros(4), np.zeros(4), np.full((4, 8), 1 / 8)))
    assert e[0] > e[1]  # said before in the conversation
    assert e[0] > e[2]  # irrelevant and too short
    assert e[0] > e[3]  # unsafe


def test_behaviour_follows_engagement() -> None:
    e = np.linspace(-5, 4, 50)
    normal, bot, skimmer = (np.full(50, k) for k in (NORMAL, BOT, SKIMMER))
    assert np.all(np.diff(eg.swipe_probability(e, normal)) < 0)
    assert np.ptp(eg.swipe_probability(e, bot)) == 0 and np.ptp(eg.swipe_probability(e, skimmer)) == 0
    assert np.all(np.diff(eg.continue_probability(e, np.full(50, 0.5), normal)) > 0)
    words, speed, noise = np.full(50, 60), np.full(50, 4.0), np.zeros(50)
    assert np.all(np.diff(eg.reading_seconds(words, e, speed, normal, noise)) > 0)
    assert eg.reading_seconds(words, e, speed, skimmer, noise).max() < 0.5
    assert eg.reading_seconds(words, e, speed, bot, noise).max() < 0.1

    scores = np.array([[0.0, 2.0, 1.0, 5.0]] * 3)
    shown = np.array([[True, True, True, False]] * 3)
    probs = eg.choice_probabilities(scores, shown, np.full(3, 2.0), np.array([NORMAL, SKIMMER, BOT]))
    assert np.allclose(probs.sum(axis=1), 1) and np.all(probs[:, 3] == 0)
    assert probs[0].argmax() == 1 and np.allclose(probs[1:, :3], 1 / 3)


def test_pieces_measure_like_text() -> None:
    rng = np.random.default_rng(0)
    n = 600
    pop = sample_population(rng, 0, n, 7, 0.0, 0.0, 0.4, 1.2)
    msg = write_messages(rng, pop, np.arange(n))
    responder = TemplateResponder(TemplateSection(repeat=0.3, repeat_within=0.3, unsafe=0.3, emoji=0.9, gesture=0.9))
    ctx = Context(characters=rng.integers(0, 10, n), user_pieces=msg, user_words=content_ids(msg),
                  previous=np.full((n, WIDTH), -1, np.int32))
    older = responder.compose(ctx, rng)
    ctx.previous = older
    newer = responder.compose(ctx, rng)
    ctx.previous = newer
    now = responder.compose(ctx, rng)
    history = np.concatenate([newer, older], axis=1)
    fast = eg.features_from_pieces(now, ctx.user_words, history)
    render = lambda p: PIECES.render(p).to_pylist()  # noqa: E731
    slow = eg.measure(render(now), render(msg), [list(h) for h in zip(render(newer), render(older))])
    for f in fields(fast):
        assert np.allclose(getattr(fast, f.name), getattr(slow, f.name)), f.name
    assert fast.repeat_across.mean() > 0.2 and fast.n_unsafe.sum() > 0 and fast.repeat_within.max() > 0
    # A piece's content is its slot word and nothing else.
    for p in range(0, PIECES.size, 7):
        word = PIECES.word[p]
        assert content_words(PIECES.text_list[p]) == ({WORDS[word]} if word >= 0 else set())


@settings(max_examples=4, deadline=None)
@given(rate=st.sampled_from([0.0, 0.03, 0.2]), seed=st.integers(0, 2**16))
def test_within_answer_repeats_follow_the_configured_rate(rate, seed) -> None:
    """An answer repeats one of its own sentences at `repeat_within`, not by chance: its fillers
    and templates are drawn without replacement (with replacement, ~1/3 of answers repeated)."""
    rng = np.random.default_rng(seed)
    n = 12000
    pop = sample_population(rng, 0, n, 7, 0.0, 0.0, 0.4, 1.2)
    msg = write_messages(rng, pop, np.arange(n))
    responder = TemplateResponder(TemplateSection(repeat=0.0, repeat_within=rate, length_median=60.0))
    ctx = Context(characters=rng.integers(0, 10, n), user_pieces=msg, user_words=content_ids(msg),
                  previous=np.full((n, WIDTH), -1, np.int32))
    pieces = responder.compose(ctx, rng)
    f = eg.features_from_pieces(pieces, ctx.user_words, np.full((n, 1), -1))
    body = (pieces[:, 2:-3] >= 0).sum(axis=1)
    expected = rate * (body >= 2).mean()  # a one-sentence answer has nothing to repeat
    observed = (f.repeat_within > 0).mean()
    assert abs(observed - expected) <= 4 * np.sqrt(max(expected, 1e-4) / n) + 1e-9, (observed, expected)
    if rate == 0.0:
        assert observed == 0.0


# --- users: traits leak, bots and skimmers, heavy tails -----------------------------------------


def user_messages(world) -> pl.DataFrame:
    L, T = frames(world)
    return (L["turns"].filter(pl.col("role") == "user")
            .join(L["conversations"].select("conversation_id", "user_id"), on="conversation_id")
            .join(T["users"], on="user_id"))


def test_traits_leak_into_messages(small_world) -> None:
    msgs = user_messages(small_world).filter(pl.col("kind") != "bot").with_columns(
        emoji=pl.col("text").str.contains(EMOJI_RE.pattern),
        gesture=pl.col("text").str.contains(GESTURE_RE.pattern.replace("\\*", r"\*")),
        words=pl.col("text").str.split(" ").list.len())
    rate = lambda column, taste, sign: msgs.filter(pl.col(taste) * sign > 0.3)[column].mean()  # noqa: E731
    assert rate("emoji", "emoji_taste", 1) > 3 * rate("emoji", "emoji_taste", -1)
    assert rate("gesture", "gesture_taste", 1) > 3 * rate("gesture", "gesture_taste", -1)
    assert msgs.select(pl.corr("pref_len", "words")).item() > 0.3
    # Topic words: most come from the user's favourite topic, far above the 1 in 8 of chance.
    topic_of = {w: name for name, words in TOPICS.items() for w in words}
    sample = msgs.sample(2000, seed=0)
    hits = [topic_of.get(w) == fav for text, fav in zip(sample["text"], sample["favourite_topic"])
            for w in content_words(text)]
    assert np.mean(hits) > 0.4


def test_bots_and_skimmers_behave_as_specified(small_world) -> None:
    L, T = frames(small_world)
    msgs = user_messages(small_world)
    per_user = msgs.group_by("user_id", "kind").agg(n=pl.len(), distinct=pl.col("text").n_unique())
    bots = per_user.filter(pl.col("kind") == "bot")
    assert bots.height > 0 and (bots["distinct"] <= 3).all() and bots["n"].sum() > 10 * bots.height
    people = per_user.filter((pl.col("kind") == "normal") & (pl.col("n") >= 10))
    assert (people["distinct"] / people["n"]).mean() > 0.8

    events = L["events"].join(T["users"].select("user_id", "kind"), on="user_id")
    reading = events.filter(pl.col("type") == "read").group_by("kind").agg(
        median=pl.col("value").median(), p90=pl.col("value").quantile(0.9))
    reading = {row["kind"]: row for row in reading.iter_rows(named=True)}
    assert reading["bot"]["p90"] < 0.2 and reading["skimmer"]["p90"] < 1.0
    assert reading["normal"]["median"] > 3.0

    # After swiping, people pick the best candidate they saw far more often than readers who skip.
    shown = L["turns"].filter(pl.col("shown") & (pl.col("role") == "assistant")).join(
        T["candidates"].select("turn_id", "engagement"), on="turn_id")
    best = shown.group_by("parent_id").agg(best=pl.col("turn_id").sort_by("engagement").last(), n=pl.len())
    picks = (events.filter(pl.col("type") == "select")
             .join(shown.select("turn_id", "parent_id"), on="turn_id")
             .join(best, on="parent_id")
             .group_by("kind").agg(hit=(pl.col("turn_id") == pl.col("best")).mean()))
    hit = dict(picks.iter_rows())
    assert hit["normal"] > hit["skimmer"] + 0.15 and hit["normal"] > hit["bot"] + 0.15


def test_a_few_users_make_much_of_the_traffic(small_world) -> None:
    L, T = frames(small_world)
    normal = set(T["users"].filter(pl.col("kind") == "normal")["user_id"])
    counts = L["events"].filter(pl.col("user_id").is_in(normal)).group_by("user_id").len().sort("len", descending=True)
    top = counts.head(max(1, counts.height // 10))["len"].sum() / counts["len"].sum()
    assert top > 0.35


# --- the stage and the engine responder -------------------------------------------------------------


def invoke(*args):
    try:
        result = CliRunner().invoke(logs_app, list(args), catch_exceptions=False)
    except AlignloopError as e:
        return 2, f"error: {e}"
    return result.exit_code, result.output


def test_logs_simulate_writes_a_run_stage(tmp_path: Path) -> None:
    recipe = RECIPES / "simulate.toml"
    args = ["simulate", str(recipe), "--set", f"run.dir={tmp_path}", "--set", "simulate.users=40",
            "--set", "simulate.days=2", "--set", "output.format=jsonl", "--run", "t"]
    code, out = invoke(*args)
    assert code == 0, out
    stage = tmp_path / "t" / "simulate"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {f"logs/{n}.jsonl" for n in LOG_SCHEMAS} | \
        {f"ground_truth/{n}.jsonl" for n in TRUTH_SCHEMAS} | {"ground_truth/world.json"}
    logs = read_logs(stage / "logs")
    assert manifest["counts"]["logs"]["events"] == logs["events"].num_rows > 0
    assert manifest["speed"]["events_per_s"] > 0
    assert (stage / "metrics.jsonl").read_text().count("\n") == 2
    assert "up to date" in invoke(*args)[1]
    code, out = invoke(*args[:-2], "--set", "simulate.userz=3")
    assert code == 2 and "unknown key 'simulate.userz'" in out and "\n" not in out.strip()


def test_any_model_can_answer(tiny) -> None:
    from alignloop.engine.engine import Engine

    model, tokenizer = tiny
    responder = EngineResponder(Engine(model, tokenizer, max_batch=32, show_progress=False), max_tokens=6,
                                model_version="tiny-test")
    config = SimConfig(users=3, days=1, seed=1, bot_fraction=0, skimmer_fraction=0, activity_median=1.5,
                       activity_sigma=0, max_turns=2, max_conversations=1)
    logs, truth = simulate(config, responder)
    assert set(logs["conversations"].column("model_version").to_pylist()) == {"tiny-test"}
    answers = pl.from_arrow(logs["turns"]).filter(pl.col("role") == "assistant")
    assert answers.height > 0 and truth["candidates"].num_rows == answers.height
    again, _ = simulate(config, responder)
    assert again["turns"].equals(logs["turns"])  # seeded per request: reproducible
