"""The text side of a span comparison (`tokenprobe.analyses.spans`): cutting a text into spans
that tile it (words, regex matches, sentences, given offsets), and a tokenizer's tokens placed on
it by their character offsets. Pure: a tokenizer, no model, no torch."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

UNITS = ("word", "regex", "sentence", "offsets")
SENTENCE_CUT = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)|(?=\n[ \t]*\n)")


def segment(text: str, unit: str = "word", *, pattern: str | None = None,
            cuts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Spans tiling `text` as (char_start, char_end) pairs, in order (see the module doc).

    Args:
        text: the text; empty or whitespace only raises ValueError.
        unit: "word", "regex" (needs `pattern`), "sentence" or "offsets" (needs `cuts`).
        pattern: the regular expression of unit "regex".
        cuts: unit "offsets": the character offsets where spans begin, strictly increasing,
            each in 1 .. len(text) - 1 (0 is implied).

    Raises:
        ValueError: an unknown unit, a missing or bad pattern, a pattern that matches nothing,
            bad cuts, or an empty text.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; use one of {', '.join(UNITS)}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text is empty or whitespace only; give it some text")
    if (pattern is not None) != (unit == "regex"):
        raise ValueError("a pattern goes with unit regex (--unit regex --pattern REGEX), and "
                         "unit regex needs one")
    if (cuts is not None) != (unit == "offsets"):
        raise ValueError("cuts go with unit offsets, and unit offsets needs them")
    n = len(text)
    if unit == "offsets":
        cuts = [int(c) for c in cuts]
        if any(not 0 < c < n for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"cuts must increase strictly within 1..{n - 1}, got {cuts}")
        return _tile(cuts, n)
    if unit == "sentence":
        found = sorted({m.end() for m in SENTENCE_CUT.finditer(text)} - {0, n})
        return _merge_blank(_tile(found, n), text)
    regex = compile_pattern(pattern) if unit == "regex" else re.compile(r"\S+")
    ends = [m.end() for m in regex.finditer(text) if m.end() > m.start()]
    if not ends:
        raise ValueError(f"the pattern {pattern!r} matches nothing in the text {text[:40]!r}")
    return _tile(ends[:-1], n)  # the text after the last match belongs to the last span


def compile_pattern(pattern: str) -> re.Pattern:
    """`pattern` compiled; ValueError naming the problem for a bad regular expression."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"bad regular expression {pattern!r}: {err}") from None


def _tile(cuts: Sequence[int], n: int) -> list[tuple[int, int]]:
    edges = [0, *sorted(set(cuts)), n]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _merge_blank(spans: list[tuple[int, int]], text: str) -> list[tuple[int, int]]:
    """Whitespace-only spans joined to the next span (the last one to the previous)."""
    out: list[list[int]] = []
    pending = None
    for a, b in spans:
        if not text[a:b].strip():
            pending = a if pending is None else pending
            continue
        out.append([a if pending is None else pending, b])
        pending = None
    if pending is not None:
        out[-1][1] = len(text)
    return [(a, b) for a, b in out]


@dataclass
class Tokenised:
    """One text as one model runs it: `ids` (context tokens first) and, per text token (every
    token but the zero-width special ones, e.g. BOS), its position and character offsets."""

    ids: list[int]
    text_pos: np.ndarray  # positions in `ids` of the text tokens
    starts: np.ndarray
    ends: np.ndarray
    start_token: str | None  # the start token prepended, if any


def start_token_id(tokenizer, start_token: str | None) -> int | None:
    """The id of the context token put before a text the tokenizer starts with no special
    token: "auto" (<|endoftext|>, else BOS, else EOS; see the module doc), a token's text, or
    None (none)."""
    if start_token is None:
        return None
    if start_token != "auto":
        found = tokenizer.convert_tokens_to_ids(start_token)
        if found is None or found == tokenizer.unk_token_id:
            raise ValueError(f"start token {start_token!r} is not in the vocabulary")
        return int(found)
    vocab = tokenizer.get_vocab()
    for candidate in ("<|endoftext|>", tokenizer.bos_token, tokenizer.eos_token):
        if candidate is not None and candidate in vocab:
            return int(vocab[candidate])
    return None


def tokenise(tokenizer, text: str, *, start_token: str | None = "auto") -> Tokenised:
    """`text` tokenised with its character offsets (a fast tokenizer is needed: ValueError)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: span alignment "
                         "needs its character offsets (return_offsets_mapping)")
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    special = set(tokenizer.all_special_ids)
    context = [i in special and a == b for i, (a, b) in zip(ids, offsets)]
    chosen = None
    if not context or not context[0]:
        prefix = start_token_id(tokenizer, start_token)
        if prefix is not None:
            ids, offsets, context = [prefix, *ids], [(0, 0), *offsets], [True, *context]
            chosen = tokenizer.convert_ids_to_tokens(prefix)
    text_pos = np.array([p for p, c in enumerate(context) if not c], dtype=np.int64)
    bounds = np.array([offsets[p] for p in text_pos], dtype=np.int64).reshape(-1, 2)
    return Tokenised(ids, text_pos, bounds[:, 0], bounds[:, 1], chosen)
