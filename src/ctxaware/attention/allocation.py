"""Attention allocation per role, with vs. without the chat template (paper Sec. 2.2, Fig. 3-4, App. B.2).

For a rendered prompt and query positions (default: the last prompt token, which generates the first
answer token), `role_allocation` returns for every layer and head the attention mass on each role of
`chat.ROLES` (sink, system, user, assistant, template). `normalizations` turns one raw mass-per-role into
the three views that ctxaware reports side by side (docs/attention.md):

* ``raw``: the mass on every role, summing to 1;
* ``paper``: sink, user and assistant renormalised to sum to 1 (paper Fig. 3-4, whose "BOS" is the
  attention sink: position 0, role ``sink``);
* ``sink_excluded``: system, user and assistant renormalised over the tokens that are neither the sink nor
  template markers (system is 0 without a system message), so that the sink, which is a user word in
  plain mode and a marker in chat mode, cannot decide the comparison.

Nothing materialises full attention maps: `intercept.capture_attention` computes softmax rows of the query
positions only and reduces them against one-hot roles at once, so memory grows linearly with length.

``ctxaware attention`` runs NIH prompts with and without the template (plain only for a model without
one), picks one retrieval head at the analysis layer by eq. (3) on the plain prompts (sink excluded unless
``--include-sink``), and writes ``allocation.json``, one JSONL row per prompt and the figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from ctxaware.attention.intercept import capture_attention
from ctxaware.core.config import ModelConfig, overwrite_option, to_dict
from ctxaware.core.distributed import dist_info, shard_tensors
from ctxaware.core.errors import CtxawareError
from ctxaware.core.models import model_shape
from ctxaware.data import needle  # NIH prompt construction (imports no attention module)
from ctxaware.rendering.chat import ROLES, Rendered

PAPER = ("sink", "user", "assistant")  # paper Fig. 3-4 (its BOS is the sink)
SINK_EXCLUDED = ("system", "user", "assistant")  # tokens that are neither sink nor template
NORMALIZATIONS = ("raw", "paper", "sink_excluded")


def pad_batch(prompts: Sequence[Rendered], positions: Sequence[Sequence[int]], pad_id: int):
    """Left-padded ``ids, mask (B, T)``, query ``rows (B, R)`` (-1 = none) and one-hot role ``groups (B, T, 5)``."""
    T = max(len(p) for p in prompts)
    R = max(len(q) for q in positions)
    B = len(prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    rows = torch.full((B, R), -1, dtype=torch.long)
    for i, (p, qs) in enumerate(zip(prompts, positions)):
        off = T - len(p)
        ids[i, off:] = torch.tensor(p.input_ids)
        mask[i, off:] = 1
        rows[i, : len(qs)] = torch.tensor([q + off for q in qs], dtype=torch.long)
    return ids, mask, rows, role_groups(prompts, T)


def role_groups(prompts: Sequence[Rendered], width: int) -> torch.Tensor:
    """One-hot `ROLES` of left-padded prompts, ``(B, width, 5)``; padding rows are all zero."""
    groups = torch.zeros(len(prompts), width, len(ROLES))
    for i, p in enumerate(prompts):
        groups[i, width - len(p) :] = torch.nn.functional.one_hot(p.role_ids(), len(ROLES)).float()
    return groups


@torch.inference_mode()
def role_allocation(
    model,
    prompts: Sequence[Rendered],
    layers: Sequence[int] | None = None,
    positions: Sequence[Sequence[int]] | None = None,
    batch_size: int = 4,
    pad_id: int = 0,
    desc: str | None = None,
    shard: tuple[str | Path, str] | None = None,
) -> torch.Tensor | None:
    """Attention mass per role: (N, L, H, 5) over `chat.ROLES`, averaged over each prompt's query ``positions``.
    ``desc``: show a progress bar (prompts done) with this label. ``shard = (output dir, name)``: under
    torchrun / accelerate launch the batches are shared by the ranks (`core.distributed.shard_tensors`);
    rank 0 returns the whole result, equal to one process's, and the other ranks ``None``.

    ``positions[i]`` are token indices of prompt i (default ``[len - 1]``: the token that generates the first
    answer token, as in the paper). ``layers`` default to all; the result's L follows ``layers``' order.
    Prompts are batched (sorted by length, left-padded) ``batch_size`` at a time.
    """
    positions = [[len(p) - 1] for p in prompts] if positions is None else [list(q) for q in positions]
    for i, (p, qs) in enumerate(zip(prompts, positions)):
        if not qs or any(not 0 <= q < len(p) for q in qs):
            raise CtxawareError(f"prompt {i}: query positions {qs} must lie in 0..{len(p) - 1}")
    n_layers, _ = model_shape(model)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[a : a + batch_size] for a in range(0, len(order), batch_size)]
    rank, world = dist_info() if shard is not None else (0, 1)
    mine = range(rank, len(batches), world)  # under a launch this rank computes these batches
    if desc is not None and world > 1:
        desc = f"{desc} [rank {rank}/{world}]"
    bar = tqdm(total=sum(len(batches[b]) for b in mine), desc=desc, unit="prompt", disable=desc is None)

    def one(b: int) -> torch.Tensor:  # (B, L, H, 5): each prompt of batch b, averaged over its queries
        idx = batches[b]
        ids, mask, rows, groups = pad_batch([prompts[i] for i in idx], [positions[i] for i in idx], pad_id)
        res = capture_attention(
            model, ids.to(device), mask.to(device), layers, rows, groups
        )  # {l: (B, H, R, 5)}
        stacked = torch.stack([res[layer].cpu() for layer in layers], dim=1)  # (B, L, H, R, 5)
        bar.update(len(idx))
        return torch.stack([stacked[j, :, :, : len(positions[i])].mean(2) for j, i in enumerate(idx)])

    if shard is None:
        parts = [one(b) for b in range(len(batches))]
    else:
        parts = shard_tensors(shard[0], shard[1], len(batches), one)
    bar.close()
    if parts is None:
        return None
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for idx, part in zip(batches, parts):
        for j, i in enumerate(idx):
            out[i] = part[j]
    return torch.stack(out)  # type: ignore[arg-type]


def role_shares(
    model, prompts: Sequence[Rendered], layer: int | None = None, head: int | None = None, **kw
) -> list[dict[str, float]]:
    """Per prompt, the attention of its query token (the last one) on each role, labelled ``{role: share}``
    over `chat.ROLES` (raw mass; `normalizations` gives the paper's views): at ``layer`` (default: the
    middle, the paper's analysis layer), averaged over heads or of one ``head``. `role_allocation` is the
    unlabelled (N, L, H, 5) tensor behind it."""
    from ctxaware.core.models import middle_layer

    layer = middle_layer(model) if layer is None else layer
    t = role_allocation(model, prompts, [layer], **kw)[:, 0]  # (N, H, 5)
    t = t.mean(1) if head is None else t[:, head]
    return [dict(zip(ROLES, map(float, row))) for row in t]


def renormalize(shares: torch.Tensor, roles: Sequence[str] = PAPER) -> torch.Tensor:
    """(..., 5) role mass -> (..., len(roles)) over ``roles`` summing to 1 (default: the paper's view)."""
    sub = shares[..., [ROLES.index(r) for r in roles]]
    return sub / sub.sum(-1, keepdim=True).clamp(min=1e-12)


def normalizations(raw_shares: Mapping[str, float] | torch.Tensor) -> dict[str, dict[str, float]]:
    """The three views of one attention mass per role: ``{"raw", "paper", "sink_excluded"}`` -> ``{role: share}``.

    ``raw_shares`` maps every role of `chat.ROLES` to its mass (missing roles are 0), or is a tensor of
    shape ``(5,)`` in `ROLES` order. ``raw`` is returned as given (all five roles); ``paper`` is sink, user
    and assistant divided by their sum (paper Fig. 3-4); ``sink_excluded`` is system, user and assistant
    divided by their sum. A view whose roles hold no mass is all zeros.
    """
    if isinstance(raw_shares, torch.Tensor):
        if raw_shares.shape != (len(ROLES),):
            raise CtxawareError(f"raw shares must have shape ({len(ROLES)},), got {tuple(raw_shares.shape)}")
        raw_shares = dict(zip(ROLES, raw_shares.tolist()))
    unknown = set(raw_shares) - set(ROLES)
    if unknown:
        raise CtxawareError(f"unknown roles {sorted(unknown)}; roles are {', '.join(ROLES)}")
    raw = {r: float(raw_shares.get(r, 0.0)) for r in ROLES}

    def over(roles: Sequence[str]) -> dict[str, float]:
        total = sum(raw[r] for r in roles)
        return {r: (raw[r] / total if total > 0 else 0.0) for r in roles}

    return {"raw": raw, "paper": over(PAPER), "sink_excluded": over(SINK_EXCLUDED)}


def mean_normalizations(rows: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean over prompts of per-prompt `normalizations` (each view averaged role by role)."""
    if not rows:
        raise CtxawareError("no prompts to average")
    return {k: {r: sum(row[k][r] for row in rows) / len(rows) for r in rows[0][k]} for k in NORMALIZATIONS}


class PrefillShares:
    """Attention shares per role of the last prompt token at ``layers``, read on `generate`'s own prefill.

    Pass an instance as ``prefill_context`` of `ctxaware.rendering.generate.generate`: around each batch it captures
    (`intercept.Capture` with rows ``"last"``, ``once``) the (H, 5) mass per role of the token that generates
    the first answer token, on the same forward pass that prefills the KV cache, at the cost of one softmax
    row per head and layer. ``shares[i]`` is then, for prompt ``i`` of the call, ``{layer: {"raw", "paper",
    "sink_excluded"}}`` (head-mean, `normalizations`) plus ``"heads"``: the raw (H, 5) mass in `ROLES` order.
    """

    def __init__(self, model, layers: Sequence[int]) -> None:
        n_layers, _ = model_shape(model)
        for layer in layers:
            check_layer(layer, n_layers)
        self.model, self.layers, self.shares = model, sorted(set(layers)), {}

    @contextlib.contextmanager
    def __call__(self, batch):
        from ctxaware.attention.intercept import Capture, intercepted

        groups = role_groups(batch.items, batch.input_ids.shape[1])
        cap = Capture(self.layers, "last", groups, stop_early=False, once=True)
        with intercepted(self.model, capture=cap):
            yield
        missing = [layer for layer in self.layers if layer not in cap.results]
        if missing:
            raise CtxawareError(f"attention capture never reached layers {missing} during the prefill")
        for j, i in enumerate(batch.indices):
            rec = {}
            for layer in self.layers:
                heads = cap.results[layer][j, :, 0].float().cpu()  # (H, 5)
                rec[str(layer)] = {**normalizations(heads.mean(0)),
                                   "heads": [[round(x, 5) for x in h] for h in heads.tolist()]}  # fmt: skip
            self.shares[i] = rec


def mean_prefill_shares(rows: Sequence[Mapping]) -> dict[str, dict[str, dict[str, float]]]:
    """``{layer: mean_normalizations}`` over rows that carry ``attention`` (NIH rows); ``{}`` when none do."""
    rows = [r["attention"] for r in rows if r.get("attention")]
    if not rows:
        return {}
    return {layer: mean_normalizations([r[layer] for r in rows]) for layer in rows[0]}


# --- prompts: the authors' attention-analysis script (default) or the NIH tester's -------------------------

PROMPT_STYLES = ("analysis", "nih")
ANALYSIS_PREFIX_WORDS = 9  # "The best thing to do in San Francisco is": the query is "is"


def needle_config(
    lengths: Sequence[int],
    depths: Sequence[float],
    modes: Sequence[str],
    haystack: str | Path = "auto",
    protocol: str = "authors",
    prompts: str = "analysis",
) -> needle.NeedleConfig:
    """The NIH cells of an attention measurement (docs/attention.md, protocol table).

    ``prompts="analysis"`` (default): the authors' attention-analysis script
    (``analyse_dataset/analyze_attention_distribution.py``, ``avg_attn_over_response=False``): template
    "initial", the answer opened by the needle's first 9 words so that the query (the last prompt token) is
    "is", the no-template text joining the user turn and the answer with one space, the chat text with an
    empty system turn (none for Gemma) and only the template's own BOS. ``prompts="nih"``: the very prompts
    of ``ctxaware nih`` (its tester's 8-word prefix, query "Francisco", a blank line before the prefix).
    """
    if prompts not in PROMPT_STYLES:
        raise CtxawareError(f"prompts {prompts!r} is not one of {', '.join(PROMPT_STYLES)}")
    cfg = needle.NeedleConfig(
        protocol=protocol,
        haystack=str(haystack),
        lengths=[int(n) for n in lengths],
        depths=[float(d) for d in depths],
        modes=list(modes),
        prefix=[True],
    )
    if prompts == "analysis":
        cfg.prefix_words, cfg.prefix_separator, cfg.chat_bos = ANALYSIS_PREFIX_WORDS, " ", "template"
    return cfg


def prompt_cells(tok, cfg: needle.NeedleConfig, prompts: str = "analysis") -> list:
    """`needle.NIHPrompt` s of ``cfg``; chat/plain twins share a context. Under ``analysis`` the prompts must
    end with the token "is" (the authors' script raises otherwise); all share the prefix, so the first is
    checked."""
    cells = needle.build_prompts(cfg, tok)
    if prompts == "analysis":
        for p in cells[:1]:
            r = p.render(tok)
            last = tok.decode(r.input_ids[-1:]).strip()
            if last != "is":
                raise CtxawareError(
                    f"the analysis prompt ends with {last!r}, not 'is': this tokenizer merges the response "
                    "prefix's last word; use --prompts nih"
                )
    return cells


def nih_prompts(
    tok,
    lengths: Sequence[int],
    depths: Sequence[float],
    chat: bool,
    haystack: str | Path = "auto",
    prompts: str = "analysis",
) -> list[Rendered]:
    """One rendered prompt per (length, depth) for attention work (`ctxaware heads`, the demo): the authors'
    analysis prompts by default, with (``chat``) or without the chat template."""
    cfg = needle_config(lengths, depths, ["chat" if chat else "plain"], haystack, prompts=prompts)
    return [p.render(tok) for p in prompt_cells(tok, cfg, prompts)]


def dump_prompts(cells: Sequence, path: str | Path) -> int:
    """``ctxaware attention --dump-prompts``: per prompt and condition the text, ids, every token's role and
    the query index (tokenizer only). ``cells``: ``(tokenizer, model_name, NIHPrompt)`` triples."""
    from ctxaware.core.results import write_jsonl_atomic

    rows = []
    for tok, model_name, p in cells:
        r = p.render(tok)
        c = p.cell
        rows.append({"model": model_name, "condition": c["mode"], "length": c["length"], "depth": c["depth"],
                     "prompt_text": r.text, "input_ids": r.input_ids, "roles": r.roles,
                     "query_index": len(r) - 1, "query_token": tok.decode(r.input_ids[-1:])})  # fmt: skip
    write_jsonl_atomic(Path(path), rows)
    return len(rows)


# --- the command -------------------------------------------------------------------------------------------


def sink_is_user(prompt) -> bool:
    """Whether position 0 of a Rendered prompt (the sink) is user content (plain mode without a BOS)."""
    return any(s.role == "user" and s.start == 0 < s.end for s in prompt.spans)


def eq3_user_share(shares: torch.Tensor, prompts, include_sink: bool = False) -> torch.Tensor:
    """The sum of eq. (3), ``sum_{x_i in U} Att_{h,l}(x_-1, x_i)``: (N, L, H) from role mass (N, L, H, 5).

    ``include_sink=False`` (default): U is the user-role tokens, which never include the sink (position 0).
    ``include_sink=True``: the paper's literal U, all user content, so the sink's mass is added for every
    prompt whose position 0 is user content (`sink_is_user`)."""
    user = shares[..., ROLES.index("user")]
    if include_sink:
        flag = torch.tensor([sink_is_user(p) for p in prompts], dtype=user.dtype)
        user = user + shares[..., ROLES.index("sink")] * flag.view(-1, *([1] * (user.dim() - 1)))
    return user


@dataclasses.dataclass
class AttentionConfig(ModelConfig):
    """Attention allocation per role on NIH prompts, with vs. without the chat template (paper Fig. 3-4).

    Parameters:
        model: one model or several separated by commas (each gets its own sub-directory of ``output``).
        lengths, depths: the NIH grid (paper: 200-4000 tokens x 0-100%).
        layer: the analysis layer (default: the middle layer).
        output: directory for ``allocation.json``, ``rows.jsonl`` and the PNGs.
        batch_size: prompts per forward pass.
        haystack: directory of haystack essays.
        protocol: NIH prompt protocol (authors or ctxaware, docs/nih.md).
        head_selection: ``prompt`` (paper App. B.3): each prompt's own eq. (3) head at the layer, chosen
            without the template and reused for the prompt's chat twin; ``mean``: one head for all prompts.
        include_sink: pick the retrieval head by eq. (3) as printed (sink counted as user when it is user
            content); by default the sink is excluded.
        chat_template: the template of the chat condition: the tokenizer's own, or Gemma's turn markers /
            a .jinja file for a base model (as ``ctxaware nih --chat-template``).
    """

    lengths: list[int] = dataclasses.field(
        default_factory=lambda: [400, 578, 756, 933, 1111, 1289, 1467, 1644, 1822, 2000],
        metadata={
            "min": 1,
            "help": "NIH context lengths (tokens; authors' protocol: a budget, 200 of it the buffer)",
        },
    )
    depths: list[float] = dataclasses.field(
        default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0],
        metadata={"min": 0, "max": 100, "help": "needle depths in %"},
    )
    prompts: Literal["analysis", "nih"] = dataclasses.field(
        default="analysis",
        metadata={
            "help": "analysis (the authors' attention script: 9-word prefix, query 'is', plain text joined "
            "by a space) or nih (the NIH tester's prompts: 8-word prefix, query 'Francisco', blank line)"
        },
    )
    overwrite: bool = overwrite_option()
    dump_prompts: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "write every prompt (text, ids, roles, query index) to this JSONL and exit; tokenizer only",
            "path": "output_file",
        },
    )
    layer: int | None = dataclasses.field(
        default=None, metadata={"min": 0, "help": "analysis layer; none: the middle layer"}
    )
    output: str = dataclasses.field(
        default="runs/attention", metadata={"path": "output_dir", "help": "output directory"}
    )
    batch_size: int = dataclasses.field(default=4, metadata={"min": 1, "help": "prompts per forward pass"})
    haystack: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "directory of .txt files, synthetic, or auto (the shared essays; an error when absent)"
        },
    )
    protocol: str = dataclasses.field(
        default="authors", metadata={"help": "NIH protocol: authors or ctxaware"}
    )
    head_selection: Literal["prompt", "mean"] = dataclasses.field(
        default="prompt",
        metadata={
            "help": "eq. (3) head per prompt (paper App. B.3) or one head for all prompts (argmax of the mean)"
        },
    )
    include_sink: bool = dataclasses.field(
        default=False,
        metadata={"help": "eq. (3) head choice with the sink counted as user (paper's literal rule)"},
    )
    chat_template: str = dataclasses.field(
        default="model",
        metadata={
            "path": "input_file",
            "help": "model (the tokenizer's; none: plain only), gemma, or a .jinja file",
        },
    )


def check_layer(layer: int | None, n_layers: int | None = None) -> None:
    """``--layer`` must name an existing layer (negative indices are refused, not wrapped)."""
    if layer is None:
        return
    if layer < 0 or (n_layers is not None and layer >= n_layers):
        top = f"0..{n_layers - 1}" if n_layers is not None else "0 or more"
        raise CtxawareError(f"--layer {layer} does not exist; the model has layers {top}")


def conditions_of(tok, name: str) -> list[str]:
    """``plain`` and, when the tokenizer has a chat template, ``chat``."""
    conds = ["plain"] + (["chat"] if getattr(tok, "chat_template", None) else [])
    if conds == ["plain"]:
        print(
            f"note: {name} has no chat template; only the plain condition is measured "
            "(--chat-template gemma|FILE.jinja gives it one)"
        )
    return conds


def layer_statistics(shares: dict, prompts: dict, heads: dict) -> dict:
    """Per layer: each condition's three views and the paired chat - plain difference, every value a mean
    over prompts with its bootstrap CI over prompts (`stats.summarize`). ``heads[l][i]`` is prompt i's
    eq. (3) head at layer l (chosen without the template, reused for the chat twin)."""
    from ctxaware.core.stats import summarize

    out = {}
    for layer, hs in heads.items():
        views = {c: [normalizations(shares[c][i, layer, h]) for i, h in enumerate(hs)] for c in shares}
        rec = {c: {v: {r: summarize([x[v][r] for x in views[c]]) for r in views[c][0][v]} for v in NORMALIZATIONS}
               for c in views}  # fmt: skip
        if "chat" in views:
            rec["chat_minus_plain"] = {
                v: {r: summarize([c[v][r] - p[v][r] for c, p in zip(views["chat"], views["plain"])])
                    for r in views["plain"][0][v]}
                for v in NORMALIZATIONS
            }  # fmt: skip
        out[str(layer)] = rec
    return out


def analyze(
    model, tok, cfg: AttentionConfig, name: str = "model", shard_dir: str | Path | None = None
) -> tuple[dict, list[dict], dict] | None:
    """One model: ``(allocation, rows, extra)``.

    ``allocation`` follows the ``allocation.json`` schema (docs/attention.md); ``rows`` hold one record
    per prompt (all three normalisations at its head, at the analysis layer and at every layer);
    ``extra`` holds the per-layer statistics (``layers``: means and bootstrap CIs over prompts) and the
    layer x head map of the change of the paper-normalised user share (chat minus plain).
    ``shard_dir``: under torchrun / accelerate launch the forward passes are shared by the ranks (their
    batches saved there until rank 0 has them); rank 0 returns the result, the other ranks ``None``.
    """
    from ctxaware.core.models import middle_layer

    n_layers, _ = model_shape(model)
    check_layer(cfg.layer, n_layers)
    layer = middle_layer(model) if cfg.layer is None else cfg.layer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    needle.apply_chat_template_choice(tok, cfg.chat_template)
    conds = conditions_of(tok, name)
    ncfg = needle_config(cfg.lengths, cfg.depths, conds, cfg.haystack, cfg.protocol, cfg.prompts)
    cells = prompt_cells(tok, ncfg, cfg.prompts)
    by_cond = {c: [p for p in cells if p.cell["mode"] == c] for c in conds}
    prompts = {c: [p.render(tok) for p in by_cond[c]] for c in conds}
    # keep only distinct prompts, before any forward pass: a repeated cell (two budgets with one context)
    # would count one prompt twice in n and in the CIs; its chat twin repeats too
    keep = sorted({tuple(r.input_ids): i for i, r in reversed(list(enumerate(prompts["plain"])))}.values())
    if len(keep) < len(prompts["plain"]):
        print(f"note: {len(prompts['plain']) - len(keep)} of the {len(prompts['plain'])} cells repeat another "
              "cell's prompt (lengths whose budget gives the same context); n counts distinct prompts")  # fmt: skip
        by_cond = {c: [by_cond[c][i] for i in keep] for c in conds}
        prompts = {c: [prompts[c][i] for i in keep] for c in conds}
    shares = {
        c: role_allocation(
            model,
            prompts[c],
            batch_size=cfg.batch_size,
            pad_id=pad,
            desc=f"attention {name} {c}",
            shard=None if shard_dir is None else (shard_dir, f"{name}-{c}"),
        )  # fmt: skip
        for c in conds
    }  # (N, L, H, 5)
    if any(v is None for v in shares.values()):
        return None  # a rank other than 0: its batches are saved for rank 0
    # eq. (3) on the prompts without the template (App. B.3): one head per prompt and layer ("we select the
    # retrieval head on layer 15 for each input prompt"), reused for its chat twin; --head-selection mean
    # picks one head for all prompts (argmax of the mean user share).
    user = eq3_user_share(shares["plain"], prompts["plain"], cfg.include_sink)  # (N, L, H)
    if cfg.head_selection == "mean":
        heads = {lyr: [int(user[:, lyr].mean(0).argmax())] * user.shape[0] for lyr in range(n_layers)}
    else:
        heads = {lyr: [int(h) for h in user[:, lyr].argmax(-1)] for lyr in range(n_layers)}
    layers = layer_statistics(shares, prompts, heads)
    rows: list[dict] = []
    allocation = {"model": name, "layer": layer, "n_prompts": len(keep), "prompts": cfg.prompts,
                  "interval": "95% percentile bootstrap over prompts (NIH cells of one haystack)",
                  "conditions": {}}  # fmt: skip
    for c in conds:
        for i, (p, r) in enumerate(zip(by_cond[c], prompts[c])):
            key = {"model": name, "condition": c, "length": p.cell["length"], "depth": p.cell["depth"]}
            by_layer = {str(lyr): {"head": heads[lyr][i], **normalizations(shares[c][i, lyr, heads[lyr][i]])}
                        for lyr in range(n_layers)}  # fmt: skip
            rows.append(key | {"layer": layer, "head": heads[layer][i], "tokens": len(r),
                               "query_token": tok.decode(r.input_ids[-1:])}
                        | by_layer[str(layer)] | {"layers": by_layer})  # fmt: skip
        per = [normalizations(shares[c][i, layer, h]) for i, h in enumerate(heads[layer])]
        head = max(set(heads[layer]), key=heads[layer].count)  # the most frequent head, for labels
        allocation["conditions"][c] = (
            {"head": head} | mean_normalizations(per) | {"ci": layers[str(layer)][c]}
        )
    if "chat" in conds:
        allocation["chat_minus_plain"] = layers[str(layer)]["chat_minus_plain"]
    extra = {"layers": layers}
    if "chat" in conds:
        u = PAPER.index("user")
        extra["user_change_layer_head"] = (
            renormalize(shares["chat"])[..., u].mean(0) - renormalize(shares["plain"])[..., u].mean(0)
        ).tolist()
    return allocation, rows, extra


def layers_markdown(layers: dict, view: str = "paper", role: str = "user") -> str:
    """A Markdown table over depth: each condition's ``view`` share of ``role`` and the paired chat - plain
    difference with its 95% bootstrap CI over prompts, then how many layers' CIs lie above / below zero."""
    from ctxaware.core.stats import fmt, markdown_table

    order = sorted(layers, key=int)
    conds = [c for c in ("plain", "chat") if c in layers[order[0]]]
    diff = "chat_minus_plain" in layers[order[0]]
    head = ["layer"] + [f"{c} {role} ({view})" for c in conds] + (["chat - plain [95% CI]"] if diff else [])
    rows, up, down = [], 0, 0
    for lyr in order:
        rec = layers[lyr]
        row = [lyr] + [f"{rec[c][view][role]['mean']:.3f}" for c in conds]
        if diff:
            d = rec["chat_minus_plain"][view][role]
            row.append(fmt(d, pct=False, digits=3))
            up += d["ci_low"] > 0
            down += d["ci_high"] < 0
        rows.append(row)
    text = markdown_table(head, rows)
    if diff:
        text += (f"\n\n{len(order)} layers: the CI of chat - plain lies above zero in {up}, below zero in {down}, "
                 f"and contains zero in {len(order) - up - down}.")  # fmt: skip
    return text + "\n"


def _figures(allocation: dict, extra: dict, out: Path) -> None:
    from ctxaware.core import plotting

    name, layer, n = allocation["model"], allocation["layer"], allocation["n_prompts"]
    conds = allocation["conditions"]
    head = next(iter(conds.values()))["head"]
    label = f"{name}\nlayer {layer}, head {head}, n={n}"
    shares = {k: {c: conds[c][k] for c in conds} for k in NORMALIZATIONS}
    plotting.normalization_panels(
        shares,
        out / "allocation.png",
        f"{name}: attention per role, layer {layer} head {head}, n={n} prompts each",
    )
    plotting.role_share_bars({label: {c: conds[c]["paper"] for c in conds}}, out / "fig4_shares.png")
    if "chat" in conds:
        change = {r: conds["chat"]["paper"][r] - conds["plain"]["paper"][r] for r in PAPER}
        plotting.role_change_bars({label: change}, out / "fig3_change.png")
        plotting.head_heatmaps(
            {f"{name}, n={n}": extra["user_change_layer_head"]}, out / "user_change_heatmap.png"
        )
    layers = extra["layers"]
    order = sorted(layers, key=int)

    def curve(cond: str, view: str = "paper", role: str = "user") -> list[tuple[float, float, float]]:
        return [
            tuple(layers[lyr][cond][view][role][k] for k in ("mean", "ci_low", "ci_high")) for lyr in order
        ]

    panels = {"user share (paper view), eq. (3) head per prompt and layer": {c: curve(c) for c in conds}}
    if "chat" in conds:
        panels["chat - plain (paired, per prompt)"] = {"difference": curve("chat_minus_plain")}
    plotting.layer_curves(
        panels,
        [int(x) for x in order],
        out / "layers.png",
        f"{name}: attention to user tokens by layer, n={n}",
    )


def _model_dir_name(spec: str) -> str:
    from ctxaware.core.models import resolve_model

    return resolve_model(spec).name


def run_one(cfg: AttentionConfig, spec: str, where: Path, name: str | None = None) -> dict:
    """One model: load it, analyse, write ``where/allocation.json``, ``rows.jsonl`` and the figures."""
    from ctxaware.core.provenance import model_about
    from ctxaware.core.results import ResultsWriter, write_json_atomic, write_text_atomic

    model, tok = cfg.load(spec)
    check_layer(cfg.layer, model_shape(model)[0])
    result = analyze(model, tok, cfg, name or _model_dir_name(spec), shard_dir=where)
    if result is None:  # under a launcher, a rank other than 0: rank 0 writes the run
        return {}
    allocation, rows, extra = result
    with ResultsWriter(
        where,
        {**to_dict(cfg), "model": spec},
        ("model", "condition", "length", "depth"),
        about=model_about(model, tok),
        kind="attention",
    ) as w:
        for row in rows:
            if not w.done(row):
                w.write(row)
    write_json_atomic(where / "allocation.json", allocation)
    write_json_atomic(
        where / "layers.json",
        {"model": allocation["model"], "n_prompts": allocation["n_prompts"], "interval": allocation["interval"],
         "layers": extra["layers"]},
    )  # fmt: skip
    write_text_atomic(where / "layers.md", layers_markdown(extra["layers"]))
    _figures(allocation, extra, where)
    shutil.rmtree(where / ".ranks", ignore_errors=True)  # a launch's batches: every one is in the result
    return allocation
