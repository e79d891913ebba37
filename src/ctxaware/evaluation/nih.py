"""Needle in a haystack, with and without the chat template (paper Sec. 2.1, App. A.2, Tables 7-8, Fig. 2).

The runner and CLI. The prompts come from `ctxaware.data.needle` (haystack, needle, templates, the ``authors``
and ``ctxaware`` protocols, insertion, recall); this module generates, scores, resumes and reports.
Conditions (chat template on/off, response prefix on/off, ``[IND]`` on/off) are compared on the *same*
context.

    ctxaware nih --lengths 200,1000 --depths 0,50,100
    ctxaware nih --model smollm2-135m-instruct,gemma3-270m --n-lengths 10 --n-depths 10 --max-length 2000
    ctxaware nih --dump-prompts prompts.jsonl          # tokenizer only: the exact prompts, nothing run
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ctxaware.attention import steering
from ctxaware.attention.allocation import PrefillShares, mean_prefill_shares
from ctxaware.core import plotting, stats
from ctxaware.core.config import ModelConfig, overwrite_option, to_dict
from ctxaware.core.distributed import dist_info, launch_writer, run_units
from ctxaware.core.errors import CtxawareError
from ctxaware.core.models import middle_layer, run_id
from ctxaware.core.provenance import model_about
from ctxaware.core.results import ResultsWriter, atomic_path, write_json_atomic
from ctxaware.data.needle import (
    NeedleConfig,
    apply_chat_template_choice,
    build_prompts,
    check_protocol,
    dump_prompts,
    keyword_recall,
    load_haystack,
    load_needle,
    model_config,
    needle_position,
    templates,
)
from ctxaware.rendering.generate import generate
from ctxaware.rendering.server import BackendOptions


@dataclasses.dataclass
class NIHConfig(ModelConfig, NeedleConfig, BackendOptions):
    """Needle-in-a-haystack with and without the chat template (paper Sec. 2.1, App. A.2).

    Prompt options (protocol, haystack, needle, grid, templates, conditions, system, chat template) are
    those of `ctxaware.data.needle.NeedleConfig`; docs/nih.md tabulates both protocols.
    Parameters (run): max_new_tokens (50, paper App. A.3), batch_size, prefix_cache, output,
        steer/alpha (paper eq. 1), dump_prompts (write the prompts and stop; loads only the tokenizer),
        attention / attention_layers: every row also carries the last prompt token's attention per role
        (raw, paper, sink_excluded; head-mean and per head) at those layers, captured on the prefill of its
        own generation (`attention.PrefillShares`; unsteered conditions only).
    """

    max_new_tokens: int = dataclasses.field(
        default=50,
        metadata={"min": 1, "help": "greedy tokens per answer (paper App. A.3: up to 50, both protocols)"},
    )
    batch_size: int = dataclasses.field(
        default=8, metadata={"min": 1, "help": "prompts per generation batch"}
    )
    prefix_cache: bool = dataclasses.field(
        default=True, metadata={"help": "reuse the KV cache of shared prefixes"}
    )
    output: str = dataclasses.field(
        default="runs/nih", metadata={"path": "output_dir", "help": "results directory"}
    )
    steer: str | None = steering.steer_option()
    alpha: list[float] = steering.alphas_option()
    steer_generated: bool = steering.steer_generated_option()
    overwrite: bool = overwrite_option()
    dump_prompts: str | None = dataclasses.field(
        default=None,
        metadata={"help": "write every prompt as JSONL to this file and run nothing", "path": "output_file"},
    )
    attention: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "record each test's attention shares per role, read on the generation's own prefill"
        },
    )
    attention_layers: list[int] = dataclasses.field(
        default_factory=list, metadata={"help": "layers of --attention (empty: the middle layer)"}
    )


def new_tokens(cfg: NIHConfig) -> int:
    n = cfg.max_new_tokens
    if n < 1:
        raise CtxawareError(f"--max-new-tokens must be at least 1, got {n}")
    return n


def check(cfg: NIHConfig) -> None:
    """Every option that can be checked before a model loads."""
    check_protocol(cfg)
    load_needle(cfg), templates(cfg), load_haystack(cfg.haystack, cfg.protocol), new_tokens(cfg)
    steering.check_steer_options(cfg.steer, cfg.alpha)
    if cfg.backend == "server":
        cfg.server(cfg.model)  # the URL, before anything runs
        if cfg.steer is not None:
            raise CtxawareError("--steer changes the model's attention in process; it needs --backend hf")
    if cfg.chat_template not in ("model", "gemma") and not cfg.chat_template.endswith((".jinja", ".j2")):
        raise CtxawareError(f"--chat-template {cfg.chat_template!r} is not model, gemma or a .jinja file")
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise CtxawareError(f"--output {out} is a file; give a directory")


def preflight(cfg: NIHConfig, name: str) -> None:
    """What needs the tokenizer but not the model, before the model loads and before any output folder
    exists (so a corrected rerun is never refused as a different configuration): the chat template
    renders the grid's first prompt, and ``--attention-layers`` and the ``--steer`` heads name layers that
    the model's ``config.json`` has."""
    from ctxaware.attention.retrieval_heads import load_heads

    tok = cfg.load_tokenizer(name)
    apply_chat_template_choice(tok, cfg.chat_template)
    prompts = build_prompts(cfg, tok, run_id(name))
    for mode in dict.fromkeys(p.cell["mode"] for p in prompts):
        next(p for p in prompts if p.cell["mode"] == mode).render(tok)
    n_layers = model_config(tok).get("num_hidden_layers")
    if not n_layers:
        return
    wanted = list(cfg.attention_layers or [])
    if cfg.steer not in (None, "all"):
        wanted += list(load_heads(cfg.steer))
    bad = sorted({int(x) for x in wanted if not 0 <= int(x) < n_layers})
    if bad:
        raise CtxawareError(
            f"layer(s) {bad} do not exist: {run_id(name)} has layers 0..{n_layers - 1} "
            "(check --attention-layers and the --steer heads file)"
        )


