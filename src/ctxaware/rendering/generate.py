"""The one generation engine: batched, greedy by default, left-padded, with stop strings.

Every evaluation (NIH, QA, conflict sets, MT-Bench) calls `generate`. Prompts are `Rendered` prompts
from `ctxaware.rendering.chat` (or plain token-id lists); outputs come back in input order.

Greedy means greedy: the call passes its own `GenerationConfig`, so a checkpoint's
``generation_config.json`` (``do_sample=True``, a temperature) cannot switch sampling on.

``batch_context`` is the seam for interventions: a callable ``(batch) -> context manager`` entered around
each batch's ``model.generate``; attention steering uses it to install its per-batch emphasis mask.

``prefix_cache=True`` reuses computation between prompts that share a prefix (NIH, paper App. A.2: all
400 tests cut the same haystack from the same start). Prompts are sorted lexicographically, which is a
depth-first walk of their prefix trie; one batch-1 KV cache follows that walk, cropped back to the common
prefix with the previous prompt and extended by the rest, so every distinct prefix is prefilled once.
Each prompt's cache (all tokens but the last) is snapshotted, the snapshots of a batch are left-padded and
stacked, and ``model.generate`` decodes the batch from them: same greedy decoding, a fraction of the
prefill. ``callback(indices, generations)`` is called after every batch, so callers can write results as
they go.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ctxaware.rendering.chat import Rendered

logger = logging.getLogger(__name__)


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
            text = self.tokenizer.decode(
                row[-16:], skip_special_tokens=True
            )  # stops are short: the tail suffices
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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def cache_kwarg(model, cache) -> dict:
    """``{name: cache}`` under the name this transformers version takes: ``cache`` where the model's
    ``forward`` declares it (transformers >= 5.2x deprecates ``past_key_values``, to be removed in 6),
    ``past_key_values`` before that."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


