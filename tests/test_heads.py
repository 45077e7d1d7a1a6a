"""Active vs dormant heads: ablations against direct recomputations, the loss, the table, the CLI."""
from __future__ import annotations

import argparse
import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import tokenprobe
from tokenprobe.analyses.heads import (
    COLUMNS,
    HeadAblationConfig,
    ablation,
    attention_module,
    head_effects,
    load_domains,
    mean_next_token_loss,
    read_domain,
    zero_ablation,
)
from tokenprobe.analyses.heads_cli import add_parser, parse_layers
from tokenprobe.cli.args import UsageError
from tokenprobe.tokens import pad_batch

from conftest import PROMPTS


def _batch(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS]
    return pad_batch(rows, loaded.tokenizer.pad_token_id, torch.device("cpu"))


def _logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _head_dim(model) -> int:
    return model.config.hidden_size // model.config.num_attention_heads


@pytest.mark.parametrize("heads", [[(0, 0)], [(2, 3)], [(0, 1), (0, 3), (2, 0)]])
def test_zero_ablation_equals_zeroed_output_weight_columns(tiny_llama, heads):
    ids, mask = _batch(tiny_llama)
    model = tiny_llama.model
    reference = copy.deepcopy(model)
    dh = _head_dim(model)
    with torch.no_grad():
        for layer, head in heads:
            attention_module(reference, layer).o_proj.weight[:, head * dh:(head + 1) * dh] = 0
    expect = _logits(reference, ids, mask)
    with zero_ablation(model, heads):
        got = _logits(model, ids, mask)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert (got - _logits(model, ids, mask)).abs().max() > 1e-3  # the ablation did something


