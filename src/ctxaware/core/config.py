"""Typed dataclass configs from YAML files with CLI overrides (in the spirit of TRL's ``TrlParser``).

Every command has one config dataclass. Each field carries ``metadata={"help": ...}``; its default lives
in the dataclass and nowhere else. Precedence: dataclass default < ``--config FILE.yaml`` < CLI flags.
Unknown keys, in YAML or on the command line, are errors that list the valid ones.

CLI conventions: ``--max-new-tokens 50`` (dashes or underscores), lists as ``--lengths 200,1000``,
booleans as ``--chat`` / ``--no-chat``, ``none`` for an optional value. A field with
``metadata={"positional": True}`` is a positional argument (a list field takes one or more values).

Validation happens when a config is built (`Checked.__post_init__`: from the command line, from YAML, in
Python or by ``dataclasses.replace``), before any command loads a model or reads data: numeric bounds
(``metadata={"min": 1}``, ``{"gt": 0}``, ``{"max": 100}``, ``{"lt": 1}``; list items are checked one by one) and paths
(``metadata={"path": "output_dir" | "output_file" | "input_file" | "input"}``). Rules attach to fields
explicitly, in their metadata; a field's name implies no rule.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import math
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from ctxaware.core.errors import CtxawareError

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Coerce a YAML or CLI value to the field type ``tp``."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise CtxawareError(
            f"{name} must not be empty; give a value of type {getattr(base, '__name__', base)}"
        )
    origin = get_origin(base)
    try:
        if origin is list:
            (item_tp,) = get_args(base) or (str,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [_convert(v, item_tp, name) for v in value]
        if origin is Literal:
            choices = get_args(base)
            if value not in choices:
                raise CtxawareError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")
            return value
        if origin is dict or base is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError("expected a mapping")
            return value
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            out = base(value)
            if base is float and not math.isfinite(out):
                raise ValueError("expected a finite number")
            return out
        if base is Any:
            return value
    except CtxawareError:
        raise
    except (TypeError, ValueError, json.JSONDecodeError) as e:
        raise CtxawareError(
            f"{name}={value!r} is not a valid {getattr(base, '__name__', base)} ({e})"
        ) from None
    return value


# torchrun's own parser reads any flag that abbreviates one of its options (``--n``: ``--nnodes``) even after
# the script's name, so an option named ``--n`` gets an alias (``"aliases"`` in its field's metadata)
TORCHRUN_N = "; --n-examples under torchrun, whose parser takes --n for its own --nnodes"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad flag is a `CtxawareError` (exit 2), not usage + message."""

    def error(self, message: str):  # type: ignore[override]
        raise CtxawareError(f"{message}; see {self.prog} --help")


def _with_default(help_: str, default: Any) -> str:
    """``help (default: X)``, unless the help text already states its default; ``None`` reads ``none``."""
    if re.search(r"\bdefault\b", help_, re.IGNORECASE):
        return help_
    shown = "none" if default is None else str(default).replace("%", "%%")
    return f"{help_} (default: {shown})" if help_ else f"(default: {shown})"


def build_parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose options are the fields of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    parser = _Parser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip().split("\n\n")[0],
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file with values for any of the options below", default=None)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("section"):  # sections: --SECTION.OPTION (`parse_sectioned`)
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        if isinstance(default, list):
            default = ",".join(map(str, default))
        if f.metadata.get("positional"):
            nargs = "+" if get_origin(tp) is list else None
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                nargs = "*" if get_origin(tp) is list else "?"
            parser.add_argument(f.name, nargs=nargs, help=help_)
            continue
        names = [_flag(f.name)]
        if "-" in names[0][2:]:
            names.append("--" + f.name)
        names += f.metadata.get("aliases", [])
        help_ = _with_default(help_, default)
        if tp is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, help=help_)
        else:
            choices = get_args(tp) if get_origin(tp) is Literal else None
            parser.add_argument(*names, dest=f.name, choices=choices, help=help_)
    return parser


