"""The DPO stage: preference optimisation after SFT, through TRL's ``DPOTrainer`` (Rafailov et al. 2023).

``ctxaware train dpo.yaml`` with ``stage: dpo`` lands here. The config is `TrainConfig` plus the DPO fields,
so everything ``ctxaware train`` does still holds: YAML + CLI flags, full / LoRA / QLoRA, the chat
template choice, resumption from the last checkpoint under the same config, ``train_summary.json``, the
final model (LoRA merged) under ``output_dir/model`` and the p_s/p_o `ContextRelianceCallback`
(``track_every``). ``model`` is the previous stage's checkpoint (e.g. ``runs/sft/model``).

Data (``data``): a local .json/.jsonl file or a hub id (``data_split``), one preference pair per row, in any of

- LLaMA-Factory ShareGPT: ``{conversations: [{from, value}...], chosen: {from, value}, rejected: {...}}``
  (``../shared/data/sft/dpo_en_demo.json``);
- TRL explicit prompt: ``{prompt, chosen, rejected}`` as strings or message lists
  (``trl-lib/ultrafeedback_binarized``);
- TRL implicit prompt: ``{chosen, rejected}`` as two full conversations sharing the prompt turns
  (``Anthropic/hh-rlhf`` style, as message lists).

Every pair is rendered by `ctxaware.rendering.chat.render` (the one renderer): prompt = the conversation up to the
open assistant turn, completion = the assistant content plus its end-of-turn marker (the tokens
`train.assistant_labels` gives loss in SFT). TRL receives ``prompt_ids/chosen_ids/rejected_ids`` and does
not re-tokenize.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import SkipCounter, read_jsonl, write_json_atomic
from ctxaware.data.conversations import ROLE_MAP
from ctxaware.rendering.chat import render
from ctxaware.training.inversion import bind_trackers
from ctxaware.training.sft import TrainConfig, common_args

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DPOStageConfig(TrainConfig):
    """The DPO stage (``stage: dpo``): `TrainConfig` fields plus the DPO loss options."""

    stage: str = dataclasses.field(default="dpo", metadata={"help": "sft, dpo or grpo"})
    learning_rate: float = dataclasses.field(default=5e-6, metadata={"help": "peak learning rate"})
    beta: float = dataclasses.field(
        default=0.1, metadata={"help": "DPO beta: strength of the implicit KL to the reference model"}
    )
    loss_type: str = dataclasses.field(
        default="sigmoid", metadata={"help": "TRL DPO loss: sigmoid (DPO), ipo, hinge, robust, ..."}
    )
    max_pairs: int | None = dataclasses.field(
        default=None, metadata={"help": "use the first N preference pairs only"}
    )


@dataclass
class Preference:
    """One preference pair: the prompt messages and the chosen / rejected assistant replies."""

    id: str
    prompt: list[dict]
    chosen: str
    rejected: str


# ----------------------------------------------------------------------------- loading


def _message(m: Any) -> dict:
    if isinstance(m, dict) and "from" in m:
        role, content = m.get("from"), m.get("value")
    elif isinstance(m, dict):
        role, content = m.get("role"), m.get("content")
    else:
        raise ValueError("a message is not a mapping")
    if not isinstance(role, str) or role.lower() not in ROLE_MAP or not isinstance(content, str):
        raise ValueError(f"unknown role {role!r} or non-text content")
    return {"role": ROLE_MAP[role.lower()], "content": content}


def _reply(v: Any) -> str:
    """The assistant text of a chosen/rejected field: a string, one message, or a list ending in one."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        return _message(v)["content"]
    if isinstance(v, list) and v:
        last = _message(v[-1])
        if last["role"] != "assistant":
            raise ValueError("the reply does not end with an assistant message")
        return last["content"]
    raise ValueError("chosen/rejected is empty or of an unknown type")


