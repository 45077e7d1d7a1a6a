"""Runs of two tokenisers compared per span (tokenprobe.analyses.span_compare): token placement
by hand-built cases, and the per-span values against `tokenprobe spans`, which places tokens by
the tokenizer's own offset mapping and scores them in a forward of its own."""
from __future__ import annotations

import numpy as np
import pytest

import tokenprobe
from tokenprobe.analyses.span_compare import (default_aggregation, exact_spans,
                                              span_difference, span_values, token_offsets)
from tokenprobe.analyses.spans import compare_spans

TEXTS = ["The naïve café — 東京 at noon.", "Hi there\n\tfriend! Ünïcödé words."]


def test_offsets_of_plain_byte_and_special_tokens():
    text = "a é b"  # é is two UTF-8 bytes, split across two byte pieces below
    starts, ends = token_offsets(text, ["<s>", "a", " ", "\\xc3", "\\xa9", " b", "</s>"],
                                 [True, False, False, False, False, False, True])
    assert starts.tolist() == [-1, 0, 1, 2, 2, 3, -1]
    assert ends.tolist() == [-1, 1, 2, 3, 3, 5, -1]


def test_offsets_skip_a_dropped_leading_space_and_stop_at_the_text_end():
    starts, ends = token_offsets("one two", ["one", "two", " extra"], [False] * 3)
    assert starts.tolist() == [0, 4, -1] and ends.tolist() == [3, 7, -1]


def test_offsets_refuse_tokens_that_do_not_spell_the_text():
    with pytest.raises(ValueError, match="do not spell"):
        token_offsets("hello world", ["<|im_start|>", "user", "hello"], [True, False, False])


def test_a_literal_special_token_in_the_text_is_text():
    starts, _ = token_offsets("x<|endoftext|>y", ["x", "<|endoftext|>", "y"],
                              [False, True, False])
    assert starts.tolist() == [0, 1, 14]


def test_a_token_across_an_edge_makes_both_spans_inexact():
    starts, ends = np.array([0, 3, 6]), np.array([3, 6, 9])
    assert exact_spans(starts, ends, [(0, 3), (3, 9)]).tolist() == [True, True]
    assert exact_spans(starts, ends, [(0, 2), (2, 6), (6, 9)]).tolist() == [False, False, True]
    assert exact_spans(starts, ends, [(0, 3), (3, 5), (5, 9)]).tolist() == [True, False, False]


@pytest.fixture(scope="module")
def runs(tiny_llama, tiny_gemma3):
    probes = ["entropy"]
    return (tokenprobe.run(tiny_llama, TEXTS, probes, progress=False),
            tokenprobe.run(tiny_gemma3, TEXTS, probes, progress=False))


def test_span_values_equal_tokenprobe_spans(runs, tiny_llama, tiny_gemma3):
    a, b = runs
    assert (a.tokens.token_id.tolist() != b.tokens.token_id.tolist())  # two tokenisers
    reference = compare_spans(tiny_llama, tiny_gemma3, TEXTS, start_token=None)
    for pid in range(len(TEXTS)):
        ref = reference[reference.prompt_id == pid].reset_index(drop=True)
        surprisal = span_difference(a, b, pid, "logprob")
        entropy = span_difference(a, b, pid, "entropy")
        assert surprisal.text.tolist() == ref.text.tolist()
        for side in "ab":
            np.testing.assert_allclose(-surprisal[f"value_{side}"], ref[f"surprisal_{side}"],
                                       rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(entropy[f"value_{side}"], ref[f"entropy_first_{side}"],
                                       rtol=1e-4, atol=1e-4)
            assert surprisal[f"n_tokens_{side}"].tolist() == ref[f"n_tokens_{side}"].tolist()
        defined = ref.surprisal_a.notna() & ref.surprisal_b.notna()  # spans' exact needs it
        assert (surprisal.exact[defined] == ref.exact[defined]).all()
        np.testing.assert_allclose(surprisal.value, surprisal.value_b - surprisal.value_a)


def test_aggregations_and_defaults(runs):
    a, _ = runs
    assert default_aggregation("entropy") == "first"
    assert default_aggregation("logprob") == "sum"
    assert default_aggregation("massive") == "max"
    frame = a.tokens[a.tokens.prompt_id == 1]
    spans = {agg: span_values(a, 1, "logprob", agg=agg) for agg in ("sum", "mean", "max")}
    words = spans["sum"]
    last = words.iloc[-1]
    mine = frame.logprob.to_numpy()[-last.n_tokens:]  # the last word's tokens
    assert last.value == pytest.approx(mine.sum())
    assert spans["mean"].value.iloc[-1] == pytest.approx(mine.mean())
    assert spans["max"].value.iloc[-1] == pytest.approx(mine.max())
    with pytest.raises(ValueError, match="category"):
        span_values(a, 0, "band")
    with pytest.raises(ValueError, match="aggregation"):
        span_values(a, 0, "entropy", agg="median")
