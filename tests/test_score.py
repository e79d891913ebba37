"""Context-dependency score (paper eq. 2) against an eager ``output_attentions=True`` oracle, plus the
``ctxaware score`` run: truncation, bad rows, kill-and-resume and the two-process sharded run."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctxaware.commands import score as score_command
from ctxaware.data.conversations import load_conversations
from ctxaware.rendering.chat import render, with_empty_system
from ctxaware.scoring import score as S
from tests.conftest import REPO, SHARED_DATA, tiny_llama

SFT = SHARED_DATA / "sft"


def _convs(name: str, n: int, min_turns: int = 1, shortest_of: int | None = None) -> list:
    """``n`` conversations with at least ``min_turns`` turns (the shortest of the first ``shortest_of``)."""
    convs, _ = load_conversations(SFT / name)
    convs = [c for c in convs if sum(m["role"] == "assistant" for m in c.messages) >= min_turns]
    if shortest_of:
        convs = sorted(convs[:shortest_of], key=lambda c: sum(len(m["content"]) for m in c.messages))
    return convs[:n]


@pytest.fixture(scope="module")
def eager(smollm2):
    """The same SmolLM2 weights with eager attention, for ``output_attentions=True``."""
    from ctxaware.core.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32", attn_implementation="eager")[0]


def oracle(eager_model, tok, messages, layers, variants=({},), max_tokens=None):
    """eq. (2) computed directly: full eager forward, every layer's attention map, then sums over U_m.

    Returns ``{(layer, i): [score per turn]}`` for each head variant ``variants[i]`` (``head_reduce``/``head``).
    """
    r = render(messages, tok, "chat", add_generation_prompt=False)
    T = len(r) if max_tokens is None else min(len(r), max_tokens)
    with torch.no_grad():
        att = eager_model(torch.tensor([r.input_ids[:T]]), output_attentions=True).attentions
    out = {}
    for layer in layers:
        A = att[layer][0]  # (H, T, T)
        for i, v in enumerate(variants):
            scores = []
            for span in [s for s in r.spans if s.role == "assistant"]:
                ys = [p for p in range(span.start, min(span.end, T)) if r.roles[p] == "assistant"]
                U = [p for p in range(span.start) if r.roles[p] == "user"]  # X_1..X_m content tokens
                if not ys:
                    scores.append(None)
                    continue
                mass = A[:, ys][:, :, U].sum(-1)  # (H, |Y_m|)
                if v.get("head") is not None:
                    per = mass[v["head"]]
                else:
                    per = mass.mean(0) if v.get("head_reduce") == "mean" else mass.max(0).values
                scores.append(float(per.mean()))
            out[layer, i] = scores
    return out


def test_scores_equal_eager_oracle(smollm2, eager):
    model, tok = smollm2
    convs = _convs("sharegpt_dummy_conversation.json", 2, min_turns=3)
    convs += _convs("messages_sft_demo.jsonl", 1, shortest_of=40) + _convs(
        "alpaca_en_demo.json", 1, shortest_of=40
    )
    layers, variants = [3, 15, 29], ({}, {"head_reduce": "mean"}, {"head": 4})
    lays = [S.layout(c.messages, tok, protocol="ctxaware") for c in convs]
    assert sum(len(x.turns) for x in lays) >= 8
    got = {
        i: S.score_layouts(model, lays, layers, pad_id=tok.pad_token_id, **v) for i, v in enumerate(variants)
    }
    for b, c in enumerate(convs):  # one batched pass per variant, all layers at once
        ref = oracle(eager, tok, c.messages, layers, variants)
        for (layer, i), want in ref.items():
            for turn, (r, w) in enumerate(zip(got[i][b], want)):
                assert abs(r["scores"][layer] - w) < 1e-4, (c.id, layer, variants[i], turn)


def test_batched_equals_unbatched(smollm2):
    model, tok = smollm2
    convs = _convs("sharegpt_dummy_conversation.json", 3) + _convs(
        "messages_sft_demo.jsonl", 1, shortest_of=40
    )
    lays = [S.layout(c.messages, tok) for c in convs]
    batched = S.score_layouts(model, lays, [4], pad_id=tok.pad_token_id)  # left padding up to the longest
    for lay, b in zip(lays, batched):
        (one,) = S.score_layouts(model, [lay], [4], pad_id=tok.pad_token_id)
        for x, y in zip(one, b):
            assert abs(x["scores"][4] - y["scores"][4]) < 1e-5


def test_truncation_scores_what_remains(smollm2, eager):
    model, tok = smollm2
    (c,) = _convs("sharegpt_dummy_conversation.json", 1, min_turns=2)
    full = S.layout(c.messages, tok, None, "ctxaware")
    cut = full.turns[0].positions[len(full.turns[0].positions) // 2]  # inside Y_1: Y_2 is cut away
    lay = S.layout(c.messages, tok, cut, "ctxaware")
    t0, t1 = lay.turns[0], lay.turns[1]
    assert t0.truncated and t0.skipped is None and len(t0.positions) < len(full.turns[0].positions)
    assert t1.skipped and "truncated away" in t1.skipped
    got = S.context_dependency_score(model, tok, c.messages, 15, max_tokens=cut, protocol="ctxaware")
    ref = oracle(eager, tok, c.messages, [15], max_tokens=cut)[15, 0]
    assert got[1] is None and abs(got[0] - ref[0]) < 1e-4


def test_layer_out_of_range_is_an_error(smollm2):
    from ctxaware.core.errors import CtxawareError

    model, tok = smollm2
    with pytest.raises(CtxawareError, match="out of range"):
        S.context_dependency_score(
            model, tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], 30
        )


# ----------------------------------------------------------------------------- the run (tiny model)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tok) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (chat template) saved as a model directory."""
    d = tmp_path_factory.mktemp("tiny")
    tiny_llama(layers=4).save_pretrained(d)
    smollm2_tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """120 ShareGPT rows plus bad rows: empty message, unknown role, non-string content, same-role turns."""
    rows = json.loads((SFT / "sharegpt_dummy_conversation.json").read_text())[:120]
    rows[3] = {
        "id": "bad_empty",
        "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "x"}],
    }
    rows[7] = {
        "id": "bad_role",
        "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}],
    }
    rows[9] = {
        "id": "bad_type",
        "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}],
    }
    rows[11] = {"id": "bad_shape", "conversations": "oops"}
    long = " ".join(["word"] * 300)
    rows[13] = {"id": "long", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": long},
                                                 {"from": "human", "value": "More"}, {"from": "gpt", "value": "ok"}]}  # fmt: skip
    p = tmp_path_factory.mktemp("data") / "small.json"
    p.write_text(json.dumps(rows))
    return p