DATA_ENV = ("CTXAWARE_DATA", "CTXAWARE_SHARED_DATA")  # the one data setting (the second is its older name)
_CHECKOUT = Path(__file__).resolve().parents[3]  # the repository root, when the package runs from a checkout


def data_dir_candidates() -> list[Path]:
    """Where the shared data folder is looked for, in order: ``$CTXAWARE_DATA`` (or ``$CTXAWARE_SHARED_DATA``)
    when set (then only there), else ``../shared/data`` beside the checkout the package runs from, then
    ``./shared/data`` and ``../shared/data`` from the working directory (an installed wheel)."""
    for name in DATA_ENV:
        if os.environ.get(name):
            return [Path(os.environ[name]).expanduser()]
    return [
        _CHECKOUT.parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
    ]


def default_data_dir() -> Path:
    """The shared data folder every command reads by default (`data_dir_candidates`: the first that exists,
    else the first looked at, which the missing-file error then names). ``--data-dir`` overrides it."""
    places = data_dir_candidates()
    return next((p for p in places if p.is_dir()), places[0])


def where_data_was_looked_for() -> str:
    """The places `default_data_dir` tried, for one-line errors."""
    places = list(dict.fromkeys(str(p) for p in data_dir_candidates()))
    return ", ".join(places) + " (set CTXAWARE_DATA to the shared data folder)"


