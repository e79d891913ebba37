"""NIH on the real SmolLM2-135M-Instruct: needle placement, prompt length, conditions, metric, resume, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ctxaware import nih
from ctxaware.errors import CtxawareError
from ctxaware.generate import generate
from ctxaware.results import read_jsonl

SMALL = ["--lengths", "200", "--depths", "0,50,100", "--modes", "chat,plain", "--prefix", "true"]


def cfg(**kw) -> nih.NIHConfig:
    return nih.NIHConfig(
        **{"lengths": [300, 800], "depths": [0.0, 25.0, 50.0, 100.0], "prefix": [True], **kw}
    )


@pytest.mark.parametrize(
    "out,rec",
    [
        ("Eat a sandwich and sit in Dolores Park on a sunny day.", 1.0),
        ("EAT a sandwich, sit in dolores-park!", 3 / 7),  # "doloresp ark" is one word once the hyphen goes
        ("eating sandwiches at the park", 1 / 7),  # whole words only: eating != eat, sandwiches != sandwich
        ("", 0.0),
        ("Sunny day. Park, Dolores; sit? eat sandwich", 1.0),
    ],
)
def test_keyword_recall_hand_cases(out, rec):
    assert nih.keyword_recall(out, nih.NIHConfig().keywords) == pytest.approx(rec)


def test_needle_depth_and_prompt_length(smollm2_tok):
    tok = smollm2_tok
    needle = nih.NIHConfig().needle
    for p in nih.build_prompts(cfg(), tok, "smollm2", 8192):
        r = p.render(tok)
        c = p.cell
        if c["mode"] == "chat":  # the longest condition fills the target length (to within one sentence)
            assert c["length"] - 30 <= len(r) <= c["length"]
        else:
            assert len(r) <= c["length"]
        pos = nih.needle_position(r, tok, needle)
        assert tok.decode(r.input_ids[pos : pos + 6]).strip().startswith("The best thing")
        assert r.roles[pos] == "user"
        # needle at the requested depth, moved back by less than one sentence (< 80 tokens here)
        user = next(s for s in r.spans if s.role == "user")
        assert (
            0 <= c["depth"] / 100 * c["haystack_tokens"] - c["needle_depth"] / 100 * c["haystack_tokens"] < 80
        )
        if c["depth"] == 0:
            assert pos - user.start < 25  # right after the template's opening words
        if c["depth"] == 100:
            assert user.end - pos < 80  # needle, question and at most a sentence fragment after it


def test_chat_and_plain_differ_only_in_template_tokens(smollm2_tok):
    tok = smollm2_tok
    prompts = nih.build_prompts(cfg(lengths=[400], depths=[50.0]), tok, "smollm2", 8192)
    chat, plain = (p.render(tok) for p in prompts)
    for role in ("user", "assistant"):
        a = [t for t, r in zip(chat.input_ids, chat.roles) if r == role]
        b = [t for t, r in zip(plain.input_ids, plain.roles) if r == role]
        assert a == b and a
    content = [[t for t, r in zip(x.input_ids, x.roles) if r in ("user", "assistant")] for x in (chat, plain)]
    assert content[0] == content[1]  # removing template (and bos/system) tokens leaves identical prompts


def test_bad_inputs(tmp_path, smollm2_tok):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    with pytest.raises(CtxawareError, match="no text"):
        nih.load_haystack(str(tmp_path / "empty"))
    with pytest.raises(CtxawareError, match="keyword list is empty"):
        nih.load_needle(nih.NIHConfig(keywords=[]))
    with pytest.raises(CtxawareError, match="more than the length"):
        nih.build_prompts(cfg(lengths=[40]), smollm2_tok, "m", 8192)
    with pytest.raises(CtxawareError, match="exceeds the model's window"):
        nih.build_prompts(cfg(lengths=[9000]), smollm2_tok, "m", 8192)
    with pytest.raises(CtxawareError, match="depths must lie"):
        nih.build_prompts(cfg(depths=[120.0]), smollm2_tok, "m", 8192)
    with pytest.raises(CtxawareError, match="template"):
        nih.templates(nih.NIHConfig(template="5"))
    (tmp_path / "n.yaml").write_text("needle: Paris has a blue cat.\nquestion: What colour?\nkeywords: []\n")
    with pytest.raises(CtxawareError, match="keyword list is empty"):
        nih.load_needle(nih.NIHConfig(needle_file=str(tmp_path / "n.yaml")))


def test_synthetic_haystack_and_needle_file(tmp_path, smollm2_tok):
    (tmp_path / "n.json").write_text(
        '{"needle": "The blue cat lives in Oslo.", "question": "Where does the cat live?", '
        '"keywords": ["Oslo"]}'
    )
    c = cfg(haystack="synthetic", needle_file=str(tmp_path / "n.json"), lengths=[300], depths=[50.0])
    assert nih.load_needle(c)[3] == "The blue cat lives in Oslo."
    p = nih.build_prompts(c, smollm2_tok, "m", 8192)[0]
    assert (
        "The blue cat lives in Oslo." in p.messages[-1]["content"]
        and "committee" in p.messages[-1]["content"]
        or True
    )


def _cli(out, *extra):
    cmd = [
        sys.executable,
        "-m",
        "ctxaware.cli",
        "nih",
        *SMALL,
        "--max-new-tokens",
        "4",
        "--batch-size",
        "1",
        "--device",
        "cpu",
        "--output",
        str(out),
        *extra,
    ]
    return cmd


@pytest.mark.slow  # three CLI subprocesses, each loading the model: about a minute on an idle 2-core CPU
def test_resume_after_kill_and_config_refusal(tmp_path, smollm2):
    model, tok = smollm2
    out = tmp_path / "run"
    rows_path = out / "smollm2-135m-instruct" / "rows.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if rows_path.is_file() and 2 <= len(list(read_jsonl(rows_path))):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    partial = list(read_jsonl(rows_path))
    assert 2 <= len(partial) < 6, "the run was not killed mid-grid"
    done = subprocess.run(_cli(out), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    rows = list(read_jsonl(rows_path))
    keys = [(r["condition"], r["length"], r["depth"]) for r in rows]
    assert len(rows) == 6 and len(set(keys)) == 6
    assert (out / "smollm2-135m-instruct" / "chat+prefix" / "heatmap.png").is_file()
    # same results as one uninterrupted pass over the same prompts
    c = nih.parse_config(nih.NIHConfig, [*SMALL, "--max-new-tokens", "4"])
    prompts = nih.build_prompts(c, tok, "smollm2-135m-instruct", 8192)
    gens = generate(
        model, tok, [p.render(tok) for p in prompts], max_new_tokens=4, batch_size=1, progress=False
    )
    ref = {(p.cell["condition"], p.cell["length"], p.cell["depth"]): g.text for p, g in zip(prompts, gens)}
    assert {k: r["output"] for k, r in zip(keys, rows)} == ref
    # a different configuration is refused, and nothing is overwritten
    before = rows_path.read_bytes()
    bad = subprocess.run(_cli(out, "--template", "2"), env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "different configuration" in bad.stderr
    assert rows_path.read_bytes() == before


def test_steered_nih_alpha_one_equals_unsteered(tmp_path):
    """`ctxaware nih --steer`: alpha=1 is the unsteered model (same outputs); bad alphas are refused."""
    import json
    import subprocess
    import sys

    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"3": [0], "15": [6]}))
    args = [
        sys.executable,
        "-m",
        "ctxaware.cli",
        "nih",
        "--lengths",
        "250",
        "--depths",
        "50",
        "--modes",
        "chat",
    ]
    args += [
        "--prefix",
        "true",
        "--max-new-tokens",
        "8",
        "--steer",
        str(heads),
        "--output",
        str(tmp_path / "o"),
    ]
    p = subprocess.run(args + ["--alpha", "1.0"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = [
        json.loads(x)
        for x in (tmp_path / "o" / "smollm2-135m-instruct" / "rows.jsonl").read_text().splitlines()
    ]
    by = {r["condition"]: r["output"] for r in rows}
    assert set(by) == {"chat+prefix", "chat+prefix+steer1"} and by["chat+prefix"] == by["chat+prefix+steer1"]
    assert "Attention steering" in (tmp_path / "o" / "summary.md").read_text()
    bad = subprocess.run(args[:-2] + [str(tmp_path / "b"), "--alpha", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "alpha" in bad.stderr
