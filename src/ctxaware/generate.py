"""The one generation engine: batched, greedy by default, left-padded, with stop strings.

Every evaluation (NIH, QA, conflict sets, MT-Bench) calls `generate`. Prompts are `Rendered` prompts
from `ctxaware.chat` (or plain token-id lists); outputs come back in input order.

Greedy means greedy: the call passes its own `GenerationConfig`, so a checkpoint's
``generation_config.json`` (``do_sample=True``, a temperature) cannot switch sampling on.

``batch_context`` is the seam for interventions: a callable ``(batch) -> context manager`` entered around
each batch's ``model.generate``; attention steering uses it to install its per-batch emphasis mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ctxaware.chat import Rendered


@dataclass
class Generation:
    """One output: ``text`` is cut before the first stop string; ``stop_reason`` is stop, eos or length."""

    text: str
    token_ids: list[int]
    n_prompt_tokens: int
    stop_reason: str


@dataclass
class Batch:
    """A left-padded batch as handed to ``batch_context``: ``items[i]`` is row ``i`` of ``input_ids``."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    items: list[Rendered | list[int]]
    indices: list[int]  # positions of the rows in the caller's prompt list


class _StopOnStrings(StoppingCriteria):
    """Per-row stop when the decoded continuation contains one of ``stops``."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, list(stops), prompt_len

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.prompt_len :]:
            text = self.tokenizer.decode(row[-16:], skip_special_tokens=True)  # stops are short: the tail suffices
            done.append(any(s in text for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _ids(p: Rendered | Sequence[int]) -> list[int]:
    return list(p.input_ids) if isinstance(p, Rendered) else list(p)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of shape (B, T_max), padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def greedy_config(model, tokenizer, max_new_tokens: int) -> GenerationConfig:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (not including) the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Rendered | Sequence[int]],
    *,
    max_new_tokens: int = 50,
    stop: Sequence[str] = (),
    batch_size: int = 8,
    batch_context: Callable[[Batch], contextlib.AbstractContextManager] | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[Generation]:
    """Greedy continuations of ``prompts`` (in input order).

    Prompts are sorted by length into batches of ``batch_size`` to waste little padding; ``stop`` strings
    end a row early and are cut from its text.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(_ids(prompts[i])))
    out: list[Generation | None] = [None] * len(prompts)
    cfg = greedy_config(model, tokenizer, max_new_tokens)
    eos_ids = set(cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id])
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [_ids(prompts[i]) for i in idx]
        ids, mask = left_pad(seqs, cfg.pad_token_id, device)
        criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, ids.shape[1])]) if stop else None
        ctx = batch_context(Batch(ids, mask, [prompts[i] for i in idx], idx)) if batch_context else contextlib.nullcontext()
        with ctx:
            seq = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=cfg, stopping_criteria=criteria
            )
        for row, i in zip(seq[:, ids.shape[1] :].tolist(), idx):
            new: list[int] = []
            reason = "length"
            for t in row:
                if t in eos_ids:
                    reason = "eos"
                    break
                new.append(t)
            text, stopped = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
            if stopped:
                reason = "stop"
            out[i] = Generation(text, new, len(_ids(prompts[i])), reason)
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


@torch.inference_mode()
def continuation_logprobs(
    model, tokenizer, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], batch_size: int = 8
) -> list[float]:
    """Sum of log-probabilities of each continuation given its context (for multiple-choice scoring)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: list[float] = []
    for start in range(0, len(contexts), batch_size):
        ctx, cont = contexts[start : start + batch_size], continuations[start : start + batch_size]
        full = [list(a) + list(b) for a, b in zip(ctx, cont)]
        ids, mask = left_pad(full, pad, device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)  # (B, T, V)
        T = ids.shape[1]
        for r, c in enumerate(cont):
            pos = torch.arange(T - len(c), T, device=device)  # positions of the continuation tokens
            tok = ids[r, pos]
            scores.append(logp[r, pos - 1, tok].sum().item())
    return scores
