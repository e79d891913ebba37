"""Generation on a serving engine: any OpenAI-compatible ``/v1/completions`` server (vLLM, SGLang, TGI,
llama.cpp's server, ``transformers serve``), as a backend of the one generation engine.

The prompt sent is exactly what `ctxaware.rendering.chat.render` produced, never re-templated by the
server: its token ids where the server takes ids (vLLM, SGLang: ``prompt: [ids]``), else its text, chosen
so that the server's own tokenisation gives back the same ids (checked here before anything is sent; a
prompt whose text does not survive re-tokenisation is an error that says to use a server taking ids).
After each reply the server's ``usage.prompt_tokens`` must equal ctxaware's count: a mismatch is an error,
not a warning, since the model would have read another prompt.

Greedy decoding (``temperature: 0``), the same ``max_tokens`` as the in-process engine, and its stop
strings applied here (the text is cut at the first one, exactly as in-process; they are not sent, so a
reply's end of sequence and a stop string stay apart in ``stop_reason``); ``concurrency`` requests in flight; 429, 5xx and
network errors are retried with exponential backoff, another 4xx fails at once with the server's message.
Each reply reaches ``callback`` as it arrives, so a caller that writes rows resumes after a kill.
"""

from __future__ import annotations

import dataclasses
import os
import time
import urllib.error
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Literal

from tqdm.auto import tqdm

from ctxaware.core.errors import CtxawareError
from ctxaware.core.http import check_url, http_error_text, post_json
from ctxaware.rendering.chat import Rendered
from ctxaware.rendering.generate import Generation, cut_at_stop

RETRY_CODES = {408, 429, 500, 502, 503, 504}


@dataclasses.dataclass
class BackendOptions:
    """The generation backend of a command that generates (``nih``, ``eval``): fields inherited by its
    config. ``hf`` is the in-process engine (the default); ``server`` sends the rendered prompts to an
    OpenAI-compatible server."""

    backend: Literal["hf", "server"] = dataclasses.field(
        default="hf", metadata={"help": "hf (in-process, the default) or server (an OpenAI-compatible URL)"}
    )
    base_url: str | None = dataclasses.field(
        default=None, metadata={"help": "with --backend server: the server's URL, e.g. http://127.0.0.1:8000"}
    )
    served_model: str | None = dataclasses.field(
        default=None,
        metadata={"help": "with --backend server: the model name the server serves (default: --model)"},
    )
    concurrency: int = dataclasses.field(
        default=8, metadata={"help": "with --backend server: requests in flight", "min": 1}
    )
    prompt_format: Literal["auto", "ids", "text"] = dataclasses.field(
        default="auto", metadata={"help": "send token ids (vLLM, SGLang), text, or auto (ids, else text)"}
    )
    api_key_env: str | None = dataclasses.field(
        default=None, metadata={"help": "environment variable holding the server's API key (none: no key)"}
    )

    def server(self, model_name: str) -> ServerBackend | None:
        """The `ServerBackend` these options ask for (``None`` for ``hf``); its URL is checked here."""
        if self.backend != "server":
            return None
        check_url(self.base_url, "--base-url", "http://127.0.0.1:8000 (with --backend server)")
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return ServerBackend(self.base_url, self.served_model or model_name, self.concurrency, self.prompt_format,
                             api_key=key or None)  # fmt: skip


def text_prompt(tokenizer, ids: Sequence[int]) -> str:
    """The text whose tokenisation by ``tokenizer`` (with its special tokens, as a server tokenises a
    completion prompt) is exactly ``ids``; a leading BOS is left for the tokeniser to add."""
    ids = list(ids)
    candidates = [ids]
    if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id:
        candidates.insert(0, ids[1:])
    for part in candidates:
        text = tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if tokenizer(text).input_ids == ids:
            return text
    raise CtxawareError(
        "a rendered prompt does not survive re-tokenisation as text, so a server taking text would read "
        "another prompt; use a server that takes token ids (vLLM, SGLang) with --prompt-format ids"
    )


