"""Write a random-weight model directory with a real architecture's shape, for timing where weights can't go.

Speed does not depend on the weight values, so a GPU box that cannot download a checkpoint can still time
ctxaware's attention paths at a real model's size::

    python benchmarks/make_random_model.py --shape smollm2-135m --tokenizer TOKDIR --out /tmp/smol-random
    python benchmarks/make_random_model.py --shape llama-1b --tokenizer TOKDIR --out /tmp/llama1b-random
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHAPES = {
    # SmolLM2-135M-Instruct's own config (30 layers, 9 heads, 3 KV heads, head_dim 64)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    # a Llama-3.2-1B-sized decoder (16 layers, 32 heads, 8 KV heads, head_dim 64)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--tokenizer", required=True, help="a saved tokenizer directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=16384, **SHAPES[args.shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    print(
        f"wrote {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) to {args.out}"
    )


if __name__ == "__main__":
    main()
