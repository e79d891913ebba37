"""Issue 25: the README's Table 7 commands (the paper's eight instruct models, HF backend under torchrun and
vLLM server backend) parse with ctxaware's own parser and pass the option checks that run before a model
loads. Nothing here reaches the hub or a GPU: the model ids are checked for form, not downloaded."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ctxaware.core.config import parse_config
from ctxaware.core.models import resolve_model
from ctxaware.evaluation.nih import NIHConfig, check, templates

README = Path(__file__).resolve().parents[1] / "README.md"
# the paper's Table 7 instruct models and their context windows
PAPER = {
    "meta-llama/Llama-2-7b-chat-hf": 4096,
    "meta-llama/Llama-2-13b-chat-hf": 4096,
    "meta-llama/Meta-Llama-3-8B-Instruct": 8192,
    "meta-llama/Llama-3.1-8B-Instruct": 131072,
    "mistralai/Mistral-7B-Instruct-v0.2": 32768,
    "mistralai/Mistral-7B-Instruct-v0.3": 32768,
    "google/gemma-2-9b-it": 8192,
    "google/gemma-2-27b-it": 8192,
}
# Table 7 reports a mean and standard deviation over the four templates for these (App. A.2)
FOUR_TEMPLATES = {"meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-13b-chat-hf",
                  "meta-llama/Meta-Llama-3-8B-Instruct", "google/gemma-2-9b-it"}  # fmt: skip


def _block(marker: str) -> list[list[str]]:
    text = README.read_text()
    body = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```", text, re.S)
    assert body, f"README has no {marker} block"
    return [shlex.split(line.split("   #")[0]) for line in body.group(1).splitlines() if line.strip()]


def _nih_argv(words: list[str]) -> list[str]:
    if words[0] == "torchrun":
        assert words[1:5] == ["--standalone", "--nproc_per_node", "8", "-m"] and words[5] == "ctxaware.cli"
        words = words[6:]
    else:
        assert words[0] == "ctxaware", words
        words = words[1:]
    assert words[0] == "nih"
    return words[1:]


@pytest.mark.parametrize("marker", ["table7-hf", "table7-vllm"])
def test_every_table7_command_parses_and_passes_the_checks(marker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --output runs/... is relative: nothing is written by the checks
    lines = _block(marker)
    if marker == "table7-vllm":
        assert lines[0][:2] == ["vllm", "serve"] and "--data-parallel-size" in lines[0]
        lines = lines[1:]
    seen = {}
    for words in lines:
        cfg = parse_config(NIHConfig, _nih_argv(words), prog="ctxaware nih")
        check(cfg)  # every check that runs before a model loads (server URL included)
        src = resolve_model(cfg.model, reach_hub=False)
        assert src.kind == "hub", cfg.model
        assert cfg.max_length == PAPER[cfg.model], cfg.model  # the window of Table 7
        assert cfg.modes == ["chat", "plain"] and cfg.prefix == [True, False] and cfg.protocol == "authors"
        assert (templates(cfg) == [1, 2, 3, 4]) == (cfg.model in FOUR_TEMPLATES), cfg.model
        assert cfg.backend == ("hf" if marker == "table7-hf" else "server")
        if marker == "table7-hf":
            assert cfg.device == "cuda" and cfg.dtype == "bfloat16"
            assert (cfg.attn_implementation == "eager") == cfg.model.startswith("google/gemma-2")
        seen[cfg.model] = cfg
    assert set(seen) == set(PAPER)  # one command per model, all eight
