"""The entropy probe's reductions over per-token values, pure and independent of the model:
ARES window entropy (shawn0728/ARES), entropy bands and forking tokens (Wang et al., "Beyond the
80/20 Rule", rho = 0.2) and TIP's quadrants (Xu et al., "Token Importance in On-Policy
Distillation"), and the run-level figures over a whole run by SQL (`run_quantiles`,
`run_summary`, `run_diagnostics`, over a `tokenprobe.store.PartsSQL`). Definitions and
defaults: README, "Measures". Registers no probe.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

TIP_QUADRANTS = ("high_H_high_D", "high_H_low_D", "low_H_high_D", "low_H_low_D")
MIN_SCORED = 100  # scored tokens below which quantile bands are flagged (diagnostics)


def window_entropy(entropy: np.ndarray, w: int = 4, *, start: str = "next") -> np.ndarray:
    """ARES window entropy of one prompt: H_bar_t = mean(H_{t+1..t+w}) ("next", their code) or
    mean(H_{t..t+w-1}) ("current", the paper). Position 0 (no prediction) is skipped, a window
    cut by the end of the prompt averages what is left (NaN if nothing is), and a window that
    holds a NaN or inf entropy is NaN."""
    h = np.asarray(entropy, dtype=float)
    n = len(h)
    shift = 1 if start == "next" else 0
    out = np.full(n, np.nan)
    for t in range(n):
        chunk = h[max(t + shift, 1):t + shift + w]
        if len(chunk) and np.isfinite(chunk).all():
            out[t] = chunk.mean()
    return out


def entropy_bands(entropy: pd.Series, *, low_quantile: float = 0.5, high_quantile: float = 0.8,
                  rho: float = 0.2) -> tuple[pd.Series, pd.Series, dict[str, float]]:
    """Band (low < q_low <= mid < q_high <= high) and forking flag (H >= q_{1 - rho}) of each
    scored token, and the thresholds used (quantiles of the finite entropies); a NaN or inf
    entropy gets no band and no forking flag (NA)."""
    scored = entropy[np.isfinite(entropy.to_numpy(float))]
    if scored.empty:
        q = {"q_low": math.nan, "q_high": math.nan, "q_forking": math.nan}
    else:
        q = {"q_low": float(np.quantile(scored, low_quantile)),
             "q_high": float(np.quantile(scored, high_quantile)),
             "q_forking": float(np.quantile(scored, 1 - rho))}
    return (*bands_at(entropy, q), q)


def bands_at(entropy: pd.Series, q: dict[str, float]) -> tuple[pd.Series, pd.Series]:
    """Band and forking flag of each token at given thresholds (q_low, q_high, q_forking, as
    `entropy_bands` returns them); NA where the entropy is NaN or inf."""
    finite = pd.Series(np.isfinite(entropy.to_numpy(float)), index=entropy.index)
    band = pd.Series(np.where(entropy >= q["q_high"], "high",
                              np.where(entropy >= q["q_low"], "mid", "low")),
                     index=entropy.index, dtype="string")
    band[~finite] = pd.NA
    forking = (entropy >= q["q_forking"]).astype("boolean")
    forking[~finite] = pd.NA
    return band, forking


def run_quantiles(sql, where: str, config) -> dict[str, float]:
    """`entropy_bands`' thresholds over the rows of table `tokens` where SQL `where` holds,
    by DuckDB over the whole run (`sql`: a `tokenprobe.store.PartsSQL`) without loading it:
    exact quantiles, linearly interpolated as numpy's default; NaN when no row is left."""
    levels = [float(config.low_quantile), float(config.high_quantile), 1 - float(config.rho)]
    row = sql.sql(f"SELECT quantile_cont(entropy, [{', '.join(map(repr, levels))}]) AS q "
                  f"FROM tokens WHERE {where}").q.iloc[0]
    values = [float(v) for v in row] if hasattr(row, "__len__") and len(row) else [math.nan] * 3
    return dict(zip(("q_low", "q_high", "q_forking"), values))


