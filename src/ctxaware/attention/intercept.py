"""Reach into the attention function: per-head logit biases, role-reduced attention rows, early stop.

This is the one mechanism under attention allocation (paper Fig. 3-4), retrieval heads (eq. 3), steering
(eq. 1) and the context-dependency score (eq. 2). It never needs ``output_attentions=True`` or eager
attention on every layer:

* Transformers calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, ...)``
  inside every attention module with post-RoPE queries and keys. `intercepted(model, ...)` registers one
  wrapper per base implementation (``ctxaware+sdpa``, ``ctxaware+eager``, ``ctxaware+flex_attention``),
  points the model's config at it for the duration of the ``with`` block and restores it in ``finally``.
  Layers without work pass straight through to the base function.
* **Bias** (steering): a `BiasFn` returns, for a layer, the heads to bias and an additive logit bias of
  shape (B, h, 1, K) (per key, eq. 1) or (B, h, Q, K). Only those heads are recomputed; the others keep
  the fast path. A per-key bias b needs no mask at all: softmax(s + b)·v = (p·(w v)) / (p·w) with
  p = softmax(s) and w = exp(b), so the biased heads are one more call of the layer's own kernel (causal
  fast path, FlexAttention without a new ``score_mod``) with V = [w v | w], no (Q, K) tensor anywhere. A
  per-query bias, or a model with attention sinks, takes an explicit float mask (on FlexAttention a
  ``score_mod`` term, transformers' ``position_bias``).
* **Capture**: for chosen layers, the attention mass of chosen query rows (or every row) on key groups
  (e.g. one-hot roles), (B, H, R, G). Two exact paths:

  - ``onehot`` (``auto`` for many rows: scoring, every row): the mass a softmax row puts on group g *is
    an attention output* when V holds the group indicators. So the layer's own kernel (SDPA, eager,
    FlexAttention) is called once more on the same q, k, mask and kwargs (scaling, sliding window,
    soft-capping, sinks) with ``V = groups`` (B, Hkv, K, d), G zero-padded to the head size d so the fast
    kernel takes it (CPU SDPA's flash kernel needs equal q/v head sizes: an 8-wide V falls back to the
    O(T^2) math kernel, 6x slower at 2K). Every row comes out at kernel speed, in O(T x d) memory; no
    logits are materialised outside the kernel. q and k are upcast to float32 (on a GPU this picks the
    memory-efficient kernel), so bf16 models get float32 masses.
  - ``chunked`` (the fallback; ``auto`` for a few rows, R * 4 <= T, e.g. eq. (3)'s last prompt token,
    unless the mask is a FlexAttention BlockMask, which only the kernel reads):
    softmax rows of the chosen query positions computed here in float32, in chunks of rows, reduced at
    once: ``probs (B, H, r, K) @ groups (B, K, G)``. Memory O(rows_chunk x K), time O(R x K).
  Both are tested against eager ``output_attentions=True``.
* **Early stop**: after the deepest captured layer the wrapper raises `StopForward`, so later layers (and
  the LM head) never run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from ctxaware.core.errors import CtxawareError

PREFIX = "ctxaware+"
SUPPORTED = ("sdpa", "eager", "flex_attention")

# (layer_idx, query (B,H,Q,d), key (B,Hkv,K,d)) -> (heads, bias (B, len(heads), 1|Q, K)) or None
BiasFn = Callable[[int, torch.Tensor, torch.Tensor], "tuple[list[int], torch.Tensor] | None"]


class StopForward(Exception):
    """Raised inside the forward pass once every captured layer is done."""


CAPTURE_METHODS = ("auto", "onehot", "chunked")


@dataclass
class Capture:
    """What to capture: ``rows`` (B, R) query indices (``-1`` = padding row; ``None`` = every row, R = T;
    ``"last"``: the last query row of each call, R = 1, which is the last prompt token of a left-padded
    prefill even when a KV cache holds the prompt's prefix) and ``groups`` (B, K, G) key groups.
    ``once``: capture only the first call of each layer (the prefill of a ``generate`` call; decoding steps
    pass through). ``method``: ``onehot`` (the layer's own kernel with V = groups),
    ``chunked`` (softmax rows computed here) or ``auto``: ``onehot`` unless only a few rows are asked for
    (R * 4 <= T, e.g. eq. (3)'s last prompt token at every layer), where ``chunked`` costs O(R x T) against
    the kernel's O(T x T) and wins.

    After the forward pass ``results[layer]`` is a (B, H, R, G) float32 tensor of attention mass per group.
    """

    layers: list[int]
    rows: torch.Tensor | None | str
    groups: torch.Tensor
    chunk: int = 256
    stop_early: bool = True
    method: str = "auto"
    once: bool = False
    results: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in CAPTURE_METHODS:
            raise CtxawareError(f"capture method {self.method!r} is not one of {', '.join(CAPTURE_METHODS)}")
        if self.rows is None and self.method == "chunked":
            self.method = "chunked-all"
        if isinstance(self.rows, str) and self.rows != "last":
            raise CtxawareError(
                f"capture rows {self.rows!r}: give a (B, R) tensor, None (every row) or 'last'"
            )


@dataclass
class _State:
    base: str
    bias: BiasFn | None
    capture: Capture | None
    fired: set[int] = field(default_factory=set)
    biased: set[int] = field(default_factory=set)


class _GroupedProxy:
    """The attention module as seen by the base function when K/V are already expanded to query heads."""

    def __init__(self, module) -> None:
        self._m = module
        self.num_key_value_groups = 1

    def __getattr__(self, name):
        return getattr(self._m, name)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, K, d) -> (B, Hkv * n_rep, K, d): the key of every query head."""
    if n_rep == 1:
        return x
    b, h, k, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, k, d).reshape(b, h * n_rep, k, d)


def additive_mask(
    mask, query: torch.Tensor, key: torch.Tensor, sliding_window: int | None = None
) -> torch.Tensor:
    """The layer's mask as a float additive mask (B|1, 1, Q, K); a ``None`` mask means causal (+window)."""
    q_len, k_len = query.shape[2], key.shape[2]
    neg = torch.finfo(torch.float32).min
    if mask is None:
        qpos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]  # absolute query positions
        kpos = torch.arange(k_len, device=query.device)[None, :]
        allowed = kpos <= qpos
        if sliding_window:
            allowed &= kpos > qpos - sliding_window
        return torch.where(allowed, 0.0, neg)[None, None]
    if not isinstance(mask, torch.Tensor):
        raise CtxawareError(
            "attention capture needs sdpa or eager attention; load the model with --attn-implementation sdpa"
        )
    mask = mask[:, :, :, :k_len]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg)
    return mask.float().clamp(min=neg)


