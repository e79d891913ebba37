"""The experiment runner: indicator marking from scores, stage caching, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

from ctxaware.core.config import from_dict, load_yaml
from ctxaware.core.errors import CtxawareError
from ctxaware.experiment import ExperimentConfig, run, step_select
from ctxaware.training.sft import TrainConfig
from tests.conftest import SHARED_DATA, tiny_llama

RECIPES = Path(__file__).resolve().parents[1] / "src" / "ctxaware" / "recipes"


def test_select_stage_marks_selected_turns_and_caches(tmp_path):
    rows = [{"id": "c", "conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "q0"}, {"from": "gpt", "value": "a0"},
        {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
    ]}]  # fmt: skip
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"source_row": 0, "conversation_id": "c", "turn": t, "score": s}) + "\n"
                              for t, s in [(0, 0.3), (1, 0.9)]))  # fmt: skip
    cfg = ExperimentConfig(data=str(data), output_dir=str(tmp_path / "exp"))
    out = step_select(cfg, tmp_path, scores, 0.6)
    marked = json.loads(out.read_text())[0]["conversations"]
    assert [t["value"] for t in marked] == ["S", "q0", "a0", "q1 [IND]", "a1"]
    ratio = json.loads(out.with_suffix(".selection.json").read_text())
    assert (ratio["n_selected"], ratio["n_scored"], ratio["ratio"]) == (1, 2, 0.5)
    mtime = out.stat().st_mtime_ns
    assert step_select(cfg, tmp_path, scores, 0.6) == out and out.stat().st_mtime_ns == mtime  # cached
    step_select(cfg, tmp_path, scores, 0.2)
    assert json.loads((tmp_path / "data" / "marked_b0.2.selection.json").read_text())["n_selected"] == 2


@pytest.mark.parametrize("name", ["tinyllama_full", "llama_lora", "cpu_smoke"])
def test_recipes_parse(name):
    cfg = from_dict(TrainConfig, load_yaml(RECIPES / f"{name}.yaml"))
    assert cfg.chat_template == "zephyr" and cfg.loss_on == "all"  # the authors trained on all tokens
    if name == "llama_lora":
        assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.learning_rate) == (16, 16, 0.05, 2e-4)
        assert len(cfg.lora_target_modules) == 7
    if name == "tinyllama_full":
        assert (cfg.method, cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_ratio) == (
            "full",
            2e-5,
            "cosine",
            0.1,
        )
        # the paper's base and the authors' alignment-handbook batch: 16 per device x 2, max length 2048
        assert cfg.model == "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
        assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.max_length) == (
            16,
            2,
            2048,
        )
        assert cfg.num_train_epochs == 1


def test_tiny_end_to_end_and_cached_rerun(tmp_path, smollm2_tok, shared_data):
    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    smollm2_tok.save_pretrained(model_dir)
    small = dict(max_length=64, per_device_train_batch_size=2, save_steps=1000)
    cfg = ExperimentConfig(  # seed_model: trained (the default): the vanilla SFT is the seed that scores
        model={"model": str(model_dir), "device": "cpu", "dtype": "float32"},
        data=str(SHARED_DATA / "sft" / "sharegpt_dummy_conversation.json"), betas=[0.0],
        train=dict(small, max_conversations=6, max_steps=2),
        eval={"tasks": ["cf_world_facts"], "limit": 2, "max_new_tokens": 2}, output_dir=str(tmp_path / "exp"),
        post_stages=["dpo", "grpo"], dpo=dict(small, data=str(SHARED_DATA / "sft" / "dpo_en_demo.json"), max_pairs=2),
        grpo=dict(small, rl_tasks=["cf_world_facts"], rl_n=2, max_steps=1, max_completion_length=2, num_generations=2,
                  max_length=512),
        nih={"lengths": [120], "depths": [50.0]}, attention={"lengths": [120], "depths": [50.0]},
        stages={"n": 2, "tasks": ["cf_world_facts"]},
    )  # fmt: skip
    table = run(cfg)
    root = tmp_path / "exp"
    assert "vanilla" in table and "+indicator b=0.0" in table
    marked = json.loads((root / "data" / "marked_b0.0.json").read_text())
    assert len(marked) == 6 and all(r["conversations"][0]["value"].endswith("[IND]") for r in marked)
    assert (root / "train" / "vanilla" / "model" / "config.json").is_file()
    seed = json.loads((root / "scores.seed.json").read_text())["seed_model"]
    assert seed == str(root / "train" / "vanilla" / "model")  # scored with the trained seed, not the base
    assert (root / "scores.jsonl").stat().st_mtime_ns > (
        root / "train" / "vanilla" / "train_summary.json"
    ).stat().st_mtime_ns
    ind_cfg = json.loads((root / "train" / "ind_indicator_b0.0" / "model" / "config.json").read_text())
    assert ind_cfg["vocab_size"] == 49153
    summary = json.loads((root / "comparison.json").read_text())
    runs = summary["runs"]
    assert list(runs) == ["base", "vanilla", "+indicator b=0.0", "dpo", "grpo"]
    assert runs["+indicator b=0.0"]["selection"]["ratio"] == 1.0
    scored = [
        r["score"]
        for r in map(json.loads, (root / "scores.jsonl").read_text().splitlines())
        if r["score"] is not None
    ]
    assert scored and summary["table3"] == {  # Table 3 from the scores file, by hand: the share above each beta
        b: sum(x > float(b) for x in scored) / len(scored) for b in ("0.5", "0.6", "0.7", "0.8")}  # fmt: skip
    # DPO starts from the vanilla SFT, GRPO from DPO; each merged model is saved
    assert (
        json.loads((root / "train" / "dpo" / "train_config.json").read_text())["model"]
        == runs["vanilla"]["model_dir"]
    )
    assert (
        json.loads((root / "train" / "grpo" / "train_config.json").read_text())["model"]
        == runs["dpo"]["model_dir"]
    )
    for name, r in runs.items():
        assert r["eval"]["cf_world_facts"]["n"] == 2, name
        assert {c.removesuffix("+ind") for c in r["nih"]} == {"chat+prefix", "plain+prefix", "chat"}, name
        assert set(r["attention"]["conditions"]) == {"chat", "plain"}, name
    assert set(summary["stages"]["seconds"]) == {
        "base",
        "vanilla",
        "dpo",
        "grpo",
    }  # every checkpoint of the chain
    assert "Table 3" in table and "NIH" in table and "Paired differences" in table
    from ctxaware.reporting.report import write_report

    md = write_report([root], tmp_path / "r.html").with_suffix(".md").read_text()
    for text in (
        "Table 3",
        "NIH condition",
        "sink-excluded user share",
        "+indicator b=0.0",
        "grpo",
        "## Training stages: stages",
        "Head-level change",
        "## Needle in a haystack: grpo-",
    ):
        assert text in md, text  # fmt: skip
    evals = [sec for sec in md.split("\n## ") if sec.startswith("Evaluation")]
    assert evals and not any(f"directory: `{root / 'nih'}" in sec for sec in evals)  # NIH cache is no eval
    assert "Stage analysis (usage pooled over tasks" in table
    t0 = time.perf_counter()
    assert run(cfg) == table  # every stage is cached
    assert time.perf_counter() - t0 < 5
    # issue 24 §2: a cached stage is reused only for its own configuration; a changed option is refused in one
    # line before anything is recomputed or replaced (the old numbers never come back as the new ones)
    before = (root / "comparison.md").read_bytes()
    for section, change, what in (("eval", dict(limit=3), "limit"), ("nih", dict(depths=[25.0]), "runs"),
                                  ("attention", dict(lengths=[160]), "lengths"), ("stages", dict(n=3), "n")):  # fmt: skip
        changed = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **change)})
        with pytest.raises(CtxawareError, match=rf"differs in: .*{what}"):
            run(changed)
    assert (root / "comparison.md").read_bytes() == before


def test_seed_model_options():
    from ctxaware.experiment import seed_spec

    assert ExperimentConfig().seed_model == "trained" and seed_spec(ExperimentConfig()) == "trained"
    assert seed_spec(ExperimentConfig(seed_model="default")) == "default"
    with pytest.raises(CtxawareError, match="unknown option.*score_model"):  # the retired spelling: one line
        from_dict(ExperimentConfig, {"score_model": "gemma3-270m"})


def test_experiment_rejects_bad_options_before_compute(tmp_path):
    with pytest.raises(
        CtxawareError, match="limit 0 must be at least 1"
    ):  # when the config is built (Checked)
        ExperimentConfig(data="x.json", eval={"limit": 0}, output_dir=str(tmp_path))
    with pytest.raises(CtxawareError, match="learning.rate"):
        ExperimentConfig(data="x.json", train={"learning_rate": -1.0}, output_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_sections_are_the_commands_own_configs(tmp_path):
    """Issue 24 section 1: each section is its command's config with that command's defaults (no copies to
    drift: MT-Bench's answer length is eval's 512), model options given once reach every stage, the options
    the experiment sets itself are refused, and a retired flat key names its new place in one line."""
    from ctxaware.core.config import parse_sectioned
    from ctxaware.evaluation.qa import EvalConfig
    from ctxaware.experiment import RENAMED, model_options
    from ctxaware.scoring.score import ScoreConfig

    yaml_file = tmp_path / "e.yaml"
    yaml_file.write_text("model: {model: gpt2, revision: abc, device: cpu}\neval: {limit: 7}\n"
                         f"output_dir: {tmp_path / 'out'}\n")  # fmt: skip
    cfg = parse_sectioned(ExperimentConfig, ["--config", str(yaml_file), "--eval.tasks", "squad,drop",
                                             "--score.layer", "3"], "x", RENAMED)  # fmt: skip
    assert isinstance(cfg.eval, EvalConfig) and isinstance(cfg.score, ScoreConfig)
    assert (cfg.eval.limit, cfg.eval.tasks, cfg.score.layer) == (
        7,
        ["squad", "drop"],
        3,
    )  # YAML and CLI merged
    assert cfg.eval.mt_bench_max_new_tokens == EvalConfig().mt_bench_max_new_tokens == 512
    assert cfg.eval.max_new_tokens == EvalConfig().max_new_tokens == 100  # paper App. A.3, from eval itself
    assert (cfg.train.model, cfg.train.revision, cfg.score.device) == ("gpt2", "abc", "cpu")
    assert cfg.nih is None and cfg.stages is None  # absent sections: not run
    assert model_options(cfg, "gpt2")["revision"] == "abc"  # the base keeps its revision (issue 24)
    assert model_options(cfg, str(tmp_path / "ckpt"))["revision"] is None  # a trained checkpoint has none
    for argv, message in (
        (["--eval_limit", "3"], "option eval_limit is now eval.limit"),
        (["--dpo_beta", "0.2"], "option dpo_beta is now dpo.beta"),
        (["--learning_rate", "1e-4"], "is now train.learning_rate"),
        (["--eval.output", "x"], "eval.output is set by the experiment"),
        (["--nih.device", "cpu"], "model options are set once, under model: .model.device."),
        (["--eval.limitt", "3"], "unknown option.*limitt in section eval"),
    ):
        with pytest.raises(CtxawareError, match=message):
            parse_sectioned(ExperimentConfig, ["--output_dir", str(tmp_path / "o"), *argv], "x", RENAMED)
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()  # nothing written


def test_gemma_experiment_yaml_builds_the_published_configs():
    """docs/experiment/gemma.yaml in sections gives the stage options the published run used (issue 24:
    published numbers unchanged): values from the flat YAML of the run in docs/experiment.md."""
    from ctxaware.core.config import parse_sectioned
    from ctxaware.experiment import RENAMED

    yaml_file = Path(__file__).resolve().parents[1] / "docs" / "experiment" / "gemma.yaml"
    cfg = parse_sectioned(ExperimentConfig, ["--config", str(yaml_file)], "x", RENAMED)
    assert (cfg.model.model, cfg.train.max_conversations, cfg.train.max_steps, cfg.betas) == (
        "gemma3-270m",
        160,
        -1,
        [0.39],
    )
    assert (cfg.dpo.learning_rate, cfg.dpo.max_pairs, cfg.dpo.max_length, cfg.dpo.beta) == (
        5e-5,
        48,
        384,
        0.1,
    )
    assert (cfg.dpo.per_device_train_batch_size, cfg.dpo.track_every, cfg.grpo.save_steps) == (8, 4, 4)
    assert (cfg.grpo.rl_n, cfg.grpo.max_steps, cfg.grpo.num_generations, cfg.grpo.max_length) == (
        32,
        12,
        2,
        512,
    )
    assert (cfg.eval.limit, cfg.eval.seed, cfg.eval.batch_size, cfg.stages.n, cfg.stages.seed) == (
        50,
        42,
        16,
        30,
        42,
    )
    assert (cfg.nih.lengths, cfg.attention.lengths) == ([250, 500, 1000], [500, 1000])


def test_experiment_help_says_what_it_runs_and_how_long(capsys):
    """Issue 27 §3: ``experiment --help`` describes the run and its time, not a docstring fragment."""
    from ctxaware.commands.experiment import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "2 h 20 min" in out and "rerun the same command to resume" in out
    assert "Every `TrainConfig`" not in out and "``" not in out
