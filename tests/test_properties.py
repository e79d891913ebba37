"""Property-based bad input (issue 23 §6): hypothesis feeds numeric options and input files generated
malformed values, and every case must keep the promise of the bad-input table: exit 2, exactly one line on
stderr, no traceback, no model or tokenizer loaded, no file written or changed.

The numeric cases are drawn from the config dataclasses themselves (every field with a bound), so a new
option is covered the day it is added.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ctxaware import cli  # noqa: E402
from ctxaware.core import config, models  # noqa: E402

# command -> (config class path, arguments that make the rest of the command line valid)
COMMANDS = {
    "nih": ("ctxaware.evaluation.nih:NIHConfig", []),
    "attention": ("ctxaware.attention.allocation:AttentionConfig", []),
    "eval": ("ctxaware.evaluation.qa:EvalConfig", ["squad"]),
    "score": ("ctxaware.scoring.score:ScoreConfig", ["{DATA}"]),
    "select": ("ctxaware.scoring.selection:SelectConfig", ["{SCORES}", "{DATA}"]),
    "train": ("ctxaware.training.sft:TrainConfig", ["--data", "{DATA}"]),
}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def _bounded_fields() -> list[tuple[str, str, type, dict]]:
    """``(command, field, base type, rule)`` for every int/float field with a bound."""
    import importlib

    out = []
    for cmd, (where, _) in COMMANDS.items():
        mod, cls = where.split(":")
        klass = getattr(importlib.import_module(mod), cls)
        hints = __import__("typing").get_type_hints(klass)
        for f in dataclasses.fields(klass):
            r = config.rule(f)
            base, _ = config._unwrap_optional(hints[f.name])
            if __import__("typing").get_origin(base) is list:
                (base,) = __import__("typing").get_args(base)
            if base in (int, float) and any(k in r for k in ("min", "gt", "max")):
                out.append((cmd, f.name, base, r))
    return out


FIELDS = _bounded_fields()


def invalid_values(base: type, r: dict):
    """Values that no field of this type and rule may accept."""
    bad = [st.sampled_from(["nan", "inf", "-inf", "NaN", "abc", "1e400", "--", "[1, 2]", "0x"])]
    low = r.get("min", r.get("gt"))
    if low is not None:
        below = st.floats(max_value=low - 1e-6 if "min" in r else low, allow_nan=False, allow_infinity=False)
        if base is int:
            below = st.integers(max_value=math.ceil(low) - 1 if "min" in r else math.floor(low))
        bad.append(below.map(repr))
    if "max" in r:
        bad.append(st.floats(min_value=r["max"] + 1e-6, allow_nan=False, allow_infinity=False).map(repr))
    if base is int:
        bad.append(
            st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()).map(repr)
        )
    return st.one_of(*bad)


@st.composite
def field_and_value(draw):
    cmd, name, base, r = draw(st.sampled_from(FIELDS))
    return cmd, name, draw(invalid_values(base, r))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def sandbox(tmp_path_factory, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the bad input was reported")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.setattr(models, "load_tokenizer", no_model)
    monkeypatch.setattr(config.ModelConfig, "load", no_model)
    root = tmp_path_factory.mktemp("props")
    conv = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]}
    (root / "data.jsonl").write_text(json.dumps(conv) + "\n")
    row = {"conversation_id": "0", "source_row": 0, "turn": 0, "score": 0.7, "skipped": None}
    (root / "scores.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.chdir(root)
    return root


def _check(argv: list[str], root: Path, capsys) -> None:
    before = _files(root)
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert _files(root) == before, argv


def test_every_bounded_option_is_covered():
    names = {(c, n) for c, n, _, _ in FIELDS}
    assert (
        ("nih", "batch_size") in names and ("train", "learning_rate") in names and ("select", "beta") in names
    )
    assert len(FIELDS) >= 25


@SETTINGS
@given(case=field_and_value())
def test_malformed_numeric_options(case, sandbox, capsys):
    cmd, name, value = case
    base = [a.format(DATA=sandbox / "data.jsonl", SCORES=sandbox / "scores.jsonl") for a in COMMANDS[cmd][1]]
    _check([cmd, *base, config._flag(name), value, "--output" if cmd != "train" else "--output-dir",
            str(sandbox / "out")], sandbox, capsys)  # fmt: skip


# --------------------------------------------------------------------------------- input files

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=8).filter(
                lambda k: k not in ("messages", "conversations", "instruction", "prompt", "chosen")
            ),
            children,
            max_size=4,
        )
    ),  # fmt: skip
    max_leaves=12,
)


@st.composite
def malformed_file(draw):
    """A data file's name and bytes: random bytes, random text, truncated or foreign JSON, none of which
    holds a usable conversation."""
    suffix = draw(st.sampled_from([".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet"]))
    kind = draw(st.sampled_from(["bytes", "text", "json", "truncated"]))
    if kind == "bytes":
        data = draw(st.binary(min_size=1, max_size=300))
    elif kind == "text":
        data = draw(st.text(min_size=1, max_size=200)).encode("utf-8", "surrogatepass")
    else:
        doc = json.dumps(draw(st.lists(json_values, min_size=1, max_size=5)))
        if kind == "truncated":
            doc = doc[: max(1, len(doc) // 2)]
        data = doc.encode()
    return "data" + suffix, data


@SETTINGS
@given(f=malformed_file(), cmd=st.sampled_from(["score", "train"]))
def test_malformed_data_files(f, cmd, sandbox, capsys):
    name, data = f
    path = sandbox / "in" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    out = ["--output", str(sandbox / "out.jsonl")] if cmd == "score" else ["--output-dir", str(sandbox / "o")]
    _check([cmd, *([str(path)] if cmd == "score" else ["--data", str(path)]), *out], sandbox, capsys)
