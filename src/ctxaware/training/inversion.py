"""Context-parametric inversion (seed 002): reliance on the context rises, then falls, during instruction
tuning. This module measures it and holds the data-side mitigations; `ctxaware.training.sft` wires them in.

- `context_reliance` / `ContextRelianceCallback`: p_s (the context answer in the output) and p_o (the
  memorised answer) on a held-out counterfactual set, every ``track_every`` training steps.
- `no_context_nll` + `filter_parametric`: drop the conversations whose responses the model predicts
  without their user context (``filter_parametric``).
- `counterfactual_conversations`: mix counterfactual QA conversations into the data (``counterfactual_mix``).
- QK-only tuning is a training option (``train_modules: q_proj,k_proj``; `ctxaware.training.sft.freeze_except`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

from ctxaware.core.errors import CtxawareError
from ctxaware.core.results import ResultsWriter, SkipCounter
from ctxaware.data.conversations import Conversation
from ctxaware.rendering.chat import render
from ctxaware.rendering.indicator import append_indicator

logger = logging.getLogger(__name__)


@torch.inference_mode()
def no_context_nll(model, tokenizer, convs: Sequence[Conversation]) -> list[float]:
    """Mean NLL of each conversation's assistant tokens with every user message emptied (no context)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for c in convs:
        msgs = [{**m, "content": ""} if m["role"] == "user" else m for m in c.messages]
        r = render(msgs, tokenizer, "chat", add_generation_prompt=False)
        ids = torch.tensor([r.input_ids], device=device)
        mask = r.mask("assistant")[1:].to(device)  # targets are shifted by one
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
        nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
        out.append(nll[mask].mean().item() if mask.any() else float("inf"))
    model.train(was_training)
    return out


def filter_parametric(
    convs: Sequence[Conversation], nll: Sequence[float], fraction: float
) -> tuple[list, list]:
    """Drop the ``fraction`` of conversations with the lowest no-context NLL; return ``(kept, dropped)``."""
    if not 0 <= fraction < 1:
        raise CtxawareError(f"filter_parametric={fraction} must be in [0, 1)")
    n_drop = int(round(fraction * len(convs)))
    order = sorted(range(len(convs)), key=lambda i: nll[i])
    drop = set(order[:n_drop])
    return [c for i, c in enumerate(convs) if i not in drop], [convs[i] for i in sorted(drop)]


def load_conflict_set(spec: str) -> list:
    """Counterfactual examples (`ctxaware.data.tasks.Example`) from a task name or a .json/.jsonl/.zip file."""
    from ctxaware.data import tasks

    if spec in tasks.TASKS:
        return tasks.load_examples(tasks.get_task(spec))
    path = Path(spec)
    if not path.is_file():
        raise CtxawareError(
            f"counterfactual set {spec} is neither a task ({', '.join(tasks.TASKS)}) nor a file"
        )
    task = tasks.get_task("nqswap" if path.suffix == ".zip" else "cf_world_facts")
    reader = tasks.read_nqswap_zip if path.suffix == ".zip" else tasks.read_json_list
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        reader = tasks.jsonl_rows
    skips, out = SkipCounter(), []
    for i, row in enumerate(reader(path)):
        convert = tasks.convert_nqswap if "sub_context" in row else tasks.convert_conflict
        try:
            ex = convert(row)
        except tasks.Malformed as e:
            skips.skip(str(e), f"row {i}")
            continue
        ex.id = ex.id or str(i)
        out.append(ex)
    if skips.total:
        logger.warning(
            "%s: skipped %d malformed rows %s (task %s)", path, skips.total, skips.counts, task.name
        )
    return out


def conflict_prompt(ex) -> str:
    from ctxaware.data.tasks import CONFLICT_TEMPLATE

    return CONFLICT_TEMPLATE.format(context=ex.context, question=ex.question)


def counterfactual_conversations(spec: str, n_base: int, seed: int) -> list[Conversation]:
    """``PATH:RATIO`` -> ``round(RATIO * n_base)`` counterfactual QA conversations (context answer as target)."""
    path, _, ratio = spec.rpartition(":")
    try:
        r = float(ratio)
    except ValueError:
        raise CtxawareError(f"counterfactual_mix {spec!r} must be PATH:RATIO, e.g. nqswap.zip:0.1") from None
    examples = load_conflict_set(path)
    n = min(len(examples), int(round(r * n_base)))
    picked = random.Random(seed).sample(examples, n)
    return [
        Conversation(
            f"cf-{ex.id}",
            [
                {"role": "user", "content": conflict_prompt(ex)},
                {"role": "assistant", "content": ex.answers[0]},
            ],
            -1,
        )
        for ex in picked
    ]


