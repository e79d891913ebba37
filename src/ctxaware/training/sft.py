"""Instruction fine-tuning, vanilla or with the context-dependency indicator (paper Sec. 3.2, Table 4).

``ctxaware train CONFIG.yaml [--flag value ...]`` wraps TRL's ``SFTTrainer``:

- data: `ctxaware.data.conversations` loaders; every conversation is rendered once by `ctxaware.rendering.chat.render`
  and the labels are computed from it: ``loss_on: all`` (default; the authors' code, whose completion-only
  collator is commented out) puts the loss on every token; ``loss_on: assistant`` on the assistant content +
  the end-of-turn token that closes each assistant message (everything else ``-100``). TRL gets the tokenized
  ``input_ids``/``labels`` and uses them as they are; a dataset with no trainable token is an error.
- template: the paper's Zephyr template for every model by default (``chat_template: zephyr``), the
  model's own (``model``) or a ``.jinja`` file.
- indicator: ``[IND]`` is a new special token; under LoRA its embedding row is trained through PEFT's
  ``trainable_token_indices`` (the paper's code left it untrained).
- methods: full fine-tuning, LoRA, QLoRA (bitsandbytes 4-bit, CUDA only); ``train_modules`` restricts
  training to some projections (``q_proj,k_proj`` = QK-only fine-tuning).
- context-parametric inversion (`ctxaware.training.inversion`): `ContextRelianceCallback` measures p_s/p_o on a
  counterfactual set every ``track_every`` steps; mitigations ``filter_parametric`` and ``counterfactual_mix``.
- resume: a rerun continues from the last checkpoint (same data order: the sampler is seeded and the
  trainer skips the batches already seen) and refuses a checkpoint written under another config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from ctxaware.core.config import ModelConfig, to_dict
from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import (
    SkipCounter,
    config_changes,
    fingerprint,
    fingerprint_inputs,
    read_jsonl,
    write_json_atomic,
)
from ctxaware.data.conversations import Conversation, load_conversations
from ctxaware.rendering.chat import clip_messages, render, with_empty_system
from ctxaware.rendering.indicator import DEFAULT_INDICATOR, add_indicator_token, append_indicator
from ctxaware.training.inversion import (
    ContextRelianceCallback,
    bind_trackers,
    counterfactual_conversations,
    filter_parametric,
    load_conflict_set,
    no_context_nll,
)

logger = logging.getLogger(__name__)

# The TinyLlama/Zephyr template the paper used for every model: <|user|>\n...</s>\n<|assistant|>\n...</s>\n
ZEPHYR_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Fields that may change between an interrupted run and its resumption.
RESUME_FREE = ("resume_from_checkpoint", "logging_steps", "progress", "report_to", "run_name", "push_to_hub",
               "hub_model_id")  # fmt: skip
LOSS_ON = ("all", "assistant")


@dataclasses.dataclass
class TrainConfig(ModelConfig):
    """Supervised instruction fine-tuning (``ctxaware train CONFIG.yaml``); YAML keys = these fields.

    Data: ``data`` (file or hub id, any `ctxaware.data.conversations` format), ``data_format``, ``data_split``,
    ``max_conversations``. Template: ``chat_template`` (zephyr | model | path.jinja). Indicator:
    ``indicator``, ``indicator_token``. Method: ``method`` (full | lora | qlora), ``lora_*``,
    ``train_modules``. Optimisation: ``max_length``, ``num_train_epochs``, ``max_steps``, ``learning_rate``,
    ``lr_scheduler_type``, ``warmup_ratio``, ``per_device_train_batch_size``,
    ``gradient_accumulation_steps``, ``weight_decay``, ``bf16``, ``gradient_checkpointing``, ``seed``.
    Run: ``output_dir``, ``save_steps``, ``save_total_limit``, ``logging_steps``, ``resume_from_checkpoint``.
    Tracking: ``track_every``, ``track_data``, ``track_n``, ``track_max_new_tokens``. Mitigations:
    ``filter_parametric``, ``counterfactual_mix``.
    """

    data: str | None = dataclasses.field(
        default=None, metadata={"path": "input", "help": "SFT data: .json/.jsonl/.parquet or hub id"}
    )
    data_format: str = dataclasses.field(
        default="auto", metadata={"help": "auto, sharegpt, messages or alpaca"}
    )
    data_split: str = dataclasses.field(default="train", metadata={"help": "split for hub datasets"})
    max_conversations: int | None = dataclasses.field(
        default=None, metadata={"min": 1, "help": "use the first N rows only"}
    )
    output_dir: str = dataclasses.field(
        default="runs/train", metadata={"path": "output_dir", "help": "checkpoints, model and logs"}
    )
    chat_template: str | None = dataclasses.field(
        default="zephyr",
        metadata={
            "path": "input_file",
            "help": "zephyr (the paper's, for every model), model (its own) or a .jinja file",
        },
    )
    indicator: bool = dataclasses.field(
        default=False, metadata={"help": "add the indicator token and train it"}
    )
    indicator_token: str = dataclasses.field(
        default=DEFAULT_INDICATOR, metadata={"help": "the indicator token"}
    )
    method: Literal["full", "lora", "qlora"] = dataclasses.field(
        default="lora", metadata={"help": "full, lora or qlora"}
    )
    lora_r: int = dataclasses.field(default=16, metadata={"min": 1, "help": "LoRA rank"})
    lora_alpha: int = dataclasses.field(default=16, metadata={"min": 1, "help": "LoRA alpha"})
    lora_dropout: float = dataclasses.field(
        default=0.05, metadata={"min": 0, "max": 1, "help": "LoRA dropout"}
    )
    lora_target_modules: list[str] = dataclasses.field(
        default_factory=lambda: list(ALL_PROJECTIONS), metadata={"help": "modules that get LoRA adapters"}
    )
    train_modules: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "train only these modules (q_proj,k_proj = QK-only); LoRA: its targets"},
    )
    max_length: int = dataclasses.field(
        default=4096, metadata={"min": 1, "help": "truncate conversations to N tokens"}
    )
    num_train_epochs: float = dataclasses.field(default=1.0, metadata={"gt": 0, "help": "epochs"})
    max_steps: int = dataclasses.field(
        default=-1, metadata={"help": "optimizer steps (overrides epochs when > 0)"}
    )
    learning_rate: float = dataclasses.field(default=2e-4, metadata={"gt": 0, "help": "peak learning rate"})
    lr_scheduler_type: str = dataclasses.field(
        default="cosine", metadata={"help": "cosine, linear, constant, ..."}
    )
    warmup_ratio: float = dataclasses.field(
        default=0.1, metadata={"min": 0, "lt": 1, "help": "fraction of steps for linear warmup"}
    )
    per_device_train_batch_size: int = dataclasses.field(
        default=4, metadata={"min": 1, "help": "batch size per device"}
    )
    gradient_accumulation_steps: int = dataclasses.field(
        default=1, metadata={"min": 1, "help": "gradient accumulation"}
    )
    weight_decay: float = dataclasses.field(default=0.0, metadata={"min": 0, "help": "AdamW weight decay"})
    bf16: bool | None = dataclasses.field(
        default=None, metadata={"help": "bf16 mixed precision (none: on capable GPUs)"}
    )
    gradient_checkpointing: bool = dataclasses.field(
        default=False, metadata={"help": "trade compute for memory"}
    )
    seed: int = dataclasses.field(default=42, metadata={"help": "seed of init, data order and sampling"})
    save_steps: int = dataclasses.field(default=500, metadata={"min": 1, "help": "checkpoint every N steps"})
    save_total_limit: int | None = dataclasses.field(
        default=2, metadata={"min": 1, "help": "keep the last N checkpoints"}
    )
    logging_steps: int = dataclasses.field(
        default=10, metadata={"min": 1, "help": "log the loss every N steps"}
    )
    report_to: list[str] = dataclasses.field(
        default_factory=lambda: ["none"],
        metadata={"help": "where the trainer logs (TRL's report_to): none, tensorboard, wandb, trackio, ..."},
    )
    run_name: str | None = dataclasses.field(
        default=None, metadata={"help": "the run's name in those trackers"}
    )
    push_to_hub: bool = dataclasses.field(
        default=False, metadata={"help": "push checkpoints to the Hub (TRL's)"}
    )
    hub_model_id: str | None = dataclasses.field(default=None, metadata={"help": "the Hub repo to push to"})
    resume_from_checkpoint: str | None = dataclasses.field(
        default="auto",
        metadata={"help": "auto (last checkpoint in output_dir, if any), a checkpoint dir, or none"},
    )
    track_every: int = dataclasses.field(
        default=0, metadata={"help": "measure p_s/p_o every K steps (0: off)"}
    )
    track_data: str = dataclasses.field(
        default="cf_world_facts",
        metadata={"path": "input", "help": "counterfactual set: a task name or a .json/.jsonl/.zip file"},
    )
    track_n: int = dataclasses.field(
        default=64, metadata={"min": 1, "help": "counterfactual examples per measurement"}
    )
    track_max_new_tokens: int = dataclasses.field(
        default=24, metadata={"min": 1, "help": "tokens generated per example"}
    )
    filter_parametric: float = dataclasses.field(
        default=0.0,
        metadata={
            "min": 0,
            "max": 1,
            "help": "drop this fraction of examples with the lowest no-context perplexity",
        },
    )
    counterfactual_mix: str | None = dataclasses.field(
        default=None, metadata={"help": "PATH:RATIO, add RATIO x len(data) counterfactual QA examples"}
    )
    formatting: Literal["authors", "ctxaware"] = dataclasses.field(
        default="authors",
        metadata={
            "help": "authors (alignment-handbook: an empty system turn first when the template accepts one, "
            "and the tokenizer's special tokens on the rendered text, as SFTTrainer does) or ctxaware "
            "(the conversation as given, only the template's own BOS)"
        },
    )
    loss_on: Literal["all", "assistant"] = dataclasses.field(
        default="all",
        metadata={"help": "all tokens (the authors' code) or assistant tokens only (completion-only loss)"},
    )
    progress: bool = dataclasses.field(default=True, metadata={"help": "show a training progress bar"})
    stage: Literal["sft", "dpo", "grpo"] = dataclasses.field(
        default="sft",
        metadata={"help": "sft, dpo (ctxaware.training.preference) or grpo (ctxaware.training.rlvr)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # every field's own rule (config.Checked)
        check_training_options(self)


# ----------------------------------------------------------------------------- template and labels


def setup_chat_template(tokenizer, choice: str | None) -> None:
    """Set the training chat template: ``zephyr``, ``model`` (keep the tokenizer's) or a ``.jinja`` path."""
    if choice == "zephyr":
        tokenizer.chat_template = ZEPHYR_TEMPLATE
    elif choice and choice.endswith((".jinja", ".j2")):
        if not Path(choice).is_file():
            raise CtxawareError(f"chat template file {choice} does not exist")
        tokenizer.chat_template = Path(choice).read_text()
    elif choice in (None, "model"):
        if not getattr(tokenizer, "chat_template", None):
            raise CtxawareError(
                "the model has no chat template and none is configured; set chat_template: zephyr (the paper's) "
                "or a .jinja file"
            )
    else:
        raise CtxawareError(f"chat_template {choice!r} is not zephyr, model or a .jinja file")


def assistant_labels(rendered, tokenizer) -> list[int]:
    """Labels of a rendered conversation: assistant content tokens and, after each assistant message, the
    template tokens up to and including the first special (end-of-turn) token; ``-100`` elsewhere."""
    ids, roles = rendered.input_ids, rendered.roles
    special = set(tokenizer.all_special_ids)
    labels = [-100] * len(ids)
    for span in rendered.spans:
        if span.role != "assistant" or span.start == span.end:
            continue
        for p in range(span.start, span.end):
            if roles[p] == "assistant":
                labels[p] = ids[p]
        for p in range(span.end, len(ids)):  # the end-of-turn marker: template tokens up to the first special
            if roles[p] != "template":
                break
            labels[p] = ids[p]
            if ids[p] in special:
                break
    return labels


def tokenize(
    convs: Sequence[Conversation],
    tokenizer,
    max_length: int,
    skips: SkipCounter,
    loss_on: str = "assistant",
    formatting: str = "authors",
) -> list[dict]:
    """``{id, input_ids, labels}`` per conversation, truncated to ``max_length``; the labels are every token
    (``loss_on="all"``) or the assistant tokens (`assistant_labels`); raises when nothing trains."""
    rows = []
    for c in convs:
        try:
            msgs = clip_messages(c.messages, max_length)  # a huge row is not tokenized whole
            if formatting == "authors":  # alignment-handbook's maybe_insert_system_message, SFTTrainer's BOS
                msgs = with_empty_system(msgs, tokenizer)
                r = render(msgs, tokenizer, "chat", add_generation_prompt=False, add_special_tokens=True)
            else:
                r = render(msgs, tokenizer, "chat", add_generation_prompt=False)
        except CtxawareError as e:
            skips.skip(f"cannot render: {str(e)[:60]}", c.id)
            continue
        labels = list(r.input_ids) if loss_on == "all" else assistant_labels(r, tokenizer)
        ids, labels = r.input_ids[:max_length], labels[:max_length]
        if all(t == -100 for t in labels):
            skips.skip("no trainable tokens (truncated or masked)", c.id)
            continue
        rows.append({"id": c.id, "input_ids": ids, "labels": labels})
    if not rows:
        raise CtxawareError(
            "the dataset yields no trainable tokens after masking; check the chat template (assistant turns must "
            f"appear in the rendered text) and max_length (skips: {skips.as_dict()['by_reason']})"
        )
    return rows


def mark_all(convs: Sequence[Conversation], token: str) -> list[Conversation]:
    """Append the indicator to every user message (the paper's evaluation of the +indicator model)."""
    out = []
    for c in convs:
        msgs = [
            {**m, "content": append_indicator(m["content"], token)} if m["role"] == "user" else m
            for m in c.messages
        ]
        out.append(dataclasses.replace(c, messages=msgs))
    return out


# ----------------------------------------------------------------------------- mitigations


def freeze_except(model, modules: Sequence[str]) -> list[str]:
    """Train only parameters inside modules whose name ends with one of ``modules``; return their names."""
    names = []
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        p.requires_grad = any(owner.endswith(m) for m in modules)
        if p.requires_grad:
            names.append(name)
    if not names:
        raise CtxawareError(f"train_modules {list(modules)} match no module of the model")
    return names


# ----------------------------------------------------------------------------- model and run setup


def _check_method(cfg: TrainConfig, device: str) -> None:
    if cfg.method == "qlora":
        import importlib.util

        if not device.startswith("cuda") or importlib.util.find_spec("bitsandbytes") is None:
            raise CtxawareError(
                "qlora (4-bit) needs bitsandbytes and a CUDA GPU; on CPU use method: lora or full"
            )


def load_for_training(cfg: TrainConfig):
    """``(model, tokenizer)`` for ``cfg.model``; 4-bit for QLoRA."""
    from ctxaware.core.models import resolve_device

    device = resolve_device(cfg.device)
    _check_method(cfg, device)
    return cfg.load(device=device, quantization="4bit" if cfg.method == "qlora" else cfg.quantization)


def peft_config_for(cfg: TrainConfig, indicator_id: int | None):
    """The LoRA config (None for full fine-tuning). The indicator row is trained via trainable tokens."""
    if cfg.method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.train_modules or cfg.lora_target_modules),
        trainable_token_indices=[indicator_id] if indicator_id is not None else None,
        task_type="CAUSAL_LM",
    )


