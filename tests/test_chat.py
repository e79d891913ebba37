"""Role spans on five chat-template styles, checked against the rendered text itself."""

from __future__ import annotations

import pytest

from ctxaware.core.errors import CtxawareError
from ctxaware.rendering.chat import check_messages, render, user_prompt

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
LLAMA3_DATE = (  # Llama-3.1 style: a system turn with a date header is always injected
    "<|begin_of_text|>{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] | trim %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "{{ sys }}<|eot_id|>{% for m in msgs %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TEMPLATES = {
    "chatml": None,
    "llama2": LLAMA2,
    "llama3": LLAMA3,
    "llama3_date": LLAMA3_DATE,
    "zephyr": ZEPHYR,
    "gemma": GEMMA,
}
# The text each template writes right before a message's content (an independent statement of where it is).
HEADER = {
    "chatml": lambda role: f"<|im_start|>{role}\n",
    "llama2": lambda role: "[INST]" if role == "user" else "[/INST]",
    "llama3": lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n",
    "llama3_date": lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n",
    "zephyr": lambda role: f"<|{role}|>\n",
    "gemma": lambda role: f"<start_of_turn>{'model' if role == 'assistant' else role}\n",
}

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
        # the sink (position 0) keeps its own role even when its text is content (plain mode)
        assert set(r.roles[max(span.start, 1) : span.end]) == {m["role"]}
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
    # Tokens outside every span are markers (template) or the sink; no content token is left outside.
    inside = {i for s in r.spans for i in range(s.start, s.end)}
    if r.prefix_span:
        inside |= set(range(r.prefix_span.start, r.prefix_span.end))
    outside = {r.roles[i] for i in range(len(r)) if i not in inside}
    assert outside <= {"template", "sink"}
    assert r.roles[0] == "sink"
    n_content = sum(1 for role in r.roles if role in ("system", "user", "assistant"))
    assert n_content == len(inside - {0})


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
    cu = [chat.input_ids[s.start : s.end] for s in chat.spans]
    pu = [plain.input_ids[s.start : s.end] for s in plain.spans]
    assert cu == pu  # same content tokens; plain's first one is the sink, chat's sink is <|im_start|>
    assert [t for t, role in zip(plain.input_ids, plain.roles) if role == "user"] == cu[0][1:]


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
        check_messages(messages)


def test_truncation_clips_spans(tok):
    r = render(CONVERSATION, tok, "chat", max_tokens=30)
    assert len(r) == 30 and len(r.roles) == 30
    assert all(s.end <= 30 for s in r.spans)


# Contents that also occur in template-injected text (SmolLM2's default system prompt "You are a helpful AI
# assistant named SmolLM...", Llama-3.1's date header, role names, marker fragments).
TRICKY = [
    [{"role": "user", "content": "AI"}],
    [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
    [{"role": "user", "content": "system"}],
    [
        {"role": "user", "content": "Today Date"},
        {"role": "assistant", "content": "Date"},
        {"role": "user", "content": "user"},
    ],
    [
        {"role": "user", "content": "assistant"},
        {"role": "assistant", "content": "user"},
        {"role": "user", "content": "model"},
    ],
    [
        {"role": "user", "content": "You are"},
        {"role": "assistant", "content": "named"},
        {"role": "user", "content": "n"},
    ],
    [{"role": "user", "content": " Hugging Face "}, {"role": "assistant", "content": "2024"}],
]


def _ids(x):
    return x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("case", range(len(TRICKY)))
def test_spans_by_construction_not_found_in_injected_text(tok, name, case):
    if TEMPLATES[name] is not None:
        tok.chat_template = TEMPLATES[name]
    messages = TRICKY[case]
    r = render(messages, tok, "chat")
    # rendering equals apply_chat_template token for token
    want = _ids(
        tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=r.messages[-1]["role"] == "user"
        )
    )
    assert r.input_ids == list(want)
    _check_roles(r, tok, messages)
    offsets = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    end = 0
    for span, m in zip(r.spans, messages):
        a, b = offsets[span.start][0], offsets[span.end - 1][1]
        assert r.text[a:b].strip() == m["content"].strip()
        assert r.text[:a].rstrip().endswith(HEADER[name](m["role"]).rstrip()), (name, m, r.text[:a])
        assert span.start >= end
        end = span.end


def test_sink_is_position_zero_in_both_modes(tok):
    msgs = user_prompt("Paris is lovely. Where is Paris?")
    plain, chat = render(msgs, tok, "plain"), render(msgs, tok, "chat")
    # SmolLM2 adds no BOS outside its template: position 0 is the user word "Paris", yet its role is sink
    assert tok.decode(plain.input_ids[:1]) == "Paris" and plain.roles[0] == "sink"
    assert plain.roles[1:] == ["user"] * (len(plain) - 1) and plain.spans[0].start == 0
    assert chat.input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and chat.roles[0] == "sink"
    assert chat.roles.count("sink") == plain.roles.count("sink") == 1
    assert chat.mask("sink").tolist() == [True] + [False] * (len(chat) - 1)
    assert chat.role_ids()[0].item() == 0
    assert plain.content_roles()[0] == "user" and chat.content_roles()[0] == "template"
    with pytest.raises(CtxawareError, match="retired"):
        chat.mask("bos")


def test_sink_on_a_tokenizer_with_bos():
    from ctxaware.core.models import load_tokenizer

    try:
        g = load_tokenizer("gemma3-270m")
    except Exception:  # pragma: no cover - the model is not cached
        pytest.skip("gemma3-270m tokenizer not available")
    r = render(user_prompt("Paris"), g, "plain")
    assert r.input_ids[0] == g.bos_token_id and r.roles[0] == "sink"
    assert r.roles[1:] == ["user"] * (len(r) - 1)


def test_rendered_repr_is_one_short_line(tok):
    """Issue 26 §4: a notebook shows a Rendered as one line (mode, length, tokens per role, the start of the
    text), not its thousands of ids; the counts are the roles' real counts."""
    r = render([{"role": "user", "content": "Read this. " * 300}], tok, "chat")
    text = repr(r)
    assert "\n" not in text and len(text) < 200
    assert (
        f"{len(r)} tokens" in text
        and f"user={r.roles.count('user')}" in text
        and text.startswith("Rendered(chat")
    )


def test_readme_python_api_runs_as_written(capsys):
    """Issue 26 §4: the README's notebook example runs as written (top-level API, labelled role shares)."""
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    block = readme.split("## Python API (notebooks)\n\n```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    shares = scope["shares"]
    assert len(shares) == 2 and all(
        set(s) == {"sink", "system", "user", "assistant", "template"} for s in shares
    )
    assert all(abs(sum(s.values()) - 1) < 1e-3 for s in shares)  # a softmax row, split over the roles
    assert (
        shares[0]["user"] > 0 and shares[1]["user"] > 0 and shares[0]["template"] > 0
    )  # markers in chat only
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("Rendered(chat, ")


def test_import_ctxaware_is_light():
    """``import ctxaware`` loads no torch, transformers or matplotlib (the API loads on first use)."""
    import subprocess
    import sys

    code = "import sys, ctxaware; print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_demo_generation_step_shows_the_expected_answer(smollm2, capsys):
    """Issue 27 §3: the demo's step 2 prints the expected answer beside the model's and says whether the
    output contains it (checked here against the printed output itself)."""
    from ctxaware import demo

    model, tok = smollm2
    demo.show_generation(model, tok)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    assert len(lines) == 2
    for line in lines:
        said = line.split("] ", 1)[1].rsplit("  (", 1)[0]
        verdict = "contains it" if "friday" in said.lower() else "does not contain it"
        assert f"expected 'Friday': {verdict})" in line