def test_sink_ablation_outputs_the_value_at_position_zero(tiny_llama):
    """Reference: the head's output slice replaced by its value vector of the first token."""
    model, (layer, head) = tiny_llama.model, (1, 2)
    ids, mask = _batch(tiny_llama)
    dh, heads = _head_dim(model), model.config.num_attention_heads
    kv = head // (heads // model.config.num_key_value_heads)
    attn, captured = attention_module(model, layer), {}

    def keep_values(_m, _args, out):
        captured["v0"] = out[:, 0, kv * dh:(kv + 1) * dh].clone()  # (B, Dh), no RoPE on values

    def use_value_zero(_m, args):
        x = args[0].clone()
        x[..., head * dh:(head + 1) * dh] = captured["v0"][:, None]
        return (x,)

    handles = [attn.v_proj.register_forward_hook(keep_values),
               attn.o_proj.register_forward_pre_hook(use_value_zero)]
    try:
        expect = _logits(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    with ablation(model, [(layer, head)], "sink"):
        got = _logits(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expect[real], rtol=1e-5, atol=1e-5)
    assert (got[real] - _logits(model, ids, mask)[real]).abs().max() > 1e-3


def test_sink_ablation_puts_all_the_heads_attention_on_the_first_token(tiny_llama):
    with ablation(tiny_llama.model, [(1, 2)], "sink"):
        run = tokenprobe.run(tiny_llama, PROMPTS, ["sinks"], progress=False)
    heads = run.heads
    chosen = (heads.layer == 1) & (heads["head"] == 2)
    assert heads[chosen].sink_mass.sub(1).abs().max() < 1e-6
    assert heads[~chosen].sink_mass.max() < 0.99


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_mean_loss_equals_explicit_cross_entropy(fixture, request):
    loaded = request.getfixturevalue(fixture)
    total, count, per_prompt = 0.0, 0, []
    with torch.no_grad():
        for text in PROMPTS:  # one unpadded prompt at a time
            ids = torch.tensor(loaded.tokenizer(text)["input_ids"])
            logits = loaded.model(input_ids=ids[None]).logits[0]
            loss = F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum").item()
            total, count = total + loss, count + len(ids) - 1
            per_prompt.append(loss / (len(ids) - 1))
    got = mean_next_token_loss(loaded, PROMPTS, batch_size=2)  # padded batches of 2 and 1
    assert got == pytest.approx(total / count, rel=1e-6)
    assert abs(total / count - sum(per_prompt) / len(per_prompt)) > 1e-3  # pooled, not mean of means


@pytest.mark.parametrize("method", ["zero", "sink"])
def test_hooks_and_attention_restored_after_an_exception(tiny_llama, method):
    model = tiny_llama.model
    ids, mask = _batch(tiny_llama)
    before = _logits(model, ids, mask)
    impl = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with ablation(model, [(0, 1), (2, 2)], method):
            assert not torch.equal(_logits(model, ids, mask), before)
            raise RuntimeError("boom")
    assert all(not attention_module(model, layer).o_proj._forward_pre_hooks for layer in range(3))
    assert model.config._attn_implementation == impl
    assert torch.equal(_logits(model, ids, mask), before)


def test_bad_heads_are_refused_without_leaving_hooks(tiny_llama):
    with pytest.raises(ValueError, match="no head"):
        with zero_ablation(tiny_llama.model, [(0, 0), (3, 0)]):
            pass
    assert not attention_module(tiny_llama.model, 0).o_proj._forward_pre_hooks


@pytest.mark.parametrize("method", ["zero", "sink"])
def test_head_effects_one_row_per_domain_layer_head(tiny_llama, method):
    domains = {"a": PROMPTS[:2], "b": PROMPTS[1:]}
    config = HeadAblationConfig(method=method, threshold=0.01, batch_size=2)
    frame = head_effects(tiny_llama, domains, config, layers=[2, 0], progress=False)
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 2 * 2 * 4
    assert not frame.duplicated(["domain", "layer", "head"]).any()
    assert set(frame.layer) == {0, 2} and set(frame["head"]) == {0, 1, 2, 3}
    assert (frame.method == method).all()
    assert (frame.delta_loss == frame.ablated_loss - frame.base_loss).all()
    assert (frame.label == frame.delta_loss.ge(0.01).map({True: "active", False: "dormant"})).all()
    row = frame[(frame.domain == "b") & (frame.layer == 2) & (frame["head"] == 1)].iloc[0]
    with ablation(tiny_llama.model, [], method):
        assert row.base_loss == pytest.approx(mean_next_token_loss(tiny_llama, PROMPTS[1:]), abs=1e-9)
    with ablation(tiny_llama.model, [(2, 1)], method):
        ablated = mean_next_token_loss(tiny_llama, PROMPTS[1:])
    assert row.ablated_loss == pytest.approx(ablated, abs=1e-9)
    assert frame.delta_loss.abs().max() > 1e-4  # ablations change the loss


def test_threshold_splits_heads(tiny_llama):
    domains = {"a": PROMPTS}
    first = head_effects(tiny_llama, domains, layers=[1], progress=False)
    cut = float(first.delta_loss.median())  # 4 distinct deltas: two on each side
    frame = head_effects(tiny_llama, domains, HeadAblationConfig(threshold=cut), layers=[1],
                         progress=False)
    assert frame.label.value_counts().to_dict() == {"active": 2, "dormant": 2}
    assert frame.label.eq("active").equals(first.delta_loss.ge(cut))


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        HeadAblationConfig(method="mean")
    with pytest.raises(ValueError, match="batch_size"):
        HeadAblationConfig(batch_size=0)
    with pytest.raises(ValueError, match="threshold"):
        HeadAblationConfig(threshold=float("nan"))


def test_builtin_domains_and_newline_decoding(tmp_path):
    domains = load_domains()
    assert set(domains) == {"prose", "code"}
    assert all(12 <= len(p) <= 16 for p in domains.values())
    assert all("\n" in p and "\\n" not in p for p in domains["code"])
    assert not any("\n" in p for p in domains["prose"])
    path = tmp_path / "d.txt"
    path.write_text("x = 1\\ny = 2\n\n  \nplain\n", encoding="utf-8")
    assert read_domain(path) == ["x = 1\ny = 2", "plain"]
    with pytest.raises(ValueError, match="built-in"):
        load_domains(["poetry"])


def test_parse_layers():
    assert parse_layers("0, 2-3,2", 4) == [0, 2, 3]
    for bad in ("4", "3-1", "a", "1-"):
        with pytest.raises(ValueError):
            parse_layers(bad, 4)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tokenprobe")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_cli_writes_the_table_and_summarises(tmp_path, capsys, suffix):
    out = tmp_path / f"heads{suffix}"
    code = _cli(["heads", "--model", "tiny-llama", "--layers", "1", "--domains", "prose",
                 "--method", "sink", "--out", str(out), "--quiet"])
    assert code == 0
    frame = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert len(frame) == 4 and set(frame.method) == {"sink"} and set(frame.layer) == {1}
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    printed = capsys.readouterr().out
    assert "prose:" in printed and "dormant" in printed and "layer   1 head" in printed


def test_cli_refuses_bad_input(tmp_path):
    for argv in (["--out", str(tmp_path / "x.json")], ["--domains", "poetry"],
                 ["--layers", "7"]):
        with pytest.raises(UsageError):
            _cli(["heads", "--model", "tiny-llama", "--quiet", *argv])
