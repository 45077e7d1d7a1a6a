"""Prompt units for attribution (tokenprobe.analyses.attribution_units) on hand-made prompts."""
from __future__ import annotations

import pytest

from tokenprobe.analyses.attribution_units import split_units

TEXT = "Hi there. Yes!\nNo"  # tiny-llama: one token per character, no BOS


def texts(units):
    return [u.text for u in units]


def check_partition(ids, units, special=()):
    seen = sorted(p for u in units for p in u.positions)
    assert seen == [p for p in range(len(ids)) if p not in special]
    assert [u.index for u in units] == list(range(len(units)))


def test_token_units(tiny_llama):
    ids, units = split_units(tiny_llama.tokenizer, TEXT)
    assert ids == tiny_llama.tokenizer(TEXT)["input_ids"]
    assert texts(units) == list(TEXT)
    assert [u.positions for u in units] == [(p,) for p in range(len(TEXT))]


def test_word_sentence_units(tiny_llama):
    ids, words = split_units(tiny_llama.tokenizer, TEXT, "word")
    assert texts(words) == ["Hi", " there.", " Yes!", "\nNo"]
    assert words[1].positions == tuple(range(2, 9))
    check_partition(ids, words)
    ids, sents = split_units(tiny_llama.tokenizer, TEXT, "sentence")
    assert texts(sents) == ["Hi there.", " Yes!\n", "No"]
    assert (sents[2].char_start, sents[2].char_end, sents[2].positions) == (15, 17, (15, 16))
    ids, lines = split_units(tiny_llama.tokenizer, "a\nb\n\nc", "sentence")
    assert texts(lines) == ["a\n", "b\n", "\n", "c"]


def test_span_and_delimiter_units(tiny_llama):
    tok = tiny_llama.tokenizer
    ids, units = split_units(tok, TEXT, "span", spans=[(10, 14), (3, 8)])
    assert texts(units) == ["Hi ", "there", ". ", "Yes!", "\nNo"]
    check_partition(ids, units)
    ids, units = split_units(tok, "a, b, c", "span", delimiter=", ")
    assert texts(units) == ["a, ", "b, ", "c"]
    assert [u.positions for u in units] == [(0, 1, 2), (3, 4, 5), (6,)]


def test_bos_in_no_unit_and_straddling_token(smollm2, tiny_gemma3):
    ids, units = split_units(tiny_gemma3.tokenizer, "ab cd", "word")
    assert ids[0] == tiny_gemma3.tokenizer.bos_token_id
    check_partition(ids, units, special={0})
    tok = smollm2.tokenizer
    text = "The capital of France"
    enc = tok(text, return_offsets_mapping=True)
    a, b = enc["offset_mapping"][1]  # " capital", one token
    ids, units = split_units(tok, text, "span", spans=[(a, a + 4), (a + 4, b)])
    # the token starts in the first span: it goes there, the second span gets no token
    assert [u.text for u in units] == [text[:a], text[a:a + 4], text[b:]]
    assert units[1].positions == (1,)
    check_partition(ids, units)


@pytest.mark.parametrize("kind, kw, match", [
    ("char", {}, "unknown unit kind"),
    ("span", {"spans": [(0, 4), (3, 6)]}, "overlap"),
    ("span", {"spans": [(0, 99)]}, "outside"),
    ("span", {"spans": [(2, 2)]}, "empty"),
    ("span", {"spans": []}, "empty"),
    ("span", {}, "needs one"),
    ("word", {"delimiter": ","}, "needs one"),
    ("span", {"delimiter": ""}, "empty"),
])
def test_errors(tiny_llama, kind, kw, match):
    with pytest.raises(ValueError, match=match):
        split_units(tiny_llama.tokenizer, TEXT, kind, **kw)
    with pytest.raises(ValueError, match="empty"):
        split_units(tiny_llama.tokenizer, "", "word")
