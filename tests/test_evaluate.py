"""`ctxaware eval` end to end: resume, MT-Bench with a stub judge, MemoTrap, checkpoint sweeps, steering
hook, summary layout (tiny random model), and the real SmolLM2 on SQuAD."""

from __future__ import annotations

import contextlib
import json

import pytest

from ctxaware import evaluate as ev
from ctxaware.errors import CtxawareError
from ctxaware.evaluate import EvalConfig, evaluate_tasks, expand_models, summary_markdown
from ctxaware.judge import HTTPJudge
from tests.conftest import tiny_llama
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
    assert {"containment", "em", "f1"} <= set(res["squad"]["metrics"])


def test_memotrap_scores_classes(tiny, shared_data):
    model, tok = tiny
    res = evaluate_tasks(model, tok, ["memotrap", "drop"], _cfg(shared_data, limit=2), mode="plain")
    assert res["memotrap"]["n"] == 2 and "accuracy" in res["memotrap"]["metrics"]
    assert "drop_f1" in res["drop"]["metrics"]


def test_mt_bench_with_stub_judge_keeps_generations_on_failure(tiny, shared_data, tmp_path):
    model, tok = tiny
    stub = Stub(reply="Fine. [[6]]", fail=2)  # the first example's two judgments fail (retries=0)
    try:
        judge = HTTPJudge(stub.url, retries=0, backoff=0)
        res = evaluate_tasks(
            model,
            tok,
            ["mt-bench"],
            _cfg(shared_data, limit=2),
            mode="chat",
            output_dir=tmp_path,
            judge=judge,
        )
    finally:
        stub.close()
    rows = [json.loads(x) for x in (tmp_path / "mt-bench" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["answers"]) == 2 for r in rows)
    failed = [r for r in rows if any(r["judge_errors"])]
    assert len(failed) == 1 and failed[0]["scores"]["rating"] is None
    assert res["mt-bench"]["judge_failures"] == 2 and res["mt-bench"]["metrics"]["rating"]["mean"] == 6.0
    sent = stub.requests[-1]["body"]["messages"][1]["content"]
    assert any(r["turns"][0] in sent or r["turns"][1] in sent for r in rows)


def test_unknown_task_lists_available():
    with pytest.raises(CtxawareError, match="available tasks: .*nqswap"):
        ev.main(["squadd"])


def test_checkpoint_sweep_steering_and_summary(tiny, shared_data, tmp_path, monkeypatch):
    model, tok = tiny
    for step in (100, 20, 3):
        (tmp_path / "ckpts" / f"checkpoint-{step}").mkdir(parents=True)
    assert [p.rsplit("-", 1)[1] for p in expand_models(str(tmp_path / "ckpts"))] == ["3", "20", "100"]
    monkeypatch.setattr(EvalConfig, "load", lambda self, spec=None: (model, tok))
    calls = []
    import ctxaware.steering

    monkeypatch.setattr(
        ctxaware.steering,
        "batch_context",
        lambda m, heads, alpha: calls.append((heads, alpha)) or (lambda b: contextlib.nullcontext()),
    )
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps({"0": [1, 2]}))
    out = tmp_path / "out"
    rc = ev.main(
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
    assert rc == 0 and calls == [({0: [1, 2]}, 0.5)] * 3
    assert (out / "context_reliance.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["results"]) == expand_models(str(tmp_path / "ckpts"))
    md = (out / "summary.md").read_text()
    assert "| Model | Condition | cf_world_facts p_s | cf_world_facts p_o |" in md


def test_summary_table_layout():
    s = {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 10}
    res = {
        "m": {
            "chat": {
                "squad": {"kind": "qa", "n": 10, "skipped": {"total": 0}, "metrics": {"containment": s}},
                "drop": {"kind": "qa", "n": 10, "skipped": {"total": 0}, "metrics": {"containment": s}},
                "mt-bench": {
                    "kind": "mtbench",
                    "n": 2,
                    "skipped": {"total": 0},
                    "metrics": {"rating": {"mean": 5.0, "ci_low": 4.0, "ci_high": 6.0, "n": 2}},
                },
            }
        }
    }
    md = summary_markdown(res)
    assert md.splitlines()[0] == "| Model | Condition | squad | drop | QA avg. | mt-bench (judge) |"
    assert "| m | chat | 50.0 [40.0, 60.0] | 50.0 [40.0, 60.0] | 50.0 | 5.0 [4.0, 6.0] |" in md


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
    summary = json.loads((tmp_path / "summary.json").read_text())["results"]["default"]
    chat = summary["chat"]["squad"]
    assert chat["n"] == 4 and chat["skipped"]["total"] == 333
    assert chat["metrics"]["empty"]["mean"] == 0.0  # with the template the model always answers
    rows = [
        json.loads(x)
        for x in (tmp_path / "default" / "chat" / "squad" / "rows.jsonl").read_text().splitlines()
    ]
    assert all(r["prompt"].startswith("<|im_start|>") for r in rows)
    assert "Answer the question according to the above passage:" in rows[0]["prompt"]
    assert "plain" in summary and (tmp_path / "summary.md").is_file()
