"""The generation engine: greedy, batched, stop strings, prefix reuse (KV cache shared across prompts)."""

from __future__ import annotations

import random

import pytest

from ctxaware.rendering.chat import render, user_prompt
from ctxaware.rendering.generate import cut_at_stop, generate
from tests.conftest import tiny_llama


class _Tok:
    """Just enough tokenizer for the engine on a random model: ids decode to their numbers."""

    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def _shared_prefix_prompts(n: int = 9, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    trunk = [rng.randrange(2, 500) for _ in range(60)]
    prompts = []
    for _ in range(n):
        cut = rng.randrange(1, 60)
        prompts.append(trunk[:cut] + [rng.randrange(2, 500) for _ in range(rng.randrange(1, 20))])
    return prompts + [trunk[:30], trunk[:30] + [7]]  # a prompt that is a prefix of another


def test_cut_at_stop():
    assert cut_at_stop("yes. no", [".", "no"]) == ("yes", True)
    assert cut_at_stop("yes", ["."]) == ("yes", False)


def test_max_new_tokens_must_be_a_positive_int():
    """None would let transformers fall back to its default max_length (20 new tokens) with only a warning."""
    import pytest

    model, tok = tiny_llama(vocab_size=512).eval(), _Tok()
    for bad in (None, 0, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens"):
            generate(model, tok, [[5, 6, 7]], max_new_tokens=bad, progress=False)


@pytest.mark.filterwarnings("error::FutureWarning")  # issue 26 §5: no deprecated past_key_values
def test_prefix_reuse_identical_on_tiny_model():
    model, tok = tiny_llama(vocab_size=512).eval(), _Tok()
    model.generation_config.eos_token_id = 1
    prompts = _shared_prefix_prompts()
    plain = generate(model, tok, prompts, max_new_tokens=6, batch_size=4, progress=False)
    stats, seen = {}, []
    reused = generate(
        model,
        tok,
        prompts,
        max_new_tokens=6,
        batch_size=4,
        progress=False,
        prefix_cache=True,
        stats=stats,
        callback=lambda idx, gens: seen.extend(idx),
    )
    assert [g.token_ids for g in reused] == [g.token_ids for g in plain]
    assert sorted(seen) == list(range(len(prompts)))
    assert stats["prefill_tokens"] < stats["prompt_tokens"]


def test_answers_from_the_prompt(smollm2):
    model, tok = smollm2
    msgs = user_prompt("The secret code of the blue door is 4812.\nWhat is the secret code of the blue door?")
    (g,) = generate(model, tok, [render(msgs, tok, "chat")], max_new_tokens=24, progress=False)
    assert "4812" in g.text


def test_greedy_ignores_sampling_generation_config(smollm2):
    model, tok = smollm2
    p = render(user_prompt("Name a colour."), tok, "chat")
    (ref,) = generate(model, tok, [p], max_new_tokens=8, progress=False)
    gc = model.generation_config
    old = (gc.do_sample, gc.temperature, gc.top_k)
    gc.do_sample, gc.temperature, gc.top_k = True, 5.0, 0
    try:
        outs = generate(model, tok, [p, p], max_new_tokens=8, progress=False)
    finally:
        gc.do_sample, gc.temperature, gc.top_k = old
    assert [o.token_ids for o in outs] == [ref.token_ids, ref.token_ids]


def test_stop_strings_cut(smollm2):
    model, tok = smollm2
    p = render(user_prompt("List three fruits."), tok, "chat")
    (g,) = generate(model, tok, [p], max_new_tokens=20, stop=["\n"], progress=False)
    assert g.stop_reason == "stop" and "\n" not in g.text and g.text.strip()


def test_prefix_reuse_identical_on_real_model(smollm2):
    model, tok = smollm2
    base = "Alice keeps the spare key under the red flower pot. " * 3
    prompts = [
        render(
            user_prompt(
                base[: 40 * k] + f" Fact {k}: the vault code is {1000 + 37 * k}. Which is the vault code?"
            ),
            tok,
            "chat",
        )
        for k in range(1, 5)
    ]
    plain = generate(model, tok, prompts, max_new_tokens=10, batch_size=2, progress=False)
    reused = generate(model, tok, prompts, max_new_tokens=10, batch_size=2, progress=False, prefix_cache=True)
    assert [g.token_ids for g in reused] == [g.token_ids for g in plain]
