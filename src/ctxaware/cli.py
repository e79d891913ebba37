"""The ``ctxaware`` command: one subcommand per step of the method.

Each subcommand is a thin module of `ctxaware.commands` exposing ``main(argv) -> int``; this file only
dispatches (one hop) and turns a `CtxawareError` into one line on stderr with exit code 2. ``--debug``
shows the traceback instead. A run that left units of work unfinished for an outside reason
(`results.leave_for_next_run`, e.g. a failing MT-Bench judge) says so on stderr and exits 1; so does a run
that ran out of disk (`DISK_FULL`), keeping the rows it finished.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import signal
import sys
import threading

from ctxaware.core.errors import CtxawareError

# the write errors that mean "no room": a run ends with one line and exit 1 (an outside cause, like a failed
# judge call), its finished rows kept for the resume; any other OSError is a defect and keeps its traceback
DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for the file system or the process's file-size limit"}  # fmt: skip

# command -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "demo": (
        "ctxaware.commands.demo",
        "run the paper's headline measurements on the default model in a few minutes",
    ),
    "render": ("ctxaware.commands.render", "show a conversation's tokens and the role of each token"),
    "nih": ("ctxaware.commands.nih", "needle-in-a-haystack with and without the chat template"),
    "attention": (
        "ctxaware.commands.attention",
        "attention allocation per role, with vs. without the chat template",
    ),
    "ruler": (
        "ctxaware.commands.ruler",
        "RULER-class retrieval (and HELMET's JSON KV), chat vs plain, paired, with attention",
    ),
    "heads": (
        "ctxaware.commands.heads",
        "find retrieval heads (paper eq. 3) and save them as JSON",
    ),
    "eval": ("ctxaware.commands.eval", "context-dependent QA, knowledge conflict and MT-Bench evaluation"),
    "score": (
        "ctxaware.commands.score",
        "context-dependency score of every assistant turn of a dataset (eq. 2)",
    ),
    "select": ("ctxaware.commands.select", "threshold scores and write the [IND]-marked dataset"),
    "analyze": ("ctxaware.commands.analyze", "layer agreement and instruction-length analyses of scores"),
    "lm-eval-tasks": (
        "ctxaware.commands.lm_eval_tasks",
        "print the lm-evaluation-harness task pack's directory (lm_eval --include_path)",
    ),
    "recipes": ("ctxaware.commands.recipes", "list the training recipes (ctxaware train NAME runs one)"),
    "train": ("ctxaware.commands.train", "instruction fine-tuning, vanilla or with the indicator"),
    "stages": (
        "ctxaware.commands.stages",
        "context use across training stages (SFT -> DPO -> RLVR) and what drives it",
    ),
    "experiment": ("ctxaware.commands.experiment", "score -> select -> train -> evaluate, end to end"),
    "report": (
        "ctxaware.commands.report",
        "one self-contained HTML page (and Markdown) from result directories",
    ),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: ctxaware [--debug] [--threads N] COMMAND [options]   (ctxaware COMMAND --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def set_threads(argv: list[str]) -> list[str]:
    """The thread policy, before torch is imported (docs/speed.md): ``--threads N`` (a global option, before
    the command) or ``$OMP_NUM_THREADS`` fix the count; otherwise torch's own default (the cores this process
    may run on). Waiting threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE`` unless set): on a
    shared CPU a spinning team burns the cores its neighbours need. Returns ``argv`` without the option."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if argv and (argv[0] == "--threads" or argv[0].startswith("--threads=")):
        if argv[0] == "--threads":
            value, argv = (argv[1] if len(argv) > 1 else ""), argv[2:]
        else:
            value, argv = argv[0].partition("=")[2], argv[1:]
        if not value.isdigit() or int(value) < 1:
            raise CtxawareError(f"--threads {value or '(missing)'} must be a positive number of threads")
        os.environ["OMP_NUM_THREADS"] = value
        if "torch" in sys.modules:  # an in-process call after torch was imported: set it there too
            sys.modules["torch"].set_num_threads(int(value))
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        argv = set_threads(argv)
    except CtxawareError as e:
        print(f"ctxaware: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from ctxaware import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ctxaware: unknown command {name!r}; commands are: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ctxaware.core import provenance

    provenance.COMMAND[:] = ["ctxaware", name, *rest]  # recorded in every run's meta.json
    from ctxaware.core.results import INCOMPLETE

    INCOMPLETE.counts.clear(), INCOMPLETE.examples.clear()
    previous = _on_sigterm_interrupt()
    try:
        module = importlib.import_module(COMMANDS[name][0])
        rc = int(module.main(rest) or 0)
        if INCOMPLETE.total:  # work that failed for an outside reason: not written, redone on the next run
            why = "; ".join(f"{n} x {r}" for r, n in INCOMPLETE.counts.items())
            print(f"ctxaware {name}: {INCOMPLETE.total} unit(s) NOT finished and left for the next run ({why}); "
                  "fix the cause and rerun the same command", file=sys.stderr)  # fmt: skip
            return rc or 1
        return rc
    except CtxawareError as e:
        if debug:
            raise
        print(f"ctxaware {name}: error: {e}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:  # a safety net: inputs are checked up front where their paths are known
        if debug:
            raise
        print(f"ctxaware {name}: error: an input file is not UTF-8 text ({e.reason} at byte {e.start}); "
              "convert it, e.g. iconv -f latin1 -t utf-8", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt as e:
        signame = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"ctxaware {name}: {signame}; finished rows are kept, rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:  # `ctxaware ... | head`: the reader left; say nothing more
        sys.stderr.close()
        return 0
    except OSError as e:
        if debug or e.errno not in DISK_FULL:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"ctxaware {name}: error: {DISK_FULL[e.errno]}{where}; finished rows are kept (a torn last row is "
              "cut on resume): free space and rerun the same command to resume", file=sys.stderr)  # fmt: skip
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that a terminated run unwinds exactly as Ctrl-C does
    (writers close, finished rows stay, the same message)."""


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated()


def _on_sigterm_interrupt():
    """Install the SIGTERM handler for the command (main thread only); returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


if __name__ == "__main__":
    sys.exit(main())
