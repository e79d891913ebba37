"""RULER's retrieval family and HELMET's JSON key-value task as prompt generators (issue 28 section 1).

Facts taken from RULER (hsiehjackson/RULER: ``scripts/synthetic.yaml``, ``scripts/data/synthetic/niah.py``,
``variable_tracking.py``, ``scripts/data/synthetic/constants.py``, ``scripts/eval/synthetic/constants.py``)
and HELMET (princeton-nlp/HELMET ``data.py`` ``load_json_kv``, ``utils.py``), re-written here:

- the needle ``One of the special magic {type_v} for {key} is: {value}.``; keys are adjective-noun words
  (``words``), 7-digit numbers or UUIDs; values 7-digit numbers or UUIDs; haystacks ``essay`` (Paul
  Graham, split into sentences, needles inserted at depths drawn from 40 evenly spaced depths), ``repeat``
  (the grass-is-green noise, needles at random lines) and ``needle`` (every line a distractor needle);
- the task template, and for the single-value tasks its singular wording (``A special magic number``,
  ``What is the special magic number``); the answer prefix (``The special magic numbers for K mentioned
  in the provided text are``), which RULER appends after the model's chat template; 128 new tokens;
- ``vt``: one chain of 4 hops (``VAR ABCDE = 12345``, then ``VAR FGHIJ = VAR ABCDE``) in repeated noise,
  every variable holding the value asked for is an answer, 30 new tokens;
- ``json_kv``: HELMET's prompt (``{context}\\n\\nExtract the value corresponding to the specified key in the
  JSON object below.\\n\\nKey: {key}``, then ``Corresponding value:``), UUID keys and values, 100 new tokens,
  substring exact match of the normalised answer;
- metrics: ``string_match_all`` (the share of references found in the output, case-insensitive) for every
  NIH and vt task, ``string_match_part`` (any reference found) where RULER uses it (QA, not here).

Length means what it means in RULER: the whole prompt, as the model reads it, plus the new tokens fits
``length`` (here: the longer of the chat and plain renderings, so that both twins of a pair share one
context). Deviations, by necessity: RULER draws keys from the ``wonderwords`` lists and splits essays with
NLTK's ``sent_tokenize``; ctxaware uses a built-in list of 64 adjectives x 64 nouns and a regular-expression
sentence split (neither package is a dependency). Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import json
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ctxaware.core.errors import CtxawareError

NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_TEMPLATE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. I will quiz "
    "you about the {type_v} afterwards.\n{context}\nWhat are all the special magic {type_v} for {query} "
    "mentioned in the provided text?"
)
NIAH_PREFIX = "The special magic {type_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# RULER's own spelling ("assgined") is kept: the prefix is part of the published prompt
VT_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are:"
)
JSON_KV_TEMPLATE = "{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\nKey: {query}"
JSON_KV_PREFIX = "Corresponding value:"
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.linspace(0, 100, 40), rounded

ADJECTIVES = (
    "able acid angry automatic awake bad beautiful bent bitter black blue boiling bright broken brown cheap "
    "clean clear cold complete cruel dark dead deep dirty dry early elastic electric equal false fat feeble "
    "female fertile first fixed flat foolish free frequent full future general good gray great green hanging "
    "happy hard healthy high hollow important kind late left like living long loose loud low male married"
).split()[:64]
NOUNS = (
    "account acoustics activity actor adjustment advertisement airport alarm amount animal answer apparatus "
    "apple argument army attack attempt attention authority baby bag balance ball band basin basket bath "
    "beam bear bed bee behavior belief bell berry bird birth bite blade blood board boat body bomb bone book "
    "boot bottle boundary brain brake branch brass bread breath brick bridge brother bubble bucket building "
    "bulb burn butter"
).split()[:64]


@dataclass(frozen=True)
class RulerTask:
    """One task definition: RULER's (or HELMET's) arguments."""

    name: str
    family: str  # niah, vt, json_kv
    haystack: str = "essay"  # essay, repeat, needle (niah); noise (vt); json (json_kv)
    type_k: str = "words"
    type_v: str = "numbers"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1
    new_tokens: int = 128
    metric: str = "string_match_all"


TASKS: dict[str, RulerTask] = {
    t.name: t
    for t in (
        RulerTask("niah_single_1", "niah", "repeat"),
        RulerTask("niah_single_2", "niah", "essay"),
        RulerTask("niah_single_3", "niah", "essay", type_v="uuids"),
        RulerTask("niah_multikey_1", "niah", "essay", num_k=4),
        RulerTask("niah_multikey_2", "niah", "needle"),
        RulerTask("niah_multikey_3", "niah", "needle", type_k="uuids", type_v="uuids"),
        RulerTask("niah_multivalue", "niah", "essay", num_v=4),
        RulerTask("niah_multiquery", "niah", "essay", num_q=4),
        RulerTask("vt", "vt", "noise", new_tokens=30),
        RulerTask(
            "json_kv",
            "json_kv",
            "json",
            type_k="uuids",
            type_v="uuids",
            new_tokens=100,
            metric="substring_exact_match",
        ),  # fmt: skip
    )
}


@dataclass
class RulerExample:
    """One generated example: the task template filled in (``user``), the answer prefix, the references."""

    task: str
    index: int
    user: str
    answer_prefix: str
    answers: list[str]
    new_tokens: int
    needles: list[str] = field(default_factory=list)
    size: int = 0  # haystack units used (sentences, lines, key-value pairs)


def _random(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise CtxawareError(f"needle type {kind!r} is not numbers, words or uuids")


def essay_sentences(text: str) -> list[str]:
    """The essay split into sentences (after ``.``, ``!`` or ``?`` followed by a space)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def _niah(task: RulerTask, size: int, rng: random.Random, essay: list[str]) -> RulerExample:
    num_k = max(task.num_k, task.num_q)
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random(task.type_k, rng))
        values.append([_random(task.type_v, rng) for _ in range(task.num_v)])
        needles += [NEEDLE.format(type_v=task.type_v, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if task.haystack == "essay":
        sents = essay[:size]
        cuts = sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
        parts, last = [], 0
        for cut, needle in zip(cuts, needles):
            parts += [*sents[last:cut], needle]
            last = cut
        context = " ".join(parts + sents[last:])
    else:
        if task.haystack == "repeat":
            lines = [NOISE] * size
        else:  # every line a distractor needle with its own key and value
            lines = [NEEDLE.format(type_v=task.type_v, key=_random(task.type_k, rng), value=_random(task.type_v, rng))
                     for _ in range(size)]  # fmt: skip
        for index, needle in zip(sorted(rng.sample(range(size + 1), len(needles)), reverse=True), needles):
            lines.insert(index, needle)
        context = "\n".join(lines)
    asked = rng.sample(range(num_k), task.num_q)
    query = (
        keys[asked[0]]
        if task.num_q == 1
        else ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]]
    )
    answers = [v for i in asked for v in values[i]]
    template, prefix, type_v = NIAH_TEMPLATE, NIAH_PREFIX, task.type_v
    if task.num_q * task.num_v == 1:  # RULER's singular wording for one value
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        prefix, type_v = prefix.replace("are", "is"), type_v[:-1]
    user = template.format(type_v=type_v, context=context, query=query)
    return RulerExample(task.name, 0, user, prefix.format(type_v=type_v, query=query), answers, task.new_tokens,
                        needles, size)  # fmt: skip


