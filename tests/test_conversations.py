"""SFT dataset loading and preprocessing on the shared files and on crafted malformed rows."""

from __future__ import annotations

import json

import pytest

from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import SkipCounter
from ctxaware.data.conversations import (
    iter_conversations,
    load_conversations,
    to_hf_dataset,
    write_conversations,
)
from ctxaware.rendering.chat import check_messages
from tests.conftest import SHARED_DATA

SFT = SHARED_DATA / "sft"


def _assert_clean(convs):
    for c in convs:
        check_messages(c.messages)  # alternating, system first, strings: what chat.render accepts
        assert c.messages[-1]["role"] == "assistant"
        assert all(m["content"].strip() for m in c.messages)


def test_sharegpt_file(shared_data):
    convs, rep = load_conversations(SFT / "sharegpt_dummy_conversation.json")
    raw = json.loads((SFT / "sharegpt_dummy_conversation.json").read_text())
    assert len(raw) == 500
    assert rep["skipped"]["total"] == 0 and len(convs) == 500  # refusals are dropped turns, not rows
    assert convs[0].id == "identity_0" and convs[-1].id == "identity_499"
    assert [c.source_row for c in convs] == list(range(500))
    assert {m["role"] for c in convs for m in c.messages} == {"user", "assistant"}
    n_raw_turns = sum(len(r["conversations"]) for r in raw)
    n_dropped = rep["edits"]["by_reason"].get("dropped refusal response", 0)
    assert sum(len(c.messages) for c in convs) == n_raw_turns - 2 * n_dropped
    _assert_clean(convs)


def test_alpaca_file(shared_data):
    skips = SkipCounter()
    convs = list(iter_conversations(SFT / "alpaca_en_demo.json", skips=skips))
    assert len(convs) + skips.total == 999
    assert skips.counts == {"only refusal responses": 4}  # the paper's cleaning: 4 refusal-only rows
    assert convs[0].id == "0" and convs[0].fmt == "alpaca"
    raw = json.loads((SFT / "alpaca_en_demo.json").read_text())
    with_input = next(c for c in convs if raw[c.source_row]["input"])
    r = raw[with_input.source_row]
    assert with_input.messages[0]["content"] == f"{r['instruction']}\n\n{r['input']}"
    assert all(len(c.messages) == 2 for c in convs)
    _assert_clean(convs)


def test_messages_file_with_text_parts(shared_data):
    convs, rep = load_conversations(SFT / "messages_sft_demo.jsonl")
    assert len(convs) + rep["skipped"]["total"] == 500
    assert convs[0].id == "0" and convs[0].messages[0] == {"role": "user", "content": "hi"}
    assert all(c.id == str(c.source_row) for c in convs)
    _assert_clean(convs)


def test_keep_refusals():
    convs, rep = load_conversations(SFT / "alpaca_en_demo.json", refusal_phrases=())
    assert len(convs) == 999 and rep["edits"]["total"] == 0


ROWS = [
    {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    {"id": "badrole", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
    {"id": "empty", "conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "x"}]},
    {"id": "nonstr", "messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
    {
        "id": "image",
        "messages": [
            {"role": "user", "content": [{"type": "image_url"}]},
            {"role": "assistant", "content": "x"},
        ],
    },
    {
        "id": "chunk",
        "conversations": [
            {"from": "gpt", "value": "orphan"},
            {"from": "human", "value": "q"},
            {"from": "chatgpt", "value": "a"},
        ],
    },
    {
        "id": "double",
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
        ],
    },
    {
        "id": "refusal",
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "I'm sorry, but I cannot do that."},
        ],
    },
    {
        "id": "mixed",
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "q1"},
            {"from": "bing", "value": "As an AI language model, no."},
            {"from": "user", "value": "q2"},
            {"from": "assistant", "value": "a2"},
            {"from": "human", "value": "dangling"},
        ],
    },
    {
        "id": "latesys",
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "system", "content": "s"},
            {"role": "assistant", "content": "a"},
        ],
    },
    {
        "instruction": "Add",
        "input": "2+2",
        "output": "4",
        "system": "Be brief.",
        "history": [["hi", "hello"]],
    },
    {"instruction": "Say", "input": "", "output": ""},
    {"foo": "bar"},
    "not a dict",
    {"id": "onlyasst", "conversations": [{"from": "gpt", "value": "a"}]},
]


