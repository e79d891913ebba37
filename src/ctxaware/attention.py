"""Attention allocation per role, with vs. without the chat template (paper Sec. 2.2, Fig. 3-4, App. B.2).

For a rendered prompt and query positions (default: the last prompt token, which generates the first
answer token), `role_allocation` returns for every layer and head the attention mass on each role of
`chat.ROLES` (bos, system, user, assistant, template). `renormalise` gives the paper's view: template
tokens excluded, bos + user + assistant summed to 1.

Nothing materialises full attention maps: `intercept.capture_attention` computes softmax rows of the query
positions only and reduces them against one-hot roles at once, so memory grows linearly with length.

``ctxaware attention`` runs NIH prompts with and without the template, picks the retrieval head (eq. 3)
of each prompt without the template at a middle layer, averages, and writes JSON plus the figures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from ctxaware.chat import ROLES, Rendered
from ctxaware.config import ModelConfig, parse_config, to_dict
from ctxaware.errors import CtxawareError
from ctxaware.intercept import capture_attention

SHOWN = ("bos", "user", "assistant")  # the paper's renormalised roles


def _model_shape(model) -> tuple[int, int]:
    cfg = getattr(model.config, "text_config", None) or model.config
    return cfg.num_hidden_layers, cfg.num_attention_heads


def pad_batch(prompts: Sequence[Rendered], positions: Sequence[Sequence[int]], pad_id: int):
    """Left-padded ``ids, mask (B, T)``, query ``rows (B, R)`` (-1 = none) and one-hot role ``groups (B, T, 5)``."""
    T = max(len(p) for p in prompts)
    R = max(len(q) for q in positions)
    B = len(prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    rows = torch.full((B, R), -1, dtype=torch.long)
    groups = torch.zeros(B, T, len(ROLES))
    for i, (p, qs) in enumerate(zip(prompts, positions)):
        off = T - len(p)
        ids[i, off:] = torch.tensor(p.input_ids)
        mask[i, off:] = 1
        rows[i, : len(qs)] = torch.tensor([q + off for q in qs], dtype=torch.long)
        groups[i, off:] = torch.nn.functional.one_hot(p.role_ids(), len(ROLES)).float()  # (T_i, 5)
    return ids, mask, rows, groups


@torch.inference_mode()
def role_allocation(
    model,
    prompts: Sequence[Rendered],
    layers: Sequence[int] | None = None,
    positions: Sequence[Sequence[int]] | None = None,
    batch_size: int = 4,
    pad_id: int = 0,
) -> torch.Tensor:
    """Attention mass per role: (N, L, H, 5) over `chat.ROLES`, averaged over each prompt's query ``positions``.

    ``positions[i]`` are token indices of prompt i (default ``[len - 1]``: the token that generates the first
    answer token, as in the paper). ``layers`` default to all; the result's L follows ``layers``' order.
    Prompts are batched (sorted by length, left-padded) ``batch_size`` at a time.
    """
    positions = [[len(p) - 1] for p in prompts] if positions is None else [list(q) for q in positions]
    for i, (p, qs) in enumerate(zip(prompts, positions)):
        if not qs or any(not 0 <= q < len(p) for q in qs):
            raise CtxawareError(f"prompt {i}: query positions {qs} must lie in 0..{len(p) - 1}")
    n_layers, _ = _model_shape(model)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        ids, mask, rows, groups = pad_batch([prompts[i] for i in idx], [positions[i] for i in idx], pad_id)
        res = capture_attention(
            model, ids.to(device), mask.to(device), layers, rows, groups
        )  # {l: (B, H, R, 5)}
        stacked = torch.stack([res[layer].cpu() for layer in layers], dim=1)  # (B, L, H, R, 5)
        for j, i in enumerate(idx):
            out[i] = stacked[j, :, :, : len(positions[i])].mean(2)  # (L, H, 5)
    return torch.stack(out)  # type: ignore[arg-type]


def renormalise(shares: torch.Tensor) -> torch.Tensor:
    """The paper's view (Fig. 3-4): (..., 5) role mass -> (..., 3) over bos, user, assistant summing to 1."""
    sub = shares[..., [ROLES.index(r) for r in SHOWN]]  # (..., 3)
    return sub / sub.sum(-1, keepdim=True).clamp(min=1e-12)


# --- NIH prompts: the very prompts of `ctxaware nih` -------------------------------------------------------


