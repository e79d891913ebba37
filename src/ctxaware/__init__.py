"""ctxaware: measure and protect the context awareness of language models.

The package reads as the method of Wang et al., "On the Loss of Context-awareness in General
Instruction Fine-tuning":

    models, chat, conversations   -> loading, rendering with role spans, SFT data
    intercept, attention, steering -> attention capture per role (Fig. 3-4), steering (eq. 1)
    score, selection               -> context-dependency score (eq. 2), [IND] marking
    train                          -> conditional instruction fine-tuning
    nih, evaluate                  -> needle-in-a-haystack, QA, knowledge conflict, judge
    results, plotting              -> one resumable JSONL writer, one plotting module
"""

__version__ = "0.1.0"

from ctxaware.core.errors import CtxawareError  # noqa: E402

__all__ = ["CtxawareError", "__version__"]
