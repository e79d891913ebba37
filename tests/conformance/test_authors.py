"""Conformance: ctxaware's defaults against independent ports of the authors' code paths (`authors.py`).

Each test compares what ctxaware builds by default (prompt text, token ids, masks, query index, score) with
what the authors' released code builds for the same input, token for token, on the built-in SmolLM2
tokenizer (and model, for eq. (2)). Each fails on the code before issue 22 where that issue found a
difference (the attention query and separator, the QA chat prompt, the scorer's masks, the SFT system turn).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctxaware.commands import attention as attention_command
from ctxaware.commands import eval as eval_command
from ctxaware.commands import nih as nih_command
from tests.conformance import authors
from tests.conftest import SHARED_DATA, require_shared_data


@pytest.fixture(scope="module")
def tok():
    from ctxaware.core.models import load_tokenizer

    return load_tokenizer("default")


@pytest.fixture(scope="module")
def essay_ids(tok):
    if not authors.ESSAYS.is_dir():
        pytest.skip("no essays")
    return tok.encode(authors.essays(), add_special_tokens=False)


# ------------------------------------------------------------------------------------------------ NIH


@pytest.mark.parametrize(
    "n", [pytest.param(20, marks=pytest.mark.slow, id="paper-20x20"), pytest.param(4, id="4x4")]
)
def test_nih_prompts_equal_the_authors_tester(tok, essay_ids, tmp_path, monkeypatch, n):
    """`ctxaware nih --dump-prompts` (tokenizer only) on the paper's 20 x 20 grid (slow) and a 4 x 4 grid:
    text, ids, needle index and context size equal the authors' tester (hint = the needle's first 8 words)."""
    import ctxaware.core.models

    monkeypatch.setattr(ctxaware.core.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "p.jsonl"
    top = 2000 if n == 20 else 1000
    argv = ["--max-length", str(top), "--n-lengths", str(n), "--n-depths", str(n)]
    assert nih_command.main([*argv, "--modes", "chat", "--prefix", "true", "--dump-prompts", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    lengths = [int(x) for x in np.round(np.linspace(200, top, n))]
    depths = [int(x) for x in np.round(np.linspace(0, 100, n))]
    assert sorted({r["length"] for r in rows}) == lengths and sorted({r["depth"] for r in rows}) == depths
    assert len(rows) == n * n
    hint = " ".join(authors.NEEDLE.split(" ")[:8])
    for r in rows:
        context, before, n_tokens = authors.nih_context(tok, essay_ids, r["length"], int(r["depth"]))
        text, ids = authors.nih_tester_chat(tok, context, hint)
        assert r["prompt_text"] == text and r["input_ids"] == ids, (r["length"], r["depth"])
        enc = tok(text, return_offsets_mapping=True)
        at = text.index(context) + len(before)
        assert r["needle_token_index"] == next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > at)
        assert r["context_tokens"] == n_tokens


def test_nih_chat_bos_is_the_testers_tokenizer_call(tok):
    """The tester tokenizes the chat text with ``tokenizer(prompt)``: a template that writes its own BOS gets
    a second one. A SmolLM2 tokenizer given a BOS-writing template shows it; ``chat_bos=template`` is the
    named deviation (one BOS)."""
    import copy

    from ctxaware.data import needle

    t = copy.deepcopy(tok)
    t.chat_template = "{{ bos_token }}" + t.chat_template
    t.add_bos_token = True  # tokenizer(text) now adds a BOS, as Gemma's and Llama's do
    t._tokenizer.post_processor = None
    from tokenizers import processors

    t._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{t.bos_token} $A", special_tokens=[(t.bos_token, t.bos_token_id)]
    )
    cfg = needle.NeedleConfig(lengths=[600], depths=[50.0], modes=["chat"], prefix=[True], haystack="auto")
    (p,) = needle.build_prompts(cfg, t)
    r = p.render(t)
    assert r.input_ids[:2] == [t.bos_token_id, t.bos_token_id] and r.roles[:2] == ["sink", "template"]
    assert r.input_ids == t(r.text)["input_ids"]  # the tester's tokenizer(prompt)
    cfg.chat_bos = "template"
    (p,) = needle.build_prompts(cfg, t)
    single = p.render(t)
    assert single.input_ids == t(r.text, add_special_tokens=False)["input_ids"] == r.input_ids[1:]


# ------------------------------------------------------------------------------ attention analysis


def test_attention_prompts_and_query_equal_the_analysis_script(tok, essay_ids, tmp_path):
    """`ctxaware attention --dump-prompts` (the default, ``--prompts analysis``): per cell and condition the
    ids up to the query equal the authors' analysis script's, and the query index is their "is". Before
    issue 22 the query was "Francisco" (8-word prefix) and the plain text had a blank line, not a space."""

    out = tmp_path / "a.jsonl"
    lengths, depths = [400, 1000, 1600], [0, 50, 100]
    argv = ["--lengths", ",".join(map(str, lengths)), "--depths", ",".join(map(str, depths))]
    assert attention_command.main([*argv, "--dump-prompts", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 * len(lengths) * len(depths)
    for r in rows:
        context = authors.nih_context(tok, essay_ids, r["length"], int(r["depth"]))[0]
        text, ids, query = authors.analysis_prompts(tok, context)[r["condition"]]
        assert r["query_index"] == query and r["input_ids"] == ids[: query + 1], (r["condition"], r["length"])
        assert text.startswith(r["prompt_text"]) and r["query_token"].strip() == "is"
        roles = r["roles"]
        assert roles[query] == "assistant" and roles[0] == "sink"
        if r["condition"] == "plain":  # the user turn and the answer joined by one space
            assert r["prompt_text"].endswith("San Francisco? The best thing to do in San Francisco is")


# ------------------------------------------------------------------------------------------ QA (lm-eval)


@pytest.mark.parametrize("task", ["squad", "quac", "drop"])
def test_qa_chat_prompts_equal_the_authors_lm_eval_wrapper(tok, tmp_path, task):
    """`ctxaware eval --dump-prompts` (chat, the default protocol): 20 prompts per task equal the authors'
    lm-eval chat wrapper on their task's ``doc_to_text``, text and ids. Before issue 22, 0 of them did (no
    empty system turn, so SmolLM2's default system prompt; a trailing newline; QuAC's space stripped)."""
    require_shared_data()
    from ctxaware.data.tasks import get_task, load_examples

    out = tmp_path / "e.jsonl"
    assert eval_command.main([task, "--modes", "chat", "--limit", "20", "--dump-prompts", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    examples = {ex.id: ex for ex in load_examples(get_task(task), "local", SHARED_DATA)}
    assert len(rows) == 20
    for r in rows:
        ex = examples[r["id"]]
        if task == "squad":
            doc = authors.squad_text(ex.context, ex.question)
        elif task == "quac":
            doc = authors.quac_text(ex.context, ex.question)
        else:
            doc = authors.drop_text(ex.context, ex.question)
        text, ids = authors.lm_eval_chat(tok, doc)
        assert r["prompt_text"] == text and r["input_ids"] == ids, r["id"]
        assert text.endswith("<|im_start|>assistant") and "SmolLM" not in text


def test_quac_keeps_the_space_before_the_instruction(tok, tmp_path):
    """The authors' ``removesuffix('CANNOTANSWER')`` leaves the passage's space before "\\nAnswer"."""
    require_shared_data()

    out = tmp_path / "q.jsonl"
    assert eval_command.main(["quac", "--modes", "chat", "--limit", "5", "--dump-prompts", str(out)]) == 0
    assert all(" \nAnswer the question" in json.loads(x)["prompt_text"] for x in out.read_text().splitlines())


# ------------------------------------------------------------------------------------------ eq. (2)


CHATML_MARKERS = {
    "system": "<|im_start|>system\n",
    "assistant": "<|im_start|>assistant\n",
    "user": "<|im_start|>user\n",
}


def _conversations(n: int) -> list[list[dict]]:
    require_shared_data()
    from ctxaware.data.conversations import load_conversations

    convs = load_conversations(str(SHARED_DATA / "sft" / "sharegpt_dummy_conversation.json"))[0]
    convs = sorted((c for c in convs if sum(m["role"] == "assistant" for m in c.messages) >= 2),
                   key=lambda c: sum(len(m["content"]) for m in c.messages))  # fmt: skip
    return [c.messages for c in convs[:n]]


def _port_masks(tok, messages):
    markers = {k: tok.encode(v, add_special_tokens=False) for k, v in CHATML_MARKERS.items()}
    nl = tok.encode("\n", add_special_tokens=False)
    dropped = {tok.bos_token_id, tok.eos_token_id, *nl}
    return authors.scorer_masks(tok, messages, markers, dropped)


def test_eq2_masks_equal_the_authors_scorer(tok):
    """ids, the user mask U and every turn's response positions Y_m equal the authors' scorer (empty system
    turn, end-of-turn tokens in Y, newline/BOS/EOS out of U). Before issue 22 none of the three did."""
    from ctxaware.scoring.score import layout

    convs = _conversations(5)
    for messages in convs:
        ids, user, responses = _port_masks(tok, messages)
        lay = layout(messages, tok, None)
        assert lay.input_ids == ids
        assert lay.user == user
        assert [t.positions for t in lay.turns] == responses


def test_eq2_scores_equal_the_authors_scorer(smollm2):
    """eq. (2) per turn at layer 15 (the paper's layer) equals the authors' scorer run with eager attention on
    the same SmolLM2 weights."""
    from ctxaware.core.models import load_model
    from ctxaware.scoring.score import context_dependency_score

    model, tok = smollm2
    eager = load_model("smollm2-135m-instruct", device="cpu", dtype="float32", attn_implementation="eager")[0]
    for messages in _conversations(3):
        ids, user, responses = _port_masks(tok, messages)
        want = authors.eq2_scores(eager, ids, user, responses, 15)
        got = context_dependency_score(model, tok, messages, 15, max_tokens=None)
        assert len(got) == len(want)
        assert all(abs(g - w) < 1e-4 for g, w in zip(got, want)), (got, want)


# ---------------------------------------------------------------------------------- SFT formatting


def test_sft_formatting_equals_alignment_handbook(tok):
    """`train.tokenize` (formatting ``authors``, loss on all tokens) gives alignment-handbook's ids: an empty
    system turn first, so SmolLM2's default system prompt is not injected into the training data."""
    require_shared_data()
    from ctxaware.core.results import SkipCounter
    from ctxaware.data.conversations import load_conversations
    from ctxaware.training.sft import tokenize

    convs = load_conversations(str(SHARED_DATA / "sft" / "messages_sft_demo.jsonl"))[0][:20]
    rows = tokenize(convs, tok, 10**6, SkipCounter(), loss_on="all")
    for c, row in zip(convs, rows):
        want = authors.handbook_sft_ids(tok, c.messages)
        assert row["input_ids"] == want and row["labels"] == want
        assert "SmolLM" not in tok.decode(row["input_ids"])


# ---------------------------------------------------------------------------------- steering (PASTA)


def _pasta_case(tok):
    """An NIH-style chat prompt as ``UserSteeredWrapper.generate`` builds it, with PASTA's token range."""
    from ctxaware.rendering.chat import render

    context = "Mia keeps her bike in the red shed. " + authors.NEEDLE + "The shed is behind the house."
    conv = [{"role": "user", "content": authors.INITIAL.format(context=context, question=authors.QUESTION)}]
    text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_offsets_mapping=True)
    r = render(conv, tok, "chat")
    assert r.input_ids == enc["input_ids"]
    return r, authors.pasta_token_range(text, conv[0]["content"], enc["offset_mapping"])