def _module_eager(module) -> Callable:
    """The model family's own eager attention function (some handle sinks or soft-capping)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _base_fn(base: str, module) -> Callable:
    return _module_eager(module) if base == "eager" else AttentionInterface._global_mapping[base]


def _capture_rows(cap: Capture, module, query, key, mask, bias, kwargs) -> None:
    """Softmax rows for ``cap.rows`` at this layer, reduced against ``cap.groups``; shape (B, H, R, G)."""
    layer = module.layer_idx
    keys = repeat_kv(key, query.shape[1] // key.shape[1]).float()  # (B, H, K, d)
    full = additive_mask(mask, query, key, kwargs.get("sliding_window"))  # (B|1, 1, Q, K)
    scaling = kwargs.get("scaling") or module.head_dim**-0.5
    softcap = kwargs.get("softcap")
    B, H = query.shape[0], query.shape[1]
    all_rows = cap.rows if cap.rows is not None else torch.arange(query.shape[2])[None].expand(B, -1)
    R = all_rows.shape[1]
    groups = cap.groups.to(query.device, torch.float32)  # (B, K, G)
    out = torch.zeros(B, H, R, groups.shape[-1], dtype=torch.float32, device=query.device)
    for a in range(0, R, cap.chunk):
        rows = all_rows[:, a : a + cap.chunk].to(query.device)  # (B, r)
        safe = rows.clamp(min=0)
        q = torch.gather(
            query, 2, safe[:, None, :, None].expand(B, H, -1, query.shape[-1])
        ).float()  # (B, H, r, d)
        logits = (q @ keys.transpose(-1, -2)) * scaling  # (B, H, r, K)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        m = full.expand(B, -1, -1, -1)
        logits = logits + torch.gather(m, 2, safe[:, None, :, None].expand(B, 1, -1, m.shape[-1]))
        if bias is not None:
            heads, b = bias
            b = (
                b.float().expand(B, len(heads), 1, -1)
                if b.shape[2] == 1
                else torch.gather(b.float(), 2, safe[:, None, :, None].expand(B, len(heads), -1, b.shape[-1]))
            )
            logits[:, heads] = logits[:, heads] + b
        probs = torch.softmax(logits, dim=-1)  # (B, H, r, K)
        red = probs @ groups[:, None]  # (B, H, r, G)
        out[:, :, a : a + rows.shape[1]] = red * (rows >= 0)[:, None, :, None]
    cap.results[layer] = out


def _capture_onehot(cap: Capture, base: str, fn, module, query, key, mask, bias, kwargs) -> None:
    """Per-group mass of every query row from the layer's own kernel with V = one-hot groups; (B, H, R, G).

    The groups are zero-padded to the head size (one call per ``head_dim`` groups), q and k are upcast to
    float32, and a steering ``bias`` goes through the same `_biased_call` as the model's own output, so
    the captured rows are those of the steered softmax.
    """
    B, H, Q, d = query.shape
    K = key.shape[2]
    groups = cap.groups.to(query.device, torch.float32)  # (B, K, G)
    G = groups.shape[-1]
    q32, k32 = query.float(), key.float()
    m32 = mask
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        m32 = mask.float()
    kw = dict(kwargs)
    kw.pop("dropout", None)
    outs = []
    for g0 in range(0, G, d):
        cols = groups[..., g0 : g0 + d]  # (B, K, <=d)
        v = torch.nn.functional.pad(cols, (0, d - cols.shape[-1]))  # (B, K, d): the kernel's own head size
        v = v[:, None].expand(B, key.shape[1], K, d)  # (B, Hkv, K, d): a view, same indicators for every head
        if bias is None:
            o, _ = fn(module, q32, k32, v, m32, dropout=0.0, **kw)  # (B, Q, H, d)
        else:
            heads, b = bias
            o, _ = _biased_call(base, fn, module, q32, k32, v, m32, heads, b.float(), {**kw, "dropout": 0.0})
        outs.append(o[..., : cols.shape[-1]].float())
    out = torch.cat(outs, -1).transpose(1, 2)  # (B, H, Q, G)
    if cap.rows is not None:
        rows = cap.rows.to(query.device)  # (B, R)
        safe = rows.clamp(min=0)
        out = torch.gather(out, 2, safe[:, None, :, None].expand(B, H, -1, G))  # (B, H, R, G)
        out = torch.where(
            (rows >= 0)[:, None, :, None], out, 0.0
        )  # padding rows: 0 (never NaN from a pad row)
    cap.results[module.layer_idx] = out.contiguous()


@functools.lru_cache(maxsize=512)
def _head_index(heads: tuple[int, ...], n_rep: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Index tensors of ``heads`` on ``device``, built once per (heads, device): the query heads, their KV
    heads (``head // n_rep``), both doubled for the reweighted call, and the order that sorts ``heads``. A
    fresh host-to-device copy per layer call would synchronise a GPU stream."""
    idx = torch.tensor(heads, device=device)
    kv = idx // n_rep
    return idx, kv, torch.cat([idx, idx]), torch.cat([kv, kv]), torch.argsort(idx)