# ---------------------------------------------------------------- run, summarise, plot


def _fingerprinted(cfg: NIHConfig, model: str) -> dict:
    """The options that change results (batching, prefix reuse and dumping do not), for `ResultsWriter`."""
    d = to_dict(cfg)
    for k in ("model", "output", "batch_size", "prefix_cache", "dump_prompts", "base_url", "concurrency",
              "prompt_format", "api_key_env"):  # how prompts travel, not what they are  # fmt: skip
        d.pop(k)
    if d["backend"] == "hf":  # the default engine: recorded as runs made before backends were
        d.pop("backend"), d.pop("served_model")
    d["max_new_tokens"] = new_tokens(cfg)
    if d["steer"] is None:
        d.pop("steer"), d.pop("alpha")
    if cfg.steer is None or cfg.steer_generated:  # eq. (1) as stated: as runs made before the option
        d.pop("steer_generated")
    return {**d, "model": run_id(model)}


def steered_prompts(cfg: NIHConfig, prompts: list) -> list[tuple[float, object]]:
    """With ``--steer``: every chat-template test again once per alpha, as condition ``<name>+steer<alpha>``
    (`steering.steered_condition`)."""
    if cfg.steer is None:
        return []
    alphas = cfg.alpha or list(steering.ALPHAS)  # 0 < alpha <= 1: the field's rule, checked when built
    out = []
    for a in alphas:
        for p in prompts:
            if p.cell["condition"].startswith("chat"):
                cell = {
                    **p.cell,
                    "condition": steering.steered_condition(p.cell["condition"], a, cfg.steer_generated),
                }
                out.append((a, p._replace(cell=cell)))
    return out