def _greedy(model, ids, steps: int, ctx):
    """Cached greedy decoding with an explicit attention mask (so every step builds its 4-D mask)."""
    import torch
    from transformers import DynamicCache

    from ctxaware.rendering.generate import cache_kwarg

    cache, x, mask, out = DynamicCache(), ids, torch.ones_like(ids), []
    with ctx, torch.no_grad():
        for _ in range(steps):
            o = model(input_ids=x, attention_mask=mask, use_cache=True, **cache_kwarg(model, cache))
            out.append(o.logits[:, -1].float())
            x = o.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(x)], 1)
    return torch.stack(out, 1)  # (1, steps, V)


def test_pasta_user_span_is_one_token_longer(tok):
    """PASTA's ``find_token_range`` on the user's text ends one token past it (the token holding the
    character after the text: SmolLM2's ``<|im_end|>``); ctxaware emphasises the user turn's tokens only,
    the paper's "entire user input prompt" (docs/attention.md)."""
    r, (ti, tj) = _pasta_case(tok)
    user = [i for i, m in enumerate(r.mask("user")) if m]
    assert (ti, tj) == (user[0], user[-1] + 2)
    assert tok.convert_ids_to_tokens(r.input_ids[tj - 1]) == "<|im_end|>"


def test_prompt_only_steering_equals_pasta_on_named_heads(smollm2):
    """`steer(..., steer_generated=False)` (``--no-steer-generated``) on named heads equals PASTA's mask edit
    on the same heads and span, prefill and cached decoding; the default (eq. 1 as the paper states it,
    generated tokens down-weighted too) differs from it once a generated token is a key."""
    import torch

    from ctxaware.attention.steering import steer
    from tests.test_intercept import attn_impl

    model, tok = smollm2
    r, (ti, tj) = _pasta_case(tok)
    ids = torch.tensor([r.input_ids])
    emph = torch.zeros(len(r), dtype=torch.bool)
    emph[ti:tj] = True
    heads = {2: [0, 4], 11: [3], 20: [1, 2, 8]}
    with attn_impl(model, "eager"):
        want = _greedy(model, ids, 4, authors.pasta_steering(model, heads, [(ti, tj)], len(r), 0.01))
        got = _greedy(model, ids, 4, steer(model, heads, emph, 0.01, steer_generated=False))
        stated = _greedy(model, ids, 4, steer(model, heads, emph, 0.01))
    assert (got - want).abs().max() < 1e-4
    assert (stated[:, 1:] - want[:, 1:]).abs().max() > 1e-2


