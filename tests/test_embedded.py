"""The activations probe on the real embedded models: reference equality and the known picture."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import block_outputs
from test_activations import reference_massive, reference_token_layers

import tokenprobe

pytestmark = pytest.mark.embedded

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "the cat sat on the mat and the dog sat on the rug.",
    "Summer is warm. Winter is cold.",
    "1. Preheat the oven to 200 degrees.",
]


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_tables_equal_eager_reference(fixture, request):
    loaded = request.getfixturevalue(fixture)
    run = tokenprobe.run(loaded, TEXTS, ["activations"], batch_size=4, progress=False)
    for prompt_id, text in enumerate(TEXTS):
        ids, h = block_outputs(loaded, text)
        ref = reference_token_layers(h)
        got = run.token_layers[run.token_layers.prompt_id == prompt_id].reset_index(drop=True)
        assert len(got) == len(ref)
        for col in ["resid_norm", "max_abs", "median_abs", "cos_to_first"]:
            np.testing.assert_allclose(got[col], ref[col], rtol=1e-4, atol=1e-5, err_msg=col)
        mine = run.massive[run.massive.prompt_id == prompt_id]
        assert set(zip(mine.layer, mine.pos, mine.dim)) == reference_massive(h, 100.0, 1000.0)


def test_smollm2_massive_dim_507_on_first_token(smollm2):
    """Sun et al.'s picture in SmolLM2: one fixed dim on the first token, from block 11 to 27,
    whatever that first token is (it is an ordinary word: SmolLM2 adds no BOS)."""
    run = tokenprobe.run(smollm2, TEXTS, ["activations"], progress=False)
    assert run.tokens[run.tokens.pos == 0].token.tolist() == ["The", "the", "Summer", "1"]
    m = run.massive
    for prompt_id in range(len(TEXTS)):
        mine = m[m.prompt_id == prompt_id]
        assert set(mine.pos) == {0} and set(mine.dim) == {507}
        assert sorted(mine.layer) == list(range(11, 28))
        assert 15_000 < mine.value.abs().max() < 30_000
        assert (mine.ratio_to_median > 1000).all()


def test_smollm2_early_the_tokens_stay_below_the_ratio_bar(smollm2):
    """Early " the" tokens reach several hundred in dim 507 in blocks 2-5: visible in max_abs,
    but under 1000x the layer median, so absent from `massive`. (Not every " the": here the
    two after "on", at positions 4 and 11, spike; the one after "and", at 7, does not.)"""
    run = tokenprobe.run(smollm2, TEXTS[1:2], ["activations"], progress=False)
    tl = run.token_layers.merge(run.tokens, on=["prompt_id", "pos"])
    early = tl[tl.layer.between(2, 5) & (tl.token == " the")]
    spikes = early[early.max_abs > 300]
    assert sorted(set(spikes.pos)) == [4, 11]
    assert len(spikes) == 8  # both tokens in all four blocks
    assert (spikes.max_abs_dim == 507).all() and (spikes.max_abs < 1000).all()
    assert (spikes.max_abs / spikes.median_abs > 100).all()  # outliers within their own token
    assert run.massive[run.massive.layer.between(2, 5)].empty


def test_gemma3_first_token_is_bos(gemma3):
    run = tokenprobe.run(gemma3, TEXTS[:1], ["activations"], progress=False)
    assert run.tokens.token.iloc[0] == "<bos>" and run.prompts.first_is_special.iloc[0]