def prepare_model(cfg: TrainConfig, model, tok) -> tuple:
    """Template, indicator token, frozen modules; return ``(model, peft_config, indicator_id)``."""
    setup_chat_template(tok, cfg.chat_template)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    indicator_id = add_indicator_token(model, tok, cfg.indicator_token) if cfg.indicator else None
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.method == "full" and cfg.train_modules:
        freeze_except(model, cfg.train_modules)
        if cfg.indicator:
            logger.warning(
                "train_modules freezes the embeddings: the indicator row stays at its initial mean"
            )
    return model, peft_config_for(cfg, indicator_id), indicator_id


def _resume_point(cfg: TrainConfig, out: Path) -> str | None:
    """The checkpoint to resume from, after checking that it was written under the same config."""
    from transformers.trainer_utils import get_last_checkpoint

    choice = cfg.resume_from_checkpoint
    if choice is None or str(choice).lower() in ("none", "false", "no"):
        return None
    ckpt = (
        get_last_checkpoint(str(out))
        if choice == "auto" and out.is_dir()
        else (None if choice == "auto" else choice)
    )
    if ckpt is None:
        return None
    if not Path(ckpt).is_dir():
        raise CtxawareError(f"checkpoint {ckpt} does not exist; give a checkpoint-N directory or auto")
    _check_same_config(cfg, Path(ckpt).parent / "train_config.json", f"checkpoint {ckpt}")
    return str(ckpt)