def _has_sinks(module, kwargs: dict) -> bool:
    return kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None


def _reweighted_call(fn, proxy, query, key, value, mask, bias, kwargs, index) -> torch.Tensor:
    """Eq. (1) through the model's fast kernel: a per-key logit bias b is a reweighting of V.

    softmax(s + b) . v = sum_k p_k w_k v_k / sum_k p_k w_k with p = softmax(s) and w = exp(b). One kernel
    call on 2h heads (the causal fast path, no (Q, K) mask) gives both sums: the first h heads take
    V = w * v, the last h take V = w in column 0 (zero-padded to the head size). Exact in exact
    arithmetic; w <= 1 for eq. (1)'s log(alpha) <= 0. A row whose every key is masked (padding, never
    read by a real token) gets 0 instead of 0/0. Returns (B, Q, h, d) for the heads of ``index``.
    """
    _, kv, idx2, kv2, _ = index
    h, d = kv.shape[0], value.shape[-1]
    w = bias.exp().transpose(-1, -2).to(value.dtype)  # (B, h, K, 1)
    v2 = torch.cat([value[:, kv] * w, torch.nn.functional.pad(w, (0, d - 1))], 1)  # (B, 2h, K, d)
    o, _ = fn(proxy, query[:, idx2], key[:, kv2], v2, mask, **kwargs)  # (B, Q, 2h, d)
    return torch.nan_to_num(o[:, :, :h] / o[:, :, h:, :1], nan=0.0, posinf=0.0, neginf=0.0)


