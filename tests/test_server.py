"""The server backend (issue 25 section 3): rendered prompts sent to an OpenAI-compatible server.

Against a real server started here on 127.0.0.1 (``transformers serve``, ``pip install
"transformers[serving]"``) serving the built-in SmolLM2: ``ctxaware nih`` and ``ctxaware eval squad`` give
the same outputs through ``--backend server`` as through the in-process engine, on 20 NIH prompts and 20
SQuAD questions. The transport rules (retry on 429/5xx, a 4xx fails at once with the server's message,
no redirect followed, a prompt-token count that differs is an error) against a stdlib server that
misbehaves on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ctxaware.core.errors import CtxawareError
from ctxaware.rendering.chat import render
from ctxaware.rendering.server import BackendOptions, ServerBackend, text_prompt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- a server that misbehaves


class _Scripted(BaseHTTPRequestHandler):
    """Replies from ``server.script`` in order: (status, body dict, headers)."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, body, self.headers.get("Authorization")))
        status, reply, headers = self.server.script.pop(0)
        data = json.dumps(reply).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture()
def scripted():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    httpd.script, httpd.seen = [], []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _ok(text: str, n_prompt: int, finish: str = "length") -> tuple:
    return (
        200,
        {"choices": [{"text": text, "finish_reason": finish}], "usage": {"prompt_tokens": n_prompt}},
        {},
    )


def test_retries_then_succeeds_and_a_4xx_fails_at_once(scripted, smollm2_tok):
    httpd, url = scripted
    ids = render([{"role": "user", "content": "Hi"}], smollm2_tok, "chat").input_ids
    httpd.script = [(503, {"detail": "busy"}, {}), (429, {}, {}), _ok(" Hello. More", len(ids))]
    backend = ServerBackend(url, "m", concurrency=1, prompt_format="ids", api_key="k", backoff=0.01)
    (g,) = backend.generate(smollm2_tok, [ids], max_new_tokens=5, stop=["."], progress=False)
    assert (g.text, g.stop_reason, g.n_prompt_tokens) == (" Hello", "stop", len(ids))  # cut as in-process
    path, body, auth = httpd.seen[-1]
    assert path == "/v1/completions" and body["prompt"] == list(ids) and body["temperature"] == 0.0
    assert body["max_tokens"] == 5 and "stop" not in body and auth == "Bearer k" and len(httpd.seen) == 3
    httpd.script = [(401, {"detail": "bad key"}, {})]
    with pytest.raises(CtxawareError, match="refused the request: HTTP 401 .*bad key"):
        backend.generate(smollm2_tok, [ids], max_new_tokens=5, progress=False)
    assert len(httpd.seen) == 4  # no retry of a 4xx


def test_redirect_not_followed_and_token_count_checked(scripted, smollm2_tok):
    httpd, url = scripted
    ids = render([{"role": "user", "content": "Hi"}], smollm2_tok, "chat").input_ids
    httpd.script = [(307, {}, {"Location": "http://evil.example/v1/completions"})]
    backend = ServerBackend(url, "m", prompt_format="ids", api_key="secret")
    with pytest.raises(CtxawareError, match="redirect to http://evil.example.*not followed"):
        backend.generate(smollm2_tok, [ids], max_new_tokens=5, progress=False)
    httpd.script = [_ok("x", len(ids) + 1)]  # the server read another prompt
    with pytest.raises(
        CtxawareError, match=f"counted {len(ids) + 1} prompt tokens where ctxaware rendered {len(ids)}"
    ):
        backend.generate(smollm2_tok, [ids], max_new_tokens=5, progress=False)


def test_text_prompts_tokenize_back_to_the_rendered_ids(smollm2_tok):
    """A server that takes text gets a text whose tokenisation (special tokens included, as a server
    tokenises) is exactly the rendered ids; Gemma's BOS is left to the tokenizer to add."""
    from ctxaware.core.models import load_tokenizer
    from ctxaware.training.sft import ZEPHYR_TEMPLATE

    gemma = load_tokenizer("gemma3-270m")
    gemma.chat_template = ZEPHYR_TEMPLATE  # the base has none; the experiment trains and evaluates with this
    for tok in (smollm2_tok, gemma):
        for mode in ("chat", "plain"):
            r = render([{"role": "user", "content": "Where is  the  needle?\n\nA:"}], tok, mode)
            assert tok(text_prompt(tok, r.input_ids)).input_ids == list(r.input_ids)


