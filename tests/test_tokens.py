"""Tokenisation for runs: readable token text, context limits, padding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenprobe
from tokenprobe.tokens import (PromptError, display_text, encode_prompts, pad_batch,
                               raw_token_text, token_text)


def test_token_text_escapes_partial_utf8_and_controls(tiny_llama):
    tok = tiny_llama.tokenizer
    ids = tok("é\n")["input_ids"]  # two bytes of é, then a newline
    assert [token_text(tok, i) for i in ids] == ["\\xc3", "\\xa9", "\\n"]
    assert [raw_token_text(tok, i) for i in ids] == ["\\xc3", "\\xa9", "\n"]
    assert token_text(tok, tok.eos_token_id) == "<eos>"


def test_display_text_escapes_what_drives_a_terminal():
    assert display_text("plain text, é 日本") == "plain text, é 日本"
    assert display_text("\x1b[31mred\x07\x00\r\t\n\x7f\x9b\u202e") == \
        "\\x1b[31mred\\x07\\x00\\r\\t\\n\\x7f\\x9b\\u202e"


def test_token_column_is_safe_and_raw_is_exact(tiny_llama):
    """Control characters in a prompt reach `token` escaped and `token_raw` exactly; the
    readable text of every token is printable (a terminal shows it, never obeys it)."""
    text = "ok \x1b[2J\x07\x00\r\nend"
    run = tokenprobe.run(tiny_llama, [text], ["activations"], progress=False)
    tokens = run.tokens
    assert all(t.isprintable() for t in tokens.token)
    assert "".join(tokens.token_raw) == text
    assert "\\x1b" in "".join(tokens.token) and "\\r" in "".join(tokens.token)


def test_max_tokens_marks_the_prompt_truncated(tiny_llama):
    run = tokenprobe.run(tiny_llama, ["a long prompt", "ab"], ["activations"], max_tokens=4,
                         progress=False)
    assert run.prompts.n_tokens.tolist() == [4, 2]
    assert run.prompts.truncated.tolist() == [True, False]


def test_over_long_prompt_refused_unless_truncated(tiny_llama):
    long = "a" * 600  # tiny models have a 512-token context
    with pytest.raises(PromptError, match="more than the model's context of 512"):
        encode_prompts(tiny_llama.tokenizer, [long], context_length=512, truncate=False)
    run = tokenprobe.run(tiny_llama, ["short", long], truncate=True, progress=False)
    assert run.prompts.n_tokens.tolist() == [5, 512]
    assert run.prompts.truncated.tolist() == [False, True]


@pytest.mark.parametrize("bad", ["", "   \n\t"])
def test_empty_prompt_refused(tiny_llama, bad):
    with pytest.raises(PromptError, match=r"prompt 1 \(texts\[1\]\) is empty"):
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


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_query_never_prints_raw_control_characters(tiny_llama, tmp_path, capsys, fmt):
    import json

    from tokenprobe.cli.main import main

    text = "red \x1b[31m bell \x07 nul \x00 cr \r tab \t end"
    tokenprobe.run(tiny_llama, [text], ["activations"], progress=False, out=tmp_path / "r")
    sql = "SELECT p.text, t.token, t.token_raw, '\x1b]0;title\x07' AS \"col\x1b\" " \
          "FROM tokens t JOIN prompts p USING (run, prompt_id)"
    assert main(["query", sql, str(tmp_path / "r"), "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert not any(ord(c) < 0x20 and c != "\n" or 0x7f <= ord(c) < 0xa0 for c in out)
    if fmt == "json":  # exact, through JSON's own escapes
        rows = json.loads(out)
        assert rows[0]["text"] == text and "".join(r["token_raw"] for r in rows) == text
    else:
        assert "\\x1b[31m" in out and "\\x07" in out
