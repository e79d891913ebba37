"""``ctxaware report RUN_DIR [RUN_DIR ...] --output report.html``: one page to open, read and send.

Walks each run directory, recognises what every sub-directory holds by its file names (NIH rows, attention
allocation, retrieval heads, scores, selection, analyses, training, evaluation, experiment comparison,
stages) and writes

* ``report.html``: self-contained (figures as base64 PNG, inline CSS, no script, no network);
* ``report.md``: the same content in Markdown, its figures as PNG files in ``report_files/`` beside it.

Each section names its provenance: model and revision, protocol, configuration, ctxaware version and git
commit, and when and for how long it ran (from ``provenance.json`` or a ``"provenance"`` key when the
command recorded one, else from the result files' fields and modification times, marked as such). A
directory holding files that no reader understands is listed at the end, never an error.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import os
import re
import time
from pathlib import Path

from ctxaware.core.config import Checked, overwrite_option
from ctxaware.core.errors import CtxawareError
from ctxaware.core.provenance import git_commit, utc
from ctxaware.core.results import SCHEMA, write_text_atomic
from ctxaware.core.stats import markdown_table
from ctxaware.reporting import sections as rs

SKIP_DIRS = {"model", "adapter", "hf", "__pycache__", "context_reliance"}  # outputs with nothing to show
KIND_ORDER = (
    "nih",
    "ruler",
    "attention",
    "heads",
    "scores",
    "selection",
    "analysis",
    "train",
    "eval",
    "experiment",
    "stages",
)
SEEN_FILES = {
    "meta.json",
    "summary.md",
    "comparison.md",
    "provenance.json",
}  # read by others, never "unknown"


@dataclasses.dataclass
class ReportConfig(Checked):
    """Gather the results of one or more runs into one HTML page and its Markdown twin.

    Parameters:
        runs: result directories written by ctxaware commands (any depth; unknown ones are listed).
        output: the HTML file; ``report.md`` and the figure folder ``<name>_files/`` go beside it.
        title: the page title.
    """

    runs: list[str] = dataclasses.field(
        metadata={"path": "input", "help": "result directories", "positional": True}
    )
    output: str = dataclasses.field(
        default="runs/report.html", metadata={"path": "output_file", "help": "HTML file to write"}
    )
    overwrite: bool = overwrite_option()
    title: str = dataclasses.field(default="ctxaware report", metadata={"help": "page title"})


# ------------------------------------------------------------------------------------------ discovery


def _is_heads(path: Path) -> bool:
    h = rs.load_json(path) if path.stat().st_size < 100_000 else None
    return (
        isinstance(h, dict)
        and bool(h)
        and all(
            str(k).isdigit() and isinstance(v, list) and all(isinstance(x, int) for x in v)
            for k, v in h.items()
        )
    )


def _stages_file(d: Path, names: set[str]) -> Path | None:
    for n in sorted(names):
        if n.startswith("stages") and n.endswith(".json"):
            return d / n
    j = rs.load_json(d / "summary.json") if "summary.json" in names else None
    return d / "summary.json" if isinstance(j, dict) and ("stages" in j or "checkpoints" in j) else None


def _safe(d: Path, build, *args) -> rs.Section:
    """``build(*args)``, or a section saying why the files could not be read (a format it does not know)."""
    try:
        return build(*args)
    except Exception as e:  # noqa: BLE001 - one unreadable directory must not stop the report
        s = rs.Section(build.__name__, f"{build.__name__}: {d.name} (not readable)", d)
        s.p(
            f"{d}: the files look like {build.__name__} results but could not be read ({type(e).__name__}: {e})."
        )
        return s


def classify(d: Path, figs: rs.Figs) -> tuple[list[rs.Section], set[str], bool]:
    """Sections for directory ``d``, the file names they account for, and whether they own the subtree."""
    names = {p.name for p in d.iterdir() if p.is_file() and not p.name.startswith(".")}
    out: list[rs.Section] = []
    used: set[str] = set()
    owns = False
    first = rs.first_row(d / "rows.jsonl") if "rows.jsonl" in names else {}
    meta = rs.load_json(d / "meta.json") if "meta.json" in names else None
    kind = meta.get("kind") if isinstance(meta, dict) and meta.get("schema") == SCHEMA else None
    kind = None if kind == "rows" else kind  # the writer's generic default: read by shape
    if kind == "nih" or (
        kind is None and {"length", "depth", "recall"} <= set(first)
    ):  # older runs: by shape
        out.append(_safe(d, rs.nih, d, figs))
        used |= {"rows.jsonl"}
        owns = True  # condition folders (summary.json + heatmap.png) are drawn again from the rows
    if kind == "ruler":
        out.append(_safe(d, rs.ruler, d, figs))
        used |= names & {"rows.jsonl", "summary.json", "summary.md"}
        owns = True
    if names & {"allocation.json", "attention.json"}:
        out.append(_safe(d, rs.attention, d, figs))
        used |= names & {"allocation.json", "attention.json", "fig3_change.png", "fig4_shares.png"}
        used |= {n for n in names if n.endswith(".png") or n.endswith(".jsonl")}
    stages = _stages_file(d, names)
    if stages is not None:
        out.append(_safe(d, rs.stages, d, stages, figs))
        used |= {stages.name} | {n for n in names if n.endswith(".png") or n.endswith(".jsonl")}
        owns = True
    j = rs.load_json(d / "summary.json") if "summary.json" in names and stages is None else None
    res = rs.load_json(d / "results.json") if "results.json" in names else None
    res_vals = [v for v in res.values() if isinstance(v, dict)] if isinstance(res, dict) else []
    if res_vals and all("recall" in v for v in res_vals):
        used |= {"results.json"}  # `ctxaware experiment`'s NIH cache {condition: summary}; rows below
    elif isinstance(j, dict) and "results" in j or "results.json" in names:
        out.append(_safe(d, rs.evaluation, d, figs))
        used |= names & {"summary.json", "results.json", "context_reliance.png"}
        owns = True  # per-task folders are in the summary
    for f in sorted(names):
        if f.endswith(".summary.json") and "n_scored" in (rs.load_json(d / f) or {}):
            out.append(_safe(d, rs.scores, d, d / f, figs))
            used |= {f, f.replace(".summary.json", ".jsonl")}
    sel = [d / f for f in sorted(names) if f == "selection.json" or f.endswith(".selection.json")]
    if sel:
        out.append(_safe(d, rs.selection, d, sel, figs))
        used |= {p.name for p in sel} | {n for n in names if n.startswith(("data.json", "marked_"))}
    if "analysis.json" in names:
        out.append(_safe(d, rs.analysis, d, figs))
        used |= {"analysis.json", "layer_agreement.png", "instruction_lengths.png"}
    if names & {"train_summary.json", "train_config.json"}:
        out.append(_safe(d, rs.train, d, figs))
        used |= names & {"train_summary.json", "train_config.json", "context_reliance.png"}
        owns = True
    if "comparison.json" in names:
        cmp = rs.load_json(d / "comparison.json")
        if isinstance(cmp, dict) and {"reference", "pair", "models"} <= set(
            cmp
        ):  # ctxaware ruler --model A,B
            out.append(_safe(d, rs.ruler_comparison, d, figs))
        else:
            out.append(_safe(d, rs.experiment, d, figs))
        used |= {"comparison.json", "context_reliance.png"}
    heads = [d / f for f in sorted(names - used) if f.endswith(".json") and _is_heads(d / f)]
    if heads:
        out.append(_safe(d, rs.heads, d, heads, figs))
        used |= {p.name for p in heads}
    if isinstance(j, dict) and not out and isinstance(next(iter(j.values()), None), dict):
        used |= {"summary.json", "conditions.png"}  # an NIH root: {model: {condition: summary}}; rows below
    if "kind" in (j or {}) and "metrics" in (j or {}):
        out.append(_safe(d, rs.evaluation_task, d, j, figs))
        used |= {"summary.json", "rows.jsonl"}
    return out, used | (names & SEEN_FILES), owns


def discover(
    roots: list[Path], figs: rs.Figs, skip: Path | None = None
) -> tuple[list[rs.Section], list[tuple[Path, list[str]]]]:
    """Sections in walk order, and ``(directory, files)`` of directories nothing understood."""
    sections, unknown = [], []
    for root in roots:
        owned: list[Path] = []
        for dirpath, dirnames, _ in os.walk(root):
            d = Path(dirpath)
            dirnames[:] = sorted(
                n for n in dirnames
                if not n.startswith(".") and n not in SKIP_DIRS and not n.startswith("checkpoint-")
                and not n.endswith(".work")
            )  # fmt: skip
            if any(o in d.parents for o in owned):
                continue
            html_stems = {p.stem for p in d.glob("*.html")}  # earlier reports and their figure folders
            dirnames[:] = [
                n
                for n in dirnames
                if not (n.endswith("_files") and n[: -len("_files")] in html_stems)
                and (d / n).resolve() != skip
            ]
            found, used, owns = classify(d, figs)
            used = used | {f"{x}.html" for x in html_stems} | {f"{x}.md" for x in html_stems}
            for s in found:
                s.provenance = provenance_of(s, root)
            sections += found
            if owns:
                owned.append(d)
            left = sorted(
                p.name for p in d.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.name not in used
            )  # fmt: skip
            if left and not found:
                unknown.append((d, left))
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(sections, key=lambda s: order.get(s.kind, len(order))), unknown


# ----------------------------------------------------------------------------------------- provenance


def _recorded(d: Path, root: Path) -> tuple[dict, Path]:
    """A ``provenance.json`` in the directory or a parent up to the run root, or a ``provenance`` key; and
    the directory it describes (a parent's covers the whole run, not this section alone)."""
    for p in [d, *d.parents]:
        j = rs.load_json(p / "provenance.json")
        if isinstance(j, dict):
            return j, p
        if p == root or root not in p.parents:
            break
    for f in sorted(d.glob("*.json")):
        j = rs.load_json(f) if f.stat().st_size < 2_000_000 else None
        if isinstance(j, dict) and isinstance(j.get("provenance"), dict):
            return j["provenance"], d
    return {}, d


def _seconds(d: Path) -> float | None:
    for f in sorted(d.glob("*.json")):
        j = rs.load_json(f) if f.stat().st_size < 2_000_000 else None
        if isinstance(j, dict):
            for k in ("wall_seconds", "wall_s", "seconds"):
                if isinstance(j.get(k), (int, float)):
                    return float(j[k])
            tp = j.get("throughput_rank0")
            if isinstance(tp, dict) and isinstance(tp.get("seconds"), (int, float)):
                return float(tp["seconds"])
            models = j.get("models")
            if isinstance(models, dict):
                secs = [m.get("seconds") for m in models.values() if isinstance(m, dict)]
                if secs and all(isinstance(x, (int, float)) for x in secs):
                    return float(sum(secs))
    return None


def _protocol(s: rs.Section) -> str:
    c = s.config or {}
    keys = {
        "nih": ("modes", "prefix", "indicator", "template", "lengths", "depths", "max_new_tokens", "haystack"),
        "attention": ("lengths", "depths", "layer", "haystack", "protocol"),
        "scores": ("layer", "layers", "head_reduce", "max_tokens", "format", "limit"),
        "train": ("method", "chat_template", "indicator", "data", "max_conversations", "num_train_epochs", "learning_rate"),
        "eval": ("tasks", "modes", "indicator", "limit", "max_new_tokens", "seed"),
    }.get(s.kind, ("protocol",))  # fmt: skip
    # an unset option (None: "the default") says nothing; the value used is recorded beside it (score: layers)
    parts = [
        f"{k}={json.dumps(c[k]) if not isinstance(c[k], str) else c[k]}" for k in keys if c.get(k) is not None
    ]
    return "; ".join(parts) or "not recorded"


def _model_name(m: str | None) -> str:
    from ctxaware.core.models import DEFAULT_MODEL

    if not m:
        return "not recorded"
    return f"default (= {DEFAULT_MODEL})" if m == "default" else str(m)


def provenance_of(s: rs.Section, root: Path) -> dict[str, str]:
    (rec, where), c = _recorded(s.path, root), s.config or {}
    files = [p for p in s.path.rglob("*") if p.is_file() and not p.name.startswith(".")][:2000]
    times = sorted(p.stat().st_mtime for p in files) or [s.path.stat().st_mtime]
    secs = rec.get("seconds") or _seconds(s.path)
    commit = rec.get("git_commit")
    return {
        "directory": str(s.path),
        "model": _model_name(s.model or c.get("model") or rec.get("model")),
        "revision": str(c.get("revision") or rec.get("revision") or "default (none given)"),
        "protocol": _protocol(s),
        "ctxaware": (
            f"{rec['ctxaware_version']} @ {commit or 'commit not recorded'}"
            if rec.get("ctxaware_version")
            else "version and commit not recorded by this command"
        ),  # fmt: skip
        "when": (
            f"{rec.get('started', '?')} → {rec['finished']}"
            if rec.get("finished")
            else f"files written {utc(times[0])} → {utc(times[-1])}"
        ),  # fmt: skip
        "how long": (
            f"{secs:.0f} s"
            + ("" if where == s.path or not rec.get("seconds") else f" (the whole run in {where})")
        )
        if secs
        else f"not recorded (file times span {times[-1] - times[0]:.0f} s)",
    }


# -------------------------------------------------------------------------------------------- writing

# Nothing may leave the page: no scripts, no network; images only as data: URIs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}td,th{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f3f3f3}table.prov td:first-child{font-weight:600;white-space:nowrap}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
details pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}code{font-size:.9em}.muted{color:#666}
@media print{h2{page-break-before:auto}figure{page-break-inside:avoid}}
"""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60] or "x"


def _html_table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    head = f"<thead><tr>{head}</tr></thead>" if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{f' class={cls!r}' if cls else ''}>{head}<tbody>{body}</tbody></table>"


def render_html(title: str, sections: list[rs.Section], unknown: list, header: dict) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">",
             f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>", _html_table(["", ""], [[k, v] for k, v in header.items()], "prov")]  # fmt: skip
    ids = [f"s{i}-{_slug(s.title)}" for i, s in enumerate(sections)]
    parts.append(
        "<nav><ol>" + "".join(f"<li><a href='#{i}'>{e(s.title)}</a></li>" for i, s in zip(ids, sections))
    )
    parts.append(
        "<li><a href='#unknown'>Directories not understood</a></li></ol></nav>" if unknown else "</ol></nav>"
    )
    for sid, s in zip(ids, sections):
        parts.append(f"<section id='{sid}' data-kind='{e(s.kind)}'><h2>{e(s.title)}</h2>")
        parts.append(_html_table(["provenance", ""], [[k, v] for k, v in s.provenance.items()], "prov"))
        if s.config:
            cfg = e(json.dumps(s.config, indent=2, default=str))
            parts.append(f"<details><summary>configuration</summary><pre>{cfg}</pre></details>")
        for b in s.blocks:
            if b[0] == "p":
                parts.append(f"<p>{e(b[1])}</p>")
            elif b[0] == "table":
                parts.append(_html_table(b[1], b[2]))
            else:
                data = base64.b64encode(b[1].read_bytes()).decode()
                parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{e(b[2])}'>"
                             f"<figcaption>{e(b[2])}</figcaption></figure>")  # fmt: skip
        parts.append("</section>")
    if unknown:
        parts.append("<section id='unknown' data-kind='unknown'><h2>Directories not understood</h2>"
                     "<p class='muted'>No reader recognised these files; they are listed, not shown.</p>")  # fmt: skip
        parts.append(
            _html_table(
                ["directory", "files"],
                [[str(d), ", ".join(f[:12]) + (" …" if len(f) > 12 else "")] for d, f in unknown],
            )
        )
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(title: str, sections: list[rs.Section], unknown: list, header: dict, rel: str) -> str:
    out = [f"# {title}", "", *[f"- **{k}**: {v}" for k, v in header.items()], ""]
    for s in sections:
        out += [f"## {s.title}", "", *[f"- {k}: `{v}`" for k, v in s.provenance.items()], ""]
        for b in s.blocks:
            if b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "table":
                out += [markdown_table(b[1], b[2]), ""]
            else:
                out += [f"![{b[2]}]({rel}/{b[1].name})", "", f"*{b[2]}*", ""]
    if unknown:
        out += [
            "## Directories not understood",
            "",
            markdown_table(["directory", "files"], [[str(d), ", ".join(f)] for d, f in unknown]),
            "",
        ]
    return "\n".join(out)


def write_report(
    runs: list[str | Path], output: str | Path = "report.html", title: str = "ctxaware report"
) -> Path:
    """Write ``output`` (HTML) and ``report.md`` with its figure folder beside it; return the HTML path."""
    t0 = time.time()
    roots = [Path(r) for r in runs]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise CtxawareError(
            f"not a directory: {', '.join(missing)}; give directories written by ctxaware commands"
        )
    out = Path(output)
    figdir = out.parent / f"{out.stem}_files"
    figdir.mkdir(parents=True, exist_ok=True)
    for old in figdir.glob("*.png"):
        old.unlink()  # figures of an earlier report of the same name
    count = iter(range(10**6))
    figs = lambda name: figdir / f"{next(count):02d}-{_slug(name)}.png"  # noqa: E731
    sections, unknown = discover(roots, figs, skip=figdir.resolve())
    from ctxaware import __version__

    header = {
        "runs": ", ".join(map(str, roots)),
        "written": f"{utc(time.time())} by ctxaware {__version__} @ {git_commit() or 'commit unknown'}",
        "sections": str(len(sections)) + (f"; {len(unknown)} directories not understood" if unknown else ""),
    }
    write_text_atomic(out, render_html(title, sections, unknown, header))
    md = out.with_suffix(".md") if out.suffix == ".html" else out.parent / "report.md"
    write_text_atomic(md, render_markdown(title, sections, unknown, header, figdir.name))
    header["seconds"] = f"{time.time() - t0:.1f}"
    return out
