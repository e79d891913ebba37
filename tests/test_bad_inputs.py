"""Every command, driven through a table of bad inputs: exit 2, exactly one line on stderr, no traceback,
nothing written or lost (the files present before the call are byte-identical after it), and no model load
(bad input fails before any compute).

The cases are run in-process through `ctxaware.cli.main`; loading a model or tokenizer fails the test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ctxaware import cli
from ctxaware.core import config, models

UNWRITABLE = "/sys/ctxaware-test-out"  # sysfs refuses new files, even to root

# command -> (arguments that make the rest of the command line valid, output flag, output kind)
OUTPUTS = {
    "demo": ([], "--output", "dir"),
    "nih": ([], "--output", "dir"),
    "attention": ([], "--output", "dir"),
    "heads": ([], "--output", "file"),
    "eval": (["squad"], "--output", "dir"),
    "score": (["{DATA}"], "--output", "file"),
    "select": (["{SCORES}", "{DATA}"], "--output", "dir"),
    "analyze": (["{SCORES}"], "--output", "dir"),
    "train": (["--data", "{DATA}"], "--output-dir", "dir"),
    "experiment": (["--data", "{DATA}"], "--output-dir", "dir"),
    "report": (["{OUT}"], "--output", "file"),
}


def _output_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for cmd, (base, flag, kind) in OUTPUTS.items():
        wrong = "{FILE}" if kind == "dir" else "{OUT}"  # a file where a directory goes, and the reverse
        for what, value in (
            ("wrong kind", wrong),
            ("under a file", "{FILE}/sub"),
            ("unwritable", UNWRITABLE),
        ):
            cases.append((f"{cmd} output {what}", [cmd, *base, flag, value]))
    return cases


def _with_output(cmd: str, *args: str) -> list[str]:
    """``cmd`` with valid base arguments, the existing results as its output, then ``args``."""
    base, flag, kind = OUTPUTS[cmd]
    return [cmd, *base, flag, "{OUT}" if kind == "dir" else "{OUTFILE}", *args]


# command -> a command line whose output file already exists and is not a run of that command
EXISTING_OUTPUTS = {
    "nih": ["nih", "--dump-prompts", "{FILE}"],
    "attention": ["attention", "--dump-prompts", "{FILE}"],
    "eval": ["eval", "squad", "--dump-prompts", "{FILE}"],
    "heads": ["heads", "--output", "{FILE}"],
    "score": ["score", "{DATA}", "--output", "{FILE}"],
    "select": ["select", "{SCORES}", "{DATA}", "--output", "{SELECTED}"],
    "report": ["report", "{OUT}", "--output", "{FILE}"],
}

CASES: list[tuple[str, list[str]]] = [
    *_output_cases(),
    # numbers out of range (checked from the config's field rules, before any model loads)
    ("nih batch-size 0", _with_output("nih", "--batch-size", "0")),
    ("nih max-new-tokens 0", _with_output("nih", "--max-new-tokens", "0")),
    ("nih depth 150", _with_output("nih", "--depths", "0,150")),
    ("nih length 0", _with_output("nih", "--lengths", "0,200")),
    ("attention batch-size 0", _with_output("attention", "--batch-size", "0")),
    ("attention layer -1", _with_output("attention", "--layer", "-1")),
    ("eval max-new-tokens 0", _with_output("eval", "--max-new-tokens", "0")),
    ("eval batch-size 0", _with_output("eval", "--batch-size", "0")),
    ("eval limit -3", _with_output("eval", "--limit", "-3")),
    ("score limit -2", _with_output("score", "--limit", "-2")),
    ("score max-tokens 0", _with_output("score", "--max-tokens", "0")),
    ("heads k 0", _with_output("heads", "--k", "0")),
    ("train negative learning rate", _with_output("train", "--learning-rate", "-1e-4")),
    ("train batch size 0", _with_output("train", "--per-device-train-batch-size", "0")),
    ("train epochs 0", _with_output("train", "--num-train-epochs", "0")),
    ("experiment negative learning rate", _with_output("experiment", "--train.learning-rate", "-1")),
    ("select beta 1.5", _with_output("select", "--beta", "1.5")),
    ("nih batch-size not a number", _with_output("nih", "--batch-size", "x")),
    # inputs that are not UTF-8
    ("score latin-1 data", ["score", "{LATIN1}", "--output", "{OUTFILE}"]),
    ("select latin-1 scores", ["select", "{LATIN1}", "{DATA}", "--output", "{OUT}"]),
    ("select latin-1 data", ["select", "{SCORES}", "{LATIN1}", "--output", "{OUT}"]),
    ("train latin-1 data", ["train", "--data", "{LATIN1}", "--output-dir", "{OUT}"]),
    ("analyze latin-1 scores", ["analyze", "{LATIN1}", "--output", "{OUT}"]),
    ("render latin-1 messages", ["render", "--messages", "{LATIN1}"]),
    ("nih latin-1 needle file", _with_output("nih", "--needle-file", "{LATIN1}")),
    ("eval latin-1 steer heads", _with_output("eval", "--steer", "{LATIN1}")),
    ("demo latin-1 config", ["demo", "--config", "{LATIN1_YAML}"]),
    ("train latin-1 config positional", ["train", "{LATIN1_YAML}"]),
    # malformed or empty task files and inputs
    ("eval malformed JSON task file", _with_output("eval", "--data-dir", "{BAD_JSON_DIR}")),
    (
        "eval task file of non-objects",
        ["eval", "cf_world_facts", "--data-dir", "{NON_DICT_DIR}", "--output", "{OUT}"],
    ),
    (
        "eval task file not a list",
        ["eval", "cf_world_facts", "--data-dir", "{DICT_DIR}", "--output", "{OUT}"],
    ),
    ("eval empty task file", ["eval", "cf_world_facts", "--data-dir", "{EMPTY_DIR}", "--output", "{OUT}"]),
    ("score empty data", ["score", "{EMPTY}", "--output", "{OUTFILE}"]),
    ("select empty scores", ["select", "{EMPTY}", "{DATA}", "--output", "{OUT}"]),
    ("select empty data", ["select", "{SCORES}", "{EMPTY}", "--output", "{OUT}"]),
    ("select scores file is a directory", ["select", "{OUT}", "{DATA}", "--output", "{OUT}"]),
    # non-finite numbers pass no bound (issue 23 §4)
    ("nih depth nan", _with_output("nih", "--depths", "nan")),
    ("train lora-dropout nan", _with_output("train", "--lora-dropout", "nan")),
    ("train learning rate inf", _with_output("train", "--learning-rate", "inf")),
    ("select beta -inf", _with_output("select", "--beta", "-inf")),
    ("eval judge timeout inf", _with_output("eval", "--judge-timeout", "inf")),
    # device, dtype and an empty output, before any model loads (issue 23 §4)
    *[(f"{c} device tpu", _with_output(c, "--device", "tpu")) for c in ("nih", "eval", "score", "attention")],
    ("nih dtype int8", _with_output("nih", "--dtype", "int8")),
    *[(f"{c} empty output", [c, *OUTPUTS[c][0], OUTPUTS[c][1], ""]) for c in ("nih", "score", "report")],
    # whole files that cannot be read: one line, not a traceback (issue 23 §4)
    ("score truncated .json", ["score", "{TRUNC_JSON}", "--output", "{NEWFILE}"]),
    ("score truncated .jsonl.gz", ["score", "{TRUNC_GZ}", "--output", "{NEWFILE}"]),
    ("score text named .gz", ["score", "{TEXT_GZ}", "--output", "{NEWFILE}"]),
    ("score garbage .parquet", ["score", "{GARBAGE_PARQUET}", "--output", "{NEWFILE}"]),
    ("score JSON nested too deeply", ["score", "{NESTED}", "--output", "{NEWFILE}"]),
    ("nih needle keywords: 5", _with_output("nih", "--needle-file", "{NEEDLE_INT}")),
    ("eval nqswap.zip is not a zip", ["eval", "nqswap", "--data-dir", "{NOT_ZIP_DIR}", "--output", "{OUT}"]),
    ("analyze rows without scores", ["analyze", "{NO_SCORES}", "--output", "{OUT}/analysis"]),
    ("nih dump-prompts unwritable", ["nih", "--dump-prompts", UNWRITABLE + "/p.jsonl"]),
    # outputs that are, hold or would replace an input (issue 23 §1)
    ("score output is its input", ["score", "{DATA}", "--output", "{DATA}"]),
    ("select output holds its input", ["select", "{SCORES}", "{DATA_IN_DIR}", "--output", "{DATA_DIR}"]),
    ("analyze output holds its scores", ["analyze", "{SCORES_IN_DIR}", "--output", "{DATA_DIR}"]),
    ("report output replaces a run's scores", ["report", "{OUT}", "--output", "{OUT}/rows.jsonl"]),
    ("report twin replaces a run's summary.md", ["report", "{OUT}", "--output", "{OUT}/summary.html"]),
    ("eval dump replaces a task file", ["eval", "squad", "--dump-prompts", "{DATA}", "--steer", "{DATA}"]),
    # an existing output file (a user's file or an earlier result) is replaced only with --overwrite
    *[(f"{c} output file exists", argv) for c, argv in EXISTING_OUTPUTS.items()],
    # every command: an unknown option and a missing --config file
    *[(f"{c} unknown option", [c, "--no-such-option", "1"]) for c in cli.COMMANDS],
    *[(f"{c} missing config", [c, "--config", "{MISSING}"]) for c in cli.COMMANDS],
]


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, str]:
    conv = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]}
    (tmp_path / "data.jsonl").write_text(json.dumps(conv) + "\n")
    score_row = {"conversation_id": "0", "source_row": 0, "turn": 0, "score": 0.7, "skipped": None}
    (tmp_path / "scores.jsonl").write_text(json.dumps(score_row) + "\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    (tmp_path / "latin1.yaml").write_bytes(b"output: caf\xe9\n")
    (tmp_path / "afile.txt").write_text("not a directory\n")
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "existing"  # results of an earlier run, which a failed call must not touch
    out.mkdir()
    (out / "rows.jsonl").write_text('{"id": "1", "recall": 1.0}\n')
    (out / "meta.json").write_text('{"fingerprint": "0", "config": {}}\n')
    (out / "summary.md").write_text("# an earlier run's summary\n")
    import gzip

    (tmp_path / "trunc.json").write_text('[{"instruction": "a", "output": "b"}, {"instr')
    gz = gzip.compress((json.dumps(conv) + "\n").encode() * 50)
    (tmp_path / "trunc.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "text.jsonl.gz").write_text(json.dumps(conv) + "\n")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not parquet")
    (tmp_path / "nested.json").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "needle.yaml").write_text('needle: "A cat sleeps."\nquestion: "What sleeps?"\nkeywords: 5\n')
    (tmp_path / "notzip" / "conflict").mkdir(parents=True)
    (tmp_path / "notzip" / "conflict" / "nqswap.zip").write_text("not a zip")
    (tmp_path / "noscores.jsonl").write_text('{"conversation_id": "0", "turn": 0}\n')
    holder = tmp_path / "holder"  # a directory that holds an input
    holder.mkdir()
    (holder / "data.jsonl").write_text(json.dumps(conv) + "\n")
    (holder / "scores.jsonl").write_text(json.dumps(score_row) + "\n")
    (tmp_path / "existing_scores.jsonl").write_text(json.dumps(score_row) + "\n")
    selected = tmp_path / "selected"  # an earlier `select` output
    selected.mkdir()
    (selected / "selection.json").write_text('{"beta": 0.6}\n')
    dirs = {}
    for name, rel, text in (
        ("BAD_JSON_DIR", "qa/squad_v2_dev_small.json", '{"data": [ {"paragraphs": '),
        ("NON_DICT_DIR", "conflict/cf_world_facts.json", '["a", "b", 3]'),
        ("DICT_DIR", "conflict/cf_world_facts.json", '{"rows": []}'),
        ("EMPTY_DIR", "conflict/cf_world_facts.json", "[]"),
    ):
        f = tmp_path / name.lower() / rel
        f.parent.mkdir(parents=True)
        f.write_text(text)
        dirs[name] = str(tmp_path / name.lower())
    return {
        "DATA": str(tmp_path / "data.jsonl"),
        "SCORES": str(tmp_path / "scores.jsonl"),
        "LATIN1": str(tmp_path / "latin1.jsonl"),
        "LATIN1_YAML": str(tmp_path / "latin1.yaml"),
        "FILE": str(tmp_path / "afile.txt"),
        "EMPTY": str(tmp_path / "empty.jsonl"),
        "OUT": str(out),
        "OUTFILE": str(tmp_path / "existing_scores.jsonl"),
        "NEWFILE": str(tmp_path / "new_scores.jsonl"),
        "SELECTED": str(selected),
        "MISSING": str(tmp_path / "missing.yaml"),
        "DATA_DIR": str(holder),
        **{
            k: str(tmp_path / f)
            for k, f in (
                ("TRUNC_JSON", "trunc.json"),
                ("TRUNC_GZ", "trunc.jsonl.gz"),
                ("TEXT_GZ", "text.jsonl.gz"),
                ("GARBAGE_PARQUET", "garbage.parquet"),
                ("NESTED", "nested.json"),
                ("NEEDLE_INT", "needle.yaml"),
                ("NOT_ZIP_DIR", "notzip"),
                ("NO_SCORES", "noscores.jsonl"),
            )
        },
        "DATA_IN_DIR": str(holder / "data.jsonl"),
        "SCORES_IN_DIR": str(holder / "scores.jsonl"),
        **dirs,
    }


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(argv, inputs, tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.setattr(models, "load_tokenizer", no_model)
    monkeypatch.setattr(config.ModelConfig, "load", no_model)
    monkeypatch.chdir(tmp_path)  # default outputs (runs/...) would land here, and are checked below
    argv = [a.format(**inputs) for a in argv]
    before = _snapshot(tmp_path)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith(f"ctxaware {argv[0]}: error: ")
    assert _snapshot(tmp_path) == before  # nothing written, nothing lost
    assert not any(p.name.startswith(".ctxaware-write-test") for p in Path(tmp_path).rglob("*"))


@pytest.mark.parametrize("cmd", list(EXISTING_OUTPUTS))
def test_existing_output_is_refused_with_the_way_out(cmd, inputs, tmp_path, capsys, monkeypatch):
    """Issue 23 §1: the refusal of an existing output names the file and --overwrite (what the table above
    cannot tell apart from any other one-line error)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main([a.format(**inputs) for a in EXISTING_OUTPUTS[cmd]]) == 2
    err = capsys.readouterr().err
    assert "already" in err and "--overwrite" in err, err