def test_pasta_layer_list_compounds_the_bias(smollm2):
    """The released tester's head config (every head of every layer, ``{k: None}``) edits the mask all
    layers share in place, so layer k is steered with alpha^(k+1): equal to ctxaware's bias scaled by
    k + 1 per layer, and not to ``--steer all`` (alpha once per layer), which ctxaware does instead."""
    import torch

    from ctxaware.attention import intercept
    from ctxaware.attention.steering import _Bias, steer
    from tests.test_intercept import attn_impl

    class Compounded(_Bias):
        def __call__(self, layer, query, key):
            heads, bias = super().__call__(layer, query, key)
            return heads, bias * (layer + 1)

    model, tok = smollm2
    r, (ti, tj) = _pasta_case(tok)
    ids = torch.tensor([r.input_ids])
    emph = torch.zeros(len(r), dtype=torch.bool)
    emph[ti:tj] = True
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    every = {k: list(range(n_heads)) for k in range(n_layers)}
    with attn_impl(model, "eager"):
        want = _greedy(model, ids, 2, authors.pasta_steering(model, {k: None for k in range(n_layers)}, [(ti, tj)], len(r), 0.9))  # fmt: skip
        bias = Compounded(every, emph[None], 0.9, steer_generated=False)
        got = _greedy(model, ids, 2, intercept.intercepted(model, bias=bias))
        once = _greedy(model, ids, 2, steer(model, "all", emph, 0.9, steer_generated=False))
    assert (got - want).abs().max() < 1e-3
    assert (once - want).abs().max() > 1e-2
