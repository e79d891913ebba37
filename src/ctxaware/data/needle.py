"""NIH prompt construction: haystack, needle, templates, protocols, insertion, prompts, recall, dump.

Everything `ctxaware nih`, `ctxaware attention`, `ctxaware heads` and the steering sweep need to build the
very same needle-in-a-haystack prompts (paper Sec. 2.1, App. A.2, Table 8). This module imports none of
`nih`, `attention`, `retrieval_heads` or `steering`, so the imports among them run one way.

Two protocols (docs/nih.md has the table of every choice, its source and the option that changes it):

* ``authors`` (default): the authors' released tester (a gkamradt derivative), token for token: the length
  ``L`` is a context budget; the essays (each line's last character replaced by a space) are encoded and cut
  to ``L``, decoded, re-encoded, cut to ``L - 200 - len(needle)`` (the 200-token buffer); the needle goes in
  at ``int(len * depth / 100)`` moved back to the previous token that decodes to ``"."`` (appended at
  100 %); the code's templates (context between newlines, "accoriding"); an empty system turn except for
  Gemma; the response prefix is the needle's first 8 words; depths rounded to integers.
* ``ctxaware``: the whole prompt (template, question, prefix) fits ``L``; the needle moves back to the start
  of its sentence (``.``, ``?`` or ``!``); Table 8's text; a 9-word prefix ending at "is".

Both: a chat prompt and its plain twin hold the same context; recall replaces punctuation by spaces.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import random
import string
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import yaml

from ctxaware.core.config import Checked
from ctxaware.core.errors import CtxawareError
from ctxaware.rendering.chat import Rendered, render
from ctxaware.rendering.indicator import append_indicator

REPO = Path(__file__).resolve().parents[3]


def essays_dir() -> Path:
    """The Paul Graham essays in the shared data folder (`config.default_data_dir`: ``$CTXAWARE_DATA``,
    else ``../shared/data`` beside the checkout or the working directory)."""
    from ctxaware.core.config import default_data_dir

    return default_data_dir().expanduser() / "haystack" / "paul_graham_essays"


PG_ESSAYS = essays_dir()
PROTOCOLS = ("authors", "ctxaware")
BUFFER = 200  # the authors' final_context_length_buffer

# Paper Table 8 (the ctxaware protocol).
TEMPLATES = (
    "You are a helpful AI assistant that answers a question using only the provided document: {context} "
    "Question: {retrieval_question}",
    "You are a helpful AI assistant that answers a question using only the provided context: {context} "
    "Question: {retrieval_question}",
    "Document: {context} Answer the question according to the provided document: {retrieval_question}",
    "Context: {context} Answer the question according to the provided context: {retrieval_question}",
)
# The authors' code (template ids "initial", "1", "2", "3" = Table 8's rows 1-4), typo included.
AUTHORS_TEMPLATES = (
    "You are a helpful AI assistant that answers a question using only the provided document: \n{context}\n\n"
    "Question: {retrieval_question}",
    "You are a helpful AI assistant that answers a question using only the provided context: \n{context}\n\n"
    "Question: {retrieval_question}",
    "Document: \n{context}\n\nAnswer the question accoriding to the provided document: {retrieval_question}",
    "Context: \n{context}\n\nAnswer the question accoriding to the provided context: {retrieval_question}",
)
# Gemma's official turn markers (system turns are not supported), for `--chat-template gemma`.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclasses.dataclass
class NeedleConfig(Checked):
    """The NIH prompts: protocol, haystack, needle, grid, templates and conditions (no model options)."""

    protocol: str = dataclasses.field(
        default="authors", metadata={"help": "authors (the released tester, token for token) or ctxaware"}
    )
    haystack: str = dataclasses.field(
        default="auto",
        metadata={"help": "auto (the shared essays; an error when absent), synthetic or a directory of .txt"},
    )
    needle: str = dataclasses.field(
        default="The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
        metadata={"help": "the sentence hidden in the haystack"},
    )
    question: str = dataclasses.field(
        default="What is the best thing to do in San Francisco?", metadata={"help": "the retrieval question"}
    )
    keywords: list[str] = dataclasses.field(
        default_factory=lambda: ["eat", "sandwich", "sit", "dolores", "park", "sunny", "day"],
        metadata={"help": "words whose presence in the output is scored (recall)"},
    )
    response_prefix: str | None = dataclasses.field(
        default=None, metadata={"help": "answer opener; none: the needle's first prefix_words words"}
    )
    prefix_words: int | None = dataclasses.field(
        default=None,
        metadata={"min": 1, "help": "needle words in the default prefix (none: authors 8, ctxaware 9)"},
    )
    needle_file: str | None = dataclasses.field(
        default=None, metadata={"path": "input_file", "help": "YAML/JSON with needle/question/keywords"}
    )
    lengths: list[int] = dataclasses.field(
        default_factory=list,
        metadata={
            "min": 1,
            "help": "lengths in tokens (default: --n-lengths values from 200 to the window, App. A.2)",
        },
    )
    depths: list[float] = dataclasses.field(
        default_factory=list,
        metadata={
            "min": 0,
            "max": 100,
            "help": "needle depths in percent (default: --n-depths values in 0..100)",
        },
    )
    n_lengths: int = dataclasses.field(
        default=20, metadata={"min": 1, "help": "lengths when --lengths is empty"}
    )
    n_depths: int = dataclasses.field(
        default=20, metadata={"min": 1, "help": "depths when --depths is empty"}
    )
    max_length: int | None = dataclasses.field(
        default=None, metadata={"min": 1, "help": "largest length; none: model window"}
    )
    template: str = dataclasses.field(
        default="1", metadata={"help": "prompt template 1-4 (paper Table 8) or all"}
    )
    modes: list[str] = dataclasses.field(
        default_factory=lambda: ["chat", "plain"], metadata={"help": "chat, plain"}
    )
    prefix: list[bool] = dataclasses.field(
        default_factory=lambda: [True, False], metadata={"help": "response prefix on/off"}
    )
    indicator: list[bool] = dataclasses.field(
        default_factory=lambda: [False], metadata={"help": "[IND] on/off"}
    )
    system: str = dataclasses.field(
        default="auto",
        metadata={"help": "auto (empty system turn, none for Gemma), default (template's own), or a text"},
    )
    chat_template: str = dataclasses.field(
        default="model",
        metadata={
            "path": "input_file",
            "help": "model (the tokenizer's), gemma (Gemma's turn markers) or a .jinja",
        },
    )
    prefix_separator: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "plain mode: text between the user turn and the response prefix; none: the protocol's "
            "(authors: a blank line, their tester's user_prompt + '\\n\\n' + hint; ctxaware: a newline)"
        },
    )
    chat_bos: Literal["auto", "tokenizer", "template"] = dataclasses.field(
        default="auto",
        metadata={
            "help": "chat prompts: tokenizer (tokenizer(prompt) adds its BOS, as the authors' tester: a "
            "second BOS for templates that write their own, e.g. Gemma, Llama-3), template (only the "
            "template's BOS), auto (authors: tokenizer; ctxaware: template)"
        },
    )

    def chat_special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens to a rendered chat prompt (`chat_bos`)."""
        if self.chat_bos == "auto":
            return self.protocol == "authors"
        return self.chat_bos == "tokenizer"

    def plain_prefix_separator(self) -> str:
        if self.prefix_separator is not None:
            return self.prefix_separator
        return "\n\n" if self.protocol == "authors" else "\n"