def _biased_call(base: str, fn, module, query, key, value, mask, heads, bias, kwargs):
    """Run the base attention, then recompute ``heads`` with ``bias`` added to their logits.

    The unbiased call keeps the model's fast path (GQA-native, ``is_causal``); only the biased heads are
    recomputed, reading their own KV heads without repeating all. When every head is biased the base call
    is skipped. A per-key bias (B, h, 1, K), eq. (1)'s, goes through `_reweighted_call` on the same fast
    kernel; a per-query bias (B, h, Q, K), or a model with attention sinks, takes an explicit float mask
    (FlexAttention: transformers' ``position_bias`` score_mod).
    """
    n_rep = query.shape[1] // key.shape[1]
    index = _head_index(tuple(heads), n_rep, query.device)
    idx, kv = index[0], index[1]
    proxy = _GroupedProxy(module)
    if bias.shape[2] == 1 and not _has_sinks(module, kwargs):
        out_s = _reweighted_call(fn, proxy, query, key, value, mask, bias, kwargs, index)
        if len(heads) == query.shape[1]:  # every head: no unbiased call
            return out_s[:, :, index[4]], None
        out, _ = fn(module, query, key, value, mask, **kwargs)  # (B, Q, H, d)
        return out.index_copy(2, idx, out_s.to(out.dtype)), None
    out, _ = fn(module, query, key, value, mask, **kwargs)  # (B, Q, H, d)
    q_s, k_s, v_s = query[:, idx], key[:, kv], value[:, kv]  # (B, h, Q|K, d)
    if base == "flex_attention":
        pb = bias.expand(query.shape[0], len(heads), query.shape[2], key.shape[2])  # a view: no copy
        out_s, _ = fn(proxy, q_s, k_s, v_s, mask, position_bias=pb, **kwargs)
    else:
        m = additive_mask(mask, query, key, kwargs.get("sliding_window")) + bias.float()  # (B, h, Q, K)
        if query.dtype != torch.float32:  # fp16 would turn float32's min into -inf (NaN on masked rows)
            m = m.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
        kw = {k: v for k, v in kwargs.items() if k != "is_causal"}
        out_s, _ = fn(proxy, q_s, k_s, v_s, m, is_causal=False, **kw)  # (B, Q, h, d)
    return out.index_copy(2, idx, out_s.to(out.dtype)), None  # out of place: autograd may have saved ``out``


