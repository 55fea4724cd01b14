"""The chat UI in a real browser (headless Chromium through Playwright) against the real server on
the tiny model: what a user does on the page ends up, in order, in the exported log tables.

Needs Debian's Chromium (`apt-get install chromium`, /usr/bin/chromium) and the `playwright`
Python package (never `playwright install`: Playwright drives the system Chromium); skips without
either. The screenshot of the page goes into the test's folder and /tmp/ui_screenshot.png.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT_COPY = Path("/tmp/ui_screenshot.png")
MAX_MESSAGE_CHARS = 300


def sync_playwright():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright as sp
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install playwright)")
    return sp


@pytest.fixture(scope="module")
def playwright_api():
    """Skips (before the model loads) without Chromium or Playwright."""
    return sync_playwright()


@pytest.fixture(scope="module")
def engine(playwright_api, tiny):
    from alignloop.engine.engine import Engine

    model, tokenizer = tiny
    return Engine(model, tokenizer, dtype="float32", max_batch=4, show_progress=False)


@pytest.fixture
def live(engine, tmp_path):
    from alignloop.serve.app import create_app
    from alignloop.serve.backends import ModelBackend
    from alignloop.serve.config import ServeRecipe
    from alignloop.serve.run import InThread

    recipe = ServeRecipe.model_validate({
        "serve": {"store": str(tmp_path / "logs.db"), "context": 256},
        "models": [{"version": "v1", "model": "tiny-llama"}],
        "generation": {"max_tokens": 16, "temperature": 0.9},
        "limits": {"max_message_chars": MAX_MESSAGE_CHARS},
    })
    app = create_app(recipe, backends={"v1": ModelBackend("v1", engine, context=256, threads=1)})
    with InThread(app) as server:
        yield server, app.state.server.store


def events_in_order(folder: Path) -> list[dict]:
    """Exported events in the order they happened: by timestamp, and within one millisecond (one
    posted batch) by the page's event ids, which it numbers in order."""
    rows = pq.read_table(folder / "events.parquet").to_pylist()
    return sorted(rows, key=lambda e: (e["timestamp"], e["type"] != "message", e["event_id"]))


def test_chat_ui_logs_what_the_user_does(playwright_api, live, tmp_path):
    server, store = live
    started = time.monotonic()
    with playwright_api() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.set_default_timeout(60_000)
            run_scenario(page, server.url, store, tmp_path, started, problems)
        finally:
            browser.close()


def wait_idle(page, counter: str | None = None) -> None:
    """Until no request of the page's is in flight (and the swipe counter reads `counter`)."""
    check = "!document.body.dataset.busy"
    if counter is not None:
        check += f" && document.querySelector('[data-testid=candidate-counter]')?.textContent === '{counter}'"
    page.wait_for_function(check)