def tip_quadrant(entropy: np.ndarray, jsd: np.ndarray, vocab: int, *, entropy_threshold: float = 0.5,
                 divergence_threshold: float = 0.5) -> np.ndarray:
    """TIP quadrant per token from student entropy and JSD(student || teacher), both in nats."""
    high_h = np.asarray(entropy) / math.log(vocab) >= entropy_threshold
    high_d = np.asarray(jsd) / math.log(2) >= divergence_threshold
    labels = np.where(high_h, np.where(high_d, TIP_QUADRANTS[0], TIP_QUADRANTS[1]),
                      np.where(high_d, TIP_QUADRANTS[2], TIP_QUADRANTS[3])).astype(object)
    labels[np.isnan(entropy) | np.isnan(jsd)] = None
    return labels


def strict_mean(x: pd.Series) -> float:
    """The mean, NaN when any value is NaN or inf (never a mean over a part of the prompt)."""
    values = x.to_numpy(float)
    return float(values.mean()) if np.isfinite(values).all() else math.nan


def run_summary(sql, config) -> dict:
    """Run-level figures: scored tokens, mean entropy and self-certainty, perplexity, the
    band and forking thresholds (per-run quantiles), and two-model means when present.
    Prompts with a NaN or inf statistic are left out and counted in `prompts_excluded`."""
    finite = " AND ".join(f"coalesce(isfinite({c}), false)"
                          for c in ("entropy", "logprob", "self_certainty"))
    kept = (f"pos > 0 AND prompt_id NOT IN (SELECT prompt_id FROM tokens WHERE pos > 0 "
            f"AND NOT ({finite}))")
    extra = [c for c in ("jsd", "kl_student_teacher", "critical_ce")
             if c in sql.columns("tokens")]
    row = sql.sql(
        f"SELECT (SELECT count(DISTINCT prompt_id) FROM tokens WHERE pos > 0 AND NOT "
        f"({finite})) AS excluded, count(*) AS n, avg(entropy) AS h, "
        f"avg(self_certainty) AS c, avg(logprob) AS lp"
        + "".join(f", avg({c}) AS {c}" for c in extra)
        + f" FROM tokens WHERE {kept}").iloc[0]
    excluded = {"prompts_excluded": int(row.excluded)}
    if not row.n:
        return {"n_scored": 0, **excluded}
    out = {"n_scored": int(row.n), **excluded, "mean_entropy": float(row.h),
           "mean_self_certainty": float(row.c), "perplexity": math.exp(-float(row.lp)),
           **run_quantiles(sql, kept, config),
           "quantiles_over": config.quantiles_over}
    for col in extra:
        out[f"mean_{col}"] = float(row[col])
    return out


def run_diagnostics(sql, cfg) -> list[str]:
    """When bands and forking flags rest on too few tokens to place a quantile: under
    MIN_SCORED scored tokens in the run (quantiles over the run) or in a prompt (over each
    prompt); `cfg` is the probe's EntropyConfig."""
    counts = sql.sql("SELECT prompt_id, count(*) AS n FROM tokens WHERE pos > 0 AND "
                     "coalesce(isfinite(entropy), false) GROUP BY prompt_id")
    if cfg.quantiles_over == "run" and counts.n.sum() < MIN_SCORED:
        return [f"entropy bands and forking flags rest on {int(counts.n.sum())} scored "
                f"tokens in the whole run: too few for its {cfg.low_quantile:g}, "
                f"{cfg.high_quantile:g} and {1 - cfg.rho:g} quantiles to mean much (give "
                f"at least {MIN_SCORED})"]
    few = int((counts.n < MIN_SCORED).sum())
    if cfg.quantiles_over == "prompt" and few:
        return [f"{few} of {len(counts)} prompts have under {MIN_SCORED} scored tokens: "
                "their own quantiles (--quantiles prompt) place bands and forking flags on "
                "a handful of values; quantiles over the run are steadier"]
    return []