def run_config(cfg: TrainConfig) -> dict:
    # stage: sft is left out so that runs written before the stage field existed still resume
    return {k: v for k, v in to_dict(cfg).items() if k not in RESUME_FREE and (k, v) != ("stage", "sft")}


def finished_run(cfg: TrainConfig) -> dict | None:
    """The ``train_summary.json`` of this run when ``output_dir`` holds it finished: the same configuration
    and input contents (`config_changes` against ``train_config.json``: an option added to ctxaware later is
    accepted when unset), else None."""
    out = Path(cfg.output_dir)
    done, saved_path = out / "train_summary.json", out / "train_config.json"
    if not done.is_file():
        return None
    summary, now = json.loads(done.read_text()), run_config(cfg)
    same = summary.get("fingerprint") == fingerprint(now)
    if not same and saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        same = not config_changes(saved, saved.pop("_inputs", None), now)
    if same:
        logger.warning("%s already holds this finished run; delete it to train again", cfg.output_dir)
        return summary
    return None


def _check_same_config(cfg: TrainConfig, saved_path: Path, what: str) -> None:
    if not saved_path.is_file():
        return
    saved, now = json.loads(saved_path.read_text()), run_config(cfg)
    changed = config_changes(saved, saved.pop("_inputs", None), now)  # contents, not paths (docs/resume.md)
    if changed:
        raise CtxawareError(
            f"{what} was written under a different config (differs in: {', '.join(changed)}); "
            "use the same config to resume, or another output_dir"
        )


