"""Benchmark (issue 28): one RULER task's grid with attention rows vs the same grid without them.

`ctxaware ruler` reads every row's attention shares at the analysis layer on the prefill of the row's own
generation (`attention.PrefillShares`, the same capture as `ctxaware nih`). This runs one task's grid (every
example in every condition) twice per round in one process, in the order off, on, on, off so that a change of
CPU load hits both alike; asserts that the outputs are identical with and without the capture; prints both
times and the ratio (goal: <= 1.1x).

    python benchmarks/ruler_attention.py --task niah_multikey_2 --length 1024 --n 4 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from nih_attention import alternate, verdict  # benchmarks/ is the script's directory, first on sys.path

from ctxaware.core.models import load_model
from ctxaware.evaluation import ruler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", default="niah_multikey_2")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--n", type=int, default=4, help="examples (each in all four conditions)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="rounds of off, on, on, off")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, dtype="float32", device="cpu")
    n_rows, layer, calls = 0, None, iter(range(10**6))
    with tempfile.TemporaryDirectory() as tmp:

        def run(attention: bool) -> dict:
            nonlocal n_rows, layer
            cfg = ruler.RulerConfig(
                model=a.model, tasks=[a.task], lengths=[a.length], n=a.n, attention=attention,
                output=os.path.join(tmp, str(next(calls))),
            )  # fmt: skip
            cfg.load = lambda name=None: (model, tok)  # type: ignore[method-assign]  # loaded once
            _, rows = ruler.run_model(cfg, a.model)
            n_rows = len(rows)
            assert n_rows == a.n * len(ruler.CONDITIONS)
            assert all(("attention" in r) == attention for r in rows)
            if attention:
                layer = next(iter(rows[0]["attention"]))
            return {tuple(r[k] for k in ruler.KEYS): r["output"] for r in rows}

        off, on = alternate(run, a.repeats)
    print(
        f"ruler {a.task} at {a.length} tokens, {n_rows} rows ({a.n} examples x 4 conditions), attention layer "
        f"{layer}: " + verdict(off, on)
    )


if __name__ == "__main__":
    main()
