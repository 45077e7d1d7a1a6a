"""The same probe gives the same tables through HF, TransformerBridge and nnsight; a backend
refuses, with one message, probes on sites it does not observe."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import PROMPTS

import tokenprobe
from tokenprobe.backends import BACKENDS, UnsupportedSite, as_bridge, as_nnsight, resolve


def tables_through(name: str, backend: str) -> tokenprobe.Run:
    loaded = tokenprobe.load(name)  # fresh: the bridge switches its model to eager attention
    model = {"hf": lambda: loaded, "bridge": lambda: as_bridge(loaded),
             "nnsight": lambda: as_nnsight(loaded)}[backend]()
    assert type(resolve(model)) is BACKENDS[backend]
    return tokenprobe.run(model, PROMPTS, ["activations"], tokenizer=loaded.tokenizer,
                          batch_size=2, progress=False)


def assert_same_tables(a: tokenprobe.Run, b: tokenprobe.Run) -> None:
    assert sorted(a.tables) == sorted(b.tables)
    pd.testing.assert_frame_equal(a.tokens, b.tokens)
    ka, kb = a.token_layers, b.token_layers
    pd.testing.assert_frame_equal(ka[["prompt_id", "layer", "pos"]], kb[["prompt_id", "layer", "pos"]])
    for col in ["resid_norm", "max_abs", "median_abs", "cos_to_first"]:
        np.testing.assert_allclose(ka[col], kb[col], rtol=1e-4, atol=1e-6, err_msg=col)
    assert (ka.max_abs_dim == kb.max_abs_dim).mean() > 0.999  # argmax may flip on exact near-ties
    ma, mb = a.massive, b.massive
    assert ma[["prompt_id", "layer", "pos", "dim"]].equals(mb[["prompt_id", "layer", "pos", "dim"]])
    np.testing.assert_allclose(ma.value, mb.value, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3",
                                  pytest.param("smollm2-135m", marks=pytest.mark.embedded)])
@pytest.mark.parametrize("backend", ["bridge", "nnsight"])
def test_backend_parity(name, backend):
    assert_same_tables(tables_through(name, "hf"), tables_through(name, backend))


def test_bare_hf_model_needs_tokenizer(tiny_llama):
    with pytest.raises(ValueError, match="tokenizer"):
        tokenprobe.run(tiny_llama.model, ["hi"])
    run = tokenprobe.run(tiny_llama.model, ["hi"], tokenizer=tiny_llama.tokenizer, progress=False)
    assert run.meta["backend"] == "hf" and run.meta["weights_fingerprint"].startswith("params:")


def test_unsupported_model_type_is_refused():
    with pytest.raises(TypeError, match="unsupported model type"):
        tokenprobe.run(object(), ["hi"])


def test_nnsight_transformers_model_built_by_the_user():
    """nnsight's current class, built directly (not by as_nnsight), gives the HF numbers."""
    from nnsight import TransformersModel

    loaded = tokenprobe.load("tiny-llama")  # fresh: nnsight sets padding_side on its tokenizer
    want = tokenprobe.run(loaded, PROMPTS, ["activations", "entropy"], batch_size=2,
                          progress=False)
    model = TransformersModel(loaded.model, tokenizer=loaded.tokenizer)
    got = tokenprobe.run(model, PROMPTS, ["activations", "entropy"], batch_size=2, progress=False)
    assert got.meta["backend"] == "nnsight"
    assert_same_tables(want, got)
    np.testing.assert_allclose(got.tokens.entropy.to_numpy(float),
                               want.tokens.entropy.to_numpy(float), rtol=1e-4, atol=1e-5)


def test_nnsight_language_model_is_still_accepted(tiny_llama):
    import nnsight
    from nnsight import LanguageModel

    with pytest.warns(nnsight.NNsightDeprecationWarning):  # nnsight's own warning, not ours
        model = LanguageModel(tiny_llama.model, tokenizer=as_nnsight(tiny_llama).tokenizer)
    assert type(resolve(model)) is BACKENDS["nnsight"]


@pytest.mark.parametrize("backend", ["bridge", "nnsight"])
def test_no_deprecated_api(backend):
    """Building the handle and running a batch through it warns of no deprecation."""
    loaded = tokenprobe.load("tiny-llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = BACKENDS[backend].over(loaded)
        tokenprobe.run(model, PROMPTS[:2], ["activations"], tokenizer=loaded.tokenizer,
                       progress=False)
    deprecations = [w for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, [f"{w.filename}:{w.lineno}: {w.message}" for w in deprecations]


def test_capability_check_before_loading():
    needs = {"activations": {"resid_post"}, "sinks": {"attention"}}
    BACKENDS["hf"].check(needs)
    for name in ("bridge", "nnsight"):
        with pytest.raises(UnsupportedSite) as err:
            BACKENDS[name].check(needs)
        assert str(err.value) == (
            "probe sinks needs attention statistics (site attention), which only the hf backend "
            "provides: pass the tokenprobe.load() result or the transformers model (--backend "
            f"hf), or choose probes among those the {name} backend supports: activations")
    with pytest.raises(UnsupportedSite, match="the nnsight backend supports: activations, entropy"):
        BACKENDS["nnsight"].check({"sinks": {"attention"}}, known={
            "activations": {"resid_post"}, "entropy": {"resid_post"}, "sinks": {"attention"}})


@pytest.mark.parametrize("backend", ["bridge", "nnsight"])
def test_sinks_are_refused_through_other_backends(backend):
    loaded = tokenprobe.load("tiny-llama")
    model = BACKENDS[backend].over(loaded)
    assert resolve(model, loaded.tokenizer).sites == {"resid_post"}
    with pytest.raises(UnsupportedSite, match=f"probe sinks needs attention statistics .* only the "
                       f"hf backend .* the {backend} backend supports"):
        tokenprobe.run(model, ["hi"], ["sinks", "activations"], tokenizer=loaded.tokenizer,
                       progress=False)