def checkpointing_arg() -> str:
    """TrainingArguments' name for gradient checkpointing: ``activation_checkpointing`` in recent transformers
    (``gradient_checkpointing`` is deprecated there), ``gradient_checkpointing`` before (5.22 has only it)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def common_args(cfg: TrainConfig, device: str) -> dict:
    """TrainingArguments shared by every stage (SFT here, DPO and GRPO in their modules)."""
    bf16 = (
        cfg.bf16 if cfg.bf16 is not None else (device.startswith("cuda") and torch.cuda.is_bf16_supported())
    )
    if bf16 and not device.startswith("cuda"):
        raise CtxawareError("bf16 training needs a GPU that supports it; set bf16: false on CPU")
    return dict(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        weight_decay=cfg.weight_decay,
        bf16=bool(bf16),
        fp16=False,
        **{checkpointing_arg(): cfg.gradient_checkpointing},
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        report_to=cfg.report_to,
        run_name=cfg.run_name,
        push_to_hub=cfg.push_to_hub,
        hub_model_id=cfg.hub_model_id,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
    )


def training_args(cfg: TrainConfig, device: str):
    from trl import SFTConfig

    return SFTConfig(**common_args(cfg, device), max_length=cfg.max_length)


def read_training_data(cfg: TrainConfig) -> tuple[list[Conversation], dict]:
    """The training conversations and the loader's report, read before any model loads: an unreadable file
    or one without a usable conversation is a one-line error, not a traceback after the load."""
    if not cfg.data:
        raise CtxawareError("no training data; set data: PATH (a .json/.jsonl/.parquet file or a hub id)")
    convs, report = load_conversations(
        cfg.data, cfg.data_format, split=cfg.data_split, limit=cfg.max_conversations
    )  # type: ignore[arg-type]
    if not convs:
        raise CtxawareError(
            f"{cfg.data} holds no usable conversation ({report['skipped']['total']} rows skipped); check the file"
        )
    return convs, report


def build_dataset(
    cfg: TrainConfig, model, tok, skips: SkipCounter, data: tuple[list[Conversation], dict]
) -> tuple[list[dict], dict]:
    """Mitigate and tokenize the training conversations (``data``: from `read_training_data`, read before
    the model loaded); return rows and a data report."""
    convs, report = data
    if cfg.filter_parametric > 0:
        nll = no_context_nll(model, tok, convs)
        convs, dropped = filter_parametric(convs, nll, cfg.filter_parametric)
        report["filter_parametric_dropped"] = [c.id for c in dropped]
    if cfg.counterfactual_mix:
        extra = counterfactual_conversations(cfg.counterfactual_mix, len(convs), cfg.seed)
        report["counterfactual_added"] = len(extra)
        convs = convs + extra
    report["indicator_marked_user_turns"] = sum(
        cfg.indicator_token in m["content"] for c in convs for m in c.messages if m["role"] == "user"
    )
    if report["indicator_marked_user_turns"] and not cfg.indicator:
        logger.warning(
            "the data holds %s but indicator is off: it is tokenized as plain text", cfg.indicator_token
        )
    if cfg.indicator and not report["indicator_marked_user_turns"]:
        n_user = sum(m["role"] == "user" for c in convs for m in c.messages)
        raise CtxawareError(
            f"indicator is on but 0 of {n_user} user turns in {cfg.data} carry {cfg.indicator_token}: the new "
            "token would never be trained; mark the data first (ctxaware select) or set indicator: false"
        )
    rows = tokenize(convs, tok, cfg.max_length, skips, cfg.loss_on, cfg.formatting)
    report["n_examples"] = len(rows)
    report["n_trainable_tokens"] = sum(sum(t != -100 for t in r["labels"]) for r in rows)
    return rows, report


def tracker_for(cfg: TrainConfig, tok) -> ContextRelianceCallback | None:
    if cfg.track_every <= 0:
        return None
    from ctxaware.data.tasks import sample

    examples = sample(load_conflict_set(cfg.track_data), cfg.track_n, cfg.seed)
    indicator = cfg.indicator_token if cfg.indicator else None
    config = {
        "track_data": cfg.track_data,
        "track_n": cfg.track_n,
        "indicator": indicator,
        "max_new_tokens": cfg.track_max_new_tokens,
        "run": fingerprint(run_config(cfg)),
    }
    out = Path(cfg.output_dir) / "context_reliance"
    return ContextRelianceCallback(
        tok, examples, cfg.track_every, out, config, indicator, cfg.track_max_new_tokens
    )


def build_trainer(cfg: TrainConfig, model=None, tokenizer=None, callbacks: Sequence = ()):
    """An ``SFTTrainer`` ready to run, and ``info`` (data report, resume point, skips). All input checks
    (config, template, data, resume) happen here, before any training compute."""
    from datasets import Dataset
    from trl import SFTTrainer

    out = Path(cfg.output_dir)
    resume = _resume_point(cfg, out)
    if resume is None:
        _check_same_config(cfg, out / "train_config.json", f"output_dir {out}")
    data = read_training_data(cfg)  # before the model: bad data is one line, not a load and a traceback
    if model is None:
        model, tokenizer = load_for_training(cfg)
    else:
        _check_method(cfg, str(next(model.parameters()).device))
    model, peft_cfg, indicator_id = prepare_model(cfg, model, tokenizer)
    skips = SkipCounter()
    rows, report = build_dataset(cfg, model, tokenizer, skips, data)
    report["skipped_examples"] = skips.as_dict()
    device = str(next(model.parameters()).device)
    cbs = [c for c in (tracker_for(cfg, tokenizer), *callbacks) if c is not None]
    try:
        trainer = SFTTrainer(
            model=model,
            args=training_args(cfg, device),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_cfg,
            callbacks=cbs,
        )
    except ValueError as e:  # e.g. LoRA target modules that the model does not have
        raise CtxawareError(f"cannot set up training: {str(e).splitlines()[0]}") from None
    bind_trackers(trainer)  # p_s / p_o into the trainer's log history and report_to integrations
    _expose_head_bias(trainer.model)
    _record_base(trainer.model, cfg.model)  # checkpoints' adapter_config.json name a loadable base too
    write_json_atomic(
        out / "train_config.json", {**run_config(cfg), "_inputs": fingerprint_inputs(run_config(cfg))}
    )
    info = {"resume_from": resume, "data": report, "indicator_id": indicator_id}
    return trainer, info


def _expose_head_bias(model) -> None:
    """TRL's fused LM head reads ``lm_head.bias``; PEFT's trainable-token wrapper (the ``[IND]`` row under
    LoRA, wrapping a tied head) exposes only the merged ``weight``. Give it the wrapped layer's bias."""
    for m in model.modules():
        if type(m).__name__ == "TrainableTokensWrapper" and "bias" not in m.__dict__:
            m.__dict__["bias"] = getattr(m.original_module, "bias", None)


