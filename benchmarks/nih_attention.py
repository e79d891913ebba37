"""Benchmark (issue 13): NIH rows that carry attention shares vs the same NIH run without them.

`ctxaware nih` captures each test's per-role attention of the last prompt token on the prefill of its own
generation (`attention.PrefillShares`). This runs the same grid twice in one process, with and without the
capture, in alternating order (off, on, on, off) so that a change of CPU load hits both alike; asserts that
the generated outputs are identical; prints both times and the ratio (goal: <= 1.1x).

    python benchmarks/nih_attention.py --lengths 500,1000,2000 --depths 0,50,100 --layers 15
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from ctxaware import nih
from ctxaware.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--lengths", default="500,1000,2000")
    p.add_argument("--depths", default="0,50,100")
    p.add_argument("--layers", default="15", help="capture layers (comma-separated)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    times: dict[bool, float] = {False: 0.0, True: 0.0}
    outputs: dict[bool, dict] = {}
    n_rows = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, attention in enumerate((False, True, True, False)):
            cfg = nih.NIHConfig(
                model=a.model, lengths=[int(x) for x in a.lengths.split(",")],
                depths=[float(x) for x in a.depths.split(",")], modes=["chat", "plain"], prefix=[True],
                attention=attention, attention_layers=[int(x) for x in a.layers.split(",")],
                output=os.path.join(tmp, str(i)),
            )  # fmt: skip
            cfg.load = lambda name=None: (model, tok)  # type: ignore[method-assign]  # loaded once
            t0 = time.perf_counter()
            _, rows = nih.run_model(cfg, a.model)
            times[attention] += time.perf_counter() - t0
            got = {(r["condition"], r["length"], r["depth"]): r["output"] for r in rows}
            assert outputs.setdefault(attention, got) == got
            n_rows = len(rows)
            assert all(("attention" in r) == attention for r in rows)
    assert outputs[True] == outputs[False], "capture changed the generated outputs"
    off, on = times[False] / 2, times[True] / 2
    print(
        f"NIH {n_rows} tests ({a.lengths} tokens x depths {a.depths}, chat+plain, 50 new tokens), layers {a.layers}: "
        f"without attention {off:.1f} s, with attention {on:.1f} s = {on / off:.3f}x (goal <= 1.1x); "
        f"outputs identical; load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
