"""Pluggable MT-Bench judges (paper Sec. 4.1.3, "General instruction-following benchmarks").

A judge is anything with ``name``, ``comparable`` and ``complete(system, user) -> str``:

- `HTTPJudge`: an OpenAI-compatible ``/chat/completions`` endpoint (stdlib ``urllib``), key read from an
  environment variable (a warning on stderr at start when it is unset), retried with exponential back-off;
  a request that still fails raises `JudgeError`. `run_mtbench` then writes no row for that example: it is
  left for the next run (`results.leave_for_next_run`), and the command reports the count and exits 1.
- `LocalJudge`: a local Hugging Face model through the shared generation engine. The offline default; its
  ratings are NOT comparable to GPT-4-judged MT-Bench numbers (``comparable = False``).

Prompts are MT-Bench's single-answer grading prompts (``single-v1``, ``single-math-v1`` and their
multi-turn versions, from the shared ``mt_bench_judge_prompts.jsonl``); the rating is the ``[[n]]`` in the
judgment, as FastChat extracts it. `run_mtbench` generates the two turns through `generate.generate` and
judges them.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ctxaware.core.config import default_data_dir
from ctxaware.core.errors import CtxawareError
from ctxaware.core.http import check_url, post_json
from ctxaware.core.results import leave_for_next_run, read_jsonl
from ctxaware.rendering.chat import render
from ctxaware.rendering.generate import generate
from ctxaware.rendering.indicator import append_indicator

NEED_REF = ("math", "reasoning", "coding")  # FastChat grades these against the reference answer
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


class JudgeError(Exception):
    """A judge call that failed after all retries; recorded per example, the run goes on."""


def extract_rating(judgment: str) -> float | None:
    """The ``[[n]]`` rating (FastChat's rule, with its single-bracket fallback); None when absent."""
    m = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    return float(m.group(1)) if m else None


def load_judge_prompts(path: str | Path) -> dict[str, dict]:
    """``name -> {system_prompt, prompt_template, ...}`` from the MT-Bench judge prompt JSONL."""
    p = Path(path)
    if not p.is_file():
        raise CtxawareError(
            f"judge prompt file {p} not found; pass --data-dir with general/mt_bench_judge_prompts.jsonl"
        )
    return {row["name"]: row for row in read_jsonl(p) if isinstance(row.get("name"), str)}


def build_judge_prompt(
    prompts: dict[str, dict],
    turns: list[str],
    answers: list[str],
    references: list[str],
    category: str,
    turn: int,
) -> tuple[str, str, str]:
    """``(prompt name, system, user)`` grading ``turn`` (1 or 2) of one MT-Bench conversation."""
    use_ref = category in NEED_REF and len(references) >= turn
    name = ("single-math-v1" if use_ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    fields = {"question": turns[0], "answer": answers[0], "question_1": turns[0], "answer_1": answers[0]}
    if turn == 2:
        fields |= {"question_2": turns[1], "answer_2": answers[1]}
    if use_ref:
        fields |= {
            "ref_answer_1": references[0],
            "ref_answer_2": references[1] if len(references) > 1 else "",
        }
    return name, p["system_prompt"], p["prompt_template"].format(**fields)


class JudgeReplyError(Exception):
    """A reply that arrived but is not a judgment (content null or not text, not UTF-8, no rating)."""


def check_judge_url(url: str | None) -> str:
    """``--judge-url`` must be an http(s) URL with a host; checked before any answer is generated."""
    return check_url(url, "--judge-url", "https://api.openai.com/v1")


class HTTPJudge:
    """An OpenAI-compatible chat endpoint as judge (``--judge-url``, key in ``$api_key_env``)."""

    comparable = True

    def __init__(
        self,
        url: str,
        model: str = "gpt-4",
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 2.0,
        max_tokens: int = 2048,
    ) -> None:
        self.url = (
            url.rstrip("/")
            if url.rstrip("/").endswith("/chat/completions")
            else url.rstrip("/") + "/chat/completions"
        )
        self.model, self.timeout, self.retries, self.backoff, self.max_tokens = (
            model,
            timeout,
            retries,
            backoff,
            max_tokens,
        )
        self.api_key = os.environ.get(api_key_env, "")
        self.name = f"http:{model}"
        if not self.api_key:
            print(f"ctxaware: warning: ${api_key_env} is not set; the judge at {self.url} gets no API key "
                  "and will likely refuse (HTTP 401)", file=sys.stderr)  # fmt: skip

    def _post(self, body: dict) -> dict:
        """One POST to exactly ``self.url`` (`ctxaware.core.http.post_json`: a redirect is never followed, so
        the key goes only to the URL the user gave)."""
        try:
            return post_json(self.url, body, self.api_key, self.timeout)
        except UnicodeDecodeError:
            raise JudgeReplyError("the reply is not UTF-8") from None

    def complete(self, system: str, user: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        error = ""
        for attempt in range(self.retries + 1):
            try:
                content = self._post(body)["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise JudgeReplyError(f"the reply's content is {type(content).__name__}, not text")
                if extract_rating(content) is None:
                    raise JudgeReplyError("the reply holds no [[rating]]")
                return content
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code} {e.reason}"
                if 300 <= e.code < 400:
                    error = f"HTTP {e.code} redirect to {e.headers.get('Location', '?')} (not followed: the key goes only to {self.url})"
                    break
                if e.code in (400, 401, 403, 404):
                    break  # a bad request or key does not get better by waiting
            except JudgeReplyError as e:
                error = str(e)
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                error = f"malformed response ({type(e).__name__}: {e})"
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise JudgeError(f"judge {self.url} failed after {attempt + 1} attempt(s): {error}")


class LocalJudge:
    """A local HF model as judge (offline); ratings are not comparable to GPT-4 judgments."""

    comparable = False

    def __init__(
        self, model, tokenizer, name: str = "local", max_new_tokens: int = 256, batch_size: int = 4
    ) -> None:
        self.model, self.tok, self.max_new_tokens, self.batch_size = (
            model,
            tokenizer,
            max_new_tokens,
            batch_size,
        )
        self.name = f"local:{name}"

    def complete(self, system: str, user: str) -> str:
        return self.complete_many([(system, user)])[0]

    def complete_many(self, pairs: list[tuple[str, str]]) -> list[str]:
        prompts = [
            render([{"role": "system", "content": s}, {"role": "user", "content": u}], self.tok, "chat")
            for s, u in pairs
        ]
        outs = generate(
            self.model,
            self.tok,
            prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            progress=False,
        )
        return [o.text for o in outs]


def judge_items(judge, items: list[dict]) -> list[dict]:
    """Judge ``items`` (each ``{system, user}``); returns ``{judgment, rating, error}`` per item, never raising
    for one failed example."""
    if isinstance(judge, LocalJudge):
        texts = judge.complete_many([(it["system"], it["user"]) for it in items])
        return [{"judgment": t, "rating": extract_rating(t), "error": None} for t in texts]
    out, failed = [], set()
    for it in items:
        example = it.get("example")
        if example is not None and example in failed:  # turn 1 failed: turn 2 is not sent
            out.append(
                {"judgment": None, "rating": None, "error": "not sent: an earlier turn's judgment failed"}
            )
            continue
        try:
            t = judge.complete(it["system"], it["user"])
            out.append({"judgment": t, "rating": extract_rating(t), "error": None})
        except JudgeError as e:
            out.append({"judgment": None, "rating": None, "error": str(e)})
            failed.add(example)
    return out


# --- MT-Bench: two-turn generation, then judging ---


def _reference_answers(data_dir: str | None) -> dict[str, list[str]]:
    """MT-Bench reference answers (GPT-4's, used by FastChat for math/reasoning/coding) by question id."""
    path = Path(data_dir or default_data_dir()) / "general" / "mt_bench_reference_answers.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for r in read_jsonl(path):  # a malformed line is skipped and said; a row without turns has no reference
        try:
            out[str(r["question_id"])] = r["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            continue
    return out


def _answers(model, tok, conversations, mode, prefix, desc: str, gen: dict) -> list[str]:
    """Greedy answers to the last user turn of each conversation, through the shared engine."""
    prompts = [render(c, tok, mode, response_prefix=prefix) for c in conversations]
    return [g.text.strip() for g in generate(model, tok, prompts, desc=desc, **gen)]


def run_mtbench(model, tok, todo, writer, cfg, mode, batch_context, judge) -> int:
    """Two-turn answers (turn 2 sees turn 1's answer), then one judgment per turn. An example whose judgment
    failed (after the judge's retries) is not a finished row: nothing is written for it, it is counted with
    `results.leave_for_next_run` and redone by the next run. Returns the number of such examples."""
    prompts = load_judge_prompts(
        Path(cfg.data_dir or default_data_dir()) / "general" / "mt_bench_judge_prompts.jsonl"
    )
    refs = _reference_answers(cfg.data_dir)
    prefix = cfg.plain_prefix if mode == "plain" else None
    gen = dict(
        max_new_tokens=cfg.mt_bench_max_new_tokens, batch_size=cfg.batch_size, batch_context=batch_context
    )
    chunk, failed = max(1, cfg.batch_size) * 2, 0
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        users = [
            [{"role": "user", "content": append_indicator(ex.turns[0]) if cfg.indicator else ex.turns[0]}]
            for ex in part
        ]
        a1 = _answers(model, tok, users, mode, prefix, "mt-bench turn 1", gen)
        conv2 = [
            u
            + [
                {"role": "assistant", "content": a or " "},
                {"role": "user", "content": append_indicator(ex.turns[1]) if cfg.indicator else ex.turns[1]},
            ]
            for u, a, ex in zip(users, a1, part)
        ]
        a2 = _answers(model, tok, conv2, mode, prefix, "mt-bench turn 2", gen)
        items = []
        for ex, x1, x2 in zip(part, a1, a2):
            ref = refs.get(ex.id, ex.references)
            for turn in (1, 2):
                name, system, user = build_judge_prompt(prompts, ex.turns, [x1, x2], ref, ex.category, turn)
                items.append({"name": name, "system": system, "user": user, "example": ex.id})
        verdicts = judge_items(judge, items)
        for i, (ex, x1, x2) in enumerate(zip(part, a1, a2)):
            v = verdicts[2 * i : 2 * i + 2]
            errors = [x["error"] for x in v if x["error"]]
            if errors:
                leave_for_next_run(f"MT-Bench judgment failed: {errors[0]}", ex.id)
                failed += 1
                continue
            ratings = [x["rating"] for x in v]
            ok = [r for r in ratings if r is not None]
            writer.write(
                {
                    "id": ex.id,
                    "task": "mt-bench",
                    "category": ex.category,
                    "turns": ex.turns,
                    "answers": [x1, x2],
                    "judge": {"name": judge.name, "comparable_to_gpt4": judge.comparable},
                    "judge_prompts": [it["name"] for it in items[2 * i : 2 * i + 2]],
                    "judgments": [x["judgment"] for x in v],
                    "judge_errors": [x["error"] for x in v],
                    "scores": {
                        "rating": sum(ok) / len(ok) if ok else None,
                        "rating_turn1": ratings[0],
                        "rating_turn2": ratings[1],
                    },
                }
            )
    return failed
