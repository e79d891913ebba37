"""Training: loss mask, indicator under LoRA, resume order, QK-only, tracking, mitigations, config errors."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from ctxaware.commands.train import main
from ctxaware.core.config import parse_config
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import SkipCounter, read_jsonl
from ctxaware.data.conversations import Conversation, load_conversations
from ctxaware.rendering.chat import render
from ctxaware.training.inversion import counterfactual_conversations, filter_parametric, no_context_nll
from ctxaware.training.sft import (
    TrainConfig,
    assistant_labels,
    build_trainer,
    fit,
    setup_chat_template,
    tokenize,
    train,
)
from tests.conftest import SHARED_DATA, tiny_llama

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, of course."},
]


@pytest.fixture
def tok(smollm2_tok):
    return copy.deepcopy(smollm2_tok)  # tests change the template and add tokens


def _labeled_runs(ids, labels, tok) -> list[str]:
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("template", ["zephyr", "model"])
def test_loss_mask_is_assistant_content_and_end_of_turn(tok, template):
    setup_chat_template(tok, template)
    r = render(CONV, tok, "chat", add_generation_prompt=False)
    labels = assistant_labels(r, tok)
    eot = tok.eos_token  # zephyr closes turns with eos; SmolLM2's ChatML with <|im_end|> (its eos)
    assert _labeled_runs(r.input_ids, labels, tok) == [f"It is 4.{eot}", f"Six, of course.{eot}"]
    if template == "zephyr":
        assert r.text == (  # the tokenizer's BOS, then <|role|>\n...</s>\n per message
            f"{tok.bos_token}<|system|>\nBe brief.{eot}\n<|user|>\nWhat is 2+2?{eot}\n<|assistant|>\nIt is 4.{eot}\n"
            f"<|user|>\nAnd 3+3?{eot}\n<|assistant|>\nSix, of course.{eot}\n"
        )
    for p, role in enumerate(r.roles):  # prompt tokens never get loss
        if role in ("user", "system", "sink"):
            assert labels[p] == -100


def test_no_trainable_tokens_is_an_error(tok):
    setup_chat_template(tok, "zephyr")
    conv = Conversation("a", CONV, 0)
    with pytest.raises(CtxawareError, match="no trainable tokens"):
        tokenize([conv], tok, max_length=8, skips=SkipCounter())


def test_missing_template_is_an_error(tok):
    tok.chat_template = None
    with pytest.raises(CtxawareError, match="no chat template"):
        setup_chat_template(tok, "model")


def test_unknown_config_key_lists_valid_ones(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("learning_rate: 1e-4\nlearnin_rate: 3\n")
    with pytest.raises(
        CtxawareError, match="unknown option.*learnin_rate.*valid options are:.*learning_rate"
    ):
        main([str(y)])
    y.write_text("learning_rate: 1e-4\nmethod: lora\n")
    cfg = parse_config(TrainConfig, ["--config", str(y), "--lora-r", "8"])
    assert cfg.learning_rate == 1e-4 and cfg.lora_r == 8


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        data=str(SHARED_DATA / "sft" / "sharegpt_dummy_conversation.json"),
        max_conversations=16,
        output_dir=str(tmp_path / "run"),
        max_length=96,
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        save_steps=1000,
        logging_steps=1,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def _marked_data(tmp_path, n=16):
    convs, _ = load_conversations(SHARED_DATA / "sft" / "sharegpt_dummy_conversation.json", limit=n)
    rows = [
        {
            "id": c.id,
            "messages": [
                {**m, "content": m["content"] + " [IND]"} if m["role"] == "user" else m for m in c.messages
            ],
        }
        for c in convs
    ]
    p = tmp_path / "marked.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])  # Gemma and SmolLM2 tie the head
def test_indicator_embedding_is_trained_under_lora(tmp_path, tok, tie):
    model = tiny_llama(tie=tie)
    cfg = _cfg(tmp_path, data=_marked_data(tmp_path), indicator=True, method="lora", max_steps=3)
    trainer, info = build_trainer(cfg, model, tok)
    tid = info["indicator_id"]
    assert tid == tok.convert_tokens_to_ids("[IND]") and tid == 49152
    before = model.get_input_embeddings().weight.detach().clone()
    summary = fit(cfg, trainer, info)
    merged = trainer.model if not hasattr(trainer.model, "base_model") else trainer.model.merge_and_unload()
    after = merged.get_input_embeddings().weight.detach()
    assert not torch.allclose(after[tid], before[tid]), "the [IND] row did not change"
    assert torch.equal(after[:tid], before[:tid]), "other embedding rows must stay frozen under LoRA"
    assert summary["data"]["indicator_marked_user_turns"] > 0
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["vocab_size"] == 49153


def test_qlora_on_cpu_is_a_clear_error(tmp_path, tok):
    with pytest.raises(CtxawareError, match="bitsandbytes and a CUDA GPU"):
        build_trainer(_cfg(tmp_path, method="qlora"), tiny_llama(), tok)


def test_qk_only_changes_only_q_and_k(tmp_path, tok):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg(tmp_path, method="full", train_modules=["q_proj", "k_proj"], max_steps=2)
    train(cfg, model, tok)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(n.endswith(("q_proj.weight", "k_proj.weight")) for n in changed)
    assert len(changed) == 2 * model.config.num_hidden_layers


class _Stop(Exception):
    pass


class _CrashAfterSave:
    """A callback that kills the run right after the checkpoint at ``step`` is written."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):  # every other callback event is a no-op
        return lambda *a, **k: None

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise _Stop


