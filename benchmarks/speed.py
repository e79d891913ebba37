"""Speed of attention measurements (issue 13): baseline and ctxaware in the same run, results checked, ratio printed.

(a) eq. (2) scoring of N conversations of ~2K tokens (SmolLM2-135M-Instruct, float32, CPU):
    ``score.score_layouts`` (the one-hot-V path, forward stopped after the scoring layer, batched by length
    as ``ctxaware score`` does) against the paper's way, eager all-layer ``output_attentions=True`` at batch 1
    then eq. (2) at the layer. In-process (model loaded once, timed calls) and as whole processes (``python -m
    ctxaware.cli score`` against a process that imports, loads an eager model and runs the reference).
(b) capture of every row's role shares at one layer (``capture_attention(rows=None)``) against a plain SDPA
    forward of the same model stopped after that layer (a forward hook); the chunked-softmax fallback too.
(c) the data-selection tools' way (IFD / Superfiltering: two forward passes per example at batch 1; here one
    pass over the conversation for every response's conditioned loss and one pass per response alone)
    against ctxaware's eq. (2), tokens of conversation per second side by side.

Every call is timed once after a warm-up call on the first conversation (these runs are long; other users
share the CPU, so the load average before and after each part is printed with the numbers).

    python benchmarks/speed.py --parts a,b,c --n 8 --tokens 2000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("CTXAWARE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MODEL = "smollm2-135m-instruct"


def build_conversations(tok, n: int, target: int) -> list[list[dict]]:
    """``n`` multi-turn conversations of at most ``target`` tokens, chaining real turns of the shared SFT files."""
    from ctxaware.data.conversations import load_conversations
    from ctxaware.scoring.score import layout

    pairs = []
    for name in ("messages_sft_demo.jsonl", "sharegpt_dummy_conversation.json", "alpaca_en_demo.json"):
        for c in load_conversations(SHARED / "sft" / name)[0]:
            turns = [m for m in c.messages if m["role"] != "system"]
            pairs += [turns[i : i + 2] for i in range(0, len(turns) - 1, 2) if turns[i]["role"] == "user"]
    convs, at = [], 0
    while len(convs) < n and at < len(pairs):
        msgs: list[dict] = []
        while at < len(pairs):
            trial = msgs + pairs[at]
            at += 1
            if len(layout(trial, tok, None)) > target:
                break
            msgs = trial
        if msgs:
            convs.append(msgs)
    return convs


def eq2_from_map(att_layer: torch.Tensor, lay) -> list[float | None]:
    """eq. (2) (max over heads) from a full (H, T, T) attention map, summing over U_m explicitly."""
    user = torch.tensor(lay.user, dtype=torch.float64)
    out = []
    for t in lay.turns:
        if t.skipped is not None:
            out.append(None)
            continue
        u = user.clone()
        u[t.positions[0] :] = 0  # U_m: user tokens before Y_m
        mass = att_layer[:, t.positions].double() @ u  # (H, |Y_m|)
        out.append(float(mass.max(0).values.mean()))
    return out


def eager_scores(model, lays, layer: int) -> list[list[float | None]]:
    """The paper's scorer: batch 1, every layer's attention map with ``output_attentions``, then layer ``layer``."""
    out = []
    for lay in lays:
        with torch.inference_mode():
            att = model(torch.tensor([lay.input_ids]), output_attentions=True).attentions
        out.append(eq2_from_map(att[layer][0], lay))
        del att
    return out


def ctxaware_scores(model, lays, layer: int, pad: int, batch_tokens: int = 8192, method: str = "onehot"):
    """``ctxaware score``'s batching (longest first, ``batch_tokens`` padded tokens) and `score_layouts`."""
    from ctxaware.scoring.score import score_layouts
    from ctxaware.scoring.sharding import plan_batches

    out: list = [None] * len(lays)
    for batch in plan_batches([len(x) for x in lays], batch_tokens, 32):
        res = score_layouts(model, [lays[i] for i in batch], [layer], pad_id=pad, method=method)
        for i, r in zip(batch, res):
            out[i] = [x["scores"][layer] if x else None for x in r]
    return out


def max_diff(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb) if x is not None and y is not None)


def timed(fn):
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------- (a)


