"""Attention steering toward user tokens (paper eq. 1), on sdpa, eager and flex attention.

Eq. (1) rescales the attention of a selected head: ``Att'(x, y) = Att(x, y) / Z`` if ``y`` is emphasised
(a user token) and ``alpha * Att(x, y) / Z`` otherwise. Multiplying a softmax probability by ``alpha`` and
renormalising is exactly adding ``log(alpha)`` to that key's logit before the softmax, so `steer` installs a
`ctxaware.attention.intercept` bias of ``log(alpha)`` on every non-emphasised key of the selected heads.

Differences from the released implementations, on purpose:

* **Once per layer.** The paper's code (a PASTA pre-hook) steers named heads on a cloned mask, once per
  layer, as here; when it steers every head of a layer it adds ``log(alpha)`` in place to the 4-D mask that
  all layers share, so layer k receives the bias k+1 times (alpha=0.9 on 32 layers scales the last one by
  0.9^32). ``heads="all"`` gives every selected layer the bias exactly once.
* **Generated tokens are not emphasised** (by default). Eq. (1) scales every non-user key, including the
  answer tokens generated during decoding; PASTA's code leaves generated tokens unscaled (its mask only
  covers the prompt). Here keys beyond the prompt get ``log(alpha)``; ``steer_generated=False``
  (``--no-steer-generated`` on the commands, conditions ``<base>+steer<alpha>+promptonly``) leaves them
  unscaled, as PASTA does.
* **Any attention kernel.** The bias goes through the attention function (sdpa/eager/flex), in prefill and
  in cached decoding, for left-padded batches; no ``output_attentions``, no eager-only hook. Because the
  bias is per key, the steered heads run on the kernel's fast causal path with a reweighted V
  (`ctxaware.attention.intercept`, no (Q, K) mask is built).

Use with the generation engine::

    heads = load_heads("heads.json", model)
    gens = generate(model, tok, prompts, batch_context=batch_context(model, heads, alpha=0.1))
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ctxaware.attention.intercept import intercepted
from ctxaware.attention.retrieval_heads import Heads, check_heads, load_heads
from ctxaware.core.errors import CtxawareError
from ctxaware.rendering.chat import Rendered

__all__ = [
    "steer",
    "batch_context",
    "sweep_alpha",
    "emphasis_mask",
    "load_heads",
    "Heads",
    "steered_condition",
    "parse_steered",
]

ALPHAS = (0.01, 0.1, 0.3, 0.5, 0.7, 0.9)
PROMPT_ONLY = "+promptonly"  # the condition suffix of steering that leaves generated tokens unscaled


def steered_condition(base: str, alpha: float, steer_generated: bool = True) -> str:
    """The condition name of ``base`` steered at ``alpha``: ``chat+steer0.1``, or ``chat+steer0.1+promptonly``
    where only the prompt's keys are steered (``steer_generated=False``, PASTA's behaviour)."""
    return f"{base}+steer{alpha:g}" + ("" if steer_generated else PROMPT_ONLY)


def parse_steered(condition: str) -> tuple[str, float, bool] | None:
    """``(base, alpha, steer_generated)`` of a `steered_condition` name; None for an unsteered condition."""
    if "+steer" not in condition:
        return None
    base, rest = condition.split("+steer", 1)
    return base, float(rest.removesuffix(PROMPT_ONLY)), not rest.endswith(PROMPT_ONLY)


def emphasis_mask(
    items: Sequence[Rendered | Sequence[int]], width: int, roles: Sequence[str] = ("user",)
) -> torch.Tensor:
    """Left-padded (B, width) mask of the tokens to emphasise (default: ``user`` role) in each prompt."""
    out = torch.zeros(len(items), width, dtype=torch.bool)
    for i, it in enumerate(items):
        if not isinstance(it, Rendered):
            raise CtxawareError(
                "steering needs Rendered prompts (roles per token); render them with ctxaware.rendering.chat.render"
            )
        if len(it) > width:
            raise CtxawareError(f"prompt {i} has {len(it)} tokens but the batch is only {width} wide")
        out[i, width - len(it) :] = it.mask(*roles)
    return out


class _Bias:
    """The `intercept.BiasFn` of eq. (1): ``log(alpha)`` on keys that are not emphasised, on ``heads``.

    Keys are located by absolute position: a call whose query covers all keys is a fresh prefill
    (position 0..K-1); a shorter query continues the cache, so the keys are the last K of the ``seen``
    positions (sliding-window caches keep only the last few). Keys past the prompt (generated tokens) get
    ``log(alpha)`` too, as eq. (1) states it, unless ``steer_generated`` is False (PASTA's code).
    """

    def __init__(
        self, heads: dict[int, list[int]], emphasize: torch.Tensor, alpha: float, steer_generated: bool = True
    ) -> None:
        self.heads, self.emph, self.log_alpha = heads, emphasize, math.log(alpha)  # emph: (B|1, P)
        self.steer_generated = steer_generated
        self.seen: dict[int, int] = {}
        self._last: tuple[tuple, torch.Tensor] | None = None  # every layer of one forward sees the same keys

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor):
        heads = self.heads.get(layer)
        if not heads:
            return None
        B, Q, K = query.shape[0], query.shape[2], key.shape[2]
        P = self.emph.shape[1]
        total = K if Q == K else self.seen.get(layer, 0) + Q
        if Q == K and K != P:
            raise CtxawareError(
                f"the emphasis mask covers {P} tokens but the prompt has {K}; give one mask entry per prompt token"
            )
        if self.emph.shape[0] not in (1, B):
            raise CtxawareError(f"the emphasis mask has {self.emph.shape[0]} rows but the batch has {B}")
        self.seen[layer] = total
        if self.emph.device != query.device:  # once: a copy per layer call would sync a GPU stream
            self.emph = self.emph.to(query.device)
        key_id = (total, K)
        if self._last is None or self._last[0] != key_id:  # once per forward pass, not once per layer
            emph = self.emph
            if total > P:  # generated keys: not emphasised (eq. 1) unless they are left unsteered (PASTA)
                more = emph.new_full((emph.shape[0], total - P), not self.steer_generated)
                emph = torch.cat([emph, more], dim=1)
            emph = emph[:, total - K : total]  # (B|1, K) the keys this call sees
            self._last = (key_id, torch.where(emph, 0.0, self.log_alpha).to(torch.float32))  # (B|1, K)
        bias = self._last[1]
        return heads, bias[:, None, None, :].expand(B, len(heads), 1, K)  # (B, h, 1, K)


@contextlib.contextmanager
def steer(
    model,
    heads: Heads | str,
    emphasize: torch.Tensor | Rendered,
    alpha: float,
    steer_generated: bool = True,
) -> Iterator[None]:
    """Steer ``heads`` of ``model`` toward ``emphasize``d prompt tokens by eq. (1) inside the block.

    Args:
        model: a decoder loaded with sdpa, eager or flex attention.
        heads: ``{layer: [head, ...]}`` or ``"all"``.
        emphasize: boolean (P,) or (B, P) mask over the (left-padded) prompt tokens, or a `Rendered`
            prompt (its ``user`` tokens).
        alpha: 0 < alpha <= 1; attention to non-emphasised keys is multiplied by alpha, then renormalised.
            alpha=1 leaves the model untouched (the bias is skipped, logits are bit-identical).
        steer_generated: whether keys past the prompt (tokens generated inside the block) are down-weighted
            too, as eq. (1) states it (default); False leaves them unscaled, as the authors' PASTA code does.

    Raises `CtxawareError` on bad input, and at exit when a selected layer never ran its steered attention
    during a forward pass inside the block (a steering that silently did nothing).
    """
    check_alpha(alpha)
    sel = check_heads(heads, model)
    if isinstance(emphasize, Rendered):
        emphasize = emphasize.mask("user")
    if (
        not isinstance(emphasize, torch.Tensor)
        or emphasize.dtype != torch.bool
        or emphasize.dim() not in (1, 2)
    ):
        raise CtxawareError("emphasize must be a boolean (P,) or (B, P) tensor over the prompt tokens")
    emph = emphasize[None] if emphasize.dim() == 1 else emphasize  # (B|1, P)
    bias = _Bias(sel, emph, alpha, steer_generated) if alpha < 1 else None
    with intercepted(model, bias=bias) as state:
        yield
    fired = state.biased if bias is not None else state.fired
    missing = sorted(set(sel) - fired)
    if state.fired and missing:
        raise CtxawareError(
            f"steering never reached layers {missing}; the model's attention for them was not hooked"
        )
    if not state.fired:
        raise CtxawareError("no forward pass ran inside steer(); nothing was steered")


def steer_option() -> Any:
    """The ``steer`` field of a command that steers (nih, ruler): which heads eq. (1) steers."""
    return dataclasses.field(
        default=None,
        metadata={
            "path": "input",
            "help": "steer heads (paper eq. 1): a heads JSON {layer: [heads]} from `ctxaware heads`, or all",
        },
    )


def alphas_option() -> Any:
    """The ``alpha`` field beside `steer_option`: the alphas swept (empty: the paper's Table 1 grid)."""
    return dataclasses.field(
        default_factory=list,
        metadata={
            "help": "steering alphas with --steer (empty: 0.01,0.1,0.3,0.5,0.7,0.9, paper Table 1)",
            "gt": 0,
            "max": 1,
        },  # fmt: skip
    )


def steer_heads(steer: str, model) -> Heads | str:
    """The heads ``--steer`` names: ``all``, or a heads JSON {layer: [heads]} checked against ``model``."""
    return "all" if steer == "all" else load_heads(steer, model)


def steer_generated_option() -> Any:
    """The ``steer_generated`` field beside `steer_option`: eq. (1) as stated, or PASTA's prompt-only steering."""
    return dataclasses.field(
        default=True,
        metadata={
            "help": "steering also down-weights the tokens generated after the prompt, as eq. (1) states it; "
            "--no-steer-generated leaves them unscaled, as the authors' PASTA code does (ruler and nih conditions +promptonly)"
        },
    )


def check_steer_options(steer: str | None, alpha: Sequence[float]) -> None:
    """``--alpha`` means nothing without ``--steer``: one line, before anything runs."""
    if alpha and steer is None:
        raise CtxawareError("--alpha needs --steer (a heads JSON from `ctxaware heads`, or all)")


def check_alpha(alpha: float) -> None:
    """Eq. (1)'s alpha: 0 < alpha <= 1 (the one check, for Python callers; configs carry it as a rule)."""
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not 0 < alpha <= 1
        or math.isnan(alpha)
    ):
        raise CtxawareError(f"alpha={alpha!r} must satisfy 0 < alpha <= 1 (eq. 1 down-weights non-user keys)")


def batch_context(
    model,
    heads: Heads | str,
    alpha: float,
    roles: Sequence[str] = ("user",),
    steer_generated: bool = True,
) -> Callable[..., contextlib.AbstractContextManager]:
    """A ``batch_context`` for `ctxaware.rendering.generate.generate`: steers every batch toward its ``roles``
    tokens (``steer_generated``: see `steer`)."""
    sel = check_heads(heads, model)
    check_alpha(alpha)  # before any batch runs

    def ctx(batch) -> contextlib.AbstractContextManager:
        emph = emphasis_mask(batch.items, batch.input_ids.shape[1], roles)  # (B, T)
        return steer(model, sel, emph, alpha, steer_generated)

    return ctx


def sweep_alpha(
    evaluate_fn: Callable[[float | None, bool], float],
    alphas: Sequence[float] = ALPHAS,
) -> dict:
    """Table 1 of the paper: baseline (template), steered at each alpha (best picked), without template.

    ``evaluate_fn(alpha_or_None, chat)`` runs the evaluation (steered at ``alpha``, unsteered for None, with
    or without the chat template) and returns its score (higher is better); the caller closes over the
    model and heads and passes ``batch_context(model, heads, alpha)`` to `generate`. Returns ``{"baseline", "no_template", "by_alpha",
    "best_alpha", "steered"}``.
    """
    base = evaluate_fn(None, True)
    by_alpha = {float(a): evaluate_fn(a, True) for a in alphas}
    best = best_alpha(by_alpha)
    return {
        "baseline": base,
        "no_template": evaluate_fn(None, False),
        "by_alpha": by_alpha,
        "best_alpha": best,
        "steered": by_alpha[best],
    }


def best_alpha(by_alpha: dict[float, float]) -> float:
    """Table 1's choice: the alpha with the highest score; ties go to the mildest intervention (largest alpha)."""
    return max(by_alpha, key=lambda a: (by_alpha[a], a))


def table(rows: dict[str, dict]) -> str:
    """Markdown Table 1 from ``{model: sweep_alpha(...)}``. Where every alpha scores the same as the
    baseline, no alpha is named best: nothing separates them (issue 27 §3)."""
    lines = ["| model | baseline (template) | + steering (best alpha) | w/o template |", "|---|---|---|---|"]
    for name, r in rows.items():
        scores = set((r.get("by_alpha") or {}).values())
        if scores and scores == {r["baseline"]}:
            steered = f"{r['steered']:.3f} (every alpha ties with the baseline: none is best)"
        else:
            steered = f"{r['steered']:.3f} (alpha={r['best_alpha']:g})"
        lines.append(f"| {name} | {r['baseline']:.3f} | {steered} | {r['no_template']:.3f} |")
    return "\n".join(lines)


# --- NIH alpha sweep (minimal; `ctxaware nih --steer` is the full harness) ----------------------------------


def nih_sweep(
    model,
    tok,
    heads: Heads | str,
    lengths,
    depths,
    haystack,
    alphas=ALPHAS,
    batch_size: int = 4,
    max_new_tokens: int = 24,
) -> dict:
    """Table 1 on the NIH grid of `ctxaware nih` (`allocation.nih_prompts`, ``prompts="nih"``): `sweep_alpha`
    of mean recall."""
    from ctxaware.attention.allocation import nih_prompts
    from ctxaware.data.needle import NeedleConfig, keyword_recall
    from ctxaware.rendering.generate import generate

    keywords = NeedleConfig().keywords  # the needle that nih_prompts places

    prompts = {
        chat: nih_prompts(tok, lengths, depths, chat=chat, haystack=haystack, prompts="nih")
        for chat in (True, False)
    }
    per_cell: dict[str, list[float]] = {}

    def evaluate(alpha: float | None, chat: bool) -> float:
        bc = batch_context(model, heads, alpha) if alpha is not None else None
        gens = generate(model, tok, prompts[chat], max_new_tokens=max_new_tokens, batch_size=batch_size,
                        stop=("\n",), batch_context=bc, progress=False)  # fmt: skip
        scores = [keyword_recall(g.text, keywords) for g in gens]
        per_cell[f"{'chat' if chat else 'plain'}@{alpha}"] = scores
        return sum(scores) / len(scores)

    return sweep_alpha(evaluate, alphas) | {"per_cell": per_cell, "n_prompts": len(prompts[True])}
