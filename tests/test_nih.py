"""NIH on the real SmolLM2-135M-Instruct: needle placement, prompt length, conditions, metric, resume, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ctxaware.commands import nih as nih_command
from ctxaware.core import models
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import read_jsonl
from ctxaware.data import needle
from ctxaware.evaluation import nih
from ctxaware.rendering.generate import generate
from tests.conftest import one_and_two_processes

SMALL = ["--lengths", "200", "--depths", "0,50,100", "--modes", "chat,plain", "--prefix", "true"]


def cfg(**kw) -> nih.NIHConfig:
    """The ``ctxaware`` protocol (whole prompt fits the length); the authors' protocol is tested below."""
    return nih.NIHConfig(
        **{
            "protocol": "ctxaware",
            "lengths": [300, 800],
            "depths": [0.0, 25.0, 50.0, 100.0],
            "prefix": [True],
            **kw,
        }
    )


@pytest.mark.parametrize(
    "out,rec",
    [
        ("Eat a sandwich and sit in Dolores Park on a sunny day.", 1.0),
        ("EAT a sandwich, sit in dolores-park!", 5 / 7),  # punctuation becomes a space: dolores, park
        ("eating sandwiches at the park", 1 / 7),  # whole words only: eating != eat, sandwiches != sandwich
        ("", 0.0),
        ("Sunny day. Park, Dolores; sit? eat sandwich", 1.0),
    ],
)
def test_keyword_recall_hand_cases(out, rec):
    assert needle.keyword_recall(out, nih.NIHConfig().keywords) == pytest.approx(rec)


def test_needle_depth_and_prompt_length(smollm2_tok):
    tok = smollm2_tok
    sentence = nih.NIHConfig().needle
    for p in needle.build_prompts(cfg(), tok, "smollm2", 8192):
        r = p.render(tok)
        c = p.cell
        if c["mode"] == "chat":  # the longest condition fills the target length (to within one sentence)
            assert c["length"] - 30 <= len(r) <= c["length"]
        else:
            assert len(r) <= c["length"]
        pos = needle.needle_position(r, tok, sentence)
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
    prompts = needle.build_prompts(cfg(lengths=[400], depths=[50.0]), tok, "smollm2", 8192)
    chat, plain = (p.render(tok) for p in prompts)
    for role in ("user", "assistant"):
        a = [t for t, r in zip(chat.input_ids, chat.content_roles()) if r == role]
        b = [t for t, r in zip(plain.input_ids, plain.content_roles()) if r == role]
        assert a == b and a
    content = [
        [t for t, r in zip(x.input_ids, x.content_roles()) if r in ("user", "assistant")]
        for x in (chat, plain)
    ]
    assert content[0] == content[1]  # removing template (and bos/system) tokens leaves identical prompts


def test_bad_inputs(tmp_path, smollm2_tok):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    with pytest.raises(CtxawareError, match="no text"):
        needle.load_haystack(str(tmp_path / "empty"))
    with pytest.raises(CtxawareError, match="keyword list is empty"):
        needle.load_needle(nih.NIHConfig(keywords=[]))
    with pytest.raises(CtxawareError, match="more than the length"):
        needle.build_prompts(cfg(lengths=[40]), smollm2_tok, "m", 8192)
    with pytest.raises(CtxawareError, match="exceeds the model's window"):
        needle.build_prompts(cfg(lengths=[9000]), smollm2_tok, "m", 8192)
    with pytest.raises(CtxawareError, match="--depths 120.0 must be at most 100"):  # when the config is built
        cfg(depths=[120.0])
    with pytest.raises(CtxawareError, match="template"):
        needle.templates(nih.NIHConfig(template="5"))
    (tmp_path / "n.yaml").write_text("needle: Paris has a blue cat.\nquestion: What colour?\nkeywords: []\n")
    with pytest.raises(CtxawareError, match="keyword list is empty"):
        needle.load_needle(nih.NIHConfig(needle_file=str(tmp_path / "n.yaml")))


def test_synthetic_haystack_and_needle_file(tmp_path, smollm2_tok):
    (tmp_path / "n.json").write_text(
        '{"needle": "The blue cat lives in Oslo.", "question": "Where does the cat live?", '
        '"keywords": ["Oslo"]}'
    )
    c = cfg(haystack="synthetic", needle_file=str(tmp_path / "n.json"), lengths=[300], depths=[50.0])
    assert needle.load_needle(c)[3] == "The blue cat lives in Oslo."
    p = needle.build_prompts(c, smollm2_tok, "m", 8192)[0]
    content = p.messages[-1]["content"]
    assert "The blue cat lives in Oslo." in content
    subjects = (
        "The committee",
        "A small team",
        "The old library",
        "Most visitors",
        "The river",
        "A local farmer",
    )
    assert sum(content.count(x) for x in subjects) >= 5  # the synthetic haystack's own sentences surround it


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
    prompts = needle.build_prompts(c, tok, "smollm2-135m-instruct", 8192)
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


