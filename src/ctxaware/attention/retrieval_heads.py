"""Context retrieval heads (paper eq. 3) and head configurations as JSON ``{layer: [heads]}`` (PASTA's format).

Eq. (3): on each layer l, the retrieval head is ``h* = argmax_h sum_{x_i in U} Att_{h,l}(x_-1, x_i)``, the
head that puts the most attention on user tokens when the last prompt token generates the first answer
token. The paper picks one head per layer from a sampled NIH prompt without the chat template and steers
all of them (Sec. 2.3, App. B.3). `top_heads` also gives the top-k per layer, averaged over prompts.

The attention sink. Without the template, SmolLM2's position 0 is a user word, and most heads park most
of their mass there (the attention sink), so the literal rule picks sink-dominated heads. By default U
excludes the sink (`chat.ROLES`' ``sink``: position 0 of every prompt), i.e. U is the user tokens from
position 1 on; ``include_sink=True`` (``--include-sink``) keeps the paper's literal rule, in which position
0 belongs to U whenever it is user content (plain prompts without a BOS). See `eq3_user_share`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import torch

from ctxaware.attention.allocation import eq3_user_share, role_allocation, sink_is_user  # noqa: F401
from ctxaware.core.config import ModelConfig, overwrite_option
from ctxaware.core.errors import CtxawareError
from ctxaware.core.models import model_shape
from ctxaware.core.results import write_json_atomic

Heads = dict[int, list[int]]
HeadsSpec = Heads | str


def all_heads(model) -> Heads:
    """Every head of every layer."""
    n_layers, n_heads = model_shape(model)
    return {layer: list(range(n_heads)) for layer in range(n_layers)}


def check_heads(heads: HeadsSpec, model) -> Heads:
    """``heads`` as ``{int layer: sorted unique heads}``; ``"all"`` expands. Bad layers/heads raise."""
    if isinstance(heads, str):
        if heads != "all":
            raise CtxawareError(
                f"heads={heads!r}: give 'all' or a mapping {{layer: [head, ...]}} (or load_heads(path))"
            )
        return all_heads(model)
    if not isinstance(heads, dict) or not heads:
        raise CtxawareError("heads must be a non-empty mapping {layer: [head, ...]} or 'all'")
    n_layers, n_heads = model_shape(model)
    out: Heads = {}
    for k, hs in heads.items():
        try:
            layer = int(k)
            hs = [int(h) for h in (hs if isinstance(hs, (list, tuple)) else [hs])]
        except (TypeError, ValueError):
            raise CtxawareError(
                f"heads entry {k!r}: {hs!r} is not an integer layer with a list of integer heads"
            ) from None
        if not 0 <= layer < n_layers:
            raise CtxawareError(f"layer {layer} does not exist; the model has layers 0..{n_layers - 1}")
        bad = [h for h in hs if not 0 <= h < n_heads]
        if bad or not hs:
            raise CtxawareError(
                f"layer {layer}: heads {bad or hs} do not exist; the model has heads 0..{n_heads - 1}"
            )
        out[layer] = sorted(set(hs))
    return dict(sorted(out.items()))


def top_heads(user_share: torch.Tensor, k: int = 1, layers: list[int] | None = None) -> Heads:
    """Eq. (3) per layer from ``user_share`` (L, H) (or (N, L, H), averaged): the k heads with most user attention."""
    if user_share.dim() == 3:
        user_share = user_share.mean(0)  # (L, H)
    n_layers, n_heads = user_share.shape
    if not 1 <= k <= n_heads:
        raise CtxawareError(f"k={k} must be between 1 and the number of heads ({n_heads})")
    idx = user_share.topk(k, dim=-1).indices  # (L, k)
    return {
        layer: sorted(idx[layer].tolist()) for layer in (layers if layers is not None else range(n_layers))
    }


def find_heads(
    model,
    prompts,
    k: int = 1,
    layers: list[int] | None = None,
    batch_size: int = 4,
    include_sink: bool = False,
    desc: str | None = None,
) -> Heads:
    """Retrieval heads of ``model`` on ``prompts`` (Rendered; the paper uses one NIH prompt without template).

    ``include_sink``: the paper's literal rule (see `eq3_user_share`); default: the sink is not in U."""
    shares = role_allocation(model, prompts, batch_size=batch_size, desc=desc)  # (N, L, H, 5); desc: a bar
    return top_heads(eq3_user_share(shares, prompts, include_sink), k=k, layers=layers)


def save_heads(heads: Heads, path: str | Path) -> Path:
    """Write ``{layer: [heads]}`` JSON (PASTA's format; keys are strings in JSON)."""
    return write_json_atomic(path, {str(layer): list(hs) for layer, hs in sorted(heads.items())})


def load_heads(path: str | Path, model=None) -> Heads:
    """Read a ``{layer: [heads]}`` JSON file; with ``model``, layers and heads are checked against it."""
    p = Path(path)
    if not p.is_file():
        raise CtxawareError(f"head config {p} does not exist; create one with `ctxaware heads --output {p}`")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CtxawareError(
            f"head config {p} is not valid JSON ({e.msg}); expected {{layer: [heads]}}"
        ) from None
    if raw == "all":
        return check_heads("all", model) if model is not None else raw
    if model is not None:
        return check_heads(raw, model)
    if not isinstance(raw, dict):
        raise CtxawareError(f"head config {p} must hold a mapping {{layer: [heads]}}")
    try:
        return {int(k): [int(h) for h in v] for k, v in raw.items()}
    except (TypeError, ValueError):
        raise CtxawareError(f"head config {p} must map integer layers to lists of integer heads") from None


@dataclasses.dataclass
class HeadsConfig(ModelConfig):
    """Find retrieval heads (eq. 3) on sampled NIH prompts without the chat template and save them as JSON.

    Parameters:
        output: path of the JSON ``{layer: [heads]}`` file.
        k: heads per layer (the paper: 1).
        all_heads: write every head of every layer instead.
        lengths, depths: the NIH prompts used (the paper samples one prompt).
        chat: use the chat template (the paper finds heads without it).
        haystack: directory of haystack essays.
        include_sink: count the sink (position 0) as user when it is user content (the paper's literal
            eq. 3); by default it is excluded, so sink-dominated heads are not picked.
    """

    output: str = dataclasses.field(
        default="runs/heads.json", metadata={"path": "output_file", "help": "where to write {layer: [heads]}"}
    )
    overwrite: bool = overwrite_option()
    k: int = dataclasses.field(default=1, metadata={"min": 1, "help": "heads per layer"})
    all_heads: bool = dataclasses.field(default=False, metadata={"help": "select every head of every layer"})
    lengths: list[int] = dataclasses.field(
        default_factory=lambda: [1000], metadata={"min": 1, "help": "NIH context lengths"}
    )
    depths: list[float] = dataclasses.field(
        default_factory=lambda: [50.0], metadata={"min": 0, "max": 100, "help": "needle depths in %"}
    )
    chat: bool = dataclasses.field(default=False, metadata={"help": "render prompts with the chat template"})
    include_sink: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "eq. (3) as printed: position 0 counts as user when it is user content (default: excluded)"
        },
    )
    haystack: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "directory of .txt files, synthetic, or auto (the shared essays; an error when absent)"
        },
    )
    prompts: Literal["analysis", "nih"] = dataclasses.field(
        default="analysis",
        metadata={"help": "analysis (the authors' attention script: query 'is') or nih (the NIH tester's)"},
    )
