"""The same probe gives the same tables through HF, TransformerBridge and nnsight."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import PROMPTS

import tokenprobe
from tokenprobe.backends import as_bridge, as_nnsight, resolve


def tables_through(name: str, backend: str) -> tokenprobe.Run:
    loaded = tokenprobe.load(name)  # fresh: the bridge switches its model to eager attention
    model = {"hf": lambda: loaded, "bridge": lambda: as_bridge(loaded),
             "nnsight": lambda: as_nnsight(loaded)}[backend]()
    assert resolve(model).kind == {"hf": "hf", "bridge": "transformer_bridge",
                                   "nnsight": "nnsight"}[backend]
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
