"""The steering tables of docs/ruler.md: for each alpha of eq. (1), the steered chat condition's score, the
points steering recovered (steered - unsteered) and the gap left to the plain twin (plain - steered),
paired over the same contexts, per task and length, from one or more `ctxaware ruler --steer` runs of one
model (`ruler.load_runs`: a later run adds the alphas an earlier one lacks, on the same contexts; rows of a
``--no-steer-generated`` run are labelled "prompt only").

    python docs/ruler/steering.py runs/ruler_smollm2_s3_steer runs/ruler_smollm2_s3_steer_grid
"""

from __future__ import annotations

import sys

from ctxaware.attention.steering import parse_steered
from ctxaware.core.stats import fmt, markdown_table
from ctxaware.evaluation.ruler import load_runs, summary


def table(e: dict) -> tuple[str, list[list[str]]] | None:
    """One ``task@length`` entry of `ruler.summary`: a row for the unsteered chat condition, one per alpha."""
    conds = e["conditions"]
    parsed = {c: parse_steered(c) for c in conds}
    steered = sorted((c for c in conds if parsed[c]), key=lambda c: (not parsed[c][2], parsed[c][1]))
    if not steered:
        return None
    base = parsed[steered[0]][0]
    plain = base.replace("chat", "plain", 1)

    def pct(c: str) -> str:
        return f"{conds[c]['score']['mean'] * 100:.1f}" if c in conds else "-"

    def gap(c: str) -> str:
        if plain not in conds:
            return "-"
        d = e["paired"].get(f"{plain} - {c}")
        if d is None:  # the unsteered pair is summarized as chat - plain: the same CI, negated
            d = e["paired"][f"{c} - {plain}"]
            d = {**d, "mean": -d["mean"], "ci_low": -d["ci_high"], "ci_high": -d["ci_low"]}
        return fmt(d)

    rows = [["none", pct(base), "", gap(base)]]
    for c in steered:
        d = e["paired"][f"{c} - {base}"]
        _, alpha, generated = parsed[c]
        label = f"{alpha:g}" + ("" if generated else " (prompt only)")
        rows.append([label, pct(c), f"{fmt(d)} (n={d['n']})", gap(c)])
    return f"{base}, {plain} {pct(plain)} %", rows


def tables(rows: list[dict]) -> list[tuple[str, list[list[str]]]]:
    """Per ``task@length`` with steered rows, its title and table."""
    out = []
    for key, e in summary(rows).items():
        got = None if key.startswith("all@") else table(e)
        if got is not None:
            out.append((f"{key} ({got[0]})", got[1]))
    return out


def main(dirs: list[str]) -> None:
    rows, _ = load_runs(dirs)
    header = ["alpha", "steered %", "steered - unsteered (recovered)", "plain - steered (gap left)"]
    for title, table in tables(rows):
        print(f"{title}\n\n{markdown_table(header, table)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