def nih_prompts(
    tok, lengths: Sequence[int], depths: Sequence[float], chat: bool, haystack: str | Path = "auto"
) -> list[Rendered]:
    """One NIH prompt per (length, depth) (paper Fig. 1), built by `ctxaware.nih.build_prompts` with its
    default needle, template 1 of Table 8 and the response prefix, rendered with (``chat``) or without the
    chat template. Same haystack, needle placement and lengths as `ctxaware nih`."""
    from ctxaware import nih

    mode = "chat" if chat else "plain"
    cfg = nih.NIHConfig(
        lengths=[int(n) for n in lengths], depths=[float(d) for d in depths], modes=[mode], prefix=[True]
    )
    cfg.haystack = str(haystack)
    return [p.render(tok) for p in nih.build_prompts(cfg, tok)]


# --- the command -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AttentionConfig(ModelConfig):
    """Attention allocation per role on NIH prompts, with vs. without the chat template (paper Fig. 3-4).

    Parameters:
        model: one model or several separated by commas (compared in one figure).
        lengths, depths: the NIH grid (paper: 200-4000 tokens x 0-100%).
        layer: the analysis layer (default: the middle layer).
        output: directory for ``attention.json`` and the PNGs.
        batch_size: prompts per forward pass.
        haystack: directory of haystack essays.
    """

    lengths: list[int] = dataclasses.field(
        default_factory=lambda: [200, 650, 1100, 1550, 2000],
        metadata={"help": "NIH context lengths (tokens)"},
    )
    depths: list[float] = dataclasses.field(
        default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0], metadata={"help": "needle depths in %"}
    )
    layer: int | None = dataclasses.field(default=None, metadata={"help": "analysis layer (default: middle)"})
    output: str = dataclasses.field(default="runs/attention", metadata={"help": "output directory"})
    batch_size: int = dataclasses.field(default=4, metadata={"help": "prompts per forward pass"})
    haystack: str = dataclasses.field(
        default="auto",
        metadata={"help": "directory of .txt files, synthetic, or auto (the shared essays when present)"},
    )


def analyse(model, tok, cfg: AttentionConfig) -> dict:
    """Allocation with vs. without template for one model: numbers at the layer's retrieval head + heatmap."""
    from ctxaware.models import middle_layer

    layer = middle_layer(model) if cfg.layer is None else cfg.layer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    runs = {}
    for chat in (False, True):
        prompts = nih_prompts(tok, cfg.lengths, cfg.depths, chat=chat, haystack=cfg.haystack)
        runs[chat] = role_allocation(model, prompts, batch_size=cfg.batch_size, pad_id=pad)  # (N, L, H, 5)
    user = ROLES.index("user")
    head = runs[False][:, layer, :, user].argmax(-1)  # (N,) eq. (3) per prompt, without template
    pick = torch.arange(len(head))

    def at_head(x: torch.Tensor) -> torch.Tensor:
        return x[pick, layer, head]  # (N, 5)

    absolute = {name: at_head(runs[c]).mean(0) for name, c in (("plain", False), ("chat", True))}
    norm = {name: renormalise(at_head(runs[c])).mean(0) for name, c in (("plain", False), ("chat", True))}
    change = renormalise(runs[True])[..., 1].mean(0) - renormalise(runs[False])[..., 1].mean(0)  # (L, H) user
    return {
        "layer": layer,
        "n_prompts": len(head),
        "heads_per_prompt": head.tolist(),
        "absolute": {k: dict(zip(ROLES, v.tolist())) for k, v in absolute.items()},
        "renormalised": {k: dict(zip(SHOWN, v.tolist())) for k, v in norm.items()},
        "change": {r: norm["chat"][i].item() - norm["plain"][i].item() for i, r in enumerate(SHOWN)},
        "user_change_layer_head": change.tolist(),
    }


def main(argv: list[str]) -> int:
    """``ctxaware attention``: JSON numbers and Fig. 3, Fig. 4 and a layer x head heatmap per model."""
    import time

    from ctxaware import plotting
    from ctxaware.results import write_json_atomic

    cfg = parse_config(AttentionConfig, argv, prog="ctxaware attention")
    out = Path(cfg.output)
    results = {}
    for name in [m.strip() for m in cfg.model.split(",") if m.strip()]:
        t0 = time.time()
        model, tok = cfg.load(name)
        results[name] = analyse(model, tok, cfg) | {"seconds": round(time.time() - t0, 1)}
        print(f"{name}: layer {results[name]['layer']} change {results[name]['change']}")
        del model
    write_json_atomic(out / "attention.json", {"config": to_dict(cfg), "models": results})
    change = {m: r["change"] for m, r in results.items()}
    shares = {m: r["renormalised"] for m, r in results.items()}
    plotting.role_change_bars(change, out / "fig3_change.png")
    plotting.role_share_bars(shares, out / "fig4_shares.png")
    plotting.head_heatmaps(
        {m: r["user_change_layer_head"] for m, r in results.items()}, out / "user_change_heatmap.png"
    )
    print(f"wrote {out / 'attention.json'} and figures")
    return 0
