"""``ctxaware eval``: the command line of `ctxaware.evaluation.qa` (parse, run, print)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ctxaware.core.config import default_data_dir, parse_config
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import write_json_atomic, write_text_atomic
from ctxaware.data.tasks import TASKS, get_task, load_examples
from ctxaware.evaluation.qa import (
    EvalConfig,
    _reliance_plot,
    _steering_context,
    condition_name,
    dump_prompts,
    evaluate_tasks,
    expand_models,
    lm_eval_results,
    make_judge,
    summary_markdown,
)


def main(argv: list[str]) -> int:
    cfg = parse_config(EvalConfig, argv, prog="ctxaware eval")
    if not cfg.tasks:
        raise CtxawareError("name at least one task; available tasks: " + ", ".join(TASKS))
    cfg.data_dir = cfg.data_dir or str(default_data_dir())
    for t in cfg.tasks:  # unreadable, malformed or empty task files fail before any model loads
        if cfg.source == "local" and not load_examples(get_task(t), cfg.source, cfg.data_dir):
            raise CtxawareError(
                f"task {t} has no valid examples in its file under {cfg.data_dir}; check --data-dir"
            )
    if cfg.dump_prompts:
        n = dump_prompts(cfg, cfg.dump_prompts)
        print(f"wrote {n} prompts to {cfg.dump_prompts}")
        return 0
    out, t0 = Path(cfg.output), time.perf_counter()
    results: dict = {}
    judge = make_judge(cfg) if "mt_bench" in cfg.tasks else None
    from ctxaware.core.models import canonical_spec, run_id

    for spec in expand_models(cfg.model):
        model, tok = cfg.load(spec)
        spec = canonical_spec(spec)  # one name throughout, as in nih and attention
        bc = _steering_context(model, cfg)
        for mode in cfg.modes:
            cond = condition_name(mode, cfg.indicator)
            res = evaluate_tasks(
                model,
                tok,
                cfg.tasks,
                cfg,
                mode=mode,
                model_name=spec,
                output_dir=out / run_id(spec) / cond,  # unique per model (nih's run ids)
                batch_context=bc,
                judge=judge,
            )
            results.setdefault(spec, {})[cond] = res
            print(f"{spec} [{cond}]: " + ", ".join(f"{t}={_headline(r)}" for t, r in res.items()), flush=True)
        del model
    md = summary_markdown(results)
    write_text_atomic(out / "summary.md", md)
    write_json_atomic(
        out / "summary.json",
        {
            "config": dataclasses.asdict(cfg),
            "results": results,
            "wall_seconds": round(time.perf_counter() - t0, 1),
        },
    )
    write_json_atomic(out / "results.json", lm_eval_results(cfg, results))  # for tools built for lm-eval
    plot = _reliance_plot(results, out) if len(results) > 1 else None
    print(md + f"\nwrote {out / 'summary.md'}" + (f" and {plot}" if plot else ""))
    return 0


def _headline(r: dict) -> str:
    key = {"qa": "contains", "conflict": "p_s", "choice": "accuracy", "mtbench": "rating"}[r["kind"]]
    s = r["metrics"].get(key)
    return "-" if not s else (f"{s['mean']:.2f}" if key == "rating" else f"{100 * s['mean']:.1f}%")
