"""Config parsing (YAML + CLI, unknown keys) and the resumable results writer."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

from ctxaware.core.config import ModelConfig, parse_config
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import ResultsWriter, read_jsonl, write_json_atomic
from ctxaware.core.stats import bootstrap_ci


@dataclasses.dataclass
class Cfg(ModelConfig):
    lengths: list[int] = dataclasses.field(default_factory=lambda: [200, 400], metadata={"help": "lengths"})
    alpha: float = dataclasses.field(default=0.5, metadata={"help": "alpha"})
    chat: bool = dataclasses.field(default=True, metadata={"help": "chat"})


def test_defaults_yaml_then_cli(tmp_path):
    assert parse_config(Cfg, []).lengths == [200, 400]
    y = tmp_path / "c.yaml"
    y.write_text("lengths: [1, 2, 3]\nalpha: 0.1\n")
    c = parse_config(Cfg, ["--config", str(y), "--alpha", "0.3", "--no-chat"])
    assert c.lengths == [1, 2, 3] and c.alpha == 0.3 and c.chat is False


def test_unknown_yaml_key_lists_valid_ones(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("alpah: 0.1\n")
    with pytest.raises(CtxawareError, match="alpah.*valid options are: .*alpha"):
        parse_config(Cfg, ["--config", str(y)])


def test_bad_value():
    with pytest.raises(CtxawareError, match="alpha"):
        parse_config(Cfg, ["--alpha", "high"])


def test_results_resume_and_torn_line(tmp_path):
    with ResultsWriter(tmp_path, {"a": 1}, ["k"]) as w:
        w.write({"k": 1, "v": "x"})
        w.write({"k": 2, "v": "y"})
        w.write({"k": 2, "v": "dup"})
    with (tmp_path / "rows.jsonl").open("a") as f:
        f.write('{"k": 3, "v": ')  # a run killed mid-write
    with ResultsWriter(tmp_path, {"a": 1}, ["k"]) as w:
        assert len(w) == 2 and w.done({"k": 1}) and not w.done({"k": 3})
        w.write({"k": 3, "v": "z"})
    rows = list(read_jsonl(tmp_path / "rows.jsonl"))
    assert [r["k"] for r in rows] == [1, 2, 3]


def test_results_refuse_other_config(tmp_path):
    ResultsWriter(tmp_path, {"a": 1}, ["k"]).close()
    with pytest.raises(CtxawareError, match="differs in: a"):
        ResultsWriter(tmp_path, {"a": 2}, ["k"])


def test_write_json_atomic(tmp_path):
    p = write_json_atomic(tmp_path / "s.json", {"x": 1})
    assert json.loads(p.read_text()) == {"x": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["s.json"]


def test_bootstrap_ci_brackets_mean():
    m, lo, hi = bootstrap_ci([0, 1] * 50)
    assert m == 0.5 and lo < 0.5 < hi and hi - lo < 0.3


def test_second_writer_on_same_file_is_refused(tmp_path):
    w = ResultsWriter(tmp_path, {"a": 1}, ["k"])
    with pytest.raises(CtxawareError, match="another process"):
        ResultsWriter(tmp_path, {"a": 1}, ["k"])
    w.close()
    ResultsWriter(tmp_path, {"a": 1}, ["k"]).close()  # free again once the first one closed


@pytest.mark.parametrize("command", ["demo", "render", "nih", "attention", "heads", "eval", "score", "select", "analyze", "train", "experiment"])  # fmt: skip
def test_every_command_has_help(command, capsys):
    from ctxaware.cli import COMMANDS, main

    assert command in COMMANDS
    try:
        code = main([command, "--help"])
    except SystemExit as e:
        code = e.code
    assert code == 0
    assert "--config" in capsys.readouterr().out


# ----------------------------------------------------------------------------- resume compares contents


def _writer(directory, **config):
    return ResultsWriter(directory, config, ["k"])


def test_resume_refuses_input_edited_in_place(tmp_path):
    data, heads = tmp_path / "data.jsonl", tmp_path / "heads.json"
    data.write_text('{"messages": []}\n')
    heads.write_text('{"3": [1]}')
    _writer(tmp_path / "run", data=str(data), steer=str(heads)).close()
    _writer(tmp_path / "run", data=str(data), steer=str(heads)).close()  # same contents: resumes
    heads.write_text('{"3": [2]}')  # edited in place, same path
    with pytest.raises(CtxawareError, match="differs in: steer"):
        _writer(tmp_path / "run", data=str(data), steer=str(heads))
    heads.write_text('{"3": [1]}')
    data.write_text('{"messages": [1]}\n')
    with pytest.raises(CtxawareError, match="differs in: data"):
        _writer(tmp_path / "run", data=str(data), steer=str(heads))


def test_resume_accepts_same_inputs_spelled_differently(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "data.jsonl").write_text('{"messages": []}\n')
    monkeypatch.chdir(tmp_path)
    _writer(tmp_path / "run", data="d/data.jsonl", model="default", output="out").close()
    w = _writer(tmp_path / "run", data=str(tmp_path / "d" / "data.jsonl"), model="smollm2-135m-instruct",
                output=str(tmp_path / "out"))  # fmt: skip
    w.close()
    with pytest.raises(CtxawareError, match="differs in: model"):
        _writer(tmp_path / "run", data="d/data.jsonl", model="gemma3-270m", output="out")


def test_model_directory_retrained_in_place_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 2}')
    (model / "model.safetensors").write_bytes(b"header" + bytes(1000))
    _writer(tmp_path / "run", model=str(model)).close()
    (model / "model.safetensors").write_bytes(b"header" + bytes(999) + b"\x01")  # same size, new weights
    with pytest.raises(CtxawareError, match="differs in: model"):
        _writer(tmp_path / "run", model=str(model))


def test_large_file_digest_samples_blocks(tmp_path):
    from ctxaware.core.results import file_digest

    big = tmp_path / "w.safetensors"
    with big.open("wb") as f:
        f.truncate(80 * 2**20)
    d0 = file_digest(big)
    with big.open("r+b") as f:
        f.seek(80 * 2**20 - 10)  # in the last block, which is always read
        f.write(b"x")
    assert file_digest(big) != d0


def test_run_written_before_contents_were_recorded_still_resumes(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "meta.json").write_text(
        json.dumps({"fingerprint": "old", "config": {"model": "default"}})
    )
    _writer(tmp_path / "run", model="smollm2-135m-instruct", new_option=1).close()
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["inputs"]["model"] == "builtin:smollm2-135m-instruct"  # recorded from now on
    with pytest.raises(CtxawareError, match="differs in: model"):
        _writer(tmp_path / "run", model="gemma3-270m", new_option=1)


def test_summary_files_are_written_like_rows(tmp_path):
    """write_json_atomic must not leave mkstemp's 0600: summaries are as readable as rows.jsonl."""
    import os

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "summary.json", {"a": 1})
        with ResultsWriter(tmp_path / "run", {"a": 1}, ["k"]) as w:
            w.write({"k": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run" / "meta.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run" / "rows.jsonl").stat().st_mode & 0o777 == 0o644


def test_help_states_each_default_once():
    from ctxaware.core.config import build_parser

    @dataclasses.dataclass
    class C:
        """Options."""

        layer: int | None = dataclasses.field(
            default=None, metadata={"help": "analysis layer (default: middle)"}
        )
        n: int | None = dataclasses.field(default=None, metadata={"help": "how many"})
        k: int = dataclasses.field(default=3, metadata={"help": "heads"})

    text = " ".join(build_parser(C, "x").format_help().split())
    assert (
        "analysis layer (default: middle) --n" in text
    )  # stated once, not "(default: middle) (default: None)"
    assert "how many (default: none)" in text and "heads (default: 3)" in text and "None" not in text


def test_bootstrap_ci_says_when_n_is_too_small():
    from ctxaware.core.stats import MIN_N_FOR_CI, fmt, summarize

    s = summarize([1.0, 1.0, 1.0, 1.0])
    assert s["n"] == 4 < MIN_N_FOR_CI and math.isnan(s["ci_low"]) and math.isnan(s["ci_high"])
    assert fmt(s) == "100.0 [n=4 too small for a CI]"
    big = summarize([0.0, 1.0] * 10)
    assert big["ci_low"] < 0.5 < big["ci_high"] and "[" in fmt(big) and "too small" not in fmt(big)


def _conversations(path, answers):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]}
            for i, a in enumerate(answers)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_score_resume_refuses_replaced_data_and_accepts_respelled_path(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    from ctxaware.cli import main

    monkeypatch.chdir(tmp_path)
    _conversations(tmp_path / "data.jsonl", ["Yes.", "No."])
    args = ["--model", str(tiny_model_dir), "--output", "scores.jsonl", "--no-progress"]
    assert main(["score", "data.jsonl", *args]) == 0
    first = (tmp_path / "scores.jsonl").read_bytes()
    # the same file spelled as an absolute path, and the output too: accepted, same scores
    assert (
        main(
            [
                "score",
                str(tmp_path / "data.jsonl"),
                *args[:3],
                str(tmp_path / "scores.jsonl"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "scores.jsonl").read_bytes() == first
    capsys.readouterr()
    _conversations(tmp_path / "data.jsonl", ["Maybe.", "Perhaps not."])  # new contents, same path
    assert main(["score", "data.jsonl", *args]) == 2
    err = capsys.readouterr().err
    assert "differs in: data" in err.strip().splitlines()[-1]  # (earlier lines: transformers' load bar)
    assert (tmp_path / "scores.jsonl").read_bytes() == first  # the old scores are not returned as new


@pytest.mark.slow
def test_nih_steer_resume_refuses_heads_edited_in_place(tiny_model_dir, tmp_path, capsys):
    from ctxaware.cli import main

    heads = tmp_path / "heads.json"
    heads.write_text('{"0": [1]}')
    argv = ["nih", "--model", str(tiny_model_dir), "--lengths", "200", "--depths", "50", "--modes", "chat",
            "--prefix", "false", "--max-new-tokens", "2", "--steer", str(heads), "--alpha", "0.5",
            "--haystack", "synthetic", "--output", str(tmp_path / "nih")]  # fmt: skip
    assert main(argv) == 0
    assert main(argv) == 0  # unchanged heads: resumes
    capsys.readouterr()
    heads.write_text('{"1": [2]}')
    assert main(argv) == 2
    assert "differs in: steer" in capsys.readouterr().err


def test_a_results_directory_edited_by_hand(tmp_path, capsys):
    """Issue 23 §4: a meta.json that is not an object is one line; rows that are not objects, invalid JSON
    in the middle of the file, or rows without the key are skipped, counted and reported, and their work
    is redone (their keys are not done)."""
    import json

    from ctxaware.core.errors import CtxawareError
    from ctxaware.core.results import ResultsWriter

    bad_meta = tmp_path / "a"
    bad_meta.mkdir()
    (bad_meta / "meta.json").write_text("[]")
    with pytest.raises(CtxawareError, match="not the metadata of a ctxaware run"):
        ResultsWriter(bad_meta, {"x": 1}, ("id",))
    d = tmp_path / "b"
    with ResultsWriter(d, {"x": 1}, ("id",)) as w:
        w.write({"id": "1"})
        w.write({"id": "2"})
    first, second = (d / "rows.jsonl").read_text().splitlines(True)
    (d / "rows.jsonl").write_text(first + "5\n" + '{"id": "3", "x"\n' + '{"x": 1}\n' + second)
    capsys.readouterr()
    with ResultsWriter(d, {"x": 1}, ("id",)) as w:
        assert [r["id"] for r in w.rows] == ["1", "2"] and w.malformed.total == 3 and not w.done({"id": "3"})
    assert "3 malformed line(s)" in capsys.readouterr().err
    assert json.loads((d / "rows.jsonl").read_text().splitlines()[0]) == {"id": "1"}


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda p: __import__("ctxaware.evaluation.nih", fromlist=["x"]).NIHConfig(batch_size=0), "--batch-size 0"),
        (lambda p: __import__("ctxaware.evaluation.nih", fromlist=["x"]).NIHConfig(depths=[float("nan")]), "finite"),
        (lambda p: __import__("ctxaware.evaluation.qa", fromlist=["x"]).EvalConfig(device="tpu"), "--device"),
        (lambda p: __import__("ctxaware.scoring.selection", fromlist=["x"]).SelectConfig(str(p), str(p), beta=2.0), "--beta"),
        (lambda p: __import__("ctxaware.attention.retrieval_heads", fromlist=["x"]).HeadsConfig(output=str(p)), "already exists"),
    ],
    ids=["nih batch 0", "nih depth nan", "eval device tpu", "select beta 2", "heads output exists"],
)  # fmt: skip
def test_configs_built_in_python_validate_themselves(build, message, tmp_path):
    """Issue 23 §4 / 24 §1: a config made in Python is checked exactly as one parsed from the command line
    (`config.Checked.__post_init__`), and ``dataclasses.replace`` checks again."""
    import dataclasses

    from ctxaware.evaluation.nih import NIHConfig

    existing = tmp_path / "heads.json"
    existing.write_text("{}\n")
    with pytest.raises(CtxawareError, match=message):
        build(existing)
    with pytest.raises(CtxawareError, match="--max-new-tokens 0"):
        dataclasses.replace(NIHConfig(), max_new_tokens=0)


def test_no_bare_nan_in_any_json_output(tmp_path):
    """Issue 26 §3: strict JSON everywhere. A summary whose CI could not be computed (n < 10) is written
    with ``null`` bounds and the reason beside them, rows with non-finite numbers get ``null``, and the
    strict parser (``parse_constant`` refusing NaN/Infinity) reads every file back."""
    from ctxaware.core.results import ResultsWriter, read_jsonl, write_json_atomic, write_jsonl_atomic
    from ctxaware.core.stats import fmt, summarize

    def strict(text: str):
        def refuse(name):
            raise ValueError(f"bare {name}")

        return json.loads(text, parse_constant=refuse)

    s = summarize([1.0, 0.0, 1.0])
    assert s["ci_low"] != s["ci_low"] and "too few" in s["no_ci"]  # NaN in memory, the reason beside it
    write_json_atomic(tmp_path / "s.json", {"recall": s, "inf": float("inf")})
    back = strict((tmp_path / "s.json").read_text())
    assert back["recall"]["ci_low"] is None and back["inf"] is None and "too few" in back["recall"]["no_ci"]
    assert "too small for a CI" in fmt(back["recall"])  # tables read null as "no CI", as they read NaN
    write_jsonl_atomic(tmp_path / "r.jsonl", [{"x": float("nan")}])
    assert strict((tmp_path / "r.jsonl").read_text()) == {"x": None}
    with ResultsWriter(tmp_path / "run", {"a": 1}, ["id"]) as w:
        w.write({"id": 1, "share": float("nan")})
        assert w.rows == [{"id": 1, "share": None}]  # in memory as a resumed run reads it back
    line = (tmp_path / "run" / "rows.jsonl").read_text()
    assert strict(line) == {"id": 1, "share": None} and list(read_jsonl(tmp_path / "run" / "rows.jsonl")) == [
        {"id": 1, "share": None}
    ]


def test_one_jsonl_reader_counts_bad_lines_everywhere(tmp_path, capsys):
    """Issue 24 §3: one JSONL reader, one policy. A malformed line in a preference file, an MT-Bench judge
    prompt file or a gzipped rows file with a BOM is skipped and counted (or said), never a traceback and
    never dropped silently; the task loaders see it as a counted bad row."""
    import gzip

    from ctxaware.core.results import SkipCounter, read_jsonl
    from ctxaware.data import tasks
    from ctxaware.evaluation.judge import load_judge_prompts
    from ctxaware.training.preference import load_preferences

    pair = {"prompt": "Say hi.", "chosen": "Hi.", "rejected": "No."}
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps(pair) + "\n" + '{"prompt": "torn\n' + "5\n" + json.dumps(pair) + "\n")
    skips = SkipCounter()
    assert len(load_preferences(str(prefs), skips=skips)) == 2
    assert skips.counts == {"line is not valid JSON": 1, "line is not a JSON object": 1}

    judge = tmp_path / "judge.jsonl"
    judge.write_text('{"name": "single-v1", "prompt_template": "x"}\n{"name": \n')
    assert list(load_judge_prompts(judge)) == ["single-v1"]
    assert "1 malformed line(s)" in capsys.readouterr().err  # said, since no caller keeps the count

    gz = tmp_path / "rows.jsonl.gz"
    gz.write_bytes(gzip.compress(("\ufeff" + '{"a": 1}\n[1]\n{"a": 2}\n').encode()))
    bad = SkipCounter()
    assert list(read_jsonl(gz, bad)) == [{"a": 1}, {"a": 2}] and bad.total == 1
    assert [r.get("_malformed") for r in tasks.jsonl_rows(gz)] == [None, "line is not a JSON object", None]
    assert getattr(tasks, "read_jsonl", read_jsonl) is read_jsonl  # one function of that name, in results