def _record_batches(trainer, log):
    collate = trainer.data_collator

    def recording(examples):
        log.append(tuple(tuple(e["input_ids"]) for e in examples))
        return collate(examples)

    trainer.data_collator = recording


def test_resume_continues_with_the_same_data_order(tmp_path, tok):
    full_log, part_log, resumed_log = [], [], []
    cfg = _cfg(tmp_path / "a", max_steps=4, save_steps=2)
    trainer, info = build_trainer(cfg, tiny_llama(), copy.deepcopy(tok))
    _record_batches(trainer, full_log)
    fit(cfg, trainer, info)

    cfg2 = _cfg(tmp_path / "b", max_steps=4, save_steps=2)
    trainer, info = build_trainer(cfg2, tiny_llama(), copy.deepcopy(tok), callbacks=[_CrashAfterSave(2)])
    _record_batches(trainer, part_log)
    with pytest.raises(_Stop):
        trainer.train()
    assert (tmp_path / "b" / "run" / "checkpoint-2").is_dir()

    changed = _cfg(tmp_path / "b", max_steps=4, save_steps=2, learning_rate=5e-3)
    with pytest.raises(CtxawareError, match="differs in: learning_rate"):
        build_trainer(changed, tiny_llama(), copy.deepcopy(tok))

    trainer, info = build_trainer(cfg2, tiny_llama(), copy.deepcopy(tok))  # resume_from_checkpoint: auto
    assert info["resume_from"].endswith("checkpoint-2")
    _record_batches(trainer, resumed_log)
    summary = fit(cfg2, trainer, info)
    assert summary["global_step"] == 4
    assert part_log[:2] == full_log[:2]
    assert resumed_log[:2] == full_log[2:4] and len(set(full_log[:4])) == 4  # (+1 prefetched batch)


