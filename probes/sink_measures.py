"""The sinks probe's pure reductions and run-level SQL: value-state drains (Guo et al.),
attention received and its uniform-causal baseline, Gu et al.'s sink rate per prompt and over a
run, and the late-peak note on attention received. Registers no probe."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch


def head_grams(w_o: torch.Tensor, heads: int) -> torch.Tensor:
    """(H, Dh, Dh) float32 Gram matrices W_O^(h)T W_O^(h) of the attention output projection
    w_o (D, H * Dh), per query head: `value_norms`' quadratic forms (they depend only on the
    weights, so the sinks probe keeps them between batches)."""
    w = w_o.float().view(w_o.shape[0], heads, -1)  # (D, H, Dh)
    return torch.einsum("dhi,dhj->hij", w, w)


def value_norms(w_o: torch.Tensor, value: torch.Tensor, heads: int,
                gram: torch.Tensor | None = None) -> torch.Tensor:
    """Guo et al.'s value-state drain: ||W_O^(h) v_t^(h)|| per head and token.

    Computed as sqrt(v^T (W_O^(h)T W_O^(h)) v): a (Dh, Dh) Gram matrix per head instead of a
    projection to the model width, the same number with D / Dh times fewer multiplications;
    the query heads sharing a value head in one matrix product (no repeated values).

    Args:
        w_o: (D, H * Dh) the attention output projection.
        value: (B, KVH, S, Dh) value states.
        heads: number of query heads H (value head of head h is h // (H / KVH)).
        gram: `head_grams(w_o, heads)`, if already at hand.

    Returns:
        (B, H, S) float32 norms.
    """
    bsz, kvh, s, dh = value.shape
    groups = heads // kvh
    gram = head_grams(w_o, heads) if gram is None else gram
    v = value.float().transpose(0, 1).reshape(kvh, bsz * s, dh)  # (KVH, B S, Dh)
    # a value head's G query heads side by side: (KVH, Dh, G Dh)
    side = gram.view(kvh, groups, dh, dh).permute(0, 2, 1, 3).reshape(kvh, dh, groups * dh)
    vg = torch.bmm(v, side).view(kvh, bsz * s, groups, dh)  # v^T G per query head
    quad = torch.linalg.vecdot(vg, v[:, :, None])  # (KVH, B S, G)
    quad = quad.view(kvh, bsz, s, groups).permute(1, 0, 3, 2).reshape(bsz, heads, s)
    return quad.clamp_min(0).sqrt()


def received_per_key(received: torch.Tensor, heads: int,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
    """`attn_received` from the attention kernel's column sums.

    Args:
        received: (T,) sum over heads and real queries of A[i, k] for one prompt's T real keys,
            or (B, W) for a right-padded batch.
        heads: number of query heads H.
        lengths: (B,) real tokens per row of a batch (NaN past them); None: T.

    Returns:
        (T,) or (B, W): the mean over heads and over the queries i >= k: received / (H (T - k)).
    """
    t = received.shape[-1]
    n = torch.tensor(t) if lengths is None else lengths.to(received.device)[:, None]
    later = n - torch.arange(t, device=received.device)  # queries i >= k
    return torch.where(later > 0, received / (heads * later.clamp_min(1)), math.nan)


def uniform_received(n: int) -> np.ndarray:
    """`attn_received` under uniform causal attention, where query i gives 1 / (i + 1) to
    each key <= i: for key k the mean over queries i >= k of 1 / (i + 1).

    Returns:
        (n,) float64 (H_n - H_k) / (n - k), H the harmonic numbers; 1 / n at k = n - 1.
    """
    tail = np.cumsum(1.0 / np.arange(n, 0, -1))[::-1]  # sum_{i >= k} 1 / (i + 1)
    return tail / (n - np.arange(n))


def sink_rates(heads: pd.DataFrame, eps: float) -> pd.DataFrame:
    """Gu et al.'s Sink_k^eps per prompt from `heads` rows: sink_rate = 100 x the share of
    (layer, head) with sink_mass > eps, NaN when any sink mass of the prompt is NaN or inf
    (a rate over the other heads would not be the measure), and nonfinite_heads, their count.

    Returns:
        one row per prompt_id (index), columns sink_rate, nonfinite_heads, n_heads.
    """
    bad = ~np.isfinite(heads.sink_mass.to_numpy(float))
    out = heads.assign(is_sink=heads.sink_mass > eps, bad=bad).groupby("prompt_id").agg(
        sink_rate=("is_sink", "mean"), nonfinite_heads=("bad", "sum"), n_heads=("bad", "size"))
    out["sink_rate"] = (100 * out.sink_rate).where(out.nonfinite_heads == 0)
    return out


def run_sink_rate(rates: pd.DataFrame) -> float:
    """The run's sink rate from `sink_rates`: over every head of the prompts left in (NaN when
    none is)."""
    kept = rates[rates.nonfinite_heads == 0]
    return float((kept.sink_rate * kept.n_heads).sum() / kept.n_heads.sum()) if len(kept) \
        else float("nan")


# `run_sink_rate(sink_rates(heads, eps))` as SQL over table `heads` (parameter: eps), so that a
# run's rate never loads the table: per prompt the rate 100 x mean(sink_mass > eps), then the
# mean over the heads of the prompts with no NaN or inf sink mass.
RUN_SINK_RATE = """
WITH p AS (
    SELECT prompt_id, count(*) AS n,
           sum(CASE WHEN coalesce(isfinite(sink_mass), false) THEN 0 ELSE 1 END) AS bad,
           100 * avg(CASE WHEN sink_mass > $1 THEN 1.0 ELSE 0.0 END) AS rate
    FROM heads GROUP BY prompt_id)
