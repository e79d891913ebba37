"""Independent ports of the authors' code paths (YihanWang617/context_awareness), written from reading their
repository, for the conformance tests. Nothing here imports ctxaware: each function rebuilds what their
code sends to the model (text, ids, masks, query rows, scores), so that a test can compare it token for
token with ctxaware's defaults.

Sources (facts read from their files; the code below is ours):
- NIH tester: ``LLMTest_NeedleInAHaystack/LLMNeedleHaystackTester.py`` and ``HuggingfaceTester.py``;
- attention analysis: ``analyse_dataset/analyze_attention_distribution.py`` (``get_attr_distrs`` with
  ``avg_attn_over_response=False``, the default) and the dataset it reads, built by
  ``analyse_dataset/data_exp_scripts/make_huggingface_dataset.py``;
- QA: ``lm-evaluation-harness/lm_eval/models/huggingface.py`` (``wrap_chat_template``, ``tok_encode``) and
  the tasks ``squad/task.py``, ``quac/task.py``, ``drop/default.yaml`` (their ``*_no_ind`` twins drop the
  " [IND]" suffix);
- eq. (2): ``analyse_dataset/utils.py`` (``conv_to_text``, ``build_completion_mask``,
  ``get_batch_user_attention``) and ``analyse_dataset/process_dataset.py``;
- SFT formatting: alignment-handbook's ``maybe_insert_system_message`` and ``apply_chat_template``;
- attention steering: ``LLMTest_NeedleInAHaystack/PastaTester.py``, ``UserSteeredWrapper.py`` and
  ``PASTA/pastalib/pasta.py`` with ``PASTA/pastalib/utils/tokenizer_utils.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

ESSAYS = Path(__file__).resolve().parents[3] / "shared" / "data" / "haystack" / "paul_graham_essays"
NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day. "
QUESTION = "What is the best thing to do in San Francisco?"
# template "initial" of their tester and of the analysis dataset
INITIAL = (
    "You are a helpful AI assistant that answers a question using only the provided document: \n{context}\n\n"
    "Question: {question}"
)


# ------------------------------------------------------------------------------------------------ NIH


def essays() -> str:
    """``read_context_files``: every line's last character replaced by a space, files in sorted order."""
    out = ""
    for path in sorted(ESSAYS.glob("*.txt")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                out += line[:-1] + " "
    return out


def nih_context(
    tok, essay_ids: list[int], length: int, depth: int, buffer: int = 200
) -> tuple[str, str, int]:
    """gkamradt's insertion as their tester runs it: ``(context, text before the needle, n tokens)``."""
    context = tok.decode(essay_ids[:length])
    toks = tok.encode(context, add_special_tokens=False)
    needle = tok.encode(NEEDLE, add_special_tokens=False)
    budget = length - buffer
    if len(toks) + len(needle) > budget:
        toks = toks[: budget - len(needle)]
    if depth == 100:
        return tok.decode(toks + needle), tok.decode(toks), len(toks + needle)
    point = int(len(toks) * (depth / 100))
    head = toks[:point]
    while head and tok.decode(head[-1]) not in ["."]:
        point -= 1
        head = toks[:point]
    new = head + needle + toks[point:]
    return tok.decode(new), tok.decode(head), len(new)


def nih_tester_chat(tok, context: str, hint: str, system: bool = True) -> tuple[str, list[int]]:
    """``HuggingfaceTester.generate_prompt`` with a hint, chat template on: text and ``tokenizer(prompt)``."""
    conv = [{"role": "system", "content": ""}] if system else []
    conv += [{"role": "user", "content": INITIAL.format(context=context, question=QUESTION)},
             {"role": "assistant", "content": hint}]  # fmt: skip
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
    for suffix in (tok.bos_token, tok.eos_token, tok.bos_token, "<end_of_turn>"):
        text = text.strip().removesuffix(suffix) if suffix else text.strip()
    text = text.strip()
    return text, tok(text)["input_ids"]


# ------------------------------------------------------------------------------ attention analysis


def analysis_prompts(tok, context: str, gemma: bool = False) -> dict[str, tuple[str, list[int], int]]:
    """``get_attr_distrs`` on one row of their NIH dataset (user: template "initial" with the context,
    assistant: the whole needle): ``{"plain"|"chat": (text, ids, query index)}``.

    Plain: ``' '.join(messages) + eos`` tokenized with special tokens. Chat: an empty system turn unless
    Gemma, ``apply_chat_template`` of the whole conversation, tokenized with special tokens unless the text
    already starts with BOS. The query is the last " is" token of the response (their ``is_token``).
    Tokens after the query do not change its causal attention row; the texts are returned whole."""
    messages = [{"role": "user", "content": INITIAL.format(context=context, question=QUESTION)},
                {"role": "assistant", "content": NEEDLE.strip()}]  # fmt: skip
    raw = " ".join(m["content"] for m in messages) + tok.eos_token
    chat_msgs = ([] if gemma else [{"role": "system", "content": ""}]) + messages
    text = tok.apply_chat_template(chat_msgs, tokenize=False)
    tokens = tok.tokenize(text)
    chat_ids = tok(text, add_special_tokens=tokens[0] != tok.bos_token)["input_ids"]
    is_token = tok.tokenize(" is")[-1]
    out = {}
    for mode, t, ids in (("plain", raw, tok(raw)["input_ids"]), ("chat", text, chat_ids)):
        toks = tok.convert_ids_to_tokens(ids)
        # the answer's "is" is the last " is" of the text: nothing after it in the needle says "is"
        out[mode] = (t, ids, max(i for i, x in enumerate(toks) if x == is_token))
    return out


# ------------------------------------------------------------------------------------------ QA (lm-eval)


def squad_text(context: str, question: str) -> str:
    return context + "\nAnswer the question according to the above passage: " + question


def quac_text(passage_without_cannotanswer: str, question: str, title: str = "", background: str = "") -> str:
    """Their QuAC ``doc_to_text``. The local file has no title or background: the text then starts at the
    passage (ctxaware's documented data difference); the passage keeps its trailing space."""
    head = f"Title: {title}\n{background} " if title or background else ""
    return (
        head
        + passage_without_cannotanswer
        + "\nAnswer the question with pieces from the the above passage: "
        + question
    )


def drop_text(passage: str, question: str) -> str:
    return f"{passage}\nAnswer the question according to the above passage: {question}"


def lm_eval_chat(tok, context: str, hint: str = "") -> tuple[str, list[int]]:
    """``wrap_chat_template`` then ``tok_encode`` (``add_special_tokens=False``: ``add_bos_token`` is False
    except for model_type ``gemma``)."""
    chat = [{"role": "system", "content": ""}, {"role": "user", "content": context},
            {"role": "assistant", "content": hint}]  # fmt: skip
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False).strip()
    text = text.removesuffix(tok.eos_token)
    text = text.removesuffix(tok.bos_token)
    text = text.strip()
    return text, tok.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------ eq. (2)


