"""Attribution by ablation: removal and attention knockout against direct recomputation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tokenprobe.analyses.attribution import (
    COLUMNS,
    AttributionConfig,
    attention_knockout,
    attribute,
    attributions,
    layer_range,
)

PROMPT = "the cat sat on the mat"
TARGET = " and"


def _ids(loaded, prompt=PROMPT, target=TARGET) -> tuple[list[int], list[int]]:
    return (loaded.tokenizer(prompt)["input_ids"],
            loaded.tokenizer(target, add_special_tokens=False)["input_ids"])


def _logprob(model, ids: list[int], m: int, mask: torch.Tensor | None = None) -> float:
    """Total log-prob of the last m tokens of `ids`, one full forward (float64 log-softmax)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0].double()
    logp = torch.log_softmax(logits[-m - 1:-1], -1)
    return float(logp.gather(-1, torch.tensor(ids[-m:])[:, None]).sum())


def _knockout_4d(t: int, j: int, queries: range | None = None) -> torch.Tensor:
    """Hand-built (1, 1, T, T) additive mask: causal, key j cut from later queries."""
    allowed = torch.ones(t, t, dtype=torch.bool).tril()
    for i in queries if queries is not None else range(j + 1, t):
        if i > j:
            allowed[i, j] = False
    return torch.zeros(t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@pytest.fixture(scope="module")
def eager_llama(tiny_llama):
    model = copy.deepcopy(tiny_llama.model)
    model.set_attn_implementation("eager")
    return model


def test_removal_equals_fresh_forward_on_shortened_input(tiny_llama):
    p, c = _ids(tiny_llama, target=" and the dog")
    table = attribute(tiny_llama, PROMPT, " and the dog", AttributionConfig(methods=("removal",),
                                                                             batch_size=4))
    assert list(table.columns) == COLUMNS and table.pos.tolist() == list(range(len(p)))
    base = _logprob(tiny_llama.model, p + c, len(c))
    np.testing.assert_allclose(table.base_logprob, base, rtol=1e-5)
    for j in range(len(p)):
        expect = _logprob(tiny_llama.model, p[:j] + p[j + 1:] + c, len(c)) - base
        np.testing.assert_allclose(table.delta_logprob.iat[j], expect, rtol=1e-4, atol=1e-4)
    assert table.delta_logprob.abs().max() > 1e-2
    assert (table.layer_range == "").all() and (table.method == "removal").all()


def test_knockout_all_layers_equals_hand_built_4d_mask(tiny_llama, eager_llama):
    """Reference: the eager model fed a hand-built 4D mask (every layer sees it)."""
    p, c = _ids(tiny_llama)
    t = len(p) + len(c)
    table = attribute(tiny_llama, PROMPT, TARGET, AttributionConfig(methods=("knockout",),
                                                                     batch_size=5))
    assert (table.layer_range == "0-2").all()
    base = _logprob(eager_llama, p + c, len(c))
    for j in range(len(p)):
        expect = _logprob(eager_llama, p + c, len(c), _knockout_4d(t, j)) - base
        np.testing.assert_allclose(table.delta_logprob.iat[j], expect, rtol=1e-4, atol=1e-4)
    assert table.delta_logprob.iloc[:-1].abs().max() > 1e-2


def test_knockout_to_target_queries_only(tiny_llama, eager_llama):
    p, c = _ids(tiny_llama, target=" and a")
    t = len(p) + len(c)
    config = AttributionConfig(methods=("knockout",), to="target")
    table = attribute(tiny_llama, PROMPT, " and a", config)
    base = _logprob(eager_llama, p + c, len(c))
    for j in range(len(p)):
        mask = _knockout_4d(t, j, range(len(p) - 1, t - 1))
        expect = _logprob(eager_llama, p + c, len(c), mask) - base
        np.testing.assert_allclose(table.delta_logprob.iat[j], expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa", "tokenprobe"])
def test_knockout_hook_works_with_each_attention_implementation(tiny_llama, eager_llama, impl):
    p, c = _ids(tiny_llama)
    model = copy.deepcopy(tiny_llama.model)
    import tokenprobe.attention  # noqa: F401  (registers "tokenprobe")
    model.set_attn_implementation(impl)
    ids = torch.tensor([p + c] * 3)
    knocked = torch.tensor([-1, 0, 3])
    with torch.no_grad(), attention_knockout(model, range(3), knocked):
        got = model(input_ids=ids).logits
    for row, j in enumerate(knocked.tolist()):
        mask = None if j < 0 else _knockout_4d(ids.shape[1], j)
        with torch.no_grad():
            expect = eager_llama(input_ids=ids[:1], attention_mask=mask).logits[0]
        torch.testing.assert_close(got[row], expect, rtol=1e-4, atol=1e-4)


def test_layers_outside_the_range_see_the_normal_mask(tiny_llama):
    model, seen = tiny_llama.model, {}
    blocks = model.model.layers

    def spy(layer):
        def hook(_m, _args, kwargs):
            seen[layer] = kwargs["attention_mask"]
        return hook

    ids = torch.tensor([_ids(tiny_llama)[0]] * 2)
    handles = [blocks[0].self_attn.register_forward_pre_hook(spy(0), with_kwargs=True)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
        normal = seen[0]
        with attention_knockout(model, [1], torch.tensor([2, 3])):
            handles.append(blocks[1].self_attn.register_forward_pre_hook(spy(1), with_kwargs=True))
            with torch.no_grad():
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    assert (normal is None and seen[0] is None) or torch.equal(seen[0], normal)
    knocked = seen[1]
    assert knocked.shape == (2, 1, ids.shape[1], ids.shape[1])
    assert not knocked[0, 0, 5, 2] and knocked[0, 0, 5, 3] and knocked[0, 0, 2, 2]
    assert not knocked[1, 0, 5, 3] and knocked[1, 0, 5, 2] and not knocked[1, 0, 2, 3]


def test_knockout_preserves_sliding_window_mask(tiny_gemma3):
    """With nothing knocked out, the hooked model equals the plain one (sliding window 8 < T)."""
    model = tiny_gemma3.model
    ids = torch.tensor([tiny_gemma3.tokenizer("the cat sat on the mat and the dog")["input_ids"]])
    with torch.no_grad():
        expect = model(input_ids=ids).logits
        with attention_knockout(model, range(4), torch.tensor([-1])):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_removing_the_first_token_equals_knocking_out_its_key_everywhere(tiny_llama):
    """With RoPE, scores depend on relative positions only: cutting key 0 from every later
    query in every layer computes what the sequence without token 0 computes."""
    table = attribute(tiny_llama, PROMPT, " and the", positions=[0])
    by_method = table.set_index("method").delta_logprob
    assert abs(by_method["removal"]) > 1e-2
    np.testing.assert_allclose(by_method["knockout"], by_method["removal"], rtol=1e-4, atol=1e-4)


def test_knockout_of_no_layers_is_zero(tiny_llama):
    table = attribute(tiny_llama, PROMPT, TARGET, AttributionConfig(methods=("knockout",),
                                                                     layers=()))
    assert (table.layer_range == "").all()
    assert table.delta_logprob.abs().max() < 1e-5


def test_knockout_after_the_target_has_no_effect(tiny_llama):
    """Causality: a key at or after the last target token feeds no query that predicts it."""
    p, c = _ids(tiny_llama, target=" and the")
    t = len(p) + len(c)
    config = AttributionConfig(methods=("knockout",))
    table = attribute(tiny_llama, PROMPT, " and the", config, positions=[t - 1])
    assert table.delta_logprob.abs().max() < 1e-5
    # The first target token's key feeds the second target token only.
    both = attribute(tiny_llama, PROMPT, c, config, positions=[len(p)])
    first = attribute(tiny_llama, PROMPT, c[:1], config, positions=[len(p)])
    assert abs(both.delta_logprob.iat[0]) > 1e-3 and abs(first.delta_logprob.iat[0]) < 1e-5


def test_next_token_target_and_windows(tiny_llama):
    config = AttributionConfig(methods=("knockout",), window=2, batch_size=3)
    table = attribute(tiny_llama, "abc", None, config)
    with torch.no_grad():
        logits = tiny_llama.model(input_ids=torch.tensor([_ids(tiny_llama, "abc")[0]])).logits
    assert table.attrs["target_ids"] == [int(logits[0, -1].argmax())]
    assert sorted(table.layer_range.unique()) == ["0", "0-1", "1-2"]  # windows at layers 0, 1, 2
    assert len(table) == 3 * 3


def test_attributions_table_over_prompts(tiny_llama):
    frame = attributions(tiny_llama, ["ab", PROMPT], [" c", None], AttributionConfig(batch_size=2))
    assert list(frame.columns) == COLUMNS
    assert frame.groupby("prompt_id").size().tolist() == [2 * 2, 2 * len(_ids(tiny_llama)[0])]
    assert set(frame.method) == {"removal", "knockout"}


def test_layer_range_and_validation(tiny_llama):
    assert layer_range([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8" and layer_range([]) == ""
    with pytest.raises(ValueError, match="methods"):
        AttributionConfig(methods=("nope",))
    with pytest.raises(ValueError, match="2\\+ tokens"):
        attribute(tiny_llama, "a", " b", AttributionConfig(methods=("removal",)))
    with pytest.raises(ValueError, match="outside"):
        attribute(tiny_llama, PROMPT, TARGET, AttributionConfig(layers=(7,)))


@pytest.mark.embedded
def test_smollm2_paris(smollm2):
    """Which tokens of "The capital of France is" carry " Paris" (p = 0.77 unablated).

    Removal: every token matters (1.9-9.8 nats), " is" most (it is the predicting position).
    Knockout into the last position (Geva et al.'s edges), all layers: apart from the sink
    " The" at position 0 (-11 nats), " France" matters most (-5.9 vs " capital" -2.4, " of"
    -1.0); by 9-layer windows, its information moves in the upper half: about -2.1 nats for
    the window 15-23 against -0.1 for 0-8 (layer 23 is the last that carries it).
    """
    table = attribute(smollm2, "The capital of France is", " Paris")
    print(f"\nbase log p(' Paris') = {table.base_logprob.iat[0]:.3f}")
    print(table.pivot(index=["pos", "token"], columns="method", values="delta_logprob")
          .round(3).to_string())
    removal = table[table.method == "removal"].set_index("token").delta_logprob
    assert removal.idxmin() == " is" and removal[" France"] < -3
    assert abs(table[table.method == "knockout"].delta_logprob.iat[-1]) < 1e-4  # nothing reads " is"
    geva = attribute(smollm2, "The capital of France is", " Paris",
                     AttributionConfig(methods=("knockout",), to="target"))
    content = geva[geva.pos.between(1, 3)].set_index("token").delta_logprob
    print(geva[["pos", "token", "delta_logprob"]].round(3).to_string())
    assert content.idxmin() == " France" and content[" France"] < -3
    windows = attribute(smollm2, "The capital of France is", " Paris",
                        AttributionConfig(methods=("knockout",), to="target", window=9,
                                          layers=(4, 19)), positions=[3])
    by_window = windows.set_index("layer_range").delta_logprob
    print(by_window.round(3).to_string())
    assert by_window["15-23"] < -1.0 < by_window["0-8"]


def test_cli_run_matches_fresh_forwards(tiny_llama, tmp_path):
    """`tokenprobe attribute` writes a run whose removal deltas equal fresh forwards of the
    shortened inputs, with one knockout layer_range per --layers set and removal once."""
    from tokenprobe.analyses import views
    from tokenprobe.cli.main import main
    from tokenprobe.store import open_run
    from tokenprobe.tables import SCHEMAS

    out = tmp_path / "run"
    args = ["attribute", "--model", "tiny-llama", "--prompt", PROMPT, "--target", TARGET,
            "--layers", "0", "1-2", "--quiet", "--out", str(out)]
    assert main(args) == 0
    run = open_run(out)
    table = run.attributions
    assert list(table.columns) == list(SCHEMAS["attributions"])
    p_ids, c_ids = _ids(tiny_llama)
    assert run.tokens.token_id.tolist() == p_ids + c_ids
    assert run.meta["summary"]["attribution"][0]["target"] == TARGET
    base = _logprob(tiny_llama.model, p_ids + c_ids, len(c_ids))
    removal = table[table.method == "removal"].set_index("pos")
    assert removal.index.tolist() == list(range(len(p_ids)))  # once, not once per layer set
    for j in (0, 3, len(p_ids) - 1):
        short = p_ids[:j] + p_ids[j + 1:] + c_ids
        expected = _logprob(tiny_llama.model, short, len(c_ids)) - base
        assert removal.delta_logprob[j] == pytest.approx(expected, abs=1e-4)
    knock = table[table.method == "knockout"]
    assert sorted(knock.layer_range.unique()) == ["0", "1-2"]
    assert knock.groupby("layer_range").size().tolist() == [len(p_ids)] * 2
    shown = views.token_metric_frame(run, 0, "attribution").value
    assert np.allclose(shown[:len(p_ids)], removal.delta_logprob)
    assert shown[len(p_ids):].isna().all()
    assert main(args) == 4
    assert main(args + ["--overwrite", "--method", "removal"]) == 0
    assert set(open_run(out).attributions.method) == {"removal"}
    bad = tmp_path / "bad"
    assert main(args[:-2] + ["--out", str(bad), "--layers", "x"]) == 2
    assert main(args[:-2] + ["--out", str(bad), "--layers", "7"]) == 2
    assert main(["attribute", "--model", "tiny-llama", "--out", str(bad)]) == 2
    assert not bad.exists()
