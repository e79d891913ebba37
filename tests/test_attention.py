"""Role allocation (Fig. 3-4) and retrieval heads (eq. 3) against the eager output_attentions oracle."""

from __future__ import annotations

import json

import pytest
import torch

from ctxaware.attention import nih_prompts, pad_batch, renormalise, role_allocation
from ctxaware.chat import ROLES, render
from ctxaware.errors import CtxawareError
from ctxaware.retrieval_heads import all_heads, find_heads, load_heads, save_heads, top_heads, validate_heads
from tests.conftest import SHARED_DATA
from tests.test_intercept import eager_role_oracle

HAYSTACK = SHARED_DATA / "haystack" / "paul_graham_essays"


def _prompts(tok):
    if not HAYSTACK.is_dir():
        pytest.skip("shared haystack not found")
    return nih_prompts(tok, [120, 180], [0, 60], chat=True, haystack=HAYSTACK) + nih_prompts(
        tok, [150], [40], chat=False, haystack=HAYSTACK
    )


def test_allocation_equals_eager_oracle_batched(smollm2):
    model, tok = smollm2
    prompts = _prompts(tok)
    positions = [[len(p) - 1] for p in prompts]
    positions[0] = [3, len(prompts[0]) // 2, len(prompts[0]) - 1]  # several rows, averaged
    got = role_allocation(
        model, prompts, positions=positions, batch_size=3, pad_id=tok.pad_token_id
    )  # (N, L, H, 5)
    for i, (p, qs) in enumerate(zip(prompts, positions)):
        want = eager_role_oracle(model, torch.tensor(p.input_ids), p.role_ids(), qs).mean(2)  # (L, H, 5)
        assert (got[i].double() - want).abs().max() < 1e-5, i
    assert torch.allclose(got.sum(-1), torch.ones(()), atol=1e-5)  # every row's mass sums to 1


def test_renormalise_and_pad_batch(smollm2_tok):
    tok = smollm2_tok
    r = render([{"role": "user", "content": "hi there"}], tok, "chat")
    ids, mask, rows, groups = pad_batch([r, r], [[len(r) - 1], [0, 1]], pad_id=0)
    assert rows.tolist() == [[len(r) - 1, -1], [0, 1]] and groups.sum().item() == 2 * len(r)
    x = torch.tensor([0.1, 0.0, 0.5, 0.2, 0.2])  # bos, system, user, assistant, template
    assert torch.allclose(renormalise(x), torch.tensor([0.125, 0.625, 0.25]))
    with pytest.raises(CtxawareError, match="query positions"):
        role_allocation(None, [r], positions=[[len(r)]])


def test_retrieval_heads_eq3_and_json(smollm2, tmp_path):
    model, tok = smollm2
    prompts = _prompts(tok)[:1]
    heads = find_heads(model, prompts, k=2)
    assert set(heads) == set(range(30)) and all(len(h) == 2 for h in heads.values())
    share = role_allocation(model, prompts, layers=[7])[0, 0, :, ROLES.index("user")]  # (H,)
    assert share.argmax().item() in heads[7]
    p = save_heads(heads, tmp_path / "h.json")
    assert json.loads(p.read_text())["7"] == heads[7]
    assert load_heads(p, model) == heads
    assert top_heads(torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.1]])) == {0: [1], 1: [0]}
    assert validate_heads("all", model) == all_heads(model) and len(all_heads(model)[0]) == 9


def test_heads_validation(smollm2, tmp_path):
    model, _ = smollm2
    for bad, msg in [
        ({30: [0]}, "layer 30"),
        ({0: [9]}, "heads"),
        ({0: []}, "heads"),
        ({"x": [0]}, "integer"),
        ({}, "non-empty"),
    ]:
        with pytest.raises(CtxawareError, match=msg):
            validate_heads(bad, model)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CtxawareError, match="not valid JSON"):
        load_heads(tmp_path / "bad.json")
    with pytest.raises(CtxawareError, match="does not exist"):
        load_heads(tmp_path / "missing.json")
    (tmp_path / "big.json").write_text('{"3": [12]}')
    with pytest.raises(CtxawareError, match="heads"):
        load_heads(tmp_path / "big.json", model)


def test_heads_cli(tmp_path):
    from ctxaware.cli import main

    if not HAYSTACK.is_dir():
        pytest.skip("shared haystack not found")
    out = tmp_path / "heads.json"
    rc = main(
        ["heads", "--device", "cpu", "--lengths", "150", "--haystack", str(HAYSTACK), "--output", str(out)]
    )
    assert rc == 0 and len(json.loads(out.read_text())) == 30
    assert (
        main(["heads", "--k", "0", "--device", "cpu", "--haystack", str(HAYSTACK), "--lengths", "150"]) == 2
    )


@pytest.mark.slow
def test_attention_cli(tmp_path):
    from ctxaware.cli import main

    argv = ["attention", "--device", "cpu", "--lengths", "150,300", "--depths", "0,50"]
    assert main([*argv, "--haystack", str(HAYSTACK), "--output", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "attention.json").read_text())["models"]["default"]
    assert res["layer"] == 15 and abs(sum(res["renormalised"]["chat"].values()) - 1) < 1e-5
    assert (tmp_path / "fig3_change.png").is_file() and (tmp_path / "user_change_heatmap.png").is_file()