def parse_preference(row: Any, index: int) -> Preference:
    """One raw row in any supported layout -> `Preference`; raises ``ValueError`` with the reason."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise ValueError("row lacks chosen/rejected")
    rid = str(row.get("id", index))
    if "conversations" in row:
        prompt = [_message(m) for m in row["conversations"]]
    elif "prompt" in row:
        p = row["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else [_message(m) for m in p]
    else:  # implicit prompt: the shared leading messages of both conversations
        ch, rj = [_message(m) for m in row["chosen"]], [_message(m) for m in row["rejected"]]
        n = 0
        while n < min(len(ch), len(rj)) - 1 and ch[n] == rj[n]:
            n += 1
        prompt = ch[:n]
    chosen, rejected = _reply(row["chosen"]), _reply(row["rejected"])
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user message")
    if not chosen.strip() or not rejected.strip():
        raise ValueError("empty chosen or rejected reply")
    return Preference(rid, prompt, chosen, rejected)


def _raw_rows(spec: str, split: str, skips: SkipCounter) -> Iterator[dict]:
    path = Path(spec)
    if path.is_file():
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from read_jsonl(path, skips)  # a malformed line is skipped and counted
            return
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise CtxawareError(f"{path} must hold a JSON list of preference rows")
        yield from data
        return
    if spec.endswith((".json", ".jsonl")):
        raise CtxawareError(f"preference file {spec} does not exist")
    from datasets import load_dataset  # hub id, e.g. trl-lib/ultrafeedback_binarized (needs the network)

    try:
        yield from load_dataset(spec, split=split)
    except Exception as e:  # noqa: BLE001  offline, unknown id, ...
        raise CtxawareError(f"cannot load preference data {spec!r} ({type(e).__name__}: {e})"[:300]) from None


def load_preferences(
    spec: str, split: str = "train", limit: int | None = None, skips: SkipCounter | None = None
) -> list[Preference]:
    """Preference pairs from a file or hub id; malformed rows are skipped and counted in ``skips``."""
    skips = skips if skips is not None else SkipCounter()
    out = []
    for i, row in enumerate(_raw_rows(spec, split, skips)):
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(parse_preference(row, i))
        except ValueError as e:
            skips.skip(str(e), f"row {i}")
    if not out:
        raise CtxawareError(f"{spec} holds no usable preference pair (skips: {skips.as_dict()['by_reason']})")
    return out


# ----------------------------------------------------------------------------- tokenization


def reply_ids(prompt: list[dict], reply: str, tokenizer) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)``: the rendered prompt with its open assistant turn, and the reply's
    content plus end-of-turn marker (exactly the tokens SFT trains on)."""
    from ctxaware.training.sft import assistant_labels

    p = render(prompt, tokenizer, "chat", add_generation_prompt=True)
    full = render(
        [*prompt, {"role": "assistant", "content": reply}], tokenizer, "chat", add_generation_prompt=False
    )
    n = len(p.input_ids)
    if full.input_ids[:n] != p.input_ids:
        raise ValueError("the rendered prompt is not a prefix of prompt + reply (chat template)")
    labels = assistant_labels(full, tokenizer)
    last = max((i for i, t in enumerate(labels) if t != -100 and i >= n), default=None)
    if last is None:
        raise ValueError("the reply has no tokens")
    return p.input_ids, full.input_ids[n : last + 1]


