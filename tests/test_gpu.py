"""CUDA paths: bf16 loading, capture and steering on SDPA and FlexAttention against eager oracles.

Run on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py`` (skipped without CUDA).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.conftest import tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _exact_matmul():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _model(attn: str):
    m = tiny_llama(layers=4, heads=8, kv_heads=2, hidden=256).cuda()  # head_dim 32: flex needs >= 16
    m.set_attn_implementation(attn)
    return m


def _eager_probs(model, ids):
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    return out.attentions


def _tokenizer():
    """SmolLM2's tokenizer: from $CTXAWARE_TEST_TOKENIZER (a carried copy on a GPU box) or the built-in."""
    path = os.environ.get("CTXAWARE_TEST_TOKENIZER")
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from ctxaware.core.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def test_load_model_cuda_bf16(tmp_path):
    from ctxaware.core.models import load_model
    from ctxaware.rendering.chat import render, user_prompt
    from ctxaware.rendering.generate import generate

    tiny_llama().save_pretrained(tmp_path / "tiny")
    _tokenizer().save_pretrained(tmp_path / "tiny")
    model, tok = load_model(str(tmp_path / "tiny"), device="cuda", dtype="bfloat16")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    out = generate(
        model, tok, [render(user_prompt("Hello"), tok, "chat")] * 3, max_new_tokens=5, progress=False
    )
    assert len(out) == 3 and all(len(o.token_ids) <= 5 for o in out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_capture_matches_eager_on_cuda(attn):
    from ctxaware.attention.intercept import capture_attention

    model = _model(attn)
    T = 300
    ids = torch.randint(0, 1000, (2, T), device="cuda")
    groups = torch.nn.functional.one_hot(torch.randint(0, 3, (2, T)), 3).float().cuda()  # (B, T, G)
    rows = torch.tensor([[T - 1, 5, 100], [T - 2, 0, 250]], device="cuda")
    got = capture_attention(model, ids, None, [1, 3], rows, groups)
    att = _eager_probs(model, ids)
    for layer in (1, 3):
        ref = torch.stack([att[layer][b][:, rows[b]] @ groups[b] for b in range(2)])  # (B, H, R, G)
        assert (got[layer] - ref).abs().max().item() < 1e-5


def _reference_steer(model, ids, layer, heads, emph, alpha):
    """Eager attention with eq. (1) applied to the probabilities of ``heads`` at ``layer``."""
    import transformers.models.llama.modeling_llama as ml
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    def ref(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        k, v = (
            ml.repeat_kv(key, module.num_key_value_groups),
            ml.repeat_kv(value, module.num_key_value_groups),
        )
        w = (query @ k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask[:, :, :, : k.shape[-2]]
        p = torch.softmax(w.float(), -1)  # (B, H, Q, K)
        if module.layer_idx == layer:
            scale = torch.where(emph, 1.0, alpha)[:, None, None, :]  # (B, 1, 1, K)
            p[:, heads] = p[:, heads] * scale
            p[:, heads] = p[:, heads] / p[:, heads].sum(-1, keepdim=True)
        return (p.to(v.dtype) @ v).transpose(1, 2).contiguous(), p

    AttentionInterface.register("ctxaware_test_ref", ref)
    ALL_MASK_ATTENTION_FUNCTIONS.register("ctxaware_test_ref", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model.set_attn_implementation("ctxaware_test_ref")
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_steering_matches_eq1_on_cuda(attn):
    from ctxaware.attention.steering import steer

    model = _model(attn)
    T = 256
    ids = torch.randint(0, 1000, (1, T), device="cuda")
    emph = torch.zeros(1, T, dtype=torch.bool, device="cuda")
    emph[:, 40:200] = True
    with torch.no_grad():
        base = model(ids).logits
        with steer(model, {2: [1, 5]}, emph, 0.1):
            steered = model(ids).logits
        with steer(model, {2: [1, 5]}, emph, 1.0):
            same = model(ids).logits
    assert torch.equal(same, base)
    ref = _reference_steer(model, ids, 2, [1, 5], emph, 0.1)
    assert (steered - ref).abs().max().item() < 1e-4
    assert (steered - base).abs().max().item() > 1e-3


def test_bf16_steering_runs_and_moves_logits():
    from ctxaware.attention.steering import steer

    model = _model("sdpa").to(torch.bfloat16)
    ids = torch.randint(0, 1000, (2, 512), device="cuda")
    emph = torch.zeros(2, 512, dtype=torch.bool, device="cuda")
    emph[:, 100:400] = True
    with torch.no_grad():
        base = model(ids).logits
        with steer(model, "all", emph, 0.3):
            steered = model(ids).logits
    assert torch.isfinite(steered).all() and not torch.equal(steered, base)
    assert math.isfinite((steered.float() - base.float()).abs().max().item())


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_onehot_capture_every_row_matches_eager_on_cuda(attn):
    """The one-hot-V path on CUDA kernels (issue 13): every row of a left-padded batch; in bf16 it equals the
    chunked float32 softmax of the same bf16 q/k (both upcast), so bf16 models still get float32 masses."""
    from ctxaware.attention.intercept import capture_attention

    model = _model(attn)
    T = 300
    ids = torch.randint(0, 1000, (2, T), device="cuda")
    mask = torch.ones(2, T, dtype=torch.long, device="cuda")
    mask[1, :40] = 0  # left padding
    groups = torch.nn.functional.one_hot(torch.randint(0, 6, (2, T)), 6).float().cuda()
    got = capture_attention(model, ids, mask, [1, 3], None, groups, method="onehot")
    model.set_attn_implementation("eager")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        att = model(ids, attention_mask=mask, position_ids=pos, output_attentions=True).attentions
    for layer in (1, 3):
        ref = att[layer] @ groups[:, None]  # (B, H, T, G)
        assert (got[layer][0] - ref[0]).abs().max().item() < 1e-5
        assert (got[layer][1, :, 40:] - ref[1, :, 40:]).abs().max().item() < 1e-5
    model.to(torch.bfloat16).set_attn_implementation(attn)
    a = capture_attention(model, ids, mask, [3], None, groups, method="onehot")[3]
    model.set_attn_implementation(
        "sdpa" if attn == "flex_attention" else attn
    )  # chunked can't read a BlockMask
    b = capture_attention(model, ids, mask, [3], None, groups, method="chunked")[3]
    tol = 5e-4 if attn == "flex_attention" else 1e-4  # flex's float32 kernel: 1.9e-4 on an H100 (TF32 dots)
    assert a.dtype == torch.float32 and (a[:, :, 40:] - b[:, :, 40:]).abs().max().item() < tol
