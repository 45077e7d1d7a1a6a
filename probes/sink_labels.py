"""Secondary-sink labels from residual cosines: Wong et al.'s, and tokenprobe's variants.

Wong et al., "On the Existence and Behaviour of Secondary Attention Sinks"
(JeffreyWong20/Secondary-Attention-Sinks, `hidden_state_norm_detection` and
`sink_labeling_machine`): `sink_levels_of` and `secondary_sinks` compute their labels as their
code does (table `sinks`). As in their code, only layers in the primary's norm-growth range
[start, end) are searched, the primary's lifetime is end - start, and only tokens after the
primary are candidates. Their code reads HF's `hidden_states[1:]`, whose last entry is after the
final norm; tokenprobe uses the residual after each block throughout.

tokenprobe's variants (table `sink_labels`; not the paper's measures). The raw |cos| is ~1 for
nearly every token when a few massive dims dominate every residual (Gemma 3 270M: dims 163 and
400), so two other cosines are offered, labelled by the same lifetime rules (`token_labels`):
- `centered_cosines`: residuals minus their mean over the prompt's non-candidate positions
  (the candidates are left out of the mean: a primary sink with one 22,000-sized dim, as
  SmolLM2's, would otherwise move every centred token onto minus itself);
- `nomassive_cosines`: the candidate's `top_k` largest |h| dims removed from both residuals
  (a rank rule: Sun et al.'s 100 and 1000 x median thresholds miss Gemma 3's dim 163 in its
  last four blocks, where it still holds most of every token's norm).
and a further kind, `sink_like`: a run of consecutive flagged layers outside the searched ones,
which the window-restricted search cannot see. `label_notes` says, by SQL over a finished run,
when a criterion does not separate tokens and which tokens are sink-like.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

EPS = 1e-30  # a zero vector's cosine is 0, not NaN


def sink_levels_of(norms: np.ndarray) -> tuple[int, int]:
    """Wong et al.'s layer range of the primary sink from its residual norm per layer.

    Args:
        norms: (L,) ||h_l[primary]||.

    Returns:
        (start, end): start = argmax(d) + 1, end = start + argmin(d[start:]) + 1 with
        d = diff(norms); end = L when nothing is left after start; (0, 1) for a single layer.
    """
    if len(norms) < 2:
        return 0, len(norms)
    d = np.diff(norms)
    start = int(np.argmax(d)) + 1
    rest = d[start:]
    end = start + int(np.argmin(rest)) + 1 if len(rest) else len(norms)
    return start, end


def secondary_sinks(norms: np.ndarray, cos: np.ndarray, candidates: list[int], *,
                    cos_threshold: float = 0.9, primary_margin: int = 15,
                    secondary_min: int = 4) -> pd.DataFrame:
    """Primary and secondary sinks of one prompt (Wong et al.).

    Args:
        norms: (L, C) residual norm of each candidate position at each layer.
        cos: (L, C, T) cosine of every token's residual to each candidate's, per layer.
        candidates: the C candidate positions.

    Returns:
        one row per flagged token: pos, kind (primary / secondary / noise), creation_layer,
        lifetime (flagged layers), max_cos (max |cos| to the primary over the searched layers).
    """
    c, primary, start, end = primary_of(norms, candidates)
    one = lambda value: np.array([value])  # noqa: E731  a batch of one prompt
    stats = lifetimes(np.abs(cos[None, :, c, :]), one(start), one(end),
                      cos_threshold=cos_threshold)  # (1, L, T) in
    keep = np.arange(cos.shape[-1])[None] >= primary  # (1, T)
    rows = sink_rows(stats, one(primary), keep)
    return pd.DataFrame(sink_columns(stats, one(primary), one(start), one(end), rows,
                                     norms.shape[0], primary_margin=primary_margin,
                                     secondary_min=secondary_min))


def primary_of(norms: np.ndarray, candidates: list[int]) -> tuple[int, int, int, int]:
    """Wong et al.'s primary sink of one prompt: the candidate of largest mean norm.

    Args:
        norms: (L, C) residual norm of each candidate position at each layer.
        candidates: the C candidate positions.

    Returns:
        (its index among the candidates, its position, start, end): [start, end) are the
        layers searched for secondary sinks (`sink_levels_of` on its norms).
    """
    c = int(np.argmax(norms.mean(axis=0)))
    start, end = sink_levels_of(norms[:, c])
    return c, candidates[c], start, end


def lifetimes(absolute: np.ndarray, start: np.ndarray, end: np.ndarray, *,
              cos_threshold: float) -> dict[str, np.ndarray]:
    """Per-token flag statistics of S sequences at once (prompts, or prompts x criteria).

    A token is flagged at a layer when |cos| to its sequence's primary > cos_threshold.

    Args:
        absolute: (S, L, T) |cos| of every token's residual to the primary's, per layer.
        start, end: (S,) int64, each sequence's searched layers [start, end) (`primary_of`).

    Returns:
        dict of (S, T) arrays: lifetime (int64, flagged searched layers), first (int64, the
        first flagged searched layer; meaningless where lifetime is 0), max_cos (absolute's
        dtype, max over the searched layers), run_first and run_len (`longest_runs` of the
        flagged layers outside [start, end)).
    """
    layers = np.arange(absolute.shape[1])
    searched = ((layers >= start[:, None]) & (layers < end[:, None]))[:, :, None]  # (S, L, 1)
    flags = absolute > cos_threshold  # (S, L, T)
    inside = flags & searched
    run_first, run_len = longest_runs((flags & ~searched).swapaxes(0, 1))  # (L, S, T) in
    return {"lifetime": inside.sum(1), "first": inside.argmax(1),
            "max_cos": np.max(absolute, axis=1, where=searched, initial=-np.inf),
            "run_first": run_first, "run_len": run_len}


def sink_rows(stats: dict[str, np.ndarray], primary: np.ndarray, keep: np.ndarray
              ) -> np.ndarray:
    """Which positions of S sequences are rows of Wong et al.'s table `sinks`: the primary and
    every flagged token after it, among `keep`.

    Args:
        stats: `lifetimes` of the S sequences (the raw cosine).
        primary: (S,) int64, each sequence's primary position.
        keep: (S, T) bool, the positions that may give rows (real tokens, from the primary on).

    Returns:
        (S, T) bool.
    """
    is_primary = np.arange(keep.shape[1]) == primary[:, None]
    return keep & (is_primary | (stats["lifetime"] > 0))


def sink_columns(stats: dict[str, np.ndarray], primary: np.ndarray, start: np.ndarray,
                 end: np.ndarray, rows: np.ndarray, n_layers: int, *, primary_margin: int,
                 secondary_min: int) -> dict[str, np.ndarray]:
    """Columns of Wong et al.'s table `sinks` for S sequences, a row for each position `rows`
    holds (`sink_rows`), sequence by sequence.

    Args:
        stats: `lifetimes` of the S sequences (the raw cosine).
        primary, start, end: (S,) int64, each sequence's primary position and searched layers.
        rows: (S, T) bool, `sink_rows`.
        n_layers: L, the layers searched over (the lifetime rules count from it).

    Returns:
        pos, kind (primary / secondary / noise by lifetime), creation_layer, lifetime (the
        primary's: end - start) and max_cos (float64; 1 for the primary), each (N,).
    """
    pos = np.broadcast_to(np.arange(rows.shape[1]), rows.shape)  # (S, T)
    is_primary = pos == primary[:, None]
    lifetime = np.where(is_primary, (end - start)[:, None], stats["lifetime"])[rows]
    bar = n_layers - primary_margin
    return {"pos": pos[rows],
            "kind": np.where(lifetime >= bar, "primary",
                             np.where(lifetime > secondary_min, "secondary", "noise")),
            "creation_layer": np.where(is_primary, start[:, None], stats["first"])[rows],
            "lifetime": lifetime,
            "max_cos": np.where(is_primary, 1.0, stats["max_cos"].astype(np.float64))[rows]}


def cosines(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(..., T, D) and (..., C, D) -> (..., C, T) cosines by one matmul; 0 where either vector
    is zero (the raw criterion: Wong et al.'s cosine of the residuals)."""
    norms = (torch.linalg.vector_norm(ref, dim=-1)[..., :, None]
             * torch.linalg.vector_norm(x, dim=-1)[..., None, :])
    return (ref @ x.transpose(-1, -2)) / norms.clamp_min(EPS)


def centered_cosines(x: torch.Tensor, candidates: list[int],
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine of every token's centred residual to each candidate's (tokenprobe's variant).

    The centre is the mean of x over the positions that are not candidates (none left: no
    centring), so that neither a primary sink's massive values nor a direction every token
    shares (Gemma 3's dim 163) decides the cosine.

    Args:
        x: (T, D) residuals of one prompt at one layer, or (B, T, D) of a right-padded batch.
        candidates: the C candidate positions (< T, and < every length).
        lengths: (B,) real tokens per row of a batch (the centre is over those); None: all.

    Returns:
        (C, T) or (B, C, T) cos(x_t - mu, x_c - mu).
    """
    others = torch.ones(x.shape[-2], dtype=torch.bool, device=x.device)
    others[candidates] = False
    others = others.expand(x.shape[:-1]) if lengths is None else others & (
        torch.arange(x.shape[-2], device=x.device) < lengths.to(x.device)[:, None])  # (B, T)
    count = others.sum(-1, keepdim=True)  # (..., 1)
    mu = (x * others[..., None]).sum(-2) / count.clamp_min(1)  # (..., D); 0 when none left
    centred = x - mu[..., None, :]
    return cosines(centred, centred[..., candidates, :])


def massive_dims(ref: torch.Tensor, top_k: int) -> torch.Tensor:
    """The `top_k` dims of largest |h| of each candidate's residual.

    Args:
        ref: (..., C, D) candidate residuals.

    Returns:
        (..., C, min(top_k, D)) int64 dim indices.
    """
    return ref.abs().topk(min(top_k, ref.shape[-1]), dim=-1).indices


def nomassive_cosines(x: torch.Tensor, candidates: list[int], *, top_k: int = 2
                      ) -> torch.Tensor:
    """Cosine of every token's residual to each candidate's without the candidate's massive
    dims (tokenprobe's variant): the `massive_dims(x[candidates], top_k)` of candidate c are
    dropped from both vectors of its cosines; top_k = 0 is the raw cosine.

    Args:
        x: (T, D) residuals of one prompt at one layer, or (B, T, D).
        candidates: the C candidate positions (< T).
        top_k: dims removed per candidate.

    Returns:
        (C, T) or (B, C, T) cosines over the remaining dims.
    """
    ref = x[..., candidates, :]  # (..., C, D)
    keep = torch.ones_like(ref)
    keep.scatter_(-1, massive_dims(ref, top_k), 0.0)  # (..., C, D): 0 at the dropped dims
    kept = ref * keep
    x_norms = ((x * x) @ keep.transpose(-1, -2)).clamp_min(0).sqrt().transpose(-1, -2)
    norms = torch.linalg.vector_norm(kept, dim=-1)[..., :, None] * x_norms  # (..., C, T)
    return (kept @ x.transpose(-1, -2)) / norms.clamp_min(EPS)


def longest_runs(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The longest run of consecutive True layers of every token (the first of equal ones).

    Args:
        flags: (L, T) bool, or (L, *batch, T): every trailing index on its own.

    Returns:
        first (T,) int64 layer where it starts (-1 if none) and length (T,) int64 (shape
        flags.shape[1:]).
    """
    best = np.zeros(flags.shape[1:], dtype=np.int64)
    first = np.full(flags.shape[1:], -1, dtype=np.int64)
    current = np.zeros_like(best)
    for layer, row in enumerate(flags):
        current = np.where(row, current + 1, 0)
        longer = current > best
        best = np.where(longer, current, best)
        first = np.where(longer, layer - current + 1, first)
    return first, best


def token_labels(norms: np.ndarray, cos: np.ndarray, candidates: list[int], *,
                 cos_threshold: float = 0.9, primary_margin: int = 15, secondary_min: int = 4,
                 sink_like_min: int = 5) -> pd.DataFrame:
    """tokenprobe's per-token labels of one prompt under one cosine criterion.

    The primary, its searched layers [start, end), lifetime and creation layer are Wong et
    al.'s (`secondary_sinks` gives the same numbers for the tokens it lists); every position
    from the primary on gets a row. Kinds, first that applies: primary (lifetime >=
    L - primary_margin), secondary (lifetime > secondary_min), sink_like (|cos| >
    cos_threshold at >= sink_like_min consecutive layers outside [start, end)), noise (flagged
    in [start, end) at all), none.

    Args:
        norms: (L, C) residual norm of each candidate at each layer.
        cos: (L, C, T) cosine of every token's residual to each candidate's, per layer.
        candidates: the C candidate positions.

    Returns:
        columns pos, kind, creation_layer (NA: not flagged in [start, end)), lifetime, max_cos
        (max |cos| over [start, end); 1 for the primary), sink_like_first, sink_like_last
        (layers of the longest run outside [start, end) when sink_like, else NA).
    """
    c, primary, start, end = primary_of(norms, candidates)
    one = lambda value: np.array([value])  # noqa: E731  a batch of one prompt
    stats = lifetimes(np.abs(cos[None, :, c, :]), one(start), one(end),
                      cos_threshold=cos_threshold)  # (1, L, T) in
    keep = np.arange(cos.shape[-1])[None] >= primary  # (1, T)
    return pd.DataFrame(label_columns(stats, one(primary), one(start), one(end), keep,
                                      norms.shape[0], primary_margin=primary_margin,
                                      secondary_min=secondary_min, sink_like_min=sink_like_min))


def label_columns(stats: dict[str, np.ndarray], primary: np.ndarray, start: np.ndarray,
                  end: np.ndarray, keep: np.ndarray, n_layers: int, *, primary_margin: int,
                  secondary_min: int, sink_like_min: int) -> dict[str, Any]:
    """Columns of tokenprobe's table `sink_labels` for S sequences (`token_labels`' rules), a
    row for each position `keep` holds, sequence by sequence.

    Args:
        stats: `lifetimes` of the S sequences under one cosine each.
        primary, start, end: (S,) int64, each sequence's primary position and searched layers.
        keep: (S, T) bool, the positions that give rows (real tokens, from the primary on).
        n_layers: L, the layers searched over (the lifetime rules count from it).

    Returns:
        pos, kind, creation_layer (Int64), lifetime, max_cos (stats' dtype), sink_like_first
        and sink_like_last (Int64), each (N,).
    """
    pos = np.broadcast_to(np.arange(keep.shape[1]), keep.shape)  # (S, T)
    is_primary = pos == primary[:, None]
    lifetime = stats["lifetime"]
    flagged, like = lifetime > 0, stats["run_len"] >= sink_like_min
    bar = n_layers - primary_margin
    kind = np.select([flagged & (lifetime >= bar), flagged & (lifetime > secondary_min), like,
                      flagged], ["primary", "secondary", "sink_like", "noise"], "none")
    kind[is_primary] = "primary"
    max_cos = stats["max_cos"]
    like_here = (like & ~is_primary)[keep]
    run_first = stats["run_first"][keep]
    return {
        "pos": pos[keep], "kind": kind[keep],
        "creation_layer": _nullable(np.where(is_primary, start[:, None], stats["first"])[keep],
                                    ~(flagged | is_primary)[keep]),
        "lifetime": np.where(is_primary, (end - start)[:, None], lifetime)[keep],
        "max_cos": np.where(is_primary, max_cos.dtype.type(1.0), max_cos)[keep],
        "sink_like_first": _nullable(run_first, ~like_here),
        "sink_like_last": _nullable(run_first + stats["run_len"][keep] - 1, ~like_here)}


def _nullable(values: np.ndarray, missing: np.ndarray) -> pd.arrays.IntegerArray:
    """An Int64 array of `values`, NA where `missing`."""
    return pd.arrays.IntegerArray(values.astype(np.int64), missing)


VARIANTS = {"centered": "mean-centred", "nomassive": "massive-dims-removed"}  # order said


def label_notes(sql, after: int) -> list[str]:
    """Notes on tokenprobe's labels (table `sink_labels`) of the tokens past position `after`:
    what its variants label when the raw cosine labels most tokens primary or secondary, a
    variant that does so itself, and tokens `sink_like` under the centred cosine."""
    out, shares = [], sql.sql(
        "SELECT criterion, count(*) FILTER (WHERE kind IN ('primary', 'secondary')) AS n, "
        "count(*) AS tokens, median(max_cos) AS cos FROM sink_labels WHERE pos > $1 "
        "GROUP BY criterion", [after]).set_index("criterion")
    share = {c: (int(r.n), int(r.tokens), float(r.cos)) for c, r in shares.iterrows()}
    fails = {c: v for c, v in share.items() if v[1] >= 4 and v[0] > v[1] / 2}
    if "raw" in fails:
        out.append("tokens labelled primary or secondary on tokenprobe's variants (table "
                   "`sink_labels`): " + ", ".join(
                       f"{VARIANTS[c]} cosine {share[c][0]} of {share[c][1]} "
                       f"({100 * share[c][0] / share[c][1]:.0f}%, median max |cos| "
                       f"{share[c][2]:.2f})" for c in VARIANTS if c in share)
                   + f", against {fails['raw'][0]} on the raw cosine")
    for c, (n, t, _) in fails.items():
        if c in VARIANTS:
            out.append(f"the {VARIANTS[c]} cosine (sink_labels criterion {c}) labels {n} of {t} "
                       f"tokens ({100 * n / t:.0f}%) primary or secondary: it does not "
                       "separate tokens in this model" + " either" * ("raw" in fails))
    like = sql.sql("WITH s AS (SELECT * FROM sink_labels WHERE criterion = 'centered' AND "
                   "kind = 'sink_like') SELECT (SELECT count(*) FROM s) AS n, (SELECT "
                   "count(DISTINCT prompt_id) FROM s) AS prompts, * FROM s ORDER BY "
                   "prompt_id, pos LIMIT 1")
    if len(like):
        r = like.iloc[0]
        out.append(f"{r.n} token(s) in {r.prompts} prompt(s) behave like sinks outside the "
                   f"layers Wong et al.'s search covers (e.g. prompt {r.prompt_id} pos {r.pos} "
                   f"'{r.token}', layers {r.sink_like_first}-{r.sink_like_last}; sink_labels "
                   "kind sink_like, criterion centered): table `sinks` never lists them")
    return out