def test_thread_policy_is_set_before_torch(monkeypatch):
    """Issue 27 §1: waiting threads sleep (OMP_WAIT_POLICY=PASSIVE unless the user set it) and ``--threads N``
    fixes the count, in a fresh process before torch loads (torch reads both at start-up)."""
    import subprocess
    import sys

    code = ("import sys, os; from ctxaware import cli; sys.argv[1:] = ['--threads', '1', '--version']; rc = cli.main(); "
            "import torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads(), rc)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.split()[-3:] == ["PASSIVE", "1", "0"]
    from ctxaware import cli

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own choice stands
    assert cli.set_threads(["nih"]) == ["nih"] and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    with pytest.raises(CtxawareError, match="--threads 0"):
        cli.set_threads(["--threads", "0", "nih"])


def test_an_option_added_later_does_not_block_an_older_runs_resume(tmp_path):
    """A run saved before an option existed resumes when the option is unset; set, it is a change."""
    from ctxaware.core.results import config_changes, fingerprint_inputs

    old = {"model": "m", "limit": 3}
    assert config_changes(old, fingerprint_inputs(old), {**old, "peft_adapter": None}) == []
    assert config_changes(old, fingerprint_inputs(old), {**old, "peft_adapter": "runs/adapter"}) == [
        "peft_adapter"
    ]
    assert config_changes(old, fingerprint_inputs(old), {**old, "limit": 4}) == ["limit"]


def test_rules_attach_to_fields_not_to_names(tmp_path):
    """Issue 24 section 1: a field's checks come from its own metadata; a name implies nothing (before, any
    field called ``batch_size`` got "at least 1" and any ``output`` a path rule, declared or not)."""
    from ctxaware.core.config import Checked
    from ctxaware.evaluation.qa import EvalConfig
    from ctxaware.scoring.selection import SelectConfig
    from ctxaware.training.sft import TrainConfig

    @dataclasses.dataclass
    class Plain(Checked):
        batch_size: int = 0
        output: str = str(tmp_path)  # a directory: a path rule from the name would call it a bad file

    assert Plain().batch_size == 0

    @dataclasses.dataclass
    class Ruled(Checked):
        batch_size: int = dataclasses.field(default=1, metadata={"min": 1})
        ratio: float = dataclasses.field(default=0.5, metadata={"gt": 0, "lt": 1})

    with pytest.raises(CtxawareError, match="--batch-size 0 must be at least 1"):
        Ruled(batch_size=0)
    with pytest.raises(CtxawareError, match="--ratio 1.0 must be below 1"):
        Ruled(ratio=1.0)
    for build, message in ((lambda: EvalConfig(batch_size=0), "--batch-size 0 must be at least 1"),
                           (lambda: TrainConfig(warmup_ratio=1.0), "--warmup-ratio 1.0 must be below 1"),
                           (lambda: TrainConfig(learning_rate=0.0), "--learning-rate 0.0 must be greater than 0"),
                           (lambda: SelectConfig(scores="s.jsonl", data="d.json", beta=1.0), "--beta 1.0 must be below 1")):  # fmt: skip
        with pytest.raises(CtxawareError, match=message):
            build()
