"""Offline evaluation: rule metrics on known texts, judge prompts and score parsing (property-tested)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from alignloop.eval.judge import DIMENSIONS, judge_prompt, parse_score, rubric_eval
from alignloop.eval.rules import distinct_n, repetition_across, repetition_within, rule_metrics


def test_rule_metrics_on_known_texts():
    texts = ["Hello there! How are you? 😊", "*smiles* I love pizza and pasta.", "You are stupid."]
    m = rule_metrics(texts)
    assert m.n == 3
    assert m.question_rate == pytest.approx(1 / 3)
    assert m.emoji_rate == pytest.approx(1 / 3)
    assert m.gesture_rate == pytest.approx(1 / 3)
    assert m.unsafe_rate == pytest.approx(1 / 3)
    assert m.mean_words == pytest.approx((5 + 6 + 3) / 3)


def test_repetition_and_distinct():
    assert repetition_within("a b c a b c") == pytest.approx(1 / 4)   # grams abc bca cab abc
    assert repetition_within("one two three four") == 0.0
    assert repetition_across("we went to the sea", ["then we went to the park"]) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "a b"], 2) == 0.5
    assert distinct_n([""], 1) == 0.0
    with pytest.raises(ValueError):
        rule_metrics([])


@given(st.integers(1, 5), st.text(max_size=40).filter(lambda s: not any(c.isdigit() for c in s)))
def test_parse_score_reads_the_declared_score(score, noise):
    assert parse_score(f"{noise} Score: {score}") == score
    assert parse_score(f"**Score:** {score}\n{noise}") == score


@given(st.text(alphabet=st.characters(blacklist_categories=("Nd",)), max_size=60))
def test_parse_score_never_invents_a_score(text):
    assert parse_score(text) is None


def test_parse_score_ignores_other_numbers():
    assert parse_score("I would say 10 out of 10") is None
    assert parse_score("3.5") is None
    assert parse_score("4") == 4


def test_judge_prompt_names_the_dimension_and_shows_the_reply():
    conv = [{"role": "system", "content": "You are Mira."}, {"role": "user", "content": "hi"}]
    for name in DIMENSIONS:
        text = judge_prompt(name, conv, "hello!")[0]["content"]
        assert name.replace("_", " ") in text and "hello!" in text and "Mira" in text and "Score: N" in text


class _FakeEngine:
    """Answers each judge prompt with a score derived from the reply's length: parsing must keep order."""

    def chat(self, prompts, params):
        from types import SimpleNamespace

        replies = [p[0]["content"].split("Reply to grade:\n")[1].split("\n\nAnswer")[0] for p in prompts]
        return [SimpleNamespace(text=f"Score: {min(5, len(r.split()))}") for r in replies]


def test_rubric_eval_keeps_responses_and_dimensions_apart():
    conv = [{"role": "user", "content": "hi"}]
    result = rubric_eval(_FakeEngine(), [conv, conv], ["one", "one two three"], dimensions=["responsiveness"])
    assert result.scores["responsiveness"] == [1, 3]
    summary = result.summary()["responsiveness"]
    assert summary["n"] == 2 and summary["unparsed_rate"] == 0.0
    with pytest.raises(ValueError):
        rubric_eval(_FakeEngine(), [conv], ["x"], dimensions=["charisma"])


# --- a judge behind an OpenAI-compatible endpoint ----------------------------------------------


class _Stub:
    """A local /v1/chat/completions server answering from a list of canned replies, in turn."""

    def __init__(self, replies, fail_first: int = 0, status: int = 200):
        import itertools
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[dict] = []
        self.headers: list[dict] = []
        lock = threading.Lock()
        cycle = itertools.cycle(replies)
        failures = [fail_first]
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def do_POST(self):
                import json

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    stub.requests.append(body)
                    stub.headers.append(dict(self.headers))
                    if self.path != "/v1/chat/completions":
                        code, payload = 404, {"error": "not found"}
                    elif failures[0] > 0:
                        failures[0] -= 1
                        code, payload = 503, {"error": "busy"}
                    elif status != 200:
                        code, payload = status, {"error": "nope"}
                    else:
                        code = 200
                        payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": next(cycle)}}]}
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_endpoint_judge_scores_through_chat_completions(monkeypatch):
    from alignloop.eval.judge import EndpointJudge, judge_report

    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test")
    conv = [{"role": "user", "content": "hi"}]
    with _Stub(["Score: 4", "**Score:** 2", "Score: 5"]) as stub:
        judge = EndpointJudge(stub.base_url, "judge-large", api_key_env="JUDGE_TEST_KEY", concurrency=1)
        result = rubric_eval(judge, [conv] * 3, ["a", "b", "c"], dimensions=["responsiveness"])
    assert result.scores["responsiveness"] == [4, 2, 5]
    assert stub.requests[0]["model"] == "judge-large" and stub.requests[0]["temperature"] == 0.0
    assert stub.requests[0]["messages"][0]["role"] == "user" and "Score: N" in stub.requests[0]["messages"][0]["content"]
    assert stub.headers[0]["Authorization"] == "Bearer sk-test"
    report = judge_report(result, "judge-large", 0.8)
    assert report["available"] and report["parsed"] == 3 and report["n"] == 3
    assert report["scores"]["responsiveness"]["mean"] == pytest.approx(11 / 3)


