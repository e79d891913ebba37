"""RULER-class retrieval, chat vs plain, with attention in every row: ``ctxaware ruler`` (issue 28).

For every task and length, ``n`` examples are generated (`ctxaware.data.ruler`), each rendered in the
paired conditions ``chat+prefix``, ``plain+prefix``, ``chat`` and ``plain``: the same haystack and needles
in a chat prompt and its plain twin (the haystack is sized so that the longest rendering plus the new
tokens fits the length, RULER's meaning of length). RULER's answer prefix starts the answer: after the
assistant header in chat, right after the question in plain (RULER's ``base`` template). Each row holds the
output, the task's score (RULER's ``string_match_all``, HELMET's substring match for ``json_kv``) and the
attention shares of the last prompt token per role at the analysis layer (raw, paper, sink-excluded), read
on the generation's own prefill, as NIH rows do.

The summary gives, per task and length, each condition's score with its interval and the paired
differences ``chat+prefix - plain+prefix`` and ``chat - plain`` with a paired bootstrap CI over the same
examples (the unit resampled is the example: one haystack and its needles; n counts distinct prompts).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Collection
from pathlib import Path

from ctxaware.attention import steering
from ctxaware.attention.allocation import PrefillShares
from ctxaware.core.config import TORCHRUN_N, ModelConfig, overwrite_option, to_dict
from ctxaware.core.distributed import launch_writer, run_units
from ctxaware.core.errors import CtxawareError
from ctxaware.core.models import middle_layer, run_id
from ctxaware.core.provenance import model_about
from ctxaware.core.results import ResultsWriter, read_jsonl, write_json_atomic, write_text_atomic
from ctxaware.core.stats import fmt, markdown_table, summarize, summarize_proportion
from ctxaware.data import ruler
from ctxaware.data.needle import apply_chat_template_choice, default_window, haystack_files, load_haystack
from ctxaware.rendering.chat import render, with_empty_system
from ctxaware.rendering.generate import generate

CONDITIONS = {"chat+prefix": ("chat", True), "plain+prefix": ("plain", True), "chat": ("chat", False),
              "plain": ("plain", False)}  # fmt: skip
PAIRS = (("chat+prefix", "plain+prefix"), ("chat", "plain"))


@dataclasses.dataclass
class RulerConfig(ModelConfig):
    """RULER-class retrieval under the paired chat/plain conditions.

    Parameters:
        tasks: `ctxaware.data.ruler.TASKS` names (RULER's niah_* and vt, HELMET's json_kv).
        lengths: prompt lengths in tokens (the whole prompt plus the new tokens, as RULER).
        n: examples per task and length (each one haystack with its needles, in every condition).
        conditions: which of chat+prefix, plain+prefix, chat, plain.
        layer: the attention analysis layer (default: the middle layer).
    """

    tasks: list[str] = dataclasses.field(
        default_factory=lambda: ["niah_single_2", "niah_multikey_2", "niah_multivalue", "vt", "json_kv"],
        metadata={"help": "RULER / HELMET tasks (ctxaware.data.ruler.TASKS)"},
    )
    lengths: list[int] = dataclasses.field(
        default_factory=lambda: [1024, 2048], metadata={"help": "prompt lengths in tokens", "min": 64}
    )
    n: int = dataclasses.field(
        default=20,
        metadata={"help": "examples per task and length" + TORCHRUN_N, "min": 1, "aliases": ["--n-examples"]},
    )
    conditions: list[str] = dataclasses.field(
        default_factory=lambda: list(CONDITIONS), metadata={"help": "chat+prefix, plain+prefix, chat, plain"}
    )
    seed: int = dataclasses.field(default=42, metadata={"help": "examples are deterministic from the seed"})
    haystack: str = dataclasses.field(
        default="auto", metadata={"help": "essay haystack: auto (the Paul Graham essays) or a folder of .txt"}
    )
    system: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "chat system turn: auto (empty, as ctxaware nih under the authors' protocol), default "
            "(the template's own, e.g. SmolLM2's 'You are a helpful AI assistant named SmolLM')"
        },
    )
    chat_template: str = dataclasses.field(
        default="model",
        metadata={"help": "model (the tokenizer's), gemma, or a .jinja file", "path": "input_file"},
    )
    layer: int | None = dataclasses.field(
        default=None, metadata={"help": "attention analysis layer (default: the middle layer)", "min": 0}
    )
    attention: bool = dataclasses.field(default=True, metadata={"help": "attention shares in every row"})
    steer: str | None = steering.steer_option()
    alpha: list[float] = steering.alphas_option()
    steer_generated: bool = steering.steer_generated_option()
    steer_conditions: list[str] = dataclasses.field(
        default_factory=lambda: ["chat"], metadata={"help": "chat conditions steered with --steer"}
    )
    batch_size: int = dataclasses.field(
        default=8, metadata={"help": "prompts per generation batch", "min": 1}
    )
    output: str = dataclasses.field(
        default="runs/ruler", metadata={"help": "output directory", "path": "output_dir"}
    )
    overwrite: bool = overwrite_option()
    dump_prompts: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "write every prompt to this JSONL and exit (tokenizer only)",
            "path": "output_file",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for t in self.tasks:
            if t not in ruler.TASKS:
                raise CtxawareError(f"--tasks: {t!r} is not one of {', '.join(ruler.TASKS)}")
        for c in self.conditions:
            if c not in CONDITIONS:
                raise CtxawareError(f"--conditions: {c!r} is not one of {', '.join(CONDITIONS)}")
        steering.check_steer_options(self.steer, self.alpha)
        for c in self.steer_conditions if self.steer else []:
            if c not in self.conditions or CONDITIONS[c][0] != "chat":
                raise CtxawareError(f"--steer-conditions: {c!r} is not a chat condition of --conditions")


def render_condition(ex: ruler.RulerExample, tok, condition: str, system: str = "auto"):
    """One example in one condition: RULER's answer prefix (with its leading space) after the assistant
    header in chat, directly after the question in plain (RULER's base template). ``system``: ``auto`` puts
    an empty system turn first where the template accepts one (so no default system prompt enters)."""
    mode, prefix = CONDITIONS[condition]
    msgs = [{"role": "user", "content": ex.user}]
    if mode == "chat" and system == "auto":
        msgs = with_empty_system(msgs, tok)
    if not prefix:
        return render(msgs, tok, mode)
    if mode == "chat":
        return render(msgs, tok, "chat", response_prefix=" " + ex.answer_prefix)
    return render(msgs, tok, "plain", response_prefix=" " + ex.answer_prefix, prefix_separator="")


def check_window(cfg: RulerConfig, window: int, name: str) -> None:
    """RULER's lengths run up to the model's window, not past it: a longer one is refused in one line."""
    too_long = [n for n in cfg.lengths if n > window]
    if too_long:
        raise CtxawareError(f"--lengths {','.join(map(str, too_long))}: longer than {name}'s window of {window} "
                            f"tokens (max_position_embeddings); give lengths up to {window}")  # fmt: skip


def build_examples(cfg: RulerConfig, tok) -> list[tuple[ruler.RulerExample, int, dict]]:
    """``(example, length, {condition: Rendered})`` for every task, length and index; the haystack size is
    the largest whose longest rendering plus the new tokens fits the length."""
    essay: list[str] = []
    if any(ruler.TASKS[t].haystack == "essay" for t in cfg.tasks):
        essay = ruler.essay_sentences(load_haystack(cfg.haystack)[0])
    out = []
    for name in cfg.tasks:
        task = ruler.TASKS[name]
        for length in cfg.lengths:
            for i in range(cfg.n):

                def count(size: int, i: int = i, task: ruler.RulerTask = task) -> int:
                    ex = ruler.make_example(task, size, cfg.seed, i, essay)
                    return max(len(render_condition(ex, tok, c, cfg.system)) for c in cfg.conditions)

                limit = len(essay) if task.haystack == "essay" else 1 << 16
                size = ruler.fit_size(count, length - task.new_tokens, limit=limit)
                if size == 0:
                    raise CtxawareError(f"{name} at length {length}: even the smallest prompt is longer than "
                                        f"{length - task.new_tokens} tokens; give longer --lengths")  # fmt: skip
                ex = ruler.make_example(task, size, cfg.seed, i, essay)
                out.append(
                    (ex, length, {c: render_condition(ex, tok, c, cfg.system) for c in cfg.conditions})
                )
    return out


def _fingerprinted(cfg: RulerConfig, name: str) -> dict:
    d = to_dict(cfg)
    for k in ("model", "output", "batch_size", "overwrite", "dump_prompts"):
        d.pop(k)
    if d["steer"] is None:  # unsteered runs are recorded as runs made before steering was an option
        d.pop("steer"), d.pop("alpha"), d.pop("steer_conditions")
    if cfg.steer is None or cfg.steer_generated:  # eq. (1) as stated: as runs made before the option
        d.pop("steer_generated")
    if cfg.haystack == "auto" or Path(cfg.haystack).is_dir():
        d["haystack_files"] = [str(p) for p in haystack_files(cfg.haystack) or []]
    return {**d, "model": run_id(name)}


KEYS = ("task", "length", "index", "condition")


def run_model(cfg: RulerConfig, name: str) -> tuple[str, list[dict]]:
    """Run (or resume) every task, length, example and condition for one model: ``output/<run id>/rows.jsonl``."""
    short = run_id(name)
    tok = cfg.load_tokenizer(name)
    check_window(cfg, default_window(tok), short)  # before the model loads and before any file is written
    model, tok = cfg.load(name)
    check_window(cfg, getattr(model.config, "max_position_embeddings", 0) or 10**9, short)
    apply_chat_template_choice(tok, cfg.chat_template)
    examples = build_examples(cfg, tok)
    run_dir = Path(cfg.output) / short
    about = model_about(model, tok)
    fp = _fingerprinted(cfg, name)
    writer, finished = launch_writer(run_dir, fp, KEYS, about=about, kind="ruler")
    layer = cfg.layer if cfg.layer is not None else middle_layer(model)
    shares = PrefillShares(model, [layer]) if cfg.attention else None
    heads = None
    alphas: list[float] = []
    if cfg.steer is not None:
        heads = steering.steer_heads(cfg.steer, model)
        alphas = list(cfg.alpha or steering.ALPHAS)
    units = []  # one engine call per task and length: every example in every condition
    for name_ in cfg.tasks:
        for length in cfg.lengths:
            items = [
                (ex, c, r)
                for ex, n, rs in examples
                if ex.task == name_ and n == length
                for c, r in rs.items()
            ]
            cells = [
                {"task": ex.task, "length": length, "index": ex.index, "condition": c} for ex, c, _ in items
            ]
            if not all(finished(c) for c in cells):
                units.append((items, cells, ruler.TASKS[name_].new_tokens, None))
            for alpha in alphas:  # eq. (1) on the chat conditions, one engine call per alpha
                steered = [
                    (ex, steering.steered_condition(c, alpha, cfg.steer_generated), r)
                    for ex, c, r in items
                    if c in cfg.steer_conditions
                ]
                cells = [
                    {"task": ex.task, "length": length, "index": ex.index, "condition": c}
                    for ex, c, _ in steered
                ]
                if steered and not all(finished(c) for c in cells):
                    units.append((steered, cells, ruler.TASKS[name_].new_tokens, alpha))
    t0 = time.time()
    print(f"{short}: {len(examples)} examples x {len(cfg.conditions)} conditions; {len(units)} task-length groups to run",
          flush=True)  # fmt: skip

    def compute(k: int, w: ResultsWriter) -> None:
        items, cells, new_tokens, alpha = units[k]

        def write(idx: list[int], gens) -> None:
            for j, g in zip(idx, gens):
                ex, c, r = items[j]
                att = shares.shares.pop(j, None) if shares is not None else None
                if w.done(cells[j]):
                    continue
                task = ruler.TASKS[ex.task]
                row = {**cells[j], "n_prompt_tokens": len(r), "haystack_size": ex.size, "answers": ex.answers,
                       "output": g.text, "stop_reason": g.stop_reason, "score": ruler.score(task, g.text, ex.answers)}  # fmt: skip
                if att is not None:  # as NIH rows: {layer: {raw, paper, sink_excluded, heads}}
                    row["attention"] = att
                w.write(row)

        steer_ctx = None
        if alpha is not None:
            steer_ctx = steering.batch_context(model, heads, alpha, steer_generated=cfg.steer_generated)
        generate(model, tok, [r for _, _, r in items], max_new_tokens=new_tokens, batch_size=cfg.batch_size,
                 prefill_context=shares if alpha is None else None, batch_context=steer_ctx,
                 desc=f"ruler {short} {items[0][0].task} {cells[0]['length']}" + ("" if alpha is None else f" alpha={alpha:g}"),
                 callback=write)  # fmt: skip

    try:
        run_units(writer, run_dir, [u[1] for u in units], compute, fp, KEYS, about=about, kind="ruler")
    finally:
        if writer is not None:
            writer.close()
    print(f"{short}: done in {time.time() - t0:.0f}s", flush=True)
    return short, writer.rows if writer is not None else []


def _context(r: dict) -> tuple:
    """What makes a row's context: its haystack size and needles (an example's contexts are deterministic
    from its task, seed and index given these; the conditions of one example share them)."""
    return r["haystack_size"], tuple(r["answers"])


def load_runs(
    dirs: list[str | Path], conditions: Collection[str] | None = None
) -> tuple[list[dict], dict[str, int]]:
    """The rows of several ``ctxaware ruler`` runs of one model, pooled (each dir an ``--output`` folder or
    its model folder). An example is its task, length, ``--seed`` and index (its ``index`` becomes
    ``(length, seed, index)``, which sorts as one run's indices do, so one run's CIs are its summary's):
    runs with another seed add new examples; a condition of an example already read is not read again (the
    first run wins), and a row whose context differs from the example's first reading (another haystack
    size or needles: the run sized its contexts for other conditions) is not paired with it. With
    ``conditions`` only rows of those conditions are read, so a run of other conditions (the pair with the
    prefix) does not claim an example's context first. Returns the rows and the counts ``read``,
    ``repeated`` and ``other_context``."""
    files = []
    for d in map(Path, dirs):
        found = [d / "rows.jsonl"] if (d / "rows.jsonl").is_file() else sorted(d.glob("*/rows.jsonl"))
        if not found:
            raise CtxawareError(f"{d}: no rows.jsonl in it or in a model folder under it; give `ctxaware ruler` output folders")  # fmt: skip
        files += found
    missing = [str(f.parent) for f in files if not (f.parent / "meta.json").is_file()]
    if missing:
        raise CtxawareError(f"{missing[0]}: rows.jsonl without the meta.json of its run (its seed and model); give folders that `ctxaware ruler` wrote")  # fmt: skip
    metas = {f: json.loads((f.parent / "meta.json").read_text())["config"] for f in files}
    models = sorted({m["model"] for m in metas.values()})
    if len(models) > 1:
        raise CtxawareError(f"the runs hold more than one model ({', '.join(models)}); pool one model's runs (its model folders)")  # fmt: skip
    rows: list[dict] = []
    first: dict[tuple, tuple] = {}
    seen: set[tuple] = set()
    counts = {"read": 0, "repeated": 0, "other_context": 0}
    for f in files:
        for r in read_jsonl(f):
            if conditions is not None and r["condition"] not in conditions:
                continue
            r = {**r, "index": (r["length"], metas[f]["seed"], r["index"])}
            ex = (r["task"], r["index"])
            context = _context(r)
            if (*ex, r["condition"]) in seen:
                counts["repeated"] += 1
            elif first.setdefault(ex, context) != context:
                counts["other_context"] += 1
            else:
                seen.add((*ex, r["condition"]))
                rows.append(r)
                counts["read"] += 1
    return rows, counts


def summary(rows: list[dict]) -> dict:
    """Per task and length (``task@length``), and pooled over the tasks of each length (``all@length``, when
    there are several): each condition's mean score with its interval and mean user shares, and the paired
    differences over the same examples (the unit is one example: one haystack and its needles)."""
    out: dict = {}
    for task, length in sorted({(r["task"], r["length"]) for r in rows}):
        out[f"{task}@{length}"] = _entry([r for r in rows if (r["task"], r["length"]) == (task, length)])
    for length in sorted({r["length"] for r in rows}):
        same = [r for r in rows if r["length"] == length]
        if len({r["task"] for r in same}) > 1:
            out[f"all@{length}"] = _entry(same)
    return out


def _entry(rows: list[dict]) -> dict:
    by: dict[str, dict] = {}
    for r in rows:
        by.setdefault(r["condition"], {})[(r["task"], r["index"])] = r
    entry: dict = {"conditions": {}, "paired": {}}
    for c, rs in by.items():
        scores = [rs[i]["score"] for i in sorted(rs)]
        att = [next(iter(rs[i]["attention"].values())) for i in sorted(rs) if rs[i].get("attention")]
        user = [a["sink_excluded"]["user"] for a in att]
        raw = [a["raw"]["user"] for a in att]
        entry["conditions"][c] = {"score": summarize_proportion(scores),
                                  "user_share": summarize(user) if user else None,
                                  "raw_user_share": summarize(raw) if raw else None,
                                  "mean_prompt_tokens": sum(rs[i]["n_prompt_tokens"] for i in rs) / len(rs)}  # fmt: skip
    base_of = {c: p[0] for c in by if (p := steering.parse_steered(c))}  # steered condition -> its chat base
    pairs = list(PAIRS) + list(base_of.items())
    pairs += [(base.replace("chat", "plain", 1), c) for c, base in base_of.items()]
    for a, b in pairs:
        if a in by and b in by:
            common = sorted(set(by[a]) & set(by[b]))
            entry["paired"][f"{a} - {b}"] = summarize([by[a][i]["score"] - by[b][i]["score"] for i in common])
            shares = [(_raw_user(by[a][i]), _raw_user(by[b][i])) for i in common]
            shift = [x - y for x, y in shares if x is not None and y is not None]
            if shift:  # the same pair's difference of the last token's raw user share (share units)
                entry.setdefault("paired_raw_user_share", {})[f"{a} - {b}"] = summarize(shift)
    return entry


def _raw_user(r: dict) -> float | None:
    """A row's raw attention share on user tokens at its analysis layer (None without attention)."""
    att = r.get("attention")
    return next(iter(att.values()))["raw"]["user"] if att else None


