"""``ctxaware demo``: the paper's headline measurements on one model, in a few minutes on a CPU.

Steps (each printed as it runs):
1. load the model (the built-in SmolLM2-135M-Instruct by default);
2. render one context-dependent question with and without the chat template and show every token's role;
3. answer it through the shared generation engine, in both modes.
4. NIH with vs. without the template, 5. attention per role, then the report of the run
   (``OUTPUT/report.html``, made by ``ctxaware report``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ctxaware.core.config import ModelConfig, to_dict
from ctxaware.core.results import ResultsWriter, write_json_atomic
from ctxaware.rendering.chat import ROLES, render, user_prompt
from ctxaware.rendering.generate import generate

DEMO_CONTEXT = (
    "The Harbor Street bakery opens at 6 a.m. on weekdays and at 8 a.m. on weekends. Its owner, Mira Okafor, "
    "bakes rye bread on Tuesdays and sourdough on Fridays."
)
ROLE_LETTER = {"sink": "K", "bos": "B", "system": "S", "user": "U", "assistant": "A", "template": "T"}
DEMO_QUESTION = "On which day does the bakery bake sourdough?"
DEMO_ANSWER = "Friday"  # in the context: "sourdough on Fridays"


@dataclasses.dataclass
class DemoConfig(ModelConfig):
    """Run the paper's headline measurements on one model.

    Parameters:
        quick: run only the rendering and generation steps (seconds), skipping NIH and attention.
        output: directory for the demo's result files and plots.
    """

    quick: bool = dataclasses.field(default=False, metadata={"help": "only rendering and one generation"})
    output: str = dataclasses.field(
        default="runs/demo", metadata={"path": "output_dir", "help": "directory for results and plots"}
    )


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def show_rendering(model, tok) -> None:
    _section("1. the same prompt with and without the chat template")
    msgs = user_prompt(f"{DEMO_CONTEXT}\n{DEMO_QUESTION}")
    for mode in ("chat", "plain"):
        r = render(msgs, tok, mode)
        counts = {role: r.roles.count(role) for role in dict.fromkeys(r.roles)}
        print(f"[{mode}] {len(r)} tokens, roles: {counts}")
        shown = [
            f"{tok.decode([t])!r}:{ROLE_LETTER.get(role, role[0].upper())}"
            for t, role in zip(r.input_ids, r.roles)
        ]
        print("   " + " ".join(shown[:48]) + (" ..." if len(shown) > 48 else ""))
    print("   (roles: " + " ".join(f"{ROLE_LETTER.get(x, x[0].upper())}={x}" for x in ROLES) + ")")
    print("   (a system prompt that the template writes by itself, e.g. SmolLM2's 'You are a helpful AI")
    print("    assistant named SmolLM...', is template text: no message of the conversation holds it)")


def show_generation(model, tok) -> None:
    _section("2. answer through the shared generation engine (greedy)")
    msgs = user_prompt(f"{DEMO_CONTEXT}\n{DEMO_QUESTION}")
    prompts = [render(msgs, tok, "chat"), render(msgs, tok, "plain", response_prefix="Answer:")]
    for name, g in zip(
        ("chat", "plain + 'Answer:'"), generate(model, tok, prompts, max_new_tokens=24, progress=False)
    ):
        found = "contains it" if DEMO_ANSWER.lower() in g.text.lower() else "does not contain it"
        print(f"[{name}] {g.text.strip()!r}  ({len(g.token_ids)} tokens, {g.stop_reason}; expected "
              f"{DEMO_ANSWER!r}: {found})")  # fmt: skip
    print("(an instruct model often answers nothing without its template; the paper therefore compares chat")
    print(" and plain with a response prefix that starts the answer, as step 3 does)")


def show_nih(model, tok, cfg: DemoConfig) -> None:
    """NIH (paper Sec. 2.1, Fig. 2) on a small grid: the same prompts with and without the chat template.

    Both conditions start the answer with the needle's first words (the response prefix), as the paper's
    Fig. 2 does: without a template and without a prefix, SmolLM2-135M-Instruct mostly answers nothing.
    """
    from ctxaware.data import needle
    from ctxaware.evaluation import nih

    _section("3. needle in a haystack: chat template vs. plain, with response prefix")
    modes = ["chat", "plain"] if getattr(tok, "chat_template", None) else ["plain"]
    from ctxaware.data.needle import essays_dir

    haystack = "auto" if essays_dir().is_dir() else "synthetic"
    if haystack == "synthetic":
        print(f"note: the Paul Graham essays are not at {essays_dir()} (set CTXAWARE_DATA); this demo "
              "uses ctxaware's synthetic haystack, so its recall is not the paper's measurement")  # fmt: skip
    ncfg = nih.NIHConfig(
        lengths=[200, 400, 600, 800, 1000],
        depths=[0, 33, 67, 100],
        modes=modes,
        prefix=[True],
        haystack=haystack,
    )
    ncfg.output = f"{cfg.output}/nih"
    keywords = needle.load_needle(ncfg)[2]
    prompts = needle.build_prompts(ncfg, tok, model.name_or_path, model.config.max_position_embeddings)
    t0 = time.time()
    gens = generate(
        model,
        tok,
        [p.render(tok) for p in prompts],
        max_new_tokens=nih.new_tokens(ncfg),
        prefix_cache=True,
        desc="demo nih",  # a progress bar: this step takes a minute or two on a CPU
    )
    rows = []
    for p, g in zip(prompts, gens):
        rec = needle.keyword_recall(g.text, keywords)
        rows.append(
            {
                **p.cell,
                "output": g.text,
                "recall": rec,
                "exact": float(rec == 1.0),
                "empty": float(not g.text.strip()),
            }
        )
    save_rows(Path(ncfg.output) / model.name_or_path, rows, {**to_dict(ncfg), "model": model.name_or_path})
    summaries = {model.name_or_path: nih.report(Path(ncfg.output), model.name_or_path, rows)}
    print(
        f"{len(prompts)} tests (5 lengths 200-1000 x 4 depths x {len(modes)} conditions) "
        f"in {time.time() - t0:.0f}s; heatmaps under {ncfg.output}/"
    )
    print(nih.table(summaries))
    print("(the paper's full grid: ctxaware nih; see docs/nih.md)")
    return prompts


def save_rows(directory: Path, rows: list[dict], config: dict) -> None:
    """The demo's NIH rows as ``rows.jsonl`` + ``meta.json`` (what ``ctxaware nih`` writes), for the report.

    The demo always runs afresh, so rows of an earlier demo in the same directory are replaced."""
    for old in ("rows.jsonl", "meta.json"):
        (directory / old).unlink(missing_ok=True)
    with ResultsWriter(directory, config, ("condition", "template", "length", "depth"), kind="nih") as w:
        for r in rows:
            w.write(r)


def _views(raw) -> dict[str, dict[str, float]]:
    """raw / paper / sink_excluded shares of one (5,) role mass, as `ctxaware attention` reports them."""
    from ctxaware.attention import allocation as attention

    if hasattr(attention, "normalizations"):
        return attention.normalizations(raw)
    return {
        "raw": dict(zip(ROLES, raw.tolist())),
        "paper": dict(zip(attention.PAPER, attention.renormalize(raw).tolist())),
    }


def show_attention(model, tok, prompts, cfg: DemoConfig) -> None:
    """Attention per role (paper Sec. 2.2, Fig. 3-4) at the middle layer on the cells of the NIH grid, with
    the prompts and query of the authors' attention-analysis script (`attention.needle_config`): the answer
    opened by the needle's first 9 words, the query "is", the plain text joined by a space. The retrieval
    head is the head with the most attention on user tokens without the template (eq. 3).
    """
    from ctxaware.attention.allocation import nih_prompts, renormalize, role_allocation
    from ctxaware.core.models import middle_layer
    from ctxaware.data.needle import essays_dir
    from ctxaware.rendering.chat import ROLES

    layer = middle_layer(model)
    _section(f"4. attention per role at layer {layer}, query 'is' as the authors' script (paper Fig. 3-4)")
    t0 = time.time()
    by_mode = {}
    lengths = sorted({p.cell["length"] for p in prompts})
    depths = sorted({p.cell["depth"] for p in prompts})
    modes = {p.cell["mode"] for p in prompts}
    for mode in ("plain", "chat"):
        hay = "auto" if essays_dir().is_dir() else "synthetic"  # as step 3
        chosen = nih_prompts(tok, lengths, depths, chat=mode == "chat", haystack=hay) if mode in modes else []
        if chosen:
            by_mode[mode] = role_allocation(
                model, chosen, layers=[layer], pad_id=tok.pad_token_id, desc=f"demo attention {mode}"
            )[:, 0]  # (N, H, 5)
    if "plain" not in by_mode or "chat" not in by_mode:
        print("(needs a model with a chat template)")
        return
    head = int(by_mode["plain"][..., ROLES.index("user")].mean(0).argmax())  # eq. (3), averaged over prompts
    print(
        f"retrieval head (eq. 3, chosen without template): {head}; shares renormalised over sink/user/assistant (paper)"
    )
    print(f"{'condition':<22}{ROLES[0]:>8}{'user':>8}{'assistant':>11}{'template (raw)':>16}")
    conditions = {}
    for mode in ("plain", "chat"):
        raw = by_mode[mode][:, head].mean(0)  # (5,)
        first, user, asst = renormalize(raw).tolist()
        print(
            f"{mode + ' + prefix':<22}{first:>8.3f}{user:>8.3f}{asst:>11.3f}{raw[ROLES.index('template')]:>16.3f}"
        )
        conditions[mode] = {"head": head, **_views(raw)}
    write_json_atomic(  # the schema of `ctxaware attention`'s allocation.json (shares: means over prompts)
        Path(cfg.output) / "attention" / "allocation.json",
        {
            "model": model.name_or_path,
            "layer": layer,
            "n_prompts": len(by_mode["chat"]),
            "conditions": conditions,
            "protocol": "prompts: the authors' attention-analysis script on the cells of step 3's grid "
            "(9-word answer prefix, query 'is', plain text joined by a space); head: eq. (3) on the plain "
            "prompts, averaged; views of the raw mass averaged over prompts",
        },
    )
    print(
        f"({time.time() - t0:.0f}s; the sink is position 0 in both modes, the paper's 'BOS'; see docs/attention.md)"
    )