def test_malformed_rows_are_counted_not_dropped():
    skips, edits = SkipCounter(), SkipCounter()
    convs = {c.id: c for c in iter_conversations(ROWS, skips=skips, edits=edits)}
    assert set(convs) == {"ok", "chunk", "double", "mixed", "10"}
    assert len(convs) + skips.total == len(ROWS)
    assert skips.counts == {
        "unknown role": 1,
        "empty message": 2,
        "non-string content": 1,
        "non-text content part": 1,
        "only refusal responses": 1,
        "system message after the first turn": 1,
        "unknown format": 1,
        "row is not a mapping": 1,
        "no assistant turn": 1,
    }
    assert convs["chunk"].messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert convs["double"].messages[0] == {"role": "user", "content": "a\n\nb"}
    assert convs["mixed"].messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert [m["role"] for m in convs["10"].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert convs["10"].messages[3]["content"] == "Add\n\n2+2"
    assert edits.counts == {
        "dropped assistant turn without a preceding user turn": 2,
        "merged consecutive same-role turns": 1,
        "dropped refusal response": 2,
        "dropped trailing user turn without a response": 1,
    }


def test_same_role_skip_and_forced_format():
    skips = SkipCounter()
    ids = [c.id for c in iter_conversations(ROWS[:7], same_role="skip", skips=skips)]
    assert "double" not in ids and skips.counts["consecutive same-role turns"] == 1
    skips = SkipCounter()
    assert [c.id for c in iter_conversations(ROWS, fmt="alpaca", skips=skips)] == ["10"]
    assert skips.counts["format mismatch"] == 11
    with pytest.raises(CtxawareError, match="not one of"):
        list(iter_conversations(ROWS, fmt="vicuna"))


def test_bad_jsonl_line_is_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n{broken\n" + json.dumps(ROWS[5]) + "\n")
    skips = SkipCounter()
    assert [c.id for c in iter_conversations(p, skips=skips)] == ["ok", "chunk"]
    assert skips.counts == {"invalid JSON line": 1}


@pytest.mark.parametrize(
    "name", ["sharegpt_dummy_conversation.json", "alpaca_en_demo.json", "messages_sft_demo.jsonl"]
)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_write_roundtrip(shared_data, tmp_path, name, suffix):
    convs, _ = load_conversations(SFT / name)
    out = write_conversations(convs, tmp_path / f"out{suffix}")
    back, rep = load_conversations(out)
    assert rep["skipped"]["total"] == 0
    assert [c.messages for c in back] == [c.messages for c in convs]
    assert {c.fmt for c in back} == {convs[0].fmt}
    if convs[0].fmt == "sharegpt":
        assert [c.id for c in back] == [c.id for c in convs]


def test_alpaca_write_keeps_input_split(tmp_path):
    convs, _ = load_conversations([ROWS[10]])
    convs[0].messages[-2]["content"] += " [IND]"
    out = write_conversations(convs, tmp_path / "a.json")
    row = json.loads(out.read_text())[0]
    assert row["instruction"] == "Add" and row["input"] == "2+2 [IND]" and row["history"] == [["hi", "hello"]]


def test_parquet_and_hf_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(
        [{"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}]
    )
    ds.to_parquet(str(tmp_path / "d.parquet"))
    convs = list(iter_conversations(tmp_path / "d.parquet"))
    assert convs[0].id == "a"
    out = to_hf_dataset(convs)
    assert out[0]["messages"][1] == {"role": "assistant", "content": "r"} and out.column_names == [
        "id",
        "source_row",
        "messages",
    ]


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(CtxawareError, match="does not exist"):
        list(iter_conversations(tmp_path / "nope.json"))