def conv_to_text(conversation: list[dict], tok) -> str:
    if conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": ""}] + conversation
    return tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)


def build_completion_mask(
    ids: list[int], system_ids: list[int], response_ids: list[int], user_ids: list[int]
):
    """``build_completion_mask`` for one row: ``(completion_mask, system_mask, [turn masks])`` as 0/1 lists.
    The marker id lists replace their hard-coded Llama-2 Zephyr ids."""
    n = len(ids)
    completion, system = [1] * n, [1] * n
    resp_idx, user_idx = [], []

    def starts(marker: list[int]) -> list[int]:
        return [i for i in range(n) if ids[i : i + len(marker)] == marker]

    for i in starts(system_ids):
        system[i : i + len(system_ids)] = [0] * len(system_ids)
    for i in starts(response_ids):
        resp_idx.append(i + len(response_ids))
        system[i : i + len(response_ids)] = [0] * len(response_ids)
    for i in starts(user_ids):
        user_idx.append(i)
        system[i : i + len(user_ids)] = [0] * len(user_ids)
    if not resp_idx or not user_idx:
        completion = [0] * n
    if user_idx and resp_idx and user_idx[0] > resp_idx[0]:
        user_idx = [0] + user_idx
    for k, (start, end) in enumerate(zip(user_idx, resp_idx)):
        if k != 0:
            completion[start:end] = [0] * (end - start)
        else:
            completion[:end] = [0] * end
    turns = []
    for start, end in zip(resp_idx[:-1], user_idx[1:]):
        m = [0] * n
        m[start:end] = [1] * (end - start)
        turns.append(m)
    if len(resp_idx) < len(user_idx):
        completion[user_idx[-1] :] = [0] * (n - user_idx[-1])
    if user_idx and resp_idx and resp_idx[-1] > user_idx[-1]:
        m = [0] * n
        m[resp_idx[-1] :] = [1] * (n - resp_idx[-1])
        turns.append(m)
    return completion, system, turns


