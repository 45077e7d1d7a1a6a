"""Two runs whose models tokenise the same text differently, compared per character span.

A per-token difference needs one tokenisation; across tokenisers the common ground is the
text. Each run's tokens are placed in its prompt's text from their exact texts (`token_raw`),
the text is cut into spans (`spans_segment.segment`: words by default), and a token's value
counts for the span holding its first character, as in `tokenprobe spans`. Per span the
tokens' values are reduced by one rule:

- "first": the value of the span's first token. For the `tokens` measures (which describe
  p_pos, the distribution that predicted the token at pos) this is the distribution that
  predicted the span's first token, `entropy_first` of `tokenprobe spans`: the default there.
- "sum": the total, e.g. `logprob` summed is the span's log-probability (the default for it).
- "mean" (the default for per-layer measures) and "max" (the default for `massive`).

A span is exact when neither run has a token straddling one of its edges; only there do the
two values describe the same characters. The rule for a straddling token (it counts where it
starts) moves its value to the span before the edge.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd

from tokenprobe.analyses.spans import assign, edges_of, straddled
from tokenprobe.analyses.spans_segment import segment
from tokenprobe.analyses.views import (metric_spec, readable_token, text_boxes,
                                       token_metric_frame)
from tokenprobe.store import Run

__all__ = ["AGGREGATIONS", "default_aggregation", "exact_spans", "span_difference",
           "span_values", "token_offsets"]
AGGREGATIONS = ("first", "sum", "mean", "max")
_BYTE = re.compile(rb"\\x([0-9a-f]{2})")


def default_aggregation(metric: str) -> str:
    """The reduction over a span's tokens that suits `metric` (see the module doc)."""
    if metric == "logprob":
        return "sum"
    table = metric_spec(metric).table
    return {"tokens": "first", "massive": "max", "attributions": "sum"}.get(table, "mean")


def _pieces(raw: str) -> list[bytes]:
    """The byte strings a token's exact text may stand for: its UTF-8, and for a partial UTF-8
    piece (stored as \\xNN escapes) the bytes those escapes name."""
    data = raw.encode("utf-8", "surrogatepass")
    unescaped = _BYTE.sub(lambda m: bytes([int(m.group(1), 16)]), data)
    return [data] if unescaped == data else [data, unescaped]