class _CtrlCAt:
    """Ctrl-C (KeyboardInterrupt) at the end of step ``step``, where no checkpoint is due."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):
        return lambda *a, **k: None

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_training_saves_a_checkpoint_and_resumes_from_it(tmp_path, tok, capsys):
    """Issue 27 §2: an interrupted training (Ctrl-C, SIGTERM) saves what a resume needs before it exits,
    although save_steps would not have, so that "rerun to resume" is true: the rerun continues at that step
    with the same data order as an uninterrupted run."""
    full_log, part_log, resumed_log = [], [], []
    trainer, info = build_trainer(_cfg(tmp_path / "a", max_steps=4), tiny_llama(), copy.deepcopy(tok))
    _record_batches(trainer, full_log)
    fit(_cfg(tmp_path / "a", max_steps=4), trainer, info)

    cfg = _cfg(tmp_path / "b", max_steps=4)  # save_steps 1000: no checkpoint would be written
    trainer, info = build_trainer(cfg, tiny_llama(), copy.deepcopy(tok), callbacks=[_CtrlCAt(3)])
    _record_batches(trainer, part_log)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, trainer, info)
    assert (tmp_path / "b" / "run" / "checkpoint-3" / "trainer_state.json").is_file()
    assert "checkpoint-3 holds the 3 finished steps" in capsys.readouterr().err
    trainer, info = build_trainer(cfg, tiny_llama(), copy.deepcopy(tok))
    assert info["resume_from"].endswith("checkpoint-3")
    _record_batches(trainer, resumed_log)
    assert fit(cfg, trainer, info)["global_step"] == 4
    assert part_log[:3] == full_log[:3] and resumed_log[0] == full_log[3]


def test_tracking_callback_writes_ps_po_at_requested_steps(tmp_path, tok):
    cfg = _cfg(tmp_path, max_steps=4, track_every=2, track_n=3, track_max_new_tokens=3)
    summary = train(cfg, tiny_llama(), tok)
    rows = list(read_jsonl(tmp_path / "run" / "context_reliance" / "rows.jsonl"))
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(0 <= r["p_s"] <= 1 and 0 <= r["p_o"] <= 1 and r["n"] == 3 for r in rows)
    assert (tmp_path / "run" / "context_reliance" / "context_reliance.png").is_file()
    assert summary["context_reliance"] == rows
    again = train(cfg, tiny_llama(), tok)  # a finished run is not trained twice
    assert again["wall_seconds"] == summary["wall_seconds"]


def test_reliance_reaches_tensorboard_beside_the_loss(tmp_path, tok):
    """Issue 26 §2: ``report_to`` passes through (TRL's spelling), and p_s / p_o are logged through the
    trainer, so TensorBoard's event files hold them as scalars at the tracked steps, beside the loss."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, max_steps=2, track_every=2, track_n=2, track_max_new_tokens=2,
               report_to=["tensorboard"], run_name="tb-run")  # fmt: skip
    train(cfg, tiny_llama(), tok)
    events = sorted((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/context_reliance/p_s", "train/context_reliance/p_o", "train/loss"} <= set(tags), tags
    rows = list(read_jsonl(tmp_path / "run" / "context_reliance" / "rows.jsonl"))
    logged = {e.step: e.value for e in acc.Scalars("train/context_reliance/p_s")}
    assert logged == pytest.approx({r["step"]: r["p_s"] for r in rows})  # the same numbers, at the same steps


def test_reliance_callback_in_a_users_own_sft_trainer(tmp_path, tok):
    """The callback inside someone else's TRL SFTTrainer (the docs' five lines): rows written, and the
    numbers in the trainer's log history."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ctxaware.data.tasks import get_task, load_examples
    from ctxaware.training.inversion import ContextRelianceCallback

    data = Dataset.from_list([{"messages": [{"role": "user", "content": f"Say {i}."},
                                            {"role": "assistant", "content": f"{i}."}]} for i in range(8)])  # fmt: skip
    args = SFTConfig(output_dir=str(tmp_path / "own"), max_steps=2, per_device_train_batch_size=4, report_to="none",
                     use_cpu=True, save_strategy="no", logging_steps=1, max_length=64)  # fmt: skip
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=data, processing_class=tok)
    examples = load_examples(get_task("cf_world_facts"))[:2]
    ContextRelianceCallback(
        tok, examples, every=1, out_dir=tmp_path / "own" / "reliance", max_new_tokens=2
    ).attach(trainer)
    trainer.train()
    rows = list(read_jsonl(tmp_path / "own" / "reliance" / "rows.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    history = [h for h in trainer.state.log_history if "context_reliance/p_o" in h]
    assert [h["context_reliance/p_o"] for h in history] == [r["p_o"] for r in rows]


def test_filter_parametric_drops_the_predictable_responses(smollm2, tok):
    model = smollm2[0]
    setup_chat_template(tok, "zephyr")
    responses = {
        "count": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16",
        "gibberish": "Zebra quantum 17 mollusc teapot vortex glimmer 88 pancake ostrich.",
        "alphabet": "A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, P, Q, R, S",
        "noise": "Purple 3x kettle borrows 91 tangerine orbit of mild sandpaper quietly.",
    }
    convs = [
        Conversation(
            k,
            [{"role": "user", "content": f"Tell me something ({k})."}, {"role": "assistant", "content": v}],
            i,
        )
        for i, (k, v) in enumerate(responses.items())
    ]
    nll = no_context_nll(model, tok, convs)
    kept, dropped = filter_parametric(convs, nll, 0.5)
    assert {c.id for c in dropped} == {"count", "alphabet"}
    assert [c.id for c in kept] == ["gibberish", "noise"]
    other_user = [
        Conversation("x", [{"role": "user", "content": "Different context!"}, convs[0].messages[1]], 0)
    ]
    assert no_context_nll(model, tok, other_user)[0] == pytest.approx(
        nll[0], abs=1e-5
    )  # the context is removed


def test_counterfactual_mix_from_nqswap_zip():
    convs = counterfactual_conversations(f"{SHARED_DATA / 'conflict' / 'nqswap.zip'}:0.5", 20, seed=0)
    assert len(convs) == 10
    assert all(c.messages[0]["content"].startswith("Background:") and c.messages[1]["content"] for c in convs)
    assert not any(c.messages[1]["content"].startswith("[") for c in convs)  # "['23']" is parsed, not copied
    with pytest.raises(CtxawareError, match="PATH:RATIO"):
        counterfactual_conversations("nqswap.zip", 20, seed=0)


# --- the authors' protocol (issue 11 §4) and one-line errors (issue 12) -----------------------------


def test_loss_on_all_is_the_default_and_labels_every_token(tok, tmp_path):
    """The authors trained on all tokens (their completion-only collator is commented out)."""
    setup_chat_template(tok, "zephyr")
    conv = Conversation("a", CONV, 0)
    (row,) = tokenize([conv], tok, max_length=512, skips=SkipCounter(), loss_on="all")
    assert row["labels"] == row["input_ids"]
    (masked,) = tokenize([conv], tok, max_length=512, skips=SkipCounter(), loss_on="assistant")
    assert sum(t != -100 for t in masked["labels"]) < len(masked["labels"])
    assert TrainConfig().loss_on == "all"
    trainer, info = build_trainer(_cfg(tmp_path, max_conversations=2), tiny_llama(), tok)
    ds = trainer.train_dataset
    assert all(list(r["labels"]) == list(r["input_ids"]) for r in ds)
    assert info["data"]["n_trainable_tokens"] == sum(len(r["input_ids"]) for r in ds)


def test_indicator_on_unmarked_data_is_refused_with_the_count(tmp_path, tok):
    with pytest.raises(CtxawareError, match=r"0 of \d+ user turns .* carry \[IND\]"):
        build_trainer(_cfg(tmp_path, indicator=True, max_conversations=4), tiny_llama(), tok)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--learning-rate", "-1"], "learning"),
        (["--learning-rate", "0"], "learning"),
        (["--loss-on", "prompt"], "loss"),
        (["--per-device-train-batch-size", "0"], "per_device_train_batch_size"),
        (["--peft-adapter", "runs/some_adapter"], "merge the adapter first"),  # not silently ignored
    ],
)
def test_bad_training_options_are_one_line_errors(argv, message, capsys, monkeypatch):
    from ctxaware import cli
    from ctxaware.core import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert cli.main(["train", "--data", str(SHARED_DATA / "sft" / "alpaca_en_demo.json"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and message.replace("_", "-") in err[0].replace("_", "-") and "Traceback" not in err[0]
    )


def test_train_help_shows_the_config_positional(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "CONFIG.yaml" in out and "--loss-on" in out


def test_progress_bar_is_on_by_default(tmp_path):
    from ctxaware.training.sft import training_args

    assert training_args(_cfg(tmp_path), "cpu").disable_tqdm is False
    assert training_args(_cfg(tmp_path, progress=False), "cpu").disable_tqdm is True


def test_lora_adapter_records_a_resolvable_base(tmp_path, tok):
    from ctxaware.training.sft import base_model_path

    model_dir = tmp_path / "base"
    tiny_llama().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = _cfg(tmp_path, model=str(model_dir), method="lora", max_steps=1, max_conversations=2)
    trainer, info = build_trainer(cfg, tiny_llama(), tok)
    fit(cfg, trainer, info)
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(model_dir.resolve())
    builtin = base_model_path("default")  # the converted safetensors cache, not "smollm2-135m-instruct"
    from pathlib import Path

    assert Path(builtin).is_absolute() and (Path(builtin) / "config.json").is_file()
    assert base_model_path("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T").startswith("TinyLlama/")


def test_a_finished_run_stays_finished_when_options_are_added_later(tmp_path, tok):
    """A run finished before an option existed (here: its records lack ``device_map``) is still the same
    finished run for a config where that option is unset: not trained again; set, it is not the same run."""
    cfg = _cfg(tmp_path, max_steps=1)
    first = train(cfg, tiny_llama(), tok)
    run = tmp_path / "run"
    summary = json.loads((run / "train_summary.json").read_text())
    saved = json.loads((run / "train_config.json").read_text())
    for d in (saved, saved["_inputs"]):
        d.pop("device_map")
    summary["fingerprint"] = "from-an-older-ctxaware"
    (run / "train_config.json").write_text(json.dumps(saved))
    (run / "train_summary.json").write_text(json.dumps(summary))
    from ctxaware.training.sft import finished_run

    assert finished_run(cfg)["wall_seconds"] == first["wall_seconds"]
    assert finished_run(dataclasses.replace(cfg, device_map="auto")) is None
