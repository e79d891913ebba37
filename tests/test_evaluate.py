"""`ctxaware eval` end to end: resume, MT-Bench with a stub judge, MemoTrap, checkpoint sweeps, steering
hook, summary layout (tiny random model), and the real SmolLM2 on SQuAD."""

from __future__ import annotations

import contextlib
import json

import pytest

from ctxaware.commands import eval as eval_command
from ctxaware.core.errors import CtxawareError
from ctxaware.core.models import run_id
from ctxaware.evaluation import qa as ev
from ctxaware.evaluation.judge import HTTPJudge
from ctxaware.evaluation.qa import EvalConfig, evaluate_tasks, expand_models, summary_markdown
from tests.conftest import one_and_two_processes, tiny_llama
from tests.test_judge import Stub


@pytest.fixture(scope="module")
def tiny(smollm2_tok):
    return tiny_llama(), smollm2_tok


def _cfg(shared_data, **kw):
    base = dict(limit=3, max_new_tokens=4, mt_bench_max_new_tokens=4, batch_size=4, data_dir=str(shared_data))
    return EvalConfig(**{**base, **kw})


def test_resume_skips_done_rows_and_extends_limit(tiny, shared_data, tmp_path, monkeypatch):
    model, tok = tiny
    calls = []
    real = ev.generate
    monkeypatch.setattr(ev, "generate", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    r1 = evaluate_tasks(model, tok, ["cf_world_facts"], _cfg(shared_data), mode="plain", output_dir=tmp_path)
    assert r1["cf_world_facts"]["n"] == 3 and calls == [3]
    rows = [json.loads(x) for x in (tmp_path / "cf_world_facts" / "rows.jsonl").read_text().splitlines()]
    assert {"prompt", "output", "prediction", "gold", "memory_answers", "scores"} <= set(rows[0])
    assert rows[0]["prompt"].startswith("Background: ") and rows[0]["prompt"].endswith("\nAnswer:")
    r2 = evaluate_tasks(model, tok, ["cf_world_facts"], _cfg(shared_data), mode="plain", output_dir=tmp_path)
    assert r2["cf_world_facts"]["resumed"] == 3 and calls == [3]  # nothing generated again
    r3 = evaluate_tasks(
        model, tok, ["cf_world_facts"], _cfg(shared_data, limit=5), mode="plain", output_dir=tmp_path
    )
    assert r3["cf_world_facts"]["n"] == 5 and calls == [3, 2]  # the seeded sample of 5 extends the 3
    assert set(r3["cf_world_facts"]["metrics"]) >= {"p_s", "p_o", "memorization_ratio"}
    with pytest.raises(CtxawareError, match="different configuration"):
        evaluate_tasks(
            model, tok, ["cf_world_facts"], _cfg(shared_data, seed=1), mode="plain", output_dir=tmp_path
        )


def test_chat_mode_indicator_and_batch_context(tiny, shared_data):
    model, tok = tiny
    seen = []

    @contextlib.contextmanager
    def hook(batch):
        seen.append(batch.input_ids.shape)
        yield

    res = evaluate_tasks(
        model, tok, ["squad"], _cfg(shared_data, limit=2, indicator=True), mode="chat", batch_context=hook
    )
    assert res["squad"]["n"] == 2 and seen and res["squad"]["skipped"]["total"] == 333
    assert {"contains", "contains_strict", "em", "f1"} <= set(res["squad"]["metrics"])


def test_memotrap_scores_classes(tiny, shared_data):
    model, tok = tiny
    res = evaluate_tasks(model, tok, ["memotrap", "drop"], _cfg(shared_data, limit=2), mode="plain")
    assert res["memotrap"]["n"] == 2 and "accuracy" in res["memotrap"]["metrics"]
    assert "drop_f1" in res["drop"]["metrics"]


def test_mt_bench_failed_judgment_is_not_a_finished_row(tiny, shared_data, tmp_path):
    model, tok = tiny
    stub = Stub(reply="Fine. [[6]]", fail=1)  # the first example's turn-1 judgment fails (retries=0)
    try:
        judge = HTTPJudge(stub.url, retries=0, backoff=0)
        res = evaluate_tasks(
            model,
            tok,
            ["mt-bench"],  # the old spelling is an alias of mt_bench
            _cfg(shared_data, limit=2),
            mode="chat",
            output_dir=tmp_path,
            judge=judge,
        )
    finally:
        stub.close()
    rows = [json.loads(x) for x in (tmp_path / "mt_bench" / "rows.jsonl").read_text().splitlines()]
    # the example whose judgment failed is not written (judge.run_mtbench): the next run redoes it
    assert len(rows) == 1 and len(rows[0]["answers"]) == 2 and not any(rows[0]["judge_errors"])
    assert res["mt_bench"]["judge_failures"] == 1 and res["mt_bench"]["metrics"]["rating"]["mean"] == 6.0
    assert len(stub.requests) == 3  # its turn 2 was never sent (issue 23 §2); the other example's two were
    sent = stub.requests[-1]["body"]["messages"][1]["content"]
    assert rows[0]["turns"][0] in sent or rows[0]["turns"][1] in sent


def test_unknown_task_lists_available():
    with pytest.raises(CtxawareError, match="available tasks: .*nqswap"):
        eval_command.main(["squadd"])


def test_checkpoint_sweep_steering_and_summary(tiny, shared_data, tmp_path, monkeypatch):
    model, tok = tiny
    for step in (100, 20, 3):
        (tmp_path / "ckpts" / f"checkpoint-{step}").mkdir(parents=True)
    assert [p.rsplit("-", 1)[1] for p in expand_models(str(tmp_path / "ckpts"))] == ["3", "20", "100"]
    monkeypatch.setattr(EvalConfig, "load", lambda self, spec=None: (model, tok))
    calls = []
    import ctxaware.attention.steering

    monkeypatch.setattr(
        ctxaware.attention.steering,
        "batch_context",
        lambda m, heads, alpha, steer_generated: (
            calls.append((heads, alpha, steer_generated)) or (lambda b: contextlib.nullcontext())
        ),
    )
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"0": [1, 2]}))
    out = tmp_path / "out"
    rc = eval_command.main(
        [
            "cf_world_facts",
            "--model",
            str(tmp_path / "ckpts"),
            "--modes",
            "plain",
            "--limit",
            "2",
            "--max-new-tokens",
            "3",
            "--data-dir",
            str(shared_data),
            "--output",
            str(out),
            "--steer",
            str(heads),
            "--alpha",
            "0.5",
        ]
    )
    assert rc == 0 and calls == [({0: [1, 2]}, 0.5, True)] * 3  # eq. (1) as stated by default
    assert (out / "context_reliance.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["results"]) == expand_models(str(tmp_path / "ckpts"))
    md = (out / "summary.md").read_text()
    assert "| Model | Condition | cf_world_facts p_s | cf_world_facts p_o |" in md
    # issue 26 §3: lm-eval's results.json shape beside it, the same numbers (several models: suffixed names)
    lm = json.loads((out / "results.json").read_text())
    assert {"results", "configs", "versions", "n-samples", "n-shot", "higher_is_better", "config"} <= set(lm)
    for spec, conds in summary["results"].items():
        (r,) = [tasks["cf_world_facts"] for tasks in conds.values()]  # one condition per checkpoint
        name = next(
            k for k in lm["results"] if k.startswith("ctxaware_cf_world_facts") and k.endswith(run_id(spec))
        )
        assert lm["results"][name]["p_s,none"] == r["metrics"]["p_s"]["mean"]
        assert lm["n-samples"][name]["effective"] == r["n"] and lm["higher_is_better"][name]["p_o"] is False


def test_summary_table_layout():
    s = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 10}
    res = {
        "m": {
            "chat": {
                "squad": {"kind": "qa", "n": 10, "skipped": {"total": 0}, "metrics": {"contains": s}},
                "drop": {
                    "kind": "qa",
                    "n": 10,
                    "skipped": {"total": 333, "by_reason": {"unanswerable": 333}},
                    "metrics": {"contains": s},
                },
                "memotrap": {"kind": "choice", "n": 4, "skipped": {"total": 0}, "metrics": {"accuracy": s}},
                "mt_bench": {
                    "kind": "mtbench",
                    "n": 2,
                    "skipped": {"total": 0},
                    "metrics": {"rating": {"mean": 5.0, "ci_low": 4.0, "ci_high": 6.0, "n": 2}},
                },
            }
        }
    }
    md = summary_markdown(res)
    assert (
        md.splitlines()[0]
        == "| Model | Condition | squad | drop | QA avg. | memotrap | mt_bench (judge, 1-10) |"
    )
    details = md.split("\n\n")[1].splitlines()
    assert details[0].endswith(
        "bootstrap for F1 and ratings]; percent, ratings on 1-10) |"
    )  # names its intervals
    assert "| m | chat | mt_bench | 2 | 0 | rating 5.0 [4.0, 6.0] |" in details  # a rating, not 500 %
    # issue 27 §3: the skip count explains itself; a log-likelihood metric says it is one
    assert "| m | chat | drop | 10 | 333 (333 unanswerable) | contains 50.0 [40.0, 60.0] |" in details
    assert any("| memotrap |" in d and "log-likelihood of the candidate continuations" in d for d in details)
    assert (
        "| m | chat | 50.0 [40.0, 60.0] | 50.0 [40.0, 60.0] | 50.0 | 50.0 [40.0, 60.0] | 5.0 [4.0, 6.0] |"
        in md
    )


