"""Render a conversation to token ids with the role of every token.

One renderer for the whole package. ``render(messages, tokenizer, mode)`` returns a `Rendered` prompt:
token ids, a role per token (``sink``, ``system``, ``user``, ``assistant``, ``template``; see `ROLES`) and
the token span of every message's content.

Roles come from character offsets known by construction. In ``plain`` mode ctxaware joins the contents
itself, so it knows where each one lies. In ``chat`` mode the tokenizer's own chat template renders the
conversation twice, once with the real contents and once with a unique sentinel in place of each content;
the sentinel text gives the template's own text between contents (markers, an injected default system
prompt, a date header, the generation prompt), and the real text must read as that template text with the
contents in between (`_locate_chat`). A content is never searched for, so a user message "AI" cannot be
found inside SmolLM2's default system prompt. The fast tokenizer's offset mapping then assigns every
token the owner of its characters. No token ids are hard-coded, so any chat template works. A token whose
non-whitespace characters belong to one message gets that message's role (so ``"▁Hello"`` after a
template space is user content); a token that mixes content with marker text counts as ``template``.

The attention sink. Position 0 of every rendered prompt, in both modes, has role ``sink`` whatever its
text: with SmolLM2's template it is ``<|im_start|>``, without it the first user word (SmolLM2 adds no BOS
outside its template), with Gemma's tokenizer the BOS in both modes. Models park most of their attention
there (the attention sink), so counting it as ``user`` in one mode and as marker text in the other would
compare different things. ``sink`` replaces the former role ``bos`` (which only ever labelled a BOS at
position 0): a BOS later in the prompt (Llama-2 writes ``<s>`` before every turn) is ``template``, like
every other marker. Spans still locate message contents by ownership, so in plain mode the first user
span starts at 0 although its first token's role is ``sink``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ctxaware.core.errors import CtxawareError

ROLES = ("sink", "system", "user", "assistant", "template")
MESSAGE_ROLES = ("system", "user", "assistant")
Mode = Literal["chat", "plain"]


@dataclass(frozen=True)
class Span:
    """Token span ``[start, end)`` of one message's content; ``index`` is its position in the messages."""

    role: str
    start: int
    end: int
    index: int


@dataclass
class Rendered:
    """A rendered prompt: ``input_ids[i]`` has role ``roles[i]``; ``spans`` locate each message's content."""

    text: str
    input_ids: list[int]
    roles: list[str]
    spans: list[Span]
    mode: str
    prefix_span: Span | None = None  # the response prefix, when one was given
    messages: list[dict] = field(default_factory=list, repr=False)
    special_tokens: bool = False  # whether the tokenizer added its special tokens (BOS) to ``text``
    offsets: list[tuple[int, int]] = field(default_factory=list, repr=False)  # characters of each token

    def __len__(self) -> int:
        return len(self.input_ids)

    def __repr__(self) -> str:
        """One line: mode, length, tokens per role and the first characters (a notebook prints this, not
        thousands of ids)."""
        counts = ", ".join(f"{r}={self.roles.count(r)}" for r in ROLES if r in self.roles)
        head = self.text[:40] + ("..." if len(self.text) > 40 else "")
        return f"Rendered({self.mode}, {len(self)} tokens: {counts}; text={head!r})"

    def mask(self, *roles: str) -> torch.Tensor:
        """Boolean mask over tokens whose role is one of ``roles``."""
        for r in roles:
            if r == "bos":
                raise CtxawareError("role 'bos' is retired; position 0 (BOS or not) is role 'sink'")
            if r not in ROLES:
                raise CtxawareError(f"unknown role {r!r}; roles are {', '.join(ROLES)}")
        return torch.tensor([r in roles for r in self.roles], dtype=torch.bool)

    def role_ids(self) -> torch.Tensor:
        """Roles as integers indexing `ROLES` (shape ``(T,)``)."""
        return torch.tensor([ROLES.index(r) for r in self.roles], dtype=torch.long)

    def content_roles(self) -> list[str]:
        """`roles` with the sink given back to its owner: the role of the message (or response prefix) whose
        content position 0 is, else ``template`` (a BOS or marker). For comparing contents across modes."""
        out = list(self.roles)
        if out and out[0] == "sink":
            owners = [s for s in [*self.spans, self.prefix_span] if s is not None and s.start == 0 < s.end]
            out[0] = owners[0].role if owners else "template"
        return out

    def tokens(self, tokenizer) -> list[str]:
        return tokenizer.convert_ids_to_tokens(self.input_ids)