def part_a(a, convs, conv_file: Path) -> dict:
    from ctxaware.core.models import load_model
    from ctxaware.scoring.score import default_layer, layout

    model, tok = load_model(MODEL, device="cpu", dtype="float32")
    layer = default_layer(model) if a.layer is None else a.layer
    lays = [layout(c, tok, 2047) for c in convs]
    n_tok = sum(len(x) for x in lays)
    eager = load_model(MODEL, device="cpu", dtype="float32", attn_implementation="eager")[0]
    la0 = os.getloadavg()[0]
    ctxaware_scores(model, lays[:1], layer, tok.pad_token_id)  # warm-up
    eager_scores(eager, lays[:1], layer)
    got, t_c = timed(lambda: ctxaware_scores(model, lays, layer, tok.pad_token_id))
    ref, t_e = timed(lambda: eager_scores(eager, lays, layer))
    d_in = max_diff(got, ref)
    assert d_in < 1e-4, f"in-process scores differ by {d_in}"
    model = eager = None  # free both before the whole-process runs
    # whole processes: import + load + score, the CLI against a process running the paper's reference
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    tmp = Path(tempfile.mkdtemp())
    cmd_c = [sys.executable, "-m", "ctxaware.cli", "score", str(conv_file), "--device", "cpu", "--no-progress",
             "--layer", str(layer), "--output", str(tmp / "scores.jsonl"), "--batch-tokens", "8192"]  # fmt: skip
    cmd_e = [sys.executable, __file__, "--eager-worker", str(conv_file), "--layer", str(layer),
             "--threads", str(a.threads), "--out", str(tmp / "eager.json")]  # fmt: skip
    p_c, w_c = timed(lambda: subprocess.run(cmd_c, env=env, capture_output=True, text=True, check=True))
    _, w_e = timed(lambda: subprocess.run(cmd_e, env=env, capture_output=True, text=True, check=True))
    rows = [json.loads(x) for x in (tmp / "scores.jsonl").read_text().splitlines()]
    by_conv: dict[int, list] = {}
    for r in rows:
        by_conv.setdefault(r["source_row"], []).append(r["score"])
    cli = [by_conv[i] for i in sorted(by_conv)]
    d_proc = max_diff(cli, json.loads((tmp / "eager.json").read_text()))
    assert d_proc < 1e-4, f"whole-process scores differ by {d_proc}"
    tp_line = next((x for x in p_c.stdout.splitlines() if "tokens/s" in x), "")
    return {"layer": layer, "n_conversations": len(lays), "tokens": n_tok, "mean_tokens": n_tok / len(lays),
            "turns": sum(len(x.turns) for x in lays), "ctxaware_s": t_c, "eager_s": t_e, "ratio_in_process": t_e / t_c,
            "ctxaware_process_s": w_c, "eager_process_s": w_e, "ratio_process": w_e / w_c, "max_diff_in_process": d_in,
            "max_diff_process": d_proc, "cli_throughput_line": tp_line, "load": [la0, os.getloadavg()[0]]}  # fmt: skip


def eager_worker(a) -> int:
    """A whole process of the paper's way: import, load an eager model, score every conversation."""
    torch.set_num_threads(a.threads)
    from ctxaware.core.models import load_model
    from ctxaware.data.conversations import load_conversations
    from ctxaware.scoring.score import layout

    model, tok = load_model(MODEL, device="cpu", dtype="float32", attn_implementation="eager")
    convs = load_conversations(a.eager_worker)[0]
    lays = [layout(c.messages, tok, 2047) for c in convs]
    Path(a.out).write_text(json.dumps(eager_scores(model, lays, a.layer)))
    return 0


# ------------------------------------------------------------------------------------------------- (b)


class _Stop(Exception):
    pass


def part_b(a, convs) -> dict:
    from ctxaware.attention.intercept import capture_attention, decoder
    from ctxaware.core.models import load_model
    from ctxaware.rendering.chat import ROLES, render
    from ctxaware.scoring.score import default_layer

    model, tok = load_model(MODEL, device="cpu", dtype="float32")
    layer = default_layer(model) if a.layer is None else a.layer
    rendered = [render(c, tok, "chat", add_generation_prompt=False) for c in convs]
    inputs = [(torch.tensor([r.input_ids[:2047]]), r.role_ids()[:2047]) for r in rendered]

    def stop(*_):
        raise _Stop

    def plain(ids):
        h = decoder(model).layers[layer].register_forward_hook(stop)
        try:
            with torch.inference_mode():
                decoder(model)(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()

    def capture(ids, roles, method):
        groups = torch.nn.functional.one_hot(roles, len(ROLES)).float()[None]
        return capture_attention(model, ids, None, [layer], None, groups, method=method)[layer]

    la0 = os.getloadavg()[0]
    ids0, roles0 = inputs[0]
    plain(ids0), capture(ids0, roles0, "onehot")  # warm-up
    _, t_plain = timed(lambda: [plain(ids) for ids, _ in inputs])
    got, t_one = timed(lambda: [capture(ids, r, "onehot") for ids, r in inputs])
    ref, t_chunk = timed(lambda: [capture(ids, r, "chunked") for ids, r in inputs])
    diff = max((g - r).abs().max().item() for g, r in zip(got, ref))
    assert diff < 1e-5, f"one-hot and chunked capture differ by {diff}"
    sums = max((g.sum(-1) - 1).abs().max().item() for g in got)  # every row's shares sum to 1
    assert sums < 1e-4, sums
    return {"layer": layer, "tokens": sum(x.shape[1] for x, _ in inputs), "plain_s": t_plain, "onehot_s": t_one,
            "chunked_s": t_chunk, "ratio_onehot": t_one / t_plain, "ratio_chunked": t_chunk / t_plain,
            "max_diff": diff, "load": [la0, os.getloadavg()[0]]}  # fmt: skip


# ------------------------------------------------------------------------------------------------- (c)


def ifd_scores(model, lays) -> list[list[float]]:
    """IFD per turn (Cherry LLM; Superfiltering uses the same ratio with GPT-2): ppl(Y | prefix) / ppl(Y).

    Two forward passes per example at batch 1: the conversation (every response's conditioned loss from one
    causal pass) and each response alone (its unconditioned loss).
    """
    out = []
    for lay in lays:
        ids = torch.tensor([lay.input_ids])
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)  # (T, V)
        row = []
        for t in lay.turns:
            if t.skipped is not None or len(t.positions) < 2:  # IFD needs 2+ response tokens alone
                continue
            pos = torch.tensor(t.positions)
            cond = -logp[pos - 1, ids[0, pos]].mean()  # loss of Y_m given its prefix
            alone = torch.tensor([lay.input_ids[p] for p in t.positions])[None]
            with torch.inference_mode():
                lp = torch.log_softmax(model(alone).logits[0, :-1].float(), -1)
            uncond = -lp[torch.arange(len(t.positions) - 1), alone[0, 1:]].mean()  # loss of Y_m alone
            row.append(math.exp(cond.item()) / math.exp(uncond.item()))
        out.append(row)
    return out


