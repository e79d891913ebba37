"""Benchmark (issue 13): NIH rows that carry attention shares vs the same NIH run without them.

`ctxaware nih` captures each test's per-role attention of the last prompt token on the prefill of its own
generation (`attention.PrefillShares`). This runs the same grid twice in one process, with and without the
capture, in alternating order (off, on, on, off) so that a change of CPU load hits both alike; asserts that
the generated outputs are identical; prints both times and the ratio (goal: <= 1.1x).

    python benchmarks/nih_attention.py --lengths 500,1000,2000 --depths 0,50,100 --layers 15 --repeats 1
    python benchmarks/nih_attention.py --level generate --lengths 1000 --repeats 2   # the engine alone
        (also without prefix reuse: --no-prefix-cache)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from ctxaware.core.models import load_model
from ctxaware.data import needle
from ctxaware.evaluation import nih


def alternate(run, repeats: int) -> tuple[float, float]:
    """Time ``run(attention)`` in the order off, on, on, off (``repeats`` rounds); assert every call with the
    same setting, and both settings, give the same outputs; return the mean seconds without and with."""
    times, outs = {False: 0.0, True: 0.0}, {}
    for attention in (False, True, True, False) * repeats:
        t0 = time.perf_counter()
        got = run(attention)
        times[attention] += time.perf_counter() - t0
        assert outs.setdefault(attention, got) == got
    assert outs[True] == outs[False], "capture changed the generated outputs"
    return times[False] / (2 * repeats), times[True] / (2 * repeats)


def verdict(off: float, on: float) -> str:
    """The benchmark's closing words: both mean times, their ratio against the goal, and the CPU load."""
    return (
        f"without attention {off:.1f} s, with attention {on:.1f} s = {on / off:.3f}x (goal <= 1.1x); "
        f"outputs identical; load average {os.getloadavg()[0]:.1f}"
    )


def engine_level(a, model, tok) -> None:
    """The same comparison one level down: `generate` on the rendered prompts, with and without
    ``prefill_context``; outputs compared token for token."""
    from ctxaware.attention.allocation import PrefillShares
    from ctxaware.rendering.generate import generate

    cfg = nih.NIHConfig(lengths=[int(x) for x in a.lengths.split(",")], modes=["chat", "plain"], prefix=[True],
                        depths=[float(x) for x in a.depths.split(",")])  # fmt: skip
    prompts = [p.render(tok) for p in needle.build_prompts(cfg, tok, "bench", 8192)]
    layers = [int(x) for x in a.layers.split(",")]

    def run(attention: bool) -> list[list[int]]:
        shares = PrefillShares(model, layers) if attention else None
        gens = generate(model, tok, prompts, max_new_tokens=50, batch_size=8, prefix_cache=not a.no_prefix_cache,
                        prefill_context=shares, progress=False)  # fmt: skip
        assert shares is None or len(shares.shares) == len(prompts)
        return [g.token_ids for g in gens]

    off, on = alternate(run, a.repeats)
    print(
        f"generate, {len(prompts)} NIH prompts ({a.lengths} tokens), prefix reuse {not a.no_prefix_cache}: "
        f"without attention {off:.1f} s, with {on:.1f} s = {on / off:.3f}x; tokens identical; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--lengths", default="500,1000,2000")
    p.add_argument("--depths", default="0,50,100")
    p.add_argument("--layers", default="15", help="capture layers (comma-separated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="rounds of off, on, on, off")
    p.add_argument("--level", choices=["run", "generate"], default="run")
    p.add_argument("--no-prefix-cache", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    if a.level == "generate":
        return engine_level(a, model, tok)
    n_rows, calls = 0, iter(range(10**6))
    with tempfile.TemporaryDirectory() as tmp:

        def run(attention: bool) -> dict:
            nonlocal n_rows
            cfg = nih.NIHConfig(
                model=a.model, prefix_cache=not a.no_prefix_cache, lengths=[int(x) for x in a.lengths.split(",")],
                depths=[float(x) for x in a.depths.split(",")], modes=["chat", "plain"], prefix=[True],
                attention=attention, attention_layers=[int(x) for x in a.layers.split(",")],
                output=os.path.join(tmp, str(next(calls))),
            )  # fmt: skip
            cfg.load = lambda name=None: (model, tok)  # type: ignore[method-assign]  # loaded once
            _, rows = nih.run_model(cfg, a.model)
            n_rows = len(rows)
            assert all(("attention" in r) == attention for r in rows)
            return {(r["condition"], r["length"], r["depth"]): r["output"] for r in rows}

        off, on = alternate(run, a.repeats)
    print(
        f"NIH {n_rows} tests ({a.lengths} tokens x depths {a.depths}, chat+plain, 50 new tokens), layers {a.layers}: "
        + verdict(off, on)
    )


if __name__ == "__main__":
    main()
