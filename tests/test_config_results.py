"""Config parsing (YAML + CLI, unknown keys) and the resumable results writer."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ctxaware.config import ModelConfig, parse_config
from ctxaware.errors import CtxawareError
from ctxaware.results import ResultsWriter, read_jsonl, write_json_atomic
from ctxaware.stats import bootstrap_ci


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
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "--config" in capsys.readouterr().out