def part_c(a, convs) -> dict:
    from ctxaware.core.models import load_model
    from ctxaware.scoring.score import default_layer, layout

    model, tok = load_model(MODEL, device="cpu", dtype="float32")
    layer = default_layer(model) if a.layer is None else a.layer
    lays = [layout(c, tok, 2047) for c in convs]
    n_tok = sum(len(x) for x in lays)
    la0 = os.getloadavg()[0]
    ifd_scores(model, lays[:1]), ctxaware_scores(model, lays[:1], layer, tok.pad_token_id)  # warm-up
    ifd, t_ifd = timed(lambda: ifd_scores(model, lays))
    _, t_c = timed(lambda: ctxaware_scores(model, lays, layer, tok.pad_token_id))
    assert all(math.isfinite(x) for r in ifd for x in r)
    return {"tokens": n_tok, "ifd_s": t_ifd, "ctxaware_s": t_c, "ifd_tokens_per_s": n_tok / t_ifd,
            "ctxaware_tokens_per_s": n_tok / t_c, "ratio": t_ifd / t_c, "load": [la0, os.getloadavg()[0]]}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="a,b,c")
    p.add_argument("--n", type=int, default=8, help="conversations")
    p.add_argument("--tokens", type=int, default=2000, help="tokens per conversation at most (<= 2047)")
    p.add_argument(
        "--layer", type=int, default=None, help="default: score.default_layer (20 of SmolLM2's 30)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--eager-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.eager_worker:
        return eager_worker(a)
    from ctxaware.core.models import load_tokenizer

    convs = build_conversations(load_tokenizer(MODEL), a.n, a.tokens)
    conv_file = Path(tempfile.mkdtemp()) / "convs.jsonl"
    conv_file.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    res: dict = {"threads": a.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    parts = a.parts.split(",")
    if "a" in parts:
        r = res["a"] = part_a(a, convs, conv_file)
        print(f"(a) {r['n_conversations']} conversations, {r['mean_tokens']:.0f} tokens each, {r['turns']} turns, "
              f"layer {r['layer']}: in-process ctxaware {r['ctxaware_s']:.1f} s vs eager {r['eager_s']:.1f} s = "
              f"{r['ratio_in_process']:.2f}x; whole process {r['ctxaware_process_s']:.1f} s vs "
              f"{r['eager_process_s']:.1f} s = {r['ratio_process']:.2f}x; max |diff| {r['max_diff_in_process']:.1e}; "
              f"load {r['load'][0]:.1f}->{r['load'][1]:.1f}", flush=True)  # fmt: skip
    if "b" in parts:
        r = res["b"] = part_b(a, convs)
        print(f"(b) every row's role shares at layer {r['layer']} ({r['tokens']} tokens): plain SDPA forward to the "
              f"layer {r['plain_s']:.1f} s, one-hot capture {r['onehot_s']:.1f} s = {r['ratio_onehot']:.2f}x, "
              f"chunked capture {r['chunked_s']:.1f} s = {r['ratio_chunked']:.2f}x; max |diff| {r['max_diff']:.1e}; "
              f"load {r['load'][0]:.1f}->{r['load'][1]:.1f}", flush=True)  # fmt: skip
    if "c" in parts:
        r = res["c"] = part_c(a, convs)
        print(f"(c) IFD-style two passes at batch 1: {r['ifd_tokens_per_s']:.0f} tokens/s; ctxaware eq. (2): "
              f"{r['ctxaware_tokens_per_s']:.0f} tokens/s ({r['ratio']:.2f}x); "
              f"load {r['load'][0]:.1f}->{r['load'][1]:.1f}", flush=True)  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
