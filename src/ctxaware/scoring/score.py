"""Context-dependency score of every assistant turn of an instruction dataset (paper Sec. 3.1, eq. 2).

    s_M(Y_m) = 1/|Y_m| * sum_{y in Y_m} max_h sum_{x in X_1 u ... u X_m} Att_h(y, x)        (2)

A conversation ``[system?], X_1, Y_1, ..., X_n, Y_n`` is rendered once with the seed model's chat template
(`ctxaware.rendering.chat.render`). U_m are the *content* tokens of the user messages X_1..X_m (role ``user``: no
role markers, no BOS, no system prompt); the response tokens of turn m are the content tokens of Y_m. For
each response token y we take the layer-l softmax row **of the query at y's own position** (the row that
reads y and its prefix; not the row of the token before y, which predicts y), sum it over U_m, reduce over
heads (max, as in eq. 2; or mean, or one fixed head) and average over |Y_m|.

One forward pass per conversation scores all of its turns: `intercept.capture_attention` computes layer
l's softmax only for the response-token query rows, reduces each row at once to its mass on one key group
(user tokens), and stops the forward pass after the deepest requested layer (no later layers, no LM head).
Memory is O(rows_chunk x T) for the capture, linear in the length T. With a causal mask a query in Y_m
sees only keys before it, so "user tokens" there are exactly U_m; `layout` checks that every user token
of a later turn lies after Y_m, which makes that restriction explicit.

``ctxaware score`` runs this over a dataset: conversations are batched by length (left padding) in a
deterministic plan of global batches; under ``torchrun``/``accelerate launch`` rank r scores the batches with
``index % world_size == r`` into its own part file (a `results.ResultsWriter`, so a killed run resumes with no
lost or duplicated rows), and rank 0 waits until every turn has a row, then merges the parts into one file
ordered by (input row, turn): the same rows in the same order as a single-process run. Batches, not single
conversations, are the unit of sharding because padding changes float results in the last bits: a batch
computed on any rank gives the same bits, a conversation batched with other neighbours would not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ctxaware.attention.intercept import capture_attention
from ctxaware.core.config import ModelConfig, overwrite_option, to_dict
from ctxaware.core.distributed import dist_info, process_group
from ctxaware.core.errors import CtxawareError
from ctxaware.core.models import model_shape
from ctxaware.core.provenance import model_about
from ctxaware.core.results import (
    ResultsWriter,
    SkipCounter,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)
from ctxaware.data.conversations import load_conversations
from ctxaware.rendering.chat import clip_messages, end_of_turn, render, with_empty_system
from ctxaware.scoring.sharding import all_ranks_throughput, merge_parts, plan_batches

HEAD_REDUCE = ("max", "mean")
PAPER_LAYER, PAPER_LAYERS, PAPER_MAX_TOKENS = (
    15,
    22,
    2047,
)  # the paper: layer 15 of TinyLlama's 22, 2,047 tokens


def default_layer(model) -> int:
    """The scoring layer at the paper's relative depth: ``round(15 / 22 * num_hidden_layers)``.

    15 for the paper's seed (TinyLlama, 22 layers); 20 of SmolLM2's 30; 12 of Gemma-3-270M's 18.
    """
    n = model_shape(model)[0]
    return min(n - 1, round(PAPER_LAYER * n / PAPER_LAYERS))


def model_window(model) -> int | None:
    """The longest sequence the model was trained for (``max_position_embeddings``), if it says."""
    cfg = getattr(model.config, "text_config", None) or model.config
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def default_max_tokens(model, max_tokens: int | None = None) -> int:
    """``max_tokens`` (default the paper's 2,047) clamped to the model's window ``max_position_embeddings``."""
    want = PAPER_MAX_TOKENS if max_tokens is None else max_tokens
    win = model_window(model)
    return want if win is None else min(want, win)


@dataclass
class TurnLayout:
    """Where turn ``turn`` (0-based assistant turn) lives in the rendered ids.

    ``positions`` are the query positions of the response tokens of Y_m kept after truncation;
    ``n_user`` = |U_m|; ``skipped`` is a reason when the turn cannot be scored.
    """

    turn: int
    positions: list[int]
    n_user: int
    truncated: bool = False
    skipped: str | None = None


@dataclass
class Layout:
    """A rendered conversation cut to ``max_tokens``: ids, the user-token mask and every turn's layout."""

    input_ids: list[int]
    user: list[bool]
    turns: list[TurnLayout] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


PROTOCOLS = ("authors", "ctxaware")


def _dropped_ids(tokenizer) -> set[int]:
    """The authors' user mask drops the newline, BOS and EOS ids (Llama-2's 13, 1 and 2): here every token
    that decodes to exactly one newline, and the BOS and EOS ids of this tokenizer."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id} - {None}
    nl = tokenizer.encode("\n", add_special_tokens=False)
    return ids | ({nl[0]} if len(nl) == 1 else set())


def layout(
    messages: Sequence[dict], tokenizer, max_tokens: int | None = 4096, protocol: str = "authors"
) -> Layout:
    """Render ``messages`` with the chat template and locate U_m and Y_m for every assistant turn m.

    ``protocol="authors"`` (default) follows the authors' released scorer (docs/scoring.md): an empty system
    turn first (when the template accepts one), ``tokenizer(text)`` with its special tokens (a second BOS for
    templates that write their own), Y_m = the response and the template's end-of-turn text (up to the next
    user marker), U = system and user content tokens except newline, BOS and EOS ids.
    ``protocol="ctxaware"``: the conversation as given, the template's own BOS, Y_m = response content tokens,
    U = user content tokens.

    A turn cut by ``max_tokens`` is scored on the response tokens that remain (``truncated``); a turn cut
    entirely is ``skipped`` with a reason.
    """
    if protocol not in PROTOCOLS:
        raise CtxawareError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    authors = protocol == "authors"
    msgs = with_empty_system(messages, tokenizer) if authors else list(messages)
    msgs = clip_messages(msgs, max_tokens)  # a huge row is not tokenized whole
    r = render(msgs, tokenizer, "chat", add_generation_prompt=False, add_special_tokens=authors or None)
    T = len(r) if max_tokens is None else min(len(r), max_tokens)
    roles = r.content_roles()[:T]
    if authors:
        drop = _dropped_ids(tokenizer)
        user = [ro in ("user", "system") and t not in drop for ro, t in zip(roles, r.input_ids)]
        eot = end_of_turn(tokenizer)
    else:
        user = [ro == "user" for ro in roles]
    user_spans = [s for s in r.spans if s.role == "user"]
    turns = []
    for m, span in enumerate(s for s in r.spans if s.role == "assistant"):
        end = span.end
        if authors and span.end > span.start:  # the end-of-turn text belongs to Y_m
            char_end = r.offsets[span.end - 1][1]
            if r.text.startswith(eot, char_end):
                while end < len(r) and r.offsets[end][0] < char_end + len(eot):
                    end += 1
        positions = list(range(span.start, min(end, T)))
        if not authors:
            positions = [p for p in positions if r.roles[p] == "assistant"]
        # U_m: user tokens before Y_m; user tokens of later turns must all lie after Y_m.
        n_user = sum(user[: min(span.start, T)])
        later = [s for s in user_spans if s.start >= span.start]
        if any(s.start < end for s in later):
            raise CtxawareError(f"assistant turn {m} overlaps a later user message in the rendered ids")
        t = TurnLayout(m, positions, n_user, truncated=end > T)
        if span.end <= span.start:
            t.skipped = "empty response after tokenization"
        elif not positions:
            t.skipped = f"response truncated away (max_tokens={max_tokens})"
        elif n_user == 0:
            t.skipped = "no user tokens before the response"
        turns.append(t)
    n_turns = sum(m.get("role") == "assistant" for m in messages)
    for m in range(len(turns), n_turns):  # dropped by clip_messages: far beyond max_tokens
        turns.append(
            TurnLayout(m, [], 0, truncated=True, skipped=f"response truncated away (max_tokens={max_tokens})")
        )
    return Layout(r.input_ids[:T], user, turns)


def _pad_batch(layouts: Sequence[Layout], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Left-pad a batch: ids (B, T), attention mask (B, T), rows (B, R) (-1 = padding), groups (B, T, 1)."""
    B, T = len(layouts), max(len(x) for x in layouts)
    R = max(1, max(sum(len(t.positions) for t in x.turns if t.skipped is None) for x in layouts))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    rows = torch.full((B, R), -1, dtype=torch.long)
    groups = torch.zeros(B, T, 1)  # one key group: user content tokens
    for b, x in enumerate(layouts):
        off = T - len(x)  # left padding shifts every position by off
        ids[b, off:] = torch.tensor(x.input_ids)
        mask[b, off:] = 1
        groups[b, off:, 0] = torch.tensor(x.user, dtype=torch.float32)
        pos = [p + off for t in x.turns if t.skipped is None for p in t.positions]
        rows[b, : len(pos)] = torch.tensor(pos, dtype=torch.long)
    return ids, mask, rows, groups