def check_messages(messages: Sequence[dict], require_alternation: bool = True) -> list[dict]:
    """Check roles and contents; return a clean copy. Optional system first, then user/assistant turns."""
    if not messages:
        raise CtxawareError("the conversation is empty; give at least one user message")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise CtxawareError(f"message {i} must be a mapping with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in MESSAGE_ROLES:
            raise CtxawareError(
                f"message {i} has unknown role {role!r}; use one of {', '.join(MESSAGE_ROLES)}"
            )
        if not isinstance(content, str):
            raise CtxawareError(
                f"message {i} ({role}) has non-string content of type {type(content).__name__}"
            )
        if role == "system" and i != 0:
            raise CtxawareError(
                f"message {i} is a system message; only the first message may be a system message"
            )
        clean.append({"role": role, "content": content})
    if require_alternation:
        turns = [m["role"] for m in clean if m["role"] != "system"]
        for i, r in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if r != expected:
                raise CtxawareError(
                    f"turn {i} is {r!r} but {expected!r} was expected; conversations must alternate user/assistant "
                    "starting with user (merge or drop consecutive turns of the same role)"
                )
    return clean


def _chat_text(messages: list[dict], tokenizer, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "this model")
        raise CtxawareError(
            f"{name} has no chat template; use mode 'plain', or set tokenizer.chat_template (e.g. the Zephyr template)"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raise_exception() surfaces as TemplateError
        roles = sorted({m["role"] for m in messages})
        name = getattr(tokenizer, "name_or_path", "this model")
        raise CtxawareError(
            f"the chat template of {name} cannot render roles {roles}: {str(e).splitlines()[0]}; "
            "fold the system prompt into the first user message or use another template"
        ) from None


def _plain_text(
    messages: list[dict], response_prefix: str | None, separator: str = "\n\n", prefix_separator: str = "\n"
) -> tuple[str, list[tuple[int, int]]]:
    """Contents joined by ``separator`` (default a blank line), no role markers; the response prefix follows
    the last message after ``prefix_separator``.

    Returns the text and the character span of every message's content, known by construction."""
    text, spans = "", []
    for i, m in enumerate(messages):
        if i:
            text += separator
        spans.append((len(text), len(text) + len(m["content"])))
        text += m["content"]
    if response_prefix is not None:
        text += prefix_separator + response_prefix if text else response_prefix
    return text, spans


def _trim_closing(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """``text.strip().removesuffix(eos).removesuffix(bos).strip()`` with the content spans moved along."""
    core = text.strip()
    for special in (tokenizer.eos_token, tokenizer.bos_token):
        if special:
            core = core.removesuffix(special)
    core = core.strip()
    lead = len(text) - len(text.lstrip())
    n = len(core)
    return core, [(min(max(0, a - lead), n), min(max(0, b - lead), n)) for a, b in spans]


def with_empty_system(messages: Sequence[dict], tokenizer) -> list[dict]:
    """``messages`` with an empty system turn first when they have none and the chat template accepts one
    (the authors' scorer, NIH tester and lm-eval wrapper; alignment-handbook's ``maybe_insert_system_message``).
    A template that refuses a system turn (Gemma) gets the conversation as it is."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") != "system":
        try:
            _chat_text(
                [{"role": "system", "content": ""}, {"role": "user", "content": "x"}], tokenizer, False
            )
        except CtxawareError:
            return msgs
        msgs.insert(0, {"role": "system", "content": ""})
    return msgs


def end_of_turn(tokenizer) -> str:
    """The text the chat template writes right after an assistant message that ends the conversation
    (``"<|im_end|>\\n"`` for ChatML, ``"</s>"`` for Zephyr, ``"<end_of_turn>\\n"`` for Gemma)."""
    msgs = [{"role": "user", "content": _sentinel(0)}, {"role": "assistant", "content": _sentinel(1)}]
    return _chat_text(msgs, tokenizer, add_generation_prompt=False).split(_sentinel(1), 1)[1]


def _sentinel(i: int) -> str:
    # No whitespace at either end (templates trim contents) and nothing a template writes itself.
    return f"CTXAWARExSENTINELx{i:04d}xEND"


def _locate_chat(
    text: str, messages: list[dict], tokenizer, add_generation_prompt: bool
) -> list[tuple[int, int]]:
    """Character span of every message's content in the template's ``text``, by construction.

    The conversation is rendered a second time with every content replaced by a unique sentinel. Splitting
    that text at the sentinels gives the template's own text (markers, default system prompt, date header,
    generation prompt) between the contents: ``t0 S0 t1 S1 ... tn``. The real text must then read
    ``t0 c0 t1 c1 ... tn``, where ``ci`` is message i's content as the template wrote it (verbatim or
    trimmed). Contents are therefore never searched for inside template text, whatever they say; if the
    real text cannot be rebuilt this way (a template that rewrites contents or changes its markers with
    them), rendering fails loudly instead of guessing.
    """
    marked = [{"role": m["role"], "content": _sentinel(i)} for i, m in enumerate(messages)]
    stext = _chat_text(marked, tokenizer, add_generation_prompt)
    pieces, pos = [], 0
    for i in range(len(messages)):
        s = _sentinel(i)
        at = stext.find(s, pos)
        if at < 0 or stext.count(s) != 1:
            pieces = None
            break
        pieces.append(stext[pos:at])
        pos = at + len(s)
    name = getattr(tokenizer, "name_or_path", "this model")
    if pieces is None:
        raise CtxawareError(
            f"the chat template of {name} does not write each message's content exactly once, in order; "
            "ctxaware cannot attribute its tokens to roles (use mode 'plain' or another template)"
        )
    pieces.append(stext[pos:])  # t0 .. tn
    spans: list[tuple[int, int]] = []
    at = 0
    if not text.startswith(pieces[0]):
        at = -1
    else:
        at = len(pieces[0])
    for i, m in enumerate(messages):
        if at < 0:
            break
        after = pieces[i + 1]
        last = i == len(messages) - 1
        c = m["content"]
        for cand in dict.fromkeys((c, c.strip(), c.lstrip(), c.rstrip())):
            end = at + len(cand)
            if text.startswith(cand, at) and (text[end:] == after if last else text.startswith(after, end)):
                spans.append((at, end))
                at = end + len(after)
                break
        else:
            at = -1
    if at != len(text):
        raise CtxawareError(
            f"the chat template of {name} rewrites message contents or changes its markers with them; "
            "ctxaware cannot attribute its tokens to roles (use mode 'plain' or another template)"
        )
    return spans


def render(
    messages: Sequence[dict],
    tokenizer,
    mode: Mode = "chat",
    *,
    add_generation_prompt: bool | None = None,
    response_prefix: str | None = None,
    max_tokens: int | None = None,
    separator: str = "\n\n",
    prefix_separator: str = "\n",
    add_special_tokens: bool | None = None,
    trim_closing: bool = False,
) -> Rendered:
    """Render ``messages`` with roles per token.

    Args:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        tokenizer: a fast tokenizer (offsets are needed).
        mode: ``chat`` uses the tokenizer's chat template; ``plain`` joins the contents with blank lines,
            without role markers, as the paper does to query instruct models without their template.
        add_generation_prompt: open an assistant turn at the end (default: when the last message is not
            from the assistant, in chat mode).
        response_prefix: text that starts the assistant's answer (role ``assistant``), e.g. the first
            words of the NIH needle.
        max_tokens: keep only the first ``max_tokens`` tokens (spans are clipped).
        separator, prefix_separator: plain mode only: the text between two contents (default a blank
            line) and before the response prefix (default a newline). The authors' attention-analysis
            script joins the user turn and the answer with one space (``prefix_separator=" "``).
        add_special_tokens: let the tokenizer add its special tokens (BOS). Default: in plain mode yes, in
            chat mode no (templates write BOS themselves). ``True`` in chat mode reproduces code that calls
            ``tokenizer(prompt)`` on a rendered template, which gives templates that write their own BOS
            (Gemma, Llama-3) a second one; the first BOS is then the sink, the template's one ``template``.
        trim_closing: chat mode: strip the text, remove a trailing EOS and then BOS text, strip again (the
            authors' lm-eval chat wrapper, which renders an empty assistant turn and cuts its closing
            marker: a ChatML prompt then ends ``<|im_start|>assistant``).
    """
    msgs = check_messages(messages)
    if not getattr(tokenizer, "is_fast", False):
        raise CtxawareError("ctxaware needs a fast tokenizer (offset mapping); load it with use_fast=True")
    if mode == "chat":
        if add_generation_prompt is None:
            add_generation_prompt = msgs[-1]["role"] != "assistant"
        if response_prefix is not None and not add_generation_prompt:
            raise CtxawareError(
                "a response prefix needs an open assistant turn; the last message must be a user turn"
            )
        text = _chat_text(msgs, tokenizer, add_generation_prompt)
        char_spans = _locate_chat(text, msgs, tokenizer, add_generation_prompt)
        if trim_closing:
            text, char_spans = _trim_closing(text, char_spans, tokenizer)
        if response_prefix is not None:
            text += response_prefix
        add_special = False  # chat templates write BOS themselves when the model wants it
    elif mode == "plain":
        text, char_spans = _plain_text(msgs, response_prefix, separator, prefix_separator)
        add_special = True
    else:
        raise CtxawareError(f"mode {mode!r} is not one of chat, plain")

    if add_special_tokens is not None:
        add_special = add_special_tokens
    owner = [-1] * len(text)  # message index owning each character; -1 = template
    for i, (a, b) in enumerate(char_spans):
        owner[a:b] = [i] * (b - a)
    prefix_owner = len(msgs)
    if response_prefix:
        a = len(text) - len(response_prefix)
        owner[a:] = [prefix_owner] * len(response_prefix)

    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    token_owner: list[int] = []  # message index per token; -1 = template
    for tid, (a, b) in zip(ids, offsets):
        own = {owner[c] for c in range(a, b) if not text[c].isspace()}
        if not own:  # a whitespace-only token belongs to whoever owns all of its characters
            own = {owner[c] for c in range(a, b)}
        token_owner.append(own.pop() if len(own) == 1 and tid not in special else -1)

    def role_of(o: int) -> str:
        if o == -1:
            return "template"
        return "assistant" if o == prefix_owner else msgs[o]["role"]

    roles = [role_of(o) for o in token_owner]
    if roles:
        roles[0] = "sink"  # the attention sink: position 0, whatever its text (spans still locate its owner)

    offsets = [tuple(o) for o in offsets]
    if max_tokens is not None and len(ids) > max_tokens:
        ids, roles, token_owner = ids[:max_tokens], roles[:max_tokens], token_owner[:max_tokens]
        offsets = offsets[:max_tokens]

    def span_of(o: int, role: str, index: int) -> Span:
        where = [p for p, t in enumerate(token_owner) if t == o]
        return Span(role, where[0], where[-1] + 1, index) if where else Span(role, len(ids), len(ids), index)

    spans = [span_of(i, m["role"], i) for i, m in enumerate(msgs)]
    prefix_span = span_of(prefix_owner, "assistant", len(msgs)) if response_prefix else None
    return Rendered(text, list(ids), roles, spans, mode, prefix_span, msgs, add_special, offsets)


CHARS_PER_TOKEN_BOUND = 64  # no tokenizer ctxaware knows writes longer tokens (a run of spaces at most)


def clip_messages(messages: Sequence[dict], max_tokens: int | None) -> list[dict]:
    """``messages`` cut to ``max_tokens * CHARS_PER_TOKEN_BOUND`` content characters in all, later
    messages dropped: the first ``max_tokens`` tokens of the rendering are unchanged, and a 50 MB row is not
    tokenized whole only to keep its first 2,047 tokens (issue 23 §4). Every message up to the cut is
    kept, so roles still alternate."""
    if max_tokens is None:
        return list(messages)
    budget, out = max_tokens * CHARS_PER_TOKEN_BOUND, []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str) or budget <= 0:
            if budget <= 0:
                break
            out.append(m)
            continue
        out.append({**m, "content": content[:budget]} if len(content) > budget else m)
        budget -= len(content)
    return out


def user_prompt(content: str, system: str | None = None) -> list[dict]:
    """A one-turn conversation: an optional system message and one user message."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": content}]


def describe(rendered: Rendered, tokenizer) -> str:
    """One line per token: position, role and token text (for ``ctxaware render`` and the demo)."""
    lines = []
    for i, (tid, role) in enumerate(zip(rendered.input_ids, rendered.roles)):
        lines.append(f"{i:5d}  {role:<9}  {tokenizer.decode([tid])!r}")
    return "\n".join(lines)