def _shared_paths(value: Any) -> Any:
    """``shared:REL`` in a YAML config is ``REL`` inside the shared data folder, so that a recipe works from
    any directory and from an installed wheel."""
    if isinstance(value, str) and value.startswith("shared:"):
        return str(default_data_dir() / value.removeprefix("shared:"))
    if isinstance(value, list):
        return [_shared_paths(v) for v in value]
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CtxawareError(f"config file {p} does not exist; pass the path of a YAML file")
    check_utf8(p, "--config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise CtxawareError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CtxawareError(f"config file {p} must hold a mapping of option names to values")
    return {k: _shared_paths(v) for k, v in data.items()}


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a mapping, converting types; unknown keys are an error listing the valid ones."""
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    norm = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(norm) - valid)
    if unknown:
        raise CtxawareError(
            f"unknown option(s) {', '.join(unknown)} in {source}; valid options are: {', '.join(sorted(valid))}"
        )
    kwargs = {k: _convert(v, hints[k], k) for k, v in norm.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise CtxawareError(f"{source}: {e}") from None


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str = "ctxaware") -> T:
    """Parse ``argv`` into ``cls``: dataclass defaults, then ``--config`` YAML, then CLI flags."""
    parser = build_parser(cls, prog)
    try:
        ns, extra = parser.parse_known_args(argv)
    except SystemExit as e:
        raise SystemExit(2 if e.code else 0) from None
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    cli = vars(ns)
    config_path = cli.pop("config", None)
    values: dict[str, Any] = load_yaml(config_path) if config_path else {}
    values.update(cli)
    return from_dict(cls, values, source=config_path or "command line")  # validated when built (`Checked`)


def parse_sectioned(cls: type[T], argv: list[str], prog: str, renamed: dict[str, str] | None = None) -> T:
    """Parse a config whose fields include sections (other configs; `ctxaware.experiment`): ``--config``
    YAML with nested mappings, then flags: ``--OPTION VALUE`` for the config's own options and
    ``--SECTION.OPTION VALUE`` inside a section (``--eval.limit 200``; ``--flag`` alone is true,
    ``--no-flag`` false). A retired flat key (``renamed``) is refused in one line that names its new key."""
    values: dict[str, Any] = {}
    cli: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise CtxawareError(f"unexpected argument {arg!r}; options are --OPTION VALUE; see {prog} --help")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            elif key.startswith("no-") or key.startswith("no_"):
                key, value = key[3:], "false"
            else:
                value = "true"
        i += 1
        key = key.replace("-", "_")
        if key == "config":
            values = load_yaml(value)
        else:
            cli.append((key, _shared_paths(value)))
    for key, value in cli:  # CLI over YAML, key by key (a section's other YAML keys stay)
        section, dot, option = key.partition(".")
        if not dot:
            values[key] = value
            continue
        current = values.get(section)
        if isinstance(current, str):  # a section given by its main value (model: NAME)
            current = {section: current}
        values[section] = {**(current or {}), option: value}
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in values:
        norm = key.replace("-", "_")
        if norm not in valid and norm in (renamed or {}):
            new = renamed[norm]  # type: ignore[index]
            section, _, option = new.partition(" ")[0].partition(".")
            raise CtxawareError(f"option {key} is now {new}, one section per command: {section}: {{{option}: ...}} "
                                f"in YAML, --{section}.{option} on the command line")  # fmt: skip
    return from_dict(cls, values, source=prog)


# ----------------------------------------------------------------------------- validation (before compute)

_BINARY_SUFFIXES = (".gz", ".parquet", ".zip", ".arrow", ".gguf", ".safetensors", ".bz2", ".xz", ".zst")


RULE_KEYS = ("min", "gt", "max", "lt", "path", "resumable")


def rule(f: dataclasses.Field) -> dict[str, Any]:
    """The checks of one config field, from its own metadata only (a field's name implies nothing)."""
    return {k: v for k, v in f.metadata.items() if k in RULE_KEYS}


def overwrite_option() -> Any:
    """The ``overwrite`` field of every config that writes a file (`check_existing_outputs`)."""
    return dataclasses.field(
        default=False, metadata={"help": "replace an earlier output file of this command (never an input)"}
    )


def check_existing_outputs(config: Any) -> None:
    """An output file that already exists is replaced only with ``--overwrite`` (issue 23 §1): it may be a
    user's file or an earlier result, and no output replaces either by accident. Resumable outputs
    (``resumable`` in the field's metadata: the command checks its own run's fingerprint) are exempt."""
    if getattr(config, "overwrite", False):
        return
    for f in dataclasses.fields(config):
        r = rule(f)
        if r.get("path") != "output_file" or r.get("resumable"):
            continue
        for p in _paths(getattr(config, f.name)):
            if Path(p).expanduser().is_file():
                how = "pass --overwrite to replace it, or " if hasattr(config, "overwrite") else ""
                raise CtxawareError(f"{_flag(f.name)} {p} already exists; {how}give a new file name")


def refuse_existing(paths: list[Path], overwrite: bool, flag: str) -> None:
    """The same rule for the files a command writes inside an output directory."""
    there = [p for p in paths if p.exists()]
    if there and not overwrite:
        raise CtxawareError(f"{flag} {there[0].parent} already holds {there[0].name} from an earlier run; pass "
                            "--overwrite to replace it, or give a new directory")  # fmt: skip


def check_utf8(path: str | Path, what: str) -> None:
    """Raise a one-line error when a text file is not UTF-8 (checked in 1 MiB blocks, before any compute)."""
    p = Path(path)
    if not p.is_file() or p.name.endswith(_BINARY_SUFFIXES):
        return
    dec, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with p.open("rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                dec.decode(block)
                offset += len(block)
            dec.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise CtxawareError(
            f"{what} {p} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {offset + e.start}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    except OSError as e:
        raise CtxawareError(f"{what} {p} cannot be read: {e.strerror or e}") from None


def check_output_path(path: str | Path, kind: str, what: str) -> None:
    """Fail now, not after the work, when ``path`` cannot become an output file / directory: it is a
    directory where a file is expected (or the reverse), lies under a file, or cannot be written."""
    p = Path(path).expanduser()
    if kind == "output_file":
        if p.is_dir():
            raise CtxawareError(f"{what} {path} is a directory; give a file name")
        parent = p.parent
    else:
        if p.exists() and not p.is_dir():
            raise CtxawareError(f"{what} {path} is a file; give a directory (it would hold several files)")
        parent = p
    existing = parent
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CtxawareError(
            f"{what} {path} lies under {existing}, which is not a directory; use another path"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".ctxaware-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CtxawareError(
            f"{what} {path}: cannot write in {existing} ({e.strerror or e}); use another path"
        ) from None


def _check_bounds(name: str, value: Any, r: dict[str, Any]) -> None:
    if isinstance(value, list):
        for v in value:
            _check_bounds(name, v, r)
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    flag = _flag(name)
    if not math.isfinite(value):  # NaN passes every comparison below
        raise CtxawareError(f"{flag} {value}: expected a finite number")
    if "min" in r and value < r["min"]:
        raise CtxawareError(f"{flag} {value} must be at least {r['min']}")
    if "gt" in r and value <= r["gt"]:
        raise CtxawareError(f"{flag} {value} must be greater than {r['gt']}")
    if "max" in r and value > r["max"]:
        raise CtxawareError(f"{flag} {value} must be at most {r['max']}")
    if "lt" in r and value >= r["lt"]:
        raise CtxawareError(f"{flag} {value} must be below {r['lt']}")


def _paths(value: Any) -> list[str]:
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v]
    return []


def spare_inputs(
    outputs: list[tuple[str, str, str]],
    inputs: list[tuple[str, str]],
    overwrite: bool = False,
    can: bool = False,
) -> None:
    """Refuse, in one line, an output that is, holds or would replace an input (issue 23 §1). ``outputs``:
    ``(flag, path, "output_file"|"output_dir")``; ``inputs``: ``(flag, path)``. An output file that is an
    input, or an output directory that holds an input file, is always refused; an existing output file
    inside an input directory is refused unless ``overwrite`` (``can``: the command has ``--overwrite``)."""
    ins = [(n, Path(p).expanduser().resolve()) for n, p in inputs if Path(p).expanduser().exists()]
    for flag, value, kind in outputs:
        out = Path(value).expanduser().resolve()
        for name, inp in ins:
            if out == inp:
                raise CtxawareError(f"{flag} {value} is the input {name}; write the output elsewhere")
            if kind == "output_dir" and inp.is_file() and out in inp.parents:
                raise CtxawareError(
                    f"{flag} {value} holds the input {inp}; its outputs could replace it, so write them to "
                    "another directory"
                )
            if (
                kind == "output_file"
                and inp.is_dir()
                and inp in out.parents
                and out.exists()
                and not overwrite
            ):
                raise CtxawareError(
                    f"{flag} {value} would replace {out.name} inside the input directory {inp}; give a new "
                    "file name" + (" or pass --overwrite" if can else "")
                )


def check_outputs_spare_inputs(config: Any) -> None:
    """`spare_inputs` over a config's fields: outputs are the fields with an ``output_*`` path rule, inputs
    those with an ``input*`` rule."""
    rules = [(f, rule(f)) for f in dataclasses.fields(config)]
    inputs = [(_flag(f.name), p) for f, r in rules if r.get("path") in ("input", "input_file")
              for p in _paths(getattr(config, f.name))]  # fmt: skip
    outputs = [(_flag(f.name), p, r["path"]) for f, r in rules if r.get("path") in ("output_file", "output_dir")
               for p in _paths(getattr(config, f.name))]  # fmt: skip
    spare_inputs(outputs, inputs, bool(getattr(config, "overwrite", False)), hasattr(config, "overwrite"))


def check_fields(config: Any) -> None:
    """Check every field of a parsed config against `rule`: bounds, output paths, input files' encoding, and
    that no output is, holds or replaces an input (`check_outputs_spare_inputs`)."""
    check_outputs_spare_inputs(config)
    check_existing_outputs(config)
    if isinstance(config, ModelConfig):
        check_device_dtype(config.device, config.dtype)
    for f in dataclasses.fields(config):
        r, value = rule(f), getattr(config, f.name)
        _check_bounds(f.name, value, r)
        kind = r.get("path")
        if kind in ("output_dir", "output_file") and isinstance(value, str) and not value.strip():
            raise CtxawareError(f"{_flag(f.name)} is empty; give a path")
        if not kind or not isinstance(value, str) or not value:
            continue
        what = _flag(f.name)
        if kind in ("output_dir", "output_file"):
            check_output_path(value, kind, what)
        elif kind in ("input_file", "input"):
            p = Path(value).expanduser()
            if kind == "input_file" and p.is_dir():
                raise CtxawareError(f"{what} {value} is a directory; give a file")
            check_utf8(p, what)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_device_dtype(device: str, dtype: str) -> None:
    """``--device`` is cpu, cuda, cuda:N, mps or auto and ``--dtype`` one of `DTYPES`: checked before any
    model loads (torch would fail later, with a traceback)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(device)):
        raise CtxawareError(f"--device {device!r} is not cpu, cuda, cuda:N, mps or auto")
    if dtype not in DTYPES:
        raise CtxawareError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a config, for result metadata and fingerprints."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


class Checked:
    """Base of every command's config: it validates itself when built (`check_fields`), so a config made in
    Python (or by ``dataclasses.replace``) is checked exactly as one parsed from the command line."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclasses.dataclass
class ModelConfig(Checked):
    """Options every command that loads a model shares (fields are inherited by each command's config).

    Parameters:
        model: built-in name (``default`` = smollm2-135m-instruct, ``gemma3-270m``), a ``.gguf`` file, a saved
            model directory or a hub id.
        revision: hub branch, tag or commit, for intermediate checkpoints.
        dtype: ``auto`` (float32 on CPU, bfloat16 on capable GPUs), ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        attn_implementation: ``sdpa``, ``eager``, ``flex_attention`` or ``flash_attention_2``.
        trust_remote_code: run modelling code from the hub repository (off unless you trust it).
    """

    model: str = dataclasses.field(
        default="default", metadata={"help": "built-in name, .gguf file, model directory or hub id"}
    )
    revision: str | None = dataclasses.field(default=None, metadata={"help": "hub branch, tag or commit"})
    dtype: str = dataclasses.field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16"})
    device: str = dataclasses.field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    attn_implementation: str = dataclasses.field(
        default="sdpa", metadata={"help": "sdpa, eager or flex_attention"}
    )
    trust_remote_code: bool = dataclasses.field(
        default=False, metadata={"help": "run model code from the hub"}
    )
    device_map: str | None = dataclasses.field(
        default=None, metadata={"help": "auto: spread the model over the visible GPUs (replaces --device)"}
    )
    quantization: Literal["4bit", "8bit"] | None = dataclasses.field(
        default=None, metadata={"help": "4bit or 8bit weights (bitsandbytes, CUDA GPU only)"}
    )
    peft_adapter: str | None = dataclasses.field(
        default=None, metadata={"help": "a PEFT (LoRA) adapter directory applied on top of --model"}
    )

    def load(self, model: str | None = None, **overrides: Any):
        """``(model, tokenizer)`` for ``model`` (default: this config's ``model``) with this config's model
        options; ``overrides`` replace some of them (training resolves the device and its QLoRA)."""
        from ctxaware.core.models import load_model

        options = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig) if f.name != "model"
        }
        return load_model(model or self.model, **{**options, **overrides})

    def load_tokenizer(self, model: str | None = None):
        """The tokenizer alone of ``model`` (default: this config's), with this config's revision and remote-code
        choice: for prompts built without a model (``--dump-prompts``, a server backend)."""
        from ctxaware.core.models import load_tokenizer

        return load_tokenizer(
            model or self.model, revision=self.revision, trust_remote_code=self.trust_remote_code
        )