def _make_wrapper(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        st: _State | None = getattr(module, "_ctxaware_state", None)
        fn = _base_fn(base, module)
        if st is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        layer = module.layer_idx
        st.fired.add(layer)
        bias = st.bias(layer, query, key) if st.bias is not None else None
        cap = st.capture
        if cap is not None and layer in cap.layers and not (cap.once and layer in cap.results):
            if isinstance(cap.rows, str):  # "last": this call's last query row, for every batch row
                B, Q = query.shape[0], query.shape[2]
                last = torch.full((B, 1), Q - 1, dtype=torch.long, device=query.device)
                cap = dataclasses.replace(cap, rows=last, results=cap.results)
            few = (
                cap.rows is not None
                and cap.rows.shape[1] * 4 <= query.shape[2]
                and (attention_mask is None or isinstance(attention_mask, torch.Tensor))  # not a BlockMask
            )
            if cap.method.startswith("chunked") or (cap.method == "auto" and few):
                _capture_rows(cap, module, query, key, attention_mask, bias, kwargs)
            else:
                _capture_onehot(cap, base, fn, module, query, key, attention_mask, bias, kwargs)
            if cap.stop_early and layer == max(cap.layers):
                raise StopForward
        if bias is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        st.biased.add(layer)
        heads, b = bias
        return _biased_call(base, fn, module, query, key, value, attention_mask, heads, b, kwargs)

    return attention


for _base in SUPPORTED:
    AttentionInterface.register(PREFIX + _base, _make_wrapper(_base))
    ALL_MASK_ATTENTION_FUNCTIONS.register(PREFIX + _base, ALL_MASK_ATTENTION_FUNCTIONS[_base])


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder, in layer order (each has ``layer_idx``)."""
    mods = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "head_dim") and hasattr(m, "q_proj")
    ]
    if not mods:
        raise CtxawareError(
            f"cannot find attention modules with layer_idx in {type(model).__name__}; ctxaware supports "
            "decoder models whose attention calls transformers' AttentionInterface (Llama, Qwen, Mistral, Gemma, ...)"
        )
    return sorted(mods, key=lambda m: m.layer_idx)


def _configs(model) -> list:
    seen, out = set(), []
    for m in [model, *model.modules()]:
        cfg = getattr(m, "config", None)
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "_attn_implementation"):
            seen.add(id(cfg))
            out.append(cfg)
    return out


_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hooks_of(model) -> tuple[list, list]:
    """The attention modules and configs of ``model``, found once per model: walking every module on each
    ``steer`` / capture block costs milliseconds, as much as a launch-bound GPU forward's attention."""
    got = _HOOKS.get(model)
    if got is None:
        got = _HOOKS[model] = (attention_modules(model), _configs(model))
    return got


@contextlib.contextmanager
def intercepted(model, *, bias: BiasFn | None = None, capture: Capture | None = None) -> Iterator[_State]:
    """Route the model's attention through ctxaware's wrapper for the duration of the block."""
    impl = model.config._attn_implementation
    base = impl[len(PREFIX) :] if impl.startswith(PREFIX) else impl
    if base not in SUPPORTED:
        raise CtxawareError(
            f"attention implementation {impl!r} cannot be intercepted; load the model with "
            f"--attn-implementation one of {', '.join(SUPPORTED)}"
        )
    mods, configs = _hooks_of(model)
    if any(getattr(m, "_ctxaware_state", None) is not None for m in mods):
        raise CtxawareError(
            "this model is already intercepted (nested steer/capture); combine them in one block"
        )
    state = _State(base, bias, capture)
    old = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = PREFIX + base
        for m in mods:
            m._ctxaware_state = state
        yield state
    finally:
        for m in mods:
            m._ctxaware_state = None
        for c, o in zip(configs, old):
            c._attn_implementation = o


def decoder(model):
    """The decoder stack without the LM head (``model.model`` for *ForCausalLM), for capture-only passes."""
    return getattr(model, "model", model)


@torch.inference_mode()
def capture_attention(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: list[int],
    rows: torch.Tensor | None,
    groups: torch.Tensor,
    *,
    bias: BiasFn | None = None,
    chunk: int = 256,
    method: str = "auto",
) -> dict[int, torch.Tensor]:
    """Attention mass of query ``rows`` on key ``groups`` at ``layers``: ``{layer: (B, H, R, G)}``.

    Runs the decoder only up to ``max(layers)`` (no LM head, no KV cache). ``rows`` (B, R) indexes the
    sequence (``-1`` marks a padding row whose result is zero; ``None``: every row, R = T); ``groups``
    (B, T, G) assigns keys to groups. ``method``: ``onehot`` / ``auto`` (the layer's own kernel with V =
    groups) or ``chunked`` (softmax rows computed in chunks of ``chunk`` rows); both are exact.
    """
    from ctxaware.core.models import model_shape

    try:
        n = model_shape(model)[0]
    except AttributeError:  # a bare module in tests: no layer count to check against
        n = None
    for layer in layers:
        if layer < 0 or (n is not None and layer >= n):
            raise CtxawareError(f"layer {layer} does not exist; the model has layers 0..{(n or 1) - 1}")
    cap = Capture(sorted(set(layers)), rows, groups, chunk=chunk, method=method)
    pos = None
    if attention_mask is not None:  # left padding: positions count real tokens only, as in generate()
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    with intercepted(model, bias=bias, capture=cap):
        try:
            decoder(model)(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False
            )
        except StopForward:
            pass
    missing = [layer for layer in cap.layers if layer not in cap.results]
    if missing:
        raise CtxawareError(
            f"attention capture never reached layers {missing}; the model's attention was not hooked"
        )
    return cap.results