def reduce_heads(mass: torch.Tensor, head_reduce: str = "max", head: int | None = None) -> float:
    """eq. (2) for one turn: ``mass`` (H, n) user mass per head and response token -> the turn's score."""
    if head is not None:
        per_token = mass[head]  # (n,)
    elif head_reduce == "max":
        per_token = mass.max(dim=0).values  # (n,)
    elif head_reduce == "mean":
        per_token = mass.mean(dim=0)  # (n,)
    else:
        raise CtxawareError(f"head_reduce {head_reduce!r} is not one of {', '.join(HEAD_REDUCE)}")
    return float(per_token.double().mean())


def check_layers(model, layers: Sequence[int]) -> None:
    n = model_shape(model)[0]
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise CtxawareError(
            f"layer(s) {bad} out of range; {model.config.name_or_path or 'the model'} has layers 0..{n - 1}"
        )


def score_layouts(
    model,
    layouts: Sequence[Layout],
    layers: Sequence[int],
    *,
    head_reduce: str = "max",
    head: int | None = None,
    pad_id: int = 0,
    chunk: int = 256,
    method: str = "onehot",
) -> list[list[dict]]:
    """Score a batch of conversations in one forward pass (stopped after ``max(layers)``).

    Returns, per conversation, per turn: ``{"scores": {layer: s}, "heads": {layer: [per-head mean mass]}}``
    (``None`` for skipped turns).
    """
    check_layers(model, layers)
    if head is not None and not 0 <= head < model.config.num_attention_heads:
        raise CtxawareError(
            f"head {head} out of range; the model has heads 0..{model.config.num_attention_heads - 1}"
        )
    out: list[list[dict]] = [[{} for _ in x.turns] for x in layouts]
    if not any(t.skipped is None for x in layouts for t in x.turns):
        return out
    dev = next(model.parameters()).device
    ids, mask, rows, groups = _pad_batch(layouts, pad_id)
    caps = capture_attention(
        model,
        ids.to(dev),
        mask.to(dev),
        list(layers),
        rows.to(dev),
        groups.to(dev),
        chunk=chunk,
        method=method,
    )
    for layer in layers:
        res = caps[layer][..., 0].cpu()  # (B, H, R): user mass per head and response row
        for b, x in enumerate(layouts):
            a = 0
            for i, t in enumerate(x.turns):
                if t.skipped is not None:
                    continue
                mass = res[b, :, a : a + len(t.positions)]  # (H, n)
                a += len(t.positions)
                out[b][i].setdefault("scores", {})[layer] = reduce_heads(mass, head_reduce, head)
                out[b][i].setdefault("heads", {})[layer] = mass.double().mean(dim=1).tolist()
    return out


