"""Benchmark: role-allocation capture vs. eager output_attentions; steered vs. unsteered SDPA vs. a PASTA-style hook.

Same model, same prompts (haystack tokens, one-hot roles), same run; ratios printed. Time is the median of
``--reps`` runs after one warm-up. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the
weights; on CPU the peak process RSS above the pre-call RSS, sampled every 2 ms by a thread (psutil).

    python benchmarks/attention.py --device cpu --lengths 1024,2048,4096
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import statistics
import threading
import time

import psutil
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from ctxaware.attention.intercept import capture_attention
from ctxaware.attention.steering import steer
from ctxaware.core.models import load_model
from ctxaware.data.needle import load_haystack
from ctxaware.rendering.chat import ROLES

_PASTA: dict = {}


def _pasta_attention(module, q, k, v, mask, **kw):
    """PASTA-style: eager attention with log(alpha) added to the 4-D mask on the steered heads."""
    heads = _PASTA["heads"].get(module.layer_idx)
    if heads:
        m = mask[:, :, :, : k.shape[2]].float().expand(q.shape[0], q.shape[1], -1, -1).clone()  # (B, H, Q, K)
        m[:, heads] += _PASTA["bias"]
        mask = m
    return eager_attention_forward(module, q, k, v, mask, **kw)


AttentionInterface.register("pasta_eager", _pasta_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("pasta_eager", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def set_impl(model, impl: str) -> None:
    for m in [model, *model.modules()]:
        if hasattr(getattr(m, "config", None), "_attn_implementation"):
            m.config._attn_implementation = impl


def measure(fn, device: str, reps: int) -> tuple[float, float]:
    """(median seconds, peak MiB above the start) of ``fn()``."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    times, peak = [], 0.0
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            proc, base, top, stop = (
                psutil.Process(),
                psutil.Process().memory_info().rss,
                [0],
                threading.Event(),
            )

            def sample():
                while not stop.is_set():
                    top[0] = max(top[0], proc.memory_info().rss)
                    time.sleep(0.002)

            th = threading.Thread(target=sample)
            th.start()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        if device.startswith("cuda"):
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            stop.set()
            th.join()
            peak = max(peak, (max(top[0], proc.memory_info().rss) - base) / 2**20)
    return statistics.median(times), peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--haystack", default="../shared/data/haystack/paul_graham_essays")
    ap.add_argument("--steer-only", action="store_true", help="time only unsteered vs steered SDPA")
    args = ap.parse_args()
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation="sdpa")
    dev = next(model.parameters()).device
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    lengths = [int(x) for x in args.lengths.split(",")]
    hay = tok(load_haystack(args.haystack)[0][: 8 * max(lengths)], add_special_tokens=False)["input_ids"]
    heads = {layer: [layer % n_heads] for layer in range(n_layers)}  # one head per layer, as the paper steers
    print(f"{args.model} on {args.device} ({args.dtype}), {n_layers} layers x {n_heads} heads, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.reps}; memory: "
          f"{'cuda max_memory_allocated' if args.device.startswith('cuda') else 'peak RSS delta (psutil, 2 ms sampling)'}")  # fmt: skip
    print("| T | capture s | eager out_attn s | speed-up | capture MiB | eager MiB | unsteered SDPA s | steered SDPA s"
          " | steer/unsteered | PASTA eager s | PASTA/unsteered |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for T in lengths:
        ids = torch.tensor([hay[:T]], device=dev)
        roles = torch.randint(0, len(ROLES), (1, T))
        groups = torch.nn.functional.one_hot(roles, len(ROLES)).float().to(dev)  # (1, T, 5)
        emph = roles[0] == ROLES.index("user")
        rows = torch.tensor([[T - 1]], device=dev)
        layers = list(range(n_layers))
        with torch.inference_mode():
            skip = (float("nan"), float("nan"))
            cap = skip if args.steer_only else measure(
                lambda: capture_attention(model, ids, None, layers, rows, groups), args.device, args.reps
            )  # fmt: skip

            def eager_all():
                set_impl(model, "eager")
                try:
                    out = model.model(input_ids=ids, output_attentions=True, use_cache=False).attentions
                    return [a[:, :, -1:].float() @ groups[:, None] for a in out]  # the same reduction
                finally:
                    set_impl(model, "sdpa")

            eag = skip if args.steer_only else measure(eager_all, args.device, args.reps)
            plain = measure(lambda: model(ids, use_cache=False), args.device, args.reps)

            def steered():
                with steer(model, heads, emph, 0.1):
                    model(ids, use_cache=False)

            st = measure(steered, args.device, args.reps)

            def pasta():
                _PASTA.update(heads=heads, bias=torch.where(emph.to(dev), 0.0, torch.log(torch.tensor(0.1))))
                set_impl(model, "pasta_eager")
                try:
                    model(ids, use_cache=False)
                finally:
                    set_impl(model, "sdpa")

            pa = skip if args.steer_only else measure(pasta, args.device, args.reps)
        print(f"| {T} | {cap[0]:.3f} | {eag[0]:.3f} | {eag[0] / cap[0]:.1f}x | {cap[1]:.0f} | {eag[1]:.0f} | "
              f"{plain[0]:.3f} | {st[0]:.3f} | {st[0] / plain[0]:.2f}x | {pa[0]:.3f} | {pa[0] / plain[0]:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
