"""Benchmark: the NIH grid through ctxaware (batching + prefix reuse) vs a naive `model.generate` loop.

Same prompts, same greedy settings, same process; prints both times and the ratio and asserts that the
outputs are identical token for token.

    python benchmarks/nih.py                                   # 5 lengths up to 2000 x 5 depths, chat+prefix
    python benchmarks/nih.py --lengths 200,500 --depths 0,100 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from ctxaware.core.models import load_model
from ctxaware.data import needle
from ctxaware.evaluation import nih
from ctxaware.rendering.generate import generate, greedy_config


@torch.inference_mode()
def naive(model, tok, rendered, max_new_tokens: int) -> list[list[int]]:
    """One prompt at a time, `model.generate` on the whole prompt, no cache reuse."""
    cfg = greedy_config(model, tok, max_new_tokens)
    eos = set(cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id])
    outs = []
    for r in rendered:
        ids = torch.tensor([r.input_ids])
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[
            0, ids.shape[1] :
        ]
        toks = []
        for t in new.tolist():
            if t in eos:
                break
            toks.append(t)
        outs.append(toks)
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="400,800,1200,1600,2000")
    ap.add_argument("--depths", default="0,25,50,75,100")
    ap.add_argument("--modes", default="chat")
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, device="cpu", dtype="float32")
    cfg = nih.parse_config(
        nih.NIHConfig, ["--lengths", a.lengths, "--depths", a.depths, "--modes", a.modes, "--prefix", "true"]
    )
    rendered = [
        p.render(tok) for p in needle.build_prompts(cfg, tok, a.model, model.config.max_position_embeddings)
    ]
    n_tok = sum(map(len, rendered))
    print(
        f"{len(rendered)} prompts, {n_tok} prompt tokens, {a.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )

    t0 = time.perf_counter()
    ref = naive(model, tok, rendered, a.max_new_tokens)
    t_naive = time.perf_counter() - t0
    print(f"naive model.generate loop: {t_naive:.1f}s")

    stats: dict = {}
    t0 = time.perf_counter()
    gens = generate(
        model,
        tok,
        rendered,
        max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size,
        prefix_cache=True,
        progress=False,
        stats=stats,
    )
    t_fast = time.perf_counter() - t0
    print(
        f"ctxaware (batch {a.batch_size} + prefix reuse): {t_fast:.1f}s, "
        f"prefilled {stats['prefill_tokens']} of {stats['prompt_tokens']} prompt tokens"
    )
    print(f"speed-up: {t_naive / t_fast:.2f}x")
    same = sum(g.token_ids == r for g, r in zip(gens, ref))
    print(f"identical outputs: {same}/{len(ref)}")
    assert same == len(ref), "outputs differ"


if __name__ == "__main__":
    main()