class Condition(NamedTuple):
    mode: str
    prefix: bool
    indicator: bool

    @property
    def name(self) -> str:
        return self.mode + ("+prefix" if self.prefix else "") + ("+ind" if self.indicator else "")


class NIHPrompt(NamedTuple):
    """One test: ``cell`` (metadata), the ``messages`` and the ``response_prefix``.

    ``prefix_separator``: the text between the user turn and the prefix in plain mode. ``special_tokens``:
    whether the tokenizer adds its special tokens to the chat text (``None``: `chat.render`'s default)."""

    cell: dict
    messages: list[dict]
    response_prefix: str | None
    prefix_separator: str = "\n"
    special_tokens: bool | None = None

    def render(self, tok) -> Rendered:
        return render(
            self.messages,
            tok,
            self.cell["mode"],
            response_prefix=self.response_prefix,
            prefix_separator=self.prefix_separator,
            add_special_tokens=self.special_tokens,
        )


# ---------------------------------------------------------------- haystack, needle, metric


def synthetic_haystack(n_sentences: int = 3000, seed: int = 0) -> str:
    """Neutral filler sentences (about 12 tokens each) that the project writes itself."""
    rng = random.Random(seed)
    subj = "The committee|A small team|The old library|Most visitors|The river|A local farmer|The museum"
    verb = "reviewed|described|repaired|noticed|measured|painted|collected|planned|visited|recorded"
    obj = (
        "the wooden bridge|a list of old maps|the morning schedule|several stone walls|the annual report|"
        "a box of letters|the northern road|two empty barns|the weather notes|a row of lamps"
    )
    tail = "before noon|after the rain|during the week|in early autumn|at a steady pace|near the old mill"
    parts = [p.split("|") for p in (subj, verb, obj, tail)]
    return " ".join(" ".join(rng.choice(p) for p in parts) + "." for _ in range(n_sentences))