def test_backend_options_are_checked_before_anything_runs(tmp_path):
    from ctxaware.evaluation.nih import NIHConfig, check

    with pytest.raises(CtxawareError, match="--base-url None is not an http"):
        BackendOptions(backend="server").server("m")
    with pytest.raises(CtxawareError, match="--steer .* needs --backend hf"):
        check(
            NIHConfig(
                backend="server", base_url="http://127.0.0.1:1", steer="all", output=str(tmp_path / "o")
            )
        )
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    """``transformers serve`` on the built-in SmolLM2 (its safetensors cache), on a free loopback port."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    exe = shutil.which("transformers")
    if exe is None:
        pytest.skip("the transformers CLI is not installed")
    model_dir = smollm2[1].name_or_path
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([exe, "serve", model_dir, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # at most 120 s to start
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("transformers serve did not start in 120 s")
        yield url, model_dir
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ctxaware(*argv: str) -> None:
    from ctxaware.cli import main

    assert main(list(argv)) == 0


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_nih_and_squad_through_the_server_equal_the_in_process_engine(served, tmp_path, shared_data):
    url, model_dir = served
    server = ["--backend", "server", "--base-url", url, "--served-model", model_dir]
    nih = ["nih", "--model", "default", "--lengths", "200,300", "--depths", "0,25,50,75,100", "--modes", "chat,plain",
           "--prefix", "true", "--haystack", "synthetic", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    _ctxaware(*nih, "--output", str(tmp_path / "nih_hf"))
    _ctxaware(*nih, *server, "--concurrency", "2", "--output", str(tmp_path / "nih_server"))
    (hf_rows,) = list((tmp_path / "nih_hf").glob("*/rows.jsonl"))
    (sv_rows,) = list((tmp_path / "nih_server").glob("*/rows.jsonl"))
    key = lambda r: (r["condition"], r["length"], r["depth"])  # noqa: E731
    hf, sv = {key(r): r for r in _rows(hf_rows)}, {key(r): r for r in _rows(sv_rows)}
    assert len(hf) == len(sv) == 20 and hf.keys() == sv.keys()
    for k in hf:
        assert sv[k]["output"] == hf[k]["output"], k  # the same greedy continuation, token for token
        assert (sv[k]["n_prompt_tokens"], sv[k]["recall"]) == (hf[k]["n_prompt_tokens"], hf[k]["recall"])
        assert sv[k]["attention"] is None and "server" in sv[k]["attention_not_measured"]
    assert any(r["recall"] > 0 for r in hf.values())  # not 20 empty answers agreeing
    squad = ["eval", "squad", "--model", "default", "--modes", "chat", "--limit", "20", "--device", "cpu",
             "--dtype", "float32"]  # fmt: skip
    _ctxaware(*squad, "--output", str(tmp_path / "qa_hf"))
    _ctxaware(*squad, *server, "--output", str(tmp_path / "qa_server"))
    (hf_qa,) = list((tmp_path / "qa_hf").rglob("rows.jsonl"))
    (sv_qa,) = list((tmp_path / "qa_server").rglob("rows.jsonl"))
    hq, sq = {r["id"]: r for r in _rows(hf_qa)}, {r["id"]: r for r in _rows(sv_qa)}
    assert len(hq) == len(sq) == 20 and hq.keys() == sq.keys()
    for i in hq:
        assert (sq[i]["prompt"], sq[i]["output"], sq[i]["scores"]) == (
            hq[i]["prompt"],
            hq[i]["output"],
            hq[i]["scores"],
        ), i
    meta = json.loads((sv_qa.parent / "meta.json").read_text())
    assert meta["provenance"]["backend"] == "server" and meta["provenance"]["served_model"] == model_dir