SELECT sum(rate * n) FILTER (WHERE bad = 0) / sum(n) FILTER (WHERE bad = 0) AS sink_rate,
       count(*) FILTER (WHERE bad > 0) AS excluded, coalesce(sum(bad), 0) AS heads_nonfinite
FROM p"""


# Per (prompt, layer), the position after the candidates ($1) with the largest attn_received and
# the one with the largest attn_received_norm, counted when in the last 10% of the prompt.
LATE_PEAKS = """
WITH r AS (
    SELECT t.prompt_id, t.layer, t.pos, t.attn_received AS a, t.attn_received_norm AS b,
           p.n_tokens AS n
    FROM token_layers t JOIN prompts p USING (prompt_id)
    WHERE p.n_tokens >= 10 AND t.pos > $1 AND isfinite(t.attn_received)),
top AS (SELECT n, arg_max(pos, a) AS pa, arg_max(pos, b) AS pb FROM r
        GROUP BY prompt_id, layer, n)
SELECT count(*) AS pairs, count(*) FILTER (WHERE pa >= n - ceil(n / 10.0)) AS late,
       count(*) FILTER (WHERE pb >= n - ceil(n / 10.0)) AS late_norm FROM top"""


def received_notes(sql, after: int) -> list[str]:
    """A note when attn_received peaks in the last 10% of positions (past position `after`)
    in most (prompt, layer) pairs of prompts of 10 tokens or more, saying whether
    attn_received_norm does too."""
    row = sql.sql(LATE_PEAKS, [after]).iloc[0]
    pairs, late, norm = int(row.pairs), int(row.late or 0), int(row.late_norm or 0)
    if not pairs or late <= pairs / 2:
        return []
    said = (f"attn_received peaks in the last 10% of positions in {late} of {pairs} (prompt, "
            "layer) pairs (positions after the candidates): a key near the end is averaged "
            "over few queries (the last key over one: the last query's attention to itself), "
            "so a late peak is not a sink; ")
    return [said + (f"attn_received_norm (ratio to uniform causal attention) peaks there too "
                    f"({norm} of {pairs}): the late peak is attention to recent tokens, which "
                    "that ratio does not remove" if norm > pairs / 2 else
                    f"attn_received_norm (ratio to uniform causal attention) peaks there in "
                    f"{norm} of {pairs}: compare positions by it")]