def haystack_files(spec: str) -> list[Path] | None:
    """The ``.txt`` files of the haystack in sorted order (``None``: synthetic)."""
    if spec == "synthetic":
        return None
    if spec == "auto":  # never a silent change of haystack: that would change every NIH number
        d = essays_dir()
        if not d.is_dir():
            raise CtxawareError(
                f"the Paul Graham essays (the paper's haystack) are not at {d}; set CTXAWARE_DATA to the shared "
                "data folder, give --haystack DIR (a folder of .txt files), or ask for --haystack synthetic"
            )
        return sorted(d.glob("*.txt"))
    d = Path(spec).expanduser()
    if not d.is_dir():
        raise CtxawareError(
            f"haystack {spec!r} is not a directory; give a directory of .txt files, or 'synthetic'"
        )
    return sorted(d.glob("*.txt"))


def load_haystack(spec: str, protocol: str = "ctxaware") -> tuple[str, str]:
    """``(text, description)``. ``authors``: every line's last character (its newline) becomes a space, as
    the authors' ``read_context_files``; ``ctxaware``: whitespace collapsed."""
    files = haystack_files(spec)
    if files is None:
        return synthetic_haystack(), "synthetic"
    if protocol == "authors":
        lines = [ln for p in files for ln in p.read_text(errors="replace").splitlines(keepends=True)]
        text = "".join(ln[:-1] + " " for ln in lines)
    else:
        text = " ".join(" ".join(p.read_text(errors="replace").split()) for p in files).strip()
    if not text.strip():
        raise CtxawareError(
            f"haystack {spec} holds no text (.txt files); add some, or use --haystack synthetic"
        )
    return text, str(files[0].parent)


