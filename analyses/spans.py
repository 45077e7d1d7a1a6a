"""Two models with different tokenisers compared on character spans of the same text.

Definitions (README, "Measures"; all logs natural, so nats):

- Spans tile the text: every character belongs to exactly one span. `word` (default): a
  whitespace-separated word with the whitespace before it attached (" fox"), the text's leading
  whitespace to the first word, trailing whitespace to the last. `regex`: each non-empty match of
  a user pattern with the unmatched text before it attached, trailing text to the last span.
  `sentence`: cut after a run of . ! ? … (and closing quotes or brackets) followed by whitespace,
  and before a blank line; the whitespace goes to the next sentence. `offsets`: user-given cut
  points, the character offsets where spans begin.
- Each model sees its own tokenisation of the text, with the tokenizer's special tokens. A
  model whose tokenizer adds nothing before the text gets a start token as context (`"auto"`):
  `<|endoftext|>` where the vocabulary has it (GPT-2 and SmolLM2's document separator; SmolLM2's
  BOS is the chat marker <|im_start|>, which costs its first word about 3 nats more), else the
  BOS, else the EOS (lm-evaluation-harness' prefix token); `start_token=None` leaves the first
  token unscored and its span's surprisal NaN.
- Tokens are placed by the tokenizer's character offsets (a fast tokenizer's offset mapping).
  Zero-width special tokens (BOS) are context, never text. A token belongs to the span holding
  its first character (the rule for a token that straddles a span edge: all its surprisal goes
  to the span where it starts). Byte-level pieces of one multi-byte character (GPT-2's byte
  BPE, SentencePiece's byte fallback) carry that character's offsets, so each starts there.
- `surprisal` = -log p(span | prefix) = -sum of log p(token | earlier tokens) over the span's
  tokens; `entropy_first` = entropy of the next-token distribution that predicts the span's
  first token; `exact` = the model's tokenisation has a token boundary at both span edges (no
  token has an edge strictly inside it) and the surprisal is defined. Only where both models
  are exact do the two numbers measure the same event; elsewhere a straddling token moves
  surprisal between neighbouring spans (the sum over a prompt's spans is unchanged).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from tokenprobe.analyses.spans_segment import (UNITS, Tokenised, compile_pattern,  # noqa: F401
                                               segment, start_token_id, tokenise)
from tokenprobe.models import LoadedModel
from tokenprobe.store import Run, RunWriter, check_target, model_meta, prompt_tables
from tokenprobe.tables import Column, Table, conform, declare
from tokenprobe.tokens import PromptError, check_nonempty, pad_batch, token_text

__all__ = ["SIDES", "UNITS", "Tokenised", "assign", "compare", "compare_spans",
           "compile_pattern", "edges_of", "measure", "prompt_totals", "score", "segment",
           "span_byte_jsd", "span_measures", "spans_run", "start_token_id", "straddled",
           "summarize", "tokenise"]
SIDES = ("a", "b")

C = Column
declare("spans", {
    "spans": Table("prompt x span (tokenprobe spans: model a = --model, b = --vs)",
                   ("prompt_id", "span_id"), {
        "prompt_id": C("int64", "key"),
        "span_id": C("int64", "key: 0-based, in text order; the spans tile the text"),
        "char_start": C("int64", "first character of the span (offset into prompts.text)"),
        "char_end": C("int64", "one past its last character"),
        "text": C("string", "the span's exact text (unit word: the word with the whitespace "
                            "before it)"),
        **{f"surprisal_{s}": C("float64", f"-log p_{s}(span | prefix), nats: the sum of "
                                          "-logprob over the tokens that start in the span")
           for s in SIDES},
        **{f"entropy_first_{s}": C("float64", f"entropy (nats) of model {s}'s next-token "
                                              "distribution that predicts the span's first "
                                              "token; NA if no token starts in it")
           for s in SIDES},
        **{f"n_tokens_{s}": C("int64", f"model {s}'s tokens that start in the span")
           for s in SIDES},
        **{f"exact_{s}": C("bool", f"model {s} has a token boundary at both span edges (no "
                                   "token straddles one) and the surprisal is defined")
           for s in SIDES},
        "exact": C("bool", "exact_a and exact_b: both surprisals measure the same event"),
        "surprisal_diff": C("float64", "surprisal_b - surprisal_a (nats)"),
        "entropy_diff": C("float64", "entropy_first_b - entropy_first_a (nats)"),
        "jsd_byte": C("float64", "with byte_jsd / --bytes: Jensen-Shannon divergence (nats, "
                                 "<= ln 2) of the two models' exact next-byte distributions "
                                 "at the span's first byte (Phan et al.; analyses/bytelevel)"),
    }),
    "span_tokens": Table("prompt x model x position (each model's tokenisation in a spans "
                         "run)", ("prompt_id", "model", "pos"), {
        "prompt_id": C("int64", "key"),
        "model": C("string", "key: a (--model) or b (--vs)"),
        "pos": C("int64", "key: 0-based over the sequence the model ran (start token "
                          "included)"),
        "token_id": C("int64", "vocabulary id"),
        "token": C("string", "the token's readable text (control characters escaped)"),
        "char_start": C("int64", "the tokenizer's character offsets into prompts.text "
                                 "(0, 0 for context tokens)"),
        "char_end": C("int64", "one past the token's last character"),
        "span_id": C("Int64", "the span the token counts for (where it starts); NA for "
                              "context tokens"),
        "logprob": C("float64", "log p(token | earlier tokens), nats; NA at pos 0"),
        "entropy": C("float64", "entropy of the distribution that predicted it (nats)"),
        "crosses_edge": C("bool", "a span edge lies strictly inside the token"),
    }),
    "prompts": {
        "n_spans": C("int64", "spans of the prompt (tokenprobe spans)"),
        "share_exact": C("float64", "share of its spans exact for both models"),
        **{f"surprisal_{s}": C("float64", f"-log p_{s}(text | start), nats: the sum over "
                                          "the prompt's spans") for s in SIDES},
        **{f"n_tokens_{s}": C("int64", f"model {s}'s text tokens") for s in SIDES},
    }})
del C


# ---- alignment (pure) ---------------------------------------------------------------------

def edges_of(spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """The span edges: char_start of each span, then the last char_end. (n_spans + 1,)"""
    return np.array([s for s, _ in spans] + [spans[-1][1]], dtype=np.int64)


def straddled(starts: np.ndarray, ends: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(n_tokens, n_edges) bool: edge e lies strictly inside token t (start < e < end)."""
    return (starts[:, None] < edges[None, :]) & (edges[None, :] < ends[:, None])


