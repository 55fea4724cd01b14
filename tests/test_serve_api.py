"""The server's APIs on the tiny model: OpenAI chat completions (n, stream, stop, logprobs), the product
API's conversation tree and events, the log export, and the security rules (401/404/413/422/429)."""

from __future__ import annotations

import copy
import json

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from alignloop.engine.engine import Engine
from alignloop.serve.app import create_app
from alignloop.serve.backends import ModelBackend, assign
from alignloop.serve.config import ServeRecipe
from alignloop.serve.store import LogStore


@pytest.fixture(scope="module")
def engine(tiny):
    model, tokenizer = tiny
    return Engine(model, tokenizer, dtype="float32", max_batch=4, show_progress=False)


def make_client(engine, tmp_path, **limits) -> TestClient:
    recipe = ServeRecipe.model_validate({
        "serve": {"store": str(tmp_path / "logs.db"), "api_keys": ["static-key"], "context": 256},
        "models": [{"version": "v1", "model": "tiny-llama"}],
        "generation": {"max_tokens": 12, "temperature": 0.8},
        "limits": limits,
    })
    backends = {"v1": ModelBackend("v1", engine, context=256, threads=1)}
    return TestClient(create_app(recipe, backends=backends))


@pytest.fixture
def client(engine, tmp_path):
    with make_client(engine, tmp_path) as c:
        yield c


def signup(client) -> dict:
    r = client.post("/api/signup", json={})
    assert r.status_code == 200, r.text
    return r.json()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


H = auth("static-key")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


def test_models_and_completion_with_swipes_and_logprobs(client):
    assert [m["id"] for m in client.get("/v1/models", headers=H).json()["data"]] == ["v1"]
    r = client.post("/v1/chat/completions", headers=H,
                    json={"messages": MESSAGES, "n": 3, "max_tokens": 8, "logprobs": True, "seed": 5})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "v1" and len(out["choices"]) == 3
    for choice in out["choices"]:
        assert choice["finish_reason"] in ("stop", "length")
        lps = choice["logprobs"]["content"]
        assert 1 <= len(lps) <= 8 and all(x["logprob"] <= 0 for x in lps)
    assert out["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in out["choices"])
    # The same seed gives the same choices: a request is reproducible.
    again = client.post("/v1/chat/completions", headers=H,
                        json={"messages": MESSAGES, "n": 3, "max_tokens": 8, "seed": 5}).json()
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in out["choices"]]


def test_stream_equals_the_whole_answer(client):
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0, "seed": 1}
    whole = client.post("/v1/chat/completions", headers=H, json=body).json()["choices"][0]["message"]["content"]
    text, finish = "", None
    with client.stream("POST", "/v1/chat/completions", headers=H, json=body | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[6:])["choices"][0]
        text += choice["delta"].get("content", "")
        finish = choice["finish_reason"] or finish
    assert text.rstrip() == whole and finish in ("stop", "length")


