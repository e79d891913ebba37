"""Benchmark: ctxaware's eq. (2) scorer vs the paper's eager all-layer ``output_attentions=True`` approach.

Same conversations for both (built from the shared SFT data by chaining turns until ~512, 1K, 2K tokens),
same model (SmolLM2-135M-Instruct, float32, CPU), batch size 1, same layer (default 15 of 30).

* ctxaware: `score.score_layouts` -> `intercept.capture_attention`: sdpa up to layer l, softmax rows of the
  response tokens only at layer l, reduced at once to user mass, forward stopped after layer l.
* eager: ``model(ids, output_attentions=True)`` with eager attention: all 30 layers, the LM head, and every
  layer's (H, T, T) attention map; then take layer l and apply eq. (2).

Each (method, length) runs in a fresh subprocess. Time: best of ``--repeats`` calls after one warm-up
call. Peak memory: the process's peak resident set size (``ru_maxrss``) minus its resident set size just
before the first call (model already loaded), i.e. the extra memory the computation needed at its peak.
The script asserts that both methods give the same scores (to 1e-4).

    python benchmarks/score.py                      # lengths 512,1024,2048; prints a markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(os.environ.get("CTXAWARE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def build_conversations(tok, lengths: list[int]) -> list[list[dict]]:
    """Multi-turn conversations of about ``lengths`` tokens, chaining real turns of the shared SFT files."""
    from ctxaware.data.conversations import load_conversations
    from ctxaware.scoring.score import layout

    pairs = []
    for name in ("messages_sft_demo.jsonl", "sharegpt_dummy_conversation.json", "alpaca_en_demo.json"):
        for c in load_conversations(SHARED / "sft" / name)[0]:
            turns = [m for m in c.messages if m["role"] != "system"]
            pairs += [turns[i : i + 2] for i in range(0, len(turns), 2)]
    convs, at = [], 0
    for target in lengths:
        msgs: list[dict] = []
        while at < len(pairs):
            trial = msgs + pairs[at]
            at += 1
            if len(layout(trial, tok, None)) > target:
                break
            msgs = trial
        convs.append(msgs)
    return convs


def oracle_scores(att_layer: torch.Tensor, lay) -> list[float]:
    """eq. (2) from a full (H, T, T) attention map."""
    user = torch.tensor(lay.user, dtype=torch.float32)
    out = []
    for t in lay.turns:
        mask = user.clone()
        mask[t.positions[0] :] = 0  # U_m: user tokens before Y_m
        mass = att_layer[:, t.positions] @ mask  # (H, |Y_m|)
        out.append(float(mass.max(0).values.double().mean()))
    return out


def worker(method: str, conv_file: str, index: int, layer: int, repeats: int, spec: str) -> dict:
    from ctxaware.core.models import load_model
    from ctxaware.scoring.score import layout, score_layouts

    attn = "eager" if method == "eager" else "sdpa"
    model, tok = load_model(spec, device="cpu", dtype="float32", attn_implementation=attn)
    msgs = json.loads(Path(conv_file).read_text())[index]
    lay = layout(msgs, tok, None)
    ids = torch.tensor([lay.input_ids])

    def once() -> list[float]:
        if method == "eager":
            with torch.inference_mode():
                att = model(ids, output_attentions=True).attentions  # all layers, plus the LM head
            return oracle_scores(att[layer][0], lay)
        return [r["scores"][layer] for r in score_layouts(model, [lay], [layer], pad_id=tok.pad_token_id)[0]]

    rss0 = _rss_kb()
    scores = once()  # warm-up; also the peak-memory call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "tokens": len(lay), "turns": len(lay.turns), "seconds": min(times),
            "peak_extra_mb": max(0, peak - rss0) / 1024, "scores": scores}  # fmt: skip


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="model spec (built-in name or .gguf path)"
    )
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "CONV_FILE", "INDEX"), help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], int(a.worker[2]), a.layer, a.repeats, a.model)))
        return 0
    from ctxaware.core.models import load_tokenizer

    lengths = [int(x) for x in a.lengths.split(",")]
    convs = build_conversations(load_tokenizer(a.model), lengths)
    conv_file = Path(tempfile.mkdtemp()) / "convs.json"
    conv_file.write_text(json.dumps(convs))
    print(
        "| tokens | turns | ctxaware s | eager s | speed-up | ctxaware peak MB | eager peak MB | max score diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i in range(len(lengths)):
        res = {}
        for method in ("ctxaware", "eager"):
            cmd = [sys.executable, __file__, "--worker", method, str(conv_file), str(i), "--layer", str(a.layer),
                   "--repeats", str(a.repeats), "--threads", str(a.threads), "--model", a.model]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[method] = json.loads(out.strip().splitlines()[-1])
        c, e = res["ctxaware"], res["eager"]
        diff = max(abs(x - y) for x, y in zip(c["scores"], e["scores"]))
        assert diff < 1e-4, f"scores differ by {diff}"
        print(f"| {c['tokens']} | {c['turns']} | {c['seconds']:.2f} | {e['seconds']:.2f} | "
              f"{e['seconds'] / c['seconds']:.1f}x | {c['peak_extra_mb']:.0f} | {e['peak_extra_mb']:.0f} | {diff:.1e} |",
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