def _cmd(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ctxaware.cli", "score", str(data), "--model", str(model), "--device", "cpu",
            "--output", str(out), "--max-tokens", "200", "--layers", "1,3", "--heads", "--no-progress", *extra]  # fmt: skip


def _env(**kw) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO)}
    env.update(kw)
    return env


@pytest.fixture(scope="module")
def reference(tiny_dir, small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "scores.jsonl"
    proc = subprocess.run(_cmd(small_data, tiny_dir, out, "--max-batch", "4"), env=_env(), check=True,
                          capture_output=True, text=True)  # fmt: skip
    assert "tokens/s" in proc.stdout  # every run prints its throughput
    return out


def test_run_rows_and_bad_input(reference):
    rows = [json.loads(line) for line in reference.read_text().splitlines()]
    summary = json.loads(reference.with_suffix(".summary.json").read_text())
    assert [(r["source_row"], r["turn"]) for r in rows] == sorted((r["source_row"], r["turn"]) for r in rows)
    assert summary["skipped_rows"]["total"] == 4  # empty, unknown role, non-string, bad shape
    long = [r for r in rows if r["conversation_id"] == "long"]
    assert long[0]["truncated"] and long[0]["score"] is not None
    assert long[1]["score"] is None and "truncated away" in long[1]["skipped"]
    assert summary["skipped_turns"]["total"] == 1 and summary["n_truncated"] >= 1
    assert all(len(r["heads"]) == 4 for r in rows if r["score"] is not None)
    # default layer round(15/22 * 4) = 3 (the paper's relative depth), plus --layers 1,3
    assert summary["layers"] == [1, 3] and summary["max_tokens"] == 200
    assert all(set(r["scores"]) == {"1", "3"} for r in rows if r["score"] is not None)
    assert len(rows) == summary["n_turns"] == summary["n_scored"] + 1
    tp = summary["throughput"]  # tokens/s recorded in the summary (issue 13)
    assert tp["tokens"] > 0 and tp["tokens_per_s"] > 0 and tp["wall_seconds_with_load"] >= tp["seconds"]


def test_kill_and_resume_gives_the_same_file(tiny_dir, small_data, reference, tmp_path):
    out = tmp_path / "scores.jsonl"
    part = tmp_path / "scores.jsonl.work" / "part-000-of-001.jsonl"
    proc = subprocess.Popen(_cmd(small_data, tiny_dir, out, "--max-batch", "4"), env=_env())
    while proc.poll() is None and (not part.exists() or len(part.read_bytes().splitlines()) < 4):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()
    n_before = len(part.read_bytes().splitlines())
    subprocess.run(_cmd(small_data, tiny_dir, out, "--max-batch", "4"), env=_env(), check=True)
    assert out.read_text() == reference.read_text()
    assert n_before < len(reference.read_text().splitlines())


PART = "part-000-of-001.jsonl"


def test_resume_from_random_kill_points_is_byte_identical(tiny_dir, small_data, reference, tmp_path):
    """Issue 23 §6, the fault test: what a kill can leave of an append-only rows file is a prefix of it, cut
    anywhere (between rows, inside a batch of 4, mid-line). Resume from random cuts (seeded) of the
    uninterrupted run's part file; the scores file equals the uninterrupted one byte for byte."""
    ref_work = reference.with_name("scores.jsonl.work")
    raw = (ref_work / PART).read_bytes()
    ends = [i + 1 for i, b in enumerate(raw) if b == ord("\n")]
    rng = random.Random(2023)
    inside = [e for n, e in enumerate(ends[:-1], 1) if n % 4][:40]  # after a row that does not end a batch
    torn = rng.randrange(1, len(raw))  # anywhere, most likely mid-line
    cuts = sorted({rng.choice(inside), torn if raw[torn - 1] != ord("\n") else torn - 1, 0})
    for i, cut in enumerate(cuts):
        out = tmp_path / f"cut{i}" / "scores.jsonl"
        shutil.copytree(ref_work, out.with_name("scores.jsonl.work"))
        (out.with_name("scores.jsonl.work") / PART).write_bytes(raw[:cut])
        subprocess.run(_cmd(small_data, tiny_dir, out, "--max-batch", "4"), env=_env(), check=True,
                       capture_output=True)  # fmt: skip
        assert out.read_bytes() == reference.read_bytes(), f"resume from byte {cut} of {len(raw)} differs"


def _file_size_limit(limit: int):
    def set_limit() -> (
        None
    ):  # in the child: writes past ``limit`` bytes fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def _one_line_disk_error(proc: subprocess.CompletedProcess, reason: str) -> None:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and reason in errors[0] and "rerun the same command to resume" in errors[0]


def test_disk_full_mid_run_keeps_rows_and_resumes(tiny_dir, small_data, reference, tmp_path):
    """Issue 23 §4: a write that finds no room (here the process's file-size limit, EFBIG, half-way through
    the rows) ends the run with one line and exit 1, keeps the finished rows, and the rerun resumes to the
    uninterrupted run's bytes."""
    out = tmp_path / "scores.jsonl"
    part = out.with_name("scores.jsonl.work") / PART
    limit = len((reference.with_name("scores.jsonl.work") / PART).read_bytes()) // 2
    proc = subprocess.run(_cmd(small_data, tiny_dir, out, "--max-batch", "4"), env=_env(), text=True,
                          capture_output=True, preexec_fn=_file_size_limit(limit))  # fmt: skip
    _one_line_disk_error(proc, "file too large")
    assert not out.exists() and 0 < part.stat().st_size <= limit
    kept = part.read_bytes()[: part.read_bytes().rfind(b"\n") + 1]
    subprocess.run(
        _cmd(small_data, tiny_dir, out, "--max-batch", "4"), env=_env(), check=True, capture_output=True
    )
    assert out.read_bytes() == reference.read_bytes()
    assert part.read_bytes().startswith(kept)  # the rows written before the disk filled were not redone


def test_no_space_left_on_a_real_file_system(tiny_dir, small_data, reference, tmp_path):
    """The same on a real full file system (ENOSPC): a 64 KiB tmpfs that the rows outgrow. Needs the right
    to mount (root in a container); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        out = mnt / "scores.jsonl"
        proc = subprocess.run(_cmd(small_data, tiny_dir, out, "--max-batch", "4"), env=_env(), text=True,
                              capture_output=True)  # fmt: skip
        if proc.returncode == 0:
            pytest.fail("the rows fit in 64 KiB; the test needs a larger dataset")
        _one_line_disk_error(proc, "no space left")
        part = out.with_name("scores.jsonl.work") / PART
        assert part.stat().st_size > 0 and not out.exists()
        shutil.copytree(out.with_name("scores.jsonl.work"), tmp_path / "scores.jsonl.work")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    out = tmp_path / "scores.jsonl"
    subprocess.run(
        _cmd(small_data, tiny_dir, out, "--max-batch", "4"), env=_env(), check=True, capture_output=True
    )
    assert out.read_bytes() == reference.read_bytes()


def test_two_process_run_equals_single_process(tiny_dir, small_data, reference, tmp_path):
    out = tmp_path / "scores.jsonl"
    cmd = _cmd(small_data, tiny_dir, out, "--max-batch", "4")
    if shutil.which("torchrun"):
        launch = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "ctxaware.cli", *cmd[3:]]
        subprocess.run(launch, env=_env(), check=True)
    else:  # two plain processes with the variables torchrun would set
        procs = [subprocess.Popen(cmd, env=_env(RANK=str(r), WORLD_SIZE="2")) for r in range(2)]
        assert [p.wait() for p in procs] == [0, 0]
    parts = sorted(p.name for p in (tmp_path / "scores.jsonl.work").glob("part-*"))
    assert parts == ["part-000-of-002.jsonl", "part-001-of-002.jsonl"]
    assert out.read_text() == reference.read_text()


@pytest.mark.slow  # about 35 s on 2 shared cores
def test_two_process_accelerate_launch_gloo_equals_single_process(tiny_dir, small_data, reference, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only host (accelerate's ``--cpu`` alone starts
    one process unless MPI is set up): two CPU ranks join a gloo group; same bytes as one process."""
    if not shutil.which("accelerate"):
        pytest.skip("accelerate is not installed")
    out = tmp_path / "scores.jsonl"
    cmd = _cmd(small_data, tiny_dir, out, "--max-batch", "4")
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
              "-m", "ctxaware.cli", *cmd[3:]]  # fmt: skip
    proc = subprocess.run(launch, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = sorted(p.name for p in (tmp_path / "scores.jsonl.work").glob("part-*"))
    assert parts == ["part-000-of-002.jsonl", "part-001-of-002.jsonl"]
    assert out.read_text() == reference.read_text()
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert (
        summary["world_size"] == 2 and summary["throughput"]["ranks"] == "all"
    )  # the gloo group summed them


# ----------------------------------------------------------------------------- defaults, checks, paths


def test_default_layer_and_token_cut_follow_the_paper():
    from types import SimpleNamespace as NS

    def model(n, window=None):
        return NS(config=NS(num_hidden_layers=n, max_position_embeddings=window))

    assert S.default_layer(model(22)) == 15  # the paper's seed: TinyLlama, layer 15 of 22
    assert (
        S.default_layer(model(30)) == 20
        and S.default_layer(model(18)) == 12
        and S.default_layer(model(1)) == 0
    )
    assert S.default_max_tokens(model(22, 2048)) == 2047  # the paper's cut
    assert S.default_max_tokens(model(22, 1024)) == 1024  # clamped to the window
    assert (
        S.default_max_tokens(model(22, 1024), 4096) == 1024
        and S.default_max_tokens(model(22, 8192), 4096) == 4096
    )


@pytest.mark.parametrize("bad", [["--limit", "-2"], ["--max-tokens", "0"], ["--method", "fast"]])
def test_bad_options_fail_before_loading(bad, tmp_path):
    """One-line CtxawareError before any data or model is read (the model named here does not exist)."""
    from ctxaware.core.errors import CtxawareError

    with pytest.raises(CtxawareError) as e:
        score_command.main([str(SFT / "alpaca_en_demo.json"), "--model", str(tmp_path / "no-model"), *bad])
    assert "\n" not in str(e.value) and "no-model" not in str(e.value)


def test_onehot_equals_chunked_scores(smollm2):
    """The two exact capture paths (the model's kernel with V = user indicator; softmax rows) agree."""
    model, tok = smollm2
    convs = _convs("sharegpt_dummy_conversation.json", 3, min_turns=2, shortest_of=80)
    lays = [S.layout(c.messages, tok, protocol="ctxaware") for c in convs]
    a = S.score_layouts(model, lays, [2, 20], pad_id=tok.pad_token_id, method="onehot")
    b = S.score_layouts(model, lays, [2, 20], pad_id=tok.pad_token_id, method="chunked")
    pairs = [
        (x["scores"][k], y["scores"][k]) for ca, cb in zip(a, b) for x, y in zip(ca, cb) if x for k in (2, 20)
    ]
    assert len(pairs) >= 8 and max(abs(x - y) for x, y in pairs) < 1e-5


def test_a_model_without_chat_template_is_a_configuration_error(tmp_path, smollm2_tok, capsys):
    """Issue 23 §4: scoring with a base model (no template) is one line and exit 2, not a run that skips
    every turn and exits 0; nothing is written."""
    import copy

    from ctxaware.cli import main

    d = tmp_path / "base"
    tiny_llama(layers=2).save_pretrained(d)
    tok = copy.deepcopy(smollm2_tok)
    tok.chat_template = None
    tok.save_pretrained(d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "s.jsonl"
    capsys.readouterr()
    rc = main(
        ["score", str(SFT / "alpaca_en_demo.json"), "--model", str(d), "--limit", "3", "--output", str(out)]
    )
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("ctxaware")]  # the rest: weight-loading progress
    assert rc == 2 and "Traceback" not in err and len(errors) == 1 and "no chat template" in errors[0]
    assert not out.exists() and not out.with_name(out.name + ".work").exists()


def test_a_huge_row_is_cut_before_tokenizing(smollm2_tok):
    """Issue 23 §4: a 50 MB message is not tokenized whole (it took 95 s and 7 GB): the layout keeps the
    first max_tokens tokens of the full rendering, exactly, and later turns are skipped as truncated."""
    import time

    tok = smollm2_tok
    big = [{"role": "user", "content": "Q: " + "word " * 40000}, {"role": "assistant", "content": "A"},
           {"role": "user", "content": "more"}, {"role": "assistant", "content": "B"}]  # fmt: skip
    full = render(
        with_empty_system(big, tok), tok, "chat", add_generation_prompt=False, add_special_tokens=True
    )
    lay = S.layout(big, tok, 2047)
    assert lay.input_ids == full.input_ids[:2047]
    assert [t.skipped for t in lay.turns] == ["response truncated away (max_tokens=2047)"] * 2
    t0 = time.time()
    huge = S.layout(
        [{"role": "user", "content": "x " * 25_000_000}, {"role": "assistant", "content": "A"}], tok, 2047
    )
    assert time.time() - t0 < 10 and len(huge.input_ids) == 2047 and huge.turns[0].skipped
