"""The RULER length table of docs/ruler.md: per task, chat+prefix and plain+prefix scores and their paired
difference at each length, and over all lengths, from the rows of one or more `ctxaware ruler` runs of one
model.

    python docs/ruler/lengths.py runs/ruler_smollm2 runs/ruler_smollm2_2k runs/ruler_smollm2_4k
    python docs/ruler/lengths.py --no-prefix RUN_DIR ...    # the pair without the answer prefix: chat, plain

Each example (one haystack and its needles) is one unit of the paired bootstrap. An example is its task,
length, --seed and index: runs with another seed or more examples add new ones, and one already read from
an earlier run (the same context) is not read again. Only the pair's rows are read (chat+prefix and
plain+prefix; chat and plain with --no-prefix), and only examples with both: a run stopped between a
chat row and its plain twin leaves the chat row out of the table (counted on stderr), so each percent is
over the same examples as the difference beside it.
The attention shift is read at each row's analysis layer, shown beside it; a length whose rows were read at
different layers (runs made with another --layer or default) gets one shift per layer, never one pooled
over layers.
"""

from __future__ import annotations

import sys

from ctxaware.core.stats import fmt, markdown_table
from ctxaware.evaluation.ruler import PAIRS, load_runs, summary

PAIR, NO_PREFIX = PAIRS


def load(dirs: list[str], pair: tuple[str, str] = PAIR) -> list[dict]:
    rows, counts = load_runs(dirs, conditions=pair)
    held: dict[tuple, set[str]] = {}
    for r in rows:
        held.setdefault((r["task"], r["index"]), set()).add(r["condition"])
    paired = [r for r in rows if held[(r["task"], r["index"])] >= set(pair)]
    print(f"rows: {counts['read']} read, {counts['repeated']} repeated in a later run, "
          f"{counts['other_context']} of another context (not paired), "
          f"{len(rows) - len(paired)} without their twin (left out)", file=sys.stderr)  # fmt: skip
    return paired


def cell(e: dict | None, pair: tuple[str, str] = PAIR) -> str:
    if e is None or set(pair) - set(e["conditions"]):
        return "-"
    c, p = (e["conditions"][x]["score"]["mean"] * 100 for x in pair)
    d = e["paired"][f"{pair[0]} - {pair[1]}"]
    return f"{c:.0f} / {p:.0f}: {fmt(d)} (n={d['n']})"


def layers(rows: list[dict]) -> list[str]:
    """The analysis layers the rows' attention was read at, in order (none without attention)."""
    return sorted({k for r in rows for k in (r.get("attention") or {})}, key=int)


def pooled(s: dict, length: object, rows: list[dict]) -> dict | None:
    """The summary entry of every task at one length (the task's own entry when only one task ran there)."""
    tasks = {r["task"] for r in rows if r["length"] == length}
    return s.get(f"all@{length}") or (s.get(f"{tasks.pop()}@{length}") if len(tasks) == 1 else None)


def main(dirs: list[str], pair: tuple[str, str] = PAIR) -> None:
    rows = load(dirs, pair)
    by_length = summary(rows)
    over = summary([{**r, "length": "all"} for r in rows])  # every length pooled, per task and over tasks
    lengths = sorted({r["length"] for r in rows})
    table = [
        [t, *(cell(by_length.get(f"{t}@{n}"), pair) for n in lengths), cell(over.get(f"{t}@all"), pair)]
        for t in sorted({r["task"] for r in rows})
    ]
    every = [{**r, "length": "all"} for r in rows]
    table.append(
        [
            "all",
            *(cell(pooled(by_length, n, rows), pair) for n in lengths),
            cell(pooled(over, "all", every), pair),
        ]
    )
    header = ["task", *(f"{n} tokens" for n in lengths), "all lengths"]
    name = f"{pair[0]} - {pair[1]}"
    print(f"{pair[0]} / {pair[1]} %: {name} in points [95% paired bootstrap CI] (n)\n")
    print(markdown_table(header, table))
    shift = lambda e: (e or {}).get("paired_raw_user_share", {}).get(name) or {}  # noqa: E731

    def shift_rows(label: object, at: list[dict]) -> list[list[object]]:
        """One row per analysis layer the rows were read at: their tasks pooled, never pooled across layers."""
        at_layer = {layer: [r for r in at if layer in (r.get("attention") or {})] for layer in layers(at)}
        out = [
            [label, layer, fmt(shift(pooled(summary(g), g[0]["length"], g)), pct=False, digits=3)]
            for layer, g in at_layer.items()
        ]
        return out or [[label, "-", "-"]]

    att = [row for n in lengths for row in shift_rows(n, [r for r in rows if r["length"] == n])]
    att += shift_rows("all lengths", every)
    print("\nThe template's shift of the last token's raw user share, all tasks (share units, paired CI)\n")
    print(markdown_table(["length", "layer", name], att))


def cli(args: list[str]) -> None:
    """The command line: run folders, and ``--no-prefix`` for the pair without the answer prefix."""
    main([a for a in args if a != "--no-prefix"], NO_PREFIX if "--no-prefix" in args else PAIR)


if __name__ == "__main__":
    cli(sys.argv[1:])
