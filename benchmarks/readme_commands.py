"""Time every command the README lists, as a new user runs them (issue 27: "the measured time of every
documented command on an idle 2-core CPU").

It clones the repository into a scratch directory with ``../shared`` beside it (so the commands write there,
never into this checkout), runs the README's command block line by line in that clone (``runs/`` outputs,
the relative paths as written), and records for each: wall seconds, CPU seconds of the command's processes,
the load average before it, the exit code, and whether it finished or was stopped at ``--limit`` seconds
(SIGINT, as Ctrl-C: ctxaware keeps the finished rows). Lines that need a GPU, a launcher with 8 processes or
a serving engine are listed as not run here, with the reason. Results append to ``--out`` (JSONL,
resumable: a command already timed is not rerun) and a Markdown table is printed.

    python benchmarks/readme_commands.py --out runs/readme_commands.jsonl --limit 600
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# README lines that cannot run on this machine, and why (matched by their start)
NOT_HERE = {
    "torchrun": "a launcher with 8 processes (tests/test_*.py launch 2 on the CPU instead)",
    "accelerate launch": "a launcher with 8 processes / FSDP on GPUs",
    "ctxaware nih --backend server": "a serving engine (tests/test_server.py runs transformers serve instead)",
    "lm_eval": "a model lm-eval loads from the hub (tests/test_lm_eval_tasks.py runs lm_eval on the built-in "
    "SmolLM2's directory instead: 10 SQuAD + 10 NIH)",
}


def readme_commands(readme: Path = REPO / "README.md") -> list[str]:
    """The command block that follows "For a quick look" in the README, one command per line, comments cut."""
    text = readme.read_text()
    block = re.search(r"For a quick look.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no command block after 'For a quick look'"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def not_here(cmd: str) -> str | None:
    return next((why for start, why in NOT_HERE.items() if cmd.startswith(start)), None)


def run_one(cmd: str, cwd: Path, limit: float) -> dict:
    load, started = os.getloadavg()[0], time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # a shell that starts this script in the background (nohup ... &) ignores SIGINT in its children, and an
    # ignored SIGINT is inherited: give the command the default back, so that Ctrl-C stops it
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    stopped, stop_s = False, None
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        stopped, stop_s = True, time.perf_counter() - t0
        out = ""
        for sig, wait in ((signal.SIGINT, 60), (signal.SIGTERM, 60), (signal.SIGKILL, None)):  # Ctrl-C first
            proc.send_signal(sig)
            try:
                out, _ = proc.communicate(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rows = None
    if stopped:  # the rows this command wrote (files it touched), when it was stopped
        files = [p for p in (cwd / "runs").rglob("rows.jsonl") if p.stat().st_mtime >= started]
        rows = sum(len(p.read_text().splitlines()) for p in files)
    return {"command": cmd, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": round(load, 2),
            "rc": proc.returncode, "stopped_at_limit": stopped, "stopped_after_s": stop_s and round(stop_s, 1),
            "rows_when_stopped": rows, "tail": out[-600:]}  # fmt: skip


def table(results: list[dict]) -> str:
    lines = ["| command | wall | CPU | load before | result |", "|---|---|---|---|---|"]
    for r in results:
        if r.get("not_run"):
            lines.append(f"| `{r['command']}` | - | - | - | not run here: {r['not_run']} |")
            continue
        what = (f"stopped at the limit ({r['rows_when_stopped']} rows written by then)"
                if r["stopped_at_limit"] else ("finished" if r["rc"] == 0 else f"exit {r['rc']}"))  # fmt: skip
        lines.append(
            f"| `{r['command']}` | {r['wall_s']:.0f} s | {r['cpu_s']:.0f} s | {r['load_before']} | {what} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/readme_commands.jsonl")
    ap.add_argument("--limit", type=float, default=600.0, help="seconds before a command is stopped (Ctrl-C)")
    ap.add_argument("--scratch", default="/tmp/ctxaware-readme-commands")
    ap.add_argument("--only", default="", help="run only commands containing this text")
    args = ap.parse_args()
    scratch = Path(args.scratch)
    clone = scratch / "repo"
    if not clone.is_dir():
        scratch.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        if not (scratch / "shared").exists():
            (scratch / "shared").symlink_to(REPO.parent / "shared")
    out = Path(args.out)
    done = (
        {json.loads(x)["command"]: json.loads(x) for x in out.read_text().splitlines()}
        if out.is_file()
        else {}
    )
    results = []
    for cmd in readme_commands():
        if args.only and args.only not in cmd:
            continue
        if cmd in done:
            results.append(done[cmd])
            continue
        why = not_here(cmd)
        r = {"command": cmd, "not_run": why} if why else run_one(cmd, clone, args.limit)
        r["date"] = time.strftime("%Y-%m-%d %H:%M")
        print(json.dumps({k: v for k, v in r.items() if k != "tail"}), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        results.append(r)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
