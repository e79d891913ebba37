"""Selection (paper Sec. 3.2): [IND] where and only where s > beta, in the input's format and as an HF dataset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ctxaware.commands import analyze as analyze_command
from ctxaware.commands import select as select_command
from ctxaware.core.errors import CtxawareError
from ctxaware.data.conversations import load_conversations
from ctxaware.scoring import selection
from tests.conftest import SHARED_DATA

SFT = SHARED_DATA / "sft"
IND = "[IND]"


def _scores(convs, path: Path) -> dict:
    """Deterministic fake scores: turn (row, m) gets ((7 * row + 3 * m) % 10) / 10; every 9th turn is skipped."""
    rows, truth = [], {}
    for c in convs:
        for m in range(sum(x["role"] == "assistant" for x in c.messages)):
            s = ((7 * c.source_row + 3 * m) % 10) / 10
            s = None if (c.source_row + m) % 9 == 0 else s
            truth[(c.source_row, m)] = s
            rows.append({"conversation_id": c.id, "source_row": c.source_row, "turn": m, "score": s,
                         "skipped": None if s is not None else "test"})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return truth


@pytest.mark.parametrize(
    "name,n",
    [("sharegpt_dummy_conversation.json", 40), ("messages_sft_demo.jsonl", 30), ("alpaca_en_demo.json", 30)],
)
def test_indicator_where_and_only_where_above_beta(tmp_path, name, n):
    src = SFT / name
    lines = src.read_text().splitlines()[:n] if name.endswith(".jsonl") else None
    data = tmp_path / name
    data.write_text("\n".join(lines) + "\n" if lines else json.dumps(json.loads(src.read_text())[:n]))
    convs, _ = load_conversations(data)
    truth = _scores(convs, tmp_path / "scores.jsonl")
    out = tmp_path / "out"
    assert (
        select_command.main(
            [str(tmp_path / "scores.jsonl"), str(data), "--beta", "0.6", "--output", str(out)]
        )
        == 0
    )

    written = out / ("data.jsonl" if name.endswith(".jsonl") else "data.json")
    marked, _ = load_conversations(written)  # re-read in its own format
    assert [c.fmt for c in marked] == [c.fmt for c in convs]
    n_sel = 0
    for orig, new in zip(convs, marked):
        users = [i for i, x in enumerate(orig.messages) if x["role"] == "user"]
        for m, i in enumerate(users):
            s = truth[(orig.source_row, m)]
            want = s is not None and s > 0.6  # 0.6 itself is not selected
            n_sel += want
            got = new.messages[i]["content"]
            assert got.endswith(" " + IND) == want, (orig.id, m, s)
            assert (
                got.replace(" " + IND, "") == orig.messages[i]["content"].rstrip()
                if want
                else got == orig.messages[i]["content"]
            )
        assert [x["content"] for x in new.messages if x["role"] == "assistant"] == [
            x["content"] for x in orig.messages if x["role"] == "assistant"
        ]
    summary = json.loads((out / "selection.json").read_text())
    assert summary["n_selected"] == n_sel > 0
    assert summary["n_unscored"] == sum(v is None for v in truth.values())
    scored = [v for v in truth.values() if v is not None]
    assert summary["table3"]["0.6"] == pytest.approx(sum(v > 0.6 for v in scored) / len(scored))

    import datasets

    ds = datasets.load_from_disk(str(out / "hf"))
    assert len(ds) == len(convs) and sum(IND in m["content"] for r in ds for m in r["messages"]) == n_sel


def test_bad_rows_counted_and_mismatch_refused(tmp_path):
    rows = json.loads((SFT / "sharegpt_dummy_conversation.json").read_text())[:10]
    rows[2] = {"id": "broken", "conversations": [{"from": "alien", "value": "x"}]}
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    convs, _ = load_conversations(data)
    _scores(convs, tmp_path / "s.jsonl")
    s = selection.run(
        selection.SelectConfig(str(tmp_path / "s.jsonl"), str(data), output=str(tmp_path / "o"))
    )
    assert s["skipped_rows"]["total"] == 1 and s["skipped_rows"]["by_reason"] == {"unknown role": 1}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads((SFT / "sharegpt_dummy_conversation.json").read_text())[20:30]))
    with pytest.raises(CtxawareError, match="not"):
        selection.run(
            selection.SelectConfig(str(tmp_path / "s.jsonl"), str(other), output=str(tmp_path / "o2"))
        )


def test_ratio_table():
    t = selection.ratio_table([0.55, 0.65, 0.75, 0.85, None])
    assert t == {"0.5": 1.0, "0.6": 0.75, "0.7": 0.5, "0.8": 0.25}
    assert "beta=0.6" in selection.format_table({"x": t})


def test_layer_disagreement_and_analyze(tmp_path, capsys):
    """Fig. 5 numbers by hand: 20 turns, 3 layers; layer 2 reverses layer 0's order (top-10% = 2 turns)."""
    from ctxaware.scoring import analyze

    rows = []
    for i in range(20):
        s = {"0": i / 20, "1": i / 20 if i != 19 else 0.0, "2": 1 - i / 20}
        rows.append({"conversation_id": str(i), "source_row": i, "turn": 0, "score": s["0"], "scores": s})
    layers, mat = analyze.layer_disagreement(rows, top=0.1)
    assert layers == [0, 1, 2]
    assert mat.tolist() == [[0, 0.5, 1], [0.5, 0, 1], [1, 1, 0]]  # top sets {19,18}, {18,17}, {0,1}
    scores = tmp_path / "s.jsonl"
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert analyze_command.main([str(scores), "--output", str(tmp_path / "a")]) == 0
    # issue 27 §3: the printed "middle" names the layers it compares (here all three), with their mean: 5/6
    assert "all 3 scored layers 0.833, the middle 3 of them (layers 0, 1, 2) 0.833" in capsys.readouterr().out
    res = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert (
        res["layer_agreement"]["disagreement"][0][2] == 1
        and (tmp_path / "a" / "layer_agreement.png").stat().st_size
    )