def run_model(cfg: NIHConfig, name: str) -> tuple[str, list[dict]]:
    """Run (or resume) every test for one model; rows go to ``output/<run id>/rows.jsonl`` as they finish."""
    needle, _, keywords, _ = load_needle(cfg)
    server = cfg.server(name)
    if server is None:
        model, tok = cfg.load(name)
        about = model_about(model, tok)
    else:  # the prompts are rendered here and generated by the server: no model in this process
        model, tok = (
            None,
            cfg.load_tokenizer(name),
        )
        about = server.about()
    apply_chat_template_choice(tok, cfg.chat_template)
    short = run_id(name)
    window = int(
        model_config(tok).get("max_position_embeddings", 0) if model is None else
        getattr(model.config, "max_position_embeddings", 0) or getattr(tok, "model_max_length", 10**6)
    ) or 10**6  # fmt: skip
    prompts = build_prompts(cfg, tok, short, window)
    steered = steered_prompts(cfg, prompts)
    alpha_of = {id(p): a for a, p in steered}
    prompts = prompts + [p for _, p in steered]
    keys = ("condition", "template", "length", "depth")
    rank, world = dist_info()  # under torchrun / accelerate launch: the groups are shared (core.distributed)
    run_dir = Path(cfg.output) / short
    writer, finished = launch_writer(run_dir, _fingerprinted(cfg, name), keys, about=about, kind="nih")
    # The unit of work is one engine call: every test of one length (and alpha). A group with any test
    # missing runs whole, so each test is computed beside the same companions (same padding, same prefix
    # cache) as in an uninterrupted run, and a resume is byte-identical at any kill point (issue 23 §5);
    # only the missing rows are written.
    group_of = {id(p): (p.cell["length"], alpha_of.get(id(p))) for p in prompts}
    missing = {group_of[id(p)] for p in prompts if not finished(p.cell)}
    todo = [p for p in prompts if group_of[id(p)] in missing]
    n_missing = sum(not finished(p.cell) for p in todo)
    rendered = [p.render(tok) for p in todo]
    total = sum(len(r) for r in rendered)
    print(
        f"{short}: {len(prompts)} tests ({cfg.protocol} protocol), {len(prompts) - n_missing} done before, "
        f"{n_missing} to run ({len(todo)} with their batch companions): {total:,} prompt tokens, up to "
        f"{new_tokens(cfg)} new tokens each",
        flush=True,
    )
    progress = {"tests": 0, "tokens": 0, "t0": time.time(), "estimated": False}

    def write(writer: ResultsWriter, idx: list[int], gens, part: list[int]) -> None:
        for j, g in zip(idx, gens):
            i = part[j]
            if writer.done(todo[i].cell):  # computed again only as a companion of a missing test
                if shares is not None:
                    shares.shares.pop(j, None)
                continue
            r, rec = rendered[i], keyword_recall(g.text, keywords)
            row = {
                **todo[i].cell,
                "n_prompt_tokens": len(r),
                "needle_token_pos": needle_position(r, tok, needle),
            }
            row.update(output=g.text, stop_reason=g.stop_reason, recall=rec, exact=float(rec == 1.0))
            if shares is not None and j in shares.shares:
                row["attention"] = shares.shares.pop(j)
            elif server is not None and cfg.attention:
                row["attention"] = None
                row["attention_not_measured"] = "generated by a server (--backend server): no local model"
            writer.write({**row, "empty": float(not g.text.strip())})
            progress["tests"] += 1
            progress["tokens"] += len(r)
        if not progress["estimated"] and progress["tokens"]:
            progress["estimated"] = True
            rate = (time.time() - progress["t0"]) / progress["tokens"]
            print(
                f"{short}: estimate {rate * total / 60:.1f} min for all {len(todo)} tests "
                f"(from the first {progress['tests']})",
                flush=True,
            )

    heads = _steering_heads(cfg, model)
    shares = None
    if cfg.attention and server is None:
        shares = PrefillShares(model, cfg.attention_layers or [middle_layer(model)])
    t0 = time.time()
    # one unit of work per length and alpha: one engine call, computed whole (a killed run leaves conditions
    # equally far along, and each test has the same batch companions on any number of ranks)
    units = [(length, alpha, [i for i, p in enumerate(todo) if p.cell["length"] == length
                              and alpha_of.get(id(p)) == alpha])
             for length in sorted({p.cell["length"] for p in todo})
             for alpha in dict.fromkeys(alpha_of.get(id(p)) for p in todo)]  # fmt: skip
    units = [u for u in units if u[2]]

    def compute(k: int, w: ResultsWriter) -> None:
        length, alpha, part = units[k]
        done = lambda idx, gens, part=part: write(w, idx, gens, part)  # noqa: E731
        if server is not None:
            server.generate(tok, [rendered[i] for i in part], max_new_tokens=new_tokens(cfg),
                            desc=f"nih {short} length {length} (server)", callback=done)  # fmt: skip
            return
        steer_ctx = None
        if alpha is not None:
            steer_ctx = steering.batch_context(model, heads, alpha, steer_generated=cfg.steer_generated)
        generate(
            model,
            tok,
            [rendered[i] for i in part],
            max_new_tokens=new_tokens(cfg),
            batch_size=cfg.batch_size,
            prefix_cache=cfg.prefix_cache,
            batch_context=steer_ctx,
            prefill_context=shares if alpha is None else None,
            desc=f"nih {short} length {length} [{progress['tests']}/{len(todo)} done]"
            + ("" if alpha is None else f" alpha={alpha:g}"),
            callback=done,
        )

    cells = [[todo[i].cell for i in part] for _, _, part in units]
    try:
        run_units(writer, run_dir, cells, compute, _fingerprinted(cfg, name), keys, about=about, kind="nih")
    finally:
        if writer is not None:
            writer.close()
    share = f" (rank {rank} of {world}: its share of the {len(units)} engine calls)" if world > 1 else ""
    print(f"{short}: {len(todo)} tests in {time.time() - t0:.0f}s{share}")
    if writer is None:  # another rank: rank 0 writes the merged rows and the summary
        return short, []
    return short, writer.rows


