"""Role spans on five chat-template styles, checked against the rendered text itself."""

from __future__ import annotations

import pytest

from ctxaware.chat import render, user_prompt, validate_messages
from ctxaware.errors import CtxawareError

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
ZEPHYR = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TEMPLATES = {"chatml": None, "llama2": LLAMA2, "llama3": LLAMA3, "zephyr": ZEPHYR, "gemma": GEMMA}

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Context: Paris is the capital of France.\nWhat is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy? Use 2 words."},
]


@pytest.fixture()
def tok(smollm2_tok):
    t = smollm2_tok
    original = t.chat_template
    yield t
    t.chat_template = original


def _check_roles(r, tok, messages):
    # Every message's content tokens decode back to its content and carry its role.
    for span, m in zip(r.spans, messages):
        assert span.end > span.start, f"no tokens for {m['role']}"
        assert set(r.roles[span.start : span.end]) == {m["role"]}
        decoded = tok.decode(r.input_ids[span.start : span.end]).strip()
        content = m["content"].strip()
        if decoded != content:
            # Only a token that straddles content and a marker (e.g. ".<|" in "briefly.<|eot_id|>") may take
            # an edge character away from the content, and that token is template.
            assert decoded in content and len(content) - len(decoded) <= 2
            around = tok.decode(r.input_ids[max(0, span.start - 1) : span.end + 1])
            assert content in around
            edge = [i for i in (span.start - 1, span.end) if 0 <= i < len(r) and r.roles[i] == "template"]
            assert edge
    # Tokens outside every span are markers (template) or BOS; no content token is left outside.
    inside = {i for s in r.spans for i in range(s.start, s.end)}
    if r.prefix_span:
        inside |= set(range(r.prefix_span.start, r.prefix_span.end))
    outside = {r.roles[i] for i in range(len(r)) if i not in inside}
    assert outside <= {"template", "bos"}
    n_content = sum(1 for role in r.roles if role in ("system", "user", "assistant"))
    assert n_content == len(inside)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_role_spans_on_template_styles(tok, name):
    if TEMPLATES[name] is not None:
        tok.chat_template = TEMPLATES[name]
    messages = CONVERSATION[1:] if name == "gemma" else CONVERSATION
    r = render(messages, tok, "chat", response_prefix="Rome")
    _check_roles(r, tok, messages)
    assert r.roles[r.prefix_span.start : r.prefix_span.end] == ["assistant"] * (
        r.prefix_span.end - r.prefix_span.start
    )
    assert r.text.endswith("Rome")
    assert "template" in r.roles  # the markers are there and are not content


def test_plain_mode_has_no_markers(tok):
    r = render(CONVERSATION[1:2], tok, "plain", response_prefix="Answer:")
    assert "template" not in r.roles[: r.spans[0].end]
    assert r.text == CONVERSATION[1]["content"] + "\nAnswer:"
    _check_roles(r, tok, CONVERSATION[1:2])


def test_chat_and_plain_share_the_user_tokens(tok):
    msgs = user_prompt("The key is 7421. What is the key?")
    chat, plain = render(msgs, tok, "chat"), render(msgs, tok, "plain")
    cu = [t for t, role in zip(chat.input_ids, chat.roles) if role == "user"]
    pu = [t for t, role in zip(plain.input_ids, plain.roles) if role == "user"]
    assert cu == pu


def test_system_rejected_by_template_is_an_error_not_a_drop(tok):
    tok.chat_template = GEMMA
    with pytest.raises(CtxawareError, match="system"):
        render(CONVERSATION, tok, "chat")


def test_missing_template_in_chat_mode(tok):
    tok.chat_template = None
    with pytest.raises(CtxawareError, match="no chat template"):
        render(user_prompt("hi"), tok, "chat")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ([{"role": "robot", "content": "x"}], "unknown role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": 3}], "non-string"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system"),
    ],
)
def test_bad_conversations(messages, match):
    with pytest.raises(CtxawareError, match=match):
        validate_messages(messages)


def test_truncation_clips_spans(tok):
    r = render(CONVERSATION, tok, "chat", max_tokens=30)
    assert len(r) == 30 and len(r.roles) == 30
    assert all(s.end <= 30 for s in r.spans)