def test_stop_string_cuts_the_answer(client):
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    full = client.post("/v1/chat/completions", headers=H, json=body).json()["choices"][0]["message"]["content"]
    if len(full) < 4:
        pytest.skip("the tiny model's greedy answer is too short to cut")
    stop = full[2:4]
    cut = client.post("/v1/chat/completions", headers=H, json=body | {"stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == full[: full.find(stop)].strip()


def test_conversation_tree_events_and_export(client, tmp_path):
    user = signup(client)
    h = auth(user["api_key"])
    chars = client.get("/api/characters").json()
    c = client.post("/api/conversations", headers=h, json={"character_id": chars[0]["id"]}).json()
    assert c["model_version"] == "v1"
    cid = c["conversation_id"]
    first = client.post(f"/api/conversations/{cid}/messages", headers=h, json={"text": "hi", "parent_id": None}).json()
    ut = first["user_turn"]["turn_id"]
    alt1 = client.post(f"/api/turns/{ut}/candidates", headers=h).json()
    alt2 = client.post(f"/api/turns/{ut}/candidates", headers=h).json()
    assert [first["candidate"]["candidate_index"], alt1["candidate_index"], alt2["candidate_index"]] == [0, 1, 2]
    c0 = first["candidate"]["turn_id"]
    events = [
        {"type": "read", "conversation_id": cid, "turn_id": c0, "value": 2.5},
        {"type": "swipe", "conversation_id": cid, "turn_id": c0, "value": 1},
        {"type": "swipe", "conversation_id": cid, "turn_id": alt1["turn_id"], "value": 2},
        {"type": "swipe", "conversation_id": cid, "turn_id": alt2["turn_id"], "value": 1},
        {"type": "select", "conversation_id": cid, "turn_id": alt1["turn_id"], "value": 1},
        {"type": "vote", "conversation_id": cid, "turn_id": alt1["turn_id"], "value": 1},
        {"type": "edit", "conversation_id": cid, "turn_id": alt1["turn_id"], "text": "a better answer"},
    ]
    r = client.post("/api/events", headers=h, json={"events": events})
    assert r.status_code == 200, r.text
    second = client.post(f"/api/conversations/{cid}/messages", headers=h,
                         json={"text": "and then?", "parent_id": alt1["turn_id"]}).json()
    tree = client.get(f"/api/conversations/{cid}", headers=h).json()["turns"]
    assert len(tree) == 6  # user, 3 candidates, user, candidate
    selected = {t["turn_id"] for t in tree if t["role"] == "assistant" and t["selected"]}
    assert selected == {alt1["turn_id"], second["candidate"]["turn_id"]}

    counts = client.app.state.server.store.export(tmp_path / "export")
    assert counts["users"] == 1 and counts["conversations"] == 1 and counts["turns"] == 6
    exported = pq.read_table(tmp_path / "export" / "events.parquet").to_pylist()
    kinds = sorted((e["type"], e["value"]) for e in exported)
    assert kinds == sorted([("message", None), ("message", None), ("read", 2.5), ("swipe", 1.0), ("swipe", 2.0),
                            ("swipe", 1.0), ("select", 1.0), ("vote", 1.0), ("edit", None)])
    turns = pq.read_table(tmp_path / "export" / "turns.parquet").to_pylist()
    assert {t["turn_id"] for t in turns if t["shown"]} >= {c0, alt1["turn_id"], alt2["turn_id"]}


def test_security(client, engine, tmp_path):
    alice, bob = signup(client), signup(client)
    ha, hb = auth(alice["api_key"]), auth(bob["api_key"])
    cid = client.post("/api/conversations", headers=ha, json={"character_id": "luna"}).json().get("conversation_id")
    if cid is None:  # the first character, whatever it is called
        first = client.get("/api/characters").json()[0]["id"]
        cid = client.post("/api/conversations", headers=ha, json={"character_id": first}).json()["conversation_id"]
    msg = client.post(f"/api/conversations/{cid}/messages", headers=ha, json={"text": "secret", "parent_id": None})
    turn = msg.json()["candidate"]["turn_id"]
    store = client.app.state.server.store
    before = store.count("events")

    # Another user's conversation looks exactly like one that does not exist, and nothing leaks.
    for r in (client.get(f"/api/conversations/{cid}", headers=hb),
              client.post(f"/api/conversations/{cid}/messages", headers=hb, json={"text": "x", "parent_id": turn}),
              client.post(f"/api/turns/{msg.json()['user_turn']['turn_id']}/candidates", headers=hb),
              client.post("/api/events", headers=hb, json={"events": [
                  {"type": "vote", "conversation_id": cid, "turn_id": turn, "value": 1}]})):
        assert r.status_code == 404 and "secret" not in r.text
    assert client.get("/api/conversations", headers=hb).json() == []
    assert client.get(f"/api/conversations/{cid}-nope", headers=ha).status_code == 404

    # Keys: missing or wrong -> 401.
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers=auth("wrong")).status_code == 401
    assert client.post("/api/events", json={"events": []}).status_code == 401

    # Malformed events -> 422 and nothing of the batch written (the valid first event included).
    good = {"type": "vote", "conversation_id": cid, "turn_id": turn, "value": 1}
    for bad in ({"type": "vote", "conversation_id": cid, "turn_id": turn, "value": 7},
                {"type": "swipe", "conversation_id": cid, "turn_id": turn, "value": 3},
                {"type": "read", "conversation_id": cid, "turn_id": turn, "value": -1},
                {"type": "launch", "conversation_id": cid, "turn_id": turn},
                {"type": "vote", "conversation_id": cid, "turn_id": "t-none", "value": 1},
                {"type": "vote", "conversation_id": cid, "turn_id": turn, "value": 1, "extra": 1}):
        r = client.post("/api/events", headers=ha, json={"events": [good, bad]})
        assert r.status_code == 422, (bad, r.text)
    assert client.post("/api/events", headers=ha, json={"events": []}).status_code == 422
    assert store.count("events") == before

    # Oversize -> 413, by header and by a body that does not declare its size.
    big = {"events": [good | {"type": "report", "value": None, "text": "x" * 70_000}]}
    assert client.post("/api/events", headers=ha, json=big).status_code == 413

    def chunks():
        yield b'{"events": ['
        for _ in range(2000):
            yield b'{"type": "vote", "conversation_id": "c", "turn_id": "t", "value": 1},'
        yield b"]}"
    r = client.post("/api/events", headers=ha | {"content-type": "application/json"}, content=chunks())
    assert r.status_code == 413
    assert store.count("events") == before


def test_rate_limit(engine, tmp_path):
    with make_client(engine, tmp_path, requests_per_minute=3) as c:
        codes = [c.get("/v1/models", headers=H).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]


def test_ab_assignment_is_stable_and_follows_shares():
    users = [f"u{i}" for i in range(4000)]
    first = [assign(u, ["a", "b"], [3, 1]) for u in users]
    assert first == [assign(u, ["a", "b"], [3, 1]) for u in users]
    assert 0.72 < first.count("a") / len(users) < 0.78


def test_store_rejects_nothing_twice(tmp_path):
    store = LogStore(tmp_path / "s.db")
    store.add_account("u1", "h1", 1_767_225_600_000)
    sid = store.session("u1", 1_767_225_600_000, 1000)
    assert store.session("u1", 1_767_225_600_500, 1000) == sid  # within the gap: the same session
    assert store.session("u1", 1_767_225_700_000, 1000) != sid  # after it: a new one
    row = {"event_id": "e1", "type": "vote", "user_id": "u1", "session_id": sid, "conversation_id": "c",
           "turn_id": "t", "value": 1.0, "text": None, "timestamp": 1_767_225_600_000}
    assert store.write({"events": [row]}) == 1
    assert store.write({"events": [row]}) == 0  # re-sent: a no-op
    assert store.count("events") == 1


def test_a_served_ab_test_is_read_back_from_the_store(engine, tmp_path, monkeypatch):
    from alignloop.eval.abtest import ABSettings, logged_abtest
    from alignloop.models import load_model

    other = Engine(*load_model("tiny-llama", dtype="float32", seed=1), dtype="float32", max_batch=4,
                   show_progress=False)
    recipe = ServeRecipe.model_validate({
        "serve": {"store": str(tmp_path / "ab.db"), "context": 256},
        "models": [{"version": "a", "model": "tiny-llama"}, {"version": "b", "model": "tiny-llama", "seed": 1}],
        "generation": {"max_tokens": 4}})
    backends = {"a": ModelBackend("a", engine, context=256, threads=1),
                "b": ModelBackend("b", other, context=256, threads=1)}
    with TestClient(create_app(recipe, backends=backends)) as client:
        first = client.get("/api/characters").json()[0]["id"]
        served = {}
        for i in range(24):
            h = auth(signup(client)["api_key"])
            c = client.post("/api/conversations", headers=h, json={"character_id": first}).json()
            served[c["conversation_id"]] = c["model_version"]
            m = client.post(f"/api/conversations/{c['conversation_id']}/messages", headers=h,
                            json={"text": "hi", "parent_id": None}).json()
            if i % 3 == 0:  # some users reply: the continue rate differs between users
                client.post(f"/api/conversations/{c['conversation_id']}/messages", headers=h,
                            json={"text": "go on", "parent_id": m["candidate"]["turn_id"]})
        logs = client.app.state.server.store.tables()
    assert set(served.values()) == {"a", "b"}  # both versions got users
    result = logged_abtest(logs, "a", "b", ABSettings(resamples=100))
    assert result.exposed == {"a": list(served.values()).count("a"), "b": list(served.values()).count("b")}
    assert "continue_rate" in result.comparisons and result.ground_truth is None
    assert 0 <= result.srm_p_value <= 1 and isinstance(result.decision.launch, bool)

    # The same test from the command line, and the store's export for ingest.
    from typer.testing import CliRunner

    from alignloop.cli import app

    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(app, ["abtest", "a", "b", "--store", str(tmp_path / "ab.db"), "--run", "served-ab"])
    assert out.exit_code == 0, out.output
    assert "observable decision:" in out.output and (tmp_path / "runs" / "served-ab" / "abtest" / "abtest.png").exists()
    out = CliRunner().invoke(app, ["logs", "export", str(tmp_path / "ab.db"), str(tmp_path / "export")])
    assert out.exit_code == 0 and "users=24" in out.output

def test_tools_are_rendered_and_tool_calls_parsed(tiny_qwen2, tmp_path, monkeypatch):
    from alignloop.engine.api import Completion

    model, tokenizer = tiny_qwen2
    tokenizer = copy.copy(tokenizer)
    # A template that offers tools the way Qwen2.5's does (the tiny presets carry SmolLM2's, which has none).
    tokenizer.chat_template = (
        "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
        "\n</tools><|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    engine = Engine(model, tokenizer, dtype="float32", max_batch=2, show_progress=False)
    recipe = ServeRecipe.model_validate({"serve": {"store": str(tmp_path / "t.db"), "api_keys": ["static-key"],
                                                   "context": 512},
                                         "models": [{"version": "q", "model": "tiny-qwen2"}]})
    backend = ModelBackend("q", engine, context=512, threads=1, family="qwen2.5")
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}}]
    assert "get_weather" in engine.tokenizer.decode(backend.encode(MESSAGES, tools))
    written = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": "2"}}\n</tool_call>'

    async def fake_generate(prompt, params, on_token=None):
        return Completion(list(prompt), [1, 2, 3], [-0.1, -0.2, -0.3], written, "stop", 2)

    monkeypatch.setattr(backend, "generate", fake_generate)
    with TestClient(create_app(recipe, backends={"q": backend})) as client:
        r = client.post("/v1/chat/completions", headers=H, json={"messages": MESSAGES, "tools": tools})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris", "days": 2}