def _steering_heads(cfg: NIHConfig, model):
    """The heads of ``--steer``: ``all`` or a heads JSON (`retrieval_heads.load_heads` validates them)."""
    if cfg.steer is None:
        return None

    return steering.steer_heads(cfg.steer, model)


def steering_table(summaries: dict) -> str:
    """The paper's Table 1 from the summaries: baseline (template), best steered alpha, without template."""
    rows = {}
    for model, conds in summaries.items():
        parsed = {c: p for c in conds if (p := steering.parse_steered(c))}  # (base, alpha, steer_generated)
        if not parsed:
            continue
        base_name = next(iter(parsed.values()))[0]
        by_alpha = {p[1]: conds[c]["recall"]["mean"] for c, p in parsed.items() if p[0] == base_name}
        best = steering.best_alpha(by_alpha)
        plain = (
            conds.get(base_name.replace("chat", "plain", 1), {}).get("recall", {}).get("mean", float("nan"))
        )
        rows[f"{model} ({base_name})"] = {
            "baseline": conds[base_name]["recall"]["mean"] if base_name in conds else float("nan"),
            "steered": by_alpha[best],
            "best_alpha": best,
            "by_alpha": by_alpha,
            "no_template": plain,
        }
    return steering.table(rows) if rows else ""


PROMPT_KEY = ("condition", "template", "indicator", "depth", "context_tokens", "n_prompt_tokens")


def distinct_rows(rows: list[dict]) -> list[dict]:
    """One row per distinct prompt. Under the authors' protocol two budgets can give the same context (the
    200-token buffer: lengths 200 and 400 both give a 200-token context, and the same cut gives the same
    haystack), hence the same prompt and the same greedy answer; counting it twice would shrink the CI."""
    seen, out = set(), []
    for r in rows:
        # rows without the prompt's size (written by hand or by an old version) are told apart by length
        key = (
            tuple(r.get(k) for k in PROMPT_KEY)
            if "context_tokens" in r
            else (*(r.get(k) for k in PROMPT_KEY[:4]), r.get("length"))
        )
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def summarize(rows: list[dict]) -> dict:
    """Recall, recall error, exact match, empty-output rate, per-template means (Table 7), over distinct
    prompts. Recall (sevenths) gets the Wilson interval (exact when every value is 0 or 1), exact match the
    exact Clopper-Pearson one
    (`stats.summarize_proportion`); ``n_cells`` counts the grid cells, ``n`` the distinct prompts."""
    cells = len(rows)
    rows = distinct_rows(rows)
    recall = [r["recall"] for r in rows]
    s = {
        "recall": stats.summarize_proportion(recall),
        "exact": stats.summarize_proportion([r["exact"] for r in rows]),
        "empty_rate": float(np.mean([r["empty"] for r in rows])),
        "n": len(rows),
        "n_cells": cells,
    }
    rc = s["recall"]
    s["recall_error"] = {
        "mean": 1 - rc["mean"],
        "ci_low": 1 - rc["ci_high"],
        "ci_high": 1 - rc["ci_low"],
        "n": rc["n"],
        "interval": rc["interval"],
    }
    per_t = {
        t: float(np.mean([r["recall"] for r in rows if r["template"] == t]))
        for t in sorted({r["template"] for r in rows})
    }
    s["per_template"] = per_t
    att = mean_prefill_shares(rows)
    if att:
        s["attention"] = att
    if len(per_t) > 1:  # the spread over templates means something only when several ran
        s["template_mean"], s["template_std"] = (
            float(np.mean(list(per_t.values()))),
            float(np.std(list(per_t.values()))),
        )
    return s


