"""Render a conversation to token ids with the role of every token.

One renderer for the whole package. ``render(messages, tokenizer, mode)`` returns a `Rendered` prompt:
token ids, a role per token (``bos``, ``system``, ``user``, ``assistant``, ``template``) and the token
span of every message's content.

Roles come from character offsets: the conversation is rendered to text (by the tokenizer's own chat
template in ``chat`` mode, or by plain joining in ``plain`` mode), each message's content is located in
that text, and the fast tokenizer's offset mapping assigns every token the owner of its characters.
No token ids are hard-coded, so any chat template works. A token whose non-whitespace characters
belong to one message gets that message's role (so ``"▁Hello"`` after a template space is user
content); a token that mixes content with marker text counts as ``template``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ctxaware.errors import CtxawareError

ROLES = ("bos", "system", "user", "assistant", "template")
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

    def __len__(self) -> int:
        return len(self.input_ids)

    def mask(self, *roles: str) -> torch.Tensor:
        """Boolean mask over tokens whose role is one of ``roles``."""
        for r in roles:
            if r not in ROLES:
                raise CtxawareError(f"unknown role {r!r}; roles are {', '.join(ROLES)}")
        return torch.tensor([r in roles for r in self.roles], dtype=torch.bool)

    def role_ids(self) -> torch.Tensor:
        """Roles as integers indexing `ROLES` (shape ``(T,)``)."""
        return torch.tensor([ROLES.index(r) for r in self.roles], dtype=torch.long)

    def tokens(self, tokenizer) -> list[str]:
        return tokenizer.convert_ids_to_tokens(self.input_ids)


def validate_messages(messages: Sequence[dict], require_alternation: bool = True) -> list[dict]:
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


def _plain_text(messages: list[dict], response_prefix: str | None) -> str:
    # Contents separated by blank lines, no role markers; the response prefix follows the last message.
    parts = [m["content"] for m in messages]
    text = "\n\n".join(parts)
    if response_prefix is not None:
        text += "\n" + response_prefix if text else response_prefix
    return text


def _locate(text: str, messages: list[dict], start: int = 0) -> list[tuple[int, int]]:
    """Character span of every message's content in ``text``, searched in order."""
    spans = []
    pos = start
    for i, m in enumerate(messages):
        content = m["content"]
        for candidate in (content, content.strip()):
            at = text.find(candidate, pos) if candidate else pos
            if at >= 0:
                spans.append((at, at + len(candidate)))
                pos = at + len(candidate)
                break
        else:
            raise CtxawareError(
                f"the content of message {i} ({m['role']}) does not appear in the rendered text; "
                "the chat template rewrites message contents, which ctxaware cannot attribute to roles"
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
    """
    msgs = validate_messages(messages)
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
        if response_prefix is not None:
            text += response_prefix
        add_special = False  # chat templates write BOS themselves when the model wants it
    elif mode == "plain":
        text = _plain_text(msgs, response_prefix)
        add_special = True
    else:
        raise CtxawareError(f"mode {mode!r} is not one of chat, plain")

    char_spans = _locate(text, msgs)
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
    token_owner: list[int] = []  # message index per token; -1 = template, -2 = bos
    for pos, (tid, (a, b)) in enumerate(zip(ids, offsets)):
        if pos == 0 and tid == tokenizer.bos_token_id:
            token_owner.append(-2)
            continue
        own = {owner[c] for c in range(a, b) if not text[c].isspace()}
        if not own:  # a whitespace-only token belongs to whoever owns all of its characters
            own = {owner[c] for c in range(a, b)}
        token_owner.append(own.pop() if len(own) == 1 and tid not in special else -1)

    def role_of(o: int) -> str:
        if o == -2:
            return "bos"
        if o == -1:
            return "template"
        return "assistant" if o == prefix_owner else msgs[o]["role"]

    roles = [role_of(o) for o in token_owner]

    if max_tokens is not None and len(ids) > max_tokens:
        ids, roles, token_owner = ids[:max_tokens], roles[:max_tokens], token_owner[:max_tokens]

    def span_of(o: int, role: str, index: int) -> Span:
        where = [p for p, t in enumerate(token_owner) if t == o]
        return Span(role, where[0], where[-1] + 1, index) if where else Span(role, len(ids), len(ids), index)

    spans = [span_of(i, m["role"], i) for i, m in enumerate(msgs)]
    prefix_span = span_of(prefix_owner, "assistant", len(msgs)) if response_prefix else None
    return Rendered(text, list(ids), roles, spans, mode, prefix_span, msgs)


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


def main(argv: list[str]) -> int:
    """``ctxaware render``: print a conversation's tokens with their roles, with or without the template."""
    import dataclasses
    import json

    from ctxaware.config import ModelConfig, parse_config

    @dataclasses.dataclass
    class RenderConfig(ModelConfig):
        """Show how a conversation is rendered and which role every token gets."""

        messages: str = dataclasses.field(
            default='[{"role": "user", "content": "What is the capital of France?"}]',
            metadata={"help": "JSON list of {role, content} messages, or a path to a JSON file holding one"},
        )
        mode: str = dataclasses.field(
            default="chat", metadata={"help": "chat (the model's template) or plain"}
        )
        response_prefix: str | None = dataclasses.field(
            default=None, metadata={"help": "text that starts the answer"}
        )

    cfg = parse_config(RenderConfig, argv, prog="ctxaware render")
    from pathlib import Path

    from ctxaware.models import load_tokenizer

    raw = Path(cfg.messages).read_text() if Path(cfg.messages).is_file() else cfg.messages
    try:
        messages = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CtxawareError(
            f"--messages is not valid JSON ({e.msg}); give a JSON list of {{role, content}}"
        ) from None
    tok = load_tokenizer(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    r = render(messages, tok, cfg.mode, response_prefix=cfg.response_prefix)  # type: ignore[arg-type]
    print(describe(r, tok))
    return 0