def load_needle(cfg: NeedleConfig) -> tuple[str, str, list[str], str]:
    """``(needle, question, keywords, response_prefix)`` from the config and the optional needle file."""
    over: dict = {}
    if cfg.needle_file:
        p = Path(cfg.needle_file)
        if not p.is_file():
            raise CtxawareError(f"needle file {p} does not exist; give a YAML or JSON file")
        try:
            over = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise CtxawareError(f"needle file {p} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
        if not isinstance(over, dict) or set(over) - {"needle", "question", "keywords", "response_prefix"}:
            raise CtxawareError(
                f"needle file {p} must be a mapping with needle, question, keywords, response_prefix"
            )
    needle = str(over.get("needle", cfg.needle)).strip()
    question = str(over.get("question", cfg.question)).strip()
    keywords = over.get("keywords", cfg.keywords)
    if isinstance(keywords, str):
        keywords = keywords.split(",")
    if not isinstance(keywords, list):
        raise CtxawareError(
            f"the needle's keywords must be a list of words (or one comma-separated string), got {keywords!r}"
        )
    keywords = [k for k in (str(k).lower().strip() for k in keywords or []) if k]
    if not needle or not question:
        raise CtxawareError("the needle and the question must not be empty")
    if not keywords:
        raise CtxawareError(
            "the keyword list is empty; give the words of the needle that an answer must contain"
        )
    prefix = over.get("response_prefix", cfg.response_prefix)
    if prefix is None:
        n = cfg.prefix_words or (8 if cfg.protocol == "authors" else 9)
        prefix = " ".join(needle.split(" ")[:n])
    return needle, question, keywords, str(prefix)


def answer_words(text: str) -> list[str]:
    """The authors' "subword match" words: lower-case, punctuation -> space, split on spaces and newlines."""
    text = text.lower()
    for p in string.punctuation:
        text = text.replace(p, " ")
    return [w.strip() for part in text.split(" ") for w in part.split("\n")]


def keyword_recall(output: str, keywords: list[str]) -> float:
    """Fraction of ``keywords`` found as whole words in ``output`` (paper Sec. 2.1; its error is 1 - this)."""
    words = set(answer_words(output))
    return sum(k.lower() in words for k in keywords) / len(keywords)


# ---------------------------------------------------------------- grid, conditions, templates


def check_protocol(cfg: NeedleConfig) -> None:
    if cfg.protocol not in PROTOCOLS:
        raise CtxawareError(f"protocol {cfg.protocol!r} is not one of {', '.join(PROTOCOLS)}")


def grid(cfg: NeedleConfig, window: int) -> tuple[list[int], list[float]]:
    """Lengths x depths: default ``round(linspace(200, max, n))`` x ``linspace(0, 100, n)`` (App. A.2;
    ``authors`` rounds the depths to integers as its tester does)."""
    top = cfg.max_length or window
    lengths = cfg.lengths or [int(round(x)) for x in np.linspace(200, top, cfg.n_lengths)]
    digits = 0 if cfg.protocol == "authors" else 2
    depths = cfg.depths or [round(float(x), digits) for x in np.linspace(0, 100, cfg.n_depths)]
    if max(lengths) > window:
        raise CtxawareError(
            f"length {max(lengths)} exceeds the model's window of {window} tokens; lower --lengths/--max-length"
        )
    return sorted(set(lengths)), sorted(set(depths))


def apply_chat_template_choice(tok, choice: str) -> None:
    """``--chat-template``: keep the tokenizer's (``model``), or set Gemma's turn markers or a .jinja file."""
    if choice in ("model", "", None):
        return
    if choice == "gemma":
        tok.chat_template = GEMMA_TEMPLATE
    elif choice.endswith((".jinja", ".j2")):
        if not Path(choice).is_file():
            raise CtxawareError(f"chat template file {choice} does not exist")
        tok.chat_template = Path(choice).read_text()
    else:
        raise CtxawareError(f"--chat-template {choice!r} is not model, gemma or a .jinja file")


def conditions(cfg: NeedleConfig, has_template: bool, model_name: str) -> list[Condition]:
    """The cross product modes x prefix x indicator; chat is skipped (with a note) for base models."""
    for m in cfg.modes:
        if m not in ("chat", "plain"):
            raise CtxawareError(f"mode {m!r} is not one of chat, plain")
    conds = [Condition(m, p, i) for m in cfg.modes for p in cfg.prefix for i in cfg.indicator]
    if not has_template:
        kept = [c for c in conds if c.mode == "plain"]
        if not kept:
            raise CtxawareError(
                f"{model_name} has no chat template, so only plain conditions can run; add --modes plain, "
                "or give one with --chat-template gemma|FILE.jinja"
            )
        if len(kept) < len(conds):
            print(
                f"note: {model_name} has no chat template; chat conditions skipped "
                "(--chat-template gemma|FILE.jinja gives it one)"
            )
        conds = kept
    return conds


def templates(cfg: NeedleConfig) -> list[int]:
    if cfg.template == "all":
        return [1, 2, 3, 4]
    if cfg.template not in ("1", "2", "3", "4"):
        raise CtxawareError(f"template {cfg.template!r} is not one of 1, 2, 3, 4, all (paper Table 8)")
    return [int(cfg.template)]


def is_gemma(tok, model_name: str) -> bool:
    """The authors' rule: no system turn for Gemma (its template refuses one)."""
    names = f"{model_name} {getattr(tok, 'name_or_path', '')}".lower()
    return "gemma" in names or "<start_of_turn>" in str(getattr(tok, "chat_template", "") or "")


def messages(
    cfg: NeedleConfig, tok, model_name: str, cond: Condition, template: int, context: str, question: str
) -> list[dict]:
    """System turn (``auto``: empty in chat, none for Gemma or in plain), then the user turn."""
    table = AUTHORS_TEMPLATES if cfg.protocol == "authors" else TEMPLATES
    q = append_indicator(question) if cond.indicator else question
    content = table[template - 1].format(context=context, retrieval_question=q)
    if cfg.system == "auto":
        system = None if cond.mode == "plain" or is_gemma(tok, model_name) else ""
    else:
        system = None if cfg.system == "default" else cfg.system
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": content}]


# ---------------------------------------------------------------- contexts


class Haystack:
    """The haystack tokenized once per tokenizer, with the token indices that start a sentence (ctxaware)."""

    def __init__(self, text: str, tok, max_tokens: int) -> None:
        text = text[: max_tokens * 12]  # plenty of characters for max_tokens tokens
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        self.text, self.offsets = text, enc["offset_mapping"]
        if len(self.offsets) < max_tokens:
            raise CtxawareError(
                f"the haystack has only {len(self.offsets)} tokens, fewer than the {max_tokens} needed"
            )
        self.starts = [
            k for k in range(len(self.offsets)) if k == 0 or text[: self.offsets[k][0]].rstrip()[-1:] in ".!?"
        ]

    def boundary(self, k: int) -> int:
        """The last sentence start at or before token ``k``."""
        return self.starts[bisect.bisect_right(self.starts, k) - 1]

    def context(self, n_tokens: int, depth: float, needle: str) -> tuple[str, int]:
        """The first ``n_tokens`` haystack tokens with the needle at depth% (moved back to a sentence start)."""
        if n_tokens == 0:
            return needle, 0
        k = self.boundary(int(depth / 100 * n_tokens))
        end = self.offsets[n_tokens - 1][1]
        cut = self.offsets[k][0] if k < n_tokens else end
        before, after = self.text[:cut].strip(), self.text[cut:end].strip()
        return " ".join(p for p in (before, needle, after) if p), k


class AuthorsHaystack:
    """The authors' tester: encode the essays, cut to the budget, insert the needle at a '.' token."""

    def __init__(self, text: str, tok, max_tokens: int) -> None:
        self.tok = tok
        self.ids = tok.encode(text, add_special_tokens=False)
        while len(self.ids) < max_tokens:  # the tester repeats the files until they are long enough
            text += text
            self.ids = tok.encode(text, add_special_tokens=False)
        self._cut: dict[int, list[int]] = {}

    def needle_ids(self, needle: str) -> list[int]:
        return self.tok.encode(needle + " ", add_special_tokens=False)  # the authors' needle ends with " "

    def needle_tokens(self, needle: str) -> int:
        return len(self.needle_ids(needle))

    def context(self, length: int, depth: float, needle: str) -> tuple[str, int, int]:
        """``(context, needle_token_index, context_tokens)`` for budget ``length`` and ``depth`` percent."""
        tok = self.tok
        if length not in self._cut:
            self._cut[length] = tok.encode(tok.decode(self.ids[:length]), add_special_tokens=False)
        ctx = self._cut[length]
        nd = self.needle_ids(needle)
        budget = length - BUFFER
        if len(ctx) + len(nd) > budget:
            ctx = ctx[: budget - len(nd)]  # Python slicing: a negative end for budgets below the needle
        at = len(ctx)
        if depth != 100:  # at 100 % the needle is appended at the end
            at = int(len(ctx) * (depth / 100))
            while at > 0 and tok.decode(ctx[at - 1]) != ".":
                at -= 1
        return tok.decode(ctx[:at] + nd + ctx[at:]), at, len(ctx) + len(nd)


def fit_context(cfg, tok, model_name, hay, needle, question, prefix, ref, template, length, depth):
    """ctxaware: ``(context, needle_token_in_haystack, haystack_tokens)`` so that ``ref``'s prompt fits."""

    def size(n: int) -> tuple[int, str, int]:
        ctx, k = hay.context(n, depth, needle)
        msgs = messages(cfg, tok, model_name, ref, template, ctx, question)
        special = cfg.chat_special_tokens() if ref.mode == "chat" else None
        p = NIHPrompt(
            {"mode": ref.mode}, msgs, prefix if ref.prefix else None, cfg.plain_prefix_separator(), special
        )
        return len(p.render(tok)), ctx, k

    base = size(0)[0]
    if base > length:
        raise CtxawareError(
            f"needle, question and template alone take {base} tokens, more than the length {length}; "
            "use larger --lengths or a shorter needle"
        )
    n, best = length - base, None
    for _ in range(6):  # re-tokenisation at the joins can move the count by a token or two
        total, ctx, k = size(n)
        if total <= length and (best is None or n > best[2]):
            best = (ctx, k, n)
        if total == length:
            break
        n = max(0, n + length - total)
    assert best is not None
    return best


def model_config(tok) -> dict:
    """The model's ``config.json`` (its ``text_config`` when it has one) read beside the tokenizer, without
    loading the model; ``{}`` when there is none (a hub id not cached, a bare tokenizer)."""
    cfg = Path(str(getattr(tok, "name_or_path", ""))) / "config.json"
    if not cfg.is_file():
        return {}
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return {}
    d = d.get("text_config", d) if isinstance(d, dict) else {}
    return d if isinstance(d, dict) else {}


def default_window(tok) -> int:
    """The model window from the tokenizer's ``config.json`` (no model load), else its model_max_length."""
    d = model_config(tok)
    if d.get("max_position_embeddings"):
        return int(d["max_position_embeddings"])
    w = int(getattr(tok, "model_max_length", 0) or 0)
    return w if 0 < w < 10**7 else 10**6


def build_prompts(
    cfg: NeedleConfig, tok, model_name: str = "model", window: int | None = None
) -> list[NIHPrompt]:
    """Every NIH test of ``cfg`` for this tokenizer. All conditions of a cell share one context, and that
    context does not depend on which modes/prefix/indicator are asked for (chat/plain twins hold the same
    haystack even when built by separate calls)."""
    check_protocol(cfg)
    needle, question, _, prefix = load_needle(cfg)
    window = window or default_window(tok)
    lengths, depths = grid(cfg, window)
    has_template = bool(getattr(tok, "chat_template", None))
    conds = conditions(cfg, has_template, model_name)
    text, _ = load_haystack(cfg.haystack, cfg.protocol)
    authors = cfg.protocol == "authors"
    hay = AuthorsHaystack(text, tok, max(lengths)) if authors else Haystack(text, tok, max(lengths))
    ref = Condition("chat" if has_template else "plain", True, True)  # sizes ctxaware contexts
    out = []
    for t in templates(cfg):
        for length in lengths:
            for depth in depths:
                if authors:
                    ctx, k, n_ctx = hay.context(length, depth, needle)
                    n = n_ctx - hay.needle_tokens(needle)
                else:
                    ctx, k, n = fit_context(
                        cfg, tok, model_name, hay, needle, question, prefix, ref, t, length, depth
                    )
                    n_ctx = len(tok.encode(ctx, add_special_tokens=False))
                for c in conds:
                    cell = {
                        "model": model_name,
                        "protocol": cfg.protocol,
                        "condition": c.name,
                        "mode": c.mode,
                        "prefix": c.prefix,
                        "indicator": c.indicator,
                        "template": t,
                        "length": length,
                        "depth": depth,
                        "context_tokens": n_ctx,
                        "haystack_tokens": n,
                        "needle_depth": round(100 * k / max(1, n), 2),
                    }
                    msgs = messages(cfg, tok, model_name, c, t, ctx, question)
                    special = cfg.chat_special_tokens() if c.mode == "chat" else None
                    sep = cfg.plain_prefix_separator()
                    out.append(NIHPrompt(cell, msgs, prefix if c.prefix else None, sep, special))
    return out


def needle_position(r: Rendered, tok, needle: str) -> int:
    """Token index in ``r`` where the needle starts (from character offsets)."""
    at = r.text.find(needle.strip())
    if at < 0:
        raise CtxawareError("the needle does not appear in the rendered prompt")
    enc = tok(r.text, add_special_tokens=r.special_tokens, return_offsets_mapping=True)
    assert enc["input_ids"] == r.input_ids, "re-tokenisation differs from render()"
    return next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > at and b > a)


def dump_prompts(
    cfg: NeedleConfig, tok, model_name: str, path: str | Path, window: int | None = None, append: bool = False
) -> int:
    """``--dump-prompts``: one JSON line per test (prompt text, ids, context size, needle token index)."""
    from tqdm.auto import tqdm

    needle = load_needle(cfg)[0]
    n = 0
    prompts = build_prompts(cfg, tok, model_name, window)
    with open(path, "a" if append else "w") as f:
        for p in tqdm(prompts, desc=f"dump-prompts {model_name}", unit="prompt", leave=False):
            r = p.render(tok)
            c = p.cell
            row = {
                "model": model_name,
                "condition": c["condition"],
                "template": c["template"],
                "length": c["length"],
                "depth": c["depth"],
                "prompt_text": r.text,
                "input_ids": r.input_ids,
                "context_tokens": c["context_tokens"],
                "needle_token_index": needle_position(r, tok, needle),
            }
            f.write(json.dumps(row) + "\n")
            n += 1
    return n