def base_model_path(spec: str) -> str:
    """What PEFT can load as the adapter's base: the local directory (a built-in's converted safetensors
    cache, a saved model) as an absolute path, or the hub id."""
    from ctxaware.core.models import _convert_gguf, resolve_model

    src = resolve_model(spec, reach_hub=False)  # a name for the adapter's config: no hub access needed
    if src.kind == "gguf":
        return str(Path(_convert_gguf(Path(src.path), False)).resolve())
    return str(Path(src.path).resolve()) if src.kind == "local" else src.path


def _record_base(model, spec: str) -> str | None:
    """Set every PEFT config's ``base_model_name_or_path`` to `base_model_path` (None: left as it is)."""
    try:
        base = base_model_path(spec)
    except CtxawareError:  # a model handed in whose spec does not resolve: PEFT keeps its own name
        return None
    for pc in getattr(model, "peft_config", {}).values():
        pc.base_model_name_or_path = base
    return base


def save_final(trainer, tokenizer, out: Path, method: str, base: str | None = None) -> Path:
    """Save the trained model to ``out/model`` (LoRA merged into the weights, loadable by `load_model`);
    a LoRA adapter goes to ``out/adapter`` and records ``base`` (`base_model_path`) as its base model."""
    model = trainer.model
    target = out / "model"
    if hasattr(model, "merge_and_unload"):
        for pc in getattr(model, "peft_config", {}).values():
            if base:
                pc.base_model_name_or_path = base
        model.save_pretrained(out / "adapter")
        if method == "qlora":
            tokenizer.save_pretrained(out / "adapter")
            return out / "adapter"
        model = model.merge_and_unload()
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def save_on_interrupt(trainer, out: Path) -> None:
    """Write ``checkpoint-{step}`` (weights, optimizer, scheduler, RNG: what a resume reads) for the last
    finished step when an interrupted run has steps that no checkpoint holds, and say what the rerun does."""
    step = trainer.state.global_step
    saved = [
        int(p.name.rsplit("-", 1)[1]) for p in out.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()
    ]
    if step == 0:
        print("ctxaware train: stopped before the first step; nothing to resume (a rerun starts at step 0)",
              file=sys.stderr)  # fmt: skip
        return
    if step not in saved:
        trainer._save_checkpoint(
            trainer.model, trial=None
        )  # transformers' own checkpoint, as save_steps writes
    print(f"ctxaware train: checkpoint-{step} holds the {step} finished steps; rerun the same command to resume "
          "from it", file=sys.stderr)  # fmt: skip


