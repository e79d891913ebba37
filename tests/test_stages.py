"""`ctxaware stages`: regression against known coefficients, characteristics, attention shares against an
eager reference, and the command end to end on tiny checkpoints (and on the built-in models, slow)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ctxaware.commands.stages import main
from ctxaware.core.errors import CtxawareError
from ctxaware.evaluation.characteristics import Embedder, answer_position, lexical_overlap, log_perplexity
from ctxaware.evaluation.regression import sensitivity, spearman, standardized_coefficients
from ctxaware.evaluation.stages import (
    G_ASSISTANT,
    G_CONTEXT,
    G_EXCLUDED,
    G_SYSTEM,
    G_USER,
    StagesConfig,
    attention_shares,
    context_groups,
    parse_checkpoints,
    prepare_tokenizer,
    run,
    summary_markdown,
)
from ctxaware.rendering.chat import render, user_prompt
from tests.conftest import one_and_two_processes, tiny_llama

# --- regression ------------------------------------------------------------------------------------------


def test_standardized_coefficients_recover_known_answer():
    rng = np.random.default_rng(1)
    n = 4000
    x1, x2, x3 = rng.normal(0, 2, n), rng.normal(0, 1, n), rng.normal(0, 1, n)
    y = 3 * x1 - 2 * x2 + 0 * x3 + rng.normal(0, 1, n)
    sd_y = math.sqrt(9 * 4 + 4 * 1 + 1)  # independent regressors: Var(y) = sum b^2 Var(x) + noise
    expected = [3 * 2 / sd_y, -2 * 1 / sd_y, 0.0]
    got = standardized_coefficients(np.c_[x1, x2, x3], y)
    np.testing.assert_allclose(got, expected, atol=0.02)
    s = sensitivity(np.c_[x1, x2, x3], y, ["a", "b", "c"], n_boot=200, seed=0)
    for name, e in zip("abc", expected):
        assert s[name]["ci_low"] <= e <= s[name]["ci_high"]
    assert s["c"]["ci_low"] < 0 < s["c"]["ci_high"] and s["_n"] == {"n": n, "dropped": 0}


def test_sensitivity_drops_missing_rows_and_constant_columns():
    rng = np.random.default_rng(0)
    X = np.c_[rng.normal(size=50), np.ones(50)]
    y = X[:, 0] * 2 + rng.normal(size=50) * 0.1
    X[3, 0] = np.nan
    s = sensitivity(X, y, ["x", "const"], n_boot=50)
    assert s["_n"] == {"n": 49, "dropped": 1} and s["const"]["coef"] is None and s["x"]["coef"] > 0.9


def test_spearman_matches_hand_computed():
    # ranks x: 1,2,3,4,5 ; y: 2,1,4,3,5 -> d^2 sum = 4 -> rho = 1 - 6*4/(5*24) = 0.8
    assert spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4], [5, 5, 5, 5]) is None
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties take average ranks


# --- characteristics ------------------------------------------------------------------------------------


def test_lexical_overlap_and_answer_position():
    # question words {where, is, eiffel, tower} ("the" is dropped), 3 of them in the context
    assert lexical_overlap("Where is the Eiffel tower?", "The Eiffel tower is in Paris.") == pytest.approx(
        0.75
    )
    assert lexical_overlap("Who wrote Hamlet?", "Paris is big.") == 0.0
    ctx = "abcdefghij"  # 10 characters: "f" at offset 5 -> 5 / 9
    assert answer_position(ctx, ["F"]) == pytest.approx(5 / 9)
    assert answer_position(ctx, ["zz"]) is None


def test_embedder_similarity_orders_related_text_first():
    emb = Embedder()
    s = emb.similarity(
        ["The cat sat on the mat.", "The cat sat on the mat."],
        ["Where did the cat sit?", "Quarterly interest rates rose sharply."],
    )
    assert s[0] > s[1] + 0.2 and all(-1.0 <= v <= 1.0001 for v in s)


def test_embedder_missing_dir_is_one_line_error(tmp_path):
    with pytest.raises(CtxawareError, match="config.json"):
        Embedder(str(tmp_path))


def test_log_perplexity_matches_manual(smollm2):
    model, tok = smollm2
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    assert log_perplexity(model, tok, [text])[0] == pytest.approx(nll.item(), rel=1e-4)


# --- attention shares ------------------------------------------------------------------------------------


def test_context_groups_cover_the_context(smollm2_tok):
    tok = smollm2_tok
    ctx = "Paris is the capital of France."
    r = render(user_prompt(f"Background: {ctx} Question: What is the capital?"), tok, "chat")
    g = context_groups(r, tok, ctx, "chat")
    ids = [t for t, row in zip(r.input_ids, g) if row[G_CONTEXT] == 1]
    assert tok.decode(ids).strip() == ctx
    assert g[0, G_EXCLUDED] == 1 and (g.sum(-1) == 1).all() and g[:, G_USER].sum() > 0


def test_attention_shares_match_eager_reference(smollm2_tok):
    tok = smollm2_tok
    model = tiny_llama(attn="eager")
    ctx = "Lyon is the capital of France."
    prompts = [
        render(user_prompt(f"Background: {ctx} Question: What is the capital?"), tok, "chat"),
        render(user_prompt(f"Background: {ctx} Q: capital?"), tok, "chat"),
    ]
    groups = [context_groups(p, tok, ctx, "chat") for p in prompts]
    got = attention_shares(model, prompts, groups, batch_size=2, pad_id=0)
    for p, g, (ctx_share, heads) in zip(prompts, groups, got):
        with torch.no_grad():
            att = model(input_ids=torch.tensor([p.input_ids]), output_attentions=True).attentions
        a = torch.stack([x[0, :, -1] for x in att])  # (L, H, T) last query row
        mass = a @ g  # (L, H, 5)
        ref = mass[..., G_CONTEXT] / mass[..., :G_EXCLUDED].sum(-1)
        np.testing.assert_allclose(ctx_share, ref.mean().item(), rtol=1e-4)
        np.testing.assert_allclose(np.array(heads), ref.numpy(), atol=2e-4)


def test_head_measure_informative_on_single_turn_zephyr_prompt(smollm2_tok):
    """Zephyr, no system turn: every counted key is a user token, so a per-head *user* share would be
    1.0 everywhere (the bug of row schema 1). The per-head context share must stay below 1 and vary."""
    tok, mode = prepare_tokenizer(smollm2_tok, "zephyr")
    model = tiny_llama()
    ctx = "Lyon is the capital of France."
    r = render(user_prompt(f"Background: {ctx} Question: What is the capital?"), tok, mode)
    g = context_groups(r, tok, ctx, mode)
    assert g[:, G_SYSTEM].sum() == 0 and g[:, G_ASSISTANT].sum() == 0
    ((_, heads),) = attention_shares(model, [r], [g], 1, 0)
    h = np.array(heads)
    assert h.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
    assert (h < 0.999).all() and (h > 0).all() and h.std() > 1e-3


# --- the command -----------------------------------------------------------------------------------------


def test_parse_checkpoints():
    assert parse_checkpoints(["base=a,sft=org/m@v1"]) == [("base", "a", None), ("sft", "org/m", "v1")]
    with pytest.raises(CtxawareError):
        parse_checkpoints(["base=a,base=b"])
    with pytest.raises(CtxawareError):
        parse_checkpoints(["nospec"])


def _save_tiny(path, tok, layers=2, seed=0):
    torch.manual_seed(seed)
    m = tiny_llama(layers=layers)
    if seed:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_stages_end_to_end_tiny_and_resume(tmp_path, smollm2_tok):
    a = _save_tiny(tmp_path / "a", smollm2_tok)
    b = _save_tiny(tmp_path / "b", smollm2_tok, seed=1)
    c = _save_tiny(tmp_path / "c", smollm2_tok, layers=3)
    out = tmp_path / "out"
    argv = [
        f"base={a},sft={b},dpo={c}",
        "--tasks",
        "squad,cf_world_facts",
        "--n",
        "2",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--n-boot",
        "20",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 and {r["checkpoint"] for r in rows} == {"base", "sft", "dpo"}
    for r in rows:
        assert math.isfinite(r["logprob_shift"]) and 0 <= r["context_attention"] <= 1
        assert (r["p_o"] is None) == (r["task"] == "squad") and r["context_length"] > 0
    s = json.loads((out / "summary.json").read_text())
    assert s["head_change"]["sft - base"]["comparable"] is True
    assert s["head_change"]["dpo - sft"]["comparable"] is False  # 3 layers vs 2: said, not plotted
    assert set(s["sensitivity"]["base"]["logprob_shift"]) >= {"similarity", "log_perplexity", "_n"}
    assert (out / "sensitivity.png").is_file() and (out / "head_change.png").is_file()
    assert "| sft - base |" in (out / "summary.md").read_text()
    before = (out / "rows.jsonl").read_text()
    assert main(argv) == 0  # resume: nothing to do, nothing rewritten
    assert (out / "rows.jsonl").read_text() == before


def test_summary_markdown_reports_only_cis_excluding_zero():
    u = lambda m, lo, hi, n=10: {"mean": m, "ci_low": lo, "ci_high": hi, "n": n}  # noqa: E731
    c = lambda coef, lo, hi: {"coef": coef, "ci_low": lo, "ci_high": hi, "spearman": 0.1}  # noqa: E731
    none = {"coef": None, "ci_low": None, "ci_high": None, "spearman": None}
    usage = {"answer_changed": u(1.0, 1.0, 1.0), "p_s": u(0.5, 0.4, 0.6), "p_o": u(float("nan"), 0, 0, 0)}
    s = {
        "usage": {"base": usage, "sft": usage},
        "sensitivity": {
            "base": {
                "p_s": {"similarity": c(0.4, 0.1, 0.7), "context_length": c(0.2, -0.1, 0.5), "_n": {}},
                "answer_changed": {"similarity": none},
            },
            "sft": {
                "p_s": {
                    "similarity": c(-0.3, -0.5, -0.01),
                    "context_length": c(0.0, -0.2, 0.2),
                    "fluency": c(0.9, None, None),
                }
            },  # a coefficient without a CI (too few rows)
        },  # fmt: skip
        "head_change": {
            "sft - base": {
                "comparable": True,
                "mean_change": 0.01,
                "gain": [{"layer": 1, "head": 0, "change": 0.2}],
                "loss": [{"layer": 0, "head": 1, "change": -0.1}],
            },
        },  # fmt: skip
    }
    md = summary_markdown(s)
    assert "| checkpoint | answer_changed | p_s |" in md  # p_o has n = 0 everywhere: no column
    assert "| base | p_s | similarity | +0.40 [+0.10, +0.70] |" in md
    assert "| sft | p_s | similarity | -0.30 [-0.50, -0.01] |" in md
    assert "context_length" not in md.split("Sensitivities")[1].split("Constant")[0].replace("_n", "")
    assert "of 4 (" in md and "Constant in every checkpoint (no regression possible): answer_changed." in md
    assert "| sft - base | +0.0100 | L1H0 +0.200 | L0H1 -0.100 |" in md


@pytest.mark.slow
def test_stages_builtin_models_end_to_end(tmp_path):
    cfg = StagesConfig(
        checkpoints=["base=gemma3-270m,sft=default"],
        tasks=["squad", "cf_world_facts"],
        n=3,
        max_new_tokens=12,
        device="cpu",
        n_boot=50,
        output=str(tmp_path / "out"),
    )
    s = run(cfg)
    assert set(s["usage"]) == {"base", "sft"} and s["head_change"]["sft - base"]["comparable"] is False
    assert all(s["usage"][k]["logprob_shift"]["n"] == 6 for k in ("base", "sft"))


def test_no_regression_on_fewer_rows_than_predictors():
    """Issue 27 §3: five predictors on five rows is an exact fit, not an estimate: no coefficients, the reason
    beside them (the plot shows no bars and the summary lists none); one more row than that still has none."""
    import numpy as np

    from ctxaware.evaluation.regression import sensitivity

    rng = np.random.default_rng(0)
    names = list("abcde")
    for n in (5, 6):
        out = sensitivity(rng.normal(size=(n, 5)), rng.normal(size=n), names)
        assert all(out[c]["coef"] is None and out[c]["ci_low"] is None for c in names)
        assert "too few for a regression" in out["_n"]["no_fit"]
    fitted = sensitivity(rng.normal(size=(40, 5)), rng.normal(size=40), names)
    assert all(fitted[c]["coef"] is not None for c in names) and "no_fit" not in fitted["_n"]


def test_two_processes_give_the_one_process_rows_byte_for_byte(tmp_path, smollm2_tok):
    """Issue 25 section 2: ``torchrun --nproc_per_node 2 -m ctxaware.cli stages`` (gloo, CPU) shares the
    characteristics chunks and the checkpoints' chunks between the ranks; rank 0's rows.jsonl and
    characteristics/rows.jsonl equal a one-process run's byte for byte, and rank 0 alone reports."""
    a = _save_tiny(tmp_path / "a", smollm2_tok)
    b = _save_tiny(tmp_path / "b", smollm2_tok, seed=1)
    # --n-examples: torchrun's parser would take --n for its own --nnodes
    argv = ["stages", f"base={a},sft={b}", "--tasks", "squad,cf_world_facts", "--n-examples", "4", "--max-new-tokens", "4",
            "--device", "cpu", "--n-boot", "20", "--batch-size", "1"]  # fmt: skip
    one, two, res = one_and_two_processes(argv, tmp_path)
    assert len((one / "rows.jsonl").read_text().splitlines()) == 2 * 8  # 2 checkpoints x 8 items, 4 chunks
    for f in ("rows.jsonl", "characteristics/rows.jsonl"):
        assert (two / f).read_bytes() == (one / f).read_bytes(), f
    assert res.stdout.count("wrote ") == 1 and (two / "summary.json").is_file()
    assert not (two / ".ranks").exists() and not (two / "characteristics" / ".ranks").exists()
