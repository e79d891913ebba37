"""Profile one steered forward against an unsteered one (where the steering overhead goes).

python benchmarks/profile_steer.py --model DIR --device cuda --dtype bfloat16 --length 2048
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from ctxaware.attention.steering import steer
from ctxaware.core.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--length", type=int, default=2048)
    args = ap.parse_args()
    model, _ = load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation="sdpa")
    dev = next(model.parameters()).device
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    heads = {layer: [layer % n_heads] for layer in range(n_layers)}
    ids = torch.randint(100, 1000, (1, args.length), device=dev)
    emph = torch.zeros(args.length, dtype=torch.bool)
    emph[args.length // 4 : args.length // 2] = True
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])

    def plain():
        model(ids, use_cache=False)

    def steered():
        with steer(model, heads, emph, 0.1):
            model(ids, use_cache=False)

    with torch.inference_mode():
        for name, fn in (("unsteered", plain), ("steered", steered)):
            for _ in range(3):
                fn()
            with profile(activities=acts) as prof:
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            ka = prof.key_averages()
            print(f"== {name}: {len(prof.events())} events")
            print(ka.table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=50))


if __name__ == "__main__":
    main()