def token_offsets(text: str, raw: Sequence[str], special: Sequence[bool]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each token's (char_start, char_end) in `text`, recovered from the tokens' exact texts.

    Tokens are matched in order against the text's UTF-8 bytes. A token whose text is not at
    the cursor may follow whitespace (a tokenizer that drops a leading space when it decodes
    one token); a special token not in the text (BOS) is context. A byte piece of a
    multi-byte character gets that character's offsets. Tokens past the end of the text (a
    response after the prompt) and context tokens get -1, -1.

    Raises:
        ValueError: a token that continues neither the text nor whitespace in it (the tokens
            do not spell this text, e.g. a chat template was applied).
    """
    data = text.encode("utf-8", "surrogatepass")
    char_of = np.repeat(np.arange(len(text)), [len(c.encode("utf-8", "surrogatepass"))
                                               for c in text])  # byte -> its character
    starts, ends = np.full(len(raw), -1), np.full(len(raw), -1)
    cur = 0
    for t, (piece, is_special) in enumerate(zip(raw, special)):
        if cur >= len(data):
            break
        gap = len(data[cur:]) - len(data[cur:].lstrip())
        found = next(((skip, p) for skip in dict.fromkeys((0, gap)) for p in _pieces(piece)
                      if data.startswith(p, cur + skip)), None)
        if found is None:
            if is_special:
                continue
            raise ValueError(
                f"token {t} ({readable_token(piece)!r}) does not continue the text at "
                f"character {int(char_of[cur])}: this run's tokens do not spell the prompt's "
                "text (a chat template?), so no span alignment exists")
        skip, p = found
        a, cur = cur + skip, cur + skip + len(p)
        starts[t] = char_of[a] if a < len(data) else len(text)
        ends[t] = char_of[cur - 1] + 1 if cur > a else starts[t]
    return starts, ends


def exact_spans(starts: np.ndarray, ends: np.ndarray, spans: Sequence[tuple[int, int]]
                ) -> np.ndarray:
    """(n_spans,) bool: no token (char offsets `starts`, `ends`) straddles either edge."""
    cut = straddled(starts, ends, edges_of(spans)).any(0)  # (n_edges,)
    return ~cut[:-1] & ~cut[1:]


def span_values(run: Run, prompt_id: int, metric: str, *, layer: int | None = None,
                unit: str = "word", agg: str | None = None) -> pd.DataFrame:
    """One run's `metric` per span of its prompt's text.

    Returns:
        One row per span: span_id, char_start, char_end, text, value (the tokens' values
        reduced by `agg`, default `default_aggregation`; NaN for a span no token starts in
        or with a token whose value is NaN, e.g. the unpredicted first token),
        n_tokens, tokens (readable, joined by |), exact (no token straddles its edges).
    """
    agg = agg or default_aggregation(metric)
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {agg!r}; use one of {', '.join(AGGREGATIONS)}")
    if metric_spec(metric).kind != "numeric":
        raise ValueError(f"{metric} is a category; pick a numeric metric for a difference")
    text = str(run.prompts.set_index("prompt_id").text[prompt_id])
    frame = token_metric_frame(run, prompt_id, metric, layer=layer)
    starts, ends = token_offsets(text, list(frame.raw), list(frame.is_special))
    spans = segment(text, unit)
    placed = starts >= 0
    tokens = pd.DataFrame({"span_id": assign(starts[placed], spans),
                           "value": frame.value.to_numpy(dtype=float)[placed],
                           "shown": frame.shown.to_numpy()[placed]})
    grouped = tokens.groupby("span_id")
    reduce = {"first": grouped.value.first(), "sum": grouped.value.sum(min_count=1),
              "mean": grouped.value.mean(), "max": grouped.value.max()}[agg]
    if agg == "first":  # groupby's first skips NaN; the first token's own value is wanted
        reduce = grouped.value.nth(0).set_axis(grouped.span_id.nth(0))
    else:  # a span with an undefined token (pos 0's prediction) has no total, mean or max
        reduce = reduce.mask(tokens.value.isna().groupby(tokens.span_id).any())
    ids = np.arange(len(spans))
    return pd.DataFrame({
        "span_id": ids, "char_start": [s for s, _ in spans], "char_end": [e for _, e in spans],
        "text": [text[s:e] for s, e in spans], "value": reduce.reindex(ids).to_numpy(),
        "n_tokens": grouped.size().reindex(ids, fill_value=0).to_numpy(),
        "tokens": grouped.shown.agg("|".join).reindex(ids, fill_value="").to_numpy(),
        "exact": exact_spans(starts[placed], ends[placed], spans)})


def span_difference(run_a: Run, run_b: Run, prompt_id: int, metric: str, *,
                    layer: int | None = None, unit: str = "word", agg: str | None = None
                    ) -> pd.DataFrame:
    """B - A of `metric` per span of a prompt both runs hold with the same text.

    Returns:
        One row per span: span_id, char_start, char_end, text, shown (whitespace visible),
        value_a, value_b, n_tokens_a, n_tokens_b, tokens_a, tokens_b, exact (for both runs),
        value (= value_b - value_a) and tip (a tooltip line), ready for `figures.token_html`
        (pos = span_id, token_id = -1, is_special False).
    """
    texts = [r.prompts.set_index("prompt_id").text.get(prompt_id) for r in (run_a, run_b)]
    if texts[0] != texts[1]:
        raise ValueError(f"prompt {prompt_id} has different texts in the two runs; a span "
                         "comparison needs the same text")
    a, b = (span_values(r, prompt_id, metric, layer=layer, unit=unit, agg=agg)
            for r in (run_a, run_b))
    out = a[["span_id", "char_start", "char_end", "text"]].copy()
    for side, frame in (("a", a), ("b", b)):
        for col in ("value", "n_tokens", "tokens", "exact"):
            out[f"{col}_{side}"] = frame[col].to_numpy()
    out["exact"] = out.pop("exact_a") & out.pop("exact_b")
    out["value"] = out.value_b - out.value_a
    out = text_boxes(out, "span_id")
    agg = agg or default_aggregation(metric)
    out["tip"] = [f"span {r.span_id} {r.shown!r} | A: {r.value_a:.4g} over {r.tokens_a or '-'}"
                  f" | B: {r.value_b:.4g} over {r.tokens_b or '-'} | B - A {r.value:+.4g} "
                  f"({agg})" + ("" if r.exact else " | NOT EXACT: a token straddles an edge")
                  for r in out.itertuples()]
    return out