def test_overwrite_replaces_an_earlier_dump(tmp_path, capsys):
    """``--overwrite`` is the explicit way to replace an earlier output: the dump is written anew."""
    out = tmp_path / "prompts.jsonl"
    argv = ["nih", "--lengths", "400", "--depths", "50", "--template", "1", "--dump-prompts", str(out)]
    out.write_text("an earlier file\n")
    assert cli.main(argv) == 2 and out.read_text() == "an earlier file\n"
    assert cli.main([*argv, "--overwrite"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["length"] == 400 for r in rows)


def test_unwritable_path_is_really_unwritable():
    """The table's unwritable path must refuse writes on this machine, or the cases above test nothing."""
    with pytest.raises(OSError):
        fd = os.open(UNWRITABLE, os.O_CREAT | os.O_WRONLY)
        os.close(fd)


def test_damaged_weights_are_one_line(tmp_path):
    """A model directory whose model.safetensors is garbage: a one-line CtxawareError, not safetensors'
    traceback (issue 23 §4)."""
    from ctxaware.core.errors import CtxawareError
    from tests.conftest import tiny_llama

    d = tmp_path / "m"
    tiny_llama(layers=1).save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CtxawareError, match="damaged") as e:
        models.load_model(str(d), device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["nih", "--chat-template", "{BROKEN}", "--lengths", "400", "--depths", "50"],
        ["nih", "--attention-layers", "99", "--lengths", "400", "--depths", "50"],
        ["nih", "--steer", "{HEADS99}", "--alpha", "0.5", "--lengths", "400", "--depths", "50"],
        ["attention", "--layer", "99"],
        ["attention", "--chat-template", "{BROKEN}"],
    ],
    ids=["nih broken template", "nih attention layer 99", "nih heads file layer 99", "attention layer 99",
         "attention broken template"],
)  # fmt: skip
def test_options_checked_with_the_tokenizer_before_the_model(argv, tmp_path, capsys, monkeypatch):
    """Issue 23 §4: what needs the tokenizer (the template renders, layers exist in config.json) is checked
    before the model loads and before the output folder exists, so the corrected rerun is not refused as a
    different configuration."""

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the bad option was reported")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.setattr(config.ModelConfig, "load", no_model)
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content")
    (tmp_path / "heads99.json").write_text('{"99": [0]}')
    out = tmp_path / "out"
    args = [a.format(BROKEN=tmp_path / "broken.jinja", HEADS99=tmp_path / "heads99.json") for a in argv]
    assert cli.main([*args, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert not out.exists()


@pytest.mark.parametrize("cmd, lock", [("train", ".train.lock"), ("experiment", ".experiment.lock")])
def test_a_second_writer_of_one_output_is_refused(cmd, lock, tmp_path, capsys, monkeypatch):
    """Issue 23 §3: while one process trains into an output directory, a second one into the same directory
    is refused in one line before it loads anything (the lock ResultsWriter takes, here held by this test)."""
    from ctxaware.core.results import exclusive

    def no_model(*a, **k):
        raise AssertionError("a model was loaded although the output is taken")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.setattr(config.ModelConfig, "load", no_model)
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    )
    out = tmp_path / "out"
    with exclusive(out, lock):
        rc = cli.main([cmd, "--data", str(data), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "another process is writing" in err[0]


def test_an_unreachable_hub_fails_fast_in_one_line(monkeypatch, capsys, tmp_path):
    """Issue 23 §4: a hub id that is not cached, with the hub unreachable, is one line at once (it was 45
    lines of retry warnings over about a minute), before any tokenizer load and any output folder."""
    import time

    def no_model(*a, **k):
        raise AssertionError("the hub client was asked although the hub is unreachable")

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_model)
    t0 = time.time()
    rc = cli.main(["nih", "--model", "someorg/no-such-model", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot be reached" in err[0] and time.time() - t0 < 10
    assert not (tmp_path / "o").exists()
