"""Role allocation (Fig. 3-4) and retrieval heads (eq. 3) against the eager output_attentions oracle."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ctxaware.attention.allocation import (
    mean_normalizations,
    nih_prompts,
    normalizations,
    pad_batch,
    renormalize,
    role_allocation,
)
from ctxaware.attention.retrieval_heads import (
    all_heads,
    check_heads,
    eq3_user_share,
    find_heads,
    load_heads,
    save_heads,
    top_heads,
)
from ctxaware.core.errors import CtxawareError
from ctxaware.rendering.chat import ROLES, render
from tests.conftest import SHARED_DATA, one_and_two_processes, tiny_llama
from tests.test_intercept import attn_impl, eager_role_oracle

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
    x = torch.tensor([0.1, 0.0, 0.5, 0.2, 0.2])  # sink, system, user, assistant, template
    assert torch.allclose(renormalize(x), torch.tensor([0.125, 0.625, 0.25]))
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
    assert check_heads("all", model) == all_heads(model) and len(all_heads(model)[0]) == 9


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
            check_heads(bad, model)
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
    res = json.loads((tmp_path / "allocation.json").read_text())
    assert res["model"] == "smollm2-135m-instruct" and res["layer"] == 15 and res["n_prompts"] == 4
    assert set(res["conditions"]) == {"chat", "plain"}
    for c in res["conditions"].values():
        assert set(c) == {"head", "raw", "paper", "sink_excluded"}
        assert all(abs(sum(c[k].values()) - 1) < 1e-4 for k in ("raw", "paper", "sink_excluded"))
    assert (tmp_path / "fig3_change.png").is_file() and (tmp_path / "user_change_heatmap.png").is_file()


def test_normalisations_hand_computed():
    raw = {"sink": 0.4, "system": 0.1, "user": 0.3, "assistant": 0.1, "template": 0.1}
    n = normalizations(raw)
    assert set(n) == {"raw", "paper", "sink_excluded"} and n["raw"] == raw
    want_paper = {"sink": 0.5, "user": 0.375, "assistant": 0.125}  # 0.4, 0.3, 0.1 over 0.8
    want_se = {"system": 0.2, "user": 0.6, "assistant": 0.2}  # 0.1, 0.3, 0.1 over 0.5
    assert n["paper"] == pytest.approx(want_paper) and n["sink_excluded"] == pytest.approx(want_se)
    t = normalizations(torch.tensor([0.4, 0.1, 0.3, 0.1, 0.1]))  # the same in ROLES order
    assert t["paper"] == pytest.approx(want_paper) and t["sink_excluded"] == pytest.approx(want_se)
    only_sink = normalizations({"sink": 0.9, "template": 0.1})
    assert only_sink["paper"]["sink"] == 1.0 and only_sink["sink_excluded"] == {
        "system": 0,
        "user": 0,
        "assistant": 0,
    }
    m = mean_normalizations([n, normalizations({"user": 1.0})])
    assert m["sink_excluded"]["user"] == pytest.approx((0.6 + 1.0) / 2)
    assert m["paper"]["sink"] == pytest.approx(0.25)
    with pytest.raises(CtxawareError, match="unknown roles"):
        normalizations({"bos": 1.0})


def test_eq3_sink_exclusion_changes_the_head_on_a_constructed_case(smollm2_tok):
    plain = render([{"role": "user", "content": "Paris is nice. Where?"}], smollm2_tok, "plain")
    chat = render([{"role": "user", "content": "Paris is nice. Where?"}], smollm2_tok, "chat")
    # head 0 parks its mass on the sink, head 1 reads the user tokens
    head = {0: [0.90, 0, 0.05, 0.05, 0], 1: [0.10, 0, 0.50, 0.40, 0]}
    shares = torch.tensor([[[head[0], head[1]]]] * 2)  # (N=2, L=1, H=2, 5)
    assert top_heads(eq3_user_share(shares[:1], [plain])) == {0: [1]}  # default: sink excluded
    assert top_heads(eq3_user_share(shares[:1], [plain], include_sink=True)) == {0: [0]}  # 0.95 vs 0.60
    # in chat mode position 0 is <|im_start|>, not user content: the literal rule changes nothing there
    assert top_heads(eq3_user_share(shares[1:], [chat], include_sink=True)) == {0: [1]}


def test_eq3_heads_match_eager_oracle_with_and_without_sink(smollm2):
    model, tok = smollm2
    if not HAYSTACK.is_dir():
        pytest.skip("shared haystack not found")
    [r] = nih_prompts(tok, [120], [50], chat=False, haystack=HAYSTACK)
    user_roles = [i for i, role in enumerate(r.roles) if role == "user"]
    user_content = [i for s in r.spans if s.role == "user" for i in range(s.start, s.end)]
    assert user_content[0] == 0 and 0 not in user_roles  # plain SmolLM2: the sink is a user word
    with attn_impl(model, "eager"), torch.no_grad():  # the oracle: eager output_attentions of the last token
        att = model(input_ids=torch.tensor([r.input_ids]), output_attentions=True).attentions
    last = torch.stack([a[0, :, -1].double() for a in att])  # (L, H, T)
    want_ex = last[..., user_roles].sum(-1).argmax(-1).tolist()
    want_in = last[..., user_content].sum(-1).argmax(-1).tolist()
    shares = role_allocation(model, [r])  # find_heads = top_heads(eq3_user_share(role_allocation(...)))
    got_ex = top_heads(eq3_user_share(shares, [r]))
    got_in = top_heads(eq3_user_share(shares, [r], include_sink=True))
    assert [got_ex[layer][0] for layer in range(30)] == want_ex
    assert [got_in[layer][0] for layer in range(30)] == want_in
    assert want_ex != want_in  # the sink changes the chosen head on some layers


def _tiny_base_model_dir(tmp_path, tok):
    model = tiny_llama(layers=2, heads=4, kv_heads=2)
    d = tmp_path / "tiny-base"
    model.save_pretrained(d, safe_serialization=True)
    original = tok.chat_template
    try:
        tok.chat_template = None
        tok.save_pretrained(d)
    finally:
        tok.chat_template = original
    return d, model


def test_attention_cli_on_a_base_model_writes_the_schema(smollm2_tok, tmp_path, capsys):
    from ctxaware.cli import main

    if not HAYSTACK.is_dir():
        pytest.skip("shared haystack not found")
    d, model = _tiny_base_model_dir(tmp_path, smollm2_tok)
    out = tmp_path / "out"
    argv = [
        "attention",
        "--model",
        str(d),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--lengths",
        "400",
    ]  # 400: budget 200
    assert main([*argv, "--depths", "0,50", "--haystack", str(HAYSTACK), "--output", str(out)]) == 0
    assert "no chat template" in capsys.readouterr().out
    res = json.loads((out / "allocation.json").read_text())
    assert set(res) == {"model", "layer", "n_prompts", "conditions", "prompts", "interval"}
    assert res["model"] == "tiny-base" and res["layer"] == 1 and res["n_prompts"] == 2
    assert res["prompts"] == "analysis" and "bootstrap over prompts" in res["interval"]
    assert list(res["conditions"]) == ["plain"]
    plain = res["conditions"]["plain"]
    assert set(plain) == {"head", "raw", "paper", "sink_excluded", "ci"} and set(plain["raw"]) == set(ROLES)
    layers = json.loads((out / "layers.json").read_text())["layers"]
    assert sorted(layers, key=int) == ["0", "1"]  # every layer of the tiny model
    assert layers["1"]["plain"]["paper"]["user"]["n"] == 2
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {r["depth"] for r in rows} == {0.0, 50.0}
    # every row equals the eager oracle at the chosen head, and allocation.json holds their means
    model.eval()
    prompts = nih_prompts(smollm2_tok, [400], [0, 50], chat=False, haystack=HAYSTACK)
    oracle = []
    for p in prompts:
        m = eager_role_oracle(model, torch.tensor(p.input_ids), p.role_ids(), [len(p) - 1])[1, :, 0]  # (H, 5)
        head = int(m[:, ROLES.index("user")].argmax()) if len(prompts) == 1 else None
        oracle.append((m, head))
    # eq. (3) per prompt (App. B.3), sink excluded: each row is read at its own prompt's head
    heads = [int(m[:, ROLES.index("user")].argmax()) for m, _ in oracle]
    assert plain["head"] == max(set(heads), key=heads.count)
    for row, (m, _), h in zip(sorted(rows, key=lambda r: r["depth"]), oracle, heads):
        assert row["head"] == h
        want = dict(zip(ROLES, m[h].tolist()))
        assert row["raw"] == pytest.approx(want, abs=1e-5)
        assert row["sink_excluded"]["user"] == pytest.approx(
            want["user"] / (want["user"] + want["assistant"]), abs=1e-5
        )
    assert plain["raw"]["sink"] == pytest.approx(sum(r["raw"]["sink"] for r in rows) / 2)
    assert (out / "allocation.png").is_file() and not (out / "fig3_change.png").exists()
    # --head-selection mean: one head for all prompts, the argmax of the mean user share
    out2 = tmp_path / "out_mean"
    argv2 = [*argv, "--depths", "0,50", "--haystack", str(HAYSTACK), "--output", str(out2)]
    assert main([*argv2, "--head-selection", "mean"]) == 0
    mean_user = torch.stack([m[:, ROLES.index("user")] for m, _ in oracle]).mean(0)
    res2 = json.loads((out2 / "allocation.json").read_text())
    assert res2["conditions"]["plain"]["head"] == int(mean_user.argmax())
    assert {json.loads(x)["head"] for x in (out2 / "rows.jsonl").read_text().splitlines()} == {
        int(mean_user.argmax())
    }


def test_attention_layer_is_validated_before_compute(tmp_path, capsys):
    from ctxaware.cli import main

    for bad in ("99", "-1"):
        assert main(["attention", "--device", "cpu", "--layer", bad, "--output", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if "error" in x.lower()]  # (the weight loader's progress aside)
        assert len(lines) == 1 and "--layer" in lines[0] and "Traceback" not in err
        assert not (tmp_path / bad / "rows.jsonl").exists()


def test_identical_cells_count_once(tmp_path, smollm2_tok, capsys):
    """Issue 22 §5 / 26 §3: under the authors' 200-token buffer a budget of 120 leaves no haystack, so the
    two depths give one prompt; it counts once in n (and in every CI), with a note."""
    from ctxaware.cli import main

    if not HAYSTACK.is_dir():
        pytest.skip("shared haystack not found")
    d, _ = _tiny_base_model_dir(tmp_path, smollm2_tok)
    out = tmp_path / "out"
    argv = ["attention", "--model", str(d), "--device", "cpu", "--dtype", "float32", "--lengths", "120"]
    assert main([*argv, "--depths", "0,50", "--haystack", str(HAYSTACK), "--output", str(out)]) == 0
    assert "repeat another cell's prompt" in capsys.readouterr().out
    assert json.loads((out / "allocation.json").read_text())["n_prompts"] == 1


def test_two_processes_give_the_one_process_allocation_byte_for_byte(tmp_path, shared_data):
    """Issue 25 section 2: ``torchrun --nproc_per_node 2 -m ctxaware.cli attention`` (gloo, CPU) shares the
    forward passes (batches) between the ranks; rank 0's rows.jsonl, allocation.json and layers.json equal a
    one-process run's byte for byte on the real SmolLM2, and the ranks' batch files are gone."""
    argv = ["attention", "--device", "cpu", "--dtype", "float32", "--lengths", "300,400,500", "--depths", "0,50,100",
            "--batch-size", "2"]  # fmt: skip
    one, two, res = one_and_two_processes(argv, tmp_path)
    assert res.stdout.count("chat: layer 15") == 1  # rank 0 reports, once
    for rank in (0, 1):  # 9 distinct prompts per condition in batches of 2: 5 batches, 3 and 2 per rank
        assert (
            f"smollm2-135m-instruct-plain: rank {rank} of 2 computes {3 - rank} of the 5 items" in res.stdout
        )
        n = 5 - rank  # prompts of this rank's batches (2+2+1 on rank 0, 2+2 on rank 1): its bar ends full
        assert re.search(rf"\[rank {rank}/2\]: 100%[^\r\n]*\| {n}/{n} \[", res.stderr), res.stderr[-2000:]
    assert len((one / "rows.jsonl").read_text().splitlines()) == 18  # 9 cells x 2 conditions
    for f in ("rows.jsonl", "allocation.json", "layers.json"):
        assert (two / f).read_bytes() == (one / f).read_bytes(), f
    assert not (two / ".ranks").exists()