def context_reliance(
    model, tokenizer, examples, indicator: str | None = None, max_new_tokens: int = 24
) -> dict:
    """p_s (context answer in the output) and p_o (memorised answer in the output) over ``examples``."""
    from ctxaware.data.metrics import conflict_scores
    from ctxaware.rendering.generate import generate

    prompts = []
    for ex in examples:
        text = conflict_prompt(ex)
        text = append_indicator(text, indicator) if indicator else text
        prompts.append(render([{"role": "user", "content": text}], tokenizer, "chat"))
    outs = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=["\n\n", "<|user|>"], progress=False
    )
    scores = [conflict_scores(o.text, ex.answers, ex.memory_answers) for o, ex in zip(outs, examples)]
    n = max(1, len(scores))
    return {
        "p_s": sum(s["p_s"] for s in scores) / n,
        "p_o": sum(s["p_o"] for s in scores) / n,
        "n": len(scores),
    }


def bind_trackers(trainer) -> None:
    """Bind every `ContextRelianceCallback` of ``trainer`` to it, so that its numbers are logged."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, ContextRelianceCallback):
            cb.trainer = trainer


class ContextRelianceCallback(TrainerCallback):
    """Every ``every`` steps (and at the start and the end), measure p_s/p_o and append a row
    ``{step, p_s, p_o, n}`` to ``out_dir/rows.jsonl``; at the end, plot the curve. Bound to its trainer
    (`attach`), it also logs ``context_reliance/p_s`` and ``context_reliance/p_o`` through ``trainer.log``,
    so they reach the trainer's log history and every ``report_to`` integration (TensorBoard, W&B,
    Trackio) beside the loss.

    In any TRL / transformers trainer (docs/training.md)::

        from ctxaware.data.tasks import get_task, load_examples
        from ctxaware.training.inversion import ContextRelianceCallback

        examples = load_examples(get_task("cf_world_facts"))[:32]
        ContextRelianceCallback(tokenizer, examples, every=50, out_dir="runs/x/reliance").attach(trainer)
        trainer.train()
    """

    def __init__(
        self,
        tokenizer,
        examples,
        every: int,
        out_dir,
        config: dict | None = None,
        indicator: str | None = None,
        max_new_tokens: int = 24,
    ):
        self.tok, self.examples, self.every, self.indicator = tokenizer, examples, every, indicator
        self.max_new_tokens = max_new_tokens
        self.trainer = None
        config = config if config is not None else {"examples": [e.id for e in examples], "every": every,
                                                     "indicator": indicator, "max_new_tokens": max_new_tokens}  # fmt: skip
        self.writer = ResultsWriter(out_dir, config, key_fields=("step",), kind="context_reliance")

    def attach(self, trainer) -> ContextRelianceCallback:
        """Add this callback to ``trainer`` and log through it (its log history and integrations)."""
        trainer.add_callback(self)
        self.trainer = trainer
        return self

    def measure(self, model, step: int) -> None:
        if self.writer.done({"step": step}):
            return
        was_training = model.training
        model.eval()
        row = context_reliance(model, self.tok, self.examples, self.indicator, self.max_new_tokens)
        model.train(was_training)
        self.writer.write({"step": step, **row})
        logger.info("step %d: p_s=%.3f p_o=%.3f", step, row["p_s"], row["p_o"])
        if self.trainer is not None:  # into log_history and every report_to integration, beside the loss
            self.trainer.log({"context_reliance/p_s": row["p_s"], "context_reliance/p_o": row["p_o"]})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and state.global_step == 0:
            self.measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and self.every and state.global_step % self.every == 0:
            self.measure(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        self.measure(model, state.global_step)
        from ctxaware.core.plotting import context_reliance_steps

        rows = sorted(self.writer.rows, key=lambda r: r["step"])
        context_reliance_steps({"": rows}, self.writer.dir / "context_reliance.png")
        self.writer.close()
