"""Steering (eq. 1) against an independent eager reference, in prefill and cached decoding."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache

from ctxaware.attention.steering import batch_context, emphasis_mask, steer, sweep_alpha, table
from ctxaware.core.errors import CtxawareError
from ctxaware.rendering.chat import render
from ctxaware.rendering.generate import Batch, cache_kwarg, generate, left_pad
from tests.conftest import tiny_gemma3
from tests.test_intercept import attn_impl, reference_logits

HEADS = {2: [0, 4], 11: [3], 20: [1, 2, 8]}
TOL = 1e-4


def _prompts(tok):
    a = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Document: Mia keeps her bike in the red shed. Where is the bike?"},
    ]
    b = [{"role": "user", "content": "Context: the meeting moved to Friday at noon. When is the meeting?"}]
    return [render(a, tok, "chat", response_prefix="The bike is"), render(b, tok, "chat")]


def _decode(model, ids, steps: int, ctx_fn, mask=None):
    """Greedy cached decoding; returns generated ids (B, steps) and per-step logits (B, steps, V)."""
    cache, logits, out = DynamicCache(), [], []
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    x = ids
    with ctx_fn(), torch.no_grad():
        for _ in range(steps):
            o = model(
                input_ids=x,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **cache_kwarg(model, cache),
            )
            logits.append(o.logits[:, -1].float())
            x = o.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(x)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                pos = pos[:, -1:] + 1
    return torch.cat(out, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_every_head_and_the_explicit_mask_path_match_reference(smollm2, impl):
    """Steering every head of a layer (the base call is skipped) and a per-query bias (B, h, Q, K), which
    takes the explicit float-mask path instead of the reweighted-V one, against the eq. (1) reference."""
    from ctxaware.attention import intercept
    from ctxaware.attention.steering import _Bias

    model, tok = smollm2
    r = _prompts(tok)[0]
    ids, emph = torch.tensor([r.input_ids]), r.mask("user")
    heads = {5: list(range(model.config.num_attention_heads)), 20: [7, 2]}  # unsorted on purpose
    ref = reference_logits(model, ids, heads, emph[None], 0.1)

    class PerQuery(_Bias):
        def __call__(self, layer, query, key):
            got = super().__call__(layer, query, key)
            return None if got is None else (got[0], got[1].expand(-1, -1, query.shape[2], -1))

    with attn_impl(model, impl), torch.no_grad():
        with steer(model, heads, emph, 0.1):
            fast = model(ids).logits.float()
        with intercept.intercepted(model, bias=PerQuery(heads, emph[None], 0.1)):
            masked = model(ids).logits.float()
        plain = model(ids).logits.float()
    assert (fast - ref).abs().max() < TOL and (masked - ref).abs().max() < TOL
    assert (plain - ref).abs().max() > 1e-2


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_prefill_and_decoding_match_reference(smollm2, impl):
    model, tok = smollm2
    r = _prompts(tok)[0]
    ids, emph, P = torch.tensor([r.input_ids]), r.mask("user"), len(r)
    with attn_impl(model, impl):
        gen, steps = _decode(model, ids, 4, lambda: steer(model, HEADS, emph, 0.1))
    full = torch.cat([ids, gen[:, :-1]], 1)  # the decoded tokens fed back in one uncached pass
    emph_full = torch.cat([emph, torch.zeros(full.shape[1] - P, dtype=torch.bool)])[None]
    ref = reference_logits(model, full, HEADS, emph_full, 0.1)[:, P - 1 :]  # (1, steps, V)
    assert (steps - ref).abs().max() < TOL
    with torch.no_grad():
        plain = model(full).logits[:, P - 1 :].float()
    assert (plain - ref).abs().max() > 1e-2  # the steering really changes the logits


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_prompt_only_steering_leaves_generated_keys_unscaled(smollm2, impl):
    """``steer_generated=False`` (the authors' PASTA code: its mask stops at the prompt) equals the eq. (1)
    reference in which the decoded tokens are emphasised (bias 0), and differs from eq. (1) as stated."""
    model, tok = smollm2
    r = _prompts(tok)[0]
    ids, emph, P = torch.tensor([r.input_ids]), r.mask("user"), len(r)
    with attn_impl(model, impl):
        gen, steps = _decode(model, ids, 4, lambda: steer(model, HEADS, emph, 0.01, steer_generated=False))
        _, stated = _decode(model, ids, 4, lambda: steer(model, HEADS, emph, 0.01))
    full = torch.cat([ids, gen[:, :-1]], 1)
    emph_full = torch.cat([emph, torch.ones(full.shape[1] - P, dtype=torch.bool)])[None]
    ref = reference_logits(model, full, HEADS, emph_full, 0.01)[:, P - 1 :]
    assert (steps - ref).abs().max() < TOL
    assert (steps[:, 0] - stated[:, 0]).abs().max() < TOL  # the first token sees only the prompt
    assert (steps[:, 1:] - stated[:, 1:]).abs().max() > 1e-2  # later ones read the generated keys


def test_steered_condition_names_round_trip():
    from ctxaware.attention.steering import parse_steered, steered_condition

    assert steered_condition("chat+prefix", 0.1) == "chat+prefix+steer0.1"
    assert steered_condition("chat", 0.01, steer_generated=False) == "chat+steer0.01+promptonly"
    assert parse_steered("chat+prefix+steer0.1") == ("chat+prefix", 0.1, True)
    assert parse_steered("chat+steer0.01+promptonly") == ("chat", 0.01, False)
    assert parse_steered("chat+prefix") is None


def test_batched_left_padded_equals_unbatched_and_decodes(smollm2):
    model, tok = smollm2
    rs = _prompts(tok)
    ids, mask = left_pad([r.input_ids for r in rs], tok.pad_token_id or 0, "cpu")
    emph = emphasis_mask(rs, ids.shape[1])
    gen, steps = _decode(model, ids, 3, lambda: steer(model, HEADS, emph, 0.3), mask=mask)
    for i, r in enumerate(rs):
        g1, s1 = _decode(model, torch.tensor([r.input_ids]), 3, lambda r=r: steer(model, HEADS, r, 0.3))
        assert (steps[i] - s1[0]).abs().max() < TOL
    # the padded batch against the reference too
    full = torch.cat([ids, gen[:, :-1]], 1)
    fmask = torch.cat([mask, torch.ones_like(gen[:, :-1])], 1)
    ef = torch.cat([emph, torch.zeros_like(gen[:, :-1], dtype=torch.bool)], 1)
    ref = reference_logits(model, full, HEADS, ef, 0.3, mask=fmask)[:, ids.shape[1] - 1 :]
    assert (steps - ref).abs().max() < TOL


def test_generate_batch_context(smollm2):
    model, tok = smollm2
    rs = _prompts(tok)
    bc = batch_context(model, HEADS, 0.1)
    batched = generate(model, tok, rs, max_new_tokens=4, batch_size=2, batch_context=bc, progress=False)
    single = generate(model, tok, rs, max_new_tokens=4, batch_size=1, batch_context=bc, progress=False)
    assert [g.text for g in batched] == [g.text for g in single]


def test_alpha_one_is_exact_noop_and_earlier_layers_unchanged(smollm2):
    model, tok = smollm2
    r = _prompts(tok)[0]
    ids = torch.tensor([r.input_ids])
    with torch.no_grad():
        base = model(ids, output_hidden_states=True)
        with steer(model, "all", r, 1.0):
            same = model(ids).logits
        with steer(model, {10: [3]}, r, 0.01):
            hs = model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(same, base.logits)
    for i in range(11):  # hidden_states[i] is the input of layer i; layer 10's output is hidden_states[11]
        assert torch.equal(hs[i], base.hidden_states[i]), i
    assert not torch.allclose(hs[11], base.hidden_states[11])


def test_gemma3_sliding_window_prefill_and_decode():
    model = tiny_gemma3(window=8)
    ids = torch.randint(5, 500, (1, 24))
    emph = torch.zeros(24, dtype=torch.bool)
    emph[4:18] = True
    heads = {0: [1], 1: [0, 3], 3: [2]}
    for impl in ("eager", "sdpa"):
        with attn_impl(model, impl):
            gen, steps = _decode(model, ids, 4, lambda: steer(model, heads, emph, 0.2))
        full = torch.cat([ids, gen[:, :-1]], 1)
        ef = torch.cat([emph, torch.zeros(3, dtype=torch.bool)])[None]
        ref = reference_logits(model, full, heads, ef, 0.2)[:, 23:]
        assert (steps - ref).abs().max() < TOL, impl


def test_bf16_padded_batch_has_no_nan(smollm2):
    model, tok = smollm2
    rs = _prompts(tok)
    ids, mask = left_pad([r.input_ids for r in rs], tok.pad_token_id or 0, "cpu")
    # a copy: bf16 and back would round the shared model's weights and RoPE buffers for later tests
    model = copy.deepcopy(model).to(torch.bfloat16)
    with steer(model, HEADS, emphasis_mask(rs, ids.shape[1]), 0.01), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out[:, -1]).all()


@pytest.mark.slow  # compiling flex attention takes ~1 min on CPU (and fails without a working C++ toolchain)
def test_flex_attention_if_supported():
    from tests.conftest import tiny_llama

    model = tiny_llama(vocab_size=512)
    ids = torch.randint(5, 500, (1, 20))
    emph = torch.zeros(20, dtype=torch.bool)
    emph[2:12] = True
    heads = {0: [1], 1: [0, 2]}
    try:
        with attn_impl(model, "flex_attention"), steer(model, heads, emph, 0.1), torch.no_grad():
            got = model(ids).logits
    except Exception as e:  # noqa: BLE001 - the platform may lack a flex backend
        if isinstance(e, CtxawareError):
            raise
        pytest.skip(f"flex_attention unavailable here: {type(e).__name__}: {str(e)[:80]}")
    ref = reference_logits(model, ids, heads, emph[None], 0.1)
    assert (got - ref).abs().max() < TOL


def test_bad_inputs(smollm2):
    model, tok = smollm2
    r = _prompts(tok)[0]
    ids = torch.tensor([r.input_ids])
    for alpha in (0, -0.5, 1.5, math.nan):
        with pytest.raises(CtxawareError, match="alpha"):
            with steer(model, HEADS, r, alpha):
                pass
    with pytest.raises(CtxawareError, match="heads"):
        with steer(model, {3: [9]}, r, 0.5):
            pass
    with pytest.raises(CtxawareError, match="layer 30 does not exist"):
        with steer(model, {30: [0]}, r, 0.5):
            pass
    with pytest.raises(CtxawareError, match="'all'"):
        with steer(model, "some", r, 0.5):
            pass
    with pytest.raises(CtxawareError, match="covers"), torch.no_grad():
        with steer(model, HEADS, r.mask("user")[:-1], 0.5):
            model(ids)
    with pytest.raises(CtxawareError, match="boolean"):
        with steer(model, HEADS, r.mask("user").long(), 0.5):
            pass
    with pytest.raises(CtxawareError, match="no forward pass"):
        with steer(model, HEADS, r, 0.5):
            pass
    with pytest.raises(CtxawareError, match="Rendered"):
        emphasis_mask([[1, 2, 3]], 3)
    with pytest.raises(CtxawareError):
        batch_context(model, HEADS, 2.0)(Batch(ids, torch.ones_like(ids), [r], [0]))


def test_sweep_alpha_table():
    scores = {None: 0.5, 0.01: 0.2, 0.1: 0.7, 0.3: 0.7, 0.5: 0.6, 0.7: 0.55, 0.9: 0.5}
    res = sweep_alpha(lambda a, chat: scores[a] if chat else 0.9)
    assert (
        res["best_alpha"] == 0.3
        and res["steered"] == 0.7
        and res["baseline"] == 0.5
        and res["no_template"] == 0.9
    )
    assert "alpha=0.3" in table({"m": res})


def test_no_best_alpha_when_nothing_separates_them():
    """Issue 27 §3: when every alpha scores what the baseline scores (e.g. 100 % everywhere), Table 1 names
    no best alpha; one alpha above the baseline is named."""
    flat = sweep_alpha(lambda a, chat: 1.0)
    row = table({"m": flat}).splitlines()[-1]
    assert "none is best" in row and "alpha=" not in row
    one = sweep_alpha(lambda a, chat: 1.0 if a == 0.5 else 0.8)
    assert "alpha=0.5" in table({"m": one}) and "none is best" not in table({"m": one})


def test_nih_sweep_runs_table_1_on_the_nih_prompts(smollm2_tok):
    """`steering.nih_sweep` (docs/attention.md's three-call sweep): one score per alpha on the chat prompts,
    the baseline and the no-template score, over the NIH tester's prompts; alpha = 1 is the baseline."""
    from ctxaware.attention.steering import nih_sweep
    from tests.conftest import tiny_llama

    model = tiny_llama().eval()
    res = nih_sweep(model, smollm2_tok, {1: [0]}, [300], [50.0], "synthetic", alphas=(0.5, 1.0),
                    batch_size=2, max_new_tokens=2)  # fmt: skip
    assert set(res["by_alpha"]) == {0.5, 1.0} and res["n_prompts"] == 1
    assert (
        res["by_alpha"][1.0] == res["baseline"]
        and res["per_cell"]["chat@1.0"] == res["per_cell"]["chat@None"]
    )