def fit(cfg: TrainConfig, trainer, info: dict) -> dict:
    """Run (or resume) training, save the model and write ``train_summary.json``."""
    t0 = time.time()
    out = Path(cfg.output_dir)
    try:
        result = trainer.train(resume_from_checkpoint=info["resume_from"])
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the steps done, so that the promised resume is real
        save_on_interrupt(trainer, out)
        raise
    out = Path(cfg.output_dir)
    path = save_final(
        trainer, trainer.processing_class, out, cfg.method, _record_base(trainer.model, cfg.model)
    )
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    summary = {
        "fingerprint": fingerprint(run_config(cfg)),
        "model_dir": str(path),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "wall_seconds": round(time.time() - t0, 1),
        "losses": losses,
        "context_reliance": list(read_jsonl(out / "context_reliance" / "rows.jsonl")),
        **info,
    }
    write_json_atomic(out / "train_summary.json", summary)
    return summary


def check_training_options(cfg: TrainConfig) -> None:
    """The training options' cross-field rules (one-line errors), checked when a `TrainConfig` is built."""
    if cfg.loss_on not in LOSS_ON:  # a Literal is checked when parsed; a config built in Python lands here
        raise CtxawareError(f"loss_on {cfg.loss_on!r} is not one of {', '.join(LOSS_ON)}")
    if cfg.peft_adapter:  # training puts its own LoRA on the loaded model, not on top of another adapter
        raise CtxawareError(
            f"peft_adapter {cfg.peft_adapter}: training starts from a full model; merge the adapter first "
            "(PeftModel.merge_and_unload) and give the merged directory as model"
        )


def train(cfg: TrainConfig, model=None, tokenizer=None, callbacks: Sequence = ()) -> dict:
    """Fine-tune per ``cfg``; a finished run with the same config returns its saved summary."""
    if cfg.stage != "sft":
        raise CtxawareError(
            f"train() runs the SFT stage; run stage {cfg.stage!r} with ctxaware.training.finetune.run_stage"
        )
    if (summary := finished_run(cfg)) is not None:
        return summary
    trainer, info = build_trainer(cfg, model, tokenizer, callbacks)
    return fit(cfg, trainer, info)
