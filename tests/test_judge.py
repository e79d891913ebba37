"""The HTTP judge against a stub OpenAI-compatible server on 127.0.0.1: the right prompt goes out, [[n]]
ratings come back, failures are retried and then recorded per example."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ctxaware.evaluation.judge import (
    HTTPJudge,
    JudgeError,
    build_judge_prompt,
    extract_rating,
    judge_items,
    load_judge_prompts,
)


class Loopback:
    """A threaded HTTP server on 127.0.0.1 (a free port) serving ``handler``; ``url`` ends with ``/v1``."""

    def serve(self, handler) -> None:
        handler.log_message = lambda *a: None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Stub(Loopback):
    """A tiny chat-completions server: records requests, answers with ``reply`` or fails ``fail`` times."""

    def __init__(self, reply="Good answer. Rating: [[7]]", fail=0, status=500):
        self.requests, self.reply, self.fail, self.status = [], reply, fail, status
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                if stub.fail > 0:
                    stub.fail -= 1
                    self.send_response(stub.status)
                    self.end_headers()
                    return
                out = json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": stub.reply}}]}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.serve(Handler)


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def test_extract_rating():
    assert extract_rating("blah [[8]] done") == 8.0
    assert extract_rating("Rating: [[7.5]]") == 7.5
    assert extract_rating("only single [6]") == 6.0  # FastChat's fallback
    assert extract_rating("no rating here") is None


def test_judge_prompt_from_shared_file(shared_data):
    prompts = load_judge_prompts(shared_data / "general" / "mt_bench_judge_prompts.jsonl")
    name, system, user = build_judge_prompt(prompts, ["Q1?", "Q2?"], ["A1", "A2"], [], "writing", 1)
    assert name == "single-v1" and "[[rating]]" in user
    assert "[Question]\nQ1?" in user and "A1" in user and "Q2?" not in user
    name, _, user = build_judge_prompt(prompts, ["Q1?", "Q2?"], ["A1", "A2"], ["R1", "R2"], "math", 2)
    assert name == "single-math-v1-multi-turn" and "R2" in user and "Q2?" in user and "A2" in user


def test_stub_server_gets_the_prompt_and_rating_is_parsed(stub, shared_data, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-test")
    prompts = load_judge_prompts(shared_data / "general" / "mt_bench_judge_prompts.jsonl")
    name, system, user = build_judge_prompt(
        prompts, ["Write a haiku.", "Shorter."], ["A1", "A2"], [], "writing", 1
    )
    judge = HTTPJudge(stub.url, model="judge-x", api_key_env="STUB_KEY", backoff=0)
    out = judge_items(judge, [{"system": system, "user": user}])
    assert out == [{"judgment": "Good answer. Rating: [[7]]", "rating": 7.0, "error": None}]
    req = stub.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-x" and req["body"]["temperature"] == 0
    assert req["body"]["messages"] == [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ]


def test_retries_then_success(stub):
    stub.fail = 2
    judge = HTTPJudge(stub.url, retries=3, backoff=0)
    assert extract_rating(judge.complete("s", "u")) == 7.0 and len(stub.requests) == 3


def test_failure_is_recorded_per_example(stub):
    stub.fail = 100
    judge = HTTPJudge(stub.url, retries=2, backoff=0)
    with pytest.raises(JudgeError, match="HTTP 500"):
        judge.complete("s", "u")
    out = judge_items(judge, [{"system": "s", "user": "u"}])
    assert out[0]["rating"] is None and "after 3 attempt" in out[0]["error"]


def test_unreachable_endpoint_times_out_cleanly():
    judge = HTTPJudge("http://127.0.0.1:9", retries=1, backoff=0, timeout=1)
    assert judge_items(judge, [{"system": "s", "user": "u"}])[0]["error"]


def test_unset_key_warns_at_start(stub, monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    HTTPJudge(stub.url, api_key_env="NO_SUCH_JUDGE_KEY")
    err = capsys.readouterr().err
    assert "$NO_SUCH_JUDGE_KEY is not set" in err and stub.requests == []
    monkeypatch.setenv("NO_SUCH_JUDGE_KEY", "sk-x")
    HTTPJudge(stub.url, api_key_env="NO_SUCH_JUDGE_KEY")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("failure", ["401", pytest.param("unreachable", marks=pytest.mark.slow)])
def test_failed_judgment_is_not_a_finished_row_and_the_rerun_judges_it(
    failure, stub, tiny_model_dir, shared_data, tmp_path, monkeypatch, capsys
):
    """A 401 or an unreachable judge: exit 1, the count on stderr, no row; after the fix the rerun sends
    the judge requests and writes the rows."""
    import socket

    from ctxaware.cli import main
    from ctxaware.core.results import read_jsonl

    monkeypatch.setenv("STUB_KEY", "sk-test")
    if failure == "401":
        stub.fail, stub.status, url = 100, 401, stub.url
    else:
        with socket.socket() as s:  # a port that nothing listens on
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    out = tmp_path / "eval"
    argv = ["eval", "mt_bench", "--model", str(tiny_model_dir), "--modes", "chat", "--limit", "2",
            "--mt-bench-max-new-tokens", "2", "--judge", "http", "--judge-api-key-env", "STUB_KEY",
            "--judge-retries", "0", "--data-dir", str(shared_data), "--output", str(out)]  # fmt: skip
    assert main([*argv, "--judge-url", url]) == 1
    err = capsys.readouterr().err
    assert "2 unit(s) NOT finished and left for the next run" in err
    assert ("HTTP 401" in err) == (failure == "401")
    rows = [r for f in out.rglob("rows.jsonl") for r in read_jsonl(f)]
    assert rows == []  # a failed judgment is never a finished row
    n_before = len(stub.requests)
    stub.fail = 0
    assert main([*argv, "--judge-url", stub.url]) == 0
    assert len(stub.requests) - n_before == 4  # 2 examples x 2 turns judged on the rerun
    rows = [r for f in out.rglob("rows.jsonl") for r in read_jsonl(f)]
    assert len(rows) == 2 and all(r["scores"]["rating"] == 7.0 for r in rows)


class Raw(Loopback):
    """A loopback server that answers every POST with ``(status, headers, body bytes)`` and records what it
    receives, GETs included."""

    def __init__(self, status=200, headers=None, body=b""):
        self.status, self.headers, self.body, self.seen = status, headers or {}, body, []
        raw = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw.seen.append({"method": self.command, "auth": self.headers.get("Authorization"),
                                 "body": self.rfile.read(n) if n else b""})  # fmt: skip
                self.send_response(raw.status)
                for k, v in raw.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(raw.body)))
                self.end_headers()
                self.wfile.write(raw.body)

            do_POST = do_GET = _answer

        self.serve(Handler)


def _reply(content) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


def test_a_redirect_is_not_followed_and_the_key_stays_home(monkeypatch):
    """Issue 23 §2: a 302 to another server is a failed call; that server never sees the key (nor anything)."""
    other = Raw(body=_reply("Rating: [[7]]"))
    first = Raw(status=302, headers={"Location": other.url + "/chat/completions"})
    try:
        monkeypatch.setenv("CTXAWARE_TEST_KEY", "sk-secret")
        judge = HTTPJudge(first.url, api_key_env="CTXAWARE_TEST_KEY", retries=2, backoff=0)
        out = judge_items(judge, [{"system": "s", "user": "u"}])
        assert out[0]["rating"] is None and "302" in out[0]["error"] and "not followed" in out[0]["error"]
        assert other.seen == []  # nothing reached the redirect target
        assert len(first.seen) == 1 and first.seen[0]["auth"] == "Bearer sk-secret"  # no retry of a 3xx
    finally:
        other.close()
        first.close()


@pytest.mark.parametrize(
    "body, why",
    [(_reply(None), "content is NoneType"), (_reply(["x"]), "content is list"),
     (b'{"choices": [{"message": {"content": "\xff\xfe [[7]]"}}]}', "not UTF-8"),
     (_reply("A fine answer, no rating."), "no [[rating]]")],
)  # fmt: skip
def test_a_reply_that_is_not_a_judgment_fails_and_is_retried(body, why):
    srv = Raw(body=body)
    try:
        judge = HTTPJudge(srv.url, retries=1, backoff=0)
        out = judge_items(judge, [{"system": "s", "user": "u"}])
        assert out[0]["rating"] is None and why in out[0]["error"] and len(srv.seen) == 2
    finally:
        srv.close()


def test_turn_two_is_not_sent_after_turn_one_failed():
    srv = Raw(status=500)
    try:
        judge = HTTPJudge(srv.url, retries=0, backoff=0)
        items = [{"system": "s", "user": f"u{t}", "example": "q1"} for t in (1, 2)]
        out = judge_items(judge, items)
        assert len(srv.seen) == 1 and "not sent" in out[1]["error"]
    finally:
        srv.close()


@pytest.mark.parametrize("url", ["ftp://example.org/v1", "localhost:8000", "http://", ""])
def test_judge_url_is_checked_before_any_model_loads(url, monkeypatch, capsys):
    import ctxaware.core.models
    from ctxaware.cli import main

    monkeypatch.setattr(ctxaware.core.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["eval", "mt_bench", "--judge", "http", "--judge-url", url, "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--judge-url" in err and len(err.splitlines()) == 1