def _tiny_data(tmp_path: Path, n: int = 3) -> Path:
    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_malformed_score_lines_are_counted_not_dropped(tmp_path, capsys):
    data = _tiny_data(tmp_path)
    convs, _ = load_conversations(str(data))
    good = [{"conversation_id": c.id, "source_row": c.source_row, "turn": 0, "score": 0.9} for c in convs]
    lines = [json.dumps(good[0]), "{not json", json.dumps({"turn": 0, "score": 0.5}),
             json.dumps({**good[1], "score": "high"}), "[1, 2]", json.dumps(good[2])]  # fmt: skip
    scores = tmp_path / "scores.jsonl"
    scores.write_text("\n".join(lines) + "\n")
    from ctxaware.cli import main

    assert main(["select", str(scores), str(data), "--output", str(tmp_path / "out"), "--no-hf"]) == 0
    err = capsys.readouterr().err
    assert "skipped 4 malformed score lines" in err
    s = json.loads((tmp_path / "out" / "selection.json").read_text())
    assert s["malformed_score_lines"]["total"] == 4
    assert s["malformed_score_lines"]["by_reason"] == {
        "not valid JSON": 1, "no source_row": 1, "score is not a number": 1, "line is not a JSON object": 1
    }  # fmt: skip
    assert s["n_scored"] == 2 and s["n_unscored"] == 1  # the row whose score was malformed is unscored


def test_empty_inputs_are_errors_not_zero_of_zero(tmp_path):
    _tiny_data(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CtxawareError, match="holds no score rows"):
        selection.load_scores(empty)
    scores = tmp_path / "scores.jsonl"
    scores.write_text(json.dumps({"conversation_id": "0", "source_row": 0, "turn": 0, "score": 0.9}) + "\n")
    with pytest.raises(CtxawareError, match="holds no conversations"):
        selection.run(selection.SelectConfig(scores=str(scores), data=str(empty), output=str(tmp_path / "o")))


def test_selection_files_are_world_readable(tmp_path):
    import os

    data = _tiny_data(tmp_path)
    convs, _ = load_conversations(str(data))
    scores = tmp_path / "scores.jsonl"
    _scores(convs, scores)
    old = os.umask(0o022)
    try:
        selection.run(
            selection.SelectConfig(scores=str(scores), data=str(data), output=str(tmp_path / "o"), hf=False)
        )
    finally:
        os.umask(old)
    for name in ("data.jsonl", "selection.json"):
        assert (tmp_path / "o" / name).stat().st_mode & 0o777 == 0o644, name


def test_scores_of_replaced_data_are_refused(tmp_path):
    """Scores record a digest of the data they scored; the same path with new contents is refused."""
    from ctxaware.core.results import ResultsWriter

    data = _tiny_data(tmp_path)
    convs, _ = load_conversations(str(data))
    scores = tmp_path / "scores.jsonl"
    _scores(convs, scores)
    ResultsWriter(tmp_path / "scores.jsonl.work", {"data": str(data)}, ["k"]).close()  # as ctxaware score
    cfg = selection.SelectConfig(scores=str(scores), data=str(data), output=str(tmp_path / "o"), hf=False)
    selection.run(cfg)
    data.write_text(data.read_text().replace('"q1"', '"another question"'))
    with pytest.raises(CtxawareError, match="other contents of"):
        selection.run(dataclasses.replace(cfg, output=str(tmp_path / "o2")))
    with pytest.raises(CtxawareError, match="already holds"):  # the earlier selection is not replaced
        selection.run(cfg)