def _vt(task: RulerTask, size: int, rng: random.Random, essay: list[str]) -> RulerExample:
    hops = 4
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names else []
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    sentences = [NOISE + "\n"] * max(size, len(chain))
    for offset, (pos, line) in enumerate(zip(sorted(rng.sample(range(len(sentences)), len(chain))), chain)):
        sentences.insert(pos + offset, line)
    context = " ".join(sentences).replace(". \n", ".\n")
    user = VT_TEMPLATE.format(context=context, query=value)
    return RulerExample(task.name, 0, user, VT_PREFIX.format(num_v=hops + 1, query=value), names, task.new_tokens,
                        chain, size)  # fmt: skip


def _json_kv(task: RulerTask, size: int, rng: random.Random, essay: list[str]) -> RulerExample:
    pairs = {_random("uuids", rng): _random("uuids", rng) for _ in range(max(size, 1))}
    key = rng.choice(list(pairs))
    context = "JSON data:\n" + json.dumps(pairs, indent=1)
    user = JSON_KV_TEMPLATE.format(context=context, query=json.dumps(key))
    return RulerExample(task.name, 0, user, JSON_KV_PREFIX, [pairs[key]], task.new_tokens, [key], size)


BUILDERS: dict[str, Callable[[RulerTask, int, random.Random, list[str]], RulerExample]] = {
    "niah": _niah,
    "vt": _vt,
    "json_kv": _json_kv,
}


def make_example(
    task: RulerTask, size: int, seed: int, index: int, essay: Sequence[str] = ()
) -> RulerExample:
    """Example ``index`` of ``task`` with ``size`` haystack units, the same for the same arguments."""
    rng = random.Random(f"{seed}:{task.name}:{index}:{size}")
    ex = BUILDERS[task.family](task, size, rng, list(essay))
    ex.index = index
    return ex


def fit_size(count: Callable[[int], int], budget: int, start: int = 8, limit: int = 1 << 20) -> int:
    """The largest haystack size whose prompt ``count(size)`` tokens fit ``budget`` (0 when none does): a
    doubling search, then bisection, as RULER grows its haystack until the prompt overflows."""
    if count(1) > budget:
        return 0
    lo, hi = 1, start
    while hi < limit and count(hi) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= budget else (lo, mid)
    return lo


def string_match_all(output: str, answers: Sequence[str]) -> float:
    """RULER: the share of the references found in the output (case-insensitive)."""
    return sum(a.lower() in output.lower() for a in answers) / len(answers)


def string_match_part(output: str, answers: Sequence[str]) -> float:
    """RULER: 1 when any reference is found in the output (case-insensitive)."""
    return float(any(a.lower() in output.lower() for a in answers))


def _normalize(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def substring_exact_match(output: str, answers: Sequence[str]) -> float:
    """HELMET: 1 when a normalised reference is a substring of the normalised output."""
    return float(any(_normalize(a) in _normalize(output) for a in answers))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part,
           "substring_exact_match": substring_exact_match}  # fmt: skip


def score(task: RulerTask, output: str, answers: Sequence[str]) -> float:
    return METRICS[task.metric](output, answers)
