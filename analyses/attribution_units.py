"""Prompt components for attribution: a prompt's tokens grouped into units (tokens, words,
sentences, user spans), each unit a set of token positions that is kept or removed together."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from tokenprobe.analyses.spans_segment import segment, tokenise

KINDS = ("token", "word", "sentence", "span")
_SENTENCE_END = re.compile(r"[.!?]+[ \t]*\n|[.!?]+(?=\s)|\n")


@dataclass(frozen=True)
class Unit:
    """One prompt component.

    Attributes:
        index: 0-based unit number, in text order.
        text: the prompt's characters char_start:char_end.
        char_start, char_end: half-open character span in the prompt.
        positions: the unit's token positions in the prompt's ids (ascending, non-empty).
    """

    index: int
    text: str
    char_start: int
    char_end: int
    positions: tuple[int, ...]


def split_units(tokenizer, prompt: str, kind: str = "token", *,
                spans: Sequence[tuple[int, int]] | None = None,
                delimiter: str | None = None) -> tuple[list[int], list[Unit]]:
    """The prompt's ids (`tokenizer(prompt)["input_ids"]`, default special tokens) and its units.

    Kinds: "token" (one unit per token); "word" (whitespace-separated words, the whitespace
    before a word belongs to it, so a token starting with a space begins a new word);
    "sentence" (cut after a run of . ! ? followed by whitespace, and after each newline);
    "span" (the half-open character `spans`, which must not overlap, with the text outside
    every span as units of its own in between; or, with `delimiter`, the text cut after each
    occurrence, the delimiter ending the unit before it).

    Special tokens the tokenizer adds (BOS: zero-width offsets) belong to no unit: they are
    always kept. Every other token is in exactly one unit: a token that straddles a unit
    boundary goes to the unit where it starts (its first character). Units that end up with
    no token (all their characters inside a token started earlier) are dropped, and the rest
    renumbered, so `index` is always 0..n-1. Needs a fast tokenizer (character offsets).

    Raises:
        ValueError: an empty prompt, an unknown kind, spans or delimiter with a kind other
            than "span" (or neither with it), overlapping, empty or out-of-text spans, an
            empty delimiter.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown unit kind {kind!r}; use one of {', '.join(KINDS)}")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("the prompt is empty; give it some text")
    if (spans is not None or delimiter is not None) != (kind == "span"):
        raise ValueError('spans or a delimiter go with kind="span", and kind="span" needs one')
    if spans is not None and delimiter is not None:
        raise ValueError("give spans or a delimiter, not both")
    tok = tokenise(tokenizer, prompt, start_token=None)
    starts = [int(s) for s in tok.starts]
    if kind == "token":
        bounds = [(int(a), int(b)) for a, b in zip(tok.starts, tok.ends)]
        units = [Unit(k, prompt[a:b], a, b, (int(p),))
                 for k, (p, (a, b)) in enumerate(zip(tok.text_pos, bounds))]
        return tok.ids, units
    if kind == "word":
        if not prompt.strip():
            return tok.ids, _place([(0, len(prompt))], prompt, tok.text_pos, starts)
        bounds = segment(prompt, "word")
    elif kind == "sentence":
        bounds = _tile([m.end() for m in _SENTENCE_END.finditer(prompt)], len(prompt))
    elif delimiter is not None:
        if not delimiter:
            raise ValueError("the delimiter is empty")
        cuts, at = [], prompt.find(delimiter)
        while at >= 0:
            cuts.append(at + len(delimiter))
            at = prompt.find(delimiter, at + len(delimiter))
        bounds = _tile(cuts, len(prompt))
    else:
        bounds = _span_bounds(spans, len(prompt))
    return tok.ids, _place(bounds, prompt, tok.text_pos, starts)


def _tile(cuts: Sequence[int], n: int) -> list[tuple[int, int]]:
    edges = [0, *sorted({c for c in cuts if 0 < c < n}), n]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _span_bounds(spans: Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """User spans checked and completed with the gaps between them into a tiling of 0..n."""
    chosen = sorted((int(a), int(b)) for a, b in spans)
    if not chosen:
        raise ValueError("spans is empty; give at least one (char_start, char_end)")
    for a, b in chosen:
        if not 0 <= a < b <= n:
            raise ValueError(f"span ({a}, {b}) is empty or outside the text (0..{n})")
    for (a0, b0), (a1, b1) in zip(chosen, chosen[1:]):
        if a1 < b0:
            raise ValueError(f"spans ({a0}, {b0}) and ({a1}, {b1}) overlap")
    return _tile([e for span in chosen for e in span], n)


def _place(bounds: list[tuple[int, int]], prompt: str, text_pos, starts: list[int]
           ) -> list[Unit]:
    """Units of the character tiling `bounds`: each token in the one where it starts."""
    units: list[Unit] = []
    for a, b in bounds:
        last = a == bounds[-1][0]
        pos = tuple(int(p) for p, s in zip(text_pos, starts) if a <= s < b or (last and s >= b))
        if pos:
            units.append(Unit(len(units), prompt[a:b], a, b, pos))
    return units