def test_real_smollm2_squad_end_to_end(smollm2, shared_data, tmp_path, monkeypatch):
    """``ctxaware eval squad --limit 4`` on the real SmolLM2-135M-Instruct, with and without the template."""
    from ctxaware.cli import main

    monkeypatch.setattr(EvalConfig, "load", lambda self, spec=None: smollm2)  # the session's loaded model
    rc = main(
        [
            "eval",
            "squad",
            "--limit",
            "4",
            "--max-new-tokens",
            "20",
            "--batch-size",
            "4",
            "--data-dir",
            str(shared_data),
            "--output",
            str(tmp_path),
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["results"]["smollm2-135m-instruct"]
    chat = summary["chat"]["squad"]
    assert chat["n"] == 4 and chat["skipped"]["total"] == 333
    assert chat["metrics"]["empty"]["mean"] == 0.0  # with the template the model always answers
    rows = [
        json.loads(x)
        for x in (tmp_path / "smollm2-135m-instruct" / "chat" / "squad" / "rows.jsonl")
        .read_text()
        .splitlines()
    ]
    assert all(r["prompt"].startswith("<|im_start|>") for r in rows)
    assert "Answer the question according to the above passage:" in rows[0]["prompt"]
    assert "plain" in summary and (tmp_path / "summary.md").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["squad", "--limit", "-3"], "--limit -3"),
        (["squad", "--limit", "0"], "--limit 0"),
        (["squad", "--limit", "-1"], "--limit -1"),
        (["squad", "--qa-cut", "word"], "--qa-cut"),
        (["squadd"], "available tasks"),
    ],
)
def test_bad_options_fail_before_any_model_loads(argv, message, monkeypatch, capsys):
    from ctxaware.cli import main

    def no_load(self, spec=None):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(EvalConfig, "load", no_load)
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_eval_help_lists_tasks(capsys):
    from ctxaware.data.tasks import TASKS

    with pytest.raises(SystemExit):
        eval_command.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(t in out for t in TASKS) and "mt_bench" in out


