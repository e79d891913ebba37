"""intercept.py against eager oracles; also home of the test-only eager references other tests import."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from ctxaware.attention import intercept
from ctxaware.core.errors import CtxawareError
from ctxaware.rendering.chat import ROLES, render
from tests.conftest import tiny_gemma2, tiny_gemma3

# --- test-only oracles ----------------------------------------------------------------------------------

_REF: dict = {}  # layer -> heads; "emph" -> (B, K) bool; "alpha" -> float


def _ref_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
    """Eq. (1) written the slow way: eager softmax, multiply non-emphasised probabilities by alpha, renormalize."""
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1).float()
    v = value.repeat_interleave(n_rep, dim=1).float()
    w = query.float() @ k.transpose(-1, -2) * (scaling or module.head_dim**-0.5)  # (B, H, Q, K)
    if softcap is not None:
        w = softcap * torch.tanh(w / softcap)
    if attention_mask is not None:
        m = attention_mask[:, :, :, : k.shape[2]]
        w = w.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else w + m.float()
    p = torch.softmax(w, dim=-1)
    heads = _REF.get(module.layer_idx)
    if heads:
        emph = _REF["emph"][:, None, None, : k.shape[2]]  # (B, 1, 1, K)
        scale = torch.where(emph, 1.0, _REF["alpha"])
        ps = p[:, heads] * scale
        p[:, heads] = ps / ps.sum(-1, keepdim=True)
    out = (p @ v).to(query.dtype)  # (B, H, Q, d)
    return out.transpose(1, 2).contiguous(), p


AttentionInterface.register("test_ref", _ref_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("test_ref", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


@contextlib.contextmanager
def attn_impl(model, impl: str):
    """Switch every config of ``model`` to attention implementation ``impl`` inside the block."""
    cfgs = [
        m.config
        for m in [model, *model.modules()]
        if hasattr(getattr(m, "config", None), "_attn_implementation")
    ]
    old = [c._attn_implementation for c in cfgs]
    for c in cfgs:
        c._attn_implementation = impl
    try:
        yield model
    finally:
        for c, o in zip(cfgs, old):
            c._attn_implementation = o


def reference_logits(model, ids, heads: dict, emph: torch.Tensor, alpha: float, mask=None) -> torch.Tensor:
    """Logits (B, T, V) of a full (uncached) forward with eq. (1) applied by `_ref_attention`."""
    _REF.clear()
    _REF.update({int(k): v for k, v in heads.items()}, emph=emph, alpha=alpha)
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        with attn_impl(model, "test_ref"), torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    finally:
        _REF.clear()


def eager_role_oracle(model, ids: torch.Tensor, roles: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """(L, H, R, 5) from eager ``output_attentions=True``: the oracle for capture."""
    with attn_impl(model, "eager"), torch.no_grad():
        att = model(input_ids=ids[None], output_attentions=True).attentions  # L x (1, H, T, T)
    onehot = torch.nn.functional.one_hot(roles, len(ROLES)).double()  # (T, 5)
    return torch.stack([a[0, :, rows].double() @ onehot for a in att])  # (L, H, R, 5)


# --- tests ----------------------------------------------------------------------------------------------


def _prompt(tok):
    msgs = [
        {
            "role": "user",
            "content": "Context: The key is hidden under the blue vase in the hall. Where is the key?",
        }
    ]
    return render(msgs, tok, "chat", response_prefix="The key is")


def test_capture_equals_eager_many_rows_chunked(smollm2):
    model, tok = smollm2
    r = _prompt(tok)
    ids, roles = torch.tensor(r.input_ids), r.role_ids()
    rows = [0, 5, len(r) // 2, len(r) - 2, len(r) - 1]
    want = eager_role_oracle(model, ids, roles, rows)
    groups = torch.nn.functional.one_hot(roles, len(ROLES)).float()[None]
    layers = list(range(model.config.num_hidden_layers))
    got = intercept.capture_attention(model, ids[None], None, layers, torch.tensor([rows]), groups, chunk=2)
    got = torch.stack([got[layer][0] for layer in layers]).double()  # (L, H, R, 5)
    assert (got - want).abs().max() < 1e-5


def test_capture_on_eager_model_and_subset_layers(smollm2):
    model, tok = smollm2
    r = _prompt(tok)
    ids, roles = torch.tensor(r.input_ids), r.role_ids()
    want = eager_role_oracle(model, ids, roles, [len(r) - 1])
    groups = torch.nn.functional.one_hot(roles, len(ROLES)).float()[None]
    with attn_impl(model, "eager"):
        got = intercept.capture_attention(
            model, ids[None], None, [3, 7], torch.tensor([[len(r) - 1]]), groups
        )
    assert set(got) == {3, 7}
    for layer in (3, 7):
        assert (got[layer][0].double() - want[layer]).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["onehot", "chunked"])
@pytest.mark.parametrize("build", [tiny_gemma3, tiny_gemma2], ids=["gemma3-sliding", "gemma2-softcap"])
def test_capture_equals_eager_gemma(build, method):
    model = build()
    T = 40  # longer than the sliding window (8), so the window matters
    ids = torch.randint(5, 500, (T,))
    roles = torch.randint(0, len(ROLES), (T,))
    rows = [3, 17, T - 1]
    want = eager_role_oracle(model, ids, roles, rows)
    groups = torch.nn.functional.one_hot(roles, len(ROLES)).float()[None]
    layers = list(range(model.config.num_hidden_layers))
    impls = ["eager"] if build is tiny_gemma2 else ["eager", "sdpa"]
    for impl in impls:
        with attn_impl(model, impl):
            got = intercept.capture_attention(
                model, ids[None], None, layers, torch.tensor([rows]), groups, method=method
            )
        err = max((got[layer][0].double() - want[layer]).abs().max().item() for layer in layers)
        assert err < 1e-5, (impl, err)


def test_zero_bias_is_exact_noop_and_early_stop(smollm2):
    model, tok = smollm2
    ids = torch.tensor([_prompt(tok).input_ids])
    with torch.no_grad():
        base = model(ids).logits

    def zero(layer, q, k):  # a per-query bias: the explicit-mask path
        return ([0, 3], torch.zeros(q.shape[0], 2, q.shape[2], k.shape[2])) if layer == 4 else None

    with intercept.intercepted(model, bias=zero) as st, torch.no_grad():
        got = model(ids).logits
    assert torch.equal(got, base) and st.biased == {4}

    def zero_per_key(layer, q, k):  # eq. (1)'s shape: the reweighted-V path, exact up to float rounding
        return ([0, 3], torch.zeros(q.shape[0], 2, 1, k.shape[2])) if layer == 4 else None

    with intercept.intercepted(model, bias=zero_per_key) as st, torch.no_grad():
        got = model(ids).logits
    assert (got - base).abs().max() < 1e-4 and st.biased == {4}
    cap = intercept.Capture([2], torch.tensor([[ids.shape[1] - 1]]), torch.ones(1, ids.shape[1], 1))
    with intercept.intercepted(model, capture=cap) as st, pytest.raises(intercept.StopForward):
        model(ids)
    assert max(st.fired) == 2  # layers after the deepest captured one never ran


def test_errors(smollm2):
    model, tok = smollm2
    ids = torch.tensor([_prompt(tok).input_ids])
    g = torch.ones(1, ids.shape[1], 1)
    with pytest.raises(CtxawareError, match="does not exist"):
        intercept.capture_attention(model, ids, None, [99], torch.tensor([[0]]), g)
    with intercept.intercepted(model), pytest.raises(CtxawareError, match="already intercepted"):
        with intercept.intercepted(model):
            pass
    with attn_impl(model, "flash_attention_2"), pytest.raises(CtxawareError, match="cannot be intercepted"):
        with intercept.intercepted(model):
            pass
    assert model.config._attn_implementation == "sdpa"


# --- the one-hot-V path (issue 13): the layer's own kernel with V = one-hot roles ------------------------


def _two_prompts(tok):
    a = _prompt(tok)
    b = render([{"role": "user", "content": "Short one: who wrote Hamlet?"}], tok, "chat")
    return a, b


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_onehot_every_row_left_padded_batch_equals_eager(smollm2, impl):
    """Every row of a left-padded batch of two prompts, both paths, against per-prompt eager maps."""
    from ctxaware.attention.allocation import pad_batch

    model, tok = smollm2
    prompts = _two_prompts(tok)
    ids, mask, _, groups = pad_batch(prompts, [[0]] * 2, tok.pad_token_id)
    layers = [0, 9, 17]
    with attn_impl(model, impl):
        got = {m: intercept.capture_attention(model, ids, mask, layers, None, groups, method=m)
               for m in ("onehot", "chunked")}  # fmt: skip
    for b, p in enumerate(prompts):
        want = eager_role_oracle(model, torch.tensor(p.input_ids), p.role_ids(), list(range(len(p))))
        off = ids.shape[1] - len(p)
        for m, res in got.items():
            assert res[9].shape == (2, model.config.num_attention_heads, ids.shape[1], len(ROLES))
            for layer in layers:
                err = (res[layer][b, :, off:].double() - want[layer]).abs().max().item()
                assert err < 1e-5, (m, impl, layer, err)
            assert torch.isfinite(res[17]).all()  # padding rows never leak NaN


def test_onehot_rows_and_many_groups_split_by_head_size(smollm2):
    """G > head_dim: the groups go through the kernel head_dim columns at a time; rows -1 give zeros."""
    model, tok = smollm2
    r = _prompt(tok)
    T = len(r)
    ids = torch.tensor(r.input_ids)
    d = model.config.hidden_size // model.config.num_attention_heads
    groups = torch.nn.functional.one_hot(torch.arange(T) % (d + 3), d + 3).float()[None]  # G = d + 3
    rows = torch.tensor([[T - 1, 4, -1]])
    with attn_impl(model, "eager"), torch.no_grad():
        att = model(input_ids=ids[None], output_attentions=True).attentions
    got = intercept.capture_attention(model, ids[None], None, [5], rows, groups)[5]  # (1, H, 3, G)
    want = att[5][0, :, [T - 1, 4]].double() @ groups[0].double()  # (H, 2, G)
    assert got.shape[-1] == d + 3
    assert (got[0, :, :2].double() - want).abs().max() < 1e-5
    assert torch.equal(got[0, :, 2], torch.zeros_like(got[0, :, 2]))


def test_onehot_capture_under_steering_bias_equals_reference(smollm2):
    """Capture inside a steered pass: both paths give eq. (1)'s reweighted softmax (the test_ref oracle)."""
    from ctxaware.attention.steering import _Bias

    model, tok = smollm2
    r = _prompt(tok)
    ids, roles = torch.tensor([r.input_ids]), r.role_ids()
    emph = (roles == ROLES.index("user"))[None]
    heads, alpha, layer = {3: [0, 5]}, 0.01, 3
    _REF.clear()
    _REF.update({3: [0, 5]}, emph=emph, alpha=alpha)
    try:
        with attn_impl(model, "test_ref"), torch.no_grad():
            att = model(input_ids=ids, output_attentions=True).attentions
    finally:
        _REF.clear()
    onehot = torch.nn.functional.one_hot(roles, len(ROLES)).double()
    want = att[layer][0].double() @ onehot  # (H, T, G)
    groups = onehot.float()[None]
    for m in ("onehot", "chunked"):
        got = intercept.capture_attention(
            model, ids, None, [layer], None, groups, bias=_Bias(heads, emph, alpha), method=m
        )[layer][0]
        assert (got.double() - want).abs().max() < 1e-5, m
    plain = intercept.capture_attention(model, ids, None, [layer], None, groups)[layer][0]
    assert (plain[0].double() - want[0]).abs().max() > 1e-2  # the bias moved head 0: the test can fail


