"""Instruction fine-tuning datasets as clean conversations (paper Sec. 4.1.2 preprocessing).

Reads ShareGPT (``conversations: [{from, value}]``), ``messages: [{role, content}]`` (UltraChat style) and
Alpaca/WizardLM (``instruction``, ``input``, ``output``, optional ``system``/``history``) rows from local
JSON, JSONL (optionally ``.gz``) or Parquet files, from a hub dataset through ``datasets.load_dataset``
(``streaming=True`` for large sets), or from any iterable of dicts. The format is detected per row.

Every row becomes a `Conversation` whose messages are ``{role, content}`` with roles system/user/assistant,
an optional system message first, then strictly alternating user/assistant turns ending with an assistant
turn, which is what `ctxaware.rendering.chat.render` accepts. Preprocessing, in order:

1. unknown roles, non-text content, empty messages or a system message after the first turn: the row is
   skipped with a recorded reason (``skips``);
2. consecutive messages of the same role are merged (joined by a blank line, counted in ``edits``) or, with
   ``same_role="skip"``, the row is skipped;
3. assistant turns with no preceding user turn (incomplete chunks) are dropped;
4. refusal responses (``refusal_phrases``, case-insensitive substring) are dropped with the user turn
   they answer; a trailing user turn without a response is dropped;
5. a row left without an assistant turn is skipped.

Nothing is dropped silently: skipped rows are counted in a `SkipCounter` per reason, and in-row edits in a
second counter. ``write_conversations`` writes conversations back in the input's own format.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import SkipCounter, make_user_readable, read_jsonl

FORMATS = ("auto", "sharegpt", "messages", "alpaca")
Format = Literal["auto", "sharegpt", "messages", "alpaca"]

ROLE_MAP = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}

DEFAULT_REFUSALS = (
    "As an AI language model",
    "I'm sorry, but I cannot",
    "I'm sorry, but I can't",
    "I am sorry, but I cannot",
    "I cannot fulfill",
    "I can't fulfill",
    "I'm not able to provide",
    "I cannot provide assistance",
    "I'm unable to assist",
    "it is not appropriate for me",
    "against my programming",
    "I must inform you that",
)


@dataclass
class Conversation:
    """One clean conversation.

    ``id`` is the row's ``id`` field when present, else its 0-based row index (as a string); ``source_row``
    is the row index; ``fmt`` is the row's format (sharegpt, messages or alpaca); ``extra`` holds the row's
    other top-level fields, written back by `write_conversations`.
    """

    id: str
    messages: list[dict]
    source_row: int
    fmt: str = "messages"
    extra: dict = field(default_factory=dict, repr=False)


class _Skip(Exception):
    """A row that cannot be used; the message is the reason recorded in the SkipCounter."""


# ----------------------------------------------------------------------------- reading rows


FILE_ERRORS = (json.JSONDecodeError, EOFError, gzip.BadGzipFile, RecursionError, UnicodeDecodeError, OSError)


def unreadable(path: Path, e: BaseException) -> CtxawareError:
    """The one-line error for a data file that cannot be read as a whole (truncated, not what its name
    says, nested beyond Python's limit)."""
    if isinstance(e, RecursionError):
        why = "its JSON is nested too deeply to parse"
    elif isinstance(e, (EOFError, gzip.BadGzipFile)):
        why = f"it is not a complete gzip file ({e})"
    elif isinstance(e, json.JSONDecodeError):
        why = f"it is not valid JSON ({e.msg}, line {e.lineno}, column {e.colno}); is it truncated?"
    else:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CtxawareError(f"cannot read {path}: {why}; fix or replace the file")


def _read_json_file(path: Path) -> Iterator[Any]:
    try:
        yield from _read_json_file_unchecked(path)
    except FILE_ERRORS as e:
        raise unreadable(path, e) from None


def _read_json_file_unchecked(path: Path) -> Iterator[Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as f:  # a UTF-8 BOM is read, not a bad row
        first = ""
        while not first:
            ch = f.read(1)
            if not ch:
                return
            first = ch.strip()
        f.seek(0)
        if first == "[" and ".jsonl" not in path.name:
            data = json.load(f)
            yield from data
            return
    # JSON lines through the one reader: a bad line is a row to skip and count, not a crash
    for row in read_jsonl(path, markers=True):
        yield _Skip("invalid JSON line") if set(row) == {"_malformed"} else row


def _read_parquet(path: Path) -> Iterator[dict]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise CtxawareError(
            f"cannot read {path} as Parquet: {str(e).splitlines()[0]}; fix or replace the file"
        ) from None


def _read_hub(name: str, split: str, streaming: bool, subset: str | None) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split, streaming=streaming)
    except Exception as e:  # network, missing dataset, bad split: one line for the user
        raise CtxawareError(
            f"cannot load dataset {name!r} (split {split!r}): {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
            "give a local .json/.jsonl/.parquet file or a hub dataset id"
        ) from None
    yield from ds


def read_rows(
    source: str | Path | Iterable[dict],
    split: str = "train",
    streaming: bool = False,
    subset: str | None = None,
) -> Iterator[Any]:
    """Raw rows of a local file, a hub dataset or an iterable of dicts, in order."""
    if not isinstance(source, (str, Path)):
        yield from source
        return
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".parquet":
            yield from _read_parquet(path)
        elif path.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
            yield from _read_json_file(path)
        else:
            raise CtxawareError(f"{path} is not a .json, .jsonl(.gz) or .parquet file")
    elif path.is_dir() or str(source).startswith((".", "/", "~")):
        if not path.exists():
            raise CtxawareError(f"dataset file {source} does not exist; check the path")
        yield from _read_hub(str(path), split, streaming, subset)
    else:
        yield from _read_hub(str(source), split, streaming, subset)


# ----------------------------------------------------------------------------- per-row parsing


def detect_format(row: dict) -> str:
    """``sharegpt``, ``messages`` or ``alpaca`` for a row; raises `_Skip` when none fits."""
    for key in ("conversations", "messages"):
        turns = row.get(key)
        if isinstance(turns, list) and turns:
            first = turns[0] if isinstance(turns[0], dict) else {}
            return "sharegpt" if "from" in first or "value" in first else "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise _Skip("unknown format")


def _text(content: Any) -> str:
    """A message's text: a string, or a list of text parts ``{type: text, text|value}``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        if any(p.get("type", "text") != "text" for p in content):
            raise _Skip("non-text content part")
        parts = [p.get("text", p.get("value")) for p in content]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise _Skip("non-string content")


def _turns(row: dict, fmt: str) -> tuple[list[dict], dict]:
    """Messages ``[{role, content}]`` (roles normalised, contents unchecked) and the row's other fields."""
    if fmt == "alpaca":
        return _alpaca_turns(row)
    key = "conversations" if isinstance(row.get("conversations"), list) else "messages"
    raw = row.get(key)
    if not isinstance(raw, list) or not raw:
        raise _Skip("format mismatch")
    msgs = []
    for t in raw:
        if not isinstance(t, dict):
            raise _Skip("malformed turn")
        role = t.get("from", t.get("role"))
        content = t.get("value", t.get("content"))
        if not isinstance(role, str) or role.lower() not in ROLE_MAP:
            raise _Skip("unknown role")
        msgs.append({"role": ROLE_MAP[role.lower()], "content": content})
    extra = {k: v for k, v in row.items() if k != key}
    if isinstance(row.get("system"), str) and row["system"].strip() and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": row["system"]})
    return msgs, extra


def _alpaca_turns(row: dict) -> tuple[list[dict], dict]:
    msgs: list[dict] = []
    if isinstance(row.get("system"), str) and row["system"].strip():
        msgs.append({"role": "system", "content": row["system"]})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise _Skip("malformed history")
    for pair in history:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _Skip("malformed history")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction, inp = row.get("instruction"), row.get("input") or ""
    if not isinstance(instruction, str) or not isinstance(inp, str):
        raise _Skip("non-string content")
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": row.get("output")}]
    extra = {k: v for k, v in row.items() if k not in ("instruction", "input", "output", "history", "system")}
    extra["_alpaca"] = {"instruction": instruction, "input": inp}
    return msgs, extra


def _check_contents(msgs: list[dict]) -> None:
    for i, m in enumerate(msgs):
        m["content"] = _text(m["content"])
        if not m["content"].strip():
            raise _Skip("empty message")
        if m["role"] == "system" and i != 0:
            raise _Skip("system message after the first turn")


def _merge_same_role(msgs: list[dict], same_role: str, edits: SkipCounter, where: str) -> list[dict]:
    out: list[dict] = []
    for m in msgs:
        if out and out[-1]["role"] == m["role"]:
            if same_role == "skip":
                raise _Skip("consecutive same-role turns")
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
            edits.skip("merged consecutive same-role turns", where)
        else:
            out.append(dict(m))
    return out


def _is_refusal(text: str, phrases: Sequence[str]) -> bool:
    low = text.lower()
    return any(p.lower() in low for p in phrases)


def _clean_turns(msgs: list[dict], phrases: Sequence[str], edits: SkipCounter, where: str) -> list[dict]:
    """Drop incomplete-chunk assistant turns, refusal pairs and a trailing unanswered user turn."""
    system = msgs[:1] if msgs[0]["role"] == "system" else []
    turns = msgs[len(system) :]
    while turns and turns[0]["role"] == "assistant":  # a chunk that starts mid-conversation
        turns = turns[1:]
        edits.skip("dropped assistant turn without a preceding user turn", where)
    kept: list[dict] = []
    refused = False
    for i in range(0, len(turns), 2):
        pair = turns[i : i + 2]
        if len(pair) < 2:
            edits.skip("dropped trailing user turn without a response", where)
        elif phrases and _is_refusal(pair[1]["content"], phrases):
            edits.skip("dropped refusal response", where)
            refused = True
        else:
            kept += pair
    if not kept:
        raise _Skip("only refusal responses" if refused else "no assistant turn")
    return system + kept


def parse_row(
    row: Any,
    index: int,
    fmt: Format = "auto",
    *,
    refusal_phrases: Sequence[str] = DEFAULT_REFUSALS,
    same_role: str = "merge",
    edits: SkipCounter | None = None,
) -> Conversation:
    """One raw row -> a clean `Conversation`; raises `_Skip` with the reason when the row is unusable."""
    if isinstance(row, _Skip):
        raise row
    if not isinstance(row, dict):
        raise _Skip("row is not a mapping")
    edits = edits if edits is not None else SkipCounter()
    found = detect_format(row)
    if fmt != "auto" and found != fmt:
        raise _Skip("format mismatch")
    msgs, extra = _turns(row, found)
    _check_contents(msgs)
    rid = row.get("id")
    cid = str(rid) if isinstance(rid, (str, int)) and str(rid) != "" else str(index)
    msgs = _merge_same_role(msgs, same_role, edits, cid)
    msgs = _clean_turns(msgs, refusal_phrases, edits, cid)
    return Conversation(cid, msgs, index, found, extra)


def iter_conversations(
    source: str | Path | Iterable[dict],
    fmt: Format = "auto",
    *,
    split: str = "train",
    subset: str | None = None,
    streaming: bool = False,
    limit: int | None = None,
    refusal_phrases: Sequence[str] = DEFAULT_REFUSALS,
    same_role: Literal["merge", "skip"] = "merge",
    skips: SkipCounter | None = None,
    edits: SkipCounter | None = None,
) -> Iterator[Conversation]:
    """Clean conversations of a dataset, in row order.

    Args:
        source: a .json/.jsonl(.gz)/.parquet file, a hub dataset id (or local dataset directory), or an
            iterable of row dicts (e.g. an HF ``Dataset``).
        fmt: ``auto`` (detect per row), ``sharegpt``, ``messages`` or ``alpaca`` (other rows are skipped).
        split, subset, streaming: passed to ``datasets.load_dataset`` for hub sources.
        limit: read at most this many rows.
        refusal_phrases: a response containing one of these (case-insensitive) is dropped with its user turn;
            ``()`` keeps refusals.
        same_role: ``merge`` consecutive same-role messages (blank line between) or ``skip`` such rows.
        skips: counts skipped rows per reason (pass one in to read it afterwards).
        edits: counts in-row edits per kind (merged turns, dropped incomplete/refusal/trailing turns).
    """
    if fmt not in FORMATS:
        raise CtxawareError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if same_role not in ("merge", "skip"):
        raise CtxawareError(f"same_role {same_role!r} is not one of merge, skip")
    skips = skips if skips is not None else SkipCounter()
    edits = edits if edits is not None else SkipCounter()
    for i, row in enumerate(read_rows(source, split, streaming, subset)):
        if limit is not None and i >= limit:
            break
        try:
            yield parse_row(row, i, fmt, refusal_phrases=refusal_phrases, same_role=same_role, edits=edits)
        except _Skip as e:
            rid = row.get("id") if isinstance(row, dict) else None
            skips.skip(str(e), str(rid if rid is not None else i))


def load_conversations(
    source: str | Path | Iterable[dict], fmt: Format = "auto", **kwargs
) -> tuple[list[Conversation], dict]:
    """All conversations of ``source`` and a report ``{n_conversations, skipped, edits}``."""
    skips, edits = SkipCounter(), SkipCounter()
    convs = list(iter_conversations(source, fmt, skips=skips, edits=edits, **kwargs))
    return convs, {"n_conversations": len(convs), "skipped": skips.as_dict(), "edits": edits.as_dict()}


# ----------------------------------------------------------------------------- writing back

_SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def to_row(conv: Conversation, fmt: str | None = None) -> dict:
    """A conversation as a row of ``fmt`` (default: its own format), with the row's other fields."""
    fmt = fmt or conv.fmt
    extra = {k: v for k, v in conv.extra.items() if not k.startswith("_")}
    if fmt == "sharegpt":
        turns = [{"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in conv.messages]
        return {**extra, "id": extra.get("id", conv.id), "conversations": turns}
    if fmt == "messages":
        return {**extra, "messages": [{"role": m["role"], "content": m["content"]} for m in conv.messages]}
    if fmt == "alpaca":
        return _alpaca_row(conv, extra)
    raise CtxawareError(f"output format {fmt!r} is not one of sharegpt, messages, alpaca")


def _alpaca_row(conv: Conversation, extra: dict) -> dict:
    msgs = conv.messages
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    turns = msgs[1:] if system is not None else msgs
    pairs = [(turns[i]["content"], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
    user, output = pairs[-1]
    orig = conv.extra.get("_alpaca", {})
    head = orig.get("instruction", "") + "\n\n"
    if orig.get("input", "").strip() and user.startswith(head):  # keep the instruction/input split
        instruction, inp = orig["instruction"], user[len(head) :]
    else:
        instruction, inp = user, ""
    row = {**extra, "instruction": instruction, "input": inp, "output": output}
    if system is not None:
        row["system"] = system
    if len(pairs) > 1:
        row["history"] = [list(p) for p in pairs[:-1]]
    return row


def write_conversations(convs: Iterable[Conversation], path: str | Path, fmt: str | None = None) -> Path:
    """Write conversations to ``path`` (JSON list, or JSON lines for ``.jsonl``) in ``fmt`` (default: each
    conversation's own format). Written to a temp file and renamed, so readers never see half a file."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [to_row(c, fmt) for c in convs]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        make_user_readable(fd)  # 0644 under the usual umask, like every other output (not mkstemp's 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if path.name.endswith(".jsonl"):
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            else:
                json.dump(rows, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_hf_dataset(convs: Iterable[Conversation]):
    """An HF ``datasets.Dataset`` with columns ``id``, ``source_row`` and ``messages``."""
    import datasets

    rows = [{"id": c.id, "source_row": c.source_row, "messages": c.messages} for c in convs]
    if not rows:
        raise CtxawareError("no conversations to put in a dataset; check the input and the skip report")
    return datasets.Dataset.from_list(rows)
