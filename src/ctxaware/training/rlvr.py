"""The RLVR stage: reinforcement learning with a verifiable reward, through TRL's ``GRPOTrainer``.

``ctxaware train grpo.yaml`` with ``stage: grpo`` lands here (same conventions as ``ctxaware train``;
``model`` is the previous stage's checkpoint). Prompts are context-dependent QA and counterfactual
examples from `ctxaware.data.tasks` (``rl_tasks``), rendered by `ctxaware.rendering.chat.render` in the task's prompt
style; the reward of a completion is the paper's containment (`metrics.containment`): 1.0 when a gold
answer appears in it, else 0.0. For counterfactual items the gold answer is the *context* answer
(``Example.answers``; the memorised one earns nothing), so the stage rewards reading the context.

GRPO (Shao et al. 2024) samples ``num_generations`` completions per prompt and normalises rewards within
the group; with ``beta: 0`` (TRL's default) no reference model is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import write_json_atomic
from ctxaware.data.metrics import containment
from ctxaware.rendering.chat import render
from ctxaware.training.sft import TrainConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GRPOStageConfig(TrainConfig):
    """The RLVR stage (``stage: grpo``): `TrainConfig` fields plus the prompts, sampling and GRPO options."""

    stage: str = dataclasses.field(default="grpo", metadata={"help": "sft, dpo or grpo"})
    learning_rate: float = dataclasses.field(default=1e-6, metadata={"help": "peak learning rate"})
    rl_tasks: list[str] = dataclasses.field(
        default_factory=lambda: ["squad", "cf_world_facts"],
        metadata={"help": "ctxaware.data.tasks QA / conflict tasks whose examples are the RL prompts"},
    )
    rl_n: int | None = dataclasses.field(default=256, metadata={"help": "examples per task (seeded sample)"})
    rl_source: str = dataclasses.field(default="local", metadata={"help": "task data: local or hub"})
    prompt_style: Literal["paper", "simple"] = dataclasses.field(
        default="paper", metadata={"help": "task prompt style: paper or simple"}
    )
    num_generations: int = dataclasses.field(
        default=4, metadata={"help": "completions per prompt (GRPO group)"}
    )
    max_completion_length: int = dataclasses.field(default=32, metadata={"help": "tokens per completion"})
    temperature: float = dataclasses.field(default=1.0, metadata={"help": "sampling temperature"})
    beta: float = dataclasses.field(default=0.0, metadata={"help": "KL coefficient (0: no reference model)"})


def verifiable_reward(completions: Sequence, answers: Sequence[Sequence[str]], **_) -> list[float]:
    """Containment reward: 1.0 when a gold (context) answer is in the completion, else 0.0 (always finite)."""
    out = []
    for c, golds in zip(completions, answers):
        if isinstance(c, str):
            text = c
        elif isinstance(c, list):  # conversational completion: [{"role": "assistant", "content": ...}]
            text = " ".join(str(m.get("content", "")) for m in c if isinstance(m, dict))
        else:
            text = ""
        r = containment(text or "", list(golds or []))
        out.append(r if math.isfinite(r) else 0.0)
    return out


def rl_prompts(cfg: GRPOStageConfig, tokenizer) -> list[dict]:
    """``{id, prompt (rendered chat text), answers}`` rows from the QA and conflict tasks."""
    from ctxaware.data import tasks

    rows = []
    for name in cfg.rl_tasks:
        task = tasks.get_task(name)
        if task.kind not in ("qa", "conflict"):
            raise CtxawareError(
                f"rl_tasks: {name} is a {task.kind} task; use QA or conflict tasks (squad, nqswap, ...)"
            )
        for ex in tasks.sample(tasks.load_examples(task, cfg.rl_source), cfg.rl_n, cfg.seed):
            r = render([{"role": "user", "content": task.prompt(ex, cfg.prompt_style)}], tokenizer, "chat")
            if len(r) >= cfg.max_length:
                continue
            rows.append({"id": f"{name}/{ex.id}", "prompt": r.text, "answers": list(ex.answers)})
    if not rows:
        raise CtxawareError("no RL prompt fits max_length; raise max_length or choose other rl_tasks")
    return rows


def _grpo_trainer_class():
    from trl import GRPOTrainer

    class RenderedGRPOTrainer(GRPOTrainer):
        """GRPO on prompts rendered by `ctxaware.rendering.chat` (text already holds the template and any BOS)."""

        def _tokenize_prompts(self, prompts: list):
            return (
                [self.processing_class(p, add_special_tokens=False)["input_ids"] for p in prompts],
                None,
                {},
            )

    return RenderedGRPOTrainer


def build_grpo_trainer(cfg: GRPOStageConfig, model=None, tokenizer=None, callbacks: Sequence = ()):
    """A ready ``GRPOTrainer`` and ``info``; checks happen before any compute."""
    from trl import GRPOConfig

    from ctxaware.training.preference import make_trainer, setup_stage
    from ctxaware.training.sft import common_args

    if cfg.num_generations < 2:
        raise CtxawareError("num_generations must be at least 2 (GRPO normalises rewards within a group)")
    effective = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if effective % cfg.num_generations:
        raise CtxawareError(
            f"per_device_train_batch_size x gradient_accumulation_steps ({effective}) must be a multiple of "
            f"num_generations ({cfg.num_generations})"
        )
    model, tokenizer, peft_cfg, indicator_id, resume, tracker = setup_stage(cfg, model, tokenizer)
    rows = rl_prompts(cfg, tokenizer)
    device = str(next(model.parameters()).device)
    args = GRPOConfig(
        **common_args(cfg, device),
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        beta=cfg.beta,
        remove_unused_columns=False,
        log_completions=False,
    )
    trainer = make_trainer(
        _grpo_trainer_class(),
        "GRPO",
        cfg,
        rows,
        (tracker, *callbacks),
        model=model,
        reward_funcs=verifiable_reward,
        args=args,
        processing_class=tokenizer,
        peft_config=peft_cfg,
    )
    report = {"stage": "grpo", "n_examples": len(rows), "n_trainable_tokens": 0, "tasks": list(cfg.rl_tasks)}
    return trainer, {"resume_from": resume, "data": report, "indicator_id": indicator_id}


def train_grpo(cfg: GRPOStageConfig, model=None, tokenizer=None, callbacks: Sequence = ()) -> dict:
    """Run (or resume) the RLVR stage; the summary adds the reward per logged step."""
    from ctxaware.training import sft as T

    if (done := T.finished_run(cfg)) is not None:
        return done
    trainer, info = build_grpo_trainer(cfg, model, tokenizer, callbacks)
    summary = T.fit(cfg, trainer, info)
    summary["rewards"] = [
        {"step": h["step"], "reward": h["reward"]} for h in trainer.state.log_history if "reward" in h
    ]
    write_json_atomic(Path(cfg.output_dir) / "train_summary.json", summary)
    return summary