def test_capture_method_is_checked():
    with pytest.raises(CtxawareError, match="capture method"):
        intercept.Capture([0], None, torch.ones(1, 3, 1), method="fast")


@pytest.mark.slow
def test_onehot_flex_attention_on_cpu_equals_eager():
    """FlexAttention (compiled on CPU, about 70 s): the one-hot V path with the sliding window in a BlockMask."""
    model = tiny_gemma3()
    T = 40
    ids = torch.randint(5, 500, (T,))
    roles = torch.randint(0, len(ROLES), (T,))
    rows = [3, 17, T - 1]
    want = eager_role_oracle(model, ids, roles, rows)
    groups = torch.nn.functional.one_hot(roles, len(ROLES)).float()[None]
    with attn_impl(model, "flex_attention"):
        got = intercept.capture_attention(model, ids[None], None, [0, 1, 2, 3], torch.tensor([rows]), groups)
    assert max((got[lay][0].double() - want[lay]).abs().max().item() for lay in range(4)) < 1e-5


def test_auto_method_picks_the_cheaper_exact_path(monkeypatch):
    """``auto``: the kernel path for many rows (scoring, every row), chunked rows for a few (eq. 3's last row)."""
    model = tiny_gemma3(layers=2)
    T = 40
    ids = torch.randint(5, 500, (1, T))
    groups = torch.ones(1, T, 1)
    calls: list[str] = []
    for name in ("_capture_rows", "_capture_onehot"):
        real = getattr(intercept, name)
        monkeypatch.setattr(
            intercept, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))
        )
    intercept.capture_attention(model, ids, None, [1], torch.tensor([[T - 1]]), groups)
    intercept.capture_attention(model, ids, None, [1], None, groups)
    intercept.capture_attention(model, ids, None, [1], torch.arange(T // 2)[None], groups)
    assert calls == ["_capture_rows", "_capture_onehot", "_capture_onehot"]
    one = intercept.capture_attention(model, ids, None, [1], None, groups)[1]
    assert torch.allclose(one, torch.ones_like(one), atol=1e-5)  # every row's mass on all keys is 1