def run_scenario(page, url: str, store, tmp_path: Path, started: float, problems: list[str]) -> None:
    t = page.get_by_test_id
    page.goto(url + "/")
    page.wait_for_function("localStorage.getItem('alignloop_key') !== null")  # signed up once
    key = page.evaluate("localStorage.getItem('alignloop_key')")

    # Pick a character, start a conversation, send a message: candidate 0 answers it.
    t("character-luna").click()
    page.wait_for_function("document.querySelector('[data-testid=character-name]')?.textContent === "
                           "'Luna the Traveler'")
    t("message-input").fill("Hi Luna! Where did you travel last?")
    t("send").click()
    wait_idle(page, "1/1")
    shown = [t("candidate-text").get_attribute("data-turn-id")]
    page.wait_for_timeout(300)  # each reply is on screen for a while before the next action

    # Swipe right twice past the last candidate: two new alternatives are generated.
    t("swipe-right").click()
    wait_idle(page, "2/2")
    shown.append(t("candidate-text").get_attribute("data-turn-id"))
    page.wait_for_timeout(300)
    t("swipe-right").click()
    wait_idle(page, "3/3")
    page.wait_for_timeout(300)

    # Back to the second alternative (candidate_index 1), pick it, thumbs up, read it for a while.
    t("swipe-left").click()
    wait_idle(page, "2/3")
    assert t("candidate-text").get_attribute("data-candidate-index") == "1"
    picked_turn = t("candidate-text").get_attribute("data-turn-id")
    assert picked_turn == shown[1]
    t("pick").click()
    t("thumb-up").click()
    assert t("thumb-up").get_attribute("aria-pressed") == "true"
    assert t("pick").get_attribute("aria-pressed") == "true"
    page.wait_for_timeout(1500)
    page.evaluate("alignloopFlushReads()")  # resolves once every event so far is stored
    wall = time.monotonic() - started

    counts = store.export(tmp_path / "export")
    assert counts["users"] == 1 and counts["conversations"] == 1
    events = events_in_order(tmp_path / "export")
    got = [(e["type"], e["value"]) for e in events]
    expected = [("message", None),
                ("read", "secs"), ("swipe", 1.0),
                ("read", "secs"), ("swipe", 2.0),
                ("read", "secs"), ("swipe", 1.0),
                ("select", 1.0), ("vote", 1.0),
                ("read", "secs")]
    assert [(k, v if k != "read" else "secs") for k, v in got] == expected, got
    reads = [e["value"] for e in events if e["type"] == "read"]
    assert all(0 < r < wall for r in reads), (reads, wall)
    assert sum(reads) < wall, (reads, wall)
    assert reads[-1] >= 1.0, reads  # the page was on screen, visible and focused, for 1.5 s
    assert len({e["user_id"] for e in events}) == 1 and len({e["conversation_id"] for e in events}) == 1

    turns = pq.read_table(tmp_path / "export" / "turns.parquet").to_pylist()
    replies = sorted((r for r in turns if r["role"] == "assistant"), key=lambda r: r["candidate_index"])
    assert [r["candidate_index"] for r in replies] == [0, 1, 2]
    assert [r["turn_id"] for r in replies if r["selected"]] == [picked_turn]
    assert [r["turn_id"] for r in replies[:2]] == shown
    assert all(r["shown"] for r in replies)
    by_turn = {e["turn_id"] for e in events if e["type"] in ("select", "vote")}
    assert by_turn == {picked_turn}
    # The swipes leave, in order, candidates 0, 1, 2; the reads are of what was on screen.
    swiped_from = [e["turn_id"] for e in events if e["type"] == "swipe"]
    assert swiped_from == [replies[0]["turn_id"], replies[1]["turn_id"], replies[2]["turn_id"]]
    read_of = [e["turn_id"] for e in events if e["type"] == "read"]
    assert read_of == [replies[0]["turn_id"], replies[1]["turn_id"], replies[2]["turn_id"], picked_turn]

    # A reload keeps the account (the key in localStorage); reopening the conversation from the
    # sidebar shows the selected path: the picked candidate, 2 of 3.
    page.reload()
    assert page.evaluate("localStorage.getItem('alignloop_key')") == key
    conversation = events[0]["conversation_id"]
    t(f"conversation-{conversation}").click()
    wait_idle(page, "2/3")
    assert t("candidate-text").get_attribute("data-turn-id") == picked_turn

    # Go on from it; then edit and report the new reply.
    t("message-input").fill("That sounds wonderful. What did you eat there?")
    t("send").click()
    wait_idle(page, "1/1")
    assert t("user-message").count() == 2
    page.once("dialog", lambda d: d.accept("it was rude to me"))
    t("report").click()
    t("edit").click()
    t("edit-input").fill("Fresh pasta by the sea, every single day.")
    t("edit-save").click()
    assert t("candidate-text").inner_text().startswith("Fresh pasta by the sea")
    page.evaluate("alignloopFlushReads()")
    store.export(tmp_path / "export")
    events = events_in_order(tmp_path / "export")
    tail = [(e["type"], e["text"]) for e in events if e["type"] in ("message", "report", "edit")][-3:]
    assert tail == [("message", None), ("report", "it was rude to me"),
                    ("edit", "Fresh pasta by the sea, every single day.")], tail
    turns = pq.read_table(tmp_path / "export" / "turns.parquet").to_pylist()
    second = next(r for r in turns if r["role"] == "user" and r["parent_id"] == picked_turn)
    assert second["position"] == 1

    shot = tmp_path / "ui_screenshot.png"
    page.screenshot(path=str(shot))
    shutil.copyfile(shot, SCREENSHOT_COPY)

    # A 4xx answer's detail shows in the page's error line; the message stays in the box.
    long = "x" * (MAX_MESSAGE_CHARS + 1)
    t("message-input").fill(long)
    t("send").click()
    t("error").wait_for(state="visible")
    assert f"{MAX_MESSAGE_CHARS} characters" in t("error").inner_text()
    assert t("message-input").input_value() == long
    assert not problems, problems