@pytest.mark.parametrize(
    "kept", [pytest.param(1, marks=pytest.mark.slow), 3, pytest.param(5, marks=pytest.mark.slow), "torn"]
)
def test_resume_inside_a_batch_is_byte_identical(tmp_path, kept):
    """Issue 23 §5: a run killed between two rows of one batch (here: the rows file cut after ``kept`` of 6
    rows, batches of 4; ``torn``: cut at a seeded random byte, mid-line) resumes to the very bytes of an
    uninterrupted run, attention shares included: the missing rows are computed beside the same companions,
    not alone."""
    import random
    import shutil

    from ctxaware.cli import main

    argv = [*SMALL, "--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu"]
    full = tmp_path / "full"
    assert main(["nih", *argv, "--output", str(full)]) == 0
    rows = full / "smollm2-135m-instruct" / "rows.jsonl"
    want = rows.read_bytes()
    assert len(want.splitlines()) == 6 and b'"attention"' in want
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    at = random.Random(23).randrange(1, len(want)) if kept == "torn" else None
    prefix = want[:at] if at else b"".join(want.splitlines(True)[:kept])
    (cut / "smollm2-135m-instruct" / "rows.jsonl").write_bytes(prefix)
    assert main(["nih", *argv, "--output", str(cut)]) == 0
    assert (cut / "smollm2-135m-instruct" / "rows.jsonl").read_bytes() == want
    # issue 26 §3: meta.json says where the rows came from; the resume adds its own record
    import hashlib
    import json

    from ctxaware.core.models import load_tokenizer

    meta = json.loads((cut / "smollm2-135m-instruct" / "meta.json").read_text())
    made, again = meta["provenance"], meta["resumed_by"][-1]
    assert meta["kind"] == "nih" and meta["schema"] == 1  # issue 24 §2: a run knows what it is
    assert made["command"][:2] == ["ctxaware", "nih"] and again["command"][-1] == str(cut)
    assert all(made[k] for k in ("ctxaware_version", "torch", "transformers", "trl", "peft"))
    template = load_tokenizer("smollm2-135m-instruct").chat_template
    assert made["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()


def test_sigterm_ends_a_run_like_ctrl_c(tmp_path):
    """Issue 23 §4: SIGTERM (what schedulers send) ends a run as cleanly as SIGINT: exit 143, one message,
    every finished row kept and parseable; the rerun completes the grid."""
    out = tmp_path / "run"
    rows_path = out / "smollm2-135m-instruct" / "rows.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if rows_path.is_file() and len(list(read_jsonl(rows_path))) >= 1:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    partial = list(read_jsonl(rows_path))
    assert 1 <= len(partial) < 6 and all("_malformed" not in r for r in partial)
    done = subprocess.run(_cli(out), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert len(list(read_jsonl(rows_path))) == 6


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


# ---------------------------------------------------------------- the authors' protocol (issue 11 §2)


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer alone (no model load)."""
    from ctxaware.core.models import load_tokenizer

    return load_tokenizer("default")


# the tester's prompts token for token: tests/conformance/test_authors.py
PAPER_NEEDLE = (
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
)


def test_authors_length_is_a_budget_minus_200(tok):
    """L = 1000: 800 context tokens (needle included), not a whole prompt of 1000 (old code: 932)."""
    p = needle.build_prompts(
        nih.NIHConfig(lengths=[1000], depths=[50.0], modes=["chat"], prefix=[True]), tok
    )[0]
    assert 795 <= p.cell["context_tokens"] <= 800
    assert len(p.render(tok)) < 900  # template, question and prefix live in the 200-token buffer


def test_authors_empty_system_turn_and_plain_start(tok):
    ps = needle.build_prompts(nih.NIHConfig(lengths=[400], depths=[50.0], prefix=[True]), tok)
    chat = next(p for p in ps if p.cell["mode"] == "chat").render(tok)
    plain = next(p for p in ps if p.cell["mode"] == "plain").render(tok)
    assert chat.text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nYou are a helpful")
    assert "SmolLM" not in chat.text  # the template's default system prompt is not injected
    assert plain.text.startswith("You are a helpful AI assistant")
    assert plain.text.endswith(
        "San Francisco?\n\nThe best thing to do in San Francisco"
    )  # raw + "\n\n" + hint


def test_authors_prefix_is_eight_words():
    assert needle.load_needle(nih.NIHConfig())[3] == "The best thing to do in San Francisco"
    assert (
        needle.load_needle(nih.NIHConfig(protocol="ctxaware"))[3]
        == "The best thing to do in San Francisco is"
    )


def test_subword_match_replaces_punctuation_by_space():
    kw = nih.NIHConfig().keywords
    assert needle.keyword_recall("Eat a sandwich, sit in Dolores-Park on a sunny-day!", kw) == 1.0
    assert needle.keyword_recall("...Dolores-Park...", ["dolores", "park"]) == 1.0


def test_authors_backoff_stops_only_at_a_period(tok, tmp_path):
    """The needle moves back to the previous token decoding to '.', never to '?' or '!'; at 100 % it is
    appended at the very end."""
    hay = tmp_path / "hay"
    hay.mkdir()
    sent = ["Why do owls hoot at night?", "They call out loudly!", "Owls are birds."]
    (hay / "a.txt").write_text(" ".join(sent[i % 3] for i in range(600)) + "\n")
    c = nih.NIHConfig(haystack=str(hay), lengths=[600], depths=[10.0, 35.0, 60.0, 100.0], modes=["plain"],
                      prefix=[False])  # fmt: skip
    for p in needle.build_prompts(c, tok):
        ctx = p.messages[-1]["content"].split("\n")[1]
        head, tail = ctx.split(PAPER_NEEDLE.strip())
        if p.cell["depth"] == 100:
            assert tail.strip() == ""
        else:
            assert head.endswith("Owls are birds."), head[-40:]


@pytest.mark.parametrize("protocol", ["authors", "ctxaware"])
def test_chat_and_plain_twins_hold_the_same_haystack(tok, protocol):
    """Built by separate calls (as `ctxaware attention` does), chat and plain hold the same context
    (old code: 338 vs 309 haystack tokens at length 400)."""
    from ctxaware.data import needle

    def context(mode: str) -> str:
        c = nih.NIHConfig(protocol=protocol, lengths=[400], depths=[50.0], modes=[mode], prefix=[True])
        p = needle.build_prompts(c, tok)[0]
        return p.messages[-1]["content"].rstrip("\n"), p.cell["context_tokens"]

    assert context("chat") == context("plain")
    from ctxaware.attention.allocation import nih_prompts

    chat, plain = (nih_prompts(tok, [400], [50.0], chat=m, prompts="nih") for m in (True, False))
    user = [r[0].messages[-1]["content"].rstrip("\n") for r in (chat, plain)]
    assert user[0] == user[1] and user[0] in chat[0].text and user[0] in plain[0].text


def test_gemma_chat_template_option():
    """Gemma-3-270M (base, no template) gets Gemma's turn markers with --chat-template gemma, and no system
    turn (the authors' rule for Gemma)."""
    from ctxaware.core.models import load_tokenizer
    from ctxaware.data.needle import apply_chat_template_choice

    gtok = load_tokenizer("gemma3-270m")
    assert not gtok.chat_template
    c = nih.NIHConfig(lengths=[400], depths=[50.0], modes=["chat", "plain"], prefix=[True])
    assert {p.cell["mode"] for p in needle.build_prompts(c, gtok, "gemma3-270m")} == {"plain"}
    apply_chat_template_choice(gtok, "gemma")
    chat = next(p for p in needle.build_prompts(c, gtok, "gemma3-270m") if p.cell["mode"] == "chat").render(
        gtok
    )
    assert chat.text.startswith("<bos><start_of_turn>user\nYou are a helpful")
    assert "<end_of_turn>\n<start_of_turn>model\nThe best thing to do in San Francisco" in chat.text
    # the authors' tester tokenizes the chat text with tokenizer(prompt): Gemma's template BOS plus one more
    assert chat.input_ids[:2] == [gtok.bos_token_id] * 2 and chat.input_ids.count(gtok.bos_token_id) == 2
    c.chat_bos = "template"  # the named deviation: the template's BOS only
    chat = next(p for p in needle.build_prompts(c, gtok, "gemma3-270m") if p.cell["mode"] == "chat").render(
        gtok
    )
    assert chat.input_ids.count(gtok.bos_token_id) == 1


def test_run_ids_are_safe_unique_and_readable(tmp_path):
    for d in ("a/model", "b/model"):
        (tmp_path / d).mkdir(parents=True)
    a, b = models.run_id(str(tmp_path / "a/model")), models.run_id(str(tmp_path / "b/model"))
    assert a != b and a.startswith("a-model-") and b.startswith("b-model-")
    assert models.run_id("default") == models.run_id("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert models.run_id("org/name") == "org--name"
    for spec in ("..", "../..", "/"):
        rid = models.run_id(spec)
        assert "/" not in rid and not rid.startswith(".") and rid
        assert (tmp_path / "out" / rid).resolve().parent == (tmp_path / "out").resolve()


def test_alpha_without_steer_is_an_error(tmp_path):
    with pytest.raises(CtxawareError, match="--alpha needs --steer"):
        nih_command.main(["--alpha", "0.5", "--output", str(tmp_path / "o")])


def test_summary_keeps_models_of_earlier_invocations(tmp_path, monkeypatch):
    import json

    def fake_run(cfg, name):
        rows = [{"condition": "plain", "template": 1, "length": 200, "depth": d, "recall": 1.0, "exact": 1.0,
                 "empty": 0.0, "protocol": "authors"} for d in (0.0, 100.0)]  # fmt: skip
        return models.run_id(name), rows

    monkeypatch.setattr(nih_command, "run_model", fake_run)
    monkeypatch.setattr(
        nih_command, "preflight", lambda cfg, name: None
    )  # no tokenizer for these made-up ids
    out = tmp_path / "o"
    for m in ("org/one", "org/two"):
        assert nih_command.main(["--model", m, "--output", str(out)]) == 0
    assert set(json.loads((out / "summary.json").read_text())) == {"org--one", "org--two"}


def test_a_missing_haystack_is_never_replaced_silently(tmp_path, monkeypatch, capsys):
    """Issue 26 §1: where the essays are not found, `--haystack auto` stops in one line that says where it
    looked (it fell back to the synthetic haystack silently, which changes every NIH number);
    CTXAWARE_SHARED_DATA points at them; the synthetic haystack runs only when asked for by name."""
    from ctxaware.cli import main
    from ctxaware.data.needle import PG_ESSAYS, haystack_files

    monkeypatch.setenv("CTXAWARE_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(CtxawareError, match="nowhere/haystack/paul_graham_essays"):
        haystack_files("auto")
    assert haystack_files("synthetic") is None
    assert (
        main(["nih", "--lengths", "400", "--depths", "50", "--dump-prompts", str(tmp_path / "p.jsonl")]) == 2
    )
    assert "CTXAWARE_DATA" in capsys.readouterr().err and not (tmp_path / "p.jsonl").exists()
    if PG_ESSAYS.is_dir():  # the variable is honoured
        monkeypatch.setenv("CTXAWARE_SHARED_DATA", str(PG_ESSAYS.parents[1]))
        assert len(haystack_files("auto")) == len(list(PG_ESSAYS.glob("*.txt")))


def test_two_processes_give_the_one_process_rows_byte_for_byte(tmp_path, shared_data):
    """Issue 25 section 2: ``torchrun --nproc_per_node 2 -m ctxaware.cli nih`` (gloo, CPU) shares the grid's
    engine calls between the ranks, and rank 0's merged rows.jsonl equals a one-process run's, byte for byte,
    on the real SmolLM2; a second launch finds everything done and changes nothing."""
    grid = ["nih", "--model", "default", "--lengths", "200,300,400", "--depths", "0,50,100", "--modes", "chat,plain",
            "--prefix", "true", "--max-new-tokens", "12", "--haystack", "synthetic", "--device", "cpu",
            "--dtype", "float32"]  # fmt: skip
    one, two, res = one_and_two_processes(grid, tmp_path)
    env, launch = {**os.environ, "OMP_NUM_THREADS": "1"}, res.args_launch
    (rows_one,) = one.glob("*/rows.jsonl")
    rows_two = two / rows_one.parent.name / "rows.jsonl"
    assert len(rows_one.read_text().splitlines()) == 18
    assert rows_two.read_bytes() == rows_one.read_bytes()
    for rank in (0, 1):  # both ranks computed a share of the grid (3 engine calls: 2 and 1)
        assert f"(rank {rank} of 2: its share of the 3 engine calls)" in res.stdout
    assert not (rows_two.parent / ".ranks").exists()  # merged: the ranks' own files are gone
    assert (two / "summary.json").is_file()
    res = subprocess.run(launch, env=env, capture_output=True, text=True)  # resume: nothing left to do
    assert res.returncode == 0, res.stderr[-3000:]
    assert rows_two.read_bytes() == rows_one.read_bytes()


def test_steering_table_reads_one_base_and_its_alphas():
    """Table 1 from summaries: the best alpha of the first steered base only; a second steered base's
    alphas (chat+prefix beside chat) and prompt-only names are parsed, not mixed in by prefix."""
    from ctxaware.evaluation.nih import steering_table

    r = lambda v: {"recall": {"mean": v}}  # noqa: E731
    conds = {"chat": r(0.2), "plain": r(0.6), "chat+steer0.1": r(0.4), "chat+steer0.5": r(0.3),
             "chat+prefix+steer0.1": r(0.1), "chat+prefix+steer0.3": r(0.9)}  # fmt: skip
    md = steering_table({"m": conds})
    assert "| m (chat) | 0.200 | 0.400 (alpha=0.1) | 0.600 |" in md
    md = steering_table({"m": {"chat": r(0.2), "chat+steer0.01+promptonly": r(0.5)}})
    assert "0.500 (alpha=0.01)" in md