class ServerBackend:
    """Greedy completions of rendered prompts from an OpenAI-compatible ``/v1/completions`` endpoint."""

    def __init__(
        self,
        base_url: str,
        served_model: str,
        concurrency: int = 8,
        prompt_format: str = "auto",
        api_key: str | None = None,
        timeout: float = 600.0,
        retries: int = 5,
        backoff: float = 0.5,
    ) -> None:
        root = base_url.rstrip("/")
        self.url = root + ("/completions" if root.endswith("/v1") else "/v1/completions")
        self.model, self.concurrency, self.format = served_model, concurrency, prompt_format
        self.api_key, self.timeout, self.retries, self.backoff = api_key, timeout, retries, backoff

    def about(self) -> dict:
        return {"backend": "server", "url": self.url, "served_model": self.model}

    def _post(self, prompt: list[int] | str, max_new_tokens: int) -> dict:
        # no "stop" in the request: the text is cut here, as the in-process engine cuts it, and a reply's
        # finish_reason "stop" then means end of sequence only (OpenAI's "stop" covers both)
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0.0}
        error = ""
        for attempt in range(self.retries + 1):
            try:
                return post_json(self.url, body, self.api_key, self.timeout)
            except urllib.error.HTTPError as e:
                error = http_error_text(e, self.url)
                if e.code not in RETRY_CODES:
                    raise _Refused(e.code, error) from None
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except ValueError as e:  # not JSON / not UTF-8
                error = f"malformed reply ({e})"
            if attempt < self.retries:
                time.sleep(min(8.0, self.backoff * 2**attempt))
        raise CtxawareError(f"server {self.url} failed after {self.retries + 1} attempt(s): {error}; is it "
                            "running and serving --served-model?")  # fmt: skip

    def _one(self, tokenizer, ids: list[int], max_new_tokens: int, stop: Sequence[str]) -> Generation:
        if self.format in ("auto", "ids"):
            try:
                reply = self._post(ids, max_new_tokens)
            except _Refused as e:
                if self.format == "ids" or e.code not in (400, 422):
                    raise CtxawareError(f"server {self.url} refused the request: {e.text}") from None
                self.format = "text"  # the server takes text prompts only (e.g. transformers serve)
        if self.format == "text":
            try:
                reply = self._post(text_prompt(tokenizer, ids), max_new_tokens)
            except _Refused as e:
                raise CtxawareError(f"server {self.url} refused the request: {e.text}") from None
        try:
            choice, usage = reply["choices"][0], reply.get("usage") or {}
            text = choice["text"]
        except (KeyError, IndexError, TypeError):
            raise CtxawareError(
                f"server {self.url} sent a reply without choices[0].text: {str(reply)[:200]}"
            ) from None
        counted = usage.get("prompt_tokens")
        if counted is not None and counted != len(ids):
            raise CtxawareError(
                f"server {self.url} counted {counted} prompt tokens where ctxaware rendered {len(ids)}: it read "
                "another prompt (another tokenizer or a server-side template); serve the same model as --model, "
                "or use --prompt-format ids with a server that takes token ids"
            )
        text, stopped = cut_at_stop(text, stop)
        reason = "stop" if stopped else "length" if choice.get("finish_reason") == "length" else "eos"
        return Generation(text, tokenizer.encode(text, add_special_tokens=False), len(ids), reason)

    def generate(
        self,
        tokenizer,
        prompts: Sequence[Rendered | Sequence[int]],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        progress: bool = True,
        desc: str = "generating",
        callback: Callable[[list[int], list[Generation]], None] | None = None,
    ) -> list[Generation]:
        """Completions of ``prompts`` in input order; ``callback([i], [generation])`` as each arrives."""
        seqs = [list(p.input_ids) if isinstance(p, Rendered) else list(p) for p in prompts]
        if self.format == "text":  # every prompt checked before the first request
            for s in seqs:
                text_prompt(tokenizer, s)
        out: list[Generation | None] = [None] * len(seqs)
        bar = tqdm(total=len(seqs), desc=desc, disable=not progress, leave=False)
        with ThreadPoolExecutor(self.concurrency) as pool:
            pending = {pool.submit(self._one, tokenizer, seqs[0], max_new_tokens, stop): 0} if seqs else {}
            if pending:  # the first request alone: it settles the prompt format for the rest
                wait(pending)
            nxt = 1
            while pending:
                while nxt < len(seqs) and len(pending) < self.concurrency:
                    pending[pool.submit(self._one, tokenizer, seqs[nxt], max_new_tokens, stop)] = nxt
                    nxt += 1
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    out[i] = fut.result()  # an error ends the run here; rows written so far stay
                    if callback is not None:
                        callback([i], [out[i]])  # type: ignore[list-item]
                    bar.update(1)
        bar.close()
        return out  # type: ignore[return-value]


class _Refused(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text