def test_authors_cut_and_quac_unanswerable_scored_zero(tiny, shared_data, tmp_path, monkeypatch):
    """QA stops at ". " and keeps the text before it (lm-eval generate_until); QuAC keeps unanswerable
    first questions, which score 0; the summary counts rows where `contains` and `contains_strict` differ."""
    from ctxaware.rendering.generate import Generation

    model, tok = tiny
    seen = {}

    def fake_generate(model, tok, prompts, max_new_tokens, stop, **kw):
        seen["stop"], seen["max_new_tokens"] = stop, max_new_tokens
        return [Generation(" she married Nikos Karvelas. Then more.", [], 0, "stop") for _ in prompts]

    monkeypatch.setattr(ev, "generate", fake_generate)
    res = evaluate_tasks(model, tok, ["quac"], _cfg(shared_data, limit=None, max_new_tokens=100), mode="chat",
                         output_dir=tmp_path)  # fmt: skip
    assert seen == {"stop": (". ",), "max_new_tokens": 100}
    rows = [json.loads(x) for x in (tmp_path / "quac" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and all(r["prediction"] == " she married Nikos Karvelas" for r in rows)
    unans = [r for r in rows if r["gold"] == ["CANNOTANSWER"]]
    assert len(unans) == 3 and all(r["scores"]["contains"] == 0.0 for r in unans)
    first = next(r for r in rows if r["id"] == "0_q1")
    assert first["scores"]["contains"] == 0.0  # gold "In May 1983, she married Nikos Karvelas," not contained
    assert res["quac"]["contains_disagreements"] == sum(
        r["scores"]["contains"] != r["scores"]["contains_strict"] for r in rows
    )


def test_two_models_named_model_get_their_own_output_dirs(smollm2_tok, tmp_path):
    """``.../a/model`` and ``.../b/model`` must not write into one directory (nih's run ids are used)."""
    from ctxaware.core.models import run_id

    specs = []
    for name in ("a", "b"):
        d = tmp_path / name / "model"
        tiny_llama().save_pretrained(d)
        smollm2_tok.save_pretrained(d)
        specs.append(str(d))
    out = tmp_path / "out"
    argv = ["cf_world_facts", "--model", ",".join(specs), "--limit", "1", "--max-new-tokens", "1",
            "--modes", "chat", "--device", "cpu", "--output", str(out)]  # fmt: skip
    assert eval_command.main(argv) == 0
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == sorted(run_id(s) for s in specs) and len(set(dirs)) == 2
    for d in dirs:
        assert (out / d / "chat" / "cf_world_facts" / "rows.jsonl").is_file()


def test_two_processes_give_the_one_process_rows_byte_for_byte(tmp_path, shared_data):
    """Issue 25 section 2: ``torchrun --nproc_per_node 2 -m ctxaware.cli eval`` shares the QA chunks between
    the ranks; rank 0's merged rows equal a one-process run's byte for byte (real SmolLM2, 12 SQuAD
    questions in 3 chunks of 4), and its summary is the same."""
    argv = ["eval", "squad", "--model", "default", "--modes", "chat", "--limit", "12", "--batch-size", "4",
            "--max-new-tokens", "16", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    one, two, _ = one_and_two_processes(argv, tmp_path)
    (rows_one,) = one.rglob("rows.jsonl")
    rows_two = two / rows_one.relative_to(one)
    assert len(rows_one.read_text().splitlines()) == 12
    assert rows_two.read_bytes() == rows_one.read_bytes()
    m1 = json.loads((rows_one.parent / "summary.json").read_text())["metrics"]
    m2 = json.loads((rows_two.parent / "summary.json").read_text())["metrics"]
    assert m1 == m2