def assign(starts: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """The span of each token: the one holding its first character (a zero-width token at the
    text's end: the last span). (n_tokens,) int."""
    first = np.array([s for s, _ in spans], dtype=np.int64)
    return np.clip(np.searchsorted(first, starts, side="right") - 1, 0, len(spans) - 1)


def span_measures(starts: np.ndarray, ends: np.ndarray, logprob: np.ndarray,
                  entropy: np.ndarray, spans: Sequence[tuple[int, int]]) -> pd.DataFrame:
    """Per span: surprisal, entropy_first, n_tokens and exact, from a model's text tokens.

    Args:
        starts, ends: each text token's character offsets (tokenizer order). (n_tokens,)
        logprob: log p(token | earlier tokens), NaN where unscored. (n_tokens,)
        entropy: entropy of the distribution that predicted each token. (n_tokens,)
        spans: the (char_start, char_end) spans tiling the text.
    """
    n = len(spans)
    where = assign(starts, spans)
    surprisal = np.zeros(n)
    np.add.at(surprisal, where, -logprob)  # NaN propagates: an unscored token, no surprisal
    counts = np.bincount(where, minlength=n)
    first = np.full(n, np.nan)
    spans_seen, index = np.unique(where, return_index=True)
    first[spans_seen] = entropy[index]
    cut = straddled(starts, ends, edges_of(spans)).any(axis=0)  # (n_spans + 1,)
    exact = ~cut[:-1] & ~cut[1:] & np.isfinite(surprisal)
    return pd.DataFrame({"span_id": np.arange(n), "surprisal": surprisal,
                         "entropy_first": first, "n_tokens": counts, "exact": exact})


# ---- scoring -------------------------------------------------------------------------------

@torch.inference_mode()
def score(model, rows: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 8
          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sequence: (logprob, entropy), each (T,): log p(token t | tokens < t) and the
    entropy (nats) of that distribution, both NaN at t = 0. The final-normed residuals go
    through the streaming unembedding kernel (`kernels.linear_entropy`), as the entropy probe's
    do: no (T, V) logits are held."""
    from tokenprobe.kernels.linear_entropy import linear_entropy
    from tokenprobe.placement import input_device
    from tokenprobe.unembedding import Unembedding

    device, out, unembed = input_device(model), [None] * len(rows), Unembedding.of(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        ids, mask = pad_batch([list(rows[i]) for i in chunk], pad_id, device)  # (B, T)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask,
                                     use_cache=False).last_hidden_state  # (B, T, D), normed
        lengths = [len(rows[i]) for i in chunk]
        stats = linear_entropy(
            torch.cat([hidden[row, :n - 1] for row, n in enumerate(lengths)]).float(),
            unembed.weight, bias=unembed.bias, softcap=unembed.softcap,
            targets=torch.cat([ids[row, 1:n] for row, n in enumerate(lengths)]))
        start = 0
        for i, n in zip(chunk, lengths):
            nan = np.full(1, math.nan)
            lp = stats["target_logprob"][start:start + n - 1].double().cpu().numpy()
            h = stats["entropy"][start:start + n - 1].double().cpu().numpy()
            out[i] = (np.concatenate([nan, lp]), np.concatenate([nan, h]))
            start += n - 1
    return out


def measure(loaded: LoadedModel, texts: Sequence[str], segments: Sequence[list], *,
            start_token: str | None = "auto", batch_size: int = 8
            ) -> tuple[list[pd.DataFrame], list[pd.DataFrame], list[Tokenised]]:
    """One model over the texts: per text its span measures (`span_measures`) and its token
    rows (the `span_tokens` columns but prompt_id and model), and the tokenisations."""
    tok = loaded.tokenizer
    encoded = [tokenise(tok, t, start_token=start_token) for t in texts]
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    for i, e in enumerate(encoded):
        if context and len(e.ids) > context:
            raise PromptError(f"prompt {i} has {len(e.ids)} tokens for {loaded.name}, more than "
                              f"its context of {context}; shorten it")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    scores = score(loaded.model, [e.ids for e in encoded], pad_id=pad, batch_size=batch_size)
    spans_out, tokens_out = [], []
    for e, spans, (logprob, entropy) in zip(encoded, segments, scores):
        spans_out.append(span_measures(e.starts, e.ends, logprob[e.text_pos],
                                       entropy[e.text_pos], spans))
        start, end = np.zeros(len(e.ids), np.int64), np.zeros(len(e.ids), np.int64)
        start[e.text_pos], end[e.text_pos] = e.starts, e.ends
        span_id = pd.array([pd.NA] * len(e.ids), dtype="Int64")
        span_id[e.text_pos] = assign(e.starts, spans)
        crosses = np.zeros(len(e.ids), bool)
        crosses[e.text_pos] = straddled(e.starts, e.ends, edges_of(spans)).any(axis=1)
        tokens_out.append(pd.DataFrame({
            "pos": np.arange(len(e.ids)), "token_id": e.ids,
            "token": [token_text(tok, i) for i in e.ids], "char_start": start, "char_end": end,
            "span_id": span_id, "logprob": logprob, "entropy": entropy,
            "crosses_edge": crosses}))
    return spans_out, tokens_out, encoded


# ---- the comparison -------------------------------------------------------------------------

def _segments(prompts: Sequence[str], unit: str, pattern: str | None,
              cuts: Sequence[Sequence[int]] | None) -> list[list[tuple[int, int]]]:
    check_nonempty(list(prompts))
    if cuts is not None and len(cuts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(cuts)} lists of cuts")
    out = []
    for i, text in enumerate(prompts):
        try:
            out.append(segment(text, unit, pattern=pattern,
                               cuts=None if cuts is None else cuts[i]))
        except ValueError as err:
            raise ValueError(f"prompt {i}: {err}") from None
    return out


def span_byte_jsd(loaded_a: LoadedModel, loaded_b: LoadedModel, prompts: Sequence[str],
                  spans: pd.DataFrame) -> np.ndarray:
    """`jsd_byte` of every row of `spans`: the JSD of the models' next-byte distributions at
    the span's first byte (`bytelevel.byte_divergence`, prune "prefix"; NaN where a model has
    none, e.g. SmolLM2 before its first space). 3-6 s a span on 2 CPU cores for the pair."""
    from tokenprobe.analyses.bytelevel import byte_divergence

    out = []
    for pid, text in enumerate(prompts):
        starts = spans.char_start[spans.prompt_id == pid]
        offsets = [len(text[:a].encode("utf-8")) for a in starts]
        out.append(byte_divergence(loaded_a.model, loaded_a.tokenizer, loaded_b.model,
                                   loaded_b.tokenizer, text, positions=offsets).jsd.to_numpy())
    return np.concatenate(out)


def compare(loaded_a: LoadedModel, loaded_b: LoadedModel, prompts: Sequence[str], *,
            unit: str = "word", pattern: str | None = None,
            cuts: Sequence[Sequence[int]] | None = None, start_token: str | None = "auto",
            batch_size: int = 8, byte_jsd: bool = False) -> dict[str, object]:
    """The comparison's tables: "spans" (the table), "span_tokens" and, per side, the
    tokenisations ("tokenised_a", "tokenised_b"); see `compare_spans`."""
    segments = _segments(prompts, unit, pattern, cuts)
    sides = {s: measure(m, prompts, segments, start_token=start_token, batch_size=batch_size)
             for s, m in zip(SIDES, (loaded_a, loaded_b))}
    frames, token_frames = [], []
    for i, (text, spans) in enumerate(zip(prompts, segments)):
        frame = pd.DataFrame({"prompt_id": i, "span_id": np.arange(len(spans)),
                              "char_start": [a for a, _ in spans],
                              "char_end": [b for _, b in spans],
                              "text": [text[a:b] for a, b in spans]})
        for s in SIDES:
            measured = sides[s][0][i].drop(columns="span_id").add_suffix(f"_{s}")
            frame = pd.concat([frame, measured], axis=1)
            token_frames.append(sides[s][1][i].assign(prompt_id=i, model=s))
        frames.append(frame)
    spans = pd.concat(frames, ignore_index=True)
    spans["exact"] = spans.exact_a & spans.exact_b
    spans["surprisal_diff"] = spans.surprisal_b - spans.surprisal_a
    spans["entropy_diff"] = spans.entropy_first_b - spans.entropy_first_a
    if byte_jsd:
        spans["jsd_byte"] = span_byte_jsd(loaded_a, loaded_b, prompts, spans)
    return {"spans": conform("spans", spans),
            "span_tokens": conform("span_tokens", pd.concat(token_frames, ignore_index=True)),
            "tokenised_a": sides["a"][2], "tokenised_b": sides["b"][2]}


def compare_spans(loaded_a: LoadedModel, loaded_b: LoadedModel, prompts: Sequence[str], *,
                  unit: str = "word", pattern: str | None = None,
                  cuts: Sequence[Sequence[int]] | None = None,
                  start_token: str | None = "auto", batch_size: int = 8,
                  byte_jsd: bool = False) -> pd.DataFrame:
    """The `spans` table of two models (a, b) on the same prompts (prompt_id = index).

    Args:
        loaded_a, loaded_b: `tokenprobe.load()` results; any two tokenisers (fast ones).
        prompts: the texts.
        unit, pattern, cuts: how each text is cut into spans (`segment`; `cuts` one list per
            prompt for unit "offsets").
        start_token: the context token of a model whose tokenizer adds none ("auto", a
            token's text, or None: the first token unscored).
        batch_size: prompts per forward.
        byte_jsd: add `jsd_byte` (`span_byte_jsd`; slow: seconds a span).

    Raises:
        ValueError: a bad unit, pattern or cuts, a slow tokenizer, an unknown start token.
        PromptError: an empty prompt, or one longer than a model's context.
    """
    return compare(loaded_a, loaded_b, prompts, unit=unit, pattern=pattern, cuts=cuts,
                   start_token=start_token, batch_size=batch_size, byte_jsd=byte_jsd)["spans"]


def _number(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def summarize(spans: pd.DataFrame) -> dict[str, object]:
    """The comparison in figures: span counts, the share exact (both, and per model), over the
    spans exact for both the mean |surprisal_b - surprisal_a|, the mean difference and the
    Pearson and Spearman correlations of the surprisals, and each model's total surprisal
    (nats), and with `jsd_byte` its mean over the spans that have one. A figure that cannot be
    computed (no exact span) is None."""
    both = spans[spans.exact & np.isfinite(spans.surprisal_a) & np.isfinite(spans.surprisal_b)]

    def corr(rank: bool) -> float | None:  # Spearman: Pearson of the ranks (no scipy)
        a, b = both.surprisal_a, both.surprisal_b
        if len(both) < 2 or a.nunique() < 2 or b.nunique() < 2:
            return None
        return _number(a.rank().corr(b.rank()) if rank else a.corr(b))

    return {"n_prompts": int(spans.prompt_id.nunique()), "n_spans": len(spans),
            "n_exact": len(both), "share_exact": _number(spans.exact.mean()),
            "share_exact_a": _number(spans.exact_a.mean()),
            "share_exact_b": _number(spans.exact_b.mean()),
            "mean_abs_diff_exact": _number(both.surprisal_diff.abs().mean()) if len(both)
            else None,
            "mean_diff_exact": _number(both.surprisal_diff.mean()) if len(both) else None,
            "pearson_exact": corr(False), "spearman_exact": corr(True),
            "surprisal_a": _number(spans.surprisal_a.sum(min_count=1)),
            "surprisal_b": _number(spans.surprisal_b.sum(min_count=1)),
            **({"mean_jsd_byte": _number(spans.jsd_byte.mean())} if "jsd_byte" in spans else {})}


def prompt_totals(spans: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: n_spans, share_exact, surprisal_a / _b (the sums over its spans, NaN if one
    is undefined) and n_tokens_a / _b."""
    grouped = spans.groupby("prompt_id")
    out = pd.DataFrame({"n_spans": grouped.size(), "share_exact": grouped.exact.mean()})
    for s in SIDES:
        out[f"surprisal_{s}"] = grouped[f"surprisal_{s}"].apply(lambda v: v.sum(skipna=False))
        out[f"n_tokens_{s}"] = grouped[f"n_tokens_{s}"].sum()
    return out.reset_index()


def spans_run(loaded_a: LoadedModel, loaded_b: LoadedModel, prompts: Sequence[str], *,
              unit: str = "word", pattern: str | None = None,
              cuts: Sequence[Sequence[int]] | None = None, start_token: str | None = "auto",
              batch_size: int = 8, byte_jsd: bool = False,
              out: str | os.PathLike | None = None, overwrite: bool = False) -> Run:
    """`compare_spans` as a run: tables `prompts` (with the per-prompt totals), `tokens`
    (model a's tokenisation), `span_tokens` (both models') and `spans`; run.json names both
    models (`model`, `model_b`, `models`) and holds `summary.spans` (`summarize`).

    `out`, `overwrite`: save the run there (`tokenprobe.store.RunWriter`); None keeps it in
    memory. A taken `out` fails before any work.
    """
    if out is not None:
        check_target(Path(out), overwrite=overwrite)
    found = compare(loaded_a, loaded_b, prompts, unit=unit, pattern=pattern, cuts=cuts,
                    start_token=start_token, batch_size=batch_size, byte_jsd=byte_jsd)
    spans, encoded = found["spans"], {s: found[f"tokenised_{s}"] for s in SIDES}
    rows = [(i, text, e.ids, False) for i, (text, e) in enumerate(zip(prompts, encoded["a"]))]
    tables = prompt_tables(loaded_a.tokenizer, rows)
    tables["prompts"] = conform("prompts", tables["prompts"].merge(prompt_totals(spans),
                                                                   on="prompt_id"))
    models = {}
    for s, loaded in zip(SIDES, (loaded_a, loaded_b)):
        models[s] = {**model_meta(loaded.model, loaded.name, loaded.fingerprint),
                     "start_token": next((e.start_token for e in encoded[s] if e.start_token),
                                         None)}
    settings = {"analysis": "spans", "model_b": loaded_b.name, "models": models,
                "config": {"unit": unit, "pattern": pattern, "cuts": cuts,
                           "start_token": start_token, "batch_size": batch_size,
                           "byte_jsd": byte_jsd}}
    writer = RunWriter(out, model=loaded_a.model, name=loaded_a.name,
                       fingerprint=loaded_a.fingerprint, settings=settings, overwrite=overwrite)
    writer.write(0, {**tables, "span_tokens": found["span_tokens"], "spans": spans})
    return writer.finish(lambda t: (t, {"summary": {"spans": summarize(spans)}}))