def test_tools_on_a_model_without_a_tool_format_are_a_clear_400(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    r = client.post("/v1/chat/completions", headers=H, json={"messages": MESSAGES, "tools": tools})
    assert r.status_code == 400 and "tool-call format" in r.json()["detail"]


def test_simulated_users_keep_long_conversations_within_the_context(engine, tmp_path):
    import numpy as np

    from alignloop.serve.run import InThread
    from alignloop.serve.simclient import ServerResponder
    from alignloop.sim.responder import Context

    recipe = ServeRecipe.model_validate({"serve": {"store": str(tmp_path / "c.db"), "api_keys": ["static-key"],
                                                   "context": 96}, "models": [{"version": "v1"}],
                                         "generation": {"max_tokens": 4}})
    app = create_app(recipe, backends={"v1": ModelBackend("v1", engine, context=96, threads=1)})
    with InThread(app) as served:
        long_history = [[{"role": "user", "content": f"message {i} " * 6}, {"role": "assistant", "content": "ok " * 6}]
                        for i in range(8)]
        ctx = Context(characters=np.array([0, 1]), user_pieces=np.full((2, 1), -1), user_words=np.full((2, 1), -1),
                      previous=np.full(2, -1), user_texts=["and now?", "hi"],
                      history=[[m for pair in long_history for m in pair], []])
        responder = ServerResponder(served.url, "static-key", "v1", max_tokens=4)
        texts = responder.respond(ctx, np.random.default_rng(0)).text_list()
        responder.close()
        assert len(texts) == 2 and responder.requests == 2