def test_a_judge_that_rarely_answers_with_a_score_is_reported_unavailable():
    from alignloop.eval.judge import EndpointJudge, judge_report

    conv = [{"role": "user", "content": "hi"}]
    canned = ["I think this reply is nice!", "Score: 3", "", "The user said hi.", "ten out of ten", "10/10"]
    with _Stub(canned) as stub:
        judge = EndpointJudge(stub.base_url.removesuffix("/v1"), "tiny-judge", concurrency=1)
        result = rubric_eval(judge, [conv] * 6, list("abcdef"), dimensions=["responsiveness"])
    assert "Authorization" not in stub.headers[0]
    assert result.parsed() == (1, 6)
    report = judge_report(result, "tiny-judge", 0.5)
    assert not report["available"] and report["scores"] is None
    assert report["message"].startswith("judge unavailable: parsed 1 of 6")
    assert report["parse_rate"] == pytest.approx(1 / 6)


def test_endpoint_judge_retries_busy_servers_and_names_the_url_on_errors(monkeypatch):
    from alignloop.errors import AlignloopError
    from alignloop.eval.judge import EndpointJudge

    conv = [{"role": "user", "content": "hi"}]
    with _Stub(["Score: 1"], fail_first=1) as stub:
        judge = EndpointJudge(stub.base_url, "m", concurrency=1, retries=2)
        assert rubric_eval(judge, [conv], ["x"], dimensions=["repetition"]).scores["repetition"] == [1]
    with _Stub(["Score: 1"], status=401) as stub:
        judge = EndpointJudge(stub.base_url, "m", retries=0)
        with pytest.raises(AlignloopError, match=r"HTTP 401"):
            rubric_eval(judge, [conv], ["x"], dimensions=["repetition"])
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(AlignloopError, match="NO_SUCH_JUDGE_KEY"):
        EndpointJudge("http://127.0.0.1:9/v1", "m", api_key_env="NO_SUCH_JUDGE_KEY")
    with pytest.raises(AlignloopError, match="did not answer"):
        rubric_eval(EndpointJudge("http://127.0.0.1:9/v1", "m", timeout_s=2, retries=0), [conv], ["x"],
                    dimensions=["repetition"])


def test_judge_endpoint_config_is_strict():
    from pydantic import ValidationError

    from alignloop.eval.config import OfflineEvalSection

    ok = OfflineEvalSection.model_validate(
        {"judge": True, "judge_endpoint": {"base_url": "http://localhost:8000/v1", "model": "qwen", "api_key_env": "K"}})
    assert ok.judge_endpoint.model == "qwen" and ok.judge_min_parse_rate == 0.8
    for bad in ({"judge_endpoint": {"base_url": "http://x/v1", "model": "m", "api_key": "sk-123"}},
                {"judge_endpoint": {"base_url": "localhost:8000", "model": "m"}},
                {"judge_model": "smollm2-135m", "judge_endpoint": {"base_url": "http://x/v1", "model": "m"}}):
        with pytest.raises(ValidationError):
            OfflineEvalSection.model_validate(bad)


def test_offline_eval_reports_an_unparsing_judge_as_unavailable(tmp_path):
    """The flywheel's offline evaluation with a judge that answers in prose: no scores, one line why."""
    from alignloop.eval.config import OfflineEvalSection
    from alignloop.eval.offline import run_offline_eval
    from alignloop.sections import RunSection

    with _Stub(["What a lovely reply.", "Score: 4", "Hmm.", "I like it", "", "nice"]) as stub:
        section = OfflineEvalSection.model_validate({
            "users": {"users": 2}, "sampling": {"max_tokens": 4}, "judge": True, "judge_prompts": 2,
            "judge_endpoint": {"base_url": stub.base_url, "model": "stub", "concurrency": 1}})
        out = run_offline_eval(section, RunSection(dir=str(tmp_path), name="j"), "tiny", "tiny")
    for name in ("deployed", "new"):
        status = out[name]["judge_status"]
        assert "judge" not in out[name] and not status["available"]
        assert status["n"] == 2 * 7 and status["message"].startswith(f"judge unavailable: parsed {status['parsed']} of 14")