def scorer_masks(tok, messages: list[dict], markers: dict[str, list[int]], dropped: set[int]):
    """What their scorer computes for one conversation: ``(ids, user mask, [response positions per turn])``."""
    text = conv_to_text([dict(m) for m in messages], tok)
    ids = tok(text)["input_ids"]
    completion, system, turns = build_completion_mask(
        ids, markers["system"], markers["assistant"], markers["user"]
    )
    user = [(not c) and s and (t not in dropped) for c, s, t in zip(completion, system, ids)]
    responses = [[i for i, (m, s) in enumerate(zip(turn, system)) if m and s] for turn in turns]
    return ids, user, responses


def eq2_scores(
    model, ids: list[int], user: list[bool], responses: list[list[int]], layer: int
) -> list[float]:
    """``get_batch_user_attention`` (eager attention, every head, one conversation): per turn, the mean over
    its response tokens of the max over heads of the attention mass on user tokens."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    att = out.attentions[layer][0].double()  # (H, T, T)
    mass = (att * torch.tensor(user, dtype=torch.float64)).sum(-1).max(0).values  # (T,)
    return [float(mass[r].sum() / len(r)) for r in responses]


# ---------------------------------------------------------------------------------- SFT formatting


def handbook_sft_ids(tok, messages: list[dict]) -> list[int]:
    """alignment-handbook: ``maybe_insert_system_message`` ("system" in the template), the chat template
    without generation prompt, then SFTTrainer's ``tokenizer(text)`` with special tokens."""
    msgs = [dict(m) for m in messages]
    if msgs[0]["role"] != "system" and "system" in (tok.chat_template or ""):
        msgs.insert(0, {"role": "system", "content": ""})
    text = tok.apply_chat_template(msgs, tokenize=False)
    return tok(text)["input_ids"]


# ------------------------------------------------------------------------------------------------ steering
# PASTA as the authors' NIH steering runs it: ``LLMTest_NeedleInAHaystack/PastaTester.py`` ->
# ``UserSteeredWrapper.py`` -> ``PASTA/pastalib/pasta.py`` (``edit_multisection_attention``, exclude mode,
# ``apply_steering``) and ``PASTA/pastalib/utils/tokenizer_utils.py`` (``find_token_range``).


def pasta_token_range(string: str, substring: str, offsets) -> tuple[int, int]:
    """``find_token_range``: the first token whose span holds the substring's first character, to the token
    whose span holds the character *after* it, inclusive (so one token past the substring)."""
    substring = substring.strip()
    char_start = string.index(substring)
    char_end = char_start + len(substring)
    start = end = None
    for i, (a, b) in enumerate(offsets):
        if start is None and a <= char_start < b:
            start = i
        if end is None and a <= char_end < b:
            end = i
            break
    assert start is not None and end is not None and start <= end
    return start, end + 1


class pasta_steering:
    """``PASTA.apply_steering``: a forward pre-hook on each configured layer's attention module that edits
    the ``attention_mask`` keyword. ``head_config[layer]`` None (a layer list, as ``PastaTester``'s configs)
    edits the shared mask in place, every head; a list of heads expands and clones it first. Exclude mode:
    ``log(alpha)`` on keys before ``ti`` and from ``tj`` up to ``input_len`` (the prompt's length)."""

    def __init__(self, model, head_config: dict, ranges: list[tuple[int, int]], input_len: int, alpha: float):
        self.model, self.head_config, self.ranges = model, head_config, ranges
        self.input_len, self.alpha, self.hooks = input_len, alpha, []

    def _edit(self, module, args, kwargs, head_idx):
        mask = kwargs["attention_mask"]
        bsz, n, q, k = mask.size()
        scale = torch.tensor([self.alpha]).to(mask.dtype).log()
        if head_idx is None:
            for bi, (ti, tj) in enumerate(self.ranges):
                mask[bi, :, :, :ti] += scale
                mask[bi, :, :, tj : self.input_len] += scale
        else:
            heads = module.config.num_attention_heads
            if n != heads:
                mask = mask.expand(bsz, heads, q, k).clone()
            for bi, (ti, tj) in enumerate(self.ranges):
                mask[bi, head_idx, :, :ti] += scale
                mask[bi, head_idx, :, tj : self.input_len] += scale
        kwargs["attention_mask"] = mask
        return args, kwargs

    def __enter__(self):
        for layer, head_idx in self.head_config.items():
            module = self.model.model.layers[layer].self_attn
            hook = lambda m, a, kw, h=head_idx: self._edit(m, a, kw, h)  # noqa: E731
            self.hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self.model

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