def summary_markdown(model: str, s: dict) -> str:
    lines = [f"### {model}\n", "| task | length | condition | score % [95% CI] | raw user share | user share (sink excl.) | n |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, e in s.items():
        task, length = key.split("@")
        for c, v in e["conditions"].items():
            share = f"{v['user_share']['mean']:.3f}" if v["user_share"] else "-"
            raw = f"{v['raw_user_share']['mean']:.3f}" if v["raw_user_share"] else "-"
            lines.append(
                f"| {task} | {length} | {c} | {fmt(v['score'])} | {raw} | {share} | {v['score']['n']} |"
            )
    lines += [
        "",
        "| task | length | paired difference | points [95% paired bootstrap CI] | raw user share difference [95% CI] | n |",
        "|---|---|---|---|---|---|",
    ]
    for key, e in s.items():
        task, length = key.split("@")
        for pair, d in e["paired"].items():
            att = e.get("paired_raw_user_share", {}).get(pair)
            lines.append(
                f"| {task} | {length} | {pair} | {fmt(d)} | {fmt(att, pct=False, digits=3) if att else '-'} | {d['n']} |"
            )
    return "\n".join(lines)


def _same_context(a: dict, b: dict) -> bool:
    """Two models' rows hold the same prompt: the same context and prompt length (the examples are
    deterministic from the seed, so identical tokenizers and templates give identical ids)."""
    return _context(a) == _context(b) and a["n_prompt_tokens"] == b["n_prompt_tokens"]


def compare(runs: dict[str, list[dict]], pair: tuple[str, str] = PAIRS[0]) -> dict:
    """Each later model against the first on the same contexts: per task and length, and pooled over
    them, ``template cost`` = score(pair[0]) - score(pair[1]) of each model and its change ``B - A`` (the
    difference in differences: did the template cost more after tuning?), the change of each condition's
    score, and the change of the template's shift of the raw user share; paired bootstrap over examples
    (the unit is one example: one haystack and its needles, in both models). Examples whose prompts differ
    between the models (another tokenizer or template) are not paired and are counted in ``unpaired``."""
    names = list(runs)
    if len(names) < 2:
        raise CtxawareError("compare needs the rows of two or more models")
    index = {
        m: {(r["task"], r["length"], r["index"], r["condition"]): r for r in rs} for m, rs in runs.items()
    }
    c, p = pair

    out: dict = {"reference": names[0], "pair": f"{c} - {p}", "models": {}}
    for m in names[1:]:
        a, b = index[names[0]], index[m]
        cells = sorted({k[:3] for k in a if (k[:3] + (c,)) in a and (k[:3] + (p,)) in a})
        groups: dict[str, dict[str, list]] = {}
        unpaired = 0
        for key in cells:
            kc, kp = key + (c,), key + (p,)
            if kc not in b or kp not in b:
                continue
            if not (_same_context(a[kc], b[kc]) and _same_context(a[kp], b[kp])):
                unpaired += 1
                continue
            ac, ap, bc, bp = a[kc], a[kp], b[kc], b[kp]
            vals = {
                "cost_ref": ac["score"] - ap["score"], "cost": bc["score"] - bp["score"],
                "change_in_cost": (bc["score"] - bp["score"]) - (ac["score"] - ap["score"]),
                f"change {c}": bc["score"] - ac["score"], f"change {p}": bp["score"] - ap["score"],
            }  # fmt: skip
            shares = [_raw_user(x) for x in (ac, ap, bc, bp)]
            if None not in shares:
                vals["change_in_user_share_shift"] = (shares[2] - shares[3]) - (shares[0] - shares[1])
            for g in (f"{key[0]}@{key[1]}", "all"):
                for k, v in vals.items():
                    groups.setdefault(g, {}).setdefault(k, []).append(v)
        out["models"][m] = {
            "unpaired": unpaired,
            "groups": {g: {k: summarize(v) for k, v in d.items()} for g, d in sorted(groups.items(), key=lambda x: x[0] == "all")},
        }  # fmt: skip
    return out


def compare_tables(cmp: dict) -> list[tuple[str, list[str], list[list]]]:
    """``(title, header, rows)`` per later model (points; raw user share in share units); no rows when no
    example is paired (the title says why)."""
    out = []
    for m, e in cmp["models"].items():
        title = f"{m} vs {cmp['reference']}"
        if not e["groups"]:
            out.append((f"{title}: no example is paired ({e['unpaired']} have different prompts: another "
                        "tokenizer or chat template; the rest lack a condition)", [], []))  # fmt: skip
            continue
        changes = [k for k in next(iter(e["groups"].values())) if k.startswith("change ")]
        rows = []
        for g, d in e["groups"].items():
            task, _, length = g.partition("@")
            shift = d.get("change_in_user_share_shift")
            rows.append([task, length or "pooled", fmt(d["cost_ref"]), fmt(d["cost"]), fmt(d["change_in_cost"]),
                         *(fmt(d[k]) for k in changes), fmt(shift, pct=False, digits=3) if shift else "-",
                         d["cost"]["n"]])  # fmt: skip
        header = ["task", "length", f"{cmp['reference']}: {cmp['pair']}", f"{m}: {cmp['pair']}",
                  "change in template cost", *changes, "change in the template's raw user-share shift", "n"]  # fmt: skip
        note = f" ({e['unpaired']} examples with different prompts not paired)" if e["unpaired"] else ""
        out.append((title + note, header, rows))
    return out


def compare_markdown(cmp: dict) -> str:
    """`compare_tables` as Markdown, one section per later model."""
    return "\n\n".join(
        f"### {title}" + (f"\n\n{markdown_table(header, rows)}" if rows else "")
        for title, header, rows in compare_tables(cmp)
    )


def dump_prompts(cfg: RulerConfig, names: list[str]) -> int:
    """Every prompt (task, length, index, condition, text, ids, answers) as JSONL, from the tokenizer alone."""
    from ctxaware.core.results import write_jsonl_atomic

    rows = []
    for name in names:
        tok = cfg.load_tokenizer(name)
        check_window(cfg, default_window(tok), run_id(name))
        apply_chat_template_choice(tok, cfg.chat_template)
        for ex, length, rs in build_examples(cfg, tok):
            rows += [{"model": run_id(name), "task": ex.task, "length": length, "index": ex.index, "condition": c,
                      "n_prompt_tokens": len(r), "haystack_size": ex.size, "answers": ex.answers, "text": r.text,
                      "ids": list(r.input_ids)} for c, r in rs.items()]  # fmt: skip
    write_jsonl_atomic(cfg.dump_prompts, rows)  # type: ignore[arg-type]
    print(f"wrote {len(rows)} prompts to {cfg.dump_prompts}")
    return 0


def report(out: Path, short: str, rows: list[dict]) -> dict:
    s = summary(rows)
    write_json_atomic(out / short / "summary.json", s)
    write_text_atomic(out / short / "summary.md", summary_markdown(short, s) + "\n")
    return s
