"""Tokenisation for runs: readable token text, context limits, padding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenprobe
from tokenprobe.tokens import PromptError, encode_prompts, pad_batch, token_text


def test_token_text_escapes_partial_utf8(tiny_llama):
    tok = tiny_llama.tokenizer
    ids = tok("é\n")["input_ids"]  # two bytes of é, then a newline
    assert [token_text(tok, i) for i in ids] == ["\\xc3", "\\xa9", "\n"]
    assert token_text(tok, tok.eos_token_id) == "<eos>"


def test_over_long_prompt_refused_unless_truncated(tiny_llama):
    long = "a" * 600  # tiny models have a 512-token context
    with pytest.raises(PromptError, match="more than the model's context of 512"):
        encode_prompts(tiny_llama.tokenizer, [long], context_length=512, truncate=False)
    run = tokenprobe.run(tiny_llama, ["short", long], truncate=True, progress=False)
    assert run.prompts.n_tokens.tolist() == [5, 512]
    assert run.prompts.truncated.tolist() == [False, True]


@pytest.mark.parametrize("bad", ["", "   \n\t"])
def test_empty_prompt_refused(tiny_llama, bad):
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        tokenprobe.run(tiny_llama, ["fine", bad], progress=False)


def test_pad_batch_right_pads():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_batch_size_does_not_change_tables(tiny_gemma3):
    prompts = ["one", "a much longer prompt with more tokens", "mid length"]
    a = tokenprobe.run(tiny_gemma3, prompts, batch_size=1, progress=False)
    b = tokenprobe.run(tiny_gemma3, prompts, batch_size=3, progress=False)
    floats = a.tokens.select_dtypes("float").columns
    assert len(floats) >= 5  # the entropy probe's columns
    assert a.tokens.drop(columns=floats).equals(b.tokens.drop(columns=floats))
    np.testing.assert_allclose(a.tokens[floats], b.tokens[floats], rtol=1e-4, atol=1e-5)
    diff = (a.token_layers.resid_norm - b.token_layers.resid_norm).abs() / a.token_layers.resid_norm
    assert diff.max() < 1e-4