def report(out: Path, model: str, rows: list[dict]) -> dict[str, dict]:
    """Per condition: ``summary.json`` and a depth x length heatmap; returns the summaries."""
    result = {}
    for cond in dict.fromkeys(r["condition"] for r in rows):
        rs = [r for r in rows if r["condition"] == cond]
        lengths, depths = sorted({r["length"] for r in rs}), sorted({r["depth"] for r in rs})
        cell = {}
        for r in rs:
            cell.setdefault((r["depth"], r["length"]), []).append(r["recall"])
        grid_ = [[float(np.mean(cell.get((d, n), [np.nan]))) for n in lengths] for d in depths]
        result[cond] = summarize(rs)
        if result[cond]["n"] < result[cond]["n_cells"]:
            print(f"note: {model} {cond}: {result[cond]['n_cells'] - result[cond]['n']} of "
                  f"{result[cond]['n_cells']} cells repeat another cell's prompt (the authors' 200-token buffer "
                  "gives several lengths one context); n and the CIs count distinct prompts")  # fmt: skip
        write_json_atomic(
            out / model / cond / "summary.json", {"model": model, "condition": cond, **result[cond]}
        )
        plotting.nih_heatmap(
            grid_,
            lengths,
            depths,
            out / model / cond / "heatmap.png",
            f"{model} {cond} ({rs[0].get('protocol', 'ctxaware')} protocol): "
            f"recall {100 * result[cond]['recall']['mean']:.1f}%, n={len(rs)}",
        )
    return result


def table(summaries: dict[str, dict[str, dict]]) -> str:
    """The Markdown summary table: recall (95% Wilson CI) and all-keywords rate (95% Clopper-Pearson CI) in
    %, over distinct prompts; the template spread only when several templates ran."""
    many = any("template_mean" in s for conds in summaries.values() for s in conds.values())
    head = ["model", "condition", "recall % [95% CI: exact when every value is 0 or 1, else Wilson]", "recall error %",
            "all-keywords % [95% exact CI]", "empty %"] + (["templates mean ± std"] if many else []) + ["n"]  # fmt: skip
    rows = []
    for model, conds in summaries.items():
        for cond, s in conds.items():
            spread = (f"{100 * s['template_mean']:.1f} ± {100 * s['template_std']:.1f}"
                      if "template_mean" in s else "one template")  # fmt: skip
            rows.append([model, cond, stats.fmt(s["recall"]), f"{100 * s['recall_error']['mean']:.1f}",
                         stats.fmt(s["exact"]), f"{100 * s['empty_rate']:.1f}"] + ([spread] if many else [])
                        + [s["n"]])  # fmt: skip
    return stats.markdown_table(head, rows)


def _dump(cfg: NIHConfig, names: list[str]) -> int:
    """``--dump-prompts``: tokenizers only, one JSON line per test, nothing generated."""

    path = Path(cfg.dump_prompts)
    if path.is_dir():
        raise CtxawareError(f"--dump-prompts {path} is a directory; give a file name")
    toks = []  # every tokenizer and template first: a bad name fails before anything is written
    for name in names:
        tok = cfg.load_tokenizer(name)
        apply_chat_template_choice(tok, cfg.chat_template)
        toks.append((name, tok))
    with atomic_path(path) as tmp:  # renamed into place when complete: an old file survives a failure
        for name, tok in toks:
            n = dump_prompts(cfg, tok, run_id(name), tmp, append=True)
            print(f"{run_id(name)}: {n} prompts written to {path}")
    return 0
