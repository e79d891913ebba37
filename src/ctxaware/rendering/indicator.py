"""The context-dependency indicator token ``[IND]`` (paper Section 3.2).

``add_indicator_token`` registers it as an additional special token, resizes the embeddings and sets the
new row(s) to the mean of the existing rows (input embeddings, and the output head when it is untied).
``append_indicator`` marks a user instruction. Both are idempotent.
"""

from __future__ import annotations

import torch

DEFAULT_INDICATOR = "[IND]"


def add_indicator_token(model, tokenizer, token: str = DEFAULT_INDICATOR) -> int:
    """Add ``token`` to ``tokenizer`` and ``model``; return its id. Adding it twice changes nothing."""
    if token in tokenizer.get_vocab() and token in tokenizer.all_special_tokens:
        tid = tokenizer.convert_tokens_to_ids(token)
        if model is not None and model.get_input_embeddings().weight.shape[0] > tid:
            return tid
    else:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [token]}, replace_extra_special_tokens=False
        )
        tid = tokenizer.convert_tokens_to_ids(token)
    if model is None:
        return tid
    old = model.get_input_embeddings().weight.shape[0]
    new = max(len(tokenizer), tid + 1)
    if new > old:
        # mean_resizing=False: we set the rows ourselves, exactly to the mean, for input and output.
        model.resize_token_embeddings(new, mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[old:] = emb[:old].mean(dim=0, keepdim=True)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                out.weight[old:] = out.weight[:old].mean(dim=0, keepdim=True)
                if getattr(out, "bias", None) is not None:
                    out.bias[old:] = out.bias[:old].mean()
    return tid


def append_indicator(text: str, token: str = DEFAULT_INDICATOR) -> str:
    """``"text"`` -> ``"text [IND]"``; a text that already ends with the indicator is returned unchanged."""
    stripped = text.rstrip()
    if stripped.endswith(token):
        return text
    return f"{stripped} {token}"
