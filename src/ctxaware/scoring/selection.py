"""Select context-dependent turns and write the ``[IND]``-marked fine-tuning dataset (paper Sec. 3.2).

A turn (X_m, Y_m) is context-dependent when its score of eq. (2) is above the threshold: s_M(Y_m) > beta
(default 0.6). The indicator is appended to the user instruction X_m of every selected turn, and the
dataset is written back in the input's own format (`conversations.write_conversations`) and as an HF
dataset (``save_to_disk``). ``ctxaware select`` also prints the paper's Table 3: the ratio of selected
instructions for beta in {0.5, 0.6, 0.7, 0.8}. Turns without a score (skipped by the scorer, or missing
from the scores file) are never selected; they are counted and left out of the ratio's denominator.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ctxaware.core.config import Checked, overwrite_option, refuse_existing
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import SkipCounter, file_digest, write_json_atomic
from ctxaware.data.conversations import Conversation, load_conversations, to_hf_dataset, write_conversations
from ctxaware.rendering.indicator import DEFAULT_INDICATOR, append_indicator

TABLE3_BETAS = (0.5, 0.6, 0.7, 0.8)


@dataclass
class SelectConfig(Checked):
    """Threshold context-dependency scores and write the indicator-marked dataset.

    Parameters:
        scores: the JSONL written by ``ctxaware score`` (one row per assistant turn).
        data: the dataset that was scored (same file, same ``format`` and ``limit``).
        beta: a turn is selected when its score is strictly above ``beta`` (paper: 0.6).
        indicator: token appended, after a space, to each selected user instruction X_m.
        output: directory for ``data.json(l)`` (the input's format), ``hf/`` and ``selection.json``.
    """

    scores: str = field(
        metadata={"path": "input_file", "help": "scores JSONL from ctxaware score", "positional": True}
    )
    data: str = field(metadata={"path": "input", "help": "the dataset that was scored", "positional": True})
    beta: float = field(default=0.6, metadata={"help": "select turns with score > beta", "gt": 0, "lt": 1})
    indicator: str = field(
        default=DEFAULT_INDICATOR, metadata={"help": "token appended to selected instructions"}
    )
    output: str = field(default="runs/selected", metadata={"path": "output_dir", "help": "output directory"})
    overwrite: bool = overwrite_option()
    format: str = field(
        default="auto", metadata={"help": "auto, sharegpt, messages or alpaca (as when scoring)"}
    )
    limit: int | None = field(
        default=None, metadata={"min": 1, "help": "read at most this many rows (as when scoring)"}
    )
    hf: bool = field(default=True, metadata={"help": "also save an HF dataset under OUTPUT/hf"})


def _malformed(row) -> str | None:
    """Why a parsed score line cannot be used (None when it can)."""
    if not isinstance(row, dict):
        return "line is not a JSON object"
    for k in ("source_row", "turn", "conversation_id"):
        if k not in row:
            return f"no {k}"
    if not isinstance(row["source_row"], int) or not isinstance(row["turn"], int):
        return "source_row or turn is not an integer"
    score = row.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        return "score is not a number"
    return None


def load_scores(path: str | Path, skips: SkipCounter | None = None) -> dict[tuple[int, int], dict]:
    """Score rows keyed by (source_row, turn). Malformed lines are skipped and counted in ``skips`` by
    reason (never dropped silently); a file without a single usable row is an error."""
    p = Path(path)
    if not p.is_file():
        raise CtxawareError(f"scores file {path} does not exist; run ctxaware score first")
    skips = skips if skips is not None else SkipCounter()
    out: dict[tuple[int, int], dict] = {}
    try:
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    skips.skip("not valid JSON", f"line {i}")
                    continue
                why = _malformed(row)
                if why:
                    skips.skip(why, f"line {i}")
                    continue
                out[(row["source_row"], row["turn"])] = row
    except UnicodeDecodeError:
        raise CtxawareError(
            f"scores file {path} is not UTF-8 text; give the JSONL that ctxaware score wrote"
        ) from None
    if not out:
        raise CtxawareError(
            f"scores file {path} holds no score rows ({skips.total} malformed lines); run ctxaware score first"
        )
    return out


def ratio_table(scores: Iterable[float | None], betas: Sequence[float] = TABLE3_BETAS) -> dict[str, float]:
    """Table 3: the fraction of scored instructions with s > beta, for each beta."""
    s = [x for x in scores if x is not None]
    return {f"{b:g}": (sum(x > b for x in s) / len(s) if s else float("nan")) for b in betas}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per dataset, one column per beta."""
    betas = list(next(iter(rows.values())))
    lines = ["| dataset | " + " | ".join(f"beta={b}" for b in betas) + " |", "|---" * (len(betas) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{r[b]:.3f}" for b in betas) + " |" for name, r in rows.items()]
    return "\n".join(lines)


def mark(conv: Conversation, selected_turns: set[int], indicator: str) -> Conversation:
    """A copy of ``conv`` with ``indicator`` appended to X_m for every selected assistant turn m."""
    msgs, turn = [dict(m) for m in conv.messages], -1
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            turn += 1
            if turn in selected_turns:
                msgs[i - 1]["content"] = append_indicator(
                    msgs[i - 1]["content"], indicator
                )  # X_m precedes Y_m
    return Conversation(conv.id, msgs, conv.source_row, conv.fmt, conv.extra)


def select(convs: list[Conversation], scores: dict[tuple[int, int], dict], beta: float, indicator: str):
    """Marked conversations and counts; raises when the scores belong to another dataset."""
    out, counts = [], {"n_turns": 0, "n_scored": 0, "n_selected": 0, "n_unscored": 0}
    for c in convs:
        n_turns = sum(m["role"] == "assistant" for m in c.messages)
        chosen = set()
        for m in range(n_turns):
            row = scores.get((c.source_row, m))
            if row is not None and row["conversation_id"] != c.id:
                raise CtxawareError(
                    f"score row {c.source_row} is for conversation {row['conversation_id']!r}, not {c.id!r}; "
                    "give the dataset (and --format/--limit) that was scored"
                )
            counts["n_turns"] += 1
            if row is None or row.get("score") is None:
                counts["n_unscored"] += 1
                continue
            counts["n_scored"] += 1
            if row["score"] > beta:
                chosen.add(m)
        counts["n_selected"] += len(chosen)
        out.append(mark(c, chosen, indicator))
    return out, counts


def _out_name(data: str) -> str:
    return "data.jsonl" if data.endswith((".jsonl", ".jsonl.gz")) or not Path(data).is_file() else "data.json"


def check_scored_data(scores: str | Path, data: str | Path) -> None:
    """Refuse scores computed on other contents of ``data``: ``ctxaware score`` records a digest of the
    dataset in ``SCORES.work/meta.json`` (docs/resume.md); a file replaced at the same path differs."""
    meta = Path(scores).with_name(Path(scores).name + ".work") / "meta.json"
    if not meta.is_file() or not Path(data).is_file():
        return
    try:
        recorded = (json.loads(meta.read_text()).get("inputs") or {}).get("data")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return
    if isinstance(recorded, str) and recorded.startswith("sha256:") and recorded != file_digest(data):
        raise CtxawareError(
            f"{scores} were computed on other contents of {data} (the file changed since it was scored); "
            "score it again, or give the dataset that was scored"
        )


def run(cfg: SelectConfig) -> dict:
    """Select, write ``OUTPUT/data.json(l)``, ``OUTPUT/hf`` and ``OUTPUT/selection.json``; return the summary."""
    out = Path(cfg.output)
    targets = [out / _out_name(cfg.data), out / "hf", out / "selection.json"]
    refuse_existing(targets, cfg.overwrite, "--output")
    malformed = SkipCounter()
    scores = load_scores(cfg.scores, malformed)
    check_scored_data(cfg.scores, cfg.data)
    convs, report = load_conversations(cfg.data, cfg.format, limit=cfg.limit)  # type: ignore[arg-type]
    if not convs:
        raise CtxawareError(
            f"{cfg.data} holds no conversations ({report['skipped']['total']} rows skipped); give the scored dataset"
        )
    marked, counts = select(convs, scores, cfg.beta, cfg.indicator)
    write_conversations(marked, targets[0])
    if cfg.hf and marked:
        import shutil

        shutil.rmtree(targets[1], ignore_errors=True)  # only with --overwrite (refused above otherwise)
        to_hf_dataset(marked).save_to_disk(str(targets[1]))
    table = ratio_table(r["score"] for r in scores.values())
    summary = {"beta": cfg.beta, **counts, "ratio": counts["n_selected"] / max(1, counts["n_scored"]),
               "table3": table, "skipped_rows": report["skipped"],
               "malformed_score_lines": malformed.as_dict()}  # fmt: skip
    write_json_atomic(out / "selection.json", summary)
    return summary