def context_dependency_score(
    model,
    tokenizer,
    messages: Sequence[dict],
    layer: int | None = None,
    *,
    head_reduce: str = "max",
    head: int | None = None,
    max_tokens: int | None = PAPER_MAX_TOKENS,
    protocol: str = "authors",
) -> list[float | None]:
    """s_M(Y_m) of eq. (2) for every assistant turn of one conversation (``None`` for a skipped turn).

    ``layer`` defaults to `default_layer` (15 of 22 layers, as the paper); ``max_tokens`` is clamped to the
    model's window.
    """
    layer = default_layer(model) if layer is None else layer
    lay = layout(messages, tokenizer, default_max_tokens(model, max_tokens), protocol)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    (res,) = score_layouts(model, [lay], [layer], head_reduce=head_reduce, head=head, pad_id=pad)
    return [r["scores"][layer] if r else None for r in res]


# ----------------------------------------------------------------------------- ctxaware score


@dataclass
class ScoreConfig(ModelConfig):
    """Score every assistant turn of an instruction dataset with eq. (2) (paper Sec. 3.1).

    Parameters:
        data: dataset file (ShareGPT, messages or Alpaca JSON/JSONL/Parquet) or hub id.
        output: scores JSONL, one row per assistant turn; work files go to ``OUTPUT.work/``, the summary to
            ``OUTPUT`` with suffix ``.summary.json``.
        layer / layers: the scoring layer (default `default_layer`: ``round(15/22 * num_hidden_layers)``,
            the paper's 15 of 22) and extra layers scored in the same pass (rows carry ``scores: {layer: s}``).
        head_reduce / head: ``max`` over heads (eq. 2) or ``mean``; or one fixed head.
        max_tokens: truncation limit (default the paper's 2,047), clamped to the model's window
            (``max_position_embeddings``); a turn cut is scored on what remains (``truncated``), a turn cut
            entirely is skipped with a reason.
        batch_tokens / max_batch / window: batching by length: conversations are sorted by length within
            windows of ``window`` rows and packed into batches of at most ``batch_tokens`` padded tokens.
    """

    data: str = field(
        default="", metadata={"path": "input", "help": "dataset file or hub id", "positional": True}
    )
    output: str = field(
        default="runs/scores.jsonl",
        metadata={
            "help": "output JSONL (one row per assistant turn)",
            "path": "output_file",
            "resumable": True,
        },
    )
    overwrite: bool = overwrite_option()
    layer: int | None = field(
        default=None,
        metadata={
            "min": 0,
            "help": "scoring layer (default: round(15/22 * num_layers), the paper's 15 of 22)",
        },
    )
    layers: list[int] | None = field(
        default=None, metadata={"min": 0, "help": "extra layers scored in the same pass"}
    )
    head_reduce: str = field(default="max", metadata={"help": "reduce heads by max (eq. 2) or mean"})
    head: int | None = field(
        default=None, metadata={"min": 0, "help": "use this one head instead of reducing heads"}
    )
    heads: bool = field(default=False, metadata={"help": "write the per-head mean user mass of each turn"})
    max_tokens: int = field(
        default=PAPER_MAX_TOKENS,
        metadata={
            "min": 1,
            "help": "truncate conversations to this many tokens (clamped to the model's window)",
        },
    )
    protocol: Literal["authors", "ctxaware"] = field(
        default="authors",
        metadata={
            "help": "authors (their scorer: empty system turn, tokenizer(text) BOS, end-of-turn tokens in "
            "Y, newline/BOS/EOS out of U) or ctxaware (content tokens only; docs/scoring.md)"
        },
    )
    format: str = field(default="auto", metadata={"help": "auto, sharegpt, messages or alpaca"})
    split: str = field(default="train", metadata={"help": "split, for hub datasets"})
    limit: int | None = field(default=None, metadata={"min": 1, "help": "read at most this many input rows"})
    batch_tokens: int = field(default=8192, metadata={"min": 1, "help": "padded tokens per batch"})
    max_batch: int = field(default=32, metadata={"min": 1, "help": "conversations per batch at most"})
    window: int = field(default=256, metadata={"min": 1, "help": "conversations sorted by length together"})
    chunk: int = field(
        default=256, metadata={"min": 1, "help": "query rows per softmax chunk (chunked method only)"}
    )
    method: str = field(
        default="onehot",
        metadata={"help": "capture path: onehot (the model's kernel, V = user indicator) or chunked"},
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    merge_timeout: float = field(
        default=86400.0, metadata={"gt": 0, "help": "seconds rank 0 waits for other ranks"}
    )


KEY = ("source_row", "conversation_id", "turn")


def _layout_or_reason(conv, tokenizer, max_tokens: int, protocol: str = "authors") -> Layout | str:
    try:
        return layout(conv.messages, tokenizer, max_tokens, protocol)
    except CtxawareError as e:
        return f"cannot render: {str(e).split(';')[0]}"


def _rows(
    conv, lay: Layout | str, res: list[dict] | None, cfg: ScoreConfig, layers: list[int], main: int
) -> list[dict]:
    """One output row per assistant turn of ``conv``."""
    n_turns = sum(m["role"] == "assistant" for m in conv.messages)
    rows = []
    for m in range(n_turns):
        t = lay.turns[m] if isinstance(lay, Layout) else None
        r = res[m] if res is not None else {}
        skipped = t.skipped if t is not None else lay
        row = {"conversation_id": conv.id, "source_row": conv.source_row, "turn": m,
               "score": r["scores"][main] if r else None,
               "n_response_tokens": len(t.positions) if t else 0, "n_user_tokens": t.n_user if t else 0,
               "truncated": bool(t.truncated) if t else False, "skipped": skipped}  # fmt: skip
        if len(layers) > 1:
            row["scores"] = {str(k): v for k, v in r["scores"].items()} if r else None
        if cfg.heads:
            row["heads"] = r["heads"][main] if r else None
        rows.append(row)
    return rows


def _keys(conv) -> list[dict]:
    """The key of every row a conversation produces (one per assistant turn)."""
    n_turns = sum(m["role"] == "assistant" for m in conv.messages)
    return [{"source_row": conv.source_row, "conversation_id": conv.id, "turn": m} for m in range(n_turns)]


def _done_keys(work: Path, writer: ResultsWriter) -> set[tuple]:
    """Keys already written by any rank of any earlier run (part files of other world sizes too)."""
    keys = set()
    for part in sorted(work.glob("part-*.jsonl")):
        keys.update(writer.key(r) for r in read_jsonl(part))
    return keys


def score_shard(
    cfg: ScoreConfig, model, tok, convs: list, writer: ResultsWriter, rank: int, world: int
) -> dict:
    """Score this rank's batches (global batch index % world == rank); returns throughput numbers."""
    layers = _layers(cfg, model)
    main = cfg.layer if cfg.layer is not None else default_layer(model)
    max_tokens = default_max_tokens(model, cfg.max_tokens)
    done = _done_keys(writer.dir, writer)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    bar = tqdm(total=len(convs), desc=f"score[{rank}/{world}]", disable=not cfg.progress, position=rank)
    n_batch, tokens, planned, t0 = 0, 0, 0, time.perf_counter()
    for w0 in range(0, len(convs), cfg.window):
        window = convs[w0 : w0 + cfg.window]
        lays = [_layout_or_reason(c, tok, max_tokens, cfg.protocol) for c in window]
        lengths = [len(x) if isinstance(x, Layout) else 0 for x in lays]
        for batch in plan_batches(lengths, cfg.batch_tokens, cfg.max_batch):
            n_batch += 1
            planned += sum(lengths[i] for i in batch)
            bar.update(len(batch))  # progress through the global plan; other ranks' batches pass by
            if (n_batch - 1) % world != rank:
                continue
            if all(writer.key(k) in done for i in batch for k in _keys(window[i])):
                continue
            ok = [i for i in batch if isinstance(lays[i], Layout)]
            res = score_layouts(model, [lays[i] for i in ok], layers, head_reduce=cfg.head_reduce,
                                head=cfg.head, pad_id=pad, chunk=cfg.chunk, method=cfg.method)  # fmt: skip
            by_conv = dict(zip(ok, res))
            tokens += sum(lengths[i] for i in ok)
            for i in sorted(batch):
                for row in _rows(window[i], lays[i], by_conv.get(i), cfg, layers, main):
                    writer.write(row)
    bar.close()
    dt = time.perf_counter() - t0
    return {
        "rank": rank,
        "seconds": round(dt, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / max(dt, 1e-9), 1),
        "planned_tokens": planned,  # tokens of every rank's batches (the whole dataset after truncation)
        "max_tokens": max_tokens,
    }


def _layers(cfg: ScoreConfig, model) -> list[int]:
    main = cfg.layer if cfg.layer is not None else default_layer(model)
    layers = sorted({main, *(cfg.layers or [])})
    check_layers(model, layers)
    return layers


def summarize(rows: list[dict], loader: dict, extra: dict) -> dict:
    """Counts for ``OUTPUT.summary.json``: scored, truncated and skipped turns (by reason), loader skips."""
    turn_skips = SkipCounter()
    for r in rows:
        if r["skipped"]:
            turn_skips.skip(r["skipped"], f"{r['conversation_id']}#{r['turn']}")
    scored = [r["score"] for r in rows if r["score"] is not None]
    return {
        "n_conversations": loader["n_conversations"],
        "n_turns": len(rows),
        "n_scored": len(scored),
        "n_truncated": sum(r["truncated"] for r in rows),
        "mean_score": sum(scored) / len(scored) if scored else None,
        "skipped_turns": turn_skips.as_dict(),
        "skipped_rows": loader["skipped"],
        "edits": loader["edits"],
        **extra,
    }


def check_config(cfg: ScoreConfig) -> None:
    """One-line errors for bad options, before any data or model is loaded."""
    if cfg.head_reduce not in HEAD_REDUCE:
        raise CtxawareError(f"--head-reduce {cfg.head_reduce!r} is not one of {', '.join(HEAD_REDUCE)}")
    if cfg.method not in ("onehot", "chunked"):
        raise CtxawareError(f"--method {cfg.method!r} is not one of onehot, chunked")
    if cfg.limit is not None and cfg.limit < 1:
        raise CtxawareError(f"--limit {cfg.limit} must be a positive number of input rows (or leave it out)")
    for name in ("max_tokens", "batch_tokens", "max_batch", "window", "chunk"):
        if getattr(cfg, name) < 1:
            raise CtxawareError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be at least 1")
    if cfg.merge_timeout <= 0:
        raise CtxawareError(f"--merge-timeout {cfg.merge_timeout} must be positive (seconds)")


def run(cfg: ScoreConfig) -> dict | None:
    """Score ``cfg.data`` into ``cfg.output``; returns the summary on rank 0 (``None`` on other ranks)."""
    t_start = time.perf_counter()
    check_config(cfg)
    rank, world = dist_info()
    out = Path(cfg.output)
    work = out.with_name(out.name + ".work")
    if out.is_file() and not (work / "meta.json").is_file() and not cfg.overwrite:  # not a run of ours
        raise CtxawareError(f"--output {out} already exists and no scoring run of it is in {work}; pass "
                            "--overwrite to replace it, or give a new file name")  # fmt: skip
    convs, loader = load_conversations(cfg.data, cfg.format, split=cfg.split, limit=cfg.limit)  # type: ignore[arg-type]
    if not convs:
        raise CtxawareError(
            f"{cfg.data} holds no conversations ({loader['skipped']['total']} rows skipped); check the file"
        )
    model, tok = cfg.load()
    if not getattr(tok, "chat_template", None):  # every turn would be skipped: a configuration error
        raise CtxawareError(
            f"{cfg.model} has no chat template, and eq. (2) reads roles from the seed model's template; score "
            "with an instruct (seed) model, or give the tokenizer a template"
        )
    layers = _layers(cfg, model)
    grouped = process_group(world)
    run_cfg = {
        k: v for k, v in to_dict(cfg).items() if k not in ("output", "progress", "merge_timeout", "device")
    }
    run_cfg["layers"] = layers
    run_cfg["max_tokens"] = default_max_tokens(model, cfg.max_tokens)
    try:
        part = f"part-{rank:03d}-of-{world:03d}.jsonl"
        with ResultsWriter(
            work, run_cfg, KEY, filename=part, about=model_about(model, tok), kind="score"
        ) as writer:
            stats = score_shard(cfg, model, tok, convs, writer, rank, world)
            throughput = all_ranks_throughput(stats, grouped)
            if grouped:
                import torch.distributed as dist

                dist.barrier()  # every part file is complete
            if rank != 0:
                return None
            expected = [writer.key(k) for c in convs for k in _keys(c)]
            rows = merge_parts(work, writer, expected, cfg.merge_timeout)
    finally:
        if grouped:
            import torch.distributed as dist

            dist.destroy_process_group()
    write_jsonl_atomic(out, rows)
    throughput["wall_seconds_with_load"] = round(time.perf_counter() - t_start, 2)
    summary = summarize(rows, loader, {"layers": layers, "max_tokens": run_cfg["max_tokens"], "world_size": world,
                                       "throughput": throughput, "throughput_rank0": stats})  # fmt: skip
    write_json_atomic(out.with_suffix(".summary.json"), summary)
    return summary