def tokenize_preferences(
    pairs: Sequence[Preference], tokenizer, max_length: int, skips: SkipCounter
) -> list[dict]:
    """``{id, prompt_ids, chosen_ids, rejected_ids}`` per pair (prompts that fill ``max_length`` are skipped)."""
    rows = []
    for pr in pairs:
        try:
            prompt_ids, chosen = reply_ids(pr.prompt, pr.chosen, tokenizer)
            _, rejected = reply_ids(pr.prompt, pr.rejected, tokenizer)
        except (ValueError, CtxawareError) as e:
            skips.skip(f"cannot render: {str(e)[:60]}", pr.id)
            continue
        if len(prompt_ids) >= max_length:
            skips.skip("prompt fills max_length", pr.id)
            continue
        rows.append({"id": pr.id, "prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected})
    if not rows:
        raise CtxawareError(
            f"no preference pair survives tokenization (skips: {skips.as_dict()['by_reason']})"
        )
    return rows


# ----------------------------------------------------------------------------- trainer


def make_trainer(
    trainer_cls: type, stage: str, cfg: TrainConfig, rows: list[dict], callbacks: Sequence, **kw
):
    """Build a TRL trainer for a post-SFT stage, with a one-line error on a bad set-up; record the config."""
    from datasets import Dataset

    from ctxaware.training import sft as T

    try:
        trainer = trainer_cls(
            train_dataset=Dataset.from_list(rows),
            callbacks=[c for c in callbacks if c is not None],
            **kw,
        )
    except ValueError as e:
        raise CtxawareError(f"cannot set up {stage}: {str(e).splitlines()[0]}") from None
    bind_trackers(trainer)
    write_json_atomic(Path(cfg.output_dir) / "train_config.json", T.run_config(cfg))
    return trainer


def setup_stage(cfg: TrainConfig, model, tokenizer) -> tuple:
    """Shared set-up of the DPO and GRPO stages: resume point, model, template, PEFT config, tracker."""
    from ctxaware.training import sft as T

    out = Path(cfg.output_dir)
    resume = T._resume_point(cfg, out)
    if resume is None:
        T._check_same_config(cfg, out / "train_config.json", f"output_dir {out}")
    if model is None:
        model, tokenizer = T.load_for_training(cfg)
    else:
        T._check_method(cfg, str(next(model.parameters()).device))
    model, peft_cfg, indicator_id = T.prepare_model(cfg, model, tokenizer)
    return model, tokenizer, peft_cfg, indicator_id, resume, T.tracker_for(cfg, tokenizer)


def _dpo_trainer_class():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer on rows already rendered by `ctxaware.rendering.chat` (no second tokenization)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer


def build_dpo_trainer(cfg: DPOStageConfig, model=None, tokenizer=None, callbacks: Sequence = ()):
    """A ready ``DPOTrainer`` and ``info`` (data report, resume point); checks happen before any compute."""
    from trl import DPOConfig

    if not cfg.data:
        raise CtxawareError(
            "no preference data; set data: PATH (e.g. ../shared/data/sft/dpo_en_demo.json) or a hub id"
        )
    model, tokenizer, peft_cfg, indicator_id, resume, tracker = setup_stage(cfg, model, tokenizer)
    skips = SkipCounter()
    pairs = load_preferences(cfg.data, cfg.data_split, cfg.max_pairs, skips)
    rows = tokenize_preferences(pairs, tokenizer, cfg.max_length, skips)
    device = str(next(model.parameters()).device)
    args = DPOConfig(
        **common_args(cfg, device),
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        max_length=cfg.max_length,
        remove_unused_columns=False,
        dataset_num_proc=None,
    )
    ref = None
    if peft_cfg is None:  # full fine-tuning: the frozen reference is the starting checkpoint itself
        import copy

        ref = copy.deepcopy(model).eval().requires_grad_(False)
    trainer = make_trainer(
        _dpo_trainer_class(),
        "DPO",
        cfg,
        rows,
        (tracker, *callbacks),
        model=model,
        ref_model=ref,
        args=args,
        processing_class=tokenizer,
        peft_config=peft_cfg,
    )
    report = {
        "stage": "dpo",
        "n_examples": len(rows),
        "n_trainable_tokens": sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
        "skipped_examples": skips.as_dict(),
    }
    return trainer, {"resume_from": resume, "data": report, "indicator_id": indicator_id}


def train_dpo(cfg: DPOStageConfig, model=None, tokenizer=None, callbacks: Sequence = ()) -> dict:
    """Run (or resume) the DPO stage; returns the ``train_summary.json`` content."""
    from ctxaware.training import sft as T

    if (summary := T.finished_run(cfg)) is not None:
        return summary
    trainer, info = build_dpo_trainer(cfg, model, tokenizer, callbacks)
    return T.fit(cfg, trainer, info)