class PrefixChain:
    """A batch-1 KV cache that walks the prefix trie of lexicographically sorted prompts.

    ``advance(ids)`` crops the cache back to the longest common prefix with the previous prompt and
    prefills only the rest; ``computed`` counts the tokens actually prefilled.
    """

    def __init__(self, model) -> None:
        self.model, self.cache, self.ids, self.computed = model, DynamicCache(), [], 0
        self.device = next(model.parameters()).device

    def advance(self, target: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Make the cache hold exactly ``target``; return its (keys, values) per layer, each (1, H, T, D)."""
        c = _common_prefix(self.ids, target)
        if c < len(self.ids):
            self.cache.crop(c - len(self.ids))  # negative: drop that many tokens (views, never in place)
        if len(target) > c:
            new = torch.tensor([list(target[c:])], dtype=torch.long, device=self.device)  # (1, m)
            pos = torch.arange(c, len(target), device=self.device)[None]  # (1, m)
            self.model(input_ids=new, position_ids=pos, use_cache=True, logits_to_keep=1,
                       **cache_kwarg(self.model, self.cache))  # fmt: skip
            self.computed += len(target) - c
        self.ids = list(target)
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def batch_cache(self, seqs: Sequence[Sequence[int]], width: int) -> DynamicCache:
        """Left-padded cache of every prompt but its last token: shape (B, H, width - 1, D) per layer."""
        snaps = [self.advance(s[:-1]) for s in seqs]
        T, layers = width - 1, []
        for li in range(len(snaps[0])):
            k0, v0 = snaps[0][li]
            K = k0.new_zeros((len(seqs), k0.shape[1], T, k0.shape[3]))  # (B, H, T, Dk)
            V = v0.new_zeros((len(seqs), v0.shape[1], T, v0.shape[3]))  # (B, H, T, Dv)
            for r, snap in enumerate(snaps):
                k, v = snap[li]
                K[r, :, T - k.shape[2] :] = k[0]
                V[r, :, T - v.shape[2] :] = v[0]
            layers.append((K, V))
        return DynamicCache(ddp_cache_data=layers)


def _finish(row: list[int], n_prompt: int, tokenizer, stop: Sequence[str], eos_ids: set) -> Generation:
    new: list[int] = []
    reason = "length"
    for t in row:
        if t in eos_ids:
            reason = "eos"
            break
        new.append(t)
    text, stopped = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
    return Generation(text, new, n_prompt, "stop" if stopped else reason)


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
    prefill_context: Callable[[Batch], contextlib.AbstractContextManager] | None = None,
    progress: bool = True,
    desc: str = "generating",
    prefix_cache: bool = False,
    callback: Callable[[list[int], list[Generation]], None] | None = None,
    stats: dict | None = None,
) -> list[Generation]:
    """Greedy continuations of ``prompts`` (in input order).

    Prompts are sorted by length into batches of ``batch_size`` to waste little padding; ``stop`` strings
    end a row early and are cut from its text. ``prefix_cache`` sorts them lexicographically instead and
    prefills shared prefixes once (see the module docstring; it is off under ``batch_context``, whose
    interventions expect whole-prompt forwards). ``prefill_context`` is entered around each batch like
    ``batch_context`` but only reads the first forward of the batch (attention capture with rows
    ``"last"``), so prefix reuse stays on. ``callback(indices, generations)`` runs after each batch;
    ``stats`` (a dict), when given, receives ``prompt_tokens`` and ``prefill_tokens``.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        # None would let transformers fall back to its model-agnostic max_length (20 new tokens)
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    seqs = [_ids(p) for p in prompts]
    use_prefix = prefix_cache and batch_context is None and all(len(s) >= 2 for s in seqs)
    if prefix_cache and not use_prefix:
        logger.info(
            "prefix reuse is off for this call (batch_context given or a prompt shorter than 2 tokens)"
        )
    if use_prefix:
        order = sorted(range(len(seqs)), key=seqs.__getitem__)  # a depth-first walk of the prefix trie
    else:
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    chain = PrefixChain(model) if use_prefix else None
    out: list[Generation | None] = [None] * len(prompts)
    cfg = greedy_config(model, tokenizer, max_new_tokens)
    eos_ids = set(cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id])
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = left_pad([seqs[i] for i in idx], cfg.pad_token_id, device)
        criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, ids.shape[1])]) if stop else None
        extra = cache_kwarg(model, chain.batch_cache([seqs[i] for i in idx], ids.shape[1])) if chain else {}
        batch = Batch(ids, mask, [prompts[i] for i in idx], idx)
        ctx = batch_context(batch) if batch_context else contextlib.nullcontext()
        pre = prefill_context(batch) if prefill_context else contextlib.nullcontext()
        with ctx, pre:
            seq = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=cfg, stopping_criteria=criteria, **extra
            )
        gens = [
            _finish(row, len(seqs[i]), tokenizer, stop, eos_ids)
            for row, i in zip(seq[:, ids.shape[1] :].tolist(), idx)
        ]
        for i, g in zip(idx, gens):
            out[i] = g
        if callback is not None:
            callback(list(idx), gens)
        bar.update(len(idx))
    bar.close()
    if stats is not None:
        total = sum(map(len, seqs))
        stats.update(prompt_tokens=total, prefill_tokens=chain.computed + len(seqs) if chain else total)
    return out  # type: ignore[return-value]


@torch.inference_mode()
def continuation_logprobs(
    model,
    tokenizer,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 8,
) -> list[float]:
    """Sum of log-probabilities of each continuation given its context (for multiple-choice scoring)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: list[float] = []
    for start in range(0, len(contexts), batch_size):
        ctx, cont = contexts[start : start + batch_size], continuations[start : start + batch_size]
        full = [list(a) + list(b) for a, b in zip(ctx, cont)]
        ids, mask = left_pad(full, pad, device)
        logp = torch.log_softmax(
            model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1
        )  # (B, T, V)
        T = ids.shape[1]
        for r, c in enumerate(cont):
            pos = torch.arange(T - len(c), T, device=device)  # positions of the continuation tokens
            tok = ids[r, pos]
            scores.append(logp[r, pos - 1, tok].sum().item())
    return scores
